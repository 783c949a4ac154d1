/* matmul.c - kern_matmul and kern_matmul_multi (several weights sharing one input, one pool
 * job): argument checks, activation conversion, the split of output rows over the pool's
 * threads, dispatch to the selected ISA's row kernels, and the scalar row kernels (the
 * specification every SIMD kernel is tested against). Per-ISA kernels live in
 * matmul_avx2.c, matmul_avx512.c and matmul_neon.c. */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "core/fp16.h"
#include "core/util.h"
#include "cpu/kern_impl.h"

bool kern_matmul_supported(int wtype)
{
    const forge_type_traits *tr = forge_type_traits_get(wtype);
    return tr && (tr->cpu_tuned || (tr->vec_dot && tr->quantize_act));
}

/* Bytes of a weight row (n_in a multiple of the type's block size, checked by the caller). */
static size_t weight_row_bytes(int wtype, int64_t n_in)
{
    const forge_type_traits *tr = forge_type_traits_get(wtype);
    return tr ? (size_t)(n_in / tr->block_size) * tr->block_bytes : 0;
}

/* ---- scalar row kernels ---------------------------------------------------------------- */

static void mm_f32_scalar(const kern_mm_args *a, int64_t r0, int64_t r1, void *work)
{
    for (int64_t t = 0; t < a->n_tok; t++) {
        const float *x = a->X + t * a->n_in;
        for (int64_t o = r0; o < r1; o++) {
            const uint8_t *w = a->W + (size_t)o * a->w_row_bytes;
            float sum = 0.0f;
            for (int64_t i = 0; i < a->n_in; i++) {
                float wi;
                memcpy(&wi, w + 4 * i, 4); /* W may be unaligned */
                sum += wi * x[i];
            }
            a->Y[t * a->n_out + o] = sum;
        }
    }
}

static void mm_f16_scalar(const kern_mm_args *a, int64_t r0, int64_t r1, void *work)
{
    for (int64_t t = 0; t < a->n_tok; t++) {
        const float *x = (const float *)(const void *)(a->Xc + (size_t)t * a->xc_row_bytes);
        for (int64_t o = r0; o < r1; o++) {
            const uint8_t *w = a->W + (size_t)o * a->w_row_bytes;
            float sum = 0.0f;
            for (int64_t i = 0; i < a->n_in; i++)
                sum += forge_fp16_to_f32(kern_load_u16(w + 2 * i)) * x[i];
            a->Y[t * a->n_out + o] = sum;
        }
    }
}

static void mm_bf16_scalar(const kern_mm_args *a, int64_t r0, int64_t r1, void *work)
{
    for (int64_t t = 0; t < a->n_tok; t++) {
        const uint8_t *x = a->Xc + (size_t)t * a->xc_row_bytes;
        for (int64_t o = r0; o < r1; o++) {
            const uint8_t *w = a->W + (size_t)o * a->w_row_bytes;
            float sum = 0.0f;
            for (int64_t i = 0; i < a->n_in; i++)
                sum += forge_bf16_to_f32(kern_load_u16(w + 2 * i)) *
                       forge_bf16_to_f32(kern_load_u16(x + 2 * i));
            a->Y[t * a->n_out + o] = sum;
        }
    }
}

/* Each block: an exact integer dot product, scaled by d_w * d_x and summed in float, as ggml. */
static void mm_q8_0_scalar(const kern_mm_args *a, int64_t r0, int64_t r1, void *work)
{
    int64_t nb = a->n_in / KERN_QK;
    for (int64_t t = 0; t < a->n_tok; t++) {
        const uint8_t *xrow = a->Xc + (size_t)t * a->xc_row_bytes;
        const int8_t *xq = (const int8_t *)xrow;
        const float *xd = kern_xq_d(xrow, a->n_in);
        for (int64_t o = r0; o < r1; o++) {
            const uint8_t *w = a->W + (size_t)o * a->w_row_bytes;
            float sum = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *wb = w + b * KERN_Q8_0_BYTES;
                int sumi = 0;
                for (int j = 0; j < KERN_QK; j++)
                    sumi += (int8_t)wb[2 + j] * xq[b * KERN_QK + j];
                sum += (float)sumi * (forge_fp16_to_f32(kern_load_u16(wb)) * xd[b]);
            }
            a->Y[t * a->n_out + o] = sum;
        }
    }
}

static void mm_q4_0_scalar(const kern_mm_args *a, int64_t r0, int64_t r1, void *work)
{
    int64_t nb = a->n_in / KERN_QK;
    for (int64_t t = 0; t < a->n_tok; t++) {
        const uint8_t *xrow = a->Xc + (size_t)t * a->xc_row_bytes;
        const int8_t *xq = (const int8_t *)xrow;
        const float *xd = kern_xq_d(xrow, a->n_in);
        for (int64_t o = r0; o < r1; o++) {
            const uint8_t *w = a->W + (size_t)o * a->w_row_bytes;
            float sum = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *wb = w + b * KERN_Q4_0_BYTES;
                const int8_t *xb = xq + b * KERN_QK;
                int sumi = 0;
                for (int j = 0; j < KERN_QK / 2; j++) {
                    sumi += ((wb[2 + j] & 0x0f) - 8) * xb[j];
                    sumi += ((wb[2 + j] >> 4) - 8) * xb[j + KERN_QK / 2];
                }
                sum += (float)sumi * (forge_fp16_to_f32(kern_load_u16(wb)) * xd[b]);
            }
            a->Y[t * a->n_out + o] = sum;
        }
    }
}

/* Any type with a dot product in the traits table: one row dot per (token, row), 4 tokens per
 * call where the type has that form (prompts), 4 rows per call for the tokens left (decode).
 * Weight rows outside, so that each row is read from memory once per chunk of tokens, the chunk's
 * activations staying in L2 (kern_tok_chunk). Every form gives the same bits per (row, token). */
static void mm_generic(const kern_mm_args *a, int64_t r0, int64_t r1, void *work)
{
    const int64_t tc = kern_tok_chunk(a->xc_row_bytes, 4);
    const size_t rb = a->w_row_bytes, xb = a->xc_row_bytes;
    for (int64_t t0 = 0; t0 < a->n_tok; t0 += tc) {
        const int64_t t1 = t0 + tc < a->n_tok ? t0 + tc : a->n_tok;
        const int64_t t4 = a->dot4 ? t0 + (t1 - t0) / 4 * 4 : t0;
        for (int64_t o = r0; o < r1 && t4 > t0; o++) {
            for (int64_t t = t0; t < t4; t += 4) {
                float out[4];
                a->dot4(a->n_in, a->W + (size_t)o * rb, a->Xc + (size_t)t * xb, xb, out);
                for (int k = 0; k < 4; k++) a->Y[(t + k) * a->n_out + o] = out[k];
            }
        }
        for (int64_t o = r0; o < r1 && t4 < t1;) {
            const uint8_t *w = a->W + (size_t)o * rb;
            if (a->dot_r4 && o + 4 <= r1) {
                for (int64_t t = t4; t < t1; t++) {
                    float out[4];
                    a->dot_r4(a->n_in, w, rb, a->Xc + (size_t)t * xb, out);
                    for (int k = 0; k < 4; k++) a->Y[t * a->n_out + o + k] = out[k];
                }
                o += 4;
            } else {
                for (int64_t t = t4; t < t1; t++)
                    a->Y[t * a->n_out + o] = a->dot(a->n_in, w, a->Xc + (size_t)t * xb);
                o++;
            }
        }
    }
}

/* The generic kernel of a type on an ISA: the best dot product the traits table has for it. */
static kern_mm_kernel lookup_generic(kern_isa isa, int wtype)
{
    kern_mm_kernel k = {0};
    const forge_type_traits *tr = forge_type_traits_get(wtype);
    const forge_type_traits *xt = tr ? forge_type_traits_get(tr->vec_dot_type) : NULL;
    if (!tr || !tr->vec_dot || !tr->quantize_act || !xt) return k;
    k.dot = tr->vec_dot;
    if (isa == KERN_ISA_AVX512 && tr->vec_dot_avx512)
        k.dot = tr->vec_dot_avx512;
    else if ((isa == KERN_ISA_AVX512 || isa == KERN_ISA_AVX2) && tr->vec_dot_avx2)
        k.dot = tr->vec_dot_avx2;
    /* the 4-token form: every SIMD dot of the table computes the same exact integer sums and the
     * same float expression per super-block, so it may be mixed with any of them */
    if (isa == KERN_ISA_AVX512 || isa == KERN_ISA_AVX2) {
        k.dot4 = tr->vec_dot_x4_avx2;
        k.dot_r4 = tr->vec_dot_r4_avx2;
    }
    k.mm = mm_generic;
    k.cvt = tr->quantize_act;
    k.xc_block = xt->block_size;
    k.xc_block_bytes = xt->block_bytes;
    return k;
}

kern_mm_kernel kern_mm_block_kernel(int wtype, kern_mm_fn mm, size_t work_bytes_per_32)
{
    kern_mm_kernel k = {0};
    const forge_type_traits *tr = forge_type_traits_get(wtype);
    const forge_type_traits *xt = tr ? forge_type_traits_get(tr->vec_dot_type) : NULL;
    if (!tr || !xt || !tr->quantize_act) return k;
    /* the one-row dot for what the kernel leaves to it: the best the traits table has (every
     * dot of a type gives the same bits, tests/test_quant_kernels.c) */
    k.dot = tr->vec_dot_avx512 ? tr->vec_dot_avx512 : tr->vec_dot_avx2 ? tr->vec_dot_avx2 : tr->vec_dot;
    if (!k.dot) return k;
    k.mm = mm;
    k.work_bytes_per_32 = work_bytes_per_32;
    k.cvt = tr->quantize_act;
    k.xc_block = xt->block_size;
    k.xc_block_bytes = xt->block_bytes;
    return k;
}

kern_mm_kernel kern_mm_lookup_scalar(int wtype)
{
    kern_mm_kernel k = {0};
    switch (wtype) {
    case GGML_TYPE_F32:
        k.mm = mm_f32_scalar;
        break;
    case GGML_TYPE_F16:
        k.mm = mm_f16_scalar;
        k.cvt = kern_cvt_f16_scalar;
        k.xc_row_bytes_per_32 = 128;
        break;
    case GGML_TYPE_BF16:
        k.mm = mm_bf16_scalar;
        k.cvt = kern_cvt_bf16_scalar;
        k.xc_row_bytes_per_32 = 64;
        break;
    case GGML_TYPE_Q8_0:
        k.mm = mm_q8_0_scalar;
        k.cvt = kern_cvt_q8_for_q8_0_scalar;
        k.xc_row_bytes_per_32 = KERN_XQ_BYTES_PER_32;
        break;
    case GGML_TYPE_Q4_0:
        k.mm = mm_q4_0_scalar;
        k.cvt = kern_cvt_q8_for_q4_0_scalar;
        k.xc_row_bytes_per_32 = KERN_XQ_BYTES_PER_32;
        break;
    default:
        break;
    }
    return k;
}

/* ---- dispatch ---------------------------------------------------------------------------- */

int kern_build_has_isa(kern_isa isa)
{
    switch (isa) {
    case KERN_ISA_SCALAR:
        return 1;
    case KERN_ISA_AVX2:
        return kern_mm_lookup_avx2(GGML_TYPE_F32).mm != NULL;
    case KERN_ISA_AVX512:
        return kern_mm_lookup_avx512(GGML_TYPE_F32).mm != NULL;
    case KERN_ISA_NEON:
        return kern_mm_lookup_neon(GGML_TYPE_F32).mm != NULL;
    }
    return 0;
}

/* The kernel for a type on an ISA, falling back to a lesser ISA where a type has no kernel. */
static kern_mm_kernel lookup_kernel(kern_isa isa, int wtype)
{
    kern_mm_kernel k = {0};
    if (isa == KERN_ISA_AVX512) k = kern_mm_lookup_avx512(wtype);
    if (!k.mm && (isa == KERN_ISA_AVX512 || isa == KERN_ISA_AVX2)) k = kern_mm_lookup_avx2(wtype);
    if (!k.mm && isa == KERN_ISA_NEON) k = kern_mm_lookup_neon(wtype);
    if (!k.mm) k = kern_mm_lookup_scalar(wtype);
    if (!k.mm) k = lookup_generic(isa, wtype);
    return k;
}

int kern_repack_layout(int wtype)
{
    return lookup_kernel(kern_isa_current(), wtype).layout;
}

/* One matrix of a job. args.Xc points into the job's converted activations. */
typedef struct mm_mat {
    kern_mm_args args;
    kern_mm_kernel kernel;
    int64_t first_chunk; /* its first chunk in the job's numbering of all chunks */
} mm_mat;

/* One conversion of X that some matrices of a job need (Q8 for Q4_0 and for Q8_0 differ). */
typedef struct mm_conv {
    kern_cvt_fn cvt;
    size_t row_bytes;
    uint8_t *xc; /* converted activations being written */
} mm_conv;

typedef struct mm_job {
    mm_mat mats[KERN_MM_MULTI_MAX];
    mm_conv convs[KERN_MM_MULTI_MAX];
    int n_mats, n_convs;
    const float *X;
    int64_t n_in, n_tok;
    uint8_t *work; /* per-thread kernel scratch, work_stride bytes each */
    size_t work_stride;
    int64_t chunk_rows;      /* rows per chunk of work, a multiple of 16 */
    int64_t n_chunks;        /* over all matrices */
    atomic_llong next_chunk; /* the next chunk nobody has taken */
} mm_job;

/* Rows are split in contiguous chunks (a multiple of 16 rows, so that register tiles and cache
 * lines of Y stay within one thread), about 4 per thread, taken from a shared counter: on a
 * shared machine a thread that loses its core for a while does not hold up the others. Each
 * matrix is cut from its own row 0, so its chunk boundaries are multiples of 16 whatever the
 * other matrices of the job: the kernels' row tiles (at most 16) fall exactly as in a job of
 * that matrix alone, and every row gets the same arithmetic. */
static int64_t chunk_rows_for(int64_t n_out, int nth)
{
    if (nth == 1) return (n_out + 15) & ~(int64_t)15;
    int64_t chunk = (n_out + 4 * nth - 1) / (4 * nth);
    if (chunk < 16) chunk = 16;
    return (chunk + 15) & ~(int64_t)15;
}

/* Converts rows of X: items are (conversion, token) pairs, split in contiguous runs. */
static void convert_task(void *p, int ith, int nth)
{
    mm_job *job = p;
    int64_t items = job->n_convs * job->n_tok;
    int64_t per = (items + nth - 1) / nth;
    for (int64_t i = per * ith; i < items && i < per * (ith + 1); i++) {
        const mm_conv *cv = &job->convs[i / job->n_tok];
        int64_t t = i % job->n_tok;
        cv->cvt(job->X + t * job->n_in, cv->xc + (size_t)t * cv->row_bytes, job->n_in);
    }
}

static void matmul_task(void *p, int ith, int nth)
{
    mm_job *job = p;
    void *work = job->work ? job->work + (size_t)ith * job->work_stride : NULL;
    (void)nth;
    for (;;) {
        int64_t c = atomic_fetch_add_explicit(&job->next_chunk, 1, memory_order_relaxed);
        if (c >= job->n_chunks) break;
        int m = 0;
        while (m + 1 < job->n_mats && job->mats[m + 1].first_chunk <= c)
            m++;
        const mm_mat *mat = &job->mats[m];
        int64_t r0 = (c - mat->first_chunk) * job->chunk_rows;
        int64_t r1 = r0 + job->chunk_rows < mat->args.n_out ? r0 + job->chunk_rows : mat->args.n_out;
        mat->kernel.mm(&mat->args, r0, r1, work);
    }
}

int kern_matmul(kern_pool *pool, int wtype, const void *W, int64_t n_out, int64_t n_in,
                const float *X, int64_t n_tok, float *Y, forge_err *err)
{
    const kern_mm_desc d = {wtype, W, n_out, Y};
    return kern_matmul_multi(pool, 1, &d, n_in, X, n_tok, err);
}

int kern_matmul_multi(kern_pool *pool, int n_mats, const kern_mm_desc *mats, int64_t n_in,
                      const float *X, int64_t n_tok, forge_err *err)
{
    return kern_matmul_packed(pool, n_mats, mats, NULL, n_in, X, n_tok, err);
}

int kern_matmul_packed(kern_pool *pool, int n_mats, const kern_mm_desc *mats,
                       const kern_mm_packed *packed, int64_t n_in, const float *X, int64_t n_tok,
                       forge_err *err)
{
    mm_job job;
    uint8_t *own_scratch = NULL;
    int64_t total_rows = 0;
    int rc = FORGE_OK;

    if (n_mats < 1 || n_mats > KERN_MM_MULTI_MAX || !mats)
        return forge_err_set(err, FORGE_E_INVALID, "matmul: %d matrices (want 1..%d)", n_mats,
                             KERN_MM_MULTI_MAX);
    for (int i = 0; i < n_mats; i++) {
        const kern_mm_desc *d = &mats[i];
        if (!kern_matmul_supported(d->wtype))
            return forge_err_set(err, FORGE_E_UNSUPPORTED,
                                 "matmul: weight type %s (%d) is not supported",
                                 ggml_type_name(d->wtype), d->wtype);
        int64_t bs = ggml_type_block_size(d->wtype) > KERN_QK ? ggml_type_block_size(d->wtype) : KERN_QK;
        if (d->n_out < 0 || d->n_out > ((int64_t)1 << 40) || n_tok < 0 || n_in <= 0 ||
            n_in % bs != 0 || n_in > ((int64_t)1 << 40))
            return forge_err_set(err, FORGE_E_INVALID,
                                 "matmul: bad shape n_out %lld n_in %lld n_tok %lld (n_in must "
                                 "be a positive multiple of %lld for %s weights)",
                                 (long long)d->n_out, (long long)n_in, (long long)n_tok,
                                 (long long)bs, ggml_type_name(d->wtype));
        if (d->n_out > 0 && (!d->W || !d->Y))
            return forge_err_set(err, FORGE_E_INVALID, "matmul: NULL pointer argument");
        total_rows += d->n_out;
    }
    if (total_rows == 0 || n_tok == 0) return FORGE_OK;
    if (!X) return forge_err_set(err, FORGE_E_INVALID, "matmul: NULL pointer argument");

    memset(&job, 0, sizeof job);
    job.X = X;
    job.n_in = n_in;
    job.n_tok = n_tok;
    int nth = kern_pool_size(pool);
    job.chunk_rows = chunk_rows_for(total_rows, nth);
    kern_isa isa = kern_isa_current();
    size_t work_per_32 = 0;
    for (int i = 0; i < n_mats; i++) {
        if (mats[i].n_out == 0) continue;
        mm_mat *m = &job.mats[job.n_mats++];
        m->kernel = lookup_kernel(isa, mats[i].wtype);
        m->args.W = mats[i].W;
        m->args.w_row_bytes = weight_row_bytes(mats[i].wtype, n_in);
        m->args.n_out = mats[i].n_out;
        m->args.n_in = n_in;
        m->args.n_tok = n_tok;
        m->args.X = X;
        m->args.Y = mats[i].Y;
        m->args.dot = m->kernel.dot;
        m->args.dot4 = m->kernel.dot4;
        m->args.dot_r4 = m->kernel.dot_r4;
        /* a repacked copy only where it is the layout this kernel reads */
        if (packed && packed[i].R && m->kernel.layout != KERN_LAYOUT_FILE &&
            packed[i].layout == m->kernel.layout)
            m->args.R = packed[i].R;
        m->first_chunk = job.n_chunks;
        job.n_chunks += (mats[i].n_out + job.chunk_rows - 1) / job.chunk_rows;
        if (m->kernel.work_bytes_per_32 > work_per_32) work_per_32 = m->kernel.work_bytes_per_32;
        if (m->kernel.cvt) {
            int c = 0;
            while (c < job.n_convs && job.convs[c].cvt != m->kernel.cvt)
                c++;
            if (c == job.n_convs) {
                job.convs[c].cvt = m->kernel.cvt;
                job.convs[c].row_bytes =
                    m->kernel.xc_block ? (size_t)(n_in / m->kernel.xc_block) * m->kernel.xc_block_bytes
                                       : (size_t)(n_in / KERN_QK) * m->kernel.xc_row_bytes_per_32;
                job.n_convs++;
            }
            m->args.xc_row_bytes = job.convs[c].row_bytes;
        }
    }
    /* scratch: converted activations per conversion, then one kernel work area per thread */
    uint64_t xc_bytes = 0, conv_bytes, work_bytes = 0, total;
    for (int c = 0; c < job.n_convs; c++) {
        if (!forge_mul_u64((uint64_t)n_tok, job.convs[c].row_bytes, &conv_bytes) ||
            !forge_add_u64(xc_bytes, (conv_bytes + 63) & ~(uint64_t)63, &xc_bytes))
            goto overflow;
    }
    job.work_stride = ((size_t)(n_in / KERN_QK) * work_per_32 + 63) & ~(size_t)63;
    if (!forge_mul_u64((uint64_t)nth, job.work_stride, &work_bytes) ||
        !forge_add_u64(xc_bytes, work_bytes, &total) || total > SIZE_MAX / 2)
        goto overflow;
    if (total > 0) {
        uint8_t *scratch;
        if (pool) {
            scratch = kern_pool_scratch(pool, (size_t)total);
        } else {
            own_scratch = aligned_alloc(64, ((size_t)total + 63) & ~(size_t)63);
            scratch = own_scratch;
        }
        if (!scratch) {
            rc =
                forge_err_set(err, FORGE_E_NOMEM, "matmul: out of memory for %llu bytes of scratch",
                              (unsigned long long)total);
            goto done;
        }
        uint8_t *xc = scratch;
        for (int c = 0; c < job.n_convs; c++) {
            job.convs[c].xc = xc;
            xc += ((uint64_t)n_tok * job.convs[c].row_bytes + 63) & ~(uint64_t)63;
        }
        if (job.work_stride) job.work = scratch + xc_bytes;
    }
    if (job.n_convs > 0) {
        /* one token is converted faster than threads are woken */
        if (n_tok == 1)
            convert_task(&job, 0, 1);
        else
            kern_pool_run(pool, convert_task, &job);
        for (int i = 0; i < job.n_mats; i++) {
            mm_mat *m = &job.mats[i];
            for (int c = 0; c < job.n_convs && m->kernel.cvt; c++)
                if (job.convs[c].cvt == m->kernel.cvt) m->args.Xc = job.convs[c].xc;
        }
    }
    atomic_init(&job.next_chunk, 0);
    kern_pool_run(pool, matmul_task, &job);
    goto done;
overflow:
    rc = forge_err_set(err, FORGE_E_INVALID, "matmul: %lld tokens x %lld inputs overflow",
                       (long long)n_tok, (long long)n_in);
done:
    free(own_scratch);
    return rc;
}
