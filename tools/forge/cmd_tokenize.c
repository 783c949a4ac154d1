/* cmd_tokenize.c - 'forge tokenize': text to token ids with the model's tokenizer.
 * The input is taken byte-exact (from -p, -f or stdin): nothing is stripped or added. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "forge.h"
#include "cli_io.h"
#include "commands.h"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: forge tokenize -m MODEL [-p TEXT | -f FILE] [--ids] [--no-special] "
            "[--parse-special]\n"
            "  -m, --model FILE     GGUF file (a vocab-only file works)\n"
            "  -p, --prompt TEXT    text to tokenize\n"
            "  -f, --file FILE      read the text from FILE (byte-exact); stdin if neither\n"
            "      --ids            print only the ids on one line, each preceded by a space\n"
            "                       (the format of llama.cpp's tokenizer test .out files)\n"
            "      --no-special     do not add BOS/EOS\n"
            "      --parse-special  text spelling a control token becomes that token\n"
            "Without --ids, one line per token: ID -> 'PIECE', where the piece's bytes are\n"
            "printed as they are except a backslash (\\\\), newline (\\n), carriage return (\\r),\n"
            "tab (\\t) and other control bytes (\\xNN), so that each token stays on one line.\n");
}

/* A piece between quotes on one line: control bytes and the backslash are escaped. */
static void print_piece(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        switch (c) {
        case '\\': fputs("\\\\", stdout); break;
        case '\n': fputs("\\n", stdout); break;
        case '\r': fputs("\\r", stdout); break;
        case '\t': fputs("\\t", stdout); break;
        default:
            if (c < 0x20 || c == 0x7f) printf("\\x%02x", c);
            else putchar(c);
        }
    }
}

int cmd_tokenize(int argc, char **argv)
{
    const char *model = NULL, *prompt = NULL, *file = NULL;
    bool ids_only = false, add_special = true, parse_special = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if ((!strcmp(a, "-m") || !strcmp(a, "--model")) && i + 1 < argc) model = argv[++i];
        else if ((!strcmp(a, "-p") || !strcmp(a, "--prompt")) && i + 1 < argc) prompt = argv[++i];
        else if ((!strcmp(a, "-f") || !strcmp(a, "--file")) && i + 1 < argc) file = argv[++i];
        else if (!strcmp(a, "--ids")) ids_only = true;
        else if (!strcmp(a, "--no-special") || !strcmp(a, "--no-bos")) add_special = false;
        else if (!strcmp(a, "--parse-special")) parse_special = true;
        else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else {
            fprintf(stderr, "forge tokenize: unknown or incomplete option '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }
    if (!model || (prompt && file)) {
        fprintf(stderr, "forge tokenize: %s\n",
                !model ? "-m MODEL is required" : "give -p TEXT or -f FILE, not both");
        usage(stderr);
        return 2;
    }

    forge_err err = {0};
    gguf_ctx *g = NULL;
    forge_tok *tok = NULL;
    char *text = NULL;
    size_t len = 0;
    int32_t *ids = NULL;
    size_t n = 0;
    int status = 1;

    if (prompt) {
        len = strlen(prompt);
        text = malloc(len + 1);
        if (!text) goto oom;
        memcpy(text, prompt, len + 1);
    } else if (!(text = cli_read_file("tokenize", "text file", file ? file : "-", &len))) {
        goto done;
    }
    if (gguf_open(model, &g, &err) || forge_tok_load(g, &tok, &err) ||
        forge_tok_encode(tok, text, len, add_special, parse_special, &ids, &n, &err)) {
        fprintf(stderr, "forge tokenize: %s\n", err.msg);
        goto done;
    }
    const char *warn = forge_tok_warning(tok);
    if (warn) fprintf(stderr, "forge tokenize: warning: %s\n", warn);
    if (ids_only) {
        for (size_t i = 0; i < n; i++) printf(" %d", ids[i]);
        printf("\n");
    } else {
        for (size_t i = 0; i < n; i++) {
            size_t pl = 0;
            const char *p = forge_tok_piece(tok, ids[i], true, &pl);
            printf("%6d -> '", ids[i]);
            print_piece(p, pl);
            printf("'\n");
        }
    }
    status = cli_stdout_ok("tokenize") ? 0 : 1;
    goto done;
oom:
    fprintf(stderr, "forge tokenize: out of memory\n");
done:
    free(ids);
    free(text);
    forge_tok_free(tok);
    gguf_close(g);
    return status;
}
