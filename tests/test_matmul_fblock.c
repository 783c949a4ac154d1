/* test_matmul_fblock.c - the F32/F16/BF16 prompt kernels on shapes large enough for their cache
 * blocking: more inputs than one slice of the AVX-512 kernel (1024, BF16 2048; accumulators in the
 * per-thread scratch between slices, last slice partial), row counts over one row block (64) with
 * remainders of 4-row groups and of single rows, token counts with every tile remainder. Each
 * token's outputs must equal, bit for bit, that token computed alone (the decode path, which
 * never spills), and be close to a double-precision reference of the same rounded inputs; on
 * every ISA this CPU has, with 1 and 2 threads. test_batch_invariance.c covers the small shapes
 * (768 inputs: one slice). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/fp16.h"
#include "cpu/kernels.h"
#include "quant/qtypes.h"
#include "testutil.h"

enum { MAX_TOK = 40 };

typedef struct fshape {
    int64_t n_out, n_in;
} fshape;

/* Slices of 1024 (BF16: 2048): 1056 = one + 32 (BF16: one slice); 2080 = two + 32 (BF16: one +
 * 32); 3072 = three (BF16: one and a half); 5632 = 5.5 (2.75). 70 and 138 rows: a 64-row block,
 * a partial one, 2 rows outside any 4-row group; 200: chunks of 2 threads, 64-row blocks. */
static const fshape SHAPES[] = {{70, 1056}, {138, 2080}, {200, 3072}, {36, 5632}};

static int n_diff(const float *a, const float *b, size_t n)
{
    int d = 0;
    for (size_t i = 0; i < n; i++)
        d += memcmp(&a[i], &b[i], sizeof(float)) != 0;
    return d;
}

/* The largest |y - ref| / (sum |w x| + tiny) over all outputs: the error relative to the size
 * of the terms, which f32 accumulation keeps near n_in * 2^-24. */
static double max_rel_err(int t, const void *W, const float *X, const float *Y, const fshape *s,
                          int n_tok)
{
    double worst = 0.0;
    for (int k = 0; k < n_tok; k++)
        for (int64_t o = 0; o < s->n_out; o++) {
            double sum = 0.0, mag = 0.0;
            for (int64_t i = 0; i < s->n_in; i++) {
                float w, x = X[k * s->n_in + i];
                if (t == GGML_TYPE_F16) {
                    w = forge_fp16_to_f32(((const uint16_t *)W)[o * s->n_in + i]);
                    x = forge_fp16_to_f32(forge_f32_to_fp16(x)); /* F16 rounds activations */
                } else if (t == GGML_TYPE_BF16) {
                    w = forge_bf16_to_f32(((const uint16_t *)W)[o * s->n_in + i]);
                    x = forge_bf16_to_f32(forge_f32_to_bf16(x)); /* and BF16 to bf16 */
                } else {
                    w = ((const float *)W)[o * s->n_in + i];
                }
                sum += (double)w * x;
                mag += fabs((double)w * x);
            }
            double e = fabs(Y[k * s->n_out + o] - sum) / (mag + 1e-30);
            if (e > worst) worst = e;
        }
    return worst;
}

static void test_blocked_rows_match_decode(void **state)
{
    (void)state;
    static const int n_toks[] = {3, 5, 6, 7, 13, 40};
    static const int types[] = {GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16};
    forge_err err = {0};
    kern_pool *pools[2] = {NULL, NULL};
    assert_int_equal(kern_pool_create(1, &pools[0], &err), 0);
    assert_int_equal(kern_pool_create(2, &pools[1], &err), 0);
    uint64_t rng = 99;
    const kern_isa best = kern_isa_best();
    int n_checked = 0, n_bad = 0;
    double worst = 0.0;
    for (size_t si = 0; si < sizeof SHAPES / sizeof SHAPES[0]; si++) {
        const fshape *s = &SHAPES[si];
        float *X = malloc(sizeof(float) * MAX_TOK * (size_t)s->n_in);
        float *Y = malloc(sizeof(float) * MAX_TOK * (size_t)s->n_out);
        float *Y1 = malloc(sizeof(float) * MAX_TOK * (size_t)s->n_out);
        float *Wf = malloc(sizeof(float) * (size_t)(s->n_out * s->n_in));
        uint16_t *Wh = malloc(sizeof(uint16_t) * (size_t)(s->n_out * s->n_in));
        uint16_t *Wb = malloc(sizeof(uint16_t) * (size_t)(s->n_out * s->n_in));
        assert_true(X && Y && Y1 && Wf && Wh && Wb);
        for (int64_t i = 0; i < MAX_TOK * s->n_in; i++)
            X[i] = tu_rand_uniform(&rng) * 2.0f;
        for (int64_t i = 0; i < s->n_out * s->n_in; i++) {
            Wf[i] = tu_rand_uniform(&rng) * 0.1f;
            Wh[i] = forge_f32_to_fp16(Wf[i]);
            Wb[i] = forge_f32_to_bf16(Wf[i]);
        }
        for (int isa = 0; isa <= (int)best; isa++) {
            if (kern_set_isa((kern_isa)isa, &err)) continue;
            for (size_t ti = 0; ti < sizeof types / sizeof types[0]; ti++) {
                const int t = types[ti];
                const void *W = t == GGML_TYPE_F16    ? (const void *)Wh
                                : t == GGML_TYPE_BF16 ? (const void *)Wb
                                                      : (const void *)Wf;
                if (!kern_matmul_supported(t)) continue;
                for (int p = 0; p < 2; p++) {
                    for (int k = 0; k < MAX_TOK; k++)
                        assert_int_equal(kern_matmul(pools[p], t, W, s->n_out, s->n_in,
                                                     X + k * s->n_in, 1, Y1 + k * s->n_out, &err),
                                         FORGE_OK);
                    if (p == 0) {
                        double e = max_rel_err(t, W, X, Y1, s, MAX_TOK);
                        if (e > worst) worst = e;
                    }
                    for (size_t ni = 0; ni < sizeof n_toks / sizeof n_toks[0]; ni++) {
                        const int n = n_toks[ni], off = MAX_TOK - n; /* the last n tokens */
                        assert_int_equal(kern_matmul(pools[p], t, W, s->n_out, s->n_in,
                                                     X + off * s->n_in, n, Y, &err),
                                         FORGE_OK);
                        int d = n_diff(Y, Y1 + off * s->n_out, (size_t)n * s->n_out);
                        n_checked++;
                        if (d) {
                            n_bad++;
                            print_message("%s %s %lldx%lld, %d threads, %d tokens: %d of %lld "
                                          "values differ from the tokens alone\n",
                                          kern_isa_name((kern_isa)isa),
                                          forge_type_traits_get(t)->name, (long long)s->n_out,
                                          (long long)s->n_in, p + 1, n, d,
                                          (long long)(n * s->n_out));
                        }
                    }
                }
            }
        }
        free(X);
        free(Y);
        free(Y1);
        free(Wf);
        free(Wh);
        free(Wb);
    }
    assert_int_equal(kern_set_isa(best, &err), 0);
    print_message("%d blocked shapes checked, %d differ from decode; worst error %.3g of the "
                  "terms' magnitude\n",
                  n_checked, n_bad, worst);
    assert_true(n_checked >= 4 * 3 * 2 * 6);
    assert_int_equal(n_bad, 0);
    /* f32 sums of <= 5632 terms: a few 1e-6 of their magnitude at most */
    assert_true(worst < 1e-5);
    kern_pool_free(pools[0]);
    kern_pool_free(pools[1]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_blocked_rows_match_decode),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
