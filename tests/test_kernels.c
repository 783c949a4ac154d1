/* test_kernels.c - the CPU kernels (src/cpu/kernels.h): thread pool, ISA selection, reference
 * quantizers, and kern_matmul for every weight type on every ISA this CPU has, against the
 * scalar kernels and a double-precision dequantize-then-dot reference.
 *
 * NMSE thresholds (SIMD vs scalar, and scalar vs the double reference on the same rounded
 * inputs) are 1e-9 for every type: all paths compute exactly the same products (integer block
 * sums for Q8_0/Q4_0) and differ only in the order of float additions, which for these sizes
 * gives ~1e-13. Against the original unrounded floats, the thresholds are per type (F32 1e-10,
 * F16 1e-6, BF16 1e-4, Q8_0 2e-4, Q4_0 2e-2; summed over all shapes). */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "testutil.h"
#include "core/fp16.h"
#include "core/util.h"
#include "cpu/kern_impl.h"
#include "cpu/kernels.h"
#include "forge_gguf.h"

#define SENTINEL_N 16
#define SENTINEL_V 12345.0f

/* ---- thread pool --------------------------------------------------------------------- */

typedef struct pool_probe {
    atomic_int calls[8];
    atomic_int wrong_nth;
    int nth_expected;
    int job;
} pool_probe;

static void probe_fn(void *arg, int ith, int nth)
{
    pool_probe *p = arg;
    if (nth != p->nth_expected || ith < 0 || ith >= nth) {
        atomic_fetch_add(&p->wrong_nth, 1);
        return;
    }
    /* make some threads slow so that an early return of kern_pool_run would show */
    if ((p->job + ith) % 7 == 0) {
        volatile double s = 0;
        for (int i = 0; i < 20000; i++)
            s += i;
        if (s < 0) atomic_fetch_add(&p->wrong_nth, 1); /* never: keeps the loop */
    }
    atomic_fetch_add(&p->calls[ith], 1);
}

static void test_pool_runs_each_ith_once(void **state)
{
    (void)state;
    const int sizes[] = {1, 2, 3, 5};
    for (size_t s = 0; s < FORGE_ARRAY_LEN(sizes); s++) {
        kern_pool *pool = NULL;
        forge_err err = {0};
        int n = sizes[s];
        assert_int_equal(kern_pool_create(n, &pool, &err), FORGE_OK);
        assert_int_equal(kern_pool_size(pool), n);
        pool_probe p;
        memset(&p, 0, sizeof p);
        p.nth_expected = n;
        for (int job = 0; job < 500; job++) {
            p.job = job;
            kern_pool_run(pool, probe_fn, &p);
            /* every call has returned before kern_pool_run does */
            for (int i = 0; i < n; i++)
                assert_int_equal(atomic_load(&p.calls[i]), job + 1);
        }
        assert_int_equal(atomic_load(&p.wrong_nth), 0);
        kern_pool_free(pool);
    }
    /* NULL pool: one call with ith 0 of 1 */
    pool_probe p;
    memset(&p, 0, sizeof p);
    p.nth_expected = 1;
    kern_pool_run(NULL, probe_fn, &p);
    assert_int_equal(atomic_load(&p.calls[0]), 1);
    kern_pool_free(NULL);
}

/* With no spinning every job wakes sleeping threads through the condition variable; with
 * pauses between jobs the spinning threads fall asleep too. Both paths must run every ith. */
static void test_pool_sleep_and_wake(void **state)
{
    (void)state;
    const char *spins[] = {"0", "50"};
    for (size_t k = 0; k < FORGE_ARRAY_LEN(spins); k++) {
        kern_pool *pool = NULL;
        pool_probe p;
        setenv("FORGE_SPIN_US", spins[k], 1);
        assert_int_equal(kern_pool_create(3, &pool, NULL), FORGE_OK);
        unsetenv("FORGE_SPIN_US");
        memset(&p, 0, sizeof p);
        p.nth_expected = 3;
        for (int job = 0; job < 60; job++) {
            p.job = job;
            if (job % 10 == 0) {
                struct timespec ts = {0, 300000}; /* 0.3 ms: longer than the 50 us spin */
                nanosleep(&ts, NULL);
            }
            kern_pool_run(pool, probe_fn, &p);
            for (int i = 0; i < 3; i++)
                assert_int_equal(atomic_load(&p.calls[i]), job + 1);
        }
        assert_int_equal(atomic_load(&p.wrong_nth), 0);
        kern_pool_free(pool);
    }
}

/* A share whose worker has not started it when the caller is done with its own is run by the
 * caller (so that a worker without a core does not hold up the job): with sleeping workers
 * (no spin) and an instant ith 0, the caller must take some of the other shares over 200 jobs,
 * each ith still exactly once per job. The pool used to wait for every worker. */
typedef struct steal_probe {
    pthread_t caller;
    atomic_int calls[3];
    atomic_int by_caller; /* calls of ith > 0 made on the caller's thread */
} steal_probe;

static void steal_fn(void *arg, int ith, int nth)
{
    steal_probe *p = arg;
    (void)nth;
    if (ith > 0 && pthread_equal(pthread_self(), p->caller)) atomic_fetch_add(&p->by_caller, 1);
    atomic_fetch_add(&p->calls[ith], 1);
}

static void test_pool_caller_runs_unstarted_shares(void **state)
{
    (void)state;
    kern_pool *pool = NULL;
    steal_probe p;
    memset(&p, 0, sizeof p);
    p.caller = pthread_self();
    setenv("FORGE_SPIN_US", "0", 1);
    assert_int_equal(kern_pool_create(3, &pool, NULL), FORGE_OK);
    unsetenv("FORGE_SPIN_US");
    for (int job = 0; job < 200; job++) {
        kern_pool_run(pool, steal_fn, &p);
        for (int i = 0; i < 3; i++)
            assert_int_equal(atomic_load(&p.calls[i]), job + 1);
    }
    assert_true(atomic_load(&p.by_caller) > 0);
    kern_pool_free(pool);
}

static void test_pool_rejects_bad_size(void **state)
{
    (void)state;
    kern_pool *pool = (kern_pool *)&pool;
    forge_err err = {0};
    assert_int_equal(kern_pool_create(0, &pool, &err), FORGE_E_INVALID);
    assert_null(pool);
    assert_true(err.msg[0] != '\0');
}

static void test_physical_cores(void **state)
{
    (void)state;
    int n = kern_physical_cores();
    assert_true(n >= 1 && n <= 4096);
}

/* ---- ISA selection ------------------------------------------------------------------- */

static void test_isa_selection(void **state)
{
    (void)state;
    forge_err err = {0};
    kern_isa best = kern_isa_best();
    print_message("best ISA: %s\n", kern_isa_name(best));
    assert_int_equal(kern_set_isa(KERN_ISA_SCALAR, &err), FORGE_OK);
    assert_int_equal(kern_isa_current(), KERN_ISA_SCALAR);
    assert_int_equal(kern_set_isa(best, &err), FORGE_OK);
    assert_int_equal(kern_isa_current(), best);
    assert_int_equal(kern_set_isa((kern_isa)99, &err), FORGE_E_INVALID);
#if defined(__x86_64__)
    assert_int_equal(kern_set_isa(KERN_ISA_NEON, &err), FORGE_E_UNSUPPORTED);
#else
    assert_int_equal(kern_set_isa(KERN_ISA_AVX2, &err), FORGE_E_UNSUPPORTED);
#endif
    assert_int_equal(kern_isa_current(), best);
    assert_string_equal(kern_isa_name(KERN_ISA_AVX512), "avx512");
}

/* The ISAs this CPU and build support, scalar first. */
static int usable_isas(kern_isa *out)
{
    int n = 0;
    for (int i = KERN_ISA_SCALAR; i <= KERN_ISA_NEON; i++)
        if (kern_set_isa((kern_isa)i, NULL) == FORGE_OK) out[n++] = (kern_isa)i;
    kern_set_isa(kern_isa_best(), NULL);
    return n;
}

/* ---- quantizers ---------------------------------------------------------------------- */

static void test_quantize_q8_0_hand_blocks(void **state)
{
    (void)state;
    float x[96];
    uint8_t q[3 * KERN_Q8_0_BYTES];
    /* block 0: all equal 0.5 -> d = 0.5/127, every q = 127 */
    for (int j = 0; j < 32; j++)
        x[j] = 0.5f;
    /* block 1: zeros -> d = 0, q = 0 */
    for (int j = 0; j < 32; j++)
        x[32 + j] = 0.0f;
    /* block 2: one max 2.54 at 7, -1 at 3 -> d = 0.02, q[7] = 127, q[3] = -50 */
    for (int j = 0; j < 32; j++)
        x[64 + j] = 0.0f;
    x[64 + 7] = 2.54f;
    x[64 + 3] = -1.0f;
    kern_quantize_row_q8_0(x, q, 96);
    assert_int_equal(kern_load_u16(q), forge_f32_to_fp16(0.5f / 127.0f));
    for (int j = 0; j < 32; j++)
        assert_int_equal((int8_t)q[2 + j], 127);
    assert_int_equal(kern_load_u16(q + 34), 0);
    for (int j = 0; j < 32; j++)
        assert_int_equal(q[34 + 2 + j], 0);
    assert_int_equal(kern_load_u16(q + 68), forge_f32_to_fp16(2.54f / 127.0f));
    for (int j = 0; j < 32; j++) {
        int want = j == 7 ? 127 : j == 3 ? -50 : 0;
        assert_int_equal((int8_t)q[68 + 2 + j], want);
    }
}

static void test_quantize_q4_0_hand_blocks(void **state)
{
    (void)state;
    float x[96];
    uint8_t q[3 * KERN_Q4_0_BYTES];
    /* block 0: all 1.0 -> max 1, d = -1/8, q = trunc(-8 + 8.5) = 0 */
    for (int j = 0; j < 32; j++)
        x[j] = 1.0f;
    /* block 1: zeros -> d = 0, q = 8 */
    for (int j = 0; j < 32; j++)
        x[32 + j] = 0.0f;
    /* block 2: max -4 (negative) -> d = 0.5, id = 2: -4 -> 0, 4 -> 16 -> 15, 1 -> 10,
     * -1.2 -> 6, 0 -> 8 */
    for (int j = 0; j < 32; j++)
        x[64 + j] = 0.0f;
    x[64 + 0] = -4.0f;
    x[64 + 20] = 4.0f;
    x[64 + 5] = 1.0f;
    x[64 + 17] = -1.2f;
    kern_quantize_row_q4_0(x, q, 96);
    assert_int_equal(kern_load_u16(q), forge_f32_to_fp16(-0.125f));
    for (int j = 0; j < 16; j++)
        assert_int_equal(q[2 + j], 0x00);
    assert_int_equal(kern_load_u16(q + 18), 0x8000); /* d = 0 / -8 = -0 */
    for (int j = 0; j < 16; j++)
        assert_int_equal(q[18 + 2 + j], 0x88);
    const uint8_t *b = q + 36;
    assert_int_equal(kern_load_u16(b), forge_f32_to_fp16(0.5f));
    int want[32];
    for (int j = 0; j < 32; j++)
        want[j] = 8;
    want[0] = 0;
    want[20] = 15;
    want[5] = 10;
    want[17] = 6;
    for (int j = 0; j < 16; j++) {
        assert_int_equal(b[2 + j] & 0x0f, want[j]);
        assert_int_equal(b[2 + j] >> 4, want[j + 16]);
    }
}

static void round_trip(int type, float scale, uint64_t seed)
{
    enum { N = 32 * 64 };
    float *x = malloc(N * sizeof *x), *y = malloc(N * sizeof *y);
    uint8_t *q = malloc(64 * KERN_Q8_0_BYTES);
    forge_err err = {0};
    assert_non_null(x);
    assert_non_null(y);
    assert_non_null(q);
    for (int i = 0; i < N; i++)
        x[i] = tu_rand_uniform(&seed) * scale * (1 + i % 5);
    size_t bb = type == GGML_TYPE_Q8_0 ? KERN_Q8_0_BYTES : KERN_Q4_0_BYTES;
    if (type == GGML_TYPE_Q8_0)
        kern_quantize_row_q8_0(x, q, N);
    else
        kern_quantize_row_q4_0(x, q, N);
    assert_int_equal(forge_dequantize(type, q, y, N, &err), FORGE_OK);
    /* Per element: q8: |err| <= d/2 + 127*|d - fp16(d)| < 0.6 |d|; q4: the clamp of +8 to 7 makes
     * the worst case |d| (+ fp16 rounding of d). */
    double bound_mul = type == GGML_TYPE_Q8_0 ? 0.6 : 1.01;
    for (int b = 0; b < N / 32; b++) {
        float d = fabsf(forge_fp16_to_f32(kern_load_u16(q + b * bb)));
        for (int j = 0; j < 32; j++) {
            double e = fabs((double)x[b * 32 + j] - (double)y[b * 32 + j]);
            if (e > bound_mul * d + 1e-30)
                fail_msg("type %d block %d elem %d: x %g dequant %g d %g", type, b, j,
                         (double)x[b * 32 + j], (double)y[b * 32 + j], (double)d);
        }
    }
    double nmse = tu_nmse(y, x, N);
    print_message("%s round trip NMSE %.3g\n", type == GGML_TYPE_Q8_0 ? "Q8_0" : "Q4_0", nmse);
    assert_true(nmse < (type == GGML_TYPE_Q8_0 ? 1e-4 : 2e-2));
    free(x);
    free(y);
    free(q);
}

static void test_quantize_round_trip(void **state)
{
    (void)state;
    round_trip(GGML_TYPE_Q8_0, 1.0f, 11);
    round_trip(GGML_TYPE_Q8_0, 1e-3f, 12);
    round_trip(GGML_TYPE_Q4_0, 1.0f, 13);
    round_trip(GGML_TYPE_Q4_0, 30.0f, 14);
}

/* ---- activation converters: every ISA must produce the scalar bytes exactly ------------- */

static kern_mm_kernel lookup_for(kern_isa isa, int type)
{
    switch (isa) {
    case KERN_ISA_AVX2:
        return kern_mm_lookup_avx2(type);
    case KERN_ISA_AVX512:
        return kern_mm_lookup_avx512(type);
    case KERN_ISA_NEON:
        return kern_mm_lookup_neon(type);
    default:
        return kern_mm_lookup_scalar(type);
    }
}

static void test_converters_exact(void **state)
{
    (void)state;
    enum { N = 32 * 40 };
    kern_isa isas[4];
    int n_isa = usable_isas(isas);
    const int types[] = {GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q8_0, GGML_TYPE_Q4_0};
    float *x = malloc(N * sizeof *x);
    uint8_t *a = malloc(N * 4), *b = malloc(N * 4);
    uint64_t seed = 99;
    assert_non_null(x);
    assert_non_null(a);
    assert_non_null(b);
    for (int i = 0; i < N; i++)
        x[i] = tu_rand_uniform(&seed) * (float)(1 << (i % 20)) * 1e-3f;
    /* edge cases: an all-zero block, exact halves after scaling, tiny (but normal: the
     * AVX512_BF16 converter flushes subnormals) and huge values */
    for (int j = 0; j < 32; j++)
        x[32 + j] = 0.0f;
    for (int j = 0; j < 32; j++)
        x[64 + j] = (float)(j - 16) * 0.5f;
    x[100] = 1e-30f;
    x[101] = -7e4f;
    for (size_t t = 0; t < FORGE_ARRAY_LEN(types); t++) {
        kern_mm_kernel ref = kern_mm_lookup_scalar(types[t]);
        size_t bytes = (size_t)(N / 32) * ref.xc_row_bytes_per_32;
        ref.cvt(x, a, N);
        for (int k = 1; k < n_isa; k++) {
            kern_mm_kernel kk = lookup_for(isas[k], types[t]);
            if (!kk.mm) continue; /* falls back to a lesser ISA */
            assert_int_equal(kk.xc_row_bytes_per_32, ref.xc_row_bytes_per_32);
            memset(b, 0xa5, bytes);
            kk.cvt(x, b, N);
            if (memcmp(a, b, bytes) != 0)
                fail_msg("%s converter for type %s differs from scalar", kern_isa_name(isas[k]),
                         ggml_type_name(types[t]));
        }
    }
    free(x);
    free(a);
    free(b);
}

/* The Q8_K activation converters the SIMD lookups hand out for the super-block types equal the
 * traits table's scalar one byte for byte: values, d, group sums; with a zero block, a block
 * whose largest magnitude appears first negative then positive (the first sets the sign), exact
 * halves after scaling, and a NaN (skipped by the maximum). */
static void test_q8_k_converters_exact(void **state)
{
    (void)state;
    enum { N = 256 * 6 };
    kern_isa isas[4];
    int n_isa = usable_isas(isas);
    const int types[] = {GGML_TYPE_Q2_K, GGML_TYPE_Q3_K, GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K,
                         GGML_TYPE_IQ4_XS, GGML_TYPE_TQ1_0, GGML_TYPE_TQ2_0};
    const size_t bytes = (size_t)(N / 256) * FORGE_Q8_K_BYTES;
    float *x = malloc(N * sizeof *x);
    uint8_t *a = malloc(bytes), *b = malloc(bytes);
    uint64_t seed = 7;
    assert_true(x && a && b);
    for (int i = 0; i < N; i++)
        x[i] = (tu_rand_uniform(&seed) - 0.5f) * (float)(1 << (i % 13)) * 1e-2f;
    for (int j = 0; j < 256; j++)
        x[256 + j] = 0.0f;
    x[512 + 3] = -1e4f;
    x[512 + 200] = 1e4f;
    for (int j = 0; j < 256; j++)
        x[768 + j] = (float)(j - 127) * 0.5f;
    x[1024 + 17] = NAN;
    forge_quantize_act_q8_k(x, a, N);
    int checked = 0;
    for (int k = 1; k < n_isa; k++) {
        for (size_t t = 0; t < FORGE_ARRAY_LEN(types); t++) {
            kern_mm_kernel kk = lookup_for(isas[k], types[t]);
            if (!kk.mm || !kk.cvt) continue; /* falls back to a lesser ISA */
            memset(b, 0xa5, bytes);
            kk.cvt(x, b, N);
            if (memcmp(a, b, bytes) != 0)
                fail_msg("%s Q8_K converter for %s differs from scalar", kern_isa_name(isas[k]),
                         ggml_type_name(types[t]));
            checked++;
        }
    }
    print_message("%d converters checked\n", checked);
    free(x);
    free(a);
    free(b);
}

/* ---- matmul -------------------------------------------------------------------------- */

static size_t row_bytes(int type, int64_t n)
{
    switch (type) {
    case GGML_TYPE_F32:
        return (size_t)n * 4;
    case GGML_TYPE_F16:
    case GGML_TYPE_BF16:
        return (size_t)n * 2;
    case GGML_TYPE_Q8_0:
        return (size_t)n / 32 * KERN_Q8_0_BYTES;
    default:
        return (size_t)n / 32 * KERN_Q4_0_BYTES;
    }
}

static void encode_row(int type, const float *x, uint8_t *dst, int64_t n)
{
    switch (type) {
    case GGML_TYPE_F32:
        memcpy(dst, x, (size_t)n * 4);
        break;
    case GGML_TYPE_F16:
        for (int64_t i = 0; i < n; i++)
            kern_store_u16(dst + 2 * i, forge_f32_to_fp16(x[i]));
        break;
    case GGML_TYPE_BF16:
        for (int64_t i = 0; i < n; i++)
            kern_store_u16(dst + 2 * i, forge_f32_to_bf16(x[i]));
        break;
    case GGML_TYPE_Q8_0:
        kern_quantize_row_q8_0(x, dst, n);
        break;
    default:
        kern_quantize_row_q4_0(x, dst, n);
        break;
    }
}

/* X as the kernel sees it: rounded to the weight type's dot-product type, back to float. */
static void round_activations(int type, const float *x, float *out, int64_t n)
{
    uint8_t *tmp = malloc((size_t)n * 4);
    assert_non_null(tmp);
    switch (type) {
    case GGML_TYPE_F32:
        memcpy(out, x, (size_t)n * 4);
        break;
    case GGML_TYPE_F16:
        for (int64_t i = 0; i < n; i++)
            out[i] = forge_fp16_to_f32(forge_f32_to_fp16(x[i]));
        break;
    case GGML_TYPE_BF16:
        for (int64_t i = 0; i < n; i++)
            out[i] = forge_bf16_to_f32(forge_f32_to_bf16(x[i]));
        break;
    default: {
        /* the activation layout: qs[n], then fp16-rounded block scales as floats */
        kern_cvt_q8_for_q8_0_scalar(x, tmp, n);
        const float *d = kern_xq_d(tmp, n);
        for (int64_t i = 0; i < n; i++)
            out[i] = (float)(int8_t)tmp[i] * d[i / 32];
        break;
    }
    }
    free(tmp);
}

static double max_abs_diff(const float *a, const float *b, size_t n)
{
    double m = 0;
    for (size_t i = 0; i < n; i++)
        m = fmax(m, fabs((double)a[i] - (double)b[i]));
    return m;
}

typedef struct mm_stats {
    double worst_simd[4];      /* per ISA, vs scalar */
    double worst_ref;          /* scalar vs double reference on rounded inputs */
    double orig_num, orig_den; /* scalar vs double reference on the original floats, over all
                                * shapes (one short dot product alone may cancel badly) */
} mm_stats;

static void check_matmul_type(int type, double orig_threshold)
{
    const int64_t n_outs[] = {1, 3, 17, 67};
    const int64_t n_ins[] = {32, 64, 96, 224, 4096 + 32};
    const int64_t n_toks[] = {1, 2, 5, 17};
    const int threads[] = {1, 3};
    kern_isa isas[4];
    int n_isa = usable_isas(isas);
    kern_pool *pools[2] = {NULL, NULL};
    mm_stats st;
    uint64_t seed = 1234 + (uint64_t)type;
    memset(&st, 0, sizeof st);
    for (int p = 0; p < 2; p++)
        assert_int_equal(kern_pool_create(threads[p], &pools[p], NULL), 0);

    for (size_t io = 0; io < FORGE_ARRAY_LEN(n_outs); io++)
        for (size_t ii = 0; ii < FORGE_ARRAY_LEN(n_ins); ii++)
            for (size_t it = 0; it < FORGE_ARRAY_LEN(n_toks); it++) {
                int64_t n_out = n_outs[io], n_in = n_ins[ii], n_tok = n_toks[it];
                size_t rb = row_bytes(type, n_in);
                float *wf = malloc((size_t)(n_out * n_in) * sizeof(float));
                float *wd = malloc((size_t)(n_out * n_in) * sizeof(float));
                uint8_t *wbuf = malloc(rb * (size_t)n_out + 1);
                float *xbuf = malloc((size_t)(n_tok * n_in + 1) * sizeof(float));
                float *xr = malloc((size_t)(n_tok * n_in) * sizeof(float));
                size_t ny = (size_t)(n_tok * n_out);
                float *yref = malloc(ny * sizeof(float)), *yorig = malloc(ny * sizeof(float));
                float *yscalar = malloc(ny * sizeof(float));
                float *y = malloc((ny + SENTINEL_N) * sizeof(float));
                assert_true(wf && wd && wbuf && xbuf && xr && yref && yorig && yscalar && y);
                uint8_t *w = wbuf + 1; /* deliberately unaligned */
                float *x = xbuf + 1;   /* not 8/16/32/64-byte aligned */
                for (int64_t i = 0; i < n_out * n_in; i++)
                    wf[i] = tu_rand_uniform(&seed);
                for (int64_t i = 0; i < n_tok * n_in; i++)
                    x[i] = tu_rand_uniform(&seed) * 2.0f;
                for (int64_t o = 0; o < n_out; o++)
                    encode_row(type, wf + o * n_in, w + o * rb, n_in);
                assert_int_equal(forge_dequantize(type, w, wd, n_out * n_in, NULL), FORGE_OK);
                for (int64_t t = 0; t < n_tok; t++)
                    round_activations(type, x + t * n_in, xr + t * n_in, n_in);
                for (int64_t t = 0; t < n_tok; t++)
                    for (int64_t o = 0; o < n_out; o++) {
                        double s = 0, so = 0;
                        for (int64_t i = 0; i < n_in; i++) {
                            s += (double)wd[o * n_in + i] * xr[t * n_in + i];
                            so += (double)wf[o * n_in + i] * x[t * n_in + i];
                        }
                        yref[t * n_out + o] = (float)s;
                        yorig[t * n_out + o] = (float)so;
                    }
                for (int k = 0; k < n_isa; k++) {
                    assert_int_equal(kern_set_isa(isas[k], NULL), FORGE_OK);
                    for (int p = 0; p < 2; p++) {
                        forge_err err = {0};
                        for (size_t i = 0; i < ny + (size_t)SENTINEL_N; i++)
                            y[i] = SENTINEL_V;
                        int rc = kern_matmul(pools[p], type, w, n_out, n_in, x, n_tok, y, &err);
                        if (rc != FORGE_OK) fail_msg("kern_matmul: %s", err.msg);
                        for (int i = 0; i < SENTINEL_N; i++)
                            if (y[ny + i] != SENTINEL_V)
                                fail_msg("%s %s: write past Y (n_out %lld n_tok %lld)",
                                         kern_isa_name(isas[k]), ggml_type_name(type),
                                         (long long)n_out, (long long)n_tok);
                        for (size_t i = 0; i < ny; i++)
                            if (!isfinite(y[i]) || y[i] == SENTINEL_V)
                                fail_msg("%s %s: Y[%zu] not written", kern_isa_name(isas[k]),
                                         ggml_type_name(type), i);
                        if (k == 0 && p == 0) {
                            memcpy(yscalar, y, ny * sizeof(float));
                            continue;
                        }
                        double e = tu_nmse(y, yscalar, ny);
                        if (e > st.worst_simd[k]) st.worst_simd[k] = e;
                        if (e > 1e-9)
                            fail_msg("%s %s %d threads n_out %lld n_in %lld n_tok %lld: NMSE %g "
                                     "vs scalar (max diff %g)",
                                     kern_isa_name(isas[k]), ggml_type_name(type), threads[p],
                                     (long long)n_out, (long long)n_in, (long long)n_tok, e,
                                     max_abs_diff(y, yscalar, ny));
                    }
                }
                double e = tu_nmse(yscalar, yref, ny);
                if (e > st.worst_ref) st.worst_ref = e;
                if (e > 1e-9)
                    fail_msg("scalar %s n_out %lld n_in %lld n_tok %lld: NMSE %g vs double ref",
                             ggml_type_name(type), (long long)n_out, (long long)n_in,
                             (long long)n_tok, e);
                for (size_t i = 0; i < ny; i++) {
                    double d = (double)yscalar[i] - yorig[i];
                    st.orig_num += d * d;
                    st.orig_den += (double)yorig[i] * yorig[i];
                }
                free(wf);
                free(wd);
                free(wbuf);
                free(xbuf);
                free(xr);
                free(yref);
                free(yorig);
                free(yscalar);
                free(y);
            }
    kern_set_isa(kern_isa_best(), NULL);
    double orig = st.orig_num / st.orig_den;
    print_message("%s: worst NMSE scalar vs double ref %.2g, vs unrounded %.2g",
                  ggml_type_name(type), st.worst_ref, orig);
    for (int k = 0; k < n_isa; k++)
        print_message(", %s%s vs scalar %.2g", kern_isa_name(isas[k]), k == 0 ? " 3 threads" : "",
                      st.worst_simd[k]);
    print_message("\n");
    for (int p = 0; p < 2; p++)
        kern_pool_free(pools[p]);
    assert_true(orig < orig_threshold);
}

static void test_matmul_f32(void **state)
{
    (void)state;
    check_matmul_type(GGML_TYPE_F32, 1e-10);
}
static void test_matmul_f16(void **state)
{
    (void)state;
    check_matmul_type(GGML_TYPE_F16, 1e-6);
}
static void test_matmul_bf16(void **state)
{
    (void)state;
    check_matmul_type(GGML_TYPE_BF16, 1e-4);
}
static void test_matmul_q8_0(void **state)
{
    (void)state;
    check_matmul_type(GGML_TYPE_Q8_0, 2e-4);
}
static void test_matmul_q4_0(void **state)
{
    (void)state;
    check_matmul_type(GGML_TYPE_Q4_0, 2e-2);
}

static void test_matmul_rejects_bad_args(void **state)
{
    (void)state;
    float x[64] = {0}, y[4] = {0};
    uint8_t w[256] = {0};
    forge_err err = {0};
    assert_int_equal(kern_matmul(NULL, GGML_TYPE_IQ2_XXS, w, 1, 256, x, 1, y, &err),
                     FORGE_E_UNSUPPORTED);
    assert_true(strstr(err.msg, "IQ2_XXS") != NULL);
    assert_false(kern_matmul_supported(GGML_TYPE_IQ2_XXS));
    assert_false(kern_matmul_supported(4)); /* a removed id */
    assert_true(kern_matmul_supported(GGML_TYPE_Q4_K));
    /* a K-quant row must be a multiple of 256 */
    assert_int_equal(kern_matmul(NULL, GGML_TYPE_Q4_K, w, 1, 64, x, 1, y, &err), FORGE_E_INVALID);
    assert_true(strstr(err.msg, "256") != NULL);
    assert_true(kern_matmul_supported(GGML_TYPE_Q4_0));
    assert_int_equal(kern_matmul(NULL, GGML_TYPE_F32, w, 1, 33, x, 1, y, &err), FORGE_E_INVALID);
    assert_true(strstr(err.msg, "33") != NULL);
    assert_int_equal(kern_matmul(NULL, GGML_TYPE_F32, w, 1, 32, NULL, 1, y, &err), FORGE_E_INVALID);
    assert_int_equal(kern_matmul(NULL, GGML_TYPE_F32, w, 0, 32, x, 1, y, &err), FORGE_OK);
}

/* kern_matmul_multi must give exactly (memcmp) what separate kern_matmul calls give: mixed
 * weight types (two Q8 conversions, F16, BF16, F32 at once), odd row counts, an empty matrix,
 * on every ISA, with pools of 1 and 3 threads, n_tok 1 (the decode path) and 5. */
static void test_matmul_multi_matches_separate(void **state)
{
    (void)state;
    typedef struct mm_set {
        int n;
        int types[5];
        int64_t n_outs[5];
    } mm_set;
    const mm_set sets[] = {
        {3, {GGML_TYPE_Q4_0, GGML_TYPE_Q4_0, GGML_TYPE_Q8_0}, {67, 17, 33}},
        {5,
         {GGML_TYPE_Q4_0, GGML_TYPE_F16, GGML_TYPE_F32, GGML_TYPE_BF16, GGML_TYPE_Q8_0},
         {50, 3, 1, 40, 16}},
        {2, {GGML_TYPE_F16, GGML_TYPE_Q4_0}, {0, 129}},
        {1, {GGML_TYPE_Q8_0}, {1}},
        /* big enough that the 3-thread chunks differ from those of each matrix alone */
        {3, {GGML_TYPE_Q4_0, GGML_TYPE_F16, GGML_TYPE_Q8_0}, {1000, 600, 77}},
    };
    const int64_t n_ins[] = {32, 96, 1056};
    const int64_t n_toks[] = {1, 5};
    const int threads[] = {1, 3};
    kern_isa isas[4];
    int n_isa = usable_isas(isas);
    kern_pool *pools[2] = {NULL, NULL};
    uint64_t seed = 99;
    int n_checked = 0;
    for (int p = 0; p < 2; p++)
        assert_int_equal(kern_pool_create(threads[p], &pools[p], NULL), 0);
    for (size_t is = 0; is < FORGE_ARRAY_LEN(sets); is++)
        for (size_t ii = 0; ii < FORGE_ARRAY_LEN(n_ins); ii++)
            for (size_t it = 0; it < FORGE_ARRAY_LEN(n_toks); it++) {
                const mm_set *set = &sets[is];
                int64_t n_in = n_ins[ii], n_tok = n_toks[it];
                uint8_t *w[5] = {NULL};
                float *ysep[5] = {NULL}, *ymul[5] = {NULL};
                kern_mm_desc d[5];
                float *x = malloc((size_t)(n_tok * n_in) * sizeof(float));
                float *row = malloc((size_t)n_in * sizeof(float));
                assert_true(x && row);
                for (int64_t i = 0; i < n_tok * n_in; i++)
                    x[i] = tu_rand_uniform(&seed) * 2.0f;
                for (int m = 0; m < set->n; m++) {
                    int64_t n_out = set->n_outs[m];
                    size_t rb = row_bytes(set->types[m], n_in), ny = (size_t)(n_tok * n_out);
                    w[m] = malloc(rb * (size_t)n_out + 1);
                    ysep[m] = malloc(ny * sizeof(float) + 1);
                    ymul[m] = malloc((ny + SENTINEL_N) * sizeof(float));
                    assert_true(w[m] && ysep[m] && ymul[m]);
                    for (int64_t o = 0; o < n_out; o++) {
                        for (int64_t i = 0; i < n_in; i++)
                            row[i] = tu_rand_uniform(&seed);
                        encode_row(set->types[m], row, w[m] + o * rb, n_in);
                    }
                    d[m] = (kern_mm_desc){set->types[m], w[m], n_out, ymul[m]};
                }
                for (int k = 0; k < n_isa; k++) {
                    assert_int_equal(kern_set_isa(isas[k], NULL), FORGE_OK);
                    for (int p = 0; p < 2; p++) {
                        forge_err err = {0};
                        for (int m = 0; m < set->n; m++) {
                            size_t ny = (size_t)(n_tok * set->n_outs[m]);
                            for (size_t i = 0; i < ny + SENTINEL_N; i++)
                                ymul[m][i] = SENTINEL_V;
                            int rc = kern_matmul(pools[p], set->types[m], w[m], set->n_outs[m],
                                                 n_in, x, n_tok, ysep[m], &err);
                            if (rc != FORGE_OK) fail_msg("kern_matmul: %s", err.msg);
                        }
                        int rc = kern_matmul_multi(pools[p], set->n, d, n_in, x, n_tok, &err);
                        if (rc != FORGE_OK) fail_msg("kern_matmul_multi: %s", err.msg);
                        for (int m = 0; m < set->n; m++) {
                            size_t ny = (size_t)(n_tok * set->n_outs[m]);
                            if (memcmp(ymul[m], ysep[m], ny * sizeof(float)) != 0)
                                fail_msg("%s set %zu matrix %d (%s, n_out %lld) n_in %lld n_tok "
                                         "%lld %d threads: differs from kern_matmul",
                                         kern_isa_name(isas[k]), is, m,
                                         ggml_type_name(set->types[m]),
                                         (long long)set->n_outs[m], (long long)n_in,
                                         (long long)n_tok, threads[p]);
                            for (int i = 0; i < SENTINEL_N; i++)
                                if (ymul[m][ny + (size_t)i] != SENTINEL_V)
                                    fail_msg("set %zu matrix %d: write past Y", is, m);
                        }
                        n_checked++;
                    }
                }
                for (int m = 0; m < set->n; m++) {
                    free(w[m]);
                    free(ysep[m]);
                    free(ymul[m]);
                }
                free(x);
                free(row);
            }
    kern_set_isa(kern_isa_best(), NULL);
    for (int p = 0; p < 2; p++)
        kern_pool_free(pools[p]);
    print_message("kern_matmul_multi: %d cases identical to separate kern_matmul calls\n",
                  n_checked);
}

static void test_matmul_multi_rejects_bad_args(void **state)
{
    (void)state;
    float x[64] = {0}, y[4] = {0};
    uint8_t w[256] = {0};
    forge_err err = {0};
    kern_mm_desc d[KERN_MM_MULTI_MAX + 1];
    for (int i = 0; i <= KERN_MM_MULTI_MAX; i++)
        d[i] = (kern_mm_desc){GGML_TYPE_F32, w, 1, y};
    assert_int_equal(kern_matmul_multi(NULL, 0, d, 32, x, 1, &err), FORGE_E_INVALID);
    assert_int_equal(kern_matmul_multi(NULL, KERN_MM_MULTI_MAX + 1, d, 32, x, 1, &err),
                     FORGE_E_INVALID);
    d[1].wtype = GGML_TYPE_IQ2_XXS;
    assert_int_equal(kern_matmul_multi(NULL, 2, d, 32, x, 1, &err), FORGE_E_UNSUPPORTED);
    d[1].wtype = GGML_TYPE_F32;
    d[1].Y = NULL;
    assert_int_equal(kern_matmul_multi(NULL, 2, d, 32, x, 1, &err), FORGE_E_INVALID);
    d[1].Y = y;
    assert_int_equal(kern_matmul_multi(NULL, 2, d, 33, x, 1, &err), FORGE_E_INVALID);
    assert_true(strstr(err.msg, "33") != NULL);
    assert_int_equal(kern_matmul_multi(NULL, 2, d, 32, NULL, 1, &err), FORGE_E_INVALID);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pool_runs_each_ith_once),
        cmocka_unit_test(test_pool_sleep_and_wake),
        cmocka_unit_test(test_pool_caller_runs_unstarted_shares),
        cmocka_unit_test(test_pool_rejects_bad_size),
        cmocka_unit_test(test_physical_cores),
        cmocka_unit_test(test_isa_selection),
        cmocka_unit_test(test_quantize_q8_0_hand_blocks),
        cmocka_unit_test(test_quantize_q4_0_hand_blocks),
        cmocka_unit_test(test_quantize_round_trip),
        cmocka_unit_test(test_converters_exact),
        cmocka_unit_test(test_q8_k_converters_exact),
        cmocka_unit_test(test_matmul_f32),
        cmocka_unit_test(test_matmul_f16),
        cmocka_unit_test(test_matmul_bf16),
        cmocka_unit_test(test_matmul_q8_0),
        cmocka_unit_test(test_matmul_q4_0),
        cmocka_unit_test(test_matmul_rejects_bad_args),
        cmocka_unit_test(test_matmul_multi_matches_separate),
        cmocka_unit_test(test_matmul_multi_rejects_bad_args),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
