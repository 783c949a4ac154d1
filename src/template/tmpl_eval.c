/* tmpl_eval.c - the template evaluator: walks the AST (tmpl_parse.c) with Jinja2's scoping
 * (a fresh scope per loop iteration, macro and block), writes output, enforces the step, depth and
 * output limits. Filters, tests, attributes and methods live in tmpl_builtins.c. Errors unwind
 * with tmpl_raise (see tmpl.h for why that is safe here). */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "core/util.h"
#include "template/tmpl.h"

struct tscope {
    tscope *parent;
    const char **names;
    tval **vals;
    size_t n, cap;
};

void tmpl_rt_error(tmpl_render *r, const char *type, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    tmpl_raise(r->fail, FORGE_E_FORMAT, r->line, type, "%s", msg);
}

/* ---- budget: steps and wall-clock time ----------------------------------------------------- */
/* a step is at most ~100 ns of work: the clock is read about every 0.1-0.5 ms */
#define CLOCK_EVERY_STEPS 4096

static void budget_check(tmpl_render *r)
{
    if (r->steps > r->max_steps)
        tmpl_raise(r->fail, FORGE_E_RANGE, r->line, "LimitError",
                   "template evaluation exceeded %llu steps", (unsigned long long)r->max_steps);
    if (r->deadline_ns && forge_now_ns() > r->deadline_ns)
        tmpl_raise(r->fail, FORGE_E_RANGE, r->line, "LimitError",
                   "template render exceeded its time budget of %u ms%s%s%s", r->budget_ms,
                   r->name ? " (" : "", r->name ? r->name : "", r->name ? ")" : "");
    uint64_t limit = r->max_steps < UINT64_MAX ? r->max_steps + 1 : UINT64_MAX;
    uint64_t next =
        r->steps < UINT64_MAX - CLOCK_EVERY_STEPS ? r->steps + CLOCK_EVERY_STEPS : UINT64_MAX;
    r->next_check = next < limit ? next : limit;
}

void tmpl_step(tmpl_render *r)
{
    if (++r->steps >= r->next_check) budget_check(r);
}

static _Thread_local tmpl_render *metered; /* the render running on this thread, or NULL */

void tmpl_meter_begin(tmpl_render *r)
{
    if (r->budget_ms) r->deadline_ns = forge_now_ns() + (int64_t)r->budget_ms * 1000000;
    r->next_check = 0;
    metered = r;
    budget_check(r);
}

void tmpl_meter_end(void)
{
    metered = NULL;
}

void tmpl_work(uint64_t bytes)
{
    tmpl_render *r = metered;
    if (!r) return;
    r->work += bytes < UINT64_MAX - r->work ? bytes : UINT64_MAX - r->work;
    if (r->work < TMPL_BYTES_PER_STEP) return;
    uint64_t steps = r->work / TMPL_BYTES_PER_STEP;
    r->work %= TMPL_BYTES_PER_STEP;
    r->steps = steps < UINT64_MAX - r->steps ? r->steps + steps : UINT64_MAX;
    if (r->steps >= r->next_check) budget_check(r);
}

void tmpl_value_too_deep(void)
{
    tmpl_render *r = metered;
    if (r)
        tmpl_raise(r->fail, FORGE_E_RANGE, r->line, "LimitError",
                   "values nested deeper than %d levels", TMPL_MAX_VALUE_DEPTH);
}

static tscope *scope_new(tmpl_render *r, tscope *parent)
{
    tscope *s = tmpl_alloc(r->arena, sizeof *s);
    s->parent = parent;
    return s;
}

static void scope_set(tmpl_render *r, tscope *s, const char *name, tval *v)
{
    for (size_t i = 0; i < s->n; i++)
        if (!strcmp(s->names[i], name)) {
            s->vals[i] = v;
            return;
        }
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 8;
        const char **nn = tmpl_alloc(r->arena, cap * sizeof *nn);
        tval **nv = tmpl_alloc(r->arena, cap * sizeof *nv);
        if (s->n) {
            memcpy(nn, s->names, s->n * sizeof *nn);
            memcpy(nv, s->vals, s->n * sizeof *nv);
        }
        s->names = nn;
        s->vals = nv;
        s->cap = cap;
    }
    s->names[s->n] = name;
    s->vals[s->n] = v;
    s->n++;
}

static tval *scope_get(tscope *s, const char *name)
{
    size_t scanned = 0; /* a template with thousands of names makes each lookup that long */
    for (; s; s = s->parent) {
        scanned += s->n;
        for (size_t i = s->n; i-- > 0;)
            if (!strcmp(s->names[i], name)) {
                tmpl_work(scanned);
                return s->vals[i];
            }
    }
    tmpl_work(scanned);
    return NULL;
}

tscope *tmpl_scope_new(tmpl_render *r, tscope *parent)
{
    return scope_new(r, parent);
}
void tmpl_scope_set(tmpl_render *r, tscope *s, const char *name, tval *v)
{
    scope_set(r, s, name, v);
}

static void exec_body(tmpl_render *r, const tnode *n, tscope *s);

static void write_val(tmpl_render *r, const tval *v)
{
    tv_to_str(r->out, v);
}

/* Render body into a fresh buffer and return it as a string value. */
static tval *capture(tmpl_render *r, const tnode *body, tscope *s)
{
    tmpl_buf buf = {.limit = r->max_output, .fail = r->fail, .arena = r->arena};
    tmpl_buf *saved = r->out;
    r->out = &buf;
    exec_body(r, body, s);
    r->out = saved;
    return tv_str_nocopy(r->arena, buf.p ? buf.p : "", buf.n);
}

/* ---- macros ------------------------------------------------------------------------------ */
static tval *call_macro(tmpl_render *r, tval *m, targs *args)
{
    const tnode *def = m->u.m.node;
    if (++r->depth > r->max_depth)
        tmpl_raise(r->fail, FORGE_E_RANGE, r->line, "LimitError",
                   "macro calls nested deeper than %d", r->max_depth);
    tscope *s = scope_new(r, m->u.m.closure);
    size_t np = def->nnames;
    tval *varargs = tv_list(r->arena, 0);
    varargs->is_tuple = true;
    tval *kwargs = tv_dict(r->arena, TV_DICT);
    for (size_t i = 0; i < args->npos; i++) {
        if (i < np)
            scope_set(r, s, def->names[i], args->pos[i]);
        else
            tv_list_push(r->arena, varargs, args->pos[i]);
    }
    for (size_t k = 0; k < args->nkw; k++) {
        bool found = false;
        for (size_t i = 0; i < np; i++)
            if (!strcmp(def->names[i], args->kwn[k])) {
                if (i < args->npos)
                    tmpl_rt_error(r, "TypeError",
                                  "macro '%s' got multiple values for argument '%s'",
                                  def->name ? def->name : "caller", args->kwn[k]);
                scope_set(r, s, def->names[i], args->kwv[k]);
                found = true;
            }
        if (!found) {
            if (!strcmp(args->kwn[k], "caller"))
                scope_set(r, s, "caller", args->kwv[k]);
            else
                tv_dict_set(r->arena, kwargs, tv_cstr(r->arena, args->kwn[k]), args->kwv[k]);
        }
    }
    for (size_t i = args->npos; i < np; i++) {
        bool given = false;
        for (size_t k = 0; k < args->nkw; k++)
            if (!strcmp(def->names[i], args->kwn[k])) given = true;
        if (given) continue;
        tval *v;
        if (def->list2 && i < def->n2 && def->list2[i])
            v = tmpl_eval_expr(r, def->list2[i], s);
        else
            v = tv_undef(r->arena, NULL);
        if (v->type == TV_UNDEF && !v->u.undef) {
            char *h = tmpl_alloc(r->arena, strlen(def->names[i]) + 32);
            sprintf(h, "'%s' is undefined", def->names[i]);
            v->u.undef = h;
        }
        scope_set(r, s, def->names[i], v);
    }
    scope_set(r, s, "varargs", varargs);
    scope_set(r, s, "kwargs", kwargs);
    if (m->u.m.caller) scope_set(r, s, "caller", m->u.m.caller);
    int saved_ctl = r->loop_ctl;
    r->loop_ctl = 0;
    tval *res = capture(r, def->b, s);
    r->loop_ctl = saved_ctl;
    r->depth--;
    return res;
}

/* ---- for loops --------------------------------------------------------------------------- */
static void bind_targets(tmpl_render *r, tscope *s, const char **names, size_t n, tval *item)
{
    if (n == 1) {
        scope_set(r, s, names[0], item);
        return;
    }
    if (item->type != TV_LIST)
        tmpl_rt_error(r, "TypeError", "cannot unpack non-iterable %s object", tv_type_name(item));
    if (item->u.l.n != n)
        tmpl_rt_error(r, "ValueError", "%s values to unpack (expected %zu, got %zu)",
                      item->u.l.n > n ? "too many" : "not enough", n, item->u.l.n);
    for (size_t i = 0; i < n; i++)
        scope_set(r, s, names[i], item->u.l.v[i]);
}

/* Memory of one loop iteration. What an iteration allocates (its scope, the values it computes,
 * the strings it writes out) is dead when it ends unless it escaped into an object made before
 * it: a namespace attribute (r->escapes) or an arena-held output buffer that had to grow (its
 * new storage is in the iteration's memory). Otherwise the arena goes back to where the
 * iteration started, so memory does not grow with the number of iterations. */
typedef struct iter_mark {
    tmpl_arena_mark mark;
    uint64_t escapes;
    tmpl_buf *out;
    const char *out_p;
} iter_mark;

static iter_mark iter_begin(tmpl_render *r)
{
    iter_mark m = {tmpl_arena_save(r->arena), r->escapes, r->out, r->out->p};
    return m;
}

static void iter_end(tmpl_render *r, const iter_mark *m)
{
    if (r->escapes != m->escapes || r->out != m->out) return;
    if (r->out->arena && r->out->p != m->out_p) return;
    tmpl_arena_restore(r->arena, m->mark);
}

static void run_loop(tmpl_render *r, const tnode *n, tscope *outer, tval *iterable, int64_t depth0)
{
    tval *items = tmpl_to_list(r, iterable);
    if (n->b) { /* loop filter: evaluated with the targets bound, before loop.* exists */
        tval *kept = tv_list(r->arena, items->u.l.n);
        for (size_t i = 0; i < items->u.l.n; i++) {
            tmpl_step(r);
            iter_mark im = iter_begin(r);
            tscope *fs = scope_new(r, outer);
            bind_targets(r, fs, n->names, n->nnames, items->u.l.v[i]);
            bool keep = tv_truthy(tmpl_eval_expr(r, n->b, fs));
            iter_end(r, &im);
            if (keep) tv_list_push(r->arena, kept, items->u.l.v[i]);
        }
        items = kept;
    }
    if (items->u.l.n == 0) {
        if (n->d) exec_body(r, n->d, scope_new(r, outer));
        return;
    }
    tloop *lp = tmpl_alloc(r->arena, sizeof *lp);
    lp->items = items;
    lp->length = (int64_t)items->u.l.n;
    lp->depth0 = depth0;
    lp->node = n;
    lp->outer = outer;
    tval *loopv = tv_new(r->arena, TV_LOOP);
    loopv->u.loop = lp;
    for (size_t i = 0; i < items->u.l.n; i++) {
        tmpl_step(r);
        lp->index0 = (int64_t)i;
        iter_mark im = iter_begin(r);
        tscope *s = scope_new(r, outer);
        bind_targets(r, s, n->names, n->nnames, items->u.l.v[i]);
        scope_set(r, s, "loop", loopv);
        exec_body(r, n->c, s);
        iter_end(r, &im);
        if (r->loop_ctl == 1) {
            r->loop_ctl = 0;
            break;
        }
        r->loop_ctl = 0;
    }
}

tval *tmpl_loop_recurse(tmpl_render *r, tval *loopv, tval *items)
{
    tloop *lp = loopv->u.loop;
    if (!lp->node->flag) tmpl_rt_error(r, "TypeError", "the loop is not recursive");
    if (++r->depth > r->max_depth)
        tmpl_raise(r->fail, FORGE_E_RANGE, r->line, "LimitError",
                   "recursive loop nested deeper than %d", r->max_depth);
    tmpl_buf buf = {.limit = r->max_output, .fail = r->fail, .arena = r->arena};
    tmpl_buf *saved = r->out;
    r->out = &buf;
    run_loop(r, lp->node, lp->outer, items, lp->depth0 + 1);
    r->out = saved;
    tval *res = tv_str_nocopy(r->arena, buf.p ? buf.p : "", buf.n);
    r->depth--;
    return res;
}

/* ---- statements -------------------------------------------------------------------------- */
/* {% set ns.name = v %}. A scalar goes into the attribute's own slot (ns_slot), in place once the
 * slot exists: nothing made in a loop iteration is kept, so the iteration's memory can go back.
 * Anything else (a string, list, ...) may be made in the iteration and now outlives it. */
static void set_ns_attr(tmpl_render *r, tval *ns, const char *name, tval *v)
{
    bool scalar = v->type == TV_NONE || v->type == TV_BOOL || v->type == TV_INT ||
                  v->type == TV_FLOAT;
    tval *slot = tv_dict_get(ns, name, strlen(name));
    if (scalar && slot && slot->ns_slot) {
        slot->type = v->type;
        slot->u = v->u;
        return;
    }
    if (scalar) {
        tval *c = tv_new(r->arena, v->type);
        c->u = v->u;
        c->ns_slot = true;
        v = c;
    }
    r->escapes++; /* v (or the new key) now outlives the loop iteration it was made in */
    tv_dict_set(r->arena, ns, tv_cstr(r->arena, name), v);
}

static tval *apply_filter_chain(tmpl_render *r, const tnode *f, tscope *s, tval *base);

static void exec_stmt(tmpl_render *r, const tnode *n, tscope *s)
{
    tmpl_step(r);
    r->line = n->line;
    switch (n->kind) {
    case N_BODY:
        exec_body(r, n, s);
        break;
    case N_TEXT:
        tmpl_buf_put(r->out, n->cval->u.s.p, n->cval->u.s.n);
        break;
    case N_OUTPUT:
        write_val(r, tmpl_eval_expr(r, n->a, s));
        break;
    case N_IF:
        if (tv_truthy(tmpl_eval_expr(r, n->a, s)))
            exec_body(r, n->b, s);
        else if (n->c)
            exec_stmt(r, n->c, s);
        break;
    case N_FOR: {
        tval *it = tmpl_eval_expr(r, n->a, s);
        r->line = n->line;
        run_loop(r, n, s, it, 0);
        break;
    }
    case N_SET: {
        tval *v = tmpl_eval_expr(r, n->b, s);
        r->line = n->line;
        if (n->flag) {
            tval *ns = scope_get(s, n->name);
            if (!ns) ns = tmpl_global(r, n->name);
            if (!ns || ns->type != TV_NS)
                tmpl_rt_error(r, "TemplateRuntimeError",
                              "cannot assign attribute on non-namespace object");
            set_ns_attr(r, ns, n->op, v);
        } else {
            bind_targets(r, s, n->names, n->nnames, v);
        }
        break;
    }
    case N_SET_BLOCK: {
        tval *v = capture(r, n->b, scope_new(r, s));
        if (n->c) v = apply_filter_chain(r, n->c, s, v);
        scope_set(r, s, n->names[0], v);
        break;
    }
    case N_MACRO: {
        tval *m = tv_new(r->arena, TV_MACRO);
        m->u.m.node = n;
        m->u.m.closure = s;
        scope_set(r, s, n->name, m);
        break;
    }
    case N_CALL_BLOCK: {
        tval *caller = tv_new(r->arena, TV_MACRO);
        caller->u.m.node = n; /* N_CALL_BLOCK: names = params, b = body */
        caller->u.m.closure = s;
        const tnode *call = n->a;
        tval *callee = tmpl_eval_expr(r, call->a, s);
        targs args = {0};
        args.npos = call->n;
        args.pos = tmpl_alloc(r->arena, (call->n + 1) * sizeof(tval *));
        for (size_t i = 0; i < call->n; i++)
            args.pos[i] = tmpl_eval_expr(r, call->list[i], s);
        args.nkw = call->n2 + 1;
        args.kwn = tmpl_alloc(r->arena, args.nkw * sizeof(char *));
        args.kwv = tmpl_alloc(r->arena, args.nkw * sizeof(tval *));
        for (size_t i = 0; i < call->n2; i++) {
            args.kwn[i] = call->names[i];
            args.kwv[i] = tmpl_eval_expr(r, call->list2[i], s);
        }
        args.kwn[call->n2] = "caller";
        args.kwv[call->n2] = caller;
        write_val(r, tmpl_call_value(r, s, callee, &args));
        break;
    }
    case N_FILTER_BLOCK: {
        tval *v = capture(r, n->b, scope_new(r, s));
        write_val(r, apply_filter_chain(r, n->a, s, v));
        break;
    }
    case N_BREAK:
        r->loop_ctl = 1;
        break;
    case N_CONTINUE:
        r->loop_ctl = 2;
        break;
    default:
        tmpl_rt_error(r, "TemplateError", "internal: bad statement node %d", n->kind);
    }
}

static void exec_body(tmpl_render *r, const tnode *n, tscope *s)
{
    for (size_t i = 0; i < n->n; i++) {
        exec_stmt(r, n->list[i], s);
        if (r->loop_ctl) return;
    }
}

void tmpl_eval_root(tmpl_render *r, const tnode *root)
{
    exec_body(r, root, r->globals);
}

/* ---- expressions ------------------------------------------------------------------------- */
static void eval_args(tmpl_render *r, const tnode *n, tscope *s, targs *args, size_t extra_front)
{
    args->npos = n->n + extra_front;
    args->pos = tmpl_alloc(r->arena, (args->npos + 1) * sizeof(tval *));
    for (size_t i = 0; i < n->n; i++)
        args->pos[extra_front + i] = tmpl_eval_expr(r, n->list[i], s);
    args->nkw = n->n2;
    args->kwn = n->names;
    args->kwv = tmpl_alloc(r->arena, (n->n2 + 1) * sizeof(tval *));
    for (size_t i = 0; i < n->n2; i++)
        args->kwv[i] = tmpl_eval_expr(r, n->list2[i], s);
}

static tval *apply_filter_chain(tmpl_render *r, const tnode *f, tscope *s, tval *base)
{
    if (f->kind == N_CONST && f->cval == NULL) return base;
    if (f->kind != N_FILTER) return tmpl_eval_expr(r, f, s);
    tval *v = apply_filter_chain(r, f->a, s, base);
    targs args;
    eval_args(r, f, s, &args, 0);
    r->line = f->line;
    return tmpl_call_filter(r, s, f->name, v, &args);
}

tval *tmpl_call_value(tmpl_render *r, tscope *s, tval *callee, targs *args)
{
    switch (callee->type) {
    case TV_MACRO:
        return call_macro(r, callee, args);
    case TV_FUNC:
        return tmpl_call_func(r, callee, args);
    case TV_JOINER:
        if (callee->u.cyc.pos++ == 0) return tv_str_nocopy(r->arena, "", 0);
        return callee->u.cyc.items;
    case TV_LOOP:
        if (args->npos != 1) tmpl_rt_error(r, "TypeError", "loop() takes exactly one argument");
        return tmpl_loop_recurse(r, callee, args->pos[0]);
    case TV_UNDEF:
        tmpl_rt_error(r, "UndefinedError", "%s",
                      callee->u.undef ? callee->u.undef : "'None' has no attribute");
    default:
        tmpl_rt_error(r, "TypeError", "'%s' object is not callable", tv_type_name(callee));
    }
}

static tval *eval_slice(tmpl_render *r, tval *obj, const tnode *sl, tscope *s)
{
    tval *st = sl->a ? tmpl_eval_expr(r, sl->a, s) : &tmpl_none;
    tval *en = sl->b ? tmpl_eval_expr(r, sl->b, s) : &tmpl_none;
    tval *sp = sl->c ? tmpl_eval_expr(r, sl->c, s) : &tmpl_none;
    if (obj->type == TV_UNDEF)
        tmpl_rt_error(r, "UndefinedError", "%s", obj->u.undef ? obj->u.undef : "undefined value");
    const tval *parts[3] = {st, en, sp};
    for (int k = 0; k < 3; k++)
        if (parts[k]->type != TV_NONE && parts[k]->type != TV_INT && parts[k]->type != TV_BOOL)
            tmpl_rt_error(r, "TypeError",
                          "slice indices must be integers or None or have an __index__ method");
    int64_t step = sp->type == TV_NONE ? 1 : sp->type == TV_BOOL ? sp->u.b : sp->u.i;
    if (step == 0) tmpl_rt_error(r, "ValueError", "slice step cannot be zero");
    /* operate on code points for strings */
    size_t len;
    size_t *offs = NULL;
    if (obj->type == TV_STR) {
        len = tmpl_utf8_len(obj->u.s.p, obj->u.s.n);
        offs = tmpl_alloc(r->arena, (len + 1) * sizeof *offs);
        tmpl_work(obj->u.s.n);
        size_t i = 0, k = 0;
        while (i < obj->u.s.n) {
            uint32_t cp;
            offs[k++] = i;
            i += tmpl_utf8_decode(obj->u.s.p + i, obj->u.s.n - i, &cp);
        }
        offs[len] = obj->u.s.n;
    } else if (obj->type == TV_LIST) {
        len = obj->u.l.n;
    } else if (obj->type == TV_DICT) {
        tmpl_rt_error(r, "TypeError", "unhashable type: 'slice'");
    } else {
        tmpl_rt_error(r, "TypeError", "'%s' object is not subscriptable", tv_type_name(obj));
    }
    int64_t L = (int64_t)len, a, b;
    int64_t def_a = step > 0 ? 0 : L - 1, def_b = step > 0 ? L : -1;
    if (st->type == TV_NONE) {
        a = def_a;
    } else {
        a = st->type == TV_BOOL ? st->u.b : st->u.i;
        if (a < 0) a += L;
        if (a < 0) a = step > 0 ? 0 : -1;
        if (a >= L) a = step > 0 ? L : L - 1;
    }
    if (en->type == TV_NONE) {
        b = def_b;
    } else {
        b = en->type == TV_BOOL ? en->u.b : en->u.i;
        if (b < 0) b += L;
        if (b < 0) b = step > 0 ? 0 : -1;
        if (b >= L) b = step > 0 ? L : L - 1;
    }
    if (obj->type == TV_STR) {
        if (step == 1) {
            if (b <= a) return tv_str(r->arena, "", 0);
            return tv_str_nocopy(r->arena, obj->u.s.p + offs[a], offs[b] - offs[a]);
        }
        char *out = tmpl_alloc(r->arena, obj->u.s.n + 1);
        size_t o = 0;
        for (int64_t i = a; step > 0 ? i < b : i > b;) {
            size_t cl = offs[i + 1] - offs[i];
            memcpy(out + o, obj->u.s.p + offs[i], cl);
            o += cl;
            if (__builtin_add_overflow(i, step, &i)) break; /* 'abc'[1::2**63-1] */
        }
        return tv_str_nocopy(r->arena, out, o);
    }
    tval *res = tv_list(r->arena, 0);
    res->is_tuple = obj->is_tuple;
    for (int64_t i = a; step > 0 ? i < b : i > b;) {
        tv_list_push(r->arena, res, obj->u.l.v[i]);
        if (__builtin_add_overflow(i, step, &i)) break;
    }
    return res;
}

static bool contains(tmpl_render *r, tval *item, tval *container)
{
    switch (container->type) {
    case TV_STR:
        if (item->type != TV_STR)
            tmpl_rt_error(r, "TypeError", "'in <string>' requires string as left operand, not %s",
                          tv_type_name(item));
        return tmpl_memfind(container->u.s.p, container->u.s.n, item->u.s.p, item->u.s.n) != NULL;
    case TV_LIST:
        for (size_t i = 0; i < container->u.l.n; i++)
            if (tv_equal(item, container->u.l.v[i])) return true;
        return false;
    case TV_DICT:
    case TV_NS:
        return tv_dict_getv(container, item) != NULL;
    case TV_UNDEF:
        return false;
    default:
        tmpl_rt_error(r, "TypeError", "argument of type '%s' is not iterable",
                      tv_type_name(container));
    }
}

static bool compare_op(tmpl_render *r, const char *op, tval *a, tval *b)
{
    if (!strcmp(op, "==")) return tv_equal(a, b);
    if (!strcmp(op, "!=")) return !tv_equal(a, b);
    if (!strcmp(op, "in")) return contains(r, a, b);
    if (!strcmp(op, "not in")) return !contains(r, a, b);
    if (a->type == TV_UNDEF || b->type == TV_UNDEF) {
        const tval *u = a->type == TV_UNDEF ? a : b;
        tmpl_rt_error(r, "UndefinedError", "%s", u->u.undef ? u->u.undef : "undefined value");
    }
    int c;
    if (!tv_compare(a, b, &c))
        tmpl_rt_error(r, "TypeError", "'%s' not supported between instances of '%s' and '%s'", op,
                      tv_type_name(a), tv_type_name(b));
    if (!strcmp(op, "<")) return c < 0;
    if (!strcmp(op, ">")) return c > 0;
    if (!strcmp(op, "<=")) return c <= 0;
    return c >= 0;
}

tval *tmpl_eval_expr(tmpl_render *r, const tnode *n, tscope *s)
{
    tmpl_step(r);
    r->line = n->line;
    tval *res = NULL;
    switch (n->kind) {
    case N_CONST:
        res = n->cval ? n->cval : &tmpl_none;
        break;
    case N_NAME: {
        res = scope_get(s, n->name);
        if (!res) res = tmpl_global(r, n->name);
        if (!res) {
            char *h = tmpl_alloc(r->arena, strlen(n->name) + 32);
            sprintf(h, "'%s' is undefined", n->name);
            res = tv_undef(r->arena, h);
        }
        break;
    }
    case N_GETATTR: {
        tval *obj = tmpl_eval_expr(r, n->a, s);
        r->line = n->line;
        res = tmpl_get_attr(r, obj, n->name, strlen(n->name));
        break;
    }
    case N_GETITEM: {
        tval *obj = tmpl_eval_expr(r, n->a, s);
        if (n->b->kind == N_SLICE) {
            res = eval_slice(r, obj, n->b, s);
        } else {
            tval *key = tmpl_eval_expr(r, n->b, s);
            r->line = n->line;
            res = tmpl_get_item(r, obj, key);
        }
        break;
    }
    case N_CALL: {
        tval *callee = tmpl_eval_expr(r, n->a, s);
        targs args;
        eval_args(r, n, s, &args, 0);
        r->line = n->line;
        res = tmpl_call_value(r, s, callee, &args);
        break;
    }
    case N_FILTER:
        res = apply_filter_chain(r, n, s, NULL);
        break;
    case N_TEST: {
        tval *v = tmpl_eval_expr(r, n->a, s);
        targs args;
        eval_args(r, n, s, &args, 0);
        r->line = n->line;
        bool t = tmpl_call_test(r, n->name, v, &args);
        res = tv_bool(n->flag ? !t : t);
        break;
    }
    case N_BINOP: {
        tval *a = tmpl_eval_expr(r, n->a, s);
        tval *b = tmpl_eval_expr(r, n->b, s);
        r->line = n->line;
        res = tmpl_binop(r, n->op, a, b);
        break;
    }
    case N_NEG:
    case N_POS: {
        tval *a = tmpl_eval_expr(r, n->a, s);
        r->line = n->line;
        if (a->type == TV_INT || a->type == TV_BOOL) {
            int64_t i = a->type == TV_BOOL ? a->u.b : a->u.i;
            if (n->kind == N_NEG && i == INT64_MIN)
                tmpl_rt_error(r, "OverflowError", "integer overflow");
            res = tv_int(r->arena, n->kind == N_NEG ? -i : i);
        } else if (a->type == TV_FLOAT) {
            res = tv_float(r->arena, n->kind == N_NEG ? -a->u.f : a->u.f);
        } else if (a->type == TV_UNDEF) {
            tmpl_rt_error(r, "UndefinedError", "%s", a->u.undef ? a->u.undef : "undefined value");
        } else {
            tmpl_rt_error(r, "TypeError", "bad operand type for unary %c: '%s'",
                          n->kind == N_NEG ? '-' : '+', tv_type_name(a));
        }
        break;
    }
    case N_NOT:
        res = tv_bool(!tv_truthy(tmpl_eval_expr(r, n->a, s)));
        break;
    case N_AND: {
        tval *a = tmpl_eval_expr(r, n->a, s);
        res = tv_truthy(a) ? tmpl_eval_expr(r, n->b, s) : a;
        break;
    }
    case N_OR: {
        tval *a = tmpl_eval_expr(r, n->a, s);
        res = tv_truthy(a) ? a : tmpl_eval_expr(r, n->b, s);
        break;
    }
    case N_COND:
        if (tv_truthy(tmpl_eval_expr(r, n->b, s)))
            res = tmpl_eval_expr(r, n->a, s);
        else
            res = n->c ? tmpl_eval_expr(r, n->c, s) : tv_undef(r->arena, NULL);
        break;
    case N_LIST:
    case N_TUPLE:
        res = tv_list(r->arena, n->n);
        res->is_tuple = n->kind == N_TUPLE;
        for (size_t i = 0; i < n->n; i++)
            res->u.l.v[i] = tmpl_eval_expr(r, n->list[i], s);
        res->u.l.n = n->n;
        break;
    case N_DICT:
        res = tv_dict(r->arena, TV_DICT);
        for (size_t i = 0; i < n->n; i++) {
            tval *k = tmpl_eval_expr(r, n->list[i], s);
            tval *v = tmpl_eval_expr(r, n->list2[i], s);
            if (k->type == TV_LIST && !k->is_tuple)
                tmpl_rt_error(r, "TypeError", "unhashable type: 'list'");
            if (k->type == TV_DICT) tmpl_rt_error(r, "TypeError", "unhashable type: 'dict'");
            tv_dict_set(r->arena, res, k, v);
        }
        break;
    case N_CONCAT: {
        tmpl_buf buf = {.limit = r->max_output, .fail = r->fail, .arena = r->arena};
        for (size_t i = 0; i < n->n; i++)
            tv_to_str(&buf, tmpl_eval_expr(r, n->list[i], s));
        res = tv_str_nocopy(r->arena, buf.p ? buf.p : "", buf.n);
        break;
    }
    case N_COMPARE: {
        tval *left = tmpl_eval_expr(r, n->a, s);
        bool ok = true;
        for (size_t i = 0; i < n->n && ok; i++) {
            tval *right = tmpl_eval_expr(r, n->list[i], s);
            r->line = n->line;
            ok = compare_op(r, n->names[i], left, right);
            left = right;
        }
        res = tv_bool(ok);
        break;
    }
    default:
        tmpl_rt_error(r, "TemplateError", "internal: bad expression node %d", n->kind);
    }
    return res;
}
