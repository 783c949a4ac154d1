/* cmd_run.c - `forge run`: generate text from a prompt and stream it to stdout; timings to
 * stderr. The prompt gets BOS as the vocabulary says (llama.cpp's behaviour); generation stops
 * at an end-of-generation token, after -n tokens, at the end of the context, or on Ctrl-C. */
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
        "%s",
        engine_opts_help);
}

/* Greedy with no penalties: the pick is the plain argmax, which forge_decode_greedy computes
 * where the logits are (on a GPU only the id comes back). */
static bool pure_greedy(const forge_sampler_params *sp)
{
    bool penalties =
        sp->penalty_last_n > 0 && (sp->repeat_penalty != 1.0f || sp->presence_penalty != 0.0f ||
                                   sp->frequency_penalty != 0.0f);
    return sp->temperature <= 0 && !penalties;
}

int cmd_run(int argc, char **argv)
{
    engine_opts o;
    forge_sampler_params sp = forge_sampler_default_params();
    const char *prompt = NULL;
    long n_predict = -1;
    bool print_ids = false, seed_set = false;
    forge_model *model = NULL;
    forge_context *ctx = NULL;
    forge_sampler *smp = NULL;
    forge_detok_stream *ds = NULL;
    int32_t *ids = NULL, *gen = NULL;
    size_t n_ids = 0;
    int32_t n_gen = 0, n_decoded = 0;
    forge_err err = {0};
    int status = 1;
    struct sigaction old_sa, sa;
    bool sa_set = false;

    engine_opts_init(&o);
    o.default_model = true; /* no -m: $FORGE_MODEL or the bundled demo model */
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
    if ((status = engine_load(&o, "run", &model, &ctx))) goto done;
    status = 1;
    double t_load = cli_now() - t0;
    const forge_tok *tok = forge_model_tok(model);
    const int32_t n_ctx = forge_context_n_ctx(ctx);

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
    if (forge_sampler_create(&sp, forge_model_info_get(model)->n_vocab, &smp, &err) ||
        forge_detok_stream_create(tok, false, &ds, &err)) {
        fprintf(stderr, "forge run: %s\n", err.msg);
        goto done;
    }
    for (size_t i = 0; i < n_ids; i++)
        forge_sampler_accept(smp, ids[i]);
    if (!seed_set && sp.temperature > 0)
        fprintf(stderr, "forge run: seed %llu\n", (unsigned long long)sp.seed);
    fprintf(stderr, "forge run: loaded %s in %.2f s (%s, %s, %d host threads, context %d, KV %s)\n",
            o.model_path, t_load, forge_model_info_get(model)->type_summary,
            forge_context_device(ctx), forge_context_n_threads(ctx), n_ctx,
            forge_kv_type_name(o.cp.kv_type));

    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGINT, &sa, &old_sa) == 0) sa_set = true;
    forge_context_set_abort_flag(ctx, &g_interrupted);

    const bool greedy = pure_greedy(&sp);
    int32_t next = -1; /* the pick of the last decode (on a GPU made on the device) */
    double t_pp = cli_now();
    int rc = greedy ? forge_decode_greedy(ctx, ids, (int32_t)n_ids, &next, &err)
                    : forge_decode_sample(ctx, ids, (int32_t)n_ids, smp, &next, &err);
    t_pp = cli_now() - t_pp;
    if (rc == FORGE_E_INTERRUPTED) {
        fprintf(stderr, "\nforge run: interrupted during the prompt\n");
        status = 130;
        goto done;
    }
    if (rc) {
        fprintf(stderr, "forge run: %s\n", err.msg);
        goto done;
    }
    int64_t room = n_ctx - (int64_t)n_ids + 1; /* tokens we can sample: the last needs no decode */
    int64_t want = n_predict < 0 ? room : n_predict;
    if (n_predict > room)
        fprintf(stderr,
                "forge run: -n %ld goes beyond the context (%d tokens); stopping at the context\n",
                n_predict, n_ctx);
    gen = malloc((size_t)(want > 0 ? want : 1) * sizeof *gen);
    if (!gen) goto done;

    const char *stop = "limit";
    double t_tg = cli_now();
    while (n_gen < want) {
        if (g_interrupted) {
            stop = "interrupted";
            break;
        }
        if (n_gen == room) {
            stop = "context full";
            break;
        }
        int32_t id = next;
        forge_sampler_accept(smp, id);
        if (forge_tok_is_eog(tok, id)) {
            stop = "end of text";
            break;
        }
        gen[n_gen++] = id;
        size_t len;
        const char *piece = forge_detok_stream_push(ds, id, &len);
        if (len) fwrite(piece, 1, len, stdout);
        if (!cli_stdout_ok("run")) goto done; /* reported: no one reads what follows */
        if (n_gen == want) break;
        if (forge_context_pos(ctx) >= n_ctx) {
            stop = "context full";
            break;
        }
        rc = greedy ? forge_decode_greedy(ctx, &id, 1, &next, &err)
                    : forge_decode_sample(ctx, &id, 1, smp, &next, &err);
        if (rc == 0) n_decoded++;
        if (rc == FORGE_E_INTERRUPTED) {
            stop = "interrupted";
            break;
        }
        if (rc) {
            fprintf(stderr, "\nforge run: %s\n", err.msg);
            goto done;
        }
    }
    t_tg = cli_now() - t_tg;
    size_t len;
    const char *rest = forge_detok_stream_flush(ds, &len);
    if (len) fwrite(rest, 1, len, stdout);
    printf("\n");
    if (print_ids) {
        printf("ids:");
        for (int32_t i = 0; i < n_gen; i++)
            printf(" %d", gen[i]);
        printf("\n");
    }
    if (!cli_stdout_ok("run")) goto done;
    if (!strcmp(stop, "context full"))
        fprintf(stderr, "forge run: stopped: the context of %d token%s is full\n", n_ctx,
                cli_plural(n_ctx));
    else if (!strcmp(stop, "interrupted"))
        fprintf(stderr, "forge run: stopped: interrupted\n");
    fprintf(stderr,
            "forge run: prompt %zu token%s in %.3f s (%.1f tok/s); generated %d token%s in %.3f s "
            "(%.1f tok/s)\n",
            n_ids, cli_plural((long long)n_ids), t_pp, (double)n_ids / (t_pp > 0 ? t_pp : 1e-9),
            n_gen, cli_plural(n_gen), t_tg,
            n_decoded > 0 ? (double)n_decoded / (t_tg > 0 ? t_tg : 1e-9) : 0.0);
    status = 0;
done:
    if (sa_set) sigaction(SIGINT, &old_sa, NULL);
    free(gen);
    free(ids);
    forge_detok_stream_free(ds);
    forge_sampler_free(smp);
    forge_context_free(ctx);
    forge_model_free(model);
    return status;
}
