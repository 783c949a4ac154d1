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
 *
 * Where a backend offers the optional fused ops of backend.h (norm_matmul, matmul_add,
 * attention_rope; the GPU does), the same steps go through them: norm + Q/K/V (+ biases), the
 * attention block with its norms and RoPE, projection + residual add, norm + gate/up + SwiGLU.
 * Without them (the CPU) each step is the plain op, in the order above.
 */
#include <math.h>
#include <stdlib.h>

#include "core/util.h"
#include "model/blocks.h"
#include "model/loader.h"

int arch_llama_forward(fwd_state *fs, const int32_t *ids, const be_batch *bt, forge_err *err)
{
    const forge_model *m = fs->model;
    const forge_model_info *hp = &m->info;
    backend *be = fs->be;
    const be_ops *op = be->ops;
    ctx_bufs *b = &fs->b;
    const int n = bt->n_tok;
    const int64_t E = hp->n_embd, HD = hp->head_dim;
    const be_rope rope = {m->rope_mode,
                          hp->n_rot,
                          hp->rope_freq_base,
                          hp->rope_freq_scale,
                          m->rope_freqs.data ? &m->rope_freqs : NULL,
                          m->rope_ext_factor,
                          1.0f,
                          {m->rope_corr_dims[0], m->rope_corr_dims[1]}};
    int rc = FORGE_OK;

    if (op->batch_set) TRY(op->batch_set(be, bt, err));
    TRY(op->get_rows(be, b->x, &m->tok_embd, ids, n, err));
    for (int il = 0; il < hp->n_layer; il++) {
        const layer_weights *l = &m->layers[il];
        if (fs->abort_flag && *fs->abort_flag) {
            rc = forge_err_set(err, FORGE_E_INTERRUPTED, "interrupted");
            goto done;
        }
        /* attention */
        be_buf *const qkv[] = {b->q, b->k, b->v};
        const be_weight *const w_qkv[] = {&l->wq, &l->wk, &l->wv};
        const be_weight *const b_qkv[] = {l->bq.data ? &l->bq : NULL, l->bk.data ? &l->bk : NULL,
                                          l->bv.data ? &l->bv : NULL};
        TRY(blk_norm_matmul(be, 3, qkv, w_qkv, b_qkv, b->x, &l->attn_norm, hp->rms_eps, false, b->xn,
                        n, err));
        const be_attn attn = {
            il, hp->n_head, hp->n_head_kv, (int)HD, 1.0f / sqrtf((float)HD), bt, 0.0f, 0};
        const be_weight *qn = l->q_norm.data ? &l->q_norm : NULL;
        const be_weight *kn = l->k_norm.data ? &l->k_norm : NULL;
        if (op->attention_rope) {
            TRY(op->attention_rope(be, b->att, b->q, b->k, b->v, fs->kv, &attn, &rope, qn, kn,
                                   hp->rms_eps, err));
        } else {
            if (qn)
                TRY(op->rms_norm(be, b->q, b->q, qn, (int64_t)n * hp->n_head, HD, hp->rms_eps,
                                 err));
            if (kn)
                TRY(op->rms_norm(be, b->k, b->k, kn, (int64_t)n * hp->n_head_kv, HD, hp->rms_eps,
                                 err));
            TRY(op->rope(be, b->q, hp->n_head, (int)HD, bt, &rope, err));
            TRY(op->rope(be, b->k, hp->n_head_kv, (int)HD, bt, &rope, err));
            TRY(op->attention(be, b->att, b->q, b->k, b->v, fs->kv, &attn, err));
        }
        TRY(blk_matmul_residual(be, b->x, &l->wo, l->bo.data ? &l->bo : NULL, b->att, b->o, n, E,
                            err));
        /* feed-forward (SwiGLU) */
        be_buf *const gate_up[] = {b->gate, b->up};
        const be_weight *const w_gate_up[] = {&l->ffn_gate, &l->ffn_up};
        TRY(blk_norm_matmul(be, 2, gate_up, w_gate_up, NULL, b->x, &l->ffn_norm, hp->rms_eps, true,
                        b->xn, n, err));
        TRY(blk_matmul_residual(be, b->x, &l->ffn_down, NULL, b->gate, b->o, n, E, err));
    }
    /* output head, for the rows that want logits only (none for a prompt chunk that is not the
     * last of its sequence) */
    if (bt->n_out == 0) goto done;
    const be_buf *src = b->x;
    if (bt->n_out < n) {
        TRY(blk_gather_out_rows(be, b->last, b->x, bt, E, err));
        src = b->last;
    }
    /* tied: the embedding table itself (its device copy, if any, lives there) */
    const be_weight *out_w = m->info.tied_output ? &m->tok_embd : &m->output;
    be_buf *const logits[] = {b->logits};
    TRY(blk_norm_matmul(be, 1, logits, &out_w, NULL, src, &m->output_norm, hp->rms_eps, false, b->xn,
                    bt->n_out, err));
done:
    return rc;
}

/* The llama family's tensors: the common globals, then per layer attention (q/k/v biases for
 * qwen2, q/k norms for qwen3; an attn_output bias where a file has one) and the SwiGLU FFN. */
int arch_llama_load(loader *L, forge_err *err)
{
    forge_model *m = L->m;
    const forge_model_info *hp = &m->info;
    const int64_t E = hp->n_embd, F = hp->n_ff, HD = hp->head_dim;
    const int64_t QD = (int64_t)hp->n_head * HD, KD = (int64_t)hp->n_head_kv * HD;
    const bool qkv_bias = m->arch == ARCH_QWEN2, qk_norm = m->arch == ARCH_QWEN3;
    int rc;
    if (m->ap.n_expert > 0)
        return forge_err_set(
            err, FORGE_E_UNSUPPORTED,
            "%s: mixture-of-experts models (%s.expert_count = %d) are not supported yet", L->path,
            L->arch, m->ap.n_expert);
    if ((rc = ld_globals(L, err))) return rc;
    m->layers = calloc((size_t)hp->n_layer, sizeof *m->layers);
    if (!m->layers) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    for (int il = 0; il < hp->n_layer; il++) {
        layer_weights *l = &m->layers[il];
        if ((rc = ld_bind_layer(L, il, &l->attn_norm, "attn_norm.weight", W_VECTOR, E, 1, true,
                                err)) ||
            (rc = ld_bind_layer(L, il, &l->wq, "attn_q.weight", W_MATRIX, E, QD, true, err)) ||
            (rc = ld_bind_layer(L, il, &l->wk, "attn_k.weight", W_MATRIX, E, KD, true, err)) ||
            (rc = ld_bind_layer(L, il, &l->wv, "attn_v.weight", W_MATRIX, E, KD, true, err)) ||
            (rc = ld_bind_layer(L, il, &l->wo, "attn_output.weight", W_MATRIX, QD, E, true, err)) ||
            (rc = ld_bind_layer(L, il, &l->bq, "attn_q.bias", W_VECTOR, QD, 1, qkv_bias, err)) ||
            (rc = ld_bind_layer(L, il, &l->bk, "attn_k.bias", W_VECTOR, KD, 1, qkv_bias, err)) ||
            (rc = ld_bind_layer(L, il, &l->bv, "attn_v.bias", W_VECTOR, KD, 1, qkv_bias, err)) ||
            (rc = ld_bind_layer(L, il, &l->bo, "attn_output.bias", W_VECTOR, E, 1, false, err)) ||
            (rc = ld_bind_layer(L, il, &l->q_norm, "attn_q_norm.weight", W_VECTOR, HD, 1, qk_norm,
                                err)) ||
            (rc = ld_bind_layer(L, il, &l->k_norm, "attn_k_norm.weight", W_VECTOR, HD, 1, qk_norm,
                                err)) ||
            (rc = ld_bind_layer(L, il, &l->ffn_norm, "ffn_norm.weight", W_VECTOR, E, 1, true,
                                err)) ||
            (rc = ld_bind_layer(L, il, &l->ffn_gate, "ffn_gate.weight", W_MATRIX, E, F, true,
                                err)) ||
            (rc = ld_bind_layer(L, il, &l->ffn_up, "ffn_up.weight", W_MATRIX, E, F, true, err)) ||
            (rc = ld_bind_layer(L, il, &l->ffn_down, "ffn_down.weight", W_MATRIX, F, E, true, err)))
            return rc;
    }
    return FORGE_OK;
}
