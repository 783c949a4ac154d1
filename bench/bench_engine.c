/* bench_engine.c - aggregate throughput of the engine core (include/forge_engine.h): N streams of
 * a prompt of P random tokens each, generating G tokens each (ignore_eos), all submitted at once,
 * greedy. Prints per N the wall time, the aggregate generated tokens per second, the prompt
 * tokens per second of the whole run and the mean time to first token. A benchmark, not a test.
 *
 *   bench_engine MODEL [-N 1,4,16] [-p 128] [-n 128] [-t THREADS] [-b N_BATCH]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "forge.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

typedef struct stream {
    double t_submit, t_first;
    int n;
} stream;

static void on_event(const forge_event *ev, void *user)
{
    stream *s = user;
    if (ev->token >= 0 && s->n++ == 0) s->t_first = now_s();
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: bench_engine MODEL [-N 1,4,16] [-p 128] [-n 128] [-t T] [-b B]\n");
        return 2;
    }
    const char *path = argv[1], *list = "1,4,16";
    int P = 128, G = 128, T = 2, B = 512;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "-N")) list = argv[i + 1];
        else if (!strcmp(argv[i], "-p")) P = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-n")) G = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-t")) T = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-b")) B = atoi(argv[i + 1]);
    }
    forge_err err = {0};
    forge_model *m = NULL;
    if (forge_model_load(path, &m, &err)) {
        fprintf(stderr, "bench_engine: %s\n", err.msg);
        return 1;
    }
    const int32_t V = forge_model_info_get(m)->n_vocab;
    char buf[256];
    snprintf(buf, sizeof buf, "%s", list);
    for (char *tokn = strtok(buf, ","); tokn; tokn = strtok(NULL, ",")) {
        int N = atoi(tokn);
        forge_engine_params ep = forge_engine_default_params();
        ep.n_threads = T;
        ep.n_parallel = N;
        ep.n_batch = B;
        ep.n_ctx = P + G;
        ep.kv_size = N * (P + G);
        forge_engine *e = NULL;
        if (forge_engine_create(m, &ep, &e, &err)) {
            fprintf(stderr, "bench_engine: %s\n", err.msg);
            return 1;
        }
        int32_t *prompts = malloc((size_t)N * P * sizeof *prompts);
        stream *st = calloc((size_t)N, sizeof *st);
        uint64_t x = 12345;
        for (int i = 0; i < N * P; i++) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            prompts[i] = 3 + (int32_t)((x >> 33) % (uint64_t)(V - 3));
        }
        double t0 = now_s();
        for (int i = 0; i < N; i++) {
            forge_request_params rp = forge_request_default_params();
            rp.prompt = prompts + (size_t)i * P;
            rp.n_prompt = P;
            rp.max_tokens = G;
            rp.ignore_eos = true;
            rp.on_event = on_event;
            rp.user = &st[i];
            forge_req_id id;
            st[i].t_submit = now_s();
            if (forge_engine_submit(e, &rp, &id, &err)) {
                fprintf(stderr, "bench_engine: %s\n", err.msg);
                return 1;
            }
        }
        if (forge_engine_run(e, &err)) {
            fprintf(stderr, "bench_engine: %s\n", err.msg);
            return 1;
        }
        double wall = now_s() - t0, ttft = 0, last_first = 0;
        long gen = 0;
        for (int i = 0; i < N; i++) {
            gen += st[i].n;
            ttft += st[i].t_first - st[i].t_submit;
            if (st[i].t_first - t0 > last_first) last_first = st[i].t_first - t0;
        }
        /* generation rate: tokens after each stream's first over the time after the last
         * first token (the prompts are done by then) */
        double t_gen = wall - last_first;
        printf("N=%-3d pp%d+tg%d  wall %.2f s  aggregate %.1f tok/s generated (%.1f after the "
               "prompts), prompt %.1f tok/s, mean ttft %.0f ms\n",
               N, P, G, wall, gen / wall, t_gen > 0 ? (gen - N) / t_gen : 0.0,
               N * P / (last_first > 0 ? last_first : 1e-9), 1000 * ttft / N);
        free(prompts);
        free(st);
        forge_engine_free(e);
    }
    forge_model_free(m);
    return 0;
}
