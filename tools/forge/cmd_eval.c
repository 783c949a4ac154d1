/* cmd_eval.c - `forge eval`: run token ids (no BOS added) through the model in one decode and
 * write the raw logits of every position as float32 little-endian [n_tokens x n_vocab]. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli_io.h"
#include "commands.h"
#include "engine_opts.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: forge eval -m MODEL --tokens \"ID ID ...\" --logits OUT.f32 [options]\n"
            "Runs the ids (no BOS is added) and writes the logits of every position,\n"
            "float32 little-endian, [n_tokens x n_vocab].\n%s",
            engine_opts_help);
}

/* Parse "ID ID ..." (spaces, commas or newlines between) into a malloc'd array. */
static int parse_ids(const char *s, int32_t **out, int32_t *n_out)
{
    size_t cap = 16, n = 0;
    int32_t *ids = malloc(cap * sizeof *ids);
    if (!ids) return -1;
    while (*s) {
        while (*s == ' ' || *s == ',' || *s == '\n' || *s == '\t' || *s == '[' || *s == ']')
            s++;
        if (!*s) break;
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v < 0 || v > INT32_MAX) {
            free(ids);
            return -1;
        }
        if (n == cap) {
            int32_t *p = realloc(ids, (cap *= 2) * sizeof *ids);
            if (!p) {
                free(ids);
                return -1;
            }
            ids = p;
        }
        ids[n++] = (int32_t)v;
        s = end;
    }
    *out = ids;
    *n_out = (int32_t)n;
    return 0;
}

int cmd_eval(int argc, char **argv)
{
    engine_opts o;
    const char *tokens = NULL, *out_path = NULL;
    forge_model *model = NULL;
    forge_context *ctx = NULL;
    int32_t *ids = NULL, n = 0;
    cli_out out = {0};
    forge_err err = {0};
    int status = 1;

    engine_opts_init(&o);
    for (int i = 1; i < argc; i++) {
        int r = engine_opts_parse(&o, "eval", argc, argv, &i);
        if (r < 0) return 2;
        if (r > 0) continue;
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(argv[i], "--tokens") && i + 1 < argc) {
            tokens = argv[++i];
        } else if (!strcmp(argv[i], "--logits") && i + 1 < argc) {
            out_path = argv[++i];
        } else {
            fprintf(stderr, "forge eval: unknown option '%s'\n", argv[i]);
            usage(stderr);
            return 2;
        }
    }
    if (!tokens || !out_path) {
        fprintf(stderr, "forge eval: %s is required\n",
                !tokens && !out_path ? "--tokens \"ID ...\" and --logits OUT.f32"
                : !tokens            ? "--tokens \"ID ...\""
                                     : "--logits OUT.f32");
        usage(stderr);
        return 2;
    }
    if (parse_ids(tokens, &ids, &n) || n == 0) {
        fprintf(stderr, "forge eval: --tokens must be a non-empty list of non-negative integers\n");
        free(ids);
        return 2;
    }
    /* before the model loads: the logits never go onto the model */
    if (!cli_out_check("eval", "--logits", out_path, &o.model_path, 1, false)) goto done;
    if ((status = engine_load(&o, "eval", &model, &ctx))) goto done;
    status = 1;
    if (n > forge_context_n_ctx(ctx)) {
        fprintf(stderr, "forge eval: %d tokens are longer than the context (%d); use -c\n", n,
                forge_context_n_ctx(ctx));
        goto done;
    }
    if (forge_decode(ctx, ids, n, true, &err)) {
        fprintf(stderr, "forge eval: %s\n", err.msg);
        goto done;
    }
    if (cli_out_open(&out, "eval", "--logits", out_path, &o.model_path, 1, false, true)) goto done;
    const int32_t V = forge_model_info_get(model)->n_vocab;
    for (int32_t i = 0; i < n; i++)
        if (cli_out_write(&out, forge_get_logits(ctx, i), sizeof(float) * (size_t)V)) break;
    if (cli_out_commit(&out)) goto done; /* a failed write leaves no partial file */
    fprintf(stderr, "forge eval: wrote %d x %d logits to %s\n", n, V, out_path);
    status = 0;
done:
    cli_out_abort(&out);
    free(ids);
    forge_context_free(ctx);
    forge_model_free(model);
    return status;
}
