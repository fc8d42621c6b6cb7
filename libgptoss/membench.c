/* Memory read bandwidth, measured the way a GEMV reads its weights: every thread streams its own slice. */
#include "gptoss.h"

#include <immintrin.h>
#include <omp.h>

#include "bf16.h"

__attribute__((target("avx2"))) static uint64_t sum_slice_avx2(const uint8_t *p, size_t n) {
    __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        acc0 = _mm256_xor_si256(acc0, _mm256_loadu_si256((const __m256i *)(p + i)));
        acc1 = _mm256_xor_si256(acc1, _mm256_loadu_si256((const __m256i *)(p + i + 32)));
    }
    acc0 = _mm256_xor_si256(acc0, acc1);
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, acc0);
    uint64_t s = lanes[0] ^ lanes[1] ^ lanes[2] ^ lanes[3];
    for (; i < n; i++) s ^= p[i];
    return s;
}

static uint64_t sum_slice_scalar(const uint8_t *p, size_t n) {
    uint64_t s = 0;
    for (size_t i = 0; i < n; i++) s ^= p[i];
    return s;
}

GPTOSS_API int gptoss_read_bandwidth(const void *buffer, size_t nbytes, int repeats, double *bytes_per_second) {
    if (!buffer || !bytes_per_second) return GPTOSS_ERR_NULL_POINTER;
    if (nbytes < 4096 || repeats <= 0) return GPTOSS_ERR_BAD_SIZE;
    const uint8_t *p = buffer;
    int use_avx2 = gptoss_get_isa() >= GPTOSS_ISA_AVX2;
    double best = 0.0;
    volatile uint64_t sink = 0; /* keeps the loads from being optimised away */
    for (int r = 0; r < repeats; r++) {
        uint64_t total = 0;
        double start = omp_get_wtime();
#pragma omp parallel num_threads(gptoss_get_num_threads()) reduction(^ : total)
        {
            int nt = omp_get_num_threads(), t = omp_get_thread_num();
            size_t chunk = (nbytes / (size_t)nt) & ~(size_t)63;
            size_t begin = chunk * (size_t)t;
            size_t len = t == nt - 1 ? nbytes - begin : chunk;
            total ^= use_avx2 ? sum_slice_avx2(p + begin, len) : sum_slice_scalar(p + begin, len);
        }
        double seconds = omp_get_wtime() - start;
        sink ^= total;
        if (seconds > 0 && (double)nbytes / seconds > best) best = (double)nbytes / seconds;
    }
    (void)sink;
    *bytes_per_second = best;
    return GPTOSS_OK;
}
