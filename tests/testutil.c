/* testutil.c - see testutil.h. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>

#include "testutil.h"

const char *tu_shared_root(void)
{
    const char *env = getenv("FORGE_SHARED");
    return env && *env ? env : "../shared";
}

char *tu_shared_path(const char *rel)
{
    const char *root = tu_shared_root();
    size_t n = strlen(root) + strlen(rel) + 2;
    char *p = malloc(n);
    struct stat st;
    if (!p) return NULL;
    snprintf(p, n, "%s/%s", root, rel);
    if (stat(p, &st) != 0) {
        free(p);
        return NULL;
    }
    return p;
}

char *tu_read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    long sz;
    if (!f) return NULL;
    if (fseek(f, 0, SEEK_END) != 0 || (sz = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) goto done;
    buf = malloc((size_t)sz + 1);
    if (!buf) goto done;
    if (fread(buf, 1, (size_t)sz, f) != (size_t)sz) {
        free(buf);
        buf = NULL;
        goto done;
    }
    buf[sz] = '\0';
    if (len) *len = (size_t)sz;
done:
    fclose(f);
    return buf;
}

double tu_nmse(const float *a, const float *ref, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - (double)ref[i];
        num += d * d;
        den += (double)ref[i] * (double)ref[i];
    }
    if (den == 0) return num == 0 ? 0 : 1e30;
    return num / den;
}

uint64_t tu_rand_u64(uint64_t *s)
{
    uint64_t x = *s ? *s : 0x9e3779b97f4a7c15ull;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

float tu_rand_uniform(uint64_t *s)
{
    return (float)((tu_rand_u64(s) >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}

char *tu_mkdtemp(void)
{
    char tmpl[] = "/tmp/forge-test-XXXXXX";
    char *d = mkdtemp(tmpl);
    return d ? strdup(d) : NULL;
}

void tu_rmtree(const char *path)
{
    char cmd[4096];
    if (!path || strncmp(path, "/tmp/forge-test-", 16) != 0) return;
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", path);
    if (system(cmd) != 0) fprintf(stderr, "warning: could not remove %s\n", path);
}
