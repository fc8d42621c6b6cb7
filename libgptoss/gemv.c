/*
 * Matmuls of a few rows of activations (m <= GEMV_MAX_ROWS: decode, and small expert groups in prefill):
 * bf16 and MXFP4 weights on the fp32 compute paths (CPUs without bf16 dot products, see runtime.c), and MXFP4
 * weights on the AVX-512 BF16 path too (mxfp4_rows_avx512: decode in registers, VDPBF16PS).
 *
 * Such a product is bound by reading W: every weight is used m times at most. So each weight is read once,
 * widened to fp32 in registers (bf16 -> fp32 is a 16-bit shift) and multiplied with FMA; nothing the size of
 * W is ever written. MXFP4 weights: on AVX2 decoded in registers too (see mxfp4_rows_avx2); on the scalar
 * path dequantized to bf16 a chunk of a few rows at a time into a buffer that stays in L1 (mxfp4.c's exact
 * table), then through the bf16 loop.
 *
 * Row blocking: R rows of W against all m rows of x at once, R * m accumulators: R = 4 for m <= 2, R = 2 for
 * m = 3, 4 and R = 1 up to m = 8 keep them in the 16 ymm registers and give the FMA units independent
 * chains. Up to m = 8 this beats widening W into fp32 tiles for oneDNN (the expert groups of a 64-token
 * prefill chunk average 8 tokens): [5760, 2880] MXFP4 at m = 8, one thread, 7.5 ms through tiles.
 * Per ISA: AVX-512 BF16 (MXFP4 only), AVX2 + FMA, and a plain C loop for the scalar path; the results differ
 * from each other and from oneDNN's only in fp32 summation order (and VDPBF16PS's own rounding of pairs).
 */
#include <immintrin.h>
#include <string.h>

#include "bf16.h"
#include "internal.h"

enum { BLOCK_VALUES = 32, BLOCK_BYTES = 16 };
/* MXFP4 values dequantized per row and step: 4 rows x 1024 bf16 = 8 KiB, well inside L1. */
enum { MXFP4_CHUNK_VALUES = 1024 };

/* ---------------------------------------------------------------- per-ISA dot products */

/* sums[t * R + r] += dot(x[t, 0:len], w_r[0:len]) for t < M, r < R; x rows are ldx apart. */
static inline __attribute__((always_inline)) void dot_rows_scalar(const float *x, size_t ldx, int M,
                                                                  const gptoss_bf16 *const *w, int R,
                                                                  size_t len, float *sums) {
    for (int t = 0; t < M; t++)
        for (int r = 0; r < R; r++) {
            float acc[8] = {0};
            const float *xt = x + (size_t)t * ldx;
            size_t i = 0;
            for (; i + 8 <= len; i += 8)
                for (int j = 0; j < 8; j++) acc[j] += xt[i + j] * bf16_to_f32(w[r][i + j]);
            for (; i < len; i++) acc[0] += xt[i] * bf16_to_f32(w[r][i]);
            sums[t * R + r] += ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        }
}

__attribute__((target("avx2,fma"))) static inline __m256 load_bf16x8(const gptoss_bf16 *p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

__attribute__((target("avx2,fma"))) static inline float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* As dot_rows_scalar, for rows of W `len` apart (whole rows): each row's stream prefetches the same columns of
 * the next group of R rows, as the MXFP4 kernels below do (GROUP AHEAD). */
__attribute__((target("avx2,fma"), always_inline)) static inline void dot_rows_avx2(
    const float *x, size_t ldx, const int M, const gptoss_bf16 *const *w, const int R, size_t len, float *sums) {
    __m256 acc[GEMV_MAX_ROWS][4];  /* only [M][R] used: at most 8 */
    for (int t = 0; t < M; t++)
        for (int r = 0; r < R; r++) acc[t][r] = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        __m256 wv[4];
        if (i % 32 == 0)
            for (int r = 0; r < R; r++) _mm_prefetch((const char *)(w[r] + i + (size_t)R * len), _MM_HINT_T0);
        for (int r = 0; r < R; r++) wv[r] = load_bf16x8(w[r] + i);
        for (int t = 0; t < M; t++) {
            __m256 xv = _mm256_loadu_ps(x + (size_t)t * ldx + i);
            for (int r = 0; r < R; r++) acc[t][r] = _mm256_fmadd_ps(wv[r], xv, acc[t][r]);
        }
    }
    for (int t = 0; t < M; t++)
        for (int r = 0; r < R; r++) {
            float s = hsum_avx2(acc[t][r]);
            for (size_t j = i; j < len; j++) s += x[(size_t)t * ldx + j] * bf16_to_f32(w[r][j]);
            sums[t * R + r] += s;
        }
}

/* One call per (M, R) pair with constants, so the loops above unroll into registers. */
__attribute__((target("avx2,fma"))) static void dot_rows_avx2_dispatch(const float *x, size_t ldx, int M,
                                                                       const gptoss_bf16 *const *w, int R,
                                                                       size_t len, float *sums) {
#define CASE(m, r) \
    if (M == m && R == r) { dot_rows_avx2(x, ldx, m, w, r, len, sums); return; }
    CASE(1, 1) CASE(1, 2) CASE(1, 3) CASE(1, 4) CASE(2, 1) CASE(2, 2) CASE(2, 3) CASE(2, 4)
    CASE(3, 1) CASE(3, 2) CASE(4, 1) CASE(4, 2) CASE(5, 1) CASE(6, 1) CASE(7, 1) CASE(8, 1)
#undef CASE
}

static void dot_rows(const float *x, size_t ldx, int M, const gptoss_bf16 *const *w, int R, size_t len,
                     float *sums) {
    if (gptoss_get_isa() >= GPTOSS_ISA_AVX2)
        dot_rows_avx2_dispatch(x, ldx, M, w, R, len, sums);
    else
        dot_rows_scalar(x, ldx, M, w, R, len, sums);
}

/* ---------------------------------------------------------------- MXFP4, fused (AVX2) */

/*
 * GROUP AHEAD: the MXFP4 register kernels read R rows at a time, and each row's stream prefetches, a line
 * every 4 blocks, the same columns of the next group of R rows (R x 1440 bytes ahead for k = 2880), i.e.
 * exactly what the next step reads (as q8.c's kernels do). The fixed 4 KiB used before is shorter than a
 * group of four 1440-byte rows, so most of its prefetches landed in rows the current group was already
 * reading: [5760, 2880] at M = 1 from DRAM, AVX-512 R = 4, Zen 5 VM with a compile on the other core,
 * 2 threads 0.370 -> 0.317-0.324 ms, 1 thread 0.701 -> 0.614 ms (a stand-alone copy of the loop).
 */

/*
 * MXFP4 rows straight from their blocks: FP4 code -> 2 x FP4 value (VPSHUFB on a constant table of the
 * values 0, 1, 2, 3, 4, 6, 8, 12 and their negatives, as fp16), widened to fp32, multiplied with x, and each block's
 * sum scaled once by 2^(scale - 128) (so 2 x value x 2^(scale - 128) = value x 2^(scale - 127)). The products
 * are exact in fp32 and a power-of-two scale commutes with rounding, so this sums the same exact terms as
 * dequantizing first; only the order differs. Scale 255 (NaN in E8M0) gives a NaN block sum, as in mxfp4.c.
 * The table lookup needs no per-block table (unlike the bf16 dequantizer), which is what makes it cheaper
 * than dequantize-then-multiply.
 */
static float mxfp4_block_scale[256]; /* 2^(s - 128); NaN for 255. Built once, read-only after. */

__attribute__((constructor)) static void init_block_scales(void) {
    for (int s = 0; s < 255; s++) {
        /* 2^(s - 128) >= 2^-128: fp32 subnormal below 2^-126, built from bits so no FTZ mode can touch it. */
        uint32_t bits = s >= 2 ? (uint32_t)(s - 1) << 23 : (uint32_t)1 << (21 + s);
        memcpy(&mxfp4_block_scale[s], &bits, sizeof bits);
    }
    uint32_t nan = 0x7fc00000u;
    memcpy(&mxfp4_block_scale[255], &nan, sizeof nan);
}

/*
 * The 32 values of one block as fp32 (times 2, see above) in the block's "deinterleaved" order: the low
 * nibbles of its 16 bytes (values 0, 2, ..., 30) then the high nibbles (1, 3, ..., 31). x comes in the same
 * order (gptoss_deinterleave_mxfp4_x), which saves interleaving the weights back into value order.
 *
 * 2 x an FP4 value (0, 1, 2, 3, 4, 6, 8, 12 and their negatives) is an fp16 whose low byte is zero, so one
 * VPSHUFB on a table of the high bytes, an unpack beside zero bytes and F16C's VCVTPH2PS give 8 exact fp32
 * values: a third fewer instructions than going through int8 -> int32 -> fp32 (with a trip through a stack
 * buffer), and the same values, so the results are bit for bit those of that version: [5760, 2880] at M = 1,
 * one thread, from DRAM, Zen 5 VM, a stand-alone copy of the loop: 1.045 -> 0.96 ms.
 */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void mxfp4_block_avx2(const uint8_t *q,
                                                                                          __m256 v[4]) {
    const __m128i fp16_high = _mm_setr_epi8(0x00, 0x3C, 0x40, 0x42, 0x44, 0x46, 0x48, 0x4A, (char)0x80, (char)0xBC,
                                            (char)0xC0, (char)0xC2, (char)0xC4, (char)0xC6, (char)0xC8, (char)0xCA);
    const __m128i nibble = _mm_set1_epi8(0x0f), zero = _mm_setzero_si128();
    __m128i bytes = _mm_loadu_si128((const __m128i *)q);
    __m128i low = _mm_shuffle_epi8(fp16_high, _mm_and_si128(bytes, nibble));
    __m128i high = _mm_shuffle_epi8(fp16_high, _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble));
    v[0] = _mm256_cvtph_ps(_mm_unpacklo_epi8(zero, low));
    v[1] = _mm256_cvtph_ps(_mm_unpackhi_epi8(zero, low));
    v[2] = _mm256_cvtph_ps(_mm_unpacklo_epi8(zero, high));
    v[3] = _mm256_cvtph_ps(_mm_unpackhi_epi8(zero, high));
}

/* sums[t * R + r] = dot(x[t, :k], W row r) for R rows starting at blocks / scales (rows blocks_per_row apart). */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void mxfp4_rows_avx2(
    const float *x, size_t k, const int M, const uint8_t *blocks, const uint8_t *scales, const int R,
    float *sums) {
    size_t blocks_per_row = k / BLOCK_VALUES, group_bytes = (size_t)R * blocks_per_row * BLOCK_BYTES;
    __m256 total[GEMV_MAX_ROWS][4];
    for (int t = 0; t < M; t++)
        for (int r = 0; r < R; r++) total[t][r] = _mm256_setzero_ps();
    for (size_t b = 0; b < blocks_per_row; b++) {
        const float *xb = x + b * BLOCK_VALUES;
        for (int r = 0; r < R; r++) {
            const uint8_t *q = blocks + ((size_t)r * blocks_per_row + b) * BLOCK_BYTES;
            if (b % 4 == 0) _mm_prefetch((const char *)q + group_bytes, _MM_HINT_T0); /* see GROUP AHEAD */
            __m256 v[4];
            mxfp4_block_avx2(q, v);
            __m256 scale = _mm256_broadcast_ss(&mxfp4_block_scale[scales[(size_t)r * blocks_per_row + b]]);
            for (int t = 0; t < M; t++) {
                const float *xt = xb + (size_t)t * k;
                __m256 lo = _mm256_mul_ps(v[0], _mm256_loadu_ps(xt));
                __m256 hi = _mm256_mul_ps(v[2], _mm256_loadu_ps(xt + 16));
                lo = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(xt + 8), lo);
                hi = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(xt + 24), hi);  /* x deinterleaved as v */
                total[t][r] = _mm256_fmadd_ps(_mm256_add_ps(lo, hi), scale, total[t][r]);
            }
        }
    }
    for (int t = 0; t < M; t++)
        for (int r = 0; r < R; r++) sums[t * R + r] = hsum_avx2(total[t][r]);
}

__attribute__((target("avx2,fma,f16c"))) static void mxfp4_rows_avx2_dispatch(const float *x, size_t k, int M,
                                                                         const uint8_t *blocks,
                                                                         const uint8_t *scales, int R,
                                                                         float *sums) {
#define CASE(m, r) \
    if (M == m && R == r) { mxfp4_rows_avx2(x, k, m, blocks, scales, r, sums); return; }
    CASE(1, 1) CASE(1, 2) CASE(1, 3) CASE(1, 4) CASE(2, 1) CASE(2, 2) CASE(2, 3) CASE(2, 4)
    CASE(3, 1) CASE(3, 2) CASE(4, 1) CASE(4, 2) CASE(5, 1) CASE(6, 1) CASE(7, 1) CASE(8, 1)
#undef CASE
}

/* ---------------------------------------------------------------- MXFP4, fused (AVX-512 BF16) */

/*
 * The bf16 path's decode: each block becomes its 32 exact bf16 values with one VPERMW on the block's row of
 * mxfp4.c's table (as dequant_avx512 does), and VDPBF16PS multiplies them with 32 bf16 values of x into 16
 * fp32 sums, with no bf16 copy of W written anywhere. This is the same instruction oneDNN's bf16 matmuls use.
 */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"), always_inline)) static inline __m512i
mxfp4_block_bf16_avx512(const uint8_t *q, uint8_t scale) {
    const __m512i nibbles = _mm512_set1_epi32(0x000f000f);
    __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
    __m512i idx = _mm512_ternarylogic_epi32(d, _mm512_slli_epi32(d, 12), nibbles, 0xa8); /* (a | b) & c */
    __m256i table = _mm256_load_si256((const __m256i *)gptoss_mxfp4_bf16_lut[scale]);
    return _mm512_permutexvar_epi16(idx, _mm512_zextsi256_si512(table));
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static inline float hsum_avx512(__m512 v) {
    return _mm512_reduce_add_ps(v);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"), always_inline)) static inline void
mxfp4_rows_avx512(const gptoss_bf16 *x, size_t k, size_t ldx, const int M, const uint8_t *blocks,
                  const uint8_t *scales, const int R, float *sums) {
    size_t blocks_per_row = k / BLOCK_VALUES, group_bytes = (size_t)R * blocks_per_row * BLOCK_BYTES;
    __m512 acc[GEMV_MAX_ROWS][4];
    for (int t = 0; t < M; t++)
        for (int r = 0; r < R; r++) acc[t][r] = _mm512_setzero_ps();
    for (size_t b = 0; b < blocks_per_row; b++) {
        __m512i w[4];
        for (int r = 0; r < R; r++) {
            const uint8_t *q = blocks + ((size_t)r * blocks_per_row + b) * BLOCK_BYTES;
            if (b % 4 == 0) _mm_prefetch((const char *)q + group_bytes, _MM_HINT_T0); /* see GROUP AHEAD */
            w[r] = mxfp4_block_bf16_avx512(q, scales[(size_t)r * blocks_per_row + b]);
        }
        for (int t = 0; t < M; t++) {
            __m512i xv = _mm512_loadu_si512(x + (size_t)t * ldx + b * BLOCK_VALUES);
            for (int r = 0; r < R; r++)
                acc[t][r] = _mm512_dpbf16_ps(acc[t][r], (__m512bh)xv, (__m512bh)w[r]);
        }
    }
    for (int t = 0; t < M; t++)
        for (int r = 0; r < R; r++) sums[t * R + r] = hsum_avx512(acc[t][r]);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void mxfp4_rows_avx512_dispatch(
    const gptoss_bf16 *x, size_t k, size_t ldx, int M, const uint8_t *blocks, const uint8_t *scales, int R,
    float *sums) {
#define CASE(m, r) \
    if (M == m && R == r) { mxfp4_rows_avx512(x, k, ldx, m, blocks, scales, r, sums); return; }
    CASE(1, 1) CASE(1, 2) CASE(1, 3) CASE(1, 4) CASE(2, 1) CASE(2, 2) CASE(2, 3) CASE(2, 4)
    CASE(3, 1) CASE(3, 2) CASE(3, 3) CASE(3, 4) CASE(4, 1) CASE(4, 2) CASE(4, 3) CASE(4, 4)
    CASE(5, 1) CASE(5, 2) CASE(6, 1) CASE(6, 2) CASE(7, 1) CASE(7, 2) CASE(8, 1) CASE(8, 2)
#undef CASE
}

int gptoss_gemv_mxfp4_deinterleaved(void) { return gptoss_get_isa() >= GPTOSS_ISA_AVX2; }

/* ---------------------------------------------------------------- row loops */

/* Rows of W per step: R x m accumulators stay within 8 of the 16 ymm registers. */
static int rows_per_step(size_t m) { return m <= 2 ? 4 : m <= 4 ? 2 : 1; }
/*
 * ... and within 16 of the 32 zmm registers on the AVX-512 MXFP4 kernel: R = 4 up to m = 4, 2 up to 8.
 * [5760, 2880] from DRAM, 2 threads, Zen 5 VM, three alternating runs: m = 4 0.45-0.46 -> 0.36-0.41 ms,
 * m = 5 0.76 -> 0.52-0.61, m = 8 1.12-1.20 -> 0.86-1.13 (against R = 2 / 1 / 1). Going past m = 8 does not
 * pay: with R = 1 at m = 9..16 the kernel re-reads x (m x 5.76 KB, beyond L1) for every row of W, 1.8-2.6 ms
 * at m = 9 and ~3 ms at m = 12 against the bf16 tiles' ~2.1-2.4.
 */
static int rows_per_step_avx512(size_t m) { return m <= 4 ? 4 : 2; }

static void store(const float *sums, int M, int R, size_t r0, const gptoss_bf16 *bias, void *y, size_t ldy,
                  int y_dtype) {
    for (int t = 0; t < M; t++)
        for (int r = 0; r < R; r++) {
            float v = sums[t * R + r] + (bias ? bf16_to_f32(bias[r0 + r]) : 0.0f);
            size_t at = (size_t)t * ldy + r0 + r;
            if (y_dtype == GPTOSS_DTYPE_F32)
                ((float *)y)[at] = v;
            else
                ((gptoss_bf16 *)y)[at] = f32_to_bf16(v);
        }
}

void gptoss_gemv_bf16_rows(const float *x, size_t m, size_t k, const gptoss_bf16 *w, const gptoss_bf16 *bias,
                           size_t r0, size_t r1, void *y, size_t ldy, int y_dtype) {
    int step = rows_per_step(m);
    for (size_t r = r0; r < r1; r += (size_t)step) {
        int R = r1 - r < (size_t)step ? (int)(r1 - r) : step;
        const gptoss_bf16 *rows[4];
        for (int j = 0; j < R; j++) rows[j] = w + (r + (size_t)j) * k;
        float sums[GEMV_MAX_ROWS * 4] = {0};
        dot_rows(x, k, (int)m, rows, R, k, sums);
        store(sums, (int)m, R, r, bias, y, ldy, y_dtype);
    }
}

void gptoss_gemv_mxfp4_rows(const float *x, size_t m, size_t k, const uint8_t *blocks, const uint8_t *scales,
                            const gptoss_bf16 *bias, size_t r0, size_t r1, gptoss_bf16 *y, size_t ldy) {
    _Alignas(64) gptoss_bf16 chunk[4][MXFP4_CHUNK_VALUES];
    size_t blocks_per_row = k / BLOCK_VALUES;
    int step = rows_per_step(m);
    if (gptoss_get_isa() >= GPTOSS_ISA_AVX2) {
        for (size_t r = r0; r < r1; r += (size_t)step) {
            int R = r1 - r < (size_t)step ? (int)(r1 - r) : step;
            float sums[GEMV_MAX_ROWS * 4];
            mxfp4_rows_avx2_dispatch(x, k, (int)m, blocks + r * blocks_per_row * BLOCK_BYTES,
                                     scales + r * blocks_per_row, R, sums);
            store(sums, (int)m, R, r, bias, y, ldy, GPTOSS_DTYPE_BF16);
        }
        return;
    }
    for (size_t r = r0; r < r1; r += (size_t)step) {
        int R = r1 - r < (size_t)step ? (int)(r1 - r) : step;
        float sums[GEMV_MAX_ROWS * 4] = {0};
        const gptoss_bf16 *rows[4] = {chunk[0], chunk[1], chunk[2], chunk[3]};
        for (size_t c0 = 0; c0 < k; c0 += MXFP4_CHUNK_VALUES) {
            size_t len = k - c0 < MXFP4_CHUNK_VALUES ? k - c0 : MXFP4_CHUNK_VALUES;
            for (int j = 0; j < R; j++) {
                size_t first = (r + (size_t)j) * blocks_per_row + c0 / BLOCK_VALUES;
                gptoss_dequantize_mxfp4_blocks(blocks + first * BLOCK_BYTES, scales + first, len / BLOCK_VALUES,
                                               chunk[j]);
            }
            dot_rows(x + c0, k, (int)m, rows, R, len, sums);
        }
        store(sums, (int)m, R, r, bias, y, ldy, GPTOSS_DTYPE_BF16);
    }
}

void gptoss_gemv_mxfp4_rows_bf16(const gptoss_bf16 *x, size_t m, size_t k, size_t ldx, const uint8_t *blocks,
                                 const uint8_t *scales, const gptoss_bf16 *bias, size_t r0, size_t r1,
                                 gptoss_bf16 *y, size_t ldy) {
    size_t blocks_per_row = k / BLOCK_VALUES;
    int step = rows_per_step_avx512(m);
    for (size_t r = r0; r < r1; r += (size_t)step) {
        int R = r1 - r < (size_t)step ? (int)(r1 - r) : step;
        float sums[GEMV_MAX_ROWS * 4];
        mxfp4_rows_avx512_dispatch(x, k, ldx, (int)m, blocks + r * blocks_per_row * BLOCK_BYTES,
                                   scales + r * blocks_per_row, R, sums);
        store(sums, (int)m, R, r, bias, y, ldy, GPTOSS_DTYPE_BF16);
    }
}
