/* cmd_run.c - `forge run`: generate text from a prompt and stream it to stdout; timings to
 * stderr. One request on a forge_engine: the text comes from its events. The prompt gets BOS
 * as the vocabulary says (llama.cpp's behaviour); generation stops at an end-of-generation
 * token, after -n tokens, at the end of the context, or on Ctrl-C (the engine's abort flag). */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli_io.h"
#include "commands.h"
#include "engine_opts.h"

static volatile sig_atomic_t g_interrupted = 0;

static void on_sigint(int sig)
{
    (void)sig;
    g_interrupted = 1;
}

static void usage(FILE *f)
{
    fprintf(
        f,
        "usage: forge run -m MODEL -p PROMPT [options]\n"
        "  -p, --prompt TEXT    the prompt (BOS is added as the vocabulary says)\n"
        "  -n, --n-predict N    tokens to generate (default -1: until end of text or context)\n"
        "  --temp T             temperature >= 0 (default 0.8; 0 = greedy)\n"
        "  --top-k K            -1..2^30 (default 40; 0 = off)\n"
        "  --top-p P            0..1 (default 0.95; 1 = off)\n"
        "  --min-p P            0..1 (default 0.05; 0 = off)\n"
        "  --repeat-penalty R   > 0 (default 1.0 = off)\n"
        "  --repeat-last-n N    tokens the penalties look at, 0..2^20 (default 64)\n"
        "  --presence-penalty P, --frequency-penalty P   (default 0 = off)\n"
        "  --seed S             random seed, 0..2^64-1 (default: from the clock, printed)\n"
        "  --ids                after the text, print a line 'ids: ...' with the generated ids\n"
        "%s%s",
        engine_opts_help, engine_pool_help);
}

/* What the event callback gathers for one request. */
typedef struct run_out {
    forge_engine *engine;
    forge_req_id id;
    int32_t *gen; /* generated ids (--ids), room for max_tokens */
    int32_t n_gen;
    bool discard;       /* -n 0: the prompt is evaluated, its token is not shown */
    int32_t n_sampled;  /* picks, the end-of-generation one included */
    double t_first;     /* when the first token was picked */
    forge_finish finish;
    char error[FORGE_ERR_MSG_MAX];
    bool out_failed;    /* stdout failed (reported): the request was cancelled */
} run_out;

static void on_event(const forge_event *ev, void *user)
{
    run_out *r = user;
    if (ev->token >= 0 || ev->finish == FORGE_FINISH_STOP) {
        if (r->n_sampled++ == 0) r->t_first = cli_now();
    }
    if (ev->finish != FORGE_FINISH_NONE) {
        r->finish = ev->finish;
        if (ev->error) snprintf(r->error, sizeof r->error, "%s", ev->error);
    }
    if (r->discard || r->out_failed) return;
    if (ev->token >= 0) r->gen[r->n_gen++] = ev->token;
    if (ev->text_len) fwrite(ev->text, 1, ev->text_len, stdout);
    if (!cli_stdout_ok("run")) { /* reported: no one reads what follows */
        r->out_failed = true;
        if (ev->finish == FORGE_FINISH_NONE) (void)forge_engine_cancel(r->engine, r->id, NULL);
    }
}

int cmd_run(int argc, char **argv)
{
    engine_opts o;
    forge_sampler_params sp = forge_sampler_default_params();
    const char *prompt = NULL;
    long n_predict = -1;
    bool print_ids = false, seed_set = false;
    forge_model *model = NULL;
    forge_engine *engine = NULL;
    int32_t *ids = NULL;
    size_t n_ids = 0;
    run_out out = {0};
    forge_err err = {0};
    int status = 1;
    struct sigaction old_sa, sa;
    bool sa_set = false;
    char threads[64];

    engine_opts_init(&o);
    o.default_model = true; /* no -m: $FORGE_MODEL or the bundled demo model */
    o.pool_opts = true;
    for (int i = 1; i < argc; i++) {
        int r = engine_opts_parse(&o, "run", argc, argv, &i);
        if (r == 0) r = sampling_opts_parse(&sp, &seed_set, "run", argc, argv, &i);
        if (r < 0) return 2;
        if (r > 0) continue;
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if ((!strcmp(a, "-p") || !strcmp(a, "--prompt")) && i + 1 < argc) {
            prompt = argv[++i];
        } else if ((!strcmp(a, "-n") || !strcmp(a, "--n-predict")) && i + 1 < argc) {
            if (!cli_parse_int("run", a, argv[++i], -1, 1L << 30, &n_predict)) return 2;
        } else if (!strcmp(a, "--ids")) {
            print_ids = true;
        } else {
            fprintf(stderr, "forge run: unknown option or missing value '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }
    if (!prompt) {
        fprintf(stderr, "forge run: -p PROMPT is required\n");
        usage(stderr);
        return 2;
    }
    if (!seed_set) sp.seed = (uint64_t)time(NULL);

    double t0 = cli_now();
    if ((status = engine_load_model(&o, "run", &model))) goto done;
    status = 1;
    /* -c counts K/V positions: a request of n_ctx positions picks n_ctx + 1 tokens (the last
     * one is never fed back), which is the engine's n_ctx */
    const int32_t n_ctx = engine_context_size(&o, "run", model);
    forge_engine_params ep = engine_params_of(&o);
    ep.n_ctx = n_ctx + 1;
    ep.n_parallel = 1;
    if (!o.kv_size) ep.kv_size = n_ctx;
    if (ep.n_batch > n_ctx) ep.n_batch = n_ctx; /* no step of one request is longer */
    if ((status = engine_create_cli(&o, "run", model, &ep, &engine))) goto done;
    status = 1;
    double t_load = cli_now() - t0;
    const forge_tok *tok = forge_model_tok(model);

    if (forge_tok_encode(tok, prompt, strlen(prompt), true, true, &ids, &n_ids, &err)) {
        fprintf(stderr, "forge run: tokenizing the prompt: %s\n", err.msg);
        goto done;
    }
    if (n_ids == 0) {
        fprintf(stderr,
                "forge run: the prompt is empty and the vocabulary adds no BOS: nothing to run\n");
        goto done;
    }
    if ((int64_t)n_ids > n_ctx) {
        fprintf(
            stderr,
            "forge run: the prompt is %zu tokens, longer than the context (%d tokens); use -c\n",
            n_ids, n_ctx);
        goto done;
    }
    if (!seed_set && sp.temperature > 0)
        fprintf(stderr, "forge run: seed %llu\n", (unsigned long long)sp.seed);
    fprintf(stderr, "forge run: loaded %s in %.2f s (%s, %s, %s, context %d, KV %s)\n",
            o.model_path, t_load, forge_model_info_get(model)->type_summary,
            engine_device_name(engine), engine_threads_desc(&o, threads, sizeof threads),
            n_ctx, forge_kv_type_name(o.cp.kv_type));

    int64_t room = n_ctx - (int64_t)n_ids + 1; /* tokens we can pick: the last needs no K/V */
    int64_t want = n_predict < 0 ? room : n_predict;
    if (n_predict > room) {
        fprintf(stderr,
                "forge run: -n %ld goes beyond the context (%d tokens); stopping at the context\n",
                n_predict, n_ctx);
        want = room;
    }
    out.engine = engine;
    out.discard = want == 0; /* the prompt still runs (its timing is reported) */
    out.gen = malloc((size_t)(want > 0 ? want : 1) * sizeof *out.gen);
    if (!out.gen) goto done;

    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGINT, &sa, &old_sa) == 0) sa_set = true;
    forge_engine_set_abort_flag(engine, &g_interrupted);

    forge_request_params rp = forge_request_default_params();
    rp.prompt = ids;
    rp.n_prompt = (int32_t)n_ids;
    rp.max_tokens = want > 0 ? (int32_t)want : 1;
    rp.sampling = sp;
    rp.on_event = on_event;
    rp.user = &out;
    double t_start = cli_now();
    if (forge_engine_submit(engine, &rp, &out.id, &err)) {
        fprintf(stderr, "forge run: %s\n", err.msg);
        goto done;
    }
    int rc = forge_engine_run(engine, &err);
    double t_end = cli_now();
    if (out.out_failed) goto done;
    if (out.n_sampled == 0) {
        if (rc == FORGE_E_INTERRUPTED || out.finish == FORGE_FINISH_CANCELLED) {
            fprintf(stderr, "\nforge run: interrupted during the prompt\n");
            status = 130;
        } else {
            fprintf(stderr, "forge run: %s\n", out.error[0] ? out.error : err.msg);
        }
        goto done;
    }
    if (out.finish == FORGE_FINISH_ERROR || out.finish == FORGE_FINISH_NONE) {
        /* the step failed, or the run did before the request ended */
        fprintf(stderr, "\nforge run: %s\n", out.finish == FORGE_FINISH_ERROR ? out.error : err.msg);
        goto done;
    }
    printf("\n");
    if (print_ids) {
        printf("ids:");
        for (int32_t i = 0; i < out.n_gen; i++)
            printf(" %d", out.gen[i]);
        printf("\n");
    }
    if (!cli_stdout_ok("run")) goto done;
    if (out.finish == FORGE_FINISH_LENGTH && want > 0 && out.n_gen == room)
        fprintf(stderr, "forge run: stopped: the context of %d token%s is full\n", n_ctx,
                cli_plural(n_ctx));
    else if (out.finish == FORGE_FINISH_CANCELLED)
        fprintf(stderr, "forge run: stopped: interrupted\n");
    /* prompt: until the first pick; generation: the picks after it, each one forward step */
    const double t_pp = out.t_first - t_start, t_tg = t_end - out.t_first;
    const int32_t n_decoded = out.n_sampled - 1;
    fprintf(stderr,
            "forge run: prompt %zu token%s in %.3f s (%.1f tok/s); generated %d token%s in %.3f s "
            "(%.1f tok/s)\n",
            n_ids, cli_plural((long long)n_ids), t_pp, (double)n_ids / (t_pp > 0 ? t_pp : 1e-9),
            out.n_gen, cli_plural(out.n_gen), t_tg,
            n_decoded > 0 ? (double)n_decoded / (t_tg > 0 ? t_tg : 1e-9) : 0.0);
    status = 0;
done:
    if (sa_set) sigaction(SIGINT, &old_sa, NULL);
    free(out.gen);
    free(ids);
    forge_engine_free(engine);
    forge_model_free(model);
    return status;
}
