/* tmpl_builtins.c - what templates can call: Jinja2 filters and tests, Python str/dict/list
 * methods allowed by the immutable sandbox, attribute and item lookup, arithmetic, and the
 * globals range/namespace/dict/cycler/joiner/raise_exception/strftime_now. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <utf8proc.h>

#include "template/tmpl.h"

#define MAX_RANGE 100000 /* jinja2.sandbox.MAX_RANGE */

tval *tmpl_loop_recurse(tmpl_render *r, tval *loopv, tval *items);

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

static bool str_eq(const tval *v, const char *s)
{
    size_t n = strlen(s);
    return v->type == TV_STR && v->u.s.n == n && !memcmp(v->u.s.p, s, n);
}

_Noreturn static void undef_fail(tmpl_render *r, const tval *u)
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
    case TV_NONE: return "None";
    case TV_NS: return "jinja2.utils.Namespace object";
    default: {
        const char *t = tv_type_name(v);
        char *s = tmpl_alloc(A, strlen(t) + 8);
        sprintf(s, "%s object", t);
        return s;
    }
    }
}

static tval *missing(tmpl_render *r, const tval *obj, const char *what, size_t n, bool element)
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
    case TV_LIST: return v;
    case TV_UNDEF: return tv_list(A, 0);
    case TV_DICT: {
        tval *l = tv_list(A, v->u.d.n);
        for (size_t i = 0; i < v->u.d.n; i++) l->u.l.v[i] = v->u.d.k[i];
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
    } g[] = {{"range", FN_RANGE},           {"namespace", FN_NAMESPACE},
             {"dict", FN_DICT},             {"raise_exception", FN_RAISE},
             {"strftime_now", FN_STRFTIME}, {"cycler", FN_CYCLER},
             {"joiner", FN_JOINER}};
    for (size_t i = 0; i < FORGE_ARRAY_LEN(g); i++)
        if (!strcmp(name, g[i].name)) return func(r, g[i].id, NULL, g[i].name);
    return NULL;
}

/* ---- attribute / item lookup ------------------------------------------------------------- */
static const char *const str_methods[] = {
    "strip",   "lstrip",  "rstrip",     "split",        "rsplit",    "startswith", "endswith",
    "upper",   "lower",   "title",      "capitalize",   "replace",   "find",       "rfind",
    "index",   "count",   "join",       "format",       "splitlines", "isdigit",   "isalpha",
    "isalnum", "isspace", "islower",    "isupper",      "zfill",     "center",     "ljust",
    "rjust",   "removeprefix", "removesuffix", "swapcase", "casefold", "isnumeric", "isdecimal",
    "partition", "rpartition", "expandtabs", "istitle"};
static const char *const dict_methods[] = {"items", "keys", "values", "get", "copy"};
static const char *const list_methods[] = {"index", "count", "copy"};
static const char *const unsafe_methods[] = {"append", "extend", "insert", "pop", "remove",
                                             "clear",  "sort",   "reverse", "update",
                                             "setdefault", "popitem", "add", "discard"};

static bool in_set(const char *const *set, size_t n, const char *name, size_t len)
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
    return missing(r, lv, name, strlen(name), false);
}

tval *tmpl_get_attr(tmpl_render *r, tval *obj, const char *name, size_t n)
{
    const char *nm = tmpl_strndup(A, name, n);
    switch (obj->type) {
    case TV_UNDEF: undef_fail(r, obj);
    case TV_DICT:
        if (in_set(dict_methods, FORGE_ARRAY_LEN(dict_methods), name, n))
            return func(r, FN_METHOD, obj, nm);
        if (in_set(unsafe_methods, FORGE_ARRAY_LEN(unsafe_methods), name, n))
            return func(r, FN_UNSAFE, obj, nm);
        {
            tval *v = tv_dict_get(obj, name, n);
            if (v) return v;
        }
        return missing(r, obj, name, n, false);
    case TV_NS: {
        tval *v = tv_dict_get(obj, name, n);
        return v ? v : missing(r, obj, name, n, false);
    }
    case TV_STR:
        if (in_set(str_methods, FORGE_ARRAY_LEN(str_methods), name, n))
            return func(r, FN_METHOD, obj, nm);
        return missing(r, obj, name, n, false);
    case TV_LIST:
        if (in_set(list_methods, FORGE_ARRAY_LEN(list_methods), name, n))
            return func(r, FN_METHOD, obj, nm);
        if (in_set(unsafe_methods, FORGE_ARRAY_LEN(unsafe_methods), name, n))
            return func(r, FN_UNSAFE, obj, nm);
        return missing(r, obj, name, n, false);
    case TV_LOOP: return loop_attr(r, obj, nm);
    case TV_CYCLER:
        if (!strcmp(nm, "next") || !strcmp(nm, "reset")) return func(r, FN_METHOD, obj, nm);
        if (!strcmp(nm, "current")) {
            tval *items = obj->u.cyc.items;
            return items->u.l.n ? items->u.l.v[obj->u.cyc.pos % (int64_t)items->u.l.n]
                                : &tmpl_none;
        }
        return missing(r, obj, name, n, false);
    default: return missing(r, obj, name, n, false);
    }
}

tval *tmpl_get_item(tmpl_render *r, tval *obj, tval *key)
{
    switch (obj->type) {
    case TV_UNDEF: undef_fail(r, obj);
    case TV_DICT: {
        tval *v = tv_dict_getv(obj, key);
        if (v) return v;
        break;
    }
    case TV_NS: {
        tval *v = tv_dict_getv(obj, key);
        if (v) return v;
        break;
    }
    case TV_LIST:
        if (key->type == TV_INT || key->type == TV_BOOL) {
            int64_t i = key->type == TV_BOOL ? key->u.b : key->u.i;
            if (i < 0) i += (int64_t)obj->u.l.n;
            if (i >= 0 && i < (int64_t)obj->u.l.n) return obj->u.l.v[i];
            char tmp[32];
            snprintf(tmp, sizeof tmp, "%lld", (long long)(key->type == TV_BOOL ? key->u.b : key->u.i));
            return missing(r, obj, tmp, strlen(tmp), true);
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
    default: break;
    }
    if (key->type == TV_STR) return tmpl_get_attr(r, obj, key->u.s.p, key->u.s.n);
    tval *ks = tmpl_str_of(r, key);
    return missing(r, obj, ks->u.s.p, ks->u.s.n, false);
}

/* attribute path "a.b.0" as used by map/selectattr/sort/join/sum */
static tval *attr_path(tmpl_render *r, tval *obj, tval *attr)
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
static bool is_intlike(const tval *v)
{
    return v->type == TV_INT || v->type == TV_BOOL;
}

static int64_t as_i(const tval *v)
{
    return v->type == TV_BOOL ? v->u.b : v->u.i;
}

static double as_f(const tval *v)
{
    return v->type == TV_FLOAT ? v->u.f : (double)as_i(v);
}

static bool is_number(const tval *v)
{
    return is_intlike(v) || v->type == TV_FLOAT;
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
        for (int64_t i = 0; i < times; i++) memcpy(p + (size_t)i * seq->u.s.n, seq->u.s.p, seq->u.s.n);
        return tv_str_nocopy(A, p, (size_t)total);
    }
    uint64_t total;
    if (!forge_mul_u64(seq->u.l.n, (uint64_t)times, &total) || total > 10000000)
        tmpl_raise(r->fail, FORGE_E_RANGE, r->line, "LimitError", "list repetition too long");
    tval *l = tv_list(A, (size_t)total);
    for (int64_t i = 0; i < times; i++)
        for (size_t k = 0; k < seq->u.l.n; k++) tv_list_push(A, l, seq->u.l.v[k]);
    l->is_tuple = seq->is_tuple;
    return l;
}

static tval *percent_format(tmpl_render *r, tval *fmt, tval *args);

tval *tmpl_binop(tmpl_render *r, const char *op, tval *a, tval *b)
{
    if (a->type == TV_UNDEF) undef_fail(r, a);
    if (b->type == TV_UNDEF) undef_fail(r, b);
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
        for (size_t i = 0; i < a->u.l.n; i++) tv_list_push(A, l, a->u.l.v[i]);
        for (size_t i = 0; i < b->u.l.n; i++) tv_list_push(A, l, b->u.l.v[i]);
        l->is_tuple = a->is_tuple && b->is_tuple;
        if (a->is_tuple != b->is_tuple)
            tmpl_rt_error(r, "TypeError", "can only concatenate %s (not \"%s\") to %s",
                          tv_type_name(a), tv_type_name(b), tv_type_name(a));
        return l;
    }
    if (o == '*' && !dbl && (a->type == TV_STR || a->type == TV_LIST) && is_intlike(b))
        return repeat(r, a, as_i(b));
    if (o == '*' && !dbl && (b->type == TV_STR || b->type == TV_LIST) && is_intlike(a))
        return repeat(r, b, as_i(a));
    if (o == '%' && a->type == TV_STR) return percent_format(r, a, b);
    if (!is_number(a) || !is_number(b)) {
        if (o == '+' && a->type == TV_STR)
            tmpl_rt_error(r, "TypeError", "can only concatenate str (not \"%s\") to str",
                          tv_type_name(b));
        tmpl_rt_error(r, "TypeError", "unsupported operand type(s) for %s: '%s' and '%s'", op,
                      tv_type_name(a), tv_type_name(b));
    }
    bool ints = is_intlike(a) && is_intlike(b);
    if (ints && !(o == '/' && !dbl)) {
        int64_t x = as_i(a), y = as_i(b), z = 0;
        bool ok = true;
        switch (o) {
        case '+': ok = !__builtin_add_overflow(x, y, &z); break;
        case '-': ok = !__builtin_sub_overflow(x, y, &z); break;
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
                              o == '%' ? "integer modulo by zero" : "integer division or modulo by zero");
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
    double x = as_f(a), y = as_f(b);
    switch (o) {
    case '+': return tv_float(A, x + y);
    case '-': return tv_float(A, x - y);
    case '*': return tv_float(A, dbl ? pow(x, y) : x * y);
    case '/':
        if (y == 0) tmpl_rt_error(r, "ZeroDivisionError", dbl ? "float floor division by zero" : "division by zero");
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

/* "%s" % args (printf-style string formatting, the common conversions) */
static tval *percent_format(tmpl_render *r, tval *fmt, tval *args)
{
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
            if (ai >= args->u.l.n) tmpl_rt_error(r, "TypeError", "not enough arguments for format string");
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
            if (!is_number(arg))
                tmpl_rt_error(r, "TypeError", "%%%c format: a real number is required, not %s",
                              conv, tv_type_name(arg));
            spec[sl] = 0;
            char f2[24];
            if (conv == 'd' || conv == 'i' || conv == 'x') {
                snprintf(f2, sizeof f2, "%sll%c", spec, conv == 'x' ? 'x' : 'd');
                tmpl_buf_printf(&b, f2, (long long)(arg->type == TV_FLOAT ? (int64_t)arg->u.f : as_i(arg)));
            } else {
                snprintf(f2, sizeof f2, "%s%c", spec, conv);
                tmpl_buf_printf(&b, f2, as_f(arg));
            }
        } else {
            tmpl_rt_error(r, "ValueError", "unsupported format character '%c'", conv);
        }
    }
    if (!single && ai < args->u.l.n)
        tmpl_rt_error(r, "TypeError", "not all arguments converted during string formatting");
    return tv_str_nocopy(A, b.p ? b.p : "", b.n);
}

/* ---- string helpers ---------------------------------------------------------------------- */
typedef uint32_t (*cp_map)(uint32_t);
static uint32_t cp_upper(uint32_t c)
{
    return (uint32_t)utf8proc_toupper((utf8proc_int32_t)c);
}
static uint32_t cp_lower(uint32_t c)
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
static tval *str_map(tmpl_render *r, const tval *s, cp_map f, int mode)
{
    char *out = tmpl_alloc(A, s->u.s.n * 2 + 8);
    size_t o = 0, i = 0;
    bool prev_cased = false, first = true, word_start = true;
    while (i < s->u.s.n) {
        uint32_t cp;
        i += tmpl_utf8_decode(s->u.s.p + i, s->u.s.n - i, &cp);
        uint32_t m = cp;
        if (mode == 0 && f == cp_upper && cp == 0xDF) { /* Python: 'ß'.upper() == 'SS' */
            out[o++] = 'S';
            m = 'S';
        } else if (mode == 0)
            m = f(cp);
        else if (mode == 1)
            m = first ? cp_upper(cp) : cp_lower(cp);
        else if (mode == 2) {
            if (cp_is_cased(cp))
                m = prev_cased ? cp_lower(cp) : cp_title(cp);
            prev_cased = cp_is_cased(cp);
        } else if (mode == 3) {
            bool sep = tmpl_py_isspace(cp) || cp == '-' || cp == '(' || cp == '{' || cp == '[' ||
                       cp == '<';
            if (sep) {
                word_start = true;
            } else {
                m = word_start ? cp_upper(cp) : cp_lower(cp);
                word_start = false;
            }
        } else if (mode == 4) {
            m = cp_is_upper(cp) ? cp_lower(cp) : cp_is_lower(cp) ? cp_upper(cp) : cp;
        }
        first = false;
        o += tmpl_utf8_encode(m, out + o);
    }
    return tv_str_nocopy(A, out, o);
}

static bool cp_in(uint32_t cp, const tval *chars)
{
    size_t i = 0;
    while (i < chars->u.s.n) {
        uint32_t c;
        i += tmpl_utf8_decode(chars->u.s.p + i, chars->u.s.n - i, &c);
        if (c == cp) return true;
    }
    return false;
}

/* strip: which 1 = left, 2 = right, 3 = both; chars NULL = whitespace */
static tval *str_strip(tmpl_render *r, const tval *s, const tval *chars, int which)
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
            while (st > a && ((unsigned char)p[st] & 0xC0) == 0x80 && b - st < 4) st--;
            uint32_t cp;
            size_t k = tmpl_utf8_decode(p + st, b - st, &cp);
            if (k != b - st) cp = (unsigned char)p[b - 1], st = b - 1;
            if (chars ? !cp_in(cp, chars) : !tmpl_py_isspace(cp)) break;
            b = st;
        }
    }
    return tv_str_nocopy(A, p + a, b - a);
}

static const char *memfind(const char *h, size_t hn, const char *n, size_t nn)
{
    if (nn == 0) return h;
    if (nn > hn) return NULL;
    for (size_t i = 0; i + nn <= hn; i++)
        if (h[i] == n[0] && !memcmp(h + i, n, nn)) return h + i;
    return NULL;
}

static const char *memrfind(const char *h, size_t hn, const char *n, size_t nn)
{
    if (nn > hn) return NULL;
    for (size_t i = hn - nn + 1; i-- > 0;)
        if (!memcmp(h + i, n, nn)) return h + i;
    return NULL;
}

static tval *str_replace(tmpl_render *r, const tval *s, const tval *old, const tval *new_,
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
        const char *f = (count < 0 || done < count) ? memfind(p, (size_t)(end - p), old->u.s.p, old->u.s.n) : NULL;
        if (!f) break;
        tmpl_buf_put(&b, p, (size_t)(f - p));
        tmpl_buf_put(&b, new_->u.s.p, new_->u.s.n);
        p = f + old->u.s.n;
        done++;
    }
    tmpl_buf_put(&b, p, (size_t)(end - p));
    return tv_str_nocopy(A, b.p ? b.p : "", b.n);
}

static tval *str_split(tmpl_render *r, const tval *s, const tval *sep, int64_t maxsplit, bool right)
{
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
                while (e > 0 && tmpl_py_isspace((unsigned char)p[e - 1])) e--;
                if (e == 0) break;
                if (maxsplit >= 0 && done >= maxsplit) {
                    tv_list_push(A, rev, tv_str_nocopy(A, p, e));
                    break;
                }
                size_t st = e;
                while (st > 0 && !tmpl_py_isspace((unsigned char)p[st - 1])) st--;
                tv_list_push(A, rev, tv_str_nocopy(A, p + st, e - st));
                done++;
                e = st;
            }
            for (size_t i = rev->u.l.n; i-- > 0;) tv_list_push(A, l, rev->u.l.v[i]);
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
                while (e > i && tmpl_py_isspace((unsigned char)p[e - 1])) e--;
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
            const char *f = (maxsplit < 0 || done < maxsplit) ? memrfind(p, e, sep->u.s.p, sep->u.s.n) : NULL;
            if (!f) {
                tv_list_push(A, rev, tv_str_nocopy(A, p, e));
                break;
            }
            size_t st = (size_t)(f - p) + sep->u.s.n;
            tv_list_push(A, rev, tv_str_nocopy(A, p + st, e - st));
            e = (size_t)(f - p);
            done++;
        }
        for (size_t i = rev->u.l.n; i-- > 0;) tv_list_push(A, l, rev->u.l.v[i]);
        return l;
    }
    size_t i = 0;
    int64_t done = 0;
    for (;;) {
        const char *f = (maxsplit < 0 || done < maxsplit) ? memfind(p + i, n - i, sep->u.s.p, sep->u.s.n) : NULL;
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

static tval *join_list(tmpl_render *r, tval *items, const tval *sep, tval *attribute)
{
    tmpl_buf b = {.limit = r->max_output, .fail = r->fail, .arena = A};
    for (size_t i = 0; i < items->u.l.n; i++) {
        if (i && sep) tmpl_buf_put(&b, sep->u.s.p, sep->u.s.n);
        tval *v = items->u.l.v[i];
        if (attribute) v = attr_path(r, v, attribute);
        tv_to_str(&b, v);
    }
    return tv_str_nocopy(A, b.p ? b.p : "", b.n);
}

static tval *need_str(tmpl_render *r, tval *v, const char *what)
{
    if (!v || v->type != TV_STR)
        tmpl_rt_error(r, "TypeError", "%s must be str, not %s", what, v ? tv_type_name(v) : "nothing");
    return v;
}

static int64_t need_int(tmpl_render *r, tval *v, const char *what)
{
    if (!v || !is_intlike(v))
        tmpl_rt_error(r, "TypeError", "%s must be an integer, not %s", what,
                      v ? tv_type_name(v) : "nothing");
    return as_i(v);
}

static bool affix_match(tmpl_render *r, const tval *s, tval *aff, bool end)
{
    if (aff->type == TV_LIST && aff->is_tuple) {
        for (size_t i = 0; i < aff->u.l.n; i++)
            if (affix_match(r, s, aff->u.l.v[i], end)) return true;
        return false;
    }
    need_str(r, aff, end ? "endswith arg" : "startswith arg");
    if (aff->u.s.n > s->u.s.n) return false;
    return !memcmp(s->u.s.p + (end ? s->u.s.n - aff->u.s.n : 0), aff->u.s.p, aff->u.s.n);
}

static bool all_cp(const tval *s, bool (*pred)(uint32_t))
{
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

static tval *pad(tmpl_render *r, tval *s, int64_t width, tval *fill, int where)
{
    int64_t len = (int64_t)tmpl_utf8_len(s->u.s.p, s->u.s.n);
    if (width <= len) return s;
    if (width > (int64_t)r->max_output) tmpl_rt_error(r, "LimitError", "width too large");
    const char *f = " ";
    size_t fl = 1;
    if (fill) {
        need_str(r, fill, "fill character");
        f = fill->u.s.p;
        fl = fill->u.s.n;
    }
    int64_t total = width - len, left = where == 0 ? 0 : where == 2 ? total : total / 2 + (total & width & 1);
    tmpl_buf b = {.limit = r->max_output, .fail = r->fail, .arena = A};
    for (int64_t i = 0; i < left; i++) tmpl_buf_put(&b, f, fl);
    tmpl_buf_put(&b, s->u.s.p, s->u.s.n);
    for (int64_t i = left; i < total; i++) tmpl_buf_put(&b, f, fl);
    return tv_str_nocopy(A, b.p, b.n);
}

/* str.format with {} / {0} / {name} fields */
static tval *str_format(tmpl_render *r, tval *s, targs *args)
{
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
                if (auto_i >= args->npos) tmpl_rt_error(r, "IndexError", "Replacement index %zu out of range for positional args tuple", auto_i);
                v = args->pos[auto_i++];
            } else if (f[0] >= '0' && f[0] <= '9') {
                size_t k = (size_t)strtoul(f, NULL, 10);
                if (k >= args->npos) tmpl_rt_error(r, "IndexError", "Replacement index %zu out of range for positional args tuple", k);
                v = args->pos[k];
            } else {
                for (size_t k = 0; k < args->nkw; k++)
                    if (strlen(args->kwn[k]) == fl && !memcmp(args->kwn[k], f, fl)) v = args->kwv[k];
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

static tval *str_method(tmpl_render *r, tval *s, const char *m, targs *a)
{
    tval *a0 = a->npos > 0 ? a->pos[0] : NULL;
    tval *a1 = a->npos > 1 ? a->pos[1] : NULL;
    if (!strcmp(m, "strip") || !strcmp(m, "lstrip") || !strcmp(m, "rstrip")) {
        tval *chars = tmpl_kwarg(a, "chars", 0);
        if (chars && chars->type == TV_NONE) chars = NULL;
        if (chars) need_str(r, chars, "strip arg");
        return str_strip(r, s, chars, m[0] == 'l' ? 1 : m[0] == 'r' ? 2 : 3);
    }
    if (!strcmp(m, "split") || !strcmp(m, "rsplit")) {
        tval *sep = tmpl_kwarg(a, "sep", 0), *mx = tmpl_kwarg(a, "maxsplit", 1);
        return str_split(r, s, sep, mx ? need_int(r, mx, "maxsplit") : -1, m[0] == 'r');
    }
    if (!strcmp(m, "startswith") || !strcmp(m, "endswith")) {
        if (!a0) tmpl_rt_error(r, "TypeError", "%s() takes at least 1 argument (0 given)", m);
        tval *sub = s;
        if (a1) {
            tmpl_render *rr = r;
            targs sa = {.pos = &a1, .npos = 1};
            (void)sa;
            int64_t start = need_int(rr, a1, "start");
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
    if (!strcmp(m, "upper")) return str_map(r, s, cp_upper, 0);
    if (!strcmp(m, "lower") || !strcmp(m, "casefold")) return str_map(r, s, cp_lower, 0);
    if (!strcmp(m, "title")) return str_map(r, s, NULL, 2);
    if (!strcmp(m, "capitalize")) return str_map(r, s, NULL, 1);
    if (!strcmp(m, "swapcase")) return str_map(r, s, NULL, 4);
    if (!strcmp(m, "replace")) {
        tval *cnt = a->npos > 2 ? a->pos[2] : tmpl_kwarg(a, "count", (size_t)-1);
        return str_replace(r, s, need_str(r, a0, "replace arg 1"), need_str(r, a1, "replace arg 2"),
                           cnt ? need_int(r, cnt, "count") : -1);
    }
    if (!strcmp(m, "find") || !strcmp(m, "rfind") || !strcmp(m, "index") || !strcmp(m, "count")) {
        need_str(r, a0, m);
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
        return join_list(r, items, s, NULL);
    }
    if (!strcmp(m, "format")) return str_format(r, s, a);
    if (!strcmp(m, "splitlines")) {
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
        if (m[2] == 't') return tv_bool(any && tv_equal(str_map(r, s, NULL, 2), s));
        return tv_bool(any && ok);
    }
    if (!strcmp(m, "zfill")) {
        int64_t w = need_int(r, a0, "zfill width");
        int64_t len = (int64_t)tmpl_utf8_len(s->u.s.p, s->u.s.n);
        if (w <= len) return s;
        if (w > (int64_t)r->max_output) tmpl_rt_error(r, "LimitError", "width too large");
        tmpl_buf b = {.limit = r->max_output, .fail = r->fail, .arena = A};
        size_t st = 0;
        if (s->u.s.n && (s->u.s.p[0] == '-' || s->u.s.p[0] == '+')) {
            tmpl_buf_putc(&b, s->u.s.p[0]);
            st = 1;
        }
        for (int64_t i = len; i < w; i++) tmpl_buf_putc(&b, '0');
        tmpl_buf_put(&b, s->u.s.p + st, s->u.s.n - st);
        return tv_str_nocopy(A, b.p, b.n);
    }
    if (!strcmp(m, "center") || !strcmp(m, "ljust") || !strcmp(m, "rjust"))
        return pad(r, s, need_int(r, a0, "width"), a1, m[0] == 'c' ? 1 : m[0] == 'l' ? 0 : 2);
    if (!strcmp(m, "removeprefix") || !strcmp(m, "removesuffix")) {
        need_str(r, a0, m);
        bool suf = m[6] == 's';
        if (affix_match(r, s, a0, suf))
            return tv_str_nocopy(A, s->u.s.p + (suf ? 0 : a0->u.s.n), s->u.s.n - a0->u.s.n);
        return s;
    }
    if (!strcmp(m, "partition") || !strcmp(m, "rpartition")) {
        need_str(r, a0, m);
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
        return str_replace(r, s, tab, sp, -1);
    }
    tmpl_rt_error(r, "TypeError", "str.%s is not supported", m);
}

static tval *dict_items(tmpl_render *r, tval *d)
{
    tval *l = tv_list(A, d->u.d.n);
    for (size_t i = 0; i < d->u.d.n; i++) {
        tval *t = tv_list(A, 2);
        t->is_tuple = true;
        t->u.l.v[0] = d->u.d.k[i];
        t->u.l.v[1] = d->u.d.v[i];
        t->u.l.n = 2;
        l->u.l.v[i] = t;
    }
    l->u.l.n = d->u.d.n;
    return l;
}

static tval *strftime_now(tmpl_render *r, tval *fmt)
{
    need_str(r, fmt, "strftime_now format");
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
            en = need_int(r, a->pos[0], "range stop");
        } else if (a->npos == 2 || a->npos == 3) {
            st = need_int(r, a->pos[0], "range start");
            en = need_int(r, a->pos[1], "range stop");
            if (a->npos == 3) step = need_int(r, a->pos[2], "range step");
        } else {
            tmpl_rt_error(r, "TypeError", "range expected 1 to 3 arguments, got %zu", a->npos);
        }
        if (step == 0) tmpl_rt_error(r, "ValueError", "range() arg 3 must not be zero");
        double cnt = step > 0 ? ceil(((double)en - (double)st) / (double)step)
                              : ceil(((double)st - (double)en) / (double)-step);
        if (cnt < 0) cnt = 0;
        if (cnt > MAX_RANGE)
            tmpl_rt_error(r, "OverflowError",
                          "Range too big. The sandbox blocks ranges larger than MAX_RANGE (%d).",
                          MAX_RANGE);
        tval *l = tv_list(A, (size_t)cnt);
        for (int64_t i = st; step > 0 ? i < en : i > en; i += step) tv_list_push(A, l, tv_int(A, i));
        return l;
    }
    case FN_NAMESPACE:
    case FN_DICT: {
        tval *d = tv_dict(A, fn->u.fn.id == FN_NAMESPACE ? TV_NS : TV_DICT);
        for (size_t i = 0; i < a->npos; i++) {
            tval *src = a->pos[i];
            if (src->type == TV_DICT || src->type == TV_NS) {
                for (size_t k = 0; k < src->u.d.n; k++) tv_dict_set(A, d, src->u.d.k[k], src->u.d.v[k]);
            } else if (src->type == TV_LIST) {
                for (size_t k = 0; k < src->u.l.n; k++) {
                    tval *p = src->u.l.v[k];
                    if (p->type != TV_LIST || p->u.l.n != 2)
                        tmpl_rt_error(r, "TypeError", "dict update sequence element has wrong length");
                    tv_dict_set(A, d, p->u.l.v[0], p->u.l.v[1]);
                }
            } else {
                tmpl_rt_error(r, "TypeError", "'%s' object is not iterable", tv_type_name(src));
            }
        }
        for (size_t i = 0; i < a->nkw; i++) tv_dict_set(A, d, tv_cstr(A, a->kwn[i]), a->kwv[i]);
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
        for (size_t i = 0; i < a->npos; i++) tv_list_push(A, c->u.cyc.items, a->pos[i]);
        return c;
    }
    case FN_JOINER: {
        tval *j = tv_new(A, TV_JOINER);
        tval *sep = tmpl_kwarg(a, "sep", 0);
        j->u.cyc.items = sep ? tmpl_str_of(r, sep) : tv_cstr(A, ", ");
        j->u.cyc.pos = 0;
        return j;
    }
    case FN_METHOD: break;
    default: tmpl_rt_error(r, "TypeError", "object is not callable");
    }
    switch (self->type) {
    case TV_STR: return str_method(r, self, m, a);
    case TV_DICT:
        if (!strcmp(m, "items")) return dict_items(r, self);
        if (!strcmp(m, "keys")) return tmpl_to_list(r, self);
        if (!strcmp(m, "values")) {
            tval *l = tv_list(A, self->u.d.n);
            for (size_t i = 0; i < self->u.d.n; i++) l->u.l.v[i] = self->u.d.v[i];
            l->u.l.n = self->u.d.n;
            return l;
        }
        if (!strcmp(m, "get")) {
            if (a->npos < 1) tmpl_rt_error(r, "TypeError", "get expected at least 1 argument, got 0");
            tval *v = tv_dict_getv(self, a->pos[0]);
            return v ? v : a->npos > 1 ? a->pos[1] : &tmpl_none;
        }
        if (!strcmp(m, "copy")) {
            tval *d = tv_dict(A, TV_DICT);
            for (size_t i = 0; i < self->u.d.n; i++) tv_dict_set(A, d, self->u.d.k[i], self->u.d.v[i]);
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
    default: break;
    }
    tmpl_rt_error(r, "TypeError", "'%s' object has no callable attribute '%s'", tv_type_name(self), m);
}

/* ---- tests ------------------------------------------------------------------------------- */
static const char *const test_names[] = {
    "defined", "undefined", "none",    "string",     "mapping", "iterable", "sequence",
    "number",  "integer",   "float",   "boolean",    "true",    "false",    "callable",
    "odd",     "even",      "divisibleby", "eq",     "equalto", "==",       "ne",
    "!=",      "lt",        "<",       "le",         "<=",      "gt",       ">",
    "ge",      ">=",        "lessthan", "greaterthan", "in",    "sameas",   "lower",
    "upper",   "escaped",   "filter",  "test"};

bool tmpl_has_test(const char *name)
{
    return in_set(test_names, FORGE_ARRAY_LEN(test_names), name, strlen(name));
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
    if (!strcmp(name, "iterable")) return t == TV_LIST || t == TV_DICT || t == TV_STR || t == TV_UNDEF;
    if (!strcmp(name, "sequence")) return t == TV_LIST || t == TV_DICT || t == TV_STR || t == TV_UNDEF;
    if (!strcmp(name, "number")) return t == TV_INT || t == TV_FLOAT || t == TV_BOOL;
    if (!strcmp(name, "integer")) return t == TV_INT;
    if (!strcmp(name, "float")) return t == TV_FLOAT;
    if (!strcmp(name, "boolean")) return t == TV_BOOL;
    if (!strcmp(name, "true")) return t == TV_BOOL && v->u.b;
    if (!strcmp(name, "false")) return t == TV_BOOL && !v->u.b;
    if (!strcmp(name, "callable")) return t == TV_MACRO || t == TV_FUNC || t == TV_LOOP || t == TV_JOINER;
    if (!strcmp(name, "escaped")) return false;
    if (!strcmp(name, "odd") || !strcmp(name, "even")) {
        if (t == TV_UNDEF) undef_fail(r, v);
        if (!is_intlike(v))
            tmpl_rt_error(r, "TypeError", "not all arguments converted during string formatting");
        int64_t i = as_i(v);
        return name[0] == 'o' ? (i % 2 != 0) : (i % 2 == 0);
    }
    if (!strcmp(name, "divisibleby")) {
        if (!a0) tmpl_rt_error(r, "TypeError", "divisibleby needs an argument");
        tval *m = tmpl_binop(r, "%", v, a0);
        return !tv_truthy(m);
    }
    if (!strcmp(name, "lower") || !strcmp(name, "upper")) {
        if (t != TV_STR) return false;
        tval *mapped = str_map(r, v, name[0] == 'l' ? cp_lower : cp_upper, 0);
        return tv_equal(mapped, v);
    }
    if (!strcmp(name, "filter")) return a0 && a0->type == TV_STR && tmpl_has_filter(tmpl_str_of(r, a0)->u.s.p);
    if (!strcmp(name, "test")) return a0 && a0->type == TV_STR && tmpl_has_test(tmpl_str_of(r, a0)->u.s.p);
    if (!a0) tmpl_rt_error(r, "TypeError", "test '%s' needs an argument", name);
    if (!strcmp(name, "eq") || !strcmp(name, "equalto") || !strcmp(name, "==")) return tv_equal(v, a0);
    if (!strcmp(name, "ne") || !strcmp(name, "!=")) return !tv_equal(v, a0);
    if (!strcmp(name, "sameas")) {
        if (v == a0) return true;
        if ((t == TV_NONE || t == TV_BOOL || t == TV_UNDEF) && t == a0->type) return tv_equal(v, a0);
        if (t == TV_INT && a0->type == TV_INT) /* CPython caches small ints */
            return v->u.i == a0->u.i && v->u.i >= -5 && v->u.i <= 256;
        return false;
    }
    if (!strcmp(name, "in")) {
        tval *c = a0;
        if (c->type == TV_STR) {
            if (t != TV_STR) tmpl_rt_error(r, "TypeError", "'in <string>' requires string as left operand, not %s", tv_type_name(v));
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
        if (t == TV_UNDEF) undef_fail(r, v);
        if (a0->type == TV_UNDEF) undef_fail(r, a0);
        int c;
        if (!tv_compare(v, a0, &c))
            tmpl_rt_error(r, "TypeError", "'%s' not supported between instances of '%s' and '%s'",
                          op, tv_type_name(v), tv_type_name(a0));
        return op[0] == '<' ? (op[1] ? c <= 0 : c < 0) : (op[1] ? c >= 0 : c > 0);
    }
    tmpl_rt_error(r, "TemplateAssertionError", "No test named '%s'.", name);
}

/* ---- filters ----------------------------------------------------------------------------- */
static const char *const filter_names[] = {
    "abs",      "attr",     "batch",     "capitalize", "center",     "count",      "d",
    "default",  "dictsort", "e",         "escape",     "first",      "float",      "forceescape",
    "format",   "indent",   "int",       "items",      "join",       "last",       "length",
    "list",     "lower",    "map",       "max",        "min",        "reject",     "rejectattr",
    "replace",  "reverse",  "round",     "safe",       "select",     "selectattr", "sort",
    "string",   "sum",      "title",     "tojson",     "trim",       "unique",     "upper",
    "wordcount", "striptags", "truncate", "groupby",   "pprint",     "urlencode",  "slice",
    "wordwrap", "xmlattr",  "filesizeformat"};

bool tmpl_has_filter(const char *name)
{
    return in_set(filter_names, FORGE_ARRAY_LEN(filter_names), name, strlen(name));
}

static tval *soft_str(tmpl_render *r, tval *v)
{
    return tmpl_str_of(r, v);
}

static tval *seq_of(tmpl_render *r, tval *v)
{
    return tmpl_to_list(r, v);
}

/* stable merge sort with Python-style ordering; keyfn applied per item */
static void sort_vals(tmpl_render *r, tval **v, size_t n, tval **keys, bool reverse)
{
    if (n < 2) return;
    size_t h = n / 2;
    sort_vals(r, v, h, keys, reverse);
    sort_vals(r, v + h, n - h, keys + h, reverse);
    tval **tv = tmpl_alloc(A, n * sizeof *tv), **tk = tmpl_alloc(A, n * sizeof *tk);
    size_t i = 0, j = h, o = 0;
    while (i < h && j < n) {
        int c;
        if (!tv_compare(keys[j], keys[i], &c))
            tmpl_rt_error(r, "TypeError", "'<' not supported between instances of '%s' and '%s'",
                          tv_type_name(keys[j]), tv_type_name(keys[i]));
        bool take_right = reverse ? c > 0 : c < 0;
        if (take_right) {
            tv[o] = v[j];
            tk[o++] = keys[j++];
        } else {
            tv[o] = v[i];
            tk[o++] = keys[i++];
        }
    }
    while (i < h) {
        tv[o] = v[i];
        tk[o++] = keys[i++];
    }
    while (j < n) {
        tv[o] = v[j];
        tk[o++] = keys[j++];
    }
    memcpy(v, tv, n * sizeof *tv);
    memcpy(keys, tk, n * sizeof *tk);
}

static tval *sort_key(tmpl_render *r, tval *v, bool case_sensitive)
{
    if (!case_sensitive && v->type == TV_STR) return str_map(r, v, cp_lower, 0);
    return v;
}

static tval *filter_select(tmpl_render *r, tscope *s, tval *v, targs *a, bool attr, bool select)
{
    tval *items = seq_of(r, v);
    tval *out = tv_list(A, 0);
    size_t base = attr ? 1 : 0;
    tval *attrname = attr ? (a->npos ? a->pos[0] : NULL) : NULL;
    if (attr && !attrname) tmpl_rt_error(r, "TypeError", "missing attribute name");
    const char *test = NULL;
    if (a->npos > base) test = need_str(r, a->pos[base], "test name")->u.s.p;
    targs ta = {0};
    if (a->npos > base + 1) {
        ta.pos = a->pos + base + 1;
        ta.npos = a->npos - base - 1;
    }
    for (size_t i = 0; i < items->u.l.n; i++) {
        tmpl_step(r);
        tval *x = items->u.l.v[i];
        if (attr) x = attr_path(r, x, attrname);
        bool ok = test ? tmpl_call_test(r, test, x, &ta) : tv_truthy(x);
        if (ok == select) tv_list_push(A, out, items->u.l.v[i]);
    }
    return out;
}

static void json_args(tmpl_render *r, targs *a, const char **indent, const char **isep,
                      const char **ksep, bool *sort_keys)
{
    /* transformers: tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) */
    tval *ind = tmpl_kwarg(a, "indent", 1);
    tval *seps = tmpl_kwarg(a, "separators", 2);
    tval *sk = tmpl_kwarg(a, "sort_keys", 3);
    tval *ea = tmpl_kwarg(a, "ensure_ascii", 0);
    if (ea && tv_truthy(ea))
        tmpl_rt_error(r, "TypeError", "tojson(ensure_ascii=True) is not supported");
    *indent = NULL;
    if (ind && ind->type != TV_NONE) {
        if (ind->type == TV_STR) {
            *indent = tmpl_strndup(A, ind->u.s.p, ind->u.s.n);
        } else {
            int64_t k = need_int(r, ind, "indent");
            if (k < 0) k = 0;
            if (k > 64) k = 64;
            char *sp = tmpl_alloc(A, (size_t)k + 1);
            memset(sp, ' ', (size_t)k);
            *indent = sp;
        }
    }
    *isep = *indent ? "," : ", ";
    *ksep = ": ";
    if (seps && seps->type != TV_NONE) {
        if (seps->type != TV_LIST || seps->u.l.n != 2 || seps->u.l.v[0]->type != TV_STR ||
            seps->u.l.v[1]->type != TV_STR)
            tmpl_rt_error(r, "ValueError", "separators must be a pair of strings");
        *isep = tmpl_strndup(A, seps->u.l.v[0]->u.s.p, seps->u.l.v[0]->u.s.n);
        *ksep = tmpl_strndup(A, seps->u.l.v[1]->u.s.p, seps->u.l.v[1]->u.s.n);
    }
    *sort_keys = sk && tv_truthy(sk);
}

static tval *sorted_keys_copy(tmpl_render *r, tval *v, int depth)
{
    if (depth > 200) return v;
    if (v->type == TV_DICT) {
        tval **keys = tmpl_alloc(A, (v->u.d.n + 1) * sizeof *keys);
        tval **vals = tmpl_alloc(A, (v->u.d.n + 1) * sizeof *vals);
        for (size_t i = 0; i < v->u.d.n; i++) {
            keys[i] = v->u.d.k[i];
            vals[i] = v->u.d.v[i];
        }
        tval **kk = tmpl_alloc(A, (v->u.d.n + 1) * sizeof *kk);
        memcpy(kk, keys, v->u.d.n * sizeof *kk);
        /* sort vals by keys: reuse sort_vals with the keys as both */
        tval **idx = tmpl_alloc(A, (v->u.d.n + 1) * sizeof *idx);
        for (size_t i = 0; i < v->u.d.n; i++) idx[i] = tv_int(A, (int64_t)i);
        sort_vals(r, idx, v->u.d.n, kk, false);
        tval *d = tv_dict(A, TV_DICT);
        for (size_t i = 0; i < v->u.d.n; i++) {
            size_t k = (size_t)idx[i]->u.i;
            tv_dict_set(A, d, keys[k], sorted_keys_copy(r, vals[k], depth + 1));
        }
        return d;
    }
    if (v->type == TV_LIST) {
        tval *l = tv_list(A, v->u.l.n);
        for (size_t i = 0; i < v->u.l.n; i++) tv_list_push(A, l, sorted_keys_copy(r, v->u.l.v[i], depth + 1));
        return l;
    }
    return v;
}

static tval *html_escape(tmpl_render *r, tval *s)
{
    tmpl_buf b = {.limit = r->max_output, .fail = r->fail, .arena = A};
    for (size_t i = 0; i < s->u.s.n; i++) {
        char c = s->u.s.p[i];
        switch (c) {
        case '&': tmpl_buf_puts(&b, "&amp;"); break;
        case '<': tmpl_buf_puts(&b, "&lt;"); break;
        case '>': tmpl_buf_puts(&b, "&gt;"); break;
        case '"': tmpl_buf_puts(&b, "&#34;"); break;
        case '\'': tmpl_buf_puts(&b, "&#39;"); break;
        default: tmpl_buf_putc(&b, c);
        }
    }
    return tv_str_nocopy(A, b.p ? b.p : "", b.n);
}

static tval *to_int(tmpl_render *r, tval *v, tval *def, int64_t base)
{
    if (v->type == TV_INT) return v;
    if (v->type == TV_BOOL) return tv_int(A, v->u.b);
    if (v->type == TV_FLOAT) {
        if (isnan(v->u.f) || isinf(v->u.f) || fabs(v->u.f) >= 9.2e18) return def;
        return tv_int(A, (int64_t)v->u.f);
    }
    if (v->type == TV_STR) {
        tval *s = str_strip(r, v, NULL, 3);
        char *t = tmpl_strndup(A, s->u.s.p, s->u.s.n);
        for (char *p = t, *q = t;; p++) { /* drop '_' separators */
            if (*p != '_') *q++ = *p;
            if (!*p) break;
        }
        char *end;
        if (*t) {
            long long x = strtoll(t, &end, (int)base);
            if (*end == 0) return tv_int(A, x);
            double d = strtod(t, &end);
            if (*end == 0 && !isnan(d) && !isinf(d) && fabs(d) < 9.2e18) return tv_int(A, (int64_t)d);
        }
    }
    return def;
}

static tval *to_float(tmpl_render *r, tval *v, tval *def)
{
    if (v->type == TV_FLOAT) return v;
    if (is_intlike(v)) return tv_float(A, (double)as_i(v));
    if (v->type == TV_STR) {
        tval *s = str_strip(r, v, NULL, 3);
        char *t = tmpl_strndup(A, s->u.s.p, s->u.s.n);
        char *end;
        if (*t) {
            double d = strtod(t, &end);
            if (*end == 0) return tv_float(A, d);
        }
    }
    return def;
}

static double py_round(double x, int64_t ndigits)
{
    /* Python rounds the exact binary value, half to even: so does printf's %.*f */
    if (isnan(x) || isinf(x)) return x;
    if (ndigits > 300) return x;
    if (ndigits >= 0) {
        char buf[512];
        snprintf(buf, sizeof buf, "%.*f", (int)ndigits, x);
        return strtod(buf, NULL);
    }
    if (ndigits < -300) return 0.0;
    double p = pow(10.0, (double)-ndigits);
    return nearbyint(x / p) * p;
}

tval *tmpl_call_filter(tmpl_render *r, tscope *s, const char *name, tval *v, targs *a)
{
    tval *a0 = a->npos ? a->pos[0] : NULL;
    tmpl_step(r);
    if (!strcmp(name, "default") || !strcmp(name, "d")) {
        tval *def = tmpl_kwarg(a, "default_value", 0);
        tval *boolean = tmpl_kwarg(a, "boolean", 1);
        if (v->type == TV_UNDEF || (boolean && tv_truthy(boolean) && !tv_truthy(v)))
            return def ? def : tv_str_nocopy(A, "", 0);
        return v;
    }
    if (!strcmp(name, "safe") || !strcmp(name, "pprint")) return name[0] == 's' ? v : tmpl_str_of(r, v);
    if (!strcmp(name, "string")) return soft_str(r, v);
    if (!strcmp(name, "length") || !strcmp(name, "count")) {
        switch (v->type) {
        case TV_STR: return tv_int(A, (int64_t)tmpl_utf8_len(v->u.s.p, v->u.s.n));
        case TV_LIST: return tv_int(A, (int64_t)v->u.l.n);
        case TV_DICT:
        case TV_NS: return tv_int(A, (int64_t)v->u.d.n);
        case TV_UNDEF: return tv_int(A, 0);
        default: tmpl_rt_error(r, "TypeError", "object of type '%s' has no len()", tv_type_name(v));
        }
    }
    if (!strcmp(name, "tojson")) {
        const char *indent, *isep, *ksep;
        bool sk;
        json_args(r, a, &indent, &isep, &ksep, &sk);
        if (sk) v = sorted_keys_copy(r, v, 0);
        tmpl_buf b = {.limit = r->max_output, .fail = r->fail, .arena = A};
        const tval *bad = NULL;
        if (!tv_to_json(&b, v, indent, isep, ksep, 0, &bad))
            tmpl_rt_error(r, "TypeError", "Object of type %s is not JSON serializable",
                          tv_type_name(bad));
        return tv_str_nocopy(A, b.p ? b.p : "", b.n);
    }
    if (!strcmp(name, "items")) {
        if (v->type == TV_UNDEF) return tv_list(A, 0);
        if (v->type != TV_DICT && v->type != TV_NS)
            tmpl_rt_error(r, "FilterArgumentError", "Can only get item pairs from a mapping.");
        return dict_items(r, v);
    }
    if (!strcmp(name, "list")) {
        tval *l = seq_of(r, v);
        if (l == v) { /* copy, as list() does */
            tval *c = tv_list(A, v->u.l.n);
            for (size_t i = 0; i < v->u.l.n; i++) tv_list_push(A, c, v->u.l.v[i]);
            return c;
        }
        return l;
    }
    if (!strcmp(name, "first") || !strcmp(name, "last")) {
        if (v->type == TV_STR && v->u.s.n) {
            tval *l = seq_of(r, v);
            return l->u.l.v[name[0] == 'f' ? 0 : l->u.l.n - 1];
        }
        tval *l = seq_of(r, v);
        if (!l->u.l.n)
            return tv_undef(A, name[0] == 'f' ? "No first item, sequence was empty."
                                              : "No last item, sequence was empty.");
        return l->u.l.v[name[0] == 'f' ? 0 : l->u.l.n - 1];
    }
    if (!strcmp(name, "reverse")) {
        if (v->type == TV_STR) {
            tval *l = seq_of(r, v);
            tmpl_buf b = {.limit = r->max_output, .fail = r->fail, .arena = A};
            for (size_t i = l->u.l.n; i-- > 0;) tv_to_str(&b, l->u.l.v[i]);
            return tv_str_nocopy(A, b.p ? b.p : "", b.n);
        }
        tval *l = seq_of(r, v), *out = tv_list(A, l->u.l.n);
        for (size_t i = l->u.l.n; i-- > 0;) tv_list_push(A, out, l->u.l.v[i]);
        return out;
    }
    if (!strcmp(name, "join")) {
        tval *sep = tmpl_kwarg(a, "d", 0);
        tval *attr = tmpl_kwarg(a, "attribute", 1);
        if (attr && attr->type == TV_NONE) attr = NULL;
        return join_list(r, seq_of(r, v), sep ? soft_str(r, sep) : tv_str_nocopy(A, "", 0), attr);
    }
    if (!strcmp(name, "upper")) return str_map(r, soft_str(r, v), cp_upper, 0);
    if (!strcmp(name, "lower")) return str_map(r, soft_str(r, v), cp_lower, 0);
    if (!strcmp(name, "title")) return str_map(r, soft_str(r, v), NULL, 3);
    if (!strcmp(name, "capitalize")) return str_map(r, soft_str(r, v), NULL, 1);
    if (!strcmp(name, "trim")) {
        tval *chars = tmpl_kwarg(a, "chars", 0);
        if (chars && chars->type == TV_NONE) chars = NULL;
        if (chars) need_str(r, chars, "trim chars");
        return str_strip(r, soft_str(r, v), chars, 3);
    }
    if (!strcmp(name, "replace")) {
        tval *old = tmpl_kwarg(a, "old", 0), *nw = tmpl_kwarg(a, "new", 1);
        tval *cnt = tmpl_kwarg(a, "count", 2);
        if (!old || !nw) tmpl_rt_error(r, "TypeError", "replace() needs 2 arguments");
        return str_replace(r, soft_str(r, v), soft_str(r, old), soft_str(r, nw),
                           cnt && cnt->type != TV_NONE ? need_int(r, cnt, "count") : -1);
    }
    if (!strcmp(name, "int")) {
        tval *def = tmpl_kwarg(a, "default", 0);
        tval *base = tmpl_kwarg(a, "base", 1);
        return to_int(r, v, def ? def : tv_int(A, 0), base ? need_int(r, base, "base") : 10);
    }
    if (!strcmp(name, "float")) {
        tval *def = tmpl_kwarg(a, "default", 0);
        return to_float(r, v, def ? def : tv_float(A, 0.0));
    }
    if (!strcmp(name, "abs")) {
        if (v->type == TV_FLOAT) return tv_float(A, fabs(v->u.f));
        if (is_intlike(v)) {
            int64_t i = as_i(v);
            if (i == INT64_MIN) tmpl_rt_error(r, "OverflowError", "integer overflow");
            return tv_int(A, i < 0 ? -i : i);
        }
        tmpl_rt_error(r, "TypeError", "bad operand type for abs(): '%s'", tv_type_name(v));
    }
    if (!strcmp(name, "round")) {
        tval *prec = tmpl_kwarg(a, "precision", 0);
        tval *method = tmpl_kwarg(a, "method", 1);
        int64_t p = prec ? need_int(r, prec, "precision") : 0;
        if (!is_number(v)) tmpl_rt_error(r, "TypeError", "type %s doesn't define __round__ method", tv_type_name(v));
        double x = as_f(v), scale = pow(10.0, (double)p);
        if (is_intlike(v) && (!method || str_eq(method, "common")) && p >= 0) return v;
        if (method && str_eq(method, "ceil")) return tv_float(A, ceil(x * scale) / scale);
        if (method && str_eq(method, "floor")) return tv_float(A, floor(x * scale) / scale);
        return tv_float(A, py_round(x, p));
    }
    if (!strcmp(name, "attr")) {
        if (!a0) tmpl_rt_error(r, "TypeError", "attr() needs a name");
        tval *n = soft_str(r, a0);
        return tmpl_get_attr(r, v, n->u.s.p, n->u.s.n);
    }
    if (!strcmp(name, "map")) {
        tval *items = seq_of(r, v);
        tval *out = tv_list(A, items->u.l.n);
        tval *attr = tmpl_kwarg(a, "attribute", (size_t)-1);
        if (attr) {
            tval *def = tmpl_kwarg(a, "default", (size_t)-1);
            for (size_t i = 0; i < items->u.l.n; i++) {
                tval *x = attr_path(r, items->u.l.v[i], attr);
                if (x->type == TV_UNDEF && def) x = def;
                tv_list_push(A, out, x);
            }
            return out;
        }
        if (!a0) return items;
        const char *fname = need_str(r, a0, "filter name")->u.s.p;
        if (!tmpl_has_filter(fname)) tmpl_rt_error(r, "TemplateRuntimeError", "No filter named '%s'.", fname);
        targs fa = {.pos = a->pos + 1, .npos = a->npos - 1, .kwn = a->kwn, .kwv = a->kwv, .nkw = a->nkw};
        for (size_t i = 0; i < items->u.l.n; i++)
            tv_list_push(A, out, tmpl_call_filter(r, s, fname, items->u.l.v[i], &fa));
        return out;
    }
    if (!strcmp(name, "select")) return filter_select(r, s, v, a, false, true);
    if (!strcmp(name, "reject")) return filter_select(r, s, v, a, false, false);
    if (!strcmp(name, "selectattr")) return filter_select(r, s, v, a, true, true);
    if (!strcmp(name, "rejectattr")) return filter_select(r, s, v, a, true, false);
    if (!strcmp(name, "sort") || !strcmp(name, "dictsort")) {
        bool dict = name[0] == 'd';
        tval *rev = tmpl_kwarg(a, "reverse", dict ? 2 : 0);
        tval *cs = tmpl_kwarg(a, "case_sensitive", dict ? 0 : 1);
        tval *attr = dict ? NULL : tmpl_kwarg(a, "attribute", 2);
        tval *by = dict ? tmpl_kwarg(a, "by", 1) : NULL;
        tval *items;
        if (dict) {
            if (v->type != TV_DICT) tmpl_rt_error(r, "TypeError", "dictsort needs a mapping");
            items = dict_items(r, v);
        } else {
            items = seq_of(r, v);
        }
        size_t n = items->u.l.n;
        tval *out = tv_list(A, n);
        tval **keys = tmpl_alloc(A, (n + 1) * sizeof *keys);
        for (size_t i = 0; i < n; i++) {
            tval *x = items->u.l.v[i];
            tval *k = x;
            if (dict) k = x->u.l.v[by && str_eq(by, "value") ? 1 : 0];
            else if (attr && attr->type != TV_NONE) k = attr_path(r, x, attr);
            keys[i] = sort_key(r, k, cs && tv_truthy(cs));
            out->u.l.v[i] = x;
        }
        out->u.l.n = n;
        sort_vals(r, out->u.l.v, n, keys, rev && tv_truthy(rev));
        return out;
    }
    if (!strcmp(name, "unique")) {
        tval *items = seq_of(r, v), *out = tv_list(A, 0), *seen = tv_list(A, 0);
        tval *cs = tmpl_kwarg(a, "case_sensitive", 0);
        tval *attr = tmpl_kwarg(a, "attribute", 1);
        for (size_t i = 0; i < items->u.l.n; i++) {
            tmpl_step(r);
            tval *x = items->u.l.v[i];
            tval *k = sort_key(r, attr ? attr_path(r, x, attr) : x, cs && tv_truthy(cs));
            bool dup = false;
            for (size_t j = 0; j < seen->u.l.n && !dup; j++) dup = tv_equal(seen->u.l.v[j], k);
            if (!dup) {
                tv_list_push(A, seen, k);
                tv_list_push(A, out, x);
            }
        }
        return out;
    }
    if (!strcmp(name, "min") || !strcmp(name, "max")) {
        tval *items = seq_of(r, v);
        tval *cs = tmpl_kwarg(a, "case_sensitive", 0);
        tval *attr = tmpl_kwarg(a, "attribute", 1);
        if (!items->u.l.n) return tv_undef(A, "No aggregated item, sequence was empty.");
        tval *best = items->u.l.v[0];
        tval *bk = sort_key(r, attr ? attr_path(r, best, attr) : best, cs && tv_truthy(cs));
        for (size_t i = 1; i < items->u.l.n; i++) {
            tval *x = items->u.l.v[i];
            tval *k = sort_key(r, attr ? attr_path(r, x, attr) : x, cs && tv_truthy(cs));
            int c;
            if (!tv_compare(k, bk, &c))
                tmpl_rt_error(r, "TypeError", "'<' not supported between instances of '%s' and '%s'",
                              tv_type_name(k), tv_type_name(bk));
            if (name[1] == 'i' ? c < 0 : c > 0) {
                best = x;
                bk = k;
            }
        }
        return best;
    }
    if (!strcmp(name, "sum")) {
        tval *items = seq_of(r, v);
        tval *attr = tmpl_kwarg(a, "attribute", 0);
        tval *acc = tmpl_kwarg(a, "start", 1);
        if (!acc) acc = tv_int(A, 0);
        for (size_t i = 0; i < items->u.l.n; i++) {
            tval *x = items->u.l.v[i];
            if (attr && attr->type != TV_NONE) x = attr_path(r, x, attr);
            acc = tmpl_binop(r, "+", acc, x);
        }
        return acc;
    }
    if (!strcmp(name, "batch")) {
        int64_t n = need_int(r, a0, "batch size");
        if (n <= 0) tmpl_rt_error(r, "ValueError", "batch size must be positive");
        tval *fill = tmpl_kwarg(a, "fill_with", 1);
        tval *items = seq_of(r, v), *out = tv_list(A, 0), *cur = NULL;
        for (size_t i = 0; i < items->u.l.n; i++) {
            if (!cur || (int64_t)cur->u.l.n == n) {
                cur = tv_list(A, 0);
                tv_list_push(A, out, cur);
            }
            tv_list_push(A, cur, items->u.l.v[i]);
        }
        if (cur && fill && fill->type != TV_NONE)
            while ((int64_t)cur->u.l.n < n) tv_list_push(A, cur, fill);
        return out;
    }
    if (!strcmp(name, "escape") || !strcmp(name, "e") || !strcmp(name, "forceescape"))
        return html_escape(r, soft_str(r, v));
    if (!strcmp(name, "center")) {
        tval *w = tmpl_kwarg(a, "width", 0);
        return pad(r, soft_str(r, v), w ? need_int(r, w, "width") : 80, NULL, 1);
    }
    if (!strcmp(name, "indent")) {
        tval *w = tmpl_kwarg(a, "width", 0), *first = tmpl_kwarg(a, "first", 1),
             *blank = tmpl_kwarg(a, "blank", 2);
        const char *ind = "    ";
        size_t il = 4;
        if (w && w->type == TV_STR) {
            ind = w->u.s.p;
            il = w->u.s.n;
        } else if (w) {
            int64_t k = need_int(r, w, "width");
            if (k < 0) k = 0;
            if (k > 1024) k = 1024;
            char *sp = tmpl_alloc(A, (size_t)k + 1);
            memset(sp, ' ', (size_t)k);
            ind = sp;
            il = (size_t)k;
        }
        tval *str = soft_str(r, v);
        tmpl_buf b = {.limit = r->max_output, .fail = r->fail, .arena = A};
        tval *lines = str_method(r, str, "splitlines", &(targs){0});
        /* jinja: s += "\n" if s ends with newline handling; lines after the first get indent */
        for (size_t i = 0; i < lines->u.l.n; i++) {
            tval *ln = lines->u.l.v[i];
            if (i) tmpl_buf_putc(&b, '\n');
            bool is_blank = ln->u.s.n == 0;
            if ((i > 0 || (first && tv_truthy(first))) && (!is_blank || (blank && tv_truthy(blank))))
                tmpl_buf_put(&b, ind, il);
            tmpl_buf_put(&b, ln->u.s.p, ln->u.s.n);
        }
        if (str->u.s.n && str->u.s.p[str->u.s.n - 1] == '\n') tmpl_buf_putc(&b, '\n');
        return tv_str_nocopy(A, b.p ? b.p : "", b.n);
    }
    if (!strcmp(name, "format")) {
        tval *fmt = soft_str(r, v);
        tval *args;
        if (a->npos == 1 && a->pos[0]->type == TV_DICT) {
            args = a->pos[0];
            tmpl_rt_error(r, "TypeError", "format with a mapping is not supported");
        }
        args = tv_list(A, a->npos);
        args->is_tuple = true;
        for (size_t i = 0; i < a->npos; i++) tv_list_push(A, args, a->pos[i]);
        return percent_format(r, fmt, args);
    }
    if (!strcmp(name, "wordcount")) {
        tval *l = str_split(r, soft_str(r, v), NULL, -1, false);
        return tv_int(A, (int64_t)l->u.l.n);
    }
    if (!strcmp(name, "striptags")) {
        tval *str = soft_str(r, v);
        tmpl_buf b = {.limit = r->max_output, .fail = r->fail, .arena = A};
        bool in_tag = false;
        for (size_t i = 0; i < str->u.s.n; i++) {
            char c = str->u.s.p[i];
            if (c == '<') in_tag = true;
            else if (c == '>' && in_tag) in_tag = false;
            else if (!in_tag) tmpl_buf_putc(&b, c);
        }
        tval *t = tv_str_nocopy(A, b.p ? b.p : "", b.n);
        return join_list(r, str_split(r, t, NULL, -1, false), tv_str_nocopy(A, " ", 1), NULL);
    }
    if (!strcmp(name, "truncate")) {
        tval *str = soft_str(r, v);
        tval *len = tmpl_kwarg(a, "length", 0);
        int64_t n = len ? need_int(r, len, "length") : 255;
        tval *end = tmpl_kwarg(a, "end", 2);
        if (!end) end = tv_str_nocopy(A, "...", 3);
        tval *lev = tmpl_kwarg(a, "leeway", 3);
        int64_t leeway = lev ? need_int(r, lev, "leeway") : 5;
        int64_t sl = (int64_t)tmpl_utf8_len(str->u.s.p, str->u.s.n);
        if (sl <= n + leeway) return str;
        tval *l = seq_of(r, str);
        int64_t keep = n - (int64_t)tmpl_utf8_len(end->u.s.p, end->u.s.n);
        if (keep < 0) keep = 0;
        tmpl_buf b = {.limit = r->max_output, .fail = r->fail, .arena = A};
        for (int64_t i = 0; i < keep && i < (int64_t)l->u.l.n; i++) tv_to_str(&b, l->u.l.v[i]);
        tv_to_str(&b, soft_str(r, end));
        return tv_str_nocopy(A, b.p ? b.p : "", b.n);
    }
    if (!strcmp(name, "groupby")) {
        tval *attr = tmpl_kwarg(a, "attribute", 0);
        if (!attr) tmpl_rt_error(r, "TypeError", "groupby needs an attribute");
        tval *items = seq_of(r, v);
        size_t n = items->u.l.n;
        tval **keys = tmpl_alloc(A, (n + 1) * sizeof *keys);
        tval **vals = tmpl_alloc(A, (n + 1) * sizeof *vals);
        for (size_t i = 0; i < n; i++) {
            vals[i] = items->u.l.v[i];
            keys[i] = attr_path(r, vals[i], attr);
        }
        sort_vals(r, vals, n, keys, false);
        tval *out = tv_list(A, 0);
        for (size_t i = 0; i < n;) {
            tval *grp = tv_list(A, 0);
            size_t j = i;
            while (j < n && tv_equal(keys[j], keys[i])) tv_list_push(A, grp, vals[j++]);
            tval *t = tv_list(A, 2);
            t->is_tuple = true;
            tv_list_push(A, t, keys[i]);
            tv_list_push(A, t, grp);
            tv_list_push(A, out, t);
            i = j;
        }
        return out;
    }
    tmpl_rt_error(r, "TemplateAssertionError", "No filter named '%s'.", name);
}
