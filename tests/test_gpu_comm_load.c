/* test_gpu_comm_load.c - the GPU communicator's clear errors where there is no GPU (issue 16),
 * for CPU CI:
 *   1. no GPU library: backend_gpu_count says which library it could not load
 *      (FORGE_E_UNSUPPORTED), and counts 0 GPUs;
 *   2. backend_gpu_comm_create refuses bad rank lists before touching any library: no ranks, too
 *      many, a missing rank, a CPU backend (FORGE_E_INVALID, naming the rank);
 *   3. no NCCL: with a GPU library built (`make gpu`: $BUILD/libforge_cuda.so, or
 *      FORGE_TEST_GPU_LIB), its comm_create with FORGE_NCCL_LIB naming a missing file says so and
 *      names FORGE_NCCL_LIB and LD_LIBRARY_PATH; a library that is not NCCL is refused by name; a
 *      GPU given twice is refused before NCCL is looked for. Skipped, and said, when no GPU
 *      library of this tree is built.
 * The device side (collectives, GPU backends) is tests/gpu/test_gpu_comm.c. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend/backend.h"
#include "backend/backend_gpu.h"
#include "backend/comm.h"
#include "forge.h"
#include "gpu/gpu_ops.h"
#include "testutil.h"

/* setenv/unsetenv with the old value kept, to put back */
typedef struct saved_env {
    const char *name;
    char *value; /* NULL: was unset */
} saved_env;

static saved_env env_save(const char *name)
{
    const char *v = getenv(name);
    saved_env s = {name, v ? strdup(v) : NULL};
    return s;
}

static void env_restore(saved_env *s)
{
    if (s->value)
        setenv(s->name, s->value, 1);
    else
        unsetenv(s->name);
    free(s->value);
    s->value = NULL;
}

/* Runs first: the GPU library is loaded once per process, and nothing has loaded it yet. */
static void test_no_gpu_library(void **state)
{
    (void)state;
    saved_env lib = env_save("FORGE_GPU_LIB");
    const char *missing = "/nonexistent/forge-test/libforge_cuda.so";
    setenv("FORGE_GPU_LIB", missing, 1);
    forge_err err = {0};
    int n = 42;
    int rc = backend_gpu_count(&n, &err);
    print_message("backend_gpu_count without a GPU library: %s: %s\n", forge_status_name(rc),
                  err.msg);
    assert_int_equal(rc, FORGE_E_UNSUPPORTED);
    assert_int_equal(err.code, FORGE_E_UNSUPPORTED);
    assert_int_equal(n, 0);
    assert_non_null(strstr(err.msg, missing));
    assert_non_null(strstr(err.msg, "cannot load"));
    env_restore(&lib);
}

static void test_bad_ranks(void **state)
{
    (void)state;
    backend *cpu = NULL;
    be_comm *c = (be_comm *)&c; /* must come back NULL */
    forge_err err = {0};
    assert_int_equal(backend_cpu_create(1, false, &cpu, &err), FORGE_OK);
    backend *ranks[COMM_MAX_RANK + 1];
    for (int i = 0; i <= COMM_MAX_RANK; i++)
        ranks[i] = cpu;

    assert_int_equal(backend_gpu_comm_create(NULL, 2, &c, &err), FORGE_E_INVALID);
    assert_null(c);
    assert_int_equal(backend_gpu_comm_create(ranks, 0, &c, &err), FORGE_E_INVALID);
    assert_non_null(strstr(err.msg, "0 ranks"));
    assert_int_equal(backend_gpu_comm_create(ranks, COMM_MAX_RANK + 1, &c, &err), FORGE_E_INVALID);
    assert_non_null(strstr(err.msg, "9 ranks"));
    assert_null(c);

    memset(&err, 0, sizeof err);
    assert_int_equal(backend_gpu_comm_create(ranks, 2, &c, &err), FORGE_E_INVALID);
    print_message("a CPU backend as rank 0: %s\n", err.msg);
    assert_non_null(strstr(err.msg, "rank 0"));
    assert_non_null(strstr(err.msg, "CPU"));
    assert_non_null(strstr(err.msg, "not a GPU backend"));
    assert_null(c);

    backend *holes[2] = {NULL, NULL};
    assert_int_equal(backend_gpu_comm_create(holes, 2, &c, &err), FORGE_E_INVALID);
    assert_non_null(strstr(err.msg, "rank 0 is missing"));
    assert_null(c);
    cpu->ops->destroy(cpu);
}

/* The GPU library of this tree: FORGE_TEST_GPU_LIB, else $BUILD/libforge_cuda.so (make test sets
 * BUILD), else build/libforge_cuda.so. NULL when none is there. */
static const gpu_api *open_gpu_library(char *path, size_t path_len, char *why, size_t why_len)
{
    const char *env = getenv("FORGE_TEST_GPU_LIB");
    const char *build = getenv("BUILD");
    if (env && *env)
        snprintf(path, path_len, "%s", env);
    else
        snprintf(path, path_len, "%s/libforge_cuda.so", build && *build ? build : "build");
    if (access(path, F_OK) != 0) {
        snprintf(why, why_len, "no GPU library at %s (build it with `make gpu`)", path);
        return NULL;
    }
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL); /* kept loaded: cudart has exit handlers */
    if (!h) {
        const char *e = dlerror();
        snprintf(why, why_len, "%s does not load here: %s", path, e ? e : "?");
        return NULL;
    }
    forge_gpu_get_api_fn get = NULL;
    *(void **)&get = dlsym(h, "forge_gpu_get_api");
    const gpu_api *api = get ? get(GPU_API_VERSION) : NULL;
    if (!api) {
        snprintf(why, why_len, "%s is not a version %d GPU library (stale: rerun `make gpu`)", path,
                 GPU_API_VERSION);
        return NULL;
    }
    return api;
}

static void test_no_nccl(void **state)
{
    (void)state;
    char path[1024], why[1200];
    const gpu_api *api = open_gpu_library(path, sizeof path, why, sizeof why);
    if (!api) {
        print_message("SKIPPED the NCCL loading case: %s\n", why);
        skip();
    }
    saved_env nccl = env_save("FORGE_NCCL_LIB");
    forge_err err = {0};
    gpu_comm *c = (gpu_comm *)&c;
    const int one[1] = {0}, twice[2] = {0, 0};

    /* a GPU given twice: refused before anything is loaded */
    assert_int_equal(api->comm_create(2, twice, &c, &err), FORGE_E_INVALID);
    print_message("GPU 0 twice: %s\n", err.msg);
    assert_non_null(strstr(err.msg, "GPU 0 is given twice"));
    assert_null(c);
    assert_int_equal(api->comm_create(0, one, &c, &err), FORGE_E_INVALID);
    assert_int_equal(api->comm_create(GPU_COMM_MAX_RANK + 1, one, &c, &err), FORGE_E_INVALID);

    const char *missing = "/nonexistent/forge-test/libnccl.so.2";
    setenv("FORGE_NCCL_LIB", missing, 1);
    memset(&err, 0, sizeof err);
    int rc = api->comm_create(1, one, &c, &err);
    print_message("%s, FORGE_NCCL_LIB=%s: %s: %s\n", path, missing, forge_status_name(rc), err.msg);
    assert_int_equal(rc, FORGE_E_UNSUPPORTED);
    assert_int_equal(err.code, FORGE_E_UNSUPPORTED);
    assert_null(c);
    assert_non_null(strstr(err.msg, "cannot load /nonexistent/forge-test/libnccl.so.2 ("));
    assert_non_null(strstr(err.msg, "set FORGE_NCCL_LIB or LD_LIBRARY_PATH"));

    /* a library that loads but is not NCCL */
    setenv("FORGE_NCCL_LIB", "libm.so.6", 1);
    memset(&err, 0, sizeof err);
    rc = api->comm_create(1, one, &c, &err);
    print_message("FORGE_NCCL_LIB=libm.so.6: %s: %s\n", forge_status_name(rc), err.msg);
    assert_int_equal(rc, FORGE_E_UNSUPPORTED);
    assert_non_null(strstr(err.msg, "libm.so.6 is not an NCCL library (no nccl"));
    assert_null(c);
    env_restore(&nccl);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_no_gpu_library),
        cmocka_unit_test(test_bad_ranks),
        cmocka_unit_test(test_no_nccl),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
