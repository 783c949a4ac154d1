/* test_gpu_paged.c - the GPU side of batched, paged forward passes (issue 12):
 *   1. paged attention of the GPU backend (prompt chunks and decode rows of several sequences
 *      over shuffled block tables; blocks of 16 and 32; F32 and F16 cache; GQA; head_dim 32 to
 *      256 and one that is no multiple of 32) against the CPU backend's attention op by NMSE,
 *      with every cache row no row may read poisoned with NaN (unowned blocks and the tails of
 *      owned ones); prompt chunks by the paged kernel and by the tensor cores through the
 *      tables; batch invariance: a sequence decoded alone gives the bits it gave in the batch;
 *   2. gpu_matvec_multi == gpu_matvec row by row, bit for bit (F32, F16, BF16, Q8_0, Q4_0; the
 *      Q8_0/Q4_0 ones through the dp4a and the tensor-core kernels); several matrices in one
 *      launch (gpu_matvec_multi_mats) likewise, and matrices that split rows unlike refused;
 *   3. gpu_argmax_rows against the host (ties, NaN rows, all-NaN row);
 *   4. model_forward on the GPU with a batch of 4 sequences (prompt chunks, then decode steps,
 *      greedy ids by the backend's argmax_rows) gives the greedy ids of each sequence alone
 *      through a forge_context on the GPU (stories260K; KV F32 and F16; fused and unfused
 *      attention), and each decode row alone gives the logits it had in the batch, bit for bit.
 * FORGE_GPU_PAGED_FAST=0 runs part 1 on the generic paged kernel only.
 * Usage: test_gpu_paged MODELS_DIR (../shared/testdata/models). Needs a GPU. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend_gpu.h"
#include "gpu_test_util.h"
#include "model/model.h"

static const char *gpu_type_name_test(int t)
{
    return t == GGML_TYPE_F32    ? "F32"
           : t == GGML_TYPE_F16  ? "F16"
           : t == GGML_TYPE_BF16 ? "BF16"
           : t == GGML_TYPE_Q8_0 ? "Q8_0"
                                 : "Q4_0";
}

/* ---- 1. paged attention ------------------------------------------------------------------- */

typedef struct pa_case {
    int block_size, kv_f16, n_head, n_kv_head, head_dim;
} pa_case;

#define PA_SEQS 4
#define PA_BLOCKS 96

static void shuffle(int *a, int n, uint64_t *seed)
{
    for (int i = n - 1; i > 0; i--) {
        int j = (int)(gt_rand_u64(seed) % (uint64_t)(i + 1));
        int t = a[i];
        a[i] = a[j];
        a[j] = t;
    }
}

/* One backend's state for a case: the data tables (F32 weights: rows of q, k, v that get_rows
 * copies into the batch buffers, the only way into a backend's buffers), the cache, buffers. */
typedef struct pa_env {
    backend *be;
    be_wshare share;
    be_weight tq, tk, tv;
    be_kv *kv;
    be_buf *q, *k, *v, *out;
} pa_env;

static void env_make(pa_env *e, bool gpu, const pa_case *c, int n_ctx, int n_rows, int n_data,
                     const float *tq, const float *tk, const float *tv)
{
    const int64_t QD = (int64_t)c->n_head * c->head_dim, KD = (int64_t)c->n_kv_head * c->head_dim;
    memset(e, 0, sizeof *e);
    pthread_mutex_init(&e->share.lock, NULL);
    e->tq = (be_weight){"tq", GGML_TYPE_F32, QD, n_data, (uint64_t)(n_data * QD * 4), tq, 0};
    e->tk = (be_weight){"tk", GGML_TYPE_F32, KD, n_data, (uint64_t)(n_data * KD * 4), tk, 1};
    e->tv = (be_weight){"tv", GGML_TYPE_F32, KD, n_data, (uint64_t)(n_data * KD * 4), tv, 2};
    if (gpu) {
        GT_OK(backend_gpu_create(0, &e->be, err));
        be_gpu_plan pl;
        memset(&pl, 0, sizeof pl);
        backend_gpu_plan_add_weight(e->be, &pl, &e->tq);
        backend_gpu_plan_add_weight(e->be, &pl, &e->tk);
        backend_gpu_plan_add_weight(e->be, &pl, &e->tv);
        pl.n_layer = 1;
        pl.n_ctx = n_ctx;
        pl.kv_dim = (int)KD;
        pl.kv_type = c->kv_f16 ? FORGE_KV_F16 : FORGE_KV_F32;
        pl.n_head = c->n_head;
        pl.head_dim = c->head_dim;
        pl.n_batch = n_rows;
        pl.act_floats = (int64_t)n_rows * (2 * QD + 2 * KD);
        pl.share = &e->share;
        pl.n_seq_max = PA_SEQS + 1;
        GT_OK(backend_gpu_plan(e->be, &pl, err));
        be_weight *ws[3] = {&e->tq, &e->tk, &e->tv};
        GT_OK(e->be->ops->weights_acquire(e->be, &e->share, ws, 3, NULL, NULL, err));
    } else {
        GT_OK(backend_cpu_create(1, false, &e->be, err));
    }
    backend *be = e->be;
    GT_OK(be->ops->kv_create(be, 1, n_ctx, (int)KD, c->kv_f16 ? FORGE_KV_F16 : FORGE_KV_F32,
                             &e->kv, err));
    GT_OK(be->ops->buf_create(be, n_rows * QD, &e->q, err));
    GT_OK(be->ops->buf_create(be, n_rows * KD, &e->k, err));
    GT_OK(be->ops->buf_create(be, n_rows * KD, &e->v, err));
    GT_OK(be->ops->buf_create(be, n_rows * QD, &e->out, err));
}

static void env_free(pa_env *e)
{
    const be_ops *op = e->be->ops;
    op->buf_free(e->be, e->q);
    op->buf_free(e->be, e->k);
    op->buf_free(e->be, e->v);
    op->buf_free(e->be, e->out);
    op->kv_free(e->be, e->kv);
    if (op->weights_release) op->weights_release(e->be);
    op->destroy(e->be);
    pthread_mutex_destroy(&e->share.lock);
}

/* q/k/v rows ids[0..n) of the data tables into the buffers, then the attention op of the batch;
 * the output to host (may be NULL). */
static void run_attn(pa_env *e, const pa_case *c, const be_batch *bt, const int32_t *ids,
                     float *out)
{
    const be_ops *op = e->be->ops;
    const int n = bt->n_tok;
    const int64_t QD = (int64_t)c->n_head * c->head_dim;
    GT_OK(op->get_rows(e->be, e->q, &e->tq, ids, n, err));
    GT_OK(op->get_rows(e->be, e->k, &e->tk, ids, n, err));
    GT_OK(op->get_rows(e->be, e->v, &e->tv, ids, n, err));
    if (op->batch_set) GT_OK(op->batch_set(e->be, bt, err));
    const be_attn a = {0, c->n_head, c->n_kv_head, c->head_dim, 1.0f / sqrtf((float)c->head_dim),
                       bt, 0.0f, 0};
    GT_OK(op->attention(e->be, e->out, e->q, e->k, e->v, e->kv, &a, err));
    if (out) GT_OK(op->buf_read(e->be, e->out, 0, n * QD, out, err));
}

/* A batch under construction: rows of sequences over their tables (sequence j of the batch
 * gets a copy of the table of the test's sequence s). */
#define TB_STRIDE 128
typedef struct tb {
    int32_t pos[4096], slot[4096], ids[4096], seq_start[PA_SEQS + 2], out_rows[PA_SEQS + 1];
    int32_t tabs[(PA_SEQS + 1) * TB_STRIDE], n_tab[PA_SEQS + 1];
    be_batch bt;
} tb;

static void tb_begin(tb *b, int block_size)
{
    memset(&b->bt, 0, sizeof b->bt);
    b->bt.table_stride = TB_STRIDE;
    b->bt.block_size = block_size;
    b->seq_start[0] = 0;
}

/* n rows of a sequence with table tab (n_tab entries) at positions p0.., data rows id0.. */
static void tb_seq(tb *b, const int32_t *tab, int n_tab, int p0, int n, int id0)
{
    const int bs = b->bt.block_size, j = b->bt.n_seq;
    memcpy(b->tabs + (size_t)j * TB_STRIDE, tab, (size_t)n_tab * 4);
    b->n_tab[j] = n_tab;
    for (int i = 0; i < n; i++) {
        int r = b->bt.n_tok++, p = p0 + i;
        b->pos[r] = p;
        b->slot[r] = tab[p / bs] * bs + p % bs;
        b->ids[r] = id0 + i;
    }
    b->bt.n_seq++;
    b->seq_start[b->bt.n_seq] = b->bt.n_tok;
}

static const be_batch *tb_end(tb *b)
{
    b->bt.pos = b->pos;
    b->bt.slot = b->slot;
    b->bt.seq_start = b->seq_start;
    b->bt.table = b->tabs;
    b->bt.n_table = b->n_tab;
    b->bt.out_rows = b->out_rows;
    b->bt.n_out = 0;
    return &b->bt;
}

static double nmse_f(const float *out, const float *ref, int64_t n)
{
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(out[i])) return INFINITY;
        double d = (double)out[i] - ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    return den > 0 ? num / den : num;
}

static void paged_case(const pa_case *c, uint64_t *seed)
{
    const int bs = c->block_size, n_ctx = PA_BLOCKS * bs;
    const int64_t QD = (int64_t)c->n_head * c->head_dim, KD = (int64_t)c->n_kv_head * c->head_dim;
    /* history lengths (prompt chunks), then one decode row each */
    const int hist[PA_SEQS] = {37, 5 * bs + 3, 1, 9 * bs};
    int perm[PA_BLOCKS];
    for (int i = 0; i < PA_BLOCKS; i++)
        perm[i] = i;
    shuffle(perm, PA_BLOCKS, seed);
    int32_t tabs[PA_SEQS + 1][TB_STRIDE];
    int n_tab[PA_SEQS + 1], used = 0, H = 0;
    for (int s = 0; s < PA_SEQS; s++) {
        n_tab[s] = (hist[s] + 1 + bs - 1) / bs + 1; /* one spare block: a poisoned tail */
        for (int i = 0; i < n_tab[s]; i++)
            tabs[s][i] = perm[used++];
        H += hist[s];
    }
    n_tab[PA_SEQS] = PA_BLOCKS - used; /* the blocks nobody owns: poison only */
    for (int i = 0; i < n_tab[PA_SEQS]; i++)
        tabs[PA_SEQS][i] = perm[used + i];
    const int D = PA_SEQS, P = n_ctx, R = H + D + P;
    float *tq = gt_xmalloc((size_t)R * QD * 4), *tk = gt_xmalloc((size_t)R * KD * 4),
          *tv = gt_xmalloc((size_t)R * KD * 4);
    gt_fill(tq, (int64_t)(H + D) * QD, 1.0f, seed);
    gt_fill(tk, (int64_t)(H + D) * KD, 1.0f, seed);
    gt_fill(tv, (int64_t)(H + D) * KD, 1.0f, seed);
    for (int64_t i = (int64_t)(H + D) * QD; i < (int64_t)R * QD; i++)
        tq[i] = 0.0f;
    for (int64_t i = (int64_t)(H + D) * KD; i < (int64_t)R * KD; i++)
        tk[i] = tv[i] = NAN;
    pa_env cpu, gpu;
    static tb b;
    char what[160];
    snprintf(what, sizeof what, "blocks %d, KV %s, heads %d/%d, head_dim %d", bs,
             c->kv_f16 ? "f16" : "f32", c->n_head, c->n_kv_head, c->head_dim);
    /* the CPU reference: prompt chunks of all sequences in one batch, then one decode row per
     * sequence (in reverse order) */
    float *oc = gt_xmalloc((size_t)H * QD * 4), *og = gt_xmalloc((size_t)H * QD * 4);
    float dc[PA_SEQS * 2048], dg[PA_SEQS * 2048], alone[2048];
    env_make(&cpu, false, c, n_ctx, n_ctx, R, tq, tk, tv);
    tb_begin(&b, bs);
    for (int s = 0, id = 0; s < PA_SEQS; id += hist[s], s++)
        tb_seq(&b, tabs[s], n_tab[s], 0, hist[s], id);
    run_attn(&cpu, c, tb_end(&b), b.ids, oc);
    tb_begin(&b, bs);
    for (int s = PA_SEQS - 1; s >= 0; s--)
        tb_seq(&b, tabs[s], n_tab[s], hist[s], 1, H + s);
    run_attn(&cpu, c, tb_end(&b), b.ids, dc);
    env_free(&cpu);

    /* the GPU: prompt chunks by the paged kernel, then by the tensor-core kernel gathering
     * through the tables (chunks of >= 2 rows; head_dim 64 and 128 only) */
    for (int fa = 0; fa < 2; fa++) {
        const bool fa_on = fa && gpu_attention_prompt_supported(c->head_dim,
                                                                c->kv_f16 ? GGML_TYPE_F16
                                                                          : GGML_TYPE_F32);
        if (fa && !fa_on) continue;
        setenv("FORGE_GPU_FATTN_MIN", fa ? "2" : "1000000", 1);
        env_make(&gpu, true, c, n_ctx, n_ctx, R, tq, tk, tv);
        unsetenv("FORGE_GPU_FATTN_MIN");
        /* poison every cache row: each sequence's whole table, and the unowned blocks */
        tb_begin(&b, bs);
        for (int s = 0, id = H + D; s <= PA_SEQS; id += n_tab[s] * bs, s++)
            tb_seq(&b, tabs[s], n_tab[s], 0, n_tab[s] * bs, id);
        run_attn(&gpu, c, tb_end(&b), b.ids, NULL);

        tb_begin(&b, bs);
        for (int s = 0, id = 0; s < PA_SEQS; id += hist[s], s++)
            tb_seq(&b, tabs[s], n_tab[s], 0, hist[s], id);
        run_attn(&gpu, c, tb_end(&b), b.ids, og);
        /* the tensor cores multiply in fp16 (test_gpu_fattn's bound) */
        const double thr = fa_on ? 5e-4 : c->kv_f16 ? 1e-5 : 1e-10;
        printf("          (%s)\n", what);
        gt_report("paged", fa_on ? "prompt chunks, tensor cores through the tables"
                                 : "prompt chunks, paged kernel",
                  nmse_f(og, oc, (int64_t)H * QD), thr, 1);

        tb_begin(&b, bs);
        for (int s = PA_SEQS - 1; s >= 0; s--)
            tb_seq(&b, tabs[s], n_tab[s], hist[s], 1, H + s);
        run_attn(&gpu, c, tb_end(&b), b.ids, dg);
        gt_report("paged", "decode rows", nmse_f(dg, dc, PA_SEQS * QD), c->kv_f16 ? 1e-5 : 1e-10,
                  1);
        /* batch invariance: each sequence again alone (its K/V row stored again, same values) */
        for (int s = 0; s < PA_SEQS; s++) {
            tb_begin(&b, bs);
            tb_seq(&b, tabs[s], n_tab[s], hist[s], 1, H + s);
            run_attn(&gpu, c, tb_end(&b), b.ids, alone);
            const int row = PA_SEQS - 1 - s;
            gt_check(!memcmp(alone, dg + (size_t)row * QD, (size_t)QD * 4),
                     "paged decode of sequence %d alone == its row in the batch, bit for bit "
                     "(%s)",
                     s, what);
        }
        env_free(&gpu);
    }
    free(oc);
    free(og);
    free(tq);
    free(tk);
    free(tv);
}

/* ---- 2. multi-row matvec ------------------------------------------------------------------ */

/* The activation rows of a multi-row case: MV_R rows of n_in floats on the host and the device,
 * with quantization scratch for one row and for all of them. */
#define MV_R 16
typedef struct mv_rows {
    float *x, *d_x;
    void *d_xq1, *d_xqm;
} mv_rows;

static void mv_rows_make(mv_rows *r, int64_t n_in, uint64_t *seed, gpu_stream *st)
{
    r->x = gt_xmalloc((size_t)(MV_R * n_in) * 4);
    gt_fill(r->x, MV_R * n_in, 1.0f, seed);
    r->d_x = gt_upload(r->x, (size_t)(MV_R * n_in) * 4, st);
    r->d_xq1 = r->d_xqm = NULL;
    GT_OK(gpu_malloc(&r->d_xq1, gpu_act_q8_bytes(n_in) + 16, err));
    GT_OK(gpu_malloc(&r->d_xqm, gpu_act_q8_bytes(MV_R * n_in) + 16, err));
}

static void mv_rows_free(mv_rows *r)
{
    gpu_free(r->d_x);
    gpu_free(r->d_xq1);
    gpu_free(r->d_xqm);
    free(r->x);
}

static void matvec_multi_case(int t, int64_t n_out, int64_t n_in, int tc, uint64_t *seed,
                              gpu_stream *st)
{
    float *wf = NULL;
    void *raw = gt_make_weights(t, n_out, n_in, seed, &wf);
    void *d_w = gt_upload_weights(t, raw, n_out, n_in, st);
    const int rows[] = {2, 3, 5, 8, 13, 16};
    mv_rows in;
    mv_rows_make(&in, n_in, seed, st);
    float *d_x = in.d_x;
    void *d_xq1 = in.d_xq1, *d_xqm = in.d_xqm;
    const size_t yb = (size_t)(MV_R * n_out) * 4;
    float *d_y1 = gt_out_alloc(yb), *d_ym = gt_out_alloc(yb);
    float *y1 = gt_xmalloc(yb), *ym = gt_xmalloc(yb);
    const int q = t == GGML_TYPE_Q8_0 || t == GGML_TYPE_Q4_0;
    for (size_t ri = 0; ri < GT_LEN(rows); ri++) {
        const int n = rows[ri];
        gt_out_prepare(d_y1, yb, st);
        gt_out_prepare(d_ym, yb, st);
        for (int r = 0; r < n; r++) {
            if (q) GT_OK(gpu_act_quantize(d_x + r * n_in, n_in, d_xq1, st, err));
            GT_OK(gpu_matvec(t, d_w, n_out, n_in, d_x + r * n_in, d_xq1, d_y1 + r * n_out, st,
                             err));
        }
        if (q) GT_OK(gpu_act_quantize(d_x, n * n_in, d_xqm, st, err));
        GT_OK(gpu_matvec_multi(t, d_w, n_out, n_in, n, d_x, d_xqm, d_ym, st, err));
        int g1 = gt_out_fetch(d_y1, yb, y1, st), gm = gt_out_fetch(d_ym, yb, ym, st);
        int same = !memcmp(y1, ym, (size_t)(n * n_out) * 4);
        int finite = 1;
        for (int64_t i = 0; i < n * n_out; i++)
            finite &= isfinite(ym[i]);
        gt_check(same && finite && g1 && gm,
                 "matvec_multi%s %s %lld x %lld, %d rows == matvec per row, bit for bit%s%s",
                 tc ? " (tensor cores)" : "", gpu_type_name_test(t), (long long)n_out,
                 (long long)n_in, n,
                 finite ? "" : " (unwritten output)", gm ? "" : " (guard overwritten)");
        if (same && finite && gm)
            printf("matvec_multi%s %-4s %5lld x %5lld, %2d rows: bit-identical  ok\n",
                   tc ? " (tc)" : "", gpu_type_name_test(t), (long long)n_out, (long long)n_in,
                   n);
    }
    gpu_free(d_w);
    mv_rows_free(&in);
    gpu_free(d_y1);
    gpu_free(d_ym);
    free(y1);
    free(ym);
    free(wf);
    free(raw);
}

/* Several matrices in one launch (gpu_matvec_multi_mats): each matrix's rows equal gpu_matvec's
 * bit for bit; matrices that split their rows differently are refused (FORGE_E_UNSUPPORTED). */
static void matvec_mats_case(int t, int n_mat, const int64_t *n_out, int64_t n_in, int must,
                             uint64_t *seed, gpu_stream *st)
{
    const int ok = gpu_matvec_multi_mats_ok(t, n_mat, n_out, n_in);
    if (must) gt_check(ok, "matvec_multi_mats %s: %d matrices of %lld.. x %lld refused",
                       gpu_type_name_test(t), n_mat, (long long)n_out[0], (long long)n_in);
    mv_rows in;
    mv_rows_make(&in, n_in, seed, st);
    float *d_x = in.d_x;
    void *d_xq1 = in.d_xq1, *d_xqm = in.d_xqm;
    const int q = t == GGML_TYPE_Q8_0 || t == GGML_TYPE_Q4_0;
    void *raw[GPU_MATVEC_MULTI_MATS], *d_w[GPU_MATVEC_MULTI_MATS];
    float *wf[GPU_MATVEC_MULTI_MATS], *d_y1[GPU_MATVEC_MULTI_MATS], *d_ym[GPU_MATVEC_MULTI_MATS];
    for (int m = 0; m < n_mat; m++) {
        raw[m] = gt_make_weights(t, n_out[m], n_in, seed, &wf[m]);
        d_w[m] = gt_upload_weights(t, raw[m], n_out[m], n_in, st);
        d_y1[m] = gt_out_alloc((size_t)(MV_R * n_out[m]) * 4);
        d_ym[m] = gt_out_alloc((size_t)(MV_R * n_out[m]) * 4);
    }
    const int rows[] = {2, 5, 9, 16};
    for (size_t ri = 0; ri < GT_LEN(rows); ri++) {
        const int n = rows[ri];
        if (q) GT_OK(gpu_act_quantize(d_x, n * n_in, d_xqm, st, err));
        for (int m = 0; m < n_mat; m++)
            gt_out_prepare(d_ym[m], (size_t)(n * n_out[m]) * 4, st);
        forge_err e = {0};
        const int rc = gpu_matvec_multi_mats(t, n_mat, (const void *const *)d_w, n_out, n_in, n,
                                             d_x, d_xqm, d_ym, 0, st, &e);
        if (!ok) {
            gt_check(rc == FORGE_E_UNSUPPORTED && e.msg[0],
                     "matvec_multi_mats %s, rows split unlike: rc %d, want unsupported",
                     gpu_type_name_test(t), rc);
            printf("matvec_multi_mats %-4s %d matrices %lld.. x %lld: refused (rows split "
                   "unlike)  ok\n",
                   gpu_type_name_test(t), n_mat, (long long)n_out[0], (long long)n_in);
            break;
        }
        gt_ok(rc, &e, "gpu_matvec_multi_mats");
        int bad = 0, bad_add = 0;
        for (int m = 0; m < n_mat; m++) {
            const size_t yb = (size_t)(n * n_out[m]) * 4;
            gt_out_prepare(d_y1[m], yb, st);
            for (int r = 0; r < n; r++) {
                if (q) GT_OK(gpu_act_quantize(d_x + r * n_in, n_in, d_xq1, st, err));
                GT_OK(gpu_matvec(t, d_w[m], n_out[m], n_in, d_x + r * n_in, d_xq1,
                                 d_y1[m] + r * n_out[m], st, err));
            }
            float *y1 = gt_xmalloc(yb), *ym = gt_xmalloc(yb);
            const int g1 = gt_out_fetch(d_y1[m], yb, y1, st), gm = gt_out_fetch(d_ym[m], yb, ym, st);
            bad += !g1 || !gm || memcmp(y1, ym, yb) != 0;
            free(y1);
            free(ym);
        }
        /* add: d_ym (= W x now) += W x, against gpu_add(y1, y1) */
        GT_OK(gpu_matvec_multi_mats(t, n_mat, (const void *const *)d_w, n_out, n_in, n, d_x,
                                    d_xqm, d_ym, 1, st, err));
        for (int m = 0; m < n_mat; m++) {
            const size_t yb = (size_t)(n * n_out[m]) * 4;
            GT_OK(gpu_add(d_y1[m], d_y1[m], d_y1[m], n * n_out[m], st, err));
            float *y1 = gt_xmalloc(yb), *ym = gt_xmalloc(yb);
            const int g1 = gt_out_fetch(d_y1[m], yb, y1, st), gm = gt_out_fetch(d_ym[m], yb, ym, st);
            bad_add += !g1 || !gm || memcmp(y1, ym, yb) != 0;
            free(y1);
            free(ym);
        }
        gt_check(!bad && !bad_add,
                 "matvec_multi_mats %s %d matrices %lld.. x %lld, %d rows: %d matrices differ "
                 "from matvec per row, %d with add from matvec + gpu_add",
                 gpu_type_name_test(t), n_mat, (long long)n_out[0], (long long)n_in, n, bad,
                 bad_add);
        if (!bad && !bad_add)
            printf("matvec_multi_mats %-4s %d matrices %5lld.. x %5lld, %2d rows: bit-identical "
                   "(and with add)  ok\n",
                   gpu_type_name_test(t), n_mat, (long long)n_out[0], (long long)n_in, n);
    }
    for (int m = 0; m < n_mat; m++) {
        gpu_free(d_w[m]);
        gpu_free(d_y1[m]);
        gpu_free(d_ym[m]);
        free(raw[m]);
        free(wf[m]);
    }
    mv_rows_free(&in);
}

/* gpu_rmsnorm_q8 / gpu_swiglu_q8 against gpu_rmsnorm / gpu_swiglu followed by
 * gpu_act_quantize of all the rows: the floats and the whole Q8_0 scratch (quants, scales,
 * sums), bit for bit. Values spread over several magnitudes, and an all-zero block. */
static void norm_q8_case(int64_t n, int n_rows, uint64_t *seed, gpu_stream *st)
{
    const int64_t n_all = n * n_rows;
    const size_t fb = (size_t)n_all * 4, qb = gpu_act_q8_bytes(n_all);
    float *x = gt_xmalloc(fb), *u = gt_xmalloc(fb), *w = gt_xmalloc((size_t)n * 4);
    gt_fill(x, n_all, 3.0f, seed);
    gt_fill(u, n_all, 2.0f, seed);
    gt_fill(w, n, 1.5f, seed);
    for (int64_t i = 0; i < n_all; i++)
        x[i] *= (float)(1 + (i / 32) % 7) * ((i / 32) % 3 == 0 ? 0.01f : 1.0f);
    for (int64_t i = 32; i < 64 && i < n_all; i++)
        x[i] = 0.0f;
    float *d_x = gt_upload(x, fb, st), *d_u = gt_upload(u, fb, st), *d_w = gt_upload(w, n * 4, st);
    float *d_y1 = gt_out_alloc(fb), *d_y2 = gt_out_alloc(fb);
    void *d_q1 = gt_out_alloc(qb), *d_q2 = gt_out_alloc(qb);
    float *y1 = gt_xmalloc(fb), *y2 = gt_xmalloc(fb);
    unsigned char *q1 = gt_xmalloc(qb), *q2 = gt_xmalloc(qb);
    for (int op = 0; op < 2; op++) {
        gt_out_prepare(d_y1, fb, st);
        gt_out_prepare(d_y2, fb, st);
        gt_out_prepare(d_q1, qb, st);
        gt_out_prepare(d_q2, qb, st);
        if (op == 0) {
            GT_OK(gpu_rmsnorm(d_x, d_w, d_y1, n, n_rows, 1e-5f, st, err));
            GT_OK(gpu_rmsnorm_q8(d_x, d_w, d_y2, n, n_rows, 1e-5f, d_q2, st, err));
        } else {
            GT_OK(gpu_swiglu(d_x, d_u, d_y1, n_all, st, err));
            GT_OK(gpu_swiglu_q8(d_x, d_u, d_y2, n_all, d_q2, st, err));
        }
        GT_OK(gpu_act_quantize(d_y1, n_all, d_q1, st, err));
        const int g = gt_out_fetch(d_y1, fb, y1, st) & gt_out_fetch(d_y2, fb, y2, st) &
                      gt_out_fetch(d_q1, qb, q1, st) & gt_out_fetch(d_q2, qb, q2, st);
        /* the padding between the scratch's parts is never written: compare the parts */
        const size_t nb = (size_t)(n_all / 32);
        const size_t d_off = ((size_t)n_all + 15) / 16 * 16, s_off = d_off + (nb * 4 + 15) / 16 * 16;
        const int same = !memcmp(y1, y2, fb) && !memcmp(q1, q2, (size_t)n_all) &&
                         !memcmp(q1 + d_off, q2 + d_off, nb * 4) &&
                         !memcmp(q1 + s_off, q2 + s_off, nb * 4);
        gt_check(g && same,
                 "%s %lld x %d: values and Q8_0 blocks == %s + gpu_act_quantize, bit for bit%s",
                 op ? "gpu_swiglu_q8" : "gpu_rmsnorm_q8", (long long)n, n_rows,
                 op ? "gpu_swiglu" : "gpu_rmsnorm", g ? "" : " (guard overwritten)");
        if (g && same)
            printf("%s %5lld x %2d: bit-identical to the two launches  ok\n",
                   op ? "swiglu_q8 " : "rmsnorm_q8", (long long)n, n_rows);
    }
    forge_err e = {0};
    gt_check(gpu_rmsnorm_q8(d_x, d_w, d_y2, n + 16, 1, 1e-5f, d_q2, st, &e) == FORGE_E_INVALID &&
                 e.msg[0],
             "gpu_rmsnorm_q8: rows of %lld (not a multiple of 32) refused", (long long)n + 16);
    gpu_free(d_x);
    gpu_free(d_u);
    gpu_free(d_w);
    gpu_free(d_y1);
    gpu_free(d_y2);
    gpu_free(d_q1);
    gpu_free(d_q2);
    free(x);
    free(u);
    free(w);
    free(y1);
    free(y2);
    free(q1);
    free(q2);
}

/* ---- 3. argmax of many rows ---------------------------------------------------------------- */

static int host_argmax(const float *x, int64_t n)
{
    int bi = -1;
    float best = -INFINITY;
    for (int64_t i = 0; i < n; i++)
        if (!isnan(x[i]) && (bi < 0 || x[i] > best)) {
            best = x[i];
            bi = (int)i;
        }
    return bi < 0 ? 0 : bi;
}

static void argmax_rows_test(uint64_t *seed, gpu_stream *st)
{
    const int R = 37;
    const int64_t n = 32000 + 17;
    float *x = gt_xmalloc((size_t)(R * n) * 4);
    gt_fill(x, R * n, 10.0f, seed);
    x[1 * n + 5] = 50.0f; /* ties: the smallest index wins */
    x[1 * n + 900] = 50.0f;
    x[2 * n + n - 1] = 60.0f;
    for (int64_t i = 0; i < n; i++)
        x[3 * n + i] = NAN; /* all NaN: 0 */
    x[4 * n + 0] = NAN;     /* NaN never wins */
    x[4 * n + 7] = 70.0f;
    x[5 * n + 3] = INFINITY;
    x[8 * n + 4002] = 80.0f; /* rows 0, 4, 8, ... start 16-byte aligned (the float4 path): */
    x[8 * n + 4001] = 80.0f; /* ties there too, within one float4 and across threads */
    x[8 * n + 901] = 80.0f;
    x[12 * n + n - 2] = 90.0f; /* the last float4 */
    float *d_x = gt_upload(x, (size_t)(R * n) * 4, st);
    int32_t *d_out = gt_out_alloc((size_t)R * 4), out[37];
    gt_out_prepare(d_out, (size_t)R * 4, st);
    GT_OK(gpu_argmax_rows(d_x, R, n, n, d_out, st, err));
    int guard = gt_out_fetch(d_out, (size_t)R * 4, out, st), bad = 0;
    for (int r = 0; r < R; r++)
        bad += out[r] != host_argmax(x + r * n, n);
    gt_check(!bad && guard, "gpu_argmax_rows: %d rows of %lld == host argmax (%d differ)", R,
             (long long)n, bad);
    printf("argmax_rows %d rows of %lld: %d differ from the host%s\n", R, (long long)n, bad,
           bad || !guard ? "  FAIL" : "  ok");
    gpu_free(d_x);
    gpu_free(d_out);
    free(x);
}

/* ---- 4. model_forward on a batch of sequences vs contexts -------------------------------- */

#define FW_SEQS 4
#define FW_GEN 16
#define FW_BS 16

static int fw_prompt(int s, int32_t *ids)
{
    const int len[FW_SEQS] = {5, 9, 3, 12};
    for (int i = 0; i < len[s]; i++)
        ids[i] = (int32_t)((s * 37 + i * 11) % 480 + 10);
    return len[s];
}

/* Each sequence alone through a forge_context on the GPU. */
static int fw_context_ids(forge_model *m, forge_kv_type kv, int32_t out[FW_SEQS][FW_GEN])
{
    for (int s = 0; s < FW_SEQS; s++) {
        forge_context_params cp = forge_context_default_params();
        cp.n_ctx = 128;
        cp.kv_type = kv;
        cp.device = FORGE_DEVICE_GPU;
        forge_context *ctx = NULL;
        forge_err e = {0};
        int32_t ids[32];
        int n = fw_prompt(s, ids);
        if (forge_context_create(m, &cp, &ctx, &e)) {
            printf("FAIL context: %s\n", e.msg);
            return -1;
        }
        int32_t id = -1;
        int rc = forge_decode_greedy(ctx, ids, n, &id, &e);
        for (int i = 0; !rc && i < FW_GEN; i++) {
            out[s][i] = id;
            rc = forge_decode_greedy(ctx, &id, 1, &id, &e);
        }
        forge_context_free(ctx);
        if (rc) {
            printf("FAIL context decode: %s\n", e.msg);
            return -1;
        }
    }
    return 0;
}

/* All sequences in one fwd_state on the GPU: one batch of the prompts (logits of each last
 * row), then FW_GEN - 1 decode batches of one row per sequence; ids by argmax_rows. */
static int fw_batch_ids(forge_model *m, forge_kv_type kv, int32_t out[FW_SEQS][FW_GEN],
                        uint64_t *seed)
{
    fwd_params p;
    memset(&p, 0, sizeof p);
    p.device = FORGE_DEVICE_GPU;
    p.n_threads = 1;
    p.kv_type = kv;
    p.kv_rows = 64 * FW_BS;
    p.n_batch = 64;
    p.n_seq_max = FW_SEQS;
    fwd_state fs;
    forge_err e = {0};
    int rc = fwd_state_init(&fs, m, &p, &e);
    if (!rc) rc = fwd_reserve_logits(&fs, FW_SEQS, &e);
    if (rc) {
        printf("FAIL fwd_state: %s\n", e.msg);
        if (!fs.be) return -1;
        fwd_state_release(&fs);
        return -1;
    }
    if (!fs.be->ops->argmax_rows) {
        printf("FAIL the GPU backend has no argmax_rows\n");
        fwd_state_release(&fs);
        return -1;
    }
    int perm[64];
    for (int i = 0; i < 64; i++)
        perm[i] = i;
    shuffle(perm, 64, seed);
    int32_t tab[FW_SEQS][TB_STRIDE];
    for (int s = 0; s < FW_SEQS; s++)
        for (int i = 0; i < 4; i++) /* 64 positions each */
            tab[s][i] = perm[s * 4 + i];
    static tb b;
    int32_t ids[256], len[FW_SEQS], next[FW_SEQS];
    /* the prompts, sequences in one batch */
    tb_begin(&b, FW_BS);
    int n = 0;
    for (int s = 0; s < FW_SEQS; s++) {
        len[s] = fw_prompt(s, ids + n);
        tb_seq(&b, tab[s], 4, 0, len[s], 0);
        n += len[s];
        b.out_rows[s] = n - 1;
    }
    tb_end(&b);
    b.bt.n_out = FW_SEQS;
    for (int step = 0; !rc && step < FW_GEN; step++) {
        rc = model_forward(&fs, ids, &b.bt, &e);
        if (!rc)
            rc = fs.be->ops->argmax_rows(fs.be, fs.b.logits, FW_SEQS, m->info.n_vocab, next, &e);
        if (rc) break;
        /* which logits row belongs to which sequence: the order of the batch just run */
        int32_t order[FW_SEQS];
        for (int j = 0; j < FW_SEQS; j++)
            order[j] = step == 0 ? j : ((step - 1) % 2 ? j : FW_SEQS - 1 - j);
        for (int j = 0; j < FW_SEQS; j++)
            out[order[j]][step] = next[j];
        const int rev = step % 2 == 0; /* this next batch's order */
        tb_begin(&b, FW_BS);
        for (int j = 0; j < FW_SEQS; j++) {
            int s = rev ? FW_SEQS - 1 - j : j;
            ids[j] = out[s][step];
            tb_seq(&b, tab[s], 4, len[s], 1, 0);
            len[s]++;
            b.out_rows[j] = j;
        }
        tb_end(&b);
        b.bt.n_out = FW_SEQS;
    }
    if (rc) printf("FAIL batched forward: %s\n", e.msg);
    /* batch invariance of the whole forward pass: the next decode batch (4 rows), then each of
     * its rows alone (the same id at the same position: its K/V row is stored again with the
     * same values), logits compared bit for bit */
    if (!rc) {
        const int V = m->info.n_vocab;
        float *l4 = gt_xmalloc((size_t)FW_SEQS * V * 4), *l1 = gt_xmalloc((size_t)V * 4);
        static tb one;
        int32_t batch_ids[FW_SEQS];
        memcpy(batch_ids, ids, sizeof batch_ids);
        rc = model_forward(&fs, ids, &b.bt, &e);
        if (!rc) rc = fs.be->ops->buf_read(fs.be, fs.b.logits, 0, (int64_t)FW_SEQS * V, l4, &e);
        int differ = 0;
        for (int j = 0; !rc && j < FW_SEQS; j++) {
            tb_begin(&one, FW_BS);
            tb_seq(&one, b.tabs + (size_t)j * TB_STRIDE, b.n_tab[j], b.pos[j], 1, 0);
            tb_end(&one);
            one.out_rows[0] = 0;
            one.bt.n_out = 1;
            rc = model_forward(&fs, batch_ids + j, &one.bt, &e);
            if (!rc) rc = fs.be->ops->buf_read(fs.be, fs.b.logits, 0, V, l1, &e);
            if (!rc) differ += memcmp(l1, l4 + (size_t)j * V, (size_t)V * 4) != 0;
        }
        if (rc) printf("FAIL batch invariance run: %s\n", e.msg);
        gt_check(!rc && !differ,
                 "model_forward: each of %d decode rows alone gives the logits it had in the "
                 "batch, bit for bit (%d differ)",
                 FW_SEQS, differ);
        printf("forward batch invariance: %d of %d rows alone differ from the batch%s\n", differ,
               FW_SEQS, !rc && !differ ? "  ok" : "  FAIL");
        free(l4);
        free(l1);
    }
    fwd_state_release(&fs);
    return rc ? -1 : 0;
}

static void forward_test(const char *models, uint64_t *seed)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/stories260K.gguf", models);
    forge_model *m = NULL;
    forge_err e = {0};
    if (forge_model_load(path, &m, &e)) {
        gt_check(0, "load %s: %s", path, e.msg);
        return;
    }
    const struct {
        forge_kv_type kv;
        const char *fused, *label;
    } v[] = {{FORGE_KV_F32, NULL, "KV f32"},
             {FORGE_KV_F16, NULL, "KV f16"},
             {FORGE_KV_F32, "0", "KV f32, unfused attention (rope + store_slots)"}};
    for (size_t i = 0; i < GT_LEN(v); i++) {
        if (v[i].fused)
            setenv("FORGE_GPU_FUSED", v[i].fused, 1);
        else
            unsetenv("FORGE_GPU_FUSED");
        int32_t ref[FW_SEQS][FW_GEN], got[FW_SEQS][FW_GEN];
        memset(got, 0xff, sizeof got);
        int ok = fw_context_ids(m, v[i].kv, ref) == 0 && fw_batch_ids(m, v[i].kv, got, seed) == 0;
        int same = ok && !memcmp(ref, got, sizeof ref);
        gt_check(same, "model_forward, %d sequences batched == each alone through a context (%s)",
                 FW_SEQS, v[i].label);
        printf("forward %d sequences x %d greedy ids (%s): %s\n", FW_SEQS, FW_GEN, v[i].label,
               same ? "same as each alone  ok" : "DIFFER  FAIL");
        for (int s = 0; ok && !same && s < FW_SEQS; s++) {
            printf("  seq %d ctx:", s);
            for (int k = 0; k < FW_GEN; k++)
                printf(" %d", ref[s][k]);
            printf("\n  seq %d bat:", s);
            for (int k = 0; k < FW_GEN; k++)
                printf(" %d", got[s][k]);
            printf("\n");
        }
    }
    unsetenv("FORGE_GPU_FUSED");
    forge_model_free(m);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: test_gpu_paged MODELS_DIR\n");
        return 2;
    }
    uint64_t seed = 0x9e3779b97f4a7c15ULL;
    gpu_stream *st = NULL;
    GT_OK(gpu_set_device(0, err));
    GT_OK(gpu_stream_create(&st, err));
    const pa_case cases[] = {
        {16, 0, 8, 2, 64},   /* GQA 4, F32 */
        {32, 1, 8, 2, 64},   /* GQA 4, F16 */
        {16, 1, 4, 4, 128},  /* MHA, F16 */
        {32, 0, 16, 1, 128}, /* GQA 16, F32 */
        {16, 0, 6, 3, 48},   /* head_dim not a multiple of 32: the generic kernel */
        {16, 1, 8, 1, 256},  /* head_dim 256, GQA 8 */
        {32, 0, 4, 2, 32},   /* head_dim 32 */
    };
    for (size_t i = 0; i < GT_LEN(cases); i++)
        paged_case(&cases[i], &seed);
    const int types[] = {GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q8_0,
                         GGML_TYPE_Q4_0};
    /* SPR 1 (tails of 1..3 rows past a block of 4-row segments: 4100, 4099), SPR 2..8; rows of
     * chunks that do not fill every lane the same number of times (11008, 3104) */
    const int64_t shapes[][2] = {{256, 512},  {11008 / 2, 1024}, {48, 4096}, {40, 2048},
                                 {4100, 1024}, {4099, 512},      {64, 11008}, {1000, 3104}};
    /* Q8_0/Q4_0 through the dp4a kernel, then through the tensor-core one (where built) */
    for (int tc = 0; tc < 2; tc++) {
        gpu_matvec_multi_tc_min(tc ? 2 : 0);
        for (size_t t = 0; t < GT_LEN(types); t++)
            for (size_t sh = 0; sh < GT_LEN(shapes); sh++)
                if (!tc || types[t] == GGML_TYPE_Q8_0 || types[t] == GGML_TYPE_Q4_0)
                    matvec_multi_case(types[t], shapes[sh][0], shapes[sh][1], tc, &seed, st);
    }
    gpu_matvec_multi_tc_min(-1);
    /* Q/K/V-like (4096 + 1024 + 1024 rows), gate/up-like pairs whose last matrix ends
     * mid-segment; refused: a pair split unlike (48 long rows share their rows among segments,
     * 4100 do not) and one whose first matrix is not a multiple of 32 rows */
    const int64_t qkv[] = {4096, 1024, 1024}, pair[] = {1024, 3001}, unlike[] = {48, 4100},
                  ragged[] = {1000, 3008};
    for (size_t t = 0; t < GT_LEN(types); t++) {
        /* rows of 16 or 32 chunks (Q4_0, Q8_0) take one segment on every device; float rows of
         * 512 values have enough chunks that 1024-row matrices may take two where 4096 take one */
        const int q = types[t] == GGML_TYPE_Q8_0 || types[t] == GGML_TYPE_Q4_0;
        matvec_mats_case(types[t], 3, qkv, 512, q, &seed, st);
        matvec_mats_case(types[t], 2, pair, 1024, 0, &seed, st);
        matvec_mats_case(types[t], 2, unlike, 4096, 0, &seed, st);
        gt_check(!gpu_matvec_multi_mats_ok(types[t], 2, ragged, 1024),
                 "matvec_multi_mats %s: a first matrix of 1000 rows (not a multiple of 32) "
                 "accepted",
                 gpu_type_name_test(types[t]));
        matvec_mats_case(types[t], 2, ragged, 1024, 0, &seed, st);
    }
    const int64_t norm_shapes[][2] = {{4096, 1}, {4096, 4}, {11008, 3}, {96, 16}, {2048, 9}};
    for (size_t i = 0; i < GT_LEN(norm_shapes); i++)
        norm_q8_case(norm_shapes[i][0], (int)norm_shapes[i][1], &seed, st);
    argmax_rows_test(&seed, st);
    forward_test(argv[1], &seed);
    gpu_stream_destroy(st);
    printf("test_gpu_paged: %d passed, %d failed\n", gt_pass, gt_fail);
    return gt_fail ? 1 : 0;
}
