/* test_attn_group.c - the CPU attention's grouped AVX-512 path (src/cpu/backend_cpu.c: the query
 * heads of one KV head of one row in one work item, K/V rows loaded once for the group, Q.K 16
 * lanes wide) against the per-head path (the AVX2 forms, and the scalar code) bit for bit: random
 * Q/K/V, F32 and F16 caches, GQA 16:1, 12:1, 8:1 and 4:1 (grouped) and 1:1 (per head either way), head
 * dims with and without a tail past the last multiple of 16/32, sliding window, soft-cap, two
 * sequences in one batch through shuffled block tables, prompt chunks and one-token rows, one
 * and three threads (another grouping decision and another dealing of the work items). A Q8_0
 * cache (per head on every ISA) compares its AVX2 dot/axpy forms with the scalar code the same
 * way. Also the softmax's exponential (cpu/attn_exp.h): its SIMD forms give the scalar one's bits
 * and it stays within 1.5e-7 (relative) of exp. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "cpu/attn_exp.h"
#include "cpu/kernels.h"
#include "testutil.h"

enum { BS = 16, N_BLOCKS = 16, N_CTX = BS * N_BLOCKS, N_LAYER = 2 };

typedef struct attn_case {
    int type, n_head, n_head_kv, hd;
    int pos0, n_tok;   /* sequence 0: rows at pos0..pos0+n_tok-1 */
    int pos1;          /* sequence 1: one row at pos1 (-1: no second sequence) */
    int window;
    float softcap;
} attn_case;

static be_buf *upload(backend *be, const float *x, int64_t n)
{
    be_buf *b = NULL;
    forge_err err = {0};
    if (be->ops->buf_create(be, n, &b, &err)) fail_msg("buf_create: %s", err.msg);
    be_weight table = {"t", GGML_TYPE_F32, n, 1, (uint64_t)n * 4, x, -1};
    const int32_t id = 0;
    if (be->ops->get_rows(be, b, &table, &id, 1, &err)) fail_msg("get_rows: %s", err.msg);
    return b;
}

static float *random_floats(uint64_t seed, size_t n, float amp)
{
    float *x = malloc(n * sizeof *x);
    assert_non_null(x);
    for (size_t i = 0; i < n; i++)
        x[i] = tu_rand_uniform(&seed) * amp;
    return x;
}

/* The output [n_rows][n_head * hd] of one attention call of case c on a fresh backend of
 * n_threads under the current ISA: a cache of random rows, sequence 0 over the blocks perm[0..),
 * sequence 1 over the blocks after them (both tables shuffled), in layer 1. */
static float *run_case(const attn_case *c, int n_threads, const int32_t *perm, uint64_t seed)
{
    forge_err err = {0};
    backend *be = NULL;
    if (backend_cpu_create(n_threads, false, &be, &err)) fail_msg("backend: %s", err.msg);
    const int kv_dim = c->n_head_kv * c->hd, l = 1, n_seq = c->pos1 >= 0 ? 2 : 1;
    const int n_rows = c->n_tok + (n_seq == 2);
    be_kv *kv = NULL;
    if (be->ops->kv_create(be, N_LAYER, N_CTX, kv_dim, c->type, &kv, &err)) fail_msg("%s", err.msg);
    /* every row of the cache random (what earlier calls would have stored) */
    float *fill = random_floats(seed, (size_t)N_CTX * kv_dim, 1.0f);
    int32_t all[N_CTX];
    for (int r = 0; r < N_CTX; r++)
        all[r] = r;
    be_buf *fb = upload(be, fill, (int64_t)N_CTX * kv_dim);
    if (be->ops->kv_store(be, kv, l, fb, fb, all, N_CTX, &err)) fail_msg("%s", err.msg);
    /* two tables of 8 blocks each, rows of the batch at their slots */
    int32_t table[2 * 8], n_table[2] = {8, 8}, seq_start[3] = {0, c->n_tok, n_rows};
    int32_t pos[128], slot[128];
    memcpy(table, perm, sizeof table);
    for (int r = 0; r < n_rows; r++) {
        const int s = r < c->n_tok ? 0 : 1, p = s ? c->pos1 : c->pos0 + r;
        pos[r] = p;
        slot[r] = table[s * 8 + p / BS] * BS + p % BS;
    }
    be_batch bt = {n_rows, n_seq, pos, slot, seq_start, table, n_table, 8, BS, NULL, 0};
    float *k = random_floats(seed + 1, (size_t)n_rows * kv_dim, 1.0f);
    float *v = random_floats(seed + 2, (size_t)n_rows * kv_dim, 1.0f);
    float *q = random_floats(seed + 3, (size_t)n_rows * c->n_head * c->hd, 2.0f);
    be_buf *kb = upload(be, k, (int64_t)n_rows * kv_dim), *vb = upload(be, v, (int64_t)n_rows * kv_dim);
    be_buf *qb = upload(be, q, (int64_t)n_rows * c->n_head * c->hd), *ob = NULL;
    const int64_t n_out = (int64_t)n_rows * c->n_head * c->hd;
    if (be->ops->buf_create(be, n_out, &ob, &err)) fail_msg("%s", err.msg);
    be_attn a = {l, c->n_head, c->n_head_kv, c->hd, 1.0f / sqrtf((float)c->hd), &bt, c->softcap,
                 c->window};
    if (be->ops->attention(be, ob, qb, kb, vb, kv, &a, &err)) fail_msg("attention: %s", err.msg);
    float *out = malloc((size_t)n_out * sizeof *out);
    assert_non_null(out);
    if (be->ops->buf_read(be, ob, 0, n_out, out, &err)) fail_msg("buf_read: %s", err.msg);
    be_buf *bufs[] = {fb, kb, vb, qb, ob};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        be->ops->buf_free(be, bufs[i]);
    be->ops->kv_free(be, kv);
    be->ops->destroy(be);
    free(fill);
    free(k);
    free(v);
    free(q);
    return out;
}

static void assert_bits(const float *got, const float *want, size_t n, const attn_case *c,
                        int n_threads, const char *vs)
{
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(want[i])) fail_msg("element %zu of the %s output is %g", i, vs, (double)want[i]);
        if (memcmp(&got[i], &want[i], sizeof(float)))
            fail_msg("%s cache, %d/%d heads of %d, rows %d+%d (pos1 %d), window %d, softcap %g, "
                     "%d threads: element %zu is %.9g grouped, %.9g %s",
                     c->type == FORGE_KV_Q8_0 ? "Q8_0" : c->type == FORGE_KV_F16 ? "F16" : "F32", c->n_head, c->n_head_kv, c->hd,
                     c->pos0, c->n_tok, c->pos1, c->window, (double)c->softcap, n_threads, i,
                     (double)got[i], (double)want[i], vs);
    }
}

static void test_grouped_equals_per_head(void **state)
{
    (void)state;
    const kern_isa best = kern_isa_best();
    if (best != KERN_ISA_AVX512) {
        print_message("SKIP: the grouped path needs AVX-512; this CPU's best is %s\n",
                      kern_isa_name(best));
        skip();
    }
    static const int heads[][3] = {{16, 2, 64}, {32, 2, 32}, {8, 2, 64}, {8, 8, 64},
                                   {16, 2, 68}, {8, 1, 80},  {8, 2, 20}, {12, 1, 64}};
    static const int rows[][3] = {{0, 1, -1}, {0, 37, -1}, {45, 1, 30}, {50, 23, 7}, {3, 70, 100}};
    static const int windows[] = {0, 7};
    static const float caps[] = {0.0f, 1.5f};
    uint64_t rng = 1234;
    int n_cases = 0;
    for (int type = FORGE_KV_F32; type <= FORGE_KV_Q8_0; type++)
        for (size_t hi = 0; hi < sizeof heads / sizeof heads[0]; hi++)
            for (size_t ri = 0; ri < sizeof rows / sizeof rows[0]; ri++)
                for (int wi = 0; wi < 2; wi++)
                    for (int ci = 0; ci < 2; ci++) {
                        if (type == FORGE_KV_Q8_0 && heads[hi][2] % 32) continue; /* whole blocks */
                        const attn_case c = {type,         heads[hi][0], heads[hi][1], heads[hi][2],
                                             rows[ri][0],  rows[ri][1],  rows[ri][2],  windows[wi],
                                             caps[ci]};
                        int32_t perm[N_BLOCKS];
                        for (int b = 0; b < N_BLOCKS; b++)
                            perm[b] = b;
                        for (int b = N_BLOCKS - 1; b > 0; b--) {
                            const int o = (int)(tu_rand_u64(&rng) % (uint64_t)(b + 1));
                            const int32_t t = perm[b];
                            perm[b] = perm[o];
                            perm[o] = t;
                        }
                        const uint64_t seed = tu_rand_u64(&rng);
                        const size_t n = (size_t)(c.n_tok + (c.pos1 >= 0)) * c.n_head * c.hd;
                        assert_int_equal(kern_set_isa(KERN_ISA_AVX2, NULL), FORGE_OK);
                        float *avx2 = run_case(&c, 1, perm, seed);
                        assert_int_equal(kern_set_isa(KERN_ISA_SCALAR, NULL), FORGE_OK);
                        float *scalar = run_case(&c, 1, perm, seed);
                        assert_int_equal(kern_set_isa(KERN_ISA_AVX512, NULL), FORGE_OK);
                        for (int nt = 1; nt <= 3; nt += 2) {
                            float *got = run_case(&c, nt, perm, seed);
                            assert_bits(got, avx2, n, &c, nt, "per head (AVX2)");
                            assert_bits(got, scalar, n, &c, nt, "per head (scalar)");
                            free(got);
                        }
                        free(avx2);
                        free(scalar);
                        n_cases++;
                    }
    assert_int_equal(kern_set_isa(best, NULL), FORGE_OK);
    print_message("%d cases bit-exact at 1 and 3 threads\n", n_cases);
    assert_int_equal(n_cases, (2 * 8 + 5) * 5 * 2 * 2);
}

#if defined(__x86_64__)
__attribute__((target("avx2"))) static void exp8_of(const float *x, float *y)
{
    _mm256_storeu_ps(y, attn_exp8(_mm256_loadu_ps(x)));
}
__attribute__((target("avx512f"))) static void exp16_of(const float *x, float *y)
{
    _mm512_storeu_ps(y, attn_exp16(_mm512_loadu_ps(x)));
}
#endif

static void test_attn_exp(void **state)
{
    (void)state;
    enum { N = 1 << 16 };
    float *x = malloc((N + 16) * sizeof *x), *y = malloc((N + 16) * sizeof *y);
    assert_true(x && y);
    /* a grid over the range the softmax uses, then the edges and the special values */
    for (int i = 0; i < N; i++)
        x[i] = -88.0f * (float)i / (float)(N - 1);
    const float special[16] = {0.0f, -0.0f, -1e-30f, -87.33f, -87.34f, -87.4f, -100.0f, -INFINITY,
                               NAN, 1.0f, 10.0f, 88.0f, 89.0f, INFINITY, -1e-7f, -0.5f};
    memcpy(x + N, special, sizeof special);
    double worst = 0;
    for (int i = 0; i < N + 16; i++) {
        y[i] = attn_expf(x[i]);
        const double want = exp((double)x[i]);
        if (x[i] != x[i]) {
            if (y[i] == y[i]) fail_msg("attn_expf(NaN) = %g", (double)y[i]);
        } else if (x[i] < ATTN_EXP_LO) {
            if (y[i] != 0.0f) fail_msg("attn_expf(%g) = %g, want 0", (double)x[i], (double)y[i]);
        } else if (x[i] <= ATTN_EXP_HI) {
            const double rel = fabs((double)y[i] - want) / want;
            if (rel > worst) worst = rel;
        } else if (y[i] != attn_expf(ATTN_EXP_HI)) {
            fail_msg("attn_expf(%g) = %g, not the value at %g", (double)x[i], (double)y[i],
                     (double)ATTN_EXP_HI);
        }
    }
    print_message("attn_expf: largest relative error %.3g\n", worst);
    assert_true(worst < 1.5e-7);
#if defined(__x86_64__)
    const kern_isa best = kern_isa_best();
    float got[16];
    int checked = 0;
    for (int i = 0; i + 16 <= N + 16; i += 16) {
        if (best == KERN_ISA_AVX2 || best == KERN_ISA_AVX512) {
            exp8_of(x + i, got);
            exp8_of(x + i + 8, got + 8);
            if (memcmp(got, y + i, sizeof got)) fail_msg("attn_exp8 differs from attn_expf near %g", (double)x[i]);
            checked++;
        }
        if (best == KERN_ISA_AVX512) {
            exp16_of(x + i, got);
            if (memcmp(got, y + i, sizeof got)) fail_msg("attn_exp16 differs from attn_expf near %g", (double)x[i]);
            checked++;
        }
    }
    print_message("%d SIMD vectors bit-exact\n", checked);
#endif
    free(x);
    free(y);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_grouped_equals_per_head),
        cmocka_unit_test(test_attn_exp),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
