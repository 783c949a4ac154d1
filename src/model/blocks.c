/* blocks.c - the pieces of a forward pass the architectures share (src/model/blocks.h), each
 * one backend op where the backend offers the fused form, else the plain ops. */
#include "model/blocks.h"

/* ys[i] = ws[i] x for weights that share the input x: one backend op where the backend offers
 * matmul_multi (same results), else n matmuls. */
int blk_matmul_shared(backend *be, int n, be_buf *const *ys, const be_weight *const *ws,
                      const be_buf *x, int n_tok, forge_err *err)
{
    if (be->ops->matmul_multi) return be->ops->matmul_multi(be, n, ys, ws, x, n_tok, err);
    for (int i = 0; i < n; i++) {
        int rc = be->ops->matmul(be, ys[i], ws[i], x, n_tok, err);
        if (rc) return rc;
    }
    return FORGE_OK;
}

/* ys[i] = ws[i] (rms_norm(x) * norm) (+ bs[i]); with swiglu ys[0] = silu(y0) * y1. One backend
 * op where it offers norm_matmul, else the plain ops (hn receives the normed x). */
int blk_norm_matmul(backend *be, int n, be_buf *const *ys, const be_weight *const *ws,
                    const be_weight *const *bs, const be_buf *x, const be_weight *norm, float eps,
                    bool swiglu, be_buf *hn, int n_tok, forge_err *err)
{
    const be_ops *op = be->ops;
    int rc;
    if (op->norm_matmul)
        return op->norm_matmul(be, n, ys, ws, bs, x, norm, eps, swiglu, hn, n_tok, err);
    if ((rc = op->rms_norm(be, hn, x, norm, n_tok, ws[0]->ne0, eps, err))) return rc;
    if ((rc = blk_matmul_shared(be, n, ys, ws, hn, n_tok, err))) return rc;
    for (int i = 0; bs && i < n; i++)
        if (bs[i] && (rc = op->add_bias(be, ys[i], bs[i], n_tok, err))) return rc;
    if (swiglu) return op->swiglu(be, ys[0], ys[0], ys[1], (int64_t)n_tok * ws[0]->ne1, err);
    return FORGE_OK;
}

/* x += w h (+ bias): the projection back into the residual stream; tmp holds w h when the
 * backend has no matmul_add (or there is a bias). */
int blk_matmul_residual(backend *be, be_buf *x, const be_weight *w, const be_weight *bias,
                        const be_buf *h, be_buf *tmp, int n_tok, int64_t dim, forge_err *err)
{
    const be_ops *op = be->ops;
    int rc;
    if (op->matmul_add && !bias) return op->matmul_add(be, x, w, h, tmp, n_tok, err);
    if ((rc = op->matmul(be, tmp, w, h, n_tok, err))) return rc;
    if (bias && (rc = op->add_bias(be, tmp, bias, n_tok, err))) return rc;
    return op->add(be, x, tmp, (int64_t)n_tok * dim, err);
}

/* logits rows 0..n_out-1 = x rows out_rows[]: contiguous runs of rows copied at once (a decode
 * batch wants every row: nothing to copy) */
int blk_gather_out_rows(backend *be, be_buf *dst, const be_buf *x, const be_batch *bt, int64_t E,
                        forge_err *err)
{
    for (int i = 0; i < bt->n_out;) {
        int j = i + 1;
        while (j < bt->n_out && bt->out_rows[j] == bt->out_rows[j - 1] + 1)
            j++;
        int rc = be->ops->copy_rows(be, dst, i, x, bt->out_rows[i], j - i, E, err);
        if (rc) return rc;
        i = j;
    }
    return FORGE_OK;
}
