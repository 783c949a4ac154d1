/* test_tp.c - tensor parallelism on the CPU (src/backend/backend_tp.c, src/model/tp.c,
 * src/backend/comm_host.c): the in-process communicator's sums and gathers, the backend's ops
 * on hand-made uneven splits, then TP = 2 and 4 (and 1: the same path with one rank) against
 * no tensor parallelism on real and synthetic models of every family (logits of a prompt and
 * of single decode steps, F32 math and the default mixed-precision kernels, float and
 * quantized weights; the engine's batched, paged path with sequences sharing a prefix), and
 * the plans it refuses (head counts, block boundaries, rank counts) with messages that name
 * the problem. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend_tp.h"
#include "backend/comm.h"
#include "forge.h"
#include "forge_engine.h"
#include "forge_gguf.h"
#include "forge_quantize.h"
#include "forge_synth.h"
#include "testutil.h"

static char *g_dir;

/* ---- the host communicator ---------------------------------------------------------------- */

static void test_comm_host_reduce(void **state)
{
    (void)state;
    be_comm *c = NULL;
    forge_err err = {0};
    assert_int_equal(comm_host_create(3, &c, &err), FORGE_OK);
    /* rank order: (1e8 + 1) + -1e8 is 0 in float, any other order gives 1 */
    float b0[4] = {1e8f, 1.0f, 2.0f, -0.0f}, b1[4] = {1.0f, 2.0f, 3.0f, -0.0f},
          b2[4] = {-1e8f, 3.0f, 4.0f, -0.0f};
    float *bufs[3] = {b0, b1, b2};
    assert_int_equal(c->ops->all_reduce_sum(c, bufs, 4, &err), FORGE_OK);
    const float want[4] = {0.0f, 6.0f, 9.0f, -0.0f};
    for (int r = 0; r < 3; r++)
        assert_memory_equal(bufs[r], want, sizeof want);
    c->ops->destroy(c);
    assert_int_equal(comm_host_create(0, &c, &err), FORGE_E_INVALID);
    assert_null(c);
    assert_int_equal(comm_host_create(COMM_MAX_RANK + 1, &c, &err), FORGE_E_INVALID);
    assert_non_null(strstr(err.msg, "ranks"));
}

static void test_comm_host_gather(void **state)
{
    (void)state;
    be_comm *c = NULL;
    forge_err err = {0};
    assert_int_equal(comm_host_create(3, &c, &err), FORGE_OK);
    /* 2 rows; rank r holds cols[r] columns with values 100 r + 10 row + col */
    const int64_t cols[3] = {2, 1, 3};
    float s0[4], s1[2], s2[6], r0[12], r1[12], r2[12];
    float *send[3] = {s0, s1, s2}, *recv[3] = {r0, r1, r2};
    for (int r = 0; r < 3; r++)
        for (int i = 0; i < 2; i++)
            for (int j = 0; j < cols[r]; j++)
                send[r][i * cols[r] + j] = (float)(100 * r + 10 * i + j);
    assert_int_equal(c->ops->all_gather_cols(c, (const float *const *)send, recv, 2, cols, &err),
                     FORGE_OK);
    const float want[12] = {0, 1, 100, 200, 201, 202, 10, 11, 110, 210, 211, 212};
    for (int r = 0; r < 3; r++)
        assert_memory_equal(recv[r], want, sizeof want);
    const int64_t bad[3] = {1, -1, 1};
    assert_int_not_equal(c->ops->all_gather_cols(c, (const float *const *)send, recv, 2, bad, &err),
                         FORGE_OK);
    c->ops->destroy(c);
}

/* ---- the backend's ops on hand-made weights ------------------------------------------------ */

/* y[t][o] = sum_i w[o][i] x[t][i] in double */
static void ref_matmul(const float *w, const float *x, float *y, int n_out, int n_in, int n_tok)
{
    for (int t = 0; t < n_tok; t++)
        for (int o = 0; o < n_out; o++) {
            double acc = 0;
            for (int i = 0; i < n_in; i++)
                acc += (double)w[o * n_in + i] * x[t * n_in + i];
            y[t * n_out + o] = (float)acc;
        }
}

static void assert_close(const float *a, const float *b, int n)
{
    for (int i = 0; i < n; i++)
        if (fabsf(a[i] - b[i]) > 1e-5f * (1.0f + fabsf(b[i])))
            fail_msg("element %d: %g, expected %g", i, a[i], b[i]);
}

/* Two CPU ranks, uneven splits: W1 [8 -> 6] by rows {0..1, 2..5}, W2 [6 -> 4] by columns on the
 * same ranges (its input is W1's split output), W3 [8 -> 5] by rows then gathered. The split
 * output read back whole, the all-reduced and the gathered results equal the plain products;
 * inputs in the wrong layout and a KV row that does not split are refused. */
static void test_tp_ops(void **state)
{
    (void)state;
    enum { T = 2 };
    float w1[6 * 8], w2[4 * 6], w3[5 * 8], x[T * 8];
    uint64_t seed = 5;
    for (int i = 0; i < 48; i++) w1[i] = tu_rand_uniform(&seed);
    for (int i = 0; i < 24; i++) w2[i] = tu_rand_uniform(&seed);
    for (int i = 0; i < 40; i++) w3[i] = tu_rand_uniform(&seed);
    for (int i = 0; i < T * 8; i++) x[i] = tu_rand_uniform(&seed);
    be_weight W[3] = {
        {"w1", GGML_TYPE_F32, 8, 6, sizeof w1, w1, 0},
        {"w2", GGML_TYPE_F32, 6, 4, sizeof w2, w2, 1},
        {"w3", GGML_TYPE_F32, 8, 5, sizeof w3, w3, 2},
    };
    be_weight *ws[3] = {&W[0], &W[1], &W[2]};
    tp_wplan wp[3] = {{TP_OUT, {0, 2}, {2, 6}}, {TP_IN, {0, 2}, {2, 6}},
                      {TP_OUT_GATHER, {0, 3}, {3, 5}}};
    tp_plan plan = {2, 3, wp};
    forge_err err = {0};
    tp_shares *sh = NULL;
    backend *ranks[2], *be = NULL;
    be_comm *comm = NULL;
    assert_int_equal(tp_shares_create(&plan, ws, 3, &sh, &err), FORGE_OK);
    assert_int_equal(backend_cpu_create(1, true, &ranks[0], &err), FORGE_OK);
    assert_int_equal(backend_cpu_create(1, true, &ranks[1], &err), FORGE_OK);
    assert_int_equal(comm_host_create(2, &comm, &err), FORGE_OK);
    assert_int_equal(backend_tp_create(ranks, 2, comm, sh, &be, &err), FORGE_OK);
    const be_ops *op = be->ops;
    be_buf *bx, *b1, *b2, *b3;
    assert_int_equal(op->buf_create(be, T * 8, &bx, &err), FORGE_OK);
    assert_int_equal(op->buf_create(be, T * 8, &b1, &err), FORGE_OK);
    assert_int_equal(op->buf_create(be, T * 8, &b2, &err), FORGE_OK);
    assert_int_equal(op->buf_create(be, T * 8, &b3, &err), FORGE_OK);
    /* x into the replicated buffer: the embedding of an identity table row by row */
    be_weight ex = {"x", GGML_TYPE_F32, 8, T, sizeof x, x, -1};
    const int32_t ids[T] = {0, 1};
    assert_int_equal(op->get_rows(be, bx, &ex, ids, T, &err), FORGE_OK);
    float y1[T * 6], y2[T * 4], y3[T * 5], got[T * 8];
    ref_matmul(w1, x, y1, 6, 8, T);
    ref_matmul(w2, y1, y2, 4, 6, T);
    ref_matmul(w3, x, y3, 5, 8, T);
    assert_int_equal(op->matmul(be, b1, &W[0], bx, T, &err), FORGE_OK);
    assert_int_equal(op->buf_read(be, b1, 0, T * 6, got, &err), FORGE_OK);
    assert_close(got, y1, T * 6);
    /* a split buffer is read in whole rows only */
    assert_int_equal(op->buf_read(be, b1, 1, 6, got, &err), FORGE_E_INTERNAL);
    assert_int_equal(op->matmul(be, b2, &W[1], b1, T, &err), FORGE_OK);
    assert_int_equal(op->buf_read(be, b2, 0, T * 4, got, &err), FORGE_OK);
    assert_close(got, y2, T * 4);
    assert_int_equal(op->matmul(be, b3, &W[2], bx, T, &err), FORGE_OK);
    assert_int_equal(op->buf_read(be, b3, 0, T * 5, got, &err), FORGE_OK);
    assert_close(got, y3, T * 5);
    /* a column-split weight on a whole input, a row-split one on a split input */
    assert_int_equal(op->matmul(be, b2, &W[1], bx, T, &err), FORGE_E_INTERNAL);
    assert_non_null(strstr(err.msg, "tensor parallel"));
    assert_int_equal(op->matmul(be, b3, &W[0], b1, T, &err), FORGE_E_INTERNAL);
    be_kv *kv = NULL;
    assert_int_equal(op->kv_create(be, 1, 16, 5, FORGE_KV_F32, &kv, &err), FORGE_E_INTERNAL);
    assert_null(kv);
    assert_int_equal(op->kv_create(be, 1, 16, 6, FORGE_KV_F32, &kv, &err), FORGE_OK);
    op->kv_free(be, kv);
    be_buf *bufs[] = {bx, b1, b2, b3};
    for (int i = 0; i < 4; i++)
        op->buf_free(be, bufs[i]);
    op->destroy(be);
}

/* ---- models ------------------------------------------------------------------------------- */

static char *path_in_dir(const char *name)
{
    size_t n = strlen(g_dir) + strlen(name) + 2;
    char *p = malloc(n);
    assert_non_null(p);
    snprintf(p, n, "%s/%s", g_dir, name);
    return p;
}

static char *synth(const char *shape, int type)
{
    char name[96];
    snprintf(name, sizeof name, "%s-%s.gguf", shape, ggml_type_name(type));
    char *path = path_in_dir(name);
    synth_opts so = {shape, type, path, NULL, 7};
    forge_err err = {0};
    if (synth_write(&so, NULL, &err)) fail_msg("synth %s: %s", shape, err.msg);
    return path;
}

static char *quantize(const char *src, const char *mix, const char *name)
{
    char *out = path_in_dir(name);
    forge_quantize_opts o = {0};
    o.in_path = src;
    o.out_path = out;
    o.mix = forge_quantize_mix_find(mix);
    o.pure = true;
    o.n_threads = 1;
    forge_err err = {0};
    assert_true(o.mix >= 0);
    if (forge_quantize_file(&o, NULL, &err)) fail_msg("quantize %s: %s", mix, err.msg);
    return out;
}

enum { N_PROMPT = 12, N_STEPS = 4, N_ROWS = N_PROMPT + N_STEPS };

/* Logits of every position of a 12-id prompt (one batch) and of 4 single decode steps fed the
 * greedy ids, [N_ROWS][n_vocab] (malloc'd), with n_tp ranks on the CPU (0: no tensor
 * parallelism, the plain CPU backend). */
static float *run_logits(forge_model *m, int n_tp, bool f32_math, int32_t *n_vocab)
{
    forge_context_params cp = forge_context_default_params();
    cp.device = FORGE_DEVICE_CPU;
    cp.n_threads = 1;
    cp.n_ctx = 64;
    cp.f32_math = f32_math;
    cp.n_tp = n_tp;
    forge_context *ctx = NULL;
    forge_err err = {0};
    if (forge_context_create(m, &cp, &ctx, &err)) fail_msg("tp %d: %s", n_tp, err.msg);
    const int32_t V = forge_model_info_get(m)->n_vocab;
    float *out = malloc((size_t)N_ROWS * (size_t)V * sizeof *out);
    assert_non_null(out);
    int32_t ids[N_PROMPT];
    for (int i = 0; i < N_PROMPT; i++)
        ids[i] = (int32_t)((i * 37 + 5) % V);
    if (forge_decode(ctx, ids, N_PROMPT, true, &err)) fail_msg("tp %d: %s", n_tp, err.msg);
    for (int i = 0; i < N_PROMPT; i++)
        memcpy(out + (size_t)i * V, forge_get_logits(ctx, i), (size_t)V * sizeof *out);
    for (int s = 0; s < N_STEPS; s++) {
        const float *prev = out + (size_t)(N_PROMPT + s - 1) * V;
        int32_t id = 0;
        for (int32_t j = 1; j < V; j++)
            if (prev[j] > prev[id]) id = j;
        if (forge_decode(ctx, &id, 1, false, &err)) fail_msg("tp %d: %s", n_tp, err.msg);
        memcpy(out + (size_t)(N_PROMPT + s) * V, forge_get_logits(ctx, -1),
               (size_t)V * sizeof *out);
    }
    forge_context_free(ctx);
    *n_vocab = V;
    return out;
}

/* TP = n_tp against no tensor parallelism, row by row (TP 1: the same path with one rank). F32
 * math: NMSE <= 1e-6 (the bar; seen: below
 * 1e-12, the sums only add in another order) and the same greedy id. Default math: NMSE <= 1e-3
 * and the same greedy id unless the reference's pick leads by < 0.01: the activations are
 * quantized to Q8 per block, and a partial sum added in another order can round one of them
 * the other way (seen: up to 7e-5 on tiny-gqa Q4_0 over 4 ranks, below 2e-7 elsewhere). */
static void check_model(const char *path, const int *tps, int n_tps)
{
    forge_model *m = NULL;
    forge_err err = {0};
    if (forge_model_load(path, &m, &err)) fail_msg("load %s: %s", path, err.msg);
    for (int f = 0; f < 2; f++) {
        int32_t V;
        float *ref = run_logits(m, 0, f == 0, &V);
        for (int k = 0; k < n_tps; k++) {
            int32_t V2;
            float *got = run_logits(m, tps[k], f == 0, &V2);
            assert_int_equal(V, V2);
            for (int row = 0; row < N_ROWS; row++) {
                const float *a = got + (size_t)row * V, *b = ref + (size_t)row * V;
                double e = tu_nmse(a, b, (size_t)V);
                if (!(e <= (f == 0 ? 1e-6 : 1e-3)))
                    fail_msg("%s, tp %d, %s math, row %d: logits NMSE %.3g without tp", path,
                             tps[k], f == 0 ? "f32" : "default", row, e);
                int32_t ia = 0, ib = 0;
                for (int32_t j = 1; j < V; j++) {
                    if (a[j] > a[ia]) ia = j;
                    if (b[j] > b[ib]) ib = j;
                }
                float gap = INFINITY; /* the reference's margin of its greedy pick */
                for (int32_t j = 0; j < V; j++)
                    if (j != ib && b[ib] - b[j] < gap) gap = b[ib] - b[j];
                if (ia != ib && (f == 0 || gap > 0.01f))
                    fail_msg("%s, tp %d, row %d: greedy id %d, without tp: %d", path, tps[k], row, ia,
                             ib);
            }
            free(got);
        }
        free(ref);
    }
    forge_model_free(m);
}

static void test_tp_stories(void **state)
{
    (void)state;
    char *p = tu_require_shared("testdata/models/stories260K.gguf");
    const int tps[] = {1, 2, 4};
    check_model(p, tps, 3);
    free(p);
}

/* 8 heads over 4 KV heads (GQA), float and block weights: TP_IN columns of whole blocks */
static void test_tp_gqa(void **state)
{
    (void)state;
    const int types[] = {GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_Q8_0, GGML_TYPE_Q4_0};
    const int tps[] = {2, 4};
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
        char *p = synth("tiny-gqa", types[i]);
        check_model(p, tps, 2);
        free(p);
    }
    /* K-quants (blocks of 256): over 2 ranks attn_output's 512 columns are one block each */
    char *f32 = synth("tiny-gqa", GGML_TYPE_F32);
    char *q4k = quantize(f32, "Q4_K_M", "gqa-q4k.gguf");
    check_model(q4k, (const int[]){2}, 1);
    free(q4k);
    free(f32);
}

/* The other families: tied output (vocabulary gathered from the embedding's split), q/k/v
 * biases (qwen2), q/k norms (qwen3), Gemma's soft-caps, post-norms, GELU and q scaling, Phi-3's
 * fused QKV and gate/up views, GLM's partial rotary, and replicated experts (Mixtral). */
static void test_tp_families(void **state)
{
    (void)state;
    const char *shapes[] = {"tiny",        "tiny-qwen2", "tiny-qwen3",  "tiny-gemma2",
                            "tiny-gemma3", "tiny-phi3",  "tiny-chatglm", "tiny-glm4",
                            "tiny-mixtral"};
    const int tps[] = {2};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        char *p = synth(shapes[i], GGML_TYPE_F32);
        check_model(p, tps, 1);
        free(p);
    }
}

/* The engine (batched steps over a paged cache, blocks copied on write when sequences share
 * a prompt prefix) gives the same greedy ids with TP 2 as without. */
typedef struct gen {
    int32_t ids[64];
    int n;
    forge_finish fin;
} gen;

static void on_event(const forge_event *ev, void *user)
{
    gen *g = user;
    if (ev->token >= 0 && g->n < 64) g->ids[g->n++] = ev->token;
    if (ev->finish != FORGE_FINISH_NONE) g->fin = ev->finish;
}

static void engine_ids(forge_model *m, int n_tp, gen out[3])
{
    forge_engine_params ep = forge_engine_default_params();
    ep.device = FORGE_DEVICE_CPU;
    ep.n_threads = 1;
    ep.n_ctx = 64;
    ep.n_tp = n_tp;
    ep.n_parallel = 3;
    forge_engine *e = NULL;
    forge_err err = {0};
    if (forge_engine_create(m, &ep, &e, &err)) fail_msg("engine tp %d: %s", n_tp, err.msg);
    /* the first 20 ids shared (a block of 16 reused from the prefix cache), then different */
    int32_t prompts[3][24];
    for (int r = 0; r < 3; r++)
        for (int i = 0; i < 24; i++)
            prompts[r][i] = (int32_t)(i < 20 ? 3 + i * 7 : 11 + r * 5 + i) % 500;
    memset(out, 0, 3 * sizeof *out);
    for (int r = 0; r < 3; r++) {
        forge_request_params rp = forge_request_default_params();
        rp.prompt = prompts[r];
        rp.n_prompt = 24;
        rp.max_tokens = 12;
        rp.ignore_eos = true;
        rp.on_event = on_event;
        rp.user = &out[r];
        forge_req_id id;
        if (forge_engine_submit(e, &rp, &id, &err)) fail_msg("submit: %s", err.msg);
        if (r == 0 && forge_engine_run(e, &err)) fail_msg("run: %s", err.msg);
    }
    if (forge_engine_run(e, &err)) fail_msg("run: %s", err.msg);
    forge_engine_free(e);
}

static void test_tp_engine(void **state)
{
    (void)state;
    char *p = tu_require_shared("testdata/models/stories260K.gguf");
    forge_model *m = NULL;
    forge_err err = {0};
    assert_int_equal(forge_model_load(p, &m, &err), FORGE_OK);
    gen a[3], b[3];
    engine_ids(m, 0, a);
    engine_ids(m, 2, b);
    for (int r = 0; r < 3; r++) {
        assert_int_equal(a[r].fin, FORGE_FINISH_LENGTH);
        assert_int_equal(a[r].n, 12);
        assert_int_equal(b[r].n, a[r].n);
        assert_memory_equal(b[r].ids, a[r].ids, sizeof(int32_t) * (size_t)a[r].n);
    }
    forge_model_free(m);
    free(p);
}

/* ---- refused plans -------------------------------------------------------------------------- */

static int try_tp(const char *path, int n_tp, forge_device dev, forge_err *err)
{
    forge_model *m = NULL;
    if (forge_model_load(path, &m, err)) fail_msg("load %s: %s", path, err->msg);
    forge_context_params cp = forge_context_default_params();
    cp.device = dev;
    cp.n_threads = 1;
    cp.n_ctx = 32;
    cp.n_tp = n_tp;
    forge_context *ctx = NULL;
    int rc = forge_context_create(m, &cp, &ctx, err);
    if (!rc) assert_non_null(ctx);
    forge_context_free(ctx);
    forge_model_free(m);
    return rc;
}

static void test_tp_refused(void **state)
{
    (void)state;
    forge_err err = {0};
    char *tiny = synth("tiny", GGML_TYPE_F32); /* 4 heads, 2 KV heads */
    assert_int_equal(try_tp(tiny, 4, FORGE_DEVICE_CPU, &err), FORGE_E_INVALID);
    assert_non_null(strstr(err.msg, "--tp 4"));
    assert_non_null(strstr(err.msg, "4 attention heads and 2 KV heads"));
    assert_int_equal(try_tp(tiny, 3, FORGE_DEVICE_CPU, &err), FORGE_E_INVALID);
    assert_int_equal(try_tp(tiny, COMM_MAX_RANK + 1, FORGE_DEVICE_CPU, &err), FORGE_E_INVALID);
    assert_non_null(strstr(err.msg, "ranks"));
    assert_int_equal(try_tp(tiny, -1, FORGE_DEVICE_CPU, &err), FORGE_E_INVALID);
    assert_int_equal(try_tp(tiny, 1, FORGE_DEVICE_CPU, &err), FORGE_OK);
    assert_int_equal(try_tp(tiny, 2, FORGE_DEVICE_CPU, &err), FORGE_OK);
    /* Q4_K: 4 ranks of 2 heads would hold 128 of attn_output's columns, half a block each */
    char *f32 = synth("tiny-gqa", GGML_TYPE_F32);
    char *q4k = quantize(f32, "Q4_K_M", "gqa-q4k-r.gguf");
    assert_int_equal(try_tp(q4k, 2, FORGE_DEVICE_CPU, &err), FORGE_OK);
    assert_int_equal(try_tp(q4k, 4, FORGE_DEVICE_CPU, &err), FORGE_E_UNSUPPORTED);
    assert_non_null(strstr(err.msg, "--tp 4"));
    assert_non_null(strstr(err.msg, "blk.0.attn_output.weight"));
    assert_non_null(strstr(err.msg, "Q4_K"));
    /* over GPUs: this machine has none usable (or no GPU library): an error, not a CPU run */
    const int rc = try_tp(tiny, 2, FORGE_DEVICE_AUTO, &err);
    if (rc == FORGE_OK) {
        print_message("note: a GPU backend is usable here; the no-GPU refusal is not checked\n");
    } else {
        assert_true(err.msg[0] != 0);
    }
    free(q4k);
    free(f32);
    free(tiny);
}

int main(void)
{
    g_dir = tu_mkdtemp();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_comm_host_reduce), cmocka_unit_test(test_comm_host_gather),
        cmocka_unit_test(test_tp_ops),
        cmocka_unit_test(test_tp_stories),       cmocka_unit_test(test_tp_gqa),
        cmocka_unit_test(test_tp_families),      cmocka_unit_test(test_tp_engine),
        cmocka_unit_test(test_tp_refused),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    tu_rmtree(g_dir);
    free(g_dir);
    return rc;
}
