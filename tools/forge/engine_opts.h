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

/* The sampling options of run and chat: --temp T (>= 0), --top-k K (-1..2^30), --top-p P and
 * --min-p P (0..1), --repeat-penalty R (> 0), --repeat-last-n N, --presence-penalty,
 * --frequency-penalty, --seed/-s S (0..2^64-1). Same return convention as engine_opts_parse. */
int sampling_opts_parse(forge_sampler_params *sp, bool *seed_set, const char *cmd, int argc,
                        char **argv, int *i);

/* Help lines for the shared options. */
extern const char *engine_opts_help;

/* Strict parse helpers for every option of every command: the whole string must be the
 * number, finite, and in range. On error they print
 * "forge CMD: bad value for OPT: 'VAL' (expected ... in MIN..MAX)" and return false; the caller
 * exits with status 2 before opening any file. */
bool cli_parse_int(const char *cmd, const char *opt, const char *val, long min, long max,
                   long *out);
bool cli_parse_u64(const char *cmd, const char *opt, const char *val, uint64_t *out);
/* A finite float in [min, max] ((min, max] with min_open); an infinite bound is no bound. */
bool cli_parse_float(const char *cmd, const char *opt, const char *val, float min, float max,
                     bool min_open, float *out);
/* A JSON object given on the command line (--vars). */
bool cli_parse_json_object(const char *cmd, const char *opt, const char *val);

/* Resolve -hf / the default model into o->model_path, load the model and create a context; prints the error and returns non-zero on failure. */
int engine_load(engine_opts *o, const char *cmd, forge_model **model, forge_context **ctx);

/* Monotonic seconds. */
double cli_now(void);

#endif
