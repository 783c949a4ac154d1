/* fwd.c - the state a forward pass runs on (fwd_state: backend, K/V storage, activation
 * buffers, logits buffer), the one place the device is chosen, and the architecture table that
 * dispatches a batch to its architecture's forward pass. Owned by a context (context.c) or an
 * engine (src/engine/engine.c); the forward passes themselves live in the arch_*.c files. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend_gpu.h"
#include "core/util.h"
#include "model/model.h"

/* Make the model's weights usable by fs's backend through its weights_acquire: a GPU backend
 * takes a reference on the model's device copy for its GPU (uploading it when it is the first
 * context there), the CPU backend on the model's repacked copies (Q4_0 on AVX-512; the rest is
 * read from the mapping), the tensor-parallel one on each rank's; they report progress
 * themselves. A backend without it reads the mapping (progress after each tensor). */
static int acquire_weights(fwd_state *fs, const fwd_params *p, forge_err *err)
{
    const be_ops *op = fs->be->ops;
    forge_model *m = fs->model;
    const int n = model_weights(m, NULL, 0);
    be_weight **w = malloc((size_t)(n > 0 ? n : 1) * sizeof *w);
    uint64_t total = 0, done = 0;
    int rc = FORGE_OK;
    if (!w) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    model_weights(m, w, n);
    if (op->weights_acquire) {
        rc = op->weights_acquire(fs->be, &m->wshare, w, n, p->progress, p->progress_user, err);
    } else if (p->progress) {
        for (int i = 0; i < n; i++)
            total += w[i]->n_bytes;
        for (int i = 0; i < n; i++) {
            done += w[i]->n_bytes;
            p->progress(done, total, p->progress_user);
        }
    }
    free(w);
    return rc;
}

static void free_bufs(fwd_state *fs)
{
    be_buf **all[] = {&fs->b.x,    &fs->b.xn,   &fs->b.q,    &fs->b.k,
                      &fs->b.v,    &fs->b.att,  &fs->b.o,    &fs->b.gate,
                      &fs->b.up,   &fs->b.last, &fs->b.logits, &fs->b.router};
    for (size_t i = 0; i < FORGE_ARRAY_LEN(all); i++) {
        if (*all[i]) fs->be->ops->buf_free(fs->be, *all[i]);
        *all[i] = NULL;
    }
}

static int alloc_bufs(fwd_state *fs, forge_err *err)
{
    const forge_model_info *hp = &fs->model->info;
    const int64_t nb = fs->n_batch, E = hp->n_embd;
    const int64_t QD = (int64_t)hp->n_head * hp->head_dim,
                  KD = (int64_t)hp->n_head_kv * hp->head_dim;
    const arch_params *ap = &fs->model->ap;
    /* the FFN buffers hold the widest of the dense, expert and shared-expert FFNs */
    int64_t F = hp->n_ff;
    if (ap->n_ff_exp > F) F = ap->n_ff_exp;
    if (ap->n_ff_shexp > F) F = ap->n_ff_shexp;
    struct {
        be_buf **buf;
        int64_t n;
    } want[] = {
        {&fs->b.x, nb * E},
        {&fs->b.xn, nb * E},
        {&fs->b.q, nb * QD},
        {&fs->b.k, nb * KD},
        {&fs->b.v, nb * KD},
        {&fs->b.att, nb * QD},
        {&fs->b.o, nb * (E > QD ? E : QD)},
        {&fs->b.gate, nb * F},
        {&fs->b.up, nb * F},
        {&fs->b.last, nb * E},
        {&fs->b.logits, hp->n_vocab},
        {&fs->b.router, ap->n_expert > 0 ? nb * ap->n_expert : 0},
    };
    for (size_t i = 0; i < FORGE_ARRAY_LEN(want); i++) {
        if (want[i].n == 0) continue;
        int rc = fs->be->ops->buf_create(fs->be, want[i].n, want[i].buf, err);
        if (rc) return rc;
    }
    fs->b.logits_rows = 1;
    return FORGE_OK;
}

/* True when w is a stacked expert matrix (ld_bind_experts: ffn_{gate,up,down}_exps). */
static bool is_expert_weight(const be_weight *w)
{
    return w->name && strstr(w->name, "_exps.weight");
}

/* What a GPU backend is sized for: the whole model (share: the model's weight sets), or one
 * tensor-parallel rank (its forms of the weights, its 1/n_rank of the heads; share NULL: a
 * rank's weights are its own, backend_tp.h). Activation buffers are whole-sized either way
 * (backend_tp.c keeps every buffer whole on every rank), plus a rank's gather scratch. */
typedef struct gpu_target {
    int gpu;
    be_weight *const *ws;
    int n_w;
    int n_rank;
    be_wshare *share;
} gpu_target;

/* A GPU backend and its memory plan (weights + KV cache + scratch must fit before anything is
 * uploaded). The activation sizes follow alloc_bufs, plus n_batch logit rows (all_logits).
 *
 * Every family of the architecture table runs here (arch_desc.gpu: the table says which; all
 * do since the GPU path of Gemma 2/3, Phi-3, ChatGLM/GLM-4, Mixtral and Qwen3-MoE was checked
 * on the H200 against the CPU and Hugging Face, docs/GPU.md). */
static int create_gpu(fwd_state *fs, const fwd_params *p, const gpu_target *tg, backend **out,
                      forge_err *err)
{
    forge_model *m = fs->model;
    const forge_model_info *hp = &m->info;
    int rc;
    const arch_desc *ad = arch_find(m->arch);
    *out = NULL;
    if (!ad || !ad->gpu)
        return forge_err_set(err, FORGE_E_UNSUPPORTED,
                             "the GPU backend does not run %s models yet (use the CPU)", hp->arch);
    if (p->kv_type == FORGE_KV_Q8_0)
        return forge_err_set(err, FORGE_E_UNSUPPORTED,
                             "the GPU backend has no q8_0 KV cache yet (use f16 or f32)");
    /* every weight's type must have GPU kernels (mixed files: each tensor's own type) */
    for (int i = 0; i < tg->n_w; i++)
        if ((rc = backend_gpu_check_weight(tg->ws[i], err))) return rc;
    if ((rc = backend_gpu_create(tg->gpu, out, err))) return rc;
    be_gpu_plan pl = {0};
    for (int i = 0; i < tg->n_w; i++) {
        if (m->ap.n_expert > 0 && is_expert_weight(tg->ws[i]))
            backend_gpu_plan_add_experts(*out, &pl, tg->ws[i], m->ap.n_expert);
        else
            backend_gpu_plan_add_weight(*out, &pl, tg->ws[i]);
    }
    /* the FFN buffers hold the widest FFN (alloc_bufs) */
    int64_t F = hp->n_ff;
    if (m->ap.n_ff_exp > F) F = m->ap.n_ff_exp;
    if (m->ap.n_ff_shexp > F) F = m->ap.n_ff_shexp;
    const int64_t nb = fs->n_batch, E = hp->n_embd, V = hp->n_vocab;
    const int64_t QD = (int64_t)hp->n_head * hp->head_dim,
                  KD = (int64_t)hp->n_head_kv * hp->head_dim;
    pl.n_layer = hp->n_layer;
    pl.n_ctx = fs->kv_rows;
    pl.kv_dim = m->n_embd_k_gqa / tg->n_rank;
    pl.kv_type = (int)p->kv_type;
    pl.n_head = hp->n_head / tg->n_rank;
    pl.head_dim = hp->head_dim;
    pl.n_batch = fs->n_batch;
    pl.act_floats = nb * (2 * E + 2 * QD + 2 * KD + (E > QD ? E : QD) + 2 * F) + nb * E + V + nb * V +
                    (m->ap.n_expert > 0 ? nb * m->ap.n_expert : 0) +
                    (tg->n_rank > 1 ? nb * V : 0);
    pl.yarn = m->rope_ext_factor != 0.0f;
    pl.n_vocab = hp->n_vocab;
    pl.f32_math = p->f32_math;
    pl.share = tg->share;
    pl.n_seq_max = p->n_seq_max;
    if (m->ap.n_expert > 0) {
        pl.moe_n_expert = m->ap.n_expert;
        pl.moe_n_used = m->ap.n_expert_used;
        pl.moe_n_embd = E;
        pl.moe_n_ff = m->ap.n_ff_exp > 0 ? m->ap.n_ff_exp : hp->n_ff;
    }
    if ((rc = backend_gpu_plan(*out, &pl, err))) {
        (*out)->ops->destroy(*out);
        *out = NULL;
        return rc;
    }
    const char *w = backend_gpu_warning(*out);
    if (w) snprintf(fs->warning, sizeof fs->warning, "%s", w);
    return FORGE_OK;
}

/* The model's weight list (model_weights), malloc'ed; *n its length. */
static int weight_list(forge_model *m, be_weight ***out, int *n, forge_err *err)
{
    *n = model_weights(m, NULL, 0);
    *out = malloc((size_t)(*n > 0 ? *n : 1) * sizeof **out);
    if (!*out) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    model_weights(m, *out, *n);
    return FORGE_OK;
}

/* Tensor parallelism over p->n_tp ranks (backend_tp.h): the plan, checked before anything is
 * created (head counts, block boundaries, enough GPUs), each rank's weights, one backend per
 * rank (GPUs gpu_index.. with NCCL; with device CPU, CPU backends over the in-process
 * communicator), then the tensor-parallel backend that owns them all. */
static int create_tp(fwd_state *fs, const fwd_params *p, forge_err *err)
{
    forge_model *m = fs->model;
    const int n = p->n_tp;
    tp_plan plan = {0};
    tp_shares *sh = NULL;
    be_weight **ws = NULL;
    backend *ranks[COMM_MAX_RANK] = {0};
    be_comm *comm = NULL;
    int n_w, rc;
    if ((rc = model_tp_plan(m, n, &plan, err))) return rc;
    if (p->device != FORGE_DEVICE_CPU) {
        int n_gpu = 0;
        if ((rc = backend_gpu_count(&n_gpu, err))) goto done;
        if (p->gpu_index + n > n_gpu) {
            rc = forge_err_set(err, FORGE_E_RANGE,
                               "--tp %d from GPU %d needs GPUs %d..%d; %d GPU%s present", n,
                               p->gpu_index, p->gpu_index, p->gpu_index + n - 1, n_gpu,
                               n_gpu == 1 ? " is" : "s are");
            goto done;
        }
    }
    if ((rc = weight_list(m, &ws, &n_w, err)) ||
        (rc = tp_shares_create(&plan, ws, n_w, &sh, err)))
        goto done;
    for (int r = 0; r < n; r++) {
        if (p->device == FORGE_DEVICE_CPU) {
            rc = backend_cpu_create(fs->n_threads, p->f32_math, &ranks[r], err);
        } else {
            be_weight **list;
            const int nl = tp_shares_rank(sh, r, &list);
            if (nl < 0) {
                rc = forge_err_set(err, FORGE_E_NOMEM, "out of memory");
                goto done;
            }
            const gpu_target tg = {p->gpu_index + r, list, nl, n, NULL};
            rc = create_gpu(fs, p, &tg, &ranks[r], err);
            free(list);
        }
        if (rc) goto done;
    }
    rc = p->device == FORGE_DEVICE_CPU ? comm_host_create(n, &comm, err)
                                       : backend_gpu_comm_create(ranks, n, &comm, err);
    if (rc) goto done;
    rc = backend_tp_create(ranks, n, comm, sh, &fs->be, err);
    memset(ranks, 0, sizeof ranks); /* owned by fs->be, or freed on failure */
    sh = NULL;
    comm = NULL;
done:
    if (comm) comm->ops->destroy(comm); /* before the ranks whose streams it uses */
    for (int r = 0; r < n; r++)
        if (ranks[r]) ranks[r]->ops->destroy(ranks[r]);
    tp_shares_free(sh);
    free(ws);
    tp_plan_free(&plan);
    return rc;
}

/* The one place a backend is chosen: CPU, GPU, or AUTO (the GPU when it can be created and the
 * model fits, else the CPU; the reason is dropped: front ends that want to say it probe first
 * with forge_gpu_probe). */
static int select_backend(fwd_state *fs, const fwd_params *p, forge_err *err)
{
    int rc;
    if (p->n_tp >= 1) return create_tp(fs, p, err);
    if (p->device == FORGE_DEVICE_GPU || p->device == FORGE_DEVICE_AUTO) {
        be_weight **ws;
        int n_w;
        if ((rc = weight_list(fs->model, &ws, &n_w, err))) return rc;
        const gpu_target tg = {p->gpu_index, ws, n_w, 1, &fs->model->wshare};
        rc = create_gpu(fs, p, &tg, &fs->be, err);
        free(ws);
        if (rc == FORGE_OK || p->device == FORGE_DEVICE_GPU) return rc;
        if (fs->be) fs->be->ops->destroy(fs->be);
        fs->be = NULL;
    }
    return backend_cpu_create(fs->n_threads, p->f32_math, &fs->be, err);
}


int fwd_state_init(fwd_state *fs, forge_model *m, const fwd_params *p, forge_err *err)
{
    int rc;
    const forge_model_info *hp = &m->info;
    memset(fs, 0, sizeof *fs);
    if (p->kv_rows < 1 || p->n_batch < 1 || p->n_threads < 1 ||
        (p->kv_type != FORGE_KV_F32 && p->kv_type != FORGE_KV_F16 &&
         p->kv_type != FORGE_KV_Q8_0))
        return forge_err_set(err, FORGE_E_INVALID,
                             "bad forward parameters: %d cache rows, batch %d, %d threads, kv "
                             "type %d",
                             p->kv_rows, p->n_batch, p->n_threads, (int)p->kv_type);
    if (p->kv_type == FORGE_KV_Q8_0 && hp->head_dim % 32)
        return forge_err_set(err, FORGE_E_UNSUPPORTED,
                             "a q8_0 KV cache holds heads of whole 32-value blocks; this model's "
                             "head_dim is %d (use f16 or f32)",
                             hp->head_dim);
    fs->model = m;
    fs->kv_rows = p->kv_rows;
    fs->n_ctx_seq = p->kv_rows;
    fs->n_batch = p->n_batch;
    fs->n_threads = p->n_threads;
    fs->kv_type = p->kv_type;
    if ((rc = select_backend(fs, p, err))) goto fail;
    if (fs->be->ops->activate && (rc = fs->be->ops->activate(fs->be, err))) goto fail;
    /* weights: a GPU backend shares (or uploads) the device copy of its GPU */
    if ((rc = acquire_weights(fs, p, err))) goto fail;
    if ((rc = fs->be->ops->kv_create(fs->be, hp->n_layer, fs->kv_rows, m->n_embd_k_gqa,
                                     (int)p->kv_type, &fs->kv, err)))
        goto fail;
    if ((rc = alloc_bufs(fs, err))) goto fail;
    return FORGE_OK;
fail:
    fwd_state_release(fs);
    return rc;
}

void fwd_state_release(fwd_state *fs)
{
    if (!fs || !fs->be) return;
    const be_ops *op = fs->be->ops;
    /* Work may still be queued (an interrupted prompt, a failed decode): the backend frees its
     * buffers and cache in its stream's order, and releases the shared weights only after its
     * own work is done (backend.h). */
    if (op->activate) (void)op->activate(fs->be, NULL);
    free_bufs(fs);
    if (fs->kv) op->kv_free(fs->be, fs->kv);
    fs->kv = NULL;
    if (op->weights_release) op->weights_release(fs->be);
    op->destroy(fs->be);
    fs->be = NULL;
}

int fwd_reserve_logits(fwd_state *fs, int64_t rows, forge_err *err)
{
    const int64_t V = fs->model->info.n_vocab;
    if (rows <= fs->b.logits_rows) return FORGE_OK;
    fs->be->ops->buf_free(fs->be, fs->b.logits);
    fs->b.logits = NULL;
    fs->b.logits_rows = 0;
    int rc = fs->be->ops->buf_create(fs->be, rows * V, &fs->b.logits, err);
    if (rc) return rc;
    fs->b.logits_rows = rows;
    return FORGE_OK;
}

/* The batch's invariants, checked once here so that no backend reads outside its arrays: rows
 * grouped by sequence at consecutive positions, slots and table entries inside the cache. */
static int check_batch(const fwd_state *fs, const int32_t *ids, const be_batch *bt, forge_err *err)
{
    const int32_t V = fs->model->info.n_vocab;
    if (!bt || !ids || bt->n_tok < 1 || bt->n_tok > fs->n_batch || bt->n_seq < 1 ||
        bt->n_seq > bt->n_tok || bt->block_size < 1 || fs->kv_rows % bt->block_size ||
        bt->table_stride < 1 || bt->n_out < 0 || bt->n_out > bt->n_tok ||
        bt->n_out > fs->b.logits_rows || !bt->pos || !bt->slot || !bt->seq_start || !bt->table ||
        !bt->n_table || (bt->n_out && !bt->out_rows) || bt->seq_start[0] != 0 ||
        bt->seq_start[bt->n_seq] != bt->n_tok)
        return forge_err_set(err, FORGE_E_INTERNAL,
                             "bad batch: %d rows (most %d), %d sequences, blocks of %d (cache "
                             "%d rows), %d logit rows (room for %lld)",
                             bt ? bt->n_tok : -1, fs->n_batch, bt ? bt->n_seq : -1,
                             bt ? bt->block_size : -1, fs->kv_rows, bt ? bt->n_out : -1,
                             (long long)fs->b.logits_rows);
    const int n_blocks = fs->kv_rows / bt->block_size;
    for (int s = 0; s < bt->n_seq; s++) {
        const int r0 = bt->seq_start[s], r1 = bt->seq_start[s + 1];
        const int32_t *tab = bt->table + (size_t)s * bt->table_stride;
        if (r1 <= r0 || bt->n_table[s] < 1 || bt->n_table[s] > bt->table_stride)
            return forge_err_set(err, FORGE_E_INTERNAL, "bad batch: sequence %d rows %d..%d, "
                                 "%d table entries", s, r0, r1, bt->n_table[s]);
        for (int i = 0; i < bt->n_table[s]; i++)
            if (tab[i] < 0 || tab[i] >= n_blocks)
                return forge_err_set(err, FORGE_E_INTERNAL,
                                     "bad batch: sequence %d table entry %d is block %d of %d", s,
                                     i, tab[i], n_blocks);
        for (int r = r0; r < r1; r++) {
            const int32_t p = bt->pos[r];
            if (p < 0 || (r > r0 && p != bt->pos[r - 1] + 1) ||
                p / bt->block_size >= bt->n_table[s] ||
                bt->slot[r] != tab[p / bt->block_size] * bt->block_size + p % bt->block_size)
                return forge_err_set(err, FORGE_E_INTERNAL,
                                     "bad batch: row %d (sequence %d) at position %d, slot %d", r,
                                     s, p, bt->slot[r]);
            if (ids[r] < 0 || ids[r] >= V)
                return forge_err_set(err, FORGE_E_RANGE,
                                     "token id %d at row %d is outside the vocabulary (%d)",
                                     ids[r], r, V);
        }
    }
    for (int i = 0; i < bt->n_out; i++)
        if (bt->out_rows[i] < 0 || bt->out_rows[i] >= bt->n_tok ||
            (i && bt->out_rows[i] <= bt->out_rows[i - 1]))
            return forge_err_set(err, FORGE_E_INTERNAL, "bad batch: logit row %d is row %d", i,
                                 bt->out_rows[i]);
    return FORGE_OK;
}

int model_forward(fwd_state *fs, const int32_t *ids, const be_batch *bt, forge_err *err)
{
    const arch_desc *a = arch_find(fs->model->arch);
    int rc;
    if (!a) return forge_err_set(err, FORGE_E_INTERNAL, "no forward pass for architecture %d",
                                 (int)fs->model->arch);
    if ((rc = check_batch(fs, ids, bt, err))) return rc;
    return a->forward(fs, ids, bt, err);
}

int model_forward_step(fwd_state *fs, const int32_t *ids, const be_batch *bt, forge_err *err)
{
    backend *be = fs->be;
    bool again = false;
    for (int attempt = 0; attempt < 2; attempt++) {
        int rc = model_forward(fs, ids, bt, err);
        int rc_end = be->ops->step_end(be, rc, &again, rc ? NULL : err);
        if (rc_end) return rc_end;
        if (!again) return rc;
    }
    return forge_err_set(err, FORGE_E_INTERNAL, "the recorded step was not run");
}
