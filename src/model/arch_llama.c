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
 *               experts (Mixtral, qwen3moe), in place of the line above:
 *                 h = rmsnorm(x) * ffn_norm,  r = Wrouter h          (one logit per expert)
 *                 x += sum over the n_used experts e with the largest r of
 *                      w_e Wdown_e (silu(Wgate_e h) * Wup_e h),
 *                 w = softmax(r) over all experts, renormalised to sum 1 over the selected
 *                 (Mixtral always; qwen3moe unless expert_weights_norm is false)
 *   logits = Woutput (rmsnorm(x) * output_norm)   (last row only, unless all logits)
 *
 * Where a backend offers the optional fused ops of backend.h (norm_matmul, matmul_add,
 * attention_rope; the GPU does), the same steps go through them: norm + Q/K/V (+ biases), the
 * attention block with its norms and RoPE, projection + residual add, norm + gate/up + SwiGLU.
 * Without them (the CPU) each step is the plain op, in the order above.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "core/util.h"
#include "forge_gguf.h"
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
    const int64_t E = hp->n_embd;
    const be_rope rope = blk_rope(m, NULL, 0.0f);
    int rc = FORGE_OK;

    if (m->ap.n_expert > 0 && !op->moe_ffn)
        return forge_err_set(err, FORGE_E_UNSUPPORTED,
                             "the %s backend does not run mixture-of-experts models", op->name);
    if (op->batch_set) TRY(op->batch_set(be, bt, err));
    TRY(op->get_rows(be, b->x, &m->tok_embd, ids, n, err));
    for (int il = 0; il < hp->n_layer; il++) {
        const layer_weights *l = &m->layers[il];
        TRY(blk_check_abort(fs, err));
        /* attention */
        const be_attn attn = blk_attn(m, il, bt);
        TRY(blk_attention(fs, l, &attn, &rope, 0.0f, err));
        TRY(blk_residual(be, b->x, &l->wo, l->bo.data ? &l->bo : NULL, b->att, b->o, NULL,
                         hp->rms_eps, n, E, err));
        if (m->ap.n_expert > 0) { /* feed-forward: the mixture of experts */
            const be_moe moe = {&l->ffn_gate_exps,    &l->ffn_up_exps,      &l->ffn_down_exps,
                                m->ap.n_expert,       m->ap.n_expert_used,  m->ap.n_ff_exp,
                                BE_ACT_SILU,          m->ap.expert_norm};
            TRY(op->rms_norm(be, b->xn, b->x, &l->ffn_norm, n, E, hp->rms_eps, err));
            TRY(op->matmul(be, b->router, &l->ffn_gate_inp, b->xn, n, err));
            TRY(op->moe_ffn(be, b->o, b->xn, b->router, &moe, n, err));
            TRY(op->add(be, b->x, b->o, (int64_t)n * E, err));
            continue;
        }
        /* feed-forward (SwiGLU) */
        TRY(blk_ffn(fs, l, BE_ACT_SILU, n, err));
    }
    /* output head, for the rows that want logits only (none for a prompt chunk that is not the
     * last of its sequence) */
    TRY(blk_output(fs, bt, 0.0f, err));
done:
    return rc;
}

/* The experts' hyperparameters (n_expert is read with the common ones): expert_used_count
 * (1..expert_count), the experts' FFN length (llama: feed_forward_length, as llama.cpp reads
 * Mixtral; qwen3moe: expert_feed_forward_length, default n_ff / n_used) and the renormalisation
 * of the selected weights (llama.cpp always renormalises for both; a qwen3moe file may say
 * expert_weights_norm = false, HF's norm_topk_prob). */
static int load_expert_params(loader *L, forge_err *err)
{
    forge_model *m = L->m;
    arch_params *ap = &m->ap;
    uint32_t n_used = 0, n_ff_exp = 0;
    bool norm = true;
    int rc;
    if (m->arch == ARCH_QWEN3MOE && ap->n_expert == 0)
        return forge_err_set(err, FORGE_E_FORMAT,
                             "%s: %s.expert_count is missing or 0 (a qwen3moe model has experts)",
                             L->path, L->arch);
    if (ap->n_expert == 0) return FORGE_OK;
    if ((rc = ld_u32(L, "expert_used_count", true, 0, &n_used, err))) return rc;
    if (n_used < 1 || n_used > (uint32_t)ap->n_expert)
        return forge_err_set(err, FORGE_E_FORMAT,
                             "%s: %s.expert_used_count = %u, expected 1..%d (%s.expert_count)",
                             L->path, L->arch, n_used, ap->n_expert, L->arch);
    if (m->arch == ARCH_QWEN3MOE) {
        if ((rc = ld_u32(L, "expert_feed_forward_length", false, 0, &n_ff_exp, err)) ||
            (rc = ld_bool(L, "expert_weights_norm", true, &norm, err)))
            return rc;
        if (n_ff_exp == 0) n_ff_exp = (uint32_t)m->info.n_ff / n_used;
    } else {
        n_ff_exp = (uint32_t)m->info.n_ff;
    }
    if (n_ff_exp < 1 || n_ff_exp > (1u << 24))
        return forge_err_set(err, FORGE_E_FORMAT,
                             "%s: %s.expert_feed_forward_length = %u is implausible", L->path,
                             L->arch, n_ff_exp);
    ap->n_expert_used = (int32_t)n_used;
    ap->n_ff_exp = (int32_t)n_ff_exp;
    ap->expert_norm = norm;
    ap->act = BE_ACT_SILU;
    return FORGE_OK;
}

/* A layer's mixture of experts: the router ffn_gate_inp [n_embd -> n_expert] and the stacked
 * expert matrices ffn_{gate,up,down}_exps ([n_embd, n_ff_exp, n_expert] ...). Files with a
 * shared expert (qwen2moe's ffn_*_shexp) are refused: no family here runs one yet. */
static int load_experts(loader *L, int il, layer_weights *l, forge_err *err)
{
    const forge_model *m = L->m;
    const int64_t E = m->info.n_embd, F = m->ap.n_ff_exp, NE = m->ap.n_expert;
    static const char *const shexp[] = {"ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp",
                                        "ffn_down_shexp"};
    for (size_t i = 0; i < sizeof shexp / sizeof shexp[0]; i++) {
        char name[96];
        snprintf(name, sizeof name, "blk.%d.%s.weight", il, shexp[i]);
        if (gguf_find_tensor(m->gguf, name))
            return forge_err_set(err, FORGE_E_UNSUPPORTED,
                                 "%s: tensor '%s': shared experts are not supported for %s",
                                 L->path, name, L->arch);
    }
    int rc;
    if ((rc = ld_bind_layer(L, il, &l->ffn_gate_inp, "ffn_gate_inp.weight", W_MATRIX, E, NE, true,
                            err)) ||
        (rc = ld_bind_experts(L, il, &l->ffn_gate_exps, "ffn_gate_exps.weight", E, F, NE, true,
                              err)) ||
        (rc = ld_bind_experts(L, il, &l->ffn_up_exps, "ffn_up_exps.weight", E, F, NE, true,
                              err)) ||
        (rc = ld_bind_experts(L, il, &l->ffn_down_exps, "ffn_down_exps.weight", F, E, NE, true,
                              err)))
        return rc;
    return FORGE_OK;
}

/* The llama family's tensors: the common globals, then per layer attention (q/k/v biases for
 * qwen2, q/k norms for qwen3 and qwen3moe; an attn_output bias where a file has one) and the
 * SwiGLU FFN, or with expert_count > 0 the mixture of experts (Mixtral, qwen3moe). */
int arch_llama_load(loader *L, forge_err *err)
{
    forge_model *m = L->m;
    const forge_model_info *hp = &m->info;
    const int64_t E = hp->n_embd, F = hp->n_ff, HD = hp->head_dim;
    const int64_t QD = (int64_t)hp->n_head * HD, KD = (int64_t)hp->n_head_kv * HD;
    const bool qkv_bias = m->arch == ARCH_QWEN2,
               qk_norm = m->arch == ARCH_QWEN3 || m->arch == ARCH_QWEN3MOE;
    const bool moe = m->ap.n_expert > 0;
    int rc;
    if ((rc = load_expert_params(L, err))) return rc;
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
                                err)))
            return rc;
        if (moe) {
            if ((rc = load_experts(L, il, l, err))) return rc;
        } else if ((rc = ld_bind_layer(L, il, &l->ffn_gate, "ffn_gate.weight", W_MATRIX, E, F,
                                       true, err)) ||
                   (rc = ld_bind_layer(L, il, &l->ffn_up, "ffn_up.weight", W_MATRIX, E, F, true,
                                       err)) ||
                   (rc = ld_bind_layer(L, il, &l->ffn_down, "ffn_down.weight", W_MATRIX, F, E,
                                       true, err))) {
            return rc;
        }
    }
    return FORGE_OK;
}
