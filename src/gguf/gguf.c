/* gguf.c - the GGUF reader: maps a file read-only (or takes a caller's buffer), validates every
 * count, length, type, shape and extent against the file size before use, and builds small
 * lookup tables (key and tensor-name hash indexes, per-element offsets of string arrays) so that
 * every accessor afterwards is O(1) and cannot read outside the mapping.
 * It never writes to the file and keeps no global state. Type traits live in gguf_types.c. */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/util.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the GGUF reader assumes a little-endian host"
#endif

#define GGUF_MAX_NESTING 8       /* arrays of arrays: at most this many levels */
#define GGUF_HEADER_BYTES 24     /* magic, version, tensor count, KV count */
#define GGUF_MIN_KV_BYTES 13     /* key length (8) + type (4) + a 1-byte value */
#define GGUF_MIN_TENSOR_BYTES 32 /* name length + n_dims + one dim + type + offset */

/* An array value: where its elements are, and for variable-size elements (strings, arrays) the
 * file offset of each element so that element j is found in O(1). */
struct gguf_arr {
    gguf_type elem_type;
    uint64_t n;
    uint64_t data_off;    /* file offset of element 0 */
    uint64_t *elem_off;   /* STRING/ARRAY elements: file offset of each element; else NULL */
    struct gguf_arr *sub; /* ARRAY elements: one descriptor per element; else NULL */
};

struct gguf_kv {
    char *key;            /* NUL-terminated copy */
    gguf_type type;
    uint64_t off;         /* file offset of the value */
    struct gguf_arr arr;  /* when type == ARRAY */
};

/* Open-addressing hash table of names -> index; slots hold index + 1 (0 = empty). */
struct name_index {
    uint64_t mask;
    int64_t *slots;
};

struct gguf_ctx {
    char *path;
    const uint8_t *base;
    uint64_t size;
    void *map; /* non-NULL when we own an mmap of `size` bytes */
    uint32_t version;
    uint64_t alignment;
    uint64_t data_offset;
    int64_t n_kv;
    struct gguf_kv *kv;
    int64_t n_tensors;
    gguf_tensor_info *tensors;
    struct name_index kv_index, tensor_index;
};

struct reader {
    const uint8_t *base;
    uint64_t size;
    uint64_t pos;
    const char *name;
    forge_err *err;
};

/* ---- small helpers ----------------------------------------------------------------------- */

static int rfail(const struct reader *r, uint64_t off, int code, const char *fmt, ...)
    FORGE_PRINTF(4, 5);
static int rfail(const struct reader *r, uint64_t off, int code, const char *fmt, ...)
{
    char msg[FORGE_ERR_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return forge_err_set(r->err, code, "%s: offset %llu: %s", r->name, (unsigned long long)off, msg);
}

/* Copy s into buf (at most 64 visible bytes), escaping control bytes, so that names taken from
 * an untrusted file keep messages on one line. */
static const char *printable(const char *s, size_t len, char buf[96])
{
    size_t o = 0;
    for (size_t i = 0; i < len && o < 88; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c == 0x7f || c == '\\') {
            o += (size_t)snprintf(buf + o, 96 - o, "\\x%02x", c);
        } else {
            buf[o++] = (char)c;
        }
    }
    if (o >= 88) {
        memcpy(buf + o, "...", 3);
        o += 3;
    }
    buf[o] = '\0';
    return buf;
}

static uint64_t remaining(const struct reader *r)
{
    return r->size - r->pos;
}

static uint32_t load_u32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static uint64_t load_u64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static int need(const struct reader *r, uint64_t n, const char *what)
{
    if (n > remaining(r))
        return rfail(r, r->pos, FORGE_E_FORMAT, "truncated: %s needs %llu bytes but only %llu remain",
                     what, (unsigned long long)n, (unsigned long long)remaining(r));
    return FORGE_OK;
}

static int read_u32(struct reader *r, uint32_t *out, const char *what)
{
    int rc = need(r, 4, what);
    if (rc) return rc;
    *out = load_u32(r->base + r->pos);
    r->pos += 4;
    return FORGE_OK;
}

static int read_u64(struct reader *r, uint64_t *out, const char *what)
{
    int rc = need(r, 8, what);
    if (rc) return rc;
    *out = load_u64(r->base + r->pos);
    r->pos += 8;
    return FORGE_OK;
}

/* A length-prefixed string: leaves *off at its first byte and the reader after it. */
static int read_str(struct reader *r, uint64_t *off, uint64_t *len, const char *what)
{
    uint64_t at = r->pos;
    int rc = read_u64(r, len, what);
    if (rc) return rc;
    if (*len > remaining(r))
        return rfail(r, at, FORGE_E_FORMAT, "%s length %llu exceeds the %llu remaining bytes", what,
                     (unsigned long long)*len, (unsigned long long)remaining(r));
    *off = r->pos;
    r->pos += *len;
    return FORGE_OK;
}

/* Bytes of a fixed-size scalar value type; 0 for STRING/ARRAY/invalid. */
static size_t scalar_size(int t)
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

static uint64_t hash_name(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 0x100000001b3ull;
    return h;
}

static int index_init(struct name_index *ix, int64_t n)
{
    uint64_t cap = 16;
    while (cap < (uint64_t)n * 2) cap *= 2;
    ix->slots = calloc(cap, sizeof *ix->slots);
    if (!ix->slots) return FORGE_E_NOMEM;
    ix->mask = cap - 1;
    return FORGE_OK;
}

/* Insert entry i named `name`; returns the index of an existing entry of that name, or -1. */
static int64_t index_insert(struct name_index *ix, const char *name, int64_t i,
                            const char *(*name_of)(const void *, int64_t), const void *owner)
{
    for (uint64_t h = hash_name(name) & ix->mask;; h = (h + 1) & ix->mask) {
        int64_t s = ix->slots[h];
        if (s == 0) {
            ix->slots[h] = i + 1;
            return -1;
        }
        if (!strcmp(name_of(owner, s - 1), name)) return s - 1;
    }
}

static int64_t index_find(const struct name_index *ix, const char *name,
                          const char *(*name_of)(const void *, int64_t), const void *owner)
{
    if (!ix->slots || !name) return -1;
    for (uint64_t h = hash_name(name) & ix->mask;; h = (h + 1) & ix->mask) {
        int64_t s = ix->slots[h];
        if (s == 0) return -1;
        if (!strcmp(name_of(owner, s - 1), name)) return s - 1;
    }
}

static const char *kv_name_of(const void *ctx, int64_t i)
{
    return ((const gguf_ctx *)ctx)->kv[i].key;
}

static const char *tensor_name_of(const void *ctx, int64_t i)
{
    return ((const gguf_ctx *)ctx)->tensors[i].name;
}

static void arr_free(struct gguf_arr *a)
{
    if (a->sub)
        for (uint64_t i = 0; i < a->n; i++) arr_free(&a->sub[i]);
    free(a->sub);
    free(a->elem_off);
    a->sub = NULL;
    a->elem_off = NULL;
}

/* ---- parsing ----------------------------------------------------------------------------- */

static int parse_value(struct reader *r, int type, int depth, struct gguf_arr *arr,
                       const char *key);

/* The body of an array value (element type, count, elements) at r->pos. */
static int parse_array(struct reader *r, int depth, struct gguf_arr *arr, const char *key)
{
    uint64_t at = r->pos;
    uint32_t et;
    uint64_t n, min_bytes;
    int rc;

    if (depth >= GGUF_MAX_NESTING)
        return rfail(r, at, FORGE_E_FORMAT, "key '%s': arrays nested deeper than %d levels", key,
                     GGUF_MAX_NESTING);
    if ((rc = read_u32(r, &et, "array element type"))) return rc;
    if (et >= GGUF_TYPE_COUNT)
        return rfail(r, at, FORGE_E_FORMAT, "key '%s': invalid array element type %u", key, et);
    if ((rc = read_u64(r, &n, "array length"))) return rc;
    arr->elem_type = (gguf_type)et;
    arr->data_off = r->pos;
    min_bytes = et == GGUF_TYPE_STRING ? 8 : et == GGUF_TYPE_ARRAY ? 12 : scalar_size(et);
    if (n > remaining(r) / min_bytes)
        return rfail(r, at + 4, FORGE_E_FORMAT,
                     "key '%s': array of %llu %s elements cannot fit in the %llu remaining bytes",
                     key, (unsigned long long)n, gguf_type_name((int)et),
                     (unsigned long long)remaining(r));
    if (et != GGUF_TYPE_STRING && et != GGUF_TYPE_ARRAY) {
        r->pos += n * min_bytes;
        arr->n = n;
        return FORGE_OK;
    }
    if (n > 0) {
        arr->elem_off = malloc(n * sizeof *arr->elem_off);
        if (!arr->elem_off) return rfail(r, at, FORGE_E_NOMEM, "key '%s': out of memory", key);
        if (et == GGUF_TYPE_ARRAY) {
            arr->sub = calloc(n, sizeof *arr->sub);
            if (!arr->sub) return rfail(r, at, FORGE_E_NOMEM, "key '%s': out of memory", key);
        }
    }
    arr->n = n; /* arr_free walks sub[0..n) (calloc'd, so safe even if parsing stops early) */
    if (et == GGUF_TYPE_STRING) {
        /* the hot loop for vocabularies (hundreds of thousands of strings) */
        const uint8_t *base = r->base;
        uint64_t pos = r->pos, size = r->size;
        for (uint64_t i = 0; i < n; i++) {
            if (size - pos < 8) {
                r->pos = pos;
                return rfail(r, pos, FORGE_E_FORMAT,
                             "key '%s': truncated: string %llu of %llu needs 8 length bytes", key,
                             (unsigned long long)i, (unsigned long long)n);
            }
            uint64_t len = load_u64(base + pos);
            if (len > size - pos - 8)
                return rfail(r, pos, FORGE_E_FORMAT,
                             "key '%s': string %llu length %llu exceeds the %llu remaining bytes",
                             key, (unsigned long long)i, (unsigned long long)len,
                             (unsigned long long)(size - pos - 8));
            arr->elem_off[i] = pos;
            pos += 8 + len;
        }
        r->pos = pos;
        return FORGE_OK;
    }
    for (uint64_t i = 0; i < n; i++) {
        arr->elem_off[i] = r->pos;
        if ((rc = parse_value(r, GGUF_TYPE_ARRAY, depth + 1, &arr->sub[i], key))) return rc;
    }
    return FORGE_OK;
}

static int parse_value(struct reader *r, int type, int depth, struct gguf_arr *arr,
                       const char *key)
{
    size_t sz = scalar_size(type);
    char what[128];
    if (type == GGUF_TYPE_ARRAY) return parse_array(r, depth, arr, key);
    if (type == GGUF_TYPE_STRING) {
        uint64_t off, len;
        snprintf(what, sizeof what, "key '%s': string", key);
        return read_str(r, &off, &len, what);
    }
    snprintf(what, sizeof what, "key '%s': %s value", key, gguf_type_name(type));
    int rc = need(r, sz, what);
    if (rc) return rc;
    r->pos += sz;
    return FORGE_OK;
}

static int parse_kvs(struct reader *r, gguf_ctx *ctx)
{
    int rc;
    char pbuf[96];
    if ((rc = index_init(&ctx->kv_index, ctx->n_kv)))
        return rfail(r, r->pos, rc, "out of memory for %lld keys", (long long)ctx->n_kv);
    for (int64_t i = 0; i < ctx->n_kv; i++) {
        struct gguf_kv *kv = &ctx->kv[i];
        uint64_t at = r->pos, koff, klen;
        uint32_t type;
        char what[64];
        snprintf(what, sizeof what, "key %lld of %lld", (long long)i, (long long)ctx->n_kv);
        if ((rc = read_str(r, &koff, &klen, what))) return rc;
        if (memchr(r->base + koff, '\0', klen))
            return rfail(r, at, FORGE_E_FORMAT, "key '%s' contains a NUL byte",
                         printable((const char *)r->base + koff, klen, pbuf));
        kv->key = malloc(klen + 1);
        if (!kv->key) return rfail(r, at, FORGE_E_NOMEM, "out of memory");
        memcpy(kv->key, r->base + koff, klen);
        kv->key[klen] = '\0';
        printable(kv->key, klen, pbuf);
        if (index_insert(&ctx->kv_index, kv->key, i, kv_name_of, ctx) >= 0)
            return rfail(r, at, FORGE_E_FORMAT, "duplicate key '%s'", pbuf);
        uint64_t tat = r->pos;
        snprintf(what, sizeof what, "key '%.40s': value type", pbuf);
        if ((rc = read_u32(r, &type, what))) return rc;
        if (type >= GGUF_TYPE_COUNT)
            return rfail(r, tat, FORGE_E_FORMAT, "key '%s': invalid value type %u", pbuf, type);
        kv->type = (gguf_type)type;
        kv->off = r->pos;
        if ((rc = parse_value(r, (int)type, 0, &kv->arr, pbuf))) return rc;
    }
    return FORGE_OK;
}

static int parse_tensors(struct reader *r, gguf_ctx *ctx)
{
    int rc;
    char pbuf[96];
    if ((rc = index_init(&ctx->tensor_index, ctx->n_tensors)))
        return rfail(r, r->pos, rc, "out of memory for %lld tensors", (long long)ctx->n_tensors);
    for (int64_t i = 0; i < ctx->n_tensors; i++) {
        gguf_tensor_info *t = &ctx->tensors[i];
        uint64_t at = r->pos, noff, nlen, v, dims_at;
        uint32_t n_dims, type;
        char what[160];
        snprintf(what, sizeof what, "tensor %lld of %lld: name", (long long)i,
                 (long long)ctx->n_tensors);
        if ((rc = read_str(r, &noff, &nlen, what))) return rc;
        if (memchr(r->base + noff, '\0', nlen))
            return rfail(r, at, FORGE_E_FORMAT, "tensor name '%s' contains a NUL byte",
                         printable((const char *)r->base + noff, nlen, pbuf));
        char *name = malloc(nlen + 1);
        if (!name) return rfail(r, at, FORGE_E_NOMEM, "out of memory");
        memcpy(name, r->base + noff, nlen);
        name[nlen] = '\0';
        t->name = name;
        printable(name, nlen, pbuf);
        if (index_insert(&ctx->tensor_index, name, i, tensor_name_of, ctx) >= 0)
            return rfail(r, at, FORGE_E_FORMAT, "duplicate tensor name '%s'", pbuf);

        snprintf(what, sizeof what, "tensor '%.60s': n_dims", pbuf);
        dims_at = r->pos;
        if ((rc = read_u32(r, &n_dims, what))) return rc;
        if (n_dims < 1 || n_dims > GGUF_MAX_DIMS)
            return rfail(r, dims_at, FORGE_E_FORMAT, "tensor '%s': n_dims %u is not in 1..%d",
                         pbuf, n_dims, GGUF_MAX_DIMS);
        t->n_dims = n_dims;
        int64_t n_el = 1;
        for (int d = 0; d < GGUF_MAX_DIMS; d++) t->ne[d] = 1;
        for (uint32_t d = 0; d < n_dims; d++) {
            uint64_t dat = r->pos;
            snprintf(what, sizeof what, "tensor '%.60s': dimension %u", pbuf, d);
            if ((rc = read_u64(r, &v, what))) return rc;
            if (v == 0 || v > (uint64_t)INT64_MAX)
                return rfail(r, dat, FORGE_E_FORMAT, "tensor '%s': dimension %u is %llu (must be 1..2^63-1)",
                             pbuf, d, (unsigned long long)v);
            t->ne[d] = (int64_t)v;
            if (!forge_mul_i64(n_el, (int64_t)v, &n_el))
                return rfail(r, dat, FORGE_E_FORMAT,
                             "tensor '%s': element count overflows (dimension %u is %llu)", pbuf, d,
                             (unsigned long long)v);
        }
        t->n_elements = n_el;
        uint64_t tat = r->pos;
        snprintf(what, sizeof what, "tensor '%.60s': type", pbuf);
        if ((rc = read_u32(r, &type, what))) return rc;
        if (!ggml_type_valid((int)type))
            return rfail(r, tat, FORGE_E_FORMAT, "tensor '%s': unknown or removed tensor type %u",
                         pbuf, type);
        t->type = (ggml_type)type;
        int64_t bs = ggml_type_block_size((int)type);
        if (t->ne[0] % bs != 0)
            return rfail(r, dims_at + 4, FORGE_E_FORMAT,
                         "tensor '%s': row length %lld is not a multiple of the %s block size %lld",
                         pbuf, (long long)t->ne[0], ggml_type_name((int)type), (long long)bs);
        if (!forge_mul_u64((uint64_t)(n_el / bs), ggml_type_block_bytes((int)type), &t->n_bytes))
            return rfail(r, dims_at, FORGE_E_FORMAT, "tensor '%s': byte size overflows", pbuf);
        snprintf(what, sizeof what, "tensor '%.60s': data offset", pbuf);
        if ((rc = read_u64(r, &t->offset, what))) return rc;
    }
    return FORGE_OK;
}

static int cmp_by_offset(const void *a, const void *b)
{
    const gguf_tensor_info *x = *(const gguf_tensor_info *const *)a;
    const gguf_tensor_info *y = *(const gguf_tensor_info *const *)b;
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

/* Alignment, data section, tensor extents, overlaps. */
static int check_layout(struct reader *r, gguf_ctx *ctx, uint64_t infos_end)
{
    char pbuf[96], pbuf2[96];
    int rc = FORGE_OK;
    const gguf_tensor_info **order = NULL;
    int64_t ai = gguf_find_key(ctx, "general.alignment");

    ctx->alignment = GGUF_DEFAULT_ALIGNMENT;
    if (ai >= 0) {
        const struct gguf_kv *kv = &ctx->kv[ai];
        if (kv->type != GGUF_TYPE_UINT32)
            return rfail(r, kv->off - 4, FORGE_E_FORMAT,
                         "key 'general.alignment' has type %s, expected u32", gguf_type_name(kv->type));
        uint32_t a = load_u32(r->base + kv->off);
        if (a == 0 || (a & (a - 1)) != 0)
            return rfail(r, kv->off, FORGE_E_FORMAT,
                         "key 'general.alignment' is %u, which is not a power of two", a);
        ctx->alignment = a;
    }
    uint64_t pad = (ctx->alignment - infos_end % ctx->alignment) % ctx->alignment;
    if (!forge_add_u64(infos_end, pad, &ctx->data_offset))
        return rfail(r, infos_end, FORGE_E_FORMAT, "data offset overflows");
    if (ctx->n_tensors == 0) return FORGE_OK; /* vocab-only files may end without padding */
    if (ctx->data_offset > r->size)
        return rfail(r, infos_end, FORGE_E_FORMAT,
                     "truncated: tensor data section starts at %llu but the file has %llu bytes",
                     (unsigned long long)ctx->data_offset, (unsigned long long)r->size);
    uint64_t data_size = r->size - ctx->data_offset;
    for (int64_t i = 0; i < ctx->n_tensors; i++) {
        gguf_tensor_info *t = &ctx->tensors[i];
        printable(t->name, strlen(t->name), pbuf);
        if (t->offset % ctx->alignment != 0)
            return rfail(r, ctx->data_offset, FORGE_E_FORMAT,
                         "tensor '%s': data offset %llu is not a multiple of the alignment %llu",
                         pbuf, (unsigned long long)t->offset, (unsigned long long)ctx->alignment);
        if (t->offset > data_size || t->n_bytes > data_size - t->offset)
            return rfail(r, ctx->data_offset, FORGE_E_FORMAT,
                         "tensor '%s': data [%llu, +%llu bytes) extends past the end of the file "
                         "(data section is %llu bytes)",
                         pbuf, (unsigned long long)t->offset, (unsigned long long)t->n_bytes,
                         (unsigned long long)data_size);
        t->data = r->base + ctx->data_offset + t->offset;
    }
    order = malloc((size_t)ctx->n_tensors * sizeof *order);
    if (!order) return rfail(r, ctx->data_offset, FORGE_E_NOMEM, "out of memory");
    for (int64_t i = 0; i < ctx->n_tensors; i++) order[i] = &ctx->tensors[i];
    qsort(order, (size_t)ctx->n_tensors, sizeof *order, cmp_by_offset);
    for (int64_t i = 0; i + 1 < ctx->n_tensors; i++) {
        if (order[i]->offset + order[i]->n_bytes > order[i + 1]->offset) {
            rc = rfail(r, ctx->data_offset + order[i + 1]->offset, FORGE_E_FORMAT,
                       "tensors '%s' (data offset %llu, %llu bytes) and '%s' (data offset %llu) overlap",
                       printable(order[i]->name, strlen(order[i]->name), pbuf),
                       (unsigned long long)order[i]->offset, (unsigned long long)order[i]->n_bytes,
                       printable(order[i + 1]->name, strlen(order[i + 1]->name), pbuf2),
                       (unsigned long long)order[i + 1]->offset);
            break;
        }
    }
    free(order);
    return rc;
}

static int parse(gguf_ctx *ctx, forge_err *err)
{
    struct reader r = {ctx->base, ctx->size, 0, ctx->path, err};
    uint64_t n_tensors, n_kv;
    int rc;

    if (ctx->size < 4 || memcmp(ctx->base, "GGUF", 4) != 0) {
        char pbuf[96];
        if (ctx->size < 4) return rfail(&r, 0, FORGE_E_FORMAT, "not a GGUF file (only %llu bytes)",
                                        (unsigned long long)ctx->size);
        return rfail(&r, 0, FORGE_E_FORMAT, "bad magic '%s' (expected 'GGUF'): not a GGUF file",
                     printable((const char *)ctx->base, 4, pbuf));
    }
    r.pos = 4;
    if ((rc = read_u32(&r, &ctx->version, "version"))) return rc;
    if (ctx->version != 2 && ctx->version != 3) {
        if (ctx->version == 1)
            return rfail(&r, 4, FORGE_E_UNSUPPORTED,
                         "GGUF version 1 is not supported (only versions 2 and 3)");
        if ((ctx->version & 0xffff) == 0)
            return rfail(&r, 4, FORGE_E_UNSUPPORTED,
                         "version %u looks byte-swapped: big-endian GGUF files are not supported",
                         ctx->version);
        return rfail(&r, 4, FORGE_E_UNSUPPORTED,
                     "unsupported GGUF version %u (only versions 2 and 3)", ctx->version);
    }
    if ((rc = read_u64(&r, &n_tensors, "tensor count"))) return rc;
    if ((rc = read_u64(&r, &n_kv, "key-value count"))) return rc;
    if (n_kv > remaining(&r) / GGUF_MIN_KV_BYTES)
        return rfail(&r, 16, FORGE_E_FORMAT, "key-value count %llu cannot fit in the %llu remaining bytes",
                     (unsigned long long)n_kv, (unsigned long long)remaining(&r));
    if (n_tensors > remaining(&r) / GGUF_MIN_TENSOR_BYTES ||
        n_kv * GGUF_MIN_KV_BYTES + n_tensors * GGUF_MIN_TENSOR_BYTES > remaining(&r))
        return rfail(&r, 8, FORGE_E_FORMAT, "tensor count %llu cannot fit in the %llu remaining bytes",
                     (unsigned long long)n_tensors, (unsigned long long)remaining(&r));
    ctx->n_kv = (int64_t)n_kv;
    ctx->n_tensors = (int64_t)n_tensors;
    if (n_kv) {
        ctx->kv = calloc(n_kv, sizeof *ctx->kv);
        if (!ctx->kv) return rfail(&r, 16, FORGE_E_NOMEM, "out of memory for %llu keys",
                                   (unsigned long long)n_kv);
    }
    if (n_tensors) {
        ctx->tensors = calloc(n_tensors, sizeof *ctx->tensors);
        if (!ctx->tensors) return rfail(&r, 8, FORGE_E_NOMEM, "out of memory for %llu tensors",
                                        (unsigned long long)n_tensors);
    }
    if ((rc = parse_kvs(&r, ctx))) return rc;
    if ((rc = parse_tensors(&r, ctx))) return rc;
    return check_layout(&r, ctx, r.pos);
}

static int open_common(gguf_ctx *ctx, gguf_ctx **out, forge_err *err)
{
    int rc = parse(ctx, err);
    if (rc) {
        gguf_close(ctx);
        return rc;
    }
    *out = ctx;
    return FORGE_OK;
}

int gguf_open_memory(const void *data, size_t size, const char *name, gguf_ctx **out,
                     forge_err *err)
{
    gguf_ctx *ctx;
    if (!out) return forge_err_set(err, FORGE_E_INVALID, "gguf_open_memory: out is NULL");
    *out = NULL;
    if (!name) name = "<memory>";
    if (!data && size) return forge_err_set(err, FORGE_E_INVALID, "%s: NULL buffer", name);
    ctx = calloc(1, sizeof *ctx);
    if (!ctx) return forge_err_set(err, FORGE_E_NOMEM, "%s: out of memory", name);
    ctx->path = strdup(name);
    if (!ctx->path) {
        free(ctx);
        return forge_err_set(err, FORGE_E_NOMEM, "%s: out of memory", name);
    }
    ctx->base = data ? data : (const uint8_t *)"";
    ctx->size = size;
    return open_common(ctx, out, err);
}

int gguf_open(const char *path, gguf_ctx **out, forge_err *err)
{
    int rc = FORGE_OK, fd = -1;
    gguf_ctx *ctx = NULL;
    struct stat st;

    if (!out || !path) return forge_err_set(err, FORGE_E_INVALID, "gguf_open: NULL argument");
    *out = NULL;
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        rc = forge_err_set(err, FORGE_E_IO, "%s: cannot open: %s", path, strerror(errno));
        goto fail;
    }
    if (fstat(fd, &st) != 0) {
        rc = forge_err_set(err, FORGE_E_IO, "%s: cannot stat: %s", path, strerror(errno));
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = forge_err_set(err, FORGE_E_IO, "%s: not a regular file", path);
        goto fail;
    }
    if (st.st_size < GGUF_HEADER_BYTES) {
        rc = forge_err_set(err, FORGE_E_FORMAT,
                           "%s: offset 0: not a GGUF file (only %lld bytes, a header needs %d)",
                           path, (long long)st.st_size, GGUF_HEADER_BYTES);
        goto fail;
    }
    ctx = calloc(1, sizeof *ctx);
    if (!ctx || !(ctx->path = strdup(path))) {
        rc = forge_err_set(err, FORGE_E_NOMEM, "%s: out of memory", path);
        goto fail;
    }
    ctx->size = (uint64_t)st.st_size;
    ctx->map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (ctx->map == MAP_FAILED) {
        ctx->map = NULL;
        rc = forge_err_set(err, FORGE_E_IO, "%s: cannot map %lld bytes: %s", path,
                           (long long)st.st_size, strerror(errno));
        goto fail;
    }
    ctx->base = ctx->map;
    (void)close(fd);
    return open_common(ctx, out, err);
fail:
    if (fd >= 0) (void)close(fd);
    gguf_close(ctx);
    return rc;
}

void gguf_close(gguf_ctx *ctx)
{
    if (!ctx) return;
    for (int64_t i = 0; ctx->kv && i < ctx->n_kv; i++) {
        free(ctx->kv[i].key);
        if (ctx->kv[i].type == GGUF_TYPE_ARRAY) arr_free(&ctx->kv[i].arr);
    }
    for (int64_t i = 0; ctx->tensors && i < ctx->n_tensors; i++) free((char *)ctx->tensors[i].name);
    free(ctx->kv);
    free(ctx->tensors);
    free(ctx->kv_index.slots);
    free(ctx->tensor_index.slots);
    if (ctx->map) (void)munmap(ctx->map, (size_t)ctx->size);
    free(ctx->path);
    free(ctx);
}

/* ---- simple accessors -------------------------------------------------------------------- */

const char *gguf_path(const gguf_ctx *ctx)
{
    return ctx->path;
}
uint32_t gguf_version(const gguf_ctx *ctx)
{
    return ctx->version;
}
uint64_t gguf_file_size(const gguf_ctx *ctx)
{
    return ctx->size;
}
uint64_t gguf_alignment(const gguf_ctx *ctx)
{
    return ctx->alignment;
}
uint64_t gguf_data_offset(const gguf_ctx *ctx)
{
    return ctx->data_offset;
}
int64_t gguf_kv_count(const gguf_ctx *ctx)
{
    return ctx->n_kv;
}

const char *gguf_kv_key(const gguf_ctx *ctx, int64_t i)
{
    return i >= 0 && i < ctx->n_kv ? ctx->kv[i].key : NULL;
}

gguf_type gguf_kv_type(const gguf_ctx *ctx, int64_t i)
{
    return i >= 0 && i < ctx->n_kv ? ctx->kv[i].type : GGUF_TYPE_COUNT;
}

int64_t gguf_find_key(const gguf_ctx *ctx, const char *key)
{
    return index_find(&ctx->kv_index, key, kv_name_of, ctx);
}

int64_t gguf_tensor_count(const gguf_ctx *ctx)
{
    return ctx->n_tensors;
}

const gguf_tensor_info *gguf_tensor(const gguf_ctx *ctx, int64_t i)
{
    return i >= 0 && i < ctx->n_tensors ? &ctx->tensors[i] : NULL;
}

const gguf_tensor_info *gguf_find_tensor(const gguf_ctx *ctx, const char *name)
{
    int64_t i = index_find(&ctx->tensor_index, name, tensor_name_of, ctx);
    return i >= 0 ? &ctx->tensors[i] : NULL;
}

/* ---- typed getters ----------------------------------------------------------------------- */

static int lookup(const gguf_ctx *ctx, const char *key, const struct gguf_kv **kv, forge_err *err)
{
    int64_t i = gguf_find_key(ctx, key);
    if (i < 0)
        return forge_err_set(err, FORGE_E_NOTFOUND, "%s: key '%s' not found", ctx->path,
                             key ? key : "(null)");
    *kv = &ctx->kv[i];
    return FORGE_OK;
}

static int type_error(const gguf_ctx *ctx, const struct gguf_kv *kv, const char *expected,
                      forge_err *err)
{
    return forge_err_set(err, FORGE_E_TYPE, "%s: key '%s' has type %s, expected %s", ctx->path,
                         kv->key, gguf_type_name(kv->type), expected);
}

static bool is_int_type(int t)
{
    switch (t) {
    case GGUF_TYPE_UINT8:
    case GGUF_TYPE_INT8:
    case GGUF_TYPE_UINT16:
    case GGUF_TYPE_INT16:
    case GGUF_TYPE_UINT32:
    case GGUF_TYPE_INT32:
    case GGUF_TYPE_UINT64:
    case GGUF_TYPE_INT64: return true;
    default: return false;
    }
}

/* An integer scalar: *neg and *mag (magnitude), so any source fits any target check. */
static void load_int(int t, const uint8_t *p, bool *neg, uint64_t *mag)
{
    int64_t s = 0;
    uint64_t u = 0;
    bool is_signed = true;
    switch (t) {
    case GGUF_TYPE_UINT8: u = p[0], is_signed = false; break;
    case GGUF_TYPE_INT8: s = (int8_t)p[0]; break;
    case GGUF_TYPE_UINT16: { uint16_t v; memcpy(&v, p, 2); u = v; is_signed = false; break; }
    case GGUF_TYPE_INT16: { int16_t v; memcpy(&v, p, 2); s = v; break; }
    case GGUF_TYPE_UINT32: u = load_u32(p), is_signed = false; break;
    case GGUF_TYPE_INT32: { int32_t v; memcpy(&v, p, 4); s = v; break; }
    case GGUF_TYPE_UINT64: u = load_u64(p), is_signed = false; break;
    case GGUF_TYPE_INT64: { int64_t v; memcpy(&v, p, 8); s = v; break; }
    default: break;
    }
    if (!is_signed) {
        *neg = false;
        *mag = u;
    } else if (s < 0) {
        *neg = true;
        *mag = (uint64_t)0 - (uint64_t)s;
    } else {
        *neg = false;
        *mag = (uint64_t)s;
    }
}

/* Read integer key into [-(neg_max), pos_max]; result as neg/mag. */
static int get_int(const gguf_ctx *ctx, const char *key, uint64_t neg_max, uint64_t pos_max,
                   const char *tname, bool *neg, uint64_t *mag, forge_err *err)
{
    const struct gguf_kv *kv;
    int rc = lookup(ctx, key, &kv, err);
    if (rc) return rc;
    if (!is_int_type(kv->type)) return type_error(ctx, kv, tname, err);
    load_int(kv->type, ctx->base + kv->off, neg, mag);
    if ((*neg && *mag > neg_max) || (!*neg && *mag > pos_max))
        return forge_err_set(err, FORGE_E_RANGE, "%s: key '%s' value %s%llu does not fit in %s",
                             ctx->path, kv->key, *neg ? "-" : "", (unsigned long long)*mag, tname);
    return FORGE_OK;
}

int gguf_get_u8(const gguf_ctx *ctx, const char *key, uint8_t *out, forge_err *err)
{
    bool neg;
    uint64_t mag;
    int rc = get_int(ctx, key, 0, UINT8_MAX, "u8", &neg, &mag, err);
    if (!rc) *out = (uint8_t)mag;
    return rc;
}

int gguf_get_i32(const gguf_ctx *ctx, const char *key, int32_t *out, forge_err *err)
{
    bool neg;
    uint64_t mag;
    int rc = get_int(ctx, key, (uint64_t)INT32_MAX + 1, INT32_MAX, "i32", &neg, &mag, err);
    if (!rc) *out = neg ? (int32_t)(-(int64_t)mag) : (int32_t)mag;
    return rc;
}

int gguf_get_u32(const gguf_ctx *ctx, const char *key, uint32_t *out, forge_err *err)
{
    bool neg;
    uint64_t mag;
    int rc = get_int(ctx, key, 0, UINT32_MAX, "u32", &neg, &mag, err);
    if (!rc) *out = (uint32_t)mag;
    return rc;
}

int gguf_get_i64(const gguf_ctx *ctx, const char *key, int64_t *out, forge_err *err)
{
    bool neg;
    uint64_t mag;
    int rc = get_int(ctx, key, (uint64_t)INT64_MAX + 1, INT64_MAX, "i64", &neg, &mag, err);
    if (!rc) *out = neg ? (int64_t)((uint64_t)0 - mag) : (int64_t)mag;
    return rc;
}

int gguf_get_u64(const gguf_ctx *ctx, const char *key, uint64_t *out, forge_err *err)
{
    bool neg;
    uint64_t mag;
    int rc = get_int(ctx, key, 0, UINT64_MAX, "u64", &neg, &mag, err);
    if (!rc) *out = mag;
    return rc;
}

static int get_float(const gguf_ctx *ctx, const char *key, double *out, const char *tname,
                     forge_err *err)
{
    const struct gguf_kv *kv;
    int rc = lookup(ctx, key, &kv, err);
    if (rc) return rc;
    if (kv->type == GGUF_TYPE_FLOAT32) {
        float f;
        memcpy(&f, ctx->base + kv->off, 4);
        *out = f;
    } else if (kv->type == GGUF_TYPE_FLOAT64) {
        memcpy(out, ctx->base + kv->off, 8);
    } else {
        return type_error(ctx, kv, tname, err);
    }
    return FORGE_OK;
}

int gguf_get_f32(const gguf_ctx *ctx, const char *key, float *out, forge_err *err)
{
    double d;
    int rc = get_float(ctx, key, &d, "f32", err);
    if (!rc) *out = (float)d;
    return rc;
}

int gguf_get_f64(const gguf_ctx *ctx, const char *key, double *out, forge_err *err)
{
    return get_float(ctx, key, out, "f64", err);
}

int gguf_get_bool(const gguf_ctx *ctx, const char *key, bool *out, forge_err *err)
{
    const struct gguf_kv *kv;
    int rc = lookup(ctx, key, &kv, err);
    if (rc) return rc;
    if (kv->type != GGUF_TYPE_BOOL) return type_error(ctx, kv, "bool", err);
    *out = ctx->base[kv->off] != 0;
    return FORGE_OK;
}

static gguf_str str_at(const gguf_ctx *ctx, uint64_t off)
{
    gguf_str s = {(const char *)ctx->base + off + 8, load_u64(ctx->base + off)};
    return s;
}

int gguf_get_str(const gguf_ctx *ctx, const char *key, gguf_str *out, forge_err *err)
{
    const struct gguf_kv *kv;
    int rc = lookup(ctx, key, &kv, err);
    if (rc) return rc;
    if (kv->type != GGUF_TYPE_STRING) return type_error(ctx, kv, "str", err);
    *out = str_at(ctx, kv->off);
    return FORGE_OK;
}

int gguf_get_arr(const gguf_ctx *ctx, const char *key, gguf_type *elem_type, uint64_t *n,
                 forge_err *err)
{
    const struct gguf_kv *kv;
    int rc = lookup(ctx, key, &kv, err);
    if (rc) return rc;
    if (kv->type != GGUF_TYPE_ARRAY) return type_error(ctx, kv, "arr", err);
    if (elem_type) *elem_type = kv->arr.elem_type;
    if (n) *n = kv->arr.n;
    return FORGE_OK;
}

int gguf_get_arr_str(const gguf_ctx *ctx, const char *key, uint64_t i, gguf_str *out,
                     forge_err *err)
{
    const struct gguf_kv *kv;
    int rc = lookup(ctx, key, &kv, err);
    if (rc) return rc;
    if (kv->type != GGUF_TYPE_ARRAY || kv->arr.elem_type != GGUF_TYPE_STRING)
        return forge_err_set(err, FORGE_E_TYPE, "%s: key '%s' has type %s%s%s%s, expected arr[str]",
                             ctx->path, kv->key, gguf_type_name(kv->type),
                             kv->type == GGUF_TYPE_ARRAY ? "[" : "",
                             kv->type == GGUF_TYPE_ARRAY ? gguf_type_name(kv->arr.elem_type) : "",
                             kv->type == GGUF_TYPE_ARRAY ? "]" : "");
    if (i >= kv->arr.n)
        return forge_err_set(err, FORGE_E_RANGE, "%s: key '%s': index %llu out of range (%llu strings)",
                             ctx->path, kv->key, (unsigned long long)i, (unsigned long long)kv->arr.n);
    *out = str_at(ctx, kv->arr.elem_off[i]);
    return FORGE_OK;
}

static bool is_numeric(int t)
{
    return t != GGUF_TYPE_STRING && t != GGUF_TYPE_ARRAY && scalar_size(t) > 0;
}

static double load_double(int t, const uint8_t *p)
{
    if (t == GGUF_TYPE_FLOAT32) {
        float f;
        memcpy(&f, p, 4);
        return f;
    }
    if (t == GGUF_TYPE_FLOAT64) {
        double d;
        memcpy(&d, p, 8);
        return d;
    }
    if (t == GGUF_TYPE_BOOL) return p[0] != 0;
    bool neg;
    uint64_t mag;
    load_int(t, p, &neg, &mag);
    return neg ? -(double)mag : (double)mag;
}

static int numeric_arr(const gguf_ctx *ctx, const char *key, uint64_t n,
                       const struct gguf_kv **out, forge_err *err)
{
    const struct gguf_kv *kv;
    int rc = lookup(ctx, key, &kv, err);
    if (rc) return rc;
    if (kv->type != GGUF_TYPE_ARRAY || !is_numeric(kv->arr.elem_type))
        return forge_err_set(err, FORGE_E_TYPE,
                             "%s: key '%s' has type %s%s%s%s, expected a numeric array", ctx->path,
                             kv->key, gguf_type_name(kv->type),
                             kv->type == GGUF_TYPE_ARRAY ? "[" : "",
                             kv->type == GGUF_TYPE_ARRAY ? gguf_type_name(kv->arr.elem_type) : "",
                             kv->type == GGUF_TYPE_ARRAY ? "]" : "");
    if (n != kv->arr.n)
        return forge_err_set(err, FORGE_E_RANGE, "%s: key '%s' has %llu elements, caller expected %llu",
                             ctx->path, kv->key, (unsigned long long)kv->arr.n, (unsigned long long)n);
    *out = kv;
    return FORGE_OK;
}

int gguf_copy_arr_f32(const gguf_ctx *ctx, const char *key, float *dst, uint64_t n,
                      forge_err *err)
{
    const struct gguf_kv *kv;
    int rc = numeric_arr(ctx, key, n, &kv, err);
    if (rc) return rc;
    int t = kv->arr.elem_type;
    const uint8_t *p = ctx->base + kv->arr.data_off;
    size_t sz = scalar_size(t);
    if (t == GGUF_TYPE_FLOAT32) {
        if (n) memcpy(dst, p, n * 4);
        return FORGE_OK;
    }
    for (uint64_t i = 0; i < n; i++) dst[i] = (float)load_double(t, p + i * sz);
    return FORGE_OK;
}

int gguf_copy_arr_i32(const gguf_ctx *ctx, const char *key, int32_t *dst, uint64_t n,
                      forge_err *err)
{
    const struct gguf_kv *kv;
    int rc = numeric_arr(ctx, key, n, &kv, err);
    if (rc) return rc;
    int t = kv->arr.elem_type;
    const uint8_t *p = ctx->base + kv->arr.data_off;
    size_t sz = scalar_size(t);
    if (t == GGUF_TYPE_INT32) {
        if (n) memcpy(dst, p, n * 4);
        return FORGE_OK;
    }
    for (uint64_t i = 0; i < n; i++) {
        const uint8_t *e = p + i * sz;
        if (t == GGUF_TYPE_FLOAT32 || t == GGUF_TYPE_FLOAT64) {
            double d = load_double(t, e);
            if (!(d >= INT32_MIN && d <= INT32_MAX) || d != (double)(int32_t)d)
                return forge_err_set(err, FORGE_E_RANGE, "%s: key '%s': element %llu (%g) is not an i32",
                                     ctx->path, kv->key, (unsigned long long)i, d);
            dst[i] = (int32_t)d;
        } else if (t == GGUF_TYPE_BOOL) {
            dst[i] = e[0] != 0;
        } else {
            bool neg;
            uint64_t mag;
            load_int(t, e, &neg, &mag);
            if ((neg && mag > (uint64_t)INT32_MAX + 1) || (!neg && mag > INT32_MAX))
                return forge_err_set(err, FORGE_E_RANGE,
                                     "%s: key '%s': element %llu (%s%llu) does not fit in i32",
                                     ctx->path, kv->key, (unsigned long long)i, neg ? "-" : "",
                                     (unsigned long long)mag);
            dst[i] = neg ? (int32_t)(-(int64_t)mag) : (int32_t)mag;
        }
    }
    return FORGE_OK;
}

/* ---- generic walk ------------------------------------------------------------------------ */

int gguf_kv_value(const gguf_ctx *ctx, int64_t i, gguf_value *out)
{
    if (!ctx || !out || i < 0 || i >= ctx->n_kv) return FORGE_E_INVALID;
    const struct gguf_kv *kv = &ctx->kv[i];
    memset(out, 0, sizeof *out);
    out->type = kv->type;
    if (kv->type == GGUF_TYPE_STRING) {
        out->str = str_at(ctx, kv->off);
        out->raw = ctx->base + kv->off + 8;
    } else if (kv->type == GGUF_TYPE_ARRAY) {
        out->elem_type = kv->arr.elem_type;
        out->n = kv->arr.n;
        out->raw = ctx->base + kv->arr.data_off;
        out->priv = &kv->arr;
    } else {
        out->raw = ctx->base + kv->off;
    }
    return FORGE_OK;
}

int gguf_value_elem(const gguf_ctx *ctx, const gguf_value *arr, uint64_t j, gguf_value *out)
{
    if (!ctx || !arr || !out || arr->type != GGUF_TYPE_ARRAY || !arr->priv) return FORGE_E_INVALID;
    const struct gguf_arr *a = arr->priv;
    if (j >= a->n) return FORGE_E_RANGE;
    memset(out, 0, sizeof *out);
    out->type = a->elem_type;
    if (a->elem_type == GGUF_TYPE_STRING) {
        out->str = str_at(ctx, a->elem_off[j]);
        out->raw = ctx->base + a->elem_off[j] + 8;
    } else if (a->elem_type == GGUF_TYPE_ARRAY) {
        const struct gguf_arr *s = &a->sub[j];
        out->elem_type = s->elem_type;
        out->n = s->n;
        out->raw = ctx->base + s->data_off;
        out->priv = s;
    } else {
        out->raw = ctx->base + a->data_off + j * scalar_size(a->elem_type);
    }
    return FORGE_OK;
}
