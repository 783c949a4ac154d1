/* quantize_model.c - forge_quantize_file: reads a GGUF model, chooses each tensor's output type
 * as llama.cpp's llama-quantize does (llama_tensor_get_type of llama.cpp c392e50, without an
 * importance matrix; the facts are re-expressed here, not copied), and streams the converted
 * tensors through the GGUF writer, quantizing the rows of each chunk on a thread pool.
 * Owns: the plan (one entry per output tensor) and per-thread row buffers. Reads the input only
 * through the GGUF reader; the quantizers are quant/quantize.h. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/util.h"
#include "cpu/kernels.h"
#include "forge_quantize.h"
#include "quant/quantize.h"

/* llama_ftype values (llama.h) written as general.file_type. */
enum {
    FT_F32 = 0,
    FT_F16 = 1,
    FT_Q4_0 = 2,
    FT_Q4_1 = 3,
    FT_Q8_0 = 7,
    FT_Q5_0 = 8,
    FT_Q5_1 = 9,
    FT_Q2_K = 10,
    FT_Q3_K_S = 11,
    FT_Q3_K_M = 12,
    FT_Q3_K_L = 13,
    FT_Q4_K_S = 14,
    FT_Q4_K_M = 15,
    FT_Q5_K_S = 16,
    FT_Q5_K_M = 17,
    FT_Q6_K = 18,
    FT_IQ4_NL = 25,
    FT_IQ4_XS = 30,
    FT_BF16 = 32
};

static const struct mix {
    const char *name;
    uint32_t ftype;
    int base;
} mixes[] = {
    {"Q4_0", FT_Q4_0, GGML_TYPE_Q4_0},       {"Q4_1", FT_Q4_1, GGML_TYPE_Q4_1},
    {"Q5_0", FT_Q5_0, GGML_TYPE_Q5_0},       {"Q5_1", FT_Q5_1, GGML_TYPE_Q5_1},
    {"IQ4_NL", FT_IQ4_NL, GGML_TYPE_IQ4_NL}, {"IQ4_XS", FT_IQ4_XS, GGML_TYPE_IQ4_XS},
    {"Q2_K", FT_Q2_K, GGML_TYPE_Q2_K},       {"Q3_K_S", FT_Q3_K_S, GGML_TYPE_Q3_K},
    {"Q3_K_M", FT_Q3_K_M, GGML_TYPE_Q3_K},   {"Q3_K_L", FT_Q3_K_L, GGML_TYPE_Q3_K},
    {"Q4_K_S", FT_Q4_K_S, GGML_TYPE_Q4_K},   {"Q4_K_M", FT_Q4_K_M, GGML_TYPE_Q4_K},
    {"Q5_K_S", FT_Q5_K_S, GGML_TYPE_Q5_K},   {"Q5_K_M", FT_Q5_K_M, GGML_TYPE_Q5_K},
    {"Q6_K", FT_Q6_K, GGML_TYPE_Q6_K},       {"Q8_0", FT_Q8_0, GGML_TYPE_Q8_0},
    {"F16", FT_F16, GGML_TYPE_F16},          {"BF16", FT_BF16, GGML_TYPE_BF16},
    {"F32", FT_F32, GGML_TYPE_F32},
};

int forge_quantize_mix_count(void)
{
    return (int)FORGE_ARRAY_LEN(mixes);
}

const char *forge_quantize_mix_name(int i)
{
    return i >= 0 && i < forge_quantize_mix_count() ? mixes[i].name : NULL;
}

int forge_quantize_mix_find(const char *name)
{
    for (int i = 0; name && i < forge_quantize_mix_count(); i++)
        if (!strcasecmp(name, mixes[i].name)) return i;
    return -1;
}

int forge_quantize_mix_base_type(int i)
{
    return i >= 0 && i < forge_quantize_mix_count() ? mixes[i].base : -1;
}

uint32_t forge_quantize_mix_file_type(int i)
{
    return i >= 0 && i < forge_quantize_mix_count() ? mixes[i].ftype : 0;
}

static bool is_float_type(int t)
{
    return t == GGML_TYPE_F32 || t == GGML_TYPE_F16 || t == GGML_TYPE_BF16;
}

static bool is_quantized_type(int t)
{
    return ggml_type_valid(t) && ggml_type_block_size(t) > 1;
}

/* ---- the model facts llama-quantize's rules look at ------------------------------------ */
struct model_facts {
    char arch[64];
    int n_layer, n_head, n_head_kv, n_expert;
    bool is_70b, has_output;
    int n_attention_wv;
};

/* A u32 hyperparameter that may be stored as a scalar or (per layer) as an array: the value, or
 * the first element. def when absent. */
static int get_hparam(const gguf_ctx *g, const char *arch, const char *suffix, int def)
{
    char key[160];
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    uint32_t v;
    if (gguf_get_u32(g, key, &v, NULL) == FORGE_OK) return v > 0x7fffffffu ? def : (int)v;
    gguf_type et;
    uint64_t n;
    if (gguf_get_arr(g, key, &et, &n, NULL) == FORGE_OK && n > 0 && n <= (1u << 20)) {
        int32_t *a = malloc((size_t)n * sizeof *a);
        int r = def;
        if (a && gguf_copy_arr_i32(g, key, a, n, NULL) == FORGE_OK && a[0] >= 0) r = a[0];
        free(a);
        return r;
    }
    return def;
}

static void read_facts(const gguf_ctx *g, struct model_facts *m)
{
    gguf_str s = {0};
    memset(m, 0, sizeof *m);
    if (gguf_get_str(g, "general.architecture", &s, NULL) == FORGE_OK && s.len < sizeof m->arch)
        memcpy(m->arch, s.data, (size_t)s.len);
    m->n_layer = get_hparam(g, m->arch, "block_count", 0);
    m->n_head = get_hparam(g, m->arch, "attention.head_count", 0);
    m->n_head_kv = get_hparam(g, m->arch, "attention.head_count_kv", m->n_head);
    m->n_expert = get_hparam(g, m->arch, "expert_count", 0);
    /* llama.cpp's model size class "70B" (attn_v gets Q5_K over Q3_K/Q4_K): 80 layers of llama
     * (with GQA, no experts), deci, qwen2 or olmo */
    if (m->n_layer == 80) {
        if (!strcmp(m->arch, "llama"))
            m->is_70b = m->n_expert != 8 && m->n_head != m->n_head_kv;
        else
            m->is_70b =
                !strcmp(m->arch, "deci") || !strcmp(m->arch, "qwen2") || !strcmp(m->arch, "olmo");
    }
    for (int64_t i = 0; i < gguf_tensor_count(g); i++) {
        const char *name = gguf_tensor(g, i)->name;
        if (strstr(name, "attn_v.weight") || strstr(name, "attn_qkv.weight") ||
            strstr(name, "attn_kv_b.weight"))
            m->n_attention_wv++;
        else if (!strcmp(name, "output.weight"))
            m->has_output = true;
    }
}

static int n_gqa(const struct model_facts *m)
{
    return m->n_head_kv > 0 ? m->n_head / m->n_head_kv : 0;
}

/* ---- per-tensor type choice (llama_tensor_get_type for the mixes above) ------------------- */
struct choice_state {
    int i_attention_wv, i_ffn_down, i_ffn_gate, i_ffn_up;
};

static bool use_more_bits(int i_layer, int n_layers)
{
    return i_layer < n_layers / 8 || i_layer >= 7 * n_layers / 8 ||
           (i_layer - n_layers / 8) % 3 == 2;
}

/* The layer of a tensor for the ffn rules: a running count, or with experts its blk.N. */
static int layer_of(const struct model_facts *m, int counter, const char *name)
{
    int il = counter;
    if (m->n_expert > 1 && sscanf(name, "blk.%d.", &il) != 1) il = counter;
    return il;
}

/* *narrow_output is set when the output matrix's rows do not fit the mix's blocks, so that it
 * gets Q8_0 instead of Q6_K (llama.cpp does this silently; Forge reports it). */
static int mix_type(const struct model_facts *m, struct choice_state *cs, int type,
                    const char *name, int64_t ne0, uint32_t ft, bool *narrow_output)
{
    const bool falcon = !strcmp(m->arch, "falcon");
    const int nl = m->n_layer;
    if (!strcmp(name, "output.weight") || (!m->has_output && !strcmp(name, "token_embd.weight"))) {
        /* the output matrix (or the token embedding that doubles as it) */
        if (falcon || ne0 % ggml_type_block_size(type) != 0) {
            *narrow_output = !falcon && type != GGML_TYPE_Q8_0;
            type = GGML_TYPE_Q8_0;
        } else if (type != GGML_TYPE_Q8_0)
            type = GGML_TYPE_Q6_K;
    } else if (!strcmp(name, "token_embd.weight")) {
        /* stays in the base type for every mix here */
    } else if (strstr(name, "attn_v.weight")) {
        if (ft == FT_Q2_K)
            type = n_gqa(m) >= 4 ? GGML_TYPE_Q4_K : GGML_TYPE_Q3_K;
        else if (ft == FT_Q3_K_M)
            type = cs->i_attention_wv < 2 ? GGML_TYPE_Q5_K : GGML_TYPE_Q4_K;
        else if (ft == FT_Q3_K_L)
            type = GGML_TYPE_Q5_K;
        else if ((ft == FT_IQ4_NL || ft == FT_IQ4_XS) && n_gqa(m) >= 4)
            type = GGML_TYPE_Q5_K;
        else if ((ft == FT_Q4_K_M || ft == FT_Q5_K_M) &&
                 use_more_bits(cs->i_attention_wv, m->n_attention_wv))
            type = GGML_TYPE_Q6_K;
        else if (ft == FT_Q4_K_S && cs->i_attention_wv < 4)
            type = GGML_TYPE_Q5_K;
        if (m->is_70b && (type == GGML_TYPE_Q3_K || type == GGML_TYPE_Q4_K)) type = GGML_TYPE_Q5_K;
        if (m->n_expert == 8) type = GGML_TYPE_Q8_0;
        cs->i_attention_wv++;
    } else if (strstr(name, "attn_k.weight")) {
        if (m->n_expert == 8) type = GGML_TYPE_Q8_0;
    } else if (strstr(name, "attn_q.weight")) {
        /* only the IQ3 mixes change it */
    } else if (strstr(name, "ffn_down")) {
        int il = layer_of(m, cs->i_ffn_down, name);
        if (ft == FT_Q2_K)
            type = GGML_TYPE_Q3_K;
        else if (ft == FT_Q3_K_M)
            type = il < nl / 16                       ? GGML_TYPE_Q5_K
                   : !falcon || use_more_bits(il, nl) ? GGML_TYPE_Q4_K
                                                      : GGML_TYPE_Q3_K;
        else if (ft == FT_Q3_K_L)
            type = falcon ? GGML_TYPE_Q4_K : GGML_TYPE_Q5_K;
        else if (ft == FT_Q4_K_M) {
            if (falcon)
                type = il < nl / 16            ? GGML_TYPE_Q6_K
                       : use_more_bits(il, nl) ? GGML_TYPE_Q5_K
                                               : GGML_TYPE_Q4_K;
            else if (use_more_bits(il, nl))
                type = GGML_TYPE_Q6_K;
        } else if (il < nl / 8 && (ft == FT_IQ4_NL || ft == FT_IQ4_XS))
            type = GGML_TYPE_Q5_K;
        else if (ft == FT_Q5_K_M && use_more_bits(il, nl))
            type = GGML_TYPE_Q6_K;
        else if (ft == FT_Q4_K_S && !falcon && il < nl / 8)
            type = GGML_TYPE_Q5_K;
        cs->i_ffn_down++;
    } else if (strstr(name, "attn_output.weight")) {
        if (!falcon) {
            if (m->n_expert == 8) {
                if (ft == FT_Q2_K || ft == FT_Q3_K_S || ft == FT_Q3_K_M || ft == FT_IQ4_NL ||
                    ft == FT_Q4_K_S || ft == FT_Q4_K_M || ft == FT_IQ4_XS)
                    type = GGML_TYPE_Q5_K;
            } else {
                if (ft == FT_Q2_K)
                    type = GGML_TYPE_Q3_K;
                else if (ft == FT_Q3_K_M)
                    type = GGML_TYPE_Q4_K;
                else if (ft == FT_Q3_K_L)
                    type = GGML_TYPE_Q5_K;
            }
        } else if (ft == FT_Q3_K_L) {
            type = GGML_TYPE_Q4_K;
        }
    } else if (strstr(name, "attn_qkv.weight")) {
        if (ft == FT_Q3_K_M || ft == FT_Q3_K_L)
            type = GGML_TYPE_Q4_K;
        else if (ft == FT_Q4_K_M)
            type = GGML_TYPE_Q5_K;
        else if (ft == FT_Q5_K_M)
            type = GGML_TYPE_Q6_K;
    } else if (strstr(name, "ffn_gate")) {
        cs->i_ffn_gate++;
    } else if (strstr(name, "ffn_up")) {
        cs->i_ffn_up++;
    }
    return type;
}

/* A type whose blocks fit rows of ne0 elements, for a tensor whose rows the chosen type cannot
 * hold: llama.cpp's fallbacks for the K/IQ types; for the 32-block types (where llama.cpp gives
 * up) and as the last resort, F16. */
static int fallback_type(int type, int64_t ne0)
{
    switch (type) {
    case GGML_TYPE_Q2_K:
    case GGML_TYPE_Q3_K:
    case GGML_TYPE_IQ4_XS:
        type = GGML_TYPE_IQ4_NL;
        break;
    case GGML_TYPE_Q4_K:
        type = GGML_TYPE_Q5_0;
        break;
    case GGML_TYPE_Q5_K:
        type = GGML_TYPE_Q5_1;
        break;
    case GGML_TYPE_Q6_K:
        type = GGML_TYPE_Q8_0;
        break;
    default:
        type = GGML_TYPE_F16;
        break;
    }
    return ne0 % ggml_type_block_size(type) == 0 ? type : GGML_TYPE_F16;
}

/* Whether llama-quantize converts a tensor at all: 2-D (or more) tensors named *weight, except
 * norms and a few small special matrices. */
static bool wants_quantization(const gguf_tensor_info *t)
{
    static const char *const never[] = {
        "_norm.weight",
        "ffn_gate_inp.weight",
        "ssm_conv1d.weight",
        "time_mix_first.weight",
        "time_mix_w1.weight",
        "time_mix_w2.weight",
        "time_mix_decay_w1.weight",
        "time_mix_decay_w2.weight",
        "time_mix_lerp_fused.weight",
        "attn_rel_b.weight",
    };
    size_t len = strlen(t->name);
    int n_dims = 1; /* ggml_n_dims: trailing dimensions of 1 do not count */
    for (int d = GGUF_MAX_DIMS - 1; d >= 1; d--)
        if (t->ne[d] > 1) {
            n_dims = d + 1;
            break;
        }
    if (len < 6 || strcmp(t->name + len - 6, "weight") != 0 || n_dims < 2) return false;
    for (size_t i = 0; i < FORGE_ARRAY_LEN(never); i++)
        if (strstr(t->name, never[i])) return false;
    return strcmp(t->name, "position_embd.weight") != 0 &&
           strcmp(t->name, "token_types.weight") != 0;
}

/* ---- the plan ------------------------------------------------------------------------------ */
struct plan_entry {
    const gguf_tensor_info *src;
    int type;     /* output type */
    bool convert; /* false: bytes copied as they are */
    size_t src_row, dst_row;
};

struct job {
    const struct forge_quantize_opts *o;
    struct plan_entry *plan;
    float **rowbuf;        /* one row of floats per thread */
    forge_err *thread_err; /* one per thread */
    uint64_t done, total;
    /* the chunk being converted */
    const struct plan_entry *cur;
    int64_t row0, n_rows;
    uint8_t *dst;
    kern_pool *pool;
};

/* llama.cpp's order: tensors outside the blocks first, then block by block, by name. */
static int layer_key(const char *name)
{
    int il = -1;
    if (sscanf(name, "blk.%d.", &il) != 1) il = -1;
    return il;
}

static int cmp_tensor(const void *pa, const void *pb)
{
    const gguf_tensor_info *a = *(const gguf_tensor_info *const *)pa;
    const gguf_tensor_info *b = *(const gguf_tensor_info *const *)pb;
    int la = layer_key(a->name), lb = layer_key(b->name);
    if (la != lb) return la < lb ? -1 : 1;
    return strcmp(a->name, b->name);
}

static void convert_rows(void *arg, int ith, int nth)
{
    struct job *j = arg;
    const struct plan_entry *p = j->cur;
    const int64_t ne0 = p->src->ne[0];
    quant_row_fn fn = quant_row_function(p->type);
    const uint8_t *src = (const uint8_t *)p->src->data + (size_t)j->row0 * p->src_row;
    forge_err *e = &j->thread_err[ith];
    for (int64_t r = ith; r < j->n_rows && e->code == FORGE_OK; r += nth) {
        const uint8_t *row = src + (size_t)r * p->src_row;
        if (p->src->type == GGML_TYPE_F32 && (uintptr_t)row % _Alignof(float) == 0) {
            fn((const float *)(const void *)row, j->dst + (size_t)r * p->dst_row, ne0);
            continue;
        }
        if (forge_dequantize(p->src->type, row, j->rowbuf[ith], ne0, e) == FORGE_OK)
            fn(j->rowbuf[ith], j->dst + (size_t)r * p->dst_row, ne0);
    }
}

static int fill(void *user, int64_t index, const gguf_tensor_info *info, int64_t row0,
                int64_t n_rows, void *dst, forge_err *err)
{
    struct job *j = user;
    const struct plan_entry *p = &j->plan[index];
    if (!p->convert) {
        memcpy(dst, (const uint8_t *)p->src->data + (size_t)row0 * p->src_row,
               (size_t)n_rows * p->src_row);
    } else {
        int nth = kern_pool_size(j->pool);
        j->cur = p;
        j->row0 = row0;
        j->n_rows = n_rows;
        j->dst = dst;
        for (int t = 0; t < nth; t++)
            forge_err_clear(&j->thread_err[t]);
        kern_pool_run(j->pool, convert_rows, j);
        for (int t = 0; t < nth; t++)
            if (j->thread_err[t].code != FORGE_OK)
                return forge_err_set(err, j->thread_err[t].code, "quantize: tensor %s (%s): %s",
                                     info->name, ggml_type_name(p->src->type),
                                     j->thread_err[t].msg);
    }
    j->done += (uint64_t)n_rows * p->dst_row;
    if (j->o->progress) j->o->progress(j->o->user, j->done, j->total);
    return FORGE_OK;
}

static void note(const forge_quantize_opts *o, const char *fmt, ...) FORGE_PRINTF(2, 3);
static void note(const forge_quantize_opts *o, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    if (!o->note) return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    o->note(o->user, msg);
}

int forge_quantize_file(const forge_quantize_opts *o, forge_quantize_result *result, forge_err *err)
{
    gguf_ctx *g = NULL;
    gguf_writer *w = NULL;
    kern_pool *pool = NULL;
    const gguf_tensor_info **order = NULL;
    struct plan_entry *plan = NULL;
    struct job job = {0};
    forge_quantize_result res = {0};
    struct model_facts m;
    struct choice_state cs = {0};
    int rc = FORGE_OK, nth;
    int64_t n_t = 0, max_ne0 = 1;

    if (!o || !o->in_path || !o->out_path || o->mix < 0 || o->mix >= forge_quantize_mix_count() ||
        o->n_threads < 0)
        return forge_err_set(err, FORGE_E_INVALID, "quantize: bad options");
    const struct mix *mx = &mixes[o->mix];
    nth = o->n_threads ? o->n_threads : kern_physical_cores();
    if (nth < 1) nth = 1;

    if ((rc = gguf_open(o->in_path, &g, err))) goto done;
    {
        uint32_t n_split = 0;
        if (gguf_get_u32(g, "split.count", &n_split, NULL) == FORGE_OK && n_split > 1) {
            rc = forge_err_set(err, FORGE_E_UNSUPPORTED,
                               "quantize: %s is one part of a %u-file split model; "
                               "merge it first (llama-gguf-split --merge)",
                               o->in_path, n_split);
            goto done;
        }
    }
    read_facts(g, &m);

    n_t = gguf_tensor_count(g);
    order = calloc((size_t)(n_t ? n_t : 1), sizeof *order);
    plan = calloc((size_t)(n_t ? n_t : 1), sizeof *plan);
    if (!order || !plan) {
        rc = forge_err_set(err, FORGE_E_NOMEM, "quantize: out of memory");
        goto done;
    }
    for (int64_t i = 0; i < n_t; i++)
        order[i] = gguf_tensor(g, i);
    qsort(order, (size_t)n_t, sizeof *order, cmp_tensor);

    /* choose every tensor's type before writing anything, so bad input fails early */
    for (int64_t i = 0; i < n_t; i++) {
        const gguf_tensor_info *t = order[i];
        struct plan_entry *p = &plan[i];
        int type = t->type;
        p->src = t;
        if (wants_quantization(t)) {
            type = mx->base;
            bool narrow = false;
            if (!o->pure && is_quantized_type(mx->base))
                type = mix_type(&m, &cs, type, t->name, t->ne[0], mx->ftype, &narrow);
            if (narrow) {
                note(o,
                     "%s: rows of %lld elements are no multiple of %s's block of %lld: using %s "
                     "for the "
                     "output matrix",
                     t->name, (long long)t->ne[0], ggml_type_name(mx->base),
                     (long long)ggml_type_block_size(mx->base), ggml_type_name(type));
                res.n_fallback++;
            }
            if (t->ne[0] % ggml_type_block_size(type) != 0) {
                int fb = fallback_type(type, t->ne[0]);
                note(o, "%s: rows of %lld elements are no multiple of %s's block of %lld: using %s",
                     t->name, (long long)t->ne[0], ggml_type_name(type),
                     (long long)ggml_type_block_size(type), ggml_type_name(fb));
                type = fb;
                res.n_fallback++;
            }
        }
        p->type = type;
        p->convert = type != (int)t->type;
        p->src_row = ggml_row_size(t->type, t->ne[0]);
        p->dst_row = ggml_row_size(type, t->ne[0]);
        if (p->convert) {
            if (!is_float_type(t->type) && !is_quantized_type(t->type)) {
                rc = forge_err_set(
                    err, FORGE_E_UNSUPPORTED,
                    "quantize: tensor %s has type %s, which cannot be converted to %s", t->name,
                    ggml_type_name(t->type), ggml_type_name(type));
                goto done;
            }
            if (is_quantized_type(t->type) && !o->allow_requantize) {
                rc = forge_err_set(err, FORGE_E_INVALID,
                                   "quantize: tensor %s is already quantized (%s): "
                                   "requantizing loses accuracy and needs --allow-requantize",
                                   t->name, ggml_type_name(t->type));
                goto done;
            }
            if (!quant_row_function(type)) {
                rc = forge_err_set(err, FORGE_E_UNSUPPORTED,
                                   "quantize: tensor %s: no quantizer for type %s", t->name,
                                   ggml_type_name(type));
                goto done;
            }
            if (is_quantized_type(t->type)) {
                /* a type the dequantizer lacks fails here, before any output */
                float probe[256];
                forge_err e2 = {0};
                int64_t bs = ggml_type_block_size(t->type);
                if (bs > 256 || forge_dequantize(t->type, t->data, probe, bs, &e2) != FORGE_OK) {
                    rc = forge_err_set(err, FORGE_E_UNSUPPORTED,
                                       "quantize: tensor %s (%s) cannot be dequantized: %s",
                                       t->name, ggml_type_name(t->type), e2.msg);
                    goto done;
                }
            }
            res.n_quantized++;
            if (t->ne[0] > max_ne0) max_ne0 = t->ne[0];
        }
        res.in_bytes += t->n_bytes;
        res.out_bytes += p->dst_row * (uint64_t)(t->n_elements / (t->ne[0] ? t->ne[0] : 1));
        res.type_count[type]++;
        res.n_tensors++;
    }

    /* metadata: every key of the input except the split keys and the two llama-quantize sets,
     * which come last (its gguf_set_val removes a key and appends it) */
    if ((rc = gguf_writer_create(&w, err))) goto done;
    for (int64_t i = 0; i < gguf_kv_count(g); i++) {
        const char *key = gguf_kv_key(g, i);
        if (!strcmp(key, "general.quantization_version") || !strcmp(key, "general.file_type") ||
            !strcmp(key, "split.no") || !strcmp(key, "split.count") ||
            !strcmp(key, "split.tensors.count"))
            continue;
        if ((rc = gguf_writer_copy_kv(w, g, i, err))) goto done;
    }
    if ((rc = gguf_writer_set_u32(w, "general.quantization_version", 2, err)) ||
        (rc = gguf_writer_set_u32(w, "general.file_type", mx->ftype, err)))
        goto done;
    for (int64_t i = 0; i < n_t; i++)
        if ((rc = gguf_writer_add_tensor(w, plan[i].src->name, (ggml_type)plan[i].type,
                                         plan[i].src->n_dims, plan[i].src->ne, err)))
            goto done;

    if ((rc = kern_pool_create(nth, &pool, err))) goto done;
    nth = kern_pool_size(pool);
    job.o = o;
    job.plan = plan;
    job.pool = pool;
    job.total = res.out_bytes;
    job.rowbuf = calloc((size_t)nth, sizeof *job.rowbuf);
    job.thread_err = calloc((size_t)nth, sizeof *job.thread_err);
    if (!job.rowbuf || !job.thread_err) {
        rc = forge_err_set(err, FORGE_E_NOMEM, "quantize: out of memory");
        goto done;
    }
    for (int t = 0; t < nth; t++)
        if (!(job.rowbuf[t] = malloc((size_t)max_ne0 * sizeof(float)))) {
            rc = forge_err_set(err, FORGE_E_NOMEM, "quantize: out of memory");
            goto done;
        }
    rc = gguf_writer_write(w, o->out_path, fill, &job, 0, err);

done:
    if (job.rowbuf)
        for (int t = 0; t < nth; t++)
            free(job.rowbuf[t]);
    free(job.rowbuf);
    free(job.thread_err);
    kern_pool_free(pool);
    gguf_writer_free(w);
    free(plan);
    free(order);
    gguf_close(g);
    if (result && rc == FORGE_OK) *result = res;
    return rc;
}
