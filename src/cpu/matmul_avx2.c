/* matmul_avx2.c - AVX2 + FMA + F16C row kernels for kern_matmul (x86-64 only; compiled with
 * target attributes, used only when cpu_features.c finds the CPU support). Also the fallback of
 * the AVX-512 ISA for types whose AVX-512 kernel needs an extension the CPU lacks.
 *
 * Q4_0: nibbles (0..15) times activations by vpmaddubsw, the -8 offset through the activation
 * row's ncorr; Q8_0: |w| times sign(w) * x by vpmaddubsw. Each block's integer sum is exact and
 * scaled by d_w * d_x in float, as ggml's AVX2 code does. Four weight rows share each activation
 * load; tokens are looped outside (this is the fallback ISA on the machines Forge targets).
 * F32/F16/BF16: register tiles of 4 rows x 2 tokens, f32 FMA. */
#include <string.h>

#include "core/fp16.h"
#include "cpu/kern_impl.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define TGT __attribute__((target("avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline))

TGT INLINE float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

TGT INLINE float hmax8(__m256 v)
{
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

TGT INLINE int32_t hsum8i(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

TGT INLINE float fp16_scalar(const uint8_t *p)
{
    return _cvtsh_ss(kern_load_u16(p));
}

/* ---- activation converters (bit-identical to the scalar ones) --------------------------- */

TGT static void cvt_q8_avx2(const float *x, void *dst, int64_t n, int32_t corr_mul)
{
    uint8_t *qs = dst;
    float *dv = (float *)(void *)(qs + n);
    int32_t *ncorr = (int32_t *)(void *)(qs + n + n / 8);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < n / KERN_QK; b++, x += KERN_QK) {
        __m256 v[4];
        __m256 m = _mm256_setzero_ps();
        for (int k = 0; k < 4; k++) {
            v[k] = _mm256_loadu_ps(x + 8 * k);
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[k]));
        }
        float amax = hmax8(m);
        float d = amax / 127.0f;
        float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        __m256 mul = _mm256_set1_ps(id);
        __m256i i[4];
        for (int k = 0; k < 4; k++)
            i[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], mul)); /* RNE */
        __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        __m256i p01 = _mm256_packs_epi32(i[0], i[1]), p23 = _mm256_packs_epi32(i[2], i[3]);
        __m256i q = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), perm);
        _mm256_storeu_si256((__m256i *)(void *)(qs + b * KERN_QK), q);
        dv[b] = _cvtsh_ss(_cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        ncorr[b] = -corr_mul * hsum8i(sum);
    }
}

static void cvt_q8_for_q4_0_avx2(const float *x, void *dst, int64_t n)
{
    cvt_q8_avx2(x, dst, n, 8);
}

static void cvt_q8_for_q8_0_avx2(const float *x, void *dst, int64_t n)
{
    cvt_q8_avx2(x, dst, n, 128);
}

TGT static void cvt_f16_avx2(const float *x, void *dst, int64_t n)
{
    float *y = dst;
    for (int64_t i = 0; i < n; i += 8) {
        __m128i h =
            _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_storeu_ps(y + i, _mm256_cvtph_ps(h));
    }
}

/* Round to nearest even; NaN -> quiet NaN with the same sign and top payload bits. */
TGT static void cvt_bf16_avx2(const float *x, void *dst, int64_t n)
{
    uint8_t *y = dst;
    const __m256i absmask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
    const __m256i bias = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
    const __m256i qbit = _mm256_set1_epi32(0x40);
    for (int64_t i = 0; i < n; i += 16) {
        __m256i r[2];
        for (int k = 0; k < 2; k++) {
            __m256i u = _mm256_castps_si256(_mm256_loadu_ps(x + i + 8 * k));
            __m256i isnan = _mm256_cmpgt_epi32(_mm256_and_si256(u, absmask), inf);
            __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
            __m256i rounded =
                _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(bias, lsb)), 16);
            __m256i nanv = _mm256_or_si256(_mm256_srli_epi32(u, 16), qbit);
            r[k] = _mm256_blendv_epi8(rounded, nanv, isnan);
        }
        __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r[0], r[1]), 0xd8);
        _mm256_storeu_si256((__m256i *)(void *)(y + 2 * i), packed);
    }
}

/* ---- Q8_0 / Q4_0 ------------------------------------------------------------------------ */

#define Q_ROWS 4

/* R rows from o, one token. */
TGT INLINE void q_tile(const kern_mm_args *a, int64_t o, int R, int64_t t, int is_q4)
{
    const uint8_t *xrow = a->Xc + (size_t)t * a->xc_row_bytes;
    const int8_t *xq = (const int8_t *)xrow;
    const float *xd = kern_xq_d(xrow, a->n_in);
    const int32_t *nc = kern_xq_ncorr(xrow, a->n_in);
    const int64_t nb = a->n_in / KERN_QK;
    const size_t bb = is_q4 ? KERN_Q4_0_BYTES : KERN_Q8_0_BYTES;
    const __m128i lo4 = _mm_set1_epi8(0x0f);
    const __m256i ones16 = _mm256_set1_epi16(1);
    const uint8_t *w[Q_ROWS];
    __m256 acc[Q_ROWS];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        w[r] = a->W + (size_t)(o + r) * a->w_row_bytes;
        acc[r] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < nb; b++) {
        __m256i xv = _mm256_loadu_si256((const __m256i *)(const void *)(xq + b * KERN_QK));
        __m256i ncv = _mm256_setr_epi32(nc[b], 0, 0, 0, 0, 0, 0, 0);
        float dx = xd[b];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const uint8_t *wb = w[r] + (size_t)b * bb;
            __m256i p;
            if (is_q4) {
                __m128i q = _mm_loadu_si128((const __m128i *)(const void *)(wb + 2));
                __m128i lo = _mm_and_si128(q, lo4), hi = _mm_and_si128(_mm_srli_epi16(q, 4), lo4);
                __m256i u = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
                p = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(u, xv), ones16), ncv);
            } else {
                __m256i q = _mm256_loadu_si256((const __m256i *)(const void *)(wb + 2));
                __m256i s = _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(xv, q));
                p = _mm256_madd_epi16(s, ones16);
            }
            __m256 scale = _mm256_set1_ps(fp16_scalar(wb) * dx);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[r]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
        a->Y[t * a->n_out + o + r] = hsum8(acc[r]);
}

TGT INLINE void q_rows(const kern_mm_args *a, int64_t r0, int64_t r1, int is_q4)
{
    for (int64_t t = 0; t < a->n_tok; t++) {
        int64_t o = r0;
        for (; o + Q_ROWS <= r1; o += Q_ROWS)
            q_tile(a, o, Q_ROWS, t, is_q4);
        for (; o < r1; o++)
            q_tile(a, o, 1, t, is_q4);
    }
}

TGT static void mm_q4_0_avx2(const kern_mm_args *a, int64_t r0, int64_t r1, void *work)
{
    q_rows(a, r0, r1, 1);
}

TGT static void mm_q8_0_avx2(const kern_mm_args *a, int64_t r0, int64_t r1, void *work)
{
    q_rows(a, r0, r1, 0);
}

/* ---- F32 / F16 / BF16 ------------------------------------------------------------------- */

enum { WK_F32, WK_F16, WK_BF16 };

TGT INLINE __m256 load_w8(const uint8_t *w, int64_t i, int kind)
{
    if (kind == WK_F16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(w + 2 * i)));
    if (kind == WK_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(const void *)(w + 2 * i))),
            16));
    return _mm256_loadu_ps((const float *)(const void *)(w + 4 * i));
}

/* 8 activations of token row x at element i as floats (F32: X, F16: rounded floats in Xc,
 * BF16: bf16 in Xc). */
TGT INLINE __m256 load_x8(const uint8_t *x, int64_t i, int kind)
{
    if (kind == WK_BF16) return load_w8(x, i, WK_BF16);
    return _mm256_loadu_ps((const float *)(const void *)(x + 4 * i));
}

TGT INLINE void f_tile(const kern_mm_args *a, int64_t o, int R, int64_t t0, int T, int kind)
{
    const uint8_t *x[2], *w[4];
    __m256 acc[4][2];
    size_t xstride = kind == WK_F32 ? (size_t)a->n_in * 4 : a->xc_row_bytes;
    const uint8_t *xbase = kind == WK_F32 ? (const uint8_t *)a->X : a->Xc;
#pragma GCC unroll 2
    for (int t = 0; t < T; t++)
        x[t] = xbase + (size_t)(t0 + t) * xstride;
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        w[r] = a->W + (size_t)(o + r) * a->w_row_bytes;
#pragma GCC unroll 2
        for (int t = 0; t < T; t++)
            acc[r][t] = _mm256_setzero_ps();
    }
    for (int64_t i = 0; i < a->n_in; i += 8) {
        __m256 wv[4];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
            wv[r] = load_w8(w[r], i, kind);
#pragma GCC unroll 2
        for (int t = 0; t < T; t++) {
            __m256 xv = load_x8(x[t], i, kind);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++)
                acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 2
        for (int t = 0; t < T; t++)
            a->Y[(t0 + t) * a->n_out + o + r] = hsum8(acc[r][t]);
}

TGT INLINE void f_rows(const kern_mm_args *a, int64_t r0, int64_t r1, int kind)
{
    int64_t o = r0;
    for (; o + 4 <= r1; o += 4) {
        int64_t t = 0;
        for (; t + 2 <= a->n_tok; t += 2)
            f_tile(a, o, 4, t, 2, kind);
        if (t < a->n_tok) f_tile(a, o, 4, t, 1, kind);
    }
    for (; o < r1; o++)
        for (int64_t t = 0; t < a->n_tok; t++)
            f_tile(a, o, 1, t, 1, kind);
}

TGT static void mm_f32_avx2(const kern_mm_args *a, int64_t r0, int64_t r1, void *work)
{
    f_rows(a, r0, r1, WK_F32);
}

TGT static void mm_f16_avx2(const kern_mm_args *a, int64_t r0, int64_t r1, void *work)
{
    f_rows(a, r0, r1, WK_F16);
}

TGT static void mm_bf16_avx2(const kern_mm_args *a, int64_t r0, int64_t r1, void *work)
{
    f_rows(a, r0, r1, WK_BF16);
}

kern_mm_kernel kern_mm_lookup_avx2(int wtype)
{
    kern_mm_kernel k = {0};
    switch (wtype) {
    case GGML_TYPE_F32:
        k.mm = mm_f32_avx2;
        break;
    case GGML_TYPE_F16:
        k.mm = mm_f16_avx2;
        k.cvt = cvt_f16_avx2;
        k.xc_row_bytes_per_32 = 128;
        break;
    case GGML_TYPE_BF16:
        k.mm = mm_bf16_avx2;
        k.cvt = cvt_bf16_avx2;
        k.xc_row_bytes_per_32 = 64;
        break;
    case GGML_TYPE_Q8_0:
        k.mm = mm_q8_0_avx2;
        k.cvt = cvt_q8_for_q8_0_avx2;
        k.xc_row_bytes_per_32 = KERN_XQ_BYTES_PER_32;
        break;
    case GGML_TYPE_Q4_0:
        k.mm = mm_q4_0_avx2;
        k.cvt = cvt_q8_for_q4_0_avx2;
        k.xc_row_bytes_per_32 = KERN_XQ_BYTES_PER_32;
        break;
    default:
        break;
    }
    return k;
}

#else /* not x86-64 */

kern_mm_kernel kern_mm_lookup_avx2(int wtype)
{
    kern_mm_kernel k = {0};
    (void)wtype;
    return k;
}

#endif
