/* forge_gguf.h - GGUF model-file reader and ggml tensor-type traits.
 *
 * A GGUF file is untrusted input. gguf_open() maps the file read-only and validates everything
 * (magic, version, counts, string lengths, value types, tensor shapes, extents, alignment,
 * overlaps, duplicate names) before returning; after a successful open every accessor is a cheap
 * lookup that cannot read outside the mapping.
 *
 * Ownership: every pointer returned by an accessor (names, strings, tensor data, array data)
 * points into memory owned by the gguf_ctx (mostly the read-only mapping itself) and stays valid
 * until gguf_close(). Strings from the file are NOT NUL-terminated: use gguf_str's len.
 * Keys and tensor names are returned NUL-terminated (the reader rejects names with a NUL byte).
 *
 * Thread safety: a gguf_ctx is immutable after open; any number of threads may read it at once.
 */
#ifndef FORGE_GGUF_H
#define FORGE_GGUF_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

#ifdef __cplusplus
extern "C" {
#endif

struct forge_err;

/* ---- ggml tensor types (ids as stored in GGUF files) ------------------------------------- */
typedef enum ggml_type {
    GGML_TYPE_F32 = 0,
    GGML_TYPE_F16 = 1,
    GGML_TYPE_Q4_0 = 2,
    GGML_TYPE_Q4_1 = 3,
    /* 4, 5: removed (Q4_2, Q4_3) */
    GGML_TYPE_Q5_0 = 6,
    GGML_TYPE_Q5_1 = 7,
    GGML_TYPE_Q8_0 = 8,
    GGML_TYPE_Q8_1 = 9,
    GGML_TYPE_Q2_K = 10,
    GGML_TYPE_Q3_K = 11,
    GGML_TYPE_Q4_K = 12,
    GGML_TYPE_Q5_K = 13,
    GGML_TYPE_Q6_K = 14,
    GGML_TYPE_Q8_K = 15,
    GGML_TYPE_IQ2_XXS = 16,
    GGML_TYPE_IQ2_XS = 17,
    GGML_TYPE_IQ3_XXS = 18,
    GGML_TYPE_IQ1_S = 19,
    GGML_TYPE_IQ4_NL = 20,
    GGML_TYPE_IQ3_S = 21,
    GGML_TYPE_IQ2_S = 22,
    GGML_TYPE_IQ4_XS = 23,
    GGML_TYPE_I8 = 24,
    GGML_TYPE_I16 = 25,
    GGML_TYPE_I32 = 26,
    GGML_TYPE_I64 = 27,
    GGML_TYPE_F64 = 28,
    GGML_TYPE_IQ1_M = 29,
    GGML_TYPE_BF16 = 30,
    /* 31..33: removed (Q4_0_4_4, Q4_0_4_8, Q4_0_8_8) */
    GGML_TYPE_TQ1_0 = 34,
    GGML_TYPE_TQ2_0 = 35,
    /* 36..38: removed (IQ4_NL_4_4, IQ4_NL_4_8, IQ4_NL_8_8) */
    GGML_TYPE_MXFP4 = 39,
    GGML_TYPE_COUNT = 40
} ggml_type;

/* True when t is a type id a GGUF file may carry (not removed, not out of range). */
bool ggml_type_valid(int t);
/* "F32", "Q4_0", ...; "unknown" for an invalid id. Never NULL. */
const char *ggml_type_name(int t);
/* Elements per block (1 for plain types, 32 for Q4_0, 256 for K-quants); 0 if invalid. */
int64_t ggml_type_block_size(int t);
/* Bytes per block; 0 if invalid. */
size_t ggml_type_block_bytes(int t);
/* Bytes of one row of ne0 elements; 0 if invalid or ne0 not a multiple of the block size. */
size_t ggml_row_size(int t, int64_t ne0);
/* Parse a type name ("q4_0", "Q4_0", "f16", case-insensitive); -1 if unknown. */
int ggml_type_from_name(const char *name);

/* ---- GGUF metadata value types ---------------------------------------------------------- */
typedef enum gguf_type {
    GGUF_TYPE_UINT8 = 0,
    GGUF_TYPE_INT8 = 1,
    GGUF_TYPE_UINT16 = 2,
    GGUF_TYPE_INT16 = 3,
    GGUF_TYPE_UINT32 = 4,
    GGUF_TYPE_INT32 = 5,
    GGUF_TYPE_FLOAT32 = 6,
    GGUF_TYPE_BOOL = 7,
    GGUF_TYPE_STRING = 8,
    GGUF_TYPE_ARRAY = 9,
    GGUF_TYPE_UINT64 = 10,
    GGUF_TYPE_INT64 = 11,
    GGUF_TYPE_FLOAT64 = 12,
    GGUF_TYPE_COUNT = 13
} gguf_type;

/* "u8", "i32", "f32", "bool", "str", "arr", ...; "unknown" for an invalid id. */
const char *gguf_type_name(int t);

/* A string inside the file: NOT NUL-terminated. */
typedef struct gguf_str {
    const char *data;
    uint64_t len;
} gguf_str;

typedef struct gguf_ctx gguf_ctx;

#define GGUF_DEFAULT_ALIGNMENT 32
#define GGUF_MAX_DIMS 4

typedef struct gguf_tensor_info {
    const char *name;    /* NUL-terminated, owned by the ctx */
    ggml_type type;
    uint32_t n_dims;     /* 1..4 */
    int64_t ne[GGUF_MAX_DIMS]; /* GGUF/ggml order: ne[0] = row length; unused dims are 1 */
    int64_t n_elements;
    uint64_t offset;     /* relative to the start of the tensor-data section */
    uint64_t n_bytes;
    const void *data;    /* points into the read-only mapping */
} gguf_tensor_info;

/* Open and validate a GGUF file (versions 2 and 3, little-endian). The file is mapped read-only
 * and never written. On error *out is NULL and err names the file, the byte offset or key, and
 * what is wrong. */
int gguf_open(const char *path, gguf_ctx **out, struct forge_err *err);

/* Same, over a caller-owned buffer that must outlive the ctx (used by fuzzers and tests).
 * `name` is used in messages in place of a path. */
int gguf_open_memory(const void *data, size_t size, const char *name, gguf_ctx **out,
                     struct forge_err *err);

void gguf_close(gguf_ctx *ctx);

const char *gguf_path(const gguf_ctx *ctx);       /* path or name given at open */
uint32_t gguf_version(const gguf_ctx *ctx);
uint64_t gguf_file_size(const gguf_ctx *ctx);
uint64_t gguf_alignment(const gguf_ctx *ctx);     /* general.alignment or 32 */
uint64_t gguf_data_offset(const gguf_ctx *ctx);   /* file offset of the tensor-data section */

/* ---- metadata --------------------------------------------------------------------------- */
int64_t gguf_kv_count(const gguf_ctx *ctx);
const char *gguf_kv_key(const gguf_ctx *ctx, int64_t i);          /* NULL if i out of range */
gguf_type gguf_kv_type(const gguf_ctx *ctx, int64_t i);            /* GGUF_TYPE_COUNT if bad i */
int64_t gguf_find_key(const gguf_ctx *ctx, const char *key);       /* index, or -1 */

/* Typed getters by key. Missing key: FORGE_E_NOTFOUND ("FILE: key 'k' not found").
 * Wrong type: FORGE_E_TYPE ("FILE: key 'k' has type str, expected u32").
 * Integer getters accept any integer type (and bool is not an integer) whose value fits the
 * target; a value that does not fit is FORGE_E_RANGE. gguf_get_f32/f64 accept f32 or f64. */
int gguf_get_u8(const gguf_ctx *ctx, const char *key, uint8_t *out, struct forge_err *err);
int gguf_get_i32(const gguf_ctx *ctx, const char *key, int32_t *out, struct forge_err *err);
int gguf_get_u32(const gguf_ctx *ctx, const char *key, uint32_t *out, struct forge_err *err);
int gguf_get_i64(const gguf_ctx *ctx, const char *key, int64_t *out, struct forge_err *err);
int gguf_get_u64(const gguf_ctx *ctx, const char *key, uint64_t *out, struct forge_err *err);
int gguf_get_f32(const gguf_ctx *ctx, const char *key, float *out, struct forge_err *err);
int gguf_get_f64(const gguf_ctx *ctx, const char *key, double *out, struct forge_err *err);
int gguf_get_bool(const gguf_ctx *ctx, const char *key, bool *out, struct forge_err *err);
int gguf_get_str(const gguf_ctx *ctx, const char *key, gguf_str *out, struct forge_err *err);

/* Arrays. gguf_get_arr: element type and count (FORGE_E_TYPE if the key is not an array). */
int gguf_get_arr(const gguf_ctx *ctx, const char *key, gguf_type *elem_type, uint64_t *n,
                 struct forge_err *err);
/* Element i of a string array, O(1). */
int gguf_get_arr_str(const gguf_ctx *ctx, const char *key, uint64_t i, gguf_str *out,
                     struct forge_err *err);
/* Copy a numeric array (any integer/float/bool element type) converted to float / int32.
 * n must equal the array length (FORGE_E_RANGE otherwise); int32 conversion fails with
 * FORGE_E_RANGE on a value that does not fit. */
int gguf_copy_arr_f32(const gguf_ctx *ctx, const char *key, float *dst, uint64_t n,
                      struct forge_err *err);
int gguf_copy_arr_i32(const gguf_ctx *ctx, const char *key, int32_t *dst, uint64_t n,
                      struct forge_err *err);

/* Generic walk over a value, for printers (forge inspect). A view of value i (top level) or of an
 * element of an array value. For scalars `raw` points at the little-endian bytes (may be
 * unaligned: read with memcpy); for strings `str` is set; for arrays elem_type/n are set and
 * gguf_value_elem() gives element j (arrays of arrays nest). */
typedef struct gguf_value {
    gguf_type type;
    const uint8_t *raw;   /* scalar bytes, or the array's first element */
    gguf_str str;         /* when type == STRING */
    gguf_type elem_type;  /* when type == ARRAY */
    uint64_t n;           /* when type == ARRAY */
    const void *priv;     /* reader-internal */
} gguf_value;

int gguf_kv_value(const gguf_ctx *ctx, int64_t i, gguf_value *out);
int gguf_value_elem(const gguf_ctx *ctx, const gguf_value *arr, uint64_t j, gguf_value *out);

/* ---- tensors ---------------------------------------------------------------------------- */
int64_t gguf_tensor_count(const gguf_ctx *ctx);
const gguf_tensor_info *gguf_tensor(const gguf_ctx *ctx, int64_t i);   /* NULL if out of range */
const gguf_tensor_info *gguf_find_tensor(const gguf_ctx *ctx, const char *name); /* or NULL */

/* ---- conversion ------------------------------------------------------------------------- */
/* Convert n elements of type t at src (n a multiple of the block size) to float32.
 * Supported (bit-exact with ggml's dequantize_row_*): F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
 * Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, TQ1_0, TQ2_0; other types return
 * FORGE_E_UNSUPPORTED naming the type. */
int forge_dequantize(int t, const void *src, float *dst, int64_t n, struct forge_err *err);


/* ---- writer ------------------------------------------------------------------------------ */
/* Builds a GGUF v3 file: metadata KVs (set in any order; written in the order first set; setting
 * a key again replaces its value), then declared tensors, whose data is STREAMED through a
 * callback a chunk of rows at a time, so a file of many GB never sits in memory.
 * Alignment: the value of a u32 "general.alignment" key if set (a power of two), else 32.
 * The writer copies every key, string and array given to it; the caller keeps ownership. */
typedef struct gguf_writer gguf_writer;

int gguf_writer_create(gguf_writer **out, struct forge_err *err);
void gguf_writer_free(gguf_writer *w);

/* Scalars. `type` must be a scalar gguf_type; `value` points at a value of that C type
 * (uint8_t, int8_t, ..., float, bool as uint8_t 0/1, double). */
int gguf_writer_set_scalar(gguf_writer *w, const char *key, gguf_type type, const void *value,
                           struct forge_err *err);
int gguf_writer_set_u32(gguf_writer *w, const char *key, uint32_t v, struct forge_err *err);
int gguf_writer_set_i32(gguf_writer *w, const char *key, int32_t v, struct forge_err *err);
int gguf_writer_set_u64(gguf_writer *w, const char *key, uint64_t v, struct forge_err *err);
int gguf_writer_set_f32(gguf_writer *w, const char *key, float v, struct forge_err *err);
int gguf_writer_set_bool(gguf_writer *w, const char *key, bool v, struct forge_err *err);
/* A NUL-terminated string. */
int gguf_writer_set_str(gguf_writer *w, const char *key, const char *s, struct forge_err *err);
/* Arrays: n elements of a scalar type stored contiguously at data (little-endian), or strings. */
int gguf_writer_set_arr(gguf_writer *w, const char *key, gguf_type elem_type, const void *data,
                        uint64_t n, struct forge_err *err);
int gguf_writer_set_arr_str(gguf_writer *w, const char *key, const gguf_str *strs, uint64_t n,
                            struct forge_err *err);
/* Copy KV i of src (any type, nested arrays included) under the same key. */
int gguf_writer_copy_kv(gguf_writer *w, const gguf_ctx *src, int64_t i, struct forge_err *err);
/* Copy every KV of src whose key starts with prefix ("" copies all); returns the number copied
 * in *n_copied (may be NULL). */
int gguf_writer_copy_kvs(gguf_writer *w, const gguf_ctx *src, const char *prefix,
                         int64_t *n_copied, struct forge_err *err);

/* Declare a tensor (GGUF ne order; ne[0] a multiple of the type's block size; unique name). */
int gguf_writer_add_tensor(gguf_writer *w, const char *name, ggml_type type, uint32_t n_dims,
                           const int64_t *ne, struct forge_err *err);

/* Fill callback: write rows [row0, row0 + n_rows) of tensor `index` (rows of ne[0] elements in
 * the tensor's type, ggml_row_size bytes each) to dst. Return FORGE_OK or an error code (with
 * err set). info->offset is the tensor's final data offset; info->data is NULL. */
typedef int (*gguf_fill_fn)(void *user, int64_t index, const gguf_tensor_info *info,
                            int64_t row0, int64_t n_rows, void *dst, struct forge_err *err);

/* Write the file to path (created or truncated). Chunks hold at most ~`chunk_bytes` (0: 16 MiB;
 * always at least one row). On error a file this call created is removed; a path that existed
 * before (a device, or a temporary file the caller made) is left in place, possibly truncated:
 * write to a new temporary file and rename it to replace a file safely. */
int gguf_writer_write(gguf_writer *w, const char *path, gguf_fill_fn fill, void *user,
                      size_t chunk_bytes, struct forge_err *err);

#ifdef __cplusplus
}
#endif

#endif /* FORGE_GGUF_H */
