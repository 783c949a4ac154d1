/* backend.h - the compute backend interface the architectures are written against.
 *
 * A backend is a struct of function pointers behind an opaque handle. The forward pass of each
 * architecture (src/model/arch_llama.c) calls only these ops, on buffers the backend owns
 * (be_buf: activations, be_kv: the KV cache); it never touches activation memory itself, so the
 * same code runs on the CPU backend (src/cpu/backend_cpu.c) and on a GPU backend.
 *
 * Conventions: activations are float32, row-major [n_tok][row_len]; every op returns FORGE_OK
 * or a negative status with a message in err. Ops may run asynchronously on a device: only
 * buf_read waits for results. Weights are be_weight views of tensors in the GGUF mapping, owned
 * by the model and shared by all its contexts; a device backend keeps its copies of them in a
 * weight set (be_wshare below), never in the be_weight itself.
 */
#ifndef FORGE_BACKEND_H
#define FORGE_BACKEND_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "forge.h"

typedef struct be_buf be_buf;   /* activation buffer of n floats, backend-owned */
typedef struct be_kv be_kv;     /* KV cache of all layers, backend-owned */
typedef struct backend backend; /* an instance; starts with `const be_ops *ops` */
typedef struct be_sample be_sample; /* a sampler chain for be_ops.sample (below) */

/* A weight tensor as stored in the file: ne0 = row length (inputs), ne1 = rows (outputs). */
typedef struct be_weight {
    const char *name; /* tensor name (owned by the GGUF ctx) */
    int type;         /* ggml_type */
    int64_t ne0, ne1;
    uint64_t n_bytes;
    const void *data; /* host view into the mapping */
    int32_t slot;     /* index in the model's weight list (model_weights), the key of a device
                       * copy in a weight set; meaningless when data is NULL */
} be_weight;

/* The device copies of one model's weights, shared by the contexts of that model.
 *
 * Ownership: the model owns this registry (its lock and the list head; model_load initialises
 * it, forge_model_free destroys it, and it must be empty then: contexts borrow their model). The
 * entries (be_wset, defined by the backend) hold one device's copies of every weight, keyed by
 * the device: a context on another GPU never sees them (every backend's be_wset starts with
 * `be_wset *next; int dev;`: the list is shared, dev is the key, -1 for the CPU backend's load-time
 * repacked copies, src/cpu/backend_cpu.c). An entry is owned jointly by the
 * backends on its device that acquired it (a reference count): the first one uploads it, the
 * last one to release it frees it, after every holder's work that read it is done. So freeing
 * one context never frees weights that another context on the same model still uses, also from
 * a replayed graph. */
typedef struct be_wset be_wset;
typedef struct be_wshare {
    pthread_mutex_t lock; /* guards head and every entry's reference count and upload */
    be_wset *head;
} be_wshare;

typedef enum be_rope_mode {
    BE_ROPE_NORM = 0, /* rotate adjacent pairs (x[2i], x[2i+1]) (llama) */
    BE_ROPE_NEOX = 2  /* rotate halves (x[i], x[i + n_rot/2]) (qwen2, qwen3) */
} be_rope_mode;

typedef struct be_rope {
    be_rope_mode mode;
    int n_rot; /* rotated dims per head (<= head_dim), even */
    float freq_base;
    float freq_scale;              /* 1 / linear scaling factor */
    const be_weight *freq_factors; /* rope_freqs.weight (F32, n_rot/2) or NULL (llama3) */
    /* YaRN (ggml's rope_yarn): ext_factor 0 = off. With it, dims between corr_dims[0] and
     * corr_dims[1] ramp from extrapolated to interpolated theta and cos/sin are scaled by
     * attn_factor * (1 + 0.1 ln(1/freq_scale)); otherwise by attn_factor (1). */
    float ext_factor;
    float attn_factor;
    float corr_dims[2];
} be_rope;

/* The layout of one forward pass (docs/ENGINE.md): n_tok rows grouped by sequence. Sequence s
 * owns rows seq_start[s] .. seq_start[s+1]-1, at consecutive positions pos[seq_start[s]]..; row r
 * stores its K/V at cache row slot[r] and attends over its sequence's positions 0..pos[r],
 * position p living at cache row table_s[p / block_size] * block_size + p % block_size, where
 * table_s = table + s * table_stride holds n_table[s] entries. A one-sequence context is the
 * same thing with one block of n_ctx rows (table {0}, slot = pos). Host arrays, borrowed for
 * the step. out_rows (ascending) are the rows whose logits the forward computes, in order, into
 * logits rows 0..n_out-1. */
typedef struct be_batch {
    int n_tok, n_seq;
    const int32_t *pos;       /* [n_tok] */
    const int32_t *slot;      /* [n_tok] */
    const int32_t *seq_start; /* [n_seq + 1], seq_start[0] = 0, seq_start[n_seq] = n_tok */
    const int32_t *table;     /* [n_seq * table_stride] */
    const int32_t *n_table;   /* [n_seq] */
    int table_stride, block_size;
    const int32_t *out_rows; /* [n_out] */
    int n_out;
} be_batch;

/* A one-sequence batch over a contiguous cache: one block of kv_rows rows (table {0}), position
 * p at row p, rows at positions pos0..pos0+n-1 (written to pos[0..n), the caller's array),
 * logits of out_rows[0..n_out). What a context runs, and what tests build. The batch points into
 * the struct: do not copy it. */
typedef struct be_span_batch {
    be_batch bt;
    int32_t seq_start[2], table[1], n_table[1];
} be_span_batch;

static inline const be_batch *be_span_batch_init(be_span_batch *sb, int32_t *pos, int n, int pos0,
                                                 int kv_rows, const int32_t *out_rows, int n_out)
{
    for (int i = 0; i < n; i++)
        pos[i] = pos0 + i;
    sb->seq_start[0] = 0;
    sb->seq_start[1] = n;
    sb->table[0] = 0;
    sb->n_table[0] = 1;
    sb->bt = (be_batch){n,  1,          pos, pos, sb->seq_start, sb->table, sb->n_table, 1,
                        kv_rows, out_rows, n_out};
    return &sb->bt;
}

typedef struct be_attn {
    int layer;
    int n_head, n_head_kv, head_dim;
    float scale;           /* usually 1/sqrt(head_dim) */
    const be_batch *batch; /* rows, positions, K/V slots and block tables (set by batch_set) */
    float softcap;         /* scores s = scale q.k become softcap tanh(s / softcap); 0: off */
    int window;            /* a row at position p attends over p - window + 1 .. p only; 0: all */
} be_attn;

/* The activation of a gated FFN: out = act(gate) * up. */
typedef enum be_act {
    BE_ACT_SILU = 0,     /* x / (1 + exp(-x)) */
    BE_ACT_GELU_TANH = 1 /* 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) */
} be_act;

/* A mixture-of-experts FFN (be_ops.moe_ffn). Each expert matrix is a be_weight of n_expert
 * blocks of rows (expert e: rows e * rows_per_expert ..): gate_exps and up_exps [n_embd ->
 * n_ff * n_expert], down_exps [n_ff -> n_embd * n_expert]. */
typedef struct be_moe {
    const be_weight *gate_exps, *up_exps, *down_exps;
    int n_expert, n_used, n_ff;
    be_act act;
    bool norm_w; /* renormalise the selected experts' weights to sum 1 */
} be_moe;

typedef struct be_ops {
    const char *name;
    void (*destroy)(backend *be);

    int (*buf_create)(backend *be, int64_t n_floats, be_buf **out, forge_err *err);
    void (*buf_free)(backend *be, be_buf *buf);
    /* Copy n floats starting at float offset off of src to host memory (waits for the device). */
    int (*buf_read)(backend *be, const be_buf *src, int64_t off, int64_t n, float *dst,
                    forge_err *err);
    /* The buffer's memory: host memory on the CPU, device memory on a GPU. Only for a
     * communicator (src/backend/comm.h) that moves it in the backend's order; nothing else
     * touches activation memory. */
    float *(*buf_data)(backend *be, be_buf *buf);

    /* ---- device copies of the weights (optional: NULL for a backend that reads the host
     * weights as they are; the CPU's are its load-time repacked copies) ----
     * weights_acquire makes ws[0..n) (the model's weight list: ws[i]->slot == i) usable by
     * this backend: it takes a reference on the entry of share for the backend's device,
     * creating and uploading it when there is none (progress after each weight, may be NULL;
     * also when the entry was there already). Holds share->lock
     * while it uploads. Called at most once per backend; a failed call holds nothing.
     * weights_release drops the reference after waiting for this backend's own work (so the
     * last holder may free the copies in its stream's order); nothing when none is held. */
    int (*weights_acquire)(backend *be, be_wshare *share, be_weight *const *ws, int n,
                           void (*progress)(uint64_t done, uint64_t total, void *user), void *user,
                           forge_err *err);
    void (*weights_release)(backend *be);
    /* Make the backend's device the calling thread's current device (contexts on several GPUs
     * driven from one thread). The context calls it before it uses the backend. Optional. */
    int (*activate)(backend *be, forge_err *err);

    int (*kv_create)(backend *be, int n_layer, int n_ctx, int kv_dim, int kv_type, be_kv **out,
                     forge_err *err);
    void (*kv_free)(backend *be, be_kv *kv);

    /* out[t] = row ids[t] of table (any supported type), converted to float. */
    int (*get_rows)(backend *be, be_buf *out, const be_weight *table, const int32_t *ids, int n,
                    forge_err *err);
    /* out[r] = x[r] / rms(x[r]) * w for n_rows rows of dim floats (w: F32 [dim]). out may be x.
     * With dim = head_dim and n_rows = n_tok * n_head it is the per-head Q/K norm. */
    int (*rms_norm)(backend *be, be_buf *out, const be_buf *x, const be_weight *w, int64_t n_rows,
                    int64_t dim, float eps, forge_err *err);
    /* y[t] = W x[t] for n_tok rows; W of any supported type. */
    int (*matmul)(backend *be, be_buf *y, const be_weight *w, const be_buf *x, int n_tok,
                  forge_err *err);
    /* y[t] += b for n_tok rows of b->ne0 floats (b: F32). */
    int (*add_bias)(backend *be, be_buf *y, const be_weight *b, int n_tok, forge_err *err);
    /* The batch the next ops of this forward pass run on (positions, slots, tables: a device
     * backend copies them to the device here, once per pass). Every rope / attention /
     * attention_rope call names the batch it expects; it must be the last one set. Optional:
     * NULL for a backend that reads the host arrays directly (the CPU). */
    int (*batch_set)(backend *be, const be_batch *b, forge_err *err);
    /* Rotary embedding in place, x = [n_tok][n_head][head_dim], row t at position b->pos[t]
     * (n_tok = b->n_tok). */
    int (*rope)(backend *be, be_buf *x, int n_head, int head_dim, const be_batch *b,
                const be_rope *rope, forge_err *err);
    /* Store k, v ([n_tok][n_head_kv*head_dim]) in the cache at the batch's slots, then causal
     * attention of each row of q ([n_tok][n_head*head_dim]) over its sequence's positions
     * 0..pos[r] through the sequence's block table; out like q. Softmax in float with max
     * subtraction, GQA: query head h reads KV head h / (n_head / n_head_kv). A row's result
     * does not depend on the other rows of the batch (batch invariance). */
    int (*attention)(backend *be, be_buf *out, const be_buf *q, const be_buf *k, const be_buf *v,
                     be_kv *kv, const be_attn *a, forge_err *err);
    /* out[i] = silu(gate[i]) * up[i], silu(x) = x / (1 + exp(-x)). out may be gate. */
    int (*swiglu)(backend *be, be_buf *out, const be_buf *gate, const be_buf *up, int64_t n,
                  forge_err *err);
    /* x[i] += y[i] */
    int (*add)(backend *be, be_buf *x, const be_buf *y, int64_t n, forge_err *err);
    /* dst rows dst_row .. dst_row+n_rows-1 = src rows src_row .. src_row+n_rows-1 */
    int (*copy_rows)(backend *be, be_buf *dst, int64_t dst_row, const be_buf *src,
                     int64_t src_row, int64_t n_rows, int64_t row_len, forge_err *err);

    /* ---- optional (NULL when a backend does not offer them) ---- */
    /* *out = the smallest i in [0, n) with x[off + i] maximal (greedy sampling; NaN never wins,
     * all NaN gives 0). Waits for the device and reads back only the id. NULL: the caller reads
     * the floats with buf_read and picks on the host (the CPU backend). */
    int (*argmax)(backend *be, const be_buf *x, int64_t off, int64_t n, int32_t *out,
                  forge_err *err);
    /* out[r] = argmax of row r of x (the n floats at x + r * n, r < n_rows), each exactly as
     * argmax picks it (the smallest index of the maximum; NaN never wins; all NaN gives 0), for
     * many rows in one go (greedy decoding of a batch: logits rows 0..n_rows-1). Waits for the
     * device and reads back only the ids. NULL (the CPU): the caller reads the rows and picks
     * on the host, or calls argmax per row. */
    int (*argmax_rows)(backend *be, const be_buf *x, int n_rows, int64_t n, int32_t *out,
                       forge_err *err);
    /* A one-token decode step as a unit the backend may record once and replay (a CUDA/HIP
     * graph). The context calls step_begin(id, pos) before the forward pass of token id at
     * position pos (one token, logits of that token only). *replayed = true: the backend has
     * enqueued the whole step itself (a recording of an earlier one, with this id and position):
     * skip the forward pass. Otherwise run the forward pass, then step_end(status of the
     * forward); when it sets *again the step was recorded but not run (recording failed; the
     * backend stopped recording): run the forward pass once more, also when that forward pass
     * failed (its error came from the broken recording). */
    int (*step_begin)(backend *be, int32_t id, int pos, bool *replayed, forge_err *err);
    int (*step_end)(backend *be, int status, bool *again, forge_err *err);
    /* The same for a batch of decode rows (an engine step): batch_step_begin(b, ids) before the
     * forward pass of ids over batch b (the forward then calls batch_set with this same b), and
     * step_end after it, as above. The backend may replay a recording of an earlier step of
     * the same shape with b's ids, positions, slots and tables; it records only batches it
     * knows how to (the GPU: every row a sequence of its own that wants its logits), and for
     * the others does nothing (*replayed stays false). NULL: no recording. */
    int (*batch_step_begin)(backend *be, const be_batch *b, const int32_t *ids, bool *replayed,
                            forge_err *err);
    /* ys[i][t] = ws[i] x[t] for n (<= 8) weights that share the input x, with the results of n
     * matmul calls; the backend may do them as one job (the CPU backend converts x once and
     * splits the rows of all the weights over its threads at once: Q/K/V, gate/up). NULL: the
     * caller makes the n matmul calls. */
    int (*matmul_multi)(backend *be, int n, be_buf *const *ys, const be_weight *const *ws,
                        const be_buf *x, int n_tok, forge_err *err);
    /* ---- optional fused ops (NULL: the caller runs the plain ops they stand for) ---- */
    /* ys[i] = ws[i] h (+ bs[i] when bs && bs[i]) for n (1..3) weights sharing the input, where
     * h = rms_norm(x) * norm (norm: F32 [dim], dim = ws[i]->ne0). With swiglu (n == 2, no
     * biases) ys[0] = silu(ws[0] h) * (ws[1] h) and ys[1] is scratch the op may overwrite. hn
     * is a [n_tok][dim] buffer the op may use for h. Same results as rms_norm + matmul_multi
     * (+ add_bias) (+ swiglu) up to float rounding: a GPU does it in one launch per step. */
    int (*norm_matmul)(backend *be, int n, be_buf *const *ys, const be_weight *const *ws,
                       const be_weight *const *bs, const be_buf *x, const be_weight *norm,
                       float eps, bool swiglu, be_buf *hn, int n_tok, forge_err *err);
    /* x += w h for n_tok rows (the residual add after a projection); tmp is a [n_tok][w->ne1]
     * buffer the op may use. Same as matmul into tmp + add. */
    int (*matmul_add)(backend *be, be_buf *x, const be_weight *w, const be_buf *h, be_buf *tmp,
                      int n_tok, forge_err *err);
    /* The attention block in one op: per-head RMSNorm of q and k with q_norm / k_norm (each
     * NULL to skip; F32 [head_dim], eps), RoPE of q and k, the K/V store and attention, as
     * rms_norm + rope(q) + rope(k) + attention do. q may be modified; k and v are not. */
    int (*attention_rope)(backend *be, be_buf *out, be_buf *q, const be_buf *k, const be_buf *v,
                          be_kv *kv, const be_attn *a, const be_rope *rope,
                          const be_weight *q_norm, const be_weight *k_norm, float eps,
                          forge_err *err);
    /* Sampling on the device: *out = the id the sampler chain described by s picks from the
     * n logits at x[off..] (see be_sample). Waits for the device and reads back only the id.
     * FORGE_E_UNSUPPORTED when the backend cannot run this chain (the caller then reads the
     * logits and samples on the host). */
    int (*sample)(backend *be, const be_buf *x, int64_t off, int64_t n, const be_sample *s,
                  int32_t *out, forge_err *err);

    /* ---- paged KV cache helpers (optional: NULL on a backend without them, the GPU for now) ----
     * docs/ENGINE.md: a cache of n_ctx = n_blocks * block_size rows read as
     * [layer][block][offset][kv_dim]; position p of a sequence lives at row
     * table[p / block_size] * block_size + p % block_size (the slots kvb_seq_rows returns). */
    /* Store k, v ([n_tok][kv_dim]) of one layer at cache rows rows[0..n_tok) (host array, each
     * in [0, n_ctx)), converted to the cache's type. */
    int (*kv_store)(backend *be, be_kv *kv, int layer, const be_buf *k, const be_buf *v,
                    const int32_t *rows, int n_tok, forge_err *err);
    /* Copy-on-write (kvb_copy): rows 0..n_rows of block src into block dst, K and V, every
     * layer. src == dst or n_rows == 0 does nothing. */
    int (*kv_copy_block)(backend *be, be_kv *kv, int block_size, int src, int dst, int n_rows,
                         forge_err *err);
    /* Read rows rows[0..n) of one layer back as floats into k_out, v_out ([n][kv_dim] each,
     * host memory; tests and debugging). */
    int (*kv_read)(backend *be, const be_kv *kv, int layer, const int32_t *rows, int n,
                   float *k_out, float *v_out, forge_err *err);

    /* ---- ops of the other architectures (issue 15; NULL on a backend without them: such a
     * backend does not run those architectures, arch_desc.gpu) ---- */
    /* out[i] = gelu_tanh(gate[i]) * up[i] (be_act). out may be gate. */
    int (*geglu)(backend *be, be_buf *out, const be_buf *gate, const be_buf *up, int64_t n,
                 forge_err *err);
    /* x[i] *= s */
    int (*scale)(backend *be, be_buf *x, float s, int64_t n, forge_err *err);
    /* x[i] = cap * tanh(x[i] / cap) */
    int (*softcap)(backend *be, be_buf *x, float cap, int64_t n, forge_err *err);
    /* out[t] = sum over the n_used experts e with the largest router logits[t][e] (ties: the
     * smaller e) of w_e * down_e(act(gate_e h[t]) * up_e h[t]), w = softmax of logits[t] over
     * all n_expert (renormalised over the selected when norm_w). h: [n_tok][n_embd],
     * logits: [n_tok][n_expert], out: [n_tok][n_embd] (written, not added). A row's result does
     * not depend on the other rows (batch invariance). */
    int (*moe_ffn)(backend *be, be_buf *out, const be_buf *h, const be_buf *logits,
                   const be_moe *moe, int n_tok, forge_err *err);
} be_ops;

/* A sampler chain for be_ops.sample, as src/sample/sampler.c runs it: penalties over the
 * window (n_pen distinct ids with their counts) -> top-k -> top-p -> min-p -> temperature ->
 * the draw r in [0, 1) (drawn by the host's generator); temperature <= 0 is greedy. */
struct be_sample {
    float temperature;
    int32_t top_k; /* <= 0: off */
    float top_p;   /* >= 1: off */
    float min_p;   /* <= 0: off */
    float repeat_penalty, presence_penalty, frequency_penalty;
    const int32_t *pen_ids, *pen_counts; /* host arrays of n_pen entries */
    int32_t n_pen;
    float r;
};

struct backend {
    const be_ops *ops;
};

/* The CPU backend: n_threads >= 1 (a persistent pool). f32_math: multiply by F32 copies of the
 * weight rows instead of ggml's mixed-precision kernels. Owned by the caller (ops->destroy). */
int backend_cpu_create(int n_threads, bool f32_math, backend **out, forge_err *err);

#endif /* FORGE_BACKEND_H */
