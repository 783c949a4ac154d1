/* tok_bpe.c - byte-level BPE (tokenizer.ggml.model "gpt2"): the pre-tokenizers named by
 * tokenizer.ggml.pre (regex lists run on PCRE2 with UTF + UCP + JIT), the GPT-2 byte<->unicode map
 * and rank-driven merging. Mirrors llama.cpp's llm_tokenizer_bpe / unicode_regex_split.
 *
 * How the reference splits: the text is decoded leniently (invalid bytes -> U+FFFD), then each
 * regex of the list splits every chunk left by the previous one: matches and the gaps between
 * them both become chunks. llama.cpp matches category classes on a "collapsed" text where every
 * non-ASCII whitespace is U+000B; here the subject given to PCRE2 gets the same substitution, and
 * \s is spelled as the explicit class [\t\n\x0B\f\r ], which makes PCRE2 agree with it exactly.
 * Each chunk is then re-encoded as UTF-8, mapped byte by byte through the GPT-2 table, and merged
 * by lowest rank (ties: leftmost). A chunk that is itself a token is kept whole when the
 * pre-tokenizer sets ignore_merges (llama3, tekken). */
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/util.h"
#include "tok/tok_internal.h"

/* ---- GPT-2 byte <-> unicode --------------------------------------------------------------- */

uint32_t tok_gpt2_byte_to_cpt(unsigned char b)
{
    if ((b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || b >= 0xae) return b;
    if (b <= 0x20) return 256u + b;
    if (b >= 0x7f && b <= 0xa0) return 256u + 33u + (b - 0x7fu);
    return 256u + 67u; /* 0xad */
}

int tok_gpt2_cpt_to_byte(uint32_t c)
{
    if ((c >= 0x21 && c <= 0x7e) || (c >= 0xa1 && c <= 0xac) || (c >= 0xae && c <= 0xff))
        return (int)c;
    if (c >= 256 && c <= 288) return (int)(c - 256);
    if (c >= 289 && c <= 322) return (int)(c - 289 + 0x7f);
    if (c == 323) return 0xad;
    return -1;
}

/* ---- pre-tokenizer regex lists ------------------------------------------------------------ */

/* \s and \S as the reference sees them (non-ASCII whitespace is mapped to U+000B first) */
#define WS "\\t\\n\\x0B\\f\\r "
#define S_ "[" WS "]"
#define NS "[^" WS "]"
#define CONTR "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
#define RE_GPT2 "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^" WS "\\p{L}\\p{N}]+|" S_ "+(?!" NS ")"
#define RE_WS_TAIL S_ "*[\\r\\n]+|" S_ "+(?!" NS ")|" S_ "+"
#define RE_LLAMA3 CONTR "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^" WS "\\p{L}\\p{N}]+[\\r\\n]*|" RE_WS_TAIL
#define RE_QWEN2 CONTR "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^" WS "\\p{L}\\p{N}]+[\\r\\n]*|" RE_WS_TAIL
/* ((?=[\p{L}])([^a-z])) is one letter outside a-z: the class [^\P{L}a-z] */
#define UPPERISH "[^\\P{L}a-z]"
#define LOWERISH "[^\\P{L}A-Z]"
#define RE_PORO " ?[^(" WS "|.,!?\\x{2026}\\x{3002}\\x{FF0C}\\x{3001}\\x{964}\\x{6D4}\\x{60C})]+"
#define RE_CJK_DS "[\\x{4E00}-\\x{9FA5}\\x{800}-\\x{4E00}\\x{AC00}-\\x{D7FF}]+"

static const char *const pre_default[] = {"[\\p{P}\\$\\+<=>\\^~\\|]+", RE_GPT2, "\\p{N}+",
                                          "[0-9][0-9][0-9]", NULL};
static const char *const pre_llama3[] = {RE_LLAMA3, NULL};
static const char *const pre_qwen2[] = {RE_QWEN2, NULL};
static const char *const pre_gpt2[] = {RE_GPT2, NULL};
static const char *const pre_starcoder[] = {"\\p{N}", RE_GPT2, NULL};
static const char *const pre_falcon[] = {"[\\p{P}\\$\\+<=>\\^~\\|`]+", RE_GPT2, "[0-9][0-9][0-9]", NULL};
static const char *const pre_deepseek_coder[] = {"[\\r\\n]", S_ "?\\p{L}+", S_ "?\\p{P}+", RE_CJK_DS,
                                                 "\\p{N}", NULL};
static const char *const pre_deepseek_llm[] = {
    "[\\r\\n]",
    S_ "?[A-Za-z\\x{B5}\\x{C0}-\\x{D6}\\x{D8}-\\x{F6}\\x{F8}-\\x{1BA}\\x{1BC}-\\x{1BF}"
    "\\x{1C4}-\\x{293}\\x{295}-\\x{2AF}\\x{370}-\\x{373}\\x{376}\\x{377}\\x{37B}-\\x{37D}"
    "\\x{37F}\\x{386}\\x{388}-\\x{38A}\\x{38C}\\x{38E}-\\x{3A1}\\x{3A3}-\\x{3F5}\\x{3F7}-\\x{481}"
    "\\x{48A}-\\x{52F}\\x{531}-\\x{556}\\x{10A0}-\\x{10C5}\\x{13A0}-\\x{13F5}\\x{13F8}-\\x{13FD}"
    "\\x{1C90}-\\x{1CBA}\\x{1CBD}-\\x{1CBF}\\x{1D00}-\\x{1D2B}\\x{1D6B}-\\x{1D77}\\x{1D79}-\\x{1D9A}"
    "\\x{1E00}-\\x{1F15}\\x{1F18}-\\x{1F1D}\\x{1F20}-\\x{1F45}\\x{1F48}-\\x{1F4D}\\x{1F50}-\\x{1F57}"
    "\\x{1F59}\\x{1F5B}\\x{1F5D}\\x{1F5F}-\\x{1F7D}\\x{1F80}-\\x{1FB4}\\x{1FB6}-\\x{1FBC}\\x{1FBE}"
    "\\x{1FC2}-\\x{1FC4}\\x{1FC6}-\\x{1FCC}\\x{1FD0}-\\x{1FD3}\\x{1FD6}-\\x{1FDB}\\x{1FE0}-\\x{1FEC}"
    "\\x{1FF2}-\\x{1FF4}\\x{1FF6}-\\x{1FFC}\\x{2102}\\x{2107}\\x{210A}-\\x{2113}\\x{2115}"
    "\\x{2119}-\\x{211D}\\x{2124}\\x{2126}\\x{2128}\\x{212A}-\\x{212D}\\x{212F}-\\x{2134}\\x{2139}"
    "\\x{213C}-\\x{213F}\\x{2145}-\\x{2149}\\x{214E}\\x{2183}\\x{2184}\\x{2C00}-\\x{2C7B}"
    "\\x{2C7E}-\\x{2CE4}\\x{2CEB}-\\x{2CEE}\\x{2CF2}\\x{2CF3}\\x{A640}-\\x{A66D}\\x{A680}-\\x{A69B}"
    "\\x{A722}-\\x{A76F}\\x{A771}-\\x{A787}\\x{A78B}-\\x{A78E}\\x{AB70}-\\x{ABBF}\\x{FB00}-\\x{FB06}"
    "\\x{FB13}-\\x{FB17}\\x{FF21}-\\x{FF3A}\\x{FF41}-\\x{FF5A}\\x{10400}-\\x{1044F}"
    "\\x{104B0}-\\x{104D3}\\x{104D8}-\\x{104FB}\\x{10C80}-\\x{10CB2}\\x{10CC0}-\\x{10CF2}"
    "\\x{118A0}-\\x{118DF}\\x{1E900}-\\x{1E943}]+",
    S_ "?[!-/:-~\\x{FF01}-\\x{FF0F}\\x{FF1A}-\\x{FF5E}\\x{2018}-\\x{201F}\\x{3000}-\\x{3002}]+",
    S_ "+\\z",
    RE_CJK_DS,
    "\\p{N}+",
    NULL};
static const char *const pre_deepseek_v3[] = {
    "\\p{N}{1,3}", "[\\x{4E00}-\\x{9FA5}\\x{3040}-\\x{309F}\\x{30A0}-\\x{30FF}]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\\r\\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\\r\\n]*|" RE_WS_TAIL,
    NULL};
static const char *const pre_poro[] = {RE_PORO, NULL};
static const char *const pre_viking[] = {RE_PORO, "\\p{N}", NULL};
static const char *const pre_tekken[] = {
    "[^\\r\\n\\p{L}\\p{N}]?" UPPERISH "*" LOWERISH "+|[^\\r\\n\\p{L}\\p{N}]?" UPPERISH "+" LOWERISH
    "*|\\p{N}| ?[^" WS "\\p{L}\\p{N}]+[\\r\\n/]*|" RE_WS_TAIL,
    NULL};
static const char *const pre_chameleon[] = {"<sentinel:[0-9]+>", "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
                                            "([\\t\\n]|    |  )", "\\p{N}",
                                            "[\\p{P}!-/:-@\\[-`{-~]", RE_GPT2, NULL};
static const char *const pre_gpt4o[] = {
    "[^\\r\\n\\p{L}\\p{N}]?" UPPERISH "*" LOWERISH "+" CONTR "?|[^\\r\\n\\p{L}\\p{N}]?" UPPERISH
    "+" LOWERISH "*" CONTR "?|\\p{N}{1,3}| ?[^" WS "\\p{L}\\p{N}]+[\\r\\n/]*|" RE_WS_TAIL,
    NULL};
static const char *const pre_superbpe[] = {"\\p{N}+", "(?=([0-9]{3})+(?![0-9]))", NULL};
static const char *const pre_bailingmoe[] = {
    "'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^" WS
    "\\p{L}\\p{N}]+[\\r\\n]*|" S_ "*[\\r\\n]|" S_ "+(?!" NS ")|" S_ "+",
    NULL};
static const char *const pre_seed_coder[] = {
    CONTR "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1}| ?[^" WS "\\p{L}\\p{N}\\r\\n]+|" RE_WS_TAIL, NULL};

enum { F_IGNORE_MERGES = 1, F_ADD_BOS = 2, F_NO_CLEAN = 4, F_NO_BOS_ID = 8 };

static const struct pre_def {
    const char *names; /* '|'-separated */
    const char *const *re;
    int flags;
} pre_defs[] = {
    {"default", pre_default, 0},
    {"llama3|llama-v3|llama-bpe|falcon3|falcon-h1|pixtral|midm-2.0|lfm2", pre_llama3,
     F_IGNORE_MERGES | F_ADD_BOS},
    {"dbrx|smaug-bpe", pre_llama3, 0},
    {"deepseek-llm", pre_deepseek_llm, F_NO_CLEAN},
    {"deepseek-coder", pre_deepseek_coder, F_NO_CLEAN},
    {"deepseek-v3|hunyuan-dense", pre_deepseek_v3, F_NO_CLEAN},
    {"falcon", pre_falcon, 0},
    {"mpt|olmo|jais|gpt-2|phi-2|jina-es|jina-de|gigachat|jina-v1-en|jina-v2-es|jina-v2-de|"
     "jina-v2-code|roberta-bpe|a.x-4.0|mellum|exaone4|modern-bert", pre_gpt2, 0},
    {"trillion|granite-docling", pre_gpt2, F_NO_CLEAN},
    {"starcoder|refact|codeshell|exaone|minerva-7b|minerva|mellum2", pre_starcoder, 0},
    {"command-r|smollm", pre_starcoder, F_NO_CLEAN},
    {"qwen2|deepseek-r1-qwen|kormo|hunyuan|solar-open|grok-2", pre_qwen2, F_NO_CLEAN},
    {"stablelm2|megrez", pre_qwen2, 0},
    {"poro-chat", pre_poro, F_NO_CLEAN},
    {"bloom|gpt3-finnish", pre_poro, 0},
    {"chatglm-bpe|glm4", pre_llama3, F_NO_BOS_ID},
    {"viking", pre_viking, F_NO_CLEAN},
    {"tekken", pre_tekken, F_NO_CLEAN | F_IGNORE_MERGES | F_ADD_BOS},
    {"chameleon", pre_chameleon, F_NO_CLEAN | F_ADD_BOS},
    {"gpt-4o|llama4|kanana2", pre_gpt4o, F_NO_CLEAN},
    {"superbpe", pre_superbpe, F_NO_CLEAN},
    {"bailingmoe|bailingmoe2|llada-moe", pre_bailingmoe, F_NO_CLEAN},
    {"seed-coder", pre_seed_coder, F_NO_CLEAN},
};

#define MAX_RE 8

struct tok_pre {
    int n;
    pcre2_code *re[MAX_RE];
};

static bool name_in(const char *names, const char *name)
{
    size_t n = strlen(name);
    for (const char *p = names; *p;) {
        const char *e = strchr(p, '|');
        size_t l = e ? (size_t)(e - p) : strlen(p);
        if (l == n && !memcmp(p, name, n)) return true;
        if (!e) break;
        p = e + 1;
    }
    return false;
}

void tok_pre_free(struct tok_pre *p)
{
    if (!p) return;
    for (int i = 0; i < p->n; i++) pcre2_code_free(p->re[i]);
    free(p);
}

int tok_pre_create(struct forge_tok *t, const char *name, bool *known, forge_err *err)
{
    const struct pre_def *def = &pre_defs[0];
    *known = true;
    if (name && *name) {
        size_t i;
        for (i = 0; i < FORGE_ARRAY_LEN(pre_defs); i++)
            if (name_in(pre_defs[i].names, name)) break;
        if (i < FORGE_ARRAY_LEN(pre_defs)) def = &pre_defs[i];
        else *known = false;
    }
    struct tok_pre *p = calloc(1, sizeof *p);
    if (!p) return forge_err_set(err, FORGE_E_NOMEM, "tokenizer: out of memory");
    for (const char *const *re = def->re; *re && p->n < MAX_RE; re++) {
        int ec;
        PCRE2_SIZE eo;
        pcre2_code *c = pcre2_compile((PCRE2_SPTR)*re, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP,
                                      &ec, &eo, NULL);
        if (!c) {
            PCRE2_UCHAR msg[160];
            pcre2_get_error_message(ec, msg, sizeof msg);
            tok_pre_free(p);
            return forge_err_set(err, FORGE_E_INTERNAL, "tokenizer: pre-tokenizer regex %d of '%s' "
                                 "does not compile at %zu: %s", (int)(re - def->re),
                                 name ? name : "default", (size_t)eo, (const char *)msg);
        }
        (void)pcre2_jit_compile(c, PCRE2_JIT_COMPLETE); /* falls back to the interpreter */
        p->re[p->n++] = c;
    }
    t->pre = p;
    if (def->flags & F_IGNORE_MERGES) t->ignore_merges = true;
    if (def->flags & F_ADD_BOS) t->add_bos = true;
    if (def->flags & F_NO_CLEAN) t->clean_spaces = false;
    if (def->flags & F_NO_BOS_ID) t->bos = -1;
    t->bpe_cache = true;
    return FORGE_OK;
}

/* ---- splitting ---------------------------------------------------------------------------- */

typedef struct ends {
    size_t *v;
    size_t n, cap;
} ends;

static int ends_push(ends *e, size_t x)
{
    if (e->n == e->cap) {
        size_t cap = e->cap ? e->cap * 2 : 64;
        size_t *v = realloc(e->v, cap * sizeof *v);
        if (!v) return FORGE_E_NOMEM;
        e->v = v;
        e->cap = cap;
    }
    e->v[e->n++] = x;
    return FORGE_OK;
}

typedef struct split_state {
    pcre2_match_data *md;
    pcre2_match_context *mctx;
    pcre2_jit_stack *jstack;
} split_state;

static int run_match(split_state *st, const pcre2_code *re, const char *subj, size_t len,
                     size_t start, uint32_t opts)
{
    for (;;) {
        int rc = pcre2_match(re, (PCRE2_SPTR)subj, len, start, opts | PCRE2_NO_UTF_CHECK, st->md,
                             st->mctx);
        if (rc != PCRE2_ERROR_JIT_STACKLIMIT || st->jstack) return rc;
        /* deep backtracking on a huge chunk: retry once with a large JIT stack */
        st->mctx = pcre2_match_context_create(NULL);
        st->jstack = pcre2_jit_stack_create(64 * 1024, 64 * 1024 * 1024, NULL);
        if (!st->mctx || !st->jstack) return PCRE2_ERROR_NOMEMORY;
        pcre2_jit_stack_assign(st->mctx, NULL, st->jstack);
    }
}

/* Split chunk subj[a, b) with re; append the end of every piece (matches and gaps) to out. */
static int split_chunk(split_state *st, const pcre2_code *re, const char *subj, size_t a, size_t b,
                       ends *out, forge_err *err)
{
    const char *s = subj + a;
    size_t len = b - a, last = 0, pos = 0;
    uint32_t opts = 0;
    int rc;
    while (pos <= len) {
        int mr = run_match(st, re, s, len, pos, opts);
        if (mr == PCRE2_ERROR_NOMATCH) {
            if (!opts || pos >= len) break;
            opts = 0; /* no non-empty match here: move one character on */
            pos++;
            while (pos < len && ((unsigned char)s[pos] & 0xc0) == 0x80) pos++;
            continue;
        }
        if (mr < 0) {
            PCRE2_UCHAR msg[120];
            pcre2_get_error_message(mr, msg, sizeof msg);
            return forge_err_set(err, FORGE_E_RANGE, "tokenizer: pre-tokenizer regex failed on a "
                                 "chunk of %zu bytes: %s", len, (const char *)msg);
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(st->md);
        size_t ms = ov[0], me = ov[1];
        if (ms > last && (rc = ends_push(out, a + ms))) return rc;
        if (me > ms && (rc = ends_push(out, a + me))) return rc;
        if (me > last) last = me;
        pos = me;
        opts = (me == ms) ? (PCRE2_NOTEMPTY_ATSTART | PCRE2_ANCHORED) : 0;
    }
    if (last < len && (rc = ends_push(out, b))) return rc;
    return FORGE_OK;
}

/* ---- merging ------------------------------------------------------------------------------ */

typedef struct sym {
    int prev, next;
    size_t start, n;
} sym;

typedef struct bigram {
    int32_t rank;
    int left, right;
    size_t size;
} bigram;

static bool before(const bigram *a, const bigram *b)
{
    if (a->rank != b->rank) return a->rank < b->rank;
    return a->left < b->left;
}

typedef struct work {
    sym *syms;
    size_t syms_cap;
    bigram *heap;
    size_t heap_n, heap_cap;
} work;

static int heap_push(work *w, bigram b)
{
    if (w->heap_n == w->heap_cap) {
        size_t cap = w->heap_cap ? w->heap_cap * 2 : 64;
        bigram *v = realloc(w->heap, cap * sizeof *v);
        if (!v) return FORGE_E_NOMEM;
        w->heap = v;
        w->heap_cap = cap;
    }
    size_t i = w->heap_n++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!before(&b, &w->heap[p])) break;
        w->heap[i] = w->heap[p];
        i = p;
    }
    w->heap[i] = b;
    return FORGE_OK;
}

static bigram heap_pop(work *w)
{
    bigram top = w->heap[0];
    bigram last = w->heap[--w->heap_n];
    size_t i = 0, n = w->heap_n;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && before(&w->heap[c + 1], &w->heap[c])) c++;
        if (!before(&w->heap[c], &last)) break;
        w->heap[i] = w->heap[c];
        i = c;
    }
    if (n) w->heap[i] = last;
    return top;
}

static int add_bigram(const struct forge_tok *t, const char *word, work *w, int left, int right)
{
    if (left < 0 || right < 0) return FORGE_OK;
    const sym *l = &w->syms[left], *r = &w->syms[right];
    int32_t rank = tok_merge_rank(t, word + l->start, l->n, word + r->start, r->n);
    if (rank < 0) return FORGE_OK;
    return heap_push(w, (bigram){rank, left, right, l->n + r->n});
}

static int bpe_word(const struct forge_tok *t, const char *word, size_t wl, work *w, tok_ids *out)
{
    int rc;
    if (wl == 0) return FORGE_OK;
    if (wl > 0x7fffffff) return FORGE_E_RANGE;
    if (t->ignore_merges) {
        int32_t id = tok_find(t, word, wl);
        if (id >= 0) return tok_ids_push(out, id);
    }
    if (wl > w->syms_cap) {
        sym *s = realloc(w->syms, wl * sizeof *s);
        if (!s) return FORGE_E_NOMEM;
        w->syms = s;
        w->syms_cap = wl;
    }
    int n = 0;
    for (size_t off = 0; off < wl;) {
        size_t l = tok_utf8_len((unsigned char)word[off]);
        if (l > wl - off) l = wl - off;
        w->syms[n] = (sym){n - 1, off + l == wl ? -1 : n + 1, off, l};
        off += l;
        n++;
    }
    w->heap_n = 0;
    for (int i = 1; i < n; i++)
        if ((rc = add_bigram(t, word, w, i - 1, i))) return rc;
    while (w->heap_n) {
        bigram b = heap_pop(w);
        sym *l = &w->syms[b.left], *r = &w->syms[b.right];
        if (l->n == 0 || r->n == 0 || l->n + r->n != b.size) continue; /* outdated */
        l->n += r->n;
        r->n = 0;
        l->next = r->next;
        if (r->next >= 0) w->syms[r->next].prev = b.left;
        if ((rc = add_bigram(t, word, w, l->prev, b.left))) return rc;
        if ((rc = add_bigram(t, word, w, b.left, l->next))) return rc;
    }
    for (int i = 0; i != -1; i = w->syms[i].next) {
        const sym *s = &w->syms[i];
        if (s->n == 0) continue;
        int32_t id = tok_find(t, word + s->start, s->n);
        if (id >= 0) {
            if ((rc = tok_ids_push(out, id))) return rc;
            continue;
        }
        for (size_t k = 0; k < s->n; k++) { /* llama.cpp: each byte as a 1-byte token, if any */
            id = tok_find(t, word + s->start + k, 1);
            if (id >= 0 && (rc = tok_ids_push(out, id))) return rc;
        }
    }
    return FORGE_OK;
}

int tok_pre_split(const struct tok_pre *pre, const char *text, size_t len, uint32_t **cps_out,
                  size_t *n_cps, size_t **ends_out, size_t *n_ends, forge_err *err)
{
    uint32_t *cps = NULL;
    char *subj = NULL;
    ends cur = {0}, next = {0};
    split_state st = {0};
    int rc = FORGE_OK;
    *cps_out = NULL;
    *ends_out = NULL;
    *n_cps = *n_ends = 0;
    if (len == 0) return FORGE_OK;
    if (len > ((size_t)1 << 40)) return forge_err_set(err, FORGE_E_RANGE, "tokenizer: input too large");

    /* lenient decode; the regex subject has non-ASCII whitespace as U+000B (as the reference's
     * collapsed text) and code points PCRE2 cannot hold (surrogates, > U+10FFFF) as U+E000 */
    cps = malloc(len * sizeof *cps);
    subj = malloc(3 * len + 4);
    if (!cps || !subj) goto nomem;
    size_t m = 0, sl = 0;
    for (size_t off = 0; off < len;) {
        uint32_t c = tok_cpt_decode(text, len, &off);
        cps[m++] = c;
        uint32_t sc = c;
        if (c > 0x7f && tok_is_whitespace(c)) sc = 0x0b;
        else if ((c >= 0xd800 && c <= 0xdfff) || c > 0x10ffff) sc = 0xe000;
        sl += tok_cpt_encode(sc, subj + sl);
    }

    st.md = pcre2_match_data_create(32, NULL);
    if (!st.md) goto nomem;
    if ((rc = ends_push(&cur, sl))) goto done;
    for (int r = 0; r < pre->n; r++) {
        next.n = 0;
        size_t a = 0;
        for (size_t i = 0; i < cur.n; i++) {
            if ((rc = split_chunk(&st, pre->re[r], subj, a, cur.v[i], &next, err))) goto done;
            a = cur.v[i];
        }
        ends sw = cur;
        cur = next;
        next = sw;
    }
    /* byte offsets in the subject -> code point counts */
    size_t bp = 0, ci = 0;
    for (size_t i = 0; i < cur.n; i++) {
        for (; bp < cur.v[i]; bp++)
            if (((unsigned char)subj[bp] & 0xc0) != 0x80) ci++;
        cur.v[i] = ci;
    }
    *cps_out = cps;
    *n_cps = m;
    *ends_out = cur.v;
    *n_ends = cur.n;
    cps = NULL;
    cur.v = NULL;
    goto done;
nomem:
    rc = forge_err_set(err, FORGE_E_NOMEM, "tokenizer: out of memory");
done:
    if (rc == FORGE_E_NOMEM && err && !err->code) forge_err_set(err, rc, "tokenizer: out of memory");
    pcre2_match_data_free(st.md);
    pcre2_match_context_free(st.mctx);
    pcre2_jit_stack_free(st.jstack);
    free(cps);
    free(subj);
    free(cur.v);
    free(next.v);
    return rc;
}

/* Per-call cache of words already merged (text repeats words; the result of a word depends on
 * nothing else). Keys are copied into an arena; values index the ids already in the output. */
typedef struct word_cache {
    struct wc_slot {
        uint64_t hash;
        size_t key_off, key_len, ids_start, n_ids;
    } *slots;
    size_t mask, used;
    char *keys;
    size_t keys_len, keys_cap;
} word_cache;

#define WC_MAX_WORD 64

static struct wc_slot *wc_find(word_cache *c, const char *w, size_t wl, uint64_t h)
{
    for (size_t i = h & c->mask;; i = (i + 1) & c->mask) {
        struct wc_slot *sl = &c->slots[i];
        if (!sl->key_len) return sl;
        if (sl->hash == h && sl->key_len == wl && !memcmp(c->keys + sl->key_off, w, wl)) return sl;
    }
}

int tok_bpe_encode(const struct forge_tok *t, const char *text, size_t len, tok_ids *out,
                   forge_err *err)
{
    uint32_t *cps = NULL;
    size_t *wends = NULL, m = 0, nw = 0;
    char *word = NULL;
    work w = {0};
    word_cache wc = {0};
    int rc = tok_pre_split(t->pre, text, len, &cps, &m, &wends, &nw, err);
    if (rc || m == 0) goto done;

    /* words: original code points of each chunk, UTF-8, each byte through the GPT-2 map */
    size_t longest = 0;
    for (size_t i = 0, c = 0; i < nw; c = wends[i++])
        if (wends[i] - c > longest) longest = wends[i] - c;
    word = malloc(8 * longest + 8);
    if (!word) goto nomem;
    if (t->bpe_cache && nw >= 256) { /* worth a cache */
        size_t cap = 1024;
        while (cap < 2 * nw && cap < ((size_t)1 << 17)) cap <<= 1;
        wc.slots = calloc(cap, sizeof *wc.slots);
        wc.mask = cap - 1;
        wc.keys_cap = 4096;
        wc.keys = malloc(wc.keys_cap);
        if (!wc.slots || !wc.keys) goto nomem;
    }
    size_t c0 = 0;
    for (size_t i = 0; i < nw; i++) {
        size_t wl = 0;
        for (size_t k = c0; k < wends[i]; k++) {
            char u[4];
            size_t ul = tok_cpt_encode(cps[k], u);
            for (size_t j = 0; j < ul; j++)
                wl += tok_cpt_encode(tok_gpt2_byte_to_cpt((unsigned char)u[j]), word + wl);
        }
        c0 = wends[i];
        struct wc_slot *sl = NULL;
        uint64_t h = 0;
        if (wc.slots && wl > 0 && wl <= WC_MAX_WORD) {
            h = tok_hash(word, wl, TOK_HASH_SEED) | 1;
            sl = wc_find(&wc, word, wl, h);
            if (sl->key_len) { /* seen before: repeat its ids */
                for (size_t k = 0; k < sl->n_ids; k++)
                    if ((rc = tok_ids_push(out, out->v[sl->ids_start + k]))) goto nomem;
                continue;
            }
        }
        size_t before_n = out->n;
        if ((rc = bpe_word(t, word, wl, &w, out))) {
            if (rc == FORGE_E_NOMEM) goto nomem;
            forge_err_set(err, rc, "tokenizer: a pre-token of %zu bytes is too long", wl);
            goto done;
        }
        if (sl && wc.used * 2 < wc.mask) {
            if (wc.keys_len + wl > wc.keys_cap) {
                size_t cap = wc.keys_cap * 2 + wl;
                char *k = realloc(wc.keys, cap);
                if (!k) goto nomem;
                wc.keys = k;
                wc.keys_cap = cap;
            }
            memcpy(wc.keys + wc.keys_len, word, wl);
            *sl = (struct wc_slot){h, wc.keys_len, wl, before_n, out->n - before_n};
            wc.keys_len += wl;
            wc.used++;
        }
    }
    goto done;
nomem:
    rc = forge_err_set(err, FORGE_E_NOMEM, "tokenizer: out of memory");
done:
    free(cps);
    free(wends);
    free(word);
    free(w.syms);
    free(w.heap);
    free(wc.slots);
    free(wc.keys);
    return rc;
}
