/* blocks.h - pieces of a forward pass shared by the architectures (arch_*.c): written against
 * the backend interface, using a backend's fused ops where it has them. Internal. */
#ifndef FORGE_MODEL_BLOCKS_H
#define FORGE_MODEL_BLOCKS_H

#include "model/model.h"

/* rc = expr; on failure jump to the function's `done` label */
#define TRY(expr)                                                                                  \
    do {                                                                                           \
        rc = (expr);                                                                               \
        if (rc) goto done;                                                                         \
    } while (0)

/* ys[i] = ws[i] x for n weights that share the input x (one op where the backend has
 * matmul_multi). */
int blk_matmul_shared(backend *be, int n, be_buf *const *ys, const be_weight *const *ws,
                      const be_buf *x, int n_tok, forge_err *err);
/* ys[i] = ws[i] (rms_norm(x) * norm) (+ bs[i]); with swiglu ys[0] = silu(y0) * y1. hn receives
 * the normed x (when the backend has no norm_matmul). */
int blk_norm_matmul(backend *be, int n, be_buf *const *ys, const be_weight *const *ws,
                    const be_weight *const *bs, const be_buf *x, const be_weight *norm, float eps,
                    bool swiglu, be_buf *hn, int n_tok, forge_err *err);
/* x += w h (+ bias); tmp holds w h when needed. */
int blk_matmul_residual(backend *be, be_buf *x, const be_weight *w, const be_weight *bias,
                        const be_buf *h, be_buf *tmp, int n_tok, int64_t dim, forge_err *err);
/* dst rows 0..n_out-1 = x rows bt->out_rows[] (runs of rows copied at once). */
int blk_gather_out_rows(backend *be, be_buf *dst, const be_buf *x, const be_batch *bt, int64_t E,
                        forge_err *err);

#endif /* FORGE_MODEL_BLOCKS_H */
