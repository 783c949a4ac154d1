/* bench_tok.c - tokenizer throughput: encodes a multi-megabyte mix of English prose, C/Python code
 * and CJK text (built here from snippets, repeated) with the shared test vocabularies and prints
 * MB/s for encode and decode, plus the vocabulary load time.
 *   usage: bench_tok [MB] [vocab-name...]   (default 4 MB; gpt-2 llama-spm llama-bpe)
 * Vocabularies come from $FORGE_SHARED/testdata/vocab (default ../shared/testdata/vocab). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "forge.h"

static const char *const snippets[] = {
    "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of "
    "times, it was the age of wisdom, it was the age of foolishness. ",
    "In 1984, researchers measured 3,141 samples at 27.5 degrees; the results (see Table 2) were "
    "surprising: \"we didn't expect that,\" they said. ",
    "static int add(const int *a, size_t n)\n{\n    int s = 0;\n    for (size_t i = 0; i < n; i++)\n"
    "        s += a[i];\n    return s;\n}\n",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n"
    "print([fib(i) for i in range(10)])\n",
    "\xe4\xbb\x8a\xe5\xa4\xa9\xe5\xa4\xa9\xe6\xb0\x94\xe5\xbe\x88\xe5\xa5\xbd\xef\xbc\x8c\xe6\x88\x91"
    "\xe4\xbb\xac\xe5\x8e\xbb\xe5\x85\xac\xe5\x9b\xad\xe6\x95\xa3\xe6\xad\xa5\xe5\x90\xa7\xe3\x80\x82",
    "\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e\xe3\x81\xae\xe3\x83\x86\xe3\x82\xad\xe3\x82\xb9\xe3\x83\x88"
    "\xe3\x82\x82\xe5\x90\xab\xe3\x81\xbe\xe3\x82\x8c\xe3\x81\xa6\xe3\x81\x84\xe3\x81\xbe\xe3\x81\x99"
    "\xe3\x80\x82\n",
    "\xed\x95\x9c\xea\xb5\xad\xec\x96\xb4 \xeb\xac\xb8\xec\x9e\xa5\xeb\x8f\x84 \xec\x9e\x88\xec\x8a"
    "\xb5\xeb\x8b\x88\xeb\x8b\xa4. ",
    "    <div class=\"row\">{{ item.name }}</div>\n\t\t// TODO: fix   the   spacing\n",
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static char *build_text(size_t target, size_t *len)
{
    char *buf = malloc(target + 4096);
    size_t n = 0, k = 0;
    if (!buf) return NULL;
    while (n < target) {
        const char *s = snippets[(k * 7 + k / 3) % (sizeof snippets / sizeof snippets[0])];
        size_t l = strlen(s);
        memcpy(buf + n, s, l);
        n += l;
        k++;
    }
    *len = n;
    return buf;
}

int main(int argc, char **argv)
{
    double mb = argc > 1 ? atof(argv[1]) : 4.0;
    if (mb <= 0) mb = 4.0;
    const char *def[] = {"gpt-2", "llama-spm", "llama-bpe"};
    const char **names = argc > 2 ? (const char **)argv + 2 : def;
    int n_names = argc > 2 ? argc - 2 : 3;
    const char *root = getenv("FORGE_SHARED");
    size_t len = 0;
    char *text = build_text((size_t)(mb * 1024 * 1024), &len);
    if (!text) return 1;
    printf("text: %.2f MB (English, code, CJK mix)\n", len / 1048576.0);
    for (int i = 0; i < n_names; i++) {
        char path[1024];
        snprintf(path, sizeof path, "%s/testdata/vocab/ggml-vocab-%s.gguf", root && *root ? root : "../shared",
                 names[i]);
        forge_err err = {0};
        gguf_ctx *g = NULL;
        forge_tok *tok = NULL;
        double t0 = now();
        if (gguf_open(path, &g, &err) || forge_tok_load(g, &tok, &err)) {
            printf("%-12s skipped: %s\n", names[i], err.msg);
            gguf_close(g);
            continue;
        }
        double t_load = now() - t0;
        int32_t *ids = NULL;
        size_t n = 0;
        t0 = now();
        if (forge_tok_encode(tok, text, len, false, false, &ids, &n, &err)) {
            printf("%-12s encode failed: %s\n", names[i], err.msg);
            forge_tok_free(tok);
            gguf_close(g);
            continue;
        }
        double t_enc = now() - t0;
        char *out = NULL;
        size_t ol = 0;
        t0 = now();
        forge_tok_decode(tok, ids, n, false, false, &out, &ol, &err);
        double t_dec = now() - t0;
        printf("%-12s load %6.1f ms  encode %7.2f MB/s (%zu tokens, %.2f bytes/token)  decode %8.1f MB/s\n",
               names[i], t_load * 1e3, len / 1048576.0 / t_enc, n, (double)len / (double)n,
               ol / 1048576.0 / t_dec);
        free(out);
        free(ids);
        forge_tok_free(tok);
        gguf_close(g);
    }
    free(text);
    return 0;
}
