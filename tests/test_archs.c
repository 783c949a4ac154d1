/* test_archs.c - every architecture with a reference under tests/data/arch/<shape>/ (ref.json +
 * ref_logits.f32, see tests/data/arch/README.md): the model is made again with `forge synth`'s
 * generator (deterministic: shape, type, seed), run by Forge on the CPU, and compared with the
 * reference implementation's logits of every prompt position (NMSE) and greedy ids; then the
 * same prompt through the engine, alone and among other prompts (batch invariance), must give
 * the same ids as the context. */
#define _GNU_SOURCE /* memmem */
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cJSON.h>

#include "forge.h"
#include "forge_engine.h"
#include "forge_model.h"
#include "forge_synth.h"
#include "testutil.h"

#define ARCH_DATA "tests/data/arch"
#define N_OTHERS 3

static cJSON *load_json(const char *path)
{
    size_t len;
    char *text = tu_read_file(path, &len);
    assert_non_null(text);
    cJSON *j = cJSON_Parse(text);
    free(text);
    assert_non_null(j);
    return j;
}

static int32_t *json_ids(const cJSON *a, int *n)
{
    assert_true(cJSON_IsArray(a));
    *n = cJSON_GetArraySize(a);
    int32_t *ids = calloc((size_t)(*n > 0 ? *n : 1), sizeof *ids);
    assert_non_null(ids);
    for (int i = 0; i < *n; i++)
        ids[i] = cJSON_GetArrayItem(a, i)->valueint;
    return ids;
}

static forge_context *make_ctx(forge_model *m, bool f32_math)
{
    forge_context_params cp = forge_context_default_params();
    cp.device = FORGE_DEVICE_CPU;
    cp.n_threads = 2;
    cp.n_ctx = 128;
    cp.kv_type = FORGE_KV_F32;
    cp.f32_math = f32_math;
    forge_context *ctx = NULL;
    forge_err err = {0};
    int rc = forge_context_create(m, &cp, &ctx, &err);
    if (rc) print_message("context: %s\n", err.msg);
    assert_int_equal(rc, 0);
    return ctx;
}

/* the greedy continuation of ids on ctx (fresh), n tokens; gaps[i] = top-1 minus top-2 logit */
static void greedy(forge_context *ctx, const int32_t *ids, int n_ids, int n, int32_t *out,
                   float *gaps, int V)
{
    forge_err err = {0};
    assert_int_equal(forge_decode(ctx, ids, n_ids, false, &err), 0);
    for (int i = 0; i < n; i++) {
        const float *l = forge_get_logits(ctx, -1);
        int32_t best = 0, second = -1;
        for (int v = 1; v < V; v++)
            if (l[v] > l[best]) best = v;
        for (int v = 0; v < V; v++)
            if (v != best && (second < 0 || l[v] > l[second])) second = v;
        out[i] = best;
        gaps[i] = l[best] - l[second];
        if (i + 1 < n) assert_int_equal(forge_decode(ctx, &best, 1, false, &err), 0);
    }
}

typedef struct collect {
    int32_t ids[64];
    int n;
    bool done;
} collect;

static void on_event(const forge_event *ev, void *user)
{
    collect *c = user;
    if (ev->token >= 0 && c->n < 64) c->ids[c->n++] = ev->token;
    if (ev->finish != FORGE_FINISH_NONE) c->done = true;
}

/* Run prompts[0..n_prompts) through one engine together, n_gen greedy tokens each. */
static void engine_run(forge_model *m, int32_t *const *prompts, const int *lens, int n_prompts,
                       int n_gen, collect *out)
{
    forge_engine_params ep = forge_engine_default_params();
    ep.device = FORGE_DEVICE_CPU;
    ep.n_threads = 2;
    ep.n_ctx = 128;
    ep.kv_type = FORGE_KV_F32;
    forge_engine *e = NULL;
    forge_err err = {0};
    int rc = forge_engine_create(m, &ep, &e, &err);
    if (rc) print_message("engine: %s\n", err.msg);
    assert_int_equal(rc, 0);
    for (int i = 0; i < n_prompts; i++) {
        forge_request_params rp = forge_request_default_params();
        rp.prompt = prompts[i];
        rp.n_prompt = lens[i];
        rp.max_tokens = n_gen;
        rp.ignore_eos = true;
        rp.on_event = on_event;
        rp.user = &out[i];
        memset(&out[i], 0, sizeof out[i]);
        forge_req_id id;
        assert_int_equal(forge_engine_submit(e, &rp, &id, &err), 0);
    }
    assert_int_equal(forge_engine_run(e, &err), 0);
    for (int i = 0; i < n_prompts; i++) {
        assert_true(out[i].done);
        assert_int_equal(out[i].n, n_gen);
    }
    forge_engine_free(e);
}

static void check_arch(const char *dir)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s/ref.json", ARCH_DATA, dir);
    cJSON *j = load_json(path);
    const cJSON *shape = cJSON_GetObjectItem(j, "shape"), *type = cJSON_GetObjectItem(j, "type");
    assert_true(cJSON_IsString(shape) && cJSON_IsString(type));
    assert_string_equal(type->valuestring, "F32");
    const cJSON *seed = cJSON_GetObjectItem(j, "seed");
    int n_ids, n_greedy;
    int32_t *ids = json_ids(cJSON_GetObjectItem(j, "ids"), &n_ids);
    int32_t *ref_greedy = json_ids(cJSON_GetObjectItem(j, "greedy"), &n_greedy);
    const int V = cJSON_GetObjectItem(j, "n_vocab")->valueint;
    assert_true(n_greedy > 0 && n_greedy <= 32 && n_ids > 0 && n_ids <= 64);

    /* the model, made again */
    char *tmp = tu_mkdtemp();
    char mpath[600];
    snprintf(mpath, sizeof mpath, "%s/model.gguf", tmp);
    synth_opts so = {shape->valuestring, GGML_TYPE_F32, mpath, NULL,
                     cJSON_IsNumber(seed) ? (uint64_t)seed->valuedouble : 0};
    forge_err err = {0};
    int rc = synth_write(&so, NULL, &err);
    if (rc) print_message("synth %s: %s\n", shape->valuestring, err.msg);
    assert_int_equal(rc, 0);
    forge_model *m = NULL;
    rc = forge_model_load(mpath, &m, &err);
    if (rc) print_message("load %s: %s\n", shape->valuestring, err.msg);
    assert_int_equal(rc, 0);
    assert_int_equal(forge_model_info_get(m)->n_vocab, V);

    /* logits of every position */
    snprintf(path, sizeof path, "%s/%s/ref_logits.f32", ARCH_DATA, dir);
    size_t ref_len;
    float *ref = (float *)tu_read_file(path, &ref_len);
    assert_non_null(ref);
    assert_int_equal(ref_len, (size_t)n_ids * V * sizeof(float));
    double nmse[2];
    for (int f32 = 0; f32 < 2; f32++) {
        forge_context *ctx = make_ctx(m, f32 == 1);
        assert_int_equal(forge_decode(ctx, ids, n_ids, true, &err), 0);
        double num = 0, den = 0;
        for (int p = 0; p < n_ids; p++) {
            const float *l = forge_get_logits(ctx, p);
            for (int v = 0; v < V; v++) {
                double d = (double)l[v] - ref[(size_t)p * V + v];
                num += d * d;
                den += (double)ref[(size_t)p * V + v] * ref[(size_t)p * V + v];
            }
        }
        nmse[f32] = num / den;
        forge_context_free(ctx);
    }
    print_message("%s (%s): NMSE %.3g (default), %.3g (F32 math) over %d positions x %d\n",
                  dir, forge_model_info_get(m)->arch, nmse[0], nmse[1], n_ids, V);
    /* a reference may state its own bounds (nmse_max, nmse_max_f32) and why (tolerance_note):
     * llama.cpp's CPU GELU goes through an fp16 table (Gemma), which turns 1-ulp differences
     * elsewhere into fp16 steps */
    const cJSON *tol = cJSON_GetObjectItem(j, "nmse_max"),
                *tol32 = cJSON_GetObjectItem(j, "nmse_max_f32");
    assert_true(nmse[1] <= (cJSON_IsNumber(tol32) ? tol32->valuedouble : 1e-9));
    assert_true(nmse[0] <= (cJSON_IsNumber(tol) ? tol->valuedouble : 1e-5));

    /* greedy ids: equal, or different only after a near-tie of the reference path */
    int32_t got[32];
    float gaps[32];
    forge_context *ctx = make_ctx(m, true);
    greedy(ctx, ids, n_ids, n_greedy, got, gaps, V);
    forge_context_free(ctx);
    for (int i = 0; i < n_greedy; i++) {
        if (got[i] != ref_greedy[i]) {
            print_message("%s: greedy id %d: %d vs reference %d (gap %.4g)\n", dir, i, got[i],
                          ref_greedy[i], (double)gaps[i]);
            assert_true(gaps[i] < 0.02f);
            break;
        }
    }

    /* the engine: alone == among others == the context's greedy ids */
    int32_t *prompts[1 + N_OTHERS];
    int lens[1 + N_OTHERS];
    prompts[0] = ids;
    lens[0] = n_ids;
    uint64_t rs = 0x5eed;
    for (int k = 1; k <= N_OTHERS; k++) {
        lens[k] = 5 + 7 * k;
        prompts[k] = malloc((size_t)lens[k] * sizeof(int32_t));
        assert_non_null(prompts[k]);
        for (int i = 0; i < lens[k]; i++)
            prompts[k][i] = 3 + (int32_t)(tu_rand_u64(&rs) % (uint64_t)(V - 3));
    }
    collect together[1 + N_OTHERS], alone;
    engine_run(m, prompts, lens, 1 + N_OTHERS, n_greedy, together);
    for (int k = 0; k <= N_OTHERS; k++) {
        engine_run(m, &prompts[k], &lens[k], 1, n_greedy, &alone);
        assert_memory_equal(alone.ids, together[k].ids, (size_t)n_greedy * sizeof(int32_t));
    }
    assert_memory_equal(together[0].ids, got, (size_t)n_greedy * sizeof(int32_t));

    for (int k = 1; k <= N_OTHERS; k++)
        free(prompts[k]);
    forge_model_free(m);
    tu_rmtree(tmp);
    free(tmp);
    free(ref);
    free(ids);
    free(ref_greedy);
    cJSON_Delete(j);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static void test_references(void **state)
{
    (void)state;
    DIR *d = opendir(ARCH_DATA);
    assert_non_null(d); /* the references are part of the repository */
    char *names[64];
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d)) && n < 64) {
        char p[512];
        snprintf(p, sizeof p, "%s/%s/ref.json", ARCH_DATA, de->d_name);
        FILE *f = fopen(p, "rb");
        if (!f) continue;
        fclose(f);
        names[n] = strdup(de->d_name);
        assert_non_null(names[n]);
        n++;
    }
    closedir(d);
    assert_true(n > 0);
    qsort(names, (size_t)n, sizeof *names, cmp_str);
    for (int i = 0; i < n; i++) {
        check_arch(names[i]);
        free(names[i]);
    }
}

/* An unknown architecture names the supported ones. */
static void test_unknown_arch(void **state)
{
    (void)state;
    char *tmp = tu_mkdtemp();
    char mpath[600];
    snprintf(mpath, sizeof mpath, "%s/m.gguf", tmp);
    synth_opts so = {"tiny", GGML_TYPE_F32, mpath, NULL, 0};
    forge_err err = {0};
    assert_int_equal(synth_write(&so, NULL, &err), 0);
    /* rename the architecture in place: "llama" -> "lllma" (same length) */
    size_t len;
    char *bytes = tu_read_file(mpath, &len);
    assert_non_null(bytes);
    char *hit = memmem(bytes, len, "general.architecture", 20);
    assert_non_null(hit);
    char *val = memmem(hit, len - (size_t)(hit - bytes), "llama", 5);
    assert_non_null(val);
    memcpy(val, "lllma", 5);
    FILE *f = fopen(mpath, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(bytes, 1, len, f), len);
    fclose(f);
    free(bytes);
    forge_model *m = NULL;
    assert_int_equal(forge_model_load(mpath, &m, &err), FORGE_E_UNSUPPORTED);
    assert_null(m);
    assert_non_null(strstr(err.msg, "'lllma' is not supported"));
    assert_non_null(strstr(err.msg, "gemma2"));
    assert_non_null(strstr(err.msg, "qwen3moe"));
    tu_rmtree(tmp);
    free(tmp);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_references),
        cmocka_unit_test(test_unknown_arch),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
