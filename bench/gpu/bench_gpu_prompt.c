/* bench_gpu_prompt.c - the kernels of the prompt pass (n_tok > 1): tensor-core prompt attention
 * (gpu_attention_prompt) against the split decode kernel over all queries
 * (gpu_attention_batch), the quantized -> fp16 weight dequantization before the GEMM
 * (gpu_weight_to_f16: Q4_0, Q8_0, Q4_K, Q5_K, Q6_K) and the cuBLAS GEMM itself (gpu_gemm, F16
 * weights).
 * Each op: one warm-up, then the median over several event-timed runs (each run a few calls).
 * Attention in TFLOP/s of the causal work (4 * head_dim flops per visible (query, position)
 * pair and head), dequantization in GB/s (quants + scales read, fp16 written; several copies
 * rotate so the numbers are DRAM, not L2), GEMM in TFLOP/s.
 *   bench_gpu_prompt
 * Prints one table; needs a GPU (scripts/gpu-run.sh). Speed is measured here, never asserted. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/fp16.h"
#include "forge.h"
#include "gpu/gpu_ops.h"
#include "bench_gpu_util.h"

#define REPS 9

static gpu_stream *S;
static gpu_event *E0, *E1;
static uint64_t g_seed = 0x243F6A8885A308D3ULL;

static void *upload_random(size_t n, int as_f16, float amp)
{
    return bench_upload_random(n, as_f16, amp, &g_seed, S);
}

/* The ops under test, behind one signature: run call number i. */
typedef void (*op_fn)(void *ctx, int i);

/* Median ms per call over REPS runs of `inner` calls, after one warm-up run. */
static float time_op(op_fn fn, void *ctx, int inner)
{
    float t[REPS];
    for (int i = 0; i < inner; i++)
        fn(ctx, i);
    CHECK(gpu_stream_sync(S, err));
    for (int r = 0; r < REPS; r++) {
        CHECK(gpu_event_record(E0, S, err));
        for (int i = 0; i < inner; i++)
            fn(ctx, i);
        CHECK(gpu_event_record(E1, S, err));
        CHECK(gpu_event_sync(E1, err));
        CHECK(gpu_event_elapsed_ms(E0, E1, &t[r], err));
        t[r] /= (float)inner;
    }
    qsort(t, REPS, sizeof t[0], bench_cmp_float);
    return t[REPS / 2];
}

/* ---- attention ---------------------------------------------------------------------------- */
typedef struct attn_ctx {
    gpu_attn_args a;
    int64_t n_q, q_stride;
    size_t scratch_bytes;
} attn_ctx;

static void run_prompt(void *p, int i)
{
    attn_ctx *c = (attn_ctx *)p;
    (void)i;
    CHECK(gpu_attention_prompt(&c->a, c->n_q, 0, c->q_stride, c->q_stride, S, err));
}

static void run_batch(void *p, int i)
{
    attn_ctx *c = (attn_ctx *)p;
    (void)i;
    CHECK(gpu_attention_batch(&c->a, c->n_q, c->q_stride, c->q_stride, c->scratch_bytes, S, err));
}

static void bench_attention(const char *label, int64_t n_head, int64_t n_kvh, int64_t hd,
                            int64_t n_q, int kv_type)
{
    attn_ctx c;
    const int f16 = kv_type == GGML_TYPE_F16;
    const int64_t row = n_head * hd;
    int32_t *pos = (int32_t *)malloc((size_t)n_q * 4);
    int32_t *d_pos = NULL;
    void *d_k = upload_random((size_t)(n_q * n_kvh * hd), f16, 1.0f);
    void *d_v = upload_random((size_t)(n_q * n_kvh * hd), f16, 1.0f);
    float *d_q = (float *)upload_random((size_t)(n_q * row), 0, 2.0f);
    float *d_out = NULL;
    void *d_scr = NULL;
    double flops = 0;
    for (int64_t i = 0; i < n_q; i++) {
        pos[i] = (int32_t)i;
        flops += 4.0 * (double)hd * (double)n_head * (double)(i + 1);
    }
    CHECK(gpu_malloc((void **)&d_pos, (size_t)n_q * 4, err));
    CHECK(gpu_memcpy_h2d(d_pos, pos, (size_t)n_q * 4, S, err));
    CHECK(gpu_malloc((void **)&d_out, (size_t)(n_q * row) * 4, err));
    memset(&c, 0, sizeof c);
    c.n_q = n_q;
    c.q_stride = row;
    /* room for 8 splits per query, more than the batch kernel picks at 512 queries */
    c.scratch_bytes = (size_t)(n_q * n_head * (hd + 2)) * 4 * 8;
    CHECK(gpu_malloc(&d_scr, c.scratch_bytes, err));
    c.a.d_q = d_q;
    c.a.d_k = d_k;
    c.a.d_v = d_v;
    c.a.kv_type = kv_type;
    c.a.pos_stride = n_kvh * hd;
    c.a.head_stride = hd;
    c.a.n_head = n_head;
    c.a.n_kv_head = n_kvh;
    c.a.head_dim = hd;
    c.a.d_pos = d_pos;
    c.a.max_kv = n_q;
    c.a.scale = 1.0f / sqrtf((float)hd);
    c.a.d_scratch = d_scr;
    c.a.d_out = d_out;
    float ms_b = time_op(run_batch, &c, 5);
    float ms_p = time_op(run_prompt, &c, 20);
    printf("attn %-22s %s n_q %lld  prompt %8.1f us %6.1f TFLOP/s | batch %8.1f us %6.1f TFLOP/s"
           " | x%.1f\n",
           label, f16 ? "F16" : "F32", (long long)n_q, ms_p * 1e3, flops / (ms_p * 1e-3) / 1e12,
           ms_b * 1e3, flops / (ms_b * 1e-3) / 1e12, ms_b / ms_p);
    gpu_free(d_k);
    gpu_free(d_v);
    gpu_free(d_q);
    gpu_free(d_out);
    gpu_free(d_scr);
    gpu_free(d_pos);
    free(pos);
}

/* ---- weight dequantization ------------------------------------------------------------------ */
#define W2H_COPIES 4
typedef struct w2h_ctx {
    int wtype;
    int64_t rows, n_in;
    void *d_w[W2H_COPIES], *d_out[W2H_COPIES];
} w2h_ctx;

static void run_w2h(void *p, int i)
{
    w2h_ctx *c = (w2h_ctx *)p;
    CHECK(gpu_weight_to_f16(c->wtype, c->d_w[i % W2H_COPIES], c->rows, c->n_in,
                            c->d_out[i % W2H_COPIES], S, err));
}

static void bench_w2h(int wtype, int64_t rows, int64_t n_in)
{
    w2h_ctx c;
    size_t wbytes = gpu_weight_bytes(wtype, rows, n_in);
    size_t obytes = (size_t)(rows * n_in) * 2;
    /* random quants; scales in the scales plane set to sane fp16 values */
    void *rnd = upload_random(wbytes / 2 + 1, 1, 1.0f);
    memset(&c, 0, sizeof c);
    c.wtype = wtype;
    c.rows = rows;
    c.n_in = n_in;
    for (int k = 0; k < W2H_COPIES; k++) {
        CHECK(gpu_malloc(&c.d_w[k], wbytes, err));
        CHECK(gpu_memcpy_d2d(c.d_w[k], rnd, wbytes, S, err));
        CHECK(gpu_malloc(&c.d_out[k], obytes, err));
    }
    float ms = time_op(run_w2h, &c, 2 * W2H_COPIES);
    double bytes = (double)wbytes + (double)obytes;
    printf("w2h  %-5s %6lld x %-6lld   %8.1f us  %7.1f GB/s (read %.1f MB + write %.1f MB)\n",
           ggml_type_name(wtype), (long long)rows, (long long)n_in, ms * 1e3,
           bytes / (ms * 1e-3) / 1e9, wbytes / 1e6, obytes / 1e6);
    for (int k = 0; k < W2H_COPIES; k++) {
        gpu_free(c.d_w[k]);
        gpu_free(c.d_out[k]);
    }
    gpu_free(rnd);
}

/* ---- GEMM ------------------------------------------------------------------------------------ */
typedef struct gemm_ctx {
    gpu_blas *blas;
    int64_t n_out, n_in, n_tok;
    void *d_w, *d_xc;
    float *d_x, *d_y;
} gemm_ctx;

static void run_gemm(void *p, int i)
{
    gemm_ctx *c = (gemm_ctx *)p;
    (void)i;
    CHECK(gpu_gemm(c->blas, GGML_TYPE_F16, c->d_w, c->n_out, c->n_in, c->d_x, c->n_tok, c->d_xc,
                   c->d_y, S, err));
}

static void bench_gemm(gpu_blas *blas, int64_t n_tok, int64_t n_out, int64_t n_in)
{
    gemm_ctx c;
    memset(&c, 0, sizeof c);
    c.blas = blas;
    c.n_out = n_out;
    c.n_in = n_in;
    c.n_tok = n_tok;
    c.d_w = upload_random((size_t)(n_out * n_in), 1, 0.1f);
    c.d_x = (float *)upload_random((size_t)(n_tok * n_in), 0, 1.0f);
    CHECK(gpu_malloc(&c.d_xc, (size_t)(n_tok * n_in) * 2, err));
    CHECK(gpu_malloc((void **)&c.d_y, (size_t)(n_tok * n_out) * 4, err));
    float ms = time_op(run_gemm, &c, 10);
    double flops = 2.0 * (double)n_tok * (double)n_out * (double)n_in;
    printf("gemm F16  %4lld x %5lld x %-5lld %8.1f us  %7.1f TFLOP/s (incl. fp32->fp16 of X)\n",
           (long long)n_tok, (long long)n_out, (long long)n_in, ms * 1e3,
           flops / (ms * 1e-3) / 1e12);
    gpu_free(c.d_w);
    gpu_free(c.d_x);
    gpu_free(c.d_xc);
    gpu_free(c.d_y);
}

int main(void)
{
    gpu_device_info info;
    gpu_blas *blas = NULL;
    forge_err be = {0};
    CHECK(gpu_device_info_get(0, &info, err));
    printf("device: %s (%s), %d SMs, L2 %.0f MiB\n", info.name, gpu_backend_name(), info.sm_count,
           info.l2_bytes / 1048576.0);
    CHECK(gpu_stream_create(&S, err));
    CHECK(gpu_event_create(&E0, 1, err));
    CHECK(gpu_event_create(&E1, 1, err));

    if (gpu_attention_prompt_supported(128, GGML_TYPE_F16)) {
        for (int f = 0; f < 2; f++) {
            int t = f ? GGML_TYPE_F32 : GGML_TYPE_F16;
            bench_attention("7B (32/32 hd 128)", 32, 32, 128, 512, t);
            bench_attention("1B (32/8 hd 64)", 32, 8, 64, 512, t);
        }
    } else {
        printf("attn skipped: gpu_attention_prompt is not available in this build\n");
    }

    static const int64_t shapes[][2] = {{4096, 4096}, {11008, 4096}};
    static const int w2h_types[] = {GGML_TYPE_Q4_0, GGML_TYPE_Q8_0, GGML_TYPE_Q4_K,
                                    GGML_TYPE_Q5_K, GGML_TYPE_Q6_K};
    for (size_t q = 0; q < sizeof w2h_types / sizeof w2h_types[0]; q++)
        for (size_t i = 0; i < 2; i++)
            bench_w2h(w2h_types[q], shapes[i][0], shapes[i][1]);

    if (gpu_blas_create(&blas, &be) == FORGE_OK) {
        bench_gemm(blas, 512, 4096, 4096);
        bench_gemm(blas, 512, 11008, 4096);
        gpu_blas_free(blas);
    } else {
        printf("gemm skipped: %s\n", be.msg);
    }

    gpu_event_destroy(E0);
    gpu_event_destroy(E1);
    gpu_stream_destroy(S);
    return 0;
}
