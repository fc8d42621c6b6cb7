/*
 * C driver for ops.c, rope.c and attention.c, meant to run under ASan/UBSan (CTest): one small correct case
 * per function against a double-precision reference written here, and the bad-input checks, which must
 * refuse without touching memory. Buffers are malloc'd at their exact sizes so ASan sees any overrun.
 * Prints each failure and exits non-zero if there was any.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TEST_RNG_SEED 2024u
#include "check.h"

static float f32(gptoss_bf16 h) { return bf16_bits_to_f32(h); }

/* Round to nearest even (finite inputs only; the references here never produce NaN). */
static gptoss_bf16 bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (gptoss_bf16)(bits >> 16);
}

/* Random bf16 in about [-2, 2). */
static gptoss_bf16 random_bf16(void) { return bf16(((float)(next_random() % 65536) / 16384.0f) - 2.0f); }

static gptoss_bf16 *random_bf16_array(size_t n) {
    gptoss_bf16 *x = malloc(n * sizeof *x);
    for (size_t i = 0; i < n; i++) x[i] = random_bf16();
    return x;
}

/* |got - exact| within half a bf16 ulp of exact (2^-8 relative) plus fp32 slop. */
static int bf16_close(gptoss_bf16 got, double exact, double abs_slop) {
    return fabs((double)f32(got) - exact) <= fabs(exact) * (1.0 / 256 + 1e-5) + abs_slop;
}

/* ------------------------------------------------------------------------------------------------ ops */

static void test_rmsnorm(void) {
    const size_t m = 3, d = 40;
    gptoss_bf16 *x = random_bf16_array(m * d), *scale = random_bf16_array(d), *y = malloc(m * d * 2);
    EXPECT_STATUS(gptoss_rmsnorm(x, scale, m, d, 1e-5f, y), GPTOSS_OK);
    for (size_t i = 0; i < m; i++) {
        double sum = 0;
        for (size_t j = 0; j < d; j++) sum += (double)f32(x[i * d + j]) * f32(x[i * d + j]);
        double r = 1.0 / sqrt(sum / d + 1e-5);
        for (size_t j = 0; j < d; j++) {
            double exact = f32(x[i * d + j]) * r * f32(scale[j]);
            CHECK(bf16_close(y[i * d + j], exact, 0), "rmsnorm[%zu,%zu] = %g, expected %g", i, j,
                  f32(y[i * d + j]), exact);
        }
    }
    EXPECT_STATUS(gptoss_rmsnorm(NULL, scale, m, d, 1e-5f, y), GPTOSS_ERR_NULL_POINTER);
    EXPECT_STATUS(gptoss_rmsnorm(x, scale, 0, d, 1e-5f, y), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_rmsnorm(x, scale, SIZE_MAX / 2, 4, 1e-5f, y), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_rmsnorm(x, scale, m, d, NAN, y), GPTOSS_ERR_OUT_OF_RANGE);
    free(x), free(scale), free(y);
}

static void test_adds(void) {
    gptoss_bf16 *x = malloc(3 * 2), *y = malloc(3 * 2);
    float *acc = malloc(3 * sizeof *acc);
    x[0] = bf16(1.0f), x[1] = bf16(-2.5f), x[2] = bf16(256.0f);
    y[0] = bf16(2.0f), y[1] = bf16(0.5f), y[2] = bf16(1.0f); /* 256 + 1 rounds to even: 256 */
    EXPECT_STATUS(gptoss_add_bf16(x, y, 3), GPTOSS_OK);
    CHECK(f32(x[0]) == 3.0f && f32(x[1]) == -2.0f && f32(x[2]) == 256.0f, "add: %g %g %g", f32(x[0]),
          f32(x[1]), f32(x[2]));
    acc[0] = 0.25f, acc[1] = -1.0f, acc[2] = 1.0f + 1.0f / 1024; /* bf16(acc[2]) = 1, then 256 + 1 -> 256 */
    EXPECT_STATUS(gptoss_add_f32_to_bf16(x, acc, 3), GPTOSS_OK);
    CHECK(f32(x[0]) == 3.25f && f32(x[1]) == -3.0f && f32(x[2]) == 256.0f, "add_f32: %g %g %g", f32(x[0]),
          f32(x[1]), f32(x[2]));
    EXPECT_STATUS(gptoss_add_bf16(NULL, y, 3), GPTOSS_ERR_NULL_POINTER);
    EXPECT_STATUS(gptoss_add_bf16(x, y, 0), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_add_f32_to_bf16(x, NULL, 3), GPTOSS_ERR_NULL_POINTER);
    EXPECT_STATUS(gptoss_add_f32_to_bf16(x, acc, 0), GPTOSS_ERR_BAD_SIZE);
    free(x), free(y), free(acc);
}

static void test_swiglu(void) {
    /* (glu, lin) pairs: plain, glu above the limit, lin below -limit, lin = -1 */
    const float pairs[4][2] = {{1.5f, 0.5f}, {9.0f, 2.0f}, {-3.0f, -8.0f}, {4.0f, -1.0f}};
    gptoss_bf16 *h = malloc(8 * 2), *out = malloc(4 * 2);
    for (int i = 0; i < 4; i++) h[2 * i] = bf16(pairs[i][0]), h[2 * i + 1] = bf16(pairs[i][1]);
    EXPECT_STATUS(gptoss_swiglu(h, 2, 2, 7.0f, 1.702f, out), GPTOSS_OK);
    for (int i = 0; i < 4; i++) {
        double glu = fmin(pairs[i][0], 7.0), lin = fmax(fmin(pairs[i][1], 7.0), -7.0);
        double exact = glu / (1 + exp(-1.702 * glu)) * (lin + 1);
        CHECK(bf16_close(out[i], exact, 0), "swiglu[%d] = %g, expected %g", i, f32(out[i]), exact);
    }
    EXPECT_STATUS(gptoss_swiglu(h, 2, 2, 7.0f, 1.702f, NULL), GPTOSS_ERR_NULL_POINTER);
    EXPECT_STATUS(gptoss_swiglu(h, 2, 0, 7.0f, 1.702f, out), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_swiglu(h, SIZE_MAX / 4, 4, 7.0f, 1.702f, out), GPTOSS_ERR_BAD_SIZE); /* 2*m*d */
    EXPECT_STATUS(gptoss_swiglu(h, 2, 2, -1.0f, 1.702f, out), GPTOSS_ERR_OUT_OF_RANGE);
    free(h), free(out);
}

static void test_topk_softmax(void) {
    const float row[6] = {0.5f, 2.0f, -1.0f, 2.0f, 0.5f, 1.0f};
    gptoss_bf16 *logits = malloc(6 * 2);
    int32_t *indices = malloc(3 * sizeof *indices);
    float *weights = malloc(3 * sizeof *weights);
    for (int i = 0; i < 6; i++) logits[i] = bf16(row[i]);
    EXPECT_STATUS(gptoss_topk_softmax(logits, 1, 6, 3, indices, weights), GPTOSS_OK);
    CHECK(indices[0] == 1 && indices[1] == 3 && indices[2] == 5, "topk indices %d %d %d (ties: lower first)",
          indices[0], indices[1], indices[2]);
    double denom = 2 * exp(2.0) + exp(1.0);
    CHECK(fabs(weights[0] - exp(2.0) / denom) < 1e-6 && fabs(weights[1] - exp(2.0) / denom) < 1e-6 &&
              fabs(weights[2] - exp(1.0) / denom) < 1e-6,
          "topk weights %g %g %g", weights[0], weights[1], weights[2]);
    EXPECT_STATUS(gptoss_topk_softmax(logits, 1, 6, 7, indices, weights), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_topk_softmax(logits, 1, 6, 0, indices, weights), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_topk_softmax(logits, 1, 6, 3, NULL, weights), GPTOSS_ERR_NULL_POINTER);
    free(logits), free(indices), free(weights);
}

static void test_scatter_add(void) {
    const size_t d = 5;
    float *acc = calloc(2 * d, sizeof *acc);
    gptoss_bf16 *y = random_bf16_array(3 * d);
    int32_t *rows = malloc(3 * sizeof *rows);
    float *w = malloc(3 * sizeof *w);
    rows[0] = 1, rows[1] = 0, rows[2] = 1, w[0] = 0.5f, w[1] = 2.0f, w[2] = -1.0f;
    EXPECT_STATUS(gptoss_scatter_add_weighted(acc, 2, d, y, 3, rows, w), GPTOSS_OK);
    for (size_t j = 0; j < d; j++) {
        CHECK(fabsf(acc[j] - 2.0f * f32(y[d + j])) < 1e-6f, "row 0 col %zu", j);
        CHECK(fabsf(acc[d + j] - (0.5f * f32(y[j]) - f32(y[2 * d + j]))) < 1e-6f, "row 1 col %zu", j);
    }
    float before = acc[0];
    rows[2] = 2; /* == n_rows_acc */
    EXPECT_STATUS(gptoss_scatter_add_weighted(acc, 2, d, y, 3, rows, w), GPTOSS_ERR_OUT_OF_RANGE);
    rows[2] = -1;
    EXPECT_STATUS(gptoss_scatter_add_weighted(acc, 2, d, y, 3, rows, w), GPTOSS_ERR_OUT_OF_RANGE);
    CHECK(acc[0] == before, "a rejected scatter-add wrote to acc");
    EXPECT_STATUS(gptoss_scatter_add_weighted(acc, 2, d, y, 3, NULL, w), GPTOSS_ERR_NULL_POINTER);
    EXPECT_STATUS(gptoss_scatter_add_weighted(acc, 2, 0, y, 3, rows, w), GPTOSS_ERR_BAD_SIZE);
    free(acc), free(y), free(rows), free(w);
}

/* ----------------------------------------------------------------------------------------------- rope */

static void test_rope(void) {
    float *inv_freq = malloc(32 * sizeof *inv_freq), concentration = 0;
    EXPECT_STATUS(gptoss_rope_init(64, 150000.0f, 32.0f, 1.0f, 32.0f, 4096, inv_freq, &concentration), GPTOSS_OK);
    CHECK(fabs(concentration - (0.1 * log(32.0) + 1)) < 1e-6, "concentration %g", concentration);
    CHECK(inv_freq[0] == 1.0f, "inv_freq[0] = %g (below `low`: plain RoPE)", inv_freq[0]);
    double last = 1.0 / (32.0 * pow(150000.0, 62.0 / 64));
    CHECK(fabs(inv_freq[31] - last) <= last * 1e-7, "inv_freq[31] = %g, expected %g (interpolated)",
          inv_freq[31], last);
    EXPECT_STATUS(gptoss_rope_init(63, 150000.0f, 32.0f, 1.0f, 32.0f, 4096, inv_freq, &concentration),
                  GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_rope_init(64, 0.5f, 32.0f, 1.0f, 32.0f, 4096, inv_freq, &concentration),
                  GPTOSS_ERR_OUT_OF_RANGE);
    EXPECT_STATUS(gptoss_rope_init(64, 150000.0f, 32.0f, 32.0f, 1.0f, 4096, inv_freq, &concentration),
                  GPTOSS_ERR_OUT_OF_RANGE);
    EXPECT_STATUS(gptoss_rope_init(64, 150000.0f, 32.0f, 1.0f, 32.0f, 4096, NULL, &concentration),
                  GPTOSS_ERR_NULL_POINTER);

    /* Two tokens of 2 heads of 64, rows padded to 140 elements (a column slice of a wider row). */
    const size_t ldx = 140;
    gptoss_bf16 *x = random_bf16_array(2 * ldx), *x0 = malloc(2 * ldx * 2);
    memcpy(x0, x, 2 * ldx * 2);
    int64_t *positions = malloc(2 * sizeof *positions);
    positions[0] = 0, positions[1] = 4097;
    EXPECT_STATUS(gptoss_rope_apply(x, 2, 2, 64, ldx, positions, inv_freq, concentration), GPTOSS_OK);
    for (size_t t = 0; t < 2; t++)
        for (size_t h = 0; h < 2; h++)
            for (size_t i = 0; i < 32; i++) {
                double angle = (double)((float)positions[t] * inv_freq[i]); /* the fp32 angle */
                double c = cos(angle) * concentration, s = sin(angle) * concentration;
                double a = f32(x0[t * ldx + h * 64 + i]), b = f32(x0[t * ldx + h * 64 + 32 + i]);
                double slop = 1e-6 * (fabs(a) + fabs(b));
                CHECK(bf16_close(x[t * ldx + h * 64 + i], a * c - b * s, slop), "rope t%zu h%zu i%zu", t, h, i);
                CHECK(bf16_close(x[t * ldx + h * 64 + 32 + i], b * c + a * s, slop), "rope t%zu h%zu i%zu", t, h, i);
            }
    CHECK(memcmp(x + 128, x0 + 128, 12 * 2) == 0 && memcmp(x + ldx + 128, x0 + ldx + 128, 12 * 2) == 0,
          "rope wrote past n_heads * head_dim");
    positions[1] = -1;
    memcpy(x0, x, 2 * ldx * 2);
    EXPECT_STATUS(gptoss_rope_apply(x, 2, 2, 64, ldx, positions, inv_freq, concentration), GPTOSS_ERR_OUT_OF_RANGE);
    CHECK(memcmp(x, x0, 2 * ldx * 2) == 0, "a rejected rope_apply rotated something");
    positions[1] = 1;
    EXPECT_STATUS(gptoss_rope_apply(x, 2, 2, 64, 127, positions, inv_freq, concentration), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_rope_apply(x, 2, 2, 63, ldx, positions, inv_freq, concentration), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_rope_apply(x, SIZE_MAX, 2, 64, ldx, positions, inv_freq, concentration),
                  GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_rope_apply(x, 2, 2, 64, ldx, NULL, inv_freq, concentration), GPTOSS_ERR_NULL_POINTER);
    free(inv_freq), free(x), free(x0), free(positions);
}

/* ------------------------------------------------------------------------------------------ attention */

struct attention_case {
    size_t n_heads, n_kv_heads, head_dim, capacity, window, n_positions, first_position, m;
};

/* Double-precision attention of query i (position first + i) for head h over the full history. */
static void attention_reference(const struct attention_case *c, const gptoss_bf16 *q, const gptoss_bf16 *k_all,
                                const gptoss_bf16 *v_all, const gptoss_bf16 *sinks, size_t i, size_t h,
                                double *out) {
    const size_t d = c->head_dim, kvh = h / (c->n_heads / c->n_kv_heads), position = c->first_position + i;
    const size_t first = c->window && position + 1 > c->window ? position + 1 - c->window : 0;
    double max = f32(sinks[h]), sum = 0;
    double *scores = malloc((position + 1) * sizeof *scores);
    for (size_t j = first; j <= position; j++) {
        double s = 0;
        for (size_t e = 0; e < d; e++)
            s += (double)f32(q[(i * c->n_heads + h) * d + e]) * f32(k_all[(j * c->n_kv_heads + kvh) * d + e]);
        scores[j] = s / sqrt((double)d);
        if (scores[j] > max) max = scores[j];
    }
    sum = exp(f32(sinks[h]) - max);
    for (size_t e = 0; e < d; e++) out[e] = 0;
    for (size_t j = first; j <= position; j++) {
        double p = exp(scores[j] - max);
        sum += p;
        for (size_t e = 0; e < d; e++) out[e] += p * f32(v_all[(j * c->n_kv_heads + kvh) * d + e]);
    }
    for (size_t e = 0; e < d; e++) out[e] /= sum;
    free(scores);
}

/* Store every position's k/v into a ring of c->capacity rows (in chunks of c->m), attend the last chunk. */
static void check_attention_case(const struct attention_case *c, int isa) {
    const size_t d = c->head_dim, kv_row = c->n_kv_heads * d, q_row = c->n_heads * d;
    gptoss_bf16 *k_all = random_bf16_array(c->n_positions * kv_row), *v_all = random_bf16_array(c->n_positions * kv_row);
    gptoss_bf16 *q = random_bf16_array(c->m * q_row), *sinks = random_bf16_array(c->n_heads);
    gptoss_bf16 *k_cache = calloc(c->capacity * kv_row, 2), *v_cache = calloc(c->capacity * kv_row, 2);
    gptoss_bf16 *out = malloc(c->m * q_row * 2);
    for (size_t p = 0; p < c->first_position + c->m; p += c->m) {
        size_t n = c->first_position + c->m - p < c->m ? c->first_position + c->m - p : c->m;
        EXPECT_STATUS(gptoss_kv_store(k_all + p * kv_row, v_all + p * kv_row, n, kv_row, c->n_kv_heads, d, k_cache,
                                      v_cache, c->capacity, p),
                      GPTOSS_OK);
    }
    EXPECT_STATUS(gptoss_set_isa(isa), GPTOSS_OK);
    EXPECT_STATUS(gptoss_attention(q, c->m, q_row, c->n_heads, c->n_kv_heads, d, k_cache, v_cache, c->capacity,
                                   c->first_position, c->window, sinks, 1.0f / sqrtf((float)d), out),
                  GPTOSS_OK);
    double *expected = malloc(d * sizeof *expected);
    int bad = 0;
    for (size_t i = 0; i < c->m; i++)
        for (size_t h = 0; h < c->n_heads; h++) {
            attention_reference(c, q, k_all, v_all, sinks, i, h, expected);
            for (size_t e = 0; e < d; e++) bad += !bf16_close(out[(i * c->n_heads + h) * d + e], expected[e], 2e-4);
        }
    CHECK(bad == 0, "%d attention outputs off (isa %d, %zu heads / %zu kv heads, d %zu, capacity %zu, window %zu, "
                    "first %zu, m %zu)", bad, isa, c->n_heads, c->n_kv_heads, d, c->capacity, c->window,
          c->first_position, c->m);
    free(k_all), free(v_all), free(q), free(sinks), free(k_cache), free(v_cache), free(out), free(expected);
}

static void test_attention(void) {
    const struct attention_case cases[] = {
        /* heads, kv heads, d, capacity, window, positions, first, m */
        {2, 1, 6, 1, 0, 1, 0, 1},         /* position 0: itself and the sink */
        {4, 2, 8, 12, 5, 40, 28, 8},      /* window, ring wrapped: capacity = window + m - 1 */
        {8, 1, 64, 70, 0, 70, 0, 70},     /* gpt-oss grouping (the AVX2 path), full causal prefill > 1 block */
        {16, 2, 64, 136, 128, 300, 291, 9}, /* gpt-oss grouping, sliding window, ring wrapped */
    };
    const int best = gptoss_detect_isa();
    for (size_t n = 0; n < sizeof cases / sizeof cases[0]; n++)
        for (int isa = GPTOSS_ISA_SCALAR; isa <= best; isa++) check_attention_case(&cases[n], isa);
    EXPECT_STATUS(gptoss_set_isa(best), GPTOSS_OK);
}

/* The longest context: one query at position 131071 over a full 131072-row cache (no big stack buffers), on
 * every compute path. q, k and v are random and q is scaled so that a few dozen keys carry most of the weight:
 * a key row paired with the wrong value row, a skipped or repeated block or a lost tail changes the outputs,
 * which are all checked against the double-precision reference (computed once). The sinks run from negligible
 * (16) to dominant (30) across the heads. */
static void test_attention_long_context(void) {
    const struct attention_case c = {8, 1, 64, 131072, 0, 131072, 131071, 1};
    const size_t q_row = c.n_heads * c.head_dim, kv_row = c.n_kv_heads * c.head_dim;
    gptoss_bf16 *k_cache = random_bf16_array(c.capacity * kv_row), *v_cache = random_bf16_array(c.capacity * kv_row);
    gptoss_bf16 *q = random_bf16_array(q_row), *out = malloc(q_row * 2), *sinks = malloc(c.n_heads * 2);
    for (size_t i = 0; i < q_row; i++) q[i] = bf16(4.0f * f32(q[i])); /* exact: a power of two */
    for (size_t h = 0; h < c.n_heads; h++) sinks[h] = bf16((float)(16 + 2 * h));
    /* No wrap: position p sits in row p, so the cache is also the whole history for the reference. */
    double *expected = malloc(q_row * sizeof *expected);
    for (size_t h = 0; h < c.n_heads; h++)
        attention_reference(&c, q, k_cache, v_cache, sinks, 0, h, expected + h * c.head_dim);
    const int best = gptoss_detect_isa();
    for (int isa = GPTOSS_ISA_SCALAR; isa <= best; isa++) {
        EXPECT_STATUS(gptoss_set_isa(isa), GPTOSS_OK);
        EXPECT_STATUS(gptoss_attention(q, 1, q_row, c.n_heads, c.n_kv_heads, c.head_dim, k_cache, v_cache,
                                       c.capacity, c.first_position, c.window, sinks, 0.125f, out),
                      GPTOSS_OK);
        int bad = 0;
        size_t worst = 0;
        for (size_t i = 0; i < q_row; i++)
            if (!bf16_close(out[i], expected[i], 1e-4)) {
                if (!bad++) worst = i;
            }
        CHECK(bad == 0, "long context, isa %d: %d of %zu outputs off, first out[%zu] = %g, expected %g", isa, bad,
              q_row, worst, f32(out[worst]), expected[worst]);
    }
    EXPECT_STATUS(gptoss_set_isa(best), GPTOSS_OK);
    free(k_cache), free(v_cache), free(q), free(out), free(sinks), free(expected);
}

static void test_attention_bad_input(void) {
    const size_t n_heads = 4, n_kv = 2, d = 8, capacity = 8, m = 2;
    gptoss_bf16 *q = random_bf16_array(m * n_heads * d), *sinks = random_bf16_array(n_heads);
    gptoss_bf16 *k_cache = random_bf16_array(capacity * n_kv * d), *v_cache = random_bf16_array(capacity * n_kv * d);
    gptoss_bf16 *out = calloc(m * n_heads * d, 2);
    const size_t ld = n_heads * d;
#define ATTENTION(q_, m_, ldq_, heads_, kv_, cap_, first_, window_)                                              \
    gptoss_attention(q_, m_, ldq_, heads_, kv_, d, k_cache, v_cache, cap_, first_, window_, sinks, 0.35f, out)
    EXPECT_STATUS(ATTENTION(NULL, m, ld, n_heads, n_kv, capacity, 0, 0), GPTOSS_ERR_NULL_POINTER);
    EXPECT_STATUS(ATTENTION(q, 0, ld, n_heads, n_kv, capacity, 0, 0), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(ATTENTION(q, m, ld, n_heads, 3, capacity, 0, 0), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(ATTENTION(q, m, ld, n_heads, 0, capacity, 0, 0), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(ATTENTION(q, m, ld - 1, n_heads, n_kv, capacity, 0, 0), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(ATTENTION(q, m, ld, n_heads, n_kv, capacity, 7, 0), GPTOSS_ERR_OUT_OF_RANGE);
    EXPECT_STATUS(ATTENTION(q, m, ld, n_heads, n_kv, capacity, 100, 8), GPTOSS_ERR_OUT_OF_RANGE);
    EXPECT_STATUS(ATTENTION(q, m, ld, n_heads, n_kv, capacity, SIZE_MAX, 0), GPTOSS_ERR_OUT_OF_RANGE);
    EXPECT_STATUS(ATTENTION(q, m, ld, n_heads, n_kv, SIZE_MAX / 4, 0, 0), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(ATTENTION(q, SIZE_MAX / 2, ld, n_heads, n_kv, capacity, 0, 0), GPTOSS_ERR_BAD_SIZE);
    for (size_t i = 0; i < m * n_heads * d; i++) CHECK(out[i] == 0, "a rejected attention call wrote out[%zu]", i);
    EXPECT_STATUS(ATTENTION(q, m, ld, n_heads, n_kv, capacity, 6, 0), GPTOSS_OK);   /* capacity == 6 + 2 */
    EXPECT_STATUS(ATTENTION(q, m, ld, n_heads, n_kv, capacity, 100, 7), GPTOSS_OK); /* 7 + 2 - 1 == 8 */
#undef ATTENTION

    gptoss_bf16 *k = random_bf16_array(3 * n_kv * d);
    EXPECT_STATUS(gptoss_kv_store(k, NULL, 3, n_kv * d, n_kv, d, k_cache, v_cache, capacity, 0),
                  GPTOSS_ERR_NULL_POINTER);
    EXPECT_STATUS(gptoss_kv_store(k, k, 3, n_kv * d - 1, n_kv, d, k_cache, v_cache, capacity, 0),
                  GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_kv_store(k, k, 3, n_kv * d, n_kv, d, k_cache, v_cache, 2, 0), GPTOSS_ERR_BAD_SIZE);
    EXPECT_STATUS(gptoss_kv_store(k, k, 3, n_kv * d, n_kv, d, k_cache, v_cache, capacity, SIZE_MAX - 1),
                  GPTOSS_ERR_OUT_OF_RANGE);
    /* Positions 6, 7, 8 land in rows 6, 7, 0. */
    EXPECT_STATUS(gptoss_kv_store(k, k, 3, n_kv * d, n_kv, d, k_cache, v_cache, capacity, 6), GPTOSS_OK);
    CHECK(memcmp(k_cache + 6 * n_kv * d, k, 2 * n_kv * d * 2) == 0 && memcmp(k_cache, k + 2 * n_kv * d, n_kv * d * 2) == 0,
          "kv_store rows");
    free(q), free(sinks), free(k_cache), free(v_cache), free(out), free(k);
}

int main(void) {
    test_rmsnorm();
    test_adds();
    test_swiglu();
    test_topk_softmax();
    test_scatter_add();
    test_rope();
    test_attention();
    test_attention_long_context();
    test_attention_bad_input();
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("ops/rope/attention: all checks passed\n");
    return 0;
}
