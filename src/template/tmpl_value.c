/* tmpl_value.c - the template engine's values: arena, output buffer, constructors, Python-like
 * truthiness / equality / ordering, str() and repr() printing, json.dumps and a JSON reader.
 * Knows nothing of templates or the AST; reports the work it does through tmpl_work. */
#define _GNU_SOURCE /* memmem */
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "template/tmpl.h"

tval tmpl_undef_plain = {.type = TV_UNDEF};
tval tmpl_none = {.type = TV_NONE};
tval tmpl_true = {.type = TV_BOOL, .u.b = true};
tval tmpl_false = {.type = TV_BOOL, .u.b = false};

void tmpl_raise(tmpl_fail *f, int code, int line, const char *type, const char *fmt, ...)
{
    va_list ap;
    f->code = code;
    f->line = line;
    snprintf(f->type, sizeof f->type, "%s", type);
    va_start(ap, fmt);
    vsnprintf(f->msg, sizeof f->msg, fmt, ap);
    va_end(ap);
    longjmp(f->jb, 1);
}

/* ---- arena ------------------------------------------------------------------------------- */
struct tmpl_chunk {
    tmpl_chunk *next;
    size_t cap, used;
    max_align_t data[];
};

#define TMPL_CHUNK_MIN (64 * 1024)

void *tmpl_alloc(tmpl_arena *a, size_t n)
{
    tmpl_work(n);
    n = (n + 15) & ~(size_t)15;
    if (n == 0) n = 16;
    tmpl_chunk *c = a->head;
    if (!c || c->cap - c->used < n) {
        size_t cap = n > TMPL_CHUNK_MIN ? n : TMPL_CHUNK_MIN;
        if (a->limit && (a->used + cap + sizeof *c > a->limit || n > a->limit))
            tmpl_raise(a->fail, FORGE_E_RANGE, 0, "LimitError",
                       "template uses more than %zu bytes of memory", a->limit);
        if (a->spare && a->spare->cap >= cap) {
            c = a->spare;
            a->spare = NULL;
        } else {
            c = malloc(sizeof *c + cap);
            if (!c) tmpl_raise(a->fail, FORGE_E_NOMEM, 0, "MemoryError", "out of memory");
            c->cap = cap;
        }
        c->used = 0;
        c->next = a->head;
        a->head = c;
        a->used += c->cap + sizeof *c;
    }
    void *p = (char *)c->data + c->used;
    c->used += n;
    memset(p, 0, n);
    return p;
}

tmpl_arena_mark tmpl_arena_save(const tmpl_arena *a)
{
    tmpl_arena_mark m = {
        .head = a->head, .head_used = a->head ? a->head->used : 0, .used = a->used};
    return m;
}

void tmpl_arena_restore(tmpl_arena *a, tmpl_arena_mark m)
{
    while (a->head && a->head != m.head) {
        tmpl_chunk *c = a->head;
        a->head = c->next;
        if (!a->spare && c->cap == TMPL_CHUNK_MIN) {
            a->spare = c;
        } else {
            free(c);
        }
    }
    if (a->head) a->head->used = m.head_used;
    a->used = m.used;
}

char *tmpl_strndup(tmpl_arena *a, const char *s, size_t n)
{
    char *p = tmpl_alloc(a, n + 1);
    if (n) memcpy(p, s, n);
    p[n] = 0;
    return p;
}

void tmpl_arena_free(tmpl_arena *a)
{
    if (!a) return;
    tmpl_chunk *c = a->head;
    while (c) {
        tmpl_chunk *next = c->next;
        free(c);
        c = next;
    }
    free(a->spare);
    a->spare = NULL;
    a->head = NULL;
    a->used = 0;
}

/* ---- buffer ------------------------------------------------------------------------------ */
void tmpl_buf_put(tmpl_buf *b, const char *s, size_t n)
{
    if (n == 0) return;
    tmpl_work(n);
    if (b->limit && (n > b->limit || b->n > b->limit - n))
        tmpl_raise(b->fail, FORGE_E_RANGE, 0, "LimitError", "output longer than %zu bytes",
                   b->limit);
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1)
            cap *= 2;
        char *p;
        if (b->arena) {
            p = tmpl_alloc(b->arena, cap);
            if (b->n) memcpy(p, b->p, b->n);
        } else {
            p = realloc(b->p, cap);
            if (!p) tmpl_raise(b->fail, FORGE_E_NOMEM, 0, "MemoryError", "out of memory");
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

void tmpl_buf_puts(tmpl_buf *b, const char *s)
{
    tmpl_buf_put(b, s, strlen(s));
}

void tmpl_buf_putc(tmpl_buf *b, char c)
{
    tmpl_buf_put(b, &c, 1);
}

void tmpl_buf_printf(tmpl_buf *b, const char *fmt, ...)
{
    char tmp[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    tmpl_buf_put(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

/* ---- UTF-8 ------------------------------------------------------------------------------- */
size_t tmpl_utf8_decode(const char *s, size_t n, uint32_t *cp)
{
    const unsigned char *u = (const unsigned char *)s;
    if (n == 0) {
        *cp = 0;
        return 1;
    }
    if (u[0] < 0x80) {
        *cp = u[0];
        return 1;
    }
    size_t len = (u[0] >= 0xF0) ? 4 : (u[0] >= 0xE0) ? 3 : (u[0] >= 0xC0) ? 2 : 1;
    if (len == 1 || len > n) {
        *cp = 0xFFFD;
        return 1;
    }
    uint32_t c = u[0] & (0x7F >> len);
    for (size_t i = 1; i < len; i++) {
        if ((u[i] & 0xC0) != 0x80) {
            *cp = 0xFFFD;
            return 1;
        }
        c = (c << 6) | (u[i] & 0x3F);
    }
    *cp = c;
    return len;
}

size_t tmpl_utf8_encode(uint32_t cp, char *out)
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    if (cp > 0x10FFFF) cp = 0xFFFD;
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

size_t tmpl_utf8_len(const char *s, size_t n)
{
    tmpl_work(n);
    size_t count = 0, i = 0;
    while (i < n) {
        uint32_t cp;
        i += tmpl_utf8_decode(s + i, n - i, &cp);
        count++;
    }
    return count;
}

bool tmpl_py_isspace(uint32_t c)
{
    return (c >= 9 && c <= 13) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xA0 ||
           c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
           c == 0x202F || c == 0x205F || c == 0x3000;
}

/* ---- constructors ------------------------------------------------------------------------ */
tval *tv_new(tmpl_arena *a, int type)
{
    tval *v = tmpl_alloc(a, sizeof *v);
    v->type = type;
    return v;
}

tval *tv_int(tmpl_arena *a, int64_t i)
{
    tval *v = tv_new(a, TV_INT);
    v->u.i = i;
    return v;
}

tval *tv_float(tmpl_arena *a, double f)
{
    tval *v = tv_new(a, TV_FLOAT);
    v->u.f = f;
    return v;
}

tval *tv_bool(bool b)
{
    return b ? &tmpl_true : &tmpl_false;
}

tval *tv_str_nocopy(tmpl_arena *a, const char *p, size_t n)
{
    tval *v = tv_new(a, TV_STR);
    v->u.s.p = p;
    v->u.s.n = n;
    return v;
}

tval *tv_str(tmpl_arena *a, const char *p, size_t n)
{
    return tv_str_nocopy(a, tmpl_strndup(a, p, n), n);
}

tval *tv_cstr(tmpl_arena *a, const char *s)
{
    return tv_str(a, s, strlen(s));
}

tval *tv_undef(tmpl_arena *a, const char *hint)
{
    tval *v = tv_new(a, TV_UNDEF);
    v->u.undef = hint;
    return v;
}

tval *tv_list(tmpl_arena *a, size_t cap)
{
    tval *v = tv_new(a, TV_LIST);
    if (cap) {
        v->u.l.v = tmpl_alloc(a, cap * sizeof(tval *));
        v->u.l.cap = cap;
    }
    return v;
}

void tv_list_push(tmpl_arena *a, tval *l, tval *v)
{
    if (l->u.l.n == l->u.l.cap) {
        size_t cap = l->u.l.cap ? l->u.l.cap * 2 : 4;
        tval **nv = tmpl_alloc(a, cap * sizeof(tval *));
        if (l->u.l.n) memcpy(nv, l->u.l.v, l->u.l.n * sizeof(tval *));
        l->u.l.v = nv;
        l->u.l.cap = cap;
    }
    l->u.l.v[l->u.l.n++] = v;
}

tval *tv_dict(tmpl_arena *a, int type)
{
    return tv_new(a, type);
}

tval *tv_dict_getv(const tval *d, const tval *key)
{
    for (size_t i = 0; i < d->u.d.n; i++)
        if (tv_equal(d->u.d.k[i], key)) return d->u.d.v[i];
    return NULL;
}

tval *tv_dict_get(const tval *d, const char *key, size_t n)
{
    tmpl_work((uint64_t)d->u.d.n * 8);
    for (size_t i = 0; i < d->u.d.n; i++) {
        const tval *k = d->u.d.k[i];
        if (k->type == TV_STR && k->u.s.n == n && !memcmp(k->u.s.p, key, n)) return d->u.d.v[i];
    }
    return NULL;
}

void tv_dict_set(tmpl_arena *a, tval *d, tval *k, tval *v)
{
    for (size_t i = 0; i < d->u.d.n; i++)
        if (tv_equal(d->u.d.k[i], k)) {
            d->u.d.v[i] = v;
            return;
        }
    if (d->u.d.n == d->u.d.cap) {
        size_t cap = d->u.d.cap ? d->u.d.cap * 2 : 4;
        tval **nk = tmpl_alloc(a, cap * sizeof(tval *));
        tval **nv = tmpl_alloc(a, cap * sizeof(tval *));
        if (d->u.d.n) {
            memcpy(nk, d->u.d.k, d->u.d.n * sizeof(tval *));
            memcpy(nv, d->u.d.v, d->u.d.n * sizeof(tval *));
        }
        d->u.d.k = nk;
        d->u.d.v = nv;
        d->u.d.cap = cap;
    }
    d->u.d.k[d->u.d.n] = k;
    d->u.d.v[d->u.d.n] = v;
    d->u.d.n++;
}

/* ---- semantics --------------------------------------------------------------------------- */
bool tv_truthy(const tval *v)
{
    switch (v->type) {
    case TV_UNDEF:
    case TV_NONE:
        return false;
    case TV_BOOL:
        return v->u.b;
    case TV_INT:
        return v->u.i != 0;
    case TV_FLOAT:
        return v->u.f != 0.0;
    case TV_STR:
        return v->u.s.n != 0;
    case TV_LIST:
        return v->u.l.n != 0;
    case TV_DICT:
        return v->u.d.n != 0;
    default:
        return true;
    }
}

static bool is_num(const tval *v)
{
    return v->type == TV_INT || v->type == TV_FLOAT || v->type == TV_BOOL;
}

static double num_f(const tval *v)
{
    return v->type == TV_FLOAT ? v->u.f : v->type == TV_INT ? (double)v->u.i : (double)v->u.b;
}

static int64_t num_i(const tval *v)
{
    return v->type == TV_INT ? v->u.i : (int64_t)v->u.b;
}

/* each comparison costs a little even when it is O(1), so n^2 comparisons are charged */
#define COMPARE_WORK 8

static bool equal_depth(const tval *a, const tval *b, int depth);

static tval *dict_getv_depth(const tval *d, const tval *key, int depth)
{
    for (size_t i = 0; i < d->u.d.n; i++)
        if (equal_depth(d->u.d.k[i], key, depth)) return d->u.d.v[i];
    return NULL;
}

static bool equal_depth(const tval *a, const tval *b, int depth)
{
    tmpl_work(COMPARE_WORK);
    if (a == b) return true;
    if (depth > TMPL_MAX_VALUE_DEPTH) {
        tmpl_value_too_deep();
        return false;
    }
    if (is_num(a) && is_num(b)) {
        if (a->type == TV_FLOAT || b->type == TV_FLOAT) return num_f(a) == num_f(b);
        return num_i(a) == num_i(b);
    }
    if (a->type != b->type) return false;
    switch (a->type) {
    case TV_UNDEF:
    case TV_NONE:
        return true;
    case TV_STR:
        if (a->u.s.n != b->u.s.n) return false;
        tmpl_work(a->u.s.n);
        return !memcmp(a->u.s.p, b->u.s.p, a->u.s.n);
    case TV_LIST:
        if (a->u.l.n != b->u.l.n || a->is_tuple != b->is_tuple) return false;
        for (size_t i = 0; i < a->u.l.n; i++)
            if (!equal_depth(a->u.l.v[i], b->u.l.v[i], depth + 1)) return false;
        return true;
    case TV_DICT:
        if (a->u.d.n != b->u.d.n) return false;
        for (size_t i = 0; i < a->u.d.n; i++) {
            const tval *o = dict_getv_depth(b, a->u.d.k[i], depth + 1);
            if (!o || !equal_depth(a->u.d.v[i], o, depth + 1)) return false;
        }
        return true;
    default:
        return false;
    }
}

bool tv_equal(const tval *a, const tval *b)
{
    return equal_depth(a, b, 0);
}

static bool compare_depth(const tval *a, const tval *b, int *out, int depth)
{
    tmpl_work(COMPARE_WORK);
    if (depth > TMPL_MAX_VALUE_DEPTH) {
        tmpl_value_too_deep();
        return false;
    }
    if (is_num(a) && is_num(b)) {
        if (a->type == TV_FLOAT || b->type == TV_FLOAT) {
            double x = num_f(a), y = num_f(b);
            *out = x < y ? -1 : x > y ? 1 : 0;
        } else {
            int64_t x = num_i(a), y = num_i(b);
            *out = x < y ? -1 : x > y ? 1 : 0;
        }
        return true;
    }
    if (a->type == TV_STR && b->type == TV_STR) {
        size_t n = a->u.s.n < b->u.s.n ? a->u.s.n : b->u.s.n;
        tmpl_work(n);
        int c = n ? memcmp(a->u.s.p, b->u.s.p, n) : 0;
        if (c == 0) c = a->u.s.n < b->u.s.n ? -1 : a->u.s.n > b->u.s.n ? 1 : 0;
        *out = c < 0 ? -1 : c > 0;
        return true;
    }
    if (a->type == TV_LIST && b->type == TV_LIST) {
        for (size_t i = 0; i < a->u.l.n && i < b->u.l.n; i++) {
            if (equal_depth(a->u.l.v[i], b->u.l.v[i], depth + 1)) continue;
            return compare_depth(a->u.l.v[i], b->u.l.v[i], out, depth + 1);
        }
        *out = a->u.l.n < b->u.l.n ? -1 : a->u.l.n > b->u.l.n ? 1 : 0;
        return true;
    }
    return false;
}

bool tv_compare(const tval *a, const tval *b, int *out)
{
    return compare_depth(a, b, out, 0);
}

/* ---- substring search -------------------------------------------------------------------- */
const char *tmpl_memfind(const char *h, size_t hn, const char *n, size_t nn)
{
    if (nn == 0) return h;
    if (nn > hn) return NULL;
    /* glibc's memmem is linear (two-way); charge what it scanned */
    const char *f = memmem(h, hn, n, nn);
    tmpl_work(f ? (uint64_t)(f - h) + nn : hn);
    return f;
}

const char *tmpl_memrfind(const char *h, size_t hn, const char *n, size_t nn)
{
    if (nn > hn) return NULL;
    if (nn == 0) return h + hn;
    uint64_t scanned = 0;
    const char *res = NULL;
    for (size_t i = hn - nn + 1; i-- > 0;) {
        scanned++;
        if (h[i] != n[0]) continue;
        scanned += nn; /* what memcmp may read: worst-case inputs are charged as such */
        if (!memcmp(h + i, n, nn)) {
            res = h + i;
            break;
        }
        if (scanned > 4096) {
            tmpl_work(scanned);
            scanned = 0;
        }
    }
    tmpl_work(scanned);
    return res;
}

const char *tv_type_name(const tval *v)
{
    switch (v->type) {
    case TV_UNDEF:
        return "Undefined";
    case TV_NONE:
        return "NoneType";
    case TV_BOOL:
        return "bool";
    case TV_INT:
        return "int";
    case TV_FLOAT:
        return "float";
    case TV_STR:
        return "str";
    case TV_LIST:
        return v->is_tuple ? "tuple" : "list";
    case TV_DICT:
        return "dict";
    case TV_NS:
        return "Namespace";
    case TV_LOOP:
        return "LoopContext";
    case TV_MACRO:
        return "Macro";
    case TV_FUNC:
        return "function";
    case TV_CYCLER:
        return "Cycler";
    case TV_JOINER:
        return "Joiner";
    default:
        return "object";
    }
}

/* ---- printing ---------------------------------------------------------------------------- */
void tv_float_repr(char *out, size_t cap, double f)
{
    if (isnan(f)) {
        snprintf(out, cap, "nan");
        return;
    }
    if (isinf(f)) {
        snprintf(out, cap, f < 0 ? "-inf" : "inf");
        return;
    }
    char tmp[64];
    int prec;
    for (prec = 1; prec <= 17; prec++) {
        snprintf(tmp, sizeof tmp, "%.*e", prec - 1, f);
        if (strtod(tmp, NULL) == f) break;
    }
    /* tmp = [-]d[.ddd]e[+-]XX */
    char digits[32];
    size_t nd = 0;
    const char *p = tmp;
    bool neg = false;
    if (*p == '-') {
        neg = true;
        p++;
    }
    for (; *p && *p != 'e'; p++)
        if (*p >= '0' && *p <= '9' && nd < sizeof digits - 1) digits[nd++] = *p;
    digits[nd] = 0;
    int exp10 = *p == 'e' ? atoi(p + 1) : 0;
    while (nd > 1 && digits[nd - 1] == '0')
        digits[--nd] = 0;
    char res[64];
    size_t r = 0;
    if (neg) res[r++] = '-';
    if (exp10 >= -4 && exp10 < 16) {
        if (exp10 >= 0) {
            for (int i = 0; i <= exp10; i++)
                res[r++] = (size_t)i < nd ? digits[i] : '0';
            res[r++] = '.';
            if ((size_t)exp10 + 1 < nd)
                for (size_t i = (size_t)exp10 + 1; i < nd; i++)
                    res[r++] = digits[i];
            else
                res[r++] = '0';
        } else {
            res[r++] = '0';
            res[r++] = '.';
            for (int i = 0; i < -exp10 - 1; i++)
                res[r++] = '0';
            for (size_t i = 0; i < nd; i++)
                res[r++] = digits[i];
        }
        res[r] = 0;
    } else {
        res[r++] = digits[0];
        if (nd > 1) {
            res[r++] = '.';
            for (size_t i = 1; i < nd; i++)
                res[r++] = digits[i];
        }
        res[r] = 0;
        snprintf(res + r, sizeof res - r, "e%c%02d", exp10 < 0 ? '-' : '+', abs(exp10));
    }
    snprintf(out, cap, "%s", res);
}

static void str_repr(tmpl_buf *b, const char *s, size_t n)
{
    tmpl_work(n);
    bool has_sq = memchr(s, '\'', n) != NULL, has_dq = memchr(s, '"', n) != NULL;
    char q = (has_sq && !has_dq) ? '"' : '\'';
    tmpl_buf_putc(b, q);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == (unsigned char)q || c == '\\') {
            tmpl_buf_putc(b, '\\');
            tmpl_buf_putc(b, (char)c);
        } else if (c == '\n')
            tmpl_buf_puts(b, "\\n");
        else if (c == '\r')
            tmpl_buf_puts(b, "\\r");
        else if (c == '\t')
            tmpl_buf_puts(b, "\\t");
        else if (c < 0x20 || c == 0x7f)
            tmpl_buf_printf(b, "\\x%02x", c);
        else
            tmpl_buf_putc(b, (char)c);
    }
    tmpl_buf_putc(b, q);
}

static void repr_depth(tmpl_buf *b, const tval *v, int depth);

static void to_str_depth(tmpl_buf *b, const tval *v, int depth)
{
    char tmp[64];
    switch (v->type) {
    case TV_UNDEF:
        return;
    case TV_NONE:
        tmpl_buf_puts(b, "None");
        return;
    case TV_BOOL:
        tmpl_buf_puts(b, v->u.b ? "True" : "False");
        return;
    case TV_INT:
        tmpl_buf_printf(b, "%lld", (long long)v->u.i);
        return;
    case TV_FLOAT:
        tv_float_repr(tmp, sizeof tmp, v->u.f);
        tmpl_buf_puts(b, tmp);
        return;
    case TV_STR:
        tmpl_buf_put(b, v->u.s.p, v->u.s.n);
        return;
    default:
        repr_depth(b, v, depth);
        return;
    }
}

static void repr_depth(tmpl_buf *b, const tval *v, int depth)
{
    if (depth > 200) {
        tmpl_buf_puts(b, "...");
        return;
    }
    switch (v->type) {
    case TV_STR:
        str_repr(b, v->u.s.p, v->u.s.n);
        return;
    case TV_LIST:
        tmpl_buf_putc(b, v->is_tuple ? '(' : '[');
        for (size_t i = 0; i < v->u.l.n; i++) {
            if (i) tmpl_buf_puts(b, ", ");
            repr_depth(b, v->u.l.v[i], depth + 1);
        }
        if (v->is_tuple && v->u.l.n == 1) tmpl_buf_putc(b, ',');
        tmpl_buf_putc(b, v->is_tuple ? ')' : ']');
        return;
    case TV_NS:
    case TV_DICT:
        if (v->type == TV_NS) tmpl_buf_puts(b, "<Namespace ");
        tmpl_buf_putc(b, '{');
        for (size_t i = 0; i < v->u.d.n; i++) {
            if (i) tmpl_buf_puts(b, ", ");
            repr_depth(b, v->u.d.k[i], depth + 1);
            tmpl_buf_puts(b, ": ");
            repr_depth(b, v->u.d.v[i], depth + 1);
        }
        tmpl_buf_putc(b, '}');
        if (v->type == TV_NS) tmpl_buf_putc(b, '>');
        return;
    case TV_UNDEF:
        tmpl_buf_puts(b, "Undefined");
        return;
    case TV_LOOP:
        tmpl_buf_puts(b, "<LoopContext>");
        return;
    case TV_MACRO:
        tmpl_buf_puts(b, "<Macro>");
        return;
    case TV_FUNC:
        tmpl_buf_puts(b, "<function>");
        return;
    case TV_CYCLER:
        tmpl_buf_puts(b, "<Cycler>");
        return;
    case TV_JOINER:
        tmpl_buf_puts(b, "<Joiner>");
        return;
    default:
        to_str_depth(b, v, depth);
        return;
    }
}

void tv_to_str(tmpl_buf *b, const tval *v)
{
    to_str_depth(b, v, 0);
}

void tv_repr(tmpl_buf *b, const tval *v)
{
    repr_depth(b, v, 0);
}

/* ---- JSON out ---------------------------------------------------------------------------- */
static void json_str(tmpl_buf *b, const char *s, size_t n)
{
    tmpl_buf_putc(b, '"');
    size_t start = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        const char *esc = NULL;
        char tmp[8];
        if (c == '"')
            esc = "\\\"";
        else if (c == '\\')
            esc = "\\\\";
        else if (c == '\n')
            esc = "\\n";
        else if (c == '\r')
            esc = "\\r";
        else if (c == '\t')
            esc = "\\t";
        else if (c == '\b')
            esc = "\\b";
        else if (c == '\f')
            esc = "\\f";
        else if (c < 0x20) {
            snprintf(tmp, sizeof tmp, "\\u%04x", c);
            esc = tmp;
        }
        if (esc) {
            tmpl_buf_put(b, s + start, i - start);
            tmpl_buf_puts(b, esc);
            start = i + 1;
        }
    }
    tmpl_buf_put(b, s + start, n - start);
    tmpl_buf_putc(b, '"');
}

static void json_newline(tmpl_buf *b, const char *indent, int level)
{
    tmpl_buf_putc(b, '\n');
    for (int i = 0; i < level; i++)
        tmpl_buf_puts(b, indent);
}

bool tv_to_json(tmpl_buf *b, const tval *v, const char *indent, const char *item_sep,
                const char *key_sep, int depth, const tval **bad)
{
    char tmp[64];
    if (depth > 200) {
        *bad = v;
        return false;
    }
    switch (v->type) {
    case TV_NONE:
        tmpl_buf_puts(b, "null");
        return true;
    case TV_BOOL:
        tmpl_buf_puts(b, v->u.b ? "true" : "false");
        return true;
    case TV_INT:
        tmpl_buf_printf(b, "%lld", (long long)v->u.i);
        return true;
    case TV_FLOAT:
        if (isnan(v->u.f))
            tmpl_buf_puts(b, "NaN");
        else if (isinf(v->u.f))
            tmpl_buf_puts(b, v->u.f < 0 ? "-Infinity" : "Infinity");
        else {
            tv_float_repr(tmp, sizeof tmp, v->u.f);
            tmpl_buf_puts(b, tmp);
        }
        return true;
    case TV_STR:
        json_str(b, v->u.s.p, v->u.s.n);
        return true;
    case TV_LIST:
        if (v->u.l.n == 0) {
            tmpl_buf_puts(b, "[]");
            return true;
        }
        tmpl_buf_putc(b, '[');
        for (size_t i = 0; i < v->u.l.n; i++) {
            if (i) tmpl_buf_puts(b, item_sep);
            if (indent) json_newline(b, indent, depth + 1);
            if (!tv_to_json(b, v->u.l.v[i], indent, item_sep, key_sep, depth + 1, bad))
                return false;
        }
        if (indent) json_newline(b, indent, depth);
        tmpl_buf_putc(b, ']');
        return true;
    case TV_DICT:
        if (v->u.d.n == 0) {
            tmpl_buf_puts(b, "{}");
            return true;
        }
        tmpl_buf_putc(b, '{');
        for (size_t i = 0; i < v->u.d.n; i++) {
            const tval *k = v->u.d.k[i];
            if (i) tmpl_buf_puts(b, item_sep);
            if (indent) json_newline(b, indent, depth + 1);
            if (k->type == TV_STR)
                json_str(b, k->u.s.p, k->u.s.n);
            else if (k->type == TV_INT || k->type == TV_FLOAT || k->type == TV_BOOL ||
                     k->type == TV_NONE) {
                tmpl_buf_putc(b, '"');
                if (k->type == TV_BOOL)
                    tmpl_buf_puts(b, k->u.b ? "true" : "false");
                else if (k->type == TV_NONE)
                    tmpl_buf_puts(b, "null");
                else
                    tv_to_str(b, k);
                tmpl_buf_putc(b, '"');
            } else {
                *bad = k;
                return false;
            }
            tmpl_buf_puts(b, key_sep);
            if (!tv_to_json(b, v->u.d.v[i], indent, item_sep, key_sep, depth + 1, bad))
                return false;
        }
        if (indent) json_newline(b, indent, depth);
        tmpl_buf_putc(b, '}');
        return true;
    default:
        *bad = v;
        return false;
    }
}

/* ---- JSON in ----------------------------------------------------------------------------- */
typedef struct jrd {
    tmpl_arena *a;
    const char *s;
    size_t n, i;
    char *msg;
    size_t msgcap;
    int depth;
} jrd;

static void jskip(jrd *j)
{
    while (j->i < j->n &&
           (j->s[j->i] == ' ' || j->s[j->i] == '\t' || j->s[j->i] == '\n' || j->s[j->i] == '\r'))
        j->i++;
}

static tval *jfail(jrd *j, const char *what)
{
    if (j->msg[0] == 0) snprintf(j->msg, j->msgcap, "%s at byte %zu", what, j->i);
    return NULL;
}

static int jhex4(jrd *j, uint32_t *out)
{
    if (j->n - j->i < 4) return -1;
    uint32_t v = 0;
    for (int k = 0; k < 4; k++) {
        char c = j->s[j->i + k];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= (uint32_t)(c - '0');
        else if (c >= 'a' && c <= 'f')
            v |= (uint32_t)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            v |= (uint32_t)(c - 'A' + 10);
        else
            return -1;
    }
    j->i += 4;
    *out = v;
    return 0;
}

static tval *jstring(jrd *j)
{
    j->i++; /* opening quote */
    size_t start = j->i;
    size_t cap = 0;
    while (j->i < j->n && j->s[j->i] != '"') {
        if (j->s[j->i] == '\\') j->i++;
        j->i++;
        cap++;
    }
    if (j->i >= j->n) return jfail(j, "unterminated string");
    char *out = tmpl_alloc(j->a, (j->i - start) + 1);
    size_t o = 0;
    size_t end = j->i;
    j->i = start;
    while (j->i < end) {
        unsigned char c = (unsigned char)j->s[j->i];
        if (c < 0x20) return jfail(j, "control character in string");
        if (c != '\\') {
            out[o++] = (char)c;
            j->i++;
            continue;
        }
        j->i++;
        char e = j->s[j->i++];
        switch (e) {
        case '"':
            out[o++] = '"';
            break;
        case '\\':
            out[o++] = '\\';
            break;
        case '/':
            out[o++] = '/';
            break;
        case 'b':
            out[o++] = '\b';
            break;
        case 'f':
            out[o++] = '\f';
            break;
        case 'n':
            out[o++] = '\n';
            break;
        case 'r':
            out[o++] = '\r';
            break;
        case 't':
            out[o++] = '\t';
            break;
        case 'u': {
            uint32_t cp, lo;
            if (jhex4(j, &cp)) return jfail(j, "bad \\u escape");
            if (cp >= 0xD800 && cp < 0xDC00 && j->i + 1 < end && j->s[j->i] == '\\' &&
                j->s[j->i + 1] == 'u') {
                size_t save = j->i;
                j->i += 2;
                if (!jhex4(j, &lo) && lo >= 0xDC00 && lo < 0xE000)
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                else
                    j->i = save;
            }
            o += tmpl_utf8_encode(cp, out + o); /* \uXXXX is 6 bytes, output <= 4 */
            break;
        }
        default:
            return jfail(j, "bad escape in string");
        }
    }
    j->i = end + 1;
    (void)cap;
    return tv_str_nocopy(j->a, out, o);
}

static tval *jvalue(jrd *j);

static tval *jvalue(jrd *j)
{
    jskip(j);
    if (j->i >= j->n) return jfail(j, "unexpected end of JSON");
    if (++j->depth > 200) return jfail(j, "JSON nested too deeply");
    tval *res = NULL;
    char c = j->s[j->i];
    if (c == '{') {
        res = tv_dict(j->a, TV_DICT);
        j->i++;
        jskip(j);
        if (j->i < j->n && j->s[j->i] == '}') {
            j->i++;
            goto done;
        }
        for (;;) {
            jskip(j);
            if (j->i >= j->n || j->s[j->i] != '"') return jfail(j, "expected a string key");
            tval *k = jstring(j);
            if (!k) return NULL;
            jskip(j);
            if (j->i >= j->n || j->s[j->i] != ':') return jfail(j, "expected ':'");
            j->i++;
            tval *v = jvalue(j);
            if (!v) return NULL;
            tv_dict_set(j->a, res, k, v);
            jskip(j);
            if (j->i < j->n && j->s[j->i] == ',') {
                j->i++;
                continue;
            }
            if (j->i < j->n && j->s[j->i] == '}') {
                j->i++;
                break;
            }
            return jfail(j, "expected ',' or '}'");
        }
    } else if (c == '[') {
        res = tv_list(j->a, 0);
        j->i++;
        jskip(j);
        if (j->i < j->n && j->s[j->i] == ']') {
            j->i++;
            goto done;
        }
        for (;;) {
            tval *v = jvalue(j);
            if (!v) return NULL;
            tv_list_push(j->a, res, v);
            jskip(j);
            if (j->i < j->n && j->s[j->i] == ',') {
                j->i++;
                continue;
            }
            if (j->i < j->n && j->s[j->i] == ']') {
                j->i++;
                break;
            }
            return jfail(j, "expected ',' or ']'");
        }
    } else if (c == '"') {
        res = jstring(j);
    } else if (j->n - j->i >= 4 && !memcmp(j->s + j->i, "true", 4)) {
        j->i += 4;
        res = &tmpl_true;
    } else if (j->n - j->i >= 5 && !memcmp(j->s + j->i, "false", 5)) {
        j->i += 5;
        res = &tmpl_false;
    } else if (j->n - j->i >= 4 && !memcmp(j->s + j->i, "null", 4)) {
        j->i += 4;
        res = &tmpl_none;
    } else if (c == '-' || (c >= '0' && c <= '9')) {
        size_t start = j->i;
        bool is_float = false;
        if (j->s[j->i] == '-') j->i++;
        if (j->i >= j->n || j->s[j->i] < '0' || j->s[j->i] > '9') return jfail(j, "bad number");
        while (j->i < j->n) {
            char d = j->s[j->i];
            if (d >= '0' && d <= '9')
                ;
            else if (d == '.' || d == 'e' || d == 'E' || d == '+' || d == '-')
                is_float = true;
            else
                break;
            j->i++;
        }
        char tmp[64];
        size_t len = j->i - start;
        if (len >= sizeof tmp) return jfail(j, "number too long");
        memcpy(tmp, j->s + start, len);
        tmp[len] = 0;
        char *end;
        if (!is_float) {
            long long v = strtoll(tmp, &end, 10);
            if (*end || ((v == LLONG_MAX || v == LLONG_MIN) && len > 18))
                is_float = true; /* too big for int64: keep as float */
            else
                res = tv_int(j->a, v);
        }
        if (is_float) {
            double d = strtod(tmp, &end);
            if (*end) return jfail(j, "bad number");
            res = tv_float(j->a, d);
        }
    } else {
        return jfail(j, "unexpected character");
    }
done:
    j->depth--;
    return res;
}

tval *tv_from_json(tmpl_arena *a, const char *s, size_t n, char *msg, size_t msgcap)
{
    jrd j = {.a = a, .s = s, .n = n, .msg = msg, .msgcap = msgcap};
    msg[0] = 0;
    tval *v = jvalue(&j);
    if (!v) return NULL;
    jskip(&j);
    if (j.i != n) return jfail(&j, "trailing characters after JSON value");
    return v;
}
