/* tok_spm.c - SentencePiece-style BPE (tokenizer.ggml.model "llama"): split the fragment into
 * UTF-8 characters, then repeatedly merge the adjacent pair whose concatenation is the vocabulary
 * token with the highest score (ties: leftmost), and finally emit each symbol as its token or, when
 * it is not in the vocabulary, as byte tokens <0xNN> (byte fallback). Mirrors llama.cpp's
 * llm_tokenizer_spm_session. O(n log n) in the fragment length (binary heap of candidate pairs). */
#include <stdlib.h>
#include <string.h>

#include "tok/tok_internal.h"

typedef struct sym {
    int prev, next;
    size_t start, n;
} sym;

typedef struct bigram {
    float score;
    int left, right;
    size_t size;
} bigram;

/* true when a should be popped before b: higher score first, then smaller left */
static bool before(const bigram *a, const bigram *b)
{
    if (a->score != b->score) return a->score > b->score;
    return a->left < b->left;
}

typedef struct heap {
    bigram *v;
    size_t n, cap;
} heap;

static int heap_push(heap *h, bigram b)
{
    if (h->n == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 64;
        bigram *v = realloc(h->v, cap * sizeof *v);
        if (!v) return FORGE_E_NOMEM;
        h->v = v;
        h->cap = cap;
    }
    size_t i = h->n++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!before(&b, &h->v[p])) break;
        h->v[i] = h->v[p];
        i = p;
    }
    h->v[i] = b;
    return FORGE_OK;
}

static bigram heap_pop(heap *h)
{
    bigram top = h->v[0];
    bigram last = h->v[--h->n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= h->n) break;
        if (c + 1 < h->n && before(&h->v[c + 1], &h->v[c])) c++;
        if (!before(&h->v[c], &last)) break;
        h->v[i] = h->v[c];
        i = c;
    }
    if (h->n) h->v[i] = last;
    return top;
}

static int try_add(const struct forge_tok *t, const char *text, const sym *syms, int left,
                   int right, heap *h)
{
    if (left < 0 || right < 0) return FORGE_OK;
    size_t size = syms[left].n + syms[right].n;
    int32_t id = tok_find(t, text + syms[left].start, size);
    if (id < 0) return FORGE_OK;
    return heap_push(h, (bigram){t->scores[id], left, right, size});
}

/* The merge loop over one segment. */
static int spm_segment(const struct forge_tok *t, const char *text, size_t len, tok_ids *out);

static bool is_mark(const char *s, size_t l)
{
    return l == 3 && !memcmp(s, "\xe2\x96\x81", 3);
}

/* Pairs are only merged when their concatenation is a token, so a position no token can span
 * splits the work into independent segments: the greedy order inside each is unchanged. When no
 * token holds a U+2581 after another character (checked at load: spm_split), no token spans the
 * start of a U+2581 that follows a character other than U+2581; split there (word starts). */
int tok_spm_encode(const struct forge_tok *t, const char *text, size_t len, tok_ids *out)
{
    if (!t->spm_split) return spm_segment(t, text, len, out);
    size_t seg = 0, prev_start = 0, prev_len = 0;
    for (size_t off = 0; off < len;) {
        size_t l = tok_utf8_len((unsigned char)text[off]);
        if (l > len - off) l = len - off;
        if (off > seg && is_mark(text + off, l) && !is_mark(text + prev_start, prev_len)) {
            int rc = spm_segment(t, text + seg, off - seg, out);
            if (rc) return rc;
            seg = off;
        }
        prev_start = off;
        prev_len = l;
        off += l;
    }
    return spm_segment(t, text + seg, len - seg, out);
}

static int spm_segment(const struct forge_tok *t, const char *text, size_t len, tok_ids *out)
{
    sym *syms = NULL;
    heap h = {0};
    int rc = FORGE_OK;
    if (len == 0) return FORGE_OK;
    if (len > (size_t)0x7fffffff) return FORGE_E_RANGE;
    syms = malloc(len * sizeof *syms);
    if (!syms) return FORGE_E_NOMEM;
    int n = 0;
    for (size_t off = 0; off < len;) {
        size_t l = tok_utf8_len((unsigned char)text[off]);
        if (l > len - off) l = len - off;
        syms[n] = (sym){n - 1, off + l == len ? -1 : n + 1, off, l};
        off += l;
        n++;
    }
    for (int i = 1; i < n; i++)
        if ((rc = try_add(t, text, syms, i - 1, i, &h))) goto done;
    while (h.n) {
        bigram b = heap_pop(&h);
        sym *l = &syms[b.left], *r = &syms[b.right];
        if (l->n == 0 || r->n == 0 || l->n + r->n != b.size) continue;
        l->n += r->n;
        r->n = 0;
        l->next = r->next;
        if (r->next >= 0) syms[r->next].prev = b.left;
        if ((rc = try_add(t, text, syms, l->prev, b.left, &h))) goto done;
        if ((rc = try_add(t, text, syms, b.left, l->next, &h))) goto done;
    }
    for (int i = 0; i != -1; i = syms[i].next) {
        int32_t id = tok_find(t, text + syms[i].start, syms[i].n);
        if (id >= 0) {
            if ((rc = tok_ids_push(out, id))) goto done;
            continue;
        }
        for (size_t k = 0; k < syms[i].n; k++) {
            int32_t b = t->byte_tok[(unsigned char)text[syms[i].start + k]];
            if (b < 0) b = t->unk; /* llama.cpp throws here; Forge falls back to <unk> */
            if (b >= 0 && (rc = tok_ids_push(out, b))) goto done;
        }
    }
done:
    free(syms);
    free(h.v);
    return rc;
}
