/* cmd_inspect.c - `forge inspect`: print a GGUF file's header, metadata, tensor table and totals
 * (as text or one JSON document), or dump one tensor as float32. Uses only the public API. */
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "forge.h"
#include "cli_io.h"
#include "commands.h"
#include "engine_opts.h"

#define DEFAULT_MAX_ITEMS 8
#define DEFAULT_MAX_STR 256

struct opts {
    const char *file, *tensor, *dump;
    bool json, full;
    uint64_t max_items;
};

static void usage(FILE *out)
{
    fprintf(out,
            "usage: forge inspect FILE [--json] [--full] [--max-items N]\n"
            "       forge inspect FILE --tensor NAME [--dump OUT.f32]\n"
            "\n"
            "Print a GGUF file's header (version, alignment, data offset, counts), every metadata\n"
            "key with its type and value, the tensor table (name, type, shape in GGUF ne order,\n"
            "offset in the data section, bytes) and totals (parameters, bytes per type).\n"
            "\n"
            "  --json          the same as one JSON document\n"
            "  --max-items N   show the first N items of each array (default %d; the length is\n"
            "                  always shown); 0 shows all\n"
            "  --full          show whole arrays and strings (text mode abbreviates strings\n"
            "                  over %d bytes)\n"
            "  --tensor NAME   print only this tensor's entry\n"
            "  --dump OUT.f32  with --tensor: write the tensor as raw little-endian float32\n"
            "                  (row-major, ne[0] fastest), converted with forge_dequantize\n"
            "  -h, --help      this help\n"
            "\n"
            "Exit status: 0 ok, 1 the file is invalid or an error occurred, 2 bad usage.\n",
            DEFAULT_MAX_ITEMS, DEFAULT_MAX_STR);
}

/* ---- text output ------------------------------------------------------------------------- */

static void print_escaped(FILE *out, const char *s, uint64_t len, uint64_t max)
{
    uint64_t n = max && len > max ? max : len;
    fputc('"', out);
    for (uint64_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        switch (c) {
        case '"': fputs("\\\"", out); break;
        case '\\': fputs("\\\\", out); break;
        case '\n': fputs("\\n", out); break;
        case '\t': fputs("\\t", out); break;
        case '\r': fputs("\\r", out); break;
        default:
            if (c < 0x20 || c == 0x7f) fprintf(out, "\\x%02x", c);
            else fputc(c, out);
        }
    }
    fputc('"', out);
    if (n < len) fprintf(out, "... (%" PRIu64 " bytes)", len);
}

/* A key or tensor name from the file, padded to width; control bytes are escaped so that one
 * entry stays one line. */
static void print_name(FILE *out, const char *s, int width)
{
    int n = 0;
    for (const char *p = s; *p; p++, n++) {
        unsigned char c = (unsigned char)*p;
        if (c < 0x20 || c == 0x7f) {
            fprintf(out, "\\x%02x", c);
            n += 3;
        } else {
            fputc(c, out);
        }
    }
    for (; n < width; n++) fputc(' ', out);
}

static void scalar_text(FILE *out, const gguf_value *v)
{
    const uint8_t *p = v->raw;
    switch (v->type) {
    case GGUF_TYPE_UINT8: fprintf(out, "%u", p[0]); break;
    case GGUF_TYPE_INT8: fprintf(out, "%d", (int8_t)p[0]); break;
    case GGUF_TYPE_BOOL: fputs(p[0] ? "true" : "false", out); break;
    case GGUF_TYPE_UINT16: { uint16_t x; memcpy(&x, p, 2); fprintf(out, "%u", x); break; }
    case GGUF_TYPE_INT16: { int16_t x; memcpy(&x, p, 2); fprintf(out, "%d", x); break; }
    case GGUF_TYPE_UINT32: { uint32_t x; memcpy(&x, p, 4); fprintf(out, "%" PRIu32, x); break; }
    case GGUF_TYPE_INT32: { int32_t x; memcpy(&x, p, 4); fprintf(out, "%" PRId32, x); break; }
    case GGUF_TYPE_UINT64: { uint64_t x; memcpy(&x, p, 8); fprintf(out, "%" PRIu64, x); break; }
    case GGUF_TYPE_INT64: { int64_t x; memcpy(&x, p, 8); fprintf(out, "%" PRId64, x); break; }
    case GGUF_TYPE_FLOAT32: { float x; memcpy(&x, p, 4); fprintf(out, "%.9g", x); break; }
    case GGUF_TYPE_FLOAT64: { double x; memcpy(&x, p, 8); fprintf(out, "%.17g", x); break; }
    default: fputs("?", out);
    }
}

static void value_text(FILE *out, const gguf_ctx *c, const gguf_value *v, const struct opts *o)
{
    if (v->type == GGUF_TYPE_STRING) {
        print_escaped(out, v->str.data, v->str.len, o->full ? 0 : DEFAULT_MAX_STR);
    } else if (v->type == GGUF_TYPE_ARRAY) {
        uint64_t show = o->max_items && v->n > o->max_items ? o->max_items : v->n;
        if (show < v->n) fprintf(out, "[%" PRIu64 " items: ", v->n);
        else fputc('[', out);
        for (uint64_t j = 0; j < show; j++) {
            gguf_value e;
            if (gguf_value_elem(c, v, j, &e) != FORGE_OK) break;
            if (j) fputs(", ", out);
            value_text(out, c, &e, o);
        }
        fputs(show < v->n ? ", ...]" : "]", out);
    } else {
        scalar_text(out, v);
    }
}

static void type_text(char *buf, size_t n, const gguf_value *v)
{
    if (v->type == GGUF_TYPE_ARRAY) snprintf(buf, n, "arr[%s]", gguf_type_name(v->elem_type));
    else snprintf(buf, n, "%s", gguf_type_name(v->type));
}

static void shape_text(char *buf, size_t n, const gguf_tensor_info *t)
{
    size_t o = (size_t)snprintf(buf, n, "[");
    for (uint32_t d = 0; d < t->n_dims && o < n; d++)
        o += (size_t)snprintf(buf + o, n - o, "%s%" PRId64, d ? ", " : "", t->ne[d]);
    if (o < n) snprintf(buf + o, n - o, "]");
}

struct type_total {
    int64_t tensors;
    uint64_t bytes;
    int64_t params;
};

static void totals(const gguf_ctx *c, struct type_total *by_type, int64_t *params, uint64_t *bytes)
{
    *params = 0;
    *bytes = 0;
    memset(by_type, 0, sizeof(struct type_total) * GGML_TYPE_COUNT);
    for (int64_t i = 0; i < gguf_tensor_count(c); i++) {
        const gguf_tensor_info *t = gguf_tensor(c, i);
        by_type[t->type].tensors++;
        by_type[t->type].bytes += t->n_bytes;
        by_type[t->type].params += t->n_elements;
        *params += t->n_elements;
        *bytes += t->n_bytes;
    }
}

static void print_tensor_line(FILE *out, const gguf_tensor_info *t, int name_w)
{
    char shape[128];
    shape_text(shape, sizeof shape, t);
    fputs("  ", out);
    print_name(out, t->name, name_w);
    fprintf(out, " %-8s %-24s %12" PRIu64 " %12" PRIu64 "\n", ggml_type_name(t->type), shape,
            t->offset, t->n_bytes);
}

static int inspect_text(FILE *out, const gguf_ctx *c, const struct opts *o)
{
    int key_w = 10, name_w = 4;
    for (int64_t i = 0; i < gguf_kv_count(c); i++) {
        int l = (int)strlen(gguf_kv_key(c, i));
        if (l > key_w && l <= 60) key_w = l;
    }
    for (int64_t i = 0; i < gguf_tensor_count(c); i++) {
        int l = (int)strlen(gguf_tensor(c, i)->name);
        if (l > name_w && l <= 60) name_w = l;
    }
    fprintf(out, "file: %s\n", gguf_path(c));
    fprintf(out, "GGUF version %" PRIu32 ", %" PRIu64 " bytes, alignment %" PRIu64
                 ", tensor data at offset %" PRIu64 "\n",
            gguf_version(c), gguf_file_size(c), gguf_alignment(c), gguf_data_offset(c));
    fprintf(out, "%" PRId64 " metadata keys, %" PRId64 " tensors\n", gguf_kv_count(c),
            gguf_tensor_count(c));
    fprintf(out, "\nmetadata:\n");
    for (int64_t i = 0; i < gguf_kv_count(c); i++) {
        gguf_value v;
        char tname[32];
        if (gguf_kv_value(c, i, &v) != FORGE_OK) continue;
        type_text(tname, sizeof tname, &v);
        fputs("  ", out);
        print_name(out, gguf_kv_key(c, i), key_w);
        fprintf(out, " %-9s ", tname);
        value_text(out, c, &v, o);
        fputc('\n', out);
    }
    fprintf(out, "\ntensors:\n  %-*s %-8s %-24s %12s %12s\n", name_w, "name", "type", "shape",
            "offset", "bytes");
    for (int64_t i = 0; i < gguf_tensor_count(c); i++) print_tensor_line(out, gguf_tensor(c, i), name_w);
    struct type_total by_type[GGML_TYPE_COUNT];
    int64_t params;
    uint64_t bytes;
    totals(c, by_type, &params, &bytes);
    fprintf(out, "\ntotals:\n  parameters: %" PRId64 "\n  tensor bytes: %" PRIu64 "\n", params, bytes);
    for (int t = 0; t < GGML_TYPE_COUNT; t++)
        if (by_type[t].tensors)
            fprintf(out, "  %-8s %5" PRId64 " tensors %14" PRId64 " parameters %14" PRIu64 " bytes\n",
                    ggml_type_name(t), by_type[t].tensors, by_type[t].params, by_type[t].bytes);
    return 0;
}

/* ---- JSON output ------------------------------------------------------------------------- */

/* A JSON-safe copy of a file string: invalid UTF-8 and NUL become U+FFFD. Caller frees. */
static char *utf8_sanitize(const char *s, uint64_t len)
{
    char *out = malloc(len * 3 + 1), *o = out;
    if (!out) return NULL;
    for (uint64_t i = 0; i < len;) {
        unsigned char c = (unsigned char)s[i];
        int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        bool ok = c != 0 && n > 0 && i + (uint64_t)n <= len;
        for (int k = 1; ok && k < n; k++) ok = ((unsigned char)s[i + k] >> 6) == 2;
        if (ok && n == 2 && c < 0xc2) ok = false; /* overlong */
        if (ok) {
            memcpy(o, s + i, (size_t)n);
            o += n;
            i += (uint64_t)n;
        } else {
            memcpy(o, "\xef\xbf\xbd", 3);
            o += 3;
            i++;
        }
    }
    *o = '\0';
    return out;
}

static cJSON *json_string(const char *s, uint64_t len)
{
    char *t = utf8_sanitize(s, len);
    cJSON *j = t ? cJSON_CreateString(t) : NULL;
    free(t);
    return j;
}

static cJSON *json_scalar(const gguf_value *v)
{
    char buf[64];
    const uint8_t *p = v->raw;
    switch (v->type) {
    case GGUF_TYPE_BOOL: return cJSON_CreateBool(p[0] != 0);
    case GGUF_TYPE_FLOAT32:
    case GGUF_TYPE_FLOAT64: {
        double d;
        if (v->type == GGUF_TYPE_FLOAT32) {
            float f;
            memcpy(&f, p, 4);
            d = f;
            snprintf(buf, sizeof buf, "%.9g", f);
        } else {
            memcpy(&d, p, 8);
            snprintf(buf, sizeof buf, "%.17g", d);
        }
        if (!isfinite(d)) return cJSON_CreateNull();
        return cJSON_CreateRaw(buf);
    }
    default: {
        /* exact decimal text, so 64-bit values survive (a JSON double would round them) */
        FILE *m = fmemopen(buf, sizeof buf, "w");
        if (!m) return NULL;
        scalar_text(m, v);
        fclose(m);
        return cJSON_CreateRaw(buf);
    }
    }
}

static cJSON *json_value(const gguf_ctx *c, const gguf_value *v, const struct opts *o)
{
    if (v->type == GGUF_TYPE_STRING) return json_string(v->str.data, v->str.len);
    if (v->type != GGUF_TYPE_ARRAY) return json_scalar(v);
    cJSON *a = cJSON_CreateArray();
    uint64_t show = o->max_items && v->n > o->max_items ? o->max_items : v->n;
    for (uint64_t j = 0; a && j < show; j++) {
        gguf_value e;
        if (gguf_value_elem(c, v, j, &e) != FORGE_OK) break;
        cJSON *x = json_value(c, &e, o);
        if (!x) {
            cJSON_Delete(a);
            return NULL;
        }
        cJSON_AddItemToArray(a, x);
    }
    return a;
}

/* {"type": "arr", "elem_type": ..., "length": n, "value": [...], "truncated": bool} for arrays. */
static cJSON *json_kv(const gguf_ctx *c, int64_t i, const struct opts *o)
{
    gguf_value v;
    cJSON *kv = cJSON_CreateObject();
    if (!kv || gguf_kv_value(c, i, &v) != FORGE_OK) goto fail;
    char *key = utf8_sanitize(gguf_kv_key(c, i), strlen(gguf_kv_key(c, i)));
    if (!key) goto fail;
    cJSON_AddStringToObject(kv, "key", key);
    free(key);
    cJSON_AddStringToObject(kv, "type", gguf_type_name(v.type));
    if (v.type == GGUF_TYPE_ARRAY) {
        cJSON_AddStringToObject(kv, "elem_type", gguf_type_name(v.elem_type));
        cJSON_AddNumberToObject(kv, "length", (double)v.n);
        cJSON_AddBoolToObject(kv, "truncated", o->max_items && v.n > o->max_items);
    }
    cJSON *val = json_value(c, &v, o);
    if (!val) goto fail;
    cJSON_AddItemToObject(kv, "value", val);
    return kv;
fail:
    cJSON_Delete(kv);
    return NULL;
}

static cJSON *json_tensor(const gguf_tensor_info *t)
{
    cJSON *j = cJSON_CreateObject(), *shape = cJSON_CreateArray();
    if (!j || !shape) {
        cJSON_Delete(j);
        cJSON_Delete(shape);
        return NULL;
    }
    char *name = utf8_sanitize(t->name, strlen(t->name));
    cJSON_AddStringToObject(j, "name", name ? name : "");
    free(name);
    cJSON_AddStringToObject(j, "type", ggml_type_name(t->type));
    for (uint32_t d = 0; d < t->n_dims; d++) cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)t->ne[d]));
    cJSON_AddItemToObject(j, "shape", shape);
    cJSON_AddNumberToObject(j, "n_elements", (double)t->n_elements);
    cJSON_AddNumberToObject(j, "offset", (double)t->offset);
    cJSON_AddNumberToObject(j, "n_bytes", (double)t->n_bytes);
    return j;
}

static int inspect_json(FILE *out, const gguf_ctx *c, const struct opts *o)
{
    int rc = 1;
    char *text = NULL;
    cJSON *root = cJSON_CreateObject(), *meta = cJSON_CreateArray(), *tens = cJSON_CreateArray();
    cJSON *tot = cJSON_CreateObject(), *by = cJSON_CreateObject();
    if (!root || !meta || !tens || !tot || !by) goto done;
    cJSON_AddStringToObject(root, "file", gguf_path(c));
    cJSON_AddNumberToObject(root, "version", gguf_version(c));
    cJSON_AddNumberToObject(root, "file_size", (double)gguf_file_size(c));
    cJSON_AddNumberToObject(root, "alignment", (double)gguf_alignment(c));
    cJSON_AddNumberToObject(root, "data_offset", (double)gguf_data_offset(c));
    cJSON_AddNumberToObject(root, "kv_count", (double)gguf_kv_count(c));
    cJSON_AddNumberToObject(root, "tensor_count", (double)gguf_tensor_count(c));
    for (int64_t i = 0; i < gguf_kv_count(c); i++) {
        cJSON *kv = json_kv(c, i, o);
        if (!kv) goto done;
        cJSON_AddItemToArray(meta, kv);
    }
    for (int64_t i = 0; i < gguf_tensor_count(c); i++) {
        cJSON *t = json_tensor(gguf_tensor(c, i));
        if (!t) goto done;
        cJSON_AddItemToArray(tens, t);
    }
    struct type_total by_type[GGML_TYPE_COUNT];
    int64_t params;
    uint64_t bytes;
    totals(c, by_type, &params, &bytes);
    cJSON_AddNumberToObject(tot, "parameters", (double)params);
    cJSON_AddNumberToObject(tot, "bytes", (double)bytes);
    for (int t = 0; t < GGML_TYPE_COUNT; t++) {
        if (!by_type[t].tensors) continue;
        cJSON *e = cJSON_CreateObject();
        if (!e) goto done;
        cJSON_AddNumberToObject(e, "tensors", (double)by_type[t].tensors);
        cJSON_AddNumberToObject(e, "parameters", (double)by_type[t].params);
        cJSON_AddNumberToObject(e, "bytes", (double)by_type[t].bytes);
        cJSON_AddItemToObject(by, ggml_type_name(t), e);
    }
    cJSON_AddItemToObject(tot, "by_type", by);
    by = NULL;
    cJSON_AddItemToObject(root, "metadata", meta);
    cJSON_AddItemToObject(root, "tensors", tens);
    cJSON_AddItemToObject(root, "totals", tot);
    meta = tens = tot = NULL;
    text = cJSON_Print(root);
    if (!text) goto done;
    fprintf(out, "%s\n", text);
    rc = 0;
done:
    if (rc) fprintf(stderr, "forge inspect: out of memory building JSON\n");
    free(text);
    cJSON_Delete(root);
    cJSON_Delete(meta);
    cJSON_Delete(tens);
    cJSON_Delete(tot);
    cJSON_Delete(by);
    return rc;
}

/* ---- tensor dump ------------------------------------------------------------------------- */

static int dump_tensor(const gguf_tensor_info *t, const char *path, const char *file)
{
    int rc = 1;
    forge_err err = {0};
    cli_out out = {0};
    float *buf = NULL;
    size_t row_bytes = ggml_row_size(t->type, t->ne[0]);
    int64_t n_rows = t->n_elements / t->ne[0];
    /* convert a few rows at a time: whole tensors may be GBs */
    int64_t rows_per = t->ne[0] >= (1 << 20) ? 1 : (1 << 20) / t->ne[0];
    if (rows_per > n_rows) rows_per = n_rows;

    /* fail on an unsupported type before creating the output file */
    float probe[256]; /* one block: the largest block is 256 elements */
    if (ggml_type_block_size(t->type) > 256 ||
        forge_dequantize(t->type, t->data, probe, ggml_type_block_size(t->type), &err) != FORGE_OK) {
        fprintf(stderr, "forge inspect: %s: tensor '%s': %s\n", file, t->name, err.msg);
        return 1;
    }
    buf = malloc((size_t)(rows_per * t->ne[0]) * sizeof *buf);
    if (!buf) {
        fprintf(stderr, "forge inspect: out of memory\n");
        goto done;
    }
    /* never onto the GGUF being read (it is mapped); a temporary file renamed on success */
    if (cli_out_open(&out, "inspect", "--dump", path, &file, 1, false, true)) goto done;
    for (int64_t r = 0; r < n_rows; r += rows_per) {
        int64_t nr = n_rows - r < rows_per ? n_rows - r : rows_per;
        const uint8_t *src = (const uint8_t *)t->data + (size_t)r * row_bytes;
        if (forge_dequantize(t->type, src, buf, nr * t->ne[0], &err) != FORGE_OK) {
            fprintf(stderr, "forge inspect: %s: tensor '%s': %s\n", file, t->name, err.msg);
            goto done;
        }
        if (cli_out_write(&out, buf, sizeof *buf * (size_t)(nr * t->ne[0]))) break;
    }
    rc = cli_out_commit(&out);
done:
    cli_out_abort(&out); /* removes only the temporary file, and only after a failure */
    free(buf);
    return rc;
}

int cmd_inspect(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"json", no_argument, NULL, 'j'},       {"full", no_argument, NULL, 'F'},
        {"max-items", required_argument, NULL, 'm'}, {"tensor", required_argument, NULL, 't'},
        {"dump", required_argument, NULL, 'd'}, {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    struct opts o = {.max_items = DEFAULT_MAX_ITEMS};
    forge_err err = {0};
    gguf_ctx *c = NULL;
    int opt, rc;

    optind = 1;
    while ((opt = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (opt) {
        case 'j': o.json = true; break;
        case 'F': o.full = true; o.max_items = 0; break;
        case 'm':
            if (!cli_parse_u64("inspect", "--max-items", optarg, &o.max_items)) return 2;
            break;
        case 't': o.tensor = optarg; break;
        case 'd': o.dump = optarg; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind != argc - 1) {
        fprintf(stderr, "forge inspect: expected one FILE\n");
        usage(stderr);
        return 2;
    }
    if (o.dump && !o.tensor) {
        fprintf(stderr, "forge inspect: --dump needs --tensor NAME\n");
        return 2;
    }
    o.file = argv[optind];
    if ((rc = gguf_open(o.file, &c, &err)) != FORGE_OK) {
        fprintf(stderr, "forge inspect: %s\n", err.msg);
        return 1;
    }
    if (o.tensor) {
        const gguf_tensor_info *t = gguf_find_tensor(c, o.tensor);
        if (!t) {
            fprintf(stderr, "forge inspect: %s: no tensor named '%s'\n", o.file, o.tensor);
            rc = 1;
        } else if (o.dump) {
            rc = dump_tensor(t, o.dump, o.file);
        } else if (o.json) {
            cJSON *j = json_tensor(t);
            char *s = j ? cJSON_Print(j) : NULL;
            if (s) printf("%s\n", s);
            rc = s ? 0 : 1;
            free(s);
            cJSON_Delete(j);
        } else {
            print_tensor_line(stdout, t, (int)strlen(t->name));
            rc = 0;
        }
    } else {
        rc = o.json ? inspect_json(stdout, c, &o) : inspect_text(stdout, c, &o);
    }
    if (rc == 0 && !o.dump && !cli_stdout_ok("inspect")) rc = 1; /* right after the output */
    gguf_close(c);
    return rc;
}
