/* backend_cpu.c - the CPU implementation of the backend interface (src/backend/backend.h).
 * Owns activation buffers (plain malloc'd floats), the KV cache (F32 or F16, contiguous or
 * paged: one attention worker reads both, the contiguous cache as the identity block table) and
 * a persistent thread pool. Matmuls by weights go to kern_matmul (src/cpu/kernels.h);
 * attention is threaded over (token, head) pairs, or (token, KV head) with all its query heads
 * on the AVX-512 path (same bits). Numerics follow ggml's CPU backend so results
 * track llama.cpp: RMSNorm sums squares in double, RoPE builds theta like ggml_rope_cache_init,
 * softmax is in float with max subtraction and a double sum, and with an F16 cache the query and
 * the softmax probabilities are rounded to fp16 before their dot products (ggml converts src1 to
 * the F16 vec_dot type). This file must not know about model architectures. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "backend/backend.h"
#include "core/fp16.h"
#include "core/util.h"
#include "cpu/attn_exp.h"
#include "cpu/backend_cpu.h"
#include "cpu/kern_impl.h"
#include "cpu/kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

struct be_kv {
    int n_layer, n_ctx, kv_dim, type; /* type: FORGE_KV_F32 / F16 / Q8_0 */
    size_t row_bytes;                 /* one row of kv_dim values in that type */
    size_t bytes;                     /* of k, and of v */
    void *k, *v;                      /* [n_layer][n_ctx][row_bytes] */
};

/* Q8_0 rows: blocks of 32 values, an fp16 scale then 32 int8 (ggml's block_q8_0). */
#define KV_QK 32
#define KV_Q8_BYTES 34

static size_t kv_row_bytes(int type, int kv_dim)
{
    return type == FORGE_KV_Q8_0 ? (size_t)kv_dim / KV_QK * KV_Q8_BYTES
                                 : (size_t)kv_dim * (type == FORGE_KV_F16 ? 2 : 4);
}

/* The CPU's load-time copies of one model's weights (backend.h: be_wshare): for each weight whose
 * kernel on the current ISA reads a repacked layout (kernels.h: kern_repack_layout; Q4_0 on
 * AVX-512 VNNI and AVX2), a copy of its whole row groups in that layout; nothing for the others,
 * whose mapping is read as it is. The registry's list is shared with the GPU backend, whose
 * entries start with the same two members: the key dev is -1 here, never a GPU's index. Reference
 * counted like the GPU's sets: owned jointly by the CPU backends of the model's contexts that
 * acquired it, guarded by the registry's lock; the last release frees it (CPU ops are synchronous:
 * no holder's work is pending then). */
#define CPU_WSET_DEV (-1)

typedef struct cpu_packed {
    void *R;           /* the copy (in the set's region, 64-byte aligned), or NULL */
    int layout;        /* its KERN_LAYOUT_* */
    int type;          /* the weight's ggml_type, shape and host bytes it was made from */
    int64_t ne0, ne1;
    const uint8_t *src;
} cpu_packed;

struct be_wset {
    be_wset *next;
    int dev; /* CPU_WSET_DEV */
    int refs;
    int n;
    cpu_packed *p; /* n, by be_weight.slot */
    void *mem;     /* the region holding every copy (owned) */
};

typedef struct cpu_backend {
    backend base;
    be_wshare *share; /* the model's registry, while wset is held */
    be_wset *wset;    /* the weight set this backend holds a reference on, or NULL */
    kern_pool *pool;
    int n_threads;
    bool f32_math;
    float *scratch; /* per-thread scratch for attention / f32 matmul */
    size_t scratch_per_thread;
    float *xround; /* activations rounded to the weight's type (fallback matmul) */
    size_t xround_n;
    int32_t *row_seq; /* attention: the sequence of each row of the batch */
    int row_seq_n;
} cpu_backend;

/* Below this many multiply-adds an op runs on the calling thread: waking the pool costs more. */
#define CPU_MIN_PARALLEL_WORK (1 << 16)

static cpu_backend *cpu(backend *be)
{
    return (cpu_backend *)be;
}

/* Grow the per-thread scratch to at least n floats per thread. */
static int scratch_reserve(cpu_backend *c, size_t n, forge_err *err)
{
    if (n <= c->scratch_per_thread) return FORGE_OK;
    float *p = realloc(c->scratch, n * (size_t)c->n_threads * sizeof(float));
    if (!p) return forge_err_set(err, FORGE_E_NOMEM, "cpu backend: out of memory for scratch");
    c->scratch = p;
    c->scratch_per_thread = n;
    return FORGE_OK;
}

static int check_buf(const be_buf *b, int64_t need, const char *what, forge_err *err)
{
    if (!b || need < 0 || b->n < need)
        return forge_err_set(err, FORGE_E_INTERNAL,
                             "cpu backend: %s buffer holds %lld floats, op needs %lld", what,
                             b ? (long long)b->n : -1LL, (long long)need);
    return FORGE_OK;
}

/* ---- buffers ---------------------------------------------------------------------------- */

static int cpu_buf_create(backend *be, int64_t n, be_buf **out, forge_err *err)
{
    (void)be;
    *out = NULL;
    be_buf *b = calloc(1, sizeof *b);
    if (!b || n < 0) goto nomem;
    b->data = calloc((size_t)(n > 0 ? n : 1), sizeof(float));
    if (!b->data) goto nomem;
    b->n = n;
    *out = b;
    return FORGE_OK;
nomem:
    free(b);
    return forge_err_set(err, FORGE_E_NOMEM, "cpu backend: cannot allocate %lld floats",
                         (long long)n);
}

static void cpu_buf_free(backend *be, be_buf *b)
{
    (void)be;
    if (!b) return;
    free(b->data);
    free(b);
}

static int cpu_buf_read(backend *be, const be_buf *src, int64_t off, int64_t n, float *dst,
                        forge_err *err)
{
    (void)be;
    if (off < 0 || check_buf(src, off + n, "read", err)) return FORGE_E_INTERNAL;
    memcpy(dst, src->data + off, (size_t)n * sizeof(float));
    return FORGE_OK;
}

static float *cpu_buf_data(backend *be, be_buf *b)
{
    (void)be;
    return b->data;
}

/* ---- KV cache --------------------------------------------------------------------------- */

/* Zeroed memory for a cache of bytes: a private anonymous mapping (pages come on first write)
 * in 2 MB huge pages where the system gives them on request. Attention walks each KV head's
 * slice of every row, a stride apart: with 4 KB pages nearly every few rows is a TLB miss (at
 * 4096 positions of TinyLlama, decode with an F16 cache went from ~26 to ~46 tok/s). */
static void *kv_alloc(size_t bytes)
{
#if defined(__linux__)
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
#if defined(MADV_HUGEPAGE)
    if (bytes >= ((size_t)2 << 20)) (void)madvise(p, bytes, MADV_HUGEPAGE); /* a hint */
#endif
    return p;
#else
    return calloc(1, bytes);
#endif
}

static void kv_free_mem(void *p, size_t bytes)
{
    if (!p) return;
#if defined(__linux__)
    munmap(p, bytes);
#else
    (void)bytes;
    free(p);
#endif
}

static int cpu_kv_create(backend *be, int n_layer, int n_ctx, int kv_dim, int kv_type, be_kv **out,
                         forge_err *err)
{
    (void)be;
    *out = NULL;
    uint64_t n;
    if (kv_type != FORGE_KV_F32 && kv_type != FORGE_KV_F16 && kv_type != FORGE_KV_Q8_0)
        return forge_err_set(err, FORGE_E_INVALID,
                             "KV cache type %d is not f32 (0), f16 (1) or q8_0 (2)", kv_type);
    if (kv_type == FORGE_KV_Q8_0 && kv_dim % KV_QK)
        return forge_err_set(err, FORGE_E_UNSUPPORTED,
                             "a q8_0 KV cache needs rows of a multiple of %d values, this model's "
                             "are %d",
                             KV_QK, kv_dim);
    if (n_layer <= 0 || n_ctx <= 0 || kv_dim <= 0 ||
        !forge_mul_u64((uint64_t)n_layer * (uint64_t)n_ctx, kv_row_bytes(kv_type, kv_dim), &n) ||
        n > SIZE_MAX)
        return forge_err_set(err, FORGE_E_INVALID,
                             "KV cache of %d layers x %d positions x %d is too large", n_layer,
                             n_ctx, kv_dim);
    be_kv *kv = calloc(1, sizeof *kv);
    if (!kv) goto nomem;
    kv->n_layer = n_layer;
    kv->n_ctx = n_ctx;
    kv->kv_dim = kv_dim;
    kv->type = kv_type;
    kv->row_bytes = kv_row_bytes(kv_type, kv_dim);
    kv->bytes = (size_t)n;
    kv->k = kv_alloc(kv->bytes);
    kv->v = kv_alloc(kv->bytes);
    if (!kv->k || !kv->v) goto nomem;
    *out = kv;
    return FORGE_OK;
nomem:
    if (kv) {
        kv_free_mem(kv->k, kv->bytes);
        kv_free_mem(kv->v, kv->bytes);
        free(kv);
    }
    return forge_err_set(err, FORGE_E_NOMEM, "cannot allocate a KV cache of 2 x %llu bytes",
                         (unsigned long long)n);
}

static void cpu_kv_free(backend *be, be_kv *kv)
{
    (void)be;
    if (!kv) return;
    kv_free_mem(kv->k, kv->bytes);
    kv_free_mem(kv->v, kv->bytes);
    free(kv);
}

/* ---- elementwise ops -------------------------------------------------------------------- */

static int cpu_get_rows(backend *be, be_buf *out, const be_weight *table, const int32_t *ids, int n,
                        forge_err *err)
{
    (void)be;
    size_t row_bytes = ggml_row_size(table->type, table->ne0);
    if (check_buf(out, (int64_t)n * table->ne0, "get_rows", err)) return FORGE_E_INTERNAL;
    for (int t = 0; t < n; t++) {
        if (ids[t] < 0 || ids[t] >= table->ne1)
            return forge_err_set(err, FORGE_E_RANGE, "token id %d is outside %s (%lld rows)",
                                 ids[t], table->name, (long long)table->ne1);
        const uint8_t *row = (const uint8_t *)table->data + (size_t)ids[t] * row_bytes;
        int rc = forge_dequantize(table->type, row, out->data + (int64_t)t * table->ne0, table->ne0,
                                  err);
        if (rc) return rc;
    }
    return FORGE_OK;
}

static int cpu_rms_norm(backend *be, be_buf *out, const be_buf *x, const be_weight *w,
                        int64_t n_rows, int64_t dim, float eps, forge_err *err)
{
    (void)be;
    if (check_buf(x, n_rows * dim, "rms_norm in", err) ||
        check_buf(out, n_rows * dim, "rms_norm out", err))
        return FORGE_E_INTERNAL;
    if (w->type != GGML_TYPE_F32 || w->ne0 != dim)
        return forge_err_set(err, FORGE_E_INTERNAL, "rms_norm: weight %s is not F32[%lld]", w->name,
                             (long long)dim);
    const float *wd = w->data;
    for (int64_t r = 0; r < n_rows; r++) {
        const float *xr = x->data + r * dim;
        float *yr = out->data + r * dim;
        double sum = 0.0;
        for (int64_t i = 0; i < dim; i++)
            sum += (double)(xr[i] * xr[i]);
        double mean = sum / (double)dim;
        const float scale = 1.0f / sqrtf((float)(mean + (double)eps));
        for (int64_t i = 0; i < dim; i++)
            yr[i] = xr[i] * scale;
        for (int64_t i = 0; i < dim; i++)
            yr[i] = yr[i] * wd[i];
    }
    return FORGE_OK;
}

static int cpu_add_bias(backend *be, be_buf *y, const be_weight *b, int n_tok, forge_err *err)
{
    (void)be;
    int64_t dim = b->ne0;
    if (b->type != GGML_TYPE_F32)
        return forge_err_set(err, FORGE_E_INTERNAL, "add_bias: %s is not F32", b->name);
    if (check_buf(y, n_tok * dim, "add_bias", err)) return FORGE_E_INTERNAL;
    const float *bd = b->data;
    for (int t = 0; t < n_tok; t++)
        for (int64_t i = 0; i < dim; i++)
            y->data[t * dim + i] += bd[i];
    return FORGE_OK;
}

static int cpu_swiglu(backend *be, be_buf *out, const be_buf *gate, const be_buf *up, int64_t n,
                      forge_err *err)
{
    (void)be;
    if (check_buf(out, n, "swiglu", err) || check_buf(gate, n, "swiglu", err) ||
        check_buf(up, n, "swiglu", err))
        return FORGE_E_INTERNAL;
    for (int64_t i = 0; i < n; i++) {
        float g = gate->data[i];
        out->data[i] = g / (1.0f + expf(-g)) * up->data[i];
    }
    return FORGE_OK;
}

/* GELU with the tanh approximation (HF's gelu_pytorch_tanh). By default as ggml's CPU backend
 * computes it (GGML_GELU_FP16: the input rounded to fp16, its GELU evaluated in float and
 * rounded to fp16 -- ggml's lookup table --, 0 below -10 and the identity above 10): bit for
 * bit what llama.cpp gives for the same input (Gemma's FFN); with f32_math in double, rounded
 * once (Hugging Face's float32 within an ulp or two). */
static float gelu_tanh_ggml(float x)
{
    if (x <= -10.0f) return 0.0f;
    if (x >= 10.0f) return x;
    const float xh = forge_fp16_to_f32(forge_f32_to_fp16(x));
    const float g =
        0.5f * xh * (1.0f + tanhf(0.79788456080286535587989211986876f * xh *
                                   (1.0f + 0.044715f * xh * xh)));
    return forge_fp16_to_f32(forge_f32_to_fp16(g));
}

static int cpu_geglu(backend *be, be_buf *out, const be_buf *gate, const be_buf *up, int64_t n,
                     forge_err *err)
{
    if (check_buf(out, n, "geglu", err) || check_buf(gate, n, "geglu", err) ||
        check_buf(up, n, "geglu", err))
        return FORGE_E_INTERNAL;
    if (!cpu(be)->f32_math) {
        for (int64_t i = 0; i < n; i++)
            out->data[i] = gelu_tanh_ggml(gate->data[i]) * up->data[i];
        return FORGE_OK;
    }
    const double c = 0.7978845608028654; /* sqrt(2 / pi) */
    for (int64_t i = 0; i < n; i++) {
        double g = gate->data[i];
        double gl = 0.5 * g * (1.0 + tanh(c * (g + 0.044715 * g * g * g)));
        out->data[i] = (float)gl * up->data[i];
    }
    return FORGE_OK;
}

static int cpu_scale(backend *be, be_buf *x, float s, int64_t n, forge_err *err)
{
    (void)be;
    if (check_buf(x, n, "scale", err)) return FORGE_E_INTERNAL;
    for (int64_t i = 0; i < n; i++)
        x->data[i] *= s;
    return FORGE_OK;
}

static int cpu_softcap(backend *be, be_buf *x, float cap, int64_t n, forge_err *err)
{
    (void)be;
    if (check_buf(x, n, "softcap", err)) return FORGE_E_INTERNAL;
    if (!(cap > 0.0f)) return forge_err_set(err, FORGE_E_INTERNAL, "softcap: cap %g", (double)cap);
    const float inv = 1.0f / cap; /* ggml: scale by 1/cap, tanh, scale by cap */
    for (int64_t i = 0; i < n; i++)
        x->data[i] = tanhf(x->data[i] * inv) * cap;
    return FORGE_OK;
}

static int cpu_add(backend *be, be_buf *x, const be_buf *y, int64_t n, forge_err *err)
{
    (void)be;
    if (check_buf(x, n, "add", err) || check_buf(y, n, "add", err)) return FORGE_E_INTERNAL;
    for (int64_t i = 0; i < n; i++)
        x->data[i] = y->data[i] + x->data[i];
    return FORGE_OK;
}

static int cpu_copy_rows(backend *be, be_buf *dst, int64_t dst_row, const be_buf *src,
                         int64_t src_row, int64_t n_rows, int64_t row_len, forge_err *err)
{
    (void)be;
    if (check_buf(src, (src_row + n_rows) * row_len, "copy_rows src", err) ||
        check_buf(dst, (dst_row + n_rows) * row_len, "copy_rows dst", err))
        return FORGE_E_INTERNAL;
    memmove(dst->data + dst_row * row_len, src->data + src_row * row_len, (size_t)(n_rows * row_len) * sizeof(float));
    return FORGE_OK;
}

/* ---- RoPE ------------------------------------------------------------------------------- */

static int cpu_rope(backend *be, be_buf *x, int n_head, int head_dim, const be_batch *bt,
                    const be_rope *rp, forge_err *err)
{
    cpu_backend *c = cpu(be);
    int n_rot = rp->n_rot;
    const int n_tok = bt->n_tok;
    if (check_buf(x, (int64_t)n_tok * n_head * head_dim, "rope", err)) return FORGE_E_INTERNAL;
    if (n_rot <= 0 || n_rot > head_dim || n_rot % 2)
        return forge_err_set(err, FORGE_E_INTERNAL, "rope: n_rot %d with head_dim %d", n_rot,
                             head_dim);
    if (scratch_reserve(c, (size_t)n_rot, err)) return FORGE_E_NOMEM;
    const float *ff = rp->freq_factors ? rp->freq_factors->data : NULL;
    float *cache = c->scratch; /* cos, sin pairs for one position */
    const float theta_scale = powf(rp->freq_base, -2.0f / (float)n_rot);
    float mscale = rp->attn_factor;
    if (rp->ext_factor != 0.0f) mscale *= 1.0f + 0.1f * logf(1.0f / rp->freq_scale);
    for (int t = 0; t < n_tok; t++) {
        float theta = (float)bt->pos[t];
        for (int i0 = 0; i0 < n_rot; i0 += 2) {
            float f = ff ? ff[i0 / 2] : 1.0f;
            float extrap = theta / f, th = rp->freq_scale * extrap;
            if (rp->ext_factor != 0.0f) { /* ggml's rope_yarn_ramp */
                float y = ((float)(i0 / 2) - rp->corr_dims[0]) /
                          fmaxf(0.001f, rp->corr_dims[1] - rp->corr_dims[0]);
                float ramp = (1.0f - fminf(1.0f, fmaxf(0.0f, y))) * rp->ext_factor;
                th = th * (1.0f - ramp) + extrap * ramp;
            }
            cache[i0] = cosf(th) * mscale;
            cache[i0 + 1] = sinf(th) * mscale;
            theta *= theta_scale;
        }
        for (int h = 0; h < n_head; h++) {
            float *v = x->data + ((int64_t)t * n_head + h) * head_dim;
            for (int i0 = 0; i0 < n_rot; i0 += 2) {
                int a = rp->mode == BE_ROPE_NEOX ? i0 / 2 : i0;
                int b = rp->mode == BE_ROPE_NEOX ? i0 / 2 + n_rot / 2 : i0 + 1;
                float x0 = v[a], x1 = v[b], cs = cache[i0], sn = cache[i0 + 1];
                v[a] = x0 * cs - x1 * sn;
                v[b] = x0 * sn + x1 * cs;
            }
        }
    }
    return FORGE_OK;
}

/* ---- attention -------------------------------------------------------------------------- */

struct attn_job {
    cpu_backend *c;
    float *out;
    const float *q;
    const be_kv *kv;
    const be_attn *a;
    const be_batch *bt;
    const int32_t *row_seq; /* [n_tok]: the sequence of each row */
    size_t n_scores;        /* scores per query head in the scratch (the longest row's n_kv) */
    int group;              /* query heads per work item (attn_group_size) */
};

/* the most query heads one work item of the grouped path holds */
#define ATTN_GROUP_MAX 16
/* the longest head the grouped path converts K rows of an F16 cache for, and dequantizes V rows
 * of a Q8_0 cache for, ATTN_VF_ROWS at a time (stack buffers) */
#define ATTN_KF_MAX 256
#define ATTN_VF_ROWS 16

/* Dot product of a cached row (F32 or F16) with a float vector; four partial sums, as SIMD
 * code would keep them. */
static float dot_row(const void *row, bool f16, const float *x, int n)
{
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    int i = 0;
    if (f16) {
        const uint16_t *h = row;
        for (; i + 4 <= n; i += 4) {
            s0 += forge_fp16_to_f32(h[i]) * x[i];
            s1 += forge_fp16_to_f32(h[i + 1]) * x[i + 1];
            s2 += forge_fp16_to_f32(h[i + 2]) * x[i + 2];
            s3 += forge_fp16_to_f32(h[i + 3]) * x[i + 3];
        }
        for (; i < n; i++)
            s0 += forge_fp16_to_f32(h[i]) * x[i];
    } else {
        const float *f = row;
        for (; i + 4 <= n; i += 4) {
            s0 += f[i] * x[i];
            s1 += f[i + 1] * x[i + 1];
            s2 += f[i + 2] * x[i + 2];
            s3 += f[i + 3] * x[i + 3];
        }
        for (; i < n; i++)
            s0 += f[i] * x[i];
    }
    return (s0 + s1) + (s2 + s3);
}

#if defined(__x86_64__)
/* x86 forms of dot_row and axpy_row (AVX2 + F16C, chosen when kern_isa_current() has them):
 * bit-identical to the scalar code. dot_row's four partial sums are the four lanes of one SSE
 * register (lane k sums elements k, k+4, ...; each step a rounded multiply then a rounded add,
 * no fma) combined as (s0 + s1) + (s2 + s3); four cache rows at a time so that their add chains
 * overlap. axpy_row is elementwise, so any width gives the scalar bits as long as each element
 * takes the rows in the same order. n % 4 == 0 here. */
#define TGT_ATTN __attribute__((target("avx2,fma,f16c")))

TGT_ATTN static inline __m128 attn_load4(const uint8_t *row, bool f16, int i)
{
    if (f16) return _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(const void *)(row + 2 * (size_t)i)));
    return _mm_loadu_ps((const float *)(const void *)(row + 4 * (size_t)i));
}

TGT_ATTN static inline float attn_hsum4(__m128 v)
{
    float l[4];
    _mm_storeu_ps(l, v);
    return (l[0] + l[1]) + (l[2] + l[3]);
}

/* out[r] = dot_row(rows + r * stride, f16, x, n) for r < 4 */
TGT_ATTN static void dot_rows4_x86(const uint8_t *rows, size_t stride, bool f16, const float *x,
                                   int n, float out[4])
{
    __m128 a0 = _mm_setzero_ps(), a1 = _mm_setzero_ps(), a2 = _mm_setzero_ps(), a3 = _mm_setzero_ps();
    for (int i = 0; i < n; i += 4) {
        __m128 xv = _mm_loadu_ps(x + i);
        a0 = _mm_add_ps(a0, _mm_mul_ps(attn_load4(rows, f16, i), xv));
        a1 = _mm_add_ps(a1, _mm_mul_ps(attn_load4(rows + stride, f16, i), xv));
        a2 = _mm_add_ps(a2, _mm_mul_ps(attn_load4(rows + 2 * stride, f16, i), xv));
        a3 = _mm_add_ps(a3, _mm_mul_ps(attn_load4(rows + 3 * stride, f16, i), xv));
    }
    out[0] = attn_hsum4(a0);
    out[1] = attn_hsum4(a1);
    out[2] = attn_hsum4(a2);
    out[3] = attn_hsum4(a3);
}

TGT_ATTN static float dot_row_x86(const uint8_t *row, bool f16, const float *x, int n)
{
    __m128 a = _mm_setzero_ps();
    for (int i = 0; i < n; i += 4)
        a = _mm_add_ps(a, _mm_mul_ps(attn_load4(row, f16, i), _mm_loadu_ps(x + i)));
    return attn_hsum4(a);
}

/* y += w[i] * row i for i in [i0, m) (rows stride bytes apart), each element's adds in the order
 * of i as axpy_row called for each row; y is kept in registers 64 floats at a time. */
TGT_ATTN static void axpy_rows_x86(float *y, const float *w, const uint8_t *rows, size_t stride,
                                   int i0, int m, bool f16, int n)
{
    int c = 0;
    for (; c + 64 <= n; c += 64) {
        __m256 acc[8];
        for (int k = 0; k < 8; k++)
            acc[k] = _mm256_loadu_ps(y + c + 8 * k);
        for (int i = i0; i < m; i++) {
            const __m256 wv = _mm256_set1_ps(w[i]);
            const uint8_t *row = rows + (size_t)i * stride;
            for (int k = 0; k < 8; k++) {
                const int e = c + 8 * k;
                __m256 r = f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(row + 2 * (size_t)e)))
                               : _mm256_loadu_ps((const float *)(const void *)(row + 4 * (size_t)e));
                acc[k] = _mm256_add_ps(acc[k], _mm256_mul_ps(wv, r));
            }
        }
        for (int k = 0; k < 8; k++)
            _mm256_storeu_ps(y + c + 8 * k, acc[k]);
    }
    for (; c < n; c += 4) {
        __m128 acc = _mm_loadu_ps(y + c);
        for (int i = i0; i < m; i++)
            acc = _mm_add_ps(acc, _mm_mul_ps(_mm_set1_ps(w[i]), attn_load4(rows + (size_t)i * stride, f16, c)));
        _mm_storeu_ps(y + c, acc);
    }
}
#endif

#if defined(__x86_64__)
/* dot_row_q8 and axpy_row_q8 below (AVX2): the same integer block sums (|k| times x with k's
 * sign, in pairs, then 32-bit sums: exact, Q8_0 values being in -127..127) and the same float
 * steps in the same order, so the same bits. */
TGT_ATTN static float dot_row_q8_x86(const uint8_t *row, const uint8_t *xq, int n)
{
    float sum = 0.0f;
    for (int b = 0; b < n / KV_QK; b++) {
        const uint8_t *rb = row + (size_t)b * KV_Q8_BYTES, *xb = xq + (size_t)b * KV_Q8_BYTES;
        const __m256i k = _mm256_loadu_si256((const __m256i *)(const void *)(rb + 2));
        const __m256i x = _mm256_loadu_si256((const __m256i *)(const void *)(xb + 2));
        const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(k, k), _mm256_sign_epi8(x, k));
        const __m256i p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
        __m128i q = _mm_add_epi32(_mm256_castsi256_si128(p32), _mm256_extracti128_si256(p32, 1));
        q = _mm_add_epi32(q, _mm_shuffle_epi32(q, _MM_SHUFFLE(1, 0, 3, 2)));
        q = _mm_add_epi32(q, _mm_shuffle_epi32(q, _MM_SHUFFLE(2, 3, 0, 1)));
        const int sumi = _mm_cvtsi128_si32(q);
        uint16_t dr, dx;
        memcpy(&dr, rb, 2);
        memcpy(&dx, xb, 2);
        sum += (float)sumi * (forge_fp16_to_f32(dr) * forge_fp16_to_f32(dx));
    }
    return sum;
}

TGT_ATTN static void axpy_row_q8_x86(float *y, float w, const uint8_t *row, int n)
{
    const __m256 wv = _mm256_set1_ps(w);
    for (int b = 0; b < n / KV_QK; b++) {
        const uint8_t *rb = row + (size_t)b * KV_Q8_BYTES;
        uint16_t dr;
        memcpy(&dr, rb, 2);
        const __m256 dv = _mm256_set1_ps(forge_fp16_to_f32(dr));
        for (int k = 0; k < KV_QK; k += 8) {
            const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)(rb + 2 + k)));
            const __m256 t = _mm256_mul_ps(wv, _mm256_mul_ps(dv, _mm256_cvtepi32_ps(q)));
            float *yk = y + b * KV_QK + k;
            _mm256_storeu_ps(yk, _mm256_add_ps(_mm256_loadu_ps(yk), t));
        }
    }
}
#endif

/* Dot product of a Q8_0 row slice (n / 32 blocks) with a query quantized to Q8_0 the same way
 * (ggml's vec_dot_q8_0_q8_0: an integer sum per block times both scales). */
static float dot_row_q8(const uint8_t *row, const uint8_t *xq, int n)
{
    float sum = 0.0f;
    for (int b = 0; b < n / KV_QK; b++) {
        const uint8_t *rb = row + (size_t)b * KV_Q8_BYTES, *xb = xq + (size_t)b * KV_Q8_BYTES;
        int sumi = 0;
        for (int i = 0; i < KV_QK; i++)
            sumi += (int)(int8_t)rb[2 + i] * (int)(int8_t)xb[2 + i];
        uint16_t dr, dx;
        memcpy(&dr, rb, 2);
        memcpy(&dx, xb, 2);
        sum += (float)sumi * (forge_fp16_to_f32(dr) * forge_fp16_to_f32(dx));
    }
    return sum;
}

/* y += w * dequantized Q8_0 row slice (n / 32 blocks) */
static void axpy_row_q8(float *y, float w, const uint8_t *row, int n)
{
    for (int b = 0; b < n / KV_QK; b++) {
        const uint8_t *rb = row + (size_t)b * KV_Q8_BYTES;
        uint16_t dr;
        memcpy(&dr, rb, 2);
        const float d = forge_fp16_to_f32(dr);
        for (int i = 0; i < KV_QK; i++)
            y[b * KV_QK + i] += w * (d * (float)(int8_t)rb[2 + i]);
    }
}

/* y += w * row (F32 or F16) */
static void axpy_row(float *y, float w, const void *row, bool f16, int n)
{
    if (f16) {
        const uint16_t *h = row;
        for (int i = 0; i < n; i++)
            y[i] += w * forge_fp16_to_f32(h[i]);
    } else {
        const float *f = row;
        for (int i = 0; i < n; i++)
            y[i] += w * f[i];
    }
}

#if defined(__x86_64__)
__attribute__((target("avx2"))) static int attn_exp_sub_avx2(float *s, int n, const float *m8)
{
    int i = 0;
    const __m256 m = _mm256_loadu_ps(m8);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(s + i, attn_exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), m)));
    return i;
}

__attribute__((target("avx512f"))) static int attn_exp_sub_avx512(float *s, int n, const float *m16)
{
    int i = 0;
    const __m512 m = _mm512_loadu_ps(m16);
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(s + i, attn_exp16(_mm512_sub_ps(_mm512_loadu_ps(s + i), m)));
    return i;
}
#endif

/* s[i] = attn_expf(s[i] - m[i % g]) for i < n, g (1, 2, 4 or 8, or any with the scalar code)
 * dividing 16: the SIMD forms where the CPU has them (the same bits). */
static void attn_exp_sub(float *s, int n, const float *m, int g)
{
    int i = 0;
#if defined(__x86_64__)
    if (16 % g == 0) {
        float pat[16];
        for (int k = 0; k < 16; k++)
            pat[k] = m[k % g];
        if (kern_isa_current() == KERN_ISA_AVX512)
            i = attn_exp_sub_avx512(s, n, pat);
        else if (kern_isa_current() == KERN_ISA_AVX2 && 8 % g == 0)
            i = attn_exp_sub_avx2(s, n, pat);
    }
#endif
    for (; i < n; i++)
        s[i] = attn_expf(s[i] - m[i % g]);
}

/* Softmax of one head's scores[0..n_kv) in place (scores before p_lo are hidden: weight 0),
 * max the largest visible score: float exp with max subtraction (attn_expf), a double sum, then
 * with an F16 cache the probabilities rounded to fp16 (ggml's vec_dot type for the V sums). */
static void attn_softmax(float *scores, int n_kv, int p_lo, float max, bool f16)
{
    double sum = 0.0;
    for (int p = 0; p < p_lo && p < n_kv; p++)
        scores[p] = 0.0f;
    if (p_lo < n_kv) attn_exp_sub(scores + p_lo, n_kv - p_lo, &max, 1);
    for (int p = 0; p < n_kv; p++)
        sum += (double)scores[p];
    const float inv = (float)(1.0 / sum);
    for (int p = 0; p < n_kv; p++) {
        scores[p] *= inv;
        if (f16) scores[p] = forge_fp16_to_f32(forge_f32_to_fp16(scores[p]));
    }
}

/* One (row t, query head h) pair: the reference path, and the one for caches, CPUs and GQA
 * ratios the grouped path below does not take. scr: n_scores floats for the scores, then
 * head_dim for the rounded query. */
static void attn_head(const struct attn_job *j, int t, int h, float *scr)
{
    const be_attn *a = j->a;
    const be_batch *bt = j->bt;
    const be_kv *kv = j->kv;
    const int hd = a->head_dim, gqa = a->n_head / a->n_head_kv;
    const int bs = bt->block_size;
    const bool f16 = kv->type == FORGE_KV_F16, q8 = kv->type == FORGE_KV_Q8_0;
    /* the x86 dot/axpy forms (same bits as the scalar ones) */
    const bool simd = hd % 4 == 0 &&
                      (kern_isa_current() == KERN_ISA_AVX2 || kern_isa_current() == KERN_ISA_AVX512);
    float *scores = scr;
    float *qh16 = scores + j->n_scores;
    const size_t row_bytes = kv->row_bytes;
    const uint8_t *kbase = (const uint8_t *)kv->k + (size_t)a->layer * kv->n_ctx * row_bytes;
    const uint8_t *vbase = (const uint8_t *)kv->v + (size_t)a->layer * kv->n_ctx * row_bytes;

    int kvh = h / gqa;
    int n_kv = bt->pos[t] + 1;
    const int32_t *table = bt->table + (size_t)j->row_seq[t] * bt->table_stride;
    const float *qh = j->q + ((int64_t)t * a->n_head + h) * hd;
    const size_t head_off = kv_row_bytes(kv->type, kvh * hd);
    /* ggml rounds the query to the cache's vec_dot type: fp16, or Q8_0 blocks */
    if (f16) {
        for (int d = 0; d < hd; d++)
            qh16[d] = forge_fp16_to_f32(forge_f32_to_fp16(qh[d]));
        qh = qh16;
    } else if (q8) {
        kern_quantize_row_q8_0(qh, qh16, hd);
    }
    /* a sliding window hides positions before p_lo (their weight is exactly 0) */
    const int p_lo = a->window > 0 && n_kv > a->window ? n_kv - a->window : 0;
    /* soft-capping as ggml does it: scale by 1/cap, tanh, scale by cap */
    const float inv_cap = a->softcap > 0.0f ? 1.0f / a->softcap : 0.0f;
    float max = -INFINITY;
    for (int p0 = 0, b = 0; p0 < n_kv; p0 += bs, b++) {
        const size_t r0 = (size_t)table[b] * (size_t)bs;
        const uint8_t *kr = kbase + r0 * row_bytes + head_off;
        const int m = n_kv - p0 < bs ? n_kv - p0 : bs;
        for (int i = 0; i < m; i++) {
            if (p0 + i < p_lo) {
                scores[p0 + i] = -INFINITY;
                continue;
            }
            const uint8_t *krow = kr + (size_t)i * row_bytes;
            float raw[4];
            int nr = 1;
#if defined(__x86_64__)
            if (simd && q8) {
                raw[0] = dot_row_q8_x86(krow, (const uint8_t *)qh16, hd);
            } else if (simd && i + 4 <= m) {
                dot_rows4_x86(krow, row_bytes, f16, qh, hd, raw);
                nr = 4;
            } else if (simd) {
                raw[0] = dot_row_x86(krow, f16, qh, hd);
            } else
#endif
                raw[0] = q8 ? dot_row_q8(krow, (const uint8_t *)qh16, hd) : dot_row(krow, f16, qh, hd);
            for (int r = 0; r < nr; r++) {
                float s = raw[r] * a->scale;
                if (a->softcap > 0.0f) s = tanhf(s * inv_cap) * a->softcap;
                scores[p0 + i + r] = s;
                if (s > max) max = s;
            }
            i += nr - 1;
        }
    }
    attn_softmax(scores, n_kv, p_lo, max, f16);
    float *o = j->out + ((int64_t)t * a->n_head + h) * hd;
    memset(o, 0, (size_t)hd * sizeof *o);
    for (int p0 = 0, b = 0; p0 < n_kv; p0 += bs, b++) {
        const size_t r0 = (size_t)table[b] * (size_t)bs;
        const uint8_t *vr = vbase + r0 * row_bytes + head_off;
        const int m = n_kv - p0 < bs ? n_kv - p0 : bs;
#if defined(__x86_64__)
        if (simd && !q8) {
            const int i0 = p_lo > p0 ? (p_lo - p0 < m ? p_lo - p0 : m) : 0;
            axpy_rows_x86(o, scores + p0, vr, row_bytes, i0, m, f16, hd);
            continue;
        }
#endif
        for (int i = 0; i < m; i++) {
            if (p0 + i < p_lo) continue;
#if defined(__x86_64__)
            if (simd && q8) {
                axpy_row_q8_x86(o, scores[p0 + i], vr + (size_t)i * row_bytes, hd);
                continue;
            }
#endif
            if (q8)
                axpy_row_q8(o, scores[p0 + i], vr + (size_t)i * row_bytes, hd);
            else
                axpy_row(o, scores[p0 + i], vr + (size_t)i * row_bytes, f16, hd);
        }
    }
}

#if defined(__x86_64__)
/* ---- grouped path (AVX-512): the gqa query heads of one KV head of one row together ----------
 * Every K/V row of the KV head is loaded (and converted from fp16) once for the group instead of
 * once per head, and the Q.K sums run 16 lanes wide: four heads' four-lane accumulators of
 * dot_rows4_x86 sit in the four 128-bit lanes of a zmm, the K row's four values broadcast to each
 * lane, and each lane is reduced as attn_hsum4 does, (l0 + l1) + (l2 + l3). The V sums are
 * elementwise (w * v, then +, in the order of the rows) at any width. So every output element
 * sees the IEEE operations of attn_head in the same order: the same bits
 * (tests/test_attn_group.c). */
#define TGT_ATTN512 __attribute__((target("avx512f,avx512vl,avx2,fma,f16c")))
#define ATTN_INLINE static inline __attribute__((always_inline))

/* positions ahead whose K or V rows are prefetched (16..48 measured alike at depth 4096) */
#define ATTN_PF_AHEAD 32
/* The head slices (bytes each) of positions [p, q) (below n_kv) into the cache ahead of their
 * use: the rows are a stride apart, which the hardware prefetchers follow late. */
TGT_ATTN512 ATTN_INLINE void attn_prefetch_rows(const uint8_t *base, const int32_t *table, int bs,
                                                size_t stride, size_t bytes, int p, int q, int n_kv)
{
    if (q > n_kv) q = n_kv;
    for (; p < q; p++) {
        const uint8_t *r = base + ((size_t)table[p / bs] * (size_t)bs + (size_t)(p % bs)) * stride;
        for (size_t l = 0; l < bytes; l += 64)
            _mm_prefetch((const char *)(r + l), _MM_HINT_T0);
    }
}

/* the four values i..i+3 of a cache row, in each 128-bit lane */
TGT_ATTN512 ATTN_INLINE __m512 attn_bcast4(const uint8_t *row, bool f16, int i)
{
    if (f16) {
        long long h4;
        memcpy(&h4, row + 2 * (size_t)i, sizeof h4);
        return _mm512_cvtph_ps(_mm256_set1_epi64x(h4));
    }
    return _mm512_broadcast_f32x4(_mm_loadu_ps((const float *)(const void *)(row + 4 * (size_t)i)));
}

/* Scores of cache rows r < nr of the group's heads 4 g + l (g < ng, 4 g + l counted from the
 * qi block given): sc[r * G + 4 g + l] = the dot as dot_rows4_x86 sums it, times scale, soft-
 * capped as attn_head does; mx[4 g + l] = max(mx, score) as attn_head's `if (s > max)` (maxps
 * returns its second operand unless the first is greater: the same). qi holds the rounded query
 * interleaved, [g][hd / 4][4 heads][4]. nr, ng are constants where this is inlined, so the
 * accumulators stay in registers. */
TGT_ATTN512 ATTN_INLINE void attn_qk_group(const uint8_t *rows, size_t stride, bool f16,
                                           const float *qi, int hd, int nr, int ng, float *sc,
                                           int G, float *mx, float scale, float softcap)
{
    __m512 acc[4][2];
#pragma GCC unroll 8
    for (int r = 0; r < nr; r++)
#pragma GCC unroll 8
        for (int g = 0; g < ng; g++)
            acc[r][g] = _mm512_setzero_ps();
    const int nc = hd / 4;
    for (int c = 0; c < nc; c++) {
        __m512 qv[2];
#pragma GCC unroll 8
        for (int g = 0; g < ng; g++)
            qv[g] = _mm512_loadu_ps(qi + ((size_t)g * nc + c) * 16);
#pragma GCC unroll 8
        for (int r = 0; r < nr; r++) {
            const __m512 kv4 = attn_bcast4(rows + (size_t)r * stride, f16, 4 * c);
#pragma GCC unroll 8
            for (int g = 0; g < ng; g++)
                acc[r][g] = _mm512_add_ps(acc[r][g], _mm512_mul_ps(kv4, qv[g]));
        }
    }
    const __m512i lane0 = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0);
    const float inv_cap = softcap > 0.0f ? 1.0f / softcap : 0.0f;
#pragma GCC unroll 8
    for (int r = 0; r < nr; r++)
#pragma GCC unroll 8
        for (int g = 0; g < ng; g++) {
            /* lane 0 of each 128-bit lane: (l0 + l1) + (l2 + l3), then the four heads' sums
             * side by side */
            const __m512 v = acc[r][g];
            const __m512 s1 = _mm512_add_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1)));
            const __m512 s2 = _mm512_add_ps(s1, _mm512_permute_ps(s1, _MM_SHUFFLE(1, 0, 3, 2)));
            const __m128 raw = _mm512_castps512_ps128(_mm512_permutexvar_ps(lane0, s2));
            float *dst = sc + (size_t)r * G + 4 * g, *m = mx + 4 * g;
            if (softcap > 0.0f) {
                float l[4];
                _mm_storeu_ps(l, raw);
                for (int k = 0; k < 4; k++) {
                    const float s = tanhf(l[k] * scale * inv_cap) * softcap;
                    dst[k] = s;
                    if (s > m[k]) m[k] = s;
                }
            } else {
                const __m128 s = _mm_mul_ps(raw, _mm_set1_ps(scale));
                _mm_storeu_ps(dst, s);
                _mm_storeu_ps(m, _mm_max_ps(s, _mm_loadu_ps(m)));
            }
        }
}

/* o[h * hd + e] += w[i * G + h] * row i element e for i in [i0, m), heads h < nh (4 or 8): each
 * row loaded once for the heads, each element's sum in the order of i with a rounded multiply
 * then a rounded add, as axpy_rows_x86. */
TGT_ATTN512 ATTN_INLINE void attn_av_group(float *o, const float *w, int G, const uint8_t *rows,
                                           size_t stride, int i0, int m, bool f16, int hd, int nh)
{
    int c = 0;
    for (; c + 32 <= hd; c += 32) {
        __m512 acc[8][2];
#pragma GCC unroll 8
        for (int h = 0; h < nh; h++) {
            acc[h][0] = _mm512_loadu_ps(o + (size_t)h * hd + c);
            acc[h][1] = _mm512_loadu_ps(o + (size_t)h * hd + c + 16);
        }
        for (int i = i0; i < m; i++) {
            const uint8_t *row = rows + (size_t)i * stride;
            __m512 v0, v1;
            if (f16) {
                v0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)(row + 2 * (size_t)c)));
                v1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)(row + 2 * (size_t)c + 32)));
            } else {
                v0 = _mm512_loadu_ps((const float *)(const void *)(row + 4 * (size_t)c));
                v1 = _mm512_loadu_ps((const float *)(const void *)(row + 4 * (size_t)c + 64));
            }
#pragma GCC unroll 8
            for (int h = 0; h < nh; h++) {
                const __m512 wv = _mm512_set1_ps(w[(size_t)i * G + h]);
                acc[h][0] = _mm512_add_ps(acc[h][0], _mm512_mul_ps(wv, v0));
                acc[h][1] = _mm512_add_ps(acc[h][1], _mm512_mul_ps(wv, v1));
            }
        }
#pragma GCC unroll 8
        for (int h = 0; h < nh; h++) {
            _mm512_storeu_ps(o + (size_t)h * hd + c, acc[h][0]);
            _mm512_storeu_ps(o + (size_t)h * hd + c + 16, acc[h][1]);
        }
    }
    for (; c + 16 <= hd; c += 16) {
        __m512 acc[8];
#pragma GCC unroll 8
        for (int h = 0; h < nh; h++)
            acc[h] = _mm512_loadu_ps(o + (size_t)h * hd + c);
        for (int i = i0; i < m; i++) {
            const uint8_t *row = rows + (size_t)i * stride;
            const __m512 v0 =
                f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)(row + 2 * (size_t)c)))
                    : _mm512_loadu_ps((const float *)(const void *)(row + 4 * (size_t)c));
#pragma GCC unroll 8
            for (int h = 0; h < nh; h++)
                acc[h] = _mm512_add_ps(acc[h], _mm512_mul_ps(_mm512_set1_ps(w[(size_t)i * G + h]), v0));
        }
#pragma GCC unroll 8
        for (int h = 0; h < nh; h++)
            _mm512_storeu_ps(o + (size_t)h * hd + c, acc[h]);
    }
    for (; c < hd; c += 4)
        for (int h = 0; h < nh; h++) {
            __m128 acc = _mm_loadu_ps(o + (size_t)h * hd + c);
            for (int i = i0; i < m; i++)
                acc = _mm_add_ps(acc, _mm_mul_ps(_mm_set1_ps(w[(size_t)i * G + h]),
                                                 attn_load4(rows + (size_t)i * stride, f16, c)));
            _mm_storeu_ps(o + (size_t)h * hd + c, acc);
        }
}

/* attn_softmax for the G heads of sc [n_kv][G] at once: the same float exps, each head's double
 * sum in its own lane (in the order of p), the same scaling and fp16 rounding (F16C rounds to
 * nearest even like forge_f32_to_fp16; a NaN, whose payload the two treat differently, goes
 * the scalar way). */
TGT_ATTN512 static void attn_softmax_group(float *sc, int G, int n_kv, int p_lo, const float *mx,
                                           bool f16)
{
    const int lo = p_lo < n_kv ? p_lo : n_kv;
    memset(sc, 0, (size_t)lo * G * sizeof *sc);
    attn_exp_sub(sc + (size_t)lo * G, (n_kv - lo) * G, mx, G);
    float inv[ATTN_GROUP_MAX];
    for (int h = 0; h < G; h += 4) {
        __m256d sum = _mm256_setzero_pd();
        for (int p = 0; p < n_kv; p++)
            sum = _mm256_add_pd(sum, _mm256_cvtps_pd(_mm_loadu_ps(sc + (size_t)p * G + h)));
        double d[4];
        _mm256_storeu_pd(d, sum);
        for (int k = 0; k < 4; k++)
            inv[h + k] = (float)(1.0 / d[k]);
    }
    const size_t n = (size_t)n_kv * G;
    size_t e = 0;
    if (16 % G == 0) {
        float pat[16];
        for (int k = 0; k < 16; k++)
            pat[k] = inv[k % G];
        const __m512 iv = _mm512_loadu_ps(pat);
        for (; e + 16 <= n; e += 16) {
            __m512 v = _mm512_mul_ps(_mm512_loadu_ps(sc + e), iv);
            if (f16) {
                if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)) {
                    float l[16];
                    _mm512_storeu_ps(l, v);
                    for (int k = 0; k < 16; k++)
                        l[k] = forge_fp16_to_f32(forge_f32_to_fp16(l[k]));
                    v = _mm512_loadu_ps(l);
                } else {
                    v = _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
                }
            }
            _mm512_storeu_ps(sc + e, v);
        }
    }
    for (; e < n; e++) {
        sc[e] *= inv[e % (size_t)G];
        if (f16) sc[e] = forge_fp16_to_f32(forge_f32_to_fp16(sc[e]));
    }
}

/* The query heads h0..h0 + group - 1 of row t (one KV head): attn_head for each, sharing the
 * K/V loads. scr: group * n_scores floats for the scores ([position][head]), then group *
 * head_dim for the interleaved query. */
TGT_ATTN512 static void attn_group_x86(const struct attn_job *j, int t, int h0, float *scr)
{
    const be_attn *a = j->a;
    const be_batch *bt = j->bt;
    const be_kv *kv = j->kv;
    const int hd = a->head_dim, gqa = a->n_head / a->n_head_kv, G = j->group, ng4 = G / 4;
    const int bs = bt->block_size, nc = hd / 4;
    const bool f16 = kv->type == FORGE_KV_F16;
    const size_t ns = j->n_scores, row_bytes = kv->row_bytes;
    float *scores = scr, *qi = scr + (size_t)G * ns;
    const uint8_t *kbase = (const uint8_t *)kv->k + (size_t)a->layer * kv->n_ctx * row_bytes;
    const uint8_t *vbase = (const uint8_t *)kv->v + (size_t)a->layer * kv->n_ctx * row_bytes;
    const int n_kv = bt->pos[t] + 1;
    const int32_t *table = bt->table + (size_t)j->row_seq[t] * bt->table_stride;
    const size_t head_off = kv_row_bytes(kv->type, h0 / gqa * hd);
    /* the query of head 4 g + l, element 4 c + e, at qi[((g * nc + c) * 4 + l) * 4 + e], rounded
     * to fp16 with an F16 cache as in attn_head */
    for (int h = 0; h < G; h++) {
        const float *qh = j->q + ((int64_t)t * a->n_head + h0 + h) * hd;
        for (int d = 0; d < hd; d++) {
            const float x = f16 ? forge_fp16_to_f32(forge_f32_to_fp16(qh[d])) : qh[d];
            qi[(((size_t)(h / 4) * nc + d / 4) * 4 + h % 4) * 4 + d % 4] = x;
        }
    }
    const int p_lo = a->window > 0 && n_kv > a->window ? n_kv - a->window : 0;
    float mx[ATTN_GROUP_MAX];
    for (int h = 0; h < G; h++)
        mx[h] = -INFINITY;
    float kf[4 * ATTN_KF_MAX]; /* F16 cache: four K rows converted */
    const size_t head_bytes = kv_row_bytes(kv->type, hd);
    for (int p0 = 0, b = 0; p0 < n_kv; p0 += bs, b++) {
        const size_t r0 = (size_t)table[b] * (size_t)bs;
        const uint8_t *kr = kbase + r0 * row_bytes + head_off;
        const int m = n_kv - p0 < bs ? n_kv - p0 : bs;
        for (int i = 0; i < m;) {
            float *sc = scores + (size_t)(p0 + i) * G;
            if (p0 + i < p_lo) {
                for (int h = 0; h < G; h++)
                    sc[h] = -INFINITY;
                i++;
                continue;
            }
            const uint8_t *krow = kr + (size_t)i * row_bytes;
            const int nr = i + 4 <= m ? 4 : 1;
            attn_prefetch_rows(kbase + head_off, table, bs, row_bytes, head_bytes, p0 + i + ATTN_PF_AHEAD, p0 + i + ATTN_PF_AHEAD + nr, n_kv);
            size_t kstride = row_bytes;
            bool kf16 = f16;
            if (f16 && hd <= ATTN_KF_MAX) {
                /* the rows in float once (exact), rather than four values per broadcast */
                for (int r = 0; r < nr; r++) {
                    const uint8_t *src = krow + (size_t)r * row_bytes;
                    int e = 0;
                    for (; e + 16 <= hd; e += 16)
                        _mm512_storeu_ps(kf + r * hd + e, _mm512_cvtph_ps(_mm256_loadu_si256(
                                                               (const __m256i *)(const void *)(src + 2 * (size_t)e))));
                    for (; e < hd; e += 4)
                        _mm_storeu_ps(kf + r * hd + e, attn_load4(src, true, e));
                }
                krow = (const uint8_t *)kf;
                kstride = (size_t)hd * sizeof(float);
                kf16 = false;
            }
            for (int g = 0; g < ng4; g += 2) {
                const float *qg = qi + (size_t)g * hd * 4;
                if (nr == 4 && g + 2 <= ng4)
                    attn_qk_group(krow, kstride, kf16, qg, hd, 4, 2, sc + 4 * g, G, mx + 4 * g, a->scale, a->softcap);
                else if (nr == 4)
                    attn_qk_group(krow, kstride, kf16, qg, hd, 4, 1, sc + 4 * g, G, mx + 4 * g, a->scale, a->softcap);
                else if (g + 2 <= ng4)
                    attn_qk_group(krow, kstride, kf16, qg, hd, 1, 2, sc + 4 * g, G, mx + 4 * g, a->scale, a->softcap);
                else
                    attn_qk_group(krow, kstride, kf16, qg, hd, 1, 1, sc + 4 * g, G, mx + 4 * g, a->scale, a->softcap);
            }
            i += nr;
        }
    }
    attn_softmax_group(scores, G, n_kv, p_lo, mx, f16);
    float *o = j->out + ((int64_t)t * a->n_head + h0) * hd;
    memset(o, 0, (size_t)G * hd * sizeof *o);
    for (int p0 = 0, b = 0; p0 < n_kv; p0 += bs, b++) {
        const size_t r0 = (size_t)table[b] * (size_t)bs;
        const uint8_t *vr = vbase + r0 * row_bytes + head_off;
        const int m = n_kv - p0 < bs ? n_kv - p0 : bs;
        const int i0 = p_lo > p0 ? (p_lo - p0 < m ? p_lo - p0 : m) : 0;
        const float *w = scores + (size_t)p0 * G;
        attn_prefetch_rows(vbase + head_off, table, bs, row_bytes, head_bytes, p0 + ATTN_PF_AHEAD, p0 + ATTN_PF_AHEAD + m, n_kv);
        for (int h = 0; h < G; h += 8) {
            if (G - h >= 8)
                attn_av_group(o + (size_t)h * hd, w + h, G, vr, row_bytes, i0, m, f16, hd, 8);
            else
                attn_av_group(o + (size_t)h * hd, w + h, G, vr, row_bytes, i0, m, f16, hd, 4);
        }
    }
}

#define TGT_ATTN_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

/* The dot_row_q8 sums of one K row (nb blocks) with the group's G (4, 8, 12 or 16) quantized
 * queries, into out[G]: per block, the queries of two heads (+128, unsigned) in one zmm meet the
 * block broadcast to both halves in one vpdpbusd; eight lanes per head are reduced (exact
 * integers), 128 times the block's sum taken back off; then per head the float step of
 * dot_row_q8, (float)sumi * (dk * dq), added in block order: the same bits. qb: [nb][G / 2][64]
 * biased query bytes; dq: [nb][G] the queries' scales. */
TGT_ATTN_VNNI static void attn_qk8_vnni(const uint8_t *krow, const uint8_t *qb, const float *dq,
                                             int G, int nb, float *out)
{
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int h8 = 0; h8 < G; h8 += 8) {
        const int nh = G - h8 >= 8 ? 8 : 4;
        __m256 sum = _mm256_setzero_ps();
        for (int b = 0; b < nb; b++) {
            const uint8_t *kb = krow + (size_t)b * KV_Q8_BYTES;
            const __m256i k32 = _mm256_loadu_si256((const __m256i *)(const void *)(kb + 2));
            const __m512i k = _mm512_broadcast_i64x4(k32);
            const uint8_t *q = qb + ((size_t)b * (G / 2) + h8 / 2) * 64;
            const __m512i z = _mm512_setzero_si512();
            const __m512i a = _mm512_dpbusd_epi32(z, _mm512_loadu_si512((const void *)q), k);
            const __m512i bb = _mm512_dpbusd_epi32(z, _mm512_loadu_si512((const void *)(q + 64)), k);
            const __m512i c = nh == 8 ? _mm512_dpbusd_epi32(z, _mm512_loadu_si512((const void *)(q + 128)), k) : z;
            const __m512i d = nh == 8 ? _mm512_dpbusd_epi32(z, _mm512_loadu_si512((const void *)(q + 192)), k) : z;
            /* 128-bit lane L of r: the sums of lane L of a, b, c, d; lanes 0-1 hold the first
             * head of each pair, 2-3 the second */
            const __m512i p = _mm512_add_epi32(_mm512_unpacklo_epi32(a, bb), _mm512_unpackhi_epi32(a, bb));
            const __m512i qq = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
            const __m512i r = _mm512_add_epi32(_mm512_unpacklo_epi64(p, qq), _mm512_unpackhi_epi64(p, qq));
            const __m512i u = _mm512_add_epi32(r, _mm512_shuffle_i64x2(r, r, _MM_SHUFFLE(2, 3, 0, 1)));
            /* heads 0 2 4 6 in lane 0, 1 3 5 7 in lane 2: interleaved into 0..7 */
            const __m256i lo = _mm512_castsi512_si256(u);
            const __m256i hi = _mm512_extracti64x4_epi64(u, 1);
            __m256i s8 = _mm256_permutevar8x32_epi32(
                _mm256_permute2x128_si256(lo, hi, 0x20), perm);
            /* minus 128 times the block's sum (the bias of the queries) */
            const __m256i ks = _mm256_sad_epu8(_mm256_xor_si256(k32, _mm256_set1_epi8((char)0x80)),
                                               _mm256_setzero_si256());
            __m128i k2 = _mm_add_epi64(_mm256_castsi256_si128(ks), _mm256_extracti128_si256(ks, 1));
            k2 = _mm_add_epi64(k2, _mm_unpackhi_epi64(k2, k2));
            const int ksum = (int)_mm_cvtsi128_si32(k2) - 32 * 128;
            s8 = _mm256_sub_epi32(s8, _mm256_set1_epi32(128 * ksum));
            uint16_t dr;
            memcpy(&dr, kb, 2);
            const __m256 dd = _mm256_mul_ps(_mm256_set1_ps(forge_fp16_to_f32(dr)),
                                            _mm256_loadu_ps(dq + (size_t)b * G + h8));
            sum = _mm256_add_ps(sum, _mm256_mul_ps(_mm256_cvtepi32_ps(s8), dd));
        }
        if (nh == 8)
            _mm256_storeu_ps(out + h8, sum);
        else
            _mm_storeu_ps(out + h8, _mm256_castps256_ps128(sum));
    }
}

/* attn_group_x86 for a Q8_0 cache: each K/V row loaded once for the group's heads, each head's
 * score the AVX2 dot_row_q8_x86 of attn_head (its query quantized the same way), the V rows of
 * a block dequantized once (d times q, as axpy_row_q8 rounds it) and summed as F32 rows. The
 * same bits as attn_head (tests/test_attn_group.c). scr: group * n_scores floats for the scores,
 * then the quantized queries. */
TGT_ATTN512 static void attn_group_q8_x86(const struct attn_job *j, int t, int h0, float *scr)
{
    const be_attn *a = j->a;
    const be_batch *bt = j->bt;
    const be_kv *kv = j->kv;
    const int hd = a->head_dim, gqa = a->n_head / a->n_head_kv, G = j->group;
    const int bs = bt->block_size;
    const size_t ns = j->n_scores, row_bytes = kv->row_bytes, q8_bytes = kv_row_bytes(kv->type, hd);
    float *scores = scr;
    uint8_t *qq = (uint8_t *)(scr + (size_t)G * ns);
    const uint8_t *kbase = (const uint8_t *)kv->k + (size_t)a->layer * kv->n_ctx * row_bytes;
    const uint8_t *vbase = (const uint8_t *)kv->v + (size_t)a->layer * kv->n_ctx * row_bytes;
    const int n_kv = bt->pos[t] + 1;
    const int32_t *table = bt->table + (size_t)j->row_seq[t] * bt->table_stride;
    const size_t head_off = kv_row_bytes(kv->type, h0 / gqa * hd);
    for (int h = 0; h < G; h++)
        kern_quantize_row_q8_0(j->q + ((int64_t)t * a->n_head + h0 + h) * hd, qq + (size_t)h * q8_bytes, hd);
    /* for attn_qk8_vnni: the queries' bytes + 128 by block and pair of heads, and their scales */
    const int nb = hd / KV_QK;
    const bool vnni = kern_cpu_has_avx512vnni();
    uint8_t *qb = qq + ((size_t)G * q8_bytes + 63) / 64 * 64;
    float *dq = (float *)(void *)(qb + (size_t)nb * G * 32);
    if (vnni)
        for (int b = 0; b < nb; b++)
            for (int h = 0; h < G; h++) {
                const uint8_t *src = qq + (size_t)h * q8_bytes + (size_t)b * KV_Q8_BYTES;
                uint8_t *dst = qb + ((size_t)b * (G / 2) + h / 2) * 64 + (size_t)(h % 2) * 32;
                for (int k = 0; k < KV_QK; k++)
                    dst[k] = (uint8_t)(src[2 + k] ^ 0x80);
                uint16_t d16;
                memcpy(&d16, src, 2);
                dq[(size_t)b * G + h] = forge_fp16_to_f32(d16);
            }
    const int p_lo = a->window > 0 && n_kv > a->window ? n_kv - a->window : 0;
    const float inv_cap = a->softcap > 0.0f ? 1.0f / a->softcap : 0.0f;
    float mx[ATTN_GROUP_MAX];
    for (int h = 0; h < G; h++)
        mx[h] = -INFINITY;
    for (int p0 = 0, b = 0; p0 < n_kv; p0 += bs, b++) {
        const uint8_t *kr = kbase + (size_t)table[b] * (size_t)bs * row_bytes + head_off;
        const int m = n_kv - p0 < bs ? n_kv - p0 : bs;
        for (int i = 0; i < m; i++) {
            float *sc = scores + (size_t)(p0 + i) * G;
            if (p0 + i < p_lo) {
                for (int h = 0; h < G; h++)
                    sc[h] = -INFINITY;
                continue;
            }
            attn_prefetch_rows(kbase + head_off, table, bs, row_bytes, q8_bytes, p0 + i + ATTN_PF_AHEAD,
                               p0 + i + ATTN_PF_AHEAD + 1, n_kv);
            const uint8_t *krow = kr + (size_t)i * row_bytes;
            float raw[ATTN_GROUP_MAX];
            if (vnni)
                attn_qk8_vnni(krow, qb, dq, G, nb, raw);
            else
                for (int h = 0; h < G; h++)
                    raw[h] = dot_row_q8_x86(krow, qq + (size_t)h * q8_bytes, hd);
            for (int h = 0; h < G; h++) {
                float sv = raw[h] * a->scale;
                if (a->softcap > 0.0f) sv = tanhf(sv * inv_cap) * a->softcap;
                sc[h] = sv;
                if (sv > mx[h]) mx[h] = sv;
            }
        }
    }
    attn_softmax_group(scores, G, n_kv, p_lo, mx, false);
    float *o = j->out + ((int64_t)t * a->n_head + h0) * hd;
    memset(o, 0, (size_t)G * hd * sizeof *o);
    float vf[ATTN_VF_ROWS * ATTN_KF_MAX]; /* a block's V rows dequantized */
    for (int p0 = 0, b = 0; p0 < n_kv; p0 += bs, b++) {
        const uint8_t *vr = vbase + (size_t)table[b] * (size_t)bs * row_bytes + head_off;
        const int m = n_kv - p0 < bs ? n_kv - p0 : bs;
        const int i0 = p_lo > p0 ? (p_lo - p0 < m ? p_lo - p0 : m) : 0;
        const float *w = scores + (size_t)p0 * G;
        attn_prefetch_rows(vbase + head_off, table, bs, row_bytes, q8_bytes, p0 + ATTN_PF_AHEAD,
                           p0 + ATTN_PF_AHEAD + m, n_kv);
        for (int c0 = i0; c0 < m; c0 += ATTN_VF_ROWS) {
            const int c1 = m - c0 < ATTN_VF_ROWS ? m : c0 + ATTN_VF_ROWS;
            for (int i = c0; i < c1; i++) {
                const uint8_t *row = vr + (size_t)i * row_bytes;
                float *dst = vf + (size_t)(i - c0) * hd;
                for (int bl = 0; bl < hd / KV_QK; bl++) {
                    const uint8_t *rb = row + (size_t)bl * KV_Q8_BYTES;
                    uint16_t dr;
                    memcpy(&dr, rb, 2);
                    const __m512 dv = _mm512_set1_ps(forge_fp16_to_f32(dr));
                    for (int k = 0; k < KV_QK; k += 16)
                        _mm512_storeu_ps(dst + bl * KV_QK + k,
                                         _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                                                               (const __m128i *)(const void *)(rb + 2 + k))))));
                }
            }
            const uint8_t *rows = (const uint8_t *)vf, *wr = (const uint8_t *)(w + (size_t)c0 * G);
            const size_t st = (size_t)hd * sizeof(float);
            for (int h = 0; h < G; h += 8) {
                if (G - h >= 8)
                    attn_av_group(o + (size_t)h * hd, (const float *)wr + h, G, rows, st, 0, c1 - c0, false, hd, 8);
                else
                    attn_av_group(o + (size_t)h * hd, (const float *)wr + h, G, rows, st, 0, c1 - c0, false, hd, 4);
            }
        }
    }
}
#endif

/* Query heads per work item: the whole GQA group on the AVX-512 path (F32/F16 cache, head_dim a
 * multiple of 4, gqa a multiple of 4 up to ATTN_GROUP_MAX) when there are at least two items per
 * thread, else 1 (attn_head). Either way the same bits; this only picks the faster. */
static int attn_group_size(const cpu_backend *c, const be_kv *kv, const be_attn *a, int n_tok)
{
#if defined(__x86_64__)
    const int gqa = a->n_head / a->n_head_kv;
    if (kern_isa_current() == KERN_ISA_AVX512 && a->head_dim % 4 == 0 &&
        (kv->type != FORGE_KV_Q8_0 || a->head_dim <= ATTN_KF_MAX) && gqa % 4 == 0 && gqa <= ATTN_GROUP_MAX && (int64_t)n_tok * a->n_head_kv >= 2 * (int64_t)c->n_threads)
        return gqa;
#else
    (void)c, (void)kv, (void)a, (void)n_tok;
#endif
    return 1;
}

/* The one attention implementation, contiguous and paged: positions are visited in order
 * 0..n_kv-1, block by block (the cache row of block b is table[b] * block_size, or b *
 * block_size with the identity), so the reductions run in the same order whatever the table.
 * Work items (a row and j->group query heads) are dealt round-robin: a causal prompt's later
 * rows cost more, so contiguous ranges would leave the last thread most of the work. */
static void attn_worker(void *arg, int ith, int nth)
{
    struct attn_job *j = arg;
    const int G = j->group, per_tok = j->a->n_head / G;
    const int64_t items = (int64_t)j->bt->n_tok * per_tok;
    float *scr = j->c->scratch + (size_t)ith * j->c->scratch_per_thread;
    for (int64_t it = ith; it < items; it += nth) {
        const int t = (int)(it / per_tok), h = (int)(it % per_tok) * G;
#if defined(__x86_64__)
        if (G > 1) {
            if (j->kv->type == FORGE_KV_Q8_0)
                attn_group_q8_x86(j, t, h, scr);
            else
                attn_group_x86(j, t, h, scr);
            continue;
        }
#endif
        attn_head(j, t, h, scr);
    }
}

/* Row row of layer layer of the cache = k_src, v_src (kv_dim floats), converted. */
static void kv_put_row(be_kv *kv, int layer, size_t row, const float *k_src, const float *v_src)
{
    const size_t n = (size_t)kv->kv_dim, base = ((size_t)layer * kv->n_ctx + row) * n;
    if (kv->type == FORGE_KV_Q8_0) {
        const size_t off = ((size_t)layer * kv->n_ctx + row) * kv->row_bytes;
        kern_quantize_row_q8_0(k_src, (uint8_t *)kv->k + off, (int64_t)n);
        kern_quantize_row_q8_0(v_src, (uint8_t *)kv->v + off, (int64_t)n);
    } else if (kv->type == FORGE_KV_F16) {
        uint16_t *kd = (uint16_t *)kv->k + base, *vd = (uint16_t *)kv->v + base;
        for (size_t i = 0; i < n; i++) {
            kd[i] = forge_f32_to_fp16(k_src[i]);
            vd[i] = forge_f32_to_fp16(v_src[i]);
        }
    } else {
        memcpy((float *)kv->k + base, k_src, n * sizeof(float));
        memcpy((float *)kv->v + base, v_src, n * sizeof(float));
    }
}

/* Attention over the batch a->batch (backend.h): every row's K/V stored at its slot, then each
 * (row, head) attends over its sequence's positions 0..pos through the sequence's block table,
 * threaded over all (row, head) pairs of the batch. A row's result depends only on its own
 * query and its sequence's cache rows: the same alone or in any batch. */
static int cpu_attention(backend *be, be_buf *out, const be_buf *q, const be_buf *k,
                         const be_buf *v, be_kv *kv, const be_attn *a, forge_err *err)
{
    cpu_backend *c = cpu(be);
    const be_batch *bt = a ? a->batch : NULL;
    if (!kv || !a || !bt || bt->n_tok < 1 || a->n_head <= 0 || a->head_dim <= 0 ||
        a->n_head_kv <= 0 || a->n_head % a->n_head_kv || a->n_head_kv * a->head_dim != kv->kv_dim ||
        a->layer < 0 || a->layer >= kv->n_layer || bt->block_size < 1 ||
        kv->n_ctx % bt->block_size || (kv->type == FORGE_KV_Q8_0 && a->head_dim % KV_QK))
        return forge_err_set(err, FORGE_E_INTERNAL,
                             "attention: layer %d, %d heads / %d KV heads of %d, blocks of %d do "
                             "not fit the cache (%d layers, kv_dim %d, %d rows)",
                             a ? a->layer : -1, a ? a->n_head : -1, a ? a->n_head_kv : -1,
                             a ? a->head_dim : -1, bt ? bt->block_size : -1,
                             kv ? kv->n_layer : -1, kv ? kv->kv_dim : -1, kv ? kv->n_ctx : -1);
    const int n_tok = bt->n_tok, kv_dim = kv->kv_dim, bs = bt->block_size;
    const int64_t q_n = (int64_t)n_tok * a->n_head * a->head_dim;
    if (check_buf(q, q_n, "attention q", err) || check_buf(out, q_n, "attention out", err) ||
        check_buf(k, (int64_t)n_tok * kv_dim, "attention k", err) ||
        check_buf(v, (int64_t)n_tok * kv_dim, "attention v", err))
        return FORGE_E_INTERNAL;
    if (c->row_seq_n < n_tok) {
        int32_t *rs = realloc(c->row_seq, (size_t)n_tok * sizeof *rs);
        if (!rs) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
        c->row_seq = rs;
        c->row_seq_n = n_tok;
    }
    /* every row's slot and every table entry it reads must be inside the cache */
    const int n_blocks = kv->n_ctx / bs;
    int max_kv = 0;
    for (int s = 0; s < bt->n_seq; s++) {
        const int32_t *tab = bt->table + (size_t)s * bt->table_stride;
        for (int r = bt->seq_start[s]; r < bt->seq_start[s + 1]; r++) {
            const int64_t p = bt->pos[r], used = p / bs + 1;
            for (int64_t b = 0; b < used && b < bt->n_table[s]; b++)
                if (tab[b] < 0 || tab[b] >= n_blocks)
                    return forge_err_set(err, FORGE_E_INTERNAL,
                                         "attention: table entry %lld is block %d, the cache has "
                                         "%d",
                                         (long long)b, tab[b], n_blocks);
            if (p < 0 || used > bt->n_table[s] || bt->slot[r] < 0 || bt->slot[r] >= kv->n_ctx)
                return forge_err_set(err, FORGE_E_INTERNAL,
                                     "attention: row %d at position %lld, slot %d: a table of %d "
                                     "blocks of %d, a cache of %d rows",
                                     r, (long long)p, bt->slot[r], bt->n_table[s], bs, kv->n_ctx);
            c->row_seq[r] = s;
            if (used * bs > max_kv) max_kv = (int)(used * bs);
        }
    }
    for (int t = 0; t < n_tok; t++)
        kv_put_row(kv, a->layer, (size_t)bt->slot[t], k->data + (size_t)t * kv_dim,
                   v->data + (size_t)t * kv_dim);
    /* per thread: each head of a work item's scores, then its query (rounded / interleaved) */
    const int group = attn_group_size(c, kv, a, n_tok);
    if (scratch_reserve(c, (size_t)group * ((size_t)max_kv + (size_t)a->head_dim), err))
        return FORGE_E_NOMEM;
    struct attn_job job = {c, out->data, q->data, kv, a, bt, c->row_seq, (size_t)max_kv, group};
    int64_t work = (int64_t)n_tok * a->n_head * max_kv * a->head_dim * 2;
    kern_pool_run(work < CPU_MIN_PARALLEL_WORK ? NULL : c->pool, attn_worker, &job);
    return FORGE_OK;
}

/* ---- paged KV cache --------------------------------------------------------------------- */

static int cpu_kv_store(backend *be, be_kv *kv, int layer, const be_buf *k, const be_buf *v,
                        const int32_t *rows, int n_tok, forge_err *err)
{
    (void)be;
    if (!kv || layer < 0 || layer >= kv->n_layer || n_tok < 0 || (n_tok > 0 && !rows))
        return forge_err_set(err, FORGE_E_INTERNAL, "kv_store: layer %d of %d, %d rows", layer,
                             kv ? kv->n_layer : -1, n_tok);
    if (check_buf(k, (int64_t)n_tok * kv->kv_dim, "kv_store k", err) ||
        check_buf(v, (int64_t)n_tok * kv->kv_dim, "kv_store v", err))
        return FORGE_E_INTERNAL;
    for (int t = 0; t < n_tok; t++)
        if (rows[t] < 0 || rows[t] >= kv->n_ctx)
            return forge_err_set(err, FORGE_E_INTERNAL,
                                 "kv_store: row %d (token %d) is outside the cache of %d rows",
                                 rows[t], t, kv->n_ctx);
    for (int t = 0; t < n_tok; t++)
        kv_put_row(kv, layer, (size_t)rows[t], k->data + (size_t)t * kv->kv_dim,
                   v->data + (size_t)t * kv->kv_dim);
    return FORGE_OK;
}

static int cpu_kv_copy_block(backend *be, be_kv *kv, int block_size, int src, int dst, int n_rows,
                             forge_err *err)
{
    (void)be;
    if (!kv || block_size <= 0 || kv->n_ctx % block_size || n_rows < 0 || n_rows > block_size ||
        src < 0 || dst < 0 || src >= kv->n_ctx / block_size || dst >= kv->n_ctx / block_size)
        return forge_err_set(err, FORGE_E_INTERNAL,
                             "kv_copy_block: block %d -> %d, %d rows of blocks of %d do not fit "
                             "the cache of %d rows",
                             src, dst, n_rows, block_size, kv ? kv->n_ctx : -1);
    if (src == dst || n_rows == 0) return FORGE_OK;
    const size_t row_bytes = kv->row_bytes;
    for (int l = 0; l < kv->n_layer; l++) {
        size_t layer_off = (size_t)l * kv->n_ctx * row_bytes;
        size_t s = layer_off + (size_t)src * block_size * row_bytes;
        size_t d = layer_off + (size_t)dst * block_size * row_bytes;
        memcpy((uint8_t *)kv->k + d, (const uint8_t *)kv->k + s, (size_t)n_rows * row_bytes);
        memcpy((uint8_t *)kv->v + d, (const uint8_t *)kv->v + s, (size_t)n_rows * row_bytes);
    }
    return FORGE_OK;
}

static int cpu_kv_read(backend *be, const be_kv *kv, int layer, const int32_t *rows, int n,
                       float *k_out, float *v_out, forge_err *err)
{
    (void)be;
    if (!kv || layer < 0 || layer >= kv->n_layer || n < 0 || (n > 0 && (!rows || !k_out || !v_out)))
        return forge_err_set(err, FORGE_E_INTERNAL, "kv_read: layer %d of %d, %d rows", layer,
                             kv ? kv->n_layer : -1, n);
    const size_t dim = (size_t)kv->kv_dim;
    for (int t = 0; t < n; t++) {
        if (rows[t] < 0 || rows[t] >= kv->n_ctx)
            return forge_err_set(err, FORGE_E_INTERNAL,
                                 "kv_read: row %d is outside the cache of %d rows", rows[t],
                                 kv->n_ctx);
        size_t base = ((size_t)layer * kv->n_ctx + (size_t)rows[t]) * dim;
        if (kv->type == FORGE_KV_Q8_0) {
            const size_t off = ((size_t)layer * kv->n_ctx + (size_t)rows[t]) * kv->row_bytes;
            memset(k_out + t * dim, 0, dim * sizeof(float));
            memset(v_out + t * dim, 0, dim * sizeof(float));
            axpy_row_q8(k_out + t * dim, 1.0f, (const uint8_t *)kv->k + off, (int)dim);
            axpy_row_q8(v_out + t * dim, 1.0f, (const uint8_t *)kv->v + off, (int)dim);
            continue;
        }
        for (size_t i = 0; i < dim; i++) {
            if (kv->type == FORGE_KV_F16) {
                k_out[t * dim + i] = forge_fp16_to_f32(((const uint16_t *)kv->k)[base + i]);
                v_out[t * dim + i] = forge_fp16_to_f32(((const uint16_t *)kv->v)[base + i]);
            } else {
                k_out[t * dim + i] = ((const float *)kv->k)[base + i];
                v_out[t * dim + i] = ((const float *)kv->v)[base + i];
            }
        }
    }
    return FORGE_OK;
}

/* ---- repacked copies of the weights ------------------------------------------------------ */

static void wset_free(be_wset *set)
{
    if (!set) return;
    free(set->mem);
    free(set->p);
    free(set);
}

/* Memory for the copies of a set, one region: 64-byte aligned; in 2 MB huge pages where the
 * system gives them on request (transparent huge pages in "madvise" mode): on the Zen 5 EPYC the
 * load of TinyLlama Q4_0 went from ~1.3 s to ~0.6 s (fewer page faults while the copies are
 * written). One region, so that rounding up to 2 MB costs at most 2 MB per model. */
static void *copies_alloc(size_t bytes)
{
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const size_t huge = (size_t)2 << 20;
    if (bytes >= huge) {
        const size_t rounded = (bytes + huge - 1) & ~(huge - 1);
        void *p = aligned_alloc(huge, rounded);
        if (p) (void)madvise(p, rounded, MADV_HUGEPAGE); /* a hint: failure is harmless */
        return p;
    }
#endif
    return aligned_alloc(64, (bytes + 63) & ~(size_t)63);
}

/* Make the copies of a new set: one per weight whose layout on this ISA is repacked. */
static int wset_make(cpu_backend *c, be_weight *const *ws, int n, be_wset **out,
                     void (*progress)(uint64_t done, uint64_t total, void *user), void *user,
                     forge_err *err)
{
    uint64_t total = 0, done = 0, copy_bytes = 0;
    int rc = FORGE_OK;
    be_wset *set = calloc(1, sizeof *set);
    *out = NULL;
    if (!set || !(set->p = calloc((size_t)(n > 0 ? n : 1), sizeof *set->p))) {
        rc = forge_err_set(err, FORGE_E_NOMEM, "cpu backend: out of memory");
        goto fail;
    }
    set->dev = CPU_WSET_DEV;
    set->n = n;
    /* where each copy goes in the region (offsets, 64-byte aligned, kept in R until then) */
    for (int i = 0; i < n; i++) {
        const be_weight *w = ws[i];
        const int layout = kern_repack_layout(w->type);
        const size_t bytes = kern_repack_bytes(layout, w->ne1, w->ne0);
        total += w->n_bytes;
        if (!w->data || !bytes || w->ne0 % 32) continue;
        cpu_packed *e = &set->p[i];
        e->R = (void *)(uintptr_t)copy_bytes;
        e->layout = layout;
        e->type = w->type;
        e->ne0 = w->ne0;
        e->ne1 = w->ne1;
        e->src = w->data;
        copy_bytes += (bytes + 63) & ~(uint64_t)63;
    }
    if (copy_bytes > SIZE_MAX / 2 || (copy_bytes && !(set->mem = copies_alloc((size_t)copy_bytes)))) {
        rc = forge_err_set(err, FORGE_E_NOMEM,
                           "cpu backend: out of memory for %.1f MB of repacked weights",
                           (double)copy_bytes / 1e6);
        goto fail;
    }
    for (int i = 0; i < n; i++) {
        const be_weight *w = ws[i];
        cpu_packed *e = &set->p[i];
        if (e->src) {
            e->R = (uint8_t *)set->mem + (uintptr_t)e->R;
            if ((rc = kern_repack(c->pool, e->layout, w->type, w->data, w->ne1, w->ne0, e->R, err)))
                goto fail;
        }
        done += w->n_bytes;
        if (progress) progress(done, total, user);
    }
    set->refs = 1;
    *out = set;
    return FORGE_OK;
fail:
    wset_free(set);
    return rc;
}

static int cpu_weights_acquire(backend *be, be_wshare *share, be_weight *const *ws, int n,
                               void (*progress)(uint64_t done, uint64_t total, void *user),
                               void *user, forge_err *err)
{
    cpu_backend *c = cpu(be);
    be_wset *set = NULL;
    uint64_t total = 0, done = 0;
    int rc = FORGE_OK;
    if (c->wset) return forge_err_set(err, FORGE_E_INTERNAL, "cpu backend: weights acquired twice");
    if (!share || n < 0) return forge_err_set(err, FORGE_E_INVALID, "cpu backend: %d weights", n);
    for (int i = 0; i < n; i++) {
        if (ws[i]->slot != i)
            return forge_err_set(err, FORGE_E_INTERNAL, "cpu backend: weight %s in slot %d of %d",
                                 ws[i]->name, (int)ws[i]->slot, i);
        total += ws[i]->n_bytes;
    }
    pthread_mutex_lock(&share->lock);
    for (set = share->head; set && set->dev != CPU_WSET_DEV; set = set->next)
        ;
    if (set) {
        /* made by another context of the model */
        if (set->n != n) {
            rc = forge_err_set(err, FORGE_E_INTERNAL, "cpu backend: weight set of %d, model %d",
                               set->n, n);
            set = NULL;
            goto done;
        }
        set->refs++;
        for (int i = 0; progress && i < n; i++) {
            done += ws[i]->n_bytes;
            progress(done, total, user);
        }
        goto done;
    }
    if ((rc = wset_make(c, ws, n, &set, progress, user, err))) goto done;
    set->next = share->head;
    share->head = set;
done:
    if (set) {
        c->wset = set;
        c->share = share;
    }
    pthread_mutex_unlock(&share->lock);
    return rc;
}

static void cpu_weights_release(backend *be)
{
    cpu_backend *c = cpu(be);
    be_wset *set = c->wset;
    if (!set) return;
    c->wset = NULL;
    pthread_mutex_lock(&c->share->lock);
    if (--set->refs == 0) {
        be_wset **pp = &c->share->head;
        while (*pp && *pp != set)
            pp = &(*pp)->next;
        if (*pp) *pp = set->next;
        wset_free(set);
    }
    pthread_mutex_unlock(&c->share->lock);
    c->share = NULL;
}

/* The repacked copy for w: the weight itself, or a view of whole groups of its rows (an expert
 * of a stacked matrix, moe.c); none for anything else (the mapping is read then). */
static kern_mm_packed packed_of(const cpu_backend *c, const be_weight *w)
{
    kern_mm_packed p = {NULL, KERN_LAYOUT_FILE};
    if (!c->wset || !w || !w->data || w->slot < 0 || w->slot >= c->wset->n) return p;
    const cpu_packed *e = &c->wset->p[w->slot];
    if (!e->R || e->type != w->type || e->ne0 != w->ne0) return p;
    const uintptr_t d = (uintptr_t)w->data, s = (uintptr_t)e->src;
    const size_t rb = ggml_row_size(e->type, e->ne0);
    const int64_t g = kern_repack_group_rows(e->layout);
    if (d < s || (d - s) % rb) return p;
    const int64_t r0 = (int64_t)((d - s) / rb);
    if (r0 % g || r0 + w->ne1 > e->ne1) return p;
    p.R = (const uint8_t *)e->R + (size_t)(r0 / g) * kern_repack_group_bytes(e->layout, e->ne0);
    p.layout = e->layout;
    return p;
}

const void *backend_cpu_packed(backend *be, const be_weight *w, int *layout)
{
    kern_mm_packed p = packed_of(cpu(be), w);
    if (layout) *layout = p.layout;
    return p.R;
}

/* ---- matmul ----------------------------------------------------------------------------- */

struct f32mm_job {
    cpu_backend *c;
    const be_weight *w;
    const float *x;
    float *y;
    int n_tok;
    int rc;
};

/* f32_math: each output row of W is converted to float and dotted with every token in double.
 * Slow; used to check arithmetic against float32/float64 references. */
static void f32mm_worker(void *arg, int ith, int nth)
{
    struct f32mm_job *j = arg;
    const be_weight *w = j->w;
    const int64_t per = (w->ne1 + nth - 1) / nth;
    const int64_t r0 = per * ith, r1 = r0 + per < w->ne1 ? r0 + per : w->ne1;
    const size_t row_bytes = ggml_row_size(w->type, w->ne0);
    float *row = j->c->scratch + (size_t)ith * j->c->scratch_per_thread;
    for (int64_t r = r0; r < r1; r++) {
        if (forge_dequantize(w->type, (const uint8_t *)w->data + (size_t)r * row_bytes, row, w->ne0,
                             NULL)) {
            j->rc = FORGE_E_UNSUPPORTED;
            return;
        }
        for (int t = 0; t < j->n_tok; t++) {
            const float *xt = j->x + (int64_t)t * w->ne0;
            double s = 0.0;
            for (int64_t i = 0; i < w->ne0; i++)
                s += (double)row[i] * (double)xt[i];
            j->y[(int64_t)t * w->ne1 + r] = (float)s;
        }
    }
}

/* kern_matmul takes rows whose length is a multiple of 32; other rows (stories260K's
 * ffn_down has 172) and f32_math go through f32mm_worker. Without f32_math the activations are
 * first rounded like ggml does for F16/BF16 weights, so the numerics stay those of ggml. */
static int cpu_matmul(backend *be, be_buf *y, const be_weight *w, const be_buf *x, int n_tok,
                      forge_err *err)
{
    cpu_backend *c = cpu(be);
    if (check_buf(x, (int64_t)n_tok * w->ne0, "matmul x", err) ||
        check_buf(y, (int64_t)n_tok * w->ne1, "matmul y", err))
        return FORGE_E_INTERNAL;
    if (!c->f32_math && w->ne0 % 32 == 0) {
        const kern_mm_desc d = {w->type, w->data, w->ne1, y->data};
        const kern_mm_packed p = packed_of(c, w);
        return kern_matmul_packed(w->ne0 * w->ne1 * n_tok < CPU_MIN_PARALLEL_WORK ? NULL : c->pool,
                                  1, &d, &p, w->ne0, x->data, n_tok, err);
    }
    if (scratch_reserve(c, (size_t)w->ne0, err)) return FORGE_E_NOMEM;
    const float *xs = x->data;
    if (!c->f32_math && (w->type == GGML_TYPE_F16 || w->type == GGML_TYPE_BF16)) {
        size_t n = (size_t)n_tok * (size_t)w->ne0;
        if (n > c->xround_n) {
            float *p = realloc(c->xround, n * sizeof(float));
            if (!p) return forge_err_set(err, FORGE_E_NOMEM, "cpu backend: out of memory");
            c->xround = p;
            c->xround_n = n;
        }
        for (size_t i = 0; i < n; i++)
            c->xround[i] = w->type == GGML_TYPE_F16 ? forge_fp16_to_f32(forge_f32_to_fp16(xs[i]))
                                                    : forge_bf16_to_f32(forge_f32_to_bf16(xs[i]));
        xs = c->xround;
    } else if (!c->f32_math && w->type != GGML_TYPE_F32) {
        return forge_err_set(err, FORGE_E_UNSUPPORTED,
                             "matmul: %s has type %s and rows of %lld (not a multiple of 32)",
                             w->name, ggml_type_name(w->type), (long long)w->ne0);
    }
    struct f32mm_job job = {c, w, xs, y->data, n_tok, FORGE_OK};
    kern_pool_run(c->pool, f32mm_worker, &job);
    if (job.rc)
        return forge_err_set(err, job.rc, "matmul: cannot convert %s (type %s) to float", w->name,
                             ggml_type_name(w->type));
    return FORGE_OK;
}

/* Weights that share x go to kern_matmul_multi as one job. What kern_matmul does not take
 * (f32_math, rows that are not a multiple of 32) goes through cpu_matmul one weight at a time. */
static int cpu_matmul_multi(backend *be, int n, be_buf *const *ys, const be_weight *const *ws,
                            const be_buf *x, int n_tok, forge_err *err)
{
    cpu_backend *c = cpu(be);
    kern_mm_desc d[KERN_MM_MULTI_MAX];
    kern_mm_packed pk[KERN_MM_MULTI_MAX];
    bool together = !c->f32_math && n >= 1 && n <= KERN_MM_MULTI_MAX;
    int64_t work = 0;
    for (int i = 0; i < n && together; i++)
        together = ws[i]->ne0 == ws[0]->ne0 && ws[i]->ne0 % 32 == 0;
    if (!together) {
        for (int i = 0; i < n; i++) {
            int rc = cpu_matmul(be, ys[i], ws[i], x, n_tok, err);
            if (rc) return rc;
        }
        return FORGE_OK;
    }
    if (check_buf(x, (int64_t)n_tok * ws[0]->ne0, "matmul x", err)) return FORGE_E_INTERNAL;
    for (int i = 0; i < n; i++) {
        if (check_buf(ys[i], (int64_t)n_tok * ws[i]->ne1, "matmul y", err))
            return FORGE_E_INTERNAL;
        d[i] = (kern_mm_desc){ws[i]->type, ws[i]->data, ws[i]->ne1, ys[i]->data};
        pk[i] = packed_of(c, ws[i]);
        work += ws[i]->ne0 * ws[i]->ne1 * n_tok;
    }
    return kern_matmul_packed(work < CPU_MIN_PARALLEL_WORK ? NULL : c->pool, n, d, pk, ws[0]->ne0,
                              x->data, n_tok, err);
}

/* ---- lifetime --------------------------------------------------------------------------- */

static void cpu_destroy(backend *be)
{
    cpu_backend *c = cpu(be);
    if (!c) return;
    cpu_weights_release(be); /* normally released already (fwd.c) */
    kern_pool_free(c->pool);
    free(c->scratch);
    free(c->xround);
    free(c->row_seq);
    free(c);
}

static const be_ops cpu_ops = {
    .name = "CPU",
    .destroy = cpu_destroy,
    .buf_create = cpu_buf_create,
    .buf_free = cpu_buf_free,
    .buf_read = cpu_buf_read,
    .buf_data = cpu_buf_data,
    .weights_acquire = cpu_weights_acquire,
    .weights_release = cpu_weights_release,
    .kv_create = cpu_kv_create,
    .kv_free = cpu_kv_free,
    .get_rows = cpu_get_rows,
    .rms_norm = cpu_rms_norm,
    .matmul = cpu_matmul,
    .add_bias = cpu_add_bias,
    .rope = cpu_rope,
    .attention = cpu_attention,
    .swiglu = cpu_swiglu,
    .geglu = cpu_geglu,
    .scale = cpu_scale,
    .softcap = cpu_softcap,
    .add = cpu_add,
    .copy_rows = cpu_copy_rows,
    .matmul_multi = cpu_matmul_multi,
    .kv_store = cpu_kv_store,
    .kv_copy_block = cpu_kv_copy_block,
    .kv_read = cpu_kv_read,
    .moe_ffn = cpu_moe_ffn,
};

int backend_cpu_create(int n_threads, bool f32_math, backend **out, forge_err *err)
{
    *out = NULL;
    if (n_threads < 1)
        return forge_err_set(err, FORGE_E_INVALID, "cpu backend: %d threads (need >= 1)",
                             n_threads);
    cpu_backend *c = calloc(1, sizeof *c);
    if (!c) return forge_err_set(err, FORGE_E_NOMEM, "cpu backend: out of memory");
    c->base.ops = &cpu_ops;
    c->n_threads = n_threads;
    c->f32_math = f32_math;
    int rc = kern_pool_create(n_threads, &c->pool, err);
    if (rc) {
        free(c);
        return rc;
    }
    *out = &c->base;
    return FORGE_OK;
}
