/*
 * C driver for q8.c and gptoss_matmul_q8, meant to run under ASan/UBSan (CTest): every buffer is allocated at
 * its exact size (so a read or write one element past it is reported), every compute path, every row-blocking
 * variant of the register kernel (m = 1..8, odd row counts) and the tiles (m > 8), and the refusals, which
 * must return before touching memory. Prints each failure and exits non-zero if there was any.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TEST_RNG_SEED 4242u
#include "check.h"

static gptoss_bf16 bf16_truncate(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return (gptoss_bf16)(bits >> 16);
}

static gptoss_bf16 random_bf16(float scale) {
    return bf16_truncate(scale * (((float)(next_random() % 65536) / 16384.0f) - 2.0f));
}

/* f rounded to bf16, nearest even (finite inputs). */
static float round_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static float f16_value(uint16_t h) {
    int e = (h >> 10) & 31, m = h & 1023;
    float v = e ? ldexpf((float)(m | 1024), e - 25) : ldexpf((float)m, -24);
    return (h & 0x8000) ? -v : v;
}

static void *exact_alloc(size_t bytes) {
    void *p = malloc(bytes);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

/* ------------------------------------------------------------------------------------------- quantize */

static void test_quantize(void) {
    enum { N = 3, K = 96 };
    gptoss_bf16 *w = exact_alloc(N * K * sizeof *w);
    int8_t *q = exact_alloc(N * K);
    uint16_t *s = exact_alloc(N * K / 32 * sizeof *s);
    for (int i = 0; i < N * K; i++) w[i] = random_bf16(1.0f);
    for (int i = 32; i < 64; i++) w[i] = 0; /* row 0, block 1: all zero */
    /* row 1, block 0: scale exactly 2^-4, with ties */
    for (int i = 0; i < 32; i++) w[K + i] = 0;
    w[K + 0] = bf16_truncate(127.0f / 16);
    w[K + 1] = bf16_truncate(2.5f / 16);
    w[K + 2] = bf16_truncate(-3.5f / 16);
    EXPECT_STATUS(gptoss_quantize_q8_rows(w, N, K, q, s), GPTOSS_OK);
    CHECK(s[1] == 0, "zero block: scale 0x%04x", s[1]);
    for (int i = 32; i < 64; i++) CHECK(q[i] == 0, "zero block: q[%d] = %d", i, q[i]);
    CHECK(s[3] == 0x2C00, "scale 2^-4: got 0x%04x", s[3]);
    CHECK(q[K] == 127 && q[K + 1] == 2 && q[K + 2] == -4, "ties: %d %d %d", q[K], q[K + 1], q[K + 2]);
    /* Every block: |q| <= 127, some |q| == 127 where the scale is nonzero, and q * scale within half a step. */
    for (int b = 0; b < N * K / 32; b++) {
        float sc = f16_value(s[b]);
        int top = 0;
        for (int j = 0; j < 32; j++) {
            int v = q[b * 32 + j];
            CHECK(v >= -127 && v <= 127, "q out of range %d", v);
            top = abs(v) > top ? abs(v) : top;
            float want = bf16_bits_to_f32(w[b * 32 + j]);
            CHECK(fabsf((float)v * sc - want) <= 0.5f * sc * 1.001f + 1e-30f, "block %d value %d: %g vs %g", b, j,
                  (float)v * sc, want);
        }
        CHECK(sc == 0.0f || top == 127, "block %d: largest |q| %d", b, top);
    }
    /* Refusals: inf, NaN, a scale beyond fp16; and bad arguments. */
    const uint16_t bad[] = {0x7f80, 0xff80, 0x7fc0, 0x4b18 /* 9961472: / 127 > 65520 */};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        gptoss_bf16 saved = w[2 * K + 50];
        w[2 * K + 50] = bad[i];
        EXPECT_STATUS(gptoss_quantize_q8_rows(w, N, K, q, s), GPTOSS_ERR_OUT_OF_RANGE);
        w[2 * K + 50] = saved;
    }
    EXPECT_STATUS(gptoss_quantize_q8_rows(NULL, N, K, q, s), GPTOSS_ERR_NULL_POINTER);
    EXPECT_STATUS(gptoss_quantize_q8_rows(w, N, K, NULL, s), GPTOSS_ERR_NULL_POINTER);
    EXPECT_STATUS(gptoss_quantize_q8_rows(w, N, K, q, NULL), GPTOSS_ERR_NULL_POINTER);
    EXPECT_STATUS(gptoss_quantize_q8_rows(w, 0, K, q, s), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_quantize_q8_rows(w, N, 40, q, s), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_quantize_q8_rows(w, SIZE_MAX / 2, 64, q, s), GPTOSS_ERR_BAD_SIZE);

    /* dequantize: rows 2, 0, 2 exactly; out of range and bad sizes refused without writing. */
    int64_t rows[3] = {2, 0, 2};
    gptoss_bf16 *out = exact_alloc(3 * K * sizeof *out);
    EXPECT_STATUS(gptoss_dequantize_q8_rows(q, s, N, K, rows, 3, out), GPTOSS_OK);
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < K; j++) {
            float want = (float)q[rows[i] * K + j] * f16_value(s[rows[i] * K / 32 + j / 32]);
            float got = bf16_bits_to_f32(out[i * K + j]);
            CHECK(fabsf(got - want) <= fabsf(want) * (1.0f / 256), "dequant row %d col %d: %g vs %g", i, j, got,
                  want);
        }
    for (int i = 0; i < 3 * K; i++) out[i] = 0x1234;
    int64_t bad_rows[2] = {0, N};
    EXPECT_STATUS(gptoss_dequantize_q8_rows(q, s, N, K, bad_rows, 2, out), GPTOSS_ERR_OUT_OF_RANGE);
    bad_rows[1] = -1;
    EXPECT_STATUS(gptoss_dequantize_q8_rows(q, s, N, K, bad_rows, 2, out), GPTOSS_ERR_OUT_OF_RANGE);
    EXPECT_STATUS(gptoss_dequantize_q8_rows(q, s, N, 48, rows, 1, out), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_dequantize_q8_rows(q, s, N, K, rows, 0, out), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_dequantize_q8_rows(q, NULL, N, K, rows, 1, out), GPTOSS_ERR_NULL_POINTER);
    for (int i = 0; i < 3 * K; i++) CHECK(out[i] == 0x1234, "refused dequantize wrote out[%d]", i);
    free(w);
    free(q);
    free(s);
    free(out);
}

/* ------------------------------------------------------------------------------------------- matmul */

/* y = x W^T + b for m rows of x (row stride ldx) against a random q8 W [n, k]; exact-size buffers. */
static void test_matmul(size_t m, size_t n, size_t k, size_t ldx, int with_bias, int y_dtype) {
    size_t ldy = n + 3;
    gptoss_bf16 *x = exact_alloc(((m - 1) * ldx + k) * sizeof *x);
    gptoss_bf16 *w = exact_alloc(n * k * sizeof *w);
    int8_t *q = exact_alloc(n * k);
    uint16_t *s = exact_alloc(n * k / 32 * sizeof *s);
    gptoss_bf16 *bias = with_bias ? exact_alloc(n * sizeof *bias) : NULL;
    size_t y_elem = y_dtype == GPTOSS_DTYPE_F32 ? 4 : 2, y_elems = (m - 1) * ldy + n;
    unsigned char *y = exact_alloc(y_elems * y_elem);
    memset(y, 0x5a, y_elems * y_elem);
    for (size_t i = 0; i < (m - 1) * ldx + k; i++) x[i] = random_bf16(1.0f);
    for (size_t i = 0; i < n * k; i++) w[i] = random_bf16(0.05f);
    for (size_t i = 0; i < n && bias; i++) bias[i] = random_bf16(1.0f);
    EXPECT_STATUS(gptoss_quantize_q8_rows(w, n, k, q, s), GPTOSS_OK);
    EXPECT_STATUS(gptoss_matmul_q8(x, m, k, ldx, q, s, n, bias, y, ldy, y_dtype), GPTOSS_OK);
    /* m > 8 on the AVX-512 path: oneDNN's bf16 tiles, the weights rounded to bf16 (matmul.c) */
    const int bf16_tiles = m > 8 && gptoss_get_isa() == GPTOSS_ISA_AVX512;
    for (size_t t = 0; t < m; t++) {
        for (size_t r = 0; r < n; r++) {
            double exact = bias ? bf16_bits_to_f32(bias[r]) : 0.0, mag = fabs(exact);
            for (size_t j = 0; j < k; j++) {
                float wf = (float)q[r * k + j] * f16_value(s[r * (k / 32) + j / 32]);
                double wv = bf16_tiles ? round_bf16(wf) : wf;
                double p = (double)bf16_bits_to_f32(x[t * ldx + j]) * wv;
                exact += p;
                mag += fabs(p);
            }
            double got, tol = 1.01 * (double)(k + 2) * ldexp(1.0, -24) * mag;
            if (y_dtype == GPTOSS_DTYPE_F32) {
                float f;
                memcpy(&f, y + (t * ldy + r) * 4, 4);
                got = f;
            } else {
                gptoss_bf16 h;
                memcpy(&h, y + (t * ldy + r) * 2, 2);
                got = bf16_bits_to_f32(h);
                tol += fabs(exact) * ldexp(1.0, -7) + 1e-30;
            }
            CHECK(fabs(got - exact) <= tol, "isa %d m %zu n %zu k %zu row %zu col %zu: %g vs %g", gptoss_get_isa(), m,
                  n, k, t, r, got, exact);
        }
        /* the padding between rows of y stays untouched */
        for (size_t c = n; c < ldy && t + 1 < m; c++)
            for (size_t b = 0; b < y_elem; b++)
                CHECK(y[(t * ldy + c) * y_elem + b] == 0x5a, "padding of y row %zu written", t);
    }
    free(x);
    free(w);
    free(q);
    free(s);
    free(bias);
    free(y);
}

static void test_matmul_bad_input(void) {
    enum { M = 2, N = 8, K = 64 };
    gptoss_bf16 x[M * K] = {0}, y[M * N];
    int8_t q[N * K] = {0};
    uint16_t s[N * K / 32] = {0};
    for (int i = 0; i < M * N; i++) y[i] = 0x1234;
    EXPECT_STATUS(gptoss_matmul_q8(NULL, M, K, K, q, s, N, NULL, y, N, GPTOSS_DTYPE_BF16), GPTOSS_ERR_NULL_POINTER);
    EXPECT_STATUS(gptoss_matmul_q8(x, M, K, K, NULL, s, N, NULL, y, N, GPTOSS_DTYPE_BF16), GPTOSS_ERR_NULL_POINTER);
    EXPECT_STATUS(gptoss_matmul_q8(x, M, K, K, q, NULL, N, NULL, y, N, GPTOSS_DTYPE_BF16), GPTOSS_ERR_NULL_POINTER);
    EXPECT_STATUS(gptoss_matmul_q8(x, M, K, K, q, s, N, NULL, NULL, N, GPTOSS_DTYPE_BF16), GPTOSS_ERR_NULL_POINTER);
    EXPECT_STATUS(gptoss_matmul_q8(x, M, K, K, q, s, N, NULL, y, N, 2), GPTOSS_ERR_OUT_OF_RANGE);
    EXPECT_STATUS(gptoss_matmul_q8(x, 0, K, K, q, s, N, NULL, y, N, GPTOSS_DTYPE_BF16), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_matmul_q8(x, M, 0, K, q, s, N, NULL, y, N, GPTOSS_DTYPE_BF16), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_matmul_q8(x, M, 48, K, q, s, N, NULL, y, N, GPTOSS_DTYPE_BF16), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_matmul_q8(x, M, K, K - 1, q, s, N, NULL, y, N, GPTOSS_DTYPE_BF16), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_matmul_q8(x, M, K, K, q, s, N, NULL, y, N - 1, GPTOSS_DTYPE_BF16), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_matmul_q8(x, M, K, K, q, s, 0, NULL, y, N, GPTOSS_DTYPE_BF16), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_matmul_q8(x, M, K, K, q, s, SIZE_MAX / 4, NULL, y, SIZE_MAX / 4, GPTOSS_DTYPE_BF16),
                  GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_matmul_q8(x, SIZE_MAX / 4, K, K, q, s, N, NULL, y, N, GPTOSS_DTYPE_BF16),
                  GPTOSS_ERR_BAD_SIZE);
    for (int i = 0; i < M * N; i++) CHECK(y[i] == 0x1234, "a rejected q8 matmul wrote y[%d]", i);
}

/* ------------------------------------------------------------------------------------------- attention block */

/* The block with q8 projections equals the kernels one by one (bit for bit), and refuses mixed weights. */
static void test_attention_block(size_t m) {
    enum { H = 64, NQ = 2, NKV = 1, HD = 32, QKV = (NQ + 2 * NKV) * HD, CAP = 16 };
    gptoss_bf16 *x = exact_alloc(m * H * 2), *x2 = exact_alloc(m * H * 2), norm[H], sinks[NQ], qkv_bias[QKV],
                out_bias[H];
    gptoss_bf16 *wqkv = exact_alloc(QKV * H * 2), *wout = exact_alloc(H * NQ * HD * 2);
    int8_t *qq = exact_alloc(QKV * H), *oq = exact_alloc(H * NQ * HD);
    uint16_t *qs = exact_alloc(QKV * H / 32 * 2), *os = exact_alloc(H * NQ * HD / 32 * 2);
    gptoss_bf16 *kc = exact_alloc(CAP * NKV * HD * 2), *vc = exact_alloc(CAP * NKV * HD * 2);
    gptoss_bf16 *kc2 = exact_alloc(CAP * NKV * HD * 2), *vc2 = exact_alloc(CAP * NKV * HD * 2);
    for (size_t i = 0; i < m * H; i++) x[i] = x2[i] = random_bf16(1.0f);
    for (int i = 0; i < H; i++) norm[i] = random_bf16(1.0f), out_bias[i] = random_bf16(0.1f);
    for (int i = 0; i < NQ; i++) sinks[i] = random_bf16(1.0f);
    for (int i = 0; i < QKV; i++) qkv_bias[i] = random_bf16(0.1f);
    for (int i = 0; i < QKV * H; i++) wqkv[i] = random_bf16(0.1f);
    for (int i = 0; i < H * NQ * HD; i++) wout[i] = random_bf16(0.1f);
    for (int i = 0; i < CAP * NKV * HD; i++) kc[i] = kc2[i] = random_bf16(1.0f), vc[i] = vc2[i] = random_bf16(1.0f);
    EXPECT_STATUS(gptoss_quantize_q8_rows(wqkv, QKV, H, qq, qs), GPTOSS_OK);
    EXPECT_STATUS(gptoss_quantize_q8_rows(wout, H, NQ * HD, oq, os), GPTOSS_OK);
    float inv_freq[HD / 2], concentration;
    EXPECT_STATUS(gptoss_rope_init(HD, 150000.0f, 32.0f, 1.0f, 32.0f, 4096, inv_freq, &concentration), GPTOSS_OK);
    const size_t first = 3, window = 0;
    const float scale = 1.0f / sqrtf((float)HD), eps = 1e-5f;
    size_t scratch_elems = gptoss_attention_block_scratch_elems(m, H, NQ, NKV, HD);
    gptoss_bf16 *scratch = exact_alloc(scratch_elems * 2);
    struct gptoss_attention_weights w = {.norm = norm, .qkv_bias = qkv_bias, .sinks = sinks, .out_bias = out_bias,
                                         .qkv_q8 = qq, .qkv_scales = qs, .out_q8 = oq, .out_scales = os};
    EXPECT_STATUS(gptoss_attention_block(x, m, H, NQ, NKV, HD, &w, eps, inv_freq, concentration, scale, kc, vc, CAP,
                                         first, window, scratch, scratch_elems),
                  GPTOSS_OK);
    /* one by one */
    gptoss_bf16 *t = exact_alloc(m * H * 2), *qkv = exact_alloc(m * QKV * 2), *attn = exact_alloc(m * NQ * HD * 2),
                *proj = exact_alloc(m * H * 2);
    int64_t *pos = exact_alloc(m * sizeof *pos);
    for (size_t i = 0; i < m; i++) pos[i] = (int64_t)(first + i);
    EXPECT_STATUS(gptoss_rmsnorm(x2, norm, m, H, eps, t), GPTOSS_OK);
    EXPECT_STATUS(gptoss_matmul_q8(t, m, H, H, qq, qs, QKV, qkv_bias, qkv, QKV, GPTOSS_DTYPE_BF16), GPTOSS_OK);
    EXPECT_STATUS(gptoss_rope_apply(qkv, m, NQ, HD, QKV, pos, inv_freq, concentration), GPTOSS_OK);
    EXPECT_STATUS(gptoss_rope_apply(qkv + NQ * HD, m, NKV, HD, QKV, pos, inv_freq, concentration), GPTOSS_OK);
    EXPECT_STATUS(gptoss_kv_store(qkv + NQ * HD, qkv + (NQ + NKV) * HD, m, QKV, NKV, HD, kc2, vc2, CAP, first),
                  GPTOSS_OK);
    EXPECT_STATUS(gptoss_attention(qkv, m, QKV, NQ, NKV, HD, kc2, vc2, CAP, first, window, sinks, scale, attn),
                  GPTOSS_OK);
    EXPECT_STATUS(gptoss_matmul_q8(attn, m, NQ * HD, NQ * HD, oq, os, H, out_bias, proj, H, GPTOSS_DTYPE_BF16),
                  GPTOSS_OK);
    EXPECT_STATUS(gptoss_add_bf16(x2, proj, m * H), GPTOSS_OK);
    CHECK(memcmp(x, x2, m * H * 2) == 0, "isa %d m %zu: block differs from the kernel sequence", gptoss_get_isa(), m);
    CHECK(memcmp(kc, kc2, CAP * NKV * HD * 2) == 0 && memcmp(vc, vc2, CAP * NKV * HD * 2) == 0,
          "isa %d m %zu: caches differ", gptoss_get_isa(), m);

    /* refusals: a bf16 weight beside its q8 one, q8 without scales, no out projection at all */
    struct gptoss_attention_weights bad = w;
    bad.qkv_weight = wqkv;
    EXPECT_STATUS(gptoss_attention_block(x, m, H, NQ, NKV, HD, &bad, eps, inv_freq, concentration, scale, kc, vc,
                                         CAP, first, window, scratch, scratch_elems),
                  GPTOSS_ERR_OUT_OF_RANGE);
    bad = w;
    bad.out_weight = wout;
    EXPECT_STATUS(gptoss_attention_block(x, m, H, NQ, NKV, HD, &bad, eps, inv_freq, concentration, scale, kc, vc,
                                         CAP, first, window, scratch, scratch_elems),
                  GPTOSS_ERR_OUT_OF_RANGE);
    bad = w;
    bad.qkv_scales = NULL;
    EXPECT_STATUS(gptoss_attention_block(x, m, H, NQ, NKV, HD, &bad, eps, inv_freq, concentration, scale, kc, vc,
                                         CAP, first, window, scratch, scratch_elems),
                  GPTOSS_ERR_NULL_POINTER);
    bad = w;
    bad.out_q8 = NULL;
    EXPECT_STATUS(gptoss_attention_block(x, m, H, NQ, NKV, HD, &bad, eps, inv_freq, concentration, scale, kc, vc,
                                         CAP, first, window, scratch, scratch_elems),
                  GPTOSS_ERR_NULL_POINTER);
    CHECK(memcmp(x, x2, m * H * 2) == 0, "a refused block wrote x");
    gptoss_bf16 *to_free[] = {x, x2, wqkv, wout, kc, vc, kc2, vc2, scratch, t, qkv, attn, proj};
    for (size_t i = 0; i < sizeof to_free / sizeof to_free[0]; i++) free(to_free[i]);
    free(qq);
    free(oq);
    free(qs);
    free(os);
    free(pos);
}

int main(void) {
    int best = gptoss_detect_isa();
    for (int isa = GPTOSS_ISA_SCALAR; isa <= best; isa++) {
        EXPECT_STATUS(gptoss_set_isa(isa), GPTOSS_OK);
        test_quantize();
        for (size_t m = 1; m <= 10; m++) {
            test_matmul(m, 7, 96, 96, m % 2, m % 3 ? GPTOSS_DTYPE_BF16 : GPTOSS_DTYPE_F32);
            test_matmul(m, 13, 32, 45, 1, GPTOSS_DTYPE_F32);
        }
        test_matmul(1, 1, 32, 32, 0, GPTOSS_DTYPE_BF16);
        test_matmul(1, 600, 320, 320, 1, GPTOSS_DTYPE_F32); /* two threads' row split */
        test_matmul(12, 301, 320, 333, 1, GPTOSS_DTYPE_BF16);
        test_matmul_bad_input();
        test_attention_block(1);
        test_attention_block(5);
        test_attention_block(11);
    }
    EXPECT_STATUS(gptoss_set_isa(best), GPTOSS_OK);
    gptoss_matmul_cache_clear();
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("test_q8: all checks passed (ISAs up to %d)\n", best);
    return 0;
}
