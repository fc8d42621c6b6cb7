/* Run-time settings shared by every kernel: thread count and the ISA the kernels dispatch to. */
#include "gptoss.h"

#include <omp.h>

#include "bf16.h"

/* Documented global state (see gptoss.h): the selected ISA, -1 until first asked. */
static int selected_isa = -1;

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
    omp_set_num_threads(n);
    return GPTOSS_OK;
}

GPTOSS_API int gptoss_get_num_threads(void) { return omp_get_max_threads(); }

GPTOSS_API int gptoss_detect_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16"))
        return GPTOSS_ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return GPTOSS_ISA_AVX2;
    return GPTOSS_ISA_SCALAR;
}

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
