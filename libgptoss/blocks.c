/*
 * The blocks of a decoder layer (SPEC §4) as single calls: the attention block, the router, and one routed
 * expert's MLP with its share of the MoE sum.
 *
 * Why: the Python model used to call each kernel through ctypes (~35 crossings per layer, 5-9 us each with
 * the wrappers' argument checks), ~18 ms of a ~250 ms decode step. Python still orchestrates at layer
 * granularity (the expert store, prefetch, statistics); these functions are the same sequence of public
 * kernels it called one by one, in the same order on the same buffers, so results are bit-identical to it.
 * Each checks its sizes and scratch up front and returns the first failing kernel's status otherwise.
 */
#include "gptoss.h"

#include <stdbool.h>
#include <stdlib.h>

#include "bf16.h"

static bool mul_size(size_t a, size_t b, size_t *out) { return !__builtin_mul_overflow(a, b, out); }
static bool add_size(size_t a, size_t b, size_t *out) { return !__builtin_add_overflow(a, b, out); }

#define TRY(call)                         \
    do {                                  \
        int status_ = (call);             \
        if (status_ != GPTOSS_OK) {       \
            status = status_;             \
            goto done;                    \
        }                                 \
    } while (0)

/* ---------------------------------------------------------------- attention block */

GPTOSS_API size_t gptoss_attention_block_scratch_elems(size_t m, size_t hidden, size_t n_heads, size_t n_kv_heads,
                                            size_t head_dim) {
    /* t [m, hidden] + qkv [m, (nq + 2 nkv) hd] + attn [m, nq hd] + proj [m, hidden]; 0 on overflow */
    size_t per_token, heads, total;
    if (!mul_size(2 * n_heads + 2 * n_kv_heads, head_dim, &heads) || !add_size(heads, 2 * hidden, &per_token) ||
        !mul_size(m, per_token, &total))
        return 0;
    return total;
}

GPTOSS_API int gptoss_attention_block(gptoss_bf16 *x, size_t m, size_t hidden, size_t n_heads, size_t n_kv_heads,
                                      size_t head_dim, const struct gptoss_attention_weights *w, float eps,
                                      const float *inv_freq, float concentration, float scale,
                                      gptoss_bf16 *k_cache, gptoss_bf16 *v_cache, size_t capacity,
                                      size_t first_position, size_t window, gptoss_bf16 *scratch,
                                      size_t scratch_elems) {
    if (!x || !w || !inv_freq || !k_cache || !v_cache || !scratch) return GPTOSS_ERR_NULL_POINTER;
    if (!w->norm || !w->sinks) return GPTOSS_ERR_NULL_POINTER;
    const bool qkv_q8 = w->qkv_q8 != NULL, out_q8 = w->out_q8 != NULL;
    /* q8 projections: their scales are required and a bf16 weight beside them is a caller's mix-up. */
    if ((qkv_q8 && !w->qkv_scales) || (out_q8 && !w->out_scales)) return GPTOSS_ERR_NULL_POINTER;
    if (qkv_q8 && (w->qkv_weight || w->q_weight || w->k_weight || w->v_weight)) return GPTOSS_ERR_OUT_OF_RANGE;
    if (out_q8 && w->out_weight) return GPTOSS_ERR_OUT_OF_RANGE;
    if (!out_q8 && !w->out_weight) return GPTOSS_ERR_NULL_POINTER;
    const bool fused_qkv = w->qkv_weight != NULL;
    if (!qkv_q8 && !fused_qkv && (!w->q_weight || !w->k_weight || !w->v_weight)) return GPTOSS_ERR_NULL_POINTER;
    if (m == 0 || hidden == 0 || n_heads == 0 || n_kv_heads == 0 || head_dim == 0) return GPTOSS_ERR_BAD_SIZE;
    const size_t need = gptoss_attention_block_scratch_elems(m, hidden, n_heads, n_kv_heads, head_dim);
    if (need == 0 || scratch_elems < need) return GPTOSS_ERR_BAD_SIZE;
    if (first_position > (size_t)INT64_MAX - m) return GPTOSS_ERR_OUT_OF_RANGE;

    const size_t q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim, qkv_dim = q_dim + 2 * kv_dim;
    gptoss_bf16 *t = scratch, *qkv = t + m * hidden, *attn = qkv + m * qkv_dim, *proj = attn + m * q_dim;
    gptoss_bf16 *q = qkv, *k = qkv + q_dim, *v = qkv + q_dim + kv_dim;
    int status = GPTOSS_OK;
    int64_t *positions = malloc(m * sizeof *positions);
    if (!positions) return GPTOSS_ERR_NO_MEMORY;
    for (size_t i = 0; i < m; i++) positions[i] = (int64_t)(first_position + i);

    /* t = norm(x); qkv = t W_qkv^T + b (one matmul when q, k, v are one tensor, as the original format has) */
    TRY(gptoss_rmsnorm(x, w->norm, m, hidden, eps, t));
    if (qkv_q8) {
        TRY(gptoss_matmul_q8(t, m, hidden, hidden, w->qkv_q8, w->qkv_scales, qkv_dim, w->qkv_bias, qkv, qkv_dim,
                             GPTOSS_DTYPE_BF16));
    } else if (fused_qkv) {
        TRY(gptoss_matmul_bf16(t, m, hidden, hidden, w->qkv_weight, qkv_dim, w->qkv_bias, qkv, qkv_dim,
                               GPTOSS_DTYPE_BF16));
    } else {
        TRY(gptoss_matmul_bf16(t, m, hidden, hidden, w->q_weight, q_dim, w->q_bias, q, qkv_dim, GPTOSS_DTYPE_BF16));
        TRY(gptoss_matmul_bf16(t, m, hidden, hidden, w->k_weight, kv_dim, w->k_bias, k, qkv_dim, GPTOSS_DTYPE_BF16));
        TRY(gptoss_matmul_bf16(t, m, hidden, hidden, w->v_weight, kv_dim, w->v_bias, v, qkv_dim, GPTOSS_DTYPE_BF16));
    }
    /* RoPE on q and k; keys and values join the cache; attention with sinks (and the window) */
    TRY(gptoss_rope_apply(q, m, n_heads, head_dim, qkv_dim, positions, inv_freq, concentration));
    TRY(gptoss_rope_apply(k, m, n_kv_heads, head_dim, qkv_dim, positions, inv_freq, concentration));
    TRY(gptoss_kv_store(k, v, m, qkv_dim, n_kv_heads, head_dim, k_cache, v_cache, capacity, first_position));
    TRY(gptoss_attention(q, m, qkv_dim, n_heads, n_kv_heads, head_dim, k_cache, v_cache, capacity, first_position,
                         window, w->sinks, scale, attn));
    /* x = x + attn W_out^T + b */
    if (out_q8)
        TRY(gptoss_matmul_q8(attn, m, q_dim, q_dim, w->out_q8, w->out_scales, hidden, w->out_bias, proj, hidden,
                             GPTOSS_DTYPE_BF16));
    else
        TRY(gptoss_matmul_bf16(attn, m, q_dim, q_dim, w->out_weight, hidden, w->out_bias, proj, hidden,
                               GPTOSS_DTYPE_BF16));
    TRY(gptoss_add_bf16(x, proj, m * hidden));
done:
    free(positions);
    return status;
}

/* ---------------------------------------------------------------- router */

GPTOSS_API int gptoss_moe_route(const gptoss_bf16 *x, size_t m, size_t hidden, const gptoss_bf16 *norm, float eps,
                                const gptoss_bf16 *gate_weight, const gptoss_bf16 *gate_bias, size_t n_experts,
                                size_t k, gptoss_bf16 *t, gptoss_bf16 *logits, int32_t *indices,
                                float *weights) {
    if (!x || !norm || !gate_weight || !t || !logits || !indices || !weights) return GPTOSS_ERR_NULL_POINTER;
    size_t mk;
    if (m == 0 || hidden == 0 || n_experts == 0 || k == 0 || k > n_experts || !mul_size(m, k, &mk))
        return GPTOSS_ERR_BAD_SIZE;
    int status = GPTOSS_OK;
    TRY(gptoss_rmsnorm(x, norm, m, hidden, eps, t));
    TRY(gptoss_matmul_bf16(t, m, hidden, hidden, gate_weight, n_experts, gate_bias, logits, n_experts,
                           GPTOSS_DTYPE_BF16));
    TRY(gptoss_topk_softmax(logits, m, n_experts, k, indices, weights));
    /* Both references (gpt-oss and transformers) keep the routing weights in bf16. */
    for (size_t i = 0; i < mk; i++) weights[i] = bf16_to_f32(f32_to_bf16(weights[i]));
done:
    return status;
}

/* ---------------------------------------------------------------- one expert */

GPTOSS_API size_t gptoss_expert_mlp_scratch_elems(size_t m, size_t hidden, size_t intermediate) {
    /* gathered [m, hidden] + h [m, 2 I] + act [m, I] + y [m, hidden]; 0 on overflow */
    size_t per_token, three_i, total;
    if (!mul_size(3, intermediate, &three_i) || !add_size(three_i, 2 * hidden, &per_token) ||
        !mul_size(m, per_token, &total))
        return 0;
    return total;
}

GPTOSS_API int gptoss_expert_mlp(const gptoss_bf16 *t, size_t m, size_t hidden, size_t intermediate,
                                 const int32_t *indices, const float *weights, size_t k, int32_t expert,
                                 const uint8_t *mlp1_blocks, const uint8_t *mlp1_scales, const gptoss_bf16 *mlp1_bias,
                                 const uint8_t *mlp2_blocks, const uint8_t *mlp2_scales, const gptoss_bf16 *mlp2_bias,
                                 float swiglu_limit, float swiglu_alpha, float *acc, gptoss_bf16 *scratch,
                                 size_t scratch_elems, gptoss_bf16 *tile, size_t tile_elems) {
    if (!t || !indices || !weights || !mlp1_blocks || !mlp1_scales || !mlp2_blocks || !mlp2_scales || !acc ||
        !scratch || !tile)
        return GPTOSS_ERR_NULL_POINTER;
    size_t mk;
    if (m == 0 || hidden == 0 || intermediate == 0 || k == 0 || !mul_size(m, k, &mk)) return GPTOSS_ERR_BAD_SIZE;
    const size_t need = gptoss_expert_mlp_scratch_elems(m, hidden, intermediate);
    if (need == 0 || scratch_elems < need) return GPTOSS_ERR_BAD_SIZE;

    /* The tokens routed to this expert, in token order, and their routing weights. */
    int status = GPTOSS_OK;
    int32_t *rows = malloc(m * sizeof *rows);
    float *row_weights = malloc(m * sizeof *row_weights);
    if (!rows || !row_weights) {
        status = GPTOSS_ERR_NO_MEMORY;
        goto done;
    }
    size_t n = 0;
    for (size_t i = 0; i < mk; i++) {
        if (indices[i] != expert) continue;
        if (n == m) { /* an expert listed twice for one token: not a router's output */
            status = GPTOSS_ERR_OUT_OF_RANGE;
            goto done;
        }
        rows[n] = (int32_t)(i / k);
        row_weights[n++] = weights[i];
    }
    if (n == 0) goto done; /* not routed here: contributes nothing */

    gptoss_bf16 *gathered = scratch, *h = gathered + m * hidden, *act = h + m * 2 * intermediate,
                *y = act + m * intermediate;
    /* Every token routed here (always so in decode): the normed input as it is, no gather. */
    const gptoss_bf16 *xe = t;
    if (n != m) {
        for (size_t i = 0; i < n; i++)
            for (size_t j = 0; j < hidden; j++) gathered[i * hidden + j] = t[(size_t)rows[i] * hidden + j];
        xe = gathered;
    }
    /* h = x W1^T + b1; a = SwiGLU(h); y = a W2^T + b2; acc[token] += weight * y */
    TRY(gptoss_matmul_mxfp4(xe, n, hidden, mlp1_blocks, mlp1_scales, 2 * intermediate, mlp1_bias, h,
                            2 * intermediate, tile, tile_elems, 0));
    TRY(gptoss_swiglu(h, n, intermediate, swiglu_limit, swiglu_alpha, act));
    TRY(gptoss_matmul_mxfp4(act, n, intermediate, mlp2_blocks, mlp2_scales, hidden, mlp2_bias, y, hidden, tile,
                            tile_elems, 0));
    TRY(gptoss_scatter_add_weighted(acc, m, hidden, y, n, rows, row_weights));
done:
    free(rows);
    free(row_weights);
    return status;
}
