/* gpu_runtime.cu - the runtime side of libforge_cuda: error reporting, devices, memory, streams,
 * events, graphs, the per-stream context and the gpu_api table the engine dlopens. No kernels
 * here (gpu_matvec.cu, gpu_ops.cu, gpu_attn.cu, gpu_gemm.cu hold them). */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/gpu_ops.h"
#include "gpu/gpu_vendor.h"

int gpu_err_set(forge_err *err, int code, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        err->code = code;
    }
    return code;
}

int gpu_status_from(cudaError_t e)
{
    return e == cudaErrorMemoryAllocation ? FORGE_E_NOMEM : FORGE_E_DEVICE;
}

int gpu_sync_debug(void)
{
    /* Racy first read is harmless: every thread computes the same value. */
    static volatile int cached = -1;
    if (cached < 0) {
        const char *v = getenv("FORGE_GPU_SYNC");
        cached = (v && v[0] == '1') ? 1 : 0;
    }
    return cached;
}

int gpu_pdl_enabled(void)
{
#if FORGE_GPU_HIP
    return 0;
#else
    static volatile int cached = -1; /* benign race: every thread computes the same value */
    if (cached < 0) {
        const char *v = getenv("FORGE_GPU_PDL");
        int on = !(v && v[0] == '0');
        int dev = 0, major = 0;
        if (cudaGetDevice(&dev) != cudaSuccess ||
            cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
            major = 0;
        (void)cudaGetLastError();
        if (major < 9) on = 0;
        cached = on;
    }
    return cached;
#endif
}

int gpu_sm_count(void)
{
    static volatile int cache[64]; /* benign race: every thread stores the same value */
    int dev = 0, n = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) {
        (void)cudaGetLastError();
        return 0;
    }
    if (dev < 64 && cache[dev] > 0) return cache[dev];
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    if (dev < 64) cache[dev] = n;
    return n;
}

size_t gpu_smem_limit(void)
{
    static volatile int cache[64]; /* benign race: every thread stores the same value */
    int dev = 0, n = 0;
    size_t limit = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) {
        (void)cudaGetLastError();
        dev = -1;
    }
    if (dev >= 0 && dev < 64 && cache[dev] > 0) {
        limit = (size_t)cache[dev];
    } else if (dev >= 0) {
        /* the opt-in maximum; where the runtime has none (some HIP devices say 0), the plain
         * per-block maximum */
        if (cudaDeviceGetAttribute(&n, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) !=
                cudaSuccess ||
            n <= 0) {
            (void)cudaGetLastError();
            n = 0;
            GPU_IGNORE(cudaDeviceGetAttribute(&n, cudaDevAttrMaxSharedMemoryPerBlock, dev));
        }
        if (n > 0 && dev < 64) cache[dev] = n;
        limit = n > 0 ? (size_t)n : 0;
    }
    const char *e = getenv("FORGE_GPU_SMEM_LIMIT");
    if (e && *e) {
        char *end = NULL;
        unsigned long long v = strtoull(e, &end, 10);
        if (end && *end == '\0' && (limit == 0 || v < limit)) limit = (size_t)v;
    }
    return limit;
}

GPU_API const char *gpu_backend_name(void)
{
    return FORGE_GPU_HIP ? "HIP" : "CUDA";
}

/* ---- devices ----------------------------------------------------------------------------------
 */
GPU_API int gpu_device_count(int *n, forge_err *err)
{
    int rc = FORGE_OK;
    *n = 0;
    GPU_CHECK(cudaGetDeviceCount(n));
    return FORGE_OK;
fail:
    *n = 0;
    return rc;
}

GPU_API int gpu_device_info_get(int dev, gpu_device_info *out, forge_err *err)
{
    int rc = FORGE_OK;
    cudaDeviceProp p;
    memset(out, 0, sizeof *out);
    GPU_CHECK(cudaGetDeviceProperties(&p, dev));
    snprintf(out->name, sizeof out->name, "%s", p.name);
    out->vendor_amd = FORGE_GPU_HIP;
    out->cc_major = p.major;
    out->cc_minor = p.minor;
    out->sm_count = p.multiProcessorCount;
    out->warp_size = p.warpSize;
    out->total_mem = p.totalGlobalMem;
    out->l2_bytes = (size_t)p.l2CacheSize;
#if FORGE_GPU_HIP
    /* memoryClockRate in kHz, DDR: 2 transfers per clock. */
    out->mem_bw_peak = 2.0 * p.memoryClockRate * 1e3 * (p.memoryBusWidth / 8.0);
#else
    {
        int clock_khz = 0, bus_bits = 0;
        if (cudaDeviceGetAttribute(&clock_khz, cudaDevAttrMemoryClockRate, dev) == cudaSuccess &&
            cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, dev) == cudaSuccess)
            out->mem_bw_peak = 2.0 * clock_khz * 1e3 * (bus_bits / 8.0);
        (void)cudaGetLastError();
    }
#endif
    return FORGE_OK;
fail:
    return rc;
}

GPU_API int gpu_set_device(int dev, forge_err *err)
{
    int rc = FORGE_OK;
    GPU_CHECK(cudaSetDevice(dev));
    return FORGE_OK;
fail:
    return rc;
}

GPU_API int gpu_device_sync(forge_err *err)
{
    int rc = FORGE_OK;
    GPU_CHECK(cudaDeviceSynchronize());
    return FORGE_OK;
fail:
    return rc;
}

/* ---- memory -----------------------------------------------------------------------------------
 */
GPU_API int gpu_malloc(void **d_out, size_t bytes, forge_err *err)
{
    int rc = FORGE_OK;
    *d_out = NULL;
    GPU_CHECK(cudaMalloc(d_out, bytes ? bytes : 1));
    return FORGE_OK;
fail:
    *d_out = NULL;
    return rc;
}

GPU_API void gpu_free(void *d_ptr)
{
    if (d_ptr) GPU_IGNORE(cudaFree(d_ptr));
}

GPU_API int gpu_malloc_async(void **d_out, size_t bytes, gpu_stream *s, forge_err *err)
{
    int rc = FORGE_OK;
    *d_out = NULL;
    GPU_CHECK(cudaMallocAsync(d_out, bytes ? bytes : 1, GPU_STREAM(s)));
    return FORGE_OK;
fail:
    *d_out = NULL;
    return rc;
}

#ifdef FORGE_GPU_BROKEN_FREE
/* `make gpu GPU_BROKEN_FREE=1` only, to prove that tests/gpu/test_gpu_free_race.c catches the bug
 * class: the memory is released at once (in the order of an idle stream of its own), ignoring
 * the work still queued on s that uses it, so the pool may hand it to other work right away. */
static cudaStream_t broken_free_stream(void)
{
    static cudaStream_t idle[64];
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) {
        (void)cudaGetLastError();
        return NULL;
    }
    if (!idle[dev]) GPU_IGNORE(cudaStreamCreateWithFlags(&idle[dev], cudaStreamNonBlocking));
    return idle[dev];
}
#endif

GPU_API int gpu_free_async(void *d_ptr, gpu_stream *s, forge_err *err)
{
    int rc = FORGE_OK;
    if (!d_ptr) return FORGE_OK;
#ifdef FORGE_GPU_BROKEN_FREE
    (void)s;
    GPU_CHECK(cudaFreeAsync(d_ptr, broken_free_stream()));
#else
    GPU_CHECK(cudaFreeAsync(d_ptr, GPU_STREAM(s)));
#endif
    return FORGE_OK;
fail:
    return rc;
}

GPU_API int gpu_host_alloc(void **h_out, size_t bytes, forge_err *err)
{
    int rc = FORGE_OK;
    *h_out = NULL;
    GPU_CHECK(cudaMallocHost(h_out, bytes ? bytes : 1));
    return FORGE_OK;
fail:
    *h_out = NULL;
    return rc;
}

GPU_API void gpu_host_free(void *h_ptr)
{
    if (h_ptr) GPU_IGNORE(cudaFreeHost(h_ptr));
}

GPU_API int gpu_memcpy_h2d(void *d_dst, const void *h_src, size_t bytes, gpu_stream *s,
                           forge_err *err)
{
    int rc = FORGE_OK;
    GPU_CHECK(cudaMemcpyAsync(d_dst, h_src, bytes, cudaMemcpyHostToDevice, GPU_STREAM(s)));
    return FORGE_OK;
fail:
    return rc;
}

GPU_API int gpu_memcpy_d2h(void *h_dst, const void *d_src, size_t bytes, gpu_stream *s,
                           forge_err *err)
{
    int rc = FORGE_OK;
    GPU_CHECK(cudaMemcpyAsync(h_dst, d_src, bytes, cudaMemcpyDeviceToHost, GPU_STREAM(s)));
    return FORGE_OK;
fail:
    return rc;
}

GPU_API int gpu_memcpy_d2d(void *d_dst, const void *d_src, size_t bytes, gpu_stream *s,
                           forge_err *err)
{
    int rc = FORGE_OK;
    GPU_CHECK(cudaMemcpyAsync(d_dst, d_src, bytes, cudaMemcpyDeviceToDevice, GPU_STREAM(s)));
    return FORGE_OK;
fail:
    return rc;
}

GPU_API int gpu_memset(void *d_dst, int byte, size_t bytes, gpu_stream *s, forge_err *err)
{
    int rc = FORGE_OK;
    GPU_CHECK(cudaMemsetAsync(d_dst, byte, bytes, GPU_STREAM(s)));
    return FORGE_OK;
fail:
    return rc;
}

/* ---- streams, events, graphs -------------------------------------------------------------------
 */
GPU_API int gpu_stream_create(gpu_stream **out, forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = NULL;
    *out = NULL;
    GPU_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    *out = (gpu_stream *)st;
    return FORGE_OK;
fail:
    return rc;
}

GPU_API void gpu_stream_destroy(gpu_stream *s)
{
    if (s) GPU_IGNORE(cudaStreamDestroy(GPU_STREAM(s)));
}

GPU_API int gpu_stream_sync(gpu_stream *s, forge_err *err)
{
    int rc = FORGE_OK;
    GPU_CHECK(cudaStreamSynchronize(GPU_STREAM(s)));
    return FORGE_OK;
fail:
    return rc;
}

GPU_API int gpu_event_create(gpu_event **out, int timing, forge_err *err)
{
    int rc = FORGE_OK;
    cudaEvent_t ev = NULL;
    *out = NULL;
    GPU_CHECK(cudaEventCreateWithFlags(&ev, timing ? cudaEventDefault : cudaEventDisableTiming));
    *out = (gpu_event *)ev;
    return FORGE_OK;
fail:
    return rc;
}

GPU_API void gpu_event_destroy(gpu_event *e)
{
    if (e) GPU_IGNORE(cudaEventDestroy((cudaEvent_t)e));
}

GPU_API int gpu_event_record(gpu_event *e, gpu_stream *s, forge_err *err)
{
    int rc = FORGE_OK;
    GPU_CHECK(cudaEventRecord((cudaEvent_t)e, GPU_STREAM(s)));
    return FORGE_OK;
fail:
    return rc;
}

GPU_API int gpu_event_sync(gpu_event *e, forge_err *err)
{
    int rc = FORGE_OK;
    GPU_CHECK(cudaEventSynchronize((cudaEvent_t)e));
    return FORGE_OK;
fail:
    return rc;
}

GPU_API int gpu_stream_wait_event(gpu_stream *s, gpu_event *e, forge_err *err)
{
    int rc = FORGE_OK;
    GPU_CHECK(cudaStreamWaitEvent(GPU_STREAM(s), (cudaEvent_t)e, 0));
    return FORGE_OK;
fail:
    return rc;
}

GPU_API int gpu_event_elapsed_ms(gpu_event *start, gpu_event *stop, float *ms, forge_err *err)
{
    int rc = FORGE_OK;
    *ms = 0;
    GPU_CHECK(cudaEventElapsedTime(ms, (cudaEvent_t)start, (cudaEvent_t)stop));
    return FORGE_OK;
fail:
    return rc;
}

GPU_API int gpu_graph_begin(gpu_stream *s, forge_err *err)
{
    int rc = FORGE_OK;
    GPU_CHECK(cudaStreamBeginCapture(GPU_STREAM(s), cudaStreamCaptureModeThreadLocal));
    return FORGE_OK;
fail:
    return rc;
}

GPU_API int gpu_graph_end(gpu_stream *s, gpu_graph **out, forge_err *err)
{
    int rc = FORGE_OK;
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    *out = NULL;
    GPU_CHECK(cudaStreamEndCapture(GPU_STREAM(s), &graph));
    GPU_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    GPU_IGNORE(cudaGraphDestroy(graph));
    *out = (gpu_graph *)exec;
    return FORGE_OK;
fail:
    if (graph) GPU_IGNORE(cudaGraphDestroy(graph));
    return rc;
}

GPU_API int gpu_graph_launch(gpu_graph *g, gpu_stream *s, forge_err *err)
{
    int rc = FORGE_OK;
    GPU_CHECK(cudaGraphLaunch((cudaGraphExec_t)g, GPU_STREAM(s)));
    return FORGE_OK;
fail:
    return rc;
}

GPU_API void gpu_graph_free(gpu_graph *g)
{
    if (g) GPU_IGNORE(cudaGraphExecDestroy((cudaGraphExec_t)g));
}

/* ---- context ----------------------------------------------------------------------------------
 */
struct gpu_ctx {
    gpu_stream *stream;
    void *scratch;
    size_t scratch_bytes;
};

GPU_API int gpu_ctx_create(gpu_ctx **out, forge_err *err)
{
    int rc = FORGE_OK;
    gpu_ctx *c = (gpu_ctx *)calloc(1, sizeof *c);
    *out = NULL;
    if (!c) return gpu_err_set(err, FORGE_E_NOMEM, "gpu_ctx_create: out of host memory");
    rc = gpu_stream_create(&c->stream, err);
    if (rc) goto fail;
    *out = c;
    return FORGE_OK;
fail:
    free(c);
    return rc;
}

GPU_API void gpu_ctx_free(gpu_ctx *c)
{
    if (!c) return;
    /* Work may still be queued: release the scratch in stream order, then wait for the stream
     * so that nothing the context owns outlives the work that uses it. */
    (void)gpu_free_async(c->scratch, c->stream, NULL);
    GPU_IGNORE(cudaStreamSynchronize(GPU_STREAM(c->stream)));
    gpu_stream_destroy(c->stream);
    free(c);
}

GPU_API gpu_stream *gpu_ctx_stream(gpu_ctx *c)
{
    return c->stream;
}

GPU_API int gpu_ctx_scratch(gpu_ctx *c, size_t bytes, void **d_out, forge_err *err)
{
    int rc = FORGE_OK;
    void *fresh = NULL;
    *d_out = NULL;
    if (bytes <= c->scratch_bytes && c->scratch) {
        *d_out = c->scratch;
        return FORGE_OK;
    }
    rc = gpu_malloc_async(&fresh, bytes, c->stream, err);
    if (rc) goto fail;
    rc = gpu_free_async(c->scratch, c->stream, err);
    if (rc) goto fail;
    c->scratch = fresh;
    c->scratch_bytes = bytes;
    *d_out = fresh;
    return FORGE_OK;
fail:
    (void)gpu_free_async(fresh, c->stream, NULL);
    return rc;
}

/* ---- the dlopen table -------------------------------------------------------------------------
 */
GPU_API int gpu_mem_info(size_t *free_bytes, size_t *total_bytes, forge_err *err)
{
    int rc = FORGE_OK;
    size_t f = 0, t = 0;
    GPU_CHECK(cudaMemGetInfo(&f, &t));
    if (free_bytes) *free_bytes = f;
    if (total_bytes) *total_bytes = t;
    return FORGE_OK;
fail:
    return rc;
}

static const gpu_api g_api_v1 = {
    GPU_API_VERSION,   gpu_backend_name,   gpu_device_count,  gpu_device_info_get,
    gpu_set_device,    gpu_device_sync,    gpu_malloc,        gpu_free,
    gpu_malloc_async,  gpu_free_async,     gpu_memcpy_h2d,    gpu_memcpy_d2h,
    gpu_memcpy_d2d,    gpu_memset,         gpu_ctx_create,    gpu_ctx_free,
    gpu_ctx_stream,    gpu_ctx_scratch,    gpu_stream_sync,   gpu_graph_begin,
    gpu_graph_end,     gpu_graph_launch,   gpu_graph_free,    gpu_matvec_supported,
    gpu_weight_bytes,  gpu_weight_convert, gpu_act_q8_bytes,  gpu_act_quantize,
    gpu_matvec,        gpu_rmsnorm,        gpu_rope,          gpu_swiglu,
    gpu_add,           gpu_embed,          gpu_argmax,        gpu_attn_scratch_bytes,
    gpu_attention,     gpu_blas_create,    gpu_blas_free,     gpu_gemm,
    gpu_copy,          gpu_mem_info,       gpu_weight_to_f16, gpu_add_rows,
    gpu_store,         gpu_host_alloc,     gpu_host_free,     gpu_event_create,
    gpu_event_destroy, gpu_event_record,   gpu_event_sync,    gpu_attention_batch,
    gpu_store_at,      gpu_fused_matvec_supported, gpu_fused_matvec_invariant, gpu_fused_matvec,
    gpu_qk_rope_store,
    gpu_rope_ext,      gpu_attention_prompt_supported, gpu_attention_prompt,
    gpu_sample_scratch_bytes, gpu_sample, gpu_gemm_ex, gpu_argmax_scratch_bytes, gpu_argmax_ex,
    gpu_round_act,
    gpu_store_slots, gpu_qk_rope_store_slots, gpu_paged_scratch_bytes, gpu_paged_attention,
    gpu_argmax_rows, gpu_attention_prompt_paged, gpu_matvec_multi_supported, gpu_matvec_multi,
    gpu_geglu, gpu_scale, gpu_softcap, gpu_moe_route, gpu_moe_accum, gpu_matvec_rows,
    gpu_comm_create, gpu_comm_free, gpu_comm_all_reduce_sum, gpu_comm_all_gather_cols,
    gpu_mmq_supported, gpu_mmq,
    gpu_matvec_multi_mats_ok, gpu_matvec_multi_mats, gpu_rmsnorm_q8, gpu_swiglu_q8,
};

GPU_API const gpu_api *forge_gpu_get_api(int version)
{
    return version == GPU_API_VERSION ? &g_api_v1 : NULL;
}
