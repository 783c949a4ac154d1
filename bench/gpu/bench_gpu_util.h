/* bench_gpu_util.h - what the GPU bench programs (bench/gpu/) share: the fatal-on-error call
 * check, a seeded uniform generator, the float comparison for medians and a device buffer of
 * random values. Header-only (static inline), plain C against gpu/gpu_ops.h. */
#ifndef FORGE_BENCH_GPU_UTIL_H
#define FORGE_BENCH_GPU_UTIL_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/fp16.h"
#include "forge.h"
#include "gpu/gpu_ops.h"

/* Run a call that takes `forge_err *err` last; on failure print it and exit(2). */
#define CHECK(call)                                                                                \
    do {                                                                                           \
        forge_err e_ = {0};                                                                        \
        forge_err *err = &e_;                                                                      \
        if ((call) != FORGE_OK) {                                                                  \
            fprintf(stderr, "FATAL: %s: %s\n", #call, e_.msg);                                     \
            exit(2);                                                                               \
        }                                                                                          \
        (void)err;                                                                                 \
    } while (0)

/* xorshift64* step: a value in [-1, 1) */
static inline float bench_uniform(uint64_t *seed)
{
    uint64_t x = *seed;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *seed = x;
    return (float)(((x * 0x2545F4914F6CDD1DULL) >> 40) * (1.0 / 8388608.0) - 1.0);
}

static inline int bench_cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

/* A device buffer of n floats (as_f16: n halfs) in [-amp, amp), uploaded on s and synchronised.
 * Random fp16 over a whole weight buffer gives random quants and finite scales. */
static inline void *bench_upload_random(size_t n, int as_f16, float amp, uint64_t *seed,
                                        gpu_stream *s)
{
    const size_t esz = as_f16 ? 2 : 4;
    unsigned char *h = (unsigned char *)malloc(n * esz);
    void *d = NULL;
    if (!h) {
        fprintf(stderr, "FATAL: out of host memory\n");
        exit(2);
    }
    for (size_t i = 0; i < n; i++) {
        const float v = amp * bench_uniform(seed);
        if (as_f16) {
            const uint16_t b = forge_f32_to_fp16(v);
            memcpy(h + 2 * i, &b, 2);
        } else {
            memcpy(h + 4 * i, &v, 4);
        }
    }
    CHECK(gpu_malloc(&d, n * esz, err));
    CHECK(gpu_memcpy_h2d(d, h, n * esz, s, err));
    CHECK(gpu_stream_sync(s, err));
    free(h);
    return d;
}

#endif /* FORGE_BENCH_GPU_UTIL_H */
