/* test_engine.c - the inference engine against llama.cpp's and Hugging Face's references:
 * greedy generations of the stories260K files (F32/F16/Q8_0-mix exactly, Q4_0-mix and the F16
 * KV cache up to the first near-tie of the reference), next-token logprobs, the hf-ref
 * llama/qwen2/qwen3 logits (NMSE) and greedy ids, and the context API (batch vs token-by-token,
 * KV truncation). Prompts and expected ids are read from the reference files. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "forge.h"
#include "testutil.h"

#define MODELS "testdata/models/"
#define REFS "testdata/reference/"

static cJSON *load_json(const char *path)
{
    char *txt = tu_read_file(path, NULL);
    assert_non_null(txt);
    cJSON *j = cJSON_Parse(txt);
    free(txt);
    assert_non_null(j);
    return j;
}

static int32_t *json_ids(const cJSON *arr, int *n)
{
    *n = cJSON_GetArraySize(arr);
    int32_t *ids = malloc((size_t)(*n > 0 ? *n : 1) * sizeof *ids);
    assert_non_null(ids);
    for (int i = 0; i < *n; i++)
        ids[i] = (int32_t)cJSON_GetArrayItem(arr, i)->valueint;
    return ids;
}

static forge_context *make_ctx(forge_model *m, forge_kv_type kv, bool f32_math)
{
    forge_err err = {0};
    forge_context_params cp = forge_context_default_params();
    cp.n_threads = 2;
    cp.kv_type = kv;
    cp.f32_math = f32_math;
    forge_context *ctx = NULL;
    if (forge_context_create(m, &cp, &ctx, &err)) fail_msg("context: %s", err.msg);
    return ctx;
}

static forge_model *load_model(const char *path)
{
    forge_err err = {0};
    forge_model *m = NULL;
    if (forge_model_load(path, &m, &err)) fail_msg("load %s: %s", path, err.msg);
    return m;
}

static double logsumexp(const float *l, int n)
{
    float mx = l[0];
    for (int i = 1; i < n; i++)
        if (l[i] > mx) mx = l[i];
    double s = 0;
    for (int i = 0; i < n; i++)
        s += exp((double)l[i] - mx);
    return mx + log(s);
}

/* Greedy-generate against one reference file. exact: every id must match; otherwise ids must
 * match up to the first step whose reference top-2 logprob gap is < 0.05. lp_tol > 0: also the
 * logprobs of the reference's top-10 at every matched step. Returns steps compared. */
static int check_greedy(const char *model_rel, const char *ref_rel, forge_kv_type kv, bool exact,
                        double lp_tol)
{
    char *mpath = tu_require_shared(model_rel);
    char *rpath = tu_require_shared(ref_rel);
    forge_err err = {0};
    forge_model *m = load_model(mpath);
    forge_context *ctx = make_ctx(m, kv, false);
    forge_sampler_params sp = forge_sampler_default_params();
    sp.temperature = 0;
    forge_sampler *s = NULL;
    assert_int_equal(forge_sampler_create(&sp, forge_model_info_get(m)->n_vocab, &s, &err), 0);
    const int V = forge_model_info_get(m)->n_vocab;
    cJSON *j = load_json(rpath);
    cJSON *results = cJSON_GetObjectItem(j, "results");
    int compared = 0, n_results = cJSON_GetArraySize(results);
    assert_true(n_results > 0);
    for (int r = 0; r < n_results; r++) {
        cJSON *res = cJSON_GetArrayItem(results, r);
        const char *prompt = cJSON_GetObjectItem(res, "prompt")->valuestring;
        int n_prompt, n_gen;
        int32_t *prompt_ids = json_ids(cJSON_GetObjectItem(res, "prompt_token_ids"), &n_prompt);
        int32_t *gen = json_ids(cJSON_GetObjectItem(res, "generated_token_ids"), &n_gen);
        cJSON *steps = cJSON_GetObjectItem(res, "steps");
        /* the prompt's ids from our tokenizer must be the reference's */
        int32_t *tok_ids = NULL;
        size_t n_tok = 0;
        assert_int_equal(forge_tok_encode(forge_model_tok(m), prompt, strlen(prompt), true, false,
                                          &tok_ids, &n_tok, &err),
                         0);
        assert_int_equal((int)n_tok, n_prompt);
        assert_memory_equal(tok_ids, prompt_ids, n_tok * sizeof *tok_ids);
        free(tok_ids);

        assert_int_equal(forge_kv_truncate(ctx, 0, &err), 0);
        forge_sampler_reset(s);
        if (forge_decode(ctx, prompt_ids, n_prompt, false, &err)) fail_msg("decode: %s", err.msg);
        for (int i = 0; i < n_gen; i++) {
            cJSON *top = cJSON_GetObjectItem(cJSON_GetArrayItem(steps, i), "top10");
            double gap = cJSON_GetArrayItem(cJSON_GetArrayItem(top, 0), 1)->valuedouble -
                         cJSON_GetArrayItem(cJSON_GetArrayItem(top, 1), 1)->valuedouble;
            if (!exact && gap < 0.05) break;
            const float *logits = forge_get_logits(ctx, -1);
            int32_t id = forge_sampler_sample(s, logits);
            if (id != gen[i])
                fail_msg("%s '%s' step %d: got %d, reference %d (reference gap %.4f)", model_rel,
                         prompt, i, id, gen[i], gap);
            if (lp_tol > 0) {
                double lse = logsumexp(logits, V);
                for (int k = 0; k < cJSON_GetArraySize(top); k++) {
                    cJSON *e = cJSON_GetArrayItem(top, k);
                    int tid = cJSON_GetArrayItem(e, 0)->valueint;
                    double d = fabs((logits[tid] - lse) - cJSON_GetArrayItem(e, 1)->valuedouble);
                    if (d > lp_tol)
                        fail_msg("%s '%s' step %d: logprob of %d off by %g", model_rel, prompt, i,
                                 tid, d);
                }
            }
            forge_sampler_accept(s, id);
            compared++;
            if (i + 1 < n_gen && forge_decode(ctx, &id, 1, false, &err))
                fail_msg("decode: %s", err.msg);
        }
        free(prompt_ids);
        free(gen);
    }
    cJSON_Delete(j);
    forge_sampler_free(s);
    forge_context_free(ctx);
    forge_model_free(m);
    free(mpath);
    free(rpath);
    return compared;
}

static void test_greedy_f32(void **state)
{
    (void)state;
    assert_int_equal(check_greedy(MODELS "stories260K.gguf",
                                  REFS "greedy_stories260K-F32_kvf32.json", FORGE_KV_F32, true,
                                  1e-4),
                     3 * 64);
}

static void test_greedy_f16(void **state)
{
    (void)state;
    assert_int_equal(check_greedy(MODELS "stories260K-F16.gguf",
                                  REFS "greedy_stories260K-F16_kvf32.json", FORGE_KV_F32, true,
                                  0.05),
                     3 * 64);
}

static void test_greedy_q8_0(void **state)
{
    (void)state;
    assert_int_equal(check_greedy(MODELS "stories260K-Q8_0-mix.gguf",
                                  REFS "greedy_stories260K-Q8_0-mix_kvf32.json", FORGE_KV_F32, true,
                                  0.5),
                     3 * 64);
}

static void test_greedy_q4_0(void **state)
{
    (void)state;
    int n = check_greedy(MODELS "stories260K-Q4_0-mix.gguf",
                         REFS "greedy_stories260K-Q4_0-mix_kvf32.json", FORGE_KV_F32, false, 0);
    print_message("Q4_0-mix: %d steps compared before the first reference near-tie\n", n);
    assert_true(n > 0);
}

static void test_greedy_kv_f16(void **state)
{
    (void)state;
    static const char *pairs[][2] = {
        {MODELS "stories260K.gguf", REFS "greedy_stories260K-F32_kvf16.json"},
        {MODELS "stories260K-F16.gguf", REFS "greedy_stories260K-F16_kvf16.json"},
        {MODELS "stories260K-Q8_0-mix.gguf", REFS "greedy_stories260K-Q8_0-mix_kvf16.json"},
        {MODELS "stories260K-Q4_0-mix.gguf", REFS "greedy_stories260K-Q4_0-mix_kvf16.json"},
    };
    for (size_t i = 0; i < sizeof pairs / sizeof pairs[0]; i++) {
        int n = check_greedy(pairs[i][0], pairs[i][1], FORGE_KV_F16, false, 0);
        print_message("%s KV f16: %d steps compared\n", pairs[i][0], n);
        assert_true(n > 0);
    }
}

/* The next-token distribution after "Once upon a time" (F32 model, F32 KV). */
static void test_next_token_logprobs(void **state)
{
    (void)state;
    char *mpath = tu_require_shared(MODELS "stories260K.gguf");
    char *rpath = tu_require_shared(REFS "once_upon_a_time_next_token.json");
    forge_err err = {0};
    forge_model *m = load_model(mpath);
    forge_context *ctx = make_ctx(m, FORGE_KV_F32, false);
    cJSON *j = load_json(rpath);
    int n;
    int32_t *ids = json_ids(cJSON_GetObjectItem(j, "prompt_token_ids"), &n);
    assert_int_equal(forge_decode(ctx, ids, n, false, &err), 0);
    const float *l = forge_get_logits(ctx, -1);
    double lse = logsumexp(l, 512);
    cJSON *top = cJSON_GetObjectItem(j, "llamacpp_top10_logprobs_kv_f32");
    for (int k = 0; k < cJSON_GetArraySize(top); k++) {
        cJSON *e = cJSON_GetArrayItem(top, k);
        double got = l[cJSON_GetArrayItem(e, 0)->valueint] - lse;
        assert_float_equal(got, cJSON_GetArrayItem(e, 1)->valuedouble, 1e-4);
    }
    cJSON *raw = cJSON_GetObjectItem(j, "llamacpp_raw_logits_partial");
    cJSON *rid = cJSON_GetObjectItem(raw, "ids"), *rl = cJSON_GetObjectItem(raw, "logits");
    for (int k = 0; k < cJSON_GetArraySize(rid); k++) /* printed to 4 decimals */
        assert_float_equal(l[cJSON_GetArrayItem(rid, k)->valueint],
                           cJSON_GetArrayItem(rl, k)->valuedouble, 1.5e-4);
    free(ids);
    cJSON_Delete(j);
    forge_context_free(ctx);
    forge_model_free(m);
    free(mpath);
    free(rpath);
}

/* NMSE of the logits at the reference positions; argmax must agree where the reference's top-2
 * gap is > 1e-3. */
static double hf_nmse(forge_context *ctx, const float *ref, const cJSON *pos, int V)
{
    double num = 0, den = 0;
    for (int k = 0; k < cJSON_GetArraySize(pos); k++) {
        const float *r = ref + (size_t)k * V;
        const float *g = forge_get_logits(ctx, cJSON_GetArrayItem(pos, k)->valueint);
        assert_non_null(g);
        int am_g = 0, am_r = 0, second = -1;
        for (int i = 0; i < V; i++) {
            num += ((double)g[i] - r[i]) * ((double)g[i] - r[i]);
            den += (double)r[i] * r[i];
            if (g[i] > g[am_g]) am_g = i;
            if (r[i] > r[am_r]) am_r = i;
        }
        for (int i = 0; i < V; i++)
            if (i != am_r && (second < 0 || r[i] > r[second])) second = i;
        if (r[am_r] - r[second] > 1e-3) assert_int_equal(am_g, am_r);
    }
    return num / den;
}

/* hf-ref: logits of every reference position and greedy ids with F32 math; the default
 * (ggml-like mixed precision) path within llama.cpp's own distance from the reference. */
static void check_hf(const char *arch)
{
    char rel[128];
    snprintf(rel, sizeof rel, "hf-ref/%s/model.gguf", arch);
    char *mpath = tu_require_shared(rel);
    snprintf(rel, sizeof rel, "hf-ref/%s/ref_tokens.json", arch);
    char *tpath = tu_require_shared(rel);
    snprintf(rel, sizeof rel, "hf-ref/%s/ref_logits.f32", arch);
    char *lpath = tu_require_shared(rel);
    forge_err err = {0};
    forge_model *m = load_model(mpath);
    forge_context *ctx = make_ctx(m, FORGE_KV_F32, true);
    forge_context *ctx_mixed = make_ctx(m, FORGE_KV_F32, false);
    cJSON *j = load_json(tpath);
    int n, n_greedy;
    int32_t *ids = json_ids(cJSON_GetObjectItem(j, "input_ids"), &n);
    int32_t *greedy = json_ids(cJSON_GetObjectItem(j, "greedy_ids"), &n_greedy);
    const int V = cJSON_GetObjectItem(j, "n_vocab")->valueint;
    assert_int_equal(V, forge_model_info_get(m)->n_vocab);
    size_t ref_len;
    float *ref = (float *)tu_read_file(lpath, &ref_len);
    assert_non_null(ref);
    cJSON *pos = cJSON_GetObjectItem(j, "ref_logits_positions");
    assert_int_equal(ref_len, (size_t)cJSON_GetArraySize(pos) * V * sizeof(float));

    assert_int_equal(forge_decode(ctx, ids, n, true, &err), 0);
    double nmse = hf_nmse(ctx, ref, pos, V);
    assert_int_equal(forge_decode(ctx_mixed, ids, n, true, &err), 0);
    double nmse_mixed = hf_nmse(ctx_mixed, ref, pos, V);
    print_message("%s: NMSE %.3g (F32 math), %.3g (mixed precision) over %d positions\n", arch,
                  nmse, nmse_mixed, cJSON_GetArraySize(pos));
    assert_true(nmse <= 1e-6);
    assert_true(nmse_mixed <= 5e-6);

    /* greedy continuation, token by token */
    const float *l = forge_get_logits(ctx, -1);
    for (int i = 0; i < n_greedy; i++) {
        int32_t id = 0;
        for (int v = 1; v < V; v++)
            if (l[v] > l[id]) id = v;
        assert_int_equal(id, greedy[i]);
        assert_int_equal(forge_decode(ctx, &id, 1, false, &err), 0);
        l = forge_get_logits(ctx, -1);
    }
    free(ref);
    free(ids);
    free(greedy);
    cJSON_Delete(j);
    forge_context_free(ctx_mixed);
    forge_context_free(ctx);
    forge_model_free(m);
    free(mpath);
    free(tpath);
    free(lpath);
}

static void test_hf_llama(void **state)
{
    (void)state;
    check_hf("llama");
}

static void test_hf_qwen2(void **state)
{
    (void)state;
    check_hf("qwen2");
}

static void test_hf_qwen3(void **state)
{
    (void)state;
    check_hf("qwen3");
}

/* One batch vs one token at a time give the same logits; truncating the cache and decoding again
 * reproduces them (what a chat front end relies on). */
static void test_batch_truncate(void **state)
{
    (void)state;
    char *mpath = tu_require_shared(MODELS "stories260K.gguf");
    forge_err err = {0};
    forge_model *m = load_model(mpath);
    forge_context *ctx = make_ctx(m, FORGE_KV_F32, false);
    const int32_t ids[] = {1, 403, 407, 261, 378, 432, 383, 286};
    const int n = 8, V = forge_model_info_get(m)->n_vocab;
    float *all = malloc((size_t)n * V * sizeof(float));
    assert_int_equal(forge_decode(ctx, ids, n, true, &err), 0);
    assert_int_equal(forge_n_logits(ctx), n);
    memcpy(all, forge_get_logits(ctx, 0), (size_t)n * V * sizeof(float));
    assert_int_equal(forge_context_pos(ctx), n);

    assert_int_equal(forge_kv_truncate(ctx, 0, &err), 0);
    for (int t = 0; t < n; t++) {
        assert_int_equal(forge_decode(ctx, &ids[t], 1, false, &err), 0);
        assert_true(tu_nmse(forge_get_logits(ctx, -1), all + (size_t)t * V, (size_t)V) < 1e-10);
    }
    /* back to 5 tokens, then the last three again */
    assert_int_equal(forge_kv_truncate(ctx, 5, &err), 0);
    assert_null(forge_get_logits(ctx, -1));
    assert_int_equal(forge_decode(ctx, ids + 5, 3, false, &err), 0);
    assert_int_equal(forge_n_logits(ctx), 1);
    assert_true(tu_nmse(forge_get_logits(ctx, -1), all + (size_t)7 * V, (size_t)V) < 1e-10);
    /* a batch split in several forward passes (n_batch 3) gives the same logits */
    forge_context_params cp = forge_context_default_params();
    cp.n_threads = 1;
    cp.n_batch = 3;
    forge_context *c2 = NULL;
    assert_int_equal(forge_context_create(m, &cp, &c2, &err), 0);
    assert_int_equal(forge_decode(c2, ids, n, true, &err), 0);
    for (int t = 0; t < n; t++)
        assert_true(tu_nmse(forge_get_logits(c2, t), all + (size_t)t * V, (size_t)V) < 1e-10);
    assert_int_equal(forge_kv_truncate(c2, 0, &err), 0);
    assert_int_equal(forge_decode(c2, ids, n, false, &err),
                     0); /* chunks of 3, 3, 2: last logits only */
    assert_int_equal(forge_n_logits(c2), 1);
    assert_true(tu_nmse(forge_get_logits(c2, -1), all + (size_t)7 * V, (size_t)V) < 1e-10);
    /* errors leave the position alone */
    assert_int_equal(forge_kv_truncate(ctx, 9, &err), FORGE_E_RANGE);
    const int32_t bad = 512;
    assert_int_equal(forge_decode(ctx, &bad, 1, false, &err), FORGE_E_RANGE);
    assert_non_null(strstr(err.msg, "512"));
    assert_int_equal(forge_context_pos(ctx), 8);
    /* the abort flag stops a decode and leaves the position */
    volatile sig_atomic_t stop = 1;
    forge_context_set_abort_flag(ctx, &stop);
    assert_int_equal(forge_kv_truncate(ctx, 0, &err), 0);
    assert_int_equal(forge_decode(ctx, ids, n, false, &err), FORGE_E_INTERRUPTED);
    assert_int_equal(forge_context_pos(ctx), 0);
    stop = 0;
    assert_int_equal(forge_decode(ctx, ids, n, false, &err), 0);
    assert_true(tu_nmse(forge_get_logits(ctx, -1), all + (size_t)7 * V, (size_t)V) < 1e-10);
    forge_context_set_abort_flag(ctx, NULL);
    forge_context_free(c2);
    free(all);
    forge_context_free(ctx);
    forge_model_free(m);
    free(mpath);
}

/* Context full: a decode that would pass n_ctx fails with FORGE_E_RANGE and runs nothing. */
static void test_context_full(void **state)
{
    (void)state;
    char *mpath = tu_require_shared(MODELS "stories260K.gguf");
    forge_err err = {0};
    forge_model *m = load_model(mpath);
    assert_int_equal(forge_model_info_get(m)->n_ctx_train, 128);
    forge_context_params cp = forge_context_default_params();
    cp.n_ctx = 4;
    cp.n_threads = 1;
    forge_context *ctx = NULL;
    assert_int_equal(forge_context_create(m, &cp, &ctx, &err), 0);
    assert_int_equal(forge_context_n_ctx(ctx), 4);
    const int32_t ids[] = {1, 403, 407, 261, 378};
    assert_int_equal(forge_decode(ctx, ids, 5, false, &err), FORGE_E_RANGE);
    assert_non_null(strstr(err.msg, "context"));
    assert_int_equal(forge_context_pos(ctx), 0);
    assert_int_equal(forge_decode(ctx, ids, 4, false, &err), 0);
    assert_int_equal(forge_decode(ctx, ids, 1, false, &err), FORGE_E_RANGE);
    assert_int_equal(forge_context_pos(ctx), 4);
    forge_context_free(ctx);
    forge_model_free(m);
    free(mpath);
}

/* The weight-preparation progress callback: called, in order, ending at done == total, and the
 * total is the bytes of the model's tensors (stories260K: every tensor is a weight). */
struct progress_log {
    int calls;
    uint64_t last_done, total;
    bool monotonic, same_total;
};

static void on_progress(uint64_t done, uint64_t total, void *user)
{
    struct progress_log *l = user;
    if (l->calls == 0) l->total = total;
    l->monotonic = l->monotonic && done > l->last_done && done <= total;
    l->same_total = l->same_total && total == l->total;
    l->last_done = done;
    l->calls++;
}

static void test_progress(void **state)
{
    (void)state;
    char *mpath = tu_require_shared(MODELS "stories260K.gguf");
    forge_err err = {0};
    forge_model *m = load_model(mpath);
    forge_context_params cp = forge_context_default_params();
    struct progress_log log = {0, 0, 0, true, true};
    cp.n_ctx = 16;
    cp.n_threads = 1;
    cp.progress = on_progress;
    cp.progress_user = &log;
    forge_context *ctx = NULL;
    assert_int_equal(forge_context_create(m, &cp, &ctx, &err), 0);
    /* 5 layers x 9 tensors + tok_embd + output_norm (+ output unless tied to tok_embd) */
    assert_int_equal(log.calls, 5 * 9 + 2 + (forge_model_info_get(m)->tied_output ? 0 : 1));
    assert_true(log.monotonic);
    assert_true(log.same_total);
    assert_true(log.total > 0);
    assert_true(log.last_done == log.total);
    assert_true(log.total <= forge_model_info_get(m)->weight_bytes);
    forge_context_free(ctx);
    forge_model_free(m);
    free(mpath);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy_f32),    cmocka_unit_test(test_greedy_f16),
        cmocka_unit_test(test_greedy_q8_0),   cmocka_unit_test(test_greedy_q4_0),
        cmocka_unit_test(test_greedy_kv_f16), cmocka_unit_test(test_next_token_logprobs),
        cmocka_unit_test(test_hf_llama),      cmocka_unit_test(test_hf_qwen2),
        cmocka_unit_test(test_hf_qwen3),      cmocka_unit_test(test_batch_truncate),
        cmocka_unit_test(test_context_full),  cmocka_unit_test(test_progress),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
