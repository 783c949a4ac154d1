/* cmd_bench.c - `forge bench`: prompt processing (pp: one batch of p tokens) and generation
 * (tg: n single-token decodes) speed, each from an empty KV cache, as mean +/- sd over r runs
 * after one warm-up, in a table like llama-bench's or as JSON. Also the weight bytes one
 * generated token reads and the bandwidth that implies. tg decodes with forge_decode_greedy (a
 * greedy pick per token, made on the device where there is one, as a generator would). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "commands.h"
#include "engine_opts.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: forge bench -m MODEL [-p 512] [-n 128] [-r 3] [--json] [options]\n"
            "  -p, --n-prompt N     prompt tokens of the pp test (0: skip)\n"
            "  -n, --n-gen N        generated tokens of the tg test (0: skip)\n"
            "  -r, --repetitions N  runs of each test (after one warm-up)\n"
            "  --json               print JSON instead of the table\n"
            "%s",
            engine_opts_help);
}

typedef struct bench_result {
    const char *kind; /* "pp" or "tg" */
    long n;
    double *ts; /* tok/s of each run */
    int runs;
    double mean, sd;
} bench_result;

static uint64_t rng_state = 0x2545f4914f6cdd1dull;

static int32_t rand_token(int32_t n_vocab)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (int32_t)(rng_state % (uint64_t)n_vocab);
}

/* One run; returns seconds, or < 0 on error (printed). */
static double run_once(forge_context *ctx, const forge_model *m, const char *kind, long n,
                       int32_t *buf)
{
    forge_err err = {0};
    const forge_tok *tok = forge_model_tok(m);
    const int32_t n_vocab = forge_model_info_get(m)->n_vocab;
    const int32_t bos =
        forge_tok_adds_bos(tok) && forge_tok_bos(tok) >= 0 ? forge_tok_bos(tok) : -1;
    if (forge_kv_truncate(ctx, 0, &err)) goto fail;
    for (long i = 0; i < n; i++)
        buf[i] = rand_token(n_vocab);
    if (bos >= 0) buf[0] = bos;
    double t0 = cli_now();
    if (!strcmp(kind, "pp")) {
        if (forge_decode(ctx, buf, (int32_t)n, false, &err)) goto fail;
    } else {
        /* greedy decode: where the backend can, the argmax runs there and only the id comes
         * back (the ids fed in stay the random ones) */
        int32_t next;
        for (long i = 0; i < n; i++)
            if (forge_decode_greedy(ctx, &buf[i], 1, &next, &err)) goto fail;
    }
    return cli_now() - t0;
fail:
    fprintf(stderr, "forge bench: %s\n", err.msg);
    return -1;
}

static void json_str(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            printf("\\%c", *s);
        else if ((unsigned char)*s < 0x20)
            printf("\\u%04x", *s);
        else
            putchar(*s);
    }
    putchar('"');
}

int cmd_bench(int argc, char **argv)
{
    engine_opts o;
    long n_prompt = 512, n_gen = 128, reps = 3;
    bool json = false, ctx_given = false;
    forge_model *model = NULL;
    forge_context *ctx = NULL;
    int32_t *buf = NULL;
    bench_result res[2] = {{"pp", 0, NULL, 0, 0, 0}, {"tg", 0, NULL, 0, 0, 0}};
    int status = 1;

    engine_opts_init(&o);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-c") || !strcmp(a, "--ctx-size")) ctx_given = true;
        int r = engine_opts_parse(&o, "bench", argc, argv, &i);
        if (r < 0) return 2;
        if (r > 0) continue;
        const char *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "-p") || !strcmp(a, "--n-prompt")) {
            if (!cli_parse_int("bench", a, val, 0, 1 << 20, &n_prompt)) return 2;
            i++;
        } else if (!strcmp(a, "-n") || !strcmp(a, "--n-gen")) {
            if (!cli_parse_int("bench", a, val, 0, 1 << 20, &n_gen)) return 2;
            i++;
        } else if (!strcmp(a, "-r") || !strcmp(a, "--repetitions")) {
            if (!cli_parse_int("bench", a, val, 1, 1000, &reps)) return 2;
            i++;
        } else if (!strcmp(a, "--json")) {
            json = true;
        } else {
            fprintf(stderr, "forge bench: unknown option or missing value '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }
    long need = n_prompt > n_gen ? n_prompt : n_gen;
    if (need < 1) need = 1;
    if (!ctx_given) o.cp.n_ctx = (int32_t)need;
    if (o.cp.n_batch == 0 || o.cp.n_batch < n_prompt)
        o.cp.n_batch = (int32_t)(n_prompt > 0 ? n_prompt : 1);
    if ((status = engine_load(&o, "bench", &model, &ctx))) goto done;
    status = 1;
    if (need > forge_context_n_ctx(ctx)) {
        fprintf(stderr, "forge bench: the tests need %ld positions, the context has %d\n", need,
                forge_context_n_ctx(ctx));
        goto done;
    }
    buf = malloc((size_t)need * sizeof *buf);
    res[0].n = n_prompt;
    res[1].n = n_gen;
    for (int k = 0; k < 2; k++) {
        res[k].ts = calloc((size_t)reps, sizeof(double));
        if (!buf || !res[k].ts) goto done;
        if (res[k].n == 0) continue;
        if (run_once(ctx, model, res[k].kind, res[k].n, buf) < 0) goto done; /* warm-up */
        for (long r = 0; r < reps; r++) {
            double dt = run_once(ctx, model, res[k].kind, res[k].n, buf);
            if (dt < 0) goto done;
            res[k].ts[res[k].runs++] = (double)res[k].n / dt;
        }
        double s = 0, s2 = 0;
        for (int r = 0; r < res[k].runs; r++)
            s += res[k].ts[r];
        res[k].mean = s / res[k].runs;
        for (int r = 0; r < res[k].runs; r++)
            s2 += (res[k].ts[r] - res[k].mean) * (res[k].ts[r] - res[k].mean);
        res[k].sd = res[k].runs > 1 ? sqrt(s2 / (res[k].runs - 1)) : 0;
    }

    const forge_model_info *mi = forge_model_info_get(model);
    char model_name[160];
    snprintf(model_name, sizeof model_name, "%s %s", mi->arch, mi->type_summary);
    const double bpt = (double)mi->bytes_per_token;
    if (json) {
        printf("[\n");
        bool first = true;
        for (int k = 0; k < 2; k++) {
            if (res[k].n == 0) continue;
            printf("%s  {\"model\": ", first ? "" : ",\n");
            json_str(model_name);
            printf(", \"model_file\": ");
            json_str(o.model_path);
            printf(", \"model_size\": %llu, \"model_n_params\": %llu, \"backend\": \"%s\", "
                   "\"n_threads\": %d, "
                   "\"kv_type\": \"%s\", \"test\": \"%s%ld\", \"n_prompt\": %ld, \"n_gen\": %ld, "
                   "\"avg_ts\": %.6f, \"stddev_ts\": %.6f, \"samples_ts\": [",
                   (unsigned long long)mi->weight_bytes, (unsigned long long)mi->n_params,
                   forge_context_device(ctx), forge_context_n_threads(ctx),
                   forge_kv_type_name(o.cp.kv_type), res[k].kind, res[k].n,
                   k == 0 ? res[k].n : 0L, k == 1 ? res[k].n : 0L, res[k].mean, res[k].sd);
            for (int r = 0; r < res[k].runs; r++)
                printf("%s%.6f", r ? ", " : "", res[k].ts[r]);
            printf("]");
            if (k == 1)
                printf(", \"weight_bytes_per_token\": %.0f, \"gb_per_s\": %.4f", bpt,
                       bpt * res[k].mean / 1e9);
            printf("}");
            first = false;
        }
        printf("\n]\n");
    } else {
        printf("| %-28s | %11s | %9s | %-7s | %7s | %8s | %20s |\n", "model", "size", "params",
               "backend", "threads", "test", "t/s");
        printf("| ---------------------------- | ----------: | --------: | ------- | ------: | "
               "-------: | -------------------: |\n");
        for (int k = 0; k < 2; k++) {
            if (res[k].n == 0) continue;
            char test[32], ts[48], size[32], params[32];
            snprintf(test, sizeof test, "%s%ld", res[k].kind, res[k].n);
            snprintf(ts, sizeof ts, "%.2f ± %.2f", res[k].mean, res[k].sd);
            double mib = (double)mi->weight_bytes / (1024.0 * 1024.0);
            if (mib >= 1024)
                snprintf(size, sizeof size, "%.2f GiB", mib / 1024.0);
            else
                snprintf(size, sizeof size, "%.2f MiB", mib);
            if (mi->n_params >= 1000000000ull)
                snprintf(params, sizeof params, "%.2f B", (double)mi->n_params / 1e9);
            else
                snprintf(params, sizeof params, "%.2f M", (double)mi->n_params / 1e6);
            printf("| %-28s | %11s | %9s | %-7s | %7d | %8s | %21s |\n", model_name, size, params,
                   forge_context_device(ctx), forge_context_n_threads(ctx), test, ts);
        }
        if (res[1].n > 0)
            printf("\ngeneration reads %.2f MiB of weights per token: %.2f GB/s at %.2f tok/s\n",
                   bpt / (1024.0 * 1024.0), bpt * res[1].mean / 1e9, res[1].mean);
    }
    status = 0;
done:
    free(buf);
    free(res[0].ts);
    free(res[1].ts);
    forge_context_free(ctx);
    forge_model_free(model);
    return status;
}
