/* bench_gpu_matvec.c - memory bandwidth of the decode kernels against a device-to-device copy.
 * For each weight type and shape: enough copies of the matrix to exceed the L2 several times
 * (so that the numbers are DRAM, not cache), a captured graph of launches rotating through them,
 * timed with events over several replays (median). Bytes counted: the weights (plus the tiny
 * activation and output vectors). Also: the fused decode matvec (gpu_fused_matvec) on a 7B
 * layer's shapes for Q4_0, Q8_0, F16, Q4_K, Q5_K, Q6_K (weights' bytes only), attention over an
 * F16 KV cache, argmax over a vocabulary and the activation quantizer.
 *   bench_gpu_matvec [--tall]     --tall: only the matvec shapes with >= 8192 rows
 * Prints one table; needs a GPU (scripts/gpu-run.sh). Speed is measured here, never asserted. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "forge.h"
#include "gpu/gpu_ops.h"
#include "bench_gpu_util.h"

static gpu_stream *S;
static gpu_event *E0, *E1;
static unsigned char *g_host; /* random bytes, g_host_bytes long */
static size_t g_host_bytes;
static size_t g_l2;

static uint64_t rnd(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

/* Median over `reps` replays of graph g, in ms per replay. */
static float time_graph(gpu_graph *g, int reps)
{
    float t[16];
    if (reps > 16) reps = 16;
    CHECK(gpu_graph_launch(g, S, err)); /* warm-up */
    CHECK(gpu_stream_sync(S, err));
    for (int r = 0; r < reps; r++) {
        CHECK(gpu_event_record(E0, S, err));
        CHECK(gpu_graph_launch(g, S, err));
        CHECK(gpu_event_record(E1, S, err));
        CHECK(gpu_event_sync(E1, err));
        CHECK(gpu_event_elapsed_ms(E0, E1, &t[r], err));
    }
    qsort(t, (size_t)reps, sizeof t[0], bench_cmp_float);
    return t[reps / 2];
}

static double g_copy_bw;

static void bench_copy(size_t bytes)
{
    void *a = NULL, *b = NULL;
    gpu_graph *g = NULL;
    const int n = 10;
    CHECK(gpu_malloc(&a, bytes, err));
    CHECK(gpu_malloc(&b, bytes, err));
    for (size_t off = 0; off < bytes; off += g_host_bytes)
        CHECK(gpu_memcpy_h2d((char *)a + off, g_host,
                             bytes - off < g_host_bytes ? bytes - off : g_host_bytes, S, err));
    for (int kernel = 0; kernel < 2; kernel++) {
        CHECK(gpu_graph_begin(S, err));
        for (int i = 0; i < n; i++) {
            if (kernel)
                CHECK(gpu_copy(i % 2 ? a : b, i % 2 ? b : a, bytes, S, err));
            else
                CHECK(gpu_memcpy_d2d(i % 2 ? a : b, i % 2 ? b : a, bytes, S, err));
        }
        CHECK(gpu_graph_end(S, &g, err));
        float ms = time_graph(g, 7) / n;
        double bw = 2.0 * (double)bytes / (ms * 1e-3);
        printf("copy %-7s %5.0f MiB         %9.1f us  %8.1f GB/s (read + write)\n",
               kernel ? "kernel" : "memcpy", bytes / 1048576.0, ms * 1e3, bw / 1e9);
        if (bw > g_copy_bw) g_copy_bw = bw;
        gpu_graph_free(g);
    }
    gpu_free(a);
    gpu_free(b);
}

/* Random bytes on the device (g_host uploaded 4 times), copied from there into weights. */
static void *g_dpool;
static size_t g_dpool_bytes;

static void fill_device(void *d, size_t bytes)
{
    if (!g_dpool) {
        g_dpool_bytes = 4 * g_host_bytes;
        CHECK(gpu_malloc(&g_dpool, g_dpool_bytes, err));
        for (size_t off = 0; off < g_dpool_bytes; off += g_host_bytes)
            CHECK(gpu_memcpy_h2d((char *)g_dpool + off, g_host, g_host_bytes, S, err));
    }
    for (size_t off = 0; off < bytes; off += g_dpool_bytes)
        CHECK(gpu_memcpy_d2d((char *)d + off, g_dpool,
                             bytes - off < g_dpool_bytes ? bytes - off : g_dpool_bytes, S, err));
}

static void bench_matvec(int t, int64_t n_out, int64_t n_in, const char *label)
{
    size_t wbytes = gpu_weight_bytes(t, n_out, n_in);
    size_t target = 8 * g_l2 > (512u << 20) ? 8 * g_l2 : (512u << 20);
    int copies = (int)((target + wbytes - 1) / wbytes);
    if (copies > 64) copies = 64;
    if (copies < 2) copies = 2;
    void **d_w = (void **)calloc((size_t)copies, sizeof *d_w);
    float *d_x = NULL, *d_y = NULL;
    void *d_xq = NULL;
    gpu_graph *g = NULL;
    float *x = (float *)malloc((size_t)n_in * 4);
    uint64_t seed = 5;
    for (int64_t i = 0; i < n_in; i++)
        x[i] = (float)((rnd(&seed) >> 40) * (1.0 / 8388608.0) - 1.0);
    for (int c = 0; c < copies; c++) {
        CHECK(gpu_malloc(&d_w[c], wbytes, err));
        fill_device(d_w[c], wbytes);
    }
    CHECK(gpu_malloc((void **)&d_x, (size_t)n_in * 4, err));
    CHECK(gpu_malloc((void **)&d_y, (size_t)n_out * 4, err));
    CHECK(gpu_memcpy_h2d(d_x, x, (size_t)n_in * 4, S, err));
    if (t == GGML_TYPE_Q8_0 || t == GGML_TYPE_Q4_0) {
        CHECK(gpu_malloc(&d_xq, gpu_act_q8_bytes(n_in), err));
        CHECK(gpu_act_quantize(d_x, n_in, d_xq, S, err));
    }
    int launches = copies;
    while (launches < 64)
        launches += copies;
    CHECK(gpu_graph_begin(S, err));
    for (int i = 0; i < launches; i++)
        CHECK(gpu_matvec(t, d_w[i % copies], n_out, n_in, d_x, d_xq, d_y, S, err));
    CHECK(gpu_graph_end(S, &g, err));
    float ms = time_graph(g, 9) / launches;
    double bytes = (double)wbytes + n_in * 4.0 + n_out * 4.0;
    double bw = bytes / (ms * 1e-3);
    printf("matvec %-5s %-22s %6.1f MB %9.2f us %8.1f GB/s %5.1f%%\n", ggml_type_name(t), label,
           wbytes / 1e6, ms * 1e3, bw / 1e9, 100.0 * bw / g_copy_bw);
    gpu_graph_free(g);
    for (int c = 0; c < copies; c++)
        gpu_free(d_w[c]);
    free(d_w);
    gpu_free(d_x);
    gpu_free(d_y);
    gpu_free(d_xq);
    free(x);
}

/* The fused decode matvec (gpu_fused_matvec) on one 7B layer's shapes: n_mat matrices of
 * n_out x n_in sharing the input, as the backend launches them. */
static void bench_fused(int t, const char *label, int n_mat, int64_t n_out, int64_t n_in,
                        int in_mode, int out_mode)
{
    size_t wbytes = gpu_weight_bytes(t, n_out, n_in);
    if (wbytes == 0 || !gpu_fused_matvec_supported(t, n_in)) return;
    size_t set = wbytes * (size_t)n_mat;
    size_t target = 8 * g_l2 > (512u << 20) ? 8 * g_l2 : (512u << 20);
    int copies = (int)((target + set - 1) / set);
    if (copies > 32) copies = 32;
    if (copies < 2) copies = 2;
    void **d_w = (void **)calloc((size_t)copies * (size_t)n_mat, sizeof *d_w);
    float *d_x = NULL, *d_norm = NULL, *d_y = NULL;
    gpu_graph *g = NULL;
    float *x = (float *)malloc((size_t)n_in * 4);
    uint64_t seed = 7;
    for (int64_t i = 0; i < n_in; i++)
        x[i] = (float)((rnd(&seed) >> 40) * (1.0 / 8388608.0) - 1.0);
    for (int c = 0; c < copies * n_mat; c++) {
        CHECK(gpu_malloc(&d_w[c], wbytes, err));
        fill_device(d_w[c], wbytes);
    }
    CHECK(gpu_malloc((void **)&d_x, (size_t)n_in * 4, err));
    CHECK(gpu_malloc((void **)&d_norm, (size_t)n_in * 4, err));
    CHECK(gpu_malloc((void **)&d_y, (size_t)n_mat * (size_t)n_out * 4, err));
    CHECK(gpu_memcpy_h2d(d_x, x, (size_t)n_in * 4, S, err));
    CHECK(gpu_memcpy_h2d(d_norm, x, (size_t)n_in * 4, S, err));
    CHECK(gpu_memset(d_y, 0, (size_t)n_mat * (size_t)n_out * 4, S, err));
    int launches = copies;
    while (launches < 64)
        launches += copies;
    CHECK(gpu_graph_begin(S, err));
    for (int i = 0; i < launches; i++) {
        gpu_fmv_args a;
        memset(&a, 0, sizeof a);
        a.wtype = t;
        a.n_mat = n_mat;
        a.n_in = n_in;
        a.d_x = d_x;
        a.in_mode = in_mode;
        a.d_norm = d_norm;
        a.eps = 1e-5f;
        a.out_mode = out_mode;
        for (int m = 0; m < n_mat; m++) {
            a.mat[m].d_w = d_w[(i % copies) * n_mat + m];
            a.mat[m].n_out = n_out;
            a.mat[m].d_y = d_y + (size_t)m * (size_t)n_out;
        }
        CHECK(gpu_fused_matvec(&a, S, err));
    }
    CHECK(gpu_graph_end(S, &g, err));
    float ms = time_graph(g, 9) / launches;
    double bw = (double)set / (ms * 1e-3);
    printf("fused  %-5s %-22s %6.1f MB %9.2f us %8.1f GB/s %5.1f%%\n", ggml_type_name(t), label,
           set / 1e6, ms * 1e3, bw / 1e9, 100.0 * bw / g_copy_bw);
    gpu_graph_free(g);
    for (int c = 0; c < copies * n_mat; c++)
        gpu_free(d_w[c]);
    free(d_w);
    gpu_free(d_x);
    gpu_free(d_norm);
    gpu_free(d_y);
    free(x);
}

static void bench_attention(int64_t n_head, int64_t n_kv_head, int64_t hd, int64_t n_kv)
{
    size_t cache = (size_t)(n_kv * n_kv_head * hd) * 2; /* F16 */
    int copies = (int)((512u << 20) / (2 * cache)) + 1;
    if (copies > 32) copies = 32;
    void **d_k = (void **)calloc((size_t)copies, sizeof *d_k),
         **d_v = (void **)calloc((size_t)copies, sizeof *d_v);
    float *d_q = NULL, *d_out = NULL;
    int32_t *d_pos = NULL, pos = (int32_t)(n_kv - 1);
    void *d_scr = NULL;
    gpu_graph *g = NULL;
    for (int c = 0; c < copies; c++) {
        CHECK(gpu_malloc(&d_k[c], cache, err));
        CHECK(gpu_malloc(&d_v[c], cache, err));
        /* small random halves: random bytes would be NaN/Inf-heavy and the softmax meaningless */
        CHECK(gpu_memset(d_k[c], 0x21, cache, S, err));
        CHECK(gpu_memset(d_v[c], 0x22, cache, S, err));
    }
    CHECK(gpu_malloc((void **)&d_q, (size_t)(n_head * hd) * 4, err));
    CHECK(gpu_memset(d_q, 0x3c, (size_t)(n_head * hd) * 4, S, err));
    CHECK(gpu_malloc((void **)&d_out, (size_t)(n_head * hd) * 4, err));
    CHECK(gpu_malloc((void **)&d_pos, 4, err));
    CHECK(gpu_memcpy_h2d(d_pos, &pos, 4, S, err));
    CHECK(gpu_malloc(&d_scr, gpu_attn_scratch_bytes(n_head, hd, n_kv), err));
    int launches = copies;
    while (launches < 32)
        launches += copies;
    CHECK(gpu_graph_begin(S, err));
    for (int i = 0; i < launches; i++) {
        gpu_attn_args a = {d_q,
                           d_k[i % copies],
                           d_v[i % copies],
                           GGML_TYPE_F16,
                           n_kv_head * hd,
                           hd,
                           n_head,
                           n_kv_head,
                           hd,
                           d_pos,
                           n_kv,
                           0.088f,
                           d_scr,
                           d_out,
                           0.0f,
                           0};
        CHECK(gpu_attention(&a, S, err));
    }
    CHECK(gpu_graph_end(S, &g, err));
    float ms = time_graph(g, 7) / launches;
    double bw = 2.0 * cache / (ms * 1e-3);
    printf("attn  F16 h %lld/%lld hd %lld kv %-6lld %6.1f MB %9.2f us %8.1f GB/s %5.1f%%\n",
           (long long)n_head, (long long)n_kv_head, (long long)hd, (long long)n_kv, 2 * cache / 1e6,
           ms * 1e3, bw / 1e9, 100.0 * bw / g_copy_bw);
    gpu_graph_free(g);
    for (int c = 0; c < copies; c++) {
        gpu_free(d_k[c]);
        gpu_free(d_v[c]);
    }
    free(d_k);
    free(d_v);
    gpu_free(d_q);
    gpu_free(d_out);
    gpu_free(d_pos);
    gpu_free(d_scr);
}

static void bench_small(int64_t n_vocab, int64_t n_in)
{
    float *d_x = NULL;
    int32_t *d_i = NULL;
    void *d_xq = NULL;
    gpu_graph *g = NULL;
    const int n = 100;
    CHECK(gpu_malloc((void **)&d_x, (size_t)n_vocab * 4, err));
    CHECK(gpu_memset(d_x, 0x3f, (size_t)n_vocab * 4, S, err));
    CHECK(gpu_malloc((void **)&d_i, 4, err));
    CHECK(gpu_malloc(&d_xq, gpu_act_q8_bytes(n_in), err));
    CHECK(gpu_graph_begin(S, err));
    for (int i = 0; i < n; i++)
        CHECK(gpu_argmax(d_x, n_vocab, d_i, S, err));
    CHECK(gpu_graph_end(S, &g, err));
    printf("argmax n %lld                  %9.2f us\n", (long long)n_vocab,
           time_graph(g, 7) / n * 1e3);
    gpu_graph_free(g);
    CHECK(gpu_graph_begin(S, err));
    for (int i = 0; i < n; i++)
        CHECK(gpu_act_quantize(d_x, n_in, d_xq, S, err));
    CHECK(gpu_graph_end(S, &g, err));
    printf("act_quantize n %lld              %9.2f us\n", (long long)n_in,
           time_graph(g, 7) / n * 1e3);
    gpu_graph_free(g);
    gpu_free(d_x);
    gpu_free(d_i);
    gpu_free(d_xq);
}

int main(int argc, char **argv)
{
    int tall = argc > 1 && !strcmp(argv[1], "--tall");
    gpu_device_info info;
    CHECK(gpu_device_info_get(0, &info, err));
    g_l2 = info.l2_bytes;
    printf("device: %s, %d SMs, L2 %.0f MiB, %.1f GiB; peak from clocks %.0f GB/s\n", info.name,
           info.sm_count, info.l2_bytes / 1048576.0, info.total_mem / 1073741824.0,
           info.mem_bw_peak / 1e9);
    CHECK(gpu_stream_create(&S, err));
    CHECK(gpu_event_create(&E0, 1, err));
    CHECK(gpu_event_create(&E1, 1, err));
    g_host_bytes = (size_t)64 << 20;
    g_host = (unsigned char *)malloc(g_host_bytes);
    uint64_t seed = 1;
    for (size_t i = 0; i < g_host_bytes; i += 8) {
        uint64_t r = rnd(&seed);
        /* keep F16/BF16/F32 values finite: clear the top exponent bit of every 16-bit half */
        r &= 0xBFFFBFFFBFFFBFFFULL;
        memcpy(g_host + i, &r, 8);
    }
    bench_copy((size_t)1 << 30);
    bench_copy((size_t)4 << 30);

    static const struct {
        int64_t n_out, n_in;
        const char *label;
    } shapes[] = {
        {4096, 4096, "4096x4096"},
        {11008, 4096, "11008x4096 (up)"},
        {4096, 11008, "4096x11008 (down)"},
        {32000, 4096, "32000x4096 (out)"},
        {2048, 2048, "1b 2048x2048 (q,o)"},
        {512, 2048, "1b 512x2048 (k,v)"},
        {8192, 2048, "1b 8192x2048 (up)"},
        {2048, 8192, "1b 2048x8192 (down)"},
        {128256, 2048, "1b 128256x2048 (out)"},
    };
    static const int types[] = {GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q8_0,
                                GGML_TYPE_Q4_0};
    printf("\n%-6s %-5s %-22s %9s %12s %13s %6s\n", "op", "type", "shape (out x in)", "weights",
           "time", "bandwidth", "%copy");
    for (size_t t = 0; t < sizeof types / sizeof types[0]; t++)
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
            if (tall && shapes[s].n_out < 8192) continue;
            bench_matvec(types[t], shapes[s].n_out, shapes[s].n_in, shapes[s].label);
        }
    if (tall) goto done;
    printf("\n");
    static const int ftypes[] = {GGML_TYPE_Q4_0, GGML_TYPE_Q8_0, GGML_TYPE_F16,
                                 GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K};
    for (size_t t = 0; t < sizeof ftypes / sizeof ftypes[0]; t++) {
        bench_fused(ftypes[t], "7b qkv 3x4096x4096", 3, 4096, 4096, GPU_FMV_IN_RMSNORM,
                    GPU_FMV_OUT_STORE);
        bench_fused(ftypes[t], "7b o 4096x4096", 1, 4096, 4096, GPU_FMV_IN_PLAIN, GPU_FMV_OUT_ADD);
        bench_fused(ftypes[t], "7b gate+up 2x11008x4096", 2, 11008, 4096, GPU_FMV_IN_RMSNORM,
                    GPU_FMV_OUT_SWIGLU);
        bench_fused(ftypes[t], "7b down 4096x11008", 1, 4096, 11008, GPU_FMV_IN_PLAIN,
                    GPU_FMV_OUT_ADD);
    }
    printf("\n");
    bench_attention(32, 8, 128, 4096);
    bench_attention(32, 8, 128, 32768);
    bench_attention(32, 8, 64, 8192);
    bench_small(128256, 4096);
done:
    gpu_event_destroy(E0);
    gpu_event_destroy(E1);
    gpu_stream_destroy(S);
    gpu_free(g_dpool);
    free(g_host);
    return 0;
}
