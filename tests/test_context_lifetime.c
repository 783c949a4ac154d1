/* test_context_lifetime.c - contexts sharing one model, and the in/out aliasing of the decode
 * calls, on the CPU backend (stories260K):
 *   - two contexts on one model, the first freed in the middle of the second's generation: the
 *     second's greedy ids equal those of a context that ran alone (the GPU variant, with device
 *     weights shared by reference count, is tests/gpu/test_gpu_lifetime.c);
 *   - a third context created after both are freed gives the same ids again;
 *   - forge_decode_greedy(ctx, &next, 1, &next, &err) and forge_decode_sample with the output
 *     aliasing an input id: the same ids as with separate variables (issue 10: the output was
 *     reset to -1 before the input was read, "token id -1 ... outside the vocabulary"). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "forge.h"
#include "testutil.h"

#define MODEL "testdata/models/stories260K.gguf"
#define N_GEN 24

typedef struct fixture {
    char *path;
    forge_model *m;
    int32_t *prompt;
    size_t n_prompt;
    int32_t ref[N_GEN]; /* greedy ids of a context alone */
} fixture;

static forge_context *make_ctx(forge_model *m)
{
    forge_err err = {0};
    forge_context *ctx = NULL;
    forge_context_params cp = forge_context_default_params();
    cp.n_threads = 1;
    cp.n_ctx = 96;
    if (forge_context_create(m, &cp, &ctx, &err)) fail_msg("context: %s", err.msg);
    assert_null(forge_context_warning(ctx));
    return ctx;
}

/* The prompt, then n greedy ids into out (separate input and output variables). */
static void greedy_separate(forge_context *ctx, const fixture *f, int n, int32_t *out)
{
    forge_err err = {0};
    int32_t in = -1, next = -1;
    assert_int_equal(forge_kv_truncate(ctx, 0, &err), FORGE_OK);
    if (forge_decode_greedy(ctx, f->prompt, (int32_t)f->n_prompt, &next, &err))
        fail_msg("prompt: %s", err.msg);
    for (int i = 0; i < n; i++) {
        out[i] = next;
        in = next;
        if (forge_decode_greedy(ctx, &in, 1, &next, &err)) fail_msg("step %d: %s", i, err.msg);
    }
}

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof *f);
    forge_err err = {0};
    f->path = tu_shared_path(MODEL);
    *state = f;
    if (!f->path) return 0; /* each test skips visibly */
    if (forge_model_load(f->path, &f->m, &err)) {
        print_message("load: %s\n", err.msg);
        return -1;
    }
    const char *text = "Once upon a time, there was a little dog";
    if (forge_tok_encode(forge_model_tok(f->m), text, strlen(text), true, false, &f->prompt,
                         &f->n_prompt, &err))
        return -1;
    forge_context *ctx = make_ctx(f->m);
    greedy_separate(ctx, f, N_GEN, f->ref);
    forge_context_free(ctx);
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    free(f->prompt);
    forge_model_free(f->m);
    free(f->path);
    free(f);
    return 0;
}

static fixture *need(void **state)
{
    fixture *f = *state;
    if (!f->path) {
        print_message("SKIP: shared test data %s/%s is absent\n", tu_shared_root(), MODEL);
        skip();
    }
    return f;
}

/* A and B on one model: both take the prompt, B generates 8 ids, A 4, A is freed, B goes on to
 * N_GEN: B's ids (and A's 4) are the ids of a context alone. Then a third context, created after
 * both are freed, gives them again. */
static void test_two_contexts_free_first(void **state)
{
    fixture *f = need(state);
    forge_err err = {0};
    forge_context *a = make_ctx(f->m), *b = make_ctx(f->m);
    int32_t ida[4], idb[N_GEN], next_a = -1, next_b = -1;
    assert_int_equal(forge_decode_greedy(a, f->prompt, (int32_t)f->n_prompt, &next_a, &err), 0);
    assert_int_equal(forge_decode_greedy(b, f->prompt, (int32_t)f->n_prompt, &next_b, &err), 0);
    for (int i = 0; i < N_GEN; i++) {
        if (i < 4 && a) {
            ida[i] = next_a;
            assert_int_equal(forge_decode_greedy(a, &ida[i], 1, &next_a, &err), 0);
        }
        if (i == 8) {
            forge_context_free(a); /* in the middle of B's generation */
            a = NULL;
        }
        idb[i] = next_b;
        if (forge_decode_greedy(b, &idb[i], 1, &next_b, &err)) fail_msg("B %d: %s", i, err.msg);
    }
    assert_memory_equal(ida, f->ref, sizeof ida);
    assert_memory_equal(idb, f->ref, sizeof idb);
    forge_context_free(b);
    forge_context *c = make_ctx(f->m);
    int32_t idc[N_GEN];
    greedy_separate(c, f, N_GEN, idc);
    assert_memory_equal(idc, f->ref, sizeof idc);
    forge_context_free(c);
}

/* The natural loop: the output variable is the input. */
static void test_greedy_aliasing(void **state)
{
    fixture *f = need(state);
    forge_err err = {0};
    forge_context *ctx = make_ctx(f->m);
    int32_t ids[N_GEN], next = -1;
    /* the output aliasing the last prompt id: the prompt is read first */
    int32_t *prompt = malloc(f->n_prompt * sizeof *prompt);
    memcpy(prompt, f->prompt, f->n_prompt * sizeof *prompt);
    assert_int_equal(
        forge_decode_greedy(ctx, prompt, (int32_t)f->n_prompt, &prompt[f->n_prompt - 1], &err),
        FORGE_OK);
    next = prompt[f->n_prompt - 1];
    for (int i = 0; i < N_GEN; i++) {
        ids[i] = next;
        int rc = forge_decode_greedy(ctx, &next, 1, &next, &err);
        if (rc) fail_msg("step %d: %s (%s)", i, err.msg, forge_status_name(rc));
    }
    assert_memory_equal(ids, f->ref, sizeof ids);
    /* an error still gives -1: position beyond the context, nothing is read or run */
    int32_t bad = 5;
    assert_int_equal(forge_kv_truncate(ctx, 0, &err), FORGE_OK);
    int32_t *many = calloc(200, sizeof *many);
    many[199] = 7;
    assert_int_equal(forge_decode_greedy(ctx, many, 200, &many[199], &err), FORGE_E_RANGE);
    assert_int_equal(many[199], -1);
    bad = 1 << 30; /* outside the vocabulary */
    assert_int_equal(forge_decode_greedy(ctx, &bad, 1, &bad, &err), FORGE_E_RANGE);
    assert_int_equal(bad, -1);
    free(many);
    free(prompt);
    forge_context_free(ctx);
}

/* forge_decode_sample with next_id aliasing the input: the same ids as separate variables. */
static void test_sample_aliasing(void **state)
{
    fixture *f = need(state);
    forge_err err = {0};
    forge_context *ctx = make_ctx(f->m);
    const int32_t V = forge_model_info_get(f->m)->n_vocab;
    forge_sampler_params sp = forge_sampler_default_params();
    sp.seed = 42;
    int32_t sep[N_GEN], ali[N_GEN];
    for (int pass = 0; pass < 2; pass++) {
        forge_sampler *s = NULL;
        assert_int_equal(forge_sampler_create(&sp, V, &s, &err), FORGE_OK);
        assert_int_equal(forge_kv_truncate(ctx, 0, &err), FORGE_OK);
        int32_t next = -1, in = -1;
        assert_int_equal(forge_decode_sample(ctx, f->prompt, (int32_t)f->n_prompt, s, &next, &err),
                         FORGE_OK);
        for (int i = 0; i < N_GEN; i++) {
            int32_t *out = pass ? ali : sep;
            out[i] = next;
            forge_sampler_accept(s, next);
            int rc;
            if (pass) {
                rc = forge_decode_sample(ctx, &next, 1, s, &next, &err);
            } else {
                in = next;
                rc = forge_decode_sample(ctx, &in, 1, s, &next, &err);
            }
            if (rc) fail_msg("pass %d step %d: %s", pass, i, err.msg);
        }
        forge_sampler_free(s);
    }
    assert_memory_equal(ali, sep, sizeof ali);
    int32_t bad = -3;
    assert_int_equal(forge_decode_sample(ctx, &bad, 1, NULL, &bad, &err), FORGE_E_INVALID);
    assert_int_equal(bad, -1);
    forge_context_free(ctx);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_two_contexts_free_first),
        cmocka_unit_test(test_greedy_aliasing),
        cmocka_unit_test(test_sample_aliasing),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
