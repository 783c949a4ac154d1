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
    default:
        return "(unsupported type)";
    }
}

#endif /* FORGE_GPU_COMMON_CUH */
