/*
 * C driver for mxfp4.c and matmul.c, meant to run under ASan/UBSan (CTest): every path on small inputs,
 * including the bad-input checks, which must refuse without touching memory. Prints each failure and exits
 * non-zero if there was any.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TEST_RNG_SEED 12345u
#include "check.h"

static float bf16_value(gptoss_bf16 h) { return bf16_bits_to_f32(h); }

static gptoss_bf16 bf16_truncate(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return (gptoss_bf16)(bits >> 16);
}

/* Random bf16 in about [-2, 2), never NaN/inf. */
static gptoss_bf16 random_bf16(void) {
    return bf16_truncate(((float)(next_random() % 65536) / 16384.0f) - 2.0f);
}

/* ------------------------------------------------------------------------------------------- dequant */

/* Reference dequantization: the SPEC formula with ldexpf (exact), truncated to bf16 (exact values). */
static gptoss_bf16 reference_value(uint8_t code, uint8_t scale) {
    static const float fp4[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                  -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
    if (scale == 255) return 0x7fc0;
    return bf16_truncate(ldexpf(fp4[code], (int)scale - 127));
}

static void reference_rows(const uint8_t *blocks, const uint8_t *scales, size_t blocks_per_row, size_t row_begin,
                           size_t row_end, gptoss_bf16 *out) {
    for (size_t b = row_begin * blocks_per_row; b < row_end * blocks_per_row; b++) {
        for (int j = 0; j < 16; j++) {
            uint8_t byte = blocks[b * 16 + j];
            *out++ = reference_value(byte & 15, scales[b]);
            *out++ = reference_value(byte >> 4, scales[b]);
        }
    }
}

static void test_dequant_isa(int isa) {
    EXPECT_STATUS(gptoss_set_isa(isa), GPTOSS_OK);

    /* Exhaustive: row s has scale s and codes 0..15 then 15..0 (each code in both nibble positions). */
    uint8_t blocks[256 * 16], scales[256];
    for (int s = 0; s < 256; s++) {
        scales[s] = (uint8_t)s;
        for (int j = 0; j < 16; j++) {
            int lo = 2 * j < 16 ? 2 * j : 31 - 2 * j, hi = 2 * j + 1 < 16 ? 2 * j + 1 : 30 - 2 * j;
            blocks[s * 16 + j] = (uint8_t)(lo | (hi << 4));
        }
    }
    gptoss_bf16 got[256 * 32], want[256 * 32];
    EXPECT_STATUS(gptoss_dequantize_mxfp4_rows(blocks, scales, 256, 1, 0, 256, got), GPTOSS_OK);
    reference_rows(blocks, scales, 1, 0, 256, want);
    for (int i = 0; i < 256 * 32; i++)
        CHECK(got[i] == want[i], "isa %d scale %d value %d: got 0x%04x want 0x%04x", isa, i / 32, i % 32, got[i],
              want[i]);
    CHECK(got[0 * 32 + 1] == 0x0020, "isa %d: 0.5 * 2^-127 must be the bf16 subnormal 0x0020", isa);
    CHECK(got[254 * 32 + 7] == 0x7f80, "isa %d: 6 * 2^127 must overflow to +inf", isa);

    /* Random rows 3..17 of 37 with 3 blocks per row; guard values after the output stay untouched. */
    enum { ROWS = 37, BPR = 3 };
    uint8_t rb[ROWS * BPR * 16], rs[ROWS * BPR];
    for (size_t i = 0; i < sizeof rb; i++) rb[i] = (uint8_t)next_random();
    for (size_t i = 0; i < sizeof rs; i++) rs[i] = (uint8_t)next_random();
    gptoss_bf16 out[14 * BPR * 32 + 8], ref[14 * BPR * 32];
    for (int i = 0; i < 8; i++) out[14 * BPR * 32 + i] = 0xabcd;
    EXPECT_STATUS(gptoss_dequantize_mxfp4_rows(rb, rs, ROWS, BPR, 3, 17, out), GPTOSS_OK);
    reference_rows(rb, rs, BPR, 3, 17, ref);
    CHECK(memcmp(out, ref, sizeof ref) == 0, "isa %d: rows 3..17 of random data differ", isa);
    for (int i = 0; i < 8; i++) CHECK(out[14 * BPR * 32 + i] == 0xabcd, "isa %d: wrote past row 17", isa);
}

static void test_dequant_parallel(void) {
    /* >= 256 KiB of output takes the OpenMP path; compare 1 and 2 threads with the reference. */
    enum { ROWS = 61, BPR = 90 };
    uint8_t *b = malloc(ROWS * BPR * 16), *s = malloc(ROWS * BPR);
    size_t out_bytes = sizeof(gptoss_bf16) * ROWS * BPR * 32;
    gptoss_bf16 *out = malloc(out_bytes), *ref = malloc(out_bytes);
    for (size_t i = 0; i < (size_t)ROWS * BPR * 16; i++) b[i] = (uint8_t)next_random();
    for (size_t i = 0; i < (size_t)ROWS * BPR; i++) s[i] = (uint8_t)(100 + next_random() % 60);
    reference_rows(b, s, BPR, 1, ROWS, ref);
    for (int threads = 1; threads <= 2; threads++) {
        gptoss_set_num_threads(threads);
        memset(out, 0, out_bytes);
        EXPECT_STATUS(gptoss_dequantize_mxfp4_rows(b, s, ROWS, BPR, 1, ROWS, out), GPTOSS_OK);
        CHECK(memcmp(out, ref, sizeof(gptoss_bf16) * (ROWS - 1) * BPR * 32) == 0, "%d threads differ", threads);
    }
    gptoss_set_num_threads(0);
    free(b), free(s), free(out), free(ref);
}

static void test_dequant_bad_input(void) {
    uint8_t b[4 * 2 * 16] = {0}, s[4 * 2] = {0};
    gptoss_bf16 out[4 * 64];
    for (int i = 0; i < 4 * 64; i++) out[i] = 0x1234;
    EXPECT_STATUS(gptoss_dequantize_mxfp4_rows(NULL, s, 4, 2, 0, 4, out), GPTOSS_ERR_NULL_POINTER);
    EXPECT_STATUS(gptoss_dequantize_mxfp4_rows(b, NULL, 4, 2, 0, 4, out), GPTOSS_ERR_NULL_POINTER);
    EXPECT_STATUS(gptoss_dequantize_mxfp4_rows(b, s, 4, 2, 0, 4, NULL), GPTOSS_ERR_NULL_POINTER);
    EXPECT_STATUS(gptoss_dequantize_mxfp4_rows(b, s, 0, 2, 0, 0, out), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_dequantize_mxfp4_rows(b, s, 4, 0, 0, 4, out), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_dequantize_mxfp4_rows(b, s, SIZE_MAX / 16, 32, 0, 1, out), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_dequantize_mxfp4_rows(b, s, 4, 2, 0, 5, out), GPTOSS_ERR_OUT_OF_RANGE);
    EXPECT_STATUS(gptoss_dequantize_mxfp4_rows(b, s, 4, 2, 3, 2, out), GPTOSS_ERR_OUT_OF_RANGE);
    EXPECT_STATUS(gptoss_dequantize_mxfp4_rows(b, s, 4, 2, SIZE_MAX, SIZE_MAX, out), GPTOSS_ERR_OUT_OF_RANGE);
    EXPECT_STATUS(gptoss_dequantize_mxfp4_rows(b, s, 4, 2, 4, 4, out), GPTOSS_OK); /* empty range */
    for (int i = 0; i < 4 * 64; i++) CHECK(out[i] == 0x1234, "a rejected or empty call wrote out[%d]", i);
}

/* -------------------------------------------------------------------------------------------- matmul */

/*
 * |got - exact| for y = x W^T + b: fp32 summation of k + 1 terms, <= 1.01 (k + 1) 2^-24 sum |x w| (+ |b|),
 * plus for bf16 output one bf16 ulp (both the kernel and the exactly rounded reference are within half an
 * ulp). See tests/test_matmul.py for the derivation.
 */
static int close_enough(double got, double exact, double magnitude, size_t k, int bf16_out) {
    double tol = 1.01 * (double)(k + 1) * ldexp(1.0, -24) * magnitude;
    if (bf16_out) {
        double big = fabs(got) > fabs(exact) ? fabs(got) : fabs(exact);
        int e;
        frexp(big > 0x1p-126 ? big : 0x1p-126, &e); /* big = f * 2^e, f in [0.5, 1) */
        tol += ldexp(1.0, e - 8);                   /* bf16 spacing: 8 significant bits */
    }
    return fabs(got - exact) <= tol;
}

/* Checks y (bf16 or f32, row stride ldy) against x[m, k] (row stride ldx) times w[n, k] plus bias. */
static void check_matmul(const char *what, const gptoss_bf16 *x, size_t m, size_t k, size_t ldx, const gptoss_bf16 *w,
                         size_t n, const gptoss_bf16 *bias, const void *y, size_t ldy, int y_dtype) {
    int bad = 0;
    for (size_t i = 0; i < m && bad < 5; i++) {
        for (size_t j = 0; j < n && bad < 5; j++) {
            double exact = bias ? bf16_value(bias[j]) : 0.0, magnitude = fabs(exact);
            for (size_t p = 0; p < k; p++) {
                double prod = (double)bf16_value(x[i * ldx + p]) * bf16_value(w[j * k + p]);
                exact += prod;
                magnitude += fabs(prod);
            }
            double got = y_dtype == GPTOSS_DTYPE_F32 ? ((const float *)y)[i * ldy + j]
                                                     : bf16_value(((const gptoss_bf16 *)y)[i * ldy + j]);
            if (!close_enough(got, exact, magnitude, k, y_dtype == GPTOSS_DTYPE_BF16)) {
                bad++;
                CHECK(0, "%s: y[%zu, %zu] = %g, expected %g", what, i, j, got, exact);
            }
        }
    }
}

/* m rows of x: on the fp32 paths m <= 8 runs gemv.c's register kernels, more runs fp32 oneDNN tiles. */
static void test_matmul_bf16(int m) {
    enum { MAX_M = 12, K = 96, N = 37, LDX = 101, LDY = 40 };
    gptoss_bf16 x[MAX_M * LDX], w[N * K], bias[N];
    for (int i = 0; i < MAX_M * LDX; i++) x[i] = random_bf16();
    for (int i = 0; i < N * K; i++) w[i] = random_bf16();
    for (int i = 0; i < N; i++) bias[i] = random_bf16();

    gptoss_matmul_cache_clear();
    for (int threads = 1; threads <= 2; threads++) {
        gptoss_set_num_threads(threads);
        float yf[MAX_M * LDY];
        gptoss_bf16 yb[MAX_M * LDY];
        for (int i = 0; i < MAX_M * LDY; i++) yf[i] = -1234.5f, yb[i] = 0x7f7f;
        EXPECT_STATUS(gptoss_matmul_bf16(x, m, K, LDX, w, N, bias, yf, LDY, GPTOSS_DTYPE_F32), GPTOSS_OK);
        check_matmul("f32 out, bias, strided", x, m, K, LDX, w, N, bias, yf, LDY, GPTOSS_DTYPE_F32);
        EXPECT_STATUS(gptoss_matmul_bf16(x, m, K, LDX, w, N, NULL, yb, LDY, GPTOSS_DTYPE_BF16), GPTOSS_OK);
        check_matmul("bf16 out, no bias, strided", x, m, K, LDX, w, N, NULL, yb, LDY, GPTOSS_DTYPE_BF16);
        for (int i = 0; i < MAX_M; i++)
            for (int j = i < m ? N : 0; j < LDY; j++) {
                CHECK(yf[i * LDY + j] == -1234.5f, "f32 matmul wrote outside y at [%d, %d]", i, j);
                CHECK(yb[i * LDY + j] == 0x7f7f, "bf16 matmul wrote outside y at [%d, %d]", i, j);
            }
    }
    gptoss_set_num_threads(0);
    size_t cached = gptoss_matmul_cache_size();
    if (gptoss_get_isa() == GPTOSS_ISA_AVX512)
        CHECK(cached == 4, "4 shapes x threads were used, cache holds %zu", cached);
    else if (m <= 8)
        CHECK(cached == 0, "the fp32 path's register kernel needs no oneDNN primitive, cache holds %zu", cached);
    float yf[MAX_M * LDY];
    EXPECT_STATUS(gptoss_matmul_bf16(x, m, K, LDX, w, N, bias, yf, LDY, GPTOSS_DTYPE_F32), GPTOSS_OK);
    CHECK(gptoss_matmul_cache_size() == cached, "a repeated shape must reuse its primitive");
}

static void test_matmul_bf16_bad_input(void) {
    gptoss_bf16 x[2 * 64] = {0}, w[8 * 64] = {0};
    gptoss_bf16 y[2 * 8];
    for (int i = 0; i < 16; i++) y[i] = 0x1234;
    const int BF = GPTOSS_DTYPE_BF16;
    EXPECT_STATUS(gptoss_matmul_bf16(NULL, 2, 64, 64, w, 8, NULL, y, 8, BF), GPTOSS_ERR_NULL_POINTER);
    EXPECT_STATUS(gptoss_matmul_bf16(x, 2, 64, 64, NULL, 8, NULL, y, 8, BF), GPTOSS_ERR_NULL_POINTER);
    EXPECT_STATUS(gptoss_matmul_bf16(x, 2, 64, 64, w, 8, NULL, NULL, 8, BF), GPTOSS_ERR_NULL_POINTER);
    EXPECT_STATUS(gptoss_matmul_bf16(x, 0, 64, 64, w, 8, NULL, y, 8, BF), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_matmul_bf16(x, 2, 0, 64, w, 8, NULL, y, 8, BF), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_matmul_bf16(x, 2, 64, 64, w, 0, NULL, y, 8, BF), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_matmul_bf16(x, 2, 64, 63, w, 8, NULL, y, 8, BF), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_matmul_bf16(x, 2, 64, 64, w, 8, NULL, y, 7, BF), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_matmul_bf16(x, SIZE_MAX / 4, 64, 64, w, 8, NULL, y, 8, BF), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_matmul_bf16(x, 2, SIZE_MAX / 2 + 1, SIZE_MAX / 2 + 1, w, 8, NULL, y, 8, BF),
                  GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_matmul_bf16(x, 2, 64, 64, w, SIZE_MAX / 8, NULL, y, SIZE_MAX / 8, BF), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_matmul_bf16(x, 2, 64, 64, w, 8, NULL, y, 8, 2), GPTOSS_ERR_OUT_OF_RANGE);
    for (int i = 0; i < 16; i++) CHECK(y[i] == 0x1234, "a rejected matmul wrote y[%d]", i);
}

static void test_matmul_mxfp4(int M) {
    enum { MAX_M = 11, K = 128, N = 100, LDY = 107, BPR = K / 32 };
    static uint8_t blocks[N * BPR * 16], scales[N * BPR];
    static gptoss_bf16 x[MAX_M * K], w[N * K], bias[N], scratch[3 * 64 * K], y[MAX_M * LDY];
    for (size_t i = 0; i < sizeof blocks; i++) blocks[i] = (uint8_t)next_random();
    for (size_t i = 0; i < sizeof scales; i++) scales[i] = (uint8_t)(123 + next_random() % 6);
    for (int i = 0; i < M * K; i++) x[i] = random_bf16();
    for (int i = 0; i < N; i++) bias[i] = random_bf16();
    EXPECT_STATUS(gptoss_dequantize_mxfp4_rows(blocks, scales, N, BPR, 0, N, w), GPTOSS_OK);

    /* (tile_rows, scratch_elems): default tile, one tile of scratch (serial), three (parallel), odd tiles. */
    const size_t cases[][2] = {{0, 3 * 64 * K}, {0, K}, {7, 7 * K}, {7, 3 * 7 * K}, {64, 3 * 64 * K}, {1, 2 * K},
                               {1000, N * K}};
    for (int threads = 1; threads <= 2; threads++) {
        gptoss_set_num_threads(threads);
        for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
            for (int with_bias = 0; with_bias <= 1; with_bias++) {
                for (int i = 0; i < M * LDY; i++) y[i] = 0x7f7f;
                EXPECT_STATUS(gptoss_matmul_mxfp4(x, M, K, blocks, scales, N, with_bias ? bias : NULL, y, LDY, scratch,
                                                  cases[c][1], cases[c][0]),
                              GPTOSS_OK);
                char what[96];
                snprintf(what, sizeof what, "mxfp4 m %d tile %zu scratch %zu threads %d bias %d", M, cases[c][0],
                         cases[c][1], threads, with_bias);
                check_matmul(what, x, M, K, K, w, N, with_bias ? bias : NULL, y, LDY, GPTOSS_DTYPE_BF16);
                for (int i = 0; i < M; i++)
                    for (int j = N; j < LDY; j++) CHECK(y[i * LDY + j] == 0x7f7f, "%s: wrote padding", what);
            }
        }
    }
    gptoss_set_num_threads(0);
}

static void test_matmul_mxfp4_bad_input(void) {
    enum { M = 2, K = 64, N = 8 };
    uint8_t blocks[N * 2 * 16] = {0}, scales[N * 2] = {0};
    gptoss_bf16 x[M * K] = {0}, scratch[4 * K], y[M * N];
    for (int i = 0; i < M * N; i++) y[i] = 0x1234;
    EXPECT_STATUS(gptoss_matmul_mxfp4(NULL, M, K, blocks, scales, N, NULL, y, N, scratch, 4 * K, 4),
                  GPTOSS_ERR_NULL_POINTER);
    EXPECT_STATUS(gptoss_matmul_mxfp4(x, M, K, NULL, scales, N, NULL, y, N, scratch, 4 * K, 4),
                  GPTOSS_ERR_NULL_POINTER);
    EXPECT_STATUS(gptoss_matmul_mxfp4(x, M, K, blocks, NULL, N, NULL, y, N, scratch, 4 * K, 4),
                  GPTOSS_ERR_NULL_POINTER);
    EXPECT_STATUS(gptoss_matmul_mxfp4(x, M, K, blocks, scales, N, NULL, NULL, N, scratch, 4 * K, 4),
                  GPTOSS_ERR_NULL_POINTER);
    EXPECT_STATUS(gptoss_matmul_mxfp4(x, M, K, blocks, scales, N, NULL, y, N, NULL, 4 * K, 4),
                  GPTOSS_ERR_NULL_POINTER);
    EXPECT_STATUS(gptoss_matmul_mxfp4(x, 0, K, blocks, scales, N, NULL, y, N, scratch, 4 * K, 4), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_matmul_mxfp4(x, M, 0, blocks, scales, N, NULL, y, N, scratch, 4 * K, 4), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_matmul_mxfp4(x, M, 48, blocks, scales, N, NULL, y, N, scratch, 4 * K, 4), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_matmul_mxfp4(x, M, K, blocks, scales, 0, NULL, y, N, scratch, 4 * K, 4), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_matmul_mxfp4(x, M, K, blocks, scales, N, NULL, y, N - 1, scratch, 4 * K, 4),
                  GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_matmul_mxfp4(x, M, K, blocks, scales, N, NULL, y, N, scratch, 4 * K - 1, 4),
                  GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_matmul_mxfp4(x, M, K, blocks, scales, N, NULL, y, N, scratch, K - 1, 0), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_matmul_mxfp4(x, SIZE_MAX / 64, K, blocks, scales, N, NULL, y, N, scratch, 4 * K, 4),
                  GPTOSS_ERR_BAD_SIZE);
    const size_t huge_n = SIZE_MAX / 64;
    EXPECT_STATUS(gptoss_matmul_mxfp4(x, M, K, blocks, scales, huge_n, NULL, y, huge_n, scratch, 4 * K, 4),
                  GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_matmul_mxfp4(x, M, (SIZE_MAX / 64) * 32, blocks, scales, N, NULL, y, N, scratch, 4 * K, 4),
                  GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_matmul_mxfp4(x, M, K, blocks, scales, N, NULL, y, N, scratch, SIZE_MAX, 4),
                  GPTOSS_ERR_BAD_SIZE);
    for (int i = 0; i < M * N; i++) CHECK(y[i] == 0x1234, "a rejected mxfp4 matmul wrote y[%d]", i);
}

int main(void) {
    int best = gptoss_detect_isa();
    for (int isa = GPTOSS_ISA_SCALAR; isa <= best; isa++) test_dequant_isa(isa);
    EXPECT_STATUS(gptoss_set_isa(best), GPTOSS_OK);
    test_dequant_parallel();
    test_dequant_bad_input();
    /* Every compute path: bf16 oneDNN (AVX-512 BF16); fp32 register kernels (m <= 8) and fp32 tiles. */
    for (int isa = GPTOSS_ISA_SCALAR; isa <= best; isa++) {
        EXPECT_STATUS(gptoss_set_isa(isa), GPTOSS_OK);
        const int ms[] = {1, 2, 3, 4, 5, 8, 9, 12};
        for (size_t i = 0; i < sizeof ms / sizeof ms[0]; i++) test_matmul_bf16(ms[i]);
        test_matmul_bf16_bad_input();
        for (int m = 1; m <= 11; m += 2) test_matmul_mxfp4(m);
        test_matmul_mxfp4_bad_input();
    }
    EXPECT_STATUS(gptoss_set_isa(best), GPTOSS_OK);
    gptoss_matmul_cache_clear();
    CHECK(gptoss_matmul_cache_size() == 0, "cache not empty after clear");
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("test_mxfp4_matmul: all checks passed (ISAs up to %d)\n", best);
    return 0;
}
