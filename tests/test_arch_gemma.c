/* test_arch_gemma.c - Gemma 2 / Gemma 3 (src/model/arch_gemma.c): the hyperparameters the loader
 * derives (sliding-window layers, attention scale with the 27B exception, local RoPE base,
 * soft-caps), behaviour that shows them (a local layer does not see past its window; a local
 * layer ignores the file's RoPE base and scaling, a global one does not; logits stay inside the
 * final cap; one batch == token by token), a 46-layer Gemma 2 against llama.cpp's logits (the
 * 27B attention scale), ggml's fp16 GELU, an independent scalar forward (double precision)
 * that Forge's F32 math reproduces on both families and that is itself checked against
 * llama.cpp on tiny-gemma2, and bad files refused with a message naming the key or tensor.
 * The models are forge synth's tiny-gemma2 / tiny-gemma3 and variants of them written here
 * (keys changed, layers dropped or repeated). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "forge.h"
#include "forge_engine.h"
#include "forge_synth.h"
#include "model/model.h"
#include "testutil.h"

#define MAX_EDITS 4

typedef struct variant {
    int n_layer;          /* 0: as the source; fewer: layers dropped; more: blk.i is blk.(i % n) */
    const char *skip_key; /* leave this key out */
    const char *skip_tensor;
    const char *shape_tensor; /* give it shape [ne0] (1-D) */
    int64_t ne0;
    struct {
        const char *key;
        char kind; /* 'u' u32, 'f' f32, 's' string, 'a' array of n_arr i32 */
        uint32_t u;
        float f;
        const char *s;
        const int32_t *arr;
        int n_arr;
    } set[MAX_EDITS];
} variant;

static char *g_dir, *g_gemma2, *g_gemma3;

/* blk.<i>.<rest> -> i (or -1), rest */
static int layer_of(const char *name, const char **rest)
{
    int il;
    int off = 0;
    if (sscanf(name, "blk.%d.%n", &il, &off) == 1 && off > 0) {
        *rest = name + off;
        return il;
    }
    *rest = name;
    return -1;
}

typedef struct fill_ctx {
    const gguf_ctx *src;
    int src_layers;
} fill_ctx;

static int fill(void *user, int64_t index, const gguf_tensor_info *info, int64_t row0,
                int64_t n_rows, void *dst, forge_err *err)
{
    (void)index;
    (void)err;
    fill_ctx *f = user;
    const char *rest;
    int il = layer_of(info->name, &rest);
    char name[160];
    if (il >= 0)
        snprintf(name, sizeof name, "blk.%d.%s", il % f->src_layers, rest);
    else
        snprintf(name, sizeof name, "%s", info->name);
    const gguf_tensor_info *s = gguf_find_tensor(f->src, name);
    size_t row = ggml_row_size(info->type, info->ne[0]);
    if (s && s->ne[0] == info->ne[0] && s->ne[1] == info->ne[1])
        memcpy(dst, (const uint8_t *)s->data + (size_t)row0 * row, (size_t)n_rows * row);
    else
        memset(dst, 0, (size_t)n_rows * row);
    return FORGE_OK;
}

static char *write_variant(const char *src_path, const char *name, const variant *v)
{
    forge_err err = {0};
    gguf_ctx *src = NULL;
    gguf_writer *w = NULL;
    assert_int_equal(gguf_open(src_path, &src, &err), 0);
    assert_int_equal(gguf_writer_create(&w, &err), 0);
    gguf_str arch;
    assert_int_equal(gguf_get_str(src, "general.architecture", &arch, &err), 0);
    char key[160];
    snprintf(key, sizeof key, "%.*s.block_count", (int)arch.len, arch.data);
    uint32_t src_layers;
    assert_int_equal(gguf_get_u32(src, key, &src_layers, &err), 0);
    const int n_layer = v->n_layer ? v->n_layer : (int)src_layers;
    for (int64_t i = 0; i < gguf_kv_count(src); i++) {
        if (v->skip_key && !strcmp(gguf_kv_key(src, i), v->skip_key)) continue;
        assert_int_equal(gguf_writer_copy_kv(w, src, i, &err), 0);
    }
    assert_int_equal(gguf_writer_set_u32(w, key, (uint32_t)n_layer, &err), 0);
    for (int k = 0; k < MAX_EDITS && v->set[k].key; k++) {
        const char *kk = v->set[k].key;
        int rc = FORGE_OK;
        switch (v->set[k].kind) {
        case 'u':
            rc = gguf_writer_set_u32(w, kk, v->set[k].u, &err);
            break;
        case 'f':
            rc = gguf_writer_set_f32(w, kk, v->set[k].f, &err);
            break;
        case 's':
            rc = gguf_writer_set_str(w, kk, v->set[k].s, &err);
            break;
        case 'a':
            rc = gguf_writer_set_arr(w, kk, GGUF_TYPE_INT32, v->set[k].arr,
                                     (uint64_t)v->set[k].n_arr, &err);
            break;
        default:
            fail_msg("bad edit kind");
        }
        assert_int_equal(rc, 0);
    }
    /* globals, then layers 0..n_layer-1 from the source's layer il % src_layers */
    for (int il = -1; il < n_layer; il++) {
        for (int64_t i = 0; i < gguf_tensor_count(src); i++) {
            const gguf_tensor_info *t = gguf_tensor(src, i);
            const char *rest;
            int tl = layer_of(t->name, &rest);
            if (il < 0 ? tl >= 0 : tl != il % (int)src_layers) continue;
            char tname[160];
            if (il >= 0)
                snprintf(tname, sizeof tname, "blk.%d.%s", il, rest);
            else
                snprintf(tname, sizeof tname, "%s", t->name);
            if (v->skip_tensor && !strcmp(tname, v->skip_tensor)) continue;
            int64_t ne[GGUF_MAX_DIMS];
            memcpy(ne, t->ne, sizeof ne);
            uint32_t n_dims = t->n_dims;
            if (v->shape_tensor && !strcmp(tname, v->shape_tensor)) {
                ne[0] = v->ne0;
                n_dims = 1;
            }
            assert_int_equal(gguf_writer_add_tensor(w, tname, t->type, n_dims, ne, &err), 0);
        }
    }
    size_t n = strlen(g_dir) + strlen(name) + 2;
    char *path = malloc(n);
    assert_non_null(path);
    snprintf(path, n, "%s/%s", g_dir, name);
    fill_ctx fc = {src, (int)src_layers};
    if (gguf_writer_write(w, path, fill, &fc, 0, &err)) fail_msg("write %s: %s", path, err.msg);
    gguf_writer_free(w);
    gguf_close(src);
    return path;
}

static forge_model *load(const char *path)
{
    forge_err err = {0};
    forge_model *m = NULL;
    int rc = forge_model_load(path, &m, &err);
    if (rc) fail_msg("load %s: %s", path, err.msg);
    return m;
}

static void expect_load_error(const char *path, int code, const char *needle1, const char *needle2)
{
    forge_err err = {0};
    forge_model *m = NULL;
    int rc = forge_model_load(path, &m, &err);
    if (rc != code)
        fail_msg("%s: expected %s, got %s (%s)", path, forge_status_name(code),
                 forge_status_name(rc), err.msg);
    assert_null(m);
    print_message("%s\n", err.msg);
    if (needle1 && !strstr(err.msg, needle1)) fail_msg("message '%s' lacks '%s'", err.msg, needle1);
    if (needle2 && !strstr(err.msg, needle2)) fail_msg("message '%s' lacks '%s'", err.msg, needle2);
}

/* logits of every position of ids (malloc'd, [n][n_vocab]); n_batch 0: the whole prompt at once,
 * else in pieces of n_batch tokens */
static float *run_ex(forge_model *m, const int32_t *ids, int n, int n_batch, bool f32_math)
{
    forge_context_params cp = forge_context_default_params();
    cp.f32_math = f32_math;
    cp.device = FORGE_DEVICE_CPU;
    cp.n_threads = 2;
    cp.n_ctx = 64;
    cp.kv_type = FORGE_KV_F32;
    forge_context *ctx = NULL;
    forge_err err = {0};
    if (forge_context_create(m, &cp, &ctx, &err)) fail_msg("context: %s", err.msg);
    const int V = forge_model_info_get(m)->n_vocab;
    float *out = malloc((size_t)n * V * sizeof *out);
    assert_non_null(out);
    const int step = n_batch ? n_batch : n;
    for (int p0 = 0; p0 < n; p0 += step) {
        const int k = n - p0 < step ? n - p0 : step;
        if (forge_decode(ctx, ids + p0, k, true, &err)) fail_msg("decode: %s", err.msg);
        for (int i = 0; i < k; i++)
            memcpy(out + (size_t)(p0 + i) * V, forge_get_logits(ctx, i), (size_t)V * sizeof *out);
    }
    forge_context_free(ctx);
    return out;
}

static float *run(forge_model *m, const int32_t *ids, int n, int n_batch)
{
    return run_ex(m, ids, n, n_batch, false);
}

static float *run_math(forge_model *m, const int32_t *ids, int n, bool f32_math)
{
    return run_ex(m, ids, n, 0, f32_math);
}

static bool rows_equal(const float *a, const float *b, int p, int V)
{
    return !memcmp(a + (size_t)p * V, b + (size_t)p * V, (size_t)V * sizeof *a);
}

static const int32_t k_ids[16] = {1, 5, 9, 100, 200, 300, 17, 42, 77, 300, 301, 302, 4, 5, 6, 7};

static int setup(void **state)
{
    (void)state;
    g_dir = tu_mkdtemp();
    if (!g_dir) return -1;
    const char *shapes[2] = {"tiny-gemma2", "tiny-gemma3"};
    char **paths[2] = {&g_gemma2, &g_gemma3};
    for (int i = 0; i < 2; i++) {
        size_t n = strlen(g_dir) + 32;
        *paths[i] = malloc(n);
        snprintf(*paths[i], n, "%s/%s.gguf", g_dir, shapes[i]);
        synth_opts so = {shapes[i], GGML_TYPE_F32, *paths[i], NULL, 0};
        forge_err err = {0};
        if (synth_write(&so, NULL, &err)) {
            print_message("synth %s: %s\n", shapes[i], err.msg);
            return -1;
        }
    }
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    tu_rmtree(g_dir);
    free(g_dir);
    free(g_gemma2);
    free(g_gemma3);
    return 0;
}

/* What the loader derives from the keys (arch_params), against llama.cpp's rules. */
static void test_hparams(void **state)
{
    (void)state;
    forge_model *m = load(g_gemma2);
    const arch_params *ap = &m->ap;
    /* tiny-gemma2: n_embd 64, 4 heads of head_dim 32 (not 64/4), window 8, caps 2 and 3 */
    assert_float_equal(ap->attn_scale, 1.0f / sqrtf(32.0f), 0);
    assert_int_equal(ap->swa_window, 8);
    for (int il = 0; il < m->info.n_layer; il++)
        assert_int_equal(ap->layer_swa[il], il % 2 == 0);
    assert_float_equal(ap->attn_softcap, 2.0f, 0);
    assert_float_equal(ap->final_softcap, 3.0f, 0);
    assert_float_equal(ap->embd_scale, 8.0f, 0);
    assert_float_equal(ap->rope_base_swa, 0.0f, 0); /* gemma2: one RoPE for all layers */
    forge_model_free(m);

    m = load(g_gemma3);
    ap = &m->ap;
    assert_int_equal(m->info.n_layer, 6);
    const bool want[6] = {true, true, true, true, true, false}; /* five local, one global */
    for (int il = 0; il < 6; il++)
        assert_int_equal(ap->layer_swa[il], want[il]);
    assert_int_equal(ap->swa_window, 8);
    assert_float_equal(ap->attn_scale, 1.0f / sqrtf(32.0f), 0);
    assert_float_equal(ap->attn_softcap, 0.0f, 0);
    assert_float_equal(ap->final_softcap, 0.0f, 0);
    assert_float_equal(ap->rope_base_swa, 10000.0f, 0);
    assert_float_equal(ap->rope_scale_swa, 1.0f, 0);
    assert_float_equal(m->info.rope_freq_base, 1000000.0f, 0);
    forge_model_free(m);

    /* the 27B models: 1/sqrt(n_embd / n_head) = 1/4 here */
    variant v46 = {.n_layer = 46};
    char *p = write_variant(g_gemma2, "g2-46.gguf", &v46);
    m = load(p);
    assert_float_equal(m->ap.attn_scale, 0.25f, 0);
    forge_model_free(m);
    free(p);
    variant v62 = {.n_layer = 62};
    p = write_variant(g_gemma3, "g3-62.gguf", &v62);
    m = load(p);
    assert_float_equal(m->ap.attn_scale, 0.25f, 0);
    assert_true(!m->ap.layer_swa[59] && m->ap.layer_swa[60] && m->ap.layer_swa[61]);
    forge_model_free(m);
    free(p);

    /* gemma3 without a window: no local layers; gemma2 without one: llama.cpp's 4096 */
    variant nowin3 = {.skip_key = "gemma3.attention.sliding_window"};
    p = write_variant(g_gemma3, "g3-nowin.gguf", &nowin3);
    m = load(p);
    assert_int_equal(m->ap.swa_window, 0);
    assert_null(m->ap.layer_swa);
    forge_model_free(m);
    free(p);
    variant nowin2 = {.skip_key = "gemma2.attention.sliding_window"};
    p = write_variant(g_gemma2, "g2-nowin.gguf", &nowin2);
    m = load(p);
    assert_int_equal(m->ap.swa_window, 4096);
    forge_model_free(m);
    free(p);

    /* a per-layer pattern key overrides the family's, an array or a period */
    const int32_t flags[6] = {0, 1, 0, 0, 1, 1};
    variant pat = {.set = {{.key = "gemma3.attention.sliding_window_pattern",
                            .kind = 'a',
                            .arr = flags,
                            .n_arr = 6}}};
    p = write_variant(g_gemma3, "g3-pat.gguf", &pat);
    m = load(p);
    for (int il = 0; il < 6; il++)
        assert_int_equal(m->ap.layer_swa[il], flags[il] != 0);
    forge_model_free(m);
    free(p);
    variant per = {
        .set = {{.key = "gemma3.attention.sliding_window_pattern", .kind = 'u', .u = 3}}};
    p = write_variant(g_gemma3, "g3-per.gguf", &per);
    m = load(p);
    for (int il = 0; il < 6; il++)
        assert_int_equal(m->ap.layer_swa[il], il % 3 < 2);
    forge_model_free(m);
    free(p);
}

/* One local layer with window 8: the logits at position p >= 9 do not depend on the token at
 * position 1, those at 1..8 do; without the window (the key removed, or the layer made global
 * by the pattern key) position 15 does depend on it. */
static void test_window(void **state)
{
    (void)state;
    int32_t other[16];
    memcpy(other, k_ids, sizeof other);
    other[1] = 333;
    const int V = 512;
    variant one = {.n_layer = 1};
    char *p = write_variant(g_gemma3, "g3-1.gguf", &one);
    forge_model *m = load(p);
    assert_true(m->ap.layer_swa[0]);
    float *a = run(m, k_ids, 16, 0), *b = run(m, other, 16, 0);
    for (int pos = 1; pos < 16; pos++)
        assert_int_equal(rows_equal(a, b, pos, V), pos >= 9);
    free(a);
    free(b);
    forge_model_free(m);
    free(p);

    variant glob = {.n_layer = 1, .skip_key = "gemma3.attention.sliding_window"};
    const int32_t zero[1] = {0};
    variant glob2 = {.n_layer = 1,
                     .set = {{.key = "gemma3.attention.sliding_window_pattern",
                              .kind = 'a',
                              .arr = zero,
                              .n_arr = 1}}};
    const variant *gv[2] = {&glob, &glob2};
    for (int i = 0; i < 2; i++) {
        p = write_variant(g_gemma3, i ? "g3-1-glob2.gguf" : "g3-1-glob.gguf", gv[i]);
        m = load(p);
        a = run(m, k_ids, 16, 0);
        b = run(m, other, 16, 0);
        assert_false(rows_equal(a, b, 15, V));
        free(a);
        free(b);
        forge_model_free(m);
        free(p);
    }

    /* gemma2: layer 0 is local, layer 1 global: a one-layer file is windowed */
    variant one2 = {.n_layer = 1};
    p = write_variant(g_gemma2, "g2-1.gguf", &one2);
    m = load(p);
    a = run(m, k_ids, 16, 0);
    b = run(m, other, 16, 0);
    for (int pos = 1; pos < 16; pos++)
        assert_int_equal(rows_equal(a, b, pos, V), pos >= 9);
    free(a);
    free(b);
    forge_model_free(m);
    free(p);
}

/* Gemma 3's local layers use RoPE base 10000 without scaling whatever the file says for the
 * global layers; a global layer follows the file. */
static void test_local_rope(void **state)
{
    (void)state;
    const int V = 512;
    const int32_t zero[1] = {0};
    for (int global = 0; global < 2; global++) {
        variant base = {.n_layer = 1};
        variant moved = {.n_layer = 1,
                         .set = {{.key = "gemma3.rope.freq_base", .kind = 'f', .f = 50000.0f},
                                 {.key = "gemma3.rope.scaling.type", .kind = 's', .s = "linear"},
                                 {.key = "gemma3.rope.scaling.factor", .kind = 'f', .f = 8.0f}}};
        if (global) {
            base.set[0].key = moved.set[3].key = "gemma3.attention.sliding_window_pattern";
            base.set[0].kind = moved.set[3].kind = 'a';
            base.set[0].arr = moved.set[3].arr = zero;
            base.set[0].n_arr = moved.set[3].n_arr = 1;
        }
        char *pa = write_variant(g_gemma3, "rope-a.gguf", &base);
        char *pb = write_variant(g_gemma3, "rope-b.gguf", &moved);
        forge_model *ma = load(pa), *mb = load(pb);
        assert_int_equal(ma->ap.layer_swa[0], !global);
        float *a = run(ma, k_ids, 16, 0), *b = run(mb, k_ids, 16, 0);
        bool same = true;
        for (int pos = 1; pos < 16; pos++)
            same = same && rows_equal(a, b, pos, V);
        assert_int_equal(same, !global);
        free(a);
        free(b);
        forge_model_free(ma);
        forge_model_free(mb);
        free(pa);
        free(pb);
    }
}

/* The final cap bounds every logit; one batch gives the logits of token-by-token decoding (the
 * window and the q/k norms included); gemma3 with a final cap key uses it. */
static void test_caps_and_batches(void **state)
{
    (void)state;
    const int V = 512;
    forge_model *m = load(g_gemma2);
    float *a = run(m, k_ids, 16, 0), *b = run(m, k_ids, 16, 1), *c = run(m, k_ids, 16, 5);
    float mx = 0;
    for (size_t i = 0; i < (size_t)16 * V; i++)
        mx = fabsf(a[i]) > mx ? fabsf(a[i]) : mx;
    assert_true(mx <= 3.0f && mx > 1.0f);
    assert_memory_equal(a, b, (size_t)16 * V * sizeof *a);
    assert_memory_equal(a, c, (size_t)16 * V * sizeof *a);
    free(a);
    free(b);
    free(c);
    forge_model_free(m);

    m = load(g_gemma3);
    a = run(m, k_ids, 16, 0);
    b = run(m, k_ids, 16, 1);
    assert_memory_equal(a, b, (size_t)16 * V * sizeof *a);
    mx = 0;
    for (size_t i = 0; i < (size_t)16 * V; i++)
        mx = fabsf(a[i]) > mx ? fabsf(a[i]) : mx;
    assert_true(mx > 0.5f); /* so that the cap below acts */
    free(a);
    free(b);
    forge_model_free(m);
    variant cap = {.set = {{.key = "gemma3.final_logit_softcapping", .kind = 'f', .f = 0.5f}}};
    char *p = write_variant(g_gemma3, "g3-cap.gguf", &cap);
    m = load(p);
    a = run(m, k_ids, 16, 0);
    for (size_t i = 0; i < (size_t)16 * V; i++)
        assert_true(fabsf(a[i]) <= 0.5f);
    free(a);
    forge_model_free(m);
    free(p);
}

/* A 46-layer Gemma 2 (llama.cpp's "27B": attention scale 1/sqrt(n_embd / n_head) = 1/4, not
 * 1/sqrt(head_dim)) against llama.cpp's logits of this very file (tests/data/arch/tiny-gemma2/
 * ref_27b_logits.f32, made from the file FORGE_GEMMA_KEEP=DIR leaves in DIR). */
static void test_27b_reference(void **state)
{
    (void)state;
    const int V = 512, n = 16;
    variant v46 = {.n_layer = 46};
    char *p = write_variant(g_gemma2, "g2-46.gguf", &v46);
    const char *keep = getenv("FORGE_GEMMA_KEEP");
    if (keep) {
        char cmd[1024];
        snprintf(cmd, sizeof cmd, "cp '%s' '%s/g2-46.gguf'", p, keep);
        assert_int_equal(system(cmd), 0);
    }
    size_t len;
    float *ref = (float *)tu_read_file("tests/data/arch/tiny-gemma2/ref_27b_logits.f32", &len);
    assert_non_null(ref);
    assert_int_equal(len, (size_t)n * V * sizeof(float));
    forge_model *m = load(p);
    float *a = run(m, k_ids, n, 0);
    double nmse = tu_nmse(a, ref, (size_t)n * V);
    int agree = 0;
    for (int pos = 0; pos < n; pos++) {
        int ba = 0, br = 0;
        for (int v = 1; v < V; v++) {
            if (a[(size_t)pos * V + v] > a[(size_t)pos * V + ba]) ba = v;
            if (ref[(size_t)pos * V + v] > ref[(size_t)pos * V + br]) br = v;
        }
        agree += ba == br;
    }
    print_message("46-layer gemma2 vs llama.cpp: NMSE %.3g, argmax agrees at %d/%d\n", nmse, agree,
                  n);
    assert_true(nmse <= 1e-6);
    assert_int_equal(agree, n);
    /* the scale of the other models would be far off */
    m->ap.attn_scale = 1.0f / sqrtf(32.0f);
    float *b = run(m, k_ids, n, 0);
    double off = tu_nmse(b, ref, (size_t)n * V);
    print_message("with 1/sqrt(head_dim): NMSE %.3g\n", off);
    assert_true(off > 1e-3);
    free(a);
    free(b);
    free(ref);
    forge_model_free(m);
    free(p);
}

static void test_bad_files(void **state)
{
    (void)state;
    variant v = {.skip_tensor = "blk.3.post_ffw_norm.weight"};
    char *p = write_variant(g_gemma2, "no-postffw.gguf", &v);
    expect_load_error(p, FORGE_E_NOTFOUND, "blk.3.post_ffw_norm.weight", "no-postffw.gguf");
    free(p);
    variant v1 = {.skip_tensor = "blk.2.attn_k_norm.weight"};
    p = write_variant(g_gemma3, "no-knorm.gguf", &v1);
    expect_load_error(p, FORGE_E_NOTFOUND, "blk.2.attn_k_norm.weight", NULL);
    free(p);
    variant v2 = {.shape_tensor = "blk.0.post_attention_norm.weight", .ne0 = 32};
    p = write_variant(g_gemma2, "shape.gguf", &v2);
    expect_load_error(p, FORGE_E_FORMAT, "blk.0.post_attention_norm.weight", "expected [64]");
    free(p);
    variant v3 = {.shape_tensor = "blk.1.attn_q_norm.weight", .ne0 = 16};
    p = write_variant(g_gemma3, "qnorm.gguf", &v3);
    expect_load_error(p, FORGE_E_FORMAT, "blk.1.attn_q_norm.weight", "expected [32]");
    free(p);
    variant v4 = {.set = {{.key = "gemma2.attn_logit_softcapping", .kind = 'f', .f = -1.0f}}};
    p = write_variant(g_gemma2, "cap.gguf", &v4);
    expect_load_error(p, FORGE_E_FORMAT, "gemma2.attn_logit_softcapping", NULL);
    free(p);
    const int32_t flags[3] = {1, 0, 1};
    variant v5 = {.set = {{.key = "gemma3.attention.sliding_window_pattern",
                           .kind = 'a',
                           .arr = flags,
                           .n_arr = 3}}};
    p = write_variant(g_gemma3, "pat.gguf", &v5);
    expect_load_error(p, FORGE_E_FORMAT, "gemma3.attention.sliding_window_pattern", "6 layers");
    free(p);
    variant v6 = {.skip_key = "gemma2.attention.layer_norm_rms_epsilon"};
    p = write_variant(g_gemma2, "noeps.gguf", &v6);
    expect_load_error(p, FORGE_E_NOTFOUND, "gemma2.attention.layer_norm_rms_epsilon", NULL);
    free(p);
}

/* The CPU geglu as ggml's CPU backend computes GELU (input and result through fp16, its lookup
 * table): gate, up and llama.cpp's gelu(gate) * up (ffn_gate_par of layer 3 of tiny-gemma2, read
 * from llama.cpp c392e50 with an eval callback), picked where the exact GELU differs by more than
 * 1e-4 relative. With f32_math the exact GELU is used and these differ. */
static void test_geglu_ggml(void **state)
{
    (void)state;
    static const float t[][3] = {
        {-0x1.8b32a4p+1f, -0x1.0a35d4p+1f, 0x1.74cc62p-8f},
        {-0x1.84e74p+0f, -0x1.1513fap+1f, 0x1.b2499p-3f},
        {0x1.0e87e8p-2f, 0x1.eb3cf8p-1f, 0x1.398008p-3f},
        {-0x1.2e29bep+0f, 0x1.40831cp-2f, -0x1.68435ep-5f},
        {0x1.f7d70cp-1f, -0x1.407322p+0f, -0x1.07f6d6p+0f},
        {0x1.714fc8p-1f, -0x1.1b8b2cp-1f, -0x1.389e32p-2f},
        {-12.0f, 3.0f, 0.0f}, /* ggml: 0 below -10, x above 10 */
        {11.0f, 0.5f, 5.5f},
    };
    enum { N = sizeof t / sizeof t[0] };
    float gate[N], up[N], got[N];
    for (int i = 0; i < N; i++) {
        gate[i] = t[i][0];
        up[i] = t[i][1];
    }
    for (int f32 = 0; f32 < 2; f32++) {
        backend *be = NULL;
        forge_err err = {0};
        assert_int_equal(backend_cpu_create(1, f32 == 1, &be, &err), 0);
        be_buf *g = NULL, *u = NULL;
        assert_int_equal(be->ops->buf_create(be, N, &g, &err), 0);
        assert_int_equal(be->ops->buf_create(be, N, &u, &err), 0);
        const be_weight wg = {"gate", GGML_TYPE_F32, N, 1, N * sizeof(float), gate, 0};
        const be_weight wu = {"up", GGML_TYPE_F32, N, 1, N * sizeof(float), up, 0};
        const int32_t row0 = 0;
        assert_int_equal(be->ops->get_rows(be, g, &wg, &row0, 1, &err), 0);
        assert_int_equal(be->ops->get_rows(be, u, &wu, &row0, 1, &err), 0);
        assert_int_equal(be->ops->geglu(be, g, g, u, N, &err), 0);
        assert_int_equal(be->ops->buf_read(be, g, 0, N, got, &err), 0);
        int same = 0;
        for (int i = 0; i < 6; i++)
            same += !memcmp(&got[i], &t[i][2], sizeof(float));
        if (f32 == 0) {
            for (int i = 0; i < N; i++)
                assert_memory_equal(&got[i], &t[i][2], sizeof(float));
        } else {
            assert_true(same < 6);
            for (int i = 0; i < 6; i++)
                assert_float_equal(got[i], t[i][2], 2e-3 * fabsf(t[i][2]));
        }
        be->ops->buf_free(be, g);
        be->ops->buf_free(be, u);
        be->ops->destroy(be);
    }
}

/* ---- an independent scalar forward (double precision, exact GELU) ------------------------- *
 * Written from llama.cpp's graphs (c392e50 build_gemma2; the newer src/models/gemma3.cpp and
 * its load_hparams), with plain loops over the file's F32 tensors and none of Forge's model or
 * backend code: for gemma3 (no llama.cpp reference here) it checks Forge's implementation of
 * the same reading, and on tiny-gemma2 it is itself checked against llama.cpp. */

typedef struct refm {
    gguf_ctx *g;
    char arch[16];
    int E, L, H, KV, HD, F, V, window;
    float eps, base, acap, fcap;
} refm;

static const float *rt(const refm *r, int il, const char *what)
{
    char name[128];
    if (il >= 0)
        snprintf(name, sizeof name, "blk.%d.%s", il, what);
    else
        snprintf(name, sizeof name, "%s", what);
    const gguf_tensor_info *t = gguf_find_tensor(r->g, name);
    if (!t) fail_msg("reference: no tensor %s", name);
    assert_int_equal(t->type, GGML_TYPE_F32);
    return t->data;
}

static uint32_t rkey_u32(const refm *r, const char *suffix, uint32_t def)
{
    char key[128];
    snprintf(key, sizeof key, "%s.%s", r->arch, suffix);
    uint32_t v;
    return gguf_find_key(r->g, key) >= 0 && gguf_get_u32(r->g, key, &v, NULL) == 0 ? v : def;
}

static float rkey_f32(const refm *r, const char *suffix, float def)
{
    char key[128];
    snprintf(key, sizeof key, "%s.%s", r->arch, suffix);
    float v;
    return gguf_find_key(r->g, key) >= 0 && gguf_get_f32(r->g, key, &v, NULL) == 0 ? v : def;
}

/* y[n] = W x, W [n rows][k] */
static void rmv(double *y, const float *w, const double *x, int n, int k)
{
    for (int r = 0; r < n; r++) {
        double s = 0;
        for (int i = 0; i < k; i++)
            s += (double)w[(size_t)r * k + i] * x[i];
        y[r] = s;
    }
}

static void rnorm(double *y, const double *x, const float *w, int n, double eps)
{
    double ss = 0;
    for (int i = 0; i < n; i++)
        ss += x[i] * x[i];
    const double sc = 1.0 / sqrt(ss / n + eps);
    for (int i = 0; i < n; i++)
        y[i] = x[i] * sc * w[i];
}

/* NEOX RoPE of one head at position p, theta as ggml builds it (float) */
static void rrope(double *v, int hd, int p, float base, float freq_scale)
{
    const float theta_scale = powf(base, -2.0f / (float)hd);
    float theta = (float)p;
    for (int i = 0; i < hd / 2; i++) {
        const double th = (double)(freq_scale * theta), c = cos(th), sn = sin(th);
        const double x0 = v[i], x1 = v[i + hd / 2];
        v[i] = x0 * c - x1 * sn;
        v[i + hd / 2] = x0 * sn + x1 * c;
        theta *= theta_scale;
    }
}

/* logits of every position of ids[0..n) into out [n][V] */
static void ref_forward(const char *path, const int32_t *ids, int n, float *out)
{
    refm r = {0};
    forge_err err = {0};
    assert_int_equal(gguf_open(path, &r.g, &err), 0);
    gguf_str a;
    assert_int_equal(gguf_get_str(r.g, "general.architecture", &a, &err), 0);
    snprintf(r.arch, sizeof r.arch, "%.*s", (int)a.len, a.data);
    const bool g3 = !strcmp(r.arch, "gemma3");
    r.E = (int)rkey_u32(&r, "embedding_length", 0);
    r.L = (int)rkey_u32(&r, "block_count", 0);
    r.H = (int)rkey_u32(&r, "attention.head_count", 0);
    r.KV = (int)rkey_u32(&r, "attention.head_count_kv", 0);
    r.HD = (int)rkey_u32(&r, "attention.key_length", 0);
    r.F = (int)rkey_u32(&r, "feed_forward_length", 0);
    r.V = (int)rkey_u32(&r, "vocab_size", 0);
    r.window = (int)rkey_u32(&r, "attention.sliding_window", g3 ? 0 : 4096);
    r.eps = rkey_f32(&r, "attention.layer_norm_rms_epsilon", 0);
    r.base = rkey_f32(&r, "rope.freq_base", 10000.0f);
    r.acap = g3 ? 0.0f : rkey_f32(&r, "attn_logit_softcapping", 50.0f);
    r.fcap = rkey_f32(&r, "final_logit_softcapping", g3 ? 0.0f : 30.0f);
    const int E = r.E, HD = r.HD, F = r.F, V = r.V, QD = r.H * HD, KD = r.KV * HD;
    const double scale = 1.0 / sqrt((double)HD); /* not a 27B shape */
    double *x = calloc((size_t)n * E, sizeof *x), *h = malloc(sizeof(double) * (E > F ? E : F));
    double *q = malloc(sizeof(double) * (size_t)n * QD), *k = malloc(sizeof(double) * n * KD),
           *v = malloc(sizeof(double) * n * KD), *att = malloc(sizeof(double) * QD),
           *o = malloc(sizeof(double) * E), *g = malloc(sizeof(double) * F),
           *u = malloc(sizeof(double) * F), *sc = malloc(sizeof(double) * n);
    const float *embd = rt(&r, -1, "token_embd.weight");
    for (int t = 0; t < n; t++)
        for (int i = 0; i < E; i++)
            x[(size_t)t * E + i] = (double)embd[(size_t)ids[t] * E + i] * sqrt((double)E);
    for (int il = 0; il < r.L; il++) {
        const bool local = r.window > 0 && (g3 ? il % 6 < 5 : il % 2 == 0);
        const float base = g3 && local ? 10000.0f : r.base;
        for (int t = 0; t < n; t++) {
            rnorm(h, x + (size_t)t * E, rt(&r, il, "attn_norm.weight"), E, r.eps);
            rmv(q + (size_t)t * QD, rt(&r, il, "attn_q.weight"), h, QD, E);
            rmv(k + (size_t)t * KD, rt(&r, il, "attn_k.weight"), h, KD, E);
            rmv(v + (size_t)t * KD, rt(&r, il, "attn_v.weight"), h, KD, E);
            for (int hh = 0; hh < r.H; hh++) {
                double *qh = q + (size_t)t * QD + hh * HD;
                if (g3) rnorm(qh, qh, rt(&r, il, "attn_q_norm.weight"), HD, r.eps);
                rrope(qh, HD, t, base, 1.0f);
            }
            for (int hh = 0; hh < r.KV; hh++) {
                double *kh = k + (size_t)t * KD + hh * HD;
                if (g3) rnorm(kh, kh, rt(&r, il, "attn_k_norm.weight"), HD, r.eps);
                rrope(kh, HD, t, base, 1.0f);
            }
        }
        for (int t = 0; t < n; t++) {
            for (int hh = 0; hh < r.H; hh++) {
                const int kvh = hh / (r.H / r.KV),
                          lo = local && t >= r.window ? t - r.window + 1 : 0;
                const double *qh = q + (size_t)t * QD + hh * HD;
                double mx = -INFINITY, sum = 0;
                for (int p = lo; p <= t; p++) {
                    double s = 0;
                    for (int d = 0; d < HD; d++)
                        s += qh[d] * scale * k[(size_t)p * KD + kvh * HD + d];
                    if (r.acap > 0) s = r.acap * tanh(s / r.acap);
                    sc[p] = s;
                    mx = s > mx ? s : mx;
                }
                for (int p = lo; p <= t; p++)
                    sum += (sc[p] = exp(sc[p] - mx));
                for (int d = 0; d < HD; d++) {
                    double acc = 0;
                    for (int p = lo; p <= t; p++)
                        acc += sc[p] / sum * v[(size_t)p * KD + kvh * HD + d];
                    att[hh * HD + d] = acc;
                }
            }
            double *xt = x + (size_t)t * E;
            rmv(o, rt(&r, il, "attn_output.weight"), att, E, QD);
            rnorm(o, o, rt(&r, il, "post_attention_norm.weight"), E, r.eps);
            for (int i = 0; i < E; i++)
                xt[i] += o[i];
            rnorm(h, xt, rt(&r, il, "ffn_norm.weight"), E, r.eps);
            rmv(g, rt(&r, il, "ffn_gate.weight"), h, F, E);
            rmv(u, rt(&r, il, "ffn_up.weight"), h, F, E);
            for (int i = 0; i < F; i++)
                g[i] = 0.5 * g[i] *
                       (1.0 + tanh(sqrt(2.0 / M_PI) * (g[i] + 0.044715 * g[i] * g[i] * g[i]))) *
                       u[i];
            rmv(o, rt(&r, il, "ffn_down.weight"), g, E, F);
            rnorm(o, o, rt(&r, il, "post_ffw_norm.weight"), E, r.eps);
            for (int i = 0; i < E; i++)
                xt[i] += o[i];
        }
    }
    const gguf_tensor_info *ow = gguf_find_tensor(r.g, "output.weight");
    const float *wout = ow ? ow->data : embd;
    double *lg = malloc(sizeof(double) * V);
    for (int t = 0; t < n; t++) {
        rnorm(h, x + (size_t)t * E, rt(&r, -1, "output_norm.weight"), E, r.eps);
        rmv(lg, wout, h, V, E);
        for (int i = 0; i < V; i++)
            out[(size_t)t * V + i] = (float)(r.fcap > 0 ? r.fcap * tanh(lg[i] / r.fcap) : lg[i]);
    }
    free(lg);
    free(x);
    free(h);
    free(q);
    free(k);
    free(v);
    free(att);
    free(o);
    free(g);
    free(u);
    free(sc);
    gguf_close(r.g);
}

/* Forge (F32 math, exact GELU) against the scalar forward on tiny-gemma2 and tiny-gemma3 (24
 * positions: the windows of 8 act), and the scalar forward against llama.cpp's tiny-gemma2
 * logits (it differs there by llama.cpp's fp16 GELU only). */
static void test_scalar_reference(void **state)
{
    (void)state;
    static const int32_t ids[24] = {1, 5, 9, 100, 200, 300, 17, 42, 77, 300, 301, 302,
                                    4, 5, 6, 7,   8,   9,   10, 11, 12, 13,  14,  15};
    const int V = 512, n = 24;
    const char *paths[2] = {g_gemma2, g_gemma3};
    float *ref = malloc((size_t)n * V * sizeof *ref);
    assert_non_null(ref);
    for (int i = 0; i < 2; i++) {
        ref_forward(paths[i], ids, n, ref);
        forge_model *m = load(paths[i]);
        double nm[2];
        for (int f32 = 0; f32 < 2; f32++) {
            float *a = run_math(m, ids, n, f32 == 1);
            nm[f32] = tu_nmse(a, ref, (size_t)n * V);
            free(a);
        }
        print_message("%s: Forge vs the scalar forward: NMSE %.3g (F32 math), %.3g (default)\n",
                      forge_model_info_get(m)->arch, nm[1], nm[0]);
        assert_true(nm[1] <= 1e-9);
        assert_true(nm[0] <= 1e-5);
        forge_model_free(m);
        if (i == 0) {
            size_t len;
            float *ll = (float *)tu_read_file("tests/data/arch/tiny-gemma2/ref_logits.f32", &len);
            assert_non_null(ll);
            assert_int_equal(len, (size_t)n * V * sizeof(float));
            double d = tu_nmse(ref, ll, (size_t)n * V);
            print_message("gemma2: the scalar forward vs llama.cpp: NMSE %.3g\n", d);
            assert_true(d <= 1e-5);
            free(ll);
        }
    }
    free(ref);
}

/* ---- the engine (paged cache, batches of several sequences) on Gemma 3 -------------------- */

typedef struct collect {
    int32_t ids[32];
    int n;
    bool done;
} collect;

static void on_event(const forge_event *ev, void *user)
{
    collect *c = user;
    if (ev->token >= 0 && c->n < 32) c->ids[c->n++] = ev->token;
    if (ev->finish != FORGE_FINISH_NONE) c->done = true;
}

static void engine_greedy(forge_model *m, int32_t *const *prompts, const int *lens, int n_prompts,
                          int n_gen, collect *out)
{
    forge_engine_params ep = forge_engine_default_params();
    ep.device = FORGE_DEVICE_CPU;
    ep.n_threads = 2;
    ep.n_ctx = 128;
    ep.kv_type = FORGE_KV_F32;
    forge_engine *e = NULL;
    forge_err err = {0};
    if (forge_engine_create(m, &ep, &e, &err)) fail_msg("engine: %s", err.msg);
    for (int i = 0; i < n_prompts; i++) {
        forge_request_params rp = forge_request_default_params();
        rp.prompt = prompts[i];
        rp.n_prompt = lens[i];
        rp.max_tokens = n_gen;
        rp.ignore_eos = true;
        rp.on_event = on_event;
        rp.user = &out[i];
        memset(&out[i], 0, sizeof out[i]);
        forge_req_id id;
        assert_int_equal(forge_engine_submit(e, &rp, &id, &err), 0);
    }
    assert_int_equal(forge_engine_run(e, &err), 0);
    for (int i = 0; i < n_prompts; i++) {
        assert_true(out[i].done);
        assert_int_equal(out[i].n, n_gen);
    }
    forge_engine_free(e);
}

/* tiny-gemma3 through the engine: each prompt alone == all four together == the context's
 * greedy ids (20 tokens past a 24-token prompt: far beyond the window of 8) */
static void test_engine_gemma3(void **state)
{
    (void)state;
    enum { N_GEN = 20, N_P = 4 };
    int32_t p0[24], p1[9], p2[17], p3[30];
    int32_t *prompts[N_P] = {p0, p1, p2, p3};
    const int lens[N_P] = {24, 9, 17, 30};
    uint64_t rs = 0x9e3779b9;
    for (int k = 0; k < N_P; k++)
        for (int i = 0; i < lens[k]; i++)
            prompts[k][i] = i == 0 ? 1 : 3 + (int32_t)(tu_rand_u64(&rs) % 509);
    forge_model *m = load(g_gemma3);
    collect together[N_P], alone;
    engine_greedy(m, prompts, lens, N_P, N_GEN, together);
    for (int k = 0; k < N_P; k++) {
        engine_greedy(m, &prompts[k], &lens[k], 1, N_GEN, &alone);
        assert_memory_equal(alone.ids, together[k].ids, N_GEN * sizeof(int32_t));
    }
    /* the context, greedy */
    forge_context_params cp = forge_context_default_params();
    cp.device = FORGE_DEVICE_CPU;
    cp.n_threads = 2;
    cp.n_ctx = 64;
    cp.kv_type = FORGE_KV_F32;
    forge_context *ctx = NULL;
    forge_err err = {0};
    assert_int_equal(forge_context_create(m, &cp, &ctx, &err), 0);
    assert_int_equal(forge_decode(ctx, p0, 24, false, &err), 0);
    for (int i = 0; i < N_GEN; i++) {
        const float *l = forge_get_logits(ctx, -1);
        int32_t best = 0;
        for (int v = 1; v < 512; v++)
            if (l[v] > l[best]) best = v;
        assert_int_equal(best, together[0].ids[i]);
        if (i + 1 < N_GEN) assert_int_equal(forge_decode(ctx, &best, 1, false, &err), 0);
    }
    forge_context_free(ctx);
    forge_model_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hparams),       cmocka_unit_test(test_window),
        cmocka_unit_test(test_local_rope),    cmocka_unit_test(test_caps_and_batches),
        cmocka_unit_test(test_27b_reference), cmocka_unit_test(test_bad_files),
        cmocka_unit_test(test_geglu_ggml),    cmocka_unit_test(test_scalar_reference),
        cmocka_unit_test(test_engine_gemma3),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
