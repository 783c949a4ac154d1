/* gpu_attn.cu - attention for one query token over an F32/F16 KV cache (flash decoding).
 *
 * The positions are cut into splits (about 4 blocks per multiprocessor in all, each split's length
 * computed on the device from the query's position: att_splits); one block handles
 * one (split, kv head) pair and every query head of that kv head's GQA group, so each K/V element
 * is read from memory once. Inside a block every 32-lane segment walks its own positions (two at
 * a time, the next two already loading) straight from memory: lane l holds dims
 * [l*DPL, l*DPL + DPL) of the K and V rows, the scores are segment sums, and each segment keeps
 * its own online softmax (running max m, sum l) and unnormalised output o in registers, one per
 * query head. No barrier in the loop. At the end the block's segments are merged in shared
 * memory (in a fixed order, so results are deterministic) and the block writes o, m, l of its
 * split; a second kernel merges the splits of each head:
 *   out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s,  M = max_s m_s.
 * The number of positions, *d_pos + 1, is read on the device and the grid is sized by max_kv, so
 * a captured graph stays valid while the position grows (blocks past the end leave at once).
 * Positions past the end are never read.
 *
 * An F16 cache follows the CPU backend's (ggml's) rounding instead: the query is rounded to fp16
 * before the K dot products, and the normalised probabilities p = exp(s - M) / S, with M and S
 * the maximum and sum over ALL positions of the head, are rounded to fp16 before the V sum. That
 * needs M and S before any V row is weighted, so this path is three kernels (their segments walk
 * several consecutive positions a step and share out the dot products by a reduce-scatter, so
 * each lane scores one position: ATT_NV):
 *   k_attn_scores  per (split, kv head): scores s = (k . fp16(q)) * scale to scratch, and the
 *                  split's max m and sum l = sum e^(s - m);
 *   k_attn_pv      per (split, kv head): M and S of each head from every split's (m, l) (the same
 *                  fixed-order reduction in every block), p = fp16(e^(s - M) * (1/S)), and the
 *                  split's sum p * v (already normalised);
 *   k_attn_sum     per head: out = the sum of the splits' partial outputs, in split order.
 * With a single split (a short cache) the partial output is the output and the last kernel (and,
 * on the F32 path, the merge) is not launched. */
#include <math.h>
#include <stdlib.h>

#include "gpu/gpu_common.cuh"
#include "gpu/gpu_ops.h"
#include "gpu/gpu_vendor.h"

#define ATT_T 32 /* split lengths are multiples of this */
#define ATT_THREADS 256
#define ATT_SEGS (ATT_THREADS / GPU_SEG)
#define ATT_MAX_HEAD_DIM 256
#define ATT_MAX_GROUP 16
#define ATT_MAX_GD 64 /* group * dims-per-lane: registers for o */
#define ATT_MAX_SPLITS 256
/* F16 path: a segment takes ATT_NV(DPL, GMAX) / GMAX consecutive positions a step, so that its
 * (position, head) dot products are ATT_NV values a lane, summed over the segment by one
 * reduce-scatter (gpu_seg_sum_scatter: 16 shuffles for 16 sums instead of 5 each), after which
 * each lane owns one (position, head) and computes its softmax terms once, not all 32 lanes.
 * (h100, llama2-7b Q4_0 at depth 4096: with a gpu_seg_sum per position and every lane computing
 * every exponential, the kernels issued 84 instructions a position.) 16 values, 8 where a
 * lane's slice of a row is 16 bytes (head_dim 256: the registers) and the group allows. */
#define ATT_NV(DPL, GMAX) ((DPL) >= 8 && (GMAX) <= 8 ? 8 : 16)
/* blocks per multiprocessor the F16 kernels are built for: the grid's ~4 a multiprocessor fit
 * in one wave, unless the GQA group's output accumulators need more registers */
#define ATT_MINB(DPL, GMAX) ((DPL) * (GMAX) >= 32 ? 2 : 4)

struct att_args {
    const float *q;
    const void *k, *v;
    int64_t pos_stride, head_stride;
    int n_head, n_kv_head, head_dim, group;
    const int32_t *pos;
    int max_kv, n_split_max;
    int min_tiles; /* the least ATT_T-position tiles a split takes (min_split_tiles) */
    float scale;
    float softcap, inv_cap; /* scores s -> softcap tanh(s * inv_cap) when softcap > 0 */
    int window;             /* > 0: a query at position p sees p - window + 1 .. p only */
    float *part_o; /* [n_head][n_split_max][head_dim] */
    float *part_m; /* [n_head][n_split_max] */
    float *part_l; /* [n_head][n_split_max] */
    float *scores; /* F16 path: [n_head][max_kv] */
    float *out;
    /* several queries in one launch (blockIdx.z = query): strides in floats between queries'
     * q, out and scratch regions; query z reads its position at pos[z] */
    int64_t q_stride, out_stride, scr_stride;
};

/* The arguments of query blockIdx.z (the identity for a single query). */
GPU_DEV att_args att_query(const att_args &a0)
{
    att_args a = a0;
    const int64_t z = blockIdx.z;
    a.q += z * a0.q_stride;
    a.out += z * a0.out_stride;
    a.pos += z;
    a.part_o += z * a0.scr_stride;
    a.part_m += z * a0.scr_stride;
    a.part_l += z * a0.scr_stride;
    a.scores += z * a0.scr_stride;
    return a;
}

GPU_DEV int att_n_kv(const att_args &a)
{
    int n = a.pos[0] + 1;
    return n < 1 ? 1 : (n > a.max_kv ? a.max_kv : n);
}

/* The first position a query with n_kv positions attends (sliding window; 0 without one).
 * Positions before it are never read: the splits start their walks there. */
GPU_DEV int att_lo(const att_args &a, int n_kv)
{
    return a.window > 0 && n_kv > a.window ? n_kv - a.window : 0;
}

/* How query a's positions are cut: lo .. n_kv - 1 (the window's, or all) in n_split splits of
 * split_len positions (a multiple of ATT_T, at least min_tiles tiles), the fewest splits of
 * at most n_split_max that cover them. Computed on the device from the query's position, so
 * every block of the grid (n_split_max splits, sized by max_kv) gets an equal share however deep
 * the cache is, and a captured graph stays valid as it grows; blocks past n_split leave. */
struct att_range {
    int n_kv, lo, split_len, n_split;
};
GPU_DEV att_range att_splits(const att_args &a)
{
    att_range r;
    r.n_kv = att_n_kv(a);
    r.lo = att_lo(a, r.n_kv);
    const int tiles = (r.n_kv - r.lo + ATT_T - 1) / ATT_T;
    int tps = (tiles + a.n_split_max - 1) / a.n_split_max;
    if (tps < a.min_tiles) tps = a.min_tiles;
    r.split_len = tps * ATT_T;
    r.n_split = (tiles + tps - 1) / tps;
    return r;
}

/* Score soft-capping as the CPU (ggml) does it: scale by 1/cap, tanh, scale by cap. */
GPU_DEV float att_cap(const att_args &a, float s)
{
    return a.softcap > 0.0f ? tanhf(s * a.inv_cap) * a.softcap : s;
}

/* One lane's slice of a K or V row, as loaded (fp16 pairs or floats). */
template <int KV_F16, int DPL> struct att_slice {
    enum { W = KV_F16 ? (DPL + 1) / 2 : DPL };
    unsigned w[W];
};

template <int KV_F16, int DPL> GPU_DEVT float att_elem(const att_slice<KV_F16, DPL> &s, int j)
{
    if (KV_F16) return gpu_fp16_to_f32((unsigned short)(s.w[j / 2] >> (16 * (j & 1))));
    return __uint_as_float(s.w[j]);
}

/* Load dims [lane*DPL, lane*DPL + DPL) of the row at element offset off (zeros when !valid).
 * VEC: head_dim == 32 * DPL and the row start aligned to the slice, so one wide load. */
template <int KV_F16, int DPL, int VEC>
GPU_DEVT void att_load(att_slice<KV_F16, DPL> &s, const void *base, int64_t off, int lane, int hd,
                       bool valid)
{
#pragma unroll
    for (int i = 0; i < att_slice<KV_F16, DPL>::W; i++)
        s.w[i] = 0;
    if (!valid) return;
    const int esz = KV_F16 ? 2 : 4;
    const unsigned char *p = (const unsigned char *)base + (off + (int64_t)lane * DPL) * esz;
    if (VEC) {
        const int bytes = DPL * esz;
        if (bytes >= 16) {
#pragma unroll
            for (int i = 0; i < bytes / 16; i++) {
                uint4 v = gpu_ld_stream16((const uint4 *)p + i);
                s.w[4 * i] = v.x;
                s.w[4 * i + 1] = v.y;
                s.w[4 * i + 2] = v.z;
                s.w[4 * i + 3] = v.w;
            }
        } else if (bytes == 8) {
            uint2 v = *(const uint2 *)p;
            s.w[0] = v.x;
            s.w[1] = v.y;
        } else if (bytes == 4) {
            s.w[0] = *(const unsigned *)p;
        } else {
            s.w[0] = *(const unsigned short *)p;
        }
    } else {
#pragma unroll
        for (int j = 0; j < DPL; j++) {
            if (lane * DPL + j < hd) {
                if (KV_F16)
                    s.w[j / 2] |= (unsigned)((const unsigned short *)p)[j] << (16 * (j & 1));
                else
                    s.w[j] = ((const unsigned *)p)[j];
            }
        }
    }
}

/* GMAX: the group size rounded up to a power of two (registers for o, m, l). */
template <int KV_F16, int DPL, int VEC, int GMAX>
__global__ void __launch_bounds__(ATT_THREADS, 2) k_attn_split(const att_args a0)
{
    gpu_pdl_trigger();
    const att_args a = att_query(a0);
    extern __shared__ float sh[];
    const int hd = a.head_dim, g = a.group;
    float *qs = sh;               /* [g][hd], pre-scaled */
    float *oacc = qs + g * hd;    /* [g][hd] */
    float *seg_m = oacc + g * hd; /* [ATT_SEGS][ATT_MAX_GROUP] */
    float *seg_l = seg_m + ATT_SEGS * ATT_MAX_GROUP;
    float *blk_m = seg_l + ATT_SEGS * ATT_MAX_GROUP; /* [ATT_MAX_GROUP] */
    float *blk_l = blk_m + ATT_MAX_GROUP;            /* [ATT_MAX_GROUP] */
    const int split = blockIdx.x, kvh = blockIdx.y;
    const att_range rg = att_splits(a);
    if (split >= rg.n_split) return; /* the whole block: no barrier passed yet */
    const int start = rg.lo + split * rg.split_len;
    const int end = min(start + rg.split_len, rg.n_kv);
    const int seg = threadIdx.x / GPU_SEG, lane = threadIdx.x % GPU_SEG;

    for (int i = threadIdx.x; i < g * hd; i += ATT_THREADS) {
        qs[i] = a.q[(int64_t)(kvh * g) * hd + i] * a.scale;
        oacc[i] = 0.0f;
    }
    __syncthreads();

    float o[GMAX * DPL], m[GMAX], l[GMAX];
#pragma unroll
    for (int h = 0; h < GMAX; h++) {
        m[h] = -INFINITY;
        l[h] = 0.0f;
#pragma unroll
        for (int j = 0; j < DPL; j++)
            o[h * DPL + j] = 0.0f;
    }

    const int64_t head_off = (int64_t)kvh * a.head_stride;
    /* positions t and t + ATT_SEGS per step; the next step's rows load while this one computes */
    int t = start + seg;
    att_slice<KV_F16, DPL> ka, kb, va, vb, nka, nkb, nva, nvb;
    att_load<KV_F16, DPL, VEC>(ka, a.k, t * a.pos_stride + head_off, lane, hd, t < end);
    att_load<KV_F16, DPL, VEC>(kb, a.k, (t + ATT_SEGS) * a.pos_stride + head_off, lane, hd,
                               t + ATT_SEGS < end);
    att_load<KV_F16, DPL, VEC>(va, a.v, t * a.pos_stride + head_off, lane, hd, t < end);
    att_load<KV_F16, DPL, VEC>(vb, a.v, (t + ATT_SEGS) * a.pos_stride + head_off, lane, hd,
                               t + ATT_SEGS < end);
    for (; t < end; t += 2 * ATT_SEGS) {
        const int tn = t + 2 * ATT_SEGS;
        att_load<KV_F16, DPL, VEC>(nka, a.k, (int64_t)tn * a.pos_stride + head_off, lane, hd,
                                   tn < end);
        att_load<KV_F16, DPL, VEC>(nkb, a.k, (int64_t)(tn + ATT_SEGS) * a.pos_stride + head_off,
                                   lane, hd, tn + ATT_SEGS < end);
        att_load<KV_F16, DPL, VEC>(nva, a.v, (int64_t)tn * a.pos_stride + head_off, lane, hd,
                                   tn < end);
        att_load<KV_F16, DPL, VEC>(nvb, a.v, (int64_t)(tn + ATT_SEGS) * a.pos_stride + head_off,
                                   lane, hd, tn + ATT_SEGS < end);
        const bool b_valid = t + ATT_SEGS < end; /* the same for the whole segment */
#pragma unroll
        for (int h = 0; h < GMAX; h++) {
            if (h < g) {
                float sa = 0.0f, sb = 0.0f;
#pragma unroll
                for (int j = 0; j < DPL; j++) {
                    int d = lane * DPL + j;
                    float qv = d < hd ? qs[h * hd + d] : 0.0f;
                    sa += qv * att_elem<KV_F16, DPL>(ka, j);
                    sb += qv * att_elem<KV_F16, DPL>(kb, j);
                }
                sa = att_cap(a, gpu_seg_sum(sa));
                sb = att_cap(a, gpu_seg_sum(sb));
                if (!b_valid) sb = -INFINITY;
                float m_new = fmaxf(m[h], fmaxf(sa, sb));
                float alpha = expf(m[h] - m_new);
                float pa = expf(sa - m_new), pb = expf(sb - m_new);
                l[h] = l[h] * alpha + pa + pb;
                m[h] = m_new;
#pragma unroll
                for (int j = 0; j < DPL; j++)
                    o[h * DPL + j] = o[h * DPL + j] * alpha + pa * att_elem<KV_F16, DPL>(va, j) +
                                     pb * att_elem<KV_F16, DPL>(vb, j);
            }
        }
        ka = nka;
        kb = nkb;
        va = nva;
        vb = nvb;
    }

    /* merge the segments: block max, then rescaled sums in a fixed order */
    if (lane == 0) {
#pragma unroll
        for (int h = 0; h < GMAX; h++)
            if (h < g) {
                seg_m[seg * ATT_MAX_GROUP + h] = m[h];
                seg_l[seg * ATT_MAX_GROUP + h] = l[h];
            }
    }
    __syncthreads();
    if ((int)threadIdx.x < g) {
        float mx = -INFINITY;
        for (int s = 0; s < ATT_SEGS; s++)
            mx = fmaxf(mx, seg_m[s * ATT_MAX_GROUP + threadIdx.x]);
        blk_m[threadIdx.x] = mx;
    }
    __syncthreads();
    for (int s = 0; s < ATT_SEGS; s++) {
        if (seg == s) {
#pragma unroll
            for (int h = 0; h < GMAX; h++) {
                if (h < g) {
                    float f = m[h] == -INFINITY ? 0.0f : expf(m[h] - blk_m[h]);
#pragma unroll
                    for (int j = 0; j < DPL; j++) {
                        int d = lane * DPL + j;
                        if (d < hd) oacc[h * hd + d] += f * o[h * DPL + j];
                    }
                }
            }
        }
        __syncthreads();
    }
    if ((int)threadIdx.x < g) {
        int h = threadIdx.x, hq = kvh * g + h;
        float lsum = 0.0f;
        for (int s = 0; s < ATT_SEGS; s++) {
            float ms = seg_m[s * ATT_MAX_GROUP + h];
            if (ms != -INFINITY) lsum += seg_l[s * ATT_MAX_GROUP + h] * expf(ms - blk_m[h]);
        }
        blk_l[h] = lsum;
        a.part_m[(int64_t)hq * a.n_split_max + split] = blk_m[h];
        a.part_l[(int64_t)hq * a.n_split_max + split] = lsum;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < g * hd; i += ATT_THREADS) {
        int h = i / hd, d = i % hd;
        int hq = kvh * g + h;
        if (a.n_split_max == 1) /* the only split: normalise here, no merge kernel follows */
            a.out[(int64_t)hq * hd + d] = oacc[i] * (1.0f / blk_l[h]);
        else
            a.part_o[((int64_t)hq * a.n_split_max + split) * hd + d] = oacc[i];
    }
}

GPU_DEV float att_block_reduce(float v, float *sh32, bool is_max)
{
    int seg = threadIdx.x / GPU_SEG, lane = threadIdx.x % GPU_SEG;
    v = is_max ? gpu_seg_max(v) : gpu_seg_sum(v);
    __syncthreads();
    if (lane == 0) sh32[seg] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x / GPU_SEG) ? sh32[lane] : (is_max ? -INFINITY : 0.0f);
    return is_max ? gpu_seg_max(v) : gpu_seg_sum(v);
}

/* One block of ATT_MAX_SPLITS threads per query head: thread s owns split s's statistics; the
 * weighted sum over splits runs over (split group, dim) pairs so the loads overlap. */
__global__ void __launch_bounds__(ATT_MAX_SPLITS) k_attn_merge(const att_args a0)
{
    gpu_pdl_trigger();
    const att_args a = att_query(a0);
    __shared__ float w[ATT_MAX_SPLITS];
    __shared__ float part[ATT_MAX_SPLITS];
    __shared__ float red[32];
    const int hq = blockIdx.x, hd = a.head_dim, tid = threadIdx.x;
    const int n_split = att_splits(a).n_split;
    const float *pm = a.part_m + (int64_t)hq * a.n_split_max;
    const float *pl = a.part_l + (int64_t)hq * a.n_split_max;
    float m = tid < n_split ? pm[tid] : -INFINITY;
    float mx = att_block_reduce(m, red, true);
    float e = tid < n_split ? expf(m - mx) : 0.0f;
    float denom = att_block_reduce(tid < n_split ? e * pl[tid] : 0.0f, red, false);
    w[tid] = e / denom;
    __syncthreads();
    const int groups = ATT_MAX_SPLITS / hd; /* >= 1: hd <= 256 */
    const int grp = tid / hd, d = tid % hd;
    float num = 0.0f;
    if (grp < groups) {
        const float *po = a.part_o + (int64_t)hq * a.n_split_max * hd + d;
#pragma unroll 4
        for (int s = grp; s < n_split; s += groups)
            num += w[s] * po[(int64_t)s * hd];
    }
    part[tid] = num;
    __syncthreads();
    if (tid < hd) {
        float total = 0.0f;
        for (int g2 = 0; g2 < groups; g2++)
            total += part[g2 * hd + tid];
        a.out[(int64_t)hq * hd + tid] = total;
    }
}

/* ---- the F16-cache path with the CPU's rounding ------------------------------------------ */
/* Scores of one split for the GQA group of kv head blockIdx.y: s = (k . fp16(q)) * scale into
 * a.scores, and the split's (m, l) into part_m / part_l. Segment seg takes rows
 * start + (k ATT_SEGS + seg) R .. + R - 1 at step k (R = ATT_NV / GMAX). */
template <int DPL, int VEC, int GMAX>
__global__ void __launch_bounds__(ATT_THREADS, ATT_MINB(DPL, GMAX)) k_attn_scores(const att_args a0)
{
    gpu_pdl_trigger();
    const att_args a = att_query(a0);
    extern __shared__ float sh[];
    const int hd = a.head_dim, g = a.group;
    float *qs = sh;            /* [g][hd]: q rounded to fp16, unscaled (as the CPU) */
    float *seg_m = qs + g * hd; /* [ATT_SEGS][ATT_MAX_GROUP] */
    float *seg_l = seg_m + ATT_SEGS * ATT_MAX_GROUP;
    const int split = blockIdx.x, kvh = blockIdx.y;
    const att_range rg = att_splits(a);
    if (split >= rg.n_split) return; /* the whole block: no barrier passed yet */
    const int start = rg.lo + split * rg.split_len;
    const int end = min(start + rg.split_len, rg.n_kv);
    const int seg = threadIdx.x / GPU_SEG, lane = threadIdx.x % GPU_SEG;

    for (int i = threadIdx.x; i < g * hd; i += ATT_THREADS)
        qs[i] = gpu_fp16_to_f32(gpu_f32_to_fp16(a.q[(int64_t)(kvh * g) * hd + i]));
    __syncthreads();

    /* a step: rows t0 .. t0 + R - 1; value r GMAX + h of a lane = its part of row r's dot
     * product with head h; after the reduce-scatter the lane owns (my_r, my_h) and keeps the online
     * max m and sum l of head my_h over its rows */
    constexpr int NV = ATT_NV(DPL, GMAX), R = NV / GMAX, LPV = GPU_SEG / NV;
    const int my_r = lane / LPV / GMAX, my_h = lane / LPV % GMAX;
    float m = -INFINITY, l = 0.0f;
    float *sc = a.scores + (int64_t)(kvh * g + (my_h < g ? my_h : 0)) * a.max_kv;
    const int64_t head_off = (int64_t)kvh * a.head_stride;
    for (int t0 = start + seg * R; t0 < end; t0 += ATT_SEGS * R) {
        att_slice<1, DPL> kr[R];
#pragma unroll
        for (int r = 0; r < R; r++)
            att_load<1, DPL, VEC>(kr[r], a.k, (int64_t)(t0 + r) * a.pos_stride + head_off, lane,
                                  hd, t0 + r < end);
        float v[NV];
#pragma unroll
        for (int i = 0; i < NV; i++)
            v[i] = 0.0f;
#pragma unroll
        for (int h = 0; h < GMAX; h++) {
            if (h < g) {
#pragma unroll
                for (int j = 0; j < DPL; j++) {
                    const int d = lane * DPL + j;
                    const float qv = d < hd ? qs[h * hd + d] : 0.0f;
#pragma unroll
                    for (int r = 0; r < R; r++)
                        v[r * GMAX + h] += qv * att_elem<1, DPL>(kr[r], j);
                }
            }
        }
        float sv = gpu_seg_sum_scatter<NV>(v, lane);
        const int p = t0 + my_r;
        if (my_h < g && p < end) {
            sv = att_cap(a, sv * a.scale);
            if (lane % LPV == 0) sc[p] = sv;
            const float mn = fmaxf(m, sv);
            l = l * expf(m - mn) + expf(sv - mn);
            m = mn;
        }
    }
    /* the segment's (m, l) of each head: combine the lanes of that head's other rows (lane bits
     * from LPV GMAX up; the LPV lanes of a value hold the same) */
#pragma unroll
    for (int mask = LPV * GMAX; mask < GPU_SEG; mask *= 2) {
        {
            const float mo = gpu_shfl_xor(m, mask, GPU_SEG), lo = gpu_shfl_xor(l, mask, GPU_SEG);
            const float mn = fmaxf(m, mo);
            l = mn == -INFINITY ? 0.0f : l * expf(m - mn) + lo * expf(mo - mn);
            m = mn;
        }
    }
    if (lane % LPV == 0 && my_r == 0 && my_h < g) {
        seg_m[seg * ATT_MAX_GROUP + my_h] = m;
        seg_l[seg * ATT_MAX_GROUP + my_h] = l;
    }
    __syncthreads();
    if ((int)threadIdx.x < g) {
        int h = threadIdx.x, hq = kvh * g + h;
        float mx = -INFINITY, lsum = 0.0f;
        for (int s = 0; s < ATT_SEGS; s++)
            mx = fmaxf(mx, seg_m[s * ATT_MAX_GROUP + h]);
        for (int s = 0; s < ATT_SEGS; s++) {
            float ms = seg_m[s * ATT_MAX_GROUP + h];
            if (ms != -INFINITY) lsum += seg_l[s * ATT_MAX_GROUP + h] * expf(ms - mx);
        }
        a.part_m[(int64_t)hq * a.n_split_max + split] = mx;
        a.part_l[(int64_t)hq * a.n_split_max + split] = lsum;
    }
}

GPU_DEV float att_round_fp16(float x)
{
    return gpu_fp16_to_f32(gpu_f32_to_fp16(x));
}

/* sum p * v over one split with p = fp16(e^(s - M) * (1/S)); M, S from all splits' (m, l). */
template <int DPL, int VEC, int GMAX>
__global__ void __launch_bounds__(ATT_THREADS, ATT_MINB(DPL, GMAX)) k_attn_pv(const att_args a0)
{
    gpu_pdl_trigger();
    const att_args a = att_query(a0);
    extern __shared__ float sh[];
    const int hd = a.head_dim, g = a.group;
    float *oacc = sh;                 /* [g][hd] */
    float *head_m = oacc + g * hd;    /* [ATT_MAX_GROUP] */
    float *head_inv = head_m + ATT_MAX_GROUP;
    const int split = blockIdx.x, kvh = blockIdx.y;
    const att_range rg = att_splits(a);
    if (split >= rg.n_split) return; /* the whole block: no barrier passed yet */
    const int start = rg.lo + split * rg.split_len;
    const int end = min(start + rg.split_len, rg.n_kv);
    const int n_split = rg.n_split;
    const int seg = threadIdx.x / GPU_SEG, lane = threadIdx.x % GPU_SEG;

    /* M and S per head: one segment per head, lanes over the splits (every block of the head
     * reduces in the same order, so they agree to the bit) */
    for (int h = seg; h < g; h += ATT_SEGS) {
        const int64_t hq = kvh * g + h;
        const float *pm = a.part_m + hq * a.n_split_max, *pl = a.part_l + hq * a.n_split_max;
        float mx = -INFINITY, sum = 0.0f;
        for (int s = lane; s < n_split; s += GPU_SEG)
            mx = fmaxf(mx, pm[s]);
        mx = gpu_seg_max(mx);
        for (int s = lane; s < n_split; s += GPU_SEG) {
            float ms = pm[s];
            if (ms != -INFINITY) sum += pl[s] * expf(ms - mx);
        }
        sum = gpu_seg_sum(sum);
        if (lane == 0) {
            head_m[h] = mx;
            head_inv[h] = 1.0f / sum;
        }
    }
    for (int i = threadIdx.x; i < g * hd; i += ATT_THREADS)
        oacc[i] = 0.0f;
    __syncthreads();

    /* a step: rows t0 .. t0 + R - 1; the lane owning (row r, head h) as in k_attn_scores
     * computes its p, and every lane takes it from there */
    constexpr int NV = ATT_NV(DPL, GMAX), R = NV / GMAX, LPV = GPU_SEG / NV;
    const int my_r = lane / LPV / GMAX, my_h = lane / LPV % GMAX;
    const float my_m = my_h < g ? head_m[my_h] : 0.0f, my_inv = my_h < g ? head_inv[my_h] : 0.0f;
    const float *sc = a.scores + (int64_t)(kvh * g + (my_h < g ? my_h : 0)) * a.max_kv;
    float o[GMAX * DPL];
#pragma unroll
    for (int i = 0; i < GMAX * DPL; i++)
        o[i] = 0.0f;
    const int64_t head_off = (int64_t)kvh * a.head_stride;
    for (int t0 = start + seg * R; t0 < end; t0 += ATT_SEGS * R) { /* k_attn_scores' rows */
        att_slice<1, DPL> vr[R];
#pragma unroll
        for (int r = 0; r < R; r++)
            att_load<1, DPL, VEC>(vr[r], a.v, (int64_t)(t0 + r) * a.pos_stride + head_off, lane,
                                  hd, t0 + r < end);
        const int p = t0 + my_r;
        const float pm =
            my_h < g && p < end ? att_round_fp16(expf(sc[p] - my_m) * my_inv) : 0.0f;
#pragma unroll
        for (int r = 0; r < R; r++) {
#pragma unroll
            for (int h = 0; h < GMAX; h++) {
                if (h < g) {
                    const float pr = gpu_shfl(pm, (r * GMAX + h) * LPV, GPU_SEG);
#pragma unroll
                    for (int j = 0; j < DPL; j++)
                        o[h * DPL + j] += pr * att_elem<1, DPL>(vr[r], j);
                }
            }
        }
    }
    for (int s = 0; s < ATT_SEGS; s++) { /* the segments in a fixed order */
        if (seg == s) {
#pragma unroll
            for (int h = 0; h < GMAX; h++) {
                if (h < g) {
#pragma unroll
                    for (int j = 0; j < DPL; j++) {
                        int d = lane * DPL + j;
                        if (d < hd) oacc[h * hd + d] += o[h * DPL + j];
                    }
                }
            }
        }
        __syncthreads();
    }
    for (int i = threadIdx.x; i < g * hd; i += ATT_THREADS) {
        int h = i / hd, d = i % hd;
        int hq = kvh * g + h;
        if (a.n_split_max == 1) /* the only split: this is the output */
            a.out[(int64_t)hq * hd + d] = oacc[i];
        else
            a.part_o[((int64_t)hq * a.n_split_max + split) * hd + d] = oacc[i];
    }
}

/* out = the sum of the splits' (normalised) partial outputs, in split order. One block of
 * ATT_MAX_SPLITS threads per query head; thread groups take interleaved splits, then the
 * groups' sums are added in group order. */
__global__ void __launch_bounds__(ATT_MAX_SPLITS) k_attn_sum(const att_args a0)
{
    gpu_pdl_trigger();
    const att_args a = att_query(a0);
    __shared__ float part[ATT_MAX_SPLITS];
    const int hq = blockIdx.x, hd = a.head_dim, tid = threadIdx.x;
    const int n_split = att_splits(a).n_split;
    const int groups = ATT_MAX_SPLITS / hd; /* >= 1: hd <= 256 */
    const int grp = tid / hd, d = tid % hd;
    float num = 0.0f;
    if (grp < groups) {
        const float *po = a.part_o + (int64_t)hq * a.n_split_max * hd + d;
#pragma unroll 4
        for (int s = grp; s < n_split; s += groups)
            num += po[(int64_t)s * hd];
    }
    part[tid] = num;
    __syncthreads();
    if (tid < hd) {
        float total = 0.0f;
        for (int g2 = 0; g2 < groups; g2++)
            total += part[g2 * hd + tid];
        a.out[(int64_t)hq * hd + tid] = total;
    }
}

static int64_t max_splits(int64_t max_kv)
{
    int64_t tiles = (max_kv + ATT_T - 1) / ATT_T;
    return tiles < ATT_MAX_SPLITS ? tiles : ATT_MAX_SPLITS;
}

/* Floats of one query's scratch with ns splits: part_o, part_m, part_l, then (F16 path) the
 * scores [n_head][max_kv]. */
static size_t query_scratch_floats(int64_t n_head, int64_t head_dim, int64_t ns, int64_t max_kv,
                                   int f16)
{
    return (size_t)n_head * ((size_t)ns * (size_t)(head_dim + 2) + (f16 ? (size_t)max_kv : 0));
}

/* The worst case over the cache types: the F16 path's scores included. */
GPU_API size_t gpu_attn_scratch_bytes(int64_t n_head, int64_t head_dim, int64_t max_kv)
{
    if (n_head <= 0 || head_dim <= 0 || max_kv <= 0) return 0;
    return query_scratch_floats(n_head, head_dim, max_splits(max_kv), max_kv, 1) * sizeof(float);
}

/* The least tiles (ATT_T positions) per split: FORGE_GPU_ATTN_MIN_SPLIT positions, rounded up
 * to tiles (default 128 positions: llama2-7b Q4_0 tg128 on an H200 498 tok/s with one tile,
 * 510 with 128, 504 with 256 and 1024; llama3.2-1b 1514 / 1543 / 1563 / 1555; fixed-length
 * splits then), read once. A tuning knob for short caches: a larger value gives
 * fewer, longer splits, and a single split (no merge launch at all) once it covers max_kv. */
static int64_t min_split_tiles(void)
{
    static int cached = 0; /* 0: not read yet; a racing first read stores the same value */
    if (!cached) {
        const char *e = getenv("FORGE_GPU_ATTN_MIN_SPLIT");
        long v = e ? atol(e) : 128; /* measured on H200: 7B/1B decode at 0..640 positions */
        long t = v > ATT_T ? (v + ATT_T - 1) / ATT_T : 1;
        cached = (int)(t > (1L << 20) ? (1L << 20) : t);
    }
    return cached;
}

/* Dims per lane: the power of two >= head_dim / 32 (1..8). */
static int dims_per_lane(int64_t hd)
{
    int dpl = 1;
    while (dpl * 32 < hd)
        dpl *= 2;
    return dpl;
}

/* The kernels of one launch (split and merge, or scores, pv and sum), dispatched on the
 * compile-time shape: dims per lane, vector loads, group size rounded up to a power of two. */
template <int KV_F16, int DPL, int VEC, int GMAX>
static int launch_kernels(const att_args &a, dim3 grid, int n_q, cudaStream_t st, forge_err *err)
{
    int rc = FORGE_OK;
    const int g = a.group, hd = a.head_dim;
    const dim3 heads((unsigned)a.n_head, 1, (unsigned)n_q);
    if (!KV_F16) {
        size_t shmem =
            (size_t)(2 * g * hd + 2 * ATT_SEGS * ATT_MAX_GROUP + 2 * ATT_MAX_GROUP) * sizeof(float);
        k_attn_split<KV_F16, DPL, VEC, GMAX><<<grid, ATT_THREADS, shmem, st>>>(a);
        GPU_LAUNCH_CHECK(VEC ? "k_attn_split<F32,vec>" : "k_attn_split<F32>", st);
        if (a.n_split_max > 1) {
            k_attn_merge<<<heads, ATT_MAX_SPLITS, 0, st>>>(a);
            GPU_LAUNCH_CHECK("k_attn_merge", st);
        }
    } else {
        size_t sh_scores = (size_t)(g * hd + 2 * ATT_SEGS * ATT_MAX_GROUP) * sizeof(float);
        size_t sh_pv = (size_t)(g * hd + 2 * ATT_MAX_GROUP) * sizeof(float);
        k_attn_scores<DPL, VEC, GMAX><<<grid, ATT_THREADS, sh_scores, st>>>(a);
        GPU_LAUNCH_CHECK(VEC ? "k_attn_scores<vec>" : "k_attn_scores", st);
        k_attn_pv<DPL, VEC, GMAX><<<grid, ATT_THREADS, sh_pv, st>>>(a);
        GPU_LAUNCH_CHECK(VEC ? "k_attn_pv<vec>" : "k_attn_pv", st);
        if (a.n_split_max > 1) {
            k_attn_sum<<<heads, ATT_MAX_SPLITS, 0, st>>>(a);
            GPU_LAUNCH_CHECK("k_attn_sum", st);
        }
    }
    return FORGE_OK;
fail:
    return rc;
}

template <int KV_F16, int DPL, int GMAX>
static int launch_vec(const att_args &a, int vec, dim3 grid, int n_q, cudaStream_t st,
                      forge_err *err)
{
    if (vec) return launch_kernels<KV_F16, DPL, 1, GMAX>(a, grid, n_q, st, err);
    return launch_kernels<KV_F16, DPL, 0, GMAX>(a, grid, n_q, st, err);
}

/* GMAX * DPL <= ATT_MAX_GD (checked by the caller). */
template <int KV_F16, int DPL>
static int launch_g(const att_args &a, int vec, dim3 grid, int n_q, cudaStream_t st,
                    forge_err *err)
{
    const int g = a.group;
    if (g <= 1) return launch_vec<KV_F16, DPL, 1>(a, vec, grid, n_q, st, err);
    if (g <= 2) return launch_vec<KV_F16, DPL, 2>(a, vec, grid, n_q, st, err);
    if (g <= 4) return launch_vec<KV_F16, DPL, 4>(a, vec, grid, n_q, st, err);
    if (g <= 8 || DPL == 8) return launch_vec<KV_F16, DPL, 8>(a, vec, grid, n_q, st, err);
    return launch_vec<KV_F16, DPL, (DPL == 8 ? 8 : 16)>(a, vec, grid, n_q, st, err);
}

template <int KV_F16>
static int launch_dpl(const att_args &a, int dpl, int vec, dim3 grid, int n_q, cudaStream_t st,
                      forge_err *err)
{
    switch (dpl) {
    case 1:
        return launch_g<KV_F16, 1>(a, vec, grid, n_q, st, err);
    case 2:
        return launch_g<KV_F16, 2>(a, vec, grid, n_q, st, err);
    case 4:
        return launch_g<KV_F16, 4>(a, vec, grid, n_q, st, err);
    default:
        return launch_g<KV_F16, 8>(a, vec, grid, n_q, st, err);
    }
}

/* n_q queries (n_q = 1 with batch_scratch 0: the decode layout of gpu_attn_scratch_bytes). With
 * batch_scratch, the queries go in chunks of as many as it holds with one split each, and each
 * chunk gets as many splits as fit (the chunks run one after the other on the stream, reusing
 * the scratch). */
static int attention_impl(const gpu_attn_args *p, int64_t n_q, int64_t q_stride, int64_t out_stride,
                          size_t batch_scratch, gpu_stream *s, forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    att_args a;
    int n_sm = 0, dpl, f16, vec;
    int64_t chunk = n_q;
    if (!p || !p->d_q || !p->d_k || !p->d_v || !p->d_pos || !p->d_scratch || !p->d_out)
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_attention: NULL buffer");
    if (p->kv_type != GGML_TYPE_F32 && p->kv_type != GGML_TYPE_F16)
        return gpu_err_set(err, FORGE_E_UNSUPPORTED,
                           "gpu_attention: KV cache type %s (F32 and F16 are supported)",
                           gpu_type_name(p->kv_type));
    dpl = dims_per_lane(p->head_dim);
    if (p->n_head <= 0 || p->n_kv_head <= 0 || p->n_head % p->n_kv_head || p->head_dim <= 0 ||
        p->head_dim > ATT_MAX_HEAD_DIM || p->n_head / p->n_kv_head > ATT_MAX_GROUP ||
        (p->n_head / p->n_kv_head) * dpl > ATT_MAX_GD || p->max_kv <= 0 ||
        p->max_kv > INT32_MAX / 2 || p->n_head > 65535 || p->pos_stride < 0 || p->head_stride < 0)
        return gpu_err_set(err, FORGE_E_INVALID,
                           "gpu_attention: bad shape (n_head %lld, n_kv_head %lld, head_dim %lld, "
                           "max_kv %lld): need n_head a multiple of n_kv_head, head_dim <= %d, "
                           "group (n_head/n_kv_head) <= %d and group * ceil(head_dim/32) <= %d",
                           (long long)p->n_head, (long long)p->n_kv_head, (long long)p->head_dim,
                           (long long)p->max_kv, ATT_MAX_HEAD_DIM, ATT_MAX_GROUP, ATT_MAX_GD);
    f16 = p->kv_type == GGML_TYPE_F16;
    if (batch_scratch) {
        size_t one = query_scratch_floats(p->n_head, p->head_dim, 1, p->max_kv, f16) * 4;
        chunk = (int64_t)(batch_scratch / one);
        if (chunk < 1)
            return gpu_err_set(err, FORGE_E_INVALID,
                               "gpu_attention_batch: %zu bytes of scratch are too few for one "
                               "query of %lld heads over %lld positions (%zu bytes)",
                               batch_scratch, (long long)p->n_head, (long long)p->max_kv, one);
        if (chunk > n_q) chunk = n_q;
    }
    n_sm = gpu_sm_count();
    if (n_sm <= 0) n_sm = 64;
    a.q = p->d_q;
    a.k = p->d_k;
    a.v = p->d_v;
    a.pos_stride = p->pos_stride;
    a.head_stride = p->head_stride;
    a.n_head = (int)p->n_head;
    a.n_kv_head = (int)p->n_kv_head;
    a.head_dim = (int)p->head_dim;
    a.group = (int)(p->n_head / p->n_kv_head);
    a.max_kv = (int)p->max_kv;
    a.scale = p->scale;
    a.softcap = p->softcap > 0.0f ? p->softcap : 0.0f;
    a.inv_cap = p->softcap > 0.0f ? 1.0f / p->softcap : 0.0f;
    a.window = p->window > 0 ? p->window : 0;
    a.q_stride = q_stride;
    a.out_stride = out_stride;
    vec = a.head_dim == 32 * dpl && p->pos_stride % dpl == 0 && p->head_stride % dpl == 0 &&
          gpu_is_aligned(p->d_k, 16) && gpu_is_aligned(p->d_v, 16);
    for (int64_t q0 = 0; q0 < n_q; q0 += chunk) {
        const int64_t nq = n_q - q0 < chunk ? n_q - q0 : chunk;
        /* about 4 blocks per multiprocessor when the cache is full */
        int64_t tiles = (p->max_kv + ATT_T - 1) / ATT_T;
        int64_t want = (4 * (int64_t)n_sm + p->n_kv_head - 1) / p->n_kv_head;
        if (nq > 1) want = (want + nq - 1) / nq; /* the queries fill the machine too */
        int64_t splits = want < 1 ? 1 : want;
        if (splits > max_splits(p->max_kv)) splits = max_splits(p->max_kv);
        if (batch_scratch) {
            size_t per_q_floats = batch_scratch / 4 / (size_t)nq;
            size_t fixed = f16 ? (size_t)p->n_head * (size_t)p->max_kv : 0;
            int64_t fit = (int64_t)((per_q_floats - fixed) /
                                    ((size_t)p->n_head * (size_t)(p->head_dim + 2)));
            if (splits > fit) splits = fit; /* fit >= 1: the chunk was sized for one split */
        }
        int64_t tiles_per_split = (tiles + splits - 1) / splits;
        if (tiles_per_split < min_split_tiles()) tiles_per_split = min_split_tiles();
        a.min_tiles = (int)min_split_tiles();
        a.n_split_max = (int)((tiles + tiles_per_split - 1) / tiles_per_split);
        a.pos = p->d_pos + q0;
        a.q = p->d_q + q0 * q_stride;
        a.out = p->d_out + q0 * out_stride;
        a.part_o = (float *)p->d_scratch;
        /* decode: the layout of gpu_attn_scratch_bytes; batch: one compact region per query */
        int64_t ns = batch_scratch ? a.n_split_max : max_splits(p->max_kv);
        a.part_m = a.part_o + (size_t)a.n_head * ns * a.head_dim;
        a.part_l = a.part_m + (size_t)a.n_head * ns;
        a.scores = a.part_l + (size_t)a.n_head * ns;
        a.scr_stride = (int64_t)query_scratch_floats(a.n_head, a.head_dim, ns, a.max_kv, f16);
        dim3 grid((unsigned)a.n_split_max, (unsigned)a.n_kv_head, (unsigned)nq);
        rc = f16 ? launch_dpl<1>(a, dpl, vec, grid, (int)nq, st, err)
                 : launch_dpl<0>(a, dpl, vec, grid, (int)nq, st, err);
        if (rc) goto fail;
    }
    return FORGE_OK;
fail:
    return rc;
}

GPU_API int gpu_attention(const gpu_attn_args *p, gpu_stream *s, forge_err *err)
{
    return attention_impl(p, 1, 0, 0, 0, s, err);
}

GPU_API int gpu_attention_batch(const gpu_attn_args *p, int64_t n_q, int64_t q_stride,
                                int64_t out_stride, size_t scratch_bytes, gpu_stream *s,
                                forge_err *err)
{
    if (!p || n_q < 1 || n_q > 65535 || q_stride < 0 || out_stride < 0 || scratch_bytes == 0)
        return gpu_err_set(err, FORGE_E_INVALID,
                           "gpu_attention_batch: %lld queries, strides %lld/%lld, scratch %zu",
                           (long long)n_q, (long long)q_stride, (long long)out_stride,
                           scratch_bytes);
    return attention_impl(p, n_q, q_stride, out_stride, scratch_bytes, s, err);
}
