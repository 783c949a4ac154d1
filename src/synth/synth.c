/* synth.c - writes random-weight llama/qwen2/qwen3 models of real shapes with the metadata keys
 * and tensor names llama.cpp's converter uses. Values come from a per-tensor counter-free RNG
 * stream (seeded by the user's seed and the tensor index), generated row by row inside the
 * writer's fill callback, so output bytes depend only on (shape, type, seed, vocab). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/fp16.h"
#include "core/util.h"
#include "cpu/kernels.h"
#include "forge_synth.h"

#define SYNTH_STD 0.02f
#define SYNTH_DEFAULT_VOCAB 512

/* the llama family has none of the other families' features */
#define LLAMA_FAMILY {0, 0, 0, 0, 0, 0, 0, 0, false, false, false}

static const synth_shape shapes[] = {
    /* name            arch     dim   ffn    L   H   KV  hd   vocab   ctx     rope      eps  tied   bias   qknorm */
    {"tiny",           "llama", 64,   192,   2,  4,  2,  0,   0,      256,    10000.0f, 1e-5f, false, false, false, LLAMA_FAMILY},
    {"tiny-qwen2",     "qwen2", 64,   192,   2,  4,  2,  0,   0,      256,    1000000.0f, 1e-6f, true, true, false, LLAMA_FAMILY},
    {"tiny-qwen3",     "qwen3", 64,   192,   2,  4,  2,  32,  0,      256,    1000000.0f, 1e-6f, true, false, true, LLAMA_FAMILY},
    /* 8 heads over 4 KV heads, head_dim 64: splits over 2 and 4 tensor-parallel ranks (over 2
     * in whole 256-blocks of K-quants) */
    {"tiny-gqa",       "llama", 512,  1024,   2,  8,  4,  0,   0,      256,    10000.0f, 1e-5f, false, false, false, LLAMA_FAMILY},
    {"tinyllama-1.1b", "llama", 2048, 5632,  22, 32, 4,  0,   32000,  2048,   10000.0f, 1e-5f, false, false, false, LLAMA_FAMILY},
    {"llama2-7b",      "llama", 4096, 11008, 32, 32, 32, 0,   32000,  4096,   10000.0f, 1e-5f, false, false, false, LLAMA_FAMILY},
    {"llama3-8b",      "llama", 4096, 14336, 32, 32, 8,  0,   128256, 8192,   500000.0f, 1e-5f, false, false, false, LLAMA_FAMILY},
    {"llama3.2-1b",    "llama", 2048, 8192,  16, 32, 8,  0,   128256, 131072, 500000.0f, 1e-5f, true, false, false, LLAMA_FAMILY},
    {"qwen2.5-0.5b",   "qwen2", 896,  4864,  24, 14, 2,  0,   151936, 32768,  1000000.0f, 1e-6f, true, true, false, LLAMA_FAMILY},
    {"qwen3-0.6b",     "qwen3", 1024, 3072,  28, 16, 8,  128, 151936, 40960,  1000000.0f, 1e-6f, true, false, true, LLAMA_FAMILY},
    /* the other families: tiny shapes for the reference tests (weights std 0.2 and small caps, so
     * that every feature moves the logits), then real shapes for benchmarks */
    /*                                                                                                    std   n_rot exp used ffn_exp swa softcaps      post  fqkv  fup */
    {"tiny-gemma2",    "gemma2", 64,  192,  26, 4,  2,  32,  0,  256, 10000.0f, 1e-6f, true, false, false, {0.2f, 0, 0, 0, 0, 8, 2.0f, 3.0f, true, false, false}},
    {"tiny-gemma3",    "gemma3", 64,  192,  6,  4,  2,  32,  0,  256, 1000000.0f, 1e-6f, true, false, true, {0.2f, 0, 0, 0, 0, 8, 0, 0, true, false, false}},
    {"tiny-phi3",      "phi3",   64,  192,  2,  4,  4,  0,   0,  256, 10000.0f, 1e-5f, false, false, false, {0.2f, 0, 0, 0, 0, 8, 0, 0, false, true, true}},
    {"tiny-phi3-128k", "phi3",   64,  192,  2,  4,  4,  0,   0,  256, 10000.0f, 1e-5f, false, false, false, {0.2f, 0, 0, 0, 0, 8, 0, 0, false, true, true}},
    {"tiny-chatglm",   "chatglm", 64, 192,  2,  4,  2,  0,   0,  256, 10000.0f, 1e-5f, false, true, false, {0.2f, 8, 0, 0, 0, 0, 0, 0, false, true, true}},
    {"tiny-glm4",      "glm4",   64,  192,  2,  4,  2,  0,   0,  256, 10000.0f, 1e-5f, false, true, false, {0.2f, 8, 0, 0, 0, 0, 0, 0, true, false, true}},
    {"tiny-mixtral",   "llama",  64,  96,   2,  4,  2,  0,   0,  256, 10000.0f, 1e-5f, false, false, false, {0.2f, 0, 4, 2, 96, 0, 0, 0, false, false, false}},
    {"tiny-qwen3moe",  "qwen3moe", 64, 192, 2,  4,  2,  32,  0,  256, 1000000.0f, 1e-6f, false, false, true, {0.2f, 0, 8, 2, 48, 0, 0, 0, false, false, false}},
    {"gemma2-2b",      "gemma2", 2304, 9216, 26, 8, 4, 256, 256000, 8192, 10000.0f, 1e-6f, true, false, false, {0, 0, 0, 0, 0, 4096, 50.0f, 30.0f, true, false, false}},
    {"gemma3-1b",      "gemma3", 1152, 6912, 26, 4, 1, 256, 262144, 32768, 1000000.0f, 1e-6f, true, false, true, {0, 0, 0, 0, 0, 512, 0, 0, true, false, false}},
    {"phi3-mini",      "phi3",   3072, 8192, 32, 32, 32, 0, 32064, 4096, 10000.0f, 1e-5f, false, false, false, {0, 0, 0, 0, 0, 0, 0, 0, false, true, true}},
    /* a Mixtral-like MoE small enough to make on the GPU machine in seconds: TinyLlama's layers
     * with 8 experts, 2 used per token (issue 15's benchmark) */
    {"mixtral-8x1b",   "llama",  2048, 5632, 22, 32, 4, 0,   32000, 4096,  10000.0f, 1e-5f, false, false, false, {0, 0, 8, 2, 5632, 0, 0, 0, false, false, false}},
    {"mixtral-8x7b",   "llama",  4096, 14336, 32, 32, 8, 0,   32000, 32768, 1000000.0f, 1e-5f, false, false, false, {0, 0, 8, 2, 14336, 0, 0, 0, false, false, false}},
};

/* LongRoPE shapes (Phi-3's 128k models): rope_factors_long/short (random, near 1) and the keys
 * the converter writes, rope.scaling.original_context_length and rope.scaling.attn_factor =
 * sqrt(1 + ln(n_ctx / orig) / ln(orig)). */
static const struct {
    const char *shape;
    uint32_t n_ctx_orig;
} longrope_shapes[] = {{"tiny-phi3-128k", 64}};

static uint32_t longrope_orig(const synth_shape *sh)
{
    for (size_t i = 0; i < FORGE_ARRAY_LEN(longrope_shapes); i++)
        if (!strcmp(longrope_shapes[i].shape, sh->name)) return longrope_shapes[i].n_ctx_orig;
    return 0;
}

int synth_shape_count(void)
{
    return (int)FORGE_ARRAY_LEN(shapes);
}

const synth_shape *synth_shape_at(int i)
{
    return i >= 0 && i < synth_shape_count() ? &shapes[i] : NULL;
}

const synth_shape *synth_shape_find(const char *name)
{
    for (int i = 0; name && i < synth_shape_count(); i++)
        if (!strcmp(shapes[i].name, name)) return &shapes[i];
    return NULL;
}

/* ---- random numbers ---------------------------------------------------------------------- */

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Approximately N(0, 1): the sum of four 16-bit uniforms (Irwin-Hall, variance matched), offset
 * by half a step so that it is never exactly 0. Cheap enough for 8e9 values. */
static float rand_normal(uint64_t *s)
{
    uint64_t r = splitmix64(s);
    int64_t sum = (int64_t)(r & 0xffff) + (int64_t)((r >> 16) & 0xffff) +
                  (int64_t)((r >> 32) & 0xffff) + (int64_t)(r >> 48);
    /* mean 2*65535, variance 4 * (65536^2 - 1) / 12 */
    const float inv_sd = 1.0f / 37837.2f;
    return ((float)(sum - 131070) + 0.5f) * inv_sd;
}

/* ---- tensors ----------------------------------------------------------------------------- */

enum fill_kind { FILL_WEIGHT, FILL_NORM, FILL_BIAS };

struct synth_tensor {
    enum fill_kind kind;
    uint64_t rng;
    float std;
};

struct synth_state {
    float std; /* the shape's weight std (0: SYNTH_STD) */
    struct synth_tensor *t;
    int64_t n, cap;
    float *row; /* scratch: one row of floats */
    int64_t row_cap;
};

static int add_tensor3(gguf_writer *w, struct synth_state *st, const char *name, int type,
                       enum fill_kind kind, int64_t ne0, int64_t ne1, int64_t ne2, float std,
                       uint64_t seed, synth_result *res, forge_err *err)
{
    int64_t ne[3] = {ne0, ne1, ne2};
    if (type != GGML_TYPE_F32 && type != GGML_TYPE_F16 && type != GGML_TYPE_BF16 &&
        ne0 % ggml_type_block_size(type) != 0) {
        type = GGML_TYPE_F16; /* llama.cpp's fallback for rows that do not fill whole blocks */
        res->n_fallback++;
    }
    int rc = gguf_writer_add_tensor(w, name, (ggml_type)type, ne2 > 1 ? 3 : ne1 > 1 ? 2 : 1, ne,
                                    err);
    if (rc) return rc;
    if (st->n == st->cap) {
        int64_t cap = st->cap ? st->cap * 2 : 64;
        struct synth_tensor *t = realloc(st->t, (size_t)cap * sizeof *t);
        if (!t) return forge_err_set(err, FORGE_E_NOMEM, "synth: out of memory");
        st->t = t;
        st->cap = cap;
    }
    uint64_t s = seed ^ (0xa0761d6478bd642full * (uint64_t)(st->n + 1));
    st->t[st->n].kind = kind;
    st->t[st->n].rng = splitmix64(&s);
    st->t[st->n].std = std > 0 ? std : SYNTH_STD;
    st->n++;
    if (ne0 > st->row_cap) st->row_cap = ne0;
    res->n_tensors++;
    res->n_params += ne0 * ne1 * ne2;
    return FORGE_OK;
}

static int add_tensor(gguf_writer *w, struct synth_state *st, const char *name, int type,
                      enum fill_kind kind, int64_t ne0, int64_t ne1, uint64_t seed,
                      synth_result *res, forge_err *err)
{
    return add_tensor3(w, st, name, type, kind, ne0, ne1, 1, st->std, seed, res, err);
}

static int fill(void *user, int64_t index, const gguf_tensor_info *info, int64_t row0,
                int64_t n_rows, void *dst, forge_err *err)
{
    struct synth_state *st = user;
    struct synth_tensor *t = &st->t[index];
    int64_t ne0 = info->ne[0];
    size_t row_bytes = ggml_row_size(info->type, ne0);
    uint8_t *out = dst;
    (void)row0; /* rows arrive in order: the tensor's RNG stream just continues */
    for (int64_t r = 0; r < n_rows; r++, out += row_bytes) {
        float *x = st->row;
        for (int64_t i = 0; i < ne0; i++) {
            float v = rand_normal(&t->rng) * t->std;
            x[i] = t->kind == FILL_NORM ? 1.0f + v : v;
        }
        switch (info->type) {
        case GGML_TYPE_F32: memcpy(out, x, (size_t)ne0 * sizeof *x); break;
        case GGML_TYPE_F16:
            for (int64_t i = 0; i < ne0; i++) {
                uint16_t h = forge_f32_to_fp16(x[i]);
                memcpy(out + 2 * i, &h, 2);
            }
            break;
        case GGML_TYPE_BF16:
            for (int64_t i = 0; i < ne0; i++) {
                uint16_t h = forge_f32_to_bf16(x[i]);
                memcpy(out + 2 * i, &h, 2);
            }
            break;
        case GGML_TYPE_Q8_0: kern_quantize_row_q8_0(x, out, ne0); break;
        case GGML_TYPE_Q4_0: kern_quantize_row_q4_0(x, out, ne0); break;
        default:
            return forge_err_set(err, FORGE_E_INTERNAL, "synth: cannot fill type %s",
                                 ggml_type_name(info->type));
        }
    }
    return FORGE_OK;
}

/* ---- vocabulary -------------------------------------------------------------------------- */

/* A self-contained SentencePiece-style byte vocabulary: <unk>, <s>, </s>, the 256 byte tokens
 * <0x00>..<0xFF> (byte fallback covers any text), then "<unused_N>" fillers up to n_vocab. */
static int builtin_vocab(gguf_writer *w, int64_t n_vocab, forge_err *err)
{
    int rc = FORGE_OK;
    gguf_str *toks = calloc((size_t)n_vocab, sizeof *toks);
    char *names = malloc((size_t)n_vocab * 24);
    float *scores = calloc((size_t)n_vocab, sizeof *scores);
    int32_t *types = calloc((size_t)n_vocab, sizeof *types);
    if (!toks || !names || !scores || !types) {
        rc = forge_err_set(err, FORGE_E_NOMEM, "synth: out of memory for the vocabulary");
        goto done;
    }
    for (int64_t i = 0; i < n_vocab; i++) {
        char *s = names + i * 24;
        int len;
        if (i == 0) len = snprintf(s, 24, "<unk>"), types[i] = 2;
        else if (i == 1) len = snprintf(s, 24, "<s>"), types[i] = 3;
        else if (i == 2) len = snprintf(s, 24, "</s>"), types[i] = 3;
        else if (i < 259) len = snprintf(s, 24, "<0x%02X>", (unsigned)(i - 3)), types[i] = 6;
        else len = snprintf(s, 24, "<unused_%lld>", (long long)(i - 259)), types[i] = 5;
        toks[i].data = s;
        toks[i].len = (uint64_t)len;
        scores[i] = i < 259 ? 0.0f : -(float)(i - 259);
    }
    if ((rc = gguf_writer_set_str(w, "tokenizer.ggml.model", "llama", err)) ||
        (rc = gguf_writer_set_str(w, "tokenizer.ggml.pre", "default", err)) ||
        (rc = gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", toks, (uint64_t)n_vocab, err)) ||
        (rc = gguf_writer_set_arr(w, "tokenizer.ggml.scores", GGUF_TYPE_FLOAT32, scores,
                                  (uint64_t)n_vocab, err)) ||
        (rc = gguf_writer_set_arr(w, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, types,
                                  (uint64_t)n_vocab, err)) ||
        (rc = gguf_writer_set_u32(w, "tokenizer.ggml.unknown_token_id", 0, err)) ||
        (rc = gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", 1, err)) ||
        (rc = gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", 2, err)) ||
        (rc = gguf_writer_set_bool(w, "tokenizer.ggml.add_bos_token", true, err)) ||
        (rc = gguf_writer_set_bool(w, "tokenizer.ggml.add_eos_token", false, err)))
        goto done;
done:
    free(toks);
    free(names);
    free(scores);
    free(types);
    return rc;
}

static int file_type_of(int type)
{
    switch (type) {
    case GGML_TYPE_F32: return 0;  /* LLAMA_FTYPE_ALL_F32 */
    case GGML_TYPE_F16: return 1;  /* MOSTLY_F16 */
    case GGML_TYPE_Q4_0: return 2; /* MOSTLY_Q4_0 */
    case GGML_TYPE_Q8_0: return 7; /* MOSTLY_Q8_0 */
    case GGML_TYPE_BF16: return 32; /* MOSTLY_BF16 */
    default: return -1;
    }
}

/* ---- the model --------------------------------------------------------------------------- */

int synth_write(const synth_opts *o, synth_result *result, forge_err *err)
{
    int rc = FORGE_OK;
    gguf_writer *w = NULL;
    gguf_ctx *vocab = NULL;
    struct synth_state st = {0};
    synth_result res = {0};
    const synth_shape *sh = synth_shape_find(o->shape);
    char key[160], name[96];

    if (!sh) return forge_err_set(err, FORGE_E_INVALID, "synth: unknown shape '%s'", o->shape ? o->shape : "(null)");
    if (file_type_of(o->type) < 0)
        return forge_err_set(err, FORGE_E_UNSUPPORTED,
                             "synth: type %s is not supported (F32, F16, BF16, Q8_0, Q4_0)",
                             ggml_type_name(o->type));
    if (!o->out_path) return forge_err_set(err, FORGE_E_INVALID, "synth: no output path");

    int64_t n_vocab = sh->n_vocab;
    if (o->vocab_from) {
        gguf_type et;
        uint64_t n;
        if ((rc = gguf_open(o->vocab_from, &vocab, err))) goto done;
        if ((rc = gguf_get_arr(vocab, "tokenizer.ggml.tokens", &et, &n, err))) goto done;
        if (et != GGUF_TYPE_STRING || n == 0 || n > INT32_MAX) {
            rc = forge_err_set(err, FORGE_E_FORMAT, "%s: tokenizer.ggml.tokens is not a usable token list",
                               o->vocab_from);
            goto done;
        }
        if (n_vocab && (int64_t)n != n_vocab) {
            rc = forge_err_set(err, FORGE_E_INVALID,
                               "synth: %s has %llu tokens but shape '%s' needs %lld; use a vocab "
                               "of that size, no --vocab-from, or --shape tiny",
                               o->vocab_from, (unsigned long long)n, sh->name, (long long)n_vocab);
            goto done;
        }
        n_vocab = (int64_t)n;
    }
    if (!n_vocab) n_vocab = SYNTH_DEFAULT_VOCAB;

    const char *a = sh->arch;
    int64_t hd = sh->head_dim ? sh->head_dim : sh->dim / sh->n_heads;
    int64_t q_dim = sh->n_heads * hd, kv_dim = sh->n_kv_heads * hd;
    if ((rc = gguf_writer_create(&w, err))) goto done;
#define SET(call)                                                                                  \
    do {                                                                                           \
        if ((rc = (call))) goto done;                                                              \
    } while (0)
#define ARCH_KEY(suffix) (snprintf(key, sizeof key, "%s.%s", a, suffix), key)
    snprintf(name, sizeof name, "forge-synth %s", sh->name);
    SET(gguf_writer_set_str(w, "general.architecture", a, err));
    SET(gguf_writer_set_str(w, "general.name", name, err));
    SET(gguf_writer_set_u32(w, "general.file_type", (uint32_t)file_type_of(o->type), err));
    if (o->type == GGML_TYPE_Q8_0 || o->type == GGML_TYPE_Q4_0)
        SET(gguf_writer_set_u32(w, "general.quantization_version", 2, err));
    SET(gguf_writer_set_u32(w, ARCH_KEY("vocab_size"), (uint32_t)n_vocab, err));
    SET(gguf_writer_set_u32(w, ARCH_KEY("context_length"), sh->n_ctx, err));
    SET(gguf_writer_set_u32(w, ARCH_KEY("embedding_length"), (uint32_t)sh->dim, err));
    SET(gguf_writer_set_u32(w, ARCH_KEY("block_count"), (uint32_t)sh->n_layers, err));
    SET(gguf_writer_set_u32(w, ARCH_KEY("feed_forward_length"), (uint32_t)sh->ffn, err));
    SET(gguf_writer_set_u32(w, ARCH_KEY("attention.head_count"), (uint32_t)sh->n_heads, err));
    SET(gguf_writer_set_u32(w, ARCH_KEY("attention.head_count_kv"), (uint32_t)sh->n_kv_heads, err));
    SET(gguf_writer_set_f32(w, ARCH_KEY("rope.freq_base"), sh->rope_base, err));
    SET(gguf_writer_set_f32(w, ARCH_KEY("attention.layer_norm_rms_epsilon"), sh->rms_eps, err));
    const struct synth_family *fm = &sh->fam;
    SET(gguf_writer_set_u32(w, ARCH_KEY("rope.dimension_count"),
                            (uint32_t)(fm->n_rot ? fm->n_rot : hd), err));
    if (fm->n_expert) {
        SET(gguf_writer_set_u32(w, ARCH_KEY("expert_count"), (uint32_t)fm->n_expert, err));
        SET(gguf_writer_set_u32(w, ARCH_KEY("expert_used_count"), (uint32_t)fm->n_expert_used,
                                err));
        if (strcmp(a, "llama"))
            SET(gguf_writer_set_u32(w, ARCH_KEY("expert_feed_forward_length"),
                                    (uint32_t)fm->ffn_exp, err));
    }
    if (fm->sliding_window)
        SET(gguf_writer_set_u32(w, ARCH_KEY("attention.sliding_window"), fm->sliding_window,
                                err));
    if (fm->attn_softcap)
        SET(gguf_writer_set_f32(w, ARCH_KEY("attn_logit_softcapping"), fm->attn_softcap, err));
    if (fm->final_softcap)
        SET(gguf_writer_set_f32(w, ARCH_KEY("final_logit_softcapping"), fm->final_softcap, err));
    const uint32_t lr_orig = longrope_orig(sh);
    if (lr_orig) {
        SET(gguf_writer_set_u32(w, ARCH_KEY("rope.scaling.original_context_length"), lr_orig,
                                err));
        SET(gguf_writer_set_f32(
            w, ARCH_KEY("rope.scaling.attn_factor"),
            sqrtf(1.0f + logf((float)sh->n_ctx / (float)lr_orig) / logf((float)lr_orig)), err));
    }
    if (sh->head_dim) {
        SET(gguf_writer_set_u32(w, ARCH_KEY("attention.key_length"), (uint32_t)hd, err));
        SET(gguf_writer_set_u32(w, ARCH_KEY("attention.value_length"), (uint32_t)hd, err));
    }
    if (vocab) SET(gguf_writer_copy_kvs(w, vocab, "tokenizer.", NULL, err));
    else SET(builtin_vocab(w, n_vocab, err));

    /* tensors, in llama.cpp's names and GGUF ne order (ne0 = input dimension) */
    int wt = o->type;
    uint64_t seed = o->seed;
    st.std = sh->fam.std;
    SET(add_tensor(w, &st, "token_embd.weight", wt, FILL_WEIGHT, sh->dim, n_vocab, seed, &res, err));
    SET(add_tensor(w, &st, "output_norm.weight", GGML_TYPE_F32, FILL_NORM, sh->dim, 1, seed, &res, err));
    if (!sh->tied)
        SET(add_tensor(w, &st, "output.weight", wt, FILL_WEIGHT, sh->dim, n_vocab, seed, &res, err));
    if (lr_orig) {
        const int64_t n_pairs = (fm->n_rot ? fm->n_rot : hd) / 2;
        SET(add_tensor(w, &st, "rope_factors_long.weight", GGML_TYPE_F32, FILL_NORM, n_pairs, 1,
                       seed, &res, err));
        SET(add_tensor(w, &st, "rope_factors_short.weight", GGML_TYPE_F32, FILL_NORM, n_pairs, 1,
                       seed, &res, err));
    }
    const bool fqkv = fm->fused_qkv, fup = fm->fused_up, moe = fm->n_expert > 0;
    const int64_t fe = moe ? (fm->ffn_exp ? fm->ffn_exp : sh->ffn) : 0, ne = fm->n_expert;
    for (int64_t l = 0; l < sh->n_layers; l++) {
        struct { const char *n; int type; enum fill_kind k; int64_t ne0, ne1, ne2; bool on; } ts[] = {
            {"attn_norm.weight", GGML_TYPE_F32, FILL_NORM, sh->dim, 1, 1, true},
            {"attn_qkv.weight", wt, FILL_WEIGHT, sh->dim, q_dim + 2 * kv_dim, 1, fqkv},
            {"attn_qkv.bias", GGML_TYPE_F32, FILL_BIAS, q_dim + 2 * kv_dim, 1, 1, fqkv && sh->qkv_bias},
            {"attn_q.weight", wt, FILL_WEIGHT, sh->dim, q_dim, 1, !fqkv},
            {"attn_k.weight", wt, FILL_WEIGHT, sh->dim, kv_dim, 1, !fqkv},
            {"attn_v.weight", wt, FILL_WEIGHT, sh->dim, kv_dim, 1, !fqkv},
            {"attn_q.bias", GGML_TYPE_F32, FILL_BIAS, q_dim, 1, 1, !fqkv && sh->qkv_bias},
            {"attn_k.bias", GGML_TYPE_F32, FILL_BIAS, kv_dim, 1, 1, !fqkv && sh->qkv_bias},
            {"attn_v.bias", GGML_TYPE_F32, FILL_BIAS, kv_dim, 1, 1, !fqkv && sh->qkv_bias},
            {"attn_q_norm.weight", GGML_TYPE_F32, FILL_NORM, hd, 1, 1, sh->qk_norm},
            {"attn_k_norm.weight", GGML_TYPE_F32, FILL_NORM, hd, 1, 1, sh->qk_norm},
            {"attn_output.weight", wt, FILL_WEIGHT, q_dim, sh->dim, 1, true},
            {"post_attention_norm.weight", GGML_TYPE_F32, FILL_NORM, sh->dim, 1, 1, fm->post_norms},
            {"ffn_norm.weight", GGML_TYPE_F32, FILL_NORM, sh->dim, 1, 1, true},
            {"ffn_gate.weight", wt, FILL_WEIGHT, sh->dim, sh->ffn, 1, !moe && !fup},
            {"ffn_up.weight", wt, FILL_WEIGHT, sh->dim, fup ? 2 * sh->ffn : sh->ffn, 1, !moe},
            {"ffn_down.weight", wt, FILL_WEIGHT, sh->ffn, sh->dim, 1, !moe},
            {"ffn_gate_inp.weight", GGML_TYPE_F32, FILL_WEIGHT, sh->dim, ne, 1, moe},
            {"ffn_gate_exps.weight", wt, FILL_WEIGHT, sh->dim, fe, ne, moe},
            {"ffn_up_exps.weight", wt, FILL_WEIGHT, sh->dim, fe, ne, moe},
            {"ffn_down_exps.weight", wt, FILL_WEIGHT, fe, sh->dim, ne, moe},
            {"post_ffw_norm.weight", GGML_TYPE_F32, FILL_NORM, sh->dim, 1, 1, fm->post_norms},
        };
        for (size_t i = 0; i < FORGE_ARRAY_LEN(ts); i++) {
            if (!ts[i].on) continue;
            snprintf(name, sizeof name, "blk.%lld.%s", (long long)l, ts[i].n);
            SET(add_tensor3(w, &st, name, ts[i].type, ts[i].k, ts[i].ne0, ts[i].ne1, ts[i].ne2,
                            fm->std, seed, &res, err));
        }
    }
#undef SET
#undef ARCH_KEY
    st.row = malloc((size_t)st.row_cap * sizeof *st.row);
    if (!st.row) {
        rc = forge_err_set(err, FORGE_E_NOMEM, "synth: out of memory");
        goto done;
    }
    if ((rc = gguf_writer_write(w, o->out_path, fill, &st, 4u << 20, err))) goto done;
    res.n_vocab = n_vocab;
    if (result) *result = res;
done:
    free(st.row);
    free(st.t);
    gguf_writer_free(w);
    gguf_close(vocab);
    return rc;
}
