/* matmul_kq_avx512.c - AVX-512 VNNI row kernels for kern_matmul with K-quant weights (Q4_K, Q6_K;
 * activations quantized to Q8_K as ggml does). x86-64 only, compiled with target attributes;
 * matmul_avx512.c's lookup hands these out only when the CPU has VNNI.
 *
 * Prompts (n_tok >= KQ_TILE_MIN_TOK): 16 weight rows are repacked per call into this thread's
 * scratch, per super-block of 256: the unpacked unsigned values with row r in 32-bit lane r
 * (64 vectors of 4 values per row; a 16x8 dword transpose by vpermt2d per 32 values), then the
 * sub-block scales as int32 lanes, the mins (Q4_K) or scales (Q6_K) as int16 pairs, and the
 * fp16 block scales as floats. A register tile of 16 rows x 8 tokens then reuses each repacked
 * vector 8 times: one vpdpbusd with a broadcast of 4 activation bytes advances 16 rows of one
 * token; each sub-block's sum is multiplied by its scale (vpmulld) and the mins (Q4_K) or the
 * -32 offset (Q6_K) go through the activations' bsums (vpdpwssd).
 * Every integer per (row, super-block) is the exact value the one-row dot products of
 * src/cpu/vecdot_avx2.c compute, and the float step per super-block is their expression, in
 * their order (sumf + ((d * dy) * isum - (dmin * dy) * summ) for Q4_K, sumf + (d * dy) * isum
 * for Q6_K; the build does not contract to fma), so a row gets the same bits as when its token
 * runs alone through the dot product (tests/test_batch_invariance.c).
 * Fewer tokens (decode): the traits table's one-row dot product, row by row. */
#include <string.h>

#include "cpu/kern_impl.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define TGT                                                                                        \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline))

#define KQ_ROWS 16
#define KQ_TOK 8
#define KQ_TILE_MIN_TOK 4 /* below this the repack costs more than it saves */
#define Q8K_QS 4    /* offset of the int8 values in a Q8_K block */
#define Q8K_BSUM 260 /* offset of the 16 int16 group sums */

/* Repacked super-block of 16 rows: 64 vectors of values, then per type (offsets in bytes). */
#define KQ_W_BYTES 4096
#define Q4K_SC 4096   /* 8 vectors: int32 scale of sub-block j (32 values) per row */
#define Q4K_MN 4608   /* 8 vectors: int16 pair (min j, min j) per row */
#define Q4K_D 5120    /* 16 float d */
#define Q4K_DMIN 5184 /* 16 float dmin */
#define Q4K_SB 5248
#define Q6K_SC 4096 /* 16 vectors: int32 scale of group g (16 values) per row */
#define Q6K_SCP 5120 /* 8 vectors: int16 pair (scale 2p, scale 2p+1) per row */
#define Q6K_D 5632
#define Q6K_SB 5696

/* Index vectors of the 16x8 dword transpose (kq_tr16x8). */
typedef struct kq_idx {
    __m512i l1[2], l2[2], l3[2];
} kq_idx;

TGT static void kq_make_idx(kq_idx *ix)
{
    int32_t v[16];
    for (int h = 0; h < 2; h++) {
        for (int m = 0; m < 16; m++) {
            int gl = m / 4, r = m % 4, g = 4 * h + gl;
            v[m] = r < 2 ? r * 8 + g : 16 + (r - 2) * 8 + g;
        }
        ix->l1[h] = _mm512_loadu_si512(v);
        for (int m = 0; m < 16; m++) {
            int gl = 2 * h + m / 8, r = m % 8;
            v[m] = r < 4 ? gl * 4 + r : 16 + gl * 4 + (r - 4);
        }
        ix->l2[h] = _mm512_loadu_si512(v);
        for (int m = 0; m < 16; m++)
            v[m] = m < 8 ? h * 8 + m : 16 + h * 8 + (m - 8);
        ix->l3[h] = _mm512_loadu_si512(v);
    }
}

/* z[k]: 32 bytes of row 2k (low half) and of row 2k+1 (high half). Writes 8 vectors to out:
 * vector g holds in dword lane r the bytes 4g..4g+3 of row r (the transpose of q_repack in
 * matmul_avx512.c: three levels of two-source dword permutes). */
TGT INLINE void kq_tr16x8(const kq_idx *ix, const __m512i z[8], uint8_t *out)
{
    __m512i A[4][2], B[2][2][2];
#pragma GCC unroll 4
    for (int k = 0; k < 4; k++)
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++)
            A[k][h] = _mm512_permutex2var_epi32(z[2 * k], ix->l1[h], z[2 * k + 1]);
#pragma GCC unroll 2
    for (int j = 0; j < 2; j++)
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++)
#pragma GCC unroll 2
            for (int h2 = 0; h2 < 2; h2++)
                B[j][h][h2] = _mm512_permutex2var_epi32(A[2 * j][h], ix->l2[h2], A[2 * j + 1][h]);
#pragma GCC unroll 2
    for (int h = 0; h < 2; h++)
#pragma GCC unroll 2
        for (int h2 = 0; h2 < 2; h2++)
#pragma GCC unroll 2
            for (int h3 = 0; h3 < 2; h3++)
                _mm512_store_si512((void *)(out + 64 * (4 * h + 2 * h2 + h3)),
                                   _mm512_permutex2var_epi32(B[0][h][h2], ix->l3[h3], B[1][h][h2]));
}

/* 32 bytes at offset off of rows 2k and 2k+1 of the super-block (zero for rows >= rows). */
TGT INLINE __m512i kq_pair(const uint8_t *w0, size_t row_bytes, int k, int rows, size_t off)
{
    __m256i a = 2 * k < rows ? _mm256_loadu_si256((const __m256i *)(const void *)(w0 + (size_t)(2 * k) * row_bytes + off))
                             : _mm256_setzero_si256();
    __m256i b = 2 * k + 1 < rows
                    ? _mm256_loadu_si256((const __m256i *)(const void *)(w0 + (size_t)(2 * k + 1) * row_bytes + off))
                    : _mm256_setzero_si256();
    return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
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

/* Repack super-block b of rows [o, o + rows) into rb. */
TGT INLINE void q4k_repack_sb(const kern_mm_args *a, const kq_idx *ix, int64_t o, int rows,
                              int64_t b, uint8_t *rb)
{
    const uint8_t *w0 = a->W + (size_t)o * a->w_row_bytes + (size_t)b * 144;
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    __m512i zl[8], zh[8];
    for (int c = 0; c < 4; c++) {
#pragma GCC unroll 8
        for (int k = 0; k < 8; k++) {
            __m512i q = kq_pair(w0, a->w_row_bytes, k, rows, 16 + 32 * (size_t)c);
            zl[k] = _mm512_and_si512(q, m4);
            zh[k] = _mm512_and_si512(_mm512_srli_epi16(q, 4), m4);
        }
        kq_tr16x8(ix, zl, rb + 512 * (2 * c));
        kq_tr16x8(ix, zh, rb + 512 * (2 * c + 1));
    }
    _Alignas(64) int32_t sc[8][16], mn[8][16];
    _Alignas(32) uint16_t d[16], dm[16];
    memset(sc, 0, sizeof sc);
    memset(mn, 0, sizeof mn);
    memset(d, 0, sizeof d);
    memset(dm, 0, sizeof dm);
    for (int r = 0; r < rows; r++) {
        const uint8_t *wb = w0 + (size_t)r * a->w_row_bytes;
        uint8_t s8[8], m8[8];
        q4k_scales_mins(wb + 4, s8, m8);
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            sc[j][r] = s8[j];
            mn[j][r] = (int32_t)((uint32_t)m8[j] | ((uint32_t)m8[j] << 16));
        }
        d[r] = kq_u16(wb);
        dm[r] = kq_u16(wb + 2);
    }
    memcpy(rb + Q4K_SC, sc, sizeof sc);
    memcpy(rb + Q4K_MN, mn, sizeof mn);
    _mm512_store_ps((float *)(void *)(rb + Q4K_D), _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(const void *)d)));
    _mm512_store_ps((float *)(void *)(rb + Q4K_DMIN),
                    _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(const void *)dm)));
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
                __m512i hb = q == 0   ? _mm512_slli_epi16(qh, 4)
                             : q == 1 ? _mm512_slli_epi16(qh, 2)
                             : q == 2 ? qh
                                      : _mm512_srli_epi16(qh, 2);
                z[k] = _mm512_or_si512(lo, _mm512_and_si512(hb, m30));
            }
            kq_tr16x8(ix, z, rb + 512 * (4 * h + q));
        }
    }
    _Alignas(64) int32_t sc[16][16], scp[8][16];
    _Alignas(32) uint16_t d[16];
    memset(sc, 0, sizeof sc);
    memset(scp, 0, sizeof scp);
    memset(d, 0, sizeof d);
    for (int r = 0; r < rows; r++) {
        const uint8_t *wb = w0 + (size_t)r * a->w_row_bytes;
        const int8_t *s = (const int8_t *)(wb + 192);
#pragma GCC unroll 16
        for (int g = 0; g < 16; g++)
            sc[g][r] = s[g];
#pragma GCC unroll 8
        for (int p = 0; p < 8; p++)
            scp[p][r] = (int32_t)((uint32_t)(uint16_t)s[2 * p] | ((uint32_t)(uint16_t)s[2 * p + 1] << 16));
        d[r] = kq_u16(wb + 208);
    }
    memcpy(rb + Q6K_SC, sc, sizeof sc);
    memcpy(rb + Q6K_SCP, scp, sizeof scp);
    _mm512_store_ps((float *)(void *)(rb + Q6K_D), _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(const void *)d)));
}

TGT INLINE __m512i kq_bcast(const uint8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

TGT INLINE float kq_f32(const uint8_t *p)
{
    float v;
    memcpy(&v, p, 4);
    return v;
}

/* 16 repacked rows x T tokens over all super-blocks; stores the valid rows of each token. */
TGT INLINE void kq_tile(const kern_mm_args *a, const uint8_t *rep, int64_t o, __mmask16 rmask,
                        int64_t t0, int T, int is_q6)
{
    const int64_t nsb = a->n_in / 256;
    const size_t sbb = is_q6 ? Q6K_SB : Q4K_SB;
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
        const int n_sub = is_q6 ? 16 : 8, per_sub = is_q6 ? 4 : 8;
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
            __m512i sc = _mm512_load_si512((const void *)(rb + (is_q6 ? Q6K_SC : Q4K_SC) + 64 * j));
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
            __m512i m = _mm512_load_si512((const void *)(rb + (is_q6 ? Q6K_SCP : Q4K_MN) + 64 * p));
#pragma GCC unroll 8
        for (int t = 0; t < T; t++)
                s[t] = _mm512_dpwssd_epi32(s[t], m, kq_bcast(x[t] + yo + Q8K_BSUM + 4 * p));
        }
        if (is_q6) {
            const __m512 d = _mm512_load_ps((const float *)(const void *)(rb + Q6K_D));
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) {
                __m512 dy = _mm512_set1_ps(kq_f32(x[t] + yo));
                __m512i is = _mm512_sub_epi32(isum[t], _mm512_slli_epi32(s[t], 5));
                acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(_mm512_mul_ps(d, dy), _mm512_cvtepi32_ps(is)));
            }
        } else {
            const __m512 d = _mm512_load_ps((const float *)(const void *)(rb + Q4K_D));
            const __m512 dm = _mm512_load_ps((const float *)(const void *)(rb + Q4K_DMIN));
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

TGT INLINE void kq_rows_ntok(const kern_mm_args *a, int64_t r0, int64_t r1, void *work, int is_q6)
{
    uint8_t *rep = work;
    const int64_t nsb = a->n_in / 256;
    kq_idx ix;
    kq_make_idx(&ix);
    for (int64_t o = r0; o < r1; o += KQ_ROWS) {
        int rows = r1 - o < KQ_ROWS ? (int)(r1 - o) : KQ_ROWS;
        __mmask16 rmask = (__mmask16)((1u << rows) - 1);
        for (int64_t b = 0; b < nsb; b++) {
            if (is_q6)
                q6k_repack_sb(a, &ix, o, rows, b, rep + (size_t)b * Q6K_SB);
            else
                q4k_repack_sb(a, &ix, o, rows, b, rep + (size_t)b * Q4K_SB);
        }
        int64_t t = 0;
        for (; t + KQ_TOK <= a->n_tok; t += KQ_TOK)
            kq_tile(a, rep, o, rmask, t, KQ_TOK, is_q6);
        if (t + 4 <= a->n_tok) {
            kq_tile(a, rep, o, rmask, t, 4, is_q6);
            t += 4;
        }
        for (; t < a->n_tok; t++)
            kq_tile(a, rep, o, rmask, t, 1, is_q6);
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

TGT static void mm_q4_k_avx512(const kern_mm_args *a, int64_t r0, int64_t r1, void *work)
{
    if (a->n_tok >= KQ_TILE_MIN_TOK)
        kq_rows_ntok(a, r0, r1, work, 0);
    else if (kern_kq_decode_supported())
        kern_kq_decode(a, r0, r1, work, 0);
    else
        kq_rows_dot(a, r0, r1);
}

TGT static void mm_q6_k_avx512(const kern_mm_args *a, int64_t r0, int64_t r1, void *work)
{
    if (a->n_tok >= KQ_TILE_MIN_TOK)
        kq_rows_ntok(a, r0, r1, work, 1);
    else if (kern_kq_decode_supported())
        kern_kq_decode(a, r0, r1, work, 1);
    else
        kq_rows_dot(a, r0, r1);
}

kern_mm_kernel kern_mm_lookup_kq_avx512(int wtype)
{
    kern_mm_kernel k = {0};
    const forge_type_traits *tr = forge_type_traits_get(wtype);
    const forge_type_traits *xt = forge_type_traits_get(GGML_TYPE_Q8_K);
    if (!kern_cpu_has_avx512vnni() || !tr || !xt || !tr->vec_dot_avx512) return k;
    switch (wtype) {
    case GGML_TYPE_Q4_K:
        k.mm = mm_q4_k_avx512;
        k.work_bytes_per_32 = Q4K_SB / 8 > KQ_DECODE_WORK_PER_32 ? Q4K_SB / 8 : KQ_DECODE_WORK_PER_32;
        break;
    case GGML_TYPE_Q6_K:
        k.mm = mm_q6_k_avx512;
        k.work_bytes_per_32 = Q6K_SB / 8;
        break;
    default:
        return k;
    }
    k.dot = tr->vec_dot_avx512;
    k.cvt = tr->quantize_act;
    k.xc_block = xt->block_size;
    k.xc_block_bytes = xt->block_bytes;
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
