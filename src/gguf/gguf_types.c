/* gguf_types.c - ggml tensor-type names, block sizes and bytes per block (read from the traits
 * table, src/quant/qtypes.c) and GGUF metadata value-type names. Ids are the on-disk ids.
 * Owns no state. */
#include <strings.h>

#include "forge_gguf.h"
#include "quant/qtypes.h"

bool ggml_type_valid(int t)
{
    return forge_type_traits_get(t) != NULL;
}

const char *ggml_type_name(int t)
{
    return ggml_type_valid(t) ? forge_type_traits_get(t)->name : "unknown";
}

int64_t ggml_type_block_size(int t)
{
    return ggml_type_valid(t) ? forge_type_traits_get(t)->block_size : 0;
}

size_t ggml_type_block_bytes(int t)
{
    return ggml_type_valid(t) ? forge_type_traits_get(t)->block_bytes : 0;
}

size_t ggml_row_size(int t, int64_t ne0)
{
    const forge_type_traits *tr = forge_type_traits_get(t);
    if (!tr || ne0 < 0 || ne0 % tr->block_size != 0) return 0;
    uint64_t blocks = (uint64_t)(ne0 / tr->block_size), bytes;
    if (__builtin_mul_overflow(blocks, (uint64_t)tr->block_bytes, &bytes) ||
        bytes > (uint64_t)SIZE_MAX)
        return 0;
    return (size_t)bytes;
}

int ggml_type_from_name(const char *name)
{
    if (!name) return -1;
    for (int t = 0; t < GGML_TYPE_COUNT; t++)
        if (ggml_type_valid(t) && !strcasecmp(name, forge_type_traits_get(t)->name)) return t;
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
