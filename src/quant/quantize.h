/* quantize.h - reference quantizers: float rows to ggml block types, reproducing the bytes of
 * ggml's quantize_row_*_ref / quantize_* (as llama-quantize calls them without an importance
 * matrix) exactly. Every function has the signature of the traits table's quantize_row field:
 *     void quantize_row_X(const float *x, void *y, int64_t n)
 * n is a multiple of the type's block size (32, or 256 for K-quants and IQ4_XS); y receives
 * ggml_row_size(type, n) bytes. x and y are borrowed, never retained; the functions keep no state
 * and are safe to call from any number of threads at once.
 * IQ4_NL and IQ4_XS give the bytes of ggml's quantize_iq4_nl / quantize_iq4_xs (7 extra scale
 * trials, what llama-quantize runs), not those of quantize_row_iq4_nl_ref (no trials).
 * Bit-exactness rests on doing the same float (not double) operations in the same order as ggml,
 * with fp16 rounding to nearest even (core/fp16.h). Internal to libforge. */
#ifndef FORGE_QUANT_QUANTIZE_H
#define FORGE_QUANT_QUANTIZE_H

#include <stdbool.h>
#include <stdint.h>

typedef void (*quant_row_fn)(const float *x, void *y, int64_t n);

/* 32-element blocks */
void quantize_row_q4_0(const float *x, void *y, int64_t n);
void quantize_row_q4_1(const float *x, void *y, int64_t n);
void quantize_row_q5_0(const float *x, void *y, int64_t n);
void quantize_row_q5_1(const float *x, void *y, int64_t n);
void quantize_row_q8_0(const float *x, void *y, int64_t n);
void quantize_row_iq4_nl(const float *x, void *y, int64_t n);
/* 256-element super-blocks */
void quantize_row_q2_k(const float *x, void *y, int64_t n);
void quantize_row_q3_k(const float *x, void *y, int64_t n);
void quantize_row_q4_k(const float *x, void *y, int64_t n);
void quantize_row_q5_k(const float *x, void *y, int64_t n);
void quantize_row_q6_k(const float *x, void *y, int64_t n);
void quantize_row_iq4_xs(const float *x, void *y, int64_t n);
/* plain conversions (F16 and BF16 round to nearest even, as ggml) */
void quantize_row_f32(const float *x, void *y, int64_t n);
void quantize_row_f16(const float *x, void *y, int64_t n);
void quantize_row_bf16(const float *x, void *y, int64_t n);

/* The quantizer of a ggml type, or NULL when Forge cannot produce that type. */
quant_row_fn quant_row_function(int ggml_type);

/* Quantize n elements (a multiple of the block size) of x into y. Returns FORGE_OK, or
 * FORGE_E_UNSUPPORTED (no quantizer for the type) / FORGE_E_INVALID (bad n); writes nothing
 * then. */
int quant_quantize_row(int ggml_type, const float *x, void *y, int64_t n);

/* ---- helpers shared by the quantize_*.c files ------------------------------------------- */
/* Round to the nearest integer, ties to even, as ggml's nearest_int (the 1.5 * 2^23 trick);
 * valid for |f| <= 4194303. */
static inline int quant_nearest_int(float f)
{
    union {
        float f;
        int32_t i;
    } u;
    u.f = f + 12582912.f;
    return (u.i & 0x007fffff) - 0x00400000;
}

static inline void quant_store_u16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v & 0xff);
    p[1] = (uint8_t)(v >> 8);
}

static inline uint16_t quant_load_u16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static inline int quant_clampi(int v, int lo, int hi)
{
    return v < lo ? lo : v > hi ? hi : v;
}

#define QUANT_GROUP_MAX_EPS 1e-15f

#endif /* FORGE_QUANT_QUANTIZE_H */
