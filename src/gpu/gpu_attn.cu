/* gpu_attn.cu - attention for one query token over an F32/F16 KV cache (flash decoding).
 *
 * The positions are cut into splits (about 4 blocks per multiprocessor in all); one block handles
 * one (split, kv head) pair and every query head of that kv head's GQA group, so each K/V element
 * is read from memory once. A block walks its split in tiles of ATT_T = 32 positions:
 *   K tile -> shared memory (as float); scores s[h][t] = q_h . k_t (q pre-scaled), one 32-lane
 *   segment per position; online softmax per head with one lane per position (running max m,
 *   running sum l, rescale factor alpha); V tile -> shared; o[h][d] = alpha o[h][d] + sum_t p v.
 * The next tile's loads are issued (16 bytes per thread-load, into registers) before the current
 * tile is used, so memory latency overlaps the arithmetic. Each block writes its unnormalised o
 * and (m, l); a second kernel merges the splits of each head:
 *   out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s,  M = max_s m_s.
 * The number of positions, *d_pos + 1, is read on the device and the grid is sized by max_kv, so
 * a captured graph stays valid while the position grows (blocks past the end leave at once).
 * Positions past the end are never read. */
#include <math.h>

#include "gpu/gpu_common.cuh"
#include "gpu/gpu_ops.h"
#include "gpu/gpu_vendor.h"

#define ATT_T 32 /* positions per tile: one per lane in the softmax step */
#define ATT_THREADS 256
#define ATT_MAX_HEAD_DIM 256
#define ATT_MAX_GROUP_DIMS 2048 /* group * head_dim: shared memory and accumulators */
#define ATT_MAX_SPLITS 256
#define ATT_DPL (ATT_MAX_HEAD_DIM / GPU_SEG)                   /* head dims per lane */
#define ATT_ITEMS (ATT_MAX_GROUP_DIMS / ATT_THREADS)           /* accumulators per thread */

struct att_args {
    const float *q;
    const void *k, *v;
    int64_t pos_stride, head_stride;
    int n_head, n_kv_head, head_dim, group;
    const int32_t *pos;
    int max_kv, split_len, n_split_max;
    int ld;  /* row stride of the shared K/V tile: round_up(head_dim, 32) + tpp (no bank conflicts) */
    int tpp; /* threads per (head, position) score */
    float scale;
    float *part_o; /* [n_head][n_split_max][head_dim] */
    float *part_m; /* [n_head][n_split_max] */
    float *part_l; /* [n_head][n_split_max] */
    float *out;
};

GPU_DEV int att_n_kv(const att_args &a)
{
    int n = a.pos[0] + 1;
    return n < 1 ? 1 : (n > a.max_kv ? a.max_kv : n);
}

/* 16-byte pieces of one tile held by each thread: ATT_T * head_dim * element size / 16 pieces
 * spread over the block. */
template <int KV_F16>
struct att_tile_regs {
    enum { EPC = KV_F16 ? 8 : 4 }; /* elements per 16-byte piece */
    enum { N = (ATT_T * ATT_MAX_HEAD_DIM / EPC + ATT_THREADS - 1) / ATT_THREADS };
    uint4 r[N];
};

/* Issue the loads of tile [t0, t0 + ATT_T) (positions >= end read as zero). VEC: 16-byte loads,
 * which need head_dim, the strides and the base aligned to a piece. */
template <int KV_F16, int VEC>
GPU_DEVT void att_tile_load(att_tile_regs<KV_F16> &regs, const void *base, const att_args &a,
                            int kvh, int t0, int end)
{
    if (!VEC) return;
    const int epc = att_tile_regs<KV_F16>::EPC;
    const int per_row = a.head_dim / epc;
    const int n_pieces = ATT_T * per_row;
#pragma unroll
    for (int k = 0; k < att_tile_regs<KV_F16>::N; k++) {
        int c = threadIdx.x + k * ATT_THREADS;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (c < n_pieces) {
            int t = c / per_row, dc = c % per_row;
            if (t0 + t < end) {
                int64_t off = (int64_t)(t0 + t) * a.pos_stride + (int64_t)kvh * a.head_stride +
                              (int64_t)dc * epc;
                const unsigned char *p = (const unsigned char *)base + off * (KV_F16 ? 2 : 4);
                v = gpu_ld_stream16((const uint4 *)p);
            }
        }
        regs.r[k] = v;
    }
}

/* Write a tile to shared memory as floats: from the registers (VEC) or straight from memory. */
template <int KV_F16, int VEC>
GPU_DEVT void att_tile_store(const att_tile_regs<KV_F16> &regs, float *tile, const void *base,
                             const att_args &a, int kvh, int t0, int end)
{
    const int hd = a.head_dim;
    (void)hd;
    if (VEC) {
        const int epc = att_tile_regs<KV_F16>::EPC;
        const int per_row = hd / epc;
        const int n_pieces = ATT_T * per_row;
#pragma unroll
        for (int k = 0; k < att_tile_regs<KV_F16>::N; k++) {
            int c = threadIdx.x + k * ATT_THREADS;
            if (c < n_pieces) {
                float *dst = tile + (c / per_row) * a.ld + (c % per_row) * epc;
                uint4 v = regs.r[k];
                unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    if (KV_F16) {
                        dst[2 * i] = gpu_fp16_to_f32((unsigned short)(w[i] & 0xffffu));
                        dst[2 * i + 1] = gpu_fp16_to_f32((unsigned short)(w[i] >> 16));
                    } else {
                        dst[i] = __uint_as_float(w[i]);
                    }
                }
            }
        }
    } else {
        for (int e = threadIdx.x; e < ATT_T * hd; e += ATT_THREADS) {
            int t = e / hd, d = e % hd;
            float v = 0.0f;
            if (t0 + t < end) {
                int64_t i = (int64_t)(t0 + t) * a.pos_stride + (int64_t)kvh * a.head_stride + d;
                v = KV_F16 ? gpu_fp16_to_f32(((const unsigned short *)base)[i])
                           : ((const float *)base)[i];
            }
            tile[t * a.ld + d] = v;
        }
    }
}

template <int KV_F16, int VEC>
__global__ void __launch_bounds__(ATT_THREADS) k_attn_split(const att_args a)
{
    extern __shared__ float sh[];
    const int hd = a.head_dim, g = a.group;
    float *tile = sh;                 /* [ATT_T][ld] */
    float *qs = tile + ATT_T * a.ld;  /* [g][hd] */
    float *ps = qs + g * hd;          /* [g][ATT_T] scores, then probabilities */
    float *m_run = ps + g * ATT_T;    /* [g] */
    float *l_run = m_run + g;         /* [g] */
    float *alpha = l_run + g;         /* [g] */
    const int split = blockIdx.x, kvh = blockIdx.y;
    const int n_kv = att_n_kv(a);
    const int start = split * a.split_len;
    if (start >= n_kv) return; /* the whole block: no barrier passed yet */
    const int end = min(start + a.split_len, n_kv);
    const int seg = threadIdx.x / GPU_SEG, lane = threadIdx.x % GPU_SEG;
    const int n_seg = ATT_THREADS / GPU_SEG;

    for (int i = threadIdx.x; i < g * hd; i += ATT_THREADS)
        qs[i] = a.q[(int64_t)(kvh * g) * hd + i] * a.scale;
    for (int h = threadIdx.x; h < g; h += ATT_THREADS) {
        m_run[h] = -INFINITY;
        l_run[h] = 0.0f;
    }
    float acc[ATT_ITEMS];
#pragma unroll
    for (int k = 0; k < ATT_ITEMS; k++) acc[k] = 0.0f;

    att_tile_regs<KV_F16> kreg, vreg;
    att_tile_load<KV_F16, VEC>(kreg, a.k, a, kvh, start, end);
    for (int t0 = start; t0 < end; t0 += ATT_T) {
        __syncthreads(); /* the previous tile's readers are done with `tile` */
        att_tile_store<KV_F16, VEC>(kreg, tile, a.k, a, kvh, t0, end);
        att_tile_load<KV_F16, VEC>(vreg, a.v, a, kvh, t0, end);
        __syncthreads();

        /* scores: tpp adjacent lanes per (head, position), interleaved over the dims */
        {
            const int tpp = a.tpp, sub = threadIdx.x % tpp, n_pairs = g * ATT_T;
            for (int pair = threadIdx.x / tpp; pair < n_pairs; pair += ATT_THREADS / tpp) {
                const int h = pair / ATT_T, t = pair % ATT_T;
                const float *kr = tile + t * a.ld, *qr = qs + h * hd;
                float s0 = 0.0f, s1 = 0.0f;
                int d = sub;
                for (; d + tpp < hd; d += 2 * tpp) {
                    s0 += kr[d] * qr[d];
                    s1 += kr[d + tpp] * qr[d + tpp];
                }
                if (d < hd) s0 += kr[d] * qr[d];
                float sc = s0 + s1;
                for (int m = tpp / 2; m > 0; m >>= 1) sc += gpu_shfl_xor(sc, m, tpp);
                if (sub == 0) ps[h * ATT_T + t] = t0 + t < end ? sc : -INFINITY;
            }
        }
        __syncthreads();

        /* online softmax: one segment per head, one lane per position */
        for (int h = seg; h < g; h += n_seg) {
            float s = ps[h * ATT_T + lane];
            float m_new = fmaxf(m_run[h], gpu_seg_max(s));
            float p = expf(s - m_new);
            float l_tile = gpu_seg_sum(p);
            ps[h * ATT_T + lane] = p;
            if (lane == 0) {
                float al = expf(m_run[h] - m_new);
                alpha[h] = al;
                l_run[h] = l_run[h] * al + l_tile;
                m_run[h] = m_new;
            }
        }
        __syncthreads();

        att_tile_store<KV_F16, VEC>(vreg, tile, a.v, a, kvh, t0, end);
        if (t0 + ATT_T < end) att_tile_load<KV_F16, VEC>(kreg, a.k, a, kvh, t0 + ATT_T, end);
        __syncthreads();

        /* o = alpha o + p . V */
#pragma unroll
        for (int k = 0; k < ATT_ITEMS; k++) {
            int item = threadIdx.x + k * ATT_THREADS;
            if (item < g * hd) {
                int h = item / hd, d = item % hd;
                const float *p = ps + h * ATT_T;
                float o = acc[k] * alpha[h];
#pragma unroll 8
                for (int t = 0; t < ATT_T; t++) o += p[t] * tile[t * a.ld + d];
                acc[k] = o;
            }
        }
    }

#pragma unroll
    for (int k = 0; k < ATT_ITEMS; k++) {
        int item = threadIdx.x + k * ATT_THREADS;
        if (item < g * hd) {
            int h = item / hd, d = item % hd;
            int hq = kvh * g + h;
            a.part_o[((int64_t)hq * a.n_split_max + split) * hd + d] = acc[k];
        }
    }
    for (int h = threadIdx.x; h < g; h += ATT_THREADS) {
        int hq = kvh * g + h;
        a.part_m[(int64_t)hq * a.n_split_max + split] = m_run[h];
        a.part_l[(int64_t)hq * a.n_split_max + split] = l_run[h];
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
__global__ void __launch_bounds__(ATT_MAX_SPLITS) k_attn_merge(const att_args a)
{
    __shared__ float w[ATT_MAX_SPLITS];
    __shared__ float part[ATT_MAX_SPLITS];
    __shared__ float red[32];
    const int hq = blockIdx.x, hd = a.head_dim, tid = threadIdx.x;
    const int n_kv = att_n_kv(a);
    const int n_split = (n_kv + a.split_len - 1) / a.split_len;
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
        for (int s = grp; s < n_split; s += groups) num += w[s] * po[(int64_t)s * hd];
    }
    part[tid] = num;
    __syncthreads();
    if (tid < hd) {
        float total = 0.0f;
        for (int g2 = 0; g2 < groups; g2++) total += part[g2 * hd + tid];
        a.out[(int64_t)hq * hd + tid] = total;
    }
}

static int64_t max_splits(int64_t max_kv)
{
    int64_t tiles = (max_kv + ATT_T - 1) / ATT_T;
    return tiles < ATT_MAX_SPLITS ? tiles : ATT_MAX_SPLITS;
}

GPU_API size_t gpu_attn_scratch_bytes(int64_t n_head, int64_t head_dim, int64_t max_kv)
{
    if (n_head <= 0 || head_dim <= 0 || max_kv <= 0) return 0;
    return (size_t)n_head * (size_t)max_splits(max_kv) * (size_t)(head_dim + 2) * sizeof(float);
}

template <int KV_F16, int VEC>
static int launch_split(const att_args &a, dim3 grid, size_t shmem, cudaStream_t st,
                        const char *name, forge_err *err)
{
    int rc = FORGE_OK;
    k_attn_split<KV_F16, VEC><<<grid, ATT_THREADS, shmem, st>>>(a);
    GPU_LAUNCH_CHECK(name, st);
    return FORGE_OK;
fail:
    return rc;
}

GPU_API int gpu_attention(const gpu_attn_args *p, gpu_stream *s, forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    att_args a;
    int n_sm = 0;
    if (!p || !p->d_q || !p->d_k || !p->d_v || !p->d_pos || !p->d_scratch || !p->d_out)
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_attention: NULL buffer");
    if (p->kv_type != GGML_TYPE_F32 && p->kv_type != GGML_TYPE_F16)
        return gpu_err_set(err, FORGE_E_UNSUPPORTED,
                           "gpu_attention: KV cache type %s (F32 and F16 are supported)",
                           gpu_type_name(p->kv_type));
    if (p->n_head <= 0 || p->n_kv_head <= 0 || p->n_head % p->n_kv_head || p->head_dim <= 0 ||
        p->head_dim > ATT_MAX_HEAD_DIM ||
        (p->n_head / p->n_kv_head) * p->head_dim > ATT_MAX_GROUP_DIMS || p->max_kv <= 0 ||
        p->max_kv > INT32_MAX / 2 || p->n_head > 65535 || p->pos_stride < 0 || p->head_stride < 0)
        return gpu_err_set(err, FORGE_E_INVALID,
                           "gpu_attention: bad shape (n_head %lld, n_kv_head %lld, head_dim %lld, "
                           "max_kv %lld): need n_head a multiple of n_kv_head, head_dim <= %d and "
                           "group (n_head/n_kv_head) * head_dim <= %d",
                           (long long)p->n_head, (long long)p->n_kv_head, (long long)p->head_dim,
                           (long long)p->max_kv, ATT_MAX_HEAD_DIM, ATT_MAX_GROUP_DIMS);
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
    a.pos = p->d_pos;
    a.max_kv = (int)p->max_kv;
    {
        /* about 4 blocks per multiprocessor when the cache is full */
        int64_t tiles = (p->max_kv + ATT_T - 1) / ATT_T;
        int64_t want = (4 * (int64_t)n_sm + p->n_kv_head - 1) / p->n_kv_head;
        int64_t splits = want < 1 ? 1 : want;
        if (splits > max_splits(p->max_kv)) splits = max_splits(p->max_kv);
        int64_t tiles_per_split = (tiles + splits - 1) / splits;
        a.split_len = (int)(tiles_per_split * ATT_T);
        a.n_split_max = (int)((tiles + tiles_per_split - 1) / tiles_per_split);
    }
    {
        int pairs = a.group * ATT_T;
        a.tpp = pairs >= ATT_THREADS ? 1 : (ATT_THREADS / pairs >= 8 ? 8 : ATT_THREADS / pairs);
        if (a.tpp == 3) a.tpp = 2;
        if (a.tpp > 4 && a.tpp < 8) a.tpp = 4;
        a.ld = (int)gpu_round_up((size_t)a.head_dim, 32) + a.tpp;
    }
    a.scale = p->scale;
    a.part_o = (float *)p->d_scratch;
    a.part_m = a.part_o + (size_t)a.n_head * max_splits(p->max_kv) * a.head_dim;
    a.part_l = a.part_m + (size_t)a.n_head * max_splits(p->max_kv);
    a.out = p->d_out;
    {
        dim3 grid((unsigned)a.n_split_max, (unsigned)a.n_kv_head);
        int g = a.group, hd = a.head_dim;
        size_t shmem = (size_t)(ATT_T * a.ld + g * hd + g * ATT_T + 3 * g) * sizeof(float);
        int f16 = p->kv_type == GGML_TYPE_F16;
        int epc = f16 ? 8 : 4;
        int vec = hd % epc == 0 && p->pos_stride % epc == 0 && p->head_stride % epc == 0 &&
                  gpu_is_aligned(p->d_k, 16) && gpu_is_aligned(p->d_v, 16);
        if (f16 && vec)
            rc = launch_split<1, 1>(a, grid, shmem, st, "k_attn_split<F16,vec>", err);
        else if (f16)
            rc = launch_split<1, 0>(a, grid, shmem, st, "k_attn_split<F16>", err);
        else if (vec)
            rc = launch_split<0, 1>(a, grid, shmem, st, "k_attn_split<F32,vec>", err);
        else
            rc = launch_split<0, 0>(a, grid, shmem, st, "k_attn_split<F32>", err);
        if (rc) goto fail;
        k_attn_merge<<<(unsigned)a.n_head, ATT_MAX_SPLITS, 0, st>>>(a);
        GPU_LAUNCH_CHECK("k_attn_merge", st);
    }
    return FORGE_OK;
fail:
    return rc;
}
