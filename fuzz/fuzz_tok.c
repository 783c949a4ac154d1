/* fuzz_tok.c - libFuzzer target for the tokenizers: random bytes (invalid UTF-8, long inputs,
 * special-token look-alikes) go through encode, decode, pieces and the streaming detokenizer of
 * several vocabularies loaded once. Checks: no crash or leak (ASan), every id in range, the stream
 * only ever emits valid UTF-8, and for byte-level BPE a valid UTF-8 text round-trips exactly.
 *
 * Vocabularies: ggml-vocab-{llama-spm,llama-bpe,gpt-2}.gguf from $FORGE_SHARED/testdata/vocab or
 * ../shared/testdata/vocab when present, plus two small ones built in memory (SPM with byte
 * fallback, WordPiece) so the target never silently does nothing.
 *
 * Input: byte 0 selects vocabulary and flags, byte 1 a repeat count (long inputs), the rest is the
 * text; the same bytes, read as 16-bit numbers, are also detokenized as ids. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "forge.h"

#define MAX_VOCABS 8

typedef struct fvocab {
    gguf_ctx *g;
    forge_tok *tok;
    void *mem;  /* backing buffer of an in-memory GGUF */
    bool bpe;   /* byte-level BPE with every byte: valid UTF-8 must round-trip */
} fvocab;

static fvocab vocabs[MAX_VOCABS];
static int n_vocabs;

static void add_file(const char *dir, const char *name, bool bpe)
{
    char path[1024];
    forge_err err = {0};
    snprintf(path, sizeof path, "%s/ggml-vocab-%s.gguf", dir, name);
    if (access(path, R_OK)) return;
    fvocab *v = &vocabs[n_vocabs];
    if (gguf_open(path, &v->g, &err) || forge_tok_load(v->g, &v->tok, &err)) {
        fprintf(stderr, "fuzz_tok: %s: %s\n", path, err.msg);
        abort();
    }
    v->bpe = bpe;
    n_vocabs++;
}

/* Build a GGUF with the writer (it writes files), read it back into memory, open it there. */
static void add_built(const char *model, const char *const *toks, size_t n, const int32_t *types,
                      const float *scores)
{
    char path[] = "/tmp/fuzz_tok_XXXXXX";
    int fd = mkstemp(path);
    forge_err err = {0};
    gguf_writer *w = NULL;
    gguf_str strs[300];
    if (fd < 0 || n > 300) abort();
    close(fd);
    for (size_t i = 0; i < n; i++) strs[i] = (gguf_str){toks[i], strlen(toks[i])};
    if (gguf_writer_create(&w, &err) || gguf_writer_set_str(w, "tokenizer.ggml.model", model, &err) ||
        gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", strs, n, &err) ||
        gguf_writer_set_arr(w, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, types, n, &err) ||
        (scores && gguf_writer_set_arr(w, "tokenizer.ggml.scores", GGUF_TYPE_FLOAT32, scores, n, &err)) ||
        gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", 1, &err) ||
        gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", 2, &err) ||
        gguf_writer_write(w, path, NULL, NULL, 0, &err)) {
        fprintf(stderr, "fuzz_tok: building a %s vocab: %s\n", model, err.msg);
        abort();
    }
    gguf_writer_free(w);
    FILE *f = fopen(path, "rb");
    fvocab *v = &vocabs[n_vocabs];
    if (!f) abort();
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    v->mem = malloc((size_t)sz);
    if (!v->mem || fread(v->mem, 1, (size_t)sz, f) != (size_t)sz) abort();
    fclose(f);
    unlink(path);
    if (gguf_open_memory(v->mem, (size_t)sz, model, &v->g, &err) || forge_tok_load(v->g, &v->tok, &err)) {
        fprintf(stderr, "fuzz_tok: built %s vocab: %s\n", model, err.msg);
        abort();
    }
    n_vocabs++;
}

static void build_small_vocabs(void)
{
    /* SPM: <unk> <s> </s>, 256 byte tokens, a few merges */
    static char names[256][8];
    const char *toks[300];
    int32_t types[300];
    float scores[300];
    size_t n = 0;
    toks[n] = "<unk>", types[n] = 2, scores[n++] = 0;
    toks[n] = "<s>", types[n] = 3, scores[n++] = 0;
    toks[n] = "</s>", types[n] = 3, scores[n++] = 0;
    for (int b = 0; b < 256; b++) {
        snprintf(names[b], sizeof names[b], "<0x%02X>", b);
        toks[n] = names[b], types[n] = 6, scores[n++] = 0;
    }
    static const char *const pieces[] = {"\xe2\x96\x81", "a", "b", "ab", ("\xe2\x96\x81" "ab"),
                                         "<", ">", "<s", "\xe4\xb8\xad", "\xe2\x96\x81\xe4\xb8\xad"};
    for (size_t i = 0; i < sizeof pieces / sizeof pieces[0]; i++)
        toks[n] = pieces[i], types[n] = 1, scores[n] = -(float)i, n++;
    add_built("llama", toks, n, types, scores);

    /* WordPiece */
    static const char *const wp[] = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "\xe2\x96\x81hello", "\xe2\x96\x81,",
                                     ("\xe2\x96\x81" "a"), "b", "ab", "\xe2\x96\x81\xe4\xb8\xad"};
    int32_t wt[10] = {3, 3, 3, 3, 1, 1, 1, 1, 1, 1};
    add_built("bert", wp, 10, wt, NULL);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    const char *root = getenv("FORGE_SHARED");
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/testdata/vocab", root && *root ? root : "../shared");
    add_file(dir, "llama-spm", false);
    add_file(dir, "llama-bpe", true);
    add_file(dir, "gpt-2", true);
    build_small_vocabs();
    fprintf(stderr, "fuzz_tok: %d vocabularies loaded\n", n_vocabs);
    return 0;
}

static bool valid_utf8(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        size_t need;
        unsigned char lo = 0x80, hi = 0xbf;
        if (c < 0x80) {
            i++;
            continue;
        }
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
            return false;
        }
        for (size_t k = 1; k <= need; k++) {
            if (i + k >= n) return false;
            unsigned char b = s[i + k];
            if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xbf)) return false;
        }
        i += need + 1;
    }
    return true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2 || n_vocabs == 0) return 0;
    uint8_t flags = data[0];
    size_t reps = data[1] >= 0xfc ? (size_t)(data[1] - 0xfb) * 16 : 1; /* up to 64x: long inputs */
    const fvocab *v = &vocabs[(flags & 7) % n_vocabs];
    bool add_special = flags & 8, parse_special = flags & 16, special = flags & 32, strip = flags & 64;
    const char *body = (const char *)data + 2;
    size_t blen = size - 2;
    char *text = malloc(blen * reps + 1);
    if (!text) return 0;
    for (size_t r = 0; r < reps; r++) memcpy(text + r * blen, body, blen);
    size_t len = blen * reps;

    forge_err err = {0};
    int32_t *ids = NULL;
    size_t n = 0;
    char *out = NULL;
    size_t ol = 0;
    int32_t nv = forge_tok_n_vocab(v->tok);
    if (forge_tok_encode(v->tok, text, len, add_special, parse_special, &ids, &n, &err)) {
        fprintf(stderr, "encode failed: %s\n", err.msg);
        abort();
    }
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= nv) abort();
    if (forge_tok_decode(v->tok, ids, n, special, strip, &out, &ol, &err)) abort();
    if (v->bpe && !add_special && !parse_special && !strip && valid_utf8((const unsigned char *)text, len)) {
        char *plain = NULL;
        size_t pl = 0;
        if (forge_tok_decode(v->tok, ids, n, false, false, &plain, &pl, &err)) abort();
        if (pl != len || memcmp(plain, text, len)) {
            fprintf(stderr, "round trip differs (%zu vs %zu bytes)\n", pl, len);
            abort();
        }
        free(plain);
    }

    /* streaming: always valid UTF-8; for valid input the stream equals the decode */
    forge_detok_stream *st = NULL;
    if (forge_detok_stream_create(v->tok, special, &st, &err)) abort();
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        size_t l;
        const char *p = forge_detok_stream_push(st, ids[i], &l);
        if (!valid_utf8((const unsigned char *)p, l)) abort();
        total += l;
    }
    size_t l;
    const char *p = forge_detok_stream_flush(st, &l);
    if (!valid_utf8((const unsigned char *)p, l)) abort();
    total += l;
    if (valid_utf8((const unsigned char *)out, ol) && !strip && total != ol) abort();

    /* the raw bytes as ids (some out of range) through the stream and decode */
    for (size_t i = 0; i + 1 < blen; i += 2) {
        int32_t id = (int32_t)(((uint32_t)(unsigned char)body[i] << 8 | (unsigned char)body[i + 1]) %
                               (uint32_t)(nv + 8)) - 4;
        size_t pl;
        forge_tok_piece(v->tok, id, special, &pl);
        p = forge_detok_stream_push(st, id, &l);
        if (!valid_utf8((const unsigned char *)p, l)) abort();
    }
    p = forge_detok_stream_flush(st, &l);
    if (!valid_utf8((const unsigned char *)p, l)) abort();
    forge_detok_stream_free(st);

    free(out);
    free(ids);
    free(text);
    return 0;
}
