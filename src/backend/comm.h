/* comm.h - the collective operations between the ranks of a tensor-parallel group
 * (docs/DISTRIBUTED.md). One process drives every rank (one backend per rank: a GPU each, or
 * CPU backends in tests); a communicator moves data between the ranks' buffers.
 *
 * Two implementations:
 *   - comm_host_create (src/backend/comm_host.c): in-process, over host memory. For CPU ranks
 *     (whose buffers are host memory and whose ops are done when they return). It exists to
 *     check the sharding arithmetic in CI; it is not a transport for real runs.
 *   - backend_gpu_comm_create (src/backend/backend_gpu.h): NCCL (RCCL on AMD, same API) over
 *     the ranks' GPUs, each collective enqueued on every rank's stream inside one
 *     ncclGroupStart/End.
 *
 * Conventions: pointers are what be_ops.buf_data returns for a rank's buffer (host memory for
 * the CPU, device memory for a GPU); index r of every array is rank r. A collective is ordered
 * after the work already enqueued on each rank's backend and before the work enqueued after it
 * (stream order on a GPU; at once on the CPU). Every rank ends with the same bits. Not
 * thread-safe: one thread drives the group. */
#ifndef FORGE_BACKEND_COMM_H
#define FORGE_BACKEND_COMM_H

#include <stdint.h>

#include "forge.h"

/* Most ranks of one group (one process's GPUs). */
#define COMM_MAX_RANK 8

typedef struct be_comm be_comm;

typedef struct be_comm_ops {
    const char *name; /* "host", "NCCL", "RCCL" */
    void (*destroy)(be_comm *c);
    /* In place: every rank's bufs[r][0..n) becomes the sum over the ranks of bufs[r][0..n)
     * (float32). */
    int (*all_reduce_sum)(be_comm *c, float *const *bufs, int64_t n, forge_err *err);
    /* Column gather of row-major blocks: rank r holds send[r] = [rows][cols[r]]; afterwards every
     * rank's recv[r] = [rows][cols[0] + ... + cols[n_rank-1]], row i being the ranks' rows i side
     * by side in rank order (the vocabulary split of the output projection). send and recv do
     * not overlap. */
    int (*all_gather_cols)(be_comm *c, const float *const *send, float *const *recv, int64_t rows,
                           const int64_t *cols, forge_err *err);
} be_comm_ops;

struct be_comm {
    const be_comm_ops *ops;
    int n_rank; /* 1..COMM_MAX_RANK */
};

/* The in-process communicator over host memory for n_rank ranks. The sums add the ranks in rank
 * order (rank 0 + rank 1 + ...), so a group's result is deterministic. Owned by the caller
 * (ops->destroy). */
int comm_host_create(int n_rank, be_comm **out, forge_err *err);

#endif /* FORGE_BACKEND_COMM_H */
