/* gpu_invariant.cuh - the orders of float sums that the decode kernels share, so that a row
 * gets the same bits whichever kernel computes it (batch invariance: a sequence's greedy ids do
 * not depend on what else is in the batch):
 *   - the one-row matvec (gpu_matvec.cu k_matvec), the multi-row matvec (gpu_matvec_multi.cu)
 *     and the fused matvec in its batch-invariant mode (gpu_fused.cu) split a row among the
 *     same number of 32-lane segments (gpu_matvec_spr);
 *   - gpu_rmsnorm (gpu_ops.cu) and the fused matvec's prologue form the RMSNorm's sum of squares
 *     and its product the same way (gpu_rms_scale, gpu_rms_apply);
 *   - gpu_act_quantize, the fused matvec's prologue and gpu_rmsnorm_q8 / gpu_swiglu_q8 round
 *     activations to Q8_0 blocks the same way (gpu_q8_block8), and every SwiGLU is gpu_swiglu1.
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

/* SwiGLU of one element, silu(g) * u: gpu_swiglu, gpu_swiglu_q8 and the fused matvec's
 * epilogue. */
GPU_DEV float gpu_swiglu1(float g, float u)
{
    return g / (1.0f + expf(-g)) * u;
}

/* The Q8_0 rounding of activations (gpu_act_quantize's, bit for bit): a block of 32 values held
 * by 8 consecutive lanes of a segment, lane k of the 8 holding values 4k .. 4k + 3 in v. Every
 * lane of the segment must call it (shuffles within each group of 8). Returns the lane's 4
 * quants packed in bytes; *d is the block's scale as stored (rounded to fp16), *sum the sum of
 * its 32 quants. */
GPU_DEV int gpu_q8_block8(float4 v, float *d, int *sum)
{
    float amax = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
#pragma unroll
    for (int m = 1; m < 8; m <<= 1)
        amax = fmaxf(amax, gpu_shfl_xor(amax, m, GPU_SEG));
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    const int q0 = (int)rintf(v.x * id), q1 = (int)rintf(v.y * id);
    const int q2 = (int)rintf(v.z * id), q3 = (int)rintf(v.w * id);
    int s = q0 + q1 + q2 + q3;
#pragma unroll
    for (int m = 1; m < 8; m <<= 1)
        s += gpu_shfl_xor_int(s, m, GPU_SEG);
    *d = gpu_fp16_to_f32(gpu_f32_to_fp16(amax / 127.0f));
    *sum = s;
    return (int)((unsigned)(q0 & 0xff) | ((unsigned)(q1 & 0xff) << 8) |
                 ((unsigned)(q2 & 0xff) << 16) | ((unsigned)(q3 & 0xff) << 24));
}

#endif /* FORGE_GPU_INVARIANT_CUH */
