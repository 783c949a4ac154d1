/* matmul_kq_avx512.c - AVX-512 VNNI row kernels for kern_matmul with super-block weights of 256
 * and Q8_K activations (as ggml): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS, TQ1_0 and TQ2_0. x86-64 only, compiled
 * with target attributes; matmul_avx512.c's lookup hands these out only when the CPU has VNNI.
 *
 * Prompts (n_tok >= KQ_TILE_MIN_TOK): 16 weight rows are repacked per call into this thread's
 * scratch, per super-block of 256: the unpacked unsigned values with row r in 32-bit lane r
 * (64 vectors of 4 values per row; a 16x8 dword transpose by vpermt2d per 32 values), then the
 * sub-block or group scales as int32 lanes, the mins or scales as int16 pairs, and the fp16
 * block scales as floats. A register tile of 16 rows x 8 tokens then reuses each repacked
 * vector 8 times: one vpdpbusd with a broadcast of 4 activation bytes advances 16 rows of one
 * token; each sub-block's sum is multiplied by its scale (vpmulld) and the mins (Q4_K, Q5_K,
 * Q2_K) or the offset of the unsigned values (Q6_K 32, Q3_K 4, IQ4_XS 128, TQ1_0/TQ2_0 1) go
 * through the activations' bsums (vpdpwssd). One tile serves all eight; the kind picks the layout.
 * Every integer per (row, super-block) is the exact value the one-row dot products of
 * src/quant/vecdot.c and src/cpu/vecdot_avx2.c compute, and the float step per super-block is
 * their expression, in their order (sumf + ((d * dy) * isum - (dmin * dy) * summ) with mins,
 * sumf + (d * dy) * isum without; the build does not contract to fma), so a row gets the same
 * bits as when its token runs alone through the dot product (tests/test_batch_invariance.c).
 * Fewer tokens (decode): the four-row kernels of matvec_kq_avx512.c (Q4_K, Q5_K, Q6_K) or the
 * traits table's one-row dot product, row by row. */
#include <string.h>

#include "cpu/kern_impl.h"
#include "cpu/tile_avx512.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define TGT                                                                                        \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline))

#define KQ_ROWS 16
#define KQ_TOK 8
/* below this the per-call repack costs more than it saves: the decode kernels (each row group
 * once per token while it is in L1) take 1..15 tokens, the batched decode of up to 15 streams.
 * bench_matmul -M, TinyLlama Q4_K, 2 threads: 4 tokens 59 ms per step by the tile, 38 ms by the
 * decode kernels; 8: 98 vs 65; 16: 119 vs 113 (docs/PERFORMANCE.md) */
#define KQ_TILE_MIN_TOK 16
#define Q8K_QS 4    /* offset of the int8 values in a Q8_K block */
#define Q8K_BSUM 260 /* offset of the 16 int16 group sums */

/* Repacked super-block of 16 rows: 64 vectors of values (4096 bytes); the int32 scale of each
 * sub-block (8 of 32 values: Q4_K, Q5_K, IQ4_XS) or group (16 of 16: Q6_K, Q3_K, Q2_K) per row;
 * 8 vectors of int16 pairs against the bsum pairs (mins: Q4_K, Q5_K as (min j, min j), Q2_K as
 * (min 2p, min 2p+1); scales: Q6_K, Q3_K as (scale 2p, scale 2p+1), IQ4_XS as (scale j, scale
 * j)); the fp16 block scale d and, for the types with mins, dmin, as floats. */
#define KQ_W_BYTES 4096
INLINE int kq_groups16(kq_kind k)
{
    return k == KQ_Q6_K || k == KQ_Q3_K || k == KQ_Q2_K;
}
INLINE int kq_has_min(kq_kind k)
{
    return k == KQ_Q4_K || k == KQ_Q5_K || k == KQ_Q2_K;
}
INLINE size_t kq_off_sc(kq_kind k)
{
    (void)k;
    return KQ_W_BYTES;
}
INLINE size_t kq_off_pairs(kq_kind k)
{
    return KQ_W_BYTES + (kq_groups16(k) ? 1024 : 512);
}
INLINE size_t kq_off_d(kq_kind k)
{
    return kq_off_pairs(k) + 512;
}
INLINE size_t kq_off_dmin(kq_kind k)
{
    return kq_off_d(k) + 64;
}
INLINE size_t kq_sb_bytes(kq_kind k)
{
    return kq_off_d(k) + (kq_has_min(k) ? 128 : 64);
}
#define KQ_SB_MAX (KQ_W_BYTES + 1024 + 512 + 128)
/* bytes of one super-block of the packed types */
INLINE size_t kq_block_bytes(kq_kind k)
{
    return k == KQ_Q4_K    ? 144
           : k == KQ_Q5_K  ? 176
           : k == KQ_Q6_K  ? 210
           : k == KQ_Q3_K  ? 110
           : k == KQ_IQ4_XS ? 136
           : k == KQ_TQ2_0 ? 66
           : k == KQ_TQ1_0 ? 54
                           : 84;
}

static inline uint16_t kq_u16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

/* The 8 scales and 8 mins of a Q4_K block's 12 scale bytes (as forge_k4_scale_min). */
static inline void q4k_scales_mins(const uint8_t *q, uint8_t sc[8], uint8_t mn[8])
{
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) {
        sc[j] = q[j] & 63;
        mn[j] = q[j + 4] & 63;
        sc[j + 4] = (uint8_t)((q[j + 8] & 0x0F) | ((q[j] >> 6) << 4));
        mn[j + 4] = (uint8_t)((q[j + 8] >> 4) | ((q[j + 4] >> 6) << 4));
    }
}

/* The per-row tail of a repacked super-block: scales, pairs, d (and dmin) of rows < rows,
 * zero for the others. */
typedef struct kq_tail {
    _Alignas(64) int32_t sc[16][16];
    _Alignas(64) int32_t pr[8][16];
    _Alignas(32) uint16_t d[16], dm[16];
} kq_tail;

TGT INLINE void kq_tail_store(const kq_tail *t, kq_kind kind, uint8_t *rb)
{
    memcpy(rb + kq_off_sc(kind), t->sc, (kq_groups16(kind) ? 16 : 8) * sizeof t->sc[0]);
    memcpy(rb + kq_off_pairs(kind), t->pr, sizeof t->pr);
    _mm512_store_ps((float *)(void *)(rb + kq_off_d(kind)),
                    _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(const void *)t->d)));
    if (kq_has_min(kind))
        _mm512_store_ps((float *)(void *)(rb + kq_off_dmin(kind)),
                        _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(const void *)t->dm)));
}

INLINE int32_t kq_pair16(int lo, int hi)
{
    return (int32_t)((uint32_t)(uint16_t)lo | ((uint32_t)(uint16_t)hi << 16));
}

/* Bit `bit` of each byte of v at bit `to`, the other bits garbage (the caller masks): a 16-bit
 * shift moves bits across the byte boundary only below bit (to - bit) of the high byte (left)
 * or above bit 7 - (bit - to) of the low byte (right), never into bit `to` itself. */
TGT INLINE __m512i kq_bit_to(__m512i v, int bit, int to)
{
    return bit == to ? v : bit < to ? _mm512_slli_epi16(v, (unsigned)(to - bit)) : _mm512_srli_epi16(v, (unsigned)(bit - to));
}

/* Q4_K / Q5_K: repack super-block b of rows [o, o + rows) into rb. Values 0..15 (Q5_K: plus 16
 * where the high bit is set, 0..31). */
TGT INLINE void q45k_repack_sb(const kern_mm_args *a, const kq_idx *ix, int64_t o, int rows, int64_t b,
                               uint8_t *rb, kq_kind kind)
{
    const int five = kind == KQ_Q5_K;
    const uint8_t *w0 = a->W + (size_t)o * a->w_row_bytes + (size_t)b * kq_block_bytes(kind);
    const __m512i m4 = _mm512_set1_epi8(0x0F), m10 = _mm512_set1_epi8(0x10);
    __m512i zl[8], zh[8];
    for (int c = 0; c < 4; c++) {
#pragma GCC unroll 8
        for (int k = 0; k < 8; k++) {
            __m512i q = kq_pair(w0, a->w_row_bytes, k, rows, (five ? 48 : 16) + 32 * (size_t)c);
            zl[k] = _mm512_and_si512(q, m4);
            zh[k] = _mm512_and_si512(_mm512_srli_epi16(q, 4), m4);
            if (five) {
                /* sub-block 2c takes bit 2c of qh, 2c+1 bit 2c+1, as bit 4 of the value */
                __m512i qh = kq_pair(w0, a->w_row_bytes, k, rows, 16);
                zl[k] = _mm512_ternarylogic_epi32(zl[k], kq_bit_to(qh, 2 * c, 4), m10, 0xF8);
                zh[k] = _mm512_ternarylogic_epi32(zh[k], kq_bit_to(qh, 2 * c + 1, 4), m10, 0xF8);
            }
        }
        kq_tr16x8(ix, zl, rb + 512 * (2 * c));
        kq_tr16x8(ix, zh, rb + 512 * (2 * c + 1));
    }
    kq_tail t;
    memset(&t, 0, sizeof t);
    for (int r = 0; r < rows; r++) {
        const uint8_t *wb = w0 + (size_t)r * a->w_row_bytes;
        uint8_t s8[8], m8[8];
        q4k_scales_mins(wb + 4, s8, m8);
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            t.sc[j][r] = s8[j];
            t.pr[j][r] = kq_pair16(m8[j], m8[j]);
        }
        t.d[r] = kq_u16(wb);
        t.dm[r] = kq_u16(wb + 2);
    }
    kq_tail_store(&t, kind, rb);
}

/* Q6_K: values q + 32 (0..63), as the AVX2 dot unpacks them. */
TGT INLINE void q6k_repack_sb(const kern_mm_args *a, const kq_idx *ix, int64_t o, int rows,
                              int64_t b, uint8_t *rb)
{
    const uint8_t *w0 = a->W + (size_t)o * a->w_row_bytes + (size_t)b * 210;
    const __m512i m4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30);
    __m512i z[8];
    for (int h = 0; h < 2; h++) {
#pragma GCC unroll 4
        for (int q = 0; q < 4; q++) {
#pragma GCC unroll 8
            for (int k = 0; k < 8; k++) {
                __m512i ql = kq_pair(w0, a->w_row_bytes, k, rows, 64 * (size_t)h + 32 * (size_t)(q & 1));
                __m512i qh = kq_pair(w0, a->w_row_bytes, k, rows, 128 + 32 * (size_t)h);
                __m512i lo = q < 2 ? _mm512_and_si512(ql, m4) : _mm512_and_si512(_mm512_srli_epi16(ql, 4), m4);
                /* bits 2q, 2q+1 of qh to bits 4, 5 */
                z[k] = _mm512_or_si512(lo, _mm512_and_si512(kq_bit_to(qh, 2 * q, 4), m30));
            }
            kq_tr16x8(ix, z, rb + 512 * (4 * h + q));
        }
    }
    kq_tail t;
    memset(&t, 0, sizeof t);
    for (int r = 0; r < rows; r++) {
        const uint8_t *wb = w0 + (size_t)r * a->w_row_bytes;
        const int8_t *sc = (const int8_t *)(wb + 192);
#pragma GCC unroll 16
        for (int g = 0; g < 16; g++)
            t.sc[g][r] = sc[g];
#pragma GCC unroll 8
        for (int p = 0; p < 8; p++)
            t.pr[p][r] = kq_pair16(sc[2 * p], sc[2 * p + 1]);
        t.d[r] = kq_u16(wb + 208);
    }
    kq_tail_store(&t, KQ_Q6_K, rb);
}

/* Q3_K (hmask[32], qs[64], 12 scale bytes, d), Q2_K (16 scale/min bytes, qs[64], d, dmin) and
 * TQ2_0 (qs[64], d): 2-bit values, chunk c of 32 values from qs[32 (c / 4) ..] >> 2 (c % 4);
 * Q3_K adds 4 where bit c of hmask is set (0..7: the value + 4, as the signed value is q - 4
 * where the bit is clear); TQ2_0's value is q - 1 (scale 1 per sub-block of 32, offset 1). */
TGT INLINE void q23k_repack_sb(const kern_mm_args *a, const kq_idx *ix, int64_t o, int rows, int64_t b,
                               uint8_t *rb, kq_kind kind)
{
    const int three = kind == KQ_Q3_K;
    const uint8_t *w0 = a->W + (size_t)o * a->w_row_bytes + (size_t)b * kq_block_bytes(kind);
    const size_t qs_off = three ? 32 : kind == KQ_TQ2_0 ? 0 : 16;
    const __m512i m3 = _mm512_set1_epi8(0x03), m04 = _mm512_set1_epi8(0x04);
    __m512i z[8];
    for (int c = 0; c < 8; c++) {
#pragma GCC unroll 8
        for (int k = 0; k < 8; k++) {
            __m512i q = kq_pair(w0, a->w_row_bytes, k, rows, qs_off + 32 * (size_t)(c / 4));
            z[k] = _mm512_and_si512(_mm512_srli_epi16(q, (unsigned)(2 * (c % 4))), m3);
            if (three) {
                __m512i hm = kq_pair(w0, a->w_row_bytes, k, rows, 0);
                z[k] = _mm512_ternarylogic_epi32(z[k], kq_bit_to(hm, c, 2), m04, 0xF8);
            }
        }
        kq_tr16x8(ix, z, rb + 512 * c);
    }
    kq_tail t;
    memset(&t, 0, sizeof t);
    for (int r = 0; r < rows; r++) {
        const uint8_t *wb = w0 + (size_t)r * a->w_row_bytes;
        if (three) {
            int8_t sc[16];
            forge_k3_scales(wb + 96, sc);
            for (int g = 0; g < 16; g++)
                t.sc[g][r] = sc[g];
            for (int p = 0; p < 8; p++)
                t.pr[p][r] = kq_pair16(sc[2 * p], sc[2 * p + 1]);
            t.d[r] = kq_u16(wb + 108);
        } else if (kind == KQ_TQ2_0) {
            for (int j = 0; j < 8; j++) {
                t.sc[j][r] = 1;
                t.pr[j][r] = kq_pair16(1, 1);
            }
            t.d[r] = kq_u16(wb + 64);
        } else {
            for (int g = 0; g < 16; g++)
                t.sc[g][r] = wb[g] & 0xF;
            for (int p = 0; p < 8; p++)
                t.pr[p][r] = kq_pair16(wb[2 * p] >> 4, wb[2 * p + 1] >> 4);
            t.d[r] = kq_u16(wb + 80);
            t.dm[r] = kq_u16(wb + 82);
        }
    }
    kq_tail_store(&t, kind, rb);
}

/* IQ4_XS (d, scales_h, scales_l[4], qs[128]): sub-block j's 16 bytes give values 0-15 (low
 * nibbles) and 16-31 (high) through the IQ4_NL table, stored + 128 (1..241); the offset 128 goes
 * through the bsums as Q6_K's 32. */
TGT INLINE void iq4xs_repack_sb(const kern_mm_args *a, const kq_idx *ix, int64_t o, int rows, int64_t b,
                                uint8_t *rb)
{
    const size_t rbytes = a->w_row_bytes;
    const uint8_t *w0 = a->W + (size_t)o * rbytes + (size_t)b * 136;
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i shift = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0); /* lanes 1, 3: high nibbles */
    __m128i tv = _mm_loadu_si128((const __m128i *)(const void *)forge_iq4nl_values);
    const __m512i tbl = _mm512_broadcast_i32x4(_mm_xor_si128(tv, _mm_set1_epi8((char)0x80)));
    __m512i z[8];
    for (int c = 0; c < 8; c++) {
#pragma GCC unroll 8
        for (int k = 0; k < 8; k++) {
            __m128i lo = 2 * k < rows ? _mm_loadu_si128((const __m128i *)(const void *)(w0 + (size_t)(2 * k) * rbytes + 8 + 16 * (size_t)c))
                                      : _mm_setzero_si128();
            __m128i hi = 2 * k + 1 < rows
                             ? _mm_loadu_si128((const __m128i *)(const void *)(w0 + (size_t)(2 * k + 1) * rbytes + 8 + 16 * (size_t)c))
                             : _mm_setzero_si128();
            __m512i q = _mm512_inserti32x4(_mm512_castsi128_si512(lo), lo, 1);
            q = _mm512_inserti32x4(_mm512_inserti32x4(q, hi, 2), hi, 3);
            z[k] = _mm512_shuffle_epi8(tbl, _mm512_and_si512(_mm512_srlv_epi64(q, shift), m4));
        }
        kq_tr16x8(ix, z, rb + 512 * c);
    }
    kq_tail t;
    memset(&t, 0, sizeof t);
    for (int r = 0; r < rows; r++) {
        const uint8_t *wb = w0 + (size_t)r * rbytes;
        const unsigned sh = kq_u16(wb + 2);
        for (int j = 0; j < 8; j++) {
            int sc = (((wb[4 + j / 2] >> (4 * (j % 2))) & 0xF) | (((sh >> (2 * j)) & 3) << 4)) - 32;
            t.sc[j][r] = sc;
            t.pr[j][r] = kq_pair16(sc, sc);
        }
        t.d[r] = kq_u16(wb);
    }
    kq_tail_store(&t, KQ_IQ4_XS, rb);
}

/* TQ1_0 (qs[48] of 5 trits, qh[4] of 4 trits, d): trit k of byte q is ((uint8_t)(q * 3^k) * 3)
 * >> 8 (0..2, the value + 1); values 0-159 from bytes 0-31 (trit-major), 160-239 from bytes
 * 32-47, 240-255 from qh. Unpacked here in scalar code (once per 16 rows and super-block, for all
 * the tokens of the call), then transposed as the others. Scale 1 per sub-block, offset 1. */
TGT INLINE void tq1_repack_sb(const kern_mm_args *a, const kq_idx *ix, int64_t o, int rows, int64_t b,
                              uint8_t *rb)
{
    static const uint8_t pow3[5] = {1, 3, 9, 27, 81};
    const uint8_t *w0 = a->W + (size_t)o * a->w_row_bytes + (size_t)b * 54;
    _Alignas(64) uint8_t v[16][256];
    memset(v, 0, sizeof v);
    for (int r = 0; r < rows; r++) {
        const uint8_t *wb = w0 + (size_t)r * a->w_row_bytes;
        uint8_t *e = v[r];
        for (int k = 0; k < 5; k++)
            for (int m = 0; m < 32; m++)
                *e++ = (uint8_t)(((uint16_t)(uint8_t)(wb[m] * pow3[k]) * 3) >> 8);
        for (int k = 0; k < 5; k++)
            for (int m = 0; m < 16; m++)
                *e++ = (uint8_t)(((uint16_t)(uint8_t)(wb[32 + m] * pow3[k]) * 3) >> 8);
        for (int k = 0; k < 4; k++)
            for (int j = 0; j < 4; j++)
                *e++ = (uint8_t)(((uint16_t)(uint8_t)(wb[48 + j] * pow3[k]) * 3) >> 8);
    }
    __m512i z[8];
    for (int c = 0; c < 8; c++) {
        for (int k = 0; k < 8; k++)
            z[k] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_load_si256((const __m256i *)(const void *)(v[2 * k] + 32 * c))),
                                      _mm256_load_si256((const __m256i *)(const void *)(v[2 * k + 1] + 32 * c)), 1);
        kq_tr16x8(ix, z, rb + 512 * c);
    }
    kq_tail t;
    memset(&t, 0, sizeof t);
    for (int r = 0; r < rows; r++) {
        for (int j = 0; j < 8; j++) {
            t.sc[j][r] = 1;
            t.pr[j][r] = kq_pair16(1, 1);
        }
        t.d[r] = kq_u16(w0 + (size_t)r * a->w_row_bytes + 52);
    }
    kq_tail_store(&t, KQ_TQ1_0, rb);
}

TGT INLINE void kq_repack_sb(const kern_mm_args *a, const kq_idx *ix, int64_t o, int rows, int64_t b,
                             uint8_t *rb, kq_kind kind)
{
    if (kind == KQ_Q6_K)
        q6k_repack_sb(a, ix, o, rows, b, rb);
    else if (kind == KQ_Q4_K || kind == KQ_Q5_K)
        q45k_repack_sb(a, ix, o, rows, b, rb, kind);
    else if (kind == KQ_IQ4_XS)
        iq4xs_repack_sb(a, ix, o, rows, b, rb);
    else if (kind == KQ_TQ1_0)
        tq1_repack_sb(a, ix, o, rows, b, rb);
    else
        q23k_repack_sb(a, ix, o, rows, b, rb, kind);
}

/* 16 repacked rows x T tokens over all super-blocks; stores the valid rows of each token. */
TGT INLINE void kq_tile(const kern_mm_args *a, const uint8_t *rep, int64_t o, __mmask16 rmask,
                        int64_t t0, int T, kq_kind kind)
{
    const int64_t nsb = a->n_in / 256;
    const size_t sbb = kq_sb_bytes(kind);
    const int g16 = kq_groups16(kind);
    const uint8_t *x[KQ_TOK];
    __m512 acc[KQ_TOK];
#pragma GCC unroll 8
    for (int t = 0; t < T; t++) {
        x[t] = a->Xc + (size_t)(t0 + t) * a->xc_row_bytes;
        acc[t] = _mm512_setzero_ps();
    }
    for (int64_t b = 0; b < nsb; b++) {
        const uint8_t *rb = rep + (size_t)b * sbb;
        const size_t yo = (size_t)b * 292;
        __m512i isum[KQ_TOK], s[KQ_TOK];
#pragma GCC unroll 8
        for (int t = 0; t < T; t++)
            isum[t] = _mm512_setzero_si512();
        /* sub-blocks of 32 (Q4_K) or groups of 16 (Q6_K) */
        const int n_sub = g16 ? 16 : 8, per_sub = g16 ? 4 : 8;
        for (int j = 0; j < n_sub; j++) {
#pragma GCC unroll 8
        for (int t = 0; t < T; t++)
                s[t] = _mm512_setzero_si512();
#pragma GCC unroll 8
            for (int g = 0; g < per_sub; g++) {
                const int gi = j * per_sub + g;
                __m512i w = _mm512_load_si512((const void *)(rb + 64 * gi));
#pragma GCC unroll 8
        for (int t = 0; t < T; t++)
                    s[t] = _mm512_dpbusd_epi32(s[t], w, kq_bcast(x[t] + yo + Q8K_QS + 4 * gi));
            }
            __m512i sc = _mm512_load_si512((const void *)(rb + kq_off_sc(kind) + 64 * j));
#pragma GCC unroll 8
        for (int t = 0; t < T; t++)
                isum[t] = _mm512_add_epi32(isum[t], _mm512_mullo_epi32(s[t], sc));
        }
        /* Q4_K: summ = sum_j min_j * bsum_j; Q6_K: corr = sum_g scale_g * bsum_g */
#pragma GCC unroll 8
        for (int t = 0; t < T; t++)
            s[t] = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int p = 0; p < 8; p++) {
            __m512i m = _mm512_load_si512((const void *)(rb + kq_off_pairs(kind) + 64 * p));
#pragma GCC unroll 8
        for (int t = 0; t < T; t++)
                s[t] = _mm512_dpwssd_epi32(s[t], m, kq_bcast(x[t] + yo + Q8K_BSUM + 4 * p));
        }
        if (!kq_has_min(kind)) {
            /* the offset: 32 (Q6_K), 4 (Q3_K), 128 (IQ4_XS) or 1 (TQ1_0, TQ2_0) times
             * sum_g scale_g * bsum_g (TQ1_0/TQ2_0's isum * (d * dy) has the same bits: IEEE
             * products commute) */
            const unsigned shift = kind == KQ_Q6_K ? 5 : kind == KQ_Q3_K ? 2 : kind == KQ_IQ4_XS ? 7 : 0;
            const __m512 d = _mm512_load_ps((const float *)(const void *)(rb + kq_off_d(kind)));
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) {
                __m512 dy = _mm512_set1_ps(kq_f32(x[t] + yo));
                __m512i is = _mm512_sub_epi32(isum[t], _mm512_slli_epi32(s[t], shift));
                acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(_mm512_mul_ps(d, dy), _mm512_cvtepi32_ps(is)));
            }
        } else {
            const __m512 d = _mm512_load_ps((const float *)(const void *)(rb + kq_off_d(kind)));
            const __m512 dm = _mm512_load_ps((const float *)(const void *)(rb + kq_off_dmin(kind)));
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) {
                __m512 dy = _mm512_set1_ps(kq_f32(x[t] + yo));
                __m512 p1 = _mm512_mul_ps(_mm512_mul_ps(d, dy), _mm512_cvtepi32_ps(isum[t]));
                __m512 p2 = _mm512_mul_ps(_mm512_mul_ps(dm, dy), _mm512_cvtepi32_ps(s[t]));
                acc[t] = _mm512_add_ps(acc[t], _mm512_sub_ps(p1, p2));
            }
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < T; t++)
        _mm512_mask_storeu_ps(a->Y + (t0 + t) * a->n_out + o, rmask, acc[t]);
}

TGT INLINE void kq_rows_ntok(const kern_mm_args *a, int64_t r0, int64_t r1, void *work, kq_kind kind)
{
    uint8_t *rep = work;
    const int64_t nsb = a->n_in / 256;
    kq_idx ix;
    kq_make_idx(&ix);
    for (int64_t o = r0; o < r1; o += KQ_ROWS) {
        int rows = r1 - o < KQ_ROWS ? (int)(r1 - o) : KQ_ROWS;
        __mmask16 rmask = (__mmask16)((1u << rows) - 1);
        for (int64_t b = 0; b < nsb; b++)
            kq_repack_sb(a, &ix, o, rows, b, rep + (size_t)b * kq_sb_bytes(kind), kind);
        int64_t t = 0;
        for (; t + KQ_TOK <= a->n_tok; t += KQ_TOK)
            kq_tile(a, rep, o, rmask, t, KQ_TOK, kind);
        if (t + 4 <= a->n_tok) {
            kq_tile(a, rep, o, rmask, t, 4, kind);
            t += 4;
        }
        for (; t < a->n_tok; t++)
            kq_tile(a, rep, o, rmask, t, 1, kind);
    }
}

/* Decode: the one-row dot product per (row, token). */
static void kq_rows_dot(const kern_mm_args *a, int64_t r0, int64_t r1)
{
    for (int64_t o = r0; o < r1; o++) {
        const uint8_t *w = a->W + (size_t)o * a->w_row_bytes;
        for (int64_t t = 0; t < a->n_tok; t++)
            a->Y[t * a->n_out + o] = a->dot(a->n_in, w, a->Xc + (size_t)t * a->xc_row_bytes);
    }
}

_Static_assert(KQ_TILE_MIN_TOK == KQ_DECODE_MAX_TOK + 1, "decode takes what the tiles leave");

/* Q8_K activations, byte for byte forge_quantize_act_q8_k (src/quant/vecdot.c; ggml's
 * quantize_row_q8_K): per 256, the first value of largest magnitude sets -127 / max, values
 * rounded to nearest even (the default MXCSR, as nearbyintf), at most 127; d = 1 / iscale;
 * the 16 group sums. NaN inputs are skipped by the maximum as by the scalar code's '>'. */
TGT void kern_cvt_q8_k_avx512(const float *x, void *y, int64_t n)
{
    uint8_t *b = y;
    const __m512 absm = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    for (int64_t i = 0; i < n / 256; i++, x += 256, b += 292) {
        __m512 am = _mm512_setzero_ps();
        for (int j = 0; j < 16; j++) /* max(|x|, am): am where |x| is NaN */
            am = _mm512_max_ps(_mm512_and_ps(_mm512_loadu_ps(x + 16 * j), absm), am);
        const float amax = _mm512_reduce_max_ps(am);
        float max = 0.0f, d = 0.0f;
        int8_t *qs = (int8_t *)(b + 4);
        if (amax == 0.0f) {
            memset(qs, 0, 256);
        } else {
            const __m512 va = _mm512_set1_ps(amax);
            for (int j = 0; j < 16; j++) {
                __m512 v = _mm512_loadu_ps(x + 16 * j);
                __mmask16 m = _mm512_cmp_ps_mask(_mm512_and_ps(v, absm), va, _CMP_EQ_OQ);
                if (m) {
                    max = x[16 * j + __builtin_ctz(m)];
                    break;
                }
            }
            const float iscale = -127.0f / max;
            const __m512 is = _mm512_set1_ps(iscale);
            const __m512i top = _mm512_set1_epi32(127);
            for (int j = 0; j < 16; j++) {
                __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(is, _mm512_loadu_ps(x + 16 * j)));
                _mm_storeu_si128((__m128i *)(void *)(qs + 16 * j), _mm512_cvtepi32_epi8(_mm512_min_epi32(q, top)));
            }
            d = 1.0f / iscale;
        }
        memcpy(b, &d, 4);
        /* group sums: sad of the bytes + 128 against zero, less 16 * 128 */
        for (int g = 0; g < 16; g += 4) {
            __m512i v = _mm512_xor_si512(_mm512_loadu_si512((const void *)(qs + 16 * g)), _mm512_set1_epi8((char)0x80));
            __m512i sd = _mm512_sad_epu8(v, _mm512_setzero_si512());
            sd = _mm512_add_epi64(sd, _mm512_shuffle_epi32(sd, (_MM_PERM_ENUM)0x4E));
            /* qwords 0, 2, 4, 6 hold the four groups' sums + 2048 */
            __m512i s16 = _mm512_sub_epi64(sd, _mm512_set1_epi64(2048));
            __m128i w = _mm512_cvtepi64_epi16(_mm512_maskz_compress_epi64(0x55, s16));
            _mm_storel_epi64((__m128i *)(void *)(b + 260 + 2 * g), w);
        }
    }
}

/* One entry per type: prompts through the tiles; decode through the four-row kernels where
 * matvec_kq_avx512.c has one (Q4_K, Q5_K, Q6_K) and the CPU runs it, else the one-row dot. */
#define KQ_MM(name, kind)                                                                          \
    TGT static void name(const kern_mm_args *a, int64_t r0, int64_t r1, void *work)               \
    {                                                                                              \
        if (a->n_tok >= KQ_TILE_MIN_TOK)                                                           \
            kq_rows_ntok(a, r0, r1, work, kind);                                                   \
        else if (kern_kq_decode_has(kind))                                                         \
            kern_kq_decode(a, r0, r1, work, kind);                                                 \
        else                                                                                       \
            kq_rows_dot(a, r0, r1);                                                                \
    }
KQ_MM(mm_q2_k_avx512, KQ_Q2_K)
KQ_MM(mm_q3_k_avx512, KQ_Q3_K)
KQ_MM(mm_q4_k_avx512, KQ_Q4_K)
KQ_MM(mm_q5_k_avx512, KQ_Q5_K)
KQ_MM(mm_q6_k_avx512, KQ_Q6_K)
KQ_MM(mm_iq4_xs_avx512, KQ_IQ4_XS)
KQ_MM(mm_tq1_0_avx512, KQ_TQ1_0)
KQ_MM(mm_tq2_0_avx512, KQ_TQ2_0)

kern_mm_kernel kern_mm_lookup_kq_avx512(int wtype)
{
    static const struct {
        int type;
        kern_mm_fn mm;
        kq_kind kind;
    } kinds[] = {
        {GGML_TYPE_Q2_K, mm_q2_k_avx512, KQ_Q2_K},       {GGML_TYPE_Q3_K, mm_q3_k_avx512, KQ_Q3_K},
        {GGML_TYPE_Q4_K, mm_q4_k_avx512, KQ_Q4_K},       {GGML_TYPE_Q5_K, mm_q5_k_avx512, KQ_Q5_K},
        {GGML_TYPE_Q6_K, mm_q6_k_avx512, KQ_Q6_K},       {GGML_TYPE_IQ4_XS, mm_iq4_xs_avx512, KQ_IQ4_XS},
        {GGML_TYPE_TQ1_0, mm_tq1_0_avx512, KQ_TQ1_0},    {GGML_TYPE_TQ2_0, mm_tq2_0_avx512, KQ_TQ2_0},
    };
    kern_mm_kernel k = {0};
    if (!kern_cpu_has_avx512vnni()) return k;
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
        if (kinds[i].type != wtype) continue;
        const size_t tile = kq_sb_bytes(kinds[i].kind) / 8;
        k = kern_mm_block_kernel(wtype, kinds[i].mm, tile > KQ_DECODE_WORK_PER_32 ? tile : KQ_DECODE_WORK_PER_32);
        if (k.cvt == forge_quantize_act_q8_k) k.cvt = kern_cvt_q8_k_avx512;
        break;
    }
    return k;
}

#else /* not x86-64 */

kern_mm_kernel kern_mm_lookup_kq_avx512(int wtype)
{
    kern_mm_kernel k = {0};
    (void)wtype;
    return k;
}

#endif
