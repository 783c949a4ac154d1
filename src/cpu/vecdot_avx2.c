/* vecdot_avx2.c - AVX2 dot products of the traits table (src/quant/qtypes.h) for types that
 * kern_matmul runs through its generic row loop: one weight row times one activation row
 * quantized to the type's vec_dot_type (ggml layouts). Each super-block's integer sums are exact
 * (vpmaddubsw of unsigned weights by signed activations, then vpmaddwd by the sub-block scales)
 * and the float scaling is the scalar reference's, so results equal src/quant/vecdot.c up to
 * nothing at all (tests/test_qtypes.c asserts 1e-4 relative). Compiled with target attributes;
 * chosen at run time only on CPUs with AVX2 (src/cpu/matmul.c). */
#include <string.h>

#include "core/fp16.h"
#include "quant/qtypes.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define TGT __attribute__((target("avx2,fma,f16c")))

TGT static inline int hsum_i32(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

static inline float q8k_d(const uint8_t *y)
{
    float d;
    memcpy(&d, y, 4);
    return d;
}

static inline int q8k_bsum(const uint8_t *y, int g)
{
    return (int16_t)forge_qt_u16(y + 4 + FORGE_QK_K + 2 * g);
}

static inline float half_at(const uint8_t *p)
{
    return forge_fp16_to_f32(forge_qt_u16(p));
}

/* Q4_K: per 64 elements one 32-byte load of nibbles; low nibbles take sub-block 2j's scale,
 * high nibbles 2j+1's; the mins through the activations' bsums. */
TGT float forge_vec_dot_q4_k_q8_k_avx2(int64_t n, const void *w, const void *xq)
{
    const uint8_t *b = w, *y = xq;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / FORGE_QK_K; i++, b += 144, y += FORGE_Q8_K_BYTES) {
        const int8_t *ys = (const int8_t *)(y + 4);
        uint8_t sc[8], mn[8];
        int summ = 0;
        for (int j = 0; j < 8; j++) {
            forge_k4_scale_min(j, b + 4, &sc[j], &mn[j]);
            summ += mn[j] * (q8k_bsum(y, 2 * j) + q8k_bsum(y, 2 * j + 1));
        }
        __m256i acc = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            __m256i q4 = _mm256_loadu_si256((const __m256i *)(b + 16 + 32 * j));
            __m256i lo = _mm256_and_si256(q4, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);
            __m256i plo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(ys + 64 * j)));
            __m256i phi = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(ys + 64 * j + 32)));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(plo, _mm256_set1_epi16(sc[2 * j])));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(phi, _mm256_set1_epi16(sc[2 * j + 1])));
        }
        int isum = hsum_i32(acc);
        float dy = q8k_d(y);
        sumf += half_at(b) * dy * (float)isum - half_at(b + 2) * dy * (float)summ;
    }
    return sumf;
}

/* Q6_K: the 6-bit values unsigned (q + 32) against the activations, 32 * sum(y) of each group of
 * 16 (the bsums) subtracted after scaling. */
TGT float forge_vec_dot_q6_k_q8_k_avx2(int64_t n, const void *w, const void *xq)
{
    const uint8_t *b = w, *y = xq;
    const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / FORGE_QK_K; i++, b += 210, y += FORGE_Q8_K_BYTES) {
        const int8_t *ys = (const int8_t *)(y + 4);
        const int8_t *sc = (const int8_t *)(b + 192);
        int corr = 0;
        for (int g = 0; g < 16; g++) corr += sc[g] * q8k_bsum(y, g);
        __m256i acc = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            __m256i ql0 = _mm256_loadu_si256((const __m256i *)(b + 64 * h));
            __m256i ql1 = _mm256_loadu_si256((const __m256i *)(b + 64 * h + 32));
            __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
            __m256i v[4];
            v[0] = _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30));
            v[1] = _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30));
            v[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(qh, m30));
            v[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                                   _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30));
            for (int k = 0; k < 4; k++) {
                int g = 8 * h + 2 * k;
                __m256i p = _mm256_maddubs_epi16(v[k], _mm256_loadu_si256((const __m256i *)(ys + 128 * h + 32 * k)));
                __m256i s = _mm256_set_m128i(_mm_set1_epi16(sc[g + 1]), _mm_set1_epi16(sc[g]));
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, s));
            }
        }
        int isum = hsum_i32(acc) - 32 * corr;
        sumf += half_at(b + 208) * q8k_d(y) * (float)isum;
    }
    return sumf;
}

#endif
