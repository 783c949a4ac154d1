/* quantize_legacy.c - quantizers of the 32-element block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)
 * and the plain conversions (F32, F16, BF16), following ggml's quantize_row_*_ref; plus the
 * type -> quantizer dispatch. Block layouts (little-endian, packed):
 *   Q4_0 fp16 d | 16 nibbles        Q4_1 fp16 d, fp16 m | 16 nibbles
 *   Q5_0 fp16 d | u32 qh | 16       Q5_1 fp16 d, fp16 m | u32 qh | 16       Q8_0 fp16 d | 32 int8
 * Element j of a block is the low nibble of byte j, element j + 16 the high nibble. */
#include <float.h>
#include <math.h>
#include <string.h>

#include "core/fp16.h"
#include "core/util.h"
#include "quant/quantize.h"
#include "quant/qtypes.h"

#define QK 32

/* The value of largest magnitude in a block, keeping its sign (the first one on ties). */
static float signed_absmax(const float *x, int n)
{
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < n; j++) {
        if (amax < fabsf(x[j])) {
            amax = fabsf(x[j]);
            max = x[j];
        }
    }
    return max;
}

static void min_max(const float *x, int n, float *lo, float *hi)
{
    float mn = FLT_MAX, mx = -FLT_MAX;
    for (int j = 0; j < n; j++) {
        if (x[j] < mn) mn = x[j];
        if (x[j] > mx) mx = x[j];
    }
    *lo = mn;
    *hi = mx;
}

void quantize_row_q4_0(const float *x, void *vy, int64_t n)
{
    uint8_t *y = vy;
    for (int64_t b = 0; b < n / QK; b++, x += QK, y += 18) {
        const float d = signed_absmax(x, QK) / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        quant_store_u16(y, forge_f32_to_fp16(d));
        for (int j = 0; j < QK / 2; j++) {
            /* x * id lies in [-8, 8]: adding 8.5 and truncating rounds to 0..16, 16 is clamped */
            int lo = (int)(x[j] * id + 8.5f), hi = (int)(x[j + QK / 2] * id + 8.5f);
            lo = lo < 15 ? lo : 15;
            hi = hi < 15 ? hi : 15;
            y[2 + j] = (uint8_t)(lo | (hi << 4));
        }
    }
}

void quantize_row_q4_1(const float *x, void *vy, int64_t n)
{
    uint8_t *y = vy;
    for (int64_t b = 0; b < n / QK; b++, x += QK, y += 20) {
        float mn, mx;
        min_max(x, QK, &mn, &mx);
        const float d = (mx - mn) / 15.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        quant_store_u16(y, forge_f32_to_fp16(d));
        quant_store_u16(y + 2, forge_f32_to_fp16(mn));
        for (int j = 0; j < QK / 2; j++) {
            int lo = (int)((x[j] - mn) * id + 0.5f), hi = (int)((x[j + QK / 2] - mn) * id + 0.5f);
            lo = lo < 15 ? lo : 15;
            hi = hi < 15 ? hi : 15;
            y[4 + j] = (uint8_t)(lo | (hi << 4));
        }
    }
}

/* Pack 32 5-bit values: low nibbles into qs (16 bytes), the fifth bits into the u32 qh. */
static void pack_q5(const uint8_t *q, uint8_t *qh_out, uint8_t *qs)
{
    uint32_t qh = 0;
    for (int j = 0; j < QK / 2; j++) {
        qs[j] = (uint8_t)((q[j] & 0x0f) | ((q[j + QK / 2] & 0x0f) << 4));
        qh |= (uint32_t)((q[j] >> 4) & 1) << j;
        qh |= (uint32_t)((q[j + QK / 2] >> 4) & 1) << (j + QK / 2);
    }
    for (int k = 0; k < 4; k++)
        qh_out[k] = (uint8_t)(qh >> (8 * k));
}

void quantize_row_q5_0(const float *x, void *vy, int64_t n)
{
    uint8_t *y = vy, q[QK];
    for (int64_t b = 0; b < n / QK; b++, x += QK, y += 22) {
        const float d = signed_absmax(x, QK) / -16.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        quant_store_u16(y, forge_f32_to_fp16(d));
        for (int j = 0; j < QK; j++) {
            int v = (int)(x[j] * id + 16.5f);
            q[j] = (uint8_t)(v < 31 ? v : 31);
        }
        pack_q5(q, y + 2, y + 6);
    }
}

void quantize_row_q5_1(const float *x, void *vy, int64_t n)
{
    uint8_t *y = vy, q[QK];
    for (int64_t b = 0; b < n / QK; b++, x += QK, y += 24) {
        float mn, mx;
        min_max(x, QK, &mn, &mx);
        const float d = (mx - mn) / 31.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        quant_store_u16(y, forge_f32_to_fp16(d));
        quant_store_u16(y + 2, forge_f32_to_fp16(mn));
        /* no clamp here in ggml either: (x - min) * id + 0.5 stays below 32 */
        for (int j = 0; j < QK; j++)
            q[j] = (uint8_t)(int)((x[j] - mn) * id + 0.5f);
        pack_q5(q, y + 4, y + 8);
    }
}

void quantize_row_q8_0(const float *x, void *vy, int64_t n)
{
    uint8_t *y = vy;
    for (int64_t b = 0; b < n / QK; b++, x += QK, y += 34) {
        float amax = 0.0f;
        for (int j = 0; j < QK; j++)
            amax = amax > fabsf(x[j]) ? amax : fabsf(x[j]);
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        quant_store_u16(y, forge_f32_to_fp16(d));
        for (int j = 0; j < QK; j++)
            y[2 + j] = (uint8_t)(int8_t)roundf(x[j] * id);
    }
}

void quantize_row_f32(const float *x, void *y, int64_t n)
{
    memcpy(y, x, (size_t)n * sizeof(float));
}

void quantize_row_f16(const float *x, void *vy, int64_t n)
{
    uint8_t *y = vy;
    for (int64_t i = 0; i < n; i++)
        quant_store_u16(y + 2 * i, forge_f32_to_fp16(x[i]));
}

void quantize_row_bf16(const float *x, void *vy, int64_t n)
{
    uint8_t *y = vy;
    for (int64_t i = 0; i < n; i++)
        quant_store_u16(y + 2 * i, forge_f32_to_bf16(x[i]));
}

quant_row_fn quant_row_function(int t)
{
    const forge_type_traits *tt = forge_type_traits_get(t); /* the one place a type is described */
    return tt ? tt->quantize_row : NULL;
}

int quant_quantize_row(int t, const float *x, void *y, int64_t n)
{
    quant_row_fn fn = quant_row_function(t);
    int64_t bs = ggml_type_block_size(t);
    if (!fn) return FORGE_E_UNSUPPORTED;
    if (n < 0 || bs <= 0 || n % bs != 0) return FORGE_E_INVALID;
    fn(x, y, n);
    return FORGE_OK;
}
