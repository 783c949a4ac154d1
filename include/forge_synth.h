/* forge_synth.h - random-weight llama-family models of real shapes (`forge synth`), for benchmarks and
 * tests. Weights are ~N(0, 0.02) (a cheap, exactly reproducible approximation), norm weights
 * ~1 + N(0, 0.02), never exactly zero. The file is written through the streaming GGUF writer, one
 * row at a time, so a multi-GB model needs only a few MB of memory.
 * Part of the public API (used by `forge synth`). */
#ifndef FORGE_SYNTH_H
#define FORGE_SYNTH_H

#include <stdbool.h>
#include <stdint.h>

#include "forge.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct synth_shape {
    const char *name;  /* "tinyllama-1.1b", ... */
    const char *arch;  /* GGUF general.architecture: llama, qwen2, qwen3 */
    int64_t dim, ffn, n_layers, n_heads, n_kv_heads;
    int64_t head_dim;  /* 0: dim / n_heads */
    int64_t n_vocab;   /* 0: the vocab file's size, or 512 without one */
    uint32_t n_ctx;
    float rope_base, rms_eps;
    bool tied;         /* no output.weight: the output projection is token_embd */
    bool qkv_bias;     /* qwen2: attn_q/k/v.bias */
    bool qk_norm;      /* qwen3: attn_q_norm/attn_k_norm */
    /* the other families (issue 15); all zero for the llama family */
    struct synth_family {
        float std;               /* weight and bias std; 0: 0.02 (norms: 1 + std N(0,1)) */
        int64_t n_rot;           /* rope.dimension_count; 0: head_dim */
        int64_t n_expert, n_expert_used, ffn_exp; /* experts: ffn_gate_inp + ffn_*_exps */
        uint32_t sliding_window; /* attention.sliding_window; 0: none */
        float attn_softcap, final_softcap; /* gemma2's attn_logit_/final_logit_softcapping */
        bool post_norms; /* post_attention_norm, post_ffw_norm (gemma2/3, glm4) */
        bool fused_qkv;  /* attn_qkv (+ attn_qkv.bias with qkv_bias) instead of attn_q/k/v */
        bool fused_up;   /* ffn_up holds gate and up ([dim, 2 ffn]), no ffn_gate */
    } fam;
} synth_shape;

/* The table of shapes, for --help and lookups. */
int synth_shape_count(void);
const synth_shape *synth_shape_at(int i);
const synth_shape *synth_shape_find(const char *name); /* NULL if unknown */

typedef struct synth_opts {
    const char *shape;      /* a name from the table */
    int type;               /* ggml type of the 2-D weights: F32, F16, BF16, Q8_0, Q4_0 */
    const char *out_path;
    const char *vocab_from; /* GGUF whose tokenizer.* keys are copied; NULL: built-in byte vocab */
    uint64_t seed;
} synth_opts;

typedef struct synth_result {
    int64_t n_tensors, n_params, n_vocab;
    int64_t n_fallback;     /* 2-D tensors written as F16 because rows are no multiple of 32 */
} synth_result;

/* Write the model. result may be NULL. */
int synth_write(const synth_opts *o, synth_result *result, forge_err *err);

#ifdef __cplusplus
}
#endif

#endif /* FORGE_SYNTH_H */
