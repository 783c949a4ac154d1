/* forge_engine.h - the serving core: many generation requests on one model at once.
 *
 * Three objects, three owners (docs/ENGINE.md):
 *   - the model (forge_model.h): file, weights, tokenizer; immutable, shared by any number of
 *     engines and threads; it must outlive every engine on it.
 *   - the engine (this header): one per model x device. It owns the backend, the device copy of
 *     the weights (shared with other engines/contexts of the model on the same GPU, reference
 *     counted), the paged KV cache (a pool of fixed-size blocks, with automatic prefix caching),
 *     scratch buffers for the largest step, and the scheduler.
 *   - the request: a prompt (token ids), sampling parameters, stop rules and a callback. The
 *     engine copies everything it needs at submit; the request lives inside the engine until its
 *     last event, then it is gone (its id is never reused by the engine).
 *
 * A step (forge_engine_step) is one batched forward pass over a flat list of rows mixing the
 * prompt chunks of new requests (chunked prefill within a token budget) and one decode token of
 * every running request, then the sampling of every row that ends a prompt or decodes. Requests
 * join and leave between steps (continuous batching). When the KV pool runs out the engine
 * preempts the most recently admitted running request (frees its blocks, recomputes it later;
 * the output is unchanged).
 *
 * Threads: forge_engine_submit, forge_engine_cancel and forge_engine_get_stats may be called from
 * any thread at any time. forge_engine_step / forge_engine_run drive the engine and must not be
 * called from two threads at once, nor while the engine's own thread runs (forge_engine_start).
 * Callbacks (forge_request_params.on_event) run on the thread that steps the engine, must not
 * block for long and must not call forge_engine_step/run/stop/free (submit and cancel are fine).
 *
 * Batch invariance: a greedy request gives the same ids alone and among any others, at any slot,
 * with or without a prefix-cache hit, on the same device and engine parameters.
 *
 * Errors follow forge.h: int status, message in the caller's forge_err.
 */
#ifndef FORGE_ENGINE_H
#define FORGE_ENGINE_H

#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

#include "forge_model.h"

#ifdef __cplusplus
extern "C" {
#endif

struct forge_err;
typedef struct forge_engine forge_engine;

/* A request's handle: > 0, unique for the engine's lifetime. */
typedef uint64_t forge_req_id;

typedef struct forge_engine_params {
    forge_device device; /* CPU (default), GPU, AUTO: as forge_context_params */
    int32_t gpu_index;
    int32_t n_tp;        /* tensor-parallel ranks, as forge_context_params.n_tp; 0: none */
    int32_t n_threads;   /* CPU threads; 0: the physical cores */
    bool f32_math;       /* as forge_context_params */
    forge_kv_type kv_type;
    int32_t n_ctx;      /* longest request (prompt + generated tokens); 0: the model's context
                         * length, capped at kv_size (a larger n_ctx given here is kept: submit
                         * then also refuses requests that need more blocks than the pool) */
    int32_t kv_size;    /* tokens in the KV pool, all requests together (rounded up to whole
                         * blocks); 0: n_ctx x min(n_parallel, 4) (n_ctx as given, else the
                         * model's context length) */
    int32_t block_size; /* tokens per KV block: 16 or 32; 0: 16 */
    int32_t n_parallel; /* most requests running (decoding or in prefill) at once; 0: 64;
                         * capped at n_batch (every running request needs its row) */
    int32_t n_batch;    /* token budget of one step (decode rows + prompt chunks), >= n_parallel
                         * is useful; 0: 512 */
    bool no_prefix_cache; /* do not reuse the KV blocks of earlier requests' prefixes */
    /* Progress while the weights are prepared (see forge_context_params). NULL: no calls. */
    void (*progress)(uint64_t done, uint64_t total, void *user);
    void *progress_user;
} forge_engine_params;

forge_engine_params forge_engine_default_params(void);

/* Create an engine on a model (borrowed: it must outlive the engine). Owned by the caller.
 * Errors: bad parameters (FORGE_E_INVALID naming the field and value), device errors as
 * forge_context_create, FORGE_E_NOMEM when the KV pool does not fit. */
int forge_engine_create(forge_model *model, const forge_engine_params *params,
                        forge_engine **out, struct forge_err *err);
/* Cancels what is still queued or running (no callbacks), waits for the engine's thread if one
 * was started, and frees everything the engine owns. NULL is fine. */
void forge_engine_free(forge_engine *e);

/* What the engine ended up with (after defaults and rounding). */
typedef struct forge_engine_info {
    const char *device; /* "CPU" or "GPU" (static) */
    const char *warning; /* as forge_context_warning, or NULL; owned by the engine */
    int32_t n_ctx, kv_size, block_size, n_blocks, n_parallel, n_batch;
    forge_kv_type kv_type;
} forge_engine_info;
void forge_engine_get_info(const forge_engine *e, forge_engine_info *out);
const forge_model *forge_engine_model(const forge_engine *e);

/* ---- requests ----------------------------------------------------------------------------- */

typedef enum forge_finish {
    FORGE_FINISH_NONE = 0,   /* not finished (a token event) */
    FORGE_FINISH_STOP,       /* an end-of-generation token (not emitted) or a stop string */
    FORGE_FINISH_LENGTH,     /* max_tokens generated, or the context is full */
    FORGE_FINISH_CANCELLED,  /* forge_engine_cancel, or the engine was stopped */
    FORGE_FINISH_ERROR       /* the step failed; event.error says why */
} forge_finish;

/* "stop", "length", "cancelled", "error", or "" for NONE. Static. */
const char *forge_finish_name(forge_finish f);

typedef struct forge_logit_bias {
    int32_t id;
    float bias; /* added to the logit; -INFINITY bans the token */
} forge_logit_bias;

typedef struct forge_token_logprob {
    int32_t id;
    float logprob; /* natural log of the probability after logit bias and penalties, before
                    * temperature and truncation (as OpenAI reports it) */
} forge_token_logprob;

/* One event of a request, delivered to on_event. Every pointer is borrowed for the duration of
 * the callback only. */
typedef struct forge_event {
    forge_req_id id;
    void *user;       /* the request's user pointer */
    /* a generated token (token >= 0), or -1 in a final event that carries no token */
    int32_t token;
    /* the text released by this event: complete UTF-8, never part of a stop string; may be
     * empty (bytes held back until a character or a possible stop string is decided) and may
     * carry text held back from earlier tokens. Not NUL-terminated. */
    const char *text;
    size_t text_len;
    float logprob;                   /* of token; 0 when logprobs were not asked for */
    const forge_token_logprob *top;  /* top_logprobs entries, most likely first */
    int32_t n_top;
    /* != NONE on the last event of the request (which may also carry a token and text) */
    forge_finish finish;
    const char *error;        /* FINISH_ERROR: what failed; else NULL */
    /* usage so far: prompt tokens, of them served from the prefix cache (at the first
     * admission), generated tokens (emitted ones: an end-of-generation token that ends the
     * request is not counted) */
    int32_t n_prompt, n_cached, n_generated;
} forge_event;

typedef struct forge_request_params {
    const int32_t *prompt; /* token ids (copied); at least 1 */
    int32_t n_prompt;
    int32_t max_tokens;    /* most tokens to generate; 0: until the context is full
                            * (n_ctx - n_prompt) */
    forge_sampler_params sampling; /* temperature <= 0: greedy; seed makes draws reproducible */
    const char *const *stop; /* stop strings (copied), generation ends before the first
                              * occurrence in the generated text, which is never emitted */
    int32_t n_stop;
    bool ignore_eos;       /* keep generating past end-of-generation tokens */
    bool logprobs;         /* report each token's logprob */
    int32_t top_logprobs;  /* and the n most likely tokens (0..20); > 0 implies logprobs */
    const forge_logit_bias *logit_bias; /* copied */
    int32_t n_logit_bias;
    void (*on_event)(const forge_event *ev, void *user); /* required */
    void *user;
} forge_request_params;

forge_request_params forge_request_default_params(void); /* greedy, max_tokens 0 */

/* Queue a request; *id is its handle. Refused at once (nothing queued) when it can never run:
 * FORGE_E_RANGE naming the limits when n_prompt (+ max_tokens) exceeds the engine's n_ctx or
 * the whole KV pool, FORGE_E_INVALID for a bad field (named), FORGE_E_RANGE for an id outside
 * the vocabulary. Thread-safe. */
int forge_engine_submit(forge_engine *e, const forge_request_params *p, forge_req_id *id,
                        struct forge_err *err);

/* Ask a request to stop: its last event (FORGE_FINISH_CANCELLED) comes at the next step and its
 * KV blocks go back to the pool then. FORGE_OK when the request was queued or running,
 * FORGE_E_NOTFOUND (harmless) for a finished or unknown id. Thread-safe. */
int forge_engine_cancel(forge_engine *e, forge_req_id id, struct forge_err *err);

/* ---- driving ------------------------------------------------------------------------------ */

/* One step: admit, schedule, one forward pass, sample, deliver events. Returns the number of
 * requests still unfinished (>= 0: 0 means idle) or a negative error (the requests of the failed
 * step end with FORGE_FINISH_ERROR; the engine stays usable). FORGE_E_INTERRUPTED when the abort
 * flag stopped the forward pass: the step's requests are left as they were before it.
 * FORGE_E_INVALID when the engine's own thread runs (forge_engine_start). */
int forge_engine_step(forge_engine *e, struct forge_err *err);
/* Step until no request is left. FORGE_E_INTERRUPTED when the abort flag is set (the requests
 * are cancelled). */
int forge_engine_run(forge_engine *e, struct forge_err *err);

/* A thread owned by the engine that steps whenever there is work (servers). After start, do not
 * call step/run yourself. stop cancels every request (their last events are delivered) and
 * joins the thread; free stops too. */
int forge_engine_start(forge_engine *e, struct forge_err *err);
void forge_engine_stop(forge_engine *e);

/* fn(user) is called on the stepping thread at the end of every forge_engine_step, after the
 * step's events (a server sends what those events buffered). The same rules as on_event apply.
 * Thread-safe; NULL removes it. Once it returns, a step that has not started will not call
 * the old hook, but one in progress may still be calling it: remove a hook whose user is about
 * to be freed only while the engine does not step (forge_engine_stop). */
void forge_engine_set_step_hook(forge_engine *e, void (*fn)(void *user), void *user);

/* While *flag is non-zero, forge_engine_run cancels everything and returns
 * FORGE_E_INTERRUPTED (a SIGINT handler). Borrowed; NULL removes it. */
void forge_engine_set_abort_flag(forge_engine *e, const volatile sig_atomic_t *flag);

typedef struct forge_engine_stats {
    int32_t n_waiting, n_running;   /* requests queued / admitted */
    int32_t blocks_total, blocks_used, blocks_cached; /* KV pool: in use by requests / cached
                                                      * and reusable */
    uint64_t n_steps, n_preempted;
    uint64_t prompt_tokens, cached_tokens, generated_tokens; /* totals since creation */
} forge_engine_stats;
void forge_engine_get_stats(forge_engine *e, forge_engine_stats *out); /* thread-safe */

#ifdef __cplusplus
}
#endif

#endif /* FORGE_ENGINE_H */
