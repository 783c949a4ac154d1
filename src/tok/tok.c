/* tok.c - forge_tok: loading a tokenizer from GGUF metadata (tokens, scores, types, merges,
 * special ids and the reference tokenizers' defaults), special-token partitioning, encode
 * dispatch, pieces, detokenization and the streaming detokenizer.
 *
 * Loading follows llama.cpp's llama_vocab::impl::load (llama-vocab.cpp, 2025): the same default
 * special ids per model, the same add_bos/add_eos/add_space_prefix defaults, EOT/EOM/FIM/EOG
 * detection by token text (which also turns those tokens into control tokens), and the same
 * ordering of special tokens for partitioning (longest text first). Where llama.cpp asserts or
 * throws on bad input, Forge returns FORGE_E_FORMAT naming the key. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ctype.h>

#include "core/util.h"
#include "forge_gguf.h"
#include "forge_tok.h"
#include "tok/tok_internal.h"

#define K_MODEL "tokenizer.ggml.model"
#define K_PRE "tokenizer.ggml.pre"
#define K_TOKENS "tokenizer.ggml.tokens"
#define K_SCORES "tokenizer.ggml.scores"
#define K_TYPES "tokenizer.ggml.token_type"
#define K_MERGES "tokenizer.ggml.merges"

/* ---- small helpers ------------------------------------------------------------------------- */

uint64_t tok_hash(const void *p, size_t n, uint64_t h)
{
    const unsigned char *s = p;
    for (size_t i = 0; i < n; i++) {
        h ^= s[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

static uint64_t hash_final(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    return h;
}

static int map_init(tok_map *m, size_t n_entries)
{
    size_t cap = 16;
    while (cap < n_entries * 2 + 1) cap <<= 1;
    m->slots = calloc(cap, sizeof *m->slots);
    if (!m->slots) return FORGE_E_NOMEM;
    m->mask = (uint32_t)(cap - 1);
    return FORGE_OK;
}

int32_t tok_find(const struct forge_tok *t, const char *s, size_t n)
{
    if (!t->text_map.slots) return -1;
    uint32_t i = (uint32_t)hash_final(tok_hash(s, n, TOK_HASH_SEED)) & t->text_map.mask;
    for (;;) {
        uint32_t e = t->text_map.slots[i];
        if (!e) return -1;
        size_t len;
        const char *txt = tok_text(t, (int32_t)(e - 1), &len);
        if (len == n && !memcmp(txt, s, n)) return (int32_t)(e - 1);
        i = (i + 1) & t->text_map.mask;
    }
}

/* Insert id under its own text; returns the id already holding that text, or -1. */
static int32_t text_map_insert(struct forge_tok *t, int32_t id)
{
    size_t n;
    const char *s = tok_text(t, id, &n);
    uint32_t i = (uint32_t)hash_final(tok_hash(s, n, TOK_HASH_SEED)) & t->text_map.mask;
    for (;;) {
        uint32_t e = t->text_map.slots[i];
        if (!e) {
            t->text_map.slots[i] = (uint32_t)id + 1;
            return -1;
        }
        size_t len;
        const char *txt = tok_text(t, (int32_t)(e - 1), &len);
        if (len == n && !memcmp(txt, s, n)) return (int32_t)(e - 1);
        i = (i + 1) & t->text_map.mask;
    }
}

static uint64_t merge_hash(const char *l, size_t ln, const char *r, size_t rn)
{
    uint64_t h = tok_hash(l, ln, TOK_HASH_SEED);
    h = tok_hash(" ", 1, h);
    return hash_final(tok_hash(r, rn, h));
}

int32_t tok_merge_rank(const struct forge_tok *t, const char *l, size_t ln, const char *r, size_t rn)
{
    if (!t->merge_map.slots) return -1;
    uint32_t i = (uint32_t)merge_hash(l, ln, r, rn) & t->merge_map.mask;
    for (;;) {
        uint32_t e = t->merge_map.slots[i];
        if (!e) return -1;
        uint32_t m = e - 1;
        const char *s = t->merge_arena + t->merge_off[m];
        uint32_t sp = t->merge_split[m];
        size_t len = t->merge_off[m + 1] - t->merge_off[m];
        if (sp == ln && len == ln + 1 + rn && !memcmp(s, l, ln) && !memcmp(s + ln + 1, r, rn))
            return (int32_t)m;
        i = (i + 1) & t->merge_map.mask;
    }
}

int tok_ids_push(tok_ids *o, int32_t id)
{
    if (o->n == o->cap) {
        size_t cap = o->cap ? o->cap * 2 : 64;
        int32_t *v = realloc(o->v, cap * sizeof *v);
        if (!v) return FORGE_E_NOMEM;
        o->v = v;
        o->cap = cap;
    }
    o->v[o->n++] = id;
    return FORGE_OK;
}

uint32_t tok_cpt_decode(const char *str, size_t n, size_t *off)
{
    const unsigned char *s = (const unsigned char *)str;
    size_t o = *off;
    unsigned char c = s[o];
    if (!(c & 0x80)) {
        *off = o + 1;
        return c;
    }
    if (!(c & 0x40)) goto bad;
    if (!(c & 0x20)) {
        if (o + 1 >= n || (s[o + 1] & 0xc0) != 0x80) goto bad;
        *off = o + 2;
        return ((uint32_t)(c & 0x1f) << 6) | (s[o + 1] & 0x3f);
    }
    if (!(c & 0x10)) {
        if (o + 2 >= n || (s[o + 1] & 0xc0) != 0x80 || (s[o + 2] & 0xc0) != 0x80) goto bad;
        *off = o + 3;
        return ((uint32_t)(c & 0x0f) << 12) | ((uint32_t)(s[o + 1] & 0x3f) << 6) | (s[o + 2] & 0x3f);
    }
    if (!(c & 0x08)) {
        if (o + 3 >= n || (s[o + 1] & 0xc0) != 0x80 || (s[o + 2] & 0xc0) != 0x80 ||
            (s[o + 3] & 0xc0) != 0x80)
            goto bad;
        *off = o + 4;
        return ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(s[o + 1] & 0x3f) << 12) |
               ((uint32_t)(s[o + 2] & 0x3f) << 6) | (s[o + 3] & 0x3f);
    }
bad:
    *off = o + 1;
    return 0xFFFD;
}

size_t tok_cpt_encode(uint32_t cpt, char *out)
{
    unsigned char *o = (unsigned char *)out;
    if (cpt <= 0x7f) {
        o[0] = (unsigned char)cpt;
        return 1;
    }
    if (cpt <= 0x7ff) {
        o[0] = (unsigned char)(0xc0 | (cpt >> 6));
        o[1] = (unsigned char)(0x80 | (cpt & 0x3f));
        return 2;
    }
    if (cpt > 0x10ffff) cpt = 0xFFFD;
    if (cpt <= 0xffff) {
        o[0] = (unsigned char)(0xe0 | (cpt >> 12));
        o[1] = (unsigned char)(0x80 | ((cpt >> 6) & 0x3f));
        o[2] = (unsigned char)(0x80 | (cpt & 0x3f));
        return 3;
    }
    o[0] = (unsigned char)(0xf0 | (cpt >> 18));
    o[1] = (unsigned char)(0x80 | ((cpt >> 12) & 0x3f));
    o[2] = (unsigned char)(0x80 | ((cpt >> 6) & 0x3f));
    o[3] = (unsigned char)(0x80 | (cpt & 0x3f));
    return 4;
}

bool tok_is_whitespace(uint32_t c)
{
    return (c >= 0x09 && c <= 0x0d) || c == 0x20 || c == 0x85 || c == 0xa0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f ||
           c == 0x205f || c == 0x3000;
}

/* ---- loading ------------------------------------------------------------------------------- */

static int get_str_opt(const gguf_ctx *g, const char *key, char **out, forge_err *err)
{
    *out = NULL;
    if (gguf_find_key(g, key) < 0) return FORGE_OK;
    gguf_str s;
    int rc = gguf_get_str(g, key, &s, err);
    if (rc) return forge_err_set(err, FORGE_E_FORMAT, "%s: key '%s' must be a string", gguf_path(g), key);
    *out = malloc(s.len + 1);
    if (!*out) return FORGE_E_NOMEM;
    memcpy(*out, s.data, s.len);
    (*out)[s.len] = 0;
    return FORGE_OK;
}

static int get_bool_opt(const gguf_ctx *g, const char *key, bool *v, forge_err *err)
{
    if (gguf_find_key(g, key) < 0) return FORGE_OK;
    if (gguf_get_bool(g, key, v, err))
        return forge_err_set(err, FORGE_E_FORMAT, "%s: key '%s' must be a bool", gguf_path(g), key);
    return FORGE_OK;
}

static void add_warning(struct forge_tok *t, const char *msg)
{
    size_t old = t->warning ? strlen(t->warning) : 0;
    char *w = realloc(t->warning, old + strlen(msg) + 3);
    if (!w) return;
    if (old) {
        w[old] = ';';
        w[old + 1] = ' ';
        strcpy(w + old + 2, msg);
    } else {
        strcpy(w, msg);
    }
    t->warning = w;
}

/* Read an optional special-token id key. Absent: keep *id. -1 / 0xFFFFFFFF: none. Out of range:
 * an error for the keys named `strict`, else keep the default (llama.cpp warns). */
static int get_special_id(struct forge_tok *t, const gguf_ctx *g, const char *key, int32_t *id,
                          bool strict, forge_err *err)
{
    if (gguf_find_key(g, key) < 0) return FORGE_OK;
    int64_t v;
    if (gguf_get_i64(g, key, &v, NULL)) {
        uint64_t u;
        if (gguf_get_u64(g, key, &u, NULL))
            return forge_err_set(err, FORGE_E_FORMAT, "%s: key '%s' must be an integer token id",
                                 gguf_path(g), key);
        v = u > (uint64_t)INT64_MAX ? -1 : (int64_t)u;
    }
    if (v == -1 || v == 0xFFFFFFFFll) {
        *id = -1;
        return FORGE_OK;
    }
    if (v < 0 || v >= t->n_vocab) {
        if (strict)
            return forge_err_set(err, FORGE_E_FORMAT,
                                 "%s: key '%s' = %lld is not a token id (n_vocab %d)", gguf_path(g),
                                 key, (long long)v, t->n_vocab);
        char msg[200];
        snprintf(msg, sizeof msg, "%s = %lld is out of range (n_vocab %d), ignored", key,
                 (long long)v, t->n_vocab);
        add_warning(t, msg);
        return FORGE_OK;
    }
    *id = (int32_t)v;
    return FORGE_OK;
}

static int load_tokens(struct forge_tok *t, const gguf_ctx *g, forge_err *err)
{
    gguf_type et;
    uint64_t n;
    if (gguf_find_key(g, K_TOKENS) < 0)
        return forge_err_set(err, FORGE_E_FORMAT, "%s: key '%s' not found (no vocabulary)",
                             gguf_path(g), K_TOKENS);
    if (gguf_get_arr(g, K_TOKENS, &et, &n, err) || et != GGUF_TYPE_STRING)
        return forge_err_set(err, FORGE_E_FORMAT, "%s: key '%s' must be an array of strings",
                             gguf_path(g), K_TOKENS);
    if (n == 0 || n > 0x7fffffff)
        return forge_err_set(err, FORGE_E_FORMAT, "%s: key '%s' has %llu tokens", gguf_path(g),
                             K_TOKENS, (unsigned long long)n);
    t->n_vocab = (int32_t)n;

    uint64_t total = 0;
    for (uint64_t i = 0; i < n; i++) {
        gguf_str s;
        if (gguf_get_arr_str(g, K_TOKENS, i, &s, err)) return FORGE_E_FORMAT;
        total += s.len ? s.len : 32;
    }
    if (total > 0xffffffffull)
        return forge_err_set(err, FORGE_E_FORMAT, "%s: key '%s': token texts too large",
                             gguf_path(g), K_TOKENS);
    t->text_arena = malloc(total + 1);
    t->text_off = malloc((n + 1) * sizeof *t->text_off);
    t->scores = calloc(n, sizeof *t->scores);
    t->attr = malloc(n * sizeof *t->attr);
    if (!t->text_arena || !t->text_off || !t->scores || !t->attr) return FORGE_E_NOMEM;
    uint32_t off = 0;
    for (uint64_t i = 0; i < n; i++) {
        gguf_str s;
        gguf_get_arr_str(g, K_TOKENS, i, &s, NULL);
        t->text_off[i] = off;
        if (s.len == 0) {
            off += (uint32_t)snprintf(t->text_arena + off, 32, "[EMPTY_%llu]", (unsigned long long)i);
        } else {
            memcpy(t->text_arena + off, s.data, s.len);
            off += (uint32_t)s.len;
        }
        if ((int32_t)(off - t->text_off[i]) > t->max_token_len)
            t->max_token_len = (int32_t)(off - t->text_off[i]);
        t->attr[i] = TOK_ATTR_NORMAL;
    }
    t->text_off[n] = off;

    int rc = map_init(&t->text_map, n);
    if (rc) return rc;
    for (int32_t i = 0; i < t->n_vocab; i++) {
        int32_t prev = text_map_insert(t, i);
        if (prev >= 0) {
            size_t len;
            const char *s = tok_text(t, i, &len);
            return forge_err_set(err, FORGE_E_FORMAT,
                                 "%s: key '%s': duplicate token '%.*s' at ids %d and %d",
                                 gguf_path(g), K_TOKENS, (int)(len > 64 ? 64 : len), s, prev, i);
        }
    }

    if (gguf_find_key(g, K_SCORES) >= 0) {
        uint64_t ns;
        if (gguf_get_arr(g, K_SCORES, &et, &ns, err) ||
            (et != GGUF_TYPE_FLOAT32 && et != GGUF_TYPE_INT32))
            return forge_err_set(err, FORGE_E_FORMAT, "%s: key '%s' must be an array of f32",
                                 gguf_path(g), K_SCORES);
        if (ns != n)
            return forge_err_set(err, FORGE_E_FORMAT, "%s: key '%s' has %llu entries, '%s' has %llu",
                                 gguf_path(g), K_SCORES, (unsigned long long)ns, K_TOKENS,
                                 (unsigned long long)n);
        if (gguf_copy_arr_f32(g, K_SCORES, t->scores, n, err))
            return forge_err_set(err, FORGE_E_FORMAT, "%s: key '%s' could not be read", gguf_path(g),
                                 K_SCORES);
    }
    if (gguf_find_key(g, K_TYPES) >= 0) {
        uint64_t nt;
        if (gguf_get_arr(g, K_TYPES, &et, &nt, err) ||
            !(et == GGUF_TYPE_INT32 || et == GGUF_TYPE_UINT32 || et == GGUF_TYPE_INT8 ||
              et == GGUF_TYPE_UINT8 || et == GGUF_TYPE_INT16 || et == GGUF_TYPE_UINT16))
            return forge_err_set(err, FORGE_E_FORMAT, "%s: key '%s' must be an array of i32",
                                 gguf_path(g), K_TYPES);
        if (nt != n)
            return forge_err_set(err, FORGE_E_FORMAT, "%s: key '%s' has %llu entries, '%s' has %llu",
                                 gguf_path(g), K_TYPES, (unsigned long long)nt, K_TOKENS,
                                 (unsigned long long)n);
        int32_t *types = malloc(n * sizeof *types);
        if (!types) return FORGE_E_NOMEM;
        if (gguf_copy_arr_i32(g, K_TYPES, types, n, err)) {
            free(types);
            return forge_err_set(err, FORGE_E_FORMAT, "%s: key '%s' could not be read", gguf_path(g),
                                 K_TYPES);
        }
        static const uint32_t type_attr[7] = {TOK_ATTR_UNDEFINED, TOK_ATTR_NORMAL,
                                              TOK_ATTR_UNKNOWN,   TOK_ATTR_CONTROL,
                                              TOK_ATTR_USER_DEFINED, TOK_ATTR_UNUSED,
                                              TOK_ATTR_BYTE};
        for (uint64_t i = 0; i < n; i++) {
            if (types[i] < 0 || types[i] > 6) {
                int bad = types[i];
                free(types);
                return forge_err_set(err, FORGE_E_FORMAT,
                                     "%s: key '%s'[%llu] = %d is not a token type (0..6)",
                                     gguf_path(g), K_TYPES, (unsigned long long)i, bad);
            }
            t->attr[i] = type_attr[types[i]];
        }
        free(types);
    }
    return FORGE_OK;
}

static int load_merges(struct forge_tok *t, const gguf_ctx *g, forge_err *err)
{
    gguf_type et;
    uint64_t n;
    if (gguf_find_key(g, K_MERGES) < 0)
        return forge_err_set(err, FORGE_E_FORMAT, "%s: key '%s' not found (BPE needs merges)",
                             gguf_path(g), K_MERGES);
    if (gguf_get_arr(g, K_MERGES, &et, &n, err) || et != GGUF_TYPE_STRING)
        return forge_err_set(err, FORGE_E_FORMAT, "%s: key '%s' must be an array of strings",
                             gguf_path(g), K_MERGES);
    if (n > 0x7ffffffe)
        return forge_err_set(err, FORGE_E_FORMAT, "%s: key '%s' has %llu merges", gguf_path(g),
                             K_MERGES, (unsigned long long)n);
    uint64_t total = 0;
    for (uint64_t i = 0; i < n; i++) {
        gguf_str s;
        if (gguf_get_arr_str(g, K_MERGES, i, &s, err)) return FORGE_E_FORMAT;
        total += s.len;
    }
    if (total > 0xffffffffull)
        return forge_err_set(err, FORGE_E_FORMAT, "%s: key '%s' too large", gguf_path(g), K_MERGES);
    t->merge_arena = malloc(total + 1);
    t->merge_off = malloc((n + 1) * sizeof *t->merge_off);
    t->merge_split = malloc((n + 1) * sizeof *t->merge_split);
    if (!t->merge_arena || !t->merge_off || !t->merge_split) return FORGE_E_NOMEM;
    int rc = map_init(&t->merge_map, n);
    if (rc) return rc;
    uint32_t off = 0;
    for (uint64_t i = 0; i < n; i++) {
        gguf_str s;
        gguf_get_arr_str(g, K_MERGES, i, &s, NULL);
        t->merge_off[i] = off;
        memcpy(t->merge_arena + off, s.data, s.len);
        off += (uint32_t)s.len;
        /* llama.cpp: split at the first space at position >= 1; no space: pair ("", "") */
        const char *sp = s.len > 1 ? memchr(s.data + 1, ' ', s.len - 1) : NULL;
        if (!sp) {
            t->merge_split[i] = UINT32_MAX;
            continue;
        }
        uint32_t m = (uint32_t)i;
        size_t ln = (size_t)(sp - s.data);
        t->merge_split[i] = (uint32_t)ln;
        uint32_t h = (uint32_t)merge_hash(s.data, ln, sp + 1, s.len - ln - 1) & t->merge_map.mask;
        for (;;) { /* first occurrence keeps its rank (std::unordered_map::emplace) */
            uint32_t e = t->merge_map.slots[h];
            if (!e) {
                t->merge_map.slots[h] = m + 1;
                break;
            }
            uint32_t o = e - 1;
            if (t->merge_off[o + 1] - t->merge_off[o] == s.len && t->merge_split[o] == ln &&
                !memcmp(t->merge_arena + t->merge_off[o], s.data, s.len))
                break;
            h = (h + 1) & t->merge_map.mask;
        }
        t->merge_off[i + 1] = off; /* needed by the compare above for later entries */
    }
    t->merge_off[n] = off;
    t->n_merges = (uint32_t)n;
    return FORGE_OK;
}

/* Parse "<0xHH>" (llama.cpp reads text.substr(3, 2) as hex). */
static int byte_token_value(const char *s, size_t n)
{
    if (n < 5) return -1;
    int v = 0;
    for (int k = 3; k < 5; k++) {
        char c = s[k];
        int d = (c >= '0' && c <= '9') ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10
                : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

/* Write the detokenized piece of id (special = true) to dst, or only count it when dst is NULL
 * (llama.cpp's token_to_piece). Returns its length. */
static size_t render_piece(const struct forge_tok *t, int32_t id, char *dst)
{
    static const char hex[] = "0123456789abcdef";
    size_t len, pos = 0;
    const char *s = tok_text(t, id, &len);
    uint32_t a = t->attr[id];
#define PUT(c) do { if (dst) dst[pos] = (char)(c); pos++; } while (0)
    if (a & (TOK_ATTR_UNKNOWN | TOK_ATTR_CONTROL | TOK_ATTR_USER_DEFINED)) {
        for (size_t k = 0; k < len; k++) PUT(s[k]);
    } else if (a & TOK_ATTR_NORMAL) {
        if (t->kind == TOK_BPE) { /* GPT-2 unicode -> bytes */
            for (size_t o = 0; o < len;) {
                uint32_t c = tok_cpt_decode(s, len, &o);
                int b = tok_gpt2_cpt_to_byte(c);
                if (b >= 0) {
                    PUT(b);
                    continue;
                }
                char u[4];
                size_t ul = tok_cpt_encode(c, u);
                for (const char *p = "[UNK_BYTE_0x"; *p; p++) PUT(*p);
                for (size_t k = 0; k < ul; k++) {
                    PUT(hex[(unsigned char)u[k] >> 4]);
                    PUT(hex[(unsigned char)u[k] & 15]);
                }
                for (size_t k = 0; k < len; k++) PUT(s[k]);
                PUT(']');
            }
        } else { /* SPM/WPM: U+2581 -> ' ' */
            for (size_t o = 0; o < len;) {
                if (o + 3 <= len && !memcmp(s + o, "\xe2\x96\x81", 3)) {
                    PUT(' ');
                    o += 3;
                } else {
                    PUT(s[o]);
                    o++;
                }
            }
        }
    } else if (a & TOK_ATTR_BYTE) {
        int v = byte_token_value(s, len);
        if (v >= 0) PUT(v);
    }
#undef PUT
    return pos;
}

static int build_pieces(struct forge_tok *t, const gguf_ctx *g, forge_err *err)
{
    uint64_t total = 0;
    for (int32_t id = 0; id < t->n_vocab; id++) total += render_piece(t, id, NULL);
    if (total >= 0xffffffffull)
        return forge_err_set(err, FORGE_E_FORMAT, "%s: key '%s': detokenized pieces too large",
                             gguf_path(g), K_TOKENS);
    t->piece_off = malloc(((size_t)t->n_vocab + 1) * sizeof *t->piece_off);
    t->piece_arena = malloc((size_t)total + 1);
    if (!t->piece_off || !t->piece_arena) return FORGE_E_NOMEM;
    size_t pos = 0;
    for (int32_t id = 0; id < t->n_vocab; id++) {
        t->piece_off[id] = (uint32_t)pos;
        pos += render_piece(t, id, t->piece_arena + pos);
    }
    t->piece_off[t->n_vocab] = (uint32_t)pos;
    return FORGE_OK;
}

static bool text_is(const struct forge_tok *t, int32_t id, const char *s)
{
    size_t len;
    const char *txt = tok_text(t, id, &len);
    return strlen(s) == len && !memcmp(txt, s, len);
}

/* First token (in list order) whose text is in `names`, or -1. */
static int32_t find_any(const struct forge_tok *t, const char *const *names)
{
    for (; *names; names++) {
        int32_t id = tok_find(t, *names, strlen(*names));
        if (id >= 0) return id;
    }
    return -1;
}

static int cmp_i32(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

static int cmp_special(const void *a, const void *b, void *ctx)
{
    const struct forge_tok *t = ctx;
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    uint32_t lx = t->text_off[x + 1] - t->text_off[x], ly = t->text_off[y + 1] - t->text_off[y];
    if (lx != ly) return lx > ly ? -1 : 1;
    return (x > y) - (x < y);
}

/* Stable merge sort with a context (qsort_r is not portable C11). */
static void sort_special(int32_t *v, size_t n, int32_t *tmp, const struct forge_tok *t)
{
    if (n < 2) return;
    size_t h = n / 2;
    sort_special(v, h, tmp, t);
    sort_special(v + h, n - h, tmp, t);
    size_t i = 0, j = h, k = 0;
    while (i < h && j < n) tmp[k++] = cmp_special(&v[j], &v[i], (void *)t) < 0 ? v[j++] : v[i++];
    while (i < h) tmp[k++] = v[i++];
    while (j < n) tmp[k++] = v[j++];
    memcpy(v, tmp, n * sizeof *v);
}

/* Strict UTF-8 validity of s[0..n). */
static bool utf8_valid(const unsigned char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        size_t off = i;
        uint32_t c = tok_cpt_decode((const char *)s, n, &off);
        size_t l = off - i;
        if (c == 0xFFFD && !(l == 3 && s[i] == 0xef && s[i + 1] == 0xbf && s[i + 2] == 0xbd)) return false;
        if ((l == 2 && c < 0x80) || (l == 3 && c < 0x800) || (l == 4 && c < 0x10000) ||
            (c >= 0xd800 && c <= 0xdfff) || c > 0x10ffff)
            return false;
        i = off;
    }
    return true;
}

/* SPM: true when every token is valid UTF-8 wherever it holds U+2581 past its first character,
 * and each such U+2581 follows another U+2581 (see tok_spm.c). */
static bool spm_split_ok(const struct forge_tok *t)
{
    for (int32_t id = 0; id < t->n_vocab; id++) {
        size_t n;
        const char *s = tok_text(t, id, &n);
        bool inner = false;
        for (size_t k = 1; k + 3 <= n && !inner; k++)
            inner = !memcmp(s + k, "\xe2\x96\x81", 3);
        if (!inner) continue;
        if (!utf8_valid((const unsigned char *)s, n)) return false;
        for (size_t k = 1; k + 3 <= n; k++)
            if (!memcmp(s + k, "\xe2\x96\x81", 3) && (k < 3 || memcmp(s + k - 3, "\xe2\x96\x81", 3)))
                return false;
    }
    return true;
}

static int detect_specials(struct forge_tok *t, const gguf_ctx *g, forge_err *err)
{
    int rc;
    int32_t fim_pre = -1, fim_suf = -1, fim_mid = -1, fim_pad = -1, fim_rep = -1, fim_sep = -1;
    int32_t mask = -1;
    struct { const char *key; int32_t *id; bool strict; } keys[] = {
        {"tokenizer.ggml.bos_token_id", &t->bos, true},
        {"tokenizer.ggml.eos_token_id", &t->eos, true},
        {"tokenizer.ggml.eot_token_id", &t->eot, true},
        {"tokenizer.ggml.eom_token_id", &t->eom, true},
        {"tokenizer.ggml.unknown_token_id", &t->unk, true},
        {"tokenizer.ggml.seperator_token_id", &t->sep, false},
        {"tokenizer.ggml.padding_token_id", &t->pad, false},
        {"tokenizer.ggml.mask_token_id", &mask, false},
        {"tokenizer.ggml.fim_pre_token_id", &fim_pre, false},
        {"tokenizer.ggml.fim_suf_token_id", &fim_suf, false},
        {"tokenizer.ggml.fim_mid_token_id", &fim_mid, false},
        {"tokenizer.ggml.fim_pad_token_id", &fim_pad, false},
        {"tokenizer.ggml.fim_rep_token_id", &fim_rep, false},
        {"tokenizer.ggml.fim_sep_token_id", &fim_sep, false},
        {"tokenizer.ggml.prefix_token_id", &fim_pre, false},
        {"tokenizer.ggml.suffix_token_id", &fim_suf, false},
        {"tokenizer.ggml.middle_token_id", &fim_mid, false},
    };
    for (size_t i = 0; i < FORGE_ARRAY_LEN(keys); i++) {
        if (*keys[i].id >= t->n_vocab) *keys[i].id = -1; /* default out of range: disabled */
        if ((rc = get_special_id(t, g, keys[i].key, keys[i].id, keys[i].strict, err))) return rc;
    }

    if ((rc = get_bool_opt(g, "tokenizer.ggml.add_bos_token", &t->add_bos, err))) return rc;
    if ((rc = get_bool_opt(g, "tokenizer.ggml.add_eos_token", &t->add_eos, err))) return rc;
    if (t->add_bos && t->bos < 0)
        return forge_err_set(err, FORGE_E_FORMAT,
                             "%s: tokenizer.ggml.add_bos_token is true, but "
                             "tokenizer.ggml.bos_token_id is not set", gguf_path(g));
    if (t->add_eos && t->eos < 0)
        return forge_err_set(err, FORGE_E_FORMAT,
                             "%s: tokenizer.ggml.add_eos_token is true, but "
                             "tokenizer.ggml.eos_token_id is not set", gguf_path(g));

    /* Detection by text; the token found becomes a control token (llama.cpp does the same). */
    static const char *const eot_names[] = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>",
        "<|endoftext|>", "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]",
        "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>", "<end_of_utterance>", NULL};
    static const char *const eom_names[] = {"<|eom_id|>", NULL};
    static const char *const pre_names[] = {"<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>",
        "<\xef\xbd\x9c" "fim\xe2\x96\x81" "begin\xef\xbd\x9c>", "<PRE>", "\xe2\x96\x81<PRE>",
        "<|code_prefix|>", "<|prefix|>", NULL};
    static const char *const suf_names[] = {"<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>",
        "<\xef\xbd\x9c" "fim\xe2\x96\x81hole\xef\xbd\x9c>", "<SUF>", "\xe2\x96\x81<SUF>",
        "<|code_suffix|>", "<|suffix|>", NULL};
    static const char *const mid_names[] = {"<|fim_middle|>", "<fim-middle>", "<fim_middle>",
        "<\xef\xbd\x9c" "fim\xe2\x96\x81" "end\xef\xbd\x9c>", "<MID>", "\xe2\x96\x81<MID>",
        "<|code_middle|>", "<|middle|>", NULL};
    static const char *const pad_names[] = {"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]", NULL};
    static const char *const rep_names[] = {"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>",
        "<reponame>", NULL};
    static const char *const sep_names[] = {"<|file_sep|>", NULL};
    struct { int32_t *id; const char *const *names; } det[] = {
        {&t->eot, eot_names}, {&t->eom, eom_names}, {&fim_pre, pre_names}, {&fim_suf, suf_names},
        {&fim_mid, mid_names}, {&fim_pad, pad_names}, {&fim_rep, rep_names}, {&fim_sep, sep_names},
    };
    for (size_t i = 0; i < FORGE_ARRAY_LEN(det); i++) {
        if (*det[i].id >= 0) continue;
        *det[i].id = find_any(t, det[i].names);
        if (*det[i].id >= 0) t->attr[*det[i].id] |= TOK_ATTR_CONTROL;
    }

    /* end-of-generation set */
    static const char *const eog_names[] = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>",
        "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>", "<|endoftext|>", "</s>",
        "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
        "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
        "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>", "[e~[", NULL};
    size_t cap = 32;
    t->eog = malloc(cap * sizeof *t->eog);
    if (!t->eog) return FORGE_E_NOMEM;
    int32_t cand[40];
    size_t nc = 0;
    cand[nc++] = fim_pad;
    cand[nc++] = fim_rep;
    cand[nc++] = fim_sep;
    for (const char *const *p = eog_names; *p; p++) {
        int32_t id = tok_find(t, *p, strlen(*p));
        if (id >= 0) {
            t->attr[id] |= TOK_ATTR_CONTROL;
            cand[nc++] = id;
        }
    }
    /* gpt-oss: these are always rendered (user-defined) */
    static const char *const ud_names[] = {"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>", NULL};
    for (const char *const *p = ud_names; *p; p++) {
        int32_t id = tok_find(t, *p, strlen(*p));
        if (id >= 0) t->attr[id] = TOK_ATTR_USER_DEFINED;
    }
    cand[nc++] = t->eos;
    cand[nc++] = t->eot;
    cand[nc++] = t->eom;
    for (size_t i = 0; i < nc; i++) {
        if (cand[i] < 0) continue;
        bool dup = false;
        for (size_t k = 0; k < t->n_eog; k++) dup |= t->eog[k] == cand[i];
        if (!dup) t->eog[t->n_eog++] = cand[i];
    }
    /* o200k_harmony / solar-open: <|end|> is not end-of-generation when <|return|>/<|call|> exist */
    {
        bool has_return = false, has_call = false, has_flush = false;
        int32_t end_id = -1;
        for (size_t k = 0; k < t->n_eog; k++) {
            int32_t id = t->eog[k];
            if (text_is(t, id, "<|return|>")) has_return = true;
            else if (text_is(t, id, "<|call|>") || text_is(t, id, "<|calls|>")) has_call = true;
            else if (text_is(t, id, "<|flush|>")) has_flush = true;
            else if (text_is(t, id, "<|end|>")) end_id = id;
        }
        if (end_id >= 0 && ((has_return && has_call) || (has_call && has_flush))) {
            size_t w = 0;
            for (size_t k = 0; k < t->n_eog; k++)
                if (t->eog[k] != end_id) t->eog[w++] = t->eog[k];
            t->n_eog = w;
            t->attr[end_id] = TOK_ATTR_USER_DEFINED;
        }
    }
    qsort(t->eog, t->n_eog, sizeof *t->eog, cmp_i32);

    /* special tokens for partitioning, longest text first (ties: lower id first) */
    size_t ns = 0;
    for (int32_t id = 0; id < t->n_vocab; id++)
        if (t->attr[id] & (TOK_ATTR_CONTROL | TOK_ATTR_USER_DEFINED | TOK_ATTR_UNKNOWN)) ns++;
    t->special = malloc((ns ? ns : 1) * sizeof *t->special);
    int32_t *tmp = malloc((ns ? ns : 1) * sizeof *tmp);
    if (!t->special || !tmp) {
        free(tmp);
        return FORGE_E_NOMEM;
    }
    for (int32_t id = 0; id < t->n_vocab; id++)
        if (t->attr[id] & (TOK_ATTR_CONTROL | TOK_ATTR_USER_DEFINED | TOK_ATTR_UNKNOWN))
            t->special[t->n_special++] = id;
    sort_special(t->special, t->n_special, tmp, t);
    free(tmp);
    return FORGE_OK;
}

/* Per-model attributes llama.cpp sets by name (after the piece cache is built). */
static int model_attrs(struct forge_tok *t, const gguf_ctx *g, forge_err *err)
{
    char *name = NULL, *arch = NULL;
    int rc;
    if ((rc = get_str_opt(g, "general.name", &name, err))) goto done;
    if ((rc = get_str_opt(g, "general.architecture", &arch, err))) goto done;
    if (name)
        for (char *p = name; *p; p++) *p = (char)tolower((unsigned char)*p);
    const char *pre = t->pre_name ? t->pre_name : "";
    if (strstr(pre, "jina-v2-de") || strstr(pre, "jina-v2-es") || strstr(pre, "jina-v2-code") ||
        (arch && (strstr(arch, "nomic-bert-moe") || strstr(arch, "jina-bert-v3")))) {
        int32_t id = tok_find(t, "<mask>", 6);
        if (id >= 0) t->attr[id] |= TOK_ATTR_LSTRIP;
    } else if (name && (strstr(name, "phi-3") || strstr(name, "phi3"))) {
        for (size_t i = 0; i < t->n_special; i++) t->attr[t->special[i]] |= TOK_ATTR_RSTRIP;
        int32_t id = tok_find(t, "</s>", 4);
        if (id >= 0) t->attr[id] |= TOK_ATTR_RSTRIP;
        static const char *const no[] = {"<unk>", "<s>", "<|endoftext|>"};
        for (size_t i = 0; i < 3; i++) {
            id = tok_find(t, no[i], strlen(no[i]));
            if (id >= 0) t->attr[id] &= ~(uint32_t)TOK_ATTR_RSTRIP;
        }
    } else if (name && strstr(name, "modern-bert")) {
        int32_t id = tok_find(t, "[MASK]", 6);
        if (id >= 0) t->attr[id] |= TOK_ATTR_LSTRIP;
    }
    rc = FORGE_OK;
done:
    free(name);
    free(arch);
    return rc;
}

int forge_tok_load(const struct gguf_ctx *g, forge_tok **out, struct forge_err *err)
{
    struct forge_tok *t = NULL;
    char *model = NULL;
    int rc;
    if (!out) return forge_err_set(err, FORGE_E_INVALID, "forge_tok_load: out is NULL");
    *out = NULL;
    if (!g) return forge_err_set(err, FORGE_E_INVALID, "forge_tok_load: gguf is NULL");
    t = calloc(1, sizeof *t);
    if (!t) return forge_err_set(err, FORGE_E_NOMEM, "forge_tok_load: out of memory");

    if (gguf_find_key(g, K_MODEL) < 0) {
        rc = forge_err_set(err, FORGE_E_FORMAT, "%s: key '%s' not found (no tokenizer)",
                           gguf_path(g), K_MODEL);
        goto fail;
    }
    if ((rc = get_str_opt(g, K_MODEL, &model, err))) goto fail;
    if ((rc = get_str_opt(g, K_PRE, &t->pre_name, err))) goto fail;
    if (!strcmp(model, "llama")) {
        t->kind = TOK_SPM;
        t->bos = 1, t->eos = 2, t->unk = 0, t->sep = -1, t->pad = -1;
        t->add_space_prefix = true;
        t->add_bos = true;
    } else if (!strcmp(model, "gpt2")) {
        t->kind = TOK_BPE;
        t->bos = 11, t->eos = 11, t->unk = -1, t->sep = -1, t->pad = -1;
        t->clean_spaces = true;
    } else if (!strcmp(model, "bert")) {
        t->kind = TOK_WPM;
        t->bos = 101, t->eos = -1, t->unk = 100, t->sep = 102, t->pad = 0;
        t->add_bos = true;
        t->clean_spaces = true;
    } else {
        rc = forge_err_set(err, FORGE_E_UNSUPPORTED, "%s: key '%s' = '%s': tokenizer not supported "
                           "(supported: llama, gpt2, bert)", gguf_path(g), K_MODEL, model);
        goto fail;
    }
    snprintf(t->model_name, sizeof t->model_name, "%s", model);
    t->eot = t->eom = -1;

    if ((rc = load_tokens(t, g, err))) goto fail;
    if (t->kind == TOK_BPE) {
        if ((rc = load_merges(t, g, err))) goto fail;
        bool known = true;
        if ((rc = tok_pre_create(t, t->pre_name, &known, err))) goto fail;
        if (!t->pre_name || !t->pre_name[0])
            add_warning(t, "tokenizer.ggml.pre is missing, using the 'default' pre-tokenizer "
                           "(the reference warns that quality may suffer)");
        if (!known) {
            char msg[300];
            snprintf(msg, sizeof msg, "unknown pre-tokenizer '%.200s' (%s), using 'default'",
                     t->pre_name, K_PRE);
            add_warning(t, msg);
        }
    }
    if ((rc = get_bool_opt(g, "tokenizer.ggml.add_space_prefix", &t->add_space_prefix, err))) goto fail;

    for (int b = 0; b < 256; b++) {
        char buf[8];
        int32_t id = -1;
        if (t->kind == TOK_BPE) {
            size_t n = tok_cpt_encode(tok_gpt2_byte_to_cpt((unsigned char)b), buf);
            id = tok_find(t, buf, n);
        } else {
            snprintf(buf, sizeof buf, "<0x%02X>", b);
            id = tok_find(t, buf, 6);
            if (id < 0) {
                buf[0] = (char)b;
                id = tok_find(t, buf, 1);
            }
        }
        t->byte_tok[b] = id;
    }

    if (t->kind == TOK_SPM) t->spm_split = spm_split_ok(t);
    if ((rc = detect_specials(t, g, err))) goto fail;
    if ((rc = build_pieces(t, g, err))) goto fail;
    if ((rc = model_attrs(t, g, err))) goto fail;
    free(model);
    *out = t;
    return FORGE_OK;
fail:
    if (rc == FORGE_E_NOMEM) forge_err_set(err, rc, "forge_tok_load: out of memory");
    free(model);
    forge_tok_free(t);
    return rc;
}

void forge_tok_free(forge_tok *t)
{
    if (!t) return;
    free(t->pre_name);
    free(t->warning);
    free(t->text_arena);
    free(t->text_off);
    free(t->scores);
    free(t->attr);
    free(t->text_map.slots);
    free(t->piece_arena);
    free(t->piece_off);
    free(t->merge_arena);
    free(t->merge_off);
    free(t->merge_split);
    free(t->merge_map.slots);
    tok_pre_free(t->pre);
    free(t->eog);
    free(t->special);
    free(t);
}

/* ---- queries ------------------------------------------------------------------------------- */

const char *forge_tok_warning(const forge_tok *t) { return t ? t->warning : NULL; }
int32_t forge_tok_n_vocab(const forge_tok *t) { return t ? t->n_vocab : 0; }
const char *forge_tok_model_name(const forge_tok *t) { return t ? t->model_name : ""; }
int32_t forge_tok_bos(const forge_tok *t) { return t ? t->bos : -1; }
int32_t forge_tok_eos(const forge_tok *t) { return t ? t->eos : -1; }
int32_t forge_tok_eot(const forge_tok *t) { return t ? t->eot : -1; }

bool forge_tok_is_eog(const forge_tok *t, int32_t id)
{
    if (!t || id < 0) return false;
    return bsearch(&id, t->eog, t->n_eog, sizeof *t->eog, cmp_i32) != NULL;
}

bool forge_tok_adds_bos(const forge_tok *t)
{
    if (!t) return false;
    if (t->kind == TOK_WPM) return t->bos >= 0;
    return t->add_bos && t->bos >= 0;
}

bool forge_tok_adds_eos(const forge_tok *t) { return t && t->add_eos && t->eos >= 0; }

int forge_tok_token_type(const forge_tok *t, int32_t id)
{
    if (!t || id < 0 || id >= t->n_vocab) return 0;
    uint32_t a = t->attr[id];
    if (a & TOK_ATTR_CONTROL) return FORGE_TOK_CONTROL;
    if (a & TOK_ATTR_USER_DEFINED) return FORGE_TOK_USER_DEFINED;
    if (a & TOK_ATTR_UNKNOWN) return FORGE_TOK_UNKNOWN;
    if (a & TOK_ATTR_BYTE) return FORGE_TOK_BYTE;
    if (a & TOK_ATTR_UNUSED) return FORGE_TOK_UNUSED;
    if (a & TOK_ATTR_NORMAL) return FORGE_TOK_NORMAL;
    return FORGE_TOK_UNDEFINED;
}

const char *forge_tok_text(const forge_tok *t, int32_t id, size_t *len)
{
    if (!t || id < 0 || id >= t->n_vocab) return NULL;
    return tok_text(t, id, len);
}

int32_t forge_tok_lookup(const forge_tok *t, const char *text, size_t len)
{
    return t ? tok_find(t, text, len) : -1;
}

const char *forge_tok_pre_name(const forge_tok *t) { return t && t->pre_name ? t->pre_name : ""; }

const char *forge_tok_piece(const forge_tok *t, int32_t id, bool special, size_t *len)
{
    *len = 0;
    if (!t || id < 0 || id >= t->n_vocab) return NULL;
    if (!special && (t->attr[id] & (TOK_ATTR_UNKNOWN | TOK_ATTR_CONTROL))) return "";
    *len = t->piece_off[id + 1] - t->piece_off[id];
    return t->piece_arena + t->piece_off[id];
}

/* ---- encode -------------------------------------------------------------------------------- */

/* First occurrence of needle (nl >= 1 bytes) in hay[0..hl), or NULL (memmem is not C11). */
static const char *find_bytes(const char *hay, size_t hl, const char *needle, size_t nl)
{
    if (nl > hl) return NULL;
    const char *end = hay + (hl - nl) + 1;
    const char *p = hay;
    while (p < end) {
        p = memchr(p, needle[0], (size_t)(end - p));
        if (!p) return NULL;
        if (!memcmp(p, needle, nl)) return p;
        p++;
    }
    return NULL;
}

typedef struct frag {
    int32_t token; /* -1: raw text */
    size_t off, len;
} frag;

typedef struct frag_vec {
    frag *v;
    size_t n, cap;
} frag_vec;

static int frag_push(frag_vec *f, int32_t token, size_t off, size_t len)
{
    if (f->n == f->cap) {
        size_t cap = f->cap ? f->cap * 2 : 16;
        frag *v = realloc(f->v, cap * sizeof *v);
        if (!v) return FORGE_E_NOMEM;
        f->v = v;
        f->cap = cap;
    }
    f->v[f->n++] = (frag){token, off, len};
    return FORGE_OK;
}

/* llama.cpp's tokenizer_st_partition: for each special token (longest first), split every raw
 * fragment at each of its occurrences, left to right. */
static int partition(const struct forge_tok *t, const char *text, size_t len, bool parse_special,
                     frag_vec *frags)
{
    frag_vec next = {0};
    int rc = FORGE_OK;
    if ((rc = frag_push(frags, -1, 0, len))) goto done;
    for (size_t si = 0; si < t->n_special; si++) {
        int32_t id = t->special[si];
        uint32_t a = t->attr[id];
        if (!parse_special && (a & (TOK_ATTR_CONTROL | TOK_ATTR_UNKNOWN))) continue;
        size_t tl;
        const char *tt = tok_text(t, id, &tl);
        if (tl == 0) continue;
        bool any = false;
        for (size_t fi = 0; fi < frags->n && !any; fi++)
            if (frags->v[fi].token < 0 && frags->v[fi].len >= tl &&
                find_bytes(text + frags->v[fi].off, frags->v[fi].len, tt, tl))
                any = true;
        if (!any) continue;
        next.n = 0;
        for (size_t fi = 0; fi < frags->n; fi++) {
            frag f = frags->v[fi];
            if (f.token >= 0) {
                if ((rc = frag_push(&next, f.token, 0, 0))) goto done;
                continue;
            }
            size_t off = f.off, flen = f.len;
            for (;;) {
                const char *m = find_bytes(text + off, flen, tt, tl);
                if (!m) {
                    if (flen > 0 && (rc = frag_push(&next, -1, off, flen))) goto done;
                    break;
                }
                size_t mpos = (size_t)(m - text);
                size_t left = mpos - off;
                if (a & TOK_ATTR_LSTRIP)
                    while (left > 0 && isspace((unsigned char)text[off + left - 1])) left--;
                if (left > 0 && (rc = frag_push(&next, -1, off, left))) goto done;
                if ((rc = frag_push(&next, id, 0, 0))) goto done;
                size_t roff = mpos + tl, rlen = off + flen - roff;
                if (a & TOK_ATTR_RSTRIP)
                    while (rlen > 0 && isspace((unsigned char)text[roff])) roff++, rlen--;
                off = roff;
                flen = rlen;
                if (flen == 0) break;
            }
        }
        frag_vec swap = *frags;
        *frags = next;
        next = swap;
    }
done:
    free(next.v);
    return rc;
}

int forge_tok_encode(const forge_tok *t, const char *text, size_t len, bool add_special,
                     bool parse_special, int32_t **ids, size_t *n_ids, struct forge_err *err)
{
    tok_ids out = {0};
    frag_vec frags = {0};
    char *buf = NULL;
    int rc = FORGE_OK;
    if (!ids || !n_ids) return forge_err_set(err, FORGE_E_INVALID, "forge_tok_encode: NULL output");
    *ids = NULL;
    *n_ids = 0;
    if (!t || (!text && len)) return forge_err_set(err, FORGE_E_INVALID, "forge_tok_encode: NULL argument");

    if (len > 0 && (rc = partition(t, text, len, parse_special, &frags))) goto fail;

    if (t->kind == TOK_SPM) {
        bool prev_special = true;
        if (add_special && t->add_bos && (rc = tok_ids_push(&out, t->bos))) goto fail;
        for (size_t i = 0; i < frags.n; i++) {
            frag f = frags.v[i];
            if (f.token >= 0) {
                if ((rc = tok_ids_push(&out, f.token))) goto fail;
                prev_special = true;
                continue;
            }
            /* escape spaces as U+2581, with the space prefix after a special token/start */
            size_t n_sp = (t->add_space_prefix && prev_special) ? 1 : 0;
            for (size_t k = 0; k < f.len; k++) n_sp += text[f.off + k] == ' ';
            if (f.len + 1 > (SIZE_MAX - 4) / 3) { rc = FORGE_E_RANGE; goto fail; }
            char *nb = realloc(buf, f.len + 2 * n_sp + 4);
            if (!nb) { rc = FORGE_E_NOMEM; goto fail; }
            buf = nb;
            size_t o = 0;
            if (t->add_space_prefix && prev_special) {
                memcpy(buf, "\xe2\x96\x81", 3);
                o = 3;
            }
            for (size_t k = 0; k < f.len; k++) {
                char c = text[f.off + k];
                if (c == ' ') {
                    memcpy(buf + o, "\xe2\x96\x81", 3);
                    o += 3;
                } else {
                    buf[o++] = c;
                }
            }
            if ((rc = tok_spm_encode(t, buf, o, &out))) goto fail;
            prev_special = false;
        }
        if (add_special && t->add_eos && (rc = tok_ids_push(&out, t->eos))) goto fail;
    } else if (t->kind == TOK_BPE) {
        if (add_special && t->add_bos && (rc = tok_ids_push(&out, t->bos))) goto fail;
        for (size_t i = 0; i < frags.n; i++) {
            frag f = frags.v[i];
            if (f.token >= 0) rc = tok_ids_push(&out, f.token);
            else rc = tok_bpe_encode(t, text + f.off, f.len, &out, err);
            if (rc) goto fail;
        }
        if (add_special && t->add_eos && (rc = tok_ids_push(&out, t->eos))) goto fail;
    } else {
        if (add_special && t->bos >= 0 && (rc = tok_ids_push(&out, t->bos))) goto fail;
        for (size_t i = 0; i < frags.n; i++) {
            frag f = frags.v[i];
            if (f.token >= 0) rc = tok_ids_push(&out, f.token);
            else rc = tok_wpm_encode(t, text + f.off, f.len, &out);
            if (rc) goto fail;
        }
        if (add_special && t->sep >= 0 && (rc = tok_ids_push(&out, t->sep))) goto fail;
    }
    free(frags.v);
    free(buf);
    *ids = out.v;
    *n_ids = out.n;
    if (!*ids) *ids = malloc(sizeof(int32_t)); /* a valid pointer even for no tokens */
    if (!*ids) return forge_err_set(err, FORGE_E_NOMEM, "forge_tok_encode: out of memory");
    return FORGE_OK;
fail:
    free(frags.v);
    free(buf);
    free(out.v);
    if (rc == FORGE_E_NOMEM) return forge_err_set(err, rc, "forge_tok_encode: out of memory");
    if (rc == FORGE_E_RANGE && err && !err->code)
        return forge_err_set(err, rc, "forge_tok_encode: input of %zu bytes too large", len);
    return rc;
}

/* ---- decode -------------------------------------------------------------------------------- */

int forge_tok_decode(const forge_tok *t, const int32_t *ids, size_t n_ids, bool special,
                     bool remove_leading_space, char **out, size_t *out_len, struct forge_err *err)
{
    if (!out || !out_len) return forge_err_set(err, FORGE_E_INVALID, "forge_tok_decode: NULL output");
    *out = NULL;
    *out_len = 0;
    if (!t || (!ids && n_ids)) return forge_err_set(err, FORGE_E_INVALID, "forge_tok_decode: NULL argument");
    size_t total = 0;
    for (size_t i = 0; i < n_ids; i++) {
        if (ids[i] < 0 || ids[i] >= t->n_vocab)
            return forge_err_set(err, FORGE_E_RANGE, "forge_tok_decode: ids[%zu] = %d is not a token "
                                 "id (n_vocab %d)", i, ids[i], t->n_vocab);
        size_t pl;
        forge_tok_piece(t, ids[i], special, &pl);
        total += pl;
    }
    char *s = malloc(total + 1);
    if (!s) return forge_err_set(err, FORGE_E_NOMEM, "forge_tok_decode: out of memory");
    size_t o = 0;
    bool strip = remove_leading_space && t->add_space_prefix;
    for (size_t i = 0; i < n_ids; i++) {
        size_t pl;
        const char *p = forge_tok_piece(t, ids[i], special, &pl);
        if (pl == 0) continue;
        if (strip && p[0] == ' ') p++, pl--;
        strip = false;
        memcpy(s + o, p, pl);
        o += pl;
    }
    s[o] = 0;
    *out = s;
    *out_len = o;
    return FORGE_OK;
}

/* ---- streaming detokenizer ----------------------------------------------------------------- */

struct forge_detok_stream {
    const forge_tok *tok;
    bool special;
    char pend[8];  /* an incomplete UTF-8 sequence carried to the next push (at most 3 bytes) */
    size_t n_pend;
    char *buf;     /* output of the last call */
    size_t cap;
};

/* Strict UTF-8 check at s[0..n): 1 = complete valid sequence of *len bytes; 0 = a valid but
 * truncated prefix (needs more bytes); -1 = invalid, *len bytes to replace by U+FFFD. */
static int utf8_check(const unsigned char *s, size_t n, size_t *len)
{
    unsigned char c = s[0];
    size_t need;
    unsigned char lo = 0x80, hi = 0xbf;
    if (c < 0x80) { *len = 1; return 1; }
    if (c >= 0xc2 && c <= 0xdf) need = 1;
    else if (c >= 0xe0 && c <= 0xef) {
        need = 2;
        if (c == 0xe0) lo = 0xa0;
        if (c == 0xed) hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        need = 3;
        if (c == 0xf0) lo = 0x90;
        if (c == 0xf4) hi = 0x8f;
    } else {
        *len = 1;
        return -1;
    }
    for (size_t k = 1; k <= need; k++) {
        if (k >= n) return 0;
        unsigned char b = s[k];
        unsigned char l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xbf;
        if (b < l || b > h) {
            *len = k;
            return -1;
        }
    }
    *len = need + 1;
    return 1;
}

int forge_detok_stream_create(const forge_tok *tok, bool special, forge_detok_stream **out,
                              struct forge_err *err)
{
    if (!out) return forge_err_set(err, FORGE_E_INVALID, "forge_detok_stream_create: out is NULL");
    *out = NULL;
    if (!tok) return forge_err_set(err, FORGE_E_INVALID, "forge_detok_stream_create: tok is NULL");
    forge_detok_stream *s = calloc(1, sizeof *s);
    if (!s) return forge_err_set(err, FORGE_E_NOMEM, "forge_detok_stream_create: out of memory");
    s->tok = tok;
    s->special = special;
    *out = s;
    return FORGE_OK;
}

void forge_detok_stream_free(forge_detok_stream *s)
{
    if (!s) return;
    free(s->buf);
    free(s);
}

static bool stream_reserve(forge_detok_stream *s, size_t need)
{
    if (need <= s->cap) return true;
    size_t cap = s->cap ? s->cap : 64;
    while (cap < need) cap *= 2;
    char *b = realloc(s->buf, cap);
    if (!b) return false;
    s->buf = b;
    s->cap = cap;
    return true;
}

/* Validate pend+piece into s->buf; keep a trailing incomplete sequence unless final. */
static const char *stream_emit(forge_detok_stream *s, const char *piece, size_t pl, bool final,
                               size_t *len)
{
    size_t n = s->n_pend + pl;
    *len = 0;
    /* worst case every byte becomes U+FFFD (3 bytes) */
    if (!stream_reserve(s, 2 * n + n + 4 + n)) return "";
    unsigned char *in = (unsigned char *)s->buf + 3 * n + 4;
    memcpy(in, s->pend, s->n_pend);
    if (pl) memcpy(in + s->n_pend, piece, pl);
    s->n_pend = 0;
    size_t i = 0, o = 0;
    while (i < n) {
        size_t l = 0;
        int r = utf8_check(in + i, n - i, &l);
        if (r == 1) {
            memmove(s->buf + o, in + i, l);
            o += l;
            i += l;
        } else if (r == 0 && !final) {
            memcpy(s->pend, in + i, n - i);
            s->n_pend = n - i;
            break;
        } else {
            if (r == 0) l = n - i;
            memcpy(s->buf + o, "\xef\xbf\xbd", 3);
            o += 3;
            i += l;
        }
    }
    *len = o;
    return s->buf;
}

const char *forge_detok_stream_push(forge_detok_stream *s, int32_t id, size_t *len)
{
    *len = 0;
    if (!s) return "";
    size_t pl = 0;
    const char *p = forge_tok_piece(s->tok, id, s->special, &pl);
    if (!p) return "";
    return stream_emit(s, p, pl, false, len);
}

const char *forge_detok_stream_flush(forge_detok_stream *s, size_t *len)
{
    *len = 0;
    if (!s) return "";
    return stream_emit(s, NULL, 0, true, len);
}
