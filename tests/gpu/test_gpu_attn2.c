/* test_gpu_attn2.c - RoPE with YaRN (gpu_rope_ext), the fused Q/K norm + RoPE + KV store
 * (gpu_qk_rope_store) and the F16-cache attention numerics (the CPU backend's fp16 rounding of
 * the query and of the normalised probabilities), each against a CPU reference written here
 * after src/cpu/backend_cpu.c (cpu_rmsnorm, cpu_rope, attn_worker: float arithmetic, double sums
 * where the CPU has them).
 *   - RoPE: NMSE <= 1e-10 against the CPU rope (theta built by repeated products, as the CPU).
 *   - Fused op: q and the k rows by NMSE; v rows bit-exact; F16 k elements within half an fp16
 *     spacing of the float reference (+1e-6 of the row's rms for float differences); every other
 *     cache row untouched (poisoned first).
 *   - F16 attention, probe: V is zero except one 1.0 per output dim at a chosen position, so each
 *     output is one probability as the GPU rounded it; it must be the reference's fp16 value,
 *     or its fp16 neighbour where the float probability lies within 4e-5 (relative) of a
 *     rounding midpoint (the scores differ in the last bits by summation order). The probes
 *     are spread over all positions (all splits), so the global max and sum are checked too.
 *   - F16 attention, random V: NMSE <= 1e-7 (a sanity bound: one p rounded the other way moves
 *     a short sum by up to ~2e-8); F32 attention: NMSE <= 1e-9 against the reference.
 * One line per check, then "N passed, M failed"; exit status 0 only when all passed. */
#include "core/fp16.h"
#include "gpu_test_util.h"

#define THR_EXACT 1e-10
#define THR_F32_ATTN 1e-9
#define AMBIG_REL 4e-5 /* attention p: scores differ by ~1e-6 */

static gpu_stream *S;
static uint64_t g_seed = 0x243F6A8885A308D3ULL;

/* ---- RoPE reference (cpu_rope, positions from an array) -------------------------------------- */
typedef struct ref_rope {
    int mode, n_rot;
    float freq_base, freq_scale;
    const float *ff; /* host, n_rot/2, or NULL */
    float ext_factor, attn_factor, corr_dims[2];
} ref_rope;

static void ref_rope_apply(float *x, int n_tok, int n_head, int head_dim, const int32_t *pos,
                           const ref_rope *rp)
{
    const int n_rot = rp->n_rot;
    float *cache = (float *)gt_xmalloc((size_t)n_rot * sizeof(float));
    const float theta_scale = powf(rp->freq_base, -2.0f / (float)n_rot);
    float mscale = rp->attn_factor;
    if (rp->ext_factor != 0.0f) mscale *= 1.0f + 0.1f * logf(1.0f / rp->freq_scale);
    for (int t = 0; t < n_tok; t++) {
        float theta = (float)pos[t];
        for (int i0 = 0; i0 < n_rot; i0 += 2) {
            float f = rp->ff ? rp->ff[i0 / 2] : 1.0f;
            float extrap = theta / f, th = rp->freq_scale * extrap;
            if (rp->ext_factor != 0.0f) {
                float y = ((float)(i0 / 2) - rp->corr_dims[0]) /
                          fmaxf(0.001f, rp->corr_dims[1] - rp->corr_dims[0]);
                float ramp = (1.0f - fminf(1.0f, fmaxf(0.0f, y))) * rp->ext_factor;
                th = th * (1.0f - ramp) + extrap * ramp;
            }
            cache[i0] = cosf(th) * mscale;
            cache[i0 + 1] = sinf(th) * mscale;
            theta *= theta_scale;
        }
        for (int h = 0; h < n_head; h++) {
            float *v = x + ((int64_t)t * n_head + h) * head_dim;
            for (int i0 = 0; i0 < n_rot; i0 += 2) {
                int a = rp->mode == GPU_ROPE_NEOX ? i0 / 2 : i0;
                int b = rp->mode == GPU_ROPE_NEOX ? i0 / 2 + n_rot / 2 : i0 + 1;
                float x0 = v[a], x1 = v[b], cs = cache[i0], sn = cache[i0 + 1];
                v[a] = x0 * cs - x1 * sn;
                v[b] = x0 * sn + x1 * cs;
            }
        }
    }
    free(cache);
}

/* cpu_rmsnorm on rows of dim floats (double sum of float squares). */
static void ref_rmsnorm(float *x, int64_t rows, int64_t dim, const float *w, float eps)
{
    for (int64_t r = 0; r < rows; r++) {
        float *xr = x + r * dim;
        double sum = 0.0;
        for (int64_t i = 0; i < dim; i++)
            sum += (double)(xr[i] * xr[i]);
        double mean = sum / (double)dim;
        const float scale = 1.0f / sqrtf((float)(mean + (double)eps));
        for (int64_t i = 0; i < dim; i++)
            xr[i] = xr[i] * scale;
        for (int64_t i = 0; i < dim; i++)
            xr[i] = xr[i] * w[i];
    }
}

/* ggml's YaRN correction dims: the dims whose wavelength spans n_ctx_orig / beta rotations. */
static float yarn_corr_dim(int n_dims, int n_ctx_orig, float n_rot, float base)
{
    return (float)n_dims * logf((float)n_ctx_orig / (n_rot * 2.0f * (float)M_PI)) /
           (2.0f * logf(base));
}
static void yarn_corr_dims(int n_dims, int n_ctx_orig, float base, float beta_fast,
                           float beta_slow, float dims[2])
{
    float start = floorf(yarn_corr_dim(n_dims, n_ctx_orig, beta_fast, base));
    float end = ceilf(yarn_corr_dim(n_dims, n_ctx_orig, beta_slow, base));
    dims[0] = start > 0.0f ? start : 0.0f;
    dims[1] = end < (float)(n_dims - 1) ? end : (float)(n_dims - 1);
}

static gpu_rope_params to_gpu(const ref_rope *r, const float *d_ff)
{
    gpu_rope_params g;
    memset(&g, 0, sizeof g);
    g.mode = r->mode;
    g.n_dims = r->n_rot;
    g.freq_base = r->freq_base;
    g.freq_scale = r->freq_scale;
    g.d_freq_factors = d_ff;
    g.ext_factor = r->ext_factor;
    g.attn_factor = r->attn_factor;
    g.corr_dims[0] = r->corr_dims[0];
    g.corr_dims[1] = r->corr_dims[1];
    return g;
}

static double nmse_f(const float *out, const float *ref, int64_t n)
{
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(out[i])) return INFINITY;
        double d = (double)out[i] - ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    return den > 0 ? num / den : num;
}

static float *make_ff(int n_rot)
{
    float *ff = (float *)gt_xmalloc((size_t)(n_rot / 2) * sizeof(float));
    for (int i = 0; i < n_rot / 2; i++)
        ff[i] = 1.0f + (float)(i % 7) * 0.75f;
    return ff;
}

/* kind: 0 plain, 1 YaRN, 2 freq factors, 3 attn_factor 0.8; legacy: through gpu_rope. */
static void test_rope(int mode, int n_tok, int n_head, int hd, int n_rot, const int32_t *pos,
                      float base, int kind, int legacy)
{
    char what[128];
    int64_t n = (int64_t)n_tok * n_head * hd;
    float *x = (float *)gt_xmalloc((size_t)n * 4), *ref = (float *)gt_xmalloc((size_t)n * 4);
    float *y = (float *)gt_xmalloc((size_t)n * 4);
    float *ff = kind == 2 ? make_ff(n_rot) : NULL;
    ref_rope r = {mode, n_rot, base, 1.0f, ff, 0.0f, 1.0f, {0.0f, 0.0f}};
    if (kind == 1) {
        r.ext_factor = 1.0f;
        r.freq_scale = 0.25f;
        yarn_corr_dims(n_rot, 4096, base, 32.0f, 1.0f, r.corr_dims);
    }
    if (kind == 3) r.attn_factor = 0.8f;
    if (legacy && kind == 0) r.freq_scale = 0.5f;
    gt_fill(x, n, 2.0f, &g_seed);
    memcpy(ref, x, (size_t)n * 4);
    ref_rope_apply(ref, n_tok, n_head, hd, pos, &r);
    float *d_x = (float *)gt_out_alloc((size_t)n * 4);
    int32_t *d_pos = (int32_t *)gt_upload(pos, (size_t)n_tok * 4, S);
    float *d_ff = ff ? (float *)gt_upload(ff, (size_t)(n_rot / 2) * 4, S) : NULL;
    gpu_rope_params gp = to_gpu(&r, d_ff);
    GT_OK(gpu_memset((char *)d_x + n * 4, GT_GUARD_BYTE, GT_GUARD_BYTES, S, err));
    GT_OK(gpu_memcpy_h2d(d_x, x, (size_t)n * 4, S, err));
    if (legacy)
        GT_OK(gpu_rope(d_x, n_tok, n_head, hd, n_rot, mode, d_pos, r.freq_base, r.freq_scale, d_ff,
                       S, err));
    else
        GT_OK(gpu_rope_ext(d_x, n_tok, n_head, hd, &gp, d_pos, S, err));
    int guard = gt_out_fetch(d_x, (size_t)n * 4, y, S);
    static const char *kinds[] = {"", " YaRN", " ff", " attn_factor"};
    snprintf(what, sizeof what, "%s%s tok %d heads %d hd %d rot %d pos %d%s",
             legacy ? "gpu_rope " : "", mode == GPU_ROPE_NEOX ? "NEOX" : "NORM", n_tok, n_head, hd,
             n_rot, pos[n_tok - 1], kinds[kind]);
    gt_report("rope", what, nmse_f(y, ref, n), THR_EXACT, guard);
    gpu_free(d_x);
    gpu_free(d_pos);
    gpu_free(d_ff);
    free(x);
    free(ref);
    free(y);
    free(ff);
}

/* ---- fused Q/K norm + RoPE + store ---------------------------------------------------------- */
/* The fp16 neighbour of h = round(r) on the side of the float value r. */
static uint16_t fp16_neighbour(float r, uint16_t h)
{
    float hf = forge_fp16_to_f32(h);
    if ((h & 0x7fff) == 0) return (uint16_t)(r >= 0 ? 0x0001 : 0x8001);
    return (uint16_t)((r > hf) == !(h & 0x8000) ? h + 1 : h - 1);
}

/* r lies within rel (relative) of the midpoint between its rounding h and the neighbour: a
 * value that differs from r in the last bits may round either way. */
static int fp16_ambiguous(float r, uint16_t h, double rel)
{
    float hf = forge_fp16_to_f32(h);
    if (hf == r || !isfinite(r)) return 0;
    double mid = 0.5 * ((double)hf + forge_fp16_to_f32(fp16_neighbour(r, h)));
    return fabs((double)r - mid) <= rel * fabs((double)r);
}

/* The spacing of fp16 values around |x|. */
static double fp16_spacing(float x)
{
    int e;
    (void)frexpf(x, &e); /* |x| in [2^(e-1), 2^e) */
    double sp = ldexp(1.0, e - 11);
    return sp > 0x1p-24 ? sp : 0x1p-24;
}

static void test_fused(int n_tok, int n_head, int n_kv_head, int hd, int n_rot, int mode,
                       int norms, int kv_type, int yarn)
{
    char what[128];
    const int f16 = kv_type == GGML_TYPE_F16;
    const size_t esz = f16 ? 2 : 4;
    const int64_t kvd = (int64_t)n_kv_head * hd, pos_stride = kvd + 8; /* padded rows */
    const int64_t n_ctx = 300, qn = (int64_t)n_tok * n_head * hd, kn = (int64_t)n_tok * kvd;
    const size_t cache_bytes = (size_t)(n_ctx * pos_stride) * esz;
    const float eps = 1e-6f;
    static const int32_t all_pos[] = {17, 299, 0, 123, 64, 5, 250};
    const int32_t *pos = n_tok == 1 ? all_pos + 3 : all_pos;
    float *q = (float *)gt_xmalloc((size_t)qn * 4), *k = (float *)gt_xmalloc((size_t)kn * 4);
    float *v = (float *)gt_xmalloc((size_t)kn * 4), *qref = (float *)gt_xmalloc((size_t)qn * 4);
    float *kref = (float *)gt_xmalloc((size_t)kn * 4), *qout = (float *)gt_xmalloc((size_t)qn * 4);
    float *qw = (float *)gt_xmalloc((size_t)hd * 4), *kw = (float *)gt_xmalloc((size_t)hd * 4);
    unsigned char *kc = (unsigned char *)gt_xmalloc(cache_bytes);
    unsigned char *vc = (unsigned char *)gt_xmalloc(cache_bytes);
    float *kgot = (float *)gt_xmalloc((size_t)kn * 4);
    gt_fill(q, qn, 3.0f, &g_seed);
    gt_fill(k, kn, 3.0f, &g_seed);
    gt_fill(v, kn, 3.0f, &g_seed);
    for (int i = 0; i < hd; i++) {
        qw[i] = 0.5f + 0.01f * (float)(i % 50);
        kw[i] = 1.5f - 0.013f * (float)(i % 40);
    }
    ref_rope r = {mode, n_rot, 1000000.0f, 1.0f, NULL, 0.0f, 1.0f, {0.0f, 0.0f}};
    if (yarn) {
        r.ext_factor = 1.0f;
        r.freq_scale = 0.25f;
        yarn_corr_dims(n_rot, 4096, r.freq_base, 32.0f, 1.0f, r.corr_dims);
    }
    memcpy(qref, q, (size_t)qn * 4);
    memcpy(kref, k, (size_t)kn * 4);
    if (norms) {
        ref_rmsnorm(qref, (int64_t)n_tok * n_head, hd, qw, eps);
        ref_rmsnorm(kref, (int64_t)n_tok * n_kv_head, hd, kw, eps);
    }
    ref_rope_apply(qref, n_tok, n_head, hd, pos, &r);
    ref_rope_apply(kref, n_tok, n_kv_head, hd, pos, &r);

    float *d_q = (float *)gt_out_alloc((size_t)qn * 4);
    float *d_k = (float *)gt_upload(k, (size_t)kn * 4, S),
          *d_v = (float *)gt_upload(v, (size_t)kn * 4, S);
    float *d_qw = (float *)gt_upload(qw, (size_t)hd * 4, S),
          *d_kw = (float *)gt_upload(kw, (size_t)hd * 4, S);
    int32_t *d_pos = (int32_t *)gt_upload(pos, (size_t)n_tok * 4, S);
    void *d_kc = gt_out_alloc(cache_bytes), *d_vc = gt_out_alloc(cache_bytes);
    gt_out_prepare(d_kc, cache_bytes, S); /* 0xFF: NaN in F32 and F16 */
    gt_out_prepare(d_vc, cache_bytes, S);
    GT_OK(gpu_memset((char *)d_q + qn * 4, GT_GUARD_BYTE, GT_GUARD_BYTES, S, err));
    GT_OK(gpu_memcpy_h2d(d_q, q, (size_t)qn * 4, S, err));
    gpu_rope_params gp = to_gpu(&r, NULL);
    GT_OK(gpu_qk_rope_store(d_q, d_k, d_v, n_tok, n_head, n_kv_head, hd, norms ? d_qw : NULL,
                            norms ? d_kw : NULL, eps, &gp, d_pos, d_kc, d_vc, kv_type, pos_stride,
                            S, err));
    int guard = gt_out_fetch(d_q, (size_t)qn * 4, qout, S);
    guard &= gt_out_fetch(d_kc, cache_bytes, kc, S);
    guard &= gt_out_fetch(d_vc, cache_bytes, vc, S);

    /* rows written: k by value, v exactly; everything else still 0xFF */
    int v_exact = 1, k_f16_ok = 1, untouched = 1, n_ulp = 0;
    char *written = (char *)calloc((size_t)n_ctx, 1);
    double row_rms[8];
    for (int t = 0; t < n_tok; t++) {
        double ss = 0;
        for (int64_t j = 0; j < kvd; j++)
            ss += (double)kref[t * kvd + j] * kref[t * kvd + j];
        row_rms[t] = sqrt(ss / (double)kvd);
    }
    for (int t = 0; t < n_tok; t++) {
        written[pos[t]] = 1;
        for (int64_t j = 0; j < kvd; j++) {
            size_t at = (size_t)((int64_t)pos[t] * pos_stride + j);
            float kr = kref[t * kvd + j], vr = v[t * kvd + j];
            if (f16) {
                uint16_t hk, hv;
                memcpy(&hk, kc + 2 * at, 2);
                memcpy(&hv, vc + 2 * at, 2);
                /* rounded to nearest: within half a spacing, plus a slack for the float
                 * differences of the rotation (cancellation makes them large relative to a
                 * small element) */
                float got = forge_fp16_to_f32(hk);
                kgot[t * kvd + j] = got;
                if (hk != forge_f32_to_fp16(kr)) n_ulp++;
                if (!(fabs((double)got - kr) <= 0.5 * fp16_spacing(kr) + 1e-6 * row_rms[t]))
                    k_f16_ok = 0;
                v_exact &= hv == forge_f32_to_fp16(vr);
            } else {
                float fk, fv;
                memcpy(&fk, kc + 4 * at, 4);
                memcpy(&fv, vc + 4 * at, 4);
                kgot[t * kvd + j] = fk;
                v_exact &= memcmp(&fv, &vr, 4) == 0;
            }
        }
    }
    for (int64_t p = 0; p < n_ctx; p++)
        for (int64_t j = 0; j < pos_stride; j++) {
            size_t at = (size_t)(p * pos_stride + j) * esz;
            int row_data = written[p] && j < kvd;
            for (size_t b = 0; b < esz && !row_data; b++)
                untouched &= kc[at + b] == 0xFF && vc[at + b] == 0xFF;
        }
    snprintf(what, sizeof what, "%s tok %d h %d/%d hd %d rot %d %s%s%s",
             mode == GPU_ROPE_NEOX ? "NEOX" : "NORM", n_tok, n_head, n_kv_head, hd, n_rot,
             f16 ? "F16" : "F32", norms ? " qk-norm" : "", yarn ? " YaRN" : "");
    gt_report("fused q", what, nmse_f(qout, qref, qn), THR_EXACT, guard);
    gt_report("fused k", what, nmse_f(kgot, kref, kn), f16 ? 1e-6 : THR_EXACT, guard);
    printf("fused kv  %-46s v %s, k%s %s (%d elements rounded the other way), other rows %s  %s\n",
           what, v_exact ? "exact" : "WRONG", f16 ? " fp16" : "", k_f16_ok ? "ok" : "WRONG", n_ulp,
           untouched ? "untouched" : "WRITTEN", v_exact && k_f16_ok && untouched ? "ok" : "FAIL");
    gt_check(v_exact && k_f16_ok && untouched, "fused kv %s", what);
    gpu_free(d_q);
    gpu_free(d_k);
    gpu_free(d_v);
    gpu_free(d_qw);
    gpu_free(d_kw);
    gpu_free(d_pos);
    gpu_free(d_kc);
    gpu_free(d_vc);
    free(written);
    free(q);
    free(k);
    free(v);
    free(qref);
    free(kref);
    free(qout);
    free(qw);
    free(kw);
    free(kc);
    free(vc);
    free(kgot);
}

/* ---- attention ------------------------------------------------------------------------------ */
/* dot_row of backend_cpu.c: four partial float sums. */
static float ref_dot(const float *row, const float *x, int n)
{
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += row[i] * x[i];
        s1 += row[i + 1] * x[i + 1];
        s2 += row[i + 2] * x[i + 2];
        s3 += row[i + 3] * x[i + 3];
    }
    for (; i < n; i++)
        s0 += row[i] * x[i];
    return (s0 + s1) + (s2 + s3);
}

static float r16(float x)
{
    return forge_fp16_to_f32(forge_f32_to_fp16(x));
}

typedef struct attn_case {
    int n_head, n_kv_head, hd;
    int head_major;
    int64_t max_kv;
} attn_case;

/* attn_worker for one query head over n_kv positions of caches kf/vf (values as floats, already
 * fp16 for F16): out[hd] (double accumulation of the float probabilities), pf[n_kv] the
 * normalised probabilities before the fp16 rounding. */
static void ref_attn_head(const attn_case *c, const float *kf, const float *vf, const float *qh,
                          int h, int n_kv, int f16, float scale, float *pf, float *row,
                          double *out)
{
    const int hd = c->hd, kvh = h / (c->n_head / c->n_kv_head);
    const int64_t ps = c->head_major ? hd : (int64_t)c->n_kv_head * hd;
    const int64_t hs = c->head_major ? c->max_kv * hd : hd;
    float q16[256];
    for (int d = 0; d < hd; d++)
        q16[d] = f16 ? r16(qh[d]) : qh[d];
    float mx = -INFINITY;
    for (int p = 0; p < n_kv; p++) {
        for (int d = 0; d < hd; d++)
            row[d] = kf[p * ps + kvh * hs + d];
        float s = ref_dot(row, q16, hd) * scale;
        pf[p] = s;
        if (s > mx) mx = s;
    }
    double sum = 0.0;
    for (int p = 0; p < n_kv; p++) {
        float e = expf(pf[p] - mx);
        sum += (double)e;
        pf[p] = e;
    }
    const float inv = (float)(1.0 / sum);
    for (int d = 0; d < hd; d++)
        out[d] = 0.0;
    for (int p = 0; p < n_kv; p++) {
        pf[p] *= inv;
        float pr = f16 ? r16(pf[p]) : pf[p];
        for (int d = 0; d < hd; d++)
            out[d] += (double)pr * vf[p * ps + kvh * hs + d];
    }
}

/* The probe position of output dim d: V is zero except V[probe(d)][kvh][d] = 1, so that
 * out[h][d] = p[h][probe(d)] exactly and the GPU's probabilities can be read one by one. */
static int64_t probe_pos(int64_t d, int64_t n_kv, int hd)
{
    if (n_kv <= hd) return d < n_kv ? d : -1;
    return d * n_kv / hd;
}

/* n_q queries at positions pos0 .. pos0 + n_q - 1 (n_q 1: gpu_attention); scratch_mode for the
 * batch: 0 the decode size times n_q, 1 the minimum for one query.
 * probe (F16): V as in probe_pos; each output must be the reference's fp16 probability, or its
 * fp16 neighbour where the float probability lies within AMBIG_REL of a rounding midpoint.
 * Otherwise random V: F32 by NMSE against the reference (<= 1e-9); F16 by NMSE <= 1e-7, a
 * sanity bound only (a p that rounds the other way moves a short sum by up to ~2e-8; the
 * rounding itself is what the probe checks). */
static void test_attn(const attn_case *c, int kv_type, int64_t pos0, int n_q, int scratch_mode,
                      int probe)
{
    char what[128];
    const int f16 = kv_type == GGML_TYPE_F16, hd = c->hd;
    const size_t esz = f16 ? 2 : 4;
    const int64_t cache_n = c->max_kv * c->n_kv_head * hd, qd = (int64_t)c->n_head * hd;
    const int64_t ps = c->head_major ? hd : (int64_t)c->n_kv_head * hd;
    const int64_t hs = c->head_major ? c->max_kv * hd : hd;
    const float scale = 1.0f / sqrtf((float)hd);
    float *kf = (float *)gt_xmalloc((size_t)cache_n * 4),
          *vf = (float *)gt_xmalloc((size_t)cache_n * 4);
    unsigned char *kraw = (unsigned char *)gt_xmalloc((size_t)cache_n * esz);
    unsigned char *vraw = (unsigned char *)gt_xmalloc((size_t)cache_n * esz);
    float *q = (float *)gt_xmalloc((size_t)(n_q * qd) * 4),
          *out = (float *)gt_xmalloc((size_t)(n_q * qd) * 4);
    double *ref = (double *)gt_xmalloc((size_t)(n_q * qd) * 8);
    float *pf = (float *)gt_xmalloc((size_t)c->max_kv * 4),
          *row = (float *)gt_xmalloc((size_t)hd * 4);
    float *pprobe = (float *)gt_xmalloc((size_t)(n_q * qd) * 4); /* pf at each output's probe */
    int32_t *pos = (int32_t *)gt_xmalloc((size_t)n_q * 4);
    const int64_t n_kv_max = pos0 + n_q, n_kv_min = pos0 + 1;
    gt_fill(q, n_q * qd, 4.0f, &g_seed);
    gt_fill(kf, cache_n, 1.0f, &g_seed);
    gt_fill(vf, cache_n, 1.0f, &g_seed);
    if (probe) {
        for (int64_t i = 0; i < cache_n; i++)
            vf[i] = 0.0f;
        for (int h = 0; h < c->n_kv_head; h++)
            for (int d = 0; d < hd; d++) {
                int64_t pp = probe_pos(d, n_kv_min, hd);
                if (pp >= 0) vf[pp * ps + h * hs + d] = 1.0f;
            }
    }
    for (int64_t p = n_kv_max; p < c->max_kv; p++) /* never to be read */
        for (int h = 0; h < c->n_kv_head; h++)
            for (int d = 0; d < hd; d++)
                kf[p * ps + h * hs + d] = vf[p * ps + h * hs + d] = NAN;
    gt_kv_encode(kf, vf, cache_n, f16, kraw, vraw);
    for (int i = 0; i < n_q; i++) {
        pos[i] = (int32_t)(pos0 + i);
        for (int h = 0; h < c->n_head; h++) {
            ref_attn_head(c, kf, vf, q + i * qd + (int64_t)h * hd, h, pos[i] + 1, f16, scale, pf,
                          row, ref + i * qd + (int64_t)h * hd);
            for (int d = 0; d < hd; d++) {
                int64_t pp = probe_pos(d, n_kv_min, hd);
                pprobe[i * qd + (int64_t)h * hd + d] = pp >= 0 ? pf[pp] : 0.0f;
            }
        }
    }
    void *d_k = gt_upload(kraw, (size_t)cache_n * esz, S),
         *d_v = gt_upload(vraw, (size_t)cache_n * esz, S);
    float *d_q = (float *)gt_upload(q, (size_t)(n_q * qd) * 4, S);
    int32_t *d_pos = (int32_t *)gt_upload(pos, (size_t)n_q * 4, S);
    float *d_out = (float *)gt_out_alloc((size_t)(n_q * qd) * 4);
    size_t scratch = gpu_attn_scratch_bytes(c->n_head, hd, c->max_kv);
    if (n_q > 1)
        scratch = scratch_mode == 0 ? scratch * (size_t)n_q
                                    : (size_t)c->n_head * (size_t)(hd + 2 + c->max_kv) * 4;
    void *d_scratch = gt_out_alloc(scratch);
    gt_out_prepare(d_scratch, scratch, S);
    gt_out_prepare(d_out, (size_t)(n_q * qd) * 4, S);
    gpu_attn_args a = {d_q, d_k, d_v, kv_type, ps, hs, c->n_head, c->n_kv_head, hd, d_pos,
                       c->max_kv, scale, d_scratch, d_out, 0.0f, 0};
    if (n_q == 1)
        GT_OK(gpu_attention(&a, S, err));
    else
        GT_OK(gpu_attention_batch(&a, n_q, qd, qd, scratch, S, err));
    int guard = gt_out_fetch(d_out, (size_t)(n_q * qd) * 4, out, S);
    unsigned char *tmp = (unsigned char *)gt_xmalloc(scratch);
    guard &= gt_out_fetch(d_scratch, scratch, tmp, S); /* the scratch's guard too */
    free(tmp);
    snprintf(what, sizeof what, "%s%s %s h %d/%d hd %d kv %lld..%lld/%lld q %d%s",
             f16 ? "F16" : "F32", probe ? " probe" : "", c->head_major ? "[h][p][d]" : "[p][h][d]",
             c->n_head, c->n_kv_head, hd, (long long)n_kv_min, (long long)n_kv_max,
             (long long)c->max_kv, n_q, n_q > 1 ? (scratch_mode ? " min-scratch" : " batch") : "");
    const int64_t n = n_q * qd;
    if (probe) {
        int64_t exact = 0, other = 0, wrong = 0, first_bad = -1;
        for (int64_t i = 0; i < n; i++) {
            float p = pprobe[i];
            uint16_t h16 = forge_f32_to_fp16(p);
            float want = forge_fp16_to_f32(h16);
            if (out[i] == want) {
                exact++;
            } else if (fp16_ambiguous(p, h16, AMBIG_REL) &&
                       out[i] == forge_fp16_to_f32(fp16_neighbour(p, h16))) {
                other++;
            } else {
                wrong++;
                if (first_bad < 0) first_bad = i;
            }
        }
        int ok = wrong == 0 && guard;
        printf("attn      %-56s %lld p exact, %lld the other rounding (at a midpoint), %lld "
               "wrong%s  %s\n",
               what, (long long)exact, (long long)other, (long long)wrong,
               guard ? "" : " GUARD BYTES OVERWRITTEN", ok ? "ok" : "FAIL");
        if (first_bad >= 0)
            printf("          first wrong: element %lld: got %.9g want %.9g (p before rounding "
                   "%.9g)\n",
                   (long long)first_bad, out[first_bad],
                   forge_fp16_to_f32(forge_f32_to_fp16(pprobe[first_bad])), pprobe[first_bad]);
        gt_check(ok, "attn %s", what);
    } else {
        gt_report("attn", what, gt_nmse(out, ref, n), f16 ? 1e-7 : THR_F32_ATTN, guard);
    }
    gpu_free(d_k);
    gpu_free(d_v);
    gpu_free(d_q);
    gpu_free(d_pos);
    gpu_free(d_out);
    gpu_free(d_scratch);
    free(kf);
    free(vf);
    free(kraw);
    free(vraw);
    free(q);
    free(out);
    free(ref);
    free(pf);
    free(row);
    free(pprobe);
    free(pos);
}

int main(int argc, char **argv)
{
    /* --quick: caches of at most 1000 positions and fewer shapes (compute-sanitizer runs) */
    const int quick = argc > 1 && !strcmp(argv[1], "--quick");
    gpu_device_info info;
    GT_OK(gpu_device_info_get(0, &info, err));
    printf("device: %s (%s), cc %d.%d, %d SMs\n", info.name, gpu_backend_name(), info.cc_major,
           info.cc_minor, info.sm_count);
    GT_OK(gpu_stream_create(&S, err));

    /* (1) RoPE */
    static const int32_t p1[] = {4095}, p5[] = {0, 1, 1000, 31999, 77};
    for (int mode = 0; mode <= GPU_ROPE_NEOX; mode += GPU_ROPE_NEOX) {
        for (int kind = 0; kind < 4; kind++) {
            test_rope(mode, 1, 32, 128, 128, p1, 10000.0f, kind, 0);
            test_rope(mode, 5, 8, 64, 64, p5, 500000.0f, kind, 0);
            test_rope(mode, 5, 3, 128, 64, p5, 1000000.0f, kind, 0); /* partial rotation */
            test_rope(mode, 1, 2, 6, 4, p1, 10000.0f, kind, 0);       /* tiny, odd tail */
        }
        test_rope(mode, 5, 4, 128, 96, p5, 10000.0f, 0, 1); /* the legacy entry point */
        test_rope(mode, 1, 14, 64, 64, p1, 500000.0f, 2, 1);
    }

    /* (2) fused Q/K norm + RoPE + store: n_tok, heads, kv heads, hd, rot, mode, norms, type */
    static const int shapes[][4] = {{32, 32, 128, 128}, {32, 8, 64, 64}, {14, 2, 64, 64},
                                    {16, 4, 128, 64}};
    static const int toks[] = {1, 5, 7};
    for (size_t si = 0; si < GT_LEN(shapes); si++)
        for (size_t ti = 0; ti < GT_LEN(toks); ti++)
            for (int norms = 0; norms < 2; norms++)
                for (int f16 = 0; f16 < 2; f16++) {
                    int mode = (si + (size_t)norms) % 2 ? GPU_ROPE_NEOX : GPU_ROPE_NORM;
                    test_fused(toks[ti], shapes[si][0], shapes[si][1], shapes[si][2],
                               shapes[si][3], mode, norms, f16 ? GGML_TYPE_F16 : GGML_TYPE_F32,
                               (int)(ti == 1 && si == 1));
                }

    /* (3) attention: heads, kv heads, hd, head-major, max_kv */
    static const attn_case cases[] = {
        {8, 8, 128, 0, 5100}, {32, 8, 128, 1, 5037}, {32, 4, 64, 0, 5000}, {16, 4, 64, 1, 5100},
        {8, 1, 128, 0, 5001}, {4, 4, 80, 0, 5003},  {6, 2, 30, 1, 5000},
        /* head_dim 256: 16-byte F16 slices a lane (fewer positions a step) */
        {8, 2, 256, 0, 5000}, {4, 4, 256, 1, 5002},
    };
    static const int64_t nkv[] = {1, 7, 100, 1000, 5000};
    for (size_t ci = 0; ci < (quick ? 3 : GT_LEN(cases)); ci++)
        for (size_t ki = 0; ki < (quick ? 4 : GT_LEN(nkv)); ki++) {
            test_attn(&cases[ci], GGML_TYPE_F16, nkv[ki] - 1, 1, 0, 1);
            test_attn(&cases[ci], GGML_TYPE_F16, nkv[ki] - 1, 1, 0, 0);
            if (ki == 2 || ki == 4) test_attn(&cases[ci], GGML_TYPE_F32, nkv[ki] - 1, 1, 0, 0);
        }
    /* a short cache: one split (the merge is skipped) */
    static const attn_case small[] = {{32, 8, 128, 0, 32}, {8, 8, 64, 1, 20}};
    for (size_t ci = 0; ci < GT_LEN(small); ci++)
        for (int f16 = 0; f16 < 2; f16++) {
            int t = f16 ? GGML_TYPE_F16 : GGML_TYPE_F32;
            test_attn(&small[ci], t, 0, 1, 0, 0);
            test_attn(&small[ci], t, small[ci].max_kv - 1, 1, 0, 0);
            if (f16) test_attn(&small[ci], t, small[ci].max_kv - 1, 1, 0, 1);
        }
    /* batches (causal prompt queries), with a roomy and a minimal scratch */
    static const int64_t bpos[] = {0, 95, 995};
    for (size_t ci = 0; ci < (quick ? 2u : 4u); ci++)
        for (size_t bi = 0; bi < (quick ? 2 : GT_LEN(bpos)); bi++)
            for (int mode = 0; mode < 2; mode++) {
                attn_case c = cases[ci];
                c.max_kv = bpos[bi] + 5 + (int64_t)mode * 3;
                test_attn(&c, GGML_TYPE_F32, bpos[bi], 5, mode, 0);
                test_attn(&c, GGML_TYPE_F16, bpos[bi], 5, mode, 0);
                test_attn(&c, GGML_TYPE_F16, bpos[bi], 5, mode, 1);
            }

    gpu_stream_destroy(S);
    printf("\ntest_gpu_attn2: %d passed, %d failed\n", gt_pass, gt_fail);
    return gt_fail ? 1 : 0;
}
