/* comm_host.c - the in-process communicator over host memory (comm.h): what the CPU tests of
 * tensor parallelism run on. The CPU backend's ops are done when they return, so a collective
 * is a plain loop over the ranks' host buffers. */
#include <stdlib.h>
#include <string.h>

#include "backend/comm.h"
#include "core/util.h"

typedef struct host_comm {
    be_comm base;
} host_comm;

static void host_destroy(be_comm *c)
{
    free(c);
}

/* Rank 0's buffer becomes the sum (rank 0 + rank 1 + ..., in that order), then every other rank
 * gets a copy of it: the same bits everywhere. */
static int host_all_reduce_sum(be_comm *c, float *const *bufs, int64_t n, forge_err *err)
{
    if (n < 0 || !bufs)
        return forge_err_set(err, FORGE_E_INTERNAL, "host comm: all-reduce of %lld floats",
                             (long long)n);
    float *acc = bufs[0];
    for (int r = 1; r < c->n_rank; r++) {
        const float *b = bufs[r];
        for (int64_t i = 0; i < n; i++)
            acc[i] += b[i];
    }
    for (int r = 1; r < c->n_rank; r++)
        memcpy(bufs[r], acc, (size_t)n * sizeof *acc);
    return FORGE_OK;
}

static int host_all_gather_cols(be_comm *c, const float *const *send, float *const *recv,
                                int64_t rows, const int64_t *cols, forge_err *err)
{
    int64_t total = 0;
    for (int r = 0; r < c->n_rank; r++) {
        if (cols[r] < 0)
            return forge_err_set(err, FORGE_E_INTERNAL, "host comm: rank %d gathers %lld columns",
                                 r, (long long)cols[r]);
        total += cols[r];
    }
    if (rows < 0)
        return forge_err_set(err, FORGE_E_INTERNAL, "host comm: gather of %lld rows",
                             (long long)rows);
    for (int d = 0; d < c->n_rank; d++) {
        int64_t off = 0;
        for (int r = 0; r < c->n_rank; r++) {
            for (int64_t i = 0; i < rows; i++)
                memcpy(recv[d] + i * total + off, send[r] + i * cols[r],
                       (size_t)cols[r] * sizeof(float));
            off += cols[r];
        }
    }
    return FORGE_OK;
}

static const be_comm_ops host_ops = {
    .name = "host",
    .destroy = host_destroy,
    .all_reduce_sum = host_all_reduce_sum,
    .all_gather_cols = host_all_gather_cols,
};

int comm_host_create(int n_rank, be_comm **out, forge_err *err)
{
    *out = NULL;
    if (n_rank < 1 || n_rank > COMM_MAX_RANK)
        return forge_err_set(err, FORGE_E_INVALID, "host comm: %d ranks (1..%d)", n_rank,
                             COMM_MAX_RANK);
    host_comm *c = calloc(1, sizeof *c);
    if (!c) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    c->base.ops = &host_ops;
    c->base.n_rank = n_rank;
    *out = &c->base;
    return FORGE_OK;
}
