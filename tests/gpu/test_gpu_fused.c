/* test_gpu_fused.c - the fused decode matvec (gpu_fused_matvec) against
 *   (a) the same computation made of the separate GPU ops (gpu_rmsnorm, gpu_act_quantize,
 *       gpu_matvec, gpu_add, gpu_swiglu, gpu_add_rows): equal up to float summation order;
 *   (b) a double-precision host reference of the same numerics (Q8_0 activations for Q types).
 * Every weight type, RMSNorm and plain inputs, store (with and without biases), residual add and
 * SwiGLU outputs, one to three matrices, 7B/1B shapes and odd ones; outputs NaN-poisoned with
 * guard bytes. Then a chained "layer" (QKV -> O add -> gate/up SwiGLU -> down add, each reading
 * the previous one's output) recorded in a CUDA graph and replayed 50 times with new inputs,
 * which checks the programmatic-dependent-launch ordering under replay.
 *   test_gpu_fused [--quick]
 * Exit status 0 only when every check passed. Needs a GPU. */
#include "core/fp16.h"
#include "cpu/kernels.h"
#include "gpu_test_util.h"

#define THR_SAME_Q 1e-6 /* vs separate ops, Q types: a rare activation rounding flip */
#define THR_SAME_F 1e-9 /* vs separate ops, float types: summation order only */
#define THR_QREF 1e-6   /* vs the host reference with Q8_0 activations */
#define THR_EXACT 5e-4

static int g_quick;
static int g_n_invariant; /* cases checked in the batch-invariant mode */
static gpu_stream *S;
static uint64_t g_seed = 0x243F6A8885A308D3ULL;

static int is_quant(int t)
{
    return ggml_type_block_size(t) > 1;
}

static void *make_weights(int t, int64_t rows, int64_t n_in, float **wf_out)
{
    return gt_make_weights(t, rows, n_in, &g_seed, wf_out);
}

static void *upload_weights(int t, const void *raw, int64_t rows, int64_t n_in)
{
    return gt_upload_weights(t, raw, rows, n_in, S);
}

typedef struct fcase {
    const char *name;
    int n_mat;
    int64_t n_out[3];
    int64_t n_in;
    int in_mode, out_mode, bias;
    int round; /* round_x: F16/BF16 activations rounded to the weight type */
} fcase;

static double silu(double g)
{
    return g / (1.0 + exp(-g));
}

static void run_case(int t, const fcase *c)
{
    char what[128];
    const int64_t n_in = c->n_in;
    const int nm = c->n_mat;
    int64_t tot = 0;
    void *raw[3] = {0}, *d_w[3] = {0};
    float *wf[3] = {0}, *bias[3] = {0}, *d_bias[3] = {0}, *d_y[3] = {0}, *d_y2[3] = {0};
    float *y0[3] = {0}, *y[3] = {0}, *y2[3] = {0};
    double *ref[3] = {0}, *ref_q[3] = {0};
    if (!gpu_fused_matvec_supported(t, n_in)) return;
    float *x = (float *)gt_xmalloc((size_t)n_in * 4), *nw = (float *)gt_xmalloc((size_t)n_in * 4);
    float *h = (float *)gt_xmalloc((size_t)n_in * 4), *hq = (float *)gt_xmalloc((size_t)n_in * 4);
    gt_fill(x, n_in, 2.0f, &g_seed);
    for (int64_t i = 0; i < n_in; i++)
        nw[i] = 0.5f + 0.5f * gt_uniform(&g_seed);
    /* h as the kernel makes it (float ops), then Q8_0 activations for Q types */
    double ss = 0;
    for (int64_t i = 0; i < n_in; i++)
        ss += (double)x[i] * x[i];
    float scale = 1.0f / sqrtf((float)(ss / (double)n_in) + 1e-5f);
    for (int64_t i = 0; i < n_in; i++)
        h[i] = c->in_mode == GPU_FMV_IN_RMSNORM ? x[i] * scale * nw[i] : x[i];
    const int rnd = c->round && (t == GGML_TYPE_F16 || t == GGML_TYPE_BF16);
    if (is_quant(t))
        gt_ref_act_q8(h, n_in, hq);
    else
        memcpy(hq, h, (size_t)n_in * 4);
    for (int64_t i = 0; rnd && i < n_in; i++)
        hq[i] = t == GGML_TYPE_F16 ? forge_fp16_to_f32(forge_f32_to_fp16(h[i]))
                                   : forge_bf16_to_f32(forge_f32_to_bf16(h[i]));

    for (int m = 0; m < nm; m++) {
        const int64_t no = c->n_out[m];
        tot += no;
        raw[m] = make_weights(t, no, n_in, &wf[m]);
        d_w[m] = upload_weights(t, raw[m], no, n_in);
        y0[m] = (float *)gt_xmalloc((size_t)no * 4);
        y[m] = (float *)gt_xmalloc((size_t)no * 4);
        y2[m] = (float *)gt_xmalloc((size_t)no * 4);
        ref[m] = (double *)gt_xmalloc((size_t)no * 8);
        ref_q[m] = (double *)gt_xmalloc((size_t)no * 8);
        gt_fill(y0[m], no, 1.0f, &g_seed); /* the residual for GPU_FMV_OUT_ADD */
        if (c->bias) {
            bias[m] = (float *)gt_xmalloc((size_t)no * 4);
            gt_fill(bias[m], no, 1.0f, &g_seed);
            d_bias[m] = (float *)gt_upload(bias[m], (size_t)no * 4, S);
        }
        for (int64_t o = 0; o < no; o++) {
            double s = 0, sq = 0;
            for (int64_t i = 0; i < n_in; i++) {
                s += (double)wf[m][o * n_in + i] * h[i];
                sq += (double)wf[m][o * n_in + i] * hq[i];
            }
            ref[m][o] = s;
            ref_q[m][o] = sq;
        }
        d_y[m] = (float *)gt_out_alloc((size_t)no * 4);
        d_y2[m] = (float *)gt_out_alloc((size_t)no * 4);
    }
    /* the expected outputs per mode */
    for (int m = 0; m < nm; m++)
        for (int64_t o = 0; o < c->n_out[m]; o++) {
            if (c->out_mode == GPU_FMV_OUT_ADD) {
                ref[m][o] += y0[m][o];
                ref_q[m][o] += y0[m][o];
            } else if (c->bias) {
                ref[m][o] += bias[m][o];
                ref_q[m][o] += bias[m][o];
            }
        }
    if (c->out_mode == GPU_FMV_OUT_SWIGLU)
        for (int64_t o = 0; o < c->n_out[0]; o++) {
            ref[0][o] = silu(ref[0][o]) * ref[1][o];
            ref_q[0][o] = silu(ref_q[0][o]) * ref_q[1][o];
        }

    float *d_x = (float *)gt_upload(x, (size_t)n_in * 4, S);
    float *d_nw = (float *)gt_upload(nw, (size_t)n_in * 4, S);
    const int n_chk = c->out_mode == GPU_FMV_OUT_SWIGLU ? 1 : nm;
    /* fused */
    gpu_fmv_args a;
    memset(&a, 0, sizeof a);
    a.wtype = t;
    a.n_mat = nm;
    a.n_in = n_in;
    a.d_x = d_x;
    a.in_mode = c->in_mode;
    a.d_norm = d_nw;
    a.eps = 1e-5f;
    a.out_mode = c->out_mode;
    a.round_x = c->round;
    for (int m = 0; m < nm; m++) {
        a.mat[m].d_w = d_w[m];
        a.mat[m].n_out = c->n_out[m];
        a.mat[m].d_bias = d_bias[m];
        a.mat[m].d_y = d_y[m];
        if (c->out_mode == GPU_FMV_OUT_ADD) {
            GT_OK(gpu_memcpy_h2d(d_y[m], y0[m], (size_t)c->n_out[m] * 4, S, err));
            GT_OK(gpu_memset((char *)d_y[m] + c->n_out[m] * 4, GT_GUARD_BYTE, GT_GUARD_BYTES, S,
                             err));
        } else {
            gt_out_prepare(d_y[m], (size_t)c->n_out[m] * 4, S);
        }
    }
    GT_OK(gpu_fused_matvec(&a, S, err));
    int guard = 1;
    for (int m = 0; m < n_chk; m++)
        guard &= gt_out_fetch(d_y[m], (size_t)c->n_out[m] * 4, y[m], S);

    /* the same from separate ops */
    float *d_h = (float *)gt_out_alloc((size_t)n_in * 4);
    void *d_xq = NULL;
    if (c->in_mode == GPU_FMV_IN_RMSNORM)
        GT_OK(gpu_rmsnorm(d_x, d_nw, d_h, n_in, 1, 1e-5f, S, err));
    else
        GT_OK(gpu_copy(d_h, d_x, (size_t)n_in * 4, S, err));
    if (is_quant(t)) {
        GT_OK(gpu_malloc(&d_xq, gpu_act_q8_bytes(n_in), err));
        GT_OK(gpu_act_quantize(d_h, n_in, d_xq, S, err));
    }
    if (rnd) GT_OK(gpu_round_act(d_h, d_h, n_in, t, S, err));
    for (int m = 0; m < nm; m++) {
        GT_OK(gpu_matvec(t, d_w[m], c->n_out[m], n_in, d_h, d_xq, d_y2[m], S, err));
        if (c->bias) GT_OK(gpu_add_rows(d_y2[m], d_bias[m], 1, c->n_out[m], S, err));
    }
    if (c->out_mode == GPU_FMV_OUT_SWIGLU)
        GT_OK(gpu_swiglu(d_y2[0], d_y2[1], d_y2[0], c->n_out[0], S, err));
    for (int m = 0; m < n_chk; m++) {
        GT_OK(gpu_memcpy_d2h(y2[m], d_y2[m], (size_t)c->n_out[m] * 4, S, err));
        GT_OK(gpu_stream_sync(S, err));
        if (c->out_mode == GPU_FMV_OUT_ADD)
            for (int64_t o = 0; o < c->n_out[m]; o++)
                y2[m][o] += y0[m][o];
    }

    /* the batch-invariant mode: exactly the separate ops' bits */
    a.invariant = 1;
    if (gpu_fused_matvec_invariant(&a)) {
        for (int m = 0; m < nm; m++) {
            if (c->out_mode == GPU_FMV_OUT_ADD) {
                GT_OK(gpu_memcpy_h2d(d_y[m], y0[m], (size_t)c->n_out[m] * 4, S, err));
                GT_OK(gpu_memset((char *)d_y[m] + c->n_out[m] * 4, GT_GUARD_BYTE,
                                 GT_GUARD_BYTES, S, err));
            } else {
                gt_out_prepare(d_y[m], (size_t)c->n_out[m] * 4, S);
            }
        }
        GT_OK(gpu_fused_matvec(&a, S, err));
        int g2 = 1;
        int64_t differ = 0;
        for (int m = 0; m < n_chk; m++) {
            float *yi = (float *)gt_xmalloc((size_t)c->n_out[m] * 4);
            g2 &= gt_out_fetch(d_y[m], (size_t)c->n_out[m] * 4, yi, S);
            for (int64_t o = 0; o < c->n_out[m]; o++)
                differ += memcmp(&yi[o], &y2[m][o], 4) != 0;
            free(yi);
        }
        gt_check(g2 && differ == 0, "fused %s %s invariant mode == separate ops bit for bit "
                 "(%lld outputs differ%s)", ggml_type_name(t), c->name, (long long)differ,
                 g2 ? "" : ", guard bytes overwritten");
        g_n_invariant++;
    }
    a.invariant = 0;

    for (int m = 0; m < n_chk; m++) {
        const int64_t no = c->n_out[m];
        double *same = (double *)gt_xmalloc((size_t)no * 8);
        for (int64_t o = 0; o < no; o++)
            same[o] = y2[m][o];
        snprintf(what, sizeof what, "%s %s m%d %lldx%lld vs separate ops", ggml_type_name(t),
                 c->name, m, (long long)no, (long long)n_in);
        gt_report("fused", what, gt_nmse(y[m], same, no), is_quant(t) ? THR_SAME_Q : THR_SAME_F,
                  guard);
        snprintf(what, sizeof what, "%s %s m%d vs host ref (act. as kernel%s)", ggml_type_name(t),
                 c->name, m, rnd ? ", rounded" : "");
        gt_report("fused", what, gt_nmse(y[m], ref_q[m], no), THR_QREF, guard);
        if (!is_quant(t) || no >= 32) {
            snprintf(what, sizeof what, "%s %s m%d vs exact", ggml_type_name(t), c->name, m);
            gt_report("fused", what, gt_nmse(y[m], ref[m], no), THR_EXACT, guard);
        }
        free(same);
    }
    gpu_free(d_x);
    gpu_free(d_nw);
    gpu_free(d_h);
    gpu_free(d_xq);
    for (int m = 0; m < nm; m++) {
        gpu_free(d_w[m]);
        gpu_free(d_y[m]);
        gpu_free(d_y2[m]);
        gpu_free(d_bias[m]);
        free(raw[m]);
        free(wf[m]);
        free(bias[m]);
        free(y0[m]);
        free(y[m]);
        free(y2[m]);
        free(ref[m]);
        free(ref_q[m]);
    }
    free(x);
    free(nw);
    free(h);
    free(hq);
}

/* ---- a chained layer in a graph ------------------------------------------------------------ */
typedef struct layer {
    int t;
    int64_t E, F, QKV;
    void *wqkv[3], *wo, *wg, *wu, *wd;
    float *n1, *n2;
    float *x, *q, *k, *v, *att, *g, *u;
} layer;

/* The chain: q,k,v = W n1(x); x += Wo q; g = silu(Wg n2(x)) * (Wu n2(x)); x += Wd g.
 * fused: 4 launches; else the separate ops. */
static void layer_run(const layer *L, int fused, void *d_xq, float *d_h, float *d_o)
{
    const int t = L->t;
    const int64_t E = L->E, F = L->F;
    if (fused) {
        gpu_fmv_args a;
        memset(&a, 0, sizeof a);
        a.wtype = t;
        a.eps = 1e-5f;
        a.n_mat = 3;
        a.n_in = E;
        a.d_x = L->x;
        a.in_mode = GPU_FMV_IN_RMSNORM;
        a.d_norm = L->n1;
        a.out_mode = GPU_FMV_OUT_STORE;
        float *outs[3] = {L->q, L->k, L->v};
        int64_t rows[3] = {E, L->QKV, L->QKV};
        for (int m = 0; m < 3; m++) {
            a.mat[m].d_w = L->wqkv[m];
            a.mat[m].n_out = rows[m];
            a.mat[m].d_y = outs[m];
        }
        GT_OK(gpu_fused_matvec(&a, S, err));
        memset(&a.mat, 0, sizeof a.mat);
        a.n_mat = 1;
        a.in_mode = GPU_FMV_IN_PLAIN;
        a.d_x = L->q;
        a.out_mode = GPU_FMV_OUT_ADD;
        a.mat[0].d_w = L->wo;
        a.mat[0].n_out = E;
        a.mat[0].d_y = L->x;
        GT_OK(gpu_fused_matvec(&a, S, err));
        a.n_mat = 2;
        a.in_mode = GPU_FMV_IN_RMSNORM;
        a.d_norm = L->n2;
        a.d_x = L->x;
        a.out_mode = GPU_FMV_OUT_SWIGLU;
        a.mat[0].d_w = L->wg;
        a.mat[0].n_out = F;
        a.mat[0].d_y = L->g;
        a.mat[1].d_w = L->wu;
        a.mat[1].n_out = F;
        a.mat[1].d_y = L->u;
        GT_OK(gpu_fused_matvec(&a, S, err));
        memset(&a.mat, 0, sizeof a.mat);
        a.n_mat = 1;
        a.n_in = F;
        a.in_mode = GPU_FMV_IN_PLAIN;
        a.d_x = L->g;
        a.out_mode = GPU_FMV_OUT_ADD;
        a.mat[0].d_w = L->wd;
        a.mat[0].n_out = E;
        a.mat[0].d_y = L->x;
        GT_OK(gpu_fused_matvec(&a, S, err));
        return;
    }
    const int q = is_quant(t);
    GT_OK(gpu_rmsnorm(L->x, L->n1, d_h, E, 1, 1e-5f, S, err));
    if (q) GT_OK(gpu_act_quantize(d_h, E, d_xq, S, err));
    GT_OK(gpu_matvec(t, L->wqkv[0], E, E, d_h, d_xq, L->q, S, err));
    GT_OK(gpu_matvec(t, L->wqkv[1], L->QKV, E, d_h, d_xq, L->k, S, err));
    GT_OK(gpu_matvec(t, L->wqkv[2], L->QKV, E, d_h, d_xq, L->v, S, err));
    if (q) GT_OK(gpu_act_quantize(L->q, E, d_xq, S, err));
    GT_OK(gpu_matvec(t, L->wo, E, E, L->q, d_xq, d_o, S, err));
    GT_OK(gpu_add(L->x, d_o, L->x, E, S, err));
    GT_OK(gpu_rmsnorm(L->x, L->n2, d_h, E, 1, 1e-5f, S, err));
    if (q) GT_OK(gpu_act_quantize(d_h, E, d_xq, S, err));
    GT_OK(gpu_matvec(t, L->wg, F, E, d_h, d_xq, L->g, S, err));
    GT_OK(gpu_matvec(t, L->wu, F, E, d_h, d_xq, L->u, S, err));
    GT_OK(gpu_swiglu(L->g, L->u, L->g, F, S, err));
    if (q) GT_OK(gpu_act_quantize(L->g, F, d_xq, S, err));
    GT_OK(gpu_matvec(t, L->wd, E, F, L->g, d_xq, d_o, S, err));
    GT_OK(gpu_add(L->x, d_o, L->x, E, S, err));
}

static void *rand_weights(int t, int64_t rows, int64_t n_in)
{
    float *wf = NULL;
    void *raw = make_weights(t, rows, n_in, &wf);
    void *d = upload_weights(t, raw, rows, n_in);
    free(raw);
    free(wf);
    return d;
}

static float *alloc_f(int64_t n)
{
    float *d = NULL;
    GT_OK(gpu_malloc((void **)&d, (size_t)n * 4, err));
    GT_OK(gpu_memset(d, 0, (size_t)n * 4, S, err));
    return d;
}

static void test_layer_graph(int t, int64_t E, int64_t F, int64_t QKV, int iters)
{
    char what[128];
    layer L;
    memset(&L, 0, sizeof L);
    L.t = t;
    L.E = E;
    L.F = F;
    L.QKV = QKV;
    float *ones = (float *)gt_xmalloc((size_t)(E > F ? E : F) * 4);
    for (int64_t i = 0; i < E; i++)
        ones[i] = 0.75f + 0.5f * gt_uniform(&g_seed);
    L.wqkv[0] = rand_weights(t, E, E);
    L.wqkv[1] = rand_weights(t, QKV, E);
    L.wqkv[2] = rand_weights(t, QKV, E);
    L.wo = rand_weights(t, E, E);
    L.wg = rand_weights(t, F, E);
    L.wu = rand_weights(t, F, E);
    L.wd = rand_weights(t, E, F);
    L.n1 = (float *)gt_upload(ones, (size_t)E * 4, S);
    L.n2 = (float *)gt_upload(ones, (size_t)E * 4, S);
    L.x = alloc_f(E);
    L.q = alloc_f(E);
    L.k = alloc_f(QKV);
    L.v = alloc_f(QKV);
    L.g = alloc_f(F);
    L.u = alloc_f(F);
    float *d_h = alloc_f(F), *d_o = alloc_f(E);
    void *d_xq = NULL;
    GT_OK(gpu_malloc(&d_xq, gpu_act_q8_bytes(F > E ? F : E), err));
    float *x0 = (float *)gt_xmalloc((size_t)E * 4), *xa = (float *)gt_xmalloc((size_t)E * 4);
    float *xb = (float *)gt_xmalloc((size_t)E * 4);
    double *ref = (double *)gt_xmalloc((size_t)E * 8);

    /* record the fused chain once */
    gpu_graph *g = NULL;
    GT_OK(gpu_graph_begin(S, err));
    layer_run(&L, 1, d_xq, d_h, d_o);
    GT_OK(gpu_graph_end(S, &g, err));
    double worst = 0;
    int bad_guard = 0;
    for (int it = 0; it < iters; it++) {
        gt_fill(x0, E, 1.0f, &g_seed);
        GT_OK(gpu_memcpy_h2d(L.x, x0, (size_t)E * 4, S, err));
        GT_OK(gpu_graph_launch(g, S, err));
        GT_OK(gpu_memcpy_d2h(xa, L.x, (size_t)E * 4, S, err));
        GT_OK(gpu_memcpy_h2d(L.x, x0, (size_t)E * 4, S, err));
        layer_run(&L, 0, d_xq, d_h, d_o);
        GT_OK(gpu_memcpy_d2h(xb, L.x, (size_t)E * 4, S, err));
        GT_OK(gpu_stream_sync(S, err));
        for (int64_t i = 0; i < E; i++)
            ref[i] = xb[i];
        double e = gt_nmse(xa, ref, E);
        if (!(e <= worst)) worst = e;
    }
    snprintf(what, sizeof what, "%s layer E%lld F%lld graph x%d vs separate ops",
             ggml_type_name(t), (long long)E, (long long)F, iters);
    gt_report("fused", what, worst, is_quant(t) ? 1e-5 : 1e-8, !bad_guard);
    gpu_graph_free(g);
    for (int m = 0; m < 3; m++)
        gpu_free(L.wqkv[m]);
    gpu_free(L.wo);
    gpu_free(L.wg);
    gpu_free(L.wu);
    gpu_free(L.wd);
    gpu_free(L.n1);
    gpu_free(L.n2);
    gpu_free(L.x);
    gpu_free(L.q);
    gpu_free(L.k);
    gpu_free(L.v);
    gpu_free(L.g);
    gpu_free(L.u);
    gpu_free(d_h);
    gpu_free(d_o);
    gpu_free(d_xq);
    free(ones);
    free(x0);
    free(xa);
    free(xb);
    free(ref);
}

/* gpu_argmax_ex (many blocks, shared scratch reset by the kernel) vs the host rule: smallest
 * index of the largest value, NaN never wins, all NaN gives 0. kind 0 random, 1 ties at the
 * maximum, 2 NaNs everywhere but a few, 3 all NaN, 4 -inf and NaN only. Each case runs 3 times
 * on the same scratch (the ticket counter must come back to 0). */
static void test_argmax_ex(int64_t n, int kind, void *d_scratch)
{
    float *x = (float *)gt_xmalloc((size_t)n * 4);
    gt_fill(x, n, 10.0f, &g_seed);
    if (kind == 1)
        for (int64_t i = n / 3; i < n; i += 1 + n / 5)
            x[i] = 11.0f;
    if (kind >= 2)
        for (int64_t i = 0; i < n; i++)
            if (kind == 3 || gt_rand_u64(&g_seed) % 7 || i == n - 1) x[i] = NAN;
    if (kind == 4) x[n / 2] = -INFINITY;
    int32_t want = -1;
    for (int64_t i = 0; i < n; i++)
        if (!isnan(x[i]) && (want < 0 || x[i] > x[want])) want = (int32_t)i;
    if (want < 0) want = 0;
    float *d_x = (float *)gt_upload(x, (size_t)n * 4, S);
    int32_t *d_idx = NULL;
    GT_OK(gpu_malloc((void **)&d_idx, 4, err));
    int ok = 1;
    for (int rep = 0; rep < 3; rep++) {
        int32_t got = -7;
        GT_OK(gpu_memset(d_idx, 0xff, 4, S, err));
        GT_OK(gpu_argmax_ex(d_x, n, d_scratch, d_idx, S, err));
        GT_OK(gpu_memcpy_d2h(&got, d_idx, 4, S, err));
        GT_OK(gpu_stream_sync(S, err));
        ok &= got == want;
        if (got != want) printf("argmax_ex n %lld kind %d rep %d: got %d want %d\n", (long long)n,
                                kind, rep, got, want);
    }
    gt_check(ok, "argmax_ex n %lld kind %d", (long long)n, kind);
    gpu_free(d_x);
    gpu_free(d_idx);
    free(x);
}

static void test_errors(void)
{
    forge_err e = {0};
    gpu_fmv_args a;
    memset(&a, 0, sizeof a);
    a.wtype = GGML_TYPE_Q4_0;
    a.n_mat = 1;
    a.n_in = 48; /* not a multiple of 32 */
    int rc = gpu_fused_matvec(&a, S, &e);
    gt_check(rc == FORGE_E_UNSUPPORTED || rc == FORGE_E_INVALID, "fused: bad n_in rejected (%d %s)",
             rc, e.msg);
    a.n_in = 64;
    a.n_mat = 0;
    rc = gpu_fused_matvec(&a, S, &e);
    gt_check(rc == FORGE_E_INVALID, "fused: zero matrices rejected (%d %s)", rc, e.msg);
    gt_check(!gpu_fused_matvec_supported(GGML_TYPE_Q4_0, 172) &&
                 gpu_fused_matvec_supported(GGML_TYPE_F32, 172) &&
                 !gpu_fused_matvec_supported(GGML_TYPE_F16, 172) &&
                 gpu_fused_matvec_supported(GGML_TYPE_Q8_0, 4096),
             "fused: supported() by type and row length");
    printf("fused    errors: %s\n", e.msg);
    /* the batch-invariant mode exists for the shapes an engine decodes most (7B Q4_0 and F16),
     * not for the block types of gpu_quant.cuh */
    const int64_t qkv[3] = {4096, 4096, 4096}, gu[2] = {11008, 11008}, one[1] = {32000};
    const struct {
        int t, n_mat, out;
        const int64_t *n_out;
        int64_t n_in;
        int want;
    } inv[] = {
        {GGML_TYPE_Q4_0, 3, GPU_FMV_OUT_STORE, qkv, 4096, 1},
        {GGML_TYPE_Q4_0, 2, GPU_FMV_OUT_SWIGLU, gu, 4096, 1},
        {GGML_TYPE_Q4_0, 1, GPU_FMV_OUT_ADD, qkv, 11008, 1},
        {GGML_TYPE_Q4_0, 1, GPU_FMV_OUT_STORE, one, 4096, 1},
        {GGML_TYPE_F16, 3, GPU_FMV_OUT_STORE, qkv, 4096, 1},
        {GGML_TYPE_Q8_0, 2, GPU_FMV_OUT_SWIGLU, gu, 4096, 1},
        {GGML_TYPE_Q4_K, 3, GPU_FMV_OUT_STORE, qkv, 4096, 0},
        {GGML_TYPE_Q6_K, 1, GPU_FMV_OUT_ADD, qkv, 11008, 0},
        {GGML_TYPE_Q4_0, 1, GPU_FMV_OUT_STORE, one, 48, 0},
    };
    for (size_t i = 0; i < GT_LEN(inv); i++) {
        memset(&a, 0, sizeof a);
        a.wtype = inv[i].t;
        a.n_mat = inv[i].n_mat;
        a.out_mode = inv[i].out;
        a.n_in = inv[i].n_in;
        for (int m = 0; m < a.n_mat; m++)
            a.mat[m].n_out = inv[i].n_out[m];
        gt_check(gpu_fused_matvec_invariant(&a) == inv[i].want,
                 "fused: invariant mode for %s, %d matrices of n_in %lld: %s",
                 ggml_type_name(inv[i].t), a.n_mat, (long long)a.n_in,
                 inv[i].want ? "exists" : "refused");
    }
}

int main(int argc, char **argv)
{
    g_quick = argc > 1 && !strcmp(argv[1], "--quick");
    GT_OK(gpu_stream_create(&S, err));
    const int types[] = {GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q8_0,
                         GGML_TYPE_Q4_0};
    const fcase big[] = {
        {"qkv-1b", 3, {2048, 512, 512}, 2048, GPU_FMV_IN_RMSNORM, GPU_FMV_OUT_STORE, 0, 0},
        {"qkv-7b", 3, {4096, 4096, 4096}, 4096, GPU_FMV_IN_RMSNORM, GPU_FMV_OUT_STORE, 0, 0},
        {"qkv-bias", 3, {896, 128, 128}, 896, GPU_FMV_IN_RMSNORM, GPU_FMV_OUT_STORE, 1, 0},
        {"o-7b", 1, {4096}, 4096, GPU_FMV_IN_PLAIN, GPU_FMV_OUT_ADD, 0, 0},
        {"o-1b", 1, {2048}, 2048, GPU_FMV_IN_PLAIN, GPU_FMV_OUT_ADD, 0, 0},
        {"gateup-7b", 2, {11008, 11008}, 4096, GPU_FMV_IN_RMSNORM, GPU_FMV_OUT_SWIGLU, 0, 0},
        {"gateup-1b", 2, {8192, 8192}, 2048, GPU_FMV_IN_RMSNORM, GPU_FMV_OUT_SWIGLU, 0, 0},
        {"down-7b", 1, {4096}, 11008, GPU_FMV_IN_PLAIN, GPU_FMV_OUT_ADD, 0, 0},
        {"down-1b", 1, {2048}, 8192, GPU_FMV_IN_PLAIN, GPU_FMV_OUT_ADD, 0, 0},
        {"output", 1, {32000}, 4096, GPU_FMV_IN_RMSNORM, GPU_FMV_OUT_STORE, 0, 0},
        {"wide-f32", 1, {300}, 16384, GPU_FMV_IN_RMSNORM, GPU_FMV_OUT_STORE, 1, 0},
    };
    const fcase small[] = {
        {"1x32", 1, {1}, 32, GPU_FMV_IN_RMSNORM, GPU_FMV_OUT_STORE, 0, 0},
        {"33x96", 1, {33}, 96, GPU_FMV_IN_PLAIN, GPU_FMV_OUT_STORE, 1, 0},
        {"3mats-odd", 3, {5, 7, 9}, 64, GPU_FMV_IN_RMSNORM, GPU_FMV_OUT_STORE, 1, 0},
        {"swiglu-172", 2, {172, 172}, 64, GPU_FMV_IN_RMSNORM, GPU_FMV_OUT_SWIGLU, 0, 0},
        {"add-65x4192", 1, {65}, 4192, GPU_FMV_IN_PLAIN, GPU_FMV_OUT_ADD, 0, 0},
        {"2mats-odd", 2, {7, 6001}, 96, GPU_FMV_IN_RMSNORM, GPU_FMV_OUT_STORE, 0, 0},
        {"swiglu-3x8192", 2, {3, 3}, 8192, GPU_FMV_IN_PLAIN, GPU_FMV_OUT_SWIGLU, 0, 0},
        {"qkv-round", 3, {256, 64, 64}, 256, GPU_FMV_IN_RMSNORM, GPU_FMV_OUT_STORE, 0, 1},
        {"add-round", 1, {300}, 1024, GPU_FMV_IN_PLAIN, GPU_FMV_OUT_ADD, 0, 1},
        {"swiglu-round", 2, {96, 96}, 512, GPU_FMV_IN_RMSNORM, GPU_FMV_OUT_SWIGLU, 0, 1},
    };
    for (size_t ti = 0; ti < GT_LEN(types); ti++) {
        for (size_t i = 0; i < GT_LEN(small); i++)
            run_case(types[ti], &small[i]);
        if (!g_quick)
            for (size_t i = 0; i < GT_LEN(big); i++)
                run_case(types[ti], &big[i]);
    }
    /* the block types of gpu_quant.cuh (k_fused_gq); cases whose rows the type cannot hold
     * (K-quants: n_in % 256) are left out by run_case; the 7B shapes for Q4_K and Q6_K */
    const int gq_types[] = {GGML_TYPE_Q4_K, GGML_TYPE_Q6_K, GGML_TYPE_Q5_K,   GGML_TYPE_Q4_1,
                            GGML_TYPE_Q5_0, GGML_TYPE_Q5_1, GGML_TYPE_Q2_K,   GGML_TYPE_Q3_K,
                            GGML_TYPE_IQ4_NL, GGML_TYPE_IQ4_XS, GGML_TYPE_TQ2_0, GGML_TYPE_TQ1_0};
    const fcase gq_big[] = {
        {"qkv-7b", 3, {4096, 4096, 4096}, 4096, GPU_FMV_IN_RMSNORM, GPU_FMV_OUT_STORE, 0, 0},
        {"gateup-7b", 2, {11008, 11008}, 4096, GPU_FMV_IN_RMSNORM, GPU_FMV_OUT_SWIGLU, 0, 0},
        {"down-7b", 1, {4096}, 11008, GPU_FMV_IN_PLAIN, GPU_FMV_OUT_ADD, 0, 0},
        {"qkv-k256", 3, {512, 256, 256}, 512, GPU_FMV_IN_RMSNORM, GPU_FMV_OUT_STORE, 1, 0},
        {"swiglu-k256", 2, {300, 300}, 768, GPU_FMV_IN_PLAIN, GPU_FMV_OUT_SWIGLU, 0, 0},
    };
    for (size_t ti = 0; ti < GT_LEN(gq_types); ti++) {
        for (size_t i = 0; i < GT_LEN(small); i++)
            run_case(gq_types[ti], &small[i]);
        for (size_t i = 3; i < GT_LEN(gq_big); i++)
            run_case(gq_types[ti], &gq_big[i]);
        if (!g_quick && ti < 2)
            for (size_t i = 0; i < 3; i++)
                run_case(gq_types[ti], &gq_big[i]);
    }
    for (size_t ti = 0; ti < GT_LEN(types); ti++) {
        test_layer_graph(types[ti], 256, 640, 64, g_quick ? 5 : 20);
        if (!g_quick) test_layer_graph(types[ti], 4096, 11008, 1024, 20);
    }
    {
        void *d_sc = NULL;
        GT_OK(gpu_malloc(&d_sc, gpu_argmax_scratch_bytes(), err));
        GT_OK(gpu_memset(d_sc, 0, gpu_argmax_scratch_bytes(), S, err));
        const int64_t ns[] = {1, 7, 1000, 2049, 32000, 128256, 151936, 1 << 20};
        for (size_t i = 0; i < GT_LEN(ns); i++)
            for (int kind = 0; kind < 5; kind++)
                test_argmax_ex(ns[i], kind, d_sc);
        gpu_free(d_sc);
        printf("fused    argmax_ex: %d cases\n", (int)GT_LEN(ns) * 5);
    }
    test_errors();
    printf("fused    invariant mode: %d cases bit for bit\n", g_n_invariant);
    gt_check(g_n_invariant >= 10, "fused: at least 10 cases ran in the invariant mode (%d)",
             g_n_invariant);
    gpu_stream_destroy(S);
    printf("%d passed, %d failed\n", gt_pass, gt_fail);
    return gt_fail ? 1 : 0;
}
