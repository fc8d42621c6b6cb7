/*
 * Elementwise and row-wise kernels between the matmuls: RMSNorm, residual adds, SwiGLU, the router's top-k
 * softmax and the MoE scatter-add.
 *
 * They are memory-bound, so they are plain C loops the compiler vectorises for the baseline ISA; OpenMP only
 * kicks in above PARALLEL_MIN_ELEMS, where the fork/join (a few microseconds) is worth it. Every function
 * checks all of its inputs before it writes anything, so a failed call leaves the outputs untouched.
 */
#include "gptoss.h"

#include <math.h>
#include <stdbool.h>

#include "bf16.h"

#define PARALLEL_MIN_ELEMS ((size_t)1 << 16)

/* a * b, or false when it does not fit a size_t. */
static bool mul_size(size_t a, size_t b, size_t *out) { return !__builtin_mul_overflow(a, b, out); }

/* ---------------------------------------------------------------- rmsnorm */

GPTOSS_API int gptoss_rmsnorm(const gptoss_bf16 *x, const gptoss_bf16 *scale, size_t m, size_t d, float eps,
                              gptoss_bf16 *y) {
    if (!x || !scale || !y) return GPTOSS_ERR_NULL_POINTER;
    size_t n;
    if (m == 0 || d == 0 || !mul_size(m, d, &n)) return GPTOSS_ERR_BAD_SIZE;
    if (!(eps >= 0.0f) || isinf(eps)) return GPTOSS_ERR_OUT_OF_RANGE;

#pragma omp parallel for num_threads(gptoss_get_num_threads()) schedule(static) if (n >= PARALLEL_MIN_ELEMS)
    for (size_t i = 0; i < m; i++) {
        const gptoss_bf16 *xi = x + i * d;
        gptoss_bf16 *yi = y + i * d;
        /* fp32 sum of squares like the reference (t.float() ** 2 then mean): |x| above ~1.8e19 overflows to
         * inf and the row becomes 0 (or NaN where x is inf), exactly as torch does in fp32. */
        float sum_sq = 0.0f;
#pragma omp simd reduction(+ : sum_sq)
        for (size_t j = 0; j < d; j++) {
            float v = bf16_to_f32(xi[j]);
            sum_sq += v * v;
        }
        float r = 1.0f / sqrtf(sum_sq / (float)d + eps);
        /* (x * r) * scale in that order, as the reference multiplies: y may alias x, each row is read in full
         * (the sum above) before it is overwritten. */
        for (size_t j = 0; j < d; j++) yi[j] = f32_to_bf16(bf16_to_f32(xi[j]) * r * bf16_to_f32(scale[j]));
    }
    return GPTOSS_OK;
}

/* ---------------------------------------------------------------- residual adds */

GPTOSS_API int gptoss_add_bf16(gptoss_bf16 *x, const gptoss_bf16 *y, size_t n) {
    if (!x || !y) return GPTOSS_ERR_NULL_POINTER;
    if (n == 0) return GPTOSS_ERR_BAD_SIZE;
#pragma omp parallel for simd num_threads(gptoss_get_num_threads()) schedule(static) if (n >= PARALLEL_MIN_ELEMS)
    for (size_t i = 0; i < n; i++) x[i] = f32_to_bf16(bf16_to_f32(x[i]) + bf16_to_f32(y[i]));
    return GPTOSS_OK;
}

GPTOSS_API int gptoss_add_f32_to_bf16(gptoss_bf16 *x, const float *acc, size_t n) {
    if (!x || !acc) return GPTOSS_ERR_NULL_POINTER;
    if (n == 0) return GPTOSS_ERR_BAD_SIZE;
    /* The MoE output is a bf16 tensor in the reference, so it is rounded before the residual add. */
#pragma omp parallel for simd num_threads(gptoss_get_num_threads()) schedule(static) if (n >= PARALLEL_MIN_ELEMS)
    for (size_t i = 0; i < n; i++) x[i] = f32_to_bf16(bf16_to_f32(x[i]) + bf16_to_f32(f32_to_bf16(acc[i])));
    return GPTOSS_OK;
}

/* ---------------------------------------------------------------- swiglu */

GPTOSS_API int gptoss_swiglu(const gptoss_bf16 *h, size_t m, size_t d, float limit, float alpha,
                             gptoss_bf16 *out) {
    if (!h || !out) return GPTOSS_ERR_NULL_POINTER;
    size_t n, n_in;
    if (m == 0 || d == 0 || !mul_size(m, d, &n) || !mul_size(n, 2, &n_in)) return GPTOSS_ERR_BAD_SIZE;
    if (!(limit >= 0.0f) || isnan(alpha)) return GPTOSS_ERR_OUT_OF_RANGE;

#pragma omp parallel for num_threads(gptoss_get_num_threads()) schedule(static) if (n >= PARALLEL_MIN_ELEMS)
    for (size_t i = 0; i < n; i++) {
        float glu = bf16_to_f32(h[2 * i]);
        float lin = bf16_to_f32(h[2 * i + 1]);
        /* Written as comparisons, not fminf/fmaxf, so a NaN input stays NaN like torch.clamp (fminf would
         * quietly replace it by the limit). */
        glu = glu > limit ? limit : glu;
        lin = lin > limit ? limit : (lin < -limit ? -limit : lin);
        float sigmoid = 1.0f / (1.0f + expf(-alpha * glu));
        out[i] = f32_to_bf16(glu * sigmoid * (lin + 1.0f));
    }
    return GPTOSS_OK;
}

/* ---------------------------------------------------------------- router */

/* Does value a (at index ia) rank before b (at ib)? Larger first, ties by lower index; NaN ranks above
 * everything, as in torch.topk, so a broken router row shows up as NaN weights rather than being hidden. */
static bool ranks_before(float a, size_t ia, float b, size_t ib) {
    bool a_nan = isnan(a), b_nan = isnan(b);
    if (a_nan || b_nan) return a_nan && (!b_nan || ia < ib);
    return a > b || (a == b && ia < ib);
}

GPTOSS_API int gptoss_topk_softmax(const gptoss_bf16 *logits, size_t m, size_t n_experts, size_t k,
                                   int32_t *indices, float *weights) {
    if (!logits || !indices || !weights) return GPTOSS_ERR_NULL_POINTER;
    size_t n;
    if (m == 0 || n_experts == 0 || k == 0 || !mul_size(m, n_experts, &n)) return GPTOSS_ERR_BAD_SIZE;
    if (k > n_experts) return GPTOSS_ERR_BAD_SIZE;
    if (n_experts > (size_t)INT32_MAX) return GPTOSS_ERR_OUT_OF_RANGE;

    for (size_t i = 0; i < m; i++) {
        const gptoss_bf16 *row = logits + i * n_experts;
        int32_t *idx = indices + i * k;
        float *w = weights + i * k;
        /* k selection passes, each picking the best expert that ranks after the previous pick. k is 4 and
         * n_experts 32 or 128 in gpt-oss: simpler and no slower than a heap. */
        for (size_t t = 0; t < k; t++) {
            size_t best = n_experts;
            for (size_t e = 0; e < n_experts; e++) {
                float v = bf16_to_f32(row[e]);
                if (t > 0 && !ranks_before(w[t - 1], (size_t)idx[t - 1], v, e)) continue;
                if (best == n_experts || ranks_before(v, e, bf16_to_f32(row[best]), best)) best = e;
            }
            idx[t] = (int32_t)best;
            w[t] = bf16_to_f32(row[best]);
        }
        /* Softmax of the k chosen logits; the first is the largest. */
        float max = w[0], sum = 0.0f;
        for (size_t t = 0; t < k; t++) {
            w[t] = expf(w[t] - max);
            sum += w[t];
        }
        for (size_t t = 0; t < k; t++) w[t] /= sum;
    }
    return GPTOSS_OK;
}

/* ---------------------------------------------------------------- MoE combine */

GPTOSS_API int gptoss_scatter_add_weighted(float *acc, size_t n_rows_acc, size_t d, const gptoss_bf16 *y,
                                           size_t g, const int32_t *rows, const float *weights) {
    if (!acc || !y || !rows || !weights) return GPTOSS_ERR_NULL_POINTER;
    size_t n_acc, n_y;
    if (n_rows_acc == 0 || d == 0 || g == 0 || !mul_size(n_rows_acc, d, &n_acc) || !mul_size(g, d, &n_y))
        return GPTOSS_ERR_BAD_SIZE;
    for (size_t i = 0; i < g; i++)
        if (rows[i] < 0 || (size_t)rows[i] >= n_rows_acc) return GPTOSS_ERR_OUT_OF_RANGE;

    /* Rows may repeat (a token routed to the same group twice), so threads split the columns, not the rows:
     * each element is then summed over i in ascending order, deterministically. */
    const size_t chunk = 256;
    const size_t n_chunks = (d + chunk - 1) / chunk;
#pragma omp parallel for num_threads(gptoss_get_num_threads()) schedule(static) if (n_y >= PARALLEL_MIN_ELEMS)
    for (size_t c = 0; c < n_chunks; c++) {
        size_t begin = c * chunk, end = begin + chunk < d ? begin + chunk : d;
        for (size_t i = 0; i < g; i++) {
            float *a = acc + (size_t)rows[i] * d;
            const gptoss_bf16 *yi = y + i * d;
            float w = weights[i];
#pragma omp simd
            for (size_t j = begin; j < end; j++) a[j] += w * bf16_to_f32(yi[j]);
        }
    }
    return GPTOSS_OK;
}
