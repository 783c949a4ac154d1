/* loader.h - what the loader (model.c) lends the architectures' load functions (arch_*.c):
 * hyperparameter keys with llama.cpp's defaults, and tensor binding with shape and type checks
 * (errors name the file and the key or tensor). Internal. */
#ifndef FORGE_MODEL_LOADER_H
#define FORGE_MODEL_LOADER_H

#include "model/model.h"

typedef struct loader {
    forge_model *m;
    const char *path;
    const char *arch; /* the GGUF key prefix (general.architecture) */
    uint64_t bytes_by_type[GGML_TYPE_COUNT];
    uint64_t expert_bytes; /* bytes of the ffn_*_exps tensors (bytes_per_token counts n_used of
                              n_expert of them) */
} loader;

/* "<arch>.<suffix>": a u32 (or an array of equal per-layer u32s). Absent: *out = def when
 * !required, else FORGE_E_NOTFOUND naming the key. */
int ld_u32(loader *L, const char *suffix, bool required, uint32_t def, uint32_t *out,
           forge_err *err);
/* "<arch>.<suffix>": a finite f32; absent: def. */
int ld_f32(loader *L, const char *suffix, float def, float *out, forge_err *err);
/* "<arch>.<suffix>": a bool; absent: def. */
int ld_bool(loader *L, const char *suffix, bool def, bool *out, forge_err *err);
/* "<arch>.<suffix>": a per-layer array of n u32 or bool values (or one u32 for all layers),
 * written to out[0..n). Returns FORGE_E_NOTFOUND silently (no message) when absent. */
int ld_layer_u32s(loader *L, const char *suffix, int32_t *out, int n, forge_err *err);

typedef enum wkind { W_MATRIX, W_VECTOR } wkind;

/* Bind tensor `name` into *w, checking its shape [ne0, ne1] (ne1 = 1 for vectors) and type
 * (vectors F32; matrices any type the CPU multiplies). Absent and !required: w->data = NULL. */
int ld_bind(loader *L, be_weight *w, const char *name, wkind kind, int64_t ne0, int64_t ne1,
            bool required, forge_err *err);
/* The same for "blk.<il>.<what>". */
int ld_bind_layer(loader *L, int il, be_weight *w, const char *what, wkind kind, int64_t ne0,
                  int64_t ne1, bool required, forge_err *err);
/* A 3-D expert tensor "blk.<il>.<what>" of shape [ne0, ne1, n_expert] bound as one matrix of
 * ne1 * n_expert rows: expert e is rows e*ne1 .. (e+1)*ne1-1. */
int ld_bind_experts(loader *L, int il, be_weight *w, const char *what, int64_t ne0, int64_t ne1,
                    int64_t n_expert, bool required, forge_err *err);
/* *out = rows r0 .. r0+n-1 of the bound matrix (or elements of the vector) w: a view for fused
 * tensors (Phi-3's attn_qkv, ffn_up holding gate and up). Counts nothing twice. */
int ld_view_rows(loader *L, be_weight *out, const be_weight *w, int64_t r0, int64_t n,
                 forge_err *err);

/* Layer il's attention input projections: the fused "attn_qkv.weight" [E -> QD + 2 KD] (and
 * its optional "attn_qkv.bias") bound as row views into wq/wk/wv (bq/bk/bv), or, without it, the
 * separate attn_q/k/v (required) with their optional biases. The error names both forms when a
 * file has neither. */
int ld_bind_qkv(loader *L, int il, layer_weights *l, int64_t E, int64_t QD, int64_t KD,
                forge_err *err);
/* Layer il's fused "ffn_up.weight" [E -> 2F]: the gate rows first, then the up rows (llama.cpp's
 * LLM_FFN_SWIGLU split), bound as views into ffn_gate and ffn_up. */
int ld_bind_gate_up(loader *L, int il, layer_weights *l, int64_t E, int64_t F, forge_err *err);

/* The llama family's tensors (arch_llama.c): token_embd, output_norm, output (absent: tied),
 * rope_freqs, and per layer attn_norm, attn_q/k/v (+ biases when present), attn_output,
 * attn_q_norm/attn_k_norm, ffn_norm, ffn_gate/up/down (or the experts when n_expert > 0). Used
 * by the families that share these names. */
int ld_globals(loader *L, forge_err *err);

#endif /* FORGE_MODEL_LOADER_H */
