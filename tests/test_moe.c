/* test_moe.c - the mixture-of-experts FFN.
 *
 * The op (be_ops.moe_ffn on the CPU, src/cpu/moe.c): against a naive per-token reference (its
 * own softmax, top-k and weighting in double; each selected expert run alone through the
 * backend's one-row matmul on a view of that expert's rows, and its swiglu op) for every weight type the CPU
 * multiplies, with and without renormalisation and f32 math; batch invariance (a row's bits alone
 * == in a batch == in another batch, 1 and 2 threads); ties go to the smaller expert; bad
 * arguments are errors, not crashes.
 *
 * The models: Mixtral is checked against llama.cpp by tests/test_archs.c (tests/data/arch/
 * tiny-mixtral). qwen3moe, which llama.cpp c392e50 does not know, is checked compositionally:
 * a qwen3moe file with one expert (weight 1) gives bitwise the logits of the dense qwen3 file
 * holding that expert as its FFN (qwen3 is checked against Hugging Face), and switching
 * qwen3moe.expert_weights_norm off changes the logits. bytes_per_token counts the used experts
 * only. Bad expert hyperparameters and tensors are refused naming the key or tensor. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/backend_cpu.h"
#include "cpu/kernels.h"
#include "forge.h"
#include "forge_gguf.h"
#include "forge_model.h"
#include "forge_synth.h"
#include "quant/qtypes.h"
#include "testutil.h"

/* ---- the op -------------------------------------------------------------------------------- */

enum { E = 256, NE = 4, MAX_TOK = 13 };

/* n_rows rows of n_in random values in type t (through its reference quantizer; small random
 * bytes where the type has none, which keeps fp16 scales finite) */
static void *make_matrix(int t, int64_t n_in, int64_t n_rows, float scale, uint64_t *rng)
{
    const forge_type_traits *tr = forge_type_traits_get(t);
    assert_non_null(tr);
    const size_t rb = ggml_row_size(t, n_in);
    uint8_t *w = malloc(rb * (size_t)n_rows);
    float *row = malloc((size_t)n_in * sizeof *row);
    assert_true(w && row);
    for (int64_t r = 0; r < n_rows; r++) {
        for (int64_t i = 0; i < n_in; i++)
            row[i] = tu_rand_uniform(rng) * scale;
        uint8_t *dst = w + (size_t)r * rb;
        if (t == GGML_TYPE_F32)
            memcpy(dst, row, (size_t)n_in * sizeof(float));
        else if (tr->quantize_row)
            tr->quantize_row(row, dst, n_in);
        else
            for (size_t b = 0; b < rb; b++)
                dst[b] = (uint8_t)(tu_rand_u64(rng) & 0x3f);
    }
    free(row);
    return w;
}

static be_weight weight_of(const char *name, int t, const void *data, int64_t ne0, int64_t ne1)
{
    be_weight w = {name, t, ne0, ne1, ggml_row_size(t, ne0) * (uint64_t)ne1, data, 0};
    return w;
}

/* One op-test setup: experts of type t, FFN length F. */
typedef struct moe_case {
    int t;
    int64_t F;
    void *g, *u, *d;
    be_weight wg, wu, wd;
    float h[MAX_TOK * E], logits[MAX_TOK * NE];
} moe_case;

static void case_init(moe_case *c, int t, int64_t F, int down_t, uint64_t *rng)
{
    c->t = t;
    c->F = F;
    c->g = make_matrix(t, E, F * NE, 0.1f, rng);
    c->u = make_matrix(t, E, F * NE, 0.1f, rng);
    c->d = make_matrix(down_t, F, E * NE, 0.1f, rng);
    c->wg = weight_of("gate_exps", t, c->g, E, F * NE);
    c->wu = weight_of("up_exps", t, c->u, E, F * NE);
    c->wd = weight_of("down_exps", down_t, c->d, F, E * NE);
    for (int i = 0; i < MAX_TOK * E; i++)
        c->h[i] = tu_rand_uniform(rng) * 2.0f;
    for (int i = 0; i < MAX_TOK * NE; i++)
        c->logits[i] = tu_rand_uniform(rng) * 3.0f;
}

static void case_free(moe_case *c)
{
    free(c->g);
    free(c->u);
    free(c->d);
}

static be_moe moe_of(const moe_case *c, int n_used, bool norm_w)
{
    be_moe m = {&c->wg, &c->wu, &c->wd, NE, n_used, (int)c->F, BE_ACT_SILU, norm_w};
    return m;
}

/* out[0 .. n_tok*E) = moe_ffn of rows rows[0..n_tok) of the case */
static int run_op(backend *be, const moe_case *c, const be_moe *m, const int *rows, int n_tok,
                  float *out, forge_err *err)
{
    float h[MAX_TOK * E], lg[MAX_TOK * NE];
    for (int i = 0; i < n_tok; i++) {
        memcpy(h + i * E, c->h + rows[i] * E, E * sizeof(float));
        memcpy(lg + i * NE, c->logits + rows[i] * NE, NE * sizeof(float));
    }
    be_buf bh = {h, (int64_t)n_tok * E}, bl = {lg, (int64_t)n_tok * NE},
           bo = {out, (int64_t)n_tok * E};
    return be->ops->moe_ffn(be, &bo, &bh, &bl, m, n_tok, err);
}

/* The naive reference of row r: softmax / top-k / weights in double, each selected expert
 * alone through the backend's one-row matmul on a view of its rows and its swiglu op. */
static void reference_row(backend *be, const moe_case *c, int r, int n_used, bool norm_w,
                          double *out)
{
    const float *lg = c->logits + r * NE;
    double p[NE], mx = lg[0], sum = 0.0;
    for (int e = 1; e < NE; e++)
        mx = fmax(mx, lg[e]);
    for (int e = 0; e < NE; e++)
        sum += p[e] = exp(lg[e] - mx);
    bool chosen[NE] = {false};
    double wsum = 0.0;
    for (int k = 0; k < n_used; k++) { /* the largest not yet chosen; ties: the smaller e */
        int best = -1;
        for (int e = 0; e < NE; e++)
            if (!chosen[e] && (best < 0 || lg[e] > lg[best])) best = e;
        chosen[best] = true;
        wsum += p[best] / sum;
    }
    const size_t rg = ggml_row_size(c->wg.type, E), rd = ggml_row_size(c->wd.type, c->F);
    float x[E], g[512], u[512], y[E];
    memcpy(x, c->h + r * E, sizeof x);
    for (int j = 0; j < E; j++)
        out[j] = 0.0;
    forge_err err = {0};
    for (int e = 0; e < NE; e++) {
        if (!chosen[e]) continue;
        const double w = p[e] / sum / (norm_w ? wsum : 1.0);
        be_weight vg = weight_of("g", c->wg.type, (const uint8_t *)c->g + (size_t)e * c->F * rg, E,
                                 c->F);
        be_weight vu = weight_of("u", c->wu.type, (const uint8_t *)c->u + (size_t)e * c->F * rg, E,
                                 c->F);
        be_weight vd = weight_of("d", c->wd.type, (const uint8_t *)c->d + (size_t)e * E * rd, c->F,
                                 E);
        be_buf bx = {x, E}, bg = {g, c->F}, bu = {u, c->F}, by = {y, E};
        assert_int_equal(be->ops->matmul(be, &bg, &vg, &bx, 1, &err), 0);
        assert_int_equal(be->ops->matmul(be, &bu, &vu, &bx, 1, &err), 0);
        assert_int_equal(be->ops->swiglu(be, &bg, &bg, &bu, c->F, &err), 0);
        assert_int_equal(be->ops->matmul(be, &by, &vd, &bg, 1, &err), 0);
        for (int j = 0; j < E; j++)
            out[j] += w * (double)y[j];
    }
}

static double nmse_vs(const float *a, const double *ref, size_t n)
{
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        num += ((double)a[i] - ref[i]) * ((double)a[i] - ref[i]);
        den += ref[i] * ref[i];
    }
    return den > 0.0 ? num / den : num;
}

/* Every weight type the CPU multiplies (and F32/F16 experts whose down rows are no multiple of
 * 32: the f32 fallback path), top-1/2/4, renormalised or not, plain and f32 math. */
static void test_op_vs_reference(void **state)
{
    (void)state;
    uint64_t rng = 42;
    forge_err err = {0};
    int rows[MAX_TOK];
    for (int i = 0; i < MAX_TOK; i++)
        rows[i] = i;
    int n_cases = 0;
    for (int f32 = 0; f32 < 2; f32++) {
        backend *be = NULL;
        assert_int_equal(backend_cpu_create(2, f32 == 1, &be, &err), 0);
        for (int t = 0; t < GGML_TYPE_COUNT + 2; t++) {
            /* the two extra rounds: F32 and F16 experts with F = 40 */
            const int wt = t < GGML_TYPE_COUNT ? t : t == GGML_TYPE_COUNT ? GGML_TYPE_F32
                                                                          : GGML_TYPE_F16;
            const int64_t F = t < GGML_TYPE_COUNT ? 512 : 40;
            if (!kern_matmul_supported(wt)) continue;
            moe_case *c = malloc(sizeof *c);
            assert_non_null(c);
            case_init(c, wt, F, wt, &rng);
            for (int k = 1; k <= NE; k *= 2) {
                for (int norm = 0; norm < 2; norm++) {
                    be_moe m = moe_of(c, k, norm == 1);
                    float out[MAX_TOK * E];
                    assert_int_equal(run_op(be, c, &m, rows, MAX_TOK, out, &err), 0);
                    double worst = 0.0;
                    for (int r = 0; r < MAX_TOK; r++) {
                        double ref[E];
                        reference_row(be, c, r, k, norm == 1, ref);
                        double v = nmse_vs(out + r * E, ref, E);
                        if (v > worst) worst = v;
                    }
                    if (worst > 1e-10)
                        fail_msg("%s F=%lld top-%d norm %d f32 %d: NMSE %.3g",
                                 ggml_type_name(wt), (long long)F, k, norm, f32, worst);
                    n_cases++;
                }
            }
            case_free(c);
            free(c);
        }
        be->ops->destroy(be);
    }
    print_message("moe_ffn vs reference: %d cases\n", n_cases);
    assert_true(n_cases >= 2 * 6 * 13);
}

/* A row's bits do not depend on the batch: alone, in the whole batch, in a subset in another
 * order; 1 and 2 threads; every type. */
static void test_batch_invariance(void **state)
{
    (void)state;
    uint64_t rng = 7;
    forge_err err = {0};
    int all[MAX_TOK], sub[] = {12, 3, 7, 5, 0};
    for (int i = 0; i < MAX_TOK; i++)
        all[i] = i;
    int n_checked = 0;
    for (int nt = 1; nt <= 2; nt++) {
        for (int f32 = 0; f32 < 2; f32++) {
            backend *be = NULL;
            assert_int_equal(backend_cpu_create(nt, f32 == 1, &be, &err), 0);
            for (int t = 0; t < GGML_TYPE_COUNT; t++) {
                if (!kern_matmul_supported(t) || (f32 && t != GGML_TYPE_F32 && t != GGML_TYPE_Q4_0))
                    continue;
                moe_case *c = malloc(sizeof *c);
                assert_non_null(c);
                case_init(c, t, 512, t, &rng);
                be_moe m = moe_of(c, 2, true);
                float whole[MAX_TOK * E], part[5 * E], one[E];
                assert_int_equal(run_op(be, c, &m, all, MAX_TOK, whole, &err), 0);
                assert_int_equal(run_op(be, c, &m, sub, 5, part, &err), 0);
                for (int i = 0; i < 5; i++)
                    assert_memory_equal(part + i * E, whole + sub[i] * E, E * sizeof(float));
                for (int r = 0; r < MAX_TOK; r++) {
                    assert_int_equal(run_op(be, c, &m, &r, 1, one, &err), 0);
                    assert_memory_equal(one, whole + r * E, sizeof one);
                }
                n_checked++;
                case_free(c);
                free(c);
            }
            be->ops->destroy(be);
        }
    }
    print_message("batch invariance: %d type/thread/math combinations\n", n_checked);
    assert_true(n_checked >= 2 * 13);
}

/* Equal router logits: the smaller expert wins (and with top-1 renormalised, the output is that
 * expert's FFN exactly). */
static void test_ties(void **state)
{
    (void)state;
    uint64_t rng = 9;
    forge_err err = {0};
    backend *be = NULL;
    assert_int_equal(backend_cpu_create(1, false, &be, &err), 0);
    moe_case *c = malloc(sizeof *c);
    assert_non_null(c);
    case_init(c, GGML_TYPE_F32, 256, GGML_TYPE_F32, &rng);
    be_moe m = moe_of(c, 1, true);
    const float tie[NE] = {1.0f, 3.0f, 3.0f, 0.0f}, one[NE] = {1.0f, 3.0f, 2.0f, 0.0f},
                two[NE] = {1.0f, 2.0f, 3.0f, 0.0f};
    float o_tie[E], o_one[E], o_two[E];
    int r = 0;
    memcpy(c->logits, tie, sizeof tie);
    assert_int_equal(run_op(be, c, &m, &r, 1, o_tie, &err), 0);
    memcpy(c->logits, one, sizeof one);
    assert_int_equal(run_op(be, c, &m, &r, 1, o_one, &err), 0);
    memcpy(c->logits, two, sizeof two);
    assert_int_equal(run_op(be, c, &m, &r, 1, o_two, &err), 0);
    assert_memory_equal(o_tie, o_one, sizeof o_tie);
    assert_memory_not_equal(o_tie, o_two, sizeof o_tie);
    case_free(c);
    free(c);
    be->ops->destroy(be);
}

/* Bad arguments are FORGE_E_INTERNAL with a message, never a crash. */
static void test_op_bad_args(void **state)
{
    (void)state;
    uint64_t rng = 11;
    forge_err err = {0};
    backend *be = NULL;
    assert_int_equal(backend_cpu_create(1, false, &be, &err), 0);
    moe_case *c = malloc(sizeof *c);
    assert_non_null(c);
    case_init(c, GGML_TYPE_F32, 256, GGML_TYPE_F32, &rng);
    int rows[2] = {0, 1};
    float out[2 * E];
    be_moe m = moe_of(c, 0, true); /* none used */
    assert_int_equal(run_op(be, c, &m, rows, 2, out, &err), FORGE_E_INTERNAL);
    print_message("%s\n", err.msg);
    m = moe_of(c, NE + 1, true); /* more than there are */
    assert_int_equal(run_op(be, c, &m, rows, 2, out, &err), FORGE_E_INTERNAL);
    m = moe_of(c, 2, true);
    m.n_expert = NE + 1; /* the matrices hold NE experts */
    assert_int_equal(run_op(be, c, &m, rows, 2, out, &err), FORGE_E_INTERNAL);
    print_message("%s\n", err.msg);
    assert_non_null(strstr(err.msg, "down_exps"));
    m = moe_of(c, 2, true);
    m.n_ff = 128; /* not the matrices' */
    assert_int_equal(run_op(be, c, &m, rows, 2, out, &err), FORGE_E_INTERNAL);
    m = moe_of(c, 2, true);
    m.act = (be_act)7;
    assert_int_equal(run_op(be, c, &m, rows, 2, out, &err), FORGE_E_INTERNAL);
    m = moe_of(c, 2, true);
    m.down_exps = NULL;
    assert_int_equal(run_op(be, c, &m, rows, 2, out, &err), FORGE_E_INTERNAL);
    /* a buffer too short for the rows */
    m = moe_of(c, 2, true);
    be_buf bh = {c->h, E}, bl = {c->logits, 2 * NE}, bo = {out, 2 * E};
    assert_int_equal(be->ops->moe_ffn(be, &bo, &bh, &bl, &m, 2, &err), FORGE_E_INTERNAL);
    print_message("%s\n", err.msg);
    /* out over its own input */
    be_buf bio = {c->h, 2 * E};
    bl.n = 2 * NE;
    assert_int_equal(be->ops->moe_ffn(be, &bio, &bio, &bl, &m, 2, &err), FORGE_E_INTERNAL);
    case_free(c);
    free(c);
    be->ops->destroy(be);
}

/* ---- the models ---------------------------------------------------------------------------- */

static char *g_dir;

/* A rewrite of a GGUF file: keys renamed from one architecture prefix to another (and
 * general.architecture), u32/bool keys set, keys and tensors left out, tensors renamed and
 * reshaped (their data: the source's first bytes), zero-filled tensors added. */
typedef struct rewrite {
    const char *arch_from, *arch_to;
    const char *set_u32[4];
    uint32_t u32_val[4];
    const char *set_bool;
    bool bool_val;
    const char *skip_key[4];
    const char *skip_suffix[4]; /* tensors blk.N.<suffix> left out */
    struct {
        const char *from, *to; /* blk.N.<from> becomes blk.N.<to> ... */
        int64_t ne[3];         /* ... of this shape (n_dims: the count of leading non-zero) */
    } map[4];
    const char *add_suffix; /* blk.N.<add_suffix> added, F32 [add_ne0, add_ne1], zeros */
    int64_t add_ne0, add_ne1;
} rewrite;

typedef struct rw_fill {
    const gguf_ctx *src;
    const gguf_tensor_info **from; /* per written tensor: its source, or NULL (zeros) */
} rw_fill;

static int rw_fill_fn(void *user, int64_t index, const gguf_tensor_info *info, int64_t row0,
                      int64_t n_rows, void *dst, forge_err *err)
{
    (void)err;
    rw_fill *f = user;
    const size_t rb = ggml_row_size(info->type, info->ne[0]);
    const size_t off = (size_t)row0 * rb, n = (size_t)n_rows * rb;
    const gguf_tensor_info *s = f->from[index];
    memset(dst, 0, n);
    if (s && s->type == info->type && off < s->n_bytes)
        memcpy(dst, (const uint8_t *)s->data + off, s->n_bytes - off < n ? s->n_bytes - off : n);
    return FORGE_OK;
}

static bool has_suffix(const char *name, const char *suffix, int *layer)
{
    int il, len = 0;
    if (!suffix || sscanf(name, "blk.%d.%n", &il, &len) != 1 || len == 0) return false;
    if (strcmp(name + len, suffix)) return false;
    if (layer) *layer = il;
    return true;
}

static char *write_rewrite(const char *src_path, const char *name, const rewrite *rw)
{
    forge_err err = {0};
    gguf_ctx *src = NULL;
    gguf_writer *w = NULL;
    assert_int_equal(gguf_open(src_path, &src, &err), 0);
    assert_int_equal(gguf_writer_create(&w, &err), 0);
    const size_t lf = rw->arch_from ? strlen(rw->arch_from) : 0;
    for (int64_t i = 0; i < gguf_kv_count(src); i++) {
        const char *key = gguf_kv_key(src, i);
        bool skip = false;
        for (int k = 0; k < 4; k++)
            skip |= rw->skip_key[k] && !strcmp(key, rw->skip_key[k]);
        if (skip) continue;
        if (rw->arch_to && !strcmp(key, "general.architecture")) {
            assert_int_equal(gguf_writer_set_str(w, key, rw->arch_to, &err), 0);
        } else if (rw->arch_to && !strncmp(key, rw->arch_from, lf) && key[lf] == '.') {
            gguf_value v;
            assert_int_equal(gguf_kv_value(src, i, &v), 0);
            uint8_t raw[8] = {0};
            memcpy(raw, v.raw, v.type == GGUF_TYPE_FLOAT32 || v.type == GGUF_TYPE_UINT32 ? 4 : 1);
            assert_true(v.type == GGUF_TYPE_FLOAT32 || v.type == GGUF_TYPE_UINT32 ||
                        v.type == GGUF_TYPE_BOOL);
            char nk[128];
            snprintf(nk, sizeof nk, "%s%s", rw->arch_to, key + lf);
            assert_int_equal(gguf_writer_set_scalar(w, nk, v.type, raw, &err), 0);
        } else {
            assert_int_equal(gguf_writer_copy_kv(w, src, i, &err), 0);
        }
    }
    for (int k = 0; k < 4 && rw->set_u32[k]; k++)
        assert_int_equal(gguf_writer_set_u32(w, rw->set_u32[k], rw->u32_val[k], &err), 0);
    if (rw->set_bool) assert_int_equal(gguf_writer_set_bool(w, rw->set_bool, rw->bool_val, &err), 0);
    const int64_t nt = gguf_tensor_count(src);
    const gguf_tensor_info **from = calloc((size_t)nt * 2 + 1, sizeof *from);
    assert_non_null(from);
    int64_t n_out = 0;
    for (int64_t i = 0; i < nt; i++) {
        const gguf_tensor_info *t = gguf_tensor(src, i);
        bool skip = false;
        for (int k = 0; k < 4; k++)
            skip |= has_suffix(t->name, rw->skip_suffix[k], NULL);
        if (skip) continue;
        char nm[128];
        snprintf(nm, sizeof nm, "%s", t->name);
        int64_t ne[GGUF_MAX_DIMS];
        memcpy(ne, t->ne, sizeof ne);
        uint32_t n_dims = t->n_dims;
        for (int k = 0; k < 4; k++) {
            int il;
            if (!has_suffix(t->name, rw->map[k].from, &il)) continue;
            snprintf(nm, sizeof nm, "blk.%d.%s", il, rw->map[k].to);
            n_dims = 0;
            for (int d = 0; d < GGUF_MAX_DIMS; d++) {
                ne[d] = d < 3 && rw->map[k].ne[d] ? rw->map[k].ne[d] : 1;
                if (d < 3 && rw->map[k].ne[d]) n_dims = (uint32_t)d + 1;
            }
        }
        assert_int_equal(gguf_writer_add_tensor(w, nm, t->type, n_dims, ne, &err), 0);
        from[n_out++] = t;
        int il;
        if (rw->add_suffix && has_suffix(t->name, "attn_norm.weight", &il)) {
            int64_t ane[GGUF_MAX_DIMS] = {rw->add_ne0, rw->add_ne1, 1, 1};
            snprintf(nm, sizeof nm, "blk.%d.%s", il, rw->add_suffix);
            assert_int_equal(
                gguf_writer_add_tensor(w, nm, GGML_TYPE_F32, rw->add_ne1 > 1 ? 2 : 1, ane, &err),
                0);
            from[n_out++] = NULL;
        }
    }
    size_t n = strlen(g_dir) + strlen(name) + 2;
    char *path = malloc(n);
    assert_non_null(path);
    snprintf(path, n, "%s/%s", g_dir, name);
    rw_fill f = {src, from};
    if (gguf_writer_write(w, path, rw_fill_fn, &f, 0, &err)) fail_msg("write %s: %s", path, err.msg);
    free(from);
    gguf_writer_free(w);
    gguf_close(src);
    return path;
}

static char *synth(const char *shape, const char *name)
{
    size_t n = strlen(g_dir) + strlen(name) + 2;
    char *path = malloc(n);
    assert_non_null(path);
    snprintf(path, n, "%s/%s", g_dir, name);
    synth_opts so = {shape, GGML_TYPE_F32, path, NULL, 0};
    forge_err err = {0};
    if (synth_write(&so, NULL, &err)) fail_msg("synth %s: %s", shape, err.msg);
    return path;
}

enum { N_IDS = 12 };
static const int32_t g_ids[N_IDS] = {1, 5, 9, 100, 200, 300, 17, 42, 77, 4, 6, 8};

/* logits of every position of g_ids, [N_IDS][n_vocab], malloc'd */
static float *logits_of(const char *path, bool f32_math, int *n_vocab)
{
    forge_err err = {0};
    forge_model *m = NULL;
    if (forge_model_load(path, &m, &err)) fail_msg("load %s: %s", path, err.msg);
    forge_context_params cp = forge_context_default_params();
    cp.device = FORGE_DEVICE_CPU;
    cp.n_threads = 2;
    cp.n_ctx = 64;
    cp.kv_type = FORGE_KV_F32;
    cp.f32_math = f32_math;
    forge_context *ctx = NULL;
    if (forge_context_create(m, &cp, &ctx, &err)) fail_msg("context %s: %s", path, err.msg);
    assert_int_equal(forge_decode(ctx, g_ids, N_IDS, true, &err), 0);
    const int V = forge_model_info_get(m)->n_vocab;
    float *out = malloc((size_t)N_IDS * V * sizeof *out);
    assert_non_null(out);
    for (int p = 0; p < N_IDS; p++)
        memcpy(out + (size_t)p * V, forge_get_logits(ctx, p), (size_t)V * sizeof(float));
    forge_context_free(ctx);
    forge_model_free(m);
    *n_vocab = V;
    return out;
}

/* qwen3moe with one expert (softmax weight 1) == dense qwen3 whose FFN is that expert: bitwise,
 * plain and f32 math. Both files come from the tiny-qwen3moe synth file (expert 0 of each
 * layer). Then a falsifiable check that the comparison sees the FFN: a second expert changes
 * the logits. */
static void test_qwen3moe_composes(void **state)
{
    (void)state;
    char *src = synth("tiny-qwen3moe", "q3m.gguf");
    const int64_t D = 64, FE = 48;
    rewrite one = {0};
    one.set_u32[0] = "qwen3moe.expert_count";
    one.u32_val[0] = 1;
    one.set_u32[1] = "qwen3moe.expert_used_count";
    one.u32_val[1] = 1;
    one.map[0].from = one.map[0].to = "ffn_gate_exps.weight";
    one.map[1].from = one.map[1].to = "ffn_up_exps.weight";
    one.map[2].from = one.map[2].to = "ffn_down_exps.weight";
    one.map[3].from = one.map[3].to = "ffn_gate_inp.weight";
    memcpy(one.map[0].ne, (int64_t[3]){D, FE, 1}, sizeof one.map[0].ne);
    memcpy(one.map[1].ne, (int64_t[3]){D, FE, 1}, sizeof one.map[1].ne);
    memcpy(one.map[2].ne, (int64_t[3]){FE, D, 1}, sizeof one.map[2].ne);
    memcpy(one.map[3].ne, (int64_t[3]){D, 1, 0}, sizeof one.map[3].ne);
    char *p_one = write_rewrite(src, "q3m_one.gguf", &one);

    rewrite dense = {0};
    dense.arch_from = "qwen3moe";
    dense.arch_to = "qwen3";
    dense.skip_key[0] = "qwen3moe.expert_count";
    dense.skip_key[1] = "qwen3moe.expert_used_count";
    dense.skip_key[2] = "qwen3moe.expert_feed_forward_length";
    dense.set_u32[0] = "qwen3.feed_forward_length";
    dense.u32_val[0] = (uint32_t)FE;
    dense.skip_suffix[0] = "ffn_gate_inp.weight";
    dense.map[0].from = "ffn_gate_exps.weight";
    dense.map[0].to = "ffn_gate.weight";
    dense.map[1].from = "ffn_up_exps.weight";
    dense.map[1].to = "ffn_up.weight";
    dense.map[2].from = "ffn_down_exps.weight";
    dense.map[2].to = "ffn_down.weight";
    memcpy(dense.map[0].ne, (int64_t[3]){D, FE, 0}, sizeof dense.map[0].ne);
    memcpy(dense.map[1].ne, (int64_t[3]){D, FE, 0}, sizeof dense.map[1].ne);
    memcpy(dense.map[2].ne, (int64_t[3]){FE, D, 0}, sizeof dense.map[2].ne);
    char *p_dense = write_rewrite(src, "q3_dense.gguf", &dense);

    /* two experts, top-2: expert 1 joins with a real weight */
    rewrite two = one;
    two.u32_val[0] = 2;
    two.u32_val[1] = 2;
    two.map[0].ne[2] = two.map[1].ne[2] = two.map[2].ne[2] = 2;
    two.map[3].ne[1] = 2;
    char *p_two = write_rewrite(src, "q3m_two.gguf", &two);

    for (int f32 = 0; f32 < 2; f32++) {
        int V, V2, V3;
        float *a = logits_of(p_one, f32 == 1, &V), *b = logits_of(p_dense, f32 == 1, &V2),
              *c = logits_of(p_two, f32 == 1, &V3);
        assert_int_equal(V, V2);
        assert_memory_equal(a, b, (size_t)N_IDS * V * sizeof(float));
        double d = tu_nmse(c, a, (size_t)N_IDS * V);
        print_message("qwen3moe 1 expert == dense qwen3 (f32 math %d); 2 experts differ: NMSE %.3g\n",
                      f32, d);
        assert_true(d > 1e-4);
        free(a);
        free(b);
        free(c);
    }
    free(src);
    free(p_one);
    free(p_dense);
    free(p_two);
}

/* qwen3moe.expert_weights_norm (HF norm_topk_prob): absent = true (llama.cpp always
 * renormalises for qwen3moe), an explicit true is the same, false changes the logits. */
static void test_qwen3moe_norm(void **state)
{
    (void)state;
    char *src = synth("tiny-qwen3moe", "q3m_n.gguf");
    rewrite on = {0}, off = {0};
    on.set_bool = off.set_bool = "qwen3moe.expert_weights_norm";
    on.bool_val = true;
    off.bool_val = false;
    char *p_on = write_rewrite(src, "q3m_on.gguf", &on), *p_off = write_rewrite(src, "q3m_off.gguf", &off);
    int V;
    float *a = logits_of(src, false, &V), *b = logits_of(p_on, false, &V),
          *c = logits_of(p_off, false, &V);
    assert_memory_equal(a, b, (size_t)N_IDS * V * sizeof(float));
    double d = tu_nmse(c, a, (size_t)N_IDS * V);
    print_message("qwen3moe without renormalisation: NMSE %.3g from the default\n", d);
    assert_true(d > 1e-4);
    free(a);
    free(b);
    free(c);
    free(src);
    free(p_on);
    free(p_off);
}

/* bytes_per_token: every weight but the embedding table (one row of it), and of the experts
 * n_used / n_expert. Computed here from the tensor table. */
static void test_bytes_per_token(void **state)
{
    (void)state;
    const char *shapes[] = {"tiny-mixtral", "tiny-qwen3moe"};
    for (int s = 0; s < 2; s++) {
        char *p = synth(shapes[s], "bpt.gguf");
        forge_err err = {0};
        gguf_ctx *g = NULL;
        assert_int_equal(gguf_open(p, &g, &err), 0);
        const synth_shape *sh = synth_shape_find(shapes[s]);
        assert_non_null(sh);
        const uint64_t ne = (uint64_t)sh->fam.n_expert, used = (uint64_t)sh->fam.n_expert_used;
        uint64_t want = 0, all = 0;
        for (int64_t i = 0; i < gguf_tensor_count(g); i++) {
            const gguf_tensor_info *t = gguf_tensor(g, i);
            all += t->n_bytes;
            if (!strcmp(t->name, "token_embd.weight"))
                want += ggml_row_size(t->type, t->ne[0]) + (sh->tied ? t->n_bytes : 0);
            else if (strstr(t->name, "_exps.weight"))
                want += t->n_bytes / ne * used;
            else
                want += t->n_bytes;
        }
        gguf_close(g);
        forge_model *m = NULL;
        assert_int_equal(forge_model_load(p, &m, &err), 0);
        const forge_model_info *info = forge_model_info_get(m);
        print_message("%s: %llu bytes per token of %llu\n", shapes[s],
                      (unsigned long long)info->bytes_per_token, (unsigned long long)all);
        assert_int_equal(info->bytes_per_token, want);
        assert_true(info->bytes_per_token + 100000 < all); /* the unused experts are left out */
        forge_model_free(m);
        remove(p);
        free(p);
    }
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

static void test_bad_files(void **state)
{
    (void)state;
    char *src = synth("tiny-mixtral", "mix.gguf");
    const int64_t D = 64, F = 96;
    rewrite rw;
    char *p;

    memset(&rw, 0, sizeof rw); /* none used */
    rw.set_u32[0] = "llama.expert_used_count";
    rw.u32_val[0] = 0;
    p = write_rewrite(src, "used0.gguf", &rw);
    expect_load_error(p, FORGE_E_FORMAT, "llama.expert_used_count = 0", "llama.expert_count");
    free(p);

    rw.u32_val[0] = 5; /* more than the 4 there are */
    p = write_rewrite(src, "used5.gguf", &rw);
    expect_load_error(p, FORGE_E_FORMAT, "llama.expert_used_count = 5", "1..4");
    free(p);

    memset(&rw, 0, sizeof rw);
    rw.skip_key[0] = "llama.expert_used_count";
    p = write_rewrite(src, "noused.gguf", &rw);
    expect_load_error(p, FORGE_E_NOTFOUND, "llama.expert_used_count", NULL);
    free(p);

    memset(&rw, 0, sizeof rw); /* 3 experts in a tensor of a 4-expert model */
    rw.map[0].from = rw.map[0].to = "ffn_up_exps.weight";
    memcpy(rw.map[0].ne, (int64_t[3]){D, F, 3}, sizeof rw.map[0].ne);
    p = write_rewrite(src, "up3.gguf", &rw);
    expect_load_error(p, FORGE_E_FORMAT, "blk.0.ffn_up_exps.weight", "4 experts");
    free(p);

    memset(&rw, 0, sizeof rw); /* down with the rows of gate */
    rw.map[0].from = rw.map[0].to = "ffn_down_exps.weight";
    memcpy(rw.map[0].ne, (int64_t[3]){D, F, 4}, sizeof rw.map[0].ne);
    p = write_rewrite(src, "down.gguf", &rw);
    expect_load_error(p, FORGE_E_FORMAT, "blk.0.ffn_down_exps.weight", "[96, 64, 4]");
    free(p);

    memset(&rw, 0, sizeof rw); /* experts as a 2-D tensor */
    rw.map[0].from = rw.map[0].to = "ffn_gate_exps.weight";
    memcpy(rw.map[0].ne, (int64_t[3]){D, F * 4, 0}, sizeof rw.map[0].ne);
    p = write_rewrite(src, "gate2d.gguf", &rw);
    expect_load_error(p, FORGE_E_FORMAT, "blk.0.ffn_gate_exps.weight", "experts");
    free(p);

    memset(&rw, 0, sizeof rw); /* a router for 3 experts */
    rw.map[0].from = rw.map[0].to = "ffn_gate_inp.weight";
    memcpy(rw.map[0].ne, (int64_t[3]){D, 3, 0}, sizeof rw.map[0].ne);
    p = write_rewrite(src, "router3.gguf", &rw);
    expect_load_error(p, FORGE_E_FORMAT, "blk.0.ffn_gate_inp.weight", NULL);
    free(p);

    memset(&rw, 0, sizeof rw);
    rw.skip_suffix[0] = "ffn_gate_inp.weight";
    p = write_rewrite(src, "norouter.gguf", &rw);
    expect_load_error(p, FORGE_E_NOTFOUND, "blk.0.ffn_gate_inp.weight", NULL);
    free(p);

    memset(&rw, 0, sizeof rw); /* a shared expert: refused, not ignored */
    rw.add_suffix = "ffn_gate_inp_shexp.weight";
    rw.add_ne0 = D;
    rw.add_ne1 = 1;
    p = write_rewrite(src, "shexp.gguf", &rw);
    expect_load_error(p, FORGE_E_UNSUPPORTED, "blk.0.ffn_gate_inp_shexp.weight", "shared");
    free(p);
    free(src);

    src = synth("tiny-qwen3moe", "q3m_bad.gguf");
    memset(&rw, 0, sizeof rw); /* qwen3moe without experts */
    rw.skip_key[0] = "qwen3moe.expert_count";
    p = write_rewrite(src, "q3m_noexp.gguf", &rw);
    expect_load_error(p, FORGE_E_FORMAT, "qwen3moe.expert_count", NULL);
    free(p);
    free(src);
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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_op_vs_reference),
        cmocka_unit_test(test_batch_invariance),
        cmocka_unit_test(test_ties),
        cmocka_unit_test(test_op_bad_args),
        cmocka_unit_test(test_qwen3moe_composes),
        cmocka_unit_test(test_qwen3moe_norm),
        cmocka_unit_test(test_bytes_per_token),
        cmocka_unit_test(test_bad_files),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
