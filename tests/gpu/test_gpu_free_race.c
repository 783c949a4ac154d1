/* test_gpu_free_race.c - the race a stream-ordered free exists to prevent, provoked on purpose:
 * long work is queued on stream 1, the last piece of which reads buffer A; A is freed at once with
 * the library's free (gpu_free_async; the context scratch's growth, which frees the old scratch);
 * then another stream allocates memory of A's size and overwrites it (memset to NaN) while
 * stream 1 is still busy. With frees in stream order the pool cannot hand A's memory to stream 2
 * before stream 1 has read it, so the result of the first work is right; with a free that
 * releases at once (`make gpu GPU_BROKEN_FREE=1`, -DFORGE_GPU_BROKEN_FREE) stream 2 gets A's
 * memory and the first work reads NaN: this test FAILS. (test_gpu_stress keeps everything on one
 * stream and passes either way.) Run it under compute-sanitizer memcheck too.
 *   test_gpu_free_race [--quick]     (--quick: smaller delay work, for the sanitizer)
 * Needs a GPU: run by scripts/gpu-lifetime-run.sh. */
#include <unistd.h>

#include "core/fp16.h"
#include "gpu_test_util.h"

static int g_quick;

typedef struct race {
    int64_t n_out, n_in;     /* the matrix A */
    int64_t d_out, d_in;     /* the delay matrix */
    int delay;               /* matvecs over the delay matrix queued before the read of A */
    uint16_t *a_host;        /* A, F16 */
    float *x;                /* n_in */
    double *ref;             /* A x */
    void *d_delay;           /* the delay matrix */
    float *d_x, *d_y, *d_dy; /* x, A x, the delay's output */
    float *h_y;              /* pinned: A x as read back in stream 1's order */
} race;

static void race_init(race *r, uint64_t *seed, gpu_stream *s)
{
    r->n_out = 1024;
    r->n_in = 4096;
    r->d_out = g_quick ? 1024 : 8192;
    r->d_in = 4096;
    r->delay = g_quick ? 48 : 400;
    const size_t na = (size_t)(r->n_out * r->n_in);
    r->a_host = (uint16_t *)gt_xmalloc(na * 2);
    float *af = (float *)gt_xmalloc(na * 4);
    for (size_t i = 0; i < na; i++) {
        r->a_host[i] = forge_f32_to_fp16(gt_uniform(seed));
        af[i] = forge_fp16_to_f32(r->a_host[i]);
    }
    r->x = (float *)gt_xmalloc((size_t)r->n_in * 4);
    gt_fill(r->x, r->n_in, 1.0f, seed);
    r->ref = (double *)gt_xmalloc((size_t)r->n_out * 8);
    for (int64_t o = 0; o < r->n_out; o++) {
        double acc = 0;
        for (int64_t i = 0; i < r->n_in; i++)
            acc += (double)af[o * r->n_in + i] * r->x[i];
        r->ref[o] = acc;
    }
    free(af);
    /* the delay matrix: any finite F16 values (0x2E2E ~ 0.1) */
    GT_OK(gpu_malloc(&r->d_delay, (size_t)(r->d_out * r->d_in) * 2, err));
    GT_OK(gpu_memset(r->d_delay, 0x2E, (size_t)(r->d_out * r->d_in) * 2, s, err));
    r->d_x = (float *)gt_upload(r->x, (size_t)r->n_in * 4, s);
    GT_OK(gpu_malloc((void **)&r->d_y, (size_t)r->n_out * 4, err));
    GT_OK(gpu_malloc((void **)&r->d_dy, (size_t)r->d_out * 4, err));
    GT_OK(gpu_host_alloc((void **)&r->h_y, (size_t)r->n_out * 4, err));
    GT_OK(gpu_stream_sync(s, err));
}

static void race_free(race *r)
{
    gpu_free(r->d_delay);
    gpu_free(r->d_x);
    gpu_free(r->d_y);
    gpu_free(r->d_dy);
    gpu_host_free(r->h_y);
    free(r->a_host);
    free(r->x);
    free(r->ref);
}

/* On s1: the delay work, then y = A x (A at d_a, uploaded and complete), then y to pinned
 * memory. Returns at once: everything is queued. */
static void queue_work(race *r, const void *d_a, gpu_stream *s1)
{
    for (int k = 0; k < r->delay; k++)
        GT_OK(gpu_matvec(GGML_TYPE_F16, r->d_delay, r->d_out, r->d_in, r->d_x, NULL, r->d_dy, s1,
                         err));
    GT_OK(gpu_matvec(GGML_TYPE_F16, d_a, r->n_out, r->n_in, r->d_x, NULL, r->d_y, s1, err));
    GT_OK(gpu_memcpy_d2h(r->h_y, r->d_y, (size_t)r->n_out * 4, s1, err));
}

/* The other writer: stream 2 allocates A's size from the pool and fills it with NaN at once,
 * while stream 1 is still busy (its queue is tens of milliseconds long). Returns whether the
 * pool handed out A's address. */
static int overwrite_from_other_stream(const void *d_a, size_t bytes, gpu_stream *s2)
{
    void *d_b = NULL;
    usleep(2000); /* a freed block becomes reusable once its free has executed */
    GT_OK(gpu_malloc_async(&d_b, bytes, s2, err));
    GT_OK(gpu_memset(d_b, 0xFF, bytes, s2, err));
    GT_OK(gpu_stream_sync(s2, err));
    GT_OK(gpu_free_async(d_b, s2, err));
    return d_b == d_a;
}

static void check(race *r, const char *what, int iter, int reused)
{
    char name[160];
    snprintf(name, sizeof name, "%s, round %d (stream 2 got A's address: %s)", what, iter,
             reused ? "yes" : "no");
    gt_report("free race", name, gt_nmse(r->h_y, r->ref, r->n_out), 5e-4, 1);
}

/* 1. A from the pool on s1, freed with gpu_free_async(A, s1) right after the work is queued. */
static void scenario_free_async(race *r, gpu_stream *s1, gpu_stream *s2, int rounds)
{
    const size_t bytes = (size_t)(r->n_out * r->n_in) * 2;
    for (int it = 0; it < rounds; it++) {
        void *d_a = NULL;
        GT_OK(gpu_malloc_async(&d_a, bytes, s1, err));
        GT_OK(gpu_memcpy_h2d(d_a, r->a_host, bytes, s1, err));
        GT_OK(gpu_stream_sync(s1, err)); /* A is complete before the long work starts */
        memset(r->h_y, 0, (size_t)r->n_out * 4);
        queue_work(r, d_a, s1);
        GT_OK(gpu_free_async(d_a, s1, err)); /* the library's free, work still queued */
        int reused = overwrite_from_other_stream(d_a, bytes, s2);
        GT_OK(gpu_stream_sync(s1, err));
        check(r, "gpu_free_async", it, reused);
    }
}

/* 2. A in a context's scratch; the scratch grows (the old one is freed by the library) while
 *    the work that reads it is queued. */
static void scenario_scratch_growth(race *r, gpu_stream *s2, int rounds)
{
    const size_t bytes = (size_t)(r->n_out * r->n_in) * 2;
    for (int it = 0; it < rounds; it++) {
        gpu_ctx *c = NULL;
        void *d_a = NULL, *d_big = NULL;
        GT_OK(gpu_ctx_create(&c, err));
        gpu_stream *s1 = gpu_ctx_stream(c);
        GT_OK(gpu_ctx_scratch(c, bytes, &d_a, err));
        GT_OK(gpu_memcpy_h2d(d_a, r->a_host, bytes, s1, err));
        GT_OK(gpu_stream_sync(s1, err));
        memset(r->h_y, 0, (size_t)r->n_out * 4);
        queue_work(r, d_a, s1);
        GT_OK(gpu_ctx_scratch(c, 2 * bytes, &d_big, err)); /* frees the old scratch */
        int reused = overwrite_from_other_stream(d_a, bytes, s2);
        GT_OK(gpu_stream_sync(s1, err));
        check(r, "gpu_ctx_scratch growth", it, reused);
        gpu_ctx_free(c);
    }
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--quick")) g_quick = 1;
    uint64_t seed = 2026;
    gpu_stream *s1 = NULL, *s2 = NULL;
    race r;
    memset(&r, 0, sizeof r);
    GT_OK(gpu_stream_create(&s1, err));
    GT_OK(gpu_stream_create(&s2, err));
    race_init(&r, &seed, s1);
    scenario_free_async(&r, s1, s2, 3);
    scenario_scratch_growth(&r, s2, 3);
    race_free(&r);
    gpu_stream_destroy(s1);
    gpu_stream_destroy(s2);
    printf("\ntest_gpu_free_race%s: %d passed, %d failed\n", g_quick ? " --quick" : "", gt_pass,
           gt_fail);
    return gt_fail ? 1 : 0;
}
