/* vecdot.c - activation quantizers (float -> Q8_0 / Q8_1 / Q8_K, as ggml's CPU backend quantizes
 * the activations of a matmul) and the scalar reference dot products of every quantized weight
 * type against them. Each dot product unpacks a weight block into small integers in element
 * order, takes exact integer sums per scale group and applies the float scales as ggml does
 * (d_w * d_x per block or super-block, the mins through Q8_1's s or Q8_K's bsums), so results
 * track llama.cpp to rounding. The SIMD versions (src/cpu/vecdot_avx2.c) are tested against these. */
#include <math.h>
#include <string.h>

#include "core/fp16.h"
#include "quant/qtypes.h"

static float half_at(const uint8_t *p)
{
    return forge_fp16_to_f32(forge_qt_u16(p));
}

static void put_u16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v & 0xff);
    p[1] = (uint8_t)(v >> 8);
}

/* ---- activation quantizers ----------------------------------------------------------------------- */

/* One block of 32 to int8 with scale amax/127: on x86 ggml's SIMD quantizer multiplies by
 * 127/amax and rounds half to even; on AArch64 it multiplies by 1/d (see src/cpu/quantize.c). */
static float q8_block(const float *x, int8_t *qs, int *sum)
{
    float amax = 0.0f;
    for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[j]));
    float d = amax / 127.0f;
#if defined(__aarch64__)
    float id = d != 0.0f ? 1.0f / d : 0.0f;
#else
    float id = amax != 0.0f ? 127.0f / amax : 0.0f;
#endif
    int s = 0;
    for (int j = 0; j < 32; j++) {
        qs[j] = (int8_t)nearbyintf(x[j] * id);
        s += qs[j];
    }
    *sum = s;
    return d;
}

void forge_quantize_act_q8_0(const float *x, void *y, int64_t n)
{
    uint8_t *b = y;
    for (int64_t i = 0; i < n / 32; i++, x += 32, b += FORGE_Q8_0_BYTES) {
        int sum;
        float d = q8_block(x, (int8_t *)(b + 2), &sum);
        put_u16(b, forge_f32_to_fp16(d));
    }
}

void forge_quantize_act_q8_1(const float *x, void *y, int64_t n)
{
    uint8_t *b = y;
    for (int64_t i = 0; i < n / 32; i++, x += 32, b += FORGE_Q8_1_BYTES) {
        int sum;
        float d = q8_block(x, (int8_t *)(b + 4), &sum);
        put_u16(b, forge_f32_to_fp16(d));
        put_u16(b + 2, forge_f32_to_fp16(d * (float)sum));
    }
}

/* ggml's quantize_row_q8_K_ref (what its x86 build uses): scale -127/max of the signed value of
 * largest magnitude, round half to even, clamp at 127; d = 1/scale; bsums per 16. */
void forge_quantize_act_q8_k(const float *x, void *y, int64_t n)
{
    uint8_t *b = y;
    for (int64_t i = 0; i < n / FORGE_QK_K; i++, x += FORGE_QK_K, b += FORGE_Q8_K_BYTES) {
        int8_t *qs = (int8_t *)(b + 4);
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < FORGE_QK_K; j++) {
            float ax = fabsf(x[j]);
            if (ax > amax) {
                amax = ax;
                max = x[j];
            }
        }
        float d = 0.0f;
        if (amax == 0.0f) {
            memset(qs, 0, FORGE_QK_K);
        } else {
            float iscale = -127.0f / max;
            for (int j = 0; j < FORGE_QK_K; j++) {
                int v = (int)nearbyintf(iscale * x[j]);
                qs[j] = (int8_t)(v < 127 ? v : 127);
            }
            d = 1.0f / iscale;
        }
        memcpy(b, &d, 4);
        for (int g = 0; g < 16; g++) {
            int s = 0;
            for (int j = 0; j < 16; j++) s += qs[16 * g + j];
            put_u16(b + 4 + FORGE_QK_K + 2 * g, (uint16_t)(int16_t)s);
        }
    }
}

/* ---- 32-element blocks ---------------------------------------------------------------------------- */

float forge_vec_dot_q4_1_q8_1(int64_t n, const void *w, const void *xq)
{
    const uint8_t *b = w, *y = xq;
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / 32; i++, b += 20, y += FORGE_Q8_1_BYTES) {
        const int8_t *ys = (const int8_t *)(y + 4);
        int sumi = 0;
        for (int j = 0; j < 16; j++) sumi += (b[4 + j] & 0x0F) * ys[j] + (b[4 + j] >> 4) * ys[j + 16];
        sumf += half_at(b) * half_at(y) * (float)sumi + half_at(b + 2) * half_at(y + 2);
    }
    return sumf;
}

static uint32_t u32_at(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

float forge_vec_dot_q5_0_q8_0(int64_t n, const void *w, const void *xq)
{
    const uint8_t *b = w, *y = xq;
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / 32; i++, b += 22, y += FORGE_Q8_0_BYTES) {
        const int8_t *ys = (const int8_t *)(y + 2);
        uint32_t qh = u32_at(b + 2);
        int sumi = 0;
        for (int j = 0; j < 16; j++) {
            int x0 = ((b[6 + j] & 0x0F) | (int)(((qh >> j) & 1) << 4)) - 16;
            int x1 = ((b[6 + j] >> 4) | (int)(((qh >> (j + 16)) & 1) << 4)) - 16;
            sumi += x0 * ys[j] + x1 * ys[j + 16];
        }
        sumf += half_at(b) * half_at(y) * (float)sumi;
    }
    return sumf;
}

float forge_vec_dot_q5_1_q8_1(int64_t n, const void *w, const void *xq)
{
    const uint8_t *b = w, *y = xq;
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / 32; i++, b += 24, y += FORGE_Q8_1_BYTES) {
        const int8_t *ys = (const int8_t *)(y + 4);
        uint32_t qh = u32_at(b + 4);
        int sumi = 0;
        for (int j = 0; j < 16; j++) {
            int x0 = (b[8 + j] & 0x0F) | (int)(((qh >> j) & 1) << 4);
            int x1 = (b[8 + j] >> 4) | (int)(((qh >> (j + 16)) & 1) << 4);
            sumi += x0 * ys[j] + x1 * ys[j + 16];
        }
        sumf += half_at(b) * half_at(y) * (float)sumi + half_at(b + 2) * half_at(y + 2);
    }
    return sumf;
}

float forge_vec_dot_iq4_nl_q8_0(int64_t n, const void *w, const void *xq)
{
    const uint8_t *b = w, *y = xq;
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / 32; i++, b += 18, y += FORGE_Q8_0_BYTES) {
        const int8_t *ys = (const int8_t *)(y + 2);
        int sumi = 0;
        for (int j = 0; j < 16; j++)
            sumi += forge_iq4nl_values[b[2 + j] & 0xF] * ys[j] + forge_iq4nl_values[b[2 + j] >> 4] * ys[j + 16];
        sumf += half_at(b) * half_at(y) * (float)sumi;
    }
    return sumf;
}

/* ---- 256-element super-blocks: unpack to ints in element order, then sum per scale group ------ */

static float q8k_d(const uint8_t *y)
{
    float d;
    memcpy(&d, y, 4);
    return d;
}

static int q8k_bsum(const uint8_t *y, int g)
{
    return (int16_t)forge_qt_u16(y + 4 + FORGE_QK_K + 2 * g);
}

/* sum over 16-element groups g of scale[g] * <q, y> (group size gs: 16 or 32) */
static int grouped_dot(const int8_t *q, const int8_t *ys, const int *scale, int gs)
{
    int isum = 0;
    for (int g = 0; g < FORGE_QK_K / gs; g++) {
        int s = 0;
        for (int l = 0; l < gs; l++) s += q[g * gs + l] * ys[g * gs + l];
        isum += scale[g] * s;
    }
    return isum;
}

float forge_vec_dot_q2_k_q8_k(int64_t n, const void *w, const void *xq)
{
    const uint8_t *b = w, *y = xq;
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / FORGE_QK_K; i++, b += 84, y += FORGE_Q8_K_BYTES) {
        int8_t q[FORGE_QK_K];
        int scale[16], summs = 0;
        int8_t *p = q;
        for (int h = 0; h < 2; h++)
            for (int shift = 0; shift < 8; shift += 2)
                for (int l = 0; l < 32; l++) *p++ = (int8_t)((b[16 + 32 * h + l] >> shift) & 3);
        for (int g = 0; g < 16; g++) {
            scale[g] = b[g] & 0xF;
            summs += q8k_bsum(y, g) * (b[g] >> 4);
        }
        int isum = grouped_dot(q, (const int8_t *)(y + 4), scale, 16);
        float dy = q8k_d(y);
        sumf += dy * half_at(b + 80) * (float)isum - dy * half_at(b + 82) * (float)summs;
    }
    return sumf;
}

float forge_vec_dot_q3_k_q8_k(int64_t n, const void *w, const void *xq)
{
    const uint8_t *b = w, *y = xq;
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / FORGE_QK_K; i++, b += 110, y += FORGE_Q8_K_BYTES) {
        int8_t q[FORGE_QK_K], sc8[16];
        int scale[16];
        int8_t *p = q;
        uint8_t m = 1;
        for (int h = 0; h < 2; h++)
            for (int shift = 0; shift < 8; shift += 2, m = (uint8_t)(m << 1))
                for (int l = 0; l < 32; l++)
                    *p++ = (int8_t)(((b[32 + 32 * h + l] >> shift) & 3) - ((b[l] & m) ? 0 : 4));
        forge_k3_scales(b + 96, sc8);
        for (int g = 0; g < 16; g++) scale[g] = sc8[g];
        int isum = grouped_dot(q, (const int8_t *)(y + 4), scale, 16);
        sumf += half_at(b + 108) * q8k_d(y) * (float)isum;
    }
    return sumf;
}

/* Q4_K and Q5_K: 8 sub-blocks of 32 with 6-bit scale and min; qh NULL for Q4_K. */
static float dot_q45_k(int64_t n, const uint8_t *b, const uint8_t *y, int five)
{
    size_t bytes = five ? 176 : 144;
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / FORGE_QK_K; i++, b += bytes, y += FORGE_Q8_K_BYTES) {
        const uint8_t *qh = b + 16, *qs = b + (five ? 48 : 16);
        int8_t q[FORGE_QK_K];
        int scale[8], summ = 0;
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < 32; l++) {
                int lo = qs[32 * j + l] & 0xF, hi = qs[32 * j + l] >> 4;
                if (five) {
                    lo += (qh[l] >> (2 * j)) & 1 ? 16 : 0;
                    hi += (qh[l] >> (2 * j + 1)) & 1 ? 16 : 0;
                }
                q[64 * j + l] = (int8_t)lo;
                q[64 * j + 32 + l] = (int8_t)hi;
            }
        for (int j = 0; j < 8; j++) {
            uint8_t sc, m;
            forge_k4_scale_min(j, b + 4, &sc, &m);
            scale[j] = sc;
            summ += m * (q8k_bsum(y, 2 * j) + q8k_bsum(y, 2 * j + 1));
        }
        int isum = grouped_dot(q, (const int8_t *)(y + 4), scale, 32);
        float dy = q8k_d(y);
        sumf += half_at(b) * dy * (float)isum - half_at(b + 2) * dy * (float)summ;
    }
    return sumf;
}

float forge_vec_dot_q4_k_q8_k(int64_t n, const void *w, const void *xq)
{
    return dot_q45_k(n, w, xq, 0);
}

float forge_vec_dot_q5_k_q8_k(int64_t n, const void *w, const void *xq)
{
    return dot_q45_k(n, w, xq, 1);
}

float forge_vec_dot_q6_k_q8_k(int64_t n, const void *w, const void *xq)
{
    const uint8_t *b = w, *y = xq;
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / FORGE_QK_K; i++, b += 210, y += FORGE_Q8_K_BYTES) {
        int8_t q[FORGE_QK_K];
        int scale[16];
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = b + 64 * h, *qh = b + 128 + 32 * h;
            int8_t *a = q + 128 * h;
            for (int l = 0; l < 32; l++) {
                a[l] = (int8_t)(((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32);
                a[l + 32] = (int8_t)(((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
                a[l + 64] = (int8_t)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
                a[l + 96] = (int8_t)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
            }
        }
        for (int g = 0; g < 16; g++) scale[g] = (int8_t)b[192 + g];
        int isum = grouped_dot(q, (const int8_t *)(y + 4), scale, 16);
        sumf += half_at(b + 208) * q8k_d(y) * (float)isum;
    }
    return sumf;
}

float forge_vec_dot_iq4_xs_q8_k(int64_t n, const void *w, const void *xq)
{
    const uint8_t *b = w, *y = xq;
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / FORGE_QK_K; i++, b += 136, y += FORGE_Q8_K_BYTES) {
        int8_t q[FORGE_QK_K];
        int scale[8];
        unsigned sh = forge_qt_u16(b + 2);
        for (int ib = 0; ib < 8; ib++) {
            const uint8_t *qs = b + 8 + 16 * ib;
            scale[ib] = (((b[4 + ib / 2] >> (4 * (ib % 2))) & 0xF) | (((sh >> (2 * ib)) & 3) << 4)) - 32;
            for (int j = 0; j < 16; j++) {
                q[32 * ib + j] = forge_iq4nl_values[qs[j] & 0xF];
                q[32 * ib + j + 16] = forge_iq4nl_values[qs[j] >> 4];
            }
        }
        int isum = grouped_dot(q, (const int8_t *)(y + 4), scale, 32);
        sumf += half_at(b) * q8k_d(y) * (float)isum;
    }
    return sumf;
}

static int tq1_trit(uint8_t byte, int k)
{
    static const uint8_t pow3[6] = {1, 3, 9, 27, 81, 243};
    uint8_t q = (uint8_t)(byte * pow3[k]);
    return (int)(((uint16_t)q * 3) >> 8);
}

float forge_vec_dot_tq1_0_q8_k(int64_t n, const void *w, const void *xq)
{
    const uint8_t *b = w, *y = xq;
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / FORGE_QK_K; i++, b += 54, y += FORGE_Q8_K_BYTES) {
        const int8_t *ys = (const int8_t *)(y + 4);
        int sum = 0, e = 0;
        for (int k = 0; k < 5; k++)
            for (int m = 0; m < 32; m++) sum += (tq1_trit(b[m], k) - 1) * ys[e++];
        for (int k = 0; k < 5; k++)
            for (int m = 0; m < 16; m++) sum += (tq1_trit(b[32 + m], k) - 1) * ys[e++];
        for (int k = 0; k < 4; k++)
            for (int j = 0; j < 4; j++) sum += (tq1_trit(b[48 + j], k) - 1) * ys[e++];
        sumf += (float)sum * (half_at(b + 52) * q8k_d(y));
    }
    return sumf;
}

float forge_vec_dot_tq2_0_q8_k(int64_t n, const void *w, const void *xq)
{
    const uint8_t *b = w, *y = xq;
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / FORGE_QK_K; i++, b += 66, y += FORGE_Q8_K_BYTES) {
        const int8_t *ys = (const int8_t *)(y + 4);
        int sum = 0, e = 0;
        for (int j = 0; j < 64; j += 32)
            for (int shift = 0; shift < 8; shift += 2)
                for (int m = 0; m < 32; m++) sum += (((b[j + m] >> shift) & 3) - 1) * ys[e++];
        sumf += (float)sum * (q8k_d(y) * half_at(b + 64));
    }
    return sumf;
}
