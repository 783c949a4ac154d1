/* bench_matmul.c - times kern_matmul on the matrix shapes of TinyLlama-1.1B (dim 2048, ffn 5632,
 * 4 KV heads of 64, vocab 32000) for each weight type, token count, thread count and ISA, and
 * prints GFLOP/s and weight bytes read per second. A benchmark, not a test.
 *
 *   bench_matmul [-t TYPE[,TYPE..]] [-n NTOK[,..]] [-j THREADS[,..]] [-i ISA[,..]] [-s SECONDS]
 *                [-m | -M] [-r] [-f]
 *
 * Each shape rotates over enough copies of its weights (>= 160 MB) that decode reads them from
 * memory, as a real model does, not from the 32 MB L3. -m also runs one "model step": the 7
 * matmuls of a layer on distinct weights for every layer of TinyLlama (22) plus the output
 * matrix, and reports the matmul-only tokens per second (an upper bound for the engine); -M runs
 * only that step.
 * -r uses a single copy of each matrix (cache-resident where it fits: measures compute).
 * Where the ISA's kernel reads a repacked layout (kern_repack_layout: Q4_0 on AVX-512 VNNI),
 * the weights are repacked once per ISA, as the CPU backend does at load, and the copies are
 * read; -f reads the file's layout instead (the kernels before load-time repacking).
 * Besides the mean, each line gives the median and the fastest call (model: step): on a machine
 * shared with other work the mean moves with their load, the fastest call much less. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/fp16.h"
#include "cpu/kernels.h"
#include "forge_gguf.h"
#include "quant/qtypes.h"

typedef struct shape {
    const char *name;
    int64_t n_out, n_in;
} shape;

static const shape SHAPES[] = {
    {"attn_q/o 2048->2048", 2048, 2048},    {"attn_k/v 2048->256", 256, 2048},
    {"ffn_gate/up 2048->5632", 5632, 2048}, {"ffn_down 5632->2048", 2048, 5632},
    {"output 2048->32000", 32000, 2048},
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* CPU time of the whole process: on a shared machine, wall time / (cpu time / threads) shows how
 * much of the wall time other processes took. */
static double cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Median and minimum of n per-call times (sorts t). */
static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void time_stats(double *t, int n, double *median, double *best)
{
    qsort(t, (size_t)n, sizeof *t, cmp_double);
    *median = n ? t[n / 2] : 0.0;
    *best = n ? t[0] : 0.0;
}

#define MAX_SAMPLES 200000

static uint64_t rng = 0x1234567887654321ull;
static float frand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((rng >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}

static size_t row_bytes(int type, int64_t n)
{
    return ggml_row_size(type, n);
}

/* Fill one weight matrix of the given type with random values. */
static void fill_weights(int type, uint8_t *w, int64_t n_out, int64_t n_in)
{
    float *row = malloc((size_t)n_in * sizeof *row);
    size_t rb = row_bytes(type, n_in);
    if (!row) exit(1);
    for (int64_t o = 0; o < n_out; o++) {
        uint8_t *dst = w + (size_t)o * rb;
        for (int64_t i = 0; i < n_in; i++)
            row[i] = frand() * 0.05f;
        switch (type) {
        case GGML_TYPE_F32:
            memcpy(dst, row, rb);
            break;
        case GGML_TYPE_F16:
            for (int64_t i = 0; i < n_in; i++) {
                uint16_t h = forge_f32_to_fp16(row[i]);
                memcpy(dst + 2 * i, &h, 2);
            }
            break;
        case GGML_TYPE_BF16:
            for (int64_t i = 0; i < n_in; i++) {
                uint16_t h = forge_f32_to_bf16(row[i]);
                memcpy(dst + 2 * i, &h, 2);
            }
            break;
        case GGML_TYPE_Q8_0:
            kern_quantize_row_q8_0(row, dst, n_in);
            break;
        case GGML_TYPE_Q4_0:
            kern_quantize_row_q4_0(row, dst, n_in);
            break;
        default: {
            /* the type's quantizer where the traits table has one; else random bytes masked
             * so that every fp16 scale is a finite value below 1 (speed does not depend on it) */
            const forge_type_traits *tr = forge_type_traits_get(type);
            if (tr && tr->quantize_row) {
                tr->quantize_row(row, dst, n_in);
            } else {
                for (size_t i = 0; i < rb; i++) dst[i] = (uint8_t)(rand() & 0x3b);
            }
            break;
        }
        }
    }
    free(row);
}

/* Up to 16 comma-separated values of a list argument. */
static int parse_list(const char *s, const char *items[], int max)
{
    static char buf[1024];
    int n = 0;
    snprintf(buf, sizeof buf, "%s", s);
    for (char *tok = strtok(buf, ","); tok && n < max; tok = strtok(NULL, ","))
        items[n++] = tok;
    return n;
}

/* One matmul, from the repacked copy R where there is one. */
static int mm(kern_pool *pool, int type, const uint8_t *W, const uint8_t *R, int layout,
              int64_t n_out, int64_t n_in, const float *X, int64_t nt, float *Y, forge_err *err)
{
    const kern_mm_desc d = {type, W, n_out, Y};
    const kern_mm_packed p = {R, layout};
    return kern_matmul_packed(pool, 1, &d, R ? &p : NULL, n_in, X, nt, err);
}

/* A repacked copy of `copies` consecutive matrices of n_out x n_in (each mat_bytes in W) in the
 * current ISA's layout for type, or NULL (none, -f, or no memory); *layout receives it. */
static uint8_t *repack_copies(int type, const uint8_t *W, size_t mat_bytes, int copies,
                              int64_t n_out, int64_t n_in, int file_layout, int *layout)
{
    *layout = file_layout ? KERN_LAYOUT_FILE : kern_repack_layout(type);
    size_t rb = kern_repack_bytes(*layout, n_out, n_in);
    if (!rb) return NULL;
    uint8_t *R = aligned_alloc(64, rb * (size_t)copies);
    for (int c = 0; R && c < copies; c++)
        kern_repack(NULL, *layout, type, W + (size_t)c * mat_bytes, n_out, n_in, R + (size_t)c * rb,
                    NULL);
    return R;
}

int main(int argc, char **argv)
{
    int types[8] = {GGML_TYPE_Q4_0, GGML_TYPE_Q8_0, GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_F32};
    int n_types = 5;
    int64_t ntoks[8] = {1, 64};
    int n_ntok = 2;
    int threads[8] = {1, 2};
    int n_threads = 2;
    kern_isa isas[4];
    int n_isa = 0;
    double seconds = 0.3;
    int model = 0, resident = 0, file_layout = 0;
    const char *items[16];

    for (int i = KERN_ISA_SCALAR; i <= KERN_ISA_NEON; i++)
        if (kern_set_isa((kern_isa)i, NULL) == FORGE_OK && i != KERN_ISA_SCALAR)
            isas[n_isa++] = (kern_isa)i;
    for (int i = 1; i < argc; i++) {
        const char *v = i + 1 < argc ? argv[i + 1] : "";
        if (strcmp(argv[i], "-t") == 0) {
            int n = parse_list(v, items, 8);
            n_types = 0;
            for (int k = 0; k < n; k++) {
                int t = ggml_type_from_name(items[k]);
                if (t < 0 || !kern_matmul_supported(t)) {
                    fprintf(stderr, "unknown or unsupported type %s\n", items[k]);
                    return 2;
                }
                types[n_types++] = t;
            }
            i++;
        } else if (strcmp(argv[i], "-n") == 0) {
            n_ntok = parse_list(v, items, 8);
            for (int k = 0; k < n_ntok; k++)
                ntoks[k] = atoll(items[k]);
            i++;
        } else if (strcmp(argv[i], "-j") == 0) {
            n_threads = parse_list(v, items, 8);
            for (int k = 0; k < n_threads; k++)
                threads[k] = atoi(items[k]);
            i++;
        } else if (strcmp(argv[i], "-i") == 0) {
            int n = parse_list(v, items, 4);
            n_isa = 0;
            for (int k = 0; k < n; k++)
                for (int j = KERN_ISA_SCALAR; j <= KERN_ISA_NEON; j++)
                    if (strcmp(items[k], kern_isa_name((kern_isa)j)) == 0) {
                        if (kern_set_isa((kern_isa)j, NULL) != FORGE_OK) {
                            fprintf(stderr, "ISA %s not available\n", items[k]);
                            return 2;
                        }
                        isas[n_isa++] = (kern_isa)j;
                    }
            i++;
        } else if (strcmp(argv[i], "-s") == 0) {
            seconds = atof(v);
            i++;
        } else if (strcmp(argv[i], "-m") == 0) {
            model = 1;
        } else if (strcmp(argv[i], "-M") == 0) {
            model = 2; /* the model step only */
        } else if (strcmp(argv[i], "-r") == 0) {
            resident = 1; /* one copy of the weights: cache-resident where they fit */
        } else if (strcmp(argv[i], "-f") == 0) {
            file_layout = 1; /* no load-time repacking */
        } else {
            fprintf(stderr,
                    "usage: %s [-t TYPES] [-n NTOKS] [-j THREADS] [-i ISAS] [-s SECONDS] [-m|-M] [-r] "
                    "[-f]\n",
                    argv[0]);
            return 2;
        }
    }
    printf("physical cores %d, best ISA %s\n", kern_physical_cores(),
           kern_isa_name(kern_isa_best()));

    int64_t max_tok = 1;
    for (int k = 0; k < n_ntok; k++)
        if (ntoks[k] > max_tok) max_tok = ntoks[k];
    float *X = malloc((size_t)(max_tok * 5632) * sizeof *X);
    float *Y = malloc((size_t)(max_tok * 32000) * sizeof *Y);
    double *samples = malloc(MAX_SAMPLES * sizeof *samples);
    if (!X || !Y || !samples) return 1;
    for (int64_t i = 0; i < max_tok * 5632; i++)
        X[i] = frand();

    for (int ti = 0; ti < n_types && model != 2; ti++) {
        int type = types[ti];
        for (size_t si = 0; si < sizeof SHAPES / sizeof SHAPES[0]; si++) {
            const shape *sh = &SHAPES[si];
            size_t mat_bytes = row_bytes(type, sh->n_in) * (size_t)sh->n_out;
            int copies = resident ? 1 : (int)((160u << 20) / mat_bytes) + 1;
            uint8_t *W = malloc(mat_bytes * (size_t)copies);
            if (!W) return 1;
            fill_weights(type, W, sh->n_out, sh->n_in);
            for (int c = 1; c < copies; c++)
                memcpy(W + (size_t)c * mat_bytes, W, mat_bytes);
            for (int ii = 0; ii < n_isa; ii++) {
                kern_set_isa(isas[ii], NULL);
                int layout;
                uint8_t *R = repack_copies(type, W, mat_bytes, copies, sh->n_out, sh->n_in,
                                           file_layout, &layout);
                const size_t rb = kern_repack_bytes(layout, sh->n_out, sh->n_in);
                for (int ji = 0; ji < n_threads; ji++) {
                    kern_pool *pool = NULL;
                    if (kern_pool_create(threads[ji], &pool, NULL) != FORGE_OK) return 1;
                    for (int ni = 0; ni < n_ntok; ni++) {
                        int64_t nt = ntoks[ni];
                        forge_err err = {0};
                        int iters = 0, c = 0;
                        /* warm up: page in every copy once */
                        for (int k = 0; k < copies; k++)
                            mm(pool, type, W + (size_t)k * mat_bytes, R ? R + (size_t)k * rb : NULL,
                               layout, sh->n_out, sh->n_in, X, 1, Y, &err);
                        double t0 = now_s(), t1, c0 = cpu_s(), tc = t0, med, best;
                        do {
                            if (mm(pool, type, W + (size_t)c * mat_bytes,
                                   R ? R + (size_t)c * rb : NULL, layout, sh->n_out, sh->n_in, X,
                                   nt, Y, &err) != FORGE_OK) {
                                fprintf(stderr, "matmul: %s\n", err.msg);
                                return 1;
                            }
                            c = (c + 1) % copies;
                            t1 = now_s();
                            if (iters < MAX_SAMPLES) samples[iters] = t1 - tc;
                            tc = t1;
                            iters++;
                        } while (t1 - t0 < seconds);
                        time_stats(samples, iters < MAX_SAMPLES ? iters : MAX_SAMPLES, &med,
                                   &best);
                        double per = (t1 - t0) / iters;
                        double cpu_per = (cpu_s() - c0) / iters / threads[ji];
                        double flops = 2.0 * (double)sh->n_out * (double)sh->n_in * (double)nt;
                        printf("%-5s %-6s j%d n%-3lld %-24s %9.1f us %8.1f GFLOP/s %6.1f GB/s"
                               "  (cpu/thread %7.1f us; median %6.1f GB/s, best %6.1f GB/s)\n",
                               ggml_type_name(type), kern_isa_name(isas[ii]), threads[ji],
                               (long long)nt, sh->name, per * 1e6, flops / per * 1e-9,
                               (double)mat_bytes / per * 1e-9, cpu_per * 1e6,
                               (double)mat_bytes / med * 1e-9, (double)mat_bytes / best * 1e-9);
                        fflush(stdout);
                    }
                    kern_pool_free(pool);
                }
                free(R);
            }
            free(W);
        }
    }

    if (model) {
        /* one TinyLlama step: 22 layers x (q, k, v, o, gate, up, down) + output, all distinct */
        const int n_layer = 22;
        const shape layer[7] = {{"q", 2048, 2048}, {"k", 256, 2048},  {"v", 256, 2048},
                                {"o", 2048, 2048}, {"g", 5632, 2048}, {"u", 5632, 2048},
                                {"d", 2048, 5632}};
        for (int ti = 0; ti < n_types; ti++) {
            int type = types[ti];
            size_t layer_bytes = 0, off = 0;
            for (int k = 0; k < 7; k++)
                layer_bytes += row_bytes(type, layer[k].n_in) * (size_t)layer[k].n_out;
            size_t out_bytes = row_bytes(type, 2048) * 32000;
            size_t total = layer_bytes * (size_t)n_layer + out_bytes;
            uint8_t *W = malloc(total);
            if (!W) {
                fprintf(stderr, "model: cannot allocate %zu MB for %s\n", total >> 20,
                        ggml_type_name(type));
                continue;
            }
            for (int k = 0; k < 7; k++) {
                fill_weights(type, W + off, layer[k].n_out, layer[k].n_in);
                off += row_bytes(type, layer[k].n_in) * (size_t)layer[k].n_out;
            }
            for (int l = 1; l < n_layer; l++)
                memcpy(W + (size_t)l * layer_bytes, W, layer_bytes);
            fill_weights(type, W + (size_t)n_layer * layer_bytes, 32000, 2048);
            for (int ii = 0; ii < n_isa; ii++) {
                kern_set_isa(isas[ii], NULL);
                /* the repacked copies of all matrices, in the order of W */
                int layout = file_layout ? KERN_LAYOUT_FILE : kern_repack_layout(type);
                size_t r_total = kern_repack_bytes(layout, 32000, 2048);
                for (int k = 0; k < 7; k++)
                    r_total += kern_repack_bytes(layout, layer[k].n_out, layer[k].n_in) *
                               (size_t)n_layer;
                uint8_t *R = r_total ? aligned_alloc(64, r_total) : NULL;
                if (R) {
                    size_t p = 0, q = 0;
                    for (int l = 0; l < n_layer; l++)
                        for (int k = 0; k < 7; k++) {
                            kern_repack(NULL, layout, type, W + p, layer[k].n_out, layer[k].n_in,
                                        R + q, NULL);
                            p += row_bytes(type, layer[k].n_in) * (size_t)layer[k].n_out;
                            q += kern_repack_bytes(layout, layer[k].n_out, layer[k].n_in);
                        }
                    kern_repack(NULL, layout, type, W + p, 32000, 2048, R + q, NULL);
                }
                for (int ji = 0; ji < n_threads; ji++) {
                    kern_pool *pool = NULL;
                    if (kern_pool_create(threads[ji], &pool, NULL) != FORGE_OK) return 1;
                    for (int ni = 0; ni < n_ntok; ni++) {
                        int64_t nt = ntoks[ni];
                        int steps = 0;
                        double t0 = now_s(), t1, tc = t0, med, best;
                        do {
                            size_t p = 0, q = 0;
                            for (int l = 0; l < n_layer; l++)
                                for (int k = 0; k < 7; k++) {
                                    mm(pool, type, W + p, R ? R + q : NULL, layout, layer[k].n_out,
                                       layer[k].n_in, X, nt, Y, NULL);
                                    p += row_bytes(type, layer[k].n_in) * (size_t)layer[k].n_out;
                                    q += kern_repack_bytes(layout, layer[k].n_out, layer[k].n_in);
                                }
                            /* llama.cpp computes the output row only for the last token */
                            mm(pool, type, W + p, R ? R + q : NULL, layout, 32000, 2048, X, 1, Y,
                               NULL);
                            t1 = now_s();
                            if (steps < MAX_SAMPLES) samples[steps] = t1 - tc;
                            tc = t1;
                            steps++;
                        } while (t1 - t0 < seconds * 5 || steps < 2);
                        double per = (t1 - t0) / steps;
                        time_stats(samples, steps < MAX_SAMPLES ? steps : MAX_SAMPLES, &med,
                                   &best);
                        printf("model %-5s %-6s j%d n%-3lld  %8.2f ms/step  %7.1f tok/s  %6.1f GB/s"
                               "  (median %7.1f tok/s, best %7.1f tok/s)\n",
                               ggml_type_name(type), kern_isa_name(isas[ii]), threads[ji],
                               (long long)nt, per * 1e3, (double)nt / per,
                               (double)total / per * 1e-9, (double)nt / med, (double)nt / best);
                        fflush(stdout);
                    }
                    kern_pool_free(pool);
                }
                free(R);
            }
            free(W);
        }
    }
    free(X);
    free(Y);
    free(samples);
    return 0;
}
