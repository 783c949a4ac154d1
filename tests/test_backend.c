/* test_backend.c - the CPU backend's ops, one by one, against plain double-precision loops
 * written here (rope NORM/NEOX with frequency factors and scaling, RMSNorm, causal GQA attention
 * with F32 and F16 caches, SwiGLU, bias, embedding rows, matmul on the fallback path), by NMSE.
 * A GPU backend gets the same ops checked against the CPU backend. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/fp16.h"
#include "cpu/kernels.h"
#include "testutil.h"

static uint64_t g_rng = 12345;

static void fill(float *x, int64_t n, float scale)
{
    for (int64_t i = 0; i < n; i++)
        x[i] = tu_rand_uniform(&g_rng) * scale;
}

/* a backend buffer holding n floats copied from host */
static be_buf *upload(backend *be, const float *x, int64_t n)
{
    be_buf *b = NULL;
    forge_err err = {0};
    assert_int_equal(be->ops->buf_create(be, n, &b, &err), 0);
    /* the interface has no upload op: go through get_rows of an F32 table, one row */
    be_weight table = {"t", GGML_TYPE_F32, n, 1, (uint64_t)n * 4, x, -1};
    const int32_t id = 0;
    assert_int_equal(be->ops->get_rows(be, b, &table, &id, 1, &err), 0);
    return b;
}

static float *download(backend *be, const be_buf *b, int64_t n)
{
    float *x = malloc((size_t)n * sizeof *x);
    forge_err err = {0};
    assert_int_equal(be->ops->buf_read(be, b, 0, n, x, &err), 0);
    return x;
}

static backend *make_backend(int threads, bool f32_math)
{
    backend *be = NULL;
    forge_err err = {0};
    assert_int_equal(backend_cpu_create(threads, f32_math, &be, &err), 0);
    return be;
}

static void test_rope(void **state)
{
    (void)state;
    backend *be = make_backend(1, false);
    forge_err err = {0};
    const int n_tok = 3, n_head = 2, hd = 16, n_rot = 12, pos0 = 7;
    const int64_t n = (int64_t)n_tok * n_head * hd;
    float x[3 * 2 * 16], ff[6];
    fill(x, n, 1.0f);
    for (int i = 0; i < n_rot / 2; i++)
        ff[i] = 1.0f + 0.5f * (float)i;
    be_weight freqs = {"rope_freqs", GGML_TYPE_F32, n_rot / 2, 1, sizeof ff, ff, -1};
    for (int mode = 0; mode < 2; mode++) {
        be_rope rp = {mode ? BE_ROPE_NEOX : BE_ROPE_NORM,
                      n_rot,
                      10000.0f,
                      0.5f,
                      mode ? &freqs : NULL,
                      0.0f,
                      1.0f,
                      {0, 0}};
        be_buf *b = upload(be, x, n);
        be_span_batch sb;
        int32_t pos[3];
        const be_batch *bt = be_span_batch_init(&sb, pos, n_tok, pos0, 64, NULL, 0);
        assert_int_equal(be->ops->rope(be, b, n_head, hd, bt, &rp, &err), 0);
        float *got = download(be, b, n);
        float want[3 * 2 * 16];
        memcpy(want, x, sizeof want);
        for (int t = 0; t < n_tok; t++)
            for (int h = 0; h < n_head; h++) {
                float *v = want + ((size_t)t * n_head + h) * hd;
                const float *src = x + ((size_t)t * n_head + h) * hd;
                for (int i = 0; i < n_rot / 2; i++) {
                    double theta =
                        (pos0 + t) * pow(10000.0, -2.0 * i / n_rot) * 0.5 / (mode ? ff[i] : 1.0);
                    int a = mode ? i : 2 * i, bb = mode ? i + n_rot / 2 : 2 * i + 1;
                    v[a] = (float)(src[a] * cos(theta) - src[bb] * sin(theta));
                    v[bb] = (float)(src[a] * sin(theta) + src[bb] * cos(theta));
                }
            }
        assert_true(tu_nmse(got, want, (size_t)n) < 1e-10);
        /* dims past n_rot are untouched */
        for (int i = n_rot; i < hd; i++)
            assert_float_equal(got[i], x[i], 0);
        free(got);
        be->ops->buf_free(be, b);
    }
    be->ops->destroy(be);
}

static void test_rms_norm_swiglu_bias(void **state)
{
    (void)state;
    backend *be = make_backend(2, false);
    forge_err err = {0};
    enum { R = 5, D = 48 };
    float x[R * D], w[D], g[R * D], u[R * D];
    fill(x, R * D, 3.0f);
    fill(w, D, 1.0f);
    fill(g, R * D, 4.0f);
    fill(u, R * D, 1.0f);
    be_weight wt = {"norm", GGML_TYPE_F32, D, 1, sizeof w, w, -1};
    be_buf *bx = upload(be, x, R * D), *bg = upload(be, g, R * D), *bu = upload(be, u, R * D);
    assert_int_equal(be->ops->rms_norm(be, bx, bx, &wt, R, D, 1e-5f, &err), 0);
    float *got = download(be, bx, R * D), want[R * D];
    for (int r = 0; r < R; r++) {
        double ss = 0;
        for (int i = 0; i < D; i++)
            ss += (double)x[r * D + i] * x[r * D + i];
        double sc = 1.0 / sqrt(ss / D + 1e-5);
        for (int i = 0; i < D; i++)
            want[r * D + i] = (float)(x[r * D + i] * sc * w[i]);
    }
    assert_true(tu_nmse(got, want, R * D) < 1e-12);
    free(got);
    /* bias on R rows of D */
    assert_int_equal(be->ops->add_bias(be, bx, &wt, R, &err), 0);
    got = download(be, bx, R * D);
    for (int i = 0; i < R * D; i++)
        want[i] += w[i % D];
    assert_true(tu_nmse(got, want, R * D) < 1e-12);
    free(got);
    assert_int_equal(be->ops->swiglu(be, bg, bg, bu, R * D, &err), 0);
    got = download(be, bg, R * D);
    for (int i = 0; i < R * D; i++)
        want[i] = (float)(g[i] / (1.0 + exp(-(double)g[i])) * u[i]);
    assert_true(tu_nmse(got, want, R * D) < 1e-12);
    free(got);
    /* a buffer too small for the op is an internal error, not an overflow */
    assert_int_equal(be->ops->rms_norm(be, bx, bx, &wt, R + 1, D, 1e-5f, &err), FORGE_E_INTERNAL);
    be->ops->buf_free(be, bx);
    be->ops->buf_free(be, bg);
    be->ops->buf_free(be, bu);
    be->ops->destroy(be);
}

/* causal GQA attention in double over a cache filled in two steps (a prompt, then 8 more); big
 * enough that two threads split the work; the best ISA's result equals the scalar ISA's bit for
 * bit */
static void run_attention(int kv_type, int threads, const float *q, const float *k, const float *v,
                          float *got);

static void check_attention(int kv_type, int threads, double tol)
{
    enum { NH = 8, NKV = 2, HD = 64, T = 40, QD = NH * HD, KD = NKV * HD };
    float q[T * QD], k[T * KD], v[T * KD];
    fill(q, T * QD, 2.0f);
    fill(k, T * KD, 2.0f);
    fill(v, T * KD, 1.0f);
    float *got = malloc(sizeof(float) * T * QD), *got_scalar = malloc(sizeof(float) * T * QD);
    assert_true(got && got_scalar);
    run_attention(kv_type, threads, q, k, v, got);
    /* the SIMD dot and axpy forms give the scalar code's bits */
    const kern_isa best = kern_isa_current();
    assert_int_equal(kern_set_isa(KERN_ISA_SCALAR, NULL), FORGE_OK);
    run_attention(kv_type, threads, q, k, v, got_scalar);
    assert_int_equal(kern_set_isa(best, NULL), FORGE_OK);
    int n_diff = 0;
    for (int i = 0; i < T * QD; i++)
        n_diff += memcmp(&got[i], &got_scalar[i], sizeof(float)) != 0;
    if (n_diff)
        fail_msg("attention kv %d, %d threads: %d of %d values differ from the scalar ISA's",
                 kv_type, threads, n_diff, T * QD);
    free(got_scalar);
    const float scale = 1.0f / sqrtf((float)HD);
    float want[T * QD];
    for (int t = 0; t < T; t++)
        for (int h = 0; h < NH; h++) {
            int g = h / (NH / NKV);
            double s[T], mx = -1e300, sum = 0;
            for (int p = 0; p <= t; p++) {
                s[p] = 0;
                for (int d = 0; d < HD; d++)
                    s[p] += (double)q[t * QD + h * HD + d] * k[p * KD + g * HD + d];
                s[p] *= scale;
                mx = s[p] > mx ? s[p] : mx;
            }
            for (int p = 0; p <= t; p++)
                sum += (s[p] = exp(s[p] - mx));
            for (int d = 0; d < HD; d++) {
                double o = 0;
                for (int p = 0; p <= t; p++)
                    o += s[p] / sum * v[p * KD + g * HD + d];
                want[t * QD + h * HD + d] = (float)o;
            }
        }
    double e = tu_nmse(got, want, T * QD);
    print_message("attention kv %s, %d threads: NMSE %.3g\n", kv_type ? "f16" : "f32", threads, e);
    assert_true(e < tol);
    free(got);
}

/* got = the attention output of all T rows (a prompt of T1, then T - T1 more) */
static void run_attention(int kv_type, int threads, const float *q, const float *k, const float *v,
                          float *got)
{
    backend *be = make_backend(threads, false);
    forge_err err = {0};
    enum { NH = 8, NKV = 2, HD = 64, T1 = 32, T = 40, CTX = 64, QD = NH * HD, KD = NKV * HD };
    be_kv *kv = NULL;
    assert_int_equal(be->ops->kv_create(be, 2, CTX, KD, kv_type, &kv, &err), 0);
    const float scale = 1.0f / sqrtf((float)HD);
    for (int step = 0; step < 2; step++) {
        int pos0 = step ? T1 : 0, n = step ? T - T1 : T1;
        be_buf *bq = upload(be, q + pos0 * QD, n * QD), *bk = upload(be, k + pos0 * KD, n * KD);
        be_buf *bv = upload(be, v + pos0 * KD, n * KD), *bo = NULL;
        assert_int_equal(be->ops->buf_create(be, n * QD, &bo, &err), 0);
        be_span_batch sb;
        int32_t pos[T];
        be_attn a = {1, NH, NKV, HD, scale, be_span_batch_init(&sb, pos, n, pos0, CTX, NULL, 0), 0.0f, 0};
        assert_int_equal(be->ops->attention(be, bo, bq, bk, bv, kv, &a, &err), 0);
        assert_int_equal(be->ops->buf_read(be, bo, 0, n * QD, got + pos0 * QD, &err), 0);
        be->ops->buf_free(be, bq);
        be->ops->buf_free(be, bk);
        be->ops->buf_free(be, bv);
        be->ops->buf_free(be, bo);
    }
    be->ops->kv_free(be, kv);
    be->ops->destroy(be);
}

static void test_attention(void **state)
{
    (void)state;
    check_attention(FORGE_KV_F32, 1, 1e-12);
    check_attention(FORGE_KV_F32, 2, 1e-12);
    check_attention(FORGE_KV_F16, 2, 1e-5);
}

/* get_rows of F16 / Q8_0 tables and a matmul whose rows are no multiple of 32 */
static void test_rows_and_matmul(void **state)
{
    (void)state;
    forge_err err = {0};
    enum { NI = 40, NO = 6, NT = 3 };
    float w[NO * NI], x[NT * NI];
    fill(w, NO * NI, 1.0f);
    fill(x, NT * NI, 1.0f);
    uint16_t wh[NO * NI];
    for (int i = 0; i < NO * NI; i++)
        wh[i] = forge_f32_to_fp16(w[i]);
    for (int f32_math = 0; f32_math < 2; f32_math++) {
        backend *be = make_backend(2, f32_math);
        for (int ty = 0; ty < 2; ty++) {
            be_weight W = {"w", ty ? GGML_TYPE_F16 : GGML_TYPE_F32, NI, NO,
                           0,   ty ? (void *)wh : (void *)w,        -1};
            be_buf *bx = upload(be, x, NT * NI), *by = NULL;
            assert_int_equal(be->ops->buf_create(be, NT * NO, &by, &err), 0);
            assert_int_equal(be->ops->matmul(be, by, &W, bx, NT, &err), 0);
            float *got = download(be, by, NT * NO), want[NT * NO];
            for (int t = 0; t < NT; t++)
                for (int o = 0; o < NO; o++) {
                    double s = 0;
                    for (int i = 0; i < NI; i++) {
                        double wi = ty ? forge_fp16_to_f32(wh[o * NI + i]) : w[o * NI + i];
                        /* ggml rounds activations to fp16 for F16 weights; F32 math does not */
                        double xi = ty && !f32_math
                                        ? forge_fp16_to_f32(forge_f32_to_fp16(x[t * NI + i]))
                                        : x[t * NI + i];
                        s += wi * xi;
                    }
                    want[t * NO + o] = (float)s;
                }
            assert_true(tu_nmse(got, want, NT * NO) < 1e-12);
            free(got);
            be->ops->buf_free(be, bx);
            be->ops->buf_free(be, by);
        }
        be->ops->destroy(be);
    }
    /* embedding rows of an F16 table */
    backend *be = make_backend(1, false);
    be_weight T = {"tab", GGML_TYPE_F16, NI, NO, sizeof wh, wh, -1};
    be_buf *b = NULL;
    assert_int_equal(be->ops->buf_create(be, 2 * NI, &b, &err), 0);
    const int32_t ids[2] = {4, 1};
    assert_int_equal(be->ops->get_rows(be, b, &T, ids, 2, &err), 0);
    float *got = download(be, b, 2 * NI);
    for (int i = 0; i < NI; i++) {
        assert_float_equal(got[i], forge_fp16_to_f32(wh[4 * NI + i]), 0);
        assert_float_equal(got[NI + i], forge_fp16_to_f32(wh[NI + i]), 0);
    }
    const int32_t bad = NO;
    assert_int_equal(be->ops->get_rows(be, b, &T, &bad, 1, &err), FORGE_E_RANGE);
    free(got);
    be->ops->buf_free(be, b);
    be->ops->destroy(be);
}

/* YaRN: dims below corr_dims[0] keep the extrapolated theta, above corr_dims[1] the
 * interpolated one, a linear ramp between; cos/sin scaled by 1 + 0.1 ln(1/freq_scale). */
static void test_rope_yarn(void **state)
{
    (void)state;
    backend *be = make_backend(1, false);
    forge_err err = {0};
    enum { HD = 16, POS = 11 };
    float x[HD];
    fill(x, HD, 1.0f);
    const float fs = 0.25f;
    be_rope rp = {BE_ROPE_NEOX, HD, 10000.0f, fs, NULL, 1.0f, 1.0f, {2.0f, 5.0f}};
    be_buf *b = upload(be, x, HD);
    be_span_batch sb;
    int32_t pos[1];
    const be_batch *bt = be_span_batch_init(&sb, pos, 1, POS, 64, NULL, 0);
    assert_int_equal(be->ops->rope(be, b, 1, HD, bt, &rp, &err), 0);
    float *got = download(be, b, HD), want[HD];
    const double ms = 1.0 + 0.1 * log(1.0 / fs);
    for (int i = 0; i < HD / 2; i++) {
        double extrap = POS * pow(10000.0, -2.0 * i / HD), interp = fs * extrap;
        double y = (i - 2.0) / 3.0, ramp = 1.0 - (y < 0 ? 0 : y > 1 ? 1 : y);
        double th = interp * (1 - ramp) + extrap * ramp;
        want[i] = (float)((x[i] * cos(th) - x[i + HD / 2] * sin(th)) * ms);
        want[i + HD / 2] = (float)((x[i] * sin(th) + x[i + HD / 2] * cos(th)) * ms);
    }
    assert_true(tu_nmse(got, want, HD) < 1e-10);
    free(got);
    be->ops->buf_free(be, b);
    be->ops->destroy(be);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rope),
        cmocka_unit_test(test_rope_yarn),
        cmocka_unit_test(test_rms_norm_swiglu_bias),
        cmocka_unit_test(test_attention),
        cmocka_unit_test(test_rows_and_matmul),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
