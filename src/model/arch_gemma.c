/* arch_gemma.c - Gemma 2 and Gemma 3 (GGUF gemma2, gemma3): hyperparameters, tensors and the
 * forward pass, written against the backend interface (src/backend/backend.h) like
 * arch_llama.c, with llama.cpp's numerics (its gemma2 graph, and the newer gemma3 one).
 *
 *   x = embed(ids) * sqrt(n_embd)                    (the scale in float, as ggml_scale)
 *   per layer:  h = rmsnorm(x) * attn_norm
 *               q, k, v = Wq h, Wk h, Wv h
 *               gemma3: q, k = per-head rmsnorm(q) * q_norm, rmsnorm(k) * k_norm
 *               q, k = rope_neox(q), rope_neox(k)  (local layers: their own base and scale)
 *               q = q * attn_scale                   (before the dot products, like llama.cpp)
 *               s = q.k; gemma2: s = cap tanh(s / cap); softmax over the causal positions,
 *                   on a local (sliding-window) layer only the last `window` of them
 *               x += rmsnorm(Wo attention) * post_attention_norm
 *               h = rmsnorm(x) * ffn_norm
 *               x += rmsnorm(Wdown (gelu_tanh(Wgate h) * Wup h)) * post_ffw_norm
 *   logits = Woutput (rmsnorm(x) * output_norm)       (tied: Woutput = token_embd)
 *   gemma2 (and gemma3 with the key): logits = cap tanh(logits / cap)
 *
 * The norm weights are plain RMSNorm weights: Hugging Face's Gemma norms multiply by
 * (1 + weight), and llama.cpp's converter (convert_hf_to_gguf.py, GemmaModel / Gemma2Model /
 * Gemma3Model.modify_tensors: every tensor whose name ends in "norm.weight", the q/k norms of
 * Gemma 3 included) writes weight + 1 into the GGUF. So nothing is added here.
 *
 * The hyperparameters as llama.cpp decides them (src/llama-model.cpp, load_hparams):
 * - attention scale 1/sqrt(head_dim), except the 27B models (gemma2 with 46 layers, gemma3 with
 *   62), whose scale is 1/sqrt(n_embd / n_head) (gemma_pytorch's query_pre_attn_scalar). The
 *   attention.scale key is not read for Gemma (llama.cpp does not either).
 * - gemma2: attention.sliding_window (default 4096), attn_logit_softcapping (default 50),
 *   final_logit_softcapping (default 30); local (windowed) layers are the even ones 0, 2, ...
 * - gemma3: attention.sliding_window (absent or 0: no local layers at all, as the newest
 *   llama.cpp); five local layers then one global one (il % 6 < 5 is local); the local layers
 *   use RoPE base 10000 and no scaling, the global ones the file's rope.freq_base and its
 *   rope.scaling factor (linear; Gemma 3 4B..27B ship factor 8 for the global layers only); no
 *   attention soft-capping; final_logit_softcapping only when the key is there.
 * - a file with attention.sliding_window_pattern (an array of per-layer flags, or a period n as
 *   llama.cpp's set_swa_pattern(n): layer il is local when il % n < n - 1) overrides the
 *   family's pattern.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "core/util.h"
#include "model/blocks.h"
#include "model/loader.h"

int arch_gemma_forward(fwd_state *fs, const int32_t *ids, const be_batch *bt, forge_err *err)
{
    const forge_model *m = fs->model;
    const forge_model_info *hp = &m->info;
    const arch_params *ap = &m->ap;
    backend *be = fs->be;
    const be_ops *op = be->ops;
    ctx_bufs *b = &fs->b;
    const int n = bt->n_tok;
    const int64_t E = hp->n_embd;
    const be_rope rope_global = blk_rope(m, NULL, 0.0f);
    be_rope rope_local = rope_global;
    if (ap->rope_base_swa > 0.0f) rope_local.freq_base = ap->rope_base_swa;
    if (ap->rope_scale_swa > 0.0f) rope_local.freq_scale = ap->rope_scale_swa;
    int rc = FORGE_OK;

    if (!op->geglu || !op->scale || !op->softcap)
        return forge_err_set(err, FORGE_E_UNSUPPORTED,
                             "the %s backend has no geglu/scale/softcap ops for %s models",
                             op->name, hp->arch);
    if (op->batch_set) TRY(op->batch_set(be, bt, err));
    TRY(op->get_rows(be, b->x, &m->tok_embd, ids, n, err));
    TRY(op->scale(be, b->x, ap->embd_scale, (int64_t)n * E, err));
    for (int il = 0; il < hp->n_layer; il++) {
        const layer_weights *l = &m->layers[il];
        const bool local = ap->layer_swa && ap->layer_swa[il];
        TRY(blk_check_abort(fs, err));
        /* attention: q scaled between RoPE and the dot products (as llama.cpp), soft-capped
         * scores, the window on local layers; the output normed before the residual add */
        be_attn attn = blk_attn(m, il, bt);
        attn.scale = 1.0f; /* q is scaled already */
        attn.softcap = ap->attn_softcap;
        attn.window = local ? ap->swa_window : 0;
        TRY(blk_attention(fs, l, &attn, local ? &rope_local : &rope_global, ap->attn_scale, err));
        TRY(blk_residual(be, b->x, &l->wo, NULL, b->att, b->o, &l->attn_post_norm, hp->rms_eps, n,
                         E, err));
        /* feed-forward (GELU-tanh gated), normed before and after */
        TRY(blk_ffn(fs, l, BE_ACT_GELU_TANH, n, err));
    }
    /* output head, for the rows that want logits only; final soft-capping */
    TRY(blk_output(fs, bt, ap->final_softcap, err));
done:
    return rc;
}

/* The attention scale as llama.cpp sets f_attention_scale: 1/sqrt(head_dim), but for the 27B
 * models 1/sqrt(n_embd / n_head) (integer division, as there). */
static float gemma_attn_scale(model_arch arch, const forge_model_info *hp)
{
    const bool is_27b =
        (arch == ARCH_GEMMA2 && hp->n_layer == 46) || (arch == ARCH_GEMMA3 && hp->n_layer == 62);
    const int d = is_27b ? hp->n_embd / hp->n_head : hp->head_dim;
    return 1.0f / sqrtf((float)d);
}

/* Which layers are local (sliding window): the file's attention.sliding_window_pattern when it
 * has one (per-layer flags, or a period), else the family's period (gemma2 2, gemma3 6). As
 * llama.cpp's set_swa_pattern(p): layer il is local when p == 0 or il % p < p - 1. */
static int gemma_swa_layers(loader *L, bool *swa, forge_err *err)
{
    forge_model *m = L->m;
    const int n_layer = m->info.n_layer;
    const gguf_ctx *g = m->gguf;
    char key[160];
    snprintf(key, sizeof key, "%s.attention.sliding_window_pattern", L->arch);
    int64_t idx = gguf_find_key(g, key);
    uint32_t period = m->arch == ARCH_GEMMA2 ? 2 : 6;
    if (idx >= 0 && gguf_kv_type(g, idx) == GGUF_TYPE_ARRAY) {
        int32_t *flags = malloc((size_t)n_layer * sizeof *flags);
        if (!flags) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
        int rc = ld_layer_u32s(L, "attention.sliding_window_pattern", flags, n_layer, err);
        for (int il = 0; rc == FORGE_OK && il < n_layer; il++)
            swa[il] = flags[il] != 0;
        free(flags);
        return rc;
    }
    if (idx >= 0) {
        int rc = ld_u32(L, "attention.sliding_window_pattern", true, 0, &period, err);
        if (rc) return rc;
        if (period > (uint32_t)FORGE_MAX_LAYERS)
            return forge_err_set(err, FORGE_E_FORMAT, "%s: key '%s' is %u, not a layer period",
                                 L->path, key, period);
    }
    for (int il = 0; il < n_layer; il++)
        swa[il] = period == 0 || (uint32_t)il % period < period - 1;
    return FORGE_OK;
}

/* A soft-capping key: absent gives def, 0 turns it off, a negative value is an error. */
static int gemma_softcap(loader *L, const char *suffix, float def, float *out, forge_err *err)
{
    int rc = ld_f32(L, suffix, def, out, err);
    if (rc) return rc;
    if (*out < 0.0f)
        return forge_err_set(err, FORGE_E_FORMAT, "%s: key '%s.%s' is %g, not a soft cap >= 0",
                             L->path, L->arch, suffix, (double)*out);
    return FORGE_OK;
}

int arch_gemma_load(loader *L, forge_err *err)
{
    forge_model *m = L->m;
    const forge_model_info *hp = &m->info;
    arch_params *ap = &m->ap;
    const bool gemma3 = m->arch == ARCH_GEMMA3;
    const int64_t E = hp->n_embd, F = hp->n_ff, HD = hp->head_dim;
    const int64_t QD = (int64_t)hp->n_head * HD, KD = (int64_t)hp->n_head_kv * HD;
    uint32_t window;
    int rc;
    if (ap->n_expert > 0)
        return forge_err_set(err, FORGE_E_UNSUPPORTED,
                             "%s: %s.expert_count = %d: Gemma models have no experts", L->path,
                             L->arch, ap->n_expert);
    /* gemma2: a window of 4096 without the key; gemma3: no local layers without it */
    if ((rc = ld_u32(L, "attention.sliding_window", false, gemma3 ? 0 : 4096, &window, err)))
        return rc;
    if (window > (1u << 24))
        return forge_err_set(err, FORGE_E_FORMAT,
                             "%s: %s.attention.sliding_window %u is implausible", L->path, L->arch,
                             window);
    if (gemma3) {
        ap->attn_softcap = 0.0f; /* Gemma 3 has none (llama.cpp does not read the key) */
        if ((rc = gemma_softcap(L, "final_logit_softcapping", 0.0f, &ap->final_softcap, err)))
            return rc;
    } else if ((rc = gemma_softcap(L, "attn_logit_softcapping", 50.0f, &ap->attn_softcap, err)) ||
               (rc = gemma_softcap(L, "final_logit_softcapping", 30.0f, &ap->final_softcap, err))) {
        return rc;
    }
    ap->attn_scale = gemma_attn_scale(m->arch, hp);
    ap->embd_scale = sqrtf((float)E); /* llama.cpp: sqrtf(n_embd), in float */
    ap->act = BE_ACT_GELU_TANH;
    if (window > 0) {
        ap->swa_window = (int32_t)window;
        ap->layer_swa = calloc((size_t)hp->n_layer, sizeof *ap->layer_swa);
        if (!ap->layer_swa) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
        if ((rc = gemma_swa_layers(L, ap->layer_swa, err))) return rc;
        if (gemma3) {
            /* llama.cpp: rope_freq_base_train_swa, 10000 unless the file says (newer
             * converters write rope.freq_base_swa from HF's rope_local_base_freq) */
            if ((rc = ld_f32(L, "rope.freq_base_swa", 10000.0f, &ap->rope_base_swa, err)))
                return rc;
            if (!(ap->rope_base_swa > 0.0f))
                return forge_err_set(err, FORGE_E_FORMAT,
                                     "%s: %s.rope.freq_base_swa %g is not a RoPE base", L->path,
                                     L->arch, (double)ap->rope_base_swa);
            ap->rope_scale_swa = 1.0f;    /* the scaling factor is for the global layers */
        }
    }

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
            (rc = ld_bind_layer(L, il, &l->q_norm, "attn_q_norm.weight", W_VECTOR, HD, 1, gemma3,
                                err)) ||
            (rc = ld_bind_layer(L, il, &l->k_norm, "attn_k_norm.weight", W_VECTOR, HD, 1, gemma3,
                                err)) ||
            (rc = ld_bind_layer(L, il, &l->wo, "attn_output.weight", W_MATRIX, QD, E, true, err)) ||
            (rc = ld_bind_layer(L, il, &l->attn_post_norm, "post_attention_norm.weight", W_VECTOR,
                                E, 1, true, err)) ||
            (rc = ld_bind_layer(L, il, &l->ffn_norm, "ffn_norm.weight", W_VECTOR, E, 1, true,
                                err)) ||
            (rc = ld_bind_layer(L, il, &l->ffn_gate, "ffn_gate.weight", W_MATRIX, E, F, true,
                                err)) ||
            (rc = ld_bind_layer(L, il, &l->ffn_up, "ffn_up.weight", W_MATRIX, E, F, true, err)) ||
            (rc = ld_bind_layer(L, il, &l->ffn_down, "ffn_down.weight", W_MATRIX, F, E, true,
                                err)) ||
            (rc = ld_bind_layer(L, il, &l->ffn_post_norm, "post_ffw_norm.weight", W_VECTOR, E, 1,
                                true, err)))
            return rc;
    }
    return FORGE_OK;
}
