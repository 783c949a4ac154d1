/* gpu_matvec.cu - decode matrix-vector products (one token) for F32, F16, BF16, Q8_0 and Q4_0
 * weights, the activation quantizer they use for Q8_0/Q4_0, the weight re-packing into the device
 * layout (gpu_ops.h) and embedding-row lookup from that layout.
 *
 * The other block types (Q4_1 .. Q6_K, IQ4_*, TQ2_0) have their layout and kernels in
 * gpu_quant.cuh / gpu_kquant.cu; the launchers here validate and hand them over.
 *
 * Matvec design: one 32-lane segment per output row; each lane streams 16-byte chunks of the row
 * (MV_UNROLL chunks in flight before the first use) and the segment reduces with shuffles. The
 * weights are read exactly once. Activations (16 KB for n_in = 4096) are re-read by every row and
 * stay in L1/L2. Numerics: float activations with fp32 accumulation for F32/F16/BF16; for
 * Q8_0/Q4_0 the activations are quantized to Q8_0 blocks once (gpu_act_quantize, the rounding of
 * the CPU's kern_cvt_q8_0_scalar on x86) and each block's dot product is an integer dp4a sum,
 * scaled by d_w * d_x, as ggml's CPU kernels do. */
#include "gpu/gpu_ops.h"
#include <stdlib.h>

#include "gpu/gpu_common.cuh"
#include "gpu/gpu_dot.cuh"
#include "gpu/gpu_invariant.cuh"
#include "gpu/gpu_quant.cuh"
#include "gpu/gpu_vendor.h"

#define MV_THREADS 256
#define MV_ROWS_PER_BLOCK (MV_THREADS / GPU_SEG)
#define MV_UNROLL 4
#define QK 32

static int is_quant(int t)
{
    return t == GGML_TYPE_Q8_0 || t == GGML_TYPE_Q4_0;
}

/* Bytes per row of the quants plane (Q types) or of the matrix (plain types); 0 if bad. */
static size_t plane_row_bytes(int t, int64_t n_in)
{
    switch (t) {
    case GGML_TYPE_F32:
        return (size_t)n_in * 4;
    case GGML_TYPE_F16:
    case GGML_TYPE_BF16:
        return (size_t)n_in * 2;
    case GGML_TYPE_Q8_0:
        return n_in % QK ? 0 : (size_t)n_in;
    case GGML_TYPE_Q4_0:
        return n_in % QK ? 0 : (size_t)n_in / 2;
    default:
        return 0;
    }
}

/* The other block types (gpu_quant.cuh): body plane + head plane, kernels in gpu_kquant.cu. */
static bool is_gq(int t)
{
    return gq_geom_of(t).qk != 0;
}

GPU_API int gpu_matvec_supported(int wtype)
{
    return plane_row_bytes(wtype, QK) != 0 || is_gq(wtype);
}

GPU_API size_t gpu_weight_scales_offset(int wtype, int64_t n_rows, int64_t n_in)
{
    if (is_gq(wtype)) return gq_head_offset(wtype, n_rows, n_in);
    if (!is_quant(wtype) || n_rows <= 0 || n_in <= 0) return 0;
    return gpu_round_up((size_t)n_rows * plane_row_bytes(wtype, n_in), 256);
}

GPU_API size_t gpu_weight_bytes(int wtype, int64_t n_rows, int64_t n_in)
{
    if (is_gq(wtype)) return gq_weight_bytes(wtype, n_rows, n_in);
    size_t rb = plane_row_bytes(wtype, n_in);
    if (rb == 0 || n_rows <= 0 || n_in <= 0) return 0;
    if (!is_quant(wtype)) return (size_t)n_rows * rb;
    /* the scales plane padded to 16 bytes: gpu_mmq copies it in aligned 4-byte words */
    return gpu_weight_scales_offset(wtype, n_rows, n_in) +
           gpu_round_up((size_t)n_rows * (n_in / QK) * 2, 16);
}

GPU_API size_t gpu_act_q8_bytes(int64_t n_in)
{
    if (n_in <= 0 || n_in % QK) return 0;
    return gpu_act_s_offset(n_in) + gpu_round_up((size_t)(n_in / QK) * 4, 16);
}

/* ---- kernels ----------------------------------------------------------------------------------
 */

/* GGUF blocks -> planes. One thread per block. */
template <int BLOCK_BYTES, int QUANT_BYTES>
__global__ void k_weight_convert(const uint8_t *__restrict__ src, uint8_t *__restrict__ dst_q,
                                 unsigned short *__restrict__ dst_d, int64_t n_blocks)
{
    int64_t b = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= n_blocks) return;
    const uint8_t *blk = src + b * BLOCK_BYTES;
    dst_d[b] = (unsigned short)(blk[0] | (blk[1] << 8));
    uint8_t *q = dst_q + b * QUANT_BYTES;
#pragma unroll
    for (int i = 0; i < QUANT_BYTES; i++)
        q[i] = blk[2 + i];
}

/* One segment per block of 32 activations. */
__global__ void k_act_quantize(const float *__restrict__ x, int8_t *__restrict__ xq,
                               float *__restrict__ xd, int *__restrict__ xs, int n_blocks)
{
    gpu_pdl_trigger(); /* the products after it may load their weights meanwhile */
    gpu_pdl_wait(); /* launched with PDL (gpu_launch_pdl): first of all */
    int b = blockIdx.x * (blockDim.x / GPU_SEG) + threadIdx.x / GPU_SEG;
    int lane = threadIdx.x % GPU_SEG;
    if (b >= n_blocks) return;
    float v = x[(int64_t)b * QK + lane];
    float amax = gpu_seg_max(fabsf(v));
    float d = amax / 127.0f;
    float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    int q = (int)rintf(v * id);
    xq[(int64_t)b * QK + lane] = (int8_t)q;
    int sum = q;
#pragma unroll
    for (int m = GPU_SEG / 2; m > 0; m >>= 1)
        sum += gpu_shfl_xor_int(sum, m, GPU_SEG);
    if (lane == 0) {
        xd[b] = gpu_fp16_to_f32(gpu_f32_to_fp16(d));
        xs[b] = sum;
    }
}

struct mv_args {
    const uint8_t *w;             /* matrix or quants plane */
    const unsigned short *scales; /* Q types: fp16 block scales plane */
    const float *x;
    const int8_t *xq;
    const float *xd;
    const int *xs;
    float *y;
    int n_out, n_in;
    size_t row_bytes;
    /* several activation rows (blockIdx.y; gpu_matvec_rows): row r reads x + r * n_in (or its
     * Q8_0 blocks: xq + r * n_in, xd / xs + r * n_in / 32) and writes y + r * n_out; skipped
     * when run[r] == 0 (run non-NULL) */
    const int32_t *run;
    int n_rows;
};

/* Point a at activation row blockIdx.y; false: the row is not run (the whole block leaves,
 * before any barrier). Each row gets the arithmetic of a one-row gpu_matvec. */
GPU_DEV bool mv_row(mv_args &a)
{
    const int r = blockIdx.y;
    if (a.run && a.run[r] == 0) return false;
    if (r == 0) return true;
    if (a.x) a.x += (int64_t)r * a.n_in;
    if (a.xq) {
        a.xq += (int64_t)r * a.n_in;
        a.xd += (int64_t)r * (a.n_in / QK);
        a.xs += (int64_t)r * (a.n_in / QK);
    }
    a.y += (int64_t)r * a.n_out;
    return true;
}

/* Per weight type: the activations matching 16-byte chunk c of a row (load), and the chunk's
 * dot product with them (dot; dw = the chunk's block scale for Q types). Split in two so that a
 * segment computing two rows loads the activations once. */
template <int WT> struct mv_ops;

template <> struct mv_ops<GGML_TYPE_F32> {
    struct x_t {
        float4 a;
    };
    static GPU_DEVT x_t load(const mv_args &a, int c)
    {
        return {((const float4 *)a.x)[c]};
    }
    static GPU_DEVT float dot(const x_t &x, uint4 w, float dw)
    {
        return gpu_dot_f32x4(w, x.a);
    }
};

/* F16 and BF16: a chunk is 8 halves against 8 float activations. */
template <int WT> struct mv_ops_half {
    struct x_t {
        float4 a, b;
    };
    static GPU_DEVT x_t load(const mv_args &a, int c)
    {
        return {((const float4 *)a.x)[2 * c], ((const float4 *)a.x)[2 * c + 1]};
    }
    static GPU_DEVT float dot(const x_t &x, uint4 w, float dw)
    {
        return WT == GGML_TYPE_F16 ? gpu_dot_f16x8(w, x.a, x.b) : gpu_dot_bf16x8(w, x.a, x.b);
    }
};
template <> struct mv_ops<GGML_TYPE_F16> : mv_ops_half<GGML_TYPE_F16> {};
template <> struct mv_ops<GGML_TYPE_BF16> : mv_ops_half<GGML_TYPE_BF16> {};

/* Q8_0: a chunk is half a block (16 quants); scale of block c/2. */
template <> struct mv_ops<GGML_TYPE_Q8_0> {
    struct x_t {
        int4 q;
        float d;
    };
    static GPU_DEVT x_t load(const mv_args &a, int c)
    {
        return {((const int4 *)a.xq)[c], a.xd[c >> 1]};
    }
    static GPU_DEVT float dot(const x_t &x, uint4 w, float dw)
    {
        int s = gpu_dot_q8x16(w, x.q);
        return (float)s * (dw * x.d);
    }
};

/* Q4_0: a chunk is one block; byte j holds element j (low nibble) and j + 16 (high nibble).
 * sum (nib - 8) * q = sum nib * q - 8 * sum q, with sum q precomputed per activation block. */
template <> struct mv_ops<GGML_TYPE_Q4_0> {
    struct x_t {
        int4 lo, hi;
        float d;
        int s;
    };
    static GPU_DEVT x_t load(const mv_args &a, int c)
    {
        return {((const int4 *)a.xq)[2 * c], ((const int4 *)a.xq)[2 * c + 1], a.xd[c], a.xs[c]};
    }
    static GPU_DEVT float dot(const x_t &x, uint4 w, float dw)
    {
        int s = gpu_dot_q4x32(w, x.lo, x.hi);
        return (float)(s - 8 * x.s) * (dw * x.d);
    }
};

/* Which block scale chunk c uses (Q types); plain types have none. */
template <int WT> GPU_DEVT int mv_scale_index(int c)
{
    return WT == GGML_TYPE_Q8_0 ? c >> 1 : c;
}

/* SPR segments share a row (for matrices with few, long rows: more warps, more loads in
 * flight); their partial sums meet in shared memory. */
template <int WT, int SPR>
__global__ void __launch_bounds__(MV_THREADS) k_matvec(const mv_args a0)
{
    mv_args a = a0;
    if (!mv_row(a)) return;
    __shared__ float part[MV_THREADS / GPU_SEG];
    const int lane = threadIdx.x % GPU_SEG, seg = threadIdx.x / GPU_SEG;
    const int row = blockIdx.x * (MV_ROWS_PER_BLOCK / SPR) + seg / SPR;
    const int sub = seg % SPR;
    const bool valid = row < a.n_out; /* no early return: SPR > 1 meets at a barrier */
    const bool quant = WT == GGML_TYPE_Q8_0 || WT == GGML_TYPE_Q4_0;
    float acc = 0.0f;
    if (valid) {
        const uint4 *wrow = (const uint4 *)(a.w + (size_t)row * a.row_bytes);
        const unsigned short *srow = quant ? a.scales + (size_t)row * (a.n_in / QK) : NULL;
        const int n_chunks = (int)(a.row_bytes / 16);
        const int step = GPU_SEG * SPR;
        for (int c0 = sub * GPU_SEG + lane; c0 < n_chunks; c0 += step * MV_UNROLL) {
            uint4 w[MV_UNROLL];
            unsigned short d[MV_UNROLL];
#pragma unroll
            for (int u = 0; u < MV_UNROLL; u++) {
                int c = c0 + u * step;
                if (c < n_chunks) {
                    w[u] = gpu_ld_stream16(wrow + c);
                    d[u] = quant ? srow[mv_scale_index<WT>(c)] : 0;
                }
            }
#pragma unroll
            for (int u = 0; u < MV_UNROLL; u++) {
                int c = c0 + u * step;
                if (c < n_chunks)
                    acc += mv_ops<WT>::dot(mv_ops<WT>::load(a, c), w[u],
                                           quant ? gpu_fp16_to_f32(d[u]) : 0.0f);
            }
        }
    }
    acc = gpu_seg_sum(acc);
    if (SPR == 1) {
        if (valid && lane == 0) a.y[row] = acc;
    } else {
        if (lane == 0) part[seg] = acc;
        __syncthreads();
        if (valid && sub == 0 && lane == 0) {
            float sum = 0.0f;
#pragma unroll
            for (int i = 0; i < SPR; i++)
                sum += part[seg + i];
            a.y[row] = sum;
        }
    }
}

/* Two adjacent rows per segment (tall matrices): each activation chunk is loaded once for both
 * rows, halving the L1 traffic of x, which for F16/BF16/Q4_0 is twice the weight bytes. */
template <int WT> __global__ void __launch_bounds__(MV_THREADS) k_matvec2(const mv_args a0)
{
    mv_args a = a0;
    if (!mv_row(a)) return;
    const int lane = threadIdx.x % GPU_SEG, seg = threadIdx.x / GPU_SEG;
    const int row0 = (blockIdx.x * MV_ROWS_PER_BLOCK + seg) * 2;
    if (row0 >= a.n_out) return; /* the whole segment leaves together */
    const bool has1 = row0 + 1 < a.n_out;
    const bool quant = WT == GGML_TYPE_Q8_0 || WT == GGML_TYPE_Q4_0;
    const int nb = a.n_in / QK;
    const uint4 *w0 = (const uint4 *)(a.w + (size_t)row0 * a.row_bytes);
    const uint4 *w1 = has1 ? (const uint4 *)(a.w + (size_t)(row0 + 1) * a.row_bytes) : w0;
    const unsigned short *s0 = quant ? a.scales + (size_t)row0 * nb : NULL;
    const unsigned short *s1 = quant && has1 ? s0 + nb : s0;
    const int n_chunks = (int)(a.row_bytes / 16);
    float acc0 = 0.0f, acc1 = 0.0f;
    for (int c0 = lane; c0 < n_chunks; c0 += GPU_SEG * MV_UNROLL) {
        uint4 wa[MV_UNROLL], wb[MV_UNROLL];
        unsigned short da[MV_UNROLL], db[MV_UNROLL];
#pragma unroll
        for (int u = 0; u < MV_UNROLL; u++) {
            int c = c0 + u * GPU_SEG;
            if (c < n_chunks) {
                wa[u] = gpu_ld_stream16(w0 + c);
                wb[u] = gpu_ld_stream16(w1 + c);
                da[u] = quant ? s0[mv_scale_index<WT>(c)] : 0;
                db[u] = quant ? s1[mv_scale_index<WT>(c)] : 0;
            }
        }
#pragma unroll
        for (int u = 0; u < MV_UNROLL; u++) {
            int c = c0 + u * GPU_SEG;
            if (c < n_chunks) {
                typename mv_ops<WT>::x_t x = mv_ops<WT>::load(a, c);
                acc0 += mv_ops<WT>::dot(x, wa[u], quant ? gpu_fp16_to_f32(da[u]) : 0.0f);
                acc1 += mv_ops<WT>::dot(x, wb[u], quant ? gpu_fp16_to_f32(db[u]) : 0.0f);
            }
        }
    }
    acc0 = gpu_seg_sum(acc0);
    acc1 = gpu_seg_sum(acc1);
    if (lane == 0) {
        a.y[row0] = acc0;
        if (has1) a.y[row0 + 1] = acc1;
    }
}

/* FORGE_GPU_MATVEC2=0 turns the two-row kernel off (for comparison in the benchmark). */
static int matvec2_enabled(void)
{
    static volatile int cached = -1; /* benign race: every thread computes the same value */
    if (cached < 0) {
        const char *v = getenv("FORGE_GPU_MATVEC2");
        cached = !(v && v[0] == '0');
    }
    return cached;
}

template <int WT>
static int launch_matvec(const mv_args &a, cudaStream_t st, const char *name, forge_err *err)
{
    int rc = FORGE_OK;
    /* Few long rows: segments share a row (gpu_invariant.cuh: the choice the multi-row and the
     * fused matvec's invariant mode share) */
    const int spr = gpu_matvec_spr(a.n_out, (int)(a.row_bytes / 16));
    const int64_t max_warps = gpu_mv_max_warps();
    if (WT != GGML_TYPE_F32 && spr == 1 && a.n_out >= max_warps && matvec2_enabled()) {
        /* Tall: two rows per segment still leave at least half a wave of warps. Measured on
         * H200: 4-17% faster for F16/BF16/Q8_0/Q4_0 (F16 11008x4096: 4% slower), 2-3% slower
         * for F32, whose activations are no larger than its weights, so F32 keeps one row. */
        dim3 grid2((unsigned)((a.n_out + 2 * MV_ROWS_PER_BLOCK - 1) / (2 * MV_ROWS_PER_BLOCK)),
                   (unsigned)a.n_rows);
        k_matvec2<WT><<<grid2, MV_THREADS, 0, st>>>(a);
    } else {
        unsigned rows_per_block = MV_ROWS_PER_BLOCK / spr;
        dim3 grid((unsigned)((a.n_out + rows_per_block - 1) / rows_per_block), (unsigned)a.n_rows);
        switch (spr) {
        case 1:
            k_matvec<WT, 1><<<grid, MV_THREADS, 0, st>>>(a);
            break;
        case 2:
            k_matvec<WT, 2><<<grid, MV_THREADS, 0, st>>>(a);
            break;
        case 4:
            k_matvec<WT, 4><<<grid, MV_THREADS, 0, st>>>(a);
            break;
        default:
            k_matvec<WT, 8><<<grid, MV_THREADS, 0, st>>>(a);
            break;
        }
    }
    GPU_LAUNCH_CHECK(name, st);
    return FORGE_OK;
fail:
    return rc;
}

/* Any alignment, any n_in: plain types only, one element per lane step. */
template <int WT>
__global__ void __launch_bounds__(MV_THREADS) k_matvec_scalar(const mv_args a0)
{
    mv_args a = a0;
    if (!mv_row(a)) return;
    const int lane = threadIdx.x % GPU_SEG;
    const int row = blockIdx.x * MV_ROWS_PER_BLOCK + threadIdx.x / GPU_SEG;
    if (row >= a.n_out) return;
    const uint8_t *wrow = a.w + (size_t)row * a.row_bytes;
    float acc = 0.0f;
    for (int i = lane; i < a.n_in; i += GPU_SEG) {
        float w;
        if (WT == GGML_TYPE_F32)
            w = ((const float *)wrow)[i];
        else if (WT == GGML_TYPE_F16)
            w = gpu_fp16_to_f32(((const unsigned short *)wrow)[i]);
        else
            w = gpu_bf16_to_f32(((const unsigned short *)wrow)[i]);
        acc += w * a.x[i];
    }
    acc = gpu_seg_sum(acc);
    if (lane == 0) a.y[row] = acc;
}

/* ---- embedding rows ---------------------------------------------------------------------------
 */
template <int WT>
GPU_DEVT float embed_elem(const uint8_t *table, const unsigned short *scales, int64_t row,
                          int64_t n_embd, int64_t i)
{
    if (WT == GGML_TYPE_F32) return ((const float *)table)[row * n_embd + i];
    if (WT == GGML_TYPE_F16)
        return gpu_fp16_to_f32(((const unsigned short *)table)[row * n_embd + i]);
    if (WT == GGML_TYPE_BF16)
        return gpu_bf16_to_f32(((const unsigned short *)table)[row * n_embd + i]);
    int64_t blk = row * (n_embd / QK) + i / QK;
    float d = gpu_fp16_to_f32(scales[blk]);
    if (WT == GGML_TYPE_Q8_0) return d * (float)((const int8_t *)table)[row * n_embd + i];
    int j = (int)(i % QK);
    uint8_t byte = table[blk * 16 + (j & 15)];
    int nib = j < 16 ? (byte & 15) : (byte >> 4);
    return d * (float)(nib - 8);
}

/* grid (ceil(n_embd / threads), n_tokens) */
template <int WT>
__global__ void k_embed(const uint8_t *__restrict__ table,
                        const unsigned short *__restrict__ scales, int64_t n_vocab, int64_t n_embd,
                        const int32_t *__restrict__ ids, float *__restrict__ out)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    int64_t t = blockIdx.y;
    if (i >= n_embd) return;
    int32_t id = ids[t];
    float v;
    if (id < 0 || id >= n_vocab)
        v = __int_as_float(0x7fc00000); /* NaN: the caller passed a bad id */
    else
        v = embed_elem<WT>(table, scales, id, n_embd, i);
    out[t * n_embd + i] = v;
}

/* ---- launchers --------------------------------------------------------------------------------
 */
GPU_API int gpu_weight_convert(int wtype, const void *d_src, void *d_dst, int64_t n_rows,
                               int64_t n_in, gpu_stream *s, forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    size_t bytes = gpu_weight_bytes(wtype, n_rows, n_in);
    if (bytes == 0)
        return gpu_err_set(err, FORGE_E_UNSUPPORTED,
                           "gpu_weight_convert: type %s with %lld x %lld is not supported",
                           gpu_type_name(wtype), (long long)n_rows, (long long)n_in);
    if (!d_src || !d_dst || !gpu_is_aligned(d_src, 2) || !gpu_is_aligned(d_dst, 16))
        return gpu_err_set(err, FORGE_E_INVALID,
                           "gpu_weight_convert: NULL or misaligned buffer (src %p, dst %p)", d_src,
                           d_dst);
    if (is_gq(wtype)) return gq_weight_convert(wtype, d_src, d_dst, n_rows, n_in, st, err);
    if (!is_quant(wtype)) {
        GPU_CHECK(cudaMemcpyAsync(d_dst, d_src, bytes, cudaMemcpyDeviceToDevice, st));
        return FORGE_OK;
    }
    {
        int64_t n_blocks = n_rows * (n_in / QK);
        uint8_t *q = (uint8_t *)d_dst;
        unsigned short *d = (unsigned short *)(q + gpu_weight_scales_offset(wtype, n_rows, n_in));
        unsigned grid = (unsigned)((n_blocks + 255) / 256);
        if (wtype == GGML_TYPE_Q8_0) {
            k_weight_convert<34, 32><<<grid, 256, 0, st>>>((const uint8_t *)d_src, q, d, n_blocks);
            GPU_LAUNCH_CHECK("k_weight_convert<Q8_0>", st);
        } else {
            k_weight_convert<18, 16><<<grid, 256, 0, st>>>((const uint8_t *)d_src, q, d, n_blocks);
            GPU_LAUNCH_CHECK("k_weight_convert<Q4_0>", st);
        }
    }
    return FORGE_OK;
fail:
    return rc;
}

GPU_API int gpu_act_quantize(const float *d_x, int64_t n_in, void *d_xq, gpu_stream *s,
                             forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    if (n_in <= 0 || n_in % QK || n_in > INT32_MAX)
        return gpu_err_set(err, FORGE_E_INVALID,
                           "gpu_act_quantize: n_in %lld is not a positive multiple of 32",
                           (long long)n_in);
    if (!d_x || !d_xq || !gpu_is_aligned(d_xq, 16))
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_act_quantize: NULL or misaligned buffer");
    {
        int n_blocks = (int)(n_in / QK);
        uint8_t *base = (uint8_t *)d_xq;
        int per_cta = 256 / GPU_SEG;
        gpu_launch_pdl(k_act_quantize, dim3((n_blocks + per_cta - 1) / per_cta), dim3(256), 0, st,
                       d_x, (int8_t *)base, (float *)(base + gpu_act_d_offset(n_in)),
                       (int *)(base + gpu_act_s_offset(n_in)), n_blocks);
        GPU_LAUNCH_CHECK("k_act_quantize", st);
    }
    return FORGE_OK;
fail:
    return rc;
}

/* gpu_matvec over n_rows activation rows (blockIdx.y), rows with d_run[r] == 0 skipped. */
static int matvec_impl(int wtype, const void *d_w, int64_t n_out, int64_t n_in, const float *d_x,
                       const void *d_xq, float *d_y, int64_t n_rows, const int32_t *d_run,
                       gpu_stream *s, forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    mv_args a;
    size_t rb = plane_row_bytes(wtype, n_in);
    const int64_t n_all = n_in * n_rows; /* the quantized activations' layout covers all rows */
    if (n_rows < 1 || n_rows > 65535)
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_matvec: %lld activation rows",
                           (long long)n_rows);
    if (is_gq(wtype)) {
        const int64_t qk = gq_geom_of(wtype).qk;
        if (n_out <= 0 || n_in <= 0 || n_out > INT32_MAX || n_in > INT32_MAX || n_in % qk)
            return gpu_err_set(err, FORGE_E_INVALID,
                               "gpu_matvec: %s needs n_in a multiple of %lld, got %lld x %lld",
                               gpu_type_name(wtype), (long long)qk, (long long)n_out,
                               (long long)n_in);
        if (!d_w || !d_y || !d_xq || !gpu_is_aligned(d_w, 16) || !gpu_is_aligned(d_xq, 16))
            return gpu_err_set(err, FORGE_E_INVALID,
                               "gpu_matvec: %s needs 16-byte aligned weights and quantized "
                               "activations (w %p, xq %p)",
                               gpu_type_name(wtype), d_w, d_xq);
        const uint8_t *xb = (const uint8_t *)d_xq;
        return gq_matvec(wtype, d_w, n_out, n_in, (const int8_t *)xb,
                         (const float *)(xb + gpu_act_d_offset(n_all)),
                         (const int *)(xb + gpu_act_s_offset(n_all)), d_y, n_rows, d_run, st, err);
    }
    if (rb == 0)
        return gpu_err_set(err, FORGE_E_UNSUPPORTED,
                           "gpu_matvec: weight type %s with n_in %lld is not supported "
                           "(F32, F16, BF16; Q8_0/Q4_0 need n_in %% 32 == 0)",
                           gpu_type_name(wtype), (long long)n_in);
    if (n_out <= 0 || n_in <= 0 || n_out > INT32_MAX || n_in > INT32_MAX)
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_matvec: bad shape %lld x %lld",
                           (long long)n_out, (long long)n_in);
    if (!d_w || !d_y || (is_quant(wtype) ? !d_xq : !d_x))
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_matvec: NULL buffer");
    if (is_quant(wtype) && (!gpu_is_aligned(d_w, 16) || !gpu_is_aligned(d_xq, 16)))
        return gpu_err_set(err, FORGE_E_INVALID,
                           "gpu_matvec: %s weights and quantized activations must be 16-byte "
                           "aligned (w %p, xq %p)",
                           gpu_type_name(wtype), d_w, d_xq);
    a.w = (const uint8_t *)d_w;
    a.scales = is_quant(wtype)
                   ? (const unsigned short *)(a.w + gpu_weight_scales_offset(wtype, n_out, n_in))
                   : NULL;
    a.x = d_x;
    a.xq = (const int8_t *)d_xq;
    a.xd = d_xq ? (const float *)((const uint8_t *)d_xq + gpu_act_d_offset(n_all)) : NULL;
    a.xs = d_xq ? (const int *)((const uint8_t *)d_xq + gpu_act_s_offset(n_all)) : NULL;
    a.y = d_y;
    a.n_out = (int)n_out;
    a.n_in = (int)n_in;
    a.row_bytes = rb;
    a.run = d_run;
    a.n_rows = (int)n_rows;
    {
        dim3 grid((unsigned)((n_out + MV_ROWS_PER_BLOCK - 1) / MV_ROWS_PER_BLOCK),
                  (unsigned)n_rows);
        bool vec = rb % 16 == 0 && gpu_is_aligned(d_w, 16) && (!d_x || gpu_is_aligned(d_x, 16));
        switch (wtype) {
        case GGML_TYPE_Q8_0:
            rc = launch_matvec<GGML_TYPE_Q8_0>(a, st, "k_matvec<Q8_0>", err);
            break;
        case GGML_TYPE_Q4_0:
            rc = launch_matvec<GGML_TYPE_Q4_0>(a, st, "k_matvec<Q4_0>", err);
            break;
        case GGML_TYPE_F32:
            if (vec) {
                rc = launch_matvec<GGML_TYPE_F32>(a, st, "k_matvec<F32>", err);
            } else {
                k_matvec_scalar<GGML_TYPE_F32><<<grid, MV_THREADS, 0, st>>>(a);
                GPU_LAUNCH_CHECK("k_matvec_scalar<F32>", st);
            }
            break;
        case GGML_TYPE_F16:
            if (vec) {
                rc = launch_matvec<GGML_TYPE_F16>(a, st, "k_matvec<F16>", err);
            } else {
                k_matvec_scalar<GGML_TYPE_F16><<<grid, MV_THREADS, 0, st>>>(a);
                GPU_LAUNCH_CHECK("k_matvec_scalar<F16>", st);
            }
            break;
        default: /* BF16 */
            if (vec) {
                rc = launch_matvec<GGML_TYPE_BF16>(a, st, "k_matvec<BF16>", err);
            } else {
                k_matvec_scalar<GGML_TYPE_BF16><<<grid, MV_THREADS, 0, st>>>(a);
                GPU_LAUNCH_CHECK("k_matvec_scalar<BF16>", st);
            }
            break;
        }
        if (rc) goto fail;
    }
    return FORGE_OK;
fail:
    return rc;
}

GPU_API int gpu_matvec(int wtype, const void *d_w, int64_t n_out, int64_t n_in, const float *d_x,
                       const void *d_xq, float *d_y, gpu_stream *s, forge_err *err)
{
    return matvec_impl(wtype, d_w, n_out, n_in, d_x, d_xq, d_y, 1, NULL, s, err);
}

GPU_API int gpu_matvec_rows(int wtype, const void *d_w, int64_t n_out, int64_t n_in,
                            int64_t n_rows, const float *d_x, const void *d_xq, float *d_y,
                            const int32_t *d_run, gpu_stream *s, forge_err *err)
{
    return matvec_impl(wtype, d_w, n_out, n_in, d_x, d_xq, d_y, n_rows, d_run, s, err);
}

GPU_API int gpu_embed(int wtype, const void *d_table, int64_t n_vocab, int64_t n_embd,
                      const int32_t *d_ids, int64_t n_tokens, float *d_out, gpu_stream *s,
                      forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    const uint8_t *t = (const uint8_t *)d_table;
    const unsigned short *sc = NULL;
    if (gpu_weight_bytes(wtype, n_vocab, n_embd) == 0)
        return gpu_err_set(err, FORGE_E_UNSUPPORTED,
                           "gpu_embed: table type %s with %lld x %lld is not supported",
                           gpu_type_name(wtype), (long long)n_vocab, (long long)n_embd);
    if (!d_table || !d_ids || !d_out || n_tokens <= 0 || n_tokens > 65535)
        return gpu_err_set(err, FORGE_E_INVALID,
                           "gpu_embed: NULL buffer or n_tokens %lld outside 1..65535",
                           (long long)n_tokens);
    if (is_gq(wtype)) {
        if (!gpu_is_aligned(d_table, 16))
            return gpu_err_set(err, FORGE_E_INVALID, "gpu_embed: table %p is not 16-byte aligned",
                               d_table);
        return gq_embed(wtype, d_table, n_vocab, n_embd, d_ids, n_tokens, d_out, st, err);
    }
    if (is_quant(wtype))
        sc = (const unsigned short *)(t + gpu_weight_scales_offset(wtype, n_vocab, n_embd));
    {
        dim3 grid((unsigned)((n_embd + 255) / 256), (unsigned)n_tokens);
        switch (wtype) {
        case GGML_TYPE_F32:
            k_embed<GGML_TYPE_F32><<<grid, 256, 0, st>>>(t, sc, n_vocab, n_embd, d_ids, d_out);
            break;
        case GGML_TYPE_F16:
            k_embed<GGML_TYPE_F16><<<grid, 256, 0, st>>>(t, sc, n_vocab, n_embd, d_ids, d_out);
            break;
        case GGML_TYPE_BF16:
            k_embed<GGML_TYPE_BF16><<<grid, 256, 0, st>>>(t, sc, n_vocab, n_embd, d_ids, d_out);
            break;
        case GGML_TYPE_Q8_0:
            k_embed<GGML_TYPE_Q8_0><<<grid, 256, 0, st>>>(t, sc, n_vocab, n_embd, d_ids, d_out);
            break;
        default:
            k_embed<GGML_TYPE_Q4_0><<<grid, 256, 0, st>>>(t, sc, n_vocab, n_embd, d_ids, d_out);
            break;
        }
        GPU_LAUNCH_CHECK("k_embed", st);
    }
    return FORGE_OK;
fail:
    return rc;
}
