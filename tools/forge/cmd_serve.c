/* cmd_serve.c - `forge serve`: load a model, start an engine (forge_engine.h) on its own thread
 * and an OpenAI-compatible HTTP server in front of it (forge_server.h), until SIGINT/SIGTERM;
 * then shut down gracefully and exit 0. Prints "forge serve: listening on http://HOST:PORT" on
 * stderr once the port is bound (with --port 0, the port the system picked). */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "forge.h"
#include "forge_engine.h"
#include "forge_server.h"
#include "commands.h"
#include "engine_opts.h"
#include "hub_cli.h"

static volatile sig_atomic_t g_stop = 0;

static void on_signal(int sig)
{
    (void)sig;
    g_stop = 1;
}

static void usage(FILE *f)
{
    fprintf(
        f,
        "usage: forge serve -m MODEL [options]\n"
        "An OpenAI-compatible HTTP server: POST /v1/completions, /v1/chat/completions\n"
        "(streaming with \"stream\": true), GET /v1/models, /health, /metrics, POST /tokenize,\n"
        "/detokenize, and a chat page at /.\n"
        "  --host ADDR          address to listen on (default 127.0.0.1)\n"
        "  --port N             port, 0..65535 (default 8080; 0: a free port, printed)\n"
        "  --parallel N         most requests decoding at once (default: the engine's, 64)\n"
        "  --kv-size N          tokens in the KV pool of all requests (default: the engine's)\n"
        "  --api-key KEY        require 'Authorization: Bearer KEY' on /v1/* and /tokenize\n"
        "  --api-key-file F     the same, the key read from the first line of F\n"
        "  --chat-template NAME|FILE  built-in (chatml, llama2, llama3, gemma, mistral) or a\n"
        "                       Jinja file (default: the model's template, else a built-in)\n"
        "  --alias NAME         the model's id in the API (default: the file name)\n"
        "  --max-body BYTES     largest request body, 64..2^30 (default 1048576)\n"
        "  --timeout S          idle connection timeout in seconds, 1..86400 (default 60)\n"
        "  --cors ORIGIN        send CORS headers allowing ORIGIN ('*': any)\n"
        "  --http-threads N     HTTP threads, 1..256 (default 4)\n"
        "  --stream-interval-ms MS  a stream's tokens go out at most once per MS ms (the first and\n"
        "                       the last at once; each token stays its own event), fewer sends\n"
        "                       for fast models; 0: at every token (default 0)\n"
        "  --max-queue N        choices queued or running at once, more get 503 (default 256)\n"
        "  --shutdown-timeout S on SIGINT/SIGTERM, time for requests to finish (default 10)\n"
        "  --log-prompts        put request bodies into the access log (stderr)\n"
        "%s",
        engine_opts_help);
}

static char *read_key_file(const char *path)
{
    FILE *f = fopen(path, "r");
    char line[1024];
    if (!f) {
        fprintf(stderr, "forge serve: --api-key-file %s: cannot open\n", path);
        return NULL;
    }
    char *got = fgets(line, sizeof line, f);
    fclose(f);
    if (!got) line[0] = 0;
    line[strcspn(line, "\r\n")] = 0;
    if (!line[0]) {
        fprintf(stderr, "forge serve: --api-key-file %s: the first line is empty\n", path);
        return NULL;
    }
    return strdup(line);
}

int cmd_serve(int argc, char **argv)
{
    engine_opts o;
    forge_server_params sp = forge_server_default_params();
    long v;
    float fv;
    long parallel = 0, kv_size = 0;
    const char *key_file = NULL;
    char *key = NULL, *alias = NULL;
    forge_model *model = NULL;
    forge_engine *engine = NULL;
    forge_server *srv = NULL;
    forge_err err = {0};
    int status = 1;
    struct sigaction sa, old_int, old_term;
    bool sa_set = false;

    engine_opts_init(&o);
    for (int i = 1; i < argc; i++) {
        int r = engine_opts_parse(&o, "serve", argc, argv, &i);
        if (r < 0) return 2;
        if (r > 0) continue;
        const char *a = argv[i];
        const char *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--log-prompts")) {
            sp.log_prompts = true;
            continue;
        }
        if (!val) {
            fprintf(stderr, "forge serve: unknown option or missing value '%s'\n", a);
            usage(stderr);
            return 2;
        }
        i++;
        if (!strcmp(a, "--host")) {
            sp.host = val;
        } else if (!strcmp(a, "--port")) {
            if (!cli_parse_int("serve", a, val, 0, 65535, &v)) return 2;
            sp.port = (int)v;
        } else if (!strcmp(a, "--parallel")) {
            if (!cli_parse_int("serve", a, val, 1, 4096, &parallel)) return 2;
        } else if (!strcmp(a, "--kv-size")) {
            if (!cli_parse_int("serve", a, val, 1, 1L << 26, &kv_size)) return 2;
        } else if (!strcmp(a, "--api-key")) {
            if (!*val) {
                fprintf(stderr, "forge serve: bad value for --api-key: '' (expected a key)\n");
                return 2;
            }
            sp.api_key = val;
        } else if (!strcmp(a, "--api-key-file")) {
            key_file = val;
        } else if (!strcmp(a, "--chat-template")) {
            sp.chat_template = val;
        } else if (!strcmp(a, "--alias")) {
            if (!*val) {
                fprintf(stderr, "forge serve: bad value for --alias: '' (expected a name)\n");
                return 2;
            }
            sp.alias = val;
        } else if (!strcmp(a, "--max-body")) {
            if (!cli_parse_int("serve", a, val, 64, 1L << 30, &v)) return 2;
            sp.max_body = (size_t)v;
        } else if (!strcmp(a, "--timeout")) {
            if (!cli_parse_int("serve", a, val, 1, 86400, &v)) return 2;
            sp.timeout_s = (unsigned)v;
        } else if (!strcmp(a, "--cors")) {
            sp.cors_origin = val;
        } else if (!strcmp(a, "--http-threads")) {
            if (!cli_parse_int("serve", a, val, 1, 256, &v)) return 2;
            sp.n_threads = (int)v;
        } else if (!strcmp(a, "--stream-interval-ms")) {
            if (!cli_parse_int("serve", a, val, 0, 10000, &v)) return 2;
            sp.stream_interval_ms = (unsigned)v;
        } else if (!strcmp(a, "--max-queue")) {
            if (!cli_parse_int("serve", a, val, 1, 1 << 20, &v)) return 2;
            sp.max_queue = (int)v;
        } else if (!strcmp(a, "--shutdown-timeout")) {
            if (!cli_parse_float("serve", a, val, 0, 3600, false, &fv)) return 2;
            sp.shutdown_timeout_s = fv;
        } else {
            fprintf(stderr, "forge serve: unknown option '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }
    if (sp.api_key && key_file) {
        fprintf(stderr, "forge serve: give --api-key or --api-key-file, not both\n");
        return 2;
    }
    if (!o.model_path && !o.hf_spec) {
        fprintf(stderr, "forge serve: -m MODEL (or -hf REPO) is required\n");
        usage(stderr);
        return 2;
    }
    if (key_file) {
        if (!(key = read_key_file(key_file))) return 1;
        sp.api_key = key;
    }
    if ((status = hub_resolve_model(&o, "serve"))) goto done;
    status = 1;
    if (forge_model_load(o.model_path, &model, &err)) {
        fprintf(stderr, "forge serve: %s\n", err.msg);
        goto done;
    }
    forge_engine_params ep = forge_engine_default_params();
    ep.device = o.cp.device;
    ep.gpu_index = o.cp.gpu_index;
    ep.n_tp = o.cp.n_tp;
    ep.n_threads = o.cp.n_threads;
    ep.f32_math = o.cp.f32_math;
    ep.kv_type = o.cp.kv_type;
    ep.n_ctx = o.cp.n_ctx;
    ep.n_batch = o.cp.n_batch;
    ep.kv_size = (int32_t)kv_size;
    ep.n_parallel = (int32_t)parallel;
    const int32_t n_train = forge_model_info_get(model)->n_ctx_train;
    if (ep.n_ctx == 0 && n_train > 8192) ep.n_ctx = 8192; /* as forge run: -c for more */
    if (forge_engine_create(model, &ep, &engine, &err)) {
        fprintf(stderr, "forge serve: %s\n", err.msg);
        goto done;
    }
    if (!sp.alias) {
        const char *base = strrchr(o.model_path, '/');
        alias = strdup(base ? base + 1 : o.model_path);
        if (!alias) goto done;
        sp.alias = alias;
    }
    forge_engine_info info;
    forge_engine_get_info(engine, &info);
    if (info.warning) fprintf(stderr, "forge serve: warning: %s\n", info.warning);
    if (forge_engine_start(engine, &err) || forge_server_create(engine, &sp, &srv, &err)) {
        fprintf(stderr, "forge serve: %s\n", err.msg);
        goto done;
    }
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    signal(SIGPIPE, SIG_IGN);
    sa_set = true;
    fprintf(stderr,
            "forge serve: model %s (%s) on %s, context %d, KV %d tokens, %d parallel\n"
            "forge serve: listening on http://%s:%d\n",
            sp.alias, forge_model_info_get(model)->type_summary, info.device, info.n_ctx,
            info.kv_size, info.n_parallel, sp.host, forge_server_port(srv));
    fflush(stderr);
    forge_server_run(srv, &g_stop, &err);
    fprintf(stderr, "forge serve: stopped\n");
    status = 0;
done:
    if (sa_set) {
        sigaction(SIGINT, &old_int, NULL);
        sigaction(SIGTERM, &old_term, NULL);
    }
    forge_server_free(srv);
    forge_engine_free(engine);
    forge_model_free(model);
    free(key);
    free(alias);
    return status;
}
