/* test_quant_kernels.c - the tuned CPU kernels of the block types (decode kernels and prompt
 * tiles of src/cpu/matvec_kq_avx512.c, matmul_kq_avx512.c, matmul_q32_avx512.c, and whatever
 * the current ISA runs) give, for every output, the same bits as the traits table's scalar dot
 * product (src/quant/vecdot.c) with the scalar activation quantizer: the integer sums are exact
 * and the float step per block is the scalar code's expression in its order.
 * The weights are random bytes (every bit pattern of values, scales, mins and high bits occurs:
 * quantizer output is too regular, e.g. Q3_K's high scale bits are nearly constant), with small
 * finite fp16 numbers where the layout keeps d (and dmin). Rows: 70 (tails of the 4-row decode
 * groups and 16-row tiles), inputs 768 (3 super-blocks; 800 for the types of 32: an odd count), tokens 1, 2, 3 (decode) and 4, 5, 9, 13
 * (tiles 8, 4, 1), 1 and 2 threads, every ISA this CPU has. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/fp16.h"
#include "core/util.h"
#include "cpu/kernels.h"
#include "quant/qtypes.h"
#include "testutil.h"

/* inputs: 3 super-blocks; 25 blocks for the types of 32 (an odd count: the decode's last single block) */
enum { N_IN = 768, N_IN_32 = 800, N_OUT = 70, MAX_TOK = 13 };

/* Byte offsets of the fp16 scales inside one block of each type (-1: none). */
typedef struct scale_pos {
    int type, d, dmin;
} scale_pos;

static const scale_pos SCALES[] = {
    {GGML_TYPE_Q2_K, 80, 82},  {GGML_TYPE_Q3_K, 108, -1}, {GGML_TYPE_Q4_K, 0, 2},
    {GGML_TYPE_Q5_K, 0, 2},    {GGML_TYPE_Q6_K, 208, -1}, {GGML_TYPE_IQ4_XS, 0, -1},
    {GGML_TYPE_TQ1_0, 52, -1}, {GGML_TYPE_TQ2_0, 64, -1}, {GGML_TYPE_Q4_1, 0, 2},
    {GGML_TYPE_Q5_0, 0, -1},   {GGML_TYPE_Q5_1, 0, 2},    {GGML_TYPE_IQ4_NL, 0, -1},
};

static void put_half(uint8_t *p, float v)
{
    uint16_t h = forge_f32_to_fp16(v);
    memcpy(p, &h, 2);
}

static void test_kernels_equal_scalar_dot(void **state)
{
    (void)state;
    static const int n_toks[] = {1, 2, 3, 4, 5, 9, 13};
    forge_err err = {0};
    kern_pool *pools[2] = {NULL, NULL};
    assert_int_equal(kern_pool_create(1, &pools[0], &err), 0);
    assert_int_equal(kern_pool_create(2, &pools[1], &err), 0);
    uint64_t rng = 4321;
    float *X = malloc(sizeof(float) * MAX_TOK * N_IN_32);
    float *Y = malloc(sizeof(float) * MAX_TOK * N_OUT),
          *R = malloc(sizeof(float) * MAX_TOK * N_OUT);
    assert_true(X && Y && R);
    for (int i = 0; i < MAX_TOK * N_IN_32; i++)
        X[i] = (tu_rand_uniform(&rng) - 0.5f) * 4.0f;
    int n_checked = 0, n_bad = 0;
    for (size_t s = 0; s < FORGE_ARRAY_LEN(SCALES); s++) {
        const scale_pos *sp = &SCALES[s];
        const forge_type_traits *tr = forge_type_traits_get(sp->type);
        const int n_in = tr->block_size == 32 ? N_IN_32 : N_IN;
        const forge_type_traits *xt = forge_type_traits_get(tr->vec_dot_type);
        assert_non_null(tr->vec_dot);
        assert_true(kern_matmul_supported(sp->type));
        const size_t rb = (size_t)(n_in / tr->block_size) * tr->block_bytes;
        uint8_t *W = malloc(rb * N_OUT);
        const size_t xrb = (size_t)(n_in / xt->block_size) * xt->block_bytes;
        uint8_t *xq = malloc(xrb);
        assert_true(W && xq);
        for (size_t i = 0; i < rb * N_OUT; i++)
            W[i] = (uint8_t)(tu_rand_u64(&rng) >> 56);
        for (size_t b = 0; b < rb * N_OUT / tr->block_bytes; b++) {
            uint8_t *blk = W + b * tr->block_bytes;
            put_half(blk + sp->d, 0.001f + 0.01f * tu_rand_uniform(&rng));
            if (sp->dmin >= 0) put_half(blk + sp->dmin, 0.002f * tu_rand_uniform(&rng));
        }
        /* the reference: the scalar dot of every (token, row) */
        for (int t = 0; t < MAX_TOK; t++) {
            tr->quantize_act(X + (size_t)t * n_in, xq, n_in);
            for (int o = 0; o < N_OUT; o++)
                R[t * N_OUT + o] = tr->vec_dot(n_in, W + (size_t)o * rb, xq);
        }
        for (int isa = 0; isa <= (int)kern_isa_best(); isa++) {
            if (kern_set_isa((kern_isa)isa, &err)) continue; /* an ISA between scalar and best */
            for (int p = 0; p < 2; p++) {
                for (size_t ni = 0; ni < FORGE_ARRAY_LEN(n_toks); ni++) {
                    const int n = n_toks[ni];
                    assert_int_equal(kern_matmul(pools[p], sp->type, W, N_OUT, n_in, X, n, Y, &err),
                                     FORGE_OK);
                    int d = 0;
                    for (int i = 0; i < n * N_OUT; i++)
                        d += memcmp(&Y[i], &R[i], sizeof(float)) != 0;
                    n_checked++;
                    if (d) {
                        n_bad++;
                        print_message(
                            "%s %s, %d threads, %d tokens: %d of %d values differ from the "
                            "scalar dot (first: %g vs %g)\n",
                            kern_isa_name(kern_isa_current()), tr->name, p + 1, n, d, n * N_OUT,
                            (double)Y[0], (double)R[0]);
                    }
                }
            }
        }
        free(W);
        free(xq);
    }
    assert_int_equal(kern_set_isa(kern_isa_best(), &err), 0);
    print_message("%d shapes checked on the ISAs up to %s, %d differ\n", n_checked,
                  kern_isa_name(kern_isa_best()), n_bad);
    assert_int_equal(n_bad, 0);
    kern_pool_free(pools[0]);
    kern_pool_free(pools[1]);
    free(X);
    free(Y);
    free(R);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kernels_equal_scalar_dot),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
