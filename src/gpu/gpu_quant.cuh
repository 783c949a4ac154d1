/* gpu_quant.cuh - the device side of the block-quantized weight types beyond Q8_0/Q4_0:
 * Q4_1, Q5_0, Q5_1, IQ4_NL (blocks of 32) and Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS, TQ1_0,
 * TQ2_0 (super-blocks of 256). Everything a kernel must know about such a type is here, once:
 *
 *   - gq<T>::ELEMS, BLOCK, BODY_OFF, BODY: the GGUF block (ELEMS elements, BLOCK bytes, as in
 *     ggml-common.h and src/quant/qtypes.c) and the part of it that is moved into the "body"
 *     plane on the device (bytes [BODY_OFF, BODY_OFF + BODY), a multiple of 16 so every body
 *     load is aligned); the other BLOCK - BODY bytes (fp16 scales, mins, packed sub-scales, in
 *     their GGUF order) go to the "head" plane. The weights stay in their packed form: the
 *     device layout is the same bytes, split in two planes (gpu_weight_convert), like Q4_0's;
 *     Q4_K's bytes are also rearranged within their block (gq_repack: one 16-byte load per
 *     sub-block).
 *   - gq<T>::load(body, head, s): sub-block s (32 elements) of one block as 32 int8 quants
 *     (packed 4 per int, element order) and, per half of 16, a float scale a and offset b with
 *     value = a * q + b (b = 0 for types without mins). Every kernel (matvec, embedding lookup,
 *     dequantization for the prompt GEMM) is written once over this, in gpu_kquant.cu.
 *
 * The CPU's reference (src/quant/dequant.c) is the specification: load() reproduces its float
 * operations (fma for the types with mins, d * sc then * q otherwise). The host side checks the
 * block geometry against the CPU's traits table (backend_gpu.c, test_gpu_ops.c). Internal. */
#ifndef FORGE_GPU_QUANT_CUH
#define FORGE_GPU_QUANT_CUH

#include "gpu/gpu_vendor.h"

/* The types with kernels here, for dispatch: X(type id). */
#define GQ_TYPES(X)                                                                                \
    X(GGML_TYPE_Q4_1)                                                                              \
    X(GGML_TYPE_Q5_0)                                                                              \
    X(GGML_TYPE_Q5_1)                                                                              \
    X(GGML_TYPE_IQ4_NL)                                                                            \
    X(GGML_TYPE_Q2_K)                                                                              \
    X(GGML_TYPE_Q3_K)                                                                              \
    X(GGML_TYPE_Q4_K)                                                                              \
    X(GGML_TYPE_Q5_K)                                                                              \
    X(GGML_TYPE_Q6_K)                                                                              \
    X(GGML_TYPE_IQ4_XS)                                                                            \
    X(GGML_TYPE_TQ2_0)                                                                             \
    X(GGML_TYPE_TQ1_0)

/* One decoded sub-block of 32 elements. */
struct gq_sub {
    int q[8];       /* int8 quants, element 4i + k in byte k of q[i] */
    float a[2], b[2]; /* per half of 16: value = a * q + b */
};

/* ---- byte helpers ---------------------------------------------------------------------------- */
GPU_DEV unsigned gq_u16(const uint8_t *p)
{
    return (unsigned)p[0] | ((unsigned)p[1] << 8);
}
GPU_DEV float gq_half(const uint8_t *p)
{
    return gpu_fp16_to_f32((unsigned short)gq_u16(p));
}
/* Per byte x - c, for bytes x < 128 and c <= 128 (no borrow between bytes). */
GPU_DEV int gq_bsub(unsigned x, unsigned c)
{
    return (int)(((x | 0x80808080u) - c * 0x01010101u) ^ 0x80808080u);
}
/* Bits 0..3 of x spread to bit 0 of bytes 0..3. */
GPU_DEV unsigned gq_spread4(unsigned x)
{
    return (x & 1u) | ((x & 2u) << 7) | ((x & 4u) << 14) | ((x & 8u) << 21);
}
/* The IQ4_NL table (ggml's kvalues_iq4nl) applied to 4 nibbles (bytes of n, each < 16). */
GPU_DEV int gq_iq4_lut(unsigned n)
{
    const unsigned long long lo = 0xF6EADDCFBFAD9881ull; /* -127 -104 -83 -65 -49 -35 -22 -10 */
    const unsigned long long hi = 0x7159453526190D01ull; /* 1 13 25 38 53 69 89 113 */
    unsigned r = 0;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const unsigned v = (n >> (8 * k)) & 15u;
        const unsigned long long t = v < 8 ? lo : hi;
        r |= (unsigned)((t >> (8 * (v & 7))) & 0xffu) << (8 * k);
    }
    return (int)r;
}
GPU_DEV void gq_set_a(gq_sub &r, float a0, float a1)
{
    r.a[0] = a0;
    r.a[1] = a1;
    r.b[0] = 0.0f;
    r.b[1] = 0.0f;
}
/* The 16 bytes at p (16-byte aligned) as 4 ints. */
GPU_DEV uint4 gq_ld16(const uint8_t *p)
{
    return *(const uint4 *)p;
}
GPU_DEV unsigned gq_w(const uint4 &v, int i)
{
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}
/* Byte k (0..15) of 16 bytes held in registers: one 16-byte load replaces many byte loads. */
GPU_DEV unsigned gq_byte(const uint4 &v, int k)
{
    return (gq_w(v, k >> 2) >> (8 * (k & 3))) & 0xffu;
}

template <int T> struct gq;

/* ---- blocks of 32 ---------------------------------------------------------------------------- */
/* Q4_1 (20): fp16 d, fp16 m, qs[16]; x = q * d + m, q = low nibbles (0..15), high (16..31). */
template <> struct gq<GGML_TYPE_Q4_1> {
    enum { ELEMS = 32, BLOCK = 20, BODY_OFF = 4, BODY = 16, HALVES = 0, MINS = 1 };
    static GPU_DEVT gq_sub load(const uint8_t *body, const uint8_t *head, int s)
    {
        gq_sub r;
        const uint4 w = gq_ld16(body);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            r.q[i] = (int)(gq_w(w, i) & 0x0f0f0f0fu);
            r.q[4 + i] = (int)((gq_w(w, i) >> 4) & 0x0f0f0f0fu);
        }
        r.a[0] = r.a[1] = gq_half(head);
        r.b[0] = r.b[1] = gq_half(head + 2);
        return r;
    }
};

/* Q5_0 (22): fp16 d, u32 qh, qs[16]; x = (q5 - 16) * d; bit j of qh = 5th bit of element j. */
template <> struct gq<GGML_TYPE_Q5_0> {
    enum { ELEMS = 32, BLOCK = 22, BODY_OFF = 6, BODY = 16, HALVES = 0, MINS = 0 };
    static GPU_DEVT gq_sub load(const uint8_t *body, const uint8_t *head, int s)
    {
        gq_sub r;
        const uint4 w = gq_ld16(body);
        const unsigned qh = gq_u16(head + 2) | (gq_u16(head + 4) << 16);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const unsigned lo = (gq_w(w, i) & 0x0f0f0f0fu) | (gq_spread4(qh >> (4 * i)) << 4);
            const unsigned hi =
                ((gq_w(w, i) >> 4) & 0x0f0f0f0fu) | (gq_spread4(qh >> (16 + 4 * i)) << 4);
            r.q[i] = gq_bsub(lo, 16);
            r.q[4 + i] = gq_bsub(hi, 16);
        }
        const float d = gq_half(head);
        gq_set_a(r, d, d);
        return r;
    }
};

/* Q5_1 (24): fp16 d, fp16 m, u32 qh, qs[16]; x = q5 * d + m. */
template <> struct gq<GGML_TYPE_Q5_1> {
    enum { ELEMS = 32, BLOCK = 24, BODY_OFF = 8, BODY = 16, HALVES = 0, MINS = 1 };
    static GPU_DEVT gq_sub load(const uint8_t *body, const uint8_t *head, int s)
    {
        gq_sub r;
        const uint4 w = gq_ld16(body);
        const unsigned qh = *(const unsigned *)(head + 4); /* head stride 8: aligned */
#pragma unroll
        for (int i = 0; i < 4; i++) {
            r.q[i] = (int)((gq_w(w, i) & 0x0f0f0f0fu) | (gq_spread4(qh >> (4 * i)) << 4));
            r.q[4 + i] =
                (int)(((gq_w(w, i) >> 4) & 0x0f0f0f0fu) | (gq_spread4(qh >> (16 + 4 * i)) << 4));
        }
        r.a[0] = r.a[1] = gq_half(head);
        r.b[0] = r.b[1] = gq_half(head + 2);
        return r;
    }
};

/* IQ4_NL (18): fp16 d, qs[16]; x = d * table[nibble]. */
template <> struct gq<GGML_TYPE_IQ4_NL> {
    enum { ELEMS = 32, BLOCK = 18, BODY_OFF = 2, BODY = 16, HALVES = 0, MINS = 0 };
    static GPU_DEVT gq_sub load(const uint8_t *body, const uint8_t *head, int s)
    {
        gq_sub r;
        const uint4 w = gq_ld16(body);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            r.q[i] = gq_iq4_lut(gq_w(w, i) & 0x0f0f0f0fu);
            r.q[4 + i] = gq_iq4_lut((gq_w(w, i) >> 4) & 0x0f0f0f0fu);
        }
        const float d = gq_half(head);
        gq_set_a(r, d, d);
        return r;
    }
};

/* ---- super-blocks of 256 --------------------------------------------------------------------- */
/* Q2_K (84): scales[16] (low nibble scale, high nibble min, one per 16), qs[64], fp16 d, dmin.
 * Sub-block s = 4n + j: 2-bit field j of qs[32n .. 32n + 31]; x = d*sc * q - dmin*m. */
template <> struct gq<GGML_TYPE_Q2_K> {
    enum { ELEMS = 256, BLOCK = 84, BODY_OFF = 0, BODY = 80, HALVES = 1, MINS = 1 };
    static GPU_DEVT gq_sub load(const uint8_t *body, const uint8_t *head, int s)
    {
        gq_sub r;
        const int n = s >> 2, sh = 2 * (s & 3);
        const uint4 q0 = gq_ld16(body + 16 + 32 * n), q1 = gq_ld16(body + 32 + 32 * n);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            r.q[i] = (int)((gq_w(q0, i) >> sh) & 0x03030303u);
            r.q[4 + i] = (int)((gq_w(q1, i) >> sh) & 0x03030303u);
        }
        const uint4 scv = gq_ld16(body);
        const unsigned dd = *(const unsigned *)head; /* head stride 4: aligned */
        const float d = gpu_fp16_to_f32((unsigned short)(dd & 0xffffu));
        const float dmin = gpu_fp16_to_f32((unsigned short)(dd >> 16));
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const unsigned sc = gq_byte(scv, 2 * s + h);
            r.a[h] = d * (float)(sc & 15u);
            r.b[h] = -(dmin * (float)(sc >> 4));
        }
        return r;
    }
};

/* Q3_K (110): hmask[32], qs[64], scales[12] (16 6-bit scales - 32), fp16 d. Sub-block s = 4n + j:
 * 2-bit field j of qs[32n ..], minus 4 where bit s of hmask[l] is clear; x = d*sc * q. */
template <> struct gq<GGML_TYPE_Q3_K> {
    enum { ELEMS = 256, BLOCK = 110, BODY_OFF = 0, BODY = 96, HALVES = 1, MINS = 0 };
    static GPU_DEVT int scale(const uint8_t *sc, int j)
    {
        const int lo = j < 8 ? (sc[j] & 15) : (sc[j - 8] >> 4);
        const int hi = (sc[8 + (j & 3)] >> (2 * (j >> 2))) & 3;
        return (lo | (hi << 4)) - 32;
    }
    static GPU_DEVT gq_sub load(const uint8_t *body, const uint8_t *head, int s)
    {
        gq_sub r;
        const int n = s >> 2, sh = 2 * (s & 3);
        const uint4 q0 = gq_ld16(body + 32 + 32 * n), q1 = gq_ld16(body + 48 + 32 * n);
        const uint4 h0 = gq_ld16(body), h1 = gq_ld16(body + 16);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            r.q[i] = gq_bsub(((gq_w(q0, i) >> sh) & 0x03030303u) |
                                 (((gq_w(h0, i) >> s) & 0x01010101u) << 2),
                             4);
            r.q[4 + i] = gq_bsub(((gq_w(q1, i) >> sh) & 0x03030303u) |
                                     (((gq_w(h1, i) >> s) & 0x01010101u) << 2),
                                 4);
        }
        const float d = gq_half(head + 12);
        gq_set_a(r, d * (float)scale(head, 2 * s), d * (float)scale(head, 2 * s + 1));
        return r;
    }
};

/* The 6-bit scale and min of sub-block j of a Q4_K/Q5_K block: hv = the 16-byte head (fp16 d,
 * dmin, then the 12 scale bytes q[0..11] at bytes 4..15). */
GPU_DEV void gq_k4_scale_min(int j, const uint4 &hv, int *sc, int *m)
{
#define GQ_Q(k) ((int)gq_byte(hv, 4 + (k)))
    if (j < 4) {
        *sc = GQ_Q(j) & 63;
        *m = GQ_Q(j + 4) & 63;
    } else {
        *sc = (GQ_Q(j + 4) & 15) | ((GQ_Q(j - 4) >> 6) << 4);
        *m = (GQ_Q(j + 4) >> 4) | ((GQ_Q(j) >> 6) << 4);
    }
#undef GQ_Q
}

/* Q4_K (144): fp16 d, dmin, scales[12], qs[128]. Sub-block s: nibble (s & 1) of
 * qs[32 (s/2) ..]; x = d*sc * q - dmin*m.
 * On the device the block is rearranged (gq_repack<Q4_K>, at upload): the same 144 bytes, the
 * same values, laid out for one 16-byte load per sub-block as Q4_0's (in the GGUF order a
 * sub-block's quants are half of 32 bytes that it shares with its pair, and its 6-bit scale and
 * min are spread over three of the 12 scale bytes):
 *   body: chunk s (bytes 16s .. 16s + 15) = sub-block s, byte i = element i | element i+16 << 4;
 *   head: bytes 0..3 fp16 d, dmin; bytes 4..7 nibble s = m_s >> 2; byte 8 + s = sc_s | (m_s & 3)
 *   << 6. A sub-block needs the 8 bytes at head (d, dmin, the nibbles) and the 4 at
 *   head + 8 + 4 (s/4). */
GPU_DEV gq_sub gq_q4k_decode(const uint4 &q, const uint2 &h01, unsigned hs, int s)
{
    gq_sub r;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        r.q[i] = (int)(gq_w(q, i) & 0x0f0f0f0fu);
        r.q[4 + i] = (int)((gq_w(q, i) >> 4) & 0x0f0f0f0fu);
    }
    const unsigned b = (hs >> (8 * (s & 3))) & 0xffu;
    const unsigned m = (b >> 6) | (((h01.y >> (4 * s)) & 15u) << 2);
    r.a[0] = r.a[1] = gpu_fp16_to_f32((unsigned short)(h01.x & 0xffffu)) * (float)(b & 63u);
    r.b[0] = r.b[1] = -(gpu_fp16_to_f32((unsigned short)(h01.x >> 16)) * (float)m);
    return r;
}
struct gq_q4k_raw {
    uint4 q;      /* body + 16 s */
    uint2 h01;    /* head bytes 0..7 */
    unsigned hs;  /* head bytes 8 + 4 (s/4) .. */
};
GPU_DEV gq_q4k_raw gq_q4k_fetch(const uint8_t *body, const uint8_t *head, int s)
{
    /* head stride 16: aligned */
    return {gpu_ld_stream16((const uint4 *)(body + 16 * s)), *(const uint2 *)head,
            *(const unsigned *)(head + 8 + 4 * (s >> 2))};
}
template <> struct gq<GGML_TYPE_Q4_K> {
    enum { ELEMS = 256, BLOCK = 144, BODY_OFF = 16, BODY = 128, HALVES = 0, MINS = 1 };
    static GPU_DEVT gq_sub load(const uint8_t *body, const uint8_t *head, int s)
    {
        return gq_q4k_decode(gq_ld16(body + 16 * s), *(const uint2 *)head,
                             *(const unsigned *)(head + 8 + 4 * (s >> 2)), s);
    }
};

/* The 6-bit scale and min of sub-block j of a Q4_K/Q5_K block in the GGUF order: q = the 12
 * scale bytes (bytes 4..15 of the block). */
template <typename B> GPU_DEVT void gq_k4_scale_min(int j, const B &q, int *sc, int *m)
{
    if (j < 4) {
        *sc = q(j) & 63;
        *m = q(j + 4) & 63;
    } else {
        *sc = (q(j + 4) & 15) | ((q(j - 4) >> 6) << 4);
        *m = (q(j + 4) >> 4) | ((q(j) >> 6) << 4);
    }
}

/* Types whose device blocks are not a split of the GGUF block's bytes: repack(src, body, head, s)
 * writes sub-block s's part of one block (called for s = 0 .. ELEMS/32 - 1, one thread each). */
template <int T> struct gq_repack {
    enum { ON = 0 };
};
template <> struct gq_repack<GGML_TYPE_Q4_K> {
    enum { ON = 1 };
    static GPU_DEVT void repack(const uint8_t *src, uint8_t *body, uint8_t *head, int s)
    {
        const uint8_t *qs = src + 16 + 32 * (s >> 1);
        const int sh = 4 * (s & 1);
        uint8_t *o = body + 16 * s;
        for (int i = 0; i < 16; i++)
            o[i] = (uint8_t)(((qs[i] >> sh) & 15) | (((qs[i + 16] >> sh) & 15) << 4));
        if (s == 0) {
            const uint8_t *q12 = src + 4;
            const auto byte = [q12](int k) { return (int)q12[k]; };
            unsigned nib = 0;
            for (int k = 0; k < 4; k++)
                head[k] = src[k];
            for (int j = 0; j < 8; j++) {
                int sc, m;
                gq_k4_scale_min(j, byte, &sc, &m);
                head[8 + j] = (uint8_t)(sc | ((m & 3) << 6));
                nib |= (unsigned)(m >> 2) << (4 * j);
            }
            for (int k = 0; k < 4; k++)
                head[4 + k] = (uint8_t)(nib >> (8 * k));
        }
    }
};

/* Q5_K's sub-block 2g + k (nibble k of the 32 bytes q0/q1, the 5th bits from qh) with the head hv
 * (fp16 d, dmin, the 12 scale bytes) in the GGUF order. */
GPU_DEV gq_sub gq_k5_decode(const uint4 &q0, const uint4 &q1, const uint4 &hv, int s,
                            const uint4 *qh)
{
    gq_sub r;
    const int sh = 4 * (s & 1);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        r.q[i] = (int)((gq_w(q0, i) >> sh) & 0x0f0f0f0fu);
        r.q[4 + i] = (int)((gq_w(q1, i) >> sh) & 0x0f0f0f0fu);
        r.q[i] |= (int)(((gq_w(qh[0], i) >> s) & 0x01010101u) << 4);
        r.q[4 + i] |= (int)(((gq_w(qh[1], i) >> s) & 0x01010101u) << 4);
    }
    int sc, m;
    const auto byte = [&hv](int k) { return (int)gq_byte(hv, 4 + k); };
    gq_k4_scale_min(s, byte, &sc, &m);
    r.a[0] = r.a[1] = gpu_fp16_to_f32((unsigned short)(hv.x & 0xffffu)) * (float)sc;
    r.b[0] = r.b[1] = -(gpu_fp16_to_f32((unsigned short)(hv.x >> 16)) * (float)m);
    return r;
}

/* Q5_K (176): as Q4_K plus qh[32] before qs[128]: bit s of qh[l] is element l's 5th bit; on the
 * device in the GGUF order. Sub-blocks 2g and 2g + 1 share their 32 quant bytes: a group of 2
 * (gq_grp below; the 32 qh bytes are the same for every sub-block). */
struct gq_q5k_raw {
    uint4 q0, q1, hv, qh[2];
};
GPU_DEV gq_q5k_raw gq_q5k_fetch(const uint8_t *body, const uint8_t *head, int g)
{
    const uint4 *b = (const uint4 *)body;
    return {gpu_ld_stream16(b + 2 + 2 * g),
            gpu_ld_stream16(b + 3 + 2 * g),
            gq_ld16(head), /* head stride 16: aligned */
            {gpu_ld_stream16(b), gpu_ld_stream16(b + 1)}};
}
template <> struct gq<GGML_TYPE_Q5_K> {
    enum { ELEMS = 256, BLOCK = 176, BODY_OFF = 16, BODY = 160, HALVES = 0, MINS = 1 };
    static GPU_DEVT gq_sub load(const uint8_t *body, const uint8_t *head, int s)
    {
        const uint8_t *q = body + 32 + 32 * (s >> 1);
        const uint4 qh[2] = {gq_ld16(body), gq_ld16(body + 16)};
        return gq_k5_decode(gq_ld16(q), gq_ld16(q + 16), gq_ld16(head), s, qh);
    }
};

/* Q6_K (210): ql[128], qh[64], int8 scales[16], fp16 d. Sub-block s = 4n + k: nibble (k >> 1) of
 * ql[64n + 32 (k & 1) ..] and bits 2k of qh[32n ..], minus 32; x = d*sc * q. Sub-blocks
 * 4n .. 4n + 3 share ql[64n ..], qh[32n ..]: a group of 4. */
struct gq_q6k_raw {
    uint4 l[4], h[2], sc; /* ql[64n ..], qh[32n ..], the 16 scales */
    float d;
};
GPU_DEV gq_q6k_raw gq_q6k_fetch(const uint8_t *body, const uint8_t *head, int n)
{
    const uint4 *b = (const uint4 *)body;
    return {{gpu_ld_stream16(b + 4 * n), gpu_ld_stream16(b + 4 * n + 1),
             gpu_ld_stream16(b + 4 * n + 2), gpu_ld_stream16(b + 4 * n + 3)},
            {gpu_ld_stream16(b + 8 + 2 * n), gpu_ld_stream16(b + 9 + 2 * n)},
            gpu_ld_stream16(b + 12),
            gq_half(head)};
}
/* Sub-block s = 4n + k from its 32 ql bytes l0/l1 (ql[64n + 32 (k & 1) ..]), the group's 32 qh
 * bytes h0/h1, the 16 scales and d. */
GPU_DEV gq_sub gq_q6k_decode(const uint4 &l0, const uint4 &l1, const uint4 &h0, const uint4 &h1,
                             const uint4 &scv, float d, int s)
{
    gq_sub r;
    const int k = s & 3, lsh = 4 * (k >> 1), hsh = 2 * k;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        r.q[i] = gq_bsub(
            ((gq_w(l0, i) >> lsh) & 0x0f0f0f0fu) | (((gq_w(h0, i) >> hsh) & 0x03030303u) << 4), 32);
        r.q[4 + i] = gq_bsub(
            ((gq_w(l1, i) >> lsh) & 0x0f0f0f0fu) | (((gq_w(h1, i) >> hsh) & 0x03030303u) << 4), 32);
    }
    gq_set_a(r, d * (float)(signed char)gq_byte(scv, 2 * s),
             d * (float)(signed char)gq_byte(scv, 2 * s + 1));
    return r;
}
template <> struct gq<GGML_TYPE_Q6_K> {
    enum { ELEMS = 256, BLOCK = 210, BODY_OFF = 0, BODY = 208, HALVES = 1, MINS = 0 };
    static GPU_DEVT gq_sub load(const uint8_t *body, const uint8_t *head, int s)
    {
        const int n = s >> 2, k = s & 3;
        const uint8_t *ql = body + 64 * n + 32 * (k & 1), *qh = body + 128 + 32 * n;
        return gq_q6k_decode(gq_ld16(ql), gq_ld16(ql + 16), gq_ld16(qh), gq_ld16(qh + 16),
                             gq_ld16(body + 192), gq_half(head), s);
    }
};

/* IQ4_XS (136): fp16 d, u16 scales_h, scales_l[4], qs[128]; sub-block s: qs[16s ..] through the
 * IQ4_NL table, scale d * (6-bit ls - 32). */
template <> struct gq<GGML_TYPE_IQ4_XS> {
    enum { ELEMS = 256, BLOCK = 136, BODY_OFF = 8, BODY = 128, HALVES = 0, MINS = 0 };
    static GPU_DEVT gq_sub load(const uint8_t *body, const uint8_t *head, int s)
    {
        gq_sub r;
        const uint4 w = gq_ld16(body + 16 * s);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            r.q[i] = gq_iq4_lut(gq_w(w, i) & 0x0f0f0f0fu);
            r.q[4 + i] = gq_iq4_lut((gq_w(w, i) >> 4) & 0x0f0f0f0fu);
        }
        const int ls = ((head[4 + s / 2] >> (4 * (s & 1))) & 15) |
                       (int)(((gq_u16(head + 2) >> (2 * s)) & 3u) << 4);
        const float dl = gq_half(head) * (float)(ls - 32);
        gq_set_a(r, dl, dl);
        return r;
    }
};

/* TQ2_0 (66): qs[64] (2 bits, value - 1), fp16 d; sub-block s = 4j + k: field k of
 * qs[32j ..]. */
template <> struct gq<GGML_TYPE_TQ2_0> {
    enum { ELEMS = 256, BLOCK = 66, BODY_OFF = 0, BODY = 64, HALVES = 0, MINS = 0 };
    static GPU_DEVT gq_sub load(const uint8_t *body, const uint8_t *head, int s)
    {
        gq_sub r;
        const int sh = 2 * (s & 3);
        const uint4 q0 = gq_ld16(body + 32 * (s >> 2)), q1 = gq_ld16(body + 32 * (s >> 2) + 16);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            r.q[i] = gq_bsub((gq_w(q0, i) >> sh) & 0x03030303u, 1);
            r.q[4 + i] = gq_bsub((gq_w(q1, i) >> sh) & 0x03030303u, 1);
        }
        const float d = gq_half(head);
        gq_set_a(r, d, d);
        return r;
    }
};

/* TQ1_0 (54): qs[48] (5 trits per byte), qh[4] (4 trits per byte), fp16 d; x = (trit - 1) * d.
 * Digit k of a byte: ((byte * 3^k) mod 256) * 3 >> 8. Element order (dequant.c): digits 0..4 of
 * qs[0..31] (sub-blocks 0..4), digits 0..4 of qs[32..47] (16 at a time: sub-blocks 5, 6 and
 * the first half of 7), digit k of qh[j] at element 240 + 4k + j (second half of 7). */
template <> struct gq<GGML_TYPE_TQ1_0> {
    enum { ELEMS = 256, BLOCK = 54, BODY_OFF = 0, BODY = 48, HALVES = 0, MINS = 0 };
    static GPU_DEVT unsigned trit(unsigned byte, int k)
    {
        const unsigned pow3 = k == 0 ? 1u : k == 1 ? 3u : k == 2 ? 9u : k == 3 ? 27u : 81u;
        return (((byte * pow3) & 0xffu) * 3u) >> 8;
    }
    /* 4 bytes of w, digit k of each, minus 1, packed */
    static GPU_DEVT int digits4(unsigned w, int k)
    {
        unsigned r = 0;
#pragma unroll
        for (int b = 0; b < 4; b++)
            r |= trit((w >> (8 * b)) & 0xffu, k) << (8 * b);
        return gq_bsub(r, 1);
    }
    static GPU_DEVT gq_sub load(const uint8_t *body, const uint8_t *head, int s)
    {
        gq_sub r;
        if (s < 5) {
            const uint4 q0 = gq_ld16(body), q1 = gq_ld16(body + 16);
#pragma unroll
            for (int i = 0; i < 4; i++) {
                r.q[i] = digits4(gq_w(q0, i), s);
                r.q[4 + i] = digits4(gq_w(q1, i), s);
            }
        } else {
            const uint4 q2 = gq_ld16(body + 32);
            const int k0 = 2 * (s - 5); /* digits of the two halves: (0,1), (2,3), (4, qh) */
#pragma unroll
            for (int i = 0; i < 4; i++)
                r.q[i] = digits4(gq_w(q2, i), k0);
            if (s < 7) {
#pragma unroll
                for (int i = 0; i < 4; i++)
                    r.q[4 + i] = digits4(gq_w(q2, i), k0 + 1);
            } else {
                const unsigned qh = gq_u16(head) | (gq_u16(head + 2) << 16);
#pragma unroll
                for (int i = 0; i < 4; i++)
                    r.q[4 + i] = digits4(qh, i); /* elements 4i + j: digit i of qh[j] */
            }
        }
        const float d = gq_half(head + 4);
        gq_set_a(r, d, d);
        return r;
    }
};

/* ---- groups of sub-blocks fetched together ---------------------------------------------------
 * A decode kernel walks a row in groups of GROUP consecutive sub-blocks of one block whose bytes
 * overlap: fetch(body, head, g) issues group g's loads only (so several groups can be in flight
 * before any is used), decode(raw, g, k) makes sub-block GROUP * g + k of it from registers.
 * gq_one<T>: groups of 1 (fetch = gq<T>::load), every type; gq_grp<T>: the grouping of T where
 * its sub-blocks share bytes (Q5_K: pairs sharing 32 quant bytes; Q6_K: fours sharing 64
 * ql + 32 qh bytes; Q4_K: groups of 1 whose loads are issued before they are used, after the
 * repack), gq_one<T> for the others. For those types gq<T>::load() and
 * decode(fetch()) share the decoding, so both walks compute the same numbers (load
 * issues only the loads one sub-block needs, with the default cache policy: the prompt's
 * dequantization reads each block's bytes from several threads). */
template <int T> struct gq_one {
    enum { GROUP = 1 };
    typedef gq_sub raw;
    static GPU_DEVT raw fetch(const uint8_t *body, const uint8_t *head, int g)
    {
        return gq<T>::load(body, head, g);
    }
    static GPU_DEVT gq_sub decode(const raw &w, int, int)
    {
        return w;
    }
};
template <int T> struct gq_grp : gq_one<T> {};
template <> struct gq_grp<GGML_TYPE_Q4_K> {
    enum { GROUP = 1 };
    typedef gq_q4k_raw raw;
    static GPU_DEVT raw fetch(const uint8_t *body, const uint8_t *head, int g)
    {
        return gq_q4k_fetch(body, head, g);
    }
    static GPU_DEVT gq_sub decode(const raw &w, int g, int)
    {
        return gq_q4k_decode(w.q, w.h01, w.hs, g);
    }
};
template <> struct gq_grp<GGML_TYPE_Q5_K> {
    enum { GROUP = 2 };
    typedef gq_q5k_raw raw;
    static GPU_DEVT raw fetch(const uint8_t *body, const uint8_t *head, int g)
    {
        return gq_q5k_fetch(body, head, g);
    }
    static GPU_DEVT gq_sub decode(const raw &w, int g, int k)
    {
        return gq_k5_decode(w.q0, w.q1, w.hv, 2 * g + k, w.qh);
    }
};
template <> struct gq_grp<GGML_TYPE_Q6_K> {
    enum { GROUP = 4 };
    typedef gq_q6k_raw raw;
    static GPU_DEVT raw fetch(const uint8_t *body, const uint8_t *head, int g)
    {
        return gq_q6k_fetch(body, head, g);
    }
    static GPU_DEVT gq_sub decode(const raw &w, int g, int k)
    {
        return gq_q6k_decode(w.l[2 * (k & 1)], w.l[2 * (k & 1) + 1], w.h[0], w.h[1], w.sc, w.d,
                             4 * g + k);
    }
};
/* The walk a kernel takes: grouped (G) or one sub-block at a time. */
template <int T, bool G> struct gq_walk {
    typedef gq_grp<T> type;
};
template <int T> struct gq_walk<T, false> {
    typedef gq_one<T> type;
};

/* ---- the operations every kernel shares ---------------------------------------------------- */
/* Dot product of a sub-block with 32 activations quantized to Q8_0 (xa: elements 0..15, xb:
 * 16..31, scale xd, sum of the 32 quants xs). */
template <int T>
GPU_DEVT float gq_dot(const gq_sub &w, const int4 &xa, const int4 &xb, float xd, int xs)
{
    int s0 = gpu_dp4a(w.q[0], xa.x, 0);
    s0 = gpu_dp4a(w.q[1], xa.y, s0);
    s0 = gpu_dp4a(w.q[2], xa.z, s0);
    s0 = gpu_dp4a(w.q[3], xa.w, s0);
    int s1 = gpu_dp4a(w.q[4], xb.x, 0);
    s1 = gpu_dp4a(w.q[5], xb.y, s1);
    s1 = gpu_dp4a(w.q[6], xb.z, s1);
    s1 = gpu_dp4a(w.q[7], xb.w, s1);
    float r;
    if (gq<T>::HALVES) {
        r = w.a[0] * (float)s0 + w.a[1] * (float)s1;
        if (gq<T>::MINS) {
            const int one = 0x01010101;
            int m0 = gpu_dp4a(one, xa.x, 0);
            m0 = gpu_dp4a(one, xa.y, m0);
            m0 = gpu_dp4a(one, xa.z, m0);
            m0 = gpu_dp4a(one, xa.w, m0);
            r += w.b[0] * (float)m0 + w.b[1] * (float)(xs - m0);
        }
    } else {
        r = w.a[0] * (float)(s0 + s1);
        if (gq<T>::MINS) r += w.b[0] * (float)xs;
    }
    return r * xd;
}

/* Element e (0..31) of a decoded sub-block as a float: the CPU's dequantization. */
template <int T> GPU_DEVT float gq_value(const gq_sub &w, int e)
{
    const float q = (float)(signed char)(unsigned char)((unsigned)w.q[e >> 2] >> (8 * (e & 3)));
    const int h = e >> 4;
    return gq<T>::MINS ? fmaf(w.a[h], q, w.b[h]) : w.a[h] * q;
}

/* Host and device: the geometry of type t (0 when t has no kernels here). */
struct gq_geom {
    int qk, block, body_off, body;
};
static inline gq_geom gq_geom_of(int t)
{
    switch (t) {
#define GQ_GEOM(T)                                                                                 \
    case T:                                                                                        \
        return {gq<T>::ELEMS, gq<T>::BLOCK, gq<T>::BODY_OFF, gq<T>::BODY};
        GQ_TYPES(GQ_GEOM)
#undef GQ_GEOM
    default:
        return {0, 0, 0, 0};
    }
}

/* ---- launchers (gpu_kquant.cu), called by the public ones in gpu_matvec.cu / gpu_gemm.cu ---- */
/* Device bytes of an n_rows x n_in matrix of type t (body plane, padded to 256, then head
 * plane), the offset of the head plane; 0 for a type or shape without kernels here. */
size_t gq_weight_bytes(int t, int64_t n_rows, int64_t n_in);
size_t gq_head_offset(int t, int64_t n_rows, int64_t n_in);
int gq_weight_convert(int t, const void *d_src, void *d_dst, int64_t n_rows, int64_t n_in,
                      cudaStream_t st, forge_err *err);
/* y = W x with x quantized to Q8_0 blocks (xq int8, xd scales, xs sums: gpu_act_quantize), for
 * n_rows activation rows (quantized together: row r's blocks follow row r-1's); rows with
 * d_run[r] == 0 (d_run non-NULL, read on the device) are skipped. */
int gq_matvec(int t, const void *d_w, int64_t n_out, int64_t n_in, const int8_t *xq,
              const float *xd, const int *xs, float *d_y, int64_t n_rows, const int32_t *d_run,
              cudaStream_t st, forge_err *err);
int gq_embed(int t, const void *d_table, int64_t n_vocab, int64_t n_embd, const int32_t *d_ids,
             int64_t n_tokens, float *d_out, cudaStream_t st, forge_err *err);
int gq_weight_to_f16(int t, const void *d_w, int64_t n_rows, int64_t n_in, void *d_out,
                     cudaStream_t st, forge_err *err);

#endif /* FORGE_GPU_QUANT_CUH */
