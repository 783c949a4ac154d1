/* model.c - loading a model from GGUF: architecture, hyperparameters (with llama.cpp's defaults
 * for absent keys), the tokenizer, and every weight tensor checked against the hyperparameters
 * before any compute. Weights are be_weight views into the read-only mapping (never copied).
 * Owns forge_model_load/free and the model accessors of include/forge_model.h. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/util.h"
#include "cpu/kernels.h"
#include "model/loader.h"

/* Types a weight matrix may have: each tensor's own type, whatever general.file_type says;
 * every type the CPU can multiply from its packed form (the traits table, src/quant/qtypes.c). */
static bool matrix_type_ok(int t)
{
    return kern_matmul_supported(t);
}

/* ---- metadata --------------------------------------------------------------------------- */

static void arch_key(char *buf, size_t n, const char *arch, const char *suffix)
{
    snprintf(buf, n, "%s.%s", arch, suffix);
}

/* A u32 hyperparameter. Absent: *out = def when !required. An array (per-layer values, as some
 * converters write feed_forward_length / head_count) is accepted when all entries are equal. */
int ld_u32(loader *L, const char *suffix, bool required, uint32_t def, uint32_t *out,
           forge_err *err)
{
    char key[160];
    arch_key(key, sizeof key, L->arch, suffix);
    const gguf_ctx *g = L->m->gguf;
    int64_t idx = gguf_find_key(g, key);
    if (idx < 0) {
        if (required)
            return forge_err_set(err, FORGE_E_NOTFOUND, "%s: required key '%s' not found", L->path,
                                 key);
        *out = def;
        return FORGE_OK;
    }
    if (gguf_kv_type(g, idx) == GGUF_TYPE_ARRAY) {
        gguf_type et;
        uint64_t n;
        int rc = gguf_get_arr(g, key, &et, &n, err);
        if (rc) return rc;
        if (n == 0 || n > FORGE_MAX_LAYERS)
            return forge_err_set(err, FORGE_E_FORMAT, "%s: key '%s' is an array of %llu values",
                                 L->path, key, (unsigned long long)n);
        int32_t vals[FORGE_MAX_LAYERS];
        rc = gguf_copy_arr_i32(g, key, vals, n, err);
        if (rc) return rc;
        for (uint64_t i = 1; i < n; i++)
            if (vals[i] != vals[0])
                return forge_err_set(err, FORGE_E_UNSUPPORTED,
                                     "%s: key '%s' differs between layers (%d vs %d)", L->path, key,
                                     vals[0], vals[i]);
        if (vals[0] < 0)
            return forge_err_set(err, FORGE_E_FORMAT, "%s: key '%s' is negative (%d)", L->path, key,
                                 vals[0]);
        *out = (uint32_t)vals[0];
        return FORGE_OK;
    }
    return gguf_get_u32(g, key, out, err);
}

int ld_f32(loader *L, const char *suffix, float def, float *out, forge_err *err)
{
    char key[160];
    arch_key(key, sizeof key, L->arch, suffix);
    if (gguf_find_key(L->m->gguf, key) < 0) {
        *out = def;
        return FORGE_OK;
    }
    int rc = gguf_get_f32(L->m->gguf, key, out, err);
    if (rc == FORGE_OK && !isfinite(*out)) /* a NaN must not read as the "absent" default */
        return forge_err_set(err, FORGE_E_FORMAT, "%s: key '%s' is %g, not a finite number",
                             L->path, key, (double)*out);
    return rc;
}

/* ---- tensors ---------------------------------------------------------------------------- */

/* A tensor's checks and binding; n_expert > 0: a 3-D [ne0, ne1, n_expert] tensor bound as a
 * matrix of ne1 * n_expert rows. */
static int bind3(loader *L, be_weight *w, const char *name, wkind kind, int64_t ne0, int64_t ne1,
                 int64_t n_expert, bool required, forge_err *err)
{
    const gguf_tensor_info *ti = gguf_find_tensor(L->m->gguf, name);
    memset(w, 0, sizeof *w);
    if (!ti) {
        if (!required) return FORGE_OK;
        return forge_err_set(err, FORGE_E_NOTFOUND, "%s: required tensor '%s' not found", L->path,
                             name);
    }
    bool shape_ok = ti->ne[0] == ne0 && ti->ne[1] == ne1 && ti->ne[3] == 1 &&
                    (n_expert > 0 ? ti->ne[2] == n_expert && ti->n_dims == 3
                                  : ti->ne[2] == 1 &&
                                        (kind == W_MATRIX ? ti->n_dims <= 2 : ti->n_dims == 1));
    if (!shape_ok && n_expert > 0)
        return forge_err_set(err, FORGE_E_FORMAT,
                             "%s: tensor '%s' has shape [%lld, %lld, %lld, %lld], expected [%lld, "
                             "%lld, %lld] (%lld experts) from the hyperparameters",
                             L->path, name, (long long)ti->ne[0], (long long)ti->ne[1],
                             (long long)ti->ne[2], (long long)ti->ne[3], (long long)ne0,
                             (long long)ne1, (long long)n_expert, (long long)n_expert);
    if (n_expert > 0) ne1 *= n_expert;
    if (!shape_ok) {
        if (kind == W_VECTOR)
            return forge_err_set(err, FORGE_E_FORMAT,
                                 "%s: tensor '%s' has shape [%lld, %lld, %lld, %lld], expected "
                                 "[%lld] from the hyperparameters",
                                 L->path, name, (long long)ti->ne[0], (long long)ti->ne[1],
                                 (long long)ti->ne[2], (long long)ti->ne[3], (long long)ne0);
        return forge_err_set(err, FORGE_E_FORMAT,
                             "%s: tensor '%s' has shape [%lld, %lld, %lld, %lld], expected [%lld, "
                             "%lld] from the hyperparameters",
                             L->path, name, (long long)ti->ne[0], (long long)ti->ne[1],
                             (long long)ti->ne[2], (long long)ti->ne[3], (long long)ne0,
                             (long long)ne1);
    }
    if (kind == W_VECTOR && ti->type != GGML_TYPE_F32)
        return forge_err_set(err, FORGE_E_UNSUPPORTED,
                             "%s: tensor '%s' has type %s; norms and biases must be F32", L->path,
                             name, ggml_type_name(ti->type));
    if (kind == W_MATRIX && !matrix_type_ok(ti->type))
        return forge_err_set(err, FORGE_E_UNSUPPORTED,
                             "%s: tensor '%s' has weight type %s, which is not supported (F32, "
                             "F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, "
                             "Q6_K, IQ4_NL, IQ4_XS, TQ1_0, TQ2_0)",
                             L->path, name, ggml_type_name(ti->type));
    if (ggml_row_size(ti->type, ne0) == 0 ||
        ti->n_bytes < ggml_row_size(ti->type, ne0) * (uint64_t)ne1)
        return forge_err_set(err, FORGE_E_FORMAT,
                             "%s: tensor '%s' (%s) rows of %lld do not fit its %llu bytes", L->path,
                             name, ggml_type_name(ti->type), (long long)ne0,
                             (unsigned long long)ti->n_bytes);
    w->name = ti->name;
    w->type = ti->type;
    w->ne0 = ne0;
    w->ne1 = ne1;
    w->n_bytes = ti->n_bytes;
    w->data = ti->data;
    L->bytes_by_type[ti->type] += ti->n_bytes;
    L->m->info.n_params += (uint64_t)ti->n_elements;
    L->m->info.weight_bytes += ti->n_bytes;
    if (n_expert > 0) L->expert_bytes += ti->n_bytes;
    return FORGE_OK;
}

int ld_bind(loader *L, be_weight *w, const char *name, wkind kind, int64_t ne0, int64_t ne1,
            bool required, forge_err *err)
{
    return bind3(L, w, name, kind, ne0, ne1, 0, required, err);
}

int ld_bind_layer(loader *L, int il, be_weight *w, const char *what, wkind kind, int64_t ne0,
                  int64_t ne1, bool required, forge_err *err)
{
    char name[96];
    snprintf(name, sizeof name, "blk.%d.%s", il, what);
    return bind3(L, w, name, kind, ne0, ne1, 0, required, err);
}

int ld_bind_experts(loader *L, int il, be_weight *w, const char *what, int64_t ne0, int64_t ne1,
                    int64_t n_expert, bool required, forge_err *err)
{
    char name[96];
    snprintf(name, sizeof name, "blk.%d.%s", il, what);
    if (n_expert < 1)
        return forge_err_set(err, FORGE_E_FORMAT, "%s: tensor '%s' needs an expert count (%lld)",
                             L->path, name, (long long)n_expert);
    return bind3(L, w, name, W_MATRIX, ne0, ne1, n_expert, required, err);
}

int ld_view_rows(loader *L, be_weight *out, const be_weight *w, int64_t r0, int64_t n,
                 forge_err *err)
{
    const bool vec = w->ne1 == 1 && w->type == GGML_TYPE_F32 && n < w->ne0;
    const int64_t rows = vec ? w->ne0 : w->ne1;
    if (!w->data || r0 < 0 || n < 1 || r0 + n > rows)
        return forge_err_set(err, FORGE_E_FORMAT, "%s: tensor '%s' has %lld rows, not %lld..%lld",
                             L->path, w->name ? w->name : "?", (long long)rows, (long long)r0,
                             (long long)(r0 + n));
    *out = *w;
    if (vec) { /* elements of a vector (a fused bias) */
        out->ne0 = n;
        out->n_bytes = (uint64_t)n * sizeof(float);
        out->data = (const float *)w->data + r0;
    } else {
        const uint64_t rb = ggml_row_size(w->type, w->ne0);
        out->ne1 = n;
        out->n_bytes = rb * (uint64_t)n;
        out->data = (const uint8_t *)w->data + rb * (uint64_t)r0;
    }
    return FORGE_OK;
}

int ld_bind_qkv(loader *L, int il, layer_weights *l, int64_t E, int64_t QD, int64_t KD,
                forge_err *err)
{
    be_weight w, bias;
    int rc;
    if ((rc = ld_bind_layer(L, il, &w, "attn_qkv.weight", W_MATRIX, E, QD + 2 * KD, false, err)))
        return rc;
    if (w.data) {
        if ((rc = ld_bind_layer(L, il, &bias, "attn_qkv.bias", W_VECTOR, QD + 2 * KD, 1, false,
                                err)) ||
            (rc = ld_view_rows(L, &l->wq, &w, 0, QD, err)) ||
            (rc = ld_view_rows(L, &l->wk, &w, QD, KD, err)) ||
            (rc = ld_view_rows(L, &l->wv, &w, QD + KD, KD, err)))
            return rc;
        if (!bias.data) return FORGE_OK;
        if ((rc = ld_view_rows(L, &l->bq, &bias, 0, QD, err)) ||
            (rc = ld_view_rows(L, &l->bk, &bias, QD, KD, err)))
            return rc;
        return ld_view_rows(L, &l->bv, &bias, QD + KD, KD, err);
    }
    char name[96];
    snprintf(name, sizeof name, "blk.%d.attn_q.weight", il);
    if (!gguf_find_tensor(L->m->gguf, name))
        return forge_err_set(err, FORGE_E_NOTFOUND,
                             "%s: layer %d has neither 'blk.%d.attn_qkv.weight' nor '%s'", L->path,
                             il, il, name);
    if ((rc = ld_bind_layer(L, il, &l->wq, "attn_q.weight", W_MATRIX, E, QD, true, err)) ||
        (rc = ld_bind_layer(L, il, &l->wk, "attn_k.weight", W_MATRIX, E, KD, true, err)) ||
        (rc = ld_bind_layer(L, il, &l->wv, "attn_v.weight", W_MATRIX, E, KD, true, err)) ||
        (rc = ld_bind_layer(L, il, &l->bq, "attn_q.bias", W_VECTOR, QD, 1, false, err)) ||
        (rc = ld_bind_layer(L, il, &l->bk, "attn_k.bias", W_VECTOR, KD, 1, false, err)))
        return rc;
    return ld_bind_layer(L, il, &l->bv, "attn_v.bias", W_VECTOR, KD, 1, false, err);
}

int ld_bind_gate_up(loader *L, int il, layer_weights *l, int64_t E, int64_t F, forge_err *err)
{
    be_weight w;
    int rc;
    if ((rc = ld_bind_layer(L, il, &w, "ffn_up.weight", W_MATRIX, E, 2 * F, true, err)) ||
        (rc = ld_view_rows(L, &l->ffn_gate, &w, 0, F, err)))
        return rc;
    return ld_view_rows(L, &l->ffn_up, &w, F, F, err);
}

int ld_bool(loader *L, const char *suffix, bool def, bool *out, forge_err *err)
{
    char key[160];
    arch_key(key, sizeof key, L->arch, suffix);
    if (gguf_find_key(L->m->gguf, key) < 0) {
        *out = def;
        return FORGE_OK;
    }
    return gguf_get_bool(L->m->gguf, key, out, err);
}

int ld_layer_u32s(loader *L, const char *suffix, int32_t *out, int n, forge_err *err)
{
    char key[160];
    arch_key(key, sizeof key, L->arch, suffix);
    const gguf_ctx *g = L->m->gguf;
    int64_t idx = gguf_find_key(g, key);
    if (idx < 0) return FORGE_E_NOTFOUND;
    if (gguf_kv_type(g, idx) != GGUF_TYPE_ARRAY) {
        uint32_t v;
        int rc = gguf_get_u32(g, key, &v, err);
        if (rc) return rc;
        for (int i = 0; i < n; i++)
            out[i] = (int32_t)v;
        return FORGE_OK;
    }
    gguf_type et;
    uint64_t cnt;
    int rc = gguf_get_arr(g, key, &et, &cnt, err);
    if (rc) return rc;
    if (cnt != (uint64_t)n)
        return forge_err_set(err, FORGE_E_FORMAT, "%s: key '%s' has %llu values for %d layers",
                             L->path, key, (unsigned long long)cnt, n);
    (void)et; /* integers, floats or bools (gguf_copy_arr_i32 converts them) */
    return gguf_copy_arr_i32(g, key, out, cnt, err);
}

static void make_type_summary(loader *L)
{
    forge_model *m = L->m;
    int order[GGML_TYPE_COUNT], n = 0;
    for (int t = 0; t < GGML_TYPE_COUNT; t++)
        if (L->bytes_by_type[t]) order[n++] = t;
    for (int i = 1; i < n; i++) /* insertion sort by bytes, descending */
        for (int j = i; j > 0 && L->bytes_by_type[order[j]] > L->bytes_by_type[order[j - 1]]; j--) {
            int tmp = order[j];
            order[j] = order[j - 1];
            order[j - 1] = tmp;
        }
    size_t off = 0;
    m->type_summary[0] = '\0';
    for (int i = 0; i < n && off < sizeof m->type_summary; i++) {
        const char *sep = i == 0 ? "" : i == 1 ? " (+" : ", ";
        off += (size_t)snprintf(m->type_summary + off, sizeof m->type_summary - off, "%s%s", sep,
                                ggml_type_name(order[i]));
    }
    if (n > 1 && off < sizeof m->type_summary)
        snprintf(m->type_summary + off, sizeof m->type_summary - off, ")");
}

/* ---- load ------------------------------------------------------------------------------- */

static int load_hparams(loader *L, forge_err *err)
{
    forge_model *m = L->m;
    forge_model_info *hp = &m->info;
    uint32_t n_ctx, n_embd, n_layer, n_ff, n_head, n_head_kv, head_dim, head_dim_v, n_rot, n_expert;
    int rc;
    if ((rc = ld_u32(L, "context_length", true, 0, &n_ctx, err)) ||
        (rc = ld_u32(L, "embedding_length", true, 0, &n_embd, err)) ||
        (rc = ld_u32(L, "block_count", true, 0, &n_layer, err)) ||
        (rc = ld_u32(L, "feed_forward_length", true, 0, &n_ff, err)) ||
        (rc = ld_u32(L, "attention.head_count", true, 0, &n_head, err)) ||
        (rc = ld_u32(L, "expert_count", false, 0, &n_expert, err)))
        return rc;
    if (n_expert > 4096)
        return forge_err_set(err, FORGE_E_FORMAT, "%s: %s.expert_count %u is implausible",
                             L->path, L->arch, n_expert);
    m->ap.n_expert = (int32_t)n_expert; /* the architecture's load checks the rest */
    if (n_embd == 0 || n_embd > (1u << 20) || n_layer == 0 || n_layer > FORGE_MAX_LAYERS ||
        n_ff == 0 || n_ff > (1u << 22) || n_head == 0 || n_head > 4096 || n_ctx == 0 ||
        n_ctx > (1u << 24))
        return forge_err_set(err, FORGE_E_FORMAT,
                             "%s: implausible hyperparameters: context_length %u, embedding_length "
                             "%u, block_count %u, feed_forward_length %u, head_count %u",
                             L->path, n_ctx, n_embd, n_layer, n_ff, n_head);
    if ((rc = ld_u32(L, "attention.head_count_kv", false, n_head, &n_head_kv, err)) ||
        (rc = ld_u32(L, "attention.key_length", false, n_embd / n_head, &head_dim, err)) ||
        (rc = ld_u32(L, "attention.value_length", false, head_dim, &head_dim_v, err)) ||
        (rc = ld_u32(L, "rope.dimension_count", false, head_dim, &n_rot, err)))
        return rc;
    if (n_head_kv == 0 || n_head % n_head_kv != 0)
        return forge_err_set(err, FORGE_E_FORMAT,
                             "%s: %s.attention.head_count %u is not a multiple of head_count_kv %u",
                             L->path, L->arch, n_head, n_head_kv);
    if (head_dim == 0 || head_dim > 4096 || head_dim_v != head_dim)
        return forge_err_set(err, FORGE_E_UNSUPPORTED,
                             "%s: head dimensions key %u / value %u are not supported", L->path,
                             head_dim, head_dim_v);
    if (n_rot == 0 || n_rot > head_dim || n_rot % 2)
        return forge_err_set(err, FORGE_E_FORMAT,
                             "%s: %s.rope.dimension_count %u does not fit head dimension %u",
                             L->path, L->arch, n_rot, head_dim);
    if ((rc = ld_f32(L, "attention.layer_norm_rms_epsilon", NAN, &hp->rms_eps, err)) ||
        (rc = ld_f32(L, "rope.freq_base", 10000.0f, &hp->rope_freq_base, err)))
        return rc;
    if (isnan(hp->rms_eps)) {
        char key[160];
        arch_key(key, sizeof key, L->arch, "attention.layer_norm_rms_epsilon");
        return forge_err_set(err, FORGE_E_NOTFOUND, "%s: required key '%s' not found", L->path,
                             key);
    }
    if (!(hp->rms_eps > 0 && hp->rms_eps < 1) || !(hp->rope_freq_base > 0))
        return forge_err_set(err, FORGE_E_FORMAT, "%s: bad rms epsilon %g or rope base %g", L->path,
                             (double)hp->rms_eps, (double)hp->rope_freq_base);
    /* rope scaling: llama.cpp reads the factor whatever the type says; YaRN/LongRoPE not here. */
    char key[160];
    arch_key(key, sizeof key, L->arch, "rope.scaling.type");
    bool yarn = false;
    if (gguf_find_key(m->gguf, key) >= 0) {
        gguf_str s;
        if ((rc = gguf_get_str(m->gguf, key, &s, err))) return rc;
        yarn = s.len == 4 && !memcmp(s.data, "yarn", 4);
        /* longrope (newer converters write it): phi3 only, whose load binds the factors */
        const bool longrope =
            m->arch == ARCH_PHI3 && s.len == 8 && !memcmp(s.data, "longrope", 8);
        if (!(s.len == 4 && !memcmp(s.data, "none", 4)) &&
            !(s.len == 6 && !memcmp(s.data, "linear", 6)) && !yarn && !longrope)
            return forge_err_set(
                err, FORGE_E_UNSUPPORTED,
                "%s: rope scaling type '%.*s' is not supported (none, linear, yarn; longrope "
                "for phi3)",
                L->path, (int)(s.len > 32 ? 32 : s.len), s.data);
    }
    float factor;
    if ((rc = ld_f32(L, "rope.scaling.factor", 0.0f, &factor, err))) return rc;
    if (factor == 0.0f && (rc = ld_f32(L, "rope.scale_linear", 0.0f, &factor, err))) return rc;
    if (factor < 0 || isnan(factor))
        return forge_err_set(err, FORGE_E_FORMAT, "%s: bad rope scaling factor %g", L->path,
                             (double)factor);
    hp->rope_freq_scale = factor == 0.0f ? 1.0f : 1.0f / factor;
    /* YaRN as llama.cpp sets it up: ext_factor 1, beta_fast 32, beta_slow 1, correction dims
     * from the original context length (default: the training context) */
    m->rope_ext_factor = yarn ? 1.0f : 0.0f;
    uint32_t n_ctx_orig;
    if ((rc =
             ld_u32(L, "rope.scaling.original_context_length", false, n_ctx, &n_ctx_orig, err)))
        return rc;
    if (yarn) {
        const float beta_fast = 32.0f, beta_slow = 1.0f, base = hp->rope_freq_base;
        const float nd = (float)n_rot, pi = 3.14159265358979323846f;
        float start =
            floorf(nd * logf((float)n_ctx_orig / (beta_fast * 2 * pi)) / (2 * logf(base)));
        float end = ceilf(nd * logf((float)n_ctx_orig / (beta_slow * 2 * pi)) / (2 * logf(base)));
        m->rope_corr_dims[0] = start > 0 ? start : 0;
        m->rope_corr_dims[1] = end < nd - 1 ? end : nd - 1;
    }

    hp->n_ctx_train = (int32_t)n_ctx;
    hp->n_embd = (int32_t)n_embd;
    hp->n_layer = (int32_t)n_layer;
    hp->n_ff = (int32_t)n_ff;
    hp->n_head = (int32_t)n_head;
    hp->n_head_kv = (int32_t)n_head_kv;
    hp->head_dim = (int32_t)head_dim;
    hp->n_rot = (int32_t)n_rot;
    m->n_embd_k_gqa = (int32_t)(n_head_kv * head_dim);
    return FORGE_OK;
}

int ld_globals(loader *L, forge_err *err)
{
    forge_model *m = L->m;
    const forge_model_info *hp = &m->info;
    const int64_t E = hp->n_embd, V = hp->n_vocab;
    int rc;
    if ((rc = ld_bind(L, &m->tok_embd, "token_embd.weight", W_MATRIX, E, V, true, err)) ||
        (rc = ld_bind(L, &m->output_norm, "output_norm.weight", W_VECTOR, E, 1, true, err)) ||
        (rc = ld_bind(L, &m->output, "output.weight", W_MATRIX, E, V, false, err)) ||
        (rc = ld_bind(L, &m->rope_freqs, "rope_freqs.weight", W_VECTOR, hp->n_rot / 2, 1, false,
                      err)))
        return rc;
    if (!m->output.data) {
        m->output = m->tok_embd;
        m->info.tied_output = true;
    }
    return FORGE_OK;
}

/* After the architecture's load: what one token reads, the type summary, the weight slots. */
static int finish_load(loader *L, forge_err *err)
{
    forge_model *m = L->m;
    const int64_t E = m->info.n_embd;
    /* bytes one decoded token reads: everything but the embedding table, plus one of its rows;
     * of the experts only the n_used of n_expert a token is routed to */
    uint64_t embd_row = ggml_row_size(m->tok_embd.type, E);
    m->info.bytes_per_token = m->info.weight_bytes - m->tok_embd.n_bytes + embd_row;
    if (m->info.tied_output) m->info.bytes_per_token += m->tok_embd.n_bytes;
    if (L->expert_bytes && m->ap.n_expert > 0)
        m->info.bytes_per_token -= L->expert_bytes -
                                   L->expert_bytes / (uint64_t)m->ap.n_expert *
                                       (uint64_t)m->ap.n_expert_used;
    make_type_summary(L);
    /* the slots: each weight's index in model_weights (a tied output shares tok_embd's) */
    const int n = model_weights(m, NULL, 0);
    be_weight **list = malloc((size_t)(n > 0 ? n : 1) * sizeof *list);
    if (!list) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    model_weights(m, list, n);
    for (int i = 0; i < n; i++)
        list[i]->slot = i;
    free(list);
    if (m->info.tied_output) m->output.slot = m->tok_embd.slot;
    m->n_weights = n;
    return FORGE_OK;
}

int model_weights(forge_model *m, be_weight **out, int cap)
{
    int n = 0;
    be_weight *globals[] = {&m->tok_embd,  &m->output_norm, &m->output,
                            &m->rope_freqs, &m->rope_long,   &m->rope_short};
    for (size_t i = 0; i < FORGE_ARRAY_LEN(globals); i++) {
        if (!globals[i]->data || (i == 2 && m->info.tied_output)) continue; /* output = tok_embd */
        if (n < cap) out[n] = globals[i];
        n++;
    }
    for (int il = 0; il < m->info.n_layer; il++) {
        /* layer_weights is a struct of be_weight only */
        be_weight *lw = (be_weight *)&m->layers[il];
        for (size_t i = 0; i < sizeof(layer_weights) / sizeof(be_weight); i++) {
            if (!lw[i].data) continue;
            if (n < cap) out[n] = &lw[i];
            n++;
        }
    }
    return n;
}

int forge_model_load(const char *path, forge_model **out, forge_err *err)
{
    forge_model *m = NULL;
    int rc;
    if (!out || !path)
        return forge_err_set(err, FORGE_E_INVALID, "forge_model_load: NULL argument");
    *out = NULL;
    m = calloc(1, sizeof *m);
    if (!m) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    if (pthread_mutex_init(&m->wshare.lock, NULL)) {
        free(m);
        return forge_err_set(err, FORGE_E_NOMEM, "forge_model_load: cannot create a lock");
    }
    m->wshare_init = true;
    loader L = {.m = m, .path = path};
    if ((rc = gguf_open(path, &m->gguf, err))) goto fail;

    gguf_str arch;
    if ((rc = gguf_get_str(m->gguf, "general.architecture", &arch, err))) goto fail;
    const arch_desc *ad = arch_find_name(arch.data, arch.len);
    if (!ad) {
        char names[256];
        rc = forge_err_set(err, FORGE_E_UNSUPPORTED,
                           "%s: architecture '%.*s' is not supported (supported: %s)", path,
                           (int)(arch.len > 64 ? 64 : arch.len), arch.data,
                           arch_names_list(names, sizeof names));
        goto fail;
    }
    m->arch = ad->arch;
    m->rope_mode = ad->rope_mode;
    L.arch = ad->name;
    m->info.arch = ad->name;
    gguf_str name;
    if (gguf_find_key(m->gguf, "general.name") >= 0 &&
        gguf_get_str(m->gguf, "general.name", &name, NULL) == 0)
        snprintf(m->name, sizeof m->name, "%.*s", (int)(name.len > 127 ? 127 : name.len),
                 name.data);
    m->info.name = m->name;
    m->info.type_summary = m->type_summary;

    if ((rc = load_hparams(&L, err))) goto fail;
    if ((rc = forge_tok_load(m->gguf, &m->tok, err))) goto fail;
    m->info.n_vocab = forge_tok_n_vocab(m->tok);
    if (m->info.n_vocab <= 0) {
        rc = forge_err_set(err, FORGE_E_FORMAT, "%s: the vocabulary is empty", path);
        goto fail;
    }
    if ((rc = ad->load(&L, err)) || (rc = finish_load(&L, err))) goto fail;
    *out = m;
    return FORGE_OK;
fail:
    forge_model_free(m);
    return rc;
}

void forge_model_free(forge_model *m)
{
    if (!m) return;
    /* contexts borrow the model: every weight set is released by now (wshare.head NULL) */
    if (m->wshare_init) pthread_mutex_destroy(&m->wshare.lock);
    free(m->layers);
    free(m->ap.layer_swa);
    forge_tok_free(m->tok);
    gguf_close(m->gguf);
    free(m);
}

const forge_model_info *forge_model_info_get(const forge_model *m)
{
    return m ? &m->info : NULL;
}

const forge_tok *forge_model_tok(const forge_model *m)
{
    return m ? m->tok : NULL;
}

const gguf_ctx *forge_model_gguf(const forge_model *m)
{
    return m ? m->gguf : NULL;
}
