/*
 * The opt-in 8-bit dense layout ("q8", the GGUF Q8_0 idea): a weight W [n, k] (k % 32 == 0) is int8 values
 * q [n, k] and one IEEE binary16 scale per 32 consecutive values of a row, scales [n, k / 32];
 * value = q * scale. It halves the bytes a decode step reads for the dense weights.
 *
 * This file: the quantizer (deterministic rule, see gptoss.h), row dequantization to bf16 (embedding
 * lookups), and the register kernels of gptoss_matmul_q8 for m <= GEMV_MAX_ROWS (its dispatch lives in
 * matmul.c, which owns the fp32 x buffer, the thread split and the fp32 tiles of larger m). They are here
 * rather than in gemv.c because they share this file's fp16 helpers and nothing with gemv.c's bf16/MXFP4
 * loops except the row-blocking idea.
 *
 * Exactness: q (8 bits) times an fp16 scale (11 significant bits, or fewer for subnormal scales) has at most
 * 19 significant bits, so q * scale is exact in fp32. The register kernels therefore multiply the same exact
 * dequantized fp32 weights with x (bf16 widened to fp32) and the paths differ only in fp32 summation order;
 * so do the fp32 tiles of larger m on the fp32 paths. The AVX-512 path's tiles for larger m are bf16
 * (gptoss_widen_q8_rows_bf16; why in matmul.c).
 */
#include "gptoss.h"

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <string.h>

#include "bf16.h"
#include "internal.h"

enum { Q8_BLOCK = 32 };
/*
 * Software prefetch in the register kernels: each row's stream fetches, a line at a time, the same columns
 * of the next group of R rows (R * k bytes ahead), i.e. exactly what the next step reads. A fixed 4 KiB ahead
 * (gemv.c's MXFP4 distance) mostly landed in rows the current group was already reading: 100000 x 2880 q8
 * from DRAM, one thread, Zen 5 VM under load ~5: AVX-512 21.0 -> 26.6-27.1 GB/s, AVX2 16.2 -> 22.4; two
 * groups ahead measured 18.1.
 */

/* ---------------------------------------------------------------- fp16 <-> fp32 (software, every path) */

float gptoss_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, bits;
    if (e == 0x1f) {
        bits = sign | 0x7f800000u | (m << 13);
    } else if (e) {
        bits = sign | ((e + 112u) << 23) | (m << 13);
    } else {
        float v = (float)m * 0x1p-24f; /* subnormal (or zero): exact */
        return sign ? -v : v;
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Round to nearest even; overflow (|f| >= 65520) gives +-inf, NaN a quiet NaN. */
uint16_t gptoss_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00u;
    if (ax >= 0x477ff000u) return sign | 0x7c00u; /* 65520 = 65504 + half an ulp: rounds to inf */
    if (ax >= 0x38800000u) {                      /* >= 2^-14: normal */
        uint32_t r = ax - 0x38000000u;            /* exponent rebiased from 127 to 15 */
        r += 0xfffu + ((r >> 13) & 1u);
        return (uint16_t)(sign | (r >> 13));
    }
    uint32_t e = ax >> 23;
    if (e == 0) return sign; /* zero or an fp32 subnormal: far below half the smallest fp16 subnormal */
    uint32_t mant = (ax & 0x7fffffu) | 0x800000u, shift = 126u - e; /* value = mant * 2^-24 >> shift units */
    if (shift >= 32) return sign;
    uint32_t q = mant >> shift, rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) q++;
    return (uint16_t)(sign | q);
}

/* ---------------------------------------------------------------- quantize / dequantize */

/* One block of 32 bf16 values; GPTOSS_ERR_OUT_OF_RANGE for non-finite input or a scale beyond fp16. */
static int quantize_block(const gptoss_bf16 *w, int8_t *q, uint16_t *scale) {
    float amax = 0.0f;
    for (int j = 0; j < Q8_BLOCK; j++) {
        if ((w[j] & 0x7f80u) == 0x7f80u) return GPTOSS_ERR_OUT_OF_RANGE; /* inf or NaN */
        float a = fabsf(bf16_to_f32(w[j]));
        amax = a > amax ? a : amax;
    }
    uint16_t h = gptoss_f32_to_f16(amax / 127.0f);
    if ((h & 0x7c00u) == 0x7c00u) return GPTOSS_ERR_OUT_OF_RANGE;
    float s = gptoss_f16_to_f32(h);
    *scale = h;
    for (int j = 0; j < Q8_BLOCK; j++) {
        float v = s == 0.0f ? 0.0f : rintf(bf16_to_f32(w[j]) / s); /* rint: nearest, ties to even */
        v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
        q[j] = (int8_t)v;
    }
    return GPTOSS_OK;
}

/* n * k and n * k / 32 elements addressable (k % 32 == 0 checked by the caller). */
static int q8_sizes_ok(size_t n, size_t k) {
    size_t elems;
    return !__builtin_mul_overflow(n, k, &elems) && elems <= (size_t)PTRDIFF_MAX / sizeof(float);
}

GPTOSS_API int gptoss_quantize_q8_rows(const gptoss_bf16 *w, size_t n, size_t k, int8_t *q, uint16_t *scales) {
    if (!w || !q || !scales) return GPTOSS_ERR_NULL_POINTER;
    if (n == 0 || k == 0 || k % Q8_BLOCK || !q8_sizes_ok(n, k)) return GPTOSS_ERR_BAD_SIZE;
    const size_t bpr = k / Q8_BLOCK;
    int threads = gptoss_sync_threads();
    int failed = GPTOSS_OK;
    #pragma omp parallel for num_threads(threads) schedule(static) if (n * k >= ((size_t)1 << 20))
    for (size_t r = 0; r < n; r++) {
        for (size_t b = 0; b < bpr; b++) {
            size_t at = r * k + b * Q8_BLOCK;
            int st = quantize_block(w + at, q + at, scales + r * bpr + b);
            if (st) {
                #pragma omp atomic write
                failed = st;
                break;
            }
        }
    }
    return failed;
}

GPTOSS_API int gptoss_dequantize_q8_rows(const int8_t *q, const uint16_t *scales, size_t n_rows, size_t k,
                                         const int64_t *rows, size_t m, gptoss_bf16 *out) {
    if (!q || !scales || !rows || !out) return GPTOSS_ERR_NULL_POINTER;
    if (n_rows == 0 || k == 0 || k % Q8_BLOCK || m == 0 || !q8_sizes_ok(n_rows, k) || !q8_sizes_ok(m, k))
        return GPTOSS_ERR_BAD_SIZE;
    for (size_t i = 0; i < m; i++)
        if (rows[i] < 0 || (uint64_t)rows[i] >= n_rows) return GPTOSS_ERR_OUT_OF_RANGE;
    const size_t bpr = k / Q8_BLOCK;
    for (size_t i = 0; i < m; i++) {
        size_t r = (size_t)rows[i];
        const int8_t *src = q + r * k;
        gptoss_bf16 *dst = out + i * k;
        for (size_t b = 0; b < bpr; b++) {
            float s = gptoss_f16_to_f32(scales[r * bpr + b]);
            for (size_t j = 0; j < Q8_BLOCK; j++)
                dst[b * Q8_BLOCK + j] = f32_to_bf16((float)src[b * Q8_BLOCK + j] * s);
        }
    }
    return GPTOSS_OK;
}

void gptoss_widen_q8_rows(const int8_t *q, const uint16_t *scales, size_t k, size_t r0, size_t r1, float *out) {
    const size_t bpr = k / Q8_BLOCK, n_blocks = (r1 - r0) * bpr;
    const int8_t *src = q + r0 * k;
    const uint16_t *sc = scales + r0 * bpr;
    for (size_t b = 0; b < n_blocks; b++) {
        float s = gptoss_f16_to_f32(sc[b]);
        for (size_t j = 0; j < Q8_BLOCK; j++) out[b * Q8_BLOCK + j] = (float)src[b * Q8_BLOCK + j] * s;
    }
}

/* The same rows rounded to bf16 (nearest even) for the AVX-512 path's bf16 tiles: VCVTNEPS2BF16 rounds to
 * nearest even like f32_to_bf16, and q * scale is never an fp32 subnormal (|q * scale| >= 2^-24 or 0), which
 * that instruction would flush. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,f16c"))) void gptoss_widen_q8_rows_bf16(
    const int8_t *q, const uint16_t *scales, size_t k, size_t r0, size_t r1, gptoss_bf16 *out) {
    const size_t bpr = k / Q8_BLOCK, n_blocks = (r1 - r0) * bpr;
    const int8_t *src = q + r0 * k;
    const uint16_t *sc = scales + r0 * bpr;
    for (size_t b = 0; b < n_blocks; b++) {
        __m512 s = _mm512_set1_ps(_cvtsh_ss(sc[b]));
        __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(src + b * 32)))), s);
        __m512 hi = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(src + b * 32 + 16)))), s);
        _mm512_storeu_si512(out + b * 32, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
}

/* ---------------------------------------------------------------- register kernels (m <= 8) */

/*
 * sums[t * R + r] = dot(x[t, :k], q8 row r) for R rows starting at q / scales (rows k values apart), x fp32
 * [M, k] contiguous. Each block's 32 int8 values are widened to fp32 and multiplied by the block's scale
 * (exact, see the top), then FMA'd with x; every weight is read once and used for all M rows of x.
 */
static inline __attribute__((always_inline)) void q8_rows_scalar(const float *x, size_t k, int M,
                                                                 const int8_t *q, const uint16_t *scales,
                                                                 int R, float *sums) {
    const size_t bpr = k / Q8_BLOCK;
    for (int r = 0; r < R; r++)
        for (int t = 0; t < M; t++) {
            float acc[8] = {0};
            const float *xt = x + (size_t)t * k;
            const int8_t *qr = q + (size_t)r * k;
            for (size_t b = 0; b < bpr; b++) {
                float s = gptoss_f16_to_f32(scales[(size_t)r * bpr + b]);
                for (size_t i = b * Q8_BLOCK; i < (b + 1) * Q8_BLOCK; i += 8)
                    for (int j = 0; j < 8; j++) acc[j] += xt[i + j] * ((float)qr[i + j] * s);
            }
            sums[t * R + r] = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        }
}

__attribute__((target("avx2,fma,f16c"))) static inline float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Two accumulators per (row of x, row of W) when few pairs: the two halves of a block then feed independent
 * FMA chains. */
#define Q8_ACCS(M, R) ((M) * (R) <= 4 ? 2 : 1)

__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void q8_rows_avx2(
    const float *x, size_t k, const int M, const int8_t *q, const uint16_t *scales, const int R, float *sums) {
    const size_t bpr = k / Q8_BLOCK;
    const int A = Q8_ACCS(M, R);
    __m256 acc[GEMV_MAX_ROWS][4][2];
    for (int t = 0; t < M; t++)
        for (int r = 0; r < R; r++)
            for (int a = 0; a < A; a++) acc[t][r][a] = _mm256_setzero_ps();
    for (size_t b0 = 0; b0 < bpr; b0 += 8) {
        /* The scales of the next 8 blocks of each row, widened at once (VCVTPH2PS) and broadcast from memory
         * per block: cheaper than a scalar conversion per block. */
        const size_t nb = bpr - b0 < 8 ? bpr - b0 : 8;
        _Alignas(32) float sc[4][8];
        for (int r = 0; r < R; r++) {
            const uint16_t *sr = scales + (size_t)r * bpr + b0;
            if (nb == 8)
                _mm256_store_ps(sc[r], _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)sr)));
            else
                for (size_t j = 0; j < nb; j++) sc[r][j] = _cvtsh_ss(sr[j]);
        }
        for (size_t b = b0; b < b0 + nb; b++) {
            for (int r = 0; r < R; r++) {
                const int8_t *qb = q + (size_t)r * k + b * Q8_BLOCK;
                if (b % 2 == 0) _mm_prefetch((const char *)qb + (size_t)R * k, _MM_HINT_T0);
                __m256 s = _mm256_broadcast_ss(&sc[r][b - b0]);
                for (int j = 0; j < 4; j++) {
                    /* VPMOVSXBD from memory: 8 int8 -> 8 int32, then exact fp32 and exact q * scale. */
                    __m256 w = _mm256_mul_ps(
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qb + 8 * j)))), s);
                    for (int t = 0; t < M; t++)
                        acc[t][r][j % A] = _mm256_fmadd_ps(
                            w, _mm256_loadu_ps(x + (size_t)t * k + b * Q8_BLOCK + 8 * j), acc[t][r][j % A]);
                }
            }
        }
    }
    for (int t = 0; t < M; t++)
        for (int r = 0; r < R; r++)
            sums[t * R + r] = hsum_avx2(A == 2 ? _mm256_add_ps(acc[t][r][0], acc[t][r][1]) : acc[t][r][0]);
}

__attribute__((target("avx2,fma,f16c"))) static void q8_rows_avx2_dispatch(const float *x, size_t k, int M,
                                                                         const int8_t *q, const uint16_t *scales,
                                                                         int R, float *sums) {
#define CASE(m, r) \
    if (M == m && R == r) { q8_rows_avx2(x, k, m, q, scales, r, sums); return; }
    CASE(1, 1) CASE(1, 2) CASE(1, 3) CASE(1, 4) CASE(2, 1) CASE(2, 2) CASE(2, 3) CASE(2, 4)
    CASE(3, 1) CASE(3, 2) CASE(4, 1) CASE(4, 2) CASE(5, 1) CASE(6, 1) CASE(7, 1) CASE(8, 1)
#undef CASE
}

/* AVX-512: the same in zmm, 16 values per register, two accumulators per pair (32 registers leave room). */
__attribute__((target("avx512f,avx512bw,avx512vl,f16c,fma"), always_inline)) static inline void q8_rows_avx512(
    const float *x, size_t k, const int M, const int8_t *q, const uint16_t *scales, const int R, float *sums) {
    const size_t bpr = k / Q8_BLOCK;
    __m512 acc[GEMV_MAX_ROWS][4][2];
    for (int t = 0; t < M; t++)
        for (int r = 0; r < R; r++) acc[t][r][0] = acc[t][r][1] = _mm512_setzero_ps();
    for (size_t b0 = 0; b0 < bpr; b0 += 16) {
        /* 16 blocks' scales per row widened at once, then broadcast from memory (as the AVX2 kernel). */
        const size_t nb = bpr - b0 < 16 ? bpr - b0 : 16;
        _Alignas(64) float sc[4][16];
        for (int r = 0; r < R; r++) {
            const uint16_t *sr = scales + (size_t)r * bpr + b0;
            if (nb == 16)
                _mm512_store_ps(sc[r], _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)sr)));
            else
                for (size_t j = 0; j < nb; j++) sc[r][j] = _cvtsh_ss(sr[j]);
        }
        for (size_t b = b0; b < b0 + nb; b++) {
            for (int r = 0; r < R; r++) {
                const int8_t *qb = q + (size_t)r * k + b * Q8_BLOCK;
                if (b % 2 == 0) _mm_prefetch((const char *)qb + (size_t)R * k, _MM_HINT_T0);
                __m512 s = _mm512_set1_ps(sc[r][b - b0]);
                for (int j = 0; j < 2; j++) {
                    __m512 w = _mm512_mul_ps(
                        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qb + 16 * j)))), s);
                    for (int t = 0; t < M; t++)
                        acc[t][r][j] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + (size_t)t * k + b * Q8_BLOCK + 16 * j),
                                                       acc[t][r][j]);
                }
            }
        }
    }
    for (int t = 0; t < M; t++)
        for (int r = 0; r < R; r++) sums[t * R + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][r][0], acc[t][r][1]));
}

__attribute__((target("avx512f,avx512bw,avx512vl,f16c,fma"))) static void q8_rows_avx512_dispatch(
    const float *x, size_t k, int M, const int8_t *q, const uint16_t *scales, int R, float *sums) {
#define CASE(m, r) \
    if (M == m && R == r) { q8_rows_avx512(x, k, m, q, scales, r, sums); return; }
    CASE(1, 1) CASE(1, 2) CASE(1, 3) CASE(1, 4) CASE(2, 1) CASE(2, 2) CASE(2, 3) CASE(2, 4)
    CASE(3, 1) CASE(3, 2) CASE(4, 1) CASE(4, 2) CASE(5, 1) CASE(6, 1) CASE(7, 1) CASE(8, 1)
#undef CASE
}

static void q8_rows_scalar_dispatch(const float *x, size_t k, int M, const int8_t *q, const uint16_t *scales,
                                    int R, float *sums) {
    q8_rows_scalar(x, k, M, q, scales, R, sums);
}

/* Rows of W per step: R x m accumulator pairs stay within the register file (as gemv.c). */
static int rows_per_step(size_t m) { return m <= 2 ? 4 : m <= 4 ? 2 : 1; }

void gptoss_gemv_q8_rows(const float *x, size_t m, size_t k, const int8_t *q, const uint16_t *scales,
                         const gptoss_bf16 *bias, size_t r0, size_t r1, void *y, size_t ldy, int y_dtype) {
    const size_t bpr = k / Q8_BLOCK;
    const int isa = gptoss_get_isa();
    void (*rows_fn)(const float *, size_t, int, const int8_t *, const uint16_t *, int, float *) =
        isa >= GPTOSS_ISA_AVX512 ? q8_rows_avx512_dispatch
        : isa >= GPTOSS_ISA_AVX2 ? q8_rows_avx2_dispatch
                                 : q8_rows_scalar_dispatch;
    const int step = rows_per_step(m);
    for (size_t r = r0; r < r1; r += (size_t)step) {
        int R = r1 - r < (size_t)step ? (int)(r1 - r) : step;
        float sums[GEMV_MAX_ROWS * 4];
        rows_fn(x, k, (int)m, q + r * k, scales + r * bpr, R, sums);
        for (size_t t = 0; t < m; t++)
            for (int j = 0; j < R; j++) {
                float v = sums[t * (size_t)R + (size_t)j] + (bias ? bf16_to_f32(bias[r + (size_t)j]) : 0.0f);
                size_t at = t * ldy + r + (size_t)j;
                if (y_dtype == GPTOSS_DTYPE_F32)
                    ((float *)y)[at] = v;
                else
                    ((gptoss_bf16 *)y)[at] = f32_to_bf16(v);
            }
    }
}
