/* gpu_gemm.cu - batched matrix product for prefill through the vendor BLAS.
 *
 * CUDA: cuBLAS (cublasGemmEx, fp32 accumulation), activations converted to the weight's F16/BF16
 * type first (the CPU's kern_matmul does the same rounding). HIP: hipBLAS is not packaged in
 * Debian 12, so a HIP build has no BLAS: every function here returns FORGE_E_UNSUPPORTED with a
 * message saying so, and the caller falls back to gpu_matvec per token. Quantized weights are not
 * handled by the GEMM itself: gpu_weight_to_f16 (here, for every build) dequantizes a Q8_0/Q4_0
 * matrix in the device layout to fp16 rows first (the types of gpu_quant.cuh: k_gq_to_f16 in
 * gpu_kquant.cu).
 *
 * gpu_weight_to_f16: one thread per 16-byte chunk of the quants plane (Q4_0: one 32-element
 * block, 64 bytes of fp16 out; Q8_0: half a block, 32 bytes out). Each thread dequantizes its
 * chunk into a shared-memory stage (16-byte slots, XOR-swizzled so that neither the writes nor
 * the reads conflict), then the block writes its whole contiguous output with coalesced 16-byte
 * stores. Values are d * q rounded to fp16 once, as before. */
#include <stdlib.h>

#include "gpu/gpu_common.cuh"
#include "gpu/gpu_ops.h"
#include "gpu/gpu_quant.cuh"
#include "gpu/gpu_vendor.h"

/* ---- whole-matrix dequantization (prefill GEMM with quantized weights) ------------------------
 */
#define W2H_THREADS 256

GPU_DEV unsigned w2h_pack(float d, int q0, int q1)
{
    return (unsigned)gpu_f32_to_fp16(d * (float)q0) |
           ((unsigned)gpu_f32_to_fp16(d * (float)q1) << 16);
}

/* 16-byte output slots per quants chunk, and the slot swizzle (conflict-free 16-byte accesses
 * for the per-thread writes and the block-wide reads; see the header comment). */
template <int WT> struct w2h_geom {
    enum { PIECES = WT == GGML_TYPE_Q4_0 ? 4 : 2 };
};
template <int WT> GPU_DEVT int w2h_slot(int chunk_in_block, int piece)
{
    if (WT == GGML_TYPE_Q4_0) return chunk_in_block * 4 + (piece ^ ((chunk_in_block >> 1) & 3));
    return chunk_in_block * 2 + (piece ^ ((chunk_in_block >> 2) & 1));
}

template <int WT>
__global__ void __launch_bounds__(W2H_THREADS)
    k_weight_to_f16(const uint4 *__restrict__ quants, const unsigned short *__restrict__ scales,
                    int64_t n_chunks, uint4 *__restrict__ out)
{
    constexpr int PIECES = w2h_geom<WT>::PIECES;
    __shared__ uint4 stage[W2H_THREADS * PIECES];
    gpu_pdl_trigger();
    const int tid = threadIdx.x;
    const int64_t c0 = (int64_t)blockIdx.x * W2H_THREADS, c = c0 + tid;
    if (c < n_chunks) {
        const uint4 qv = gpu_ld_stream16(quants + c);
        const unsigned w[4] = {qv.x, qv.y, qv.z, qv.w};
        const float d = gpu_fp16_to_f32(scales[WT == GGML_TYPE_Q4_0 ? c : c >> 1]);
#pragma unroll
        for (int p = 0; p < PIECES; p++) {
            unsigned h[4];
            if (WT == GGML_TYPE_Q4_0) {
                /* piece p: elements 8p .. 8p+7 = nibbles of bytes (p&1)*8 .. +7, low nibbles
                 * (elements 0..15) for p < 2, high nibbles (16..31) for p >= 2 */
                const int shift = (p >> 1) * 4;
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int b0 = (p & 1) * 8 + 2 * e, b1 = b0 + 1;
                    const int q0 = (int)((w[b0 >> 2] >> (8 * (b0 & 3) + shift)) & 15u) - 8;
                    const int q1 = (int)((w[b1 >> 2] >> (8 * (b1 & 3) + shift)) & 15u) - 8;
                    h[e] = w2h_pack(d, q0, q1);
                }
            } else {
                /* piece p: the signed bytes 8p .. 8p+7 of the chunk */
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int b0 = p * 8 + 2 * e, b1 = b0 + 1;
                    const int q0 = (int)(signed char)(unsigned char)(w[b0 >> 2] >> (8 * (b0 & 3)));
                    const int q1 = (int)(signed char)(unsigned char)(w[b1 >> 2] >> (8 * (b1 & 3)));
                    h[e] = w2h_pack(d, q0, q1);
                }
            }
            uint4 v;
            v.x = h[0];
            v.y = h[1];
            v.z = h[2];
            v.w = h[3];
            stage[w2h_slot<WT>(tid, p)] = v;
        }
    }
    __syncthreads();
    const int64_t n_out = n_chunks * PIECES; /* 16-byte slots of the whole output */
#pragma unroll
    for (int k = 0; k < PIECES; k++) {
        const int j = tid + k * W2H_THREADS;
        if (c0 * PIECES + j < n_out)
            out[c0 * PIECES + j] = stage[w2h_slot<WT>(j / PIECES, j % PIECES)];
    }
}

/* Unaligned output (not from gpu_malloc): one element per thread, the same values. */
template <int WT>
__global__ void k_weight_to_f16_scalar(const uint8_t *__restrict__ quants,
                                       const unsigned short *__restrict__ scales, int64_t n,
                                       unsigned short *__restrict__ out)
{
    gpu_pdl_trigger();
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t blk = i / 32;
        const int j = (int)(i % 32);
        const float d = gpu_fp16_to_f32(scales[blk]);
        int q;
        if (WT == GGML_TYPE_Q8_0) {
            q = ((const int8_t *)quants)[i];
        } else {
            const uint8_t byte = quants[blk * 16 + (j & 15)];
            q = (j < 16 ? (byte & 15) : (byte >> 4)) - 8;
        }
        out[i] = gpu_f32_to_fp16(d * (float)q);
    }
}

GPU_API int gpu_weight_to_f16(int wtype, const void *d_w, int64_t n_rows, int64_t n_in, void *d_out,
                              gpu_stream *s, forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    if (gq_geom_of(wtype).qk != 0) {
        if (gpu_weight_bytes(wtype, n_rows, n_in) == 0)
            return gpu_err_set(err, FORGE_E_UNSUPPORTED,
                               "gpu_weight_to_f16: type %s with %lld x %lld is not supported",
                               gpu_type_name(wtype), (long long)n_rows, (long long)n_in);
        if (!d_w || !d_out || !gpu_is_aligned(d_w, 16) || !gpu_is_aligned(d_out, 2))
            return gpu_err_set(err, FORGE_E_INVALID,
                               "gpu_weight_to_f16: NULL or misaligned buffer");
        return gq_weight_to_f16(wtype, d_w, n_rows, n_in, d_out, st, err);
    }
    if ((wtype != GGML_TYPE_Q8_0 && wtype != GGML_TYPE_Q4_0) ||
        gpu_weight_bytes(wtype, n_rows, n_in) == 0)
        return gpu_err_set(err, FORGE_E_UNSUPPORTED,
                           "gpu_weight_to_f16: type %s with %lld x %lld is not supported",
                           gpu_type_name(wtype), (long long)n_rows, (long long)n_in);
    if (!d_w || !d_out) return gpu_err_set(err, FORGE_E_INVALID, "gpu_weight_to_f16: NULL buffer");
    {
        const uint8_t *q = (const uint8_t *)d_w;
        const unsigned short *sc =
            (const unsigned short *)(q + gpu_weight_scales_offset(wtype, n_rows, n_in));
        const int64_t n = n_rows * n_in;
        /* quants plane bytes / 16: Q4_0 n/2 bytes, Q8_0 n bytes (n a multiple of 32) */
        const int64_t n_chunks = wtype == GGML_TYPE_Q4_0 ? n / 32 : n / 16;
        if (gpu_is_aligned(d_w, 16) && gpu_is_aligned(d_out, 16)) {
            const unsigned grid = (unsigned)((n_chunks + W2H_THREADS - 1) / W2H_THREADS);
            if (wtype == GGML_TYPE_Q8_0)
                k_weight_to_f16<GGML_TYPE_Q8_0>
                    <<<grid, W2H_THREADS, 0, st>>>((const uint4 *)q, sc, n_chunks, (uint4 *)d_out);
            else
                k_weight_to_f16<GGML_TYPE_Q4_0>
                    <<<grid, W2H_THREADS, 0, st>>>((const uint4 *)q, sc, n_chunks, (uint4 *)d_out);
            GPU_LAUNCH_CHECK("k_weight_to_f16", st);
        } else {
            const int64_t g = (n + 255) / 256;
            const unsigned grid = (unsigned)(g > 65536 ? 65536 : g);
            if (wtype == GGML_TYPE_Q8_0)
                k_weight_to_f16_scalar<GGML_TYPE_Q8_0>
                    <<<grid, 256, 0, st>>>(q, sc, n, (unsigned short *)d_out);
            else
                k_weight_to_f16_scalar<GGML_TYPE_Q4_0>
                    <<<grid, 256, 0, st>>>(q, sc, n, (unsigned short *)d_out);
            GPU_LAUNCH_CHECK("k_weight_to_f16_scalar", st);
        }
    }
    return FORGE_OK;
fail:
    return rc;
}

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
            (void)cudaGetLastError(); /* a runtime error it left must not blame the next launch */ \
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

/* The same conversion, four elements per thread (16-byte loads, 8-byte stores): n4 = n / 4. */
template <int BF16>
__global__ void k_cvt_act4(const float4 *__restrict__ x, uint2 *__restrict__ y, int64_t n4)
{
    gpu_pdl_trigger();
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n4;
         i += (int64_t)gridDim.x * blockDim.x) {
        const float4 v = x[i];
        const float f[4] = {v.x, v.y, v.z, v.w};
        unsigned short h[4];
#pragma unroll
        for (int e = 0; e < 4; e++) {
            if (BF16) {
                unsigned u = __float_as_uint(f[e]);
                if ((u & 0x7fffffffu) > 0x7f800000u)
                    h[e] = (unsigned short)((u >> 16) | 0x40u);
                else
                    h[e] = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
            } else {
                h[e] = gpu_f32_to_fp16(f[e]);
            }
        }
        uint2 w;
        w.x = (unsigned)h[0] | ((unsigned)h[1] << 16);
        w.y = (unsigned)h[2] | ((unsigned)h[3] << 16);
        y[i] = w;
    }
}

GPU_API int gpu_blas_create(gpu_blas **out, forge_err *err)
{
    int rc = FORGE_OK;
    gpu_blas *b = (gpu_blas *)calloc(1, sizeof *b);
    *out = NULL;
    if (!b) return gpu_err_set(err, FORGE_E_NOMEM, "gpu_blas_create: out of host memory");
    {
        /* test hook: FORGE_GPU_TEST_BLAS_FAIL=1 makes the handle fail (the backend's fallback
         * and its warning are tested with it) */
        const char *f = getenv("FORGE_GPU_TEST_BLAS_FAIL");
        if (f && f[0] == '1') {
            rc = gpu_err_set(
                err, FORGE_E_DEVICE,
                "cublasCreate: CUBLAS_STATUS_NOT_INITIALIZED (FORGE_GPU_TEST_BLAS_FAIL)");
            goto fail;
        }
    }
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
    if (cublasDestroy(b->h) != CUBLAS_STATUS_SUCCESS) (void)cudaGetLastError();
    free(b);
}

GPU_API int gpu_gemm_ex(gpu_blas *b, int wtype, const void *d_w, int64_t n_out, int64_t n_in,
                        const float *d_x, int64_t n_tok, void *d_xc, float *d_y, float beta,
                        gpu_stream *s, forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    const float one = 1.0f;
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
        if (n % 4 == 0 && gpu_is_aligned(d_x, 16) && gpu_is_aligned(d_xc, 8)) {
            const int64_t g4 = (n / 4 + 255) / 256;
            const unsigned grid4 = (unsigned)(g4 > 65536 ? 65536 : g4);
            if (wtype == GGML_TYPE_F16)
                k_cvt_act4<0><<<grid4, 256, 0, st>>>((const float4 *)d_x, (uint2 *)d_xc, n / 4);
            else
                k_cvt_act4<1><<<grid4, 256, 0, st>>>((const float4 *)d_x, (uint2 *)d_xc, n / 4);
            GPU_LAUNCH_CHECK("k_cvt_act4", st);
        } else if (wtype == GGML_TYPE_F16) {
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
                            d_w, ab_type, (int)n_in, bmat, ab_type, (int)n_in, &beta, d_y,
                            CUDA_R_32F, (int)n_out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    if (gpu_sync_debug()) GPU_CHECK(cudaStreamSynchronize(st));
    return FORGE_OK;
fail:
    return rc;
}

GPU_API int gpu_gemm(gpu_blas *b, int wtype, const void *d_w, int64_t n_out, int64_t n_in,
                     const float *d_x, int64_t n_tok, void *d_xc, float *d_y, gpu_stream *s,
                     forge_err *err)
{
    return gpu_gemm_ex(b, wtype, d_w, n_out, n_in, d_x, n_tok, d_xc, d_y, 0.0f, s, err);
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

GPU_API int gpu_gemm_ex(gpu_blas *b, int wtype, const void *d_w, int64_t n_out, int64_t n_in,
                        const float *d_x, int64_t n_tok, void *d_xc, float *d_y, float beta,
                        gpu_stream *s, forge_err *err)
{
    return no_blas(err);
}

#endif
