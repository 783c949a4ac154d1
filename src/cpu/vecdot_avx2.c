/* vecdot_avx2.c - x86 SIMD dot products of the traits table (src/quant/qtypes.h) for the types
 * kern_matmul runs through its generic row loop: one weight row times one activation row (or 4,
 * the _x4 forms for prompts) quantized to the type's vec_dot_type (ggml layouts). AVX2 for
 * Q4_1, Q5_0, Q5_1, Q2_K..Q6_K, IQ4_NL, IQ4_XS; AVX-512 (F/BW) for Q4_K and Q6_K. Each block's
 * integer sums are exact (vpmaddubsw of unsigned weights by signed activations, then vpmaddwd by
 * the sub-block scales; signed weights through offsets removed with the activations' sums) and
 * the float scaling is the scalar reference's expression, so results equal src/quant/vecdot.c
 * (tests/test_qtypes.c asserts 1e-4 relative). Compiled with target attributes; chosen at run
 * time only on CPUs with the ISA (src/cpu/matmul.c). */
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

/* fp16 -> f32 by F16C: exact, as forge_fp16_to_f32 (which branches per value in C). */
TGT static inline float half_at(const uint8_t *p)
{
    return _cvtsh_ss(forge_qt_u16(p));
}

/* Sub-block scales as vpmaddwd operands without a trip through memory: v holds 8 16-bit scales,
 * the same in both 128-bit lanes (sc8_u / sc8_s); pick1 broadcasts scale i to all 16 lanes,
 * pick2 scale i to the low 8 lanes and scale j to the high 8 (one vpshufb each; i, j are
 * constants once the loops are unrolled). */
TGT static inline __m256i sc8_u(__m128i bytes)
{
    return _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(bytes));
}
TGT static inline __m256i sc8_s(const int8_t *p)
{
    return _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)p)));
}
TGT static inline __m256i sc_pick2(__m256i v, int i, int j)
{
    const __m128i lo = _mm_set1_epi16((short)(((2 * i + 1) << 8) | (2 * i)));
    const __m128i hi = _mm_set1_epi16((short)(((2 * j + 1) << 8) | (2 * j)));
    return _mm256_shuffle_epi8(v, _mm256_set_m128i(hi, lo));
}
TGT static inline __m256i sc_pick1(__m256i v, int i)
{
    return sc_pick2(v, i, i);
}

/* The 8 scales and 8 mins of a Q4_K/Q5_K block's 12 scale bytes (forge_k4_scale_min for all j at
 * once, on 32-bit words): scales in the low 8 bytes of the result, mins in the high 8. */
static inline __m128i k4_scales_mins(const uint8_t *q)
{
    uint32_t a, b, c, u[4];
    memcpy(&a, q, 4);
    memcpy(&b, q + 4, 4);
    memcpy(&c, q + 8, 4);
    u[0] = a & 0x3f3f3f3fu;
    u[1] = (c & 0x0f0f0f0fu) | (((a >> 6) & 0x03030303u) << 4);
    u[2] = b & 0x3f3f3f3fu;
    u[3] = ((c >> 4) & 0x0f0f0f0fu) | (((b >> 6) & 0x03030303u) << 4);
    return _mm_loadu_si128((const __m128i *)u);
}

/* sum_j mins[j] * (bsums[2j] + bsums[2j+1]) of one Q8_K activation block. */
TGT static inline int k4_summ(__m128i scmn, const uint8_t *y)
{
    const __m128i dup = _mm_set_epi8(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8);
    __m256i mins = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(scmn, dup));
    __m256i bs = _mm256_loadu_si256((const __m256i *)(y + 4 + FORGE_QK_K));
    return hsum_i32(_mm256_madd_epi16(mins, bs));
}

/* Q4_K: per 64 elements one 32-byte load of nibbles; low nibbles take sub-block 2j's scale,
 * high nibbles 2j+1's. The lanes of one super-block's scaled sums (their total is the block's
 * exact integer sum; the mins go through the activations' bsums). */
TGT static inline __m256i q4k_lanes(const uint8_t *b, const int8_t *ys, __m256i sc)
{
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256i acc = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) {
        __m256i q4 = _mm256_loadu_si256((const __m256i *)(b + 16 + 32 * j));
        __m256i lo = _mm256_and_si256(q4, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);
        __m256i plo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(ys + 64 * j)));
        __m256i phi = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(ys + 64 * j + 32)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(plo, sc_pick1(sc, 2 * j)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(phi, sc_pick1(sc, 2 * j + 1)));
    }
    return acc;
}

TGT float forge_vec_dot_q4_k_q8_k_avx2(int64_t n, const void *w, const void *xq)
{
    const uint8_t *b = w, *y = xq;
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / FORGE_QK_K; i++, b += 144, y += FORGE_Q8_K_BYTES) {
        const __m128i scmn = k4_scales_mins(b + 4);
        int summ = k4_summ(scmn, y);
        int isum = hsum_i32(q4k_lanes(b, (const int8_t *)(y + 4), sc8_u(scmn)));
        float dy = q8k_d(y);
        const float pw = half_at(b) * dy * (float)isum, pm = half_at(b + 2) * dy * (float)summ;
        sumf += pw - pm; /* separate statements: no fma contraction (matmul_kq_avx512.c) */
    }
    return sumf;
}

/* sum_g scales[g] * bsums[g] over the 16 groups of 16 (signed 8-bit scales). */
TGT static inline int scaled_bsums(const int8_t *sc, const uint8_t *y)
{
    __m256i s = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)sc));
    __m256i bs = _mm256_loadu_si256((const __m256i *)(y + 4 + FORGE_QK_K));
    return hsum_i32(_mm256_madd_epi16(s, bs));
}

/* Q6_K: the 6-bit values unsigned (q + 32) against the activations, 32 * sum(y) of each group of
 * 16 (the bsums) subtracted after scaling. v[k]: the values of elements 128 h + 32 k .. + 31. */
TGT static inline void q6k_half(const uint8_t *b, int h, __m256i v[4])
{
    const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
    __m256i ql0 = _mm256_loadu_si256((const __m256i *)(b + 64 * h));
    __m256i ql1 = _mm256_loadu_si256((const __m256i *)(b + 64 * h + 32));
    __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
    v[0] = _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30));
    v[1] = _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30));
    v[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(qh, m30));
    v[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                           _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30));
}

/* The lanes of one super-block's scaled sums of the unsigned values (offset not removed). */
TGT static inline __m256i q6k_lanes(const uint8_t *b, const int8_t *ys)
{
    const int8_t *sc = (const int8_t *)(b + 192);
    __m256i acc = _mm256_setzero_si256();
#pragma GCC unroll 2
    for (int h = 0; h < 2; h++) {
        const __m256i sch = sc8_s(sc + 8 * h);
        __m256i v[4];
        q6k_half(b, h, v);
#pragma GCC unroll 4
        for (int k = 0; k < 4; k++) {
            __m256i p = _mm256_maddubs_epi16(v[k], _mm256_loadu_si256((const __m256i *)(ys + 128 * h + 32 * k)));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, sc_pick2(sch, 2 * k, 2 * k + 1)));
        }
    }
    return acc;
}

TGT float forge_vec_dot_q6_k_q8_k_avx2(int64_t n, const void *w, const void *xq)
{
    const uint8_t *b = w, *y = xq;
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / FORGE_QK_K; i++, b += 210, y += FORGE_Q8_K_BYTES) {
        int corr = scaled_bsums((const int8_t *)(b + 192), y);
        int isum = hsum_i32(q6k_lanes(b, (const int8_t *)(y + 4))) - 32 * corr;
        const float pw = half_at(b + 208) * q8k_d(y) * (float)isum;
        sumf += pw; /* a separate statement: no fma contraction (matmul_kq_avx512.c) */
    }
    return sumf;
}

/* Scales of two consecutive groups of 16 as the 16 int16 lanes of a vpmaddwd operand. */
TGT static inline __m256i scales_2x16(int a, int b)
{
    return _mm256_set_m128i(_mm_set1_epi16((short)b), _mm_set1_epi16((short)a));
}

/* Q5_K: Q4_K plus a 5th bit per element from qh (bit 2j / 2j+1 for the j-th 64). */
TGT float forge_vec_dot_q5_k_q8_k_avx2(int64_t n, const void *w, const void *xq)
{
    const uint8_t *b = w, *y = xq;
    const __m256i m4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / FORGE_QK_K; i++, b += 176, y += FORGE_Q8_K_BYTES) {
        const int8_t *ys = (const int8_t *)(y + 4);
        const __m128i scmn = k4_scales_mins(b + 4);
        const __m256i sc = sc8_u(scmn);
        int summ = k4_summ(scmn, y);
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 16));
        __m256i acc = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {
            __m256i q4 = _mm256_loadu_si256((const __m256i *)(b + 48 + 32 * j));
            __m256i h0 = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * j)), one);
            __m256i h1 = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * j + 1)), one);
            __m256i lo = _mm256_or_si256(_mm256_and_si256(q4, m4), _mm256_slli_epi16(h0, 4));
            __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4, 4), m4), _mm256_slli_epi16(h1, 4));
            __m256i plo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(ys + 64 * j)));
            __m256i phi = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(ys + 64 * j + 32)));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(plo, sc_pick1(sc, 2 * j)));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(phi, sc_pick1(sc, 2 * j + 1)));
        }
        int isum = hsum_i32(acc);
        float dy = q8k_d(y);
        const float pw = half_at(b) * dy * (float)isum, pm = half_at(b + 2) * dy * (float)summ;
        sumf += pw - pm;
    }
    return sumf;
}

/* Q3_K: q + 4 = the 2 low bits | the hmask bit << 2 (unsigned 0..7); 4 * sum(y) per group of 16
 * (bsums) times its scale subtracted. */
TGT float forge_vec_dot_q3_k_q8_k_avx2(int64_t n, const void *w, const void *xq)
{
    const uint8_t *b = w, *y = xq;
    const __m256i m3 = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / FORGE_QK_K; i++, b += 110, y += FORGE_Q8_K_BYTES) {
        const int8_t *ys = (const int8_t *)(y + 4);
        int8_t sc[16];
        forge_k3_scales(b + 96, sc);
        int corr = scaled_bsums(sc, y);
        const __m256i hm = _mm256_loadu_si256((const __m256i *)b);
        __m256i acc = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            __m256i q2 = _mm256_loadu_si256((const __m256i *)(b + 32 + 32 * h));
            for (int s = 0; s < 4; s++) {
                __m256i lo = _mm256_and_si256(_mm256_srl_epi16(q2, _mm_cvtsi32_si128(2 * s)), m3);
                __m256i hb = _mm256_and_si256(_mm256_srl_epi16(hm, _mm_cvtsi32_si128(4 * h + s)), one);
                __m256i u = _mm256_or_si256(lo, _mm256_slli_epi16(hb, 2));
                __m256i p = _mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i *)(ys + 128 * h + 32 * s)));
                int g = 8 * h + 2 * s;
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, scales_2x16(sc[g], sc[g + 1])));
            }
        }
        int isum = hsum_i32(acc) - 4 * corr;
        sumf += half_at(b + 108) * q8k_d(y) * (float)isum;
    }
    return sumf;
}

/* Q2_K: 2-bit values (unsigned), 4-bit scales per 16, mins through the bsums. */
TGT float forge_vec_dot_q2_k_q8_k_avx2(int64_t n, const void *w, const void *xq)
{
    const uint8_t *b = w, *y = xq;
    const __m256i m3 = _mm256_set1_epi8(3);
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / FORGE_QK_K; i++, b += 84, y += FORGE_Q8_K_BYTES) {
        const int8_t *ys = (const int8_t *)(y + 4);
        int summs = 0;
        for (int g = 0; g < 16; g++) summs += q8k_bsum(y, g) * (b[g] >> 4);
        __m256i acc = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            __m256i q2 = _mm256_loadu_si256((const __m256i *)(b + 16 + 32 * h));
            for (int s = 0; s < 4; s++) {
                __m256i u = _mm256_and_si256(_mm256_srl_epi16(q2, _mm_cvtsi32_si128(2 * s)), m3);
                __m256i p = _mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i *)(ys + 128 * h + 32 * s)));
                int g = 8 * h + 2 * s;
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, scales_2x16(b[g] & 0xF, b[g + 1] & 0xF)));
            }
        }
        int isum = hsum_i32(acc);
        float dy = q8k_d(y);
        sumf += dy * half_at(b + 80) * (float)isum - dy * half_at(b + 82) * (float)summs;
    }
    return sumf;
}

/* 32 signed table values (IQ4_NL/IQ4_XS) times 32 activations: 16 int16 pair sums, through
 * |w| x sign(y, w) (|w| <= 127, so no pair saturates). */
TGT static inline __m256i iq4_pairs(__m128i q16, const int8_t *ys, __m256i table)
{
    const __m128i m4 = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(q16, m4), hi = _mm_and_si128(_mm_srli_epi16(q16, 4), m4);
    __m256i idx = _mm256_set_m128i(hi, lo);
    __m256i v = _mm256_shuffle_epi8(table, idx);
    __m256i yv = _mm256_loadu_si256((const __m256i *)ys);
    return _mm256_maddubs_epi16(_mm256_sign_epi8(v, v), _mm256_sign_epi8(yv, v));
}

TGT float forge_vec_dot_iq4_xs_q8_k_avx2(int64_t n, const void *w, const void *xq)
{
    const uint8_t *b = w, *y = xq;
    const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)forge_iq4nl_values));
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / FORGE_QK_K; i++, b += 136, y += FORGE_Q8_K_BYTES) {
        const int8_t *ys = (const int8_t *)(y + 4);
        unsigned sh = forge_qt_u16(b + 2);
        __m256i acc = _mm256_setzero_si256();
        for (int ib = 0; ib < 8; ib++) {
            int ls = (((b[4 + ib / 2] >> (4 * (ib % 2))) & 0xF) | (((sh >> (2 * ib)) & 3) << 4)) - 32;
            __m256i p = iq4_pairs(_mm_loadu_si128((const __m128i *)(b + 8 + 16 * ib)), ys + 32 * ib, table);
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16((short)ls)));
        }
        int isum = hsum_i32(acc);
        sumf += half_at(b) * q8k_d(y) * (float)isum;
    }
    return sumf;
}

TGT float forge_vec_dot_iq4_nl_q8_0_avx2(int64_t n, const void *w, const void *xq)
{
    const uint8_t *b = w, *y = xq;
    const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)forge_iq4nl_values));
    const __m256i ones = _mm256_set1_epi16(1);
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / 32; i++, b += 18, y += FORGE_Q8_0_BYTES) {
        __m256i p = iq4_pairs(_mm_loadu_si128((const __m128i *)(b + 2)), (const int8_t *)(y + 2), table);
        int sumi = hsum_i32(_mm256_madd_epi16(p, ones));
        sumf += half_at(b) * half_at(y) * (float)sumi;
    }
    return sumf;
}

/* The 5th bits of a Q5_0/Q5_1 block (u32 qh, bit j = element j) as 0x10 bytes. */
TGT static inline __m256i q5_high(uint32_t qh)
{
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL,
                                           0x0101010101010101LL, 0x0000000000000000LL);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), shuf);
    v = _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}

/* Unsigned 4-bit values of a 32-block: element j < 16 low nibble of byte j, j >= 16 high. */
TGT static inline __m256i nibbles32(const uint8_t *q)
{
    __m128i v = _mm_loadu_si128((const __m128i *)q);
    const __m128i m4 = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m4), _mm_and_si128(v, m4));
}

static inline uint32_t u32_at(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

TGT float forge_vec_dot_q5_0_q8_0_avx2(int64_t n, const void *w, const void *xq)
{
    const uint8_t *b = w, *y = xq;
    const __m256i ones = _mm256_set1_epi16(1), ones8 = _mm256_set1_epi8(1);
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / 32; i++, b += 22, y += FORGE_Q8_0_BYTES) {
        __m256i u = _mm256_or_si256(nibbles32(b + 6), q5_high(u32_at(b + 2)));
        __m256i yv = _mm256_loadu_si256((const __m256i *)(y + 2));
        __m256i p = _mm256_maddubs_epi16(u, yv), sy = _mm256_maddubs_epi16(ones8, yv);
        int sumi = hsum_i32(_mm256_madd_epi16(p, ones)) - 16 * hsum_i32(_mm256_madd_epi16(sy, ones));
        sumf += half_at(b) * half_at(y) * (float)sumi;
    }
    return sumf;
}

TGT float forge_vec_dot_q4_1_q8_1_avx2(int64_t n, const void *w, const void *xq)
{
    const uint8_t *b = w, *y = xq;
    const __m256i ones = _mm256_set1_epi16(1);
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / 32; i++, b += 20, y += FORGE_Q8_1_BYTES) {
        __m256i p = _mm256_maddubs_epi16(nibbles32(b + 4), _mm256_loadu_si256((const __m256i *)(y + 4)));
        int sumi = hsum_i32(_mm256_madd_epi16(p, ones));
        sumf += half_at(b) * half_at(y) * (float)sumi + half_at(b + 2) * half_at(y + 2);
    }
    return sumf;
}

TGT float forge_vec_dot_q5_1_q8_1_avx2(int64_t n, const void *w, const void *xq)
{
    const uint8_t *b = w, *y = xq;
    const __m256i ones = _mm256_set1_epi16(1);
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / 32; i++, b += 24, y += FORGE_Q8_1_BYTES) {
        __m256i u = _mm256_or_si256(nibbles32(b + 8), q5_high(u32_at(b + 4)));
        __m256i p = _mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i *)(y + 4)));
        int sumi = hsum_i32(_mm256_madd_epi16(p, ones));
        sumf += half_at(b) * half_at(y) * (float)sumi + half_at(b + 2) * half_at(y + 2);
    }
    return sumf;
}

/* ---- 4 activation rows per weight row (prompts): the same arithmetic per row ---------------- */

/* Lane k: the sum of the 8 lanes of a[k] (integer sums: exact in any order). */
TGT static inline __m128i hsum4_i32(const __m256i a[4])
{
    const __m256i t = _mm256_hadd_epi32(_mm256_hadd_epi32(a[0], a[1]), _mm256_hadd_epi32(a[2], a[3]));
    return _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
}

/* The 4 rows' Q8_K scales dy, one lane each. */
static inline __m128 q8k_d4(const uint8_t *y, size_t stride)
{
    return _mm_setr_ps(q8k_d(y), q8k_d(y + stride), q8k_d(y + 2 * stride), q8k_d(y + 3 * stride));
}

/* The 4 activation rows' sums are reduced together and their float step runs as one vector, each
 * lane the one-row expression ((d * dy) * isum - (dmin * dy) * summ, added in block order). */
TGT void forge_vec_dot_q4_k_q8_k_x4_avx2(int64_t n, const void *w, const void *xq, size_t stride, float out[4])
{
    const uint8_t *b = w, *y = xq;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m128i dup = _mm_set_epi8(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8);
    __m128 sumf = _mm_setzero_ps();
    for (int64_t i = 0; i < n / FORGE_QK_K; i++, b += 144, y += FORGE_Q8_K_BYTES) {
        const __m128i scmn = k4_scales_mins(b + 4);
        const __m256i sc = sc8_u(scmn);
        __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                          _mm256_setzero_si256()};
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {
            __m256i q4 = _mm256_loadu_si256((const __m256i *)(b + 16 + 32 * j));
            __m256i lo = _mm256_and_si256(q4, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);
            __m256i slo = sc_pick1(sc, 2 * j), shi = sc_pick1(sc, 2 * j + 1);
            for (int k = 0; k < 4; k++) {
                const int8_t *ys = (const int8_t *)(y + k * stride + 4) + 64 * j;
                __m256i plo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)ys));
                __m256i phi = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(ys + 32)));
                acc[k] = _mm256_add_epi32(acc[k], _mm256_madd_epi16(plo, slo));
                acc[k] = _mm256_add_epi32(acc[k], _mm256_madd_epi16(phi, shi));
            }
        }
        const __m256i mins = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(scmn, dup));
        __m256i ms[4];
        for (int k = 0; k < 4; k++)
            ms[k] = _mm256_madd_epi16(mins, _mm256_loadu_si256((const __m256i *)(y + k * stride + 4 + FORGE_QK_K)));
        const __m128 dy = q8k_d4(y, stride);
        const __m128 pw = _mm_mul_ps(_mm_mul_ps(_mm_set1_ps(half_at(b)), dy), _mm_cvtepi32_ps(hsum4_i32(acc)));
        const __m128 pm = _mm_mul_ps(_mm_mul_ps(_mm_set1_ps(half_at(b + 2)), dy), _mm_cvtepi32_ps(hsum4_i32(ms)));
        sumf = _mm_add_ps(sumf, _mm_sub_ps(pw, pm));
    }
    _mm_storeu_ps(out, sumf);
}

TGT void forge_vec_dot_q6_k_q8_k_x4_avx2(int64_t n, const void *w, const void *xq, size_t stride, float out[4])
{
    const uint8_t *b = w, *y = xq;
    __m128 sumf = _mm_setzero_ps();
    for (int64_t i = 0; i < n / FORGE_QK_K; i++, b += 210, y += FORGE_Q8_K_BYTES) {
        const int8_t *sc = (const int8_t *)(b + 192);
        const __m256i scw = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)sc));
        __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                          _mm256_setzero_si256()};
        for (int h = 0; h < 2; h++) {
            __m256i v[4];
            q6k_half(b, h, v);
            for (int q = 0; q < 4; q++) {
                int g = 8 * h + 2 * q;
                __m256i s = _mm256_set_m128i(_mm_set1_epi16(sc[g + 1]), _mm_set1_epi16(sc[g]));
                for (int k = 0; k < 4; k++) {
                    const int8_t *ys = (const int8_t *)(y + k * stride + 4) + 128 * h + 32 * q;
                    __m256i p = _mm256_maddubs_epi16(v[q], _mm256_loadu_si256((const __m256i *)ys));
                    acc[k] = _mm256_add_epi32(acc[k], _mm256_madd_epi16(p, s));
                }
            }
        }
        /* the offset 32 of the unsigned values: 32 * sum_g scales[g] * bsums[g] */
        __m256i sb[4];
        for (int k = 0; k < 4; k++)
            sb[k] = _mm256_madd_epi16(scw, _mm256_loadu_si256((const __m256i *)(y + k * stride + 4 + FORGE_QK_K)));
        const __m128i isum = _mm_sub_epi32(hsum4_i32(acc), _mm_slli_epi32(hsum4_i32(sb), 5));
        const __m128 pw = _mm_mul_ps(_mm_mul_ps(_mm_set1_ps(half_at(b + 208)), q8k_d4(y, stride)),
                                     _mm_cvtepi32_ps(isum));
        sumf = _mm_add_ps(sumf, pw);
    }
    _mm_storeu_ps(out, sumf);
}

/* ---- 4 weight rows per activation row (decode): the same arithmetic per row ---------------- */

/* The 4 rows are read as 4 streams; when they lie one after the other (decode's row groups) the
 * hardware sees a jumble: each super-block step prefetches its share of the bytes R4_AHEAD beyond
 * the group, as one linear stream (a prefetch never faults, past the matrix neither). */
#define R4_AHEAD 16384
TGT static inline void r4_prefetch(const uint8_t *w, size_t ws, int64_t i, size_t sb_bytes)
{
    const uint8_t *p = w + 4 * ws + R4_AHEAD + (size_t)i * 4 * sb_bytes;
    for (size_t l = 0; l < 4 * sb_bytes; l += 64)
        _mm_prefetch((const char *)(p + l), _MM_HINT_T1);
}

/* The 4 rows' fp16 values at p, p + stride, ... as floats (F16C: exact). */
TGT static inline __m128 half4_at(const uint8_t *p, size_t stride)
{
    return _mm_cvtph_ps(_mm_setr_epi16((short)forge_qt_u16(p), (short)forge_qt_u16(p + stride),
                                       (short)forge_qt_u16(p + 2 * stride),
                                       (short)forge_qt_u16(p + 3 * stride), 0, 0, 0, 0));
}

TGT void forge_vec_dot_q4_k_q8_k_r4_avx2(int64_t n, const void *w, size_t ws, const void *xq, float out[4])
{
    const uint8_t *b = w, *y = xq;
    const __m128i dup = _mm_set_epi8(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8);
    __m128 sumf = _mm_setzero_ps();
    for (int64_t i = 0; i < n / FORGE_QK_K; i++, b += 144, y += FORGE_Q8_K_BYTES) {
        r4_prefetch(w, ws, i, 144);
        const __m256i bs = _mm256_loadu_si256((const __m256i *)(y + 4 + FORGE_QK_K));
        __m256i acc[4], ms[4];
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            const uint8_t *br = b + (size_t)r * ws;
            const __m128i scmn = k4_scales_mins(br + 4);
            ms[r] = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_shuffle_epi8(scmn, dup)), bs);
            acc[r] = q4k_lanes(br, (const int8_t *)(y + 4), sc8_u(scmn));
        }
        const __m128 dy = _mm_set1_ps(q8k_d(y));
        const __m128 pw = _mm_mul_ps(_mm_mul_ps(half4_at(b, ws), dy), _mm_cvtepi32_ps(hsum4_i32(acc)));
        const __m128 pm = _mm_mul_ps(_mm_mul_ps(half4_at(b + 2, ws), dy), _mm_cvtepi32_ps(hsum4_i32(ms)));
        sumf = _mm_add_ps(sumf, _mm_sub_ps(pw, pm));
    }
    _mm_storeu_ps(out, sumf);
}

TGT void forge_vec_dot_q6_k_q8_k_r4_avx2(int64_t n, const void *w, size_t ws, const void *xq, float out[4])
{
    const uint8_t *b = w, *y = xq;
    __m128 sumf = _mm_setzero_ps();
    for (int64_t i = 0; i < n / FORGE_QK_K; i++, b += 210, y += FORGE_Q8_K_BYTES) {
        r4_prefetch(w, ws, i, 210);
        const __m256i bs = _mm256_loadu_si256((const __m256i *)(y + 4 + FORGE_QK_K));
        __m256i acc[4], sb[4];
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            const uint8_t *br = b + (size_t)r * ws;
            sb[r] = _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(br + 192))), bs);
            acc[r] = q6k_lanes(br, (const int8_t *)(y + 4));
        }
        const __m128i isum = _mm_sub_epi32(hsum4_i32(acc), _mm_slli_epi32(hsum4_i32(sb), 5));
        const __m128 pw = _mm_mul_ps(_mm_mul_ps(half4_at(b + 208, ws), _mm_set1_ps(q8k_d(y))),
                                     _mm_cvtepi32_ps(isum));
        sumf = _mm_add_ps(sumf, pw);
    }
    _mm_storeu_ps(out, sumf);
}

#endif

/* ---- AVX-512 (F/BW): two 32-byte groups per 512-bit register -------------------------------- */
#if defined(__x86_64__)

#define TGT512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

TGT512 static inline int hsum512_i32(__m512i v)
{
    __m256i s = _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
    return hsum_i32(s);
}

/* Q4_K: the 128 nibble bytes as 2 x 64; each register holds the groups j and j+1 (low nibbles:
 * sub-blocks 2j and 2j+2; high: 2j+1 and 2j+3). Same integer sums as the AVX2 dot. */
TGT512 float forge_vec_dot_q4_k_q8_k_avx512(int64_t n, const void *w, const void *xq)
{
    const uint8_t *b = w, *y = xq;
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / FORGE_QK_K; i++, b += 144, y += FORGE_Q8_K_BYTES) {
        const int8_t *ys = (const int8_t *)(y + 4);
        const __m128i scmn = k4_scales_mins(b + 4);
        uint8_t sc[16];
        _mm_storeu_si128((__m128i *)sc, scmn);
        int summ = k4_summ(scmn, y);
        __m512i acc = _mm512_setzero_si512();
        for (int j = 0; j < 4; j += 2) {
            __m512i q4 = _mm512_loadu_si512((const void *)(b + 16 + 32 * j));
            __m512i lo = _mm512_and_si512(q4, m4), hi = _mm512_and_si512(_mm512_srli_epi16(q4, 4), m4);
            __m512i ylo = _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(ys + 64 * j))),
                _mm256_loadu_si256((const __m256i *)(ys + 64 * j + 64)), 1);
            __m512i yhi = _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(ys + 64 * j + 32))),
                _mm256_loadu_si256((const __m256i *)(ys + 64 * j + 96)), 1);
            __m512i slo = _mm512_inserti64x4(_mm512_set1_epi16(sc[2 * j]), _mm256_set1_epi16(sc[2 * j + 2]), 1);
            __m512i shi = _mm512_inserti64x4(_mm512_set1_epi16(sc[2 * j + 1]), _mm256_set1_epi16(sc[2 * j + 3]), 1);
            acc = _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(lo, ylo), slo));
            acc = _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(hi, yhi), shi));
        }
        int isum = hsum512_i32(acc);
        float dy = q8k_d(y);
        const float pw = half_at(b) * dy * (float)isum, pm = half_at(b + 2) * dy * (float)summ;
        sumf += pw - pm; /* separate statements: no fma contraction (matmul_kq_avx512.c) */
    }
    return sumf;
}

TGT512 static inline __m512i join256(__m256i lo, __m256i hi)
{
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

/* Q6_K: the two halves of 128 side by side (low 256 bits: h = 0, high: h = 1). */
TGT512 float forge_vec_dot_q6_k_q8_k_avx512(int64_t n, const void *w, const void *xq)
{
    const uint8_t *b = w, *y = xq;
    const __m512i m4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30);
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / FORGE_QK_K; i++, b += 210, y += FORGE_Q8_K_BYTES) {
        const int8_t *ys = (const int8_t *)(y + 4);
        const int8_t *sc = (const int8_t *)(b + 192);
        int corr = scaled_bsums(sc, y);
        __m512i ql0 = join256(_mm256_loadu_si256((const __m256i *)b), _mm256_loadu_si256((const __m256i *)(b + 64)));
        __m512i ql1 = join256(_mm256_loadu_si256((const __m256i *)(b + 32)), _mm256_loadu_si256((const __m256i *)(b + 96)));
        __m512i qh = _mm512_loadu_si512((const void *)(b + 128));
        __m512i v[4];
        v[0] = _mm512_or_si512(_mm512_and_si512(ql0, m4), _mm512_and_si512(_mm512_slli_epi16(qh, 4), m30));
        v[1] = _mm512_or_si512(_mm512_and_si512(ql1, m4), _mm512_and_si512(_mm512_slli_epi16(qh, 2), m30));
        v[2] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql0, 4), m4), _mm512_and_si512(qh, m30));
        v[3] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql1, 4), m4),
                               _mm512_and_si512(_mm512_srli_epi16(qh, 2), m30));
        __m512i acc = _mm512_setzero_si512();
        for (int q = 0; q < 4; q++) {
            int g = 2 * q;
            __m512i yv = join256(_mm256_loadu_si256((const __m256i *)(ys + 32 * q)),
                                 _mm256_loadu_si256((const __m256i *)(ys + 128 + 32 * q)));
            __m512i s = join256(_mm256_set_m128i(_mm_set1_epi16(sc[g + 1]), _mm_set1_epi16(sc[g])),
                                _mm256_set_m128i(_mm_set1_epi16(sc[g + 9]), _mm_set1_epi16(sc[g + 8])));
            acc = _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(v[q], yv), s));
        }
        int isum = hsum512_i32(acc) - 32 * corr;
        const float pw = half_at(b + 208) * q8k_d(y) * (float)isum;
        sumf += pw; /* a separate statement: no fma contraction (matmul_kq_avx512.c) */
    }
    return sumf;
}

#endif
