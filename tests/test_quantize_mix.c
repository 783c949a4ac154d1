/* test_quantize_mix.c - forge_quantize_file's per-tensor type choices on multi-layer models
 * (the shared reference has one layer, where most layer rules cannot show): for each mix, the
 * types llama-quantize's rules (llama_tensor_get_type, llama.cpp c392e50) give, written out here
 * independently per mix; tied and separate output matrices; GQA and the 70B class; fallbacks;
 * F32/BF16 input; requantize refusal; the threads give the same file. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"
#include "core/util.h"
#include "forge_gguf.h"
#include "forge_quantize.h"

struct model_spec {
    int n_layer, n_head, n_head_kv;
    bool tied;
    int64_t ne0; /* row length of every 2-D weight */
    int wtype;   /* F32 or BF16 (or a quantized type for the requantize test) */
};

static int fill_rows(void *user, int64_t index, const gguf_tensor_info *info, int64_t row0,
                     int64_t n_rows, void *dst, forge_err *err)
{
    (void)user;
    (void)err;
    int64_t n = n_rows * info->ne[0];
    float *x = malloc((size_t)n * sizeof *x);
    if (!x) return FORGE_E_NOMEM;
    for (int64_t i = 0; i < n; i++) {
        int64_t k = (row0 * info->ne[0] + i) * 2654435761u + (uint64_t)index * 97;
        x[i] = (float)((k % 2001) - 1000) / 1000.0f * 0.05f;
    }
    if (info->type == GGML_TYPE_F32)
        memcpy(dst, x, (size_t)n * sizeof *x);
    else {
        /* BF16 (truncating is fine for a test input) */
        uint8_t *d = dst;
        for (int64_t i = 0; i < n; i++) {
            uint32_t u;
            memcpy(&u, &x[i], 4);
            d[2 * i] = (uint8_t)(u >> 16);
            d[2 * i + 1] = (uint8_t)(u >> 24);
        }
    }
    free(x);
    return FORGE_OK;
}

static void write_model(const char *path, const struct model_spec *s)
{
    gguf_writer *w = NULL;
    forge_err err = {0};
    assert_int_equal(gguf_writer_create(&w, &err), FORGE_OK);
    assert_int_equal(gguf_writer_set_str(w, "general.architecture", "llama", &err), FORGE_OK);
    assert_int_equal(gguf_writer_set_u32(w, "general.file_type", 0, &err), FORGE_OK);
    assert_int_equal(gguf_writer_set_u32(w, "llama.block_count", (uint32_t)s->n_layer, &err),
                     FORGE_OK);
    assert_int_equal(
        gguf_writer_set_u32(w, "llama.attention.head_count", (uint32_t)s->n_head, &err), FORGE_OK);
    assert_int_equal(
        gguf_writer_set_u32(w, "llama.attention.head_count_kv", (uint32_t)s->n_head_kv, &err),
        FORGE_OK);
    int64_t ne2[2] = {s->ne0, 2}, ne1[1] = {s->ne0};
    ggml_type wt = (ggml_type)s->wtype;
    assert_int_equal(gguf_writer_add_tensor(w, "token_embd.weight", wt, 2, ne2, &err), FORGE_OK);
    assert_int_equal(gguf_writer_add_tensor(w, "output_norm.weight", GGML_TYPE_F32, 1, ne1, &err),
                     FORGE_OK);
    if (!s->tied)
        assert_int_equal(gguf_writer_add_tensor(w, "output.weight", wt, 2, ne2, &err), FORGE_OK);
    static const char *const names[] = {"attn_q",   "attn_k", "attn_v",  "attn_output",
                                        "ffn_gate", "ffn_up", "ffn_down"};
    for (int il = 0; il < s->n_layer; il++) {
        char name[64];
        snprintf(name, sizeof name, "blk.%d.attn_norm.weight", il);
        assert_int_equal(gguf_writer_add_tensor(w, name, GGML_TYPE_F32, 1, ne1, &err), FORGE_OK);
        for (size_t k = 0; k < FORGE_ARRAY_LEN(names); k++) {
            snprintf(name, sizeof name, "blk.%d.%s.weight", il, names[k]);
            assert_int_equal(gguf_writer_add_tensor(w, name, wt, 2, ne2, &err), FORGE_OK);
        }
    }
    assert_int_equal(gguf_writer_write(w, path, fill_rows, NULL, 0, &err), FORGE_OK);
    gguf_writer_free(w);
}

/* The type a tensor of a layer gets, per mix, as llama-quantize's rules say (16 layers, so
 * "more bits" layers are 0, 1, 4, 7, 10, 13, 14, 15; n/8 = 2, n/16 = 1). gqa = n_head/n_head_kv. */
static bool more_bits(int i, int n)
{
    return i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2;
}

static int expected_mix(const char *mix, const char *what, int il, int n, int gqa, bool is70b);

/* on top of every mix: the 70B class gives attn_v Q5_K where the mix says Q3_K or Q4_K */
static int expected(const char *mix, const char *what, int il, int n, int gqa, bool is70b)
{
    int t = expected_mix(mix, what, il, n, gqa, is70b);
    if (is70b && !strcmp(what, "attn_v") && (t == GGML_TYPE_Q3_K || t == GGML_TYPE_Q4_K))
        t = GGML_TYPE_Q5_K;
    return t;
}

static int expected_mix(const char *mix, const char *what, int il, int n, int gqa, bool is70b)
{
    (void)is70b;
    const bool v = !strcmp(what, "attn_v"), down = !strcmp(what, "ffn_down"),
               ao = !strcmp(what, "attn_output");
    if (!strcmp(mix, "Q4_K_M"))
        return (v || down) && more_bits(il, n) ? GGML_TYPE_Q6_K : GGML_TYPE_Q4_K;
    if (!strcmp(mix, "Q5_K_M"))
        return (v || down) && more_bits(il, n) ? GGML_TYPE_Q6_K : GGML_TYPE_Q5_K;
    if (!strcmp(mix, "Q4_K_S"))
        return (v && il < 4) || (down && il < n / 8) ? GGML_TYPE_Q5_K : GGML_TYPE_Q4_K;
    if (!strcmp(mix, "Q5_K_S")) return GGML_TYPE_Q5_K;
    if (!strcmp(mix, "Q3_K_S")) return GGML_TYPE_Q3_K;
    if (!strcmp(mix, "Q3_K_M")) {
        if (v) return il < 2 ? GGML_TYPE_Q5_K : GGML_TYPE_Q4_K;
        if (down) return il < n / 16 ? GGML_TYPE_Q5_K : GGML_TYPE_Q4_K;
        return ao ? GGML_TYPE_Q4_K : GGML_TYPE_Q3_K;
    }
    if (!strcmp(mix, "Q3_K_L")) return v || down || ao ? GGML_TYPE_Q5_K : GGML_TYPE_Q3_K;
    if (!strcmp(mix, "Q2_K")) {
        if (v) return gqa >= 4 ? GGML_TYPE_Q4_K : GGML_TYPE_Q3_K;
        return down || ao ? GGML_TYPE_Q3_K : GGML_TYPE_Q2_K;
    }
    if (!strcmp(mix, "IQ4_XS") || !strcmp(mix, "IQ4_NL")) {
        int base = !strcmp(mix, "IQ4_XS") ? GGML_TYPE_IQ4_XS : GGML_TYPE_IQ4_NL;
        return (v && gqa >= 4) || (down && il < n / 8) ? GGML_TYPE_Q5_K : base;
    }
    if (!strcmp(mix, "Q6_K")) return GGML_TYPE_Q6_K;
    if (!strcmp(mix, "Q8_0")) return GGML_TYPE_Q8_0;
    if (!strcmp(mix, "Q4_0")) return GGML_TYPE_Q4_0;
    return -1;
}

static int type_of(const gguf_ctx *g, const char *name)
{
    const gguf_tensor_info *t = gguf_find_tensor(g, name);
    assert_non_null(t);
    return t->type;
}

static void check_mixes(const struct model_spec *s, bool is70b)
{
    static const char *const mixes[] = {"Q4_K_M", "Q5_K_M", "Q4_K_S", "Q5_K_S", "Q3_K_S",
                                        "Q3_K_M", "Q3_K_L", "Q2_K",   "IQ4_XS", "IQ4_NL",
                                        "Q6_K",   "Q8_0",   "Q4_0"};
    static const char *const names[] = {"attn_q",   "attn_k", "attn_v",  "attn_output",
                                        "ffn_gate", "ffn_up", "ffn_down"};
    char *dir = tu_mkdtemp(), in[512], out[512];
    snprintf(in, sizeof in, "%s/in.gguf", dir);
    snprintf(out, sizeof out, "%s/out.gguf", dir);
    write_model(in, s);
    for (size_t m = 0; m < FORGE_ARRAY_LEN(mixes); m++) {
        forge_quantize_opts o = {.in_path = in,
                                 .out_path = out,
                                 .mix = forge_quantize_mix_find(mixes[m]),
                                 .n_threads = 2};
        forge_quantize_result res;
        forge_err err = {0};
        gguf_ctx *g = NULL;
        assert_true(o.mix >= 0);
        if (forge_quantize_file(&o, &res, &err) != FORGE_OK) fail_msg("%s: %s", mixes[m], err.msg);
        assert_int_equal(gguf_open(out, &g, &err), FORGE_OK);
        int base = forge_quantize_mix_base_type(o.mix);
        /* the output matrix: Q6_K unless the mix is Q8_0; a separate token_embd keeps the base */
        int out_type = base == GGML_TYPE_Q8_0 ? GGML_TYPE_Q8_0 : GGML_TYPE_Q6_K;
        assert_int_equal(type_of(g, s->tied ? "token_embd.weight" : "output.weight"), out_type);
        if (!s->tied) assert_int_equal(type_of(g, "token_embd.weight"), base);
        assert_int_equal(type_of(g, "output_norm.weight"), GGML_TYPE_F32);
        for (int il = 0; il < s->n_layer; il++)
            for (size_t k = 0; k < FORGE_ARRAY_LEN(names); k++) {
                char name[64];
                snprintf(name, sizeof name, "blk.%d.%s.weight", il, names[k]);
                int want =
                    expected(mixes[m], names[k], il, s->n_layer, s->n_head / s->n_head_kv, is70b);
                int got = type_of(g, name);
                if (got != want)
                    fail_msg("%s: %s is %s, llama-quantize's rules give %s", mixes[m], name,
                             ggml_type_name(got), ggml_type_name(want));
            }
        assert_int_equal(res.n_fallback, 0);
        assert_int_equal(res.n_tensors, gguf_tensor_count(g));
        uint32_t ft;
        assert_int_equal(gguf_get_u32(g, "general.file_type", &ft, &err), FORGE_OK);
        assert_int_equal(ft, forge_quantize_mix_file_type(o.mix));
        gguf_close(g);
    }
    tu_rmtree(dir);
    free(dir);
}

static void test_mixes_16_layers_tied(void **state)
{
    (void)state;
    struct model_spec s = {16, 8, 8, true, 256, GGML_TYPE_F32};
    check_mixes(&s, false);
}

static void test_mixes_16_layers_gqa4_output_bf16(void **state)
{
    (void)state;
    struct model_spec s = {16, 32, 8, false, 256, GGML_TYPE_BF16};
    check_mixes(&s, false);
}

static void test_mixes_70b_class(void **state)
{
    (void)state;
    /* 80 llama layers with GQA: llama.cpp's "70B" bumps attn_v from Q3_K/Q4_K to Q5_K */
    struct model_spec s = {80, 64, 8, false, 256, GGML_TYPE_F32};
    check_mixes(&s, true);
}

static void test_fallback_and_threads(void **state)
{
    (void)state;
    char *dir = tu_mkdtemp(), in[512], out1[512], out2[512];
    snprintf(in, sizeof in, "%s/in.gguf", dir);
    snprintf(out1, sizeof out1, "%s/o1.gguf", dir);
    snprintf(out2, sizeof out2, "%s/o2.gguf", dir);
    /* rows of 96: no K-quant fits; Q4_K -> Q5_0, Q6_K -> Q8_0 (layer 1's attn_v and ffn_down get
     * "more bits"); the tied token_embd, as the output matrix, goes straight to Q8_0 (llama.cpp's
     * rule for output rows that K-quants cannot hold; reported and counted as a fallback too) */
    struct model_spec s = {2, 4, 4, true, 96, GGML_TYPE_F32};
    write_model(in, &s);
    forge_quantize_opts o = {
        .in_path = in, .out_path = out1, .mix = forge_quantize_mix_find("q4_k_m"), .n_threads = 1};
    forge_quantize_result res;
    forge_err err = {0};
    assert_int_equal(forge_quantize_file(&o, &res, &err), FORGE_OK);
    assert_int_equal(res.n_fallback, 2 * 7 + 1);
    assert_int_equal(res.type_count[GGML_TYPE_Q5_0], 2 * 7 - 2);
    assert_int_equal(res.type_count[GGML_TYPE_Q8_0], 2 + 1);
    o.out_path = out2;
    o.n_threads = 3;
    assert_int_equal(forge_quantize_file(&o, &res, &err), FORGE_OK);
    size_t n1, n2;
    char *a = tu_read_file(out1, &n1), *b = tu_read_file(out2, &n2);
    assert_non_null(a);
    assert_non_null(b);
    assert_int_equal(n1, n2);
    assert_memory_equal(a, b, n1);
    free(a);
    free(b);
    gguf_ctx *g = NULL;
    assert_int_equal(gguf_open(out1, &g, &err), FORGE_OK);
    assert_int_equal(type_of(g, "token_embd.weight"), GGML_TYPE_Q8_0);
    assert_int_equal(type_of(g, "blk.1.attn_q.weight"), GGML_TYPE_Q5_0);
    gguf_close(g);
    tu_rmtree(dir);
    free(dir);
}

static void test_requantize_refused(void **state)
{
    (void)state;
    char *dir = tu_mkdtemp(), in[512], out[512];
    snprintf(in, sizeof in, "%s/in.gguf", dir);
    snprintf(out, sizeof out, "%s/out.gguf", dir);
    struct model_spec s = {1, 4, 4, true, 256, GGML_TYPE_F32};
    write_model(in, &s);
    forge_quantize_opts o = {
        .in_path = in, .out_path = out, .mix = forge_quantize_mix_find("Q8_0"), .n_threads = 1};
    forge_err err = {0};
    assert_int_equal(forge_quantize_file(&o, NULL, &err), FORGE_OK);
    /* out is Q8_0 now; to Q4_0 it must be requantized */
    o.in_path = out;
    char out2[600];
    snprintf(out2, sizeof out2, "%s/out2.gguf", dir);
    o.out_path = out2;
    o.mix = forge_quantize_mix_find("Q4_0");
    assert_int_equal(forge_quantize_file(&o, NULL, &err), FORGE_E_INVALID);
    assert_non_null(strstr(err.msg, "already quantized (Q8_0)"));
    assert_non_null(strstr(err.msg, "token_embd.weight"));
    o.allow_requantize = true;
    assert_int_equal(forge_quantize_file(&o, NULL, &err), FORGE_OK);
    o.mix = -1;
    assert_int_equal(forge_quantize_file(&o, NULL, &err), FORGE_E_INVALID);
    assert_int_equal(forge_quantize_mix_find("Q4_K_X"), -1);
    assert_null(forge_quantize_mix_name(-1));
    tu_rmtree(dir);
    free(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mixes_16_layers_tied),
        cmocka_unit_test(test_mixes_16_layers_gqa4_output_bf16),
        cmocka_unit_test(test_mixes_70b_class),
        cmocka_unit_test(test_fallback_and_threads),
        cmocka_unit_test(test_requantize_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
