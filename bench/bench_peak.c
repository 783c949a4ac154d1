/* bench_peak.c - the ceiling the CPU matmul kernels work under: one core's rate of the
 * instruction each kernel family spends its time in, from independent chains (no dependence
 * between them, so throughput, not latency):
 *   int8 AVX2     vpmaddubsw ymm (32 multiply-adds of unsigned x signed bytes, pairs summed),
 *                 with the vpaddw that accumulates it, as the Q4_0/Q8_0 AVX2 tiles use them
 *   int8 VNNI     vpdpbusd zmm (64 multiply-adds into 16 int32)
 *   fp32 FMA      vfmadd231ps ymm (8 multiply-adds)
 * A benchmark, not a test; x86-64 only. Compare with bench_matmul -r (cache-resident GFLOP/s,
 * 2 flops per multiply-add): a multi-token tile can be no faster than these rates x cores.
 * On the development machine (AMD EPYC family 23 model 1, Zen 1: 256-bit ops issue as two
 * 128-bit halves, vector integer multiplies on one pipe) vpmaddubsw ymm runs at ~0.55 per
 * cycle, which is what bounds decoding several streams at once there (docs/PERFORMANCE.md).
 *
 *   bench_peak [-s SECONDS] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#if defined(__x86_64__)
#define CHAINS 8 /* instructions per loop iteration, each into its own register */

__attribute__((target("avx2"))) static void loop_maddubs(long n)
{
    for (long i = 0; i < n; i++)
        __asm__ volatile("vpmaddubsw %%ymm14, %%ymm15, %%ymm0\n\t"
                         "vpmaddubsw %%ymm14, %%ymm15, %%ymm1\n\t"
                         "vpmaddubsw %%ymm14, %%ymm15, %%ymm2\n\t"
                         "vpmaddubsw %%ymm14, %%ymm15, %%ymm3\n\t"
                         "vpmaddubsw %%ymm14, %%ymm15, %%ymm4\n\t"
                         "vpmaddubsw %%ymm14, %%ymm15, %%ymm5\n\t"
                         "vpmaddubsw %%ymm14, %%ymm15, %%ymm6\n\t"
                         "vpmaddubsw %%ymm14, %%ymm15, %%ymm7\n\t"
                         "vpaddw %%ymm0, %%ymm8, %%ymm8\n\t"
                         "vpaddw %%ymm1, %%ymm9, %%ymm9\n\t"
                         "vpaddw %%ymm2, %%ymm10, %%ymm10\n\t"
                         "vpaddw %%ymm3, %%ymm11, %%ymm11\n\t"
                         "vpaddw %%ymm4, %%ymm8, %%ymm8\n\t"
                         "vpaddw %%ymm5, %%ymm9, %%ymm9\n\t"
                         "vpaddw %%ymm6, %%ymm10, %%ymm10\n\t"
                         "vpaddw %%ymm7, %%ymm11, %%ymm11\n\t" ::
                             : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",
                               "xmm8", "xmm9", "xmm10", "xmm11");
}

__attribute__((target("avx2,fma"))) static void loop_fma(long n)
{
    for (long i = 0; i < n; i++)
        __asm__ volatile("vfmadd231ps %%ymm14, %%ymm15, %%ymm0\n\t"
                         "vfmadd231ps %%ymm14, %%ymm15, %%ymm1\n\t"
                         "vfmadd231ps %%ymm14, %%ymm15, %%ymm2\n\t"
                         "vfmadd231ps %%ymm14, %%ymm15, %%ymm3\n\t"
                         "vfmadd231ps %%ymm14, %%ymm15, %%ymm4\n\t"
                         "vfmadd231ps %%ymm14, %%ymm15, %%ymm5\n\t"
                         "vfmadd231ps %%ymm14, %%ymm15, %%ymm6\n\t"
                         "vfmadd231ps %%ymm14, %%ymm15, %%ymm7\n\t" ::
                             : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7");
}

__attribute__((target("avx512f,avx512vnni"))) static void loop_vnni(long n)
{
    for (long i = 0; i < n; i++)
        __asm__ volatile("vpdpbusd %%zmm14, %%zmm15, %%zmm0\n\t"
                         "vpdpbusd %%zmm14, %%zmm15, %%zmm1\n\t"
                         "vpdpbusd %%zmm14, %%zmm15, %%zmm2\n\t"
                         "vpdpbusd %%zmm14, %%zmm15, %%zmm3\n\t"
                         "vpdpbusd %%zmm14, %%zmm15, %%zmm4\n\t"
                         "vpdpbusd %%zmm14, %%zmm15, %%zmm5\n\t"
                         "vpdpbusd %%zmm14, %%zmm15, %%zmm6\n\t"
                         "vpdpbusd %%zmm14, %%zmm15, %%zmm7\n\t" ::
                             : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7");
}

/* Runs fn for about sec seconds; instructions of interest per second (CHAINS per iteration). */
static double rate(void (*fn)(long), double sec)
{
    long n = 1 << 16;
    fn(n); /* warm up (frequency, page in) */
    double t = 0;
    for (;;) {
        double t0 = now_s();
        fn(n);
        t = now_s() - t0;
        if (t >= sec || n > (1L << 40)) break;
        n *= t > 0.01 ? 2 : 16;
    }
    return (double)n * CHAINS / t;
}

static void report(const char *name, void (*fn)(long), int macs, double sec)
{
    const double r = rate(fn, sec);
    printf("%-34s %7.2f G/s per core  %8.1f G multiply-adds/s  %8.1f GFLOP/s\n", name, r * 1e-9,
           r * macs * 1e-9, 2.0 * r * macs * 1e-9);
}
#endif

int main(int argc, char **argv)
{
    double sec = 1.0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-s") == 0 && i + 1 < argc) {
            sec = atof(argv[++i]);
        } else {
            fprintf(stderr, "usage: %s [-s SECONDS]\n", argv[0]);
            return 2;
        }
    }
    if (!(sec > 0 && sec <= 60)) {
        fprintf(stderr, "bench_peak: -s wants 0 < SECONDS <= 60\n");
        return 2;
    }
#if defined(__x86_64__)
    __builtin_cpu_init();
    int ran = 0;
    if (__builtin_cpu_supports("avx2")) {
        report("int8 AVX2  vpmaddubsw ymm (+vpaddw)", loop_maddubs, 32, sec);
        ran++;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        report("fp32 FMA   vfmadd231ps ymm", loop_fma, 8, sec);
        ran++;
    }
    if (__builtin_cpu_supports("avx512vnni")) {
        report("int8 VNNI  vpdpbusd zmm", loop_vnni, 64, sec);
        ran++;
    }
    if (!ran) printf("bench_peak: this CPU has none of AVX2, FMA, AVX-512 VNNI\n");
    return 0;
#else
    printf("bench_peak: x86-64 only (this build is for another ISA)\n");
    return 0;
#endif
}
