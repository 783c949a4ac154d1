/* engine_opts.h - options shared by the engine subcommands (run, eval, perplexity, bench):
 * -m MODEL, -t N, -c CTX, -b N, --kv-type f32|f16, --f32-math, --device gpu|cpu|auto, --gpu N,
 * and loading the model + context
 * through the public API. Used only by the CLI. */
#ifndef FORGE_CLI_ENGINE_OPTS_H
#define FORGE_CLI_ENGINE_OPTS_H

#include <stdbool.h>
#include <stdint.h>

#include "forge.h"

typedef struct engine_opts {
    const char *model_path;
    forge_context_params cp; /* cp.device: AUTO unless --device says otherwise */
    bool device_given;       /* --device was on the command line */
    const char *hf_spec;     /* -hf REPO[:QUANT]: the model from the hub cache (hub_cli.c) */
    bool offline;            /* --offline: -hf uses only the cache */
    bool default_model;      /* no -m: $FORGE_MODEL or the bundled demo model (forge run) */
} engine_opts;

void engine_opts_init(engine_opts *o);

/* If argv[*i] is a shared option, consume it (and its value), return 1; 0 if not one of ours;
 * -1 on a bad value (message printed to stderr, prefixed with cmd). */
int engine_opts_parse(engine_opts *o, const char *cmd, int argc, char **argv, int *i);

/* Help lines for the shared options. */
extern const char *engine_opts_help;

/* Parse helpers: print "cmd: bad value for OPT: VAL" and return false on error. */
bool cli_parse_int(const char *cmd, const char *opt, const char *val, long min, long max,
                   long *out);
bool cli_parse_float(const char *cmd, const char *opt, const char *val, float *out);

/* Resolve -hf / the default model into o->model_path, load the model and create a context; prints the error and returns non-zero on failure. */
int engine_load(engine_opts *o, const char *cmd, forge_model **model, forge_context **ctx);

/* Monotonic seconds. */
double cli_now(void);

#endif
