/* main.c - the forge command-line tool: dispatches to one subcommand. The CLI uses only the
 * public API in include/; this is the only place that decides the process exit status. */
#include <stdio.h>
#include <string.h>

#include "forge.h"
#include "cli_io.h"
#include "commands.h"

struct command {
    const char *name;
    int (*fn)(int argc, char **argv);
    const char *summary;
};

static const struct command commands[] = {
    {"run", cmd_run, "generate text from a prompt"},
    {"chat", cmd_chat, "interactive chat using the model's chat template"},
    {"serve", cmd_serve, "OpenAI-compatible HTTP server with a chat page"},
    {"eval", cmd_eval, "run token ids through the model and write the logits"},
    {"perplexity", cmd_perplexity, "perplexity of a text file (llama.cpp's method)"},
    {"bench", cmd_bench, "prompt-processing and generation speed"},
    {"tokenize", cmd_tokenize, "text to token ids"},
    {"detokenize", cmd_detokenize, "token ids to text"},
    {"template", cmd_template, "render a chat template for a list of messages"},
    {"inspect", cmd_inspect, "print a GGUF file's metadata and tensor table"},
    {"synth", cmd_synth, "write a random-weight model of a real shape (for benchmarks)"},
    {"quantize", cmd_quantize, "quantize a GGUF model (llama-quantize's types and mixes)"},
    {"pull", cmd_pull, "download a GGUF model from the Hugging Face hub into the cache"},
    {"models", cmd_models, "list or remove the cached models"},
};

static void usage(FILE *out)
{
    fprintf(out, "usage: forge [--help] [--version] COMMAND [ARGS...]\n\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(out, "  %-11s %s\n", commands[i].name, commands[i].summary);
    fprintf(out, "\nRun 'forge COMMAND --help' for the options of one command.\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return cli_stdout_close(NULL, 0);
    }
    if (!strcmp(argv[1], "--version") || !strcmp(argv[1], "-V")) {
        printf("forge %s\n", forge_version());
        return cli_stdout_close(NULL, 0);
    }
    /* every command's output is checked here once more: a full disk or a closed pipe behind
     * stdout is an error, not a silent success */
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (!strcmp(argv[1], commands[i].name))
            return cli_stdout_close(commands[i].name, commands[i].fn(argc - 1, argv + 1));
    fprintf(stderr, "forge: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
