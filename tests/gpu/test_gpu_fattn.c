/* test_gpu_fattn.c - the tensor-core prompt attention (gpu_attention_prompt, gpu_fattn.cu) against
 * a double-precision CPU reference of causal softmax attention, and against the existing
 * gpu_attention_batch path. Shapes: 7B-like (32/32 heads, head_dim 128) and 1B-like (32/8, 64)
 * at 512 queries from position 0; short prompts (1, 17, 100 queries) after a cache prefix;
 * query counts that are not a multiple of the 64-query tile; F32 and F16 caches; GQA groups 1,
 * 4, 8; [pos][head][dim] and [head][pos][dim] caches; unaligned strides (the scalar load paths).
 * Cache rows past the prompt hold NaN (reading them would poison the result), outputs are
 * poisoned with NaN before the run, followed by guard bytes, and the gaps between output rows
 * (out_stride > n_head*head_dim) must stay untouched. NMSE threshold 5e-4 (fp16 products).
 *   test_gpu_fattn            needs a GPU (CUDA build; a HIP build reports every case skipped)
 * Also the prefill helpers of gpu_gemm.cu: gpu_weight_to_f16 (Q8_0/Q4_0 -> fp16, bit for bit
 * fp16(d * q) from GGUF blocks made here, aligned and unaligned outputs) and gpu_gemm_ex with
 * beta 1 (Y += W X) against a double reference.
 * One line per check, a final "N passed, M failed" line; exit status 0 only when all passed. */
#include <stdint.h>

#include "core/fp16.h"
#include "gpu_test_util.h"

#define THR_ATTN 5e-4

static gpu_stream *S;
static uint64_t g_seed = 0x51ED2701A3C4E5F7ULL;

typedef struct fa_case {
    int64_t n_head, n_kv_head, hd, n_q, pos0;
    int kv_type;
    int head_major;  /* cache [kv_head][max_kv][hd], else [max_kv][kv_head][hd] */
    int odd_strides; /* pad the cache/q/out strides so the 16-byte paths cannot be used */
    float q_amp;     /* query amplitude: larger values give peaked softmax rows */
    int vs_batch;    /* also run gpu_attention_batch and compare */
} fa_case;

/* A check with its own result line. */
static void ck(int cond, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("fattn     ");
    vprintf(fmt, ap);
    printf("  %s\n", cond ? "ok" : "FAIL");
    va_end(ap);
    if (cond)
        gt_pass++;
    else
        gt_fail++;
}

static void run_case(const fa_case *c)
{
    char what[160];
    const int64_t hd = c->hd, n_head = c->n_head, n_kvh = c->n_kv_head, n_q = c->n_q;
    const int64_t n_kv = c->pos0 + n_q;
    const int64_t max_kv = n_kv + 5; /* rows past the prompt: NaN, never read */
    const int64_t pad = c->odd_strides ? 3 : 0;
    const int64_t pos_stride = c->head_major ? hd + pad : n_kvh * hd + pad;
    const int64_t head_stride = c->head_major ? max_kv * (hd + pad) : hd;
    const int64_t cache_n = c->head_major ? n_kvh * head_stride : max_kv * pos_stride;
    const int64_t row = n_head * hd;
    const int64_t q_stride = row + (c->odd_strides ? 1 : 0);
    const int64_t out_stride = row + (c->odd_strides ? 5 : 8); /* gaps between output rows */
    const size_t out_n = (size_t)((n_q - 1) * out_stride + row);
    const size_t esz = c->kv_type == GGML_TYPE_F16 ? 2 : 4;
    const float scale = 1.0f / sqrtf((float)hd);
    const int64_t g = n_head / n_kvh;

    float *q = (float *)gt_xmalloc((size_t)(n_q * q_stride) * 4);
    float *kf = (float *)gt_xmalloc((size_t)cache_n * 4),
          *vf = (float *)gt_xmalloc((size_t)cache_n * 4);
    unsigned char *kraw = (unsigned char *)gt_xmalloc((size_t)cache_n * esz);
    unsigned char *vraw = (unsigned char *)gt_xmalloc((size_t)cache_n * esz);
    float *out = (float *)gt_xmalloc(out_n * 4);
    float *dense = (float *)gt_xmalloc((size_t)(n_q * row) * 4);
    double *ref = (double *)gt_xmalloc((size_t)(n_q * row) * 8);
    double *sc = (double *)gt_xmalloc((size_t)n_kv * 8);

    gt_fill(q, n_q * q_stride, c->q_amp, &g_seed);
    gt_fill(kf, cache_n, 1.0f, &g_seed);
    gt_fill(vf, cache_n, 1.0f, &g_seed);
    for (int64_t p = n_kv; p < max_kv; p++)
        for (int64_t h = 0; h < n_kvh; h++)
            for (int64_t d = 0; d < hd; d++) {
                kf[p * pos_stride + h * head_stride + d] = NAN;
                vf[p * pos_stride + h * head_stride + d] = NAN;
            }
    gt_kv_encode(kf, vf, cache_n, c->kv_type == GGML_TYPE_F16, kraw, vraw);

    /* reference: query i attends positions 0 .. pos0 + i */
    for (int64_t i = 0; i < n_q; i++) {
        const int64_t np = c->pos0 + i + 1;
        for (int64_t h = 0; h < n_head; h++) {
            const int64_t kvh = h / g;
            const float *qh = q + i * q_stride + h * hd;
            double mx = -INFINITY, sum = 0;
            for (int64_t p = 0; p < np; p++) {
                const float *kr = kf + p * pos_stride + kvh * head_stride;
                double s = 0;
                for (int64_t d = 0; d < hd; d++)
                    s += (double)qh[d] * kr[d];
                sc[p] = s * scale;
                if (sc[p] > mx) mx = sc[p];
            }
            for (int64_t p = 0; p < np; p++)
                sum += (sc[p] = exp(sc[p] - mx));
            double *o = ref + i * row + h * hd;
            for (int64_t d = 0; d < hd; d++)
                o[d] = 0;
            for (int64_t p = 0; p < np; p++) {
                const float *vr = vf + p * pos_stride + kvh * head_stride;
                const double w = sc[p] / sum;
                for (int64_t d = 0; d < hd; d++)
                    o[d] += w * vr[d];
            }
        }
    }

    void *d_k = gt_upload(kraw, (size_t)cache_n * esz, S);
    void *d_v = gt_upload(vraw, (size_t)cache_n * esz, S);
    float *d_q = (float *)gt_upload(q, (size_t)(n_q * q_stride) * 4, S);
    float *d_out = (float *)gt_out_alloc(out_n * 4);
    gpu_attn_args a = {0};
    a.d_q = d_q;
    a.d_k = d_k;
    a.d_v = d_v;
    a.kv_type = c->kv_type;
    a.pos_stride = pos_stride;
    a.head_stride = head_stride;
    a.n_head = n_head;
    a.n_kv_head = n_kvh;
    a.head_dim = hd;
    a.scale = scale;
    a.d_out = d_out;

    snprintf(what, sizeof what, "%s %s h %lld/%lld hd %lld n_q %lld pos0 %lld%s",
             ggml_type_name(c->kv_type), c->head_major ? "[h][p][d]" : "[p][h][d]",
             (long long)n_head, (long long)n_kvh, (long long)hd, (long long)n_q, (long long)c->pos0,
             c->odd_strides ? " odd strides" : "");
    gt_out_prepare(d_out, out_n * 4, S);
    forge_err e = {0};
    int rc = gpu_attention_prompt(&a, n_q, c->pos0, q_stride, out_stride, S, &e);
    if (rc != FORGE_OK) {
        printf("fattn     %-60s FAIL: %s (%s)\n", what, e.msg, forge_status_name(rc));
        gt_fail++;
    } else {
        int guard = gt_out_fetch(d_out, out_n * 4, out, S);
        int gaps_ok = 1;
        for (int64_t i = 0; i < n_q; i++) {
            memcpy(dense + i * row, out + i * out_stride, (size_t)row * 4);
            if (i + 1 < n_q)
                for (int64_t j = row; j < out_stride; j++) {
                    uint32_t u;
                    memcpy(&u, out + i * out_stride + j, 4);
                    gaps_ok &= u == 0xFFFFFFFFu;
                }
        }
        gt_report("fattn", what, gt_nmse(dense, ref, n_q * row), THR_ATTN, guard);
        ck(gaps_ok, "  same case: gaps between output rows untouched");

        if (c->vs_batch) {
            /* the existing path on the same inputs; both must agree */
            int32_t *pos = (int32_t *)gt_xmalloc((size_t)n_q * 4);
            float *bout = (float *)gt_xmalloc(out_n * 4);
            float *bdense = (float *)gt_xmalloc((size_t)(n_q * row) * 4);
            double *fref = (double *)gt_xmalloc((size_t)(n_q * row) * 8);
            for (int64_t i = 0; i < n_q; i++)
                pos[i] = (int32_t)(c->pos0 + i);
            int32_t *d_pos = (int32_t *)gt_upload(pos, (size_t)n_q * 4, S);
            size_t scr = (size_t)(n_q * n_head * (hd + 2)) * 4 * 4;
            void *d_scr = NULL;
            GT_OK(gpu_malloc(&d_scr, scr, err));
            float *d_bout = (float *)gt_out_alloc(out_n * 4);
            gt_out_prepare(d_bout, out_n * 4, S);
            a.d_pos = d_pos;
            a.max_kv = max_kv;
            a.d_scratch = d_scr;
            a.d_out = d_bout;
            GT_OK(gpu_attention_batch(&a, n_q, q_stride, out_stride, scr, S, err));
            int bguard = gt_out_fetch(d_bout, out_n * 4, bout, S);
            for (int64_t i = 0; i < n_q; i++)
                memcpy(bdense + i * row, bout + i * out_stride, (size_t)row * 4);
            for (int64_t i = 0; i < n_q * row; i++)
                fref[i] = bdense[i];
            gt_report("fattn", "  same case: gpu_attention_batch vs CPU ref",
                      gt_nmse(bdense, ref, n_q * row), THR_ATTN, bguard);
            gt_report("fattn", "  same case: prompt vs gpu_attention_batch",
                      gt_nmse(dense, fref, n_q * row), THR_ATTN, guard);
            gpu_free(d_pos);
            gpu_free(d_scr);
            gpu_free(d_bout);
            free(pos);
            free(bout);
            free(bdense);
            free(fref);
        }
    }
    gpu_free(d_k);
    gpu_free(d_v);
    gpu_free(d_q);
    gpu_free(d_out);
    free(q);
    free(kf);
    free(vf);
    free(kraw);
    free(vraw);
    free(out);
    free(dense);
    free(ref);
    free(sc);
}

/* ---- gpu_weight_to_f16 ------------------------------------------------------------------- */
/* GGUF blocks with random quants and scales; expected fp16 bits = fp16(fp16_to_f32(d) * q). */
static void test_w2h(int t, int64_t rows, int64_t n_in, size_t out_off)
{
    const int64_t n = rows * n_in, nb = n / 32;
    const size_t bsz = t == GGML_TYPE_Q4_0 ? 18 : 34;
    unsigned char *raw = (unsigned char *)gt_xmalloc((size_t)nb * bsz);
    uint16_t *want = (uint16_t *)gt_xmalloc((size_t)n * 2),
             *got = (uint16_t *)gt_xmalloc((size_t)n * 2);
    for (int64_t b = 0; b < nb; b++) {
        unsigned char *blk = raw + b * bsz;
        uint16_t d = forge_f32_to_fp16(0.02f * gt_uniform(&g_seed) + (b % 7 == 0 ? 0.0f : 1e-3f));
        memcpy(blk, &d, 2);
        for (size_t j = 2; j < bsz; j++)
            blk[j] = (unsigned char)(gt_rand_u64(&g_seed) >> 56);
        const float df = forge_fp16_to_f32(d);
        for (int j = 0; j < 32; j++) {
            int q;
            if (t == GGML_TYPE_Q4_0)
                q = (j < 16 ? (blk[2 + j] & 15) : (blk[2 + j - 16] >> 4)) - 8;
            else
                q = (int)(signed char)blk[2 + j];
            want[b * 32 + j] = forge_f32_to_fp16(df * (float)q);
        }
    }
    void *d_raw = gt_upload(raw, (size_t)nb * bsz, S);
    void *d_w = NULL;
    GT_OK(gpu_malloc(&d_w, gpu_weight_bytes(t, rows, n_in), err));
    GT_OK(gpu_weight_convert(t, d_raw, d_w, rows, n_in, S, err));
    unsigned char *d_out = (unsigned char *)gt_out_alloc((size_t)n * 2 + out_off);
    gt_out_prepare(d_out, (size_t)n * 2 + out_off, S);
    GT_OK(gpu_weight_to_f16(t, d_w, rows, n_in, d_out + out_off, S, err));
    unsigned char *h = (unsigned char *)gt_xmalloc((size_t)n * 2 + out_off);
    int guard = gt_out_fetch(d_out, (size_t)n * 2 + out_off, h, S);
    memcpy(got, h + out_off, (size_t)n * 2);
    int64_t bad = 0, first = -1;
    for (int64_t i = 0; i < n; i++)
        if (got[i] != want[i]) {
            if (first < 0) first = i;
            bad++;
        }
    ck(bad == 0 && guard, "w2h %s %lld x %lld%s: %lld of %lld values differ%s", ggml_type_name(t),
       (long long)rows, (long long)n_in, out_off ? " (unaligned out)" : "", (long long)bad,
       (long long)n, guard ? "" : ", GUARD BYTES OVERWRITTEN");
    if (first >= 0)
        printf("          first difference at %lld: got 0x%04x want 0x%04x\n", (long long)first,
               got[first], want[first]);
    gpu_free(d_raw);
    gpu_free(d_w);
    gpu_free(d_out);
    free(raw);
    free(want);
    free(got);
    free(h);
}

/* ---- gpu_gemm_ex with beta 1 ------------------------------------------------------------- */
static void test_gemm_ex(gpu_blas *blas, int64_t n_out, int64_t n_in, int64_t n_tok)
{
    char what[96];
    float *w = (float *)gt_xmalloc((size_t)(n_out * n_in) * 4);
    uint16_t *wh = (uint16_t *)gt_xmalloc((size_t)(n_out * n_in) * 2);
    float *x = (float *)gt_xmalloc((size_t)(n_tok * n_in) * 4);
    float *y0 = (float *)gt_xmalloc((size_t)(n_tok * n_out) * 4);
    float *y = (float *)gt_xmalloc((size_t)(n_tok * n_out) * 4);
    double *ref = (double *)gt_xmalloc((size_t)(n_tok * n_out) * 8);
    for (int64_t i = 0; i < n_out * n_in; i++) {
        wh[i] = forge_f32_to_fp16(gt_uniform(&g_seed));
        w[i] = forge_fp16_to_f32(wh[i]);
    }
    gt_fill(x, n_tok * n_in, 1.0f, &g_seed);
    gt_fill(y0, n_tok * n_out, 4.0f, &g_seed);
    for (int64_t t2 = 0; t2 < n_tok; t2++)
        for (int64_t o = 0; o < n_out; o++) {
            double acc = y0[t2 * n_out + o];
            for (int64_t i = 0; i < n_in; i++)
                acc += (double)w[o * n_in + i] *
                       forge_fp16_to_f32(forge_f32_to_fp16(x[t2 * n_in + i]));
            ref[t2 * n_out + o] = acc;
        }
    void *d_w = gt_upload(wh, (size_t)(n_out * n_in) * 2, S);
    float *d_x = (float *)gt_upload(x, (size_t)(n_tok * n_in) * 4, S);
    float *d_y = (float *)gt_out_alloc((size_t)(n_tok * n_out) * 4);
    void *d_xc = NULL;
    GT_OK(gpu_malloc(&d_xc, (size_t)(n_tok * n_in) * 2, err));
    gt_out_prepare(d_y, (size_t)(n_tok * n_out) * 4, S);
    GT_OK(gpu_memcpy_h2d(d_y, y0, (size_t)(n_tok * n_out) * 4, S, err));
    GT_OK(gpu_gemm_ex(blas, GGML_TYPE_F16, d_w, n_out, n_in, d_x, n_tok, d_xc, d_y, 1.0f, S, err));
    int guard = gt_out_fetch(d_y, (size_t)(n_tok * n_out) * 4, y, S);
    snprintf(what, sizeof what, "gemm_ex F16 beta 1: %lldx%lld, %lld tokens", (long long)n_out,
             (long long)n_in, (long long)n_tok);
    gt_report("gemm", what, gt_nmse(y, ref, n_tok * n_out), 1e-5, guard);
    gpu_free(d_w);
    gpu_free(d_x);
    gpu_free(d_y);
    gpu_free(d_xc);
    free(w);
    free(wh);
    free(x);
    free(y0);
    free(y);
    free(ref);
}

static void test_api(void)
{
    ck(gpu_attention_prompt_supported(64, GGML_TYPE_F16) &&
           gpu_attention_prompt_supported(128, GGML_TYPE_F32),
       "supported: head_dim 64/F16 and 128/F32");
    ck(!gpu_attention_prompt_supported(80, GGML_TYPE_F16) &&
           !gpu_attention_prompt_supported(256, GGML_TYPE_F32) &&
           !gpu_attention_prompt_supported(128, GGML_TYPE_Q8_0),
       "unsupported: head_dim 80, 256, Q8_0 cache");
    float dummy[4];
    gpu_attn_args a = {0};
    a.d_q = dummy;
    a.d_k = a.d_v = dummy;
    a.d_out = dummy;
    a.kv_type = GGML_TYPE_F16;
    a.n_head = 4;
    a.n_kv_head = 4;
    a.head_dim = 80;
    forge_err e = {0};
    int rc = gpu_attention_prompt(&a, 4, 0, 320, 320, S, &e);
    ck(rc == FORGE_E_UNSUPPORTED && e.msg[0], "head_dim 80 gives UNSUPPORTED: %s: %s",
       forge_status_name(rc), e.msg);
    a.head_dim = 64;
    a.n_kv_head = 3;
    e = (forge_err){0};
    rc = gpu_attention_prompt(&a, 4, 0, 256, 256, S, &e);
    ck(rc == FORGE_E_INVALID && e.msg[0], "4 heads / 3 kv heads gives INVALID: %s",
       forge_status_name(rc));
    a.n_kv_head = 4;
    a.d_k = NULL;
    e = (forge_err){0};
    rc = gpu_attention_prompt(&a, 4, 0, 256, 256, S, &e);
    ck(rc == FORGE_E_INVALID && e.msg[0], "NULL K gives INVALID: %s", forge_status_name(rc));
}

int main(int argc, char **argv)
{
    /* --quick: the cases with at most 130 queries (for compute-sanitizer runs) */
    const int quick = argc > 1 && !strcmp(argv[1], "--quick");
    gpu_device_info info;
    GT_OK(gpu_device_info_get(0, &info, err));
    printf("device: %s (%s), cc %d.%d, %d SMs\n", info.name, gpu_backend_name(), info.cc_major,
           info.cc_minor, info.sm_count);
    GT_OK(gpu_stream_create(&S, err));

    /* prefill helpers first: they run in every build (the GEMM only where there is a BLAS) */
    static const int64_t w2h_shapes[][2] = {
        {1, 32}, {3, 96}, {17, 4096}, {300, 4096}, {11008, 128}};
    for (int qt = 0; qt < 2; qt++) {
        int t = qt ? GGML_TYPE_Q8_0 : GGML_TYPE_Q4_0;
        for (size_t i = 0; i < GT_LEN(w2h_shapes); i++)
            test_w2h(t, w2h_shapes[i][0], w2h_shapes[i][1], 0);
        test_w2h(t, 5, 160, 2); /* output not 16-byte aligned: the scalar kernel */
    }
    {
        gpu_blas *blas = NULL;
        forge_err be = {0};
        if (gpu_blas_create(&blas, &be) == FORGE_OK) {
            test_gemm_ex(blas, 64, 128, 5);
            test_gemm_ex(blas, 300, 512, 17);
            gpu_blas_free(blas);
        } else {
            printf("gemm      skipped: %s\n", be.msg);
        }
    }

    if (!gpu_attention_prompt_supported(128, GGML_TYPE_F16)) {
        printf("fattn     skipped: gpu_attention_prompt is not available in this %s build\n",
               gpu_backend_name());
        gpu_stream_destroy(S);
        printf("\ntest_gpu_fattn: %d passed, %d failed\n", gt_pass, gt_fail);
        return 0;
    }
    test_api();
    /* n_head, n_kv_head, hd, n_q, pos0, kv_type, head_major, odd_strides, q_amp, vs_batch */
    static const fa_case cases[] = {
        {32, 32, 128, 512, 0, GGML_TYPE_F16, 0, 0, 2.0f, 1}, /* 7B-like */
        {32, 32, 128, 512, 0, GGML_TYPE_F32, 0, 0, 2.0f, 0},
        {32, 8, 64, 512, 0, GGML_TYPE_F16, 0, 0, 2.0f, 0}, /* 1B-like */
        {32, 8, 64, 512, 0, GGML_TYPE_F32, 1, 0, 2.0f, 0},
        {8, 8, 128, 1, 300, GGML_TYPE_F16, 0, 0, 2.0f, 0},   /* one query after a prefix */
        {8, 2, 64, 17, 100, GGML_TYPE_F32, 1, 0, 2.0f, 0},   /* group 4 */
        {16, 2, 128, 100, 37, GGML_TYPE_F16, 0, 0, 2.0f, 0}, /* group 8 */
        {4, 1, 64, 100, 1000, GGML_TYPE_F32, 0, 0, 2.0f, 0},
        {6, 3, 64, 77, 0, GGML_TYPE_F16, 1, 0, 2.0f, 0},
        {4, 4, 128, 65, 63, GGML_TYPE_F16, 0, 0, 6.0f, 0}, /* peaked rows, tile edges */
        {8, 2, 128, 130, 0, GGML_TYPE_F32, 0, 0, 6.0f, 0},
        {4, 4, 64, 1, 0, GGML_TYPE_F16, 0, 0, 2.0f, 0},    /* a single position */
        {8, 2, 64, 33, 200, GGML_TYPE_F16, 0, 1, 2.0f, 0}, /* scalar load/store paths */
        {4, 4, 128, 70, 5, GGML_TYPE_F32, 1, 1, 2.0f, 0},
        {8, 1, 128, 200, 150, GGML_TYPE_F16, 1, 0, 2.0f, 0}, /* group 8, head-major */
    };
    for (size_t i = 0; i < GT_LEN(cases); i++)
        if (!quick || cases[i].n_q <= 130) run_case(&cases[i]);
    gpu_stream_destroy(S);
    printf("\ntest_gpu_fattn: %d passed, %d failed\n", gt_pass, gt_fail);
    return gt_fail ? 1 : 0;
}
