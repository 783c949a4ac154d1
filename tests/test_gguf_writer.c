/* test_gguf_writer.c - the GGUF writer: round trips (write -> gguf_open -> same keys, values,
 * shapes and bytes), streaming in chunks of rows, KV copying with a prefix, and its errors. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "forge.h"
#include "core/util.h"
#include "testutil.h"

#define N_ELEMS(a) FORGE_ARRAY_LEN(a)

/* Deterministic content of byte j of row r of tensor t. */
static uint8_t pattern(int64_t t, int64_t r, size_t j)
{
    return (uint8_t)(t * 131 + r * 7 + (int64_t)j * 3 + (int64_t)(j >> 8));
}

struct fill_log {
    int64_t calls;
    int64_t next_row[16]; /* rows must arrive in order, each exactly once */
    int64_t fail_at;      /* tensor index whose fill fails, or -1 */
};

static int fill_pattern(void *user, int64_t index, const gguf_tensor_info *info, int64_t row0,
                        int64_t n_rows, void *dst, forge_err *err)
{
    struct fill_log *log = user;
    size_t row = ggml_row_size(info->type, info->ne[0]);
    log->calls++;
    if (index == log->fail_at) return forge_err_set(err, FORGE_E_INTERRUPTED, "fill stopped on purpose");
    if (row0 != log->next_row[index]) return forge_err_set(err, FORGE_E_INTERNAL, "rows out of order");
    log->next_row[index] = row0 + n_rows;
    for (int64_t r = 0; r < n_rows; r++)
        for (size_t j = 0; j < row; j++) ((uint8_t *)dst)[(size_t)r * row + j] = pattern(index, row0 + r, j);
    return FORGE_OK;
}

static char *tmp_path(char **dir, const char *name)
{
    *dir = tu_mkdtemp();
    assert_non_null(*dir);
    size_t n = strlen(*dir) + strlen(name) + 2;
    char *p = malloc(n);
    snprintf(p, n, "%s/%s", *dir, name);
    return p;
}

static void test_roundtrip(void **state)
{
    (void)state;
    char *dir, *path = tmp_path(&dir, "rt.gguf");
    forge_err e = {0};
    gguf_writer *w = NULL;
    assert_int_equal(gguf_writer_create(&w, &e), FORGE_OK);

    uint8_t u8 = 200;
    int8_t i8 = -100;
    uint16_t u16 = 60000;
    int16_t i16 = -30000;
    int64_t i64 = -(1LL << 40);
    double f64 = 3.25;
    assert_int_equal(gguf_writer_set_str(w, "general.architecture", "llama", &e), FORGE_OK);
    assert_int_equal(gguf_writer_set_u32(w, "general.alignment", 64, &e), FORGE_OK);
    assert_int_equal(gguf_writer_set_scalar(w, "t.u8", GGUF_TYPE_UINT8, &u8, &e), FORGE_OK);
    assert_int_equal(gguf_writer_set_scalar(w, "t.i8", GGUF_TYPE_INT8, &i8, &e), FORGE_OK);
    assert_int_equal(gguf_writer_set_scalar(w, "t.u16", GGUF_TYPE_UINT16, &u16, &e), FORGE_OK);
    assert_int_equal(gguf_writer_set_scalar(w, "t.i16", GGUF_TYPE_INT16, &i16, &e), FORGE_OK);
    assert_int_equal(gguf_writer_set_i32(w, "t.i32", -5, &e), FORGE_OK);
    assert_int_equal(gguf_writer_set_u64(w, "t.u64", 1ULL << 50, &e), FORGE_OK);
    assert_int_equal(gguf_writer_set_scalar(w, "t.i64", GGUF_TYPE_INT64, &i64, &e), FORGE_OK);
    assert_int_equal(gguf_writer_set_f32(w, "t.f32", 1e-5f, &e), FORGE_OK);
    assert_int_equal(gguf_writer_set_scalar(w, "t.f64", GGUF_TYPE_FLOAT64, &f64, &e), FORGE_OK);
    assert_int_equal(gguf_writer_set_bool(w, "t.bool", true, &e), FORGE_OK);
    assert_int_equal(gguf_writer_set_u32(w, "t.replaced", 1, &e), FORGE_OK);
    assert_int_equal(gguf_writer_set_str(w, "t.replaced", "now a string", &e), FORGE_OK);
    float fa[5] = {0.5f, -1, 2, 1e30f, -0.0f};
    int32_t ia[3] = {-1, 0, 7};
    assert_int_equal(gguf_writer_set_arr(w, "t.arr_f32", GGUF_TYPE_FLOAT32, fa, 5, &e), FORGE_OK);
    assert_int_equal(gguf_writer_set_arr(w, "t.arr_i32", GGUF_TYPE_INT32, ia, 3, &e), FORGE_OK);
    assert_int_equal(gguf_writer_set_arr(w, "t.arr_empty", GGUF_TYPE_UINT8, NULL, 0, &e), FORGE_OK);
    gguf_str strs[3] = {{"hello", 5}, {"", 0}, {"\xe2\x96\x81x\0y", 6}};
    assert_int_equal(gguf_writer_set_arr_str(w, "t.arr_str", strs, 3, &e), FORGE_OK);
    assert_int_equal(gguf_writer_set_arr(w, "t.bad", GGUF_TYPE_STRING, strs, 3, &e), FORGE_E_INVALID);
    assert_int_equal(gguf_writer_set_scalar(w, "t.bad", GGUF_TYPE_ARRAY, &u8, &e), FORGE_E_INVALID);

    static const struct { const char *name; int type; uint32_t nd; int64_t ne[4]; } ts[] = {
        {"a.f32", GGML_TYPE_F32, 2, {17, 9, 1, 1}},
        {"b.f16", GGML_TYPE_F16, 3, {8, 3, 5, 1}},
        {"c.q8_0", GGML_TYPE_Q8_0, 2, {64, 40, 1, 1}},
        {"d.q4_0", GGML_TYPE_Q4_0, 1, {96, 1, 1, 1}},
        {"e.q4_k", GGML_TYPE_Q4_K, 4, {256, 2, 2, 2}},
        {"f.bf16", GGML_TYPE_BF16, 2, {1, 1, 1, 1}},
    };
    for (size_t i = 0; i < N_ELEMS(ts); i++)
        assert_int_equal(gguf_writer_add_tensor(w, ts[i].name, ts[i].type, ts[i].nd, ts[i].ne, &e), FORGE_OK);
    /* chunk of 100 bytes: several chunks per tensor, always at least one row */
    struct fill_log log = {.fail_at = -1};
    int rc = gguf_writer_write(w, path, fill_pattern, &log, 100, &e);
    if (rc) fail_msg("%s", e.msg);
    assert_true(log.calls > (int64_t)N_ELEMS(ts));
    gguf_writer_free(w);

    gguf_ctx *c = NULL;
    rc = gguf_open(path, &c, &e);
    if (rc) fail_msg("%s", e.msg);
    assert_int_equal(gguf_version(c), 3);
    assert_int_equal(gguf_alignment(c), 64);
    assert_int_equal(gguf_data_offset(c) % 64, 0);
    assert_int_equal(gguf_kv_count(c), 17);
    assert_string_equal(gguf_kv_key(c, 0), "general.architecture"); /* order of first set */
    assert_string_equal(gguf_kv_key(c, 13), "t.arr_f32");

    gguf_str s;
    uint8_t r8;
    int32_t r32;
    uint64_t r64;
    int64_t ri64;
    float rf;
    double rd;
    bool rb;
    assert_int_equal(gguf_get_str(c, "general.architecture", &s, &e), FORGE_OK);
    assert_true(s.len == 5 && !memcmp(s.data, "llama", 5));
    assert_int_equal(gguf_get_u8(c, "t.u8", &r8, &e), FORGE_OK);
    assert_int_equal(r8, 200);
    assert_int_equal(gguf_kv_type(c, gguf_find_key(c, "t.u8")), GGUF_TYPE_UINT8);
    assert_int_equal(gguf_get_i32(c, "t.i8", &r32, &e), FORGE_OK);
    assert_int_equal(r32, -100);
    assert_int_equal(gguf_get_i32(c, "t.u16", &r32, &e), FORGE_OK);
    assert_int_equal(r32, 60000);
    assert_int_equal(gguf_get_i32(c, "t.i16", &r32, &e), FORGE_OK);
    assert_int_equal(r32, -30000);
    assert_int_equal(gguf_get_i32(c, "t.i32", &r32, &e), FORGE_OK);
    assert_int_equal(r32, -5);
    assert_int_equal(gguf_get_u64(c, "t.u64", &r64, &e), FORGE_OK);
    assert_int_equal(r64, 1ULL << 50);
    assert_int_equal(gguf_get_i64(c, "t.i64", &ri64, &e), FORGE_OK);
    assert_int_equal(ri64, -(1LL << 40));
    assert_int_equal(gguf_get_f32(c, "t.f32", &rf, &e), FORGE_OK);
    assert_true(rf == 1e-5f);
    assert_int_equal(gguf_get_f64(c, "t.f64", &rd, &e), FORGE_OK);
    assert_true(rd == 3.25);
    assert_int_equal(gguf_get_bool(c, "t.bool", &rb, &e), FORGE_OK);
    assert_true(rb);
    assert_int_equal(gguf_get_str(c, "t.replaced", &s, &e), FORGE_OK);
    assert_true(s.len == 12 && !memcmp(s.data, "now a string", 12));
    float rfa[5];
    int32_t ria[3];
    assert_int_equal(gguf_copy_arr_f32(c, "t.arr_f32", rfa, 5, &e), FORGE_OK);
    assert_memory_equal(rfa, fa, sizeof fa);
    assert_int_equal(gguf_copy_arr_i32(c, "t.arr_i32", ria, 3, &e), FORGE_OK);
    assert_memory_equal(ria, ia, sizeof ia);
    gguf_type et;
    uint64_t n;
    assert_int_equal(gguf_get_arr(c, "t.arr_empty", &et, &n, &e), FORGE_OK);
    assert_int_equal(et, GGUF_TYPE_UINT8);
    assert_int_equal(n, 0);
    for (uint64_t i = 0; i < 3; i++) {
        assert_int_equal(gguf_get_arr_str(c, "t.arr_str", i, &s, &e), FORGE_OK);
        assert_int_equal(s.len, strs[i].len);
        assert_memory_equal(s.data, strs[i].data, s.len);
    }

    assert_int_equal(gguf_tensor_count(c), (int64_t)N_ELEMS(ts));
    for (size_t i = 0; i < N_ELEMS(ts); i++) {
        const gguf_tensor_info *t = gguf_tensor(c, (int64_t)i);
        assert_string_equal(t->name, ts[i].name);
        assert_int_equal(t->type, ts[i].type);
        assert_int_equal(t->n_dims, ts[i].nd);
        assert_memory_equal(t->ne, ts[i].ne, sizeof t->ne);
        assert_int_equal(t->offset % 64, 0);
        assert_int_equal(log.next_row[i], t->n_elements / t->ne[0]);
        size_t row = ggml_row_size(t->type, t->ne[0]);
        const uint8_t *d = t->data;
        for (int64_t r = 0; r < t->n_elements / t->ne[0]; r++)
            for (size_t j = 0; j < row; j++)
                if (d[(size_t)r * row + j] != pattern((int64_t)i, r, j)) fail_msg("%s row %lld byte %zu", t->name, (long long)r, j);
    }
    /* the file ends with the last tensor's padding */
    const gguf_tensor_info *last = gguf_tensor(c, (int64_t)N_ELEMS(ts) - 1);
    assert_int_equal(gguf_file_size(c), gguf_data_offset(c) + last->offset + 64);
    gguf_close(c);
    unlink(path);
    free(path);
    tu_rmtree(dir);
    free(dir);
}

/* --vocab-from's building block: copy tokenizer.* from a real vocab file, values identical. */
static void test_copy_kvs(void **state)
{
    (void)state;
    static const char *const files[] = {"testdata/models/stories260K.gguf",
                                        "testdata/vocab/ggml-vocab-llama-bpe.gguf"};
    for (size_t f = 0; f < N_ELEMS(files); f++) {
        char *src_path = tu_require_shared(files[f]);
        char *dir, *path = tmp_path(&dir, "copy.gguf");
        forge_err e = {0};
        gguf_ctx *src = NULL, *c = NULL;
        gguf_writer *w = NULL;
        int64_t copied = 0, expect = 0;
        assert_int_equal(gguf_open(src_path, &src, &e), FORGE_OK);
        for (int64_t i = 0; i < gguf_kv_count(src); i++)
            expect += !strncmp(gguf_kv_key(src, i), "tokenizer.", 10);
        assert_true(expect >= 5);
        assert_int_equal(gguf_writer_create(&w, &e), FORGE_OK);
        assert_int_equal(gguf_writer_set_str(w, "general.architecture", "test", &e), FORGE_OK);
        assert_int_equal(gguf_writer_copy_kvs(w, src, "tokenizer.", &copied, &e), FORGE_OK);
        assert_int_equal(copied, expect);
        assert_int_equal(gguf_writer_write(w, path, NULL, NULL, 0, &e), FORGE_OK);
        gguf_writer_free(w);
        int rc = gguf_open(path, &c, &e);
        if (rc) fail_msg("%s", e.msg);
        assert_int_equal(gguf_kv_count(c), expect + 1);
        assert_int_equal(gguf_tensor_count(c), 0);
        for (int64_t i = 1; i < gguf_kv_count(c); i++) {
            const char *key = gguf_kv_key(c, i);
            int64_t si = gguf_find_key(src, key);
            assert_true(si >= 0);
            gguf_value a, b;
            assert_int_equal(gguf_kv_value(c, i, &a), FORGE_OK);
            assert_int_equal(gguf_kv_value(src, si, &b), FORGE_OK);
            assert_int_equal(a.type, b.type);
            if (a.type == GGUF_TYPE_STRING) {
                assert_int_equal(a.str.len, b.str.len);
                assert_memory_equal(a.str.data, b.str.data, a.str.len);
            } else if (a.type == GGUF_TYPE_ARRAY) {
                assert_int_equal(a.elem_type, b.elem_type);
                assert_int_equal(a.n, b.n);
                for (uint64_t j = 0; j < a.n; j++) {
                    gguf_value x, y;
                    assert_int_equal(gguf_value_elem(c, &a, j, &x), FORGE_OK);
                    assert_int_equal(gguf_value_elem(src, &b, j, &y), FORGE_OK);
                    if (x.type == GGUF_TYPE_STRING) {
                        assert_int_equal(x.str.len, y.str.len);
                        assert_memory_equal(x.str.data, y.str.data, x.str.len);
                    } else {
                        assert_memory_equal(x.raw, y.raw, 1);
                    }
                }
            } else {
                assert_memory_equal(a.raw, b.raw, 1);
            }
        }
        gguf_close(c);
        gguf_close(src);
        unlink(path);
        free(path);
        tu_rmtree(dir);
        free(dir);
        free(src_path);
    }
}

static void test_writer_errors(void **state)
{
    (void)state;
    char *dir, *path = tmp_path(&dir, "err.gguf");
    forge_err e = {0};
    gguf_writer *w = NULL;
    int64_t ne[2] = {48, 2}, ok[2] = {64, 2}, zero[2] = {0, 2};
    assert_int_equal(gguf_writer_create(&w, &e), FORGE_OK);
    assert_int_equal(gguf_writer_add_tensor(w, "x", GGML_TYPE_Q8_0, 2, ne, &e), FORGE_E_INVALID);
    assert_non_null(strstr(e.msg, "row length 48 is not a multiple of the Q8_0 block size 32"));
    assert_int_equal(gguf_writer_add_tensor(w, "x", GGML_TYPE_F32, 2, zero, &e), FORGE_E_INVALID);
    assert_int_equal(gguf_writer_add_tensor(w, "x", GGML_TYPE_F32, 5, ok, &e), FORGE_E_INVALID);
    assert_int_equal(gguf_writer_add_tensor(w, "x", (ggml_type)4, 2, ok, &e), FORGE_E_INVALID);
    assert_int_equal(gguf_writer_add_tensor(w, "x", GGML_TYPE_Q8_0, 2, ok, &e), FORGE_OK);
    assert_int_equal(gguf_writer_add_tensor(w, "x", GGML_TYPE_F32, 2, ok, &e), FORGE_E_INVALID);
    assert_non_null(strstr(e.msg, "duplicate tensor name 'x'"));
    assert_int_equal(gguf_writer_add_tensor(w, "y", GGML_TYPE_F32, 2, ok, &e), FORGE_OK);
    /* tensors without a fill callback */
    assert_int_equal(gguf_writer_write(w, path, NULL, NULL, 0, &e), FORGE_E_INVALID);
    /* a failing fill stops the write and removes the partial file */
    struct fill_log log = {.fail_at = 1};
    assert_int_equal(gguf_writer_write(w, path, fill_pattern, &log, 0, &e), FORGE_E_INTERRUPTED);
    assert_non_null(strstr(e.msg, "fill stopped on purpose"));
    assert_int_equal(access(path, F_OK), -1);
    /* ... but a file that existed before (a device, the caller's temporary file) is not removed */
    FILE *pre = fopen(path, "wb");
    assert_non_null(pre);
    fclose(pre);
    struct fill_log log_pre = {.fail_at = 1};
    assert_int_equal(gguf_writer_write(w, path, fill_pattern, &log_pre, 0, &e),
                     FORGE_E_INTERRUPTED);
    assert_int_equal(access(path, F_OK), 0);
    unlink(path);
    /* unwritable path */
    struct fill_log log2 = {.fail_at = -1};
    assert_int_equal(gguf_writer_write(w, "/nonexistent-dir/x.gguf", fill_pattern, &log2, 0, &e), FORGE_E_IO);
    assert_non_null(strstr(e.msg, "/nonexistent-dir/x.gguf"));
    /* bad alignment */
    assert_int_equal(gguf_writer_set_u32(w, "general.alignment", 48, &e), FORGE_OK);
    assert_int_equal(gguf_writer_write(w, path, fill_pattern, &log2, 0, &e), FORGE_E_INVALID);
    assert_int_equal(gguf_writer_set_i32(w, "general.alignment", 64, &e), FORGE_OK);
    assert_int_equal(gguf_writer_write(w, path, fill_pattern, &log2, 0, &e), FORGE_E_INVALID);
    gguf_writer_free(w);
    gguf_writer_free(NULL);
    free(path);
    tu_rmtree(dir);
    free(dir);
}

/* A tensor bigger than the chunk goes through many fill calls; memory stays one chunk. */
static void test_streaming_chunks(void **state)
{
    (void)state;
    char *dir, *path = tmp_path(&dir, "big.gguf");
    forge_err e = {0};
    gguf_writer *w = NULL;
    int64_t ne[2] = {1024, 2048}; /* 8 MiB of F32 */
    assert_int_equal(gguf_writer_create(&w, &e), FORGE_OK);
    assert_int_equal(gguf_writer_add_tensor(w, "big", GGML_TYPE_F32, 2, ne, &e), FORGE_OK);
    struct fill_log log = {.fail_at = -1};
    assert_int_equal(gguf_writer_write(w, path, fill_pattern, &log, 1 << 20, &e), FORGE_OK);
    assert_int_equal(log.calls, 8); /* 256 rows of 4 KiB per 1 MiB chunk */
    gguf_writer_free(w);
    gguf_ctx *c = NULL;
    assert_int_equal(gguf_open(path, &c, &e), FORGE_OK);
    const gguf_tensor_info *t = gguf_find_tensor(c, "big");
    assert_non_null(t);
    assert_int_equal(((const uint8_t *)t->data)[4096 * 2047 + 5], pattern(0, 2047, 5));
    gguf_close(c);
    free(path);
    tu_rmtree(dir);
    free(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_copy_kvs),
        cmocka_unit_test(test_writer_errors),
        cmocka_unit_test(test_streaming_chunks),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
