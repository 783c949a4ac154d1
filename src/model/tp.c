/* tp.c - how a model's weights are split for tensor parallelism (model_tp_plan; the backend
 * that runs the plan is src/backend/backend_tp.c, docs/DISTRIBUTED.md the design). The one place
 * that decides it, by each weight's role in the layer, for every architecture: they all bind
 * the same layer_weights fields (fused tensors as row views). */
#include <stdio.h>
#include <stdlib.h>

#include "core/util.h"
#include "forge_gguf.h"
#include "model/model.h"

/* Rank r's part of n units, as even as whole units allow (the first ranks one more). */
static void even_ranges(tp_wplan *p, int n_rank, int64_t n_units, int64_t unit, tp_split split)
{
    p->split = split;
    for (int r = 0; r < n_rank; r++) {
        p->lo[r] = n_units * r / n_rank * unit;
        p->hi[r] = n_units * (r + 1) / n_rank * unit;
    }
}

static void set(tp_plan *pl, const be_weight *w, const tp_wplan *how, tp_split split)
{
    if (!w->data || w->slot < 0 || w->slot >= pl->n_slot) return;
    pl->w[w->slot] = *how;
    pl->w[w->slot].split = split;
}

/* Columns lo..hi-1 of w must be whole blocks of its type for every rank. */
static int check_cols(const be_weight *w, const tp_wplan *p, int n_rank, const char *what,
                      forge_err *err)
{
    const int64_t bs = ggml_type_block_size(w->type);
    if (!w->data) return FORGE_OK;
    for (int r = 0; r < n_rank; r++)
        if (bs < 1 || p->lo[r] % bs || p->hi[r] % bs)
            return forge_err_set(err, FORGE_E_UNSUPPORTED,
                                 "--tp %d: %s is %s (blocks of %lld values) and cannot be split "
                                 "into %d parts of whole blocks (rank %d: %s %lld..%lld)",
                                 n_rank, w->name ? w->name : "?", ggml_type_name(w->type),
                                 (long long)bs, n_rank, r, what, (long long)p->lo[r],
                                 (long long)p->hi[r]);
    return FORGE_OK;
}

int model_tp_plan(forge_model *m, int n_rank, tp_plan *out, forge_err *err)
{
    const forge_model_info *hp = &m->info;
    const int64_t HD = hp->head_dim;
    int rc = FORGE_OK;
    out->w = NULL;
    out->n_rank = n_rank;
    out->n_slot = model_weights(m, NULL, 0);
    if (n_rank < 1 || n_rank > COMM_MAX_RANK)
        return forge_err_set(err, FORGE_E_INVALID, "--tp %d: use 1..%d ranks", n_rank,
                             COMM_MAX_RANK);
    if (hp->n_head % n_rank || hp->n_head_kv % n_rank)
        return forge_err_set(err, FORGE_E_INVALID,
                             "--tp %d: the model's %d attention heads and %d KV heads must both "
                             "divide by %d (each rank computes whole heads)",
                             n_rank, hp->n_head, hp->n_head_kv, n_rank);
    out->w = calloc((size_t)(out->n_slot > 0 ? out->n_slot : 1), sizeof *out->w);
    if (!out->w) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    tp_wplan q, kv, ffn, voc;
    even_ranges(&q, n_rank, hp->n_head, HD, TP_OUT);
    even_ranges(&kv, n_rank, hp->n_head_kv, HD, TP_OUT);
    for (int il = 0; il < hp->n_layer; il++) {
        const layer_weights *l = &m->layers[il];
        set(out, &l->wq, &q, TP_OUT);
        set(out, &l->bq, &q, TP_OUT);
        set(out, &l->wk, &kv, TP_OUT);
        set(out, &l->bk, &kv, TP_OUT);
        set(out, &l->wv, &kv, TP_OUT);
        set(out, &l->bv, &kv, TP_OUT);
        set(out, &l->wo, &q, TP_IN);
        if ((rc = check_cols(&l->wo, &q, n_rank, "columns", err))) goto fail;
        if (!l->ffn_down.data) continue; /* experts: replicated */
        /* the FFN in units of ffn_down's blocks, so every rank's columns are whole blocks */
        const int64_t unit = ggml_type_block_size(l->ffn_down.type), F = l->ffn_down.ne0;
        if (unit < 1 || F % unit || F / unit < n_rank) {
            rc = forge_err_set(err, FORGE_E_UNSUPPORTED,
                               "--tp %d: %s has %lld columns in blocks of %lld: too few to give "
                               "each of %d ranks whole blocks",
                               n_rank, l->ffn_down.name ? l->ffn_down.name : "ffn_down",
                               (long long)F, (long long)unit, n_rank);
            goto fail;
        }
        even_ranges(&ffn, n_rank, F / unit, unit, TP_OUT);
        set(out, &l->ffn_gate, &ffn, TP_OUT);
        set(out, &l->ffn_up, &ffn, TP_OUT);
        set(out, &l->ffn_down, &ffn, TP_IN);
    }
    /* the vocabulary projection: rows split, logits gathered (tied: the embedding's slot, which
     * get_rows still reads whole) */
    const be_weight *ow = hp->tied_output ? &m->tok_embd : &m->output;
    if (ow->ne1 >= n_rank) {
        even_ranges(&voc, n_rank, ow->ne1, 1, TP_OUT_GATHER);
        set(out, ow, &voc, TP_OUT_GATHER);
    }
    return FORGE_OK;
fail:
    tp_plan_free(out);
    return rc;
}
