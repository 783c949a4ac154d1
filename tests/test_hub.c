/* test_hub.c - the hub module's offline parts: SHA-256 against FIPS 180-4 vectors, quant words of
 * file names, name validation, the cache listing/removal on a hand-made cache, and offline
 * lookups. The network side is tests/test_pull.sh (a fake hub on 127.0.0.1).
 *
 * Also a helper for test_pull.sh: `test_hub --split IN.gguf OUTPREFIX N` writes IN as N split
 * files OUTPREFIX-0000k-of-0000N.gguf the way llama.cpp's gguf-split does (all KVs in the
 * first, split.no / split.count / split.tensors.count in each, the tensors divided in order). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "forge.h"
#include "core/util.h"
#include "hub/sha256.h"
#include "testutil.h"

static void hex_of(const char *data, size_t n, size_t repeat, char out[65])
{
    sha256_ctx c;
    uint8_t d[32];
    sha256_init(&c);
    for (size_t i = 0; i < repeat; i++)
        sha256_update(&c, data, n);
    sha256_final(&c, d);
    sha256_hex(d, out);
}

static void test_sha256_vectors(void **state)
{
    char h[65];
    hex_of("", 0, 1, h);
    assert_string_equal(h, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    hex_of("abc", 3, 1, h);
    assert_string_equal(h, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    const char *m = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"; /* 56 bytes */
    hex_of(m, strlen(m), 1, h);
    assert_string_equal(h, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    hex_of("a", 1, 1000000, h); /* one byte at a time across block boundaries */
    assert_string_equal(h, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

static void test_sha256_file(void **state)
{
    char *dir = tu_mkdtemp();
    char path[512], h[65];
    snprintf(path, sizeof path, "%s/f", dir);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    for (int i = 0; i < 3000000; i++)
        fputc('a' + i % 3, f); /* crosses the 1 MiB read size */
    fclose(f);
    char *data = tu_read_file(path, NULL);
    char want[65];
    hex_of(data, 3000000, 1, want);
    forge_err err = {0};
    assert_int_equal(forge_hub_sha256_file(path, h, &err), FORGE_OK);
    assert_string_equal(h, want);
    snprintf(path, sizeof path, "%s/absent", dir);
    assert_int_equal(forge_hub_sha256_file(path, h, &err), FORGE_E_IO);
    assert_non_null(strstr(err.msg, "absent"));
    free(data);
    tu_rmtree(dir);
    free(dir);
}

static void test_quant_of(void **state)
{
    char q[64];
    forge_hub_quant_of("Llama-3.2-1B-Instruct-Q4_K_M.gguf", q, sizeof q);
    assert_string_equal(q, "Q4_K_M");
    forge_hub_quant_of("llama-2-7b.Q8_0.gguf", q, sizeof q);
    assert_string_equal(q, "Q8_0");
    forge_hub_quant_of("Q4_K_M/Big-Model-Q4_K_M-00002-of-00003.gguf", q, sizeof q);
    assert_string_equal(q, "Q4_K_M");
    forge_hub_quant_of("model-bf16.GGUF", q, sizeof q);
    assert_string_equal(q, "bf16");
    forge_hub_quant_of("stories260K.gguf", q, 4); /* truncated to the buffer */
    assert_string_equal(q, "sto");
}

/* A hand-made cache: CACHE/hub/o/r/{a-Q4_0.gguf, sub/b-Q8_0.gguf}, .tmp ignored. */
static char *make_cache(forge_hub_params *p)
{
    char *dir = tu_mkdtemp();
    char path[600];
    static const char *const files[] = {"hub/o/r/a-Q4_0.gguf", "hub/o/r/sub/b-Q8_0.gguf",
                                        "hub/o/r/.tmp/a-Q4_0.gguf.part", "hub/x/y/c-F16.gguf"};
    static const char *const dirs[] = {"hub",          "hub/o", "hub/o/r", "hub/o/r/sub",
                                       "hub/o/r/.tmp", "hub/x", "hub/x/y"};
    for (size_t i = 0; i < FORGE_ARRAY_LEN(dirs); i++) {
        snprintf(path, sizeof path, "%s/%s", dir, dirs[i]);
        assert_int_equal(mkdir(path, 0755), 0);
    }
    for (size_t i = 0; i < FORGE_ARRAY_LEN(files); i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        FILE *f = fopen(path, "wb");
        assert_non_null(f);
        fprintf(f, "%zu", i * 1000);
        fclose(f);
    }
    *p = forge_hub_default_params();
    p->cache_dir = dir;
    return dir;
}

static void test_list_and_remove(void **state)
{
    forge_hub_params p;
    char *dir = make_cache(&p);
    forge_hub_entry *e = NULL;
    size_t n = 0, removed = 0;
    forge_err err = {0};
    assert_int_equal(forge_hub_list(&p, &e, &n, &err), FORGE_OK);
    assert_int_equal(n, 3);
    assert_string_equal(e[0].repo, "o/r");
    assert_string_equal(e[0].file, "a-Q4_0.gguf");
    assert_int_equal(e[0].size, 1);
    assert_string_equal(e[1].file, "sub/b-Q8_0.gguf");
    assert_int_equal(e[1].size, 4);
    assert_string_equal(e[2].repo, "x/y");
    forge_hub_entries_free(e, n);

    /* offline lookups find cached files by quant or name, and say what is there otherwise */
    char *path = NULL;
    p.offline = true;
    assert_int_equal(forge_hub_pull("o/r:q8_0", &p, &path, &err), FORGE_OK);
    assert_non_null(strstr(path, "/hub/o/r/sub/b-Q8_0.gguf"));
    free(path);
    assert_int_equal(forge_hub_pull("o/r/a-Q4_0.gguf", &p, &path, &err), FORGE_OK);
    free(path);
    assert_int_equal(forge_hub_pull("o/r:Q5_K_M", &p, &path, &err), FORGE_E_NOTFOUND);
    assert_null(path);
    assert_non_null(strstr(err.msg, "offline"));
    assert_non_null(strstr(err.msg, "Q4_0, Q8_0"));

    assert_int_equal(forge_hub_remove("o/r:Q4_0", &p, &removed, &err), FORGE_OK);
    assert_int_equal(removed, 1);
    assert_int_equal(forge_hub_remove("o/r:Q4_0", &p, &removed, &err), FORGE_E_NOTFOUND);
    assert_int_equal(forge_hub_remove("x/y", &p, &removed, &err), FORGE_OK);
    assert_int_equal(removed, 1);
    assert_int_equal(forge_hub_list(&p, &e, &n, &err), FORGE_OK);
    assert_int_equal(n, 1);
    assert_string_equal(e[0].file, "sub/b-Q8_0.gguf");
    forge_hub_entries_free(e, n);
    char gone[600];
    snprintf(gone, sizeof gone, "%s/hub/x", dir);
    assert_int_not_equal(access(gone, F_OK), 0); /* empty owner directory removed too */
    tu_rmtree(dir);
    free(dir);
}

static void test_bad_names(void **state)
{
    forge_hub_params p = forge_hub_default_params();
    char *path = NULL;
    forge_err err = {0};
    static const char *const bad[] = {"",
                                      "noslash",
                                      "a/b/../../etc/passwd",
                                      "../x/y",
                                      "a/b:",
                                      "a/b/c.gguf:Q4_0",
                                      "a/.hidden",
                                      "a/b:Q4 K",
                                      "a//b",
                                      "a/b/.tmp/x.gguf"};
    p.offline = true;
    p.cache_dir = "/nonexistent-forge-cache";
    for (size_t i = 0; i < FORGE_ARRAY_LEN(bad); i++) {
        assert_int_equal(forge_hub_pull(bad[i], &p, &path, &err), FORGE_E_INVALID);
        assert_null(path);
    }
    size_t n;
    assert_int_equal(forge_hub_remove("a/b/../c", &p, &n, &err), FORGE_E_INVALID);
}

static void test_cache_dir_env(void **state)
{
    forge_hub_params p = forge_hub_default_params();
    char *d = NULL;
    setenv("FORGE_CACHE", "/x/fc", 1);
    assert_int_equal(forge_hub_cache_dir(&p, &d, NULL), FORGE_OK);
    assert_string_equal(d, "/x/fc");
    free(d);
    unsetenv("FORGE_CACHE");
    setenv("XDG_CACHE_HOME", "/x/xdg", 1);
    assert_int_equal(forge_hub_cache_dir(&p, &d, NULL), FORGE_OK);
    assert_string_equal(d, "/x/xdg/forge");
    free(d);
    unsetenv("XDG_CACHE_HOME");
    setenv("HOME", "/x/home", 1);
    assert_int_equal(forge_hub_cache_dir(&p, &d, NULL), FORGE_OK);
    assert_string_equal(d, "/x/home/.cache/forge");
    free(d);
    p.cache_dir = "/given";
    assert_int_equal(forge_hub_cache_dir(&p, &d, NULL), FORGE_OK);
    assert_string_equal(d, "/given");
    free(d);
}

/* ---- --split helper ----------------------------------------------------------------------- */

typedef struct split_src {
    const gguf_ctx *g;
    int64_t first; /* index in g of this part's tensor 0 */
} split_src;

static int split_fill(void *user, int64_t index, const gguf_tensor_info *info, int64_t row0,
                      int64_t n_rows, void *dst, forge_err *err)
{
    const split_src *s = user;
    const gguf_tensor_info *t = gguf_tensor(s->g, s->first + index);
    size_t row = ggml_row_size(t->type, t->ne[0]);
    memcpy(dst, (const uint8_t *)t->data + (size_t)row0 * row, (size_t)n_rows * row);
    return FORGE_OK;
}

static int split_main(const char *in, const char *prefix, int n_parts)
{
    gguf_ctx *g = NULL;
    forge_err err = {0};
    if (gguf_open(in, &g, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    int64_t n_t = gguf_tensor_count(g);
    for (int k = 0; k < n_parts; k++) {
        int64_t a = n_t * k / n_parts, b = n_t * (k + 1) / n_parts;
        gguf_writer *w = NULL;
        char path[1024];
        uint16_t no = (uint16_t)k, count = (uint16_t)n_parts;
        snprintf(path, sizeof path, "%s-%05d-of-%05d.gguf", prefix, k + 1, n_parts);
        int rc = gguf_writer_create(&w, &err);
        if (!rc && k == 0) rc = gguf_writer_copy_kvs(w, g, "", NULL, &err);
        if (!rc) rc = gguf_writer_set_scalar(w, "split.no", GGUF_TYPE_UINT16, &no, &err);
        if (!rc) rc = gguf_writer_set_scalar(w, "split.count", GGUF_TYPE_UINT16, &count, &err);
        if (!rc) rc = gguf_writer_set_i32(w, "split.tensors.count", (int32_t)n_t, &err);
        for (int64_t i = a; i < b && !rc; i++) {
            const gguf_tensor_info *t = gguf_tensor(g, i);
            rc = gguf_writer_add_tensor(w, t->name, t->type, t->n_dims, t->ne, &err);
        }
        split_src s = {g, a};
        if (!rc) rc = gguf_writer_write(w, path, split_fill, &s, 0, &err);
        gguf_writer_free(w);
        if (rc) {
            fprintf(stderr, "%s\n", err.msg);
            gguf_close(g);
            return 1;
        }
    }
    gguf_close(g);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 5 && !strcmp(argv[1], "--split"))
        return split_main(argv[2], argv[3], atoi(argv[4]));
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sha256_vectors), cmocka_unit_test(test_sha256_file),
        cmocka_unit_test(test_quant_of),       cmocka_unit_test(test_list_and_remove),
        cmocka_unit_test(test_bad_names),      cmocka_unit_test(test_cache_dir_env),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
