/* gpu_matvec_multi.cu - decode matrix-vector products of 2..GPU_MATVEC_MULTI_MAX activation rows
 * (a decode batch of several sequences) that read each weight chunk once for all rows: F32,
 * F16, BF16, Q8_0, Q4_0 in the device layout (gpu_ops.h).
 *
 * Batch invariance: every row's result equals gpu_matvec's for that row alone, bit for bit.
 * The kernel is gpu_matvec.cu's k_matvec with an accumulator per row: the same chunk dot
 * products (gpu_dot.cuh, the same expressions), the same lane-to-chunk assignment and order
 * (chunk c = lane, lane + 32 * SPR, ... in ascending order), the same segment shuffle sum, and
 * the same choice of SPR (segments per output row) from the matrix shape, so each row's sum is
 * formed in the same order. What differs is only who loads what: a segment takes RW weight rows
 * at once and loads each activation chunk once for all of them (mm_rw). (gpu_matvec's
 * two-rows-per-segment kernel accumulates in the SPR = 1 order too.) If gpu_matvec.cu changes how
 * it splits a row, this file must follow: tests/gpu/test_gpu_paged.c compares the two bit for
 * bit. Shapes the 1-row path runs through its scalar kernel (unaligned rows) are
 * FORGE_E_UNSUPPORTED here: the caller runs rows one by one.
 * Q8_0/Q4_0 batches of TC_MIN_ROWS_DEFAULT rows or more run on the int8 tensor cores
 * (k_matvec_tc, NVIDIA), which forms every sum in the same order from the same integer chunk
 * sums, so the bits stay those of gpu_matvec. */
#include <stdlib.h>
#include <string.h>

#include "gpu/gpu_common.cuh"
#include "gpu/gpu_dot.cuh"
#include "gpu/gpu_invariant.cuh"
#include "gpu/gpu_mma.cuh"
#include "gpu/gpu_ops.h"
#include "gpu/gpu_vendor.h"

#define MM_THREADS 256 /* gpu_matvec.cu's MV_THREADS */
#define MM_ROWS_PER_BLOCK (MM_THREADS / GPU_SEG)
#define MM_UNROLL 4
#define QK 32

static int mm_is_quant(int t)
{
    return t == GGML_TYPE_Q8_0 || t == GGML_TYPE_Q4_0;
}

/* gpu_matvec.cu's plane_row_bytes */
static size_t mm_row_bytes(int t, int64_t n_in)
{
    switch (t) {
    case GGML_TYPE_F32:
        return (size_t)n_in * 4;
    case GGML_TYPE_F16:
    case GGML_TYPE_BF16:
        return (size_t)n_in * 2;
    case GGML_TYPE_Q8_0:
        return n_in % QK ? 0 : (size_t)n_in;
    case GGML_TYPE_Q4_0:
        return n_in % QK ? 0 : (size_t)n_in / 2;
    default:
        return 0;
    }
}

/* One launch covers the rows of n_mat matrices that read the same activations (Q/K/V, gate/up):
 * launch row `row` is row row - row0[m] of matrix m, with row0[m] <= row < row0[m + 1]. */
struct mm_args {
    const uint8_t *w[GPU_MATVEC_MULTI_MATS];
    const unsigned short *scales[GPU_MATVEC_MULTI_MATS];
    float *y[GPU_MATVEC_MULTI_MATS]; /* [n_rows][rows of matrix m] */
    int row0[GPU_MATVEC_MULTI_MATS + 1];
    int n_mat;
    int add;          /* y += the product (else y = it) */
    const float *x;   /* [n_rows][n_in] */
    const int8_t *xq; /* [n_rows][n_in] */
    const float *xd;  /* [n_rows][n_in / 32] */
    const int *xs;    /* [n_rows][n_in / 32] */
    int n_out;        /* the launch's rows: row0[n_mat] */
    int n_in, n_rows;
    size_t row_bytes;
};

/* Every matrix but the last of a launch has a multiple of MM_MAT_ROWS rows, and a block's rows
 * (8 / SPR x RW of k_matvec_multi, 16 or 32 of k_matvec_tc) divide it: a block never straddles
 * two matrices, so it finds its matrix once, from its first row, by selects on uniform values
 * (an array parameter indexed at run time per row was copied to the stack and cost the tensor-
 * core kernel 44 registers). */
#define MM_MAT_ROWS 32

struct mm_mat {
    const uint8_t *w;
    const unsigned short *sc;
    float *y;
    int r0, n; /* its first launch row, its rows */
};

GPU_DEVT mm_mat mm_block_mat(const mm_args &a, int first_row)
{
    static_assert(GPU_MATVEC_MULTI_MATS == 3, "mm_block_mat selects among 3");
    const int m = (a.n_mat > 1 && first_row >= a.row0[1]) + (a.n_mat > 2 && first_row >= a.row0[2]);
    mm_mat t;
    t.w = m == 0 ? a.w[0] : m == 1 ? a.w[1] : a.w[2];
    t.sc = m == 0 ? a.scales[0] : m == 1 ? a.scales[1] : a.scales[2];
    t.y = m == 0 ? a.y[0] : m == 1 ? a.y[1] : a.y[2];
    t.r0 = m == 0 ? 0 : m == 1 ? a.row0[1] : a.row0[2];
    t.n = (m == 0 ? a.row0[1] : m == 1 ? a.row0[2] : a.row0[3]) - t.r0;
    return t;
}

/* y of activation row r, launch row `row` of the block's matrix: stored or (add) added */
GPU_DEVT void mm_put(const mm_args &a, const mm_mat &t, int r, int row, float v)
{
    float *y = t.y + (int64_t)r * t.n + (row - t.r0);
    *y = a.add ? *y + v : v;
}

/* Per weight type: the activations of one chunk of one row (loaded once, then multiplied by
 * the chunk of every weight row of the warp) and the chunk dot product, the same expression as
 * gpu_matvec.cu's (gpu_dot.cuh). */
template <int WT> struct mm_ops;

template <> struct mm_ops<GGML_TYPE_F32> {
    struct act {
        float4 x;
    };
    static GPU_DEVT act load(const mm_args &a, int r, int c)
    {
        act v;
        v.x = ((const float4 *)(a.x + (int64_t)r * a.n_in))[c];
        return v;
    }
    static GPU_DEVT float dot(const act &v, uint4 w, float dw)
    {
        return gpu_dot_f32x4(w, v.x);
    }
};

template <int WT> struct mm_ops_half {
    struct act {
        float4 xa, xb;
    };
    static GPU_DEVT act load(const mm_args &a, int r, int c)
    {
        const float4 *x = (const float4 *)(a.x + (int64_t)r * a.n_in);
        act v;
        v.xa = x[2 * c];
        v.xb = x[2 * c + 1];
        return v;
    }
    static GPU_DEVT float dot(const act &v, uint4 w, float dw)
    {
        return WT == GGML_TYPE_F16 ? gpu_dot_f16x8(w, v.xa, v.xb) : gpu_dot_bf16x8(w, v.xa, v.xb);
    }
};
template <> struct mm_ops<GGML_TYPE_F16> : mm_ops_half<GGML_TYPE_F16> {};
template <> struct mm_ops<GGML_TYPE_BF16> : mm_ops_half<GGML_TYPE_BF16> {};

template <> struct mm_ops<GGML_TYPE_Q8_0> {
    struct act {
        int4 q;
        float xd;
    };
    static GPU_DEVT act load(const mm_args &a, int r, int c)
    {
        act v;
        v.q = ((const int4 *)(a.xq + (int64_t)r * a.n_in))[c];
        v.xd = a.xd[(int64_t)r * (a.n_in / QK) + (c >> 1)];
        return v;
    }
    static GPU_DEVT float dot(const act &v, uint4 w, float dw)
    {
        int s = gpu_dot_q8x16(w, v.q);
        return (float)s * (dw * v.xd);
    }
};

template <> struct mm_ops<GGML_TYPE_Q4_0> {
    struct act {
        int4 lo, hi;
        float xd;
        int xs;
    };
    static GPU_DEVT act load(const mm_args &a, int r, int c)
    {
        const int4 *xq = (const int4 *)(a.xq + (int64_t)r * a.n_in);
        const int64_t b = (int64_t)r * (a.n_in / QK) + c;
        act v;
        v.lo = xq[2 * c];
        v.hi = xq[2 * c + 1];
        v.xd = a.xd[b];
        v.xs = a.xs[b];
        return v;
    }
    static GPU_DEVT float dot(const act &v, uint4 w, float dw)
    {
        int s = gpu_dot_q4x32(w, v.lo, v.hi);
        return (float)(s - 8 * v.xs) * (dw * v.xd);
    }
};

template <int WT> GPU_DEVT int mm_scale_index(int c)
{
    return WT == GGML_TYPE_Q8_0 ? c >> 1 : c;
}

/* k_matvec<WT, SPR> for NR activation rows (a.n_rows <= NR used), RW weight rows per segment:
 * a segment (32 lanes; SPR of them per weight row) takes RW consecutive weight rows, and each
 * lane loads a chunk's activations of a row once for the RW weight rows (the L1 traffic of the
 * activations, the limit of this kernel past a few rows, drops by RW). Each (weight row,
 * activation row) sum is still formed in gpu_matvec's order: lane, lane + 32 * SPR, ...
 * ascending, the segment shuffle sum, then the SPR partial sums in order. Rows past n_out read
 * the last row (valid memory) and are not stored. */
template <int WT, int SPR, int NR, int RW>
__global__ void __launch_bounds__(MM_THREADS) k_matvec_multi(const mm_args a)
{
    constexpr int UNROLL = RW >= 4 ? 2 : MM_UNROLL;
    __shared__ float part[SPR > 1 ? RW * NR : 1][MM_THREADS / GPU_SEG];
    gpu_pdl_trigger();
    bool waited = false; /* launched with PDL: the first weights come before the wait */
    const int lane = threadIdx.x % GPU_SEG, seg = threadIdx.x / GPU_SEG;
    const int row0 = (blockIdx.x * (MM_ROWS_PER_BLOCK / SPR) + seg / SPR) * RW;
    const int sub = seg % SPR;
    const bool quant = WT == GGML_TYPE_Q8_0 || WT == GGML_TYPE_Q4_0;
    float acc[RW][NR];
#pragma unroll
    for (int i = 0; i < RW; i++)
#pragma unroll
        for (int r = 0; r < NR; r++)
            acc[i][r] = 0.0f;
    const mm_mat mt = mm_block_mat(a, blockIdx.x * (MM_ROWS_PER_BLOCK / SPR) * RW);
    if (row0 < a.n_out) {
        const uint4 *wrow[RW];
        const unsigned short *srow[RW];
#pragma unroll
        for (int i = 0; i < RW; i++) {
            const int row = (row0 + i < a.n_out ? row0 + i : a.n_out - 1) - mt.r0;
            wrow[i] = (const uint4 *)(mt.w + (size_t)row * a.row_bytes);
            srow[i] = quant ? mt.sc + (size_t)row * (a.n_in / QK) : NULL;
        }
        const int n_chunks = (int)(a.row_bytes / 16);
        const int step = GPU_SEG * SPR;
        for (int c0 = sub * GPU_SEG + lane; c0 < n_chunks; c0 += step * UNROLL) {
            uint4 w[UNROLL][RW];
            float dw[UNROLL][RW];
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                int c = c0 + u * step;
                if (c < n_chunks) {
#pragma unroll
                    for (int i = 0; i < RW; i++) {
                        w[u][i] = gpu_ld_stream16(wrow[i] + c);
                        dw[u][i] = quant ? gpu_fp16_to_f32(srow[i][mm_scale_index<WT>(c)]) : 0.0f;
                    }
                }
            }
            if (!waited) {
                gpu_pdl_wait();
                waited = true;
            }
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                int c = c0 + u * step;
                if (c < n_chunks) {
#pragma unroll
                    for (int r = 0; r < NR; r++)
                        if (r < a.n_rows) {
                            const typename mm_ops<WT>::act x = mm_ops<WT>::load(a, r, c);
#pragma unroll
                            for (int i = 0; i < RW; i++)
                                acc[i][r] += mm_ops<WT>::dot(x, w[u][i], dw[u][i]);
                        }
                }
            }
        }
    }
    if (!waited) gpu_pdl_wait(); /* before the stores (add: before reading y) */
#pragma unroll
    for (int i = 0; i < RW; i++)
#pragma unroll
        for (int r = 0; r < NR; r++)
            acc[i][r] = gpu_seg_sum(acc[i][r]);
    if (SPR == 1) {
        if (lane == 0)
#pragma unroll
            for (int i = 0; i < RW; i++)
                if (row0 + i < a.n_out)
#pragma unroll
                    for (int r = 0; r < NR; r++)
                        if (r < a.n_rows) mm_put(a, mt, r, row0 + i, acc[i][r]);
    } else {
        if (lane == 0) {
#pragma unroll
            for (int i = 0; i < RW; i++)
#pragma unroll
                for (int r = 0; r < NR; r++)
                    part[i * NR + r][seg] = acc[i][r];
        }
        __syncthreads();
        if (sub == 0 && lane == 0) {
            for (int i = 0; i < RW; i++) {
                if (row0 + i >= a.n_out) break;
                for (int r = 0; r < a.n_rows; r++) {
                    float sum = 0.0f;
#pragma unroll
                    for (int k = 0; k < SPR; k++)
                        sum += part[i * NR + r][seg + k];
                    mm_put(a, mt, r, row0 + i, sum);
                }
            }
        }
    }
}

/* ---- the same products on the int8 tensor cores (Q8_0, Q4_0; NVIDIA) ------------------------ */
/* k_matvec_tc<WT, SPR, FM, FN, U>: a block of TC_WARPS warps computes 16 FM weight rows x 8 FN
 * activation rows (a lane loads U chunks of a leaf before it multiplies them) with mma.sync
 * (gpu_mma.cuh; A = weight rows, B = activation rows, one chunk = one mma: Q4_0 m16n8k32 over a
 * 32-element block, Q8_0 m16n8k16 over a half block). The integer
 * chunk sums are the dp4a kernel's exactly (Q4_0: sum (nibble - 8) q = sum nibble q - 8 sum q);
 * each is scaled and added as there (acc += (float)s * (dw * xd)), and the float sums follow
 * gpu_matvec's order without its lanes: "virtual lane" v = 32 s + l (segment s, lane l) sums
 * chunks v, v + 32 SPR, ... ascending; gpu_seg_sum's butterfly (xor 16, 8, .., 1) is the binary
 * tree over the 32 lanes taken in bit-reversed order (leaf position p holds lane bitrev5(p):
 * the first sums pair lanes l and l ^ 16, i.e. positions 2m and 2m + 1). Warp e takes the
 * positions 4e .. 4e + 3 of every segment (so at each step the 8 warps read 8 consecutive
 * chunks of every row: 128 bytes of Q4_0), sums its four leaves as the tree does, and the
 * warps' subtree values meet in shared memory as the tree's top three levels; then the
 * segments are added in order from 0.0f (SPR > 1), as k_matvec_multi's partial sums. */
#if !FORGE_GPU_HIP
#define TC_WARPS 8
#define TC_THREADS (TC_WARPS * 32)

GPU_DEVT int tc_bitrev5(int p)
{
    return (int)(__brev((unsigned)p) >> 27);
}

template <int WT, int SPR, int FM, int FN, int U>
__global__ void __launch_bounds__(TC_THREADS) k_matvec_tc(const mm_args a)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap(); /* never launched: the library is built for sm_80+ only */
#else
    constexpr int BM = 16 * FM, BN = 8 * FN, NOUT = BM * BN;
    constexpr bool Q4 = WT == GGML_TYPE_Q4_0;
    __shared__ float red[TC_WARPS][NOUT];
    gpu_pdl_trigger();
    gpu_pdl_wait(); /* launched with PDL (gpu_launch_pdl): first of all */
    const int lane = threadIdx.x % 32, e = threadIdx.x / 32;
    const int g = lane / 4, tig = lane % 4;
    const int row0 = blockIdx.y * BM, tok0 = blockIdx.x * BN;
    const int n_chunks = (int)(a.row_bytes / 16), nb = a.n_in / QK;
    constexpr int P = 32 * SPR;
    /* Q4_0: the mma's k slots 4 tig + q and 16 + 4 tig + q hold elements 8 tig + q and
     * 8 tig + 4 + q (any pairing of slots and elements gives the same integer sum), so that a
     * lane loads 8 consecutive activation bytes at once; in the block's 16 quant bytes
     * (byte j = element j low nibble, element j + 16 high nibble) those elements are the low
     * (tig < 2) or high (tig >= 2) nibbles of bytes 8 (tig & 1) .. + 7 */
    const int nsh = tig >= 2 ? 4 : 0;

    /* the lane's weight rows (g, g + 8 of each fragment) and activation rows (2 tig, 2 tig + 1);
     * rows past the end read the last one (valid memory) and are not stored */
    const mm_mat mt = mm_block_mat(a, row0);
    const uint8_t *wr[FM][2];
    const unsigned short *sr[FM][2];
#pragma unroll
    for (int fm = 0; fm < FM; fm++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int row = min(row0 + fm * 16 + g + 8 * h, a.n_out - 1) - mt.r0;
            wr[fm][h] = mt.w + (size_t)row * a.row_bytes + (Q4 ? 8 * (tig & 1) : 4 * tig);
            sr[fm][h] = mt.sc + (size_t)row * nb;
        }
    const int8_t *xr[FN];
    const float *dr[FN][2];
#pragma unroll
    for (int fn = 0; fn < FN; fn++) {
        xr[fn] = a.xq + (size_t)min(tok0 + fn * 8 + g, a.n_rows - 1) * a.n_in + (Q4 ? 8 : 4) * tig;
#pragma unroll
        for (int h = 0; h < 2; h++)
            dr[fn][h] = a.xd + (size_t)min(tok0 + fn * 8 + 2 * tig + h, a.n_rows - 1) * nb;
    }

    float tot[(NOUT + TC_THREADS - 1) / TC_THREADS];
#pragma unroll
    for (int i = 0; i < (NOUT + TC_THREADS - 1) / TC_THREADS; i++)
        tot[i] = 0.0f;

    for (int s = 0; s < SPR; s++) {
        float node[2][FM][FN][4]; /* the sums of leaves 0+1 and 2+3 of the warp's subtree */
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float leaf[FM][FN][4];
#pragma unroll
            for (int fm = 0; fm < FM; fm++)
#pragma unroll
                for (int fn = 0; fn < FN; fn++)
#pragma unroll
                    for (int k = 0; k < 4; k++)
                        leaf[fm][fn][k] = 0.0f;
            const int v = 32 * s + tc_bitrev5(4 * e + i);
            for (int c0 = v; c0 < n_chunks; c0 += P * U) {
                uint2 wq[U][FM][2], xq[U][FN];
                float dw[U][FM][2], xd[U][FN][2];
#pragma unroll
                for (int u = 0; u < U; u++) {
                    const int c = c0 + u * P;
                    if (c < n_chunks) {
                        const int b = Q4 ? c : c >> 1;
#pragma unroll
                        for (int fm = 0; fm < FM; fm++)
#pragma unroll
                            for (int h = 0; h < 2; h++) {
                                if (Q4)
                                    wq[u][fm][h] = __ldcs((const uint2 *)(wr[fm][h] + 16 * c));
                                else
                                    wq[u][fm][h].x = __ldcs((const unsigned *)(wr[fm][h] + 16 * c));
                                dw[u][fm][h] = gpu_fp16_to_f32(sr[fm][h][b]);
                            }
#pragma unroll
                        for (int fn = 0; fn < FN; fn++) {
                            const int8_t *x = xr[fn] + (Q4 ? 32 : 16) * c;
                            if (Q4)
                                xq[u][fn] = *(const uint2 *)x;
                            else
                                xq[u][fn].x = *(const unsigned *)x;
#pragma unroll
                            for (int h = 0; h < 2; h++)
                                xd[u][fn][h] = dr[fn][h][b];
                        }
                    }
                }
#pragma unroll
                for (int u = 0; u < U; u++) {
                    if (c0 + u * P >= n_chunks) break;
#pragma unroll
                    for (int fm = 0; fm < FM; fm++) {
                        unsigned af[4];
                        if (Q4) {
                            af[0] = gpu_nib_s8((wq[u][fm][0].x >> nsh) & 0x0f0f0f0fu);
                            af[1] = gpu_nib_s8((wq[u][fm][1].x >> nsh) & 0x0f0f0f0fu);
                            af[2] = gpu_nib_s8((wq[u][fm][0].y >> nsh) & 0x0f0f0f0fu);
                            af[3] = gpu_nib_s8((wq[u][fm][1].y >> nsh) & 0x0f0f0f0fu);
                        }
#pragma unroll
                        for (int fn = 0; fn < FN; fn++) {
                            int d[4];
                            if (Q4)
                                gpu_mma_k32(d, af, xq[u][fn].x, xq[u][fn].y);
                            else
                                gpu_mma_k16(d, wq[u][fm][0].x, wq[u][fm][1].x, xq[u][fn].x);
#pragma unroll
                            for (int k = 0; k < 4; k++)
                                leaf[fm][fn][k] += gpu_mma_float(d[k]) *
                                                   (dw[u][fm][k >> 1] * xd[u][fn][k & 1]);
                        }
                    }
                }
            }
#pragma unroll
            for (int fm = 0; fm < FM; fm++)
#pragma unroll
                for (int fn = 0; fn < FN; fn++)
#pragma unroll
                    for (int k = 0; k < 4; k++) {
                        if (i % 2 == 0)
                            node[i / 2][fm][fn][k] = leaf[fm][fn][k];
                        else
                            node[i / 2][fm][fn][k] += leaf[fm][fn][k];
                    }
        }
        /* the warp's subtree, then the top three levels over the warps */
#pragma unroll
        for (int fm = 0; fm < FM; fm++)
#pragma unroll
            for (int fn = 0; fn < FN; fn++)
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    const int r = fm * 16 + g + (k >= 2 ? 8 : 0), t = fn * 8 + 2 * tig + (k & 1);
                    red[e][r * BN + t] = node[0][fm][fn][k] + node[1][fm][fn][k];
                }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < (NOUT + TC_THREADS - 1) / TC_THREADS; i++) {
            const int o = threadIdx.x + i * TC_THREADS;
            if (o < NOUT) {
                const float seg = ((red[0][o] + red[1][o]) + (red[2][o] + red[3][o])) +
                                  ((red[4][o] + red[5][o]) + (red[6][o] + red[7][o]));
                tot[i] = SPR == 1 ? seg : tot[i] + seg;
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < (NOUT + TC_THREADS - 1) / TC_THREADS; i++) {
        const int o = threadIdx.x + i * TC_THREADS;
        const int row = row0 + o / BN, tok = tok0 + o % BN;
        if (o < NOUT && row < a.n_out && tok < a.n_rows) mm_put(a, mt, tok, row, tot[i]);
    }
#endif
}

/* Q8_0/Q4_0 batches of at least this many rows take k_matvec_tc (FORGE_GPU_MULTI_TC=N sets it,
 * 0 turns it off; gpu_matvec_multi_tc_min for tests and benchmarks). h100, sixteenth session
 * (bench_gpu_paged, Q4_0 14336 x 4096, dp4a / tensor cores): 4 rows 31.8 / 40.2 us, 8 rows
 * 44.4 / 47.4 (32 weight rows a block: 40.0), 16 rows 96.0 / 64.2 (48.3); `forge bench
 * --parallel` llama2-7b 4 streams 943 / 704 tok/s, 16 streams 1260 / 1870. Its limit is the
 * L1 wavefronts of the per-lane 4-byte loads (a warp's load touches 8 rows or 8 activation rows);
 * a variant staging each step's chunks in shared memory by cp.async and reading fragments by
 * ldmatrix (bit-exact too) was slower: 16 streams 1442-1725. */
/* Nineteenth session, h100, `forge bench -m llama2-7b-Q4_0 --parallel N -p 128 -n 128` with the
 * merged launches (tok/s, dp4a / tensor cores): 4 streams 1061 / 775, 5 streams 1078 / 945,
 * 6 streams 1049-1053 / 1123-1129, 8 streams 1211-1218 / 1411-1420: in the engine the tensor
 * cores win from 6 rows, where the lone kernel above lost at 8. */
#define TC_MIN_ROWS_DEFAULT 6
static int tc_min_rows = -1;

/* 9..16 rows: 4 chunks of a leaf loaded at once where every leaf has 4 and the block has 16
 * rows (h100, sixteenth session: llama2-7b 16 streams 2083 -> 2152 tok/s; with 32 rows a block
 * the registers cost more than the loads gain: 16 rows of 14336 x 4096 45 -> 55 us), else 2. */
template <int WT, int SPR, int FM> static void tc_launch_fm(const mm_args &a, cudaStream_t st)
{
    const unsigned gy = (unsigned)((a.n_out + 16 * FM - 1) / (16 * FM));
    const dim3 grid8((unsigned)((a.n_rows + 7) / 8), gy);
    const dim3 grid16((unsigned)((a.n_rows + 15) / 16), gy);
    if (a.n_rows <= 8) {
        gpu_launch_pdl(k_matvec_tc<WT, SPR, FM, 1, 2>, grid8, dim3(TC_THREADS), 0, st, a);
        return;
    }
    if constexpr (FM == 1) {
        if (a.row_bytes / 16 >= 4 * 32 * SPR) {
            gpu_launch_pdl(k_matvec_tc<WT, SPR, 1, 2, 4>, grid16, dim3(TC_THREADS), 0, st, a);
            return;
        }
    }
    gpu_launch_pdl(k_matvec_tc<WT, SPR, FM, 2, 2>, grid16, dim3(TC_THREADS), 0, st, a);
}

/* 32 weight rows per block where that still gives two blocks per multiprocessor (the activation
 * loads shared by twice the rows: h100, bench_gpu_paged, 16 rows of 14336 x 4096 Q4_0 48 us
 * against 64), else 16 (4096 rows: 128 blocks of 32 would leave multiprocessors idle). */
template <int WT, int SPR> static void tc_launch(const mm_args &a, cudaStream_t st)
{
    const int64_t tiles = (a.n_rows + 15) / 16 * ((a.n_out + 31) / 32);
    if (tiles >= 2 * (int64_t)(gpu_sm_count() > 0 ? gpu_sm_count() : 64))
        tc_launch_fm<WT, SPR, 2>(a, st);
    else
        tc_launch_fm<WT, SPR, 1>(a, st);
}
#endif /* !FORGE_GPU_HIP */

GPU_API void gpu_matvec_multi_tc_min(int n)
{
#if !FORGE_GPU_HIP
    tc_min_rows = n;
#else
    (void)n;
#endif
}

#if !FORGE_GPU_HIP
/* True when this batch takes k_matvec_tc. */
static bool tc_use(const mm_args &a, int wtype)
{
    if (tc_min_rows < 0) {
        const char *e = getenv("FORGE_GPU_MULTI_TC");
        tc_min_rows = e ? atoi(e) : TC_MIN_ROWS_DEFAULT;
        if (tc_min_rows < 0) tc_min_rows = 0;
    }
    return mm_is_quant(wtype) && tc_min_rows > 0 && a.n_rows >= tc_min_rows;
}
#endif

/* Weight rows per segment: one while the weights alone bound the time (1-2 activation rows),
 * two past that, where the activations' L1 traffic grows (FORGE_GPU_MULTI_RW=1|2|4 overrides,
 * for tuning); SPR > 1 (a short matrix: every warp counts) keeps one. On the H100 (eleventh
 * session, bench_gpu_paged, 4096 x 4096 and 14336 x 4096 Q4_0 / Q8_0 / F16) two rows per segment
 * were the fastest at 4, 8 and 16 activation rows in 17 of 18 cases, 5-25% under one (16 rows of
 * Q4_0 4096 x 4096: 35.5 us against 44.4), and four were slower than two in every one of them
 * (register pressure: 212-225 registers at 16 rows, one block per SM); at 2 rows one was. */
static int mm_rw(int n_rows)
{
    static int env = -1;
    if (env < 0) {
        const char *e = getenv("FORGE_GPU_MULTI_RW");
        int v = e ? atoi(e) : 0;
        env = v == 1 || v == 2 || v == 4 ? v : 0;
    }
    if (env) return env;
    return n_rows <= 2 ? 1 : 2;
}

template <int WT, int SPR, int NR>
static void mm_launch_rw(const mm_args &a, int rw, cudaStream_t st)
{
    const int rows_per_block = MM_ROWS_PER_BLOCK / SPR;
    /* with PDL: each block's first weights load while the kernel before still runs */
    if (SPR > 1 || rw == 1) {
        const unsigned grid = (unsigned)((a.n_out + rows_per_block - 1) / rows_per_block);
        gpu_launch_pdl(k_matvec_multi<WT, SPR, NR, 1>, dim3(grid), dim3(MM_THREADS), 0, st, a);
    } else if (rw == 2) {
        const unsigned grid = (unsigned)((a.n_out + 2 * rows_per_block - 1) / (2 * rows_per_block));
        gpu_launch_pdl(k_matvec_multi<WT, 1, NR, 2>, dim3(grid), dim3(MM_THREADS), 0, st, a);
    } else {
        const unsigned grid = (unsigned)((a.n_out + 4 * rows_per_block - 1) / (4 * rows_per_block));
        gpu_launch_pdl(k_matvec_multi<WT, 1, NR, 4>, dim3(grid), dim3(MM_THREADS), 0, st, a);
    }
}

template <int WT, int SPR> static void mm_launch_nr(const mm_args &a, cudaStream_t st)
{
    const int rw = mm_rw(a.n_rows);
    if (a.n_rows <= 2)
        mm_launch_rw<WT, SPR, 2>(a, rw, st);
    else if (a.n_rows <= 4)
        mm_launch_rw<WT, SPR, 4>(a, rw, st);
    else if (a.n_rows <= 8)
        mm_launch_rw<WT, SPR, 8>(a, rw, st);
    else
        mm_launch_rw<WT, SPR, 16>(a, rw, st);
}

/* One launch at SPR segments per row: k_matvec_tc when tc (Q8_0/Q4_0 only), else k_matvec_multi */
template <int WT, int SPR> static void mm_launch_spr(const mm_args &a, bool tc, cudaStream_t st)
{
#if !FORGE_GPU_HIP
    constexpr int QT = WT == GGML_TYPE_Q8_0 ? GGML_TYPE_Q8_0 : GGML_TYPE_Q4_0;
    if (tc && mm_is_quant(WT)) {
        tc_launch<QT, SPR>(a, st);
        return;
    }
#endif
    mm_launch_nr<WT, SPR>(a, st);
}

/* spr: gpu_matvec.cu's choice for each matrix of the launch (gpu_invariant.cuh) */
template <int WT>
static int mm_launch(const mm_args &a, int spr, bool tc, cudaStream_t st, forge_err *err)
{
    int rc = FORGE_OK;
    switch (spr) {
    case 1:
        mm_launch_spr<WT, 1>(a, tc, st);
        break;
    case 2:
        mm_launch_spr<WT, 2>(a, tc, st);
        break;
    case 4:
        mm_launch_spr<WT, 4>(a, tc, st);
        break;
    default:
        mm_launch_spr<WT, 8>(a, tc, st);
        break;
    }
    GPU_LAUNCH_CHECK(tc ? "k_matvec_tc" : "k_matvec_multi", st);
    return FORGE_OK;
fail:
    return rc;
}

GPU_API int gpu_matvec_multi_supported(int wtype, int64_t n_in)
{
    size_t rb = mm_row_bytes(wtype, n_in);
    return n_in > 0 && rb != 0 && rb % 16 == 0;
}

/* The segments per row every matrix of a launch shares, or 0 when they differ. */
static int mm_mats_spr(int wtype, int n_mat, const int64_t *n_out, int64_t n_in)
{
    const int n_chunks = (int)(mm_row_bytes(wtype, n_in) / 16);
    const int spr = gpu_matvec_spr(n_out[0], n_chunks);
    for (int m = 1; m < n_mat; m++)
        if (gpu_matvec_spr(n_out[m], n_chunks) != spr) return 0;
    return spr;
}

GPU_API int gpu_matvec_multi_mats_ok(int wtype, int n_mat, const int64_t *n_out, int64_t n_in)
{
    if (n_mat < 1 || n_mat > GPU_MATVEC_MULTI_MATS || !n_out ||
        !gpu_matvec_multi_supported(wtype, n_in))
        return 0;
    int64_t total = 0;
    for (int m = 0; m < n_mat; m++) {
        if (n_out[m] <= 0 || (m < n_mat - 1 && n_out[m] % MM_MAT_ROWS)) return 0;
        total += n_out[m];
    }
    return total <= INT32_MAX && mm_mats_spr(wtype, n_mat, n_out, n_in) != 0;
}

GPU_API int gpu_matvec_multi_mats(int wtype, int n_mat, const void *const *d_w,
                                  const int64_t *n_out, int64_t n_in, int64_t n_rows,
                                  const float *d_x, const void *d_xq, float *const *d_y,
                                  int add, gpu_stream *s, forge_err *err)
{
    cudaStream_t st = GPU_STREAM(s);
    const bool q = mm_is_quant(wtype);
    if (!gpu_matvec_multi_supported(wtype, n_in))
        return gpu_err_set(err, FORGE_E_UNSUPPORTED,
                           "gpu_matvec_multi: weight type %s with n_in %lld (rows of a multiple "
                           "of 16 bytes only)",
                           gpu_type_name(wtype), (long long)n_in);
    if (n_mat < 1 || n_mat > GPU_MATVEC_MULTI_MATS || !n_out || !d_w || !d_y)
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_matvec_multi: %d matrices", n_mat);
    if (!gpu_matvec_multi_mats_ok(wtype, n_mat, n_out, n_in))
        return gpu_err_set(err, n_out[0] > 0 ? FORGE_E_UNSUPPORTED : FORGE_E_INVALID,
                           "gpu_matvec_multi: %d matrices of %lld.. rows that do not split "
                           "their rows alike, or with a count not a multiple of %d before the "
                           "last (or an empty one)",
                           n_mat, (long long)n_out[0], MM_MAT_ROWS);
    if (n_rows < 1 || n_rows > GPU_MATVEC_MULTI_MAX || n_in > INT32_MAX ||
        n_rows * n_in > INT32_MAX)
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_matvec_multi: %lld rows of %lld x %lld",
                           (long long)n_rows, (long long)n_out[0], (long long)n_in);
    if (q ? !d_xq || !gpu_is_aligned(d_xq, 16) : !d_x || !gpu_is_aligned(d_x, 16))
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_matvec_multi: NULL or misaligned input");
    mm_args a;
    memset(&a, 0, sizeof a);
    int rows = 0;
    for (int m = 0; m < n_mat; m++) {
        if (!d_w[m] || !d_y[m] || !gpu_is_aligned(d_w[m], 16))
            return gpu_err_set(err, FORGE_E_INVALID,
                               "gpu_matvec_multi: matrix %d: NULL or misaligned buffer", m);
        a.w[m] = (const uint8_t *)d_w[m];
        a.scales[m] = q ? (const unsigned short *)(a.w[m] + gpu_weight_scales_offset(
                                                               wtype, n_out[m], n_in))
                        : NULL;
        a.y[m] = d_y[m];
        a.row0[m] = rows;
        rows += (int)n_out[m];
    }
    a.row0[n_mat] = rows;
    a.n_mat = n_mat;
    a.add = add != 0;
    const int64_t n_all = n_rows * n_in;
    a.x = d_x;
    a.xq = (const int8_t *)d_xq;
    a.xd = q ? (const float *)((const uint8_t *)d_xq + gpu_act_d_offset(n_all)) : NULL;
    a.xs = q ? (const int *)((const uint8_t *)d_xq + gpu_act_s_offset(n_all)) : NULL;
    a.n_out = rows;
    a.n_in = (int)n_in;
    a.n_rows = (int)n_rows;
    a.row_bytes = mm_row_bytes(wtype, n_in);
    const int spr = mm_mats_spr(wtype, n_mat, n_out, n_in);
#if !FORGE_GPU_HIP
    const bool tc = tc_use(a, wtype);
#else
    const bool tc = false;
#endif
    switch (wtype) {
    case GGML_TYPE_Q8_0:
        return mm_launch<GGML_TYPE_Q8_0>(a, spr, tc, st, err);
    case GGML_TYPE_Q4_0:
        return mm_launch<GGML_TYPE_Q4_0>(a, spr, tc, st, err);
    case GGML_TYPE_F32:
        return mm_launch<GGML_TYPE_F32>(a, spr, tc, st, err);
    case GGML_TYPE_F16:
        return mm_launch<GGML_TYPE_F16>(a, spr, tc, st, err);
    default:
        return mm_launch<GGML_TYPE_BF16>(a, spr, tc, st, err);
    }
}

GPU_API int gpu_matvec_multi(int wtype, const void *d_w, int64_t n_out, int64_t n_in,
                             int64_t n_rows, const float *d_x, const void *d_xq, float *d_y,
                             gpu_stream *s, forge_err *err)
{
    if (n_out <= 0 || n_out > INT32_MAX)
        return gpu_err_set(err, FORGE_E_INVALID, "gpu_matvec_multi: %lld rows of %lld x %lld",
                           (long long)n_rows, (long long)n_out, (long long)n_in);
    return gpu_matvec_multi_mats(wtype, 1, &d_w, &n_out, n_in, n_rows, d_x, d_xq, &d_y, 0, s,
                                 err);
}
