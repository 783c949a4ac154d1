/* forge_quantize.h - quantize a GGUF model file (`forge quantize`), with the per-tensor type
 * choices of llama.cpp's llama-quantize (no importance matrix) and bit-identical tensor data.
 *
 * A "mix" names the target: a single type (Q4_0, Q8_0, Q6_K, IQ4_NL, ...) or one of llama.cpp's
 * mixes (Q3_K_M, Q4_K_M, ...), where some tensors (attn_v, ffn_down, the output matrix) get
 * more bits. 1-D tensors and norms are copied as they are. With `pure`, every quantizable 2-D
 * weight gets the mix's base type. A tensor whose rows are no multiple of the type's block
 * size falls back to a compatible type (Q4_K -> Q5_0, Q6_K -> Q8_0, ..., F16 last); each
 * fallback is reported through the note callback.
 * Part of the public API. The library never exits; errors come back as FORGE_E_* codes. */
#ifndef FORGE_QUANTIZE_H
#define FORGE_QUANTIZE_H

#include <stdbool.h>
#include <stdint.h>

#include "forge.h"
#include "forge_gguf.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The mixes (the 16 of llama-quantize's usual list, then F16, BF16, F32), by index i in
 * [0, forge_quantize_mix_count()). */
int forge_quantize_mix_count(void);
const char *forge_quantize_mix_name(int i);    /* "Q4_K_M"; NULL if i is out of range */
int forge_quantize_mix_find(const char *name); /* case-insensitive; index or -1 */
int forge_quantize_mix_base_type(int i);       /* ggml type of most tensors; -1 if bad i */
uint32_t forge_quantize_mix_file_type(int i);  /* llama_ftype written as general.file_type */

typedef struct forge_quantize_opts {
    const char *in_path;   /* GGUF to read (never written) */
    const char *out_path;  /* file to write (created or truncated; the CLI passes a temporary
                            * file beside the target and renames it on success) */
    int mix;               /* index from forge_quantize_mix_find */
    bool pure;             /* no per-tensor mix rules: every weight in the base type */
    bool allow_requantize; /* accept quantized input tensors (dequantized first) */
    int n_threads;         /* >= 1; 0: the number of physical cores */
    /* Optional: called after each chunk with output bytes done / total (from the calling
     * thread). */
    void (*progress)(void *user, uint64_t done, uint64_t total);
    /* Optional: a line about one tensor (a fallback type), without a newline. */
    void (*note)(void *user, const char *msg);
    void *user;
} forge_quantize_opts;

typedef struct forge_quantize_result {
    int64_t n_tensors;
    int64_t n_quantized;                 /* tensors converted (the others copied) */
    int64_t n_fallback;                  /* tensors given a fallback type */
    uint64_t in_bytes, out_bytes;        /* tensor data, without padding */
    int64_t type_count[GGML_TYPE_COUNT]; /* output tensors per ggml type */
} forge_quantize_result;

/* Quantize in_path into out_path. On error the file at out_path may be left truncated or
 * partial (gguf_writer_write's rule): write to a temporary file and rename it. Errors name the
 * tensor and type: a quantized input without allow_requantize (FORGE_E_INVALID), a type that
 * cannot be dequantized (FORGE_E_UNSUPPORTED), a split model (FORGE_E_UNSUPPORTED), I/O. */
int forge_quantize_file(const forge_quantize_opts *o, forge_quantize_result *result,
                        forge_err *err);

#ifdef __cplusplus
}
#endif

#endif /* FORGE_QUANTIZE_H */
