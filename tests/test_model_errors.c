/* test_model_errors.c - bad model files are refused before any compute with a message naming
 * the problem; also what the loader must accept (tied output, absent keys defaulted like
 * llama.cpp). The files are variants of stories260K.gguf written with the GGUF writer. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "forge.h"
#include "testutil.h"

typedef struct variant {
    const char *skip_tensor;  /* leave this tensor out */
    const char *skip_key;     /* leave this key out */
    const char *shape_tensor; /* give this tensor shape [ne0, ne1] */
    int64_t ne0, ne1;
    const char *type_tensor; /* give this tensor type `type` (data zero) */
    ggml_type type;
    const char *str_key, *str_val; /* set a string key */
    const char *f32_key;           /* set a float key */
    float f32_val;
    const char *add_tensor; /* add a 1-D F32 tensor of add_n elements, all add_val */
    int64_t add_n;
    float add_val;
} variant;

typedef struct fill_ctx {
    const gguf_ctx *src;
    const variant *v;
} fill_ctx;

static int fill(void *user, int64_t index, const gguf_tensor_info *info, int64_t row0,
                int64_t n_rows, void *dst, forge_err *err)
{
    (void)index;
    (void)err;
    fill_ctx *f = user;
    const gguf_tensor_info *s = gguf_find_tensor(f->src, info->name);
    size_t row = ggml_row_size(info->type, info->ne[0]);
    if (f->v->add_tensor && !strcmp(info->name, f->v->add_tensor)) {
        for (int64_t i = 0; i < n_rows * info->ne[0]; i++)
            ((float *)dst)[i] = f->v->add_val;
        return FORGE_OK;
    }
    if (s && s->type == info->type && s->ne[0] == info->ne[0] && s->ne[1] == info->ne[1])
        memcpy(dst, (const uint8_t *)s->data + (size_t)row0 * row, (size_t)n_rows * row);
    else
        memset(dst, 0, (size_t)n_rows * row);
    return FORGE_OK;
}

/* Write a variant of src to dir/name; returns the malloc'd path. */
static char *write_variant(const char *src_path, const char *dir, const char *name,
                           const variant *v)
{
    forge_err err = {0};
    gguf_ctx *src = NULL;
    gguf_writer *w = NULL;
    assert_int_equal(gguf_open(src_path, &src, &err), 0);
    assert_int_equal(gguf_writer_create(&w, &err), 0);
    for (int64_t i = 0; i < gguf_kv_count(src); i++) {
        if (v->skip_key && !strcmp(gguf_kv_key(src, i), v->skip_key)) continue;
        assert_int_equal(gguf_writer_copy_kv(w, src, i, &err), 0);
    }
    if (v->str_key) assert_int_equal(gguf_writer_set_str(w, v->str_key, v->str_val, &err), 0);
    if (v->f32_key) assert_int_equal(gguf_writer_set_f32(w, v->f32_key, v->f32_val, &err), 0);
    for (int64_t i = 0; i < gguf_tensor_count(src); i++) {
        const gguf_tensor_info *t = gguf_tensor(src, i);
        if (v->skip_tensor && !strcmp(t->name, v->skip_tensor)) continue;
        int64_t ne[GGUF_MAX_DIMS];
        memcpy(ne, t->ne, sizeof ne);
        uint32_t n_dims = t->n_dims;
        ggml_type type = t->type;
        if (v->shape_tensor && !strcmp(t->name, v->shape_tensor)) {
            ne[0] = v->ne0;
            ne[1] = v->ne1;
            n_dims = v->ne1 > 1 ? 2 : 1;
        }
        if (v->type_tensor && !strcmp(t->name, v->type_tensor)) type = v->type;
        assert_int_equal(gguf_writer_add_tensor(w, t->name, type, n_dims, ne, &err), 0);
    }
    if (v->add_tensor) {
        int64_t ne[GGUF_MAX_DIMS] = {v->add_n, 1, 1, 1};
        assert_int_equal(gguf_writer_add_tensor(w, v->add_tensor, GGML_TYPE_F32, 1, ne, &err), 0);
    }
    size_t n = strlen(dir) + strlen(name) + 2;
    char *path = malloc(n);
    snprintf(path, n, "%s/%s", dir, name);
    fill_ctx fc = {src, v};
    if (gguf_writer_write(w, path, fill, &fc, 0, &err)) fail_msg("write %s: %s", path, err.msg);
    gguf_writer_free(w);
    gguf_close(src);
    return path;
}

/* Loading path must fail with code and a message containing each of the needles. */
static void expect_load_error(const char *path, int code, const char *needle1, const char *needle2)
{
    forge_err err = {0};
    forge_model *m = (forge_model *)(uintptr_t)1;
    int rc = forge_model_load(path, &m, &err);
    if (rc != code)
        fail_msg("%s: expected %s, got %s (%s)", path, forge_status_name(code),
                 forge_status_name(rc), err.msg);
    assert_null(m);
    print_message("%s\n", err.msg);
    if (needle1 && !strstr(err.msg, needle1)) fail_msg("message '%s' lacks '%s'", err.msg, needle1);
    if (needle2 && !strstr(err.msg, needle2)) fail_msg("message '%s' lacks '%s'", err.msg, needle2);
}

static char *g_src, *g_dir;

static int setup(void **state)
{
    (void)state;
    g_src = tu_shared_path("testdata/models/stories260K.gguf");
    g_dir = tu_mkdtemp();
    return g_dir ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    tu_rmtree(g_dir);
    free(g_dir);
    free(g_src);
    return 0;
}

#define NEED_SRC()                                                                                 \
    do {                                                                                           \
        if (!g_src) {                                                                              \
            print_message("SKIP: shared test data stories260K.gguf is absent\n");                  \
            skip();                                                                                \
        }                                                                                          \
    } while (0)

static void test_missing_tensor(void **state)
{
    (void)state;
    NEED_SRC();
    variant v = {.skip_tensor = "blk.2.ffn_up.weight"};
    char *p = write_variant(g_src, g_dir, "missing.gguf", &v);
    expect_load_error(p, FORGE_E_NOTFOUND, "blk.2.ffn_up.weight", "missing.gguf");
    free(p);
}

static void test_wrong_shape(void **state)
{
    (void)state;
    NEED_SRC();
    variant v = {.shape_tensor = "blk.1.attn_k.weight", .ne0 = 64, .ne1 = 64};
    char *p = write_variant(g_src, g_dir, "shape.gguf", &v);
    expect_load_error(p, FORGE_E_FORMAT, "blk.1.attn_k.weight", "expected [64, 32]");
    free(p);
    variant v2 = {.shape_tensor = "output_norm.weight", .ne0 = 32, .ne1 = 1};
    p = write_variant(g_src, g_dir, "shape2.gguf", &v2);
    expect_load_error(p, FORGE_E_FORMAT, "output_norm.weight", "expected [64]");
    free(p);
}

static void test_unsupported_type(void **state)
{
    (void)state;
    NEED_SRC();
    /* MXFP4: a valid id with a known block layout, but no CPU kernel yet */
    variant v = {.type_tensor = "blk.0.attn_q.weight", .type = GGML_TYPE_MXFP4};
    char *p = write_variant(g_src, g_dir, "mxfp4.gguf", &v);
    expect_load_error(p, FORGE_E_UNSUPPORTED, "blk.0.attn_q.weight", "MXFP4");
    free(p);
    variant v2 = {.type_tensor = "blk.3.ffn_norm.weight", .type = GGML_TYPE_F16};
    p = write_variant(g_src, g_dir, "normf16.gguf", &v2);
    expect_load_error(p, FORGE_E_UNSUPPORTED, "blk.3.ffn_norm.weight", "F16");
    free(p);
}

static void test_unsupported_arch(void **state)
{
    (void)state;
    NEED_SRC();
    variant v = {.str_key = "general.architecture", .str_val = "gpt2"};
    char *p = write_variant(g_src, g_dir, "arch.gguf", &v);
    expect_load_error(p, FORGE_E_UNSUPPORTED, "'gpt2'", "not supported");
    free(p);
}

static void test_missing_key(void **state)
{
    (void)state;
    NEED_SRC();
    variant v = {.skip_key = "llama.embedding_length"};
    char *p = write_variant(g_src, g_dir, "nokey.gguf", &v);
    expect_load_error(p, FORGE_E_NOTFOUND, "llama.embedding_length", NULL);
    free(p);
    variant v2 = {.skip_key = "llama.attention.layer_norm_rms_epsilon"};
    p = write_variant(g_src, g_dir, "noeps.gguf", &v2);
    expect_load_error(p, FORGE_E_NOTFOUND, "layer_norm_rms_epsilon", NULL);
    free(p);
    expect_load_error("/nonexistent/model.gguf", FORGE_E_IO, "/nonexistent/model.gguf", NULL);
}

/* A NaN or infinite float key is reported as such, not as "key not found" (a NaN once read
 * like the loader's "absent" sentinel). */
static void test_nonfinite_key(void **state)
{
    (void)state;
    NEED_SRC();
    variant v = {.f32_key = "llama.attention.layer_norm_rms_epsilon", .f32_val = NAN};
    char *p = write_variant(g_src, g_dir, "naneps.gguf", &v);
    expect_load_error(p, FORGE_E_FORMAT, "layer_norm_rms_epsilon", "not a finite number");
    free(p);
    variant v2 = {.f32_key = "llama.rope.freq_base", .f32_val = INFINITY};
    p = write_variant(g_src, g_dir, "infbase.gguf", &v2);
    expect_load_error(p, FORGE_E_FORMAT, "rope.freq_base", "not a finite number");
    free(p);
}

/* logits after "Once upon a time" */
static float *logits_of(const char *path, bool *tied)
{
    forge_err err = {0};
    forge_model *m = NULL;
    forge_context *ctx = NULL;
    if (forge_model_load(path, &m, &err)) fail_msg("%s: %s", path, err.msg);
    if (tied) *tied = forge_model_info_get(m)->tied_output;
    forge_context_params cp = forge_context_default_params();
    cp.n_threads = 1;
    assert_int_equal(forge_context_create(m, &cp, &ctx, &err), 0);
    const int32_t ids[] = {1, 403, 407, 261, 378};
    assert_int_equal(forge_decode(ctx, ids, 5, false, &err), 0);
    float *l = malloc(512 * sizeof *l);
    memcpy(l, forge_get_logits(ctx, -1), 512 * sizeof *l);
    forge_context_free(ctx);
    forge_model_free(m);
    return l;
}

/* No output.weight: the embedding is the classifier (stories260K's output is a copy of it). A
 * rope base written explicitly as the default (10000) changes nothing; another base does. */
static void test_tied_and_defaults(void **state)
{
    (void)state;
    NEED_SRC();
    bool tied = true;
    float *ref = logits_of(g_src, &tied);
    assert_false(tied);
    variant v = {.skip_tensor = "output.weight"};
    char *p = write_variant(g_src, g_dir, "tied.gguf", &v);
    float *l = logits_of(p, &tied);
    assert_true(tied);
    assert_memory_equal(l, ref, 512 * sizeof *l);
    free(l);
    free(p);

    variant v2 = {.f32_key = "llama.rope.freq_base", .f32_val = 10000.0f};
    p = write_variant(g_src, g_dir, "base10k.gguf", &v2);
    l = logits_of(p, NULL);
    assert_memory_equal(l, ref, 512 * sizeof *l);
    free(l);
    free(p);

    variant v3 = {.f32_key = "llama.rope.freq_base", .f32_val = 500000.0f};
    p = write_variant(g_src, g_dir, "base500k.gguf", &v3);
    l = logits_of(p, NULL);
    assert_true(tu_nmse(l, ref, 512) > 1e-8);
    free(l);
    free(p);

    /* llama3-style rope_freqs of all 1 change nothing; all 2 is linear scaling by 2 */
    variant v4 = {.add_tensor = "rope_freqs.weight", .add_n = 4, .add_val = 1.0f};
    p = write_variant(g_src, g_dir, "freqs1.gguf", &v4);
    l = logits_of(p, NULL);
    assert_memory_equal(l, ref, 512 * sizeof *l);
    free(l);
    free(p);
    variant v5 = {.add_tensor = "rope_freqs.weight", .add_n = 4, .add_val = 2.0f};
    p = write_variant(g_src, g_dir, "freqs2.gguf", &v5);
    float *l_ff = logits_of(p, NULL);
    free(p);
    variant v6 = {.f32_key = "llama.rope.scaling.factor", .f32_val = 2.0f};
    p = write_variant(g_src, g_dir, "linear2.gguf", &v6);
    l = logits_of(p, NULL);
    assert_memory_equal(l, l_ff, 512 * sizeof *l);
    assert_true(tu_nmse(l, ref, 512) > 1e-8);
    free(l);
    free(l_ff);
    free(p);
    /* YaRN without a factor changes nothing; with factor 2 the logits move */
    variant v8 = {.str_key = "llama.rope.scaling.type", .str_val = "yarn"};
    p = write_variant(g_src, g_dir, "yarn1.gguf", &v8);
    l = logits_of(p, NULL);
    assert_memory_equal(l, ref, 512 * sizeof *l);
    free(l);
    free(p);
    variant v9 = {.str_key = "llama.rope.scaling.type",
                  .str_val = "yarn",
                  .f32_key = "llama.rope.scaling.factor",
                  .f32_val = 2.0f};
    p = write_variant(g_src, g_dir, "yarn2.gguf", &v9);
    l = logits_of(p, NULL);
    assert_true(tu_nmse(l, ref, 512) > 1e-8);
    free(l);
    free(p);
    variant v10 = {.str_key = "llama.rope.scaling.type", .str_val = "longrope"};
    p = write_variant(g_src, g_dir, "longrope.gguf", &v10);
    expect_load_error(p, FORGE_E_UNSUPPORTED, "longrope", "not supported");
    free(p);

    variant v7 = {.add_tensor = "rope_freqs.weight", .add_n = 3, .add_val = 1.0f};
    p = write_variant(g_src, g_dir, "freqs3.gguf", &v7);
    expect_load_error(p, FORGE_E_FORMAT, "rope_freqs.weight", "expected [4]");
    free(p);
    free(ref);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_missing_tensor),   cmocka_unit_test(test_wrong_shape),
        cmocka_unit_test(test_unsupported_type), cmocka_unit_test(test_unsupported_arch),
        cmocka_unit_test(test_missing_key),      cmocka_unit_test(test_tied_and_defaults),
        cmocka_unit_test(test_nonfinite_key),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
