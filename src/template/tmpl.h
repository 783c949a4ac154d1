/* tmpl.h - internals of the chat-template engine (src/template/): arena, values, tokens, AST.
 *
 * Memory: every value and AST node lives in an arena (tmpl_arena) that is freed as a whole; a
 * parsed template owns one arena for its AST, each rendering owns another for its values. So no
 * value is ever freed alone and an error can unwind with longjmp (tmpl_raise) without leaking:
 * the arena and output buffers are owned by the frame that called setjmp. This keeps the
 * evaluator, which has hundreds of failure points, as plain as the Jinja semantics it mirrors.
 * Not part of the public API.
 */
#ifndef FORGE_TMPL_H
#define FORGE_TMPL_H

#include <setjmp.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/util.h"

/* ---- failure: longjmp target with a message ------------------------------------------------ */
typedef struct tmpl_fail {
    jmp_buf jb;
    int code;      /* FORGE_E_* */
    int line;      /* template line, 0 if unknown */
    char type[32]; /* Python-like exception class name */
    char msg[512];
} tmpl_fail;

_Noreturn void tmpl_raise(tmpl_fail *f, int code, int line, const char *type, const char *fmt, ...)
    FORGE_PRINTF(5, 6);

/* ---- arena ------------------------------------------------------------------------------- */
typedef struct tmpl_chunk tmpl_chunk;
typedef struct tmpl_arena {
    tmpl_chunk *head;
    tmpl_chunk *spare; /* one released chunk kept for reuse (not counted in used) */
    size_t used;       /* bytes of the chunks in the list (handed out or not) + overhead */
    size_t limit;      /* raise LimitError beyond this */
    tmpl_fail *fail;
} tmpl_arena;

void *tmpl_alloc(tmpl_arena *a, size_t n); /* zeroed; raises on limit; charged as work */
char *tmpl_strndup(tmpl_arena *a, const char *s, size_t n);
void tmpl_arena_free(tmpl_arena *a);

/* A position in an arena. Restoring it frees everything allocated since, so a loop iteration
 * whose values cannot outlive it (see run_loop in tmpl_eval.c) costs no memory afterwards. */
typedef struct tmpl_arena_mark {
    tmpl_chunk *head;
    size_t head_used, used;
} tmpl_arena_mark;
tmpl_arena_mark tmpl_arena_save(const tmpl_arena *a);
void tmpl_arena_restore(tmpl_arena *a, tmpl_arena_mark m);

/* growable byte buffer: grows inside `arena` when set (nothing to free), else with realloc
 * (the creator frees p) */
typedef struct tmpl_buf {
    char *p;
    size_t n, cap;
    size_t limit;
    tmpl_fail *fail;
    tmpl_arena *arena;
} tmpl_buf;
void tmpl_buf_put(tmpl_buf *b, const char *s, size_t n);
void tmpl_buf_puts(tmpl_buf *b, const char *s);
void tmpl_buf_putc(tmpl_buf *b, char c);
void tmpl_buf_printf(tmpl_buf *b, const char *fmt, ...) FORGE_PRINTF(2, 3);

/* ---- values ------------------------------------------------------------------------------ */
enum {
    TV_UNDEF,
    TV_NONE,
    TV_BOOL,
    TV_INT,
    TV_FLOAT,
    TV_STR,
    TV_LIST, /* also tuples (is_tuple) */
    TV_DICT,
    TV_NS,    /* namespace(): a dict with mutable attributes */
    TV_LOOP,  /* the `loop` variable of a for */
    TV_MACRO, /* macro or caller */
    TV_FUNC,  /* builtin global function or bound method */
    TV_CYCLER,
    TV_JOINER,
};

typedef struct tval tval;
struct tnode;
struct tscope;

typedef struct tloop {
    int64_t index0, length, depth0;
    tval *items;              /* the list iterated */
    const struct tnode *node; /* the N_FOR node, for `recursive` loops */
    struct tscope *outer;     /* scope the loop runs in */
} tloop;

struct tval {
    int type;
    bool is_tuple;
    /* a namespace attribute's own scalar, overwritten in place by the next {% set ns.x = %} of
     * a scalar (so a loop doing that keeps no memory per iteration): it is never handed out,
     * readers get a copy (tmpl_ns_value) */
    bool ns_slot;
    union {
        bool b;
        int64_t i;
        double f;
        struct {
            const char *p;
            size_t n;
        } s;
        struct {
            tval **v;
            size_t n, cap;
        } l;
        struct {
            tval **k, **v;
            size_t n, cap;
        } d;
        tloop *loop;
        struct {
            const struct tnode *node; /* N_MACRO node, or the call-block node for caller */
            struct tscope *closure;
            tval *caller; /* value passed as `caller` when invoked from a call block */
        } m;
        struct {
            int id;
            tval *self;
            const char *name;
        } fn;
        struct {
            tval *items;
            int64_t pos;
        } cyc;
        const char *undef; /* for TV_UNDEF: the hint ("'x' is undefined"), may be NULL */
    } u;
};

extern tval tmpl_undef_plain, tmpl_none, tmpl_true, tmpl_false;

tval *tv_new(tmpl_arena *a, int type);
tval *tv_int(tmpl_arena *a, int64_t i);
tval *tv_float(tmpl_arena *a, double f);
tval *tv_bool(bool b);
tval *tv_str(tmpl_arena *a, const char *p, size_t n); /* copies */
tval *tv_str_nocopy(tmpl_arena *a, const char *p, size_t n);
tval *tv_cstr(tmpl_arena *a, const char *s);
tval *tv_list(tmpl_arena *a, size_t cap);
void tv_list_push(tmpl_arena *a, tval *l, tval *v);
tval *tv_dict(tmpl_arena *a, int type);
void tv_dict_set(tmpl_arena *a, tval *d, tval *k, tval *v);  /* replaces an equal key */
tval *tv_dict_get(const tval *d, const char *key, size_t n); /* NULL if absent */
tval *tv_dict_getv(const tval *d, const tval *key);
tval *tv_undef(tmpl_arena *a, const char *hint);

bool tv_truthy(const tval *v);
bool tv_equal(const tval *a, const tval *b);
/* three-way compare; returns false (and leaves *out) when the types are not orderable */
bool tv_compare(const tval *a, const tval *b, int *out);
const char *tv_type_name(const tval *v); /* Python-like: "str", "int", "dict", ... */

/* str(v) as Python/Jinja print it, appended to b. repr for lists/dicts as Python. */
void tv_to_str(tmpl_buf *b, const tval *v);
void tv_repr(tmpl_buf *b, const tval *v);
void tv_float_repr(char *out, size_t cap, double f); /* Python repr(float) */
/* json.dumps(v, ensure_ascii=False, indent, separators); indent NULL = None. Returns false on a
 * value JSON cannot hold (sets *bad to it). */
bool tv_to_json(tmpl_buf *b, const tval *v, const char *indent, const char *item_sep,
                const char *key_sep, int depth, const tval **bad);

/* Parse JSON text into arena values; returns NULL and writes a message on error. */
tval *tv_from_json(tmpl_arena *a, const char *s, size_t n, char *msg, size_t msgcap);

/* UTF-8 helpers */
size_t tmpl_utf8_len(const char *s, size_t n);                  /* code points */
size_t tmpl_utf8_decode(const char *s, size_t n, uint32_t *cp); /* bytes used (>=1) */
size_t tmpl_utf8_encode(uint32_t cp, char *out);                /* bytes written (1..4) */
bool tmpl_py_isspace(uint32_t cp);

/* ---- tokens ------------------------------------------------------------------------------ */
enum {
    TK_TEXT,
    TK_VAR_BEGIN,
    TK_VAR_END,
    TK_BLOCK_BEGIN,
    TK_BLOCK_END,
    TK_NAME,
    TK_STRING,
    TK_INT,
    TK_FLOAT,
    TK_OP,
    TK_EOF,
};

typedef struct ttok {
    int type;
    int line;
    const char *p; /* text, name, op or unescaped string (arena) */
    size_t n;
    int64_t i;
    double f;
} ttok;

typedef struct tmpl_tokens {
    ttok *v;
    size_t n, cap;
} tmpl_tokens;

/* Lex src (normalised newlines, trailing newline dropped) into toks (arena). Raises on error. */
void tmpl_lex(tmpl_arena *a, const char *src, size_t len, tmpl_tokens *toks);

/* ---- AST --------------------------------------------------------------------------------- */
enum {
    /* statements */
    N_BODY,
    N_TEXT,
    N_OUTPUT,
    N_IF,
    N_FOR,
    N_SET,
    N_SET_BLOCK,
    N_MACRO,
    N_CALL_BLOCK,
    N_FILTER_BLOCK,
    N_BREAK,
    N_CONTINUE,
    /* expressions */
    N_CONST,
    N_NAME,
    N_GETATTR,
    N_GETITEM,
    N_SLICE,
    N_CALL,
    N_FILTER,
    N_TEST,
    N_BINOP,
    N_NEG,
    N_POS,
    N_NOT,
    N_AND,
    N_OR,
    N_COND,
    N_LIST,
    N_TUPLE,
    N_DICT,
    N_CONCAT,
    N_COMPARE,
};

typedef struct tnode tnode;
struct tnode {
    int kind;
    int line;
    const char *op; /* operator text for N_BINOP / N_COMPARE ("==", "in", "not in", ...) */
    const char *name;
    tval *cval;
    tnode *a, *b, *c, *d;
    tnode **list; /* body statements, call args, list items, dict keys, compare operands */
    size_t n;
    tnode **list2;      /* dict values, keyword-arg values, macro param defaults */
    const char **names; /* keyword-arg names, for/set targets, macro params */
    size_t nnames;
    size_t n2;
    bool flag; /* for: recursive; test: negated; set: target is a.name attribute */
};

typedef struct tmpl_program {
    tnode *root;
} tmpl_program;

/* Parse tokens into an AST (arena). Raises TemplateSyntaxError on error. */
tnode *tmpl_parse(tmpl_arena *a, const tmpl_tokens *toks);

/* ---- evaluation -------------------------------------------------------------------------- */
typedef struct tscope tscope;

typedef struct tmpl_render {
    tmpl_arena *arena;
    tmpl_fail *fail;
    tmpl_buf *out; /* current output (switches for macro/set blocks) */
    size_t max_output;
    /* budget: one step per AST node, loop iteration and filter call, plus one per
     * TMPL_BYTES_PER_STEP bytes of work (scanned, compared, copied, allocated: tmpl_work) */
    uint64_t steps, max_steps;
    uint64_t work;       /* bytes of work not yet turned into steps */
    uint64_t next_check; /* steps at which tmpl_budget_check runs next (limit or clock) */
    int64_t deadline_ns; /* CLOCK_MONOTONIC time the render must end by; 0 = none */
    uint32_t budget_ms;  /* the wall-clock budget, for the message */
    const char *name;    /* how messages name the template, may be NULL */
    uint64_t escapes;    /* counts writes into objects that may outlive a loop iteration */
    int depth, max_depth;
    int line;    /* line of the node being evaluated (for error messages) */
    int64_t now; /* for strftime_now */
    tscope *globals;
    int loop_ctl; /* 0, 1 break, 2 continue */
} tmpl_render;

void tmpl_eval_root(tmpl_render *r, const tnode *root);
tscope *tmpl_scope_new(tmpl_render *r, tscope *parent);
void tmpl_scope_set(tmpl_render *r, tscope *s, const char *name, tval *v);
/* loop(items) inside a `recursive` for: renders the loop body for items one level deeper */
tval *tmpl_loop_recurse(tmpl_render *r, tval *loopv, tval *items);
tval *tmpl_eval_expr(tmpl_render *r, const tnode *n, tscope *s);

/* Raise a template runtime error at the current line. */
_Noreturn void tmpl_rt_error(tmpl_render *r, const char *type, const char *fmt, ...)
    FORGE_PRINTF(3, 4);
void tmpl_step(tmpl_render *r);

/* Work metering. Every operation whose cost is not O(1) (string scans, copies, comparisons,
 * allocations, dict lookups) reports its bytes through tmpl_work, which charges them to the
 * render running on this thread and raises LimitError when the step limit or the time budget is
 * passed. The render is found through a thread-local pointer set by tmpl_meter_begin, so the
 * value functions (tmpl_value.c), which have no render argument, are metered too; outside a
 * render (parsing, forge_template_check_messages) tmpl_work does nothing. */
#define TMPL_BYTES_PER_STEP 32
void tmpl_meter_begin(tmpl_render *r);
void tmpl_meter_end(void);
void tmpl_work(uint64_t bytes);
/* a comparison recursed deeper than this: LimitError inside a render (no stack overflow); the
 * function returns only outside a render, where values are never that deep */
#define TMPL_MAX_VALUE_DEPTH 512
void tmpl_value_too_deep(void);

/* memmem / reverse memmem, charged as work */
const char *tmpl_memfind(const char *h, size_t hn, const char *n, size_t nn);
const char *tmpl_memrfind(const char *h, size_t hn, const char *n, size_t nn);

/* builtins (tmpl_builtins.c) */
typedef struct targs {
    tval **pos;
    size_t npos;
    const char **kwn;
    tval **kwv;
    size_t nkw;
} targs;
tval *tmpl_call_filter(tmpl_render *r, tscope *s, const char *name, tval *v, targs *args);
bool tmpl_call_test(tmpl_render *r, const char *name, tval *v, targs *args);
bool tmpl_has_test(const char *name);
bool tmpl_has_filter(const char *name);
tval *tmpl_get_attr(tmpl_render *r, tval *obj, const char *name, size_t n);
tval *tmpl_get_item(tmpl_render *r, tval *obj, tval *key);
tval *tmpl_call_func(tmpl_render *r, tval *fn, targs *args);
tval *tmpl_global(tmpl_render *r, const char *name); /* builtin globals, NULL if none */
tval *tmpl_call_value(tmpl_render *r, tscope *s, tval *callee, targs *args);
tval *tmpl_to_list(tmpl_render *r, tval *v);      /* iterate: list/tuple, dict keys, string chars */
tval *tmpl_str_of(tmpl_render *r, const tval *v); /* str(v) as a TV_STR */
tval *tmpl_binop(tmpl_render *r, const char *op, tval *a, tval *b);
tval *tmpl_kwarg(targs *a, const char *name, size_t pos); /* keyword or positional, or NULL */

/* helpers shared by tmpl_builtins.c and tmpl_filters.c */
typedef uint32_t (*tmpl_cp_map)(uint32_t);
bool tmpl_str_eq(const tval *v, const char *s);
tval *tmpl_missing(tmpl_render *r, const tval *obj, const char *what, size_t n, bool element);
bool tmpl_in_set(const char *const *set, size_t n, const char *name, size_t len);
tval *tmpl_attr_path(tmpl_render *r, tval *obj, tval *attr);
bool tmpl_is_intlike(const tval *v);
int64_t tmpl_as_i(const tval *v);
double tmpl_as_f(const tval *v);
bool tmpl_is_number(const tval *v);
tval *tmpl_percent_format(tmpl_render *r, tval *fmt, tval *args);
uint32_t tmpl_cp_upper(uint32_t c);
uint32_t tmpl_cp_lower(uint32_t c);
tval *tmpl_str_map(tmpl_render *r, const tval *s, tmpl_cp_map f, int mode);
tval *tmpl_str_strip(tmpl_render *r, const tval *s, const tval *chars, int which);
tval *tmpl_str_replace(tmpl_render *r, const tval *s, const tval *old, const tval *new_,
                       int64_t count);
tval *tmpl_str_split(tmpl_render *r, const tval *s, const tval *sep, int64_t maxsplit, bool right);
tval *tmpl_join_list(tmpl_render *r, tval *items, const tval *sep, tval *attribute);
tval *tmpl_need_str(tmpl_render *r, tval *v, const char *what);
int64_t tmpl_need_int(tmpl_render *r, tval *v, const char *what);
tval *tmpl_pad(tmpl_render *r, tval *s, int64_t width, tval *fill, int where);
tval *tmpl_str_method(tmpl_render *r, tval *s, const char *m, targs *a);
tval *tmpl_dict_items(tmpl_render *r, tval *d);
tval *tmpl_ns_value(tmpl_render *r, tval *v); /* v, or a copy of it if it is a ns_slot */
_Noreturn void tmpl_undef_fail(tmpl_render *r, const tval *u);

#endif /* FORGE_TMPL_H */
