/* gpu_comm.cu - the communicator of a tensor-parallel group (gpu_ops.h, issue 16): NCCL over the
 * GPUs of one process (RCCL in a HIP build: the same API), loaded with dlopen at the first
 * gpu_comm_create, so that neither the build nor a program that never makes a communicator needs
 * the library (Debian 12 packages no NCCL). One thread drives every rank: the communicators come
 * from ncclCommInitAll, and each collective is one ncclGroupStart/End over all the ranks,
 * enqueued on each rank's stream. No kernels of its own: NCCL's, plus runtime copies.
 *
 * The few NCCL entry points and constants are declared here, with the values of NCCL's public
 * nccl.h. A CUDA build that finds <nccl.h> checks them against it (static_assert below); the HIP
 * build compiles without it. */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <type_traits>

#include "gpu/gpu_ops.h"
#include "gpu/gpu_vendor.h"

/* ---- the NCCL interface (our declarations) ------------------------------------------------ */
typedef struct forge_nccl_comm *nc_comm;                                       /* ncclComm_t */
typedef enum nc_result : int { NC_SUCCESS = 0, NC_IN_PROGRESS = 7 } nc_result; /* ncclResult_t */
typedef enum nc_dtype : int { NC_FLOAT32 = 7 } nc_dtype;                       /* ncclDataType_t */
typedef enum nc_redop : int { NC_SUM = 0 } nc_redop;                           /* ncclRedOp_t */

/* The signatures of the entry points used, over the type names given: ours below, nccl.h's in the
 * check. */
#define NC_SIGNATURES(R, COMM, DTYPE, REDOP, STREAM)                                               \
    typedef R (*get_version_fn)(int *version);                                                     \
    typedef const char *(*get_error_string_fn)(R result);                                          \
    typedef const char *(*get_last_error_fn)(COMM comm);                                           \
    typedef R (*comm_init_all_fn)(COMM * comms, int ndev, const int *devlist);                     \
    typedef R (*comm_destroy_fn)(COMM comm);                                                       \
    typedef R (*all_reduce_fn)(const void *sendbuff, void *recvbuff, size_t count, DTYPE datatype, \
                               REDOP op, COMM comm, STREAM stream);                                \
    typedef R (*broadcast_fn)(const void *sendbuff, void *recvbuff, size_t count, DTYPE datatype,  \
                              int root, COMM comm, STREAM stream);                                 \
    typedef R (*group_fn)(void);

namespace nc
{
NC_SIGNATURES(nc_result, nc_comm, nc_dtype, nc_redop, cudaStream_t)
}

#if !FORGE_GPU_HIP && defined(__has_include)
#if __has_include(<nccl.h>)
#include <nccl.h>
/* Our declarations against NCCL's own (CI compiles this): the constants, the sizes of the enums
 * passed by value, and every function type. */
namespace nc_check
{
NC_SIGNATURES(ncclResult_t, ncclComm_t, ncclDataType_t, ncclRedOp_t, cudaStream_t)
}
static_assert((int)NC_SUCCESS == (int)ncclSuccess && (int)NC_IN_PROGRESS == (int)ncclInProgress,
              "ncclResult_t");
static_assert((int)NC_FLOAT32 == (int)ncclFloat32, "ncclFloat32");
static_assert((int)NC_SUM == (int)ncclSum, "ncclSum");
static_assert(sizeof(nc_result) == sizeof(ncclResult_t) &&
                  sizeof(nc_dtype) == sizeof(ncclDataType_t) &&
                  sizeof(nc_redop) == sizeof(ncclRedOp_t) && sizeof(nc_comm) == sizeof(ncclComm_t),
              "NCCL enum or handle sizes");
static_assert(std::is_same<nc_check::get_version_fn, decltype(&ncclGetVersion)>::value,
              "ncclGetVersion");
static_assert(std::is_same<nc_check::get_error_string_fn, decltype(&ncclGetErrorString)>::value,
              "ncclGetErrorString");
static_assert(std::is_same<nc_check::get_last_error_fn, decltype(&ncclGetLastError)>::value,
              "ncclGetLastError");
static_assert(std::is_same<nc_check::comm_init_all_fn, decltype(&ncclCommInitAll)>::value,
              "ncclCommInitAll");
static_assert(std::is_same<nc_check::comm_destroy_fn, decltype(&ncclCommDestroy)>::value,
              "ncclCommDestroy");
static_assert(std::is_same<nc_check::all_reduce_fn, decltype(&ncclAllReduce)>::value,
              "ncclAllReduce");
static_assert(std::is_same<nc_check::broadcast_fn, decltype(&ncclBroadcast)>::value,
              "ncclBroadcast");
static_assert(std::is_same<nc_check::group_fn, decltype(&ncclGroupStart)>::value, "ncclGroupStart");
static_assert(std::is_same<nc_check::group_fn, decltype(&ncclGroupEnd)>::value, "ncclGroupEnd");
#define FORGE_NCCL_CHECKED 1
#endif
#endif

#if FORGE_GPU_HIP
#define NC_DEFAULT_LIB "librccl.so.1"
#define NC_NAME "RCCL"
#else
#define NC_DEFAULT_LIB "libnccl.so.2"
#define NC_NAME "NCCL"
#endif

/* ---- the library (process-wide once loaded, never unloaded) ---------------------------------- */
typedef struct nc_lib {
    nc::get_version_fn get_version;
    nc::get_error_string_fn get_error_string;
    nc::get_last_error_fn get_last_error; /* may be NULL (older libraries) */
    nc::comm_init_all_fn comm_init_all;
    nc::comm_destroy_fn comm_destroy;
    nc::all_reduce_fn all_reduce;
    nc::broadcast_fn broadcast;
    nc::group_fn group_start, group_end;
    int version;
    char path[512];
} nc_lib;

static pthread_mutex_t g_nc_lock = PTHREAD_MUTEX_INITIALIZER;
static nc_lib g_nc;
static bool g_nc_loaded;

/* Load NCCL on the first call; a failure is not remembered, so a later call (with FORGE_NCCL_LIB
 * set, say) tries again. */
static int nc_load(const nc_lib **out, forge_err *err)
{
    int rc = FORGE_OK;
    void *h = NULL;
    nc_lib lib;
    memset(&lib, 0, sizeof lib);
    pthread_mutex_lock(&g_nc_lock);
    if (g_nc_loaded) goto done;
    {
        const char *env = getenv("FORGE_NCCL_LIB");
        const char *path = env && *env ? env : NC_DEFAULT_LIB;
        snprintf(lib.path, sizeof lib.path, "%s", path);
        h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        if (!h) {
            const char *e = dlerror();
            rc = gpu_err_set(err, FORGE_E_UNSUPPORTED,
                             "cannot load %s (%s): set FORGE_NCCL_LIB or LD_LIBRARY_PATH", path,
                             e ? e : "unknown dlopen error");
            goto done;
        }
        struct {
            const char *name;
            void **slot;
            bool required;
        } syms[] = {
            {"ncclGetVersion", (void **)&lib.get_version, true},
            {"ncclGetErrorString", (void **)&lib.get_error_string, true},
            {"ncclGetLastError", (void **)&lib.get_last_error, false},
            {"ncclCommInitAll", (void **)&lib.comm_init_all, true},
            {"ncclCommDestroy", (void **)&lib.comm_destroy, true},
            {"ncclAllReduce", (void **)&lib.all_reduce, true},
            {"ncclBroadcast", (void **)&lib.broadcast, true},
            {"ncclGroupStart", (void **)&lib.group_start, true},
            {"ncclGroupEnd", (void **)&lib.group_end, true},
        };
        for (size_t i = 0; i < sizeof syms / sizeof *syms; i++) {
            *syms[i].slot = dlsym(h, syms[i].name);
            if (!*syms[i].slot && syms[i].required) {
                rc = gpu_err_set(err, FORGE_E_UNSUPPORTED,
                                 "%s is not an " NC_NAME " library (no %s): set FORGE_NCCL_LIB "
                                 "or LD_LIBRARY_PATH",
                                 path, syms[i].name);
                goto done;
            }
        }
        nc_result r = lib.get_version(&lib.version);
        if (r != NC_SUCCESS) {
            rc = gpu_err_set(err, FORGE_E_DEVICE, "%s: ncclGetVersion failed: %s", path,
                             lib.get_error_string(r));
            goto done;
        }
    }
    g_nc = lib;
    g_nc_loaded = true;
    h = NULL; /* kept loaded */
done:
    if (h) dlclose(h);
    if (rc == FORGE_OK) *out = &g_nc;
    pthread_mutex_unlock(&g_nc_lock);
    return rc;
}

/* An NCCL call: on failure, set rc and err (NCCL's message, and its last error when the library
 * has one) and jump to the function's `fail` label. Needs `rc`, `err` and `lib` in scope. */
#define NC_CHECK(call)                                                                             \
    do {                                                                                           \
        nc_result nc_r_ = (call);                                                                  \
        if (nc_r_ != NC_SUCCESS) {                                                                 \
            const char *nc_last_ = lib->get_last_error ? lib->get_last_error(NULL) : NULL;         \
            rc = gpu_err_set(err, FORGE_E_DEVICE, "%s:%d: %s: " NC_NAME " error %d: %s%s%s",       \
                             __FILE__, __LINE__, #call, (int)nc_r_, lib->get_error_string(nc_r_),  \
                             nc_last_ && *nc_last_ ? ": " : "", nc_last_ ? nc_last_ : "");         \
            goto fail;                                                                             \
        }                                                                                          \
    } while (0)

/* ---- the communicator ------------------------------------------------------------------------ */
struct gpu_comm {
    const nc_lib *lib;
    int n;
    int devs[GPU_COMM_MAX_RANK];
    nc_comm comms[GPU_COMM_MAX_RANK];
    /* collectives through NCCL: always with several ranks; one rank is a copy (or nothing),
     * unless FORGE_GPU_COMM_NCCL1=1 (a test hook: the NCCL path on a one-GPU machine) */
    bool via_nccl;
};

GPU_API int gpu_comm_create(int n, const int *devs, gpu_comm **out, forge_err *err)
{
    int rc = FORGE_OK, count = 0, prev = -1;
    const nc_lib *lib = NULL;
    gpu_comm *c = NULL;
    *out = NULL;
    if (n < 1 || n > GPU_COMM_MAX_RANK || !devs)
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_comm_create: %d ranks (1..%d)", n,
                           GPU_COMM_MAX_RANK);
    for (int r = 0; r < n; r++) {
        if (devs[r] < 0)
            return gpu_err_set(err, FORGE_E_RANGE, "gpu_comm_create: rank %d: GPU %d", r, devs[r]);
        for (int q = 0; q < r; q++)
            if (devs[q] == devs[r])
                return gpu_err_set(err, FORGE_E_INVALID,
                                   "gpu_comm_create: GPU %d is given twice (ranks %d and %d): "
                                   "each rank needs a GPU of its own",
                                   devs[r], q, r);
    }
    if ((rc = nc_load(&lib, err))) return rc;
    GPU_CHECK(cudaGetDeviceCount(&count));
    for (int r = 0; r < n; r++)
        if (devs[r] >= count)
            return gpu_err_set(err, FORGE_E_RANGE,
                               "gpu_comm_create: rank %d: GPU %d does not exist (%d GPU%s found)",
                               r, devs[r], count, count == 1 ? "" : "s");
    c = (gpu_comm *)calloc(1, sizeof *c);
    if (!c) return gpu_err_set(err, FORGE_E_NOMEM, "gpu_comm_create: out of host memory");
    c->lib = lib;
    c->n = n;
    memcpy(c->devs, devs, (size_t)n * sizeof *devs);
    {
        const char *one = getenv("FORGE_GPU_COMM_NCCL1");
        c->via_nccl = n > 1 || (one && !strcmp(one, "1"));
    }
    /* NVLink multicast (NVLS) stays off unless the user chose otherwise: on the shared machines
     * this project runs on, a program that uses it can put the host's GPUs, which others share,
     * out of service for a day or more. NCCL reads the variable when a communicator is made. */
    setenv("NCCL_NVLS_ENABLE", "0", 0);
    GPU_CHECK(cudaGetDevice(&prev));
    {
        nc_result r = lib->comm_init_all(c->comms, n, c->devs);
        if (r != NC_SUCCESS) {
            const char *last = lib->get_last_error ? lib->get_last_error(NULL) : NULL;
            rc = gpu_err_set(err, FORGE_E_DEVICE,
                             "ncclCommInitAll over %d GPU%s failed (%s, version code %d): " NC_NAME
                             " error %d: %s%s%s",
                             n, n == 1 ? "" : "s", lib->path, lib->version, (int)r,
                             lib->get_error_string(r), last && *last ? ": " : "", last ? last : "");
            goto fail;
        }
    }
    GPU_IGNORE(cudaSetDevice(prev));
    *out = c;
    return FORGE_OK;
fail:
    for (int r = 0; c && r < n; r++)
        if (c->comms[r]) (void)lib->comm_destroy(c->comms[r]);
    if (prev >= 0) GPU_IGNORE(cudaSetDevice(prev));
    free(c);
    return rc;
}

GPU_API void gpu_comm_free(gpu_comm *c)
{
    int prev = -1;
    if (!c) return;
    if (cudaGetDevice(&prev) != cudaSuccess) {
        (void)cudaGetLastError();
        prev = -1;
    }
    /* one thread, every rank's communicator in turn: NCCL frees the shared parts with the last */
    for (int r = 0; r < c->n; r++)
        if (c->comms[r]) (void)c->lib->comm_destroy(c->comms[r]);
    if (prev >= 0) GPU_IGNORE(cudaSetDevice(prev));
    free(c);
}

static int check_ranks(const gpu_comm *c, const void *a, const void *b, gpu_stream *const *s,
                       const char *op, forge_err *err)
{
    if (!c || !a || !b || !s)
        return gpu_err_set(err, FORGE_E_INVALID, "%s: NULL communicator or rank array", op);
    return FORGE_OK;
}

GPU_API int gpu_comm_all_reduce_sum(gpu_comm *c, float *const *d_bufs, int64_t n,
                                    gpu_stream *const *s, forge_err *err)
{
    int rc, prev = -1;
    bool in_group = false;
    const nc_lib *lib = c ? c->lib : NULL;
    if ((rc = check_ranks(c, d_bufs, d_bufs, s, "gpu_comm_all_reduce_sum", err))) return rc;
    if (n < 0)
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_comm_all_reduce_sum: %lld floats",
                           (long long)n);
    if (n == 0 || !c->via_nccl) return FORGE_OK; /* one rank: its buffer is the sum */
    GPU_CHECK(cudaGetDevice(&prev));
    NC_CHECK(lib->group_start());
    in_group = true;
    for (int r = 0; r < c->n; r++) {
        GPU_CHECK(cudaSetDevice(c->devs[r]));
        NC_CHECK(lib->all_reduce(d_bufs[r], d_bufs[r], (size_t)n, NC_FLOAT32, NC_SUM, c->comms[r],
                                 GPU_STREAM(s[r])));
    }
    in_group = false;
    NC_CHECK(lib->group_end());
    /* success falls through: the device is restored either way */
fail:
    if (in_group) (void)lib->group_end();
    if (prev >= 0) GPU_IGNORE(cudaSetDevice(prev));
    return rc;
}

/* Every root's block is broadcast to every rank (one group: n broadcasts of rows x cols[root]
 * floats each), so unequal column counts need no padding. One row goes straight into recv at the
 * root's column offset; several rows land in a scratch [root][rows][cols[root]] per rank, from
 * which a 2D copy per root puts each block at its column offset. Stream order throughout: the
 * scratch is allocated and freed on the rank's stream, nothing waits for the device. off[r] is
 * the column offset of rank r, off[n] the total. Leaves another device current. */
static int gather_nccl(gpu_comm *c, const float *const *d_send, float *const *d_recv, int64_t rows,
                       const int64_t *cols, const int64_t *off, gpu_stream *const *s,
                       forge_err *err)
{
    int rc = FORGE_OK;
    bool in_group = false;
    const nc_lib *lib = c->lib;
    const int64_t total = off[c->n];
    float *scratch[GPU_COMM_MAX_RANK] = {NULL};
    if (rows > 1)
        for (int d = 0; d < c->n; d++) {
            GPU_CHECK(cudaSetDevice(c->devs[d]));
            if ((rc = gpu_malloc_async((void **)&scratch[d], (size_t)(rows * total) * sizeof(float),
                                       s[d], err)))
                goto fail;
        }
    NC_CHECK(lib->group_start());
    in_group = true;
    for (int root = 0; root < c->n; root++) {
        if (cols[root] == 0) continue;
        for (int d = 0; d < c->n; d++) {
            float *dst = rows == 1 ? d_recv[d] + off[root] : scratch[d] + rows * off[root];
            /* the send buffer is read on the root only; the others pass their receive buffer */
            const float *src = d == root ? d_send[root] : dst;
            GPU_CHECK(cudaSetDevice(c->devs[d]));
            NC_CHECK(lib->broadcast(src, dst, (size_t)(rows * cols[root]), NC_FLOAT32, root,
                                    c->comms[d], GPU_STREAM(s[d])));
        }
    }
    in_group = false;
    /* NCCL enqueues a group's work at its end: the copies out of the scratch come after it */
    NC_CHECK(lib->group_end());
    if (rows > 1)
        for (int d = 0; d < c->n; d++) {
            GPU_CHECK(cudaSetDevice(c->devs[d]));
            for (int root = 0; root < c->n; root++) {
                if (cols[root] == 0) continue;
                const size_t w = (size_t)cols[root] * sizeof(float);
                GPU_CHECK(cudaMemcpy2DAsync(d_recv[d] + off[root], (size_t)total * sizeof(float),
                                            scratch[d] + rows * off[root], w, w, (size_t)rows,
                                            cudaMemcpyDeviceToDevice, GPU_STREAM(s[d])));
            }
        }
    /* success falls through: the scratch is released after the copies that read it */
fail:
    if (in_group) (void)lib->group_end();
    for (int d = 0; d < c->n; d++)
        if (scratch[d]) {
            GPU_IGNORE(cudaSetDevice(c->devs[d]));
            (void)gpu_free_async(scratch[d], s[d], NULL);
        }
    return rc;
}

GPU_API int gpu_comm_all_gather_cols(gpu_comm *c, const float *const *d_send, float *const *d_recv,
                                     int64_t rows, const int64_t *cols, gpu_stream *const *s,
                                     forge_err *err)
{
    int rc, prev = -1;
    int64_t off[GPU_COMM_MAX_RANK + 1];
    if ((rc = check_ranks(c, d_send, d_recv, s, "gpu_comm_all_gather_cols", err))) return rc;
    if (!cols || rows < 0)
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_comm_all_gather_cols: %lld rows%s",
                           (long long)rows, cols ? "" : ", no column counts");
    off[0] = 0;
    for (int r = 0; r < c->n; r++) {
        if (cols[r] < 0 || cols[r] > INT64_MAX / 8 / GPU_COMM_MAX_RANK)
            return gpu_err_set(err, FORGE_E_INVALID,
                               "gpu_comm_all_gather_cols: rank %d gathers %lld columns", r,
                               (long long)cols[r]);
        off[r + 1] = off[r] + cols[r];
    }
    const int64_t total = off[c->n];
    if (rows == 0 || total == 0) return FORGE_OK;
    if (rows > INT64_MAX / 8 / total)
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_comm_all_gather_cols: %lld x %lld floats",
                           (long long)rows, (long long)total);
    GPU_CHECK(cudaGetDevice(&prev));
    if (c->via_nccl) {
        rc = gather_nccl(c, d_send, d_recv, rows, cols, off, s, err);
    } else { /* one rank: recv = send */
        GPU_CHECK(cudaSetDevice(c->devs[0]));
        GPU_CHECK(cudaMemcpyAsync(d_recv[0], d_send[0], (size_t)(rows * total) * sizeof(float),
                                  cudaMemcpyDeviceToDevice, GPU_STREAM(s[0])));
    }
    /* success falls through: the device is restored either way */
fail:
    if (prev >= 0) GPU_IGNORE(cudaSetDevice(prev));
    return rc;
}
