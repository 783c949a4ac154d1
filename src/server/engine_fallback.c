/* engine_fallback.c - a stand-in for the engine core (include/forge_engine.h) while its real
 * implementation (src/engine/, branch `engine`) is not in the tree: the Makefile compiles this
 * file with FORGE_SERVER_ENGINE_FALLBACK only when no file under src/engine/ defines
 * forge_engine_submit, so once the engine lands this file compiles to nothing.
 *
 * It keeps the API's contract (thread-safe submit/cancel, events on the engine's thread, stop
 * strings never emitted, complete UTF-8 per event, logprobs, usage) but runs one request at a
 * time on one forge_context: no batching, no paged KV, no prefix cache. Good enough to serve and
 * to test the server; not meant to be fast under concurrency. */
#ifdef FORGE_SERVER_ENGINE_FALLBACK

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "core/util.h"
#include "forge.h"
#include "forge_engine.h"

/* Weak: should a stale object of this file meet the real engine in one link, the engine wins. */
#pragma weak forge_finish_name
#pragma weak forge_engine_default_params
#pragma weak forge_request_default_params
#pragma weak forge_engine_create
#pragma weak forge_engine_free
#pragma weak forge_engine_get_info
#pragma weak forge_engine_model
#pragma weak forge_engine_submit
#pragma weak forge_engine_cancel
#pragma weak forge_engine_step
#pragma weak forge_engine_run
#pragma weak forge_engine_start
#pragma weak forge_engine_stop
#pragma weak forge_engine_set_abort_flag
#pragma weak forge_engine_get_stats

typedef struct fb_req {
    forge_req_id id;
    forge_request_params p; /* pointers below are the request's own copies */
    int32_t *prompt;
    char **stop;
    forge_logit_bias *bias;
    volatile int cancelled;
    struct fb_req *next;
} fb_req;

struct forge_engine {
    forge_model *model;
    forge_context *ctx;
    forge_engine_info info;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    fb_req *head, *tail, *cur;
    forge_req_id next_id;
    pthread_t thread;
    bool started, stopping;
    forge_engine_stats st;
    const volatile sig_atomic_t *abort_flag;
};

const char *forge_finish_name(forge_finish f)
{
    switch (f) {
    case FORGE_FINISH_STOP:
        return "stop";
    case FORGE_FINISH_LENGTH:
        return "length";
    case FORGE_FINISH_CANCELLED:
        return "cancelled";
    case FORGE_FINISH_ERROR:
        return "error";
    default:
        return "";
    }
}

forge_engine_params forge_engine_default_params(void)
{
    forge_engine_params p;
    memset(&p, 0, sizeof p);
    return p;
}

forge_request_params forge_request_default_params(void)
{
    forge_request_params p;
    memset(&p, 0, sizeof p);
    p.sampling = forge_sampler_default_params();
    p.sampling.temperature = 0;
    return p;
}

int forge_engine_create(forge_model *model, const forge_engine_params *params, forge_engine **out,
                        forge_err *err)
{
    forge_engine_params dp = forge_engine_default_params();
    const forge_engine_params *p = params ? params : &dp;
    forge_engine *e = NULL;
    int rc;
    *out = NULL;
    if (!model) return forge_err_set(err, FORGE_E_INVALID, "engine: model is NULL");
    if (p->n_ctx < 0 || p->kv_size < 0 || p->n_parallel < 0 || p->n_batch < 0)
        return forge_err_set(err, FORGE_E_INVALID, "engine: negative size in the parameters");
    if (!(e = calloc(1, sizeof *e))) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    e->model = model;
    forge_context_params cp = forge_context_default_params();
    cp.n_ctx = p->n_ctx;
    if (p->kv_size > 0 && (cp.n_ctx == 0 || cp.n_ctx > p->kv_size)) cp.n_ctx = p->kv_size;
    cp.n_threads = p->n_threads;
    cp.n_batch = p->n_batch;
    cp.kv_type = p->kv_type;
    cp.f32_math = p->f32_math;
    cp.device = p->device;
    cp.gpu_index = p->gpu_index;
    cp.progress = p->progress;
    cp.progress_user = p->progress_user;
    if ((rc = forge_context_create(model, &cp, &e->ctx, err))) goto fail;
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->cv, NULL);
    e->next_id = 1;
    e->info.device = forge_context_device(e->ctx);
    e->info.warning = forge_context_warning(e->ctx);
    e->info.n_ctx = forge_context_n_ctx(e->ctx);
    e->info.kv_size = e->info.n_ctx;
    e->info.block_size = p->block_size ? p->block_size : 16;
    e->info.n_blocks = (e->info.kv_size + e->info.block_size - 1) / e->info.block_size;
    e->info.n_parallel = 1;
    e->info.n_batch = p->n_batch ? p->n_batch : 512;
    e->info.kv_type = p->kv_type;
    e->st.blocks_total = e->info.n_blocks;
    *out = e;
    return FORGE_OK;
fail:
    free(e);
    return rc;
}

static void req_free(fb_req *r)
{
    if (!r) return;
    for (int32_t i = 0; i < r->p.n_stop; i++)
        free(r->stop[i]);
    free(r->stop);
    free(r->prompt);
    free(r->bias);
    free(r);
}

void forge_engine_free(forge_engine *e)
{
    if (!e) return;
    forge_engine_stop(e);
    while (e->head) {
        fb_req *r = e->head;
        e->head = r->next;
        req_free(r);
    }
    forge_context_free(e->ctx);
    pthread_mutex_destroy(&e->mu);
    pthread_cond_destroy(&e->cv);
    free(e);
}

void forge_engine_get_info(const forge_engine *e, forge_engine_info *out)
{
    *out = e->info;
}

const forge_model *forge_engine_model(const forge_engine *e)
{
    return e->model;
}

int forge_engine_submit(forge_engine *e, const forge_request_params *p, forge_req_id *id,
                        forge_err *err)
{
    const int32_t n_vocab = forge_model_info_get(e->model)->n_vocab;
    fb_req *r = NULL;
    *id = 0;
    if (!p->on_event) return forge_err_set(err, FORGE_E_INVALID, "request: on_event is NULL");
    if (!p->prompt || p->n_prompt < 1)
        return forge_err_set(err, FORGE_E_INVALID, "request: the prompt is empty");
    if (p->max_tokens < 0)
        return forge_err_set(err, FORGE_E_INVALID, "request: max_tokens %d < 0", p->max_tokens);
    if (p->top_logprobs < 0 || p->top_logprobs > 20)
        return forge_err_set(err, FORGE_E_INVALID, "request: top_logprobs %d not in 0..20",
                             p->top_logprobs);
    if ((int64_t)p->n_prompt + p->max_tokens > e->info.n_ctx)
        return forge_err_set(err, FORGE_E_RANGE,
                             "request: %d prompt tokens + %d max_tokens exceed the context of %d "
                             "tokens",
                             p->n_prompt, p->max_tokens, e->info.n_ctx);
    if (p->n_prompt >= e->info.n_ctx)
        return forge_err_set(err, FORGE_E_RANGE,
                             "request: %d prompt tokens leave no room in the context of %d tokens",
                             p->n_prompt, e->info.n_ctx);
    for (int32_t i = 0; i < p->n_prompt; i++)
        if (p->prompt[i] < 0 || p->prompt[i] >= n_vocab)
            return forge_err_set(err, FORGE_E_RANGE, "request: prompt id %d not in 0..%d",
                                 p->prompt[i], n_vocab - 1);
    for (int32_t i = 0; i < p->n_logit_bias; i++)
        if (p->logit_bias[i].id < 0 || p->logit_bias[i].id >= n_vocab)
            return forge_err_set(err, FORGE_E_RANGE, "request: logit_bias id %d not in 0..%d",
                                 p->logit_bias[i].id, n_vocab - 1);
    if (!(r = calloc(1, sizeof *r))) goto nomem;
    r->p = *p;
    r->p.stop = NULL;
    r->p.n_stop = 0;
    if (!(r->prompt = malloc((size_t)p->n_prompt * sizeof *r->prompt))) goto nomem;
    memcpy(r->prompt, p->prompt, (size_t)p->n_prompt * sizeof *r->prompt);
    r->p.prompt = r->prompt;
    if (p->n_stop > 0) {
        if (!(r->stop = calloc((size_t)p->n_stop, sizeof *r->stop))) goto nomem;
        for (int32_t i = 0; i < p->n_stop; i++) {
            if (!(r->stop[i] = strdup(p->stop[i]))) goto nomem;
            r->p.n_stop = i + 1;
        }
        r->p.stop = (const char *const *)r->stop;
    }
    if (p->n_logit_bias > 0) {
        if (!(r->bias = malloc((size_t)p->n_logit_bias * sizeof *r->bias))) goto nomem;
        memcpy(r->bias, p->logit_bias, (size_t)p->n_logit_bias * sizeof *r->bias);
        r->p.logit_bias = r->bias;
    }
    pthread_mutex_lock(&e->mu);
    r->id = e->next_id++;
    if (e->tail)
        e->tail->next = r;
    else
        e->head = r;
    e->tail = r;
    e->st.n_waiting++;
    *id = r->id;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
    return FORGE_OK;
nomem:
    req_free(r);
    return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
}

int forge_engine_cancel(forge_engine *e, forge_req_id id, forge_err *err)
{
    int rc = FORGE_E_NOTFOUND;
    pthread_mutex_lock(&e->mu);
    if (e->cur && e->cur->id == id) {
        e->cur->cancelled = 1;
        rc = FORGE_OK;
    }
    for (fb_req *r = e->head; r; r = r->next)
        if (r->id == id) {
            r->cancelled = 1;
            rc = FORGE_OK;
        }
    pthread_mutex_unlock(&e->mu);
    if (rc) forge_err_set(err, rc, "request %llu is not queued or running", (unsigned long long)id);
    return rc;
}

/* Log-softmax of x into lp; top-n ids by value into top. */
static void logprobs_of(const float *x, int32_t n_vocab, float *lp, forge_token_logprob *top,
                        int32_t n_top)
{
    float mx = -INFINITY;
    for (int32_t i = 0; i < n_vocab; i++)
        if (x[i] > mx) mx = x[i];
    double sum = 0;
    for (int32_t i = 0; i < n_vocab; i++)
        sum += x[i] == -INFINITY ? 0 : exp((double)x[i] - mx);
    float lse = mx + (float)log(sum);
    for (int32_t i = 0; i < n_vocab; i++)
        lp[i] = x[i] - lse;
    for (int32_t k = 0; k < n_top; k++) {
        int32_t best = -1;
        for (int32_t i = 0; i < n_vocab; i++) {
            bool taken = false;
            for (int32_t j = 0; j < k; j++)
                taken |= top[j].id == i;
            if (!taken && (best < 0 || lp[i] > lp[best])) best = i;
        }
        top[k].id = best;
        top[k].logprob = lp[best];
    }
}

/* Bytes at the end of text[0..len) that could start one of the stop strings. */
static size_t holdback(const char *text, size_t len, char *const *stop, int32_t n_stop)
{
    size_t hold = 0;
    for (int32_t s = 0; s < n_stop; s++) {
        size_t sl = strlen(stop[s]);
        if (sl == 0) continue;
        for (size_t k = sl - 1; k > hold; k--)
            if (k <= len && !memcmp(text + len - k, stop[s], k)) {
                hold = k;
                break;
            }
    }
    return hold;
}

typedef struct textbuf {
    char *p;
    size_t len, cap;
} textbuf;

static int tb_add(textbuf *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 256;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *np = realloc(b->p, cap);
        if (!np) return -1;
        b->p = np;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
    return 0;
}

static void run_request(forge_engine *e, fb_req *r)
{
    const forge_tok *tok = forge_model_tok(e->model);
    const int32_t n_vocab = forge_model_info_get(e->model)->n_vocab;
    forge_sampler *smp = NULL;
    forge_detok_stream *ds = NULL;
    float *buf = NULL, *lp = NULL;
    forge_token_logprob top[20];
    textbuf text = {0};
    size_t released = 0;
    forge_err err = {0};
    forge_event ev;
    int32_t n_gen = 0;
    int32_t max = r->p.max_tokens ? r->p.max_tokens : e->info.n_ctx - r->p.n_prompt;

    memset(&ev, 0, sizeof ev);
    ev.id = r->id;
    ev.user = r->p.user;
    ev.token = -1;
    ev.n_prompt = r->p.n_prompt;
    if (forge_kv_truncate(e->ctx, 0, &err) ||
        forge_sampler_create(&r->p.sampling, n_vocab, &smp, &err) ||
        forge_detok_stream_create(tok, false, &ds, &err))
        goto fail;
    if (!(buf = malloc((size_t)n_vocab * sizeof *buf)) ||
        !(lp = malloc((size_t)n_vocab * sizeof *lp))) {
        forge_err_set(&err, FORGE_E_NOMEM, "out of memory");
        goto fail;
    }
    for (int32_t i = 0; i < r->p.n_prompt; i++)
        forge_sampler_accept(smp, r->prompt[i]);
    if (forge_decode(e->ctx, r->prompt, r->p.n_prompt, false, &err)) goto fail;
    pthread_mutex_lock(&e->mu);
    e->st.prompt_tokens += (uint64_t)r->p.n_prompt;
    pthread_mutex_unlock(&e->mu);

    for (;;) {
        if (r->cancelled || (e->abort_flag && *e->abort_flag)) {
            ev.token = -1, ev.text = "", ev.text_len = 0, ev.finish = FORGE_FINISH_CANCELLED;
            ev.logprob = 0, ev.top = NULL, ev.n_top = 0;
            r->p.on_event(&ev, r->p.user);
            goto done;
        }
        memcpy(buf, forge_get_logits(e->ctx, -1), (size_t)n_vocab * sizeof *buf);
        for (int32_t i = 0; i < r->p.n_logit_bias; i++)
            buf[r->p.logit_bias[i].id] += r->p.logit_bias[i].bias;
        int32_t id = forge_sampler_sample(smp, buf);
        forge_sampler_accept(smp, id);
        ev.top = NULL, ev.n_top = 0, ev.logprob = 0;
        if (forge_tok_is_eog(tok, id) && !r->p.ignore_eos) {
            size_t fl;
            const char *rest = forge_detok_stream_flush(ds, &fl);
            if (tb_add(&text, rest, fl)) goto nomem;
            ev.token = -1, ev.text = text.p + released, ev.text_len = text.len - released;
            ev.finish = FORGE_FINISH_STOP;
            r->p.on_event(&ev, r->p.user);
            goto done;
        }
        if (r->p.logprobs) {
            logprobs_of(buf, n_vocab, lp, top, r->p.top_logprobs);
            ev.logprob = lp[id];
            ev.top = top;
            ev.n_top = r->p.top_logprobs;
        }
        n_gen++;
        ev.n_generated = n_gen;
        pthread_mutex_lock(&e->mu);
        e->st.generated_tokens++;
        pthread_mutex_unlock(&e->mu);
        size_t pl;
        const char *piece = forge_detok_stream_push(ds, id, &pl);
        if (tb_add(&text, piece ? piece : "", piece ? pl : 0)) goto nomem;
        ev.token = id;
        ev.finish = FORGE_FINISH_NONE;
        bool last = n_gen >= max || forge_context_pos(e->ctx) + 1 >= e->info.n_ctx;
        /* the earliest stop string in the new text ends the request before it */
        size_t from = released, stop_at = (size_t)-1;
        for (int32_t s = 0; s < r->p.n_stop; s++) {
            size_t sl = strlen(r->stop[s]);
            for (size_t i = from; i + sl <= text.len; i++)
                if (!memcmp(text.p + i, r->stop[s], sl)) {
                    if (i < stop_at) stop_at = i;
                    break;
                }
        }
        size_t end;
        if (stop_at != (size_t)-1) {
            end = stop_at;
            ev.finish = FORGE_FINISH_STOP;
        } else if (last) {
            size_t fl;
            const char *rest = forge_detok_stream_flush(ds, &fl);
            if (tb_add(&text, rest, fl)) goto nomem;
            end = text.len;
            ev.finish = FORGE_FINISH_LENGTH;
        } else {
            end = text.len - holdback(text.p, text.len, r->stop, r->p.n_stop);
            if (end < released) end = released;
        }
        ev.text = text.p + released;
        ev.text_len = end - released;
        released = end;
        r->p.on_event(&ev, r->p.user);
        if (ev.finish != FORGE_FINISH_NONE) goto done;
        if (forge_decode(e->ctx, &id, 1, false, &err)) goto fail;
    }
nomem:
    forge_err_set(&err, FORGE_E_NOMEM, "out of memory");
fail:
    ev.token = -1, ev.text = "", ev.text_len = 0, ev.finish = FORGE_FINISH_ERROR;
    ev.error = err.msg, ev.top = NULL, ev.n_top = 0;
    r->p.on_event(&ev, r->p.user);
done:
    free(text.p);
    free(buf);
    free(lp);
    forge_detok_stream_free(ds);
    forge_sampler_free(smp);
}

/* Run the next queued request to its end. Returns 1 if one ran, 0 if the queue was empty. */
static int step_one(forge_engine *e)
{
    pthread_mutex_lock(&e->mu);
    fb_req *r = e->head;
    if (r) {
        e->head = r->next;
        if (!e->head) e->tail = NULL;
        e->cur = r;
        e->st.n_waiting--;
        e->st.n_running = 1;
        e->st.blocks_used = e->st.blocks_total;
    }
    pthread_mutex_unlock(&e->mu);
    if (!r) return 0;
    run_request(e, r);
    pthread_mutex_lock(&e->mu);
    e->cur = NULL;
    e->st.n_running = 0;
    e->st.blocks_used = 0;
    e->st.n_steps++;
    pthread_mutex_unlock(&e->mu);
    req_free(r);
    return 1;
}

int forge_engine_step(forge_engine *e, forge_err *err)
{
    step_one(e);
    pthread_mutex_lock(&e->mu);
    int left = e->st.n_waiting;
    pthread_mutex_unlock(&e->mu);
    return left;
}

int forge_engine_run(forge_engine *e, forge_err *err)
{
    while (step_one(e))
        if (e->abort_flag && *e->abort_flag)
            return forge_err_set(err, FORGE_E_INTERRUPTED, "interrupted");
    return FORGE_OK;
}

static void *engine_thread(void *arg)
{
    forge_engine *e = arg;
    for (;;) {
        pthread_mutex_lock(&e->mu);
        while (!e->stopping && !e->head)
            pthread_cond_wait(&e->cv, &e->mu);
        bool stop = e->stopping;
        pthread_mutex_unlock(&e->mu);
        if (stop) break;
        step_one(e);
    }
    return NULL;
}

int forge_engine_start(forge_engine *e, forge_err *err)
{
    if (e->started) return forge_err_set(err, FORGE_E_INVALID, "engine: already started");
    if (pthread_create(&e->thread, NULL, engine_thread, e))
        return forge_err_set(err, FORGE_E_INTERNAL, "engine: cannot start its thread");
    e->started = true;
    return FORGE_OK;
}

void forge_engine_stop(forge_engine *e)
{
    if (!e) return;
    pthread_mutex_lock(&e->mu);
    e->stopping = true;
    if (e->cur) e->cur->cancelled = 1;
    fb_req *q = e->head;
    e->head = e->tail = NULL;
    e->st.n_waiting = 0;
    pthread_cond_broadcast(&e->cv);
    pthread_mutex_unlock(&e->mu);
    if (e->started) pthread_join(e->thread, NULL);
    e->started = false;
    while (q) { /* queued requests end with their last event too */
        fb_req *r = q;
        q = q->next;
        forge_event ev;
        memset(&ev, 0, sizeof ev);
        ev.id = r->id, ev.user = r->p.user, ev.token = -1, ev.text = "";
        ev.finish = FORGE_FINISH_CANCELLED, ev.n_prompt = r->p.n_prompt;
        r->p.on_event(&ev, r->p.user);
        req_free(r);
    }
    pthread_mutex_lock(&e->mu);
    e->stopping = false;
    pthread_mutex_unlock(&e->mu);
}

void forge_engine_set_abort_flag(forge_engine *e, const volatile sig_atomic_t *flag)
{
    e->abort_flag = flag;
}

void forge_engine_get_stats(forge_engine *e, forge_engine_stats *out)
{
    pthread_mutex_lock(&e->mu);
    *out = e->st;
    pthread_mutex_unlock(&e->mu);
}

#else
typedef int forge_engine_fallback_unused; /* ISO C wants a translation unit to declare something */
#endif
