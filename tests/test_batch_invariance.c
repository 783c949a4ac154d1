/* test_batch_invariance.c - the CPU matmul kernels give each token row the same bits whatever
 * else is in the call: a row computed alone (n_tok 1, the decode path) equals the same row in a
 * call of 2..19 tokens (prompt tiles, repacked paths), for every weight type kern_matmul runs,
 * on every ISA this CPU has, with 1 and 2 threads, through kern_matmul_multi too. The engine core
 * relies on it (docs/ENGINE.md, "batch invariance"): a greedy request gives the same ids alone
 * and in a batch of others. Output row counts that are not a multiple of 8 or 16 exercise the
 * remainder paths; 768 inputs are 3 super-blocks of the K-quants (their prompt tiles take 8, 4
 * and 1 tokens at a time: 29 and 37 tokens run all three). 150 and 317 tokens cross the token
 * chunks of the kernels that run prompts in L2-sized chunks (kern_tok_chunk: 136 tokens of Q8_0
 * activations, 148 of Q8_K at 768 inputs). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/kernels.h"
#include "quant/qtypes.h"
#include "testutil.h"

enum { N_IN = 768, N_OUT = 70, MAX_TOK = 320 };

/* n_out rows of n_in random weights in type t (through its reference quantizer; random bytes
 * where the type has none, with finite fp16 values where the layout starts with a scale). */
static void *make_weights(int t, uint64_t *rng, size_t *row_bytes)
{
    const forge_type_traits *tr = forge_type_traits_get(t);
    assert_non_null(tr);
    *row_bytes = (size_t)(N_IN / tr->block_size) * tr->block_bytes;
    uint8_t *w = malloc(*row_bytes * N_OUT);
    float *row = malloc(N_IN * sizeof *row);
    assert_true(w && row);
    for (int o = 0; o < N_OUT; o++) {
        for (int i = 0; i < N_IN; i++)
            row[i] = (tu_rand_uniform(rng) - 0.5f) * 0.2f;
        uint8_t *dst = w + (size_t)o * *row_bytes;
        if (t == GGML_TYPE_F32) {
            memcpy(dst, row, N_IN * sizeof(float));
        } else if (tr->quantize_row) {
            tr->quantize_row(row, dst, N_IN);
        } else {
            for (size_t b = 0; b < *row_bytes; b++)
                dst[b] = (uint8_t)(tu_rand_u64(rng) & 0x3f); /* small bytes: finite fp16 */
        }
    }
    free(row);
    return w;
}

static int n_diff(const float *a, const float *b, size_t n)
{
    int d = 0;
    for (size_t i = 0; i < n; i++)
        d += memcmp(&a[i], &b[i], sizeof(float)) != 0;
    return d;
}

static void test_rows_independent_of_batch(void **state)
{
    (void)state;
    static const int n_toks[] = {2, 3, 4, 5, 7, 8, 9, 13, 16, 19, 29, 37, 150, 317};
    forge_err err = {0};
    kern_pool *pools[2] = {NULL, NULL};
    assert_int_equal(kern_pool_create(1, &pools[0], &err), 0);
    assert_int_equal(kern_pool_create(2, &pools[1], &err), 0);
    uint64_t rng = 1234;
    float *X = malloc(sizeof(float) * MAX_TOK * N_IN);
    float *Y = malloc(sizeof(float) * MAX_TOK * N_OUT), *Y1 = malloc(sizeof(float) * MAX_TOK * N_OUT);
    assert_true(X && Y && Y1);
    for (int i = 0; i < MAX_TOK * N_IN; i++)
        X[i] = (tu_rand_uniform(&rng) - 0.5f) * 4.0f;
    const kern_isa best = kern_isa_best();
    int n_checked = 0, n_bad = 0;
    for (int isa = 0; isa <= (int)best; isa++) {
        if (kern_set_isa((kern_isa)isa, &err)) continue; /* an ISA between scalar and best */
        for (int t = 0; t < GGML_TYPE_COUNT; t++) {
            if (!kern_matmul_supported(t)) continue;
            size_t rb;
            void *W = make_weights(t, &rng, &rb);
            for (int p = 0; p < 2; p++) {
                /* every token alone */
                for (int k = 0; k < MAX_TOK; k++)
                    assert_int_equal(kern_matmul(pools[p], t, W, N_OUT, N_IN, X + k * N_IN, 1,
                                                 Y1 + k * N_OUT, &err),
                                     FORGE_OK);
                for (size_t ni = 0; ni < sizeof n_toks / sizeof n_toks[0]; ni++) {
                    const int n = n_toks[ni], off = (int)(ni % 3); /* tokens off..off+n-1 */
                    if (off + n > MAX_TOK) continue;
                    assert_int_equal(kern_matmul(pools[p], t, W, N_OUT, N_IN, X + off * N_IN, n,
                                                 Y, &err),
                                     FORGE_OK);
                    int d = n_diff(Y, Y1 + off * N_OUT, (size_t)n * N_OUT);
                    n_checked++;
                    if (d) {
                        n_bad++;
                        print_message("%s %s %d threads, %d tokens: %d of %d values differ from "
                                      "the tokens alone\n",
                                      kern_isa_name((kern_isa)isa), forge_type_traits_get(t)->name,
                                      p + 1, n, d, n * N_OUT);
                    }
                }
                /* through kern_matmul_multi (two matrices sharing X), 5 tokens */
                kern_mm_desc d2[2] = {{t, W, N_OUT, Y}, {t, W, N_OUT, Y + 5 * N_OUT}};
                assert_int_equal(kern_matmul_multi(pools[p], 2, d2, N_IN, X, 5, &err), FORGE_OK);
                n_checked++;
                if (n_diff(Y, Y1, 5 * N_OUT) || n_diff(Y + 5 * N_OUT, Y1, 5 * N_OUT)) {
                    n_bad++;
                    print_message("%s %s: kern_matmul_multi rows differ from the tokens alone\n",
                                  kern_isa_name((kern_isa)isa), forge_type_traits_get(t)->name);
                }
            }
            free(W);
        }
    }
    assert_int_equal(kern_set_isa(best, &err), 0);
    print_message("%d batch shapes checked, %d not invariant\n", n_checked, n_bad);
    assert_true(n_checked > 100);
    assert_int_equal(n_bad, 0);
    kern_pool_free(pools[0]);
    kern_pool_free(pools[1]);
    free(X);
    free(Y);
    free(Y1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rows_independent_of_batch),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
