/* gpu_fattn.cu - causal prompt attention on the tensor cores (FlashAttention-2 style).
 *
 * One block per (tile of FA_BQ = 64 queries, query head); FA_WARPS = 4 warps, each owning 16
 * query rows. The block walks the cache in tiles of FA_BK = 64 positions, from position 0 up to
 * the last position its queries may see (tiles above the diagonal are never touched). Per tile:
 *   1. the block stages K and V (F32 or F16 cache) into shared memory as fp16, positions past
 *      the end of the cache as zeros (never read from memory);
 *   2. each warp computes S = Q K^T (16 x 64) with nvcuda::wmma 16x16x16 fp16 products and fp32
 *      accumulators, and stores S to its shared scratch;
 *   3. lane pair (2r, 2r+1) owns row r: scale, causal mask (position > pos0 + query index gives
 *      -inf), online softmax in fp32 in base 2 (running max m, sum l), P = 2^(s - m) stored as
 *      fp16 (l sums the rounded values, so the output is an exact convex combination of P V);
 *   4. the warp computes P V (16 x head_dim) into its scratch and the lanes fold it into their
 *      fp32 output registers: o = o * 2^(m_old - m_new) + P V.
 * At the end o / l is written through the scratch as whole rows. The wmma fragment layout is
 * opaque, so every per-row step goes through shared memory, where each lane's columns are
 * 8k + 4*(lane&1) + e, e < 4 (conflict-free 16-byte accesses with the +8 row padding).
 * Position 0 is visible to every query, so after the first tile every row's max is finite and
 * no -inf - -inf NaN can arise; rows of a partial last query tile read zeros and are not stored.
 *
 * Paged caches (gpu_attention_prompt_paged): position p of the sequence is read from cache row
 * table[p / block_size] * block_size + p % block_size instead of row p (fa_row); the tiles are
 * gathered row by row, everything else is the same.
 *
 * HIP: Debian's clang-15 has no rocWMMA, so the HIP build has only stubs that report
 * FORGE_E_UNSUPPORTED (callers fall back to gpu_attention_batch). */
#include <math.h>
#include <stdlib.h>

#include "gpu/gpu_common.cuh"
#include "gpu/gpu_ops.h"
#include "gpu/gpu_vendor.h"

#if !FORGE_GPU_HIP

#include <mma.h>

namespace wm = nvcuda::wmma;

#define FA_BQ 64 /* queries per block */
#define FA_BK 64 /* cache positions per tile */
#define FA_WARPS (FA_BQ / 16)
#define FA_THREADS (FA_WARPS * 32)
#define FA_LDS (FA_BK + 8) /* S scratch row stride (floats) */
#define FA_LDP (FA_BK + 8) /* P row stride (halfs) */

struct fa_args {
    const float *q;
    const void *k, *v;
    float *out;
    int64_t q_stride, out_stride, pos_stride, head_stride;
    int n_q, pos0, group;
    float scale_log2; /* scale * log2(e): the softmax runs in base 2 */
    float scale, softcap, inv_cap; /* softcap > 0: s = softcap tanh(scale q.k * inv_cap) */
    int window;                    /* > 0: a query at position p sees p - window + 1 .. p only */
    int q_vec, out_vec;
    const int32_t *table; /* paged: the sequence's block table (device), else NULL */
    int block_size;
};

/* The cache row of position p: p itself, or through the block table. */
GPU_DEV int64_t fa_row(const int32_t *tab, int bs, int p)
{
    return tab ? (int64_t)tab[p / bs] * bs + p % bs : (int64_t)p;
}

/* Shared memory: Q, K, V tiles (fp16, row stride HD + 8), then per warp a float scratch of 16
 * rows (S with stride FA_LDS, later P V with stride HD + 8) and the fp16 P of 16 rows. */
template <int HD> struct fa_geom {
    enum {
        LDK = HD + 8,
        LDO = HD + 8,
        QKV_HALFS = 3 * FA_BQ * LDK,
        SCR_FLOATS = 16 * LDO, /* >= 16 * FA_LDS since HD >= 64 */
        P_HALFS = 16 * FA_LDP,
        BYTES = QKV_HALFS * 2 + FA_WARPS * (SCR_FLOATS * 4 + P_HALFS * 2)
    };
};

/* One K or V tile (FA_BK positions from kv0) into dst as fp16; positions >= n_kv are zeros.
 * VEC: 16-byte loads (the caller checked alignment and strides). */
template <int HD, int KV_F16, int VEC>
GPU_DEVT void fa_load_tile(half *dst, const void *src, int kv0, int n_kv, int64_t pos_stride,
                           int64_t kv_off, const int32_t *tab, int bs)
{
    constexpr int LDK = fa_geom<HD>::LDK;
    if (VEC && KV_F16) {
        constexpr int CPR = HD / 8; /* 16-byte chunks per row */
        constexpr int IT = FA_BK * CPR / FA_THREADS;
        uint4 buf[IT];
#pragma unroll
        for (int it = 0; it < IT; it++) {
            const int i = (int)threadIdx.x + it * FA_THREADS, r = i / CPR, c = i % CPR;
            const int p = kv0 + r;
            buf[it] = make_uint4(0u, 0u, 0u, 0u);
            if (p < n_kv)
                buf[it] = *(const uint4 *)((const half *)src + fa_row(tab, bs, p) * pos_stride +
                                           kv_off + c * 8);
        }
#pragma unroll
        for (int it = 0; it < IT; it++) {
            const int i = (int)threadIdx.x + it * FA_THREADS, r = i / CPR, c = i % CPR;
            *(uint4 *)(dst + r * LDK + c * 8) = buf[it];
        }
    } else if (VEC) {
        constexpr int CPR = HD / 4; /* 4 floats per chunk */
        constexpr int IT = FA_BK * CPR / FA_THREADS;
        constexpr int NB = IT > 8 ? 8 : IT; /* chunks in flight: bounded, or registers spill */
#pragma unroll 1
        for (int it0 = 0; it0 < IT; it0 += NB) {
            float4 buf[NB];
#pragma unroll
            for (int b = 0; b < NB; b++) {
                const int i = (int)threadIdx.x + (it0 + b) * FA_THREADS, r = i / CPR, c = i % CPR;
                const int p = kv0 + r;
                buf[b] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                if (p < n_kv)
                    buf[b] = *(const float4 *)((const float *)src +
                                               fa_row(tab, bs, p) * pos_stride + kv_off + c * 4);
            }
#pragma unroll
            for (int b = 0; b < NB; b++) {
                const int i = (int)threadIdx.x + (it0 + b) * FA_THREADS, r = i / CPR, c = i % CPR;
                half2 lo = __floats2half2_rn(buf[b].x, buf[b].y);
                half2 hi = __floats2half2_rn(buf[b].z, buf[b].w);
                uint2 w;
                w.x = *(const unsigned *)&lo;
                w.y = *(const unsigned *)&hi;
                *(uint2 *)(dst + r * LDK + c * 4) = w;
            }
        }
    } else {
        for (int i = threadIdx.x; i < FA_BK * HD; i += FA_THREADS) {
            const int r = i / HD, d = i % HD, p = kv0 + r;
            half x = __float2half_rn(0.0f);
            if (p < n_kv) {
                const int64_t off = fa_row(tab, bs, p) * pos_stride + kv_off + d;
                x = KV_F16 ? ((const half *)src)[off] : __float2half_rn(((const float *)src)[off]);
            }
            dst[r * LDK + d] = x;
        }
    }
}

/* F16 cache with 16-byte alignment: the tile goes to shared memory by cp.async (sm_80+), so
 * the copy of V(t) runs under S = Q K^T and the copy of K(t+1) under P V. Positions >= n_kv
 * are zero-filled by the copy itself (source size 0, nothing read). */
GPU_DEV void fa_cp_async16(void *smem, const void *gmem, bool valid)
{
    const unsigned sa = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sa), "l"(gmem),
                 "r"(valid ? 16 : 0)
                 : "memory");
}
GPU_DEV void fa_cp_commit(void)
{
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N> GPU_DEVT void fa_cp_wait(void)
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

template <int HD>
GPU_DEVT void fa_issue_tile(half *dst, const void *src, int kv0, int n_kv, int64_t pos_stride,
                            int64_t kv_off, const int32_t *tab, int bs)
{
    constexpr int LDK = fa_geom<HD>::LDK, CPR = HD / 8, IT = FA_BK * CPR / FA_THREADS;
#pragma unroll
    for (int it = 0; it < IT; it++) {
        const int i = (int)threadIdx.x + it * FA_THREADS, r = i / CPR, c = i % CPR;
        const int p = kv0 + r;
        const half *g =
            (const half *)src + (p < n_kv ? fa_row(tab, bs, p) * pos_stride + kv_off + c * 8 : 0);
        fa_cp_async16(dst + r * LDK + c * 8, g, p < n_kv);
    }
    fa_cp_commit();
}

/* F32 cache with 16-byte alignment: the next tile is fetched into registers (float4) while the
 * tensor cores work, and converted to fp16 in shared memory afterwards. */
template <int HD> struct fa_f32_regs {
    float4 v[FA_BK * HD / 4 / FA_THREADS];
};

template <int HD>
GPU_DEVT void fa_fetch_f32(fa_f32_regs<HD> &t, const void *src, int kv0, int n_kv,
                           int64_t pos_stride, int64_t kv_off, const int32_t *tab, int bs)
{
    constexpr int CPR = HD / 4, IT = FA_BK * CPR / FA_THREADS;
#pragma unroll
    for (int it = 0; it < IT; it++) {
        const int i = (int)threadIdx.x + it * FA_THREADS, r = i / CPR, c = i % CPR;
        const int p = kv0 + r;
        t.v[it] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (p < n_kv)
            t.v[it] = *(const float4 *)((const float *)src + fa_row(tab, bs, p) * pos_stride +
                                        kv_off + c * 4);
    }
}

template <int HD> GPU_DEVT void fa_put_f32(half *dst, const fa_f32_regs<HD> &t)
{
    constexpr int LDK = fa_geom<HD>::LDK, CPR = HD / 4, IT = FA_BK * CPR / FA_THREADS;
#pragma unroll
    for (int it = 0; it < IT; it++) {
        const int i = (int)threadIdx.x + it * FA_THREADS, r = i / CPR, c = i % CPR;
        half2 lo = __floats2half2_rn(t.v[it].x, t.v[it].y);
        half2 hi = __floats2half2_rn(t.v[it].z, t.v[it].w);
        uint2 w;
        w.x = *(const unsigned *)&lo;
        w.y = *(const unsigned *)&hi;
        *(uint2 *)(dst + r * LDK + c * 4) = w;
    }
}

/* PIPE: how K/V reach shared memory. FA_PIPE_SYNC: staged loads between two barriers (any
 * cache); FA_PIPE_ASYNC (F16, VEC): cp.async, V(t) under S and K(t+1) under P V;
 * FA_PIPE_REGS (F32, VEC): the same overlap through registers. */
#define FA_PIPE_SYNC 0
#define FA_PIPE_ASYNC 1
#define FA_PIPE_REGS 2
template <int HD, int KV_F16, int VEC, int PIPE>
__global__ void __launch_bounds__(FA_THREADS, 2) k_fattn(const fa_args a)
{
    gpu_pdl_trigger();
    typedef fa_geom<HD> G;
    constexpr int LDK = G::LDK, LDO = G::LDO;
    extern __shared__ __align__(128) unsigned char fa_smem[];
    half *qs = (half *)fa_smem;
    half *ks = qs + FA_BQ * LDK;
    half *vs = ks + FA_BK * LDK;
    const int warp = (int)threadIdx.x / 32, lane = (int)threadIdx.x % 32;
    float *scr = (float *)(qs + G::QKV_HALFS) + warp * G::SCR_FLOATS;
    half *pw =
        (half *)((float *)(qs + G::QKV_HALFS) + FA_WARPS * G::SCR_FLOATS) + warp * G::P_HALFS;

    const int n_qt = (a.n_q + FA_BQ - 1) / FA_BQ;
    const int q0 = (n_qt - 1 - (int)blockIdx.x) * FA_BQ; /* the longest rows start first */
    const int h = blockIdx.y, kvh = h / a.group;
    const int q_end = min(q0 + FA_BQ, a.n_q);
    const int n_kv = a.pos0 + a.n_q; /* cache rows that exist */
    const int n_tiles = (a.pos0 + q_end - 1) / FA_BK + 1;
    const int64_t kv_off = (int64_t)kvh * a.head_stride;

    /* Q tile as fp16 (rows past n_q are zeros) */
    for (int i = threadIdx.x; i < FA_BQ * HD / 4; i += FA_THREADS) {
        const int r = i / (HD / 4), c = (i % (HD / 4)) * 4;
        float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (q0 + r < a.n_q) {
            const float *src = a.q + (int64_t)(q0 + r) * a.q_stride + (int64_t)h * HD + c;
            if (a.q_vec) {
                x = *(const float4 *)src;
            } else {
                x.x = src[0];
                x.y = src[1];
                x.z = src[2];
                x.w = src[3];
            }
        }
        *(half2 *)(qs + r * LDK + c) = __floats2half2_rn(x.x, x.y);
        *(half2 *)(qs + r * LDK + c + 2) = __floats2half2_rn(x.z, x.w);
    }

    /* this lane's row and column half */
    const int r = lane >> 1, hh = lane & 1;
    const int qi = q0 + warp * 16 + r;
    const int lim = a.pos0 + min(qi, a.n_q - 1); /* last visible position */
    /* first visible position (sliding window); the block starts at the tile of its first row's */
    const int lo = a.window > 0 ? lim + 1 - a.window : 0;
    const int t0 = a.window > 0 ? max(0, a.pos0 + q0 + 1 - a.window) / FA_BK : 0;
    float m = -INFINITY, l = 0.0f;
    float o[HD / 2]; /* column 8k + 4hh + e at o[4k + e] */
#pragma unroll
    for (int j = 0; j < HD / 2; j++)
        o[j] = 0.0f;

    fa_f32_regs<HD> pref; /* FA_PIPE_REGS: the tile in flight */
    if (PIPE == FA_PIPE_ASYNC)
        fa_issue_tile<HD>(ks, a.k, t0 * FA_BK, n_kv, a.pos_stride, kv_off, a.table,
                          a.block_size);
    if (PIPE == FA_PIPE_REGS) {
        fa_fetch_f32<HD>(pref, a.k, t0 * FA_BK, n_kv, a.pos_stride, kv_off, a.table,
                         a.block_size);
        fa_put_f32<HD>(ks, pref);
    }
    for (int t = t0; t < n_tiles; t++) {
        const int kv0 = t * FA_BK;
        if (PIPE == FA_PIPE_ASYNC) {
            fa_cp_wait<0>(); /* this thread's copies of K(t) */
            __syncthreads(); /* everyone's K(t); the previous P V no longer reads V */
            fa_issue_tile<HD>(vs, a.v, kv0, n_kv, a.pos_stride, kv_off, a.table, a.block_size);
        } else if (PIPE == FA_PIPE_REGS) {
            __syncthreads(); /* everyone's K(t) stored; the previous P V no longer reads V */
            fa_fetch_f32<HD>(pref, a.v, kv0, n_kv, a.pos_stride, kv_off, a.table,
                             a.block_size); /* lands under S */
        } else {
            __syncthreads(); /* the previous tile's K/V (and at t = 0 nothing) are no longer read */
            fa_load_tile<HD, KV_F16, VEC>(ks, a.k, kv0, n_kv, a.pos_stride, kv_off, a.table,
                                          a.block_size);
            fa_load_tile<HD, KV_F16, VEC>(vs, a.v, kv0, n_kv, a.pos_stride, kv_off, a.table,
                                          a.block_size);
            __syncthreads();
        }

        /* S = Q K^T for this warp's 16 rows */
        {
            wm::fragment<wm::accumulator, 16, 16, 16, float> sacc[FA_BK / 16];
#pragma unroll
            for (int n = 0; n < FA_BK / 16; n++)
                wm::fill_fragment(sacc[n], 0.0f);
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++) {
                wm::fragment<wm::matrix_a, 16, 16, 16, half, wm::row_major> qa;
                wm::load_matrix_sync(qa, qs + warp * 16 * LDK + kk * 16, LDK);
#pragma unroll
                for (int n = 0; n < FA_BK / 16; n++) {
                    wm::fragment<wm::matrix_b, 16, 16, 16, half, wm::col_major> kb;
                    wm::load_matrix_sync(kb, ks + n * 16 * LDK + kk * 16, LDK);
                    wm::mma_sync(sacc[n], qa, kb, sacc[n]);
                }
            }
#pragma unroll
            for (int n = 0; n < FA_BK / 16; n++)
                wm::store_matrix_sync(scr + n * 16, sacc[n], FA_LDS, wm::mem_row_major);
        }
        __syncwarp();

        /* online softmax of row r over this lane's 32 columns, merged with the partner lane */
        float alpha;
        {
            float sv[FA_BK / 2];
            float mx = -INFINITY;
#pragma unroll
            for (int k = 0; k < FA_BK / 8; k++) {
                const int c = 8 * k + 4 * hh;
                const float4 x = *(const float4 *)(scr + r * FA_LDS + c);
                const float xs[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    float sc = a.softcap > 0.0f
                                   ? tanhf(xs[e] * a.scale * a.inv_cap) * a.softcap *
                                         1.4426950408889634f
                                   : xs[e] * a.scale_log2;
                    if (kv0 + c + e > lim || kv0 + c + e < lo) sc = -INFINITY;
                    sv[4 * k + e] = sc;
                    mx = fmaxf(mx, sc);
                }
            }
            mx = fmaxf(mx, gpu_shfl_xor(mx, 1, 32));
            /* finite once a row has seen a visible position (without a window: tile 0, which
             * holds position 0); before that (a window) m stays -inf and P is 0 */
            const float m_new = fmaxf(m, mx);
            const float m_use = m_new == -INFINITY ? 0.0f : m_new;
            alpha = exp2f(m - m_use);
            float rs = 0.0f;
#pragma unroll
            for (int k = 0; k < FA_BK / 8; k++) {
                const half2 p01 =
                    __floats2half2_rn(exp2f(sv[4 * k] - m_use), exp2f(sv[4 * k + 1] - m_use));
                const half2 p23 =
                    __floats2half2_rn(exp2f(sv[4 * k + 2] - m_use), exp2f(sv[4 * k + 3] - m_use));
                rs +=
                    (__low2float(p01) + __high2float(p01)) + (__low2float(p23) + __high2float(p23));
                uint2 w;
                w.x = *(const unsigned *)&p01;
                w.y = *(const unsigned *)&p23;
                *(uint2 *)(pw + r * FA_LDP + 8 * k + 4 * hh) = w;
            }
            rs += gpu_shfl_xor(rs, 1, 32);
            l = l * alpha + rs;
            m = m_new;
        }
        __syncwarp(); /* P written; S (the scratch) no longer read */
        if (PIPE == FA_PIPE_ASYNC) {
            __syncthreads(); /* no warp reads K(t) any more */
            if (t + 1 < n_tiles) {
                fa_issue_tile<HD>(ks, a.k, kv0 + FA_BK, n_kv, a.pos_stride, kv_off, a.table,
                                  a.block_size);
                fa_cp_wait<1>(); /* V(t) landed; K(t+1) may still fly */
            } else {
                fa_cp_wait<0>();
            }
            __syncthreads(); /* everyone's V(t) */
        } else if (PIPE == FA_PIPE_REGS) {
            fa_put_f32<HD>(vs, pref);
            __syncthreads(); /* everyone's V(t); no warp reads K(t) any more */
            if (t + 1 < n_tiles)
                fa_fetch_f32<HD>(pref, a.k, kv0 + FA_BK, n_kv, a.pos_stride, kv_off, a.table,
                                 a.block_size);
        }

        /* P V for this warp's 16 rows into the scratch */
        {
            wm::fragment<wm::matrix_a, 16, 16, 16, half, wm::row_major> pa[FA_BK / 16];
#pragma unroll
            for (int k = 0; k < FA_BK / 16; k++)
                wm::load_matrix_sync(pa[k], pw + k * 16, FA_LDP);
#pragma unroll
            for (int j = 0; j < HD / 16; j++) {
                wm::fragment<wm::accumulator, 16, 16, 16, float> oacc;
                wm::fill_fragment(oacc, 0.0f);
#pragma unroll
                for (int k = 0; k < FA_BK / 16; k++) {
                    wm::fragment<wm::matrix_b, 16, 16, 16, half, wm::row_major> vb;
                    wm::load_matrix_sync(vb, vs + k * 16 * LDK + j * 16, LDK);
                    wm::mma_sync(oacc, pa[k], vb, oacc);
                }
                wm::store_matrix_sync(scr + j * 16, oacc, LDO, wm::mem_row_major);
            }
        }
        __syncwarp();
#pragma unroll
        for (int k = 0; k < HD / 8; k++) {
            const float4 x = *(const float4 *)(scr + r * LDO + 8 * k + 4 * hh);
            o[4 * k] = o[4 * k] * alpha + x.x;
            o[4 * k + 1] = o[4 * k + 1] * alpha + x.y;
            o[4 * k + 2] = o[4 * k + 2] * alpha + x.z;
            o[4 * k + 3] = o[4 * k + 3] * alpha + x.w;
        }
        /* K(t+1) into shared memory: every warp finished S of tile t before the barrier above,
         * and the next iteration's barrier publishes it */
        if (PIPE == FA_PIPE_REGS && t + 1 < n_tiles) fa_put_f32<HD>(ks, pref);
    }

    /* normalise, then write whole rows through the scratch (each lane rewrites only the slots
     * it read last, so one barrier before the row-wise reads suffices) */
    const float inv = 1.0f / l; /* l >= 1: the row max contributes 2^0 */
#pragma unroll
    for (int k = 0; k < HD / 8; k++)
        *(float4 *)(scr + r * LDO + 8 * k + 4 * hh) =
            make_float4(o[4 * k] * inv, o[4 * k + 1] * inv, o[4 * k + 2] * inv, o[4 * k + 3] * inv);
    __syncwarp();
    for (int i = lane; i < 16 * HD / 4; i += 32) {
        const int rr = i / (HD / 4), c = (i % (HD / 4)) * 4;
        const int row = q0 + warp * 16 + rr;
        if (row < a.n_q) {
            const float4 x = *(const float4 *)(scr + rr * LDO + c);
            float *dst = a.out + (int64_t)row * a.out_stride + (int64_t)h * HD + c;
            if (a.out_vec) {
                *(float4 *)dst = x;
            } else {
                dst[0] = x.x;
                dst[1] = x.y;
                dst[2] = x.z;
                dst[3] = x.w;
            }
        }
    }
}

template <int HD, int KV_F16, int VEC, int PIPE>
static int fa_launch(const fa_args &a, dim3 grid, cudaStream_t st, forge_err *err)
{
    int rc = FORGE_OK;
    const int shmem = fa_geom<HD>::BYTES;
    /* > 48 KB of dynamic shared memory must be allowed explicitly (cheap; not a stream op) */
    GPU_CHECK(cudaFuncSetAttribute(k_fattn<HD, KV_F16, VEC, PIPE>,
                                   cudaFuncAttributeMaxDynamicSharedMemorySize, shmem));
    k_fattn<HD, KV_F16, VEC, PIPE><<<grid, FA_THREADS, (size_t)shmem, st>>>(a);
    GPU_LAUNCH_CHECK(PIPE == FA_PIPE_ASYNC  ? "k_fattn<F16,cp.async>"
                     : PIPE == FA_PIPE_REGS ? "k_fattn<F32,prefetch>"
                     : KV_F16               ? "k_fattn<F16>"
                                            : "k_fattn<F32>",
                     st);
    return FORGE_OK;
fail:
    return rc;
}

/* FORGE_GPU_FATTN_SYNC=1 turns the overlapped loads (cp.async for F16, register prefetch for
 * F32) off in favour of the plain staged loads: a switch for diagnosis, read once. */
static int fa_pipe_enabled(void)
{
    static volatile int cached = -1; /* benign race: every thread computes the same value */
    if (cached < 0) {
        const char *v = getenv("FORGE_GPU_FATTN_SYNC");
        cached = (v && v[0] == '1') ? 0 : 1;
    }
    return cached;
}

template <int HD>
static int fa_launch_hd(const fa_args &a, int f16, int vec, dim3 grid, cudaStream_t st,
                        forge_err *err)
{
    const int pipe = vec && fa_pipe_enabled();
    if (f16) {
        if (pipe) return fa_launch<HD, 1, 1, FA_PIPE_ASYNC>(a, grid, st, err);
        return vec ? fa_launch<HD, 1, 1, FA_PIPE_SYNC>(a, grid, st, err)
                   : fa_launch<HD, 1, 0, FA_PIPE_SYNC>(a, grid, st, err);
    }
    if (pipe) return fa_launch<HD, 0, 1, FA_PIPE_REGS>(a, grid, st, err);
    return vec ? fa_launch<HD, 0, 1, FA_PIPE_SYNC>(a, grid, st, err)
               : fa_launch<HD, 0, 0, FA_PIPE_SYNC>(a, grid, st, err);
}

/* Also: the kernel's tiles must fit the shared memory one block of this device may have
 * (sm_86/89 opt in to ~99 KB, not the 227 KB of sm_90); if not, the backend falls back to
 * gpu_attention_batch. */
GPU_API int gpu_attention_prompt_supported(int64_t head_dim, int kv_type)
{
    const size_t need = head_dim == 64 ? (size_t)fa_geom<64>::BYTES : (size_t)fa_geom<128>::BYTES;
    return (head_dim == 64 || head_dim == 128) &&
           (kv_type == GGML_TYPE_F32 || kv_type == GGML_TYPE_F16) && need <= gpu_smem_limit();
}

static int fa_prompt(const gpu_attn_args *p, int64_t n_q, int64_t pos0, int64_t q_stride,
                     int64_t out_stride, const int32_t *d_table, int64_t block_size, gpu_stream *s,
                     forge_err *err)
{
    cudaStream_t st = GPU_STREAM(s);
    fa_args a;
    int f16, vec;
    if (!p || !p->d_q || !p->d_k || !p->d_v || !p->d_out)
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_attention_prompt: NULL buffer");
    if (!gpu_attention_prompt_supported(p->head_dim, p->kv_type))
        return gpu_err_set(err, FORGE_E_UNSUPPORTED,
                           "gpu_attention_prompt: head_dim %lld with a %s cache (head_dim 64 or "
                           "128 with F32 or F16 only; use gpu_attention_batch)",
                           (long long)p->head_dim, gpu_type_name(p->kv_type));
    if (p->n_head <= 0 || p->n_kv_head <= 0 || p->n_head % p->n_kv_head || p->n_head > 65535 ||
        n_q < 1 || pos0 < 0 || pos0 + n_q > INT32_MAX - 2 * FA_BK || q_stride < 0 ||
        out_stride < 0 || p->pos_stride < 0 || p->head_stride < 0)
        return gpu_err_set(err, FORGE_E_INVALID,
                           "gpu_attention_prompt: bad shape (n_head %lld, n_kv_head %lld, n_q "
                           "%lld, pos0 %lld, strides q %lld out %lld pos %lld head %lld)",
                           (long long)p->n_head, (long long)p->n_kv_head, (long long)n_q,
                           (long long)pos0, (long long)q_stride, (long long)out_stride,
                           (long long)p->pos_stride, (long long)p->head_stride);
    f16 = p->kv_type == GGML_TYPE_F16;
    a.q = p->d_q;
    a.k = p->d_k;
    a.v = p->d_v;
    a.out = p->d_out;
    a.q_stride = q_stride;
    a.out_stride = out_stride;
    a.pos_stride = p->pos_stride;
    a.head_stride = p->head_stride;
    a.n_q = (int)n_q;
    a.pos0 = (int)pos0;
    a.group = (int)(p->n_head / p->n_kv_head);
    a.scale_log2 = p->scale * 1.4426950408889634f;
    a.scale = p->scale;
    a.softcap = p->softcap > 0.0f ? p->softcap : 0.0f;
    a.inv_cap = p->softcap > 0.0f ? 1.0f / p->softcap : 0.0f;
    a.window = p->window > 0 ? p->window : 0;
    a.q_vec = gpu_is_aligned(p->d_q, 16) && q_stride % 4 == 0;
    a.out_vec = gpu_is_aligned(p->d_out, 16) && out_stride % 4 == 0;
    a.table = d_table;
    a.block_size = (int)block_size;
    {
        const int64_t epc = f16 ? 8 : 4; /* elements per 16-byte chunk */
        vec = gpu_is_aligned(p->d_k, 16) && gpu_is_aligned(p->d_v, 16) &&
              p->pos_stride % epc == 0 && p->head_stride % epc == 0;
    }
    {
        dim3 grid((unsigned)((n_q + FA_BQ - 1) / FA_BQ), (unsigned)p->n_head, 1);
        if (p->head_dim == 64) return fa_launch_hd<64>(a, f16, vec, grid, st, err);
        return fa_launch_hd<128>(a, f16, vec, grid, st, err);
    }
}

GPU_API int gpu_attention_prompt(const gpu_attn_args *p, int64_t n_q, int64_t pos0,
                                 int64_t q_stride, int64_t out_stride, gpu_stream *s,
                                 forge_err *err)
{
    return fa_prompt(p, n_q, pos0, q_stride, out_stride, NULL, 1, s, err);
}

GPU_API int gpu_attention_prompt_paged(const gpu_attn_args *p, int64_t n_q, int64_t pos0,
                                       int64_t q_stride, int64_t out_stride,
                                       const int32_t *d_table, int64_t block_size, gpu_stream *s,
                                       forge_err *err)
{
    if (!d_table || block_size < 1 || block_size > INT32_MAX)
        return gpu_err_set(err, FORGE_E_INVALID,
                           "gpu_attention_prompt_paged: no table or blocks of %lld",
                           (long long)block_size);
    return fa_prompt(p, n_q, pos0, q_stride, out_stride, d_table, block_size, s, err);
}

#else /* HIP: no rocWMMA in Debian's toolchain */

GPU_API int gpu_attention_prompt_supported(int64_t head_dim, int kv_type)
{
    (void)head_dim;
    (void)kv_type;
    return 0;
}

GPU_API int gpu_attention_prompt(const gpu_attn_args *p, int64_t n_q, int64_t pos0,
                                 int64_t q_stride, int64_t out_stride, gpu_stream *s,
                                 forge_err *err)
{
    return gpu_err_set(err, FORGE_E_UNSUPPORTED,
                       "gpu_attention_prompt: the tensor-core prompt attention is not available "
                       "in this %s build (no rocWMMA); use gpu_attention_batch",
                       gpu_backend_name());
}

GPU_API int gpu_attention_prompt_paged(const gpu_attn_args *p, int64_t n_q, int64_t pos0,
                                       int64_t q_stride, int64_t out_stride,
                                       const int32_t *d_table, int64_t block_size, gpu_stream *s,
                                       forge_err *err)
{
    return gpu_attention_prompt(p, n_q, pos0, q_stride, out_stride, s, err);
}

#endif
