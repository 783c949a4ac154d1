/* gpu_matvec_multi.cu - decode matrix-vector products of 2..GPU_MATVEC_MULTI_MAX activation rows
 * (a decode batch of several sequences) that read each weight chunk once for all rows: F32,
 * F16, BF16, Q8_0, Q4_0 in the device layout (gpu_ops.h).
 *
 * Batch invariance: every row's result equals gpu_matvec's for that row alone, bit for bit.
 * The kernel is gpu_matvec.cu's k_matvec with an accumulator per row: the same chunk dot
 * products (gpu_dot.cuh, the same expressions), the same lane-to-chunk assignment and order
 * (chunk c = lane, lane + 32 * SPR, ... in ascending order), the same segment shuffle sum, and
 * the same choice of SPR (segments per output row) from the matrix shape, so each row's sum is
 * formed in the same order. (gpu_matvec's two-rows-per-segment kernel accumulates in the SPR = 1
 * order too.) If gpu_matvec.cu changes how it splits a row, this file must follow: the test
 * tests/gpu/test_gpu_paged.c compares the two bit for bit. Shapes the 1-row path runs through
 * its scalar kernel (unaligned rows) are FORGE_E_UNSUPPORTED here: the caller runs rows one by
 * one. This file must not touch gpu_matvec.cu or gpu_dot.cuh (read only). */
#include <stdlib.h>

#include "gpu/gpu_common.cuh"
#include "gpu/gpu_dot.cuh"
#include "gpu/gpu_ops.h"
#include "gpu/gpu_vendor.h"

#define MM_THREADS 256 /* gpu_matvec.cu's MV_THREADS */
#define MM_ROWS_PER_BLOCK (MM_THREADS / GPU_SEG)
#define MM_WARPS_PER_SM 40 /* gpu_matvec.cu's MV_WARPS_PER_SM: the same SPR choice */
#define MM_UNROLL 4
#define QK 32

static int mm_is_quant(int t)
{
    return t == GGML_TYPE_Q8_0 || t == GGML_TYPE_Q4_0;
}

/* gpu_matvec.cu's plane_row_bytes */
static size_t mm_row_bytes(int t, int64_t n_in)
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

/* gpu_matvec.cu's activation scratch layout: int8 quants | float d | int sum(q) */
static size_t mm_act_d_offset(int64_t n)
{
    return gpu_round_up((size_t)n, 16);
}
static size_t mm_act_s_offset(int64_t n)
{
    return mm_act_d_offset(n) + gpu_round_up((size_t)(n / QK) * 4, 16);
}

struct mm_args {
    const uint8_t *w;
    const unsigned short *scales;
    const float *x;  /* [n_rows][n_in] */
    const int8_t *xq; /* [n_rows][n_in] */
    const float *xd;  /* [n_rows][n_in / 32] */
    const int *xs;    /* [n_rows][n_in / 32] */
    float *y;         /* [n_rows][n_out] */
    int n_out, n_in, n_rows;
    size_t row_bytes;
};

template <int WT> struct mm_ops;

template <> struct mm_ops<GGML_TYPE_F32> {
    static GPU_DEVT float dot(const mm_args &a, int r, int c, uint4 w, float dw)
    {
        return gpu_dot_f32x4(w, ((const float4 *)(a.x + (int64_t)r * a.n_in))[c]);
    }
};

template <int WT> struct mm_ops_half {
    static GPU_DEVT float dot(const mm_args &a, int r, int c, uint4 w, float dw)
    {
        const float4 *x = (const float4 *)(a.x + (int64_t)r * a.n_in);
        const float4 xa = x[2 * c], xb = x[2 * c + 1];
        return WT == GGML_TYPE_F16 ? gpu_dot_f16x8(w, xa, xb) : gpu_dot_bf16x8(w, xa, xb);
    }
};
template <> struct mm_ops<GGML_TYPE_F16> : mm_ops_half<GGML_TYPE_F16> {};
template <> struct mm_ops<GGML_TYPE_BF16> : mm_ops_half<GGML_TYPE_BF16> {};

template <> struct mm_ops<GGML_TYPE_Q8_0> {
    static GPU_DEVT float dot(const mm_args &a, int r, int c, uint4 w, float dw)
    {
        const int4 q = ((const int4 *)(a.xq + (int64_t)r * a.n_in))[c];
        const float xd = a.xd[(int64_t)r * (a.n_in / QK) + (c >> 1)];
        int s = gpu_dot_q8x16(w, q);
        return (float)s * (dw * xd);
    }
};

template <> struct mm_ops<GGML_TYPE_Q4_0> {
    static GPU_DEVT float dot(const mm_args &a, int r, int c, uint4 w, float dw)
    {
        const int4 *xq = (const int4 *)(a.xq + (int64_t)r * a.n_in);
        const int4 lo = xq[2 * c], hi = xq[2 * c + 1];
        const int64_t b = (int64_t)r * (a.n_in / QK) + c;
        const float xd = a.xd[b];
        const int xs = a.xs[b];
        int s = gpu_dot_q4x32(w, lo, hi);
        return (float)(s - 8 * xs) * (dw * xd);
    }
};

template <int WT> GPU_DEVT int mm_scale_index(int c)
{
    return WT == GGML_TYPE_Q8_0 ? c >> 1 : c;
}

/* k_matvec<WT, SPR> for NR activation rows (a.n_rows <= NR used). */
template <int WT, int SPR, int NR>
__global__ void __launch_bounds__(MM_THREADS) k_matvec_multi(const mm_args a)
{
    __shared__ float part[NR][MM_THREADS / GPU_SEG];
    const int lane = threadIdx.x % GPU_SEG, seg = threadIdx.x / GPU_SEG;
    const int row = blockIdx.x * (MM_ROWS_PER_BLOCK / SPR) + seg / SPR;
    const int sub = seg % SPR;
    const bool valid = row < a.n_out;
    const bool quant = WT == GGML_TYPE_Q8_0 || WT == GGML_TYPE_Q4_0;
    float acc[NR];
#pragma unroll
    for (int r = 0; r < NR; r++)
        acc[r] = 0.0f;
    if (valid) {
        const uint4 *wrow = (const uint4 *)(a.w + (size_t)row * a.row_bytes);
        const unsigned short *srow = quant ? a.scales + (size_t)row * (a.n_in / QK) : NULL;
        const int n_chunks = (int)(a.row_bytes / 16);
        const int step = GPU_SEG * SPR;
        for (int c0 = sub * GPU_SEG + lane; c0 < n_chunks; c0 += step * MM_UNROLL) {
            uint4 w[MM_UNROLL];
            unsigned short d[MM_UNROLL];
#pragma unroll
            for (int u = 0; u < MM_UNROLL; u++) {
                int c = c0 + u * step;
                if (c < n_chunks) {
                    w[u] = gpu_ld_stream16(wrow + c);
                    d[u] = quant ? srow[mm_scale_index<WT>(c)] : 0;
                }
            }
#pragma unroll
            for (int u = 0; u < MM_UNROLL; u++) {
                int c = c0 + u * step;
                if (c < n_chunks) {
                    const float dw = quant ? gpu_fp16_to_f32(d[u]) : 0.0f;
#pragma unroll
                    for (int r = 0; r < NR; r++)
                        if (r < a.n_rows) acc[r] += mm_ops<WT>::dot(a, r, c, w[u], dw);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < NR; r++)
        acc[r] = gpu_seg_sum(acc[r]);
    if (SPR == 1) {
        if (valid && lane == 0)
            for (int r = 0; r < a.n_rows; r++)
                a.y[(int64_t)r * a.n_out + row] = acc[r];
    } else {
        if (lane == 0) {
#pragma unroll
            for (int r = 0; r < NR; r++)
                part[r][seg] = acc[r];
        }
        __syncthreads();
        if (valid && sub == 0 && lane == 0) {
            for (int r = 0; r < a.n_rows; r++) {
                float sum = 0.0f;
#pragma unroll
                for (int i = 0; i < SPR; i++)
                    sum += part[r][seg + i];
                a.y[(int64_t)r * a.n_out + row] = sum;
            }
        }
    }
}

template <int WT, int SPR>
static void mm_launch_nr(const mm_args &a, unsigned grid, cudaStream_t st)
{
    if (a.n_rows <= 2)
        k_matvec_multi<WT, SPR, 2><<<grid, MM_THREADS, 0, st>>>(a);
    else if (a.n_rows <= 4)
        k_matvec_multi<WT, SPR, 4><<<grid, MM_THREADS, 0, st>>>(a);
    else if (a.n_rows <= 8)
        k_matvec_multi<WT, SPR, 8><<<grid, MM_THREADS, 0, st>>>(a);
    else
        k_matvec_multi<WT, SPR, 16><<<grid, MM_THREADS, 0, st>>>(a);
}

/* gpu_matvec.cu's launch_matvec choice of SPR */
template <int WT> static int mm_launch(const mm_args &a, cudaStream_t st, forge_err *err)
{
    int rc = FORGE_OK;
    const int n_chunks = (int)(a.row_bytes / 16);
    int spr = 1;
    const int64_t max_warps = (int64_t)(gpu_sm_count() > 0 ? gpu_sm_count() : 64) * MM_WARPS_PER_SM;
    while (spr < 8 && (int64_t)a.n_out * spr * 2 <= max_warps && n_chunks >= 64 * spr)
        spr *= 2;
    const unsigned rows_per_block = MM_ROWS_PER_BLOCK / spr;
    const unsigned grid = (unsigned)((a.n_out + rows_per_block - 1) / rows_per_block);
    switch (spr) {
    case 1:
        mm_launch_nr<WT, 1>(a, grid, st);
        break;
    case 2:
        mm_launch_nr<WT, 2>(a, grid, st);
        break;
    case 4:
        mm_launch_nr<WT, 4>(a, grid, st);
        break;
    default:
        mm_launch_nr<WT, 8>(a, grid, st);
        break;
    }
    GPU_LAUNCH_CHECK("k_matvec_multi", st);
    return FORGE_OK;
fail:
    return rc;
}

GPU_API int gpu_matvec_multi_supported(int wtype, int64_t n_in)
{
    size_t rb = mm_row_bytes(wtype, n_in);
    return n_in > 0 && rb != 0 && rb % 16 == 0;
}

GPU_API int gpu_matvec_multi(int wtype, const void *d_w, int64_t n_out, int64_t n_in,
                             int64_t n_rows, const float *d_x, const void *d_xq, float *d_y,
                             gpu_stream *s, forge_err *err)
{
    cudaStream_t st = GPU_STREAM(s);
    const bool q = mm_is_quant(wtype);
    if (!gpu_matvec_multi_supported(wtype, n_in))
        return gpu_err_set(err, FORGE_E_UNSUPPORTED,
                           "gpu_matvec_multi: weight type %s with n_in %lld (rows of a multiple "
                           "of 16 bytes only)",
                           gpu_type_name(wtype), (long long)n_in);
    if (n_rows < 1 || n_rows > GPU_MATVEC_MULTI_MAX || n_out <= 0 || n_out > INT32_MAX ||
        n_in > INT32_MAX || n_rows * n_in > INT32_MAX)
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_matvec_multi: %lld rows of %lld x %lld",
                           (long long)n_rows, (long long)n_out, (long long)n_in);
    if (!d_w || !d_y || (q ? !d_xq : !d_x) || !gpu_is_aligned(d_w, 16) ||
        (q ? !gpu_is_aligned(d_xq, 16) : !gpu_is_aligned(d_x, 16)))
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_matvec_multi: NULL or misaligned buffer");
    mm_args a;
    const int64_t n_all = n_rows * n_in;
    a.w = (const uint8_t *)d_w;
    a.scales = q ? (const unsigned short *)(a.w + gpu_weight_scales_offset(wtype, n_out, n_in))
                 : NULL;
    a.x = d_x;
    a.xq = (const int8_t *)d_xq;
    a.xd = q ? (const float *)((const uint8_t *)d_xq + mm_act_d_offset(n_all)) : NULL;
    a.xs = q ? (const int *)((const uint8_t *)d_xq + mm_act_s_offset(n_all)) : NULL;
    a.y = d_y;
    a.n_out = (int)n_out;
    a.n_in = (int)n_in;
    a.n_rows = (int)n_rows;
    a.row_bytes = mm_row_bytes(wtype, n_in);
    switch (wtype) {
    case GGML_TYPE_Q8_0:
        return mm_launch<GGML_TYPE_Q8_0>(a, st, err);
    case GGML_TYPE_Q4_0:
        return mm_launch<GGML_TYPE_Q4_0>(a, st, err);
    case GGML_TYPE_F32:
        return mm_launch<GGML_TYPE_F32>(a, st, err);
    case GGML_TYPE_F16:
        return mm_launch<GGML_TYPE_F16>(a, st, err);
    default:
        return mm_launch<GGML_TYPE_BF16>(a, st, err);
    }
}
