/* kernels.h - CPU compute kernels: the thread pool and matrix multiplication by a weight of any
 * supported type. Each kernel has a scalar reference (the specification) and SIMD variants
 * (AVX2, AVX-512 incl. VNNI/BF16, NEON) chosen at run time; tests compare them by NMSE.
 * This module knows nothing about models; the CPU backend (src/cpu/backend_cpu.c) uses it. */
#ifndef FORGE_CPU_KERNELS_H
#define FORGE_CPU_KERNELS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "forge.h"

/* ---- thread pool: created once, threads sleep between jobs ------------------------------- */
typedef struct kern_pool kern_pool;

/* n_threads >= 1 (the calling thread counts as one). Owned by the caller. */
int kern_pool_create(int n_threads, kern_pool **out, forge_err *err);
void kern_pool_free(kern_pool *pool);
int kern_pool_size(const kern_pool *pool);
/* Run fn(arg, ith, nth) once for each ith = 0..nth-1 and return when every call has returned.
 * The caller runs ith 0, and any other ith whose worker has not started it when the caller is
 * done (so calls may run one after another on one thread: fn must never wait for another ith).
 * pool may be NULL: fn(arg, 0, 1). Not reentrant. */
void kern_pool_run(kern_pool *pool, void (*fn)(void *arg, int ith, int nth), void *arg);
/* Number of physical cores (default for -t). */
int kern_physical_cores(void);

/* ---- instruction-set selection --------------------------------------------------------- */
typedef enum kern_isa {
    KERN_ISA_SCALAR = 0,
    KERN_ISA_AVX2 = 1,   /* AVX2 + FMA + F16C */
    KERN_ISA_AVX512 = 2, /* AVX-512 F/BW/VL (+VNNI, +BF16 where present) */
    KERN_ISA_NEON = 3
} kern_isa;

kern_isa kern_isa_best(void);          /* the best this CPU supports */
kern_isa kern_isa_current(void);       /* the one in use (default: best) */
/* Select an ISA (tests use it to compare against scalar). FORGE_E_UNSUPPORTED if the CPU or the
 * build lacks it. Process-wide; not to be changed while kernels run. */
int kern_set_isa(kern_isa isa, forge_err *err);
const char *kern_isa_name(kern_isa isa);

/* ---- matrix multiplication ------------------------------------------------------------- */
/* True when kern_matmul handles weights of this type: F32, F16, BF16, Q8_0, Q4_0 (tuned row
 * kernels here) and every type whose traits (src/quant/qtypes.c) have a dot product (Q4_1,
 * Q5_0, Q5_1, Q2_K..Q6_K, IQ4_NL, IQ4_XS, TQ1_0, TQ2_0: generic row loop, activations quantized
 * to the type's vec_dot_type as ggml does: Q8_0, Q8_1 or Q8_K). */
bool kern_matmul_supported(int wtype);

/* Y[t * n_out + o] = sum_i W[o][i] * X[t * n_in + i]   for t < n_tok, o < n_out.
 * W: n_out rows of n_in elements of type wtype, rows contiguous (ggml_row_size bytes each), as
 * stored in a GGUF file. n_in must be a multiple of 32 and of the type's block size.
 * Numerics follow ggml's CPU backend, so results track llama.cpp: for Q8_0/Q4_0 weights the
 * activations are first quantized to Q8_0 blocks and each block's dot product is an integer
 * sum; for F16 weights activations are rounded to F16; for BF16 to BF16; F32 is plain float.
 * Work is split over the pool's threads by output rows. The pool owns a scratch buffer, so calls
 * on one pool must not overlap. */
int kern_matmul(kern_pool *pool, int wtype, const void *W, int64_t n_out, int64_t n_in,
                const float *X, int64_t n_tok, float *Y, forge_err *err);

/* One of several matmuls that share their input X (kern_matmul_multi). W and Y as for
 * kern_matmul: n_out rows of n_in elements of type wtype; Y is [n_tok][n_out]. Borrowed. */
typedef struct kern_mm_desc {
    int wtype;
    const void *W;
    int64_t n_out;
    float *Y;
} kern_mm_desc;

#define KERN_MM_MULTI_MAX 8 /* most matmuls one kern_matmul_multi call takes */

/* mats[i].Y = mats[i].W X for i < n_mats (1..KERN_MM_MULTI_MAX), all with n_in inputs: like
 * n_mats kern_matmul calls, with bit-identical results, but X is converted once per conversion
 * the weight types need (types may be mixed) and one pool job splits the output rows of all the
 * matrices over the threads (e.g. the Q, K and V projections of one layer). */
int kern_matmul_multi(kern_pool *pool, int n_mats, const kern_mm_desc *mats, int64_t n_in,
                      const float *X, int64_t n_tok, forge_err *err);

/* A copy of a matrix's whole row groups in a repacked layout (kern_repack below): R borrowed,
 * NULL for none. */
typedef struct kern_mm_packed {
    const void *R;
    int layout;
} kern_mm_packed;

/* kern_matmul_multi with packed[i] (packed may be NULL) beside mats[i]: a copy is read instead
 * of W where it is the layout the current ISA's kernel reads (kern_repack_layout), W elsewhere
 * (other ISAs, the rows past the last whole group). Same bits either way. */
int kern_matmul_packed(kern_pool *pool, int n_mats, const kern_mm_desc *mats,
                       const kern_mm_packed *packed, int64_t n_in, const float *X, int64_t n_tok,
                       forge_err *err);

/* ---- load-time repacking -----------------------------------------------------------------
 * A weight layout other than the file's, read faster by one ISA's kernels (the mapping stays
 * untouched; the CPU backend keeps one copy per model). KERN_LAYOUT_Q4_0_X16 (decode and prompt
 * of Q4_0 on AVX-512 VNNI, and on AVX2, which reads a 32-byte half, 8 rows, at a time): rows in
 * groups of 16, each group one 64-byte aligned region of ceil(nb / 2) * 576 bytes (nb = n_in /
 * 32 blocks): per pair of blocks b, b+1 the nibbles of block b (4 vectors of 64 bytes: vector k
 * holds in dword lane r the nibble bytes 4k..4k+3 of row r), those of block b+1, then the 16
 * fp16 scales of block b (row order) and the 16 of block b+1 (for an odd nb the last pair has
 * block b only, and 32 bytes of zero padding). The same bytes as the file's blocks, so the copy
 * is as large as the rows it holds. */
enum { KERN_LAYOUT_FILE = 0, KERN_LAYOUT_Q4_0_X16 = 1 };

/* The layout the current ISA's kernel for wtype reads; KERN_LAYOUT_FILE when it has none (the
 * one place that decides it is the per-ISA kernel lookup). */
int kern_repack_layout(int wtype);
/* Rows per group of a layout (1 for KERN_LAYOUT_FILE). */
int64_t kern_repack_group_rows(int layout);
/* Bytes of one group of rows of n_in inputs, and of the copy of n_out rows (whole groups only:
 * n_out rounded down to a multiple of the group); 0 for KERN_LAYOUT_FILE or a bad shape. */
size_t kern_repack_group_bytes(int layout, int64_t n_in);
size_t kern_repack_bytes(int layout, int64_t n_out, int64_t n_in);
/* Write the copy of W (n_out rows of n_in inputs, the file's layout, type wtype) in layout to
 * dst (kern_repack_bytes long, 64-byte aligned, owned by the caller). Work is split over the
 * pool's threads (pool may be NULL). FORGE_E_INVALID if the layout is not one of wtype's or the
 * shape does not fit it. */
int kern_repack(kern_pool *pool, int layout, int wtype, const void *W, int64_t n_out, int64_t n_in,
                void *dst, forge_err *err);

/* Reference quantizers (ggml's reference rounding), used by `forge synth` and the tests:
 * n a multiple of 32. */
void kern_quantize_row_q8_0(const float *x, void *dst, int64_t n);
void kern_quantize_row_q4_0(const float *x, void *dst, int64_t n);

#endif /* FORGE_CPU_KERNELS_H */
