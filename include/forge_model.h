/* forge_model.h - models, inference contexts (KV cache), decoding, logits and sampling.
 *
 * Typical use (error handling left out):
 *
 *   forge_model *m;   forge_model_load("model.gguf", &m, &err);
 *   forge_context_params cp = forge_context_default_params();
 *   forge_context *ctx; forge_context_create(m, &cp, &ctx, &err);
 *   int32_t *ids; size_t n;
 *   forge_tok_encode(forge_model_tok(m), text, len, true, false, &ids, &n, &err);
 *   forge_decode(ctx, ids, n, false, &err);            // prompt at positions 0..n-1
 *   forge_sampler *s; forge_sampler_create(&sp, forge_model_info_get(m)->n_vocab, &s, &err);
 *   for (;;) {
 *       int32_t id = forge_sampler_sample(s, forge_get_logits(ctx, -1));
 *       forge_sampler_accept(s, id);
 *       if (forge_tok_is_eog(forge_model_tok(m), id)) break;
 *       forge_decode(ctx, &id, 1, false, &err);        // next position
 *   }
 *
 * A chat front end keeps the context between turns: every forge_decode appends at the current
 * position (forge_context_pos), and forge_kv_truncate(ctx, p) forgets everything from position p
 * on (p = 0 starts over), e.g. to regenerate an answer or to /reset.
 *
 * Ownership: forge_model owns the mapped GGUF file, the weights (views into the mapping, never
 * copies) and the tokenizer; a context borrows its model, which must outlive it. A model may be
 * shared by several contexts, on any devices, created, used and freed in any order and from
 * several threads; one context belongs to one thread at a time. GPU contexts on one model and
 * one GPU share a single device copy of the weights, owned jointly by them (reference counted):
 * the first one uploads it, the last one freed frees it, so freeing a context never takes
 * weights from another still running; a context on another GPU gets its own copy.
 * Errors follow forge.h: int status, message in the caller's forge_err.
 */
#ifndef FORGE_MODEL_H
#define FORGE_MODEL_H

#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

#ifdef __cplusplus
extern "C" {
#endif

struct forge_err;
struct forge_tok;
struct gguf_ctx;

typedef struct forge_model forge_model;
typedef struct forge_context forge_context;
typedef struct forge_sampler forge_sampler;

/* ---- models ----------------------------------------------------------------------------- */

/* Hyperparameters and sizes of a loaded model. Strings are owned by the model. */
typedef struct forge_model_info {
    const char *arch; /* "llama", "qwen2", "qwen3" */
    const char *name; /* general.name, or "" */
    int32_t n_vocab;
    int32_t n_ctx_train; /* <arch>.context_length */
    int32_t n_embd;
    int32_t n_layer;
    int32_t n_head;
    int32_t n_head_kv;
    int32_t head_dim; /* key/value length per head */
    int32_t n_ff;
    int32_t n_rot; /* rotated dimensions per head */
    float rope_freq_base;
    float rope_freq_scale;
    float rms_eps;
    bool tied_output;         /* no output.weight: the token embedding is the classifier */
    uint64_t n_params;        /* elements of all weight tensors */
    uint64_t weight_bytes;    /* bytes of all weight tensors in the file */
    uint64_t bytes_per_token; /* weight bytes one decoded token reads (one embedding row) */
    const char *type_summary; /* e.g. "Q8_0 (+F16, F32)": the weight types, most bytes first */
} forge_model_info;

/* Load a GGUF model (architectures llama, qwen2, qwen3; weight types F32, F16, BF16, Q4_0,
 * Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, IQ4_NL, IQ4_XS, TQ1_0, TQ2_0, mixed per tensor (each
 * tensor's own type; the GPU backend has kernels for F32/F16/BF16/Q8_0/Q4_0 only and refuses the
 * others, naming tensor and type); RoPE scaling none, linear, yarn, and llama3's rope_freqs tensor;
 * absent keys take llama.cpp's defaults, e.g. rope base 10000). Everything is checked before any
 * compute: a missing key or tensor, a shape that contradicts the hyperparameters, an unsupported
 * architecture or weight type is an error naming the file and the tensor/key (FORGE_E_FORMAT,
 * FORGE_E_NOTFOUND, FORGE_E_UNSUPPORTED). *out is owned by the caller (forge_model_free). */
int forge_model_load(const char *path, forge_model **out, struct forge_err *err);
void forge_model_free(forge_model *model);

/* Borrowed views, valid until forge_model_free. */
const forge_model_info *forge_model_info_get(const forge_model *model);
const struct forge_tok *forge_model_tok(const forge_model *model);
/* The model's GGUF file, for other metadata (e.g. tokenizer.chat_template). */
const struct gguf_ctx *forge_model_gguf(const forge_model *model);

/* ---- contexts: a KV cache, activation buffers and a thread pool ------------------------ */

typedef enum forge_kv_type {
    FORGE_KV_F32 = 0,
    FORGE_KV_F16 = 1, /* K and V rounded to fp16 when stored (llama.cpp's default cache) */
    FORGE_KV_Q8_0 = 2 /* K and V as Q8_0 blocks (32 values, an fp16 scale: 8.5 bits a value);
                       * the query is quantized to Q8_0 for the K dot products, as ggml does.
                       * Needs head_dim % 32 == 0. CPU only for now: the GPU refuses it */
} forge_kv_type;

/* Where a context computes. GPU: libforge_cuda.so is dlopened at context creation (looked for
 * next to the executable, then at $FORGE_GPU_LIB, then on the default library path); without a
 * library or a device, forge_context_create fails with FORGE_E_UNSUPPORTED / FORGE_E_DEVICE and
 * a message saying which. AUTO: the GPU when that works, else the CPU, silently (ask
 * forge_context_device which one was taken). CPU is the default (0), so zero-initialised params
 * stay on the CPU. */
/* "f32", "f16", "q8_0" (as --kv-type spells them), or "?" for another value. Static. */
const char *forge_kv_type_name(forge_kv_type t);

typedef enum forge_device {
    FORGE_DEVICE_CPU = 0,
    FORGE_DEVICE_GPU = 1,
    FORGE_DEVICE_AUTO = 2
} forge_device;

typedef struct forge_context_params {
    int32_t n_ctx;     /* KV cache length in tokens; 0: the model's context length */
    int32_t n_batch;   /* most tokens per forward pass (longer inputs are split); 0: 512 */
    int32_t n_threads; /* 0: the number of physical cores */
    forge_kv_type kv_type;
    bool f32_math;       /* CPU: multiply by F32 copies of each weight row (dequantized on the
                          * fly) instead of ggml's mixed-precision kernels. GPU: no reduced
                          * precision: float activations for F16/BF16 weights (not rounded to
                          * the weight type), prompts by fp32 matvec instead of the F16 GEMM
                          * and tensor-core attention (Q8_0/Q4_0 weights keep their Q8_0
                          * activations). Slower; for checking against float32 references */
    forge_device device; /* default FORGE_DEVICE_CPU */
    int32_t gpu_index;   /* which GPU (0-based) for GPU/AUTO */
    /* Tensor parallelism (docs/DISTRIBUTED.md): 0 none; n >= 1 splits the model over n ranks:
     * GPUs gpu_index .. gpu_index + n - 1 (device GPU or AUTO; NCCL), or, with device CPU, n
     * CPU backends of n_threads each that run in turn (for checking the arithmetic: not
     * faster). The head counts must divide by n. 1 runs the same path with one rank (a check
     * of it on one GPU: it needs NCCL too). */
    int32_t n_tp;
    /* Called by forge_context_create while it prepares the weights (on a GPU: the upload),
     * after each tensor, with the bytes done and the total; the last call has done == total.
     * On the creating thread, with the model's weight lock held (a GPU's upload, the CPU's
     * load-time repacking), so the callback must not create or free contexts of the same
     * model. NULL: no calls. */
    void (*progress)(uint64_t done, uint64_t total, void *user);
    void *progress_user;
} forge_context_params;

forge_context_params forge_context_default_params(void);

/* Create a context on a model (borrowed: it must outlive the context). Owned by the caller. */
int forge_context_create(forge_model *model, const forge_context_params *params,
                         forge_context **out, struct forge_err *err);
void forge_context_free(forge_context *ctx);

int32_t forge_context_n_ctx(const forge_context *ctx);
int32_t forge_context_n_threads(const forge_context *ctx);
/* Tokens held in the KV cache = the position the next decoded token gets. */
int32_t forge_context_pos(const forge_context *ctx);
const forge_model *forge_context_model(const forge_context *ctx);
/* The backend the context runs on: "CPU" or "GPU". Static string. */
const char *forge_context_device(const forge_context *ctx);
/* Something the context had to give up when it was created, said once (e.g. on a GPU whose BLAS
 * library could not be initialised: "prompts run without GEMM, slower"), or NULL. Front ends
 * show it as a warning. Owned by ctx. */
const char *forge_context_warning(const forge_context *ctx);

/* Is GPU number gpu_index usable? Loads libforge_cuda.so (as FORGE_DEVICE_GPU does) and looks
 * for the device. FORGE_OK with a description ("NVIDIA H200, 139.8 GiB, CUDA") in desc, or an
 * error saying what is missing (no library, not a Forge GPU library, no driver, no device). */
int forge_gpu_probe(int32_t gpu_index, char *desc, size_t desc_len, struct forge_err *err);

/* While *flag is non-zero, forge_decode stops between layers with FORGE_E_INTERRUPTED (for a
 * SIGINT handler). The flag is borrowed; NULL removes it. */
void forge_context_set_abort_flag(forge_context *ctx, const volatile sig_atomic_t *flag);

/* Run n ids at positions pos..pos+n-1 (pos = forge_context_pos) and append them to the KV
 * cache. all_logits: keep the logits of every one of the n positions; otherwise only the last.
 * Errors: FORGE_E_RANGE when pos+n exceeds the context (nothing is run) or an id is out of the
 * vocabulary; FORGE_E_INTERRUPTED from the abort flag. On any error the position is left
 * where it was before the call. */
int forge_decode(forge_context *ctx, const int32_t *ids, int32_t n, bool all_logits,
                 struct forge_err *err);

/* forge_decode (last position only), then the greedy pick: *next_id = the smallest id with the
 * largest logit of the last position (what forge_sampler_sample returns with temperature <= 0
 * and no penalties, for finite logits; a NaN logit never wins). On a GPU the argmax runs on the
 * device and only the id is copied back, and the decode step may be replayed from a recording.
 * The logits are not kept: forge_get_logits returns NULL until the next forge_decode. *next_id is
 * -1 on error; errors as forge_decode. next_id may point into ids (`forge_decode_greedy(ctx,
 * &id, 1, &id, &err)`): every id is read before *next_id is written. */
int forge_decode_greedy(forge_context *ctx, const int32_t *ids, int32_t n, int32_t *next_id,
                        struct forge_err *err);

/* forge_decode (last position only), then the sampler chain of s on the last position's logits:
 * *next_id = what forge_sampler_sample(s, logits) returns, consuming the same random draw. On a
 * GPU, when the chain fits the device (greedy, or top-k between 1 and 1024), it runs there and
 * only the id is copied back, and the decode step may be replayed from a recording; otherwise
 * the logits are read and sampled on the host. Does not call forge_sampler_accept (the caller
 * does). s (borrowed) must be made for the model's n_vocab. The logits are not kept:
 * forge_get_logits returns NULL until the next forge_decode. *next_id is -1 on error; errors as
 * forge_decode. next_id may point into ids, as for forge_decode_greedy. */
int forge_decode_sample(forge_context *ctx, const int32_t *ids, int32_t n, forge_sampler *s,
                        int32_t *next_id, struct forge_err *err);

/* Logits (n_vocab floats) of the i-th position of the last forge_decode, i in
 * [0, forge_n_logits); i = -1 means the last one. NULL if there is no such row. Borrowed: valid
 * until the next decode, truncate or free on ctx. */
const float *forge_get_logits(const forge_context *ctx, int32_t i);
int32_t forge_n_logits(const forge_context *ctx);

/* Forget positions >= pos (0 <= pos <= forge_context_pos), so the next decode continues at pos.
 * Logits are dropped. */
int forge_kv_truncate(forge_context *ctx, int32_t pos, struct forge_err *err);

/* ---- sampling --------------------------------------------------------------------------- */
/* A chain applied in llama.cpp's order: penalties -> top-k -> top-p -> min-p -> temperature ->
 * random draw. temperature <= 0 is greedy: the argmax after the penalties (lowest id on a tie). */
typedef struct forge_sampler_params {
    float temperature;       /* <= 0: greedy */
    int32_t top_k;           /* <= 0: off */
    float top_p;             /* >= 1: off */
    float min_p;             /* <= 0: off */
    float repeat_penalty;    /* 1: off. logit > 0 is divided by it, logit <= 0 multiplied */
    float presence_penalty;  /* 0: off. subtracted once from every token in the window */
    float frequency_penalty; /* 0: off. subtracted once per occurrence in the window */
    int32_t penalty_last_n;  /* window of accepted tokens the penalties look at (0: off) */
    uint64_t seed;           /* random draws are reproducible for a seed */
} forge_sampler_params;

/* llama.cpp's defaults: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, penalties off
 * (repeat 1.0, window 64), seed 0. */
forge_sampler_params forge_sampler_default_params(void);

/* A sampler over n_vocab logits. Owned by the caller. FORGE_E_INVALID for a bad parameter
 * (NaN, negative top-p, n_vocab < 1). */
int forge_sampler_create(const forge_sampler_params *params, int32_t n_vocab, forge_sampler **out,
                         struct forge_err *err);
void forge_sampler_free(forge_sampler *s);

/* Pick a token from n_vocab logits (not modified). Does not record it: call accept. */
int32_t forge_sampler_sample(forge_sampler *s, const float *logits);
/* Record a token in the penalty window (llama.cpp also feeds it the prompt). */
void forge_sampler_accept(forge_sampler *s, int32_t id);
/* Empty the penalty window and restart the random stream from the seed. */
void forge_sampler_reset(forge_sampler *s);
/* The distribution forge_sampler_sample draws from: probs[id] for every id (0 for removed
 * tokens; exactly one 1 when greedy). For tests and front ends that show probabilities. */
void forge_sampler_probs(forge_sampler *s, const float *logits, float *probs);

#ifdef __cplusplus
}
#endif

#endif /* FORGE_MODEL_H */
