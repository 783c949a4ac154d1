/* matmul_avx512.c - AVX-512 row kernels for kern_matmul (x86-64 only; compiled with target
 * attributes so the build needs no -march flag; used only when cpu_features.c finds the CPU
 * support). Integer kernels need VNNI, VBMI and GFNI, the BF16 kernel AVX512_BF16; without them
 * the lookup returns no kernel and matmul.c falls back to the AVX2 kernels.
 *
 * Q8_0/Q4_0, fewer than 4 tokens (decode, memory-bound): eight weight rows at a time, two blocks
 * per 512-bit step; the weight bytes are the unsigned operand of vpdpbusd (Q4_0 nibbles as
 * 0..15, Q8_0 as w ^ 0x80 = w + 128) and the activation row's ncorr (-8 or -128 times the block
 * sum) seeds the integer sum, so each block's sum is ggml's exact integer dot product. The
 * 8 rows x 2 blocks sums are reduced together into one vector, which is converted, scaled by
 * d_w * d_x and accumulated in float once for all 8 rows (the per-block scaling was ~45% of
 * the time when done per row). Q4_0 takes four blocks per step instead (q4_rows8x4_step: the
 * nibbles of 4 blocks in one vector, one 128-bit lane per block), which halves the reduction
 * per block and needs fewer unpack ops: 25 -> 36 GB/s single-thread from cache.
 * Q4_0 with a load-time repacked copy (KERN_LAYOUT_Q4_0_X16, kern_mm_args.R; the CPU backend
 * makes it once per model): 16 rows in the dword lanes of aligned 64-byte loads, no lane
 * reduction, one linear stream per thread; decode 1-3 tokens and the prompt tiles read it (the
 * tiles without the per-call repack), the file's bytes only for rows past the last whole group.
 * From cache ~71 GB/s single-thread vs ~31 for the file layout; a whole TinyLlama step of
 * matmuls 1.4-1.5x (bench_matmul -M). Same integer sums, same float chains: same bits.
 * Q8_0/Q4_0, 4 or more tokens (prompt, compute-bound): 16 rows are repacked per call into a
 * per-thread buffer with row r in 32-bit lane r (4 bytes of the block per lane per vector; a
 * 16x8 dword transpose by vpermt2d), so that one vpdpbusd with a broadcast of 4 activation bytes
 * advances 16 rows of one token; a register tile of 16 rows x 8 tokens reuses each repacked
 * vector 8 times.
 * F32/F16/BF16: register tiles of 4 rows x 6 tokens, f32 accumulation (BF16 by vdpbf16ps, as
 * ggml does on such CPUs; it flushes bf16 subnormals to zero, which the scalar code does not).
 * F32/F16/BF16 with 3 or more tokens are cache-blocked: rows in blocks of 64 (their weights
 * stay in L2), inputs in slices of 1024 (BF16: 2048; a 6-token slice of activations, 24 KB,
 * stays in L1 while the block's 4-row groups stream past it), the tile's accumulators spilled to the per-thread
 * scratch between slices and the 24 sums reduced 16 at a time at the end (reduce16). Every
 * lane still sums its products in input order and every sum is reduced with the pairing of
 * hsum16, so a row has the same bits as on the one-token (decode) path:
 * F16 2048x2048 x 512 tokens went from ~112 to ~160-180 GFLOP/s per thread (peak ~214), BF16
 * 1.2-1.45x. */
#include <math.h>
#include <string.h>

#include "core/fp16.h"
#include "cpu/kern_impl.h"
#include "cpu/tile_avx512.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define TGT_F __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define TGT_I                                                                                      \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,gfni,avx2,"    \
                          "fma,f16c")))
#define TGT_BF                                                                                     \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline))

/* ---- activation converter (bit-identical to kern_cvt_q8_for_*_scalar) ------------------- */

TGT_F static void cvt_q8_avx512(const float *x, void *dst, int64_t n, int32_t corr_mul)
{
    uint8_t *qs = dst;
    float *dv = (float *)(void *)(qs + n);
    int32_t *ncorr = (int32_t *)(void *)(qs + n + n / 8);
    const __m512 sign = _mm512_set1_ps(-0.0f);
    for (int64_t b = 0; b < n / KERN_QK; b++, x += KERN_QK) {
        __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
        __m512 a = _mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_andnot_ps(sign, v1));
        float amax = _mm512_reduce_max_ps(a);
        float d = amax / 127.0f;
        float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        __m512 m = _mm512_set1_ps(id);
        /* cvtps rounds to nearest even under the default MXCSR, like nearbyintf */
        __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, m));
        __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, m));
        _mm_storeu_si128((__m128i *)(void *)(qs + b * KERN_QK), _mm512_cvtepi32_epi8(i0));
        _mm_storeu_si128((__m128i *)(void *)(qs + b * KERN_QK + 16), _mm512_cvtepi32_epi8(i1));
        int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
        dv[b] = _cvtsh_ss(_cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        ncorr[b] = -corr_mul * sum;
    }
}

static void cvt_q8_for_q4_0_avx512(const float *x, void *dst, int64_t n)
{
    cvt_q8_avx512(x, dst, n, 8);
}

static void cvt_q8_for_q8_0_avx512(const float *x, void *dst, int64_t n)
{
    cvt_q8_avx512(x, dst, n, 128);
}

TGT_F static void cvt_f16_avx512(const float *x, void *dst, int64_t n)
{
    float *y = dst;
    for (int64_t i = 0; i < n; i += 16) {
        __m256i h =
            _mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm512_storeu_ps(y + i, _mm512_cvtph_ps(h));
    }
}

TGT_BF static void cvt_bf16_avx512(const float *x, void *dst, int64_t n)
{
    uint8_t *y = dst;
    for (int64_t i = 0; i < n; i += 32) {
        /* cvtne2ps2bf16 rounds to nearest even and quiets NaNs like forge_f32_to_bf16, but
         * flushes subnormal inputs to zero (as ggml's AVX512_BF16 path does) */
        __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
        _mm512_storeu_si512((void *)(y + 2 * i), (__m512i)h);
    }
}

/* ---- Q8_0 / Q4_0: one token ------------------------------------------------------------ */

/* Constants of the two-block step, built once per call. */
typedef struct q_consts {
    __m512i nib_idx; /* Q4_0: bytes 2..17 twice, then 20..35 twice */
    __m512i nib_gf;  /* Q4_0: GF(2) bit matrices taking the low nibble (qwords 0, 1, 4, 5) or
                      * the high nibble (qwords 2, 3, 6, 7) of each byte */
    __m512i q8_idx;  /* Q8_0: bytes 2..33 of the first load, 32..63 of the second */
    __m512i d4_idx;  /* words 0 and 9 (Q4_0 block scales), 8 times each */
    __m512i d8_idx;  /* words 0 and 17 (Q8_0 block scales), 8 times each */
    __m512i x80;
} q_consts;

TGT_I static q_consts make_q_consts(void)
{
    q_consts c;
    uint8_t nib[64], q8[64];
    uint16_t d4[32], d8[32];
    /* gf2p8affineqb: result bit i of a byte = parity(matrix byte 7-i AND source byte) */
    const long long lo_nib = 0x0102040800000000LL, hi_nib = 0x1020408000000000LL;
    for (int i = 0; i < 64; i++) {
        nib[i] = (uint8_t)(i < 32 ? 2 + (i & 15) : 20 + (i & 15));
        q8[i] = (uint8_t)(i < 32 ? 2 + i : 64 + i); /* second source: index 64 + byte */
    }
    for (int i = 0; i < 32; i++) {
        d4[i] = (uint16_t)(i < 8 ? 0 : i < 16 ? 9 : 0);
        d8[i] = (uint16_t)(i < 8 ? 0 : i < 16 ? 17 : 0);
    }
    c.nib_idx = _mm512_loadu_si512(nib);
    c.q8_idx = _mm512_loadu_si512(q8);
    c.nib_gf = _mm512_set_epi64(hi_nib, hi_nib, lo_nib, lo_nib, hi_nib, hi_nib, lo_nib, lo_nib);
    c.d4_idx = _mm512_loadu_si512(d4);
    c.d8_idx = _mm512_loadu_si512(d8);
    c.x80 = _mm512_set1_epi8((char)0x80);
    return c;
}

/* Activation side of two blocks (or one, nblk == 1): values, scales, integer correction. */
typedef struct q_xstep {
    __m512i xv;
    __m512 xs;
    __m512i nc;
} q_xstep;

TGT_I INLINE q_xstep load_xstep(const int8_t *xq, const float *xd, const int32_t *nc, int64_t b,
                                int nblk)
{
    q_xstep s;
    const __m512i lane_blk = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    if (nblk == 2) {
        s.xv = _mm512_loadu_si512((const void *)(xq + b * KERN_QK));
        s.xs = _mm512_permutexvar_ps(lane_blk, _mm512_maskz_loadu_ps(3, xd + b));
        s.nc =
            _mm512_maskz_permutexvar_epi32(0x0101, lane_blk, _mm512_maskz_loadu_epi32(3, nc + b));
    } else {
        s.xv = _mm512_maskz_loadu_epi8(0xffffffffULL, xq + b * KERN_QK);
        s.xs = _mm512_permutexvar_ps(lane_blk, _mm512_maskz_loadu_ps(1, xd + b));
        s.nc =
            _mm512_maskz_permutexvar_epi32(0x0001, lane_blk, _mm512_maskz_loadu_epi32(1, nc + b));
    }
    return s;
}

/* One row, blocks b and b+1 (nblk 2) or b alone (nblk 1), Q4_0. */
TGT_I INLINE __m512 q4_0_step(const q_consts *c, const uint8_t *w, int nblk, const q_xstep *x,
                              __m512 acc)
{
    __m512i raw = nblk == 2 ? _mm512_maskz_loadu_epi8((1ULL << 36) - 1, w)
                            : _mm512_maskz_loadu_epi8((1ULL << 18) - 1, w);
    __m512i nib = _mm512_permutexvar_epi8(c->nib_idx, raw);
    nib = _mm512_gf2p8affine_epi64_epi8(nib, c->nib_gf, 0);
    __m512i isum = _mm512_dpbusd_epi32(x->nc, nib, x->xv);
    __m512 dw = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi16(c->d4_idx, raw)));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw, x->xs), acc);
}

/* One row, Q8_0: two overlapping loads cover the 68 bytes of two blocks without reading past
 * them. */
TGT_I INLINE __m512 q8_0_step(const q_consts *c, const uint8_t *w, int nblk, const q_xstep *x,
                              __m512 acc)
{
    __m512i a, b;
    if (nblk == 2) {
        a = _mm512_loadu_si512((const void *)w);
        b = _mm512_loadu_si512((const void *)(w + 4));
    } else {
        a = _mm512_maskz_loadu_epi8((1ULL << 34) - 1, w);
        b = _mm512_setzero_si512();
    }
    __m512i q = _mm512_xor_si512(_mm512_permutex2var_epi8(a, c->q8_idx, b), c->x80);
    __m512i isum = _mm512_dpbusd_epi32(x->nc, q, x->xv);
    __m512 dw = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi16(c->d8_idx, a)));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw, x->xs), acc);
}

/* Decode streams weights from memory. A tile of rows is one contiguous region, so while a tile
 * is computed the next one is prefetched as a single linear stream: on the 2-core EPYC this
 * doubled single-thread streaming (Q4_0 7.5 -> 12.8 GB/s) where prefetching along each row, at
 * any distance, did not help. Q4_0 prefetches into L1 (prefetcht0), Q8_0 into L2 (prefetcht1):
 * on the Zen 5 EPYC, Q4_0 streamed ~16 GB/s single-thread with prefetcht1 whatever the distance
 * and ~21-23 GB/s with prefetcht0 or prefetchnta (likely because its two overlapping 64-byte
 * loads per row and step cross cache lines, each an L1 miss when the line waits in L2), while
 * Q8_0 (32-byte loads) streams ~28 GB/s with either (bench_matmul -t q4_0,q8_0 -n 1 -j 1,
 * medians of interleaved runs). */
#define Q_PREFETCH(p, is_q4)                                                                       \
    ((is_q4) ? _mm_prefetch((const char *)(p), _MM_HINT_T0)                                        \
             : _mm_prefetch((const char *)(p), _MM_HINT_T1))

/* Integer sums of one row for blocks b, b+1 (lanes 0-7 and 8-15, seeded with ncorr); *raw
 * receives the loaded bytes the block scales are taken from. */
TGT_I INLINE __m512i q_isum(const q_consts *c, const uint8_t *w, int nblk, const q_xstep *x,
                            __m512i *raw, int is_q4)
{
    if (is_q4) {
        __m512i r = nblk == 2 ? _mm512_maskz_loadu_epi8((1ULL << 36) - 1, w)
                              : _mm512_maskz_loadu_epi8((1ULL << 18) - 1, w);
        __m512i nib =
            _mm512_gf2p8affine_epi64_epi8(_mm512_permutexvar_epi8(c->nib_idx, r), c->nib_gf, 0);
        *raw = r;
        return _mm512_dpbusd_epi32(x->nc, nib, x->xv);
    }
    __m512i q;
    if (nblk == 2) {
        __m256i q0 = _mm256_loadu_si256((const __m256i *)(const void *)(w + 2));
        __m256i q1 = _mm256_loadu_si256((const __m256i *)(const void *)(w + 2 + KERN_Q8_0_BYTES));
        q = _mm512_inserti64x4(_mm512_castsi256_si512(q0), q1, 1);
        /* the two scales: words 0 and 17 of the 36 bytes from w */
        *raw = _mm512_maskz_loadu_epi16(1u | (1u << 17), w);
    } else {
        q = _mm512_maskz_loadu_epi8(0xffffffffULL, w + 2);
        *raw = _mm512_maskz_loadu_epi16(1u, w);
    }
    return _mm512_dpbusd_epi32(x->nc, _mm512_xor_si512(q, c->x80), x->xv);
}

/* Sum of the 8 lanes of each block of each of 8 rows: returns lanes [rows 0-3 block b,
 * rows 0-3 block b+1, rows 4-7 block b, rows 4-7 block b+1]. */
TGT_I INLINE __m512i reduce8x2(const __m512i s[8])
{
    __m512i p[4], q[2];
#pragma GCC unroll 4
    for (int k = 0; k < 4; k++)
        p[k] = _mm512_add_epi32(_mm512_unpacklo_epi32(s[2 * k], s[2 * k + 1]),
                                _mm512_unpackhi_epi32(s[2 * k], s[2 * k + 1]));
#pragma GCC unroll 2
    for (int k = 0; k < 2; k++)
        q[k] = _mm512_add_epi32(_mm512_unpacklo_epi64(p[2 * k], p[2 * k + 1]),
                                _mm512_unpackhi_epi64(p[2 * k], p[2 * k + 1]));
    return _mm512_add_epi32(_mm512_shuffle_i64x2(q[0], q[1], _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i64x2(q[0], q[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* The fp16 block scales of 8 rows in the lane order of reduce8x2, as floats. */
TGT_I INLINE __m512 scales8x2(const __m512i raw[8], int is_q4)
{
    /* word positions of the two block scales in the loaded bytes */
    const int p1 = is_q4 ? 9 : 17;
    const __m512i i1 = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                        0, 0, 0, 0, 0, 0, 0, 0, (short)(32 + p1), (short)p1, 32, 0);
    const __m512i i2 = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                        0, 0, 0, 0, 35, 34, 3, 2, 33, 32, 1, 0);
    __m512i v[4], u[2];
#pragma GCC unroll 4
    for (int k = 0; k < 4; k++)
        v[k] = _mm512_permutex2var_epi16(raw[2 * k], i1, raw[2 * k + 1]);
#pragma GCC unroll 2
    for (int k = 0; k < 2; k++)
        u[k] = _mm512_permutex2var_epi16(v[2 * k], i2, v[2 * k + 1]);
    __m256i h =
        _mm256_inserti128_si256(_mm512_castsi512_si256(u[0]), _mm512_castsi512_si128(u[1]), 1);
    return _mm512_cvtph_ps(h);
}

/* One step (blocks b, b+1, or b alone when nblk == 1) of 8 rows. */
TGT_I INLINE __m512 q_rows8_step(const q_consts *c, const uint8_t *const w[8], const int8_t *xq,
                                 const float *xd, const int32_t *nc, int64_t b, int nblk, size_t bb,
                                 const uint8_t *pf, __m512 acc, int is_q4)
{
    /* the next tile's bytes, as one linear stream: 16 blocks' worth per step */
#pragma GCC unroll 9
    for (size_t l = 0; l < (16 * bb + 63) / 64; l++)
        Q_PREFETCH(pf + (size_t)b * 8 * bb + 64 * l, is_q4);
    const __m512i dx_idx = _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
    q_xstep xs = load_xstep(xq, xd, nc, b, nblk);
    __m512 dx = _mm512_permutexvar_ps(dx_idx, _mm512_maskz_loadu_ps(nblk == 2 ? 3 : 1, xd + b));
    size_t off = (size_t)b * bb;
    __m512i isum[8], raw[8];
#pragma GCC unroll 8
    for (int r = 0; r < 8; r++) {
        isum[r] = q_isum(c, w[r] + off, nblk, &xs, &raw[r], is_q4);
    }
    __m512 scale = _mm512_mul_ps(scales8x2(raw, is_q4), dx);
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(reduce8x2(isum)), scale, acc);
}

/* 8 rows starting at o, one token: the integer sums of 8 rows are reduced together, so the
 * conversion and scaling of block sums is shared by 8 rows. */
TGT_I INLINE void q_rows8_1tok(const kern_mm_args *a, const q_consts *c, int64_t o, int64_t t,
                               int is_q4)
{
    const uint8_t *xrow = a->Xc + (size_t)t * a->xc_row_bytes;
    const int8_t *xq = (const int8_t *)xrow;
    const float *xd = kern_xq_d(xrow, a->n_in);
    const int32_t *nc = kern_xq_ncorr(xrow, a->n_in);
    const int64_t nb = a->n_in / KERN_QK;
    const size_t bb = is_q4 ? KERN_Q4_0_BYTES : KERN_Q8_0_BYTES;
    const uint8_t *w[8];
    __m512 acc = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int r = 0; r < 8; r++)
        w[r] = a->W + (size_t)(o + r) * a->w_row_bytes;
    int64_t b = 0;
    /* prefetch about 16 KB or more ahead: the next tile, or the one after a small tile */
    const size_t tile_bytes = 8 * a->w_row_bytes;
    const uint8_t *pf = w[0] + (tile_bytes < 12288 ? 2 : 1) * tile_bytes;
    for (; b + 2 <= nb; b += 2)
        acc = q_rows8_step(c, w, xq, xd, nc, b, 2, bb, pf, acc, is_q4);
    if (b < nb) acc = q_rows8_step(c, w, xq, xd, nc, b, 1, bb, pf, acc, is_q4);
    __m256 lo = _mm512_castps512_ps256(acc), hi = _mm512_extractf32x8_ps(acc, 1);
    float *y = a->Y + t * a->n_out + o;
    _mm_storeu_ps(y, _mm_add_ps(_mm256_castps256_ps128(lo), _mm256_extractf128_ps(lo, 1)));
    _mm_storeu_ps(y + 4, _mm_add_ps(_mm256_castps256_ps128(hi), _mm256_extractf128_ps(hi, 1)));
}

/* The exact integer sum of one block: weights (Q4_0 nibbles - 8, or Q8_0 int8) times the
 * token's Q8 activations; what the dpbusd paths compute with their correction seeds. Not
 * auto-vectorized: GCC 12 turns the signed int8 x int8 loop, inlined into a function compiled
 * for AVX-512 VNNI, into wrong code (tests/test_batch_invariance.c caught it). */
#if defined(__GNUC__) && !defined(__clang__)
#define Q_NO_VECTORIZE __attribute__((noinline, optimize("no-tree-vectorize")))
#else
#define Q_NO_VECTORIZE __attribute__((noinline))
#endif
Q_NO_VECTORIZE static int32_t q_block_isum(const uint8_t *wb, const int8_t *xb, int is_q4)
{
    int32_t s = 0;
    if (is_q4) {
        for (int j = 0; j < KERN_QK / 2; j++)
            s += ((wb[2 + j] & 0x0f) - 8) * xb[j] + ((wb[2 + j] >> 4) - 8) * xb[j + KERN_QK / 2];
    } else {
        for (int j = 0; j < KERN_QK; j++)
            s += (int8_t)wb[2 + j] * xb[j];
    }
    return s;
}

/* One row (the remainder of a tile), one token, with the reduction order of the 8-row paths
 * (batch invariance: a row's result must not depend on where it falls in a tile, nor on how
 * many tokens the call has): per block the exact integer sum times (weight scale * activation
 * scale), accumulated with one fma per block into chains by block index (Q8_0: even/odd,
 * summed at the end; Q4_0: the blocks of whole 4-block groups by index mod 4, summed as
 * (c0 + c2) + (c1 + c3), then the other blocks in even/odd chains added last). Scalar: only rows
 * past the last multiple of 8 of a thread's range get here. */
TGT_I INLINE void q_row_1tok(const kern_mm_args *a, const q_consts *c, int64_t o, int64_t t,
                             int is_q4)
{
    (void)c;
    const uint8_t *xrow = a->Xc + (size_t)t * a->xc_row_bytes;
    const int8_t *xq = (const int8_t *)xrow;
    const float *xd = kern_xq_d(xrow, a->n_in);
    const int64_t nb = a->n_in / KERN_QK;
    const size_t bb = is_q4 ? KERN_Q4_0_BYTES : KERN_Q8_0_BYTES;
    const uint8_t *w = a->W + (size_t)o * a->w_row_bytes;
    const int64_t nb_main = is_q4 ? nb - nb % 4 : nb, nch = is_q4 ? 4 : 2;
    float ch[4] = {0.0f, 0.0f, 0.0f, 0.0f}, tail[2] = {0.0f, 0.0f}, y;
    int64_t b = 0;
    for (; b < nb_main; b++) {
        const uint8_t *wb = w + (size_t)b * bb;
        float scale = forge_fp16_to_f32(kern_load_u16(wb)) * xd[b];
        ch[b % nch] = fmaf((float)q_block_isum(wb, xq + b * KERN_QK, is_q4), scale, ch[b % nch]);
    }
    y = is_q4 ? (ch[0] + ch[2]) + (ch[1] + ch[3]) : ch[0] + ch[1];
    if (b < nb) {
        for (int k = 0; b < nb; b++, k ^= 1) {
            const uint8_t *wb = w + (size_t)b * bb;
            float scale = forge_fp16_to_f32(kern_load_u16(wb)) * xd[b];
            tail[k] = fmaf((float)q_block_isum(wb, xq + b * KERN_QK, is_q4), scale, tail[k]);
        }
        y = y + (tail[0] + tail[1]);
    }
    a->Y[t * a->n_out + o] = y;
}

/* Q4_0, one token, four blocks per step: 8 rows x 4 blocks. Each row's 72 bytes are two
 * overlapping 64-byte loads; one vpermt2b gathers the 64 nibble bytes of the 4 blocks (16 per
 * 128-bit lane, no duplication), the low nibbles (elements 0-15 of each block) are taken by an
 * AND and the high ones (elements 16-31) by a GF(2) affine op. The activation bytes are put in
 * the same order once per step for all 8 rows. Each block's sum then sits in 4 dword lanes
 * (one 128-bit lane per block), which halves the lane reduction per block compared with two
 * blocks per 512-bit step; the integer block sums and their scaling are as before. */
typedef struct q4x4_consts {
    __m512i nib_idx; /* bytes 2..17, 20..35, 38..53 of the first load, 48..63 of the second */
    __m512i xlo_idx; /* activation bytes 0-15 of each of 4 blocks */
    __m512i xhi_idx; /* activation bytes 16-31 of each of 4 blocks */
    __m512i hi_gf;   /* GF(2) bit matrix taking the high nibble of each byte */
    __m512i lo4;
    __m512i d_i1, d_i2; /* block scale gather, see scales8x4 */
} q4x4_consts;

TGT_I static q4x4_consts make_q4x4_consts(void)
{
    q4x4_consts c;
    uint8_t nib[64], xlo[64], xhi[64];
    uint16_t i1[32], i2[32];
    for (int i = 0; i < 64; i++) {
        int k = i / 16, j = i % 16;
        nib[i] = (uint8_t)(k < 3 ? 18 * k + 2 + j : 64 + 48 + j);
        xlo[i] = (uint8_t)(k < 2 ? 32 * k + j : 64 + 32 * (k - 2) + j);
        xhi[i] = (uint8_t)(xlo[i] + 16);
    }
    /* level 1: rows r (first source) and r+1 (second source): word 2k + s = block k's scale
     * (word 9k of the load) of row r + s */
    for (int i = 0; i < 32; i++)
        i1[i] = (uint16_t)(i < 8 ? 9 * (i / 2) + 32 * (i % 2) : 0);
    /* level 2: pairs (r, r+1) and (r+2, r+3): word 4k + q = block k of row r + q */
    for (int i = 0; i < 32; i++) {
        int k = (i / 4) % 4, q = i % 4;
        i2[i] = (uint16_t)(i < 16 ? (q < 2 ? 2 * k + q : 32 + 2 * k + q - 2) : 0);
    }
    c.nib_idx = _mm512_loadu_si512(nib);
    c.xlo_idx = _mm512_loadu_si512(xlo);
    c.xhi_idx = _mm512_loadu_si512(xhi);
    c.hi_gf = _mm512_set1_epi64(0x1020408000000000LL);
    c.lo4 = _mm512_set1_epi8(0x0f);
    c.d_i1 = _mm512_loadu_si512(i1);
    c.d_i2 = _mm512_loadu_si512(i2);
    return c;
}

/* Sum of the 4 lanes of each block of 8 rows: out[0] lane 4k + r = row r, block k; out[1]
 * the same for rows 4-7. */
TGT_I INLINE void reduce8x4(const __m512i s[8], __m512i out[2])
{
    __m512i p[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; k++)
        p[k] = _mm512_add_epi32(_mm512_unpacklo_epi32(s[2 * k], s[2 * k + 1]),
                                _mm512_unpackhi_epi32(s[2 * k], s[2 * k + 1]));
#pragma GCC unroll 2
    for (int k = 0; k < 2; k++)
        out[k] = _mm512_add_epi32(_mm512_unpacklo_epi64(p[2 * k], p[2 * k + 1]),
                                  _mm512_unpackhi_epi64(p[2 * k], p[2 * k + 1]));
}

/* The fp16 block scales of 8 rows x 4 blocks in the lane order of reduce8x4, as floats. */
TGT_I INLINE void scales8x4(const q4x4_consts *c, const __m512i raw[8], __m512 out[2])
{
    __m512i v[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; k++)
        v[k] = _mm512_permutex2var_epi16(raw[2 * k], c->d_i1, raw[2 * k + 1]);
#pragma GCC unroll 2
    for (int k = 0; k < 2; k++)
        out[k] = _mm512_cvtph_ps(
            _mm512_castsi512_si256(_mm512_permutex2var_epi16(v[2 * k], c->d_i2, v[2 * k + 1])));
}

/* Blocks b..b+3 of 8 rows; acc[0] lane 4k + r: row r, acc[1]: row 4 + r. */
TGT_I INLINE void q4_rows8x4_step(const q4x4_consts *c, const uint8_t *const w[8], const int8_t *xq,
                                  const float *xd, const int32_t *nc, int64_t b, const uint8_t *pf,
                                  __m512 acc[2])
{
    const size_t bb = KERN_Q4_0_BYTES;
    /* the next tile's bytes, as one linear stream: 32 blocks' worth per step */
#pragma GCC unroll 9
    for (size_t l = 0; l < 32 * bb / 64; l++)
        Q_PREFETCH(pf + (size_t)b * 8 * bb + 64 * l, 1);
    const __m512i x0 = _mm512_loadu_si512((const void *)(xq + b * KERN_QK));
    const __m512i x1 = _mm512_loadu_si512((const void *)(xq + b * KERN_QK + 64));
    const __m512i xlo = _mm512_permutex2var_epi8(x0, c->xlo_idx, x1);
    const __m512i xhi = _mm512_permutex2var_epi8(x0, c->xhi_idx, x1);
    const __m512i blk4 = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    /* ncorr seeds one lane of each block */
    const __m512i seed =
        _mm512_maskz_permutexvar_epi32(0x1111, blk4, _mm512_maskz_loadu_epi32(15, nc + b));
    const __m512 dx = _mm512_permutexvar_ps(blk4, _mm512_maskz_loadu_ps(15, xd + b));
    const size_t off = (size_t)b * bb;
    __m512i isum[8], raw[8];
#pragma GCC unroll 8
    for (int r = 0; r < 8; r++) {
        __m512i lo = _mm512_loadu_si512((const void *)(w[r] + off));
        __m512i hi = _mm512_loadu_si512((const void *)(w[r] + off + 8));
        __m512i q = _mm512_permutex2var_epi8(lo, c->nib_idx, hi);
        __m512i s = _mm512_dpbusd_epi32(seed, _mm512_and_si512(q, c->lo4), xlo);
        isum[r] = _mm512_dpbusd_epi32(s, _mm512_gf2p8affine_epi64_epi8(q, c->hi_gf, 0), xhi);
        raw[r] = lo;
    }
    __m512i red[2];
    __m512 dw[2];
    reduce8x4(isum, red);
    scales8x4(c, raw, dw);
#pragma GCC unroll 2
    for (int k = 0; k < 2; k++)
        acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(red[k]), _mm512_mul_ps(dw[k], dx), acc[k]);
}

/* 8 Q4_0 rows starting at o, one token: four-block steps, then the two- and one-block steps of
 * q_rows8_1tok for the rest. */
TGT_I INLINE void q4_rows8_1tok(const kern_mm_args *a, const q_consts *c, const q4x4_consts *c4,
                                int64_t o, int64_t t)
{
    const uint8_t *xrow = a->Xc + (size_t)t * a->xc_row_bytes;
    const int8_t *xq = (const int8_t *)xrow;
    const float *xd = kern_xq_d(xrow, a->n_in);
    const int32_t *nc = kern_xq_ncorr(xrow, a->n_in);
    const int64_t nb = a->n_in / KERN_QK;
    const size_t bb = KERN_Q4_0_BYTES;
    const uint8_t *w[8];
    __m512 acc4[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
#pragma GCC unroll 8
    for (int r = 0; r < 8; r++)
        w[r] = a->W + (size_t)(o + r) * a->w_row_bytes;
    const size_t tile_bytes = 8 * a->w_row_bytes;
    const uint8_t *pf = w[0] + (tile_bytes < 12288 ? 2 : 1) * tile_bytes;
    int64_t b = 0;
    for (; b + 4 <= nb; b += 4)
        q4_rows8x4_step(c4, w, xq, xd, nc, b, pf, acc4);
    /* rows 0-3 and 4-7: the sum of the four 128-bit lanes */
    __m256 s0 = _mm256_add_ps(_mm512_castps512_ps256(acc4[0]), _mm512_extractf32x8_ps(acc4[0], 1));
    __m256 s1 = _mm256_add_ps(_mm512_castps512_ps256(acc4[1]), _mm512_extractf32x8_ps(acc4[1], 1));
    __m128 y0 = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
    __m128 y1 = _mm_add_ps(_mm256_castps256_ps128(s1), _mm256_extractf128_ps(s1, 1));
    if (b < nb) {
        __m512 acc = _mm512_setzero_ps();
        if (b + 2 <= nb) {
            acc = q_rows8_step(c, w, xq, xd, nc, b, 2, bb, pf, acc, 1);
            b += 2;
        }
        if (b < nb) acc = q_rows8_step(c, w, xq, xd, nc, b, 1, bb, pf, acc, 1);
        __m256 lo = _mm512_castps512_ps256(acc), hi = _mm512_extractf32x8_ps(acc, 1);
        y0 = _mm_add_ps(y0, _mm_add_ps(_mm256_castps256_ps128(lo), _mm256_extractf128_ps(lo, 1)));
        y1 = _mm_add_ps(y1, _mm_add_ps(_mm256_castps256_ps128(hi), _mm256_extractf128_ps(hi, 1)));
    }
    float *y = a->Y + t * a->n_out + o;
    _mm_storeu_ps(y, y0);
    _mm_storeu_ps(y + 4, y1);
}

/* ---- Q4_0 in the repacked X16 layout (kernels.h: KERN_LAYOUT_Q4_0_X16) -----------------
 * Row r of a 16-row group sits in dword lane r: one aligned 64-byte load holds 4 nibble bytes of
 * each of the 16 rows, its low nibbles (AND) and high nibbles (GF(2) affine) each go into one
 * vpdpbusd with 4 activation bytes broadcast (elements 4k..4k+3 and 16+4k..16+4k+3), and a
 * block's 16 row sums need no lane reduction. The integer block sums are those of the file's
 * layout (seeded with ncorr); per block one conversion, d_w * d_x and one fma per row, in the
 * chains of q_row_1tok (blocks of whole 4-block groups by index mod 4, (c0 + c2) + (c1 + c3),
 * then the rest even/odd, added last), so every row keeps its bits. The stream is linear: a
 * thread's groups are one region, prefetched X16_PREFETCH bytes ahead (into L1: on the Zen 5
 * EPYC, 2 threads, 8 KB ahead gave ~80 tok/s in bench_matmul -M where 16 KB gave ~75, T1 worse). */
#define X16_PREFETCH 8192

TGT_I INLINE const uint8_t *x16_nib(const uint8_t *g, int64_t b)
{
    return g + (size_t)(b / 2) * KERN_X16_PAIR_BYTES + (size_t)(b % 2) * KERN_X16_NIB_BYTES;
}

TGT_I INLINE const uint8_t *x16_scales(const uint8_t *g, int64_t b)
{
    return g + (size_t)(b / 2) * KERN_X16_PAIR_BYTES + KERN_X16_SCALE_OFF + (size_t)(b % 2) * 32;
}

/* The exact integer sums of block b of 16 rows for one token (xb: its 32 activation bytes). */
TGT_I INLINE __m512i x16_isum(const uint8_t *nib, const int8_t *xb, int32_t ncorr, __m512i lo4,
                              __m512i hi_gf)
{
    __m512i s0 = _mm512_set1_epi32(ncorr), s1 = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int k = 0; k < 4; k++) {
        const __m512i v = _mm512_load_si512((const void *)(nib + 64 * k));
        int32_t xl, xh;
        memcpy(&xl, xb + 4 * k, 4);
        memcpy(&xh, xb + 16 + 4 * k, 4);
        s0 = _mm512_dpbusd_epi32(s0, _mm512_and_si512(v, lo4), _mm512_set1_epi32(xl));
        s1 = _mm512_dpbusd_epi32(s1, _mm512_gf2p8affine_epi64_epi8(v, hi_gf, 0),
                                 _mm512_set1_epi32(xh));
    }
    return _mm512_add_epi32(s0, s1);
}

/* acc += isum * (d_w * d_x) for block b of the group at g, 16 rows, one token. */
TGT_I INLINE __m512 x16_block(const uint8_t *g, int64_t b, const int8_t *xq, const float *xd,
                              const int32_t *nc, __m512i lo4, __m512i hi_gf, __m512 acc)
{
    const __m512i is = x16_isum(x16_nib(g, b), xq + b * KERN_QK, nc[b], lo4, hi_gf);
    const __m512 dw = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(const void *)x16_scales(g, b)));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), _mm512_mul_ps(dw, _mm512_set1_ps(xd[b])), acc);
}

/* The 16 rows of the group at g (rows o..o+15 of the matrix), token t. */
TGT_I INLINE void x16_rows16_1tok(const kern_mm_args *a, const uint8_t *g, int64_t o, int64_t t)
{
    const uint8_t *xrow = a->Xc + (size_t)t * a->xc_row_bytes;
    const int8_t *xq = (const int8_t *)xrow;
    const float *xd = kern_xq_d(xrow, a->n_in);
    const int32_t *nc = kern_xq_ncorr(xrow, a->n_in);
    const int64_t nb = a->n_in / KERN_QK, nb_main = nb - nb % 4;
    const __m512i lo4 = _mm512_set1_epi8(0x0f), hi_gf = _mm512_set1_epi64(0x1020408000000000LL);
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    int64_t b = 0;
    for (; b < nb_main; b += 4) {
        /* the two pairs of this step, X16_PREFETCH ahead in the linear stream */
        const uint8_t *pf = g + (size_t)(b / 2) * KERN_X16_PAIR_BYTES + X16_PREFETCH;
#pragma GCC unroll 18
        for (int l = 0; l < 2 * KERN_X16_PAIR_BYTES / 64; l++)
            _mm_prefetch((const char *)(pf + 64 * l), _MM_HINT_T0);
#pragma GCC unroll 4
        for (int k = 0; k < 4; k++)
            acc[k] = x16_block(g, b + k, xq, xd, nc, lo4, hi_gf, acc[k]);
    }
    __m512 y = _mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[1], acc[3]));
    if (b < nb) {
        __m512 tail[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int k = 0; b < nb; b++, k ^= 1)
            tail[k] = x16_block(g, b, xq, xd, nc, lo4, hi_gf, tail[k]);
        y = _mm512_add_ps(y, _mm512_add_ps(tail[0], tail[1]));
    }
    _mm512_storeu_ps(a->Y + t * a->n_out + o, y);
}

TGT_I INLINE void q_rows_1tok(const kern_mm_args *a, int64_t r0, int64_t r1, int64_t t, int is_q4)
{
    const q_consts c = make_q_consts();
    int64_t o = r0;
    if (is_q4) {
        const q4x4_consts c4 = make_q4x4_consts();
        for (; o + 8 <= r1; o += 8)
            q4_rows8_1tok(a, &c, &c4, o, t);
    }
    for (; o + 8 <= r1; o += 8)
        q_rows8_1tok(a, &c, o, t, is_q4);
    for (; o < r1; o++)
        q_row_1tok(a, &c, o, t, is_q4);
}

/* ---- Q8_0 / Q4_0: several tokens ------------------------------------------------------- */

#define RP_ROWS 16
#define RP_BLOCK_BYTES (8 * 64 + 64) /* 8 vectors of 16 rows x 4 bytes, then 16 float d_w */
#define TOK_TILE 8

/* Repack rows [o, o + rows) (rows <= 16; missing rows are zero) of all blocks into rep: per
 * block, vector g holds in dword lane r the bytes 4g..4g+3 of row r's 32 unsigned values, then
 * 16 float scales. The 16 rows x 8 dwords are transposed by kq_tr16x8 (tile_avx512.h: three
 * levels of two-source dword permutes, 24 vpermt2d per block). */
TGT_I INLINE void q_repack(const kern_mm_args *a, const kq_idx *ix, int64_t o, int rows,
                           uint8_t *rep, int is_q4)
{
    const int64_t nb = a->n_in / KERN_QK;
    const size_t bb = is_q4 ? KERN_Q4_0_BYTES : KERN_Q8_0_BYTES;
    _Alignas(32) uint16_t dstage[RP_ROWS];
    const __m256i lo4 = _mm256_set1_epi8(0x0f);
    const __m512i x80 = _mm512_set1_epi8((char)0x80);
    memset(dstage, 0, sizeof dstage);
    for (int64_t b = 0; b < nb; b++) {
        uint8_t *rb = rep + (size_t)b * RP_BLOCK_BYTES;
        __m512i z[8];
#pragma GCC unroll 8
        for (int k = 0; k < 8; k++) {
            /* rows 2k and 2k+1, 32 unsigned bytes each */
            int r0 = 2 * k, r1 = 2 * k + 1;
            const uint8_t *w0 = a->W + (size_t)(o + r0) * a->w_row_bytes + (size_t)b * bb;
            const uint8_t *w1 = a->W + (size_t)(o + r1) * a->w_row_bytes + (size_t)b * bb;
            if (r0 >= rows) {
                z[k] = _mm512_setzero_si512();
                continue;
            }
            if (is_q4) {
                __m128i q0 = _mm_loadu_si128((const __m128i *)(const void *)(w0 + 2));
                __m128i q1 = r1 < rows ? _mm_loadu_si128((const __m128i *)(const void *)(w1 + 2))
                                       : _mm_setzero_si128();
                __m256i q = _mm256_inserti128_si256(_mm256_castsi128_si256(q0), q1, 1);
                __m256i lo = _mm256_and_si256(q, lo4),
                        hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), lo4);
                __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                z[k] = _mm512_shuffle_i64x2(v, v, _MM_SHUFFLE(3, 1, 2, 0));
            } else {
                __m256i q0 = _mm256_loadu_si256((const __m256i *)(const void *)(w0 + 2));
                __m256i q1 = r1 < rows ? _mm256_loadu_si256((const __m256i *)(const void *)(w1 + 2))
                                       : _mm256_setzero_si256();
                z[k] = _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(q0), q1, 1), x80);
            }
            dstage[r0] = kern_load_u16(w0);
            if (r1 < rows) dstage[r1] = kern_load_u16(w1);
        }
        kq_tr16x8(ix, z, rb);
        _mm512_store_ps((float *)(void *)(rb + 512),
                        _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(const void *)dstage)));
    }
}

/* Block b of 16 repacked rows for T tokens: acc[t] += isum * (d_w * d_x), one fma per block. */
TGT_I INLINE void q_tile_block(const uint8_t *rep, const int8_t *const *xq, const float *const *xd,
                               const int32_t *const *nc, int64_t b, int T, __m512 *acc)
{
    const uint8_t *rb = rep + (size_t)b * RP_BLOCK_BYTES;
    __m512i is[TOK_TILE];
#pragma GCC unroll 8
    for (int t = 0; t < T; t++)
        is[t] = _mm512_set1_epi32(nc[t][b]);
#pragma GCC unroll 8
    for (int g = 0; g < 8; g++) {
        __m512i w = _mm512_load_si512((const void *)(rb + 64 * g));
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) {
            int32_t x4;
            memcpy(&x4, xq[t] + b * KERN_QK + 4 * g, 4);
            is[t] = _mm512_dpbusd_epi32(is[t], w, _mm512_set1_epi32(x4));
        }
    }
    __m512 dw = _mm512_load_ps((const float *)(const void *)(rb + 512));
#pragma GCC unroll 8
    for (int t = 0; t < T; t++)
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[t]),
                                 _mm512_mul_ps(dw, _mm512_set1_ps(xd[t][b])), acc[t]);
}

/* The same for the group at g of the X16 copy: the nibbles are unpacked here (once per block for
 * all T tokens); the integer sums and the float step are those of q_tile_block. */
TGT_I INLINE void q_tile_block_x16(const uint8_t *g, const int8_t *const *xq,
                                   const float *const *xd, const int32_t *const *nc, int64_t b,
                                   int T, __m512 *acc)
{
    const uint8_t *nib = x16_nib(g, b);
    const __m512i lo4 = _mm512_set1_epi8(0x0f), hi_gf = _mm512_set1_epi64(0x1020408000000000LL);
    __m512i is[TOK_TILE];
#pragma GCC unroll 8
    for (int t = 0; t < T; t++)
        is[t] = _mm512_set1_epi32(nc[t][b]);
#pragma GCC unroll 4
    for (int k = 0; k < 4; k++) {
        const __m512i v = _mm512_load_si512((const void *)(nib + 64 * k));
        const __m512i wl = _mm512_and_si512(v, lo4), wh = _mm512_gf2p8affine_epi64_epi8(v, hi_gf, 0);
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) {
            int32_t xl, xh;
            memcpy(&xl, xq[t] + b * KERN_QK + 4 * k, 4);
            memcpy(&xh, xq[t] + b * KERN_QK + 16 + 4 * k, 4);
            is[t] = _mm512_dpbusd_epi32(is[t], wl, _mm512_set1_epi32(xl));
            is[t] = _mm512_dpbusd_epi32(is[t], wh, _mm512_set1_epi32(xh));
        }
    }
    const __m512 dw =
        _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(const void *)x16_scales(g, b)));
#pragma GCC unroll 8
    for (int t = 0; t < T; t++)
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[t]),
                                 _mm512_mul_ps(dw, _mm512_set1_ps(xd[t][b])), acc[t]);
}

/* The activation rows t0 .. t0 + T - 1 of a tile: their Q8 values, scales and corrections. */
TGT_I INLINE void tile_xrows(const kern_mm_args *a, int64_t t0, int T, const int8_t **xq,
                             const float **xd, const int32_t **nc)
{
#pragma GCC unroll 8
    for (int t = 0; t < T; t++) {
        const uint8_t *xrow = a->Xc + (size_t)(t0 + t) * a->xc_row_bytes;
        xq[t] = (const int8_t *)xrow;
        xd[t] = kern_xq_d(xrow, a->n_in);
        nc[t] = kern_xq_ncorr(xrow, a->n_in);
    }
}

/* q_tile for the X16 copy and T <= 4 tokens (batched decode of a few streams): one linear pass
 * over the group's blocks with the accumulators of all chains in registers (4 chains x T), so
 * the group streams once, in order, instead of once per chain. Chain c still adds its blocks in
 * the same order (c, c + 4, ...; the tail's even/odd), so the bits are q_tile's. */
TGT_I INLINE void q_tile_x16_lin(const kern_mm_args *a, const uint8_t *rep, int64_t o,
                                 __mmask16 rmask, int64_t t0, int T)
{
    const int64_t nb = a->n_in / KERN_QK, nb_main = nb - nb % 4;
    const int8_t *xq[4];
    const float *xd[4];
    const int32_t *nc[4];
    tile_xrows(a, t0, T, xq, xd, nc);
    const uint8_t *pf = rep + kern_repack_group_bytes(KERN_LAYOUT_Q4_0_X16, a->n_in);
    __m512 acc[4][4];
#pragma GCC unroll 4
    for (int c = 0; c < 4; c++)
#pragma GCC unroll 4
        for (int t = 0; t < T; t++)
            acc[c][t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb_main; b += 4) {
        /* the next group into L2: 4 blocks' bytes (18 lines) per step */
#pragma GCC unroll 18
        for (int l = 0; l < 18; l++)
            _mm_prefetch((const char *)(pf + 64 * l), _MM_HINT_T1);
        pf += 2 * KERN_X16_PAIR_BYTES;
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++)
            q_tile_block_x16(rep, xq, xd, nc, b + c, T, acc[c]);
    }
    __m512 tail[2][4];
#pragma GCC unroll 4
    for (int t = 0; t < T; t++)
        tail[0][t] = tail[1][t] = _mm512_setzero_ps();
    for (int64_t b = nb_main, k = 0; b < nb; b++, k ^= 1)
        q_tile_block_x16(rep, xq, xd, nc, b, T, tail[k]);
#pragma GCC unroll 4
    for (int t = 0; t < T; t++) {
        __m512 y = _mm512_add_ps(_mm512_add_ps(acc[0][t], acc[2][t]),
                                 _mm512_add_ps(acc[1][t], acc[3][t]));
        if (nb_main < nb) y = _mm512_add_ps(y, _mm512_add_ps(tail[0][t], tail[1][t]));
        _mm512_mask_storeu_ps(a->Y + (t0 + t) * a->n_out + o, rmask, y);
    }
}

/* 16 repacked rows x T tokens, all blocks; stores the valid rows of each token. The blocks go
 * into the chains of the one-token paths (q_row_1tok says how), so every row gets the same bits
 * as when its token runs alone. One chain at a time (blocks start, start + step, ... < end, one
 * fma each, in order), so one set of T accumulators stays in registers and the block code is
 * inlined once; the chain sums are combined at the end in the one-token paths' order. */
TGT_I INLINE void q_tile(const kern_mm_args *a, const uint8_t *rep, int64_t o, __mmask16 rmask,
                         int64_t t0, int T, int is_q4, int x16)
{
    if (x16 && T <= 4) {
        q_tile_x16_lin(a, rep, o, rmask, t0, T);
        return;
    }
    const int64_t nb = a->n_in / KERN_QK;
    const int64_t nb_main = is_q4 ? nb - nb % 4 : nb;
    const int8_t *xq[TOK_TILE];
    const float *xd[TOK_TILE];
    const int32_t *nc[TOK_TILE];
    __m512 part[6][TOK_TILE], y[TOK_TILE];
    /* chains: Q4_0 blocks mod 4 of the whole 4-block groups, then the rest even/odd; Q8_0
     * even/odd blocks */
    const int n_chains = is_q4 ? (nb_main < nb ? 6 : 4) : 2;
    /* X16: the next group of the linear stream comes into L2 while this one is computed, one
     * block's bytes (4.5 lines) per block step (the one-token path prefetches the same way) */
    const uint8_t *pf = x16 ? rep + kern_repack_group_bytes(KERN_LAYOUT_Q4_0_X16, a->n_in) : NULL;
    tile_xrows(a, t0, T, xq, xd, nc);
    for (int c = 0; c < n_chains; c++) {
        const int64_t start = is_q4 ? (c < 4 ? c : nb_main + (c - 4)) : c;
        const int64_t step = is_q4 && c < 4 ? 4 : 2, end = is_q4 && c < 4 ? nb_main : nb;
        __m512 acc[TOK_TILE];
#pragma GCC unroll 8
        for (int t = 0; t < T; t++)
            acc[t] = _mm512_setzero_ps();
        for (int64_t b = start; b < end; b += step) {
            if (x16) {
#pragma GCC unroll 5
                for (int l = 0; l < 5; l++)
                    _mm_prefetch((const char *)(pf + 64 * l), _MM_HINT_T1);
                pf += KERN_X16_PAIR_BYTES / 2;
                q_tile_block_x16(rep, xq, xd, nc, b, T, acc);
            } else
                q_tile_block(rep, xq, xd, nc, b, T, acc);
        }
#pragma GCC unroll 8
        for (int t = 0; t < T; t++)
            part[c][t] = acc[t];
    }
#pragma GCC unroll 8
    for (int t = 0; t < T; t++) {
        if (is_q4) {
            y[t] = _mm512_add_ps(_mm512_add_ps(part[0][t], part[2][t]),
                                 _mm512_add_ps(part[1][t], part[3][t]));
            if (n_chains == 6) y[t] = _mm512_add_ps(y[t], _mm512_add_ps(part[4][t], part[5][t]));
        } else {
            y[t] = _mm512_add_ps(part[0][t], part[1][t]);
        }
        _mm512_mask_storeu_ps(a->Y + (t0 + t) * a->n_out + o, rmask, y[t]);
    }
}


TGT_I INLINE void q_rows_ntok(const kern_mm_args *a, int64_t r0, int64_t r1, void *work, int is_q4)
{
    uint8_t *rep = work;
    kq_idx ix;
    kq_make_idx(&ix);
    /* Q4_0 with a repacked copy: whole groups are read from it, not repacked per call */
    const int use_r = is_q4 && a->R && r0 % KERN_X16_ROWS == 0;
    const size_t gb = use_r ? kern_repack_group_bytes(KERN_LAYOUT_Q4_0_X16, a->n_in) : 0;
    for (int64_t o = r0; o < r1; o += RP_ROWS) {
        int rows = r1 - o < RP_ROWS ? (int)(r1 - o) : RP_ROWS;
        __mmask16 rmask = (__mmask16)((1u << rows) - 1);
        const int x16 = use_r && rows == KERN_X16_ROWS;
        const uint8_t *src = rep;
        if (x16)
            src = a->R + (size_t)(o / KERN_X16_ROWS) * gb;
        else
            q_repack(a, &ix, o, rows, rep, is_q4);
        int64_t t = 0;
        if (x16) {
            for (; t + TOK_TILE <= a->n_tok; t += TOK_TILE)
                q_tile(a, src, o, rmask, t, TOK_TILE, 1, 1);
        } else if (is_q4) {
            for (; t + TOK_TILE <= a->n_tok; t += TOK_TILE)
                q_tile(a, src, o, rmask, t, TOK_TILE, 1, 0);
        } else {
            for (; t + TOK_TILE <= a->n_tok; t += TOK_TILE)
                q_tile(a, src, o, rmask, t, TOK_TILE, 0, 0);
        }
        /* the remainder as a constant, so each q_tile call is specialised for its width */
        switch (a->n_tok - t) {
#define Q_TILE_REM(n)                                                                              \
    case n:                                                                                        \
        if (x16)                                                                                   \
            q_tile(a, src, o, rmask, t, n, 1, 1);                                                  \
        else if (is_q4)                                                                            \
            q_tile(a, src, o, rmask, t, n, 1, 0);                                                  \
        else                                                                                       \
            q_tile(a, src, o, rmask, t, n, 0, 0);                                                  \
        break;
            Q_TILE_REM(7)
            Q_TILE_REM(6)
            Q_TILE_REM(5)
            Q_TILE_REM(4)
            Q_TILE_REM(3)
            Q_TILE_REM(2)
            Q_TILE_REM(1)
#undef Q_TILE_REM
        default:
            break;
        }
    }
}

/* Below this many tokens the repack costs more than it saves. */
#define Q_REPACK_MIN_TOK 4

TGT_I static void mm_q4_0_avx512(const kern_mm_args *a, int64_t r0, int64_t r1, void *work)
{
    if (a->n_tok >= Q_REPACK_MIN_TOK) {
        q_rows_ntok(a, r0, r1, work, 1);
        return;
    }
    if (a->R && r0 % KERN_X16_ROWS == 0) {
        /* whole groups from the repacked copy, every token of a group while it is in L2 */
        const size_t gb = kern_repack_group_bytes(KERN_LAYOUT_Q4_0_X16, a->n_in);
        for (; r0 + KERN_X16_ROWS <= r1; r0 += KERN_X16_ROWS) {
            const uint8_t *g = a->R + (size_t)(r0 / KERN_X16_ROWS) * gb;
            for (int64_t t = 0; t < a->n_tok; t++)
                x16_rows16_1tok(a, g, r0, t);
        }
    }
    for (int64_t t = 0; t < a->n_tok && r0 < r1; t++)
        q_rows_1tok(a, r0, r1, t, 1);
}

TGT_I static void mm_q8_0_avx512(const kern_mm_args *a, int64_t r0, int64_t r1, void *work)
{
    if (a->n_tok >= Q_REPACK_MIN_TOK) {
        q_rows_ntok(a, r0, r1, work, 0);
        return;
    }
    for (int64_t t = 0; t < a->n_tok; t++)
        q_rows_1tok(a, r0, r1, t, 0);
}

/* ---- F32 / F16 / BF16: register tiles of R rows x T tokens ----------------------------- */

enum { WK_F32, WK_F16 };

/* The sum of the 16 lanes, lanes i and i+8 first, then i and i+4, i and i+2, i and i+1 (the
 * pairing of GCC's _mm512_reduce_add_ps, spelled out so that no compiler picks another): the
 * order reduce16 below reproduces for 16 vectors at once. */
TGT_F INLINE float hsum16(__m512 v)
{
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

/* 16 weights of row w at element i as floats. */
TGT_F INLINE __m512 load_w16(const uint8_t *w, int64_t i, int kind)
{
    if (kind == WK_F16)
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)(w + 2 * i)));
    return _mm512_loadu_ps((const float *)(const void *)(w + 4 * i));
}

/* Y for rows o..o+R-1 and tokens t0..t0+T-1; x rows are floats (F32: X, F16: Xc). */
TGT_F INLINE void f_tile(const kern_mm_args *a, int64_t o, int R, int64_t t0, int T, int kind)
{
    const float *x[6];
    const uint8_t *w[4];
    __m512 acc[4][6];
    size_t xstride = kind == WK_F32 ? (size_t)a->n_in * 4 : a->xc_row_bytes;
    const uint8_t *xbase = kind == WK_F32 ? (const uint8_t *)a->X : a->Xc;
#pragma GCC unroll 6
    for (int t = 0; t < T; t++)
        x[t] = (const float *)(const void *)(xbase + (size_t)(t0 + t) * xstride);
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        w[r] = a->W + (size_t)(o + r) * a->w_row_bytes;
#pragma GCC unroll 6
        for (int t = 0; t < T; t++)
            acc[r][t] = _mm512_setzero_ps();
    }
    for (int64_t i = 0; i < a->n_in; i += 16) {
        __m512 wv[4];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
            wv[r] = load_w16(w[r], i, kind);
#pragma GCC unroll 6
        for (int t = 0; t < T; t++) {
            __m512 xv = _mm512_loadu_ps(x[t] + i);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++)
                acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 6
        for (int t = 0; t < T; t++)
            a->Y[(t0 + t) * a->n_out + o + r] = hsum16(acc[r][t]);
}

/* One or two tokens (decode, a step of two streams): one row at a time, one accumulator per
 * token, elements in order 16 at a time: the reduction order of f_tile, so a row gets the same
 * bits alone as in a tile of several tokens (batch invariance). One weight stream per thread,
 * left to the hardware prefetcher, and read once for both tokens: on dev-cpu (Zen 5) eight
 * interleaved rows with a software prefetch of the next eight decoded TinyLlama F16 at 0.88x
 * llama.cpp, four at 0.93x, two at ~0.6x, one at 1.12x (docs/PERFORMANCE.md; n_in is a
 * multiple of 32). */
TGT_F INLINE void f_rows_ntok(const kern_mm_args *a, int64_t r0, int64_t r1, int64_t t0, int T,
                              int kind)
{
    size_t xstride = kind == WK_F32 ? (size_t)a->n_in * 4 : a->xc_row_bytes;
    const uint8_t *xbase = kind == WK_F32 ? (const uint8_t *)a->X : a->Xc;
    const float *x[2];
#pragma GCC unroll 2
    for (int t = 0; t < T; t++)
        x[t] = (const float *)(const void *)(xbase + (size_t)(t0 + t) * xstride);
    for (int64_t o = r0; o < r1; o++) {
        const uint8_t *w = a->W + (size_t)o * a->w_row_bytes;
        __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t i = 0; i < a->n_in; i += 32) {
            const __m512 w0 = load_w16(w, i, kind), w1 = load_w16(w, i + 16, kind);
#pragma GCC unroll 2
            for (int t = 0; t < T; t++) {
                acc[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x[t] + i), acc[t]);
                acc[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x[t] + i + 16), acc[t]);
            }
        }
#pragma GCC unroll 2
        for (int t = 0; t < T; t++)
            a->Y[(t0 + t) * a->n_out + o] = hsum16(acc[t]);
    }
}

/* per-thread scratch per 32 inputs: spilled accumulators of a row block */
#define F_WORK_PER_32 768
#ifndef F_KC
#define F_KC 1024
#endif
#ifndef BF_KC
#define BF_KC 2048
#endif
#ifndef F_RB
#define F_RB 64
#endif
/* Bytes of spilled accumulators per row of a row block (4 rows x 6 tokens x 64 bytes per 4). */
#define F_SPILL_PER_ROW (6 * 64)

/* The horizontal sums of 16 vectors at once, lane 4j + k the sum of v[4k + j]: each sum adds
 * the same pairs in the same order as hsum16 (lanes i and i+8, then i and i+4, i and i+2, i and
 * i+1), so it has the same bits, in 45 instructions instead of 16 x 8. */
TGT_F INLINE __m512 reduce16(const __m512 *v)
{
    __m512 c[8], e[4], g[2];
    /* c[k]: lanes 0..7 the i, i+8 sums of v[2k], lanes 8..15 those of v[2k+1] */
#pragma GCC unroll 8
    for (int k = 0; k < 8; k++)
        c[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xee));
    /* e[m]: 128-bit chunk j the i, i+4 sums of v[4m + j] */
#pragma GCC unroll 4
    for (int m = 0; m < 4; m++)
        e[m] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * m], c[2 * m + 1], 0x88),
                             _mm512_shuffle_f32x4(c[2 * m], c[2 * m + 1], 0xdd));
    /* g[n]: chunk j the i, i+2 sums of v[8n + j] (lanes 0, 1) and of v[8n + 4 + j] (2, 3) */
#pragma GCC unroll 2
    for (int n = 0; n < 2; n++)
        g[n] = _mm512_add_ps(_mm512_shuffle_ps(e[2 * n], e[2 * n + 1], 0x44),
                             _mm512_shuffle_ps(e[2 * n], e[2 * n + 1], 0xee));
    /* chunk j: the sums of v[j], v[4 + j], v[8 + j], v[12 + j] */
    return _mm512_add_ps(_mm512_shuffle_ps(g[0], g[1], 0x88), _mm512_shuffle_ps(g[0], g[1], 0xdd));
}

/* The end of a tile's slice: its accumulators back to spill, or after the last slice the sums
 * into Y (rows o..o+3 of tokens t0..t0+T-1). */
TGT_F INLINE void f_tile_finish(const kern_mm_args *a, int64_t o, int64_t t0, int T,
                                __m512 acc[4][6], __m512 *spill, int last)
{
    if (!last) {
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++)
#pragma GCC unroll 6
            for (int t = 0; t < T; t++)
                _mm512_store_ps((float *)&spill[r * 6 + t], acc[r][t]);
        return;
    }
#pragma GCC unroll 2
    for (int tg = 0; tg < T; tg += 4) {
        __m512 v[16];
        float out[16] __attribute__((aligned(64)));
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++)
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++)
                v[4 * r + j] = tg + j < T ? acc[r][tg + j] : _mm512_setzero_ps();
        _mm512_store_ps(out, reduce16(v));
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++)
            if (tg + j < T)
                _mm_storeu_ps(a->Y + (t0 + tg + j) * a->n_out + o, _mm_load_ps(out + 4 * j));
    }
}

/* Rows o..o+3, tokens t0..t0+T-1, inputs k0..k1-1 of a 4 x T tile whose accumulators live in
 * spill between calls (first: start from zero; last: reduce into Y). Each lane sums its
 * products in the order of f_tile, so the result is bit for bit that of f_tile. */
TGT_F INLINE void f_tile_k(const kern_mm_args *a, int64_t o, int64_t t0, int T, int64_t k0,
                           int64_t k1, __m512 *spill, int first, int last, int kind)
{
    const float *x[6];
    const uint8_t *w[4];
    __m512 acc[4][6];
    size_t xstride = kind == WK_F32 ? (size_t)a->n_in * 4 : a->xc_row_bytes;
    const uint8_t *xbase = kind == WK_F32 ? (const uint8_t *)a->X : a->Xc;
#pragma GCC unroll 6
    for (int t = 0; t < T; t++)
        x[t] = (const float *)(const void *)(xbase + (size_t)(t0 + t) * xstride);
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++) {
        w[r] = a->W + (size_t)(o + r) * a->w_row_bytes;
#pragma GCC unroll 6
        for (int t = 0; t < T; t++)
            acc[r][t] = first ? _mm512_setzero_ps() : _mm512_load_ps((float *)&spill[r * 6 + t]);
    }
    for (int64_t i = k0; i < k1; i += 16) {
        __m512 wv[4];
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++)
            wv[r] = load_w16(w[r], i, kind);
#pragma GCC unroll 6
        for (int t = 0; t < T; t++) {
            __m512 xv = _mm512_loadu_ps(x[t] + i);
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++)
                acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
        }
    }
    f_tile_finish(a, o, t0, T, acc, spill, last);
}

/* Rows per block: as many as the scratch holds accumulators for (at least 16 when the inputs
 * are sliced at all: n_in > F_KC; below that nothing is spilled), at most F_RB (their weights
 * stay in L2). */
static inline int64_t f_row_block(const kern_mm_args *a)
{
    int64_t rb = (int64_t)((size_t)(a->n_in / 32) * F_WORK_PER_32 / F_SPILL_PER_ROW) & ~3;
    if (rb > F_RB) rb = F_RB;
    return rb < 4 ? 4 : rb;
}

/* Tokens t0..t0+T-1 of rows rb..re-1 (a multiple of 4): for each slice of F_KC inputs, every
 * 4-row group of the block, so that the slice of the T activation rows stays in L1 while the
 * weights stream from L2. */
TGT_F INLINE void f_block_tok(const kern_mm_args *a, int64_t rb, int64_t re, int64_t t0, int T,
                              __m512 *spill, int kind)
{
    for (int64_t k0 = 0; k0 < a->n_in; k0 += F_KC) {
        int64_t k1 = k0 + F_KC < a->n_in ? k0 + F_KC : a->n_in;
        int first = k0 == 0, last = k1 == a->n_in;
        for (int64_t o = rb; o < re; o += 4)
            f_tile_k(a, o, t0, T, k0, k1, spill + (o - rb) / 4 * 24, first, last, kind);
    }
}

TGT_F INLINE void f_rows(const kern_mm_args *a, int64_t r0, int64_t r1, void *work, int kind)
{
    if (a->n_tok == 1 || a->n_tok == 2) {
        if (a->n_tok == 1)
            f_rows_ntok(a, r0, r1, 0, 1, kind);
        else
            f_rows_ntok(a, r0, r1, 0, 2, kind);
        return;
    }
    const int64_t rbmax = f_row_block(a);
    __m512 *spill = work;
    int64_t r4 = r0 + ((r1 - r0) & ~(int64_t)3);
    for (int64_t rb = r0; rb < r4; rb += rbmax) {
        int64_t re = rb + rbmax < r4 ? rb + rbmax : r4;
        int64_t t = 0;
        for (; t + 6 <= a->n_tok; t += 6)
            f_block_tok(a, rb, re, t, 6, spill, kind);
        switch (a->n_tok - t) {
        case 5:
            f_block_tok(a, rb, re, t, 5, spill, kind);
            break;
        case 4:
            f_block_tok(a, rb, re, t, 4, spill, kind);
            break;
        case 3:
            f_block_tok(a, rb, re, t, 3, spill, kind);
            break;
        case 2:
            f_block_tok(a, rb, re, t, 2, spill, kind);
            break;
        case 1:
            f_block_tok(a, rb, re, t, 1, spill, kind);
            break;
        default:
            break;
        }
    }
    for (int64_t o = r4; o < r1; o++) {
        int64_t t = 0;
        for (; t + 6 <= a->n_tok; t += 6)
            f_tile(a, o, 1, t, 6, kind);
        for (; t < a->n_tok; t++)
            f_tile(a, o, 1, t, 1, kind);
    }
}

TGT_F static void mm_f32_avx512(const kern_mm_args *a, int64_t r0, int64_t r1, void *work)
{
    f_rows(a, r0, r1, work, WK_F32);
}

TGT_F static void mm_f16_avx512(const kern_mm_args *a, int64_t r0, int64_t r1, void *work)
{
    f_rows(a, r0, r1, work, WK_F16);
}

/* BF16 by vdpbf16ps: 32 products per instruction, pairs summed into 16 f32 lanes. */
TGT_BF INLINE void bf_tile(const kern_mm_args *a, int64_t o, int R, int64_t t0, int T)
{
    const uint8_t *x[6], *w[4];
    __m512 acc[4][6];
#pragma GCC unroll 6
    for (int t = 0; t < T; t++)
        x[t] = a->Xc + (size_t)(t0 + t) * a->xc_row_bytes;
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        w[r] = a->W + (size_t)(o + r) * a->w_row_bytes;
#pragma GCC unroll 6
        for (int t = 0; t < T; t++)
            acc[r][t] = _mm512_setzero_ps();
    }
    for (int64_t i = 0; i < a->n_in; i += 32) {
        if (R == 4 && T == 1) {
            /* one token streams the weights: prefetch the next 4 rows as one linear stream */
            const uint8_t *pf = w[0] + 4 * a->w_row_bytes + (size_t)i / 32 * 256;
#pragma GCC unroll 4
            for (int l = 0; l < 4; l++)
                _mm_prefetch((const char *)(pf + 64 * l), _MM_HINT_T1);
        }
        __m512bh wv[4];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
            wv[r] = (__m512bh)_mm512_loadu_si512((const void *)(w[r] + 2 * i));
#pragma GCC unroll 6
        for (int t = 0; t < T; t++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(x[t] + 2 * i));
#pragma GCC unroll 4
            for (int r = 0; r < R; r++)
                acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv[r], xv);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 6
        for (int t = 0; t < T; t++)
            a->Y[(t0 + t) * a->n_out + o + r] = hsum16(acc[r][t]);
}

/* bf_tile over inputs k0..k1-1 with the accumulators in spill between calls, as f_tile_k. */
TGT_BF INLINE void bf_tile_k(const kern_mm_args *a, int64_t o, int64_t t0, int T, int64_t k0,
                             int64_t k1, __m512 *spill, int first, int last)
{
    const uint8_t *x[6], *w[4];
    __m512 acc[4][6];
#pragma GCC unroll 6
    for (int t = 0; t < T; t++)
        x[t] = a->Xc + (size_t)(t0 + t) * a->xc_row_bytes;
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++) {
        w[r] = a->W + (size_t)(o + r) * a->w_row_bytes;
#pragma GCC unroll 6
        for (int t = 0; t < T; t++)
            acc[r][t] = first ? _mm512_setzero_ps() : _mm512_load_ps((float *)&spill[r * 6 + t]);
    }
    for (int64_t i = k0; i < k1; i += 32) {
        __m512bh wv[4];
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++)
            wv[r] = (__m512bh)_mm512_loadu_si512((const void *)(w[r] + 2 * i));
#pragma GCC unroll 6
        for (int t = 0; t < T; t++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(x[t] + 2 * i));
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++)
                acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv[r], xv);
        }
    }
    f_tile_finish(a, o, t0, T, acc, spill, last);
}

/* f_block_tok for BF16 (slices of BF_KC: its activations take half the bytes of F16's). */
TGT_BF INLINE void bf_block_tok(const kern_mm_args *a, int64_t rb, int64_t re, int64_t t0, int T,
                                __m512 *spill)
{
    for (int64_t k0 = 0; k0 < a->n_in; k0 += BF_KC) {
        int64_t k1 = k0 + BF_KC < a->n_in ? k0 + BF_KC : a->n_in;
        int first = k0 == 0, last = k1 == a->n_in;
        for (int64_t o = rb; o < re; o += 4)
            bf_tile_k(a, o, t0, T, k0, k1, spill + (o - rb) / 4 * 24, first, last);
    }
}

TGT_BF static void mm_bf16_avx512(const kern_mm_args *a, int64_t r0, int64_t r1, void *work)
{
    if (a->n_tok >= 3) {
        const int64_t rbmax = f_row_block(a);
        __m512 *spill = work;
        int64_t r4 = r0 + ((r1 - r0) & ~(int64_t)3);
        for (int64_t rb = r0; rb < r4; rb += rbmax) {
            int64_t re = rb + rbmax < r4 ? rb + rbmax : r4;
            int64_t t = 0;
            for (; t + 6 <= a->n_tok; t += 6)
                bf_block_tok(a, rb, re, t, 6, spill);
            switch (a->n_tok - t) {
            case 5:
                bf_block_tok(a, rb, re, t, 5, spill);
                break;
            case 4:
                bf_block_tok(a, rb, re, t, 4, spill);
                break;
            case 3:
                bf_block_tok(a, rb, re, t, 3, spill);
                break;
            case 2:
                bf_block_tok(a, rb, re, t, 2, spill);
                break;
            case 1:
                bf_block_tok(a, rb, re, t, 1, spill);
                break;
            default:
                break;
            }
        }
        for (int64_t o = r0 + ((r1 - r0) & ~(int64_t)3); o < r1; o++)
            for (int64_t t = 0; t < a->n_tok; t++)
                bf_tile(a, o, 1, t, 1);
        return;
    }
    int64_t o = r0;
    for (; o + 4 <= r1; o += 4) {
        int64_t t = 0;
        for (; t + 6 <= a->n_tok; t += 6)
            bf_tile(a, o, 4, t, 6);
        switch (a->n_tok - t) {
        case 5:
            bf_tile(a, o, 4, t, 5);
            break;
        case 4:
            bf_tile(a, o, 4, t, 4);
            break;
        case 3:
            bf_tile(a, o, 4, t, 3);
            break;
        case 2:
            bf_tile(a, o, 4, t, 2);
            break;
        case 1:
            bf_tile(a, o, 4, t, 1);
            break;
        default:
            break;
        }
    }
    for (; o < r1; o++)
        for (int64_t t = 0; t < a->n_tok; t++)
            bf_tile(a, o, 1, t, 1);
}

kern_mm_kernel kern_mm_lookup_avx512(int wtype)
{
    kern_mm_kernel k = {0};
    int ints = kern_cpu_has_avx512vnni() && kern_cpu_has_avx512vbmi() && kern_cpu_has_gfni();
    switch (wtype) {
    case GGML_TYPE_F32:
        k.mm = mm_f32_avx512;
        k.work_bytes_per_32 = F_WORK_PER_32;
        break;
    case GGML_TYPE_F16:
        k.mm = mm_f16_avx512;
        k.cvt = cvt_f16_avx512;
        k.xc_row_bytes_per_32 = 128;
        k.work_bytes_per_32 = F_WORK_PER_32;
        break;
    case GGML_TYPE_BF16:
        if (!kern_cpu_has_avx512bf16()) break;
        k.mm = mm_bf16_avx512;
        k.cvt = cvt_bf16_avx512;
        k.xc_row_bytes_per_32 = 64;
        k.work_bytes_per_32 = F_WORK_PER_32;
        break;
    case GGML_TYPE_Q8_0:
        if (!ints) break;
        k.mm = mm_q8_0_avx512;
        k.cvt = cvt_q8_for_q8_0_avx512;
        k.xc_row_bytes_per_32 = KERN_XQ_BYTES_PER_32;
        k.work_bytes_per_32 = RP_BLOCK_BYTES;
        break;
    case GGML_TYPE_Q4_0:
        if (!ints) break;
        k.mm = mm_q4_0_avx512;
        k.cvt = cvt_q8_for_q4_0_avx512;
        k.xc_row_bytes_per_32 = KERN_XQ_BYTES_PER_32;
        k.work_bytes_per_32 = RP_BLOCK_BYTES;
        k.layout = KERN_LAYOUT_Q4_0_X16;
        break;
    case GGML_TYPE_Q2_K:
    case GGML_TYPE_Q3_K:
    case GGML_TYPE_Q4_K:
    case GGML_TYPE_Q5_K:
    case GGML_TYPE_Q6_K:
    case GGML_TYPE_IQ4_XS:
    case GGML_TYPE_TQ1_0:
    case GGML_TYPE_TQ2_0:
        return kern_mm_lookup_kq_avx512(wtype);
    case GGML_TYPE_Q4_1:
    case GGML_TYPE_Q5_0:
    case GGML_TYPE_Q5_1:
    case GGML_TYPE_IQ4_NL:
        return kern_mm_lookup_q32_avx512(wtype);
    default:
        break;
    }
    return k;
}

#else /* not x86-64 */

kern_mm_kernel kern_mm_lookup_avx512(int wtype)
{
    kern_mm_kernel k = {0};
    (void)wtype;
    return k;
}

#endif
