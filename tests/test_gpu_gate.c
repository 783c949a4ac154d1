/* test_gpu_gate.c - the GPU gate of the architecture table (src/model/arch.c arch_desc.gpu,
 * decided in src/model/fwd.c create_gpu): every family, issue 15's included since their GPU
 * path was checked on the H200, reaches the GPU backend: a GPU context is never refused for its
 * architecture or for its experts (on this machine it fails at the GPU library or the device
 * instead, with that reason), no environment switch is needed or read, and --device auto still
 * gives a working context (the CPU where there is no GPU). Runs without a GPU (CI). */
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
    static const char *shapes[] = {"tiny",      "tiny-qwen2",  "tiny-qwen3",     "tiny-gemma2",
                                   "tiny-gemma3", "tiny-phi3", "tiny-phi3-128k", "tiny-chatglm",
                                   "tiny-glm4", "tiny-mixtral", "tiny-qwen3moe"};
    for (size_t i = 0; i < sizeof shapes / sizeof *shapes; i++) {
        forge_model *m = load_shape(dir, shapes[i]);
        forge_err err;
        const char *dev = NULL;
        int rc = try_ctx(m, FORGE_DEVICE_GPU, &err, &dev);
        print_message("%s, GPU: %d %s\n", shapes[i], rc, rc ? err.msg : dev);
        if (rc) {
            /* no GPU here: refused by the library or the device, never by the architecture */
            assert_null(strstr(err.msg, "does not run"));
            assert_null(strstr(err.msg, "mixture-of-experts"));
            assert_null(strstr(err.msg, "FORGE_GPU_NEW_ARCHS"));
        } else {
            assert_non_null(dev);
            assert_string_not_equal(dev, "CPU");
        }
        assert_int_equal(try_ctx(m, FORGE_DEVICE_AUTO, &err, &dev), 0);
        assert_non_null(dev);
        forge_model_free(m);
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
