/* gpu_paged.cu - the paged K/V cache on the device for batches of many sequences
 * (docs/ENGINE.md): the K/V store at per-row cache slots, and causal attention of every row of a
 * batch over its own sequence's positions through that sequence's block table, decode rows and
 * prompt chunks alike, in one launch (plus one merge launch).
 *
 * Attention (split-K, batch invariant): the positions 0..pos[r] of row r are cut into splits of
 * pa_row_split(pos[r] + 1) positions (PA_SPLIT_MIN, doubled until at most PA_MAX_SPLITS splits
 * cover the row): a function of the row's own length, so the cut never depends on the batch,
 * and short rows still spread over many blocks (each warp's walk of split / PA_WARPS positions
 * is latency bound: fixed 128-position splits made a one-row step's attention 31 us per layer
 * on llama3.2-1b at ~200 positions, h100, fifteenth session). One block handles one
 * (split, kv head, row): its PA_WARPS warps walk the split's positions round-robin (warp w takes
 * positions start + w, start + w + PA_WARPS, ...; the fast variant PA_R consecutive positions
 * a step, k_paged_split_v), each position's cache row found through the
 * block table; every warp keeps its own online softmax (m, l) per query head of the GQA group in
 * registers and its unnormalised output in shared memory. The warps merge in warp order, the
 * block writes (o, m, l) of its split, and k_paged_merge combines the splits of each (row, head)
 * in split order. Every reduction has a fixed order that depends only on the row's own position,
 * so a row's result is the same whatever the other rows of the batch are (bit for bit).
 *
 * F16 cache: the query is rounded to fp16 before the K dot products, as the CPU backend (ggml)
 * does; the softmax probabilities are not rounded to fp16 before the V sum (the CPU rounds the
 * normalised ones, which needs the full softmax first): a difference of fp16 rounding, within
 * the NMSE bound of the tests. Prompt chunks re-read K/V once per query row (no tensor cores
 * yet): correct, not fast for long prompts. */
#include <math.h>
#include <stdlib.h>

#include "gpu/gpu_common.cuh"
#include "gpu/gpu_ops.h"
#include "gpu/gpu_vendor.h"

#define PA_SPLIT_MIN 16  /* positions per split of rows up to PA_SPLIT_MIN * PA_MAX_SPLITS long */
#define PA_MAX_SPLITS 64 /* splits per row at most */
#define PA_WARPS 4
#define PA_THREADS (PA_WARPS * GPU_SEG)
#define PA_MAX_GROUP 16
#define PA_MAX_DPL 8 /* dims per lane: head_dim <= 256 */
#define PA_MAX_GHD 2048 /* group * head_dim: shared memory of the per-warp outputs */

struct pa_args {
    const float *q;
    const void *k, *v;
    int64_t row_stride;
    int n_head, n_kv_head, hd, group;
    const int32_t *pos, *row_seq, *table;
    int64_t table_stride;
    int block_size, n_split_max;
    float scale;
    float softcap, inv_cap; /* scores s -> softcap tanh(s * inv_cap) when softcap > 0 */
    int window;             /* > 0: a row at position p sees p - window + 1 .. p only */
    float *part_o;  /* [n_rows][n_head][n_split_max][hd] */
    float *part_ml; /* [n_rows][n_head][n_split_max][2] */
    float *out;     /* [n_rows][n_head][hd] */
};

/* The first position a row with n_kv positions attends (sliding window; 0 without one): the
 * warps start their walks there, positions before it are never read. A split wholly before it
 * leaves m = -inf, l = 0, o = 0, which the merge weighs 0. */
GPU_DEV int pa_lo(const pa_args &a, int n_kv)
{
    return a.window > 0 && n_kv > a.window ? n_kv - a.window : 0;
}

/* Positions per split of a row of n_kv positions: a function of the row alone (batch
 * invariance); ceil(n_kv / split) <= PA_MAX_SPLITS. */
GPU_DEV int pa_row_split(int64_t n_kv)
{
    int split = PA_SPLIT_MIN;
    while ((int64_t)split * PA_MAX_SPLITS < n_kv)
        split *= 2;
    return split;
}

/* Score soft-capping as the CPU (ggml) does it: scale by 1/cap, tanh, scale by cap. */
GPU_DEV float pa_cap(const pa_args &a, float s)
{
    return a.softcap > 0.0f ? tanhf(s * a.inv_cap) * a.softcap : s;
}

template <int F16> GPU_DEVT float pa_load(const void *base, int64_t i)
{
    if (F16) return gpu_fp16_to_f32(((const unsigned short *)base)[i]);
    return ((const float *)base)[i];
}

template <int F16> __global__ void __launch_bounds__(PA_THREADS) k_paged_split(const pa_args a)
{
    extern __shared__ float sh[];
    __shared__ float wm[PA_WARPS][PA_MAX_GROUP], wl[PA_WARPS][PA_MAX_GROUP];
    gpu_pdl_trigger();
    gpu_pdl_wait(); /* launched with PDL (gpu_launch_pdl): first of all */
    const int hd = a.hd, g = a.group;
    float *qs = sh;            /* [g][hd] */
    float *oacc = qs + g * hd; /* [PA_WARPS][g][hd] */
    const int split = blockIdx.x, kvh = blockIdx.y, r = blockIdx.z;
    const int n_kv = a.pos[r] + 1;
    const int len = pa_row_split(n_kv), start = split * len;
    if (start >= n_kv) return; /* the whole block: no barrier passed yet */
    const int end = min(start + len, n_kv);
    const int warp = threadIdx.x / GPU_SEG, lane = threadIdx.x % GPU_SEG;
    const float *qr = a.q + ((int64_t)r * a.n_head + (int64_t)kvh * g) * hd;
    for (int i = threadIdx.x; i < g * hd; i += PA_THREADS) {
        float v = qr[i];
        qs[i] = F16 ? gpu_fp16_to_f32(gpu_f32_to_fp16(v)) : v;
    }
    for (int i = threadIdx.x; i < PA_WARPS * g * hd; i += PA_THREADS)
        oacc[i] = 0.0f;
    __syncthreads();

    float m[PA_MAX_GROUP], l[PA_MAX_GROUP];
#pragma unroll
    for (int h = 0; h < PA_MAX_GROUP; h++) {
        m[h] = -INFINITY;
        l[h] = 0.0f;
    }
    float *ow = oacc + warp * g * hd;
    const int32_t *tab = a.table + (int64_t)a.row_seq[r] * a.table_stride;
    for (int p = max(start, pa_lo(a, n_kv)) + warp; p < end; p += PA_WARPS) {
        const int64_t row = (int64_t)tab[p / a.block_size] * a.block_size + p % a.block_size;
        const int64_t off = row * a.row_stride + (int64_t)kvh * hd;
        float kr[PA_MAX_DPL], vr[PA_MAX_DPL];
#pragma unroll
        for (int j = 0; j < PA_MAX_DPL; j++) {
            const int d = lane + j * GPU_SEG;
            kr[j] = d < hd ? pa_load<F16>(a.k, off + d) : 0.0f;
            vr[j] = d < hd ? pa_load<F16>(a.v, off + d) : 0.0f;
        }
#pragma unroll
        for (int h = 0; h < PA_MAX_GROUP; h++) {
            if (h < g) {
                float s = 0.0f;
#pragma unroll
                for (int j = 0; j < PA_MAX_DPL; j++) {
                    const int d = lane + j * GPU_SEG;
                    if (d < hd) s += qs[h * hd + d] * kr[j];
                }
                s = pa_cap(a, gpu_seg_sum(s) * a.scale); /* the same value in every lane */
                const float mn = fmaxf(m[h], s);
                const float alpha = expf(m[h] - mn), pr = expf(s - mn);
                l[h] = l[h] * alpha + pr;
                m[h] = mn;
#pragma unroll
                for (int j = 0; j < PA_MAX_DPL; j++) {
                    const int d = lane + j * GPU_SEG;
                    if (d < hd) ow[h * hd + d] = ow[h * hd + d] * alpha + pr * vr[j];
                }
            }
        }
    }
    if (lane == 0) {
#pragma unroll
        for (int h = 0; h < PA_MAX_GROUP; h++)
            if (h < g) {
                wm[warp][h] = m[h];
                wl[warp][h] = l[h];
            }
    }
    __syncthreads();
    /* the warps in warp order; a warp without positions (m = -inf) adds nothing */
    for (int i = threadIdx.x; i < g * hd; i += PA_THREADS) {
        const int h = i / hd, d = i % hd, hq = kvh * g + h;
        float M = -INFINITY;
        for (int w = 0; w < PA_WARPS; w++)
            M = fmaxf(M, wm[w][h]);
        float o = 0.0f, L = 0.0f;
        for (int w = 0; w < PA_WARPS; w++) {
            if (wm[w][h] == -INFINITY) continue;
            const float f = expf(wm[w][h] - M);
            o += oacc[(w * g + h) * hd + d] * f;
            L += wl[w][h] * f;
        }
        const int64_t sp = ((int64_t)r * a.n_head + hq) * a.n_split_max + split;
        a.part_o[sp * hd + d] = o;
        if (d == 0) {
            a.part_ml[sp * 2] = M;
            a.part_ml[sp * 2 + 1] = L;
        }
    }
}

/* The fast variant for head_dim = 32 * DPL with aligned rows and group * DPL <= 64: lane l owns
 * the DPL consecutive dims [l * DPL, l * DPL + DPL) of every K/V row (one vector load each), its
 * slice of q and of the output of each query head of the group live in registers. Warp w takes
 * PA_R consecutive positions a step (start + (k PA_WARPS + w) PA_R ..), loaded before any is
 * used; their (position, head) dot products are summed by one reduce-scatter
 * (gpu_seg_sum_scatter), so each lane scores one (position, head) and computes its exponential
 * once, and the step's max and sum per head meet over the lanes of that head. (Before, a warp took
 * 2 positions a step, each summed by its own 5-level butterfly with every lane computing every
 * exponential.) The split and the merge are k_paged_split's; the order of every sum depends only
 * on the row's own positions and the kernel's shape (the model's), never on the batch. */
#define PA_MAX_GD 64 /* GMAX * DPL: registers for q and o */
/* Rows (positions) a warp takes a step: 16 floats of K and of V a lane, and R GMAX <= 32 values
 * for the reduce-scatter. */
#define PA_MIN(x, y) ((x) < (y) ? (x) : (y))
#define PA_R(DPL, GMAX) PA_MIN(8, PA_MIN(16 / (DPL), 32 / (GMAX)))

template <int F16, int DPL> GPU_DEVT void pa_vload(float (&x)[DPL], const void *base, int64_t off)
{
    if constexpr (F16 != 0 && DPL >= 8) {
        const uint4 *p = (const uint4 *)((const unsigned short *)base + off);
#pragma unroll
        for (int i = 0; i < DPL / 8; i++) {
            const uint4 u = p[i];
            const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
            for (int k = 0; k < 8; k++)
                x[8 * i + k] = gpu_fp16_to_f32((unsigned short)(w[k / 2] >> (16 * (k & 1))));
        }
    } else if constexpr (F16 != 0 && DPL == 4) {
        const uint2 u = *(const uint2 *)((const unsigned short *)base + off);
        x[0] = gpu_fp16_to_f32((unsigned short)(u.x & 0xffffu));
        x[1] = gpu_fp16_to_f32((unsigned short)(u.x >> 16));
        x[2] = gpu_fp16_to_f32((unsigned short)(u.y & 0xffffu));
        x[3] = gpu_fp16_to_f32((unsigned short)(u.y >> 16));
    } else if constexpr (F16 != 0 && DPL == 2) {
        const unsigned u = *(const unsigned *)((const unsigned short *)base + off);
        x[0] = gpu_fp16_to_f32((unsigned short)(u & 0xffffu));
        x[1] = gpu_fp16_to_f32((unsigned short)(u >> 16));
    } else if constexpr (F16 != 0) {
        x[0] = gpu_fp16_to_f32(((const unsigned short *)base)[off]);
    } else if constexpr (DPL >= 4) {
        const float4 *p = (const float4 *)((const float *)base + off);
#pragma unroll
        for (int i = 0; i < DPL / 4; i++) {
            const float4 u = p[i];
            x[4 * i] = u.x;
            x[4 * i + 1] = u.y;
            x[4 * i + 2] = u.z;
            x[4 * i + 3] = u.w;
        }
    } else if constexpr (DPL == 2) {
        const float2 u = *(const float2 *)((const float *)base + off);
        x[0] = u.x;
        x[1] = u.y;
    } else {
        x[0] = ((const float *)base)[off];
    }
}

template <int F16, int DPL, int GMAX>
__global__ void __launch_bounds__(PA_THREADS) k_paged_split_v(const pa_args a)
{
    __shared__ float wm[PA_WARPS][GMAX], wl[PA_WARPS][GMAX];
    __shared__ float wo[PA_WARPS][GMAX * DPL * 32];
    gpu_pdl_trigger();
    gpu_pdl_wait(); /* launched with PDL (gpu_launch_pdl): first of all */
    const int hd = DPL * 32, g = a.group;
    const int split = blockIdx.x, kvh = blockIdx.y, r = blockIdx.z;
    const int n_kv = a.pos[r] + 1;
    const int len = pa_row_split(n_kv), start = split * len;
    if (start >= n_kv) return; /* the whole block: no barrier passed yet */
    const int end = min(start + len, n_kv);
    const int warp = threadIdx.x / GPU_SEG, lane = threadIdx.x % GPU_SEG;
    const float *qr = a.q + ((int64_t)r * a.n_head + (int64_t)kvh * g) * hd + lane * DPL;
    float q[GMAX][DPL], o[GMAX][DPL], m[GMAX];
#pragma unroll
    for (int h = 0; h < GMAX; h++) {
        m[h] = -INFINITY;
#pragma unroll
        for (int j = 0; j < DPL; j++) {
            const float v = h < g ? qr[h * hd + j] : 0.0f;
            q[h][j] = F16 ? gpu_fp16_to_f32(gpu_f32_to_fp16(v)) : v;
            o[h][j] = 0.0f;
        }
    }
    /* a step: rows t0 .. t0 + R - 1 (padding rows past the end re-read row t0 and weigh 0);
     * value i GMAX + h of a lane = its part of row i's dot product with head h; after the
     * reduce-scatter the lane owns (my_r, my_h) and keeps head my_h's running max ml and sum
     * ll; m[h] (every lane) is head h's running max */
    constexpr int R = PA_R(DPL, GMAX), NV = R * GMAX, LPV = GPU_SEG / NV;
    const int my_r = lane / LPV / GMAX, my_h = lane / LPV % GMAX;
    float ml = -INFINITY, ll = 0.0f;
    const int32_t *tab = a.table + (int64_t)a.row_seq[r] * a.table_stride;
    const int64_t head_off = (int64_t)kvh * hd + lane * DPL;
    for (int t0 = max(start, pa_lo(a, n_kv)) + warp * R; t0 < end; t0 += PA_WARPS * R) {
        float kr[R][DPL], vr[R][DPL];
#pragma unroll
        for (int i = 0; i < R; i++) {
            const int p = t0 + i < end ? t0 + i : t0;
            const int64_t row = (int64_t)tab[p / a.block_size] * a.block_size + p % a.block_size;
            pa_vload<F16, DPL>(kr[i], a.k, row * a.row_stride + head_off);
            pa_vload<F16, DPL>(vr[i], a.v, row * a.row_stride + head_off);
        }
        float v[NV];
#pragma unroll
        for (int i = 0; i < NV; i++)
            v[i] = 0.0f;
#pragma unroll
        for (int h = 0; h < GMAX; h++)
            if (h < g)
#pragma unroll
                for (int i = 0; i < R; i++)
#pragma unroll
                    for (int j = 0; j < DPL; j++)
                        v[i * GMAX + h] += q[h][j] * kr[i][j];
        float sv = gpu_seg_sum_scatter<NV>(v, lane);
        sv = my_h < g && t0 + my_r < end ? pa_cap(a, sv * a.scale) : -INFINITY;
        /* the step's max and sum of each head: over the lanes of its rows (row 0 is valid) */
        float mx = sv;
#pragma unroll
        for (int mask = LPV * GMAX; mask < GPU_SEG; mask *= 2)
            mx = fmaxf(mx, gpu_shfl_xor(mx, mask, GPU_SEG));
        const float mn = fmaxf(ml, mx); /* head my_h's new running max */
        /* 0 for padding rows; heads past the group (all -inf) weigh nothing */
        const float pr = my_h < g ? expf(sv - mn) : 0.0f;
        float ps = pr;
#pragma unroll
        for (int mask = LPV * GMAX; mask < GPU_SEG; mask *= 2)
            ps += gpu_shfl_xor(ps, mask, GPU_SEG);
        if (my_h < g) ll = ll * expf(ml - mn) + ps;
        ml = mn;
#pragma unroll
        for (int h = 0; h < GMAX; h++) {
            if (h < g) {
                const float mh = gpu_shfl(mn, h * LPV, GPU_SEG);
                const float alpha = expf(m[h] - mh);
                m[h] = mh;
#pragma unroll
                for (int j = 0; j < DPL; j++)
                    o[h][j] *= alpha;
#pragma unroll
                for (int i = 0; i < R; i++) {
                    const float pi = gpu_shfl(pr, (i * GMAX + h) * LPV, GPU_SEG);
#pragma unroll
                    for (int j = 0; j < DPL; j++)
                        o[h][j] += pi * vr[i][j];
                }
            }
        }
    }
    if (lane % LPV == 0 && my_r == 0 && my_h < g) {
        wm[warp][my_h] = ml;
        wl[warp][my_h] = ll;
    }
#pragma unroll
    for (int h = 0; h < GMAX; h++)
        if (h < g)
#pragma unroll
            for (int j = 0; j < DPL; j++)
                wo[warp][h * hd + lane * DPL + j] = o[h][j];
    __syncthreads();
    for (int i = threadIdx.x; i < g * hd; i += PA_THREADS) {
        const int h = i / hd, d = i % hd, hq = kvh * g + h;
        float M = -INFINITY;
        for (int w = 0; w < PA_WARPS; w++)
            M = fmaxf(M, wm[w][h]);
        float ov = 0.0f, L = 0.0f;
        for (int w = 0; w < PA_WARPS; w++) {
            if (wm[w][h] == -INFINITY) continue;
            const float f = expf(wm[w][h] - M);
            ov += wo[w][h * hd + d] * f;
            L += wl[w][h] * f;
        }
        const int64_t sp = ((int64_t)r * a.n_head + hq) * a.n_split_max + split;
        a.part_o[sp * hd + d] = ov;
        if (d == 0) {
            a.part_ml[sp * 2] = M;
            a.part_ml[sp * 2 + 1] = L;
        }
    }
}

template <int F16, int DPL>
static void pa_launch_v_g(const pa_args &a, dim3 grid, cudaStream_t st)
{
    constexpr int GTOP = PA_MAX_GD / DPL < 16 ? PA_MAX_GD / DPL : 16; /* 8 or 16 */
    if (a.group <= 1)
        gpu_launch_pdl(k_paged_split_v<F16, DPL, 1>, grid, dim3(PA_THREADS), 0, st, a);
    else if (a.group <= 2)
        gpu_launch_pdl(k_paged_split_v<F16, DPL, 2>, grid, dim3(PA_THREADS), 0, st, a);
    else if (a.group <= 4)
        gpu_launch_pdl(k_paged_split_v<F16, DPL, 4>, grid, dim3(PA_THREADS), 0, st, a);
    else if (a.group <= 8)
        gpu_launch_pdl(k_paged_split_v<F16, DPL, 8>, grid, dim3(PA_THREADS), 0, st, a);
    else
        gpu_launch_pdl(k_paged_split_v<F16, DPL, GTOP>, grid, dim3(PA_THREADS), 0, st, a);
}

template <int F16> static void pa_launch_v(const pa_args &a, int dpl, dim3 grid, cudaStream_t st)
{
    switch (dpl) {
    case 1:
        pa_launch_v_g<F16, 1>(a, grid, st);
        break;
    case 2:
        pa_launch_v_g<F16, 2>(a, grid, st);
        break;
    case 4:
        pa_launch_v_g<F16, 4>(a, grid, st);
        break;
    default:
        pa_launch_v_g<F16, 8>(a, grid, st);
        break;
    }
}

/* The group rounded up to a power of two times the dims per lane, or 0 when head_dim is not
 * 32 * (1, 2, 4 or 8): the fast variant's register need. */
static int pa_fast_gd(int64_t head_dim, int64_t group)
{
    if (head_dim != 32 && head_dim != 64 && head_dim != 128 && head_dim != 256) return 0;
    int gmax = 1;
    while (gmax < group)
        gmax *= 2;
    return gmax * (int)(head_dim / 32);
}

/* One block per (head, row), one thread per dim: the splits in split order. */
__global__ void k_paged_merge(const pa_args a)
{
    gpu_pdl_trigger();
    gpu_pdl_wait(); /* launched with PDL (gpu_launch_pdl): first of all */
    const int hq = blockIdx.x, r = blockIdx.y, d = threadIdx.x;
    if (d >= a.hd) return;
    const int n_kv = a.pos[r] + 1;
    const int len = pa_row_split(n_kv), ns = (n_kv + len - 1) / len;
    const int64_t base = ((int64_t)r * a.n_head + hq) * a.n_split_max;
    const float *ml = a.part_ml + base * 2;
    float M = -INFINITY;
    for (int s = 0; s < ns; s++)
        M = fmaxf(M, ml[2 * s]);
    float num = 0.0f, den = 0.0f;
    for (int s = 0; s < ns; s++) {
        const float f = expf(ml[2 * s] - M);
        den += ml[2 * s + 1] * f;
        num += a.part_o[(base + s) * a.hd + d] * f;
    }
    a.out[((int64_t)r * a.n_head + hq) * a.hd + d] = num / den;
}

/* FORGE_GPU_PAGED_FAST=0: the generic kernel only (diagnosis; the same results up to the
 * order of float operations inside a split), read once. */
static int pa_fast_enabled(void)
{
    static volatile int cached = -1; /* benign race: every thread computes the same value */
    if (cached < 0) {
        const char *v = getenv("FORGE_GPU_PAGED_FAST");
        cached = !(v && v[0] == '0');
    }
    return cached;
}

/* Splits of the longest row of a batch whose rows have at most max_kv positions: the grid. */
static int64_t pa_splits(int64_t max_kv)
{
    const int64_t ns = (max_kv + PA_SPLIT_MIN - 1) / PA_SPLIT_MIN;
    return ns < PA_MAX_SPLITS ? ns : PA_MAX_SPLITS;
}

GPU_API size_t gpu_paged_scratch_bytes(int64_t n_rows, int64_t n_head, int64_t head_dim,
                                       int64_t max_kv)
{
    if (n_rows <= 0 || n_head <= 0 || head_dim <= 0 || max_kv <= 0) return 0;
    return (size_t)n_rows * (size_t)n_head * (size_t)pa_splits(max_kv) *
           (size_t)(head_dim + 2) * sizeof(float);
}

GPU_API int gpu_paged_attention(const gpu_paged_args *p, gpu_stream *s, forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    if (!p || !p->d_q || !p->d_k || !p->d_v || !p->d_pos || !p->d_row_seq || !p->d_table ||
        !p->d_scratch || !p->d_out)
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_paged_attention: NULL argument");
    if (p->kv_type != GGML_TYPE_F32 && p->kv_type != GGML_TYPE_F16)
        return gpu_err_set(err, FORGE_E_UNSUPPORTED, "gpu_paged_attention: KV cache type %s",
                           gpu_type_name(p->kv_type));
    if (p->n_head <= 0 || p->n_kv_head <= 0 || p->n_head % p->n_kv_head || p->head_dim <= 0 ||
        p->head_dim > PA_MAX_DPL * 32 || p->n_head / p->n_kv_head > PA_MAX_GROUP ||
        (p->n_head / p->n_kv_head) * p->head_dim > PA_MAX_GHD || p->n_rows <= 0 ||
        p->block_size <= 0 || p->block_size > INT32_MAX || p->table_stride <= 0 ||
        p->max_kv <= 0 || p->max_kv > INT32_MAX || p->row_stride < p->n_kv_head * p->head_dim ||
        p->n_head > 65535 || p->n_kv_head > 65535)
        return gpu_err_set(err, FORGE_E_UNSUPPORTED,
                           "gpu_paged_attention: heads %lld/%lld, head_dim %lld, %lld rows, "
                           "blocks of %lld, max_kv %lld (head_dim <= %d, group <= %d, group * "
                           "head_dim <= %d)",
                           (long long)p->n_head, (long long)p->n_kv_head, (long long)p->head_dim,
                           (long long)p->n_rows, (long long)p->block_size, (long long)p->max_kv,
                           PA_MAX_DPL * 32, PA_MAX_GROUP, PA_MAX_GHD);
    {
        const int64_t ns = pa_splits(p->max_kv);
        const size_t per_row = gpu_paged_scratch_bytes(1, p->n_head, p->head_dim, p->max_kv);
        int64_t chunk = (int64_t)(p->scratch_bytes / per_row);
        if (chunk < 1)
            return gpu_err_set(err, FORGE_E_INVALID,
                               "gpu_paged_attention: scratch of %zu bytes, one row needs %zu",
                               p->scratch_bytes, per_row);
        if (chunk > 65535) chunk = 65535;
        if (ns > INT32_MAX) return gpu_err_set(err, FORGE_E_INVALID, "gpu_paged_attention: splits");
        const int g = (int)(p->n_head / p->n_kv_head);
        const size_t smem = (size_t)(1 + PA_WARPS) * (size_t)g * (size_t)p->head_dim * 4;
        /* the fast variant: vector loads need every row start aligned to a lane's slice */
        const int dpl = (int)(p->head_dim / 32), gd = pa_fast_gd(p->head_dim, g);
        const int64_t esz = p->kv_type == GGML_TYPE_F16 ? 2 : 4;
        const int64_t align = dpl * esz < 16 ? dpl * esz : 16;
        const bool fast = gd > 0 && gd <= PA_MAX_GD && p->row_stride % dpl == 0 &&
                          gpu_is_aligned(p->d_k, (size_t)align) &&
                          gpu_is_aligned(p->d_v, (size_t)align) && pa_fast_enabled();
        float *part = (float *)p->d_scratch;
        for (int64_t r0 = 0; r0 < p->n_rows; r0 += chunk) {
            const int64_t nr = p->n_rows - r0 < chunk ? p->n_rows - r0 : chunk;
            pa_args a;
            a.q = p->d_q + r0 * p->n_head * p->head_dim;
            a.k = p->d_k;
            a.v = p->d_v;
            a.row_stride = p->row_stride;
            a.n_head = (int)p->n_head;
            a.n_kv_head = (int)p->n_kv_head;
            a.hd = (int)p->head_dim;
            a.group = g;
            a.pos = p->d_pos + r0;
            a.row_seq = p->d_row_seq + r0;
            a.table = p->d_table;
            a.table_stride = p->table_stride;
            a.block_size = (int)p->block_size;
            a.n_split_max = (int)ns;
            a.scale = p->scale;
            a.softcap = p->softcap > 0.0f ? p->softcap : 0.0f;
            a.inv_cap = p->softcap > 0.0f ? 1.0f / p->softcap : 0.0f;
            a.window = p->window > 0 ? p->window : 0;
            a.part_o = part;
            a.part_ml = part + (size_t)nr * (size_t)p->n_head * (size_t)ns * (size_t)p->head_dim;
            a.out = p->d_out + r0 * p->n_head * p->head_dim;
            const dim3 grid((unsigned)ns, (unsigned)p->n_kv_head, (unsigned)nr);
            if (fast) {
                if (p->kv_type == GGML_TYPE_F16)
                    pa_launch_v<1>(a, dpl, grid, st);
                else
                    pa_launch_v<0>(a, dpl, grid, st);
                GPU_LAUNCH_CHECK("k_paged_split_v", st);
            } else if (p->kv_type == GGML_TYPE_F16) {
                gpu_launch_pdl(k_paged_split<1>, grid, dim3(PA_THREADS), smem, st, a);
                GPU_LAUNCH_CHECK("k_paged_split<F16>", st);
            } else {
                gpu_launch_pdl(k_paged_split<0>, grid, dim3(PA_THREADS), smem, st, a);
                GPU_LAUNCH_CHECK("k_paged_split<F32>", st);
            }
            const unsigned thr = (unsigned)((p->head_dim + 31) / 32 * 32);
            gpu_launch_pdl(k_paged_merge, dim3((unsigned)p->n_head, (unsigned)nr), dim3(thr), 0, st,
                           a);
            GPU_LAUNCH_CHECK("k_paged_merge", st);
        }
    }
    return FORGE_OK;
fail:
    return rc;
}

/* Row t of src (n values) to cache row slot[t]. */
template <int F16>
__global__ void k_store_slots(const float *__restrict__ src, void *dst, int64_t n, int64_t n_rows,
                              const int32_t *__restrict__ slot, int64_t row_stride)
{
    const int64_t total = n * n_rows, stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const int64_t t = i / n, j = i % n;
        const int64_t at = (int64_t)slot[t] * row_stride + j;
        if (F16)
            ((unsigned short *)dst)[at] = gpu_f32_to_fp16(src[i]);
        else
            ((float *)dst)[at] = src[i];
    }
}

GPU_API int gpu_store_slots(const float *d_src, void *d_dst, int dst_type, int64_t n,
                            int64_t n_rows, const int32_t *d_slot, int64_t row_stride,
                            gpu_stream *s, forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    if (!d_src || !d_dst || !d_slot || n <= 0 || n_rows <= 0 || row_stride < n)
        return gpu_err_set(err, FORGE_E_INVALID,
                           "gpu_store_slots: NULL buffer, n %lld, rows %lld or stride %lld",
                           (long long)n, (long long)n_rows, (long long)row_stride);
    {
        int64_t total = n * n_rows, blocks = (total + 255) / 256;
        unsigned grid = (unsigned)(blocks < 4096 ? blocks : 4096);
        if (dst_type == GGML_TYPE_F32) {
            k_store_slots<0><<<grid, 256, 0, st>>>(d_src, d_dst, n, n_rows, d_slot, row_stride);
            GPU_LAUNCH_CHECK("k_store_slots<F32>", st);
        } else if (dst_type == GGML_TYPE_F16) {
            k_store_slots<1><<<grid, 256, 0, st>>>(d_src, d_dst, n, n_rows, d_slot, row_stride);
            GPU_LAUNCH_CHECK("k_store_slots<F16>", st);
        } else {
            return gpu_err_set(err, FORGE_E_UNSUPPORTED, "gpu_store_slots: destination type %s",
                               gpu_type_name(dst_type));
        }
    }
    return FORGE_OK;
fail:
    return rc;
}
