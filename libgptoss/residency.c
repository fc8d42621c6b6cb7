/* Page-cache residency of mapped file ranges (for `gptoss memprof`): mincore(2) behind the status convention. */
#define _DEFAULT_SOURCE
#include "gptoss.h"

#include <errno.h>
#include <sys/mman.h>
#include <unistd.h>

#include "bf16.h"

GPTOSS_API int gptoss_mincore(const void *addr, size_t length, uint8_t *vec) {
    if (!addr || !vec) return GPTOSS_ERR_NULL_POINTER;
    if (length == 0) return GPTOSS_ERR_BAD_SIZE;
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    /* mincore wants a page-aligned start; the caller sized vec for the pages the range touches. */
    const uintptr_t begin = (uintptr_t)addr & ~(page - 1);
    const size_t span = (uintptr_t)addr - begin + length;
    if (span < length) return GPTOSS_ERR_BAD_SIZE;
    if (mincore((void *)begin, span, (unsigned char *)vec) != 0)
        return errno == ENOMEM ? GPTOSS_ERR_OUT_OF_RANGE : GPTOSS_ERR_BAD_SIZE;
    /* Only bit 0 is defined (the other bits are reserved by the kernel): normalise to 0/1. */
    const size_t n_pages = (span + page - 1) / page;
    for (size_t i = 0; i < n_pages; i++) vec[i] &= 1;
    return GPTOSS_OK;
}
