/* gpu_gemm.cu - batched matrix product for prefill through the vendor BLAS.
 *
 * CUDA: cuBLAS (cublasGemmEx, fp32 accumulation), activations converted to the weight's F16/BF16
 * type first (the CPU's kern_matmul does the same rounding). HIP: hipBLAS is not packaged in
 * Debian 12, so a HIP build has no BLAS: every function here returns FORGE_E_UNSUPPORTED with a
 * message saying so, and the caller falls back to gpu_matvec per token. Quantized weights are not
 * handled here (dequantize to F16 first, or use gpu_matvec). */
#include <stdlib.h>

#include "gpu/gpu_common.cuh"
#include "gpu/gpu_ops.h"
#include "gpu/gpu_vendor.h"

#if FORGE_GPU_HAVE_BLAS

struct gpu_blas {
    cublasHandle_t h;
};

static const char *blas_status_name(cublasStatus_t s)
{
    switch (s) {
    case CUBLAS_STATUS_NOT_INITIALIZED:
        return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED:
        return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE:
        return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH:
        return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_EXECUTION_FAILED:
        return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_NOT_SUPPORTED:
        return "CUBLAS_STATUS_NOT_SUPPORTED";
    default:
        return "CUBLAS_STATUS_(other)";
    }
}

#define BLAS_CHECK(call)                                                                           \
    do {                                                                                           \
        cublasStatus_t bs_ = (call);                                                               \
        if (bs_ != CUBLAS_STATUS_SUCCESS) {                                                        \
            rc = gpu_err_set(err,                                                                  \
                             bs_ == CUBLAS_STATUS_ALLOC_FAILED ? FORGE_E_NOMEM : FORGE_E_DEVICE,   \
                             "%s:%d: %s: %s", __FILE__, __LINE__, #call, blas_status_name(bs_));   \
            goto fail;                                                                             \
        }                                                                                          \
    } while (0)

/* float -> fp16 / bf16 bits, round to nearest even. */
template <int BF16>
__global__ void k_cvt_act(const float *__restrict__ x, unsigned short *__restrict__ y, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        if (BF16) {
            unsigned u = __float_as_uint(x[i]);
            if ((u & 0x7fffffffu) > 0x7f800000u)
                y[i] = (unsigned short)((u >> 16) | 0x40u);
            else
                y[i] = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        } else {
            y[i] = gpu_f32_to_fp16(x[i]);
        }
    }
}

GPU_API int gpu_blas_create(gpu_blas **out, forge_err *err)
{
    int rc = FORGE_OK;
    gpu_blas *b = (gpu_blas *)calloc(1, sizeof *b);
    *out = NULL;
    if (!b) return gpu_err_set(err, FORGE_E_NOMEM, "gpu_blas_create: out of host memory");
    BLAS_CHECK(cublasCreate(&b->h));
    *out = b;
    return FORGE_OK;
fail:
    free(b);
    return rc;
}

GPU_API void gpu_blas_free(gpu_blas *b)
{
    if (!b) return;
    (void)cublasDestroy(b->h);
    free(b);
}

GPU_API int gpu_gemm(gpu_blas *b, int wtype, const void *d_w, int64_t n_out, int64_t n_in,
                     const float *d_x, int64_t n_tok, void *d_xc, float *d_y, gpu_stream *s,
                     forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    const float one = 1.0f, zero = 0.0f;
    cudaDataType_t ab_type;
    const void *bmat = d_x;
    if (!b || !d_w || !d_x || !d_y || n_out <= 0 || n_in <= 0 || n_tok <= 0 || n_out > INT32_MAX ||
        n_in > INT32_MAX || n_tok > INT32_MAX)
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_gemm: NULL argument or bad shape");
    if (wtype == GGML_TYPE_F32) {
        ab_type = CUDA_R_32F;
    } else if (wtype == GGML_TYPE_F16 || wtype == GGML_TYPE_BF16) {
        int64_t n = n_tok * n_in;
        int64_t g = (n + 255) / 256;
        if (!d_xc)
            return gpu_err_set(err, FORGE_E_INVALID, "gpu_gemm: %s weights need d_xc",
                               gpu_type_name(wtype));
        ab_type = wtype == GGML_TYPE_F16 ? CUDA_R_16F : CUDA_R_16BF;
        if (wtype == GGML_TYPE_F16) {
            k_cvt_act<0>
                <<<(unsigned)(g > 65536 ? 65536 : g), 256, 0, st>>>(d_x, (unsigned short *)d_xc, n);
            GPU_LAUNCH_CHECK("k_cvt_act<F16>", st);
        } else {
            k_cvt_act<1>
                <<<(unsigned)(g > 65536 ? 65536 : g), 256, 0, st>>>(d_x, (unsigned short *)d_xc, n);
            GPU_LAUNCH_CHECK("k_cvt_act<BF16>", st);
        }
        bmat = d_xc;
    } else {
        return gpu_err_set(err, FORGE_E_UNSUPPORTED,
                           "gpu_gemm: weight type %s (F32, F16, BF16 only; use gpu_matvec)",
                           gpu_type_name(wtype));
    }
    /* Column-major view: W is n_in x n_out (lda n_in), X is n_in x n_tok, Y is n_out x n_tok.
     * Y = W^T X. */
    BLAS_CHECK(cublasSetStream(b->h, st));
    BLAS_CHECK(cublasGemmEx(b->h, CUBLAS_OP_T, CUBLAS_OP_N, (int)n_out, (int)n_tok, (int)n_in, &one,
                            d_w, ab_type, (int)n_in, bmat, ab_type, (int)n_in, &zero, d_y,
                            CUDA_R_32F, (int)n_out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    if (gpu_sync_debug()) GPU_CHECK(cudaStreamSynchronize(st));
    return FORGE_OK;
fail:
    return rc;
}

#else /* no BLAS in this build (HIP: hipBLAS is not packaged in Debian 12) */

struct gpu_blas {
    int unused;
};

static int no_blas(forge_err *err)
{
    return gpu_err_set(err, FORGE_E_UNSUPPORTED,
                       "GEMM is not available in this %s build: hipBLAS is not packaged in "
                       "Debian 12; use gpu_matvec per token",
                       gpu_backend_name());
}

GPU_API int gpu_blas_create(gpu_blas **out, forge_err *err)
{
    *out = NULL;
    return no_blas(err);
}

GPU_API void gpu_blas_free(gpu_blas *b)
{
    (void)b;
}

GPU_API int gpu_gemm(gpu_blas *b, int wtype, const void *d_w, int64_t n_out, int64_t n_in,
                     const float *d_x, int64_t n_tok, void *d_xc, float *d_y, gpu_stream *s,
                     forge_err *err)
{
    return no_blas(err);
}

#endif
