/* attn_exp.h - the exponential of the attention softmax: one scalar definition and AVX2 /
 * AVX-512 forms that give its bits exactly, so that every attention path (per head, grouped,
 * scalar, SIMD) keeps the same results while the exps run 8 or 16 at a time.
 *
 * Cephes' expf: n = floor(x log2(e) + 1/2), r = x - n ln2 (ln2 in two parts), e^r by a degree-5
 * polynomial, times 2^n built in the exponent bits. Every step is a rounded multiply or add (no
 * fma), the same IEEE operations in every form. Relative error below 1.5e-7 on [-87.3, 0]
 * (8e-8 measured against double exp by tests/test_attn_group.c). Inputs below ATTN_EXP_LO (where e^x leaves the
 * normal floats) give 0, above ATTN_EXP_HI the value at ATTN_EXP_HI, NaN gives NaN. The softmax
 * only passes x = score - max <= 0. */
#ifndef FORGE_CPU_ATTN_EXP_H
#define FORGE_CPU_ATTN_EXP_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#define ATTN_EXP_LO (-87.33654f) /* ln(2^-126) */
#define ATTN_EXP_HI 88.0f
#define ATTN_EXP_LOG2E 1.44269504088896341f
#define ATTN_EXP_C1 0.693359375f
#define ATTN_EXP_C2 (-2.12194440e-4f)
#define ATTN_EXP_P0 1.9875691500e-4f
#define ATTN_EXP_P1 1.3981999507e-3f
#define ATTN_EXP_P2 8.3334519073e-3f
#define ATTN_EXP_P3 4.1665795894e-2f
#define ATTN_EXP_P4 1.6666665459e-1f
#define ATTN_EXP_P5 5.0000001201e-1f

static inline float attn_expf(float x)
{
    if (x != x) return x;
    if (x < ATTN_EXP_LO) return 0.0f;
    if (x > ATTN_EXP_HI) x = ATTN_EXP_HI;
    const float fx = floorf(x * ATTN_EXP_LOG2E + 0.5f);
    float r = x - fx * ATTN_EXP_C1;
    r = r - fx * ATTN_EXP_C2;
    const float z = r * r;
    float y = ATTN_EXP_P0 * r + ATTN_EXP_P1;
    y = y * r + ATTN_EXP_P2;
    y = y * r + ATTN_EXP_P3;
    y = y * r + ATTN_EXP_P4;
    y = y * r + ATTN_EXP_P5;
    y = y * z + r;
    y = y + 1.0f;
    const uint32_t bits = (uint32_t)((int32_t)fx + 127) << 23;
    float p2;
    memcpy(&p2, &bits, sizeof p2);
    return y * p2;
}

#if defined(__x86_64__)
#include <immintrin.h>

/* attn_expf of each lane (AVX2) */
__attribute__((target("avx2"))) static inline __m256 attn_exp8(__m256 x0)
{
    const __m256 nan = _mm256_cmp_ps(x0, x0, _CMP_UNORD_Q);
    const __m256 lo = _mm256_cmp_ps(x0, _mm256_set1_ps(ATTN_EXP_LO), _CMP_LT_OQ);
    /* NaN lanes compute on 0, and are put back at the end */
    __m256 x = _mm256_andnot_ps(nan, x0);
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(ATTN_EXP_HI)), _mm256_set1_ps(ATTN_EXP_LO));
    const __m256 fx = _mm256_floor_ps(
        _mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(ATTN_EXP_LOG2E)), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(ATTN_EXP_C1)));
    r = _mm256_sub_ps(r, _mm256_mul_ps(fx, _mm256_set1_ps(ATTN_EXP_C2)));
    const __m256 z = _mm256_mul_ps(r, r);
    __m256 y = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(ATTN_EXP_P0), r), _mm256_set1_ps(ATTN_EXP_P1));
    y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(ATTN_EXP_P2));
    y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(ATTN_EXP_P3));
    y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(ATTN_EXP_P4));
    y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(ATTN_EXP_P5));
    y = _mm256_add_ps(_mm256_mul_ps(y, z), r);
    y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
    const __m256i n = _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127));
    __m256 e = _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(n, 23)));
    e = _mm256_andnot_ps(lo, e);
    return _mm256_blendv_ps(e, x0, nan);
}

/* attn_expf of each lane (AVX-512) */
__attribute__((target("avx512f"))) static inline __m512 attn_exp16(__m512 x0)
{
    const __mmask16 nan = _mm512_cmp_ps_mask(x0, x0, _CMP_UNORD_Q);
    const __mmask16 lo = _mm512_cmp_ps_mask(x0, _mm512_set1_ps(ATTN_EXP_LO), _CMP_LT_OQ);
    __m512 x = _mm512_mask_blend_ps(nan, x0, _mm512_setzero_ps());
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(ATTN_EXP_HI)), _mm512_set1_ps(ATTN_EXP_LO));
    const __m512 fx = _mm512_roundscale_ps(
        _mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(ATTN_EXP_LOG2E)), _mm512_set1_ps(0.5f)),
        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(fx, _mm512_set1_ps(ATTN_EXP_C1)));
    r = _mm512_sub_ps(r, _mm512_mul_ps(fx, _mm512_set1_ps(ATTN_EXP_C2)));
    const __m512 z = _mm512_mul_ps(r, r);
    __m512 y = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(ATTN_EXP_P0), r), _mm512_set1_ps(ATTN_EXP_P1));
    y = _mm512_add_ps(_mm512_mul_ps(y, r), _mm512_set1_ps(ATTN_EXP_P2));
    y = _mm512_add_ps(_mm512_mul_ps(y, r), _mm512_set1_ps(ATTN_EXP_P3));
    y = _mm512_add_ps(_mm512_mul_ps(y, r), _mm512_set1_ps(ATTN_EXP_P4));
    y = _mm512_add_ps(_mm512_mul_ps(y, r), _mm512_set1_ps(ATTN_EXP_P5));
    y = _mm512_add_ps(_mm512_mul_ps(y, z), r);
    y = _mm512_add_ps(y, _mm512_set1_ps(1.0f));
    const __m512i n = _mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127));
    __m512 e = _mm512_mul_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32(n, 23)));
    e = _mm512_mask_blend_ps(lo, e, _mm512_setzero_ps());
    return _mm512_mask_blend_ps(nan, e, x0);
}
#endif

#endif
