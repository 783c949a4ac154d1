/* bench_gpu_mmq.c - the tensor-core quantized product (gpu_mmq) against the two paths it can
 * replace, for Q4_0 and Q8_0 weights of 4096x4096, 11008x4096 and 4096x11008 at n_tok 16..512:
 *   mmq:     gpu_mmq on activations quantized once (gpu_act_quantize, timed on its own: "actq",
 *            which one quantization shares between the matrices of one input, e.g. Q/K/V);
 *   cuBLAS:  what the backend's prompt path does today: gpu_weight_to_f16 of the matrix into an
 *            fp16 scratch, then gpu_gemm_ex (F16, fp32 accumulation; includes converting X to
 *            fp16);
 *   mv16:    gpu_matvec_multi in launches of 16 rows (the decode-batch kernel), each 16-row
 *            chunk quantized beforehand.
 * Each path runs as a captured graph of calls that rotate through enough copies of the matrix to
 * exceed the L2 several times (DRAM numbers, as bench_gpu_matvec.c), timed with events over
 * several replays (median). Weight GB/s counts the device-layout weight bytes once per call;
 * TOPS counts 2 * n_out * n_in * n_tok operations. A path that cannot be captured (cuBLAS on
 * some setups) is timed by direct calls instead, marked "*".
 *   bench_gpu_mmq [--tiles]     --tiles: also every tile configuration of gpu_mmq, forced by
 *                               FORGE_GPU_MMQ_TILE (for tuning the choice in gpu_mmq.cu)
 * Prints tables; needs a GPU (CUDA, sm_80+). Speed is measured here, never asserted. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/fp16.h"
#include "forge.h"
#include "gpu/gpu_ops.h"
#include "bench_gpu_util.h"

#define REPS 7
#define MV_ROWS 16 /* GPU_MATVEC_MULTI_MAX */

static gpu_stream *S;
static gpu_event *E0, *E1;
static size_t g_l2;
static uint64_t g_seed = 0x3C6EF372FE94F82BULL;

static void *upload_random(size_t n, int as_f16, float amp)
{
    return bench_upload_random(n, as_f16, amp, &g_seed, S);
}

/* ---- timing ---------------------------------------------------------------------------------- */
/* One path: call i of a sequence (i selects the weight copy); returns FORGE_OK or the error. */
typedef int (*op_fn)(void *ctx, int i, forge_err *err);

/* Median ms per call over REPS replays of a graph of n calls (after one warm-up replay). If the
 * calls cannot be captured, the same n calls are timed directly and *direct is set. */
static float time_calls(op_fn fn, void *ctx, int n, int *direct)
{
    float t[REPS];
    gpu_graph *g = NULL;
    forge_err e = {0};
    int rc = gpu_graph_begin(S, &e);
    for (int i = 0; i < n && rc == FORGE_OK; i++)
        rc = fn(ctx, i, &e);
    if (rc == FORGE_OK) {
        rc = gpu_graph_end(S, &g, &e);
    } else {
        gpu_graph *junk = NULL;
        forge_err e2 = {0};
        if (gpu_graph_end(S, &junk, &e2) == FORGE_OK) gpu_graph_free(junk);
    }
    *direct = rc != FORGE_OK;
    if (*direct) CHECK(gpu_stream_sync(S, err)); /* a capture error is not sticky */
    for (int r = -1; r < REPS; r++) {
        CHECK(gpu_event_record(E0, S, err));
        if (*direct) {
            for (int i = 0; i < n; i++)
                CHECK(fn(ctx, i, err));
        } else {
            CHECK(gpu_graph_launch(g, S, err));
        }
        CHECK(gpu_event_record(E1, S, err));
        CHECK(gpu_event_sync(E1, err));
        if (r >= 0) {
            CHECK(gpu_event_elapsed_ms(E0, E1, &t[r], err));
            t[r] /= (float)n;
        }
    }
    gpu_graph_free(g);
    qsort(t, REPS, sizeof t[0], bench_cmp_float);
    return t[REPS / 2];
}

/* ---- the paths ------------------------------------------------------------------------------- */
typedef struct bench_ctx {
    int t;
    int64_t n_out, n_in, n_tok;
    int copies;
    void **d_w;    /* copies of the matrix (device layout) */
    float *d_x;    /* [n_tok][n_in] */
    void *d_xq;    /* gpu_act_quantize(d_x, n_tok * n_in) */
    void **d_xq16; /* the same per chunk of MV_ROWS rows */
    void *d_f16;   /* fp16 scratch of one matrix */
    void *d_xc;    /* fp16 activations (gpu_gemm_ex) */
    float *d_y;    /* [n_tok][n_out] */
    gpu_blas *blas;
} bench_ctx;

static int op_actq(void *p, int i, forge_err *err)
{
    bench_ctx *c = (bench_ctx *)p;
    (void)i;
    return gpu_act_quantize(c->d_x, c->n_tok * c->n_in, c->d_xq, S, err);
}

static int op_mmq(void *p, int i, forge_err *err)
{
    bench_ctx *c = (bench_ctx *)p;
    return gpu_mmq(c->t, c->d_w[i % c->copies], c->n_out, c->n_in, c->n_tok, c->d_xq, c->d_y,
                   c->n_out, 0.0f, S, err);
}

static int op_w2h(void *p, int i, forge_err *err)
{
    bench_ctx *c = (bench_ctx *)p;
    return gpu_weight_to_f16(c->t, c->d_w[i % c->copies], c->n_out, c->n_in, c->d_f16, S, err);
}

static int op_cublas(void *p, int i, forge_err *err)
{
    bench_ctx *c = (bench_ctx *)p;
    int rc = op_w2h(p, i, err);
    if (rc == FORGE_OK)
        rc = gpu_gemm_ex(c->blas, GGML_TYPE_F16, c->d_f16, c->n_out, c->n_in, c->d_x, c->n_tok,
                         c->d_xc, c->d_y, 0.0f, S, err);
    return rc;
}

static int op_mv16(void *p, int i, forge_err *err)
{
    bench_ctx *c = (bench_ctx *)p;
    int rc = FORGE_OK;
    for (int64_t r0 = 0, k = 0; r0 < c->n_tok && rc == FORGE_OK; r0 += MV_ROWS, k++) {
        const int64_t n = c->n_tok - r0 < MV_ROWS ? c->n_tok - r0 : MV_ROWS;
        rc = gpu_matvec_multi(c->t, c->d_w[i % c->copies], c->n_out, c->n_in, n,
                              c->d_x + r0 * c->n_in, c->d_xq16[k], c->d_y + r0 * c->n_out, S, err);
    }
    return rc;
}

/* ---- one matrix at every n_tok ----------------------------------------------------------------
 */
static const int64_t g_toks[] = {16, 32, 64, 128, 256, 512};
#define N_TOKS (sizeof g_toks / sizeof g_toks[0])
static const char *g_tiles[] = {"128x64",  "64x64",   "64x32",   "32x32",   "64x16",
                                "32x16",   "64x64x2", "64x32x2", "64x64x4", "64x32x4",
                                "32x32x4", "64x16x4", "32x16x4"};
#define N_TILES (sizeof g_tiles / sizeof g_tiles[0])

static void bench_matrix(int t, int64_t n_out, int64_t n_in, gpu_blas *blas, int tiles)
{
    bench_ctx c;
    const size_t wbytes = gpu_weight_bytes(t, n_out, n_in);
    const size_t target = 8 * g_l2 > (512u << 20) ? 8 * g_l2 : (512u << 20);
    const int64_t max_tok = g_toks[N_TOKS - 1];
    memset(&c, 0, sizeof c);
    c.t = t;
    c.n_out = n_out;
    c.n_in = n_in;
    c.blas = blas;
    c.copies = (int)((target + wbytes - 1) / wbytes);
    if (c.copies > 64) c.copies = 64;
    if (c.copies < 2) c.copies = 2;
    c.d_w = (void **)calloc((size_t)c.copies, sizeof *c.d_w);
    c.d_xq16 = (void **)calloc((size_t)(max_tok / MV_ROWS + 1), sizeof *c.d_xq16);
    if (!c.d_w || !c.d_xq16) {
        fprintf(stderr, "FATAL: out of host memory\n");
        exit(2);
    }
    void *pool = upload_random(wbytes / 2 + 1, 1, 1.0f);
    for (int k = 0; k < c.copies; k++) {
        CHECK(gpu_malloc(&c.d_w[k], wbytes, err));
        CHECK(gpu_memcpy_d2d(c.d_w[k], pool, wbytes, S, err));
    }
    gpu_free(pool);
    c.d_x = (float *)upload_random((size_t)(max_tok * n_in), 0, 1.0f);
    CHECK(gpu_malloc(&c.d_xq, gpu_act_q8_bytes(max_tok * n_in), err));
    for (int64_t k = 0; k < max_tok / MV_ROWS; k++) {
        CHECK(gpu_malloc(&c.d_xq16[k], gpu_act_q8_bytes(MV_ROWS * n_in), err));
        CHECK(gpu_act_quantize(c.d_x + k * MV_ROWS * n_in, MV_ROWS * n_in, c.d_xq16[k], S, err));
    }
    CHECK(gpu_malloc((void **)&c.d_y, (size_t)(max_tok * n_out) * sizeof(float), err));
    if (blas) {
        CHECK(gpu_malloc(&c.d_f16, (size_t)(n_out * n_in) * 2, err));
        CHECK(gpu_malloc(&c.d_xc, (size_t)(max_tok * n_in) * 2, err));
    }

    const double wgb = (double)wbytes / 1e9;
    printf("\n%s %lld x %lld: %.1f MB of weights, %d copies rotated\n",
           t == GGML_TYPE_Q8_0 ? "Q8_0" : "Q4_0", (long long)n_out, (long long)n_in,
           (double)wbytes / 1e6, c.copies);
    if (blas) {
        int direct = 0;
        const float ms = time_calls(op_w2h, &c, c.copies, &direct);
        printf("  dequant to fp16 alone: %.1f us%s\n", ms * 1e3, direct ? " *" : "");
    }
    printf("  n_tok  actq us |  mmq us  wGB/s   TOPS | f16+cuBLAS us   TOPS |  mv16 us  wGB/s "
           "| mmq speedup: vs cuBLAS  vs mv16\n");
    for (size_t ti = 0; ti < N_TOKS; ti++) {
        int d_q = 0, d_m = 0, d_b = 0, d_v = 0;
        c.n_tok = g_toks[ti];
        const double ops = 2.0 * (double)n_out * (double)n_in * (double)c.n_tok;
        const float ms_q = time_calls(op_actq, &c, 16, &d_q);
        CHECK(gpu_act_quantize(c.d_x, c.n_tok * n_in, c.d_xq, S, err));
        const float ms_m = time_calls(op_mmq, &c, c.copies, &d_m);
        const float ms_b = blas ? time_calls(op_cublas, &c, c.copies, &d_b) : 0.0f;
        const float ms_v = time_calls(op_mv16, &c, c.copies, &d_v);
        char cub[48] = "      (no BLAS)      ", vs_b[16] = "     -";
        if (blas) {
            snprintf(cub, sizeof cub, "%12.1f%s %6.1f", ms_b * 1e3, d_b ? "*" : " ",
                     ops / (ms_b * 1e-3) / 1e12);
            snprintf(vs_b, sizeof vs_b, "%6.2fx", ms_b / ms_m);
        }
        printf("  %5lld %8.1f | %7.1f %6.0f %6.1f | %s | %8.1f %6.0f |          %s   %6.2fx\n",
               (long long)c.n_tok, ms_q * 1e3, ms_m * 1e3, wgb / (ms_m * 1e-3),
               ops / (ms_m * 1e-3) / 1e12, cub, ms_v * 1e3, wgb / (ms_v * 1e-3), vs_b, ms_v / ms_m);
    }
    if (tiles) {
        printf("  mmq us per forced tile (FORGE_GPU_MMQ_TILE):\n  n_tok");
        for (size_t k = 0; k < N_TILES; k++)
            printf(" %8s", g_tiles[k]);
        printf("\n");
        for (size_t ti = 0; ti < N_TOKS; ti++) {
            c.n_tok = g_toks[ti];
            CHECK(gpu_act_quantize(c.d_x, c.n_tok * n_in, c.d_xq, S, err));
            printf("  %5lld", (long long)c.n_tok);
            for (size_t k = 0; k < N_TILES; k++) {
                int direct = 0;
                setenv("FORGE_GPU_MMQ_TILE", g_tiles[k], 1);
                printf(" %8.1f", time_calls(op_mmq, &c, c.copies, &direct) * 1e3);
            }
            unsetenv("FORGE_GPU_MMQ_TILE");
            printf("\n");
        }
    }

    for (int k = 0; k < c.copies; k++)
        gpu_free(c.d_w[k]);
    for (int64_t k = 0; k < max_tok / MV_ROWS; k++)
        gpu_free(c.d_xq16[k]);
    gpu_free(c.d_x);
    gpu_free(c.d_xq);
    gpu_free(c.d_y);
    gpu_free(c.d_f16);
    gpu_free(c.d_xc);
    free(c.d_w);
    free(c.d_xq16);
}

int main(int argc, char **argv)
{
    gpu_device_info info;
    gpu_blas *blas = NULL;
    forge_err be = {0};
    const int tiles = argc > 1 && !strcmp(argv[1], "--tiles");
    CHECK(gpu_device_info_get(0, &info, err));
    g_l2 = info.l2_bytes;
    printf("device: %s (%s), %d SMs, L2 %.0f MiB\n", info.name, gpu_backend_name(), info.sm_count,
           info.l2_bytes / 1048576.0);
    CHECK(gpu_stream_create(&S, err));
    CHECK(gpu_event_create(&E0, 1, err));
    CHECK(gpu_event_create(&E1, 1, err));
    if (!gpu_mmq_supported(GGML_TYPE_Q4_0, 4096)) {
        printf("gpu_mmq is not available in this build or on this device: nothing to time\n");
    } else {
        if (gpu_blas_create(&blas, &be) != FORGE_OK) {
            printf("cuBLAS path skipped: %s\n", be.msg);
            blas = NULL;
        }
        static const int64_t shapes[][2] = {{4096, 4096}, {11008, 4096}, {4096, 11008}};
        static const int types[] = {GGML_TYPE_Q4_0, GGML_TYPE_Q8_0};
        for (size_t ti = 0; ti < sizeof types / sizeof types[0]; ti++)
            for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
                bench_matrix(types[ti], shapes[si][0], shapes[si][1], blas, tiles);
        gpu_blas_free(blas);
    }
    gpu_event_destroy(E0);
    gpu_event_destroy(E1);
    gpu_stream_destroy(S);
    return 0;
}
