/* forge_tok.h - tokenizers that match the reference tokenizers exactly.
 *
 * A forge_tok is built from the tokenizer.* metadata of a GGUF file (vocab-only files work too):
 * tokenizer.ggml.model "llama" (SentencePiece), "gpt2" (byte-level BPE, pre-tokenizer chosen by
 * tokenizer.ggml.pre), "bert" (WordPiece). It copies what it needs out of the gguf_ctx, so the
 * gguf_ctx may be closed afterwards.
 *
 * Thread safety: a loaded forge_tok is immutable; any number of threads may encode/decode with it
 * at once. A forge_detok_stream belongs to one thread.
 */
#ifndef FORGE_TOK_H
#define FORGE_TOK_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

#ifdef __cplusplus
extern "C" {
#endif

struct forge_err;
struct gguf_ctx;

typedef struct forge_tok forge_tok;

/* Token attribute bits, from tokenizer.ggml.token_type (1 normal, 2 unknown, 3 control,
 * 4 user-defined, 5 unused, 6 byte). */
enum forge_tok_type {
    FORGE_TOK_UNDEFINED = 0,
    FORGE_TOK_NORMAL = 1,
    FORGE_TOK_UNKNOWN = 2,
    FORGE_TOK_CONTROL = 3,
    FORGE_TOK_USER_DEFINED = 4,
    FORGE_TOK_UNUSED = 5,
    FORGE_TOK_BYTE = 6
};

/* Load the tokenizer from a GGUF's metadata. Missing or inconsistent metadata is FORGE_E_FORMAT
 * naming the key (no tokens, no merges for gpt2, scores/token_type counts that differ from the
 * tokens, a token type outside 0..6, duplicate token texts, bos/eos/eot/eom/unknown id >= n_vocab,
 * add_bos_token without a BOS id); another tokenizer.ggml.model ("t5", "rwkv", ...) is
 * FORGE_E_UNSUPPORTED. An id of -1 / 0xFFFFFFFF means "none". An unknown tokenizer.ggml.pre prints
 * nothing here: it is reported through forge_tok_warning() and the default pre-tokenizer is used.
 * Defaults follow llama.cpp (llama-vocab.cpp): SPM adds BOS, llama-bpe/tekken/chameleon add BOS,
 * EOT/EOM/FIM tokens are found by their text and become control tokens, the end-of-generation set
 * is EOS, EOT, EOM plus tokens named like <|eot_id|>, <|im_end|>, <end_of_turn>, <|endoftext|>.
 * Returned handle owned by caller. */
int forge_tok_load(const struct gguf_ctx *gguf, forge_tok **out, struct forge_err *err);
void forge_tok_free(forge_tok *tok);

/* A warning produced at load (e.g. unknown pre-tokenizer name), or NULL. Owned by tok. */
const char *forge_tok_warning(const forge_tok *tok);

int32_t forge_tok_n_vocab(const forge_tok *tok);
/* "llama", "gpt2", "bert". */
const char *forge_tok_model_name(const forge_tok *tok);

/* Special token ids, -1 when the vocabulary has none. */
int32_t forge_tok_bos(const forge_tok *tok);
int32_t forge_tok_eos(const forge_tok *tok);
int32_t forge_tok_eot(const forge_tok *tok);
/* True for end-of-generation tokens (EOS, EOT, EOM and the like). */
bool forge_tok_is_eog(const forge_tok *tok, int32_t id);
/* Whether encode with add_special=true adds BOS / EOS (the reference tokenizer defaults;
 * tokenizer.ggml.add_bos_token / add_eos_token override them). */
bool forge_tok_adds_bos(const forge_tok *tok);
bool forge_tok_adds_eos(const forge_tok *tok);
int forge_tok_token_type(const forge_tok *tok, int32_t id); /* enum forge_tok_type, 0 if bad id */
/* The token's text as stored in the vocabulary (e.g. "\xe2\x96\x81Hello", "\xc4\xa0world"),
 * not NUL-terminated; owned by tok. Unknown id: NULL. */
const char *forge_tok_text(const forge_tok *tok, int32_t id, size_t *len);
/* The id whose vocabulary text is exactly text[0..len), or -1. */
int32_t forge_tok_lookup(const forge_tok *tok, const char *text, size_t len);
/* tokenizer.ggml.pre as stored ("" when absent). */
const char *forge_tok_pre_name(const forge_tok *tok);

/* Encode len bytes of text (need not be NUL-terminated, may be invalid UTF-8: byte-level BPE
 * reads an invalid byte as U+FFFD, SentencePiece falls back to <0xNN> byte tokens).
 * add_special: add BOS/EOS as the vocabulary's defaults say (WordPiece: [CLS] ... [SEP]).
 * parse_special: text spelling a control/user-defined token becomes that token.
 * On success *ids is a malloc'd array of *n_ids ids that the caller frees with free(). */
int forge_tok_encode(const forge_tok *tok, const char *text, size_t len, bool add_special,
                     bool parse_special, int32_t **ids, size_t *n_ids, struct forge_err *err);

/* The raw bytes a token stands for when detokenized (byte tokens become their byte, U+2581 a
 * space, GPT-2 byte-unicode mapped back). Pointer owned by tok; *len set. Control tokens give
 * their text only when `special` is true, else empty. Unknown id: NULL. */
const char *forge_tok_piece(const forge_tok *tok, int32_t id, bool special, size_t *len);

/* Detokenize ids into a malloc'd NUL-terminated buffer (*out, *out_len excluding the NUL).
 * Pieces are concatenated as the reference's token_to_piece gives them (no clean-up of spaces).
 * remove_leading_space: drop the SPM space prefix of the first piece (as after BOS): one ' ' at
 * the start of the first non-empty piece, only for vocabularies that add a space prefix.
 * An id outside [0, n_vocab) is FORGE_E_RANGE.
 * special: render control tokens' text. */
int forge_tok_decode(const forge_tok *tok, const int32_t *ids, size_t n_ids, bool special,
                     bool remove_leading_space, char **out, size_t *out_len,
                     struct forge_err *err);

/* Streaming detokenizer: push one id at a time, get the bytes that are complete UTF-8.
 * An incomplete multi-byte sequence is held back until the bytes that finish it arrive (or until
 * forge_detok_stream_flush, which emits what is left, invalid bytes as U+FFFD). */
typedef struct forge_detok_stream forge_detok_stream;
int forge_detok_stream_create(const forge_tok *tok, bool special, forge_detok_stream **out,
                              struct forge_err *err);
void forge_detok_stream_free(forge_detok_stream *s);
/* Returns a pointer (valid until the next call on s) to *len bytes ready to print. */
const char *forge_detok_stream_push(forge_detok_stream *s, int32_t id, size_t *len);
const char *forge_detok_stream_flush(forge_detok_stream *s, size_t *len);

#ifdef __cplusplus
}
#endif

#endif /* FORGE_TOK_H */
