/* gguf_types.c - ggml tensor-type traits (names, block sizes, bytes per block) and GGUF
 * metadata value-type names. Block layouts follow ggml (ggml-common.h); ids are the on-disk ids.
 * Owns no state; everything here is a constant table. */
#include <strings.h>

#include "forge_gguf.h"

struct type_traits {
    const char *name;
    int64_t block_size; /* elements per block; 0 marks a removed/unused id */
    size_t block_bytes;
};

static const struct type_traits traits[GGML_TYPE_COUNT] = {
    [GGML_TYPE_F32] = {"F32", 1, 4},
    [GGML_TYPE_F16] = {"F16", 1, 2},
    [GGML_TYPE_Q4_0] = {"Q4_0", 32, 18},    /* fp16 d + 16 nibble bytes */
    [GGML_TYPE_Q4_1] = {"Q4_1", 32, 20},    /* fp16 d, m + 16 */
    [GGML_TYPE_Q5_0] = {"Q5_0", 32, 22},    /* fp16 d + 4 high bits + 16 */
    [GGML_TYPE_Q5_1] = {"Q5_1", 32, 24},
    [GGML_TYPE_Q8_0] = {"Q8_0", 32, 34},    /* fp16 d + 32 int8 */
    [GGML_TYPE_Q8_1] = {"Q8_1", 32, 36},    /* fp16 d, s + 32 int8 */
    [GGML_TYPE_Q2_K] = {"Q2_K", 256, 84},
    [GGML_TYPE_Q3_K] = {"Q3_K", 256, 110},
    [GGML_TYPE_Q4_K] = {"Q4_K", 256, 144},
    [GGML_TYPE_Q5_K] = {"Q5_K", 256, 176},
    [GGML_TYPE_Q6_K] = {"Q6_K", 256, 210},
    [GGML_TYPE_Q8_K] = {"Q8_K", 256, 292},  /* f32 d + 256 int8 + 16 int16 sums */
    [GGML_TYPE_IQ2_XXS] = {"IQ2_XXS", 256, 66},
    [GGML_TYPE_IQ2_XS] = {"IQ2_XS", 256, 74},
    [GGML_TYPE_IQ3_XXS] = {"IQ3_XXS", 256, 98},
    [GGML_TYPE_IQ1_S] = {"IQ1_S", 256, 50},
    [GGML_TYPE_IQ4_NL] = {"IQ4_NL", 32, 18},
    [GGML_TYPE_IQ3_S] = {"IQ3_S", 256, 110},
    [GGML_TYPE_IQ2_S] = {"IQ2_S", 256, 82},
    [GGML_TYPE_IQ4_XS] = {"IQ4_XS", 256, 136},
    [GGML_TYPE_I8] = {"I8", 1, 1},
    [GGML_TYPE_I16] = {"I16", 1, 2},
    [GGML_TYPE_I32] = {"I32", 1, 4},
    [GGML_TYPE_I64] = {"I64", 1, 8},
    [GGML_TYPE_F64] = {"F64", 1, 8},
    [GGML_TYPE_IQ1_M] = {"IQ1_M", 256, 56},
    [GGML_TYPE_BF16] = {"BF16", 1, 2},
    [GGML_TYPE_TQ1_0] = {"TQ1_0", 256, 54},
    [GGML_TYPE_TQ2_0] = {"TQ2_0", 256, 66},
    [GGML_TYPE_MXFP4] = {"MXFP4", 32, 17},  /* e8m0 scale + 16 nibble bytes */
};

bool ggml_type_valid(int t)
{
    return t >= 0 && t < GGML_TYPE_COUNT && traits[t].block_size > 0;
}

const char *ggml_type_name(int t)
{
    return ggml_type_valid(t) ? traits[t].name : "unknown";
}

int64_t ggml_type_block_size(int t)
{
    return ggml_type_valid(t) ? traits[t].block_size : 0;
}

size_t ggml_type_block_bytes(int t)
{
    return ggml_type_valid(t) ? traits[t].block_bytes : 0;
}

size_t ggml_row_size(int t, int64_t ne0)
{
    if (!ggml_type_valid(t) || ne0 < 0 || ne0 % traits[t].block_size != 0) return 0;
    uint64_t blocks = (uint64_t)(ne0 / traits[t].block_size), bytes;
    if (__builtin_mul_overflow(blocks, (uint64_t)traits[t].block_bytes, &bytes) ||
        bytes > (uint64_t)SIZE_MAX)
        return 0;
    return (size_t)bytes;
}

int ggml_type_from_name(const char *name)
{
    if (!name) return -1;
    for (int t = 0; t < GGML_TYPE_COUNT; t++)
        if (traits[t].block_size > 0 && !strcasecmp(name, traits[t].name)) return t;
    return -1;
}

const char *gguf_type_name(int t)
{
    static const char *const names[GGUF_TYPE_COUNT] = {
        [GGUF_TYPE_UINT8] = "u8",    [GGUF_TYPE_INT8] = "i8",     [GGUF_TYPE_UINT16] = "u16",
        [GGUF_TYPE_INT16] = "i16",   [GGUF_TYPE_UINT32] = "u32",  [GGUF_TYPE_INT32] = "i32",
        [GGUF_TYPE_FLOAT32] = "f32", [GGUF_TYPE_BOOL] = "bool",   [GGUF_TYPE_STRING] = "str",
        [GGUF_TYPE_ARRAY] = "arr",   [GGUF_TYPE_UINT64] = "u64",  [GGUF_TYPE_INT64] = "i64",
        [GGUF_TYPE_FLOAT64] = "f64",
    };
    return t >= 0 && t < GGUF_TYPE_COUNT ? names[t] : "unknown";
}
