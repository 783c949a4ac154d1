/* backend_cpu.h - what the CPU backend's source files share (internal to src/cpu): the layout of
 * its activation buffer and the ops implemented outside backend_cpu.c. The interface itself is
 * src/backend/backend.h. */
#ifndef FORGE_CPU_BACKEND_CPU_H
#define FORGE_CPU_BACKEND_CPU_H

#include "backend/backend.h"

/* A CPU activation buffer: n host floats, owned by the buffer (cpu_buf_create/free). Code in
 * src/cpu may also wrap its own host arrays in a be_buf on the stack to call the backend's ops
 * on them (the buffer then borrows the array). */
struct be_buf {
    float *data;
    int64_t n;
};

/* be_ops.moe_ffn on the CPU (src/cpu/moe.c): the contract is backend.h's. The experts of each
 * token are summed in ascending expert index; each expert's matmuls go through be's own matmul
 * ops (batch invariant, f32_math honoured). */
int cpu_moe_ffn(backend *be, be_buf *out, const be_buf *h, const be_buf *logits, const be_moe *moe,
                int n_tok, forge_err *err);

/* The repacked copy the CPU backend be reads for w (be_ops.weights_acquire makes them, one per
 * model), NULL if it reads w's mapping; *layout (may be NULL) receives its KERN_LAYOUT_*.
 * Borrowed: valid while be holds its weights. For tests. */
const void *backend_cpu_packed(backend *be, const be_weight *w, int *layout);

#endif /* FORGE_CPU_BACKEND_CPU_H */
