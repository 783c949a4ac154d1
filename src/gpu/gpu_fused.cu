/* gpu_fused.cu - the fused decode matvec (gpu_fused_matvec in gpu_ops.h): up to three matrices
 * that share one input row in one launch, with the RMSNorm and the Q8_0 quantization of the
 * input done by every thread block in its prologue and the residual add, bias or SwiGLU done in
 * the epilogue, so a decode layer needs four of these launches instead of fourteen small kernels.
 *
 * A block of FM_THREADS threads = FM_SEGS 32-lane segments. A segment computes a unit of R rows
 * (R = 2: two rows share every activation load; SwiGLU pairs gate row r with up row r), SPR
 * segments may share one unit (few, long rows: more loads in flight), their sums meet in shared
 * memory. Order of work in a block:
 *   1. the first FM_UNROLL 16-byte weight chunks of each row are loaded (weights never change,
 *      so this may overlap the previous kernel: programmatic dependent launch);
 *   2. gpu_pdl_wait(), then the prologue: x from global memory (L2), the sum of squares for the
 *      RMSNorm (a fixed reduction order, so every block gets the same scale), h = x * scale *
 *      norm, and h stored in shared memory: Q8_0 blocks for Q8_0/Q4_0 weights (exactly
 *      gpu_act_quantize's rounding), floats otherwise, in planes laid out so that each lane's
 *      16-byte shared loads are free of bank conflicts;
 *   3. the dot products as in gpu_matvec.cu (dp4a per block for Q types, fp32 FMA otherwise),
 *      a shuffle reduction, the epilogue.
 * Numerics equal gpu_rmsnorm + gpu_act_quantize + gpu_matvec (+ gpu_add / gpu_swiglu / bias) up
 * to the order of float sums. */
#include "gpu/gpu_ops.h"
#include <stdlib.h>
#include <string.h>

#include "gpu/gpu_common.cuh"
#include "gpu/gpu_dot.cuh"
#include "gpu/gpu_invariant.cuh"
#include "gpu/gpu_quant.cuh"
#include "gpu/gpu_vendor.h"

#define FM_THREADS 256
#define FM_SEGS (FM_THREADS / GPU_SEG)
#define FM_UNROLL 4
#ifndef FM_GQ_INFL1
#define FM_GQ_INFL1 96
#endif
#ifndef FM_GQ_INFL2
#define FM_GQ_INFL2 96
#endif
static_assert(FM_THREADS == GPU_RMS_THREADS, "the prologue's RMSNorm is gpu_rmsnorm's");
#define QK 32

enum { FM_STORE = GPU_FMV_OUT_STORE, FM_ADD = GPU_FMV_OUT_ADD, FM_SWIGLU = GPU_FMV_OUT_SWIGLU };

struct fm_args {
    const uint8_t *w[GPU_FMV_MAX_MATS];
    const unsigned short *sc[GPU_FMV_MAX_MATS];
    const float *bias[GPU_FMV_MAX_MATS];
    float *y[GPU_FMV_MAX_MATS];
    int row0[GPU_FMV_MAX_MATS + 1]; /* matrix m holds global rows [row0[m], row0[m+1]) */
    int n_mat, n_units, n_in, n_chunks;
    size_t row_bytes;
    const float *x, *norm;
    float eps;
    int rmsnorm, round_x;
};

/* The block types of gpu_quant.cuh (Q4_1 .. Q6_K, IQ4_*, TQ*): k_fused_gq below. */
static bool fm_is_gq(int t)
{
    return gq_geom_of(t).qk != 0;
}

static bool fm_is_quant(int t)
{
    return t == GGML_TYPE_Q8_0 || t == GGML_TYPE_Q4_0 || fm_is_gq(t);
}

/* Bytes of one row as stored (the quants plane for Q types); 0 when the fused kernel cannot
 * take this row length. */
static size_t fm_row_bytes(int t, int64_t n_in)
{
    switch (t) {
    case GGML_TYPE_F32:
        return n_in % 4 ? 0 : (size_t)n_in * 4;
    case GGML_TYPE_F16:
    case GGML_TYPE_BF16:
        return n_in % 8 ? 0 : (size_t)n_in * 2;
    case GGML_TYPE_Q8_0:
        return n_in % QK ? 0 : (size_t)n_in;
    case GGML_TYPE_Q4_0:
        return n_in % QK ? 0 : (size_t)n_in / 2;
    default: {
        const gq_geom g = gq_geom_of(t); /* the body plane's row */
        return g.qk == 0 || n_in % g.qk ? 0 : (size_t)(n_in / g.qk) * (size_t)g.body;
    }
    }
}

/* Shared memory of the prologue's h: Q types int8 quants + per-block float d (+ int sums for
 * Q4_0); float types n_in floats. */
static size_t fm_smem_bytes(int t, int64_t n_in)
{
    if (fm_is_quant(t)) return (size_t)n_in + (size_t)(n_in / QK) * 8;
    return (size_t)n_in * 4;
}

/* The row's h must fit the shared memory one block of this device may have (gpu_smem_limit):
 * longer rows are not supported here, and the backend runs the plain norm/quantize + matvec. */
GPU_API int gpu_fused_matvec_supported(int wtype, int64_t n_in)
{
    return n_in > 0 && n_in <= INT32_MAX / 4 && fm_row_bytes(wtype, n_in) != 0 &&
           fm_smem_bytes(wtype, n_in) <= gpu_smem_limit();
}

/* ---- shared-memory layout of h ----------------------------------------------------------------
 * Q4_0: lo[nb] (bytes 0..15 of each Q8_0 block), hi[nb] (bytes 16..31), d[nb] float, s[nb] int
 * Q8_0: q[n_in] int8 (chunk c = bytes 16c..16c+15), d[nb] float
 * F16/BF16: a[n_in/8] float4 (elements 8c..8c+3), b[n_in/8] float4 (8c+4..8c+7)
 * F32: x[n_in/4] float4
 * (nb = n_in / 32.) */
template <int WT> struct fm_x;

template <> struct fm_x<GGML_TYPE_Q4_0> {
    struct v_t {
        int4 lo, hi;
        float d;
        int s;
    };
    static GPU_DEVT v_t get(const uint4 *sm, int nb, int c)
    {
        const int4 *p = (const int4 *)sm;
        const float *d = (const float *)(p + 2 * nb);
        return {p[c], p[nb + c], d[c], ((const int *)(d + nb))[c]};
    }
    static GPU_DEVT float dot(const v_t &x, uint4 w, float dw)
    {
        const int s = gpu_dot_q4x32(w, x.lo, x.hi);
        return (float)(s - 8 * x.s) * (dw * x.d);
    }
    /* 8 lanes hold one Q8_0 block (4 quants each, packed): store them. */
    static GPU_DEVT void put(uint4 *sm, int nb, int b, int k, int packed, float d, int sum)
    {
        int *p = (int *)sm;
        p[(k < 4 ? b : nb + b) * 4 + (k & 3)] = packed;
        if (k == 0) {
            float *dd = (float *)((int4 *)sm + 2 * nb);
            dd[b] = d;
            ((int *)(dd + nb))[b] = sum;
        }
    }
};

template <> struct fm_x<GGML_TYPE_Q8_0> {
    struct v_t {
        int4 q;
        float d;
    };
    static GPU_DEVT v_t get(const uint4 *sm, int nb, int c)
    {
        const int4 *p = (const int4 *)sm;
        const float *d = (const float *)(p + 2 * nb);
        return {p[c], d[c >> 1]};
    }
    static GPU_DEVT float dot(const v_t &x, uint4 w, float dw)
    {
        const int s = gpu_dot_q8x16(w, x.q);
        return (float)s * (dw * x.d);
    }
    static GPU_DEVT void put(uint4 *sm, int nb, int b, int k, int packed, float d, int sum)
    {
        ((int *)sm)[b * 8 + k] = packed;
        if (k == 0) ((float *)((int4 *)sm + 2 * nb))[b] = d;
    }
};

/* F16 and BF16 share the float planes. */
template <int WT> struct fm_xh {
    struct v_t {
        float4 a, b;
    };
    static GPU_DEVT v_t get(const uint4 *sm, int n8, int c)
    {
        const float4 *p = (const float4 *)sm;
        return {p[c], p[n8 + c]};
    }
    static GPU_DEVT float dot(const v_t &x, uint4 w, float dw)
    {
        return WT == GGML_TYPE_F16 ? gpu_dot_f16x8(w, x.a, x.b) : gpu_dot_bf16x8(w, x.a, x.b);
    }
    /* elements 4j..4j+3 of h */
    static GPU_DEVT void put4(uint4 *sm, int n8, int j, float4 v)
    {
        ((float4 *)sm)[(j & 1) * n8 + (j >> 1)] = v;
    }
};
template <> struct fm_x<GGML_TYPE_F16> : fm_xh<GGML_TYPE_F16> {};
template <> struct fm_x<GGML_TYPE_BF16> : fm_xh<GGML_TYPE_BF16> {};

template <> struct fm_x<GGML_TYPE_F32> {
    struct v_t {
        float4 a;
    };
    static GPU_DEVT v_t get(const uint4 *sm, int n8, int c)
    {
        return {((const float4 *)sm)[c]};
    }
    static GPU_DEVT float dot(const v_t &x, uint4 w, float dw)
    {
        return gpu_dot_f32x4(w, x.a);
    }
    static GPU_DEVT void put4(uint4 *sm, int n8, int j, float4 v)
    {
        ((float4 *)sm)[j] = v;
    }
};

/* The chunk's block scale index (Q types), or the plane length argument of get(). */
template <int WT> GPU_DEVT int fm_scale_index(int c)
{
    return WT == GGML_TYPE_Q8_0 ? c >> 1 : c;
}
template <int WT> GPU_DEVT int fm_get_arg(int n_in)
{
    return WT == GGML_TYPE_Q8_0 || WT == GGML_TYPE_Q4_0 ? n_in / QK : n_in / 8;
}

/* h = x (* rms scale * norm) into shared memory, in WT's layout. */
template <int WT> GPU_DEVT void fm_prologue(const fm_args &a, uint4 *sm, float *red)
{
    const float4 *x4 = (const float4 *)a.x;
    const float4 *n4 = (const float4 *)a.norm;
    const int n4s = a.n_in / 4;
    const float scale = a.rmsnorm ? gpu_rms_scale(x4, a.n_in, a.eps, red) : 1.0f;
    if constexpr (WT == GGML_TYPE_Q8_0 || WT == GGML_TYPE_Q4_0) {
        /* 8 lanes per Q8_0 block, 4 elements each */
        const int nb = a.n_in / QK, k = threadIdx.x % 8;
        for (int base = 0; base < nb; base += FM_THREADS / 8) {
            /* the same trip count for every lane (the shuffles need the whole segment): blocks
             * past the end compute zeros and store nothing */
            const int b = base + (int)threadIdx.x / 8;
            const bool ok = b < nb;
            float4 v = ok ? x4[b * 8 + k] : make_float4(0.f, 0.f, 0.f, 0.f);
            if (a.rmsnorm && ok) v = gpu_rms_apply(v, scale, n4[b * 8 + k]);
            float d;
            int sum;
            const int packed = gpu_q8_block8(v, &d, &sum);
            if (ok)
                fm_x<WT>::put(sm, nb, b, k, packed, d, sum);
        }
    } else {
        for (int i = threadIdx.x; i < n4s; i += FM_THREADS) {
            float4 v = x4[i];
            if (a.rmsnorm) v = gpu_rms_apply(v, scale, n4[i]);
            if (WT == GGML_TYPE_F16 && a.round_x) {
                v.x = gpu_fp16_to_f32(gpu_f32_to_fp16(v.x));
                v.y = gpu_fp16_to_f32(gpu_f32_to_fp16(v.y));
                v.z = gpu_fp16_to_f32(gpu_f32_to_fp16(v.z));
                v.w = gpu_fp16_to_f32(gpu_f32_to_fp16(v.w));
            } else if (WT == GGML_TYPE_BF16 && a.round_x) {
                v.x = gpu_bf16_round(v.x);
                v.y = gpu_bf16_round(v.y);
                v.z = gpu_bf16_round(v.z);
                v.w = gpu_bf16_round(v.w);
            }
            fm_x<WT>::put4(sm, a.n_in / 8, i, v);
        }
    }
}

/* Row j of unit u: its matrix and local row; false past the end. */
template <int OUT, int R>
GPU_DEVT bool fm_row(const fm_args &a, int u, int j, int *m, int *r)
{
    if (u >= a.n_units) return false;
    if (OUT == FM_SWIGLU) {
        *m = j;
        *r = u;
        return true;
    }
    const int g = u * R + j;
    if (g >= a.row0[a.n_mat]) return false;
    int mm = 0;
    while (mm + 1 < a.n_mat && g >= a.row0[mm + 1])
        mm++;
    *m = mm;
    *r = g - a.row0[mm];
    return true;
}

/* The rows of unit u: pointers, and whether each row exists. */
template <int WT, int OUT, int R>
GPU_DEVT void fm_unit(const fm_args &a, int u, const uint4 **wrow, const unsigned short **srow,
                      bool *valid, int *mat, int *row)
{
    const bool quant = WT == GGML_TYPE_Q8_0 || WT == GGML_TYPE_Q4_0;
#pragma unroll
    for (int j = 0; j < R; j++) {
        valid[j] = fm_row<OUT, R>(a, u, j, &mat[j], &row[j]);
        if (!valid[j]) {
            mat[j] = 0;
            row[j] = 0;
        }
        wrow[j] = (const uint4 *)(a.w[mat[j]] + (size_t)row[j] * a.row_bytes);
        srow[j] = quant ? a.sc[mat[j]] + (size_t)row[j] * (a.n_in / QK) : NULL;
    }
}

/* A grid of at most one wave of blocks (the launcher sizes it from the occupancy), each block
 * walking units u0, u0 + stride, ...: the prologue (x, norm, quantization) runs once per block,
 * not once per unit. */
template <int WT, int OUT, int R, int SPR>
__global__ void __launch_bounds__(FM_THREADS) k_fused_matvec(const fm_args a)
{
    extern __shared__ uint4 fm_smem[];
    __shared__ float red[FM_SEGS];
    __shared__ float part[FM_SEGS][R];
    const bool quant = WT == GGML_TYPE_Q8_0 || WT == GGML_TYPE_Q4_0;
    const int lane = threadIdx.x % GPU_SEG, seg = threadIdx.x / GPU_SEG, sub = seg % SPR;
    const int step = GPU_SEG * SPR;
    const int per_block = FM_SEGS / SPR, stride = gridDim.x * per_block;
    gpu_pdl_trigger();

    const uint4 *wrow[R];
    const unsigned short *srow[R];
    bool valid[R];
    int mat[R], row[R];
    int base = blockIdx.x * per_block; /* the block's first unit this round (uniform) */
    fm_unit<WT, OUT, R>(a, base + seg / SPR, wrow, srow, valid, mat, row);

    uint4 w[R][FM_UNROLL];
    unsigned short d[R][FM_UNROLL];
    int c0 = sub * GPU_SEG + lane;
#define FM_LOAD_GROUP()                                                                            \
    do {                                                                                           \
        _Pragma("unroll") for (int j = 0; j < R; j++)                                              \
        {                                                                                          \
            _Pragma("unroll") for (int k = 0; k < FM_UNROLL; k++)                                  \
            {                                                                                      \
                const int c = c0 + k * step;                                                       \
                if (valid[j] && c < a.n_chunks) {                                                  \
                    w[j][k] = gpu_ld_stream16(wrow[j] + c);                                        \
                    d[j][k] = quant ? srow[j][fm_scale_index<WT>(c)] : 0;                          \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
    } while (0)
    /* 1. the first chunks of the first unit, before waiting for the previous kernel */
    FM_LOAD_GROUP();

    /* 2. the input, once the kernels before have finished writing it */
    gpu_pdl_wait();
    fm_prologue<WT>(a, fm_smem, red);
    __syncthreads();

    /* 3. dot products, unit after unit */
    const int garg = fm_get_arg<WT>(a.n_in);
    for (;;) {
        float acc[R];
#pragma unroll
        for (int j = 0; j < R; j++)
            acc[j] = 0.0f;
        for (;;) {
#pragma unroll
            for (int k = 0; k < FM_UNROLL; k++) {
                const int c = c0 + k * step;
                if (c < a.n_chunks) {
                    const typename fm_x<WT>::v_t xv = fm_x<WT>::get(fm_smem, garg, c);
#pragma unroll
                    for (int j = 0; j < R; j++)
                        if (valid[j])
                            acc[j] += fm_x<WT>::dot(xv, w[j][k],
                                                    quant ? gpu_fp16_to_f32(d[j][k]) : 0.f);
                }
            }
            c0 += step * FM_UNROLL;
            if (c0 - lane - sub * GPU_SEG >= a.n_chunks) break; /* uniform over the segment */
            FM_LOAD_GROUP();
        }
#pragma unroll
        for (int j = 0; j < R; j++)
            acc[j] = gpu_seg_sum(acc[j]);
        if (SPR > 1) {
            if (lane == 0) {
#pragma unroll
                for (int j = 0; j < R; j++)
                    part[seg][j] = acc[j];
            }
            __syncthreads();
            if (sub == 0) {
#pragma unroll
                for (int j = 0; j < R; j++) {
                    float t = 0.0f;
#pragma unroll
                    for (int i = 0; i < SPR; i++)
                        t += part[seg + i][j];
                    acc[j] = t;
                }
            }
            __syncthreads(); /* part is reused by the next unit */
        }
        if (sub == 0 && lane == 0) {
            if constexpr (OUT == FM_SWIGLU) {
                if (valid[0]) {
                    a.y[0][row[0]] = gpu_swiglu1(acc[0], acc[R - 1]);
                }
            } else {
#pragma unroll
                for (int j = 0; j < R; j++) {
                    if (!valid[j]) continue;
                    float *y = a.y[mat[j]] + row[j];
                    if (OUT == FM_ADD)
                        *y += acc[j];
                    else
                        *y = a.bias[mat[j]] ? acc[j] + a.bias[mat[j]][row[j]] : acc[j];
                }
            }
        }
        base += stride;
        if (base >= a.n_units) break; /* uniform over the block */
        fm_unit<WT, OUT, R>(a, base + seg / SPR, wrow, srow, valid, mat, row);
        c0 = sub * GPU_SEG + lane;
        FM_LOAD_GROUP();
    }
#undef FM_LOAD_GROUP
}

/* The same for the types of gpu_quant.cuh: h in Q4_0's shared layout (Q8_0 blocks split in
 * elements 0..15 / 16..31, scales, sums: exactly what gq_dot takes). Each lane walks its row in
 * groups of sub-blocks (gq_walk<T, G>: with G, the sub-blocks that share bytes are fetched once,
 * e.g. a Q4_K pair from one 32-byte piece, a Q6_K four from 112 bytes; else one at a time), U
 * groups in flight; the first unit's first groups are fetched before gpu_pdl_wait (weights never
 * change), as k_fused_matvec does. The epilogue of k_fused_matvec. sc[m] points at matrix m's
 * head plane. At most 64 registers (4 blocks per multiprocessor), as k_gq_matvec: U is chosen so
 * that the fetched bytes of all rows stay within 96 bytes per lane. */
/* Grouped fetches unless R rows of them would not fit the register budget (Q5_K, Q6_K with two
 * rows). */
template <int T, int R> struct fm_gq_group {
    enum { OK = R * sizeof(typename gq_grp<T>::raw) <= 128 };
};
template <int T, bool G, int R> struct fm_gq_cfg {
    typedef typename gq_walk<T, G>::type W;
    enum {
        RAW = R * (int)sizeof(typename W::raw),
        INFL = R == 1 ? FM_GQ_INFL1 : FM_GQ_INFL2,
        U = INFL / RAW > 1 ? INFL / RAW : 1
    };
};

template <int T, int OUT, int R, int SPR, bool G>
__global__ void __launch_bounds__(FM_THREADS, 4) k_fused_gq(const fm_args a)
{
    extern __shared__ uint4 fm_smem[];
    __shared__ float red[FM_SEGS];
    __shared__ float part[FM_SEGS][R];
    typedef typename fm_gq_cfg<T, G, R>::W W;
    constexpr int BODY = gq<T>::BODY, HEAD = gq<T>::BLOCK - gq<T>::BODY;
    constexpr int GS = W::GROUP, GPB = gq<T>::ELEMS / 32 / GS; /* groups per block */
    constexpr int U = fm_gq_cfg<T, G, R>::U;
    const int lane = threadIdx.x % GPU_SEG, seg = threadIdx.x / GPU_SEG, sub = seg % SPR;
    const int step = GPU_SEG * SPR;
    const int per_block = FM_SEGS / SPR, stride = gridDim.x * per_block;
    const int nsb = a.n_in / 32, ng = nsb / GS, nbk = a.n_in / gq<T>::ELEMS;
    gpu_pdl_trigger();

    const uint8_t *brow[R], *hrow[R];
    bool valid[R];
    int mat[R], row[R];
    typename W::raw w[R][U];
    int base = blockIdx.x * per_block; /* the block's first unit this round (uniform) */
    int g0 = sub * GPU_SEG + lane;
#define FM_GQ_UNIT()                                                                               \
    do {                                                                                           \
        _Pragma("unroll") for (int j = 0; j < R; j++)                                              \
        {                                                                                          \
            valid[j] = fm_row<OUT, R>(a, base + seg / SPR, j, &mat[j], &row[j]);                   \
            if (!valid[j]) {                                                                       \
                mat[j] = 0;                                                                        \
                row[j] = 0;                                                                        \
            }                                                                                      \
            brow[j] = a.w[mat[j]] + (size_t)row[j] * nbk * BODY;                                   \
            hrow[j] = (const uint8_t *)a.sc[mat[j]] + (size_t)row[j] * nbk * HEAD;                 \
        }                                                                                          \
    } while (0)
#define FM_GQ_FETCH()                                                                              \
    do {                                                                                           \
        _Pragma("unroll") for (int u = 0; u < U; u++)                                              \
        {                                                                                          \
            const int gi = g0 + u * step;                                                          \
            _Pragma("unroll") for (int j = 0; j < R; j++) if (gi < ng && valid[j]) w[j][u] =       \
                W::fetch(brow[j] + (size_t)(gi / GPB) * BODY, hrow[j] + (size_t)(gi / GPB) * HEAD, \
                         gi % GPB);                                                                \
        }                                                                                          \
    } while (0)
    /* 1. the first groups of the first unit, before waiting for the previous kernel */
    if (base < a.n_units) {
        FM_GQ_UNIT();
        FM_GQ_FETCH();
    }
    /* 2. the input, once the kernels before have finished writing it */
    gpu_pdl_wait();
    fm_prologue<GGML_TYPE_Q4_0>(a, fm_smem, red);
    __syncthreads();
    /* 3. dot products, unit after unit */
    for (; base < a.n_units; base += stride) { /* uniform over the block */
        float acc[R];
#pragma unroll
        for (int j = 0; j < R; j++)
            acc[j] = 0.0f;
        for (;;) {
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int gi = g0 + u * step;
                if (gi < ng) {
#pragma unroll
                    for (int k = 0; k < GS; k++) {
                        const fm_x<GGML_TYPE_Q4_0>::v_t xv =
                            fm_x<GGML_TYPE_Q4_0>::get(fm_smem, nsb, gi * GS + k);
#pragma unroll
                        for (int j = 0; j < R; j++)
                            if (valid[j])
                                acc[j] += gq_dot<T>(W::decode(w[j][u], gi % GPB, k), xv.lo, xv.hi,
                                                    xv.d, xv.s);
                    }
                }
            }
            g0 += step * U;
            if (g0 - lane - sub * GPU_SEG >= ng) break; /* uniform over the segment */
            FM_GQ_FETCH();
        }
#pragma unroll
        for (int j = 0; j < R; j++)
            acc[j] = gpu_seg_sum(acc[j]);
        if (SPR > 1) {
            if (lane == 0) {
#pragma unroll
                for (int j = 0; j < R; j++)
                    part[seg][j] = acc[j];
            }
            __syncthreads();
            if (sub == 0) {
#pragma unroll
                for (int j = 0; j < R; j++) {
                    float t = 0.0f;
#pragma unroll
                    for (int k = 0; k < SPR; k++)
                        t += part[seg + k][j];
                    acc[j] = t;
                }
            }
            __syncthreads(); /* part is reused by the next unit */
        }
        if (sub == 0 && lane == 0) {
            if constexpr (OUT == FM_SWIGLU) {
                if (valid[0]) {
                    a.y[0][row[0]] = gpu_swiglu1(acc[0], acc[R - 1]);
                }
            } else {
#pragma unroll
                for (int j = 0; j < R; j++) {
                    if (!valid[j]) continue;
                    float *y = a.y[mat[j]] + row[j];
                    if (OUT == FM_ADD)
                        *y += acc[j];
                    else
                        *y = a.bias[mat[j]] ? acc[j] + a.bias[mat[j]][row[j]] : acc[j];
                }
            }
        }
        if (base + stride < a.n_units) { /* the next unit's first groups */
            base += stride;
            FM_GQ_UNIT();
            g0 = sub * GPU_SEG + lane;
            FM_GQ_FETCH();
            base -= stride;
        }
    }
#undef FM_GQ_FETCH
#undef FM_GQ_UNIT
}

/* ---- launcher ----------------------------------------------------------------------------- */


typedef void (*fm_kernel)(const fm_args);

/* FORGE_GPU_FMV_WAVE=0: one block per FM_SEGS units (several waves on large matrices) instead
 * of one wave of blocks that loop (comparison). */
static int one_wave(void)
{
    static volatile int cached = -1; /* benign race: every thread computes the same value */
    if (cached < 0) {
        const char *v = getenv("FORGE_GPU_FMV_WAVE");
        cached = !(v && v[0] == '0');
    }
    return cached;
}

static int fm_launch(fm_kernel k, const char *name, unsigned grid, size_t smem, const fm_args &a,
                     cudaStream_t st, forge_err *err)
{
    int rc = FORGE_OK;
    if (smem > 48 * 1024)
        GPU_CHECK(cudaFuncSetAttribute((const void *)k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       (int)smem));
    if (one_wave()) {
        int per_sm = 0;
        GPU_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k, FM_THREADS, smem));
        const unsigned wave = (unsigned)(per_sm > 0 ? per_sm : 1) *
                              (unsigned)(gpu_sm_count() > 0 ? gpu_sm_count() : 64);
        if (grid > wave) grid = wave;
    }
    gpu_launch_pdl(k, dim3(grid), dim3(FM_THREADS), smem, st, a);
    GPU_LAUNCH_CHECK(name, st);
    return FORGE_OK;
fail:
    return rc;
}

/* The kernel for a type: k_fused_matvec, or k_fused_gq for the types of gpu_quant.cuh. */
template <int WT, int OUT, int R, int SPR> static fm_kernel fm_kernel_for()
{
    if constexpr (WT == GGML_TYPE_F32 || WT == GGML_TYPE_F16 || WT == GGML_TYPE_BF16 ||
                  WT == GGML_TYPE_Q8_0 || WT == GGML_TYPE_Q4_0)
        return k_fused_matvec<WT, OUT, R, SPR>;
    else
        return k_fused_gq<WT, OUT, R, SPR, (bool)fm_gq_group<WT, R>::OK>;
}

/* Layout choice: R rows per segment, SPR segments per unit. inv_spr > 0 (batch-invariant
 * mode): SPR = inv_spr, gpu_matvec's choice for these matrices (R does not change a row's order
 * of sums). */
template <int WT, int OUT>
static int fm_dispatch(const fm_args &a0, int total_rows, int inv_spr, size_t smem,
                       cudaStream_t st, forge_err *err)
{
    constexpr bool gq_type = WT != GGML_TYPE_F32 && WT != GGML_TYPE_F16 && WT != GGML_TYPE_BF16 &&
                             WT != GGML_TYPE_Q8_0 && WT != GGML_TYPE_Q4_0;
    fm_args a = a0;
    const int64_t max_warps = gpu_mv_max_warps();
    int r = 1, spr = 1;
    if (OUT == FM_SWIGLU) {
        r = 2;
        a.n_units = total_rows;
        if (inv_spr > 0)
            spr = inv_spr;
        else if ((int64_t)a.n_units * 2 <= max_warps && a.n_chunks >= 64)
            spr = 2;
    } else {
        /* tall: two rows per segment (not F32, whose activations are no larger than its
         * weights); few long rows: segments share a row while the grid stays one wave */
        if (WT != GGML_TYPE_F32 && !gq_type && total_rows >= max_warps && inv_spr <= 1) r = 2;
        a.n_units = (total_rows + r - 1) / r;
        if (inv_spr > 0)
            spr = inv_spr;
        else if (r == 1)
            while (spr < 4 && (int64_t)a.n_units * spr * 2 <= max_warps && a.n_chunks >= 64 * spr)
                spr *= 2;
    }
    unsigned grid = (unsigned)((a.n_units + FM_SEGS / spr - 1) / (FM_SEGS / spr));
    const char *name = OUT == FM_SWIGLU ? "k_fused_matvec<swiglu>"
                       : OUT == FM_ADD  ? "k_fused_matvec<add>"
                                        : "k_fused_matvec<store>";
    if (OUT == FM_SWIGLU)
        return spr == 1 ? fm_launch(fm_kernel_for<WT, OUT, 2, 1>(), name, grid, smem, a, st, err)
                        : fm_launch(fm_kernel_for<WT, OUT, 2, 2>(), name, grid, smem, a, st, err);
    if (r == 2) return fm_launch(fm_kernel_for<WT, OUT, 2, 1>(), name, grid, smem, a, st, err);
    switch (spr) {
    case 1:
        return fm_launch(fm_kernel_for<WT, OUT, 1, 1>(), name, grid, smem, a, st, err);
    case 2:
        return fm_launch(fm_kernel_for<WT, OUT, 1, 2>(), name, grid, smem, a, st, err);
    default:
        return fm_launch(fm_kernel_for<WT, OUT, 1, 4>(), name, grid, smem, a, st, err);
    }
}

template <int WT>
static int fm_dispatch_out(int out, const fm_args &a, int total_rows, int inv_spr, size_t smem,
                           cudaStream_t st, forge_err *err)
{
    switch (out) {
    case FM_ADD:
        return fm_dispatch<WT, FM_ADD>(a, total_rows, inv_spr, smem, st, err);
    case FM_SWIGLU:
        return fm_dispatch<WT, FM_SWIGLU>(a, total_rows, inv_spr, smem, st, err);
    default:
        return fm_dispatch<WT, FM_STORE>(a, total_rows, inv_spr, smem, st, err);
    }
}

/* The SPR of the batch-invariant mode for these arguments (gpu_matvec's for every matrix), or
 * 0 where that mode cannot give gpu_matvec's order: a type gpu_matvec_multi does not take (the
 * block types of gpu_quant.cuh walk their rows in other orders), matrices whose gpu_matvec
 * splits differ, or an SPR without a fused kernel (SwiGLU: 1, 2; else 1, 2, 4). */
static int fm_invariant_spr(const gpu_fmv_args *p)
{
    if (!p || p->n_mat < 1 || p->n_mat > GPU_FMV_MAX_MATS || fm_is_gq(p->wtype) ||
        !gpu_fused_matvec_supported(p->wtype, p->n_in))
        return 0;
    const int n_chunks = (int)(fm_row_bytes(p->wtype, p->n_in) / 16);
    const int spr = gpu_matvec_spr(p->mat[0].n_out, n_chunks);
    for (int m = 1; m < p->n_mat; m++)
        if (gpu_matvec_spr(p->mat[m].n_out, n_chunks) != spr) return 0;
    return spr <= (p->out_mode == FM_SWIGLU ? 2 : 4) ? spr : 0;
}

GPU_API int gpu_fused_matvec_invariant(const gpu_fmv_args *a)
{
    return fm_invariant_spr(a) > 0;
}

GPU_API int gpu_fused_matvec(const gpu_fmv_args *p, gpu_stream *s, forge_err *err)
{
    cudaStream_t st = GPU_STREAM(s);
    fm_args a;
    int64_t total = 0;
    if (!p || p->n_mat < 1 || p->n_mat > GPU_FMV_MAX_MATS || !p->d_x)
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_fused_matvec: NULL input or %d matrices",
                           p ? p->n_mat : -1);
    if (!gpu_fused_matvec_supported(p->wtype, p->n_in))
        return gpu_err_set(err, FORGE_E_UNSUPPORTED,
                           "gpu_fused_matvec: type %s with n_in %lld is not supported",
                           gpu_type_name(p->wtype), (long long)p->n_in);
    if (p->in_mode != GPU_FMV_IN_PLAIN && p->in_mode != GPU_FMV_IN_RMSNORM)
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_fused_matvec: in_mode %d", p->in_mode);
    if (p->out_mode != FM_STORE && p->out_mode != FM_ADD && p->out_mode != FM_SWIGLU)
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_fused_matvec: out_mode %d", p->out_mode);
    if (p->in_mode == GPU_FMV_IN_RMSNORM && (!p->d_norm || !gpu_is_aligned(p->d_norm, 16)))
        return gpu_err_set(err, FORGE_E_INVALID,
                           "gpu_fused_matvec: RMSNorm needs 16-byte aligned norm weights");
    if (!gpu_is_aligned(p->d_x, 16))
        return gpu_err_set(err, FORGE_E_INVALID,
                           "gpu_fused_matvec: input %p is not 16-byte aligned",
                           (const void *)p->d_x);
    if (p->out_mode == FM_SWIGLU &&
        (p->n_mat != 2 || p->mat[0].n_out != p->mat[1].n_out || p->mat[0].d_bias ||
         p->mat[1].d_bias))
        return gpu_err_set(err, FORGE_E_INVALID,
                           "gpu_fused_matvec: SwiGLU takes two matrices of the same height and no "
                           "biases");
    memset(&a, 0, sizeof a);
    for (int m = 0; m < p->n_mat; m++) {
        const gpu_fmv_mat *mm = &p->mat[m];
        if (!mm->d_w || !mm->d_y || mm->n_out <= 0 || !gpu_is_aligned(mm->d_w, 16))
            return gpu_err_set(err, FORGE_E_INVALID,
                               "gpu_fused_matvec: matrix %d: NULL or misaligned buffer or %lld "
                               "rows",
                               m, (long long)mm->n_out);
        if (mm->d_bias && p->out_mode != FM_STORE)
            return gpu_err_set(err, FORGE_E_INVALID,
                               "gpu_fused_matvec: biases only with GPU_FMV_OUT_STORE");
        a.w[m] = (const uint8_t *)mm->d_w;
        a.sc[m] = fm_is_quant(p->wtype)
                      ? (const unsigned short *)(a.w[m] + gpu_weight_scales_offset(
                                                              p->wtype, mm->n_out, p->n_in))
                      : NULL;
        a.bias[m] = mm->d_bias;
        a.y[m] = mm->d_y;
        a.row0[m] = (int)total;
        total += mm->n_out;
        if (total > INT32_MAX / 2)
            return gpu_err_set(err, FORGE_E_INVALID, "gpu_fused_matvec: %lld rows in all",
                               (long long)total);
    }
    a.row0[p->n_mat] = (int)total;
    a.n_mat = p->n_mat;
    a.n_in = (int)p->n_in;
    a.row_bytes = fm_row_bytes(p->wtype, p->n_in);
    a.n_chunks = (int)(a.row_bytes / 16);
    a.x = p->d_x;
    a.norm = p->d_norm;
    a.eps = p->eps;
    a.rmsnorm = p->in_mode == GPU_FMV_IN_RMSNORM;
    a.round_x = p->round_x;
    const int rows = p->out_mode == FM_SWIGLU ? (int)p->mat[0].n_out : (int)total;
    const size_t smem = fm_smem_bytes(p->wtype, p->n_in);
    const int inv_spr = p->invariant ? fm_invariant_spr(p) : 0;
    if (p->invariant && inv_spr == 0)
        return gpu_err_set(err, FORGE_E_UNSUPPORTED,
                           "gpu_fused_matvec: no batch-invariant form for type %s, n_in %lld, "
                           "%d matrices (see gpu_fused_matvec_invariant)",
                           gpu_type_name(p->wtype), (long long)p->n_in, p->n_mat);
    switch (p->wtype) {
    case GGML_TYPE_Q4_0:
        return fm_dispatch_out<GGML_TYPE_Q4_0>(p->out_mode, a, rows, inv_spr, smem, st, err);
    case GGML_TYPE_Q8_0:
        return fm_dispatch_out<GGML_TYPE_Q8_0>(p->out_mode, a, rows, inv_spr, smem, st, err);
    case GGML_TYPE_F16:
        return fm_dispatch_out<GGML_TYPE_F16>(p->out_mode, a, rows, inv_spr, smem, st, err);
    case GGML_TYPE_BF16:
        return fm_dispatch_out<GGML_TYPE_BF16>(p->out_mode, a, rows, inv_spr, smem, st, err);
    case GGML_TYPE_F32:
        return fm_dispatch_out<GGML_TYPE_F32>(p->out_mode, a, rows, inv_spr, smem, st, err);
#define FM_GQ(T)                                                                                   \
    case T:                                                                                        \
        return fm_dispatch_out<T>(p->out_mode, a, rows, 0, smem, st, err);
        GQ_TYPES(FM_GQ)
#undef FM_GQ
    default:
        return gpu_err_set(err, FORGE_E_UNSUPPORTED, "gpu_fused_matvec: type %s",
                           gpu_type_name(p->wtype));
    }
}
