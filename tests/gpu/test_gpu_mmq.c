/* test_gpu_mmq.c - the int8 tensor-core product of quantized weights (gpu_mmq, gpu_mmq.cu).
 * Weights: Q8_0/Q4_0 blocks made by the CPU's quantizers from random floats, converted to the
 * device layout by gpu_weight_convert; activations: random rows (one with a zero block) quantized
 * by gpu_act_quantize. For every case:
 *   1. gpu_mmq against a double-precision CPU reference built from the very weights and
 *      quantized activations the kernel reads (W dequantized by forge_dequantize, X from the
 *      downloaded d_xq): every token for the small shapes, tokens 0, n_tok/2 and n_tok-1 of the
 *      7B shapes;
 *   2. against gpu_matvec_rows (gpu_matvec row by row) over the whole output;
 *   3. a second run gives the same bits (deterministic: no atomics, fixed summation order);
 *   4. beta = 1 adds the product to what d_y held: bit for bit y0 + (the beta 0 result), both a
 *      single fp32 rounding of the same two numbers;
 *   5. y_stride > n_out writes the same numbers and leaves the gaps between rows untouched.
 * Outputs are poisoned with NaN before each run (an unwritten element fails) and followed by
 * guard bytes (an out-of-bounds write fails).
 * NMSE threshold 1e-10: the integer block sums are exact in every implementation; what differs is
 * fp32 rounding of d_w*d_x (2^-24 relative), of each block term, and the order of the fp32 sum
 * over n_in/32 <= 448 blocks, i.e. a relative error per output of about 2^-24 * sqrt(n_in/32)
 * ~ 1e-6, an NMSE ~ 1e-12 (measured values are printed). A wrong fragment layout, scale or
 * nibble gives NMSE ~ 1 and a dropped block ~ 1e-3 or more.
 * Also: every tile configuration forced by FORGE_GPU_MMQ_TILE (with and without the k split) on
 * shapes with partial row, token and k tiles (odd n_in/32); a captured graph gives the bits of the
 * direct call; the API table; bad arguments give errors, not crashes. test_gpu_mmq [--quick] needs
 * a GPU (CUDA, sm_80+); a HIP build reports the cases skipped
 *   --quick: fewer small shapes and no 7B shapes (every tile, the graph and the bad arguments
 *   still), for compute-sanitizer
 * One line per case, a final "N passed, M failed" line; exit status 0 only when all passed. */
#include <stdint.h>

#include "gpu_test_util.h"

#define THR_MMQ 1e-10

static gpu_stream *S;
static uint64_t g_seed = 0x6D6D71C0FFEE1234ULL;

static const char *type_name(int t)
{
    return t == GGML_TYPE_Q8_0 ? "Q8_0" : "Q4_0";
}

/* A matrix on the host (dequantized, exact) and on the device (device layout). */
typedef struct mq_weights {
    int t;
    int64_t n_out, n_in;
    float *wf;
    void *d_w;
} mq_weights;

static mq_weights make_weights(int t, int64_t n_out, int64_t n_in)
{
    mq_weights w = {t, n_out, n_in, NULL, NULL};
    void *raw = gt_make_weights(t, n_out, n_in, &g_seed, &w.wf);
    w.d_w = gt_upload_weights(t, raw, n_out, n_in, S);
    free(raw);
    return w;
}

static void free_weights(mq_weights *w)
{
    gpu_free(w->d_w);
    free(w->wf);
}

/* Random activations, rows of different magnitudes; row 0 has a zero block (scale 0). */
static float *make_acts(int64_t n_tok, int64_t n_in)
{
    float *x = gt_xmalloc((size_t)(n_tok * n_in) * sizeof(float));
    for (int64_t t = 0; t < n_tok; t++)
        gt_fill(x + t * n_in, n_in, 0.25f + (float)(t % 5), &g_seed);
    if (n_in >= 64) memset(x + 32, 0, 32 * sizeof(float));
    return x;
}

/* ref[i][r] for the listed tokens, in double, from W (exact floats) and the downloaded Q8_0
 * activations (int8 quants | float scales at round_up(n_tok * n_in, 16)). */
static void cpu_ref(const mq_weights *w, const unsigned char *xq_buf, int64_t n_tok,
                    const int64_t *toks, int n_toks, double *ref)
{
    const int64_t n_in = w->n_in, n_all = n_tok * n_in;
    const signed char *q = (const signed char *)xq_buf;
    const float *d = (const float *)(xq_buf + (n_all + 15) / 16 * 16);
    double *xv = gt_xmalloc((size_t)n_in * sizeof(double));
    for (int i = 0; i < n_toks; i++) {
        const int64_t t = toks[i];
        for (int64_t k = 0; k < n_in; k++)
            xv[k] = (double)d[t * (n_in / 32) + k / 32] * (double)q[t * n_in + k];
        for (int64_t r = 0; r < w->n_out; r++) {
            const float *wr = w->wf + r * n_in;
            double s = 0;
            for (int64_t k = 0; k < n_in; k++)
                s += (double)wr[k] * xv[k];
            ref[(int64_t)i * w->n_out + r] = s;
        }
    }
    free(xv);
}

/* gpu_mmq into a poisoned, guarded buffer of n_tok * y_stride floats; returns the guard check. */
static int run_mmq(const mq_weights *w, int64_t n_tok, const void *d_xq, float *d_y,
                   int64_t y_stride, float *h_y)
{
    const size_t yb = (size_t)(n_tok * y_stride) * sizeof(float);
    gt_out_prepare(d_y, yb, S);
    GT_OK(gpu_mmq(w->t, w->d_w, w->n_out, w->n_in, n_tok, d_xq, d_y, y_stride, 0.0f, S, err));
    return gt_out_fetch(d_y, yb, h_y, S);
}

/* All checks of one (weights, n_tok) case; `full`: the CPU reference for every token. */
static void mmq_case(const mq_weights *w, int64_t n_tok, int full, const char *tag)
{
    const int64_t n_out = w->n_out, n_in = w->n_in, n_all = n_tok * n_in;
    const size_t n_y = (size_t)(n_tok * n_out), yb = n_y * sizeof(float);
    const size_t xqb = gpu_act_q8_bytes(n_all);
    char what[160];
    snprintf(what, sizeof what, "%s %lld x %lld, %lld tok%s%s", type_name(w->t), (long long)n_out,
             (long long)n_in, (long long)n_tok, tag[0] ? ", " : "", tag);

    float *x = make_acts(n_tok, n_in);
    float *d_x = gt_upload(x, (size_t)n_all * sizeof(float), S);
    void *d_xq = NULL;
    GT_OK(gpu_malloc(&d_xq, xqb, err));
    GT_OK(gpu_act_quantize(d_x, n_all, d_xq, S, err));
    unsigned char *xq_buf = gt_xmalloc(xqb);
    GT_OK(gpu_memcpy_d2h(xq_buf, d_xq, xqb, S, err));
    GT_OK(gpu_stream_sync(S, err));

    float *d_y = gt_out_alloc(yb), *d_r = gt_out_alloc(yb);
    float *y1 = gt_xmalloc(yb), *y2 = gt_xmalloc(yb), *yr = gt_xmalloc(yb);
    float *y0 = gt_xmalloc(yb), *yb1 = gt_xmalloc(yb);

    /* 1 + 2 + 3 */
    const int g1 = run_mmq(w, n_tok, d_xq, d_y, n_out, y1);
    const int g2 = run_mmq(w, n_tok, d_xq, d_y, n_out, y2);
    gt_out_prepare(d_r, yb, S);
    GT_OK(gpu_matvec_rows(w->t, w->d_w, n_out, n_in, n_tok, NULL, d_xq, d_r, NULL, S, err));
    const int gr = gt_out_fetch(d_r, yb, yr, S);

    int64_t toks[3] = {0, n_tok / 2, n_tok - 1};
    int n_toks = n_tok < 3 ? (int)n_tok : 3;
    int64_t *all = NULL;
    if (full) {
        all = gt_xmalloc((size_t)n_tok * sizeof(int64_t));
        for (int64_t t = 0; t < n_tok; t++)
            all[t] = t;
        n_toks = (int)n_tok;
    }
    const int64_t *tl = full ? all : toks;
    double *ref = gt_xmalloc((size_t)n_toks * (size_t)n_out * sizeof(double));
    float *ysel = gt_xmalloc((size_t)n_toks * (size_t)n_out * sizeof(float));
    cpu_ref(w, xq_buf, n_tok, tl, n_toks, ref);
    for (int i = 0; i < n_toks; i++)
        memcpy(ysel + (int64_t)i * n_out, y1 + tl[i] * n_out, (size_t)n_out * sizeof(float));
    const double e_cpu = gt_nmse(ysel, ref, (int64_t)n_toks * n_out);
    double *yrd = gt_xmalloc(n_y * sizeof(double));
    for (size_t i = 0; i < n_y; i++)
        yrd[i] = yr[i];
    const double e_mv = gr ? gt_nmse(y1, yrd, (int64_t)n_y) : INFINITY;
    const int same = !memcmp(y1, y2, yb);

    /* 4: beta = 1 */
    for (size_t i = 0; i < n_y; i++)
        y0[i] = gt_uniform(&g_seed) * 4.0f;
    gt_out_prepare(d_y, yb, S);
    GT_OK(gpu_memcpy_h2d(d_y, y0, yb, S, err));
    GT_OK(gpu_mmq(w->t, w->d_w, n_out, n_in, n_tok, d_xq, d_y, n_out, 1.0f, S, err));
    const int gb = gt_out_fetch(d_y, yb, yb1, S);
    size_t beta_bad = 0;
    for (size_t i = 0; i < n_y; i++) {
        const float want = y0[i] + y1[i];
        beta_bad += memcmp(&want, &yb1[i], sizeof want) != 0;
    }

    /* 5: y_stride > n_out (the gaps keep the poison) */
    int stride_ok = 1, gs = 1;
    if (n_tok > 1) {
        const int64_t ys = n_out + 5;
        const size_t sb = (size_t)(n_tok * ys) * sizeof(float);
        float *d_s = gt_out_alloc(sb), *hs = gt_xmalloc(sb);
        gs = run_mmq(w, n_tok, d_xq, d_s, ys, hs);
        for (int64_t t = 0; t < n_tok && stride_ok; t++) {
            stride_ok &= !memcmp(hs + t * ys, y1 + t * n_out, (size_t)n_out * sizeof(float));
            const unsigned char *gap = (const unsigned char *)(hs + t * ys + n_out);
            for (size_t b = 0; b < 5 * sizeof(float); b++)
                stride_ok &= gap[b] == GT_POISON_BYTE;
        }
        gpu_free(d_s);
        free(hs);
    }

    const int ok = e_cpu <= THR_MMQ && e_mv <= THR_MMQ && same && g1 && g2 && gr && beta_bad == 0 &&
                   gb && stride_ok && gs;
    printf("mmq  %-44s cpu %8.2e mv %8.2e%s%s%s%s  %s\n", what, e_cpu, e_mv,
           same ? "" : " NOT-DETERMINISTIC", beta_bad ? " BETA1-WRONG" : "",
           stride_ok ? "" : " STRIDE-WRONG",
           (g1 && g2 && gr && gb && gs) ? "" : " GUARD-BYTES-OVERWRITTEN", ok ? "ok" : "FAIL");
    gt_check(e_cpu <= THR_MMQ, "%s: nmse vs CPU %.3g > %.0e", what, e_cpu, THR_MMQ);
    gt_check(e_mv <= THR_MMQ, "%s: nmse vs gpu_matvec_rows %.3g > %.0e", what, e_mv, THR_MMQ);
    gt_check(same, "%s: two runs differ", what);
    gt_check(beta_bad == 0, "%s: beta 1: %zu of %zu elements are not y0 + W x", what, beta_bad,
             n_y);
    gt_check(stride_ok, "%s: y_stride n_out + 5 wrote other numbers or into the gaps", what);
    gt_check(g1 && g2 && gr && gb && gs, "%s: guard bytes after the output overwritten", what);

    gpu_free(d_x);
    gpu_free(d_xq);
    gpu_free(d_y);
    gpu_free(d_r);
    free(x);
    free(xq_buf);
    free(y1);
    free(y2);
    free(yr);
    free(y0);
    free(yb1);
    free(all);
    free(ref);
    free(ysel);
    free(yrd);
}

/* A captured graph of gpu_mmq gives the bits of the direct call (the backend captures decode
 * steps; the launcher's shared-memory attribute call must be legal under capture). */
static void graph_case(const mq_weights *w, int64_t n_tok)
{
    const int64_t n_all = n_tok * w->n_in;
    const size_t yb = (size_t)(n_tok * w->n_out) * sizeof(float);
    float *x = make_acts(n_tok, w->n_in);
    float *d_x = gt_upload(x, (size_t)n_all * sizeof(float), S);
    void *d_xq = NULL;
    gpu_graph *g = NULL;
    GT_OK(gpu_malloc(&d_xq, gpu_act_q8_bytes(n_all), err));
    GT_OK(gpu_act_quantize(d_x, n_all, d_xq, S, err));
    float *d_y = gt_out_alloc(yb), *y1 = gt_xmalloc(yb), *y2 = gt_xmalloc(yb);
    const int g1 = run_mmq(w, n_tok, d_xq, d_y, w->n_out, y1);
    gt_out_prepare(d_y, yb, S);
    GT_OK(gpu_stream_sync(S, err));
    GT_OK(gpu_graph_begin(S, err));
    GT_OK(gpu_mmq(w->t, w->d_w, w->n_out, w->n_in, n_tok, d_xq, d_y, w->n_out, 0.0f, S, err));
    GT_OK(gpu_graph_end(S, &g, err));
    GT_OK(gpu_graph_launch(g, S, err));
    const int g2 = gt_out_fetch(d_y, yb, y2, S);
    const int ok = g1 && g2 && !memcmp(y1, y2, yb);
    printf("mmq  graph: %s %lld x %lld, %lld tok, replay == direct call  %s\n", type_name(w->t),
           (long long)w->n_out, (long long)w->n_in, (long long)n_tok, ok ? "ok" : "FAIL");
    gt_check(ok, "graph replay of gpu_mmq differs from the direct call");
    gpu_graph_free(g);
    gpu_free(d_x);
    gpu_free(d_xq);
    gpu_free(d_y);
    free(x);
    free(y1);
    free(y2);
}

/* Bad arguments: an error code and a message, nothing launched. */
static void bad_args(const mq_weights *w)
{
    void *d_xq = NULL;
    float *d_y = NULL;
    const int64_t n_tok = 4;
    GT_OK(gpu_malloc(&d_xq, gpu_act_q8_bytes(n_tok * w->n_in) + 16, err));
    GT_OK(gpu_malloc((void **)&d_y, (size_t)(n_tok * w->n_out) * sizeof(float), err));
    struct {
        const char *what;
        int t;
        const void *w, *xq;
        float *y;
        int64_t n_out, n_in, n_tok, ys;
        int want;
    } c[] = {
        {"NULL weights", w->t, NULL, d_xq, d_y, w->n_out, w->n_in, n_tok, w->n_out,
         FORGE_E_INVALID},
        {"NULL activations", w->t, w->d_w, NULL, d_y, w->n_out, w->n_in, n_tok, w->n_out,
         FORGE_E_INVALID},
        {"NULL output", w->t, w->d_w, d_xq, NULL, w->n_out, w->n_in, n_tok, w->n_out,
         FORGE_E_INVALID},
        {"misaligned activations", w->t, w->d_w, (const char *)d_xq + 4, d_y, w->n_out, w->n_in,
         n_tok, w->n_out, FORGE_E_INVALID},
        {"n_in 48 (not a multiple of 32)", w->t, w->d_w, d_xq, d_y, w->n_out, 48, n_tok, w->n_out,
         FORGE_E_UNSUPPORTED},
        {"n_in 0", w->t, w->d_w, d_xq, d_y, w->n_out, 0, n_tok, w->n_out, FORGE_E_UNSUPPORTED},
        {"F16 weights", GGML_TYPE_F16, w->d_w, d_xq, d_y, w->n_out, w->n_in, n_tok, w->n_out,
         FORGE_E_UNSUPPORTED},
        {"Q4_K weights", GGML_TYPE_Q4_K, w->d_w, d_xq, d_y, w->n_out, w->n_in, n_tok, w->n_out,
         FORGE_E_UNSUPPORTED},
        {"n_tok 0", w->t, w->d_w, d_xq, d_y, w->n_out, w->n_in, 0, w->n_out, FORGE_E_INVALID},
        {"n_out 0", w->t, w->d_w, d_xq, d_y, 0, w->n_in, n_tok, 1, FORGE_E_INVALID},
        {"y_stride < n_out", w->t, w->d_w, d_xq, d_y, w->n_out, w->n_in, n_tok, w->n_out - 1,
         FORGE_E_INVALID},
    };
    for (size_t i = 0; i < GT_LEN(c); i++) {
        forge_err e = {0};
        const int rc = gpu_mmq(c[i].t, c[i].w, c[i].n_out, c[i].n_in, c[i].n_tok, c[i].xq, c[i].y,
                               c[i].ys, 0.0f, S, &e);
        const int ok = rc == c[i].want && e.msg[0] != '\0';
        printf("mmq  bad argument: %-32s -> %s \"%s\"  %s\n", c[i].what, forge_status_name(rc),
               e.msg, ok ? "ok" : "FAIL");
        gt_check(ok, "gpu_mmq with %s returned %s, want %s", c[i].what, forge_status_name(rc),
                 forge_status_name(c[i].want));
    }
    GT_OK(gpu_stream_sync(S, err));
    gt_check(!gpu_mmq_supported(GGML_TYPE_Q8_0, 48) && !gpu_mmq_supported(GGML_TYPE_F16, 4096) &&
                 !gpu_mmq_supported(GGML_TYPE_Q4_0, 0),
             "gpu_mmq_supported accepts a bad type or n_in");
    gt_check(gpu_mmq_supported(GGML_TYPE_Q8_0, 32) && gpu_mmq_supported(GGML_TYPE_Q4_0, 11008),
             "gpu_mmq_supported refuses Q8_0 x 32 or Q4_0 x 11008");
    const gpu_api *api = forge_gpu_get_api(GPU_API_VERSION);
    gt_check(api && api->mmq == gpu_mmq && api->mmq_supported == gpu_mmq_supported,
             "the gpu_api table lacks gpu_mmq");
    gpu_free(d_xq);
    gpu_free(d_y);
}

int main(int argc, char **argv)
{
    const int quick = argc > 1 && !strcmp(argv[1], "--quick");
    const int types[] = {GGML_TYPE_Q8_0, GGML_TYPE_Q4_0};
    GT_OK(gpu_set_device(0, err));
    GT_OK(gpu_stream_create(&S, err));
    if (!gpu_mmq_supported(GGML_TYPE_Q8_0, 4096)) {
        printf("test_gpu_mmq: gpu_mmq is not supported by this %s build or device: all cases "
               "skipped\n",
               gpu_backend_name());
        gpu_stream_destroy(S);
        printf("test_gpu_mmq: %d passed, %d failed\n", gt_pass, gt_fail);
        return 0;
    }

    /* small and odd shapes: partial row/token tiles, one block (n_in 32), odd block counts
     * (96, 1056: a last k-stage that is not full, fp16 scale rows starting at odd halves) */
    const int64_t outs[] = {1, 17, 100}, outs_q[] = {17, 100};
    const int64_t ins[] = {32, 96, 1056, 4096}, ins_q[] = {96, 1056};
    const int64_t toks[] = {1, 5, 16, 33, 64, 100, 512}, toks_q[] = {5, 33, 100};
    const int64_t *o_l = quick ? outs_q : outs, *i_l = quick ? ins_q : ins;
    const int64_t *t_l = quick ? toks_q : toks;
    const size_t n_o = quick ? GT_LEN(outs_q) : GT_LEN(outs);
    const size_t n_i = quick ? GT_LEN(ins_q) : GT_LEN(ins);
    const size_t n_t = quick ? GT_LEN(toks_q) : GT_LEN(toks);
    for (size_t ti = 0; ti < GT_LEN(types); ti++)
        for (size_t oi = 0; oi < n_o; oi++)
            for (size_t ii = 0; ii < n_i; ii++) {
                mq_weights w = make_weights(types[ti], o_l[oi], i_l[ii]);
                for (size_t k = 0; k < n_t; k++)
                    mmq_case(&w, t_l[k], 1, "");
                free_weights(&w);
            }

    /* every tile configuration, forced */
    const char *tiles[] = {"128x64",  "64x64",   "64x32",   "32x32",   "64x16",
                           "32x16",   "64x64x2", "64x32x2", "64x64x4", "64x32x4",
                           "32x32x4", "64x16x4", "32x16x4"};
    for (size_t ti = 0; ti < GT_LEN(types); ti++) {
        mq_weights wa = make_weights(types[ti], 130, 1056);
        mq_weights wb = make_weights(types[ti], 17, 96);
        for (size_t k = 0; k < GT_LEN(tiles); k++) {
            char tag[48];
            snprintf(tag, sizeof tag, "tile %s", tiles[k]);
            setenv("FORGE_GPU_MMQ_TILE", tiles[k], 1);
            mmq_case(&wa, 70, 1, tag);
            mmq_case(&wa, 200, 1, tag);
            mmq_case(&wb, 5, 1, tag);
        }
        unsetenv("FORGE_GPU_MMQ_TILE");
        free_weights(&wa);
        free_weights(&wb);
    }

    /* graph capture, bad arguments */
    for (size_t ti = 0; ti < GT_LEN(types); ti++) {
        mq_weights w = make_weights(types[ti], 512, 1024);
        graph_case(&w, 64);
        if (ti == 0) bad_args(&w);
        free_weights(&w);
    }

    /* 7B shapes */
    const int64_t shapes[][2] = {{4096, 4096}, {11008, 4096}, {4096, 11008}, {32000, 4096}};
    const int64_t big_toks[] = {16, 64, 256};
    for (size_t ti = 0; ti < GT_LEN(types) && !quick; ti++)
        for (size_t si = 0; si < GT_LEN(shapes); si++) {
            mq_weights w = make_weights(types[ti], shapes[si][0], shapes[si][1]);
            for (size_t k = 0; k < GT_LEN(big_toks); k++)
                mmq_case(&w, big_toks[k], 0, "");
            free_weights(&w);
        }

    gpu_stream_destroy(S);
    printf("test_gpu_mmq: %d passed, %d failed\n", gt_pass, gt_fail);
    return gt_fail ? 1 : 0;
}
