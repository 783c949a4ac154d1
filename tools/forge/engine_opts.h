/* engine_opts.h - options shared by the engine subcommands (run, chat, eval, perplexity, bench):
 * -m MODEL, -t N, -c CTX, -b N, --kv-type f32|f16, --f32-math, --device gpu|cpu|auto, --gpu N,
 * and for the commands that generate through forge_engine (run, chat, bench --parallel)
 * --kv-size N, --block-size 16|32 (and --parallel N where a command opts in); loading the model
 * and creating a context or an engine through the public API. Used only by the CLI. */
#ifndef FORGE_CLI_ENGINE_OPTS_H
#define FORGE_CLI_ENGINE_OPTS_H

#include <stdbool.h>
#include <stdint.h>

#include "forge.h"
#include "forge_engine.h"

/* The most requests one engine runs at once that the CLI asks for (--parallel). */
#define ENGINE_MAX_PARALLEL 1024

typedef struct engine_opts {
    const char *model_path;
    forge_context_params cp; /* cp.device: AUTO unless --device says otherwise */
    bool device_given;       /* --device was on the command line */
    const char *hf_spec;     /* -hf REPO[:QUANT]: the model from the hub cache (hub_cli.c) */
    bool offline;            /* --offline: -hf uses only the cache */
    bool default_model;      /* no -m: $FORGE_MODEL or the bundled demo model (forge run) */
    /* set by the command before parsing: which engine options it takes */
    bool pool_opts;    /* --kv-size N, --block-size 16|32 (commands on forge_engine) */
    bool parallel_opt; /* --parallel N */
    int32_t kv_size;    /* --kv-size: tokens in the KV pool; 0: the command's default */
    int32_t block_size; /* --block-size; 0: the engine's default (16) */
    int32_t n_parallel; /* --parallel; 0: the command's default */
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

/* Help lines for the shared options, and for --kv-size / --block-size (pool_opts). */
extern const char *engine_opts_help;
extern const char *engine_pool_help;

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

/* The generating commands, in two steps. engine_load_model resolves -hf / the default model and
 * loads it (owned by the caller); returns 0, or 1/2 with the message printed.
 * engine_context_size is the context they give a request: -c, else the model's, at most 8192
 * (with a note on stderr when that cuts the model's). */
int engine_load_model(engine_opts *o, const char *cmd, forge_model **model);
int32_t engine_context_size(const engine_opts *o, const char *cmd, const forge_model *model);

/* The engine parameters of the options (device, threads, kv type, -b, --kv-size, --block-size,
 * --parallel); n_ctx is left to the caller. */
forge_engine_params engine_params_of(const engine_opts *o);

/* Create the engine of *ep on model (borrowed): the device as the options say (auto: the
 * library decides; a note on stderr says when it is the CPU and why, as for contexts), the
 * upload progress bar on a terminal, the device line and any warning on stderr. Returns 0, or 1
 * with the message printed. */
int engine_create_cli(engine_opts *o, const char *cmd, forge_model *model,
                      const forge_engine_params *ep, forge_engine **engine);

/* "CPU" or "GPU": where the engine computes (static). */
const char *engine_device_name(const forge_engine *e);

/* "N host threads" for the engine's CPU work: -t N, else the library's default (one per
 * physical core, which forge_engine_info does not report). Writes into buf, returns it. */
const char *engine_threads_desc(const engine_opts *o, char *buf, size_t size);

/* Monotonic seconds. */
double cli_now(void);

#endif
