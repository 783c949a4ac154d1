/* engine_opts.c - see engine_opts.h. */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>

#include "engine_opts.h"
#include "hub_cli.h"

#define ENGINE_MAX_DEFAULT_CTX 8192

const char *engine_opts_help =
    "  -m, --model FILE     GGUF model (run without -m or -hf: $FORGE_MODEL, else the bundled\n"
    "                       demo model models/stories260K.gguf or PREFIX/share/forge/)\n"
    "  -hf, --hf-repo REPO[:QUANT]  the model from the hub cache, downloaded when missing\n"
    "                       (see forge pull --help); --offline: only the cache\n"
    "  -t, --threads N      threads (default: physical cores)\n"
    "  -c, --ctx-size N     context length (default: the model's, at most 8192)\n"
    "  -b, --batch-size N   most tokens per forward pass (default 512)\n"
    "  --kv-type f32|f16|q8_0  KV cache type (default f32; q8_0: CPU only)\n"
    "  --f32-math           no reduced-precision arithmetic (CPU: F32 copies of the weights;\n"
    "                       GPU: float activations, no F16 GEMM or tensor-core attention)\n"
    "  --tp N               tensor parallelism over N GPUs (--gpu .. --gpu + N - 1, NCCL;\n"
    "                       1..8; the head counts must divide by N; 1: the same path on one\n"
    "                       GPU); with --device cpu N CPU ranks in turn, for checking only\n"
    "                       (docs/DISTRIBUTED.md)\n"
    "  --device auto|gpu|cpu  where to compute (default auto: the GPU when libforge_cuda.so\n"
    "                       loads, a GPU exists and the model fits, else the CPU; a note on\n"
    "                       stderr says why when the GPU library is there but unusable, or\n"
    "                       when --device auto is given). gpu: fail if the GPU cannot be used.\n"
    "                       The library is looked for at $FORGE_GPU_LIB if set, else next to\n"
    "                       forge, else on the library path\n"
    "  --gpu N              which GPU (default 0)\n";

const char *engine_pool_help =
    "  --kv-size N          tokens in the KV cache pool, all requests together (default: what\n"
    "                       the command needs); rounded up to whole blocks\n"
    "  --block-size 16|32   tokens per KV block, the unit of prefix reuse (default 16)\n";

void engine_opts_init(engine_opts *o)
{
    memset(o, 0, sizeof *o);
    o->cp = forge_context_default_params();
    o->cp.device = FORGE_DEVICE_AUTO;
}

bool cli_parse_int(const char *cmd, const char *opt, const char *val, long min, long max, long *out)
{
    char *end;
    errno = 0;
    long v = val && *val && !isspace((unsigned char)*val) ? strtol(val, &end, 10) : 0;
    if (!val || !*val || isspace((unsigned char)*val) || errno || *end || v < min || v > max) {
        fprintf(stderr, "forge %s: bad value for %s: '%s' (expected an integer in %ld..%ld)\n", cmd,
                opt, val ? val : "", min, max);
        return false;
    }
    *out = v;
    return true;
}

bool cli_parse_u64(const char *cmd, const char *opt, const char *val, uint64_t *out)
{
    char *end;
    errno = 0;
    bool digit = val && *val >= '0' && *val <= '9';
    unsigned long long v = digit ? strtoull(val, &end, 10) : 0;
    if (!digit || errno || *end) {
        fprintf(stderr, "forge %s: bad value for %s: '%s' (expected an integer in 0..%llu)\n", cmd,
                opt, val ? val : "", (unsigned long long)UINT64_MAX);
        return false;
    }
    *out = (uint64_t)v;
    return true;
}

bool cli_parse_float(const char *cmd, const char *opt, const char *val, float min, float max,
                     bool min_open, float *out)
{
    char *end;
    errno = 0;
    bool ok = val && *val && !isspace((unsigned char)*val);
    float v = ok ? strtof(val, &end) : 0;
    ok = ok && !errno && !*end && isfinite(v) && (min_open ? v > min : v >= min) && v <= max;
    if (!ok) {
        char range[96];
        if (isinf(min) && isinf(max))
            snprintf(range, sizeof range, "a finite number");
        else if (isinf(max))
            snprintf(range, sizeof range, "a finite number %s %g",
                     min_open ? ">" : ">=", (double)min);
        else
            snprintf(range, sizeof range, "a number in %s%g, %g]", min_open ? "(" : "[",
                     (double)min, (double)max);
        fprintf(stderr, "forge %s: bad value for %s: '%s' (expected %s)\n", cmd, opt,
                val ? val : "", range);
        return false;
    }
    *out = v;
    return true;
}

bool cli_parse_json_object(const char *cmd, const char *opt, const char *val)
{
    cJSON *j = val ? cJSON_Parse(val) : NULL;
    bool ok = cJSON_IsObject(j);
    if (!ok)
        fprintf(stderr,
                "forge %s: bad value for %s: %s (expected a JSON object, e.g. '{\"key\": true}')\n",
                cmd, opt, j ? "not a JSON object" : "not valid JSON");
    cJSON_Delete(j);
    return ok;
}

int engine_opts_parse(engine_opts *o, const char *cmd, int argc, char **argv, int *i)
{
    const char *a = argv[*i];
    const char *val = *i + 1 < argc ? argv[*i + 1] : NULL;
    long v;
    int hub = hub_opts_parse(o, cmd, argc, argv, i);
    if (hub) return hub;
    if (!strcmp(a, "--f32-math")) {
        o->cp.f32_math = true;
        return 1;
    }
    bool is_m = !strcmp(a, "-m") || !strcmp(a, "--model");
    bool is_t = !strcmp(a, "-t") || !strcmp(a, "--threads");
    bool is_c = !strcmp(a, "-c") || !strcmp(a, "--ctx-size");
    bool is_b = !strcmp(a, "-b") || !strcmp(a, "--batch-size");
    bool is_kv = !strcmp(a, "--kv-type");
    bool is_dev = !strcmp(a, "--device");
    bool is_gpu = !strcmp(a, "--gpu");
    bool is_tp = !strcmp(a, "--tp");
    bool is_kvs = o->pool_opts && !strcmp(a, "--kv-size");
    bool is_bs = o->pool_opts && !strcmp(a, "--block-size");
    bool is_par = o->parallel_opt && !strcmp(a, "--parallel");
    if (!is_m && !is_t && !is_c && !is_b && !is_kv && !is_dev && !is_gpu && !is_kvs && !is_bs &&
        !is_par && !is_tp)
        return 0;
    if (!val) {
        fprintf(stderr, "forge %s: %s needs a value\n", cmd, a);
        return -1;
    }
    (*i)++;
    if (is_m) {
        o->model_path = val;
    } else if (is_t) {
        if (!cli_parse_int(cmd, a, val, 1, 1024, &v)) return -1;
        o->cp.n_threads = (int32_t)v;
        long n_cpu = sysconf(_SC_NPROCESSORS_ONLN);
        if (n_cpu > 0 && v > n_cpu)
            fprintf(stderr, "forge %s: warning: %s %ld is more than the %ld CPUs online (slower)\n",
                    cmd, a, v, n_cpu);
    } else if (is_c) {
        if (!cli_parse_int(cmd, a, val, 1, 1 << 24, &v)) return -1;
        o->cp.n_ctx = (int32_t)v;
    } else if (is_b) {
        if (!cli_parse_int(cmd, a, val, 1, 1 << 20, &v)) return -1;
        o->cp.n_batch = (int32_t)v;
    } else if (is_gpu) {
        if (!cli_parse_int(cmd, a, val, 0, 1023, &v)) return -1;
        o->cp.gpu_index = (int32_t)v;
    } else if (is_tp) {
        if (!cli_parse_int(cmd, a, val, 1, 8, &v)) return -1;
        o->cp.n_tp = (int32_t)v;
    } else if (is_kvs) {
        if (!cli_parse_int(cmd, a, val, 1, 1 << 28, &v)) return -1;
        o->kv_size = (int32_t)v;
    } else if (is_bs) {
        if (strcmp(val, "16") && strcmp(val, "32")) {
            fprintf(stderr, "forge %s: bad value for %s: '%s' (expected 16 or 32)\n", cmd, a, val);
            return -1;
        }
        o->block_size = (int32_t)atoi(val);
    } else if (is_par) {
        if (!cli_parse_int(cmd, a, val, 1, ENGINE_MAX_PARALLEL, &v)) return -1;
        o->n_parallel = (int32_t)v;
    } else if (is_dev) {
        if (!strcmp(val, "auto"))
            o->cp.device = FORGE_DEVICE_AUTO;
        else if (!strcmp(val, "gpu"))
            o->cp.device = FORGE_DEVICE_GPU;
        else if (!strcmp(val, "cpu"))
            o->cp.device = FORGE_DEVICE_CPU;
        else {
            fprintf(stderr, "forge %s: --device must be auto, gpu or cpu, not '%s'\n", cmd, val);
            return -1;
        }
        o->device_given = true;
    } else {
        if (!strcmp(val, "f32"))
            o->cp.kv_type = FORGE_KV_F32;
        else if (!strcmp(val, "f16"))
            o->cp.kv_type = FORGE_KV_F16;
        else if (!strcmp(val, "q8_0"))
            o->cp.kv_type = FORGE_KV_Q8_0;
        else {
            fprintf(stderr, "forge %s: --kv-type must be f32, f16 or q8_0, not '%s'\n", cmd, val);
            return -1;
        }
    }
    return 1;
}

int sampling_opts_parse(forge_sampler_params *sp, bool *seed_set, const char *cmd, int argc,
                        char **argv, int *i)
{
    const char *a = argv[*i];
    const char *val = *i + 1 < argc ? argv[*i + 1] : NULL;
    float *fdst = NULL, lo = -INFINITY, hi = INFINITY;
    bool lo_open = false;
    long v;
    if (!strcmp(a, "--temp")) {
        fdst = &sp->temperature;
        lo = 0;
    } else if (!strcmp(a, "--top-p") || !strcmp(a, "--min-p")) {
        fdst = !strcmp(a, "--top-p") ? &sp->top_p : &sp->min_p;
        lo = 0;
        hi = 1;
    } else if (!strcmp(a, "--repeat-penalty")) {
        fdst = &sp->repeat_penalty;
        lo = 0;
        lo_open = true;
    } else if (!strcmp(a, "--presence-penalty")) {
        fdst = &sp->presence_penalty;
    } else if (!strcmp(a, "--frequency-penalty")) {
        fdst = &sp->frequency_penalty;
    } else if (strcmp(a, "--top-k") && strcmp(a, "--repeat-last-n") && strcmp(a, "--seed") &&
               strcmp(a, "-s")) {
        return 0;
    }
    if (!val) {
        fprintf(stderr, "forge %s: %s needs a value\n", cmd, a);
        return -1;
    }
    (*i)++;
    if (fdst) return cli_parse_float(cmd, a, val, lo, hi, lo_open, fdst) ? 1 : -1;
    if (!strcmp(a, "--top-k")) {
        if (!cli_parse_int(cmd, a, val, -1, 1 << 30, &v)) return -1;
        sp->top_k = (int32_t)v;
    } else if (!strcmp(a, "--repeat-last-n")) {
        if (!cli_parse_int(cmd, a, val, 0, 1 << 20, &v)) return -1;
        sp->penalty_last_n = (int32_t)v;
    } else {
        if (!cli_parse_u64(cmd, a, val, &sp->seed)) return -1;
        *seed_set = true;
    }
    return 1;
}

/* The weight upload's progress bar (GPU contexts; stderr on a terminal only, so logs and
 * pipes stay clean). */
static void upload_progress(uint64_t done, uint64_t total, void *user)
{
    const char *cmd = user;
    const int width = 30;
    int fill = total ? (int)((double)done / (double)total * width) : width;
    fprintf(stderr, "\rforge %s: uploading weights [%.*s%*s] %3d%% %.2f / %.2f GiB", cmd, fill,
            "##############################", width - fill, "",
            total ? (int)(100.0 * (double)done / (double)total) : 100,
            (double)done / (1 << 30), (double)total / (1 << 30));
    if (done >= total) fputc('\n', stderr);
    fflush(stderr);
}

int engine_load_model(engine_opts *o, const char *cmd, forge_model **model)
{
    forge_err err = {0};
    *model = NULL;
    int hub = hub_resolve_model(o, cmd);
    if (hub) return hub;
    if (forge_model_load(o->model_path, model, &err)) {
        fprintf(stderr, "forge %s: %s\n", cmd, err.msg);
        return 1;
    }
    const char *warn = forge_tok_warning(forge_model_tok(*model));
    if (warn) fprintf(stderr, "forge %s: warning: %s\n", cmd, warn);
    return 0;
}

int32_t engine_context_size(const engine_opts *o, const char *cmd, const forge_model *model)
{
    const int32_t n_train = forge_model_info_get(model)->n_ctx_train;
    if (o->cp.n_ctx) return o->cp.n_ctx;
    if (n_train > ENGINE_MAX_DEFAULT_CTX) {
        /* a 128k-token cache would take tens of GB: the default stops at 8192 */
        fprintf(stderr, "forge %s: context %d (the model allows %d; use -c for more)\n", cmd,
                ENGINE_MAX_DEFAULT_CTX, n_train);
        return ENGINE_MAX_DEFAULT_CTX;
    }
    return n_train;
}

/* Ask whether a GPU can be used, to say why not (the choice itself is the library's, at
 * creation). Returns 0 with *gpu_ok and desc set, or 1 when --device gpu cannot work
 * (printed). */
static int probe_device(const engine_opts *o, const char *cmd, bool *gpu_ok, char *desc,
                        size_t desc_size, char *why, size_t why_size)
{
    *gpu_ok = false;
    desc[0] = why[0] = 0;
    if (o->cp.device == FORGE_DEVICE_CPU) return 0;
    forge_err perr = {0};
    if (forge_gpu_probe(o->cp.gpu_index, desc, desc_size, &perr) == FORGE_OK) {
        *gpu_ok = true;
        return 0;
    }
    /* --tp over GPUs with --device auto: the GPUs or an error, never a quiet CPU fallback */
    if (o->cp.device == FORGE_DEVICE_GPU || o->cp.n_tp >= 1) {
        fprintf(stderr, "forge %s: %s: %s\n", cmd,
                o->cp.device == FORGE_DEVICE_GPU ? "--device gpu" : "--tp", perr.msg);
        return 1;
    }
    /* no library at all is the normal CPU-only install: quiet unless asked */
    bool no_lib = perr.code == FORGE_E_UNSUPPORTED && !getenv("FORGE_GPU_LIB");
    if (o->device_given || !no_lib) snprintf(why, why_size, "%s", perr.msg);
    return 0;
}

int engine_load(engine_opts *o, const char *cmd, forge_model **model, forge_context **ctx)
{
    forge_err err = {0};
    *model = NULL;
    *ctx = NULL;
    int rc = engine_load_model(o, cmd, model);
    if (rc) return rc;
    forge_context_params cp = o->cp;
    cp.n_ctx = engine_context_size(o, cmd, *model);
    char desc[320], why[FORGE_ERR_MSG_MAX];
    bool gpu_ok;
    if (probe_device(o, cmd, &gpu_ok, desc, sizeof desc, why, sizeof why)) {
        forge_model_free(*model);
        *model = NULL;
        return 1;
    }
    if (why[0]) fprintf(stderr, "forge %s: note: running on the CPU (%s)\n", cmd, why);
    if (cp.device != FORGE_DEVICE_CPU) cp.device = gpu_ok ? FORGE_DEVICE_GPU : FORGE_DEVICE_CPU;
    if (cp.device == FORGE_DEVICE_GPU && isatty(STDERR_FILENO)) {
        cp.progress = upload_progress;
        cp.progress_user = (void *)cmd;
    }
    rc = forge_context_create(*model, &cp, ctx, &err);
    if (rc && o->cp.device == FORGE_DEVICE_AUTO && cp.device == FORGE_DEVICE_GPU) {
        fprintf(stderr, "forge %s: note: running on the CPU (GPU: %s)\n", cmd, err.msg);
        cp.device = FORGE_DEVICE_CPU;
        rc = forge_context_create(*model, &cp, ctx, &err);
    }
    if (rc) {
        fprintf(stderr, "forge %s: %s\n", cmd, err.msg);
        forge_model_free(*model);
        *model = NULL;
        return 1;
    }
    if (cp.device == FORGE_DEVICE_GPU) fprintf(stderr, "forge %s: on %s\n", cmd, desc);
    const char *warning = forge_context_warning(*ctx);
    if (warning) fprintf(stderr, "forge %s: warning: %s\n", cmd, warning);
    return 0;
}

forge_engine_params engine_params_of(const engine_opts *o)
{
    forge_engine_params ep = forge_engine_default_params();
    ep.device = o->cp.device;
    ep.gpu_index = o->cp.gpu_index;
    ep.n_tp = o->cp.n_tp;
    ep.n_threads = o->cp.n_threads;
    ep.f32_math = o->cp.f32_math;
    ep.kv_type = o->cp.kv_type;
    if (o->cp.n_batch) ep.n_batch = o->cp.n_batch;
    if (o->kv_size) ep.kv_size = o->kv_size;
    if (o->block_size) ep.block_size = o->block_size;
    if (o->n_parallel) ep.n_parallel = o->n_parallel;
    return ep;
}

int engine_create_cli(engine_opts *o, const char *cmd, forge_model *model,
                      const forge_engine_params *ep, forge_engine **engine)
{
    forge_err err = {0};
    forge_engine_params p = *ep;
    char desc[320], why[FORGE_ERR_MSG_MAX];
    bool gpu_ok;
    *engine = NULL;
    if (probe_device(o, cmd, &gpu_ok, desc, sizeof desc, why, sizeof why)) return 1;
    p.device = o->cp.device; /* auto stays auto: the library decides */
    if (gpu_ok && isatty(STDERR_FILENO)) {
        p.progress = upload_progress;
        p.progress_user = (void *)cmd;
    }
    if (forge_engine_create(model, &p, engine, &err)) {
        fprintf(stderr, "forge %s: %s\n", cmd, err.msg);
        return 1;
    }
    forge_engine_info info;
    forge_engine_get_info(*engine, &info);
    const bool on_cpu = !strcmp(info.device, "CPU");
    if (on_cpu && why[0]) fprintf(stderr, "forge %s: note: running on the CPU (%s)\n", cmd, why);
    else if (on_cpu && gpu_ok)
        fprintf(stderr,
                "forge %s: note: running on the CPU (the GPU could not take the model; "
                "--device gpu says why)\n",
                cmd);
    if (!on_cpu) fprintf(stderr, "forge %s: on %s\n", cmd, desc);
    if (info.warning) fprintf(stderr, "forge %s: warning: %s\n", cmd, info.warning);
    return 0;
}

const char *engine_device_name(const forge_engine *e)
{
    forge_engine_info info;
    forge_engine_get_info(e, &info);
    return info.device;
}

const char *engine_threads_desc(const engine_opts *o, char *buf, size_t size)
{
    if (o->cp.n_threads)
        snprintf(buf, size, "%d host thread%s", o->cp.n_threads, o->cp.n_threads == 1 ? "" : "s");
    else
        snprintf(buf, size, "a host thread per physical core");
    return buf;
}

double cli_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
