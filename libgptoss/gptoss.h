/*
 * libgptoss: the compute kernels of gptoss-stream.
 *
 * Plain C functions on raw pointers and sizes. Every function returns an int status (GPTOSS_OK or a
 * GPTOSS_ERR_* code; gptoss_status_string() names it) and validates what it is given: it never aborts and
 * never writes outside the buffers whose sizes it was told.
 *
 * Conventions:
 *  - bf16 values travel as their raw 16-bit patterns (gptoss_bf16); fp32 math happens inside each kernel and
 *    results are rounded to bf16 with round-to-nearest-even (NaN stays NaN).
 *  - Matrices are row-major. A linear layer's weight is [n_out, k_in], exactly as the checkpoint stores it,
 *    and y = x W^T + b.
 *  - "m" is the number of tokens (rows of activations).
 *
 * Global state: the thread count and the selected compute path (runtime.c), the cache of oneDNN
 * primitives and the per-thread fp32 tile buffers (matmul.c). Nothing else.
 */
#ifndef GPTOSS_H
#define GPTOSS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef uint16_t gptoss_bf16;

enum gptoss_status {
    GPTOSS_OK = 0,
    GPTOSS_ERR_NULL_POINTER = 1, /* a required pointer is NULL */
    GPTOSS_ERR_BAD_SIZE = 2,     /* a size is zero, inconsistent with another, or overflows */
    GPTOSS_ERR_OUT_OF_RANGE = 3, /* an index, position or row range lies outside its bounds */
    GPTOSS_ERR_NO_MEMORY = 4,
    GPTOSS_ERR_ONEDNN = 5,       /* oneDNN refused or failed a primitive */
    GPTOSS_ERR_UNSUPPORTED = 6,  /* e.g. an ISA this CPU lacks */
};

enum gptoss_dtype { GPTOSS_DTYPE_BF16 = 0, GPTOSS_DTYPE_F32 = 1 };

enum gptoss_isa { GPTOSS_ISA_SCALAR = 0, GPTOSS_ISA_AVX2 = 1, GPTOSS_ISA_AVX512 = 2 };

const char *gptoss_status_string(int status);

/* ---------------------------------------------------------------- runtime.c */

/* Threads used by every kernel and by oneDNN (OpenMP). n <= 0 means all processors. The count is the
 * library's, not the calling thread's: a kernel called from any thread runs with it. */
int gptoss_set_num_threads(int n);
int gptoss_get_num_threads(void);
/*
 * Compute path (see runtime.c): GPTOSS_ISA_AVX512 multiplies bf16 natively (AVX512_BF16), GPTOSS_ISA_AVX2 and
 * GPTOSS_ISA_SCALAR multiply in fp32 (weights widened in registers or in cache-sized tiles). Results agree
 * within fp32 summation order, then bf16 rounding.
 * gptoss_detect_isa: the best path that can run, the lower of CPUID and what oneDNN dispatches
 * (ONEDNN_MAX_CPU_ISA lowers the latter). gptoss_cpu_isa: what CPUID alone allows. gptoss_get_isa: the
 * selected path (default: detected). gptoss_set_isa: select a path at or below the detected one
 * (GPTOSS_ERR_UNSUPPORTED above it).
 */
int gptoss_detect_isa(void);
int gptoss_cpu_isa(void);
int gptoss_get_isa(void);
int gptoss_set_isa(int isa);
/* oneDNN's version and the CPU ISA it dispatches to (a dnnl_cpu_isa_t value), for bug reports. */
int gptoss_onednn_info(int *major, int *minor, int *patch, int *cpu_isa);

/* ---------------------------------------------------------------- convert.c */

int gptoss_bf16_to_f32(const gptoss_bf16 *x, float *y, size_t n);
int gptoss_f32_to_bf16(const float *x, gptoss_bf16 *y, size_t n);

/* ---------------------------------------------------------------- mxfp4.c */

/*
 * Dequantize rows [row_begin, row_end) of an MXFP4 matrix of n_rows rows to bf16.
 *   blocks: [n_rows, blocks_per_row, 16] bytes, E2M1 codes, low nibble first
 *   scales: [n_rows, blocks_per_row] E8M0 exponents
 *   out:    [row_end - row_begin, blocks_per_row * 32] bf16
 * value = FP4[code] * 2^(scale - 127); every such value is exact in bf16 (overflow gives +-inf).
 * Scale 255 is NaN in E8M0 (OCP MX spec): the whole block dequantizes to NaN.
 */
int gptoss_dequantize_mxfp4_rows(const uint8_t *blocks, const uint8_t *scales, size_t n_rows,
                                 size_t blocks_per_row, size_t row_begin, size_t row_end, gptoss_bf16 *out);

/* ---------------------------------------------------------------- matmul.c */

/*
 * y[m, n] = x[m, k] W[n, k]^T (+ bias[n]), bf16 inputs, fp32 accumulation.
 * On the AVX-512 BF16 path, oneDNN's bf16 matmul. On the fp32 paths, for m <= 8 our own kernel that reads W
 * once and widens it in registers; for larger m, W is widened tile by tile into fp32 and multiplied by
 * oneDNN's fp32 GEMM (matmul.c keeps the fp32 tiles in a documented per-thread cache).
 *   x: row stride ldx (>= k) elements; w: [n, k] contiguous, used in place (no copy, no reorder);
 *   bias: [n] bf16 or NULL; y: row stride ldy (>= n) elements of y_dtype (GPTOSS_DTYPE_BF16 or _F32).
 * Primitives are created once per (m, n, k, ldx, ldy, bias, y_dtype) and cached.
 */
int gptoss_matmul_bf16(const gptoss_bf16 *x, size_t m, size_t k, size_t ldx, const gptoss_bf16 *w, size_t n,
                       const gptoss_bf16 *bias, void *y, size_t ldy, int y_dtype);

/*
 * y[m, n] = x[m, k] W[n, k]^T in fp32 through oneDNN's fp32 matmul (the GEMM the fp32 path's tiles run):
 * x row stride ldx, W [n, k] contiguous, y row stride ldy. For fp32 callers and for the benchmarks, which
 * measure the fp32 GEMM peak the fp32 path's prefill is compared against.
 */
int gptoss_matmul_f32(const float *x, size_t m, size_t k, size_t ldx, const float *w, size_t n, float *y,
                      size_t ldy);

/*
 * y[m, n] = x[m, k] W^T + bias with W an MXFP4 matrix [n, k] (blocks/scales as above, k % 32 == 0).
 * W is dequantized tile by tile (tile_rows rows at a time) into scratch and each tile goes straight to
 * oneDNN, so the bf16 copy of W stays in cache instead of round-tripping through memory. On the fp32 paths
 * the tile is then widened to fp32 (and m <= 8 takes the register kernel of gemv.c, scratch unused).
 * scratch must hold at least tile_rows * k bf16 values. Give it a slot per thread
 * (gptoss_get_num_threads() x ~2 MiB) and tile_rows = 0: tiles of ~2 MiB, as many per thread, each thread
 * dequantizing its own tile and running oneDNN single-threaded on it (the fast mode, see matmul.c). With
 * room for one tile only, tiles run in sequence, each dequantized and multiplied by all threads. tile_rows = 0
 * shrinks the tiles to fit the scratch (at least one row of W: GPTOSS_ERR_BAD_SIZE otherwise).
 * y: [m, n] bf16 with row stride ldy.
 */
int gptoss_matmul_mxfp4(const gptoss_bf16 *x, size_t m, size_t k, const uint8_t *blocks, const uint8_t *scales,
                        size_t n, const gptoss_bf16 *bias, gptoss_bf16 *y, size_t ldy, gptoss_bf16 *scratch,
                        size_t scratch_elems, size_t tile_rows);

/* Number of cached oneDNN primitives; drop them all (frees their memory). */
size_t gptoss_matmul_cache_size(void);
void gptoss_matmul_cache_clear(void);

/* ---------------------------------------------------------------- q8.c */

/*
 * The opt-in 8-bit dense layout ("q8", the GGUF Q8_0 idea; `gptoss repack --dense q8`). A weight W [n, k]
 * with k % 32 == 0 is
 *   q:      [n, k] int8, row-major, values in -127..127
 *   scales: [n, k / 32] uint16 holding IEEE binary16 bits, one per 32 consecutive values of a row
 * and value = q * scale. q * scale is exact in fp32 (8 x 11 significant bits), so the kernels below work on
 * the exact dequantized values and differ from each other only in fp32 summation order (except m > 8 on the
 * AVX-512 path, see gptoss_matmul_q8).
 *
 * Quantization rule (deterministic, every path, matches tests/test_q8.py's numpy twin bit for bit), per block
 * of 32 bf16 values w:
 *   amax  = max |w|;
 *   scale = binary16(amax / 127.0f): the fp32 quotient, rounded to fp16 to nearest, ties to even;
 *   q     = clamp(rint(w / (float)scale), -127, 127): the fp32 quotient by the fp16-rounded scale, rounded to
 *           nearest, ties to even (the clamp matters only for subnormal fp16 scales);
 *   scale 0 (an all-zero block, or amax so small that amax / 127 rounds to fp16 zero): every q = 0.
 * A block with an inf or NaN, or whose amax / 127 rounds beyond the fp16 range (amax / 127 >= 65520, i.e.
 * amax >= ~8.3e6), is refused with GPTOSS_ERR_OUT_OF_RANGE. On any error q and scales are left partly
 * written (blocks are done in parallel): their contents are unspecified and must be discarded.
 */
int gptoss_quantize_q8_rows(const gptoss_bf16 *w, size_t n, size_t k, int8_t *q, uint16_t *scales);

/*
 * out[i, :] = bf16(q[rows[i], :] * scale) for i < m (embedding lookups; a row range is rows = r0..r1-1),
 * rounded to nearest even. rows must be in 0..n_rows-1 (GPTOSS_ERR_OUT_OF_RANGE, nothing written, otherwise).
 *   out: [m, k] bf16 contiguous.
 */
int gptoss_dequantize_q8_rows(const int8_t *q, const uint16_t *scales, size_t n_rows, size_t k,
                              const int64_t *rows, size_t m, gptoss_bf16 *out);

/*
 * y[m, n] = x[m, k] W^T (+ bias[n]) with W [n, k] in q8 (k % 32 == 0), x bf16 with row stride ldx (>= k),
 * bias bf16 or NULL, y with row stride ldy (>= n) of y_dtype (GPTOSS_DTYPE_BF16 or _F32, as
 * gptoss_matmul_bf16). fp32 accumulation on every compute path:
 *  - m <= 8 (decode): a register kernel (q8.c) reads each weight once, widens 32 int8 values and their scale
 *    to exact fp32 and FMAs them with x widened to fp32; AVX-512 (zmm), AVX2 + FMA + F16C (ymm) or plain C
 *    (scalar path, software fp16). Rows of W are split between threads.
 *  - m > 8: W widened tile by tile and multiplied by oneDNN: on the AVX-512 BF16 path bf16 tiles (q * scale
 *    rounded to bf16, nearest even) into its bf16 matmul, about twice as fast as fp32 there; on the fp32 paths
 *    exact fp32 tiles into its fp32 GEMM (matmul.c's fp32 tiles).
 * The dispatch lives in matmul.c (it shares the tile buffers and primitive cache).
 */
int gptoss_matmul_q8(const gptoss_bf16 *x, size_t m, size_t k, size_t ldx, const int8_t *q, const uint16_t *scales,
                     size_t n, const gptoss_bf16 *bias, void *y, size_t ldy, int y_dtype);

/* ---------------------------------------------------------------- ops.c */

/* y[m, d] = x / sqrt(mean(x^2) + eps) * scale, per row, fp32 inside. y may equal x. */
int gptoss_rmsnorm(const gptoss_bf16 *x, const gptoss_bf16 *scale, size_t m, size_t d, float eps,
                   gptoss_bf16 *y);

/* x[i] = bf16(x[i] + y[i]) (the residual add). */
int gptoss_add_bf16(gptoss_bf16 *x, const gptoss_bf16 *y, size_t n);

/*
 * SwiGLU of interleaved pairs, as gpt-oss does it:
 *   h: [m, 2 * d] with glu = h[:, 0::2], lin = h[:, 1::2]
 *   glu = min(glu, limit); lin = clamp(lin, -limit, limit); out = glu * sigmoid(alpha * glu) * (lin + 1)
 *   out: [m, d]
 */
int gptoss_swiglu(const gptoss_bf16 *h, size_t m, size_t d, float limit, float alpha, gptoss_bf16 *out);

/*
 * Router: for each of m rows of logits [m, n_experts] (bf16), the k largest (ties: lower index first),
 * in descending order, and the softmax of those k values.
 *   indices: [m, k] int32; weights: [m, k] fp32
 */
int gptoss_topk_softmax(const gptoss_bf16 *logits, size_t m, size_t n_experts, size_t k, int32_t *indices,
                        float *weights);

/*
 * MoE combine: acc[rows[i], :] += weights[i] * y[i, :] for i < g (fp32 accumulator [n_rows_acc, d]).
 * rows must be < n_rows_acc.
 */
int gptoss_scatter_add_weighted(float *acc, size_t n_rows_acc, size_t d, const gptoss_bf16 *y, size_t g,
                                const int32_t *rows, const float *weights);

/* x[i] = bf16(x[i] + bf16(acc[i])): adds the MoE output (rounded to bf16 first, as the reference does). */
int gptoss_add_f32_to_bf16(gptoss_bf16 *x, const float *acc, size_t n);

/* ---------------------------------------------------------------- rope.c */

/*
 * YaRN (NTK-by-parts) inverse frequencies for head_dim/2 pairs and the cos/sin concentration (SPEC §4):
 *   inv_freq: [head_dim / 2] fp32
 */
int gptoss_rope_init(size_t head_dim, float theta, float scaling_factor, float ntk_alpha, float ntk_beta,
                     size_t initial_context_length, float *inv_freq, float *concentration);

/*
 * In-place rotation of x: [m, n_heads, head_dim] bf16 (row stride ldx elements between tokens), token i at
 * positions[i]. Half-split: the first head_dim/2 dims rotate with the last head_dim/2.
 * angle = (float)position * inv_freq[j]; cos and sin are scaled by concentration.
 */
int gptoss_rope_apply(gptoss_bf16 *x, size_t m, size_t n_heads, size_t head_dim, size_t ldx,
                      const int64_t *positions, const float *inv_freq, float concentration);

/* ---------------------------------------------------------------- attention.c */

/*
 * Causal attention of m query tokens over a KV cache, with GQA, learned sinks and an optional window.
 *   q:        [m, n_heads, head_dim] bf16, row stride ldq elements; query i is at position first_position + i
 *   k_cache, v_cache: [capacity, n_kv_heads, head_dim] bf16; the key/value of position j is in row j % capacity
 *   window:   0 for full causal attention, else query p sees keys j with p - window < j <= p
 *   sinks:    [n_heads] bf16, one extra logit per head that takes part in the softmax and has no value
 *   out:      [m, n_heads * head_dim] bf16 (row stride n_heads * head_dim)
 * kv head h serves q heads h * (n_heads / n_kv_heads) ... The cache must hold every key a query needs:
 * capacity >= first_position + m when window == 0, capacity >= min(first_position + m, window + m - 1)
 * otherwise (a sliding layer's ring needs no more rows than positions exist).
 */
int gptoss_attention(const gptoss_bf16 *q, size_t m, size_t ldq, size_t n_heads, size_t n_kv_heads,
                     size_t head_dim, const gptoss_bf16 *k_cache, const gptoss_bf16 *v_cache, size_t capacity,
                     size_t first_position, size_t window, const gptoss_bf16 *sinks, float scale,
                     gptoss_bf16 *out);

/*
 * Write m tokens' keys and values into the cache rows (first_position + i) % capacity.
 *   k, v: [m, n_kv_heads * head_dim] bf16 with row stride ld (so they can be column slices of the qkv output)
 */
int gptoss_kv_store(const gptoss_bf16 *k, const gptoss_bf16 *v, size_t m, size_t ld, size_t n_kv_heads,
                    size_t head_dim, gptoss_bf16 *k_cache, gptoss_bf16 *v_cache, size_t capacity,
                    size_t first_position);

/* ---------------------------------------------------------------- blocks.c */

/*
 * A decoder layer's blocks in single calls, each exactly the sequence of the kernels above that SPEC §4
 * describes (bit-identical to calling them one by one): for callers that would otherwise cross into the
 * library dozens of times per layer.
 */

/* The attention block's weights, all bf16 and used in place: norm [hidden]; either qkv_weight
 * [(nq + 2 nkv) hd, hidden] with qkv_bias (the original format's one tensor) or, with qkv_weight NULL,
 * q/k/v_weight [nq hd | nkv hd, hidden] with their biases; sinks [nq]; out_weight [hidden, nq hd], out_bias.
 * Biases may be NULL. The q/k/v and out projections may instead be q8 (the last four fields). */
struct gptoss_attention_weights {
    const gptoss_bf16 *norm;
    const gptoss_bf16 *qkv_weight, *qkv_bias;
    const gptoss_bf16 *q_weight, *q_bias, *k_weight, *k_bias, *v_weight, *v_bias;
    const gptoss_bf16 *sinks;
    const gptoss_bf16 *out_weight, *out_bias;
    /* The q8 layout (see q8.c above): with qkv_q8 non-NULL the fused qkv projection is gptoss_matmul_q8 on
     * qkv_q8 [(nq + 2 nkv) hd, hidden] and qkv_scales (qkv_bias stays bf16; qkv_weight and q/k/v_weight must
     * be NULL); with out_q8 non-NULL the out projection is q8 out_q8 [hidden, nq hd] and out_scales
     * (out_weight must be NULL). A bf16 weight beside its q8 one: GPTOSS_ERR_OUT_OF_RANGE; q8 without its
     * scales: GPTOSS_ERR_NULL_POINTER. Everything else runs exactly as with bf16 weights. */
    const int8_t *qkv_q8;
    const uint16_t *qkv_scales;
    const int8_t *out_q8;
    const uint16_t *out_scales;
};

/* Scratch elements (bf16) the attention block needs for m tokens; 0 if the sizes overflow. */
size_t gptoss_attention_block_scratch_elems(size_t m, size_t hidden, size_t n_heads, size_t n_kv_heads,
                                            size_t head_dim);

/*
 * x [m, hidden] += attention(norm(x)) in place, for tokens at positions first_position.. : RMSNorm (eps),
 * q/k/v projection, RoPE (inv_freq, concentration as from gptoss_rope_init), keys and values stored in the
 * cache (as gptoss_kv_store), attention with sinks and window (as gptoss_attention, scale = 1/sqrt(hd)), the
 * output projection and the residual add. scratch: at least gptoss_attention_block_scratch_elems() bf16.
 */
int gptoss_attention_block(gptoss_bf16 *x, size_t m, size_t hidden, size_t n_heads, size_t n_kv_heads,
                           size_t head_dim, const struct gptoss_attention_weights *w, float eps,
                           const float *inv_freq, float concentration, float scale, gptoss_bf16 *k_cache,
                           gptoss_bf16 *v_cache, size_t capacity, size_t first_position, size_t window,
                           gptoss_bf16 *scratch, size_t scratch_elems);

/*
 * The router: t = RMSNorm(x) [m, hidden] (kept: the experts' input), logits = t W_gate^T + b [m, n_experts]
 * (bf16), then the top k of each row with their softmax weights rounded to bf16 (as both references keep
 * them): indices [m, k] int32, weights [m, k] fp32.
 */
int gptoss_moe_route(const gptoss_bf16 *x, size_t m, size_t hidden, const gptoss_bf16 *norm, float eps,
                     const gptoss_bf16 *gate_weight, const gptoss_bf16 *gate_bias, size_t n_experts, size_t k,
                     gptoss_bf16 *t, gptoss_bf16 *logits, int32_t *indices, float *weights);

/* Scratch elements (bf16) one expert's MLP needs for m tokens; 0 if the sizes overflow. */
size_t gptoss_expert_mlp_scratch_elems(size_t m, size_t hidden, size_t intermediate);

/*
 * One routed expert over the tokens that picked it: for the tokens i of t [m, hidden] whose router indices
 * [m, k] name `expert`, y = SwiGLU(t_i W1^T + b1) W2^T + b2 (MXFP4 weights as gptoss_matmul_mxfp4 takes
 * them: mlp1 [2 intermediate, hidden], mlp2 [hidden, intermediate]; tile/tile_elems its dequantization
 * scratch, tiles sized automatically) and acc[i] += weights[i, j] * y (fp32 [m, hidden]). An expert no
 * token picked adds nothing. scratch: at least gptoss_expert_mlp_scratch_elems() bf16.
 */
int gptoss_expert_mlp(const gptoss_bf16 *t, size_t m, size_t hidden, size_t intermediate, const int32_t *indices,
                      const float *weights, size_t k, int32_t expert, const uint8_t *mlp1_blocks,
                      const uint8_t *mlp1_scales, const gptoss_bf16 *mlp1_bias, const uint8_t *mlp2_blocks,
                      const uint8_t *mlp2_scales, const gptoss_bf16 *mlp2_bias, float swiglu_limit,
                      float swiglu_alpha, float *acc, gptoss_bf16 *scratch, size_t scratch_elems,
                      gptoss_bf16 *tile, size_t tile_elems);

/* ---------------------------------------------------------------- residency.c */

/*
 * Which pages of [addr, addr + length) of a mapping are in memory (for a file mapping: in the page cache),
 * without faulting any in: vec[i] = 1 or 0 for the i-th page of the range rounded out to whole pages, so vec
 * holds (addr % page + length + page - 1) / page bytes. GPTOSS_ERR_OUT_OF_RANGE if part of the range is
 * not mapped. For files the caller neither owns nor may write, Linux reports only pages this process maps.
 */
int gptoss_mincore(const void *addr, size_t length, uint8_t *vec);

/* ---------------------------------------------------------------- sigbus.c */

/*
 * Guard a file mapping [base, base + length) of `path`: a SIGBUS inside it (the file was truncated under the
 * mapping, or a page of it could not be read from disk) prints "gptoss: error: PATH: reading byte N of the
 * mapped file failed (SIGBUS) ..." on stderr and ends the process with status 1, instead of "Bus error (core
 * dumped)". The handler is installed on the first call; a SIGBUS outside every guarded range goes to the handler that was there before. Up to 1024 guards
 * (GPTOSS_ERR_NO_MEMORY beyond); *slot receives the guard's number for gptoss_unguard_mapping, which must be
 * called before the mapping goes away.
 */
int gptoss_guard_mapping(const void *base, size_t length, const char *path, int *slot);
int gptoss_unguard_mapping(int slot);

/* ---------------------------------------------------------------- membench.c */

/*
 * Best read bandwidth over `repeats` passes of all threads streaming their slice of buffer (make it much
 * larger than the caches to measure memory). For benchmarks: the limit a memory-bound decode can reach.
 */
int gptoss_read_bandwidth(const void *buffer, size_t nbytes, int repeats, double *bytes_per_second);

#ifdef __cplusplus
}
#endif

#endif /* GPTOSS_H */
