/* matvec_kq_avx512.c - AVX-512 decode kernels (fewer than KQ_TILE_MIN_TOK tokens) for the
 * super-block weights with Q8_K activations: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS, TQ1_0 and
 * TQ2_0; x86-64 only, compiled with target attributes and used only when the CPU has VNNI, VBMI
 * and GFNI (kern_kq_decode_has).
 *
 * The weights are read as they lie in the file (decode is one pass over memory, a repack would
 * cost more than it saves), four rows at a time, so that the work around the integer dot
 * products is shared by four rows:
 * - Q4_K/Q5_K: the 16-byte headers of four rows' super-blocks (d, dmin and the 12 packed scale
 *   bytes) sit in one vector, their 6-bit scales and mins are unpacked for all four at once
 *   (6 ops), and each sub-block scale vector is one vpermb; Q3_K and IQ4_XS unpack their scales
 *   per row with vpmultishiftqb, Q2_K and Q6_K widen theirs;
 * - the four rows' sums are reduced together (one transpose tree), and the float step runs on
 *   the four rows as one vector.
 * Each row's integers per super-block are exactly the one-row dot products' (integer sums in any
 * order are equal) and the float expression per super-block is theirs, in their order:
 * sumf + ((d * dy) * isum - (dmin * dy) * summ) with mins (Q2_K, Q4_K, Q5_K), sumf + (d * dy) *
 * isum without, vector lanes being independent IEEE operations (no fma: the build does not
 * contract). So a row gives the same bits here, in the prompt tiles (matmul_kq_avx512.c) and in
 * the scalar dot (tests/test_quant_kernels.c, test_batch_invariance.c).
 *
 * Q4_K/Q5_K: the nibbles of groups j, j+1 (64 bytes) give, as low nibbles, sub-blocks 2j and
 * 2j+2 and, as high nibbles, 2j+1 and 2j+3 (Q5_K's fifth bit from qh by a per-half shift). The
 * activations are rearranged once per call to that order (kd_prep_q4k, into the thread's
 * scratch), so each vector of weights meets one aligned vector of activations; IQ4_XS likewise
 * in its own order. Q6_K: 64 low-bit bytes with the 32 high-bit bytes twice give 64 values in
 * the activations' own order, as do Q2_K/Q3_K's 2-bit values; offsets of unsigned values (Q6_K
 * 32, Q3_K 4, IQ4_XS 128) go into the same integer sum through the bsums (scale * -offset fits
 * int16). */
#include <string.h>

#include "cpu/kern_impl.h"
#include "quant/qtypes.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define TGT                                                                                        \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,gfni,avx2,"    \
                          "fma,f16c")))
#define INLINE static inline __attribute__((always_inline))

#define KD_ROWS 4
#define Q8K_QS 4
#define Q8K_BSUM 260
#define Q6K_BYTES 210
/* Prepared Q4_K activations per super-block: 256 values in nibble order, the 8 pair sums of
 * bsums (int16) four times, dy. */
#define KD_X_BYTES 384
#define KD_X_BS8 256
#define KD_X_DY 320

int kern_kq_decode_has(kq_kind kind)
{
    static int cpu = -1; /* racing first calls store the same value */
    if (cpu < 0) cpu = kern_cpu_has_avx512vnni() && kern_cpu_has_avx512vbmi() && kern_cpu_has_gfni();
    return cpu && (kind == KQ_Q2_K || kind == KQ_Q3_K || kind == KQ_Q4_K || kind == KQ_Q5_K || kind == KQ_Q6_K ||
                   kind == KQ_IQ4_XS || kind == KQ_TQ1_0 || kind == KQ_TQ2_0);
}

typedef struct kd_consts {
    __m512i sc_idx[KD_ROWS][4]; /* Q4_K: vpermb indices of the scale vectors of row r */
    __m512i mn_idx;             /* Q4_K: the 8 mins of each row as words, row r in lane r */
    __m512i d_idx;              /* words d0..d3, dmin0..dmin3 of the four headers */
    __m512i q6_idx[4];          /* Q6_K: vpermw indices of the group scale vectors */
    __m512i red_idx;            /* final gather of the reduction (isum 0..3, summ 0..3) */
} kd_consts;

/* byte p (even; odd bytes are zeroed): byte 8 + (p / 2) % 8 of lane p / 16 */
static const uint8_t KD_MN_IDX[64] __attribute__((aligned(64))) = {
    8,  8,  9,  9,  10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15, 24, 24, 25, 25, 26, 26,
    27, 27, 28, 28, 29, 29, 30, 30, 31, 31, 40, 40, 41, 41, 42, 42, 43, 43, 44, 44, 45, 45,
    46, 46, 47, 47, 56, 56, 57, 57, 58, 58, 59, 59, 60, 60, 61, 61, 62, 62, 63, 63};
static const uint16_t KD_D_IDX[32] __attribute__((aligned(64))) = {0, 8, 16, 24, 1, 9, 17, 25};
static const uint16_t KD_Q6_IDX[32] __attribute__((aligned(64))) = {
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3};
static const int32_t KD_RED_IDX[16] __attribute__((aligned(64))) = {0,  1,  2,  3,  16, 20,
                                                                    24, 28, 0,  0,  0,  0,
                                                                    0,  0,  0,  0};

TGT static void kd_make_consts(kd_consts *c)
{
    for (int k = 0; k < 4; k++) {
        /* Q4_K scale vector k: sub-blocks first (low 256 bits) and first + 2 (high) */
        const int first = 4 * (k / 2) + (k % 2);
        const __m512i base = _mm512_mask_blend_epi8(0xFFFFFFFF00000000ULL, _mm512_set1_epi8((char)first),
                                                    _mm512_set1_epi8((char)(first + 2)));
        for (int r = 0; r < KD_ROWS; r++)
            c->sc_idx[r][k] = _mm512_add_epi8(base, _mm512_set1_epi8((char)(16 * r)));
        c->q6_idx[k] = _mm512_add_epi16(_mm512_load_si512((const void *)KD_Q6_IDX), _mm512_set1_epi16((short)(4 * k)));
    }
    c->mn_idx = _mm512_load_si512((const void *)KD_MN_IDX);
    c->d_idx = _mm512_load_si512((const void *)KD_D_IDX);
    c->red_idx = _mm512_load_si512((const void *)KD_RED_IDX);
}

/* Sums of the 16 lanes of a[0..3] (the four rows' integer sums) and of the 4 lanes of lane r
 * of m (row r's min or offset terms): returns [isum 0..3, summ 0..3] in the low 256 bits. */
TGT INLINE __m256i kd_reduce(const kd_consts *c, const __m512i a[KD_ROWS], __m512i m)
{
    __m512i p01 = _mm512_add_epi32(_mm512_unpacklo_epi32(a[0], a[1]), _mm512_unpackhi_epi32(a[0], a[1]));
    __m512i p23 = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2], a[3]), _mm512_unpackhi_epi32(a[2], a[3]));
    __m512i q = _mm512_add_epi32(_mm512_unpacklo_epi64(p01, p23), _mm512_unpackhi_epi64(p01, p23));
    q = _mm512_add_epi32(q, _mm512_shuffle_i64x2(q, q, _MM_SHUFFLE(1, 0, 3, 2)));
    q = _mm512_add_epi32(q, _mm512_shuffle_i64x2(q, q, _MM_SHUFFLE(2, 3, 0, 1)));
    m = _mm512_add_epi32(m, _mm512_shuffle_epi32(m, (_MM_PERM_ENUM)0x4E));
    m = _mm512_add_epi32(m, _mm512_shuffle_epi32(m, (_MM_PERM_ENUM)0xB1));
    return _mm512_castsi512_si256(_mm512_permutex2var_epi32(q, c->red_idx, m));
}

/* Decode streams the weights from memory. Four rows are one contiguous region; while one group
 * is computed, a group about 16 KB ahead is prefetched into L2 as one linear stream, step b
 * taking the step's share (as the Q4_0/Q8_0 decode in matmul_avx512.c; reading four rows
 * side by side is four streams the hardware prefetcher follows less well). pf NULL: none. */
TGT INLINE void kd_prefetch(const uint8_t *pf, int64_t b, size_t step_bytes)
{
    if (!pf) return;
    for (size_t l = 0; l < (step_bytes + 63) / 64; l++)
        _mm_prefetch((const char *)(pf + (size_t)b * step_bytes + 64 * l), _MM_HINT_T1);
}

/* ---- Q4_K ------------------------------------------------------------------------------ */

/* Token x's Q8_K row rearranged into out (KD_X_BYTES per super-block). */
TGT static void kd_prep_q4k(const uint8_t *x, int64_t nsb, uint8_t *out, int iq4xs)
{
    for (int64_t b = 0; b < nsb; b++, x += FORGE_Q8_K_BYTES, out += KD_X_BYTES) {
        const uint8_t *q = x + Q8K_QS;
        if (iq4xs) {
            /* vector v: the low (v even) or high (v odd) 16 values of sub-blocks 4 (v / 2) ..
             * 4 (v / 2) + 3, as the nibbles of 64 bytes of IQ4_XS qs give them */
            for (int v = 0; v < 4; v++)
                for (int k = 0; k < 4; k++)
                    memcpy(out + 64 * v + 16 * k, q + 32 * (4 * (v / 2) + k) + 16 * (v % 2), 16);
        } else {
            /* vector v: sub-blocks (0,2), (1,3), (4,6), (5,7) */
            for (int v = 0; v < 4; v++) {
                int s0 = 4 * (v / 2) + (v % 2);
                memcpy(out + 64 * v, q + 32 * s0, 32);
                memcpy(out + 64 * v + 32, q + 32 * (s0 + 2), 32);
            }
        }
        __m256i bs = _mm256_loadu_si256((const __m256i *)(const void *)(x + Q8K_BSUM));
        /* pair sums bsum[2j] + bsum[2j+1] (|.| <= 4096: exact as int16) */
        __m256i pr = _mm256_madd_epi16(bs, _mm256_set1_epi16(1));
        __m128i s8 = _mm_packs_epi32(_mm256_castsi256_si128(pr), _mm256_extracti128_si256(pr, 1));
        _mm512_store_si512((void *)(out + KD_X_BS8), _mm512_broadcast_i32x4(s8));
        memcpy(out + KD_X_DY, x, 4);
    }
}

/* Rows o..o+3 (all valid) against one prepared token: returns the four sums. */
TGT INLINE __m128 kd_q45k_rows4(const kd_consts *c, const kern_mm_args *a, int64_t o, const uint8_t *xp,
                                int64_t nsb, const uint8_t *pf, int five)
{
    const size_t bytes = five ? 176 : 144;
    const __m512i m4 = _mm512_set1_epi8(0x0F), hi_gf = _mm512_set1_epi64(0x1020408000000000LL);
    const __m512i m10 = _mm512_set1_epi8(0x10);
    /* Q5_K: bit k of qh is bit 4 of sub-block k's values; vector v holds sub-blocks
     * (0,2), (1,3), (4,6), (5,7): shift counts per 256-bit half to bring bit k to bit 4 */
    const __m512i h_sl[2] = {_mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1),
                             _mm512_inserti64x4(_mm512_set1_epi16(3), _mm256_set1_epi16(1), 1)};
    const __m512i h_sr[2] = {_mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1),
                             _mm512_inserti64x4(_mm512_set1_epi16(1), _mm256_set1_epi16(3), 1)};
    const __m512i m3f = _mm512_set1_epi8(0x3F);
    const __m512i sel = _mm512_set4_epi32(0x0F0F0F0F, 0x3F3F3F3F, 0x0F0F0F0F, 0x3F3F3F3F);
    const __m512i sh4 = _mm512_set4_epi32(4, 0, 0, 0);
    const size_t rb = a->w_row_bytes;
    const uint8_t *w = a->W + (size_t)o * rb;
    __m128 sumf = _mm_setzero_ps();
    for (int64_t b = 0; b < nsb; b++, w += bytes, xp += KD_X_BYTES) {
        kd_prefetch(pf, b, KD_ROWS * bytes);
        /* lane r: row r's header: d, dmin, 12 scale bytes */
        __m512i h = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(const void *)w));
        h = _mm512_inserti32x4(h, _mm_loadu_si128((const __m128i *)(const void *)(w + rb)), 1);
        h = _mm512_inserti32x4(h, _mm_loadu_si128((const __m128i *)(const void *)(w + 2 * rb)), 2);
        h = _mm512_inserti32x4(h, _mm_loadu_si128((const __m128i *)(const void *)(w + 3 * rb)), 3);
        /* per lane dwords a = q[0..3], b = q[4..7], c = q[8..11] (dwords 1, 2, 3 of h):
         * P = [a, c, b, c], Q = [a, a, b, b]; dword k of the result is
         * (P >> (k == 3 ? 4 : 0)) & sel_k | (Q >> 2) & 0x30 (k odd) -> sc0-3, sc4-7, mn0-3, mn4-7 */
        __m512i P = _mm512_srlv_epi32(_mm512_shuffle_epi32(h, (_MM_PERM_ENUM)0xED), sh4);
        __m512i Q = _mm512_srli_epi32(_mm512_shuffle_epi32(h, (_MM_PERM_ENUM)0xA5), 2);
        /* sel bit set: from P; else from Q (bits 4-5 of odd dwords; bits 6-7 cleared after) */
        __m512i u = _mm512_and_si512(_mm512_ternarylogic_epi32(sel, P, Q, 0xCA), m3f);
        __m512i acc[KD_ROWS];
#pragma GCC unroll 4
        for (int r = 0; r < KD_ROWS; r++) {
            const uint8_t *wr = w + (size_t)r * rb + (five ? 48 : 16);
            __m512i q0 = _mm512_loadu_si512((const void *)wr), q1 = _mm512_loadu_si512((const void *)(wr + 64));
            __m512i v[4] = {_mm512_and_si512(q0, m4), _mm512_gf2p8affine_epi64_epi8(q0, hi_gf, 0),
                            _mm512_and_si512(q1, m4), _mm512_gf2p8affine_epi64_epi8(q1, hi_gf, 0)};
            if (five) {
                __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(const void *)(w + (size_t)r * rb + 16)));
                /* v[0]: bits 0 | 2, v[1]: 1 | 3 (left shifts 4 | 2, 3 | 1); v[2]: 4 | 6, v[3]: 5 | 7
                 * (right shifts 0 | 2, 1 | 3) */
                v[0] = _mm512_ternarylogic_epi32(v[0], _mm512_sllv_epi16(qh, h_sl[0]), m10, 0xF8);
                v[1] = _mm512_ternarylogic_epi32(v[1], _mm512_sllv_epi16(qh, h_sl[1]), m10, 0xF8);
                v[2] = _mm512_ternarylogic_epi32(v[2], _mm512_srlv_epi16(qh, h_sr[0]), m10, 0xF8);
                v[3] = _mm512_ternarylogic_epi32(v[3], _mm512_srlv_epi16(qh, h_sr[1]), m10, 0xF8);
            }
            /* v[k] pairs with activation vector: lo(q0) = (0,2) -> 0, hi(q0) = (1,3) -> 1, ... */
            __m512i s = _mm512_setzero_si512();
#pragma GCC unroll 4
            for (int k = 0; k < 4; k++) {
                __m512i p = _mm512_maddubs_epi16(v[k], _mm512_load_si512((const void *)(xp + 64 * k)));
                __m512i sc = _mm512_maskz_permutexvar_epi8(0x5555555555555555ULL, c->sc_idx[r][k], u);
                s = _mm512_dpwssd_epi32(s, p, sc);
            }
            acc[r] = s;
        }
        __m512i mn = _mm512_maskz_permutexvar_epi8(0x5555555555555555ULL, c->mn_idx, u);
        __m512i ms = _mm512_madd_epi16(mn, _mm512_load_si512((const void *)(xp + KD_X_BS8)));
        __m256i is = kd_reduce(c, acc, ms);
        __m256 dd = _mm256_cvtph_ps(_mm512_castsi512_si128(_mm512_permutexvar_epi16(c->d_idx, h)));
        float dyv;
        memcpy(&dyv, xp + KD_X_DY, 4);
        __m256 pr = _mm256_mul_ps(_mm256_mul_ps(dd, _mm256_set1_ps(dyv)), _mm256_cvtepi32_ps(is));
        sumf = _mm_add_ps(sumf, _mm_sub_ps(_mm256_castps256_ps128(pr), _mm256_extractf128_ps(pr, 1)));
    }
    return sumf;
}

/* ---- Q6_K ------------------------------------------------------------------------------ */

TGT INLINE __m128 kd_q6k_rows4(const kd_consts *c, const kern_mm_args *a, int64_t o, const uint8_t *x,
                               int64_t nsb, const uint8_t *pf)
{
    const __m512i m4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30);
    const __m512i hi_gf = _mm512_set1_epi64(0x1020408000000000LL);
    /* high bits of values 0-31 | 32-63 (qh << 4 | qh << 2) and 64-95 | 96-127 (qh | qh >> 2) */
    const __m512i sl = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
    const __m512i sr = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
    const __m256i m32 = _mm256_set1_epi16(-32);
    const size_t rb = a->w_row_bytes;
    const uint8_t *w = a->W + (size_t)o * rb;
    __m128 sumf = _mm_setzero_ps();
    for (int64_t b = 0; b < nsb; b++, w += Q6K_BYTES, x += FORGE_Q8_K_BYTES) {
        kd_prefetch(pf, b, KD_ROWS * Q6K_BYTES);
        const int8_t *ys = (const int8_t *)(x + Q8K_QS);
        const __m512i bs = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(const void *)(x + Q8K_BSUM)));
        __m512i acc[KD_ROWS];
        uint16_t dh[8] = {0};
#pragma GCC unroll 4
        for (int r = 0; r < KD_ROWS; r++) {
            const uint8_t *wr = w + (size_t)r * rb;
            __m256i sw = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(const void *)(wr + 192)));
            __m512i swz = _mm512_castsi256_si512(sw);
            /* the -32 offset: sum_g (-32 * scale_g) * bsum_g */
            __m512i s = _mm512_dpwssd_epi32(_mm512_setzero_si512(),
                                            _mm512_zextsi256_si512(_mm256_mullo_epi16(sw, m32)), bs);
#pragma GCC unroll 2
            for (int hf = 0; hf < 2; hf++) {
                __m512i ql = _mm512_loadu_si512((const void *)(wr + 64 * hf));
                __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(const void *)(wr + 128 + 32 * hf)));
                __m512i va = _mm512_ternarylogic_epi32(_mm512_and_si512(ql, m4), _mm512_sllv_epi16(qh, sl), m30, 0xF8);
                __m512i vb = _mm512_ternarylogic_epi32(_mm512_gf2p8affine_epi64_epi8(ql, hi_gf, 0),
                                                       _mm512_srlv_epi16(qh, sr), m30, 0xF8);
                __m512i pa = _mm512_maddubs_epi16(va, _mm512_loadu_si512((const void *)(ys + 128 * hf)));
                __m512i pb = _mm512_maddubs_epi16(vb, _mm512_loadu_si512((const void *)(ys + 128 * hf + 64)));
                s = _mm512_dpwssd_epi32(s, pa, _mm512_permutexvar_epi16(c->q6_idx[2 * hf], swz));
                s = _mm512_dpwssd_epi32(s, pb, _mm512_permutexvar_epi16(c->q6_idx[2 * hf + 1], swz));
            }
            acc[r] = s;
            memcpy(&dh[r], wr + 208, 2);
        }
        __m256i is = kd_reduce(c, acc, _mm512_setzero_si512());
        __m128 d = _mm_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)dh));
        float dyv;
        memcpy(&dyv, x, 4);
        sumf = _mm_add_ps(sumf, _mm_mul_ps(_mm_mul_ps(d, _mm_set1_ps(dyv)),
                                           _mm_cvtepi32_ps(_mm256_castsi256_si128(is))));
    }
    return sumf;
}

/* ---- IQ4_XS ----------------------------------------------------------------------------- */

/* IQ4_XS (d, scales_h, scales_l[4], qs[128]): 64 bytes of qs are sub-blocks 4h..4h+3, their low
 * nibbles values 0-15 and high nibbles 16-31, against activations prepared in that order
 * (kd_prep_q4k). Values through the IQ4_NL table + 128 (1..241: too large for vpmaddubsw's
 * int16 pairs, so vpdpbusd and an int32 scale multiply); the 128 offset goes through the bsum
 * pairs (scale * -128 fits int16). Scales unpacked by vpmultishiftqb. */
TGT INLINE __m128 kd_iq4xs_rows4(const kd_consts *c, const kern_mm_args *a, int64_t o, const uint8_t *xp,
                                 int64_t nsb, const uint8_t *pf)
{
    const __m512i m4 = _mm512_set1_epi8(0x0F), hi_gf = _mm512_set1_epi64(0x1020408000000000LL);
    const __m128i tv = _mm_loadu_si128((const __m128i *)(const void *)forge_iq4nl_values);
    const __m512i tbl = _mm512_broadcast_i32x4(_mm_xor_si128(tv, _mm_set1_epi8((char)0x80)));
    /* scale j: low 4 bits at bit 32 + 4 j, high 2 bits at bit 16 + 2 j of the block's first 8 bytes */
    const __m128i ctl_lo = _mm_setr_epi8(32, 36, 40, 44, 48, 52, 56, 60, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m128i ctl_hi = _mm_setr_epi8(16, 18, 20, 22, 24, 26, 28, 30, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m128i m0f = _mm_set1_epi8(0x0F), m03 = _mm_set1_epi8(3), m32 = _mm_set1_epi8(32);
    /* dword lanes of vector v: sub-block 4 (v / 2) + lane / 4 */
    const __m512i sc_idx[2] = {_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                               _mm512_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7)};
    const __m128i neg128 = _mm_set1_epi16(-128);
    const size_t rb = a->w_row_bytes;
    const uint8_t *w = a->W + (size_t)o * rb;
    __m128 sumf = _mm_setzero_ps();
    for (int64_t b = 0; b < nsb; b++, w += 136, xp += KD_X_BYTES) {
        kd_prefetch(pf, b, KD_ROWS * 136);
        const __m512i bs8 = _mm512_zextsi128_si512(_mm_load_si128((const __m128i *)(const void *)(xp + KD_X_BS8)));
        __m512i acc[KD_ROWS];
        uint16_t dh[8] = {0};
#pragma GCC unroll 4
        for (int r = 0; r < KD_ROWS; r++) {
            const uint8_t *wr = w + (size_t)r * rb;
            uint64_t hdr;
            memcpy(&hdr, wr, 8);
            const __m128i hq = _mm_set1_epi64x((long long)hdr);
            __m128i lo = _mm_and_si128(_mm_multishift_epi64_epi8(ctl_lo, hq), m0f);
            __m128i hi = _mm_and_si128(_mm_multishift_epi64_epi8(ctl_hi, hq), m03);
            __m128i sc16 = _mm_cvtepi8_epi16(_mm_sub_epi8(_mm_or_si128(lo, _mm_slli_epi16(hi, 4)), m32));
            const __m512i sc32 = _mm512_cvtepi16_epi32(_mm256_castsi128_si256(sc16));
            /* the 128 offset: sum_j (-128 * scale_j) * (bsum 2j + bsum 2j+1) */
            __m512i s = _mm512_dpwssd_epi32(_mm512_setzero_si512(),
                                            _mm512_zextsi128_si512(_mm_mullo_epi16(sc16, neg128)), bs8);
            const __m512i q0 = _mm512_loadu_si512((const void *)(wr + 8)), q1 = _mm512_loadu_si512((const void *)(wr + 72));
            const __m512i v[4] = {_mm512_and_si512(q0, m4), _mm512_gf2p8affine_epi64_epi8(q0, hi_gf, 0),
                                  _mm512_and_si512(q1, m4), _mm512_gf2p8affine_epi64_epi8(q1, hi_gf, 0)};
#pragma GCC unroll 4
            for (int k = 0; k < 4; k++) {
                __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_shuffle_epi8(tbl, v[k]),
                                                _mm512_load_si512((const void *)(xp + 64 * k)));
                s = _mm512_add_epi32(s, _mm512_mullo_epi32(p, _mm512_permutexvar_epi32(sc_idx[k / 2], sc32)));
            }
            acc[r] = s;
            memcpy(&dh[r], wr, 2);
        }
        __m256i is = kd_reduce(c, acc, _mm512_setzero_si512());
        __m128 d = _mm_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)dh));
        float dyv;
        memcpy(&dyv, xp + KD_X_DY, 4);
        sumf = _mm_add_ps(sumf, _mm_mul_ps(_mm_mul_ps(d, _mm_set1_ps(dyv)),
                                           _mm_cvtepi32_ps(_mm256_castsi256_si128(is))));
    }
    return sumf;
}

/* ---- Q2_K, Q3_K --------------------------------------------------------------------------- */

/* 2-bit values (Q2_K: 16 scale/min bytes, qs[64], d, dmin; Q3_K: hmask[32], qs[64], 12 scale
 * bytes, d): vector i holds chunks 2i | 2i+1 of 32 values, half i / 2 of qs broadcast to both
 * 256-bit halves and shifted right by 2 (2i % 4) | 2 (2i % 4) + 2, in the activations' order.
 * Q3_K adds bit c of hmask as 4 (the value + 4; the -4 offset goes through the bsums as Q6_K's
 * -32); its 6-bit scales are unpacked by vpmultishiftqb. Q2_K's mins go to the reduction's
 * second part (dmin). */
TGT INLINE __m128 kd_q23k_rows4(const kd_consts *c, const kern_mm_args *a, int64_t o, const uint8_t *x,
                                int64_t nsb, const uint8_t *pf, int three)
{
    const size_t bytes = three ? 110 : 84, qs_off = three ? 32 : 16;
    const __m512i m3 = _mm512_set1_epi8(3), m04 = _mm512_set1_epi8(4);
    const __m512i qsh[2] = {_mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1),
                            _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(6), 1)};
    /* bit c of hmask to bit 2: chunks (0,1) left 2 | 1, then right 0 | 1, 2 | 3, 4 | 5 */
    const __m512i hl0 = _mm512_inserti64x4(_mm512_set1_epi16(2), _mm256_set1_epi16(1), 1);
    const __m512i hr[4] = {_mm512_setzero_si512(), _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(1), 1),
                           _mm512_inserti64x4(_mm512_set1_epi16(2), _mm256_set1_epi16(3), 1),
                           _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(5), 1)};
    /* Q3_K scale j: low 4 bits at bit 8j (j < 8) or 8 (j - 8) + 4 of bytes 0-7, high 2 bits at
     * 8 (j % 4) + 2 (j / 4) of bytes 8-11 */
    const __m128i ctl_lo = _mm_setr_epi8(0, 8, 16, 24, 32, 40, 48, 56, 4, 12, 20, 28, 36, 44, 52, 60);
    const __m128i ctl_hi = _mm_setr_epi8(0, 8, 16, 24, 2, 10, 18, 26, 4, 12, 20, 28, 6, 14, 22, 30);
    const __m128i m0f = _mm_set1_epi8(0x0F), m03 = _mm_set1_epi8(3), m32 = _mm_set1_epi8(32);
    const __m256i neg4 = _mm256_set1_epi16(-4);
    const size_t rb = a->w_row_bytes;
    const uint8_t *w = a->W + (size_t)o * rb;
    __m128 sumf = _mm_setzero_ps();
    for (int64_t b = 0; b < nsb; b++, w += bytes, x += FORGE_Q8_K_BYTES) {
        kd_prefetch(pf, b, KD_ROWS * bytes);
        const int8_t *ys = (const int8_t *)(x + Q8K_QS);
        const __m256i bs = _mm256_loadu_si256((const __m256i *)(const void *)(x + Q8K_BSUM));
        __m512i acc[KD_ROWS], mins = _mm512_setzero_si512();
        uint32_t dd[KD_ROWS];
#pragma GCC unroll 4
        for (int r = 0; r < KD_ROWS; r++) {
            const uint8_t *wr = w + (size_t)r * rb;
            __m512i s, swz;
            if (three) {
                uint64_t lo8;
                uint32_t hi4;
                memcpy(&lo8, wr + 96, 8);
                memcpy(&hi4, wr + 104, 4);
                __m128i lo = _mm_and_si128(_mm_multishift_epi64_epi8(ctl_lo, _mm_set1_epi64x((long long)lo8)), m0f);
                __m128i hi = _mm_and_si128(_mm_multishift_epi64_epi8(ctl_hi, _mm_set1_epi32((int)hi4)), m03);
                __m256i sw = _mm256_cvtepi8_epi16(_mm_sub_epi8(_mm_or_si128(lo, _mm_slli_epi16(hi, 4)), m32));
                swz = _mm512_castsi256_si512(sw);
                /* the -4 offset: sum_g (-4 * scale_g) * bsum_g */
                s = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_zextsi256_si512(_mm256_mullo_epi16(sw, neg4)),
                                        _mm512_zextsi256_si512(bs));
                memcpy(&dd[r], wr + 108, 2);
            } else {
                __m128i sb = _mm_loadu_si128((const __m128i *)(const void *)wr);
                swz = _mm512_castsi256_si512(_mm256_cvtepu8_epi16(_mm_and_si128(sb, m0f)));
                __m256i mp = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sb, 4), m0f)), bs);
                __m128i m4l = _mm_add_epi32(_mm256_castsi256_si128(mp), _mm256_extracti128_si256(mp, 1));
                mins = _mm512_mask_broadcast_i32x4(mins, (__mmask16)(0xF << (4 * r)), m4l);
                s = _mm512_setzero_si512();
                memcpy(&dd[r], wr + 80, 4);
            }
            const __m512i q0 = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(const void *)(wr + qs_off)));
            const __m512i q1 = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(const void *)(wr + qs_off + 32)));
            __m512i hm = _mm512_setzero_si512();
            if (three) hm = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(const void *)wr));
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) {
                __m512i v = _mm512_and_si512(_mm512_srlv_epi16(i < 2 ? q0 : q1, qsh[i % 2]), m3);
                if (three)
                    v = _mm512_ternarylogic_epi32(v, i == 0 ? _mm512_sllv_epi16(hm, hl0) : _mm512_srlv_epi16(hm, hr[i]),
                                                  m04, 0xF8);
                __m512i p = _mm512_maddubs_epi16(v, _mm512_loadu_si512((const void *)(ys + 64 * i)));
                s = _mm512_dpwssd_epi32(s, p, _mm512_permutexvar_epi16(c->q6_idx[i], swz));
            }
            acc[r] = s;
        }
        __m256i is = kd_reduce(c, acc, mins);
        float dyv;
        memcpy(&dyv, x, 4);
        if (three) {
            uint16_t dh[8] = {(uint16_t)dd[0], (uint16_t)dd[1], (uint16_t)dd[2], (uint16_t)dd[3], 0, 0, 0, 0};
            __m128 d = _mm_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)dh));
            sumf = _mm_add_ps(sumf, _mm_mul_ps(_mm_mul_ps(d, _mm_set1_ps(dyv)),
                                               _mm_cvtepi32_ps(_mm256_castsi256_si128(is))));
        } else {
            /* [d0 dmin0 d1 dmin1 ...] to [d0 d1 d2 d3 dmin0 .. dmin3] */
            __m128i h = _mm_loadu_si128((const __m128i *)(const void *)dd);
            h = _mm_shuffle_epi8(h, _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15));
            __m256 pr = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(dyv)), _mm256_cvtepi32_ps(is));
            sumf = _mm_add_ps(sumf, _mm_sub_ps(_mm256_castps256_ps128(pr), _mm256_extractf128_ps(pr, 1)));
        }
    }
    return sumf;
}

/* ---- TQ2_0 and TQ1_0 ------------------------------------------------------------------------
 * Values q - 1 with q in 0..2, one scale d per super-block, no sub-block scales: a row's isum is
 * dot(q, y) - sum(y), sum(y) being the sum of the 16 bsums (the same for the four rows: the
 * seed of each row's integer sum), and the float step sumf + (d * dy) * isum is the one-row
 * dot's (float)isum * (dy * d) (IEEE products commute).
 * TQ2_0 (qs[64], d): 2-bit values in Q2_K's order, extracted as kd_q23k_rows4 does.
 * TQ1_0 (qs[48] of 5 trits, qh[4] of 4 trits, d): trit k of byte b is ((uint8_t)(b * 3^k) * 3)
 * >> 8; values 0-159 are trits 0-4 of bytes 0-31 (trit-major), 160-239 trits 0-4 of bytes
 * 32-47, 240-255 trits 0-3 of qh. Four vectors of 64 values, each gathered from the block's 54
 * bytes by one vpermb (KD_TQ1_IDX) with its own per-byte power of 3 (KD_TQ1_MUL), in the
 * activations' order. */

/* -(sum of the 16 bsums of token x's super-block) in lane 0 */
TGT INLINE __m512i kd_neg_bsum(const uint8_t *x)
{
    const __m256i bs = _mm256_loadu_si256((const __m256i *)(const void *)(x + Q8K_BSUM));
    const __m256i pr = _mm256_madd_epi16(bs, _mm256_set1_epi16(-1));
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(pr), _mm256_extracti128_si256(pr, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1));
    return _mm512_zextsi128_si512(_mm_cvtsi32_si128(_mm_cvtsi128_si32(h)));
}

/* sumf + (d * dy) * isum for the four rows, d the fp16 at byte d_off of each row's block */
TGT INLINE __m128 kd_tq_step(const kd_consts *c, const __m512i acc[KD_ROWS], const uint8_t *w, size_t rb,
                             size_t d_off, const uint8_t *x, __m128 sumf)
{
    const __m256i is = kd_reduce(c, acc, _mm512_setzero_si512());
    uint16_t dh[KD_ROWS];
    for (int r = 0; r < KD_ROWS; r++)
        memcpy(&dh[r], w + (size_t)r * rb + d_off, 2);
    float dyv;
    memcpy(&dyv, x, 4);
    /* inserted as words (a vector load of a stack array just stored would stall) */
    __m128i h = _mm_cvtsi32_si128(dh[0]);
    h = _mm_insert_epi16(h, dh[1], 1);
    h = _mm_insert_epi16(h, dh[2], 2);
    h = _mm_insert_epi16(h, dh[3], 3);
    const __m128 d = _mm_cvtph_ps(h);
    return _mm_add_ps(sumf, _mm_mul_ps(_mm_mul_ps(d, _mm_set1_ps(dyv)), _mm_cvtepi32_ps(_mm256_castsi256_si128(is))));
}

TGT INLINE __m128 kd_tq2_rows4(const kd_consts *c, const kern_mm_args *a, int64_t o, const uint8_t *x, int64_t nsb,
                               const uint8_t *pf)
{
    const __m512i m3 = _mm512_set1_epi8(3);
    const __m512i qsh[2] = {_mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1),
                            _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(6), 1)};
    const size_t rb = a->w_row_bytes;
    const uint8_t *w = a->W + (size_t)o * rb;
    __m128 sumf = _mm_setzero_ps();
    for (int64_t b = 0; b < nsb; b++, w += 66, x += FORGE_Q8_K_BYTES) {
        kd_prefetch(pf, b, KD_ROWS * 66);
        const int8_t *ys = (const int8_t *)(x + Q8K_QS);
        const __m512i seed = kd_neg_bsum(x);
        __m512i acc[KD_ROWS];
#pragma GCC unroll 4
        for (int r = 0; r < KD_ROWS; r++) {
            const uint8_t *wr = w + (size_t)r * rb;
            const __m512i q0 = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(const void *)wr));
            const __m512i q1 = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(const void *)(wr + 32)));
            __m512i s = seed;
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) {
                const __m512i v = _mm512_and_si512(_mm512_srlv_epi16(i < 2 ? q0 : q1, qsh[i % 2]), m3);
                s = _mm512_dpbusd_epi32(s, v, _mm512_loadu_si512((const void *)(ys + 64 * i)));
            }
            acc[r] = s;
        }
        sumf = kd_tq_step(c, acc, w, rb, 64, x, sumf);
    }
    return sumf;
}

/* vector i of TQ1_0's values: the byte of the block each value comes from, and its 3^k */
static const uint8_t KD_TQ1_IDX[4][64] __attribute__((aligned(64))) = {
    {0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21,
     22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11,
     12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31},
    {0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21,
     22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11,
     12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31},
    {0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21,
     22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43,
     44, 45, 46, 47, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47},
    {32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 32, 33, 34, 35, 36, 37,
     38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43,
     44, 45, 46, 47, 48, 49, 50, 51, 48, 49, 50, 51, 48, 49, 50, 51, 48, 49, 50, 51}};
static const uint8_t KD_TQ1_MUL[4][64] __attribute__((aligned(64))) = {
    {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
     3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3},
    {9,  9,  9,  9,  9,  9,  9,  9,  9,  9,  9,  9,  9,  9,  9,  9,  9,  9,  9,  9,  9,  9,
     9,  9,  9,  9,  9,  9,  9,  9,  9,  9,  27, 27, 27, 27, 27, 27, 27, 27, 27, 27, 27, 27,
     27, 27, 27, 27, 27, 27, 27, 27, 27, 27, 27, 27, 27, 27, 27, 27, 27, 27, 27, 27},
    {81, 81, 81, 81, 81, 81, 81, 81, 81, 81, 81, 81, 81, 81, 81, 81, 81, 81, 81, 81, 81, 81,
     81, 81, 81, 81, 81, 81, 81, 81, 81, 81, 1,  1,  1,  1,  1,  1,  1,  1,  1,  1,  1,  1,
     1,  1,  1,  1,  3,  3,  3,  3,  3,  3,  3,  3,  3,  3,  3,  3,  3,  3,  3,  3},
    {9,  9,  9,  9,  9,  9,  9,  9,  9,  9,  9,  9,  9,  9,  9,  9,  27, 27, 27, 27, 27, 27,
     27, 27, 27, 27, 27, 27, 27, 27, 27, 27, 81, 81, 81, 81, 81, 81, 81, 81, 81, 81, 81, 81,
     81, 81, 81, 81, 1,  1,  1,  1,  3,  3,  3,  3,  9,  9,  9,  9,  27, 27, 27, 27}};

/* ((uint8_t)(q * m) * 3) >> 8 per byte, m_even / m_odd the multipliers of the even and odd bytes
 * as 16-bit lanes */
TGT INLINE __m512i kd_trits(__m512i q, __m512i m_even, __m512i m_odd)
{
    const __m512i lo = _mm512_set1_epi16(0x00FF), hi = _mm512_set1_epi16((short)0xFF00), three = _mm512_set1_epi16(3);
    __m512i e = _mm512_and_si512(_mm512_mullo_epi16(_mm512_and_si512(q, lo), m_even), lo);
    __m512i od = _mm512_and_si512(_mm512_mullo_epi16(_mm512_srli_epi16(q, 8), m_odd), lo);
    e = _mm512_srli_epi16(_mm512_mullo_epi16(e, three), 8);
    od = _mm512_and_si512(_mm512_mullo_epi16(od, three), hi); /* (od * 3 >> 8) << 8 */
    return _mm512_or_si512(e, od);
}

TGT INLINE __m128 kd_tq1_rows4(const kd_consts *c, const kern_mm_args *a, int64_t o, const uint8_t *x, int64_t nsb,
                               const uint8_t *pf)
{
    const __m512i lo = _mm512_set1_epi16(0x00FF);
    __m512i idx[4], me[4], mo[4];
    for (int i = 0; i < 4; i++) {
        idx[i] = _mm512_load_si512((const void *)KD_TQ1_IDX[i]);
        const __m512i m = _mm512_load_si512((const void *)KD_TQ1_MUL[i]);
        me[i] = _mm512_and_si512(m, lo);
        mo[i] = _mm512_srli_epi16(m, 8);
    }
    const size_t rb = a->w_row_bytes;
    const uint8_t *w = a->W + (size_t)o * rb;
    __m128 sumf = _mm_setzero_ps();
    for (int64_t b = 0; b < nsb; b++, w += 54, x += FORGE_Q8_K_BYTES) {
        kd_prefetch(pf, b, KD_ROWS * 54);
        const int8_t *ys = (const int8_t *)(x + Q8K_QS);
        const __m512i seed = kd_neg_bsum(x);
        __m512i acc[KD_ROWS];
#pragma GCC unroll 4
        for (int r = 0; r < KD_ROWS; r++) {
            const __m512i blk = _mm512_maskz_loadu_epi8((1ULL << 52) - 1, w + (size_t)r * rb);
            __m512i s = seed;
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) {
                const __m512i v = kd_trits(_mm512_permutexvar_epi8(idx[i], blk), me[i], mo[i]);
                s = _mm512_dpbusd_epi32(s, v, _mm512_loadu_si512((const void *)(ys + 64 * i)));
            }
            acc[r] = s;
        }
        sumf = kd_tq_step(c, acc, w, rb, 52, x, sumf);
    }
    return sumf;
}

/* ---- driver ------------------------------------------------------------------------------ */

TGT static void kd_rows(const kern_mm_args *a, int64_t r0, int64_t r1, void *work, kq_kind kind)
{
    const int64_t nsb = a->n_in / FORGE_QK_K;
    kd_consts c;
    kd_make_consts(&c);
    const uint8_t *xp[KQ_DECODE_MAX_TOK];
    for (int64_t t = 0; t < a->n_tok; t++) {
        const uint8_t *x = a->Xc + (size_t)t * a->xc_row_bytes;
        if (kind != KQ_Q4_K && kind != KQ_Q5_K && kind != KQ_IQ4_XS) {
            xp[t] = x;
        } else {
            uint8_t *p = (uint8_t *)work + (size_t)t * (size_t)nsb * KD_X_BYTES;
            kd_prep_q4k(x, nsb, p, kind == KQ_IQ4_XS);
            xp[t] = p;
        }
    }
    const size_t group_bytes = KD_ROWS * a->w_row_bytes;
    const size_t ahead = (16384 + group_bytes - 1) / group_bytes * group_bytes;
    int64_t o = r0;
    for (; o + KD_ROWS <= r1; o += KD_ROWS) {
        for (int64_t t = 0; t < a->n_tok; t++) {
            const uint8_t *pf = t == 0 ? a->W + (size_t)o * a->w_row_bytes + ahead : NULL;
            __m128 s = kind == KQ_Q6_K   ? kd_q6k_rows4(&c, a, o, xp[t], nsb, pf)
                       : kind == KQ_Q5_K ? kd_q45k_rows4(&c, a, o, xp[t], nsb, pf, 1)
                       : kind == KQ_Q4_K ? kd_q45k_rows4(&c, a, o, xp[t], nsb, pf, 0)
                       : kind == KQ_Q3_K ? kd_q23k_rows4(&c, a, o, xp[t], nsb, pf, 1)
                       : kind == KQ_IQ4_XS ? kd_iq4xs_rows4(&c, a, o, xp[t], nsb, pf)
                       : kind == KQ_TQ2_0  ? kd_tq2_rows4(&c, a, o, xp[t], nsb, pf)
                       : kind == KQ_TQ1_0  ? kd_tq1_rows4(&c, a, o, xp[t], nsb, pf)
                                           : kd_q23k_rows4(&c, a, o, xp[t], nsb, pf, 0);
            _mm_storeu_ps(a->Y + t * a->n_out + o, s);
        }
    }
    /* the last rows of a matrix whose row count is not a multiple of 4: the one-row dot */
    for (; o < r1; o++) {
        const uint8_t *w = a->W + (size_t)o * a->w_row_bytes;
        for (int64_t t = 0; t < a->n_tok; t++)
            a->Y[t * a->n_out + o] = a->dot(a->n_in, w, a->Xc + (size_t)t * a->xc_row_bytes);
    }
}

void kern_kq_decode(const kern_mm_args *a, int64_t r0, int64_t r1, void *work, kq_kind kind)
{
    kd_rows(a, r0, r1, work, kind);
}

#else /* not x86-64 */

int kern_kq_decode_has(kq_kind kind)
{
    (void)kind;
    return 0;
}

void kern_kq_decode(const kern_mm_args *a, int64_t r0, int64_t r1, void *work, kq_kind kind)
{
    (void)a;
    (void)r0;
    (void)r1;
    (void)work;
    (void)kind;
}

#endif
