/* testutil.h - helpers for Forge's cmocka tests: paths into ../shared test data, NMSE, files. */
#ifndef FORGE_TESTUTIL_H
#define FORGE_TESTUTIL_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

/* Root of the shared test data ($FORGE_SHARED, default ../shared). */
const char *tu_shared_root(void);
/* malloc'd "<shared root>/<rel>" if that path exists, else NULL (caller frees). */
char *tu_shared_path(const char *rel);
/* Skip the current test with a visible message when a shared file is missing. Usage:
 *   char *p = tu_require_shared("testdata/models/stories260K.gguf"); (skips if NULL) */
#define tu_require_shared(rel)                                                              \
    ({                                                                                      \
        char *tu_p_ = tu_shared_path(rel);                                                  \
        if (!tu_p_) {                                                                       \
            print_message("SKIP: shared test data %s/%s is absent\n", tu_shared_root(), rel); \
            skip();                                                                         \
        }                                                                                   \
        tu_p_;                                                                              \
    })

/* Read a whole file; returns malloc'd buffer (NUL-terminated) or NULL. */
char *tu_read_file(const char *path, size_t *len);
/* Normalised mean squared error sum((a-b)^2)/sum(b^2) (b is the reference). */
double tu_nmse(const float *a, const float *ref, size_t n);
/* Deterministic pseudo-random numbers for tests (xorshift). */
uint64_t tu_rand_u64(uint64_t *state);
float tu_rand_uniform(uint64_t *state); /* [-1, 1) */
/* A fresh temporary directory (malloc'd path) removed by tu_rmtree. */
char *tu_mkdtemp(void);
void tu_rmtree(const char *path);

#endif
