/* server.c - `forge serve`: the HTTP side of the OpenAI-compatible server (forge_server.h).
 *
 * Owns: the libmicrohttpd daemon (a pool of HTTP threads, connections suspended while they wait
 * for tokens), one `job` per generation request (its choices, its output queue, its timing), the
 * chat template, the metrics. Borrows the engine and never steps it: HTTP threads parse,
 * validate, render, tokenize and submit; the engine's callbacks (on its thread) only append to a
 * job's queue under the job's mutex and resume the connection.
 *
 * A job is referenced by its connection (until libmicrohttpd reports the request completed) and
 * by each choice still running in the engine; the last reference frees it. */
#include <arpa/inet.h>
#include <math.h>
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <microhttpd.h>

#include "core/util.h"
#include "forge.h"
#include "forge_server.h"
#include "forge_template.h"
#include "srv_request.h"

#define N_BUCKETS 14
static const double bucket_le[N_BUCKETS] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                            0.25,  0.5,    1,     2.5,  5,     10,   30};

typedef struct histogram {
    uint64_t count[N_BUCKETS + 1]; /* last: +Inf */
    uint64_t n;
    double sum;
} histogram;

typedef struct textbuf {
    char *p;
    size_t len, cap;
} textbuf;

static int tb_add(textbuf *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 512;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *np = realloc(b->p, cap);
        if (!np) return -1;
        b->p = np;
        b->cap = cap;
    }
    if (n) memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
    return 0;
}

/* s[0..n) as valid UTF-8 without NULs (invalid bytes and NUL become U+FFFD), appended to b. */
static int tb_add_utf8(textbuf *b, const char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        size_t j = i;
        while (j < n && s[j] && (unsigned char)s[j] < 0x80)
            j++;
        if (j > i && tb_add(b, s + i, j - i)) return -1;
        i = j;
        if (i >= n) break;
        size_t bad = 0, take = 1;
        unsigned c = (unsigned char)s[i];
        size_t want = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
        if (c && want > 1 && i + want <= n && srv_utf8_valid(s + i, want, &bad))
            take = want;
        else
            want = 0;
        if (want ? tb_add(b, s + i, take) : tb_add(b, "\xEF\xBF\xBD", 3)) return -1;
        i += take;
    }
    return 0;
}

struct forge_server;

typedef struct choice {
    struct job *job;
    forge_req_id id;
    int index;
    bool running; /* submitted and its last event not yet seen */
    forge_finish finish;
    char *error;
    textbuf text; /* non-streaming: the answer */
    cJSON *lp;    /* non-streaming logprobs: chat "content" array, or completions object */
    int32_t n_prompt, n_gen;
    size_t text_offset; /* completions logprobs: text_offset of the next token */
    double t_last;
} choice;

typedef struct job {
    struct forge_server *srv;
    struct MHD_Connection *conn; /* NULL once the request completed */
    pthread_mutex_t mu;
    int refs;
    srv_request req;
    choice *ch;
    int n_ch, n_running;
    bool suspended; /* the connection waits for us to resume it */
    int fd;          /* non-streaming: the connection's socket while suspended (-1: none or
                      * already found closed); on the server's watch list meanwhile */
    bool client_gone; /* it was: the choices were cancelled, nothing is sent */
    bool held;      /* in the server's list of streams whose bytes wait for the interval */
    double t_resume; /* when the engine thread last resumed the connection */
    bool all_done;
    textbuf out; /* streaming: SSE bytes not yet handed to libmicrohttpd */
    size_t out_sent;
    char id[48];
    long long created;
    double t0, t_first;
    int32_t prompt_tokens, completion_tokens;
    bool cancelled; /* some choice was cancelled (shutdown or client gone) */
} job;

/* Per-connection state: the body being received, the job, what the access log says. */
typedef struct conn_ctx {
    textbuf body;
    size_t body_bytes;
    bool too_large;
    job *job;
    int status;
    double t0;
    char method[8];
    char path[96];
} conn_ctx;

struct forge_server {
    forge_engine *engine;
    const forge_model *model;
    const forge_tok *tok;
    forge_engine_info info;
    struct MHD_Daemon *d;
    forge_template *tmpl;
    forge_template_model tm;
    char *api_key, *alias, *cors;
    forge_server_params p;
    FILE *log;
    int port;
    atomic_int active; /* choices queued or running */
    atomic_int shutting_down;
    atomic_ullong next_job;
    long long started;
    pthread_mutex_t mmu; /* metrics and the log */
    uint64_t by_status[600];
    uint64_t prompt_tokens, gen_tokens;
    histogram ttft, itl;
    double stream_interval; /* seconds; 0: resume a stream's connection at every event */
    job **held;             /* streams held back for the interval: the engine thread's, one
                             * job reference each */
    int n_held, cap_held;
    /* non-streamed requests waiting for their answer, queued or running, one job reference
     * each: on_step_end looks at their sockets (watch_scan) */
    pthread_mutex_t wmu;
    job **watch;
    int n_watch, cap_watch;
    double t_scan; /* engine thread: when watch_scan last ran */
};

static void hist_add(histogram *h, double v)
{
    int i = 0;
    while (i < N_BUCKETS && v > bucket_le[i])
        i++;
    h->count[i]++;
    h->n++;
    h->sum += v;
}

forge_server_params forge_server_default_params(void)
{
    forge_server_params p;
    memset(&p, 0, sizeof p);
    p.host = "127.0.0.1";
    p.port = 8080;
    p.max_body = 1 << 20;
    p.timeout_s = 60;
    p.n_threads = 4;
    p.max_queue = 256;
    p.shutdown_timeout_s = 10;
    return p;
}

/* ---- jobs ------------------------------------------------------------------------------- */

static void job_unref(job *j)
{
    pthread_mutex_lock(&j->mu);
    bool last = --j->refs == 0;
    pthread_mutex_unlock(&j->mu);
    if (!last) return;
    for (int i = 0; i < j->n_ch; i++) {
        free(j->ch[i].text.p);
        free(j->ch[i].error);
        cJSON_Delete(j->ch[i].lp);
    }
    free(j->ch);
    free(j->out.p);
    srv_request_clear(&j->req);
    pthread_mutex_destroy(&j->mu);
    free(j);
}

static const char *finish_reason(forge_finish f)
{
    return f == FORGE_FINISH_LENGTH ? "length" : "stop";
}

static cJSON *token_bytes(const char *s, size_t n)
{
    cJSON *a = cJSON_CreateArray();
    for (size_t i = 0; a && i < n; i++)
        cJSON_AddItemToArray(a, cJSON_CreateNumber((unsigned char)s[i]));
    return a;
}

/* One token's piece as a JSON-safe string (caller frees). */
static char *piece_str(const forge_tok *tok, int32_t id, const char **raw, size_t *raw_len)
{
    textbuf b = {0};
    size_t len = 0;
    const char *p = forge_tok_piece(tok, id, true, &len);
    if (!p) p = "", len = 0;
    if (raw) *raw = p, *raw_len = len;
    if (tb_add_utf8(&b, p, len) || tb_add(&b, "", 0)) {
        free(b.p);
        return NULL;
    }
    return b.p;
}

/* Chat logprobs entry {"token","logprob","bytes","top_logprobs"} for one event. */
static cJSON *chat_logprob_entry(const forge_tok *tok, const forge_event *ev)
{
    const char *raw;
    size_t rl;
    char *s = piece_str(tok, ev->token, &raw, &rl);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "token", s ? s : "");
    cJSON_AddNumberToObject(o, "logprob", ev->logprob);
    cJSON_AddItemToObject(o, "bytes", token_bytes(raw, rl));
    free(s);
    cJSON *top = cJSON_AddArrayToObject(o, "top_logprobs");
    for (int32_t k = 0; k < ev->n_top; k++) {
        char *ts = piece_str(tok, ev->top[k].id, &raw, &rl);
        cJSON *t = cJSON_CreateObject();
        cJSON_AddStringToObject(t, "token", ts ? ts : "");
        cJSON_AddNumberToObject(t, "logprob", ev->top[k].logprob);
        cJSON_AddItemToObject(t, "bytes", token_bytes(raw, rl));
        cJSON_AddItemToArray(top, t);
        free(ts);
    }
    return o;
}

/* Completions logprobs {"tokens","token_logprobs","top_logprobs","text_offset"}: add one event. */
static void completion_logprob_add(const forge_tok *tok, cJSON *lp, const forge_event *ev,
                                   size_t offset)
{
    char *s = piece_str(tok, ev->token, NULL, NULL);
    cJSON_AddItemToArray(cJSON_GetObjectItem(lp, "tokens"), cJSON_CreateString(s ? s : ""));
    cJSON_AddItemToArray(cJSON_GetObjectItem(lp, "token_logprobs"),
                         cJSON_CreateNumber(ev->logprob));
    cJSON *top = cJSON_CreateObject();
    for (int32_t k = 0; k < ev->n_top; k++) {
        char *ts = piece_str(tok, ev->top[k].id, NULL, NULL);
        if (ts && !cJSON_GetObjectItemCaseSensitive(top, ts))
            cJSON_AddNumberToObject(top, ts, ev->top[k].logprob);
        free(ts);
    }
    cJSON_AddItemToArray(cJSON_GetObjectItem(lp, "top_logprobs"), top);
    cJSON_AddItemToArray(cJSON_GetObjectItem(lp, "text_offset"),
                         cJSON_CreateNumber((double)offset));
    free(s);
}

static cJSON *completion_logprobs_new(void)
{
    cJSON *lp = cJSON_CreateObject();
    cJSON_AddArrayToObject(lp, "tokens");
    cJSON_AddArrayToObject(lp, "token_logprobs");
    cJSON_AddArrayToObject(lp, "top_logprobs");
    cJSON_AddArrayToObject(lp, "text_offset");
    return lp;
}

static cJSON *usage_json(const job *j)
{
    cJSON *u = cJSON_CreateObject();
    cJSON_AddNumberToObject(u, "prompt_tokens", j->prompt_tokens);
    cJSON_AddNumberToObject(u, "completion_tokens", j->completion_tokens);
    cJSON_AddNumberToObject(u, "total_tokens", j->prompt_tokens + j->completion_tokens);
    return u;
}

static cJSON *chunk_head(const job *j)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", j->id);
    cJSON_AddStringToObject(o, "object",
                            j->req.kind == SRV_CHAT ? "chat.completion.chunk" : "text_completion");
    cJSON_AddNumberToObject(o, "created", (double)j->created);
    cJSON_AddStringToObject(o, "model", j->srv->alias);
    cJSON_AddStringToObject(o, "system_fingerprint", "forge-" FORGE_VERSION_STRING);
    return o;
}

/* Append "data: JSON\n\n" to the job's queue; takes o. */
static void sse_add(job *j, cJSON *o)
{
    char *s = o ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    if (!s) return;
    tb_add(&j->out, "data: ", 6);
    tb_add(&j->out, s, strlen(s));
    tb_add(&j->out, "\n\n", 2);
    cJSON_free(s);
}

/* A streamed chunk for one choice: text (may be empty), logprobs (taken), finish or NULL. */
static cJSON *stream_chunk(const job *j, int index, const char *text, cJSON *lp, const char *finish,
                           bool role)
{
    cJSON *o = chunk_head(j);
    cJSON *arr = cJSON_AddArrayToObject(o, "choices");
    cJSON *c = cJSON_CreateObject();
    cJSON_AddItemToArray(arr, c);
    cJSON_AddNumberToObject(c, "index", index);
    if (j->req.kind == SRV_CHAT) {
        cJSON *d = cJSON_AddObjectToObject(c, "delta");
        if (role) cJSON_AddStringToObject(d, "role", "assistant");
        if (text) cJSON_AddStringToObject(d, "content", text);
        if (lp) {
            cJSON *l = cJSON_AddObjectToObject(c, "logprobs");
            cJSON_AddItemToObject(l, "content", lp);
        } else {
            cJSON_AddNullToObject(c, "logprobs");
        }
    } else {
        cJSON_AddStringToObject(c, "text", text ? text : "");
        if (lp)
            cJSON_AddItemToObject(c, "logprobs", lp);
        else
            cJSON_AddNullToObject(c, "logprobs");
    }
    if (finish)
        cJSON_AddStringToObject(c, "finish_reason", finish);
    else
        cJSON_AddNullToObject(c, "finish_reason");
    if (j->req.include_usage) cJSON_AddNullToObject(o, "usage");
    return o;
}

static void stream_error(job *j, const char *msg)
{
    srv_error e;
    srv_fail(&e, 500, "server_error", NULL, NULL, "%s", msg);
    char *s = srv_error_json(&e);
    if (!s) return;
    tb_add(&j->out, "data: ", 6);
    tb_add(&j->out, s, strlen(s));
    tb_add(&j->out, "\n\n", 2);
    free(s);
}

/* Under j->mu: hand what the job has to libmicrohttpd (a finished job, or SSE bytes). */
static void job_resume(job *j, double t)
{
    if (j->suspended && j->conn && (j->all_done || j->out.len > j->out_sent)) {
        j->suspended = false;
        j->t_resume = t;
        MHD_resume_connection(j->conn);
    }
}

/* Under j->mu, engine thread: keep j (a reference) until on_step_end resumes it. If the list
 * cannot grow, the stream is resumed now instead. */
/* Append j to a growing list (capacity doubled from 64); false without memory (list unchanged). */
static bool jobs_push(job ***list, int *n, int *cap, job *j)
{
    if (*n == *cap) {
        int c = *cap ? 2 * *cap : 64;
        job **p = realloc(*list, (size_t)c * sizeof *p);
        if (!p) return false;
        *list = p;
        *cap = c;
    }
    (*list)[(*n)++] = j;
    return true;
}

static void hold_stream(struct forge_server *s, job *j)
{
    if (!jobs_push(&s->held, &s->n_held, &s->cap_held, j)) {
        job_resume(j, forge_now_s());
        return;
    }
    j->held = true;
    j->refs++;
}

/* How often (seconds, at most) on_step_end looks whether the clients of non-streaming requests
 * (queued or running) left. */
#define PEER_CHECK_S 0.002

/* Whether the peer of a suspended connection has closed it or reset it: end of file or an error
 * on a peek. The bytes of a pipelined next request are not a close; a client that shuts down only
 * its sending side counts as gone (as with llama.cpp's server). */
static bool peer_gone(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    if (poll(&p, 1, 0) <= 0) return false;
    if (p.revents & (POLLHUP | POLLERR | POLLNVAL)) return true;
    char c;
    ssize_t n = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

/* The engine's callback (engine thread): record the event in the job, resume the connection.
 * (A non-streaming request whose client has left is cancelled by watch_scan; a stream finds out
 * when it writes.) */
static void on_event(const forge_event *ev, void *user)
{
    choice *c = user;
    job *j = c->job;
    struct forge_server *srv = j->srv;
    const forge_tok *tok = srv->tok;
    double t = forge_now_s();
    bool last = ev->finish != FORGE_FINISH_NONE;

    pthread_mutex_lock(&j->mu);
    if (ev->token >= 0) {
        c->n_gen++;
        j->completion_tokens++;
        pthread_mutex_lock(&srv->mmu);
        srv->gen_tokens++;
        if (c->t_last == 0)
            hist_add(&srv->ttft, t - j->t0);
        else
            hist_add(&srv->itl, t - c->t_last);
        pthread_mutex_unlock(&srv->mmu);
        c->t_last = t;
        if (j->t_first == 0) j->t_first = t;
    }
    textbuf txt = {0};
    tb_add_utf8(&txt, ev->text ? ev->text : "", ev->text ? ev->text_len : 0);
    tb_add(&txt, "", 0);
    bool want_lp = j->req.logprobs && ev->token >= 0;
    if (j->req.stream && !j->conn) {
        /* the client is gone: nothing to format, the choice is being cancelled */
    } else if (j->req.stream) {
        cJSON *lp = NULL;
        if (want_lp) {
            if (j->req.kind == SRV_CHAT) {
                lp = cJSON_CreateArray();
                cJSON_AddItemToArray(lp, chat_logprob_entry(tok, ev));
            } else {
                lp = completion_logprobs_new();
                completion_logprob_add(tok, lp, ev, c->text_offset);
            }
        }
        c->text_offset += txt.len;
        if (txt.len || lp) sse_add(j, stream_chunk(j, c->index, txt.p, lp, NULL, false));
        if (last && ev->finish != FORGE_FINISH_ERROR)
            sse_add(j, stream_chunk(j, c->index, NULL, NULL, finish_reason(ev->finish), false));
        if (ev->finish == FORGE_FINISH_ERROR) stream_error(j, ev->error ? ev->error : "error");
    } else {
        if (want_lp) {
            if (!c->lp)
                c->lp = j->req.kind == SRV_CHAT ? cJSON_CreateArray() : completion_logprobs_new();
            if (j->req.kind == SRV_CHAT)
                cJSON_AddItemToArray(c->lp, chat_logprob_entry(tok, ev));
            else
                completion_logprob_add(tok, c->lp, ev, c->text.len);
        }
        tb_add(&c->text, txt.p, txt.len);
    }
    free(txt.p);
    bool free_ref = false;
    if (last) {
        c->finish = ev->finish;
        c->running = false;
        if (ev->finish == FORGE_FINISH_ERROR) c->error = strdup(ev->error ? ev->error : "error");
        if (ev->finish == FORGE_FINISH_CANCELLED) j->cancelled = true;
        j->n_running--;
        atomic_fetch_sub(&srv->active, 1);
        free_ref = true;
        if (j->n_running == 0) {
            j->all_done = true;
            if (j->req.stream) {
                if (j->req.include_usage) {
                    cJSON *o = chunk_head(j);
                    cJSON_AddArrayToObject(o, "choices");
                    cJSON_AddItemToObject(o, "usage", usage_json(j));
                    sse_add(j, o);
                }
                tb_add(&j->out, "data: [DONE]\n\n", 14);
            }
        }
    }
    /* a stream's connection is resumed at most once per interval: the bytes of later events
     * wait for on_step_end (the first and the last event always go out at once) */
    if (!j->req.stream || j->all_done || t - j->t_resume >= srv->stream_interval)
        job_resume(j, t);
    else if (!j->held && j->conn && j->out.len > j->out_sent)
        hold_stream(srv, j);
    pthread_mutex_unlock(&j->mu);
    if (free_ref) job_unref(j);
}

/* HTTP thread, j suspended and not locked: put j (a new reference) on the watch list. Without
 * memory for it the job is not watched: a client that leaves is then noticed only when its
 * answer is sent. */
static void watch_add(struct forge_server *s, job *j)
{
    pthread_mutex_lock(&s->wmu);
    if (jobs_push(&s->watch, &s->n_watch, &s->cap_watch, j)) {
        pthread_mutex_lock(&j->mu);
        j->refs++;
        pthread_mutex_unlock(&j->mu);
    }
    pthread_mutex_unlock(&s->wmu);
}

/* Engine thread, at most every PEER_CHECK_S: every watched request whose client has closed its
 * socket is cancelled, queued ones (no event yet) included; finished ones leave the list. The
 * list is taken out of the lock, so HTTP threads add to a fresh one meanwhile. */
static void watch_scan(struct forge_server *s, double t)
{
    if (t - s->t_scan < PEER_CHECK_S) return;
    s->t_scan = t;
    pthread_mutex_lock(&s->wmu);
    job **list = s->watch;
    int n = s->n_watch, cap = s->cap_watch;
    s->watch = NULL;
    s->n_watch = s->cap_watch = 0;
    pthread_mutex_unlock(&s->wmu);
    int keep = 0;
    for (int i = 0; i < n; i++) {
        job *j = list[i];
        forge_req_id gone[SRV_MAX_CHOICES];
        int n_gone = 0;
        pthread_mutex_lock(&j->mu);
        bool watched = j->suspended && j->conn && j->fd >= 0 && !j->all_done;
        if (watched && peer_gone(j->fd)) {
            j->fd = -1;
            j->client_gone = true;
            watched = false;
            for (int c = 0; c < j->n_ch && n_gone < SRV_MAX_CHOICES; c++)
                if (j->ch[c].running) gone[n_gone++] = j->ch[c].id;
        }
        pthread_mutex_unlock(&j->mu);
        /* outside the job's lock, as on_completed does; the last events come at the next step */
        for (int c = 0; c < n_gone; c++)
            forge_engine_cancel(s->engine, gone[c], NULL);
        if (watched)
            list[keep++] = j;
        else
            job_unref(j);
    }
    /* put the kept ones back, before what HTTP threads added meanwhile (without memory for
     * that, the kept ones are not watched any more) */
    pthread_mutex_lock(&s->wmu);
    const int total = keep + s->n_watch;
    job **p = keep == 0 || total <= cap ? list : realloc(list, (size_t)total * sizeof *p);
    if (keep > 0 && p) {
        if (s->n_watch) memcpy(p + keep, s->watch, (size_t)s->n_watch * sizeof *p);
        free(s->watch);
        s->watch = p;
        s->n_watch = total;
        s->cap_watch = total > cap ? total : cap;
    } else {
        for (int i = 0; i < keep; i++)
            job_unref(list[i]);
        free(list);
    }
    pthread_mutex_unlock(&s->wmu);
}

/* After every engine step (engine thread): resume the held streams whose interval is over. */
static void on_step_end(void *user)
{
    struct forge_server *s = user;
    double t = forge_now_s();
    watch_scan(s, t);
    int keep = 0;
    for (int i = 0; i < s->n_held; i++) {
        job *j = s->held[i];
        pthread_mutex_lock(&j->mu);
        bool due = !j->conn || j->all_done || t - j->t_resume >= s->stream_interval;
        if (due) {
            job_resume(j, t);
            j->held = false;
        }
        pthread_mutex_unlock(&j->mu);
        if (due)
            job_unref(j);
        else
            s->held[keep++] = j;
    }
    s->n_held = keep;
}

/* ---- responses -------------------------------------------------------------------------- */

static void add_common_headers(struct forge_server *s, struct MHD_Response *r)
{
    if (s->cors) {
        MHD_add_response_header(r, "Access-Control-Allow-Origin", s->cors);
        MHD_add_response_header(r, "Access-Control-Allow-Headers", "Authorization, Content-Type");
        MHD_add_response_header(r, "Access-Control-Allow-Methods", "GET, POST, OPTIONS");
        if (strcmp(s->cors, "*")) MHD_add_response_header(r, "Vary", "Origin");
    }
}

static enum MHD_Result send_buf(struct forge_server *s, struct MHD_Connection *conn, conn_ctx *cc,
                                int status, const char *type, const void *data, size_t len,
                                bool copy)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(
        len, (void *)data, copy ? MHD_RESPMEM_MUST_COPY : MHD_RESPMEM_PERSISTENT);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, "Content-Type", type);
    add_common_headers(s, r);
    if (status == 503) MHD_add_response_header(r, "Retry-After", "1");
    if (status == 401) MHD_add_response_header(r, "WWW-Authenticate", "Bearer");
    cc->status = status;
    enum MHD_Result ret = MHD_queue_response(conn, (unsigned)status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result send_json(struct forge_server *s, struct MHD_Connection *conn, conn_ctx *cc,
                                 int status, cJSON *o)
{
    char *txt = o ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    if (!txt) return MHD_NO;
    enum MHD_Result r = send_buf(s, conn, cc, status, "application/json", txt, strlen(txt), true);
    cJSON_free(txt);
    return r;
}

static enum MHD_Result send_error(struct forge_server *s, struct MHD_Connection *conn, conn_ctx *cc,
                                  const srv_error *e)
{
    char *txt = srv_error_json(e);
    if (!txt) return MHD_NO;
    enum MHD_Result r =
        send_buf(s, conn, cc, e->status, "application/json", txt, strlen(txt), true);
    free(txt);
    return r;
}

static enum MHD_Result fail(struct forge_server *s, struct MHD_Connection *conn, conn_ctx *cc,
                            int status, const char *type, const char *param, const char *code,
                            const char *fmt, ...) __attribute__((format(printf, 8, 9)));
static enum MHD_Result fail(struct forge_server *s, struct MHD_Connection *conn, conn_ctx *cc,
                            int status, const char *type, const char *param, const char *code,
                            const char *fmt, ...)
{
    srv_error e;
    va_list ap;
    srv_fail(&e, status, type, param, code, "%s", "");
    va_start(ap, fmt);
    vsnprintf(e.message, sizeof e.message, fmt, ap);
    va_end(ap);
    return send_error(s, conn, cc, &e);
}

/* The full response of a finished non-streaming job. */
static enum MHD_Result send_job_result(struct forge_server *s, struct MHD_Connection *conn,
                                       conn_ctx *cc, job *j)
{
    if (j->client_gone) {
        cc->status = 499; /* the access log's "client closed the request"; the connection closes */
        return MHD_NO;
    }
    for (int i = 0; i < j->n_ch; i++)
        if (j->ch[i].finish == FORGE_FINISH_ERROR)
            return fail(s, conn, cc, 500, "server_error", NULL, NULL, "generation failed: %s",
                        j->ch[i].error ? j->ch[i].error : "?");
    if (j->cancelled)
        return fail(s, conn, cc, 503, "server_error", NULL, "shutting_down",
                    "the request was cancelled: the server is shutting down");
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", j->id);
    cJSON_AddStringToObject(o, "object",
                            j->req.kind == SRV_CHAT ? "chat.completion" : "text_completion");
    cJSON_AddNumberToObject(o, "created", (double)j->created);
    cJSON_AddStringToObject(o, "model", s->alias);
    cJSON_AddStringToObject(o, "system_fingerprint", "forge-" FORGE_VERSION_STRING);
    cJSON *arr = cJSON_AddArrayToObject(o, "choices");
    for (int i = 0; i < j->n_ch; i++) {
        choice *c = &j->ch[i];
        cJSON *co = cJSON_CreateObject();
        cJSON_AddItemToArray(arr, co);
        cJSON_AddNumberToObject(co, "index", c->index);
        if (j->req.kind == SRV_CHAT) {
            cJSON *m = cJSON_AddObjectToObject(co, "message");
            cJSON_AddStringToObject(m, "role", "assistant");
            cJSON_AddStringToObject(m, "content", c->text.p ? c->text.p : "");
            cJSON_AddNullToObject(m, "refusal");
            if (j->req.logprobs) {
                cJSON *l = cJSON_AddObjectToObject(co, "logprobs");
                cJSON_AddItemToObject(l, "content", c->lp ? c->lp : cJSON_CreateArray());
                cJSON_AddNullToObject(l, "refusal");
                c->lp = NULL;
            } else {
                cJSON_AddNullToObject(co, "logprobs");
            }
        } else {
            cJSON_AddStringToObject(co, "text", c->text.p ? c->text.p : "");
            if (j->req.logprobs) {
                cJSON_AddItemToObject(co, "logprobs", c->lp ? c->lp : completion_logprobs_new());
                c->lp = NULL;
            } else {
                cJSON_AddNullToObject(co, "logprobs");
            }
        }
        cJSON_AddStringToObject(co, "finish_reason", finish_reason(c->finish));
    }
    cJSON_AddItemToObject(o, "usage", usage_json(j));
    return send_json(s, conn, cc, 200, o);
}

/* libmicrohttpd pulls the SSE stream from here (an HTTP thread). */
static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max)
{
    job *j = cls;
    ssize_t n = 0;
    pthread_mutex_lock(&j->mu);
    if (j->out_sent < j->out.len) {
        size_t k = j->out.len - j->out_sent;
        if (k > max) k = max;
        memcpy(buf, j->out.p + j->out_sent, k);
        j->out_sent += k;
        if (j->out_sent == j->out.len) j->out_sent = j->out.len = 0;
        n = (ssize_t)k;
    } else if (j->all_done) {
        n = MHD_CONTENT_READER_END_OF_STREAM;
    } else if (j->conn) {
        /* nothing yet: wait for the engine's callback to resume us (under the job's lock, so
         * the resume cannot come before the suspend) */
        j->suspended = true;
        MHD_suspend_connection(j->conn);
    }
    pthread_mutex_unlock(&j->mu);
    return n;
}

static void stream_free(void *cls)
{
    job_unref(cls);
}

/* ---- generation requests ---------------------------------------------------------------- */

/* Tokens of a chat request's rendered messages. */
static int chat_prompt(struct forge_server *s, const srv_request *rq, int32_t **ids, size_t *n,
                       srv_error *e)
{
    forge_err err = {0};
    char *prompt = NULL;
    size_t len = 0;
    forge_template_vars v = {0};
    v.messages_json = rq->messages_json;
    v.add_generation_prompt = true;
    v.bos_token = s->tm.bos_token;
    v.eos_token = s->tm.eos_token;
    v.name = "the chat template";
    if (forge_template_render(s->tmpl, &v, &prompt, &len, NULL, &err))
        return srv_fail(e, 400, NULL, "messages", "template_error",
                        "the chat template rejects these messages: %s", err.msg);
    /* the template writes BOS itself when it wants one (as forge chat does) */
    bool add_special =
        forge_tok_adds_bos(s->tok) && !(s->tm.bos_token && *s->tm.bos_token &&
                                        !strncmp(prompt, s->tm.bos_token, strlen(s->tm.bos_token)));
    int rc = forge_tok_encode(s->tok, prompt, len, add_special, true, ids, n, &err);
    free(prompt);
    if (rc) return srv_fail(e, 400, NULL, "messages", "invalid_value", "%s", err.msg);
    return 0;
}

static enum MHD_Result start_job(struct forge_server *s, struct MHD_Connection *conn, conn_ctx *cc,
                                 srv_kind kind)
{
    srv_error e;
    job *j = NULL;
    int32_t **pids = NULL;
    size_t *pn = NULL;
    int n_prompts = 0;
    enum MHD_Result ret = MHD_NO;
    const int32_t n_ctx = s->info.n_ctx;
    const int32_t n_vocab = forge_model_info_get(s->model)->n_vocab;

    if (!(j = calloc(1, sizeof *j))) goto nomem;
    pthread_mutex_init(&j->mu, NULL);
    j->srv = s;
    j->refs = 1;
    j->fd = -1;
    j->t0 = cc->t0;
    if (srv_request_parse(kind, cc->body.p ? cc->body.p : "", cc->body.len, &j->req, &e)) goto err;
    srv_request *rq = &j->req;
    if (rq->model && strcmp(rq->model, s->alias)) {
        srv_fail(&e, 404, NULL, "model", "model_not_found",
                 "the model '%.200s' does not exist; this server has '%s'", rq->model, s->alias);
        goto err;
    }
    n_prompts = kind == SRV_CHAT ? 1 : rq->n_prompts;
    pids = calloc((size_t)n_prompts, sizeof *pids);
    pn = calloc((size_t)n_prompts, sizeof *pn);
    if (!pids || !pn) goto nomem;
    for (int i = 0; i < n_prompts; i++) {
        forge_err err = {0};
        if (kind == SRV_CHAT) {
            if (chat_prompt(s, rq, &pids[i], &pn[i], &e)) goto err;
        } else if (rq->prompts[i].is_ids) {
            srv_prompt *sp = &rq->prompts[i];
            for (int32_t k = 0; k < sp->n_ids; k++)
                if (sp->ids[k] >= n_vocab) {
                    srv_fail(&e, 400, NULL, "prompt", "invalid_value",
                             "'prompt' token id %d is outside the vocabulary (0..%d)", sp->ids[k],
                             n_vocab - 1);
                    goto err;
                }
            if (!(pids[i] = malloc((size_t)sp->n_ids * sizeof *pids[i]))) goto nomem;
            memcpy(pids[i], sp->ids, (size_t)sp->n_ids * sizeof *pids[i]);
            pn[i] = (size_t)sp->n_ids;
        } else if (forge_tok_encode(s->tok, rq->prompts[i].text, rq->prompts[i].text_len, true,
                                    true, &pids[i], &pn[i], &err)) {
            srv_fail(&e, 400, NULL, "prompt", "invalid_value", "%s", err.msg);
            goto err;
        }
        if (pn[i] == 0) {
            srv_fail(&e, 400, NULL, kind == SRV_CHAT ? "messages" : "prompt", "invalid_value",
                     "the prompt is empty (0 tokens)");
            goto err;
        }
        if ((int64_t)pn[i] >= n_ctx) {
            srv_fail(&e, 400, NULL, kind == SRV_CHAT ? "messages" : "prompt",
                     "context_length_exceeded",
                     "the prompt is %zu tokens; this model's context is %d tokens, which must "
                     "hold the prompt and at least 1 generated token",
                     pn[i], n_ctx);
            goto err;
        }
        if (rq->max_tokens > 0 && (int64_t)pn[i] + rq->max_tokens > n_ctx) {
            srv_fail(&e, 400, NULL, "max_tokens", "context_length_exceeded",
                     "the prompt (%zu tokens) + max_tokens (%d) is %lld tokens; this model's "
                     "context is %d tokens",
                     pn[i], rq->max_tokens, (long long)pn[i] + rq->max_tokens, n_ctx);
            goto err;
        }
    }
    for (int32_t i = 0; i < rq->n_logit_bias; i++)
        if (rq->logit_bias[i].id >= n_vocab) {
            srv_fail(&e, 400, NULL, "logit_bias", "invalid_value",
                     "'logit_bias' token id %d is outside the vocabulary (0..%d)",
                     rq->logit_bias[i].id, n_vocab - 1);
            goto err;
        }
    int n_ch = n_prompts * rq->n;
    if (atomic_load(&s->shutting_down)) {
        srv_fail(&e, 503, "server_error", NULL, "shutting_down", "the server is shutting down");
        goto err;
    }
    if (atomic_fetch_add(&s->active, n_ch) + n_ch > s->p.max_queue) {
        atomic_fetch_sub(&s->active, n_ch);
        srv_fail(&e, 503, "server_error", NULL, "queue_full",
                 "the server is busy (%d requests queued or running, at most %d); retry later",
                 atomic_load(&s->active), s->p.max_queue);
        goto err;
    }
    if (!(j->ch = calloc((size_t)n_ch, sizeof *j->ch))) {
        atomic_fetch_sub(&s->active, n_ch);
        goto nomem;
    }
    j->n_ch = n_ch;
    snprintf(j->id, sizeof j->id, "%s-%llx", kind == SRV_CHAT ? "chatcmpl" : "cmpl",
             (unsigned long long)atomic_fetch_add(&s->next_job, 1));
    j->created = (long long)time(NULL);
    for (int i = 0; i < n_prompts; i++)
        j->prompt_tokens += (int32_t)pn[i];
    pthread_mutex_lock(&s->mmu);
    s->prompt_tokens += (uint64_t)j->prompt_tokens;
    pthread_mutex_unlock(&s->mmu);

    /* one engine request per choice; choice k of prompt i has index i*n + k and seed seed + k */
    uint64_t seed = rq->seed_set ? rq->seed
                                 : (uint64_t)time(NULL) * 0x9E3779B97F4A7C15ull ^
                                       atomic_fetch_add(&s->next_job, 1);
    forge_request_params rp = forge_request_default_params();
    rp.sampling = forge_sampler_default_params();
    rp.sampling.temperature = rq->temperature;
    rp.sampling.top_k = rq->top_k;
    rp.sampling.top_p = rq->top_p;
    rp.sampling.min_p = rq->min_p;
    rp.sampling.repeat_penalty = rq->repeat_penalty;
    rp.sampling.presence_penalty = rq->presence_penalty;
    rp.sampling.frequency_penalty = rq->frequency_penalty;
    rp.stop = (const char *const *)rq->stop;
    rp.n_stop = rq->n_stop;
    rp.ignore_eos = rq->ignore_eos;
    rp.logprobs = rq->logprobs;
    rp.top_logprobs = rq->top_logprobs;
    rp.logit_bias = rq->logit_bias;
    rp.n_logit_bias = rq->n_logit_bias;
    rp.on_event = on_event;

    /* every choice counts as running (and holds a reference) before the first is submitted,
     * so the job cannot look finished while the rest are still being submitted; submit runs
     * without the job's lock, so the engine may deliver events meanwhile */
    pthread_mutex_lock(&j->mu);
    j->conn = conn;
    if (rq->stream && kind == SRV_CHAT)
        for (int i = 0; i < n_ch; i++)
            sse_add(j, stream_chunk(j, i, "", NULL, NULL, true));
    for (int i = 0; i < n_ch; i++) {
        j->ch[i].job = j;
        j->ch[i].index = i;
        j->ch[i].running = true;
    }
    j->n_running = n_ch;
    j->refs += n_ch;
    pthread_mutex_unlock(&j->mu);
    int submitted = 0;
    forge_err err = {0};
    for (int i = 0; i < n_prompts; i++)
        for (int k = 0; k < rq->n; k++) {
            choice *c = &j->ch[i * rq->n + k];
            c->n_prompt = (int32_t)pn[i];
            rp.prompt = pids[i];
            rp.n_prompt = (int32_t)pn[i];
            rp.max_tokens = rq->max_tokens > 0 ? rq->max_tokens
                            : kind == SRV_COMPLETION
                                ? (n_ctx - (int32_t)pn[i] < 16 ? n_ctx - (int32_t)pn[i] : 16)
                                : n_ctx - (int32_t)pn[i];
            rp.sampling.seed = seed + (uint64_t)k;
            rp.user = c;
            if (forge_engine_submit(s->engine, &rp, &c->id, &err)) goto submit_failed;
            submitted++;
        }
    pthread_mutex_lock(&j->mu);
    if (rq->stream) {
        struct MHD_Response *r = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384,
                                                                   stream_reader, j, stream_free);
        if (!r) {
            pthread_mutex_unlock(&j->mu);
            goto nomem;
        }
        j->refs++; /* the response's */
        pthread_mutex_unlock(&j->mu);
        MHD_add_response_header(r, "Content-Type", "text/event-stream");
        MHD_add_response_header(r, "Cache-Control", "no-cache");
        MHD_add_response_header(r, "X-Accel-Buffering", "no");
        add_common_headers(s, r);
        cc->status = 200;
        ret = MHD_queue_response(conn, 200, r);
        MHD_destroy_response(r);
    } else if (j->all_done) {
        pthread_mutex_unlock(&j->mu);
        ret = send_job_result(s, conn, cc, j);
    } else {
        /* libmicrohttpd does not watch a suspended connection: watch_scan looks at its socket */
        const union MHD_ConnectionInfo *ci =
            MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
        j->fd = ci ? (int)ci->connect_fd : -1;
        j->suspended = true;
        MHD_suspend_connection(conn);
        pthread_mutex_unlock(&j->mu);
        if (j->fd >= 0) watch_add(s, j);
        ret = MHD_YES;
    }
    cc->job = j;
    j = NULL;
    goto done;

submit_failed:
    /* what was submitted still delivers its last events (the job lives until then); what was
     * not gives back its count and reference */
    atomic_fetch_sub(&s->active, n_ch - submitted);
    pthread_mutex_lock(&j->mu);
    j->conn = NULL;
    for (int i = submitted; i < n_ch; i++)
        j->ch[i].running = false;
    j->n_running -= n_ch - submitted;
    j->refs -= n_ch - submitted;
    pthread_mutex_unlock(&j->mu);
    for (int i = 0; i < submitted; i++)
        forge_engine_cancel(s->engine, j->ch[i].id, NULL);
    if (err.code == FORGE_E_RANGE || err.code == FORGE_E_INVALID)
        srv_fail(&e, 400, NULL, NULL,
                 err.code == FORGE_E_RANGE ? "context_length_exceeded" : "invalid_value", "%s",
                 err.msg);
    else
        srv_fail(&e, 503, "server_error", NULL, NULL, "%s", err.msg);
    goto err;
nomem:
    srv_fail(&e, 503, "server_error", NULL, NULL, "out of memory");
err:
    ret = send_error(s, conn, cc, &e);
done:
    for (int i = 0; i < n_prompts && pids; i++)
        free(pids[i]);
    free(pids);
    free(pn);
    if (j) job_unref(j);
    return ret;
}

/* ---- other endpoints -------------------------------------------------------------------- */

static enum MHD_Result models(struct forge_server *s, struct MHD_Connection *conn, conn_ctx *cc,
                              const char *one)
{
    if (one && strcmp(one, s->alias))
        return fail(s, conn, cc, 404, NULL, "model", "model_not_found",
                    "the model '%.200s' does not exist; this server has '%s'", one, s->alias);
    cJSON *m = cJSON_CreateObject();
    cJSON_AddStringToObject(m, "id", s->alias);
    cJSON_AddStringToObject(m, "object", "model");
    cJSON_AddNumberToObject(m, "created", (double)s->started);
    cJSON_AddStringToObject(m, "owned_by", "forge");
    cJSON *meta = cJSON_AddObjectToObject(m, "meta");
    cJSON_AddNumberToObject(meta, "n_ctx", s->info.n_ctx);
    cJSON_AddNumberToObject(meta, "n_vocab", forge_model_info_get(s->model)->n_vocab);
    cJSON_AddStringToObject(meta, "device", s->info.device ? s->info.device : "");
    if (one) return send_json(s, conn, cc, 200, m);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "object", "list");
    cJSON_AddItemToArray(cJSON_AddArrayToObject(o, "data"), m);
    return send_json(s, conn, cc, 200, o);
}

static enum MHD_Result metrics(struct forge_server *s, struct MHD_Connection *conn, conn_ctx *cc)
{
    forge_engine_stats st;
    forge_engine_get_stats(s->engine, &st);
    textbuf b = {0};
    char line[256];
#define OUT(...)                                                                                   \
    do {                                                                                           \
        snprintf(line, sizeof line, __VA_ARGS__);                                                  \
        tb_add(&b, line, strlen(line));                                                            \
    } while (0)
    pthread_mutex_lock(&s->mmu);
    OUT("# HELP forge_requests_total HTTP requests answered, by status.\n");
    OUT("# TYPE forge_requests_total counter\n");
    for (int i = 100; i < 600; i++)
        if (s->by_status[i])
            OUT("forge_requests_total{status=\"%d\"} %llu\n", i,
                (unsigned long long)s->by_status[i]);
    OUT("# HELP forge_prompt_tokens_total Prompt tokens of accepted requests.\n");
    OUT("# TYPE forge_prompt_tokens_total counter\n");
    OUT("forge_prompt_tokens_total %llu\n", (unsigned long long)s->prompt_tokens);
    OUT("# HELP forge_generation_tokens_total Tokens generated.\n");
    OUT("# TYPE forge_generation_tokens_total counter\n");
    OUT("forge_generation_tokens_total %llu\n", (unsigned long long)s->gen_tokens);
    const struct {
        const char *name, *help;
        histogram *h;
    } hs[2] = {{"forge_time_to_first_token_seconds", "Time from request to first token.", &s->ttft},
               {"forge_inter_token_latency_seconds", "Time between tokens of a request.", &s->itl}};
    for (int k = 0; k < 2; k++) {
        OUT("# HELP %s %s\n# TYPE %s histogram\n", hs[k].name, hs[k].help, hs[k].name);
        uint64_t cum = 0;
        for (int i = 0; i < N_BUCKETS; i++) {
            cum += hs[k].h->count[i];
            OUT("%s_bucket{le=\"%g\"} %llu\n", hs[k].name, bucket_le[i], (unsigned long long)cum);
        }
        cum += hs[k].h->count[N_BUCKETS];
        OUT("%s_bucket{le=\"+Inf\"} %llu\n", hs[k].name, (unsigned long long)cum);
        OUT("%s_sum %.6f\n%s_count %llu\n", hs[k].name, hs[k].h->sum, hs[k].name,
            (unsigned long long)hs[k].h->n);
    }
    pthread_mutex_unlock(&s->mmu);
    OUT("# HELP forge_queue_depth Requests waiting for the engine.\n# TYPE forge_queue_depth "
        "gauge\n");
    OUT("forge_queue_depth %d\n", st.n_waiting);
    OUT("# HELP forge_running_sequences Requests decoding or in prefill.\n");
    OUT("# TYPE forge_running_sequences gauge\nforge_running_sequences %d\n", st.n_running);
    OUT("# HELP forge_kv_blocks_used KV blocks in use by requests.\n");
    OUT("# TYPE forge_kv_blocks_used gauge\nforge_kv_blocks_used %d\n", st.blocks_used);
    OUT("# HELP forge_kv_blocks_total KV blocks in the pool.\n");
    OUT("# TYPE forge_kv_blocks_total gauge\nforge_kv_blocks_total %d\n", st.blocks_total);
    OUT("# HELP forge_prefix_cache_hit_rate Prompt tokens served from the prefix cache / prompt "
        "tokens.\n");
    OUT("# TYPE forge_prefix_cache_hit_rate gauge\nforge_prefix_cache_hit_rate %.6f\n",
        st.prompt_tokens ? (double)st.cached_tokens / (double)st.prompt_tokens : 0.0);
    OUT("# HELP forge_preemptions_total Requests preempted for KV space.\n");
    OUT("# TYPE forge_preemptions_total counter\nforge_preemptions_total %llu\n",
        (unsigned long long)st.n_preempted);
    OUT("# HELP forge_active_requests Choices queued or running, as the server counts them.\n");
    OUT("# TYPE forge_active_requests gauge\nforge_active_requests %d\n", atomic_load(&s->active));
#undef OUT
    enum MHD_Result r =
        send_buf(s, conn, cc, 200, "text/plain; version=0.0.4", b.p ? b.p : "", b.len, true);
    free(b.p);
    return r;
}

static enum MHD_Result tokenize(struct forge_server *s, struct MHD_Connection *conn, conn_ctx *cc)
{
    srv_error e;
    char *text = NULL;
    size_t len = 0, n = 0;
    bool add_special = false;
    int32_t *ids = NULL;
    forge_err err = {0};
    if (srv_tokenize_parse(cc->body.p ? cc->body.p : "", cc->body.len, &text, &len, &add_special,
                           &e))
        return send_error(s, conn, cc, &e);
    int rc = forge_tok_encode(s->tok, text, len, add_special, true, &ids, &n, &err);
    free(text);
    if (rc) return fail(s, conn, cc, 400, NULL, "content", "invalid_value", "%s", err.msg);
    cJSON *o = cJSON_CreateObject();
    cJSON *a = cJSON_AddArrayToObject(o, "tokens");
    for (size_t i = 0; i < n; i++)
        cJSON_AddItemToArray(a, cJSON_CreateNumber(ids[i]));
    cJSON_AddNumberToObject(o, "count", (double)n);
    cJSON_AddNumberToObject(o, "max_model_len", s->info.n_ctx);
    free(ids);
    return send_json(s, conn, cc, 200, o);
}

static enum MHD_Result detokenize(struct forge_server *s, struct MHD_Connection *conn, conn_ctx *cc)
{
    srv_error e;
    int32_t *ids = NULL, n = 0;
    char *out = NULL;
    size_t len = 0;
    forge_err err = {0};
    textbuf b = {0};
    if (srv_detokenize_parse(cc->body.p ? cc->body.p : "", cc->body.len, &ids, &n, &e))
        return send_error(s, conn, cc, &e);
    int rc = forge_tok_decode(s->tok, ids, (size_t)n, false, false, &out, &len, &err);
    free(ids);
    if (rc) return fail(s, conn, cc, 400, NULL, "tokens", "invalid_value", "%s", err.msg);
    tb_add_utf8(&b, out, len);
    tb_add(&b, "", 0);
    free(out);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "content", b.p ? b.p : "");
    free(b.p);
    return send_json(s, conn, cc, 200, o);
}

/* Constant-time: the time depends on the given key's length only, not on where it differs. */
static bool key_ok(const char *want, const char *got)
{
    size_t wl = strlen(want), gl = strlen(got);
    unsigned char diff = (unsigned char)(wl != gl);
    for (size_t i = 0; i < gl; i++)
        diff |= (unsigned char)(got[i] ^ want[wl ? i % wl : 0]);
    return diff == 0;
}

static bool authorized(struct forge_server *s, struct MHD_Connection *conn)
{
    if (!s->api_key) return true;
    const char *h = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Authorization");
    if (!h || strncasecmp(h, "Bearer ", 7)) return false;
    h += 7;
    while (*h == ' ')
        h++;
    return key_ok(s->api_key, h);
}

/* ---- libmicrohttpd callbacks ------------------------------------------------------------ */

static enum MHD_Result route(struct forge_server *s, struct MHD_Connection *conn, conn_ctx *cc,
                             const char *url, const char *method)
{
    bool get = !strcmp(method, "GET") || !strcmp(method, "HEAD");
    bool post = !strcmp(method, "POST");
    if (!strcmp(method, "OPTIONS")) { /* CORS preflight */
        return send_buf(s, conn, cc, s->cors ? 204 : 405, "text/plain", "", 0, false);
    }
    if (cc->too_large)
        return fail(s, conn, cc, 413, NULL, NULL, "request_too_large",
                    "the request body is larger than %zu bytes (--max-body)", s->p.max_body);
    if (!strcmp(url, "/") || !strcmp(url, "/index.html")) {
        if (!get) goto bad_method;
        return send_buf(s, conn, cc, 200, "text/html; charset=utf-8", forge_server_chat_html,
                        forge_server_chat_html_len, false);
    }
    if (!strcmp(url, "/health")) {
        if (!get) goto bad_method;
        if (atomic_load(&s->shutting_down))
            return send_buf(s, conn, cc, 503, "application/json", "{\"status\":\"shutting down\"}",
                            26, false);
        return send_buf(s, conn, cc, 200, "application/json", "{\"status\":\"ok\"}", 15, false);
    }
    if (!strcmp(url, "/metrics")) {
        if (!get) goto bad_method;
        return metrics(s, conn, cc);
    }
    bool v1 = !strncmp(url, "/v1/", 4);
    bool known = !strcmp(url, "/v1/models") || !strncmp(url, "/v1/models/", 11) ||
                 !strcmp(url, "/v1/completions") || !strcmp(url, "/v1/chat/completions") ||
                 !strcmp(url, "/tokenize") || !strcmp(url, "/detokenize");
    if (!known)
        return fail(s, conn, cc, 404, NULL, NULL, "unknown_url", "unknown route: %s %.200s", method,
                    url);
    if ((v1 || !strcmp(url, "/tokenize") || !strcmp(url, "/detokenize")) && !authorized(s, conn))
        return fail(s, conn, cc, 401, "authentication_error", NULL, "invalid_api_key",
                    "missing or wrong API key (send 'Authorization: Bearer KEY')");
    if (!strcmp(url, "/v1/models")) {
        if (!get) goto bad_method;
        return models(s, conn, cc, NULL);
    }
    if (!strncmp(url, "/v1/models/", 11)) {
        if (!get) goto bad_method;
        return models(s, conn, cc, url + 11);
    }
    if (!post) goto bad_method;
    if (!strcmp(url, "/v1/completions")) return start_job(s, conn, cc, SRV_COMPLETION);
    if (!strcmp(url, "/v1/chat/completions")) return start_job(s, conn, cc, SRV_CHAT);
    if (!strcmp(url, "/tokenize")) return tokenize(s, conn, cc);
    return detokenize(s, conn, cc);
bad_method:
    return fail(s, conn, cc, 405, NULL, NULL, "method_not_allowed", "%s is not allowed on %.200s",
                method, url);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **con_cls)
{
    struct forge_server *s = cls;
    conn_ctx *cc = *con_cls;
    if (!cc) {
        if (!(cc = calloc(1, sizeof *cc))) return MHD_NO;
        cc->t0 = forge_now_s();
        snprintf(cc->method, sizeof cc->method, "%s", method);
        snprintf(cc->path, sizeof cc->path, "%s", url);
        *con_cls = cc;
        /* a declared body far over the limit is refused before it is read (the client may see
         * the connection close); one near the limit is read and dropped, then refused */
        const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Content-Length");
        if (cl) {
            unsigned long long n = strtoull(cl, NULL, 10);
            if (n > s->p.max_body) cc->too_large = true;
            if (n / 16 > s->p.max_body)
                return fail(s, conn, cc, 413, NULL, NULL, "request_too_large",
                            "the request body is larger than %zu bytes (--max-body)",
                            s->p.max_body);
        }
        return MHD_YES;
    }
    if (cc->job) { /* resumed: the non-streaming job has finished */
        return send_job_result(s, conn, cc, cc->job);
    }
    if (*upload_data_size) {
        cc->body_bytes += *upload_data_size;
        if (cc->body_bytes > s->p.max_body)
            cc->too_large = true;
        else if (tb_add(&cc->body, upload_data, *upload_data_size))
            return MHD_NO;
        if (cc->body_bytes > 16 * s->p.max_body)
            return fail(s, conn, cc, 413, NULL, NULL, "request_too_large",
                        "the request body is larger than %zu bytes (--max-body)", s->p.max_body);
        *upload_data_size = 0;
        return MHD_YES;
    }
    return route(s, conn, cc, url, method);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    struct forge_server *s = cls;
    conn_ctx *cc = *con_cls;
    if (!cc) return;
    *con_cls = NULL;
    job *j = cc->job;
    int32_t pt = 0, ct = 0;
    bool gone = false;
    if (j) {
        forge_req_id ids[SRV_MAX_CHOICES];
        int n_ids = 0;
        pthread_mutex_lock(&j->mu);
        j->conn = NULL;
        j->suspended = false;
        gone = !j->all_done;
        for (int i = 0; i < j->n_ch && n_ids < SRV_MAX_CHOICES; i++)
            if (j->ch[i].running) ids[n_ids++] = j->ch[i].id;
        pt = j->prompt_tokens;
        ct = j->completion_tokens;
        pthread_mutex_unlock(&j->mu);
        /* outside the job's lock: the engine's callbacks take it */
        for (int i = 0; i < n_ids; i++)
            forge_engine_cancel(s->engine, ids[i], NULL);
        job_unref(j);
    }
    int status = cc->status ? cc->status : 499;
    if (gone || toe != MHD_REQUEST_TERMINATED_COMPLETED_OK) status = status == 200 ? 499 : status;
    double ms = (forge_now_s() - cc->t0) * 1e3;
    char ts[32];
    time_t t = time(NULL);
    struct tm tmv;
    gmtime_r(&t, &tmv);
    strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%SZ", &tmv);
    pthread_mutex_lock(&s->mmu);
    if (status >= 100 && status < 600) s->by_status[status]++;
    fprintf(s->log, "%s %s %s %d prompt_tokens=%d completion_tokens=%d %.1fms", ts, cc->method,
            cc->path, status, pt, ct, ms);
    if (s->p.log_prompts && cc->body.len) {
        textbuf b = {0};
        tb_add_utf8(&b, cc->body.p, cc->body.len > 4096 ? 4096 : cc->body.len);
        for (size_t i = 0; i < b.len; i++)
            if (b.p[i] == '\n' || b.p[i] == '\r') b.p[i] = ' ';
        fprintf(s->log, " body=%.*s", (int)b.len, b.p ? b.p : "");
        free(b.p);
    }
    fputc('\n', s->log);
    fflush(s->log);
    pthread_mutex_unlock(&s->mmu);
    free(cc->body.p);
    free(cc);
}

/* ---- lifetime --------------------------------------------------------------------------- */

int forge_server_create(forge_engine *engine, const forge_server_params *params, forge_server **out,
                        forge_err *err)
{
    forge_server_params dp = forge_server_default_params();
    const forge_server_params *p = params ? params : &dp;
    struct forge_server *s = NULL;
    struct addrinfo hints, *ai = NULL;
    char warn[256] = "";
    int rc = FORGE_E_NOMEM;
    *out = NULL;
    if (!engine || !p->alias || !*p->alias)
        return forge_err_set(err, FORGE_E_INVALID, "serve: an engine and a model alias are needed");
    if (p->port < 0 || p->port > 65535 || p->n_threads < 1 || p->n_threads > 256 ||
        p->max_queue < 1 || p->max_body < 64 || p->stream_interval_ms > 10000)
        return forge_err_set(err, FORGE_E_INVALID,
                             "serve: bad parameters (port %d, threads %d, queue %d, body %zu, "
                             "stream interval %u ms)",
                             p->port, p->n_threads, p->max_queue, p->max_body,
                             p->stream_interval_ms);
    if (!(s = calloc(1, sizeof *s))) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    pthread_mutex_init(&s->mmu, NULL);
    pthread_mutex_init(&s->wmu, NULL);
    s->engine = engine;
    s->model = forge_engine_model(engine);
    s->tok = forge_model_tok(s->model);
    forge_engine_get_info(engine, &s->info);
    s->p = *p;
    s->p.host = NULL;
    s->p.api_key = s->p.alias = s->p.cors_origin = s->p.chat_template = NULL;
    s->log = p->log ? p->log : stderr;
    s->started = (long long)time(NULL);
    atomic_store(&s->next_job, 1);
    if (!(s->alias = strdup(p->alias))) goto nomem;
    if (p->api_key && !(s->api_key = strdup(p->api_key))) goto nomem;
    if (p->cors_origin && !(s->cors = strdup(p->cors_origin))) goto nomem;
    if ((rc = forge_template_model_read(forge_model_gguf(s->model), &s->tm, err))) goto fail;
    if ((rc = forge_template_select(&s->tm, p->chat_template, &s->tmpl, NULL, warn, sizeof warn,
                                    err)))
        goto fail;
    if (warn[0]) fprintf(s->log, "forge serve: warning: %s\n", warn);

    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    char port[16];
    snprintf(port, sizeof port, "%d", p->port);
    int gai = getaddrinfo(p->host ? p->host : "127.0.0.1", port, &hints, &ai);
    if (gai) {
        rc = forge_err_set(err, FORGE_E_INVALID, "serve: --host '%s': %s", p->host,
                           gai_strerror(gai));
        goto fail;
    }
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME |
                     MHD_USE_ITC | (ai->ai_family == AF_INET6 ? MHD_USE_IPv6 : 0);
    s->d = MHD_start_daemon(
        flags, (uint16_t)p->port, NULL, NULL, on_request, s, MHD_OPTION_SOCK_ADDR, ai->ai_addr,
        MHD_OPTION_THREAD_POOL_SIZE, (unsigned)p->n_threads, MHD_OPTION_CONNECTION_TIMEOUT,
        (unsigned)(p->timeout_s ? p->timeout_s : 60), MHD_OPTION_CONNECTION_MEMORY_LIMIT,
        (size_t)65536, MHD_OPTION_CONNECTION_LIMIT, (unsigned)1024, MHD_OPTION_NOTIFY_COMPLETED,
        on_completed, s, MHD_OPTION_END);
    freeaddrinfo(ai);
    if (!s->d) {
        rc = forge_err_set(err, FORGE_E_IO,
                           "serve: cannot listen on %s:%d (in use, or not an "
                           "address of this machine)",
                           p->host ? p->host : "127.0.0.1", p->port);
        goto fail;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->d, MHD_DAEMON_INFO_BIND_PORT);
    s->port = di ? di->port : p->port;
    s->stream_interval = p->stream_interval_ms * 1e-3;
    forge_engine_set_step_hook(engine, on_step_end, s);
    *out = s;
    return FORGE_OK;
nomem:
    rc = forge_err_set(err, FORGE_E_NOMEM, "out of memory");
fail:
    forge_server_free(s);
    return rc;
}

int forge_server_port(const forge_server *s)
{
    return s->port;
}

int forge_server_run(forge_server *s, const volatile sig_atomic_t *stop, forge_err *err)
{
    while (!*stop)
        usleep(50 * 1000);
    atomic_store(&s->shutting_down, 1);
    fprintf(s->log, "forge serve: shutting down (%d request%s in flight)\n",
            atomic_load(&s->active), atomic_load(&s->active) == 1 ? "" : "s");
    fflush(s->log);
    MHD_socket ls = MHD_quiesce_daemon(s->d); /* stop accepting; open connections go on */
    if (ls != MHD_INVALID_SOCKET) close(ls);
    double deadline = forge_now_s() + s->p.shutdown_timeout_s;
    while (atomic_load(&s->active) > 0 && forge_now_s() < deadline)
        usleep(20 * 1000);
    /* cancel what is left: every request gets its last event, its client its last bytes */
    forge_engine_stop(s->engine);
    deadline = forge_now_s() + 2;
    for (;;) {
        const union MHD_DaemonInfo *di =
            MHD_get_daemon_info(s->d, MHD_DAEMON_INFO_CURRENT_CONNECTIONS);
        if (!di || di->num_connections == 0 || forge_now_s() > deadline) break;
        usleep(20 * 1000);
    }
    MHD_stop_daemon(s->d);
    s->d = NULL;
    return FORGE_OK;
}

void forge_server_free(forge_server *s)
{
    if (!s) return;
    if (s->d) MHD_stop_daemon(s->d);
    /* the engine no longer steps (forge_server_run stopped it): nothing else touches the list */
    forge_engine_set_step_hook(s->engine, NULL, NULL);
    for (int i = 0; i < s->n_held; i++)
        job_unref(s->held[i]);
    free(s->held);
    for (int i = 0; i < s->n_watch; i++)
        job_unref(s->watch[i]);
    free(s->watch);
    forge_template_free(s->tmpl);
    forge_template_model_clear(&s->tm);
    free(s->alias);
    free(s->api_key);
    free(s->cors);
    pthread_mutex_destroy(&s->mmu);
    pthread_mutex_destroy(&s->wmu);
    free(s);
}
