/* test_gpu_comm.c - the NCCL communicator (src/gpu/gpu_comm.cu, issue 16) on the GPUs present:
 * one rank always (the single-GPU path: a copy; and the same through NCCL with the test hook
 * FORGE_GPU_COMM_NCCL1=1), two ranks and all the GPUs when there are that many:
 *   1. all_reduce_sum: integer-valued floats give exactly the host sum, random ones the double
 *      sum (NMSE <= 1e-12; with two ranks exactly a + b), the ranks' bits are equal, the guard
 *      bytes after each buffer intact; work enqueued before (a scale by 2) and after (by 0.5)
 *      on each rank's stream is ordered around the collective;
 *   2. all_gather_cols: unequal columns (rows 3, cols {5, 2, ..}), rows 1 (straight into recv),
 *      equal columns, a rank with no columns, and a larger case: every rank's recv is the host's
 *      gather bit for bit, guard bytes intact;
 *   3. bad calls: no NCCL (FORGE_NCCL_LIB naming a missing file), a GPU given twice, a GPU that
 *      does not exist, negative sizes: clear errors;
 *   4. the same through the backend: backend_gpu_count, backend_gpu_comm_create over GPU backends
 *      (name "NCCL"; two backends on one GPU refused), collectives on be_ops.buf_data pointers
 *      in the order of the backends' own ops (scale) and read back with buf_read; a matmul after
 *      a collective that rewrote its input does not reuse the input's old quantization.
 *   test_gpu_comm [--quick]   (--quick: smaller sizes, for compute-sanitizer)
 * Needs a GPU and NCCL (libnccl.so.2 on the library path, or FORGE_NCCL_LIB): run by
 * scripts/gpu-comm-run.sh and scripts/gpu-suite.sh. */
#include <pthread.h>

#include "backend/backend.h"
#include "backend/backend_gpu.h"
#include "backend/comm.h"
#include "gpu_test_util.h"

static int g_quick;

typedef struct group {
    int n;
    int devs[GPU_COMM_MAX_RANK];
    gpu_stream *s[GPU_COMM_MAX_RANK];
    gpu_comm *c;
    char label[64];
} group;

static void group_open(group *g, int n, int nccl1)
{
    memset(g, 0, sizeof *g);
    g->n = n;
    snprintf(g->label, sizeof g->label, "%d rank%s%s", n, n == 1 ? "" : "s",
             nccl1 ? " via NCCL" : "");
    for (int r = 0; r < n; r++) {
        g->devs[r] = r;
        GT_OK(gpu_set_device(r, err));
        GT_OK(gpu_stream_create(&g->s[r], err));
    }
    if (nccl1)
        setenv("FORGE_GPU_COMM_NCCL1", "1", 1);
    else
        unsetenv("FORGE_GPU_COMM_NCCL1");
    GT_OK(gpu_set_device(0, err));
    GT_OK(gpu_comm_create(n, g->devs, &g->c, err));
    unsetenv("FORGE_GPU_COMM_NCCL1");
}

static void group_close(group *g)
{
    for (int r = 0; r < g->n; r++) {
        GT_OK(gpu_set_device(r, err));
        GT_OK(gpu_stream_sync(g->s[r], err));
    }
    gpu_comm_free(g->c);
    for (int r = 0; r < g->n; r++) {
        GT_OK(gpu_set_device(r, err));
        gpu_stream_destroy(g->s[r]);
    }
    GT_OK(gpu_set_device(0, err));
}

/* ---- all_reduce_sum ------------------------------------------------------------------------ */
static void check_all_reduce(group *g, int64_t n, int exact)
{
    const size_t bytes = (size_t)n * sizeof(float);
    float *x[GPU_COMM_MAX_RANK], *d[GPU_COMM_MAX_RANK], *got[GPU_COMM_MAX_RANK];
    float *sum_f = (float *)gt_xmalloc(bytes);
    double *sum_d = (double *)gt_xmalloc((size_t)n * sizeof(double));
    uint64_t seed = 0x5eed0000u + (uint64_t)n * 31 + (uint64_t)g->n;
    for (int64_t i = 0; i < n; i++) {
        sum_f[i] = 0;
        sum_d[i] = 0;
    }
    for (int r = 0; r < g->n; r++) {
        x[r] = (float *)gt_xmalloc(bytes);
        got[r] = (float *)gt_xmalloc(bytes);
        for (int64_t i = 0; i < n; i++) {
            x[r][i] = exact ? (float)((i * 7 + r * 13) % 31 - 15) : gt_uniform(&seed);
            sum_f[i] += x[r][i]; /* rank order */
            sum_d[i] += x[r][i];
        }
        GT_OK(gpu_set_device(r, err));
        d[r] = (float *)gt_out_alloc(bytes);
        gt_out_prepare(d[r], bytes, g->s[r]);
        GT_OK(gpu_memcpy_h2d(d[r], x[r], bytes, g->s[r], err));
        /* enqueued before the collective on the same stream: the sum must see it */
        GT_OK(gpu_scale(d[r], 2.0f, n, g->s[r], err));
    }
    GT_OK(gpu_set_device(0, err));
    GT_OK(gpu_comm_all_reduce_sum(g->c, d, n, g->s, err));
    int guards = 1;
    for (int r = 0; r < g->n; r++) {
        GT_OK(gpu_set_device(r, err));
        /* enqueued after: must run on the sum (x2 then /2: exact) */
        GT_OK(gpu_scale(d[r], 0.5f, n, g->s[r], err));
        guards &= gt_out_fetch(d[r], bytes, got[r], g->s[r]);
    }
    int same_bits = 1;
    for (int r = 1; r < g->n; r++)
        same_bits &= memcmp(got[r], got[0], bytes) == 0;
    char what[128];
    snprintf(what, sizeof what, "%s, %lld floats, %s", g->label, (long long)n,
             exact ? "integers" : "random");
    gt_check(same_bits, "all_reduce %s: the ranks' bits differ", what);
    if (exact || g->n <= 2) { /* integers: any order; two ranks: a + b == b + a */
        int64_t bad = -1;
        for (int64_t i = 0; i < n && bad < 0; i++)
            if (memcmp(&got[0][i], &sum_f[i], sizeof(float)) != 0) bad = i;
        gt_check(bad < 0, "all_reduce %s: [%lld] = %.9g, host sum %.9g", what, (long long)bad,
                 bad >= 0 ? got[0][bad] : 0.0, bad >= 0 ? sum_f[bad] : 0.0);
    }
    gt_report("allreduce", what, gt_nmse(got[0], sum_d, n), 1e-12, guards);
    for (int r = 0; r < g->n; r++) {
        GT_OK(gpu_set_device(r, err));
        gpu_free(d[r]);
        free(x[r]);
        free(got[r]);
    }
    GT_OK(gpu_set_device(0, err));
    free(sum_f);
    free(sum_d);
}

/* ---- all_gather_cols ----------------------------------------------------------------------- */
static void check_gather(group *g, int64_t rows, const int64_t *cols)
{
    int64_t total = 0, off[GPU_COMM_MAX_RANK];
    for (int r = 0; r < g->n; r++) {
        off[r] = total;
        total += cols[r];
    }
    const size_t rbytes = (size_t)(rows * total) * sizeof(float);
    float *want = (float *)gt_xmalloc(rbytes), *got = (float *)gt_xmalloc(rbytes);
    float *d_send[GPU_COMM_MAX_RANK], *d_recv[GPU_COMM_MAX_RANK];
    for (int r = 0; r < g->n; r++) {
        const size_t sbytes = (size_t)(rows * cols[r]) * sizeof(float);
        float *h = (float *)gt_xmalloc(sbytes);
        for (int64_t i = 0; i < rows; i++)
            for (int64_t j = 0; j < cols[r]; j++) {
                h[i * cols[r] + j] = (float)(r * 100000 + i * 1000 + j) + 0.25f;
                want[i * total + off[r] + j] = h[i * cols[r] + j];
            }
        GT_OK(gpu_set_device(r, err));
        d_send[r] = (float *)gt_upload(h, sbytes, g->s[r]);
        d_recv[r] = (float *)gt_out_alloc(rbytes);
        gt_out_prepare(d_recv[r], rbytes, g->s[r]);
        GT_OK(gpu_stream_sync(g->s[r], err)); /* h: pageable memory, freed next */
        free(h);
    }
    GT_OK(gpu_set_device(0, err));
    GT_OK(gpu_comm_all_gather_cols(g->c, (const float *const *)d_send, d_recv, rows, cols, g->s,
                                   err));
    const int fail0 = gt_fail;
    char what[160];
    int len = snprintf(what, sizeof what, "%s, rows %lld, cols {", g->label, (long long)rows);
    for (int r = 0; r < g->n && len < (int)sizeof what - 16; r++)
        len += snprintf(what + len, sizeof what - (size_t)len, "%s%lld", r ? "," : "",
                        (long long)cols[r]);
    snprintf(what + len, sizeof what - (size_t)len, "}");
    for (int r = 0; r < g->n; r++) {
        GT_OK(gpu_set_device(r, err));
        int guard = gt_out_fetch(d_recv[r], rbytes, got, g->s[r]);
        int64_t bad = -1;
        for (int64_t i = 0; i < rows * total && bad < 0; i++)
            if (memcmp(&got[i], &want[i], sizeof(float)) != 0) bad = i;
        gt_check(bad < 0 && guard, "gather %s: rank %d: %s%s", what, r,
                 bad >= 0 ? "element differs at " : "", guard ? "" : "guard bytes overwritten");
        if (bad >= 0)
            printf("    rank %d [%lld] = %.9g, want %.9g\n", r, (long long)bad, got[bad],
                   want[bad]);
        gpu_free(d_send[r]);
        gpu_free(d_recv[r]);
    }
    printf("gather    %-62s %s\n", what, gt_fail > fail0 ? "FAIL (above)" : "ok");
    GT_OK(gpu_set_device(0, err));
    free(want);
    free(got);
}

static void run_group(int n, int nccl1)
{
    group g;
    group_open(&g, n, nccl1);
    const int64_t big = g_quick ? 4099 : (1 << 22) + 3;
    check_all_reduce(&g, 1000, 1);
    check_all_reduce(&g, big, 1);
    check_all_reduce(&g, big, 0);
    check_all_reduce(&g, 1, 0);
    int64_t cols[GPU_COMM_MAX_RANK];
    for (int r = 0; r < n; r++) /* unequal: 5, 2, 4, 5, .. */
        cols[r] = r == 0 ? 5 : r == 1 ? 2 : 2 + r;
    check_gather(&g, 3, cols);
    check_gather(&g, 1, cols);
    for (int r = 0; r < n; r++)
        cols[r] = 4;
    check_gather(&g, 7, cols);
    if (n > 1) { /* a rank without columns */
        cols[0] = 0;
        check_gather(&g, 2, cols);
        cols[0] = 3;
        check_gather(&g, 1, cols);
    }
    for (int r = 0; r < n; r++) /* a vocabulary split with a remainder */
        cols[r] = (g_quick ? 1000 : 32000) / n + (r < (g_quick ? 1000 : 32000) % n);
    check_gather(&g, g_quick ? 4 : 33, cols);
    group_close(&g);
}

/* ---- bad calls ----------------------------------------------------------------------------- */
/* Runs first, before NCCL is loaded (a loaded library is kept for the process). */
static void check_no_nccl(void)
{
    const char *old = getenv("FORGE_NCCL_LIB");
    char *saved = old ? strdup(old) : NULL;
    const char *missing = "/nonexistent/forge-test/libnccl.so.2";
    setenv("FORGE_NCCL_LIB", missing, 1);
    const int dev0[1] = {0};
    gpu_comm *c = NULL;
    forge_err e = {0};
    int rc = gpu_comm_create(1, dev0, &c, &e);
    printf("no NCCL: %s: %s\n", forge_status_name(rc), e.msg);
    gt_check(rc == FORGE_E_UNSUPPORTED && !c && strstr(e.msg, "cannot load") &&
                 strstr(e.msg, missing) && strstr(e.msg, "FORGE_NCCL_LIB"),
             "a missing NCCL: %s (%s)", forge_status_name(rc), e.msg);
    if (saved) {
        setenv("FORGE_NCCL_LIB", saved, 1);
        free(saved);
    } else {
        unsetenv("FORGE_NCCL_LIB");
    }
}

static void check_bad_calls(int n_gpu)
{
    gpu_comm *c = NULL;
    forge_err e = {0};
    const int twice[2] = {0, 0}, none[1] = {n_gpu};
    int rc = gpu_comm_create(2, twice, &c, &e);
    printf("GPU 0 twice: %s: %s\n", forge_status_name(rc), e.msg);
    gt_check(rc == FORGE_E_INVALID && !c && strstr(e.msg, "GPU 0 is given twice"),
             "GPU 0 twice: %s (%s)", forge_status_name(rc), e.msg);
    memset(&e, 0, sizeof e);
    rc = gpu_comm_create(1, none, &c, &e);
    printf("GPU %d: %s: %s\n", n_gpu, forge_status_name(rc), e.msg);
    gt_check(rc == FORGE_E_RANGE && !c && strstr(e.msg, "does not exist"),
             "a GPU that does not exist: %s (%s)", forge_status_name(rc), e.msg);

    group g;
    group_open(&g, 1, 0);
    float *d = NULL;
    GT_OK(gpu_malloc((void **)&d, 64, err));
    memset(&e, 0, sizeof e);
    rc = gpu_comm_all_reduce_sum(g.c, &d, -1, g.s, &e);
    gt_check(rc == FORGE_E_INVALID, "all_reduce of -1 floats: %s", forge_status_name(rc));
    const int64_t neg[1] = {-2};
    const float *dc = d;
    rc = gpu_comm_all_gather_cols(g.c, &dc, &d, 1, neg, g.s, &e);
    gt_check(rc == FORGE_E_INVALID && strstr(e.msg, "-2 columns"), "gather of -2 columns: %s (%s)",
             forge_status_name(rc), e.msg);
    gpu_free(d);
    group_close(&g);
}

/* ---- through the backend ------------------------------------------------------------------- */
static void check_backend(int n)
{
    backend *be[COMM_MAX_RANK] = {NULL}, *dup = NULL;
    be_buf *b[COMM_MAX_RANK] = {NULL}, *bs[COMM_MAX_RANK] = {NULL}, *br[COMM_MAX_RANK] = {NULL};
    be_comm *comm = NULL;
    forge_err e = {0};
    int count = -1;
    GT_OK(backend_gpu_count(&count, err));
    int n_gpu = 0;
    GT_OK(gpu_device_count(&n_gpu, err));
    gt_check(count == n_gpu, "backend_gpu_count %d, devices %d", count, n_gpu);
    for (int r = 0; r < n; r++)
        GT_OK(backend_gpu_create(r, &be[r], err));

    /* two ranks on GPU 0 */
    GT_OK(backend_gpu_create(0, &dup, err));
    backend *pair[2] = {be[0], dup};
    int rc = backend_gpu_comm_create(pair, 2, &comm, &e);
    printf("backend: two ranks on GPU 0: %s: %s\n", forge_status_name(rc), e.msg);
    gt_check(rc == FORGE_E_INVALID && !comm && strstr(e.msg, "both on GPU 0"),
             "two ranks on GPU 0: %s (%s)", forge_status_name(rc), e.msg);
    dup->ops->destroy(dup);

    GT_OK(backend_gpu_comm_create(be, n, &comm, err));
    gt_check(comm->n_rank == n && !strcmp(comm->ops->name, "NCCL"), "backend comm: %d ranks, %s",
             comm->n_rank, comm->ops->name);

    /* all-reduce: x2 by the backend, the sum, x0.5 by the backend, read back */
    int fail0 = gt_fail;
    const int64_t len = 3000;
    float *h = (float *)gt_xmalloc((size_t)len * sizeof(float));
    float *want = (float *)gt_xmalloc((size_t)len * sizeof(float));
    float *ptr[COMM_MAX_RANK];
    for (int64_t i = 0; i < len; i++)
        want[i] = 0;
    for (int r = 0; r < n; r++) {
        backend *x = be[r];
        GT_OK(x->ops->activate(x, err));
        GT_OK(x->ops->buf_create(x, len, &b[r], err));
        ptr[r] = x->ops->buf_data(x, b[r]);
        for (int64_t i = 0; i < len; i++) {
            h[i] = (float)((i * 5 + r * 11) % 23 - 11);
            want[i] += h[i];
        }
        GT_OK(gpu_memcpy_h2d(ptr[r], h, (size_t)len * sizeof(float), NULL, err));
        GT_OK(gpu_device_sync(err)); /* the upload went on the legacy stream */
        GT_OK(x->ops->scale(x, b[r], 2.0f, len, err));
    }
    GT_OK(comm->ops->all_reduce_sum(comm, ptr, len, err));
    for (int r = 0; r < n; r++) {
        backend *x = be[r];
        GT_OK(x->ops->activate(x, err));
        GT_OK(x->ops->scale(x, b[r], 0.5f, len, err));
        GT_OK(x->ops->buf_read(x, b[r], 0, len, h, err));
        gt_check(!memcmp(h, want, (size_t)len * sizeof(float)),
                 "backend all_reduce, rank %d: differs from the host sum", r);
    }
    printf("backend   all_reduce over %d GPU backend%s: %s\n", n, n == 1 ? "" : "s",
           gt_fail > fail0 ? "FAIL (above)" : "ok");
    fail0 = gt_fail;

    /* gather: rows 3, unequal columns */
    int64_t cols[COMM_MAX_RANK], total = 0;
    const int64_t rows = 3;
    for (int r = 0; r < n; r++) {
        cols[r] = r == 0 ? 5 : r == 1 ? 2 : 1 + r;
        total += cols[r];
    }
    float *gw = (float *)gt_xmalloc((size_t)(rows * total) * sizeof(float));
    float *gg = (float *)gt_xmalloc((size_t)(rows * total) * sizeof(float));
    float *sp[COMM_MAX_RANK], *rp[COMM_MAX_RANK];
    for (int r = 0, o = 0; r < n; o += (int)cols[r], r++) {
        backend *x = be[r];
        GT_OK(x->ops->activate(x, err));
        GT_OK(x->ops->buf_create(x, rows * cols[r], &bs[r], err));
        GT_OK(x->ops->buf_create(x, rows * total, &br[r], err));
        sp[r] = x->ops->buf_data(x, bs[r]);
        rp[r] = x->ops->buf_data(x, br[r]);
        for (int64_t i = 0; i < rows; i++)
            for (int64_t j = 0; j < cols[r]; j++) {
                h[i * cols[r] + j] = (float)(r * 1000 + i * 10 + j) - 0.5f;
                gw[i * total + o + j] = h[i * cols[r] + j];
            }
        GT_OK(gpu_memcpy_h2d(sp[r], h, (size_t)(rows * cols[r]) * sizeof(float), NULL, err));
        GT_OK(gpu_device_sync(err));
    }
    GT_OK(comm->ops->all_gather_cols(comm, (const float *const *)sp, rp, rows, cols, err));
    for (int r = 0; r < n; r++) {
        backend *x = be[r];
        GT_OK(x->ops->activate(x, err));
        GT_OK(x->ops->buf_read(x, br[r], 0, rows * total, gg, err));
        gt_check(!memcmp(gg, gw, (size_t)(rows * total) * sizeof(float)),
                 "backend gather, rank %d: differs from the host gather", r);
    }
    printf("backend   all_gather_cols over %d GPU backend%s: %s\n", n, n == 1 ? "" : "s",
           gt_fail > fail0 ? "FAIL (above)" : "ok");

    comm->ops->destroy(comm); /* before the backends: it borrows their streams */
    for (int r = 0; r < n; r++) {
        be[r]->ops->buf_free(be[r], b[r]);
        be[r]->ops->buf_free(be[r], bs[r]);
        be[r]->ops->buf_free(be[r], br[r]);
        be[r]->ops->destroy(be[r]);
    }
    free(h);
    free(want);
    free(gw);
    free(gg);
}

/* A collective writes behind the backend's buffer versions: a matmul after it must not reuse
 * the activation it quantized before (the backend would multiply stale data). One rank, through
 * the gather's copy: x is quantized for W x (Q8_0), overwritten by a gather of s, and W x must
 * then equal W s bit for bit. */
static void check_backend_stale_quant(void)
{
    enum { N_IN = 256, N_OUT = 64 };
    uint64_t seed = 77;
    float *wdq = NULL;
    void *raw = gt_make_weights(GGML_TYPE_Q8_0, N_OUT, N_IN, &seed, &wdq);
    be_wshare share;
    memset(&share, 0, sizeof share);
    pthread_mutex_init(&share.lock, NULL);
    be_weight w;
    memset(&w, 0, sizeof w);
    w.name = "w";
    w.type = GGML_TYPE_Q8_0;
    w.ne0 = N_IN;
    w.ne1 = N_OUT;
    w.n_bytes = ggml_row_size(GGML_TYPE_Q8_0, N_IN) * N_OUT;
    w.data = raw;
    w.slot = 0;
    backend *be = NULL;
    GT_OK(backend_gpu_create(0, &be, err));
    be_gpu_plan pl;
    memset(&pl, 0, sizeof pl);
    backend_gpu_plan_add_weight(be, &pl, &w);
    pl.n_layer = 1;
    pl.n_ctx = 16;
    pl.kv_dim = 64;
    pl.kv_type = FORGE_KV_F32;
    pl.n_head = 1;
    pl.head_dim = 64;
    pl.n_batch = 1;
    pl.act_floats = 2 * N_IN + 3 * N_OUT;
    pl.share = &share;
    GT_OK(backend_gpu_plan(be, &pl, err));
    be_weight *list[1] = {&w};
    GT_OK(be->ops->weights_acquire(be, &share, list, 1, NULL, NULL, err));

    be_buf *x = NULL, *sb = NULL, *y1 = NULL, *y2 = NULL, *ys = NULL;
    GT_OK(be->ops->buf_create(be, N_IN, &x, err));
    GT_OK(be->ops->buf_create(be, N_IN, &sb, err));
    GT_OK(be->ops->buf_create(be, N_OUT, &y1, err));
    GT_OK(be->ops->buf_create(be, N_OUT, &y2, err));
    GT_OK(be->ops->buf_create(be, N_OUT, &ys, err));
    float hx[N_IN], hs[N_IN], r1[N_OUT], r2[N_OUT], rs[N_OUT];
    gt_fill(hx, N_IN, 1.0f, &seed);
    gt_fill(hs, N_IN, 3.0f, &seed);
    GT_OK(gpu_memcpy_h2d(be->ops->buf_data(be, x), hx, sizeof hx, NULL, err));
    GT_OK(gpu_memcpy_h2d(be->ops->buf_data(be, sb), hs, sizeof hs, NULL, err));
    GT_OK(gpu_device_sync(err));

    be_comm *comm = NULL;
    GT_OK(backend_gpu_comm_create(&be, 1, &comm, err));
    GT_OK(be->ops->matmul(be, y1, &w, x, 1, err)); /* quantizes x */
    float *send[1] = {be->ops->buf_data(be, sb)}, *recv[1] = {be->ops->buf_data(be, x)};
    const int64_t cols[1] = {N_IN};
    GT_OK(comm->ops->all_gather_cols(comm, (const float *const *)send, recv, 1, cols, err));
    GT_OK(be->ops->matmul(be, y2, &w, x, 1, err)); /* x now holds s */
    GT_OK(be->ops->matmul(be, ys, &w, sb, 1, err));
    GT_OK(be->ops->buf_read(be, y1, 0, N_OUT, r1, err));
    GT_OK(be->ops->buf_read(be, y2, 0, N_OUT, r2, err));
    GT_OK(be->ops->buf_read(be, ys, 0, N_OUT, rs, err));
    gt_check(memcmp(r1, rs, sizeof r1) != 0, "stale quantization: W x and W s are equal");
    gt_check(!memcmp(r2, rs, sizeof r2),
             "stale quantization: after a gather into x, W x %s W s (y[0] %.6g, W s %.6g, before "
             "%.6g)",
             memcmp(r2, r1, sizeof r2) ? "differs from" : "is the old W x, not", r2[0], rs[0],
             r1[0]);
    printf("backend   a matmul after a collective quantizes the new data: %s\n",
           !memcmp(r2, rs, sizeof r2) ? "ok" : "FAIL");

    comm->ops->destroy(comm);
    be->ops->buf_free(be, x);
    be->ops->buf_free(be, sb);
    be->ops->buf_free(be, y1);
    be->ops->buf_free(be, y2);
    be->ops->buf_free(be, ys);
    be->ops->weights_release(be);
    be->ops->destroy(be);
    pthread_mutex_destroy(&share.lock);
    free(raw);
    free(wdq);
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick")) {
            g_quick = 1;
        } else {
            fprintf(stderr, "usage: %s [--quick]\n", argv[0]);
            return 2;
        }
    }
    int n_gpu = 0;
    GT_OK(gpu_device_count(&n_gpu, err));
    if (n_gpu < 1) {
        fprintf(stderr, "FATAL: no GPU\n");
        return 2;
    }
    const int n_all = n_gpu;
    if (n_gpu > GPU_COMM_MAX_RANK) n_gpu = GPU_COMM_MAX_RANK;
    const char *nvls = getenv("NCCL_NVLS_ENABLE");
    char *nvls_before = nvls ? strdup(nvls) : NULL;
    printf("%d GPU%s; NCCL_NVLS_ENABLE=%s before the first communicator\n", n_gpu,
           n_gpu == 1 ? "" : "s", nvls ? nvls : "(unset)");
    check_no_nccl();
    check_bad_calls(n_all);
    /* set to 0 by the first communicator, unless the environment chose already */
    nvls = getenv("NCCL_NVLS_ENABLE");
    gt_check(nvls && !strcmp(nvls, nvls_before ? nvls_before : "0"),
             "NCCL_NVLS_ENABLE after a communicator: %s", nvls ? nvls : "(unset)");
    free(nvls_before);
    run_group(1, 0); /* the single-GPU path: copies */
    run_group(1, 1); /* one rank through NCCL */
    if (n_gpu >= 2) run_group(2, 0);
    if (n_gpu > 2) run_group(n_gpu, 0);
    check_backend(1);
    if (n_gpu >= 2) check_backend(n_gpu);
    check_backend_stale_quant();
    printf("%d passed, %d failed\n", gt_pass, gt_fail);
    return gt_fail ? 1 : 0;
}
