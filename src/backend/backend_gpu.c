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
 * into a scratch matrix first, except Q8_0/Q4_0 chunks of up to FORGE_GPU_MMQ_MAX rows (default
 * 64; 0: never): those multiply the quantized blocks on the int8 tensor cores (gpu_mmq, the
 * activations quantized to Q8_0 like the matvec's), which reads a quarter of the bytes. Causal
 * attention over several new tokens = the decode kernel with one more grid dimension over the
 * queries (gpu_attention_batch), each query reading its own position from a device array
 * 0..n_ctx-1; FORGE_GPU_ATTN_BATCH=0: one launch per query.
 *
 * Decode steps (step_begin/step_end, one token): the token id and the position are copied to a
 * small device array (d_small) before the step, and every op of the step reads them from there
 * (embedding, RoPE, the KV store, attention sized by a power-of-two bucket of the position), so
 * the step's launches are the same for every position. The first step of each bucket is captured
 * into a CUDA/HIP graph and later steps replay it: one launch instead of ~14 per layer.
 * FORGE_GPU_GRAPH=0 runs the same ops without graphs (bit-identical results); FORGE_GPU_SYNC=1
 * turns graphs off; FORGE_GPU_GRAPH=1 makes a failed capture an error instead of a silent
 * fallback. Graphs hold buffer addresses: any buffer, KV or weight (re)allocation drops them.
 *
 * Batches of many sequences (an engine, docs/ENGINE.md): batch_set copies the batch's positions,
 * slots, row -> sequence map and block tables to the device in one copy from pinned staging
 * (double buffered, each half reused only after an event shows its last copy done). A batch that
 * is one sequence over the identity table (a context) keeps the paths above; any other runs
 * RoPE at the device positions, the K/V store at the device slots (gpu_store_slots, or fused
 * into gpu_qk_rope_store_slots) and gpu_paged_attention (split-K over fixed splits through the
 * block tables: a row's result does not depend on the rest of the batch); a prompt chunk of at
 * least fattn_min rows runs the tensor-core kernel gathering K/V through its table
 * (gpu_attention_prompt_paged). Batches of 2 .. gemm_min - 1 rows multiply by gpu_matvec_multi
 * in launches of up to 16 rows (each weight read once per launch; each row's result
 * bit-identical to the one-row matvec; Q8_0/Q4_0 launches of 6 rows or more on the int8 tensor
 * cores, the same bits), and a paged batch of one row runs the fused decode
 * kernels in their batch-invariant mode (the separate ops' bits; types and shapes without that
 * mode take the separate ops), so a decode row gets the same bits alone or in any batch of fewer
 * than gemm_min rows (the GEMM from gemm_min rows is not batch invariant).
 * Engine decode steps (batch_step_begin/step_end: every row a sequence of its own, up to
 * GPU_BSTEP_ROWS rows, fewer than gemm_min when the GEMM is there) are recorded like a
 * context's steps, one graph per (rows, attention bucket): batch_step_begin copies the batch
 * arrays and the ids in (the recorded get_rows reads them there), sets the attention length to
 * the bucket (the paged kernel's splits past a row's own length do nothing), and replays. A
 * shape runs unrecorded the first time, so the scratch it needs has grown before it is
 * recorded; growing a scratch or the batch arrays drops every recording. A failed recording
 * turns engine recordings off (FORGE_GPU_GRAPH=1: an error). FORGE_GPU_ENGINE_STEPS=0 turns
 * this and the 17.. row launches off (GPU_ENGINE_STEPS_DEFAULT).
 * argmax_rows picks the greedy ids of many rows at once.
 *
 * The other architectures (issue 15: Gemma 2/3, Phi-3, GLM, mixtures of experts):
 * geglu / scale / softcap ops, attention soft-capping and sliding windows passed to every
 * attention kernel, and moe_ffn: routing on the device, the stacked expert matrices uploaded one
 * device matrix per expert (backend_gpu_plan_add_experts), per expert a multi-row matvec that
 * skips on the device the rows that did not pick it (GEMM over all rows once each expert
 * expects gemm_min rows),
 * and the weighted sum in ascending expert order (gb_moe_ffn; docs/GPU.md). */
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
#define GPU_BSTEP_ROWS 64   /* engine decode steps of up to this many rows are recorded */
/* Engine decode steps recorded as graphs, and decode batches of 17 .. gemm_min - 1 rows through
 * the multi-row matvec in launches of up to 16 rows: FORGE_GPU_ENGINE_STEPS=1 / 0, else this
 * (on since their first GPU run, eleventh session: docs/GPU.md). */
#define GPU_ENGINE_STEPS_DEFAULT 1

/* One GPU's copies of one model's weights (backend.h: be_wshare). Reference-counted: owned
 * jointly by the backends on that GPU that acquired it; guarded by the be_wshare's lock. */
struct be_wset {
    be_wset *next;
    int dev;    /* the GPU these pointers belong to: the key */
    int refs;   /* backends holding it */
    int n;      /* slots */
    void **d_w; /* n device copies (gpu_weight_bytes each), by be_weight.slot */
    int32_t *blocks; /* n: > 1 = stacked experts, each block a matrix of its own at
                      * d_w + b * wblock_stride (backend_gpu_plan_add_experts), else 0 */
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
    int mmq_max;       /* ... Q8_0/Q4_0 ones of at most this many through gpu_mmq (0: none) */
    void *d_xqq;       /* gpu_mmq's quantized rows (act_q8_bytes(mmq_max * max_in)) */
    /* which buffer, version and row count d_xqq holds */
    const be_buf *xqq_src;
    uint64_t xqq_version;
    int64_t xqq_n;
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
    /* engine decode steps (batch_step_begin/step_end): one recording per (rows, attention
     * bucket), all for one table stride; a shape runs unrecorded the first time (the scratch it
     * needs grows then) and is recorded the second time */
    bool bgraph_on;
    bool in_bstep;
    const int32_t *bstep_ids; /* the ids batch_step_begin staged, at d_bt + bstep_ids_off */
    size_t bstep_ids_off;
    int bstep_rows, bstep_slot, bstep_stride;
    gpu_graph *bgraphs[GPU_BSTEP_ROWS][GPU_GRAPH_SLOTS];
    unsigned char bseen[GPU_BSTEP_ROWS][GPU_GRAPH_SLOTS];
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
    /* the last batch_set (a pointer compared, never read after the pass) and its device copy:
     * pos [n_tok] | slot [n_tok] | row -> sequence [n_tok] | tables [n_seq * table_stride] */
    const be_batch *bt;
    bool bt_paged; /* not a one-sequence span: rope/attention run the paged kernels */
    int bt_max_kv; /* max pos + 1 */
    int32_t *d_bt, *h_bt[2];
    gpu_event *ev_bt[2];
    bool ev_bt_used[2];
    int bt_half;
    size_t bt_cap; /* int32 entries of d_bt and of each h_bt */
    void *d_paged; /* paged attention scratch (grown in stream order) */
    size_t paged_bytes;
    /* multi-row decode matvec: activations of up to GPU_MATVEC_MULTI_MAX rows, quantized
     * (d_xqm, with the buffer/version it holds) or rounded (d_xrm) */
    bool mv_multi; /* FORGE_GPU_MATVEC_MULTI=0 turns it off */
    bool mv_multi_big; /* more than GPU_MATVEC_MULTI_MAX rows in several launches */
    void *d_xqm;
    float *d_xrm;
    const be_buf *xqm_src;
    uint64_t xqm_version;
    int64_t xqm_n;
    int xqm_r0;
    /* argmax_rows: ids on the device and their pinned host copy */
    int32_t *d_amax, *h_amax;
    int amax_cap;
    /* stacked expert weights to upload as blocks (by slot; backend_gpu_plan_add_experts) */
    int32_t *wblocks;
    int n_wblocks;
    /* moe_ffn scratch for n_batch rows (one allocation, d_moe): routing (selected experts,
     * weights, run flags [n_expert][n_batch]), the expert's gate / up / down outputs, and the
     * inputs of its products prepared for the matvec (quantized or rounded: h, shared by the
     * gate and up products of every expert, and g, the down product's input) */
    int moe_ne, moe_k;
    int64_t moe_E, moe_F;
    void *d_moe;
    int32_t *d_msel, *d_mrun;
    float *d_mw, *d_mg, *d_mu, *d_my, *d_mxr_h, *d_mxr_g;
    void *d_mxq_h, *d_mxq_g;
} gpu_backend;

#define GPU_SAMPLE_MAX_PEN 4096 /* penalty pairs the device chain takes (more: host sampling) */

static gpu_backend *gb(backend *be)
{
    return (gpu_backend *)be;
}

/* ---- the library (process-wide, never unloaded: cudart registers exit handlers) -------------- */

static pthread_mutex_t g_lib_lock = PTHREAD_MUTEX_INITIALIZER;

/* While any stream of the process records a graph, CUDA forbids calls that synchronise the
 * device, and the recording breaks when another thread makes one (cuBLAS's handle destroy does;
 * so do frees of pinned memory): a backend's teardown waits until no backend records, and no
 * recording starts during one. Recordings share the lock (several engines may record at once);
 * a teardown takes it alone. */
static pthread_rwlock_t g_capture_lock = PTHREAD_RWLOCK_INITIALIZER;
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
        !api->store_at || !api->gemm_ex || !api->argmax_ex || !api->round_act ||
        !api->paged_attention || !api->matvec_multi || !api->argmax_rows ||
        !api->attention_prompt_paged || !api->geglu || !api->moe_route || !api->matvec_rows ||
        !api->comm_create || !api->comm_all_reduce_sum || !api->comm_all_gather_cols ||
        !api->matvec_multi_mats || !api->rmsnorm_q8 || !api->swiglu_q8) {
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

int backend_gpu_count(int *n, forge_err *err)
{
    const gpu_api *api = NULL;
    int rc;
    *n = 0;
    if ((rc = load_api(&api, err))) return rc;
    if ((rc = api->device_count(n, err))) {
        char msg[sizeof err->msg];
        snprintf(msg, sizeof msg, "%s", err ? err->msg : "");
        *n = 0;
        return forge_err_set(err, FORGE_E_DEVICE, "no usable %s GPU (driver or device missing): %s",
                             api->backend_name(), msg);
    }
    return FORGE_OK;
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
    for (int r = 0; r < GPU_BSTEP_ROWS; r++)
        for (int i = 0; i < GPU_GRAPH_SLOTS; i++) {
            g->api->graph_free(g->bgraphs[r][i]);
            g->bgraphs[r][i] = NULL;
            g->bseen[r][i] = 0;
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

/* ---- batches (batch_set) ----------------------------------------------------------------- */

/* Room for n int32 entries in the device batch arrays and both pinned halves. Growing waits for
 * the copies out of the old halves (their events) before freeing them; the device array is freed
 * in stream order. */
static int bt_reserve(gpu_backend *g, size_t n, forge_err *err)
{
    const gpu_api *api = g->api;
    int rc;
    if (n <= g->bt_cap) return FORGE_OK;
    if (g->capturing)
        return forge_err_set(err, FORGE_E_INTERNAL, "gpu batch arrays grow while recording");
    drop_graphs(g); /* recordings hold the old d_bt */
    n = n < 1024 ? 1024 : n + n / 2;
    for (int i = 0; i < 2; i++) {
        if (!g->ev_bt[i] && (rc = api->event_create(&g->ev_bt[i], 0, err))) return rc;
        if (g->ev_bt_used[i] && (rc = api->event_sync(g->ev_bt[i], err))) return rc;
        g->ev_bt_used[i] = false;
        api->host_free(g->h_bt[i]);
        g->h_bt[i] = NULL;
    }
    dfree(g, g->d_bt);
    g->d_bt = NULL;
    g->bt_cap = 0;
    for (int i = 0; i < 2; i++)
        if ((rc = api->host_alloc((void **)&g->h_bt[i], n * 4, err))) return rc;
    if ((rc = dalloc(g, (void **)&g->d_bt, n * 4, err))) return rc;
    g->bt_cap = n;
    return FORGE_OK;
}

typedef struct gb_span gb_span;
static int batch_span(int kv_rows, const be_batch *bt, gb_span *sp, forge_err *err);

/* The batch of the next ops. A one-sequence span (a context) needs nothing on the device (its
 * ops read d_pos / d_small, also inside a recorded step). Anything else: pos, slot, row ->
 * sequence and the tables go to the device in one copy from a pinned half whose previous copy
 * is done (its event), after checking that every slot and table entry is inside the cache. */
static int gb_batch_set(backend *be, const be_batch *b, forge_err *err);
static int need_paged(const gpu_backend *g, const be_batch *bt, forge_err *err);
static int rope_paged(gpu_backend *g, be_buf *x, int n_head, int head_dim, const be_batch *bt,
                      const be_rope *r, forge_err *err);

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

/* For a communicator only (comm.h), which moves the memory in this backend's stream order. */
static float *gb_buf_data(backend *be, be_buf *b)
{
    (void)be;
    return b ? b->d : NULL;
}

static void gb_buf_free(backend *be, be_buf *b)
{
    if (!b) return;
    gpu_backend *g = gb(be);
    if (g->xq_src == b) g->xq_src = NULL;
    if (g->xqm_src == b) g->xqm_src = NULL;
    if (g->xqq_src == b) g->xqq_src = NULL;
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

/* Bytes from one block of a stacked expert matrix to the next in its device copy: a whole
 * device-layout matrix of rows rows, padded to 256 for the planed types (plain types: exactly
 * the file's rows, so the blocked copy is the plain copy). */
static size_t wblock_stride(const gpu_api *api, int type, int64_t rows, int64_t n_in)
{
    size_t b = api->weight_bytes(type, rows, n_in);
    return is_quant(type) ? (b + 255) / 256 * 256 : b;
}

void backend_gpu_plan_add_experts(backend *be, be_gpu_plan *p, const be_weight *w, int n_blocks)
{
    gpu_backend *g = gb(be);
    if (!w || !w->data) return;
    if (n_blocks < 2 || w->ne1 % n_blocks || w->slot < 0) {
        backend_gpu_plan_add_weight(be, p, w);
        return;
    }
    if (w->slot >= g->n_wblocks) {
        const int n = w->slot + 64;
        int32_t *nb = realloc(g->wblocks, (size_t)n * sizeof *nb);
        if (!nb) { /* uploaded as one matrix: moe_ffn then reports it */
            backend_gpu_plan_add_weight(be, p, w);
            return;
        }
        memset(nb + g->n_wblocks, 0, (size_t)(n - g->n_wblocks) * sizeof *nb);
        g->wblocks = nb;
        g->n_wblocks = n;
    }
    g->wblocks[w->slot] = n_blocks;
    const int64_t rows = w->ne1 / n_blocks;
    p->weight_bytes += (uint64_t)n_blocks * wblock_stride(g->api, w->type, rows, w->ne0) + 256;
    if (w->ne0 > p->max_in) p->max_in = w->ne0;
    if (is_quant(w->type) && rows * w->ne0 > p->max_quant_elems)
        p->max_quant_elems = rows * w->ne0;
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
static int upload_weight(gpu_backend *g, const be_weight *w, int n_blocks, void **d_out,
                         forge_err *err)
{
    const gpu_api *api = g->api;
    void *d = NULL, *tmp = NULL;
    int rc;
    *d_out = NULL;
    const int64_t rows = rows_of(w);
    size_t bytes = api->weight_bytes(w->type, rows, w->ne0);
    /* stacked experts of a planed type: block b a device matrix of its own at b * stride */
    const bool blocked = n_blocks > 1 && rows % n_blocks == 0 && is_quant(w->type);
    const int64_t brows = blocked ? rows / n_blocks : rows;
    const size_t stride = blocked ? wblock_stride(api, w->type, brows, w->ne0) : 0;
    if (blocked && bytes) bytes = stride * (size_t)n_blocks;
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
        for (int64_t b = 0; b < (blocked ? n_blocks : 1); b++)
            if ((rc = api->weight_convert(w->type, (const char *)tmp + (size_t)b * brows * row,
                                          (char *)d + (size_t)b * stride, brows, w->ne0, g->st,
                                          err)))
                goto fail;
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
    free(ws->blocks);
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
    if (!set || !(set->d_w = calloc((size_t)(n > 0 ? n : 1), sizeof *set->d_w)) ||
        !(set->blocks = calloc((size_t)(n > 0 ? n : 1), sizeof *set->blocks))) {
        rc = forge_err_set(err, FORGE_E_NOMEM, "out of memory");
        goto fail;
    }
    set->dev = g->dev;
    set->n = n;
    for (int i = 0; i < n; i++) {
        set->blocks[i] = i < g->n_wblocks ? g->wblocks[i] : 0;
        if ((rc = upload_weight(g, ws[i], set->blocks[i], &set->d_w[i], err))) goto fail;
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

/* The moe_ffn scratch for n_batch rows (gpu_backend.d_moe): its bytes, and with assign the
 * pointers into g->d_moe. 0 without experts. */
static size_t moe_layout(gpu_backend *g, const be_gpu_plan *p, bool assign)
{
    const int ne = p->moe_n_expert, k = p->moe_n_used;
    if (ne < 1 || k < 1 || p->moe_n_embd < 1 || p->moe_n_ff < 1) return 0;
    const size_t nb = (size_t)p->n_batch, E = (size_t)p->moe_n_embd, F = (size_t)p->moe_n_ff;
    const size_t E32 = (E + 31) / 32 * 32, F32 = (F + 31) / 32 * 32;
    const size_t sizes[] = {
        nb * (size_t)k * 4,                           /* sel */
        nb * (size_t)k * 4,                           /* w */
        nb * (size_t)ne * 4,                          /* run */
        nb * F * 4,                                   /* g */
        nb * F * 4,                                   /* u */
        nb * E * 4,                                   /* y */
        nb * E * 4,                                   /* xr_h */
        nb * F * 4,                                   /* xr_g */
        g->api->act_q8_bytes((int64_t)(nb * E32)),    /* xq_h */
        g->api->act_q8_bytes((int64_t)(nb * F32)),    /* xq_g */
    };
    void **dst[] = {(void **)&g->d_msel, (void **)&g->d_mw,    (void **)&g->d_mrun,
                    (void **)&g->d_mg,   (void **)&g->d_mu,    (void **)&g->d_my,
                    (void **)&g->d_mxr_h, (void **)&g->d_mxr_g, &g->d_mxq_h,
                    &g->d_mxq_g};
    size_t off = 0;
    for (size_t i = 0; i < FORGE_ARRAY_LEN(sizes); i++) {
        if (assign) *dst[i] = (char *)g->d_moe + off;
        off += (sizes[i] + 255) / 256 * 256;
    }
    if (assign) {
        g->moe_ne = ne;
        g->moe_k = k;
        g->moe_E = (int64_t)E;
        g->moe_F = (int64_t)F;
    }
    return off;
}

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
    const char *mq = getenv("FORGE_GPU_MMQ_MAX");
    g->mmq_max = mq ? atoi(mq) : 64;
    if (g->mmq_max < 0 || !want_gemm) g->mmq_max = 0;
    if (g->mmq_max > p->n_batch) g->mmq_max = p->n_batch;
    const uint64_t kv_elt = p->kv_type == FORGE_KV_F16 ? 2 : 4;
    const uint64_t kv_per_tok = 2ull * (uint64_t)p->n_layer * (uint64_t)p->kv_dim * kv_elt;
    const uint64_t kv_bytes = kv_per_tok * (uint64_t)p->n_ctx;
    const size_t attn = api->attn_scratch_bytes(p->n_head, p->head_dim, p->n_ctx);
    const size_t xq = api->act_q8_bytes(p->max_in > 0 ? (p->max_in + 31) / 32 * 32 : 32);
    const size_t xc = want_gemm ? (size_t)p->n_batch * (size_t)p->max_in * 2 : 0;
    const size_t wf16 = want_gemm ? (size_t)p->max_quant_elems * 2 : 0;
    const size_t samp = (p->n_vocab > 0 ? api->sample_scratch_bytes(p->n_vocab) : 0) +
                        (size_t)(p->max_in > 0 ? p->max_in : 1) * 4; /* + d_xr */
    const int64_t in32 = p->max_in > 0 ? (p->max_in + 31) / 32 * 32 : 32;
    const char *mm = getenv("FORGE_GPU_MATVEC_MULTI");
    g->mv_multi = !(mm && !strcmp(mm, "0")) && p->n_batch >= 2;
    const size_t xqm = g->mv_multi ? api->act_q8_bytes(in32 * GPU_MATVEC_MULTI_MAX) : 0;
    const size_t xrm = g->mv_multi ? (size_t)in32 * GPU_MATVEC_MULTI_MAX * 4 : 0;
    const size_t xqq = g->mmq_max ? api->act_q8_bytes(in32 * g->mmq_max) : 0;
    const size_t moe = moe_layout(g, p, false);
    const uint64_t scratch = (uint64_t)p->act_floats * 4 + attn + xq + xc + wf16 + samp + xqm +
                             xrm + xqq + (uint64_t)p->n_ctx * 4 + (uint64_t)p->n_batch * 4 + moe +
                             GPU_RESERVE_BYTES;
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
    if (g->mv_multi && ((rc = dalloc(g, &g->d_xqm, xqm, err)) ||
                        (rc = dalloc(g, (void **)&g->d_xrm, xrm, err))))
        return rc;
    if (g->mmq_max && (rc = dalloc(g, &g->d_xqq, xqq, err))) return rc;
    if (p->n_seq_max > 1) {
        /* an engine: the batch arrays for n_batch rows and n_seq_max tables, now (they still
         * grow on demand) */
        const int64_t mb = p->max_blocks > 0 ? p->max_blocks : p->n_ctx / 16 + 1;
        if ((rc = bt_reserve(g, (size_t)(3 * (int64_t)p->n_batch + p->n_seq_max * mb), err)))
            return rc;
    }
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
    if (moe) {
        if ((rc = dalloc(g, &g->d_moe, moe, err))) return rc;
        (void)moe_layout(g, p, true);
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
    } else if (g->in_bstep) {
        /* batch_step_begin staged the ids with the batch */
        if (ids != g->bstep_ids || n != g->bstep_rows)
            return forge_err_set(err, FORGE_E_INTERNAL,
                                 "gpu get_rows: %d ids inside an engine step of %d rows", n,
                                 g->bstep_rows);
        d_ids = g->d_bt + g->bstep_ids_off;
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

/* True when the n_tok (>= 2) rows of a decode batch go through the multi-row matvec, in
 * launches of up to GPU_MATVEC_MULTI_MAX rows. */
static bool uses_multi(const gpu_backend *g, const be_weight *w, int n_tok)
{
    return g->mv_multi && g->d_xqm && n_tok >= 2 &&
           (n_tok <= GPU_MATVEC_MULTI_MAX || g->mv_multi_big) && w->ne0 <= g->max_in &&
           g->api->matvec_multi_supported(w->type, w->ne0);
}

/* d_xqm holds the Q8_0 blocks of the n_all values of x from row r0 on, as x is now. */
static void xqm_hold(gpu_backend *g, const be_buf *x, int r0, int64_t n_all)
{
    g->xqm_src = x;
    g->xqm_version = x->version;
    g->xqm_n = n_all;
    g->xqm_r0 = r0;
}

/* Make d_xqm hold them (one quantization serves every product of the same unchanged rows); xs:
 * row r0 of x. */
static int xqm_quantize(gpu_backend *g, const be_buf *x, const float *xs, int r0, int64_t n_all,
                        forge_err *err)
{
    int rc;
    if (g->xqm_src == x && g->xqm_version == x->version && g->xqm_n == n_all && g->xqm_r0 == r0)
        return FORGE_OK;
    if ((rc = g->api->act_quantize(xs, n_all, g->d_xqm, g->st, err))) return rc;
    xqm_hold(g, x, r0, n_all);
    return FORGE_OK;
}

/* The activations of a multi-row product of w-typed weights over the n_all values of x from row
 * r0 on, prepared as matmul_by_rows prepares one row's: quantized into d_xqm (one quantization
 * serves every product of the same unchanged rows) or, for F16/BF16 under round_x, rounded into
 * d_xrm. *xs: the floats the product reads. */
static int multi_act(gpu_backend *g, const be_weight *w, const be_buf *x, int r0, int64_t n_all,
                     const float **xs, forge_err *err)
{
    int rc;
    *xs = x->d + (int64_t)r0 * w->ne0;
    if (is_quant(w->type) && (rc = xqm_quantize(g, x, *xs, r0, n_all, err))) return rc;
    if (g->round_x && (w->type == GGML_TYPE_F16 || w->type == GGML_TYPE_BF16)) {
        if ((rc = g->api->round_act(*xs, g->d_xrm, n_all, w->type, g->st, err))) return rc;
        *xs = g->d_xrm;
    }
    return FORGE_OK;
}

/* y[t] = W x[t] for the rows r0 .. r0+n-1 (n <= GPU_MATVEC_MULTI_MAX), each weight read once;
 * bit-identical per row to matmul_by_rows. */
static int matmul_multi_chunk(gpu_backend *g, be_buf *y, const be_weight *w, const be_buf *x,
                              int r0, int n, forge_err *err)
{
    const int64_t n_in = w->ne0;
    const float *xs;
    int rc;
    if ((rc = multi_act(g, w, x, r0, (int64_t)n * n_in, &xs, err))) return rc;
    return g->api->matvec_multi(w->type, wdev(g, w), w->ne1, n_in, n, xs, g->d_xqm,
                                y->d + (int64_t)r0 * w->ne1, g->st, err);
}

/* y[t] = W x[t] for n_tok >= 2 rows, in chunks of up to GPU_MATVEC_MULTI_MAX rows (17 rows:
 * 9 + 8, so no chunk is a single row). */
static int matmul_multi_rows(gpu_backend *g, be_buf *y, const be_weight *w, const be_buf *x,
                             int n_tok, forge_err *err)
{
    const int n_chunks = (n_tok + GPU_MATVEC_MULTI_MAX - 1) / GPU_MATVEC_MULTI_MAX;
    int rc;
    for (int c = 0, r0 = 0; c < n_chunks; c++) {
        const int n = (n_tok - r0) / (n_chunks - c);
        if ((rc = matmul_multi_chunk(g, y, w, x, r0, n, err))) return rc;
        r0 += n;
    }
    return FORGE_OK;
}

static bool uses_gemm(const gpu_backend *g, const be_weight *w, int n_tok);

/* Whether a batch's layer merges its launches (several matrices in one multi-row launch, the
 * quantization in the RMSNorm's or SwiGLU's launch, the residual add in the product's):
 * FORGE_GPU_MULTI_MATS=0 runs each step on its own, for comparison. The bits are the same. */
static bool batch_merged(void)
{
    static volatile int env = -1; /* benign race: every thread computes the same value */
    if (env < 0) {
        const char *v = getenv("FORGE_GPU_MULTI_MATS");
        env = !(v && v[0] == '0');
    }
    return env != 0;
}

/* True when the product of w over a batch of n_tok rows reads the rows' Q8_0 blocks from d_xqm
 * in one piece (rows 0 .., as matmul_multi_chunk quantizes them), so that the RMSNorm or SwiGLU
 * before it may write them in its own launch (gpu_rmsnorm_q8, gpu_swiglu_q8). */
static bool reads_xqm_whole(const gpu_backend *g, const be_weight *w, int n_tok)
{
    return batch_merged() && n_tok <= GPU_MATVEC_MULTI_MAX && is_quant(w->type) && wdev(g, w) &&
           !uses_gemm(g, w, n_tok) && uses_multi(g, w, n_tok);
}

/* True when the n (>= 2) products ys[i] = ws[i] x of a batch of n_tok rows take one multi-row
 * launch (gpu_matvec_multi_mats): each would go through the multi-row matvec on its own, the
 * matrices share type and row length, and they split their rows alike, so every row keeps the
 * bits it gets alone. FORGE_GPU_MULTI_MATS=0 launches them one by one (comparison). */
static bool uses_multi_mats(const gpu_backend *g, int n, const be_weight *const *ws, int n_tok)
{
    if (!batch_merged() || n < 2 || n > GPU_MATVEC_MULTI_MATS || n_tok > GPU_MATVEC_MULTI_MAX ||
        !g->api->matvec_multi_mats_ok)
        return false;
    int64_t n_out[GPU_MATVEC_MULTI_MATS];
    for (int i = 0; i < n; i++) {
        if (!ws[i] || !wdev(g, ws[i]) || ws[i]->type != ws[0]->type || ws[i]->ne0 != ws[0]->ne0 ||
            uses_gemm(g, ws[i], n_tok) || !uses_multi(g, ws[i], n_tok))
            return false;
        n_out[i] = ws[i]->ne1;
    }
    return g->api->matvec_multi_mats_ok(ws[0]->type, n, n_out, ws[0]->ne0) != 0;
}

/* ys[i] = ws[i] x (add: ys[i] += ws[i] x) over n_tok rows in one launch (uses_multi_mats): the
 * rows quantized or rounded once (multi_act). */
static int matmul_multi_mats(gpu_backend *g, int n, be_buf *const *ys, const be_weight *const *ws,
                             const be_buf *x, int n_tok, bool add, forge_err *err)
{
    const be_weight *w = ws[0];
    const int64_t n_in = w->ne0, n_all = (int64_t)n_tok * n_in;
    const float *xs;
    int rc;
    const void *d_w[GPU_MATVEC_MULTI_MATS];
    int64_t n_out[GPU_MATVEC_MULTI_MATS];
    float *d_y[GPU_MATVEC_MULTI_MATS];
    if ((rc = check_buf(x, n_all, "matmul x", err))) return rc;
    for (int i = 0; i < n; i++) {
        if ((rc = check_weight(g, ws[i], -1, -1, "matmul", err)) ||
            (rc = check_buf(ys[i], (int64_t)n_tok * ws[i]->ne1, "matmul y", err)))
            return rc;
        if (ys[i] == x) return forge_err_set(err, FORGE_E_INTERNAL, "gpu matmul: y aliases x");
        d_w[i] = wdev(g, ws[i]);
        n_out[i] = ws[i]->ne1;
        d_y[i] = ys[i]->d;
    }
    if ((rc = multi_act(g, w, x, 0, n_all, &xs, err)) ||
        (rc = g->api->matvec_multi_mats(w->type, n, d_w, n_out, n_in, n_tok, xs, g->d_xqm, d_y,
                                        add, g->st, err)))
        return rc;
    for (int i = 0; i < n; i++)
        wrote(g, ys[i]);
    return FORGE_OK;
}

/* True when y = W x over n_tok rows goes through the BLAS GEMM (else matvec per token). */
static bool uses_gemm(const gpu_backend *g, const be_weight *w, int n_tok)
{
    return n_tok >= g->gemm_min && g->blas && n_tok <= g->n_batch && w->ne0 <= g->max_in;
}

/* y = W x over n_tok GEMM rows on the int8 tensor cores from the quantized blocks (gpu_mmq)? */
static bool uses_mmq(const gpu_backend *g, const be_weight *w, int n_tok)
{
    return n_tok <= g->mmq_max && g->d_xqq && w->ne0 <= g->max_in &&
           (w->type == GGML_TYPE_Q8_0 || w->type == GGML_TYPE_Q4_0) &&
           g->api->mmq_supported(w->type, w->ne0);
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
        rc = uses_multi(g, w, n_tok) ? matmul_multi_rows(g, y, w, x, n_tok, err)
                                     : matmul_by_rows(g, y, w, x, n_tok, err);
    } else if (uses_mmq(g, w, n_tok)) {
        /* one quantization of x serves every matrix that reads it unchanged (Q/K/V, gate/up) */
        const int64_t n_all = (int64_t)n_tok * w->ne0;
        if (!(g->xqq_src == x && g->xqq_version == x->version && g->xqq_n == n_all)) {
            if ((rc = api->act_quantize(x->d, n_all, g->d_xqq, g->st, err))) return rc;
            g->xqq_src = x;
            g->xqq_version = x->version;
            g->xqq_n = n_all;
        }
        rc = api->mmq(w->type, wdev(g, w), w->ne1, w->ne0, n_tok, g->d_xqq, y->d, w->ne1, beta,
                      g->st, err);
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

/* One-token products of the n weights through the fused kernel with output mode out_mode?
 * (same type and row length, a row length it takes, uploaded) A paged batch of one row (an
 * engine decoding one sequence) must get the bits that row gets in a multi-row batch (batch
 * invariance): there the fused kernel runs in its invariant mode, which gives the separate ops'
 * bits, and only where that mode exists (else the plain path). */
static bool fused_ok(const gpu_backend *g, int n, const be_weight *const *ws, int n_tok,
                     int out_mode)
{
    if (!g->fused || n_tok != 1 || n < 1 || n > GPU_FMV_MAX_MATS) return false;
    for (int i = 0; i < n; i++)
        if (!ws[i] || !wdev(g, ws[i]) || ws[i]->type != ws[0]->type || ws[i]->ne0 != ws[0]->ne0)
            return false;
    if (!g->api->fused_matvec_supported(ws[0]->type, ws[0]->ne0)) return false;
    if (!g->bt_paged) return true;
    gpu_fmv_args a;
    memset(&a, 0, sizeof a);
    a.wtype = ws[0]->type;
    a.n_mat = n;
    a.n_in = ws[0]->ne0;
    a.out_mode = out_mode;
    for (int i = 0; i < n; i++)
        a.mat[i].n_out = ws[i]->ne1;
    return g->api->fused_matvec_invariant(&a) != 0;
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
    bool fuse = fused_ok(g, n, ws, n_tok, swiglu ? GPU_FMV_OUT_SWIGLU : GPU_FMV_OUT_STORE) &&
                norm->type == GGML_TYPE_F32;
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
        a.invariant = g->bt_paged;
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
    /* matrices of different types that the fused kernel takes one by one (a Q4_K_M file's
     * Q6_K attn_v beside Q4_K attn_q/attn_k): one fused launch per type, not the plain path's
     * norm + quantize + matvec per matrix */
    bool split = !fuse && !swiglu && norm->type == GGML_TYPE_F32, mixed = false;
    for (int i = 1; i < n; i++)
        mixed = mixed || ws[i]->type != ws[0]->type;
    split = split && mixed; /* the same-type subsets below never split again */
    for (int i = 0; split && i < n; i++)
        split = fused_ok(g, 1, &ws[i], n_tok, GPU_FMV_OUT_STORE) && ws[i]->ne0 == dim;
    if (split) {
        bool done[GPU_FMV_MAX_MATS] = {false};
        for (int i = 0; i < n; i++) {
            if (done[i]) continue;
            be_buf *ys2[GPU_FMV_MAX_MATS];
            const be_weight *ws2[GPU_FMV_MAX_MATS], *bs2[GPU_FMV_MAX_MATS];
            int m = 0;
            for (int j = i; j < n; j++) {
                if (done[j] || ws[j]->type != ws[i]->type) continue;
                ys2[m] = ys[j];
                ws2[m] = ws[j];
                bs2[m++] = bs ? bs[j] : NULL;
                done[j] = true;
            }
            if ((rc = gb_norm_matmul(be, m, ys2, ws2, bs ? bs2 : NULL, x, norm, eps, false, hn,
                                     n_tok, err)))
                return rc;
        }
        return FORGE_OK;
    }
    /* the norm writes the quantized rows too when a product will read them */
    bool norm_q8 = false;
    for (int i = 0; i < n; i++)
        norm_q8 = norm_q8 || reads_xqm_whole(g, ws[i], n_tok);
    if (norm_q8 && hn != x && norm->type == GGML_TYPE_F32) {
        if ((rc = check_buf(hn, (int64_t)n_tok * dim, "norm_matmul hn", err)) ||
            (rc = g->api->rmsnorm_q8(x->d, wdev(g, norm), hn->d, dim, n_tok, eps, g->d_xqm, g->st,
                                     err)))
            return rc;
        wrote(g, hn);
        xqm_hold(g, hn, 0, (int64_t)n_tok * dim);
    } else if ((rc = gb_rms_norm(be, hn, x, norm, n_tok, dim, eps, err))) {
        return rc;
    }
    /* one launch for all the matrices, or (Q with 4x the rows of K/V may split its rows
     * differently) Q alone and one launch for K and V */
    int solo = n; /* matrices 0 .. solo - 1 one by one, the rest in one launch */
    if (uses_multi_mats(g, n, ws, n_tok))
        solo = 0;
    else if (n == 3 && uses_multi_mats(g, 2, ws + 1, n_tok))
        solo = 1;
    for (int i = 0; i < solo; i++)
        if ((rc = gb_matmul(be, ys[i], ws[i], hn, n_tok, err))) return rc;
    if (solo < n &&
        (rc = matmul_multi_mats(g, n - solo, ys + solo, ws + solo, hn, n_tok, false, err)))
        return rc;
    for (int i = 0; bs && i < n; i++)
        if (bs[i] && (rc = gb_add_bias(be, ys[i], bs[i], n_tok, err))) return rc;
    if (!swiglu) return FORGE_OK;
    /* the down projection of the same type (the usual case) reads the quantized rows */
    const int64_t n_ff = (int64_t)n_tok * ws[0]->ne1;
    if (!reads_xqm_whole(g, ws[0], n_tok) || ws[0]->ne1 % 32)
        return gb_swiglu(be, ys[0], ys[0], ys[1], n_ff, err);
    if ((rc = check_buf(ys[0], n_ff, "swiglu gate", err)) ||
        (rc = check_buf(ys[1], n_ff, "swiglu up", err)) ||
        (rc = g->api->swiglu_q8(ys[0]->d, ys[1]->d, ys[0]->d, n_ff, g->d_xqm, g->st, err)))
        return rc;
    wrote(g, ys[0]);
    xqm_hold(g, ys[0], 0, n_ff);
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
    if (fused_ok(g, 1, &w, n_tok, GPU_FMV_OUT_ADD)) {
        gpu_fmv_args a;
        memset(&a, 0, sizeof a);
        a.wtype = w->type;
        a.n_mat = 1;
        a.n_in = w->ne0;
        a.d_x = h->d;
        a.in_mode = GPU_FMV_IN_PLAIN;
        a.out_mode = GPU_FMV_OUT_ADD;
        a.round_x = g->round_x;
        a.invariant = g->bt_paged;
        a.mat[0].d_w = wdev(g, w);
        a.mat[0].n_out = w->ne1;
        a.mat[0].d_y = x->d;
        if ((rc = g->api->fused_matvec(&a, g->st, err))) return rc;
        wrote(g, x);
        return FORGE_OK;
    }
    if (uses_gemm(g, w, n_tok)) return matmul_impl(g, x, w, h, n_tok, 1.0f, err);
    /* a batch: the residual added by the product's launch */
    if (batch_merged() && n_tok <= GPU_MATVEC_MULTI_MAX && uses_multi(g, w, n_tok))
        return matmul_multi_mats(g, 1, &x, &w, h, n_tok, true, err);
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
static int rope_fill(gpu_backend *g, const be_rope *r, gpu_rope_params *rp, forge_err *err)
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
    return FORGE_OK;
}

static int rope_params(gpu_backend *g, const be_rope *r, int pos0, int n_tok, gpu_rope_params *rp,
                       const int32_t **d_pos, forge_err *err)
{
    int rc;
    if ((rc = rope_fill(g, r, rp, err))) return rc;
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

/* The layout the attention kernels of this file run: one sequence at positions
 * pos0..pos0+n_tok-1 in a contiguous cache (position p at row p). */
struct gb_span {
    int layer, pos0, n_tok, n_head, n_head_kv, head_dim;
    float scale;
    float softcap; /* be_attn's: 0 off */
    int window;    /* be_attn's: 0 all positions */
};

/* A batch as a span: one sequence over the identity table (one block of the whole cache, slot =
 * position), which is what a context runs. Batches of several sequences over block tables are
 * not on the GPU yet (docs/ENGINE.md): FORGE_E_UNSUPPORTED. */
static int batch_span(int kv_rows, const be_batch *bt, gb_span *sp, forge_err *err)
{
    if (!bt || bt->n_seq != 1 || bt->block_size != kv_rows || bt->n_table[0] != 1 ||
        bt->table[0] != 0 || bt->slot[0] != bt->pos[0])
        return forge_err_set(err, FORGE_E_UNSUPPORTED,
                             "the GPU backend runs one sequence over a contiguous cache only "
                             "(batch of %d sequences, blocks of %d, cache of %d rows)",
                             bt ? bt->n_seq : -1, bt ? bt->block_size : -1, kv_rows);
    sp->pos0 = bt->pos[0];
    sp->n_tok = bt->n_tok;
    return FORGE_OK;
}

static int gb_rope_span(backend *be, be_buf *x, int n_tok, int n_head, int head_dim, int pos0,
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

static int gb_rope(backend *be, be_buf *x, int n_head, int head_dim, const be_batch *bt,
                   const be_rope *r, forge_err *err)
{
    gb_span sp = {0};
    forge_err span_err = {0};
    if (batch_span(gb(be)->n_ctx, bt, &sp, &span_err)) {
        int rc = need_paged(gb(be), bt, err);
        return rc ? rc : rope_paged(gb(be), x, n_head, head_dim, bt, r, err);
    }
    return gb_rope_span(be, x, sp.n_tok, n_head, head_dim, sp.pos0, r, err);
}

/* ---- paged batches: RoPE at device positions, K/V at device slots, paged attention ---------- */

/* batch_set of b, and with ids (not NULL) the token ids too, after the tables */
static int batch_stage(gpu_backend *g, const be_batch *b, const int32_t *ids, forge_err *err)
{
    const gpu_api *api = g->api;
    gb_span sp;
    forge_err scratch_err = {0};
    int rc;
    g->bt = b;
    g->bt_paged = false;
    if ((rc = need_plan(g, err))) return rc;
    if (!b || b->n_tok < 1 || b->n_seq < 1 || b->block_size < 1 || b->table_stride < 1)
        return forge_err_set(err, FORGE_E_INTERNAL, "gpu batch_set: empty or malformed batch");
    if (batch_span(g->n_ctx, b, &sp, &scratch_err) == FORGE_OK) return FORGE_OK;
    if (g->capturing)
        return forge_err_set(err, FORGE_E_INTERNAL, "gpu batch_set: a paged batch in a recorded "
                                                    "decode step");
    const int n = b->n_tok, ns = b->n_seq;
    const size_t n_tab = (size_t)ns * (size_t)b->table_stride;
    int max_pos = 0;
    for (int r = 0; r < n; r++) {
        if (b->pos[r] < 0 || b->slot[r] < 0 || b->slot[r] >= g->n_ctx)
            return forge_err_set(err, FORGE_E_INTERNAL,
                                 "gpu batch_set: row %d at position %d, slot %d (cache of %d)", r,
                                 b->pos[r], b->slot[r], g->n_ctx);
        if (b->pos[r] > max_pos) max_pos = b->pos[r];
    }
    for (int s = 0; s < ns; s++) {
        const int32_t *tab = b->table + (size_t)s * b->table_stride;
        if (b->seq_start[s] < 0 || b->seq_start[s + 1] <= b->seq_start[s] ||
            b->seq_start[s + 1] > n || b->n_table[s] < 1 || b->n_table[s] > b->table_stride)
            return forge_err_set(err, FORGE_E_INTERNAL,
                                 "gpu batch_set: sequence %d rows %d..%d, %d table entries", s,
                                 b->seq_start[s], b->seq_start[s + 1], b->n_table[s]);
        for (int i = 0; i < b->n_table[s]; i++)
            if (tab[i] < 0 || (int64_t)tab[i] * b->block_size + b->block_size > g->n_ctx)
                return forge_err_set(err, FORGE_E_INTERNAL,
                                     "gpu batch_set: sequence %d table entry %d is block %d "
                                     "(blocks of %d, cache of %d)",
                                     s, i, tab[i], b->block_size, g->n_ctx);
        for (int r = b->seq_start[s]; r < b->seq_start[s + 1]; r++)
            if (b->pos[r] / b->block_size >= b->n_table[s])
                return forge_err_set(err, FORGE_E_INTERNAL,
                                     "gpu batch_set: row %d at position %d beyond its table of %d "
                                     "blocks",
                                     r, b->pos[r], b->n_table[s]);
    }
    const size_t need = 3 * (size_t)n + n_tab + (ids ? (size_t)n : 0);
    if ((rc = bt_reserve(g, need, err))) return rc;
    const int half = g->bt_half;
    g->bt_half ^= 1;
    /* the copy out of this half two passes ago must be done before it is overwritten */
    if (g->ev_bt_used[half] && (rc = api->event_sync(g->ev_bt[half], err))) return rc;
    int32_t *h = g->h_bt[half];
    memcpy(h, b->pos, (size_t)n * 4);
    memcpy(h + n, b->slot, (size_t)n * 4);
    for (int s = 0; s < ns; s++)
        for (int r = b->seq_start[s]; r < b->seq_start[s + 1]; r++)
            h[2 * n + r] = s;
    memcpy(h + 3 * n, b->table, n_tab * 4);
    if (ids) memcpy(h + 3 * n + n_tab, ids, (size_t)n * 4);
    /* the device array is rewritten after the previous pass's kernels (stream order) */
    if ((rc = api->memcpy_h2d(g->d_bt, h, need * 4, g->st, err)) ||
        (rc = api->event_record(g->ev_bt[half], g->st, err)))
        return rc;
    g->ev_bt_used[half] = true;
    g->bt_max_kv = max_pos + 1;
    g->bt_paged = true;
    return FORGE_OK;
}

static int gb_batch_set(backend *be, const be_batch *b, forge_err *err)
{
    gpu_backend *g = gb(be);
    if (g->in_bstep && b == g->bt && g->bt_paged) return FORGE_OK; /* staged by batch_step_begin */
    return batch_stage(g, b, NULL, err);
}

/* The ops of a batch that is not a span must run on the batch batch_set copied. */
static int need_paged(const gpu_backend *g, const be_batch *bt, forge_err *err)
{
    if (!bt || bt != g->bt || !g->bt_paged)
        return forge_err_set(err, FORGE_E_INTERNAL,
                             "gpu backend: a batch of %d sequences (blocks of %d) needs batch_set "
                             "before its rope/attention",
                             bt ? bt->n_seq : -1, bt ? bt->block_size : -1);
    return FORGE_OK;
}

static int rope_fill(gpu_backend *g, const be_rope *r, gpu_rope_params *rp, forge_err *err);

static int rope_paged(gpu_backend *g, be_buf *x, int n_head, int head_dim, const be_batch *bt,
                      const be_rope *r, forge_err *err)
{
    gpu_rope_params rp;
    int rc;
    if ((rc = check_buf(x, (int64_t)bt->n_tok * n_head * head_dim, "rope x", err)) ||
        (rc = rope_fill(g, r, &rp, err)))
        return rc;
    if ((rc = g->api->rope_ext(x->d, bt->n_tok, n_head, head_dim, &rp, g->d_bt, g->st, err)))
        return rc;
    wrote(g, x);
    return FORGE_OK;
}

/* Buffers and layer bases of a paged attention call. */
static int paged_check(gpu_backend *g, const be_buf *out, const be_buf *q, const be_buf *k,
                       const be_buf *v, const be_kv *kv, const be_attn *a, char **kl, char **vl,
                       forge_err *err)
{
    const int n = a->batch->n_tok;
    const int64_t QD = (int64_t)a->n_head * a->head_dim, KD = (int64_t)a->n_head_kv * a->head_dim;
    int rc;
    if ((rc = need_plan(g, err)) || (rc = need_paged(g, a->batch, err)) ||
        (rc = check_buf(q, n * QD, "attention q", err)) ||
        (rc = check_buf(k, n * KD, "attention k", err)) ||
        (rc = check_buf(v, n * KD, "attention v", err)) ||
        (rc = check_buf(out, n * QD, "attention out", err)))
        return rc;
    if (KD != kv->kv_dim || a->layer < 0 || a->layer >= kv->n_layer || kv->n_ctx != g->n_ctx)
        return forge_err_set(err, FORGE_E_INTERNAL,
                             "gpu paged attention: layer %d kv_dim %lld vs cache %d x %d (backend "
                             "%d rows)",
                             a->layer, (long long)KD, kv->n_ctx, kv->kv_dim, g->n_ctx);
    const size_t layer_bytes = (size_t)kv->n_ctx * (size_t)kv->kv_dim * kv->elt;
    *kl = (char *)kv->k + (size_t)a->layer * layer_bytes;
    *vl = (char *)kv->v + (size_t)a->layer * layer_bytes;
    return FORGE_OK;
}

#define GPU_PAGED_SCRATCH_MAX ((size_t)256 << 20) /* more rows run in several launches */

/* Attention of every row over its sequence (the new K/V already stored). */
static int paged_attend(gpu_backend *g, be_buf *out, const be_buf *q, const be_kv *kv,
                        const be_attn *a, char *kl, char *vl, forge_err *err)
{
    const gpu_api *api = g->api;
    const be_batch *bt = a->batch;
    const int n = bt->n_tok;
    int rc;
    size_t want = api->paged_scratch_bytes(n, a->n_head, a->head_dim, g->bt_max_kv);
    const size_t one = api->paged_scratch_bytes(1, a->n_head, a->head_dim, g->bt_max_kv);
    if (want > GPU_PAGED_SCRATCH_MAX)
        want = one > GPU_PAGED_SCRATCH_MAX ? one : GPU_PAGED_SCRATCH_MAX;
    if (g->paged_bytes < want) {
        if (g->capturing)
            return forge_err_set(err, FORGE_E_INTERNAL,
                                 "gpu paged attention: scratch grows while recording");
        drop_graphs(g);       /* recordings hold the old scratch */
        dfree(g, g->d_paged); /* in stream order: earlier launches keep theirs */
        g->d_paged = NULL;
        g->paged_bytes = 0;
        if ((rc = dalloc(g, &g->d_paged, want, err))) return rc;
        g->paged_bytes = want;
    }
    const int64_t QD = (int64_t)a->n_head * a->head_dim;
    const bool fa = api->attention_prompt_supported(a->head_dim, kv->type);
    gpu_paged_args pa;
    memset(&pa, 0, sizeof pa);
    pa.d_q = q->d;
    pa.d_k = kl;
    pa.d_v = vl;
    pa.kv_type = kv->type;
    pa.row_stride = kv->kv_dim;
    pa.n_head = a->n_head;
    pa.n_kv_head = a->n_head_kv;
    pa.head_dim = a->head_dim;
    pa.n_rows = n;
    pa.d_pos = g->d_bt;
    pa.d_row_seq = g->d_bt + 2 * n;
    pa.d_table = g->d_bt + 3 * n;
    pa.table_stride = bt->table_stride;
    pa.block_size = bt->block_size;
    pa.max_kv = g->bt_max_kv;
    pa.scale = a->scale;
    pa.softcap = a->softcap;
    pa.window = a->window;
    pa.d_scratch = g->d_paged;
    pa.scratch_bytes = g->paged_bytes;
    pa.d_out = out->d;
    /* prompt chunks of at least fattn_min rows: the tensor-core kernel, gathering K/V through
     * the sequence's table, one launch per chunk; the rows of the other sequences (runs of
     * consecutive ones) through the paged kernel */
    int r_run = 0; /* first row of the current run of paged-kernel rows */
    for (int s = 0; s <= bt->n_seq; s++) {
        const int r0 = s < bt->n_seq ? bt->seq_start[s] : n;
        const int nq = s < bt->n_seq ? bt->seq_start[s + 1] - r0 : 0;
        const bool by_fa = s < bt->n_seq && fa && nq >= g->fattn_min;
        if ((by_fa || s == bt->n_seq) && r0 > r_run) {
            gpu_paged_args run = pa;
            run.d_q = q->d + (int64_t)r_run * QD;
            run.d_out = out->d + (int64_t)r_run * QD;
            run.n_rows = r0 - r_run;
            run.d_pos = pa.d_pos + r_run;
            run.d_row_seq = pa.d_row_seq + r_run;
            if ((rc = api->paged_attention(&run, g->st, err))) return rc;
        }
        if (!by_fa) continue;
        gpu_attn_args fa_args = {0};
        fa_args.d_q = q->d + (int64_t)r0 * QD;
        fa_args.d_k = kl;
        fa_args.d_v = vl;
        fa_args.kv_type = kv->type;
        fa_args.pos_stride = kv->kv_dim;
        fa_args.head_stride = a->head_dim;
        fa_args.n_head = a->n_head;
        fa_args.n_kv_head = a->n_head_kv;
        fa_args.head_dim = a->head_dim;
        fa_args.scale = a->scale;
        fa_args.softcap = a->softcap;
        fa_args.window = a->window;
        fa_args.d_out = out->d + (int64_t)r0 * QD;
        if ((rc = api->attention_prompt_paged(&fa_args, nq, bt->pos[r0], QD, QD,
                                              pa.d_table + (size_t)s * bt->table_stride,
                                              bt->block_size, g->st, err)))
            return rc;
        r_run = r0 + nq;
    }
    wrote(g, out);
    return FORGE_OK;
}

static int attention_paged(gpu_backend *g, be_buf *out, const be_buf *q, const be_buf *k,
                           const be_buf *v, be_kv *kv, const be_attn *a, forge_err *err)
{
    const gpu_api *api = g->api;
    const int n = a->batch->n_tok;
    const int64_t KD = (int64_t)a->n_head_kv * a->head_dim;
    char *kl = NULL, *vl = NULL;
    int rc;
    if ((rc = paged_check(g, out, q, k, v, kv, a, &kl, &vl, err))) return rc;
    const int32_t *d_slot = g->d_bt + n;
    if ((rc = api->store_slots(k->d, kl, kv->type, KD, n, d_slot, kv->kv_dim, g->st, err)) ||
        (rc = api->store_slots(v->d, vl, kv->type, KD, n, d_slot, kv->kv_dim, g->st, err)))
        return rc;
    return paged_attend(g, out, q, kv, a, kl, vl, err);
}

/* The layer's cache rows: K and V bases of layer a->layer. */
static int attn_check(gpu_backend *g, const be_buf *out, const be_buf *q, const be_buf *k,
                      const be_buf *v, const be_kv *kv, const gb_span *a, char **kl, char **vl,
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
static int attend(gpu_backend *g, be_buf *out, const be_buf *q, const be_kv *kv, const gb_span *a,
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
    args.softcap = a->softcap;
    args.window = a->window;
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

/* a as a span (batch_span), with its heads */
static int attn_span(const be_kv *kv, const be_attn *a, gb_span *sp, forge_err *err)
{
    int rc = batch_span(kv->n_ctx, a->batch, sp, err);
    sp->layer = a->layer;
    sp->n_head = a->n_head;
    sp->n_head_kv = a->n_head_kv;
    sp->head_dim = a->head_dim;
    sp->scale = a->scale;
    sp->softcap = a->softcap;
    sp->window = a->window;
    return rc;
}

static int attention_span(backend *be, be_buf *out, const be_buf *q, const be_buf *k,
                          const be_buf *v, be_kv *kv, const gb_span *a, forge_err *err)
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

/* Score soft-capping and sliding windows (Gemma 2/3, Phi-3) run in every attention kernel
 * (gpu_attn_args / gpu_paged_args softcap and window); this checks the values. */
static int attn_features_ok(const be_attn *a, forge_err *err)
{
    if (a && (!(a->softcap >= 0.0f) || a->window < 0))
        return forge_err_set(err, FORGE_E_INTERNAL, "gpu attention: softcap %g, window %d",
                             (double)a->softcap, a->window);
    return FORGE_OK;
}

static int gb_attention(backend *be, be_buf *out, const be_buf *q, const be_buf *k, const be_buf *v,
                        be_kv *kv, const be_attn *ba, forge_err *err)
{
    gb_span sp = {0};
    forge_err span_err = {0};
    if (attn_features_ok(ba, err)) return FORGE_E_INTERNAL;
    if (attn_span(kv, ba, &sp, &span_err))
        return attention_paged(gb(be), out, q, k, v, kv, ba, err);
    return attention_span(be, out, q, k, v, kv, &sp, err);
}

/* A paged batch: the same steps with RoPE at the device positions and the K/V store at the
 * device slots (fused: one launch; FORGE_GPU_FUSED=0: the plain ops). */
static int attention_rope_paged(gpu_backend *g, be_buf *out, be_buf *q, const be_buf *k,
                                const be_buf *v, be_kv *kv, const be_attn *a, const be_rope *r,
                                const be_weight *q_norm, const be_weight *k_norm, float eps,
                                forge_err *err)
{
    backend *be = &g->base;
    const int n = a->batch->n_tok;
    char *kl = NULL, *vl = NULL;
    gpu_rope_params rp;
    int rc;
    if ((rc = paged_check(g, out, q, k, v, kv, a, &kl, &vl, err))) return rc;
    if (!g->fused) {
        be_buf *kw = (be_buf *)k; /* normed and rotated in place, as without this op */
        if ((q_norm && (rc = gb_rms_norm(be, q, q, q_norm, (int64_t)n * a->n_head, a->head_dim,
                                         eps, err))) ||
            (k_norm && (rc = gb_rms_norm(be, kw, kw, k_norm, (int64_t)n * a->n_head_kv,
                                         a->head_dim, eps, err))) ||
            (rc = rope_paged(g, q, a->n_head, a->head_dim, a->batch, r, err)) ||
            (rc = rope_paged(g, kw, a->n_head_kv, a->head_dim, a->batch, r, err)))
            return rc;
        return attention_paged(g, out, q, k, v, kv, a, err);
    }
    if ((rc = rope_fill(g, r, &rp, err)) ||
        (q_norm && (rc = check_weight(g, q_norm, a->head_dim, -1, "attention q_norm", err))) ||
        (k_norm && (rc = check_weight(g, k_norm, a->head_dim, -1, "attention k_norm", err))))
        return rc;
    if ((rc = g->api->qk_rope_store_slots(
             q->d, k->d, v->d, n, a->n_head, a->n_head_kv, a->head_dim,
             q_norm ? wdev(g, q_norm) : NULL, k_norm ? wdev(g, k_norm) : NULL, eps, &rp, g->d_bt,
             g->d_bt + n, kl, vl, kv->type, kv->kv_dim, g->st, err)))
        return rc;
    wrote(g, q);
    return paged_attend(g, out, q, kv, a, kl, vl, err);
}

/* Q/K norms + RoPE + the K/V store in one launch, then attention. */
static int gb_attention_rope(backend *be, be_buf *out, be_buf *q, const be_buf *k, const be_buf *v,
                             be_kv *kv, const be_attn *ba, const be_rope *r,
                             const be_weight *q_norm, const be_weight *k_norm, float eps,
                             forge_err *err)
{
    gpu_backend *g = gb(be);
    char *kl = NULL, *vl = NULL;
    const int32_t *d_pos = NULL;
    gpu_rope_params rp;
    gb_span sp = {0};
    const gb_span *a = &sp;
    forge_err span_err = {0};
    int rc;
    if (attn_features_ok(ba, err)) return FORGE_E_INTERNAL;
    if (attn_span(kv, ba, &sp, &span_err))
        return attention_rope_paged(g, out, q, k, v, kv, ba, r, q_norm, k_norm, eps, err);
    if (!g->fused) {
        /* FORGE_GPU_FUSED=0: the plain ops (k is this backend's own buffer: normed and rotated
         * in place, as the architecture code does without this op) */
        be_buf *kw = (be_buf *)k;
        if ((q_norm && (rc = gb_rms_norm(be, q, q, q_norm, (int64_t)a->n_tok * a->n_head,
                                         a->head_dim, eps, err))) ||
            (k_norm && (rc = gb_rms_norm(be, kw, kw, k_norm, (int64_t)a->n_tok * a->n_head_kv,
                                         a->head_dim, eps, err))) ||
            (rc = gb_rope_span(be, q, a->n_tok, a->n_head, a->head_dim, a->pos0, r, err)) ||
            (rc = gb_rope_span(be, kw, a->n_tok, a->n_head_kv, a->head_dim, a->pos0, r, err)))
            return rc;
        return attention_span(be, out, q, k, v, kv, a, err);
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

/* ---- ops of the other architectures (Gemma, mixtures of experts) ---------------------------- */

/* GELU-gated: the CPU's numerics, ggml's fp16 table by default, double with f32_math. */
static int gb_geglu(backend *be, be_buf *out, const be_buf *gate, const be_buf *up, int64_t n,
                    forge_err *err)
{
    gpu_backend *g = gb(be);
    int rc;
    if ((rc = check_buf(gate, n, "geglu gate", err)) || (rc = check_buf(up, n, "geglu up", err)) ||
        (rc = check_buf(out, n, "geglu out", err)))
        return rc;
    if (n == 0) return FORGE_OK;
    if ((rc = g->api->geglu(gate->d, up->d, out->d, n, !g->round_x, g->st, err))) return rc;
    wrote(g, out);
    return FORGE_OK;
}

static int gb_scale(backend *be, be_buf *x, float s, int64_t n, forge_err *err)
{
    gpu_backend *g = gb(be);
    int rc;
    if ((rc = check_buf(x, n, "scale x", err))) return rc;
    if (n == 0) return FORGE_OK;
    if ((rc = g->api->scale(x->d, s, n, g->st, err))) return rc;
    wrote(g, x);
    return FORGE_OK;
}

static int gb_softcap(backend *be, be_buf *x, float cap, int64_t n, forge_err *err)
{
    gpu_backend *g = gb(be);
    int rc;
    if ((rc = check_buf(x, n, "softcap x", err))) return rc;
    if (!(cap > 0.0f)) return forge_err_set(err, FORGE_E_INTERNAL, "softcap: cap %g", (double)cap);
    if (n == 0) return FORGE_OK;
    if ((rc = g->api->softcap(x->d, cap, n, g->st, err))) return rc;
    wrote(g, x);
    return FORGE_OK;
}

/* The activations of n rows of a product by a weight of type wtype, as the matvec reads them:
 * quantized to Q8_0 blocks into xq (block types), rounded to the weight type into xr (F16/BF16
 * with the CPU's numerics), or nothing (F32, f32_math). */
static int moe_prepare(gpu_backend *g, int wtype, const float *x, int64_t n, void *xq, float *xr,
                       forge_err *err)
{
    if (is_quant(wtype)) return g->api->act_quantize(x, n, xq, g->st, err);
    if (g->round_x && (wtype == GGML_TYPE_F16 || wtype == GGML_TYPE_BF16))
        return g->api->round_act(x, xr, n, wtype, g->st, err);
    return FORGE_OK;
}

/* y = W_e x over n_tok rows, W_e = block e of the stacked expert matrix w (a device matrix of
 * its own: backend_gpu_plan_add_experts). gemm: the GEMM over every row (prompt chunks from
 * gemm_min rows); else one matvec launch over the rows with run[r] != 0 (x prepared by
 * moe_prepare into xq / xr), the others skipped on the device. */
static int expert_product(gpu_backend *g, const be_weight *w, int n_blocks, int e, const float *x,
                          const void *xq, const float *xr, int n_tok, const int32_t *d_run,
                          bool gemm, float *d_y, forge_err *err)
{
    const gpu_api *api = g->api;
    const int64_t rows = w->ne1 / n_blocks, n_in = w->ne0;
    const void *wd = (const char *)wdev(g, w) + (size_t)e * wblock_stride(api, w->type, rows, n_in);
    int wt = w->type, rc;
    if (gemm) {
        if (is_quant(wt)) {
            if (!g->d_wf16 || rows * n_in > g->max_quant_elems)
                return forge_err_set(err, FORGE_E_INTERNAL, "gpu moe_ffn: no F16 scratch for %s",
                                     w->name);
            if ((rc = api->weight_to_f16(wt, wd, rows, n_in, g->d_wf16, g->st, err))) return rc;
            wd = g->d_wf16;
            wt = GGML_TYPE_F16;
        }
        return api->gemm_ex(g->blas, wt, wd, rows, n_in, x, n_tok, g->d_xc, d_y, 0.0f, g->st,
                            err);
    }
    if (g->round_x && (wt == GGML_TYPE_F16 || wt == GGML_TYPE_BF16)) x = xr;
    return api->matvec_rows(wt, wd, rows, n_in, n_tok, x, xq, d_y, d_run, g->st, err);
}

/* Mixture of experts on the device, no host round trip: the routing kernel writes each row's
 * experts, weights and a run flag per (expert, row); then for every expert (a host loop of
 * launches, the same for every batch, so a decode step records into a graph) the gate / up
 * products, the activation and the down product run over the batch's rows, the matvec skipping
 * on the device the rows that did not select the expert (no weight read for an expert no row
 * picked), and the rows' weighted results are added to out in ascending expert order (the
 * CPU's order). Prompt chunks of gemm_min rows or more run each expert's GEMM over all rows
 * instead (n_expert / n_used times the selected work: the row counts per expert stay on the
 * device; docs/GPU.md) once each expert expects gemm_min rows (n_tok * n_used >= gemm_min *
 * n_expert). A row's result does not depend on the other rows on the matvec path. */
static int gb_moe_ffn(backend *be, be_buf *out, const be_buf *h, const be_buf *logits,
                      const be_moe *moe, int n_tok, forge_err *err)
{
    gpu_backend *g = gb(be);
    const gpu_api *api = g->api;
    int rc;
    if ((rc = need_plan(g, err))) return rc;
    if (!moe || !moe->gate_exps || !moe->up_exps || !moe->down_exps || n_tok < 1 ||
        n_tok > g->n_batch)
        return forge_err_set(err, FORGE_E_INTERNAL, "gpu moe_ffn: missing weights or %d rows",
                             n_tok);
    const int ne = moe->n_expert, k = moe->n_used;
    const int64_t F = moe->n_ff, E = moe->gate_exps->ne0;
    if (!g->d_moe || ne != g->moe_ne || k != g->moe_k || E != g->moe_E || F > g->moe_F ||
        k > GPU_MOE_MAX_USED)
        return forge_err_set(err, FORGE_E_INTERNAL,
                             "gpu moe_ffn: %d of %d experts of [%lld -> %lld], planned %d of %d "
                             "of [%lld -> %lld] (at most %d per row)",
                             k, ne, (long long)E, (long long)F, g->moe_k, g->moe_ne,
                             (long long)g->moe_E, (long long)g->moe_F, GPU_MOE_MAX_USED);
    if ((rc = check_weight(g, moe->gate_exps, E, F * ne, "moe_ffn", err)) ||
        (rc = check_weight(g, moe->up_exps, E, F * ne, "moe_ffn", err)) ||
        (rc = check_weight(g, moe->down_exps, F, E * ne, "moe_ffn", err)) ||
        (rc = check_buf(h, (int64_t)n_tok * E, "moe_ffn h", err)) ||
        (rc = check_buf(out, (int64_t)n_tok * E, "moe_ffn out", err)) ||
        (rc = check_buf(logits, (int64_t)n_tok * ne, "moe_ffn logits", err)))
        return rc;
    const be_weight *ws[] = {moe->gate_exps, moe->up_exps, moe->down_exps};
    for (int i = 0; i < 3; i++)
        if (g->wset->blocks[ws[i]->slot] != ne)
            return forge_err_set(err, FORGE_E_INTERNAL,
                                 "gpu moe_ffn: %s was not uploaded as %d experts "
                                 "(backend_gpu_plan_add_experts)",
                                 ws[i]->name, ne);
    if (moe->gate_exps->type != moe->up_exps->type)
        return forge_err_set(err, FORGE_E_UNSUPPORTED,
                             "gpu moe_ffn: %s (%s) and %s (%s) differ in type", moe->gate_exps->name,
                             ggml_type_name(moe->gate_exps->type), moe->up_exps->name,
                             ggml_type_name(moe->up_exps->type));
    if (moe->act != BE_ACT_SILU && moe->act != BE_ACT_GELU_TANH)
        return forge_err_set(err, FORGE_E_INTERNAL, "gpu moe_ffn: activation %d", (int)moe->act);
    if (out == h) return forge_err_set(err, FORGE_E_INTERNAL, "gpu moe_ffn: out is h");
    /* the GEMM runs every expert over all n_tok rows (n_expert / n_used times the selected
     * work, with F16 activations): only once each expert expects gemm_min rows of its own;
     * below that the matvec over the selected rows reads each weight once per row that picked
     * it, with the CPU's numerics (Q8_0 activations), so that a near-tie in the routing does
     * not flip between the devices (test_gpu_archs, tiny-mixtral Q8_0) */
    const bool gemm = uses_gemm(g, moe->gate_exps, n_tok) &&
                      (int64_t)n_tok * k >= (int64_t)g->gemm_min * ne;
    const int64_t nF = (int64_t)n_tok * F;
    if ((rc = api->moe_route(logits->d, n_tok, ne, k, moe->norm_w, g->d_msel, g->d_mw, g->d_mrun,
                             g->st, err)) ||
        (rc = api->memset(out->d, 0, (size_t)n_tok * (size_t)E * sizeof(float), g->st, err)))
        return rc;
    if (!gemm && (rc = moe_prepare(g, moe->gate_exps->type, h->d, (int64_t)n_tok * E, g->d_mxq_h,
                                   g->d_mxr_h, err)))
        return rc;
    for (int e = 0; e < ne; e++) {
        const int32_t *run = gemm ? NULL : g->d_mrun + (int64_t)e * n_tok;
        if ((rc = expert_product(g, moe->gate_exps, ne, e, h->d, g->d_mxq_h, g->d_mxr_h, n_tok,
                                 run, gemm, g->d_mg, err)) ||
            (rc = expert_product(g, moe->up_exps, ne, e, h->d, g->d_mxq_h, g->d_mxr_h, n_tok, run,
                                 gemm, g->d_mu, err)))
            return rc;
        rc = moe->act == BE_ACT_GELU_TANH
                 ? api->geglu(g->d_mg, g->d_mu, g->d_mg, nF, !g->round_x, g->st, err)
                 : api->swiglu(g->d_mg, g->d_mu, g->d_mg, nF, g->st, err);
        if (rc ||
            (!gemm && (rc = moe_prepare(g, moe->down_exps->type, g->d_mg, nF, g->d_mxq_g,
                                        g->d_mxr_g, err))) ||
            (rc = expert_product(g, moe->down_exps, ne, e, g->d_mg, g->d_mxq_g, g->d_mxr_g,
                                 n_tok, run, gemm, g->d_my, err)) ||
            (rc = api->moe_accum(out->d, g->d_my, g->d_msel, g->d_mw, n_tok, k, E, e, g->st,
                                 err)))
            return rc;
    }
    wrote(g, out);
    return FORGE_OK;
}

static int gb_copy_rows(backend *be, be_buf *dst, int64_t dst_row, const be_buf *src,
                        int64_t src_row, int64_t n_rows, int64_t row_len, forge_err *err)
{
    gpu_backend *g = gb(be);
    int rc;
    if ((rc = check_buf(src, (src_row + n_rows) * row_len, "copy_rows src", err)) ||
        (rc = check_buf(dst, (dst_row + n_rows) * row_len, "copy_rows dst", err)))
        return rc;
    if ((rc = g->api->memcpy_d2d(dst->d + dst_row * row_len, src->d + src_row * row_len,
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

/* Greedy ids of n_rows rows (x + r * n) in one launch; one copy of the ids back. */
static int gb_argmax_rows(backend *be, const be_buf *x, int n_rows, int64_t n, int32_t *out,
                          forge_err *err)
{
    gpu_backend *g = gb(be);
    const gpu_api *api = g->api;
    int rc;
    if (n_rows < 1 || n < 1 || n > INT32_MAX)
        return forge_err_set(err, FORGE_E_INTERNAL, "gpu argmax_rows: %d rows of %lld", n_rows,
                             (long long)n);
    if ((rc = check_buf(x, (int64_t)n_rows * n, "argmax_rows", err))) return rc;
    if (n_rows > g->amax_cap) {
        /* the last argmax_rows waited for its copy: nothing reads the old buffers */
        api->host_free(g->h_amax);
        g->h_amax = NULL;
        dfree(g, g->d_amax);
        g->d_amax = NULL;
        g->amax_cap = 0;
        const int cap = n_rows < 64 ? 64 : n_rows;
        if ((rc = api->host_alloc((void **)&g->h_amax, (size_t)cap * 4, err)) ||
            (rc = dalloc(g, (void **)&g->d_amax, (size_t)cap * 4, err)))
            return rc;
        g->amax_cap = cap;
    }
    if ((rc = api->argmax_rows(x->d, n_rows, n, n, g->d_amax, g->st, err)) ||
        (rc = api->memcpy_d2h(g->h_amax, g->d_amax, (size_t)n_rows * 4, g->st, err)) ||
        (rc = api->stream_sync(g->st, err)))
        return rc;
    memcpy(out, g->h_amax, (size_t)n_rows * 4);
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

/* Start recording on the backend's stream, holding g_capture_lock (shared) until end_recording. */
static int capture_begin(gpu_backend *g, forge_err *err)
{
    pthread_rwlock_rdlock(&g_capture_lock);
    int rc = g->api->graph_begin(g->st, err);
    if (rc) pthread_rwlock_unlock(&g_capture_lock);
    return rc;
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
        if ((rc = capture_begin(g, err))) {
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

/* An engine step of decode rows only (every row its sequence's one row, logits of every row
 * in row order) of at most GPU_BSTEP_ROWS rows, over block tables: its launches depend only on
 * the row count, the table stride and the attention bucket (the paged kernel's splits cover
 * the bucket; a row reads its own positions only), so it is recorded per (rows, bucket) and
 * replayed with the batch arrays and ids copied in first. */
static int gb_batch_step_begin(backend *be, const be_batch *b, const int32_t *ids, bool *replayed,
                               forge_err *err)
{
    gpu_backend *g = gb(be);
    const gpu_api *api = g->api;
    int rc, slot = 0;
    *replayed = false;
    if ((rc = need_plan(g, err))) return rc;
    if (g->capturing || g->in_step || g->in_bstep)
        return forge_err_set(err, FORGE_E_INTERNAL, "gpu batch_step_begin: inside a step");
    /* rows through the GEMM (cuBLAS, and the weights dequantized for it) are not recorded: a
     * step of that many rows is long, and a failed recording would end all of them */
    if (!g->bgraph_on || !b || !ids || b->n_tok < 1 || b->n_tok > GPU_BSTEP_ROWS ||
        (g->blas && b->n_tok >= g->gemm_min) || b->n_seq != b->n_tok || b->n_out != b->n_tok ||
        b->block_size == g->n_ctx)
        return FORGE_OK; /* not a shape it records: the forward runs as usual */
    for (int r = 0; r < b->n_tok; r++)
        if (b->out_rows[r] != r || b->seq_start[r] != r) return FORGE_OK;
    if ((rc = batch_stage(g, b, ids, err))) return rc;
    const int n = b->n_tok;
    int max_pos = g->bt_max_kv - 1;
    g->bt_max_kv = (int)step_max_kv(g->n_ctx, max_pos, &slot);
    if (b->table_stride != g->bstep_stride) {
        drop_graphs(g);
        g->bstep_stride = b->table_stride;
    }
    g->bstep_ids = ids;
    g->bstep_ids_off = 3 * (size_t)n + (size_t)n * (size_t)b->table_stride;
    g->bstep_rows = n;
    g->bstep_slot = slot;
    g->xq_src = NULL; /* a replay overwrites the activations behind the host's back */
    g->xqm_src = NULL;
    g->xqq_src = NULL;
    if (g->bgraphs[n - 1][slot]) {
        if ((rc = api->graph_launch(g->bgraphs[n - 1][slot], g->st, err))) return rc;
        *replayed = true;
        return FORGE_OK;
    }
    g->in_bstep = true;
    if (!g->bseen[n - 1][slot]) {
        g->bseen[n - 1][slot] = 1; /* first time: unrecorded */
        return FORGE_OK;
    }
    if ((rc = capture_begin(g, err))) {
        if (g->graph_strict) {
            g->in_bstep = false;
            return rc;
        }
        g->bgraph_on = false; /* this and later steps unrecorded */
        return FORGE_OK;
    }
    g->capturing = true;
    return FORGE_OK;
}

/* End the recording of a step (a context's or an engine's) whose forward pass returned status:
 * keep the graph in *slot and launch it; a failed pass keeps nothing; a failed recording sets
 * *on false and *again (run the pass once more, unrecorded), or is the error with
 * FORGE_GPU_GRAPH=1. A pass that failed because its recording broke under it (a launch
 * reports the capture invalidated; the recording then does not end either) is a failed
 * recording too: nothing of it ran. */
static int end_recording(gpu_backend *g, int status, gpu_graph **slot, bool *on, bool *again,
                         forge_err *err)
{
    const gpu_api *api = g->api;
    gpu_graph *gr = NULL;
    g->capturing = false;
    int rc = api->graph_end(g->st, &gr, status ? NULL : err);
    pthread_rwlock_unlock(&g_capture_lock); /* taken by capture_begin */
    if (status && !rc) {
        /* the forward pass failed (or was interrupted): nothing ran, nothing is kept */
        api->graph_free(gr);
        return FORGE_OK;
    }
    if (rc) {
        /* recorded but not run: without these graphs from now on, and the caller runs it again */
        api->graph_free(gr);
        if (g->graph_strict) return rc;
        *on = false;
        *again = true;
        return FORGE_OK;
    }
    *slot = gr;
    return api->graph_launch(gr, g->st, err);
}

static int gb_step_end(backend *be, int status, bool *again, forge_err *err)
{
    gpu_backend *g = gb(be);
    int rc = FORGE_OK;
    *again = false;
    if (g->in_bstep) {
        if (g->capturing)
            rc = end_recording(g, status, &g->bgraphs[g->bstep_rows - 1][g->bstep_slot],
                               &g->bgraph_on, again, err);
        if (!*again) g->in_bstep = false; /* *again: stays in the step */
        return rc;
    }
    if (g->capturing)
        rc = end_recording(g, status, &g->graphs[g->step_slot], &g->graph_on, again, err);
    if (!*again) g->in_step = false;
    return rc;
}

static void gb_destroy_locked(backend *be);

/* Teardown makes calls that no recording anywhere in the process may overlap (g_capture_lock). */
static void gb_destroy(backend *be)
{
    if (!be) return;
    gpu_backend *g = gb(be);
    if (g->capturing) {
        /* destroyed mid-recording (a step that never reached step_end): the recording ends as
         * a failed pass's does (nothing kept) and this thread's shared hold is released first,
         * or the exclusive one below would wait for it forever */
        gpu_graph *unused = NULL;
        bool on = false, again = false;
        (void)end_recording(g, FORGE_E_INTERRUPTED, &unused, &on, &again, NULL);
    }
    pthread_rwlock_wrlock(&g_capture_lock);
    gb_destroy_locked(be);
    pthread_rwlock_unlock(&g_capture_lock);
}

static void gb_destroy_locked(backend *be)
{
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
        dfree(g, g->d_bt);
        dfree(g, g->d_paged);
        dfree(g, g->d_xqm);
        dfree(g, g->d_xrm);
        dfree(g, g->d_xqq);
        dfree(g, g->d_amax);
        dfree(g, g->d_moe);
        (void)api->stream_sync(g->st, NULL);
    }
    for (int i = 0; i < 2; i++) {
        api->host_free(g->h_bt[i]);
        api->event_destroy(g->ev_bt[i]);
    }
    api->host_free(g->h_amax);
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
    free(g->wblocks);
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
    .buf_data = gb_buf_data,
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
    .argmax_rows = gb_argmax_rows,
    .batch_set = gb_batch_set,
    .step_begin = gb_step_begin,
    .step_end = gb_step_end,
    .batch_step_begin = gb_batch_step_begin,
    .norm_matmul = gb_norm_matmul,
    .matmul_add = gb_matmul_add,
    .attention_rope = gb_attention_rope,
    .sample = gb_sample,
    .geglu = gb_geglu,
    .scale = gb_scale,
    .softcap = gb_softcap,
    .moe_ffn = gb_moe_ffn,
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
    const char *es = getenv("FORGE_GPU_ENGINE_STEPS");
    const bool engine_steps = es && (es[0] == '0' || es[0] == '1') ? es[0] == '1'
                                                                  : GPU_ENGINE_STEPS_DEFAULT;
    g->bgraph_on = g->graph_on && engine_steps;
    g->mv_multi_big = engine_steps;
    *out = &g->base;
    return FORGE_OK;
fail:
    gb_destroy(&g->base);
    return rc;
}

/* ---- the communicator of a tensor-parallel group (backend_gpu_comm_create) ------------------- */

_Static_assert(COMM_MAX_RANK <= GPU_COMM_MAX_RANK, "comm.h allows more ranks than gpu_comm");

typedef struct gpu_be_comm {
    be_comm base;
    const gpu_api *api;
    gpu_comm *gc;
    gpu_backend *rank[COMM_MAX_RANK]; /* borrowed */
    gpu_stream *st[COMM_MAX_RANK];    /* rank r's stream */
} gpu_be_comm;

static gpu_be_comm *gbc(be_comm *c)
{
    return (gpu_be_comm *)c;
}

/* A collective writes rank buffers behind the backends' version counters (it gets device
 * pointers, not be_bufs), so each rank forgets the activation it holds quantized or rounded:
 * the next matmul prepares its input again instead of reusing one made before the collective. */
static void comm_wrote(gpu_be_comm *c)
{
    for (int r = 0; r < c->base.n_rank; r++) {
        c->rank[r]->xq_src = NULL;
        c->rank[r]->xqm_src = NULL;
        c->rank[r]->xqq_src = NULL;
    }
}

static void gbc_destroy(be_comm *bc)
{
    if (!bc) return;
    gpu_be_comm *c = gbc(bc);
    /* the collectives enqueued last must be done before NCCL's resources go */
    for (int r = 0; r < c->base.n_rank; r++)
        (void)c->api->stream_sync(c->st[r], NULL);
    c->api->comm_free(c->gc);
    free(c);
}

static int gbc_all_reduce_sum(be_comm *bc, float *const *bufs, int64_t n, forge_err *err)
{
    gpu_be_comm *c = gbc(bc);
    comm_wrote(c);
    return c->api->comm_all_reduce_sum(c->gc, bufs, n, c->st, err);
}

static int gbc_all_gather_cols(be_comm *bc, const float *const *send, float *const *recv,
                               int64_t rows, const int64_t *cols, forge_err *err)
{
    gpu_be_comm *c = gbc(bc);
    comm_wrote(c);
    return c->api->comm_all_gather_cols(c->gc, send, recv, rows, cols, c->st, err);
}

static const be_comm_ops nccl_ops = {
    .name = "NCCL",
    .destroy = gbc_destroy,
    .all_reduce_sum = gbc_all_reduce_sum,
    .all_gather_cols = gbc_all_gather_cols,
};

static const be_comm_ops rccl_ops = {
    .name = "RCCL",
    .destroy = gbc_destroy,
    .all_reduce_sum = gbc_all_reduce_sum,
    .all_gather_cols = gbc_all_gather_cols,
};

int backend_gpu_comm_create(backend *const *ranks, int n, be_comm **out, forge_err *err)
{
    int devs[COMM_MAX_RANK];
    gpu_be_comm *c = NULL;
    int rc;
    *out = NULL;
    if (!ranks || n < 1 || n > COMM_MAX_RANK)
        return forge_err_set(err, FORGE_E_INVALID,
                             "GPU communicator: %d ranks (1..%d GPU backends)", ranks ? n : 0,
                             COMM_MAX_RANK);
    for (int r = 0; r < n; r++) {
        if (!ranks[r] || ranks[r]->ops != &gpu_ops)
            return forge_err_set(err, FORGE_E_INVALID,
                                 "GPU communicator: rank %d is %s%s, not a GPU backend", r,
                                 ranks[r] ? "a backend of type " : "missing",
                                 ranks[r] ? ranks[r]->ops->name : "");
        devs[r] = gb(ranks[r])->dev;
        for (int q = 0; q < r; q++)
            if (devs[q] == devs[r])
                return forge_err_set(err, FORGE_E_INVALID,
                                     "GPU communicator: ranks %d and %d are both on GPU %d (each "
                                     "rank needs a GPU of its own)",
                                     q, r, devs[r]);
    }
    c = calloc(1, sizeof *c);
    if (!c) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    c->api = gb(ranks[0])->api;
    c->base.ops = strcmp(c->api->backend_name(), "HIP") ? &nccl_ops : &rccl_ops;
    c->base.n_rank = n;
    for (int r = 0; r < n; r++) {
        c->rank[r] = gb(ranks[r]);
        c->st[r] = c->rank[r]->st;
    }
    if ((rc = c->api->comm_create(n, devs, &c->gc, err))) goto fail;
    *out = &c->base;
    return FORGE_OK;
fail:
    free(c);
    return rc;
}
