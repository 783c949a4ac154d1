/* blocks.c - the pieces of a forward pass the architectures share (src/model/blocks.h), each
 * one backend op where the backend offers the fused form, else the plain ops. */
#include "model/blocks.h"

#include <math.h>

/* ys[i] = ws[i] x for weights that share the input x: one backend op where the backend offers
 * matmul_multi (same results), else n matmuls. */
int blk_matmul_shared(backend *be, int n, be_buf *const *ys, const be_weight *const *ws,
                      const be_buf *x, int n_tok, forge_err *err)
{
    if (be->ops->matmul_multi) return be->ops->matmul_multi(be, n, ys, ws, x, n_tok, err);
    for (int i = 0; i < n; i++) {
        int rc = be->ops->matmul(be, ys[i], ws[i], x, n_tok, err);
        if (rc) return rc;
    }
    return FORGE_OK;
}

/* ys[i] = ws[i] (rms_norm(x) * norm) (+ bs[i]); with swiglu ys[0] = silu(y0) * y1. One backend
 * op where it offers norm_matmul, else the plain ops (hn receives the normed x). */
int blk_norm_matmul(backend *be, int n, be_buf *const *ys, const be_weight *const *ws,
                    const be_weight *const *bs, const be_buf *x, const be_weight *norm, float eps,
                    bool swiglu, be_buf *hn, int n_tok, forge_err *err)
{
    const be_ops *op = be->ops;
    int rc;
    if (op->norm_matmul)
        return op->norm_matmul(be, n, ys, ws, bs, x, norm, eps, swiglu, hn, n_tok, err);
    if ((rc = op->rms_norm(be, hn, x, norm, n_tok, ws[0]->ne0, eps, err))) return rc;
    if ((rc = blk_matmul_shared(be, n, ys, ws, hn, n_tok, err))) return rc;
    for (int i = 0; bs && i < n; i++)
        if (bs[i] && (rc = op->add_bias(be, ys[i], bs[i], n_tok, err))) return rc;
    if (swiglu) return op->swiglu(be, ys[0], ys[0], ys[1], (int64_t)n_tok * ws[0]->ne1, err);
    return FORGE_OK;
}

/* x += w h (+ bias): the projection back into the residual stream; tmp holds w h when the
 * backend has no matmul_add (or there is a bias). */
int blk_matmul_residual(backend *be, be_buf *x, const be_weight *w, const be_weight *bias,
                        const be_buf *h, be_buf *tmp, int n_tok, int64_t dim, forge_err *err)
{
    const be_ops *op = be->ops;
    int rc;
    if (op->matmul_add && !bias) return op->matmul_add(be, x, w, h, tmp, n_tok, err);
    if ((rc = op->matmul(be, tmp, w, h, n_tok, err))) return rc;
    if (bias && (rc = op->add_bias(be, tmp, bias, n_tok, err))) return rc;
    return op->add(be, x, tmp, (int64_t)n_tok * dim, err);
}

/* logits rows 0..n_out-1 = x rows out_rows[]: contiguous runs of rows copied at once (a decode
 * batch wants every row: nothing to copy) */
int blk_gather_out_rows(backend *be, be_buf *dst, const be_buf *x, const be_batch *bt, int64_t E,
                        forge_err *err)
{
    for (int i = 0; i < bt->n_out;) {
        int j = i + 1;
        while (j < bt->n_out && bt->out_rows[j] == bt->out_rows[j - 1] + 1)
            j++;
        int rc = be->ops->copy_rows(be, dst, i, x, bt->out_rows[i], j - i, E, err);
        if (rc) return rc;
        i = j;
    }
    return FORGE_OK;
}

be_rope blk_rope(const forge_model *m, const be_weight *factors, float attn_factor)
{
    const forge_model_info *hp = &m->info;
    const be_rope r = {m->rope_mode,
                       hp->n_rot,
                       hp->rope_freq_base,
                       hp->rope_freq_scale,
                       factors              ? factors
                       : m->rope_freqs.data ? &m->rope_freqs
                                            : NULL,
                       m->rope_ext_factor,
                       attn_factor > 0.0f ? attn_factor : 1.0f,
                       {m->rope_corr_dims[0], m->rope_corr_dims[1]}};
    return r;
}

be_attn blk_attn(const forge_model *m, int il, const be_batch *bt)
{
    const forge_model_info *hp = &m->info;
    const be_attn a = {.layer = il,
                       .n_head = hp->n_head,
                       .n_head_kv = hp->n_head_kv,
                       .head_dim = hp->head_dim,
                       .scale = 1.0f / sqrtf((float)hp->head_dim),
                       .batch = bt};
    return a;
}

int blk_check_abort(const fwd_state *fs, forge_err *err)
{
    if (fs->abort_flag && *fs->abort_flag)
        return forge_err_set(err, FORGE_E_INTERRUPTED, "interrupted");
    return FORGE_OK;
}

int blk_attention(fwd_state *fs, const layer_weights *l, const be_attn *a, const be_rope *rope,
                  float q_scale, forge_err *err)
{
    backend *be = fs->be;
    const be_ops *op = be->ops;
    ctx_bufs *b = &fs->b;
    const forge_model_info *hp = &fs->model->info;
    const int n = a->batch->n_tok, HD = a->head_dim;
    const float eps = hp->rms_eps;
    int rc;
    be_buf *const qkv[] = {b->q, b->k, b->v};
    const be_weight *const w_qkv[] = {&l->wq, &l->wk, &l->wv};
    const be_weight *const b_qkv[] = {l->bq.data ? &l->bq : NULL, l->bk.data ? &l->bk : NULL,
                                      l->bv.data ? &l->bv : NULL};
    if ((rc = blk_norm_matmul(be, 3, qkv, w_qkv, b_qkv, b->x, &l->attn_norm, eps, false, b->xn, n,
                              err)))
        return rc;
    const be_weight *qn = l->q_norm.data ? &l->q_norm : NULL;
    const be_weight *kn = l->k_norm.data ? &l->k_norm : NULL;
    if (op->attention_rope && q_scale == 0.0f)
        return op->attention_rope(be, b->att, b->q, b->k, b->v, fs->kv, a, rope, qn, kn, eps, err);
    if ((qn && (rc = op->rms_norm(be, b->q, b->q, qn, (int64_t)n * a->n_head, HD, eps, err))) ||
        (kn && (rc = op->rms_norm(be, b->k, b->k, kn, (int64_t)n * a->n_head_kv, HD, eps, err))) ||
        (rc = op->rope(be, b->q, a->n_head, HD, a->batch, rope, err)) ||
        (rc = op->rope(be, b->k, a->n_head_kv, HD, a->batch, rope, err)))
        return rc;
    if (q_scale != 0.0f && (rc = op->scale(be, b->q, q_scale, (int64_t)n * a->n_head * HD, err)))
        return rc;
    return op->attention(be, b->att, b->q, b->k, b->v, fs->kv, a, err);
}

int blk_residual(backend *be, be_buf *x, const be_weight *w, const be_weight *bias, const be_buf *h,
                 be_buf *tmp, const be_weight *post_norm, float eps, int n_tok, int64_t dim,
                 forge_err *err)
{
    const be_ops *op = be->ops;
    int rc;
    if (!post_norm) return blk_matmul_residual(be, x, w, bias, h, tmp, n_tok, dim, err);
    if ((rc = op->matmul(be, tmp, w, h, n_tok, err)) ||
        (bias && (rc = op->add_bias(be, tmp, bias, n_tok, err))) ||
        (rc = op->rms_norm(be, tmp, tmp, post_norm, n_tok, dim, eps, err)))
        return rc;
    return op->add(be, x, tmp, (int64_t)n_tok * dim, err);
}

int blk_ffn(fwd_state *fs, const layer_weights *l, int act, int n_tok, forge_err *err)
{
    backend *be = fs->be;
    ctx_bufs *b = &fs->b;
    const forge_model_info *hp = &fs->model->info;
    const bool silu = act == BE_ACT_SILU;
    int rc;
    be_buf *const gate_up[] = {b->gate, b->up};
    const be_weight *const w_gate_up[] = {&l->ffn_gate, &l->ffn_up};
    if ((rc = blk_norm_matmul(be, 2, gate_up, w_gate_up, NULL, b->x, &l->ffn_norm, hp->rms_eps,
                              silu, b->xn, n_tok, err)))
        return rc;
    if (!silu) {
        if (act != BE_ACT_GELU_TANH || !be->ops->geglu)
            return forge_err_set(err, FORGE_E_UNSUPPORTED,
                                 "the %s backend has no FFN activation %d", be->ops->name, act);
        if ((rc = be->ops->geglu(be, b->gate, b->gate, b->up, (int64_t)n_tok * l->ffn_gate.ne1,
                                 err)))
            return rc;
    }
    return blk_residual(be, b->x, &l->ffn_down, NULL, b->gate, b->o,
                        l->ffn_post_norm.data ? &l->ffn_post_norm : NULL, hp->rms_eps, n_tok,
                        hp->n_embd, err);
}

int blk_output(fwd_state *fs, const be_batch *bt, float final_softcap, forge_err *err)
{
    const forge_model *m = fs->model;
    const forge_model_info *hp = &m->info;
    backend *be = fs->be;
    ctx_bufs *b = &fs->b;
    int rc;
    if (bt->n_out == 0) return FORGE_OK;
    const be_buf *src = b->x;
    if (bt->n_out < bt->n_tok) {
        if ((rc = blk_gather_out_rows(be, b->last, b->x, bt, hp->n_embd, err))) return rc;
        src = b->last;
    }
    /* tied: the embedding table itself (its device copy, if any, lives there) */
    const be_weight *out_w = hp->tied_output ? &m->tok_embd : &m->output;
    be_buf *const logits[] = {b->logits};
    if ((rc = blk_norm_matmul(be, 1, logits, &out_w, NULL, src, &m->output_norm, hp->rms_eps, false,
                              b->xn, bt->n_out, err)))
        return rc;
    if (final_softcap > 0.0f)
        return be->ops->softcap(be, b->logits, final_softcap, (int64_t)bt->n_out * hp->n_vocab,
                                err);
    return FORGE_OK;
}
