/* gpu_common.cuh - small host helpers shared by the .cu files of libforge_cuda (which links
 * nothing of libforge, so it carries its own type names). Internal. */
#ifndef FORGE_GPU_COMMON_CUH
#define FORGE_GPU_COMMON_CUH

#include <stddef.h>
#include <stdint.h>

#include "forge.h"

static inline size_t gpu_round_up(size_t x, size_t a)
{
    return (x + a - 1) / a * a;
}

static inline int gpu_is_aligned(const void *p, size_t a)
{
    return ((uintptr_t)p % a) == 0;
}

/* The Q8_0 activation scratch of n values (gpu_act_quantize, read by every quantized product):
 * int8 quants [n] | float d [n / 32] | int sum of quants [n / 32], each part 16-byte aligned. */
static inline size_t gpu_act_d_offset(int64_t n)
{
    return gpu_round_up((size_t)n, 16);
}
static inline size_t gpu_act_s_offset(int64_t n)
{
    return gpu_act_d_offset(n) + gpu_round_up((size_t)(n / 32) * 4, 16);
}

/* Names of the weight types the kernels know; "type <id>" style fallback for the rest. */
static inline const char *gpu_type_name(int t)
{
    switch (t) {
    case GGML_TYPE_F32:
        return "F32";
    case GGML_TYPE_F16:
        return "F16";
    case GGML_TYPE_BF16:
        return "BF16";
    case GGML_TYPE_Q8_0:
        return "Q8_0";
    case GGML_TYPE_Q4_0:
        return "Q4_0";
    case GGML_TYPE_Q4_1:
        return "Q4_1";
    case GGML_TYPE_Q5_0:
        return "Q5_0";
    case GGML_TYPE_Q5_1:
        return "Q5_1";
    case GGML_TYPE_IQ4_NL:
        return "IQ4_NL";
    case GGML_TYPE_Q2_K:
        return "Q2_K";
    case GGML_TYPE_Q3_K:
        return "Q3_K";
    case GGML_TYPE_Q4_K:
        return "Q4_K";
    case GGML_TYPE_Q5_K:
        return "Q5_K";
    case GGML_TYPE_Q6_K:
        return "Q6_K";
    case GGML_TYPE_IQ4_XS:
        return "IQ4_XS";
    case GGML_TYPE_TQ2_0:
        return "TQ2_0";
    case GGML_TYPE_TQ1_0:
        return "TQ1_0";
    default:
        return "(unsupported type)";
    }
}

#endif /* FORGE_GPU_COMMON_CUH */
