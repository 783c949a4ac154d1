/* arch_glm.c - ChatGLM3 / GLM-4-9B (GGUF arch "chatglm") and GLM-4-0414 (arch "glm4"): their
 * tensors and forward pass, written against the backend interface like arch_llama.c. Semantics
 * follow llama.cpp's chatglm graph (c392e50), its newer glm4 graph (src/models/glm4.cpp) and
 * Hugging Face's modeling_glm.py / modeling_glm4.py.
 *
 *   x = embed(ids)
 *   per layer:  h = rmsnorm(x) * attn_norm
 *               q | k | v = Wqkv h + bqkv        (one fused matrix and bias, bound as row views;
 *                                                 or separate attn_q/k/v, biases optional)
 *               q, k = rope(q), rope(k)          (NORM: adjacent pairs, over the first n_rot dims
 *                                                 of a head only: GLM rotates half of each head)
 *               a = Wo attention(q, k, v)
 *               glm4: a = rmsnorm(a) * post_attention_norm
 *               x += a
 *               g | u = Wup rmsnorm(x)*ffn_norm  (ffn_up holds the gate rows, then the up rows)
 *               f = Wdown (silu(g) * u)
 *               glm4: f = rmsnorm(f) * post_ffw_norm
 *               x += f
 *   logits = Woutput (rmsnorm(x) * output_norm)  (no output bias)
 */
#include <math.h>
#include <stdlib.h>

#include "core/util.h"
#include "model/blocks.h"
#include "model/loader.h"

int arch_glm_forward(fwd_state *fs, const int32_t *ids, const be_batch *bt, forge_err *err)
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

    if (op->batch_set) TRY(op->batch_set(be, bt, err));
    TRY(op->get_rows(be, b->x, &m->tok_embd, ids, n, err));
    for (int il = 0; il < hp->n_layer; il++) {
        const layer_weights *l = &m->layers[il];
        TRY(blk_check_abort(fs, err));
        /* attention; glm4 norms its output before the residual add */
        const be_attn attn = blk_attn(m, il, bt);
        TRY(blk_attention(fs, l, &attn, &rope, 0.0f, err));
        TRY(blk_residual(be, b->x, &l->wo, NULL, b->att, b->o,
                         l->attn_post_norm.data ? &l->attn_post_norm : NULL, hp->rms_eps, n, E,
                         err));
        /* feed-forward: the gate and up halves of the fused ffn_up, SwiGLU (glm4: post-normed) */
        TRY(blk_ffn(fs, l, BE_ACT_SILU, n, err));
    }
    TRY(blk_output(fs, bt, 0.0f, err));
done:
    return rc;
}

/* glm4's rope.dimension_sections (GLM-4V / GLM-OCR): non-zero sections mean multimodal RoPE,
 * which Forge does not have. */
static int refuse_mrope(loader *L, forge_err *err)
{
    int32_t sec[4] = {0};
    int rc = ld_layer_u32s(L, "rope.dimension_sections", sec, 4, err);
    if (rc == FORGE_E_NOTFOUND) return FORGE_OK;
    if (rc) return rc;
    if (sec[0] || sec[1] || sec[2] || sec[3])
        return forge_err_set(err, FORGE_E_UNSUPPORTED,
                             "%s: %s.rope.dimension_sections [%d, %d, %d, %d] asks for multimodal "
                             "RoPE, which is not supported",
                             L->path, L->arch, sec[0], sec[1], sec[2], sec[3]);
    return FORGE_OK;
}

/* The GLM tensors: the common globals, and per layer attn_norm, the fused attn_qkv with its bias
 * (or attn_q/k/v with optional biases), attn_output, ffn_norm, the fused ffn_up [E -> 2F] (gate
 * rows first), ffn_down, and for glm4 post_attention_norm and post_ffw_norm. */
int arch_glm_load(loader *L, forge_err *err)
{
    forge_model *m = L->m;
    const forge_model_info *hp = &m->info;
    const int64_t E = hp->n_embd, F = hp->n_ff, HD = hp->head_dim;
    const int64_t QD = (int64_t)hp->n_head * HD, KD = (int64_t)hp->n_head_kv * HD;
    const bool post_norms = m->arch == ARCH_GLM4;
    int rc;
    if (m->ap.n_expert > 0)
        return forge_err_set(err, FORGE_E_UNSUPPORTED,
                             "%s: a %s model with experts (%s.expert_count = %d) is not supported",
                             L->path, L->arch, L->arch, m->ap.n_expert);
    if ((post_norms && (rc = refuse_mrope(L, err))) || (rc = ld_globals(L, err))) return rc;
    m->layers = calloc((size_t)hp->n_layer, sizeof *m->layers);
    if (!m->layers) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    for (int il = 0; il < hp->n_layer; il++) {
        layer_weights *l = &m->layers[il];
        if ((rc = ld_bind_layer(L, il, &l->attn_norm, "attn_norm.weight", W_VECTOR, E, 1, true,
                                err)) ||
            (rc = ld_bind_qkv(L, il, l, E, QD, KD, err)) ||
            (rc = ld_bind_layer(L, il, &l->wo, "attn_output.weight", W_MATRIX, QD, E, true, err)) ||
            (post_norms && (rc = ld_bind_layer(L, il, &l->attn_post_norm,
                                               "post_attention_norm.weight", W_VECTOR, E, 1, true,
                                               err))) ||
            (rc = ld_bind_layer(L, il, &l->ffn_norm, "ffn_norm.weight", W_VECTOR, E, 1, true,
                                err)) ||
            (rc = ld_bind_gate_up(L, il, l, E, F, err)) ||
            (rc = ld_bind_layer(L, il, &l->ffn_down, "ffn_down.weight", W_MATRIX, F, E, true,
                                err)) ||
            (post_norms && (rc = ld_bind_layer(L, il, &l->ffn_post_norm, "post_ffw_norm.weight",
                                               W_VECTOR, E, 1, true, err))))
            return rc;
    }
    return FORGE_OK;
}
