/* test_tok.c - tokenizer tests: llama.cpp's tokenizer suites (testdata/vocab/ *.inp/.out, every
 * case), round trips on the suite texts and on random strings, special tokens and defaults,
 * streaming detokenization, invalid UTF-8, bad metadata, WordPiece on a small built vocabulary,
 * and many threads sharing one tokenizer. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"
#include "forge.h"
#include "tok/tok_internal.h" /* test_spm_split toggles an internal switch */

#define SEP "\n__ggml_vocab_test__\n"

static const char *const vocab_names[] = {"llama-spm", "llama-bpe", "gpt-2", "deepseek-coder",
                                          "falcon", "starcoder"};
#define N_VOCABS (sizeof vocab_names / sizeof vocab_names[0])

typedef struct suite {
    gguf_ctx *g;
    forge_tok *tok;
    char *inp;          /* the .inp file; cases point into it */
    size_t n_cases;
    const char **text;
    size_t *len;
    int32_t **want;     /* expected ids per case */
    size_t *n_want;
} suite;

static suite suites[N_VOCABS];
static bool have_data;

static void suite_free(suite *s)
{
    for (size_t i = 0; i < s->n_cases; i++) free(s->want[i]);
    free(s->want);
    free(s->n_want);
    free(s->text);
    free(s->len);
    free(s->inp);
    forge_tok_free(s->tok);
    gguf_close(s->g);
    memset(s, 0, sizeof *s);
}

static int suite_load(suite *s, const char *name)
{
    char rel[256], *path = NULL, *out = NULL;
    size_t inp_len = 0;
    forge_err err = {0};
    int rc = -1;
    snprintf(rel, sizeof rel, "testdata/vocab/ggml-vocab-%s.gguf", name);
    if (!(path = tu_shared_path(rel))) return -1;
    if (gguf_open(path, &s->g, &err) || forge_tok_load(s->g, &s->tok, &err)) {
        fprintf(stderr, "%s: %s\n", name, err.msg);
        goto done;
    }
    char p2[600];
    snprintf(p2, sizeof p2, "%s.inp", path);
    s->inp = tu_read_file(p2, &inp_len);
    snprintf(p2, sizeof p2, "%s.out", path);
    out = tu_read_file(p2, NULL);
    if (!s->inp || !out) goto done;
    size_t cap = 64;
    s->text = malloc(cap * sizeof *s->text);
    s->len = malloc(cap * sizeof *s->len);
    s->want = calloc(cap, sizeof *s->want);
    s->n_want = calloc(cap, sizeof *s->n_want);
    const char *p = s->inp, *end = s->inp + inp_len;
    char *line = out;
    while (p < end && s->n_cases < cap) {
        const char *q = strstr(p, SEP);
        if (!q) break;
        s->text[s->n_cases] = p;
        s->len[s->n_cases] = (size_t)(q - p);
        /* expected ids: one line of the .out file */
        char *nl = strchr(line, '\n');
        if (nl) *nl = 0;
        int32_t *ids = malloc((strlen(line) / 2 + 2) * sizeof *ids);
        size_t n = 0;
        for (char *t = line; *t;) {
            char *e;
            long v = strtol(t, &e, 10);
            if (e == t) break;
            ids[n++] = (int32_t)v;
            t = e;
        }
        s->want[s->n_cases] = ids;
        s->n_want[s->n_cases] = n;
        s->n_cases++;
        line = nl ? nl + 1 : line + strlen(line);
        p = q + strlen(SEP);
    }
    rc = s->n_cases > 0 ? 0 : -1;
done:
    free(out);
    free(path);
    return rc;
}

static int group_setup(void **state)
{
    have_data = true;
    for (size_t i = 0; i < N_VOCABS; i++)
        if (suite_load(&suites[i], vocab_names[i])) have_data = false;
    return 0;
}

static int group_teardown(void **state)
{
    for (size_t i = 0; i < N_VOCABS; i++) suite_free(&suites[i]);
    return 0;
}

static void require_data(void)
{
    if (!have_data) {
        print_message("SKIP: shared test data %s/testdata/vocab is absent\n", tu_shared_root());
        skip();
    }
}

static bool ids_equal(const int32_t *a, size_t na, const int32_t *b, size_t nb)
{
    return na == nb && (na == 0 || !memcmp(a, b, na * sizeof *a));
}

static void test_suites(void **state)
{
    require_data();
    int total_fail = 0;
    for (size_t v = 0; v < N_VOCABS; v++) {
        suite *s = &suites[v];
        size_t pass = 0;
        for (size_t c = 0; c < s->n_cases; c++) {
            int32_t *ids = NULL;
            size_t n = 0;
            forge_err err = {0};
            assert_int_equal(forge_tok_encode(s->tok, s->text[c], s->len[c], false, false, &ids, &n, &err), 0);
            if (ids_equal(ids, n, s->want[c], s->n_want[c])) pass++;
            else print_message("%s case %zu differs\n", vocab_names[v], c);
            free(ids);
        }
        print_message("suite %-15s %zu/%zu cases pass\n", vocab_names[v], pass, s->n_cases);
        total_fail += (int)(s->n_cases - pass);
        assert_int_equal(s->n_cases, 46);
    }
    assert_int_equal(total_fail, 0);
}

/* decode(encode(text)) == text; SPM drops its space prefix via remove_leading_space */
static bool round_trip(const forge_tok *tok, const char *text, size_t len)
{
    int32_t *ids = NULL;
    size_t n = 0, ol = 0;
    char *out = NULL;
    bool ok = false;
    if (forge_tok_encode(tok, text, len, false, false, &ids, &n, NULL)) goto done;
    if (forge_tok_decode(tok, ids, n, false, true, &out, &ol, NULL)) goto done;
    ok = ol == len && !memcmp(out, text, len);
done:
    free(ids);
    free(out);
    return ok;
}

static void test_round_trip_suites(void **state)
{
    require_data();
    for (size_t v = 0; v < N_VOCABS; v++) {
        size_t ok = 0;
        for (size_t c = 0; c < suites[v].n_cases; c++) {
            if (round_trip(suites[v].tok, suites[v].text[c], suites[v].len[c])) ok++;
            else print_message("%s: round trip of case %zu differs\n", vocab_names[v], c);
        }
        print_message("round trip %-15s %zu/%zu\n", vocab_names[v], ok, suites[v].n_cases);
        assert_int_equal(ok, suites[v].n_cases);
    }
}

/* random valid UTF-8 from a mix of ASCII, whitespace, Latin, Cyrillic, CJK, emoji */
static size_t random_utf8(uint64_t *rng, char *buf, size_t max_chars)
{
    static const uint32_t ranges[][2] = {{0x20, 0x7e}, {0x20, 0x7e}, {0x20, 0x7e}, {0x09, 0x0d},
                                         {0xa0, 0x17f}, {0x400, 0x45f}, {0x4e00, 0x4fff},
                                         {0x3040, 0x30ff}, {0xac00, 0xac80}, {0x1f300, 0x1f64f},
                                         {0x2000, 0x206f}, {0x0300, 0x036f}};
    size_t n = tu_rand_u64(rng) % (max_chars + 1), o = 0;
    for (size_t i = 0; i < n; i++) {
        size_t r = tu_rand_u64(rng) % (sizeof ranges / sizeof ranges[0]);
        uint32_t c = ranges[r][0] + (uint32_t)(tu_rand_u64(rng) % (ranges[r][1] - ranges[r][0] + 1));
        if (c < 0x80) buf[o++] = (char)c;
        else if (c < 0x800) {
            buf[o++] = (char)(0xc0 | (c >> 6));
            buf[o++] = (char)(0x80 | (c & 0x3f));
        } else if (c < 0x10000) {
            buf[o++] = (char)(0xe0 | (c >> 12));
            buf[o++] = (char)(0x80 | ((c >> 6) & 0x3f));
            buf[o++] = (char)(0x80 | (c & 0x3f));
        } else {
            buf[o++] = (char)(0xf0 | (c >> 18));
            buf[o++] = (char)(0x80 | ((c >> 12) & 0x3f));
            buf[o++] = (char)(0x80 | ((c >> 6) & 0x3f));
            buf[o++] = (char)(0x80 | (c & 0x3f));
        }
    }
    return o;
}

static void test_round_trip_random(void **state)
{
    require_data();
    uint64_t rng = 12345;
    char buf[64 * 4 + 4];
    for (size_t v = 0; v < N_VOCABS; v++) {
        /* ASCII bytes the vocabulary cannot express at all (falcon has no token for some control
         * bytes; the reference drops them too): strings holding them are not expected to survive */
        bool missing[128] = {0};
        for (int b = 0; b < 128; b++) {
            char ch = (char)b;
            int32_t *ids = NULL;
            size_t n = 0;
            assert_int_equal(forge_tok_encode(suites[v].tok, &ch, 1, false, false, &ids, &n, NULL), 0);
            missing[b] = n == 0;
            free(ids);
        }
        size_t ok = 0, n = 150, skipped = 0;
        for (size_t i = 0; i < n; i++) {
            size_t len = random_utf8(&rng, buf, 64);
            bool skip_it = false;
            for (size_t k = 0; k < len; k++)
                skip_it |= (unsigned char)buf[k] < 128 && missing[(unsigned char)buf[k]];
            if (skip_it) {
                skipped++;
                continue;
            }
            if (round_trip(suites[v].tok, buf, len)) ok++;
            else print_message("%s: random string %zu does not round-trip\n", vocab_names[v], i);
        }
        print_message("random round trip %-15s %zu/%zu (%zu skipped: bytes the vocab lacks)\n",
                      vocab_names[v], ok, n - skipped, skipped);
        assert_int_equal(ok, n - skipped);
        assert_true(ok >= n / 2);
    }
}

static suite *find_suite(const char *name)
{
    for (size_t v = 0; v < N_VOCABS; v++)
        if (!strcmp(vocab_names[v], name)) return &suites[v];
    return NULL;
}

static void encode_str(const forge_tok *tok, const char *s, bool add, bool parse, int32_t **ids, size_t *n)
{
    forge_err err = {0};
    assert_int_equal(forge_tok_encode(tok, s, strlen(s), add, parse, ids, n, &err), 0);
}

static void test_special_tokens(void **state)
{
    require_data();
    int32_t *ids;
    size_t n;
    /* llama-bpe (Llama 3): BOS by default, <|eot_id|> as EOT, EOG = {128001, 128009} */
    const forge_tok *l3 = find_suite("llama-bpe")->tok;
    assert_true(forge_tok_adds_bos(l3));
    assert_false(forge_tok_adds_eos(l3));
    assert_int_equal(forge_tok_bos(l3), 128000);
    assert_int_equal(forge_tok_eos(l3), 128001);
    assert_int_equal(forge_tok_eot(l3), 128009);
    assert_true(forge_tok_is_eog(l3, 128001));
    assert_true(forge_tok_is_eog(l3, 128009));
    assert_false(forge_tok_is_eog(l3, 128000));
    assert_false(forge_tok_is_eog(l3, 9906));
    encode_str(l3, "Hello world", true, false, &ids, &n);
    assert_int_equal(n, 3);
    assert_int_equal(ids[0], 128000);
    assert_int_equal(ids[1], 9906);
    assert_int_equal(ids[2], 1917);
    free(ids);
    encode_str(l3, "<|eot_id|>", false, true, &ids, &n);
    assert_int_equal(n, 1);
    assert_int_equal(ids[0], 128009);
    free(ids);
    encode_str(l3, "<|eot_id|>", false, false, &ids, &n); /* not parsed: plain text */
    assert_true(n > 1);
    free(ids);
    encode_str(l3, "a<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>", false, true, &ids, &n);
    assert_int_equal(n, 7);
    assert_int_equal(ids[1], 128006);
    assert_int_equal(ids[3], 128007);
    assert_int_equal(ids[6], 128009);
    free(ids);
    assert_int_equal(forge_tok_token_type(l3, 128009), FORGE_TOK_CONTROL);
    assert_int_equal(forge_tok_token_type(l3, 9906), FORGE_TOK_NORMAL);
    assert_int_equal(forge_tok_token_type(l3, 1 << 20), 0);

    /* SPM: BOS 1 added, the empty text is just [BOS], space prefix after a special token */
    const forge_tok *spm = find_suite("llama-spm")->tok;
    assert_true(forge_tok_adds_bos(spm));
    encode_str(spm, "", true, false, &ids, &n);
    assert_int_equal(n, 1);
    assert_int_equal(ids[0], 1);
    free(ids);
    encode_str(spm, "Hello world", true, false, &ids, &n);
    assert_int_equal(n, 3);
    assert_int_equal(ids[0], 1);
    assert_int_equal(ids[1], 15043);
    assert_int_equal(ids[2], 3186);
    free(ids);
    int32_t *ids2;
    size_t n2;
    encode_str(spm, "<s>Hello world", false, true, &ids2, &n2);
    assert_int_equal(n2, 3);
    assert_int_equal(ids2[0], 1);
    assert_int_equal(ids2[1], 15043);
    free(ids2);
    assert_true(forge_tok_is_eog(spm, 2));
    size_t pl;
    assert_int_equal(forge_tok_piece(spm, 1, false, &pl)[0], 0);
    assert_int_equal(pl, 0);
    assert_memory_equal(forge_tok_piece(spm, 1, true, &pl), "<s>", 3);
    assert_null(forge_tok_piece(spm, -1, true, &pl));
    assert_null(forge_tok_piece(spm, 32000, true, &pl));

    /* gpt-2: no BOS added by default */
    const forge_tok *g2 = find_suite("gpt-2")->tok;
    assert_false(forge_tok_adds_bos(g2));
    encode_str(g2, "Hello", true, false, &ids, &n);
    assert_int_equal(n, 1);
    free(ids);
    /* deepseek-coder: add_bos_token=true in the file */
    assert_true(forge_tok_adds_bos(find_suite("deepseek-coder")->tok));
    assert_int_equal(forge_tok_bos(find_suite("deepseek-coder")->tok), 32013);

    /* decode errors */
    char *out = NULL;
    size_t ol;
    int32_t bad = 1 << 30;
    forge_err err = {0};
    assert_int_equal(forge_tok_decode(spm, &bad, 1, false, false, &out, &ol, &err), FORGE_E_RANGE);
    assert_null(out);
    assert_non_null(strstr(err.msg, "1073741824"));
}

static bool valid_utf8(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        size_t need;
        unsigned char lo = 0x80, hi = 0xbf;
        if (c < 0x80) { i++; continue; }
        if (c >= 0xc2 && c <= 0xdf) need = 1;
        else if (c >= 0xe0 && c <= 0xef) { need = 2; if (c == 0xe0) lo = 0xa0; if (c == 0xed) hi = 0x9f; }
        else if (c >= 0xf0 && c <= 0xf4) { need = 3; if (c == 0xf0) lo = 0x90; if (c == 0xf4) hi = 0x8f; }
        else return false;
        for (size_t k = 1; k <= need; k++) {
            if (i + k >= n) return false;
            unsigned char b = s[i + k];
            if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xbf)) return false;
        }
        i += need + 1;
    }
    return true;
}

static void test_stream(void **state)
{
    require_data();
    for (size_t v = 0; v < N_VOCABS; v++) {
        suite *s = &suites[v];
        for (size_t c = 0; c < s->n_cases; c++) {
            int32_t *ids = NULL;
            size_t n = 0;
            assert_int_equal(forge_tok_encode(s->tok, s->text[c], s->len[c], false, false, &ids, &n, NULL), 0);
            char *whole = NULL;
            size_t wl = 0;
            assert_int_equal(forge_tok_decode(s->tok, ids, n, false, false, &whole, &wl, NULL), 0);
            forge_detok_stream *st = NULL;
            assert_int_equal(forge_detok_stream_create(s->tok, false, &st, NULL), 0);
            char *acc = malloc(wl + 16);
            size_t al = 0;
            for (size_t i = 0; i < n; i++) {
                size_t l;
                const char *p = forge_detok_stream_push(st, ids[i], &l);
                assert_true(valid_utf8((const unsigned char *)p, l));
                assert_true(al + l <= wl);
                memcpy(acc + al, p, l);
                al += l;
            }
            size_t l;
            const char *p = forge_detok_stream_flush(st, &l);
            assert_true(al + l <= wl + 16);
            memcpy(acc + al, p, l);
            al += l;
            /* the suite texts are valid UTF-8, so the stream gives exactly the decoded text */
            assert_int_equal(al, wl);
            assert_memory_equal(acc, whole, wl);
            free(acc);
            free(whole);
            free(ids);
            forge_detok_stream_free(st);
        }
    }
    /* an emoji split over SPM byte tokens is held back until its last byte */
    const forge_tok *spm = find_suite("llama-spm")->tok;
    int32_t bytes[4];
    const unsigned char llama[4] = {0xf0, 0x9f, 0xa6, 0x99};
    char name[8];
    for (int i = 0; i < 4; i++) {
        snprintf(name, sizeof name, "<0x%02X>", llama[i]);
        bytes[i] = forge_tok_lookup(spm, name, 6);
        assert_true(bytes[i] >= 0);
    }
    forge_detok_stream *st = NULL;
    assert_int_equal(forge_detok_stream_create(spm, false, &st, NULL), 0);
    size_t l;
    for (int i = 0; i < 3; i++) {
        forge_detok_stream_push(st, bytes[i], &l);
        assert_int_equal(l, 0);
    }
    const char *p = forge_detok_stream_push(st, bytes[3], &l);
    assert_int_equal(l, 4);
    assert_memory_equal(p, llama, 4);
    /* a truncated sequence at the end is flushed as U+FFFD */
    forge_detok_stream_push(st, bytes[0], &l);
    forge_detok_stream_push(st, bytes[1], &l);
    assert_int_equal(l, 0);
    p = forge_detok_stream_flush(st, &l);
    assert_int_equal(l, 3);
    assert_memory_equal(p, "\xef\xbf\xbd", 3);
    /* an invalid byte mid-stream becomes U+FFFD, never raw */
    p = forge_detok_stream_push(st, bytes[2], &l);
    assert_true(valid_utf8((const unsigned char *)p, l));
    forge_detok_stream_free(st);
}

static void test_invalid_utf8(void **state)
{
    require_data();
    uint64_t rng = 777;
    unsigned char buf[300];
    for (size_t v = 0; v < N_VOCABS; v++) {
        for (int it = 0; it < 60; it++) {
            size_t len = tu_rand_u64(&rng) % sizeof buf;
            for (size_t i = 0; i < len; i++) {
                uint64_t r = tu_rand_u64(&rng);
                buf[i] = (r & 3) ? (unsigned char)(r >> 8) : (unsigned char)(0x20 + (r >> 8) % 95);
            }
            int32_t *ids = NULL;
            size_t n = 0;
            forge_err err = {0};
            assert_int_equal(forge_tok_encode(suites[v].tok, (const char *)buf, len, it & 1, it & 2, &ids, &n, &err), 0);
            for (size_t i = 0; i < n; i++)
                assert_true(ids[i] >= 0 && ids[i] < forge_tok_n_vocab(suites[v].tok));
            char *out = NULL;
            size_t ol;
            assert_int_equal(forge_tok_decode(suites[v].tok, ids, n, true, false, &out, &ol, NULL), 0);
            free(out);
            free(ids);
        }
    }
    /* BPE: an invalid byte is tokenized as U+FFFD (EF BF BD), as the reference does */
    const forge_tok *g2 = find_suite("gpt-2")->tok;
    int32_t *ids;
    size_t n;
    char *out;
    size_t ol;
    assert_int_equal(forge_tok_encode(g2, "a\xff" "b", 3, false, false, &ids, &n, NULL), 0);
    assert_int_equal(forge_tok_decode(g2, ids, n, false, false, &out, &ol, NULL), 0);
    assert_int_equal(ol, 5);
    assert_memory_equal(out, "a\xef\xbf\xbd" "b", 5);
    free(out);
    free(ids);
    /* SPM: byte fallback keeps the raw byte */
    const forge_tok *spm = find_suite("llama-spm")->tok;
    assert_int_equal(forge_tok_encode(spm, "a\xff" "b", 3, false, false, &ids, &n, NULL), 0);
    assert_int_equal(forge_tok_decode(spm, ids, n, false, true, &out, &ol, NULL), 0);
    assert_int_equal(ol, 3);
    assert_memory_equal(out, "a\xff" "b", 3);
    free(out);
    free(ids);
}

/* ---- built vocabularies (bad metadata, WordPiece) ----------------------------------------- */

typedef struct vocab_spec {
    const char *model, *pre;
    const char *const *tokens;
    size_t n_tokens;
    const int32_t *types;
    size_t n_types;
    const float *scores;
    size_t n_scores;
    const char *const *merges;
    size_t n_merges;
    int64_t bos; /* < -1: absent */
} vocab_spec;

static int write_vocab(const char *path, const vocab_spec *v, forge_err *err)
{
    gguf_writer *w = NULL;
    gguf_str *strs = NULL;
    int rc;
    if ((rc = gguf_writer_create(&w, err))) return rc;
    if (v->model && (rc = gguf_writer_set_str(w, "tokenizer.ggml.model", v->model, err))) goto done;
    if (v->pre && (rc = gguf_writer_set_str(w, "tokenizer.ggml.pre", v->pre, err))) goto done;
    strs = calloc(v->n_tokens + v->n_merges + 1, sizeof *strs);
    for (size_t i = 0; i < v->n_tokens; i++) strs[i] = (gguf_str){v->tokens[i], strlen(v->tokens[i])};
    if ((rc = gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", strs, v->n_tokens, err))) goto done;
    if (v->types && (rc = gguf_writer_set_arr(w, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, v->types, v->n_types, err))) goto done;
    if (v->scores && (rc = gguf_writer_set_arr(w, "tokenizer.ggml.scores", GGUF_TYPE_FLOAT32, v->scores, v->n_scores, err))) goto done;
    if (v->merges) {
        for (size_t i = 0; i < v->n_merges; i++) strs[i] = (gguf_str){v->merges[i], strlen(v->merges[i])};
        if ((rc = gguf_writer_set_arr_str(w, "tokenizer.ggml.merges", strs, v->n_merges, err))) goto done;
    }
    if (v->bos >= -1 && (rc = gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)v->bos, err))) goto done;
    rc = gguf_writer_write(w, path, NULL, NULL, 0, err);
done:
    free(strs);
    gguf_writer_free(w);
    return rc;
}

/* Load a built vocabulary; returns the status and fills err. */
static int load_built(const vocab_spec *v, forge_tok **tok, forge_err *err)
{
    char *dir = tu_mkdtemp();
    char path[512];
    gguf_ctx *g = NULL;
    snprintf(path, sizeof path, "%s/v.gguf", dir);
    int rc = write_vocab(path, v, err);
    assert_int_equal(rc, 0);
    rc = gguf_open(path, &g, err);
    assert_int_equal(rc, 0);
    rc = forge_tok_load(g, tok, err);
    gguf_close(g);
    tu_rmtree(dir);
    free(dir);
    return rc;
}

static const char *const bpe_tokens[] = {"a", "b", "c", "ab", "abc", "\xc4\xa0", "<|end|>"};
static const char *const bpe_merges[] = {"a b", "ab c"};

static void test_bad_metadata(void **state)
{
    forge_tok *tok = NULL;
    forge_err err = {0};
    vocab_spec v = {"gpt2", "gpt-2", bpe_tokens, 7, NULL, 0, NULL, 0, bpe_merges, 2, -2};

    /* a good one first: "abc" merges to one token, the unknown pre-tokenizer warns */
    v.pre = "no-such-pre";
    assert_int_equal(load_built(&v, &tok, &err), 0);
    assert_non_null(forge_tok_warning(tok));
    assert_non_null(strstr(forge_tok_warning(tok), "no-such-pre"));
    int32_t *ids;
    size_t n;
    encode_str(tok, "abc ab", false, false, &ids, &n);
    assert_int_equal(n, 3);
    assert_int_equal(ids[0], 4);
    assert_int_equal(ids[1], 5);
    assert_int_equal(ids[2], 3);
    free(ids);
    forge_tok_free(tok);
    tok = NULL;
    v.pre = "gpt-2";

    /* no merges for BPE */
    v.merges = NULL;
    memset(&err, 0, sizeof err);
    assert_int_equal(load_built(&v, &tok, &err), FORGE_E_FORMAT);
    assert_null(tok);
    assert_non_null(strstr(err.msg, "tokenizer.ggml.merges"));
    v.merges = bpe_merges;

    /* scores/token_type counts that do not match the tokens */
    const float scores[3] = {0};
    v.scores = scores, v.n_scores = 3;
    memset(&err, 0, sizeof err);
    assert_int_equal(load_built(&v, &tok, &err), FORGE_E_FORMAT);
    assert_non_null(strstr(err.msg, "tokenizer.ggml.scores"));
    v.scores = NULL, v.n_scores = 0;
    const int32_t types_short[2] = {1, 1};
    v.types = types_short, v.n_types = 2;
    memset(&err, 0, sizeof err);
    assert_int_equal(load_built(&v, &tok, &err), FORGE_E_FORMAT);
    assert_non_null(strstr(err.msg, "tokenizer.ggml.token_type"));

    /* a token type that does not exist */
    const int32_t types_bad[7] = {1, 1, 1, 1, 1, 9, 3};
    v.types = types_bad, v.n_types = 7;
    memset(&err, 0, sizeof err);
    assert_int_equal(load_built(&v, &tok, &err), FORGE_E_FORMAT);
    assert_non_null(strstr(err.msg, "tokenizer.ggml.token_type"));
    v.types = NULL, v.n_types = 0;

    /* bos id >= n_vocab */
    v.bos = 7;
    memset(&err, 0, sizeof err);
    assert_int_equal(load_built(&v, &tok, &err), FORGE_E_FORMAT);
    assert_non_null(strstr(err.msg, "tokenizer.ggml.bos_token_id"));
    v.bos = -1; /* 0xFFFFFFFF means none */
    assert_int_equal(load_built(&v, &tok, &err), 0);
    assert_int_equal(forge_tok_bos(tok), -1);
    forge_tok_free(tok);
    tok = NULL;
    v.bos = -2;

    /* no tokenizer model / unsupported model */
    v.model = NULL;
    memset(&err, 0, sizeof err);
    assert_int_equal(load_built(&v, &tok, &err), FORGE_E_FORMAT);
    assert_non_null(strstr(err.msg, "tokenizer.ggml.model"));
    v.model = "t5";
    memset(&err, 0, sizeof err);
    assert_int_equal(load_built(&v, &tok, &err), FORGE_E_UNSUPPORTED);
    assert_non_null(strstr(err.msg, "t5"));

    /* a duplicate token text */
    static const char *const dup[] = {"a", "b", "a"};
    vocab_spec d = {"llama", NULL, dup, 3, NULL, 0, NULL, 0, NULL, 0, -2};
    memset(&err, 0, sizeof err);
    assert_int_equal(load_built(&d, &tok, &err), FORGE_E_FORMAT);
    assert_non_null(strstr(err.msg, "tokenizer.ggml.tokens"));
}

static void test_wordpiece(void **state)
{
    static const char *const toks[] = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "\xe2\x96\x81hello",
                                       "\xe2\x96\x81world", "\xe2\x96\x81,", "\xe2\x96\x81!",
                                       "\xe2\x96\x81un", "aff", "able", "\xe2\x96\x81\xe4\xb8\xad"};
    static const int32_t types[] = {3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1};
    vocab_spec v = {"bert", NULL, toks, 12, types, 12, NULL, 0, NULL, 0, 2};
    forge_tok *tok = NULL;
    forge_err err = {0};
    /* the default unknown/separator ids (100, 102) are out of range here: disabled, as in the
     * reference */
    assert_int_equal(load_built(&v, &tok, &err), 0);
    assert_string_equal(forge_tok_model_name(tok), "bert");
    int32_t *ids;
    size_t n;
    encode_str(tok, "Hello, WORLD! unaffable H\xc3\xa9llo \xe4\xb8\xad", false, false, &ids, &n);
    static const int32_t want[] = {4, 6, 5, 7, 8, 9, 10, 4, 11};
    assert_int_equal(n, sizeof want / sizeof want[0]);
    assert_memory_equal(ids, want, sizeof want);
    free(ids);
    encode_str(tok, "hello", true, false, &ids, &n); /* [CLS] hello (no SEP id in this vocab) */
    assert_int_equal(n, 2);
    assert_int_equal(ids[0], 2);
    assert_int_equal(ids[1], 4);
    free(ids);
    forge_tok_free(tok);
}

/* SPM: splitting the work at word starts (spm_split) gives the same ids as one merge loop over
 * the whole fragment. */
static void test_spm_split(void **state)
{
    require_data();
    forge_tok *spm = find_suite("llama-spm")->tok;
    assert_true(spm->spm_split);
    uint64_t rng = 99;
    char buf[80 * 4 + 4];
    for (int it = 0; it < 200 + 46; it++) {
        const char *text = buf;
        size_t len;
        if (it < 46) {
            text = suites[0].text[it];
            len = suites[0].len[it];
        } else {
            len = random_utf8(&rng, buf, 80);
        }
        int32_t *a = NULL, *b = NULL;
        size_t na = 0, nb = 0;
        spm->spm_split = true;
        assert_int_equal(forge_tok_encode(spm, text, len, true, false, &a, &na, NULL), 0);
        spm->spm_split = false;
        assert_int_equal(forge_tok_encode(spm, text, len, true, false, &b, &nb, NULL), 0);
        spm->spm_split = true;
        assert_true(ids_equal(a, na, b, nb));
        free(a);
        free(b);
    }
}

/* BPE: the per-call word cache changes nothing (a long text of repeated words) */
static void test_bpe_cache(void **state)
{
    require_data();
    size_t cap = 0, len = 0;
    for (size_t c = 0; c < suites[0].n_cases; c++) cap += suites[0].len[c] + 1;
    char *text = malloc(cap * 4);
    for (int rep = 0; rep < 4; rep++)
        for (size_t c = 0; c < suites[0].n_cases; c++) {
            memcpy(text + len, suites[0].text[c], suites[0].len[c]);
            len += suites[0].len[c];
            text[len++] = rep & 1 ? '\n' : ' ';
        }
    for (size_t v = 1; v < N_VOCABS; v++) {
        forge_tok *tok = suites[v].tok;
        int32_t *a = NULL, *b = NULL;
        size_t na = 0, nb = 0;
        assert_true(tok->bpe_cache);
        assert_int_equal(forge_tok_encode(tok, text, len, false, false, &a, &na, NULL), 0);
        tok->bpe_cache = false;
        assert_int_equal(forge_tok_encode(tok, text, len, false, false, &b, &nb, NULL), 0);
        tok->bpe_cache = true;
        assert_true(na > 256);
        assert_true(ids_equal(a, na, b, nb));
        free(a);
        free(b);
    }
    free(text);
}

/* Every pre-tokenizer name GGUF files carry loads without a warning, and its split loses or
 * duplicates no byte: with a vocabulary holding all 256 byte symbols, each suite text
 * round-trips. */
static void test_pre_tokenizers(void **state)
{
    static const char *const names[] = {"default", "llama3", "llama-v3", "llama-bpe", "falcon3",
        "qwen2", "deepseek-r1-qwen", "gpt-2", "phi-2", "deepseek-llm", "deepseek-coder",
        "deepseek-v3", "falcon", "mpt", "starcoder", "refact", "command-r", "stablelm2", "olmo",
        "dbrx", "smaug-bpe", "poro-chat", "jais", "tekken", "smollm", "codeshell", "bloom",
        "gpt3-finnish", "exaone", "chameleon", "minerva-7b", "gpt-4o", "llama4", "chatglm-bpe",
        "viking", "megrez", "jina-v2-code", "roberta-bpe", "superbpe", "trillion", "bailingmoe",
        "seed-coder", "grok-2", "pixtral"};
    static char byte_tok[256][4];
    const char *toks[260];
    size_t nt = 0;
    for (int b = 0; b < 256; b++) {
        uint32_t c = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || b >= 0xae ? (uint32_t)b
                     : b <= 0x20 ? 256u + (uint32_t)b : b == 0xad ? 323u : 289u + (uint32_t)(b - 0x7f);
        if (c < 0x80) byte_tok[b][0] = (char)c;
        else {
            byte_tok[b][0] = (char)(0xc0 | (c >> 6));
            byte_tok[b][1] = (char)(0x80 | (c & 0x3f));
        }
        toks[nt++] = byte_tok[b];
    }
    toks[nt++] = "\xc4\xa0t";
    toks[nt++] = "he";
    toks[nt++] = "\xc4\xa0the";
    toks[nt++] = "<|endoftext|>";
    static const char *const merges[] = {"\xc4\xa0 t", "h e", "\xc4\xa0t he"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        vocab_spec v = {"gpt2", names[i], toks, nt, NULL, 0, NULL, 0, merges, 3, 0};
        forge_tok *tok = NULL;
        forge_err err = {0};
        assert_int_equal(load_built(&v, &tok, &err), 0);
        if (forge_tok_warning(tok)) print_message("%s: %s\n", names[i], forge_tok_warning(tok));
        assert_null(forge_tok_warning(tok));
        int32_t *ids;
        size_t n;
        encode_str(tok, " the theme", false, false, &ids, &n);
        assert_true(n >= 2);
        free(ids);
        if (have_data) {
            for (size_t c = 0; c < suites[0].n_cases; c++)
                if (!round_trip(tok, suites[0].text[c], suites[0].len[c]))
                    fail_msg("pre-tokenizer %s loses bytes of case %zu", names[i], c);
        }
        forge_tok_free(tok);
    }
}

typedef struct thread_arg {
    const suite *s;
    int ok;
} thread_arg;

static void *thread_main(void *p)
{
    thread_arg *a = p;
    a->ok = 1;
    for (int rep = 0; rep < 3; rep++) {
        for (size_t c = 0; c < a->s->n_cases; c++) {
            int32_t *ids = NULL;
            size_t n = 0;
            if (forge_tok_encode(a->s->tok, a->s->text[c], a->s->len[c], false, false, &ids, &n, NULL) ||
                !ids_equal(ids, n, a->s->want[c], a->s->n_want[c]))
                a->ok = 0;
            free(ids);
        }
    }
    return NULL;
}

static void test_threads(void **state)
{
    require_data();
    enum { NT = 6 };
    pthread_t th[NT];
    thread_arg args[NT];
    for (int i = 0; i < NT; i++) {
        static const char *const which[NT] = {"llama-bpe", "llama-bpe", "llama-bpe",
                                              "llama-spm", "gpt-2", "starcoder"};
        args[i].s = find_suite(which[i]);
        assert_int_equal(pthread_create(&th[i], NULL, thread_main, &args[i]), 0);
    }
    for (int i = 0; i < NT; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(args[i].ok, 1);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_suites),
        cmocka_unit_test(test_round_trip_suites),
        cmocka_unit_test(test_round_trip_random),
        cmocka_unit_test(test_special_tokens),
        cmocka_unit_test(test_stream),
        cmocka_unit_test(test_invalid_utf8),
        cmocka_unit_test(test_bad_metadata),
        cmocka_unit_test(test_wordpiece),
        cmocka_unit_test(test_spm_split),
        cmocka_unit_test(test_bpe_cache),
        cmocka_unit_test(test_pre_tokenizers),
        cmocka_unit_test(test_threads),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
