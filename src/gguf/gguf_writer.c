/* gguf_writer.c - writes GGUF v3 files: metadata KVs are serialised into memory as they are set
 * (they are small), tensor data is streamed to the file through the caller's fill callback a
 * chunk of rows at a time, so peak memory is one chunk however large the model is.
 * Owns nothing outside the gguf_writer; reads source files only through the public reader API. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/util.h"

#define WRITER_DEFAULT_CHUNK (16u << 20)
#define WRITER_MAX_NESTING 8

struct wbuf {
    uint8_t *p;
    size_t len, cap;
};

struct wkv {
    char *key;
    gguf_type type;
    struct wbuf val; /* the value exactly as stored in the file */
};

struct wtensor {
    gguf_tensor_info info; /* name owned here */
};

struct gguf_writer {
    struct wkv *kv;
    int64_t n_kv, cap_kv;
    struct wtensor *t;
    int64_t n_t, cap_t;
};

static int buf_put(struct wbuf *b, const void *data, size_t n)
{
    if (n > SIZE_MAX - b->len) return FORGE_E_NOMEM;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->len + n) {
            if (cap > SIZE_MAX / 2) return FORGE_E_NOMEM;
            cap *= 2;
        }
        uint8_t *p = realloc(b->p, cap);
        if (!p) return FORGE_E_NOMEM;
        b->p = p;
        b->cap = cap;
    }
    if (n) memcpy(b->p + b->len, data, n);
    b->len += n;
    return FORGE_OK;
}

static int buf_u32(struct wbuf *b, uint32_t v)
{
    return buf_put(b, &v, 4);
}

static int buf_u64(struct wbuf *b, uint64_t v)
{
    return buf_put(b, &v, 8);
}

static int buf_str(struct wbuf *b, const char *s, uint64_t len)
{
    int rc = buf_u64(b, len);
    return rc ? rc : buf_put(b, s, (size_t)len);
}

static size_t value_size(int t)
{
    switch (t) {
    case GGUF_TYPE_UINT8:
    case GGUF_TYPE_INT8:
    case GGUF_TYPE_BOOL: return 1;
    case GGUF_TYPE_UINT16:
    case GGUF_TYPE_INT16: return 2;
    case GGUF_TYPE_UINT32:
    case GGUF_TYPE_INT32:
    case GGUF_TYPE_FLOAT32: return 4;
    case GGUF_TYPE_UINT64:
    case GGUF_TYPE_INT64:
    case GGUF_TYPE_FLOAT64: return 8;
    default: return 0;
    }
}

int gguf_writer_create(gguf_writer **out, forge_err *err)
{
    *out = calloc(1, sizeof **out);
    if (!*out) return forge_err_set(err, FORGE_E_NOMEM, "gguf writer: out of memory");
    return FORGE_OK;
}

void gguf_writer_free(gguf_writer *w)
{
    if (!w) return;
    for (int64_t i = 0; i < w->n_kv; i++) {
        free(w->kv[i].key);
        free(w->kv[i].val.p);
    }
    for (int64_t i = 0; i < w->n_t; i++) free((char *)w->t[i].info.name);
    free(w->kv);
    free(w->t);
    free(w);
}

/* The slot for key: an existing one (its value cleared) or a new one. */
static int kv_slot(gguf_writer *w, const char *key, gguf_type type, struct wkv **out,
                   forge_err *err)
{
    if (!key) return forge_err_set(err, FORGE_E_INVALID, "gguf writer: NULL key");
    for (int64_t i = 0; i < w->n_kv; i++) {
        if (!strcmp(w->kv[i].key, key)) {
            w->kv[i].val.len = 0;
            w->kv[i].type = type;
            *out = &w->kv[i];
            return FORGE_OK;
        }
    }
    if (w->n_kv == w->cap_kv) {
        int64_t cap = w->cap_kv ? w->cap_kv * 2 : 32;
        struct wkv *kv = realloc(w->kv, (size_t)cap * sizeof *kv);
        if (!kv) return forge_err_set(err, FORGE_E_NOMEM, "gguf writer: out of memory");
        w->kv = kv;
        w->cap_kv = cap;
    }
    struct wkv *kv = &w->kv[w->n_kv];
    memset(kv, 0, sizeof *kv);
    kv->key = strdup(key);
    if (!kv->key) return forge_err_set(err, FORGE_E_NOMEM, "gguf writer: out of memory");
    kv->type = type;
    w->n_kv++;
    *out = kv;
    return FORGE_OK;
}

static int nomem(forge_err *err, const char *key)
{
    return forge_err_set(err, FORGE_E_NOMEM, "gguf writer: key '%s': out of memory", key);
}

int gguf_writer_set_scalar(gguf_writer *w, const char *key, gguf_type type, const void *value,
                           forge_err *err)
{
    struct wkv *kv;
    size_t sz = value_size(type);
    if (!sz)
        return forge_err_set(err, FORGE_E_INVALID, "gguf writer: key '%s': %s is not a scalar type",
                             key ? key : "(null)", gguf_type_name(type));
    int rc = kv_slot(w, key, type, &kv, err);
    if (rc) return rc;
    if (type == GGUF_TYPE_BOOL) {
        uint8_t b = *(const uint8_t *)value != 0;
        return buf_put(&kv->val, &b, 1) ? nomem(err, key) : FORGE_OK;
    }
    return buf_put(&kv->val, value, sz) ? nomem(err, key) : FORGE_OK;
}

int gguf_writer_set_u32(gguf_writer *w, const char *key, uint32_t v, forge_err *err)
{
    return gguf_writer_set_scalar(w, key, GGUF_TYPE_UINT32, &v, err);
}

int gguf_writer_set_i32(gguf_writer *w, const char *key, int32_t v, forge_err *err)
{
    return gguf_writer_set_scalar(w, key, GGUF_TYPE_INT32, &v, err);
}

int gguf_writer_set_u64(gguf_writer *w, const char *key, uint64_t v, forge_err *err)
{
    return gguf_writer_set_scalar(w, key, GGUF_TYPE_UINT64, &v, err);
}

int gguf_writer_set_f32(gguf_writer *w, const char *key, float v, forge_err *err)
{
    return gguf_writer_set_scalar(w, key, GGUF_TYPE_FLOAT32, &v, err);
}

int gguf_writer_set_bool(gguf_writer *w, const char *key, bool v, forge_err *err)
{
    uint8_t b = v;
    return gguf_writer_set_scalar(w, key, GGUF_TYPE_BOOL, &b, err);
}

int gguf_writer_set_str(gguf_writer *w, const char *key, const char *s, forge_err *err)
{
    struct wkv *kv;
    if (!s) return forge_err_set(err, FORGE_E_INVALID, "gguf writer: key '%s': NULL string", key);
    int rc = kv_slot(w, key, GGUF_TYPE_STRING, &kv, err);
    if (rc) return rc;
    return buf_str(&kv->val, s, strlen(s)) ? nomem(err, key) : FORGE_OK;
}

int gguf_writer_set_arr(gguf_writer *w, const char *key, gguf_type elem_type, const void *data,
                        uint64_t n, forge_err *err)
{
    struct wkv *kv;
    size_t sz = value_size(elem_type);
    uint64_t bytes;
    if (!sz)
        return forge_err_set(err, FORGE_E_INVALID,
                             "gguf writer: key '%s': %s arrays need gguf_writer_set_arr_str",
                             key ? key : "(null)", gguf_type_name(elem_type));
    if (!forge_mul_u64(n, sz, &bytes) || bytes > SIZE_MAX || (n && !data))
        return forge_err_set(err, FORGE_E_INVALID, "gguf writer: key '%s': bad array of %llu elements",
                             key ? key : "(null)", (unsigned long long)n);
    int rc = kv_slot(w, key, GGUF_TYPE_ARRAY, &kv, err);
    if (rc) return rc;
    if (buf_u32(&kv->val, (uint32_t)elem_type) || buf_u64(&kv->val, n) ||
        buf_put(&kv->val, data, (size_t)bytes))
        return nomem(err, key);
    return FORGE_OK;
}

int gguf_writer_set_arr_str(gguf_writer *w, const char *key, const gguf_str *strs, uint64_t n,
                            forge_err *err)
{
    struct wkv *kv;
    if (n && !strs)
        return forge_err_set(err, FORGE_E_INVALID, "gguf writer: key '%s': NULL strings",
                             key ? key : "(null)");
    int rc = kv_slot(w, key, GGUF_TYPE_ARRAY, &kv, err);
    if (rc) return rc;
    if (buf_u32(&kv->val, GGUF_TYPE_STRING) || buf_u64(&kv->val, n)) return nomem(err, key);
    for (uint64_t i = 0; i < n; i++)
        if (buf_str(&kv->val, strs[i].data, strs[i].len)) return nomem(err, key);
    return FORGE_OK;
}

/* Serialise a value read through the public walk API. */
static int put_value(struct wbuf *b, const gguf_ctx *src, const gguf_value *v, int depth)
{
    int rc;
    if (v->type == GGUF_TYPE_STRING) return buf_str(b, v->str.data, v->str.len);
    if (v->type != GGUF_TYPE_ARRAY) return buf_put(b, v->raw, value_size(v->type));
    if (depth >= WRITER_MAX_NESTING) return FORGE_E_INVALID;
    if ((rc = buf_u32(b, (uint32_t)v->elem_type)) || (rc = buf_u64(b, v->n))) return rc;
    size_t sz = value_size(v->elem_type);
    if (sz) return buf_put(b, v->raw, (size_t)v->n * sz); /* reader checked it fits the file */
    for (uint64_t j = 0; j < v->n; j++) {
        gguf_value e;
        if ((rc = gguf_value_elem(src, v, j, &e))) return rc;
        if ((rc = put_value(b, src, &e, depth + 1))) return rc;
    }
    return FORGE_OK;
}

int gguf_writer_copy_kv(gguf_writer *w, const gguf_ctx *src, int64_t i, forge_err *err)
{
    gguf_value v;
    struct wkv *kv;
    const char *key = gguf_kv_key(src, i);
    if (!key || gguf_kv_value(src, i, &v))
        return forge_err_set(err, FORGE_E_INVALID, "gguf writer: %s has no key %lld", gguf_path(src),
                             (long long)i);
    int rc = kv_slot(w, key, v.type, &kv, err);
    if (rc) return rc;
    rc = put_value(&kv->val, src, &v, 0);
    if (rc == FORGE_E_NOMEM) return nomem(err, key);
    if (rc)
        return forge_err_set(err, rc, "gguf writer: %s: cannot copy key '%s'", gguf_path(src), key);
    return FORGE_OK;
}

int gguf_writer_copy_kvs(gguf_writer *w, const gguf_ctx *src, const char *prefix,
                         int64_t *n_copied, forge_err *err)
{
    int64_t n = 0;
    size_t plen = prefix ? strlen(prefix) : 0;
    for (int64_t i = 0; i < gguf_kv_count(src); i++) {
        if (plen && strncmp(gguf_kv_key(src, i), prefix, plen) != 0) continue;
        int rc = gguf_writer_copy_kv(w, src, i, err);
        if (rc) return rc;
        n++;
    }
    if (n_copied) *n_copied = n;
    return FORGE_OK;
}

int gguf_writer_add_tensor(gguf_writer *w, const char *name, ggml_type type, uint32_t n_dims,
                           const int64_t *ne, forge_err *err)
{
    gguf_tensor_info info = {0};
    if (!name) return forge_err_set(err, FORGE_E_INVALID, "gguf writer: NULL tensor name");
    if (!ggml_type_valid(type))
        return forge_err_set(err, FORGE_E_INVALID, "gguf writer: tensor '%s': invalid type %d", name,
                             (int)type);
    if (n_dims < 1 || n_dims > GGUF_MAX_DIMS)
        return forge_err_set(err, FORGE_E_INVALID, "gguf writer: tensor '%s': n_dims %u not in 1..4",
                             name, n_dims);
    info.n_elements = 1;
    for (int d = 0; d < GGUF_MAX_DIMS; d++) info.ne[d] = 1;
    for (uint32_t d = 0; d < n_dims; d++) {
        if (ne[d] <= 0 || !forge_mul_i64(info.n_elements, ne[d], &info.n_elements))
            return forge_err_set(err, FORGE_E_INVALID, "gguf writer: tensor '%s': bad dimension %u = %lld",
                                 name, d, (long long)ne[d]);
        info.ne[d] = ne[d];
    }
    int64_t bs = ggml_type_block_size(type);
    if (ne[0] % bs != 0)
        return forge_err_set(err, FORGE_E_INVALID,
                             "gguf writer: tensor '%s': row length %lld is not a multiple of the %s block size %lld",
                             name, (long long)ne[0], ggml_type_name(type), (long long)bs);
    if (!forge_mul_u64((uint64_t)(info.n_elements / bs), ggml_type_block_bytes(type), &info.n_bytes))
        return forge_err_set(err, FORGE_E_INVALID, "gguf writer: tensor '%s': size overflows", name);
    for (int64_t i = 0; i < w->n_t; i++)
        if (!strcmp(w->t[i].info.name, name))
            return forge_err_set(err, FORGE_E_INVALID, "gguf writer: duplicate tensor name '%s'", name);
    if (w->n_t == w->cap_t) {
        int64_t cap = w->cap_t ? w->cap_t * 2 : 64;
        struct wtensor *t = realloc(w->t, (size_t)cap * sizeof *t);
        if (!t) return forge_err_set(err, FORGE_E_NOMEM, "gguf writer: out of memory");
        w->t = t;
        w->cap_t = cap;
    }
    info.type = type;
    info.n_dims = n_dims;
    info.name = strdup(name);
    if (!info.name) return forge_err_set(err, FORGE_E_NOMEM, "gguf writer: out of memory");
    w->t[w->n_t++].info = info;
    return FORGE_OK;
}

static int write_all(FILE *f, const void *p, size_t n, const char *path, forge_err *err)
{
    if (n && fwrite(p, 1, n, f) != n)
        return forge_err_set(err, FORGE_E_IO, "%s: write failed: %s", path, strerror(errno));
    return FORGE_OK;
}

static int write_pad(FILE *f, uint64_t pos, uint64_t align, const char *path, forge_err *err)
{
    static const uint8_t zeros[256];
    uint64_t pad = (align - pos % align) % align;
    while (pad) {
        size_t n = pad < sizeof zeros ? (size_t)pad : sizeof zeros;
        int rc = write_all(f, zeros, n, path, err);
        if (rc) return rc;
        pad -= n;
    }
    return FORGE_OK;
}

int gguf_writer_write(gguf_writer *w, const char *path, gguf_fill_fn fill, void *user,
                      size_t chunk_bytes, forge_err *err)
{
    int rc = FORGE_OK;
    FILE *f = NULL;
    struct wbuf head = {0};
    uint8_t *chunk = NULL;
    uint64_t align = GGUF_DEFAULT_ALIGNMENT, off = 0, max_chunk = 0;
    bool existed = true;

    if (!path) return forge_err_set(err, FORGE_E_INVALID, "gguf writer: NULL path");
    if (w->n_t > 0 && !fill)
        return forge_err_set(err, FORGE_E_INVALID, "gguf writer: %s: tensors need a fill callback", path);
    if (!chunk_bytes) chunk_bytes = WRITER_DEFAULT_CHUNK;
    for (int64_t i = 0; i < w->n_kv; i++) {
        if (strcmp(w->kv[i].key, "general.alignment") != 0) continue;
        uint32_t a;
        if (w->kv[i].type != GGUF_TYPE_UINT32)
            return forge_err_set(err, FORGE_E_INVALID, "gguf writer: general.alignment must be u32");
        memcpy(&a, w->kv[i].val.p, 4);
        if (a == 0 || (a & (a - 1)))
            return forge_err_set(err, FORGE_E_INVALID,
                                 "gguf writer: general.alignment %u is not a power of two", a);
        align = a;
    }

    /* header, KVs and tensor infos, with each tensor's data offset */
    if (buf_put(&head, "GGUF", 4) || buf_u32(&head, 3) || buf_u64(&head, (uint64_t)w->n_t) ||
        buf_u64(&head, (uint64_t)w->n_kv))
        goto oom;
    for (int64_t i = 0; i < w->n_kv; i++) {
        if (buf_str(&head, w->kv[i].key, strlen(w->kv[i].key)) || buf_u32(&head, w->kv[i].type) ||
            buf_put(&head, w->kv[i].val.p, w->kv[i].val.len))
            goto oom;
    }
    for (int64_t i = 0; i < w->n_t; i++) {
        gguf_tensor_info *t = &w->t[i].info;
        t->offset = off;
        if (buf_str(&head, t->name, strlen(t->name)) || buf_u32(&head, t->n_dims))
            goto oom;
        for (uint32_t d = 0; d < t->n_dims; d++)
            if (buf_u64(&head, (uint64_t)t->ne[d])) goto oom;
        if (buf_u32(&head, t->type) || buf_u64(&head, t->offset)) goto oom;
        size_t row = ggml_row_size(t->type, t->ne[0]);
        uint64_t rows_per_chunk = row >= chunk_bytes ? 1 : chunk_bytes / row;
        uint64_t n_rows = (uint64_t)(t->n_elements / t->ne[0]);
        if (rows_per_chunk > n_rows) rows_per_chunk = n_rows;
        if (rows_per_chunk * row > max_chunk) max_chunk = rows_per_chunk * row;
        off += t->n_bytes;
        off += (align - off % align) % align;
    }
    if (max_chunk > SIZE_MAX) goto oom;
    if (max_chunk && !(chunk = malloc((size_t)max_chunk))) goto oom;

    /* a file that was there before is never removed (it may be a device, or the caller's) */
    struct stat st;
    existed = stat(path, &st) == 0;
    f = fopen(path, "wb");
    if (!f) {
        rc = forge_err_set(err, FORGE_E_IO, "%s: cannot create: %s", path, strerror(errno));
        goto done;
    }
    if ((rc = write_all(f, head.p, head.len, path, err))) goto done;
    if (w->n_t && (rc = write_pad(f, head.len, align, path, err))) goto done;
    for (int64_t i = 0; i < w->n_t; i++) {
        const gguf_tensor_info *t = &w->t[i].info;
        size_t row = ggml_row_size(t->type, t->ne[0]);
        int64_t n_rows = t->n_elements / t->ne[0];
        int64_t step = (int64_t)(max_chunk / row);
        for (int64_t r0 = 0; r0 < n_rows; r0 += step) {
            int64_t nr = n_rows - r0 < step ? n_rows - r0 : step;
            memset(chunk, 0, (size_t)nr * row);
            if ((rc = fill(user, i, t, r0, nr, chunk, err))) goto done;
            if ((rc = write_all(f, chunk, (size_t)nr * row, path, err))) goto done;
        }
        if ((rc = write_pad(f, t->n_bytes, align, path, err))) goto done;
    }
    if (fflush(f) != 0 || ferror(f)) {
        rc = forge_err_set(err, FORGE_E_IO, "%s: write failed: %s", path, strerror(errno));
        goto done;
    }
    goto done;
oom:
    rc = forge_err_set(err, FORGE_E_NOMEM, "gguf writer: %s: out of memory", path);
done:
    if (f) {
        if (fclose(f) != 0 && !rc)
            rc = forge_err_set(err, FORGE_E_IO, "%s: close failed: %s", path, strerror(errno));
        if (rc && !existed) (void)unlink(path);
    }
    free(chunk);
    free(head.p);
    return rc;
}
