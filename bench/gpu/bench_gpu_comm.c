/* bench_gpu_comm.c - what a tensor-parallel step pays for its collectives (issue 16): the
 * NCCL all-reduce of the activations a row-split projection leaves (hidden sizes of 1B..70B
 * models, one decode token to a 512-token prompt chunk) and the column gather of the split
 * vocabulary, on 1 (through NCCL: FORGE_GPU_COMM_NCCL1), 2 and all the GPUs present. Each size:
 * one warm-up, then the median over 7 runs of 50 calls enqueued back to back on every rank's
 * stream, timed on the host from the first enqueue to the end of the last rank's stream; per
 * call in microseconds and algorithm bandwidth (bytes of one rank's buffer / time).
 *   bench_gpu_comm
 * Needs a GPU and NCCL (scripts/gpu-comm-run.sh). Speed is measured here, never asserted. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "forge.h"
#include "gpu/gpu_ops.h"
#include "bench_gpu_util.h"

#define RUNS 7
#define CALLS 50

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef struct group {
    int n;
    gpu_comm *c;
    gpu_stream *s[GPU_COMM_MAX_RANK];
} group;

static void sync_all(const group *g)
{
    for (int r = 0; r < g->n; r++)
        CHECK(gpu_stream_sync(g->s[r], err));
}

/* Median seconds per call of op (0: all-reduce of n floats, 1: gather of rows x cols). */
static double time_op(const group *g, int op, int64_t n, int64_t rows, const int64_t *cols,
                      float *const *a, float *const *b)
{
    double t[RUNS];
    for (int run = -1; run < RUNS; run++) {
        const double t0 = now_s();
        for (int k = 0; k < (run < 0 ? 2 : CALLS); k++) {
            if (op == 0)
                CHECK(gpu_comm_all_reduce_sum(g->c, a, n, g->s, err));
            else
                CHECK(gpu_comm_all_gather_cols(g->c, (const float *const *)a, b, rows, cols, g->s,
                                               err));
        }
        sync_all(g);
        if (run >= 0) t[run] = (now_s() - t0) / CALLS;
    }
    qsort(t, RUNS, sizeof *t, cmp_double);
    return t[RUNS / 2];
}

static void bench_group(int n, int nccl1)
{
    group g;
    memset(&g, 0, sizeof g);
    g.n = n;
    int devs[GPU_COMM_MAX_RANK];
    for (int r = 0; r < n; r++) {
        devs[r] = r;
        CHECK(gpu_set_device(r, err));
        CHECK(gpu_stream_create(&g.s[r], err));
    }
    if (nccl1) setenv("FORGE_GPU_COMM_NCCL1", "1", 1);
    CHECK(gpu_comm_create(n, devs, &g.c, err));
    unsetenv("FORGE_GPU_COMM_NCCL1");
    /* buffers for the largest case: 8192 x 512 floats to reduce, 512 x 128256 to gather */
    const int64_t max_reduce = 8192 * 512, max_gather = 512 * 128256;
    float *a[GPU_COMM_MAX_RANK], *b[GPU_COMM_MAX_RANK];
    for (int r = 0; r < n; r++) {
        CHECK(gpu_set_device(r, err));
        CHECK(gpu_malloc((void **)&a[r], (size_t)max_gather * sizeof(float), err));
        CHECK(gpu_malloc((void **)&b[r], (size_t)max_gather * sizeof(float), err));
        CHECK(gpu_memset(a[r], 0, (size_t)max_gather * sizeof(float), g.s[r], err));
    }
    sync_all(&g);
    printf("--- %d rank%s%s\n", n, n == 1 ? "" : "s", nccl1 ? " (through NCCL)" : "");
    static const int64_t hidden[] = {2048, 4096, 8192};
    static const int64_t tokens[] = {1, 8, 32, 512};
    for (size_t h = 0; h < sizeof hidden / sizeof *hidden; h++)
        for (size_t t = 0; t < sizeof tokens / sizeof *tokens; t++) {
            const int64_t len = hidden[h] * tokens[t];
            if (len > max_reduce) continue;
            const double s = time_op(&g, 0, len, 0, NULL, a, b);
            printf("all_reduce  hidden %5lld x %3lld tok  %9lld floats  %8.1f us  %7.1f GB/s\n",
                   (long long)hidden[h], (long long)tokens[t], (long long)len, s * 1e6,
                   (double)len * 4 / s / 1e9);
        }
    static const int64_t vocab[] = {32000, 128256};
    static const int64_t rows[] = {1, 8, 512};
    for (size_t v = 0; v < sizeof vocab / sizeof *vocab; v++)
        for (size_t ri = 0; ri < sizeof rows / sizeof *rows; ri++) {
            int64_t cols[GPU_COMM_MAX_RANK];
            for (int r = 0; r < n; r++) /* the vocabulary split with its remainder */
                cols[r] = vocab[v] / n + (r < vocab[v] % n);
            const double s = time_op(&g, 1, 0, rows[ri], cols, a, b);
            printf("gather_cols vocab %6lld x %3lld rows            %8.1f us  %7.1f GB/s\n",
                   (long long)vocab[v], (long long)rows[ri], s * 1e6,
                   (double)(rows[ri] * vocab[v]) * 4 / s / 1e9);
        }
    sync_all(&g);
    gpu_comm_free(g.c);
    for (int r = 0; r < n; r++) {
        CHECK(gpu_set_device(r, err));
        gpu_free(a[r]);
        gpu_free(b[r]);
        gpu_stream_destroy(g.s[r]);
    }
    CHECK(gpu_set_device(0, err));
}

int main(void)
{
    int n = 0;
    CHECK(gpu_device_count(&n, err));
    if (n < 1) {
        fprintf(stderr, "FATAL: no GPU\n");
        return 2;
    }
    if (n > GPU_COMM_MAX_RANK) n = GPU_COMM_MAX_RANK;
    bench_group(1, 1);
    if (n >= 2) bench_group(2, 0);
    if (n > 2) bench_group(n, 0);
    return 0;
}
