/* test_gguf.c - the GGUF reader: type traits, every real .gguf under ../shared against the facts in
 * its README, dequantization against the original llama2.c checkpoint, the generic value walk,
 * and a malformed-file corpus generated here (patched and truncated files) that must fail
 * cleanly with the right status and a message naming the file and the offset or key. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "forge.h"
#include "testutil.h"

#define N_ELEMS(a) (sizeof(a) / sizeof((a)[0]))

/* ---- helpers ------------------------------------------------------------------------------ */

static gguf_ctx *open_ok(const char *path)
{
    forge_err e = {0};
    gguf_ctx *c = NULL;
    int rc = gguf_open(path, &c, &e);
    if (rc) print_message("gguf_open(%s): %s\n", path, e.msg);
    assert_int_equal(rc, FORGE_OK);
    assert_non_null(c);
    return c;
}

static bool str_eq(gguf_str s, const char *want)
{
    return s.len == strlen(want) && memcmp(s.data, want, s.len) == 0;
}

static void assert_key_str(gguf_ctx *c, const char *key, const char *want)
{
    gguf_str s;
    forge_err e = {0};
    assert_int_equal(gguf_get_str(c, key, &s, &e), FORGE_OK);
    if (!str_eq(s, want)) fail_msg("%s = '%.*s', want '%s'", key, (int)s.len, s.data, want);
}

static void assert_key_u32(gguf_ctx *c, const char *key, uint32_t want)
{
    uint32_t v = 0;
    forge_err e = {0};
    int rc = gguf_get_u32(c, key, &v, &e);
    if (rc) fail_msg("%s: %s", key, e.msg);
    assert_int_equal(v, want);
}

static void assert_tensor(gguf_ctx *c, const char *name, int type, int64_t ne0, int64_t ne1)
{
    const gguf_tensor_info *t = gguf_find_tensor(c, name);
    if (!t) fail_msg("tensor %s missing", name);
    assert_string_equal(t->name, name);
    if ((int)t->type != type) fail_msg("%s: type %s, want %s", name, ggml_type_name(t->type), ggml_type_name(type));
    assert_int_equal(t->ne[0], ne0);
    assert_int_equal(t->ne[1], ne1);
    assert_int_equal(t->n_dims, ne1 == 1 ? 1 : 2);
    assert_int_equal(t->n_elements, ne0 * ne1);
    assert_int_equal(t->n_bytes, ggml_row_size(type, ne0) * (uint64_t)ne1);
}

/* ---- type traits -------------------------------------------------------------------------- */

static void test_type_traits(void **state)
{
    static const struct { int t; const char *name; int64_t bs; size_t bytes; } want[] = {
        {0, "F32", 1, 4},          {1, "F16", 1, 2},         {2, "Q4_0", 32, 18},
        {3, "Q4_1", 32, 20},       {6, "Q5_0", 32, 22},      {7, "Q5_1", 32, 24},
        {8, "Q8_0", 32, 34},       {9, "Q8_1", 32, 36},      {10, "Q2_K", 256, 84},
        {11, "Q3_K", 256, 110},    {12, "Q4_K", 256, 144},   {13, "Q5_K", 256, 176},
        {14, "Q6_K", 256, 210},    {15, "Q8_K", 256, 292},   {16, "IQ2_XXS", 256, 66},
        {17, "IQ2_XS", 256, 74},   {18, "IQ3_XXS", 256, 98}, {19, "IQ1_S", 256, 50},
        {20, "IQ4_NL", 32, 18},    {21, "IQ3_S", 256, 110},  {22, "IQ2_S", 256, 82},
        {23, "IQ4_XS", 256, 136},  {24, "I8", 1, 1},         {25, "I16", 1, 2},
        {26, "I32", 1, 4},         {27, "I64", 1, 8},        {28, "F64", 1, 8},
        {29, "IQ1_M", 256, 56},    {30, "BF16", 1, 2},       {34, "TQ1_0", 256, 54},
        {35, "TQ2_0", 256, 66},    {39, "MXFP4", 32, 17},
    };
    (void)state;
    for (size_t i = 0; i < N_ELEMS(want); i++) {
        assert_true(ggml_type_valid(want[i].t));
        assert_string_equal(ggml_type_name(want[i].t), want[i].name);
        assert_int_equal(ggml_type_block_size(want[i].t), want[i].bs);
        assert_int_equal(ggml_type_block_bytes(want[i].t), want[i].bytes);
        assert_int_equal(ggml_type_from_name(want[i].name), want[i].t);
        assert_int_equal(ggml_row_size(want[i].t, want[i].bs * 3), want[i].bytes * 3);
    }
    static const int removed[] = {-1, 4, 5, 31, 32, 33, 36, 37, 38, 40, 1000};
    for (size_t i = 0; i < N_ELEMS(removed); i++) {
        assert_false(ggml_type_valid(removed[i]));
        assert_string_equal(ggml_type_name(removed[i]), "unknown");
        assert_int_equal(ggml_type_block_size(removed[i]), 0);
        assert_int_equal(ggml_type_block_bytes(removed[i]), 0);
    }
    assert_int_equal(ggml_type_from_name("q4_0"), GGML_TYPE_Q4_0);
    assert_int_equal(ggml_type_from_name("bf16"), GGML_TYPE_BF16);
    assert_int_equal(ggml_type_from_name("Q4_2"), -1);
    assert_int_equal(ggml_type_from_name(""), -1);
    assert_int_equal(ggml_row_size(GGML_TYPE_Q8_0, 172), 0); /* not a multiple of 32 */
    assert_int_equal(ggml_row_size(GGML_TYPE_F16, 172), 344);
    assert_string_equal(gguf_type_name(GGUF_TYPE_UINT32), "u32");
    assert_string_equal(gguf_type_name(GGUF_TYPE_STRING), "str");
    assert_string_equal(gguf_type_name(13), "unknown");
}

/* ---- stories260K (F32) -------------------------------------------------------------------- */

static void test_stories_f32(void **state)
{
    (void)state;
    char *path = tu_require_shared("testdata/models/stories260K.gguf");
    gguf_ctx *c = open_ok(path);
    forge_err e = {0};

    assert_int_equal(gguf_version(c), 3);
    assert_int_equal(gguf_kv_count(c), 19);
    assert_int_equal(gguf_tensor_count(c), 48);
    assert_int_equal(gguf_alignment(c), 32);
    assert_int_equal(gguf_data_offset(c), 14176);
    assert_int_equal(gguf_file_size(c), 1185376);
    assert_string_equal(gguf_path(c), path);
    for (int64_t i = 0; i < 48; i++) assert_int_equal(gguf_tensor(c, i)->type, GGML_TYPE_F32);
    assert_null(gguf_tensor(c, 48));
    assert_null(gguf_tensor(c, -1));

    assert_tensor(c, "token_embd.weight", GGML_TYPE_F32, 64, 512);
    assert_tensor(c, "output.weight", GGML_TYPE_F32, 64, 512);
    assert_tensor(c, "output_norm.weight", GGML_TYPE_F32, 64, 1);
    for (int l = 0; l < 5; l++) {
        char n[64];
        struct { const char *s; int64_t ne0, ne1; } blk[] = {
            {"attn_q", 64, 64},    {"attn_k", 64, 32},   {"attn_v", 64, 32},
            {"attn_output", 64, 64}, {"attn_norm", 64, 1}, {"ffn_gate", 64, 172},
            {"ffn_down", 172, 64}, {"ffn_up", 64, 172},  {"ffn_norm", 64, 1},
        };
        for (size_t j = 0; j < N_ELEMS(blk); j++) {
            snprintf(n, sizeof n, "blk.%d.%s.weight", l, blk[j].s);
            assert_tensor(c, n, GGML_TYPE_F32, blk[j].ne0, blk[j].ne1);
        }
    }
    assert_null(gguf_find_tensor(c, "blk.5.attn_q.weight"));

    assert_key_str(c, "general.architecture", "llama");
    assert_key_str(c, "general.name", "llama");
    assert_key_str(c, "tokenizer.ggml.model", "llama");
    assert_key_u32(c, "llama.context_length", 128);
    assert_key_u32(c, "llama.embedding_length", 64);
    assert_key_u32(c, "llama.feed_forward_length", 172);
    assert_key_u32(c, "llama.attention.head_count", 8);
    assert_key_u32(c, "llama.attention.head_count_kv", 4);
    assert_key_u32(c, "llama.block_count", 5);
    assert_key_u32(c, "llama.rope.dimension_count", 8);
    assert_key_u32(c, "tokenizer.ggml.bos_token_id", 1);
    assert_key_u32(c, "tokenizer.ggml.eos_token_id", 2);
    assert_key_u32(c, "tokenizer.ggml.unknown_token_id", 0);
    assert_key_u32(c, "tokenizer.ggml.seperator_token_id", 4294967295u);
    assert_key_u32(c, "tokenizer.ggml.padding_token_id", 4294967295u);

    float eps = 0;
    double eps64 = 0;
    assert_int_equal(gguf_get_f32(c, "llama.attention.layer_norm_rms_epsilon", &eps, &e), FORGE_OK);
    assert_true(eps == 1e-5f);
    assert_int_equal(gguf_get_f64(c, "llama.attention.layer_norm_rms_epsilon", &eps64, &e), FORGE_OK);
    assert_true((float)eps64 == 1e-5f);

    /* integer conversions: u32 value into the other integer getters */
    int32_t i32;
    int64_t i64;
    uint64_t u64;
    uint8_t u8;
    assert_int_equal(gguf_get_i32(c, "llama.block_count", &i32, &e), FORGE_OK);
    assert_int_equal(i32, 5);
    assert_int_equal(gguf_get_i64(c, "tokenizer.ggml.seperator_token_id", &i64, &e), FORGE_OK);
    assert_int_equal(i64, 4294967295LL);
    assert_int_equal(gguf_get_u64(c, "llama.embedding_length", &u64, &e), FORGE_OK);
    assert_int_equal(u64, 64);
    assert_int_equal(gguf_get_u8(c, "llama.feed_forward_length", &u8, &e), FORGE_OK);
    assert_int_equal(u8, 172);
    assert_int_equal(gguf_get_i32(c, "tokenizer.ggml.seperator_token_id", &i32, &e), FORGE_E_RANGE);
    assert_non_null(strstr(e.msg, "tokenizer.ggml.seperator_token_id"));
    assert_non_null(strstr(e.msg, "4294967295"));
    assert_int_equal(gguf_get_u8(c, "llama.context_length", &u8, &e), FORGE_OK);

    /* absent keys and type mismatches */
    uint32_t u32;
    assert_int_equal(gguf_get_u32(c, "general.file_type", &u32, &e), FORGE_E_NOTFOUND);
    assert_non_null(strstr(e.msg, path));
    assert_non_null(strstr(e.msg, "key 'general.file_type' not found"));
    assert_int_equal(gguf_get_f32(c, "llama.rope.freq_base", &eps, &e), FORGE_E_NOTFOUND);
    assert_int_equal(gguf_find_key(c, "llama.vocab_size"), -1);
    assert_int_equal(gguf_find_key(c, "tokenizer.ggml.pre"), -1);
    assert_int_equal(gguf_get_u32(c, "general.architecture", &u32, &e), FORGE_E_TYPE);
    assert_non_null(strstr(e.msg, "key 'general.architecture' has type str, expected u32"));
    gguf_str s;
    assert_int_equal(gguf_get_str(c, "llama.block_count", &s, &e), FORGE_E_TYPE);
    assert_non_null(strstr(e.msg, "has type u32, expected str"));
    assert_int_equal(gguf_get_f32(c, "llama.block_count", &eps, &e), FORGE_E_TYPE);
    bool b;
    assert_int_equal(gguf_get_bool(c, "llama.block_count", &b, &e), FORGE_E_TYPE);
    assert_int_equal(gguf_get_u32(c, "tokenizer.ggml.tokens", &u32, &e), FORGE_E_TYPE);
    assert_non_null(strstr(e.msg, "has type arr"));

    /* vocabulary arrays */
    gguf_type et;
    uint64_t n;
    assert_int_equal(gguf_get_arr(c, "tokenizer.ggml.tokens", &et, &n, &e), FORGE_OK);
    assert_int_equal(et, GGUF_TYPE_STRING);
    assert_int_equal(n, 512);
    assert_int_equal(gguf_get_arr_str(c, "tokenizer.ggml.tokens", 0, &s, &e), FORGE_OK);
    assert_true(str_eq(s, "<unk>"));
    assert_int_equal(gguf_get_arr_str(c, "tokenizer.ggml.tokens", 1, &s, &e), FORGE_OK);
    assert_true(str_eq(s, "<s>"));
    assert_int_equal(gguf_get_arr_str(c, "tokenizer.ggml.tokens", 2, &s, &e), FORGE_OK);
    assert_true(str_eq(s, "</s>"));
    assert_int_equal(gguf_get_arr_str(c, "tokenizer.ggml.tokens", 3, &s, &e), FORGE_OK);
    assert_true(str_eq(s, "<0x00>"));
    assert_int_equal(gguf_get_arr_str(c, "tokenizer.ggml.tokens", 258, &s, &e), FORGE_OK);
    assert_true(str_eq(s, "<0xFF>"));
    assert_int_equal(gguf_get_arr_str(c, "tokenizer.ggml.tokens", 512, &s, &e), FORGE_E_RANGE);
    assert_int_equal(gguf_get_arr_str(c, "tokenizer.ggml.scores", 0, &s, &e), FORGE_E_TYPE);

    int32_t tt[512];
    float scores[512];
    assert_int_equal(gguf_copy_arr_i32(c, "tokenizer.ggml.token_type", tt, 512, &e), FORGE_OK);
    assert_int_equal(tt[0], 2);
    assert_int_equal(tt[1], 3);
    assert_int_equal(tt[2], 3);
    for (int i = 3; i <= 258; i++) assert_int_equal(tt[i], 6);
    for (int i = 259; i < 512; i++) assert_int_equal(tt[i], 1);
    assert_int_equal(gguf_copy_arr_i32(c, "tokenizer.ggml.token_type", tt, 511, &e), FORGE_E_RANGE);
    assert_int_equal(gguf_copy_arr_f32(c, "tokenizer.ggml.scores", scores, 512, &e), FORGE_OK);
    for (int i = 259; i < 512; i++) assert_true(scores[i] == -(float)(i - 259));
    assert_int_equal(gguf_copy_arr_f32(c, "tokenizer.ggml.token_type", scores, 512, &e), FORGE_OK);
    assert_true(scores[3] == 6.0f);
    assert_int_equal(gguf_copy_arr_f32(c, "tokenizer.ggml.tokens", scores, 512, &e), FORGE_E_TYPE);
    /* scores are whole numbers (0, -1, ..., -252): they convert to i32 exactly */
    assert_int_equal(gguf_copy_arr_i32(c, "tokenizer.ggml.scores", tt, 512, &e), FORGE_OK);
    assert_int_equal(tt[511], -252);

    gguf_close(c);
    free(path);
}

/* token_embd.weight (and the other weights) are the llama2.c checkpoint's floats, bit for bit. */
static void test_stories_dequant_matches_bin(void **state)
{
    (void)state;
    char *gp = tu_require_shared("testdata/models/stories260K.gguf");
    char *bp = tu_require_shared("testdata/models/stories260K.bin");
    size_t blen = 0;
    char *bin = tu_read_file(bp, &blen);
    assert_non_null(bin);
    assert_int_equal(blen, 1056540);
    gguf_ctx *c = open_ok(gp);
    forge_err e = {0};
    float *buf = malloc(512 * 64 * sizeof *buf);
    assert_non_null(buf);

    const gguf_tensor_info *t = gguf_find_tensor(c, "token_embd.weight");
    assert_int_equal(forge_dequantize(t->type, t->data, buf, t->n_elements, &e), FORGE_OK);
    assert_memory_equal(buf, bin + 28, 512 * 64 * 4);
    t = gguf_find_tensor(c, "output.weight");
    assert_memory_equal(t->data, bin + 28, 512 * 64 * 4);
    /* wq of layer 2: after token_embedding[512*64], rms_att[5*64], wq[2*64*64] */
    t = gguf_find_tensor(c, "blk.2.attn_q.weight");
    assert_memory_equal(t->data, bin + 28 + 4 * (512 * 64 + 5 * 64 + 2 * 64 * 64), 64 * 64 * 4);
    /* rms_final after w3 */
    size_t rms_final = 512 * 64 + 5 * 64 + 5 * 64 * 64 + 2 * 5 * 32 * 64 + 5 * 64 * 64 + 5 * 64 +
                       3 * 5 * 172 * 64;
    t = gguf_find_tensor(c, "output_norm.weight");
    assert_memory_equal(t->data, bin + 28 + 4 * rms_final, 64 * 4);
    free(buf);
    gguf_close(c);
    free(bin);
    free(bp);
    free(gp);
}

/* F16 / Q8_0-mix / Q4_0-mix: tensor types per README, dequantized values close to the F32 file. */
static void test_stories_quantized(void **state)
{
    (void)state;
    static const struct { const char *file; int wtype; uint32_t ftype; double max_nmse; } v[] = {
        {"testdata/models/stories260K-F16.gguf", GGML_TYPE_F16, 1, 1e-6},
        {"testdata/models/stories260K-Q8_0-mix.gguf", GGML_TYPE_Q8_0, 18, 1e-4},
        {"testdata/models/stories260K-Q4_0-mix.gguf", GGML_TYPE_Q4_0, 37, 2e-2},
    };
    char *fp = tu_require_shared("testdata/models/stories260K.gguf");
    gguf_ctx *ref = open_ok(fp);
    float *a = malloc(512 * 172 * sizeof *a), *b = malloc(512 * 172 * sizeof *b);
    assert_non_null(a);
    assert_non_null(b);
    for (size_t k = 0; k < N_ELEMS(v); k++) {
        char *p = tu_require_shared(v[k].file);
        gguf_ctx *c = open_ok(p);
        forge_err e = {0};
        assert_int_equal(gguf_tensor_count(c), 48);
        assert_key_u32(c, "general.file_type", v[k].ftype);
        for (int64_t i = 0; i < gguf_tensor_count(c); i++) {
            const gguf_tensor_info *t = gguf_tensor(c, i);
            const gguf_tensor_info *r = gguf_find_tensor(ref, t->name);
            assert_non_null(r);
            assert_memory_equal(t->ne, r->ne, sizeof t->ne);
            /* norms stay F32; ffn_down rows (172) are no multiple of 32: F16 fallback */
            int want = t->n_dims == 1 ? GGML_TYPE_F32
                       : strstr(t->name, "ffn_down") ? GGML_TYPE_F16 : v[k].wtype;
            if ((int)t->type != want)
                fail_msg("%s %s: type %s want %s", v[k].file, t->name, ggml_type_name(t->type), ggml_type_name(want));
            assert_int_equal(forge_dequantize(t->type, t->data, a, t->n_elements, &e), FORGE_OK);
            assert_int_equal(forge_dequantize(r->type, r->data, b, r->n_elements, &e), FORGE_OK);
            double nmse = tu_nmse(a, b, (size_t)t->n_elements);
            double lim = t->type == GGML_TYPE_F32 ? 0 : t->type == GGML_TYPE_F16 ? 1e-6 : v[k].max_nmse;
            if (nmse > lim) fail_msg("%s %s: nmse %g > %g", v[k].file, t->name, nmse, lim);
        }
        gguf_close(c);
        free(p);
    }
    free(a);
    free(b);
    gguf_close(ref);
    free(fp);
}

/* ---- vocab files ---------------------------------------------------------------------------- */

static void test_vocab_files(void **state)
{
    (void)state;
    static const struct { const char *file, *model, *pre; uint64_t n_tok, n_merges; uint32_t bos, eos; } v[] = {
        {"ggml-vocab-llama-spm.gguf", "llama", "default", 32000, 0, 1, 2},
        {"ggml-vocab-gpt-2.gguf", "gpt2", "gpt-2", 50257, 50000, 50256, 50256},
        {"ggml-vocab-deepseek-coder.gguf", "gpt2", "deepseek-coder", 32256, 31757, 32013, 32014},
        {"ggml-vocab-falcon.gguf", "gpt2", "falcon", 65024, 64784, 11, 11},
        {"ggml-vocab-starcoder.gguf", "gpt2", "starcoder", 49152, 48872, 0, 0},
        {"ggml-vocab-llama-bpe.gguf", "gpt2", "llama-bpe", 128256, 280147, 128000, 128001},
    };
    for (size_t k = 0; k < N_ELEMS(v); k++) {
        char rel[128];
        snprintf(rel, sizeof rel, "testdata/vocab/%s", v[k].file);
        char *p = tu_require_shared(rel);
        gguf_ctx *c = open_ok(p);
        forge_err e = {0};
        gguf_type et;
        uint64_t n;
        assert_int_equal(gguf_version(c), 3);
        assert_int_equal(gguf_tensor_count(c), 0);
        assert_key_str(c, "tokenizer.ggml.model", v[k].model);
        assert_key_str(c, "tokenizer.ggml.pre", v[k].pre);
        assert_key_u32(c, "tokenizer.ggml.bos_token_id", v[k].bos);
        assert_key_u32(c, "tokenizer.ggml.eos_token_id", v[k].eos);
        assert_int_equal(gguf_get_arr(c, "tokenizer.ggml.tokens", &et, &n, &e), FORGE_OK);
        assert_int_equal(et, GGUF_TYPE_STRING);
        assert_int_equal(n, v[k].n_tok);
        if (v[k].n_merges) {
            assert_int_equal(gguf_get_arr(c, "tokenizer.ggml.merges", &et, &n, &e), FORGE_OK);
            assert_int_equal(et, GGUF_TYPE_STRING);
            assert_int_equal(n, v[k].n_merges);
        } else {
            assert_int_equal(gguf_find_key(c, "tokenizer.ggml.merges"), -1);
        }
        /* the walk sees every string of every string array, all inside the file */
        for (int64_t i = 0; i < gguf_kv_count(c); i++) {
            gguf_value val, el;
            uint64_t total = 0;
            assert_int_equal(gguf_kv_value(c, i, &val), FORGE_OK);
            if (val.type != GGUF_TYPE_ARRAY || val.elem_type != GGUF_TYPE_STRING) continue;
            for (uint64_t j = 0; j < val.n; j++) {
                assert_int_equal(gguf_value_elem(c, &val, j, &el), FORGE_OK);
                assert_int_equal(el.type, GGUF_TYPE_STRING);
                total += 8 + el.str.len;
            }
            assert_true(total <= gguf_file_size(c));
            assert_int_equal(gguf_value_elem(c, &val, val.n, &el), FORGE_E_RANGE);
        }
        if (!strcmp(v[k].pre, "llama-bpe")) {
            gguf_str s;
            float fb;
            assert_int_equal(gguf_kv_count(c), 20);
            assert_int_equal(gguf_get_arr_str(c, "tokenizer.ggml.merges", 0, &s, &e), FORGE_OK);
            assert_true(str_eq(s, "\xc4\xa0 \xc4\xa0"));
            assert_int_equal(gguf_get_arr_str(c, "tokenizer.ggml.merges", 1, &s, &e), FORGE_OK);
            assert_true(str_eq(s, "\xc4\xa0 \xc4\xa0\xc4\xa0\xc4\xa0"));
            assert_int_equal(gguf_get_arr_str(c, "tokenizer.ggml.merges", 2, &s, &e), FORGE_OK);
            assert_true(str_eq(s, "\xc4\xa0\xc4\xa0 \xc4\xa0\xc4\xa0"));
            assert_int_equal(gguf_get_arr_str(c, "tokenizer.ggml.tokens", 128000, &s, &e), FORGE_OK);
            assert_true(str_eq(s, "<|begin_of_text|>"));
            assert_int_equal(gguf_get_arr_str(c, "tokenizer.ggml.tokens", 128009, &s, &e), FORGE_OK);
            assert_true(str_eq(s, "<|eot_id|>"));
            assert_int_equal(gguf_get_f32(c, "llama.rope.freq_base", &fb, &e), FORGE_OK);
            assert_true(fb == 500000.0f);
            assert_key_u32(c, "general.file_type", 1);
            assert_key_u32(c, "llama.vocab_size", 128256);
            int32_t *tt = malloc(128256 * sizeof *tt);
            assert_non_null(tt);
            assert_int_equal(gguf_copy_arr_i32(c, "tokenizer.ggml.token_type", tt, 128256, &e), FORGE_OK);
            assert_int_equal(tt[127999], 1);
            assert_int_equal(tt[128000], 3);
            assert_int_equal(tt[128255], 3);
            free(tt);
        }
        gguf_close(c);
        free(p);
    }
}

/* ---- quant/ synth files: every tensor's offset and size agree with the manifest -------------- */

static void test_quant_manifests(void **state)
{
    (void)state;
    static const char *const types[] = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
                                        "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "BF16", "F16"};
    for (size_t k = 0; k < N_ELEMS(types); k++) {
        char rel[128];
        snprintf(rel, sizeof rel, "testdata/quant/synth-%s.json", types[k]);
        char *jp = tu_require_shared(rel);
        snprintf(rel, sizeof rel, "testdata/quant/synth-%s.gguf", types[k]);
        char *gp = tu_require_shared(rel);
        char *js = tu_read_file(jp, NULL);
        cJSON *j = cJSON_Parse(js);
        assert_non_null(j);
        gguf_ctx *c = open_ok(gp);
        assert_int_equal(gguf_file_size(c), (uint64_t)cJSON_GetObjectItem(j, "gguf_size")->valuedouble);
        assert_key_u32(c, "general.file_type", (uint32_t)cJSON_GetObjectItem(j, "general_file_type")->valueint);
        cJSON *ts = cJSON_GetObjectItem(j, "tensors");
        assert_int_equal(gguf_tensor_count(c), cJSON_GetArraySize(ts));
        cJSON *it;
        cJSON_ArrayForEach(it, ts) {
            const char *name = cJSON_GetObjectItem(it, "name")->valuestring;
            const gguf_tensor_info *t = gguf_find_tensor(c, name);
            assert_non_null(t);
            assert_string_equal(ggml_type_name(t->type), cJSON_GetObjectItem(it, "type")->valuestring);
            cJSON *ne = cJSON_GetObjectItem(it, "ne");
            assert_int_equal(t->n_dims, cJSON_GetArraySize(ne));
            for (int d = 0; d < cJSON_GetArraySize(ne); d++)
                assert_int_equal(t->ne[d], cJSON_GetArrayItem(ne, d)->valueint);
            assert_int_equal(t->n_bytes, (uint64_t)cJSON_GetObjectItem(it, "n_bytes")->valuedouble);
            assert_int_equal(gguf_data_offset(c) + t->offset,
                             (uint64_t)cJSON_GetObjectItem(it, "file_offset")->valuedouble);
        }
        /* dequantization of the reference rows, bit for bit, for every type this build supports */
        cJSON *refs = cJSON_GetObjectItem(j, "references");
        cJSON_ArrayForEach(it, refs) {
            const gguf_tensor_info *t = gguf_find_tensor(c, cJSON_GetObjectItem(it, "tensor")->valuestring);
            int64_t n = cJSON_GetObjectItem(it, "n_floats")->valueint;
            snprintf(rel, sizeof rel, "testdata/quant/%s", cJSON_GetObjectItem(it, "file")->valuestring);
            char *rp = tu_require_shared(rel);
            size_t rlen = 0;
            char *ref = tu_read_file(rp, &rlen);
            float *got = malloc((size_t)n * sizeof *got);
            forge_err e = {0};
            assert_non_null(t);
            assert_int_equal(rlen, (size_t)n * 4);
            int rc = forge_dequantize(t->type, t->data, got, n, &e);
            if (rc == FORGE_OK) {
                if (memcmp(got, ref, rlen) != 0) fail_msg("%s: dequantized %s differs from %s", types[k], t->name, rel);
            } else {
                assert_int_equal(rc, FORGE_E_UNSUPPORTED);
            }
            free(got);
            free(ref);
            free(rp);
        }
        gguf_close(c);
        cJSON_Delete(j);
        free(js);
        free(jp);
        free(gp);
    }
}

static void test_hf_ref_models(void **state)
{
    (void)state;
    static const struct { const char *dir, *arch; bool tied; int64_t n_tensors; } v[] = {
        {"llama", "llama", false, 21}, {"qwen2", "qwen2", true, 26}, {"qwen3", "qwen3", false, 25}};
    for (size_t k = 0; k < N_ELEMS(v); k++) {
        char rel[128], key[128];
        snprintf(rel, sizeof rel, "hf-ref/%s/model.gguf", v[k].dir);
        char *p = tu_require_shared(rel);
        gguf_ctx *c = open_ok(p);
        assert_key_str(c, "general.architecture", v[k].arch);
        snprintf(key, sizeof key, "%s.embedding_length", v[k].arch);
        assert_key_u32(c, key, 64);
        snprintf(key, sizeof key, "%s.block_count", v[k].arch);
        assert_key_u32(c, key, 2);
        snprintf(key, sizeof key, "%s.attention.head_count", v[k].arch);
        assert_key_u32(c, key, 4);
        snprintf(key, sizeof key, "%s.attention.head_count_kv", v[k].arch);
        assert_key_u32(c, key, 2);
        snprintf(key, sizeof key, "%s.feed_forward_length", v[k].arch);
        assert_key_u32(c, key, 192);
        assert_int_equal(gguf_tensor_count(c), v[k].n_tensors);
        assert_int_equal(gguf_find_tensor(c, "output.weight") == NULL, v[k].tied);
        const gguf_tensor_info *t = gguf_find_tensor(c, "blk.0.attn_q.weight");
        assert_non_null(t);
        assert_int_equal(t->type, GGML_TYPE_F16);
        if (!strcmp(v[k].arch, "qwen2")) assert_non_null(gguf_find_tensor(c, "blk.1.attn_q.bias"));
        if (!strcmp(v[k].arch, "qwen3")) assert_non_null(gguf_find_tensor(c, "blk.1.attn_k_norm.weight"));
        gguf_close(c);
        free(p);
    }
}

/* ---- a hand-built file with marks, for the walk test and the malformed corpus -------------- */

struct bb {
    uint8_t *p;
    size_t len, cap;
};

static void bb_put(struct bb *b, const void *d, size_t n)
{
    if (b->len + n > b->cap) {
        b->cap = (b->len + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        assert_non_null(b->p);
    }
    memcpy(b->p + b->len, d, n);
    b->len += n;
}
static void bb_u8(struct bb *b, uint8_t v) { bb_put(b, &v, 1); }
static void bb_u32(struct bb *b, uint32_t v) { bb_put(b, &v, 4); }
static void bb_u64(struct bb *b, uint64_t v) { bb_put(b, &v, 8); }
static void bb_str(struct bb *b, const char *s) { bb_u64(b, strlen(s)); bb_put(b, s, strlen(s)); }
static void bb_pad(struct bb *b, size_t a) { while (b->len % a) bb_u8(b, 0); }

/* Byte offsets of the fields the corpus patches. */
struct marks {
    size_t version, n_tensors, n_kv;
    size_t key0_len, key0_type, key_arch;  /* "general.architecture" key bytes */
    size_t key_name;                        /* "general.namexxxxxxxx" key bytes (same length) */
    size_t align_val, tokens_len, nested_type, nested_len;
    size_t t0_name, t0_ndims, t0_ne0, t0_ne1, t0_type, t0_off;
    size_t t1_name, t1_ne0, t1_type, t1_off;
    size_t data;
};

/* A valid little file: 8 KVs of assorted types (including a 2-level nested array), alignment 64,
 * two tensors: "tensor_a" F32 [32,2] and "tensor_b" Q8_0 [64,2]. */
static void build_valid(struct bb *b, struct marks *m, int nest_depth)
{
    memset(b, 0, sizeof *b);
    bb_put(b, "GGUF", 4);
    m->version = b->len; bb_u32(b, 3);
    m->n_tensors = b->len; bb_u64(b, 2);
    m->n_kv = b->len; bb_u64(b, 8);
    m->key0_len = b->len; m->key_arch = b->len + 8;
    bb_str(b, "general.architecture");
    m->key0_type = b->len; bb_u32(b, GGUF_TYPE_STRING); bb_str(b, "llama");
    m->key_name = b->len + 8;
    bb_str(b, "general.namexxxxxxxx"); bb_u32(b, GGUF_TYPE_STRING); bb_str(b, "tiny \"test\"\n");
    bb_str(b, "general.alignment"); bb_u32(b, GGUF_TYPE_UINT32); m->align_val = b->len; bb_u32(b, 64);
    bb_str(b, "test.i8"); bb_u32(b, GGUF_TYPE_INT8); bb_u8(b, 0x80);
    bb_str(b, "test.f64"); bb_u32(b, GGUF_TYPE_FLOAT64); { double d = -2.5; bb_put(b, &d, 8); }
    bb_str(b, "test.bool"); bb_u32(b, GGUF_TYPE_BOOL); bb_u8(b, 1);
    bb_str(b, "tokenizer.ggml.tokens"); bb_u32(b, GGUF_TYPE_ARRAY); bb_u32(b, GGUF_TYPE_STRING);
    m->tokens_len = b->len; bb_u64(b, 3); bb_str(b, "a"); bb_str(b, ""); bb_str(b, "\xe2\x96\x81" "b");
    /* nested: nest_depth levels of arrays; the outer one has 2 elements, inner ones 1, the
     * innermost holds two i16 ({1, 2} under element 0, {-7, 300} under element 1) */
    bb_str(b, "test.nested"); bb_u32(b, GGUF_TYPE_ARRAY);
    m->nested_type = b->len;
    if (nest_depth == 1) {
        bb_u32(b, GGUF_TYPE_INT16); bb_u64(b, 2); bb_u32(b, 0x00020001);
    } else {
        bb_u32(b, GGUF_TYPE_ARRAY); bb_u64(b, 2);
        for (int k = 0; k < 2; k++) {
            for (int d = 2; d < nest_depth; d++) { bb_u32(b, GGUF_TYPE_ARRAY); bb_u64(b, 1); }
            bb_u32(b, GGUF_TYPE_INT16); bb_u64(b, 2);
            int16_t v0 = (int16_t)(k ? -7 : 1), v1 = (int16_t)(k ? 300 : 2);
            bb_put(b, &v0, 2); bb_put(b, &v1, 2);
        }
    }
    m->nested_len = m->nested_type + 4;
    /* tensor infos */
    m->t0_name = b->len + 8; bb_str(b, "tensor_a");
    m->t0_ndims = b->len; bb_u32(b, 2);
    m->t0_ne0 = b->len; bb_u64(b, 32); m->t0_ne1 = b->len; bb_u64(b, 2);
    m->t0_type = b->len; bb_u32(b, GGML_TYPE_F32);
    m->t0_off = b->len; bb_u64(b, 0);
    m->t1_name = b->len + 8; bb_str(b, "tensor_b"); bb_u32(b, 2);
    m->t1_ne0 = b->len; bb_u64(b, 64); bb_u64(b, 2);
    m->t1_type = b->len; bb_u32(b, GGML_TYPE_Q8_0);
    m->t1_off = b->len; bb_u64(b, 256);
    bb_pad(b, 64);
    m->data = b->len;
    for (int i = 0; i < 64; i++) { float f = (float)i * 0.5f; bb_put(b, &f, 4); }
    for (int blk = 0; blk < 4; blk++) {
        uint16_t d = 0x3c00; /* 1.0 */
        bb_put(b, &d, 2);
        for (int j = 0; j < 32; j++) bb_u8(b, (uint8_t)(int8_t)(j - 16 + blk));
    }
    bb_pad(b, 64);
}

static void test_walk_handmade(void **state)
{
    (void)state;
    struct bb b;
    struct marks m;
    build_valid(&b, &m, 2);
    forge_err e = {0};
    gguf_ctx *c = NULL;
    int rc = gguf_open_memory(b.p, b.len, "hand.gguf", &c, &e);
    if (rc) fail_msg("%s", e.msg);
    assert_int_equal(gguf_alignment(c), 64);
    assert_int_equal(gguf_data_offset(c), m.data);
    assert_int_equal(gguf_kv_count(c), 8);
    assert_string_equal(gguf_kv_key(c, 0), "general.architecture");
    assert_null(gguf_kv_key(c, 8));
    assert_int_equal(gguf_kv_type(c, 8), GGUF_TYPE_COUNT);
    assert_int_equal(gguf_kv_type(c, 3), GGUF_TYPE_INT8);

    int32_t i32;
    int64_t i64;
    uint32_t u32;
    double d;
    bool bv;
    assert_int_equal(gguf_get_i32(c, "test.i8", &i32, &e), FORGE_OK);
    assert_int_equal(i32, -128);
    assert_int_equal(gguf_get_i64(c, "test.i8", &i64, &e), FORGE_OK);
    assert_int_equal(i64, -128);
    assert_int_equal(gguf_get_u32(c, "test.i8", &u32, &e), FORGE_E_RANGE);
    assert_non_null(strstr(e.msg, "-128"));
    assert_int_equal(gguf_get_f64(c, "test.f64", &d, &e), FORGE_OK);
    assert_true(d == -2.5);
    assert_int_equal(gguf_get_bool(c, "test.bool", &bv, &e), FORGE_OK);
    assert_true(bv);
    assert_int_equal(gguf_get_i32(c, "test.bool", &i32, &e), FORGE_E_TYPE); /* bool is no integer */

    /* nested array walk */
    int64_t ni = gguf_find_key(c, "test.nested");
    gguf_value v, e1, e2, e3;
    assert_int_equal(gguf_kv_value(c, ni, &v), FORGE_OK);
    assert_int_equal(v.type, GGUF_TYPE_ARRAY);
    assert_int_equal(v.elem_type, GGUF_TYPE_ARRAY);
    assert_int_equal(v.n, 2);
    assert_int_equal(gguf_value_elem(c, &v, 1, &e1), FORGE_OK);
    assert_int_equal(e1.type, GGUF_TYPE_ARRAY);
    assert_int_equal(e1.elem_type, GGUF_TYPE_INT16);
    assert_int_equal(e1.n, 2);
    assert_int_equal(gguf_value_elem(c, &e1, 1, &e2), FORGE_OK);
    int16_t s16;
    memcpy(&s16, e2.raw, 2);
    assert_int_equal(s16, 300);
    assert_int_equal(gguf_value_elem(c, &e1, 2, &e3), FORGE_E_RANGE);
    assert_int_equal(gguf_value_elem(c, &e2, 0, &e3), FORGE_E_INVALID); /* not an array */
    assert_int_equal(gguf_kv_value(c, 99, &v), FORGE_E_INVALID);
    assert_int_equal(gguf_get_arr(c, "test.nested", NULL, NULL, &e), FORGE_OK);
    float f[2];
    assert_int_equal(gguf_copy_arr_f32(c, "test.nested", f, 2, &e), FORGE_E_TYPE);

    /* strings: empty and UTF-8 */
    gguf_str s;
    assert_int_equal(gguf_get_arr_str(c, "tokenizer.ggml.tokens", 1, &s, &e), FORGE_OK);
    assert_int_equal(s.len, 0);
    assert_int_equal(gguf_get_arr_str(c, "tokenizer.ggml.tokens", 2, &s, &e), FORGE_OK);
    assert_true(str_eq(s, "\xe2\x96\x81" "b"));

    /* tensors */
    const gguf_tensor_info *ta = gguf_find_tensor(c, "tensor_a"), *tb = gguf_find_tensor(c, "tensor_b");
    assert_non_null(ta);
    assert_non_null(tb);
    assert_int_equal(tb->n_bytes, 4 * 34);
    assert_ptr_equal(tb->data, b.p + m.data + 256);
    float out[128];
    assert_int_equal(forge_dequantize(tb->type, tb->data, out, tb->n_elements, &e), FORGE_OK);
    assert_true(out[0] == -16.0f && out[127] == 18.0f);
    assert_int_equal(forge_dequantize(GGML_TYPE_Q8_0, tb->data, out, 33, &e), FORGE_E_INVALID);
    assert_int_equal(forge_dequantize(GGML_TYPE_IQ2_XXS, tb->data, out, 256, &e), FORGE_E_UNSUPPORTED);
    assert_non_null(strstr(e.msg, "IQ2_XXS"));
    assert_int_equal(forge_dequantize(4, tb->data, out, 32, &e), FORGE_E_UNSUPPORTED); /* removed id */
    gguf_close(c);

    /* version 2 reads the same */
    uint32_t two = 2;
    memcpy(b.p + m.version, &two, 4);
    assert_int_equal(gguf_open_memory(b.p, b.len, "hand-v2.gguf", &c, &e), FORGE_OK);
    assert_int_equal(gguf_version(c), 2);
    gguf_close(c);
    gguf_close(NULL);
    free(b.p);
}

/* ---- malformed corpus --------------------------------------------------------------------- */

struct bad_case {
    const char *what;
    int code;
    const char *substr; /* besides the file name */
};

/* Open buf as "bad.gguf", expect failure with code and substrings. */
static void expect_fail(const uint8_t *p, size_t n, const struct bad_case *bc)
{
    forge_err e = {0};
    gguf_ctx *c = (gguf_ctx *)(uintptr_t)1;
    int rc = gguf_open_memory(p, n, "bad.gguf", &c, &e);
    if (rc != bc->code)
        fail_msg("%s: got %s (%s), want %s", bc->what, forge_status_name(rc), e.msg, forge_status_name(bc->code));
    assert_null(c);
    if (strncmp(e.msg, "bad.gguf: ", 10) != 0) fail_msg("%s: message does not name the file: %s", bc->what, e.msg);
    if (bc->substr && !strstr(e.msg, bc->substr))
        fail_msg("%s: message '%s' lacks '%s'", bc->what, e.msg, bc->substr);
    if (strchr(e.msg, '\n')) fail_msg("%s: message is not one line: %s", bc->what, e.msg);
}

static void patch32(struct bb *b, size_t off, uint32_t v) { memcpy(b->p + off, &v, 4); }
static void patch64(struct bb *b, size_t off, uint64_t v) { memcpy(b->p + off, &v, 8); }

static void test_malformed_patched(void **state)
{
    (void)state;
    enum { MAGIC, VER1, VER0, VER9, VERBE, NT_HUGE, NKV_HUGE, NKV_MORE, KEYLEN_EOF, KEYLEN_HUGE,
           BADTYPE, ARRLEN_HUGE, ARR_BADTYPE, STRARR_LEN, DUPKEY, DUPNAME, KEYNUL, NAMENUL, T_OFF_OUT,
           T_OVERLAP, T_TYPE_UNK, T_TYPE_4, T_TYPE_31, NDIMS0, NDIMS5, DIM0, DIM_OVF, DIM_NEG,
           ROW_BLOCK, MISALIGN, ALIGN3, ALIGN0, ALIGN_TYPE, N_CASES };
    static const struct bad_case cases[N_CASES] = {
        [MAGIC] = {"bad magic", FORGE_E_FORMAT, "offset 0: bad magic"},
        [VER1] = {"version 1", FORGE_E_UNSUPPORTED, "offset 4: GGUF version 1 is not supported"},
        [VER0] = {"version 0", FORGE_E_UNSUPPORTED, "offset 4:"},
        [VER9] = {"version 9", FORGE_E_UNSUPPORTED, "unsupported GGUF version 9"},
        [VERBE] = {"big-endian", FORGE_E_UNSUPPORTED, "big-endian"},
        [NT_HUGE] = {"absurd tensor count", FORGE_E_FORMAT, "tensor count 1099511627776 cannot fit"},
        [NKV_HUGE] = {"absurd kv count", FORGE_E_FORMAT, "key-value count 18446744073709551615 cannot fit"},
        [NKV_MORE] = {"kv count too high by 3", FORGE_E_FORMAT, "offset "},
        [KEYLEN_EOF] = {"key length past EOF", FORGE_E_FORMAT, "key 0 of 8 length"},
        [KEYLEN_HUGE] = {"huge key length", FORGE_E_FORMAT, "exceeds the"},
        [BADTYPE] = {"bad value type", FORGE_E_FORMAT, "key 'general.architecture': invalid value type 13"},
        [ARRLEN_HUGE] = {"absurd array length", FORGE_E_FORMAT, "key 'tokenizer.ggml.tokens': array of 1152921504606846976 str elements cannot fit"},
        [ARR_BADTYPE] = {"bad array element type", FORGE_E_FORMAT, "key 'test.nested': invalid array element type 99"},
        [STRARR_LEN] = {"string in array past EOF", FORGE_E_FORMAT, "key 'tokenizer.ggml.tokens': string 0 length"},
        [DUPKEY] = {"duplicate key", FORGE_E_FORMAT, "duplicate key 'general.architecture'"},
        [DUPNAME] = {"duplicate tensor", FORGE_E_FORMAT, "duplicate tensor name 'tensor_a'"},
        [KEYNUL] = {"NUL in key", FORGE_E_FORMAT, "contains a NUL byte"},
        [NAMENUL] = {"NUL in tensor name", FORGE_E_FORMAT, "tensor name 'tens\\x00r_a' contains a NUL byte"},
        [T_OFF_OUT] = {"tensor outside file", FORGE_E_FORMAT, "tensor 'tensor_b': data [1048576, +136 bytes) extends past the end"},
        [T_OVERLAP] = {"overlapping tensors", FORGE_E_FORMAT, "overlap"},
        [T_TYPE_UNK] = {"unknown tensor type", FORGE_E_FORMAT, "tensor 'tensor_a': unknown or removed tensor type 40"},
        [T_TYPE_4] = {"removed type 4", FORGE_E_FORMAT, "unknown or removed tensor type 4"},
        [T_TYPE_31] = {"removed type 31", FORGE_E_FORMAT, "unknown or removed tensor type 31"},
        [NDIMS0] = {"n_dims 0", FORGE_E_FORMAT, "tensor 'tensor_a': n_dims 0 is not in 1..4"},
        [NDIMS5] = {"n_dims 5", FORGE_E_FORMAT, "n_dims 5 is not in 1..4"},
        [DIM0] = {"zero dim", FORGE_E_FORMAT, "tensor 'tensor_a': dimension 0 is 0"},
        [DIM_OVF] = {"dims overflow", FORGE_E_FORMAT, "tensor 'tensor_a': element count overflows"},
        [DIM_NEG] = {"dim >= 2^63", FORGE_E_FORMAT, "dimension 1 is 9223372036854775808"},
        [ROW_BLOCK] = {"row not multiple of block", FORGE_E_FORMAT, "tensor 'tensor_b': row length 48 is not a multiple of the Q8_0 block size 32"},
        [MISALIGN] = {"misaligned offset", FORGE_E_FORMAT, "tensor 'tensor_b': data offset 260 is not a multiple of the alignment 64"},
        [ALIGN3] = {"alignment 3", FORGE_E_FORMAT, "key 'general.alignment' is 3, which is not a power of two"},
        [ALIGN0] = {"alignment 0", FORGE_E_FORMAT, "key 'general.alignment' is 0"},
        [ALIGN_TYPE] = {"alignment as i32", FORGE_E_FORMAT, "key 'general.alignment' has type i32, expected u32"},
    };
    for (int k = 0; k < N_CASES; k++) {
        struct bb b;
        struct marks m;
        build_valid(&b, &m, 2);
        switch (k) {
        case MAGIC: b.p[0] = 'X'; break;
        case VER1: patch32(&b, m.version, 1); break;
        case VER0: patch32(&b, m.version, 0); break;
        case VER9: patch32(&b, m.version, 9); break;
        case VERBE: patch32(&b, m.version, 0x03000000); break;
        case NT_HUGE: patch64(&b, m.n_tensors, 1099511627776ull); break;
        case NKV_HUGE: patch64(&b, m.n_kv, UINT64_MAX); break;
        case NKV_MORE: patch64(&b, m.n_kv, 11); break;
        case KEYLEN_EOF: patch64(&b, m.key0_len, b.len); break;
        case KEYLEN_HUGE: patch64(&b, m.key0_len, UINT64_MAX - 3); break;
        case BADTYPE: patch32(&b, m.key0_type, 13); break;
        case ARRLEN_HUGE: patch64(&b, m.tokens_len, 1ull << 60); break;
        case ARR_BADTYPE: patch32(&b, m.nested_type, 99); break;
        case STRARR_LEN: patch64(&b, m.tokens_len + 8, 1u << 30); break;
        case DUPKEY: memcpy(b.p + m.key_name, "general.architecture", 20); break;
        case DUPNAME: memcpy(b.p + m.t1_name, "tensor_a", 8); break;
        case KEYNUL: b.p[m.key_arch + 3] = 0; break;
        case NAMENUL: b.p[m.t0_name + 4] = 0; break;
        case T_OFF_OUT: patch64(&b, m.t1_off, 1 << 20); break;
        case T_OVERLAP: patch64(&b, m.t1_off, 0); break;
        case T_TYPE_UNK: patch32(&b, m.t0_type, 40); break;
        case T_TYPE_4: patch32(&b, m.t0_type, 4); break;
        case T_TYPE_31: patch32(&b, m.t0_type, 31); break;
        case NDIMS0: patch32(&b, m.t0_ndims, 0); break;
        case NDIMS5: patch32(&b, m.t0_ndims, 5); break;
        case DIM0: patch64(&b, m.t0_ne0, 0); break;
        case DIM_OVF: patch64(&b, m.t0_ne0, 1ull << 62); patch64(&b, m.t0_ne1, 4); break;
        case DIM_NEG: patch64(&b, m.t0_ne1, 1ull << 63); break;
        case ROW_BLOCK: patch64(&b, m.t1_ne0, 48); break;
        case MISALIGN: patch64(&b, m.t1_off, 260); break;
        case ALIGN3: patch32(&b, m.align_val, 3); break;
        case ALIGN0: patch32(&b, m.align_val, 0); break;
        case ALIGN_TYPE: patch32(&b, m.align_val - 4, GGUF_TYPE_INT32); break;
        }
        expect_fail(b.p, b.len, &cases[k]);
        free(b.p);
    }
}

static void test_malformed_nesting(void **state)
{
    (void)state;
    struct bb b;
    struct marks m;
    /* 8 levels of arrays are fine (top level + 7 nested), 9 are not */
    build_valid(&b, &m, 8);
    forge_err e = {0};
    gguf_ctx *c = NULL;
    assert_int_equal(gguf_open_memory(b.p, b.len, "deep8.gguf", &c, &e), FORGE_OK);
    gguf_close(c);
    free(b.p);
    build_valid(&b, &m, 9);
    struct bad_case bc = {"9-level nesting", FORGE_E_FORMAT, "key 'test.nested': arrays nested deeper than 8 levels"};
    expect_fail(b.p, b.len, &bc);
    free(b.p);
    build_valid(&b, &m, 300);
    expect_fail(b.p, b.len, &bc);
    free(b.p);
}

/* Cut the hand-made file at every byte: must fail (cleanly) until the last tensor's data ends. */
static void test_truncation_every_byte(void **state)
{
    (void)state;
    struct bb b;
    struct marks m;
    build_valid(&b, &m, 2);
    size_t data_end = m.data + 256 + 4 * 34;
    for (size_t cut = 0; cut < b.len; cut++) {
        uint8_t *copy = malloc(cut ? cut : 1); /* exact-size copy so ASan catches over-reads */
        memcpy(copy, b.p, cut);
        forge_err e = {0};
        gguf_ctx *c = NULL;
        int rc = gguf_open_memory(copy, cut, "cut.gguf", &c, &e);
        if (cut < data_end) {
            if (rc != FORGE_E_FORMAT) fail_msg("cut at %zu: got %s (%s)", cut, forge_status_name(rc), e.msg);
            if (strncmp(e.msg, "cut.gguf: offset ", 17) != 0) fail_msg("cut at %zu: message %s", cut, e.msg);
        } else {
            if (rc != FORGE_OK) fail_msg("cut at %zu (after the data): %s", cut, e.msg);
            gguf_close(c);
        }
        free(copy);
    }
    free(b.p);
}

/* stories260K.gguf cut at every byte of its metadata, at every tensor boundary, at random points. */
static void test_truncation_stories(void **state)
{
    (void)state;
    char *p = tu_require_shared("testdata/models/stories260K.gguf");
    size_t len = 0;
    uint8_t *buf = (uint8_t *)tu_read_file(p, &len);
    assert_non_null(buf);
    gguf_ctx *full = open_ok(p);
    uint64_t data_off = gguf_data_offset(full), data_end = 0;
    size_t n_cuts = 0;
    size_t *cuts = malloc((data_off + 1 + 3 * 48 + 300) * sizeof *cuts);
    for (size_t i = 0; i <= data_off; i++) cuts[n_cuts++] = i;
    for (int64_t i = 0; i < gguf_tensor_count(full); i++) {
        const gguf_tensor_info *t = gguf_tensor(full, i);
        uint64_t end = data_off + t->offset + t->n_bytes;
        if (end > data_end) data_end = end;
        cuts[n_cuts++] = data_off + t->offset + 1;
        cuts[n_cuts++] = end - 1;
        cuts[n_cuts++] = end;
    }
    uint64_t rs = 12345;
    for (int i = 0; i < 300; i++) cuts[n_cuts++] = (size_t)(tu_rand_u64(&rs) % len);
    gguf_close(full);
    for (size_t k = 0; k < n_cuts; k++) {
        size_t cut = cuts[k];
        forge_err e = {0};
        gguf_ctx *c = NULL;
        uint8_t *copy = malloc(cut ? cut : 1); /* exact size, so ASan sees any over-read */
        memcpy(copy, buf, cut);
        int rc = gguf_open_memory(copy, cut, "stories-cut.gguf", &c, &e);
        if (cut < data_end) {
            if (rc != FORGE_E_FORMAT) fail_msg("cut at %zu: got %s (%s)", cut, forge_status_name(rc), e.msg);
            if (strncmp(e.msg, "stories-cut.gguf: offset ", 25) != 0) fail_msg("cut at %zu: %s", cut, e.msg);
        } else {
            assert_int_equal(rc, FORGE_OK);
            gguf_close(c);
        }
        free(copy);
    }
    free(cuts);
    free(buf);
    free(p);
}

/* Random byte flips in the metadata of stories260K: never a crash (ASan/UBSan), and any failure
 * has a proper message. */
static void test_random_corruption(void **state)
{
    (void)state;
    char *p = tu_require_shared("testdata/models/stories260K.gguf");
    size_t len = 0;
    uint8_t *buf = (uint8_t *)tu_read_file(p, &len);
    uint8_t *work = malloc(len);
    uint64_t rs = 777;
    int n_fail = 0;
    for (int it = 0; it < 400; it++) {
        memcpy(work, buf, len);
        int flips = 1 + (int)(tu_rand_u64(&rs) % 4);
        for (int f = 0; f < flips; f++) work[tu_rand_u64(&rs) % 14176] ^= (uint8_t)(1u << (tu_rand_u64(&rs) % 8));
        forge_err e = {0};
        gguf_ctx *c = NULL;
        int rc = gguf_open_memory(work, len, "flip.gguf", &c, &e);
        if (rc) {
            n_fail++;
            assert_null(c);
            assert_true(strncmp(e.msg, "flip.gguf: ", 11) == 0);
        } else {
            gguf_close(c);
        }
    }
    print_message("random corruption: %d of 400 variants rejected\n", n_fail);
    assert_true(n_fail > 0);
    free(work);
    free(buf);
    free(p);
}

static void test_open_errors(void **state)
{
    (void)state;
    forge_err e = {0};
    gguf_ctx *c = NULL;
    assert_int_equal(gguf_open("/nonexistent/x.gguf", &c, &e), FORGE_E_IO);
    assert_null(c);
    assert_non_null(strstr(e.msg, "/nonexistent/x.gguf: cannot open"));
    assert_int_equal(gguf_open("/tmp", &c, &e), FORGE_E_IO);
    char *dir = tu_mkdtemp();
    char path[512];
    snprintf(path, sizeof path, "%s/small.gguf", dir);
    FILE *f = fopen(path, "wb");
    fwrite("GGUF\3\0\0\0", 1, 8, f);
    fclose(f);
    assert_int_equal(gguf_open(path, &c, &e), FORGE_E_FORMAT);
    assert_non_null(strstr(e.msg, "small.gguf: offset 0: not a GGUF file"));
    assert_int_equal(gguf_open_memory(NULL, 0, "empty", &c, &e), FORGE_E_FORMAT);
    assert_non_null(strstr(e.msg, "empty: offset 0"));
    tu_rmtree(dir);
    free(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_type_traits),
        cmocka_unit_test(test_stories_f32),
        cmocka_unit_test(test_stories_dequant_matches_bin),
        cmocka_unit_test(test_stories_quantized),
        cmocka_unit_test(test_vocab_files),
        cmocka_unit_test(test_quant_manifests),
        cmocka_unit_test(test_hf_ref_models),
        cmocka_unit_test(test_walk_handmade),
        cmocka_unit_test(test_malformed_patched),
        cmocka_unit_test(test_malformed_nesting),
        cmocka_unit_test(test_truncation_every_byte),
        cmocka_unit_test(test_truncation_stories),
        cmocka_unit_test(test_random_corruption),
        cmocka_unit_test(test_open_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
