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

static int cpu_has_isa(kern_isa isa)
{
    switch (isa) {
    case KERN_ISA_SCALAR: return 1;
#if defined(__x86_64__) || defined(__i386__)
    case KERN_ISA_AVX2:
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c");
    case KERN_ISA_AVX512:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") &&
               __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
#if defined(__aarch64__)
    case KERN_ISA_NEON: return 1; /* Advanced SIMD is mandatory on AArch64 */
#endif
    default: return 0;
    }
}

int kern_cpu_has_avx512vnni(void)
{
#if defined(__x86_64__) || defined(__i386__)
    return cpu_has_isa(KERN_ISA_AVX512) && __builtin_cpu_supports("avx512vnni");
#else
    return 0;
#endif
}

int kern_cpu_has_avx512bf16(void)
{
#if defined(__x86_64__) || defined(__i386__)
    return cpu_has_isa(KERN_ISA_AVX512) && __builtin_cpu_supports("avx512bf16");
#else
    return 0;
#endif
}

int kern_cpu_has_avx512vbmi(void)
{
#if defined(__x86_64__) || defined(__i386__)
    return cpu_has_isa(KERN_ISA_AVX512) && __builtin_cpu_supports("avx512vbmi");
#else
    return 0;
#endif
}

int kern_cpu_has_gfni(void)
{
#if defined(__x86_64__) || defined(__i386__)
    return __builtin_cpu_supports("gfni");
#else
    return 0;
#endif
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
    case KERN_ISA_SCALAR: return "scalar";
    case KERN_ISA_AVX2: return "avx2";
    case KERN_ISA_AVX512: return "avx512";
    case KERN_ISA_NEON: return "neon";
    }
    return "unknown";
}
