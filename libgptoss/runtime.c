/*
 * Run-time settings shared by every kernel: the thread count and the compute path.
 *
 * Compute paths (gptoss_isa), chosen here and nowhere else:
 *   GPTOSS_ISA_AVX512  AVX-512 with AVX512_BF16: oneDNN multiplies bf16 natively (dot products in hardware);
 *                      our kernels use AVX-512.
 *   GPTOSS_ISA_AVX2    AVX2 + FMA + F16C: oneDNN 3.2 has no bf16 matmul below AVX512_BF16 ("unsupported isa"),
 *                      so matmuls run in fp32: our own kernels for a few rows of activations (gemv.c), and
 *                      oneDNN's fp32 GEMM on L2-sized tiles widened to fp32 for more (matmul.c). Weights stay
 *                      bf16 / MXFP4 in memory. An AVX-512 CPU without AVX512_BF16 (Skylake-X, Ice Lake) takes
 *                      this path too: oneDNN's fp32 GEMM then still uses AVX-512 inside.
 *   GPTOSS_ISA_SCALAR  any x86-64: the same fp32 matmul path with plain C kernels. Slow, correct.
 * The best path is the lower of what CPUID reports and what oneDNN says it dispatches
 * (dnnl_get_effective_cpu_isa, which honours ONEDNN_MAX_CPU_ISA): so ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512
 * machine gives exactly the path an AVX2 CPU gets.
 *
 * Documented global state (see gptoss.h): the selected path (-1 until first asked) and the thread count
 * (0 until first asked or set).
 */
#include "gptoss.h"

#include <oneapi/dnnl/dnnl.h>
#include <omp.h>
#include <string.h>

#include "bf16.h"
#include "internal.h"

static int selected_isa = -1;
static int configured_threads = 0;

GPTOSS_API const char *gptoss_status_string(int status) {
    switch (status) {
    case GPTOSS_OK: return "ok";
    case GPTOSS_ERR_NULL_POINTER: return "a required pointer is NULL";
    case GPTOSS_ERR_BAD_SIZE: return "a size is zero, inconsistent or overflowing";
    case GPTOSS_ERR_OUT_OF_RANGE: return "an index, position or row range is out of range";
    case GPTOSS_ERR_NO_MEMORY: return "out of memory";
    case GPTOSS_ERR_ONEDNN: return "oneDNN failed to create or run a primitive";
    case GPTOSS_ERR_UNSUPPORTED: return "not supported on this CPU";
    default: return "unknown status";
    }
}

GPTOSS_API int gptoss_set_num_threads(int n) {
    if (n <= 0) n = omp_get_num_procs();
    configured_threads = n;
    omp_set_num_threads(n);
    return GPTOSS_OK;
}

GPTOSS_API int gptoss_get_num_threads(void) {
    /* Default: OpenMP's own default (OMP_NUM_THREADS, else all processors) of the first thread that asks. */
    if (configured_threads <= 0) configured_threads = omp_get_max_threads();
    return configured_threads;
}

int gptoss_sync_threads(void) {
    int n = gptoss_get_num_threads();
    if (omp_get_max_threads() != n) omp_set_num_threads(n);
    return n;
}

static int cpu_path(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16"))
        return GPTOSS_ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return GPTOSS_ISA_AVX2;
    return GPTOSS_ISA_SCALAR;
}

static int onednn_path(void) {
    unsigned isa = (unsigned)dnnl_get_effective_cpu_isa();
    if ((isa & dnnl_cpu_isa_avx512_core_bf16) == dnnl_cpu_isa_avx512_core_bf16) return GPTOSS_ISA_AVX512;
    if ((isa & dnnl_cpu_isa_avx2) == dnnl_cpu_isa_avx2) return GPTOSS_ISA_AVX2;
    return GPTOSS_ISA_SCALAR;
}

GPTOSS_API int gptoss_detect_isa(void) {
    int cpu = cpu_path(), dnn = onednn_path();
    return cpu < dnn ? cpu : dnn;
}

GPTOSS_API int gptoss_cpu_isa(void) { return cpu_path(); }

GPTOSS_API int gptoss_get_isa(void) {
    if (selected_isa < 0) selected_isa = gptoss_detect_isa();
    return selected_isa;
}

GPTOSS_API int gptoss_set_isa(int isa) {
    if (isa < GPTOSS_ISA_SCALAR || isa > GPTOSS_ISA_AVX512) return GPTOSS_ERR_OUT_OF_RANGE;
    if (isa > gptoss_detect_isa()) return GPTOSS_ERR_UNSUPPORTED;
    selected_isa = isa;
    return GPTOSS_OK;
}

GPTOSS_API int gptoss_onednn_info(int *major, int *minor, int *patch, int *cpu_isa) {
    if (!major || !minor || !patch || !cpu_isa) return GPTOSS_ERR_NULL_POINTER;
    const dnnl_version_t *v = dnnl_version();
    *major = v->major;
    *minor = v->minor;
    *patch = v->patch;
    *cpu_isa = (int)dnnl_get_effective_cpu_isa();
    return GPTOSS_OK;
}
