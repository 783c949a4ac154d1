/* test_decode_sample.c - forge_decode_sample on the CPU backend against forge_decode +
 * forge_sampler_sample (same seed, same ids over 32 steps on stories260K), the device filler
 * sampler_dev_prepare (its draw and window give the pick forge_sampler_sample makes, computed
 * here from forge_sampler_probs + r), and the error paths. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "forge.h"
#include "sample/sampler_dev.h"
#include "testutil.h"

#define MODEL "testdata/models/stories260K.gguf"
#define STEPS 32

static forge_sampler *make_sampler(const forge_sampler_params *p, int32_t n_vocab)
{
    forge_err err = {0};
    forge_sampler *s = NULL;
    if (forge_sampler_create(p, n_vocab, &s, &err)) fail_msg("sampler: %s", err.msg);
    return s;
}

/* STEPS ids after the prompt: forge_decode + forge_sampler_sample (with_sample false) or
 * forge_decode_sample (true), from position 0 of ctx. */
static void generate(forge_context *ctx, const forge_sampler_params *p, const int32_t *prompt,
                     int32_t n_prompt, bool with_sample, int32_t *out)
{
    forge_err err = {0};
    int32_t V = forge_model_info_get(forge_context_model(ctx))->n_vocab, next = -1;
    forge_sampler *s = make_sampler(p, V);
    assert_int_equal(forge_kv_truncate(ctx, 0, &err), FORGE_OK);
    for (int32_t i = 0; i < n_prompt; i++)
        forge_sampler_accept(s, prompt[i]);
    int rc = with_sample ? forge_decode_sample(ctx, prompt, n_prompt, s, &next, &err)
                         : forge_decode(ctx, prompt, n_prompt, false, &err);
    if (rc) fail_msg("decode: %s", err.msg);
    for (int i = 0; i < STEPS; i++) {
        int32_t id;
        if (with_sample) {
            assert_null(forge_get_logits(ctx, -1)); /* the logits are not kept */
            id = next;
        } else {
            id = forge_sampler_sample(s, forge_get_logits(ctx, -1));
        }
        assert_true(id >= 0 && id < V);
        forge_sampler_accept(s, id);
        out[i] = id;
        rc = with_sample ? forge_decode_sample(ctx, &id, 1, s, &next, &err)
                         : forge_decode(ctx, &id, 1, false, &err);
        if (rc) fail_msg("decode step %d: %s", i, err.msg);
    }
    forge_sampler_free(s);
}

static void test_same_ids(void **state)
{
    (void)state;
    char *path = tu_require_shared(MODEL);
    forge_err err = {0};
    forge_model *m = NULL;
    forge_context *ctx = NULL;
    if (forge_model_load(path, &m, &err)) fail_msg("load: %s", err.msg);
    forge_context_params cp = forge_context_default_params();
    cp.n_threads = 1;
    cp.n_ctx = 128;
    if (forge_context_create(m, &cp, &ctx, &err)) fail_msg("context: %s", err.msg);
    int32_t *prompt = NULL;
    size_t n_prompt = 0;
    const char *text = "Once upon a time, there was a little dog";
    assert_int_equal(forge_tok_encode(forge_model_tok(m), text, strlen(text), true, false, &prompt,
                                      &n_prompt, &err),
                     FORGE_OK);

    forge_sampler_params ps[5];
    ps[0] = forge_sampler_default_params(); /* top-k 40, top-p 0.95, min-p 0.05, T 0.8 */
    ps[0].seed = 7;
    ps[1] = ps[0];
    ps[1].temperature = 1.5f; /* flat: many different draws */
    ps[1].top_k = 0;          /* top-k off: the host path on a GPU too */
    ps[1].top_p = 1.0f;
    ps[1].min_p = 0.0f;
    ps[1].seed = 123;
    ps[2] = ps[0];
    ps[2].repeat_penalty = 1.3f;
    ps[2].presence_penalty = 0.4f;
    ps[2].frequency_penalty = 0.2f;
    ps[2].penalty_last_n = 16;
    ps[2].temperature = 1.2f;
    ps[2].seed = 99;
    ps[3] = ps[2];
    ps[3].temperature = 0.0f; /* greedy with penalties */
    ps[4] = ps[0];
    ps[4].top_k = 1024;
    ps[4].temperature = 2.0f;
    ps[4].top_p = 0.99f;
    ps[4].min_p = 0.0f;
    for (size_t k = 0; k < sizeof ps / sizeof ps[0]; k++) {
        int32_t a[STEPS], b[STEPS];
        generate(ctx, &ps[k], prompt, (int32_t)n_prompt, false, a);
        generate(ctx, &ps[k], prompt, (int32_t)n_prompt, true, b);
        for (int i = 0; i < STEPS; i++)
            if (a[i] != b[i])
                fail_msg("params %zu, step %d: decode+sample %d, decode_sample %d", k, i, a[i],
                         b[i]);
        int distinct = 0; /* the draws matter: the sampled runs are not all one token */
        for (int i = 1; i < STEPS; i++)
            distinct += a[i] != a[0];
        assert_true(distinct > 0);
    }

    /* errors: *next_id is -1, the position does not move */
    forge_sampler *s = make_sampler(&ps[0], 7),
                  *good = make_sampler(&ps[0], forge_model_info_get(m)->n_vocab);
    int32_t next = 5, pos = forge_context_pos(ctx);
    assert_int_equal(forge_decode_sample(ctx, prompt, 1, s, &next, &err), FORGE_E_INVALID);
    assert_int_equal(next, -1);
    assert_non_null(strstr(err.msg, "sampler"));
    next = 5;
    assert_int_equal(forge_decode_sample(ctx, prompt, 1, NULL, &next, &err), FORGE_E_INVALID);
    assert_int_equal(next, -1);
    assert_int_equal(forge_decode_sample(ctx, prompt, 1, good, NULL, &err), FORGE_E_INVALID);
    int32_t bad = 1 << 30;
    next = 5;
    int rc = forge_decode_sample(ctx, &bad, 1, good, &next, &err);
    assert_int_equal(rc, FORGE_E_RANGE);
    assert_int_equal(next, -1);
    assert_int_equal(forge_context_pos(ctx), pos);
    forge_sampler_free(s);
    forge_sampler_free(good);

    free(prompt);
    forge_context_free(ctx);
    forge_model_free(m);
    free(path);
}

typedef struct pick {
    int32_t id;
    float p;
} pick;

static int cmp_pick(const void *a, const void *b)
{
    const pick *x = a, *y = b;
    if (x->p > y->p) return -1;
    if (x->p < y->p) return 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

/* The draw over forge_sampler_probs: candidates by probability (larger first, smaller id on a
 * tie), the first whose cumulative p exceeds r, else the last. */
static int32_t pick_from_probs(const float *pr, int32_t n, double r, pick *tmp)
{
    int32_t m = 0;
    for (int32_t i = 0; i < n; i++)
        if (pr[i] > 0) tmp[m++] = (pick){i, pr[i]};
    qsort(tmp, (size_t)m, sizeof *tmp, cmp_pick);
    double cum = 0;
    for (int32_t i = 0; i < m; i++) {
        cum += tmp[i].p;
        if (r < cum) return tmp[i].id;
    }
    return tmp[m - 1].id;
}

/* sampler_dev_prepare's draw and window: the same pick as forge_sampler_sample on a twin. */
static void test_filler(void **state)
{
    (void)state;
    enum { N = 512 };
    static float x[N], pr[N];
    static pick tmp[N];
    uint64_t rs = 12345;
    forge_sampler_params cfg[3];
    cfg[0] = forge_sampler_default_params();
    cfg[0].seed = 3;
    cfg[1] = cfg[0];
    cfg[1].top_k = 0;
    cfg[1].temperature = 1.0f;
    cfg[1].repeat_penalty = 1.5f;
    cfg[1].frequency_penalty = 0.3f;
    cfg[1].penalty_last_n = 8;
    cfg[2] = cfg[1];
    cfg[2].temperature = 0.0f;
    for (int c = 0; c < 3; c++) {
        forge_sampler *a = make_sampler(&cfg[c], N), *b = make_sampler(&cfg[c], N);
        int differ = 0;
        int32_t first = -1;
        for (int it = 0; it < 200; it++) {
            for (int i = 0; i < N; i++) /* distinct logits */
                x[i] = 3.0f * tu_rand_uniform(&rs) + (float)i * 1e-4f;
            int32_t want = forge_sampler_sample(a, x);
            be_sample bs;
            double r = -1;
            sampler_dev_prepare(b, &bs, &r);
            forge_sampler_probs(b, x, pr);
            int32_t got = pick_from_probs(pr, N, r, tmp);
            if (got != want) fail_msg("config %d, step %d: sample %d, filler %d", c, it, want, got);
            assert_int_equal(sampler_pick(b, x, r), want);
            if (cfg[c].temperature > 0) {
                assert_true(r >= 0 && r < 1);
                assert_true(bs.r == (float)r || (bs.r < 1.0f && (float)r == 1.0f));
                assert_true(sampler_dev_fits(b) == (cfg[c].top_k >= 1));
            } else {
                assert_true(r == 0 && bs.temperature <= 0 && sampler_dev_fits(b));
            }
            /* the window: distinct ids, counts = the accepted tokens it holds */
            int32_t total = 0;
            for (int32_t i = 0; i < bs.n_pen; i++) {
                total += bs.pen_counts[i];
                for (int32_t j = 0; j < i; j++)
                    assert_int_not_equal(bs.pen_ids[i], bs.pen_ids[j]);
            }
            if (cfg[c].repeat_penalty != 1.0f)
                assert_int_equal(total, it < cfg[c].penalty_last_n ? it : cfg[c].penalty_last_n);
            else
                assert_int_equal(bs.n_pen, 0);
            int32_t acc = it % 3 ? want : it % 7; /* repeats in the window */
            forge_sampler_accept(a, acc);
            forge_sampler_accept(b, acc);
            if (first < 0) first = want;
            differ += want != first;
        }
        assert_true(differ > 0);
        forge_sampler_free(a);
        forge_sampler_free(b);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_filler),
        cmocka_unit_test(test_same_ids),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
