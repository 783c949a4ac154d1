/* gpu_ops.cu - the element-wise and reduction kernels of the decode step: RMSNorm, RoPE (NORM and
 * NEOX, YaRN; alone or fused with the Q/K norm and the KV-cache store), SwiGLU, residual add and
 * greedy argmax. Each kernel follows the scalar definition in
 * gpu_ops.h; reductions work in 32-lane segments (GPU_SEG), so they are correct on wave32 and
 * wave64 alike. Matvec, embedding rows and attention live in their own files. */
#include <math.h>
#include <string.h>

#include "gpu/gpu_common.cuh"
#include "gpu/gpu_invariant.cuh"
#include "gpu/gpu_ops.h"
#include "gpu/gpu_vendor.h"

/* Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the total.
 * sh: 32 floats of shared memory. */
GPU_DEV float block_sum(float v, float *sh)
{
    int seg = threadIdx.x / GPU_SEG, lane = threadIdx.x % GPU_SEG;
    int n_seg = blockDim.x / GPU_SEG;
    v = gpu_seg_sum(v);
    __syncthreads(); /* sh may still be read by a previous call */
    if (lane == 0) sh[seg] = v;
    __syncthreads();
    v = lane < n_seg ? sh[lane] : 0.0f;
    return gpu_seg_sum(v);
}

__global__ void k_rmsnorm(const float *x, const float *__restrict__ w, float *y, int64_t n,
                          float eps)
{
    __shared__ float sh[32];
    const float *xr = x + (int64_t)blockIdx.x * n;
    float *yr = y + (int64_t)blockIdx.x * n;
    float ss = 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        ss += xr[i] * xr[i];
    ss = block_sum(ss, sh);
    float scale = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        yr[i] = xr[i] * scale * w[i];
}

/* Rows of n % 4 == 0 floats, 16-byte aligned: in the order the fused matvec's prologue uses
 * (gpu_invariant.cuh), so the unfused decode path gives its bits. GPU_RMS_THREADS threads. */
__global__ void __launch_bounds__(GPU_RMS_THREADS)
    k_rmsnorm4(const float *x, const float *__restrict__ w, float *y, int n, float eps)
{
    __shared__ float red[GPU_RMS_THREADS / GPU_SEG];
    const float4 *xr = (const float4 *)(x + (int64_t)blockIdx.x * n);
    const float4 *w4 = (const float4 *)w;
    float4 *yr = (float4 *)(y + (int64_t)blockIdx.x * n);
    const float scale = gpu_rms_scale(xr, n, eps, red);
    for (int i = threadIdx.x; i < n / 4; i += GPU_RMS_THREADS)
        yr[i] = gpu_rms_apply(xr[i], scale, w4[i]);
}

/* ---- a batch's RMSNorm or SwiGLU with the Q8_0 blocks of its result ---------------------------
 * For the multi-row decode products: y as gpu_rmsnorm / gpu_swiglu give it and, in the same
 * launch, y's Q8_0 blocks as gpu_act_quantize gives them (gpu_q8_block8), in its scratch layout
 * for all the rows at once (gpu_act_d_offset). One launch where there were two. Rows of n
 * (n % 32 == 0) floats: 8 lanes per block of 32, a float4 each, every lane of a segment through
 * the same trip count (blocks past the end compute zeros and store nothing). */
struct q8_out {
    int8_t *q;
    float *d;
    int *s;
};

static q8_out q8_out_of(void *d_xq, int64_t n_all)
{
    uint8_t *b = (uint8_t *)d_xq;
    return {(int8_t *)b, (float *)(b + gpu_act_d_offset(n_all)),
            (int *)(b + gpu_act_s_offset(n_all))};
}

/* Block b (global, of the whole scratch) from the float4 of lane k of its 8. */
GPU_DEV void q8_put(const q8_out &o, int64_t b, int k, float4 v, bool ok)
{
    float d;
    int sum;
    const int packed = gpu_q8_block8(v, &d, &sum);
    if (!ok) return;
    ((int *)o.q)[b * 8 + k] = packed;
    if (k == 0) {
        o.d[b] = d;
        o.s[b] = sum;
    }
}

/* One block of GPU_RMS_THREADS per row: k_rmsnorm4's row, then its blocks. */
__global__ void __launch_bounds__(GPU_RMS_THREADS)
    k_rmsnorm_q8(const float *x, const float *__restrict__ w, float *y, int n, float eps,
                 const q8_out o)
{
    __shared__ float red[GPU_RMS_THREADS / GPU_SEG];
    gpu_pdl_trigger(); /* the products after it may load their weights meanwhile */
    gpu_pdl_wait(); /* launched with PDL (gpu_launch_pdl): first of all */
    const float4 *xr = (const float4 *)(x + (int64_t)blockIdx.x * n);
    const float4 *w4 = (const float4 *)w;
    float4 *yr = (float4 *)(y + (int64_t)blockIdx.x * n);
    const float scale = gpu_rms_scale(xr, n, eps, red);
    const int n4 = n / 4;
    for (int base = 0; base < n4; base += GPU_RMS_THREADS) {
        const int i = base + (int)threadIdx.x;
        const bool ok = i < n4;
        const float4 v = ok ? gpu_rms_apply(xr[i], scale, w4[i]) : make_float4(0.f, 0.f, 0.f, 0.f);
        if (ok) yr[i] = v;
        q8_put(o, ((int64_t)blockIdx.x * n4 + base + (int)threadIdx.x) / 8, (int)threadIdx.x % 8,
               v, ok);
    }
}

/* n_all % 32 == 0 values, 4 per thread. */
__global__ void k_swiglu_q8(const float *g, const float *u, float *out, int64_t n4,
                            const q8_out o)
{
    gpu_pdl_trigger();
    gpu_pdl_wait(); /* launched with PDL (gpu_launch_pdl): first of all */
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const bool ok = i < n4;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (ok) {
        const float4 gv = ((const float4 *)g)[i], uv = ((const float4 *)u)[i];
        v = make_float4(gpu_swiglu1(gv.x, uv.x), gpu_swiglu1(gv.y, uv.y), gpu_swiglu1(gv.z, uv.z),
                        gpu_swiglu1(gv.w, uv.w));
        ((float4 *)out)[i] = v;
    }
    q8_put(o, i / 8, (int)(i % 8), v, ok);
}

/* ---- RoPE (ggml's rope with YaRN), optionally fused with the Q/K norm and the KV store ---------
 * One 32-lane segment per (token, head): the n_head q heads of a token, then its n_kv_head k
 * heads (whose segments also store the v head). Lane l owns the rotated pairs i = l, l + 32, ...
 * and the unrotated dims n_dims + l, n_dims + l + 32, ...; it reads only the elements it writes,
 * so q is rotated in place without a barrier. Theta is built like the CPU backend's rope cache
 * (ggml_rope_cache_init): theta_i = pos * theta_scale * ... * theta_scale (i products, in
 * order), not powf(theta_scale, i), so the angles are the CPU's to the last bit; the YaRN mix
 * and the rotation use unfused products (__fmul_rn) for the same reason. */
struct rope_k_args {
    float *q;                 /* [n_tok][n_head][hd], in place */
    const float *k, *v;       /* [n_tok][n_kv_head][hd] (k, v unused when n_kv_head == 0) */
    const float *q_norm, *k_norm;
    float eps;
    int n_tok, n_head, n_kv_head, hd, n_dims, neox;
    float theta_scale, freq_scale, ext_factor, mscale, corr0, corr1;
    const float *ff;
    const int32_t *pos;
    const int32_t *slot; /* K/V cache row of token t (NULL: its position) */
    void *kc, *vc;
    int64_t pos_stride;
};

#define ROPE_THREADS 128

/* Element i of a cache row: float, or fp16 rounded to nearest even. */
template <int F16> GPU_DEVT void kv_put(void *base, int64_t i, float v)
{
    if (F16)
        ((unsigned short *)base)[i] = gpu_f32_to_fp16(v);
    else
        ((float *)base)[i] = v;
}

/* cos and sin (times mscale) of pair i whose unscaled angle is theta (the CPU's cache entry). */
GPU_DEV void rope_cs(const rope_k_args &a, int i, float theta, float &c, float &s)
{
    float extrap = a.ff ? theta / a.ff[i] : theta;
    float th = a.freq_scale * extrap;
    if (a.ext_factor != 0.0f) { /* ggml's rope_yarn_ramp */
        float y = ((float)i - a.corr0) / fmaxf(0.001f, a.corr1 - a.corr0);
        float ramp = (1.0f - fminf(1.0f, fmaxf(0.0f, y))) * a.ext_factor;
        th = __fadd_rn(__fmul_rn(th, 1.0f - ramp), __fmul_rn(extrap, ramp));
    }
    sincosf(th, &s, &c);
    c = c * a.mscale;
    s = s * a.mscale;
}

template <int KV_F16> __global__ void __launch_bounds__(ROPE_THREADS) k_qk_rope(const rope_k_args a)
{
    gpu_pdl_trigger();
    gpu_pdl_wait(); /* launched with PDL (gpu_launch_pdl): first of all */
    const int per_tok = a.n_head + a.n_kv_head;
    const int64_t sg = (int64_t)blockIdx.x * (ROPE_THREADS / GPU_SEG) + threadIdx.x / GPU_SEG;
    if (sg >= (int64_t)a.n_tok * per_tok) return; /* the whole segment: no barrier below */
    const int lane = threadIdx.x % GPU_SEG;
    const int t = (int)(sg / per_tok), h = (int)(sg % per_tok);
    const bool is_k = h >= a.n_head;
    const int hd = a.hd, half = a.n_dims / 2;
    const int kvh = h - a.n_head;
    const float *src = is_k ? a.k + ((int64_t)t * a.n_kv_head + kvh) * hd
                            : a.q + ((int64_t)t * a.n_head + h) * hd;
    const float *nw = is_k ? a.k_norm : a.q_norm;
    const int p = a.pos[t];
    float nscale = 1.0f;
    if (nw) { /* per-head RMSNorm over the elements this lane owns, then the segment */
        float ss = 0.0f;
        for (int i = lane; i < half; i += GPU_SEG) {
            int i0 = a.neox ? i : 2 * i, i1 = a.neox ? i + half : 2 * i + 1;
            ss += src[i0] * src[i0];
            ss += src[i1] * src[i1];
        }
        for (int d = a.n_dims + lane; d < hd; d += GPU_SEG)
            ss += src[d] * src[d];
        ss = gpu_seg_sum(ss);
        nscale = 1.0f / sqrtf(ss / (float)hd + a.eps);
    }
    const int64_t row = (int64_t)(a.slot ? a.slot[t] : p) * a.pos_stride +
                        (int64_t)kvh * hd; /* k/v cache element */
    float *qdst = a.q + ((int64_t)t * a.n_head + h) * hd;
    float theta = (float)p;
    int ti = 0; /* theta == pos * theta_scale^ti, built by repeated products */
    for (int i = lane; i < half; i += GPU_SEG) {
        while (ti < i) {
            theta = __fmul_rn(theta, a.theta_scale);
            ti++;
        }
        float c, s;
        rope_cs(a, i, theta, c, s);
        int i0 = a.neox ? i : 2 * i, i1 = a.neox ? i + half : 2 * i + 1;
        float x0 = src[i0], x1 = src[i1];
        if (nw) {
            x0 = x0 * nscale * nw[i0];
            x1 = x1 * nscale * nw[i1];
        }
        float y0 = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
        float y1 = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
        if (is_k) {
            kv_put<KV_F16>(a.kc, row + i0, y0);
            kv_put<KV_F16>(a.kc, row + i1, y1);
        } else {
            qdst[i0] = y0;
            qdst[i1] = y1;
        }
    }
    for (int d = a.n_dims + lane; d < hd; d += GPU_SEG) { /* the unrotated dims */
        float x = src[d];
        if (nw) x = x * nscale * nw[d];
        if (is_k)
            kv_put<KV_F16>(a.kc, row + d, x);
        else if (nw)
            qdst[d] = x;
    }
    if (is_k) {
        const float *vs = a.v + ((int64_t)t * a.n_kv_head + kvh) * hd;
        for (int d = lane; d < hd; d += GPU_SEG)
            kv_put<KV_F16>(a.vc, row + d, vs[d]);
    }
}

__global__ void k_swiglu(const float *g, const float *u, float *out, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        out[i] = gpu_swiglu1(g[i], u[i]);
    }
}

__global__ void k_add(const float *a, const float *b, float *out, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        out[i] = a[i] + b[i];
}

/* (value, index) pairs: index < 0 means "none yet". b wins over a when it is valid and larger,
 * or equal with a smaller index. */
GPU_DEV void argmax_merge(float &av, int &ai, float bv, int bi)
{
    if (bi >= 0 && (ai < 0 || bv > av || (bv == av && bi < ai))) {
        av = bv;
        ai = bi;
    }
}

#define ARGMAX_THREADS 1024

__global__ void __launch_bounds__(ARGMAX_THREADS)
    k_argmax(const float *__restrict__ x, int n, int32_t *idx_out)
{
    __shared__ float sv[32];
    __shared__ int si[32];
    float best = -INFINITY;
    int bi = -1;
    for (int i = threadIdx.x; i < n; i += ARGMAX_THREADS) {
        float v = x[i];
        if (v > best || (bi < 0 && !isnan(v))) { /* NaN never wins */
            best = v;
            bi = i;
        }
    }
#pragma unroll
    for (int m = GPU_SEG / 2; m > 0; m >>= 1) {
        float ov = gpu_shfl_xor(best, m, GPU_SEG);
        int oi = gpu_shfl_xor_int(bi, m, GPU_SEG);
        argmax_merge(best, bi, ov, oi);
    }
    int seg = threadIdx.x / GPU_SEG, lane = threadIdx.x % GPU_SEG;
    if (lane == 0) {
        sv[seg] = best;
        si[seg] = bi;
    }
    __syncthreads();
    if (seg == 0) {
        int n_seg = ARGMAX_THREADS / GPU_SEG;
        best = lane < n_seg ? sv[lane] : -INFINITY;
        bi = lane < n_seg ? si[lane] : -1;
#pragma unroll
        for (int m = GPU_SEG / 2; m > 0; m >>= 1) {
            float ov = gpu_shfl_xor(best, m, GPU_SEG);
            int oi = gpu_shfl_xor_int(bi, m, GPU_SEG);
            argmax_merge(best, bi, ov, oi);
        }
        if (lane == 0) *idx_out = bi < 0 ? 0 : bi;
    }
}

/* The same over many blocks: each block reduces its share, writes it to the scratch and takes a
 * ticket; the block that takes the last ticket merges all shares, writes the result and resets
 * the ticket counter, so the scratch is ready for the next call (it must be zeroed once). The
 * merge is order-independent (largest value, then smallest index), so the result is
 * deterministic. */
#define ARGMAX_MULTI_THREADS 512
struct argmax_scratch {
    float v[GPU_ARGMAX_MAX_BLOCKS];
    int i[GPU_ARGMAX_MAX_BLOCKS];
    unsigned ticket;
};

GPU_DEV void argmax_block(float &best, int &bi, float *sv, int *si)
{
#pragma unroll
    for (int m = GPU_SEG / 2; m > 0; m >>= 1) {
        float ov = gpu_shfl_xor(best, m, GPU_SEG);
        int oi = gpu_shfl_xor_int(bi, m, GPU_SEG);
        argmax_merge(best, bi, ov, oi);
    }
    const int seg = threadIdx.x / GPU_SEG, lane = threadIdx.x % GPU_SEG;
    if (lane == 0) {
        sv[seg] = best;
        si[seg] = bi;
    }
    __syncthreads();
    const int n_seg = blockDim.x / GPU_SEG;
    best = lane < n_seg ? sv[lane] : -INFINITY;
    bi = lane < n_seg ? si[lane] : -1;
#pragma unroll
    for (int m = GPU_SEG / 2; m > 0; m >>= 1) {
        float ov = gpu_shfl_xor(best, m, GPU_SEG);
        int oi = gpu_shfl_xor_int(bi, m, GPU_SEG);
        argmax_merge(best, bi, ov, oi);
    }
}

__global__ void __launch_bounds__(ARGMAX_MULTI_THREADS)
    k_argmax_multi(const float *__restrict__ x, int n, argmax_scratch *sc, int32_t *idx_out)
{
    __shared__ float sv[32];
    __shared__ int si[32];
    __shared__ bool last;
    gpu_pdl_trigger();
    float best = -INFINITY;
    int bi = -1;
    for (int i = blockIdx.x * ARGMAX_MULTI_THREADS + threadIdx.x; i < n;
         i += gridDim.x * ARGMAX_MULTI_THREADS) {
        float v = x[i];
        if (v > best || (bi < 0 && !isnan(v))) {
            best = v;
            bi = i;
        }
    }
    argmax_block(best, bi, sv, si);
    if (threadIdx.x == 0) {
        sc->v[blockIdx.x] = best;
        sc->i[blockIdx.x] = bi;
        __threadfence();
        last = atomicAdd(&sc->ticket, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    best = -INFINITY;
    bi = -1;
    for (int b = threadIdx.x; b < (int)gridDim.x; b += ARGMAX_MULTI_THREADS)
        argmax_merge(best, bi, ((volatile float *)sc->v)[b], ((volatile int *)sc->i)[b]);
    __syncthreads(); /* sv/si are reused */
    argmax_block(best, bi, sv, si);
    if (threadIdx.x == 0) {
        *idx_out = bi < 0 ? 0 : bi;
        sc->ticket = 0;
    }
}

/* 16-byte copy, grid-stride, four loads in flight per thread. */
__global__ void k_copy16(const uint4 *__restrict__ src, uint4 *__restrict__ dst, int64_t n)
{
    int64_t stride = (int64_t)gridDim.x * blockDim.x;
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
        uint4 a = gpu_ld_stream16(src + i), b = gpu_ld_stream16(src + i + stride);
        uint4 c = gpu_ld_stream16(src + i + 2 * stride), d = gpu_ld_stream16(src + i + 3 * stride);
        dst[i] = a;
        dst[i + stride] = b;
        dst[i + 2 * stride] = c;
        dst[i + 3 * stride] = d;
    }
    for (; i < n; i += stride)
        dst[i] = src[i];
}

/* ---- launchers --------------------------------------------------------------------------------
 */
static unsigned elementwise_grid(int64_t n)
{
    int64_t g = (n + 255) / 256;
    return (unsigned)(g > 65536 ? 65536 : (g < 1 ? 1 : g));
}

GPU_API int gpu_rmsnorm(const float *d_x, const float *d_w, float *d_y, int64_t n, int64_t n_rows,
                        float eps, gpu_stream *s, forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    if (!d_x || !d_w || !d_y || n <= 0 || n_rows <= 0 || n_rows > INT32_MAX)
        return gpu_err_set(err, FORGE_E_INVALID,
                           "gpu_rmsnorm: NULL buffer or bad shape %lld x %lld", (long long)n_rows,
                           (long long)n);
    if (n % 4 == 0 && n <= INT32_MAX && gpu_is_aligned(d_x, 16) && gpu_is_aligned(d_w, 16) &&
        gpu_is_aligned(d_y, 16)) {
        k_rmsnorm4<<<(unsigned)n_rows, GPU_RMS_THREADS, 0, st>>>(d_x, d_w, d_y, (int)n, eps);
        GPU_LAUNCH_CHECK("k_rmsnorm4", st);
    } else {
        k_rmsnorm<<<(unsigned)n_rows, n >= 1024 ? 1024 : 256, 0, st>>>(d_x, d_w, d_y, n, eps);
        GPU_LAUNCH_CHECK("k_rmsnorm", st);
    }
    return FORGE_OK;
fail:
    return rc;
}

/* The launch of k_qk_rope for q (n_head heads, in place) and optionally k/v (n_kv_head heads). */
static int qk_rope_launch(const rope_k_args &a, int kv_type, gpu_stream *s, forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    int64_t segs = (int64_t)a.n_tok * (a.n_head + a.n_kv_head);
    unsigned grid = (unsigned)((segs + ROPE_THREADS / GPU_SEG - 1) / (ROPE_THREADS / GPU_SEG));
    if (kv_type == GGML_TYPE_F16) {
        gpu_launch_pdl(k_qk_rope<1>, dim3(grid), dim3(ROPE_THREADS), 0, st, a);
        GPU_LAUNCH_CHECK("k_qk_rope<F16>", st);
    } else {
        gpu_launch_pdl(k_qk_rope<0>, dim3(grid), dim3(ROPE_THREADS), 0, st, a);
        GPU_LAUNCH_CHECK("k_qk_rope<F32>", st);
    }
    return FORGE_OK;
fail:
    return rc;
}

/* Checks the shape and fills the RoPE part of the kernel arguments (theta_scale and mscale on
 * the host, as the CPU computes them). */
static int rope_setup(rope_k_args &a, const char *who, int64_t n_tok, int64_t n_heads,
                      int64_t head_dim, const gpu_rope_params *r, const int32_t *d_pos,
                      forge_err *err)
{
    if (!r || !d_pos || n_tok <= 0 || n_heads <= 0 || head_dim <= 0 || r->n_dims <= 0 ||
        r->n_dims % 2 || r->n_dims > head_dim || n_tok * n_heads * head_dim > INT32_MAX)
        return gpu_err_set(err, FORGE_E_INVALID,
                           "%s: bad arguments (n_tok %lld, heads %lld, head_dim %lld, n_dims "
                           "%lld: need even n_dims <= head_dim)",
                           who, (long long)n_tok, (long long)n_heads, (long long)head_dim,
                           r ? (long long)r->n_dims : -1LL);
    if (r->mode != GPU_ROPE_NORM && r->mode != GPU_ROPE_NEOX)
        return gpu_err_set(err, FORGE_E_UNSUPPORTED, "%s: mode %d is not NORM (0) or NEOX (2)",
                           who, r->mode);
    if (r->ext_factor != 0.0f && !(r->freq_scale > 0.0f))
        return gpu_err_set(err, FORGE_E_INVALID, "%s: YaRN needs freq_scale > 0, got %g", who,
                           (double)r->freq_scale);
    memset(&a, 0, sizeof a);
    a.n_tok = (int)n_tok;
    a.hd = (int)head_dim;
    a.n_dims = (int)r->n_dims;
    a.neox = r->mode == GPU_ROPE_NEOX;
    a.theta_scale = powf(r->freq_base, -2.0f / (float)r->n_dims);
    a.freq_scale = r->freq_scale;
    a.ext_factor = r->ext_factor;
    a.mscale = r->attn_factor;
    if (r->ext_factor != 0.0f) a.mscale *= 1.0f + 0.1f * logf(1.0f / r->freq_scale);
    a.corr0 = r->corr_dims[0];
    a.corr1 = r->corr_dims[1];
    a.ff = r->d_freq_factors;
    a.pos = d_pos;
    return FORGE_OK;
}

GPU_API int gpu_rope_ext(float *d_x, int64_t n_tok, int64_t n_heads, int64_t head_dim,
                         const gpu_rope_params *rope, const int32_t *d_pos, gpu_stream *s,
                         forge_err *err)
{
    rope_k_args a = {};
    int rc;
    if (!d_x) return gpu_err_set(err, FORGE_E_INVALID, "gpu_rope: NULL buffer");
    if ((rc = rope_setup(a, "gpu_rope", n_tok, n_heads, head_dim, rope, d_pos, err))) return rc;
    a.q = d_x;
    a.n_head = (int)n_heads;
    return qk_rope_launch(a, GGML_TYPE_F32, s, err);
}

GPU_API int gpu_rope(float *d_x, int64_t n_tok, int64_t n_heads, int64_t head_dim, int64_t n_dims,
                     int mode, const int32_t *d_pos, float freq_base, float freq_scale,
                     const float *d_freq_factors, gpu_stream *s, forge_err *err)
{
    gpu_rope_params r;
    memset(&r, 0, sizeof r);
    r.mode = mode;
    r.n_dims = n_dims;
    r.freq_base = freq_base;
    r.freq_scale = freq_scale;
    r.d_freq_factors = d_freq_factors;
    r.ext_factor = 0.0f;
    r.attn_factor = 1.0f;
    return gpu_rope_ext(d_x, n_tok, n_heads, head_dim, &r, d_pos, s, err);
}

GPU_API int gpu_qk_rope_store_slots(float *d_q, const float *d_k, const float *d_v, int64_t n_tok,
                                    int64_t n_head, int64_t n_kv_head, int64_t head_dim,
                                    const float *d_q_norm, const float *d_k_norm, float eps,
                                    const gpu_rope_params *rope, const int32_t *d_pos,
                                    const int32_t *d_slot, void *d_kcache, void *d_vcache,
                                    int kv_type, int64_t pos_stride, gpu_stream *s, forge_err *err)
{
    rope_k_args a = {};
    int rc;
    if (!d_q || !d_k || !d_v || !d_kcache || !d_vcache)
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_qk_rope_store: NULL buffer");
    if (kv_type != GGML_TYPE_F32 && kv_type != GGML_TYPE_F16)
        return gpu_err_set(err, FORGE_E_UNSUPPORTED,
                           "gpu_qk_rope_store: KV cache type %s (F32 and F16 are supported)",
                           gpu_type_name(kv_type));
    if (n_kv_head <= 0 || n_head <= 0 || n_head + n_kv_head > INT32_MAX / 2 || head_dim <= 0 ||
        pos_stride < n_kv_head * head_dim || n_tok * n_kv_head * head_dim > INT32_MAX)
        return gpu_err_set(err, FORGE_E_INVALID,
                           "gpu_qk_rope_store: bad shape (heads %lld/%lld, head_dim %lld, "
                           "pos_stride %lld: need pos_stride >= n_kv_head * head_dim)",
                           (long long)n_head, (long long)n_kv_head, (long long)head_dim,
                           (long long)pos_stride);
    if ((rc = rope_setup(a, "gpu_qk_rope_store", n_tok, n_head, head_dim, rope, d_pos, err)))
        return rc;
    a.q = d_q;
    a.k = d_k;
    a.v = d_v;
    a.q_norm = d_q_norm;
    a.k_norm = d_k_norm;
    a.eps = eps;
    a.n_head = (int)n_head;
    a.n_kv_head = (int)n_kv_head;
    a.kc = d_kcache;
    a.vc = d_vcache;
    a.pos_stride = pos_stride;
    a.slot = d_slot;
    return qk_rope_launch(a, kv_type, s, err);
}

GPU_API int gpu_qk_rope_store(float *d_q, const float *d_k, const float *d_v, int64_t n_tok,
                              int64_t n_head, int64_t n_kv_head, int64_t head_dim,
                              const float *d_q_norm, const float *d_k_norm, float eps,
                              const gpu_rope_params *rope, const int32_t *d_pos, void *d_kcache,
                              void *d_vcache, int kv_type, int64_t pos_stride, gpu_stream *s,
                              forge_err *err)
{
    return gpu_qk_rope_store_slots(d_q, d_k, d_v, n_tok, n_head, n_kv_head, head_dim, d_q_norm,
                                   d_k_norm, eps, rope, d_pos, NULL, d_kcache, d_vcache, kv_type,
                                   pos_stride, s, err);
}

GPU_API int gpu_swiglu(const float *d_gate, const float *d_up, float *d_out, int64_t n,
                       gpu_stream *s, forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    if (!d_gate || !d_up || !d_out || n <= 0)
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_swiglu: NULL buffer or n %lld", (long long)n);
    k_swiglu<<<elementwise_grid(n), 256, 0, st>>>(d_gate, d_up, d_out, n);
    GPU_LAUNCH_CHECK("k_swiglu", st);
    return FORGE_OK;
fail:
    return rc;
}

GPU_API int gpu_rmsnorm_q8(const float *d_x, const float *d_w, float *d_y, int64_t n,
                           int64_t n_rows, float eps, void *d_xq, gpu_stream *s, forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    if (!d_x || !d_w || !d_y || !d_xq || n <= 0 || n % 32 || n > INT32_MAX / 4 || n_rows <= 0 ||
        n_rows > INT32_MAX || !gpu_is_aligned(d_x, 16) || !gpu_is_aligned(d_w, 16) ||
        !gpu_is_aligned(d_y, 16) || !gpu_is_aligned(d_xq, 16))
        return gpu_err_set(err, FORGE_E_INVALID,
                           "gpu_rmsnorm_q8: NULL or misaligned buffer, or rows of %lld (not a "
                           "multiple of 32) x %lld",
                           (long long)n, (long long)n_rows);
    gpu_launch_pdl(k_rmsnorm_q8, dim3((unsigned)n_rows), dim3(GPU_RMS_THREADS), 0, st, d_x, d_w,
                   d_y, (int)n, eps, q8_out_of(d_xq, n * n_rows));
    GPU_LAUNCH_CHECK("k_rmsnorm_q8", st);
    return FORGE_OK;
fail:
    return rc;
}

GPU_API int gpu_swiglu_q8(const float *d_gate, const float *d_up, float *d_out, int64_t n,
                          void *d_xq, gpu_stream *s, forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    if (!d_gate || !d_up || !d_out || !d_xq || n <= 0 || n % 32 || !gpu_is_aligned(d_gate, 16) ||
        !gpu_is_aligned(d_up, 16) || !gpu_is_aligned(d_out, 16) || !gpu_is_aligned(d_xq, 16))
        return gpu_err_set(err, FORGE_E_INVALID,
                           "gpu_swiglu_q8: NULL or misaligned buffer, or n %lld (not a multiple "
                           "of 32)",
                           (long long)n);
    const int64_t n4 = n / 4, grid = (n4 + 255) / 256;
    if (grid > INT32_MAX)
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_swiglu_q8: n %lld too large", (long long)n);
    gpu_launch_pdl(k_swiglu_q8, dim3((unsigned)grid), dim3(256), 0, st, d_gate, d_up, d_out, n4,
                   q8_out_of(d_xq, n));
    GPU_LAUNCH_CHECK("k_swiglu_q8", st);
    return FORGE_OK;
fail:
    return rc;
}

GPU_API int gpu_add(const float *d_a, const float *d_b, float *d_out, int64_t n, gpu_stream *s,
                    forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    if (!d_a || !d_b || !d_out || n <= 0)
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_add: NULL buffer or n %lld", (long long)n);
    k_add<<<elementwise_grid(n), 256, 0, st>>>(d_a, d_b, d_out, n);
    GPU_LAUNCH_CHECK("k_add", st);
    return FORGE_OK;
fail:
    return rc;
}

GPU_API int gpu_argmax(const float *d_x, int64_t n, int32_t *d_idx, gpu_stream *s, forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    if (!d_x || !d_idx || n <= 0 || n > INT32_MAX)
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_argmax: NULL buffer or n %lld", (long long)n);
    k_argmax<<<1, ARGMAX_THREADS, 0, st>>>(d_x, (int)n, d_idx);
    GPU_LAUNCH_CHECK("k_argmax", st);
    return FORGE_OK;
fail:
    return rc;
}

/* argmax_merge of the four elements i .. i + 3 held in v, NaN skipped. */
GPU_DEV void argmax_merge4(float &best, int &bi, float4 v, int i)
{
    const float e[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; j++)
        if (!isnan(e[j])) argmax_merge(best, bi, e[j], i + j);
}

/* One block per row: k_argmax's reduction over row blockIdx.x. A row that starts 16-byte
 * aligned is read as float4 with four loads in flight per thread (one block per row has one
 * SM's bandwidth only: scalar loads took 20 us for a 128256-entry row on the h100, fifteenth
 * session); ties go to the smallest index (argmax_merge), NaN never wins. */
__global__ void __launch_bounds__(ARGMAX_THREADS)
    k_argmax_rows(const float *__restrict__ x, int n, int64_t row_stride, int32_t *out)
{
    __shared__ float sv[32];
    __shared__ int si[32];
    const float *xr = x + (int64_t)blockIdx.x * row_stride;
    float best = -INFINITY;
    int bi = -1;
    int tail = 0; /* the scalar part starts here */
    if (((size_t)xr & 15) == 0) {
        const float4 *x4 = (const float4 *)xr;
        const int n4 = n / 4;
        int q = threadIdx.x;
        for (; q + 3 * ARGMAX_THREADS < n4; q += 4 * ARGMAX_THREADS) {
            float4 v[4];
#pragma unroll
            for (int u = 0; u < 4; u++)
                v[u] = x4[q + u * ARGMAX_THREADS];
#pragma unroll
            for (int u = 0; u < 4; u++)
                argmax_merge4(best, bi, v[u], 4 * (q + u * ARGMAX_THREADS));
        }
        for (; q < n4; q += ARGMAX_THREADS)
            argmax_merge4(best, bi, x4[q], 4 * q);
        tail = 4 * n4;
    }
    for (int i = tail + threadIdx.x; i < n; i += ARGMAX_THREADS)
        if (!isnan(xr[i])) argmax_merge(best, bi, xr[i], i);
    argmax_block(best, bi, sv, si);
    if (threadIdx.x == 0) out[blockIdx.x] = bi < 0 ? 0 : bi;
}

GPU_API int gpu_argmax_rows(const float *d_x, int64_t n_rows, int64_t n, int64_t row_stride,
                            int32_t *d_out, gpu_stream *s, forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    if (!d_x || !d_out || n <= 0 || n > INT32_MAX || n_rows <= 0 || n_rows > INT32_MAX ||
        row_stride < n)
        return gpu_err_set(err, FORGE_E_INVALID,
                           "gpu_argmax_rows: NULL buffer, %lld rows of %lld (stride %lld)",
                           (long long)n_rows, (long long)n, (long long)row_stride);
    k_argmax_rows<<<(unsigned)n_rows, ARGMAX_THREADS, 0, st>>>(d_x, (int)n, row_stride, d_out);
    GPU_LAUNCH_CHECK("k_argmax_rows", st);
    return FORGE_OK;
fail:
    return rc;
}

template <int BF16> __global__ void k_round_act(const float *x, float *y, int64_t n)
{
    gpu_pdl_trigger();
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        y[i] = BF16 ? gpu_bf16_round(x[i]) : gpu_fp16_to_f32(gpu_f32_to_fp16(x[i]));
}

GPU_API int gpu_round_act(const float *d_x, float *d_y, int64_t n, int wtype, gpu_stream *s,
                          forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    if (!d_x || !d_y || n <= 0 || (wtype != GGML_TYPE_F16 && wtype != GGML_TYPE_BF16))
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_round_act: NULL buffer, n %lld or type %s",
                           (long long)n, gpu_type_name(wtype));
    {
        int64_t g = (n + 255) / 256;
        unsigned grid = (unsigned)(g > 4096 ? 4096 : g);
        if (wtype == GGML_TYPE_BF16)
            k_round_act<1><<<grid, 256, 0, st>>>(d_x, d_y, n);
        else
            k_round_act<0><<<grid, 256, 0, st>>>(d_x, d_y, n);
        GPU_LAUNCH_CHECK("k_round_act", st);
    }
    return FORGE_OK;
fail:
    return rc;
}

GPU_API size_t gpu_argmax_scratch_bytes(void)
{
    return sizeof(argmax_scratch);
}

GPU_API int gpu_argmax_ex(const float *d_x, int64_t n, void *d_scratch, int32_t *d_idx,
                          gpu_stream *s, forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    if (!d_x || !d_idx || !d_scratch || n <= 0 || n > INT32_MAX)
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_argmax_ex: NULL buffer or n %lld",
                           (long long)n);
    {
        int64_t blocks = (n + 4 * ARGMAX_MULTI_THREADS - 1) / (4 * ARGMAX_MULTI_THREADS);
        if (blocks > GPU_ARGMAX_MAX_BLOCKS) blocks = GPU_ARGMAX_MAX_BLOCKS;
        k_argmax_multi<<<(unsigned)blocks, ARGMAX_MULTI_THREADS, 0, st>>>(
            d_x, (int)n, (argmax_scratch *)d_scratch, d_idx);
        GPU_LAUNCH_CHECK("k_argmax_multi", st);
    }
    return FORGE_OK;
fail:
    return rc;
}

GPU_API int gpu_copy(void *d_dst, const void *d_src, size_t bytes, gpu_stream *s, forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    if (bytes == 0) return FORGE_OK;
    if (!d_dst || !d_src) return gpu_err_set(err, FORGE_E_INVALID, "gpu_copy: NULL buffer");
    if (bytes % 16 || !gpu_is_aligned(d_dst, 16) || !gpu_is_aligned(d_src, 16)) {
        GPU_CHECK(cudaMemcpyAsync(d_dst, d_src, bytes, cudaMemcpyDeviceToDevice, st));
        return FORGE_OK;
    }
    {
        int64_t n = (int64_t)(bytes / 16);
        int64_t g = (n + 1023) / 1024;
        k_copy16<<<(unsigned)(g > 4096 ? 4096 : g), 256, 0, st>>>((const uint4 *)d_src,
                                                                  (uint4 *)d_dst, n);
        GPU_LAUNCH_CHECK("k_copy16", st);
    }
    return FORGE_OK;
fail:
    return rc;
}

/* ---- prompt-pass helpers: bias rows, KV store ------------------------------------------------ */
__global__ void k_add_rows(float *y, const float *__restrict__ b, int64_t n_rows, int64_t n)
{
    int64_t total = n_rows * n;
    int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride)
        y[i] += b[i % n];
}

__global__ void k_store_f16(const float *__restrict__ src, unsigned short *dst, int64_t n)
{
    int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        dst[i] = gpu_f32_to_fp16(src[i]);
}

GPU_API int gpu_add_rows(float *d_y, const float *d_b, int64_t n_rows, int64_t n, gpu_stream *s,
                         forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    if (!d_y || !d_b || n <= 0 || n_rows <= 0)
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_add_rows: NULL buffer or %lld x %lld",
                           (long long)n_rows, (long long)n);
    k_add_rows<<<elementwise_grid(n_rows * n), 256, 0, st>>>(d_y, d_b, n_rows, n);
    GPU_LAUNCH_CHECK("k_add_rows", st);
    return FORGE_OK;
fail:
    return rc;
}

GPU_API int gpu_store(const float *d_src, void *d_dst, int dst_type, int64_t n, gpu_stream *s,
                      forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    if (!d_src || !d_dst || n <= 0)
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_store: NULL buffer or n %lld", (long long)n);
    if (dst_type == GGML_TYPE_F32) return gpu_copy(d_dst, d_src, (size_t)n * 4, s, err);
    if (dst_type != GGML_TYPE_F16)
        return gpu_err_set(err, FORGE_E_UNSUPPORTED, "gpu_store: destination type %s",
                           gpu_type_name(dst_type));
    k_store_f16<<<elementwise_grid(n), 256, 0, st>>>(d_src, (unsigned short *)d_dst, n);
    GPU_LAUNCH_CHECK("k_store_f16", st);
    return FORGE_OK;
fail:
    return rc;
}

/* Store at a device-side position (the captured decode step): one row of n values. */
template <int F16>
__global__ void k_store_at(const float *__restrict__ src, void *dst, int64_t n,
                           const int32_t *__restrict__ pos, int64_t pos_stride)
{
    const int64_t base = (int64_t)pos[0] * pos_stride;
    int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        if (F16)
            ((unsigned short *)dst)[base + i] = gpu_f32_to_fp16(src[i]);
        else
            ((float *)dst)[base + i] = src[i];
    }
}

GPU_API int gpu_store_at(const float *d_src, void *d_dst, int dst_type, int64_t n,
                         const int32_t *d_pos, int64_t pos_stride, gpu_stream *s, forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    if (!d_src || !d_dst || !d_pos || n <= 0 || pos_stride < 0)
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_store_at: NULL buffer, n %lld or stride %lld",
                           (long long)n, (long long)pos_stride);
    if (dst_type == GGML_TYPE_F32) {
        k_store_at<0><<<elementwise_grid(n), 256, 0, st>>>(d_src, d_dst, n, d_pos, pos_stride);
        GPU_LAUNCH_CHECK("k_store_at<F32>", st);
    } else if (dst_type == GGML_TYPE_F16) {
        k_store_at<1><<<elementwise_grid(n), 256, 0, st>>>(d_src, d_dst, n, d_pos, pos_stride);
        GPU_LAUNCH_CHECK("k_store_at<F16>", st);
    } else {
        return gpu_err_set(err, FORGE_E_UNSUPPORTED, "gpu_store_at: destination type %s",
                           gpu_type_name(dst_type));
    }
    return FORGE_OK;
fail:
    return rc;
}
