/* forge.h - the public C API of libforge.
 *
 * Error model (applies to every function in every forge_*.h header):
 *   - A function that can fail returns an int status: FORGE_OK (0) on success, a negative
 *     FORGE_E_* code on failure. It never exits or aborts the process.
 *   - Such a function takes a `forge_err *err` as its last argument (may be NULL). On failure it
 *     writes a one-line, human-readable message there naming the problem (file, offset, key,
 *     value). The caller owns the struct; the library keeps no hidden error state, so the API is
 *     safe to call from many threads.
 *   - Free functions accept NULL.
 *
 * Sub-APIs live in their own headers, included here:
 *   forge_gguf.h  GGUF model-file reader (mmap, validated as untrusted input), ggml type traits.
 *   forge_tok.h   tokenizers (SentencePiece, byte-level BPE, WordPiece) and detokenization.
 *   forge_model.h models, inference contexts (KV cache), decoding, logits, sampling.
 *   forge_engine.h the serving core: many requests on one model, batched steps, paged KV cache.
 *   forge_template.h chat templates (Jinja subset) and chat message rendering.
 *   forge_synth.h random-weight models of real shapes, for benchmarks.
 *   forge_hub.h   models from a Hugging Face-style hub, downloaded into a local cache.
 */
#ifndef FORGE_H
#define FORGE_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FORGE_VERSION_MAJOR 0
#define FORGE_VERSION_MINOR 1
#define FORGE_VERSION_PATCH 0
#define FORGE_VERSION_STRING "0.1.0"

/* Status codes. 0 is success; every error is negative. */
enum forge_status {
    FORGE_OK = 0,
    FORGE_E_IO = -1,          /* open/read/mmap/write failed (errno text in the message) */
    FORGE_E_FORMAT = -2,      /* malformed input: bad magic, truncated, lying sizes, ... */
    FORGE_E_NOMEM = -3,       /* allocation failed */
    FORGE_E_INVALID = -4,     /* bad argument from the caller */
    FORGE_E_UNSUPPORTED = -5, /* valid input that this build does not handle (type, arch, ...) */
    FORGE_E_NOTFOUND = -6,    /* a key, tensor or token that was asked for does not exist */
    FORGE_E_TYPE = -7,        /* a key exists with another value type than asked for */
    FORGE_E_RANGE = -8,       /* a value is outside what is allowed (context full, id >= n_vocab) */
    FORGE_E_INTERNAL = -9,    /* a bug in Forge: please report */
    FORGE_E_DEVICE = -10,     /* GPU runtime error */
    FORGE_E_INTERRUPTED = -11 /* stopped by the caller (e.g. Ctrl-C) */
};

#define FORGE_ERR_MSG_MAX 512

/* Caller-owned error report. Zero-initialise it (forge_err e = {0};). */
typedef struct forge_err {
    int code;                     /* last failing status, FORGE_OK if none */
    char msg[FORGE_ERR_MSG_MAX];  /* NUL-terminated message, "" if none */
} forge_err;

/* Short constant name of a status code, e.g. "FORGE_E_FORMAT". Never NULL. */
const char *forge_status_name(int status);

/* "0.1.0"; the same as FORGE_VERSION_STRING of the library actually linked. */
const char *forge_version(void);

#ifdef __cplusplus
}
#endif

#include "forge_gguf.h"
#include "forge_tok.h"
#include "forge_model.h"
#include "forge_engine.h"
#include "forge_template.h"
#include "forge_synth.h"
#include "forge_hub.h"

#endif /* FORGE_H */
