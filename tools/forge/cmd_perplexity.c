/* cmd_perplexity.c - `forge perplexity`: llama.cpp's perplexity method. The whole text is
 * tokenized with BOS; it is cut into non-overlapping chunks of n_ctx tokens (the rest is
 * dropped); each chunk runs from an empty KV cache with its first token replaced by BOS; only
 * the second half of each chunk is scored (position i predicts token i+1 for
 * i = n_ctx/2 .. n_ctx-2). Prints the running estimate after each chunk, then
 * "Final estimate: PPL = X +/- Y" where Y = PPL * sqrt((E[nll^2] - E[nll]^2) / (N-1)). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli_io.h"
#include "commands.h"
#include "engine_opts.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: forge perplexity -m MODEL -f TEXT [options]\n"
            "  -f, --file FILE      the text (a final newline is dropped, as llama.cpp does)\n"
            "  --chunks N           score at most N chunks (default: all)\n"
            "%s",
            engine_opts_help);
}

/* -log softmax(logits)[tok], as llama.cpp computes it (float max, double sum of expf). */
static double nll_of(const float *logits, int n_vocab, int32_t tok)
{
    float max = logits[0];
    for (int i = 1; i < n_vocab; i++)
        if (logits[i] > max) max = logits[i];
    double sum = 0.0;
    for (int i = 0; i < n_vocab; i++)
        sum += expf(logits[i] - max);
    return -((double)(logits[tok] - max) - log(sum));
}

int cmd_perplexity(int argc, char **argv)
{
    engine_opts o;
    const char *path = NULL;
    long max_chunks = -1;
    forge_model *model = NULL;
    forge_context *ctx = NULL;
    char *text = NULL;
    size_t text_len = 0;
    int32_t *tokens = NULL, *chunk = NULL;
    size_t n_tokens = 0;
    forge_err err = {0};
    int status = 1;

    engine_opts_init(&o);
    for (int i = 1; i < argc; i++) {
        int r = engine_opts_parse(&o, "perplexity", argc, argv, &i);
        if (r < 0) return 2;
        if (r > 0) continue;
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            usage(stdout);
            return 0;
        } else if ((!strcmp(argv[i], "-f") || !strcmp(argv[i], "--file")) && i + 1 < argc) {
            path = argv[++i];
        } else if (!strcmp(argv[i], "--chunks") && i + 1 < argc) {
            if (!cli_parse_int("perplexity", "--chunks", argv[++i], 1, 1L << 30, &max_chunks))
                return 2;
        } else {
            fprintf(stderr, "forge perplexity: unknown option or missing value '%s'\n", argv[i]);
            usage(stderr);
            return 2;
        }
    }
    if (!path) {
        fprintf(stderr, "forge perplexity: -f TEXTFILE is required\n");
        usage(stderr);
        return 2;
    }
    if (!o.model_path) {
        fprintf(stderr, "forge perplexity: -m MODEL is required\n");
        return 2;
    }
    text = cli_read_file("perplexity", "text file", path, &text_len);
    if (!text) return 1;
    if (text_len > 0 && text[text_len - 1] == '\n') text[--text_len] = '\0';
    if ((status = engine_load(&o, "perplexity", &model, &ctx))) goto done;
    status = 1;
    const forge_tok *tok = forge_model_tok(model);
    const int n_vocab = forge_model_info_get(model)->n_vocab;
    const int n_ctx = forge_context_n_ctx(ctx);
    if (forge_tok_encode(tok, text, text_len, true, false, &tokens, &n_tokens, &err)) {
        fprintf(stderr, "forge perplexity: %s\n", err.msg);
        goto done;
    }
    if (n_ctx < 4) {
        fprintf(stderr, "forge perplexity: a context of %d token%s is too short\n", n_ctx,
                cli_plural(n_ctx));
        goto done;
    }
    if (n_tokens < 2 * (size_t)n_ctx) {
        fprintf(stderr,
                "forge perplexity: you need at least %d tokens to evaluate perplexity with a "
                "context of %d; "
                "%s tokenizes to only %zu token%s\n",
                2 * n_ctx, n_ctx, path, n_tokens, cli_plural((long long)n_tokens));
        goto done;
    }
    const bool add_bos = forge_tok_adds_bos(tok);
    const int32_t bos = forge_tok_bos(tok);
    long n_chunk = (long)(n_tokens / (size_t)n_ctx);
    if (max_chunks > 0 && max_chunks < n_chunk) n_chunk = max_chunks;
    const int first = n_ctx / 2;
    chunk = malloc((size_t)n_ctx * sizeof *chunk);
    if (!chunk) goto done;
    fprintf(stderr,
            "forge perplexity: %zu tokens; calculating perplexity over %ld chunk%s, n_ctx=%d\n",
            n_tokens, n_chunk, cli_plural(n_chunk), n_ctx);

    double nll = 0, nll2 = 0, t0 = cli_now();
    long count = 0;
    for (long c = 0; c < n_chunk; c++) {
        memcpy(chunk, tokens + (size_t)c * n_ctx, (size_t)n_ctx * sizeof *chunk);
        if (add_bos && bos >= 0) chunk[0] = bos;
        if (forge_kv_truncate(ctx, 0, &err) || forge_decode(ctx, chunk, n_ctx, true, &err)) {
            fprintf(stderr, "\nforge perplexity: %s\n", err.msg);
            goto done;
        }
        const int32_t *orig = tokens + (size_t)c * n_ctx; /* scored against the original tokens */
        for (int i = first; i < n_ctx - 1; i++) {
            double v = nll_of(forge_get_logits(ctx, i), n_vocab, orig[i + 1]);
            nll += v;
            nll2 += v * v;
        }
        count += n_ctx - first - 1;
        if (c == 0) {
            double dt = cli_now() - t0;
            fprintf(stderr, "forge perplexity: %.2f seconds per pass - ETA %.2f minutes\n", dt,
                    dt * (double)n_chunk / 60.0);
        }
        printf("[%ld]%.4f,", c + 1, exp(nll / (double)count));
        if (!cli_stdout_ok("perplexity")) goto done;
    }
    printf("\n");
    nll /= (double)count;
    nll2 /= (double)count;
    const double ppl = exp(nll);
    nll2 -= nll * nll;
    if (nll2 > 0 && count > 1) {
        printf("Final estimate: PPL = %.4f +/- %.5f\n", ppl,
               sqrt(nll2 / (double)(count - 1)) * ppl);
    } else {
        printf("Final estimate: PPL = %.4f\n", ppl);
        fprintf(stderr, "forge perplexity: unexpected negative variance of log(prob)\n");
    }
    status = 0;
done:
    free(chunk);
    free(tokens);
    free(text);
    forge_context_free(ctx);
    forge_model_free(model);
    return status;
}
