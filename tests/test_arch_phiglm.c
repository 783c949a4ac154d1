/* test_arch_phiglm.c - Phi-3 and GLM (chatglm, glm4): small random models written here with the
 * GGUF writer, checked by equivalence (a fused file against the same weights in the llama
 * family's separate tensors, which Forge runs already), LongRoPE's choice of factors, glm4's post
 * norms against a scalar reference of the newer llama.cpp graph, and bad files refused with
 * messages naming the tensor. The llama.cpp references of these families are in
 * tests/data/arch/ (tiny-phi3, tiny-chatglm).
 *
 * `test_arch_phiglm --write KIND PATH` writes one of the models (phi3, phi3-long, phi3-win,
 * phi3-partial, chatglm, glm4) for a manual comparison with llama.cpp. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "forge.h"
#include "forge_engine.h"
#include "forge_synth.h"
#include "testutil.h"

/* ---- the models ------------------------------------------------------------------------- */

enum { E = 64, NH = 4, NKV = 2, HD = 16, FF = 96, NL = 2, NV = 512, QD = NH * HD, KD = NKV * HD };

typedef struct gen {
    const char *arch;    /* phi3, chatglm, glm4, or llama/qwen2 for the split equivalents */
    bool fused_qkv;      /* attn_qkv, else attn_q/k/v */
    bool qkv_bias;       /* biases of q/k/v (fused or separate) */
    bool zero_bias;      /* the biases are present but zero (qwen2 needs them) */
    bool fused_gate_up;  /* ffn_up [E, 2F], else ffn_gate + ffn_up */
    bool post_norms;     /* glm4's post_attention_norm / post_ffw_norm */
    int n_rot;           /* rope.dimension_count; 0: HD */
    bool longrope;       /* rope_factors_long/short */
    bool freqs_short, freqs_long; /* rope_freqs.weight = the short / long factors */
    float attn_factor;   /* rope.scaling.attn_factor; 0: absent */
    uint32_t n_ctx_orig; /* rope.scaling.original_context_length; 0: absent */
    const char *scaling; /* rope.scaling.type; NULL: absent */
    int window;          /* phi3: attention.sliding_window (written always for phi3) */
    uint32_t n_ctx;      /* context_length; 0: 256 */
    /* bad variants */
    const char *skip;    /* leave this tensor out */
    const char *reshape; /* give this tensor ne0 = re0, ne1 = re1 */
    int64_t re0, re1;
    bool mrope;          /* glm4: rope.dimension_sections [8, 4, 4, 0] */
    bool no_window_key;  /* phi3: no attention.sliding_window */
} gen;

/* Every tensor's values come from (seed, name): the same weights whatever file holds them. */
static uint64_t name_seed(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return h;
}

static float rnd_normal(uint64_t *st)
{
    float s = 0;
    for (int i = 0; i < 4; i++)
        s += tu_rand_uniform(st);
    return s * 0.8660254f; /* 4 uniforms in [-1, 1): variance 4/3 -> 1 */
}

typedef enum kind { K_W, K_NORM, K_BIAS, K_FACT_LONG, K_FACT_SHORT } kind;

/* Values of the logical tensor `name` (a fused tensor is its parts, in order). */
static void values(const char *name, kind k, float *x, int64_t n, const gen *g)
{
    uint64_t st = name_seed(name) | 1;
    for (int64_t i = 0; i < n; i++) {
        float r = rnd_normal(&st);
        switch (k) {
        case K_W: x[i] = 0.2f * r; break;
        case K_NORM: x[i] = 1.0f + 0.2f * r; break;
        case K_BIAS: x[i] = g->zero_bias ? 0.0f : 0.2f * r; break;
        case K_FACT_LONG: x[i] = 1.0f + (float)i * 0.7f; break;  /* 1 .. */
        case K_FACT_SHORT: x[i] = 1.0f + (float)i * 0.05f; break; /* near 1 */
        }
    }
}

typedef struct part {
    const char *what; /* logical name suffix ("attn_q.weight") */
    kind k;
    int64_t rows;
} part;

typedef struct tensor {
    char name[64];
    int layer; /* -1: global */
    int64_t ne0, ne1;
    part parts[3];
    int n_parts;
} tensor;

typedef struct model_desc {
    tensor t[64];
    int n;
} model_desc;

static void add(model_desc *d, const gen *g, int layer, const char *name, int64_t ne0,
                int64_t ne1, int n_parts, const part *parts)
{
    char full[64];
    if (layer >= 0) snprintf(full, sizeof full, "blk.%d.%s", layer, name);
    else snprintf(full, sizeof full, "%s", name);
    if (g->skip && !strcmp(g->skip, full)) return;
    tensor *t = &d->t[d->n++];
    snprintf(t->name, sizeof t->name, "%s", full);
    t->layer = layer;
    t->ne0 = ne0;
    t->ne1 = ne1;
    if (g->reshape && !strcmp(g->reshape, full)) {
        t->ne0 = g->re0;
        t->ne1 = g->re1;
    }
    t->n_parts = n_parts;
    memcpy(t->parts, parts, (size_t)n_parts * sizeof *parts);
}

#define ADD1(layer, name, ne0, ne1, k)                                                             \
    add(d, g, layer, name, ne0, ne1, 1, (part[]){{name, k, (ne1) > 1 ? (ne1) : (ne0)}})

static void describe(model_desc *d, const gen *g)
{
    const int64_t n_pairs = (g->n_rot ? g->n_rot : HD) / 2;
    d->n = 0;
    ADD1(-1, "token_embd.weight", E, NV, K_W);
    ADD1(-1, "output_norm.weight", E, 1, K_NORM);
    ADD1(-1, "output.weight", E, NV, K_W);
    if (g->longrope) {
        ADD1(-1, "rope_factors_long.weight", n_pairs, 1, K_FACT_LONG);
        ADD1(-1, "rope_factors_short.weight", n_pairs, 1, K_FACT_SHORT);
    }
    if (g->freqs_short || g->freqs_long)
        add(d, g, -1, "rope_freqs.weight", n_pairs, 1, 1,
            (part[]){{g->freqs_long ? "rope_factors_long.weight" : "rope_factors_short.weight",
                      g->freqs_long ? K_FACT_LONG : K_FACT_SHORT, n_pairs}});
    for (int l = 0; l < NL; l++) {
        ADD1(l, "attn_norm.weight", E, 1, K_NORM);
        if (g->fused_qkv) {
            add(d, g, l, "attn_qkv.weight", E, QD + 2 * KD, 3,
                (part[]){{"attn_q.weight", K_W, QD}, {"attn_k.weight", K_W, KD},
                         {"attn_v.weight", K_W, KD}});
            if (g->qkv_bias)
                add(d, g, l, "attn_qkv.bias", QD + 2 * KD, 1, 3,
                    (part[]){{"attn_q.bias", K_BIAS, QD}, {"attn_k.bias", K_BIAS, KD},
                             {"attn_v.bias", K_BIAS, KD}});
        } else {
            ADD1(l, "attn_q.weight", E, QD, K_W);
            ADD1(l, "attn_k.weight", E, KD, K_W);
            ADD1(l, "attn_v.weight", E, KD, K_W);
            if (g->qkv_bias) {
                ADD1(l, "attn_q.bias", QD, 1, K_BIAS);
                ADD1(l, "attn_k.bias", KD, 1, K_BIAS);
                ADD1(l, "attn_v.bias", KD, 1, K_BIAS);
            }
        }
        ADD1(l, "attn_output.weight", QD, E, K_W);
        if (g->post_norms) ADD1(l, "post_attention_norm.weight", E, 1, K_NORM);
        ADD1(l, "ffn_norm.weight", E, 1, K_NORM);
        if (g->fused_gate_up) {
            add(d, g, l, "ffn_up.weight", E, 2 * FF, 2,
                (part[]){{"ffn_gate.weight", K_W, FF}, {"ffn_up.weight", K_W, FF}});
        } else {
            ADD1(l, "ffn_gate.weight", E, FF, K_W);
            ADD1(l, "ffn_up.weight", E, FF, K_W);
        }
        ADD1(l, "ffn_down.weight", FF, E, K_W);
        if (g->post_norms) ADD1(l, "post_ffw_norm.weight", E, 1, K_NORM);
    }
}

typedef struct fill_user {
    const model_desc *d;
    const gen *g;
} fill_user;

static int fill(void *user, int64_t index, const gguf_tensor_info *info, int64_t row0,
                int64_t n_rows, void *dst, forge_err *err)
{
    (void)err;
    const fill_user *u = user;
    const tensor *t = &u->d->t[index];
    const int64_t total = t->ne0 * t->ne1;
    float *all = malloc((size_t)total * sizeof *all);
    if (!all) return FORGE_E_NOMEM;
    int64_t off = 0;
    for (int p = 0; p < t->n_parts && off < total; p++) {
        char lname[64];
        if (t->layer >= 0) snprintf(lname, sizeof lname, "blk.%d.%s", t->layer, t->parts[p].what);
        else snprintf(lname, sizeof lname, "%s", t->parts[p].what);
        int64_t n = t->parts[p].rows * (t->ne1 > 1 ? t->ne0 : 1);
        if (n > total - off) n = total - off;
        values(lname, t->parts[p].k, all + off, n, u->g);
        off += n;
    }
    for (; off < total; off++)
        all[off] = 0.01f;
    memcpy(dst, all + row0 * info->ne[0], (size_t)(n_rows * info->ne[0]) * sizeof(float));
    free(all);
    return FORGE_OK;
}

/* A SentencePiece byte vocabulary as forge synth writes it (<unk>, <s>, </s>, bytes, fillers). */
static void vocab(gguf_writer *w)
{
    forge_err err = {0};
    static char names[NV][16];
    gguf_str toks[NV];
    float scores[NV];
    int32_t types[NV];
    for (int i = 0; i < NV; i++) {
        int len;
        if (i == 0) len = snprintf(names[i], 16, "<unk>"), types[i] = 2;
        else if (i == 1) len = snprintf(names[i], 16, "<s>"), types[i] = 3;
        else if (i == 2) len = snprintf(names[i], 16, "</s>"), types[i] = 3;
        else if (i < 259) len = snprintf(names[i], 16, "<0x%02X>", (unsigned)(i - 3)), types[i] = 6;
        else len = snprintf(names[i], 16, "<unused_%d>", i - 259), types[i] = 5;
        toks[i].data = names[i];
        toks[i].len = (uint64_t)len;
        scores[i] = i < 259 ? 0.0f : -(float)(i - 259);
    }
    assert_int_equal(gguf_writer_set_str(w, "tokenizer.ggml.model", "llama", &err), 0);
    assert_int_equal(gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", toks, NV, &err), 0);
    assert_int_equal(
        gguf_writer_set_arr(w, "tokenizer.ggml.scores", GGUF_TYPE_FLOAT32, scores, NV, &err), 0);
    assert_int_equal(
        gguf_writer_set_arr(w, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, types, NV, &err), 0);
    assert_int_equal(gguf_writer_set_u32(w, "tokenizer.ggml.unknown_token_id", 0, &err), 0);
    assert_int_equal(gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", 1, &err), 0);
    assert_int_equal(gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", 2, &err), 0);
}

static void write_model(const gen *g, const char *path)
{
    forge_err err = {0};
    gguf_writer *w = NULL;
    model_desc *d = calloc(1, sizeof *d);
    assert_non_null(d);
    char key[128];
#define K(s) (snprintf(key, sizeof key, "%s.%s", g->arch, s), key)
    assert_int_equal(gguf_writer_create(&w, &err), 0);
    assert_int_equal(gguf_writer_set_str(w, "general.architecture", g->arch, &err), 0);
    assert_int_equal(gguf_writer_set_u32(w, K("context_length"), g->n_ctx ? g->n_ctx : 256, &err),
                     0);
    assert_int_equal(gguf_writer_set_u32(w, K("embedding_length"), E, &err), 0);
    assert_int_equal(gguf_writer_set_u32(w, K("block_count"), NL, &err), 0);
    assert_int_equal(gguf_writer_set_u32(w, K("feed_forward_length"), FF, &err), 0);
    assert_int_equal(gguf_writer_set_u32(w, K("attention.head_count"), NH, &err), 0);
    assert_int_equal(gguf_writer_set_u32(w, K("attention.head_count_kv"), NKV, &err), 0);
    assert_int_equal(gguf_writer_set_f32(w, K("attention.layer_norm_rms_epsilon"), 1e-5f, &err),
                     0);
    assert_int_equal(gguf_writer_set_f32(w, K("rope.freq_base"), 10000.0f, &err), 0);
    assert_int_equal(
        gguf_writer_set_u32(w, K("rope.dimension_count"), g->n_rot ? g->n_rot : HD, &err), 0);
    if (!strcmp(g->arch, "phi3") && !g->no_window_key)
        assert_int_equal(gguf_writer_set_u32(w, K("attention.sliding_window"),
                                             (uint32_t)g->window, &err),
                         0);
    if (g->attn_factor > 0)
        assert_int_equal(gguf_writer_set_f32(w, K("rope.scaling.attn_factor"), g->attn_factor, &err),
                         0);
    if (g->n_ctx_orig)
        assert_int_equal(
            gguf_writer_set_u32(w, K("rope.scaling.original_context_length"), g->n_ctx_orig, &err),
            0);
    if (g->scaling)
        assert_int_equal(gguf_writer_set_str(w, K("rope.scaling.type"), g->scaling, &err), 0);
    if (g->mrope) {
        int32_t sec[4] = {8, 4, 4, 0};
        assert_int_equal(
            gguf_writer_set_arr(w, K("rope.dimension_sections"), GGUF_TYPE_INT32, sec, 4, &err), 0);
    }
#undef K
    vocab(w);
    describe(d, g);
    for (int i = 0; i < d->n; i++) {
        int64_t ne[2] = {d->t[i].ne0, d->t[i].ne1};
        assert_int_equal(gguf_writer_add_tensor(w, d->t[i].name, GGML_TYPE_F32,
                                                d->t[i].ne1 > 1 ? 2 : 1, ne, &err),
                         0);
    }
    fill_user u = {d, g};
    if (gguf_writer_write(w, path, fill, &u, 0, &err)) fail_msg("write %s: %s", path, err.msg);
    gguf_writer_free(w);
    free(d);
}

/* ---- running them ----------------------------------------------------------------------- */

static const int32_t g_ids[] = {1, 300, 17, 45, 260, 99, 3, 511, 128, 64, 200, 7, 350, 41, 42, 500};
enum { N_IDS = sizeof g_ids / sizeof g_ids[0] };

/* Logits of every position of g_ids ([N_IDS][NV], malloc'd) with a context of n_ctx (0: 64). */
static float *run(const char *path, int n_ctx)
{
    forge_err err = {0};
    forge_model *m = NULL;
    forge_context *ctx = NULL;
    if (forge_model_load(path, &m, &err)) fail_msg("load %s: %s", path, err.msg);
    forge_context_params cp = forge_context_default_params();
    cp.n_ctx = n_ctx ? n_ctx : 64;
    cp.n_threads = 1;
    cp.kv_type = FORGE_KV_F32;
    cp.f32_math = true;
    if (forge_context_create(m, &cp, &ctx, &err)) fail_msg("context: %s", err.msg);
    if (forge_decode(ctx, g_ids, N_IDS, true, &err)) fail_msg("decode: %s", err.msg);
    float *out = malloc(sizeof(float) * N_IDS * NV);
    assert_non_null(out);
    for (int i = 0; i < N_IDS; i++)
        memcpy(out + (size_t)i * NV, forge_get_logits(ctx, i), sizeof(float) * NV);
    forge_context_free(ctx);
    forge_model_free(m);
    return out;
}

/* The load error of a bad variant (FORGE_OK if it loads), message in msg. */
static int load_error(const char *path, char *msg, size_t n)
{
    forge_err err = {0};
    forge_model *m = NULL;
    int rc = forge_model_load(path, &m, &err);
    forge_model_free(m);
    snprintf(msg, n, "%s", err.msg);
    return rc;
}

static char *g_dir;

static char *tmp_path(const char *name)
{
    char *p = malloc(strlen(g_dir) + strlen(name) + 2);
    sprintf(p, "%s/%s", g_dir, name);
    return p;
}

static double nmse_of(const gen *a, int ctx_a, const gen *b, int ctx_b)
{
    char *pa = tmp_path("a.gguf"), *pb = tmp_path("b.gguf");
    write_model(a, pa);
    write_model(b, pb);
    float *la = run(pa, ctx_a), *lb = run(pb, ctx_b);
    double e = tu_nmse(la, lb, (size_t)N_IDS * NV);
    free(la);
    free(lb);
    free(pa);
    free(pb);
    return e;
}

/* ---- Phi-3 ------------------------------------------------------------------------------ */

static const gen PHI3 = {.arch = "phi3", .fused_qkv = true, .fused_gate_up = true};

/* The fused attn_qkv and ffn_up of a phi3 file are the llama family's q/k/v and gate/up: the
 * same logits as those weights written separately (qwen2: the same NEOX RoPE; zero biases). A
 * swapped view (k for v, up for gate) changes them. */
static void test_phi3_fused_equals_split(void **state)
{
    (void)state;
    gen split = {.arch = "qwen2", .qkv_bias = true, .zero_bias = true};
    double e = nmse_of(&PHI3, 0, &split, 0);
    print_message("phi3 fused vs split: nmse %.3g\n", e);
    assert_true(e < 1e-12);
    /* partial rotary (Phi-4-mini rotates 3/4 of each head) */
    gen p4 = PHI3, s4 = split;
    p4.n_rot = s4.n_rot = 12;
    e = nmse_of(&p4, 0, &s4, 0);
    print_message("phi3 partial rotary vs split: nmse %.3g\n", e);
    assert_true(e < 1e-12);
    /* separate q/k/v in a phi3 file work too */
    gen sep = PHI3;
    sep.fused_qkv = false;
    e = nmse_of(&sep, 0, &split, 0);
    assert_true(e < 1e-12);
}

/* LongRoPE: a context no longer than the original training context uses the short factors, a
 * longer one the long factors (the same logits as those factors given as rope_freqs), both
 * with cos/sin scaled by attn_factor; the two choices differ. */
static void test_phi3_longrope_choice(void **state)
{
    (void)state;
    gen lr = PHI3;
    lr.longrope = true;
    lr.attn_factor = 1.19f;
    lr.n_ctx_orig = 64;
    gen as_short = PHI3, as_long = PHI3;
    as_short.freqs_short = true;
    as_long.freqs_long = true;
    as_short.attn_factor = as_long.attn_factor = 1.19f;
    double e_short = nmse_of(&lr, 64, &as_short, 64);
    double e_long = nmse_of(&lr, 65, &as_long, 65);
    double e_diff = nmse_of(&lr, 64, &as_long, 64);
    print_message("longrope: short %.3g long %.3g (short vs long %.3g)\n", e_short, e_long,
                  e_diff);
    assert_true(e_short < 1e-12);
    assert_true(e_long < 1e-12);
    assert_true(e_diff > 1e-4);
    /* rope.scaling.type "longrope" (newer converters write it) loads and changes nothing */
    gen typed = lr;
    typed.scaling = "longrope";
    assert_true(nmse_of(&typed, 64, &lr, 64) < 1e-12);
    assert_true(nmse_of(&typed, 65, &lr, 65) < 1e-12);
    /* the attention factor acts */
    gen no_af = as_short;
    no_af.attn_factor = 0;
    assert_true(nmse_of(&lr, 64, &no_af, 64) > 1e-4);
}

/* Greedy continuation of g_ids by a context of n_ctx, or by an engine whose requests reach
 * n_ctx positions but whose KV pool holds kv_size (the per-request context picks the factors). */
enum { N_GEN = 6 };

static void on_event(const forge_event *ev, void *user)
{
    int32_t *out = user;
    if (ev->token >= 0 && ev->n_generated >= 1 && ev->n_generated <= N_GEN)
        out[ev->n_generated - 1] = ev->token;
}

static void greedy_ids(const char *path, int n_ctx, int kv_size, int32_t *out)
{
    forge_err err = {0};
    forge_model *m = NULL;
    if (forge_model_load(path, &m, &err)) fail_msg("load %s: %s", path, err.msg);
    if (kv_size == 0) {
        forge_context *ctx = NULL;
        forge_context_params cp = forge_context_default_params();
        cp.n_ctx = n_ctx, cp.n_threads = 1, cp.f32_math = true;
        if (forge_context_create(m, &cp, &ctx, &err)) fail_msg("context: %s", err.msg);
        int32_t id;
        assert_int_equal(forge_decode_greedy(ctx, g_ids, N_IDS, &id, &err), 0);
        for (int i = 0; i < N_GEN; i++) {
            out[i] = id;
            assert_int_equal(forge_decode_greedy(ctx, &id, 1, &id, &err), 0);
        }
        forge_context_free(ctx);
    } else {
        forge_engine *e = NULL;
        forge_engine_params ep = forge_engine_default_params();
        ep.n_ctx = n_ctx, ep.kv_size = kv_size, ep.n_threads = 1, ep.f32_math = true;
        ep.n_parallel = 2;
        if (forge_engine_create(m, &ep, &e, &err)) fail_msg("engine: %s", err.msg);
        forge_request_params rp = forge_request_default_params();
        rp.prompt = g_ids, rp.n_prompt = N_IDS, rp.max_tokens = N_GEN, rp.ignore_eos = true;
        rp.on_event = on_event, rp.user = out;
        forge_req_id id;
        assert_int_equal(forge_engine_submit(e, &rp, &id, &err), 0);
        assert_int_equal(forge_engine_run(e, &err), 0);
        forge_engine_free(e);
    }
    forge_model_free(m);
}

/* An engine picks LongRoPE's factors by its context per request (n_ctx), not by the size of
 * its KV pool: the same ids as a context of that n_ctx. */
static void test_phi3_longrope_engine(void **state)
{
    (void)state;
    gen lr = PHI3;
    lr.longrope = true;
    lr.attn_factor = 1.19f;
    lr.n_ctx_orig = 64;
    char *p = tmp_path("lr.gguf");
    write_model(&lr, p);
    int32_t c_short[N_GEN], c_long[N_GEN], e_short[N_GEN] = {0}, e_long[N_GEN] = {0};
    greedy_ids(p, 64, 0, c_short);
    greedy_ids(p, 128, 0, c_long);
    greedy_ids(p, 64, 512, e_short);
    greedy_ids(p, 128, 512, e_long);
    assert_memory_not_equal(c_short, c_long, sizeof c_short); /* the choice shows */
    assert_memory_equal(e_short, c_short, sizeof c_short);
    assert_memory_equal(e_long, c_long, sizeof c_long);
    free(p);
}

/* A sliding window of 4 changes the logits of positions 4.. only. */
static void test_phi3_window(void **state)
{
    (void)state;
    gen win = PHI3;
    win.window = 4;
    char *pa = tmp_path("w.gguf"), *pb = tmp_path("nw.gguf");
    write_model(&win, pa);
    write_model(&PHI3, pb);
    float *la = run(pa, 0), *lb = run(pb, 0);
    assert_true(tu_nmse(la, lb, 4 * NV) < 1e-12);
    assert_true(tu_nmse(la + 4 * NV, lb + 4 * NV, (size_t)(N_IDS - 4) * NV) > 1e-4);
    free(la);
    free(lb);
    free(pa);
    free(pb);
}

/* ---- GLM -------------------------------------------------------------------------------- */

static const gen CHATGLM = {
    .arch = "chatglm", .fused_qkv = true, .qkv_bias = true, .fused_gate_up = true, .n_rot = 8};

/* chatglm's fused attn_qkv (+ bias) and ffn_up are llama's q/k/v (+ biases) and gate/up, with
 * NORM RoPE over the first half of each head. */
static void test_chatglm_fused_equals_split(void **state)
{
    (void)state;
    gen split = {.arch = "llama", .qkv_bias = true, .n_rot = 8};
    double e = nmse_of(&CHATGLM, 0, &split, 0);
    print_message("chatglm fused vs split: nmse %.3g\n", e);
    assert_true(e < 1e-12);
    gen sep = CHATGLM; /* GLM-4 files with separate q/k/v */
    sep.fused_qkv = false;
    assert_true(nmse_of(&sep, 0, &split, 0) < 1e-12);
}

/* A scalar reference of the GLM graphs, written from their steps in llama.cpp (chatglm in
 * c392e50, glm4 in the newer src/models/glm4.cpp), reading any F32 GLM file: per layer
 * h = rmsnorm(x) attn_norm; q|k|v = Wqkv h + b; NORM RoPE on the first n_rot dims of each head;
 * a = Wo softmax(q k / sqrt(hd)) v; glm4: a = rmsnorm(a) post_attention_norm; x += a;
 * g|u = Wup rmsnorm(x) ffn_norm; f = Wdown silu(g) u; glm4: f = rmsnorm(f) post_ffw_norm; x += f.
 * Without post norms it is chatglm: checked against llama.cpp's tiny-chatglm logits below. */
typedef struct ref_model {
    const gguf_ctx *g;
    const char *arch;
    int E, NHq, NHk, H, F, L, V, R;
    float eps;
} ref_model;

static const float *ref_tensor(const ref_model *r, int layer, const char *what, int64_t n)
{
    char nm[96];
    if (layer >= 0) snprintf(nm, sizeof nm, "blk.%d.%s", layer, what);
    else snprintf(nm, sizeof nm, "%s", what);
    const gguf_tensor_info *t = gguf_find_tensor(r->g, nm);
    if (!t) return NULL;
    if (t->type != GGML_TYPE_F32 || t->n_elements != n) fail_msg("reference: %s is not F32 of %lld", nm, (long long)n);
    return t->data;
}

static uint32_t ref_u32(const ref_model *r, const char *suffix)
{
    char key[96];
    uint32_t v = 0;
    forge_err err = {0};
    snprintf(key, sizeof key, "%s.%s", r->arch, suffix);
    if (gguf_get_u32(r->g, key, &v, &err)) fail_msg("reference: %s", err.msg);
    return v;
}

static void rmsnorm(float *o, const float *x, const float *w, int n, float eps)
{
    double ss = 0;
    for (int i = 0; i < n; i++)
        ss += (double)x[i] * x[i];
    float s = (float)(1.0 / sqrt(ss / n + eps));
    for (int i = 0; i < n; i++)
        o[i] = x[i] * s * w[i];
}

/* y = rows r0.. r0+out-1 of w (rows of in) times x */
static void matvec(float *y, const float *w, int64_t r0, const float *x, int in, int out)
{
    for (int r = 0; r < out; r++) {
        double s = 0;
        for (int i = 0; i < in; i++)
            s += (double)w[(size_t)(r0 + r) * in + i] * x[i];
        y[r] = (float)s;
    }
}

/* logits [n][V] of ids by the reference; malloc'd */
static float *reference_glm(const char *path, const int32_t *ids, int n)
{
    forge_err err = {0};
    gguf_ctx *g = NULL;
    if (gguf_open(path, &g, &err)) fail_msg("reference: %s", err.msg);
    gguf_str arch;
    assert_int_equal(gguf_get_str(g, "general.architecture", &arch, &err), 0);
    char arch_name[16];
    snprintf(arch_name, sizeof arch_name, "%.*s", (int)arch.len, arch.data);
    ref_model r = {.g = g, .arch = arch_name};
    r.E = (int)ref_u32(&r, "embedding_length"), r.NHq = (int)ref_u32(&r, "attention.head_count");
    r.NHk = (int)ref_u32(&r, "attention.head_count_kv"), r.F = (int)ref_u32(&r, "feed_forward_length");
    r.L = (int)ref_u32(&r, "block_count"), r.R = (int)ref_u32(&r, "rope.dimension_count");
    r.H = r.E / r.NHq;
    char key[96];
    snprintf(key, sizeof key, "%s.attention.layer_norm_rms_epsilon", arch_name);
    assert_int_equal(gguf_get_f32(g, key, &r.eps, &err), 0);
    const int Em = r.E, H = r.H, QDm = r.NHq * H, KDm = r.NHk * H, F = r.F;
    const gguf_tensor_info *te = gguf_find_tensor(g, "token_embd.weight");
    r.V = (int)te->ne[1];
    const float *emb = ref_tensor(&r, -1, "token_embd.weight", (int64_t)Em * r.V);
    float *x = malloc(sizeof(float) * (size_t)n * Em);
    float *kc = malloc(sizeof(float) * (size_t)n * r.L * KDm),
          *vc = malloc(sizeof(float) * (size_t)n * r.L * KDm);
    float *h = malloc(sizeof(float) * (size_t)Em), *q = malloc(sizeof(float) * (size_t)QDm),
          *att = malloc(sizeof(float) * (size_t)QDm), *o = malloc(sizeof(float) * (size_t)Em),
          *gt = malloc(sizeof(float) * (size_t)F), *up = malloc(sizeof(float) * (size_t)F);
    double *sc = malloc(sizeof(double) * (size_t)n);
    float *logits = malloc(sizeof(float) * (size_t)n * r.V);
    for (int t = 0; t < n; t++)
        memcpy(x + (size_t)t * Em, emb + (size_t)ids[t] * Em, sizeof(float) * (size_t)Em);
    for (int l = 0; l < r.L; l++) {
        const float *an = ref_tensor(&r, l, "attn_norm.weight", Em);
        const float *wqkv = ref_tensor(&r, l, "attn_qkv.weight", (int64_t)Em * (QDm + 2 * KDm));
        const float *bqkv = ref_tensor(&r, l, "attn_qkv.bias", QDm + 2 * KDm);
        const float *wq = wqkv, *wk = wqkv, *wv = wqkv, *bq = bqkv, *bk = bqkv, *bv = bqkv;
        int64_t rq = 0, rk = QDm, rv = QDm + KDm; /* first rows of q, k, v in their matrix */
        if (!wqkv) {
            wq = ref_tensor(&r, l, "attn_q.weight", (int64_t)Em * QDm);
            wk = ref_tensor(&r, l, "attn_k.weight", (int64_t)Em * KDm);
            wv = ref_tensor(&r, l, "attn_v.weight", (int64_t)Em * KDm);
            bq = ref_tensor(&r, l, "attn_q.bias", QDm);
            bk = ref_tensor(&r, l, "attn_k.bias", KDm);
            bv = ref_tensor(&r, l, "attn_v.bias", KDm);
            rq = rk = rv = 0;
        }
        const float *wo = ref_tensor(&r, l, "attn_output.weight", (int64_t)QDm * Em);
        const float *pan = ref_tensor(&r, l, "post_attention_norm.weight", Em);
        const float *fn = ref_tensor(&r, l, "ffn_norm.weight", Em);
        const float *wup = ref_tensor(&r, l, "ffn_up.weight", (int64_t)Em * 2 * F);
        const float *wd = ref_tensor(&r, l, "ffn_down.weight", (int64_t)F * Em);
        const float *pfn = ref_tensor(&r, l, "post_ffw_norm.weight", Em);
        assert_non_null(an), assert_non_null(wq), assert_non_null(wo), assert_non_null(fn);
        assert_non_null(wup), assert_non_null(wd);
        for (int t = 0; t < n; t++) { /* one token at a time: causal by construction */
            float *xt = x + (size_t)t * Em, *kt = kc + ((size_t)t * r.L + l) * KDm,
                  *vt = vc + ((size_t)t * r.L + l) * KDm;
            rmsnorm(h, xt, an, Em, r.eps);
            matvec(q, wq, rq, h, Em, QDm);
            matvec(kt, wk, rk, h, Em, KDm);
            matvec(vt, wv, rv, h, Em, KDm);
            for (int i = 0; bq && i < QDm; i++)
                q[i] += bq[rq + i];
            for (int i = 0; bk && i < KDm; i++)
                kt[i] += bk[rk + i], vt[i] += bv[rv + i];
            for (int hh = 0; hh < r.NHq + r.NHk; hh++) { /* NORM: pairs (2i, 2i+1), i < R/2 */
                float *v = hh < r.NHq ? q + hh * H : kt + (hh - r.NHq) * H;
                for (int i = 0; i < r.R; i += 2) {
                    double th = t * pow(10000.0, -(double)i / r.R);
                    float c = (float)cos(th), sn = (float)sin(th), a = v[i], b = v[i + 1];
                    v[i] = a * c - b * sn;
                    v[i + 1] = a * sn + b * c;
                }
            }
            for (int hh = 0; hh < r.NHq; hh++) {
                const int kvh = hh / (r.NHq / r.NHk);
                double mx = -1e300, sum = 0;
                for (int p = 0; p <= t; p++) {
                    const float *kp = kc + ((size_t)p * r.L + l) * KDm + kvh * H;
                    double d = 0;
                    for (int i = 0; i < H; i++)
                        d += (double)q[hh * H + i] * kp[i];
                    sc[p] = d / sqrt((double)H);
                    if (sc[p] > mx) mx = sc[p];
                }
                for (int p = 0; p <= t; p++)
                    sum += (sc[p] = exp(sc[p] - mx));
                for (int i = 0; i < H; i++) {
                    double a = 0;
                    for (int p = 0; p <= t; p++)
                        a += sc[p] / sum * vc[((size_t)p * r.L + l) * KDm + kvh * H + i];
                    att[hh * H + i] = (float)a;
                }
            }
            matvec(o, wo, 0, att, QDm, Em);
            if (pan) rmsnorm(o, o, pan, Em, r.eps);
            for (int i = 0; i < Em; i++)
                xt[i] += o[i];
            rmsnorm(h, xt, fn, Em, r.eps);
            matvec(gt, wup, 0, h, Em, F); /* the gate rows first */
            matvec(up, wup, F, h, Em, F);
            for (int i = 0; i < F; i++)
                gt[i] = gt[i] / (1.0f + expf(-gt[i])) * up[i];
            matvec(o, wd, 0, gt, F, Em);
            if (pfn) rmsnorm(o, o, pfn, Em, r.eps);
            for (int i = 0; i < Em; i++)
                xt[i] += o[i];
        }
    }
    const float *on = ref_tensor(&r, -1, "output_norm.weight", Em);
    const float *ow = ref_tensor(&r, -1, "output.weight", (int64_t)Em * r.V);
    for (int t = 0; t < n; t++) {
        rmsnorm(h, x + (size_t)t * Em, on, Em, r.eps);
        matvec(logits + (size_t)t * r.V, ow ? ow : emb, 0, h, Em, r.V);
    }
    free(x), free(kc), free(vc), free(h), free(q), free(att), free(o), free(gt), free(up);
    free(sc);
    gguf_close(g);
    return logits;
}

/* glm4 = chatglm + the post norms: Forge's logits match the scalar reference, for chatglm (no
 * post norms) and glm4 (separate q/k/v with biases, as GLM-4-0414 files have them); and the post
 * norms move the logits. */
static void test_glm4_post_norms(void **state)
{
    (void)state;
    gen glm4 = CHATGLM;
    glm4.arch = "glm4";
    glm4.post_norms = true;
    glm4.fused_qkv = false;
    const gen *cases[] = {&CHATGLM, &glm4};
    float *ref[2];
    for (int c = 0; c < 2; c++) {
        char *p = tmp_path("g.gguf");
        write_model(cases[c], p);
        float *got = run(p, 0);
        ref[c] = reference_glm(p, g_ids, N_IDS);
        double e = tu_nmse(got, ref[c], (size_t)N_IDS * NV);
        print_message("%s vs scalar reference: nmse %.3g\n", cases[c]->arch, e);
        assert_true(e < 1e-9);
        free(got);
        free(p);
    }
    double d = tu_nmse(ref[1], ref[0], (size_t)N_IDS * NV);
    print_message("glm4 vs chatglm (post norms' effect): nmse %.3g\n", d);
    assert_true(d > 1e-3);
    free(ref[0]);
    free(ref[1]);
}

/* The synth shapes: the scalar reference reproduces llama.cpp's logits of tiny-chatglm
 * (tests/data/arch), and Forge reproduces the reference on tiny-glm4, which llama.cpp c392e50
 * cannot run. */
static void test_glm_synth_shapes(void **state)
{
    (void)state;
    static const int32_t ids[] = {1, 5, 9, 100, 200, 300, 17, 42, 77, 300, 301, 302,
                                  4, 5, 6,   7,   8,   9,  10, 11, 12, 13,  14,  15};
    const int n = (int)(sizeof ids / sizeof ids[0]);
    const char *shapes[] = {"tiny-chatglm", "tiny-glm4"};
    for (int c = 0; c < 2; c++) {
        forge_err err = {0};
        char *p = tmp_path("synth.gguf");
        synth_opts so = {.shape = shapes[c], .type = GGML_TYPE_F32, .out_path = p, .seed = 0};
        if (synth_write(&so, NULL, &err)) fail_msg("synth %s: %s", shapes[c], err.msg);
        float *ref = reference_glm(p, ids, n);
        forge_model *m = NULL;
        forge_context *ctx = NULL;
        assert_int_equal(forge_model_load(p, &m, &err), 0);
        forge_context_params cp = forge_context_default_params();
        cp.n_ctx = 64, cp.n_threads = 1, cp.f32_math = true;
        assert_int_equal(forge_context_create(m, &cp, &ctx, &err), 0);
        assert_int_equal(forge_decode(ctx, ids, n, true, &err), 0);
        const int V = forge_model_info_get(m)->n_vocab;
        double num = 0, den = 0;
        for (int t = 0; t < n; t++) {
            const float *lg = forge_get_logits(ctx, t);
            for (int i = 0; i < V; i++) {
                double dd = (double)lg[i] - ref[(size_t)t * V + i];
                num += dd * dd, den += (double)ref[(size_t)t * V + i] * ref[(size_t)t * V + i];
            }
        }
        print_message("%s: Forge vs scalar reference nmse %.3g\n", shapes[c], num / den);
        assert_true(num / den < 1e-9);
        if (c == 0) { /* the reference itself against llama.cpp */
            size_t len = 0;
            char *ll = tu_read_file("tests/data/arch/tiny-chatglm/ref_logits.f32", &len);
            assert_non_null(ll);
            assert_int_equal(len, sizeof(float) * (size_t)n * V);
            double e = tu_nmse(ref, (const float *)ll, (size_t)n * V);
            print_message("tiny-chatglm: scalar reference vs llama.cpp nmse %.3g\n", e);
            assert_true(e < 1e-9);
            free(ll);
        }
        forge_context_free(ctx);
        forge_model_free(m);
        free(ref);
        free(p);
    }
}

/* ---- bad files -------------------------------------------------------------------------- */

typedef struct bad_case {
    gen g;
    const char *needle1, *needle2; /* the message names these */
} bad_case;

static void test_bad_files(void **state)
{
    (void)state;
    gen phi_sep = PHI3, glm4 = CHATGLM;
    phi_sep.fused_qkv = false;
    glm4.arch = "glm4";
    glm4.post_norms = true;
    bad_case cases[] = {
        /* no attn_qkv and no attn_q: both names */
        {PHI3, "blk.1.attn_qkv.weight", "blk.1.attn_q.weight"},
        /* a fused attn_qkv of the wrong height */
        {PHI3, "blk.0.attn_qkv.weight", "[64, 100"},
        /* ffn_up of F rows instead of 2F */
        {PHI3, "blk.0.ffn_up.weight", "expected [64, 192]"},
        {phi_sep, "blk.0.attn_v.weight", "not found"},
        {PHI3, "rope_factors_short.weight", "rope_factors_long.weight"},
        {CHATGLM, "blk.0.attn_qkv.bias", "expected [128]"},
        {CHATGLM, "blk.1.ffn_down.weight", "not found"},
        {glm4, "blk.1.post_ffw_norm.weight", "not found"},
        {glm4, "blk.0.post_attention_norm.weight", "expected [64]"},
        {glm4, "rope.dimension_sections", "multimodal"},
        /* llama.cpp refuses it too (no default for this shape) */
        {PHI3, "phi3.attention.sliding_window", "not found"},
    };
    cases[0].g.skip = "blk.1.attn_qkv.weight";
    cases[1].g.reshape = "blk.0.attn_qkv.weight", cases[1].g.re0 = 64, cases[1].g.re1 = 100;
    cases[2].g.reshape = "blk.0.ffn_up.weight", cases[2].g.re0 = 64, cases[2].g.re1 = 96;
    cases[3].g.skip = "blk.0.attn_v.weight";
    cases[4].g.longrope = true, cases[4].g.skip = "rope_factors_short.weight";
    cases[5].g.reshape = "blk.0.attn_qkv.bias", cases[5].g.re0 = 127, cases[5].g.re1 = 1;
    cases[6].g.skip = "blk.1.ffn_down.weight";
    cases[7].g.skip = "blk.1.post_ffw_norm.weight";
    cases[8].g.reshape = "blk.0.post_attention_norm.weight", cases[8].g.re0 = 32,
    cases[8].g.re1 = 1;
    cases[9].g.mrope = true;
    cases[10].g.no_window_key = true;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *p = tmp_path("bad.gguf"), msg[FORGE_ERR_MSG_MAX];
        write_model(&cases[i].g, p);
        int rc = load_error(p, msg, sizeof msg);
        print_message("case %zu: %s\n", i, msg);
        assert_int_not_equal(rc, FORGE_OK);
        assert_non_null(strstr(msg, cases[i].needle1));
        assert_non_null(strstr(msg, cases[i].needle2));
        free(p);
    }
}

static int setup(void **state)
{
    (void)state;
    g_dir = tu_mkdtemp();
    return g_dir ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    tu_rmtree(g_dir);
    free(g_dir);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 4 && !strcmp(argv[1], "--write")) {
        gen g = !strcmp(argv[2], "chatglm") ? CHATGLM : PHI3;
        if (!strcmp(argv[2], "glm4")) g.arch = "glm4", g.post_norms = true;
        if (!strcmp(argv[2], "phi3-long"))
            g.longrope = true, g.attn_factor = 1.19f, g.n_ctx_orig = 64;
        if (!strcmp(argv[2], "phi3-win")) g.window = 5;
        if (!strcmp(argv[2], "phi3-partial")) g.n_rot = 12;
        write_model(&g, argv[3]);
        return 0;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_phi3_fused_equals_split),
        cmocka_unit_test(test_phi3_longrope_choice),
        cmocka_unit_test(test_phi3_longrope_engine),
        cmocka_unit_test(test_phi3_window),
        cmocka_unit_test(test_chatglm_fused_equals_split),
        cmocka_unit_test(test_glm4_post_norms),
        cmocka_unit_test(test_glm_synth_shapes),
        cmocka_unit_test(test_bad_files),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
