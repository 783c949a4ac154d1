/* cmd_synth.c - `forge synth`: write a random-weight model of a named real shape (benchmarks,
 * tests). Argument parsing only; the generator is src/synth/ (an internal libforge module). */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "forge.h"
#include "cli_io.h"
#include "commands.h"
#include "engine_opts.h"
#include "forge_synth.h"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: forge synth --shape NAME --type TYPE -o OUT.gguf [--force]\n"
            "                   [--vocab-from VOCAB.gguf] [--seed S]\n"
            "\n"
            "Write a llama-family model with random weights and a real model's shape, with the\n"
            "GGUF keys and tensor names llama.cpp's converter uses. 2-D weights are ~N(0, 0.02),\n"
            "norm weights ~1 + N(0, 0.02) (F32), biases ~N(0, 0.02) (F32); no value is exactly 0.\n"
            "The same shape, type, seed and vocab give identical bytes. Data is streamed, so large\n"
            "shapes need only a few MB of memory (but several GB of disk).\n"
            "\n"
            "  --shape NAME        one of:\n");
    for (int i = 0; i < synth_shape_count(); i++) {
        const synth_shape *s = synth_shape_at(i);
        char vocab[32], hd[32] = "";
        if (s->n_vocab) snprintf(vocab, sizeof vocab, "%" PRId64, s->n_vocab);
        else snprintf(vocab, sizeof vocab, "vocab file or 512");
        if (s->head_dim) snprintf(hd, sizeof hd, ", head_dim %" PRId64, s->head_dim);
        fprintf(out, "      %-15s %s dim %" PRId64 ", ffn %" PRId64 ", %" PRId64 " layers, %" PRId64
                     " heads, %" PRId64 " kv heads%s, vocab %s%s%s%s\n",
                s->name, s->arch, s->dim, s->ffn, s->n_layers, s->n_heads, s->n_kv_heads,
                hd, vocab, s->tied ? ", tied embeddings" : "",
                s->qkv_bias ? ", q/k/v biases" : "", s->qk_norm ? ", q/k norms" : "");
    }
    fprintf(out,
            "  --type TYPE         type of the 2-D weights (token embedding included): F32, F16,\n"
            "                      BF16, Q8_0, Q4_0. Rows that are no multiple of 32 fall back to\n"
            "                      F16 (as llama.cpp does); norms and biases stay F32.\n"
            "  -o, --output FILE   the .gguf to write (written beside it, then renamed into place;\n"
            "                      an existing file is kept unless --force)\n"
            "  --force             replace an existing OUT.gguf\n"
            "  --vocab-from FILE   copy every tokenizer.* key from this GGUF (e.g.\n"
            "                      ggml-vocab-llama-spm.gguf for the 32000-token shapes); its token\n"
            "                      count must equal the shape's vocab (tiny takes any size).\n"
            "                      Without it the file gets a built-in SentencePiece-style byte\n"
            "                      vocab: <unk>, <s>, </s>, the 256 byte tokens <0x00>..<0xFF>\n"
            "                      (byte fallback covers any text), then <unused_N> fillers.\n"
            "  --seed S            random seed, 0..2^64-1 (default 42)\n"
            "  -h, --help          this help\n");
}

int cmd_synth(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"shape", required_argument, NULL, 's'},      {"type", required_argument, NULL, 't'},
        {"output", required_argument, NULL, 'o'},     {"vocab-from", required_argument, NULL, 'v'},
        {"seed", required_argument, NULL, 'S'},       {"help", no_argument, NULL, 'h'},
        {"force", no_argument, NULL, 'f'},
        {NULL, 0, NULL, 0},
    };
    synth_opts o = {.type = -1, .seed = 42};
    synth_result res;
    forge_err err = {0};
    int opt;
    bool force = false;
    cli_out out;

    optind = 1;
    while ((opt = getopt_long(argc, argv, "o:h", longopts, NULL)) != -1) {
        switch (opt) {
        case 's': o.shape = optarg; break;
        case 't':
            o.type = ggml_type_from_name(optarg);
            if (o.type != GGML_TYPE_F32 && o.type != GGML_TYPE_F16 && o.type != GGML_TYPE_BF16 &&
                o.type != GGML_TYPE_Q8_0 && o.type != GGML_TYPE_Q4_0) {
                fprintf(stderr, "forge synth: bad value for --type: '%s' (expected F32, F16, "
                                "BF16, Q8_0 or Q4_0)\n", optarg);
                return 2;
            }
            break;
        case 'o': o.out_path = optarg; break;
        case 'v': o.vocab_from = optarg; break;
        case 'S':
            if (!cli_parse_u64("synth", "--seed", optarg, &o.seed)) return 2;
            break;
        case 'f': force = true; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind != argc || !o.shape || o.type < 0 || !o.out_path) {
        fprintf(stderr, "forge synth: --shape, --type and -o are required\n");
        usage(stderr);
        return 2;
    }
    if (!synth_shape_find(o.shape)) {
        fprintf(stderr, "forge synth: unknown shape '%s' (see forge synth --help)\n", o.shape);
        return 2;
    }
    /* never onto the vocab file; a temporary file beside -o, renamed into place when whole */
    const char *final_path = o.out_path;
    if (cli_out_open(&out, "synth", "-o", final_path, &o.vocab_from, 1, !force, false)) return 1;
    o.out_path = cli_out_path(&out);
    if (synth_write(&o, &res, &err) != FORGE_OK) {
        /* the library's messages start with its module's name, "synth: " */
        const char *msg = strncmp(err.msg, "synth: ", 7) ? err.msg : err.msg + 7;
        const char *tmp = strstr(msg, o.out_path); /* name -o, not the temporary file */
        if (tmp && tmp != final_path)
            fprintf(stderr, "forge synth: %.*s%s%s\n", (int)(tmp - msg), msg, final_path,
                    tmp + strlen(o.out_path));
        else
            fprintf(stderr, "forge synth: %s\n", msg);
        cli_out_abort(&out);
        return 1;
    }
    o.out_path = final_path;
    if (cli_out_commit(&out)) return 1;
    fprintf(stderr, "forge synth: wrote %s: %s %s, %" PRId64 " tensors, %" PRId64 " parameters, vocab %" PRId64 "%s\n",
            o.out_path, o.shape, ggml_type_name(o.type), res.n_tensors, res.n_params, res.n_vocab,
            res.n_fallback ? " (some rows fell back to F16)" : "");
    return 0;
}
