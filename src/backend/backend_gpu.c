/* backend_gpu.c - the GPU implementation of the backend interface (backend.h) on top of the
 * gpu_api table of libforge_cuda.so (src/gpu/gpu_ops.h), which is dlopened here once per process:
 * the CPU library includes no CUDA/HIP header and links no GPU runtime.
 *
 * Owns: device activation buffers, the device KV cache ([layer][pos][kv_dim], F32 or F16), the
 * scratch sized by the planner, one stream (gpu_ctx) on which all work is enqueued, and a
 * reference on the model's weight set for its GPU (be_wset below: the device copies of the
 * weights, uploaded once through pinned staging and re-packed by gpu_weight_convert, shared with
 * the other contexts of the model on that GPU, freed by the last of them). The host waits only
 * in buf_read (the logits), argmax (one id) and at load/free.
 *
 * Lifetimes: every device buffer is allocated and freed in the stream's order (gpu_malloc_async
 * / gpu_free_async on the backend's stream), so a buffer freed while work that reads it is still
 * queued (an interrupted prompt, a failed decode, a recorded step replayed just before) stays
 * valid until that work is done. Pinned host memory and graphs are released only after the
 * stream is synchronised. The shared weights are released after this backend's stream is
 * synchronised; the last holder frees them in its stream's order.
 *
 * Decode (n_tok = 1): act_quantize + matvec (Q8_0/Q4_0: the CPU's numerics; the other block
 * types: the same Q8_0 activations, where the CPU uses Q8_1/Q8_K) or float matvec; one
 * quantization serves every matmul that reads the same, unchanged buffer (Q/K/V, gate/up).
 * Prompt (n_tok > 1): below FORGE_GPU_GEMM_MIN tokens (default 32) the same matvec per token
 * (numerics identical to decode); from there cuBLAS GEMM, quantized weights dequantized to F16
 * into a scratch matrix first. Causal attention over several new tokens = the decode kernel with
 * one more grid dimension over the queries (gpu_attention_batch), each query reading its own
 * position from a device array 0..n_ctx-1; FORGE_GPU_ATTN_BATCH=0: one launch per query.
 *
 * Decode steps (step_begin/step_end, one token): the token id and the position are copied to a
 * small device array (d_small) before the step, and every op of the step reads them from there
 * (embedding, RoPE, the KV store, attention sized by a power-of-two bucket of the position), so
 * the step's launches are the same for every position. The first step of each bucket is captured
 * into a CUDA/HIP graph and later steps replay it: one launch instead of ~14 per layer.
 * FORGE_GPU_GRAPH=0 runs the same ops without graphs (bit-identical results); FORGE_GPU_SYNC=1
 * turns graphs off; FORGE_GPU_GRAPH=1 makes a failed capture an error instead of a silent
 * fallback. Graphs hold buffer addresses: any buffer, KV or weight (re)allocation drops them. */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend/backend_gpu.h"
#include "core/util.h"
#include "forge_gguf.h"
#include "forge_model.h"
#include "gpu/gpu_ops.h"
#include "quant/qtypes.h"

struct be_buf {
    float *d;
    int64_t n;
    uint64_t version; /* bumped by every op that writes the buffer */
};

struct be_kv {
    int n_layer, n_ctx, kv_dim, type; /* type: GGML_TYPE_F32 / GGML_TYPE_F16 */
    size_t elt;
    void *k, *v; /* [n_layer][n_ctx][kv_dim] */
};

#define GPU_STAGE_BYTES ((size_t)16 << 20) /* two pinned staging buffers for uploads */
#define GPU_GRAPH_SLOTS 24                 /* attention buckets 128 << i positions */
#define GPU_STEP_MIN_KV 128 /* smallest attention bucket of a decode step: below 128 positions \
                             one attention split, no merge launch (FORGE_GPU_ATTN_MIN_SPLIT) */

/* One GPU's copies of one model's weights (backend.h: be_wshare). Reference-counted: owned
 * jointly by the backends on that GPU that acquired it; guarded by the be_wshare's lock. */
struct be_wset {
    be_wset *next;
    int dev;    /* the GPU these pointers belong to: the key */
    int refs;   /* backends holding it */
    int n;      /* slots */
    void **d_w; /* n device copies (gpu_weight_bytes each), by be_weight.slot */
};

typedef struct gpu_backend {
    backend base;
    const gpu_api *api;
    int dev;
    be_wshare *share; /* the model's registry, while wset is held */
    be_wset *wset;    /* the weight set this backend holds a reference on, or NULL */
    gpu_ctx *ctx;
    gpu_stream *st;
    gpu_blas *blas; /* NULL: no GEMM (HIP build, or a small n_batch): prompt by matvec */
    bool planned;
    int gemm_min;      /* prompt chunks of at least this many tokens use GEMM */
    bool attn_batch;   /* prompt attention: all queries per launch (else one launch each) */
    size_t attn_bytes; /* size of d_attn */
    void *d_xq;        /* quantized activation row (act_q8_bytes(max_in)) */
    void *d_xc;        /* GEMM activations in F16/BF16 (n_batch * max_in * 2 bytes) */
    void *d_wf16;      /* a quantized matrix dequantized to F16 (max_quant_elems * 2 bytes) */
    void *d_attn;      /* attention scratch for n_ctx positions */
    int32_t *d_pos;    /* 0 .. n_ctx-1 */
    int32_t *d_ids;    /* n_batch token ids */
    int64_t max_in, max_quant_elems;
    int n_batch, n_ctx;
    void *h_stage[2];
    gpu_event *ev_stage[2];
    bool stage_used[2];
    /* the quantized activation in d_xq: which buffer, which version, which row length */
    const be_buf *xq_src;
    uint64_t xq_version;
    int64_t xq_n_in;
    uint64_t next_version;
    /* decode steps (step_begin/step_end) */
    bool graph_on;     /* record and replay steps */
    bool graph_strict; /* FORGE_GPU_GRAPH=1: a failed capture is an error */
    bool in_step;      /* one-token ops read the id and position from d_small */
    bool capturing;
    int step_slot;
    int32_t step_id, step_pos;
    int32_t *d_small; /* [0] step token id, [1] step position, [2] argmax result */
    int32_t *h_small; /* pinned: the same */
    gpu_event *ev_small;
    bool ev_small_used;
    gpu_graph *graphs[GPU_GRAPH_SLOTS]; /* one recorded step per attention bucket */
    /* fused decode ops (norm_matmul, matmul_add): FORGE_GPU_FUSED=0 runs the plain ops */
    bool fused;
    /* F16/BF16 weights multiply activations rounded to the weight type, as ggml's CPU kernels
     * (and the CPU backend) do; false with f32_math (float activations, no reduced precision) */
    bool round_x;
    float *d_xr; /* one rounded activation row (max_in floats) */
    /* prompt attention on the tensor cores from this many tokens (FORGE_GPU_FATTN_MIN) */
    int fattn_min;
    /* device sampling: scratch, and the draw + penalty pairs copied in before each sample */
    void *d_sample;
    void *d_argmax; /* gpu_argmax_ex's scratch (zeroed once) */
    float *d_samp_par; /* [0] r, then int32 (id, count) pairs */
    float *h_samp_par; /* pinned: the same */
    gpu_event *ev_samp;
    bool ev_samp_used;
    char warning[640]; /* backend_gpu_warning: something degraded at creation, or "" */
} gpu_backend;

#define GPU_SAMPLE_MAX_PEN 4096 /* penalty pairs the device chain takes (more: host sampling) */

static gpu_backend *gb(backend *be)
{
    return (gpu_backend *)be;
}

/* ---- the library (process-wide, never unloaded: cudart registers exit handlers) -------------- */

static pthread_mutex_t g_lib_lock = PTHREAD_MUTEX_INITIALIZER;
static const gpu_api *g_api;

static int try_open(const char *path, const char *how, void **handle, forge_err *err)
{
    *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!*handle) {
        const char *e = dlerror();
        return forge_err_set(err, FORGE_E_UNSUPPORTED, "cannot load the GPU library %s (%s): %s",
                             path, how, e ? e : "unknown dlopen error");
    }
    return FORGE_OK;
}

/* Look for libforge_cuda.so: $FORGE_GPU_LIB when set (only there: an explicit choice that
 * fails is an error), else next to the executable, else the default library search path. */
static int load_api(const gpu_api **out, forge_err *err)
{
    int rc = FORGE_OK;
    void *h = NULL;
    char exe[4096];
    const char *opened = "libforge_cuda.so";
    pthread_mutex_lock(&g_lib_lock);
    if (g_api) goto done;
    const char *env = getenv("FORGE_GPU_LIB");
    if (env && *env) {
        if ((rc = try_open(env, "from FORGE_GPU_LIB", &h, err))) goto done;
        opened = env;
    } else {
        ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 32);
        if (n > 0) {
            exe[n] = '\0';
            char *slash = strrchr(exe, '/');
            if (slash) {
                strcpy(slash + 1, "libforge_cuda.so");
                if (access(exe, F_OK) == 0) {
                    if ((rc = try_open(exe, "next to the executable", &h, err))) goto done;
                    opened = exe;
                }
            }
        }
        if (!h && (rc = try_open("libforge_cuda.so",
                                 "default search path; set FORGE_GPU_LIB or "
                                 "build it with `make gpu`",
                                 &h, err)))
            goto done;
    }
    forge_gpu_get_api_fn get = NULL;
    *(void **)&get = dlsym(h, "forge_gpu_get_api");
    if (!get) {
        rc = forge_err_set(err, FORGE_E_UNSUPPORTED,
                           "the GPU library %s is not a Forge GPU library (no forge_gpu_get_api)",
                           opened);
        goto done;
    }
    const gpu_api *api = get(GPU_API_VERSION);
    if (!api || api->version != GPU_API_VERSION || !api->store || !api->attention_batch ||
        !api->store_at || !api->gemm_ex || !api->argmax_ex || !api->round_act) {
        rc = forge_err_set(err, FORGE_E_UNSUPPORTED,
                           "the GPU library %s does not provide interface version %d (rebuild "
                           "it with `make gpu`)",
                           opened, GPU_API_VERSION);
        goto done;
    }
    g_api = api;
    h = NULL; /* kept loaded */
done:
    if (h) dlclose(h);
    if (rc == FORGE_OK) *out = g_api;
    pthread_mutex_unlock(&g_lib_lock);
    return rc;
}

/* Load the library, check that gpu_index exists and select it. */
static int open_device(int gpu_index, const gpu_api **out, gpu_device_info *info, forge_err *err)
{
    const gpu_api *api = NULL;
    int rc, n = 0;
    if ((rc = load_api(&api, err))) return rc;
    if ((rc = api->device_count(&n, err))) {
        char msg[sizeof err->msg];
        snprintf(msg, sizeof msg, "%s", err ? err->msg : "");
        return forge_err_set(err, FORGE_E_DEVICE, "no usable %s GPU (driver or device missing): %s",
                             api->backend_name(), msg);
    }
    if (n == 0) return forge_err_set(err, FORGE_E_DEVICE, "no %s GPU found", api->backend_name());
    if (gpu_index < 0 || gpu_index >= n)
        return forge_err_set(err, FORGE_E_RANGE, "GPU %d does not exist (%d GPU%s found)",
                             gpu_index, n, n == 1 ? "" : "s");
    if ((rc = api->device_info_get(gpu_index, info, err))) return rc;
    if ((rc = api->set_device(gpu_index, err))) return rc;
    *out = api;
    return FORGE_OK;
}

int backend_gpu_probe(int gpu_index, char *desc, size_t desc_len, forge_err *err)
{
    const gpu_api *api = NULL;
    gpu_device_info info;
    int rc = open_device(gpu_index, &api, &info, err);
    if (rc) return rc;
    if (desc && desc_len)
        snprintf(desc, desc_len, "GPU %d: %s, %.1f GiB, %s", gpu_index, info.name,
                 (double)info.total_mem / (1 << 30), api->backend_name());
    return FORGE_OK;
}

int forge_gpu_probe(int32_t gpu_index, char *desc, size_t desc_len, forge_err *err)
{
    return backend_gpu_probe(gpu_index, desc, desc_len, err);
}

/* ---- helpers ----------------------------------------------------------------------------- */

/* Device memory of this backend: allocated and freed in its stream's order (gpu_ops.h), so a
 * free never waits for the device and never releases memory that queued work still uses. */
static int dalloc(gpu_backend *g, void **d_out, size_t bytes, forge_err *err)
{
    return g->api->malloc_async(d_out, bytes, g->st, err);
}

static void dfree(gpu_backend *g, void *d)
{
    (void)g->api->free_async(d, g->st, NULL);
}

/* The device copy of w in this backend's weight set, or NULL (not acquired, not a weight of
 * the set's model). */
static void *wdev(const gpu_backend *g, const be_weight *w)
{
    if (!w || !w->data || !g->wset || w->slot < 0 || w->slot >= g->wset->n) return NULL;
    return g->wset->d_w[w->slot];
}

static int check_buf(const be_buf *b, int64_t need, const char *what, forge_err *err)
{
    if (!b || need < 0 || b->n < need)
        return forge_err_set(err, FORGE_E_INTERNAL,
                             "gpu backend: %s buffer holds %lld floats, op needs %lld", what,
                             b ? (long long)b->n : -1LL, (long long)need);
    return FORGE_OK;
}

static void wrote(gpu_backend *g, be_buf *b)
{
    b->version = ++g->next_version;
}

static int need_plan(const gpu_backend *g, forge_err *err)
{
    if (!g->planned)
        return forge_err_set(err, FORGE_E_INTERNAL, "gpu backend used before backend_gpu_plan");
    return FORGE_OK;
}

static int check_weight(const gpu_backend *g, const be_weight *w, int64_t n_in, int64_t n_out,
                        const char *op, forge_err *err)
{
    if (!w || !wdev(g, w))
        return forge_err_set(err, FORGE_E_INTERNAL, "gpu backend %s: weight %s is not uploaded", op,
                             w && w->name ? w->name : "(null)");
    if ((n_in >= 0 && w->ne0 != n_in) || (n_out >= 0 && w->ne1 != n_out))
        return forge_err_set(
            err, FORGE_E_INTERNAL, "gpu backend %s: weight %s is %lld x %lld, op needs %lld x %lld",
            op, w->name, (long long)w->ne1, (long long)w->ne0, (long long)n_out, (long long)n_in);
    return FORGE_OK;
}

/* Recorded steps hold buffer addresses: drop them when any buffer, weight or cache changes. */
static void drop_graphs(gpu_backend *g)
{
    for (int i = 0; i < GPU_GRAPH_SLOTS; i++) {
        g->api->graph_free(g->graphs[i]);
        g->graphs[i] = NULL;
    }
}

/* Attention length bound of a decode step at pos: the power of two >= pos + 1 (at least
 * GPU_STEP_MIN_KV), at most n_ctx. *slot = its index (one recorded step each). */
static int64_t step_max_kv(int64_t n_ctx, int64_t pos, int *slot)
{
    int64_t m = GPU_STEP_MIN_KV;
    int i = 0;
    while (m < pos + 1 && i < GPU_GRAPH_SLOTS - 1) {
        m *= 2;
        i++;
    }
    if (slot) *slot = i;
    return m < n_ctx ? m : n_ctx;
}

static bool step_op(const gpu_backend *g, int n_tok)
{
    return g->in_step && n_tok == 1;
}

static int step_mismatch(const gpu_backend *g, const char *op, long long got, forge_err *err)
{
    return forge_err_set(err, FORGE_E_INTERNAL,
                         "gpu %s: inside a decode step of token %d at position %d, got %lld", op,
                         g->step_id, g->step_pos, got);
}

/* ---- buffers ----------------------------------------------------------------------------- */

static int gb_buf_create(backend *be, int64_t n, be_buf **out, forge_err *err)
{
    gpu_backend *g = gb(be);
    int rc;
    *out = NULL;
    if (n < 0)
        return forge_err_set(err, FORGE_E_INVALID, "gpu backend: buffer of %lld floats",
                             (long long)n);
    drop_graphs(g);
    be_buf *b = calloc(1, sizeof *b);
    if (!b) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    if ((rc = g->api->malloc_async((void **)&b->d, (size_t)(n > 0 ? n : 1) * sizeof(float), g->st,
                                   err))) {
        free(b);
        return rc;
    }
    b->n = n;
    *out = b;
    return FORGE_OK;
}

static void gb_buf_free(backend *be, be_buf *b)
{
    if (!b) return;
    gpu_backend *g = gb(be);
    if (g->xq_src == b) g->xq_src = NULL;
    drop_graphs(g); /* a graph launched before stays valid until it has run (runtime) */
    /* in stream order: work still queued that uses b->d (an interrupted prompt) runs first */
    (void)g->api->free_async(b->d, g->st, NULL);
    free(b);
}

static int gb_buf_read(backend *be, const be_buf *src, int64_t off, int64_t n, float *dst,
                       forge_err *err)
{
    gpu_backend *g = gb(be);
    int rc;
    if (off < 0)
        return forge_err_set(err, FORGE_E_INTERNAL, "gpu buf_read: offset %lld", (long long)off);
    if ((rc = check_buf(src, off + n, "read", err))) return rc;
    if (n == 0) return FORGE_OK;
    if ((rc = g->api->memcpy_d2h(dst, src->d + off, (size_t)n * sizeof(float), g->st, err)))
        return rc;
    return g->api->stream_sync(g->st, err);
}

/* ---- weights ----------------------------------------------------------------------------- */

/* Block-quantized types with GPU kernels (every type the traits table marks gpu: Q8_0, Q4_0,
 * Q4_1, Q5_0, Q5_1, Q2_K..Q6_K, IQ4_NL, IQ4_XS, TQ1_0, TQ2_0): re-packed at upload into their device
 * planes (still packed), activations quantized to Q8_0 blocks for the matvec, one matrix at a
 * time dequantized to F16 into the GEMM scratch for prompts. */
static bool is_quant(int type)
{
    const forge_type_traits *tr = forge_type_traits_get(type);
    return tr && tr->gpu && tr->block_size > 1;
}

int backend_gpu_check_weight(const be_weight *w, forge_err *err)
{
    const forge_type_traits *tr = w ? forge_type_traits_get(w->type) : NULL;
    if (!w || !w->data || (tr && tr->gpu)) return FORGE_OK;
    return forge_err_set(err, FORGE_E_UNSUPPORTED, "%s: type %s is not supported on the GPU yet",
                         w->name, ggml_type_name(w->type));
}

static int64_t rows_of(const be_weight *w)
{
    return w->ne1 > 0 ? w->ne1 : 1;
}

void backend_gpu_plan_add_weight(backend *be, be_gpu_plan *p, const be_weight *w)
{
    gpu_backend *g = gb(be);
    if (!w || !w->data) return;
    size_t b = g->api->weight_bytes(w->type, rows_of(w), w->ne0);
    p->weight_bytes += b ? (b + 255) / 256 * 256 : w->n_bytes;
    if (w->ne0 > p->max_in) p->max_in = w->ne0;
    if (is_quant(w->type) && rows_of(w) * w->ne0 > p->max_quant_elems)
        p->max_quant_elems = rows_of(w) * w->ne0;
}

/* Copy n bytes of host memory (the mapping) to d_dst through the pinned staging buffers: the
 * copy into one buffer overlaps the DMA out of the other. */
static int upload(gpu_backend *g, void *d_dst, const void *src, size_t n, forge_err *err)
{
    int rc = FORGE_OK;
    for (size_t off = 0, i = 0; off < n; off += GPU_STAGE_BYTES, i++) {
        int slot = (int)(i & 1);
        size_t len = n - off < GPU_STAGE_BYTES ? n - off : GPU_STAGE_BYTES;
        if (g->stage_used[slot] && (rc = g->api->event_sync(g->ev_stage[slot], err))) return rc;
        memcpy(g->h_stage[slot], (const char *)src + off, len);
        if ((rc = g->api->memcpy_h2d((char *)d_dst + off, g->h_stage[slot], len, g->st, err)))
            return rc;
        if ((rc = g->api->event_record(g->ev_stage[slot], g->st, err))) return rc;
        g->stage_used[slot] = true;
    }
    return rc;
}

/* Upload one weight into a fresh device buffer in the device layout (*d_out, allocated in the
 * stream's order). On failure nothing is left allocated. */
static int upload_weight(gpu_backend *g, const be_weight *w, void **d_out, forge_err *err)
{
    const gpu_api *api = g->api;
    void *d = NULL, *tmp = NULL;
    int rc;
    *d_out = NULL;
    const int64_t rows = rows_of(w);
    size_t bytes = api->weight_bytes(w->type, rows, w->ne0);
    if (bytes == 0)
        return forge_err_set(err, FORGE_E_UNSUPPORTED,
                             "tensor %s: type %s (%lld x %lld) is not supported by the GPU backend",
                             w->name, ggml_type_name(w->type), (long long)rows, (long long)w->ne0);
    if ((rc = api->malloc_async(&d, bytes, g->st, err))) goto fail;
    if (!is_quant(w->type)) {
        if (w->n_bytes < bytes) {
            rc = forge_err_set(err, FORGE_E_INTERNAL, "tensor %s: %llu bytes, expected %zu",
                               w->name, (unsigned long long)w->n_bytes, bytes);
            goto fail;
        }
        if ((rc = upload(g, d, w->data, bytes, err))) goto fail;
    } else {
        /* The CPU's traits table is the one source of block sizes: the library's device layout
         * must hold exactly the table's bytes (256 rows of 256 elements: every plane padding
         * vanishes), and the tensor must hold every block the re-packing reads. */
        const size_t row = ggml_row_size(w->type, w->ne0);
        if (api->weight_bytes(w->type, 256, 256) != 256 * ggml_row_size(w->type, 256) ||
            w->n_bytes < (uint64_t)rows * row) {
            rc = forge_err_set(err, FORGE_E_INTERNAL,
                               "tensor %s: type %s: the GPU library's block layout disagrees with "
                               "the type table, or the tensor holds %llu bytes for %lld rows of %zu",
                               w->name, ggml_type_name(w->type), (unsigned long long)w->n_bytes,
                               (long long)rows, row);
            goto fail;
        }
        /* the GGUF blocks go to a temporary device buffer, then are re-packed into d */
        if ((rc = api->malloc_async(&tmp, w->n_bytes, g->st, err))) goto fail;
        if ((rc = upload(g, tmp, w->data, w->n_bytes, err))) goto fail;
        if ((rc = api->weight_convert(w->type, tmp, d, rows, w->ne0, g->st, err))) goto fail;
        rc = api->free_async(tmp, g->st, err);
        tmp = NULL;
        if (rc) goto fail;
    }
    *d_out = d;
    return FORGE_OK;
fail:
    /* in stream order, after the copies and the conversion that use them */
    (void)api->free_async(tmp, g->st, NULL);
    (void)api->free_async(d, g->st, NULL);
    return rc;
}

/* Free a weight set's copies: the caller holds the registry's lock, the set is unlinked, and
 * every other holder's work is done (each released after synchronising its stream); g's own
 * work is ordered before the frees by its stream. */
static void wset_free(gpu_backend *g, be_wset *ws)
{
    if (!ws) return;
    for (int i = 0; ws->d_w && i < ws->n; i++)
        (void)g->api->free_async(ws->d_w[i], g->st, NULL);
    free(ws->d_w);
    free(ws);
}

static int gb_weights_acquire(backend *be, be_wshare *share, be_weight *const *ws, int n,
                              void (*progress)(uint64_t done, uint64_t total, void *user),
                              void *user, forge_err *err)
{
    gpu_backend *g = gb(be);
    be_wset *set = NULL;
    uint64_t total = 0, done = 0;
    int rc = FORGE_OK;
    if ((rc = need_plan(g, err))) return rc;
    if (g->wset) return forge_err_set(err, FORGE_E_INTERNAL, "gpu backend: weights acquired twice");
    if (n < 0) return forge_err_set(err, FORGE_E_INVALID, "gpu backend: %d weights", n);
    for (int i = 0; i < n; i++) {
        if (ws[i]->slot != i)
            return forge_err_set(err, FORGE_E_INTERNAL, "gpu backend: weight %s in slot %d of %d",
                                 ws[i]->name, (int)ws[i]->slot, i);
        total += ws[i]->n_bytes;
    }
    pthread_mutex_lock(&share->lock);
    for (set = share->head; set && set->dev != g->dev; set = set->next)
        ;
    if (set) {
        /* uploaded by another context on this GPU, which synchronised its stream after the
         * upload: usable from this stream at once */
        if (set->n != n) {
            rc = forge_err_set(err, FORGE_E_INTERNAL, "gpu backend: weight set of %d, model %d",
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
    drop_graphs(g);
    set = calloc(1, sizeof *set);
    if (!set || !(set->d_w = calloc((size_t)(n > 0 ? n : 1), sizeof *set->d_w))) {
        rc = forge_err_set(err, FORGE_E_NOMEM, "out of memory");
        goto fail;
    }
    set->dev = g->dev;
    set->n = n;
    for (int i = 0; i < n; i++) {
        if ((rc = upload_weight(g, ws[i], &set->d_w[i], err))) goto fail;
        done += ws[i]->n_bytes;
        if (progress) progress(done, total, user);
    }
    /* other contexts' streams will read the copies: the upload must be complete */
    if ((rc = g->api->stream_sync(g->st, err))) goto fail;
    set->refs = 1;
    set->next = share->head;
    share->head = set;
    goto done;
fail:
    wset_free(g, set);
    set = NULL;
    (void)g->api->stream_sync(g->st, NULL);
done:
    if (set) {
        g->wset = set;
        g->share = share;
    }
    pthread_mutex_unlock(&share->lock);
    return rc;
}

static void gb_weights_release(backend *be)
{
    gpu_backend *g = gb(be);
    be_wset *set = g->wset;
    if (!set) return;
    /* this backend's work that reads the weights (a replayed step, an interrupted prompt) must
     * be done before another context may free them */
    (void)g->api->stream_sync(g->st, NULL);
    drop_graphs(g);
    g->wset = NULL;
    pthread_mutex_lock(&g->share->lock);
    if (--set->refs == 0) {
        be_wset **pp = &g->share->head;
        while (*pp && *pp != set)
            pp = &(*pp)->next;
        if (*pp) *pp = set->next;
        wset_free(g, set);
    }
    pthread_mutex_unlock(&g->share->lock);
    g->share = NULL;
}

/* ---- the planner ------------------------------------------------------------------------- */

#define GIB(x) ((double)(x) / (1024.0 * 1024.0 * 1024.0))
/* cuBLAS workspace, the context's stream and the runtime's own allocations */
#define GPU_RESERVE_BYTES ((uint64_t)512 << 20)

int backend_gpu_plan(backend *be, const be_gpu_plan *p, forge_err *err)
{
    gpu_backend *g = gb(be);
    const gpu_api *api = g->api;
    int rc = FORGE_OK;
    if (g->planned) return forge_err_set(err, FORGE_E_INTERNAL, "backend_gpu_plan called twice");
    if (p->n_ctx < 1 || p->n_batch < 1 || p->kv_dim < 1 || p->n_head < 1 || p->head_dim < 1)
        return forge_err_set(err, FORGE_E_INVALID, "backend_gpu_plan: bad sizes");
    const char *gm = getenv("FORGE_GPU_GEMM_MIN");
    g->gemm_min = gm && atoi(gm) > 1 ? atoi(gm) : 32;
    /* f32_math: no reduced precision anywhere: no F16 GEMM, no F16 tensor-core attention, float
     * activations for F16/BF16 weights (prompts go through the matvec, token by token) */
    g->round_x = !p->f32_math;
    if (p->f32_math) g->gemm_min = INT32_MAX;
    const char *ab = getenv("FORGE_GPU_ATTN_BATCH");
    g->attn_batch = !(ab && !strcmp(ab, "0"));
    const char *fu = getenv("FORGE_GPU_FUSED");
    g->fused = !(fu && !strcmp(fu, "0"));
    const char *fa = getenv("FORGE_GPU_FATTN_MIN");
    g->fattn_min = fa && atoi(fa) > 1 && !p->f32_math ? atoi(fa) : g->gemm_min;
    const bool want_gemm = p->n_batch >= g->gemm_min;
    const uint64_t kv_elt = p->kv_type == FORGE_KV_F16 ? 2 : 4;
    const uint64_t kv_per_tok = 2ull * (uint64_t)p->n_layer * (uint64_t)p->kv_dim * kv_elt;
    const uint64_t kv_bytes = kv_per_tok * (uint64_t)p->n_ctx;
    const size_t attn = api->attn_scratch_bytes(p->n_head, p->head_dim, p->n_ctx);
    const size_t xq = api->act_q8_bytes(p->max_in > 0 ? (p->max_in + 31) / 32 * 32 : 32);
    const size_t xc = want_gemm ? (size_t)p->n_batch * (size_t)p->max_in * 2 : 0;
    const size_t wf16 = want_gemm ? (size_t)p->max_quant_elems * 2 : 0;
    const size_t samp = (p->n_vocab > 0 ? api->sample_scratch_bytes(p->n_vocab) : 0) +
                        (size_t)(p->max_in > 0 ? p->max_in : 1) * 4; /* + d_xr */
    const uint64_t scratch = (uint64_t)p->act_floats * 4 + attn + xq + xc + wf16 + samp +
                             (uint64_t)p->n_ctx * 4 + (uint64_t)p->n_batch * 4 + GPU_RESERVE_BYTES;
    size_t free_b = 0, total_b = 0;
    if ((rc = api->mem_info(&free_b, &total_b, err))) return rc;
    /* another context of the model on this GPU holds the weights already: shared, not counted */
    uint64_t weight_bytes = p->weight_bytes;
    if (p->share) {
        pthread_mutex_lock(&p->share->lock);
        for (const be_wset *ws = p->share->head; ws; ws = ws->next)
            if (ws->dev == g->dev) weight_bytes = 0;
        pthread_mutex_unlock(&p->share->lock);
    }
    const uint64_t need = weight_bytes + kv_bytes + scratch;
    if (need > free_b) {
        int64_t fit = free_b > weight_bytes + scratch
                          ? (int64_t)((free_b - weight_bytes - scratch) / kv_per_tok)
                          : 0;
        if (fit >= 1)
            return forge_err_set(
                err, FORGE_E_NOMEM,
                "the model does not fit on GPU %d: it needs %.2f GiB (weights %.2f, KV cache "
                "%.2f for %d tokens, scratch %.2f) but %.2f GiB of %.2f are free; -c %lld "
                "would fit",
                g->dev, GIB(need), GIB(weight_bytes), GIB(kv_bytes), p->n_ctx, GIB(scratch),
                GIB(free_b), GIB(total_b), (long long)fit);
        return forge_err_set(err, FORGE_E_NOMEM,
                             "the model does not fit on GPU %d: weights %.2f GiB + scratch %.2f "
                             "GiB, but %.2f GiB of %.2f are free (no context length would fit)",
                             g->dev, GIB(weight_bytes), GIB(scratch), GIB(free_b), GIB(total_b));
    }
    if ((rc = dalloc(g, &g->d_attn, attn, err))) return rc;
    g->attn_bytes = attn;
    if ((rc = dalloc(g, &g->d_xq, xq, err))) return rc;
    if ((rc = dalloc(g, (void **)&g->d_xr, (size_t)(p->max_in > 0 ? p->max_in : 1) * 4, err)))
        return rc;
    if ((rc = dalloc(g, (void **)&g->d_ids, (size_t)p->n_batch * 4, err))) return rc;
    if (samp && (rc = dalloc(g, &g->d_sample, samp, err))) return rc;
    if (want_gemm) {
        forge_err berr = {0};
        int brc = api->blas_create(&g->blas, &berr);
        if (brc) {
            /* prompts go through the matvec (slower, same numerics as decode); a HIP build has no
             * BLAS by design, anything else is worth saying (forge_context_warning) */
            g->blas = NULL;
            if (brc != FORGE_E_UNSUPPORTED)
                snprintf(g->warning, sizeof g->warning,
                         "GPU %d: the BLAS library could not be initialised (%s): prompts run "
                         "without GEMM, slower",
                         g->dev, berr.msg);
        } else {
            if ((rc = dalloc(g, &g->d_xc, xc, err))) return rc;
            if (wf16 && (rc = dalloc(g, &g->d_wf16, wf16, err))) return rc;
        }
    }
    g->max_in = p->max_in;
    g->max_quant_elems = p->max_quant_elems;
    g->n_batch = p->n_batch;
    g->planned = true;
    return FORGE_OK;
}

/* ---- KV cache ---------------------------------------------------------------------------- */

static void gb_kv_free(backend *be, be_kv *kv)
{
    if (!kv) return;
    gpu_backend *g = gb(be);
    drop_graphs(g);
    /* in stream order: an interrupted prompt's stores and attention may still be queued */
    dfree(g, kv->k);
    dfree(g, kv->v);
    free(kv);
}

static int gb_kv_create(backend *be, int n_layer, int n_ctx, int kv_dim, int kv_type, be_kv **out,
                        forge_err *err)
{
    gpu_backend *g = gb(be);
    const gpu_api *api = g->api;
    int32_t *pos = NULL;
    int rc;
    *out = NULL;
    drop_graphs(g);
    if (n_layer < 1 || n_ctx < 1 || kv_dim < 1 ||
        (kv_type != FORGE_KV_F32 && kv_type != FORGE_KV_F16))
        return forge_err_set(err, FORGE_E_INVALID, "gpu kv cache: bad shape or type");
    be_kv *kv = calloc(1, sizeof *kv);
    if (!kv) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    kv->n_layer = n_layer;
    kv->n_ctx = n_ctx;
    kv->kv_dim = kv_dim;
    kv->type = kv_type == FORGE_KV_F16 ? GGML_TYPE_F16 : GGML_TYPE_F32;
    kv->elt = kv_type == FORGE_KV_F16 ? 2 : 4;
    size_t bytes = (size_t)n_layer * (size_t)n_ctx * (size_t)kv_dim * kv->elt;
    if ((rc = dalloc(g, &kv->k, bytes, err)) || (rc = dalloc(g, &kv->v, bytes, err))) goto fail;
    if ((rc = api->memset(kv->k, 0, bytes, g->st, err)) ||
        (rc = api->memset(kv->v, 0, bytes, g->st, err)))
        goto fail;
    /* positions 0..n_ctx-1 on the device: RoPE and attention read theirs from here */
    if (!g->d_pos || g->n_ctx < n_ctx) {
        dfree(g, g->d_pos);
        g->d_pos = NULL;
        pos = malloc((size_t)n_ctx * sizeof *pos);
        if (!pos) {
            rc = forge_err_set(err, FORGE_E_NOMEM, "out of memory");
            goto fail;
        }
        for (int i = 0; i < n_ctx; i++)
            pos[i] = i;
        if ((rc = dalloc(g, (void **)&g->d_pos, (size_t)n_ctx * 4, err))) goto fail;
        if ((rc = api->memcpy_h2d(g->d_pos, pos, (size_t)n_ctx * 4, g->st, err))) goto fail;
        if ((rc = api->stream_sync(g->st, err))) goto fail;
        g->n_ctx = n_ctx;
    }
    free(pos);
    *out = kv;
    return FORGE_OK;
fail:
    free(pos);
    gb_kv_free(be, kv);
    return rc;
}

/* ---- ops --------------------------------------------------------------------------------- */

static int gb_get_rows(backend *be, be_buf *out, const be_weight *table, const int32_t *ids, int n,
                       forge_err *err)
{
    gpu_backend *g = gb(be);
    int rc;
    if ((rc = need_plan(g, err)) || (rc = check_weight(g, table, -1, -1, "get_rows", err)) ||
        (rc = check_buf(out, (int64_t)n * table->ne0, "get_rows out", err)))
        return rc;
    if (n < 1 || n > g->n_batch)
        return forge_err_set(err, FORGE_E_INTERNAL, "gpu get_rows: %d ids (batch %d)", n,
                             g->n_batch);
    const int32_t *d_ids = g->d_ids;
    if (step_op(g, n)) {
        /* the id is in d_small[0] already (step_begin) */
        if (ids[0] != g->step_id) return step_mismatch(g, "get_rows id", ids[0], err);
        d_ids = g->d_small;
    } else if ((rc = g->api->memcpy_h2d(g->d_ids, ids, (size_t)n * 4, g->st, err))) {
        /* from pageable memory: the runtime has copied ids when the call returns */
        return rc;
    }
    if ((rc = g->api->embed(table->type, wdev(g, table), table->ne1, table->ne0, d_ids, n, out->d,
                            g->st, err)))
        return rc;
    wrote(g, out);
    return FORGE_OK;
}

static int gb_rms_norm(backend *be, be_buf *out, const be_buf *x, const be_weight *w,
                       int64_t n_rows, int64_t dim, float eps, forge_err *err)
{
    gpu_backend *g = gb(be);
    int rc;
    if ((rc = check_weight(g, w, dim, -1, "rms_norm", err)) ||
        (rc = check_buf(x, n_rows * dim, "rms_norm x", err)) ||
        (rc = check_buf(out, n_rows * dim, "rms_norm out", err)))
        return rc;
    if (w->type != GGML_TYPE_F32)
        return forge_err_set(err, FORGE_E_UNSUPPORTED, "tensor %s: norm weights must be F32",
                             w->name);
    if ((rc = g->api->rmsnorm(x->d, wdev(g, w), out->d, dim, n_rows, eps, g->st, err))) return rc;
    wrote(g, out);
    return FORGE_OK;
}

/* y[t] = W x[t] by matvec, one token at a time (decode numerics). */
static int matmul_by_rows(gpu_backend *g, be_buf *y, const be_weight *w, const be_buf *x, int n_tok,
                          forge_err *err)
{
    const gpu_api *api = g->api;
    const int64_t n_in = w->ne0, n_out = w->ne1;
    const bool q = is_quant(w->type);
    int rc;
    for (int t = 0; t < n_tok; t++) {
        const float *xt = x->d + (int64_t)t * n_in;
        if (q) {
            bool cached =
                n_tok == 1 && g->xq_src == x && g->xq_version == x->version && g->xq_n_in == n_in;
            if (!cached) {
                if ((rc = api->act_quantize(xt, n_in, g->d_xq, g->st, err))) return rc;
                g->xq_src = n_tok == 1 ? x : NULL;
                g->xq_version = x->version;
                g->xq_n_in = n_in;
            }
        }
        if (g->round_x && (w->type == GGML_TYPE_F16 || w->type == GGML_TYPE_BF16)) {
            if ((rc = api->round_act(xt, g->d_xr, n_in, w->type, g->st, err))) return rc;
            xt = g->d_xr;
        }
        if ((rc = api->matvec(w->type, wdev(g, w), n_out, n_in, xt, g->d_xq,
                              y->d + (int64_t)t * n_out, g->st, err)))
            return rc;
    }
    if (q && n_tok > 1) g->xq_src = NULL;
    return FORGE_OK;
}

/* True when y = W x over n_tok rows goes through the BLAS GEMM (else matvec per token). */
static bool uses_gemm(const gpu_backend *g, const be_weight *w, int n_tok)
{
    return n_tok >= g->gemm_min && g->blas && n_tok <= g->n_batch && w->ne0 <= g->max_in;
}

/* y = W x (beta 0) or y += W x (beta 1, GEMM path only). */
static int matmul_impl(gpu_backend *g, be_buf *y, const be_weight *w, const be_buf *x, int n_tok,
                       float beta, forge_err *err)
{
    const gpu_api *api = g->api;
    int rc;
    if ((rc = check_weight(g, w, -1, -1, "matmul", err)) ||
        (rc = check_buf(x, (int64_t)n_tok * w->ne0, "matmul x", err)) ||
        (rc = check_buf(y, (int64_t)n_tok * w->ne1, "matmul y", err)))
        return rc;
    if (x == y) return forge_err_set(err, FORGE_E_INTERNAL, "gpu matmul: y aliases x");
    if (!uses_gemm(g, w, n_tok)) {
        if (beta != 0.0f)
            return forge_err_set(err, FORGE_E_INTERNAL, "gpu matmul: accumulation needs GEMM");
        rc = matmul_by_rows(g, y, w, x, n_tok, err);
    } else {
        const void *wd = wdev(g, w);
        int wt = w->type;
        if (is_quant(wt)) {
            if (!g->d_wf16 || w->ne0 * w->ne1 > g->max_quant_elems)
                return forge_err_set(err, FORGE_E_INTERNAL, "gpu matmul: no F16 scratch for %s",
                                     w->name);
            if ((rc = api->weight_to_f16(wt, wd, w->ne1, w->ne0, g->d_wf16, g->st, err))) return rc;
            wd = g->d_wf16;
            wt = GGML_TYPE_F16;
        }
        rc = api->gemm_ex(g->blas, wt, wd, w->ne1, w->ne0, x->d, n_tok, g->d_xc, y->d, beta, g->st,
                          err);
    }
    if (rc) return rc;
    wrote(g, y);
    return FORGE_OK;
}

static int gb_matmul(backend *be, be_buf *y, const be_weight *w, const be_buf *x, int n_tok,
                     forge_err *err)
{
    return matmul_impl(gb(be), y, w, x, n_tok, 0.0f, err);
}

/* One-token products of the n weights through the fused kernel? (same type and row length,
 * a row length it takes, uploaded) */
static bool fused_ok(const gpu_backend *g, int n, const be_weight *const *ws, int n_tok)
{
    if (!g->fused || n_tok != 1 || n < 1 || n > GPU_FMV_MAX_MATS) return false;
    for (int i = 0; i < n; i++)
        if (!ws[i] || !wdev(g, ws[i]) || ws[i]->type != ws[0]->type || ws[i]->ne0 != ws[0]->ne0)
            return false;
    return g->api->fused_matvec_supported(ws[0]->type, ws[0]->ne0) != 0;
}

static int gb_add_bias(backend *be, be_buf *y, const be_weight *b, int n_tok, forge_err *err);
static int gb_swiglu(backend *be, be_buf *out, const be_buf *gate, const be_buf *up, int64_t n,
                     forge_err *err);
static int gb_add(backend *be, be_buf *x, const be_buf *y, int64_t n, forge_err *err);

static int gb_norm_matmul(backend *be, int n, be_buf *const *ys, const be_weight *const *ws,
                          const be_weight *const *bs, const be_buf *x, const be_weight *norm,
                          float eps, bool swiglu, be_buf *hn, int n_tok, forge_err *err)
{
    gpu_backend *g = gb(be);
    int rc;
    if (n < 1 || n > GPU_FMV_MAX_MATS || (swiglu && (n != 2 || bs)))
        return forge_err_set(err, FORGE_E_INTERNAL, "gpu norm_matmul: %d weights%s", n,
                             swiglu ? " with swiglu" : "");
    const int64_t dim = ws[0]->ne0;
    if ((rc = check_weight(g, norm, dim, -1, "norm_matmul", err)) ||
        (rc = check_buf(x, (int64_t)n_tok * dim, "norm_matmul x", err)))
        return rc;
    bool fuse = fused_ok(g, n, ws, n_tok) && norm->type == GGML_TYPE_F32;
    for (int i = 0; fuse && bs && i < n; i++)
        fuse =
            !bs[i] || (bs[i]->type == GGML_TYPE_F32 && wdev(g, bs[i]) && bs[i]->ne0 == ws[i]->ne1);
    if (fuse) {
        gpu_fmv_args a;
        memset(&a, 0, sizeof a);
        a.wtype = ws[0]->type;
        a.n_mat = n;
        a.n_in = dim;
        a.d_x = x->d;
        a.in_mode = GPU_FMV_IN_RMSNORM;
        a.d_norm = wdev(g, norm);
        a.eps = eps;
        a.out_mode = swiglu ? GPU_FMV_OUT_SWIGLU : GPU_FMV_OUT_STORE;
        a.round_x = g->round_x;
        for (int i = 0; i < n; i++) {
            if ((rc = check_buf(ys[i], ws[i]->ne1, "norm_matmul y", err))) return rc;
            if (ys[i] == x) return forge_err_set(err, FORGE_E_INTERNAL, "gpu norm_matmul: y is x");
            a.mat[i].d_w = wdev(g, ws[i]);
            a.mat[i].n_out = ws[i]->ne1;
            a.mat[i].d_bias = bs && bs[i] ? wdev(g, bs[i]) : NULL;
            a.mat[i].d_y = ys[i]->d;
        }
        if ((rc = g->api->fused_matvec(&a, g->st, err))) return rc;
        for (int i = 0; i < n; i++)
            wrote(g, ys[i]);
        return FORGE_OK;
    }
    if ((rc = gb_rms_norm(be, hn, x, norm, n_tok, dim, eps, err))) return rc;
    for (int i = 0; i < n; i++)
        if ((rc = gb_matmul(be, ys[i], ws[i], hn, n_tok, err))) return rc;
    for (int i = 0; bs && i < n; i++)
        if (bs[i] && (rc = gb_add_bias(be, ys[i], bs[i], n_tok, err))) return rc;
    if (swiglu) return gb_swiglu(be, ys[0], ys[0], ys[1], (int64_t)n_tok * ws[0]->ne1, err);
    return FORGE_OK;
}

static int gb_matmul_add(backend *be, be_buf *x, const be_weight *w, const be_buf *h, be_buf *tmp,
                         int n_tok, forge_err *err)
{
    gpu_backend *g = gb(be);
    int rc;
    if ((rc = check_weight(g, w, -1, -1, "matmul_add", err)) ||
        (rc = check_buf(h, (int64_t)n_tok * w->ne0, "matmul_add h", err)) ||
        (rc = check_buf(x, (int64_t)n_tok * w->ne1, "matmul_add x", err)))
        return rc;
    if (x == h) return forge_err_set(err, FORGE_E_INTERNAL, "gpu matmul_add: x is h");
    if (fused_ok(g, 1, &w, n_tok)) {
        gpu_fmv_args a;
        memset(&a, 0, sizeof a);
        a.wtype = w->type;
        a.n_mat = 1;
        a.n_in = w->ne0;
        a.d_x = h->d;
        a.in_mode = GPU_FMV_IN_PLAIN;
        a.out_mode = GPU_FMV_OUT_ADD;
        a.round_x = g->round_x;
        a.mat[0].d_w = wdev(g, w);
        a.mat[0].n_out = w->ne1;
        a.mat[0].d_y = x->d;
        if ((rc = g->api->fused_matvec(&a, g->st, err))) return rc;
        wrote(g, x);
        return FORGE_OK;
    }
    if (uses_gemm(g, w, n_tok)) return matmul_impl(g, x, w, h, n_tok, 1.0f, err);
    if ((rc = gb_matmul(be, tmp, w, h, n_tok, err))) return rc;
    return gb_add(be, x, tmp, (int64_t)n_tok * w->ne1, err);
}

static int gb_add_bias(backend *be, be_buf *y, const be_weight *b, int n_tok, forge_err *err)
{
    gpu_backend *g = gb(be);
    int rc;
    if ((rc = check_weight(g, b, -1, -1, "add_bias", err)) ||
        (rc = check_buf(y, (int64_t)n_tok * b->ne0, "add_bias y", err)))
        return rc;
    if (b->type != GGML_TYPE_F32)
        return forge_err_set(err, FORGE_E_UNSUPPORTED, "tensor %s: biases must be F32", b->name);
    if ((rc = g->api->add_rows(y->d, wdev(g, b), n_tok, b->ne0, g->st, err))) return rc;
    wrote(g, y);
    return FORGE_OK;
}

/* be_rope -> the kernel's parameters; *d_pos = the positions of tokens pos0.. on the device (in
 * a decode step: the step's position in d_small). */
static int rope_params(gpu_backend *g, const be_rope *r, int pos0, int n_tok, gpu_rope_params *rp,
                       const int32_t **d_pos, forge_err *err)
{
    int rc;
    memset(rp, 0, sizeof *rp);
    rp->mode = r->mode == BE_ROPE_NEOX ? GPU_ROPE_NEOX : GPU_ROPE_NORM;
    rp->n_dims = r->n_rot;
    rp->freq_base = r->freq_base;
    rp->freq_scale = r->freq_scale;
    if (r->freq_factors) {
        if ((rc = check_weight(g, r->freq_factors, -1, -1, "rope", err))) return rc;
        rp->d_freq_factors = wdev(g, r->freq_factors);
    }
    rp->ext_factor = r->ext_factor;
    rp->attn_factor = r->attn_factor;
    rp->corr_dims[0] = r->corr_dims[0];
    rp->corr_dims[1] = r->corr_dims[1];
    if (pos0 < 0 || pos0 + n_tok > g->n_ctx)
        return forge_err_set(err, FORGE_E_INTERNAL, "gpu rope: positions %d..%d beyond %d", pos0,
                             pos0 + n_tok - 1, g->n_ctx);
    *d_pos = g->d_pos + pos0;
    if (step_op(g, n_tok)) {
        if (pos0 != g->step_pos) return step_mismatch(g, "rope position", pos0, err);
        *d_pos = g->d_small + 1;
    }
    return FORGE_OK;
}

static int gb_rope(backend *be, be_buf *x, int n_tok, int n_head, int head_dim, int pos0,
                   const be_rope *r, forge_err *err)
{
    gpu_backend *g = gb(be);
    int rc;
    if ((rc = check_buf(x, (int64_t)n_tok * n_head * head_dim, "rope x", err))) return rc;
    gpu_rope_params rp;
    const int32_t *d_pos = NULL;
    if ((rc = rope_params(g, r, pos0, n_tok, &rp, &d_pos, err))) return rc;
    if ((rc = g->api->rope_ext(x->d, n_tok, n_head, head_dim, &rp, d_pos, g->st, err))) return rc;
    wrote(g, x);
    return FORGE_OK;
}

/* The layer's cache rows: K and V bases of layer a->layer. */
static int attn_check(gpu_backend *g, const be_buf *out, const be_buf *q, const be_buf *k,
                      const be_buf *v, const be_kv *kv, const be_attn *a, char **kl, char **vl,
                      forge_err *err)
{
    const int64_t QD = (int64_t)a->n_head * a->head_dim, KD = (int64_t)a->n_head_kv * a->head_dim;
    int rc;
    if ((rc = need_plan(g, err)) || (rc = check_buf(q, a->n_tok * QD, "attention q", err)) ||
        (rc = check_buf(k, a->n_tok * KD, "attention k", err)) ||
        (rc = check_buf(v, a->n_tok * KD, "attention v", err)) ||
        (rc = check_buf(out, a->n_tok * QD, "attention out", err)))
        return rc;
    if (KD != kv->kv_dim || a->layer < 0 || a->layer >= kv->n_layer || a->pos0 < 0 ||
        a->pos0 + a->n_tok > kv->n_ctx || kv->n_ctx > g->n_ctx)
        return forge_err_set(err, FORGE_E_INTERNAL,
                             "gpu attention: layer %d positions %d+%d kv_dim %lld vs cache %d x %d",
                             a->layer, a->pos0, a->n_tok, (long long)KD, kv->n_ctx, kv->kv_dim);
    if (step_op(g, a->n_tok)) {
        if (a->pos0 != g->step_pos) return step_mismatch(g, "attention position", a->pos0, err);
        if (kv->n_ctx != g->n_ctx)
            return forge_err_set(err, FORGE_E_INTERNAL, "gpu attention: cache of %d, backend %d",
                                 kv->n_ctx, g->n_ctx);
    }
    const size_t layer_bytes = (size_t)kv->n_ctx * (size_t)kv->kv_dim * kv->elt;
    *kl = (char *)kv->k + (size_t)a->layer * layer_bytes;
    *vl = (char *)kv->v + (size_t)a->layer * layer_bytes;
    return FORGE_OK;
}

/* Attention of q over the cache rows 0..pos0+t (the new K/V already stored). */
static int attend(gpu_backend *g, be_buf *out, const be_buf *q, const be_kv *kv, const be_attn *a,
                  char *kl, char *vl, forge_err *err)
{
    const gpu_api *api = g->api;
    const int64_t QD = (int64_t)a->n_head * a->head_dim;
    int rc;
    gpu_attn_args args = {0};
    args.d_k = kl;
    args.d_v = vl;
    args.kv_type = kv->type;
    args.pos_stride = kv->kv_dim;
    args.head_stride = a->head_dim;
    args.n_head = a->n_head;
    args.n_kv_head = a->n_head_kv;
    args.head_dim = a->head_dim;
    args.scale = a->scale;
    args.d_scratch = g->d_attn;
    if (step_op(g, a->n_tok)) {
        /* position from d_small[1]: the same launches for every position */
        args.d_q = q->d;
        args.d_pos = g->d_small + 1;
        args.max_kv = step_max_kv(kv->n_ctx, a->pos0, NULL);
        args.d_out = out->d;
        if ((rc = api->attention(&args, g->st, err))) return rc;
    } else if (a->n_tok >= g->fattn_min && api->attention_prompt_supported(a->head_dim, kv->type)) {
        /* a long prompt chunk: flash attention on the tensor cores */
        args.d_q = q->d;
        args.d_out = out->d;
        if ((rc = api->attention_prompt(&args, a->n_tok, a->pos0, QD, QD, g->st, err))) return rc;
    } else if (a->n_tok > 1 && g->attn_batch) {
        /* causal prompt: query t attends positions 0..pos0+t (its position from d_pos); as many
         * queries per launch as the scratch holds with one split each */
        const int64_t per_q = (int64_t)a->n_head * (a->head_dim + 2) * (int64_t)sizeof(float);
        int64_t chunk = (int64_t)(g->attn_bytes / (size_t)per_q);
        if (chunk > 65535) chunk = 65535;
        if (chunk < 1)
            return forge_err_set(err, FORGE_E_INTERNAL, "gpu attention: scratch too small");
        for (int t0 = 0; t0 < a->n_tok; t0 += (int)chunk) {
            int64_t nq = a->n_tok - t0 < chunk ? a->n_tok - t0 : chunk;
            args.d_q = q->d + t0 * QD;
            args.d_out = out->d + t0 * QD;
            args.d_pos = g->d_pos + a->pos0 + t0;
            args.max_kv = a->pos0 + t0 + nq;
            if ((rc = api->attention_batch(&args, nq, QD, QD, g->attn_bytes, g->st, err)))
                return rc;
        }
    } else {
        for (int t = 0; t < a->n_tok; t++) {
            args.d_q = q->d + t * QD;
            args.d_pos = g->d_pos + a->pos0 + t;
            args.max_kv = a->pos0 + t + 1;
            args.d_out = out->d + t * QD;
            if ((rc = api->attention(&args, g->st, err))) return rc;
        }
    }
    return FORGE_OK;
}

static int gb_attention(backend *be, be_buf *out, const be_buf *q, const be_buf *k, const be_buf *v,
                        be_kv *kv, const be_attn *a, forge_err *err)
{
    gpu_backend *g = gb(be);
    const gpu_api *api = g->api;
    const int64_t KD = (int64_t)a->n_head_kv * a->head_dim;
    char *kl = NULL, *vl = NULL;
    int rc;
    if ((rc = attn_check(g, out, q, k, v, kv, a, &kl, &vl, err))) return rc;
    const size_t at = (size_t)a->pos0 * (size_t)kv->kv_dim * kv->elt;
    if (step_op(g, a->n_tok)) {
        if ((rc = api->store_at(k->d, kl, kv->type, KD, g->d_small + 1, kv->kv_dim, g->st, err)) ||
            (rc = api->store_at(v->d, vl, kv->type, KD, g->d_small + 1, kv->kv_dim, g->st, err)))
            return rc;
    } else if ((rc = api->store(k->d, kl + at, kv->type, a->n_tok * KD, g->st, err)) ||
               (rc = api->store(v->d, vl + at, kv->type, a->n_tok * KD, g->st, err))) {
        return rc;
    }
    if ((rc = attend(g, out, q, kv, a, kl, vl, err))) return rc;
    wrote(g, out);
    return FORGE_OK;
}

/* Q/K norms + RoPE + the K/V store in one launch, then attention. */
static int gb_attention_rope(backend *be, be_buf *out, be_buf *q, const be_buf *k, const be_buf *v,
                             be_kv *kv, const be_attn *a, const be_rope *r, const be_weight *q_norm,
                             const be_weight *k_norm, float eps, forge_err *err)
{
    gpu_backend *g = gb(be);
    char *kl = NULL, *vl = NULL;
    const int32_t *d_pos = NULL;
    gpu_rope_params rp;
    int rc;
    if (!g->fused) {
        /* FORGE_GPU_FUSED=0: the plain ops (k is this backend's own buffer: normed and rotated
         * in place, as the architecture code does without this op) */
        be_buf *kw = (be_buf *)k;
        if ((q_norm && (rc = gb_rms_norm(be, q, q, q_norm, (int64_t)a->n_tok * a->n_head,
                                         a->head_dim, eps, err))) ||
            (k_norm && (rc = gb_rms_norm(be, kw, kw, k_norm, (int64_t)a->n_tok * a->n_head_kv,
                                         a->head_dim, eps, err))) ||
            (rc = gb_rope(be, q, a->n_tok, a->n_head, a->head_dim, a->pos0, r, err)) ||
            (rc = gb_rope(be, kw, a->n_tok, a->n_head_kv, a->head_dim, a->pos0, r, err)))
            return rc;
        return gb_attention(be, out, q, k, v, kv, a, err);
    }
    if ((rc = attn_check(g, out, q, k, v, kv, a, &kl, &vl, err)) ||
        (rc = rope_params(g, r, a->pos0, a->n_tok, &rp, &d_pos, err)) ||
        (q_norm && (rc = check_weight(g, q_norm, a->head_dim, -1, "attention q_norm", err))) ||
        (k_norm && (rc = check_weight(g, k_norm, a->head_dim, -1, "attention k_norm", err))))
        return rc;
    if ((rc =
             g->api->qk_rope_store(q->d, k->d, v->d, a->n_tok, a->n_head, a->n_head_kv, a->head_dim,
                                   q_norm ? wdev(g, q_norm) : NULL, k_norm ? wdev(g, k_norm) : NULL,
                                   eps, &rp, d_pos, kl, vl, kv->type, kv->kv_dim, g->st, err)))
        return rc;
    wrote(g, q);
    if ((rc = attend(g, out, q, kv, a, kl, vl, err))) return rc;
    wrote(g, out);
    return FORGE_OK;
}

static int gb_swiglu(backend *be, be_buf *out, const be_buf *gate, const be_buf *up, int64_t n,
                     forge_err *err)
{
    gpu_backend *g = gb(be);
    int rc;
    if ((rc = check_buf(gate, n, "swiglu gate", err)) ||
        (rc = check_buf(up, n, "swiglu up", err)) || (rc = check_buf(out, n, "swiglu out", err)))
        return rc;
    if ((rc = g->api->swiglu(gate->d, up->d, out->d, n, g->st, err))) return rc;
    wrote(g, out);
    return FORGE_OK;
}

static int gb_add(backend *be, be_buf *x, const be_buf *y, int64_t n, forge_err *err)
{
    gpu_backend *g = gb(be);
    int rc;
    if ((rc = check_buf(x, n, "add x", err)) || (rc = check_buf(y, n, "add y", err))) return rc;
    if ((rc = g->api->add(x->d, y->d, x->d, n, g->st, err))) return rc;
    wrote(g, x);
    return FORGE_OK;
}

static int gb_copy_rows(backend *be, be_buf *dst, const be_buf *src, int64_t src_row,
                        int64_t n_rows, int64_t row_len, forge_err *err)
{
    gpu_backend *g = gb(be);
    int rc;
    if ((rc = check_buf(src, (src_row + n_rows) * row_len, "copy_rows src", err)) ||
        (rc = check_buf(dst, n_rows * row_len, "copy_rows dst", err)))
        return rc;
    if ((rc = g->api->memcpy_d2d(dst->d, src->d + src_row * row_len,
                                 (size_t)(n_rows * row_len) * sizeof(float), g->st, err)))
        return rc;
    wrote(g, dst);
    return FORGE_OK;
}

static int gb_argmax(backend *be, const be_buf *x, int64_t off, int64_t n, int32_t *out,
                     forge_err *err)
{
    gpu_backend *g = gb(be);
    const gpu_api *api = g->api;
    int rc;
    if (off < 0 || n < 1 || n > INT32_MAX)
        return forge_err_set(err, FORGE_E_INTERNAL, "gpu argmax: offset %lld, %lld values",
                             (long long)off, (long long)n);
    if ((rc = check_buf(x, off + n, "argmax", err))) return rc;
    if ((rc = api->argmax_ex(x->d + off, n, g->d_argmax, g->d_small + 2, g->st, err)) ||
        (rc = api->memcpy_d2h(g->h_small + 2, g->d_small + 2, 4, g->st, err)) ||
        (rc = api->stream_sync(g->st, err)))
        return rc;
    *out = g->h_small[2];
    return FORGE_OK;
}

/* The sampler chain on the device: the draw and the penalty pairs go to the device with one
 * copy from pinned memory, the chain runs there, one id comes back. */
static int gb_sample(backend *be, const be_buf *x, int64_t off, int64_t n, const be_sample *sp,
                     int32_t *out, forge_err *err)
{
    gpu_backend *g = gb(be);
    const gpu_api *api = g->api;
    int rc;
    if (sp->temperature > 0 && (sp->top_k < 1 || sp->top_k > GPU_SAMPLE_MAX_K))
        return forge_err_set(err, FORGE_E_UNSUPPORTED,
                             "device sampling needs top-k in 1..%d (got %d)", GPU_SAMPLE_MAX_K,
                             sp->top_k);
    if (sp->n_pen < 0 || sp->n_pen > GPU_SAMPLE_MAX_PEN)
        return forge_err_set(err, FORGE_E_UNSUPPORTED,
                             "device sampling takes at most %d penalised ids (got %d)",
                             GPU_SAMPLE_MAX_PEN, sp->n_pen);
    if (!g->d_sample || n < 1 || n > INT32_MAX || off < 0)
        return forge_err_set(err, FORGE_E_UNSUPPORTED, "device sampling: no scratch for %lld logits",
                             (long long)n);
    if ((rc = check_buf(x, off + n, "sample", err))) return rc;
    /* the pinned parameters of the last sample may still be in flight */
    if (g->ev_samp_used && (rc = api->event_sync(g->ev_samp, err))) return rc;
    g->h_samp_par[0] = sp->r;
    int32_t *pairs = (int32_t *)(g->h_samp_par + 1);
    for (int32_t i = 0; i < sp->n_pen; i++) {
        pairs[2 * i] = sp->pen_ids[i];
        pairs[2 * i + 1] = sp->pen_counts[i];
    }
    if ((rc = api->memcpy_h2d(g->d_samp_par, g->h_samp_par,
                              (size_t)(1 + 2 * sp->n_pen) * sizeof(float), g->st, err)) ||
        (rc = api->event_record(g->ev_samp, g->st, err)))
        return rc;
    g->ev_samp_used = true;
    gpu_sample_args a;
    memset(&a, 0, sizeof a);
    a.d_logits = x->d + off;
    a.n_vocab = n;
    a.temperature = sp->temperature;
    a.top_k = sp->top_k;
    a.top_p = sp->top_p;
    a.min_p = sp->min_p;
    a.repeat_penalty = sp->repeat_penalty;
    a.presence_penalty = sp->presence_penalty;
    a.frequency_penalty = sp->frequency_penalty;
    a.d_pen = sp->n_pen > 0 ? (const int32_t *)(g->d_samp_par + 1) : NULL;
    a.n_pen = sp->n_pen;
    a.d_r = g->d_samp_par;
    a.d_scratch = g->d_sample;
    a.d_out = g->d_small + 3;
    if ((rc = api->sample(&a, g->st, err)) ||
        (rc = api->memcpy_d2h(g->h_small + 3, g->d_small + 3, 4, g->st, err)) ||
        (rc = api->stream_sync(g->st, err)))
        return rc;
    *out = g->h_small[3];
    return FORGE_OK;
}

static int gb_step_begin(backend *be, int32_t id, int pos, bool *replayed, forge_err *err)
{
    gpu_backend *g = gb(be);
    const gpu_api *api = g->api;
    int rc, slot = 0;
    *replayed = false;
    if ((rc = need_plan(g, err))) return rc;
    if (g->capturing || pos < 0 || pos >= g->n_ctx)
        return forge_err_set(err, FORGE_E_INTERNAL, "gpu step_begin: position %d of %d%s", pos,
                             g->n_ctx, g->capturing ? " while recording" : "");
    /* the pinned copy of the last step may still be in flight */
    if (g->ev_small_used && (rc = api->event_sync(g->ev_small, err))) return rc;
    g->h_small[0] = id;
    g->h_small[1] = pos;
    if ((rc = api->memcpy_h2d(g->d_small, g->h_small, 2 * sizeof(int32_t), g->st, err)) ||
        (rc = api->event_record(g->ev_small, g->st, err)))
        return rc;
    g->ev_small_used = true;
    g->xq_src = NULL; /* a replay overwrites d_xq behind the host's back */
    g->step_id = id;
    g->step_pos = pos;
    (void)step_max_kv(g->n_ctx, pos, &slot);
    if (g->graph_on && g->graphs[slot]) {
        if ((rc = api->graph_launch(g->graphs[slot], g->st, err))) return rc;
        *replayed = true;
        return FORGE_OK;
    }
    g->in_step = true;
    if (g->graph_on) {
        if ((rc = api->graph_begin(g->st, err))) {
            if (g->graph_strict) {
                g->in_step = false;
                return rc;
            }
            g->graph_on = false; /* run this and later steps without graphs */
            return FORGE_OK;
        }
        g->capturing = true;
        g->step_slot = slot;
    }
    return FORGE_OK;
}

static int gb_step_end(backend *be, int status, bool *again, forge_err *err)
{
    gpu_backend *g = gb(be);
    const gpu_api *api = g->api;
    gpu_graph *gr = NULL;
    int rc = FORGE_OK;
    *again = false;
    if (g->capturing) {
        g->capturing = false;
        rc = api->graph_end(g->st, &gr, status ? NULL : err);
        if (status) {
            /* the forward pass failed (or was interrupted): nothing ran, nothing is kept */
            api->graph_free(gr);
            rc = FORGE_OK;
        } else if (rc) {
            /* recorded but not run: without graphs from now on, and the caller runs it again */
            api->graph_free(gr);
            if (g->graph_strict) goto done;
            g->graph_on = false;
            *again = true;
            return FORGE_OK; /* stays in the step */
        } else {
            g->graphs[g->step_slot] = gr;
            rc = api->graph_launch(gr, g->st, err);
        }
    }
done:
    g->in_step = false;
    return rc;
}

static void gb_destroy(backend *be)
{
    if (!be) return;
    gpu_backend *g = gb(be);
    const gpu_api *api = g->api;
    /* weights_release was called by the context; a failed create may still hold nothing */
    gb_weights_release(be);
    /* device memory in stream order (after whatever is still queued), then one wait: pinned
     * host memory, events, graphs and the BLAS handle are released only when the stream is idle */
    if (g->st) {
        dfree(g, g->d_xq);
        dfree(g, g->d_xr);
        dfree(g, g->d_xc);
        dfree(g, g->d_wf16);
        dfree(g, g->d_attn);
        dfree(g, g->d_pos);
        dfree(g, g->d_ids);
        dfree(g, g->d_small);
        dfree(g, g->d_sample);
        dfree(g, g->d_argmax);
        dfree(g, g->d_samp_par);
        (void)api->stream_sync(g->st, NULL);
    }
    drop_graphs(g);
    api->host_free(g->h_samp_par);
    api->event_destroy(g->ev_samp);
    api->host_free(g->h_small);
    api->event_destroy(g->ev_small);
    api->blas_free(g->blas);
    for (int i = 0; i < 2; i++) {
        api->event_destroy(g->ev_stage[i]);
        api->host_free(g->h_stage[i]);
    }
    api->ctx_free(g->ctx);
    free(g);
}

static int gb_activate(backend *be, forge_err *err)
{
    return gb(be)->api->set_device(gb(be)->dev, err);
}

const char *backend_gpu_warning(const backend *be)
{
    const gpu_backend *g = (const gpu_backend *)be;
    return g && g->warning[0] ? g->warning : NULL;
}

static const be_ops gpu_ops = {
    .name = "GPU",
    .destroy = gb_destroy,
    .buf_create = gb_buf_create,
    .buf_free = gb_buf_free,
    .buf_read = gb_buf_read,
    .weights_acquire = gb_weights_acquire,
    .weights_release = gb_weights_release,
    .activate = gb_activate,
    .kv_create = gb_kv_create,
    .kv_free = gb_kv_free,
    .get_rows = gb_get_rows,
    .rms_norm = gb_rms_norm,
    .matmul = gb_matmul,
    .add_bias = gb_add_bias,
    .rope = gb_rope,
    .attention = gb_attention,
    .swiglu = gb_swiglu,
    .add = gb_add,
    .copy_rows = gb_copy_rows,
    .argmax = gb_argmax,
    .step_begin = gb_step_begin,
    .step_end = gb_step_end,
    .norm_matmul = gb_norm_matmul,
    .matmul_add = gb_matmul_add,
    .attention_rope = gb_attention_rope,
    .sample = gb_sample,
};

int backend_gpu_create(int gpu_index, backend **out, forge_err *err)
{
    const gpu_api *api = NULL;
    gpu_device_info info;
    gpu_backend *g = NULL;
    int rc;
    *out = NULL;
    if ((rc = open_device(gpu_index, &api, &info, err))) return rc;
    g = calloc(1, sizeof *g);
    if (!g) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    g->base.ops = &gpu_ops;
    g->api = api;
    g->dev = gpu_index;
    g->gemm_min = 32;
    if ((rc = api->ctx_create(&g->ctx, err))) goto fail;
    g->st = api->ctx_stream(g->ctx);
    for (int i = 0; i < 2; i++) {
        if ((rc = api->host_alloc(&g->h_stage[i], GPU_STAGE_BYTES, err))) goto fail;
        if ((rc = api->event_create(&g->ev_stage[i], 0, err))) goto fail;
    }
    const size_t par = (size_t)(1 + 2 * GPU_SAMPLE_MAX_PEN) * sizeof(float);
    if ((rc = dalloc(g, (void **)&g->d_samp_par, par, err)) ||
        (rc = api->host_alloc((void **)&g->h_samp_par, par, err)) ||
        (rc = api->event_create(&g->ev_samp, 0, err)))
        goto fail;
    if ((rc = dalloc(g, &g->d_argmax, api->argmax_scratch_bytes(), err)) ||
        (rc = api->memset(g->d_argmax, 0, api->argmax_scratch_bytes(), g->st, err)))
        goto fail;
    if ((rc = dalloc(g, (void **)&g->d_small, 4 * sizeof(int32_t), err)) ||
        (rc = api->host_alloc((void **)&g->h_small, 4 * sizeof(int32_t), err)) ||
        (rc = api->event_create(&g->ev_small, 0, err)))
        goto fail;
    const char *ge = getenv("FORGE_GPU_GRAPH"), *sy = getenv("FORGE_GPU_SYNC");
    /* FORGE_GPU_SYNC=1 synchronises after every launch, which a capture forbids */
    g->graph_on = !(ge && !strcmp(ge, "0")) && !(sy && sy[0] == '1');
    g->graph_strict = g->graph_on && ge && !strcmp(ge, "1");
    *out = &g->base;
    return FORGE_OK;
fail:
    gb_destroy(&g->base);
    return rc;
}
