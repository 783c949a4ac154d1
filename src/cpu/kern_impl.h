/* kern_impl.h - internals shared by the files of the CPU kernel module (pool.c, cpu_features.c,
 * quantize.c, matmul*.c): the per-ISA kernel tables and the pool's scratch buffer. Not part of
 * any public API; only src/cpu/ includes it. */
#ifndef FORGE_CPU_KERN_IMPL_H
#define FORGE_CPU_KERN_IMPL_H

#include <stddef.h>
#include <stdint.h>

#include "cpu/kernels.h"
#include "quant/qtypes.h"

/* One matmul call, as the row kernels see it. Xc holds the activations converted to the weight
 * type's dot-product type (Q8_0 blocks, F16 or BF16), one row of xc_row_bytes per token; for F32
 * weights Xc is NULL and X is used directly. */
typedef struct kern_mm_args {
    const uint8_t *W;
    size_t w_row_bytes;
    int64_t n_out, n_in, n_tok;
    const float *X;
    const uint8_t *Xc;
    size_t xc_row_bytes;
    float *Y;
    forge_vec_dot_fn dot; /* generic kernels (types without tuned row kernels): the row dot */
    forge_vec_dot_x4_fn dot4; /* and 4 tokens at once, or NULL */
    forge_vec_dot_r4_fn dot_r4; /* and 4 rows at once, or NULL */
    /* The rows [0, n_out - n_out % group) of W in the kernel's repacked layout
     * (kern_mm_kernel.layout), or NULL: then the kernel reads W only. */
    const uint8_t *R;
} kern_mm_args;

/* Compute Y[t][o] for every token t and rows o in [r0, r1). work: this thread's scratch of
 * work_bytes_per_32 * n_in / 32 bytes (64-byte aligned), if the kernel asked for any. */
typedef void (*kern_mm_fn)(const kern_mm_args *a, int64_t r0, int64_t r1, void *work);
/* Convert one activation row of n floats (n a multiple of 32) to the dot-product type. */
typedef void (*kern_cvt_fn)(const float *x, void *dst, int64_t n);

typedef struct kern_mm_kernel {
    kern_mm_fn mm;              /* NULL: this ISA has no kernel for the type */
    kern_cvt_fn cvt;            /* NULL for F32 weights */
    size_t xc_row_bytes_per_32; /* bytes of converted activations per 32 inputs */
    size_t work_bytes_per_32;   /* per-thread scratch per 32 inputs (0: none) */
    /* Types without tuned row kernels run a generic row loop over the traits table's dot
     * product (dot) with activations in ggml's layout of the vec_dot_type: xc_block_bytes per
     * xc_block inputs (xc_block 0: xc_row_bytes_per_32 applies). */
    forge_vec_dot_fn dot;
    forge_vec_dot_x4_fn dot4;
    forge_vec_dot_r4_fn dot_r4;
    int64_t xc_block;
    size_t xc_block_bytes;
    int layout; /* the repacked layout mm reads when kern_mm_args.R is set (KERN_LAYOUT_*) */
} kern_mm_kernel;

/* A tuned kernel mm of a block type whose activations are the traits table's vec_dot_type
 * (kernels of matmul_kq_avx512.c, matmul_q32_avx512.c): mm with the table's converter and its
 * best one-row dot (kern_mm_args.dot) for what mm leaves to it; mm NULL if the table lacks them. */
kern_mm_kernel kern_mm_block_kernel(int wtype, kern_mm_fn mm, size_t work_bytes_per_32);
/* Per-ISA lookup; returns a kernel with mm == NULL if the type is not handled. */
kern_mm_kernel kern_mm_lookup_scalar(int wtype);
kern_mm_kernel kern_mm_lookup_avx2(int wtype);
kern_mm_kernel kern_mm_lookup_avx512(int wtype);
kern_mm_kernel kern_mm_lookup_neon(int wtype);
/* AVX-512 VNNI kernels of K-quant types (matmul_kq_avx512.c; kern_mm_lookup_avx512 uses it). */
kern_mm_kernel kern_mm_lookup_kq_avx512(int wtype);
/* Q8_K activations as forge_quantize_act_q8_k, byte for byte (AVX-512 F/BW; matmul_kq_avx512.c). */
void kern_cvt_q8_k_avx512(const float *x, void *y, int64_t n);
/* AVX-512 VNNI prompt tiles of Q4_1, Q5_0, Q5_1, IQ4_NL (matmul_q32_avx512.c). */
kern_mm_kernel kern_mm_lookup_q32_avx512(int wtype);
typedef enum kq_kind { KQ_Q2_K, KQ_Q3_K, KQ_Q4_K, KQ_Q5_K, KQ_Q6_K, KQ_IQ4_XS, KQ_TQ1_0, KQ_TQ2_0 } kq_kind;
/* Their decode kernels (matvec_kq_avx512.c): rows [r0, r1) of weights of that kind for at
 * most KQ_DECODE_MAX_TOK tokens; work: KQ_DECODE_WORK_PER_32 bytes per 32 inputs, 64-byte
 * aligned. Only for the kinds for which kern_kq_decode_has() says so (all of them, on a CPU with
 * VNNI, VBMI and GFNI). */
#define KQ_DECODE_MAX_TOK 15
#define KQ_DECODE_WORK_PER_32 (384 * KQ_DECODE_MAX_TOK / 8)
int kern_kq_decode_has(kq_kind kind);
void kern_kq_decode(const kern_mm_args *a, int64_t r0, int64_t r1, void *work, kq_kind kind);

/* Whether the build has kernels for an ISA at all (x86 files compile to stubs elsewhere). */
int kern_build_has_isa(kern_isa isa);

/* Converted activations, one row per token (n = n_in, nb = n / 32). Layouts are private to this
 * module and chosen for the SIMD kernels:
 *   for Q8_0 / Q4_0 weights (40 bytes per 32 inputs):
 *     int8_t  qs[n]      values quantized as ggml's CPU backend quantizes activations to Q8_0
 *     float   d[nb]      block scales, already rounded through fp16 (as ggml stores them)
 *     int32_t ncorr[nb]  -C * (sum of the block's qs), C = 8 for Q4_0 weights (the SIMD kernels
 *                        use nibbles unsigned, value + 8) and C = 128 for Q8_0 weights (they use
 *                        w ^ 0x80 = w + 128 as the unsigned operand of u8 x s8 dot products)
 *   for F16 weights: float[n], each value rounded to fp16 (128 bytes per 32)
 *   for BF16 weights: uint16_t bf16[n] (64 bytes per 32)
 * The scalar converters below are the reference; the SIMD converters must match bit for bit. */
#define KERN_XQ_BYTES_PER_32 40
void kern_cvt_q8_for_q4_0_scalar(const float *x, void *dst, int64_t n);
void kern_cvt_q8_for_q8_0_scalar(const float *x, void *dst, int64_t n);
void kern_cvt_f16_scalar(const float *x, void *dst, int64_t n);
void kern_cvt_bf16_scalar(const float *x, void *dst, int64_t n);

/* Pointers into a Q8 activation row of n inputs. */
static inline const float *kern_xq_d(const uint8_t *row, int64_t n)
{
    return (const float *)(const void *)(row + n);
}
static inline const int32_t *kern_xq_ncorr(const uint8_t *row, int64_t n)
{
    return (const int32_t *)(const void *)(row + n + n / 8);
}

/* CPU sub-features that the AVX-512 kernels use when present. */
int kern_cpu_has_avx512vnni(void);
int kern_cpu_has_avx512bf16(void);
int kern_cpu_has_avx512vbmi(void);
int kern_cpu_has_gfni(void);

/* The pool's scratch buffer, at least `bytes` long and 64-byte aligned; NULL if allocation fails.
 * Valid until the next call or kern_pool_free. pool must not be NULL. */
void *kern_pool_scratch(kern_pool *pool, size_t bytes);

/* Prompt kernels that stream weights row tile by row tile run the tokens in chunks of about
 * this many bytes of activations, so that a chunk stays in L2 while every row tile of a thread's
 * share runs it (the weights of a tile stay in L1); kern_tok_chunk: tokens per chunk for
 * row_bytes per token, a multiple of mult (the kernel's tokens per register tile). */
#define KERN_TOK_CHUNK_BYTES (128 * 1024)
static inline int64_t kern_tok_chunk(size_t row_bytes, int64_t mult)
{
    int64_t tc = (int64_t)(KERN_TOK_CHUNK_BYTES / (row_bytes ? row_bytes : 1));
    if (tc < mult) tc = mult;
    return tc - tc % mult;
}

/* Block layouts, as stored in GGUF files. */
#define KERN_QK 32
#define KERN_Q8_0_BYTES 34 /* fp16 d, 32 x int8 */
#define KERN_Q4_0_BYTES 18 /* fp16 d, 16 bytes of nibbles */

/* KERN_LAYOUT_Q4_0_X16 (kernels.h): rows per group; per pair of blocks 2 x 256 bytes of
 * nibbles, then 2 x 32 bytes of fp16 scales at offset 512. */
#define KERN_X16_ROWS 16
#define KERN_X16_PAIR_BYTES 576
#define KERN_X16_NIB_BYTES 256
#define KERN_X16_SCALE_OFF 512

static inline uint16_t kern_load_u16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static inline void kern_store_u16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v & 0xff);
    p[1] = (uint8_t)(v >> 8);
}

#endif /* FORGE_CPU_KERN_IMPL_H */
