/* gpu_ops.cu - the element-wise and reduction kernels of the decode step: RMSNorm, RoPE (NORM and
 * NEOX), SwiGLU, residual add and greedy argmax. Each kernel follows the scalar definition in
 * gpu_ops.h; reductions work in 32-lane segments (GPU_SEG), so they are correct on wave32 and
 * wave64 alike. Matvec, embedding rows and attention live in their own files. */
#include <math.h>

#include "gpu/gpu_common.cuh"
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

/* One thread per rotated pair. x: [n_tok][n_heads][head_dim]. */
__global__ void k_rope(float *x, int n_tok, int n_heads, int head_dim, int n_dims, int neox,
                       const int32_t *__restrict__ pos, float theta_scale, float freq_scale,
                       const float *__restrict__ freq_factors)
{
    int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    int half = n_dims / 2;
    int64_t total = (int64_t)n_tok * n_heads * half;
    if (idx >= total) return;
    int i = (int)(idx % half);
    int64_t th = idx / half; /* token * n_heads + head */
    int t = (int)(th / n_heads);
    float *h = x + th * head_dim;
    float theta = (float)pos[t] * powf(theta_scale, (float)i);
    if (freq_factors) theta /= freq_factors[i];
    theta *= freq_scale;
    float s, c;
    sincosf(theta, &s, &c);
    int i0 = neox ? i : 2 * i, i1 = neox ? i + half : 2 * i + 1;
    float x0 = h[i0], x1 = h[i1];
    h[i0] = x0 * c - x1 * s;
    h[i1] = x0 * s + x1 * c;
}

__global__ void k_swiglu(const float *g, const float *u, float *out, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float gv = g[i];
        out[i] = gv / (1.0f + expf(-gv)) * u[i];
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
    k_rmsnorm<<<(unsigned)n_rows, n >= 1024 ? 1024 : 256, 0, st>>>(d_x, d_w, d_y, n, eps);
    GPU_LAUNCH_CHECK("k_rmsnorm", st);
    return FORGE_OK;
fail:
    return rc;
}

GPU_API int gpu_rope(float *d_x, int64_t n_tok, int64_t n_heads, int64_t head_dim, int64_t n_dims,
                     int mode, const int32_t *d_pos, float freq_base, float freq_scale,
                     const float *d_freq_factors, gpu_stream *s, forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    if (!d_x || !d_pos || n_tok <= 0 || n_heads <= 0 || head_dim <= 0 || n_dims <= 0 ||
        n_dims % 2 || n_dims > head_dim || n_tok * n_heads * head_dim > INT32_MAX)
        return gpu_err_set(err, FORGE_E_INVALID,
                           "gpu_rope: bad arguments (n_tok %lld, n_heads %lld, head_dim %lld, "
                           "n_dims %lld: need even n_dims <= head_dim)",
                           (long long)n_tok, (long long)n_heads, (long long)head_dim,
                           (long long)n_dims);
    if (mode != GPU_ROPE_NORM && mode != GPU_ROPE_NEOX)
        return gpu_err_set(err, FORGE_E_UNSUPPORTED,
                           "gpu_rope: mode %d is not NORM (0) or NEOX (2)", mode);
    {
        float theta_scale = powf(freq_base, -2.0f / (float)n_dims);
        int64_t pairs = n_tok * n_heads * (n_dims / 2);
        k_rope<<<(unsigned)((pairs + 255) / 256), 256, 0, st>>>(
            d_x, (int)n_tok, (int)n_heads, (int)head_dim, (int)n_dims, mode == GPU_ROPE_NEOX, d_pos,
            theta_scale, freq_scale, d_freq_factors);
        GPU_LAUNCH_CHECK("k_rope", st);
    }
    return FORGE_OK;
fail:
    return rc;
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
