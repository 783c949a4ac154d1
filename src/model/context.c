/* context.c - inference contexts: the backend instance, the KV cache, activation buffers for a
 * batch of n_batch tokens, the position, and the host copy of the logits. Owns forge_context_*,
 * forge_decode (and its greedy / sampling variants), forge_get_logits and forge_kv_truncate of
 * include/forge_model.h. The forward pass itself lives in the architecture files. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend_gpu.h"
#include "core/util.h"
#include "cpu/kernels.h"
#include "model/model.h"
#include "sample/sampler_dev.h"

forge_context_params forge_context_default_params(void)
{
    forge_context_params p = {0};
    p.n_ctx = 0;
    p.n_batch = 512;
    p.n_threads = 0;
    p.kv_type = FORGE_KV_F32;
    p.f32_math = false;
    p.device = FORGE_DEVICE_CPU;
    p.gpu_index = 0;
    return p;
}

/* Make the model's weights usable by ctx's backend: a GPU backend takes a reference on the
 * model's device copy for its GPU (uploading it when it is the first context there) and reports
 * progress itself; the CPU backend reads the mapping directly (progress after each tensor). */
static int acquire_weights(forge_context *ctx, const forge_context_params *p, forge_err *err)
{
    const be_ops *op = ctx->be->ops;
    forge_model *m = ctx->model;
    const int n = model_weights(m, NULL, 0);
    be_weight **w = malloc((size_t)(n > 0 ? n : 1) * sizeof *w);
    uint64_t total = 0, done = 0;
    int rc = FORGE_OK;
    if (!w) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    model_weights(m, w, n);
    if (op->weights_acquire) {
        rc = op->weights_acquire(ctx->be, &m->wshare, w, n, p->progress, p->progress_user, err);
    } else if (p->progress) {
        for (int i = 0; i < n; i++)
            total += w[i]->n_bytes;
        for (int i = 0; i < n; i++) {
            done += w[i]->n_bytes;
            p->progress(done, total, p->progress_user);
        }
    }
    free(w);
    return rc;
}

static void free_bufs(forge_context *ctx)
{
    be_buf **all[] = {&ctx->b.x, &ctx->b.xn,   &ctx->b.q,  &ctx->b.k,    &ctx->b.v,     &ctx->b.att,
                      &ctx->b.o, &ctx->b.gate, &ctx->b.up, &ctx->b.last, &ctx->b.logits};
    for (size_t i = 0; i < FORGE_ARRAY_LEN(all); i++) {
        if (*all[i]) ctx->be->ops->buf_free(ctx->be, *all[i]);
        *all[i] = NULL;
    }
}

static int alloc_bufs(forge_context *ctx, forge_err *err)
{
    const forge_model_info *hp = &ctx->model->info;
    const int64_t nb = ctx->n_batch, E = hp->n_embd;
    const int64_t QD = (int64_t)hp->n_head * hp->head_dim,
                  KD = (int64_t)hp->n_head_kv * hp->head_dim;
    struct {
        be_buf **buf;
        int64_t n;
    } want[] = {
        {&ctx->b.x, nb * E},
        {&ctx->b.xn, nb * E},
        {&ctx->b.q, nb * QD},
        {&ctx->b.k, nb * KD},
        {&ctx->b.v, nb * KD},
        {&ctx->b.att, nb * QD},
        {&ctx->b.o, nb * (E > QD ? E : QD)},
        {&ctx->b.gate, nb * hp->n_ff},
        {&ctx->b.up, nb * hp->n_ff},
        {&ctx->b.last, E},
        {&ctx->b.logits, hp->n_vocab},
    };
    for (size_t i = 0; i < FORGE_ARRAY_LEN(want); i++) {
        int rc = ctx->be->ops->buf_create(ctx->be, want[i].n, want[i].buf, err);
        if (rc) return rc;
    }
    ctx->b.logits_rows = 1;
    return FORGE_OK;
}

/* The GPU backend and its memory plan (weights + KV cache + scratch must fit before anything is
 * uploaded). The activation sizes follow alloc_bufs, plus n_batch logit rows (all_logits). */
static int create_gpu(forge_context *ctx, const forge_context_params *p, forge_err *err)
{
    forge_model *m = ctx->model;
    const forge_model_info *hp = &m->info;
    int rc;
    be_weight *globals[] = {&m->tok_embd, &m->output_norm, &m->output, &m->rope_freqs};
    /* every weight's type must have GPU kernels (mixed files: each tensor's own type) */
    for (size_t i = 0; i < FORGE_ARRAY_LEN(globals); i++)
        if ((rc = backend_gpu_check_weight(globals[i], err))) return rc;
    for (int il = 0; il < hp->n_layer; il++) {
        const be_weight *lw = (const be_weight *)&m->layers[il];
        for (size_t i = 0; i < sizeof(layer_weights) / sizeof(be_weight); i++)
            if ((rc = backend_gpu_check_weight(&lw[i], err))) return rc;
    }
    if ((rc = backend_gpu_create(p->gpu_index, &ctx->be, err))) return rc;
    be_gpu_plan pl = {0};
    for (size_t i = 0; i < FORGE_ARRAY_LEN(globals); i++)
        if (!(i == 2 && hp->tied_output)) backend_gpu_plan_add_weight(ctx->be, &pl, globals[i]);
    for (int il = 0; il < hp->n_layer; il++) {
        const be_weight *lw = (const be_weight *)&m->layers[il];
        for (size_t i = 0; i < sizeof(layer_weights) / sizeof(be_weight); i++)
            backend_gpu_plan_add_weight(ctx->be, &pl, &lw[i]);
    }
    const int64_t nb = ctx->n_batch, E = hp->n_embd, F = hp->n_ff, V = hp->n_vocab;
    const int64_t QD = (int64_t)hp->n_head * hp->head_dim,
                  KD = (int64_t)hp->n_head_kv * hp->head_dim;
    pl.n_layer = hp->n_layer;
    pl.n_ctx = ctx->n_ctx;
    pl.kv_dim = m->n_embd_k_gqa;
    pl.kv_type = (int)p->kv_type;
    pl.n_head = hp->n_head;
    pl.head_dim = hp->head_dim;
    pl.n_batch = ctx->n_batch;
    pl.act_floats = nb * (2 * E + 2 * QD + 2 * KD + (E > QD ? E : QD) + 2 * F) + E + V + nb * V;
    pl.yarn = m->rope_ext_factor != 0.0f;
    pl.n_vocab = hp->n_vocab;
    pl.f32_math = p->f32_math;
    pl.share = &m->wshare;
    if ((rc = backend_gpu_plan(ctx->be, &pl, err))) return rc;
    const char *w = backend_gpu_warning(ctx->be);
    if (w) snprintf(ctx->warning, sizeof ctx->warning, "%s", w);
    return FORGE_OK;
}

/* The one place a backend is chosen: CPU, GPU, or AUTO (the GPU when it can be created and the
 * model fits, else the CPU; the reason is dropped: front ends that want to say it probe first
 * with forge_gpu_probe). */
static int select_backend(forge_context *ctx, const forge_context_params *p, forge_err *err)
{
    int rc;
    if (p->device == FORGE_DEVICE_GPU || p->device == FORGE_DEVICE_AUTO) {
        rc = create_gpu(ctx, p, err);
        if (rc == FORGE_OK || p->device == FORGE_DEVICE_GPU) return rc;
        if (ctx->be) ctx->be->ops->destroy(ctx->be);
        ctx->be = NULL;
    }
    return backend_cpu_create(ctx->n_threads, p->f32_math, &ctx->be, err);
}

int forge_context_create(forge_model *model, const forge_context_params *params,
                         forge_context **out, forge_err *err)
{
    forge_context *ctx = NULL;
    int rc;
    if (!out || !model)
        return forge_err_set(err, FORGE_E_INVALID, "forge_context_create: NULL argument");
    *out = NULL;
    forge_context_params p = params ? *params : forge_context_default_params();
    const forge_model_info *hp = &model->info;
    if (p.n_ctx < 0 || p.n_batch < 0 || p.n_threads < 0 || p.gpu_index < 0 ||
        (p.device != FORGE_DEVICE_CPU && p.device != FORGE_DEVICE_GPU &&
         p.device != FORGE_DEVICE_AUTO) ||
        (p.kv_type != FORGE_KV_F32 && p.kv_type != FORGE_KV_F16))
        return forge_err_set(err, FORGE_E_INVALID,
                             "bad context parameters: n_ctx %d, n_batch %d, threads %d, kv type %d",
                             p.n_ctx, p.n_batch, p.n_threads, (int)p.kv_type);
    ctx = calloc(1, sizeof *ctx);
    if (!ctx) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    ctx->model = model;
    ctx->n_ctx = p.n_ctx ? p.n_ctx : hp->n_ctx_train;
    ctx->n_batch = p.n_batch ? p.n_batch : 512;
    if (ctx->n_batch > ctx->n_ctx) ctx->n_batch = ctx->n_ctx;
    ctx->n_threads = p.n_threads ? p.n_threads : kern_physical_cores();
    if (ctx->n_threads < 1) ctx->n_threads = 1;
    ctx->kv_type = p.kv_type;
    if ((rc = select_backend(ctx, &p, err))) goto fail;
    if (ctx->be->ops->activate && (rc = ctx->be->ops->activate(ctx->be, err))) goto fail;
    /* weights: a GPU backend shares (or uploads) the device copy of its GPU */
    if ((rc = acquire_weights(ctx, &p, err))) goto fail;
    if ((rc = ctx->be->ops->kv_create(ctx->be, hp->n_layer, ctx->n_ctx, model->n_embd_k_gqa,
                                      (int)p.kv_type, &ctx->kv, err)))
        goto fail;
    if ((rc = alloc_bufs(ctx, err))) goto fail;
    *out = ctx;
    return FORGE_OK;
fail:
    forge_context_free(ctx);
    return rc;
}

void forge_context_free(forge_context *ctx)
{
    if (!ctx) return;
    if (ctx->be) {
        const be_ops *op = ctx->be->ops;
        /* Work may still be queued (an interrupted prompt, a failed decode): the backend frees
         * its buffers and cache in its stream's order, and releases the shared weights only
         * after its own work is done (backend.h). */
        if (op->activate) (void)op->activate(ctx->be, NULL);
        free_bufs(ctx);
        op->kv_free(ctx->be, ctx->kv);
        if (op->weights_release) op->weights_release(ctx->be);
        op->destroy(ctx->be);
    }
    free(ctx->logits);
    free(ctx);
}

int32_t forge_context_n_ctx(const forge_context *ctx)
{
    return ctx->n_ctx;
}

int32_t forge_context_n_threads(const forge_context *ctx)
{
    return ctx->n_threads;
}

int32_t forge_context_pos(const forge_context *ctx)
{
    return ctx->pos;
}

const char *forge_context_device(const forge_context *ctx)
{
    return ctx && ctx->be ? ctx->be->ops->name : "none";
}

const forge_model *forge_context_model(const forge_context *ctx)
{
    return ctx->model;
}

const char *forge_context_warning(const forge_context *ctx)
{
    return ctx && ctx->warning[0] ? ctx->warning : NULL;
}

void forge_context_set_abort_flag(forge_context *ctx, const volatile sig_atomic_t *flag)
{
    ctx->abort_flag = flag;
}

/* Make room for rows logit rows in the backend buffer and in the host array. */
static int reserve_logits(forge_context *ctx, int64_t chunk_rows, int64_t host_rows, forge_err *err)
{
    const int64_t V = ctx->model->info.n_vocab;
    if (chunk_rows > ctx->b.logits_rows) {
        ctx->be->ops->buf_free(ctx->be, ctx->b.logits);
        ctx->b.logits = NULL;
        ctx->b.logits_rows = 0;
        int rc = ctx->be->ops->buf_create(ctx->be, chunk_rows * V, &ctx->b.logits, err);
        if (rc) return rc;
        ctx->b.logits_rows = chunk_rows;
    }
    if (host_rows > ctx->logits_cap) {
        float *p = realloc(ctx->logits, (size_t)(host_rows * V) * sizeof(float));
        if (!p)
            return forge_err_set(err, FORGE_E_NOMEM, "out of memory for %lld rows of logits",
                                 (long long)host_rows);
        ctx->logits = p;
        ctx->logits_cap = host_rows;
    }
    return FORGE_OK;
}

/* The smallest i with x[i] maximal; NaN never wins, all NaN gives 0 (as the GPU's argmax). */
static int32_t host_argmax(const float *x, int32_t n)
{
    int32_t best = -1;
    for (int32_t i = 0; i < n; i++)
        if (x[i] == x[i] && (best < 0 || x[i] > x[best])) best = i;
    return best < 0 ? 0 : best;
}

/* One forward pass of a chunk. A single decoded token (one logit row) goes through the backend's
 * step_begin/step_end, which may replay a recorded step instead of the forward pass. */
static int forward_chunk(forge_context *ctx, const int32_t *ids, int32_t n, bool want_logits,
                         bool all_logits, int *rows, forge_err *err)
{
    const be_ops *op = ctx->be->ops;
    if (n != 1 || all_logits || !want_logits || !op->step_begin)
        return arch_llama_forward(ctx, ids, n, want_logits, all_logits, rows, err);
    /* a replayed step skips the forward pass and its abort check: check here */
    if (ctx->abort_flag && *ctx->abort_flag)
        return forge_err_set(err, FORGE_E_INTERRUPTED, "interrupted");
    bool replayed = false, again = false;
    int rc = op->step_begin(ctx->be, ids[0], ctx->pos, &replayed, err);
    if (rc || replayed) {
        *rows = 1;
        return rc;
    }
    for (int attempt = 0; attempt < 2; attempt++) {
        rc = arch_llama_forward(ctx, ids, n, want_logits, all_logits, rows, err);
        int rc_end = op->step_end(ctx->be, rc, &again, rc ? NULL : err);
        if (rc) return rc;
        if (rc_end) return rc_end;
        if (!again) break;
    }
    return again ? forge_err_set(err, FORGE_E_INTERNAL, "decode step was not run") : FORGE_OK;
}

/* The pick from the last logit row in ctx->b.logits: greedy (s == NULL: the backend's argmax or
 * host_argmax) or the sampler chain of s (the backend's sample op when it has one and the chain
 * fits, else forge_sampler_sample's pick on the host with the same draw). */
static int pick_last(forge_context *ctx, forge_sampler *s, int32_t *out, forge_err *err)
{
    const be_ops *op = ctx->be->ops;
    const int32_t V = ctx->model->info.n_vocab;
    int rc;
    if (!s) {
        if (op->argmax) return op->argmax(ctx->be, ctx->b.logits, 0, V, out, err);
        if ((rc = op->buf_read(ctx->be, ctx->b.logits, 0, V, ctx->logits, err))) return rc;
        *out = host_argmax(ctx->logits, V);
        return FORGE_OK;
    }
    be_sample bs;
    double r;
    sampler_dev_prepare(s, &bs, &r); /* the one draw of this pick, device or host */
    if (op->sample && sampler_dev_fits(s)) {
        rc = op->sample(ctx->be, ctx->b.logits, 0, V, &bs, out, err);
        if (rc != FORGE_E_UNSUPPORTED) return rc;
    }
    if ((rc = op->buf_read(ctx->be, ctx->b.logits, 0, V, ctx->logits, err))) return rc;
    *out = sampler_pick(s, ctx->logits, r);
    return FORGE_OK;
}

/* forge_decode, or with pick_id the pick of the last row (greedy, or by sampler s) instead of
 * the logits. */
static int decode(forge_context *ctx, const int32_t *ids, int32_t n, bool all_logits,
                  forge_sampler *s, int32_t *pick_id, forge_err *err)
{
    if (!ctx || (!ids && n > 0) || n <= 0)
        return forge_err_set(err, FORGE_E_INVALID, "forge_decode: %d tokens (need >= 1)", n);
    const int32_t V = ctx->model->info.n_vocab;
    const int32_t pos_start = ctx->pos;
    const be_ops *op = ctx->be->ops;
    int rc;
    if ((int64_t)ctx->pos + n > ctx->n_ctx)
        return forge_err_set(err, FORGE_E_RANGE,
                             "%d tokens at position %d do not fit the context of %d tokens", n,
                             ctx->pos, ctx->n_ctx);
    for (int32_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= V)
            return forge_err_set(err, FORGE_E_RANGE,
                                 "token id %d at index %d is outside the vocabulary (%d)", ids[i],
                                 i, V);
    ctx->n_logits = 0;
    if (op->activate && (rc = op->activate(ctx->be, err))) goto fail;
    if ((rc = reserve_logits(ctx, all_logits ? (n < ctx->n_batch ? n : ctx->n_batch) : 1,
                             all_logits ? n : 1, err)))
        goto fail;
    for (int32_t done = 0; done < n;) {
        int32_t chunk = n - done < ctx->n_batch ? n - done : ctx->n_batch;
        bool last_chunk = done + chunk == n;
        int rows = 0;
        if ((rc = forward_chunk(ctx, ids + done, chunk, all_logits || last_chunk, all_logits, &rows,
                                err)))
            goto fail;
        ctx->pos += chunk;
        if (pick_id && last_chunk) {
            if ((rc = pick_last(ctx, s, pick_id, err))) goto fail;
        } else if (all_logits || last_chunk) {
            float *dst = ctx->logits + (int64_t)(all_logits ? done : 0) * V;
            if ((rc = op->buf_read(ctx->be, ctx->b.logits, 0, (int64_t)rows * V, dst, err)))
                goto fail;
        }
        done += chunk;
    }
    ctx->n_logits = pick_id ? 0 : all_logits ? n : 1;
    return FORGE_OK;
fail:
    ctx->pos = pos_start;
    ctx->n_logits = 0;
    if (pick_id) *pick_id = -1;
    return rc;
}

int forge_decode(forge_context *ctx, const int32_t *ids, int32_t n, bool all_logits, forge_err *err)
{
    return decode(ctx, ids, n, all_logits, NULL, NULL, err);
}

int forge_decode_greedy(forge_context *ctx, const int32_t *ids, int32_t n, int32_t *next_id,
                        forge_err *err)
{
    if (!next_id) return forge_err_set(err, FORGE_E_INVALID, "forge_decode_greedy: NULL next_id");
    /* next_id may be one of the ids (the natural loop decodes &next into &next): it is written
     * only after the last read of the ids, and set to -1 only on failure */
    int rc = decode(ctx, ids, n, false, NULL, next_id, err);
    if (rc) *next_id = -1;
    return rc;
}

int forge_decode_sample(forge_context *ctx, const int32_t *ids, int32_t n, forge_sampler *s,
                        int32_t *next_id, forge_err *err)
{
    int rc;
    if (!next_id || !s) {
        rc = forge_err_set(err, FORGE_E_INVALID, "forge_decode_sample: NULL %s",
                           next_id ? "sampler" : "next_id");
    } else if (ctx && sampler_n_vocab(s) != ctx->model->info.n_vocab) {
        rc = forge_err_set(err, FORGE_E_INVALID,
                           "forge_decode_sample: the sampler is for %d tokens, the model has %d",
                           sampler_n_vocab(s), ctx->model->info.n_vocab);
    } else {
        /* next_id may be one of the ids: written only after their last read (as greedy) */
        rc = decode(ctx, ids, n, false, s, next_id, err);
    }
    if (rc && next_id) *next_id = -1;
    return rc;
}

const float *forge_get_logits(const forge_context *ctx, int32_t i)
{
    if (!ctx || ctx->n_logits == 0) return NULL;
    if (i == -1) i = ctx->n_logits - 1;
    if (i < 0 || i >= ctx->n_logits) return NULL;
    return ctx->logits + (int64_t)i * ctx->model->info.n_vocab;
}

int32_t forge_n_logits(const forge_context *ctx)
{
    return ctx ? ctx->n_logits : 0;
}

int forge_kv_truncate(forge_context *ctx, int32_t pos, forge_err *err)
{
    if (!ctx || pos < 0 || pos > ctx->pos)
        return forge_err_set(err, FORGE_E_RANGE,
                             "cannot truncate the KV cache to %d (it holds %d tokens)", pos,
                             ctx ? ctx->pos : 0);
    ctx->pos = pos;
    ctx->n_logits = 0;
    return FORGE_OK;
}
