/* bench_parallel.h - `forge bench --parallel N1,N2,...`: many streams at once through forge_engine
 * (like llama.cpp's llama-batched-bench). Used only by cmd_bench.c. */
#ifndef FORGE_CLI_BENCH_PARALLEL_H
#define FORGE_CLI_BENCH_PARALLEL_H

#include <stdbool.h>
#include <stdint.h>

#include "engine_opts.h"

#define BENCH_MAX_LIST 32

/* Parse "1,4,16,64": at most BENCH_MAX_LIST integers in lo..hi, comma-separated, nothing else.
 * false after printing "forge bench: bad value for OPT: ..." (the caller exits with 2). */
bool bench_parse_list(const char *opt, const char *val, long lo, long hi, int32_t *list,
                      int *n_list);

/* Mean and sample standard deviation (0 for fewer than two values) of x[0..n). */
void bench_mean_sd(const double *x, int n, double *mean, double *sd);

/* For each N of list: an engine with n_parallel N and a KV pool for N x (n_prompt + n_gen)
 * tokens, one short warm-up request, then reps runs of N requests submitted at once, each with
 * its own random prompt of n_prompt tokens (BOS first when the vocabulary adds one), generating
 * n_gen tokens (end of text ignored). Prints a table, or JSON objects with "n_parallel",
 * "test": "ppP+tgN", "avg_ts" (aggregate generation tok/s), "ttft_ms", "itl_ms", ... Returns the
 * exit status (0, or 1 with the message printed). */
int bench_parallel(engine_opts *o, const int32_t *list, int n_list, long n_prompt, long n_gen,
                   long reps, bool json);

#endif
