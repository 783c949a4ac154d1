/* cmd_quantize.c - `forge quantize IN.gguf OUT.gguf TYPE`: argument parsing, the progress bar
 * and the summary. The work is forge_quantize_file (include/forge_quantize.h); the output goes to
 * a temporary file beside OUT that is renamed into place only when complete (cli_io.h). */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "forge.h"
#include "cli_io.h"
#include "commands.h"
#include "engine_opts.h"
#include "forge_quantize.h"

static void print_types(FILE *out)
{
    for (int i = 0; i < forge_quantize_mix_count(); i++)
        fprintf(out, "%s%s", i ? ", " : "", forge_quantize_mix_name(i));
    fputc('\n', out);
}

static void usage(FILE *out)
{
    fprintf(out,
            "usage: forge quantize IN.gguf OUT.gguf TYPE [--pure] [-t N] [--allow-requantize]\n"
            "                      [--force]\n"
            "\n"
            "Quantize a model the way llama.cpp's llama-quantize does (no importance matrix): the\n"
            "same type for each tensor and the same bytes. Mixes (_S/_M/_L) give attn_v, ffn_down\n"
            "and the output matrix more bits; norms and other 1-D tensors are copied as they are.\n"
            "A tensor whose rows the type cannot hold falls back to a wider type (reported).\n"
            "\n"
            "  TYPE                one of: ");
    print_types(out);
    fprintf(
        out,
        "  --pure              every 2-D weight in TYPE's base type (no per-tensor mix rules)\n"
        "  -t, --threads N     threads (default: physical cores)\n"
        "  --allow-requantize  accept quantized input tensors (dequantized first; loses accuracy)\n"
        "  --force             replace an existing OUT.gguf\n"
        "  -h, --help          this help\n"
        "OUT is written beside itself under a temporary name and renamed when complete; it is\n"
        "never the input file.\n");
}

struct progress_state {
    bool tty, open;
    int last_pct;
};

static void on_progress(void *user, uint64_t done, uint64_t total)
{
    struct progress_state *p = user;
    if (!p->tty) return;
    int pct = total ? (int)((double)done * 100.0 / (double)total) : 100;
    if (pct == p->last_pct) return;
    p->last_pct = pct;
    const int width = 30;
    int fill = pct * width / 100;
    fprintf(stderr, "\rforge quantize: [%.*s%*s] %3d%% %.1f / %.1f MiB", fill,
            "##############################", width - fill, "", pct, (double)done / (1 << 20),
            (double)total / (1 << 20));
    p->open = true;
    fflush(stderr);
}

static void end_line(struct progress_state *p)
{
    if (p->open) fputc('\n', stderr);
    p->open = false;
}

static void on_note(void *user, const char *msg)
{
    end_line(user);
    fprintf(stderr, "forge quantize: %s\n", msg);
}

int cmd_quantize(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"pure", no_argument, NULL, 'p'},
        {"threads", required_argument, NULL, 't'},
        {"allow-requantize", no_argument, NULL, 'r'},
        {"force", no_argument, NULL, 'f'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    forge_quantize_opts o = {0};
    forge_quantize_result res;
    struct progress_state prog = {.tty = isatty(STDERR_FILENO) != 0, .last_pct = -1};
    forge_err err = {0};
    bool force = false;
    long nt = 0;
    int opt;
    cli_out out;

    optind = 1;
    while ((opt = getopt_long(argc, argv, "t:h", longopts, NULL)) != -1) {
        switch (opt) {
        case 'p':
            o.pure = true;
            break;
        case 't':
            if (!cli_parse_int("quantize", "-t", optarg, 1, 1024, &nt)) return 2;
            break;
        case 'r':
            o.allow_requantize = true;
            break;
        case 'f':
            force = true;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (argc - optind != 3) {
        fprintf(stderr, "forge quantize: expected IN.gguf OUT.gguf TYPE\n");
        usage(stderr);
        return 2;
    }
    const char *in_path = argv[optind], *final_path = argv[optind + 1], *type = argv[optind + 2];
    o.mix = forge_quantize_mix_find(type);
    if (o.mix < 0) {
        fprintf(stderr, "forge quantize: unknown TYPE '%s'; expected one of: ", type);
        print_types(stderr);
        return 2;
    }
    o.in_path = in_path;
    o.n_threads = (int)nt;
    o.progress = on_progress;
    o.note = on_note;
    o.user = &prog;

    if (cli_out_open(&out, "quantize", "OUT", final_path, &in_path, 1, !force, false)) return 1;
    o.out_path = cli_out_path(&out);
    if (forge_quantize_file(&o, &res, &err) != FORGE_OK) {
        end_line(&prog);
        /* the library's messages start with "quantize: "; name OUT, not the temporary file */
        const char *msg = strncmp(err.msg, "quantize: ", 10) ? err.msg : err.msg + 10;
        const char *tmp = strstr(msg, o.out_path);
        if (tmp && o.out_path != final_path)
            fprintf(stderr, "forge quantize: %.*s%s%s\n", (int)(tmp - msg), msg, final_path,
                    tmp + strlen(o.out_path));
        else
            fprintf(stderr, "forge quantize: %s\n", msg);
        cli_out_abort(&out);
        return 1;
    }
    end_line(&prog);
    if (cli_out_commit(&out)) return 1;
    fprintf(stderr, "forge quantize: wrote %s (%s%s): %.2f MiB -> %.2f MiB, %" PRId64 " tensors (",
            final_path, forge_quantize_mix_name(o.mix), o.pure ? ", pure" : "",
            (double)res.in_bytes / (1 << 20), (double)res.out_bytes / (1 << 20), res.n_tensors);
    bool first = true;
    for (int t = 0; t < GGML_TYPE_COUNT; t++)
        if (res.type_count[t]) {
            fprintf(stderr, "%s%" PRId64 " %s", first ? "" : ", ", res.type_count[t],
                    ggml_type_name(t));
            first = false;
        }
    fprintf(stderr, ")");
    if (res.n_fallback)
        fprintf(stderr, "; %" PRId64 " tensor%s fell back to another type", res.n_fallback,
                cli_plural(res.n_fallback));
    fprintf(stderr, "\n");
    return 0;
}
