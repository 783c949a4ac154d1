/* gpu_sample.cu - the sampler chain of src/sample/sampler.c on the device (gpu_sample in
 * gpu_ops.h): penalties -> top-k -> top-p -> min-p -> temperature -> the draw, so a decode step
 * copies back one token id instead of the logits.
 *
 * Candidates are (key, id) pairs ordered as sampler.c's cmp_cand_desc: larger key first, the
 * smaller id on a tie. A NaN logit reads as -inf (as in sampler.c), so the order is total.
 *   1. k_sample_chunk: one block per CHUNK logits applies the penalties, sorts the chunk in
 *      shared memory (bitonic) and writes its best L = pow2 >= k candidates, sorted.
 *   2. k_sample_merge, log2(chunks) rounds: one block per pair of sorted lists keeps the best L
 *      of the two (a bitonic merge), until one list is left: the top L of the vocabulary.
 *   3. k_sample_chain: one block runs top-p, min-p, temperature, softmax and the draw on the
 *      first k candidates, with the same float/double arithmetic as sampler.c (probabilities in
 *      float, sums in double), so results differ from the host only by expf/logf rounding.
 * Greedy is the same pipeline with k = 1 (pass 1 then reduces instead of sorting). No allocation,
 * no synchronisation: the scratch is the caller's (gpu_sample_scratch_bytes), all work is on the
 * caller's stream. */
#include <math.h>

#include "gpu/gpu_common.cuh"
#include "gpu/gpu_ops.h"
#include "gpu/gpu_vendor.h"

#define SAMPLE_THREADS 1024
#define SAMPLE_CHUNK 4096 /* logits per block of pass 1 (a power of two >= 2 * GPU_SAMPLE_MAX_K)   \
                           */
#define SAMPLE_NONE_ID 0x7fffffff /* id of the padding: after every real candidate */

typedef struct sample_cand {
    float key;
    int id;
} sample_cand;

/* a goes before b in the candidate order (keys are never NaN). */
GPU_DEV bool cand_before(sample_cand a, sample_cand b)
{
    return a.key > b.key || (a.key == b.key && a.id < b.id);
}

/* Bitonic sort of sh[0..n) (n a power of two) into candidate order, by the whole block. */
GPU_DEV void block_bitonic_sort(sample_cand *sh, int n)
{
    for (int k = 2; k <= n; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int i = threadIdx.x; i < n; i += blockDim.x) {
                int ixj = i ^ j;
                if (ixj > i) {
                    sample_cand a = sh[i], b = sh[ixj];
                    bool up = (i & k) == 0; /* this run ends up in candidate order */
                    if (up ? cand_before(b, a) : cand_before(a, b)) {
                        sh[i] = b;
                        sh[ixj] = a;
                    }
                }
            }
            __syncthreads();
        }
    }
}

/* Pass 1: block b sorts logits [b * CHUNK, ...) after the penalties and writes its best L.
 * sort_n: the sort size, a power of two with L <= sort_n <= CHUNK and covering the chunk. */
__global__ void __launch_bounds__(SAMPLE_THREADS)
    k_sample_chunk(const float *__restrict__ logits, int n, int sort_n,
                   const int32_t *__restrict__ pen, int n_pen, float repeat_penalty,
                   float presence_penalty, float frequency_penalty, int L, sample_cand *out)
{
    __shared__ sample_cand sh[SAMPLE_CHUNK];
    gpu_pdl_trigger();
    const int base = blockIdx.x * SAMPLE_CHUNK;
    const int n_here = n - base < sort_n ? n - base : sort_n;
    for (int i = threadIdx.x; i < sort_n; i += blockDim.x) {
        sample_cand c = {-INFINITY, SAMPLE_NONE_ID};
        if (i < n_here) {
            float v = logits[base + i];
            c.key = isnan(v) ? -INFINITY : v; /* NaN never wins (sampler.c reads it as -inf) */
            c.id = base + i;
        }
        sh[i] = c;
    }
    __syncthreads();
    /* the window's ids are distinct: no two threads touch the same entry */
    for (int j = threadIdx.x; j < n_pen; j += blockDim.x) {
        int id = pen[2 * j], cnt = pen[2 * j + 1];
        if (id < base || id >= base + n_here || cnt <= 0) continue;
        float l = sh[id - base].key;
        /* as stage_penalties, operation for operation and rounded the same way (no fused
         * multiply-add), so the penalised logits are bit for bit the host's */
        if (l <= 0)
            l = __fmul_rn(l, repeat_penalty);
        else
            l = __fdiv_rn(l, repeat_penalty);
        l = __fsub_rn(l, __fadd_rn(__fmul_rn((float)cnt, frequency_penalty), presence_penalty));
        sh[id - base].key = isnan(l) ? -INFINITY : l;
    }
    __syncthreads();
    if (L == 1) { /* greedy or top-1: the best candidate, by a reduction instead of a sort */
        __shared__ sample_cand red[SAMPLE_THREADS];
        sample_cand best = {-INFINITY, SAMPLE_NONE_ID};
        for (int i = threadIdx.x; i < sort_n; i += blockDim.x)
            if (cand_before(sh[i], best)) best = sh[i];
        red[threadIdx.x] = best;
        __syncthreads();
        for (int half = blockDim.x / 2; half > 0; half >>= 1) {
            if ((int)threadIdx.x < half && cand_before(red[threadIdx.x + half], red[threadIdx.x]))
                red[threadIdx.x] = red[threadIdx.x + half];
            __syncthreads();
        }
        if (threadIdx.x == 0) out[blockIdx.x] = red[0];
        return;
    }
    block_bitonic_sort(sh, sort_n);
    for (int i = threadIdx.x; i < L; i += blockDim.x)
        out[(size_t)blockIdx.x * L + i] = sh[i];
}

/* Pass 2: block b keeps the best L of the sorted lists 2b and 2b+1 of in (n_lists of L each);
 * an odd last list is copied. */
__global__ void __launch_bounds__(SAMPLE_THREADS)
    k_sample_merge(const sample_cand *__restrict__ in, int n_lists, int L, sample_cand *out)
{
    __shared__ sample_cand sh[2 * GPU_SAMPLE_MAX_K];
    gpu_pdl_trigger();
    const sample_cand *a = in + (size_t)(2 * blockIdx.x) * L;
    sample_cand *o = out + (size_t)blockIdx.x * L;
    if (2 * (int)blockIdx.x + 1 >= n_lists) {
        for (int i = threadIdx.x; i < L; i += blockDim.x)
            o[i] = a[i];
        return;
    }
    const sample_cand *b = a + L;
    /* a in order followed by b reversed is a bitonic sequence of 2L */
    for (int i = threadIdx.x; i < L; i += blockDim.x) {
        sh[i] = a[i];
        sh[2 * L - 1 - i] = b[i];
    }
    __syncthreads();
    for (int j = L; j > 0; j >>= 1) {
        for (int i = threadIdx.x; i < 2 * L; i += blockDim.x) {
            int ixj = i ^ j;
            if (ixj > i && cand_before(sh[ixj], sh[i])) {
                sample_cand t = sh[i];
                sh[i] = sh[ixj];
                sh[ixj] = t;
            }
        }
        __syncthreads();
    }
    for (int i = threadIdx.x; i < L; i += blockDim.x)
        o[i] = sh[i];
}

/* Inclusive prefix sums of v[0..n) in place (n <= SAMPLE_THREADS), by the whole block
 * (Hillis-Steele). Every thread must call. */
GPU_DEV void block_scan_double(double *v, int n)
{
    for (int off = 1; off < n; off <<= 1) {
        int i = threadIdx.x;
        double add = i < n && i >= off ? v[i - off] : 0.0;
        __syncthreads();
        if (i < n) v[i] += add;
        __syncthreads();
    }
}

/* p[i] = expf(key[i] - key[0]) / sum (float, the sum in double) for i < m, as sampler.c's
 * softmax; cum[i] = the inclusive prefix sums of p in double. Every thread must call. */
GPU_DEV void block_softmax_cum(const float *key, int m, float *p, double *cum)
{
    int i = threadIdx.x;
    float e = i < m ? expf(key[i] - key[0]) : 0.0f;
    if (i < m) cum[i] = (double)e;
    __syncthreads();
    block_scan_double(cum, m);
    double sum = cum[m - 1];
    __syncthreads();
    if (i < m) {
        p[i] = (float)((double)e / sum);
        cum[i] = (double)p[i];
    }
    __syncthreads();
    block_scan_double(cum, m);
}

/* Pass 3: the rest of the chain on the first m (= min(k, n)) sorted candidates; one block of
 * SAMPLE_THREADS >= m threads, thread i owns candidate i. */
__global__ void __launch_bounds__(SAMPLE_THREADS)
    k_sample_chain(const sample_cand *__restrict__ cand, int m, int greedy, float top_p,
                   float min_p, float temperature, const float *__restrict__ d_r, int32_t *d_out)
{
    __shared__ float key[SAMPLE_THREADS];
    __shared__ float p[SAMPLE_THREADS];
    __shared__ double cum[SAMPLE_THREADS];
    __shared__ int cut;
    gpu_pdl_trigger();
    const int i = threadIdx.x;
    if (greedy) {
        if (i == 0) *d_out = cand[0].id;
        return;
    }
    if (i < m) key[i] = cand[i].key;
    if (i == 0) cut = m;
    __syncthreads();
    if (top_p < 1.0f) { /* the shortest prefix with cumulative p >= top_p */
        block_softmax_cum(key, m, p, cum);
        if (i < m && cum[i] >= (double)top_p) atomicMin(&cut, i + 1);
        __syncthreads();
        m = cut;
    }
    if (min_p > 0.0f) { /* keep key >= max + ln(min_p), at least one */
        const float min_key = key[0] + logf(min_p);
        if (i >= 1 && i < m && key[i] < min_key) atomicMin(&cut, i);
        __syncthreads();
        m = cut;
    }
    __syncthreads();
    if (i < m) key[i] = key[i] / temperature;
    __syncthreads();
    block_softmax_cum(key, m, p, cum);
    /* the draw: the first candidate whose cumulative p exceeds r, else the last */
    const double r = (double)*d_r;
    if (i == 0) cut = m - 1;
    __syncthreads();
    if (i < m && r < cum[i]) atomicMin(&cut, i);
    __syncthreads();
    if (i == 0) *d_out = cand[cut].id;
}

/* ---- launcher ---------------------------------------------------------------------------------
 */
static int64_t sample_chunks(int64_t n_vocab)
{
    return (n_vocab + SAMPLE_CHUNK - 1) / SAMPLE_CHUNK;
}

static int pow2_at_least(int64_t x)
{
    int p = 1;
    while (p < x)
        p <<= 1;
    return p;
}

/* Two candidate buffers (pass 1's lists, and the merge rounds' ping-pong): chunks lists of up to
 * GPU_SAMPLE_MAX_K candidates each. */
GPU_API size_t gpu_sample_scratch_bytes(int64_t n_vocab)
{
    if (n_vocab <= 0) return 0;
    size_t one =
        gpu_round_up((size_t)sample_chunks(n_vocab) * GPU_SAMPLE_MAX_K * sizeof(sample_cand), 256);
    return 2 * one;
}

GPU_API int gpu_sample(const gpu_sample_args *a, gpu_stream *s, forge_err *err)
{
    int rc = FORGE_OK;
    cudaStream_t st = GPU_STREAM(s);
    if (!a) return gpu_err_set(err, FORGE_E_INVALID, "gpu_sample: NULL arguments");
    if (!a->d_logits || !a->d_r || !a->d_scratch || !a->d_out || a->n_vocab <= 0 ||
        a->n_vocab >= INT32_MAX || a->n_pen < 0 || (a->n_pen > 0 && !a->d_pen))
        return gpu_err_set(err, FORGE_E_INVALID,
                           "gpu_sample: NULL buffer, n_vocab %lld or n_pen %d",
                           (long long)a->n_vocab, a->n_pen);
    {
        const bool greedy = !(a->temperature > 0.0f);
        if (!greedy && (a->top_k < 1 || a->top_k > GPU_SAMPLE_MAX_K))
            return gpu_err_set(err, FORGE_E_UNSUPPORTED,
                               "gpu_sample: top-k %d is not in 1..%d (sample on the host)",
                               a->top_k, GPU_SAMPLE_MAX_K);
        if (!greedy && (isnan(a->top_p) || isnan(a->min_p) || a->min_p > 1.0f))
            return gpu_err_set(err, FORGE_E_INVALID, "gpu_sample: top-p %g, min-p %g",
                               (double)a->top_p, (double)a->min_p);
        const int n = (int)a->n_vocab;
        const int64_t k = greedy ? 1 : (a->top_k < n ? a->top_k : n);
        const int L = pow2_at_least(k);
        const int sort_n =
            n < SAMPLE_CHUNK ? (pow2_at_least(n) > L ? pow2_at_least(n) : L) : SAMPLE_CHUNK;
        int n_lists = (int)sample_chunks(n);
        sample_cand *buf[2];
        buf[0] = (sample_cand *)a->d_scratch;
        buf[1] = (sample_cand *)((char *)a->d_scratch + gpu_sample_scratch_bytes(n) / 2);
        k_sample_chunk<<<(unsigned)n_lists, SAMPLE_THREADS, 0, st>>>(
            a->d_logits, n, sort_n, a->d_pen, a->n_pen, a->repeat_penalty, a->presence_penalty,
            a->frequency_penalty, L, buf[0]);
        GPU_LAUNCH_CHECK("k_sample_chunk", st);
        int cur = 0;
        while (n_lists > 1) {
            int n_out = (n_lists + 1) / 2;
            k_sample_merge<<<(unsigned)n_out, SAMPLE_THREADS, 0, st>>>(buf[cur], n_lists, L,
                                                                       buf[cur ^ 1]);
            GPU_LAUNCH_CHECK("k_sample_merge", st);
            cur ^= 1;
            n_lists = n_out;
        }
        k_sample_chain<<<1, SAMPLE_THREADS, 0, st>>>(buf[cur], (int)k, greedy, a->top_p, a->min_p,
                                                     a->temperature, a->d_r, a->d_out);
        GPU_LAUNCH_CHECK("k_sample_chain", st);
    }
    return FORGE_OK;
fail:
    return rc;
}
