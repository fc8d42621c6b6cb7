/*
 * C driver for blocks.c under ASan/UBSan (CTest): each block against the sequence of public kernels it stands
 * for (bit-identical, on every compute path this CPU has), with every buffer malloc'd at exactly the size the
 * block asks for, so ASan sees any overrun of the scratch it carves; then the bad-input checks, which must
 * refuse and leave x and the accumulator untouched.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TEST_RNG_SEED 77u
#include "check.h"

enum { HIDDEN = 64, NQ = 4, NKV = 2, HD = 32, QKV = (NQ + 2 * NKV) * HD, INTER = 64, EXPERTS = 8, TOPK = 4 };

static gptoss_bf16 random_bf16(void) {
    float f = (float)(next_random() % 65536) / 32768.0f - 1.0f;
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return (gptoss_bf16)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

static gptoss_bf16 *random_bf16_array(size_t n) {
    gptoss_bf16 *x = malloc(n * sizeof *x);
    for (size_t i = 0; i < n; i++) x[i] = random_bf16();
    return x;
}

static gptoss_bf16 *copy_bf16(const gptoss_bf16 *x, size_t n) {
    gptoss_bf16 *y = malloc(n * sizeof *y);
    memcpy(y, x, n * sizeof *y);
    return y;
}

/* MXFP4 bytes: random codes, scales near 127 (values of order 1). */
static uint8_t *random_mxfp4(size_t rows, size_t k, uint8_t **scales) {
    uint8_t *blocks = malloc(rows * k / 2);
    for (size_t i = 0; i < rows * k / 2; i++) blocks[i] = (uint8_t)next_random();
    *scales = malloc(rows * k / 32);
    for (size_t i = 0; i < rows * k / 32; i++) (*scales)[i] = (uint8_t)(122 + next_random() % 6);
    return blocks;
}

/* ------------------------------------------------------------------------------- attention block */

static void test_attention_block(int isa, size_t m, size_t first_position, size_t window) {
    const size_t capacity = window ? window + 63 : first_position + m;
    gptoss_bf16 *norm = random_bf16_array(HIDDEN), *qkv_w = random_bf16_array((size_t)QKV * HIDDEN),
                *qkv_b = random_bf16_array(QKV), *sinks = random_bf16_array(NQ),
                *out_w = random_bf16_array((size_t)HIDDEN * NQ * HD), *out_b = random_bf16_array(HIDDEN);
    gptoss_bf16 *x = random_bf16_array(m * HIDDEN), *kc = random_bf16_array(capacity * NKV * HD),
                *vc = random_bf16_array(capacity * NKV * HD);
    gptoss_bf16 *x2 = copy_bf16(x, m * HIDDEN), *kc2 = copy_bf16(kc, capacity * NKV * HD),
                *vc2 = copy_bf16(vc, capacity * NKV * HD);
    float inv_freq[HD / 2], concentration;
    EXPECT_STATUS(gptoss_rope_init(HD, 150000.0f, 32.0f, 1.0f, 32.0f, 4096, inv_freq, &concentration), GPTOSS_OK);
    const float eps = 1e-5f, scale = 1.0f / sqrtf((float)HD);

    /* the block, with exactly the scratch it asks for */
    const size_t need = gptoss_attention_block_scratch_elems(m, HIDDEN, NQ, NKV, HD);
    gptoss_bf16 *scratch = malloc(need * sizeof *scratch);
    struct gptoss_attention_weights w = {.norm = norm, .qkv_weight = qkv_w, .qkv_bias = qkv_b, .sinks = sinks,
                                         .out_weight = out_w, .out_bias = out_b};
    EXPECT_STATUS(gptoss_attention_block(x, m, HIDDEN, NQ, NKV, HD, &w, eps, inv_freq, concentration, scale, kc, vc,
                                         capacity, first_position, window, scratch, need),
                  GPTOSS_OK);

    /* the same by single kernels */
    gptoss_bf16 *t = malloc(m * HIDDEN * 2), *qkv = malloc(m * QKV * 2), *attn = malloc(m * NQ * HD * 2),
                *proj = malloc(m * HIDDEN * 2);
    int64_t *positions = malloc(m * sizeof *positions);
    for (size_t i = 0; i < m; i++) positions[i] = (int64_t)(first_position + i);
    EXPECT_STATUS(gptoss_rmsnorm(x2, norm, m, HIDDEN, eps, t), GPTOSS_OK);
    EXPECT_STATUS(gptoss_matmul_bf16(t, m, HIDDEN, HIDDEN, qkv_w, QKV, qkv_b, qkv, QKV, GPTOSS_DTYPE_BF16), GPTOSS_OK);
    EXPECT_STATUS(gptoss_rope_apply(qkv, m, NQ, HD, QKV, positions, inv_freq, concentration), GPTOSS_OK);
    EXPECT_STATUS(gptoss_rope_apply(qkv + NQ * HD, m, NKV, HD, QKV, positions, inv_freq, concentration), GPTOSS_OK);
    EXPECT_STATUS(gptoss_kv_store(qkv + NQ * HD, qkv + (NQ + NKV) * HD, m, QKV, NKV, HD, kc2, vc2, capacity,
                                  first_position),
                  GPTOSS_OK);
    EXPECT_STATUS(gptoss_attention(qkv, m, QKV, NQ, NKV, HD, kc2, vc2, capacity, first_position, window, sinks,
                                   scale, attn),
                  GPTOSS_OK);
    EXPECT_STATUS(gptoss_matmul_bf16(attn, m, NQ * HD, NQ * HD, out_w, HIDDEN, out_b, proj, HIDDEN,
                                     GPTOSS_DTYPE_BF16),
                  GPTOSS_OK);
    EXPECT_STATUS(gptoss_add_bf16(x2, proj, m * HIDDEN), GPTOSS_OK);
    CHECK(memcmp(x, x2, m * HIDDEN * 2) == 0, "isa %d m %zu: attention block differs from the kernel sequence", isa,
          m);
    CHECK(memcmp(kc, kc2, capacity * NKV * HD * 2) == 0 && memcmp(vc, vc2, capacity * NKV * HD * 2) == 0,
          "isa %d m %zu: caches differ", isa, m);

    /* bad input: refused, x untouched */
    memcpy(x2, x, m * HIDDEN * 2);
    EXPECT_STATUS(gptoss_attention_block(x, m, HIDDEN, NQ, NKV, HD, &w, eps, inv_freq, concentration, scale, kc, vc,
                                         capacity, first_position, window, scratch, need - 1),
                  GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_attention_block(x, m, HIDDEN, NQ, NKV, HD, NULL, eps, inv_freq, concentration, scale, kc,
                                         vc, capacity, first_position, window, scratch, need),
                  GPTOSS_ERR_NULL_POINTER);
    struct gptoss_attention_weights no_q = w;
    no_q.qkv_weight = NULL; /* then q/k/v_weight are required */
    EXPECT_STATUS(gptoss_attention_block(x, m, HIDDEN, NQ, NKV, HD, &no_q, eps, inv_freq, concentration, scale, kc,
                                         vc, capacity, first_position, window, scratch, need),
                  GPTOSS_ERR_NULL_POINTER);
    EXPECT_STATUS(gptoss_attention_block(x, m, HIDDEN, NQ, NKV, HD, &w, eps, inv_freq, concentration, scale, kc, vc,
                                         capacity, SIZE_MAX - 1, window, scratch, need),
                  GPTOSS_ERR_OUT_OF_RANGE);
    CHECK(gptoss_attention_block_scratch_elems(SIZE_MAX / 4, HIDDEN, NQ, NKV, HD) == 0, "overflow not caught");
    CHECK(memcmp(x, x2, m * HIDDEN * 2) == 0, "a refused call changed x");

    free(norm), free(qkv_w), free(qkv_b), free(sinks), free(out_w), free(out_b), free(x), free(kc), free(vc);
    free(x2), free(kc2), free(vc2), free(scratch), free(t), free(qkv), free(attn), free(proj), free(positions);
}

/* ------------------------------------------------------------------------------- router + expert */

static void test_route_and_expert(int isa, size_t m) {
    gptoss_bf16 *x = random_bf16_array(m * HIDDEN), *norm = random_bf16_array(HIDDEN),
                *gate_w = random_bf16_array((size_t)EXPERTS * HIDDEN), *gate_b = random_bf16_array(EXPERTS);
    gptoss_bf16 *t = malloc(m * HIDDEN * 2), *logits = malloc(m * EXPERTS * 2);
    int32_t *indices = malloc(m * TOPK * sizeof *indices);
    float *weights = malloc(m * TOPK * sizeof *weights);
    EXPECT_STATUS(gptoss_moe_route(x, m, HIDDEN, norm, 1e-5f, gate_w, gate_b, EXPERTS, TOPK, t, logits, indices,
                                   weights),
                  GPTOSS_OK);
    for (size_t i = 0; i < m * TOPK; i++) {
        CHECK(indices[i] >= 0 && indices[i] < EXPERTS, "index %d", indices[i]);
        uint32_t bits;
        memcpy(&bits, &weights[i], sizeof bits);
        CHECK((bits & 0xffffu) == 0, "routing weight %g is not a bf16 value", weights[i]);
    }
    EXPECT_STATUS(gptoss_moe_route(x, m, HIDDEN, norm, 1e-5f, gate_w, gate_b, EXPERTS, EXPERTS + 1, t, logits,
                                   indices, weights),
                  GPTOSS_ERR_BAD_SIZE);

    uint8_t *s1, *s2, *b1 = random_mxfp4(2 * INTER, HIDDEN, &s1), *b2 = random_mxfp4(HIDDEN, INTER, &s2);
    gptoss_bf16 *bias1 = random_bf16_array(2 * INTER), *bias2 = random_bf16_array(HIDDEN);
    const size_t tile_elems = (size_t)4 * HIDDEN * INTER; /* room for the whole of either matrix */
    gptoss_bf16 *tile = malloc(tile_elems * 2);
    const size_t need = gptoss_expert_mlp_scratch_elems(m, HIDDEN, INTER);
    gptoss_bf16 *scratch = malloc(need * 2);
    float *acc = calloc(m * HIDDEN, sizeof *acc), *acc2 = calloc(m * HIDDEN, sizeof *acc2);
    const int32_t expert = indices[0]; /* token 0's first pick: routed at least once */
    EXPECT_STATUS(gptoss_expert_mlp(t, m, HIDDEN, INTER, indices, weights, TOPK, expert, b1, s1, bias1, b2, s2, bias2,
                                    7.0f, 1.702f, acc, scratch, need, tile, tile_elems),
                  GPTOSS_OK);

    /* by single kernels: gather, mlp1, SwiGLU, mlp2, scatter-add */
    int32_t *rows = malloc(m * sizeof *rows);
    float *row_w = malloc(m * sizeof *row_w);
    size_t n = 0;
    for (size_t i = 0; i < m * TOPK; i++)
        if (indices[i] == expert) rows[n] = (int32_t)(i / TOPK), row_w[n++] = weights[i];
    gptoss_bf16 *xe = malloc(n * HIDDEN * 2), *h = malloc(n * 2 * INTER * 2), *a = malloc(n * INTER * 2),
                *y = malloc(n * HIDDEN * 2);
    for (size_t i = 0; i < n; i++) memcpy(xe + i * HIDDEN, t + (size_t)rows[i] * HIDDEN, HIDDEN * 2);
    EXPECT_STATUS(gptoss_matmul_mxfp4(xe, n, HIDDEN, b1, s1, 2 * INTER, bias1, h, 2 * INTER, tile, tile_elems, 0),
                  GPTOSS_OK);
    EXPECT_STATUS(gptoss_swiglu(h, n, INTER, 7.0f, 1.702f, a), GPTOSS_OK);
    EXPECT_STATUS(gptoss_matmul_mxfp4(a, n, INTER, b2, s2, HIDDEN, bias2, y, HIDDEN, tile, tile_elems, 0), GPTOSS_OK);
    EXPECT_STATUS(gptoss_scatter_add_weighted(acc2, m, HIDDEN, y, n, rows, row_w), GPTOSS_OK);
    CHECK(memcmp(acc, acc2, m * HIDDEN * sizeof *acc) == 0, "isa %d m %zu: expert MLP differs from the kernels", isa,
          m);

    /* bad input: refused, acc untouched */
    EXPECT_STATUS(gptoss_expert_mlp(t, m, HIDDEN, INTER, indices, weights, TOPK, expert, b1, s1, bias1, b2, s2, bias2,
                                    7.0f, 1.702f, acc, scratch, need - 1, tile, tile_elems),
                  GPTOSS_ERR_BAD_SIZE);
    int32_t *twice = malloc(m * TOPK * sizeof *twice);
    for (size_t i = 0; i < m * TOPK; i++) twice[i] = 0; /* every token lists expert 0 k times */
    EXPECT_STATUS(gptoss_expert_mlp(t, m, HIDDEN, INTER, twice, weights, TOPK, 0, b1, s1, bias1, b2, s2, bias2, 7.0f,
                                    1.702f, acc, scratch, need, tile, tile_elems),
                  GPTOSS_ERR_OUT_OF_RANGE);
    EXPECT_STATUS(gptoss_expert_mlp(t, m, HIDDEN, INTER, indices, weights, TOPK, expert, NULL, s1, bias1, b2, s2,
                                    bias2, 7.0f, 1.702f, acc, scratch, need, tile, tile_elems),
                  GPTOSS_ERR_NULL_POINTER);
    CHECK(memcmp(acc, acc2, m * HIDDEN * sizeof *acc) == 0, "a refused call changed acc");
    CHECK(gptoss_expert_mlp_scratch_elems(SIZE_MAX / 4, HIDDEN, INTER) == 0, "overflow not caught");

    free(x), free(norm), free(gate_w), free(gate_b), free(t), free(logits), free(indices), free(weights);
    free(b1), free(s1), free(b2), free(s2), free(bias1), free(bias2), free(tile), free(scratch), free(acc), free(acc2);
    free(rows), free(row_w), free(xe), free(h), free(a), free(y), free(twice);
}

int main(void) {
    const int best = gptoss_detect_isa();
    for (int isa = GPTOSS_ISA_SCALAR; isa <= best; isa++) {
        EXPECT_STATUS(gptoss_set_isa(isa), GPTOSS_OK);
        test_attention_block(isa, 1, 0, 0);
        test_attention_block(isa, 5, 200, 128); /* a sliding layer's ring, wrapped */
        test_attention_block(isa, 9, 3, 0);
        test_route_and_expert(isa, 1);
        test_route_and_expert(isa, 12);
    }
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("blocks: all checks passed\n");
    return 0;
}
