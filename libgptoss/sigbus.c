/* A clear last word instead of "Bus error (core dumped)" when a mapped checkpoint file shrinks under a running
 * process (or the disk fails to page it in, which the kernel also reports as SIGBUS): a SIGBUS whose address lies in a registered file mapping prints the file and the byte that could
 * not be read, and ends the process with status 1. Nothing can continue after it (the fault may be in any
 * kernel, on any OpenMP thread, with locks held), so the handler only writes and _exits: both are
 * async-signal-safe. A SIGBUS elsewhere goes to the handler that was there before (by default: core dump). */
#define _GNU_SOURCE
#include "gptoss.h"

#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "bf16.h" /* GPTOSS_API */

#define MAX_GUARDS 1024
#define MAX_PATH 1024

typedef struct {
    uintptr_t begin, end;
    char path[MAX_PATH];
} guard_t;

static guard_t guards[MAX_GUARDS];
/* 1 while a slot is complete: set after its fields, cleared before they change (the handler reads only
 * slots marked live; a slot is reused only after gptoss_unguard_mapping). */
static volatile sig_atomic_t live[MAX_GUARDS];
static pthread_mutex_t guards_lock = PTHREAD_MUTEX_INITIALIZER;
static struct sigaction previous;
static int installed;

static void write_all(const char *s, size_t n) {
    while (n > 0) {
        ssize_t w = write(STDERR_FILENO, s, n);
        if (w <= 0) return;
        s += w;
        n -= (size_t)w;
    }
}

static void write_str(const char *s) { write_all(s, strlen(s)); }

static void write_u64(uint64_t v) {
    char buf[24];
    size_t i = sizeof buf;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v && i);
    write_all(buf + i, sizeof buf - i);
}

static void on_sigbus(int sig, siginfo_t *info, void *context) {
    (void)sig;
    (void)context;
    const uintptr_t addr = (uintptr_t)info->si_addr;
    for (int i = 0; i < MAX_GUARDS; i++) {
        if (live[i] && guards[i].begin <= addr && addr < guards[i].end) {
            write_str("gptoss: error: ");
            write_str(guards[i].path);
            write_str(": reading byte ");
            write_u64(addr - guards[i].begin);
            write_str(" of the mapped file failed (SIGBUS): it was truncated while gptoss was running, or the disk"
                      " could not read it; the checkpoint's files must not change under a running model\n");
            _exit(1);
        }
    }
    /* Not ours: put the previous disposition back; returning re-runs the faulting access under it. */
    sigaction(SIGBUS, &previous, NULL);
}

GPTOSS_API int gptoss_guard_mapping(const void *base, size_t length, const char *path, int *slot) {
    if (!base || !path || !slot) return GPTOSS_ERR_NULL_POINTER;
    if (length == 0 || (uintptr_t)base + length < (uintptr_t)base) return GPTOSS_ERR_BAD_SIZE;
    int status = GPTOSS_ERR_NO_MEMORY; /* every slot taken */
    pthread_mutex_lock(&guards_lock);
    if (!installed) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_sigbus;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGBUS, &sa, &previous) != 0) {
            pthread_mutex_unlock(&guards_lock);
            return GPTOSS_ERR_UNSUPPORTED;
        }
        installed = 1;
    }
    for (int i = 0; i < MAX_GUARDS; i++) {
        if (!live[i]) {
            guards[i].begin = (uintptr_t)base;
            guards[i].end = (uintptr_t)base + length;
            strncpy(guards[i].path, path, MAX_PATH - 1);
            guards[i].path[MAX_PATH - 1] = '\0';
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            live[i] = 1;
            *slot = i;
            status = GPTOSS_OK;
            break;
        }
    }
    pthread_mutex_unlock(&guards_lock);
    return status;
}

GPTOSS_API int gptoss_unguard_mapping(int slot) {
    if (slot < 0 || slot >= MAX_GUARDS) return GPTOSS_ERR_OUT_OF_RANGE;
    pthread_mutex_lock(&guards_lock);
    live[slot] = 0;
    pthread_mutex_unlock(&guards_lock);
    return GPTOSS_OK;
}
