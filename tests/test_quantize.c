/* test_quantize.c - the reference quantizers (src/quant/quantize.h): every type round-trips
 * within ggml's test-quantize-fns error bounds (checked with this file's own dequantizers,
 * written from the block layouts, and with forge_dequantize wherever it supports the type, which
 * must then give the same floats); zero rows stay zero; nothing is written past a row; the
 * dispatcher rejects unknown types and bad lengths; fp16/bf16 round to nearest even; and the
 * bytes for real tensors equal llama-quantize's (quantize_ref.json, --pure). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "testutil.h"
#include "core/fp16.h"
#include "core/util.h"
#include "forge_gguf.h"
#include "hub/sha256.h"
#include "quant/quantize.h"

static const int8_t iq4_levels[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                      1,    13,   25,  38,  53,  69,  89,  113};

static float h2f(const uint8_t *p)
{
    return forge_fp16_to_f32(quant_load_u16(p));
}

/* ---- this test's own dequantizers (from ggml-common.h's layouts) ------------------------ */
static void deq_q4_0(const uint8_t *b, float *y)
{
    for (int j = 0; j < 16; j++) {
        y[j] = h2f(b) * (float)((b[2 + j] & 15) - 8);
        y[j + 16] = h2f(b) * (float)((b[2 + j] >> 4) - 8);
    }
}
static void deq_q4_1(const uint8_t *b, float *y)
{
    for (int j = 0; j < 16; j++) {
        y[j] = h2f(b) * (float)(b[4 + j] & 15) + h2f(b + 2);
        y[j + 16] = h2f(b) * (float)(b[4 + j] >> 4) + h2f(b + 2);
    }
}
static uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static void deq_q5_0(const uint8_t *b, float *y)
{
    uint32_t qh = le32(b + 2);
    for (int j = 0; j < 16; j++) {
        y[j] = h2f(b) * (float)((int)((b[6 + j] & 15) | ((qh >> j & 1) << 4)) - 16);
        y[j + 16] = h2f(b) * (float)((int)((b[6 + j] >> 4) | ((qh >> (j + 16) & 1) << 4)) - 16);
    }
}
static void deq_q5_1(const uint8_t *b, float *y)
{
    uint32_t qh = le32(b + 4);
    for (int j = 0; j < 16; j++) {
        y[j] = h2f(b) * (float)((b[8 + j] & 15) | ((qh >> j & 1) << 4)) + h2f(b + 2);
        y[j + 16] = h2f(b) * (float)((b[8 + j] >> 4) | ((qh >> (j + 16) & 1) << 4)) + h2f(b + 2);
    }
}
static void deq_q8_0(const uint8_t *b, float *y)
{
    for (int j = 0; j < 32; j++)
        y[j] = h2f(b) * (float)(int8_t)b[2 + j];
}
static void deq_iq4_nl(const uint8_t *b, float *y)
{
    for (int j = 0; j < 16; j++) {
        y[j] = h2f(b) * (float)iq4_levels[b[2 + j] & 15];
        y[j + 16] = h2f(b) * (float)iq4_levels[b[2 + j] >> 4];
    }
}
/* Q2_K: scales[16] qs[64] d dmin; element 128*h + 32*s + l is bits 2s of qs[32h + l] */
static void deq_q2_k(const uint8_t *b, float *y)
{
    for (int i = 0; i < 256; i++) {
        int h = i / 128, s = (i % 128) / 32, l = i % 32, sb = i / 16;
        int q = (b[16 + 32 * h + l] >> (2 * s)) & 3;
        y[i] = h2f(b + 80) * (float)(b[sb] & 15) * (float)q - h2f(b + 82) * (float)(b[sb] >> 4);
    }
}
/* Q3_K: hmask[32] qs[64] scales[12] d; 6-bit scales: low 4 bits in bytes 0..7, high 2 in 8..11 */
static void deq_q3_k(const uint8_t *b, float *y)
{
    const uint8_t *hm = b, *qs = b + 32, *sc = b + 96;
    for (int i = 0; i < 256; i++) {
        int h = i / 128, s = (i % 128) / 32, l = i % 32, j = i / 16;
        int lo = j < 8 ? sc[j] & 15 : sc[j - 8] >> 4;
        int scale = (lo | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32;
        int q = ((qs[32 * h + l] >> (2 * s)) & 3) - ((hm[l] >> (i / 32) & 1) ? 0 : 4);
        y[i] = h2f(b + 108) * (float)scale * (float)q;
    }
}
static void scale_min_k4(int j, const uint8_t *q, int *d, int *m)
{
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}
/* Q4_K: d dmin scales[12] qs[128]; element 64*p + l is the low nibble of qs[32p + l], + 32 high */
static void deq_q4_k(const uint8_t *b, float *y)
{
    for (int i = 0; i < 256; i++) {
        int p = i / 64, l = i % 32, hi = (i % 64) >= 32, sc, m;
        scale_min_k4(i / 32, b + 4, &sc, &m);
        int q = hi ? b[16 + 32 * p + l] >> 4 : b[16 + 32 * p + l] & 15;
        y[i] = h2f(b) * (float)sc * (float)q - h2f(b + 2) * (float)m;
    }
}
/* Q5_K: d dmin scales[12] qh[32] qs[128]; the fifth bit of element i is bit i / 32 of qh[i % 32] */
static void deq_q5_k(const uint8_t *b, float *y)
{
    for (int i = 0; i < 256; i++) {
        int p = i / 64, l = i % 32, hi = (i % 64) >= 32, sc, m;
        scale_min_k4(i / 32, b + 4, &sc, &m);
        int q = (hi ? b[48 + 32 * p + l] >> 4 : b[48 + 32 * p + l] & 15) |
                (((b[16 + l] >> (i / 32)) & 1) << 4);
        y[i] = h2f(b) * (float)sc * (float)q - h2f(b + 2) * (float)m;
    }
}
/* Q6_K: ql[128] qh[64] scales[16] d; per 128: element 32s + l, low nibble from ql[l + 32(s&1)]
 * (high nibble when s >= 2), 2 high bits from qh[l] >> 2s */
static void deq_q6_k(const uint8_t *b, float *y)
{
    for (int i = 0; i < 256; i++) {
        int h = i / 128, s = (i % 128) / 32, l = i % 32;
        const uint8_t *ql = b + 64 * h, *qh = b + 128 + 32 * h;
        int lo = s < 2 ? ql[l + 32 * s] & 15 : ql[l + 32 * (s - 2)] >> 4;
        int q = (lo | (((qh[l] >> (2 * s)) & 3) << 4)) - 32;
        y[i] = h2f(b + 208) * (float)(int8_t)b[192 + i / 16] * (float)q;
    }
}
/* IQ4_XS: d scales_h(u16) scales_l[4] qs[128]; 6-bit sub-block scales - 32 */
static void deq_iq4_xs(const uint8_t *b, float *y)
{
    uint16_t sh = quant_load_u16(b + 2);
    for (int ib = 0; ib < 8; ib++) {
        int ls = ((b[4 + ib / 2] >> (4 * (ib % 2))) & 15) | (((sh >> (2 * ib)) & 3) << 4);
        float dl = h2f(b) * (float)(ls - 32);
        for (int j = 0; j < 16; j++) {
            y[32 * ib + j] = dl * (float)iq4_levels[b[8 + 16 * ib + j] & 15];
            y[32 * ib + j + 16] = dl * (float)iq4_levels[b[8 + 16 * ib + j] >> 4];
        }
    }
}

struct qtype {
    int type;
    void (*deq)(const uint8_t *block, float *y);
    float max_err;   /* ggml test-quantize-fns: rmse bound on 0.1 + 2 cos(i) */
    double max_nmse; /* on uniform random values in [-1, 1) */
};

/* max_nmse: about 1.3x what these quantizers give on this data (sanity bounds against a broken
 * search or layout; exactness is checked by the bytes test below) */
static const struct qtype qtypes[] = {
    {GGML_TYPE_Q4_0, deq_q4_0, 0.002f, 1.5e-2},  {GGML_TYPE_Q4_1, deq_q4_1, 0.002f, 1.2e-2},
    {GGML_TYPE_Q5_0, deq_q5_0, 0.002f, 3.5e-3},  {GGML_TYPE_Q5_1, deq_q5_1, 0.002f, 2.7e-3},
    {GGML_TYPE_Q8_0, deq_q8_0, 0.002f, 6e-5},    {GGML_TYPE_IQ4_NL, deq_iq4_nl, 0.002f, 1e-2},
    {GGML_TYPE_Q2_K, deq_q2_k, 0.0075f, 1.4e-1}, {GGML_TYPE_Q3_K, deq_q3_k, 0.0040f, 4.2e-2},
    {GGML_TYPE_Q4_K, deq_q4_k, 0.002f, 9e-3},    {GGML_TYPE_Q5_K, deq_q5_k, 0.002f, 2.4e-3},
    {GGML_TYPE_Q6_K, deq_q6_k, 0.002f, 6e-4},    {GGML_TYPE_IQ4_XS, deq_iq4_xs, 0.002f, 1e-2},
};

#define N_VALUES 4096
#define SENTINEL 0xA5

/* Quantize x into a buffer with sentinel bytes after the row, check them, dequantize with the
 * test's dequantizer (and forge_dequantize when it knows the type: same floats). */
static void quantize_dequantize(const struct qtype *q, const float *x, int64_t n, float *y)
{
    size_t rs = ggml_row_size(q->type, n);
    int64_t bs = ggml_type_block_size(q->type);
    uint8_t *buf = malloc(rs + 64);
    float *y2 = malloc((size_t)n * sizeof *y2);
    assert_non_null(buf);
    assert_non_null(y2);
    memset(buf, SENTINEL, rs + 64);
    assert_int_equal(quant_quantize_row(q->type, x, buf, n), FORGE_OK);
    for (int i = 0; i < 64; i++)
        assert_int_equal(buf[rs + i], SENTINEL);
    for (int64_t b = 0; b < n / bs; b++)
        q->deq(buf + b * ggml_type_block_bytes(q->type), y + b * bs);
    forge_err err = {0};
    int rc = forge_dequantize(q->type, buf, y2, n, &err);
    if (rc == FORGE_OK) {
        for (int64_t i = 0; i < n; i++)
            if (memcmp(&y[i], &y2[i], sizeof(float)) != 0)
                fail_msg("%s element %lld: forge_dequantize %g, layout %g", ggml_type_name(q->type),
                         (long long)i, (double)y2[i], (double)y[i]);
    } else {
        assert_int_equal(rc, FORGE_E_UNSUPPORTED);
        print_message(
            "note: forge_dequantize has no %s yet; checked with this test's dequantizer\n",
            ggml_type_name(q->type));
    }
    free(buf);
    free(y2);
}

static void test_round_trip_ggml_bounds(void **state)
{
    (void)state;
    static float x[N_VALUES], y[N_VALUES];
    for (int i = 0; i < N_VALUES; i++)
        x[i] = 0.1f + 2.0f * cosf((float)i);
    for (size_t k = 0; k < FORGE_ARRAY_LEN(qtypes); k++) {
        quantize_dequantize(&qtypes[k], x, N_VALUES, y);
        double sum = 0;
        for (int i = 0; i < N_VALUES; i++)
            sum += ((double)x[i] - y[i]) * ((double)x[i] - y[i]);
        float err = (float)(sqrt(sum) / N_VALUES);
        if (err > qtypes[k].max_err)
            fail_msg("%s: rmse %g over ggml's bound %g", ggml_type_name(qtypes[k].type),
                     (double)err, (double)qtypes[k].max_err);
    }
}

static void test_round_trip_random(void **state)
{
    (void)state;
    static float x[N_VALUES], y[N_VALUES];
    uint64_t rng = 12345;
    for (size_t k = 0; k < FORGE_ARRAY_LEN(qtypes); k++) {
        for (int i = 0; i < N_VALUES; i++)
            x[i] = tu_rand_uniform(&rng) * (i % 7 == 0 ? 3.0f : 1.0f);
        quantize_dequantize(&qtypes[k], x, N_VALUES, y);
        double nmse = tu_nmse(y, x, N_VALUES);
        if (!(nmse <= qtypes[k].max_nmse))
            fail_msg("%s: nmse %g over %g", ggml_type_name(qtypes[k].type), nmse,
                     qtypes[k].max_nmse);
    }
}

static void test_zero_and_constant_rows(void **state)
{
    (void)state;
    static float x[512], y[512];
    for (size_t k = 0; k < FORGE_ARRAY_LEN(qtypes); k++) {
        memset(x, 0, sizeof x);
        quantize_dequantize(&qtypes[k], x, 512, y);
        for (int i = 0; i < 512; i++)
            if (y[i] != 0.0f)
                fail_msg("%s: zero row gives %g at %d", ggml_type_name(qtypes[k].type),
                         (double)y[i], i);
        /* one non-zero value among zeros (a sub-block with a single value) */
        x[300] = -0.75f;
        quantize_dequantize(&qtypes[k], x, 512, y);
        for (int i = 0; i < 512; i++)
            if (!isfinite(y[i]) || fabsf(y[i] - x[i]) > 0.08f)
                fail_msg("%s: sparse row gives %g for %g at %d", ggml_type_name(qtypes[k].type),
                         (double)y[i], (double)x[i], i);
    }
}

static void test_dispatch(void **state)
{
    (void)state;
    float x[512] = {0};
    uint8_t y[1024];
    memset(y, SENTINEL, sizeof y);
    assert_int_equal(quant_quantize_row(GGML_TYPE_Q8_1, x, y, 32), FORGE_E_UNSUPPORTED);
    assert_int_equal(quant_quantize_row(GGML_TYPE_TQ1_0, x, y, 256), FORGE_E_UNSUPPORTED);
    assert_int_equal(quant_quantize_row(999, x, y, 32), FORGE_E_UNSUPPORTED);
    assert_int_equal(quant_quantize_row(GGML_TYPE_Q4_0, x, y, 33), FORGE_E_INVALID);
    assert_int_equal(quant_quantize_row(GGML_TYPE_Q4_K, x, y, 32), FORGE_E_INVALID);
    assert_int_equal(quant_quantize_row(GGML_TYPE_IQ4_XS, x, y, -256), FORGE_E_INVALID);
    for (size_t i = 0; i < sizeof y; i++)
        assert_int_equal(y[i], SENTINEL);
    assert_null(quant_row_function(GGML_TYPE_IQ2_XXS));
    assert_ptr_equal(quant_row_function(GGML_TYPE_Q6_K), quantize_row_q6_k);
}

static void test_nearest_int_and_halves(void **state)
{
    (void)state;
    assert_int_equal(quant_nearest_int(0.5f), 0);
    assert_int_equal(quant_nearest_int(1.5f), 2);
    assert_int_equal(quant_nearest_int(2.5f), 2);
    assert_int_equal(quant_nearest_int(-0.5f), 0);
    assert_int_equal(quant_nearest_int(-1.5f), -2);
    assert_int_equal(quant_nearest_int(-2.4999f), -2);
    assert_int_equal(quant_nearest_int(31.51f), 32);
    /* F16 / BF16 rows: round to nearest even, as ggml */
    float x[4] = {1.0f + 0x1p-11f, 1.0f + 3 * 0x1p-11f, 1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f};
    uint8_t h[8], b[8];
    assert_int_equal(quant_quantize_row(GGML_TYPE_F16, x, h, 4), FORGE_OK);
    assert_int_equal(quant_load_u16(h), 0x3c00);
    assert_int_equal(quant_load_u16(h + 2), 0x3c02);
    assert_int_equal(quant_quantize_row(GGML_TYPE_BF16, x, b, 4), FORGE_OK);
    assert_int_equal(quant_load_u16(b + 4), 0x3f80);
    assert_int_equal(quant_load_u16(b + 6), 0x3f82);
    float f[4];
    assert_int_equal(quant_quantize_row(GGML_TYPE_F32, x, f, 4), FORGE_OK);
    assert_memory_equal(f, x, sizeof x);
}

/* The bytes llama-quantize --pure wrote for synth-F16.gguf's 2-D weights, for every type. */
static void test_bytes_as_llama_quantize(void **state)
{
    (void)state;
    char *model = tu_require_shared("testdata/quant/synth-F16.gguf");
    char *refp = tu_require_shared("testdata/quant/quantize/quantize_ref.json");
    static const struct {
        const char *mix;
        int type;
    } cases[] = {
        {"Q4_0", GGML_TYPE_Q4_0},   {"Q4_1", GGML_TYPE_Q4_1},     {"Q5_0", GGML_TYPE_Q5_0},
        {"Q5_1", GGML_TYPE_Q5_1},   {"Q8_0", GGML_TYPE_Q8_0},     {"Q2_K", GGML_TYPE_Q2_K},
        {"Q3_K_S", GGML_TYPE_Q3_K}, {"Q4_K_S", GGML_TYPE_Q4_K},   {"Q5_K_S", GGML_TYPE_Q5_K},
        {"Q6_K", GGML_TYPE_Q6_K},   {"IQ4_NL", GGML_TYPE_IQ4_NL}, {"IQ4_XS", GGML_TYPE_IQ4_XS},
    };
    size_t len;
    char *text = tu_read_file(refp, &len);
    assert_non_null(text);
    cJSON *ref = cJSON_Parse(text);
    assert_non_null(ref);
    gguf_ctx *g = NULL;
    forge_err err = {0};
    assert_int_equal(gguf_open(model, &g, &err), FORGE_OK);
    int n_checked = 0;
    for (int64_t i = 0; i < gguf_tensor_count(g); i++) {
        const gguf_tensor_info *t = gguf_tensor(g, i);
        if (t->n_dims < 2) continue;
        float *x = malloc((size_t)t->n_elements * sizeof *x);
        assert_non_null(x);
        assert_int_equal(forge_dequantize(t->type, t->data, x, t->n_elements, &err), FORGE_OK);
        for (size_t c = 0; c < FORGE_ARRAY_LEN(cases); c++) {
            size_t rs = ggml_row_size(cases[c].type, t->ne[0]);
            uint8_t *q = malloc(rs * (size_t)t->ne[1]);
            assert_non_null(q);
            for (int64_t r = 0; r < t->ne[1]; r++)
                assert_int_equal(
                    quant_quantize_row(cases[c].type, x + r * t->ne[0], q + r * rs, t->ne[0]),
                    FORGE_OK);
            sha256_ctx s;
            uint8_t d[32];
            char hex[65];
            sha256_init(&s);
            sha256_update(&s, q, rs * (size_t)t->ne[1]);
            sha256_final(&s, d);
            sha256_hex(d, hex);
            cJSON *e = cJSON_GetObjectItem(
                cJSON_GetObjectItem(cJSON_GetObjectItem(ref, cases[c].mix), "pure"), t->name);
            assert_non_null(e);
            assert_string_equal(cJSON_GetArrayItem(e, 0)->valuestring,
                                ggml_type_name(cases[c].type));
            if (strcmp(cJSON_GetArrayItem(e, 1)->valuestring, hex) != 0)
                fail_msg("%s %s: sha256 %s, llama-quantize %s", t->name, cases[c].mix, hex,
                         cJSON_GetArrayItem(e, 1)->valuestring);
            n_checked++;
            free(q);
        }
        free(x);
    }
    assert_int_equal(n_checked, 8 * (int)FORGE_ARRAY_LEN(cases));
    gguf_close(g);
    cJSON_Delete(ref);
    free(text);
    free(model);
    free(refp);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip_ggml_bounds),
        cmocka_unit_test(test_round_trip_random),
        cmocka_unit_test(test_zero_and_constant_rows),
        cmocka_unit_test(test_dispatch),
        cmocka_unit_test(test_nearest_int_and_halves),
        cmocka_unit_test(test_bytes_as_llama_quantize),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
