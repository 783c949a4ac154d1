/* bench_parallel.c - `forge bench --parallel`: N streams at once through one forge_engine, the
 * figures llama-batched-bench reports plus the latencies a server sees. All N requests are
 * submitted together at t0, then the engine runs until they are done; every token event is
 * timestamped on the stepping thread.
 *   pp t/s   N x p prompt tokens / (the last request's first token - t0)
 *   tg t/s   aggregate generation: the tokens picked after the last request got its first one,
 *            over that window (the steady state with all N streams decoding; with one stream:
 *            n - 1 tokens over the decode time). "avg_ts" in JSON.
 *   e2e t/s  N x n generated tokens / (the last token - t0)
 *   ttft     per request, its first token - t0: mean and p99 (nearest rank)
 *   itl      per request, the time between consecutive tokens: mean and p99 over all of them */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_parallel.h"
#include "cli_io.h"

bool bench_parse_list(const char *opt, const char *val, long lo, long hi, int32_t *list,
                      int *n_list)
{
    const char *p = val;
    int n = 0;
    bool ok = val && *val;
    while (ok && *p) {
        long v = 0;
        int digits = 0;
        while (*p >= '0' && *p <= '9' && digits < 9) {
            v = v * 10 + (*p++ - '0');
            digits++;
        }
        ok = digits > 0 && v >= lo && v <= hi && n < BENCH_MAX_LIST &&
             (*p == 0 || (*p == ',' && p[1] != 0));
        if (ok) list[n++] = (int32_t)v;
        if (ok && *p == ',') p++;
    }
    if (!ok) {
        fprintf(stderr,
                "forge bench: bad value for %s: '%s' (expected a comma-separated list of at most "
                "%d integers in %ld..%ld, e.g. %s)\n",
                opt, val ? val : "", BENCH_MAX_LIST, lo, hi, lo > 0 ? "1,4,16,64" : "0,4096");
        return false;
    }
    *n_list = n;
    return true;
}

void bench_mean_sd(const double *x, int n, double *mean, double *sd)
{
    double s = 0, s2 = 0;
    for (int i = 0; i < n; i++)
        s += x[i];
    *mean = n > 0 ? s / n : 0;
    for (int i = 0; i < n; i++)
        s2 += (x[i] - *mean) * (x[i] - *mean);
    *sd = n > 1 ? sqrt(s2 / (n - 1)) : 0;
}

/* One request's token times. */
typedef struct stream {
    double *t; /* [n_gen] */
    int32_t n_tok;
    forge_finish finish;
    char error[FORGE_ERR_MSG_MAX];
} stream;

static void on_event(const forge_event *ev, void *user)
{
    stream *s = user;
    if (ev->token >= 0 && s->t) s->t[s->n_tok] = cli_now();
    if (ev->token >= 0) s->n_tok++;
    if (ev->finish != FORGE_FINISH_NONE) {
        s->finish = ev->finish;
        if (ev->error) snprintf(s->error, sizeof s->error, "%s", ev->error);
    }
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static int32_t rand_token(int32_t n_vocab)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (int32_t)(rng_state % (uint64_t)n_vocab);
}

static void random_prompt(const forge_model *m, int32_t *ids, long n)
{
    const forge_tok *tok = forge_model_tok(m);
    const int32_t n_vocab = forge_model_info_get(m)->n_vocab;
    for (long i = 0; i < n; i++)
        ids[i] = rand_token(n_vocab);
    if (forge_tok_adds_bos(tok) && forge_tok_bos(tok) >= 0) ids[0] = forge_tok_bos(tok);
}

/* Submit n_req requests of fresh random prompts and run them; fills st. 0, or 1 (printed). */
static int run_requests(forge_engine *e, const forge_model *m, stream *st, int n_req, long n_prompt,
                        long n_gen, int32_t *ids, double *t0)
{
    forge_err err = {0};
    for (int i = 0; i < n_req; i++) {
        st[i].n_tok = 0;
        st[i].finish = FORGE_FINISH_NONE;
        st[i].error[0] = 0;
        random_prompt(m, ids + (size_t)i * n_prompt, n_prompt);
    }
    *t0 = cli_now();
    for (int i = 0; i < n_req; i++) {
        forge_request_params rp = forge_request_default_params();
        forge_req_id id;
        rp.prompt = ids + (size_t)i * n_prompt;
        rp.n_prompt = (int32_t)n_prompt;
        rp.max_tokens = (int32_t)n_gen;
        rp.ignore_eos = true;
        rp.on_event = on_event;
        rp.user = &st[i];
        if (forge_engine_submit(e, &rp, &id, &err)) {
            fprintf(stderr, "forge bench: %s\n", err.msg);
            return 1;
        }
    }
    if (forge_engine_run(e, &err)) {
        fprintf(stderr, "forge bench: %s\n", err.msg);
        return 1;
    }
    for (int i = 0; i < n_req; i++)
        if (st[i].finish != FORGE_FINISH_LENGTH || st[i].n_tok != n_gen) {
            fprintf(stderr, "forge bench: request %d of %d ended (%s) after %d of %ld tokens%s%s\n",
                    i + 1, n_req, forge_finish_name(st[i].finish), st[i].n_tok, n_gen,
                    st[i].error[0] ? ": " : "", st[i].error);
            return 1;
        }
    return 0;
}

typedef struct par_result {
    int32_t n_parallel;
    double *tg;    /* aggregate generation tok/s of each run */
    int runs;
    double tg_mean, tg_sd, pp, e2e;   /* pp and e2e: means over the runs */
    double ttft_mean, ttft_p99;       /* ms, over every request of every run */
    double itl_mean, itl_p99;         /* ms, over every gap of every run */
    forge_engine_info info;
    uint64_t n_preempted;
} par_result;

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* mean and p99 (nearest rank) of v[0..n) in ms; sorts v */
static void mean_p99(double *v, size_t n, double *mean, double *p99)
{
    double s = 0;
    *mean = *p99 = 0;
    if (n == 0) return;
    for (size_t i = 0; i < n; i++)
        s += v[i];
    qsort(v, n, sizeof *v, cmp_double);
    size_t rank = (size_t)ceil(0.99 * (double)n);
    *mean = s / (double)n * 1e3;
    *p99 = v[rank > 0 ? rank - 1 : 0] * 1e3;
}

/* One N: engine, warm-up, reps runs. 0, or 1 (printed). */
static int bench_one(engine_opts *o, forge_model *m, int32_t n_par, long n_prompt, long n_gen,
                     long reps, par_result *res)
{
    forge_engine *e = NULL;
    stream *st = NULL;
    int32_t *ids = NULL;
    double *ttft = NULL, *itl = NULL;
    size_t n_ttft = 0, n_itl = 0;
    int status = 1;

    forge_engine_params ep = engine_params_of(o);
    const int32_t bs = ep.block_size ? ep.block_size : 16;
    ep.n_parallel = n_par;
    ep.n_ctx = (int32_t)(n_prompt + n_gen);
    /* whole blocks per request: a pool of N x (p + n) tokens never preempts */
    if (!o->kv_size) ep.kv_size = n_par * (int32_t)((n_prompt + n_gen + bs - 1) / bs) * bs;
    if (ep.n_batch < n_par) ep.n_batch = n_par; /* every stream decodes in every step */
    if (engine_create_cli(o, "bench", m, &ep, &e)) goto done;
    forge_engine_get_info(e, &res->info);

    st = calloc((size_t)n_par, sizeof *st);
    ids = malloc((size_t)n_par * (size_t)n_prompt * sizeof *ids);
    ttft = malloc((size_t)n_par * (size_t)reps * sizeof *ttft);
    itl = malloc((size_t)n_par * (size_t)reps * (size_t)(n_gen > 1 ? n_gen - 1 : 1) * sizeof *itl);
    res->tg = calloc((size_t)reps, sizeof *res->tg);
    if (!st || !ids || !ttft || !itl || !res->tg) {
        fprintf(stderr, "forge bench: out of memory\n");
        goto done;
    }
    for (int i = 0; i < n_par; i++)
        if (!(st[i].t = malloc((size_t)n_gen * sizeof *st[i].t))) {
            fprintf(stderr, "forge bench: out of memory\n");
            goto done;
        }
    /* warm-up, untimed: the N prompts and two tokens each touch every weight (page cache,
     * device, thread pool) and every kernel the timed prompt and decode steps launch (a GPU
     * loads a kernel at its first launch) */
    double t0;
    const long wn = n_gen < 2 ? n_gen : 2;
    if (run_requests(e, m, st, n_par, n_prompt, wn, ids, &t0)) goto done;
    forge_engine_stats before;
    forge_engine_get_stats(e, &before);

    double pp_sum = 0, e2e_sum = 0;
    for (long r = 0; r < reps; r++) {
        if (run_requests(e, m, st, n_par, n_prompt, n_gen, ids, &t0)) goto done;
        double last_first = t0, last = t0;
        for (int i = 0; i < n_par; i++) {
            if (st[i].t[0] > last_first) last_first = st[i].t[0];
            if (st[i].t[n_gen - 1] > last) last = st[i].t[n_gen - 1];
            ttft[n_ttft++] = st[i].t[0] - t0;
            for (long k = 1; k < n_gen; k++)
                itl[n_itl++] = st[i].t[k] - st[i].t[k - 1];
        }
        long after = 0;
        for (int i = 0; i < n_par; i++)
            for (long k = 0; k < n_gen; k++)
                after += st[i].t[k] > last_first;
        const double total = (double)n_par * (double)n_gen;
        const double e2e = total / (last > t0 ? last - t0 : 1e-9);
        res->tg[res->runs++] =
            after > 0 && last > last_first ? (double)after / (last - last_first) : e2e;
        pp_sum += (double)n_par * (double)n_prompt / (last_first > t0 ? last_first - t0 : 1e-9);
        e2e_sum += e2e;
    }
    forge_engine_stats after_st;
    forge_engine_get_stats(e, &after_st);
    res->n_preempted = after_st.n_preempted - before.n_preempted;
    bench_mean_sd(res->tg, res->runs, &res->tg_mean, &res->tg_sd);
    res->pp = pp_sum / res->runs;
    res->e2e = e2e_sum / res->runs;
    mean_p99(ttft, n_ttft, &res->ttft_mean, &res->ttft_p99);
    mean_p99(itl, n_itl, &res->itl_mean, &res->itl_p99);
    res->n_parallel = n_par;
    status = 0;
done:
    for (int i = 0; st && i < n_par; i++)
        free(st[i].t);
    free(st);
    free(ids);
    free(ttft);
    free(itl);
    forge_engine_free(e);
    return status;
}

int bench_parallel(engine_opts *o, const int32_t *list, int n_list, long n_prompt, long n_gen,
                   long reps, bool json)
{
    forge_model *model = NULL;
    par_result res[BENCH_MAX_LIST];
    int status = 1, n_res = 0;
    memset(res, 0, sizeof res);
    if ((status = engine_load_model(o, "bench", &model))) goto done;
    status = 1;
    for (int k = 0; k < n_list; k++) {
        if (bench_one(o, model, list[k], n_prompt, n_gen, reps, &res[k])) {
            n_res = k + 1;
            goto done;
        }
        n_res = k + 1;
        if (res[k].n_preempted)
            fprintf(stderr, "forge bench: note: %d streams: %llu preemption%s (the KV pool is short)\n",
                    list[k], (unsigned long long)res[k].n_preempted,
                    res[k].n_preempted == 1 ? "" : "s");
    }

    const forge_model_info *mi = forge_model_info_get(model);
    char model_name[160], test[64];
    snprintf(model_name, sizeof model_name, "%s %s", mi->arch, mi->type_summary);
    snprintf(test, sizeof test, "pp%ld+tg%ld", n_prompt, n_gen);
    double base = 0; /* aggregate generation of one stream, when measured */
    for (int k = 0; k < n_res; k++)
        if (res[k].n_parallel == 1) base = res[k].tg_mean;
    if (json) {
        printf("[\n");
        for (int k = 0; k < n_res; k++) {
            const par_result *r = &res[k];
            printf("%s  {\"model\": ", k ? ",\n" : "");
            cli_print_json_str(model_name);
            printf(", \"model_file\": ");
            cli_print_json_str(o->model_path);
            printf(", \"model_size\": %llu, \"model_n_params\": %llu, \"backend\": \"%s\", ",
                   (unsigned long long)mi->weight_bytes, (unsigned long long)mi->n_params,
                   r->info.device);
            if (o->cp.n_threads)
                printf("\"n_threads\": %d, ", o->cp.n_threads);
            else
                printf("\"n_threads\": null, "); /* the library's default, not reported */
            printf("\"kv_type\": \"%s\", \"n_batch\": %d, \"block_size\": %d, \"kv_size\": %d, "
                   "\"build\": \"%s\", \"n_parallel\": %d, \"test\": \"%s\", \"n_prompt\": %ld, "
                   "\"n_gen\": %ld, \"avg_ts\": %.6f, \"stddev_ts\": %.6f, \"samples_ts\": [",
                   forge_kv_type_name(r->info.kv_type), r->info.n_batch,
                   r->info.block_size, r->info.kv_size, forge_version(), r->n_parallel, test,
                   n_prompt, n_gen, r->tg_mean, r->tg_sd);
            for (int i = 0; i < r->runs; i++)
                printf("%s%.6f", i ? ", " : "", r->tg[i]);
            printf("], \"pp_ts\": %.6f, \"e2e_ts\": %.6f, \"ttft_ms\": %.4f, \"ttft_p99_ms\": %.4f, "
                   "\"itl_ms\": %.4f, \"itl_p99_ms\": %.4f, \"n_preempted\": %llu",
                   r->pp, r->e2e, r->ttft_mean, r->ttft_p99, r->itl_mean, r->itl_p99,
                   (unsigned long long)r->n_preempted);
            if (base > 0) printf(", \"speedup_vs_1\": %.4f", r->tg_mean / base);
            printf("}");
        }
        printf("\n]\n");
    } else {
        char threads[64];
        printf("model %s, %s, %s, KV %s, blocks of %d, -b %d\n\n", model_name,
               n_res ? res[0].info.device : "?", engine_threads_desc(o, threads, sizeof threads),
               forge_kv_type_name(o->cp.kv_type), n_res ? res[0].info.block_size : 0,
               n_res ? res[0].info.n_batch : 0);
        printf("| %8s | %-14s | %10s | %20s | %6s | %10s | %20s | %20s |\n", "parallel", "test",
               "pp t/s", "tg t/s", "x1", "e2e t/s", "ttft ms mean / p99", "itl ms mean / p99");
        printf("| -------: | -------------- | ---------: | -------------------: | -----: | "
               "---------: | -------------------: | -------------------: |\n");
        for (int k = 0; k < n_res; k++) {
            const par_result *r = &res[k];
            char tg[48], x1[16], ttft[48], itl[48];
            snprintf(tg, sizeof tg, "%.2f ± %.2f", r->tg_mean, r->tg_sd);
            snprintf(x1, sizeof x1, base > 0 ? "%.2f" : "-", r->tg_mean / (base > 0 ? base : 1));
            snprintf(ttft, sizeof ttft, "%.1f / %.1f", r->ttft_mean, r->ttft_p99);
            snprintf(itl, sizeof itl, "%.1f / %.1f", r->itl_mean, r->itl_p99);
            printf("| %8d | %-14s | %10.2f | %21s | %6s | %10.2f | %20s | %20s |\n", r->n_parallel,
                   test, r->pp, tg, x1, r->e2e, ttft, itl);
        }
    }
    status = 0;
done:
    for (int k = 0; k < n_res; k++)
        free(res[k].tg);
    forge_model_free(model);
    return status;
}
