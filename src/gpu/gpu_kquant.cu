/* gpu_kquant.cu - the kernels of the weight types in gpu_quant.cuh (Q4_1, Q5_0, Q5_1, IQ4_NL,
 * Q2_K..Q6_K, IQ4_XS, TQ1_0, TQ2_0), each written once over gq<T>::load:
 *   - k_gq_convert: GGUF blocks -> body plane + head plane (gpu_weight_convert), one thread per
 *     byte, so reads and writes are coalesced; k_gq_repack for the types rearranged within their
 *     blocks (gq_repack: Q4_K), one thread per sub-block;
 *   - k_gq_matvec: decode product with activations quantized to Q8_0 blocks (gpu_act_quantize,
 *     as ggml's CUDA backend quantizes them to Q8_1): one 32-lane segment per row (or SPR
 *     segments per row for few long rows), each lane takes one 32-element sub-block at a time,
 *     GQ_UNROLL of them loaded before the first is used; integer dp4a sums per half sub-block,
 *     scaled in float. Numerics: exact weights times Q8_0-rounded activations;
 *   - k_gq_embed: embedding rows (the CPU's dequantized values);
 *   - k_gq_to_f16: a matrix dequantized to fp16 rows for the prompt GEMM (gpu_weight_to_f16),
 *     into the backend's one scratch matrix (never the whole model).
 * The public launchers in gpu_matvec.cu / gpu_gemm.cu validate their arguments and call these. */
#include "gpu/gpu_ops.h"

#include "gpu/gpu_common.cuh"
#include "gpu/gpu_quant.cuh"
#include "gpu/gpu_vendor.h"

#define GQ_THREADS 256
#define GQ_SEGS (GQ_THREADS / GPU_SEG)
#define GQ_UNROLL 4
#define GQ_WARPS_PER_SM 40

template <int T> struct gq_plane {
    enum { HEAD = gq<T>::BLOCK - gq<T>::BODY, SB = gq<T>::ELEMS / 32 };
};

size_t gq_head_offset(int t, int64_t n_rows, int64_t n_in)
{
    const gq_geom g = gq_geom_of(t);
    if (g.qk == 0 || n_rows <= 0 || n_in <= 0 || n_in % g.qk) return 0;
    return gpu_round_up((size_t)n_rows * (size_t)(n_in / g.qk) * (size_t)g.body, 256);
}

size_t gq_weight_bytes(int t, int64_t n_rows, int64_t n_in)
{
    const gq_geom g = gq_geom_of(t);
    const size_t off = gq_head_offset(t, n_rows, n_in);
    if (off == 0) return 0;
    return off + (size_t)n_rows * (size_t)(n_in / g.qk) * (size_t)(g.block - g.body);
}

/* ---- kernels ---------------------------------------------------------------------------------
 */
template <int T>
__global__ void k_gq_convert(const uint8_t *__restrict__ src, uint8_t *__restrict__ body,
                             uint8_t *__restrict__ head, int64_t n_bytes)
{
    constexpr int BLOCK = gq<T>::BLOCK, OFF = gq<T>::BODY_OFF, BODY = gq<T>::BODY;
    constexpr int HEAD = gq_plane<T>::HEAD;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n_bytes;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t b = i / BLOCK;
        const int k = (int)(i % BLOCK);
        const uint8_t v = src[i];
        if (k >= OFF && k < OFF + BODY)
            body[b * BODY + (k - OFF)] = v;
        else
            head[b * HEAD + (k < OFF ? k : k - BODY)] = v;
    }
}

/* gq_repack types: one thread per sub-block of the matrix's blocks. */
template <int T>
__global__ void k_gq_repack(const uint8_t *__restrict__ src, uint8_t *__restrict__ body,
                            uint8_t *__restrict__ head, int64_t n_sub)
{
    constexpr int BLOCK = gq<T>::BLOCK, BODY = gq<T>::BODY, HEAD = gq_plane<T>::HEAD;
    constexpr int SB = gq_plane<T>::SB;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n_sub;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t b = i / SB;
        gq_repack<T>::repack(src + b * BLOCK, body + b * BODY, head + b * HEAD, (int)(i % SB));
    }
}

struct gq_mv_args {
    const uint8_t *body, *head;
    const int8_t *xq;
    const float *xd;
    const int *xs;
    float *y;
    int n_out, nb, nsb; /* rows, blocks per row, 32-element sub-blocks per row */
    /* several activation rows (blockIdx.y; gpu_matvec_rows): row r's activations at xq + r *
     * nsb * 32, xd / xs + r * nsb, its result at y + r * n_out; skipped when run[r] == 0 */
    const int32_t *run;
};

/* Point a at activation row blockIdx.y; false: the row is not run (the whole block leaves). */
GPU_DEV bool gq_row(gq_mv_args &a)
{
    const int r = blockIdx.y;
    if (a.run && a.run[r] == 0) return false;
    a.xq += (int64_t)r * a.nsb * 32;
    a.xd += (int64_t)r * a.nsb;
    a.xs += (int64_t)r * a.nsb;
    a.y += (int64_t)r * a.n_out;
    return true;
}

/* At most 64 registers (4 blocks of 256 per multiprocessor): without the bound the unrolled
 * decoded sub-blocks took 97 (Q4_K) to 116 (Q6_K) registers, 2 blocks per multiprocessor, and
 * 7B Q4_K_M decoded at 815 GB/s on H200; with it, no spills (ptxas -v). */
template <int T, int SPR>
__global__ void __launch_bounds__(GQ_THREADS, 4) k_gq_matvec(const gq_mv_args a0)
{
    gq_mv_args a = a0;
    if (!gq_row(a)) return; /* before any barrier, the whole block */
    constexpr int BODY = gq<T>::BODY, HEAD = gq_plane<T>::HEAD, SB = gq_plane<T>::SB;
    __shared__ float part[GQ_SEGS];
    const int lane = threadIdx.x % GPU_SEG, seg = threadIdx.x / GPU_SEG;
    const int row = blockIdx.x * (GQ_SEGS / SPR) + seg / SPR, sub = seg % SPR;
    const bool valid = row < a.n_out; /* no early return: SPR > 1 meets at a barrier */
    float acc = 0.0f;
    if (valid) {
        const uint8_t *brow = a.body + (size_t)row * a.nb * BODY;
        const uint8_t *hrow = a.head + (size_t)row * a.nb * HEAD;
        const int4 *x4 = (const int4 *)a.xq;
        const int step = GPU_SEG * SPR;
        for (int i0 = sub * GPU_SEG + lane; i0 < a.nsb; i0 += step * GQ_UNROLL) {
            gq_sub w[GQ_UNROLL];
#pragma unroll
            for (int u = 0; u < GQ_UNROLL; u++) {
                const int i = i0 + u * step;
                if (i < a.nsb) {
                    const int blk = i / SB;
                    w[u] = gq<T>::load(brow + (size_t)blk * BODY, hrow + (size_t)blk * HEAD,
                                       i % SB);
                }
            }
#pragma unroll
            for (int u = 0; u < GQ_UNROLL; u++) {
                const int i = i0 + u * step;
                if (i < a.nsb) acc += gq_dot<T>(w[u], x4[2 * i], x4[2 * i + 1], a.xd[i], a.xs[i]);
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
            float s = 0.0f;
#pragma unroll
            for (int k = 0; k < SPR; k++)
                s += part[seg + k];
            a.y[row] = s;
        }
    }
}

/* grid (ceil(nsb / threads), n_tokens): one thread per sub-block of a row. */
template <int T>
__global__ void k_gq_embed(const uint8_t *__restrict__ body, const uint8_t *__restrict__ head,
                           int64_t n_vocab, int64_t nb, int64_t n_embd,
                           const int32_t *__restrict__ ids, float *__restrict__ out)
{
    constexpr int BODY = gq<T>::BODY, HEAD = gq_plane<T>::HEAD, SB = gq_plane<T>::SB;
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t t = blockIdx.y;
    if (i >= n_embd / 32) return;
    const int32_t id = ids[t];
    float *o = out + t * n_embd + i * 32;
    if (id < 0 || id >= n_vocab) { /* NaN: the caller passed a bad id */
#pragma unroll
        for (int e = 0; e < 32; e++)
            o[e] = __int_as_float(0x7fc00000);
        return;
    }
    const int64_t gb = (int64_t)id * nb + i / SB;
    const gq_sub w = gq<T>::load(body + gb * BODY, head + gb * HEAD, (int)(i % SB));
#pragma unroll
    for (int e = 0; e < 32; e++)
        o[e] = gq_value<T>(w, e);
}

/* One thread per sub-block of the whole matrix (rows are contiguous, n_in a multiple of QK).
 * VEC: out is 16-byte aligned, 4 stores of 16 bytes per thread. */
template <int T, int VEC>
__global__ void k_gq_to_f16(const uint8_t *__restrict__ body, const uint8_t *__restrict__ head,
                            int64_t n_sub, unsigned short *__restrict__ out)
{
    constexpr int BODY = gq<T>::BODY, HEAD = gq_plane<T>::HEAD, SB = gq_plane<T>::SB;
    gpu_pdl_trigger();
    for (int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; g < n_sub;
         g += (int64_t)gridDim.x * blockDim.x) {
        const int64_t gb = g / SB;
        const gq_sub w = gq<T>::load(body + gb * BODY, head + gb * HEAD, (int)(g % SB));
        unsigned h[16];
#pragma unroll
        for (int e = 0; e < 16; e++)
            h[e] = (unsigned)gpu_f32_to_fp16(gq_value<T>(w, 2 * e)) |
                   ((unsigned)gpu_f32_to_fp16(gq_value<T>(w, 2 * e + 1)) << 16);
        if (VEC) {
            uint4 *o = (uint4 *)(out + g * 32);
#pragma unroll
            for (int k = 0; k < 4; k++) {
                uint4 v;
                v.x = h[4 * k];
                v.y = h[4 * k + 1];
                v.z = h[4 * k + 2];
                v.w = h[4 * k + 3];
                o[k] = v;
            }
        } else {
#pragma unroll
            for (int e = 0; e < 16; e++) {
                out[g * 32 + 2 * e] = (unsigned short)(h[e] & 0xffffu);
                out[g * 32 + 2 * e + 1] = (unsigned short)(h[e] >> 16);
            }
        }
    }
}

/* ---- launchers ------------------------------------------------------------------------------
 */
static unsigned grid_for(int64_t n, int threads)
{
    const int64_t g = (n + threads - 1) / threads;
    return (unsigned)(g > 65536 ? 65536 : g);
}

template <int T>
static int convert_t(const void *d_src, void *d_dst, int64_t n_rows, int64_t n_in,
                     cudaStream_t st, forge_err *err)
{
    int rc = FORGE_OK;
    const int64_t n_bytes = n_rows * (n_in / gq<T>::ELEMS) * gq<T>::BLOCK;
    uint8_t *body = (uint8_t *)d_dst;
    uint8_t *head = body + gq_head_offset(T, n_rows, n_in);
    if constexpr (gq_repack<T>::ON) {
        const int64_t n_sub = n_rows * (n_in / 32);
        k_gq_repack<T><<<grid_for(n_sub, 256), 256, 0, st>>>((const uint8_t *)d_src, body, head,
                                                              n_sub);
        GPU_LAUNCH_CHECK("k_gq_repack", st);
    } else {
        k_gq_convert<T><<<grid_for(n_bytes, 256), 256, 0, st>>>((const uint8_t *)d_src, body,
                                                                 head, n_bytes);
        GPU_LAUNCH_CHECK("k_gq_convert", st);
    }
    return FORGE_OK;
fail:
    return rc;
}

template <int T>
static int matvec_t(const gq_mv_args &a, int64_t n_rows, cudaStream_t st, forge_err *err)
{
    int rc = FORGE_OK;
    /* few long rows: segments share a row while the grid stays about one wave */
    const int64_t max_warps = (int64_t)(gpu_sm_count() > 0 ? gpu_sm_count() : 64) * GQ_WARPS_PER_SM;
    int spr = 1;
    while (spr < 8 && (int64_t)a.n_out * spr * 2 <= max_warps && a.nsb >= 32 * GQ_UNROLL * spr)
        spr *= 2;
    const unsigned per_block = GQ_SEGS / spr;
    const dim3 grid((unsigned)((a.n_out + per_block - 1) / per_block), (unsigned)n_rows);
    switch (spr) {
    case 1:
        k_gq_matvec<T, 1><<<grid, GQ_THREADS, 0, st>>>(a);
        break;
    case 2:
        k_gq_matvec<T, 2><<<grid, GQ_THREADS, 0, st>>>(a);
        break;
    case 4:
        k_gq_matvec<T, 4><<<grid, GQ_THREADS, 0, st>>>(a);
        break;
    default:
        k_gq_matvec<T, 8><<<grid, GQ_THREADS, 0, st>>>(a);
        break;
    }
    GPU_LAUNCH_CHECK("k_gq_matvec", st);
    return FORGE_OK;
fail:
    return rc;
}

template <int T>
static int embed_t(const void *d_table, int64_t n_vocab, int64_t n_embd, const int32_t *d_ids,
                   int64_t n_tokens, float *d_out, cudaStream_t st, forge_err *err)
{
    int rc = FORGE_OK;
    const uint8_t *body = (const uint8_t *)d_table;
    const uint8_t *head = body + gq_head_offset(T, n_vocab, n_embd);
    dim3 grid((unsigned)((n_embd / 32 + 127) / 128), (unsigned)n_tokens);
    k_gq_embed<T><<<grid, 128, 0, st>>>(body, head, n_vocab, n_embd / gq<T>::ELEMS, n_embd, d_ids,
                                        d_out);
    GPU_LAUNCH_CHECK("k_gq_embed", st);
    return FORGE_OK;
fail:
    return rc;
}

template <int T>
static int to_f16_t(const void *d_w, int64_t n_rows, int64_t n_in, void *d_out, cudaStream_t st,
                    forge_err *err)
{
    int rc = FORGE_OK;
    const uint8_t *body = (const uint8_t *)d_w;
    const uint8_t *head = body + gq_head_offset(T, n_rows, n_in);
    const int64_t n_sub = n_rows * (n_in / 32);
    if (gpu_is_aligned(d_out, 16))
        k_gq_to_f16<T, 1><<<grid_for(n_sub, 256), 256, 0, st>>>(body, head, n_sub,
                                                                 (unsigned short *)d_out);
    else
        k_gq_to_f16<T, 0><<<grid_for(n_sub, 256), 256, 0, st>>>(body, head, n_sub,
                                                                 (unsigned short *)d_out);
    GPU_LAUNCH_CHECK("k_gq_to_f16", st);
    return FORGE_OK;
fail:
    return rc;
}

#define GQ_CASE(T, CALL)                                                                           \
    case T:                                                                                        \
        return CALL;

int gq_weight_convert(int t, const void *d_src, void *d_dst, int64_t n_rows, int64_t n_in,
                      cudaStream_t st, forge_err *err)
{
    switch (t) {
#define C(T) GQ_CASE(T, convert_t<T>(d_src, d_dst, n_rows, n_in, st, err))
        GQ_TYPES(C)
#undef C
    default:
        return gpu_err_set(err, FORGE_E_UNSUPPORTED, "gpu_weight_convert: type %d", t);
    }
}

int gq_matvec(int t, const void *d_w, int64_t n_out, int64_t n_in, const int8_t *xq,
              const float *xd, const int *xs, float *d_y, int64_t n_rows, const int32_t *d_run,
              cudaStream_t st, forge_err *err)
{
    const gq_geom g = gq_geom_of(t);
    gq_mv_args a;
    if (g.qk == 0) return gpu_err_set(err, FORGE_E_UNSUPPORTED, "gpu_matvec: type %d", t);
    a.body = (const uint8_t *)d_w;
    a.head = a.body + gq_head_offset(t, n_out, n_in);
    a.xq = xq;
    a.xd = xd;
    a.xs = xs;
    a.y = d_y;
    a.n_out = (int)n_out;
    a.nb = (int)(n_in / g.qk);
    a.nsb = (int)(n_in / 32);
    a.run = d_run;
    switch (t) {
#define C(T) GQ_CASE(T, matvec_t<T>(a, n_rows, st, err))
        GQ_TYPES(C)
#undef C
    default:
        return gpu_err_set(err, FORGE_E_UNSUPPORTED, "gpu_matvec: type %d", t);
    }
}

int gq_embed(int t, const void *d_table, int64_t n_vocab, int64_t n_embd, const int32_t *d_ids,
             int64_t n_tokens, float *d_out, cudaStream_t st, forge_err *err)
{
    switch (t) {
#define C(T) GQ_CASE(T, embed_t<T>(d_table, n_vocab, n_embd, d_ids, n_tokens, d_out, st, err))
        GQ_TYPES(C)
#undef C
    default:
        return gpu_err_set(err, FORGE_E_UNSUPPORTED, "gpu_embed: type %d", t);
    }
}

int gq_weight_to_f16(int t, const void *d_w, int64_t n_rows, int64_t n_in, void *d_out,
                     cudaStream_t st, forge_err *err)
{
    switch (t) {
#define C(T) GQ_CASE(T, to_f16_t<T>(d_w, n_rows, n_in, d_out, st, err))
        GQ_TYPES(C)
#undef C
    default:
        return gpu_err_set(err, FORGE_E_UNSUPPORTED, "gpu_weight_to_f16: type %d", t);
    }
}
