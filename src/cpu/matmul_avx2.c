/* matmul_avx2.c - AVX2 + FMA + F16C row kernels for kern_matmul (x86-64 only; compiled with
 * target attributes, used only when cpu_features.c finds the CPU support). Also the fallback of
 * the AVX-512 ISA for types whose AVX-512 kernel needs an extension the CPU lacks.
 *
 * Q4_0: nibbles (0..15) times activations by vpmaddubsw, the -8 offset through the activation
 * row's ncorr; Q8_0: |w| times sign(w) * x by vpmaddubsw. Each block's integer sum is exact and
 * scaled by d_w * d_x in float, as ggml's AVX2 code does. Register tiles of 4 rows x 2 tokens
 * (each weight block unpacked once for 2 tokens, each activation block loaded once for 4 rows);
 * decode prefetches the next tile; prompts run the tokens in L2-sized chunks (kern_tok_chunk).
 * Q4_0 also from the repacked X16 layout. F32/F16/BF16: register tiles of 4 rows x 2 tokens, f32
 * FMA. */
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

/* Every Q4_0 / Q8_0 output is the scalar kernel's expression (mm_q4_0_scalar): per block the
 * exact integer sum, times (d_w * d_x), added to the row's sum in block order (a multiply and an
 * add, no fma). So these kernels give the scalar bits whatever the tile, the token count or the
 * layout a row is read from (batch invariance, docs/ENGINE.md), and equal the scalar ISA's. */

/* Lane i: the sum of the 8 lanes of v[i]. */
TGT INLINE __m256i reduce8i(const __m256i v[8])
{
    const __m256i h01 = _mm256_hadd_epi32(v[0], v[1]), h23 = _mm256_hadd_epi32(v[2], v[3]);
    const __m256i h45 = _mm256_hadd_epi32(v[4], v[5]), h67 = _mm256_hadd_epi32(v[6], v[7]);
    const __m256i g0 = _mm256_hadd_epi32(h01, h23), g1 = _mm256_hadd_epi32(h45, h67);
    return _mm256_add_epi32(_mm256_permute2x128_si256(g0, g1, 0x20),
                            _mm256_permute2x128_si256(g0, g1, 0x31));
}

/* The file layout: a register tile of R rows x T tokens (T 1 or 2, R <= 8 / T; 8 x 1 for decode,
 * 4 x 2 for prompts), row r of token k in lane k * 8 / T + r. Per block each pair's products are
 * summed in 8 lanes (vpmaddubsw, vpmaddwd), the 8 pairs' lanes reduced together, then scaled in
 * one vector. */
#define Q_TILE_PAIRS 8

/* Decode streams the weights from memory. A tile's rows are one contiguous region, so while a
 * tile is computed the next one is prefetched as one linear stream, as the AVX-512 kernels do
 * (on the AVX2-only EPYC this took a TinyLlama Q8_0 step from ~11 to ~14.5 tok/s, bench_matmul
 * -M -j 2). */
#define Q_PF_LINES(bb) ((int)((Q_TILE_PAIRS * (bb) + 63) / 64))

/* pf: the next tile's bytes (one block step of them per block step) or NULL. */
TGT INLINE void q_tile(const kern_mm_args *a, int64_t o, int R, int64_t t, int T, int is_q4,
                       const uint8_t *pf)
{
    const int64_t nb = a->n_in / KERN_QK;
    const int S = Q_TILE_PAIRS / T; /* lanes per token */
    const size_t bb = is_q4 ? KERN_Q4_0_BYTES : KERN_Q8_0_BYTES;
    const __m128i lo4 = _mm_set1_epi8(0x0f);
    const __m256i ones16 = _mm256_set1_epi16(1);
    const int8_t *xq[2];
    const float *xd[2];
    const int32_t *nc[2];
    const uint8_t *w[Q_TILE_PAIRS];
#pragma GCC unroll 2
    for (int k = 0; k < T; k++) {
        const uint8_t *xrow = a->Xc + (size_t)(t + k) * a->xc_row_bytes;
        xq[k] = (const int8_t *)xrow;
        xd[k] = kern_xq_d(xrow, a->n_in);
        nc[k] = kern_xq_ncorr(xrow, a->n_in);
    }
#pragma GCC unroll 8
    for (int r = 0; r < Q_TILE_PAIRS; r++) /* rows past R: never read, but defined */
        w[r] = a->W + (size_t)(o + (r < R ? r : 0)) * a->w_row_bytes;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        if (pf) {
#pragma GCC unroll 5
            for (int l = 0; l < Q_PF_LINES(bb); l++)
                _mm_prefetch((const char *)(pf + (size_t)b * R * bb + 64 * l), _MM_HINT_T0);
        }
        __m256i xv[2], v[Q_TILE_PAIRS];
        uint16_t dwh[Q_TILE_PAIRS];
#pragma GCC unroll 8
        for (int i = 0; i < Q_TILE_PAIRS; i++) {
            v[i] = _mm256_setzero_si256();
            dwh[i] = 0;
        }
#pragma GCC unroll 2
        for (int k = 0; k < T; k++)
            xv[k] = _mm256_loadu_si256((const __m256i *)(const void *)(xq[k] + b * KERN_QK));
#pragma GCC unroll 8
        for (int r = 0; r < R && r < S; r++) {
            const uint8_t *wb = w[r] + (size_t)b * bb;
            dwh[r] = kern_load_u16(wb);
            if (is_q4) {
                __m128i q = _mm_loadu_si128((const __m128i *)(const void *)(wb + 2));
                __m128i lo = _mm_and_si128(q, lo4), hi = _mm_and_si128(_mm_srli_epi16(q, 4), lo4);
                __m256i u = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
#pragma GCC unroll 2
                for (int k = 0; k < T; k++)
                    v[(k * S + r) & (Q_TILE_PAIRS - 1)] =
                        _mm256_madd_epi16(_mm256_maddubs_epi16(u, xv[k]), ones16);
            } else {
                __m256i q = _mm256_loadu_si256((const __m256i *)(const void *)(wb + 2));
                __m256i aq = _mm256_sign_epi8(q, q);
#pragma GCC unroll 2
                for (int k = 0; k < T; k++)
                    v[(k * S + r) & (Q_TILE_PAIRS - 1)] = _mm256_madd_epi16(
                        _mm256_maddubs_epi16(aq, _mm256_sign_epi8(xv[k], q)), ones16);
            }
        }
        __m256i isum = reduce8i(v);
        __m256 dw, dx;
        if (T == 1) {
            if (is_q4) isum = _mm256_add_epi32(isum, _mm256_set1_epi32(nc[0][b]));
            dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)dwh));
            dx = _mm256_set1_ps(xd[0][b]);
        } else { /* lanes 0-3 token t, 4-7 token t + 1 */
            if (is_q4)
                isum = _mm256_add_epi32(isum, _mm256_set_m128i(_mm_set1_epi32(nc[1][b]),
                                                               _mm_set1_epi32(nc[0][b])));
            __m128 d4 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(const void *)dwh));
            dw = _mm256_set_m128(d4, d4);
            dx = _mm256_set_m128(_mm_set1_ps(xd[1][b]), _mm_set1_ps(xd[0][b]));
        }
        acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw, dx)));
    }
    float y[Q_TILE_PAIRS];
    _mm256_storeu_ps(y, acc);
#pragma GCC unroll 2
    for (int k = 0; k < T; k++)
#pragma GCC unroll 8
        for (int r = 0; r < R && r < S; r++)
            a->Y[(t + k) * a->n_out + o + r] = y[(k * S + r) & (Q_TILE_PAIRS - 1)];
}

/* Prompts: tokens in chunks whose converted activations stay in L2 (kern_tok_chunk); per chunk
 * every row tile of [r0, r1) runs all the chunk's token pairs, its weights in L1. (Until the
 * fourteenth session the pairs were the outer loop, so each pair read the thread's rows again
 * from L3: Q8_0 bench_matmul -M -n 64, 2 threads, 19.2-19.6 -> 20.3-21.2 tok/s.) */
TGT INLINE void q_rows(const kern_mm_args *a, int64_t r0, int64_t r1, int is_q4)
{
    const int64_t tc = kern_tok_chunk(a->xc_row_bytes, 2);
    for (int64_t t0 = 0; t0 < a->n_tok; t0 += tc) {
        const int64_t t1 = t0 + tc < a->n_tok ? t0 + tc : a->n_tok;
        const int64_t t = t0 + (t1 - t0) / 2 * 2; /* the pairs end here */
        for (int64_t o = r0; o < r1; o += 4) {
            const int R = r1 - o < 4 ? (int)(r1 - o) : 4;
            for (int64_t u = t0; u < t; u += 2)
                q_tile(a, o, R, u, 2, is_q4, NULL);
        }
        if (t < t1) { /* one token (decode): 8-row tiles, the next one prefetched */
            int64_t o = r0;
            for (; o + 8 <= r1; o += 8) {
                const uint8_t *pf =
                    o + 16 <= r1 ? a->W + (size_t)(o + 8) * a->w_row_bytes : NULL;
                q_tile(a, o, 8, t, 1, is_q4, pf);
            }
            if (o < r1) q_tile(a, o, (int)(r1 - o), t, 1, is_q4, NULL);
        }
    }
}

/* ---- Q4_0 in the repacked X16 layout (kernels.h: KERN_LAYOUT_Q4_0_X16) ------------------
 * A 64-byte chunk of a block holds 4 nibble bytes of each of 16 rows; its 32-byte halves are
 * rows 0-7 and 8-15, row r in dword lane r. Per chunk and half the low nibbles (elements
 * 4k..4k+3) and the high nibbles (16+4k..) go into vpmaddubsw with the 4 activation bytes
 * broadcast; the block's 8 results per lane are summed in 16 bits (32 products of at most
 * 15 x 128: |sum| <= 30720), one vpmaddwd gives the 8 rows' exact block sums (plus ncorr for the
 * -8 offset), and rows need no lane reduction. Then the scalar expression per row, as above.
 * Decode streams the copy linearly, prefetched X16_PF bytes ahead. */
#define X16_PF 4096

/* Rows o + 8 h for h in [h0, h0 + H), tokens t..t+T-1 (H * T <= 4), of the group at g. */
TGT INLINE void x16_tile(const kern_mm_args *a, const uint8_t *g, int64_t o, int h0, int H,
                         int64_t t, int T, int pf)
{
    const int64_t nb = a->n_in / KERN_QK;
    const __m256i m4 = _mm256_set1_epi8(0x0f), ones16 = _mm256_set1_epi16(1);
    const int8_t *xq[4];
    const float *xd[4];
    const int32_t *nc[4];
    __m256 acc[4];
#pragma GCC unroll 4
    for (int k = 0; k < T; k++) {
        const uint8_t *xrow = a->Xc + (size_t)(t + k) * a->xc_row_bytes;
        xq[k] = (const int8_t *)xrow;
        xd[k] = kern_xq_d(xrow, a->n_in);
        nc[k] = kern_xq_ncorr(xrow, a->n_in);
    }
#pragma GCC unroll 4
    for (int i = 0; i < H * T; i++)
        acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *pair = g + (size_t)(b / 2) * KERN_X16_PAIR_BYTES;
        const uint8_t *nib = pair + (size_t)(b % 2) * KERN_X16_NIB_BYTES;
        const uint8_t *sc = pair + KERN_X16_SCALE_OFF + (size_t)(b % 2) * 32;
        if (pf && b % 2 == 0) {
#pragma GCC unroll 9
            for (int l = 0; l < KERN_X16_PAIR_BYTES / 64; l++)
                _mm_prefetch((const char *)(pair + X16_PF + 64 * l), _MM_HINT_T0);
        }
#pragma GCC unroll 2
        for (int h = 0; h < H; h++) {
            __m256i lo[4], hi[4];
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) {
                const uint8_t *p = nib + 64 * c + 32 * (h0 + h);
                const __m256i v = _mm256_loadu_si256((const __m256i *)(const void *)p);
                lo[c] = _mm256_and_si256(v, m4);
                hi[c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            }
            const uint8_t *ps = sc + 16 * (h0 + h);
            const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)ps));
#pragma GCC unroll 4
            for (int k = 0; k < T; k++) {
                const int8_t *xb = xq[k] + b * KERN_QK;
                __m256i s = _mm256_setzero_si256();
#pragma GCC unroll 4
                for (int c = 0; c < 4; c++) {
                    int32_t xl, xh;
                    memcpy(&xl, xb + 4 * c, 4);
                    memcpy(&xh, xb + 16 + 4 * c, 4);
                    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(lo[c], _mm256_set1_epi32(xl)));
                    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(hi[c], _mm256_set1_epi32(xh)));
                }
                const __m256i is =
                    _mm256_add_epi32(_mm256_madd_epi16(s, ones16), _mm256_set1_epi32(nc[k][b]));
                acc[h * T + k] = _mm256_add_ps(
                    acc[h * T + k], _mm256_mul_ps(_mm256_cvtepi32_ps(is),
                                                  _mm256_mul_ps(dw, _mm256_set1_ps(xd[k][b]))));
            }
        }
    }
#pragma GCC unroll 2
    for (int h = 0; h < H; h++)
#pragma GCC unroll 4
        for (int k = 0; k < T; k++)
            _mm256_storeu_ps(a->Y + (t + k) * a->n_out + o + 8 * (h0 + h), acc[h * T + k]);
}

/* Whole groups of [r0, r1) from the repacked copy (r0 a multiple of 16); returns the first row
 * left to the file layout. Per chunk of tokens every group runs all of them (its 16 rows in L1):
 * 4 tokens per half, the rest with both halves. The first pass over a group (the chunk's first 4
 * tokens, or a lone token) streams it from memory and prefetches ahead; the passes after read it
 * from cache. (The 4-token pass did not prefetch until the fourteenth session: Q4_0 bench_matmul
 * -M -n 4, 2 threads, 28.6-31.5 -> 37.8-39.5 tok/s median; 2-token passes instead of 4 were
 * slower, 31.6-34.5.) */
TGT INLINE int64_t x16_rows(const kern_mm_args *a, int64_t r0, int64_t r1)
{
    const size_t gb = kern_repack_group_bytes(KERN_LAYOUT_Q4_0_X16, a->n_in);
    const int64_t end = a->n_out - a->n_out % KERN_X16_ROWS;
    const int64_t tc = kern_tok_chunk(a->xc_row_bytes, 4);
    int64_t o = r0;
    for (int64_t t0 = 0; t0 < a->n_tok; t0 += tc) {
        const int64_t t1 = t0 + tc < a->n_tok ? t0 + tc : a->n_tok;
        for (o = r0; o + KERN_X16_ROWS <= r1 && o + KERN_X16_ROWS <= end; o += KERN_X16_ROWS) {
            const uint8_t *g = a->R + (size_t)(o / KERN_X16_ROWS) * gb;
            int64_t t = t0;
            for (; t + 4 <= t1; t += 4) {
                x16_tile(a, g, o, 0, 1, t, 4, t == t0);
                x16_tile(a, g, o, 1, 1, t, 4, 0);
            }
            if (t + 2 <= t1) {
                x16_tile(a, g, o, 0, 2, t, 2, 0);
                t += 2;
            }
            if (t < t1) x16_tile(a, g, o, 0, 2, t, 1, a->n_tok == 1);
        }
    }
    return o;
}

TGT static void mm_q4_0_avx2(const kern_mm_args *a, int64_t r0, int64_t r1, void *work)
{
    if (a->R && r0 % KERN_X16_ROWS == 0) r0 = x16_rows(a, r0, r1);
    if (r0 < r1) q_rows(a, r0, r1, 1);
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

/* Rows outside, tokens inside, no token chunks: F16/F32 activation rows are 4 bytes per input, a
 * chunk in L2 would hold only 4-16 tokens and the weights would be re-read per chunk (measured
 * slower on the AVX2-only EPYC, bench_matmul -t f16 -n 128). */
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
        k.layout = KERN_LAYOUT_Q4_0_X16;
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
