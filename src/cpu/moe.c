/* moe.c - the CPU mixture-of-experts FFN (be_ops.moe_ffn; the contract is in backend.h).
 *
 *   per token t:  p = softmax(logits[t])         (float, max subtracted, sum in double: ggml's)
 *                 S = the n_used experts with the largest logits (ties: the smaller index)
 *                 w_e = p_e, or p_e / sum_{e' in S} p_e' with norm_w (Mixtral, Qwen3-MoE)
 *                 out[t] = sum over e in S, in ascending e, of w_e down_e(act(gate_e h[t]) * up_e h[t])
 *
 * The rows routed to one expert are gathered into a block and multiplied by that expert's rows
 * of the stacked matrices (a be_weight view at data offset e * rows * row_bytes) through the
 * backend's own matmul ops, so every weight type the CPU multiplies, the thread pool and
 * f32_math work as for any other matmul.
 *
 * Batch invariance: the CPU matmul kernels give a row the same bits whatever else is in the
 * call (tests/test_batch_invariance.c; the f32_math path is a per-row loop), routing looks at
 * the row alone, and the experts of a row are added in a fixed order (ascending expert index),
 * so a row's result does not depend on the other rows of the batch (tests/test_moe.c checks it
 * bit for bit). With two experts per token the order does not matter at all (a + b == b + a),
 * so the sum is bitwise the one llama.cpp forms in rank order.
 *
 * Scratch is allocated per call (sized by the busiest expert) and freed before returning. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/util.h"
#include "cpu/backend_cpu.h"

/* Rows r0 .. r0+n-1 of the stacked matrix w as a matrix of its own. */
static be_weight expert_view(const be_weight *w, int64_t r0, int64_t n)
{
    be_weight v = *w;
    const size_t row_bytes = ggml_row_size(w->type, w->ne0);
    v.ne1 = n;
    v.n_bytes = row_bytes * (uint64_t)n;
    v.data = (const uint8_t *)w->data + (size_t)r0 * row_bytes;
    return v;
}

/* The routing of one row: sel[0..k) the selected experts (largest logits first; ties: the
 * smaller index) and w[0..k) their weights. */
static void route_row(const float *logit, int n_expert, int k, bool norm_w, int32_t *sel, float *w)
{
    float max = -INFINITY;
    for (int e = 0; e < n_expert; e++)
        if (logit[e] > max) max = logit[e];
    double sum = 0.0;
    for (int e = 0; e < n_expert; e++)
        sum += (double)expf(logit[e] - max);
    const float inv = (float)(1.0 / sum);
    /* top-k by insertion: a later expert moves ahead only on a strictly larger logit */
    int n = 0;
    for (int e = 0; e < n_expert; e++) {
        int i = n < k ? n : k;
        while (i > 0 && logit[e] > logit[sel[i - 1]]) {
            if (i < k) sel[i] = sel[i - 1];
            i--;
        }
        if (i < k) {
            sel[i] = e;
            if (n < k) n++;
        }
    }
    double wsum = 0.0;
    for (int r = 0; r < k; r++) {
        w[r] = expf(logit[sel[r]] - max) * inv;
        wsum += (double)w[r];
    }
    if (norm_w) {
        const float s = (float)wsum;
        for (int r = 0; r < k; r++)
            w[r] = w[r] / s;
    }
}

static int check_args(const be_buf *out, const be_buf *h, const be_buf *logits, const be_moe *moe,
                      int n_tok, forge_err *err)
{
    if (!moe || !moe->gate_exps || !moe->up_exps || !moe->down_exps || n_tok < 0)
        return forge_err_set(err, FORGE_E_INTERNAL, "moe_ffn: missing expert weights");
    const int ne = moe->n_expert, k = moe->n_used;
    const int64_t F = moe->n_ff, E = moe->gate_exps->ne0;
    if (ne < 1 || k < 1 || k > ne || F < 1)
        return forge_err_set(err, FORGE_E_INTERNAL,
                             "moe_ffn: %d of %d experts per token, expert FFN length %lld", k, ne,
                             (long long)F);
    if (moe->up_exps->ne0 != E || moe->gate_exps->ne1 != F * ne || moe->up_exps->ne1 != F * ne ||
        moe->down_exps->ne0 != F || moe->down_exps->ne1 != E * ne)
        return forge_err_set(err, FORGE_E_INTERNAL,
                             "moe_ffn: expert matrices %s [%lld, %lld], %s [%lld, %lld], %s [%lld, "
                             "%lld] do not fit %d experts of [%lld -> %lld -> %lld]",
                             moe->gate_exps->name, (long long)moe->gate_exps->ne0,
                             (long long)moe->gate_exps->ne1, moe->up_exps->name,
                             (long long)moe->up_exps->ne0, (long long)moe->up_exps->ne1,
                             moe->down_exps->name, (long long)moe->down_exps->ne0,
                             (long long)moe->down_exps->ne1, ne, (long long)E, (long long)F,
                             (long long)E);
    if (moe->act != BE_ACT_SILU && moe->act != BE_ACT_GELU_TANH)
        return forge_err_set(err, FORGE_E_INTERNAL, "moe_ffn: activation %d", (int)moe->act);
    const int64_t nt = n_tok;
    if (out && h && out->data == h->data)
        return forge_err_set(err, FORGE_E_INTERNAL, "moe_ffn: out must not be the input h");
    if (!out || !h || !logits || out->n < nt * E || h->n < nt * E || logits->n < nt * ne)
        return forge_err_set(err, FORGE_E_INTERNAL,
                             "moe_ffn: buffers of %lld, %lld, %lld floats for %d rows of %lld "
                             "(%d experts)",
                             out ? (long long)out->n : -1LL, h ? (long long)h->n : -1LL,
                             logits ? (long long)logits->n : -1LL, n_tok, (long long)E, ne);
    return FORGE_OK;
}

int cpu_moe_ffn(backend *be, be_buf *out, const be_buf *h, const be_buf *logits, const be_moe *moe,
                int n_tok, forge_err *err)
{
    const be_ops *op = be->ops;
    int32_t *sel = NULL, *start = NULL, *cursor = NULL, *list = NULL;
    float *wsel = NULL, *scratch = NULL;
    int rc = check_args(out, h, logits, moe, n_tok, err);
    if (rc || n_tok == 0) return rc;
    const int ne = moe->n_expert, k = moe->n_used;
    const int64_t F = moe->n_ff, E = moe->gate_exps->ne0, n_assign = (int64_t)n_tok * k;

    /* routing, then the assignments (t * k + rank) grouped by expert, rows ascending */
    sel = malloc((size_t)n_assign * sizeof *sel);
    wsel = malloc((size_t)n_assign * sizeof *wsel);
    start = calloc((size_t)ne + 1, sizeof *start);
    cursor = malloc((size_t)ne * sizeof *cursor);
    list = malloc((size_t)n_assign * sizeof *list);
    if (!sel || !wsel || !start || !cursor || !list) goto nomem;
    for (int t = 0; t < n_tok; t++)
        route_row(logits->data + (int64_t)t * ne, ne, k, moe->norm_w, sel + (int64_t)t * k,
                  wsel + (int64_t)t * k);
    for (int64_t a = 0; a < n_assign; a++)
        start[sel[a] + 1]++;
    int64_t most = 0;
    for (int e = 0; e < ne; e++) {
        if (start[e + 1] > most) most = start[e + 1];
        start[e + 1] += start[e];
    }
    memcpy(cursor, start, (size_t)ne * sizeof *cursor);
    for (int64_t a = 0; a < n_assign; a++)
        list[cursor[sel[a]]++] = (int32_t)a;

    /* per expert: X = its rows of h, G = act(Wgate X) * Wup X, Y = Wdown G, out[t] += w Y */
    scratch = malloc((size_t)most * (size_t)(2 * E + 2 * F) * sizeof *scratch);
    if (!scratch) goto nomem;
    float *X = scratch, *G = X + most * E, *U = G + most * F, *Y = U + most * F;
    memset(out->data, 0, (size_t)(n_tok * E) * sizeof(float));
    for (int e = 0; e < ne; e++) {
        const int c = start[e + 1] - start[e];
        if (c == 0) continue;
        const int32_t *rows = list + start[e];
        for (int i = 0; i < c; i++)
            memcpy(X + (int64_t)i * E, h->data + (int64_t)(rows[i] / k) * E,
                   (size_t)E * sizeof(float));
        const be_weight wg = expert_view(moe->gate_exps, (int64_t)e * F, F);
        const be_weight wu = expert_view(moe->up_exps, (int64_t)e * F, F);
        const be_weight wd = expert_view(moe->down_exps, (int64_t)e * E, E);
        be_buf xb = {X, c * E}, gb = {G, c * F}, ub = {U, c * F}, yb = {Y, c * E};
        be_buf *const ys[] = {&gb, &ub};
        const be_weight *const ws[] = {&wg, &wu};
        if (op->matmul_multi) {
            if ((rc = op->matmul_multi(be, 2, ys, ws, &xb, c, err))) goto done;
        } else if ((rc = op->matmul(be, &gb, &wg, &xb, c, err)) ||
                   (rc = op->matmul(be, &ub, &wu, &xb, c, err))) {
            goto done;
        }
        rc = moe->act == BE_ACT_GELU_TANH ? op->geglu(be, &gb, &gb, &ub, c * F, err)
                                           : op->swiglu(be, &gb, &gb, &ub, c * F, err);
        if (rc || (rc = op->matmul(be, &yb, &wd, &gb, c, err))) goto done;
        for (int i = 0; i < c; i++) {
            const float w = wsel[rows[i]];
            float *o = out->data + (int64_t)(rows[i] / k) * E;
            const float *y = Y + (int64_t)i * E;
            for (int64_t j = 0; j < E; j++)
                o[j] += w * y[j];
        }
    }
    goto done;
nomem:
    rc = forge_err_set(err, FORGE_E_NOMEM, "moe_ffn: out of memory for %d rows", n_tok);
done:
    free(sel);
    free(wsel);
    free(start);
    free(cursor);
    free(list);
    free(scratch);
    return rc;
}
