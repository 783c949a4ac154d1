/* backend_tp.c - the tensor-parallel backend (backend_tp.h): every op of be_ops dispatched to
 * the ranks with their weights and shapes, an all-reduce after the column-split projections, a
 * gather after the vocabulary projection. The ranks run one after another from the calling
 * thread: on GPUs each rank's op only enqueues work on its stream, so the ranks still run at the
 * same time; on the CPU (tests) they run in turn. */
#include <stdlib.h>
#include <string.h>

#include "backend/backend_tp.h"
#include "core/util.h"
#include "forge_gguf.h"

/* An activation buffer: one per rank, each of the whole logical size n (a split buffer uses
 * the first part of it). split: rank r holds columns of the logical rows of length full, len[r]
 * of them, packed as rows of len[r]; else every rank holds the whole buffer. */
struct be_buf {
    be_buf *r[COMM_MAX_RANK];
    int64_t n;
    bool split;
    int64_t full, len[COMM_MAX_RANK];
};

struct be_kv {
    be_kv *r[COMM_MAX_RANK];
    int kv_dim; /* the whole row; rank r holds kv_dim / n_rank of it */
};

/* A weight as one rank sees it: the view or copy of its share (data NULL when the model weight
 * is absent). */
typedef struct tp_rank {
    backend *be;
    be_weight *w;        /* [n_slot + 1]: the rank's form of each slot; n_slot: the whole
                          * embedding table when its slot is split (get_rows reads it whole) */
    be_wshare share;     /* this rank's device copies (the model's share is keyed by device
                          * alone, and these weights differ from a whole model's) */
    be_buf *gather;      /* scratch: this rank's part of a gathered output */
    int64_t gather_n;
} tp_rank;

struct tp_shares {
    int n_rank, n_slot;
    tp_wplan *plan; /* [n_slot] */
    be_weight *w[COMM_MAX_RANK]; /* [n_slot + 1] each (tp_rank.w) */
    int embd_slot;  /* tok_embd's slot when split (tied output), else -1 */
    void **copies;  /* [n_copies] host copies of column-split weights */
    int n_copies;
};

typedef struct tp_backend {
    backend base;
    be_ops ops; /* the children's optional ops decide which of ours are offered */
    int n;
    tp_rank rk[COMM_MAX_RANK];
    be_comm *comm;
    tp_shares *sh;
    const tp_wplan *plan; /* sh->plan */
    int n_slot, embd_slot; /* sh's */
    bool share_init;
} tp_backend;

static tp_backend *tpb(backend *be)
{
    return (tp_backend *)be;
}

void tp_plan_free(tp_plan *p)
{
    if (!p) return;
    free(p->w);
    p->w = NULL;
    p->n_slot = 0;
}

/* ---- helpers ----------------------------------------------------------------------------- */

/* Make rank r's device current (GPUs driven from one thread). */
static int on_rank(tp_backend *t, int r, forge_err *err)
{
    backend *c = t->rk[r].be;
    return c->ops->activate ? c->ops->activate(c, err) : FORGE_OK;
}

#define EACH_RANK(t, r) for (int r = 0; r < (t)->n; r++)
#define RANK_OP(t, r, call)                                                                        \
    do {                                                                                           \
        int rc_ = on_rank((t), (r), err);                                                          \
        if (!rc_) rc_ = (call);                                                                    \
        if (rc_) return rc_;                                                                       \
    } while (0)

static const tp_wplan *plan_of(const tp_backend *t, const be_weight *w)
{
    static const tp_wplan repl = {TP_REPL, {0}, {0}};
    if (!w || w->slot < 0 || w->slot >= t->n_slot) return &repl;
    return &t->plan[w->slot];
}

/* Rank r's form of weight w (w itself for an unplanned one). */
static const be_weight *rank_w(const tp_backend *t, int r, const be_weight *w)
{
    if (!w || w->slot < 0 || w->slot >= t->n_slot) return w;
    return &t->rk[r].w[w->slot];
}

static void set_repl(be_buf *b)
{
    b->split = false;
}

static void set_split(be_buf *b, int n, int64_t full, const int64_t *len)
{
    b->split = true;
    b->full = full;
    for (int r = 0; r < n; r++)
        b->len[r] = len[r];
}

static void copy_layout(be_buf *dst, const be_buf *src, int n)
{
    if (src->split)
        set_split(dst, n, src->full, src->len);
    else
        set_repl(dst);
}

static int layout_err(const char *op, const char *what, forge_err *err)
{
    return forge_err_set(err, FORGE_E_INTERNAL, "tensor parallel: %s: %s", op, what);
}

/* n logical floats of buffer b as rank r holds them (whole rows of b->full for a split one). */
static int local_n(const be_buf *b, int r, int64_t n, int64_t *out, forge_err *err)
{
    if (!b->split) {
        *out = n;
        return FORGE_OK;
    }
    if (b->full <= 0 || n % b->full)
        return forge_err_set(err, FORGE_E_INTERNAL,
                             "tensor parallel: %lld floats of a buffer split in rows of %lld",
                             (long long)n, (long long)b->full);
    *out = n / b->full * b->len[r];
    return FORGE_OK;
}

static int same_layout(const be_buf *a, const be_buf *b, int n)
{
    if (a->split != b->split) return 0;
    if (!a->split) return 1;
    if (a->full != b->full) return 0;
    for (int r = 0; r < n; r++)
        if (a->len[r] != b->len[r]) return 0;
    return 1;
}

static int all_reduce(tp_backend *t, be_buf *b, int64_t n, forge_err *err)
{
    float *p[COMM_MAX_RANK];
    if (t->n == 1) return FORGE_OK;
    EACH_RANK(t, r) p[r] = t->rk[r].be->ops->buf_data(t->rk[r].be, b->r[r]);
    return t->comm->ops->all_reduce_sum(t->comm, p, n, err);
}

/* ---- buffers ----------------------------------------------------------------------------- */

static void tp_buf_free(backend *be, be_buf *b)
{
    tp_backend *t = tpb(be);
    if (!b) return;
    EACH_RANK(t, r)
    {
        if (!b->r[r]) continue;
        (void)on_rank(t, r, NULL);
        t->rk[r].be->ops->buf_free(t->rk[r].be, b->r[r]);
    }
    free(b);
}

static int tp_buf_create(backend *be, int64_t n, be_buf **out, forge_err *err)
{
    tp_backend *t = tpb(be);
    *out = NULL;
    be_buf *b = calloc(1, sizeof *b);
    if (!b) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    b->n = n;
    EACH_RANK(t, r)
    {
        int rc = on_rank(t, r, err);
        if (!rc) rc = t->rk[r].be->ops->buf_create(t->rk[r].be, n, &b->r[r], err);
        if (rc) {
            tp_buf_free(be, b);
            return rc;
        }
    }
    *out = b;
    return FORGE_OK;
}

/* A replicated buffer is read from rank 0; a split one is put together row by row (whole rows
 * only). */
static int tp_buf_read(backend *be, const be_buf *src, int64_t off, int64_t n, float *dst,
                       forge_err *err)
{
    tp_backend *t = tpb(be);
    if (!src->split) {
        RANK_OP(t, 0, t->rk[0].be->ops->buf_read(t->rk[0].be, src->r[0], off, n, dst, err));
        return FORGE_OK;
    }
    if (off % src->full || n % src->full)
        return layout_err("buf_read", "a split buffer is read in whole rows", err);
    for (int64_t row = off / src->full; row < (off + n) / src->full; row++) {
        float *d = dst + (row - off / src->full) * src->full;
        EACH_RANK(t, r)
        {
            RANK_OP(t, r,
                    t->rk[r].be->ops->buf_read(t->rk[r].be, src->r[r], row * src->len[r],
                                               src->len[r], d, err));
            d += src->len[r];
        }
    }
    return FORGE_OK;
}

/* Grow rank r's gather scratch to n floats. */
static int gather_reserve(tp_backend *t, int r, int64_t n, forge_err *err)
{
    tp_rank *k = &t->rk[r];
    if (n <= k->gather_n) return FORGE_OK;
    if (k->gather) k->be->ops->buf_free(k->be, k->gather);
    k->gather = NULL;
    k->gather_n = 0;
    int rc = k->be->ops->buf_create(k->be, n, &k->gather, err);
    if (!rc) k->gather_n = n;
    return rc;
}

/* y (replicated) = the ranks' outputs in k->gather ([n_tok][hi - lo] each) side by side. */
static int gather_out(tp_backend *t, be_buf *y, const tp_wplan *p, int n_tok, forge_err *err)
{
    const float *send[COMM_MAX_RANK];
    float *recv[COMM_MAX_RANK];
    int64_t cols[COMM_MAX_RANK];
    EACH_RANK(t, r)
    {
        send[r] = t->rk[r].be->ops->buf_data(t->rk[r].be, t->rk[r].gather);
        recv[r] = t->rk[r].be->ops->buf_data(t->rk[r].be, y->r[r]);
        cols[r] = p->hi[r] - p->lo[r];
    }
    set_repl(y);
    return t->comm->ops->all_gather_cols(t->comm, send, recv, n_tok, cols, err);
}

/* ---- KV cache ---------------------------------------------------------------------------- */

static void tp_kv_free(backend *be, be_kv *kv)
{
    tp_backend *t = tpb(be);
    if (!kv) return;
    EACH_RANK(t, r)
    {
        if (!kv->r[r]) continue;
        (void)on_rank(t, r, NULL);
        t->rk[r].be->ops->kv_free(t->rk[r].be, kv->r[r]);
    }
    free(kv);
}

static int tp_kv_create(backend *be, int n_layer, int n_ctx, int kv_dim, int kv_type, be_kv **out,
                        forge_err *err)
{
    tp_backend *t = tpb(be);
    *out = NULL;
    if (kv_dim % t->n)
        return forge_err_set(err, FORGE_E_INTERNAL,
                             "tensor parallel: a KV row of %d values over %d ranks", kv_dim, t->n);
    be_kv *kv = calloc(1, sizeof *kv);
    if (!kv) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    kv->kv_dim = kv_dim;
    EACH_RANK(t, r)
    {
        int rc = on_rank(t, r, err);
        if (!rc)
            rc = t->rk[r].be->ops->kv_create(t->rk[r].be, n_layer, n_ctx, kv_dim / t->n, kv_type,
                                             &kv->r[r], err);
        if (rc) {
            tp_kv_free(be, kv);
            return rc;
        }
    }
    *out = kv;
    return FORGE_OK;
}

static int tp_kv_store(backend *be, be_kv *kv, int layer, const be_buf *k, const be_buf *v,
                       const int32_t *rows, int n_tok, forge_err *err)
{
    tp_backend *t = tpb(be);
    if (!k->split || !v->split) return layout_err("kv_store", "K/V must be split by heads", err);
    EACH_RANK(t, r)
    RANK_OP(t, r,
            t->rk[r].be->ops->kv_store(t->rk[r].be, kv->r[r], layer, k->r[r], v->r[r], rows,
                                       n_tok, err));
    return FORGE_OK;
}

static int tp_kv_copy_block(backend *be, be_kv *kv, int block_size, int src, int dst, int n_rows,
                            forge_err *err)
{
    tp_backend *t = tpb(be);
    EACH_RANK(t, r)
    RANK_OP(t, r,
            t->rk[r].be->ops->kv_copy_block(t->rk[r].be, kv->r[r], block_size, src, dst, n_rows,
                                            err));
    return FORGE_OK;
}

/* The ranks' KV heads put side by side: rank r's kv_dim / n values of each row at column
 * r * kv_dim / n. */
static int tp_kv_read(backend *be, const be_kv *kv, int layer, const int32_t *rows, int n,
                      float *k_out, float *v_out, forge_err *err)
{
    tp_backend *t = tpb(be);
    const int64_t d = kv->kv_dim / t->n;
    float *tk = malloc((size_t)(n > 0 ? n : 1) * (size_t)d * 2 * sizeof(float));
    int rc = FORGE_OK;
    if (!tk) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    float *tv = tk + (size_t)n * (size_t)d;
    for (int r = 0; r < t->n && !rc; r++) {
        rc = on_rank(t, r, err);
        if (!rc) rc = t->rk[r].be->ops->kv_read(t->rk[r].be, kv->r[r], layer, rows, n, tk, tv, err);
        for (int i = 0; i < n && !rc; i++) {
            memcpy(k_out + (size_t)i * kv->kv_dim + (size_t)r * d, tk + (size_t)i * d,
                   (size_t)d * sizeof(float));
            memcpy(v_out + (size_t)i * kv->kv_dim + (size_t)r * d, tv + (size_t)i * d,
                   (size_t)d * sizeof(float));
        }
    }
    free(tk);
    return rc;
}

/* ---- weights ----------------------------------------------------------------------------- */

typedef struct tp_progress {
    void (*fn)(uint64_t done, uint64_t total, void *user);
    void *user;
    int rank, n_rank;
} tp_progress;

/* A rank's progress as a share of all ranks' (each rank's total counts once). */
static void rank_progress(uint64_t done, uint64_t total, void *user)
{
    const tp_progress *p = user;
    p->fn(done + (uint64_t)p->rank * total, total * (uint64_t)p->n_rank, p->user);
}

static void tp_weights_release(backend *be)
{
    tp_backend *t = tpb(be);
    EACH_RANK(t, r)
    {
        backend *c = t->rk[r].be;
        if (!c->ops->weights_release) continue;
        (void)on_rank(t, r, NULL);
        c->ops->weights_release(c);
    }
}

/* Each rank acquires its own forms of the weights into its own share: the model's share is not
 * used (backend.h: the model's entries hold whole weights). */
static int tp_weights_acquire(backend *be, be_wshare *share, be_weight *const *ws, int n,
                              void (*progress)(uint64_t, uint64_t, void *), void *user,
                              forge_err *err)
{
    tp_backend *t = tpb(be);
    (void)share;
    (void)ws;
    if (n != t->n_slot)
        return forge_err_set(err, FORGE_E_INTERNAL,
                             "tensor parallel: %d weights acquired, the plan has %d", n,
                             t->n_slot);
    EACH_RANK(t, r)
    {
        backend *c = t->rk[r].be;
        be_weight **list;
        const int nw = tp_shares_rank(t->sh, r, &list);
        if (nw < 0) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
        tp_progress pr = {progress, user, r, t->n};
        int rc = on_rank(t, r, err);
        if (!rc && c->ops->weights_acquire)
            rc = c->ops->weights_acquire(c, &t->rk[r].share, list, nw,
                                         progress ? rank_progress : NULL, &pr, err);
        free(list);
        if (rc) {
            tp_weights_release(be);
            return rc;
        }
    }
    return FORGE_OK;
}

/* ---- ops --------------------------------------------------------------------------------- */

static int tp_batch_set(backend *be, const be_batch *b, forge_err *err)
{
    tp_backend *t = tpb(be);
    EACH_RANK(t, r)
    {
        backend *c = t->rk[r].be;
        if (c->ops->batch_set) RANK_OP(t, r, c->ops->batch_set(c, b, err));
    }
    return FORGE_OK;
}

static int tp_activate(backend *be, forge_err *err)
{
    return on_rank(tpb(be), 0, err);
}

static int tp_get_rows(backend *be, be_buf *out, const be_weight *table, const int32_t *ids, int n,
                       forge_err *err)
{
    tp_backend *t = tpb(be);
    EACH_RANK(t, r)
    {
        const be_weight *w = table->slot == t->embd_slot && t->embd_slot >= 0
                                 ? &t->rk[r].w[t->n_slot]
                                 : rank_w(t, r, table);
        RANK_OP(t, r, t->rk[r].be->ops->get_rows(t->rk[r].be, out->r[r], w, ids, n, err));
    }
    set_repl(out);
    return FORGE_OK;
}

/* A split buffer normed per head (dim = head_dim: Q/K norms) is normed per rank over its rows;
 * a replicated one whole. */
static int tp_rms_norm(backend *be, be_buf *out, const be_buf *x, const be_weight *w,
                       int64_t n_rows, int64_t dim, float eps, forge_err *err)
{
    tp_backend *t = tpb(be);
    EACH_RANK(t, r)
    {
        int64_t nl = 0;
        int rc = local_n(x, r, n_rows * dim, &nl, err);
        if (rc) return rc;
        if (nl % dim) return layout_err("rms_norm", "a split row is not whole vectors", err);
        RANK_OP(t, r,
                t->rk[r].be->ops->rms_norm(t->rk[r].be, out->r[r], x->r[r], rank_w(t, r, w),
                                           nl / dim, dim, eps, err));
    }
    copy_layout(out, x, t->n);
    return FORGE_OK;
}

static int tp_matmul(backend *be, be_buf *y, const be_weight *w, const be_buf *x, int n_tok,
                     forge_err *err)
{
    tp_backend *t = tpb(be);
    const tp_wplan *p = plan_of(t, w);
    int64_t len[COMM_MAX_RANK];
    switch (p->split) {
    case TP_REPL:
    case TP_OUT:
    case TP_OUT_GATHER:
        if (x->split) return layout_err("matmul", "a row-split weight needs the whole input", err);
        EACH_RANK(t, r)
        {
            backend *c = t->rk[r].be;
            if (p->split == TP_OUT_GATHER) {
                int rc = gather_reserve(t, r, (int64_t)n_tok * (p->hi[r] - p->lo[r]), err);
                if (rc) return rc;
            }
            be_buf *dst = p->split == TP_OUT_GATHER ? t->rk[r].gather : y->r[r];
            RANK_OP(t, r, c->ops->matmul(c, dst, rank_w(t, r, w), x->r[r], n_tok, err));
            len[r] = p->hi[r] - p->lo[r];
        }
        if (p->split == TP_OUT_GATHER) return gather_out(t, y, p, n_tok, err);
        if (p->split == TP_OUT)
            set_split(y, t->n, w->ne1, len);
        else
            set_repl(y);
        return FORGE_OK;
    case TP_IN:
        if (!x->split || x->full != w->ne0)
            return layout_err("matmul", "a column-split weight needs its split input", err);
        EACH_RANK(t, r)
        {
            if (x->len[r] != p->hi[r] - p->lo[r])
                return layout_err("matmul", "the input's split differs from the weight's", err);
            backend *c = t->rk[r].be;
            RANK_OP(t, r, c->ops->matmul(c, y->r[r], rank_w(t, r, w), x->r[r], n_tok, err));
        }
        set_repl(y);
        return all_reduce(t, y, (int64_t)n_tok * w->ne1, err);
    }
    return layout_err("matmul", "unknown split", err);
}

/* Weights of one kind that shares the input: Q/K/V, gate/up (all row-split) go to each rank's
 * own matmul_multi; anything else one by one. */
static int tp_matmul_multi(backend *be, int n, be_buf *const *ys, const be_weight *const *ws,
                           const be_buf *x, int n_tok, forge_err *err)
{
    tp_backend *t = tpb(be);
    bool together = n <= 8 && !x->split;
    for (int i = 0; i < n && together; i++)
        together = plan_of(t, ws[i])->split == TP_OUT || plan_of(t, ws[i])->split == TP_REPL;
    if (!together) {
        for (int i = 0; i < n; i++) {
            int rc = tp_matmul(be, ys[i], ws[i], x, n_tok, err);
            if (rc) return rc;
        }
        return FORGE_OK;
    }
    EACH_RANK(t, r)
    {
        backend *c = t->rk[r].be;
        be_buf *yr[8];
        const be_weight *wr[8];
        for (int i = 0; i < n; i++) {
            yr[i] = ys[i]->r[r];
            wr[i] = rank_w(t, r, ws[i]);
        }
        if (c->ops->matmul_multi) {
            RANK_OP(t, r, c->ops->matmul_multi(c, n, yr, wr, x->r[r], n_tok, err));
        } else {
            for (int i = 0; i < n; i++)
                RANK_OP(t, r, c->ops->matmul(c, yr[i], wr[i], x->r[r], n_tok, err));
        }
    }
    for (int i = 0; i < n; i++) {
        const tp_wplan *p = plan_of(t, ws[i]);
        int64_t len[COMM_MAX_RANK];
        EACH_RANK(t, r) len[r] = p->hi[r] - p->lo[r];
        if (p->split == TP_OUT)
            set_split(ys[i], t->n, ws[i]->ne1, len);
        else
            set_repl(ys[i]);
    }
    return FORGE_OK;
}

/* A bias of a row-split output is split the same way (its plan says TP_OUT); a replicated
 * output gets the whole bias. */
static int tp_add_bias(backend *be, be_buf *y, const be_weight *b, int n_tok, forge_err *err)
{
    tp_backend *t = tpb(be);
    const tp_wplan *p = plan_of(t, b);
    if (y->split != (p->split == TP_OUT))
        return layout_err("add_bias", "the bias is split unlike its output", err);
    EACH_RANK(t, r)
    RANK_OP(t, r, t->rk[r].be->ops->add_bias(t->rk[r].be, y->r[r], rank_w(t, r, b), n_tok, err));
    return FORGE_OK;
}

static int tp_rope(backend *be, be_buf *x, int n_head, int head_dim, const be_batch *b,
                   const be_rope *rope, forge_err *err)
{
    tp_backend *t = tpb(be);
    be_rope rr = *rope;
    EACH_RANK(t, r)
    {
        const int nh = x->split ? (int)(x->len[r] / head_dim) : n_head;
        rr.freq_factors = rank_w(t, r, rope->freq_factors);
        RANK_OP(t, r, t->rk[r].be->ops->rope(t->rk[r].be, x->r[r], nh, head_dim, b, &rr, err));
    }
    return FORGE_OK;
}

/* Rank r's attention: its query heads and KV heads (the buffers' split says how many). */
static int rank_attn(const tp_backend *t, int r, const be_buf *q, const be_buf *k,
                     const be_attn *a, be_attn *ar, forge_err *err)
{
    (void)t;
    if (!q->split || !k->split)
        return layout_err("attention", "Q and K/V must be split by heads", err);
    *ar = *a;
    ar->n_head = (int)(q->len[r] / a->head_dim);
    ar->n_head_kv = (int)(k->len[r] / a->head_dim);
    return FORGE_OK;
}

static void attn_out_layout(const tp_backend *t, be_buf *out, const be_buf *q)
{
    set_split(out, t->n, q->full, q->len);
}

static int tp_attention(backend *be, be_buf *out, const be_buf *q, const be_buf *k,
                        const be_buf *v, be_kv *kv, const be_attn *a, forge_err *err)
{
    tp_backend *t = tpb(be);
    EACH_RANK(t, r)
    {
        be_attn ar;
        int rc = rank_attn(t, r, q, k, a, &ar, err);
        if (rc) return rc;
        RANK_OP(t, r,
                t->rk[r].be->ops->attention(t->rk[r].be, out->r[r], q->r[r], k->r[r], v->r[r],
                                            kv->r[r], &ar, err));
    }
    attn_out_layout(t, out, q);
    return FORGE_OK;
}

static int tp_attention_rope(backend *be, be_buf *out, be_buf *q, const be_buf *k,
                             const be_buf *v, be_kv *kv, const be_attn *a, const be_rope *rope,
                             const be_weight *q_norm, const be_weight *k_norm, float eps,
                             forge_err *err)
{
    tp_backend *t = tpb(be);
    be_rope rr = *rope;
    EACH_RANK(t, r)
    {
        be_attn ar;
        int rc = rank_attn(t, r, q, k, a, &ar, err);
        if (rc) return rc;
        rr.freq_factors = rank_w(t, r, rope->freq_factors);
        RANK_OP(t, r,
                t->rk[r].be->ops->attention_rope(t->rk[r].be, out->r[r], q->r[r], k->r[r],
                                                 v->r[r], kv->r[r], &ar, &rr,
                                                 rank_w(t, r, q_norm), rank_w(t, r, k_norm), eps,
                                                 err));
    }
    attn_out_layout(t, out, q);
    return FORGE_OK;
}

typedef enum { EW_SWIGLU, EW_GEGLU, EW_ADD } ew_kind;

/* out = f(a, b) elementwise over n logical floats, per rank over its part. */
static int elementwise(tp_backend *t, ew_kind kind, be_buf *out, const be_buf *a, const be_buf *b,
                       int64_t n, forge_err *err)
{
    if (!same_layout(a, b, t->n)) return layout_err("elementwise op", "inputs split unlike", err);
    EACH_RANK(t, r)
    {
        backend *c = t->rk[r].be;
        int64_t nl = 0;
        int rc = local_n(a, r, n, &nl, err);
        if (rc) return rc;
        if (kind == EW_SWIGLU)
            RANK_OP(t, r, c->ops->swiglu(c, out->r[r], a->r[r], b->r[r], nl, err));
        else if (kind == EW_GEGLU)
            RANK_OP(t, r, c->ops->geglu(c, out->r[r], a->r[r], b->r[r], nl, err));
        else
            RANK_OP(t, r, c->ops->add(c, out->r[r], b->r[r], nl, err));
    }
    if (out != a) copy_layout(out, a, t->n);
    return FORGE_OK;
}

static int tp_swiglu(backend *be, be_buf *out, const be_buf *gate, const be_buf *up, int64_t n,
                     forge_err *err)
{
    return elementwise(tpb(be), EW_SWIGLU, out, gate, up, n, err);
}

static int tp_geglu(backend *be, be_buf *out, const be_buf *gate, const be_buf *up, int64_t n,
                    forge_err *err)
{
    return elementwise(tpb(be), EW_GEGLU, out, gate, up, n, err);
}

static int tp_add(backend *be, be_buf *x, const be_buf *y, int64_t n, forge_err *err)
{
    return elementwise(tpb(be), EW_ADD, x, x, y, n, err);
}

static int tp_scale(backend *be, be_buf *x, float s, int64_t n, forge_err *err)
{
    tp_backend *t = tpb(be);
    EACH_RANK(t, r)
    {
        int64_t nl = 0;
        int rc = local_n(x, r, n, &nl, err);
        if (rc) return rc;
        RANK_OP(t, r, t->rk[r].be->ops->scale(t->rk[r].be, x->r[r], s, nl, err));
    }
    return FORGE_OK;
}

static int tp_softcap(backend *be, be_buf *x, float cap, int64_t n, forge_err *err)
{
    tp_backend *t = tpb(be);
    EACH_RANK(t, r)
    {
        int64_t nl = 0;
        int rc = local_n(x, r, n, &nl, err);
        if (rc) return rc;
        RANK_OP(t, r, t->rk[r].be->ops->softcap(t->rk[r].be, x->r[r], cap, nl, err));
    }
    return FORGE_OK;
}

static int tp_copy_rows(backend *be, be_buf *dst, int64_t dst_row, const be_buf *src,
                        int64_t src_row, int64_t n_rows, int64_t row_len, forge_err *err)
{
    tp_backend *t = tpb(be);
    if (src->split && row_len != src->full)
        return layout_err("copy_rows", "rows of a split buffer are copied whole", err);
    EACH_RANK(t, r)
    {
        const int64_t rl = src->split ? src->len[r] : row_len;
        RANK_OP(t, r,
                t->rk[r].be->ops->copy_rows(t->rk[r].be, dst->r[r], dst_row, src->r[r], src_row,
                                            n_rows, rl, err));
    }
    copy_layout(dst, src, t->n);
    return FORGE_OK;
}

/* The fused ops of a GPU rank. Row-split weights (and a replicated or gathered single one) run
 * each rank's norm_matmul; anything else the plain ops. */
static int tp_norm_matmul(backend *be, int n, be_buf *const *ys, const be_weight *const *ws,
                          const be_weight *const *bs, const be_buf *x, const be_weight *norm,
                          float eps, bool swiglu, be_buf *hn, int n_tok, forge_err *err)
{
    tp_backend *t = tpb(be);
    const tp_split s0 = plan_of(t, ws[0])->split;
    bool fused = n >= 1 && n <= 3 && !x->split &&
                 (s0 == TP_OUT || s0 == TP_REPL || (s0 == TP_OUT_GATHER && n == 1 && !swiglu));
    for (int i = 1; i < n && fused; i++)
        fused = plan_of(t, ws[i])->split == s0;
    int rc;
    if (!fused) {
        if ((rc = tp_rms_norm(be, hn, x, norm, n_tok, ws[0]->ne0, eps, err)) ||
            (rc = tp_matmul_multi(be, n, ys, ws, hn, n_tok, err)))
            return rc;
        for (int i = 0; bs && i < n; i++)
            if (bs[i] && (rc = tp_add_bias(be, ys[i], bs[i], n_tok, err))) return rc;
        return swiglu ? tp_swiglu(be, ys[0], ys[0], ys[1], (int64_t)n_tok * ws[0]->ne1, err)
                      : FORGE_OK;
    }
    const tp_wplan *p0 = plan_of(t, ws[0]);
    EACH_RANK(t, r)
    {
        backend *c = t->rk[r].be;
        be_buf *yr[3];
        const be_weight *wr[3], *br[3];
        for (int i = 0; i < n; i++) {
            yr[i] = ys[i]->r[r];
            wr[i] = rank_w(t, r, ws[i]);
            br[i] = bs ? rank_w(t, r, bs[i]) : NULL;
        }
        if (s0 == TP_OUT_GATHER) {
            if ((rc = gather_reserve(t, r, (int64_t)n_tok * (p0->hi[r] - p0->lo[r]), err)))
                return rc;
            yr[0] = t->rk[r].gather;
        }
        RANK_OP(t, r,
                c->ops->norm_matmul(c, n, yr, wr, bs ? br : NULL, x->r[r], rank_w(t, r, norm), eps,
                                    swiglu, hn->r[r], n_tok, err));
    }
    set_repl(hn);
    if (s0 == TP_OUT_GATHER) return gather_out(t, ys[0], p0, n_tok, err);
    for (int i = 0; i < n; i++) {
        const tp_wplan *p = plan_of(t, ws[i]);
        int64_t len[COMM_MAX_RANK];
        EACH_RANK(t, r) len[r] = p->hi[r] - p->lo[r];
        if (s0 == TP_OUT)
            set_split(ys[i], t->n, ws[i]->ne1, len);
        else
            set_repl(ys[i]);
    }
    return FORGE_OK;
}

/* x += w h: a column-split w's partial products are summed over the ranks first. */
static int tp_matmul_add(backend *be, be_buf *x, const be_weight *w, const be_buf *h, be_buf *tmp,
                         int n_tok, forge_err *err)
{
    tp_backend *t = tpb(be);
    if (x->split) return layout_err("matmul_add", "the residual stream must be whole", err);
    if (plan_of(t, w)->split == TP_REPL) {
        if (h->split) return layout_err("matmul_add", "a replicated weight on a split input", err);
        EACH_RANK(t, r)
        RANK_OP(t, r,
                t->rk[r].be->ops->matmul_add(t->rk[r].be, x->r[r], w, h->r[r], tmp->r[r], n_tok,
                                             err));
        return FORGE_OK;
    }
    int rc = tp_matmul(be, tmp, w, h, n_tok, err);
    if (rc) return rc;
    return tp_add(be, x, tmp, (int64_t)n_tok * w->ne1, err);
}

/* Experts are replicated: every rank runs the whole mixture on the whole input. */
static int tp_moe_ffn(backend *be, be_buf *out, const be_buf *h, const be_buf *logits,
                      const be_moe *moe, int n_tok, forge_err *err)
{
    tp_backend *t = tpb(be);
    if (h->split || logits->split) return layout_err("moe_ffn", "inputs must be whole", err);
    EACH_RANK(t, r)
    {
        be_moe m = *moe;
        m.gate_exps = rank_w(t, r, moe->gate_exps);
        m.up_exps = rank_w(t, r, moe->up_exps);
        m.down_exps = rank_w(t, r, moe->down_exps);
        RANK_OP(t, r,
                t->rk[r].be->ops->moe_ffn(t->rk[r].be, out->r[r], h->r[r], logits->r[r], &m,
                                          n_tok, err));
    }
    set_repl(out);
    return FORGE_OK;
}

/* Logits are gathered, so rank 0 holds them whole: it picks. */
static int tp_argmax(backend *be, const be_buf *x, int64_t off, int64_t n, int32_t *out,
                     forge_err *err)
{
    tp_backend *t = tpb(be);
    if (x->split) return layout_err("argmax", "the logits must be whole", err);
    RANK_OP(t, 0, t->rk[0].be->ops->argmax(t->rk[0].be, x->r[0], off, n, out, err));
    return FORGE_OK;
}

static int tp_argmax_rows(backend *be, const be_buf *x, int n_rows, int64_t n, int32_t *out,
                          forge_err *err)
{
    tp_backend *t = tpb(be);
    if (x->split) return layout_err("argmax_rows", "the logits must be whole", err);
    RANK_OP(t, 0, t->rk[0].be->ops->argmax_rows(t->rk[0].be, x->r[0], n_rows, n, out, err));
    return FORGE_OK;
}

static int tp_sample(backend *be, const be_buf *x, int64_t off, int64_t n, const be_sample *s,
                     int32_t *out, forge_err *err)
{
    tp_backend *t = tpb(be);
    if (x->split) return layout_err("sample", "the logits must be whole", err);
    RANK_OP(t, 0, t->rk[0].be->ops->sample(t->rk[0].be, x->r[0], off, n, s, out, err));
    return FORGE_OK;
}

static float *tp_buf_data(backend *be, be_buf *b)
{
    (void)be;
    (void)b;
    return NULL; /* a tensor-parallel group is not a rank of another */
}

static void tp_destroy(backend *be)
{
    tp_backend *t = tpb(be);
    if (!t) return;
    EACH_RANK(t, r)
    {
        tp_rank *k = &t->rk[r];
        if (!k->be || !k->gather) continue;
        (void)on_rank(t, r, NULL);
        k->be->ops->buf_free(k->be, k->gather);
    }
    /* the communicator first: it waits for the collectives on the ranks' streams */
    if (t->comm) t->comm->ops->destroy(t->comm);
    EACH_RANK(t, r)
    {
        tp_rank *k = &t->rk[r];
        if (!k->be) continue;
        (void)on_rank(t, r, NULL);
        k->be->ops->destroy(k->be);
        if (t->share_init) pthread_mutex_destroy(&k->share.lock);
    }
    tp_shares_free(t->sh);
    free(t);
}

/* ---- the ranks' weights ------------------------------------------------------------------ */

void tp_shares_free(tp_shares *sh)
{
    if (!sh) return;
    for (int i = 0; i < sh->n_copies; i++)
        free(sh->copies[i]);
    free(sh->copies);
    for (int r = 0; r < sh->n_rank; r++)
        free(sh->w[r]);
    free(sh->plan);
    free(sh);
}

/* Rank r's form of w under plan p: a view of rows lo..hi-1 (TP_OUT, TP_OUT_GATHER; elements of
 * a vector), a host copy of columns lo..hi-1 of every row (TP_IN), or w itself. */
static int make_share(tp_shares *sh, const be_weight *w, const tp_wplan *p, int r, be_weight *out,
                      forge_err *err)
{
    *out = *w;
    if (!w->data || p->split == TP_REPL) return FORGE_OK;
    const int64_t lo = p->lo[r], hi = p->hi[r];
    const bool vec = w->ne1 == 1 && p->split == TP_OUT;
    const int64_t lim = p->split == TP_IN || vec ? w->ne0 : w->ne1;
    if (lo < 0 || hi <= lo || hi > lim)
        return forge_err_set(err, FORGE_E_INTERNAL,
                             "tensor parallel: %s: rank %d range %lld..%lld of %lld", w->name, r,
                             (long long)lo, (long long)hi, (long long)lim);
    const size_t row = ggml_row_size(w->type, w->ne0);
    if (p->split != TP_IN) {
        const size_t esz = vec ? ggml_row_size(w->type, 1) : row;
        if (!esz)
            return forge_err_set(err, FORGE_E_INTERNAL, "tensor parallel: %s: cannot split %s",
                                 w->name, ggml_type_name(w->type));
        out->data = (const uint8_t *)w->data + (size_t)lo * esz;
        if (vec)
            out->ne0 = hi - lo;
        else
            out->ne1 = hi - lo;
        out->n_bytes = (uint64_t)(hi - lo) * esz;
        return FORGE_OK;
    }
    const int64_t bs = ggml_type_block_size(w->type);
    const size_t bb = ggml_type_block_bytes(w->type);
    if (bs < 1 || lo % bs || hi % bs || !row)
        return forge_err_set(err, FORGE_E_INTERNAL,
                             "tensor parallel: %s: columns %lld..%lld are not whole %s blocks",
                             w->name, (long long)lo, (long long)hi, ggml_type_name(w->type));
    const size_t part = (size_t)((hi - lo) / bs) * bb, skip = (size_t)(lo / bs) * bb;
    uint8_t *c = malloc(part * (size_t)w->ne1 + 1);
    void **cs = realloc(sh->copies, (size_t)(sh->n_copies + 1) * sizeof *cs);
    if (cs) sh->copies = cs;
    if (!c || !cs) {
        free(c);
        return forge_err_set(err, FORGE_E_NOMEM, "out of memory for a share of %s", w->name);
    }
    sh->copies[sh->n_copies++] = c;
    for (int64_t i = 0; i < w->ne1; i++)
        memcpy(c + (size_t)i * part, (const uint8_t *)w->data + (size_t)i * row + skip, part);
    out->data = c;
    out->ne0 = hi - lo;
    out->n_bytes = (uint64_t)part * (uint64_t)w->ne1;
    return FORGE_OK;
}

int tp_shares_create(const tp_plan *plan, be_weight *const *ws, int n_w, tp_shares **out,
                     forge_err *err)
{
    *out = NULL;
    int rc = FORGE_OK;
    if (!plan || plan->n_rank < 1 || plan->n_rank > COMM_MAX_RANK || plan->n_slot != n_w)
        return forge_err_set(err, FORGE_E_INVALID,
                             "tensor parallel: a plan of %d ranks and %d weights for %d",
                             plan ? plan->n_rank : 0, plan ? plan->n_slot : 0, n_w);
    tp_shares *sh = calloc(1, sizeof *sh);
    if (!sh) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    sh->n_rank = plan->n_rank;
    sh->n_slot = n_w;
    sh->embd_slot = -1;
    sh->plan = malloc((size_t)(n_w > 0 ? n_w : 1) * sizeof *sh->plan);
    if (!sh->plan) goto nomem;
    memcpy(sh->plan, plan->w, (size_t)n_w * sizeof *sh->plan);
    for (int r = 0; r < sh->n_rank; r++) {
        sh->w[r] = calloc((size_t)n_w + 1, sizeof *sh->w[r]);
        if (!sh->w[r]) goto nomem;
        for (int i = 0; i < n_w; i++)
            if ((rc = make_share(sh, ws[i], &sh->plan[i], r, &sh->w[r][i], err))) goto fail;
    }
    /* the embedding table is read whole by get_rows; a tied output splits its slot */
    for (int i = 0; i < n_w; i++)
        if (ws[i]->name && !strcmp(ws[i]->name, "token_embd.weight") &&
            sh->plan[i].split != TP_REPL) {
            sh->embd_slot = i;
            for (int r = 0; r < sh->n_rank; r++) {
                sh->w[r][n_w] = *ws[i];
                sh->w[r][n_w].slot = n_w;
            }
        }
    *out = sh;
    return FORGE_OK;
nomem:
    rc = forge_err_set(err, FORGE_E_NOMEM, "out of memory");
fail:
    tp_shares_free(sh);
    return rc;
}

int tp_shares_rank(tp_shares *sh, int r, be_weight ***list)
{
    const int n = sh->n_slot + (sh->embd_slot >= 0);
    *list = malloc((size_t)(n > 0 ? n : 1) * sizeof **list);
    if (!*list) return -1;
    for (int i = 0; i < n; i++)
        (*list)[i] = &sh->w[r][i];
    return n;
}

/* ---- creation ---------------------------------------------------------------------------- */

int backend_tp_create(backend *const *ranks, int n_rank, be_comm *comm, tp_shares *sh,
                      backend **out, forge_err *err)
{
    *out = NULL;
    int rc = FORGE_OK;
    tp_backend *t = NULL;
    if (n_rank < 1 || n_rank > COMM_MAX_RANK || !comm || comm->n_rank != n_rank || !sh ||
        sh->n_rank != n_rank) {
        rc = forge_err_set(err, FORGE_E_INVALID,
                           "tensor parallel: %d ranks, a communicator of %d, weights for %d",
                           n_rank, comm ? comm->n_rank : 0, sh ? sh->n_rank : 0);
        goto fail;
    }
    t = calloc(1, sizeof *t);
    if (!t) {
        rc = forge_err_set(err, FORGE_E_NOMEM, "out of memory");
        goto fail;
    }
    t->n = n_rank;
    t->sh = sh;
    t->plan = sh->plan;
    t->n_slot = sh->n_slot;
    t->embd_slot = sh->embd_slot;
    t->comm = comm;
    for (int r = 0; r < n_rank; r++) {
        t->rk[r].be = ranks[r];
        t->rk[r].w = sh->w[r];
    }
    sh = NULL;
    comm = NULL;
    n_rank = 0; /* all owned by t now */
    for (int r = 0; r < t->n; r++)
        if (!t->rk[r].be->ops->buf_data) {
            rc = forge_err_set(err, FORGE_E_UNSUPPORTED,
                               "tensor parallel: the %s backend cannot share its buffers",
                               t->rk[r].be->ops->name);
            goto fail;
        }
    for (int r = 0; r < t->n; r++) {
        if (pthread_mutex_init(&t->rk[r].share.lock, NULL)) {
            for (int q = 0; q < r; q++)
                pthread_mutex_destroy(&t->rk[q].share.lock);
            rc = forge_err_set(err, FORGE_E_INTERNAL, "tensor parallel: cannot create a lock");
            goto fail;
        }
    }
    t->share_init = true;

    const be_ops *c = t->rk[0].be->ops;
    t->ops = (be_ops){
        .name = c->name,
        .destroy = tp_destroy,
        .buf_create = tp_buf_create,
        .buf_free = tp_buf_free,
        .buf_read = tp_buf_read,
        .buf_data = tp_buf_data,
        .weights_acquire = tp_weights_acquire,
        .weights_release = tp_weights_release,
        .activate = c->activate ? tp_activate : NULL,
        .kv_create = tp_kv_create,
        .kv_free = tp_kv_free,
        .get_rows = tp_get_rows,
        .rms_norm = tp_rms_norm,
        .matmul = tp_matmul,
        .add_bias = tp_add_bias,
        .batch_set = c->batch_set ? tp_batch_set : NULL,
        .rope = tp_rope,
        .attention = tp_attention,
        .swiglu = tp_swiglu,
        .add = tp_add,
        .copy_rows = tp_copy_rows,
        .argmax = c->argmax ? tp_argmax : NULL,
        .argmax_rows = c->argmax_rows ? tp_argmax_rows : NULL,
        .matmul_multi = tp_matmul_multi,
        .norm_matmul = c->norm_matmul ? tp_norm_matmul : NULL,
        .matmul_add = c->matmul_add ? tp_matmul_add : NULL,
        .attention_rope = c->attention_rope ? tp_attention_rope : NULL,
        .sample = c->sample ? tp_sample : NULL,
        .kv_store = c->kv_store ? tp_kv_store : NULL,
        .kv_copy_block = c->kv_copy_block ? tp_kv_copy_block : NULL,
        .kv_read = c->kv_read ? tp_kv_read : NULL,
        .geglu = c->geglu ? tp_geglu : NULL,
        .scale = c->scale ? tp_scale : NULL,
        .softcap = c->softcap ? tp_softcap : NULL,
        .moe_ffn = c->moe_ffn ? tp_moe_ffn : NULL,
    };
    t->base.ops = &t->ops;
    *out = &t->base;
    return FORGE_OK;
fail:
    if (t) {
        t->base.ops = &t->ops;
        tp_destroy(&t->base);
    }
    if (comm) comm->ops->destroy(comm); /* before the ranks whose streams it uses */
    for (int r = 0; r < n_rank; r++)
        if (ranks[r]) ranks[r]->ops->destroy(ranks[r]);
    tp_shares_free(sh);
    return rc;
}
