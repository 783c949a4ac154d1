/* model.h - internal model and context structures shared by the loader (model.c), the context
 * (context.c) and the architectures' forward passes (arch_llama.c). Not public: the API is
 * include/forge_model.h. */
#ifndef FORGE_MODEL_INTERNAL_H
#define FORGE_MODEL_INTERNAL_H

#include <signal.h>

#include "forge.h"
#include "backend/backend.h"
#include "backend/backend_tp.h"

#define FORGE_MAX_LAYERS 512

/* The architectures (general.architecture); their table is src/model/arch.c. */
typedef enum model_arch {
    ARCH_LLAMA = 0, /* also Mistral, Mixtral (experts) */
    ARCH_QWEN2,
    ARCH_QWEN3,
    ARCH_QWEN3MOE,
    ARCH_GEMMA2,
    ARCH_GEMMA3,
    ARCH_PHI3,
    ARCH_CHATGLM,
    ARCH_GLM4,
    ARCH_COUNT
} model_arch;

/* One layer's weights; absent ones have data NULL. A struct of be_weight only (model_weights
 * walks it as an array). Fused tensors of a file (Phi-3's attn_qkv, ffn_up holding gate and up)
 * are bound as row views into the fields they stand for (ld_view_rows). */
typedef struct layer_weights {
    be_weight attn_norm, wq, wk, wv, wo;
    be_weight bq, bk, bv, bo; /* optional biases (qwen2: q/k/v) */
    be_weight q_norm, k_norm; /* per-head norms (qwen3, gemma3) */
    be_weight attn_post_norm; /* norm of the attention output before the residual add (gemma2/3,
                                 glm4: post_attention_norm) */
    be_weight ffn_norm, ffn_gate, ffn_up, ffn_down;
    be_weight ffn_post_norm; /* norm of the FFN output before the residual add (post_ffw_norm) */
    /* mixture of experts: router [n_embd -> n_expert], experts as matrices of n_expert blocks of
     * rows (ld_bind_experts), optional shared expert and its sigmoid gate [n_embd -> 1] */
    be_weight ffn_gate_inp, ffn_gate_exps, ffn_up_exps, ffn_down_exps;
    be_weight ffn_gate_inp_shexp, ffn_gate_shexp, ffn_up_shexp, ffn_down_shexp;
} layer_weights;

/* What an architecture adds to the common hyperparameters (forge_model_info); zero = off. */
typedef struct arch_params {
    float attn_scale;    /* multiplier of q.k; 0: 1/sqrt(head_dim) */
    float attn_softcap;  /* scores = c tanh(scores / c) before the softmax (gemma2); 0: off */
    float final_softcap; /* logits = c tanh(logits / c) (gemma2); 0: off */
    float embd_scale;    /* embedding rows times this (gemma: sqrt(n_embd)); 0: 1 */
    int32_t swa_window;  /* attention window of the layers with layer_swa[il] (a row at position
                            p sees p - window + 1 .. p); 0: none */
    bool *layer_swa;     /* [n_layer] or NULL: which layers use the window */
    float rope_base_swa, rope_scale_swa; /* RoPE of the windowed layers; 0: the global ones */
    int act;                             /* be_act of the FFN gate (SiLU, GELU-tanh) */
    int32_t n_expert, n_expert_used, n_ff_exp, n_ff_shexp;
    bool expert_norm;       /* renormalise the selected experts' weights to sum 1 */
    float rope_attn_factor; /* cos/sin scale (LongRoPE); 0: 1 */
    int32_t rope_n_ctx_orig; /* LongRoPE: the original training context; a forward state whose
                                sequences may run longer uses rope_long, else rope_short */
} arch_params;

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
    be_weight rope_long, rope_short; /* LongRoPE factors (phi3: rope_factors_long/short) */
    arch_params ap;
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

/* How the model's weights split over n_rank tensor-parallel ranks (src/model/tp.c): Q/K/V and
 * gate/up by output rows (whole heads, FFN columns in whole blocks of ffn_down's type), attention
 * output and FFN down by input columns, the vocabulary projection by rows with a gather, the rest
 * replicated. FORGE_E_INVALID when the head counts do not divide by n_rank, FORGE_E_UNSUPPORTED
 * when a split would cut a block of a weight's type; the message names the option, the tensor
 * and the numbers. Needs the slots (a loaded model). out is freed with tp_plan_free. */
int model_tp_plan(forge_model *m, int n_rank, tp_plan *out, forge_err *err);

/* Activation buffers of one forward state, sized for n_batch rows. */
typedef struct ctx_bufs {
    be_buf *x, *xn, *q, *k, *v, *att, *o, *gate, *up, *last, *logits;
    be_buf *router; /* [n_batch][n_expert] router logits (mixture of experts), else NULL */
    int64_t logits_rows; /* rows the logits buffer holds */
} ctx_bufs;

/* What a forward pass runs on: one backend, its K/V storage (kv_rows cache rows, read as
 * [layer][block][offset][kv_dim] by a paged batch), activation buffers for n_batch rows and a
 * logits buffer. One owner: a context (one sequence, contiguous rows) or an engine (a block pool
 * over the rows). */
typedef struct fwd_state {
    forge_model *model;
    backend *be;
    be_kv *kv;
    ctx_bufs b;
    int32_t kv_rows, n_batch, n_threads;
    forge_kv_type kv_type;
    int32_t n_ctx_seq; /* most positions one sequence may reach (LongRoPE's choice): kv_rows,
                          or an engine's context per request */
    const volatile sig_atomic_t *abort_flag;
    char warning[640]; /* what creation had to give up (forge_context_warning), or "" */
} fwd_state;

typedef struct fwd_params {
    forge_device device;
    int32_t gpu_index, n_threads; /* n_threads >= 1 */
    bool f32_math;
    forge_kv_type kv_type;
    int32_t kv_rows; /* cache rows (tokens) */
    int32_t n_batch; /* most rows of one forward pass */
    int32_t n_seq_max; /* most sequences of one pass (GPU plan: tables, logit rows) */
    int32_t n_tp;      /* tensor-parallel ranks (backend_tp.h); 0: none (1: one rank) */
    void (*progress)(uint64_t done, uint64_t total, void *user);
    void *progress_user;
} fwd_params;

/* Choose and create the backend (the one place the device is decided: CPU, GPU, or AUTO = the
 * GPU when it can be created and the model fits, else the CPU), acquire the model's weights on
 * it, create the cache and the buffers. On failure fs holds nothing. */
int fwd_state_init(fwd_state *fs, forge_model *m, const fwd_params *p, forge_err *err);
/* Release everything fs holds (in the backend's stream order); fs may be partly initialised or
 * zeroed. */
void fwd_state_release(fwd_state *fs);
/* Make room for rows logit rows in fs->b.logits. */
int fwd_reserve_logits(fwd_state *fs, int64_t rows, forge_err *err);

/* One forward pass of the batch bt over ids[0..bt->n_tok) (bt->n_tok <= fs->n_batch): K/V of
 * every row stored at its slot, logits of bt->out_rows written to fs->b.logits rows
 * 0..bt->n_out-1 (reserve them first). Through the model's architecture table. */
int model_forward(fwd_state *fs, const int32_t *ids, const be_batch *bt, forge_err *err);
/* The forward pass of a step the backend records, after its step_begin or batch_step_begin
 * said it did not replay: model_forward, then the backend's step_end; a step whose recording
 * broke (step_end asks for it again) runs once more, unrecorded. */
int model_forward_step(fwd_state *fs, const int32_t *ids, const be_batch *bt, forge_err *err);

struct loader;

/* One architecture (the table is src/model/arch.c): its GGUF name, RoPE layout, the function
 * that reads its own hyperparameters and binds its tensors (after the common hyperparameters
 * and the tokenizer; src/model/loader.h), and its forward pass written once against the
 * backend interface. gpu: the GPU backend has every op the forward needs (else a GPU context is
 * refused and auto picks the CPU). */
typedef struct arch_desc {
    model_arch arch;
    const char *name;
    be_rope_mode rope_mode;
    int (*load)(struct loader *L, forge_err *err);
    int (*forward)(fwd_state *fs, const int32_t *ids, const be_batch *bt, forge_err *err);
    bool gpu;
} arch_desc;
const arch_desc *arch_find(model_arch arch);
/* by GGUF name (len bytes, not terminated); NULL if unknown */
const arch_desc *arch_find_name(const char *name, size_t len);
/* "llama, qwen2, ..." (for error messages) written to buf; returns buf */
const char *arch_names_list(char *buf, size_t n);

/* The llama family (llama, mistral, mixtral, qwen2, qwen3, qwen3moe): arch_llama.c */
int arch_llama_load(struct loader *L, forge_err *err);
int arch_llama_forward(fwd_state *fs, const int32_t *ids, const be_batch *bt, forge_err *err);
/* Gemma 2 and 3: arch_gemma.c */
int arch_gemma_load(struct loader *L, forge_err *err);
int arch_gemma_forward(fwd_state *fs, const int32_t *ids, const be_batch *bt, forge_err *err);
/* Phi-3 / Phi-3.5 / Phi-4-mini: arch_phi3.c */
int arch_phi3_load(struct loader *L, forge_err *err);
int arch_phi3_forward(fwd_state *fs, const int32_t *ids, const be_batch *bt, forge_err *err);
/* ChatGLM and GLM-4: arch_glm.c */
int arch_glm_load(struct loader *L, forge_err *err);
int arch_glm_forward(fwd_state *fs, const int32_t *ids, const be_batch *bt, forge_err *err);

struct forge_context {
    fwd_state fs;
    forge_model *model;
    int32_t n_ctx;
    int32_t pos;
    float *logits;      /* host copy: n_logits x n_vocab */
    int64_t logits_cap; /* rows allocated */
    int32_t n_logits;
};

#endif /* FORGE_MODEL_INTERNAL_H */
