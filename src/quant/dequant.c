/* dequant.c - scalar reference conversion of ggml tensor types to float32 (forge_dequantize).
 * These loops are the specification the SIMD and GPU kernels are tested against. */
#include <string.h>

#include "core/fp16.h"
#include "core/util.h"

static uint16_t load_u16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static void dequant_q8_0(const uint8_t *src, float *dst, int64_t n)
{
    for (int64_t b = 0; b < n / 32; b++, src += 34, dst += 32) {
        float d = forge_fp16_to_f32(load_u16(src));
        for (int j = 0; j < 32; j++) dst[j] = (float)(int8_t)src[2 + j] * d;
    }
}

static void dequant_q4_0(const uint8_t *src, float *dst, int64_t n)
{
    for (int64_t b = 0; b < n / 32; b++, src += 18, dst += 32) {
        float d = forge_fp16_to_f32(load_u16(src));
        for (int j = 0; j < 16; j++) {
            dst[j] = (float)((src[2 + j] & 0x0f) - 8) * d;
            dst[j + 16] = (float)((src[2 + j] >> 4) - 8) * d;
        }
    }
}

int forge_dequantize(int t, const void *src, float *dst, int64_t n, forge_err *err)
{
    const uint8_t *p = src;
    int64_t bs = ggml_type_block_size(t);
    if (n < 0 || bs <= 0 || n % bs != 0)
        return forge_err_set(err, FORGE_E_INVALID, "dequantize %s: %lld elements is not a multiple of the block size %lld",
                             ggml_type_name(t), (long long)n, (long long)bs);
    switch (t) {
    case GGML_TYPE_F32: memcpy(dst, src, (size_t)n * sizeof(float)); return FORGE_OK;
    case GGML_TYPE_F16:
        for (int64_t i = 0; i < n; i++) dst[i] = forge_fp16_to_f32(load_u16(p + 2 * i));
        return FORGE_OK;
    case GGML_TYPE_BF16:
        for (int64_t i = 0; i < n; i++) dst[i] = forge_bf16_to_f32(load_u16(p + 2 * i));
        return FORGE_OK;
    case GGML_TYPE_Q8_0: dequant_q8_0(p, dst, n); return FORGE_OK;
    case GGML_TYPE_Q4_0: dequant_q4_0(p, dst, n); return FORGE_OK;
    default:
        return forge_err_set(err, FORGE_E_UNSUPPORTED, "dequantize: tensor type %s (%d) is not supported yet",
                             ggml_type_name(t), t);
    }
}
