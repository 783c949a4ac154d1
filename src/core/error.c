/* error.c - Forge's error model: status names, the caller-owned forge_err report, file reading. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/util.h"

const char *forge_status_name(int status)
{
    switch (status) {
    case FORGE_OK: return "FORGE_OK";
    case FORGE_E_IO: return "FORGE_E_IO";
    case FORGE_E_FORMAT: return "FORGE_E_FORMAT";
    case FORGE_E_NOMEM: return "FORGE_E_NOMEM";
    case FORGE_E_INVALID: return "FORGE_E_INVALID";
    case FORGE_E_UNSUPPORTED: return "FORGE_E_UNSUPPORTED";
    case FORGE_E_NOTFOUND: return "FORGE_E_NOTFOUND";
    case FORGE_E_TYPE: return "FORGE_E_TYPE";
    case FORGE_E_RANGE: return "FORGE_E_RANGE";
    case FORGE_E_INTERNAL: return "FORGE_E_INTERNAL";
    case FORGE_E_DEVICE: return "FORGE_E_DEVICE";
    case FORGE_E_INTERRUPTED: return "FORGE_E_INTERRUPTED";
    default: return "FORGE_E_UNKNOWN";
    }
}

const char *forge_version(void)
{
    return FORGE_VERSION_STRING;
}

int forge_err_set(forge_err *err, int code, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        err->code = code;
    }
    return code;
}

void forge_err_clear(forge_err *err)
{
    if (err) {
        err->code = FORGE_OK;
        err->msg[0] = '\0';
    }
}

int forge_read_file(const char *path, char **data, size_t *len, forge_err *err)
{
    int rc = FORGE_OK;
    FILE *f = NULL;
    char *buf = NULL;
    size_t cap = 0, used = 0;

    *data = NULL;
    *len = 0;
    f = fopen(path, "rb");
    if (!f) {
        rc = forge_err_set(err, FORGE_E_IO, "%s: cannot open: %s", path, strerror(errno));
        goto fail;
    }
    for (;;) {
        if (cap - used < 65536) {
            size_t ncap = cap ? cap * 2 : 65536;
            char *nbuf = realloc(buf, ncap + 1);
            if (!nbuf) {
                rc = forge_err_set(err, FORGE_E_NOMEM, "%s: out of memory reading file", path);
                goto fail;
            }
            buf = nbuf;
            cap = ncap;
        }
        size_t got = fread(buf + used, 1, cap - used, f);
        used += got;
        if (got == 0) {
            if (ferror(f)) {
                rc = forge_err_set(err, FORGE_E_IO, "%s: read error: %s", path, strerror(errno));
                goto fail;
            }
            break;
        }
    }
    if (!buf) {
        buf = malloc(1);
        if (!buf) {
            rc = forge_err_set(err, FORGE_E_NOMEM, "%s: out of memory", path);
            goto fail;
        }
    }
    buf[used] = '\0';
    *data = buf;
    *len = used;
    buf = NULL;
fail:
    free(buf);
    if (f) (void)fclose(f);
    return rc;
}
