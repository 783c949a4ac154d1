/* gpu_archs.cu - the element-wise and routing kernels of the other architectures (issue 15):
 * GELU-gated FFN (Gemma), scaling and soft-capping (Gemma's embeddings and logits), and the
 * mixture-of-experts routing and weighted sum (Mixtral, Qwen3-MoE). The expert products
 * themselves run through gpu_matvec_rows (gpu_matvec.cu), which skips a row by a flag the
 * routing kernel writes, so no count has to come back to the host.
 *
 * Numerics follow the CPU backend (src/cpu/backend_cpu.c, src/cpu/moe.c) operation by
 * operation: products and sums are written with the round-to-nearest intrinsics where the CPU
 * rounds each operation (C without FMA contraction), so the compiler cannot fuse them. */
#include <math.h>

#include "gpu/gpu_common.cuh"
#include "gpu/gpu_ops.h"
#include "gpu/gpu_vendor.h"

static unsigned ew_grid(int64_t n)
{
    int64_t g = (n + 255) / 256;
    return (unsigned)(g > 65536 ? 65536 : (g < 1 ? 1 : g));
}

/* GELU (tanh form) as the CPU's default: ggml's fp16 table evaluated on the fly. */
GPU_DEV float gelu_ggml(float x)
{
    if (x <= -10.0f) return 0.0f;
    if (x >= 10.0f) return x;
    const float xh = gpu_fp16_to_f32(gpu_f32_to_fp16(x));
    /* 0.5f * xh * (1.0f + tanhf(c * xh * (1.0f + 0.044715f * xh * xh))), left to right */
    const float inner = __fadd_rn(1.0f, __fmul_rn(__fmul_rn(0.044715f, xh), xh));
    const float arg = __fmul_rn(__fmul_rn(0.79788456080286535587989211986876f, xh), inner);
    const float g = __fmul_rn(__fmul_rn(0.5f, xh), __fadd_rn(1.0f, tanhf(arg)));
    return gpu_fp16_to_f32(gpu_f32_to_fp16(g));
}

/* The CPU's f32_math GELU: in double, rounded once. */
GPU_DEV float gelu_exact(float x)
{
    const double c = 0.7978845608028654; /* sqrt(2 / pi) */
    const double g = x;
    const double cube = __dmul_rn(__dmul_rn(__dmul_rn(0.044715, g), g), g);
    const double t = tanh(__dmul_rn(c, __dadd_rn(g, cube)));
    return (float)__dmul_rn(__dmul_rn(0.5, g), __dadd_rn(1.0, t));
}

__global__ void k_geglu(const float *g, const float *u, float *out, int64_t n, int exact)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const float gv = g[i], uv = u[i];
        out[i] = __fmul_rn(exact ? gelu_exact(gv) : gelu_ggml(gv), uv);
    }
}

__global__ void k_scale(float *x, float s, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        x[i] = __fmul_rn(x[i], s);
}

__global__ void k_softcap(float *x, float cap, float inv, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        x[i] = __fmul_rn(tanhf(__fmul_rn(x[i], inv)), cap);
}

/* One thread per row: softmax statistics, top-k by insertion (a later expert moves ahead only
 * on a strictly larger logit: ties keep the smaller index), the weights, the run flags. */
__global__ void k_moe_route(const float *__restrict__ logits, int n_tok, int n_expert, int k,
                            int norm_w, int32_t *__restrict__ sel_out, float *__restrict__ w_out,
                            int32_t *__restrict__ run)
{
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n_tok) return;
    const float *lg = logits + (int64_t)t * n_expert;
    float mx = -INFINITY;
    for (int e = 0; e < n_expert; e++)
        mx = fmaxf(mx, lg[e]);
    double sum = 0.0;
    for (int e = 0; e < n_expert; e++)
        sum += (double)expf(__fadd_rn(lg[e], -mx));
    const float inv = (float)(1.0 / sum);
    int sel[GPU_MOE_MAX_USED];
    int n = 0;
    for (int e = 0; e < n_expert; e++) {
        int i = n < k ? n : k;
        while (i > 0 && lg[e] > lg[sel[i - 1]]) {
            if (i < k) sel[i] = sel[i - 1];
            i--;
        }
        if (i < k) {
            sel[i] = e;
            if (n < k) n++;
        }
    }
    float w[GPU_MOE_MAX_USED];
    double wsum = 0.0;
    for (int r = 0; r < k; r++) {
        w[r] = __fmul_rn(expf(__fadd_rn(lg[sel[r]], -mx)), inv);
        wsum += (double)w[r];
    }
    const float s = (float)wsum;
    for (int r = 0; r < k; r++) {
        sel_out[(int64_t)t * k + r] = sel[r];
        w_out[(int64_t)t * k + r] = norm_w ? __fdiv_rn(w[r], s) : w[r];
    }
    for (int e = 0; e < n_expert; e++) {
        int on = 0;
        for (int r = 0; r < k; r++)
            on |= sel[r] == e;
        run[(int64_t)e * n_tok + t] = on;
    }
}

__global__ void k_moe_accum(float *out, const float *y, const int32_t *sel, const float *w,
                            int64_t n_tok, int k, int64_t n_embd, int e)
{
    const int64_t n = n_tok * n_embd;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = i / n_embd;
        for (int r = 0; r < k; r++)
            if (sel[t * k + r] == e) {
                out[i] = __fadd_rn(out[i], __fmul_rn(w[t * k + r], y[i]));
                break;
            }
    }
}

GPU_API int gpu_geglu(const float *d_gate, const float *d_up, float *d_out, int64_t n, int exact,
                      gpu_stream *s, forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    if (!d_gate || !d_up || !d_out || n <= 0)
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_geglu: NULL buffer or n %lld", (long long)n);
    k_geglu<<<ew_grid(n), 256, 0, st>>>(d_gate, d_up, d_out, n, exact ? 1 : 0);
    GPU_LAUNCH_CHECK("k_geglu", st);
    return FORGE_OK;
fail:
    return rc;
}

GPU_API int gpu_scale(float *d_x, float s_mul, int64_t n, gpu_stream *s, forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    if (!d_x || n <= 0)
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_scale: NULL buffer or n %lld", (long long)n);
    k_scale<<<ew_grid(n), 256, 0, st>>>(d_x, s_mul, n);
    GPU_LAUNCH_CHECK("k_scale", st);
    return FORGE_OK;
fail:
    return rc;
}

GPU_API int gpu_softcap(float *d_x, float cap, int64_t n, gpu_stream *s, forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    if (!d_x || n <= 0 || !(cap > 0.0f))
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_softcap: NULL buffer, n %lld or cap %g",
                           (long long)n, (double)cap);
    k_softcap<<<ew_grid(n), 256, 0, st>>>(d_x, cap, 1.0f / cap, n);
    GPU_LAUNCH_CHECK("k_softcap", st);
    return FORGE_OK;
fail:
    return rc;
}

GPU_API int gpu_moe_route(const float *d_logits, int64_t n_tok, int64_t n_expert, int64_t n_used,
                          int norm_w, int32_t *d_sel, float *d_w, int32_t *d_run, gpu_stream *s,
                          forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    if (!d_logits || !d_sel || !d_w || !d_run || n_tok < 1 || n_tok > INT32_MAX ||
        n_expert < 1 || n_expert > 65536 || n_used < 1 || n_used > n_expert ||
        n_used > GPU_MOE_MAX_USED)
        return gpu_err_set(err, FORGE_E_INVALID,
                           "gpu_moe_route: %lld rows, %lld of %lld experts (at most %d)",
                           (long long)n_tok, (long long)n_used, (long long)n_expert,
                           GPU_MOE_MAX_USED);
    k_moe_route<<<(unsigned)((n_tok + 63) / 64), 64, 0, st>>>(d_logits, (int)n_tok, (int)n_expert,
                                                              (int)n_used, norm_w ? 1 : 0, d_sel,
                                                              d_w, d_run);
    GPU_LAUNCH_CHECK("k_moe_route", st);
    return FORGE_OK;
fail:
    return rc;
}

GPU_API int gpu_moe_accum(float *d_out, const float *d_y, const int32_t *d_sel, const float *d_w,
                          int64_t n_tok, int64_t n_used, int64_t n_embd, int64_t e, gpu_stream *s,
                          forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    if (!d_out || !d_y || !d_sel || !d_w || n_tok < 1 || n_embd < 1 || n_used < 1 ||
        n_used > GPU_MOE_MAX_USED || e < 0 || e > INT32_MAX)
        return gpu_err_set(err, FORGE_E_INVALID,
                           "gpu_moe_accum: NULL buffer or %lld rows of %lld, %lld experts each",
                           (long long)n_tok, (long long)n_embd, (long long)n_used);
    k_moe_accum<<<ew_grid(n_tok * n_embd), 256, 0, st>>>(d_out, d_y, d_sel, d_w, n_tok,
                                                          (int)n_used, n_embd, (int)e);
    GPU_LAUNCH_CHECK("k_moe_accum", st);
    return FORGE_OK;
fail:
    return rc;
}
