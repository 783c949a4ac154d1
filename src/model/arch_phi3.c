/* arch_phi3.c - Phi-3, Phi-3.5 and Phi-4-mini (GGUF arch "phi3"): their tensors and forward pass,
 * written against the backend interface like arch_llama.c. Semantics follow llama.cpp's phi3
 * graph (c392e50) and Hugging Face's modeling_phi3.py.
 *
 *   x = embed(ids)
 *   per layer:  h = rmsnorm(x) * attn_norm
 *               q | k | v = Wqkv h               (one fused matrix, bound as three row views;
 *                                                 or separate attn_q/k/v with optional biases)
 *               q, k = rope(q), rope(k)          (NEOX halves over the first n_rot dims of a head:
 *                                                 Phi-4-mini rotates 3/4 of them; LongRoPE divides
 *                                                 theta_i by factor_i and scales cos/sin)
 *               x += Wo attention(q, k, v)       (sliding window where the file sets one)
 *               g | u = Wup rmsnorm(x)*ffn_norm  (ffn_up holds the gate rows, then the up rows)
 *               x += Wdown (silu(g) * u)
 *   logits = Woutput (rmsnorm(x) * output_norm)
 *
 * LongRoPE (the 128k models): rope_factors_long / rope_factors_short hold one factor per rotated
 * pair. As llama.cpp does, a forward state whose sequences may run past the original training
 * context (rope.scaling.original_context_length) uses the long factors, any other the short ones,
 * for every position; cos and sin are scaled by rope.scaling.attn_factor (1 when absent).
 *
 * Sliding window: llama.cpp c392e50 masks keys more than attention.sliding_window - 1 positions
 * back (Phi-3-mini-4k: 2047), with its defaults by layer count for files without the key and 0
 * (Phi-4) meaning none. Forge does the same. (Newer llama.cpp ignores the window altogether; the
 * two agree for prompts up to the window.)
 */
#include <math.h>
#include <stdlib.h>

#include "core/util.h"
#include "model/blocks.h"
#include "model/loader.h"

int arch_phi3_forward(fwd_state *fs, const int32_t *ids, const be_batch *bt, forge_err *err)
{
    const forge_model *m = fs->model;
    const forge_model_info *hp = &m->info;
    backend *be = fs->be;
    const be_ops *op = be->ops;
    ctx_bufs *b = &fs->b;
    const int n = bt->n_tok;
    const int64_t E = hp->n_embd;
    /* the frequency factors: rope_freqs where a file has them (llama.cpp prefers them), else
     * LongRoPE's long or short set by the longest sequence this state may hold */
    const be_weight *factors = NULL;
    if (!m->rope_freqs.data && m->rope_long.data)
        factors = fs->n_ctx_seq > m->ap.rope_n_ctx_orig ? &m->rope_long : &m->rope_short;
    const be_rope rope = blk_rope(m, factors, m->ap.rope_attn_factor);
    int rc = FORGE_OK;

    if (op->batch_set) TRY(op->batch_set(be, bt, err));
    TRY(op->get_rows(be, b->x, &m->tok_embd, ids, n, err));
    for (int il = 0; il < hp->n_layer; il++) {
        const layer_weights *l = &m->layers[il];
        TRY(blk_check_abort(fs, err));
        /* attention (the fused attn_qkv bound as q/k/v views), the window on its layers */
        const bool swa = m->ap.layer_swa && m->ap.layer_swa[il];
        be_attn attn = blk_attn(m, il, bt);
        attn.window = swa ? m->ap.swa_window : 0;
        TRY(blk_attention(fs, l, &attn, &rope, 0.0f, err));
        TRY(blk_residual(be, b->x, &l->wo, l->bo.data ? &l->bo : NULL, b->att, b->o, NULL,
                         hp->rms_eps, n, E, err));
        /* feed-forward: the gate and up halves of the fused ffn_up, SwiGLU */
        TRY(blk_ffn(fs, l, BE_ACT_SILU, n, err));
    }
    TRY(blk_output(fs, bt, 0.0f, err));
done:
    return rc;
}

/* attention.sliding_window; absent: llama.cpp's defaults for the files converted before the key
 * existed (Phi-3-mini/medium 4k: 2047, mini 128k: 262144, medium 128k: 131072), else an error as
 * there. 0: no window. */
static int load_window(loader *L, forge_err *err)
{
    forge_model *m = L->m;
    const forge_model_info *hp = &m->info;
    uint32_t window = 0;
    if (hp->n_ctx_train == 4096 && (hp->n_layer == 32 || hp->n_layer == 40))
        window = 2047;
    else if (hp->n_layer == 32 && hp->n_head_kv == 32 && hp->n_ctx_train == 131072)
        window = 262144;
    else if (hp->n_layer == 40 && hp->n_ctx_train == 131072)
        window = 131072;
    int rc = ld_u32(L, "attention.sliding_window", window == 0, window, &window, err);
    if (rc) return rc;
    if (window == 0) return FORGE_OK;
    if (window > (1u << 24))
        return forge_err_set(err, FORGE_E_FORMAT, "%s: %s.attention.sliding_window %u is implausible",
                             L->path, L->arch, window);
    m->ap.swa_window = (int32_t)window;
    m->ap.layer_swa = calloc((size_t)hp->n_layer, sizeof *m->ap.layer_swa);
    if (!m->ap.layer_swa) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    for (int il = 0; il < hp->n_layer; il++)
        m->ap.layer_swa[il] = true;
    return FORGE_OK;
}

/* LongRoPE: both factor sets (n_rot / 2 each) or neither, the original training context and the
 * cos/sin scale. */
static int load_longrope(loader *L, forge_err *err)
{
    forge_model *m = L->m;
    const forge_model_info *hp = &m->info;
    const int64_t n_pairs = hp->n_rot / 2;
    uint32_t n_ctx_orig;
    float attn_factor;
    int rc;
    if ((rc = ld_bind(L, &m->rope_long, "rope_factors_long.weight", W_VECTOR, n_pairs, 1, false,
                      err)) ||
        (rc = ld_bind(L, &m->rope_short, "rope_factors_short.weight", W_VECTOR, n_pairs, 1, false,
                      err)))
        return rc;
    if (!m->rope_long.data != !m->rope_short.data)
        return forge_err_set(err, FORGE_E_NOTFOUND,
                             "%s: tensor '%s' is present but '%s' is not (LongRoPE needs both)",
                             L->path, m->rope_long.data ? "rope_factors_long.weight"
                                                        : "rope_factors_short.weight",
                             m->rope_long.data ? "rope_factors_short.weight"
                                               : "rope_factors_long.weight");
    if ((rc = ld_u32(L, "rope.scaling.original_context_length", false, (uint32_t)hp->n_ctx_train,
                     &n_ctx_orig, err)) ||
        (rc = ld_f32(L, "rope.scaling.attn_factor", 1.0f, &attn_factor, err)))
        return rc;
    if (!(attn_factor > 0.0f) || attn_factor > 100.0f)
        return forge_err_set(err, FORGE_E_FORMAT, "%s: %s.rope.scaling.attn_factor %g is not usable",
                             L->path, L->arch, (double)attn_factor);
    m->ap.rope_n_ctx_orig = (int32_t)(n_ctx_orig > (1u << 30) ? (1u << 30) : n_ctx_orig);
    m->ap.rope_attn_factor = attn_factor;
    return FORGE_OK;
}

/* Phi-3's tensors: the common globals (Phi-4-mini ties the output to the embedding), LongRoPE's
 * factors, and per layer attn_norm, the fused attn_qkv [E -> QD + 2 KD] (or attn_q/k/v; biases
 * where present), attn_output, ffn_norm, the fused ffn_up [E -> 2F] (gate rows first) and
 * ffn_down. */
int arch_phi3_load(loader *L, forge_err *err)
{
    forge_model *m = L->m;
    const forge_model_info *hp = &m->info;
    const int64_t E = hp->n_embd, F = hp->n_ff, HD = hp->head_dim;
    const int64_t QD = (int64_t)hp->n_head * HD, KD = (int64_t)hp->n_head_kv * HD;
    int rc;
    if (m->ap.n_expert > 0)
        return forge_err_set(err, FORGE_E_UNSUPPORTED,
                             "%s: a phi3 model with experts (%s.expert_count = %d) is not supported",
                             L->path, L->arch, m->ap.n_expert);
    if ((rc = ld_globals(L, err)) || (rc = load_longrope(L, err)) || (rc = load_window(L, err)))
        return rc;
    m->layers = calloc((size_t)hp->n_layer, sizeof *m->layers);
    if (!m->layers) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    for (int il = 0; il < hp->n_layer; il++) {
        layer_weights *l = &m->layers[il];
        if ((rc = ld_bind_layer(L, il, &l->attn_norm, "attn_norm.weight", W_VECTOR, E, 1, true,
                                err)) ||
            (rc = ld_bind_qkv(L, il, l, E, QD, KD, err)) ||
            (rc = ld_bind_layer(L, il, &l->wo, "attn_output.weight", W_MATRIX, QD, E, true, err)) ||
            (rc = ld_bind_layer(L, il, &l->ffn_norm, "ffn_norm.weight", W_VECTOR, E, 1, true,
                                err)) ||
            (rc = ld_bind_gate_up(L, il, l, E, F, err)) ||
            (rc = ld_bind_layer(L, il, &l->ffn_down, "ffn_down.weight", W_MATRIX, F, E, true, err)))
            return rc;
    }
    return FORGE_OK;
}
