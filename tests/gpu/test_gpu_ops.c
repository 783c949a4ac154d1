/* test_gpu_ops.c - op-by-op test of the GPU kernels (libforge_cuda) against CPU references, in
 * the spirit of ggml's test-backend-ops: every op, every weight type, several shapes including
 * odd ones; NMSE against a double-precision reference (1e-7 default, 5e-4 for matrix products
 * and attention); every output poisoned with NaN before the run and followed by sentinel bytes.
 * References: forge_dequantize for the weights, kern_matmul (the CPU engine) for matvec, and
 * plain double loops here.
 *   test_gpu_ops [--quick]      --quick: small shapes only (for compute-sanitizer runs)
 * Exit status 0 only when every check passed. Needs a GPU: run by scripts/gpu-run.sh. */
#include <dlfcn.h>
#include <limits.h>
#include <unistd.h>

#include "core/fp16.h"
#include "cpu/kernels.h"
#include "gpu_test_util.h"

#define THR_DEFAULT 1e-7
#define THR_MATMUL 5e-4

static int g_quick;
static gpu_stream *S;
static uint64_t g_seed = 0x9E3779B97F4A7C15ULL;

/* ---- weights: random floats -> GGUF bytes of the type -> exact float values -------------------
 */
static void *make_weights(int t, int64_t rows, int64_t n_in, float **wf_out)
{
    return gt_make_weights(t, rows, n_in, &g_seed, wf_out);
}

/* Block types: the GPU quantizes the activations to Q8_0 blocks for all of them. */
static int is_quant(int t)
{
    return ggml_type_block_size(t) > 1;
}

static void *upload_weights(int t, const void *raw, int64_t rows, int64_t n_in)
{
    return gt_upload_weights(t, raw, rows, n_in, S);
}

static void test_matvec(int t, int64_t n_out, int64_t n_in, kern_pool *pool)
{
    char what[96];
    float *wf = NULL;
    void *raw = make_weights(t, n_out, n_in, &wf);
    float *x = (float *)gt_xmalloc((size_t)n_in * 4);
    float *xdq = (float *)gt_xmalloc((size_t)n_in * 4);
    float *y = (float *)gt_xmalloc((size_t)n_out * 4);
    float *y_cpu = (float *)gt_xmalloc((size_t)n_out * 4);
    double *ref = (double *)gt_xmalloc((size_t)n_out * 8);
    double *ref_q = (double *)gt_xmalloc((size_t)n_out * 8);
    double *ref_cpu = (double *)gt_xmalloc((size_t)n_out * 8);
    void *d_xq = NULL;
    gt_fill(x, n_in, 1.0f, &g_seed);
    if (is_quant(t)) gt_ref_act_q8(x, n_in, xdq);
    for (int64_t o = 0; o < n_out; o++) {
        double s = 0, sq = 0;
        for (int64_t i = 0; i < n_in; i++) {
            s += (double)wf[o * n_in + i] * x[i];
            if (is_quant(t)) sq += (double)wf[o * n_in + i] * xdq[i];
        }
        ref[o] = s;
        ref_q[o] = sq;
    }

    void *d_w = upload_weights(t, raw, n_out, n_in);
    float *d_x = (float *)gt_upload(x, (size_t)n_in * 4, S);
    float *d_y = (float *)gt_out_alloc((size_t)n_out * 4);
    if (is_quant(t)) {
        GT_OK(gpu_malloc(&d_xq, gpu_act_q8_bytes(n_in), err));
        GT_OK(gpu_act_quantize(d_x, n_in, d_xq, S, err));
    }
    gt_out_prepare(d_y, (size_t)n_out * 4, S);
    GT_OK(gpu_matvec(t, d_w, n_out, n_in, d_x, d_xq, d_y, S, err));
    int guard = gt_out_fetch(d_y, (size_t)n_out * 4, y, S);

    /* For Q8_0/Q4_0 the activations are quantized (as on the CPU), so against the exact product
     * the error is that rounding, ~1.5e-5 on average; with a handful of outputs one unlucky
     * cancellation can exceed any bound, so that comparison needs enough rows. */
    if (!is_quant(t) || n_out >= 32) {
        snprintf(what, sizeof what, "%s %lldx%lld vs exact", ggml_type_name(t), (long long)n_out,
                 (long long)n_in);
        gt_report("matvec", what, gt_nmse(y, ref, n_out), THR_MATMUL, guard);
    }
    if (is_quant(t)) {
        snprintf(what, sizeof what, "%s %lldx%lld vs Q8_0-activation ref", ggml_type_name(t),
                 (long long)n_out, (long long)n_in);
        gt_report("matvec", what, gt_nmse(y, ref_q, n_out), THR_DEFAULT, guard);
    }
    /* the CPU kernel wants blocks of 32; for types whose CPU dot takes Q8_1/Q8_K activations
     * (not the GPU's Q8_0) the two roundings differ, so that comparison needs enough rows too */
    const int same_act = !is_quant(t) || t == GGML_TYPE_Q8_0 || t == GGML_TYPE_Q4_0;
    if (kern_matmul_supported(t) && n_in % 32 == 0 && (same_act || n_out >= 32)) {
        GT_OK(kern_matmul(pool, t, raw, n_out, n_in, x, 1, y_cpu, err));
        for (int64_t o = 0; o < n_out; o++)
            ref_cpu[o] = y_cpu[o];
        snprintf(what, sizeof what, "%s %lldx%lld vs CPU kern_matmul", ggml_type_name(t),
                 (long long)n_out, (long long)n_in);
        gt_report("matvec", what, gt_nmse(y, ref_cpu, n_out), THR_MATMUL, guard);
    }
    gpu_free(d_w);
    gpu_free(d_x);
    gpu_free(d_y);
    gpu_free(d_xq);
    free(raw);
    free(wf);
    free(x);
    free(xdq);
    free(y);
    free(y_cpu);
    free(ref);
    free(ref_q);
    free(ref_cpu);
}

static void test_embed(int t, int64_t n_vocab, int64_t n_embd)
{
    char what[96];
    float *wf = NULL;
    void *raw = make_weights(t, n_vocab, n_embd, &wf);
    int32_t ids[6] = {0,
                      (int32_t)n_vocab - 1,
                      7 % (int32_t)n_vocab,
                      7 % (int32_t)n_vocab,
                      (int32_t)(n_vocab / 2),
                      1 % (int32_t)n_vocab};
    int64_t n_tok = 6, n = n_tok * n_embd;
    float *out = (float *)gt_xmalloc((size_t)n * 4);
    double *ref = (double *)gt_xmalloc((size_t)n * 8);
    for (int64_t t2 = 0; t2 < n_tok; t2++)
        for (int64_t i = 0; i < n_embd; i++)
            ref[t2 * n_embd + i] = wf[ids[t2] * n_embd + i];
    void *d_w = upload_weights(t, raw, n_vocab, n_embd);
    int32_t *d_ids = (int32_t *)gt_upload(ids, sizeof ids, S);
    float *d_out = (float *)gt_out_alloc((size_t)n * 4);
    gt_out_prepare(d_out, (size_t)n * 4, S);
    GT_OK(gpu_embed(t, d_w, n_vocab, n_embd, d_ids, n_tok, d_out, S, err));
    int guard = gt_out_fetch(d_out, (size_t)n * 4, out, S);
    snprintf(what, sizeof what, "%s vocab %lld x %lld, 6 ids", ggml_type_name(t),
             (long long)n_vocab, (long long)n_embd);
    gt_report("embed", what, gt_nmse(out, ref, n), THR_DEFAULT, guard);

    /* an out-of-range id gives NaN, not a read outside the table */
    int32_t bad[2] = {(int32_t)n_vocab, -1};
    GT_OK(gpu_memcpy_h2d(d_ids, bad, sizeof bad, S, err));
    gt_out_prepare(d_out, (size_t)(2 * n_embd) * 4, S);
    GT_OK(gpu_embed(t, d_w, n_vocab, n_embd, d_ids, 2, d_out, S, err));
    guard = gt_out_fetch(d_out, (size_t)(2 * n_embd) * 4, out, S);
    int all_nan = 1;
    for (int64_t i = 0; i < 2 * n_embd; i++)
        all_nan &= isnan(out[i]);
    gt_check(all_nan && guard, "embed %s: out-of-range ids must give NaN rows", ggml_type_name(t));
    gpu_free(d_w);
    gpu_free(d_ids);
    gpu_free(d_out);
    free(raw);
    free(wf);
    free(out);
    free(ref);
}

static void test_rmsnorm(int64_t n, int64_t rows, int in_place)
{
    char what[96];
    int64_t total = n * rows;
    float *x = (float *)gt_xmalloc((size_t)total * 4), *w = (float *)gt_xmalloc((size_t)n * 4);
    float *y = (float *)gt_xmalloc((size_t)total * 4);
    double *ref = (double *)gt_xmalloc((size_t)total * 8);
    const float eps = 1e-5f;
    gt_fill(x, total, 3.0f, &g_seed);
    gt_fill(w, n, 1.0f, &g_seed);
    for (int64_t r = 0; r < rows; r++) {
        double ss = 0;
        for (int64_t i = 0; i < n; i++)
            ss += (double)x[r * n + i] * x[r * n + i];
        double sc = 1.0 / sqrt(ss / (double)n + eps);
        for (int64_t i = 0; i < n; i++)
            ref[r * n + i] = x[r * n + i] * sc * w[i];
    }
    float *d_x = (float *)gt_out_alloc((size_t)total * 4);
    float *d_w = (float *)gt_upload(w, (size_t)n * 4, S);
    float *d_y = in_place ? d_x : (float *)gt_out_alloc((size_t)total * 4);
    if (!in_place) gt_out_prepare(d_y, (size_t)total * 4, S);
    GT_OK(gpu_memset((char *)d_x + total * 4, GT_GUARD_BYTE, GT_GUARD_BYTES, S, err));
    GT_OK(gpu_memcpy_h2d(d_x, x, (size_t)total * 4, S, err));
    GT_OK(gpu_rmsnorm(d_x, d_w, d_y, n, rows, eps, S, err));
    int guard = gt_out_fetch(d_y, (size_t)total * 4, y, S);
    snprintf(what, sizeof what, "n %lld rows %lld%s", (long long)n, (long long)rows,
             in_place ? " in place" : "");
    gt_report("rmsnorm", what, gt_nmse(y, ref, total), THR_DEFAULT, guard);
    gpu_free(d_x);
    gpu_free(d_w);
    if (!in_place) gpu_free(d_y);
    free(x);
    free(w);
    free(y);
    free(ref);
}

static void test_rope(int64_t n_tok, int64_t n_heads, int64_t hd, int64_t n_dims, int mode,
                      const int32_t *pos, float base, float freq_scale, int with_ff)
{
    char what[96];
    int64_t total = n_tok * n_heads * hd;
    float *x = (float *)gt_xmalloc((size_t)total * 4), *y = (float *)gt_xmalloc((size_t)total * 4);
    float *ff = (float *)gt_xmalloc((size_t)(n_dims / 2) * 4);
    double *ref = (double *)gt_xmalloc((size_t)total * 8);
    gt_fill(x, total, 2.0f, &g_seed);
    for (int64_t i = 0; i < n_dims / 2; i++)
        ff[i] = 1.0f + (float)(i % 5);
    float theta_scale = powf(base, -2.0f / (float)n_dims); /* the spec: float, as ggml */
    for (int64_t i = 0; i < total; i++)
        ref[i] = x[i];
    for (int64_t t = 0; t < n_tok; t++)
        for (int64_t h = 0; h < n_heads; h++)
            for (int64_t i = 0; i < n_dims / 2; i++) {
                double th = (double)pos[t] * pow((double)theta_scale, (double)i);
                if (with_ff) th /= ff[i];
                th *= freq_scale;
                int64_t o = (t * n_heads + h) * hd;
                int64_t i0 = mode == GPU_ROPE_NEOX ? i : 2 * i;
                int64_t i1 = mode == GPU_ROPE_NEOX ? i + n_dims / 2 : 2 * i + 1;
                double x0 = x[o + i0], x1 = x[o + i1];
                ref[o + i0] = x0 * cos(th) - x1 * sin(th);
                ref[o + i1] = x0 * sin(th) + x1 * cos(th);
            }
    float *d_x = (float *)gt_out_alloc((size_t)total * 4);
    int32_t *d_pos = (int32_t *)gt_upload(pos, (size_t)n_tok * 4, S);
    float *d_ff = with_ff ? (float *)gt_upload(ff, (size_t)(n_dims / 2) * 4, S) : NULL;
    GT_OK(gpu_memset((char *)d_x + total * 4, GT_GUARD_BYTE, GT_GUARD_BYTES, S, err));
    GT_OK(gpu_memcpy_h2d(d_x, x, (size_t)total * 4, S, err));
    GT_OK(gpu_rope(d_x, n_tok, n_heads, hd, n_dims, mode, d_pos, base, freq_scale, d_ff, S, err));
    int guard = gt_out_fetch(d_x, (size_t)total * 4, y, S);
    snprintf(what, sizeof what, "%s tok %lld heads %lld hd %lld rot %lld pos %d%s%s",
             mode == GPU_ROPE_NEOX ? "NEOX" : "NORM", (long long)n_tok, (long long)n_heads,
             (long long)hd, (long long)n_dims, pos[0], with_ff ? " ff" : "",
             freq_scale != 1.0f ? " fscale" : "");
    gt_report("rope", what, gt_nmse(y, ref, total), THR_DEFAULT, guard);
    gpu_free(d_x);
    gpu_free(d_pos);
    gpu_free(d_ff);
    free(x);
    free(y);
    free(ff);
    free(ref);
}

static void test_elementwise(int64_t n)
{
    char what[96];
    float *a = (float *)gt_xmalloc((size_t)n * 4), *b = (float *)gt_xmalloc((size_t)n * 4);
    float *y = (float *)gt_xmalloc((size_t)n * 4);
    double *ref = (double *)gt_xmalloc((size_t)n * 8);
    gt_fill(a, n, 8.0f, &g_seed);
    gt_fill(b, n, 2.0f, &g_seed);
    float *d_a = (float *)gt_upload(a, (size_t)n * 4, S),
          *d_b = (float *)gt_upload(b, (size_t)n * 4, S);
    float *d_y = (float *)gt_out_alloc((size_t)n * 4);

    for (int64_t i = 0; i < n; i++)
        ref[i] = (double)a[i] / (1.0 + exp(-(double)a[i])) * b[i];
    gt_out_prepare(d_y, (size_t)n * 4, S);
    GT_OK(gpu_swiglu(d_a, d_b, d_y, n, S, err));
    int guard = gt_out_fetch(d_y, (size_t)n * 4, y, S);
    snprintf(what, sizeof what, "n %lld", (long long)n);
    gt_report("swiglu", what, gt_nmse(y, ref, n), THR_DEFAULT, guard);

    for (int64_t i = 0; i < n; i++)
        ref[i] = (double)a[i] + b[i];
    gt_out_prepare(d_y, (size_t)n * 4, S);
    GT_OK(gpu_add(d_a, d_b, d_y, n, S, err));
    guard = gt_out_fetch(d_y, (size_t)n * 4, y, S);
    gt_report("add", what, gt_nmse(y, ref, n), THR_DEFAULT, guard);

    /* in place, as the residual stream uses it: a += b */
    GT_OK(gpu_add(d_a, d_b, d_a, n, S, err));
    GT_OK(gpu_memcpy_d2h(y, d_a, (size_t)n * 4, S, err));
    GT_OK(gpu_stream_sync(S, err));
    gt_report("add", "in place", gt_nmse(y, ref, n), THR_DEFAULT, 1);
    gpu_free(d_a);
    gpu_free(d_b);
    gpu_free(d_y);
    free(a);
    free(b);
    free(y);
    free(ref);
}

/* gpu_copy: the 16-byte kernel path and the runtime fallback (odd size or alignment). */
static void test_copy(size_t bytes, size_t src_off)
{
    unsigned char *h = (unsigned char *)gt_xmalloc(bytes + src_off),
                  *back = (unsigned char *)gt_xmalloc(bytes);
    for (size_t i = 0; i < bytes + src_off; i++)
        h[i] = (unsigned char)gt_rand_u64(&g_seed);
    unsigned char *d_src = (unsigned char *)gt_upload(h, bytes + src_off, S);
    void *d_dst = gt_out_alloc(bytes);
    gt_out_prepare(d_dst, bytes, S);
    GT_OK(gpu_copy(d_dst, d_src + src_off, bytes, S, err));
    int guard = gt_out_fetch(d_dst, bytes, back, S);
    int same = memcmp(back, h + src_off, bytes) == 0;
    printf("copy      %zu bytes, source offset %zu: %s\n", bytes, src_off,
           same && guard ? "ok" : "FAIL");
    gt_check(same && guard, "gpu_copy %zu bytes offset %zu", bytes, src_off);
    gpu_free(d_src);
    gpu_free(d_dst);
    free(h);
    free(back);
}

/* kind: 0 random, 1 max at the end, 2 ties (first wins), 3 NaNs sprinkled, 4 all -inf */
static void test_argmax(int64_t n, int kind)
{
    float *x = (float *)gt_xmalloc((size_t)n * 4);
    gt_fill(x, n, 10.0f, &g_seed);
    if (kind == 1) x[n - 1] = 100.0f;
    if (kind == 2 && n >= 3) {
        x[n / 3] = 50.0f;
        x[n - 1] = 50.0f;
        x[n / 2] = 50.0f;
    }
    if (kind == 3)
        for (int64_t i = 0; i < n; i += 7)
            x[i] = NAN;
    if (kind == 4)
        for (int64_t i = 0; i < n; i++)
            x[i] = -INFINITY;
    int32_t want = 0;
    int have = 0;
    for (int64_t i = 0; i < n; i++)
        if (!isnan(x[i]) && (!have || x[i] > x[want])) {
            want = (int32_t)i;
            have = 1;
        }
    float *d_x = (float *)gt_upload(x, (size_t)n * 4, S);
    int32_t *d_i = (int32_t *)gt_out_alloc(4), got = -1;
    gt_out_prepare(d_i, 4, S);
    GT_OK(gpu_argmax(d_x, n, d_i, S, err));
    int guard = gt_out_fetch(d_i, 4, &got, S);
    printf("argmax    n %-8lld kind %d: got %d want %d  %s\n", (long long)n, kind, got, want,
           got == want && guard ? "ok" : "FAIL");
    gt_check(got == want && guard, "argmax n %lld kind %d", (long long)n, kind);
    gpu_free(d_x);
    gpu_free(d_i);
    free(x);
}

/* gpu_store_at captured in a graph and replayed for several positions, the position changing in
 * device memory between replays (the decode step's KV store): every row must equal what
 * gpu_store writes at that row's offset, rows not stored keep their poison, guard intact. */
static void test_store_at(int dst_type, int64_t n, int64_t n_pos)
{
    const size_t elt = dst_type == GGML_TYPE_F16 ? 2 : 4, row = (size_t)n * elt;
    const size_t bytes = (size_t)n_pos * row;
    float *x = (float *)gt_xmalloc((size_t)n * 4);
    unsigned char *want = (unsigned char *)gt_xmalloc(bytes),
                  *got = (unsigned char *)gt_xmalloc(bytes);
    gt_fill(x, n, 4.0f, &g_seed);
    float *d_x = (float *)gt_upload(x, (size_t)n * 4, S);
    void *d_want = gt_out_alloc(bytes), *d_got = gt_out_alloc(bytes);
    int32_t *d_pos = NULL, h_pos = 0;
    gpu_graph *g = NULL;
    GT_OK(gpu_malloc((void **)&d_pos, 4, err));
    gt_out_prepare(d_want, bytes, S);
    gt_out_prepare(d_got, bytes, S);
    GT_OK(gpu_memcpy_h2d(d_pos, &h_pos, 4, S, err));
    GT_OK(gpu_graph_begin(S, err));
    GT_OK(gpu_store_at(d_x, d_got, dst_type, n, d_pos, n, S, err));
    GT_OK(gpu_graph_end(S, &g, err));
    for (int64_t p = 0; p < n_pos; p += 2) { /* odd rows are never stored */
        h_pos = (int32_t)p;
        GT_OK(gpu_memcpy_h2d(d_pos, &h_pos, 4, S, err)); /* pageable: copied on return */
        GT_OK(gpu_graph_launch(g, S, err));
        GT_OK(gpu_store(d_x, (char *)d_want + (size_t)p * row, dst_type, n, S, err));
    }
    int guard = gt_out_fetch(d_want, bytes, want, S);
    guard &= gt_out_fetch(d_got, bytes, got, S);
    int same = memcmp(want, got, bytes) == 0;
    printf("store_at  %s n %lld, %lld rows, in a graph: %s\n",
           dst_type == GGML_TYPE_F16 ? "F16" : "F32", (long long)n, (long long)n_pos,
           same && guard ? "ok" : "FAIL");
    gt_check(same && guard, "gpu_store_at type %d n %lld", dst_type, (long long)n);
    gpu_graph_free(g);
    gpu_free(d_pos);
    gpu_free(d_x);
    gpu_free(d_want);
    gpu_free(d_got);
    free(x);
    free(want);
    free(got);
}

/* head_major: cache [kv_head][max_kv][hd], else [max_kv][kv_head][hd]. */
static void test_attention(int64_t n_head, int64_t n_kv_head, int64_t hd, int64_t n_kv,
                           int64_t max_kv, int kv_type, int head_major)
{
    char what[96];
    int64_t cache_n = max_kv * n_kv_head * hd;
    size_t esz = kv_type == GGML_TYPE_F16 ? 2 : 4;
    float *q = (float *)gt_xmalloc((size_t)(n_head * hd) * 4);
    float *kf = (float *)gt_xmalloc((size_t)cache_n * 4),
          *vf = (float *)gt_xmalloc((size_t)cache_n * 4);
    unsigned char *kraw = (unsigned char *)gt_xmalloc((size_t)cache_n * esz);
    unsigned char *vraw = (unsigned char *)gt_xmalloc((size_t)cache_n * esz);
    float *out = (float *)gt_xmalloc((size_t)(n_head * hd) * 4);
    double *ref = (double *)gt_xmalloc((size_t)(n_head * hd) * 8);
    double *sc = (double *)gt_xmalloc((size_t)n_kv * 8);
    int64_t pos_stride = head_major ? hd : n_kv_head * hd;
    int64_t head_stride = head_major ? max_kv * hd : hd;
    float scale = 1.0f / sqrtf((float)hd);
    gt_fill(q, n_head * hd, 2.0f, &g_seed);
    gt_fill(kf, cache_n, 1.0f, &g_seed);
    gt_fill(vf, cache_n, 1.0f, &g_seed);
    /* positions >= n_kv hold NaN: reading them would poison the result */
    for (int64_t p = n_kv; p < max_kv; p++)
        for (int64_t h = 0; h < n_kv_head; h++)
            for (int64_t d = 0; d < hd; d++) {
                kf[p * pos_stride + h * head_stride + d] = NAN;
                vf[p * pos_stride + h * head_stride + d] = NAN;
            }
    gt_kv_encode(kf, vf, cache_n, kv_type == GGML_TYPE_F16, kraw, vraw);
    int64_t g = n_head / n_kv_head;
    for (int64_t h = 0; h < n_head; h++) {
        int64_t kvh = h / g;
        double mx = -INFINITY, sum = 0;
        for (int64_t p = 0; p < n_kv; p++) {
            double s = 0;
            for (int64_t d = 0; d < hd; d++)
                s += (double)q[h * hd + d] * kf[p * pos_stride + kvh * head_stride + d];
            sc[p] = s * scale;
            if (sc[p] > mx) mx = sc[p];
        }
        for (int64_t p = 0; p < n_kv; p++)
            sum += (sc[p] = exp(sc[p] - mx));
        for (int64_t d = 0; d < hd; d++) {
            double o = 0;
            for (int64_t p = 0; p < n_kv; p++)
                o += sc[p] * vf[p * pos_stride + kvh * head_stride + d];
            ref[h * hd + d] = o / sum;
        }
    }
    int32_t pos = (int32_t)(n_kv - 1);
    void *d_k = gt_upload(kraw, (size_t)cache_n * esz, S),
         *d_v = gt_upload(vraw, (size_t)cache_n * esz, S);
    float *d_q = (float *)gt_upload(q, (size_t)(n_head * hd) * 4, S);
    int32_t *d_pos = (int32_t *)gt_upload(&pos, 4, S);
    float *d_out = (float *)gt_out_alloc((size_t)(n_head * hd) * 4);
    void *d_scratch = NULL;
    GT_OK(gpu_malloc(&d_scratch, gpu_attn_scratch_bytes(n_head, hd, max_kv), err));
    gt_out_prepare(d_out, (size_t)(n_head * hd) * 4, S);
    gpu_attn_args a = {d_q,       d_k, d_v,   kv_type, pos_stride, head_stride, n_head,
                       n_kv_head, hd,  d_pos, max_kv,  scale,      d_scratch,   d_out, 0.0f, 0};
    GT_OK(gpu_attention(&a, S, err));
    int guard = gt_out_fetch(d_out, (size_t)(n_head * hd) * 4, out, S);
    snprintf(what, sizeof what, "%s %s h %lld/%lld hd %lld kv %lld/%lld", ggml_type_name(kv_type),
             head_major ? "[h][p][d]" : "[p][h][d]", (long long)n_head, (long long)n_kv_head,
             (long long)hd, (long long)n_kv, (long long)max_kv);
    gt_report("attn", what, gt_nmse(out, ref, n_head * hd), THR_MATMUL, guard);
    gpu_free(d_k);
    gpu_free(d_v);
    gpu_free(d_q);
    gpu_free(d_pos);
    gpu_free(d_out);
    gpu_free(d_scratch);
    free(q);
    free(kf);
    free(vf);
    free(kraw);
    free(vraw);
    free(out);
    free(ref);
    free(sc);
}

static void test_gemm(gpu_blas *blas, int t, int64_t n_out, int64_t n_in, int64_t n_tok)
{
    char what[96];
    float *wf = NULL;
    void *raw = make_weights(t, n_out, n_in, &wf);
    float *x = (float *)gt_xmalloc((size_t)(n_tok * n_in) * 4);
    float *y = (float *)gt_xmalloc((size_t)(n_tok * n_out) * 4);
    double *ref = (double *)gt_xmalloc((size_t)(n_tok * n_out) * 8);
    gt_fill(x, n_tok * n_in, 1.0f, &g_seed);
    for (int64_t t2 = 0; t2 < n_tok; t2++)
        for (int64_t o = 0; o < n_out; o++) {
            double s = 0;
            for (int64_t i = 0; i < n_in; i++)
                s += (double)wf[o * n_in + i] * x[t2 * n_in + i];
            ref[t2 * n_out + o] = s;
        }
    void *d_w = upload_weights(t, raw, n_out, n_in);
    float *d_x = (float *)gt_upload(x, (size_t)(n_tok * n_in) * 4, S);
    float *d_y = (float *)gt_out_alloc((size_t)(n_tok * n_out) * 4);
    void *d_xc = NULL;
    GT_OK(gpu_malloc(&d_xc, (size_t)(n_tok * n_in) * 2, err));
    gt_out_prepare(d_y, (size_t)(n_tok * n_out) * 4, S);
    GT_OK(gpu_gemm(blas, t, d_w, n_out, n_in, d_x, n_tok, d_xc, d_y, S, err));
    int guard = gt_out_fetch(d_y, (size_t)(n_tok * n_out) * 4, y, S);
    snprintf(what, sizeof what, "%s %lldx%lld, %lld tokens", ggml_type_name(t), (long long)n_out,
             (long long)n_in, (long long)n_tok);
    gt_report("gemm", what, gt_nmse(y, ref, n_tok * n_out), THR_MATMUL, guard);
    gpu_free(d_w);
    gpu_free(d_x);
    gpu_free(d_y);
    gpu_free(d_xc);
    free(raw);
    free(wf);
    free(x);
    free(y);
    free(ref);
}

/* The prompt path for block types (backend matmul_impl): the matrix dequantized to fp16 rows by
 * gpu_weight_to_f16 (each value must be the CPU's dequantized value rounded to fp16, bit for
 * bit), then the F16 GEMM, against the exact product. */
static void test_gemm_quant(gpu_blas *blas, int t, int64_t n_out, int64_t n_in, int64_t n_tok)
{
    char what[96];
    float *wf = NULL;
    void *raw = make_weights(t, n_out, n_in, &wf);
    const int64_t nw = n_out * n_in;
    float *x = (float *)gt_xmalloc((size_t)(n_tok * n_in) * 4);
    float *y = (float *)gt_xmalloc((size_t)(n_tok * n_out) * 4);
    uint16_t *wh = (uint16_t *)gt_xmalloc((size_t)nw * 2);
    double *ref = (double *)gt_xmalloc((size_t)(n_tok * n_out) * 8);
    gt_fill(x, n_tok * n_in, 1.0f, &g_seed);
    for (int64_t t2 = 0; t2 < n_tok; t2++)
        for (int64_t o = 0; o < n_out; o++) {
            double s = 0;
            for (int64_t i = 0; i < n_in; i++)
                s += (double)wf[o * n_in + i] * x[t2 * n_in + i];
            ref[t2 * n_out + o] = s;
        }
    void *d_w = upload_weights(t, raw, n_out, n_in);
    float *d_x = (float *)gt_upload(x, (size_t)(n_tok * n_in) * 4, S);
    void *d_wh = gt_out_alloc((size_t)nw * 2);
    float *d_y = (float *)gt_out_alloc((size_t)(n_tok * n_out) * 4);
    void *d_xc = NULL;
    GT_OK(gpu_malloc(&d_xc, (size_t)(n_tok * n_in) * 2, err));
    gt_out_prepare(d_wh, (size_t)nw * 2, S);
    GT_OK(gpu_weight_to_f16(t, d_w, n_out, n_in, d_wh, S, err));
    int guard_w = gt_out_fetch(d_wh, (size_t)nw * 2, wh, S);
    int64_t bad = 0;
    for (int64_t i = 0; i < nw; i++)
        bad += wh[i] != forge_f32_to_fp16(wf[i]);
    gt_check(bad == 0 && guard_w, "weight_to_f16 %s %lldx%lld: %lld values differ from the CPU's "
             "dequantization rounded to fp16%s", ggml_type_name(t), (long long)n_out,
             (long long)n_in, (long long)bad, guard_w ? "" : " (guard bytes overwritten)");
    gt_out_prepare(d_y, (size_t)(n_tok * n_out) * 4, S);
    GT_OK(gpu_gemm(blas, GGML_TYPE_F16, d_wh, n_out, n_in, d_x, n_tok, d_xc, d_y, S, err));
    int guard = gt_out_fetch(d_y, (size_t)(n_tok * n_out) * 4, y, S);
    snprintf(what, sizeof what, "%s %lldx%lld, %lld tokens (to_f16 + F16)", ggml_type_name(t),
             (long long)n_out, (long long)n_in, (long long)n_tok);
    gt_report("gemm", what, gt_nmse(y, ref, n_tok * n_out), THR_MATMUL, guard);
    gpu_free(d_w);
    gpu_free(d_x);
    gpu_free(d_wh);
    gpu_free(d_y);
    gpu_free(d_xc);
    free(raw);
    free(wf);
    free(x);
    free(y);
    free(wh);
    free(ref);
}

/* The device layout holds exactly the bytes of the CPU's traits table (the backend refuses a
 * library that disagrees): 256 rows of 256 elements, where plane padding vanishes. */
static void test_geometry(int t)
{
    size_t got = gpu_weight_bytes(t, 256, 256), want = 256 * ggml_row_size(t, 256);
    gt_check(gpu_matvec_supported(t) && got == want,
             "layout %s: gpu_weight_bytes(256 x 256) = %zu, traits table says %zu",
             ggml_type_name(t), got, want);
}

/* Errors come back as Forge codes with a message, never as a crash. */
static void test_errors(void)
{
    forge_err e = {0};
    void *p = NULL;
    int rc;
    /* compute-sanitizer reports the (intended) failing cudaMalloc as an error: skipped there */
    if (!getenv("FORGE_GPU_TEST_UNDER_SANITIZER")) {
        rc = gpu_malloc(&p, (size_t)1 << 60, &e);
        gt_check(rc == FORGE_E_NOMEM && p == NULL && strstr(e.msg, "cudaMalloc") != NULL,
                 "huge gpu_malloc: want FORGE_E_NOMEM naming cudaMalloc, got %d '%s'", rc, e.msg);
        printf("errors    gpu_malloc(2^60): %s: %s\n", forge_status_name(rc), e.msg);
    }
    e = (forge_err){0};
    rc = gpu_matvec(GGML_TYPE_IQ2_XXS, &e, 4, 256, NULL, NULL, NULL, S, &e);
    gt_check(rc == FORGE_E_UNSUPPORTED && e.msg[0], "matvec IQ2_XXS: want UNSUPPORTED, got %d", rc);
    e = (forge_err){0}; /* a K-quant row that is no multiple of 256 */
    rc = gpu_matvec(GGML_TYPE_Q4_K, &e, 4, 320, NULL, &e, NULL, S, &e);
    gt_check(rc == FORGE_E_INVALID && strstr(e.msg, "256"), "matvec Q4_K n_in 320: got %d '%s'", rc,
             e.msg);
    e = (forge_err){0};
    rc = gpu_weight_convert(GGML_TYPE_Q8_0, &e, &e, 2, 33, S, &e);
    gt_check(rc == FORGE_E_UNSUPPORTED && e.msg[0], "convert Q8_0 n_in 33: got %d", rc);
    e = (forge_err){0};
    gpu_attn_args a = {0};
    a.d_q = (const float *)&e;
    a.d_k = a.d_v = &e;
    a.d_pos = (const int32_t *)&e;
    a.d_scratch = &e;
    a.d_out = (float *)&e;
    a.kv_type = GGML_TYPE_F32;
    a.n_head = 64;
    a.n_kv_head = 2;
    a.head_dim = 128;
    a.max_kv = 16;
    rc = gpu_attention(&a, S, &e);
    gt_check(rc == FORGE_E_INVALID && strstr(e.msg, "group"), "attention group 32: got %d '%s'", rc,
             e.msg);
    printf("errors    attention group 32: %s: %s\n", forge_status_name(rc), e.msg);
}

/* The engine's path: dlopen the library and take the table. */
static void test_dlopen(void)
{
    char exe[PATH_MAX], path[PATH_MAX + 64];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0) {
        gt_check(0, "readlink /proc/self/exe");
        return;
    }
    exe[n] = 0;
    char *slash = strrchr(exe, '/');
    if (slash) *slash = 0;
    snprintf(path, sizeof path, "%s/../../libforge_cuda.so", exe);
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    gt_check(h != NULL, "dlopen %s: %s", path, h ? "" : dlerror());
    if (!h) return;
    forge_gpu_get_api_fn get = (forge_gpu_get_api_fn)dlsym(h, "forge_gpu_get_api");
    const gpu_api *api = get ? get(GPU_API_VERSION) : NULL;
    gt_check(api && api->version == GPU_API_VERSION && api->matvec && api->attention,
             "forge_gpu_get_api(%d) through dlopen", GPU_API_VERSION);
    gt_check(get && get(GPU_API_VERSION + 1) == NULL, "an unknown API version gives NULL");
    int count = 0;
    forge_err e = {0};
    gt_check(api && api->device_count(&count, &e) == FORGE_OK && count >= 1,
             "device_count through the table: %d", count);
    dlclose(h);
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--quick")) g_quick = 1;
    gpu_device_info info;
    kern_pool *pool = NULL;
    GT_OK(gpu_device_info_get(0, &info, err));
    printf("device: %s (%s), cc %d.%d, %d SMs, warp %d, %.1f GiB, L2 %.0f MiB\n", info.name,
           gpu_backend_name(), info.cc_major, info.cc_minor, info.sm_count, info.warp_size,
           info.total_mem / 1073741824.0, info.l2_bytes / 1048576.0);
    GT_OK(gpu_stream_create(&S, err));
    GT_OK(kern_pool_create(4, &pool, err));

    static const int types[] = {GGML_TYPE_F32,  GGML_TYPE_F16,    GGML_TYPE_BF16,  GGML_TYPE_Q8_0,
                                GGML_TYPE_Q4_0, GGML_TYPE_Q4_K,   GGML_TYPE_Q6_K,  GGML_TYPE_Q5_K,
                                GGML_TYPE_Q4_1, GGML_TYPE_Q5_0,   GGML_TYPE_Q5_1,  GGML_TYPE_Q2_K,
                                GGML_TYPE_Q3_K, GGML_TYPE_IQ4_NL, GGML_TYPE_IQ4_XS, GGML_TYPE_TQ2_0,
                                GGML_TYPE_TQ1_0};
    static const int64_t mv_q[][2] = {{1, 32},    {3, 64},    {33, 96},    {5, 320},
                                      {8, 544},   {65, 4192}, {128, 2048}, {300, 11008},
                                      {6001, 96}, {8192, 64}}; /* tall: two rows per segment */
    static const int64_t mv_big[][2] = {{4096, 4096},  {512, 2048},   {2048, 8192},
                                        {11008, 4096}, {4096, 11008}, {32000, 4096}};
    static const int64_t mv_odd[][2] = {{3, 35}, {17, 13}, {5, 1}, {9, 100}, {2, 36}, {7, 1000}};
    /* super-blocks of 256: row lengths in multiples of 256 */
    static const int64_t mv_k[][2] = {{1, 256},   {3, 512},     {33, 768},  {5, 2560},
                                      {65, 4352}, {128, 2048},  {300, 11008}, {6001, 256},
                                      {8192, 256}, {2, 14336}};
    for (size_t ti = 0; ti < GT_LEN(types); ti++) {
        int t = types[ti];
        const int64_t qk = ggml_type_block_size(t);
        test_geometry(t);
        if (qk == 256) {
            for (size_t s = 0; s < GT_LEN(mv_k); s++)
                test_matvec(t, mv_k[s][0], mv_k[s][1], pool);
        } else {
            for (size_t s = 0; s < GT_LEN(mv_q); s++)
                test_matvec(t, mv_q[s][0], mv_q[s][1], pool);
        }
        /* the new block types: two of the large shapes (their reference quantizers are slow) */
        if (!g_quick)
            for (size_t s = 0; s < (ti < 5 ? GT_LEN(mv_big) : 2); s++)
                test_matvec(t, mv_big[s][0], mv_big[s][1], pool);
        if (!is_quant(t))
            for (size_t s = 0; s < GT_LEN(mv_odd); s++)
                test_matvec(t, mv_odd[s][0], mv_odd[s][1], pool);
        test_embed(t, 50, qk == 256 ? 256 : 96);
        test_embed(t, 7, qk == 256 ? 512 : 32);
        if (!g_quick) test_embed(t, 1000, 4096);
        if (!is_quant(t)) test_embed(t, 11, 13);
    }

    static const int64_t rn[][2] = {{1, 1}, {7, 3}, {256, 1}, {4096, 2}, {5000, 1}, {2048, 32}};
    for (size_t i = 0; i < GT_LEN(rn); i++) {
        test_rmsnorm(rn[i][0], rn[i][1], 0);
        test_rmsnorm(rn[i][0], rn[i][1], 1);
    }

    static const int32_t p0[] = {0}, p17[] = {17}, p511[] = {511, 512}, p3[] = {1000, 1, 2},
                         p4k[] = {4095};
    test_rope(1, 32, 128, 128, GPU_ROPE_NORM, p0, 10000.0f, 1.0f, 0);
    test_rope(1, 32, 128, 128, GPU_ROPE_NORM, p17, 10000.0f, 1.0f, 0);
    test_rope(1, 8, 64, 64, GPU_ROPE_NEOX, p17, 1000000.0f, 1.0f, 0);
    test_rope(2, 4, 128, 64, GPU_ROPE_NEOX, p511, 10000.0f, 1.0f, 0);
    test_rope(2, 4, 128, 96, GPU_ROPE_NORM, p511, 10000.0f, 0.25f, 0);
    test_rope(3, 14, 64, 64, GPU_ROPE_NORM, p3, 500000.0f, 1.0f, 1);
    test_rope(3, 2, 6, 6, GPU_ROPE_NEOX, p3, 10000.0f, 1.0f, 1);
    test_rope(1, 32, 64, 64, GPU_ROPE_NORM, p4k, 500000.0f, 1.0f, 1);

    static const int64_t ew[] = {1, 31, 4096, 100003};
    for (size_t i = 0; i < GT_LEN(ew); i++)
        test_elementwise(ew[i]);

    test_copy(16, 0);
    test_copy(1 << 20, 0);
    test_copy((64 << 20) + 48, 0);
    test_copy(1000, 3);
    test_copy(4096, 4);

    static const int64_t am[] = {1, 5, 1000, 32000, 128256, 151936};
    for (size_t i = 0; i < GT_LEN(am); i++)
        for (int kind = 0; kind < 5; kind++)
            test_argmax(am[i], kind);

    test_store_at(GGML_TYPE_F32, 1024, 6);
    test_store_at(GGML_TYPE_F16, 4096, 5);
    test_store_at(GGML_TYPE_F16, 37, 3);

    /* n_head, n_kv_head, head_dim, n_kv, max_kv, type, head-major */
    test_attention(1, 1, 64, 1, 16, GGML_TYPE_F32, 0);
    test_attention(4, 4, 32, 3, 3, GGML_TYPE_F16, 1);
    test_attention(14, 2, 64, 257, 300, GGML_TYPE_F32, 0);
    test_attention(8, 8, 80, 700, 1024, GGML_TYPE_F16, 1);
    test_attention(16, 1, 128, 100, 128, GGML_TYPE_F16, 0);
    test_attention(4, 1, 256, 513, 600, GGML_TYPE_F32, 1);
    test_attention(6, 3, 40, 256, 512, GGML_TYPE_F32, 0);
    test_attention(3, 1, 30, 77, 100, GGML_TYPE_F16, 0); /* unaligned dims: scalar tile path */
    test_attention(2, 2, 30, 40, 64, GGML_TYPE_F32, 1);
    test_attention(14, 2, 64, 500, 512, GGML_TYPE_F16, 0);   /* group 7 */
    test_attention(16, 8, 32, 3000, 3000, GGML_TYPE_F16, 0); /* several tiles per split */
    if (!g_quick) {
        test_attention(32, 8, 128, 1000, 2048, GGML_TYPE_F16, 1);
        test_attention(32, 8, 64, 4096, 4096, GGML_TYPE_F16, 0);
        test_attention(28, 4, 128, 3000, 8192, GGML_TYPE_F32, 1);
    }

    gpu_blas *blas = NULL;
    forge_err be = {0};
    if (gpu_blas_create(&blas, &be) == FORGE_OK) {
        static const int gt[] = {GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16};
        for (size_t i = 0; i < GT_LEN(gt); i++) {
            test_gemm(blas, gt[i], 64, 128, 5);
            test_gemm(blas, gt[i], 33, 96, 1);
            if (!g_quick) test_gemm(blas, gt[i], 300, 4096, 17);
        }
        /* every block type: n_tok 2..100, rows of 256 multiples (K-quants) or 32 multiples */
        for (size_t ti = 0; ti < GT_LEN(types); ti++) {
            const int t = types[ti];
            if (!is_quant(t)) continue;
            const int64_t qk = ggml_type_block_size(t);
            test_gemm_quant(blas, t, 64, 256, 2);
            test_gemm_quant(blas, t, 33, qk == 256 ? 768 : 96, 64);
            if (!g_quick) {
                test_gemm_quant(blas, t, 300, 4096, 17);
                test_gemm_quant(blas, t, 128, 2048, 100);
            }
        }
        gpu_blas_free(blas);
    } else {
        printf("gemm      skipped: %s\n", be.msg);
    }

    test_errors();
    test_dlopen();

    gpu_stream_destroy(S);
    kern_pool_free(pool);
    printf("\ntest_gpu_ops%s: %d passed, %d failed\n", g_quick ? " --quick" : "", gt_pass, gt_fail);
    return gt_fail ? 1 : 0;
}
