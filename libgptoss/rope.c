/*
 * Rotary position embedding with YaRN (NTK-by-parts) scaling, SPEC §4.
 *
 * The inverse frequencies are computed once, in double and stored as fp32. Rotation angles are then the fp32
 * product (float)position * inv_freq[i], because that is what the gpt-oss and Hugging Face references compute
 * (an fp32 einsum of positions and inv_freq): at position 131071 that product carries an absolute rounding
 * error of up to 2^-8 rad, and matching it keeps our cos/sin equal to theirs rather than "more exact".
 */
#include "gptoss.h"

#include <math.h>
#include <stdbool.h>

#include "bf16.h"

/* cos/sin are computed for this many frequency pairs at a time, then reused across every head of the token. */
#define ROPE_PAIRS_PER_CHUNK 64

GPTOSS_API int gptoss_rope_init(size_t head_dim, float theta, float scaling_factor, float ntk_alpha,
                                float ntk_beta, size_t initial_context_length, float *inv_freq,
                                float *concentration) {
    if (!inv_freq || !concentration) return GPTOSS_ERR_NULL_POINTER;
    if (head_dim == 0 || head_dim % 2) return GPTOSS_ERR_BAD_SIZE;
    /* theta > 1 so that ln(theta) > 0 and frequencies decrease with i. */
    if (!(theta > 1.0f) || isinf(theta) || isnan(scaling_factor) || isinf(scaling_factor))
        return GPTOSS_ERR_OUT_OF_RANGE;

    const size_t half = head_dim / 2;
    const double base = theta, factor = scaling_factor;
    if (factor <= 1.0) {
        /* Plain RoPE: no interpolation, no concentration. */
        for (size_t i = 0; i < half; i++) inv_freq[i] = (float)(1.0 / pow(base, (double)(2 * i) / (double)head_dim));
        *concentration = 1.0f;
        return GPTOSS_OK;
    }

    if (initial_context_length == 0) return GPTOSS_ERR_BAD_SIZE;
    /* Dimensions below `low` rotate fast enough to keep their original frequency (mask 1, extrapolation);
     * above `high` they are interpolated by the scaling factor; the ramp blends the two in between. beta is the
     * larger of the two NTK parameters (32 vs 1 in gpt-oss), so low < high. */
    if (!(ntk_alpha > 0.0f) || !(ntk_beta > ntk_alpha) || isinf(ntk_beta)) return GPTOSS_ERR_OUT_OF_RANGE;
    const double d_half = (double)half, two_pi = 2.0 * M_PI, ctx = (double)initial_context_length;
    const double low = d_half * log(ctx / (ntk_beta * two_pi)) / log(base);
    const double high = d_half * log(ctx / (ntk_alpha * two_pi)) / log(base);
    for (size_t i = 0; i < half; i++) {
        double freq = pow(base, (double)(2 * i) / (double)head_dim);
        double ramp = ((double)i - low) / (high - low);
        double mask = 1.0 - (ramp < 0.0 ? 0.0 : ramp > 1.0 ? 1.0 : ramp);
        inv_freq[i] = (float)((1.0 / (factor * freq)) * (1.0 - mask) + (1.0 / freq) * mask);
    }
    *concentration = (float)(0.1 * log(factor) + 1.0);
    return GPTOSS_OK;
}

GPTOSS_API int gptoss_rope_apply(gptoss_bf16 *x, size_t m, size_t n_heads, size_t head_dim, size_t ldx,
                                 const int64_t *positions, const float *inv_freq, float concentration) {
    if (!x || !positions || !inv_freq) return GPTOSS_ERR_NULL_POINTER;
    size_t row, last_row_start;
    if (m == 0 || n_heads == 0 || head_dim == 0 || head_dim % 2) return GPTOSS_ERR_BAD_SIZE;
    if (__builtin_mul_overflow(n_heads, head_dim, &row) || ldx < row) return GPTOSS_ERR_BAD_SIZE;
    if (__builtin_mul_overflow(m - 1, ldx, &last_row_start) || last_row_start > SIZE_MAX - row)
        return GPTOSS_ERR_BAD_SIZE;
    for (size_t t = 0; t < m; t++)
        if (positions[t] < 0) return GPTOSS_ERR_OUT_OF_RANGE;

    const size_t half = head_dim / 2;
#pragma omp parallel for num_threads(gptoss_get_num_threads()) schedule(static) if (m * row >= ((size_t)1 << 16))
    for (size_t t = 0; t < m; t++) {
        const float position = (float)positions[t];
        gptoss_bf16 *xt = x + t * ldx;
        for (size_t i0 = 0; i0 < half; i0 += ROPE_PAIRS_PER_CHUNK) {
            const size_t n_pairs = half - i0 < ROPE_PAIRS_PER_CHUNK ? half - i0 : ROPE_PAIRS_PER_CHUNK;
            float cos_c[ROPE_PAIRS_PER_CHUNK], sin_c[ROPE_PAIRS_PER_CHUNK];
            for (size_t i = 0; i < n_pairs; i++) {
                float angle = position * inv_freq[i0 + i]; /* fp32, as the references do */
                cos_c[i] = cosf(angle) * concentration;
                sin_c[i] = sinf(angle) * concentration;
            }
            for (size_t h = 0; h < n_heads; h++) {
                gptoss_bf16 *x1 = xt + h * head_dim + i0, *x2 = x1 + half;
#pragma omp simd
                for (size_t i = 0; i < n_pairs; i++) {
                    float a = bf16_to_f32(x1[i]), b = bf16_to_f32(x2[i]);
                    x1[i] = f32_to_bf16(a * cos_c[i] - b * sin_c[i]);
                    x2[i] = f32_to_bf16(b * cos_c[i] + a * sin_c[i]);
                }
            }
        }
    }
    return GPTOSS_OK;
}
