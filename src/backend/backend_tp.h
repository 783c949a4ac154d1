/* backend_tp.h - tensor parallelism as a backend (docs/DISTRIBUTED.md): one backend that drives
 * n ranks, each an ordinary backend (a GPU each; CPU backends in tests) holding its share of
 * every weight, Megatron-style:
 *   - Q/K/V and gate/up are split by output rows (attention heads and KV heads, FFN columns):
 *     each rank computes its heads and its slice of the FFN, with no communication;
 *   - attention output and FFN down are split by input columns: each rank's partial product is
 *     summed over the ranks by an all-reduce, after which every rank holds the whole result;
 *   - the vocabulary projection is split by output rows and the logits gathered;
 *   - everything else (embeddings, norms, the residual stream, experts) is replicated.
 * The architectures' forward passes run on it unchanged: it implements be_ops by dispatching each
 * op to every rank with the rank's weights and shapes. It knows which weight is split how from
 * a plan (tp_plan, made by the model: model_tp_plan) keyed by the weights' slots, and tracks for
 * every activation buffer whether the ranks hold it whole (replicated) or each its own columns
 * (split), as the op that wrote it left it. */
#ifndef FORGE_BACKEND_TP_H
#define FORGE_BACKEND_TP_H

#include "backend/backend.h"
#include "backend/comm.h"

typedef enum tp_split {
    TP_REPL = 0,  /* every rank holds the whole weight */
    TP_OUT,       /* rows (outputs) split: rank r holds rows lo[r]..hi[r]-1; for a vector (a
                   * bias, ne1 = 1) elements lo[r]..hi[r]-1 */
    TP_IN,        /* columns (inputs) split: rank r holds elements lo[r]..hi[r]-1 of every row
                   * (whole blocks of the weight's type); the ranks' products are all-reduced */
    TP_OUT_GATHER /* TP_OUT, then the ranks' outputs are gathered in rank order (vocabulary) */
} tp_split;

typedef struct tp_wplan {
    tp_split split;
    int64_t lo[COMM_MAX_RANK], hi[COMM_MAX_RANK];
} tp_wplan;

/* How each weight of a model is split over n_rank ranks: w[slot] for the slots of
 * model_weights (be_weight.slot). Owned by its maker (tp_plan_free). */
typedef struct tp_plan {
    int n_rank;
    int n_slot;
    tp_wplan *w;
} tp_plan;

void tp_plan_free(tp_plan *p);

/* Every rank's form of every weight of a plan: rank r's row-split weights are views into the
 * model's weights ws[0..n_w) (ws[i]->slot == i; borrowed: they must outlive the shares), its
 * column-split ones host copies owned here, the rest the model's weights as they are. When the
 * embedding table's slot is split (a tied output), the whole table is one more entry, slot n_w,
 * which get_rows reads. Made before the ranks' backends, which size their memory from them. */
typedef struct tp_shares tp_shares;
int tp_shares_create(const tp_plan *plan, be_weight *const *ws, int n_w, tp_shares **out,
                     forge_err *err);
void tp_shares_free(tp_shares *sh);
/* Rank r's weights as a list for weights_acquire (*list[i]->slot == i), malloc'ed (the
 * caller frees the array, not the weights); returns the count, -1 when out of memory. */
int tp_shares_rank(tp_shares *sh, int r, be_weight ***list);

/* The tensor-parallel backend over ranks[0..n_rank) (1 <= n_rank <= COMM_MAX_RANK), comm
 * (n_rank ranks) and the weights sh (of as many ranks). Takes ownership of the ranks, the
 * communicator and the shares, also on failure. Each rank's KV cache holds its KV heads:
 * kv_create's kv_dim must divide by n_rank. The ranks' backends must offer buf_data. Not
 * thread-safe, like any backend. */
int backend_tp_create(backend *const *ranks, int n_rank, be_comm *comm, tp_shares *sh,
                      backend **out, forge_err *err);

#endif /* FORGE_BACKEND_TP_H */
