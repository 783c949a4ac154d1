/* tmpl_filters.c - Jinja2's filters (trim, tojson with transformers' arguments, selectattr, map,
 * sort, default, ...) on template values. Helpers shared with tmpl_builtins.c are declared in
 * tmpl.h. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "template/tmpl.h"

#define A (r->arena)

/* ---- filters ----------------------------------------------------------------------------- */
static const char *const filter_names[] = {
    "abs",      "attr",        "batch",     "capitalize",
    "center",   "count",       "d",         "default",
    "dictsort", "e",           "escape",    "first",
    "float",    "forceescape", "format",    "indent",
    "int",      "items",       "join",      "last",
    "length",   "list",        "lower",     "map",
    "max",      "min",         "reject",    "rejectattr",
    "replace",  "reverse",     "round",     "safe",
    "select",   "selectattr",  "sort",      "string",
    "sum",      "title",       "tojson",    "trim",
    "unique",   "upper",       "wordcount", "striptags",
    "truncate", "groupby",     "pprint",    "urlencode",
    "slice",    "wordwrap",    "xmlattr",   "filesizeformat"};

bool tmpl_has_filter(const char *name)
{
    return tmpl_in_set(filter_names, FORGE_ARRAY_LEN(filter_names), name, strlen(name));
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
    if (!case_sensitive && v->type == TV_STR) return tmpl_str_map(r, v, tmpl_cp_lower, 0);
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
    if (a->npos > base) test = tmpl_need_str(r, a->pos[base], "test name")->u.s.p;
    targs ta = {0};
    if (a->npos > base + 1) {
        ta.pos = a->pos + base + 1;
        ta.npos = a->npos - base - 1;
    }
    for (size_t i = 0; i < items->u.l.n; i++) {
        tmpl_step(r);
        tval *x = items->u.l.v[i];
        if (attr) x = tmpl_attr_path(r, x, attrname);
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
            int64_t k = tmpl_need_int(r, ind, "indent");
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
        for (size_t i = 0; i < v->u.d.n; i++)
            idx[i] = tv_int(A, (int64_t)i);
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
        for (size_t i = 0; i < v->u.l.n; i++)
            tv_list_push(A, l, sorted_keys_copy(r, v->u.l.v[i], depth + 1));
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
        case '&':
            tmpl_buf_puts(&b, "&amp;");
            break;
        case '<':
            tmpl_buf_puts(&b, "&lt;");
            break;
        case '>':
            tmpl_buf_puts(&b, "&gt;");
            break;
        case '"':
            tmpl_buf_puts(&b, "&#34;");
            break;
        case '\'':
            tmpl_buf_puts(&b, "&#39;");
            break;
        default:
            tmpl_buf_putc(&b, c);
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
        tval *s = tmpl_str_strip(r, v, NULL, 3);
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
            if (*end == 0 && !isnan(d) && !isinf(d) && fabs(d) < 9.2e18)
                return tv_int(A, (int64_t)d);
        }
    }
    return def;
}

static tval *to_float(tmpl_render *r, tval *v, tval *def)
{
    if (v->type == TV_FLOAT) return v;
    if (tmpl_is_intlike(v)) return tv_float(A, (double)tmpl_as_i(v));
    if (v->type == TV_STR) {
        tval *s = tmpl_str_strip(r, v, NULL, 3);
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
    if (!strcmp(name, "safe") || !strcmp(name, "pprint")) return tmpl_str_of(r, v); /* Markup(v) */
    if (!strcmp(name, "string")) return soft_str(r, v);
    if (!strcmp(name, "length") || !strcmp(name, "count")) {
        switch (v->type) {
        case TV_STR:
            return tv_int(A, (int64_t)tmpl_utf8_len(v->u.s.p, v->u.s.n));
        case TV_LIST:
            return tv_int(A, (int64_t)v->u.l.n);
        case TV_DICT:
        case TV_NS:
            return tv_int(A, (int64_t)v->u.d.n);
        case TV_UNDEF:
            return tv_int(A, 0);
        default:
            tmpl_rt_error(r, "TypeError", "object of type '%s' has no len()", tv_type_name(v));
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
        return tmpl_dict_items(r, v);
    }
    if (!strcmp(name, "list")) {
        tval *l = seq_of(r, v);
        if (l == v) { /* copy, as list() does */
            tval *c = tv_list(A, v->u.l.n);
            for (size_t i = 0; i < v->u.l.n; i++)
                tv_list_push(A, c, v->u.l.v[i]);
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
        if (v->type == TV_STR) { /* code points in reverse order, without a list of them */
            size_t n = v->u.s.n, i = 0;
            char *out = tmpl_alloc(A, n + 1);
            while (i < n) {
                uint32_t cp;
                size_t k = tmpl_utf8_decode(v->u.s.p + i, n - i, &cp);
                memcpy(out + n - i - k, v->u.s.p + i, k);
                i += k;
            }
            return tv_str_nocopy(A, out, n);
        }
        tval *l = seq_of(r, v), *out = tv_list(A, l->u.l.n);
        for (size_t i = l->u.l.n; i-- > 0;)
            tv_list_push(A, out, l->u.l.v[i]);
        return out;
    }
    if (!strcmp(name, "join")) {
        tval *sep = tmpl_kwarg(a, "d", 0);
        tval *attr = tmpl_kwarg(a, "attribute", 1);
        if (attr && attr->type == TV_NONE) attr = NULL;
        return tmpl_join_list(r, seq_of(r, v), sep ? soft_str(r, sep) : tv_str_nocopy(A, "", 0),
                              attr);
    }
    if (!strcmp(name, "upper")) return tmpl_str_map(r, soft_str(r, v), tmpl_cp_upper, 0);
    if (!strcmp(name, "lower")) return tmpl_str_map(r, soft_str(r, v), tmpl_cp_lower, 0);
    if (!strcmp(name, "title")) return tmpl_str_map(r, soft_str(r, v), NULL, 3);
    if (!strcmp(name, "capitalize")) return tmpl_str_map(r, soft_str(r, v), NULL, 1);
    if (!strcmp(name, "trim")) {
        tval *chars = tmpl_kwarg(a, "chars", 0);
        if (chars && chars->type == TV_NONE) chars = NULL;
        if (chars) tmpl_need_str(r, chars, "trim chars");
        return tmpl_str_strip(r, soft_str(r, v), chars, 3);
    }
    if (!strcmp(name, "replace")) {
        tval *old = tmpl_kwarg(a, "old", 0), *nw = tmpl_kwarg(a, "new", 1);
        tval *cnt = tmpl_kwarg(a, "count", 2);
        if (!old || !nw) tmpl_rt_error(r, "TypeError", "replace() needs 2 arguments");
        return tmpl_str_replace(r, soft_str(r, v), soft_str(r, old), soft_str(r, nw),
                                cnt && cnt->type != TV_NONE ? tmpl_need_int(r, cnt, "count") : -1);
    }
    if ((!strcmp(name, "int") || !strcmp(name, "float")) && v->type == TV_UNDEF)
        tmpl_undef_fail(r, v);
    if (!strcmp(name, "int")) {
        tval *def = tmpl_kwarg(a, "default", 0);
        tval *base = tmpl_kwarg(a, "base", 1);
        return to_int(r, v, def ? def : tv_int(A, 0), base ? tmpl_need_int(r, base, "base") : 10);
    }
    if (!strcmp(name, "float")) {
        tval *def = tmpl_kwarg(a, "default", 0);
        return to_float(r, v, def ? def : tv_float(A, 0.0));
    }
    if (!strcmp(name, "abs")) {
        if (v->type == TV_FLOAT) return tv_float(A, fabs(v->u.f));
        if (tmpl_is_intlike(v)) {
            int64_t i = tmpl_as_i(v);
            if (i == INT64_MIN) tmpl_rt_error(r, "OverflowError", "integer overflow");
            return tv_int(A, i < 0 ? -i : i);
        }
        tmpl_rt_error(r, "TypeError", "bad operand type for abs(): '%s'", tv_type_name(v));
    }
    if (!strcmp(name, "round")) {
        tval *prec = tmpl_kwarg(a, "precision", 0);
        tval *method = tmpl_kwarg(a, "method", 1);
        int64_t p = prec ? tmpl_need_int(r, prec, "precision") : 0;
        if (!tmpl_is_number(v))
            tmpl_rt_error(r, "TypeError", "type %s doesn't define __round__ method",
                          tv_type_name(v));
        double x = tmpl_as_f(v), scale = pow(10.0, (double)p);
        if (tmpl_is_intlike(v) && (!method || tmpl_str_eq(method, "common")) && p >= 0)
            return tv_int(A, tmpl_as_i(v));
        if (method && tmpl_str_eq(method, "ceil")) return tv_float(A, ceil(x * scale) / scale);
        if (method && tmpl_str_eq(method, "floor")) return tv_float(A, floor(x * scale) / scale);
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
                tval *x = tmpl_attr_path(r, items->u.l.v[i], attr);
                if (x->type == TV_UNDEF && def) x = def;
                tv_list_push(A, out, x);
            }
            return out;
        }
        if (!a0) return items;
        const char *fname = tmpl_need_str(r, a0, "filter name")->u.s.p;
        if (!tmpl_has_filter(fname))
            tmpl_rt_error(r, "TemplateRuntimeError", "No filter named '%s'.", fname);
        targs fa = {
            .pos = a->pos + 1, .npos = a->npos - 1, .kwn = a->kwn, .kwv = a->kwv, .nkw = a->nkw};
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
            items = tmpl_dict_items(r, v);
        } else {
            items = seq_of(r, v);
        }
        size_t n = items->u.l.n;
        tval *out = tv_list(A, n);
        tval **keys = tmpl_alloc(A, (n + 1) * sizeof *keys);
        for (size_t i = 0; i < n; i++) {
            tval *x = items->u.l.v[i];
            tval *k = x;
            if (dict)
                k = x->u.l.v[by && tmpl_str_eq(by, "value") ? 1 : 0];
            else if (attr && attr->type != TV_NONE)
                k = tmpl_attr_path(r, x, attr);
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
            tval *k = sort_key(r, attr ? tmpl_attr_path(r, x, attr) : x, cs && tv_truthy(cs));
            bool dup = false;
            for (size_t j = 0; j < seen->u.l.n && !dup; j++)
                dup = tv_equal(seen->u.l.v[j], k);
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
        tval *bk = sort_key(r, attr ? tmpl_attr_path(r, best, attr) : best, cs && tv_truthy(cs));
        for (size_t i = 1; i < items->u.l.n; i++) {
            tval *x = items->u.l.v[i];
            tval *k = sort_key(r, attr ? tmpl_attr_path(r, x, attr) : x, cs && tv_truthy(cs));
            int c;
            if (!tv_compare(k, bk, &c))
                tmpl_rt_error(r, "TypeError",
                              "'<' not supported between instances of '%s' and '%s'",
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
            if (attr && attr->type != TV_NONE) x = tmpl_attr_path(r, x, attr);
            acc = tmpl_binop(r, "+", acc, x);
        }
        return acc;
    }
    if (!strcmp(name, "batch")) {
        int64_t n = tmpl_need_int(r, a0, "batch size");
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
            while ((int64_t)cur->u.l.n < n)
                tv_list_push(A, cur, fill);
        return out;
    }
    if (!strcmp(name, "escape") || !strcmp(name, "e") || !strcmp(name, "forceescape"))
        return html_escape(r, soft_str(r, v));
    if (!strcmp(name, "center")) {
        tval *w = tmpl_kwarg(a, "width", 0);
        return tmpl_pad(r, soft_str(r, v), w ? tmpl_need_int(r, w, "width") : 80, NULL, 1);
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
            int64_t k = tmpl_need_int(r, w, "width");
            if (k < 0) k = 0;
            if (k > 1024) k = 1024;
            char *sp = tmpl_alloc(A, (size_t)k + 1);
            memset(sp, ' ', (size_t)k);
            ind = sp;
            il = (size_t)k;
        }
        tval *str = soft_str(r, v);
        tmpl_buf b = {.limit = r->max_output, .fail = r->fail, .arena = A};
        tval *lines = tmpl_str_method(r, str, "splitlines", &(targs){0});
        /* jinja: s += "\n" if s ends with newline handling; lines after the first get indent */
        for (size_t i = 0; i < lines->u.l.n; i++) {
            tval *ln = lines->u.l.v[i];
            if (i) tmpl_buf_putc(&b, '\n');
            bool is_blank = ln->u.s.n == 0;
            if ((i > 0 || (first && tv_truthy(first))) &&
                (!is_blank || (blank && tv_truthy(blank))))
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
        for (size_t i = 0; i < a->npos; i++)
            tv_list_push(A, args, a->pos[i]);
        return tmpl_percent_format(r, fmt, args);
    }
    if (!strcmp(name, "wordcount")) {
        tval *l = tmpl_str_split(r, soft_str(r, v), NULL, -1, false);
        return tv_int(A, (int64_t)l->u.l.n);
    }
    if (!strcmp(name, "striptags")) {
        tval *str = soft_str(r, v);
        tmpl_work(str->u.s.n);
        tmpl_buf b = {.limit = r->max_output, .fail = r->fail, .arena = A};
        bool in_tag = false;
        for (size_t i = 0; i < str->u.s.n; i++) {
            char c = str->u.s.p[i];
            if (c == '<')
                in_tag = true;
            else if (c == '>' && in_tag)
                in_tag = false;
            else if (!in_tag)
                tmpl_buf_putc(&b, c);
        }
        tval *t = tv_str_nocopy(A, b.p ? b.p : "", b.n);
        return tmpl_join_list(r, tmpl_str_split(r, t, NULL, -1, false), tv_str_nocopy(A, " ", 1),
                              NULL);
    }
    if (!strcmp(name, "truncate")) {
        tval *str = soft_str(r, v);
        tval *len = tmpl_kwarg(a, "length", 0);
        int64_t n = len ? tmpl_need_int(r, len, "length") : 255;
        tval *end = tmpl_kwarg(a, "end", 2);
        if (!end) end = tv_str_nocopy(A, "...", 3);
        tmpl_need_str(r, end, "truncate end"); /* was read as a string whatever its type */
        tval *lev = tmpl_kwarg(a, "leeway", 3);
        int64_t leeway = lev && lev->type != TV_NONE ? tmpl_need_int(r, lev, "leeway") : 5;
        int64_t end_len = (int64_t)tmpl_utf8_len(end->u.s.p, end->u.s.n);
        /* jinja's asserts; they also keep n + leeway and n - end_len from overflowing */
        if (n < end_len)
            tmpl_rt_error(r, "AssertionError", "expected length >= %lld, got %lld",
                          (long long)end_len, (long long)n);
        if (leeway < 0)
            tmpl_rt_error(r, "AssertionError", "expected leeway >= 0, got %lld", (long long)leeway);
        int64_t sl = (int64_t)tmpl_utf8_len(str->u.s.p, str->u.s.n);
        if (sl <= n || sl - n <= leeway) return str;
        tval *l = seq_of(r, str);
        int64_t keep = n - end_len;
        tmpl_buf b = {.limit = r->max_output, .fail = r->fail, .arena = A};
        for (int64_t i = 0; i < keep && i < (int64_t)l->u.l.n; i++)
            tv_to_str(&b, l->u.l.v[i]);
        tval *kw = tmpl_kwarg(a, "killwords", 1);
        if (!(kw && tv_truthy(kw))) { /* s[:keep].rsplit(" ", 1)[0] */
            for (size_t k = b.n; k-- > 0;)
                if (b.p[k] == ' ') {
                    b.n = k;
                    break;
                }
        }
        tv_to_str(&b, end);
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
            keys[i] = tmpl_attr_path(r, vals[i], attr);
        }
        sort_vals(r, vals, n, keys, false);
        tval *out = tv_list(A, 0);
        for (size_t i = 0; i < n;) {
            tval *grp = tv_list(A, 0);
            size_t j = i;
            while (j < n && tv_equal(keys[j], keys[i]))
                tv_list_push(A, grp, vals[j++]);
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
