/* quantize_iq4.c - quantizers of the non-linear 4-bit types IQ4_NL (32-element blocks: fp16 d |
 * 16 bytes) and IQ4_XS (256-element super-blocks: fp16 d | u16 scales_h | scales_l[4] | 128),
 * following ggml's quantize_iq4_nl / quantize_iq4_xs without an importance matrix (what
 * llama-quantize runs: 7 extra scale trials either side, weights x^2). Each value is the index
 * of the nearest of 16 fixed levels times a block scale. Float operations in ggml's order. */
#include <math.h>
#include <string.h>

#include "core/fp16.h"
#include "quant/quantize.h"

static const int8_t iq4_levels[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                      1,    13,   25,  38,  53,  69,  89,  113};

/* Index of the level nearest to x (ties to the lower level), by bisection as ggml does. */
static int nearest_level(float x)
{
    if (x <= iq4_levels[0]) return 0;
    if (x >= iq4_levels[15]) return 15;
    int lo = 0, hi = 15;
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (x < iq4_levels[mid])
            hi = mid;
        else
            lo = mid;
    }
    return x - (float)iq4_levels[hi - 1] < (float)iq4_levels[hi] - x ? hi - 1 : hi;
}

#define NTRY 7

/* Best scale of one 32-element block (0 for an all-zero block); levels into L. */
static float iq4_block_scale(const float *xb, uint8_t *L)
{
    float weight[32];
    float amax = 0, max = 0;
    for (int j = 0; j < 32; j++)
        weight[j] = xb[j] * xb[j];
    for (int j = 0; j < 32; j++) {
        float ax = fabsf(xb[j]);
        if (ax > amax) {
            amax = ax;
            max = xb[j];
        }
    }
    if (amax < QUANT_GROUP_MAX_EPS) return 0;
    float d = -max / (float)iq4_levels[0];
    float id = 1 / d;
    float sumqx = 0, sumq2 = 0;
    for (int j = 0; j < 32; j++) {
        int l = nearest_level(id * xb[j]);
        L[j] = (uint8_t)l;
        float q = iq4_levels[l];
        sumqx += weight[j] * q * xb[j];
        sumq2 += weight[j] * q * q;
    }
    d = sumqx / sumq2;
    float best = d * sumqx;
    for (int itry = -NTRY; itry <= NTRY; itry++) {
        id = (float)(itry + iq4_levels[0]) / max;
        sumqx = sumq2 = 0;
        for (int j = 0; j < 32; j++) {
            float q = iq4_levels[nearest_level(id * xb[j])];
            sumqx += weight[j] * q * xb[j];
            sumq2 += weight[j] * q * q;
        }
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
            d = sumqx / sumq2;
            best = d * sumqx;
        }
    }
    return d;
}

/* Element j of a 32-block in the low nibble of byte j, element j + 16 in the high nibble. */
static void pack_nibbles(const uint8_t *L, uint8_t *q, int n)
{
    for (int i = 0; i < n / 32; i++)
        for (int j = 0; j < 16; j++)
            q[16 * i + j] = (uint8_t)(L[32 * i + j] | (L[32 * i + 16 + j] << 4));
}

void quantize_row_iq4_nl(const float *x, void *vy, int64_t n)
{
    uint8_t *y = vy;
    uint8_t L[32];
    for (int64_t b = 0; b < n / 32; b++, x += 32, y += 18) {
        memset(L, 0, sizeof L);
        float d = iq4_block_scale(x, L);
        quant_store_u16(y, forge_f32_to_fp16(d));
        /* the levels are chosen again against the final scale (unrounded, as ggml) */
        float id = d != 0 ? 1 / d : 0;
        for (int j = 0; j < 32; j++)
            L[j] = (uint8_t)nearest_level(id * x[j]);
        pack_nibbles(L, y + 2, 32);
    }
}

void quantize_row_iq4_xs(const float *x, void *vy, int64_t n)
{
    uint8_t *y = vy;
    uint8_t L[256];
    float scales[8];
    for (int64_t b = 0; b < n / 256; b++, x += 256, y += 136) {
        float max_scale = 0, amax_scale = 0;
        memset(L, 0, sizeof L);
        for (int ib = 0; ib < 8; ib++) {
            scales[ib] = iq4_block_scale(x + 32 * ib, L + 32 * ib);
            float abs_d = fabsf(scales[ib]);
            if (abs_d > amax_scale) {
                amax_scale = abs_d;
                max_scale = scales[ib];
            }
        }
        uint16_t scales_h = 0;
        uint8_t *scales_l = y + 4;
        memset(scales_l, 0, 4);
        float d = -max_scale / 32;
        quant_store_u16(y, forge_f32_to_fp16(d));
        float id = d != 0 ? 1 / d : 0.f;
        for (int ib = 0; ib < 8; ib++) {
            int l = quant_clampi(quant_nearest_int(id * scales[ib]), -32, 31);
            float dl = d * (float)l;
            float idl = dl != 0 ? 1 / dl : 0.f;
            for (int j = 0; j < 32; j++)
                L[32 * ib + j] = (uint8_t)nearest_level(idl * x[32 * ib + j]);
            l += 32;
            scales_l[ib / 2] |= (uint8_t)((l & 0xf) << (4 * (ib % 2)));
            scales_h |= (uint16_t)((l >> 4) << (2 * ib));
        }
        quant_store_u16(y + 2, scales_h);
        pack_nibbles(L, y + 8, 256);
    }
}
