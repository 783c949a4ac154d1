/* blocks.h - pieces of a forward pass shared by the architectures (arch_*.c): written against
 * the backend interface, using a backend's fused ops where it has them. Internal. */
#ifndef FORGE_MODEL_BLOCKS_H
#define FORGE_MODEL_BLOCKS_H

#include "core/util.h"
#include "model/model.h"

/* rc = expr; on failure jump to the function's `done` label */
#define TRY(expr)                                                                                  \
    do {                                                                                           \
        rc = (expr);                                                                               \
        if (rc) goto done;                                                                         \
    } while (0)

/* ys[i] = ws[i] x for n weights that share the input x (one op where the backend has
 * matmul_multi). */
int blk_matmul_shared(backend *be, int n, be_buf *const *ys, const be_weight *const *ws,
                      const be_buf *x, int n_tok, forge_err *err);
/* ys[i] = ws[i] (rms_norm(x) * norm) (+ bs[i]); with swiglu ys[0] = silu(y0) * y1. hn receives
 * the normed x (when the backend has no norm_matmul). */
int blk_norm_matmul(backend *be, int n, be_buf *const *ys, const be_weight *const *ws,
                    const be_weight *const *bs, const be_buf *x, const be_weight *norm, float eps,
                    bool swiglu, be_buf *hn, int n_tok, forge_err *err);
/* x += w h (+ bias); tmp holds w h when needed. */
int blk_matmul_residual(backend *be, be_buf *x, const be_weight *w, const be_weight *bias,
                        const be_buf *h, be_buf *tmp, int n_tok, int64_t dim, forge_err *err);
/* dst rows 0..n_out-1 = x rows bt->out_rows[] (runs of rows copied at once). */
int blk_gather_out_rows(backend *be, be_buf *dst, const be_buf *x, const be_batch *bt, int64_t E,
                        forge_err *err);

/* The model's RoPE: factors (NULL: rope_freqs when the file has it), attn_factor (0: 1). */
be_rope blk_rope(const forge_model *m, const be_weight *factors, float attn_factor);
/* Layer il's attention as most families run it: the model's heads, scale 1/sqrt(head_dim), no
 * soft-cap, no window (a family changes the fields it needs). */
be_attn blk_attn(const forge_model *m, int il, const be_batch *bt);
/* FORGE_E_INTERRUPTED when the state's abort flag is set (checked between layers). */
int blk_check_abort(const fwd_state *fs, forge_err *err);
/* The attention block of layer l into fs->b.att: q, k, v = W (rms_norm(x) * attn_norm) (+ the
 * layer's biases), per-head q/k norms where the layer has them, RoPE, then attention a (its
 * softcap and window). q_scale != 0: q is multiplied by it after RoPE (a->scale then usually 1:
 * Gemma scales q as llama.cpp does); that runs the plain ops, else the backend's fused
 * attention_rope where it has one. */
int blk_attention(fwd_state *fs, const layer_weights *l, const be_attn *a, const be_rope *rope,
                  float q_scale, forge_err *err);
/* x += y, y = w h (+ bias), normed (rms_norm(y) * post_norm) first when post_norm is not NULL
 * (Gemma's and GLM-4's post norms); tmp holds y. */
int blk_residual(backend *be, be_buf *x, const be_weight *w, const be_weight *bias, const be_buf *h,
                 be_buf *tmp, const be_weight *post_norm, float eps, int n_tok, int64_t dim,
                 forge_err *err);
/* The gated FFN of layer l: x += ffn_down(act(gate h) * up h) (post-normed when the layer has
 * ffn_post_norm), h = rms_norm(x) * ffn_norm; act a be_act (SiLU, GELU-tanh). */
int blk_ffn(fwd_state *fs, const layer_weights *l, int act, int n_tok, forge_err *err);
/* The output head for bt's logit rows: gather them, final norm, the output matrix (tied: the
 * embedding), then final soft-capping when final_softcap > 0. Nothing when bt->n_out is 0. */
int blk_output(fwd_state *fs, const be_batch *bt, float final_softcap, forge_err *err);

#endif /* FORGE_MODEL_BLOCKS_H */
