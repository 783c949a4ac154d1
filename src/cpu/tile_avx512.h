/* tile_avx512.h - pieces shared by the AVX-512 prompt tiles that repack 16 weight rows per call
 * with row r in 32-bit lane r (matmul_kq_avx512.c: super-blocks of 256, matmul_q32_avx512.c:
 * blocks of 32): the 16x8 dword transpose, the loads feeding it and the activation broadcasts.
 * x86-64 only; static inline functions compiled with their own target attribute. */
#ifndef FORGE_CPU_TILE_AVX512_H
#define FORGE_CPU_TILE_AVX512_H

#if defined(__x86_64__)
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define TILE_TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define TILE_INLINE static inline __attribute__((always_inline))

/* Index vectors of the 16x8 dword transpose (kq_tr16x8). */
typedef struct kq_idx {
    __m512i l1[2], l2[2], l3[2];
} kq_idx;

TILE_TGT static inline void kq_make_idx(kq_idx *ix)
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
 * vector g holds in dword lane r the bytes 4g..4g+3 of row r, by three levels of two-source
 * dword permutes: level 1 pairs rows 0-1 with 2-3 (out lane gl * 4 + r, g = 4h + gl), level 2
 * rows 0-3 with 4-7 (out lane gl2 * 8 + r), level 3 rows 0-7 with 8-15 (out lane r). */
TILE_TGT TILE_INLINE void kq_tr16x8(const kq_idx *ix, const __m512i z[8], uint8_t *out)
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

/* 32 bytes at offset off of rows 2k and 2k+1 of a block (zero for rows >= rows). */
TILE_TGT TILE_INLINE __m512i kq_pair(const uint8_t *w0, size_t row_bytes, int k, int rows, size_t off)
{
    __m256i a = 2 * k < rows ? _mm256_loadu_si256((const __m256i *)(const void *)(w0 + (size_t)(2 * k) * row_bytes + off))
                             : _mm256_setzero_si256();
    __m256i b = 2 * k + 1 < rows
                    ? _mm256_loadu_si256((const __m256i *)(const void *)(w0 + (size_t)(2 * k + 1) * row_bytes + off))
                    : _mm256_setzero_si256();
    return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
}

TILE_TGT TILE_INLINE __m512i kq_bcast(const uint8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

TILE_TGT TILE_INLINE float kq_f32(const uint8_t *p)
{
    float v;
    memcpy(&v, p, 4);
    return v;
}

#endif /* __x86_64__ */
#endif /* FORGE_CPU_TILE_AVX512_H */
