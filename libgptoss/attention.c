/*
 * Causal GQA attention over a ring-buffer KV cache, with learned sinks and an optional sliding window, and the
 * store of new keys/values into that cache.
 *
 * One task is (query token, kv head): the kv head's keys are converted to fp32 once per block of KEY_BLOCK
 * keys and reused by all n_heads / n_kv_heads query heads it serves. The softmax is the streaming
 * ("online") form: a running max and sum per head, rescaled when the max grows, so the scratch per thread is
 * a few blocks no matter how long the cache is (capacity can be 131072). The sink is the first logit of each
 * row: it seeds the running max and contributes exp(0) = 1 to the sum, and it has no value.
 *
 * Two task bodies: portable C for any shape, compiled for AVX-512, AVX2+FMA and baseline x86-64 through
 * target attributes, and an AVX2-intrinsics version for gpt-oss's shape (8 q heads per kv head, head_dim 64),
 * which is what decode time depends on. gptoss_get_isa() picks at run time.
 */
#include "gptoss.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <immintrin.h>

#include "bf16.h"

/* Keys per block: the fp32 block of keys (KEY_BLOCK * head_dim) stays in L1 for head_dim 64. */
#define KEY_BLOCK 64

struct attention_problem {
    const gptoss_bf16 *q;
    size_t ldq, n_heads, n_kv_heads, head_dim, group;
    const gptoss_bf16 *k_cache, *v_cache;
    size_t capacity, first_position, window;
    const gptoss_bf16 *sinks;
    float scale;
    gptoss_bf16 *out;
};

/* fp32 scratch of one thread, in floats; false if it does not fit in memory. */
static bool scratch_floats(size_t group, size_t head_dim, size_t *floats) {
    size_t per_head; /* q, output accumulator, score block, running max, sum and rescale factor */
    size_t total;
    if (__builtin_mul_overflow(2, head_dim, &per_head) || __builtin_add_overflow(per_head, KEY_BLOCK + 3, &per_head))
        return false;
    if (__builtin_mul_overflow(group, per_head, &total)) return false;
    /* plus one block of keys or values */
    if (head_dim > SIZE_MAX / KEY_BLOCK || __builtin_add_overflow(total, KEY_BLOCK * head_dim, &total)) return false;
    *floats = total;
    return total <= SIZE_MAX / sizeof(float);
}

/*
 * exp(x) for the softmax, where x = score - running max <= 0 (or NaN, which stays NaN). Cephes' expf
 * (range reduction by ln 2, degree-6 polynomial; within 2 ulp) written without branches or libm calls so the
 * compiler vectorises it: glibc's vector expf is only used under -ffast-math, which we do not want.
 * Below -87 the result would be denormal: it returns 0, which changes no softmax.
 */
static inline __attribute__((always_inline)) float exp_nonpositive(float x) {
    float xc = x < -87.0f ? -87.0f : x;
    xc = xc > 0.0f ? 0.0f : xc;
    /* Adding 1.5 * 2^23 rounds x / ln 2 to an integer n, which lands in the low mantissa bits of t. */
    const float magic = 12582912.0f;
    float t = xc * 1.44269504088896341f + magic;
    float n = t - magic;
    float r = xc - n * 0.693359375f - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    uint32_t t_bits, scale_bits;
    memcpy(&t_bits, &t, sizeof t_bits);
    scale_bits = (t_bits - 0x4b400000u + 127u) << 23; /* 2^n; unsigned so a NaN's garbage bits are defined */
    float two_n;
    memcpy(&two_n, &scale_bits, sizeof two_n);
    return x < -87.0f ? 0.0f : p * two_n;
}

/*
 * Attention of query token t for the `group` q heads served by kv head kvh.
 *
 * Layouts: q transposed, q_t[i][h], and scores s[key][h], so that a key's scores for all heads are built by
 * broadcasting each key element and the softmax bookkeeping runs across heads; attend_task_g8_d64 below is
 * the same algorithm with these layouts mapped onto AVX2 registers.
 */
static inline __attribute__((always_inline)) void attend_task(const struct attention_problem *pr, size_t t,
                                                              size_t kvh, float *scratch, const size_t group,
                                                              const size_t d) {
    float *q_t = scratch;                      /* [d, group] */
    float *acc = q_t + d * group;              /* [group, d] */
    float *block = acc + group * d;            /* [KEY_BLOCK, d] keys, then values */
    float *s = block + KEY_BLOCK * d;          /* [KEY_BLOCK, group] scores, then probabilities */
    float *run_max = s + KEY_BLOCK * group;    /* [group] */
    float *run_sum = run_max + group;          /* [group] */
    float *rescale = run_sum + group;          /* [group] */

    const size_t position = pr->first_position + t;
    const size_t first_key = pr->window && position + 1 > pr->window ? position + 1 - pr->window : 0;
    const size_t head0 = kvh * group;
    const size_t kv_row_stride = pr->n_kv_heads * d;
    const float scale = pr->scale;

    for (size_t h = 0; h < group; h++) {
        const gptoss_bf16 *qh = pr->q + t * pr->ldq + (head0 + h) * d;
        for (size_t i = 0; i < d; i++) q_t[i * group + h] = bf16_to_f32(qh[i]);
        for (size_t i = 0; i < d; i++) acc[h * d + i] = 0.0f;
        /* The sink is the first logit: it seeds the max and adds exp(sink - max) = 1 to the sum. */
        run_max[h] = bf16_to_f32(pr->sinks[head0 + h]);
        run_sum[h] = run_max[h] == -INFINITY ? 0.0f : 1.0f;
    }

    /* Counted in keys done rather than by position so that nothing can wrap near SIZE_MAX. */
    const size_t n_keys = position + 1 - first_key;
    for (size_t done = 0; done < n_keys; done += KEY_BLOCK) {
        const size_t nb = n_keys - done < KEY_BLOCK ? n_keys - done : KEY_BLOCK;
        const size_t row0 = (first_key + done) % pr->capacity;

        for (size_t b = 0, row = row0; b < nb; b++, row = row + 1 == pr->capacity ? 0 : row + 1) {
            const gptoss_bf16 *k = pr->k_cache + row * kv_row_stride + kvh * d;
            for (size_t i = 0; i < d; i++) block[b * d + i] = bf16_to_f32(k[i]);
        }

        /* Scores, 8 heads x 8 keys at a time: 8 independent accumulators hide the FMA latency. */
        for (size_t h0 = 0; h0 < group; h0 += 8) {
            const size_t hc = group - h0 < 8 ? group - h0 : 8;
            size_t b = 0;
            for (; b + 8 <= nb; b += 8) {
                float dots[8][8] = {{0.0f}};
                for (size_t i = 0; i < d; i++) {
                    const float *qi = q_t + i * group + h0;
                    for (size_t kb = 0; kb < 8; kb++) {
                        const float key = block[(b + kb) * d + i];
                        for (size_t h = 0; h < hc; h++) dots[kb][h] += qi[h] * key;
                    }
                }
                for (size_t kb = 0; kb < 8; kb++)
                    for (size_t h = 0; h < hc; h++) s[(b + kb) * group + h0 + h] = dots[kb][h] * scale;
            }
            for (; b < nb; b++) {
                float dots[8] = {0.0f};
                for (size_t i = 0; i < d; i++)
                    for (size_t h = 0; h < hc; h++) dots[h] += q_t[i * group + h0 + h] * block[b * d + i];
                for (size_t h = 0; h < hc; h++) s[b * group + h0 + h] = dots[h] * scale;
            }
        }

        /* Online softmax: raise each head's running max to cover this block; what was summed so far is
         * rescaled by exp(old max - new max) (folded into the value pass below). A NaN score is never the
         * max, so it reaches exp() and the sum, and the output, as NaN. */
        for (size_t h = 0; h < group; h++) rescale[h] = run_max[h];
        for (size_t b = 0; b < nb; b++)
            for (size_t h = 0; h < group; h++) rescale[h] = s[b * group + h] > rescale[h] ? s[b * group + h] : rescale[h];
        for (size_t h = 0; h < group; h++) {
            const float new_max = rescale[h];
            rescale[h] = new_max == run_max[h] ? 1.0f : exp_nonpositive(run_max[h] - new_max);
            run_max[h] = new_max;
            run_sum[h] *= rescale[h];
        }
        for (size_t b = 0; b < nb; b++)
            for (size_t h = 0; h < group; h++) {
                const float p = exp_nonpositive(s[b * group + h] - run_max[h]);
                s[b * group + h] = p;
                run_sum[h] += p;
            }

        for (size_t b = 0, row = row0; b < nb; b++, row = row + 1 == pr->capacity ? 0 : row + 1) {
            const gptoss_bf16 *v = pr->v_cache + row * kv_row_stride + kvh * d;
            for (size_t i = 0; i < d; i++) block[b * d + i] = bf16_to_f32(v[i]);
        }

        /* out_h += p[b][h] * v_b, 64 dims of one head at a time in registers. */
        for (size_t h = 0; h < group; h++) {
            for (size_t i0 = 0; i0 < d; i0 += 64) {
                const size_t ic = d - i0 < 64 ? d - i0 : 64;
                float a[64];
                for (size_t i = 0; i < ic; i++) a[i] = acc[h * d + i0 + i] * rescale[h];
                for (size_t b = 0; b < nb; b++) {
                    const float p = s[b * group + h];
                    const float *vb = block + b * d + i0;
                    for (size_t i = 0; i < ic; i++) a[i] += p * vb[i];
                }
                for (size_t i = 0; i < ic; i++) acc[h * d + i0 + i] = a[i];
            }
        }
    }

    gptoss_bf16 *out = pr->out + t * pr->n_heads * d + head0 * d;
    for (size_t h = 0; h < group; h++) {
        const float inv_sum = 1.0f / run_sum[h];
        for (size_t i = 0; i < d; i++) out[h * d + i] = f32_to_bf16(acc[h * d + i] * inv_sum);
    }
}

/* ---------------------------------------------------------------- AVX2 path for gpt-oss shapes */

/*
 * The same algorithm written with AVX2 intrinsics for 8 q heads per kv head and head_dim 64 (both gpt-oss
 * models), because the compiler's own vectorisation of the loops above shuffles far more than it computes.
 * One ymm holds one key's scores for the 8 heads: q is stored transposed (q_t[i] = the 8 heads' element i),
 * so a score vector is sum_i q_t[i] * broadcast(key[i]) with no horizontal sums; 8 keys at a time keep 8
 * FMA chains in flight. The output of one head (64 floats = 8 ymm) stays in registers while the block of
 * values streams past. It is inlined into both the AVX2 and the AVX-512 task: 8 heads fill exactly 8 lanes,
 * and with AVX-512VL the compiler folds each key broadcast into its FMA ({1to8}), which takes ~10% off.
 */
#define FAST_GROUP 8
#define FAST_HEAD_DIM 64

static inline __attribute__((always_inline, target("avx2,fma"))) __m256 exp256_nonpositive(__m256 x) {
    /* exp_nonpositive() lane by lane; max/min take their second operand when one is NaN, so NaN survives. */
    const __m256 lowest = _mm256_set1_ps(-87.0f), magic = _mm256_set1_ps(12582912.0f);
    __m256 xc = _mm256_min_ps(_mm256_setzero_ps(), _mm256_max_ps(lowest, x));
    __m256 t = _mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), magic);
    __m256 n = _mm256_sub_ps(t, magic);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    __m256i e = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(0x4b400000 - 127));
    __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
    __m256 underflow = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
    return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, two_n));
}

/* 8 bf16 -> 8 fp32 */
static inline __attribute__((always_inline, target("avx2,fma"))) __m256 load8_bf16(const gptoss_bf16 *x) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)x));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

/* Rows b < nb of the block from the ring (fp32), rows up to the next multiple of 8 zeroed. */
static inline __attribute__((always_inline, target("avx2,fma"))) void load_block_d64(float *block, const gptoss_bf16 *cache,
                                                                      size_t row0, size_t nb, size_t capacity,
                                                                      size_t row_stride, size_t offset) {
    size_t b = 0;
    for (size_t row = row0; b < nb; b++, row = row + 1 == capacity ? 0 : row + 1) {
        const gptoss_bf16 *src = cache + row * row_stride + offset;
        for (size_t c = 0; c < FAST_HEAD_DIM; c += 8) _mm256_storeu_ps(block + b * FAST_HEAD_DIM + c, load8_bf16(src + c));
    }
    for (; b % 8; b++)
        for (size_t c = 0; c < FAST_HEAD_DIM; c += 8) _mm256_storeu_ps(block + b * FAST_HEAD_DIM + c, _mm256_setzero_ps());
}

static inline __attribute__((always_inline, target("avx2,fma"))) void
attend_task_g8_d64(const struct attention_problem *pr, size_t t, size_t kvh, float *scratch) {
    enum { G = FAST_GROUP, D = FAST_HEAD_DIM };
    float *q_t = scratch;       /* [D, G] */
    float *acc = q_t + D * G;   /* [G, D] */
    float *block = acc + G * D; /* [KEY_BLOCK, D] */
    float *s = block + KEY_BLOCK * D; /* [KEY_BLOCK, G] */
    float rescale[G], inv_sum[G];

    const size_t position = pr->first_position + t;
    const size_t first_key = pr->window && position + 1 > pr->window ? position + 1 - pr->window : 0;
    const size_t head0 = kvh * G;
    const size_t row_stride = pr->n_kv_heads * D;
    const __m256 scale = _mm256_set1_ps(pr->scale), one = _mm256_set1_ps(1.0f);

    for (size_t h = 0; h < G; h++) {
        const gptoss_bf16 *qh = pr->q + t * pr->ldq + (head0 + h) * D;
        for (size_t i = 0; i < D; i++) q_t[i * G + h] = bf16_to_f32(qh[i]);
        for (size_t i = 0; i < D; i++) acc[h * D + i] = 0.0f;
    }
    __m256 run_max = load8_bf16(pr->sinks + head0);
    __m256 run_sum = _mm256_andnot_ps(_mm256_cmp_ps(run_max, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ), one);

    const size_t n_keys = position + 1 - first_key;
    for (size_t done = 0; done < n_keys; done += KEY_BLOCK) {
        const size_t nb = n_keys - done < KEY_BLOCK ? n_keys - done : KEY_BLOCK;
        const size_t row0 = (first_key + done) % pr->capacity;

        load_block_d64(block, pr->k_cache, row0, nb, pr->capacity, row_stride, kvh * D);
        for (size_t b = 0; b < nb; b += 8) {
            __m256 dot[8];
            for (int k = 0; k < 8; k++) dot[k] = _mm256_setzero_ps();
            const float *keys = block + b * D;
            for (size_t i = 0; i < D; i++) {
                const __m256 qi = _mm256_loadu_ps(q_t + i * G);
#pragma GCC unroll 8
                for (int k = 0; k < 8; k++) dot[k] = _mm256_fmadd_ps(qi, _mm256_broadcast_ss(keys + k * D + i), dot[k]);
            }
            for (size_t k = 0; k < 8; k++) _mm256_storeu_ps(s + (b + k) * G, _mm256_mul_ps(dot[k], scale));
        }

        /* Online softmax (see attend_task). */
        __m256 new_max = run_max;
        for (size_t b = 0; b < nb; b++) new_max = _mm256_max_ps(_mm256_loadu_ps(s + b * G), new_max);
        const __m256 unchanged = _mm256_cmp_ps(new_max, run_max, _CMP_EQ_OQ);
        const __m256 factor = _mm256_blendv_ps(exp256_nonpositive(_mm256_sub_ps(run_max, new_max)), one, unchanged);
        run_max = new_max;
        __m256 sum = _mm256_setzero_ps();
        for (size_t b = 0; b < nb; b++) {
            __m256 p = exp256_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + b * G), new_max));
            _mm256_storeu_ps(s + b * G, p);
            sum = _mm256_add_ps(sum, p);
        }
        run_sum = _mm256_add_ps(_mm256_mul_ps(run_sum, factor), sum);
        _mm256_storeu_ps(rescale, factor);

        load_block_d64(block, pr->v_cache, row0, nb, pr->capacity, row_stride, kvh * D);
        for (size_t h = 0; h < G; h++) {
            __m256 a[D / 8];
            const __m256 f = _mm256_set1_ps(rescale[h]);
            for (int c = 0; c < D / 8; c++) a[c] = _mm256_mul_ps(_mm256_loadu_ps(acc + h * D + 8 * c), f);
            for (size_t b = 0; b < nb; b++) {
                const __m256 p = _mm256_broadcast_ss(s + b * G + h);
                const float *vb = block + b * D;
#pragma GCC unroll 8
                for (int c = 0; c < D / 8; c++) a[c] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vb + 8 * c), a[c]);
            }
            for (int c = 0; c < D / 8; c++) _mm256_storeu_ps(acc + h * D + 8 * c, a[c]);
        }
    }

    _mm256_storeu_ps(inv_sum, _mm256_div_ps(one, run_sum));
    gptoss_bf16 *out = pr->out + t * pr->n_heads * D + head0 * D;
    for (size_t h = 0; h < G; h++)
        for (size_t i = 0; i < D; i++) out[h * D + i] = f32_to_bf16(acc[h * D + i] * inv_sum[h]);
}

/* ---------------------------------------------------------------- dispatch */

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))) static void
attend_task_avx512(const struct attention_problem *pr, size_t t, size_t kvh, float *scratch) {
    if (pr->group == FAST_GROUP && pr->head_dim == FAST_HEAD_DIM) attend_task_g8_d64(pr, t, kvh, scratch);
    else attend_task(pr, t, kvh, scratch, pr->group, pr->head_dim);
}

__attribute__((target("avx2,fma,f16c"))) static void attend_task_avx2(const struct attention_problem *pr,
                                                                        size_t t, size_t kvh, float *scratch) {
    if (pr->group == FAST_GROUP && pr->head_dim == FAST_HEAD_DIM) attend_task_g8_d64(pr, t, kvh, scratch);
    else attend_task(pr, t, kvh, scratch, pr->group, pr->head_dim);
}

static void attend_task_baseline(const struct attention_problem *pr, size_t t, size_t kvh, float *scratch) {
    attend_task(pr, t, kvh, scratch, pr->group, pr->head_dim);
}

/* Does [begin, begin + count) rows of `row_elems` elements at stride `stride` fit in a size_t? */
static bool rows_fit(size_t count, size_t stride, size_t row_elems) {
    size_t last;
    return !__builtin_mul_overflow(count - 1, stride, &last) && last <= SIZE_MAX / sizeof(gptoss_bf16) - row_elems;
}

GPTOSS_API int gptoss_attention(const gptoss_bf16 *q, size_t m, size_t ldq, size_t n_heads, size_t n_kv_heads,
                                size_t head_dim, const gptoss_bf16 *k_cache, const gptoss_bf16 *v_cache,
                                size_t capacity, size_t first_position, size_t window, const gptoss_bf16 *sinks,
                                float scale, gptoss_bf16 *out) {
    if (!q || !k_cache || !v_cache || !sinks || !out) return GPTOSS_ERR_NULL_POINTER;
    if (m == 0 || n_heads == 0 || n_kv_heads == 0 || head_dim == 0 || capacity == 0) return GPTOSS_ERR_BAD_SIZE;
    if (n_heads % n_kv_heads) return GPTOSS_ERR_BAD_SIZE;
    size_t q_row, kv_row, end_position;
    if (__builtin_mul_overflow(n_heads, head_dim, &q_row) || ldq < q_row) return GPTOSS_ERR_BAD_SIZE;
    if (__builtin_mul_overflow(n_kv_heads, head_dim, &kv_row)) return GPTOSS_ERR_BAD_SIZE;
    if (!rows_fit(m, ldq, q_row) || !rows_fit(m, q_row, q_row) || !rows_fit(capacity, kv_row, kv_row))
        return GPTOSS_ERR_BAD_SIZE;
    if (__builtin_add_overflow(first_position, m, &end_position)) return GPTOSS_ERR_OUT_OF_RANGE;
    /* Every key some query needs must still be in the ring. They are positions first_position - window + 1
     * (or 0) through first_position + m - 1: min(first_position + m, window - 1 + m) of them. */
    size_t keys_needed = end_position, window_span;
    if (window && !__builtin_add_overflow(window - 1, m, &window_span) && window_span < keys_needed)
        keys_needed = window_span;
    if (capacity < keys_needed) return GPTOSS_ERR_OUT_OF_RANGE;
    const size_t group = n_heads / n_kv_heads;
    size_t floats;
    if (!scratch_floats(group, head_dim, &floats)) return GPTOSS_ERR_BAD_SIZE;

    const struct attention_problem pr = {
        .q = q, .ldq = ldq, .n_heads = n_heads, .n_kv_heads = n_kv_heads, .head_dim = head_dim, .group = group,
        .k_cache = k_cache, .v_cache = v_cache, .capacity = capacity, .first_position = first_position,
        .window = window, .sinks = sinks, .scale = scale, .out = out,
    };
    void (*task)(const struct attention_problem *, size_t, size_t, float *) =
        gptoss_get_isa() == GPTOSS_ISA_AVX512 ? attend_task_avx512
        : gptoss_get_isa() == GPTOSS_ISA_AVX2 ? attend_task_avx2
                                              : attend_task_baseline;

    const size_t n_tasks = m * n_kv_heads;
    /* Multiply-adds, roughly: below ~256k a parallel region (thread wake-up, and much worse when another
     * process holds the other core) costs more than it saves. */
    const double keys_seen = window && window < end_position ? (double)window : (double)end_position;
    const bool parallel = n_tasks > 1 && (double)m * keys_seen * (double)q_row >= (double)(1 << 18);
    int status = GPTOSS_OK;
    /* Round-robin tasks (static, 1): with causal prefill, later tokens see more keys, and consecutive tasks
     * are the kv heads of one token, so every thread gets a fair share of both. */
#pragma omp parallel num_threads(gptoss_get_num_threads()) if (parallel)
    {
        float *scratch = malloc(floats * sizeof(float));
        if (!scratch) {
#pragma omp atomic write
            status = GPTOSS_ERR_NO_MEMORY;
        }
#pragma omp for schedule(static, 1)
        for (size_t task_index = 0; task_index < n_tasks; task_index++)
            if (scratch) task(&pr, task_index / n_kv_heads, task_index % n_kv_heads, scratch);
        free(scratch);
    }
    return status;
}

GPTOSS_API int gptoss_kv_store(const gptoss_bf16 *k, const gptoss_bf16 *v, size_t m, size_t ld, size_t n_kv_heads,
                               size_t head_dim, gptoss_bf16 *k_cache, gptoss_bf16 *v_cache, size_t capacity,
                               size_t first_position) {
    if (!k || !v || !k_cache || !v_cache) return GPTOSS_ERR_NULL_POINTER;
    if (m == 0 || n_kv_heads == 0 || head_dim == 0 || capacity == 0) return GPTOSS_ERR_BAD_SIZE;
    size_t row, end_position;
    if (__builtin_mul_overflow(n_kv_heads, head_dim, &row) || ld < row) return GPTOSS_ERR_BAD_SIZE;
    if (!rows_fit(m, ld, row) || !rows_fit(capacity, row, row)) return GPTOSS_ERR_BAD_SIZE;
    /* More tokens than rows would overwrite part of this very chunk: always a caller bug. */
    if (m > capacity) return GPTOSS_ERR_BAD_SIZE;
    if (__builtin_add_overflow(first_position, m, &end_position)) return GPTOSS_ERR_OUT_OF_RANGE;

    for (size_t i = 0; i < m; i++) {
        size_t dst = (first_position + i) % capacity * row;
        memcpy(k_cache + dst, k + i * ld, row * sizeof(gptoss_bf16));
        memcpy(v_cache + dst, v + i * ld, row * sizeof(gptoss_bf16));
    }
    return GPTOSS_OK;
}
