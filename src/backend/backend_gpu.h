/* backend_gpu.h - the GPU implementation of the backend interface (backend.h), on top of the
 * gpu_api table of libforge_cuda.so, which it dlopens (no CUDA/HIP header, no link-time GPU
 * dependency). The context creates it, sizes it with backend_gpu_plan (the memory planner) and
 * then prepares the weights (upload) and the KV cache like for any backend. */
#ifndef FORGE_BACKEND_GPU_H
#define FORGE_BACKEND_GPU_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backend/backend.h"
#include "backend/comm.h"

/* What the planner must know before anything is uploaded. Fill the model part with
 * backend_gpu_plan_add_weight for every weight the context will prepare. */
typedef struct be_gpu_plan {
    uint64_t weight_bytes;   /* device bytes of all weights (summed by plan_add_weight) */
    int64_t max_quant_elems; /* largest Q8_0/Q4_0 matrix, rows x cols (prefill dequant scratch) */
    int64_t max_in;          /* longest matrix row (activation scratch) */
    int n_layer, n_ctx, kv_dim, kv_type; /* kv_type: FORGE_KV_F32 / FORGE_KV_F16 */
    int n_head, head_dim, n_batch;
    int64_t act_floats; /* floats of all activation buffers the context will create */
    bool yarn;          /* the model uses YaRN RoPE */
    int64_t n_vocab;    /* logits per row (device sampling scratch) */
    bool f32_math;      /* no reduced precision: float activations, no F16 GEMM/attention */
    be_wshare *share;   /* the model's weight sets (borrowed, may be NULL): when one is on this
                         * GPU already, the weights are shared and need no memory */
    /* Batches of several sequences (an engine; a context passes 0 or 1): with n_seq_max > 1 the
     * device batch arrays are sized at plan time for n_batch rows and n_seq_max block tables of
     * max_blocks entries (0: n_ctx / 16 + 1); they grow on demand in batch_set otherwise. */
    int n_seq_max, max_blocks;
    /* A mixture of experts (moe_ffn; 0 experts: none): scratch for the routing and the
     * experts' activations of n_batch rows, sized here. */
    int moe_n_expert, moe_n_used;
    int64_t moe_n_embd, moe_n_ff;
} be_gpu_plan;

/* Load libforge_cuda.so (once per process), select GPU gpu_index and create a backend with its
 * own stream. Errors: FORGE_E_UNSUPPORTED (no library, or not a Forge GPU library),
 * FORGE_E_DEVICE (no driver or device), FORGE_E_RANGE (no such GPU). Owned by the caller
 * (ops->destroy). */
int backend_gpu_create(int gpu_index, backend **out, forge_err *err);

void backend_gpu_plan_add_weight(backend *be, be_gpu_plan *p, const be_weight *w);
/* backend_gpu_plan_add_weight for a stacked expert matrix (ld_bind_experts: n_blocks matrices of
 * w->ne1 / n_blocks rows): the backend uploads each block as a matrix of its own, so that
 * moe_ffn can multiply by one expert. Call it instead of plan_add_weight for such a weight
 * (w->slot must be set), before weights_acquire. */
void backend_gpu_plan_add_experts(backend *be, be_gpu_plan *p, const be_weight *w, int n_blocks);

/* FORGE_OK when the GPU backend has kernels for w's type (the traits table's gpu flag), else
 * FORGE_E_UNSUPPORTED naming the tensor and the type ("blk.0.attn_q.weight: type Q4_K is not
 * supported on the GPU yet"). Needs no device: the context checks every weight before it
 * creates a GPU backend, so that --device auto falls back to the CPU. */
int backend_gpu_check_weight(const be_weight *w, forge_err *err);

/* Check that weights + KV cache + scratch fit in the free device memory (FORGE_E_NOMEM with the
 * numbers and the -c that would fit, if not), then allocate the scratch. Call once, before any
 * weight_prepare. */
int backend_gpu_plan(backend *be, const be_gpu_plan *p, forge_err *err);

/* What the backend had to give up when it was planned (e.g. "the BLAS library could not be
 * initialised: prompts run without GEMM"), or NULL. Owned by the backend. */
const char *backend_gpu_warning(const backend *be);

/* See forge_gpu_probe (include/forge_model.h). */
int backend_gpu_probe(int gpu_index, char *desc, size_t desc_len, forge_err *err);

/* Number of GPUs (loads the library like backend_gpu_create). Errors: FORGE_E_UNSUPPORTED (no
 * library), FORGE_E_DEVICE (no driver); *n = 0 then. */
int backend_gpu_count(int *n, forge_err *err);

/* An NCCL communicator over the GPUs of ranks[0..n) (GPU backends on distinct GPUs, rank r =
 * ranks[r]), collectives on each rank's stream. Owned by the caller (ops->destroy), which
 * destroys it before the backends (borrowed: their streams carry the collectives; destroy
 * waits for them). Its name is "NCCL", or "RCCL" with a HIP library. Errors: FORGE_E_INVALID
 * (n outside 1..COMM_MAX_RANK, a rank that is not a GPU backend, two ranks on one GPU), and
 * gpu_comm_create's (src/gpu/gpu_ops.h: FORGE_E_UNSUPPORTED when NCCL cannot be loaded,
 * FORGE_E_DEVICE for NCCL failures). */
int backend_gpu_comm_create(backend *const *ranks, int n, be_comm **out, forge_err *err);

#endif /* FORGE_BACKEND_GPU_H */
