/* gpu_invariant.cuh - the orders of float sums that the decode kernels share, so that a row
 * gets the same bits whichever kernel computes it (batch invariance: a sequence's greedy ids do
 * not depend on what else is in the batch):
 *   - the one-row matvec (gpu_matvec.cu k_matvec), the multi-row matvec (gpu_matvec_multi.cu)
 *     and the fused matvec in its batch-invariant mode (gpu_fused.cu) split a row among the
 *     same number of 32-lane segments (gpu_matvec_spr);
 *   - gpu_rmsnorm (gpu_ops.cu) and the fused matvec's prologue form the RMSNorm's sum of squares
 *     and its product the same way (gpu_rms_scale, gpu_rms_apply).
 * Internal. */
#ifndef FORGE_GPU_INVARIANT_CUH
#define FORGE_GPU_INVARIANT_CUH

#include "gpu/gpu_vendor.h"

/* Resident warps per multiprocessor the matvec grids aim at (<= 48 registers, 256 threads per
 * block). */
#define GPU_MV_WARPS_PER_SM 40
#define GPU_MV_SPR_MAX 8

/* One wave of matvec warps on this device. */
static inline int64_t gpu_mv_max_warps(void)
{
    return (int64_t)(gpu_sm_count() > 0 ? gpu_sm_count() : 64) * GPU_MV_WARPS_PER_SM;
}

/* Segments per output row of a matvec over n_out rows of n_chunks 16-byte chunks: rows are
 * shared (partial sums met in shared memory, in segment order) while the grid stays within one
 * wave (a second partial wave costs more than it gains, measured on H200) and every lane keeps
 * a chunk. Lane l of segment s of a row sums chunks 32 s + l, 32 s + l + 32 SPR, ... ascending. */
static inline int gpu_matvec_spr(int64_t n_out, int n_chunks)
{
    const int64_t max_warps = gpu_mv_max_warps();
    int spr = 1;
    while (spr < GPU_MV_SPR_MAX && n_out * spr * 2 <= max_warps && n_chunks >= 64 * spr)
        spr *= 2;
    return spr;
}

/* The RMSNorm over blocks of GPU_RMS_THREADS threads, x of n floats (n % 4 == 0, 16-byte
 * aligned): thread t sums the squares of float4 t, t + GPU_RMS_THREADS, ..., the 32-lane
 * segment sums meet in shared memory (red: GPU_RMS_THREADS / 32 floats) and are added in segment
 * order. Every thread gets the scale 1 / sqrt(mean + eps). */
#define GPU_RMS_THREADS 256
GPU_DEV float gpu_rms_scale(const float4 *x4, int n, float eps, float *red)
{
    const int seg = threadIdx.x / GPU_SEG, lane = threadIdx.x % GPU_SEG;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n / 4; i += GPU_RMS_THREADS) {
        const float4 v = x4[i];
        ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    ss = gpu_seg_sum(ss);
    if (lane == 0) red[seg] = ss;
    __syncthreads();
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < GPU_RMS_THREADS / GPU_SEG; i++)
        s += red[i];
    return 1.0f / sqrtf(s / (float)n + eps);
}

/* h = x * scale * w, element by element (two rounded products, in this order). */
GPU_DEV float4 gpu_rms_apply(float4 v, float scale, float4 w)
{
    return make_float4(v.x * scale * w.x, v.y * scale * w.y, v.z * scale * w.z, v.w * scale * w.w);
}

#endif /* FORGE_GPU_INVARIANT_CUH */
