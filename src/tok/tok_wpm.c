/* tok_wpm.c - WordPiece (tokenizer.ggml.model "bert"), as llama.cpp's llm_tokenizer_wpm_session:
 * BERT normalization (canonical decomposition reduced to its first code point, accents (Mn)
 * stripped, lowercase, control characters dropped), split at whitespace and around punctuation,
 * ASCII symbols and CJK ideographs, then greedy longest-match per word with the U+2581 "phantom
 * space" prefix the GGUF converter gives word-initial tokens; a word with an unmatched remainder
 * becomes [UNK]. Unicode properties come from utf8proc. */
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "tok/tok_internal.h"

static bool is_chinese_char(uint32_t c)
{
    return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) ||
           (c >= 0x20000 && c <= 0x2A6DF) || (c >= 0x2A700 && c <= 0x2B73F) ||
           (c >= 0x2B740 && c <= 0x2B81F) || (c >= 0x2B920 && c <= 0x2CEAF) ||
           (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
}

static utf8proc_category_t category(uint32_t c)
{
    if (c > 0x10FFFF) return UTF8PROC_CATEGORY_CN;
    return utf8proc_category((utf8proc_int32_t)c);
}

/* First code point of the canonical decomposition (llama.cpp's unicode_cpts_normalize_nfd). */
static uint32_t nfd_first(uint32_t c)
{
    if (c < 0xC0 || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) return c;
    utf8proc_int32_t buf[8];
    int last = 0;
    utf8proc_ssize_t n = utf8proc_decompose_char((utf8proc_int32_t)c, buf, 8, UTF8PROC_DECOMPOSE, &last);
    return n >= 1 ? (uint32_t)buf[0] : c;
}

/* Greedy longest-match of one word (already prefixed with U+2581). */
static int wordpiece(const struct forge_tok *t, const char *w, size_t n, tok_ids *out)
{
    size_t start = out->n;
    int rc;
    for (size_t i = 0; i < n; i++) {
        bool match = false;
        size_t jmax = i + (size_t)t->max_token_len + 1;
        if (jmax > n) jmax = n;
        for (size_t j = jmax; j > i; j--) {
            int32_t id = tok_find(t, w + i, j - i);
            if (id >= 0) {
                if ((rc = tok_ids_push(out, id))) return rc;
                match = true;
                i = j - 1;
                break;
            }
        }
        if (!match) {
            out->n = start; /* discard the whole word */
            break;
        }
    }
    if (out->n == start && t->unk >= 0) return tok_ids_push(out, t->unk);
    return FORGE_OK;
}

int tok_wpm_encode(const struct forge_tok *t, const char *text, size_t len, tok_ids *out)
{
    char *w = malloc(4 * len + 8);
    if (!w) return FORGE_E_NOMEM;
    int rc = FORGE_OK;
    memcpy(w, "\xe2\x96\x81", 3);
    size_t wl = 3; /* bytes of w in use; 3 = empty word */
    for (size_t off = 0; off < len;) {
        uint32_t c = nfd_first(tok_cpt_decode(text, len, &off));
        if (tok_is_whitespace(c)) {
            if (wl > 3 && (rc = wordpiece(t, w, wl, out))) goto done;
            wl = 3;
            continue;
        }
        utf8proc_category_t cat = category(c);
        if (c == 0 || c == 0xFFFD || cat == UTF8PROC_CATEGORY_CC || cat == UTF8PROC_CATEGORY_CF ||
            cat == UTF8PROC_CATEGORY_CO || cat == UTF8PROC_CATEGORY_CS)
            continue;
        if (cat == UTF8PROC_CATEGORY_MN) continue; /* strip accents */
        uint32_t lc = c <= 0x10FFFF ? (uint32_t)utf8proc_tolower((utf8proc_int32_t)c) : c;
        bool punct = cat >= UTF8PROC_CATEGORY_PC && cat <= UTF8PROC_CATEGORY_PO;
        bool sym = cat >= UTF8PROC_CATEGORY_SM && cat <= UTF8PROC_CATEGORY_SO;
        if (punct || (c < 0x7F && sym) || is_chinese_char(c)) {
            if (wl > 3 && (rc = wordpiece(t, w, wl, out))) goto done;
            wl = 3 + tok_cpt_encode(lc, w + 3);
            if ((rc = wordpiece(t, w, wl, out))) goto done;
            wl = 3;
        } else {
            wl += tok_cpt_encode(lc, w + wl);
        }
    }
    if (wl > 3) rc = wordpiece(t, w, wl, out);
done:
    free(w);
    return rc;
}
