/* dequant.c - scalar reference conversion of ggml tensor types to float32 (forge_dequantize and
 * the dequantize_row entries of the traits table, src/quant/qtypes.c). Block layouts as in
 * ggml-common.h; the arithmetic reproduces ggml's dequantize_row_* bit for bit (same operations in
 * the same order, products and sums in separate statements so that no compiler fuses them into an
 * FMA). These loops are the specification the SIMD and GPU kernels are tested against. */
#include <string.h>

#include "core/fp16.h"
#include "core/util.h"
#include "quant/qtypes.h"

const int8_t forge_iq4nl_values[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                       1,    13,   25,  38,  53,  69,  89,  113};

static float half_at(const uint8_t *p)
{
    return forge_fp16_to_f32(forge_qt_u16(p));
}

static uint32_t u32_at(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* y = a * b + c without contraction into an FMA (ggml rounds the product first). */
static inline float mul_add(float a, float b, float c)
{
    volatile float p = a * b;
    return p + c;
}

void forge_dequant_row_f32(const void *x, float *y, int64_t n)
{
    memcpy(y, x, (size_t)n * sizeof(float));
}

void forge_dequant_row_f16(const void *x, float *y, int64_t n)
{
    const uint8_t *p = x;
    for (int64_t i = 0; i < n; i++) y[i] = half_at(p + 2 * i);
}

void forge_dequant_row_bf16(const void *x, float *y, int64_t n)
{
    const uint8_t *p = x;
    for (int64_t i = 0; i < n; i++) y[i] = forge_bf16_to_f32(forge_qt_u16(p + 2 * i));
}

/* ---- 32-element blocks ----------------------------------------------------------------------- */

void forge_dequant_row_q8_0(const void *x, float *y, int64_t n)
{
    const uint8_t *b = x;
    for (int64_t i = 0; i < n / 32; i++, b += 34, y += 32) {
        float d = half_at(b);
        for (int j = 0; j < 32; j++) y[j] = (float)(int8_t)b[2 + j] * d;
    }
}

void forge_dequant_row_q4_0(const void *x, float *y, int64_t n)
{
    const uint8_t *b = x;
    for (int64_t i = 0; i < n / 32; i++, b += 18, y += 32) {
        float d = half_at(b);
        for (int j = 0; j < 16; j++) {
            y[j] = (float)((b[2 + j] & 0x0f) - 8) * d;
            y[j + 16] = (float)((b[2 + j] >> 4) - 8) * d;
        }
    }
}

/* {fp16 d, fp16 m, 16 nibble bytes}: x = q * d + m */
void forge_dequant_row_q4_1(const void *x, float *y, int64_t n)
{
    const uint8_t *b = x;
    for (int64_t i = 0; i < n / 32; i++, b += 20, y += 32) {
        float d = half_at(b), m = half_at(b + 2);
        for (int j = 0; j < 16; j++) {
            y[j] = mul_add((float)(b[4 + j] & 0x0f), d, m);
            y[j + 16] = mul_add((float)(b[4 + j] >> 4), d, m);
        }
    }
}

/* {fp16 d, u32 high bits, 16 nibble bytes}: x = (q5 - 16) * d; bit j of qh is element j's 5th bit */
void forge_dequant_row_q5_0(const void *x, float *y, int64_t n)
{
    const uint8_t *b = x;
    for (int64_t i = 0; i < n / 32; i++, b += 22, y += 32) {
        float d = half_at(b);
        uint32_t qh = u32_at(b + 2);
        for (int j = 0; j < 16; j++) {
            int h0 = (int)((qh >> j) & 1) << 4, h1 = (int)((qh >> (j + 16)) & 1) << 4;
            y[j] = (float)(((b[6 + j] & 0x0f) | h0) - 16) * d;
            y[j + 16] = (float)(((b[6 + j] >> 4) | h1) - 16) * d;
        }
    }
}

/* {fp16 d, fp16 m, u32 high bits, 16 nibble bytes}: x = q5 * d + m */
void forge_dequant_row_q5_1(const void *x, float *y, int64_t n)
{
    const uint8_t *b = x;
    for (int64_t i = 0; i < n / 32; i++, b += 24, y += 32) {
        float d = half_at(b), m = half_at(b + 2);
        uint32_t qh = u32_at(b + 4);
        for (int j = 0; j < 16; j++) {
            int h0 = (int)((qh >> j) & 1) << 4, h1 = (int)((qh >> (j + 16)) & 1) << 4;
            y[j] = mul_add((float)((b[8 + j] & 0x0f) | h0), d, m);
            y[j + 16] = mul_add((float)((b[8 + j] >> 4) | h1), d, m);
        }
    }
}

/* {fp16 d, 16 nibble bytes}: x = d * table[q] */
void forge_dequant_row_iq4_nl(const void *x, float *y, int64_t n)
{
    const uint8_t *b = x;
    for (int64_t i = 0; i < n / 32; i++, b += 18, y += 32) {
        float d = half_at(b);
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)forge_iq4nl_values[b[2 + j] & 0x0f];
            y[j + 16] = d * (float)forge_iq4nl_values[b[2 + j] >> 4];
        }
    }
}

/* ---- 256-element super-blocks ------------------------------------------------------------------ */

/* Q2_K (84 bytes): scales[16] (low nibble scale, high nibble min), qs[64] (2 bits), fp16 d, dmin.
 * Element order: 2 halves of 128; in each, 4 shifts (0,2,4,6) x 2 groups of 16 of qs[32]. */
void forge_dequant_row_q2_k(const void *x, float *y, int64_t n)
{
    const uint8_t *b = x;
    for (int64_t i = 0; i < n / FORGE_QK_K; i++, b += 84) {
        const uint8_t *sc = b, *q = b + 16;
        float d = half_at(b + 80), dmin = half_at(b + 82);
        int is = 0;
        for (int half = 0; half < 2; half++, q += 32) {
            for (int shift = 0; shift < 8; shift += 2) {
                for (int g = 0; g < 2; g++) {
                    uint8_t s = sc[is++];
                    float dl = d * (float)(s & 0xF), ml = dmin * (float)(s >> 4);
                    for (int l = 0; l < 16; l++)
                        *y++ = mul_add(dl, (float)((q[16 * g + l] >> shift) & 3), -ml);
                }
            }
        }
    }
}

/* Q3_K (110 bytes): hmask[32] (high bit, set = no offset), qs[64] (2 bits), scales[12] (16 6-bit
 * scales), fp16 d. Same element order as Q2_K; the hmask bit advances with each shift. */
void forge_dequant_row_q3_k(const void *x, float *y, int64_t n)
{
    const uint8_t *b = x;
    for (int64_t i = 0; i < n / FORGE_QK_K; i++, b += 110) {
        const uint8_t *hm = b, *q = b + 32;
        int8_t scales[16];
        forge_k3_scales(b + 96, scales);
        float d = half_at(b + 108);
        int is = 0;
        uint8_t m = 1;
        for (int half = 0; half < 2; half++, q += 32) {
            for (int shift = 0; shift < 8; shift += 2, m = (uint8_t)(m << 1)) {
                for (int g = 0; g < 2; g++) {
                    float dl = d * (float)scales[is++];
                    for (int l = 16 * g; l < 16 * g + 16; l++) {
                        int v = ((q[l] >> shift) & 3) - ((hm[l] & m) ? 0 : 4);
                        *y++ = dl * (float)v;
                    }
                }
            }
        }
    }
}

/* Q4_K (144 bytes): fp16 d, dmin, scales[12] (8 6-bit scales and mins), qs[128]. Each 64 elements:
 * 32 low nibbles (sub-block 2k) then 32 high nibbles (2k+1) of 32 bytes. x = d*sc*q - dmin*m. */
void forge_dequant_row_q4_k(const void *x, float *y, int64_t n)
{
    const uint8_t *b = x;
    for (int64_t i = 0; i < n / FORGE_QK_K; i++, b += 144) {
        float d = half_at(b), dmin = half_at(b + 2);
        const uint8_t *q = b + 16;
        for (int j = 0; j < 4; j++, q += 32) {
            uint8_t sc, m;
            forge_k4_scale_min(2 * j, b + 4, &sc, &m);
            float d1 = d * (float)sc, m1 = dmin * (float)m;
            forge_k4_scale_min(2 * j + 1, b + 4, &sc, &m);
            float d2 = d * (float)sc, m2 = dmin * (float)m;
            for (int l = 0; l < 32; l++) *y++ = mul_add(d1, (float)(q[l] & 0xF), -m1);
            for (int l = 0; l < 32; l++) *y++ = mul_add(d2, (float)(q[l] >> 4), -m2);
        }
    }
}

/* Q5_K (176 bytes): as Q4_K plus qh[32] before qs[128]: bit 2k / 2k+1 of qh[l] is the 5th bit of
 * the low / high nibble element l of the k-th 64. */
void forge_dequant_row_q5_k(const void *x, float *y, int64_t n)
{
    const uint8_t *b = x;
    for (int64_t i = 0; i < n / FORGE_QK_K; i++, b += 176) {
        float d = half_at(b), dmin = half_at(b + 2);
        const uint8_t *qh = b + 16, *q = b + 48;
        for (int j = 0; j < 4; j++, q += 32) {
            uint8_t sc, m;
            forge_k4_scale_min(2 * j, b + 4, &sc, &m);
            float d1 = d * (float)sc, m1 = dmin * (float)m;
            forge_k4_scale_min(2 * j + 1, b + 4, &sc, &m);
            float d2 = d * (float)sc, m2 = dmin * (float)m;
            uint8_t u1 = (uint8_t)(1u << (2 * j)), u2 = (uint8_t)(2u << (2 * j));
            for (int l = 0; l < 32; l++)
                *y++ = mul_add(d1, (float)((q[l] & 0xF) + ((qh[l] & u1) ? 16 : 0)), -m1);
            for (int l = 0; l < 32; l++)
                *y++ = mul_add(d2, (float)((q[l] >> 4) + ((qh[l] & u2) ? 16 : 0)), -m2);
        }
    }
}

/* Q6_K (210 bytes): ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16], fp16 d.
 * Each 128: element l+32k (k 0..3) takes nibble (k>>1) of ql[l + 32*(k&1)] and bits 2k of qh[l]. */
void forge_dequant_row_q6_k(const void *x, float *y, int64_t n)
{
    const uint8_t *b = x;
    for (int64_t i = 0; i < n / FORGE_QK_K; i++, b += 210) {
        float d = half_at(b + 208);
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        for (int h = 0; h < 2; h++, y += 128, ql += 64, qh += 32, sc += 8) {
            for (int l = 0; l < 32; l++) {
                int is = l / 16;
                int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = d * (float)sc[is] * (float)q1;
                y[l + 32] = d * (float)sc[is + 2] * (float)q2;
                y[l + 64] = d * (float)sc[is + 4] * (float)q3;
                y[l + 96] = d * (float)sc[is + 6] * (float)q4;
            }
        }
    }
}

/* IQ4_XS (136 bytes): fp16 d, u16 scales_h, scales_l[4], qs[128]; 8 sub-blocks of 32 with 6-bit
 * scales (low 4 bits in scales_l nibbles, high 2 in scales_h), values from the IQ4_NL table. */
void forge_dequant_row_iq4_xs(const void *x, float *y, int64_t n)
{
    const uint8_t *b = x;
    for (int64_t i = 0; i < n / FORGE_QK_K; i++, b += 136) {
        float d = half_at(b);
        unsigned sh = forge_qt_u16(b + 2);
        const uint8_t *q = b + 8;
        for (int ib = 0; ib < 8; ib++, y += 32, q += 16) {
            int ls = ((b[4 + ib / 2] >> (4 * (ib % 2))) & 0xF) | (((sh >> (2 * ib)) & 3) << 4);
            float dl = d * (float)(ls - 32);
            for (int j = 0; j < 16; j++) {
                y[j] = dl * (float)forge_iq4nl_values[q[j] & 0xF];
                y[j + 16] = dl * (float)forge_iq4nl_values[q[j] >> 4];
            }
        }
    }
}

/* One base-3 digit of a TQ1_0 byte: the byte holds 5 (or 4) trits as a fixed-point fraction;
 * multiplying by 3^k (mod 256) brings digit k to the top. Returns the trit in {0,1,2}. */
static inline int tq1_trit(uint8_t byte, int k)
{
    static const uint8_t pow3[6] = {1, 3, 9, 27, 81, 243};
    uint8_t q = (uint8_t)(byte * pow3[k]);
    return (int)(((uint16_t)q * 3) >> 8);
}

/* TQ1_0 (54 bytes): qs[48] (5 trits per byte), qh[4] (4 trits per byte), fp16 d. Element order:
 * qs[0..31] x 5 digits (32 at a time), qs[32..47] x 5 digits (16 at a time), qh x 4 digits. */
void forge_dequant_row_tq1_0(const void *x, float *y, int64_t n)
{
    const uint8_t *b = x;
    for (int64_t i = 0; i < n / FORGE_QK_K; i++, b += 54) {
        float d = half_at(b + 52);
        for (int k = 0; k < 5; k++)
            for (int m = 0; m < 32; m++) *y++ = (float)(tq1_trit(b[m], k) - 1) * d;
        for (int k = 0; k < 5; k++)
            for (int m = 0; m < 16; m++) *y++ = (float)(tq1_trit(b[32 + m], k) - 1) * d;
        for (int k = 0; k < 4; k++)
            for (int j = 0; j < 4; j++) *y++ = (float)(tq1_trit(b[48 + j], k) - 1) * d;
    }
}

/* TQ2_0 (66 bytes): qs[64] (2 bits per element, value - 1), fp16 d. Each 128: shifts 0,2,4,6 of
 * 32 bytes. */
void forge_dequant_row_tq2_0(const void *x, float *y, int64_t n)
{
    const uint8_t *b = x;
    for (int64_t i = 0; i < n / FORGE_QK_K; i++, b += 66) {
        float d = half_at(b + 64);
        for (int j = 0; j < 64; j += 32)
            for (int shift = 0; shift < 8; shift += 2)
                for (int m = 0; m < 32; m++) *y++ = (float)(((b[j + m] >> shift) & 3) - 1) * d;
    }
}

int forge_dequantize(int t, const void *src, float *dst, int64_t n, forge_err *err)
{
    const forge_type_traits *tr = forge_type_traits_get(t);
    int64_t bs = ggml_type_block_size(t);
    if (!tr || !tr->dequantize_row)
        return forge_err_set(err, FORGE_E_UNSUPPORTED,
                             "dequantize: tensor type %s (%d) is not supported yet", ggml_type_name(t), t);
    if (n < 0 || bs <= 0 || n % bs != 0)
        return forge_err_set(err, FORGE_E_INVALID,
                             "dequantize %s: %lld elements is not a multiple of the block size %lld",
                             ggml_type_name(t), (long long)n, (long long)bs);
    tr->dequantize_row(src, dst, n);
    return FORGE_OK;
}
