/* test_cpu_repack.c - load-time repacking of weights on the CPU (kernels.h: kern_repack,
 * KERN_LAYOUT_Q4_0_X16; the CPU backend's weights_acquire/weights_release).
 *  - The Q4_0 kernels (AVX-512 VNNI, or AVX2) read the repacked copy (decode, prompt tiles) and
 *    give for every output the bits of the file-layout kernels and of a scalar reference written
 *    here with their float order (ref_row: AVX-512 chains, or AVX2's and the scalar kernel's
 *    block order). Random-byte weights; inputs of 24, 25 and 27 blocks
 *    (tails of 0, 1, 3 blocks); 70 rows (4 groups of 16 and 6 rows read from the file layout);
 *    1 and 2 threads. That the copy is what is read: the matrix passed beside it has other bytes
 *    in its grouped rows, and still every row equals the reference of the copied matrix.
 *  - The CPU backend makes one copy per model: a second backend on the same registry gets the
 *    same copy, releasing the first keeps it (the second still multiplies correctly: ASan would
 *    see a use after free), releasing the second frees it (the registry is empty; ASan: no
 *    leak). Views of whole row groups (a stacked expert) read the copy at their offset, other
 *    views the mapping; other types get no copy.
 *  - A Q4_0 model (testdata/quant/synth-Q4_0.gguf) with two contexts: the same logits bit for bit
 *    (2 and 1 threads), the second context goes on generating after the first is freed. */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/fp16.h"
#include "core/util.h"
#include "cpu/backend_cpu.h"
#include "cpu/kern_impl.h"
#include "cpu/kernels.h"
#include "forge_model.h"
#include "quant/qtypes.h"
#include "testutil.h"

enum { N_OUT = 70, MAX_TOK = 150, QK = 32, BB = 18 };

/* Random Q4_0 bytes with small finite scales. */
static void fill_q4_0(uint8_t *w, size_t n_blocks, uint64_t *rng)
{
    for (size_t b = 0; b < n_blocks; b++) {
        for (int i = 2; i < BB; i++)
            w[b * BB + i] = (uint8_t)(tu_rand_u64(rng) >> 56);
        uint16_t h = forge_f32_to_fp16(0.001f + 0.01f * fabsf(tu_rand_uniform(rng)));
        memcpy(w + b * BB, &h, 2);
    }
}

/* Whether the Q4_0 kernels of the current ISA are the AVX-512 ones (matmul_avx512.c, which need
 * VNNI, VBMI and GFNI; otherwise the AVX2 ones run on an AVX-512 CPU). */
static bool avx512_kernels(void)
{
    return kern_isa_current() == KERN_ISA_AVX512 && kern_cpu_has_avx512vnni() &&
           kern_cpu_has_avx512vbmi() && kern_cpu_has_gfni();
}

/* The reference: one row, one token, in the float order of the current ISA's Q4_0 kernels: per
 * block the exact integer sum times d_w * d_x, then the AVX-512 kernels add by one fmaf per block
 * into chains by block index mod 4 for whole 4-block groups, (c0 + c2) + (c1 + c3), then the
 * other blocks even/odd, added last; the scalar and AVX2 kernels multiply and add in block order.
 * xq: the token's activations as ggml's Q8_0 blocks (fp16 d, 32 int8). */
static float ref_row(const uint8_t *w, const uint8_t *xq, int64_t nb)
{
    const bool chains = avx512_kernels();
    float ch[4] = {0, 0, 0, 0}, tail[2] = {0, 0}, seq = 0.0f;
    const int64_t nb_main = nb - nb % 4;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *wb = w + b * BB, *xb = xq + b * 34;
        uint16_t dw, dx;
        memcpy(&dw, wb, 2);
        memcpy(&dx, xb, 2);
        int32_t s = 0;
        for (int j = 0; j < QK / 2; j++)
            s += ((wb[2 + j] & 0x0f) - 8) * (int8_t)xb[2 + j] +
                 ((wb[2 + j] >> 4) - 8) * (int8_t)xb[2 + j + QK / 2];
        const float scale = forge_fp16_to_f32(dw) * forge_fp16_to_f32(dx);
        const float p = (float)s * scale;
        seq = seq + p;
        if (b < nb_main)
            ch[b % 4] = fmaf((float)s, scale, ch[b % 4]);
        else
            tail[(b - nb_main) % 2] = fmaf((float)s, scale, tail[(b - nb_main) % 2]);
    }
    if (!chains) return seq;
    float y = (ch[0] + ch[2]) + (ch[1] + ch[3]);
    return nb_main < nb ? y + (tail[0] + tail[1]) : y;
}

static int count_diff(const float *a, const float *b, size_t n)
{
    int d = 0;
    for (size_t i = 0; i < n; i++)
        d += memcmp(&a[i], &b[i], sizeof(float)) != 0;
    return d;
}

static void test_kernels_read_the_copy(void **state)
{
    (void)state;
    static const int64_t n_ins[] = {768, 800, 864};
    static const int n_toks[] = {1, 2, 3, 4, 5, 9, 13, 150}; /* 150: two token chunks */
    forge_err err = {0};
    uint64_t rng = 99;
    if (kern_repack_layout(GGML_TYPE_Q4_0) != KERN_LAYOUT_Q4_0_X16) {
        print_message("this CPU's best ISA (%s) has no repacked Q4_0 layout\n",
                      kern_isa_name(kern_isa_best()));
        skip();
    }
    assert_int_equal(kern_repack_group_rows(KERN_LAYOUT_Q4_0_X16), 16);
    kern_pool *pools[2] = {NULL, NULL};
    assert_int_equal(kern_pool_create(1, &pools[0], &err), 0);
    assert_int_equal(kern_pool_create(2, &pools[1], &err), 0);
    int n_checked = 0;
    for (size_t si = 0; si < FORGE_ARRAY_LEN(n_ins); si++) {
        const int64_t n_in = n_ins[si], nb = n_in / QK;
        const size_t rb = (size_t)nb * BB, rbytes = kern_repack_bytes(KERN_LAYOUT_Q4_0_X16, N_OUT, n_in);
        /* as large as the 64 rows it holds, in whole 64-byte lines */
        assert_int_equal(rbytes, (size_t)(nb + 1) / 2 * 576 * (N_OUT / 16));
        assert_true(rbytes >= 64 * rb);
        uint8_t *W = malloc(rb * N_OUT), *W2 = malloc(rb * N_OUT), *R = aligned_alloc(64, rbytes);
        uint8_t *xq = malloc((size_t)MAX_TOK * nb * 34);
        float *X = malloc(sizeof(float) * MAX_TOK * n_in);
        float *Y = malloc(sizeof(float) * MAX_TOK * N_OUT), *Yf = malloc(sizeof(float) * MAX_TOK * N_OUT),
              *Ref = malloc(sizeof(float) * MAX_TOK * N_OUT);
        assert_true(W && W2 && R && xq && X && Y && Yf && Ref);
        fill_q4_0(W, (size_t)nb * N_OUT, &rng);
        /* W2: W with other bytes in the grouped rows 0..63, the same rows 64..69 */
        memcpy(W2, W, rb * N_OUT);
        fill_q4_0(W2, (size_t)nb * 64, &rng);
        for (int64_t i = 0; i < MAX_TOK * n_in; i++)
            X[i] = tu_rand_uniform(&rng) * 2.0f;
        for (int t = 0; t < MAX_TOK; t++) {
            forge_quantize_act_q8_0(X + (size_t)t * n_in, xq + (size_t)t * nb * 34, n_in);
            for (int o = 0; o < N_OUT; o++)
                Ref[t * N_OUT + o] = ref_row(W + (size_t)o * rb, xq + (size_t)t * nb * 34, nb);
        }
        assert_int_equal(kern_repack(pools[1], KERN_LAYOUT_Q4_0_X16, GGML_TYPE_Q4_0, W, N_OUT, n_in, R,
                                     &err),
                         FORGE_OK);
        const kern_mm_desc d = {GGML_TYPE_Q4_0, W2, N_OUT, Y};
        const kern_mm_packed pk = {R, KERN_LAYOUT_Q4_0_X16};
        for (int p = 0; p < 2; p++) {
            for (size_t ni = 0; ni < FORGE_ARRAY_LEN(n_toks); ni++) {
                const int n = n_toks[ni];
                assert_int_equal(kern_matmul_packed(pools[p], 1, &d, &pk, n_in, X, n, &err), FORGE_OK);
                int bad = count_diff(Y, Ref, (size_t)n * N_OUT);
                if (bad)
                    print_message("n_in %lld, %d threads, %d tokens: %d of %d values differ from "
                                  "the reference\n",
                                  (long long)n_in, p + 1, n, bad, n * N_OUT);
                assert_int_equal(bad, 0);
                /* the file layout of the same matrix: the same bits */
                assert_int_equal(kern_matmul(pools[p], GGML_TYPE_Q4_0, W, N_OUT, n_in, X, n, Yf, &err),
                                 FORGE_OK);
                assert_int_equal(count_diff(Yf, Ref, (size_t)n * N_OUT), 0);
                /* and without the copy W2's grouped rows are read: the check above could fail */
                assert_int_equal(kern_matmul(pools[p], GGML_TYPE_Q4_0, W2, N_OUT, n_in, X, n, Yf, &err),
                                 FORGE_OK);
                assert_true(count_diff(Yf, Ref, (size_t)n * 64) > 0);
                n_checked++;
            }
        }
        /* another ISA reads the file layout: the copy is ignored there */
        assert_int_equal(kern_set_isa(KERN_ISA_SCALAR, &err), 0);
        assert_int_equal(kern_repack_layout(GGML_TYPE_Q4_0), KERN_LAYOUT_FILE);
        assert_int_equal(kern_matmul_packed(pools[0], 1, &d, &pk, n_in, X, 1, &err), FORGE_OK);
        assert_int_equal(kern_matmul(pools[0], GGML_TYPE_Q4_0, W2, N_OUT, n_in, X, 1, Yf, &err),
                         FORGE_OK);
        assert_int_equal(count_diff(Y, Yf, N_OUT), 0);
        assert_int_equal(kern_set_isa(kern_isa_best(), &err), 0);
        free(W);
        free(W2);
        free(R);
        free(xq);
        free(X);
        free(Y);
        free(Yf);
        free(Ref);
    }
    print_message("%d shapes checked\n", n_checked);
    /* bad arguments */
    uint8_t dummy[64];
    assert_int_equal(kern_repack(NULL, KERN_LAYOUT_Q4_0_X16, GGML_TYPE_Q8_0, dummy, 16, 32, dummy, &err),
                     FORGE_E_INVALID);
    assert_int_equal(kern_repack(NULL, KERN_LAYOUT_Q4_0_X16, GGML_TYPE_Q4_0, dummy, 16, 33, dummy, &err),
                     FORGE_E_INVALID);
    assert_int_equal(kern_repack_bytes(KERN_LAYOUT_FILE, 64, 2048), 0);
    kern_pool_free(pools[0]);
    kern_pool_free(pools[1]);
}

/* ---- the CPU backend's weight set ---- */

static uint64_t g_progress_calls, g_progress_done, g_progress_total;

static void progress(uint64_t done, uint64_t total, void *user)
{
    (void)user;
    g_progress_calls++;
    g_progress_done = done;
    g_progress_total = total;
}

static be_buf *upload(backend *be, const float *x, int64_t n)
{
    be_buf *b = NULL;
    forge_err err = {0};
    assert_int_equal(be->ops->buf_create(be, n, &b, &err), 0);
    memcpy(b->data, x, (size_t)n * sizeof(float));
    return b;
}

/* y = w x by the backend's matmul op, one token, compared with the reference bit for bit (every
 * ISA's Q4_0 kernels sum in the reference's order for that ISA, repacked copy or not). */
static void check_matmul(backend *be, const be_weight *w, const float *x, const uint8_t *xq)
{
    forge_err err = {0};
    be_buf *bx = upload(be, x, w->ne0), *by = NULL;
    assert_int_equal(be->ops->buf_create(be, w->ne1, &by, &err), 0);
    assert_int_equal(be->ops->matmul(be, by, w, bx, 1, &err), FORGE_OK);
    const size_t rb = (size_t)(w->ne0 / QK) * BB;
    for (int64_t o = 0; o < w->ne1; o++) {
        float want = ref_row((const uint8_t *)w->data + (size_t)o * rb, xq, w->ne0 / QK);
        if (memcmp(&by->data[o], &want, sizeof want) != 0)
            fail_msg("%s row %lld: %g, reference %g", w->name, (long long)o, (double)by->data[o],
                     (double)want);
    }
    be->ops->buf_free(be, bx);
    be->ops->buf_free(be, by);
}

static void test_backend_shares_one_copy(void **state)
{
    (void)state;
    enum { E = 256, NB = E / QK };
    forge_err err = {0};
    uint64_t rng = 7;
    const int repacks = kern_repack_layout(GGML_TYPE_Q4_0) == KERN_LAYOUT_Q4_0_X16;
    if (!repacks) print_message("no repacked Q4_0 layout on this CPU: checking that none is made\n");
    const size_t rb = (size_t)NB * BB;
    /* a stacked "expert" matrix of 48 rows, a 40-row matrix (2 groups + 8 rows), an F32 one */
    uint8_t *q48 = malloc(rb * 48), *q40 = malloc(rb * 40);
    float *f = malloc(sizeof(float) * E * 4), x[E];
    uint8_t xq[NB * 34];
    assert_true(q48 && q40 && f);
    fill_q4_0(q48, (size_t)NB * 48, &rng);
    fill_q4_0(q40, (size_t)NB * 40, &rng);
    for (int i = 0; i < E * 4; i++)
        f[i] = tu_rand_uniform(&rng);
    for (int i = 0; i < E; i++)
        x[i] = tu_rand_uniform(&rng);
    forge_quantize_act_q8_0(x, xq, E);
    be_weight w[3] = {
        {"q48", GGML_TYPE_Q4_0, E, 48, rb * 48, q48, 0},
        {"q40", GGML_TYPE_Q4_0, E, 40, rb * 40, q40, 1},
        {"f", GGML_TYPE_F32, E, 4, sizeof(float) * E * 4, f, 2},
    };
    be_weight *const ws[3] = {&w[0], &w[1], &w[2]};
    be_wshare share;
    memset(&share, 0, sizeof share);
    assert_int_equal(pthread_mutex_init(&share.lock, NULL), 0);
    backend *be1 = NULL, *be2 = NULL;
    assert_int_equal(backend_cpu_create(2, false, &be1, &err), 0);
    assert_int_equal(backend_cpu_create(1, false, &be2, &err), 0);

    g_progress_calls = 0;
    assert_int_equal(be1->ops->weights_acquire(be1, &share, ws, 3, progress, NULL, &err), FORGE_OK);
    assert_int_equal(g_progress_calls, 3);
    assert_int_equal(g_progress_done, g_progress_total);
    assert_non_null(share.head);
    be_wset *const head = share.head;
    int layout = -1;
    const void *r48 = backend_cpu_packed(be1, &w[0], &layout);
    const void *r40 = backend_cpu_packed(be1, &w[1], NULL);
    assert_null(backend_cpu_packed(be1, &w[2], NULL));
    if (repacks) {
        assert_non_null(r48);
        assert_non_null(r40);
        assert_int_equal(layout, KERN_LAYOUT_Q4_0_X16);
    } else {
        assert_null(r48);
        assert_null(r40);
    }
    /* views: rows 16..47 are whole groups (at the copy's second group), rows 8..39 are not */
    be_weight v16 = w[0], v8 = w[0];
    v16.ne1 = 32;
    v16.data = q48 + rb * 16;
    v8.ne1 = 32;
    v8.data = q48 + rb * 8;
    const void *rv16 = backend_cpu_packed(be1, &v16, NULL);
    if (repacks)
        assert_ptr_equal(rv16, (const uint8_t *)r48 + kern_repack_group_bytes(KERN_LAYOUT_Q4_0_X16, E));
    assert_null(backend_cpu_packed(be1, &v8, NULL));
    check_matmul(be1, &v16, x, xq);
    check_matmul(be1, &v8, x, xq);

    /* the second context: the same copies, nothing new in the registry */
    assert_int_equal(be2->ops->weights_acquire(be2, &share, ws, 3, progress, NULL, &err), FORGE_OK);
    assert_ptr_equal(share.head, head);
    assert_ptr_equal(backend_cpu_packed(be2, &w[0], NULL), r48);
    assert_ptr_equal(backend_cpu_packed(be2, &w[1], NULL), r40);
    /* acquiring twice is a programming error */
    assert_int_equal(be2->ops->weights_acquire(be2, &share, ws, 3, NULL, NULL, &err),
                     FORGE_E_INTERNAL);

    /* the first one goes: the copy stays for the second */
    be1->ops->weights_release(be1);
    assert_null(backend_cpu_packed(be1, &w[0], NULL));
    assert_ptr_equal(share.head, head);
    for (int i = 0; i < 3; i += 1)
        if (w[i].type == GGML_TYPE_Q4_0) check_matmul(be2, &w[i], x, xq);
    /* the last one frees it */
    be2->ops->weights_release(be2);
    assert_null(share.head);
    be2->ops->weights_release(be2); /* nothing held: nothing happens */
    be1->ops->destroy(be1);
    be2->ops->destroy(be2);
    pthread_mutex_destroy(&share.lock);
    free(q48);
    free(q40);
    free(f);
}

static void greedy(forge_context *ctx, const int32_t *prompt, int n_prompt, int32_t *out, int n,
                   float *logits0, int V)
{
    forge_err err = {0};
    int32_t id = -1;
    if (forge_decode(ctx, prompt, n_prompt, false, &err)) fail_msg("decode: %s", err.msg);
    memcpy(logits0, forge_get_logits(ctx, -1), sizeof(float) * (size_t)V);
    for (int s = 0; s < n; s++) {
        const float *l = forge_get_logits(ctx, -1);
        id = 0;
        for (int v = 1; v < V; v++)
            if (l[v] > l[id]) id = v;
        out[s] = id;
        if (forge_decode(ctx, &id, 1, false, &err)) fail_msg("decode: %s", err.msg);
    }
}

static void test_model_two_contexts(void **state)
{
    (void)state;
    char *path = tu_shared_path("testdata/quant/synth-Q4_0.gguf");
    forge_err err = {0};
    forge_model *m = NULL;
    if (forge_model_load(path, &m, &err)) fail_msg("load %s: %s", path, err.msg);
    const int V = forge_model_info_get(m)->n_vocab;
    forge_context_params cp = forge_context_default_params();
    cp.n_ctx = 64;
    forge_context *c1 = NULL, *c2 = NULL;
    cp.n_threads = 2;
    assert_int_equal(forge_context_create(m, &cp, &c1, &err), FORGE_OK);
    cp.n_threads = 1;
    assert_int_equal(forge_context_create(m, &cp, &c2, &err), FORGE_OK);
    const int32_t prompt[6] = {1, 17, 230, 41, 5, 99};
    int32_t ids1[8], ids2[8];
    float *l1 = malloc(sizeof(float) * (size_t)V), *l2 = malloc(sizeof(float) * (size_t)V);
    assert_true(l1 && l2);
    greedy(c1, prompt, 6, ids1, 4, l1, V);
    forge_context_free(c1); /* c2 still reads the model's copies */
    greedy(c2, prompt, 6, ids2, 8, l2, V);
    assert_int_equal(count_diff(l1, l2, (size_t)V), 0);
    assert_memory_equal(ids1, ids2, sizeof(int32_t) * 4);
    forge_context_free(c2);
    forge_model_free(m);
    free(l1);
    free(l2);
    free(path);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kernels_read_the_copy),
        cmocka_unit_test(test_backend_shares_one_copy),
        cmocka_unit_test(test_model_two_contexts),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
