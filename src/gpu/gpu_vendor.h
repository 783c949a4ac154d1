/* gpu_vendor.h - the one place where CUDA and HIP differ. Kernels and launchers in the .cu files
 * of src/gpu are written in CUDA spelling; when compiled as HIP (clang -x hip, which defines
 * __HIP__) this header maps every runtime name they use to its hip* twin, and supplies portable
 * device helpers: warp shuffles with an explicit width, the wavefront size, fp16 conversion and
 * dp4a. It also holds the one check macro for runtime calls and the launch check used after every
 * kernel. Only .cu files include it: .c files never see CUDA or HIP headers. */
#ifndef FORGE_GPU_VENDOR_H
#define FORGE_GPU_VENDOR_H

#include <stdint.h>

#include "forge.h"

/* ---- runtime headers and name mapping ------------------------------------------------------ */
#if defined(__HIP__) || defined(__HIPCC__)
#define FORGE_GPU_HIP 1
#include <hip/hip_runtime.h>
#include <hip/hip_fp16.h>

#define cudaError_t hipError_t
#define cudaSuccess hipSuccess
#define cudaErrorMemoryAllocation hipErrorOutOfMemory
#define cudaErrorNotReady hipErrorNotReady
#define cudaGetErrorString hipGetErrorString
#define cudaGetErrorName hipGetErrorName
#define cudaGetLastError hipGetLastError
#define cudaPeekAtLastError hipPeekAtLastError
#define cudaDeviceProp hipDeviceProp_t
#define cudaGetDeviceCount hipGetDeviceCount
#define cudaGetDeviceProperties hipGetDeviceProperties
#define cudaSetDevice hipSetDevice
#define cudaGetDevice hipGetDevice
#define cudaDeviceSynchronize hipDeviceSynchronize
#define cudaMemGetInfo hipMemGetInfo
#define cudaMalloc hipMalloc
#define cudaFree hipFree
#define cudaMallocAsync hipMallocAsync
#define cudaFreeAsync hipFreeAsync
#define cudaMallocHost hipHostMalloc
#define cudaFreeHost hipHostFree
#define cudaMemcpy hipMemcpy
#define cudaMemcpyAsync hipMemcpyAsync
#define cudaMemcpy2DAsync hipMemcpy2DAsync
#define cudaMemsetAsync hipMemsetAsync
#define cudaMemcpyHostToDevice hipMemcpyHostToDevice
#define cudaMemcpyDeviceToHost hipMemcpyDeviceToHost
#define cudaMemcpyDeviceToDevice hipMemcpyDeviceToDevice
#define cudaStream_t hipStream_t
#define cudaStreamCreateWithFlags hipStreamCreateWithFlags
#define cudaStreamNonBlocking hipStreamNonBlocking
#define cudaStreamDestroy hipStreamDestroy
#define cudaStreamSynchronize hipStreamSynchronize
#define cudaStreamWaitEvent hipStreamWaitEvent
#define cudaEvent_t hipEvent_t
#define cudaEventCreateWithFlags hipEventCreateWithFlags
#define cudaEventDefault hipEventDefault
#define cudaEventDisableTiming hipEventDisableTiming
#define cudaEventDestroy hipEventDestroy
#define cudaEventRecord hipEventRecord
#define cudaEventSynchronize hipEventSynchronize
#define cudaEventElapsedTime hipEventElapsedTime
#define cudaGraph_t hipGraph_t
#define cudaGraphExec_t hipGraphExec_t
#define cudaStreamBeginCapture hipStreamBeginCapture
#define cudaStreamEndCapture hipStreamEndCapture
#define cudaStreamCaptureModeThreadLocal hipStreamCaptureModeThreadLocal
#define cudaGraphInstantiate(exec, graph, flags) hipGraphInstantiate((exec), (graph), NULL, NULL, 0)
#define cudaGraphLaunch hipGraphLaunch
#define cudaGraphDestroy hipGraphDestroy
#define cudaGraphExecDestroy hipGraphExecDestroy
#define cudaFuncSetAttribute hipFuncSetAttribute
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor hipOccupancyMaxActiveBlocksPerMultiprocessor
#define cudaFuncAttributeMaxDynamicSharedMemorySize hipFuncAttributeMaxDynamicSharedMemorySize
#define cudaDeviceGetAttribute hipDeviceGetAttribute
#define cudaDevAttrMultiProcessorCount hipDeviceAttributeMultiprocessorCount
#define cudaDevAttrMaxSharedMemoryPerBlockOptin hipDeviceAttributeSharedMemPerBlockOptin
#define cudaDevAttrMaxSharedMemoryPerBlock hipDeviceAttributeMaxSharedMemoryPerBlock

/* BLAS. hipBLAS is not packaged in Debian 12, so the default HIP build has none: gpu_gemm.cu
 * compiles its HIP branch to a FORGE_E_UNSUPPORTED return. A ROCm install with hipBLAS can build
 * with -DFORGE_GPU_HIPBLAS (the names below; not exercised by this project's checks). */
#if defined(FORGE_GPU_HIPBLAS)
#include <hipblas/hipblas.h>
#define FORGE_GPU_HAVE_BLAS 1
#define cublasHandle_t hipblasHandle_t
#define cublasStatus_t hipblasStatus_t
#define cublasCreate hipblasCreate
#define cublasDestroy hipblasDestroy
#define cublasSetStream hipblasSetStream
#define cublasGemmEx hipblasGemmEx
#define cudaDataType_t hipblasDatatype_t
#define CUDA_R_32F HIPBLAS_R_32F
#define CUDA_R_16F HIPBLAS_R_16F
#define CUDA_R_16BF HIPBLAS_R_16B
#define CUBLAS_COMPUTE_32F HIPBLAS_R_32F
#define CUBLAS_GEMM_DEFAULT HIPBLAS_GEMM_DEFAULT
#define CUBLAS_OP_N HIPBLAS_OP_N
#define CUBLAS_OP_T HIPBLAS_OP_T
#define CUBLAS_STATUS_SUCCESS HIPBLAS_STATUS_SUCCESS
#define CUBLAS_STATUS_NOT_INITIALIZED HIPBLAS_STATUS_NOT_INITIALIZED
#define CUBLAS_STATUS_ALLOC_FAILED HIPBLAS_STATUS_ALLOC_FAILED
#define CUBLAS_STATUS_INVALID_VALUE HIPBLAS_STATUS_INVALID_VALUE
#define CUBLAS_STATUS_ARCH_MISMATCH HIPBLAS_STATUS_ARCH_MISMATCH
#define CUBLAS_STATUS_EXECUTION_FAILED HIPBLAS_STATUS_EXECUTION_FAILED
#define CUBLAS_STATUS_NOT_SUPPORTED HIPBLAS_STATUS_NOT_SUPPORTED
#else
#define FORGE_GPU_HAVE_BLAS 0
#endif

#else /* CUDA */
#define FORGE_GPU_HIP 0
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cublas_v2.h>
#define FORGE_GPU_HAVE_BLAS 1
#endif

/* ---- device-side helpers ------------------------------------------------------------------- */
/* Wavefront size as the device compiler sees it (32 on NVIDIA and RDNA in wave32, 64 on CDNA).
 * Only meaningful in device code; host code asks the device properties (gpu_device_info). The
 * kernels here work in 32-lane segments (GPU_SEG) with shuffles of width 32, which is correct for
 * both wave32 and wave64, so no launch geometry depends on this value. */
#if FORGE_GPU_HIP
#if defined(__AMDGCN_WAVEFRONT_SIZE)
#define GPU_WARP_SIZE __AMDGCN_WAVEFRONT_SIZE
#else
#define GPU_WARP_SIZE 64 /* host pass of a HIP compile: not used for geometry */
#endif
#else
#define GPU_WARP_SIZE 32
#endif
#define GPU_SEG 32

/* Device helpers; GPU_DEVT for templates and their explicit specialisations (no storage class). */
#define GPU_DEV static __device__ __forceinline__
#define GPU_DEVT __device__ __forceinline__

/* Shuffles with an explicit width (a power of two <= 32). All lanes of the segment must call.
 * HIP 5.x has no *_sync shuffles; newer ROCm wants 64-bit masks for them, so HIP uses the
 * unmasked form, which is defined on both wave32 and wave64. */
GPU_DEV float gpu_shfl_xor(float v, int lane_mask, int width)
{
#if FORGE_GPU_HIP
    return __shfl_xor(v, lane_mask, width);
#else
    return __shfl_xor_sync(0xffffffffu, v, lane_mask, width);
#endif
}

GPU_DEV int gpu_shfl_xor_int(int v, int lane_mask, int width)
{
#if FORGE_GPU_HIP
    return __shfl_xor(v, lane_mask, width);
#else
    return __shfl_xor_sync(0xffffffffu, v, lane_mask, width);
#endif
}

/* Lane src_lane's v (of the width-lane group); every lane of the segment must call. */
GPU_DEV float gpu_shfl(float v, int src_lane, int width)
{
#if FORGE_GPU_HIP
    return __shfl(v, src_lane, width);
#else
    return __shfl_sync(0xffffffffu, v, src_lane, width);
#endif
}

/* Sum / max over the 32 lanes of a segment; every lane gets the result. */
GPU_DEV float gpu_seg_sum(float v)
{
#pragma unroll
    for (int m = GPU_SEG / 2; m > 0; m >>= 1)
        v += gpu_shfl_xor(v, m, GPU_SEG);
    return v;
}

/* The segment sums of a lane's NV values v[0..NV) (NV a power of two, 1..32) by reduce-scatter
 * (NV - 1 + log2(32 / NV) shuffles instead of 5 NV): lane l returns the sum over the 32 lanes of
 * value l / (32 / NV); the 32 / NV lanes that share a value return the same bits. v is
 * clobbered. One level per template instance, so every index is a constant (a loop over the
 * levels put v in local memory). */
template <int NV, int C> struct gpu_seg_scatter_level {
    static GPU_DEVT void run(float (&v)[NV], int lane)
    {
        constexpr int mask = GPU_SEG / 2 * C / NV; /* 16, 8, ... as C halves */
        const bool up = lane & mask;               /* keep the upper half of the C values */
#pragma unroll
        for (int j = 0; j < C / 2; j++) {
            const float send = up ? v[j] : v[j + C / 2], keep = up ? v[j + C / 2] : v[j];
            v[j] = keep + gpu_shfl_xor(send, mask, GPU_SEG);
        }
        gpu_seg_scatter_level<NV, C / 2>::run(v, lane);
    }
};
template <int NV> struct gpu_seg_scatter_level<NV, 1> {
    static GPU_DEVT void run(float (&)[NV], int) {}
};
template <int NV> GPU_DEVT float gpu_seg_sum_scatter(float (&v)[NV], int lane)
{
    gpu_seg_scatter_level<NV, NV>::run(v, lane);
    float sum = v[0];
#pragma unroll
    for (int mask = GPU_SEG / 2 / NV; mask > 0; mask /= 2) /* the lanes holding the same value */
        sum += gpu_shfl_xor(sum, mask, GPU_SEG);
    return sum;
}

GPU_DEV float gpu_seg_max(float v)
{
#pragma unroll
    for (int m = GPU_SEG / 2; m > 0; m >>= 1)
        v = fmaxf(v, gpu_shfl_xor(v, m, GPU_SEG));
    return v;
}

/* A 16-byte load of data read once (weights): streaming, so it does not evict the activations
 * that every row re-reads from L1/L2. */
GPU_DEV uint4 gpu_ld_stream16(const uint4 *p)
{
#if FORGE_GPU_HIP
    return *p; /* HIP: plain load (uint4 is a struct there) */
#else
    return __ldcs(p);
#endif
}

GPU_DEV float gpu_fp16_to_f32(unsigned short h)
{
    return __half2float(__ushort_as_half(h));
}

GPU_DEV unsigned short gpu_f32_to_fp16(float f)
{
    return __half_as_ushort(__float2half_rn(f));
}

GPU_DEV float gpu_bf16_to_f32(unsigned short b)
{
    return __uint_as_float((unsigned)b << 16);
}

/* f rounded to bf16 (nearest even; NaN stays NaN) and back to float. */
GPU_DEV float gpu_bf16_round(float f)
{
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return f;
    return __uint_as_float(((u + 0x7fffu + ((u >> 16) & 1u)) >> 16) << 16);
}

/* c + sum of the four signed byte products of a and b. */
GPU_DEV int gpu_dp4a(int a, int b, int c)
{
#if !FORGE_GPU_HIP
    return __dp4a(a, b, c);
#elif defined(__gfx90a__) || defined(__gfx940__) || defined(__gfx941__) || defined(__gfx942__) ||  \
    defined(__gfx1030__)
    return __builtin_amdgcn_sdot4(a, b, c, false);
#elif defined(__gfx1100__) || defined(__gfx1101__) || defined(__gfx1102__)
    return __builtin_amdgcn_sudot4(true, a, true, b, c, false);
#else
    const signed char *pa = (const signed char *)&a, *pb = (const signed char *)&b;
    return c + pa[0] * pb[0] + pa[1] * pb[1] + pa[2] * pb[2] + pa[3] * pb[3];
#endif
}

/* Programmatic dependent launch (sm_90+, CUDA 12+). A kernel launched with the PDL attribute
 * (gpu_fused.cu's launcher) may start while the kernel before it on the stream still runs: it
 * must call gpu_pdl_wait() before it reads anything earlier kernels wrote or writes anything
 * they read (weights, written once at load, may be read before the wait). gpu_pdl_trigger()
 * in a kernel lets the next (PDL-launched) kernel start launching early; it changes nothing
 * else, so any kernel may call it. Both are no-ops on HIP, before sm_90, and in kernels
 * launched the ordinary way. */
GPU_DEV void gpu_pdl_wait(void)
{
#if !FORGE_GPU_HIP && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

GPU_DEV void gpu_pdl_trigger(void)
{
#if !FORGE_GPU_HIP && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

/* Whether kernels are launched with programmatic dependent launch (gpu_launch_pdl): a device of
 * sm_90+ (CUDA), unless FORGE_GPU_PDL=0 (comparison, debugging). Cached; 0 on HIP. */
int gpu_pdl_enabled(void);

/* Launch kernel k with programmatic dependent launch where gpu_pdl_enabled(), else the ordinary
 * way. k must call gpu_pdl_wait() before it touches anything earlier kernels wrote or read
 * (every thread that does), and must not return in any thread that later reaches a barrier. */
template <typename... P, typename... A>
static inline void gpu_launch_pdl(void (*k)(P...), dim3 grid, dim3 block, size_t smem,
                                  cudaStream_t st, A... args)
{
#if !FORGE_GPU_HIP
    if (gpu_pdl_enabled()) {
        cudaLaunchConfig_t cfg = {};
        cudaLaunchAttribute attr[1] = {};
        cfg.gridDim = grid;
        cfg.blockDim = block;
        cfg.dynamicSmemBytes = smem;
        cfg.stream = st;
        attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[0].val.programmaticStreamSerializationAllowed = 1;
        cfg.attrs = attr;
        cfg.numAttrs = 1;
        (void)cudaLaunchKernelEx(&cfg, k, args...); /* its error: the caller's launch check */
        return;
    }
#endif
    k<<<grid, block, smem, st>>>(args...);
}

/* ---- error checks (host side) -------------------------------------------------------------- */
/* Defined in gpu_runtime.cu; internal to libforge_cuda (hidden visibility). */
int gpu_err_set(forge_err *err, int code, const char *fmt, ...)
#if defined(__GNUC__) || defined(__clang__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
/* FORGE_E_NOMEM for out-of-memory, FORGE_E_DEVICE for everything else. */
int gpu_status_from(cudaError_t e);
/* Multiprocessors of the current device (cached per device; 0 if the runtime does not say). */
int gpu_sm_count(void);
/* True when FORGE_GPU_SYNC=1 was set when the library first looked (cached). */
int gpu_sync_debug(void);
/* Dynamic shared memory one block of the current device may have (the opt-in maximum:
 * 227 KB on sm_90, ~99 KB on sm_86/89, 64 KB on AMD), cached per device; lowered by the
 * environment variable FORGE_GPU_SMEM_LIMIT=bytes (read at every call: a test hook for the
 * fallbacks of kernels that need more). 0 when the runtime does not say. */
size_t gpu_smem_limit(void);

/* A runtime call whose failure is not an error of the caller (cleanup, a best-effort query):
 * the error it set is cleared, so the next launch check does not report it as its own. */
#define GPU_IGNORE(call)                                                                           \
    do {                                                                                           \
        if ((call) != cudaSuccess) (void)cudaGetLastError();                                       \
    } while (0)

/* Every runtime call: on failure, set rc and err and jump to the function's `fail` label.
 * Needs `int rc` and `forge_err *err` in scope. */
#define GPU_CHECK(call)                                                                            \
    do {                                                                                           \
        cudaError_t gpu_e_ = (call);                                                               \
        if (gpu_e_ != cudaSuccess) {                                                               \
            (void)cudaGetLastError(); /* clear it, or the next launch check reports it */          \
            rc = gpu_err_set(err, gpu_status_from(gpu_e_), "%s:%d: %s: %s (%s)", __FILE__,         \
                             __LINE__, #call, cudaGetErrorString(gpu_e_),                          \
                             cudaGetErrorName(gpu_e_));                                            \
            goto fail;                                                                             \
        }                                                                                          \
    } while (0)

/* After every kernel launch: the launch error, and with FORGE_GPU_SYNC=1 a synchronisation of
 * the stream so that an execution error is reported against this kernel. */
#define GPU_LAUNCH_CHECK(kernel_name, stream)                                                      \
    do {                                                                                           \
        cudaError_t gpu_e_ = cudaGetLastError();                                                   \
        if (gpu_e_ != cudaSuccess) {                                                               \
            rc = gpu_err_set(err, gpu_status_from(gpu_e_), "launch of kernel %s failed: %s (%s)",  \
                             kernel_name, cudaGetErrorString(gpu_e_), cudaGetErrorName(gpu_e_));   \
            goto fail;                                                                             \
        }                                                                                          \
        if (gpu_sync_debug()) {                                                                    \
            gpu_e_ = cudaStreamSynchronize(stream);                                                \
            if (gpu_e_ == cudaSuccess) gpu_e_ = cudaGetLastError();                                \
            if (gpu_e_ != cudaSuccess) {                                                           \
                rc = gpu_err_set(err, gpu_status_from(gpu_e_),                                     \
                                 "kernel %s failed while running (FORGE_GPU_SYNC=1): %s (%s)",     \
                                 kernel_name, cudaGetErrorString(gpu_e_),                          \
                                 cudaGetErrorName(gpu_e_));                                        \
                goto fail;                                                                         \
            }                                                                                      \
        }                                                                                          \
    } while (0)

#define GPU_STREAM(s) ((cudaStream_t)(s))

/* Exported symbols of libforge_cuda.so; everything else is hidden. */
#define GPU_API extern "C" __attribute__((visibility("default")))

#endif /* FORGE_GPU_VENDOR_H */
