/* gpu_dot.cuh - dot products of one 16-byte weight chunk with its activations, shared by the
 * decode matvec kernels (gpu_matvec.cu, gpu_fused.cu), so both compute the same numbers:
 *   F32: 4 floats; F16/BF16: 8 halves against two float4 (elements 0..3, 4..7);
 *   Q8_0: 16 int8 quants against 16 int8 activations (integer sum);
 *   Q4_0: one 32-element block, byte j = element j (low nibble) and j + 16 (high nibble),
 *         against the activations' quants lo (0..15) and hi (16..31): sum nib * q, from which
 *         the caller subtracts 8 * sum(q). Internal. */
#ifndef FORGE_GPU_DOT_CUH
#define FORGE_GPU_DOT_CUH

#include "gpu/gpu_vendor.h"

GPU_DEV float gpu_dot_f32x4(uint4 w, float4 a)
{
    return __uint_as_float(w.x) * a.x + __uint_as_float(w.y) * a.y + __uint_as_float(w.z) * a.z +
           __uint_as_float(w.w) * a.w;
}

GPU_DEV float gpu_dot_f16x2(unsigned v, float x0, float x1)
{
    return gpu_fp16_to_f32((unsigned short)(v & 0xffffu)) * x0 +
           gpu_fp16_to_f32((unsigned short)(v >> 16)) * x1;
}

GPU_DEV float gpu_dot_bf16x2(unsigned v, float x0, float x1)
{
    return __uint_as_float(v << 16) * x0 + __uint_as_float(v & 0xffff0000u) * x1;
}

GPU_DEV float gpu_dot_f16x8(uint4 w, float4 a, float4 b)
{
    return gpu_dot_f16x2(w.x, a.x, a.y) + gpu_dot_f16x2(w.y, a.z, a.w) +
           gpu_dot_f16x2(w.z, b.x, b.y) + gpu_dot_f16x2(w.w, b.z, b.w);
}

GPU_DEV float gpu_dot_bf16x8(uint4 w, float4 a, float4 b)
{
    return gpu_dot_bf16x2(w.x, a.x, a.y) + gpu_dot_bf16x2(w.y, a.z, a.w) +
           gpu_dot_bf16x2(w.z, b.x, b.y) + gpu_dot_bf16x2(w.w, b.z, b.w);
}

GPU_DEV int gpu_dot_q8x16(uint4 w, int4 q)
{
    int s = gpu_dp4a((int)w.x, q.x, 0);
    s = gpu_dp4a((int)w.y, q.y, s);
    s = gpu_dp4a((int)w.z, q.z, s);
    return gpu_dp4a((int)w.w, q.w, s);
}

GPU_DEV int gpu_dot_q4x32(uint4 w, int4 lo, int4 hi)
{
    const unsigned m = 0x0f0f0f0fu;
    int s = gpu_dp4a((int)(w.x & m), lo.x, 0);
    s = gpu_dp4a((int)(w.y & m), lo.y, s);
    s = gpu_dp4a((int)(w.z & m), lo.z, s);
    s = gpu_dp4a((int)(w.w & m), lo.w, s);
    s = gpu_dp4a((int)((w.x >> 4) & m), hi.x, s);
    s = gpu_dp4a((int)((w.y >> 4) & m), hi.y, s);
    s = gpu_dp4a((int)((w.z >> 4) & m), hi.z, s);
    return gpu_dp4a((int)((w.w >> 4) & m), hi.w, s);
}

#endif /* FORGE_GPU_DOT_CUH */
