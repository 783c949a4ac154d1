/* quantize.c - reference quantizers (ggml's quantize_row_q8_0_ref / quantize_row_q4_0_ref, used
 * to write model files) and the scalar activation converters kern_matmul applies to X before a
 * dot product (Q8_0 as ggml's CPU backend quantizes activations, F16, BF16). The SIMD converters
 * in matmul_<isa>.c must produce the same bytes as these. */
#include <math.h>

#include "core/fp16.h"
#include "cpu/kern_impl.h"

void kern_quantize_row_q8_0(const float *x, void *dst, int64_t n)
{
    uint8_t *y = dst;
    for (int64_t b = 0; b < n / KERN_QK; b++, x += KERN_QK, y += KERN_Q8_0_BYTES) {
        float amax = 0.0f;
        for (int j = 0; j < KERN_QK; j++)
            amax = fmaxf(amax, fabsf(x[j]));
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        kern_store_u16(y, forge_f32_to_fp16(d));
        for (int j = 0; j < KERN_QK; j++)
            y[2 + j] = (uint8_t)(int8_t)roundf(x[j] * id);
    }
}

void kern_quantize_row_q4_0(const float *x, void *dst, int64_t n)
{
    uint8_t *y = dst;
    for (int64_t b = 0; b < n / KERN_QK; b++, x += KERN_QK, y += KERN_Q4_0_BYTES) {
        float amax = 0.0f, max = 0.0f; /* max keeps the sign of the largest magnitude */
        for (int j = 0; j < KERN_QK; j++) {
            if (amax < fabsf(x[j])) {
                amax = fabsf(x[j]);
                max = x[j];
            }
        }
        float d = max / -8.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        kern_store_u16(y, forge_f32_to_fp16(d));
        for (int j = 0; j < KERN_QK / 2; j++) {
            int lo = (int8_t)(x[j] * id + 8.5f);
            int hi = (int8_t)(x[j + KERN_QK / 2] * id + 8.5f);
            if (lo > 15) lo = 15;
            if (hi > 15) hi = 15;
            y[2 + j] = (uint8_t)(lo | (hi << 4));
        }
    }
}

/* Activations for Q8_0/Q4_0 weights, in the layout of kern_impl.h. The quantization follows
 * ggml's CPU backend as it runs on the machines we compare against: on x86 its SIMD
 * quantize_row_q8_0 uses id = 127/amax and rounds half to even; on AArch64 it uses id = 1/d and
 * rounds half to even. (The _ref quantizer above uses 1/d and rounds half away from zero; the
 * results differ in rare last-place cases.) */
static void cvt_q8(const float *x, void *dst, int64_t n, int32_t corr_mul)
{
    uint8_t *qs = dst;
    float *dv = (float *)(void *)(qs + n);
    int32_t *ncorr = (int32_t *)(void *)(qs + n + n / 8);
    for (int64_t b = 0; b < n / KERN_QK; b++, x += KERN_QK) {
        float amax = 0.0f;
        for (int j = 0; j < KERN_QK; j++)
            amax = fmaxf(amax, fabsf(x[j]));
        float d = amax / 127.0f;
#if defined(__aarch64__)
        float id = d != 0.0f ? 1.0f / d : 0.0f;
#else
        float id = amax != 0.0f ? 127.0f / amax : 0.0f;
#endif
        int32_t sum = 0;
        for (int j = 0; j < KERN_QK; j++) {
            int8_t q = (int8_t)nearbyintf(x[j] * id);
            qs[b * KERN_QK + j] = (uint8_t)q;
            sum += q;
        }
        dv[b] = forge_fp16_to_f32(forge_f32_to_fp16(d));
        ncorr[b] = -corr_mul * sum;
    }
}

void kern_cvt_q8_for_q4_0_scalar(const float *x, void *dst, int64_t n)
{
    cvt_q8(x, dst, n, 8);
}

void kern_cvt_q8_for_q8_0_scalar(const float *x, void *dst, int64_t n)
{
    cvt_q8(x, dst, n, 128);
}

void kern_cvt_f16_scalar(const float *x, void *dst, int64_t n)
{
    float *y = dst;
    for (int64_t i = 0; i < n; i++)
        y[i] = forge_fp16_to_f32(forge_f32_to_fp16(x[i]));
}

void kern_cvt_bf16_scalar(const float *x, void *dst, int64_t n)
{
    uint8_t *y = dst;
    for (int64_t i = 0; i < n; i++)
        kern_store_u16(y + 2 * i, forge_f32_to_bf16(x[i]));
}
