/* matmul_neon.c - AArch64 Advanced SIMD (NEON) row kernels for kern_matmul; an empty lookup
 * elsewhere. Baseline ARMv8.0 instructions only (no dot-product extension): int8 products by
 * vmull_s8 and pairwise widening adds, so each block's integer sum is exact and is scaled by
 * d_w * d_x in float, as ggml does. Four weight rows share each activation load; F32/F16/BF16
 * accumulate in f32 with vfmaq. */
#include <string.h>

#include "core/fp16.h"
#include "cpu/kern_impl.h"

#if defined(__aarch64__)
#include <arm_neon.h>

#define INLINE static inline __attribute__((always_inline))

/* ---- activation converters (bit-identical to the scalar ones: on AArch64 id = 1/d and
 * rounding half to even, as ggml's NEON code) ---------------------------------------------- */

static void cvt_q8_neon(const float *x, void *dst, int64_t n, int32_t corr_mul)
{
    uint8_t *qs = dst;
    float *dv = (float *)(void *)(qs + n);
    int32_t *ncorr = (int32_t *)(void *)(qs + n + n / 8);
    for (int64_t b = 0; b < n / KERN_QK; b++, x += KERN_QK) {
        float32x4_t v[8];
        float32x4_t m = vdupq_n_f32(0.0f);
        for (int k = 0; k < 8; k++) {
            v[k] = vld1q_f32(x + 4 * k);
            m = vmaxq_f32(m, vabsq_f32(v[k]));
        }
        float amax = vmaxvq_f32(m);
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        int32x4_t sum = vdupq_n_s32(0);
        for (int k = 0; k < 8; k += 2) {
            int32x4_t i0 = vcvtnq_s32_f32(vmulq_n_f32(v[k], id));
            int32x4_t i1 = vcvtnq_s32_f32(vmulq_n_f32(v[k + 1], id));
            sum = vaddq_s32(sum, vaddq_s32(i0, i1));
            int16x8_t h = vcombine_s16(vmovn_s32(i0), vmovn_s32(i1));
            vst1_s8((int8_t *)(qs + b * KERN_QK + 4 * k), vmovn_s16(h));
        }
        dv[b] = forge_fp16_to_f32(forge_f32_to_fp16(d));
        ncorr[b] = -corr_mul * vaddvq_s32(sum);
    }
}

static void cvt_q8_for_q4_0_neon(const float *x, void *dst, int64_t n)
{
    cvt_q8_neon(x, dst, n, 8);
}

static void cvt_q8_for_q8_0_neon(const float *x, void *dst, int64_t n)
{
    cvt_q8_neon(x, dst, n, 128);
}

static void cvt_f16_neon(const float *x, void *dst, int64_t n)
{
    float *y = dst;
    for (int64_t i = 0; i < n; i += 4) /* fcvtn rounds to nearest even (default FPCR) */
        vst1q_f32(y + i, vcvt_f32_f16(vcvt_f16_f32(vld1q_f32(x + i))));
}

/* ---- Q8_0 / Q4_0 ------------------------------------------------------------------------ */

#define Q_ROWS 4

/* sum of a[i] * b[i] over 32 int8 values */
INLINE int32_t dot32(int8x16_t a0, int8x16_t a1, int8x16_t b0, int8x16_t b1)
{
    int16x8_t p0 = vmull_s8(vget_low_s8(a0), vget_low_s8(b0));
    int16x8_t p1 = vmull_high_s8(a0, b0);
    int16x8_t p2 = vmull_s8(vget_low_s8(a1), vget_low_s8(b1));
    int16x8_t p3 = vmull_high_s8(a1, b1);
    int32x4_t s = vpaddlq_s16(p0);
    s = vpadalq_s16(s, p1);
    s = vpadalq_s16(s, p2);
    s = vpadalq_s16(s, p3);
    return vaddvq_s32(s);
}

INLINE void q_tile(const kern_mm_args *a, int64_t o, int R, int64_t t, int is_q4)
{
    const uint8_t *xrow = a->Xc + (size_t)t * a->xc_row_bytes;
    const int8_t *xq = (const int8_t *)xrow;
    const float *xd = kern_xq_d(xrow, a->n_in);
    const int64_t nb = a->n_in / KERN_QK;
    const size_t bb = is_q4 ? KERN_Q4_0_BYTES : KERN_Q8_0_BYTES;
    const uint8x16_t lo4 = vdupq_n_u8(0x0f);
    const int8x16_t eight = vdupq_n_s8(8);
    const uint8_t *w[Q_ROWS];
    float acc[Q_ROWS];
    for (int r = 0; r < R; r++) {
        w[r] = a->W + (size_t)(o + r) * a->w_row_bytes;
        acc[r] = 0.0f;
    }
    for (int64_t b = 0; b < nb; b++) {
        int8x16_t x0 = vld1q_s8(xq + b * KERN_QK), x1 = vld1q_s8(xq + b * KERN_QK + 16);
        float dx = xd[b];
        for (int r = 0; r < R; r++) {
            const uint8_t *wb = w[r] + (size_t)b * bb;
            int8x16_t w0, w1;
            if (is_q4) {
                uint8x16_t q = vld1q_u8(wb + 2);
                w0 = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(q, lo4)), eight);
                w1 = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(q, 4)), eight);
            } else {
                w0 = vld1q_s8((const int8_t *)(wb + 2));
                w1 = vld1q_s8((const int8_t *)(wb + 18));
            }
            int32_t sumi = dot32(w0, w1, x0, x1);
            acc[r] += (float)sumi * (forge_fp16_to_f32(kern_load_u16(wb)) * dx);
        }
    }
    for (int r = 0; r < R; r++)
        a->Y[t * a->n_out + o + r] = acc[r];
}

INLINE void q_rows(const kern_mm_args *a, int64_t r0, int64_t r1, int is_q4)
{
    for (int64_t t = 0; t < a->n_tok; t++) {
        int64_t o = r0;
        for (; o + Q_ROWS <= r1; o += Q_ROWS)
            q_tile(a, o, Q_ROWS, t, is_q4);
        for (; o < r1; o++)
            q_tile(a, o, 1, t, is_q4);
    }
}

static void mm_q4_0_neon(const kern_mm_args *a, int64_t r0, int64_t r1, void *work)
{
    (void)work;
    q_rows(a, r0, r1, 1);
}

static void mm_q8_0_neon(const kern_mm_args *a, int64_t r0, int64_t r1, void *work)
{
    (void)work;
    q_rows(a, r0, r1, 0);
}

/* ---- F32 / F16 / BF16 ------------------------------------------------------------------- */

enum { WK_F32, WK_F16, WK_BF16 };

INLINE float32x4_t load_w4(const uint8_t *w, int64_t i, int kind)
{
    if (kind == WK_F16) {
        uint16x4_t h = vld1_u16((const uint16_t *)(const void *)(w + 2 * i));
        return vcvt_f32_f16(vreinterpret_f16_u16(h));
    }
    if (kind == WK_BF16) {
        uint16x4_t h = vld1_u16((const uint16_t *)(const void *)(w + 2 * i));
        return vreinterpretq_f32_u32(vshll_n_u16(h, 16));
    }
    return vld1q_f32((const float *)(const void *)(w + 4 * i));
}

INLINE float32x4_t load_x4(const uint8_t *x, int64_t i, int kind)
{
    if (kind == WK_BF16) return load_w4(x, i, WK_BF16);
    return vld1q_f32((const float *)(const void *)(x + 4 * i));
}

INLINE void f_tile(const kern_mm_args *a, int64_t o, int R, int64_t t, int kind)
{
    size_t xstride = kind == WK_F32 ? (size_t)a->n_in * 4 : a->xc_row_bytes;
    const uint8_t *x = (kind == WK_F32 ? (const uint8_t *)a->X : a->Xc) + (size_t)t * xstride;
    const uint8_t *w[4];
    float32x4_t acc[4][2];
    for (int r = 0; r < R; r++) {
        w[r] = a->W + (size_t)(o + r) * a->w_row_bytes;
        acc[r][0] = acc[r][1] = vdupq_n_f32(0.0f);
    }
    for (int64_t i = 0; i < a->n_in; i += 8) {
        float32x4_t x0 = load_x4(x, i, kind), x1 = load_x4(x, i + 4, kind);
        for (int r = 0; r < R; r++) {
            acc[r][0] = vfmaq_f32(acc[r][0], load_w4(w[r], i, kind), x0);
            acc[r][1] = vfmaq_f32(acc[r][1], load_w4(w[r], i + 4, kind), x1);
        }
    }
    for (int r = 0; r < R; r++)
        a->Y[t * a->n_out + o + r] = vaddvq_f32(vaddq_f32(acc[r][0], acc[r][1]));
}

INLINE void f_rows(const kern_mm_args *a, int64_t r0, int64_t r1, int kind)
{
    for (int64_t t = 0; t < a->n_tok; t++) {
        int64_t o = r0;
        for (; o + 4 <= r1; o += 4)
            f_tile(a, o, 4, t, kind);
        for (; o < r1; o++)
            f_tile(a, o, 1, t, kind);
    }
}

static void mm_f32_neon(const kern_mm_args *a, int64_t r0, int64_t r1, void *work)
{
    (void)work;
    f_rows(a, r0, r1, WK_F32);
}

static void mm_f16_neon(const kern_mm_args *a, int64_t r0, int64_t r1, void *work)
{
    (void)work;
    f_rows(a, r0, r1, WK_F16);
}

static void mm_bf16_neon(const kern_mm_args *a, int64_t r0, int64_t r1, void *work)
{
    (void)work;
    f_rows(a, r0, r1, WK_BF16);
}

kern_mm_kernel kern_mm_lookup_neon(int wtype)
{
    kern_mm_kernel k = {0};
    switch (wtype) {
    case GGML_TYPE_F32:
        k.mm = mm_f32_neon;
        break;
    case GGML_TYPE_F16:
        k.mm = mm_f16_neon;
        k.cvt = cvt_f16_neon;
        k.xc_row_bytes_per_32 = 128;
        break;
    case GGML_TYPE_BF16: /* activations converted by the scalar code (exact RNE + NaN rules) */
        k.mm = mm_bf16_neon;
        k.cvt = kern_cvt_bf16_scalar;
        k.xc_row_bytes_per_32 = 64;
        break;
    case GGML_TYPE_Q8_0:
        k.mm = mm_q8_0_neon;
        k.cvt = cvt_q8_for_q8_0_neon;
        k.xc_row_bytes_per_32 = KERN_XQ_BYTES_PER_32;
        break;
    case GGML_TYPE_Q4_0:
        k.mm = mm_q4_0_neon;
        k.cvt = cvt_q8_for_q4_0_neon;
        k.xc_row_bytes_per_32 = KERN_XQ_BYTES_PER_32;
        break;
    default:
        break;
    }
    return k;
}

#else /* not AArch64 */

kern_mm_kernel kern_mm_lookup_neon(int wtype)
{
    kern_mm_kernel k = {0};
    (void)wtype;
    return k;
}

#endif
