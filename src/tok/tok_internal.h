/* tok_internal.h - the loaded tokenizer (struct forge_tok) shared by the tok_*.c files: vocabulary
 * tables, string hash maps, token attributes, and the per-algorithm entry points. Not public.
 *
 * The algorithms follow llama.cpp's llama-vocab.cpp / unicode.cpp (the reference tokenizers),
 * re-implemented in C: SPM (score-driven merges + byte fallback), BPE (rank-driven merges over a
 * regex pre-tokenization run on PCRE2), WPM (greedy longest-match WordPiece). */
#ifndef FORGE_TOK_INTERNAL_H
#define FORGE_TOK_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

#include "forge.h"

/* Token attribute bits (llama.cpp's llama_token_attr). */
enum {
    TOK_ATTR_UNDEFINED = 0,
    TOK_ATTR_UNKNOWN = 1 << 0,
    TOK_ATTR_UNUSED = 1 << 1,
    TOK_ATTR_NORMAL = 1 << 2,
    TOK_ATTR_CONTROL = 1 << 3,
    TOK_ATTR_USER_DEFINED = 1 << 4,
    TOK_ATTR_BYTE = 1 << 5,
    TOK_ATTR_LSTRIP = 1 << 7,
    TOK_ATTR_RSTRIP = 1 << 8,
};

enum tok_kind { TOK_SPM = 1, TOK_BPE = 2, TOK_WPM = 3 };

/* Open-addressing hash map from a byte string (kept elsewhere) to an int32 value. */
typedef struct tok_map {
    uint32_t *slots; /* entry index + 1, 0 = empty */
    uint32_t mask;
} tok_map;

struct tok_pre; /* compiled pre-tokenizer (tok_bpe.c) */

struct forge_tok {
    enum tok_kind kind;
    char model_name[16];
    char *pre_name;          /* tokenizer.ggml.pre as given, or NULL */
    char *warning;           /* load warning or NULL */

    int32_t n_vocab;
    char *text_arena;        /* all token texts, back to back */
    uint32_t *text_off;      /* n_vocab + 1 offsets into text_arena */
    float *scores;
    uint32_t *attr;
    tok_map text_map;        /* token text -> id */
    int32_t max_token_len;

    char *piece_arena;       /* detokenized pieces (special = true), back to back */
    uint32_t *piece_off;     /* n_vocab + 1 */

    /* BPE merges: "left right" strings; the map gives the rank (= index) of a pair. */
    char *merge_arena;
    uint32_t *merge_off;     /* n_merges + 1 */
    uint32_t *merge_split;   /* position of the separating space in each merge */
    uint32_t n_merges;
    tok_map merge_map;
    struct tok_pre *pre;
    bool ignore_merges;
    bool clean_spaces;
    bool spm_split;          /* SPM: no token has U+2581 after another character (see tok_spm.c) */
    bool bpe_cache;          /* BPE: reuse the ids of words already merged in the same call */

    int32_t byte_tok[256];   /* SPM: <0xNN> (or the raw byte); BPE: the GPT-2 char; -1 none */

    int32_t bos, eos, eot, eom, unk, sep, pad;
    int32_t *eog;            /* sorted end-of-generation ids */
    size_t n_eog;
    bool add_bos, add_eos, add_space_prefix;

    int32_t *special;        /* control/user-defined/unknown ids, longest text first */
    size_t n_special;
};

/* ---- helpers (tok.c) ---------------------------------------------------------------------- */
static inline const char *tok_text(const struct forge_tok *t, int32_t id, size_t *len)
{
    *len = t->text_off[id + 1] - t->text_off[id];
    return t->text_arena + t->text_off[id];
}

uint64_t tok_hash(const void *p, size_t n, uint64_t h);
#define TOK_HASH_SEED 0xcbf29ce484222325ull
/* id of the token whose text is s[0..n), or -1. */
int32_t tok_find(const struct forge_tok *t, const char *s, size_t n);
/* rank of the merge (left, right), or -1. */
int32_t tok_merge_rank(const struct forge_tok *t, const char *l, size_t ln, const char *r, size_t rn);

/* Growable id output vector. */
typedef struct tok_ids {
    int32_t *v;
    size_t n, cap;
} tok_ids;
int tok_ids_push(tok_ids *o, int32_t id);

/* Lenient UTF-8 decoding exactly like llama.cpp's unicode_cpt_from_utf8: returns the code point
 * and advances *off; an invalid sequence yields 0xFFFD and advances one byte. */
uint32_t tok_cpt_decode(const char *s, size_t n, size_t *off);
/* Encode cpt (<= 0x10FFFF; larger values are written as U+FFFD) to out; returns length 1..4. */
size_t tok_cpt_encode(uint32_t cpt, char *out);
/* Byte length of the UTF-8 sequence a lead byte announces (llama.cpp's unicode_len_utf8). */
static inline size_t tok_utf8_len(unsigned char c)
{
    static const unsigned char lookup[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
    return lookup[c >> 4];
}
/* White_Space property (llama.cpp's unicode_set_whitespace). */
bool tok_is_whitespace(uint32_t cpt);

/* ---- algorithms -------------------------------------------------------------------------- */
/* SPM over one raw fragment (spaces already escaped to U+2581). */
int tok_spm_encode(const struct forge_tok *t, const char *text, size_t len, tok_ids *out);

/* BPE pre-tokenizer: compile by tokenizer.ggml.pre name (NULL/"" = default). Sets *known false
 * (and uses the default) for an unknown name. Flags the name implies are applied to t. */
int tok_pre_create(struct forge_tok *t, const char *name, bool *known, forge_err *err);
void tok_pre_free(struct tok_pre *p);
/* Pre-tokenize text[0..len): *cps (malloc'd) gets the code points (lenient decoding), *ends
 * (malloc'd) the end of each word as a code point index, in order. Exposed for tests. */
int tok_pre_split(const struct tok_pre *pre, const char *text, size_t len, uint32_t **cps,
                  size_t *n_cps, size_t **ends, size_t *n_ends, forge_err *err);
/* BPE over one raw fragment. */
int tok_bpe_encode(const struct forge_tok *t, const char *text, size_t len, tok_ids *out,
                   forge_err *err);
/* GPT-2 byte <-> unicode map. */
uint32_t tok_gpt2_byte_to_cpt(unsigned char b);
int tok_gpt2_cpt_to_byte(uint32_t cpt); /* -1 if cpt is not in the map */

/* WordPiece over one raw fragment. */
int tok_wpm_encode(const struct forge_tok *t, const char *text, size_t len, tok_ids *out);

#endif
