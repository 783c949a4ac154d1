/* test_gpu_stress.c - the bug class of asynchronous GPU code: buffers freed or reused while work
 * that reads them is still queued, streams and contexts destroyed with work in flight, several
 * host threads driving their own streams. Every scenario checks the numbers at the end against a
 * CPU reference (NMSE), so a use-after-free or a lost ordering shows up as a wrong result (and
 * under compute-sanitizer as an error).
 *   test_gpu_stress [--quick]
 * Needs a GPU: run by scripts/gpu-run.sh. */
#include <pthread.h>

#include "core/fp16.h"
#include "gpu_test_util.h"

static int g_quick;

/* An n_out x n_in F16 matrix in device memory and its exact float values on the host. */
typedef struct mat {
    int64_t n_out, n_in;
    float *wf;
    void *d_w;
} mat;

static void mat_make(mat *m, int64_t n_out, int64_t n_in, uint64_t *seed, gpu_stream *s)
{
    size_t n = (size_t)(n_out * n_in);
    uint16_t *raw = (uint16_t *)gt_xmalloc(n * 2);
    m->n_out = n_out;
    m->n_in = n_in;
    m->wf = (float *)gt_xmalloc(n * 4);
    for (size_t i = 0; i < n; i++) {
        raw[i] = forge_f32_to_fp16(gt_uniform(seed));
        m->wf[i] = forge_fp16_to_f32(raw[i]);
    }
    m->d_w = gt_upload(raw, n * 2, s);
    GT_OK(gpu_stream_sync(s, err)); /* raw is freed next */
    free(raw);
}

static void mat_free(mat *m)
{
    gpu_free(m->d_w);
    free(m->wf);
}

static void mat_ref(const mat *m, const float *x, double *y)
{
    for (int64_t o = 0; o < m->n_out; o++) {
        double s = 0;
        for (int64_t i = 0; i < m->n_in; i++)
            s += (double)m->wf[o * m->n_in + i] * x[i];
        y[o] = s;
    }
}

/* 1. Per iteration: stream-ordered allocation of the input and output, a long matvec (repeated),
 *    the input freed right after the launches (its memory is then reused by the next
 *    iteration's allocations while earlier work may still run), the result copied to pinned
 *    memory and the output freed in stream order. Checked after one final synchronisation. */
static void scenario_reuse(gpu_stream *s, const mat *m, int iters)
{
    uint64_t seed = 11;
    float *x = (float *)gt_xmalloc((size_t)(iters * m->n_in) * 4);
    float *y_host = NULL;
    double *ref = (double *)gt_xmalloc((size_t)m->n_out * 8);
    GT_OK(gpu_host_alloc((void **)&y_host, (size_t)(iters * m->n_out) * 4, err));
    gt_fill(x, iters * m->n_in, 1.0f, &seed);
    for (int it = 0; it < iters; it++) {
        float *d_x = NULL, *d_y = NULL;
        void *d_junk = NULL;
        GT_OK(gpu_malloc_async((void **)&d_x, (size_t)m->n_in * 4, s, err));
        GT_OK(gpu_memcpy_h2d(d_x, x + (size_t)it * m->n_in, (size_t)m->n_in * 4, s, err));
        GT_OK(gpu_malloc_async((void **)&d_y, (size_t)m->n_out * 4, s, err));
        for (int r = 0; r < 4; r++)
            GT_OK(gpu_matvec(GGML_TYPE_F16, m->d_w, m->n_out, m->n_in, d_x, NULL, d_y, s, err));
        GT_OK(gpu_free_async(d_x, s, err));
        /* scribble over whatever memory the pool hands out next */
        GT_OK(gpu_malloc_async(&d_junk, (size_t)m->n_in * 4 * (1 + it % 3), s, err));
        GT_OK(gpu_memset(d_junk, 0x7f, (size_t)m->n_in * 4 * (1 + it % 3), s, err));
        GT_OK(gpu_memcpy_d2h(y_host + (size_t)it * m->n_out, d_y, (size_t)m->n_out * 4, s, err));
        GT_OK(gpu_free_async(d_y, s, err));
        GT_OK(gpu_free_async(d_junk, s, err));
    }
    GT_OK(gpu_stream_sync(s, err));
    double worst = 0;
    for (int it = 0; it < iters; it++) {
        mat_ref(m, x + (size_t)it * m->n_in, ref);
        double e = gt_nmse(y_host + (size_t)it * m->n_out, ref, m->n_out);
        if (!(e <= worst)) worst = e;
    }
    gt_report("stress", "stream-ordered alloc/free/reuse", worst, 5e-4, 1);
    gpu_host_free(y_host);
    free(x);
    free(ref);
}

/* 2. A context freed with work queued: the context's scratch (quantized activations) grows
 *    mid-way, so the old buffer is released while work that reads it is still queued; then the
 *    context is freed at once. The output belongs to the caller and must be right. */
static void scenario_ctx_free(const mat *m)
{
    uint64_t seed = 22;
    float *x = (float *)gt_xmalloc((size_t)m->n_in * 4),
          *y = (float *)gt_xmalloc((size_t)m->n_out * 4);
    double *ref = (double *)gt_xmalloc((size_t)m->n_out * 8);
    gt_fill(x, m->n_in, 1.0f, &seed);
    mat_ref(m, x, ref);
    gpu_ctx *c = NULL;
    float *d_y = (float *)gt_out_alloc((size_t)m->n_out * 4);
    GT_OK(gpu_ctx_create(&c, err));
    gpu_stream *s = gpu_ctx_stream(c);
    gt_out_prepare(d_y, (size_t)m->n_out * 4, s);
    void *d_x = NULL;
    GT_OK(gpu_ctx_scratch(c, (size_t)m->n_in * 4, &d_x, err));
    GT_OK(gpu_memcpy_h2d(d_x, x, (size_t)m->n_in * 4, s, err));
    for (int r = 0; r < 8; r++)
        GT_OK(
            gpu_matvec(GGML_TYPE_F16, m->d_w, m->n_out, m->n_in, (float *)d_x, NULL, d_y, s, err));
    /* grow: the old scratch is freed in stream order behind the matvecs above */
    void *d_x2 = NULL;
    GT_OK(gpu_ctx_scratch(c, (size_t)m->n_in * 4 * 3, &d_x2, err));
    GT_OK(gpu_memcpy_h2d(d_x2, x, (size_t)m->n_in * 4, s, err));
    for (int r = 0; r < 8; r++)
        GT_OK(
            gpu_matvec(GGML_TYPE_F16, m->d_w, m->n_out, m->n_in, (float *)d_x2, NULL, d_y, s, err));
    gpu_ctx_free(c); /* work still queued */
    int guard = gt_out_fetch(d_y, (size_t)m->n_out * 4, y, NULL);
    gt_report("stress", "context freed with work queued", gt_nmse(y, ref, m->n_out), 5e-4, guard);
    gpu_free(d_y);
    free(x);
    free(y);
    free(ref);
}

/* 3. A raw stream destroyed with work queued (inputs freed in its order first). */
static void scenario_stream_destroy(const mat *m)
{
    uint64_t seed = 33;
    float *x = (float *)gt_xmalloc((size_t)m->n_in * 4),
          *y = (float *)gt_xmalloc((size_t)m->n_out * 4);
    double *ref = (double *)gt_xmalloc((size_t)m->n_out * 8);
    gt_fill(x, m->n_in, 1.0f, &seed);
    mat_ref(m, x, ref);
    gpu_stream *s = NULL;
    float *d_y = (float *)gt_out_alloc((size_t)m->n_out * 4), *d_x = NULL;
    GT_OK(gpu_stream_create(&s, err));
    gt_out_prepare(d_y, (size_t)m->n_out * 4, s);
    GT_OK(gpu_malloc_async((void **)&d_x, (size_t)m->n_in * 4, s, err));
    GT_OK(gpu_memcpy_h2d(d_x, x, (size_t)m->n_in * 4, s, err));
    for (int r = 0; r < 16; r++)
        GT_OK(gpu_matvec(GGML_TYPE_F16, m->d_w, m->n_out, m->n_in, d_x, NULL, d_y, s, err));
    GT_OK(gpu_free_async(d_x, s, err));
    gpu_stream_destroy(s); /* returns at once; the queued work still completes */
    GT_OK(gpu_device_sync(err));
    int guard = gt_out_fetch(d_y, (size_t)m->n_out * 4, y, NULL);
    gt_report("stress", "stream destroyed with work queued", gt_nmse(y, ref, m->n_out), 5e-4,
              guard);
    gpu_free(d_y);
    free(x);
    free(y);
    free(ref);
}

/* 4. Two host threads, each with its own context (stream), quantized weights and fresh inputs
 *    every iteration, checked every iteration. */
typedef struct thread_job {
    int wtype, iters, id;
    int64_t n_out, n_in;
    double worst;
    int guard_ok;
} thread_job;

static void *thread_main(void *arg)
{
    thread_job *j = (thread_job *)arg;
    uint64_t seed = 1000 + (uint64_t)j->id;
    gpu_ctx *c = NULL;
    GT_OK(gpu_ctx_create(&c, err));
    gpu_stream *s = gpu_ctx_stream(c);
    /* weights: random Q8_0/Q4_0 blocks built here (small scales), uploaded and converted */
    int64_t nb = j->n_in / 32, bb = j->wtype == GGML_TYPE_Q8_0 ? 34 : 18;
    size_t raw_bytes = (size_t)(j->n_out * nb * bb);
    unsigned char *raw = (unsigned char *)gt_xmalloc(raw_bytes);
    float *wf = (float *)gt_xmalloc((size_t)(j->n_out * j->n_in) * 4);
    for (size_t i = 0; i < raw_bytes; i++)
        raw[i] = (unsigned char)gt_rand_u64(&seed);
    for (int64_t b = 0; b < j->n_out * nb; b++) {
        uint16_t d = forge_f32_to_fp16(0.01f * (1.0f + gt_uniform(&seed)));
        memcpy(raw + b * bb, &d, 2);
    }
    GT_OK(forge_dequantize(j->wtype, raw, wf, j->n_out * j->n_in, err));
    void *d_raw = gt_upload(raw, raw_bytes, s), *d_w = NULL, *d_xq = NULL;
    GT_OK(gpu_malloc(&d_w, gpu_weight_bytes(j->wtype, j->n_out, j->n_in), err));
    GT_OK(gpu_weight_convert(j->wtype, d_raw, d_w, j->n_out, j->n_in, s, err));
    GT_OK(gpu_free_async(d_raw, s, err));
    GT_OK(gpu_ctx_scratch(c, gpu_act_q8_bytes(j->n_in), &d_xq, err));
    float *x = (float *)gt_xmalloc((size_t)j->n_in * 4),
          *y = (float *)gt_xmalloc((size_t)j->n_out * 4);
    double *ref = (double *)gt_xmalloc((size_t)j->n_out * 8);
    float *d_x = (float *)gt_out_alloc((size_t)j->n_in * 4);
    float *d_y = (float *)gt_out_alloc((size_t)j->n_out * 4);
    j->worst = 0;
    j->guard_ok = 1;
    for (int it = 0; it < j->iters; it++) {
        gt_fill(x, j->n_in, 1.0f, &seed);
        for (int64_t o = 0; o < j->n_out; o++) {
            double acc = 0;
            for (int64_t i = 0; i < j->n_in; i++)
                acc += (double)wf[o * j->n_in + i] * x[i];
            ref[o] = acc;
        }
        gt_out_prepare(d_y, (size_t)j->n_out * 4, s);
        GT_OK(gpu_memcpy_h2d(d_x, x, (size_t)j->n_in * 4, s, err));
        GT_OK(gpu_act_quantize(d_x, j->n_in, d_xq, s, err));
        GT_OK(gpu_matvec(j->wtype, d_w, j->n_out, j->n_in, d_x, d_xq, d_y, s, err));
        j->guard_ok &= gt_out_fetch(d_y, (size_t)j->n_out * 4, y, s);
        double e = gt_nmse(y, ref, j->n_out);
        if (!(e <= j->worst)) j->worst = e;
    }
    gpu_ctx_free(c);
    gpu_free(d_w);
    gpu_free(d_x);
    gpu_free(d_y);
    free(raw);
    free(wf);
    free(x);
    free(y);
    free(ref);
    return NULL;
}

static void scenario_threads(int iters)
{
    thread_job jobs[2] = {{GGML_TYPE_Q4_0, iters, 0, 2048, 4096, 0, 0},
                          {GGML_TYPE_Q8_0, iters, 1, 1536, 2048, 0, 0}};
    pthread_t th[2];
    for (int i = 0; i < 2; i++)
        if (pthread_create(&th[i], NULL, thread_main, &jobs[i]) != 0) {
            fprintf(stderr, "FATAL: pthread_create\n");
            exit(2);
        }
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    gt_report("stress", "thread 1: Q4_0 2048x4096, own stream", jobs[0].worst, 5e-4,
              jobs[0].guard_ok);
    gt_report("stress", "thread 2: Q8_0 1536x2048, own stream", jobs[1].worst, 5e-4,
              jobs[1].guard_ok);
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--quick")) g_quick = 1;
    uint64_t seed = 7;
    gpu_stream *s = NULL;
    mat big;
    GT_OK(gpu_stream_create(&s, err));
    /* long enough that the host runs far ahead of the device */
    mat_make(&big, g_quick ? 1024 : 4096, 4096, &seed, s);
    scenario_reuse(s, &big, g_quick ? 8 : 100);
    scenario_ctx_free(&big);
    scenario_stream_destroy(&big);
    scenario_threads(g_quick ? 4 : 40);
    mat_free(&big);
    gpu_stream_destroy(s);
    printf("\ntest_gpu_stress%s: %d passed, %d failed\n", g_quick ? " --quick" : "", gt_pass,
           gt_fail);
    return gt_fail ? 1 : 0;
}
