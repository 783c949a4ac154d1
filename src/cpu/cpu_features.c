/* cpu_features.c - which instruction sets the CPU and the build support, and the process-wide
 * choice of the one kern_matmul uses (kern_isa_*). Detection runs once; selection is a plain
 * variable that tests change between runs of the kernels. */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "core/util.h"
#include "cpu/kern_impl.h"

static atomic_int g_detected = -1; /* best ISA, -1 until detected */
static atomic_int g_current = -1;  /* selected ISA, -1 until first use */

enum {
    F_AVX2 = 1 << 0,   /* AVX2 + FMA + F16C, with OS support for AVX state */
    F_AVX512 = 1 << 1, /* F + BW + VL + DQ, with OS support for AVX-512 state */
    F_VNNI = 1 << 2,
    F_VBMI = 1 << 3,
    F_GFNI = 1 << 4,
    F_BF16 = 1 << 5,
};
static atomic_int g_features = -1; /* F_* bits, -1 until read */

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

/* Read with cpuid and xgetbv directly (clang's __builtin_cpu_supports lacks some names). */
static int read_features(void)
{
    unsigned a, b, c, d, b7 = 0, c7 = 0, a71 = 0;
    int f = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1;
    if (!osxsave || !avx) return 0;
    unsigned xlo, xhi;
    __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
    uint64_t xcr0 = ((uint64_t)xhi << 32) | xlo;
    if ((xcr0 & 0x6) != 0x6) return 0; /* the OS does not save YMM state */
    if (__get_cpuid_max(0, NULL) >= 7) {
        __cpuid_count(7, 0, a, b7, c7, d);
        __cpuid_count(7, 1, a71, b, c, d);
    }
    if (((b7 >> 5) & 1) && fma && f16c) f |= F_AVX2;
    int avx512 = ((b7 >> 16) & 1) && ((b7 >> 17) & 1) && ((b7 >> 30) & 1) && ((b7 >> 31) & 1);
    if ((f & F_AVX2) && avx512 && (xcr0 & 0xe6) == 0xe6) {
        f |= F_AVX512;
        if ((c7 >> 11) & 1) f |= F_VNNI;
        if ((c7 >> 1) & 1) f |= F_VBMI;
        if ((c7 >> 8) & 1) f |= F_GFNI;
        if ((a71 >> 5) & 1) f |= F_BF16;
    }
    return f;
}
#else
static int read_features(void)
{
    return 0;
}
#endif

static int features(void)
{
    int f = atomic_load_explicit(&g_features, memory_order_relaxed);
    if (f < 0) {
        f = read_features();
        atomic_store_explicit(&g_features, f, memory_order_relaxed);
    }
    return f;
}

static int cpu_has_isa(kern_isa isa)
{
    switch (isa) {
    case KERN_ISA_SCALAR:
        return 1;
    case KERN_ISA_AVX2:
        return (features() & F_AVX2) != 0;
    case KERN_ISA_AVX512:
        return (features() & F_AVX512) != 0;
#if defined(__aarch64__)
    case KERN_ISA_NEON:
        return 1; /* Advanced SIMD is mandatory on AArch64 */
#endif
    default:
        return 0;
    }
}

int kern_cpu_has_avx512vnni(void)
{
    return (features() & F_VNNI) != 0;
}

int kern_cpu_has_avx512bf16(void)
{
    return (features() & F_BF16) != 0;
}

int kern_cpu_has_avx512vbmi(void)
{
    return (features() & F_VBMI) != 0;
}

int kern_cpu_has_gfni(void)
{
    return (features() & F_GFNI) != 0;
}

static int isa_usable(kern_isa isa)
{
    return cpu_has_isa(isa) && kern_build_has_isa(isa);
}

kern_isa kern_isa_best(void)
{
    int best = atomic_load(&g_detected);
    if (best >= 0) return (kern_isa)best;
    best = KERN_ISA_SCALAR;
    if (isa_usable(KERN_ISA_NEON)) best = KERN_ISA_NEON;
    if (isa_usable(KERN_ISA_AVX2)) best = KERN_ISA_AVX2;
    if (isa_usable(KERN_ISA_AVX512)) best = KERN_ISA_AVX512;
    atomic_store(&g_detected, best);
    return (kern_isa)best;
}

kern_isa kern_isa_current(void)
{
    int cur = atomic_load(&g_current);
    if (cur >= 0) return (kern_isa)cur;
    cur = (int)kern_isa_best();
    /* FORGE_ISA=scalar|avx2|avx512|neon lowers the default (benchmarks, debugging) */
    const char *env = getenv("FORGE_ISA");
    if (env && *env) {
        for (int i = KERN_ISA_SCALAR; i <= KERN_ISA_NEON; i++)
            if (strcmp(env, kern_isa_name((kern_isa)i)) == 0 && isa_usable((kern_isa)i)) cur = i;
    }
    atomic_store(&g_current, cur);
    return (kern_isa)cur;
}

int kern_set_isa(kern_isa isa, forge_err *err)
{
    if ((int)isa < KERN_ISA_SCALAR || (int)isa > KERN_ISA_NEON)
        return forge_err_set(err, FORGE_E_INVALID, "kern_set_isa: unknown ISA %d", (int)isa);
    if (!cpu_has_isa(isa))
        return forge_err_set(err, FORGE_E_UNSUPPORTED, "kern_set_isa: this CPU lacks %s",
                             kern_isa_name(isa));
    if (!kern_build_has_isa(isa))
        return forge_err_set(err, FORGE_E_UNSUPPORTED, "kern_set_isa: this build has no %s kernels",
                             kern_isa_name(isa));
    atomic_store(&g_current, (int)isa);
    return FORGE_OK;
}

const char *kern_isa_name(kern_isa isa)
{
    switch (isa) {
    case KERN_ISA_SCALAR:
        return "scalar";
    case KERN_ISA_AVX2:
        return "avx2";
    case KERN_ISA_AVX512:
        return "avx512";
    case KERN_ISA_NEON:
        return "neon";
    }
    return "unknown";
}
