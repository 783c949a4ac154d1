/* gpu_mmq.cu - matrix products of Q8_0/Q4_0 weights with many activation rows on the int8
 * tensor cores ("MMQ"): Y[t][r] = sum_k W[r][k] X[t][k] for n_tok rows t (decode batches of
 * 16..512 rows, prompt chunks), reading the weights in the device layout (gpu_ops.h) and the
 * activations as gpu_act_quantize left them. Owns gpu_mmq and gpu_mmq_supported only; it reads
 * the layouts that gpu_matvec.cu defines and must follow them if they change.
 *
 * Numerics: those of the matvec kernels. Per 32-element block b the integer dot product
 * s_b = sum_j q_w[j] q_x[j] (Q4_0: q_w = nibble - 8) is exact; the result is
 * sum_b (d_w[b] * d_x[b]) * s_b in fp32, summed over b in ascending order by one thread, or,
 * where the configuration splits k over WK groups of warps, over each group's blocks in ascending
 * order and the WK partial sums added in group order; so the result is deterministic (no
 * atomics) and differs from gpu_matvec only by the float summation order.
 *
 * Kernel design (k_mmq):
 *   - A block computes a BM (weight rows) x BN (tokens) tile of Y with WM x WN warps; a warp
 *     owns TM = BM/WM rows x TN = BN/WN tokens, i.e. FM = TM/16 x FN = TN/8 fragments of
 *     mma.sync.m16n8k32.row.col.s32.s8.s8.s32 (A = 16 weight rows x 32 k, B = 32 k x 8
 *     tokens: one quant block per mma).
 *   - The k dimension runs in stages of KB quant blocks (KB*32 elements). Each stage's weight
 *     quants, activation quants, weight scales (fp16) and activation scales (fp32) go to shared
 *     memory by cp.async (16-byte copies for the quants, 4-byte for the scales), STAGES deep: the
 *     copies of stage k + STAGES-1 are in flight while stage k is multiplied (STAGES: 3..8,
 *     as many as fit 96 KB). Rows >= n_out and tokens >= n_tok are zero-filled by the copies
 *     (source size 0); blocks past n_in in the last stage are neither copied nor multiplied.
 *   - Shared rows are padded by 16 bytes so that a row stride is an odd number of 16-byte units:
 *     the 8 row addresses of one ldmatrix phase then hit 8 different bank groups.
 *   - Fragments come from shared memory by ldmatrix (8x8 b16 matrices, i.e. 8 rows x 16 bytes;
 *     lane l receives 32-bit word l%4 of row l/4 of each matrix), which is exactly the s8
 *     fragment layout of the PTX ISA for m16n8k32 (groupID g = lane/4, tig = lane%4):
 *       A: a0 = row g, k 4tig..4tig+3; a1 = row g+8, same k; a2 = row g, k 16+4tig..;
 *          a3 = row g+8, k 16+4tig..
 *          Q8_0: ldmatrix.x4 of (rows 0-7 | 8-15) x (bytes 0-15 | 16-31) of the block.
 *          Q4_0: ldmatrix.x2 of rows 0-7 | 8-15 of the 16-byte block gives w0 (row g) and w1
 *          (row g+8), word tig = bytes 4tig..4tig+3 = elements 4tig.. (low nibbles) and
 *          16+4tig.. (high nibbles): a0 = lo(w0), a1 = lo(w1), a2 = hi(w0), a3 = hi(w1), each
 *          byte minus 8 (gpu_nib_s8, gpu_mma.cuh).
 *       B: b0 = token g, k 4tig..4tig+3; b1 = token g, k 16+4tig..: ldmatrix of 8 token rows
 *          x bytes 0-15 and 16-31 (x4: two n8 fragments at once).
 *       D: d0 = (row g, token 2tig), d1 = (row g, token 2tig+1), d2/d3 = the same for row g+8.
 *   - Integer to float without a conversion instruction: the mma's C operand is 0x4B400000
 *     (the float 1.5 * 2^23), so D = s + 0x4B400000 is the bit pattern of the float
 *     1.5 * 2^23 + s (|s| <= 32 * 127 * 127 < 2^22), and as_float(D) - 1.5 * 2^23 is s exactly.
 *     Then acc += (d_w * d_x) * s per element, as the matvec does per block.
 *   - Weight scales: the stage's KB fp16 scales of a row start at an odd half-index when
 *     n_in/32 and the row are odd, so they are copied as the KB/2 + 1 aligned 32-bit words that
 *     cover them (the last one shortened to 2 bytes at the end of the plane) and read at offset
 *     (row * n_in/32) & 1.
 *   - The k split (WK > 1): warp w of a block is warp w % (WM * WN) of the tile in k-group
 *     w / (WM * WN), which multiplies blocks [k * KB/WK, (k + 1) * KB/WK) of every stage
 *     (k its group); after the loop groups 1.. leave their accumulators in shared memory and
 *     group 0 adds them.
 *   - Tiles: chosen per call from a few configurations (mmq_pick): tokens per block 16, 32 or
 *     64 (the smallest that holds n_tok, or 64), then the largest row tile whose grid fills
 *     about all multiprocessors; shapes too small for that take the most blocks; then the
 *     largest k split that keeps the grid within MMQ_WARPS_PER_SM warps a multiprocessor. The
 *     grid's x is the token tile, so the blocks that share weight rows run together and read the
 *     rows once from DRAM (the rest from L2).
 * HIP: no mma/ldmatrix/cp.async in Debian's clang-15 toolchain for AMD: gpu_mmq_supported is 0 and
 * gpu_mmq returns FORGE_E_UNSUPPORTED (the caller keeps its other path). */
#include <stdlib.h>
#include <string.h>

#include "gpu/gpu_common.cuh"
#include "gpu/gpu_mma.cuh"
#include "gpu/gpu_ops.h"
#include "gpu/gpu_vendor.h"

#define QK 32

#if !FORGE_GPU_HIP

static int mmq_is_type(int wtype)
{
    return wtype == GGML_TYPE_Q8_0 || wtype == GGML_TYPE_Q4_0;
}

#define MMQ_SMEM_TARGET (96 * 1024)

/* Shared-memory geometry of one configuration (see the header comment). */
template <int WT, int BM, int BN, int WM, int WN, int WK> struct mmq_geom {
    enum {
        NT = WM * WN * WK * 32,
        TM = BM / WM,
        TN = BN / WN,
        FM = TM / 16,
        FN = TN / 8,
        QB = WT == GGML_TYPE_Q4_0 ? 16 : 32, /* quant bytes per block */
        KB = BN >= 64 ? 4 : 8,               /* blocks per stage: 8 for the memory-bound tiles */
        WQ_LD = KB * QB + 16, /* bytes per weight row of a stage (padded: odd 16-byte units) */
        XQ_LD = KB * 32 + 16, /* bytes per token row */
        SW = KB / 2 + 1,      /* 32-bit words of fp16 weight scales per row */
        WQ_OFF = 0,
        XQ_OFF = WQ_OFF + BM * WQ_LD,
        WD_OFF = XQ_OFF + BN * XQ_LD,
        XD_OFF = WD_OFF + (BM * SW * 4 + 15) / 16 * 16,
        STAGE_BYTES = XD_OFF + (KB * BN * 4 + 15) / 16 * 16,
        /* as many stages as fit 96 KB (2..8): two blocks per SM on sm_90, one on sm_86/89
         * (99 KB); the small memory-bound tiles get deep pipelines (more bytes in flight) */
        STAGES = MMQ_SMEM_TARGET / STAGE_BYTES < 2   ? 2
                 : MMQ_SMEM_TARGET / STAGE_BYTES > 8 ? 8
                                                     : MMQ_SMEM_TARGET / STAGE_BYTES,
        SMEM = STAGES * STAGE_BYTES,
        KPG = KB / WK,                      /* blocks of a stage per k-group */
        RED_BYTES = (WK - 1) * BM * BN * 4, /* the k-groups' partial tiles, after the loop */
    };
    static_assert(TM % 16 == 0 && TN % 8 == 0, "warp tile must be whole fragments");
    static_assert(KB % WK == 0, "a stage's blocks split evenly over the k-groups");
    static_assert(RED_BYTES <= SMEM, "the partial tiles fit the stages' shared memory");
    static_assert(WQ_LD % 32 == 16 && XQ_LD % 32 == 16, "row strides: odd 16-byte units");
};

struct mmq_args {
    const uint8_t *wq;        /* quants plane */
    const unsigned short *wd; /* fp16 scales plane, [n_out][nb] */
    const int8_t *xq;         /* [n_tok][n_in] */
    const float *xd;          /* [n_tok][nb] */
    float *y;                 /* y[t * y_stride + r] */
    int64_t y_stride;
    int64_t wd_halves; /* n_out * nb: the scales plane's length */
    int n_out, n_in, n_tok, nb;
    size_t w_row_bytes; /* quants plane bytes per row */
    float beta;
};

/* ---- stage loader --------------------------------------------------------------------------- */
/* Copies of k-stage kt (blocks kb0 .. kb0+nv-1) of the block's rows and tokens into `stage`. */
template <int WT, int BM, int BN, int WM, int WN, int WK>
GPU_DEVT void mmq_load_stage(const mmq_args &a, uint8_t *stage, int kt, int row0, int tok0)
{
    typedef mmq_geom<WT, BM, BN, WM, WN, WK> G;
    const int tid = threadIdx.x;
    const int kb0 = kt * G::KB;
    const int nv = min((int)G::KB, a.nb - kb0);

    /* weight quants: CPR 16-byte chunks per row; consecutive threads take consecutive chunks */
    {
        constexpr int CPR = G::KB * G::QB / 16, N = BM * CPR;
        const int vc = nv * G::QB / 16;
#pragma unroll
        for (int it = 0; it < (N + G::NT - 1) / G::NT; it++) {
            const int i = tid + it * G::NT;
            const int r = i / CPR, c = i % CPR;
            if (i < N && c < vc) {
                const int row = row0 + r;
                const bool ok = row < a.n_out;
                const uint8_t *src =
                    a.wq + (ok ? (size_t)row * a.w_row_bytes + (size_t)kb0 * G::QB + c * 16 : 0);
                gpu_cp16(stage + G::WQ_OFF + r * G::WQ_LD + c * 16, src, ok ? 16 : 0);
            }
        }
    }
    /* activation quants: 2 chunks per block per token */
    {
        constexpr int CPT = G::KB * 2, N = BN * CPT;
        const int vc = nv * 2;
#pragma unroll
        for (int it = 0; it < (N + G::NT - 1) / G::NT; it++) {
            const int i = tid + it * G::NT;
            const int t = i / CPT, c = i % CPT;
            if (i < N && c < vc) {
                const int tok = tok0 + t;
                const bool ok = tok < a.n_tok;
                const int8_t *src =
                    a.xq + (ok ? (size_t)tok * a.n_in + (size_t)kb0 * QK + c * 16 : 0);
                gpu_cp16(stage + G::XQ_OFF + t * G::XQ_LD + c * 16, src, ok ? 16 : 0);
            }
        }
    }
    /* weight scales: the aligned words covering halves h0 .. h0+nv-1 of the plane, h0 = the
     * row's first block of the stage; a word past the plane's end is cut to its first half */
    {
        constexpr int N = BM * G::SW;
#pragma unroll
        for (int it = 0; it < (N + G::NT - 1) / G::NT; it++) {
            const int i = tid + it * G::NT;
            const int r = i / G::SW, j = i % G::SW;
            const int row = row0 + r;
            if (i < N && row < a.n_out) {
                const int64_t h0 = (int64_t)row * a.nb + kb0;
                const int64_t w = (h0 >> 1) + j;
                if (2 * w <= h0 + nv - 1)
                    gpu_cp4(stage + G::WD_OFF + (r * G::SW + j) * 4, a.wd + 2 * w,
                            2 * w + 1 < a.wd_halves ? 4 : 2);
            }
        }
    }
    /* activation scales, stored [block][token] so that a lane's two tokens are adjacent */
    {
        constexpr int N = BN * G::KB;
#pragma unroll
        for (int it = 0; it < (N + G::NT - 1) / G::NT; it++) {
            const int i = tid + it * G::NT;
            const int t = i / G::KB, kb = i % G::KB;
            if (i < N && kb < nv) {
                const int tok = tok0 + t;
                const bool ok = tok < a.n_tok;
                const float *src = a.xd + (ok ? (size_t)tok * a.nb + kb0 + kb : 0);
                gpu_cp4(stage + G::XD_OFF + (kb * BN + t) * 4, src, ok ? 4 : 0);
            }
        }
    }
}

/* ---- the kernel ----------------------------------------------------------------------------- */
/* grid (token tiles, row tiles); G::NT threads; G::SMEM bytes of dynamic shared memory. */
template <int WT, int BM, int BN, int WM, int WN, int WK>
__global__ void __launch_bounds__(WM *WN *WK * 32) k_mmq(const mmq_args a)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap(); /* never launched: the library is built for sm_80+ only */
#else
    typedef mmq_geom<WT, BM, BN, WM, WN, WK> G;
    constexpr int FM = G::FM, FN = G::FN, KB = G::KB, STAGES = G::STAGES;
    extern __shared__ __align__(16) uint8_t mmq_smem_buf[];

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32 % (WM * WN);
    const int wk = threadIdx.x / 32 / (WM * WN); /* the warp's k-group */
    const int g = lane / 4, tig = lane % 4;
    const int wr0 = (warp % WM) * G::TM; /* the warp's first row in the tile */
    const int wt0 = (warp / WM) * G::TN; /* its first token */
    const int tok0 = blockIdx.x * BN, row0 = blockIdx.y * BM;
    const int n_kt = (a.nb + KB - 1) / KB;

    /* per-lane ldmatrix offsets within a stage (see the header comment for the matrices) */
    const int a_off =
        G::WQ_OFF + (wr0 + (lane & 15)) * G::WQ_LD + (WT == GGML_TYPE_Q8_0 ? (lane >> 4) * 16 : 0);
    const int b_off = FN % 2 == 0
                          ? G::XQ_OFF + (wt0 + (lane & 7) + ((lane >> 4) << 3)) * G::XQ_LD +
                                ((lane >> 3) & 1) * 16
                          : G::XQ_OFF + (wt0 + (lane & 7)) * G::XQ_LD + ((lane >> 3) & 1) * 16;
    /* parity of the first scale half of row (wr0 + fm*16 + g) (same for row + 8) */
    int wpar[FM];
#pragma unroll
    for (int fm = 0; fm < FM; fm++)
        wpar[fm] = (row0 + wr0 + fm * 16 + g) & a.nb & 1;

    float acc[FM][FN][4] = {};

    /* prologue: stages 0 .. STAGES-2 in flight (one commit group each, empty past the end so
     * that the group count stays uniform) */
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < n_kt)
            mmq_load_stage<WT, BM, BN, WM, WN, WK>(a, mmq_smem_buf + s * G::STAGE_BYTES, s, row0,
                                                   tok0);
        gpu_cp_commit();
    }

    for (int kt = 0; kt < n_kt; kt++) {
        /* stage kt has landed (at most STAGES-2 younger groups pending), and after the barrier
         * every thread's copies are visible and every warp is done with stage kt-1, whose
         * buffer the next copies overwrite */
        gpu_cp_wait<STAGES - 2>();
        __syncthreads();
        {
            const int next = kt + STAGES - 1;
            if (next < n_kt)
                mmq_load_stage<WT, BM, BN, WM, WN, WK>(
                    a, mmq_smem_buf + (next % STAGES) * G::STAGE_BYTES, next, row0, tok0);
            gpu_cp_commit();
        }

        const uint8_t *stage = mmq_smem_buf + (kt % STAGES) * G::STAGE_BYTES;
        const unsigned short *swd = (const unsigned short *)(stage + G::WD_OFF);
        const float *sxd = (const float *)(stage + G::XD_OFF);
        const int nv = min(KB, a.nb - kt * KB); /* the same for the whole block */
#pragma unroll
        for (int kb = wk * G::KPG; kb < (wk + 1) * G::KPG; kb++) {
            if (kb >= nv) break;
            unsigned af[FM][4];
#pragma unroll
            for (int fm = 0; fm < FM; fm++) {
                const uint8_t *p = stage + a_off + fm * 16 * G::WQ_LD + kb * G::QB;
                if (WT == GGML_TYPE_Q8_0) {
                    gpu_ldsm_x4(af[fm], p);
                } else {
                    unsigned w0, w1;
                    gpu_ldsm_x2(w0, w1, p);
                    af[fm][0] = gpu_nib_s8(w0 & 0x0f0f0f0fu);
                    af[fm][1] = gpu_nib_s8(w1 & 0x0f0f0f0fu);
                    af[fm][2] = gpu_nib_s8((w0 >> 4) & 0x0f0f0f0fu);
                    af[fm][3] = gpu_nib_s8((w1 >> 4) & 0x0f0f0f0fu);
                }
            }
            unsigned bf[FN][2];
#pragma unroll
            for (int fn = 0; fn + 1 < FN; fn += 2) {
                unsigned r[4];
                gpu_ldsm_x4(r, stage + b_off + fn * 8 * G::XQ_LD + kb * 32);
                bf[fn][0] = r[0];
                bf[fn][1] = r[1];
                bf[fn + 1][0] = r[2];
                bf[fn + 1][1] = r[3];
            }
            if (FN % 2)
                gpu_ldsm_x2(bf[FN - 1][0], bf[FN - 1][1],
                            stage + b_off + (FN - 1) * 8 * G::XQ_LD + kb * 32);

            float dw[FM][2];
#pragma unroll
            for (int fm = 0; fm < FM; fm++) {
                const int r = wr0 + fm * 16 + g;
                dw[fm][0] = gpu_fp16_to_f32(swd[r * 2 * G::SW + wpar[fm] + kb]);
                dw[fm][1] = gpu_fp16_to_f32(swd[(r + 8) * 2 * G::SW + wpar[fm] + kb]);
            }
            float2 dx[FN];
#pragma unroll
            for (int fn = 0; fn < FN; fn++)
                dx[fn] = *(const float2 *)(sxd + kb * BN + wt0 + fn * 8 + 2 * tig);

#pragma unroll
            for (int fm = 0; fm < FM; fm++)
#pragma unroll
                for (int fn = 0; fn < FN; fn++) {
                    int d[4];
                    gpu_mma_k32(d, af[fm], bf[fn][0], bf[fn][1]);
                    acc[fm][fn][0] += (dw[fm][0] * dx[fn].x) * gpu_mma_float(d[0]);
                    acc[fm][fn][1] += (dw[fm][0] * dx[fn].y) * gpu_mma_float(d[1]);
                    acc[fm][fn][2] += (dw[fm][1] * dx[fn].x) * gpu_mma_float(d[2]);
                    acc[fm][fn][3] += (dw[fm][1] * dx[fn].y) * gpu_mma_float(d[3]);
                }
        }
    }
    gpu_cp_wait<0>(); /* no copy outlives the block (the tail groups are empty anyway) */

    /* k-groups 1..WK-1 hand their partial tiles to group 0 through the stages' memory, which
     * group 0 adds in group order: a fixed order, whatever the grid */
    if (WK > 1) {
        float *red = (float *)(void *)mmq_smem_buf;
        /* where group k >= 1 leaves this lane's accumulator (fm, fn, i) */
        const auto red_at = [&](int k, int fm, int fn, int i) -> float & {
            return red[(((k - 1) * WM * WN + warp) * (FM * FN * 4) + (fm * FN + fn) * 4 + i) * 32 +
                       lane];
        };
        /* f(fm, fn, i) for every accumulator of the lane */
        const auto each_acc = [&](auto f) {
#pragma unroll
            for (int fm = 0; fm < FM; fm++)
#pragma unroll
                for (int fn = 0; fn < FN; fn++)
#pragma unroll
                    for (int i = 0; i < 4; i++)
                        f(fm, fn, i);
        };
        __syncthreads(); /* every warp is done reading the last stage */
        if (wk > 0)
            each_acc([&](int fm, int fn, int i) { red_at(wk, fm, fn, i) = acc[fm][fn][i]; });
        __syncthreads();
        if (wk > 0) return;
#pragma unroll
        for (int k = 1; k < WK; k++)
            each_acc([&](int fm, int fn, int i) { acc[fm][fn][i] += red_at(k, fm, fn, i); });
    }

    /* results: element i of fragment (fm, fn) is row g (+8 for i >= 2), token 2tig + (i & 1) */
#pragma unroll
    for (int fm = 0; fm < FM; fm++)
#pragma unroll
        for (int fn = 0; fn < FN; fn++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int row = row0 + wr0 + fm * 16 + g + (i >= 2 ? 8 : 0);
                const int tok = tok0 + wt0 + fn * 8 + 2 * tig + (i & 1);
                if (row < a.n_out && tok < a.n_tok) {
                    float *p = a.y + (int64_t)tok * a.y_stride + row;
                    const float v = acc[fm][fn][i];
                    *p = a.beta == 0.0f ? v : v + a.beta * *p;
                }
            }
#endif
}

/* ---- configurations and launch --------------------------------------------------------------- */
/* idx, BM, BN, WM, WN, WK: from the largest tile (compute-bound prompt chunks) to the smallest
 * (few tokens, few rows: more blocks for the memory-bound case); warp tiles 32x32, 32x16, 16x16
 * or 16x8. Then the same tiles with the k range split over WK groups of warps (a stage's blocks
 * shared out among them, the partial tiles added at the end): for grids too small to give each
 * multiprocessor more than a few warps, where every warp's walk over all of k is a chain of
 * dependent loads and products. The first WK = 1 configurations are the tiles; mmq_pick finds
 * the split ones by (BM, BN). */
#define MMQ_CONFIGS(X)                                                                             \
    X(0, 128, 64, 4, 2, 1)                                                                         \
    X(1, 64, 64, 2, 2, 1)                                                                          \
    X(2, 64, 32, 2, 2, 1)                                                                          \
    X(3, 32, 32, 2, 2, 1)                                                                          \
    X(4, 64, 16, 4, 1, 1)                                                                          \
    X(5, 32, 16, 2, 2, 1)                                                                          \
    X(6, 64, 64, 2, 2, 2)                                                                          \
    X(7, 64, 32, 2, 2, 2)                                                                          \
    X(8, 64, 64, 2, 2, 4)                                                                          \
    X(9, 64, 32, 2, 2, 4)                                                                          \
    X(10, 32, 32, 2, 2, 4)                                                                         \
    X(11, 64, 16, 4, 1, 4)                                                                         \
    X(12, 32, 16, 2, 2, 4)
#define MMQ_N_CONFIGS 13

struct mmq_cfg {
    int bm, bn, wk, warps;
    size_t smem[2]; /* Q8_0, Q4_0 */
};

static const mmq_cfg mmq_cfgs[MMQ_N_CONFIGS] = {
#define MMQ_CFG_ROW(idx, BM, BN, WM, WN, WK)                                                       \
    {BM,                                                                                           \
     BN,                                                                                           \
     WK,                                                                                           \
     WM * WN * WK,                                                                                 \
     {(size_t)mmq_geom<GGML_TYPE_Q8_0, BM, BN, WM, WN, WK>::SMEM,                                  \
      (size_t)mmq_geom<GGML_TYPE_Q4_0, BM, BN, WM, WN, WK>::SMEM}},
    MMQ_CONFIGS(MMQ_CFG_ROW)
#undef MMQ_CFG_ROW
};

static size_t mmq_cfg_smem(int idx, int wtype)
{
    return mmq_cfgs[idx].smem[wtype == GGML_TYPE_Q4_0];
}

template <int WT, int BM, int BN, int WM, int WN, int WK>
static int mmq_launch(const mmq_args &a, cudaStream_t st, forge_err *err)
{
    typedef mmq_geom<WT, BM, BN, WM, WN, WK> G;
    int rc = FORGE_OK;
    const dim3 grid((unsigned)((a.n_tok + BN - 1) / BN), (unsigned)((a.n_out + BM - 1) / BM));
    /* > 48 KB of dynamic shared memory must be allowed explicitly (cheap; not a stream op) */
    GPU_CHECK(cudaFuncSetAttribute(k_mmq<WT, BM, BN, WM, WN, WK>,
                                   cudaFuncAttributeMaxDynamicSharedMemorySize, (int)G::SMEM));
    k_mmq<WT, BM, BN, WM, WN, WK><<<grid, G::NT, (size_t)G::SMEM, st>>>(a);
    GPU_LAUNCH_CHECK(WT == GGML_TYPE_Q8_0 ? "k_mmq<Q8_0>" : "k_mmq<Q4_0>", st);
    return FORGE_OK;
fail:
    return rc;
}

static int mmq_dispatch(int wtype, int idx, const mmq_args &a, cudaStream_t st, forge_err *err)
{
    switch (idx) {
#define MMQ_CASE(i, BM, BN, WM, WN, WK)                                                            \
    case i:                                                                                        \
        return wtype == GGML_TYPE_Q8_0                                                             \
                   ? mmq_launch<GGML_TYPE_Q8_0, BM, BN, WM, WN, WK>(a, st, err)                    \
                   : mmq_launch<GGML_TYPE_Q4_0, BM, BN, WM, WN, WK>(a, st, err);
        MMQ_CONFIGS(MMQ_CASE)
#undef MMQ_CASE
    default:
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_mmq: no tile configuration %d", idx);
    }
}

/* FORGE_GPU_MMQ_TILE=BMxBN[xWK] (e.g. 64x32 or 64x32x4; read at every call): force that
 * configuration (WK 1 when left out) where it fits the device's shared memory, for benchmarks and
 * tuning; -1 when unset or not a configuration. */
static int mmq_forced_cfg(int wtype, size_t smem_limit)
{
    const char *e = getenv("FORGE_GPU_MMQ_TILE");
    int bm = 0, bn = 0, wk = 1;
    char *end = NULL;
    if (!e || !*e) return -1;
    bm = (int)strtol(e, &end, 10);
    if (!end || *end != 'x') return -1;
    bn = (int)strtol(end + 1, &end, 10);
    if (end && *end == 'x') wk = (int)strtol(end + 1, NULL, 10);
    for (int i = 0; i < MMQ_N_CONFIGS; i++)
        if (mmq_cfgs[i].bm == bm && mmq_cfgs[i].bn == bn && mmq_cfgs[i].wk == wk &&
            mmq_cfg_smem(i, wtype) <= smem_limit)
            return i;
    return -1;
}

/* The configuration for this shape (see the header comment); -1 when none fits the shared
 * memory. The tile: a token tile at most the next power of two >= n_tok (16 at least: no tile
 * more than half padding), then the largest row tile whose grid fills >= 90% of the
 * multiprocessors (else the one with the most blocks). Then the k split: the largest WK whose
 * grid stays within MMQ_WARPS_PER_SM warps a multiprocessor. */
#define MMQ_WARPS_PER_SM 16

static int mmq_pick(int wtype, int64_t n_out, int64_t n_tok)
{
    const size_t limit = gpu_smem_limit();
    const int forced = mmq_forced_cfg(wtype, limit);
    if (forced >= 0) return forced;
    const int64_t sms = gpu_sm_count() > 0 ? gpu_sm_count() : 100;
    int64_t bn_max = 16;
    while (bn_max < n_tok && bn_max < 64)
        bn_max *= 2;
    int best = -1;
    int64_t best_blocks = 0;
    for (int i = 0; i < MMQ_N_CONFIGS; i++) {
        const mmq_cfg &c = mmq_cfgs[i];
        if (c.wk != 1 || c.bn > bn_max || mmq_cfg_smem(i, wtype) > limit) continue;
        const int64_t blocks = ((n_out + c.bm - 1) / c.bm) * ((n_tok + c.bn - 1) / c.bn);
        if (blocks > best_blocks) {
            best = i;
            best_blocks = blocks;
        }
        if (blocks * 10 >= sms * 9) break; /* fills >= 90% of the multiprocessors */
    }
    if (best < 0 || getenv("FORGE_GPU_MMQ_NOSPLIT")) return best;
    int pick = best;
    for (int i = 0; i < MMQ_N_CONFIGS; i++) {
        const mmq_cfg &c = mmq_cfgs[i];
        if (c.bm != mmq_cfgs[best].bm || c.bn != mmq_cfgs[best].bn || c.wk <= mmq_cfgs[pick].wk ||
            mmq_cfg_smem(i, wtype) > limit)
            continue;
        if (best_blocks * c.warps <= sms * MMQ_WARPS_PER_SM) pick = i;
    }
    return pick;
}

GPU_API int gpu_mmq_supported(int wtype, int64_t n_in)
{
    if (!mmq_is_type(wtype) || n_in <= 0 || n_in % QK || n_in > INT32_MAX) return 0;
    const size_t limit = gpu_smem_limit();
    for (int i = 0; i < MMQ_N_CONFIGS; i++)
        if (mmq_cfg_smem(i, wtype) <= limit) return 1;
    return 0;
}

GPU_API int gpu_mmq(int wtype, const void *d_w, int64_t n_out, int64_t n_in, int64_t n_tok,
                    const void *d_xq, float *d_y, int64_t y_stride, float beta, gpu_stream *s,
                    forge_err *err)
{
    cudaStream_t st = GPU_STREAM(s);
    mmq_args a;
    int cfg;
    if (!mmq_is_type(wtype) || n_in <= 0 || n_in % QK)
        return gpu_err_set(err, FORGE_E_UNSUPPORTED,
                           "gpu_mmq: weight type %s with n_in %lld (Q8_0 or Q4_0 with n_in a "
                           "positive multiple of 32 only)",
                           gpu_type_name(wtype), (long long)n_in);
    if (n_out <= 0 || n_tok <= 0 || n_out > INT32_MAX || n_in > INT32_MAX || n_tok > INT32_MAX ||
        y_stride < n_out || n_tok > INT64_MAX / n_in)
        return gpu_err_set(err, FORGE_E_INVALID,
                           "gpu_mmq: bad shape (%lld x %lld weights, %lld tokens, y_stride %lld)",
                           (long long)n_out, (long long)n_in, (long long)n_tok,
                           (long long)y_stride);
    if (!d_w || !d_xq || !d_y || !gpu_is_aligned(d_w, 16) || !gpu_is_aligned(d_xq, 16) ||
        !gpu_is_aligned(d_y, 4))
        return gpu_err_set(err, FORGE_E_INVALID,
                           "gpu_mmq: NULL or misaligned buffer (w %p, xq %p: 16 bytes; y %p: 4)",
                           d_w, d_xq, (const void *)d_y);
    cfg = mmq_pick(wtype, n_out, n_tok);
    if (cfg < 0 || (n_out + mmq_cfgs[cfg].bm - 1) / mmq_cfgs[cfg].bm > 65535)
        return gpu_err_set(err, FORGE_E_UNSUPPORTED,
                           "gpu_mmq: no tile fits %zu bytes of shared memory per block (or %lld "
                           "rows are too many)",
                           gpu_smem_limit(), (long long)n_out);
    a.wq = (const uint8_t *)d_w;
    a.wd = (const unsigned short *)(a.wq + gpu_weight_scales_offset(wtype, n_out, n_in));
    a.xq = (const int8_t *)d_xq;
    a.xd = (const float *)((const uint8_t *)d_xq + gpu_act_d_offset(n_tok * n_in));
    a.y = d_y;
    a.y_stride = y_stride;
    a.wd_halves = n_out * (n_in / QK);
    a.n_out = (int)n_out;
    a.n_in = (int)n_in;
    a.n_tok = (int)n_tok;
    a.nb = (int)(n_in / QK);
    a.w_row_bytes = wtype == GGML_TYPE_Q8_0 ? (size_t)n_in : (size_t)n_in / 2;
    a.beta = beta;
    return mmq_dispatch(wtype, cfg, a, st, err);
}

#else /* HIP: no int8 mma, ldmatrix or cp.async in this toolchain */

GPU_API int gpu_mmq_supported(int wtype, int64_t n_in)
{
    (void)wtype;
    (void)n_in;
    return 0;
}

GPU_API int gpu_mmq(int wtype, const void *d_w, int64_t n_out, int64_t n_in, int64_t n_tok,
                    const void *d_xq, float *d_y, int64_t y_stride, float beta, gpu_stream *s,
                    forge_err *err)
{
    return gpu_err_set(err, FORGE_E_UNSUPPORTED,
                       "gpu_mmq: the int8 tensor-core product is not available in this %s build; "
                       "use gpu_matvec_multi or gpu_gemm",
                       gpu_backend_name());
}

#endif
