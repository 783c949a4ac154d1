/* test_sampler.c - each sampler stage's effect on hand-made logits, read through
 * forge_sampler_probs (the distribution sample() draws from) and by drawing. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "forge.h"
#include "testutil.h"

#define NV 8

/* logits 0..7 in a shuffled order: id 5 is best, then 2, 7, 0, ... */
static const float L[NV] = {3.0f, 0.5f, 5.0f, -1.0f, 1.0f, 6.0f, -2.0f, 4.0f};

static forge_sampler *make(forge_sampler_params p)
{
    forge_sampler *s = NULL;
    forge_err err = {0};
    if (forge_sampler_create(&p, NV, &s, &err)) fail_msg("create: %s", err.msg);
    return s;
}

/* everything off but temperature 1 */
static forge_sampler_params plain(void)
{
    forge_sampler_params p = forge_sampler_default_params();
    p.temperature = 1.0f;
    p.top_k = 0;
    p.top_p = 1.0f;
    p.min_p = 0.0f;
    p.seed = 42;
    return p;
}

static int count_nonzero(const float *p)
{
    int n = 0;
    for (int i = 0; i < NV; i++)
        n += p[i] > 0;
    return n;
}

static double sum(const float *p)
{
    double s = 0;
    for (int i = 0; i < NV; i++)
        s += p[i];
    return s;
}

static void test_greedy(void **state)
{
    (void)state;
    forge_sampler_params p = plain();
    p.temperature = 0.0f;
    forge_sampler *s = make(p);
    float pr[NV];
    for (int i = 0; i < 20; i++)
        assert_int_equal(forge_sampler_sample(s, L), 5);
    forge_sampler_probs(s, L, pr);
    assert_int_equal(count_nonzero(pr), 1);
    assert_float_equal(pr[5], 1.0f, 0);
    /* a tie goes to the lowest id */
    const float tie[NV] = {0, 2, 1, 2, 0, 0, 0, 0};
    assert_int_equal(forge_sampler_sample(s, tie), 1);
    forge_sampler_free(s);
}

static void test_softmax_temperature(void **state)
{
    (void)state;
    float pr[NV], pr2[NV];
    forge_sampler *s = make(plain());
    forge_sampler_probs(s, L, pr);
    assert_float_equal(sum(pr), 1.0, 1e-6);
    double z = 0;
    for (int i = 0; i < NV; i++)
        z += exp(L[i]);
    for (int i = 0; i < NV; i++)
        assert_float_equal(pr[i], exp(L[i]) / z, 1e-6);
    forge_sampler_free(s);
    /* temperature 2 = softmax(L / 2): flatter */
    forge_sampler_params p = plain();
    p.temperature = 2.0f;
    s = make(p);
    forge_sampler_probs(s, L, pr2);
    z = 0;
    for (int i = 0; i < NV; i++)
        z += exp(L[i] / 2);
    for (int i = 0; i < NV; i++)
        assert_float_equal(pr2[i], exp(L[i] / 2) / z, 1e-6);
    assert_true(pr2[5] < pr[5]);
    forge_sampler_free(s);
}

static void test_top_k(void **state)
{
    (void)state;
    forge_sampler_params p = plain();
    p.top_k = 3;
    forge_sampler *s = make(p);
    float pr[NV];
    forge_sampler_probs(s, L, pr);
    assert_int_equal(count_nonzero(pr), 3);
    assert_true(pr[5] > 0 && pr[2] > 0 && pr[7] > 0);
    double z = exp(6.0) + exp(5.0) + exp(4.0);
    assert_float_equal(pr[2], exp(5.0) / z, 1e-6);
    for (int i = 0; i < 200; i++) {
        int32_t id = forge_sampler_sample(s, L);
        assert_true(id == 5 || id == 2 || id == 7);
    }
    forge_sampler_free(s);
}

static void test_top_p(void **state)
{
    (void)state;
    /* probabilities 0.5, 0.3, 0.15, 0.05 */
    const float l4[NV] = {logf(0.5f), logf(0.3f), logf(0.15f), logf(0.05f),
                          -INFINITY,  -INFINITY,  -INFINITY,   -INFINITY};
    float pr[NV];
    forge_sampler_params p = plain();
    p.top_p = 0.7f; /* 0.5 < 0.7 <= 0.8: keeps two */
    forge_sampler *s = make(p);
    forge_sampler_probs(s, l4, pr);
    assert_int_equal(count_nonzero(pr), 2);
    assert_float_equal(pr[0], 0.5 / 0.8, 1e-5);
    assert_float_equal(pr[1], 0.3 / 0.8, 1e-5);
    forge_sampler_free(s);
    p.top_p = 0.81f; /* needs the third */
    s = make(p);
    forge_sampler_probs(s, l4, pr);
    assert_int_equal(count_nonzero(pr), 3);
    forge_sampler_free(s);
    p.top_p = 0.0f; /* keeps at least one */
    s = make(p);
    forge_sampler_probs(s, l4, pr);
    assert_int_equal(count_nonzero(pr), 1);
    assert_float_equal(pr[0], 1.0f, 1e-6);
    forge_sampler_free(s);
}

static void test_min_p(void **state)
{
    (void)state;
    /* p relative to the best: 1, 0.6, 0.3, 0.1 */
    const float l4[NV] = {logf(0.5f), logf(0.3f), logf(0.15f), logf(0.05f),
                          -INFINITY,  -INFINITY,  -INFINITY,   -INFINITY};
    float pr[NV];
    forge_sampler_params p = plain();
    p.min_p = 0.25f; /* keeps 1, 0.6, 0.3 */
    forge_sampler *s = make(p);
    forge_sampler_probs(s, l4, pr);
    assert_int_equal(count_nonzero(pr), 3);
    assert_float_equal(pr[3], 0.0f, 0);
    assert_float_equal(pr[0], 0.5 / 0.95, 1e-5);
    forge_sampler_free(s);
}

static void test_penalties(void **state)
{
    (void)state;
    float pr[NV];
    /* repeat penalty 2: id 5 (logit 6 -> 3) and id 3 (logit -1 -> -2) */
    forge_sampler_params p = plain();
    p.temperature = 0.0f;
    p.repeat_penalty = 2.0f;
    p.penalty_last_n = 4;
    forge_sampler *s = make(p);
    assert_int_equal(forge_sampler_sample(s, L), 5);
    forge_sampler_accept(s, 5);
    assert_int_equal(forge_sampler_sample(s, L), 2); /* 5 now scores 3 < 5 */
    forge_sampler_free(s);

    p = plain();
    p.repeat_penalty = 2.0f;
    p.penalty_last_n = 4;
    s = make(p);
    forge_sampler_accept(s, 5);
    forge_sampler_accept(s, 3);
    forge_sampler_probs(s, L, pr);
    float pen[NV];
    memcpy(pen, L, sizeof pen);
    pen[5] = 3.0f;
    pen[3] = -2.0f;
    double z = 0;
    for (int i = 0; i < NV; i++)
        z += exp(pen[i]);
    for (int i = 0; i < NV; i++)
        assert_float_equal(pr[i], exp(pen[i]) / z, 1e-6);
    /* the window holds the last 4: after 4 more tokens, 5 and 3 are forgotten */
    for (int i = 0; i < 4; i++)
        forge_sampler_accept(s, 0);
    forge_sampler_probs(s, L, pr);
    assert_true(pr[5] > 0.5f);
    forge_sampler_free(s);

    /* presence 1 + frequency 0.5: id 2 seen twice -> 5 - 1 - 1 = 3 */
    p = plain();
    p.presence_penalty = 1.0f;
    p.frequency_penalty = 0.5f;
    p.penalty_last_n = 8;
    s = make(p);
    forge_sampler_accept(s, 2);
    forge_sampler_accept(s, 2);
    forge_sampler_probs(s, L, pr);
    memcpy(pen, L, sizeof pen);
    pen[2] = 3.0f;
    z = 0;
    for (int i = 0; i < NV; i++)
        z += exp(pen[i]);
    assert_float_equal(pr[2], exp(3.0) / z, 1e-6);
    /* reset forgets the window */
    forge_sampler_reset(s);
    forge_sampler_probs(s, L, pr);
    z = 0;
    for (int i = 0; i < NV; i++)
        z += exp(L[i]);
    assert_float_equal(pr[2], exp(5.0) / z, 1e-6);
    forge_sampler_free(s);
}

static void test_seed(void **state)
{
    (void)state;
    forge_sampler_params p = plain();
    p.temperature = 3.0f; /* flat: many different draws */
    forge_sampler *a = make(p), *b = make(p);
    p.seed = 43;
    forge_sampler *c = make(p);
    int32_t da[64], db[64];
    int differ = 0, hist[NV] = {0};
    for (int i = 0; i < 64; i++) {
        da[i] = forge_sampler_sample(a, L);
        db[i] = forge_sampler_sample(b, L);
        differ += forge_sampler_sample(c, L) != da[i];
        hist[da[i]]++;
    }
    assert_memory_equal(da, db, sizeof da);
    assert_true(differ > 0);
    int used = 0;
    for (int i = 0; i < NV; i++)
        used += hist[i] > 0;
    assert_true(used >= 4);
    /* reset restarts the stream */
    forge_sampler_reset(a);
    for (int i = 0; i < 64; i++)
        assert_int_equal(forge_sampler_sample(a, L), da[i]);
    forge_sampler_free(a);
    forge_sampler_free(b);
    forge_sampler_free(c);
}

/* Draw frequencies follow the distribution (top-k 2 at temperature 1: e^6 : e^5). */
static void test_draw_frequencies(void **state)
{
    (void)state;
    forge_sampler_params p = plain();
    p.top_k = 2;
    forge_sampler *s = make(p);
    int n5 = 0, n = 4000;
    for (int i = 0; i < n; i++)
        n5 += forge_sampler_sample(s, L) == 5;
    double expect = exp(6.0) / (exp(6.0) + exp(5.0)); /* 0.731 */
    assert_float_equal((double)n5 / n, expect, 0.03);
    forge_sampler_free(s);
}

static void test_bad_params(void **state)
{
    (void)state;
    forge_sampler *s = NULL;
    forge_err err = {0};
    forge_sampler_params p = plain();
    p.top_p = NAN;
    assert_int_equal(forge_sampler_create(&p, NV, &s, &err), FORGE_E_INVALID);
    assert_null(s);
    p = plain();
    p.repeat_penalty = 0.0f;
    assert_int_equal(forge_sampler_create(&p, NV, &s, &err), FORGE_E_INVALID);
    p = plain();
    assert_int_equal(forge_sampler_create(&p, 0, &s, &err), FORGE_E_INVALID);
    forge_sampler_free(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy),     cmocka_unit_test(test_softmax_temperature),
        cmocka_unit_test(test_top_k),      cmocka_unit_test(test_top_p),
        cmocka_unit_test(test_min_p),      cmocka_unit_test(test_penalties),
        cmocka_unit_test(test_seed),       cmocka_unit_test(test_draw_frequencies),
        cmocka_unit_test(test_bad_params),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
