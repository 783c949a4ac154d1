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
    "  --device auto|gpu|cpu  where to compute (default auto: the GPU when libforge_cuda.so\n"
    "                       loads, a GPU exists and the model fits, else the CPU; a note on\n"
    "                       stderr says why when the GPU library is there but unusable, or\n"
    "                       when --device auto is given). gpu: fail if the GPU cannot be used.\n"
    "                       The library is looked for at $FORGE_GPU_LIB if set, else next to\n"
    "                       forge, else on the library path\n"
    "  --gpu N              which GPU (default 0)\n";

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
    if (!is_m && !is_t && !is_c && !is_b && !is_kv && !is_dev && !is_gpu) return 0;
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

int engine_load(engine_opts *o, const char *cmd, forge_model **model, forge_context **ctx)
{
    forge_err err = {0};
    *model = NULL;
    *ctx = NULL;
    int hub = hub_resolve_model(o, cmd);
    if (hub) return hub;
    if (forge_model_load(o->model_path, model, &err)) {
        fprintf(stderr, "forge %s: %s\n", cmd, err.msg);
        return 1;
    }
    const char *warn = forge_tok_warning(forge_model_tok(*model));
    if (warn) fprintf(stderr, "forge %s: warning: %s\n", cmd, warn);
    forge_context_params cp = o->cp;
    const int32_t n_train = forge_model_info_get(*model)->n_ctx_train;
    if (cp.n_ctx == 0 && n_train > ENGINE_MAX_DEFAULT_CTX) {
        /* a 128k-token cache would take tens of GB: the default stops at 8192 */
        cp.n_ctx = ENGINE_MAX_DEFAULT_CTX;
        fprintf(stderr, "forge %s: context %d (the model allows %d; use -c for more)\n", cmd,
                cp.n_ctx, n_train);
    }
    char desc[320] = "";
    if (cp.device != FORGE_DEVICE_CPU) {
        /* probe first, so that a fallback note or an error can say what is missing */
        forge_err perr = {0};
        if (forge_gpu_probe(cp.gpu_index, desc, sizeof desc, &perr) == FORGE_OK) {
            cp.device = FORGE_DEVICE_GPU;
        } else if (cp.device == FORGE_DEVICE_GPU) {
            fprintf(stderr, "forge %s: --device gpu: %s\n", cmd, perr.msg);
            forge_model_free(*model);
            *model = NULL;
            return 1;
        } else {
            /* no library at all is the normal CPU-only install: quiet unless asked */
            bool no_lib = perr.code == FORGE_E_UNSUPPORTED && !getenv("FORGE_GPU_LIB");
            if (o->device_given || !no_lib)
                fprintf(stderr, "forge %s: note: running on the CPU (%s)\n", cmd, perr.msg);
            cp.device = FORGE_DEVICE_CPU;
        }
    }
    if (cp.device == FORGE_DEVICE_GPU && isatty(STDERR_FILENO)) {
        cp.progress = upload_progress;
        cp.progress_user = (void *)cmd;
    }
    int rc = forge_context_create(*model, &cp, ctx, &err);
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

double cli_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
