/* repack.c - load-time copies of weights in the layouts some ISA's kernels read faster than the
 * file's (kernels.h: kern_repack). Plain C: a copy is made once per model, by the pool's
 * threads, a group of rows at a time. The layouts themselves are described in kernels.h; which
 * kernel reads which layout is decided by the per-ISA kernel lookup (kern_repack_layout). */
#include <string.h>

#include "core/util.h"
#include "cpu/kern_impl.h"

#define X16_ROWS KERN_X16_ROWS
#define X16_PAIR_BYTES KERN_X16_PAIR_BYTES
#define X16_NIB_BYTES KERN_X16_NIB_BYTES
#define X16_SCALE_OFF KERN_X16_SCALE_OFF

int64_t kern_repack_group_rows(int layout)
{
    return layout == KERN_LAYOUT_Q4_0_X16 ? X16_ROWS : 1;
}

size_t kern_repack_group_bytes(int layout, int64_t n_in)
{
    if (layout != KERN_LAYOUT_Q4_0_X16 || n_in <= 0 || n_in % KERN_QK) return 0;
    return (size_t)((n_in / KERN_QK + 1) / 2) * X16_PAIR_BYTES;
}

size_t kern_repack_bytes(int layout, int64_t n_out, int64_t n_in)
{
    size_t g = kern_repack_group_bytes(layout, n_in);
    if (!g || n_out < 0) return 0;
    return (size_t)(n_out / X16_ROWS) * g;
}

typedef struct repack_job {
    const uint8_t *W;
    uint8_t *dst;
    int64_t n_groups, nb;
    size_t row_bytes, group_bytes;
} repack_job;

/* One group of 16 Q4_0 rows into the X16 layout. */
static void repack_q4_0_x16_group(const repack_job *j, int64_t g)
{
    uint8_t *dg = j->dst + (size_t)g * j->group_bytes;
    const uint8_t *wg = j->W + (size_t)g * X16_ROWS * j->row_bytes;
    memset(dg, 0, j->group_bytes); /* the padding of an odd last pair */
    for (int64_t b = 0; b < j->nb; b++) {
        uint8_t *pair = dg + (size_t)(b / 2) * X16_PAIR_BYTES;
        uint8_t *nib = pair + (size_t)(b % 2) * X16_NIB_BYTES;
        uint8_t *sc = pair + X16_SCALE_OFF + (size_t)(b % 2) * 32;
        for (int r = 0; r < X16_ROWS; r++) {
            const uint8_t *blk = wg + (size_t)r * j->row_bytes + (size_t)b * KERN_Q4_0_BYTES;
            for (int k = 0; k < 4; k++)
                memcpy(nib + 64 * k + 4 * r, blk + 2 + 4 * k, 4);
            memcpy(sc + 2 * r, blk, 2);
        }
    }
}

static void repack_task(void *p, int ith, int nth)
{
    const repack_job *j = p;
    const int64_t per = (j->n_groups + nth - 1) / nth;
    for (int64_t g = per * ith; g < j->n_groups && g < per * (ith + 1); g++)
        repack_q4_0_x16_group(j, g);
}

int kern_repack(kern_pool *pool, int layout, int wtype, const void *W, int64_t n_out, int64_t n_in,
                void *dst, forge_err *err)
{
    if (layout != KERN_LAYOUT_Q4_0_X16 || wtype != GGML_TYPE_Q4_0)
        return forge_err_set(err, FORGE_E_INVALID, "repack: layout %d is not one of type %s",
                             layout, ggml_type_name(wtype));
    if (n_out < 0 || n_in <= 0 || n_in % KERN_QK || !W || !dst)
        return forge_err_set(err, FORGE_E_INVALID,
                             "repack: bad shape n_out %lld n_in %lld (or NULL pointer)",
                             (long long)n_out, (long long)n_in);
    repack_job j = {W, dst, n_out / X16_ROWS, n_in / KERN_QK,
                    (size_t)(n_in / KERN_QK) * KERN_Q4_0_BYTES,
                    kern_repack_group_bytes(layout, n_in)};
    if (j.n_groups > 0) kern_pool_run(pool, repack_task, &j);
    return FORGE_OK;
}
