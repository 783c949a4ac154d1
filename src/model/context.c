/* context.c - inference contexts: the backend instance, the KV cache, activation buffers for a
 * batch of n_batch tokens, the position, and the host copy of the logits. Owns forge_context_*,
 * forge_decode (and its greedy / sampling variants), forge_get_logits and forge_kv_truncate of
 * include/forge_model.h. The forward pass itself lives in the architecture files. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
    if (p.n_ctx < 0 || p.n_batch < 0 || p.n_threads < 0 || p.gpu_index < 0 || p.n_tp < 0 ||
        (p.device != FORGE_DEVICE_CPU && p.device != FORGE_DEVICE_GPU &&
         p.device != FORGE_DEVICE_AUTO) ||
        (p.kv_type != FORGE_KV_F32 && p.kv_type != FORGE_KV_F16 && p.kv_type != FORGE_KV_Q8_0))
        return forge_err_set(err, FORGE_E_INVALID,
                             "bad context parameters: n_ctx %d, n_batch %d, threads %d, kv type "
                             "%d, tp %d",
                             p.n_ctx, p.n_batch, p.n_threads, (int)p.kv_type, p.n_tp);
    ctx = calloc(1, sizeof *ctx);
    if (!ctx) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    ctx->model = model;
    ctx->n_ctx = p.n_ctx ? p.n_ctx : hp->n_ctx_train;
    int32_t n_batch = p.n_batch ? p.n_batch : 512;
    if (n_batch > ctx->n_ctx) n_batch = ctx->n_ctx;
    int32_t n_threads = p.n_threads ? p.n_threads : kern_physical_cores();
    if (n_threads < 1) n_threads = 1;
    /* one sequence: the cache is one block of n_ctx rows, position p at row p */
    fwd_params fp = {0};
    fp.device = p.device;
    fp.gpu_index = p.gpu_index;
    fp.n_threads = n_threads;
    fp.f32_math = p.f32_math;
    fp.kv_type = p.kv_type;
    fp.kv_rows = ctx->n_ctx;
    fp.n_batch = n_batch;
    fp.n_seq_max = 1;
    fp.n_tp = p.n_tp;
    fp.progress = p.progress;
    fp.progress_user = p.progress_user;
    if ((rc = fwd_state_init(&ctx->fs, model, &fp, err))) goto fail;
    *out = ctx;
    return FORGE_OK;
fail:
    forge_context_free(ctx);
    return rc;
}

void forge_context_free(forge_context *ctx)
{
    if (!ctx) return;
    fwd_state_release(&ctx->fs);
    free(ctx->logits);
    free(ctx);
}

const char *forge_kv_type_name(forge_kv_type t)
{
    return t == FORGE_KV_F32 ? "f32" : t == FORGE_KV_F16 ? "f16" : t == FORGE_KV_Q8_0 ? "q8_0" : "?";
}

int32_t forge_context_n_ctx(const forge_context *ctx)
{
    return ctx->n_ctx;
}

int32_t forge_context_n_threads(const forge_context *ctx)
{
    return ctx->fs.n_threads;
}

int32_t forge_context_pos(const forge_context *ctx)
{
    return ctx->pos;
}

const char *forge_context_device(const forge_context *ctx)
{
    return ctx && ctx->fs.be ? ctx->fs.be->ops->name : "none";
}

const forge_model *forge_context_model(const forge_context *ctx)
{
    return ctx->model;
}

const char *forge_context_warning(const forge_context *ctx)
{
    return ctx && ctx->fs.warning[0] ? ctx->fs.warning : NULL;
}

void forge_context_set_abort_flag(forge_context *ctx, const volatile sig_atomic_t *flag)
{
    ctx->fs.abort_flag = flag;
}

/* Make room for chunk_rows logit rows in the backend buffer and host_rows in the host array. */
static int reserve_logits(forge_context *ctx, int64_t chunk_rows, int64_t host_rows, forge_err *err)
{
    const int64_t V = ctx->model->info.n_vocab;
    int rc = fwd_reserve_logits(&ctx->fs, chunk_rows, err);
    if (rc) return rc;
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

/* The batch of a context's chunk: one sequence whose cache is one block of n_ctx rows,
 * position p at row p; logits of every row (out_mode 2), of the last one (1), or none (0). */
static const be_batch *chunk_batch(const forge_context *ctx, int32_t n, int out_mode,
                                   int32_t *rows_buf, be_span_batch *sb)
{
    int32_t *pos = rows_buf, *out = rows_buf + n;
    for (int32_t i = 0; i < n; i++)
        out[i] = i;
    return be_span_batch_init(sb, pos, n, ctx->pos, ctx->n_ctx, out_mode == 2 ? out : out + n - 1,
                              out_mode == 2 ? n : out_mode);
}

/* One forward pass of a chunk (out_mode 0: no logits, 1: the last row's, 2: every row's). A
 * single decoded token (one logit row) goes through the backend's step_begin/step_end, which may
 * replay a recorded step instead of the forward pass. */
static int forward_chunk(forge_context *ctx, const int32_t *ids, int32_t n, int out_mode,
                         int32_t *rows_buf, forge_err *err)
{
    backend *be = ctx->fs.be;
    const be_ops *op = be->ops;
    be_span_batch sb;
    const be_batch *bt = chunk_batch(ctx, n, out_mode, rows_buf, &sb);
    if (n != 1 || out_mode != 1 || !op->step_begin) return model_forward(&ctx->fs, ids, bt, err);
    /* a replayed step skips the forward pass and its abort check: check here */
    if (ctx->fs.abort_flag && *ctx->fs.abort_flag)
        return forge_err_set(err, FORGE_E_INTERRUPTED, "interrupted");
    bool replayed = false;
    int rc = op->step_begin(be, ids[0], ctx->pos, &replayed, err);
    if (rc || replayed) return rc;
    return model_forward_step(&ctx->fs, ids, bt, err);
}

/* The pick from the last logit row in the logits buffer: greedy (s == NULL: the backend's
 * argmax or host_argmax) or the sampler chain of s (the backend's sample op when it has one and
 * the chain fits, else forge_sampler_sample's pick on the host with the same draw). */
static int pick_last(forge_context *ctx, forge_sampler *s, int32_t *out, forge_err *err)
{
    backend *be = ctx->fs.be;
    const be_ops *op = be->ops;
    const be_buf *lg = ctx->fs.b.logits;
    const int32_t V = ctx->model->info.n_vocab;
    int rc;
    if (!s) {
        if (op->argmax) return op->argmax(be, lg, 0, V, out, err);
        if ((rc = op->buf_read(be, lg, 0, V, ctx->logits, err))) return rc;
        *out = host_argmax(ctx->logits, V);
        return FORGE_OK;
    }
    be_sample bs;
    double r;
    sampler_dev_prepare(s, &bs, &r); /* the one draw of this pick, device or host */
    if (op->sample && sampler_dev_fits(s)) {
        rc = op->sample(be, lg, 0, V, &bs, out, err);
        if (rc != FORGE_E_UNSUPPORTED) return rc;
    }
    if ((rc = op->buf_read(be, lg, 0, V, ctx->logits, err))) return rc;
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
    const int32_t pos_start = ctx->pos, n_batch = ctx->fs.n_batch;
    backend *be = ctx->fs.be;
    const be_ops *op = be->ops;
    int32_t *rows_buf = NULL;
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
    const int32_t max_chunk = n < n_batch ? n : n_batch;
    if (!(rows_buf = malloc(2 * (size_t)max_chunk * sizeof *rows_buf))) {
        rc = forge_err_set(err, FORGE_E_NOMEM, "out of memory");
        goto fail;
    }
    if (op->activate && (rc = op->activate(be, err))) goto fail;
    if ((rc = reserve_logits(ctx, all_logits ? max_chunk : 1, all_logits ? n : 1, err))) goto fail;
    for (int32_t done = 0; done < n;) {
        int32_t chunk = n - done < n_batch ? n - done : n_batch;
        bool last_chunk = done + chunk == n;
        int out_mode = all_logits ? 2 : last_chunk ? 1 : 0;
        if ((rc = forward_chunk(ctx, ids + done, chunk, out_mode, rows_buf, err))) goto fail;
        ctx->pos += chunk;
        if (pick_id && last_chunk) {
            if ((rc = pick_last(ctx, s, pick_id, err))) goto fail;
        } else if (out_mode) {
            float *dst = ctx->logits + (int64_t)(all_logits ? done : 0) * V;
            int64_t rows = out_mode == 2 ? chunk : 1;
            if ((rc = op->buf_read(be, ctx->fs.b.logits, 0, rows * V, dst, err))) goto fail;
        }
        done += chunk;
    }
    free(rows_buf);
    ctx->n_logits = pick_id ? 0 : all_logits ? n : 1;
    return FORGE_OK;
fail:
    free(rows_buf);
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
