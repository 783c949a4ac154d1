/* matmul_q32_avx512.c - AVX-512 VNNI prompt tiles (KQ_TILE_MIN_TOK tokens or more) and decode
 * kernels (fewer; below) for the other blocks of 32: Q4_1 and Q5_1 (activations Q8_1), Q5_0 and IQ4_NL (activations Q8_0), as
 * ggml pairs them. x86-64 only, compiled with target attributes; matmul_avx512.c's lookup hands
 * these out only when the CPU has VNNI. (Q4_0 and Q8_0 have their own kernels there.)
 *
 * As the K-quant tiles (matmul_kq_avx512.c): 16 weight rows are repacked per call into the
 * thread's scratch, per block the 32 unsigned values of row r in 32-bit lane r (8 vectors: Q4_1
 * 0..15, Q5_0 and Q5_1 0..31, IQ4_NL the table value + 128), then d and, for Q4_1/Q5_1, m as
 * floats; a register tile of 16 rows x 8 tokens advances 16 rows of a token by one vpdpbusd
 * with a broadcast of 4 activation bytes. The offset of the unsigned values (Q5_0 16, IQ4_NL
 * 128) is taken off with the block's activation sum.
 * Each row's integer per block is the exact dot product of the one-row dots (src/quant/vecdot.c,
 * src/cpu/vecdot_avx2.c), and the float step per block is theirs, in their order: sumf + (d * dx)
 * * isum, or sumf + ((d * dx) * isum + m * s) with a min (no fma contraction in the build): a
 * row gets the same bits alone (decode) and in a batch (tests/test_batch_invariance.c), and
 * those of the one-row dot (tests/test_quant_kernels.c). */
#include <string.h>

#include "core/fp16.h"
#include "cpu/kern_impl.h"
#include "cpu/tile_avx512.h"
#include "quant/qtypes.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define TGT                                                                                        \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline))

#define Q32_ROWS 16
#define Q32_TOK 8
#define Q32_MIN_TOK 4  /* as the K-quant tiles: fewer tokens take the decode kernel */
#define Q32_D 512      /* repacked block: 8 vectors of values, then d (16 floats) */
#define Q32_M 576      /* then m (16 floats; Q4_1, Q5_1) */
#define Q32_SB 640

typedef enum q32_kind { Q32_Q4_1, Q32_Q5_0, Q32_Q5_1, Q32_IQ4_NL } q32_kind;

INLINE size_t q32_block_bytes(q32_kind k)
{
    return k == Q32_Q4_1 ? 20 : k == Q32_Q5_0 ? 22 : k == Q32_Q5_1 ? 24 : 18;
}
INLINE int q32_has_min(q32_kind k)
{
    return k == Q32_Q4_1 || k == Q32_Q5_1;
}
/* offset of the nibbles in a block, and of the activation values in a Q8_0 / Q8_1 block */
INLINE size_t q32_qs_off(q32_kind k)
{
    return k == Q32_Q4_1 ? 4 : k == Q32_Q5_0 ? 6 : k == Q32_Q5_1 ? 8 : 2;
}
INLINE size_t q32_x_bytes(q32_kind k)
{
    return q32_has_min(k) ? 36 : 34;
}

static inline uint32_t q32_u32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Repack block b of rows [o, o + rows) into rb. */
TGT INLINE void q32_repack(const kern_mm_args *a, const kq_idx *ix, int64_t o, int rows, int64_t b, uint8_t *rb,
                           q32_kind kind)
{
    const size_t rbytes = a->w_row_bytes, bb = q32_block_bytes(kind), qo = q32_qs_off(kind);
    const uint8_t *w0 = a->W + (size_t)o * rbytes + (size_t)b * bb;
    const __m512i m4 = _mm512_set1_epi8(0x0F), b4 = _mm512_set1_epi8(0x10);
    const __m512i shift = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0); /* lanes 1, 3: high nibbles */
    __m128i tv = _mm_loadu_si128((const __m128i *)(const void *)forge_iq4nl_values);
    const __m512i tbl = _mm512_broadcast_i32x4(_mm_xor_si128(tv, _mm_set1_epi8((char)0x80)));
    __m512i z[8];
#pragma GCC unroll 8
    for (int k = 0; k < 8; k++) {
        const uint8_t *p0 = w0 + (size_t)(2 * k) * rbytes, *p1 = p0 + rbytes;
        const int v0 = 2 * k < rows, v1 = 2 * k + 1 < rows;
        __m128i lo = v0 ? _mm_loadu_si128((const __m128i *)(const void *)(p0 + qo)) : _mm_setzero_si128();
        __m128i hi = v1 ? _mm_loadu_si128((const __m128i *)(const void *)(p1 + qo)) : _mm_setzero_si128();
        __m512i q = _mm512_inserti32x4(_mm512_castsi128_si512(lo), lo, 1);
        q = _mm512_inserti32x4(_mm512_inserti32x4(q, hi, 2), hi, 3);
        __m512i v = _mm512_and_si512(_mm512_srlv_epi64(q, shift), m4);
        if (kind == Q32_IQ4_NL) {
            v = _mm512_shuffle_epi8(tbl, v);
        } else if (kind == Q32_Q5_0 || kind == Q32_Q5_1) {
            /* bit j of qh is bit 4 of value j: byte j of row 2k, byte 32 + j of row 2k+1 */
            const size_t ho = kind == Q32_Q5_0 ? 2 : 4;
            uint64_t qh = (v0 ? q32_u32(p0 + ho) : 0) | (uint64_t)(v1 ? q32_u32(p1 + ho) : 0) << 32;
            v = _mm512_or_si512(v, _mm512_maskz_mov_epi8((__mmask64)qh, b4));
        }
        z[k] = v;
    }
    kq_tr16x8(ix, z, rb);
    _Alignas(32) uint16_t d[16], m[16];
    memset(d, 0, sizeof d);
    memset(m, 0, sizeof m);
    for (int r = 0; r < rows; r++) {
        const uint8_t *wb = w0 + (size_t)r * rbytes;
        d[r] = (uint16_t)(wb[0] | (wb[1] << 8));
        m[r] = (uint16_t)(wb[2] | (wb[3] << 8));
    }
    _mm512_store_ps((float *)(void *)(rb + Q32_D), _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(const void *)d)));
    if (q32_has_min(kind))
        _mm512_store_ps((float *)(void *)(rb + Q32_M), _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(const void *)m)));
}

TGT INLINE float q32_half(const uint8_t *p)
{
    return forge_fp16_to_f32((uint16_t)(p[0] | (p[1] << 8)));
}

/* The sum of a block's 32 activation values. */
TGT INLINE int32_t q32_xsum(const uint8_t *q)
{
    __m256i s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(1),
                                    _mm256_loadu_si256((const __m256i *)(const void *)q));
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1));
    return _mm_cvtsi128_si32(h);
}

/* 16 repacked rows x T tokens over all blocks; stores the valid rows of each token. */
TGT INLINE void q32_tile(const kern_mm_args *a, const uint8_t *rep, int64_t o, __mmask16 rmask, int64_t t0,
                         int T, q32_kind kind)
{
    const int64_t nb = a->n_in / 32;
    const size_t xb = q32_x_bytes(kind), xq = q32_has_min(kind) ? 4 : 2;
    const int32_t off = kind == Q32_Q5_0 ? 16 : 128; /* the unsigned values' offset */
    const uint8_t *x[Q32_TOK];
    __m512 acc[Q32_TOK];
#pragma GCC unroll 8
    for (int t = 0; t < T; t++) {
        x[t] = a->Xc + (size_t)(t0 + t) * a->xc_row_bytes;
        acc[t] = _mm512_setzero_ps();
    }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *rb = rep + (size_t)b * Q32_SB;
        const __m512 dw = _mm512_load_ps((const float *)(const void *)(rb + Q32_D));
        __m512i s[Q32_TOK];
#pragma GCC unroll 8
        for (int t = 0; t < T; t++)
            s[t] = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int g = 0; g < 8; g++) {
            __m512i w = _mm512_load_si512((const void *)(rb + 64 * g));
#pragma GCC unroll 8
            for (int t = 0; t < T; t++)
                s[t] = _mm512_dpbusd_epi32(s[t], w, kq_bcast(x[t] + (size_t)b * xb + xq + 4 * g));
        }
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) {
            const uint8_t *xt = x[t] + (size_t)b * xb;
            __m512i is = s[t];
            if (kind == Q32_Q5_0 || kind == Q32_IQ4_NL)
                is = _mm512_sub_epi32(is, _mm512_set1_epi32(q32_xsum(xt + xq) * off));
            __m512 p = _mm512_mul_ps(_mm512_mul_ps(dw, _mm512_set1_ps(q32_half(xt))), _mm512_cvtepi32_ps(is));
            if (q32_has_min(kind)) {
                const __m512 mw = _mm512_load_ps((const float *)(const void *)(rb + Q32_M));
                p = _mm512_add_ps(p, _mm512_mul_ps(mw, _mm512_set1_ps(q32_half(xt + 2))));
            }
            acc[t] = _mm512_add_ps(acc[t], p);
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < T; t++)
        _mm512_mask_storeu_ps(a->Y + (t0 + t) * a->n_out + o, rmask, acc[t]);
}

/* ---- decode (fewer than Q32_MIN_TOK tokens) ------------------------------------------------
 * Four rows at a time from the file's blocks, two blocks per step: a row's 64 unsigned values
 * of blocks b, b+1 in one vector in the activations' order (128-bit lanes: low nibbles of b,
 * high of b, low of b+1, high of b+1; Q5's fifth bit from qh; IQ4_NL through the table + 128)
 * meet the two activation blocks in one vpdpbusd, seeded with -offset * (activation sums) for
 * Q5_0 (16) and IQ4_NL (128); the four rows' sums are reduced together, and the float step of
 * each block runs on the four rows as one vector, in the one-row dot's order. */

/* The 64 values of blocks b (at wb) and b+1 of one row; nblk 1: block b only, the rest zero or
 * (IQ4_NL) a table value that meets zero activations. */
TGT INLINE __m512i q32_vals2(const uint8_t *wb, int nblk, q32_kind kind, __m512i tbl)
{
    const size_t bb = q32_block_bytes(kind), qo = q32_qs_off(kind);
    const __m512i m4 = _mm512_set1_epi8(0x0F), b4 = _mm512_set1_epi8(0x10);
    const __m512i shift = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0);
    const __m128i lo = _mm_loadu_si128((const __m128i *)(const void *)(wb + qo));
    const __m128i hi = nblk == 2 ? _mm_loadu_si128((const __m128i *)(const void *)(wb + bb + qo)) : _mm_setzero_si128();
    __m512i q = _mm512_inserti32x4(_mm512_castsi128_si512(lo), lo, 1);
    q = _mm512_inserti32x4(_mm512_inserti32x4(q, hi, 2), hi, 3);
    __m512i v = _mm512_and_si512(_mm512_srlv_epi64(q, shift), m4);
    if (kind == Q32_IQ4_NL) {
        v = _mm512_shuffle_epi8(tbl, v);
    } else if (kind == Q32_Q5_0 || kind == Q32_Q5_1) {
        const size_t ho = kind == Q32_Q5_0 ? 2 : 4;
        const uint64_t qh = q32_u32(wb + ho) | (uint64_t)(nblk == 2 ? q32_u32(wb + bb + ho) : 0) << 32;
        v = _mm512_or_si512(v, _mm512_maskz_mov_epi8((__mmask64)qh, b4));
    }
    return v;
}

/* sumf + (d * dx) * isum (+ m * s) of block b (at w) for the four rows: d and m of a row are
 * its block's first four bytes (for the types without m, the two after d are read and unused) */
TGT INLINE __m128 q32_dec_step(const uint8_t *w, size_t rbytes, const uint8_t *xt, __m128i isum, __m128 sumf,
                               q32_kind kind)
{
    const __m128i dm = _mm_setr_epi32((int)q32_u32(w), (int)q32_u32(w + rbytes), (int)q32_u32(w + 2 * rbytes),
                                      (int)q32_u32(w + 3 * rbytes));
    /* [d0 m0 d1 m1 d2 m2 d3 m3] -> [d0 d1 d2 d3 m0 m1 m2 m3] */
    const __m256 f = _mm256_permutevar8x32_ps(_mm256_cvtph_ps(dm), _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
    uint16_t hx;
    memcpy(&hx, xt, 2);
    __m128 p = _mm_mul_ps(_mm_mul_ps(_mm256_castps256_ps128(f), _mm_set1_ps(_cvtsh_ss(hx))), _mm_cvtepi32_ps(isum));
    if (q32_has_min(kind)) {
        uint16_t hs;
        memcpy(&hs, xt + 2, 2);
        p = _mm_add_ps(p, _mm_mul_ps(_mm256_extractf128_ps(f, 1), _mm_set1_ps(_cvtsh_ss(hs))));
    }
    return _mm_add_ps(sumf, p);
}

/* Rows o..o+3 against token row x; pf: the bytes about 16 KB ahead to prefetch, or NULL. */
TGT INLINE __m128 q32_dec_rows4(const kern_mm_args *a, int64_t o, const uint8_t *x, const uint8_t *pf, q32_kind kind)
{
    const int64_t nb = a->n_in / 32;
    const size_t bb = q32_block_bytes(kind), xb = q32_x_bytes(kind), xq = q32_has_min(kind) ? 4 : 2;
    const size_t rbytes = a->w_row_bytes, step = 4 * 2 * bb;
    const int has_off = kind == Q32_Q5_0 || kind == Q32_IQ4_NL;
    const __m512i offv = _mm512_set1_epi8((char)(kind == Q32_Q5_0 ? 16 : 128));
    const __m128i tv = _mm_loadu_si128((const __m128i *)(const void *)forge_iq4nl_values);
    const __m512i tbl = _mm512_broadcast_i32x4(_mm_xor_si128(tv, _mm_set1_epi8((char)0x80)));
    const uint8_t *w = a->W + (size_t)o * rbytes;
    __m128 sumf = _mm_setzero_ps();
    for (int64_t b = 0; b < nb; b += 2) {
        const int nblk = nb - b >= 2 ? 2 : 1;
        if (pf)
            for (size_t l = 0; l < (step + 63) / 64; l++)
                _mm_prefetch((const char *)(pf + (size_t)(b / 2) * step + 64 * l), _MM_HINT_T1);
        const uint8_t *xt = x + (size_t)b * xb;
        const __m256i y0 = _mm256_loadu_si256((const __m256i *)(const void *)(xt + xq));
        const __m512i y = nblk == 2 ? _mm512_inserti64x4(_mm512_castsi256_si512(y0),
                                                         _mm256_loadu_si256((const __m256i *)(const void *)(xt + xb + xq)), 1)
                                    : _mm512_zextsi256_si512(y0);
        const __m512i seed =
            has_off ? _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), offv, y))
                    : _mm512_setzero_si512();
        __m512i s[4];
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++)
            s[r] = _mm512_dpbusd_epi32(seed, q32_vals2(w + (size_t)r * rbytes + (size_t)b * bb, nblk, kind, tbl), y);
        /* each 128-bit lane: the four rows' sums of its four int32 lanes */
        const __m512i p01 = _mm512_add_epi32(_mm512_unpacklo_epi32(s[0], s[1]), _mm512_unpackhi_epi32(s[0], s[1]));
        const __m512i p23 = _mm512_add_epi32(_mm512_unpacklo_epi32(s[2], s[3]), _mm512_unpackhi_epi32(s[2], s[3]));
        const __m512i q = _mm512_add_epi32(_mm512_unpacklo_epi64(p01, p23), _mm512_unpackhi_epi64(p01, p23));
        const __m128i i0 = _mm_add_epi32(_mm512_castsi512_si128(q), _mm512_extracti32x4_epi32(q, 1));
        sumf = q32_dec_step(w + (size_t)b * bb, rbytes, xt, i0, sumf, kind);
        if (nblk == 2) {
            const __m128i i1 = _mm_add_epi32(_mm512_extracti32x4_epi32(q, 2), _mm512_extracti32x4_epi32(q, 3));
            sumf = q32_dec_step(w + (size_t)(b + 1) * bb, rbytes, xt + xb, i1, sumf, kind);
        }
    }
    return sumf;
}

TGT INLINE void q32_decode(const kern_mm_args *a, int64_t r0, int64_t r1, q32_kind kind)
{
    const size_t group = 4 * a->w_row_bytes, ahead = (16384 + group - 1) / group * group;
    int64_t o = r0;
    for (; o + 4 <= r1; o += 4)
        for (int64_t t = 0; t < a->n_tok; t++) {
            const uint8_t *pf = t == 0 ? a->W + (size_t)o * a->w_row_bytes + ahead : NULL;
            _mm_storeu_ps(a->Y + t * a->n_out + o, q32_dec_rows4(a, o, a->Xc + (size_t)t * a->xc_row_bytes, pf, kind));
        }
    for (; o < r1; o++) { /* the last rows of a matrix whose row count is not a multiple of 4 */
        const uint8_t *w = a->W + (size_t)o * a->w_row_bytes;
        for (int64_t t = 0; t < a->n_tok; t++)
            a->Y[t * a->n_out + o] = a->dot(a->n_in, w, a->Xc + (size_t)t * a->xc_row_bytes);
    }
}

TGT INLINE void q32_rows(const kern_mm_args *a, int64_t r0, int64_t r1, void *work, q32_kind kind)
{
    if (a->n_tok < Q32_MIN_TOK) {
        q32_decode(a, r0, r1, kind);
        return;
    }
    uint8_t *rep = work;
    const int64_t nb = a->n_in / 32;
    kq_idx ix;
    kq_make_idx(&ix);
    for (int64_t o = r0; o < r1; o += Q32_ROWS) {
        int rows = r1 - o < Q32_ROWS ? (int)(r1 - o) : Q32_ROWS;
        __mmask16 rmask = (__mmask16)((1u << rows) - 1);
        for (int64_t b = 0; b < nb; b++)
            q32_repack(a, &ix, o, rows, b, rep + (size_t)b * Q32_SB, kind);
        int64_t t = 0;
        for (; t + Q32_TOK <= a->n_tok; t += Q32_TOK)
            q32_tile(a, rep, o, rmask, t, Q32_TOK, kind);
        if (t + 4 <= a->n_tok) {
            q32_tile(a, rep, o, rmask, t, 4, kind);
            t += 4;
        }
        for (; t < a->n_tok; t++)
            q32_tile(a, rep, o, rmask, t, 1, kind);
    }
}

#define Q32_MM(name, kind)                                                                         \
    TGT static void name(const kern_mm_args *a, int64_t r0, int64_t r1, void *work)               \
    {                                                                                              \
        q32_rows(a, r0, r1, work, kind);                                                           \
    }
Q32_MM(mm_q4_1_avx512, Q32_Q4_1)
Q32_MM(mm_q5_0_avx512, Q32_Q5_0)
Q32_MM(mm_q5_1_avx512, Q32_Q5_1)
Q32_MM(mm_iq4_nl_avx512, Q32_IQ4_NL)

kern_mm_kernel kern_mm_lookup_q32_avx512(int wtype)
{
    kern_mm_kernel k = {0};
    if (!kern_cpu_has_avx512vnni()) return k;
    switch (wtype) {
    case GGML_TYPE_Q4_1:
        return kern_mm_block_kernel(wtype, mm_q4_1_avx512, Q32_SB);
    case GGML_TYPE_Q5_0:
        return kern_mm_block_kernel(wtype, mm_q5_0_avx512, Q32_SB);
    case GGML_TYPE_Q5_1:
        return kern_mm_block_kernel(wtype, mm_q5_1_avx512, Q32_SB);
    case GGML_TYPE_IQ4_NL:
        return kern_mm_block_kernel(wtype, mm_iq4_nl_avx512, Q32_SB);
    default:
        return k;
    }
}

#else /* not x86-64 */

kern_mm_kernel kern_mm_lookup_q32_avx512(int wtype)
{
    kern_mm_kernel k = {0};
    (void)wtype;
    return k;
}

#endif
