/* test_engine_core.c - the engine core (include/forge_engine.h, src/engine/engine.c) on the CPU
 * with stories260K (and its Q8_0/Q4_0 mixes): many requests at once give exactly the ids each
 * gives alone and what the single-sequence path (forge_context + forge_decode_greedy /
 * forge_decode_sample, `forge run`'s loop) gives; prefix-cache hits equal misses; a pool too
 * small for all requests completes them through preemption; random submit/cancel runs end every
 * request exactly once with the pool empty; sampling with a seed; stop strings, max_tokens,
 * end of generation, logprobs, logit bias; bad input; the engine's own thread; two engines on
 * one model. */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cpu/kernels.h"
#include "engine/engine_internal.h"
#include "quant/quantize.h"
#include "forge.h"
#include "testutil.h"

#define MODEL "testdata/models/stories260K.gguf"
#define MODEL_Q8 "testdata/models/stories260K-Q8_0-mix.gguf"
#define MODEL_Q4 "testdata/models/stories260K-Q4_0-mix.gguf"
#define MAX_GEN 512
#define N_OF(a) (sizeof(a) / sizeof((a)[0]))

/* ---- what a request received ---- */

typedef struct got {
    forge_req_id id;
    int32_t ids[MAX_GEN];
    int32_t n_ids;
    int32_t n_events, n_final;
    forge_finish finish;
    char text[8192];
    size_t text_len;
    size_t emitted_at[MAX_GEN]; /* text emitted after each event */
    float logprob[MAX_GEN];
    forge_token_logprob top[MAX_GEN][4];
    int32_t n_top[MAX_GEN];
    int32_t n_prompt, n_cached, n_generated;
    char error[256];
    char bad[64];
} got;

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER;
static int g_finals; /* final events seen (threads) */

/* Records what came; a protocol violation is noted in g->bad (checked by the tests: asserting
 * here would jump out of the engine's step with the lock held). */
static void on_event(const forge_event *ev, void *user)
{
    got *g = user;
    pthread_mutex_lock(&g_mu);
    if (g->n_final) snprintf(g->bad, sizeof g->bad, "an event after the last one");
    if (ev->id != g->id && g->id != 0) snprintf(g->bad, sizeof g->bad, "wrong id");
    int32_t k = g->n_events++;
    if (ev->token >= 0 && g->n_ids < MAX_GEN) {
        g->logprob[g->n_ids] = ev->logprob;
        g->n_top[g->n_ids] = ev->n_top;
        for (int32_t i = 0; i < ev->n_top && i < 4; i++)
            g->top[g->n_ids][i] = ev->top[i];
        g->ids[g->n_ids++] = ev->token;
    }
    if (g->text_len + ev->text_len < sizeof g->text) {
        memcpy(g->text + g->text_len, ev->text, ev->text_len);
        g->text_len += ev->text_len;
    } else {
        snprintf(g->bad, sizeof g->bad, "too much text");
    }
    if (k < MAX_GEN) g->emitted_at[k] = g->text_len;
    g->n_prompt = ev->n_prompt;
    g->n_cached = ev->n_cached;
    g->n_generated = ev->n_generated;
    if (ev->finish != FORGE_FINISH_NONE) {
        g->n_final++;
        g->finish = ev->finish;
        if (ev->error) snprintf(g->error, sizeof g->error, "%s", ev->error);
        g_finals++;
        pthread_cond_broadcast(&g_cv);
    }
    pthread_mutex_unlock(&g_mu);
}

/* ---- helpers ---- */

static forge_model *load(const char *rel)
{
    char *path = tu_require_shared(rel);
    forge_model *m = NULL;
    forge_err err = {0};
    if (forge_model_load(path, &m, &err)) fail_msg("load %s: %s", path, err.msg);
    free(path);
    return m;
}

static forge_engine_params eparams(int32_t n_parallel, int32_t n_batch, int32_t kv_size)
{
    forge_engine_params p = forge_engine_default_params();
    p.n_threads = 2;
    p.n_parallel = n_parallel;
    p.n_batch = n_batch;
    p.kv_size = kv_size;
    p.n_ctx = 512; /* stories260K says 128; these prompts are longer (RoPE has no limit) */
    return p;
}

static forge_engine *make_engine(forge_model *m, const forge_engine_params *p)
{
    forge_engine *e = NULL;
    forge_err err = {0};
    if (forge_engine_create(m, p, &e, &err)) fail_msg("engine: %s", err.msg);
    return e;
}

static void check_pool(forge_engine *e)
{
    forge_err err = {0};
    if (engine_check(e, &err)) fail_msg("engine_check: %s", err.msg);
}

static forge_request_params rparams(const int32_t *prompt, int32_t n, int32_t max_tokens, got *g)
{
    forge_request_params p = forge_request_default_params();
    p.prompt = prompt;
    p.n_prompt = n;
    p.max_tokens = max_tokens;
    p.on_event = on_event;
    p.user = g;
    return p;
}

static forge_req_id submit(forge_engine *e, const forge_request_params *p)
{
    forge_req_id id = 0;
    forge_err err = {0};
    got *g = p->user;
    pthread_mutex_lock(&g_mu); /* the first event waits until g->id is set */
    int rc = forge_engine_submit(e, p, &id, &err);
    g->id = id;
    pthread_mutex_unlock(&g_mu);
    if (rc) fail_msg("submit: %s", err.msg);
    assert_true(id > 0);
    return id;
}

static void run(forge_engine *e)
{
    forge_err err = {0};
    if (forge_engine_run(e, &err)) fail_msg("run: %s", err.msg);
    check_pool(e);
}

/* Deterministic prompts: BOS + pseudo-random ids (no BOS/EOS inside). */
static int32_t make_prompt(const forge_model *m, uint64_t seed, int32_t n, int32_t *out)
{
    const int32_t V = forge_model_info_get(m)->n_vocab;
    const forge_tok *tok = forge_model_tok(m);
    uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
    out[0] = forge_tok_bos(tok) >= 0 ? forge_tok_bos(tok) : 1;
    for (int32_t i = 1; i < n; i++) {
        int32_t id;
        do
            id = (int32_t)(tu_rand_u64(&s) % (uint64_t)V);
        while (forge_tok_is_eog(tok, id) || id == out[0] ||
               forge_tok_token_type(tok, id) == FORGE_TOK_CONTROL);
        out[i] = id;
    }
    return n;
}

static int32_t encode(const forge_model *m, const char *text, int32_t *out, int32_t cap)
{
    int32_t *ids = NULL;
    size_t n = 0;
    forge_err err = {0};
    if (forge_tok_encode(forge_model_tok(m), text, strlen(text), true, false, &ids, &n, &err))
        fail_msg("encode: %s", err.msg);
    assert_true((int32_t)n <= cap);
    memcpy(out, ids, n * sizeof *ids);
    free(ids);
    return (int32_t)n;
}

/* `forge run`'s loop (tools/forge/cmd_run.c) through the single-sequence API: the prompt fills
 * the sampler's window, pure greedy goes through forge_decode_greedy, anything else through
 * forge_decode_sample; an end-of-generation token ends it (not counted, unless ignore_eos);
 * at most max ids. Returns the number of ids. */
static int32_t reference(forge_model *m, const int32_t *prompt, int32_t n_prompt,
                         const forge_sampler_params *sp, int32_t max, bool ignore_eos,
                         int32_t *out)
{
    forge_err err = {0};
    forge_context_params cp = forge_context_default_params();
    cp.n_threads = 2;
    cp.n_ctx = n_prompt + max + 1;
    forge_context *ctx = NULL;
    if (forge_context_create(m, &cp, &ctx, &err)) fail_msg("context: %s", err.msg);
    forge_sampler *s = NULL;
    assert_int_equal(forge_sampler_create(sp, forge_model_info_get(m)->n_vocab, &s, &err), 0);
    for (int32_t i = 0; i < n_prompt; i++)
        forge_sampler_accept(s, prompt[i]);
    const bool greedy = sp->temperature <= 0 &&
                        !(sp->penalty_last_n > 0 &&
                          (sp->repeat_penalty != 1.0f || sp->presence_penalty != 0.0f ||
                           sp->frequency_penalty != 0.0f));
    int32_t next = -1, n = 0;
    int rc = greedy ? forge_decode_greedy(ctx, prompt, n_prompt, &next, &err)
                    : forge_decode_sample(ctx, prompt, n_prompt, s, &next, &err);
    if (rc) fail_msg("decode: %s", err.msg);
    while (n < max) {
        int32_t id = next;
        forge_sampler_accept(s, id);
        if (!ignore_eos && forge_tok_is_eog(forge_model_tok(m), id)) break;
        out[n++] = id;
        if (n == max) break;
        rc = greedy ? forge_decode_greedy(ctx, &id, 1, &next, &err)
                    : forge_decode_sample(ctx, &id, 1, s, &next, &err);
        if (rc) fail_msg("decode: %s", err.msg);
    }
    forge_sampler_free(s);
    forge_context_free(ctx);
    return n;
}

static forge_sampler_params greedy_params(void)
{
    forge_sampler_params sp = forge_sampler_default_params();
    sp.temperature = 0;
    return sp;
}

static void assert_ids(const got *g, const int32_t *ref, int32_t n_ref, const char *what, int i)
{
    if (g->bad[0]) fail_msg("%s %d: %s", what, i, g->bad);
    if (g->n_final != 1) fail_msg("%s %d: %d last events", what, i, g->n_final);
    if (g->n_ids != n_ref || memcmp(g->ids, ref, (size_t)n_ref * sizeof *ref) != 0) {
        int32_t k = 0;
        while (k < n_ref && k < g->n_ids && g->ids[k] == ref[k])
            k++;
        fail_msg("%s %d: %d ids, reference %d; first difference at %d (%d vs %d)", what, i,
                 g->n_ids, n_ref, k, k < g->n_ids ? g->ids[k] : -1, k < n_ref ? ref[k] : -1);
    }
}

/* ---- 1. batch invariance: 32 prompts together = alone = the single-sequence path ---- */

#define N_REQ 32

/* The ids, and the logprobs (so the logits) of every token bit for bit, together and alone. */
static void many_together(const char *model_rel, int32_t n_batch, int32_t max_tokens)
{
    forge_model *m = load(model_rel);
    static int32_t prompts[N_REQ][160];
    int32_t lens[N_REQ];
    got *together = calloc(N_REQ, sizeof *together), *alone = calloc(1, sizeof *alone);
    int32_t *ref = malloc(MAX_GEN * sizeof *ref);
    for (int i = 0; i < N_REQ; i++)
        lens[i] = make_prompt(m, (uint64_t)i + 7, 2 + (i * 37) % 150, prompts[i]);
    forge_engine_params ep = eparams(N_REQ, n_batch, N_REQ * 320);
    forge_engine *e = make_engine(m, &ep);
    for (int i = 0; i < N_REQ; i++) {
        forge_request_params rp = rparams(prompts[i], lens[i], max_tokens, &together[i]);
        rp.logprobs = true; /* compared bit for bit: the logits, not only the argmax */
        submit(e, &rp);
    }
    run(e);
    forge_engine_stats st;
    forge_engine_get_stats(e, &st);
    assert_int_equal(st.blocks_used, 0);
    assert_int_equal(st.n_running + st.n_waiting, 0);
    assert_true(st.n_steps < (uint64_t)(N_REQ * (max_tokens + 1))); /* it did batch */
    forge_sampler_params sp = greedy_params();
    for (int i = 0; i < N_REQ; i++) {
        assert_int_equal(together[i].n_final, 1);
        assert_true(together[i].finish == FORGE_FINISH_LENGTH ||
                    together[i].finish == FORGE_FINISH_STOP);
        /* alone, same engine parameters */
        memset(alone, 0, sizeof *alone);
        forge_request_params rp = rparams(prompts[i], lens[i], max_tokens, alone);
        rp.logprobs = true;
        submit(e, &rp);
        run(e);
        assert_ids(&together[i], alone->ids, alone->n_ids, "together vs alone", i);
        for (int32_t k = 0; k < alone->n_ids; k++)
            if (memcmp(&together[i].logprob[k], &alone->logprob[k], sizeof(float)))
                fail_msg("%s request %d token %d: logprob %.9g together, %.9g alone", model_rel,
                         i, k, (double)together[i].logprob[k], (double)alone->logprob[k]);
        /* the single-sequence path */
        int32_t n_ref = reference(m, prompts[i], lens[i], &sp, max_tokens, false, ref);
        assert_ids(&together[i], ref, n_ref, "engine vs forge_decode_greedy", i);
    }
    forge_engine_free(e);
    forge_model_free(m);
    free(together);
    free(alone);
    free(ref);
}

static void test_batch_invariance(void **state)
{
    (void)state;
    many_together(MODEL, 48, 40);
}

static void test_batch_invariance_q8(void **state)
{
    (void)state;
    many_together(MODEL_Q8, 40, 24);
}

static void test_batch_invariance_q4(void **state)
{
    (void)state;
    many_together(MODEL_Q4, 64, 24);
}

/* ---- 2. prefix cache: a hit gives the ids of a miss ---- */

static void prefix_run(forge_model *m, bool no_cache, const int32_t *a, int32_t na,
                       const int32_t *b, int32_t nb, got *ga, got *gb, forge_engine_stats *st)
{
    forge_engine_params ep = eparams(4, 32, 2048);
    ep.no_prefix_cache = no_cache;
    forge_engine *e = make_engine(m, &ep);
    forge_request_params rp = rparams(a, na, 20, ga);
    submit(e, &rp);
    run(e);
    rp = rparams(b, nb, 30, gb);
    submit(e, &rp);
    run(e);
    forge_engine_get_stats(e, st);
    forge_engine_free(e);
}

static void test_prefix_cache(void **state)
{
    (void)state;
    forge_model *m = load(MODEL);
    int32_t a[140], b[140], ref[64];
    make_prompt(m, 99, 140, a);
    memcpy(b, a, 100 * sizeof *a);
    make_prompt(m, 100, 40, b + 100); /* diverges after 100 tokens (6 blocks of 16 shared) */
    b[100] = a[100] == 5 ? 6 : 5;
    got *g = calloc(4, sizeof *g);
    forge_engine_stats hit, miss;
    prefix_run(m, false, a, 140, b, 140, &g[0], &g[1], &hit);
    prefix_run(m, true, a, 140, b, 140, &g[2], &g[3], &miss);
    assert_int_equal(g[1].n_cached, 96);
    assert_int_equal(g[3].n_cached, 0);
    assert_true(hit.cached_tokens >= 96);
    assert_int_equal(miss.cached_tokens, 0);
    assert_true(hit.blocks_cached > 0);
    assert_ids(&g[1], g[3].ids, g[3].n_ids, "hit vs miss", 0);
    forge_sampler_params sp = greedy_params();
    int32_t n_ref = reference(m, b, 140, &sp, 30, false, ref);
    assert_ids(&g[1], ref, n_ref, "hit vs forge_decode_greedy", 0);
    /* the same prompt again: everything but the last (partial) block is cached */
    got g2 = {0};
    forge_engine_params ep = eparams(4, 32, 2048);
    forge_engine *e = make_engine(m, &ep);
    forge_request_params rp = rparams(a, 140, 20, &g[0]);
    memset(&g[0], 0, sizeof g[0]);
    submit(e, &rp);
    run(e);
    rp = rparams(a, 140, 20, &g2);
    submit(e, &rp);
    run(e);
    assert_int_equal(g2.n_cached, 128);
    assert_ids(&g2, g[0].ids, g[0].n_ids, "repeat hit", 0);
    /* a prompt of exactly whole blocks: the last token is computed, not taken from the cache */
    got g3 = {0}, g4 = {0};
    rp = rparams(a, 128, 10, &g3);
    submit(e, &rp);
    run(e);
    assert_int_equal(g3.n_cached, 112);
    n_ref = reference(m, a, 128, &sp, 10, false, ref);
    assert_ids(&g3, ref, n_ref, "whole-block prompt", 0);
    rp = rparams(a, 128, 10, &g4);
    submit(e, &rp);
    run(e);
    assert_ids(&g4, ref, n_ref, "whole-block prompt again", 0);
    forge_engine_free(e);
    free(g);
    forge_model_free(m);
}

/* ---- 3. preemption: a pool too small for all requests at once ---- */

static void test_preemption(void **state)
{
    (void)state;
    forge_model *m = load(MODEL);
    enum { N = 10, LEN = 20, GEN = 60 };
    int32_t prompts[N][LEN], ref[GEN];
    got *g = calloc(N, sizeof *g);
    /* one request needs (20 + 60 - 1) positions = 5 blocks of 16; the pool has 8 */
    forge_engine_params ep = eparams(8, 64, 8 * 16);
    forge_engine *e = make_engine(m, &ep);
    forge_engine_info info;
    forge_engine_get_info(e, &info);
    assert_int_equal(info.n_blocks, 8);
    for (int i = 0; i < N; i++) {
        make_prompt(m, 300 + (uint64_t)i, LEN, prompts[i]);
        if (i % 3 == 1) memcpy(prompts[i], prompts[i - 1], 16 * sizeof(int32_t)); /* shared */
        forge_request_params rp = rparams(prompts[i], LEN, GEN, &g[i]);
        rp.ignore_eos = true; /* every request grows to its full length */
        submit(e, &rp);
    }
    int steps = 0;
    forge_err err = {0};
    for (;;) {
        int n = forge_engine_step(e, &err);
        if (n < 0) fail_msg("step: %s", err.msg);
        check_pool(e);
        steps++;
        if (n == 0) break;
        assert_true(steps < 10000);
    }
    forge_engine_stats st;
    forge_engine_get_stats(e, &st);
    assert_true(st.n_preempted > 0);
    assert_int_equal(st.blocks_used, 0);
    forge_sampler_params sp = greedy_params();
    for (int i = 0; i < N; i++) {
        assert_int_equal(g[i].n_final, 1);
        assert_int_equal(g[i].finish, FORGE_FINISH_LENGTH);
        int32_t n_ref = reference(m, prompts[i], LEN, &sp, GEN, true, ref);
        assert_int_equal(n_ref, GEN);
        assert_ids(&g[i], ref, n_ref, "preempted vs forge_decode_greedy", i);
    }
    print_message("preemption: %llu preemptions over %d steps\n",
                  (unsigned long long)st.n_preempted, steps);
    forge_engine_free(e);
    free(g);
    forge_model_free(m);
}

/* ---- 4. random submit / cancel ---- */

static uint64_t g_random_preempted, g_random_cached;

static void random_run(forge_model *m, uint64_t seed, bool cache, int32_t bs)
{
    enum { MAXR = 120 };
    forge_engine_params ep = eparams(6, 40, 14 * bs);
    ep.block_size = bs;
    ep.no_prefix_cache = !cache;
    forge_engine *e = make_engine(m, &ep);
    got *g = calloc(MAXR, sizeof *g);
    forge_req_id ids[MAXR];
    forge_request_params params[MAXR];
    bool cancelled[MAXR] = {0};
    int32_t prompts[4][90];
    for (int i = 0; i < 4; i++)
        make_prompt(m, seed * 10 + (uint64_t)i, 90, prompts[i]);
    int n_req = 0;
    uint64_t s = seed;
    forge_err err = {0};
    for (int it = 0; it < 400; it++) {
        uint64_t op = tu_rand_u64(&s) % 10;
        if (op < 3 && n_req < MAXR) {
            int32_t *pr = prompts[tu_rand_u64(&s) % 4];
            int32_t len = 1 + (int32_t)(tu_rand_u64(&s) % 80);
            int32_t gen = 1 + (int32_t)(tu_rand_u64(&s) % 40);
            forge_request_params rp = rparams(pr, len, gen, &g[n_req]);
            rp.ignore_eos = tu_rand_u64(&s) % 2;
            if (tu_rand_u64(&s) % 3 == 0) {
                rp.sampling = forge_sampler_default_params();
                rp.sampling.seed = tu_rand_u64(&s);
            }
            ids[n_req] = submit(e, &rp);
            params[n_req] = rp;
            n_req++;
        } else if (op < 5 && n_req > 0) {
            int k = (int)(tu_rand_u64(&s) % (uint64_t)n_req);
            bool done = g[k].n_final > 0;
            int rc = forge_engine_cancel(e, ids[k], &err);
            if (done || cancelled[k]) {
                if (done) assert_int_equal(rc, FORGE_E_NOTFOUND);
            } else {
                assert_int_equal(rc, FORGE_OK);
                cancelled[k] = true;
            }
        } else {
            int n = forge_engine_step(e, &err);
            if (n < 0) fail_msg("step: %s", err.msg);
            check_pool(e);
        }
    }
    assert_int_equal(forge_engine_cancel(e, 123456789, &err), FORGE_E_NOTFOUND);
    run(e);
    forge_engine_stats st;
    forge_engine_get_stats(e, &st);
    assert_int_equal(st.blocks_used, 0);
    assert_int_equal(st.n_running + st.n_waiting, 0);
    g_random_preempted += st.n_preempted;
    g_random_cached += st.cached_tokens;
    for (int i = 0; i < n_req; i++) {
        if (g[i].bad[0]) fail_msg("request %d: %s", i, g[i].bad);
        assert_int_equal(g[i].n_final, 1);
        if (cancelled[i]) {
            assert_int_equal(g[i].finish, FORGE_FINISH_CANCELLED);
        } else {
            /* through preemptions, prefix hits and other requests: `forge run`'s ids */
            assert_true(g[i].finish == FORGE_FINISH_LENGTH || g[i].finish == FORGE_FINISH_STOP);
            int32_t ref[64];
            const forge_request_params *rp = &params[i];
            int32_t n_ref = reference(m, rp->prompt, rp->n_prompt, &rp->sampling, rp->max_tokens,
                                      rp->ignore_eos, ref);
            assert_ids(&g[i], ref, n_ref, "random run request", i);
        }
        assert_int_equal(forge_engine_cancel(e, ids[i], &err), FORGE_E_NOTFOUND);
    }
    forge_engine_free(e);
    free(g);
}

static void test_random_cancel(void **state)
{
    (void)state;
    forge_model *m = load(MODEL);
    random_run(m, 1, true, 16);
    random_run(m, 2, false, 16);
    random_run(m, 3, true, 32);
    random_run(m, 4, true, 16);
    /* the runs went through preemption and prefix hits */
    print_message("random runs: %llu preemptions, %llu cached prompt tokens\n",
                  (unsigned long long)g_random_preempted, (unsigned long long)g_random_cached);
    assert_true(g_random_preempted > 0);
    assert_true(g_random_cached > 0);
    forge_model_free(m);
}

/* ---- 5. sampling with a seed ---- */

static void test_sampling(void **state)
{
    (void)state;
    forge_model *m = load(MODEL);
    enum { N = 6, GEN = 40 };
    int32_t prompts[N][50], ref[GEN];
    got *g = calloc(2 * N, sizeof *g);
    forge_engine_params ep = eparams(8, 24, 8 * 96);
    forge_engine *e = make_engine(m, &ep);
    forge_sampler_params sps[N];
    for (int i = 0; i < N; i++) {
        make_prompt(m, 500 + (uint64_t)i, 10 + 7 * i, prompts[i]);
        sps[i] = forge_sampler_default_params(); /* temperature 0.8, top-k 40, ... */
        sps[i].seed = 1000 + (uint64_t)i;
        if (i == 2) sps[i].repeat_penalty = 1.3f; /* penalties over prompt + output */
        if (i == 3) sps[i].temperature = 0, sps[i].frequency_penalty = 0.5f;
        if (i == 4) sps[i].top_k = 0, sps[i].top_p = 1, sps[i].min_p = 0;
    }
    for (int i = 0; i < N; i++) { /* together */
        forge_request_params rp = rparams(prompts[i], 10 + 7 * i, GEN, &g[i]);
        rp.sampling = sps[i];
        submit(e, &rp);
    }
    run(e);
    for (int i = 0; i < N; i++) { /* alone */
        forge_request_params rp = rparams(prompts[i], 10 + 7 * i, GEN, &g[N + i]);
        rp.sampling = sps[i];
        submit(e, &rp);
        run(e);
        assert_ids(&g[i], g[N + i].ids, g[N + i].n_ids, "sampled together vs alone", i);
        int32_t n_ref = reference(m, prompts[i], 10 + 7 * i, &sps[i], GEN, false, ref);
        assert_ids(&g[i], ref, n_ref, "sampled vs forge run's loop", i);
    }
    /* a different seed gives a different output (the seed is used) */
    got other = {0};
    forge_request_params rp = rparams(prompts[0], 10, GEN, &other);
    rp.sampling = sps[0];
    rp.sampling.seed = 77;
    submit(e, &rp);
    run(e);
    assert_true(other.n_ids != g[0].n_ids ||
                memcmp(other.ids, g[0].ids, (size_t)other.n_ids * sizeof(int32_t)) != 0);
    forge_engine_free(e);
    free(g);
    forge_model_free(m);
}

/* ---- 6. stop strings, max_tokens, end of generation, logprobs, logit bias ---- */

static void one(forge_engine *e, forge_request_params *rp)
{
    submit(e, rp);
    run(e);
    got *g = rp->user;
    assert_int_equal(g->n_final, 1);
}

static void test_stop_strings(void **state)
{
    (void)state;
    forge_model *m = load(MODEL);
    forge_engine_params ep = eparams(4, 64, 1024);
    forge_engine *e = make_engine(m, &ep);
    int32_t prompt[64];
    int32_t np = encode(m, "Once upon a time, there was a little girl named Lily.", prompt, 64);
    got *full = calloc(1, sizeof *full), *g = calloc(1, sizeof *g);
    forge_request_params rp = rparams(prompt, np, 80, full);
    rp.ignore_eos = true;
    one(e, &rp);
    assert_int_equal(full->finish, FORGE_FINISH_LENGTH);
    assert_int_equal(full->n_ids, 80);
    assert_int_equal(full->n_generated, 80);
    assert_true(full->text_len > 40);
    /* the full text is the detokenization of the ids */
    char *dec = NULL;
    size_t dec_len = 0;
    forge_err err = {0};
    assert_int_equal(forge_tok_decode(forge_model_tok(m), full->ids, (size_t)full->n_ids, false,
                                      false, &dec, &dec_len, &err),
                     0);
    assert_int_equal(dec_len, full->text_len);
    assert_memory_equal(dec, full->text, dec_len);
    free(dec);

    /* a stop string from the middle of the text (5 bytes from byte 30): cut at its first
     * occurrence, never emitted, STOP */
    char stop[8];
    memcpy(stop, full->text + 30, 5);
    stop[5] = 0;
    const char *first = strstr(full->text, stop);
    assert_non_null(first);
    size_t cut = (size_t)(first - full->text);
    const char *stops[] = {"never appears \x01", stop};
    rp = rparams(prompt, np, 80, g);
    rp.ignore_eos = true;
    rp.stop = stops;
    rp.n_stop = 2;
    one(e, &rp);
    assert_int_equal(g->finish, FORGE_FINISH_STOP);
    assert_int_equal(g->text_len, cut);
    assert_memory_equal(g->text, full->text, cut);
    assert_true(g->n_ids < 80);
    assert_memory_equal(g->ids, full->ids, (size_t)g->n_ids * sizeof(int32_t));

    /* a partial match is held back: a stop string that starts like the text after some token
     * boundary k but never completes releases those bytes only later, and the text is whole */
    int j = 10; /* the event after which the no-stop run had emitted full->emitted_at[j] bytes */
    size_t k0 = full->emitted_at[j] >= 3 ? full->emitted_at[j] - 3 : 0;
    char pstop[8];
    memcpy(pstop, full->text + k0, full->emitted_at[j] - k0);
    pstop[full->emitted_at[j] - k0] = '\x01';
    pstop[full->emitted_at[j] - k0 + 1] = 0;
    const char *pstops[] = {pstop};
    memset(g, 0, sizeof *g);
    rp = rparams(prompt, np, 80, g);
    rp.ignore_eos = true;
    rp.stop = pstops;
    rp.n_stop = 1;
    one(e, &rp);
    assert_int_equal(g->finish, FORGE_FINISH_LENGTH);
    assert_int_equal(g->text_len, full->text_len);
    assert_memory_equal(g->text, full->text, full->text_len);
    assert_true(g->emitted_at[j] <= k0); /* held back at that event */

    /* max_tokens: LENGTH after exactly that many */
    memset(g, 0, sizeof *g);
    rp = rparams(prompt, np, 7, g);
    rp.ignore_eos = true;
    one(e, &rp);
    assert_int_equal(g->finish, FORGE_FINISH_LENGTH);
    assert_int_equal(g->n_ids, 7);
    assert_memory_equal(g->ids, full->ids, 7 * sizeof(int32_t));

    /* end of generation: forced by a bias; STOP, not emitted; with ignore_eos it is emitted */
    const forge_tok *tok = forge_model_tok(m);
    int32_t eos = forge_tok_eos(tok);
    assert_true(eos >= 0 && forge_tok_is_eog(tok, eos));
    forge_logit_bias up = {eos, 1000.0f};
    memset(g, 0, sizeof *g);
    rp = rparams(prompt, np, 10, g);
    rp.logit_bias = &up;
    rp.n_logit_bias = 1;
    one(e, &rp);
    assert_int_equal(g->finish, FORGE_FINISH_STOP);
    assert_int_equal(g->n_ids, 0);
    assert_int_equal(g->n_generated, 0);
    assert_int_equal(g->n_events, 1);
    memset(g, 0, sizeof *g);
    rp.ignore_eos = true;
    one(e, &rp);
    assert_int_equal(g->finish, FORGE_FINISH_LENGTH);
    assert_int_equal(g->n_ids, 10);
    assert_int_equal(g->ids[9], eos);

    /* logit bias -INFINITY bans a token: the first greedy token never appears */
    forge_logit_bias ban = {full->ids[0], -INFINITY};
    memset(g, 0, sizeof *g);
    rp = rparams(prompt, np, 80, g);
    rp.ignore_eos = true;
    rp.logit_bias = &ban;
    rp.n_logit_bias = 1;
    one(e, &rp);
    assert_int_equal(g->n_ids, 80);
    for (int i = 0; i < g->n_ids; i++)
        assert_int_not_equal(g->ids[i], full->ids[0]);

    /* logprobs: the top entries sorted, their probabilities sum to <= 1, the greedy pick is the
     * top entry, and the first one equals the log-softmax of forge_decode's logits */
    memset(g, 0, sizeof *g);
    rp = rparams(prompt, np, 20, g);
    rp.ignore_eos = true;
    rp.logprobs = true;
    rp.top_logprobs = 4;
    one(e, &rp);
    assert_memory_equal(g->ids, full->ids, 20 * sizeof(int32_t));
    for (int i = 0; i < g->n_ids; i++) {
        assert_int_equal(g->n_top[i], 4);
        double sum = 0;
        for (int t = 0; t < 4; t++) {
            sum += exp(g->top[i][t].logprob);
            if (t) assert_true(g->top[i][t].logprob <= g->top[i][t - 1].logprob);
        }
        assert_true(sum <= 1.0 + 1e-5);
        assert_true(g->logprob[i] <= 0);
        assert_int_equal(g->top[i][0].id, g->ids[i]);
        assert_true(g->top[i][0].logprob == g->logprob[i]);
    }
    forge_context_params cp = forge_context_default_params();
    cp.n_threads = 2;
    cp.n_ctx = 128;
    forge_context *ctx = NULL;
    assert_int_equal(forge_context_create(m, &cp, &ctx, &err), 0);
    assert_int_equal(forge_decode(ctx, prompt, np, false, &err), 0);
    const float *l = forge_get_logits(ctx, -1);
    const int32_t V = forge_model_info_get(m)->n_vocab;
    double mx = -INFINITY, s = 0;
    for (int32_t i = 0; i < V; i++)
        mx = l[i] > mx ? l[i] : mx;
    for (int32_t i = 0; i < V; i++)
        s += exp(l[i] - mx);
    assert_float_equal(g->logprob[0], l[g->ids[0]] - mx - log(s), 1e-5);
    forge_context_free(ctx);
    /* no logprobs asked: 0 and no entries */
    assert_true(full->logprob[0] == 0.0f && full->n_top[0] == 0);

    /* an event's text never splits a UTF-8 character */
    forge_engine_free(e);
    free(full);
    free(g);
    forge_model_free(m);
}

/* ---- 7. bad input ---- */

static void test_bad_input(void **state)
{
    (void)state;
    forge_model *m = load(MODEL);
    forge_err err = {0};
    forge_engine *e = NULL;
    forge_engine_params ep = eparams(4, 32, 256);
    ep.n_ctx = 200;
    /* parameters */
    assert_int_equal(forge_engine_create(NULL, &ep, &e, &err), FORGE_E_INVALID);
    assert_int_equal(forge_engine_create(m, &ep, NULL, &err), FORGE_E_INVALID);
    forge_engine_params bad = ep;
    bad.block_size = 24;
    assert_int_equal(forge_engine_create(m, &bad, &e, &err), FORGE_E_INVALID);
    assert_non_null(strstr(err.msg, "block_size"));
    bad = ep;
    bad.n_batch = -1;
    assert_int_equal(forge_engine_create(m, &bad, &e, &err), FORGE_E_INVALID);
    assert_non_null(strstr(err.msg, "n_batch"));
    assert_null(e);
    e = make_engine(m, &ep);
    forge_engine_info info;
    forge_engine_get_info(e, &info);
    assert_int_equal(info.n_ctx, 200);
    assert_int_equal(info.kv_size, 256);
    assert_int_equal(info.n_blocks, 16);
    assert_string_equal(info.device, "CPU");

    int32_t prompt[300];
    make_prompt(m, 1, 300, prompt);
    got g = {0};
    forge_req_id id = 99;
    forge_request_params rp = rparams(prompt, 150, 51, &g);
    /* prompt + max_tokens > n_ctx */
    assert_int_equal(forge_engine_submit(e, &rp, &id, &err), FORGE_E_RANGE);
    assert_int_equal(id, 0);
    assert_non_null(strstr(err.msg, "150"));
    assert_non_null(strstr(err.msg, "51"));
    assert_non_null(strstr(err.msg, "200"));
    rp.n_prompt = 201;
    rp.max_tokens = 0;
    assert_int_equal(forge_engine_submit(e, &rp, &id, &err), FORGE_E_RANGE);
    rp.n_prompt = 200; /* max_tokens 0 needs room for one token */
    assert_int_equal(forge_engine_submit(e, &rp, &id, &err), FORGE_E_RANGE);
    /* more than the whole pool: n_ctx larger than the pool */
    forge_engine_params big = ep;
    big.n_ctx = 400;
    forge_engine *e2 = make_engine(m, &big);
    rp.n_prompt = 250;
    rp.max_tokens = 20;
    assert_int_equal(forge_engine_submit(e2, &rp, &id, &err), FORGE_E_RANGE);
    assert_non_null(strstr(err.msg, "16")); /* the pool's blocks */
    assert_non_null(strstr(err.msg, "256"));
    forge_engine_free(e2);
    /* NULLs, empty prompt, bad ids, no callback, bad fields */
    rp = rparams(prompt, 10, 5, &g);
    assert_int_equal(forge_engine_submit(NULL, &rp, &id, &err), FORGE_E_INVALID);
    assert_int_equal(forge_engine_submit(e, NULL, &id, &err), FORGE_E_INVALID);
    assert_int_equal(forge_engine_submit(e, &rp, NULL, &err), FORGE_E_INVALID);
    rp.n_prompt = 0;
    assert_int_equal(forge_engine_submit(e, &rp, &id, &err), FORGE_E_INVALID);
    rp.n_prompt = 10;
    rp.prompt = NULL;
    assert_int_equal(forge_engine_submit(e, &rp, &id, &err), FORGE_E_INVALID);
    rp.prompt = prompt;
    int32_t badp[3] = {1, 100000, 2};
    rp.prompt = badp;
    rp.n_prompt = 3;
    assert_int_equal(forge_engine_submit(e, &rp, &id, &err), FORGE_E_RANGE);
    assert_non_null(strstr(err.msg, "100000"));
    badp[1] = -1;
    assert_int_equal(forge_engine_submit(e, &rp, &id, &err), FORGE_E_RANGE);
    rp = rparams(prompt, 10, 5, &g);
    rp.on_event = NULL;
    assert_int_equal(forge_engine_submit(e, &rp, &id, &err), FORGE_E_INVALID);
    assert_non_null(strstr(err.msg, "on_event"));
    rp = rparams(prompt, 10, -1, &g);
    assert_int_equal(forge_engine_submit(e, &rp, &id, &err), FORGE_E_INVALID);
    rp = rparams(prompt, 10, 5, &g);
    rp.top_logprobs = 21;
    assert_int_equal(forge_engine_submit(e, &rp, &id, &err), FORGE_E_INVALID);
    const char *empty[] = {""};
    rp = rparams(prompt, 10, 5, &g);
    rp.stop = empty;
    rp.n_stop = 1;
    assert_int_equal(forge_engine_submit(e, &rp, &id, &err), FORGE_E_INVALID);
    forge_logit_bias lb = {-3, 1.0f};
    rp = rparams(prompt, 10, 5, &g);
    rp.logit_bias = &lb;
    rp.n_logit_bias = 1;
    assert_int_equal(forge_engine_submit(e, &rp, &id, &err), FORGE_E_RANGE);
    rp = rparams(prompt, 10, 5, &g);
    rp.sampling.temperature = NAN;
    assert_int_equal(forge_engine_submit(e, &rp, &id, &err), FORGE_E_INVALID);
    forge_engine_stats st;
    forge_engine_get_stats(e, &st);
    assert_int_equal(st.n_waiting, 0); /* nothing was queued */
    assert_int_equal(g.n_events, 0);
    /* cancel: unknown, then finished */
    assert_int_equal(forge_engine_cancel(e, 424242, &err), FORGE_E_NOTFOUND);
    assert_int_equal(forge_engine_cancel(NULL, 1, &err), FORGE_E_INVALID);
    rp = rparams(prompt, 10, 3, &g);
    id = submit(e, &rp);
    run(e);
    assert_int_equal(g.n_final, 1);
    assert_int_equal(forge_engine_cancel(e, id, &err), FORGE_E_NOTFOUND);
    assert_int_equal(g.n_events, 3); /* no event after the last */
    /* other NULLs are harmless */
    assert_int_equal(forge_engine_step(NULL, &err), FORGE_E_INVALID);
    assert_int_equal(forge_engine_run(NULL, &err), FORGE_E_INVALID);
    assert_int_equal(forge_engine_start(NULL, &err), FORGE_E_INVALID);
    forge_engine_stop(NULL);
    forge_engine_free(NULL);
    forge_engine_get_stats(NULL, &st);
    assert_string_equal(forge_finish_name(FORGE_FINISH_LENGTH), "length");
    assert_string_equal(forge_finish_name(FORGE_FINISH_NONE), "");
    /* an empty step is fine */
    assert_int_equal(forge_engine_step(e, &err), 0);
    /* free with requests queued and half done: no callbacks, no leak */
    got q[3] = {{0}};
    for (int i = 0; i < 3; i++) {
        rp = rparams(prompt + i, 60, 30, &q[i]);
        submit(e, &rp);
    }
    assert_true(forge_engine_step(e, &err) > 0);
    assert_true(forge_engine_step(e, &err) > 0);
    forge_engine_free(e);
    for (int i = 0; i < 3; i++)
        assert_int_equal(q[i].n_final, 0);
    forge_model_free(m);
}

/* ---- 8. the engine's own thread, submits from another thread, two engines ---- */

typedef struct submitter {
    forge_engine *e;
    forge_model *m;
    got *g;
    int n;
    int32_t (*prompts)[64];
} submitter;

static void *submit_thread(void *arg)
{
    submitter *s = arg;
    for (int i = 0; i < s->n; i++) {
        forge_request_params rp = rparams(s->prompts[i], 20 + i, 24, &s->g[i]);
        submit(s->e, &rp);
        struct timespec ts = {0, 200000};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

static void wait_finals(int target)
{
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += 60;
    pthread_mutex_lock(&g_mu);
    while (g_finals < target)
        if (pthread_cond_timedwait(&g_cv, &g_mu, &dl)) break;
    int got_n = g_finals;
    pthread_mutex_unlock(&g_mu);
    assert_int_equal(got_n, target);
}

static void test_thread(void **state)
{
    (void)state;
    forge_model *m = load(MODEL);
    enum { N = 16 };
    int32_t prompts[N][64], ref[64];
    for (int i = 0; i < N; i++)
        make_prompt(m, 700 + (uint64_t)i, 64, prompts[i]);
    got *g = calloc(N, sizeof *g), *h = calloc(4, sizeof *h);
    forge_engine_params ep = eparams(8, 32, 8 * 64);
    forge_engine *e = make_engine(m, &ep);
    forge_err err = {0};
    assert_int_equal(forge_engine_start(e, &err), 0);
    assert_int_equal(forge_engine_start(e, &err), FORGE_E_INVALID); /* already */
    assert_int_equal(forge_engine_step(e, &err), FORGE_E_INVALID);  /* its thread steps */
    pthread_mutex_lock(&g_mu);
    g_finals = 0;
    pthread_mutex_unlock(&g_mu);
    submitter s = {e, m, g, N, prompts};
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, submit_thread, &s), 0);
    pthread_join(th, NULL);
    wait_finals(N);
    forge_sampler_params sp = greedy_params();
    for (int i = 0; i < N; i++) {
        assert_int_equal(g[i].n_final, 1);
        int32_t n_ref = reference(m, prompts[i], 20 + i, &sp, 24, false, ref);
        assert_ids(&g[i], ref, n_ref, "engine thread vs forge_decode_greedy", i);
    }
    /* two engines on one model: a second one runs and is freed while the first one's thread
     * works; then stop cancels what is left, delivering the last events */
    forge_engine *e2 = make_engine(m, &ep);
    got g2[3] = {{0}};
    for (int i = 0; i < 3; i++) {
        forge_request_params rp = rparams(prompts[i], 30, 40, &g2[i]);
        submit(e2, &rp);
    }
    pthread_mutex_lock(&g_mu);
    g_finals = 0;
    pthread_mutex_unlock(&g_mu);
    for (int i = 0; i < 4; i++) {
        forge_request_params rp = rparams(prompts[8 + i], 40, 200, &h[i]);
        rp.ignore_eos = true;
        submit(e, &rp);
    }
    for (int i = 0; i < 5; i++)
        assert_true(forge_engine_step(e2, &err) > 0);
    forge_engine_free(e2);
    for (int i = 0; i < 3; i++)
        assert_int_equal(g2[i].n_final, 0);
    forge_engine_stop(e);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(h[i].n_final, 1);
        if (h[i].finish == FORGE_FINISH_LENGTH) {
            int32_t n_ref = reference(m, prompts[8 + i], 40, &sp, 200, true, ref);
            assert_ids(&h[i], ref, n_ref, "second batch", i);
        } else {
            assert_int_equal(h[i].finish, FORGE_FINISH_CANCELLED);
        }
    }
    forge_engine_stats st;
    forge_engine_get_stats(e, &st);
    assert_int_equal(st.n_running + st.n_waiting, 0);
    assert_int_equal(st.blocks_used, 0);
    check_pool(e);
    /* started again, then freed with work in flight (free stops the thread, no callbacks) */
    assert_int_equal(forge_engine_start(e, &err), 0);
    got last = {0};
    forge_request_params rp = rparams(prompts[0], 40, 200, &last);
    rp.ignore_eos = true;
    submit(e, &rp);
    forge_engine_free(e);
    assert_true(last.n_final <= 1);
    free(g);
    free(h);
    forge_model_free(m);
}

/* ---- the abort flag ---- */

static void test_abort(void **state)
{
    (void)state;
    forge_model *m = load(MODEL);
    forge_engine_params ep = eparams(4, 32, 1024);
    forge_engine *e = make_engine(m, &ep);
    int32_t prompt[40];
    make_prompt(m, 3, 40, prompt);
    got g[2] = {{0}};
    for (int i = 0; i < 2; i++) {
        forge_request_params rp = rparams(prompt, 40 - i, 50, &g[i]);
        submit(e, &rp);
    }
    forge_err err = {0};
    assert_true(forge_engine_step(e, &err) > 0);
    volatile sig_atomic_t flag = 1;
    forge_engine_set_abort_flag(e, &flag);
    assert_int_equal(forge_engine_run(e, &err), FORGE_E_INTERRUPTED);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(g[i].n_final, 1);
        assert_int_equal(g[i].finish, FORGE_FINISH_CANCELLED);
    }
    check_pool(e);
    flag = 0;
    got after = {0};
    forge_request_params rp = rparams(prompt, 40, 5, &after);
    submit(e, &rp);
    run(e);
    assert_int_equal(after.n_ids, 5);
    forge_engine_set_abort_flag(e, NULL);
    forge_engine_free(e);
    forge_model_free(m);
}

/* ---- the step hook: once per step, after the step's events ---- */

typedef struct hook_log {
    const got *g;     /* the requests, whose events the hook sees */
    int n_req;
    int calls;
    int32_t events_seen; /* events of all requests at the last call */
} hook_log;

static void count_hook(void *user)
{
    hook_log *h = user;
    pthread_mutex_lock(&g_mu);
    int32_t n = 0;
    for (int i = 0; i < h->n_req; i++)
        n += h->g[i].n_events;
    h->events_seen = n;
    h->calls++;
    pthread_mutex_unlock(&g_mu);
}

static void test_step_hook(void **state)
{
    (void)state;
    forge_model *m = load(MODEL);
    forge_engine_params ep = eparams(4, 32, 1024);
    forge_engine *e = make_engine(m, &ep);
    int32_t prompt[40];
    make_prompt(m, 5, 40, prompt);
    got g[3] = {{0}};
    hook_log h = {g, 3, 0, 0};
    forge_engine_set_step_hook(e, count_hook, &h);
    for (int i = 0; i < 3; i++) {
        forge_request_params rp = rparams(prompt, 20 + 7 * i, 6 + 3 * i, &g[i]);
        submit(e, &rp);
    }
    forge_err err = {0};
    int n, steps = 0;
    int32_t total = 0;
    while ((n = forge_engine_step(e, &err)) > 0) {
        steps++;
        /* every event of this step was delivered before the hook ran */
        int32_t now = 0;
        for (int i = 0; i < 3; i++)
            now += g[i].n_events;
        assert_int_equal(h.calls, steps);
        assert_int_equal(h.events_seen, now);
        total = now;
    }
    assert_int_equal(n, 0);
    steps++;
    assert_int_equal(h.calls, steps);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(g[i].n_final, 1);
        assert_int_equal(g[i].n_ids, 6 + 3 * i);
    }
    assert_true(h.events_seen >= total);
    /* removed: no more calls; and on the engine's own thread */
    forge_engine_set_step_hook(e, NULL, NULL);
    got more = {0};
    forge_request_params rp = rparams(prompt, 40, 4, &more);
    submit(e, &rp);
    run(e);
    assert_int_equal(h.calls, steps);
    got t = {0};
    hook_log th = {&t, 1, 0, 0};
    forge_engine_set_step_hook(e, count_hook, &th);
    assert_int_equal(forge_engine_start(e, &err), 0);
    rp = rparams(prompt, 33, 5, &t);
    submit(e, &rp);
    for (int i = 0; i < 2000; i++) {
        pthread_mutex_lock(&g_mu);
        bool done = t.n_final > 0 && th.events_seen == t.n_events;
        pthread_mutex_unlock(&g_mu);
        if (done) break;
        usleep(1000);
    }
    forge_engine_stop(e);
    assert_int_equal(t.n_final, 1);
    assert_true(th.calls >= 2);
    assert_int_equal(th.events_seen, t.n_events);
    forge_engine_free(e);
    forge_model_free(m);
}

/* ---- the kernels under batch invariance: row t of W X is the same for every n_tok ---- */

static void test_matmul_row_invariance(void **state)
{
    (void)state;
    forge_err err = {0};
    const int types[] = {GGML_TYPE_F32,  GGML_TYPE_F16,  GGML_TYPE_BF16, GGML_TYPE_Q8_0,
                         GGML_TYPE_Q4_0, GGML_TYPE_Q4_K, GGML_TYPE_Q6_K};
    const kern_isa isas[] = {KERN_ISA_AVX512, KERN_ISA_AVX2, KERN_ISA_NEON, KERN_ISA_SCALAR};
    const int64_t shapes[][2] = {{64, 172}, {96, 13}, {256, 40}}; /* n_in, n_out */
    enum { MAXT = 12 };
    const kern_isa best = kern_isa_current();
    kern_pool *pool = NULL;
    assert_int_equal(kern_pool_create(2, &pool, &err), 0);
    uint64_t rs = 42;
    int checked = 0;
    for (size_t ii = 0; ii < N_OF(isas); ii++) {
        if (kern_set_isa(isas[ii], NULL)) continue;
        for (size_t si = 0; si < N_OF(shapes); si++) {
            const int64_t n_in = shapes[si][0], n_out = shapes[si][1];
            float *wf = malloc((size_t)(n_in * n_out) * sizeof *wf);
            float *x = malloc((size_t)(n_in * MAXT) * sizeof *x);
            float *y = malloc((size_t)(n_out * MAXT) * sizeof *y), *y1 = malloc((size_t)n_out * 4);
            for (int64_t i = 0; i < n_in * n_out; i++)
                wf[i] = tu_rand_uniform(&rs);
            for (int64_t i = 0; i < n_in * MAXT; i++)
                x[i] = 3.0f * tu_rand_uniform(&rs);
            for (size_t ti = 0; ti < N_OF(types); ti++) {
                const int ty = types[ti];
                const size_t rb = ggml_row_size(ty, n_in);
                if (n_in % ggml_type_block_size(ty) || !kern_matmul_supported(ty)) continue;
                uint8_t *w = malloc(rb * (size_t)n_out);
                for (int64_t r = 0; r < n_out; r++)
                    assert_int_equal(quant_quantize_row(ty, wf + r * n_in, w + r * rb, n_in), 0);
                for (int nt = 1; nt <= MAXT; nt++) {
                    kern_pool *p = nt % 2 ? pool : NULL;
                    assert_int_equal(kern_matmul(p, ty, w, n_out, n_in, x, nt, y, &err), 0);
                    for (int t = 0; t < nt; t++) {
                        assert_int_equal(
                            kern_matmul(pool, ty, w, n_out, n_in, x + t * n_in, 1, y1, &err), 0);
                        if (memcmp(y1, y + t * n_out, (size_t)n_out * sizeof *y1))
                            fail_msg("%s %s [%lld x %lld]: row %d of a %d-token call differs "
                                     "from the same row alone",
                                     kern_isa_name(isas[ii]), ggml_type_name(ty),
                                     (long long)n_out, (long long)n_in, t, nt);
                    }
                }
                checked++;
                free(w);
            }
            free(wf);
            free(x);
            free(y);
            free(y1);
        }
    }
    assert_int_equal(kern_set_isa(best, &err), 0);
    kern_pool_free(pool);
    assert_true(checked >= 7 * 3 - 3); /* the scalar ISA at least, every type and shape */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matmul_row_invariance),
        cmocka_unit_test(test_batch_invariance),
        cmocka_unit_test(test_batch_invariance_q8),
        cmocka_unit_test(test_batch_invariance_q4),
        cmocka_unit_test(test_prefix_cache),
        cmocka_unit_test(test_preemption),
        cmocka_unit_test(test_random_cancel),
        cmocka_unit_test(test_sampling),
        cmocka_unit_test(test_stop_strings),
        cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_thread),
        cmocka_unit_test(test_abort),
        cmocka_unit_test(test_step_hook),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
