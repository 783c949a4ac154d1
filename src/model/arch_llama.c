/* arch_llama.c - the forward pass of the llama family (llama, mistral, qwen2, qwen3), written once
 * against the backend interface (src/backend/backend.h). It never touches activation memory:
 * every step is a backend op on backend-owned buffers, so it runs unchanged on any backend.
 *
 *   x = embed(ids)
 *   per layer:  h = rmsnorm(x) * attn_norm
 *               q, k, v = Wq h (+bq), Wk h (+bk), Wv h (+bv)
 *               qwen3: q, k = per-head rmsnorm(q) * q_norm, rmsnorm(k) * k_norm
 *               q, k = rope(q), rope(k)          (NORM pairs for llama, NEOX halves for qwen)
 *               x += Wo attention(q, k, v)       (K/V stored in the cache first)
 *               x += Wdown (silu(Wgate rmsnorm(x)*ffn_norm) * Wup rmsnorm(x)*ffn_norm)
 *   logits = Woutput (rmsnorm(x) * output_norm)   (last row only, unless all logits)
 */
#include <math.h>

#include "core/util.h"
#include "model/model.h"

#define TRY(expr)                                                                                  \
    do {                                                                                           \
        rc = (expr);                                                                               \
        if (rc) goto done;                                                                         \
    } while (0)

/* ys[i] = ws[i] x for weights that share the input x: one backend op where the backend offers
 * matmul_multi (same results), else n matmuls. */
static int matmul_shared(backend *be, int n, be_buf *const *ys, const be_weight *const *ws,
                         const be_buf *x, int n_tok, forge_err *err)
{
    if (be->ops->matmul_multi) return be->ops->matmul_multi(be, n, ys, ws, x, n_tok, err);
    for (int i = 0; i < n; i++) {
        int rc = be->ops->matmul(be, ys[i], ws[i], x, n_tok, err);
        if (rc) return rc;
    }
    return FORGE_OK;
}

int arch_llama_forward(forge_context *ctx, const int32_t *ids, int n, bool want_logits,
                       bool all_logits, int *n_out, forge_err *err)
{
    const forge_model *m = ctx->model;
    const forge_model_info *hp = &m->info;
    backend *be = ctx->be;
    const be_ops *op = be->ops;
    ctx_bufs *b = &ctx->b;
    const int64_t E = hp->n_embd, F = hp->n_ff, HD = hp->head_dim;
    const be_rope rope = {m->rope_mode,
                          hp->n_rot,
                          hp->rope_freq_base,
                          hp->rope_freq_scale,
                          m->rope_freqs.data ? &m->rope_freqs : NULL,
                          m->rope_ext_factor,
                          1.0f,
                          {m->rope_corr_dims[0], m->rope_corr_dims[1]}};
    int rc = FORGE_OK;

    TRY(op->get_rows(be, b->x, &m->tok_embd, ids, n, err));
    for (int il = 0; il < hp->n_layer; il++) {
        const layer_weights *l = &m->layers[il];
        if (ctx->abort_flag && *ctx->abort_flag) {
            rc = forge_err_set(err, FORGE_E_INTERRUPTED, "interrupted");
            goto done;
        }
        /* attention */
        TRY(op->rms_norm(be, b->xn, b->x, &l->attn_norm, n, E, hp->rms_eps, err));
        be_buf *const qkv[] = {b->q, b->k, b->v};
        const be_weight *const w_qkv[] = {&l->wq, &l->wk, &l->wv};
        TRY(matmul_shared(be, 3, qkv, w_qkv, b->xn, n, err));
        if (l->bq.data) TRY(op->add_bias(be, b->q, &l->bq, n, err));
        if (l->bk.data) TRY(op->add_bias(be, b->k, &l->bk, n, err));
        if (l->bv.data) TRY(op->add_bias(be, b->v, &l->bv, n, err));
        if (l->q_norm.data)
            TRY(op->rms_norm(be, b->q, b->q, &l->q_norm, (int64_t)n * hp->n_head, HD, hp->rms_eps,
                             err));
        if (l->k_norm.data)
            TRY(op->rms_norm(be, b->k, b->k, &l->k_norm, (int64_t)n * hp->n_head_kv, HD,
                             hp->rms_eps, err));
        TRY(op->rope(be, b->q, n, hp->n_head, (int)HD, ctx->pos, &rope, err));
        TRY(op->rope(be, b->k, n, hp->n_head_kv, (int)HD, ctx->pos, &rope, err));
        const be_attn attn = {
            il, ctx->pos, n, hp->n_head, hp->n_head_kv, (int)HD, 1.0f / sqrtf((float)HD)};
        TRY(op->attention(be, b->att, b->q, b->k, b->v, ctx->kv, &attn, err));
        TRY(op->matmul(be, b->o, &l->wo, b->att, n, err));
        if (l->bo.data) TRY(op->add_bias(be, b->o, &l->bo, n, err));
        TRY(op->add(be, b->x, b->o, (int64_t)n * E, err));
        /* feed-forward (SwiGLU) */
        TRY(op->rms_norm(be, b->xn, b->x, &l->ffn_norm, n, E, hp->rms_eps, err));
        be_buf *const gate_up[] = {b->gate, b->up};
        const be_weight *const w_gate_up[] = {&l->ffn_gate, &l->ffn_up};
        TRY(matmul_shared(be, 2, gate_up, w_gate_up, b->xn, n, err));
        TRY(op->swiglu(be, b->gate, b->gate, b->up, (int64_t)n * F, err));
        TRY(op->matmul(be, b->o, &l->ffn_down, b->gate, n, err));
        TRY(op->add(be, b->x, b->o, (int64_t)n * E, err));
    }
    /* output head (not needed for a prompt chunk that is not the last) */
    if (!want_logits) {
        *n_out = 0;
        goto done;
    }
    const be_buf *src = b->x;
    int rows = n;
    if (!all_logits) {
        TRY(op->copy_rows(be, b->last, b->x, n - 1, 1, E, err));
        src = b->last;
        rows = 1;
    }
    TRY(op->rms_norm(be, b->xn, src, &m->output_norm, rows, E, hp->rms_eps, err));
    /* tied: the embedding table itself (its device copy, if any, lives there) */
    const be_weight *out_w = m->info.tied_output ? &m->tok_embd : &m->output;
    TRY(op->matmul(be, b->logits, out_w, b->xn, rows, err));
    *n_out = rows;
done:
    return rc;
}
