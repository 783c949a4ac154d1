/* test_gpu_gate.c - the one switch of the unverified GPU path of issue 15's families
 * (src/model/fwd.c create_gpu, docs/GPU.md): without FORGE_GPU_NEW_ARCHS=1 a GPU context for
 * Gemma, Phi-3, GLM or a mixture of experts is refused before any GPU library is touched, with
 * a message naming the variable, and --device auto takes the CPU; with it, the refusal is gone
 * (on a machine without a GPU the context then fails at the library or the device instead). A
 * llama model never meets the switch. Runs without a GPU (CI). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "forge.h"
#include "forge_gguf.h"
#include "forge_model.h"
#include "forge_synth.h"
#include "testutil.h"

static forge_model *load_shape(const char *dir, const char *shape)
{
    char path[600];
    snprintf(path, sizeof path, "%s/%s.gguf", dir, shape);
    synth_opts so = {shape, GGML_TYPE_F32, path, NULL, 0};
    forge_err err = {0};
    assert_int_equal(synth_write(&so, NULL, &err), 0);
    forge_model *m = NULL;
    assert_int_equal(forge_model_load(path, &m, &err), 0);
    return m;
}

/* rc and message of a context on dev */
static int try_ctx(forge_model *m, forge_device dev, forge_err *err, const char **device)
{
    forge_context_params cp = forge_context_default_params();
    cp.device = dev;
    cp.n_ctx = 64;
    cp.n_threads = 1;
    forge_context *ctx = NULL;
    memset(err, 0, sizeof *err);
    int rc = forge_context_create(m, &cp, &ctx, err);
    if (device) *device = ctx ? forge_context_device(ctx) : NULL;
    if (ctx) forge_context_free(ctx);
    return rc;
}

static void test_gate(void **state)
{
    (void)state;
    char *dir = tu_mkdtemp();
    const char *old = getenv("FORGE_GPU_NEW_ARCHS");
    char *saved = old ? strdup(old) : NULL;
    static const char *gated[] = {"tiny-gemma2", "tiny-phi3", "tiny-glm4", "tiny-mixtral",
                                  "tiny-qwen3moe"};
    for (size_t i = 0; i < sizeof gated / sizeof *gated; i++) {
        forge_model *m = load_shape(dir, gated[i]);
        forge_err err;
        const char *dev = NULL;
        unsetenv("FORGE_GPU_NEW_ARCHS");
        int rc = try_ctx(m, FORGE_DEVICE_GPU, &err, NULL);
        print_message("%s, GPU, no switch: %d %s\n", gated[i], rc, err.msg);
        assert_int_equal(rc, FORGE_E_UNSUPPORTED);
        assert_non_null(strstr(err.msg, "FORGE_GPU_NEW_ARCHS=1"));
        assert_int_equal(try_ctx(m, FORGE_DEVICE_AUTO, &err, &dev), 0);
        assert_non_null(dev);
        assert_string_equal(dev, "CPU");
        setenv("FORGE_GPU_NEW_ARCHS", "0", 1); /* only "1" turns it on */
        assert_int_equal(try_ctx(m, FORGE_DEVICE_GPU, &err, NULL), FORGE_E_UNSUPPORTED);
        assert_non_null(strstr(err.msg, "FORGE_GPU_NEW_ARCHS=1"));
        setenv("FORGE_GPU_NEW_ARCHS", "1", 1);
        rc = try_ctx(m, FORGE_DEVICE_GPU, &err, NULL);
        print_message("%s, GPU, FORGE_GPU_NEW_ARCHS=1: %d %s\n", gated[i], rc, err.msg);
        /* past the switch: a GPU machine runs it, this one fails at the library or device */
        assert_null(strstr(err.msg, "FORGE_GPU_NEW_ARCHS"));
        assert_null(strstr(err.msg, "does not run"));
        forge_model_free(m);
    }
    /* llama: never gated */
    unsetenv("FORGE_GPU_NEW_ARCHS");
    forge_model *m = load_shape(dir, "tiny");
    forge_err err;
    (void)try_ctx(m, FORGE_DEVICE_GPU, &err, NULL);
    assert_null(strstr(err.msg, "FORGE_GPU_NEW_ARCHS"));
    forge_model_free(m);
    if (saved) {
        setenv("FORGE_GPU_NEW_ARCHS", saved, 1);
        free(saved);
    }
    tu_rmtree(dir);
    free(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gate),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
