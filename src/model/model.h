/* model.h - internal model and context structures shared by the loader (model.c), the context
 * (context.c) and the architectures' forward passes (arch_llama.c). Not public: the API is
 * include/forge_model.h. */
#ifndef FORGE_MODEL_INTERNAL_H
#define FORGE_MODEL_INTERNAL_H

#include <signal.h>

#include "forge.h"
#include "backend/backend.h"

#define FORGE_MAX_LAYERS 512

typedef enum model_arch { ARCH_LLAMA = 0, ARCH_QWEN2 = 1, ARCH_QWEN3 = 2 } model_arch;

typedef struct layer_weights {
    be_weight attn_norm, wq, wk, wv, wo;
    be_weight bq, bk, bv, bo; /* optional biases (qwen2: q/k/v); data NULL if absent */
    be_weight q_norm, k_norm; /* qwen3 per-head norms; data NULL if absent */
    be_weight ffn_norm, ffn_gate, ffn_up, ffn_down;
} layer_weights;

struct forge_model {
    gguf_ctx *gguf;
    forge_tok *tok;
    model_arch arch;
    forge_model_info info;
    char name[128];
    char type_summary[96];
    int32_t n_embd_k_gqa; /* n_head_kv * head_dim */
    be_rope_mode rope_mode;
    float rope_ext_factor; /* YaRN: 1 when rope.scaling.type is yarn, else 0 */
    float rope_corr_dims[2];
    be_weight tok_embd, output_norm, output, rope_freqs; /* rope_freqs.data NULL if absent */
    layer_weights *layers;                               /* n_layer */
    int32_t n_weights; /* entries of model_weights: the slots 0..n_weights-1 */
    /* Device copies of the weights, shared by the contexts on this model (backend.h). Owned by
     * the model; its entries are owned by the contexts that hold them, and all of them are
     * gone before forge_model_free (contexts borrow the model). */
    be_wshare wshare;
    bool wshare_init; /* wshare.lock was initialised */
};

/* Every weight a backend prepares, in slot order (out[i]->slot == i): the present global
 * weights (a tied output is tok_embd, listed once), then each layer's present weights. Writes at
 * most cap pointers (out may be NULL with cap 0) and returns the count (m->n_weights). Pointers
 * into the model, borrowed. */
int model_weights(forge_model *m, be_weight **out, int cap);

/* Activation buffers of one context, sized for n_batch tokens. */
typedef struct ctx_bufs {
    be_buf *x, *xn, *q, *k, *v, *att, *o, *gate, *up, *last, *logits;
    int64_t logits_rows; /* rows the logits buffer holds */
} ctx_bufs;

struct forge_context {
    forge_model *model;
    backend *be;
    be_kv *kv;
    ctx_bufs b;
    int32_t n_ctx, n_batch, n_threads;
    forge_kv_type kv_type;
    int32_t pos;
    float *logits;      /* host copy: n_logits x n_vocab */
    int64_t logits_cap; /* rows allocated */
    int32_t n_logits;
    const volatile sig_atomic_t *abort_flag;
    char warning[640]; /* forge_context_warning, or "" */
};

/* Forward pass of one batch of n tokens at positions ctx->pos.., for llama/qwen2/qwen3.
 * With want_logits, writes the logits of the last token (or of all n with all_logits) to
 * ctx->b.logits rows 0.. and returns the number of logit rows in *n_out (0 without).
 * Does not move ctx->pos. */
int arch_llama_forward(forge_context *ctx, const int32_t *ids, int n, bool want_logits,
                       bool all_logits, int *n_out, forge_err *err);

#endif /* FORGE_MODEL_INTERNAL_H */
