/* fuzz_gguf.c - libFuzzer target for the GGUF reader: open the input as a GGUF file, then walk
 * everything an engine or `forge inspect` could touch (every KV through the generic walk and the
 * typed getters, every tensor, a few dequantized rows of supported types). */
#include <stdlib.h>
#include <string.h>

#include "forge.h"

static volatile uint64_t sink;

static void walk(const gguf_ctx *c, const gguf_value *v, int depth)
{
    if (v->type == GGUF_TYPE_STRING) {
        if (v->str.len) sink += (uint8_t)v->str.data[v->str.len - 1];
        return;
    }
    if (v->type != GGUF_TYPE_ARRAY) {
        sink += v->raw[0];
        return;
    }
    for (uint64_t j = 0; j < v->n; j++) {
        gguf_value e;
        if (gguf_value_elem(c, v, j, &e) != FORGE_OK) abort();
        walk(c, &e, depth + 1);
    }
    gguf_value e;
    if (gguf_value_elem(c, v, v->n, &e) == FORGE_OK) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    forge_err err = {0};
    gguf_ctx *c = NULL;
    if (gguf_open_memory(data, size, "fuzz.gguf", &c, &err) != FORGE_OK) {
        if (c || !err.msg[0]) abort();
        return 0;
    }
    for (int64_t i = 0; i < gguf_kv_count(c); i++) {
        const char *key = gguf_kv_key(c, i);
        gguf_value v;
        if (!key || gguf_find_key(c, key) != i || gguf_kv_value(c, i, &v) != FORGE_OK) abort();
        walk(c, &v, 0);
        uint8_t u8; int32_t i32; uint32_t u32; int64_t i64; uint64_t u64; float f; double d; bool b;
        gguf_str s; gguf_type et; uint64_t n;
        (void)gguf_get_u8(c, key, &u8, &err);
        (void)gguf_get_i32(c, key, &i32, &err);
        (void)gguf_get_u32(c, key, &u32, &err);
        (void)gguf_get_i64(c, key, &i64, &err);
        (void)gguf_get_u64(c, key, &u64, &err);
        (void)gguf_get_f32(c, key, &f, &err);
        (void)gguf_get_f64(c, key, &d, &err);
        (void)gguf_get_bool(c, key, &b, &err);
        (void)gguf_get_str(c, key, &s, &err);
        if (gguf_get_arr(c, key, &et, &n, &err) == FORGE_OK) {
            if (n) (void)gguf_get_arr_str(c, key, n - 1, &s, &err);
            (void)gguf_get_arr_str(c, key, n, &s, &err);
            if (n <= 4096) {
                float *fa = malloc((n ? n : 1) * sizeof *fa);
                int32_t *ia = malloc((n ? n : 1) * sizeof *ia);
                if (fa && ia) {
                    (void)gguf_copy_arr_f32(c, key, fa, n, &err);
                    (void)gguf_copy_arr_i32(c, key, ia, n, &err);
                }
                free(fa);
                free(ia);
            }
        }
    }
    for (int64_t i = 0; i < gguf_tensor_count(c); i++) {
        const gguf_tensor_info *t = gguf_tensor(c, i);
        if (!t || gguf_find_tensor(c, t->name) != t) abort();
        const uint8_t *p = t->data;
        if (p < data || p + t->n_bytes > data + size) abort();
        if (t->ne[0] > (1 << 16)) continue;
        float *row = malloc((size_t)t->ne[0] * sizeof *row);
        size_t rs = ggml_row_size(t->type, t->ne[0]);
        int64_t n_rows = t->n_elements / t->ne[0];
        for (int64_t r = 0; row && r < n_rows && r < 4; r++)
            (void)forge_dequantize(t->type, p + (size_t)r * rs, row, t->ne[0], &err);
        free(row);
    }
    gguf_close(c);
    return 0;
}
