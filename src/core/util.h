/* util.h - internal helpers shared by every module: error reporting, overflow-safe arithmetic,
 * whole-file reading. Not part of the public API. */
#ifndef FORGE_CORE_UTIL_H
#define FORGE_CORE_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>
#include <time.h>

#include "forge.h"

#if defined(__GNUC__) || defined(__clang__)
#define FORGE_PRINTF(f, a) __attribute__((format(printf, f, a)))
#else
#define FORGE_PRINTF(f, a)
#endif

/* Record an error in err (NULL allowed) and return code, so callers can write
 *   return forge_err_set(err, FORGE_E_FORMAT, "%s: bad magic", path); */
int forge_err_set(forge_err *err, int code, const char *fmt, ...) FORGE_PRINTF(3, 4);

/* Clear err (NULL allowed). */
void forge_err_clear(forge_err *err);

/* Overflow-safe arithmetic: return false (and leave *out unspecified) on overflow. */
static inline bool forge_add_u64(uint64_t a, uint64_t b, uint64_t *out)
{
    return !__builtin_add_overflow(a, b, out);
}
static inline bool forge_mul_u64(uint64_t a, uint64_t b, uint64_t *out)
{
    return !__builtin_mul_overflow(a, b, out);
}
static inline bool forge_mul_i64(int64_t a, int64_t b, int64_t *out)
{
    return !__builtin_mul_overflow(a, b, out);
}

/* The monotonic clock, in nanoseconds and in seconds. */
static inline int64_t forge_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}
static inline double forge_now_s(void)
{
    return (double)forge_now_ns() * 1e-9;
}

/* Read a whole file into a malloc'd buffer (NUL-terminated for convenience; *len excludes it).
 * Caller frees *data. */
int forge_read_file(const char *path, char **data, size_t *len, forge_err *err);

#define FORGE_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

#endif /* FORGE_CORE_UTIL_H */
