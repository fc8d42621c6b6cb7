/* Declarations shared between libgptoss's translation units (not part of the public API). */
#ifndef GPTOSS_INTERNAL_H
#define GPTOSS_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "gptoss.h"

/* runtime.c: the configured thread count, also made the calling thread's OpenMP default. OpenMP keeps
 * omp_set_num_threads() per thread, so a kernel called from a thread other than the one that configured the
 * count (a server's worker) would otherwise run with that thread's own default. Every entry point that
 * starts a parallel region or runs oneDNN calls this first. */
int gptoss_sync_threads(void);

/* mxfp4.c: validated once per matmul by the caller, then called per tile; single-threaded. */
void gptoss_dequantize_mxfp4_unchecked(const uint8_t *blocks, const uint8_t *scales, size_t blocks_per_row,
                                        size_t row_begin, size_t row_end, gptoss_bf16 *out);
/* mxfp4.c: [scale][code] -> bf16 bits of the MXFP4 value (exact), built at load time, read-only after. */
extern uint16_t gptoss_mxfp4_bf16_lut[256][16];
/* mxfp4.c: n_blocks consecutive blocks, unchecked, single-threaded. */
void gptoss_dequantize_mxfp4_blocks(const uint8_t *blocks, const uint8_t *scales, size_t n_blocks,
                                    gptoss_bf16 *out);

/* gemv.c: y[0:m, r0:r1] = x[m, k] W[r0:r1, k]^T + bias for m <= GEMV_MAX_ROWS on the fp32 compute path,
 * weights read once and widened in registers. x is fp32 [m, k] contiguous; single-threaded over the rows
 * given, so callers split rows between threads. y_dtype as in gptoss_matmul_bf16. */
enum { GEMV_MAX_ROWS = 8 };
void gptoss_gemv_bf16_rows(const float *x, size_t m, size_t k, const gptoss_bf16 *w, const gptoss_bf16 *bias,
                           size_t r0, size_t r1, void *y, size_t ldy, int y_dtype);
void gptoss_gemv_mxfp4_rows(const float *x, size_t m, size_t k, const uint8_t *blocks, const uint8_t *scales,
                            const gptoss_bf16 *bias, size_t r0, size_t r1, gptoss_bf16 *y, size_t ldy);
/* gemv.c, AVX-512 BF16 path: the same product from bf16 x (row stride ldx), blocks decoded to bf16 in
 * registers (VPERMW on the table above) and multiplied with VDPBF16PS. */
void gptoss_gemv_mxfp4_rows_bf16(const gptoss_bf16 *x, size_t m, size_t k, size_t ldx, const uint8_t *blocks,
                                 const uint8_t *scales, const gptoss_bf16 *bias, size_t r0, size_t r1,
                                 gptoss_bf16 *y, size_t ldy);
/* Whether gptoss_gemv_mxfp4_rows wants x with each 32-value block deinterleaved: x[32b + 2j] at 32b + j
 * and x[32b + 2j + 1] at 32b + 16 + j (the order its AVX2 loop decodes the weights in). */
int gptoss_gemv_mxfp4_deinterleaved(void);

/* q8.c: the q8 layout's pieces gptoss_matmul_q8 (matmul.c) runs. Software fp16 conversions (round to nearest
 * even, the quantizer's rule); rows [r0, r1) of a q8 matrix widened to exact fp32 (out [r1 - r0, k]); and the
 * register kernel for m <= GEMV_MAX_ROWS on every path (AVX-512, AVX2 + FMA + F16C, scalar), x fp32 [m, k]
 * contiguous, single-threaded over the rows given, y_dtype as in gptoss_matmul_bf16. */
float gptoss_f16_to_f32(uint16_t h);
uint16_t gptoss_f32_to_f16(float f);
void gptoss_widen_q8_rows(const int8_t *q, const uint16_t *scales, size_t k, size_t r0, size_t r1, float *out);
/* The same rounded to bf16 (AVX-512 BF16 CPUs only). */
void gptoss_widen_q8_rows_bf16(const int8_t *q, const uint16_t *scales, size_t k, size_t r0, size_t r1,
                               gptoss_bf16 *out);
void gptoss_gemv_q8_rows(const float *x, size_t m, size_t k, const int8_t *q, const uint16_t *scales,
                         const gptoss_bf16 *bias, size_t r0, size_t r1, void *y, size_t ldy, int y_dtype);

#endif
