/* engine.c - the serving core of include/forge_engine.h: the engine object (one forward state =
 * backend + weights + paged K/V storage, one kvb_ block pool), requests (prompt, sampler, stop
 * rules, incremental text), and the scheduler that turns the queue into one batched forward pass
 * per step (docs/ENGINE.md "One step").
 *
 * Threads: submit / cancel / get_stats may come from any thread; they touch only what the mutex
 * guards (the waiting queue, the list of live requests with their cancel flags, the counters and
 * the stats snapshot). Everything else (the running list, the kvb pool, the forward state, the
 * requests' sampling and text state) belongs to the thread that steps the engine. Callbacks run
 * on that thread with the mutex released, so they may submit and cancel.
 *
 * Must not touch: the forward pass (src/model), the backends, the block manager's internals
 * (kv_blocks.c): this file only calls their interfaces. */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/util.h"
#include "cpu/kernels.h"
#include "engine/engine_internal.h"
#include "engine/kv_blocks.h"
#include "forge_engine.h"
#include "model/model.h"

#define ENGINE_MAX_TOP_LOGPROBS 20

typedef enum req_state { REQ_WAITING = 0, REQ_RUNNING = 1 } req_state;

typedef struct request request;
struct request {
    forge_req_id id;
    /* the waiting queue (mutex) or the running list (engine thread), by state */
    request *prev, *next;
    /* every live request, for cancel (mutex) */
    request *live_prev, *live_next;
    bool cancel; /* mutex */
    req_state state;

    /* prompt + generated tokens; the KV of tokens[0..n_computed) is in the pool */
    int32_t *tokens;
    int32_t n_tok, n_prompt, n_gen, max_gen; /* max_gen: max_tokens after the default */
    int32_t n_computed;
    int32_t n_cached; /* prompt tokens served from the prefix cache at the first admission */
    bool admitted_once;
    int32_t seq;      /* kvb sequence, 0 when none */
    uint64_t admit_order;

    /* this step: rows planned (0 = not in the step), copy-on-write, logits row */
    int32_t step_n, step_out;
    kvb_copy step_cow;

    forge_sampler_params sp;
    forge_sampler *smp;
    bool penalties;
    forge_logit_bias *bias;
    int32_t n_bias;
    bool ignore_eos, logprobs;
    int32_t top_logprobs;

    forge_detok_stream *ds;
    char **stop;
    size_t *stop_len;
    int32_t n_stop;
    char *hold; /* released by the detokenizer, not yet emitted (a possible stop string) */
    size_t hold_len, hold_cap;

    void (*on_event)(const forge_event *ev, void *user);
    void *user;
};

enum { ENGINE_PROF_N = 5, ENGINE_PROF_STEPS = 1 << 16 }; /* engine_step's phases prof_mark times */

struct forge_engine {
    forge_model *model;
    const forge_tok *tok;
    int32_t n_vocab;
    fwd_state fs;
    bool fs_ready;
    kvb_pool *pool;
    forge_engine_info info;
    int32_t max_table; /* block table entries of the longest sequence (n_ctx) */

    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool sync_ready;
    /* guarded by mu */
    request *wait_head, *wait_tail;
    request *live_head, *live_tail;
    int32_t n_waiting, n_running;
    forge_req_id next_id;
    forge_engine_stats stats;
    bool stop_thread;
    /* the engine thread */
    pthread_t thread;
    bool thread_on;
    void (*step_hook)(void *user); /* forge_engine_set_step_hook, under mu */
    void *step_hook_user;

    /* owned by the stepping thread */
    request *run_head, *run_tail;
    uint64_t admit_counter;
    const volatile sig_atomic_t *abort_flag;

    /* step scratch, sized at creation */
    request **plan;  /* [n_parallel] requests of the step, in row order */
    int32_t n_plan;
    int32_t *b_ids, *b_pos, *b_slot, *b_out_rows;            /* [n_batch] */
    int32_t *b_greedy; /* [n_parallel]: the ids the backend's argmax_rows picked this step */
    int32_t *b_seq_start, *b_n_table, *b_table;               /* per sequence */
    float *logits;                                            /* [n_parallel][n_vocab] */
    float *work;                                              /* [n_vocab] */
    int32_t *counts;                                          /* [n_vocab], zero between uses */
    forge_token_logprob top[ENGINE_MAX_TOP_LOGPROBS];

    /* FORGE_ENGINE_PROFILE=1: host time of each step's phases (the backend waits on the device
     * in the results phase), kept for the first ENGINE_PROF_STEPS steps; forge_engine_free
     * prints their medians to stderr (a diagnostic: where a step's time goes) */
    double (*prof)[ENGINE_PROF_N + 2]; /* [ENGINE_PROF_STEPS]: the phases, the step, start to start */
    uint64_t prof_steps;
    double prof_last; /* the start of the last step */
};

/* Phase ph of this step ends now: its time since *t is kept, *t restarts. */
static void prof_mark(forge_engine *e, int ph, double *t)
{
    if (!e->prof || e->prof_steps >= ENGINE_PROF_STEPS) return;
    double now = forge_now_s();
    e->prof[e->prof_steps][ph] = now - *t;
    *t = now;
}

static int prof_cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void prof_print(const forge_engine *e)
{
    static const char *const names[ENGINE_PROF_N + 2] = {
        "schedule+batch", "prepare", "forward", "results", "deliver", "step", "interval"};
    const uint64_t n = e->prof_steps < ENGINE_PROF_STEPS ? e->prof_steps : ENGINE_PROF_STEPS;
    double *col = e->prof && n ? malloc(n * sizeof *col) : NULL;
    if (!col) return;
    fprintf(stderr, "forge engine profile: %llu steps, median us:", (unsigned long long)n);
    for (int ph = 0; ph < ENGINE_PROF_N + 2; ph++) {
        for (uint64_t i = 0; i < n; i++)
            col[i] = e->prof[i][ph];
        qsort(col, n, sizeof *col, prof_cmp);
        fprintf(stderr, " %s %.1f", names[ph], 1e6 * col[n / 2]);
    }
    fprintf(stderr, "\n");
    free(col);
}

/* ---- small helpers ------------------------------------------------------------------------ */

static int32_t host_argmax(const float *x, int32_t n)
{
    int32_t best = -1;
    for (int32_t i = 0; i < n; i++)
        if (x[i] == x[i] && (best < 0 || x[i] > x[best])) best = i;
    return best < 0 ? 0 : best;
}

static int32_t blocks_for(int64_t tokens, int32_t bs)
{
    return (int32_t)((tokens + bs - 1) / bs);
}

const char *forge_finish_name(forge_finish f)
{
    switch (f) {
    case FORGE_FINISH_NONE:
        return "";
    case FORGE_FINISH_STOP:
        return "stop";
    case FORGE_FINISH_LENGTH:
        return "length";
    case FORGE_FINISH_CANCELLED:
        return "cancelled";
    case FORGE_FINISH_ERROR:
        return "error";
    }
    return "";
}

forge_engine_params forge_engine_default_params(void)
{
    forge_engine_params p = {0};
    p.device = FORGE_DEVICE_CPU;
    p.kv_type = FORGE_KV_F32;
    p.block_size = 16;
    p.n_parallel = 64;
    p.n_batch = 512;
    return p;
}

forge_request_params forge_request_default_params(void)
{
    forge_request_params p = {0};
    p.sampling = forge_sampler_default_params();
    p.sampling.temperature = 0.0f;
    return p;
}

/* ---- lists -------------------------------------------------------------------------------- */

static void list_remove(request **head, request **tail, request *r)
{
    if (r->prev) r->prev->next = r->next;
    else *head = r->next;
    if (r->next) r->next->prev = r->prev;
    else *tail = r->prev;
    r->prev = r->next = NULL;
}

static void list_push_back(request **head, request **tail, request *r)
{
    r->next = NULL;
    r->prev = *tail;
    if (*tail) (*tail)->next = r;
    else *head = r;
    *tail = r;
}

static void list_push_front(request **head, request **tail, request *r)
{
    r->prev = NULL;
    r->next = *head;
    if (*head) (*head)->prev = r;
    else *tail = r;
    *head = r;
}

static void live_remove(forge_engine *e, request *r)
{
    if (r->live_prev) r->live_prev->live_next = r->live_next;
    else e->live_head = r->live_next;
    if (r->live_next) r->live_next->live_prev = r->live_prev;
    else e->live_tail = r->live_prev;
    r->live_prev = r->live_next = NULL;
}

static void request_free(request *r)
{
    if (!r) return;
    free(r->tokens);
    forge_sampler_free(r->smp);
    forge_detok_stream_free(r->ds);
    for (int32_t i = 0; r->stop && i < r->n_stop; i++)
        free(r->stop[i]);
    free(r->stop);
    free(r->stop_len);
    free(r->bias);
    free(r->hold);
    free(r);
}

/* ---- events ------------------------------------------------------------------------------- */

static void event_init(forge_event *ev, const request *r)
{
    memset(ev, 0, sizeof *ev);
    ev->id = r->id;
    ev->user = r->user;
    ev->token = -1;
    ev->text = "";
    ev->n_prompt = r->n_prompt;
    ev->n_cached = r->n_cached;
    ev->n_generated = r->n_gen;
}

/* Take r out of the engine: its sequence goes back to the pool, it leaves the lists and the
 * counters, then (deliver) its last event runs, then it is freed. ev (may be NULL) carries the
 * token and text of the last event; its finish and error are set here. */
static void finish_request(forge_engine *e, request *r, forge_event *ev, forge_finish why,
                           const char *error, bool deliver)
{
    forge_event own;
    if (r->seq > 0) (void)kvb_seq_free(e->pool, r->seq, NULL);
    r->seq = 0;
    pthread_mutex_lock(&e->mu);
    if (r->state == REQ_RUNNING) {
        list_remove(&e->run_head, &e->run_tail, r);
        e->n_running--;
    } else {
        list_remove(&e->wait_head, &e->wait_tail, r);
        e->n_waiting--;
    }
    live_remove(e, r);
    pthread_mutex_unlock(&e->mu);
    if (deliver) {
        if (!ev) {
            event_init(&own, r);
            ev = &own;
        }
        ev->finish = why;
        ev->error = why == FORGE_FINISH_ERROR ? (error ? error : "the step failed") : NULL;
        ev->n_generated = r->n_gen;
        r->on_event(ev, r->user);
    }
    request_free(r);
}

/* ---- text: the detokenizer's bytes, held back while they may start a stop string ---------- */

static int hold_append(request *r, const char *s, size_t n)
{
    if (n == 0) return FORGE_OK;
    if (r->hold_len + n > r->hold_cap) {
        size_t cap = r->hold_cap ? r->hold_cap : 64;
        while (cap < r->hold_len + n)
            cap *= 2;
        char *p = realloc(r->hold, cap);
        if (!p) return FORGE_E_NOMEM;
        r->hold = p;
        r->hold_cap = cap;
    }
    memcpy(r->hold + r->hold_len, s, n);
    r->hold_len += n;
    return FORGE_OK;
}

/* The first occurrence of any stop string in the held text: its offset, or -1. */
static int64_t stop_find(const request *r)
{
    int64_t best = -1;
    for (int32_t i = 0; i < r->n_stop; i++) {
        size_t n = r->stop_len[i];
        if (n > r->hold_len) continue;
        for (size_t at = 0; at + n <= r->hold_len; at++) {
            if ((int64_t)at >= best && best >= 0) break;
            if (memcmp(r->hold + at, r->stop[i], n) == 0) {
                best = (int64_t)at;
                break;
            }
        }
    }
    return best;
}

/* Bytes at the end of the held text that start some stop string (and must wait). */
static size_t stop_partial(const request *r)
{
    size_t keep = 0;
    for (int32_t i = 0; i < r->n_stop; i++) {
        size_t n = r->stop_len[i] - 1; /* a whole match was looked for already */
        if (n > r->hold_len) n = r->hold_len;
        for (size_t k = n; k > keep; k--)
            if (memcmp(r->hold + r->hold_len - k, r->stop[i], k) == 0) {
                keep = k;
                break;
            }
    }
    return keep;
}

/* The first n held bytes become the event's text (valid until hold_consume, after the
 * callback). */
static void hold_release(request *r, size_t n, forge_event *ev)
{
    ev->text = r->hold ? r->hold : "";
    ev->text_len = n;
}

static void hold_consume(request *r, size_t n)
{
    if (n >= r->hold_len) {
        r->hold_len = 0;
        return;
    }
    memmove(r->hold, r->hold + n, r->hold_len - n);
    r->hold_len -= n;
}

/* ---- sampling ----------------------------------------------------------------------------- */

/* The logits a request samples from: the row plus its logit bias, and (for logprobs, when the
 * sampler has penalties) the penalties sampler.c applies, over the same window (the last
 * penalty_last_n of prompt + generated tokens, which is what the sampler has accepted). */
static void apply_penalties(forge_engine *e, const request *r, float *x)
{
    const forge_sampler_params *p = &r->sp;
    int32_t n = r->n_tok < p->penalty_last_n ? r->n_tok : p->penalty_last_n;
    const int32_t *w = r->tokens + r->n_tok - n;
    for (int32_t i = 0; i < n; i++)
        e->counts[w[i]]++;
    for (int32_t i = 0; i < n; i++) {
        int32_t id = w[i], cnt = e->counts[id];
        if (cnt == 0) continue; /* done already */
        float *l = &x[id];
        if (*l != *l) *l = -INFINITY;
        if (*l <= 0)
            *l *= p->repeat_penalty;
        else
            *l /= p->repeat_penalty;
        *l -= (float)cnt * p->frequency_penalty + p->presence_penalty;
        e->counts[id] = 0;
    }
}

/* logprobs: log-softmax of x (NaN as -inf); the chosen token's and the top n, most likely first
 * (ties: lower id first). */
static float log_softmax_top(forge_engine *e, const float *x, int32_t chosen, int32_t n_top,
                             int32_t *n_got)
{
    const int32_t V = e->n_vocab;
    float mx = -INFINITY;
    for (int32_t i = 0; i < V; i++)
        if (x[i] > mx) mx = x[i];
    double sum = 0;
    if (mx > -INFINITY)
        for (int32_t i = 0; i < V; i++)
            if (x[i] == x[i]) sum += exp((double)x[i] - mx);
    const double lse = mx > -INFINITY ? mx + log(sum) : 0.0;
    int32_t n = 0;
    for (int32_t i = 0; i < V && n_top > 0; i++) {
        float l = x[i] == x[i] ? x[i] : -INFINITY;
        if (n == n_top && !(l > e->top[n - 1].logprob)) continue;
        int32_t at = n < n_top ? n++ : n - 1;
        while (at > 0 && l > e->top[at - 1].logprob) {
            e->top[at] = e->top[at - 1];
            at--;
        }
        e->top[at] = (forge_token_logprob){i, l};
    }
    for (int32_t i = 0; i < n; i++)
        e->top[i].logprob = (float)((double)e->top[i].logprob - lse);
    *n_got = n;
    float lc = x[chosen] == x[chosen] ? x[chosen] : -INFINITY;
    return (float)((double)lc - lse);
}

/* True when r's next token is the plain argmax of its logits row and nothing else reads the
 * row (no sampling, penalties, bias or logprobs): the backend may pick it where the logits are. */
static bool plain_greedy(const request *r)
{
    return r->sp.temperature <= 0 && !r->penalties && r->n_bias == 0 && !r->logprobs;
}

/* Pick the next token of r from its logits row; fills the logprob fields of ev. */
static int32_t pick_token(forge_engine *e, request *r, const float *row, forge_event *ev)
{
    const int32_t V = e->n_vocab;
    const bool greedy = r->sp.temperature <= 0;
    if (plain_greedy(r)) return host_argmax(row, V);
    float *x = e->work;
    memcpy(x, row, (size_t)V * sizeof *x);
    for (int32_t i = 0; i < r->n_bias; i++)
        x[r->bias[i].id] += r->bias[i].bias;
    int32_t id = greedy && !r->penalties ? host_argmax(x, V) : forge_sampler_sample(r->smp, x);
    if (r->logprobs) {
        if (r->penalties) apply_penalties(e, r, x);
        ev->logprob = log_softmax_top(e, x, id, r->top_logprobs, &ev->n_top);
        ev->top = ev->n_top > 0 ? e->top : NULL;
    }
    return id;
}

/* A sampled token: the window, end of generation, the text, stop strings, limits, the event.
 * row: r's logits, or NULL when the backend picked its plain greedy id (picked). */
static void accept_token(forge_engine *e, request *r, const float *row, int32_t picked)
{
    forge_event ev;
    event_init(&ev, r);
    int32_t id = row ? pick_token(e, r, row, &ev) : picked;
    forge_sampler_accept(r->smp, id);
    if (forge_tok_is_eog(e->tok, id) && !r->ignore_eos) {
        /* not emitted: the last event releases what the text still holds */
        ev.logprob = 0;
        ev.top = NULL;
        ev.n_top = 0;
        size_t len = 0;
        const char *rest = forge_detok_stream_flush(r->ds, &len);
        if (hold_append(r, rest, len)) goto nomem;
        int64_t at = stop_find(r);
        hold_release(r, at >= 0 ? (size_t)at : r->hold_len, &ev);
        finish_request(e, r, &ev, FORGE_FINISH_STOP, NULL, true);
        return;
    }
    r->tokens[r->n_tok++] = id;
    r->n_gen++;
    ev.token = id;
    ev.n_generated = r->n_gen;
    pthread_mutex_lock(&e->mu);
    e->stats.generated_tokens++;
    pthread_mutex_unlock(&e->mu);
    size_t len = 0;
    const char *piece = forge_detok_stream_push(r->ds, id, &len);
    if (hold_append(r, piece, len)) goto nomem;
    const bool last = r->n_gen >= r->max_gen;
    if (last) {
        const char *rest = forge_detok_stream_flush(r->ds, &len);
        if (hold_append(r, rest, len)) goto nomem;
    }
    int64_t at = stop_find(r);
    if (at >= 0) {
        hold_release(r, (size_t)at, &ev);
        finish_request(e, r, &ev, FORGE_FINISH_STOP, NULL, true);
        return;
    }
    if (last) {
        hold_release(r, r->hold_len, &ev);
        finish_request(e, r, &ev, FORGE_FINISH_LENGTH, NULL, true);
        return;
    }
    size_t n = r->hold_len - stop_partial(r);
    hold_release(r, n, &ev);
    r->on_event(&ev, r->user);
    hold_consume(r, n);
    return;
nomem:
    finish_request(e, r, NULL, FORGE_FINISH_ERROR, "out of memory for the request's text", true);
}

/* ---- creation ----------------------------------------------------------------------------- */

int forge_engine_create(forge_model *model, const forge_engine_params *params, forge_engine **out,
                        forge_err *err)
{
    forge_engine *e = NULL;
    int rc;
    if (!out || !model)
        return forge_err_set(err, FORGE_E_INVALID, "forge_engine_create: NULL %s",
                             out ? "model" : "out");
    *out = NULL;
    forge_engine_params p = params ? *params : forge_engine_default_params();
    const forge_model_info *hp = forge_model_info_get(model);
    const char *bad = NULL;
    int bad_val = 0;
    if (p.device != FORGE_DEVICE_CPU && p.device != FORGE_DEVICE_GPU &&
        p.device != FORGE_DEVICE_AUTO)
        bad = "device", bad_val = (int)p.device;
    else if (p.gpu_index < 0)
        bad = "gpu_index", bad_val = p.gpu_index;
    else if (p.n_threads < 0)
        bad = "n_threads", bad_val = p.n_threads;
    else if (p.n_tp < 0)
        bad = "n_tp", bad_val = p.n_tp;
    else if (p.kv_type != FORGE_KV_F32 && p.kv_type != FORGE_KV_F16 &&
             p.kv_type != FORGE_KV_Q8_0)
        bad = "kv_type", bad_val = (int)p.kv_type;
    else if (p.n_ctx < 0)
        bad = "n_ctx", bad_val = p.n_ctx;
    else if (p.kv_size < 0)
        bad = "kv_size", bad_val = p.kv_size;
    else if (p.block_size != 0 && p.block_size != 16 && p.block_size != 32)
        bad = "block_size (16 or 32)", bad_val = p.block_size;
    else if (p.n_parallel < 0 || p.n_parallel > 32767)
        bad = "n_parallel (1..32767)", bad_val = p.n_parallel;
    else if (p.n_batch < 0)
        bad = "n_batch", bad_val = p.n_batch;
    if (bad)
        return forge_err_set(err, FORGE_E_INVALID, "bad engine parameter %s: %d", bad, bad_val);

    const int32_t bs = p.block_size ? p.block_size : 16;
    int32_t n_parallel = p.n_parallel ? p.n_parallel : 64;
    const int32_t n_batch = p.n_batch ? p.n_batch : 512;
    if (n_parallel > n_batch) n_parallel = n_batch; /* every running request needs a row */
    const int64_t ctx_given = p.n_ctx ? p.n_ctx : hp->n_ctx_train;
    int64_t kv_size = p.kv_size ? p.kv_size : ctx_given * (n_parallel < 4 ? n_parallel : 4);
    const int64_t n_blocks = (kv_size + bs - 1) / bs;
    if (ctx_given < 1 || n_blocks < 1 || n_blocks * bs > INT32_MAX / 2)
        return forge_err_set(err, FORGE_E_INVALID,
                             "bad engine size: n_ctx %lld, kv_size %lld tokens (blocks of %d)",
                             (long long)ctx_given, (long long)kv_size, bs);
    const int32_t kv_rows = (int32_t)(n_blocks * bs);
    int32_t n_ctx = (int32_t)ctx_given;
    if (!p.n_ctx && n_ctx > kv_rows) n_ctx = kv_rows;

    e = calloc(1, sizeof *e);
    if (!e) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    e->model = model;
    e->tok = forge_model_tok(model);
    e->n_vocab = hp->n_vocab;
    e->next_id = 1;
    const char *prof = getenv("FORGE_ENGINE_PROFILE");
    if (prof && strcmp(prof, "1") == 0) e->prof = calloc(ENGINE_PROF_STEPS, sizeof *e->prof);
    if (pthread_mutex_init(&e->mu, NULL)) {
        free(e);
        return forge_err_set(err, FORGE_E_NOMEM, "engine: cannot create a mutex");
    }
    if (pthread_cond_init(&e->cv, NULL)) {
        pthread_mutex_destroy(&e->mu);
        free(e);
        return forge_err_set(err, FORGE_E_NOMEM, "engine: cannot create a condition variable");
    }
    e->sync_ready = true;

    fwd_params fp = {0};
    fp.device = p.device;
    fp.gpu_index = p.gpu_index;
    fp.n_threads = p.n_threads ? p.n_threads : kern_physical_cores();
    if (fp.n_threads < 1) fp.n_threads = 1;
    fp.f32_math = p.f32_math;
    fp.kv_type = p.kv_type;
    fp.kv_rows = kv_rows;
    fp.n_batch = n_batch;
    fp.n_seq_max = n_parallel;
    fp.n_tp = p.n_tp;
    fp.progress = p.progress;
    fp.progress_user = p.progress_user;
    if ((rc = fwd_state_init(&e->fs, model, &fp, err))) goto fail;
    e->fs_ready = true;
    e->fs.n_ctx_seq = n_ctx; /* a request's most positions (LongRoPE picks its factors by it) */
    if ((rc = fwd_reserve_logits(&e->fs, n_parallel, err))) goto fail;

    kvb_params kp = kvb_default_params();
    kp.n_blocks = (int32_t)n_blocks;
    kp.block_size = bs;
    /* running + preempted requests never exceed n_parallel (preempted ones wait at the head of
     * the queue, ahead of any new admission); twice that is a margin */
    kp.max_seqs = 2 * n_parallel < 65535 ? 2 * n_parallel : 65535;
    kp.prefix_cache = !p.no_prefix_cache;
    if ((rc = kvb_pool_create(&kp, &e->pool, err))) goto fail;

    e->max_table = blocks_for(n_ctx, bs);
    const size_t nb = (size_t)n_batch, np = (size_t)n_parallel, V = (size_t)hp->n_vocab;
    e->plan = calloc(np, sizeof *e->plan);
    e->b_ids = malloc(nb * sizeof(int32_t));
    e->b_pos = malloc(nb * sizeof(int32_t));
    e->b_slot = malloc(nb * sizeof(int32_t));
    e->b_out_rows = malloc(nb * sizeof(int32_t));
    e->b_seq_start = malloc((np + 1) * sizeof(int32_t));
    e->b_n_table = malloc(np * sizeof(int32_t));
    e->b_table = malloc(np * (size_t)e->max_table * sizeof(int32_t));
    e->logits = malloc(np * V * sizeof(float));
    e->b_greedy = malloc(np * sizeof(int32_t));
    e->work = malloc(V * sizeof(float));
    e->counts = calloc(V, sizeof(int32_t));
    if (!e->plan || !e->b_ids || !e->b_pos || !e->b_slot || !e->b_out_rows || !e->b_seq_start ||
        !e->b_n_table || !e->b_table || !e->logits || !e->b_greedy || !e->work || !e->counts) {
        rc = forge_err_set(err, FORGE_E_NOMEM, "engine: out of memory for the step buffers");
        goto fail;
    }

    e->info.device = e->fs.be->ops->name;
    e->info.warning = e->fs.warning[0] ? e->fs.warning : NULL;
    e->info.n_ctx = n_ctx;
    e->info.kv_size = kv_rows;
    e->info.block_size = bs;
    e->info.n_blocks = (int32_t)n_blocks;
    e->info.n_parallel = n_parallel;
    e->info.n_batch = n_batch;
    e->info.kv_type = p.kv_type;
    e->stats.blocks_total = (int32_t)n_blocks;
    *out = e;
    return FORGE_OK;
fail:
    forge_engine_free(e);
    return rc;
}

static void drop_all(forge_engine *e, bool deliver);

void forge_engine_free(forge_engine *e)
{
    if (!e) return;
    if (e->thread_on) {
        pthread_mutex_lock(&e->mu);
        e->stop_thread = true;
        pthread_cond_broadcast(&e->cv);
        pthread_mutex_unlock(&e->mu);
        pthread_join(e->thread, NULL);
        e->thread_on = false;
    }
    if (e->sync_ready) drop_all(e, false);
    prof_print(e);
    free(e->prof);
    kvb_pool_free(e->pool);
    if (e->fs_ready) fwd_state_release(&e->fs);
    free(e->plan);
    free(e->b_ids);
    free(e->b_pos);
    free(e->b_slot);
    free(e->b_out_rows);
    free(e->b_seq_start);
    free(e->b_n_table);
    free(e->b_table);
    free(e->logits);
    free(e->b_greedy);
    free(e->work);
    free(e->counts);
    if (e->sync_ready) {
        pthread_cond_destroy(&e->cv);
        pthread_mutex_destroy(&e->mu);
    }
    free(e);
}

void forge_engine_get_info(const forge_engine *e, forge_engine_info *out)
{
    if (!out) return;
    if (!e) {
        memset(out, 0, sizeof *out);
        return;
    }
    *out = e->info;
}

const forge_model *forge_engine_model(const forge_engine *e)
{
    return e ? e->model : NULL;
}

void forge_engine_set_abort_flag(forge_engine *e, const volatile sig_atomic_t *flag)
{
    if (!e) return;
    e->abort_flag = flag;
    e->fs.abort_flag = flag;
}

void forge_engine_set_step_hook(forge_engine *e, void (*fn)(void *user), void *user)
{
    if (!e) return;
    pthread_mutex_lock(&e->mu);
    e->step_hook = fn;
    e->step_hook_user = user;
    pthread_mutex_unlock(&e->mu);
}

void forge_engine_get_stats(forge_engine *e, forge_engine_stats *out)
{
    if (!out) return;
    memset(out, 0, sizeof *out);
    if (!e) return;
    pthread_mutex_lock(&e->mu);
    *out = e->stats;
    out->n_waiting = e->n_waiting;
    out->n_running = e->n_running;
    pthread_mutex_unlock(&e->mu);
}

/* ---- submit / cancel ---------------------------------------------------------------------- */

int forge_engine_submit(forge_engine *e, const forge_request_params *p, forge_req_id *id,
                        forge_err *err)
{
    request *r = NULL;
    int rc;
    if (id) *id = 0;
    if (!e || !p || !id)
        return forge_err_set(err, FORGE_E_INVALID, "forge_engine_submit: NULL %s",
                             !e ? "engine" : !p ? "params" : "id");
    const int32_t V = e->n_vocab, n_ctx = e->info.n_ctx;
    if (!p->on_event)
        return forge_err_set(err, FORGE_E_INVALID, "request: on_event is NULL (it is required)");
    if (p->n_prompt < 1 || !p->prompt)
        return forge_err_set(err, FORGE_E_INVALID, "request: n_prompt %d%s (need >= 1 token)",
                             p->n_prompt, p->prompt ? "" : " with a NULL prompt");
    for (int32_t i = 0; i < p->n_prompt; i++)
        if (p->prompt[i] < 0 || p->prompt[i] >= V)
            return forge_err_set(err, FORGE_E_RANGE,
                                 "request: prompt token %d at index %d is outside the vocabulary "
                                 "(%d)",
                                 p->prompt[i], i, V);
    if (p->max_tokens < 0)
        return forge_err_set(err, FORGE_E_INVALID, "request: max_tokens %d (need >= 0)",
                             p->max_tokens);
    if (p->top_logprobs < 0 || p->top_logprobs > ENGINE_MAX_TOP_LOGPROBS)
        return forge_err_set(err, FORGE_E_INVALID, "request: top_logprobs %d (0..%d)",
                             p->top_logprobs, ENGINE_MAX_TOP_LOGPROBS);
    if (p->n_stop < 0 || (p->n_stop > 0 && !p->stop))
        return forge_err_set(err, FORGE_E_INVALID, "request: n_stop %d with %s stop strings",
                             p->n_stop, p->stop ? "the" : "NULL");
    for (int32_t i = 0; i < p->n_stop; i++)
        if (!p->stop[i] || !p->stop[i][0])
            return forge_err_set(err, FORGE_E_INVALID, "request: stop string %d is %s", i,
                                 p->stop[i] ? "empty" : "NULL");
    if (p->n_logit_bias < 0 || (p->n_logit_bias > 0 && !p->logit_bias))
        return forge_err_set(err, FORGE_E_INVALID, "request: n_logit_bias %d with %s entries",
                             p->n_logit_bias, p->logit_bias ? "the" : "NULL");
    for (int32_t i = 0; i < p->n_logit_bias; i++) {
        if (p->logit_bias[i].id < 0 || p->logit_bias[i].id >= V)
            return forge_err_set(err, FORGE_E_RANGE,
                                 "request: logit_bias %d: token %d is outside the vocabulary (%d)",
                                 i, p->logit_bias[i].id, V);
        if (isnan(p->logit_bias[i].bias))
            return forge_err_set(err, FORGE_E_INVALID, "request: logit_bias %d is NaN", i);
    }
    /* what it can ever need: n_prompt + max_gen tokens of context, and K/V for all of them but
     * the last generated one (it is never fed back) */
    if ((int64_t)p->n_prompt + p->max_tokens > n_ctx || (p->max_tokens == 0 && p->n_prompt >= n_ctx))
        return forge_err_set(err, FORGE_E_RANGE,
                             "request: prompt of %d tokens + max_tokens %d does not fit the "
                             "engine's context of %d tokens%s",
                             p->n_prompt, p->max_tokens, n_ctx,
                             p->max_tokens == 0 ? " (with room for one generated token)" : "");
    const int32_t max_gen = p->max_tokens ? p->max_tokens : n_ctx - p->n_prompt;
    const int64_t kv_need = (int64_t)p->n_prompt + max_gen - 1;
    const int32_t blocks = blocks_for(kv_need, e->info.block_size);
    if (blocks > e->info.n_blocks)
        return forge_err_set(err, FORGE_E_RANGE,
                             "request: prompt of %d tokens + max_tokens %d needs %d KV blocks of "
                             "%d tokens, the engine's whole pool has %d (%d tokens)",
                             p->n_prompt, max_gen, blocks, e->info.block_size, e->info.n_blocks,
                             e->info.kv_size);

    r = calloc(1, sizeof *r);
    if (!r) goto nomem;
    r->n_prompt = p->n_prompt;
    r->max_gen = max_gen;
    r->tokens = malloc((size_t)(p->n_prompt + max_gen) * sizeof *r->tokens);
    if (!r->tokens) goto nomem;
    memcpy(r->tokens, p->prompt, (size_t)p->n_prompt * sizeof *r->tokens);
    r->n_tok = p->n_prompt;
    r->sp = p->sampling;
    if ((rc = forge_sampler_create(&r->sp, V, &r->smp, err))) goto fail;
    for (int32_t i = 0; i < p->n_prompt; i++) /* as `forge run`: the prompt fills the window */
        forge_sampler_accept(r->smp, p->prompt[i]);
    r->penalties = r->sp.penalty_last_n > 0 &&
                   (r->sp.repeat_penalty != 1.0f || r->sp.presence_penalty != 0.0f ||
                    r->sp.frequency_penalty != 0.0f);
    if ((rc = forge_detok_stream_create(e->tok, false, &r->ds, err))) goto fail;
    if (p->n_stop > 0) {
        r->stop = calloc((size_t)p->n_stop, sizeof *r->stop);
        r->stop_len = calloc((size_t)p->n_stop, sizeof *r->stop_len);
        if (!r->stop || !r->stop_len) goto nomem;
        r->n_stop = p->n_stop;
        for (int32_t i = 0; i < p->n_stop; i++) {
            r->stop_len[i] = strlen(p->stop[i]);
            r->stop[i] = malloc(r->stop_len[i] + 1);
            if (!r->stop[i]) goto nomem;
            memcpy(r->stop[i], p->stop[i], r->stop_len[i] + 1);
        }
    }
    if (p->n_logit_bias > 0) {
        r->bias = malloc((size_t)p->n_logit_bias * sizeof *r->bias);
        if (!r->bias) goto nomem;
        memcpy(r->bias, p->logit_bias, (size_t)p->n_logit_bias * sizeof *r->bias);
        r->n_bias = p->n_logit_bias;
    }
    r->ignore_eos = p->ignore_eos;
    r->logprobs = p->logprobs || p->top_logprobs > 0;
    r->top_logprobs = p->top_logprobs;
    r->on_event = p->on_event;
    r->user = p->user;
    r->state = REQ_WAITING;

    pthread_mutex_lock(&e->mu);
    r->id = e->next_id++;
    /* before the unlock: from then on the engine thread may finish and free r */
    *id = r->id;
    list_push_back(&e->wait_head, &e->wait_tail, r);
    r->live_prev = e->live_tail;
    if (e->live_tail) e->live_tail->live_next = r;
    else e->live_head = r;
    e->live_tail = r;
    e->n_waiting++;
    e->stats.prompt_tokens += (uint64_t)p->n_prompt;
    pthread_cond_broadcast(&e->cv);
    pthread_mutex_unlock(&e->mu);
    return FORGE_OK;
nomem:
    rc = forge_err_set(err, FORGE_E_NOMEM, "request: out of memory");
fail:
    request_free(r);
    return rc;
}

int forge_engine_cancel(forge_engine *e, forge_req_id id, forge_err *err)
{
    if (!e) return forge_err_set(err, FORGE_E_INVALID, "forge_engine_cancel: NULL engine");
    int rc = FORGE_E_NOTFOUND;
    pthread_mutex_lock(&e->mu);
    for (request *r = e->live_head; r; r = r->live_next)
        if (r->id == id) {
            r->cancel = true;
            rc = FORGE_OK;
            break;
        }
    if (rc == FORGE_OK) pthread_cond_broadcast(&e->cv);
    pthread_mutex_unlock(&e->mu);
    if (rc)
        return forge_err_set(err, rc, "request %llu is not queued or running (finished or unknown)",
                             (unsigned long long)id);
    return FORGE_OK;
}

/* ---- the scheduler ------------------------------------------------------------------------ */

/* Every request ends (CANCELLED, events when deliver). The stepping thread only. */
static void drop_all(forge_engine *e, bool deliver)
{
    for (;;) {
        pthread_mutex_lock(&e->mu);
        request *r = e->run_head ? e->run_head : e->wait_head;
        pthread_mutex_unlock(&e->mu);
        if (!r) break;
        finish_request(e, r, NULL, FORGE_FINISH_CANCELLED, NULL, deliver);
    }
}

/* Requests whose cancel flag is set end now. */
static void reap_cancelled(forge_engine *e)
{
    for (;;) {
        request *found = NULL;
        pthread_mutex_lock(&e->mu);
        for (request *r = e->live_head; r && !found; r = r->live_next)
            if (r->cancel) found = r;
        pthread_mutex_unlock(&e->mu);
        if (!found) break;
        finish_request(e, found, NULL, FORGE_FINISH_CANCELLED, NULL, true);
    }
}

static void plan_drop(forge_engine *e, request *r)
{
    for (int32_t i = 0; i < e->n_plan; i++)
        if (e->plan[i] == r) {
            memmove(e->plan + i, e->plan + i + 1, (size_t)(e->n_plan - i - 1) * sizeof *e->plan);
            e->n_plan--;
            break;
        }
    r->step_n = 0;
}

/* Preemption: r's blocks go back to the pool (its full computed blocks stay in the prefix
 * cache), it leaves this step's plan and goes to the head of the queue; it will recompute
 * tokens[0..n_tok-1) when readmitted and continue exactly where it was. */
static void preempt(forge_engine *e, request *r)
{
    plan_drop(e, r);
    (void)kvb_seq_preempt(e->pool, r->seq, NULL, NULL);
    r->n_computed = 0;
    pthread_mutex_lock(&e->mu);
    list_remove(&e->run_head, &e->run_tail, r);
    e->n_running--;
    r->state = REQ_WAITING;
    list_push_front(&e->wait_head, &e->wait_tail, r);
    e->n_waiting++;
    e->stats.n_preempted++;
    pthread_mutex_unlock(&e->mu);
}

/* Reserve n more positions of r (running) for this step, preempting the most recently admitted
 * running requests while the pool is short. false: r itself was preempted. */
static bool reserve(forge_engine *e, request *r, int32_t n, bool *preempted)
{
    for (;;) {
        bool ok = false;
        if (kvb_seq_can_append(e->pool, r->seq, n, &ok, NULL) == FORGE_OK && ok) break;
        request *victim = e->run_tail;
        preempt(e, victim);
        *preempted = true;
        if (victim == r) return false;
    }
    kvb_copy cow;
    if (kvb_seq_append(e->pool, r->seq, r->tokens + r->n_computed, n, &cow, NULL)) {
        /* can_append said yes: only a host allocation can fail here; retry next step */
        return false;
    }
    r->step_n = n;
    r->step_cow = cow;
    e->plan[e->n_plan++] = r;
    return true;
}

/* Admit the head of the queue if it fits now (a sequence adopting its cached prefix) and plan
 * its first chunk. Returns the rows planned, 0 when nothing was admitted. */
static int32_t admit_head(forge_engine *e, int32_t budget, bool *preempted)
{
    pthread_mutex_lock(&e->mu);
    request *r = e->wait_head;
    bool ok = false;
    int32_t n_cached = 0;
    if (!r || r->cancel || e->n_running >= e->info.n_parallel) goto no;
    const int32_t n_total = r->n_prompt + r->max_gen - 1; /* positions it can ever hold */
    if (kvb_can_admit(e->pool, r->tokens, r->n_tok - 1, n_total, &ok, NULL, NULL) || !ok) goto no;
    if (r->seq == 0) {
        if (kvb_seq_create(e->pool, r->tokens, r->n_tok - 1, &r->seq, &n_cached, NULL)) goto no;
    } else if (kvb_seq_adopt_prefix(e->pool, r->seq, r->tokens, r->n_tok - 1, &n_cached, NULL)) {
        goto no;
    }
    r->n_computed = n_cached;
    if (!r->admitted_once) {
        r->admitted_once = true;
        r->n_cached = n_cached;
        e->stats.cached_tokens += (uint64_t)n_cached;
    }
    list_remove(&e->wait_head, &e->wait_tail, r);
    e->n_waiting--;
    r->state = REQ_RUNNING;
    r->admit_order = ++e->admit_counter;
    list_push_back(&e->run_head, &e->run_tail, r);
    e->n_running++;
    pthread_mutex_unlock(&e->mu);
    int32_t n = r->n_tok - r->n_computed;
    if (n > budget) n = budget;
    return reserve(e, r, n, preempted) ? n : 0;
no:
    pthread_mutex_unlock(&e->mu);
    return 0;
}

/* This step's plan: one row for every decoding request, then prompt chunks in arrival order
 * within the token budget, then new admissions in arrival order (none in a step that had to
 * preempt, and none past a request that does not fit: first come, first served). */
static void schedule(forge_engine *e)
{
    int32_t budget = e->info.n_batch;
    bool preempted = false;
    e->n_plan = 0;
    for (request *r = e->run_head; r; r = r->next)
        r->step_n = 0;
    /* decoding requests first: one row each */
    for (request *r = e->run_head, *nx; r && budget > 0; r = nx) {
        nx = r->next;
        if (r->n_tok - r->n_computed != 1) continue;
        if (reserve(e, r, 1, &preempted)) budget--;
        nx = r->state == REQ_RUNNING ? r->next : NULL;
    }
    /* prompts (and recomputations) in progress, in admission order */
    for (request *r = e->run_head, *nx; r && budget > 0; r = nx) {
        nx = r->next;
        int32_t left = r->n_tok - r->n_computed;
        if (left <= 1 || r->step_n > 0) continue;
        int32_t n = left < budget ? left : budget;
        if (reserve(e, r, n, &preempted)) budget -= n;
        nx = r->state == REQ_RUNNING ? r->next : NULL;
    }
    while (!preempted && budget > 0) {
        int32_t n = admit_head(e, budget, &preempted);
        if (n <= 0) break;
        budget -= n;
    }
}

/* The step failed: every request in it ends with FINISH_ERROR (its sequence freed), except for
 * an interruption, which leaves them as they were (their reservations undone). */
static void step_failed(forge_engine *e, int rc, const char *msg)
{
    for (int32_t i = 0; i < e->n_plan; i++) {
        request *r = e->plan[i];
        r->step_n = 0;
        if (rc == FORGE_E_INTERRUPTED)
            (void)kvb_seq_truncate(e->pool, r->seq, r->n_computed, NULL);
    }
    if (rc == FORGE_E_INTERRUPTED) return;
    int32_t n = e->n_plan;
    e->n_plan = 0;
    for (int32_t i = 0; i < n; i++)
        finish_request(e, e->plan[i], NULL, FORGE_FINISH_ERROR, msg, true);
}

static int unfinished(forge_engine *e)
{
    pthread_mutex_lock(&e->mu);
    int n = e->n_waiting + e->n_running;
    kvb_stats ks;
    kvb_get_stats(e->pool, &ks);
    e->stats.blocks_total = ks.n_blocks;
    e->stats.blocks_used = ks.n_used;
    e->stats.blocks_cached = ks.n_cached;
    pthread_mutex_unlock(&e->mu);
    return n;
}

/* The step's forward pass. A batch of decode rows only (each sequence one row, every row's
 * logits) goes through the backend's batch_step_begin/step_end, which may replay a recording
 * of an earlier step of the same shape instead (backend.h). */
static int engine_forward(forge_engine *e, const be_batch *bt, forge_err *err)
{
    backend *be = e->fs.be;
    const be_ops *op = be->ops;
    if (!op->batch_step_begin || bt->n_tok != bt->n_seq || bt->n_out != bt->n_tok)
        return model_forward(&e->fs, e->b_ids, bt, err);
    bool replayed = false;
    int rc = op->batch_step_begin(be, bt, e->b_ids, &replayed, err);
    if (rc || replayed) return rc;
    return model_forward_step(&e->fs, e->b_ids, bt, err);
}

static int engine_step(forge_engine *e, forge_err *err)
{
    const be_ops *op = e->fs.be->ops;
    const int32_t V = e->n_vocab;
    forge_err ferr = {0};
    int rc = FORGE_OK;

    double t = e->prof ? forge_now_s() : 0, t_step = t;
    reap_cancelled(e);
    schedule(e);
    if (e->n_plan == 0) return unfinished(e);

    /* the batch: rows grouped by sequence, the last row of a finished prompt wants logits */
    const int32_t stride = e->max_table;
    int32_t n_tok = 0, n_out = 0;
    for (int32_t s = 0; s < e->n_plan; s++) {
        request *r = e->plan[s];
        const int32_t *table = NULL;
        int32_t n_table = 0, len = 0;
        e->b_seq_start[s] = n_tok;
        for (int32_t j = 0; j < r->step_n; j++) {
            e->b_ids[n_tok + j] = r->tokens[r->n_computed + j];
            e->b_pos[n_tok + j] = r->n_computed + j;
        }
        if ((rc = kvb_seq_rows(e->pool, r->seq, r->n_computed, r->step_n, e->b_slot + n_tok,
                               &ferr)) ||
            (rc = kvb_seq_table(e->pool, r->seq, &table, &n_table, &len, &ferr)))
            goto failed;
        if (n_table > stride) {
            rc = forge_err_set(&ferr, FORGE_E_INTERNAL, "a sequence of %d tokens outgrew n_ctx",
                               len);
            goto failed;
        }
        memcpy(e->b_table + (size_t)s * stride, table, (size_t)n_table * sizeof *table);
        e->b_n_table[s] = n_table;
        n_tok += r->step_n;
        r->step_out = -1;
        if (r->n_computed + r->step_n == r->n_tok) {
            r->step_out = n_out;
            e->b_out_rows[n_out++] = n_tok - 1;
        }
    }
    e->b_seq_start[e->n_plan] = n_tok;
    be_batch bt = {0};
    bt.n_tok = n_tok;
    bt.n_seq = e->n_plan;
    bt.pos = e->b_pos;
    bt.slot = e->b_slot;
    bt.seq_start = e->b_seq_start;
    bt.table = e->b_table;
    bt.n_table = e->b_n_table;
    bt.table_stride = stride;
    bt.block_size = e->info.block_size;
    bt.out_rows = e->b_out_rows;
    bt.n_out = n_out;

    prof_mark(e, 0, &t);
    if (op->activate && (rc = op->activate(e->fs.be, &ferr))) goto failed;
    if ((rc = fwd_reserve_logits(&e->fs, n_out > 0 ? n_out : 1, &ferr))) goto failed;
    /* copy-on-write first, in the order the pool reported them */
    for (int32_t s = 0; s < e->n_plan; s++) {
        const kvb_copy *c = &e->plan[s]->step_cow;
        if (c->n_rows <= 0) continue;
        if (!op->kv_copy_block) {
            rc = forge_err_set(&ferr, FORGE_E_UNSUPPORTED,
                               "the %s backend cannot copy KV blocks (copy-on-write)", op->name);
            goto failed;
        }
        if ((rc = op->kv_copy_block(e->fs.be, e->fs.kv, e->info.block_size, c->src, c->dst,
                                    c->n_rows, &ferr)))
            goto failed;
    }
    prof_mark(e, 1, &t);
    if ((rc = engine_forward(e, &bt, &ferr))) goto failed;
    prof_mark(e, 2, &t);
    /* when every row wants its plain argmax, the backend picks the ids where the logits are
     * (the same rule as host_argmax: the first maximum, NaN never wins) and only they come
     * back, not n_out x n_vocab floats */
    bool picked = n_out > 0 && op->argmax_rows;
    for (int32_t s = 0; picked && s < e->n_plan; s++)
        picked = e->plan[s]->step_out < 0 || plain_greedy(e->plan[s]);
    if (picked)
        rc = op->argmax_rows(e->fs.be, e->fs.b.logits, n_out, V, e->b_greedy, &ferr);
    else if (n_out > 0)
        rc = op->buf_read(e->fs.be, e->fs.b.logits, 0, (int64_t)n_out * V, e->logits, &ferr);
    if (rc) goto failed;
    prof_mark(e, 3, &t);

    /* commit: the K/V is written; full blocks enter the prefix cache */
    for (int32_t s = 0; s < e->n_plan; s++) {
        request *r = e->plan[s];
        r->n_computed += r->step_n;
        (void)kvb_seq_computed(e->pool, r->seq, r->n_computed, NULL);
    }
    pthread_mutex_lock(&e->mu);
    e->stats.n_steps++;
    pthread_mutex_unlock(&e->mu);
    /* sample and deliver (a callback may submit or cancel; finished requests leave the plan) */
    int32_t n = e->n_plan;
    e->n_plan = 0;
    for (int32_t s = 0; s < n; s++) {
        request *r = e->plan[s];
        int32_t row = r->step_out;
        r->step_n = 0;
        if (row >= 0)
            accept_token(e, r, picked ? NULL : e->logits + (size_t)row * V,
                         picked ? e->b_greedy[row] : -1);
    }
    prof_mark(e, 4, &t);
    if (e->prof && e->prof_steps < ENGINE_PROF_STEPS) {
        e->prof[e->prof_steps][ENGINE_PROF_N] = t - t_step;
        e->prof[e->prof_steps][ENGINE_PROF_N + 1] = e->prof_last > 0 ? t_step - e->prof_last : 0;
        e->prof_last = t_step;
        e->prof_steps++;
    }
    return unfinished(e);
failed:
    if (err) *err = ferr;
    step_failed(e, rc, ferr.msg);
    unfinished(e);
    return rc;
}

int forge_engine_step(forge_engine *e, forge_err *err)
{
    if (!e) return forge_err_set(err, FORGE_E_INVALID, "forge_engine_step: NULL engine");
    if (e->thread_on && !pthread_equal(pthread_self(), e->thread))
        return forge_err_set(err, FORGE_E_INVALID,
                             "forge_engine_step: the engine's own thread is running (started)");
    int n = engine_step(e, err);
    /* after the step's events, outside the lock (the hook may submit or cancel) */
    pthread_mutex_lock(&e->mu);
    void (*fn)(void *) = e->step_hook;
    void *user = e->step_hook_user;
    pthread_mutex_unlock(&e->mu);
    if (fn) fn(user);
    return n;
}

int forge_engine_run(forge_engine *e, forge_err *err)
{
    if (!e) return forge_err_set(err, FORGE_E_INVALID, "forge_engine_run: NULL engine");
    int rc = FORGE_OK, idle = 0;
    uint64_t steps = 0;
    for (;;) {
        if (e->abort_flag && *e->abort_flag) {
            drop_all(e, true);
            unfinished(e);
            return forge_err_set(err, FORGE_E_INTERRUPTED, "interrupted");
        }
        int n = forge_engine_step(e, err);
        if (n == FORGE_E_INTERRUPTED) continue; /* the flag is checked above */
        if (n < 0) {
            if (n == FORGE_E_INVALID) return n; /* misuse (the engine's thread runs) */
            rc = n; /* the failed step's requests ended; go on with the others */
            n = unfinished(e);
        }
        if (n == 0) break;
        /* a step that runs nothing twice in a row with work left would loop forever */
        forge_engine_stats st;
        forge_engine_get_stats(e, &st);
        idle = st.n_steps == steps ? idle + 1 : 0;
        steps = st.n_steps;
        if (idle > 2)
            return forge_err_set(err, FORGE_E_INTERNAL,
                                 "engine: %d requests left but none can be scheduled", n);
    }
    return rc;
}

/* ---- the engine's own thread -------------------------------------------------------------- */

static void *engine_thread(void *arg)
{
    forge_engine *e = arg;
    pthread_mutex_lock(&e->mu);
    for (;;) {
        while (!e->stop_thread && e->n_waiting + e->n_running == 0)
            pthread_cond_wait(&e->cv, &e->mu);
        if (e->stop_thread) break;
        pthread_mutex_unlock(&e->mu);
        forge_err err = {0};
        (void)forge_engine_step(e, &err); /* failures reach the requests as events */
        pthread_mutex_lock(&e->mu);
    }
    pthread_mutex_unlock(&e->mu);
    return NULL;
}

int forge_engine_start(forge_engine *e, forge_err *err)
{
    if (!e) return forge_err_set(err, FORGE_E_INVALID, "forge_engine_start: NULL engine");
    if (e->thread_on)
        return forge_err_set(err, FORGE_E_INVALID, "forge_engine_start: already started");
    e->stop_thread = false;
    if (pthread_create(&e->thread, NULL, engine_thread, e))
        return forge_err_set(err, FORGE_E_NOMEM, "forge_engine_start: cannot create a thread");
    e->thread_on = true;
    return FORGE_OK;
}

void forge_engine_stop(forge_engine *e)
{
    if (!e || !e->thread_on) return;
    pthread_mutex_lock(&e->mu);
    e->stop_thread = true;
    pthread_cond_broadcast(&e->cv);
    pthread_mutex_unlock(&e->mu);
    pthread_join(e->thread, NULL);
    e->thread_on = false;
    e->stop_thread = false;
    drop_all(e, true);
    unfinished(e);
}

/* ---- invariants (tests) ------------------------------------------------------------------- */

int engine_check(forge_engine *e, forge_err *err)
{
    if (!e) return forge_err_set(err, FORGE_E_INVALID, "engine_check: NULL engine");
    int rc = kvb_check(e->pool, err);
    if (rc) return rc;
    pthread_mutex_lock(&e->mu);
    int32_t n_run = 0, n_wait = 0, n_live = 0;
    const char *bad = NULL;
    for (request *r = e->run_head; r && !bad; r = r->next) {
        n_run++;
        if (r->state != REQ_RUNNING || r->seq <= 0) bad = "a running request without a sequence";
        else if (kvb_seq_n_computed(e->pool, r->seq) != r->n_computed)
            bad = "a running request's computed length differs from its sequence's";
        else if (r->n_computed > r->n_tok - 1) bad = "a request computed past its last token";
    }
    for (request *r = e->wait_head; r && !bad; r = r->next) {
        n_wait++;
        if (r->state != REQ_WAITING) bad = "a queued request not in the waiting state";
        else if (r->seq > 0 && kvb_seq_n_computed(e->pool, r->seq) != 0)
            bad = "a preempted request still holds positions";
    }
    for (request *r = e->live_head; r; r = r->live_next)
        n_live++;
    kvb_stats ks;
    kvb_get_stats(e->pool, &ks);
    if (!bad && (n_run != e->n_running || n_wait != e->n_waiting))
        bad = "the running/waiting lists differ from their counters";
    if (!bad && n_live != n_run + n_wait) bad = "the live list differs from running + waiting";
    if (!bad && n_run == 0 && ks.n_used != 0) bad = "blocks in use with no request running";
    if (!bad && ks.n_seqs > n_run + n_wait) bad = "more sequences than requests";
    pthread_mutex_unlock(&e->mu);
    if (bad)
        return forge_err_set(err, FORGE_E_INTERNAL,
                             "engine_check: %s (running %d/%d, waiting %d/%d, live %d, blocks used "
                             "%d)",
                             bad, n_run, e->n_running, n_wait, e->n_waiting, n_live, ks.n_used);
    return FORGE_OK;
}
