/* qtypes.h - the per-type traits table: one place where a ggml tensor type is described (name,
 * block size and bytes, scalar dequantization, quantization, the activation type its dot product
 * wants, the scalar and SIMD dot products, whether the GPU backend has kernels for it).
 * Block layouts and numerics follow ggml (ggml-common.h, ggml-quants.c); the dot products take
 * activations quantized the way ggml's CPU backend does (vec_dot_type), so results track
 * llama.cpp. Everything here is constant; nothing is owned. Internal to libforge (src/ only). */
#ifndef FORGE_QUANT_QTYPES_H
#define FORGE_QUANT_QTYPES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "forge_gguf.h"

#define FORGE_QK_K 256 /* elements of a K-quant super-block */

/* Converts n elements (a multiple of the block size) from the packed type to float32. */
typedef void (*forge_dequant_row_fn)(const void *x, float *y, int64_t n);
/* Packs n floats (a multiple of the block size) into blocks of the type. */
typedef void (*forge_quant_row_fn)(const float *x, void *y, int64_t n);
/* Dot product of one weight row of n elements with one activation row already quantized to the
 * type's vec_dot_type (ggml's block layout of that type): returns the sum. */
typedef float (*forge_vec_dot_fn)(int64_t n, const void *w, const void *xq);
/* The same for 4 activation rows at once (xq, xq + stride, ...): out[k] is bit-identical to
 * vec_dot(n, w, xq + k * stride); the weight row is unpacked once for the 4 (prompts). */
typedef void (*forge_vec_dot_x4_fn)(int64_t n, const void *w, const void *xq, size_t stride, float out[4]);
/* 4 weight rows (w, w + w_stride, ...) times one activation row: out[k] is bit-identical to
 * vec_dot(n, w + k * w_stride, xq); the work around the integer sums is shared (decode). */
typedef void (*forge_vec_dot_r4_fn)(int64_t n, const void *w, size_t w_stride, const void *xq, float out[4]);

typedef struct forge_type_traits {
    const char *name;
    int64_t block_size;  /* elements per block; 0 marks a removed/unused id */
    size_t block_bytes;
    forge_dequant_row_fn dequantize_row; /* NULL: not supported yet */
    /* Reference quantizer, bytes as llama-quantize writes them (src/quant/quantize*.c; what
     * forge quantize and quant_row_function use); NULL for types without one (TQ1_0, TQ2_0, IQ2..).
     * The activation quantizers kern_matmul uses for Q8_0/Q4_0 weights stay in src/cpu/. */
    forge_quant_row_fn quantize_row;
    int vec_dot_type;               /* GGML_TYPE_Q8_0, Q8_1, Q8_K, F16, BF16, F32; -1: none */
    forge_quant_row_fn quantize_act; /* float -> vec_dot_type as ggml's CPU backend does it */
    forge_vec_dot_fn vec_dot;        /* scalar reference dot product; NULL: none */
    forge_vec_dot_fn vec_dot_avx2;   /* NULL where there is no AVX2 version (or no x86 build) */
    forge_vec_dot_fn vec_dot_avx512;
    forge_vec_dot_x4_fn vec_dot_x4_avx2; /* NULL: 4 calls of the single dot */
    forge_vec_dot_r4_fn vec_dot_r4_avx2; /* NULL: 4 calls of the single dot */
    /* The CPU kernel module (src/cpu/matmul*.c) has tuned row kernels of its own for this type
     * (F32/F16/BF16/Q8_0/Q4_0); vec_dot above is then unused by kern_matmul. */
    bool cpu_tuned;
    bool gpu; /* the GPU backend has matvec/GEMM kernels for it */
} forge_type_traits;

/* The traits of type t, or NULL for an unknown or unused id. */
const forge_type_traits *forge_type_traits_get(int t);

/* ---- dequantization (src/quant/dequant.c) -------------------------------------------------- */
void forge_dequant_row_f32(const void *x, float *y, int64_t n);
void forge_dequant_row_f16(const void *x, float *y, int64_t n);
void forge_dequant_row_bf16(const void *x, float *y, int64_t n);
void forge_dequant_row_q4_0(const void *x, float *y, int64_t n);
void forge_dequant_row_q4_1(const void *x, float *y, int64_t n);
void forge_dequant_row_q5_0(const void *x, float *y, int64_t n);
void forge_dequant_row_q5_1(const void *x, float *y, int64_t n);
void forge_dequant_row_q8_0(const void *x, float *y, int64_t n);
void forge_dequant_row_q2_k(const void *x, float *y, int64_t n);
void forge_dequant_row_q3_k(const void *x, float *y, int64_t n);
void forge_dequant_row_q4_k(const void *x, float *y, int64_t n);
void forge_dequant_row_q5_k(const void *x, float *y, int64_t n);
void forge_dequant_row_q6_k(const void *x, float *y, int64_t n);
void forge_dequant_row_iq4_nl(const void *x, float *y, int64_t n);
void forge_dequant_row_iq4_xs(const void *x, float *y, int64_t n);
void forge_dequant_row_tq1_0(const void *x, float *y, int64_t n);
void forge_dequant_row_tq2_0(const void *x, float *y, int64_t n);

/* ---- activation quantizers and scalar dot products (src/quant/vecdot.c) ------------------- */
/* ggml block layouts: Q8_0 {fp16 d; int8 qs[32]} 34 bytes; Q8_1 {fp16 d; fp16 s = d*sum(qs);
 * int8 qs[32]} 36 bytes; Q8_K {float d; int8 qs[256]; int16 bsums[16]} 292 bytes. */
#define FORGE_Q8_0_BYTES 34
#define FORGE_Q8_1_BYTES 36
#define FORGE_Q8_K_BYTES 292
void forge_quantize_act_q8_0(const float *x, void *y, int64_t n);
void forge_quantize_act_q8_1(const float *x, void *y, int64_t n);
void forge_quantize_act_q8_k(const float *x, void *y, int64_t n);

float forge_vec_dot_q4_1_q8_1(int64_t n, const void *w, const void *xq);
float forge_vec_dot_q5_0_q8_0(int64_t n, const void *w, const void *xq);
float forge_vec_dot_q5_1_q8_1(int64_t n, const void *w, const void *xq);
float forge_vec_dot_q2_k_q8_k(int64_t n, const void *w, const void *xq);
float forge_vec_dot_q3_k_q8_k(int64_t n, const void *w, const void *xq);
float forge_vec_dot_q4_k_q8_k(int64_t n, const void *w, const void *xq);
float forge_vec_dot_q5_k_q8_k(int64_t n, const void *w, const void *xq);
float forge_vec_dot_q6_k_q8_k(int64_t n, const void *w, const void *xq);
float forge_vec_dot_iq4_nl_q8_0(int64_t n, const void *w, const void *xq);
float forge_vec_dot_iq4_xs_q8_k(int64_t n, const void *w, const void *xq);
float forge_vec_dot_tq1_0_q8_k(int64_t n, const void *w, const void *xq);
float forge_vec_dot_tq2_0_q8_k(int64_t n, const void *w, const void *xq);

/* ---- SIMD dot products (src/cpu/vecdot_avx2.c, x86-64 builds only) --------------------------- */
#if defined(__x86_64__)
float forge_vec_dot_q4_k_q8_k_avx2(int64_t n, const void *w, const void *xq);
float forge_vec_dot_q6_k_q8_k_avx2(int64_t n, const void *w, const void *xq);
float forge_vec_dot_q4_k_q8_k_avx512(int64_t n, const void *w, const void *xq);
float forge_vec_dot_q6_k_q8_k_avx512(int64_t n, const void *w, const void *xq);
void forge_vec_dot_q4_k_q8_k_x4_avx2(int64_t n, const void *w, const void *xq, size_t stride, float out[4]);
void forge_vec_dot_q6_k_q8_k_x4_avx2(int64_t n, const void *w, const void *xq, size_t stride, float out[4]);
void forge_vec_dot_q4_k_q8_k_r4_avx2(int64_t n, const void *w, size_t w_stride, const void *xq, float out[4]);
void forge_vec_dot_q6_k_q8_k_r4_avx2(int64_t n, const void *w, size_t w_stride, const void *xq, float out[4]);
float forge_vec_dot_q5_k_q8_k_avx2(int64_t n, const void *w, const void *xq);
float forge_vec_dot_q3_k_q8_k_avx2(int64_t n, const void *w, const void *xq);
float forge_vec_dot_q2_k_q8_k_avx2(int64_t n, const void *w, const void *xq);
float forge_vec_dot_iq4_xs_q8_k_avx2(int64_t n, const void *w, const void *xq);
float forge_vec_dot_iq4_nl_q8_0_avx2(int64_t n, const void *w, const void *xq);
float forge_vec_dot_q5_0_q8_0_avx2(int64_t n, const void *w, const void *xq);
float forge_vec_dot_q4_1_q8_1_avx2(int64_t n, const void *w, const void *xq);
float forge_vec_dot_q5_1_q8_1_avx2(int64_t n, const void *w, const void *xq);
#define FORGE_X86(f) f
#else
#define FORGE_X86(f) NULL
#endif

/* Shared helpers for the K-quant layouts. */
static inline uint16_t forge_qt_u16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

/* The 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K block's 12 scale bytes. */
static inline void forge_k4_scale_min(int j, const uint8_t *q, uint8_t *sc, uint8_t *m)
{
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

/* The 16 signed 6-bit scales (value - 32 applied) of a Q3_K block's 12 scale bytes. */
static inline void forge_k3_scales(const uint8_t *s, int8_t out[16])
{
    for (int j = 0; j < 16; j++) {
        int lo = j < 8 ? (s[j] & 0xF) : (s[j - 8] >> 4);
        int hi = (s[8 + (j & 3)] >> (2 * (j >> 2))) & 3;
        out[j] = (int8_t)((lo | (hi << 4)) - 32);
    }
}

extern const int8_t forge_iq4nl_values[16];

#endif /* FORGE_QUANT_QTYPES_H */
