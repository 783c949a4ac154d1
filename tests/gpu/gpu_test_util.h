/* gpu_test_util.h - helpers shared by the GPU test programs (the .c files of tests/gpu): random
 * numbers, device buffers with sentinel guard bytes, NMSE, and result lines. Header-only (static),
 * since each test program is one .c file. These programs need a GPU; they are built by `make gpu`
 * and run on the device machine (scripts/gpu-run.sh), never by the CPU test runner. */
#ifndef FORGE_GPU_TEST_UTIL_H
#define FORGE_GPU_TEST_UTIL_H

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/fp16.h"
#include "cpu/kernels.h"
#include "forge.h"
#include "forge_gguf.h"
#include "gpu/gpu_ops.h"
#include "quant/qtypes.h"

#define GT_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define GT_GUARD_BYTES 256
#define GT_GUARD_BYTE 0xA5
#define GT_POISON_BYTE 0xFF /* 0xFFFFFFFF is a NaN: an unwritten output cannot pass */

static int gt_pass, gt_fail;

/* Stop the program on an API failure: a test that cannot set up has nothing to report. */
static inline void gt_ok(int rc, const forge_err *e, const char *what)
{
    if (rc != FORGE_OK) {
        fprintf(stderr, "FATAL: %s: %s (%s)\n", what, e ? e->msg : "", forge_status_name(rc));
        exit(2);
    }
}
#define GT_OK(call)                                                                                \
    do {                                                                                           \
        forge_err gt_e_ = {0};                                                                     \
        forge_err *err = &gt_e_;                                                                   \
        int gt_rc_ = (call);                                                                       \
        gt_ok(gt_rc_, err, #call);                                                                 \
    } while (0)

static inline void gt_check(int cond, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    if (cond) {
        gt_pass++;
    } else {
        gt_fail++;
        printf("FAIL ");
        vprintf(fmt, ap);
        printf("\n");
    }
    va_end(ap);
}

/* xorshift64* */
static inline uint64_t gt_rand_u64(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}
static inline float gt_uniform(uint64_t *s) /* [-1, 1) */
{
    return (float)((gt_rand_u64(s) >> 40) * (1.0 / 8388608.0) - 1.0);
}
static inline void gt_fill(float *x, int64_t n, float scale, uint64_t *s)
{
    for (int64_t i = 0; i < n; i++)
        x[i] = scale * gt_uniform(s);
}

static inline void *gt_xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "FATAL: out of host memory (%zu bytes)\n", n);
        exit(2);
    }
    return p;
}

static inline void *gt_upload(const void *h, size_t bytes, gpu_stream *s)
{
    void *d = NULL;
    GT_OK(gpu_malloc(&d, bytes, err));
    GT_OK(gpu_memcpy_h2d(d, h, bytes, s, err));
    return d;
}

/* Output buffer of `bytes` followed by GT_GUARD_BYTES of sentinel. */
static inline void *gt_out_alloc(size_t bytes)
{
    void *d = NULL;
    GT_OK(gpu_malloc(&d, bytes + GT_GUARD_BYTES, err));
    return d;
}

/* Poison the output and set the guard; call before every run of the op. */
static inline void gt_out_prepare(void *d, size_t bytes, gpu_stream *s)
{
    GT_OK(gpu_memset(d, GT_POISON_BYTE, bytes, s, err));
    GT_OK(gpu_memset((char *)d + bytes, GT_GUARD_BYTE, GT_GUARD_BYTES, s, err));
}

/* Copy the output back (waits); returns 1 when the guard bytes are intact. */
static inline int gt_out_fetch(const void *d, size_t bytes, void *h, gpu_stream *s)
{
    unsigned char *tmp = (unsigned char *)gt_xmalloc(bytes + GT_GUARD_BYTES);
    int ok = 1;
    GT_OK(gpu_memcpy_d2h(tmp, d, bytes + GT_GUARD_BYTES, s, err));
    GT_OK(gpu_stream_sync(s, err));
    for (size_t i = 0; i < GT_GUARD_BYTES; i++)
        ok &= tmp[bytes + i] == GT_GUARD_BYTE;
    memcpy(h, tmp, bytes);
    free(tmp);
    return ok;
}

/* sum (out - ref)^2 / sum ref^2; INFINITY when any output is not finite (unwritten: NaN). */
static inline double gt_nmse(const float *out, const double *ref, int64_t n)
{
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(out[i])) return INFINITY;
        double d = (double)out[i] - ref[i];
        num += d * d;
        den += ref[i] * ref[i];
    }
    return den > 0 ? num / den : num;
}

static inline void gt_report(const char *op, const char *what, double nmse, double thr,
                             int guard_ok)
{
    int ok = nmse <= thr && guard_ok;
    printf("%-9s %-46s nmse %9.2e (<= %.0e)%s  %s\n", op, what, nmse, thr,
           guard_ok ? "" : " GUARD BYTES OVERWRITTEN", ok ? "ok" : "FAIL");
    if (ok)
        gt_pass++;
    else
        gt_fail++;
}

/* ---- weights: random floats -> GGUF bytes of type t (the CPU's quantizers) -> exact values --- */
static inline void *gt_make_weights(int t, int64_t rows, int64_t n_in, uint64_t *seed,
                                    float **wf_out)
{
    size_t rb = ggml_row_size(t, n_in);
    float *src = (float *)gt_xmalloc((size_t)(rows * n_in) * sizeof(float));
    unsigned char *raw = (unsigned char *)gt_xmalloc(rb * (size_t)rows);
    float *wf = (float *)gt_xmalloc((size_t)(rows * n_in) * sizeof(float));
    gt_fill(src, rows * n_in, 1.0f, seed);
    for (int64_t r = 0; r < rows; r++) {
        const float *x = src + r * n_in;
        unsigned char *dst = raw + (size_t)r * rb;
        for (int64_t i = 0; i < n_in && (t == GGML_TYPE_F16 || t == GGML_TYPE_BF16); i++) {
            uint16_t h = t == GGML_TYPE_F16 ? forge_f32_to_fp16(x[i]) : forge_f32_to_bf16(x[i]);
            memcpy(dst + 2 * i, &h, 2);
        }
        if (t == GGML_TYPE_F32) memcpy(dst, x, (size_t)n_in * 4);
        if (t == GGML_TYPE_Q8_0) kern_quantize_row_q8_0(x, dst, n_in);
        if (t == GGML_TYPE_Q4_0) kern_quantize_row_q4_0(x, dst, n_in);
        if (t != GGML_TYPE_Q8_0 && t != GGML_TYPE_Q4_0 && ggml_type_block_size(t) > 1) {
            const forge_type_traits *tr = forge_type_traits_get(t);
            if (tr && tr->quantize_row) {
                tr->quantize_row(x, dst, n_in); /* the reference quantizer (llama-quantize's) */
            } else { /* no quantizer (TQ1_0, TQ2_0): random quants, a small fp16 scale last */
                const size_t bb = tr ? tr->block_bytes : 0;
                for (size_t k = 0; k < rb; k++)
                    dst[k] = (unsigned char)(gt_rand_u64(seed) >> 56);
                for (size_t b = 0; bb >= 2 && b + bb <= rb; b += bb) {
                    uint16_t h = forge_f32_to_fp16(0.01f + 0.001f * (float)(b / bb % 7));
                    memcpy(dst + b + bb - 2, &h, 2);
                }
            }
        }
    }
    GT_OK(forge_dequantize(t, raw, wf, rows * n_in, err));
    free(src);
    *wf_out = wf;
    return raw;
}

/* Upload GGUF-layout weights and convert them to the device layout (gpu_weight_convert). */
static inline void *gt_upload_weights(int t, const void *raw, int64_t rows, int64_t n_in,
                                      gpu_stream *s)
{
    void *d_raw = gt_upload(raw, ggml_row_size(t, n_in) * (size_t)rows, s);
    void *d_w = NULL;
    GT_OK(gpu_malloc(&d_w, gpu_weight_bytes(t, rows, n_in), err));
    GT_OK(gpu_weight_convert(t, d_raw, d_w, rows, n_in, s, err));
    GT_OK(gpu_free_async(d_raw, s, err));
    return d_w;
}

/* A KV cache of n values in the cache type: kraw/vraw receive the bytes (fp16 rounded to
 * nearest even when f16, else the floats), and kf/vf become the values the cache holds. */
static inline void gt_kv_encode(float *kf, float *vf, int64_t n, int f16, unsigned char *kraw,
                                unsigned char *vraw)
{
    for (int64_t i = 0; i < n; i++) {
        if (f16) {
            uint16_t hk = forge_f32_to_fp16(kf[i]), hv = forge_f32_to_fp16(vf[i]);
            memcpy(kraw + 2 * i, &hk, 2);
            memcpy(vraw + 2 * i, &hv, 2);
            kf[i] = forge_fp16_to_f32(hk);
            vf[i] = forge_fp16_to_f32(hv);
        } else {
            memcpy(kraw + 4 * i, &kf[i], 4);
            memcpy(vraw + 4 * i, &vf[i], 4);
        }
    }
}

/* The activation quantization of the CPU kernels on x86 (kern_cvt_q8_0_scalar), which the GPU
 * Q8_0/Q4_0 kernels reproduce: xdq = the dequantized Q8_0 activations. */
static inline void gt_ref_act_q8(const float *x, int64_t n, float *xdq)
{
    for (int64_t b = 0; b < n / 32; b++) {
        const float *xb = x + b * 32;
        float amax = 0;
        for (int j = 0; j < 32; j++)
            amax = fmaxf(amax, fabsf(xb[j]));
        float d = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
        float dr = forge_fp16_to_f32(forge_f32_to_fp16(d));
        for (int j = 0; j < 32; j++)
            xdq[b * 32 + j] = dr * nearbyintf(xb[j] * id);
    }
}

#endif /* FORGE_GPU_TEST_UTIL_H */
