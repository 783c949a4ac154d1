/* tmpl_builtins.c - what templates can call: Python str/dict/list methods allowed by the immutable
 * sandbox, attribute and item lookup, arithmetic, tests, and the globals range/namespace/dict/
 * cycler/joiner/raise_exception/strftime_now. Filters are in tmpl_filters.c. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <utf8proc.h>

#include "template/tmpl.h"

#define MAX_RANGE 100000 /* jinja2.sandbox.MAX_RANGE */


enum {
    FN_METHOD = 1,
    FN_RANGE,
    FN_NAMESPACE,
    FN_DICT,
    FN_RAISE,
    FN_STRFTIME,
    FN_CYCLER,
    FN_JOINER,
    FN_UNSAFE,
};

#define A (r->arena)

bool tmpl_str_eq(const tval *v, const char *s)
{
    size_t n = strlen(s);
    return v->type == TV_STR && v->u.s.n == n && !memcmp(v->u.s.p, s, n);
}

_Noreturn void tmpl_undef_fail(tmpl_render *r, const tval *u)
{
    tmpl_rt_error(r, "UndefinedError", "%s", u->u.undef ? u->u.undef : "undefined value");
}

tval *tmpl_kwarg(targs *a, const char *name, size_t pos)
{
    for (size_t i = 0; i < a->nkw; i++)
        if (!strcmp(a->kwn[i], name)) return a->kwv[i];
    if (pos != (size_t)-1 && pos < a->npos) return a->pos[pos];
    return NULL;
}

tval *tmpl_str_of(tmpl_render *r, const tval *v)
{
    if (v->type == TV_STR) return (tval *)v;
    tmpl_buf b = {.limit = r->max_output, .fail = r->fail, .arena = A};
    tv_to_str(&b, v);
    return tv_str_nocopy(A, b.p ? b.p : "", b.n);
}

static const char *obj_desc(tmpl_render *r, const tval *v)
{
    /* jinja's object_type_repr: "None", "'dict object'"-style names */
    switch (v->type) {
    case TV_NONE:
        return "None";
    case TV_NS:
        return "jinja2.utils.Namespace object";
    default: {
        const char *t = tv_type_name(v);
        char *s = tmpl_alloc(A, strlen(t) + 8);
        sprintf(s, "%s object", t);
        return s;
    }
    }
}

tval *tmpl_missing(tmpl_render *r, const tval *obj, const char *what, size_t n, bool element)
{
    /* jinja's Undefined messages: "'dict object' has no attribute 'x'",
     * "list object has no element 10" */
    const char *d = obj_desc(r, obj);
    size_t cap = strlen(d) + n + 64;
    char *h = tmpl_alloc(A, cap);
    if (element)
        snprintf(h, cap, "%s has no element %.*s", d, (int)n, what);
    else if (obj->type == TV_NONE)
        snprintf(h, cap, "'None' has no attribute '%.*s'", (int)n, what);
    else
        snprintf(h, cap, "'%s' has no attribute '%.*s'", d, (int)n, what);
    return tv_undef(A, h);
}

tval *tmpl_to_list(tmpl_render *r, tval *v)
{
    switch (v->type) {
    case TV_LIST:
        return v;
    case TV_UNDEF:
        return tv_list(A, 0);
    case TV_DICT: {
        tval *l = tv_list(A, v->u.d.n);
        for (size_t i = 0; i < v->u.d.n; i++)
            l->u.l.v[i] = v->u.d.k[i];
        l->u.l.n = v->u.d.n;
        return l;
    }
    case TV_STR: {
        tval *l = tv_list(A, 0);
        size_t i = 0;
        while (i < v->u.s.n) {
            uint32_t cp;
            size_t k = tmpl_utf8_decode(v->u.s.p + i, v->u.s.n - i, &cp);
            tv_list_push(A, l, tv_str_nocopy(A, v->u.s.p + i, k));
            i += k;
        }
        return l;
    }
    default:
        tmpl_rt_error(r, "TypeError", "'%s' object is not iterable", tv_type_name(v));
    }
}

static tval *func(tmpl_render *r, int id, tval *self, const char *name)
{
    tval *f = tv_new(A, TV_FUNC);
    f->u.fn.id = id;
    f->u.fn.self = self;
    f->u.fn.name = name;
    return f;
}

tval *tmpl_global(tmpl_render *r, const char *name)
{
    static const struct {
        const char *name;
        int id;
    } g[] = {{"range", FN_RANGE},           {"namespace", FN_NAMESPACE},   {"dict", FN_DICT},
             {"raise_exception", FN_RAISE}, {"strftime_now", FN_STRFTIME}, {"cycler", FN_CYCLER},
             {"joiner", FN_JOINER}};
    for (size_t i = 0; i < FORGE_ARRAY_LEN(g); i++)
        if (!strcmp(name, g[i].name)) return func(r, g[i].id, NULL, g[i].name);
    return NULL;
}

/* ---- attribute / item lookup ------------------------------------------------------------- */
static const char *const str_methods[] = {
    "strip",        "lstrip",     "rstrip",   "split",     "rsplit",     "startswith",
    "endswith",     "upper",      "lower",    "title",     "capitalize", "replace",
    "find",         "rfind",      "index",    "count",     "join",       "format",
    "splitlines",   "isdigit",    "isalpha",  "isalnum",   "isspace",    "islower",
    "isupper",      "zfill",      "center",   "ljust",     "rjust",      "removeprefix",
    "removesuffix", "swapcase",   "casefold", "isnumeric", "isdecimal",  "partition",
    "rpartition",   "expandtabs", "istitle"};
static const char *const dict_methods[] = {"items", "keys", "values", "get", "copy"};
static const char *const list_methods[] = {"index", "count", "copy"};
static const char *const unsafe_methods[] = {"append",  "extend", "insert",  "pop",    "remove",
                                             "clear",   "sort",   "reverse", "update", "setdefault",
                                             "popitem", "add",    "discard"};

bool tmpl_in_set(const char *const *set, size_t n, const char *name, size_t len)
{
    for (size_t i = 0; i < n; i++)
        if (strlen(set[i]) == len && !memcmp(set[i], name, len)) return true;
    return false;
}

static tval *loop_attr(tmpl_render *r, tval *lv, const char *name)
{
    tloop *l = lv->u.loop;
    if (!strcmp(name, "index0")) return tv_int(A, l->index0);
    if (!strcmp(name, "index")) return tv_int(A, l->index0 + 1);
    if (!strcmp(name, "revindex")) return tv_int(A, l->length - l->index0);
    if (!strcmp(name, "revindex0")) return tv_int(A, l->length - l->index0 - 1);
    if (!strcmp(name, "first")) return tv_bool(l->index0 == 0);
    if (!strcmp(name, "last")) return tv_bool(l->index0 == l->length - 1);
    if (!strcmp(name, "length")) return tv_int(A, l->length);
    if (!strcmp(name, "depth")) return tv_int(A, l->depth0 + 1);
    if (!strcmp(name, "depth0")) return tv_int(A, l->depth0);
    if (!strcmp(name, "previtem"))
        return l->index0 > 0 ? l->items->u.l.v[l->index0 - 1]
                             : tv_undef(A, "there is no previous item");
    if (!strcmp(name, "nextitem"))
        return l->index0 + 1 < l->length ? l->items->u.l.v[l->index0 + 1]
                                         : tv_undef(A, "there is no next item");
    if (!strcmp(name, "cycle") || !strcmp(name, "changed")) return func(r, FN_METHOD, lv, name);
    return tmpl_missing(r, lv, name, strlen(name), false);
}

tval *tmpl_get_attr(tmpl_render *r, tval *obj, const char *name, size_t n)
{
    const char *nm = tmpl_strndup(A, name, n);
    switch (obj->type) {
    case TV_UNDEF:
        tmpl_undef_fail(r, obj);
    case TV_DICT:
        if (tmpl_in_set(dict_methods, FORGE_ARRAY_LEN(dict_methods), name, n))
            return func(r, FN_METHOD, obj, nm);
        if (tmpl_in_set(unsafe_methods, FORGE_ARRAY_LEN(unsafe_methods), name, n))
            return func(r, FN_UNSAFE, obj, nm);
        {
            tval *v = tv_dict_get(obj, name, n);
            if (v) return v;
        }
        return tmpl_missing(r, obj, name, n, false);
    case TV_NS: {
        tval *v = tv_dict_get(obj, name, n);
        return v ? tmpl_ns_value(r, v) : tmpl_missing(r, obj, name, n, false);
    }
    case TV_STR:
        if (tmpl_in_set(str_methods, FORGE_ARRAY_LEN(str_methods), name, n))
            return func(r, FN_METHOD, obj, nm);
        return tmpl_missing(r, obj, name, n, false);
    case TV_LIST:
        if (tmpl_in_set(list_methods, FORGE_ARRAY_LEN(list_methods), name, n))
            return func(r, FN_METHOD, obj, nm);
        if (tmpl_in_set(unsafe_methods, FORGE_ARRAY_LEN(unsafe_methods), name, n))
            return func(r, FN_UNSAFE, obj, nm);
        return tmpl_missing(r, obj, name, n, false);
    case TV_LOOP:
        return loop_attr(r, obj, nm);
    case TV_CYCLER:
        if (!strcmp(nm, "next") || !strcmp(nm, "reset")) return func(r, FN_METHOD, obj, nm);
        if (!strcmp(nm, "current")) {
            tval *items = obj->u.cyc.items;
            return items->u.l.n ? items->u.l.v[obj->u.cyc.pos % (int64_t)items->u.l.n] : &tmpl_none;
        }
        return tmpl_missing(r, obj, name, n, false);
    default:
        return tmpl_missing(r, obj, name, n, false);
    }
}

tval *tmpl_get_item(tmpl_render *r, tval *obj, tval *key)
{
    switch (obj->type) {
    case TV_UNDEF:
        tmpl_undef_fail(r, obj);
    case TV_DICT: {
        tval *v = tv_dict_getv(obj, key);
        if (v) return v;
        break;
    }
    case TV_NS: {
        tval *v = tv_dict_getv(obj, key);
        if (v) return tmpl_ns_value(r, v);
        break;
    }
    case TV_LIST:
        if (key->type == TV_INT || key->type == TV_BOOL) {
            int64_t i = key->type == TV_BOOL ? key->u.b : key->u.i;
            if (i < 0) i += (int64_t)obj->u.l.n;
            if (i >= 0 && i < (int64_t)obj->u.l.n) return obj->u.l.v[i];
            char tmp[32];
            snprintf(tmp, sizeof tmp, "%lld",
                     (long long)(key->type == TV_BOOL ? key->u.b : key->u.i));
            return tmpl_missing(r, obj, tmp, strlen(tmp), true);
        }
        break;
    case TV_STR:
        if (key->type == TV_INT || key->type == TV_BOOL) {
            int64_t i = key->type == TV_BOOL ? key->u.b : key->u.i;
            int64_t len = (int64_t)tmpl_utf8_len(obj->u.s.p, obj->u.s.n);
            if (i < 0) i += len;
            if (i >= 0 && i < len) {
                size_t off = 0;
                uint32_t cp;
                for (int64_t k = 0; k < i; k++)
                    off += tmpl_utf8_decode(obj->u.s.p + off, obj->u.s.n - off, &cp);
                size_t cl = tmpl_utf8_decode(obj->u.s.p + off, obj->u.s.n - off, &cp);
                return tv_str_nocopy(A, obj->u.s.p + off, cl);
            }
            return tv_undef(A, "string index out of range");
        }
        break;
    case TV_LOOP:
        break;
    default:
        break;
    }
    if (key->type == TV_STR) return tmpl_get_attr(r, obj, key->u.s.p, key->u.s.n);
    tval *ks = tmpl_str_of(r, key);
    return tmpl_missing(r, obj, ks->u.s.p, ks->u.s.n, false);
}

/* attribute path "a.b.0" as used by map/selectattr/sort/join/sum */
tval *tmpl_attr_path(tmpl_render *r, tval *obj, tval *attr)
{
    if (attr->type == TV_INT) return tmpl_get_item(r, obj, attr);
    tval *s = tmpl_str_of(r, attr);
    const char *p = s->u.s.p, *end = p + s->u.s.n;
    while (p <= end) {
        const char *dot = memchr(p, '.', (size_t)(end - p));
        if (!dot) dot = end;
        size_t n = (size_t)(dot - p);
        bool digits = n > 0;
        for (size_t i = 0; i < n; i++)
            if (p[i] < '0' || p[i] > '9') digits = false;
        tval *key = digits ? tv_int(A, strtoll(p, NULL, 10)) : tv_str_nocopy(A, p, n);
        if (obj->type == TV_UNDEF) return obj;
        obj = tmpl_get_item(r, obj, key);
        p = dot + 1;
    }
    return obj;
}

/* ---- arithmetic -------------------------------------------------------------------------- */
bool tmpl_is_intlike(const tval *v)
{
    return v->type == TV_INT || v->type == TV_BOOL;
}

int64_t tmpl_as_i(const tval *v)
{
    return v->type == TV_BOOL ? v->u.b : v->u.i;
}

double tmpl_as_f(const tval *v)
{
    return v->type == TV_FLOAT ? v->u.f : (double)tmpl_as_i(v);
}

bool tmpl_is_number(const tval *v)
{
    return tmpl_is_intlike(v) || v->type == TV_FLOAT;
}

static tval *repeat(tmpl_render *r, tval *seq, int64_t times)
{
    if (times < 0) times = 0;
    if (seq->type == TV_STR) {
        uint64_t total;
        if (!forge_mul_u64(seq->u.s.n, (uint64_t)times, &total) || total > r->max_output)
            tmpl_raise(r->fail, FORGE_E_RANGE, r->line, "LimitError",
                       "string repetition longer than %zu bytes", r->max_output);
        char *p = tmpl_alloc(A, (size_t)total + 1);
        for (int64_t i = 0; i < times; i++)
            memcpy(p + (size_t)i * seq->u.s.n, seq->u.s.p, seq->u.s.n);
        return tv_str_nocopy(A, p, (size_t)total);
    }
    uint64_t total;
    if (!forge_mul_u64(seq->u.l.n, (uint64_t)times, &total) || total > 10000000)
        tmpl_raise(r->fail, FORGE_E_RANGE, r->line, "LimitError", "list repetition too long");
    tval *l = tv_list(A, (size_t)total);
    for (int64_t i = 0; i < times; i++)
        for (size_t k = 0; k < seq->u.l.n; k++)
            tv_list_push(A, l, seq->u.l.v[k]);
    l->is_tuple = seq->is_tuple;
    return l;
}

tval *tmpl_percent_format(tmpl_render *r, tval *fmt, tval *args);

tval *tmpl_binop(tmpl_render *r, const char *op, tval *a, tval *b)
{
    if (a->type == TV_UNDEF) tmpl_undef_fail(r, a);
    if (b->type == TV_UNDEF) tmpl_undef_fail(r, b);
    char o = op[0];
    bool dbl = op[1] != 0;
    if (o == '+' && a->type == TV_STR && b->type == TV_STR) {
        tmpl_buf buf = {.limit = r->max_output, .fail = r->fail, .arena = A};
        tmpl_buf_put(&buf, a->u.s.p, a->u.s.n);
        tmpl_buf_put(&buf, b->u.s.p, b->u.s.n);
        return tv_str_nocopy(A, buf.p ? buf.p : "", buf.n);
    }
    if (o == '+' && a->type == TV_LIST && b->type == TV_LIST) {
        tval *l = tv_list(A, a->u.l.n + b->u.l.n);
        for (size_t i = 0; i < a->u.l.n; i++)
            tv_list_push(A, l, a->u.l.v[i]);
        for (size_t i = 0; i < b->u.l.n; i++)
            tv_list_push(A, l, b->u.l.v[i]);
        l->is_tuple = a->is_tuple && b->is_tuple;
        if (a->is_tuple != b->is_tuple)
            tmpl_rt_error(r, "TypeError", "can only concatenate %s (not \"%s\") to %s",
                          tv_type_name(a), tv_type_name(b), tv_type_name(a));
        return l;
    }
    if (o == '*' && !dbl && (a->type == TV_STR || a->type == TV_LIST) && tmpl_is_intlike(b))
        return repeat(r, a, tmpl_as_i(b));
    if (o == '*' && !dbl && (b->type == TV_STR || b->type == TV_LIST) && tmpl_is_intlike(a))
        return repeat(r, b, tmpl_as_i(a));
    if (o == '%' && a->type == TV_STR) return tmpl_percent_format(r, a, b);
    if (!tmpl_is_number(a) || !tmpl_is_number(b)) {
        if (o == '+' && a->type == TV_STR)
            tmpl_rt_error(r, "TypeError", "can only concatenate str (not \"%s\") to str",
                          tv_type_name(b));
        tmpl_rt_error(r, "TypeError", "unsupported operand type(s) for %s: '%s' and '%s'", op,
                      tv_type_name(a), tv_type_name(b));
    }
    bool ints = tmpl_is_intlike(a) && tmpl_is_intlike(b);
    if (ints && !(o == '/' && !dbl)) {
        int64_t x = tmpl_as_i(a), y = tmpl_as_i(b), z = 0;
        bool ok = true;
        switch (o) {
        case '+':
            ok = !__builtin_add_overflow(x, y, &z);
            break;
        case '-':
            ok = !__builtin_sub_overflow(x, y, &z);
            break;
        case '*':
            if (dbl) { /* ** */
                if (y < 0) return tv_float(A, pow((double)x, (double)y));
                z = 1;
                for (int64_t k = 0; k < y && ok; k++) {
                    ok = !__builtin_mul_overflow(z, x, &z);
                    if (z == 0 || z == 1) break;
                    if (z == -1) {
                        z = (y % 2) ? -1 : 1;
                        break;
                    }
                }
            } else {
                ok = !__builtin_mul_overflow(x, y, &z);
            }
            break;
        case '/': /* // */
        case '%':
            if (y == 0)
                tmpl_rt_error(r, "ZeroDivisionError",
                              o == '%' ? "integer modulo by zero"
                                       : "integer division or modulo by zero");
            if (x == INT64_MIN && y == -1) {
                ok = o == '%';
                z = 0;
                break;
            }
            {
                int64_t q = x / y, m = x % y;
                if (m != 0 && ((m < 0) != (y < 0))) {
                    q -= 1;
                    m += y;
                }
                z = o == '%' ? m : q;
            }
            break;
        }
        if (!ok) tmpl_rt_error(r, "OverflowError", "integer result out of range");
        return tv_int(A, z);
    }
    double x = tmpl_as_f(a), y = tmpl_as_f(b);
    switch (o) {
    case '+':
        return tv_float(A, x + y);
    case '-':
        return tv_float(A, x - y);
    case '*':
        return tv_float(A, dbl ? pow(x, y) : x * y);
    case '/':
        if (y == 0)
            tmpl_rt_error(r, "ZeroDivisionError",
                          dbl ? "float floor division by zero" : "division by zero");
        return tv_float(A, dbl ? floor(x / y) : x / y);
    case '%': {
        if (y == 0) tmpl_rt_error(r, "ZeroDivisionError", "float modulo");
        double m = fmod(x, y);
        if (m != 0 && ((m < 0) != (y < 0))) m += y;
        return tv_float(A, m);
    }
    }
    tmpl_rt_error(r, "TypeError", "unsupported operator %s", op);
}

/* One %d/%i/%x/%f/%e/%g conversion. spec is "%" + flags, width, precision as written. printf
 * takes time in proportion to the width and precision (seconds for "%2000000000d"), so they are
 * bounded and charged; the result is sized exactly (no truncation of "%300d" or "%f" of 1e308). */
#define FORMAT_MAX_WIDTH 1000000
static void put_number(tmpl_render *r, tmpl_buf *b, const char *spec, char conv, const tval *arg)
{
    size_t k = 1;
    uint64_t width = 0, prec = 0;
    while (spec[k] && strchr("-+ #0", spec[k]))
        k++;
    for (; spec[k] >= '0' && spec[k] <= '9'; k++)
        width = width > FORMAT_MAX_WIDTH ? width : width * 10 + (uint64_t)(spec[k] - '0');
    if (spec[k] == '.')
        for (k++; spec[k] >= '0' && spec[k] <= '9'; k++)
            prec = prec > FORMAT_MAX_WIDTH ? prec : prec * 10 + (uint64_t)(spec[k] - '0');
    if (spec[k]) tmpl_rt_error(r, "ValueError", "unsupported format character '%c'", spec[k]);
    if (width > FORMAT_MAX_WIDTH || prec > FORMAT_MAX_WIDTH)
        tmpl_raise(r->fail, FORGE_E_RANGE, r->line, "LimitError",
                   "format width or precision larger than %d", FORMAT_MAX_WIDTH);
    tmpl_work(width + prec);
    char f[32] = "";
    bool is_int = conv == 'd' || conv == 'i' || conv == 'x';
    long long iv = 0;
    double dv = tmpl_as_f(arg);
    if (is_int && arg->type == TV_FLOAT) { /* int(f) first, as Python does */
        if (isnan(dv)) tmpl_rt_error(r, "ValueError", "cannot convert float NaN to integer");
        if (isinf(dv))
            tmpl_rt_error(r, "OverflowError", "cannot convert float infinity to integer");
        if (fabs(dv) >= 9.2e18) {
            if (conv == 'x') tmpl_rt_error(r, "OverflowError", "%%x format: integer too large");
            /* beyond int64: the exact digits of the truncated double, with the flags and width */
            size_t wl = strcspn(spec, ".");
            snprintf(f, sizeof f, "%.*s.0f", (int)wl, spec);
            dv = trunc(dv);
            is_int = false;
        } else {
            iv = (long long)dv;
        }
    } else if (is_int) {
        iv = (long long)tmpl_as_i(arg);
    }
    if (is_int)
        snprintf(f, sizeof f, "%sll%c", spec, conv == 'x' ? 'x' : 'd');
    else if (f[0] != '%')
        snprintf(f, sizeof f, "%s%c", spec, conv);
    int n = is_int ? snprintf(NULL, 0, f, iv) : snprintf(NULL, 0, f, dv);
    if (n < 0) tmpl_rt_error(r, "ValueError", "bad format '%s'", f);
    char *out = tmpl_alloc(A, (size_t)n + 1);
    if (is_int)
        snprintf(out, (size_t)n + 1, f, iv);
    else
        snprintf(out, (size_t)n + 1, f, dv);
    tmpl_buf_put(b, out, (size_t)n);
}

/* "%s" % args (printf-style string formatting, the common conversions) */
tval *tmpl_percent_format(tmpl_render *r, tval *fmt, tval *args)
{
    tmpl_work(fmt->u.s.n);
    tmpl_buf b = {.limit = r->max_output, .fail = r->fail, .arena = A};
    size_t ai = 0;
    tval *single = args->type == TV_LIST && args->is_tuple ? NULL : args;
    for (size_t i = 0; i < fmt->u.s.n; i++) {
        char c = fmt->u.s.p[i];
        if (c != '%') {
            tmpl_buf_putc(&b, c);
            continue;
        }
        if (++i >= fmt->u.s.n) tmpl_rt_error(r, "ValueError", "incomplete format");
        char spec[16] = "%";
        size_t sl = 1;
        while (i < fmt->u.s.n && strchr("-+ #0123456789.", fmt->u.s.p[i]) && sl < 12)
            spec[sl++] = fmt->u.s.p[i++];
        if (i >= fmt->u.s.n) tmpl_rt_error(r, "ValueError", "incomplete format");
        char conv = fmt->u.s.p[i];
        if (conv == '%') {
            tmpl_buf_putc(&b, '%');
            continue;
        }
        tval *arg;
        if (single) {
            if (ai++ > 0) tmpl_rt_error(r, "TypeError", "not enough arguments for format string");
            arg = single;
        } else {
            if (ai >= args->u.l.n)
                tmpl_rt_error(r, "TypeError", "not enough arguments for format string");
            arg = args->u.l.v[ai++];
        }
        if (conv == 's' || conv == 'r') {
            tmpl_buf tmp = {.limit = r->max_output, .fail = r->fail, .arena = A};
            if (conv == 's')
                tv_to_str(&tmp, arg);
            else
                tv_repr(&tmp, arg);
            tmpl_buf_put(&b, tmp.p ? tmp.p : "", tmp.n);
        } else if (conv == 'd' || conv == 'i' || conv == 'f' || conv == 'x' || conv == 'e' ||
                   conv == 'g') {
            if (!tmpl_is_number(arg))
                tmpl_rt_error(r, "TypeError", "%%%c format: a real number is required, not %s",
                              conv, tv_type_name(arg));
            spec[sl] = 0;
            put_number(r, &b, spec, conv, arg);
        } else {
            tmpl_rt_error(r, "ValueError", "unsupported format character '%c'", conv);
        }
    }
    if ((!single && ai < args->u.l.n) || (single && ai == 0 && !(args->type == TV_DICT)))
        tmpl_rt_error(r, "TypeError", "not all arguments converted during string formatting");
    return tv_str_nocopy(A, b.p ? b.p : "", b.n);
}

/* ---- string helpers ---------------------------------------------------------------------- */
uint32_t tmpl_cp_upper(uint32_t c)
{
    return (uint32_t)utf8proc_toupper((utf8proc_int32_t)c);
}
uint32_t tmpl_cp_lower(uint32_t c)
{
    return (uint32_t)utf8proc_tolower((utf8proc_int32_t)c);
}
static uint32_t cp_title(uint32_t c)
{
    return (uint32_t)utf8proc_totitle((utf8proc_int32_t)c);
}
static bool cp_is_upper(uint32_t c)
{
    return utf8proc_category((utf8proc_int32_t)c) == UTF8PROC_CATEGORY_LU;
}
static bool cp_is_lower(uint32_t c)
{
    return utf8proc_category((utf8proc_int32_t)c) == UTF8PROC_CATEGORY_LL;
}
static bool cp_is_cased(uint32_t c)
{
    int cat = utf8proc_category((utf8proc_int32_t)c);
    return cat == UTF8PROC_CATEGORY_LU || cat == UTF8PROC_CATEGORY_LL ||
           cat == UTF8PROC_CATEGORY_LT;
}
static bool cp_is_alpha(uint32_t c)
{
    int cat = utf8proc_category((utf8proc_int32_t)c);
    return cat >= UTF8PROC_CATEGORY_LU && cat <= UTF8PROC_CATEGORY_LO;
}
static bool cp_is_digit(uint32_t c)
{
    return utf8proc_category((utf8proc_int32_t)c) == UTF8PROC_CATEGORY_ND;
}

/* mode 0: map all; 1: capitalize (first title/upper, rest lower); 2: Python str.title;
 * 3: jinja title filter (word starts after space/-/(/{/[/<); 4: swapcase */
tval *tmpl_str_map(tmpl_render *r, const tval *s, tmpl_cp_map f, int mode)
{
    /* each code point read (>= 1 byte) is written as <= 4 bytes: an invalid byte becomes U+FFFD
     * (3 bytes), so 2 bytes per input byte were not enough (a heap overflow found by fuzzing) */
    char *out = tmpl_alloc(A, s->u.s.n * 4 + 8);
    size_t o = 0, i = 0;
    bool prev_cased = false, first = true, word_start = true;
    while (i < s->u.s.n) {
        uint32_t cp;
        i += tmpl_utf8_decode(s->u.s.p + i, s->u.s.n - i, &cp);
        uint32_t m = cp;
        if (mode == 0 && f == tmpl_cp_upper && cp == 0xDF) { /* Python: 'ß'.upper() == 'SS' */
            out[o++] = 'S';
            m = 'S';
        } else if (mode == 0)
            m = f(cp);
        else if (mode == 1)
            m = first ? tmpl_cp_upper(cp) : tmpl_cp_lower(cp);
        else if (mode == 2) {
            if (cp_is_cased(cp)) m = prev_cased ? tmpl_cp_lower(cp) : cp_title(cp);
            prev_cased = cp_is_cased(cp);
        } else if (mode == 3) {
            bool sep = tmpl_py_isspace(cp) || cp == '-' || cp == '(' || cp == '{' || cp == '[' ||
                       cp == '<';
            if (sep) {
                word_start = true;
            } else {
                m = word_start ? tmpl_cp_upper(cp) : tmpl_cp_lower(cp);
                word_start = false;
            }
        } else if (mode == 4) {
            m = cp_is_upper(cp) ? tmpl_cp_lower(cp) : cp_is_lower(cp) ? tmpl_cp_upper(cp) : cp;
        }
        first = false;
        o += tmpl_utf8_encode(m, out + o);
    }
    return tv_str_nocopy(A, out, o);
}

static bool cp_in(uint32_t cp, const tval *chars)
{
    tmpl_work(chars->u.s.n);
    size_t i = 0;
    while (i < chars->u.s.n) {
        uint32_t c;
        i += tmpl_utf8_decode(chars->u.s.p + i, chars->u.s.n - i, &c);
        if (c == cp) return true;
    }
    return false;
}

/* strip: which 1 = left, 2 = right, 3 = both; chars NULL = whitespace */
tval *tmpl_str_strip(tmpl_render *r, const tval *s, const tval *chars, int which)
{
    const char *p = s->u.s.p;
    size_t a = 0, b = s->u.s.n;
    if (which & 1) {
        while (a < b) {
            uint32_t cp;
            size_t k = tmpl_utf8_decode(p + a, b - a, &cp);
            if (chars ? !cp_in(cp, chars) : !tmpl_py_isspace(cp)) break;
            a += k;
        }
    }
    if (which & 2) {
        while (b > a) {
            size_t st = b - 1;
            while (st > a && ((unsigned char)p[st] & 0xC0) == 0x80 && b - st < 4)
                st--;
            uint32_t cp;
            size_t k = tmpl_utf8_decode(p + st, b - st, &cp);
            if (k != b - st) cp = (unsigned char)p[b - 1], st = b - 1;
            if (chars ? !cp_in(cp, chars) : !tmpl_py_isspace(cp)) break;
            b = st;
        }
    }
    tmpl_work(s->u.s.n - (b - a));
    return tv_str_nocopy(A, p + a, b - a);
}

#define memfind tmpl_memfind
#define memrfind tmpl_memrfind

tval *tmpl_str_replace(tmpl_render *r, const tval *s, const tval *old, const tval *new_,
                       int64_t count)
{
    tmpl_buf b = {.limit = r->max_output, .fail = r->fail, .arena = A};
    if (old->u.s.n == 0) { /* Python inserts new between every character */
        size_t i = 0;
        int64_t done = 0;
        if (count != 0) {
            tmpl_buf_put(&b, new_->u.s.p, new_->u.s.n);
            done++;
        }
        while (i < s->u.s.n) {
            uint32_t cp;
            size_t k = tmpl_utf8_decode(s->u.s.p + i, s->u.s.n - i, &cp);
            tmpl_buf_put(&b, s->u.s.p + i, k);
            i += k;
            if (count < 0 || done < count) {
                tmpl_buf_put(&b, new_->u.s.p, new_->u.s.n);
                done++;
            }
        }
        return tv_str_nocopy(A, b.p ? b.p : "", b.n);
    }
    const char *p = s->u.s.p, *end = p + s->u.s.n;
    int64_t done = 0;
    while (p < end) {
        const char *f = (count < 0 || done < count)
                            ? memfind(p, (size_t)(end - p), old->u.s.p, old->u.s.n)
                            : NULL;
        if (!f) break;
        tmpl_buf_put(&b, p, (size_t)(f - p));
        tmpl_buf_put(&b, new_->u.s.p, new_->u.s.n);
        p = f + old->u.s.n;
        done++;
    }
    tmpl_buf_put(&b, p, (size_t)(end - p));
    return tv_str_nocopy(A, b.p ? b.p : "", b.n);
}

tval *tmpl_str_split(tmpl_render *r, const tval *s, const tval *sep, int64_t maxsplit, bool right)
{
    tmpl_work(s->u.s.n);
    tval *l = tv_list(A, 0);
    const char *p = s->u.s.p;
    size_t n = s->u.s.n;
    if (!sep || sep->type == TV_NONE) {
        /* whitespace runs; leading/trailing ignored */
        if (right) {
            size_t e = n;
            tval *rev = tv_list(A, 0);
            int64_t done = 0;
            for (;;) {
                while (e > 0 && tmpl_py_isspace((unsigned char)p[e - 1]))
                    e--;
                if (e == 0) break;
                if (maxsplit >= 0 && done >= maxsplit) {
                    tv_list_push(A, rev, tv_str_nocopy(A, p, e));
                    break;
                }
                size_t st = e;
                while (st > 0 && !tmpl_py_isspace((unsigned char)p[st - 1]))
                    st--;
                tv_list_push(A, rev, tv_str_nocopy(A, p + st, e - st));
                done++;
                e = st;
            }
            for (size_t i = rev->u.l.n; i-- > 0;)
                tv_list_push(A, l, rev->u.l.v[i]);
            return l;
        }
        size_t i = 0;
        int64_t done = 0;
        for (;;) {
            while (i < n) {
                uint32_t cp;
                size_t k = tmpl_utf8_decode(p + i, n - i, &cp);
                if (!tmpl_py_isspace(cp)) break;
                i += k;
            }
            if (i >= n) break;
            if (maxsplit >= 0 && done >= maxsplit) {
                size_t e = n;
                while (e > i && tmpl_py_isspace((unsigned char)p[e - 1]))
                    e--;
                tv_list_push(A, l, tv_str_nocopy(A, p + i, e - i));
                break;
            }
            size_t st = i;
            while (i < n) {
                uint32_t cp;
                size_t k = tmpl_utf8_decode(p + i, n - i, &cp);
                if (tmpl_py_isspace(cp)) break;
                i += k;
            }
            tv_list_push(A, l, tv_str_nocopy(A, p + st, i - st));
            done++;
        }
        return l;
    }
    if (sep->type != TV_STR)
        tmpl_rt_error(r, "TypeError", "must be str or None, not %s", tv_type_name(sep));
    if (sep->u.s.n == 0) tmpl_rt_error(r, "ValueError", "empty separator");
    if (right) {
        tval *rev = tv_list(A, 0);
        size_t e = n;
        int64_t done = 0;
        for (;;) {
            const char *f =
                (maxsplit < 0 || done < maxsplit) ? memrfind(p, e, sep->u.s.p, sep->u.s.n) : NULL;
            if (!f) {
                tv_list_push(A, rev, tv_str_nocopy(A, p, e));
                break;
            }
            size_t st = (size_t)(f - p) + sep->u.s.n;
            tv_list_push(A, rev, tv_str_nocopy(A, p + st, e - st));
            e = (size_t)(f - p);
            done++;
        }
        for (size_t i = rev->u.l.n; i-- > 0;)
            tv_list_push(A, l, rev->u.l.v[i]);
        return l;
    }
    size_t i = 0;
    int64_t done = 0;
    for (;;) {
        const char *f = (maxsplit < 0 || done < maxsplit)
                            ? memfind(p + i, n - i, sep->u.s.p, sep->u.s.n)
                            : NULL;
        if (!f) {
            tv_list_push(A, l, tv_str_nocopy(A, p + i, n - i));
            break;
        }
        tv_list_push(A, l, tv_str_nocopy(A, p + i, (size_t)(f - (p + i))));
        i = (size_t)(f - p) + sep->u.s.n;
        done++;
    }
    return l;
}

tval *tmpl_join_list(tmpl_render *r, tval *items, const tval *sep, tval *attribute)
{
    tmpl_buf b = {.limit = r->max_output, .fail = r->fail, .arena = A};
    for (size_t i = 0; i < items->u.l.n; i++) {
        if (i && sep) tmpl_buf_put(&b, sep->u.s.p, sep->u.s.n);
        tval *v = items->u.l.v[i];
        if (attribute) v = tmpl_attr_path(r, v, attribute);
        tv_to_str(&b, v);
    }
    return tv_str_nocopy(A, b.p ? b.p : "", b.n);
}

tval *tmpl_need_str(tmpl_render *r, tval *v, const char *what)
{
    if (!v || v->type != TV_STR)
        tmpl_rt_error(r, "TypeError", "%s must be str, not %s", what,
                      v ? tv_type_name(v) : "nothing");
    return v;
}

int64_t tmpl_need_int(tmpl_render *r, tval *v, const char *what)
{
    if (!v || !tmpl_is_intlike(v))
        tmpl_rt_error(r, "TypeError", "%s must be an integer, not %s", what,
                      v ? tv_type_name(v) : "nothing");
    return tmpl_as_i(v);
}

static bool affix_match(tmpl_render *r, const tval *s, tval *aff, bool end)
{
    if (aff->type == TV_LIST && aff->is_tuple) {
        for (size_t i = 0; i < aff->u.l.n; i++)
            if (affix_match(r, s, aff->u.l.v[i], end)) return true;
        return false;
    }
    tmpl_need_str(r, aff, end ? "endswith arg" : "startswith arg");
    if (aff->u.s.n > s->u.s.n) return false;
    tmpl_work(aff->u.s.n);
    return !memcmp(s->u.s.p + (end ? s->u.s.n - aff->u.s.n : 0), aff->u.s.p, aff->u.s.n);
}

static bool all_cp(const tval *s, bool (*pred)(uint32_t))
{
    tmpl_work(s->u.s.n);
    if (s->u.s.n == 0) return false;
    size_t i = 0;
    while (i < s->u.s.n) {
        uint32_t cp;
        i += tmpl_utf8_decode(s->u.s.p + i, s->u.s.n - i, &cp);
        if (!pred(cp)) return false;
    }
    return true;
}

static bool cp_is_alnum(uint32_t c)
{
    return cp_is_alpha(c) || cp_is_digit(c);
}

tval *tmpl_pad(tmpl_render *r, tval *s, int64_t width, tval *fill, int where)
{
    int64_t len = (int64_t)tmpl_utf8_len(s->u.s.p, s->u.s.n);
    if (width <= len) return s;
    if (width > (int64_t)r->max_output)
        tmpl_raise(r->fail, FORGE_E_RANGE, r->line, "LimitError", "width too large");
    const char *f = " ";
    size_t fl = 1;
    if (fill) {
        tmpl_need_str(r, fill, "fill character");
        f = fill->u.s.p;
        fl = fill->u.s.n;
    }
    int64_t total = width - len, left = where == 0   ? 0
                                        : where == 2 ? total
                                                     : total / 2 + (total & width & 1);
    tmpl_buf b = {.limit = r->max_output, .fail = r->fail, .arena = A};
    for (int64_t i = 0; i < left; i++)
        tmpl_buf_put(&b, f, fl);
    tmpl_buf_put(&b, s->u.s.p, s->u.s.n);
    for (int64_t i = left; i < total; i++)
        tmpl_buf_put(&b, f, fl);
    return tv_str_nocopy(A, b.p, b.n);
}

/* str.format with {} / {0} / {name} fields */
static tval *str_format(tmpl_render *r, tval *s, targs *args)
{
    tmpl_work(s->u.s.n);
    tmpl_buf b = {.limit = r->max_output, .fail = r->fail, .arena = A};
    size_t auto_i = 0;
    for (size_t i = 0; i < s->u.s.n; i++) {
        char c = s->u.s.p[i];
        if (c == '{' && i + 1 < s->u.s.n && s->u.s.p[i + 1] == '{') {
            tmpl_buf_putc(&b, '{');
            i++;
        } else if (c == '}' && i + 1 < s->u.s.n && s->u.s.p[i + 1] == '}') {
            tmpl_buf_putc(&b, '}');
            i++;
        } else if (c == '{') {
            const char *close = memchr(s->u.s.p + i, '}', s->u.s.n - i);
            if (!close) tmpl_rt_error(r, "ValueError", "Single '{' encountered in format string");
            const char *f = s->u.s.p + i + 1;
            size_t fl = (size_t)(close - f);
            const char *colon = memchr(f, ':', fl);
            if (colon) fl = (size_t)(colon - f);
            tval *v = NULL;
            if (fl == 0) {
                if (auto_i >= args->npos)
                    tmpl_rt_error(r, "IndexError",
                                  "Replacement index %zu out of range for positional args tuple",
                                  auto_i);
                v = args->pos[auto_i++];
            } else if (f[0] >= '0' && f[0] <= '9') {
                size_t k = (size_t)strtoul(f, NULL, 10);
                if (k >= args->npos)
                    tmpl_rt_error(r, "IndexError",
                                  "Replacement index %zu out of range for positional args tuple",
                                  k);
                v = args->pos[k];
            } else {
                for (size_t k = 0; k < args->nkw; k++)
                    if (strlen(args->kwn[k]) == fl && !memcmp(args->kwn[k], f, fl))
                        v = args->kwv[k];
                if (!v) tmpl_rt_error(r, "KeyError", "'%.*s'", (int)fl, f);
            }
            tv_to_str(&b, v);
            i = (size_t)(close - s->u.s.p);
        } else {
            tmpl_buf_putc(&b, c);
        }
    }
    return tv_str_nocopy(A, b.p ? b.p : "", b.n);
}

tval *tmpl_str_method(tmpl_render *r, tval *s, const char *m, targs *a)
{
    tval *a0 = a->npos > 0 ? a->pos[0] : NULL;
    tval *a1 = a->npos > 1 ? a->pos[1] : NULL;
    if (!strcmp(m, "strip") || !strcmp(m, "lstrip") || !strcmp(m, "rstrip")) {
        tval *chars = tmpl_kwarg(a, "chars", 0);
        if (chars && chars->type == TV_NONE) chars = NULL;
        if (chars) tmpl_need_str(r, chars, "strip arg");
        return tmpl_str_strip(r, s, chars, m[0] == 'l' ? 1 : m[0] == 'r' ? 2 : 3);
    }
    if (!strcmp(m, "split") || !strcmp(m, "rsplit")) {
        tval *sep = tmpl_kwarg(a, "sep", 0), *mx = tmpl_kwarg(a, "maxsplit", 1);
        return tmpl_str_split(r, s, sep, mx ? tmpl_need_int(r, mx, "maxsplit") : -1, m[0] == 'r');
    }
    if (!strcmp(m, "startswith") || !strcmp(m, "endswith")) {
        if (!a0) tmpl_rt_error(r, "TypeError", "%s() takes at least 1 argument (0 given)", m);
        tval *sub = s;
        if (a1) {
            tmpl_render *rr = r;
            targs sa = {.pos = &a1, .npos = 1};
            (void)sa;
            int64_t start = tmpl_need_int(rr, a1, "start");
            int64_t len = (int64_t)tmpl_utf8_len(s->u.s.p, s->u.s.n);
            if (start < 0) start += len;
            if (start < 0) start = 0;
            size_t off = 0;
            uint32_t cp;
            for (int64_t k = 0; k < start && off < s->u.s.n; k++)
                off += tmpl_utf8_decode(s->u.s.p + off, s->u.s.n - off, &cp);
            if (start > len) return &tmpl_false;
            sub = tv_str_nocopy(A, s->u.s.p + off, s->u.s.n - off);
        }
        return tv_bool(affix_match(r, sub, a0, m[0] == 'e'));
    }
    if (!strcmp(m, "upper")) return tmpl_str_map(r, s, tmpl_cp_upper, 0);
    if (!strcmp(m, "lower") || !strcmp(m, "casefold")) return tmpl_str_map(r, s, tmpl_cp_lower, 0);
    if (!strcmp(m, "title")) return tmpl_str_map(r, s, NULL, 2);
    if (!strcmp(m, "capitalize")) return tmpl_str_map(r, s, NULL, 1);
    if (!strcmp(m, "swapcase")) return tmpl_str_map(r, s, NULL, 4);
    if (!strcmp(m, "replace")) {
        tval *cnt = a->npos > 2 ? a->pos[2] : tmpl_kwarg(a, "count", (size_t)-1);
        return tmpl_str_replace(r, s, tmpl_need_str(r, a0, "replace arg 1"),
                                tmpl_need_str(r, a1, "replace arg 2"),
                                cnt ? tmpl_need_int(r, cnt, "count") : -1);
    }
    if (!strcmp(m, "find") || !strcmp(m, "rfind") || !strcmp(m, "index") || !strcmp(m, "count")) {
        tmpl_need_str(r, a0, m);
        if (!strcmp(m, "count")) {
            if (a0->u.s.n == 0) return tv_int(A, (int64_t)tmpl_utf8_len(s->u.s.p, s->u.s.n) + 1);
            int64_t c = 0;
            const char *p = s->u.s.p, *end = p + s->u.s.n;
            const char *f;
            while ((f = memfind(p, (size_t)(end - p), a0->u.s.p, a0->u.s.n))) {
                c++;
                p = f + a0->u.s.n;
            }
            return tv_int(A, c);
        }
        const char *f = m[0] == 'r' ? memrfind(s->u.s.p, s->u.s.n, a0->u.s.p, a0->u.s.n)
                                    : memfind(s->u.s.p, s->u.s.n, a0->u.s.p, a0->u.s.n);
        if (!f) {
            if (m[0] == 'i') tmpl_rt_error(r, "ValueError", "substring not found");
            return tv_int(A, -1);
        }
        return tv_int(A, (int64_t)tmpl_utf8_len(s->u.s.p, (size_t)(f - s->u.s.p)));
    }
    if (!strcmp(m, "join")) {
        if (!a0) tmpl_rt_error(r, "TypeError", "join() takes exactly one argument (0 given)");
        tval *items = tmpl_to_list(r, a0);
        for (size_t i = 0; i < items->u.l.n; i++)
            if (items->u.l.v[i]->type != TV_STR)
                tmpl_rt_error(r, "TypeError", "sequence item %zu: expected str instance, %s found",
                              i, tv_type_name(items->u.l.v[i]));
        return tmpl_join_list(r, items, s, NULL);
    }
    if (!strcmp(m, "format")) return str_format(r, s, a);
    if (!strcmp(m, "splitlines")) {
        tmpl_work(s->u.s.n);
        tval *l = tv_list(A, 0);
        size_t st = 0;
        for (size_t i = 0; i < s->u.s.n; i++) {
            char c = s->u.s.p[i];
            if (c == '\n' || c == '\r') {
                tv_list_push(A, l, tv_str_nocopy(A, s->u.s.p + st, i - st));
                if (c == '\r' && i + 1 < s->u.s.n && s->u.s.p[i + 1] == '\n') i++;
                st = i + 1;
            }
        }
        if (st < s->u.s.n) tv_list_push(A, l, tv_str_nocopy(A, s->u.s.p + st, s->u.s.n - st));
        return l;
    }
    if (!strcmp(m, "isdigit") || !strcmp(m, "isnumeric") || !strcmp(m, "isdecimal"))
        return tv_bool(all_cp(s, cp_is_digit));
    if (!strcmp(m, "isalpha")) return tv_bool(all_cp(s, cp_is_alpha));
    if (!strcmp(m, "isalnum")) return tv_bool(all_cp(s, cp_is_alnum));
    if (!strcmp(m, "isspace")) return tv_bool(all_cp(s, tmpl_py_isspace));
    if (!strcmp(m, "islower") || !strcmp(m, "isupper") || !strcmp(m, "istitle")) {
        tmpl_work(s->u.s.n);
        bool any = false, ok = true;
        size_t i = 0;
        while (i < s->u.s.n) {
            uint32_t cp;
            i += tmpl_utf8_decode(s->u.s.p + i, s->u.s.n - i, &cp);
            if (!cp_is_cased(cp)) continue;
            any = true;
            if (m[2] == 'l' && !cp_is_lower(cp)) ok = false;
            if (m[2] == 'u' && !cp_is_upper(cp)) ok = false;
        }
        if (m[2] == 't') return tv_bool(any && tv_equal(tmpl_str_map(r, s, NULL, 2), s));
        return tv_bool(any && ok);
    }
    if (!strcmp(m, "zfill")) {
        int64_t w = tmpl_need_int(r, a0, "zfill width");
        int64_t len = (int64_t)tmpl_utf8_len(s->u.s.p, s->u.s.n);
        if (w <= len) return s;
        if (w > (int64_t)r->max_output)
            tmpl_raise(r->fail, FORGE_E_RANGE, r->line, "LimitError", "width too large");
        tmpl_buf b = {.limit = r->max_output, .fail = r->fail, .arena = A};
        size_t st = 0;
        if (s->u.s.n && (s->u.s.p[0] == '-' || s->u.s.p[0] == '+')) {
            tmpl_buf_putc(&b, s->u.s.p[0]);
            st = 1;
        }
        for (int64_t i = len; i < w; i++)
            tmpl_buf_putc(&b, '0');
        tmpl_buf_put(&b, s->u.s.p + st, s->u.s.n - st);
        return tv_str_nocopy(A, b.p, b.n);
    }
    if (!strcmp(m, "center") || !strcmp(m, "ljust") || !strcmp(m, "rjust"))
        return tmpl_pad(r, s, tmpl_need_int(r, a0, "width"), a1,
                        m[0] == 'c'   ? 1
                        : m[0] == 'l' ? 0
                                      : 2);
    if (!strcmp(m, "removeprefix") || !strcmp(m, "removesuffix")) {
        tmpl_need_str(r, a0, m);
        bool suf = m[6] == 's';
        if (affix_match(r, s, a0, suf))
            return tv_str_nocopy(A, s->u.s.p + (suf ? 0 : a0->u.s.n), s->u.s.n - a0->u.s.n);
        return s;
    }
    if (!strcmp(m, "partition") || !strcmp(m, "rpartition")) {
        tmpl_need_str(r, a0, m);
        if (a0->u.s.n == 0) tmpl_rt_error(r, "ValueError", "empty separator");
        const char *f = m[0] == 'r' ? memrfind(s->u.s.p, s->u.s.n, a0->u.s.p, a0->u.s.n)
                                    : memfind(s->u.s.p, s->u.s.n, a0->u.s.p, a0->u.s.n);
        tval *t = tv_list(A, 3);
        t->is_tuple = true;
        tval *empty = tv_str_nocopy(A, "", 0);
        if (!f) {
            tv_list_push(A, t, m[0] == 'r' ? empty : s);
            tv_list_push(A, t, empty);
            tv_list_push(A, t, m[0] == 'r' ? s : empty);
        } else {
            size_t off = (size_t)(f - s->u.s.p);
            tv_list_push(A, t, tv_str_nocopy(A, s->u.s.p, off));
            tv_list_push(A, t, a0);
            tv_list_push(A, t, tv_str_nocopy(A, f + a0->u.s.n, s->u.s.n - off - a0->u.s.n));
        }
        return t;
    }
    if (!strcmp(m, "expandtabs")) {
        tval *tab = tv_str_nocopy(A, "\t", 1), *sp = tv_str_nocopy(A, "        ", 8);
        return tmpl_str_replace(r, s, tab, sp, -1);
    }
    tmpl_rt_error(r, "TypeError", "str.%s is not supported", m);
}

tval *tmpl_ns_value(tmpl_render *r, tval *v)
{
    if (!v->ns_slot) return v;
    tval *c = tv_new(A, v->type);
    c->u = v->u;
    return c;
}

tval *tmpl_dict_items(tmpl_render *r, tval *d)
{
    tval *l = tv_list(A, d->u.d.n);
    for (size_t i = 0; i < d->u.d.n; i++) {
        tval *t = tv_list(A, 2);
        t->is_tuple = true;
        t->u.l.v[0] = d->u.d.k[i];
        t->u.l.v[1] = tmpl_ns_value(r, d->u.d.v[i]);
        t->u.l.n = 2;
        l->u.l.v[i] = t;
    }
    l->u.l.n = d->u.d.n;
    return l;
}

static tval *strftime_now(tmpl_render *r, tval *fmt)
{
    tmpl_need_str(r, fmt, "strftime_now format");
    struct tm tm;
    if (r->now) {
        time_t t = (time_t)r->now;
        gmtime_r(&t, &tm);
    } else {
        time_t t = time(NULL);
        localtime_r(&t, &tm);
    }
    char *f = tmpl_strndup(A, fmt->u.s.p, fmt->u.s.n);
    size_t cap = fmt->u.s.n * 16 + 64;
    if (cap > 1 << 20) tmpl_rt_error(r, "ValueError", "strftime format too long");
    char *out = tmpl_alloc(A, cap);
    size_t n = fmt->u.s.n ? strftime(out, cap, f, &tm) : 0;
    return tv_str_nocopy(A, out, n);
}

tval *tmpl_call_func(tmpl_render *r, tval *fn, targs *a)
{
    tval *self = fn->u.fn.self;
    const char *m = fn->u.fn.name;
    switch (fn->u.fn.id) {
    case FN_UNSAFE:
        tmpl_rt_error(r, "SecurityError", "access to attribute '%s' of '%s' object is unsafe.", m,
                      tv_type_name(self));
    case FN_RANGE: {
        int64_t st = 0, en, step = 1;
        if (a->npos == 1) {
            en = tmpl_need_int(r, a->pos[0], "range stop");
        } else if (a->npos == 2 || a->npos == 3) {
            st = tmpl_need_int(r, a->pos[0], "range start");
            en = tmpl_need_int(r, a->pos[1], "range stop");
            if (a->npos == 3) step = tmpl_need_int(r, a->pos[2], "range step");
        } else {
            tmpl_rt_error(r, "TypeError", "range expected 1 to 3 arguments, got %zu", a->npos);
        }
        if (step == 0) tmpl_rt_error(r, "ValueError", "range() arg 3 must not be zero");
        /* exact count in unsigned arithmetic: no overflow near INT64_MIN/MAX */
        uint64_t span = step > 0 ? (en > st ? (uint64_t)en - (uint64_t)st : 0)
                                 : (st > en ? (uint64_t)st - (uint64_t)en : 0);
        uint64_t ustep = step > 0 ? (uint64_t)step : (uint64_t)0 - (uint64_t)step;
        uint64_t cnt = span ? (span - 1) / ustep + 1 : 0;
        if (cnt > MAX_RANGE)
            tmpl_rt_error(r, "OverflowError",
                          "Range too big. The sandbox blocks ranges larger than MAX_RANGE (%d).",
                          MAX_RANGE);
        tval *l = tv_list(A, (size_t)cnt);
        for (uint64_t k = 0; k < cnt; k++) /* st + k * step lies between st and en */
            tv_list_push(A, l, tv_int(A, (int64_t)((uint64_t)st + k * (uint64_t)step)));
        return l;
    }
    case FN_NAMESPACE:
    case FN_DICT: {
        tval *d = tv_dict(A, fn->u.fn.id == FN_NAMESPACE ? TV_NS : TV_DICT);
        for (size_t i = 0; i < a->npos; i++) {
            tval *src = a->pos[i];
            if (src->type == TV_DICT || src->type == TV_NS) {
                for (size_t k = 0; k < src->u.d.n; k++)
                    tv_dict_set(A, d, src->u.d.k[k], tmpl_ns_value(r, src->u.d.v[k]));
            } else if (src->type == TV_LIST) {
                for (size_t k = 0; k < src->u.l.n; k++) {
                    tval *p = src->u.l.v[k];
                    if (p->type != TV_LIST || p->u.l.n != 2)
                        tmpl_rt_error(r, "TypeError",
                                      "dict update sequence element has wrong length");
                    tv_dict_set(A, d, p->u.l.v[0], p->u.l.v[1]);
                }
            } else {
                tmpl_rt_error(r, "TypeError", "'%s' object is not iterable", tv_type_name(src));
            }
        }
        for (size_t i = 0; i < a->nkw; i++)
            tv_dict_set(A, d, tv_cstr(A, a->kwn[i]), a->kwv[i]);
        return d;
    }
    case FN_RAISE: {
        tval *msg = a->npos ? tmpl_str_of(r, a->pos[0]) : tv_cstr(A, "");
        tmpl_rt_error(r, "TemplateError", "%.*s", (int)(msg->u.s.n > 500 ? 500 : msg->u.s.n),
                      msg->u.s.p);
    }
    case FN_STRFTIME:
        if (a->npos != 1) tmpl_rt_error(r, "TypeError", "strftime_now() takes 1 argument");
        return strftime_now(r, a->pos[0]);
    case FN_CYCLER: {
        tval *c = tv_new(A, TV_CYCLER);
        c->u.cyc.items = tv_list(A, 0);
        for (size_t i = 0; i < a->npos; i++)
            tv_list_push(A, c->u.cyc.items, a->pos[i]);
        return c;
    }
    case FN_JOINER: {
        tval *j = tv_new(A, TV_JOINER);
        tval *sep = tmpl_kwarg(a, "sep", 0);
        j->u.cyc.items = sep ? tmpl_str_of(r, sep) : tv_cstr(A, ", ");
        j->u.cyc.pos = 0;
        return j;
    }
    case FN_METHOD:
        break;
    default:
        tmpl_rt_error(r, "TypeError", "object is not callable");
    }
    switch (self->type) {
    case TV_STR:
        return tmpl_str_method(r, self, m, a);
    case TV_DICT:
        if (!strcmp(m, "items")) return tmpl_dict_items(r, self);
        if (!strcmp(m, "keys")) return tmpl_to_list(r, self);
        if (!strcmp(m, "values")) {
            tval *l = tv_list(A, self->u.d.n);
            for (size_t i = 0; i < self->u.d.n; i++)
                l->u.l.v[i] = self->u.d.v[i];
            l->u.l.n = self->u.d.n;
            return l;
        }
        if (!strcmp(m, "get")) {
            if (a->npos < 1)
                tmpl_rt_error(r, "TypeError", "get expected at least 1 argument, got 0");
            tval *v = tv_dict_getv(self, a->pos[0]);
            return v ? v : a->npos > 1 ? a->pos[1] : &tmpl_none;
        }
        if (!strcmp(m, "copy")) {
            tval *d = tv_dict(A, TV_DICT);
            for (size_t i = 0; i < self->u.d.n; i++)
                tv_dict_set(A, d, self->u.d.k[i], self->u.d.v[i]);
            return d;
        }
        break;
    case TV_LIST:
        if (!strcmp(m, "copy")) return tmpl_binop(r, "+", self, tv_list(A, 0));
        if (!strcmp(m, "count") || !strcmp(m, "index")) {
            if (a->npos < 1) tmpl_rt_error(r, "TypeError", "%s() takes exactly one argument", m);
            int64_t c = 0;
            for (size_t i = 0; i < self->u.l.n; i++)
                if (tv_equal(self->u.l.v[i], a->pos[0])) {
                    if (m[0] == 'i') return tv_int(A, (int64_t)i);
                    c++;
                }
            if (m[0] == 'i') tmpl_rt_error(r, "ValueError", "value is not in list");
            return tv_int(A, c);
        }
        break;
    case TV_LOOP:
        if (!strcmp(m, "cycle")) {
            if (a->npos == 0) tmpl_rt_error(r, "TypeError", "no items for cycling given");
            return a->pos[self->u.loop->index0 % (int64_t)a->npos];
        }
        return &tmpl_true; /* changed(): approximate */
    case TV_CYCLER: {
        tval *items = self->u.cyc.items;
        if (!strcmp(m, "reset")) {
            self->u.cyc.pos = 0;
            return &tmpl_none;
        }
        if (!items->u.l.n) return &tmpl_none;
        tval *v = items->u.l.v[self->u.cyc.pos % (int64_t)items->u.l.n];
        self->u.cyc.pos = (self->u.cyc.pos + 1) % (int64_t)items->u.l.n;
        return v;
    }
    default:
        break;
    }
    tmpl_rt_error(r, "TypeError", "'%s' object has no callable attribute '%s'", tv_type_name(self),
                  m);
}

/* ---- tests ------------------------------------------------------------------------------- */
static const char *const test_names[] = {
    "defined", "undefined", "none",        "string",      "mapping", "iterable", "sequence",
    "number",  "integer",   "float",       "boolean",     "true",    "false",    "callable",
    "odd",     "even",      "divisibleby", "eq",          "equalto", "==",       "ne",
    "!=",      "lt",        "<",           "le",          "<=",      "gt",       ">",
    "ge",      ">=",        "lessthan",    "greaterthan", "in",      "sameas",   "lower",
    "upper",   "escaped",   "filter",      "test"};

bool tmpl_has_test(const char *name)
{
    return tmpl_in_set(test_names, FORGE_ARRAY_LEN(test_names), name, strlen(name));
}

bool tmpl_call_test(tmpl_render *r, const char *name, tval *v, targs *a)
{
    tval *a0 = a->npos ? a->pos[0] : NULL;
    int t = v->type;
    if (!strcmp(name, "defined")) return t != TV_UNDEF;
    if (!strcmp(name, "undefined")) return t == TV_UNDEF;
    if (!strcmp(name, "none")) return t == TV_NONE;
    if (!strcmp(name, "string")) return t == TV_STR;
    if (!strcmp(name, "mapping")) return t == TV_DICT;
    if (!strcmp(name, "iterable"))
        return t == TV_LIST || t == TV_DICT || t == TV_STR || t == TV_UNDEF;
    if (!strcmp(name, "sequence"))
        return t == TV_LIST || t == TV_DICT || t == TV_STR || t == TV_UNDEF;
    if (!strcmp(name, "number")) return t == TV_INT || t == TV_FLOAT || t == TV_BOOL;
    if (!strcmp(name, "integer")) return t == TV_INT;
    if (!strcmp(name, "float")) return t == TV_FLOAT;
    if (!strcmp(name, "boolean")) return t == TV_BOOL;
    if (!strcmp(name, "true")) return t == TV_BOOL && v->u.b;
    if (!strcmp(name, "false")) return t == TV_BOOL && !v->u.b;
    if (!strcmp(name, "callable"))
        return t == TV_MACRO || t == TV_FUNC || t == TV_LOOP || t == TV_JOINER;
    if (!strcmp(name, "escaped")) return false;
    if (!strcmp(name, "odd") || !strcmp(name, "even")) {
        if (t == TV_UNDEF) tmpl_undef_fail(r, v);
        if (v->type == TV_FLOAT) {
            double m = fmod(v->u.f, 2.0);
            if (m < 0) m += 2.0;
            return name[0] == 'o' ? m == 1.0 : m == 0.0;
        }
        if (!tmpl_is_intlike(v))
            tmpl_rt_error(r, "TypeError", "not all arguments converted during string formatting");
        int64_t i = tmpl_as_i(v);
        return name[0] == 'o' ? (i % 2 != 0) : (i % 2 == 0);
    }
    if (!strcmp(name, "divisibleby")) {
        if (!a0) tmpl_rt_error(r, "TypeError", "divisibleby needs an argument");
        tval *m = tmpl_binop(r, "%", v, a0);
        return !tv_truthy(m);
    }
    if (!strcmp(name, "lower") || !strcmp(name, "upper")) /* str(value).islower() */
        return tv_truthy(
            tmpl_str_method(r, tmpl_str_of(r, v), name[0] == 'l' ? "islower" : "isupper", a));
    if (!strcmp(name, "filter"))
        return a0 && a0->type == TV_STR && tmpl_has_filter(tmpl_str_of(r, a0)->u.s.p);
    if (!strcmp(name, "test"))
        return a0 && a0->type == TV_STR && tmpl_has_test(tmpl_str_of(r, a0)->u.s.p);
    if (!a0) tmpl_rt_error(r, "TypeError", "test '%s' needs an argument", name);
    if (!strcmp(name, "eq") || !strcmp(name, "equalto") || !strcmp(name, "=="))
        return tv_equal(v, a0);
    if (!strcmp(name, "ne") || !strcmp(name, "!=")) return !tv_equal(v, a0);
    if (!strcmp(name, "sameas")) {
        if (v == a0) return true;
        if ((t == TV_NONE || t == TV_BOOL || t == TV_UNDEF) && t == a0->type)
            return tv_equal(v, a0);
        if (t == TV_INT && a0->type == TV_INT) /* CPython caches small ints */
            return v->u.i == a0->u.i && v->u.i >= -5 && v->u.i <= 256;
        return false;
    }
    if (!strcmp(name, "in")) {
        tval *c = a0;
        if (c->type == TV_STR) {
            if (t != TV_STR)
                tmpl_rt_error(r, "TypeError",
                              "'in <string>' requires string as left operand, not %s",
                              tv_type_name(v));
            return memfind(c->u.s.p, c->u.s.n, v->u.s.p, v->u.s.n) != NULL;
        }
        if (c->type == TV_DICT || c->type == TV_NS) return tv_dict_getv(c, v) != NULL;
        if (c->type == TV_UNDEF) return false;
        tval *items = tmpl_to_list(r, c);
        for (size_t i = 0; i < items->u.l.n; i++)
            if (tv_equal(v, items->u.l.v[i])) return true;
        return false;
    }
    const char *op = NULL;
    if (!strcmp(name, "lt") || !strcmp(name, "<") || !strcmp(name, "lessthan")) op = "<";
    if (!strcmp(name, "le") || !strcmp(name, "<=")) op = "<=";
    if (!strcmp(name, "gt") || !strcmp(name, ">") || !strcmp(name, "greaterthan")) op = ">";
    if (!strcmp(name, "ge") || !strcmp(name, ">=")) op = ">=";
    if (op) {
        if (t == TV_UNDEF) tmpl_undef_fail(r, v);
        if (a0->type == TV_UNDEF) tmpl_undef_fail(r, a0);
        int c;
        if (!tv_compare(v, a0, &c))
            tmpl_rt_error(r, "TypeError", "'%s' not supported between instances of '%s' and '%s'",
                          op, tv_type_name(v), tv_type_name(a0));
        return op[0] == '<' ? (op[1] ? c <= 0 : c < 0) : (op[1] ? c >= 0 : c > 0);
    }
    tmpl_rt_error(r, "TemplateAssertionError", "No test named '%s'.", name);
}
