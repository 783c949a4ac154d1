/* gpu_ops.h - the C interface of libforge_cuda.so (CUDA, or HIP through gpu_vendor.h): device
 * memory, streams, events, graphs, and the decode kernels with thin launchers. Plain C: no CUDA
 * or HIP header is needed to include it, so .c code (the GPU backend, tests, benchmarks) uses it
 * and the CPU-only forge binary never links a GPU runtime; the engine dlopens the library and
 * looks up forge_gpu_get_api() (gpu_api below), tests may link it directly.
 *
 * Conventions:
 *   - Every function returning int returns FORGE_OK or a negative FORGE_E_* code and writes a
 *     message to err (may be NULL). GPU runtime failures are FORGE_E_DEVICE (FORGE_E_NOMEM for
 *     out-of-memory); bad arguments FORGE_E_INVALID; types a kernel lacks FORGE_E_UNSUPPORTED.
 *   - Launchers only enqueue work on the caller's stream and return; nothing waits unless the
 *     environment variable FORGE_GPU_SYNC=1 is set, which synchronises and checks after every
 *     launch so that an execution error is reported against the kernel that caused it.
 *   - Pointers named d_* are device memory owned by the caller; the launchers never keep them.
 *     A buffer may be freed only in stream order (gpu_free_async on the stream that used it) or
 *     after the work that uses it is known to be done (stream/event synchronisation).
 *   - Weight types are ggml type ids (include/forge_gguf.h): F32, F16, BF16, Q8_0, Q4_0, and
 *     the block types of gpu_quant.cuh (Q4_1, Q5_0, Q5_1, IQ4_NL, Q2_K..Q6_K, IQ4_XS, TQ1_0,
 *     TQ2_0).
 *
 * Device weight layout. F32/F16/BF16 matrices are stored as in GGUF (rows contiguous). Q8_0 and
 * Q4_0 matrices are re-packed on the device by gpu_weight_convert() from the GGUF block layout
 * (block = fp16 d + quants) into two planes, so that every quant load is 16 bytes and aligned:
 *     quants plane:  n_rows * n_in bytes (Q8_0, int8) or n_rows * n_in/2 bytes (Q4_0, the 16
 *                    nibble bytes of each block in GGUF order: low nibbles = elements 0..15,
 *                    high nibbles = 16..31, value = nibble - 8)
 *     scales plane:  at gpu_weight_scales_offset(), n_rows * n_in/32 fp16 block scales (the
 *                    plane padded to a multiple of 16 bytes)
 * The other block types keep their GGUF blocks, split in the same way (gpu_quant.cuh): a body
 * plane (the part of each block that is a multiple of 16 bytes: quants, packed high bits,
 * sub-scales) and, at gpu_weight_scales_offset(), a head plane (the remaining bytes: fp16
 * scales and mins), so the device holds exactly the file's bytes, still packed.
 * The total size is gpu_weight_bytes(). Matvec and embedding lookup read this layout. */
#ifndef FORGE_GPU_OPS_H
#define FORGE_GPU_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "forge.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct gpu_stream gpu_stream; /* a cudaStream_t / hipStream_t; NULL = legacy default */
typedef struct gpu_event gpu_event;   /* a cudaEvent_t / hipEvent_t */
typedef struct gpu_graph gpu_graph;   /* an instantiated graph (cudaGraphExec_t) */
typedef struct gpu_blas gpu_blas;     /* a BLAS handle (cuBLAS); unavailable in HIP builds */

/* ---- devices -------------------------------------------------------------------------------- */
typedef struct gpu_device_info {
    char name[256];
    int vendor_amd;         /* 0 NVIDIA (CUDA build), 1 AMD (HIP build) */
    int cc_major, cc_minor; /* compute capability (CUDA); gfx major/minor (HIP) */
    int sm_count;           /* multiprocessors / compute units */
    int warp_size;          /* 32, or 64 on CDNA */
    size_t total_mem;       /* bytes */
    size_t l2_bytes;
    double mem_bw_peak; /* bytes/s from clock and bus width; 0 when the runtime does not say */
} gpu_device_info;

int gpu_device_count(int *n, forge_err *err);
int gpu_device_info_get(int dev, gpu_device_info *out, forge_err *err);
int gpu_set_device(int dev, forge_err *err);
/* Waits for all work on the device; for tests and shutdown, never in the decode loop. */
int gpu_device_sync(forge_err *err);
/* Name of the backend this library was built for: "CUDA" or "HIP". */
const char *gpu_backend_name(void);

/* ---- memory --------------------------------------------------------------------------------- */
int gpu_malloc(void **d_out, size_t bytes, forge_err *err);
/* Synchronous (relies on cudaFree waiting for the device); NULL allowed. For test programs
 * only: the engine allocates and frees everything in stream order (below). */
void gpu_free(void *d_ptr);
/* Stream-ordered allocation and release (memory pools): the memory may be reused by work
 * enqueued after the free, never by work before it. A library built with
 * -DFORGE_GPU_BROKEN_FREE (`make gpu GPU_BROKEN_FREE=1`, tests only) releases at once instead,
 * so that tests/gpu/test_gpu_free_race.c can show it catches the bug. */
int gpu_malloc_async(void **d_out, size_t bytes, gpu_stream *s, forge_err *err);
int gpu_free_async(void *d_ptr, gpu_stream *s, forge_err *err); /* NULL d_ptr allowed */
int gpu_host_alloc(void **h_out, size_t bytes, forge_err *err); /* pinned host memory */
void gpu_host_free(void *h_ptr);
int gpu_memcpy_h2d(void *d_dst, const void *h_src, size_t bytes, gpu_stream *s, forge_err *err);
int gpu_memcpy_d2h(void *h_dst, const void *d_src, size_t bytes, gpu_stream *s, forge_err *err);
int gpu_memcpy_d2d(void *d_dst, const void *d_src, size_t bytes, gpu_stream *s, forge_err *err);
int gpu_memset(void *d_dst, int byte, size_t bytes, gpu_stream *s, forge_err *err);

/* Device-to-device copy by a kernel (16-byte accesses when both ends and the size allow it,
 * else the runtime's copy). Buffers must not overlap. */
int gpu_copy(void *d_dst, const void *d_src, size_t bytes, gpu_stream *s, forge_err *err);

/* ---- streams, events, graphs ----------------------------------------------------------------- */
int gpu_stream_create(gpu_stream **out, forge_err *err); /* non-blocking stream */
/* Returns at once; work already enqueued still completes (runtime semantics). NULL allowed. */
void gpu_stream_destroy(gpu_stream *s);
int gpu_stream_sync(gpu_stream *s, forge_err *err);
int gpu_event_create(gpu_event **out, int timing, forge_err *err);
void gpu_event_destroy(gpu_event *e);
int gpu_event_record(gpu_event *e, gpu_stream *s, forge_err *err);
int gpu_event_sync(gpu_event *e, forge_err *err);
int gpu_stream_wait_event(gpu_stream *s, gpu_event *e, forge_err *err);
int gpu_event_elapsed_ms(gpu_event *start, gpu_event *stop, float *ms, forge_err *err);
/* Capture everything enqueued on s between begin and end into a graph; replay with launch. */
int gpu_graph_begin(gpu_stream *s, forge_err *err);
int gpu_graph_end(gpu_stream *s, gpu_graph **out, forge_err *err);
int gpu_graph_launch(gpu_graph *g, gpu_stream *s, forge_err *err);
void gpu_graph_free(gpu_graph *g);

/* ---- weights --------------------------------------------------------------------------------- */
/* True when gpu_matvec handles this weight type. */
int gpu_matvec_supported(int wtype);
/* Device bytes of an n_rows x n_in matrix in the device layout (0: bad type or shape). */
size_t gpu_weight_bytes(int wtype, int64_t n_rows, int64_t n_in);
/* Byte offset of the scales plane of a Q8_0/Q4_0 matrix (0 for plain types). */
size_t gpu_weight_scales_offset(int wtype, int64_t n_rows, int64_t n_in);
/* Convert a matrix already copied to the device in GGUF layout (d_src, ggml_row_size(wtype,n_in)
 * bytes per row) into the device layout at d_dst (gpu_weight_bytes). For F32/F16/BF16 this is a
 * copy. d_src and d_dst must not overlap. */
int gpu_weight_convert(int wtype, const void *d_src, void *d_dst, int64_t n_rows, int64_t n_in,
                       gpu_stream *s, forge_err *err);

/* ---- decode kernels -------------------------------------------------------------------------- */
/* Activations quantized for the Q8_0/Q4_0 matvec (ggml's Q8_0 numerics, as the CPU's
 * kern_matmul): gpu_act_q8_bytes(n_in) bytes of scratch; one quantization serves every matvec
 * that reads the same x (Q/K/V, gate/up). n_in a multiple of 32. */
size_t gpu_act_q8_bytes(int64_t n_in);
int gpu_act_quantize(const float *d_x, int64_t n_in, void *d_xq, gpu_stream *s, forge_err *err);

/* d_y[o] = sum_i W[o][i] * x[i], o < n_out. W in the device layout. F32/F16/BF16 weights use the
 * float activations d_x (fp32 accumulation); Q8_0/Q4_0 weights use d_xq, the result of
 * gpu_act_quantize(d_x) (integer dot products per block, like the CPU), and ignore d_x.
 * d_y must not overlap the inputs. */
int gpu_matvec(int wtype, const void *d_w, int64_t n_out, int64_t n_in, const float *d_x,
               const void *d_xq, float *d_y, gpu_stream *s, forge_err *err);

/* y[r][i] = x[r][i] / sqrt(mean_i(x[r][i]^2) + eps) * w[i], for n_rows rows of n. In place
 * (d_y == d_x) allowed. */
int gpu_rmsnorm(const float *d_x, const float *d_w, float *d_y, int64_t n, int64_t n_rows,
                float eps, gpu_stream *s, forge_err *err);

/* Rotary embedding in place on d_x = [n_tok][n_heads][head_dim] floats; token t is at position
 * d_pos[t] (device int32, so that a captured graph reads the current positions). Rotates the
 * first n_dims (even, <= head_dim) dims of each head; NORM rotates adjacent pairs (2i, 2i+1), NEOX
 * the halves (i, i + n_dims/2). Angle of pair i, as ggml: freq_scale * pos * theta_scale^i /
 * d_freq_factors[i] (the division only when non-NULL), theta_scale = powf(base, -2/n_dims). */
enum { GPU_ROPE_NORM = 0, GPU_ROPE_NEOX = 2 };
int gpu_rope(float *d_x, int64_t n_tok, int64_t n_heads, int64_t head_dim, int64_t n_dims, int mode,
             const int32_t *d_pos, float freq_base, float freq_scale, const float *d_freq_factors,
             gpu_stream *s, forge_err *err);

/* d_out[i] = silu(gate[i]) * up[i]; silu(g) = g / (1 + exp(-g)). d_out may alias gate or up. */
int gpu_swiglu(const float *d_gate, const float *d_up, float *d_out, int64_t n, gpu_stream *s,
               forge_err *err);
/* gpu_rmsnorm / gpu_swiglu (n values in all) with, in the same launch, the result's Q8_0 blocks
 * in d_xq exactly as gpu_act_quantize(d_y, n_rows * n) writes them: a batch's next products
 * read them without a launch of their own. n % 32 == 0; buffers 16-byte aligned; gpu_rmsnorm_q8
 * not in place. */
int gpu_rmsnorm_q8(const float *d_x, const float *d_w, float *d_y, int64_t n, int64_t n_rows,
                   float eps, void *d_xq, gpu_stream *s, forge_err *err);
int gpu_swiglu_q8(const float *d_gate, const float *d_up, float *d_out, int64_t n, void *d_xq,
                  gpu_stream *s, forge_err *err);
/* d_y[i] = d_x[i] rounded to wtype (F16 or BF16, to nearest even) and back to float: the
 * activations ggml's CPU kernels multiply F16/BF16 weights with. d_y may be d_x. */
int gpu_round_act(const float *d_x, float *d_y, int64_t n, int wtype, gpu_stream *s,
                  forge_err *err);
/* d_out[i] = a[i] + b[i]; d_out may alias a or b. */
int gpu_add(const float *d_a, const float *d_b, float *d_out, int64_t n, gpu_stream *s,
            forge_err *err);

/* d_out[t][:] = row d_ids[t] of the n_vocab x n_embd table (device layout, F32/F16/BF16/Q8_0/
 * Q4_0) as floats, for t < n_tokens. An id outside [0, n_vocab) gives a row of NaN (the caller
 * validates ids; NaN makes a slip visible). */
int gpu_embed(int wtype, const void *d_table, int64_t n_vocab, int64_t n_embd, const int32_t *d_ids,
              int64_t n_tokens, float *d_out, gpu_stream *s, forge_err *err);

/* *d_idx = the smallest i with d_x[i] maximal (greedy sampling); NaN entries never win; all-NaN
 * gives 0. */
int gpu_argmax(const float *d_x, int64_t n, int32_t *d_idx, gpu_stream *s, forge_err *err);
/* The same over many blocks (large vocabularies): d_scratch holds gpu_argmax_scratch_bytes(),
 * zeroed once before the first call (the kernel leaves it zeroed again); one call at a time per
 * scratch (it is the calls' meeting point). */
#define GPU_ARGMAX_MAX_BLOCKS 128
size_t gpu_argmax_scratch_bytes(void);
int gpu_argmax_ex(const float *d_x, int64_t n, void *d_scratch, int32_t *d_idx, gpu_stream *s,
                  forge_err *err);

/* Attention for one query token over a KV cache (flash decoding, split over positions).
 *   d_q:   n_head x head_dim floats;  d_out: n_head x head_dim floats.
 *   K/V:   element type kv_type (F32 or F16); element (pos, kv_head, d) at
 *          base + pos * pos_stride + kv_head * head_stride + d (strides in elements), so both
 *          [pos][head][d] and [head][pos][d] caches work.
 *   n_kv = *d_pos + 1 positions are attended (device int32, like gpu_rope); max_kv bounds n_kv
 *   and sizes the launch (a captured graph stays valid as the position grows).
 *   GQA: query head h reads kv head h / (n_head / n_kv_head).
 *   scores = scale * q.k; softmax over positions; out = sum softmax * v.
 *   softcap > 0: scores become softcap * tanh(scores / softcap) (as the CPU: times 1/softcap,
 *   tanh, times softcap) before the softmax (Gemma 2). window > 0: the query at position p
 *   attends p - window + 1 .. p only (sliding window; earlier positions are never read). Both
 *   0 (a zero-initialised struct): plain causal attention. They apply to gpu_attention,
 *   gpu_attention_batch (each query its own window) and gpu_attention_prompt(_paged).
 *   d_scratch: gpu_attn_scratch_bytes(n_head, head_dim, max_kv) bytes. head_dim <= 256. */
size_t gpu_attn_scratch_bytes(int64_t n_head, int64_t head_dim, int64_t max_kv);
typedef struct gpu_attn_args {
    const float *d_q;
    const void *d_k, *d_v;
    int kv_type;
    int64_t pos_stride, head_stride;
    int64_t n_head, n_kv_head, head_dim;
    const int32_t *d_pos;
    int64_t max_kv;
    float scale;
    void *d_scratch;
    float *d_out;
    float softcap; /* 0: off */
    int32_t window; /* 0: all positions */
} gpu_attn_args;
int gpu_attention(const gpu_attn_args *a, gpu_stream *s, forge_err *err);
/* n_q queries in one launch (a causal prompt): query i reads d_q + i*q_stride, writes
 * d_out + i*out_stride, attends *(d_pos + i) + 1 positions (<= max_kv). d_scratch holds
 * scratch_bytes; at least n_q * n_head * (head_dim + 2) floats (fewer splits when it is small). */
int gpu_attention_batch(const gpu_attn_args *a, int64_t n_q, int64_t q_stride, int64_t out_stride,
                        size_t scratch_bytes, gpu_stream *s, forge_err *err);

/* ---- batched matrix product (prefill) -------------------------------------------------------- */
/* Y[t][o] = sum_i W[o][i] * X[t][i] for t < n_tok, through cuBLAS with fp32 accumulation.
 * W: F32, F16 or BF16 (device layout); X, Y: fp32. d_xc: scratch of n_tok * n_in * 2 bytes
 * (activations converted to F16/BF16; unused for F32). HIP builds return FORGE_E_UNSUPPORTED:
 * hipBLAS is not packaged in Debian 12. */
int gpu_blas_create(gpu_blas **out, forge_err *err);
void gpu_blas_free(gpu_blas *b);
int gpu_gemm(gpu_blas *b, int wtype, const void *d_w, int64_t n_out, int64_t n_in, const float *d_x,
             int64_t n_tok, void *d_xc, float *d_y, gpu_stream *s, forge_err *err);

/* ---- prompt-pass helpers (the backend's n_tok > 1 path) ----------------------------------- */
/* Free and total memory of the current device, in bytes. */
int gpu_mem_info(size_t *free_bytes, size_t *total_bytes, forge_err *err);
/* Dequantize a Q8_0/Q4_0 matrix in the device layout to fp16 rows (n_rows * n_in halfs at d_out),
 * so that gpu_gemm can multiply it as an F16 weight. */
int gpu_weight_to_f16(int wtype, const void *d_w, int64_t n_rows, int64_t n_in, void *d_out,
                      gpu_stream *s, forge_err *err);
/* d_y[r][i] += d_b[i] for r < n_rows, i < n (bias broadcast over tokens). */
int gpu_add_rows(float *d_y, const float *d_b, int64_t n_rows, int64_t n, gpu_stream *s,
                 forge_err *err);
/* d_dst[i] = d_src[i] converted to dst_type (F32: a copy; F16: round to nearest even), i < n.
 * The KV-cache store. */
int gpu_store(const float *d_src, void *d_dst, int dst_type, int64_t n, gpu_stream *s,
              forge_err *err);
/* The same store at a position read on the device: d_dst + *d_pos * pos_stride elements (of
 * dst_type) receives the n values, so that a captured decode step (a graph) writes the KV row of
 * the current position. The caller guarantees *d_pos * pos_stride + n fits the buffer. */
int gpu_store_at(const float *d_src, void *d_dst, int dst_type, int64_t n, const int32_t *d_pos,
                 int64_t pos_stride, gpu_stream *s, forge_err *err);

/* ---- fused decode matvec (one token; gpu_fused.cu) ----------------------------------------- */
/* y_i = W_i h for up to 3 matrices that share one input row h, in one launch (Q/K/V, gate/up),
 * where h is made from the input row x by the kernel itself:
 *   in_mode GPU_FMV_IN_PLAIN:   h = x
 *   in_mode GPU_FMV_IN_RMSNORM: h = x / sqrt(mean(x^2) + eps) * d_norm   (RMSNorm, F32 weights)
 * and for Q8_0/Q4_0 weights h is quantized to Q8_0 blocks (the numerics of gpu_act_quantize)
 * inside each thread block, so no separate norm or quantize kernel runs. Results:
 *   out_mode GPU_FMV_OUT_STORE:  y_i = W_i h (+ d_bias_i when non-NULL)
 *   out_mode GPU_FMV_OUT_ADD:    y_i += W_i h (the residual add; y_i must not alias x)
 *   out_mode GPU_FMV_OUT_SWIGLU: n_mat == 2, same n_out: y_0 = silu(W_0 h) * (W_1 h)
 * Matrices of one call must share the weight type and n_in (n_in a multiple of 32 for Q8_0/
 * Q4_0, of 8 for F16/BF16, of 4 for F32); outputs must not overlap x or each other. Launched
 * with programmatic dependent launch where the device has it (the weight loads of the first
 * chunks start before the previous kernel ends; see gpu_pdl_wait in gpu_vendor.h). */
enum { GPU_FMV_IN_PLAIN = 0, GPU_FMV_IN_RMSNORM = 1 };
enum { GPU_FMV_OUT_STORE = 0, GPU_FMV_OUT_ADD = 1, GPU_FMV_OUT_SWIGLU = 2 };
#define GPU_FMV_MAX_MATS 3
typedef struct gpu_fmv_mat {
    const void *d_w;     /* device layout (gpu_weight_convert) */
    int64_t n_out;       /* rows */
    const float *d_bias; /* n_out floats or NULL (GPU_FMV_OUT_STORE only) */
    float *d_y;          /* n_out floats */
} gpu_fmv_mat;
typedef struct gpu_fmv_args {
    int wtype; /* ggml type of every matrix */
    int n_mat; /* 1..GPU_FMV_MAX_MATS */
    gpu_fmv_mat mat[GPU_FMV_MAX_MATS];
    int64_t n_in;
    const float *d_x;    /* the input row, n_in floats */
    int in_mode;         /* GPU_FMV_IN_* */
    const float *d_norm; /* GPU_FMV_IN_RMSNORM: n_in F32 weights */
    float eps;
    int out_mode; /* GPU_FMV_OUT_* */
    int round_x;  /* F16/BF16 weights: h rounded to the weight type first (ggml's CPU numerics) */
    /* 1: every output gets exactly the bits of the separate ops (gpu_rmsnorm or the plain
     * input, gpu_act_quantize or gpu_round_act, gpu_matvec per matrix, then the bias add,
     * gpu_add or gpu_swiglu), which are the bits gpu_matvec_multi gives the row in any batch:
     * the fused decode path of a batch of one stays batch invariant. Only where
     * gpu_fused_matvec_invariant says so (else FORGE_E_UNSUPPORTED). 0: the layout fastest for
     * the shape, equal to the separate ops up to the order of float sums. */
    int invariant;
} gpu_fmv_args;
/* True when gpu_fused_matvec handles this type and row length. */
int gpu_fused_matvec_supported(int wtype, int64_t n_in);
/* True when gpu_fused_matvec can take these arguments (type, n_in, n_mat, the matrices' n_out,
 * out_mode read) with invariant = 1: F32, F16, BF16, Q8_0, Q4_0 whose matrices gpu_matvec splits
 * alike. */
int gpu_fused_matvec_invariant(const gpu_fmv_args *a);
int gpu_fused_matvec(const gpu_fmv_args *a, gpu_stream *s, forge_err *err);

/* ---- Q/K norm, RoPE and the KV-cache store in one launch (gpu_ops.cu) -------------------- */
/* RoPE parameters as ggml's rope (with YaRN): theta_i = pos * freq_base^(-2i/n_dims) (divided
 * by d_freq_factors[i] when non-NULL); ext_factor == 0: theta *= freq_scale, cos/sin scaled by
 * attn_factor; ext_factor != 0: ggml's rope_yarn ramp between corr_dims[0] and corr_dims[1]
 * (mscale = attn_factor * (1 + 0.1 ln(1/freq_scale))). mode GPU_ROPE_NORM / GPU_ROPE_NEOX. */
typedef struct gpu_rope_params {
    int mode;
    int64_t n_dims; /* rotated dims per head, even, <= head_dim */
    float freq_base, freq_scale;
    const float *d_freq_factors; /* n_dims/2 floats or NULL */
    float ext_factor, attn_factor;
    float corr_dims[2];
} gpu_rope_params;
/* For n_tok tokens, token t at position d_pos[t] (device int32):
 *   q heads (d_q: [n_tok][n_head][head_dim], in place): per-head RMSNorm with d_q_norm
 *     (head_dim F32 weights) when non-NULL, then RoPE;
 *   k heads (d_k: [n_tok][n_kv_head][head_dim], read only): the same with d_k_norm, then
 *     stored into d_kcache row d_pos[t] (element (p, j) at d_kcache + p*pos_stride + j, j <
 *     n_kv_head*head_dim, type kv_type F32 or F16 rounded to nearest even);
 *   v (d_v, like k): stored into d_vcache the same way, unchanged.
 * The result is what gpu_rmsnorm + gpu_rope + gpu_store give. */
int gpu_qk_rope_store(float *d_q, const float *d_k, const float *d_v, int64_t n_tok,
                      int64_t n_head, int64_t n_kv_head, int64_t head_dim, const float *d_q_norm,
                      const float *d_k_norm, float eps, const gpu_rope_params *rope,
                      const int32_t *d_pos, void *d_kcache, void *d_vcache, int kv_type,
                      int64_t pos_stride, gpu_stream *s, forge_err *err);
/* gpu_rope with the full parameter set (YaRN); in place on [n_tok][n_heads][head_dim]. */
int gpu_rope_ext(float *d_x, int64_t n_tok, int64_t n_heads, int64_t head_dim,
                 const gpu_rope_params *rope, const int32_t *d_pos, gpu_stream *s,
                 forge_err *err);

/* ---- prompt attention on the tensor cores (gpu_fattn.cu) ---------------------------------- */
/* Causal attention of n_q new query tokens at positions pos0 .. pos0+n_q-1 over cache rows
 * 0 .. pos0+n_q-1 (the new K/V already stored): query i attends positions <= pos0 + i.
 * a: the cache layout, heads, scale and kv_type as for gpu_attention (a->d_pos, a->max_kv,
 * a->d_scratch unused); q row i at a->d_q + i*q_stride floats, output row i at a->d_out +
 * i*out_stride. Flash attention: online softmax, GQA, fp16 tensor-core products with fp32
 * accumulation (documented precision: ~1e-3 relative, like llama.cpp's CUDA flash attention).
 * head_dim in {64, 128} on the fast path; FORGE_E_UNSUPPORTED otherwise (the caller falls back
 * to gpu_attention_batch). */
int gpu_attention_prompt_supported(int64_t head_dim, int kv_type);
int gpu_attention_prompt(const gpu_attn_args *a, int64_t n_q, int64_t pos0, int64_t q_stride,
                         int64_t out_stride, gpu_stream *s, forge_err *err);

/* ---- sampling on the device (gpu_sample.cu) ------------------------------------------------ */
/* The sampler chain of src/sample/sampler.c over one row of logits, on the device: penalties
 * (n_pen (id, count) pairs of the window) -> top-k -> top-p -> min-p -> temperature -> a draw
 * with the uniform number *d_r in [0, 1) (drawn by the host's generator). temperature <= 0:
 * greedy (the smallest id of the largest penalised logit). The chosen id goes to *d_out. Same
 * result as forge_sampler_sample on the same logits and draw (up to float summation order).
 * top_k must be 1..GPU_SAMPLE_MAX_K when temperature > 0 (the caller samples on the host
 * otherwise). */
#define GPU_SAMPLE_MAX_K 1024
typedef struct gpu_sample_args {
    const float *d_logits;
    int64_t n_vocab;
    float temperature;
    int32_t top_k;
    float top_p, min_p;
    float repeat_penalty, presence_penalty, frequency_penalty;
    const int32_t *d_pen; /* [2 * n_pen]: id, count pairs; NULL when n_pen == 0 */
    int32_t n_pen;
    const float *d_r;
    void *d_scratch; /* gpu_sample_scratch_bytes(n_vocab) */
    int32_t *d_out;
} gpu_sample_args;
size_t gpu_sample_scratch_bytes(int64_t n_vocab);
int gpu_sample(const gpu_sample_args *a, gpu_stream *s, forge_err *err);

/* ---- prefill GEMM, extended (gpu_gemm.cu) ------------------------------------------------- */
/* Y = W X + beta Y (cuBLAS beta): beta 0 is gpu_gemm (d_y is not read, NaN in it is harmless),
 * beta 1 adds the product to what d_y holds (the residual add for free). d_y must not overlap
 * d_x or d_xc. HIP builds: FORGE_E_UNSUPPORTED, as gpu_gemm. */
int gpu_gemm_ex(gpu_blas *b, int wtype, const void *d_w, int64_t n_out, int64_t n_in,
                const float *d_x, int64_t n_tok, void *d_xc, float *d_y, float beta, gpu_stream *s,
                forge_err *err);

/* ---- batches of many sequences over a paged K/V cache (gpu_paged.cu, gpu_ops.cu,
 * gpu_matvec_multi.cu) ------------------------------------------------------------------------ */
/* Row t of d_src ([n_rows][n] floats) to the cache row d_slot[t] (device int32): element j at
 * d_dst + d_slot[t] * row_stride + j, converted to dst_type (F32, or F16 rounded to nearest
 * even). Slots must be distinct and inside the buffer (the caller checks). */
int gpu_store_slots(const float *d_src, void *d_dst, int dst_type, int64_t n, int64_t n_rows,
                    const int32_t *d_slot, int64_t row_stride, gpu_stream *s, forge_err *err);
/* gpu_qk_rope_store with the K/V rows stored at cache row d_slot[t] instead of d_pos[t] (RoPE
 * still at position d_pos[t]). d_slot NULL: gpu_qk_rope_store. */
int gpu_qk_rope_store_slots(float *d_q, const float *d_k, const float *d_v, int64_t n_tok,
                            int64_t n_head, int64_t n_kv_head, int64_t head_dim,
                            const float *d_q_norm, const float *d_k_norm, float eps,
                            const gpu_rope_params *rope, const int32_t *d_pos,
                            const int32_t *d_slot, void *d_kcache, void *d_vcache, int kv_type,
                            int64_t pos_stride, gpu_stream *s, forge_err *err);
/* Causal attention of n_rows query rows, each over its own sequence through a block table:
 * row r (q at d_q + r * n_head * head_dim, out likewise) is at position d_pos[r] of sequence
 * d_row_seq[r] and attends its positions 0..d_pos[r]; position p lives at cache row
 * table[p / block_size] * block_size + p % block_size, table = d_table + seq * table_stride.
 * K/V of cache row c, kv head h: d_k/d_v + c * row_stride + h * head_dim elements (kv_type F32
 * or F16). GQA: query head h reads kv head h / (n_head / n_kv_head). max_kv >= every
 * d_pos[r] + 1 sizes the launch. Split-K over fixed splits of positions with a fixed merge
 * order: a row's result is bit-identical whatever the other rows (batch invariance). The
 * scratch holds gpu_paged_scratch_bytes(rows, ...) for some rows >= 1; more rows than that run
 * in several launches. head_dim <= 256, group <= 16, group * head_dim <= 2048. */
typedef struct gpu_paged_args {
    const float *d_q;
    const void *d_k, *d_v;
    int kv_type;
    int64_t row_stride;
    int64_t n_head, n_kv_head, head_dim;
    int64_t n_rows;
    const int32_t *d_pos, *d_row_seq, *d_table;
    int64_t table_stride, block_size;
    int64_t max_kv;
    float scale;
    void *d_scratch;
    size_t scratch_bytes;
    float *d_out;
    float softcap;  /* as gpu_attn_args: 0 off */
    int32_t window; /* as gpu_attn_args: row r sees d_pos[r] - window + 1 .. d_pos[r]; 0 all */
} gpu_paged_args;
size_t gpu_paged_scratch_bytes(int64_t n_rows, int64_t n_head, int64_t head_dim, int64_t max_kv);
int gpu_paged_attention(const gpu_paged_args *a, gpu_stream *s, forge_err *err);
/* gpu_attention_prompt over a paged cache: position p of the chunk's sequence at cache row
 * d_table[p / block_size] * block_size + p % block_size (d_table: that sequence's block table,
 * device int32, covering positions 0..pos0+n_q-1); a->pos_stride / head_stride address cache
 * rows as before. HIP: FORGE_E_UNSUPPORTED, like gpu_attention_prompt. */
int gpu_attention_prompt_paged(const gpu_attn_args *a, int64_t n_q, int64_t pos0,
                               int64_t q_stride, int64_t out_stride, const int32_t *d_table,
                               int64_t block_size, gpu_stream *s, forge_err *err);
/* d_out[r] = gpu_argmax of row r (d_x + r * row_stride, n values) for r < n_rows, one launch:
 * the smallest index of the maximum, NaN never wins, all NaN gives 0. */
int gpu_argmax_rows(const float *d_x, int64_t n_rows, int64_t n, int64_t row_stride,
                    int32_t *d_out, gpu_stream *s, forge_err *err);
/* Y[r] = W x[r] for 2 <= n_rows <= GPU_MATVEC_MULTI_MAX rows (d_x: [n_rows][n_in] floats, d_y:
 * [n_rows][n_out]), each weight chunk read once for all rows. Q8_0/Q4_0 read d_xq =
 * gpu_act_quantize(d_x, n_rows * n_in) (gpu_act_q8_bytes(n_rows * n_in) bytes); F16/BF16 read
 * d_x (round it first for CPU numerics, as for gpu_matvec). Each row's result is bit-identical
 * to gpu_matvec of that row alone (same per-row reduction order). Supported when
 * gpu_matvec_multi_supported (rows of a multiple of 16 bytes; otherwise FORGE_E_UNSUPPORTED:
 * run rows one by one). Q8_0/Q4_0 batches of 9 or more rows run on the int8 tensor cores (NVIDIA;
 * the same bits). */
#define GPU_MATVEC_MULTI_MAX 16
int gpu_matvec_multi_supported(int wtype, int64_t n_in);
int gpu_matvec_multi(int wtype, const void *d_w, int64_t n_out, int64_t n_in, int64_t n_rows,
                     const float *d_x, const void *d_xq, float *d_y, gpu_stream *s,
                     forge_err *err);
/* gpu_matvec_multi of n_mat (1..GPU_MATVEC_MULTI_MATS) matrices of one type and row length that
 * read the same rows (Q/K/V, gate/up) in one launch: d_y[m] = [n_rows][n_out[m]] = W_m x, each
 * row bit-identical to gpu_matvec_multi (and gpu_matvec) of that matrix alone; with add,
 * d_y[m] += W_m x instead (the bits of gpu_add(d_y, W_m x): a residual add without a launch). One launch
 * pays one ramp and one tail instead of n_mat. The matrices must split their rows alike (the
 * same segments per row, gpu_invariant.cuh) and all but the last have a multiple of 32 rows
 * (gpu_matvec_multi_mats_ok), else FORGE_E_UNSUPPORTED: run them one by one. */
#define GPU_MATVEC_MULTI_MATS 3
int gpu_matvec_multi_mats_ok(int wtype, int n_mat, const int64_t *n_out, int64_t n_in);
int gpu_matvec_multi_mats(int wtype, int n_mat, const void *const *d_w, const int64_t *n_out,
                          int64_t n_in, int64_t n_rows, const float *d_x, const void *d_xq,
                          float *const *d_y, int add, gpu_stream *s, forge_err *err);
/* Q8_0/Q4_0 batches of at least n rows take the tensor-core kernel, 0: never (tests and
 * benchmarks; else FORGE_GPU_MULTI_TC=n, default 6). Not thread-safe: call before any launch. */
void gpu_matvec_multi_tc_min(int n);

/* ---- the ops of the other architectures (issue 15: Gemma, mixtures of experts; gpu_archs.cu,
 * gpu_matvec.cu) ------------------------------------------------------------------------------ */
/* d_out[i] = gelu_tanh(gate[i]) * up[i], gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715
 * x^3))). exact 0: the CPU backend's default (ggml's table): 0 for x <= -10, x for x >= 10,
 * else x rounded to fp16, the GELU in float, the result rounded to fp16 (no FMA contraction,
 * so bit-identical to the CPU up to tanhf's last bit). exact 1 (f32_math): in double, rounded
 * once. d_out may alias gate or up. */
int gpu_geglu(const float *d_gate, const float *d_up, float *d_out, int64_t n, int exact,
              gpu_stream *s, forge_err *err);
/* d_x[i] *= s */
int gpu_scale(float *d_x, float s_mul, int64_t n, gpu_stream *s, forge_err *err);
/* d_x[i] = tanh(d_x[i] * (1 / cap)) * cap (the CPU's order of operations); cap > 0 */
int gpu_softcap(float *d_x, float cap, int64_t n, gpu_stream *s, forge_err *err);
/* Mixture-of-experts routing, one thread per row, as src/cpu/moe.c: p = softmax(logits[t])
 * (float, max subtracted, sum in double), the n_used experts with the largest logits (ties: the
 * smaller index) in rank order to d_sel[t][0..n_used), their p (renormalised over the selected
 * when norm_w) to d_w[t][..], and d_run[e][t] = 1 when row t selects expert e, else 0 (the
 * flags gpu_matvec_rows skips by). n_used <= GPU_MOE_MAX_USED. */
#define GPU_MOE_MAX_USED 32
int gpu_moe_route(const float *d_logits, int64_t n_tok, int64_t n_expert, int64_t n_used,
                  int norm_w, int32_t *d_sel, float *d_w, int32_t *d_run, gpu_stream *s,
                  forge_err *err);
/* d_out[t][j] += w * d_y[t][j] for the rows t that select expert e (w: that expert's weight
 * in d_w), other rows untouched; the product rounded before the add (no FMA: the CPU's
 * arithmetic). Called for e = 0, 1, .. over a zeroed d_out, it adds each row's experts in
 * ascending order, as the CPU does. */
int gpu_moe_accum(float *d_out, const float *d_y, const int32_t *d_sel, const float *d_w,
                  int64_t n_tok, int64_t n_used, int64_t n_embd, int64_t e, gpu_stream *s,
                  forge_err *err);
/* gpu_matvec for n_rows (1..65535) activation rows in one launch: d_y[r] = W d_x[r] (d_y:
 * [n_rows][n_out]) for the rows with d_run[r] != 0 (d_run NULL: every row; read on the device,
 * so a flag set by an earlier kernel skips the row without the host knowing); skipped rows of
 * d_y are not written. Q8_0/Q4_0 and the block types read d_xq = gpu_act_quantize(d_x, n_rows
 * * n_in). Each row's result is bit-identical to gpu_matvec of that row alone. */
int gpu_matvec_rows(int wtype, const void *d_w, int64_t n_out, int64_t n_in, int64_t n_rows,
                    const float *d_x, const void *d_xq, float *d_y, const int32_t *d_run,
                    gpu_stream *s, forge_err *err);

/* ---- a context: one stream and its scratch, for the backend --------------------------------- */
typedef struct gpu_ctx gpu_ctx;
/* Creates a stream on the current device. */
int gpu_ctx_create(gpu_ctx **out, forge_err *err);
/* Safe with work still queued: waits for the context's stream, then releases everything.
 * NULL allowed. */
void gpu_ctx_free(gpu_ctx *c);
gpu_stream *gpu_ctx_stream(gpu_ctx *c);
/* Scratch of at least `bytes`, owned by the context, valid until the next call with a larger
 * size (growth is stream-ordered, so work already enqueued keeps its old buffer alive). */
int gpu_ctx_scratch(gpu_ctx *c, size_t bytes, void **d_out, forge_err *err);

/* ---- the communicator of a tensor-parallel group (gpu_comm.cu) ------------------------------ */
/* NCCL (RCCL in a HIP build, same API) over the GPUs of one process, one rank per GPU. The
 * library is dlopened at the first gpu_comm_create, so neither the build nor a program that never
 * makes a communicator needs it: $FORGE_NCCL_LIB when set, else "libnccl.so.2" ("librccl.so.1"
 * in a HIP build) from the default search path. The environment variable NCCL_NVLS_ENABLE is set
 * to 0 before the first communicator unless it is set already (NVLink multicast stays off).
 * Errors: FORGE_E_INVALID (rank count, a GPU given twice), FORGE_E_RANGE (no such GPU),
 * FORGE_E_UNSUPPORTED (the library cannot be loaded, or is not NCCL), FORGE_E_DEVICE (an NCCL or
 * runtime failure, with NCCL's message). */
#define GPU_COMM_MAX_RANK 8
typedef struct gpu_comm gpu_comm;
/* A communicator over devs[0..n) (distinct GPUs; rank r = devs[r]), 1 <= n <= GPU_COMM_MAX_RANK.
 * Owned by the caller (gpu_comm_free). The current device is unchanged on return. */
int gpu_comm_create(int n, const int *devs, gpu_comm **out, forge_err *err);
/* Destroys the NCCL communicators. The caller makes sure that the collectives it enqueued are
 * done (synchronise the ranks' streams first). NULL allowed. */
void gpu_comm_free(gpu_comm *c);
/* The collectives. Index r of every array is rank r: d_* are device memory of GPU devs[r], s[r]
 * a stream of that GPU; each collective is enqueued on every rank's stream (after the work
 * already there, before the work enqueued later) and returns without waiting. Every rank ends
 * with the same bits. The current device is unchanged on return.
 * In place: every d_bufs[r][0..n) becomes the sum over the ranks (float32). */
int gpu_comm_all_reduce_sum(gpu_comm *c, float *const *d_bufs, int64_t n, gpu_stream *const *s,
                            forge_err *err);
/* Rank r holds d_send[r] = [rows][cols[r]] (row-major); every rank's d_recv[r] becomes
 * [rows][cols[0] + .. + cols[n-1]], row i being the ranks' rows i side by side in rank order.
 * d_send and d_recv do not overlap. rows > 1 uses a stream-ordered scratch of rows x total
 * floats per rank (allocated and freed on s[r]). */
int gpu_comm_all_gather_cols(gpu_comm *c, const float *const *d_send, float *const *d_recv,
                             int64_t rows, const int64_t *cols, gpu_stream *const *s,
                             forge_err *err);

/* ---- quantized matrix products on the int8 tensor cores (gpu_mmq.cu) ---------------------- */
/* d_y[t * y_stride + r] = sum_i W[r][i] X[t][i] (+ beta * the old d_y[...] when beta != 0;
 * beta 0 does not read d_y) for r < n_out, t < n_tok: decode batches of many rows and prompt
 * chunks, without dequantizing W. W: Q8_0 or Q4_0 in the device layout; X: d_xq =
 * gpu_act_quantize(d_x, n_tok * n_in) (gpu_act_q8_bytes(n_tok * n_in) bytes). The numerics of
 * gpu_matvec (the exact integer dot product of each 32-element block, scaled by d_w * d_x, in
 * fp32); only the order of the float sums differs, and it is fixed: the same inputs give the same
 * bits on every run. y_stride >= n_out; d_y must not overlap d_w or d_xq; d_w and d_xq 16-byte
 * aligned. Elements of d_y outside the n_tok x n_out result are not touched.
 * gpu_mmq_supported: Q8_0/Q4_0 with n_in a multiple of 32, on a CUDA device with int8 tensor
 * cores (sm_80+; the library is built for those only); 0 in HIP builds, where gpu_mmq returns
 * FORGE_E_UNSUPPORTED. The tile is chosen from the shape; FORGE_GPU_MMQ_TILE=BMxBN (128x64,
 * 64x64, 64x32, 32x32, 64x16, 32x16; read at every call) forces one, for benchmarks. */
int gpu_mmq_supported(int wtype, int64_t n_in);
int gpu_mmq(int wtype, const void *d_w, int64_t n_out, int64_t n_in, int64_t n_tok,
            const void *d_xq, float *d_y, int64_t y_stride, float beta, gpu_stream *s,
            forge_err *err);

/* ---- the table the engine dlopens --------------------------------------------------------------
 */
/* 2: the fields for batches of many sequences (store_slots .. matvec_multi) are required by the
 * backend; a library of version 1 lacks them (its table is shorter), so it is refused by name
 * instead of being read past its end. */
/* 3: gpu_attn_args / gpu_paged_args gained softcap and window (a larger struct: a version 2
 * library would read past the caller's), and the ops of the other architectures (geglu ..
 * matvec_rows) are appended. */
/* 4: the communicator (comm_create .. comm_all_gather_cols) is appended; the backend needs it
 * for tensor parallelism (backend_gpu_comm_create), so a version 3 library is refused. */
/* 5: the tensor-core quantized product (mmq_supported, mmq) is appended; a version 4 library's
 * table ends before them, so it is refused by version instead of being read past its end. */
/* 6: fused_matvec_invariant, and gpu_fmv_args grew its invariant field. */
/* 7: the multi-row matvec over several matrices (matvec_multi_mats_ok, matvec_multi_mats) and
 * the RMSNorm / SwiGLU with quantized results (rmsnorm_q8, swiglu_q8) are appended; the backend
 * calls them, so a version 6 library is refused. */
#define GPU_API_VERSION 7
typedef struct gpu_api {
    int version; /* GPU_API_VERSION */
    const char *(*backend_name)(void);
    int (*device_count)(int *n, forge_err *err);
    int (*device_info_get)(int dev, gpu_device_info *out, forge_err *err);
    int (*set_device)(int dev, forge_err *err);
    int (*device_sync)(forge_err *err);
    int (*malloc)(void **d_out, size_t bytes, forge_err *err);
    void (*free)(void *d_ptr);
    int (*malloc_async)(void **d_out, size_t bytes, gpu_stream *s, forge_err *err);
    int (*free_async)(void *d_ptr, gpu_stream *s, forge_err *err);
    int (*memcpy_h2d)(void *d_dst, const void *h_src, size_t bytes, gpu_stream *s, forge_err *err);
    int (*memcpy_d2h)(void *h_dst, const void *d_src, size_t bytes, gpu_stream *s, forge_err *err);
    int (*memcpy_d2d)(void *d_dst, const void *d_src, size_t bytes, gpu_stream *s, forge_err *err);
    int (*memset)(void *d_dst, int byte, size_t bytes, gpu_stream *s, forge_err *err);
    int (*ctx_create)(gpu_ctx **out, forge_err *err);
    void (*ctx_free)(gpu_ctx *c);
    gpu_stream *(*ctx_stream)(gpu_ctx *c);
    int (*ctx_scratch)(gpu_ctx *c, size_t bytes, void **d_out, forge_err *err);
    int (*stream_sync)(gpu_stream *s, forge_err *err);
    int (*graph_begin)(gpu_stream *s, forge_err *err);
    int (*graph_end)(gpu_stream *s, gpu_graph **out, forge_err *err);
    int (*graph_launch)(gpu_graph *g, gpu_stream *s, forge_err *err);
    void (*graph_free)(gpu_graph *g);
    int (*matvec_supported)(int wtype);
    size_t (*weight_bytes)(int wtype, int64_t n_rows, int64_t n_in);
    int (*weight_convert)(int wtype, const void *d_src, void *d_dst, int64_t n_rows, int64_t n_in,
                          gpu_stream *s, forge_err *err);
    size_t (*act_q8_bytes)(int64_t n_in);
    int (*act_quantize)(const float *d_x, int64_t n_in, void *d_xq, gpu_stream *s, forge_err *err);
    int (*matvec)(int wtype, const void *d_w, int64_t n_out, int64_t n_in, const float *d_x,
                  const void *d_xq, float *d_y, gpu_stream *s, forge_err *err);
    int (*rmsnorm)(const float *d_x, const float *d_w, float *d_y, int64_t n, int64_t n_rows,
                   float eps, gpu_stream *s, forge_err *err);
    int (*rope)(float *d_x, int64_t n_tok, int64_t n_heads, int64_t head_dim, int64_t n_dims,
                int mode, const int32_t *d_pos, float freq_base, float freq_scale,
                const float *d_freq_factors, gpu_stream *s, forge_err *err);
    int (*swiglu)(const float *d_gate, const float *d_up, float *d_out, int64_t n, gpu_stream *s,
                  forge_err *err);
    int (*add)(const float *d_a, const float *d_b, float *d_out, int64_t n, gpu_stream *s,
               forge_err *err);
    int (*embed)(int wtype, const void *d_table, int64_t n_vocab, int64_t n_embd,
                 const int32_t *d_ids, int64_t n_tokens, float *d_out, gpu_stream *s,
                 forge_err *err);
    int (*argmax)(const float *d_x, int64_t n, int32_t *d_idx, gpu_stream *s, forge_err *err);
    size_t (*attn_scratch_bytes)(int64_t n_head, int64_t head_dim, int64_t max_kv);
    int (*attention)(const gpu_attn_args *a, gpu_stream *s, forge_err *err);
    int (*blas_create)(gpu_blas **out, forge_err *err);
    void (*blas_free)(gpu_blas *b);
    int (*gemm)(gpu_blas *b, int wtype, const void *d_w, int64_t n_out, int64_t n_in,
                const float *d_x, int64_t n_tok, void *d_xc, float *d_y, gpu_stream *s,
                forge_err *err);
    int (*copy)(void *d_dst, const void *d_src, size_t bytes, gpu_stream *s, forge_err *err);
    /* appended for the backend (still version 1: older fields keep their places) */
    int (*mem_info)(size_t *free_bytes, size_t *total_bytes, forge_err *err);
    int (*weight_to_f16)(int wtype, const void *d_w, int64_t n_rows, int64_t n_in, void *d_out,
                         gpu_stream *s, forge_err *err);
    int (*add_rows)(float *d_y, const float *d_b, int64_t n_rows, int64_t n, gpu_stream *s,
                    forge_err *err);
    int (*store)(const float *d_src, void *d_dst, int dst_type, int64_t n, gpu_stream *s,
                 forge_err *err);
    int (*host_alloc)(void **h_out, size_t bytes, forge_err *err);
    void (*host_free)(void *h_ptr);
    int (*event_create)(gpu_event **out, int timing, forge_err *err);
    void (*event_destroy)(gpu_event *e);
    int (*event_record)(gpu_event *e, gpu_stream *s, forge_err *err);
    int (*event_sync)(gpu_event *e, forge_err *err);
    int (*attention_batch)(const gpu_attn_args *a, int64_t n_q, int64_t q_stride,
                           int64_t out_stride, size_t scratch_bytes, gpu_stream *s, forge_err *err);
    /* appended for the captured decode step (graphs) */
    int (*store_at)(const float *d_src, void *d_dst, int dst_type, int64_t n, const int32_t *d_pos,
                    int64_t pos_stride, gpu_stream *s, forge_err *err);
    /* appended for fused decode layers, prompt flash attention, device sampling */
    int (*fused_matvec_supported)(int wtype, int64_t n_in);
    int (*fused_matvec_invariant)(const gpu_fmv_args *a);
    int (*fused_matvec)(const gpu_fmv_args *a, gpu_stream *s, forge_err *err);
    int (*qk_rope_store)(float *d_q, const float *d_k, const float *d_v, int64_t n_tok,
                         int64_t n_head, int64_t n_kv_head, int64_t head_dim,
                         const float *d_q_norm, const float *d_k_norm, float eps,
                         const gpu_rope_params *rope, const int32_t *d_pos, void *d_kcache,
                         void *d_vcache, int kv_type, int64_t pos_stride, gpu_stream *s,
                         forge_err *err);
    int (*rope_ext)(float *d_x, int64_t n_tok, int64_t n_heads, int64_t head_dim,
                    const gpu_rope_params *rope, const int32_t *d_pos, gpu_stream *s,
                    forge_err *err);
    int (*attention_prompt_supported)(int64_t head_dim, int kv_type);
    int (*attention_prompt)(const gpu_attn_args *a, int64_t n_q, int64_t pos0, int64_t q_stride,
                            int64_t out_stride, gpu_stream *s, forge_err *err);
    size_t (*sample_scratch_bytes)(int64_t n_vocab);
    int (*sample)(const gpu_sample_args *a, gpu_stream *s, forge_err *err);
    int (*gemm_ex)(gpu_blas *b, int wtype, const void *d_w, int64_t n_out, int64_t n_in,
                   const float *d_x, int64_t n_tok, void *d_xc, float *d_y, float beta,
                   gpu_stream *s, forge_err *err);
    size_t (*argmax_scratch_bytes)(void);
    int (*argmax_ex)(const float *d_x, int64_t n, void *d_scratch, int32_t *d_idx, gpu_stream *s,
                     forge_err *err);
    int (*round_act)(const float *d_x, float *d_y, int64_t n, int wtype, gpu_stream *s,
                     forge_err *err);
    /* appended for batches of many sequences over a paged cache (gpu_paged.cu) */
    int (*store_slots)(const float *d_src, void *d_dst, int dst_type, int64_t n, int64_t n_rows,
                       const int32_t *d_slot, int64_t row_stride, gpu_stream *s, forge_err *err);
    int (*qk_rope_store_slots)(float *d_q, const float *d_k, const float *d_v, int64_t n_tok,
                               int64_t n_head, int64_t n_kv_head, int64_t head_dim,
                               const float *d_q_norm, const float *d_k_norm, float eps,
                               const gpu_rope_params *rope, const int32_t *d_pos,
                               const int32_t *d_slot, void *d_kcache, void *d_vcache,
                               int kv_type, int64_t pos_stride, gpu_stream *s, forge_err *err);
    size_t (*paged_scratch_bytes)(int64_t n_rows, int64_t n_head, int64_t head_dim,
                                  int64_t max_kv);
    int (*paged_attention)(const gpu_paged_args *a, gpu_stream *s, forge_err *err);
    int (*argmax_rows)(const float *d_x, int64_t n_rows, int64_t n, int64_t row_stride,
                       int32_t *d_out, gpu_stream *s, forge_err *err);
    int (*attention_prompt_paged)(const gpu_attn_args *a, int64_t n_q, int64_t pos0,
                                  int64_t q_stride, int64_t out_stride, const int32_t *d_table,
                                  int64_t block_size, gpu_stream *s, forge_err *err);
    int (*matvec_multi_supported)(int wtype, int64_t n_in);
    int (*matvec_multi)(int wtype, const void *d_w, int64_t n_out, int64_t n_in, int64_t n_rows,
                        const float *d_x, const void *d_xq, float *d_y, gpu_stream *s,
                        forge_err *err);
    /* appended for the other architectures (version 3) */
    int (*geglu)(const float *d_gate, const float *d_up, float *d_out, int64_t n, int exact,
                 gpu_stream *s, forge_err *err);
    int (*scale)(float *d_x, float s_mul, int64_t n, gpu_stream *s, forge_err *err);
    int (*softcap)(float *d_x, float cap, int64_t n, gpu_stream *s, forge_err *err);
    int (*moe_route)(const float *d_logits, int64_t n_tok, int64_t n_expert, int64_t n_used,
                     int norm_w, int32_t *d_sel, float *d_w, int32_t *d_run, gpu_stream *s,
                     forge_err *err);
    int (*moe_accum)(float *d_out, const float *d_y, const int32_t *d_sel, const float *d_w,
                     int64_t n_tok, int64_t n_used, int64_t n_embd, int64_t e, gpu_stream *s,
                     forge_err *err);
    int (*matvec_rows)(int wtype, const void *d_w, int64_t n_out, int64_t n_in, int64_t n_rows,
                       const float *d_x, const void *d_xq, float *d_y, const int32_t *d_run,
                       gpu_stream *s, forge_err *err);
    /* appended for tensor parallelism (version 4): the NCCL/RCCL communicator */
    int (*comm_create)(int n, const int *devs, gpu_comm **out, forge_err *err);
    void (*comm_free)(gpu_comm *c);
    int (*comm_all_reduce_sum)(gpu_comm *c, float *const *d_bufs, int64_t n,
                               gpu_stream *const *s, forge_err *err);
    int (*comm_all_gather_cols)(gpu_comm *c, const float *const *d_send, float *const *d_recv,
                                int64_t rows, const int64_t *cols, gpu_stream *const *s,
                                forge_err *err);
    /* appended for quantized batches on the tensor cores (version 5) */
    int (*mmq_supported)(int wtype, int64_t n_in);
    int (*mmq)(int wtype, const void *d_w, int64_t n_out, int64_t n_in, int64_t n_tok,
               const void *d_xq, float *d_y, int64_t y_stride, float beta, gpu_stream *s,
               forge_err *err);
    /* appended for fewer launches in a batch's layer (version 7) */
    int (*matvec_multi_mats_ok)(int wtype, int n_mat, const int64_t *n_out, int64_t n_in);
    int (*matvec_multi_mats)(int wtype, int n_mat, const void *const *d_w, const int64_t *n_out,
                             int64_t n_in, int64_t n_rows, const float *d_x, const void *d_xq,
                             float *const *d_y, int add, gpu_stream *s, forge_err *err);
    int (*rmsnorm_q8)(const float *d_x, const float *d_w, float *d_y, int64_t n, int64_t n_rows,
                      float eps, void *d_xq, gpu_stream *s, forge_err *err);
    int (*swiglu_q8)(const float *d_gate, const float *d_up, float *d_out, int64_t n, void *d_xq,
                     gpu_stream *s, forge_err *err);
} gpu_api;

/* The one symbol the engine looks up after dlopen("libforge_cuda.so"). NULL if `version` is not
 * one this library provides. */
const gpu_api *forge_gpu_get_api(int version);
typedef const gpu_api *(*forge_gpu_get_api_fn)(int version);

#ifdef __cplusplus
}
#endif

#endif /* FORGE_GPU_OPS_H */
