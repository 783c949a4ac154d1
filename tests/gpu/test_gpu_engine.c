/* test_gpu_engine.c - the GPU backend end to end against the CPU backend and the Hugging Face
 * references (../shared/hf-ref): for each model, the prompt's logits (all positions) on the CPU
 * and on the GPU, NMSE of each against ref_logits.f32 (threshold 1e-4) and against each other,
 * then 16 greedy tokens on both devices, which must equal each other (and are compared with
 * HF's greedy_ids). Run on the GPU machine (scripts/gpu-engine-run.sh), never in CI.
 *   test_gpu_engine HF_REF_DIR [arch ...]        (default: llama qwen2 qwen3)
 * Environment: the GPU prompt path is tried with matvec per token (the default for short
 * prompts) and with GEMM (FORGE_GPU_GEMM_MIN=2), F32 and F16 KV cache, batched and per-position
 * prompt attention (FORGE_GPU_ATTN_BATCH=0), and without decode graphs (FORGE_GPU_GRAPH=0; its
 * ids must equal the default's exactly). Every run also generates the ids again through
 * forge_decode_greedy (device argmax, recorded steps replayed at the same positions), which must
 * give the same ids. Run it with FORGE_GPU_GRAPH=1 to make a failed graph capture an error. */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/util.h"
#include "forge_model.h"

static int n_pass, n_fail;

static void check(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void check(int ok, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("%s ", ok ? "[  OK  ]" : "[ FAIL ]");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    if (ok)
        n_pass++;
    else
        n_fail++;
}

static double nmse(const float *a, const float *ref, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    return den > 0 ? num / den : num;
}

static int argmax(const float *x, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

static int *json_ints(const cJSON *a, int *n)
{
    *n = cJSON_GetArraySize(a);
    int *v = calloc((size_t)*n + 1, sizeof *v);
    for (int i = 0; i < *n; i++)
        v[i] = cJSON_GetArrayItem(a, i)->valueint;
    return v;
}

/* Logits of every prompt position into all (n x V), then 16 greedy ids into ids (argmax of
 * the logits), then from an emptied cache the same through forge_decode_greedy into ids2. */
static int run_device(forge_model *m, forge_device dev, forge_kv_type kv, bool f32_math,
                      const int *in, int n_in, float *all, int *ids, int *ids2, int n_gen)
{
    forge_err err = {0};
    forge_context *ctx = NULL;
    forge_context_params cp = forge_context_default_params();
    cp.n_ctx = 64;
    cp.n_threads = 4;
    cp.kv_type = kv;
    cp.device = dev;
    cp.f32_math = f32_math;
    const int V = forge_model_info_get(m)->n_vocab;
    int rc = forge_context_create(m, &cp, &ctx, &err);
    if (rc) goto done;
    if (strcmp(forge_context_device(ctx), dev == FORGE_DEVICE_GPU ? "GPU" : "CPU")) {
        rc = FORGE_E_INTERNAL;
        snprintf(err.msg, sizeof err.msg, "wrong device %s", forge_context_device(ctx));
        goto done;
    }
    if ((rc = forge_decode(ctx, (const int32_t *)in, n_in, true, &err))) goto done;
    for (int i = 0; i < n_in; i++)
        memcpy(all + (size_t)i * V, forge_get_logits(ctx, i), (size_t)V * sizeof(float));
    int32_t id = argmax(forge_get_logits(ctx, -1), V);
    for (int t = 0; t < n_gen; t++) {
        ids[t] = id;
        if ((rc = forge_decode(ctx, &id, 1, false, &err))) goto done;
        id = argmax(forge_get_logits(ctx, -1), V);
    }
    if ((rc = forge_kv_truncate(ctx, 0, &err))) goto done;
    if ((rc = forge_decode_greedy(ctx, (const int32_t *)in, n_in, &id, &err))) goto done;
    for (int t = 0; t < n_gen; t++) {
        ids2[t] = id;
        if ((rc = forge_decode_greedy(ctx, &ids2[t], 1, &id, &err))) goto done;
        if (forge_get_logits(ctx, -1) != NULL) {
            rc = FORGE_E_INTERNAL;
            snprintf(err.msg, sizeof err.msg, "logits kept after forge_decode_greedy");
            goto done;
        }
    }
done:
    if (rc) printf("error (%s): %s\n", dev == FORGE_DEVICE_GPU ? "gpu" : "cpu", err.msg);
    forge_context_free(ctx);
    return rc;
}

static void one_arch(const char *dir, const char *arch)
{
    char path[1024];
    forge_err err = {0};
    forge_model *m = NULL;
    cJSON *j = NULL;
    float *ref = NULL, *cpu = NULL, *gpu = NULL;
    int *in = NULL, *greedy = NULL, *pos = NULL;
    size_t ref_bytes = 0;
    char *txt = NULL;
    snprintf(path, sizeof path, "%s/%s/ref_tokens.json", dir, arch);
    if (forge_read_file(path, &txt, &ref_bytes, &err)) {
        check(0, "%s: %s", arch, err.msg);
        return;
    }
    j = cJSON_ParseWithLength(txt, ref_bytes);
    int n_in = 0, n_greedy = 0, n_pos = 0;
    in = json_ints(cJSON_GetObjectItem(j, "input_ids"), &n_in);
    greedy = json_ints(cJSON_GetObjectItem(j, "greedy_ids"), &n_greedy);
    pos = json_ints(cJSON_GetObjectItem(j, "ref_logits_positions"), &n_pos);
    free(txt);
    txt = NULL;
    snprintf(path, sizeof path, "%s/%s/ref_logits.f32", dir, arch);
    if (forge_read_file(path, (char **)&ref, &ref_bytes, &err)) {
        check(0, "%s: %s", arch, err.msg);
        goto done;
    }
    snprintf(path, sizeof path, "%s/%s/model.gguf", dir, arch);
    if (forge_model_load(path, &m, &err)) {
        check(0, "%s: %s", arch, err.msg);
        goto done;
    }
    const int V = forge_model_info_get(m)->n_vocab;
    if (ref_bytes != (size_t)n_pos * V * 4) {
        check(0, "%s: ref_logits.f32 has %zu bytes, expected %d x %d floats", arch, ref_bytes,
              n_pos, V);
        goto done;
    }
    cpu = calloc((size_t)n_in * V, sizeof(float));
    gpu = calloc((size_t)n_in * V, sizeof(float));
    int cpu_ids[16] = {0}, gpu_ids[16] = {0}, cpu_ids2[16] = {0}, gpu_ids2[16] = {0};
    int first_ids[16] = {0};
    const int n_gen = n_greedy < 16 ? n_greedy : 16;
    int rc = run_device(m, FORGE_DEVICE_CPU, FORGE_KV_F32, false, in, n_in, cpu, cpu_ids, cpu_ids2,
                        n_gen);
    check(rc == 0, "%s: CPU run", arch);
    if (rc) goto done;
    check(!memcmp(cpu_ids, cpu_ids2, sizeof(int) * (size_t)n_gen),
          "%s: CPU forge_decode_greedy ids == argmax of the logits", arch);
    const char *graph_env = getenv("FORGE_GPU_GRAPH");
    char graph_outer[16] = "";
    if (graph_env) snprintf(graph_outer, sizeof graph_outer, "%s", graph_env);
    const struct {
        const char *gemm_min, *attn_batch, *graph;
        forge_kv_type kv;
        bool f32_math;
        const char *label;
    } variants[] = {{NULL, NULL, NULL, FORGE_KV_F32, false, "matvec prompt, KV f32"},
                    {"2", NULL, NULL, FORGE_KV_F32, false, "GEMM + flash-attention prompt, KV f32"},
                    {"2", NULL, NULL, FORGE_KV_F16, false, "GEMM + flash-attention prompt, KV f16"},
                    {NULL, NULL, NULL, FORGE_KV_F16, false, "matvec prompt, KV f16"},
                    {NULL, "0", NULL, FORGE_KV_F32, false, "per-position prompt attention, KV f32"},
                    {NULL, NULL, "0", FORGE_KV_F32, false, "no decode graphs, KV f32"},
                    {"2", NULL, NULL, FORGE_KV_F32, true, "f32 math (GEMM threshold 2 ignored)"}};
    for (size_t vi = 0; vi < sizeof variants / sizeof variants[0]; vi++) {
        if (variants[vi].gemm_min)
            setenv("FORGE_GPU_GEMM_MIN", variants[vi].gemm_min, 1);
        else
            unsetenv("FORGE_GPU_GEMM_MIN");
        if (variants[vi].attn_batch)
            setenv("FORGE_GPU_ATTN_BATCH", variants[vi].attn_batch, 1);
        else
            unsetenv("FORGE_GPU_ATTN_BATCH");
        if (variants[vi].graph)
            setenv("FORGE_GPU_GRAPH", variants[vi].graph, 1);
        else if (graph_env)
            setenv("FORGE_GPU_GRAPH", graph_outer, 1);
        else
            unsetenv("FORGE_GPU_GRAPH");
        rc = run_device(m, FORGE_DEVICE_GPU, variants[vi].kv, variants[vi].f32_math, in, n_in, gpu,
                        gpu_ids, gpu_ids2, n_gen);
        check(rc == 0, "%s [%s]: GPU run", arch, variants[vi].label);
        if (rc) continue;
        check(!memcmp(gpu_ids, gpu_ids2, sizeof(int) * (size_t)n_gen),
              "%s [%s]: forge_decode_greedy ids (device argmax) == argmax of the logits", arch,
              variants[vi].label);
        if (vi == 0) memcpy(first_ids, gpu_ids, sizeof first_ids);
        if (variants[vi].graph)
            check(!memcmp(first_ids, gpu_ids, sizeof(int) * (size_t)n_gen),
                  "%s [%s]: ids == the default run's (FORGE_GPU_GRAPH=%s)", arch,
                  variants[vi].label, graph_env ? graph_outer : "unset");
        double worst_gpu = 0, worst_cpu = 0;
        for (int p = 0; p < n_pos; p++) {
            const float *r = ref + (size_t)p * V;
            double eg = nmse(gpu + (size_t)pos[p] * V, r, (size_t)V);
            double ec = nmse(cpu + (size_t)pos[p] * V, r, (size_t)V);
            if (eg > worst_gpu) worst_gpu = eg;
            if (ec > worst_cpu) worst_cpu = ec;
        }
        double gc = nmse(gpu, cpu, (size_t)n_in * V);
        /* f32 math: float activations and fp32 products everywhere (the F16 models are exact
         * in fp32), so the GPU reproduces HF to rounding */
        if (variants[vi].f32_math)
            check(worst_gpu <= 1e-9, "%s [%s]: GPU logits vs HF %.3g <= 1e-9", arch,
                  variants[vi].label, worst_gpu);
        check(worst_gpu <= 1e-4,
              "%s [%s]: GPU logits vs HF, worst NMSE over %d positions %.3g "
              "(CPU %.3g), GPU vs CPU all positions %.3g",
              arch, variants[vi].label, n_pos, worst_gpu, worst_cpu, gc);
        int same_cpu = !memcmp(cpu_ids, gpu_ids, sizeof(int) * (size_t)n_gen);
        int same_hf = !memcmp(greedy, gpu_ids, sizeof(int) * (size_t)n_gen);
        int same_cpu_hf = !memcmp(greedy, cpu_ids, sizeof(int) * (size_t)n_gen);
        check(same_cpu, "%s [%s]: %d greedy ids GPU == CPU (GPU == HF: %s, CPU == HF: %s)", arch,
              variants[vi].label, n_gen, same_hf ? "yes" : "no", same_cpu_hf ? "yes" : "no");
        if (!same_cpu) {
            printf("   cpu:");
            for (int i = 0; i < n_gen; i++)
                printf(" %d", cpu_ids[i]);
            printf("\n   gpu:");
            for (int i = 0; i < n_gen; i++)
                printf(" %d", gpu_ids[i]);
            printf("\n");
        }
    }
    unsetenv("FORGE_GPU_GEMM_MIN");
    unsetenv("FORGE_GPU_ATTN_BATCH");
    if (graph_env)
        setenv("FORGE_GPU_GRAPH", graph_outer, 1);
    else
        unsetenv("FORGE_GPU_GRAPH");
done:
    free(txt);
    cJSON_Delete(j);
    free(in);
    free(greedy);
    free(pos);
    free(ref);
    free(cpu);
    free(gpu);
    forge_model_free(m);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: test_gpu_engine HF_REF_DIR [arch ...]\n");
        return 2;
    }
    char desc[320];
    forge_err err = {0};
    if (forge_gpu_probe(0, desc, sizeof desc, &err)) {
        printf("no GPU: %s\n", err.msg);
        return 2;
    }
    printf("%s\n", desc);
    const char *def[] = {"llama", "qwen2", "qwen3"};
    if (argc > 2)
        for (int i = 2; i < argc; i++)
            one_arch(argv[1], argv[i]);
    else
        for (size_t i = 0; i < 3; i++)
            one_arch(argv[1], def[i]);
    printf("test_gpu_engine: %d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
