/* cmd_detokenize.c - 'forge detokenize': token ids to text. Ids come from the arguments (or stdin
 * when none are given), separated by spaces, commas or brackets ("1 2 3", "[1, 2, 3]"). The text
 * is written byte-exact, with no newline added. */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "forge.h"
#include "cli_io.h"
#include "commands.h"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: forge detokenize -m MODEL [--special] [--strip-space] ID...\n"
            "  -m, --model FILE   GGUF file (a vocab-only file works)\n"
            "      --special      render control tokens (<s>, <|eot_id|>, ...) as text\n"
            "      --strip-space  drop the space prefix SentencePiece vocabularies add\n"
            "  IDs may also be given on stdin.\n");
}

/* Append every integer in s to the id list. Returns 0, or -1 on a non-number. */
static int parse_ids(const char *s, int32_t **ids, size_t *n, size_t *cap)
{
    while (*s) {
        if (isspace((unsigned char)*s) || *s == ',' || *s == '[' || *s == ']') {
            s++;
            continue;
        }
        char *end;
        errno = 0;
        long v = strtol(s, &end, 10);
        if (end == s || errno || v < INT32_MIN || v > INT32_MAX) return -1;
        if (*n == *cap) {
            size_t c = *cap ? *cap * 2 : 64;
            int32_t *p = realloc(*ids, c * sizeof *p);
            if (!p) return -1;
            *ids = p;
            *cap = c;
        }
        (*ids)[(*n)++] = (int32_t)v;
        s = end;
    }
    return 0;
}

int cmd_detokenize(int argc, char **argv)
{
    const char *model = NULL;
    bool special = false, strip = false, any_arg = false;
    int32_t *ids = NULL;
    size_t n = 0, cap = 0;
    int status = 1;
    gguf_ctx *g = NULL;
    forge_tok *tok = NULL;
    char *text = NULL;
    size_t tl = 0;
    forge_err err = {0};

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if ((!strcmp(a, "-m") || !strcmp(a, "--model")) && i + 1 < argc) model = argv[++i];
        else if (!strcmp(a, "--special")) special = true;
        else if (!strcmp(a, "--strip-space")) strip = true;
        else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (a[0] == '-' && !isdigit((unsigned char)a[1])) {
            fprintf(stderr, "forge detokenize: unknown or incomplete option '%s'\n", a);
            usage(stderr);
            return 2;
        } else {
            any_arg = true;
            if (parse_ids(a, &ids, &n, &cap)) {
                fprintf(stderr, "forge detokenize: '%s' is not a token id\n", a);
                free(ids);
                return 2;
            }
        }
    }
    if (!model) {
        fprintf(stderr, "forge detokenize: -m MODEL is required\n");
        usage(stderr);
        free(ids);
        return 2;
    }
    if (!any_arg) {
        /* whole, not line by line: a fixed-size line buffer would split a number */
        char *in = cli_read_file("detokenize", "ids from", "-", NULL);
        if (!in) goto done;
        int bad = parse_ids(in, &ids, &n, &cap);
        free(in);
        if (bad) {
            fprintf(stderr, "forge detokenize: stdin holds something that is not a token id\n");
            status = 2;
            goto done;
        }
    }
    if (gguf_open(model, &g, &err) || forge_tok_load(g, &tok, &err) ||
        forge_tok_decode(tok, ids, n, special, strip, &text, &tl, &err)) {
        fprintf(stderr, "forge detokenize: %s\n", err.msg);
        goto done;
    }
    fwrite(text, 1, tl, stdout);
    status = cli_stdout_ok("detokenize") ? 0 : 1;
done:
    free(text);
    free(ids);
    forge_tok_free(tok);
    gguf_close(g);
    return status;
}
