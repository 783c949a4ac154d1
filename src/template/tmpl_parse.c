/* tmpl_parse.c - Jinja2 parser: tokens (tmpl_lex.c) to an AST of tnode (tmpl.h), following the
 * grammar and operator precedence of jinja2/parser.py. Bounded nesting depth. */
#include <stdio.h>
#include <string.h>

#include "template/tmpl.h"

#define PARSE_MAX_DEPTH 100

typedef struct parser {
    tmpl_arena *a;
    const tmpl_tokens *t;
    size_t i;
    int depth;
} parser;

_Noreturn static void perr(parser *P, const char *fmt, const char *arg)
{
    int line = P->t->v[P->i < P->t->n ? P->i : P->t->n - 1].line;
    tmpl_raise(P->a->fail, FORGE_E_FORMAT, line, "TemplateSyntaxError", fmt, arg);
}

static const ttok *cur(parser *P)
{
    return &P->t->v[P->i];
}

static const ttok *peek(parser *P, size_t k)
{
    size_t j = P->i + k;
    return &P->t->v[j < P->t->n ? j : P->t->n - 1];
}

static bool tok_is(const ttok *t, int type, const char *s)
{
    if (t->type != type) return false;
    if (!s) return true;
    size_t n = strlen(s);
    return t->n == n && !memcmp(t->p, s, n);
}

static bool is_op(parser *P, const char *s)
{
    return tok_is(cur(P), TK_OP, s);
}

static bool is_name(parser *P, const char *s)
{
    return tok_is(cur(P), TK_NAME, s);
}

static void advance(parser *P)
{
    if (P->i + 1 < P->t->n) P->i++;
}

static const char *tok_desc(parser *P)
{
    const ttok *t = cur(P);
    switch (t->type) {
    case TK_EOF:
        return "end of template";
    case TK_BLOCK_END:
        return "end of statement block";
    case TK_VAR_END:
        return "end of print statement";
    case TK_TEXT:
        return "template data";
    default:
        break;
    }
    char *s = tmpl_alloc(P->a, t->n + 3);
    snprintf(s, t->n + 3, "'%.*s'", (int)t->n, t->p ? t->p : "");
    return s;
}

static void expect_op(parser *P, const char *s)
{
    if (!is_op(P, s)) {
        char msg[160];
        snprintf(msg, sizeof msg, "expected token '%s', got %%s", s);
        tmpl_raise(P->a->fail, FORGE_E_FORMAT, cur(P)->line, "TemplateSyntaxError", msg,
                   tok_desc(P));
    }
    advance(P);
}

static const char *expect_name(parser *P)
{
    if (cur(P)->type != TK_NAME) perr(P, "expected a name, got %s", tok_desc(P));
    const char *s = tmpl_strndup(P->a, cur(P)->p, cur(P)->n);
    advance(P);
    return s;
}

static void expect_block_end(parser *P)
{
    if (cur(P)->type != TK_BLOCK_END)
        perr(P, "expected end of statement block, got %s", tok_desc(P));
    advance(P);
}

static tnode *node(parser *P, int kind)
{
    tnode *n = tmpl_alloc(P->a, sizeof *n);
    n->kind = kind;
    n->line = cur(P)->line;
    return n;
}

typedef struct nvec {
    tnode **v;
    size_t n, cap;
} nvec;

static void nv_push(parser *P, nvec *v, tnode *x)
{
    if (v->n == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 4;
        tnode **nv = tmpl_alloc(P->a, cap * sizeof *nv);
        if (v->n) memcpy(nv, v->v, v->n * sizeof *nv);
        v->v = nv;
        v->cap = cap;
    }
    v->v[v->n++] = x;
}

typedef struct svec {
    const char **v;
    size_t n, cap;
} svec;

static void sv_push(parser *P, svec *v, const char *x)
{
    if (v->n == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 4;
        const char **nv = tmpl_alloc(P->a, cap * sizeof *nv);
        if (v->n) memcpy(nv, v->v, v->n * sizeof *nv);
        v->v = nv;
        v->cap = cap;
    }
    v->v[v->n++] = x;
}

static void enter(parser *P)
{
    if (++P->depth > PARSE_MAX_DEPTH) perr(P, "template nested too deeply (%s)", "limit 100");
}

static tnode *parse_expr(parser *P);
static tnode *parse_or(parser *P);
static tnode *parse_unary(parser *P, bool with_filter);

/* call arguments after '(' : fills list/n and names/list2/n2 */
static void parse_args(parser *P, tnode *n)
{
    nvec pos = {0}, kwv = {0};
    svec kwn = {0};
    expect_op(P, "(");
    while (!is_op(P, ")")) {
        if (pos.n || kwv.n) expect_op(P, ",");
        if (is_op(P, ")")) break;
        if (cur(P)->type == TK_NAME && tok_is(peek(P, 1), TK_OP, "=")) {
            sv_push(P, &kwn, expect_name(P));
            advance(P);
            nv_push(P, &kwv, parse_expr(P));
        } else {
            if (kwv.n) perr(P, "positional argument follows keyword argument%s", "");
            nv_push(P, &pos, parse_expr(P));
        }
    }
    advance(P);
    n->list = pos.v;
    n->n = pos.n;
    n->names = kwn.v;
    n->list2 = kwv.v;
    n->n2 = kwv.n;
}

static tnode *parse_primary(parser *P)
{
    const ttok *t = cur(P);
    tnode *n;
    if (t->type == TK_NAME) {
        static const char *const consts[] = {"true", "false", "none", "True", "False", "None"};
        for (size_t k = 0; k < FORGE_ARRAY_LEN(consts); k++)
            if (tok_is(t, TK_NAME, consts[k])) {
                n = node(P, N_CONST);
                n->cval = k % 3 == 0 ? &tmpl_true : k % 3 == 1 ? &tmpl_false : &tmpl_none;
                advance(P);
                return n;
            }
        n = node(P, N_NAME);
        n->name = expect_name(P);
        return n;
    }
    if (t->type == TK_STRING) {
        n = node(P, N_CONST);
        /* adjacent string literals concatenate */
        size_t total = 0, k = P->i;
        while (P->t->v[k].type == TK_STRING)
            total += P->t->v[k++].n;
        char *s = tmpl_alloc(P->a, total + 1);
        size_t o = 0;
        while (cur(P)->type == TK_STRING) {
            if (cur(P)->n) memcpy(s + o, cur(P)->p, cur(P)->n);
            o += cur(P)->n;
            advance(P);
        }
        n->cval = tv_str_nocopy(P->a, s, o);
        return n;
    }
    if (t->type == TK_INT || t->type == TK_FLOAT) {
        n = node(P, N_CONST);
        n->cval = t->type == TK_INT ? tv_int(P->a, t->i) : tv_float(P->a, t->f);
        advance(P);
        return n;
    }
    if (tok_is(t, TK_OP, "(")) {
        advance(P);
        if (is_op(P, ")")) {
            advance(P);
            n = node(P, N_TUPLE);
            return n;
        }
        tnode *first = parse_expr(P);
        if (is_op(P, ",")) {
            nvec items = {0};
            nv_push(P, &items, first);
            while (is_op(P, ",")) {
                advance(P);
                if (is_op(P, ")")) break;
                nv_push(P, &items, parse_expr(P));
            }
            n = node(P, N_TUPLE);
            n->list = items.v;
            n->n = items.n;
            first = n;
        }
        expect_op(P, ")");
        return first;
    }
    if (tok_is(t, TK_OP, "[")) {
        n = node(P, N_LIST);
        advance(P);
        nvec items = {0};
        while (!is_op(P, "]")) {
            if (items.n) expect_op(P, ",");
            if (is_op(P, "]")) break;
            nv_push(P, &items, parse_expr(P));
        }
        advance(P);
        n->list = items.v;
        n->n = items.n;
        return n;
    }
    if (tok_is(t, TK_OP, "{")) {
        n = node(P, N_DICT);
        advance(P);
        nvec keys = {0}, vals = {0};
        while (!is_op(P, "}")) {
            if (keys.n) expect_op(P, ",");
            if (is_op(P, "}")) break;
            nv_push(P, &keys, parse_expr(P));
            expect_op(P, ":");
            nv_push(P, &vals, parse_expr(P));
        }
        advance(P);
        n->list = keys.v;
        n->list2 = vals.v;
        n->n = keys.n;
        return n;
    }
    perr(P, "unexpected %s", tok_desc(P));
}

static tnode *parse_subscript(parser *P, tnode *obj)
{
    tnode *n;
    if (is_op(P, ".")) {
        advance(P);
        n = node(P, N_GETATTR);
        n->a = obj;
        if (cur(P)->type == TK_NAME) {
            n->name = expect_name(P);
        } else if (cur(P)->type == TK_INT) {
            n->kind = N_GETITEM;
            n->b = node(P, N_CONST);
            n->b->cval = tv_int(P->a, cur(P)->i);
            advance(P);
        } else {
            perr(P, "expected name or number after '.', got %s", tok_desc(P));
        }
        return n;
    }
    /* '[' */
    advance(P);
    n = node(P, N_GETITEM);
    n->a = obj;
    tnode *parts[3] = {NULL, NULL, NULL};
    bool is_slice = false;
    int k = 0;
    for (;;) {
        if (is_op(P, ":")) {
            is_slice = true;
            if (++k > 2) perr(P, "bad slice %s", tok_desc(P));
            advance(P);
            continue;
        }
        if (is_op(P, "]")) break;
        if (parts[k]) perr(P, "expected ']' , got %s", tok_desc(P));
        parts[k] = parse_expr(P);
        if (!is_op(P, ":") && !is_op(P, "]")) {
            if (is_op(P, ",")) { /* tuple index: build tuple */
                nvec items = {0};
                nv_push(P, &items, parts[k]);
                while (is_op(P, ",")) {
                    advance(P);
                    if (is_op(P, "]")) break;
                    nv_push(P, &items, parse_expr(P));
                }
                tnode *tup = node(P, N_TUPLE);
                tup->list = items.v;
                tup->n = items.n;
                parts[k] = tup;
            } else {
                perr(P, "expected ']', got %s", tok_desc(P));
            }
        }
    }
    advance(P);
    if (is_slice) {
        tnode *sl = node(P, N_SLICE);
        sl->a = parts[0];
        sl->b = parts[1];
        sl->c = parts[2];
        n->b = sl;
    } else {
        if (!parts[0]) perr(P, "expected an index, got %s", "']'");
        n->b = parts[0];
    }
    return n;
}

static tnode *parse_postfix(parser *P, tnode *n)
{
    for (;;) {
        if (is_op(P, ".") || is_op(P, "[")) {
            n = parse_subscript(P, n);
        } else if (is_op(P, "(")) {
            tnode *c = node(P, N_CALL);
            c->a = n;
            parse_args(P, c);
            n = c;
        } else {
            return n;
        }
    }
}

static tnode *parse_filter(parser *P, tnode *n)
{
    while (is_op(P, "|")) {
        advance(P);
        tnode *f = node(P, N_FILTER);
        f->a = n;
        f->name = expect_name(P);
        while (is_op(P, ".")) { /* dotted filter names: keep the last part */
            advance(P);
            f->name = expect_name(P);
        }
        if (is_op(P, "(")) parse_args(P, f);
        n = f;
    }
    return n;
}

static bool starts_test_arg(parser *P)
{
    const ttok *t = cur(P);
    if (t->type == TK_NAME)
        return !tok_is(t, TK_NAME, "else") && !tok_is(t, TK_NAME, "or") &&
               !tok_is(t, TK_NAME, "and") && !tok_is(t, TK_NAME, "if") &&
               !tok_is(t, TK_NAME, "is") && !tok_is(t, TK_NAME, "in") &&
               !tok_is(t, TK_NAME, "not") && !tok_is(t, TK_NAME, "recursive");
    if (t->type == TK_STRING || t->type == TK_INT || t->type == TK_FLOAT) return true;
    return tok_is(t, TK_OP, "[") || tok_is(t, TK_OP, "{") || tok_is(t, TK_OP, "-");
}

static tnode *parse_filter_expr(parser *P, tnode *n)
{
    for (;;) {
        if (is_op(P, "|")) {
            n = parse_filter(P, n);
        } else if (is_name(P, "is")) {
            advance(P);
            tnode *t = node(P, N_TEST);
            t->a = n;
            if (is_name(P, "not")) {
                t->flag = true;
                advance(P);
            }
            t->name = expect_name(P);
            while (is_op(P, ".")) {
                advance(P);
                t->name = expect_name(P);
            }
            if (is_op(P, "(")) {
                parse_args(P, t);
            } else if (starts_test_arg(P)) {
                tnode *arg = parse_primary(P);
                arg = parse_postfix(P, arg);
                t->list = tmpl_alloc(P->a, sizeof(tnode *));
                t->list[0] = arg;
                t->n = 1;
            }
            n = t;
        } else if (is_op(P, "(")) {
            tnode *c = node(P, N_CALL);
            c->a = n;
            parse_args(P, c);
            n = c;
        } else {
            return n;
        }
    }
}

static tnode *parse_unary(parser *P, bool with_filter)
{
    enter(P);
    tnode *n;
    if (is_op(P, "-") || is_op(P, "+")) {
        n = node(P, is_op(P, "-") ? N_NEG : N_POS);
        advance(P);
        n->a = parse_unary(P, false);
    } else {
        n = parse_primary(P);
    }
    n = parse_postfix(P, n);
    if (with_filter) n = parse_filter_expr(P, n);
    P->depth--;
    return n;
}

static tnode *binop(parser *P, const char *op, tnode *l, tnode *r)
{
    tnode *n = node(P, N_BINOP);
    n->op = op;
    n->a = l;
    n->b = r;
    return n;
}

static tnode *parse_pow(parser *P)
{
    tnode *l = parse_unary(P, true);
    while (is_op(P, "**")) {
        advance(P);
        l = binop(P, "**", l, parse_unary(P, true));
    }
    return l;
}

static tnode *parse_math2(parser *P)
{
    tnode *l = parse_pow(P);
    for (;;) {
        const char *op = is_op(P, "*")    ? "*"
                         : is_op(P, "/")  ? "/"
                         : is_op(P, "//") ? "//"
                         : is_op(P, "%")  ? "%"
                                          : NULL;
        if (!op) return l;
        advance(P);
        l = binop(P, op, l, parse_pow(P));
    }
}

static tnode *parse_concat(parser *P)
{
    tnode *first = parse_math2(P);
    if (!is_op(P, "~")) return first;
    nvec items = {0};
    nv_push(P, &items, first);
    while (is_op(P, "~")) {
        advance(P);
        nv_push(P, &items, parse_math2(P));
    }
    tnode *n = node(P, N_CONCAT);
    n->list = items.v;
    n->n = items.n;
    return n;
}

static tnode *parse_math1(parser *P)
{
    tnode *l = parse_concat(P);
    for (;;) {
        const char *op = is_op(P, "+") ? "+" : is_op(P, "-") ? "-" : NULL;
        if (!op) return l;
        advance(P);
        l = binop(P, op, l, parse_concat(P));
    }
}

static tnode *parse_compare(parser *P)
{
    tnode *first = parse_math1(P);
    nvec operands = {0};
    svec ops = {0};
    for (;;) {
        const char *op = NULL;
        static const char *const cmp[] = {"==", "!=", "<", ">", "<=", ">="};
        for (size_t k = 0; k < FORGE_ARRAY_LEN(cmp); k++)
            if (is_op(P, cmp[k])) op = cmp[k];
        if (op) {
            advance(P);
        } else if (is_name(P, "in")) {
            op = "in";
            advance(P);
        } else if (is_name(P, "not") && tok_is(peek(P, 1), TK_NAME, "in")) {
            op = "not in";
            advance(P);
            advance(P);
        } else {
            break;
        }
        sv_push(P, &ops, op);
        nv_push(P, &operands, parse_math1(P));
    }
    if (!ops.n) return first;
    tnode *n = node(P, N_COMPARE);
    n->a = first;
    n->names = ops.v;
    n->nnames = ops.n;
    n->list = operands.v;
    n->n = operands.n;
    return n;
}

static tnode *parse_not(parser *P)
{
    if (is_name(P, "not")) {
        enter(P);
        tnode *n = node(P, N_NOT);
        advance(P);
        n->a = parse_not(P);
        P->depth--;
        return n;
    }
    return parse_compare(P);
}

static tnode *parse_and(parser *P)
{
    tnode *l = parse_not(P);
    while (is_name(P, "and")) {
        advance(P);
        tnode *n = node(P, N_AND);
        n->a = l;
        n->b = parse_not(P);
        l = n;
    }
    return l;
}

static tnode *parse_or(parser *P)
{
    tnode *l = parse_and(P);
    while (is_name(P, "or")) {
        advance(P);
        tnode *n = node(P, N_OR);
        n->a = l;
        n->b = parse_and(P);
        l = n;
    }
    return l;
}

static tnode *parse_expr(parser *P)
{
    enter(P);
    tnode *n = parse_or(P);
    while (is_name(P, "if")) {
        advance(P);
        tnode *c = node(P, N_COND);
        c->a = n;
        c->b = parse_or(P);
        if (is_name(P, "else")) {
            advance(P);
            c->c = parse_expr(P);
        }
        n = c;
    }
    P->depth--;
    return n;
}

/* expression list that becomes a tuple when it has commas (print/set values) */
static tnode *parse_tuple(parser *P)
{
    tnode *first = parse_expr(P);
    if (!is_op(P, ",")) return first;
    nvec items = {0};
    nv_push(P, &items, first);
    while (is_op(P, ",")) {
        advance(P);
        if (cur(P)->type == TK_BLOCK_END || cur(P)->type == TK_VAR_END) break;
        nv_push(P, &items, parse_expr(P));
    }
    tnode *n = node(P, N_TUPLE);
    n->list = items.v;
    n->n = items.n;
    return n;
}

/* ---- statements -------------------------------------------------------------------------- */
static tnode *parse_body(parser *P, const char *const *ends, size_t nends, const char *block);

static void parse_targets(parser *P, svec *names)
{
    bool paren = false;
    if (is_op(P, "(")) {
        paren = true;
        advance(P);
    }
    sv_push(P, names, expect_name(P));
    while (is_op(P, ",")) {
        advance(P);
        if (paren && is_op(P, ")")) break;
        sv_push(P, names, expect_name(P));
    }
    if (paren) expect_op(P, ")");
}

static tnode *parse_if(parser *P)
{
    static const char *const ends[] = {"elif", "else", "endif"};
    tnode *n = node(P, N_IF);
    n->a = parse_tuple(P);
    expect_block_end(P);
    n->b = parse_body(P, ends, 3, "if");
    if (is_name(P, "elif")) {
        advance(P);
        n->c = parse_if(P);
        return n;
    }
    if (is_name(P, "else")) {
        advance(P);
        expect_block_end(P);
        static const char *const ends2[] = {"endif"};
        n->c = parse_body(P, ends2, 1, "if");
    }
    advance(P); /* endif */
    expect_block_end(P);
    return n;
}

static tnode *parse_for(parser *P)
{
    tnode *n = node(P, N_FOR);
    svec names = {0};
    parse_targets(P, &names);
    n->names = names.v;
    n->nnames = names.n;
    if (!is_name(P, "in")) perr(P, "expected 'in' in for loop, got %s", tok_desc(P));
    advance(P);
    /* iterable: no conditional expression (its `if` is the loop filter) */
    tnode *it = parse_or(P);
    if (is_op(P, ",")) {
        nvec items = {0};
        nv_push(P, &items, it);
        while (is_op(P, ",")) {
            advance(P);
            nv_push(P, &items, parse_or(P));
        }
        it = node(P, N_TUPLE);
        it->list = items.v;
        it->n = items.n;
    }
    n->a = it;
    if (is_name(P, "if")) {
        advance(P);
        n->b = parse_expr(P);
    }
    if (is_name(P, "recursive")) {
        advance(P);
        n->flag = true;
    }
    expect_block_end(P);
    static const char *const ends[] = {"endfor", "else"};
    n->c = parse_body(P, ends, 2, "for");
    if (is_name(P, "else")) {
        advance(P);
        expect_block_end(P);
        static const char *const ends2[] = {"endfor"};
        n->d = parse_body(P, ends2, 1, "for");
    }
    advance(P);
    expect_block_end(P);
    return n;
}

static tnode *parse_set(parser *P)
{
    tnode *n = node(P, N_SET);
    const char *first = expect_name(P);
    svec names = {0};
    if (is_op(P, ".")) {
        advance(P);
        n->flag = true;
        n->name = first;
        n->op = expect_name(P);
    } else {
        sv_push(P, &names, first);
        while (is_op(P, ",")) {
            advance(P);
            sv_push(P, &names, expect_name(P));
        }
    }
    n->names = names.v;
    n->nnames = names.n;
    if (is_op(P, "=")) {
        advance(P);
        n->b = parse_tuple(P);
        expect_block_end(P);
        return n;
    }
    /* block set */
    if (n->flag || names.n != 1) perr(P, "expected '=' in set, got %s", tok_desc(P));
    n->kind = N_SET_BLOCK;
    if (is_op(P, "|")) { /* {% set x | filter %} */
        tnode *base = node(P, N_CONST);
        base->cval = NULL;
        n->c = parse_filter(P, base);
    }
    expect_block_end(P);
    static const char *const ends[] = {"endset"};
    n->b = parse_body(P, ends, 1, "set");
    advance(P);
    expect_block_end(P);
    return n;
}

static void parse_params(parser *P, tnode *n)
{
    svec names = {0};
    nvec defs = {0};
    expect_op(P, "(");
    while (!is_op(P, ")")) {
        if (names.n) expect_op(P, ",");
        if (is_op(P, ")")) break;
        sv_push(P, &names, expect_name(P));
        if (is_op(P, "=")) {
            advance(P);
            nv_push(P, &defs, parse_expr(P));
        } else {
            if (defs.n && defs.v[defs.n - 1])
                perr(P, "non-default argument follows default argument%s", "");
            nv_push(P, &defs, NULL);
        }
    }
    advance(P);
    n->names = names.v;
    n->nnames = names.n;
    n->list2 = defs.v;
    n->n2 = defs.n;
}

static tnode *parse_macro(parser *P)
{
    tnode *n = node(P, N_MACRO);
    n->name = expect_name(P);
    parse_params(P, n);
    expect_block_end(P);
    static const char *const ends[] = {"endmacro"};
    n->b = parse_body(P, ends, 1, "macro");
    advance(P);
    if (cur(P)->type == TK_NAME) advance(P); /* {% endmacro name %} */
    expect_block_end(P);
    return n;
}

static tnode *parse_call_block(parser *P)
{
    tnode *n = node(P, N_CALL_BLOCK);
    if (is_op(P, "(")) parse_params(P, n);
    n->a = parse_expr(P);
    if (n->a->kind != N_CALL) perr(P, "expected a call in call block%s", "");
    expect_block_end(P);
    static const char *const ends[] = {"endcall"};
    n->b = parse_body(P, ends, 1, "call");
    advance(P);
    expect_block_end(P);
    return n;
}

static tnode *parse_filter_block(parser *P)
{
    tnode *n = node(P, N_FILTER_BLOCK);
    tnode *base = node(P, N_CONST);
    base->cval = NULL;
    /* parse_filter expects a leading '|': emulate it */
    tnode *f = node(P, N_FILTER);
    f->a = base;
    f->name = expect_name(P);
    if (is_op(P, "(")) parse_args(P, f);
    n->a = parse_filter(P, f);
    expect_block_end(P);
    static const char *const ends[] = {"endfilter"};
    n->b = parse_body(P, ends, 1, "filter");
    advance(P);
    expect_block_end(P);
    return n;
}

static tnode *parse_statement(parser *P)
{
    const ttok *t = cur(P);
    if (t->type != TK_NAME) perr(P, "tag name expected, got %s", tok_desc(P));
    char name[32];
    snprintf(name, sizeof name, "%.*s", (int)(t->n < 31 ? t->n : 31), t->p);
    advance(P);
    enter(P);
    tnode *n;
    if (!strcmp(name, "if"))
        n = parse_if(P);
    else if (!strcmp(name, "for"))
        n = parse_for(P);
    else if (!strcmp(name, "set"))
        n = parse_set(P);
    else if (!strcmp(name, "macro"))
        n = parse_macro(P);
    else if (!strcmp(name, "call"))
        n = parse_call_block(P);
    else if (!strcmp(name, "filter"))
        n = parse_filter_block(P);
    else if (!strcmp(name, "break") || !strcmp(name, "continue")) {
        n = node(P, name[0] == 'b' ? N_BREAK : N_CONTINUE);
        expect_block_end(P);
    } else if (!strcmp(name, "generation")) {
        expect_block_end(P);
        static const char *const ends[] = {"endgeneration"};
        n = parse_body(P, ends, 1, "generation");
        advance(P);
        expect_block_end(P);
    } else {
        P->i--;
        perr(P, "Encountered unknown tag %s.", tok_desc(P));
    }
    P->depth--;
    return n;
}

static tnode *parse_body(parser *P, const char *const *ends, size_t nends, const char *block)
{
    tnode *body = node(P, N_BODY);
    nvec items = {0};
    for (;;) {
        const ttok *t = cur(P);
        if (t->type == TK_EOF) {
            if (nends) {
                char tags[120] = "", msg[300];
                for (size_t k = 0; k < nends; k++) {
                    size_t l = strlen(tags);
                    snprintf(tags + l, sizeof tags - l, "%s'%s'", k ? " or " : "", ends[k]);
                }
                snprintf(msg, sizeof msg,
                         "Unexpected end of template. Jinja was looking for the following tags: "
                         "%s. The innermost block that needs to be closed is '%s'.",
                         tags, block);
                tmpl_raise(P->a->fail, FORGE_E_FORMAT, t->line, "TemplateSyntaxError", "%s", msg);
            }
            break;
        }
        if (t->type == TK_TEXT) {
            tnode *n = node(P, N_TEXT);
            n->cval = tv_str_nocopy(P->a, t->p, t->n);
            nv_push(P, &items, n);
            advance(P);
        } else if (t->type == TK_VAR_BEGIN) {
            advance(P);
            tnode *n = node(P, N_OUTPUT);
            n->a = parse_tuple(P);
            if (cur(P)->type != TK_VAR_END)
                perr(P, "expected end of print statement, got %s", tok_desc(P));
            advance(P);
            nv_push(P, &items, n);
        } else if (t->type == TK_BLOCK_BEGIN) {
            advance(P);
            for (size_t k = 0; k < nends; k++)
                if (is_name(P, ends[k])) goto done;
            static const char *const stray[] = {"endif",   "endfor",    "elif",
                                                "else",    "endset",    "endmacro",
                                                "endcall", "endfilter", "endgeneration"};
            for (size_t k = 0; k < FORGE_ARRAY_LEN(stray); k++)
                if (is_name(P, stray[k])) perr(P, "Encountered unknown tag %s.", tok_desc(P));
            nv_push(P, &items, parse_statement(P));
        } else {
            perr(P, "unexpected %s", tok_desc(P));
        }
    }
done:
    body->list = items.v;
    body->n = items.n;
    return body;
}

tnode *tmpl_parse(tmpl_arena *a, const tmpl_tokens *toks)
{
    parser P = {.a = a, .t = toks, .i = 0};
    return parse_body(&P, NULL, 0, NULL);
}
