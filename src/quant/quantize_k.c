/* quantize_k.c - quantizers of the K-quant super-block types (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K:
 * 256 elements each), following ggml's quantize_row_qN_K_ref, which is what llama-quantize runs
 * without an importance matrix. Each super-block is split into 16- or 32-element sub-blocks; a
 * sub-block gets its own scale (and min) found by a small search (make_qx / make_q3 /
 * make_qkx2 below), and the sub-block scales are themselves quantized against one fp16 scale.
 * Float arithmetic is kept in ggml's order and precision (float, no fused multiply-add) because
 * the bytes must match llama-quantize's exactly. Layouts (ggml-common.h), in order:
 *   Q2_K scales[16] qs[64] d dmin          Q3_K hmask[32] qs[64] scales[12] d
 *   Q4_K d dmin scales[12] qs[128]         Q5_K d dmin scales[12] qh[32] qs[128]
 *   Q6_K ql[128] qh[64] scales[16] d */
#include <math.h>
#include <string.h>

#include "core/fp16.h"
#include "quant/quantize.h"

#define QK_K 256

/* Symmetric quantization of n values to [-nmax, nmax - 1] (stored + nmax in L) with weights
 * w = x^2, trying 19 scales around nmax / max|x| and keeping the one with the least weighted
 * squared error (ggml make_qx_quants, rmse_type 1, no importance weights). Returns the scale. */
static float make_qx_quants(int n, int nmax, const float *x, int8_t *L)
{
    float max = 0, amax = 0;
    for (int i = 0; i < n; i++) {
        float ax = fabsf(x[i]);
        if (ax > amax) {
            amax = ax;
            max = x[i];
        }
    }
    if (amax < QUANT_GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.f;
    }
    float iscale = (float)(-nmax) / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; i++) {
        int l = quant_clampi(quant_nearest_int(iscale * x[i]), -nmax, nmax - 1);
        L[i] = (int8_t)(l + nmax);
        float w = x[i] * x[i];
        sumlx += w * x[i] * (float)l;
        suml2 += w * (float)l * (float)l;
    }
    float scale = suml2 != 0 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; is++) {
        if (is == 0) continue;
        iscale = -((float)nmax + 0.1f * (float)is) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; i++) {
            int l = quant_clampi(quant_nearest_int(iscale * x[i]), -nmax, nmax - 1);
            float w = x[i] * x[i];
            sumlx += w * x[i] * (float)l;
            suml2 += w * (float)l * (float)l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; i++)
                L[i] = (int8_t)(nmax +
                                quant_clampi(quant_nearest_int(iscale * x[i]), -nmax, nmax - 1));
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

/* Symmetric 3-bit-style quantization to [-nmax, nmax - 1] with weights x^2, refined by moving
 * single values while the weighted error drops (ggml make_q3_quants, do_rmse). L gets l + nmax. */
static float make_q3_quants(int n, int nmax, const float *x, int8_t *L)
{
    float max = 0, amax = 0;
    for (int i = 0; i < n; i++) {
        float ax = fabsf(x[i]);
        if (ax > amax) {
            amax = ax;
            max = x[i];
        }
    }
    if (amax < QUANT_GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.f;
    }
    float iscale = (float)(-nmax) / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; i++) {
        int l = quant_clampi(quant_nearest_int(iscale * x[i]), -nmax, nmax - 1);
        L[i] = (int8_t)l;
        float w = x[i] * x[i];
        sumlx += w * x[i] * (float)l;
        suml2 += w * (float)l * (float)l;
    }
    for (int itry = 0; itry < 5; itry++) {
        int n_changed = 0;
        for (int i = 0; i < n; i++) {
            float w = x[i] * x[i];
            float slx = sumlx - w * x[i] * (float)L[i];
            if (slx > 0) {
                float sl2 = suml2 - w * (float)L[i] * (float)L[i];
                int new_l = quant_clampi(quant_nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1);
                if (new_l != L[i]) {
                    slx += w * x[i] * (float)new_l;
                    sl2 += w * (float)new_l * (float)new_l;
                    if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (int8_t)new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed++;
                    }
                }
            }
        }
        if (!n_changed) break;
    }
    for (int i = 0; i < n; i++)
        L[i] = (int8_t)(L[i] + nmax);
    return sumlx / suml2;
}

/* Asymmetric quantization x ~ scale * L - the_min, L in [0, nmax], with per-value weights:
 * start from the min/max grid, then try nstep + 1 grids and refit scale and min by weighted
 * least squares, keeping the best by weighted |error| (use_mad) or squared error (ggml
 * make_qkx2_quants). Returns the scale; *the_min gets the (non-negative) min. */
static float make_qkx2_quants(int n, int nmax, const float *x, const float *weights, uint8_t *L,
                              float *the_min, uint8_t *Laux, float rmin, float rdelta, int nstep,
                              bool use_mad)
{
    float min = x[0], max = x[0];
    float sum_w = weights[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; i++) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        float w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if (min > 0) min = 0;
    if (max == min) {
        memset(L, 0, (size_t)n);
        *the_min = -min;
        return 0.f;
    }
    float iscale = (float)nmax / (max - min);
    float scale = 1 / iscale;
    float best_mad = 0;
    for (int i = 0; i < n; i++) {
        int l = quant_nearest_int(iscale * (x[i] - min));
        L[i] = (uint8_t)quant_clampi(l, 0, nmax);
        float diff = scale * (float)L[i] + min - x[i];
        diff = use_mad ? fabsf(diff) : diff * diff;
        best_mad += weights[i] * diff;
    }
    if (nstep < 1) {
        *the_min = -min;
        return scale;
    }
    for (int is = 0; is <= nstep; is++) {
        iscale = (rmin + rdelta * (float)is + (float)nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; i++) {
            int l = quant_clampi(quant_nearest_int(iscale * (x[i] - min)), 0, nmax);
            Laux[i] = (uint8_t)l;
            float w = weights[i];
            sum_l += w * (float)l;
            sum_l2 += w * (float)l * (float)l;
            sum_xl += w * (float)l * x[i];
        }
        float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float mad = 0;
            for (int i = 0; i < n; i++) {
                float diff = this_scale * (float)Laux[i] + this_min - x[i];
                diff = use_mad ? fabsf(diff) : diff * diff;
                mad += weights[i] * diff;
            }
            if (mad < best_mad) {
                memcpy(L, Laux, (size_t)n);
                best_mad = mad;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

/* 6-bit scale j and min j of the 12-byte Q4_K/Q5_K scales field. */
static void get_scale_min_k4(int j, const uint8_t *q, uint8_t *d, uint8_t *m)
{
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4));
    }
}

static void set_scale_min_k4(int j, uint8_t *q, uint8_t ls, uint8_t lm)
{
    if (j < 4) {
        q[j] = ls;
        q[j + 4] = lm;
    } else {
        q[j + 4] = (uint8_t)((ls & 0xF) | ((lm & 0xF) << 4));
        q[j - 4] |= (uint8_t)((ls >> 4) << 6);
        q[j - 0] |= (uint8_t)((lm >> 4) << 6);
    }
}

/* Four 2-bit values from 32-element quarters of each 128 into one byte (Q2_K and Q3_K qs). */
static void pack_2bit(const uint8_t *L, uint8_t *qs)
{
    for (int j = 0; j < QK_K; j += 128)
        for (int l = 0; l < 32; l++)
            qs[j / 4 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) |
                                      (L[j + l + 96] << 6));
}

void quantize_row_q2_k(const float *x, void *vy, int64_t n)
{
    uint8_t *y = vy;
    uint8_t L[QK_K], Laux[16];
    float weights[16], mins[QK_K / 16], scales[QK_K / 16];
    const float q4scale = 15.f;
    for (int64_t b = 0; b < n / QK_K; b++, x += QK_K, y += 84) {
        uint8_t *sc = y, *qs = y + 16;
        float max_scale = 0, max_min = 0;
        for (int j = 0; j < QK_K / 16; j++) {
            for (int l = 0; l < 16; l++)
                weights[l] = fabsf(x[16 * j + l]);
            scales[j] = make_qkx2_quants(16, 3, x + 16 * j, weights, L + 16 * j, &mins[j], Laux,
                                         -0.5f, 0.1f, 15, true);
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        uint16_t dh, dminh;
        if (max_scale > 0) {
            float iscale = q4scale / max_scale;
            for (int j = 0; j < QK_K / 16; j++)
                sc[j] = (uint8_t)quant_nearest_int(iscale * scales[j]);
            dh = forge_f32_to_fp16(max_scale / q4scale);
        } else {
            memset(sc, 0, QK_K / 16);
            dh = forge_f32_to_fp16(0.f);
        }
        if (max_min > 0) {
            float iscale = q4scale / max_min;
            for (int j = 0; j < QK_K / 16; j++)
                sc[j] |= (uint8_t)(quant_nearest_int(iscale * mins[j]) << 4);
            dminh = forge_f32_to_fp16(max_min / q4scale);
        } else {
            dminh = forge_f32_to_fp16(0.f);
        }
        quant_store_u16(y + 80, dh);
        quant_store_u16(y + 82, dminh);
        for (int j = 0; j < QK_K / 16; j++) {
            const float d = forge_fp16_to_f32(dh) * (float)(sc[j] & 0xF);
            if (d == 0) continue;
            const float dm = forge_fp16_to_f32(dminh) * (float)(sc[j] >> 4);
            for (int ii = 0; ii < 16; ii++)
                L[16 * j + ii] =
                    (uint8_t)quant_clampi(quant_nearest_int((x[16 * j + ii] + dm) / d), 0, 3);
        }
        pack_2bit(L, qs);
    }
}

void quantize_row_q3_k(const float *x, void *vy, int64_t n)
{
    uint8_t *y = vy;
    int8_t L[QK_K];
    float scales[QK_K / 16];
    for (int64_t b = 0; b < n / QK_K; b++, x += QK_K, y += 110) {
        uint8_t *hmask = y, *qs = y + 32, *sc = y + 96;
        float max_scale = 0, amax = 0;
        for (int j = 0; j < QK_K / 16; j++) {
            scales[j] = make_q3_quants(16, 4, x + 16 * j, L + 16 * j);
            float scale = fabsf(scales[j]);
            if (scale > amax) {
                amax = scale;
                max_scale = scales[j];
            }
        }
        memset(sc, 0, 12);
        uint16_t dh;
        if (max_scale != 0) {
            float iscale = -32.f / max_scale;
            for (int j = 0; j < QK_K / 16; j++) {
                int l = quant_clampi((int8_t)quant_nearest_int(iscale * scales[j]), -32, 31) + 32;
                if (j < 8)
                    sc[j] = (uint8_t)(l & 0xF);
                else
                    sc[j - 8] |= (uint8_t)((l & 0xF) << 4);
                sc[j % 4 + 8] |= (uint8_t)((l >> 4) << (2 * (j / 4)));
            }
            dh = forge_f32_to_fp16(1 / iscale);
        } else {
            dh = forge_f32_to_fp16(0.f);
        }
        quant_store_u16(y + 108, dh);
        for (int j = 0; j < QK_K / 16; j++) {
            int s = j < 8 ? sc[j] & 0xF : sc[j - 8] >> 4;
            s = (s | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32;
            float d = forge_fp16_to_f32(dh) * (float)s;
            if (d == 0) continue;
            for (int ii = 0; ii < 16; ii++)
                L[16 * j + ii] =
                    (int8_t)(quant_clampi(quant_nearest_int(x[16 * j + ii] / d), -4, 3) + 4);
        }
        /* high bit of element j goes to bit j / 32 of hmask[j % 32] */
        memset(hmask, 0, QK_K / 8);
        uint8_t low[QK_K];
        for (int j = 0; j < QK_K; j++) {
            int l = L[j];
            if (l > 3) {
                hmask[j % 32] |= (uint8_t)(1u << (j / 32));
                l -= 4;
            }
            low[j] = (uint8_t)l;
        }
        pack_2bit(low, qs);
    }
}

/* Shared by Q4_K (nmax 15) and Q5_K (nmax 31): sub-block scales and mins of 32 elements,
 * quantized to 6 bits against fp16 d and dmin; levels into L. Writes d, dmin, scales[12]. */
static void quantize_k_scale_min(const float *x, uint8_t *y, uint8_t *L, int nmax, float rmin,
                                 float rdelta, int nstep)
{
    uint8_t Laux[32];
    float weights[32], mins[QK_K / 32], scales[QK_K / 32];
    uint8_t *sc = y + 4;
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < QK_K / 32; j++) {
        float sum_x2 = 0;
        for (int l = 0; l < 32; l++)
            sum_x2 += x[32 * j + l] * x[32 * j + l];
        float av_x = sqrtf(sum_x2 / 32);
        for (int l = 0; l < 32; l++)
            weights[l] = av_x + fabsf(x[32 * j + l]);
        scales[j] = make_qkx2_quants(32, nmax, x + 32 * j, weights, L + 32 * j, &mins[j], Laux,
                                     rmin, rdelta, nstep, false);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < QK_K / 32; j++) {
        uint8_t ls = (uint8_t)quant_nearest_int(inv_scale * scales[j]);
        uint8_t lm = (uint8_t)quant_nearest_int(inv_min * mins[j]);
        set_scale_min_k4(j, sc, ls < 63 ? ls : 63, lm < 63 ? lm : 63);
    }
    uint16_t dh = forge_f32_to_fp16(max_scale / 63.f), dminh = forge_f32_to_fp16(max_min / 63.f);
    quant_store_u16(y, dh);
    quant_store_u16(y + 2, dminh);
    for (int j = 0; j < QK_K / 32; j++) {
        uint8_t s, m;
        get_scale_min_k4(j, sc, &s, &m);
        const float d = forge_fp16_to_f32(dh) * (float)s;
        if (d == 0) continue;
        const float dm = forge_fp16_to_f32(dminh) * (float)m;
        for (int ii = 0; ii < 32; ii++)
            L[32 * j + ii] =
                (uint8_t)quant_clampi(quant_nearest_int((x[32 * j + ii] + dm) / d), 0, nmax);
    }
}

void quantize_row_q4_k(const float *x, void *vy, int64_t n)
{
    uint8_t *y = vy;
    uint8_t L[QK_K];
    for (int64_t b = 0; b < n / QK_K; b++, x += QK_K, y += 144) {
        memset(y + 4, 0, 12);
        quantize_k_scale_min(x, y, L, 15, -1.f, 0.1f, 20);
        uint8_t *q = y + 16;
        for (int j = 0; j < QK_K; j += 64, q += 32)
            for (int l = 0; l < 32; l++)
                q[l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 4));
    }
}

void quantize_row_q5_k(const float *x, void *vy, int64_t n)
{
    uint8_t *y = vy;
    uint8_t L[QK_K];
    for (int64_t b = 0; b < n / QK_K; b++, x += QK_K, y += 176) {
        memset(y + 4, 0, 12);
        quantize_k_scale_min(x, y, L, 31, -0.5f, 0.1f, 15);
        uint8_t *qh = y + 16, *ql = y + 48;
        uint8_t m1 = 1, m2 = 2;
        memset(qh, 0, QK_K / 8);
        for (int k = 0; k < QK_K; k += 64, ql += 32, m1 <<= 2, m2 <<= 2) {
            for (int j = 0; j < 32; j++) {
                int l1 = L[k + j], l2 = L[k + j + 32];
                if (l1 > 15) {
                    l1 -= 16;
                    qh[j] |= m1;
                }
                if (l2 > 15) {
                    l2 -= 16;
                    qh[j] |= m2;
                }
                ql[j] = (uint8_t)(l1 | (l2 << 4));
            }
        }
    }
}

void quantize_row_q6_k(const float *x, void *vy, int64_t n)
{
    uint8_t *y = vy;
    int8_t L[QK_K];
    float scales[QK_K / 16];
    for (int64_t b = 0; b < n / QK_K; b++, x += QK_K, y += 210) {
        uint8_t *ql = y, *qh = y + 128;
        int8_t *sc = (int8_t *)(y + 192);
        float max_scale = 0, max_abs_scale = 0;
        for (int ib = 0; ib < QK_K / 16; ib++) {
            const float scale = make_qx_quants(16, 32, x + 16 * ib, L + 16 * ib);
            scales[ib] = scale;
            if (fabsf(scale) > max_abs_scale) {
                max_abs_scale = fabsf(scale);
                max_scale = scale;
            }
        }
        if (max_abs_scale < QUANT_GROUP_MAX_EPS) {
            memset(y, 0, 210);
            continue;
        }
        float iscale = -128.f / max_scale;
        uint16_t dh = forge_f32_to_fp16(1 / iscale);
        quant_store_u16(y + 208, dh);
        for (int ib = 0; ib < QK_K / 16; ib++) {
            int v = quant_nearest_int(iscale * scales[ib]);
            sc[ib] = (int8_t)(v < 127 ? v : 127);
        }
        for (int j = 0; j < QK_K / 16; j++) {
            float d = forge_fp16_to_f32(dh) * (float)sc[j];
            if (d == 0) continue;
            for (int ii = 0; ii < 16; ii++)
                L[16 * j + ii] =
                    (int8_t)(quant_clampi(quant_nearest_int(x[16 * j + ii] / d), -32, 31) + 32);
        }
        for (int j = 0; j < QK_K; j += 128, ql += 64, qh += 32) {
            for (int l = 0; l < 32; l++) {
                const uint8_t q1 = L[j + l] & 0xF, q2 = L[j + l + 32] & 0xF;
                const uint8_t q3 = L[j + l + 64] & 0xF, q4 = L[j + l + 96] & 0xF;
                ql[l] = (uint8_t)(q1 | (q3 << 4));
                ql[l + 32] = (uint8_t)(q2 | (q4 << 4));
                qh[l] = (uint8_t)((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) |
                                  ((L[j + l + 64] >> 4) << 4) | ((L[j + l + 96] >> 4) << 6));
            }
        }
    }
}
