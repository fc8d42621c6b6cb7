/* bf16 <-> fp32 conversion of whole arrays. */
#include "gptoss.h"

#include "bf16.h"

GPTOSS_API int gptoss_bf16_to_f32(const gptoss_bf16 *x, float *y, size_t n) {
    if (!x || !y) return GPTOSS_ERR_NULL_POINTER;
    for (size_t i = 0; i < n; i++) y[i] = bf16_to_f32(x[i]);
    return GPTOSS_OK;
}

GPTOSS_API int gptoss_f32_to_bf16(const float *x, gptoss_bf16 *y, size_t n) {
    if (!x || !y) return GPTOSS_ERR_NULL_POINTER;
    for (size_t i = 0; i < n; i++) y[i] = f32_to_bf16(x[i]);
    return GPTOSS_OK;
}
