/* tmpl_api.c - the public chat-template API (include/forge_template.h): parse, render with
 * messages and variables given as JSON text, built-in fallback templates. Owns the setjmp frames
 * that catch tmpl_raise from the lexer, parser and evaluator, and frees the arenas. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "forge_template.h"
#include "template/tmpl.h"

struct forge_template {
    tmpl_arena arena;
    tnode *root;
};


#define DEFAULT_MAX_OUTPUT (16u << 20)
#define DEFAULT_MAX_STEPS 5000000u
#define DEFAULT_MAX_DEPTH 64
#define DEFAULT_MAX_MEMORY (256u << 20)
#define DEFAULT_MAX_TIME_MS 1000u
#define PARSE_MAX_MEMORY (64u << 20)

/* heap-held state of one parse/render, so nothing that setjmp's frame reads after a longjmp
 * lives in a non-volatile local that changed in between */
typedef struct parse_state {
    tmpl_fail fail;
    tmpl_tokens toks;
} parse_state;

int forge_template_parse(const char *src, size_t len, forge_template **out, int *line,
                         struct forge_err *err)
{
    volatile int rc = FORGE_OK; /* volatile: live across setjmp */
    forge_template *volatile t = NULL;
    parse_state *volatile ps = NULL;
    if (line) *line = 0;
    if (!out || (!src && len))
        return forge_err_set(err, FORGE_E_INVALID, "template: NULL argument");
    *out = NULL;
    t = calloc(1, sizeof *t);
    ps = calloc(1, sizeof *ps);
    if (!t || !ps) {
        rc = forge_err_set(err, FORGE_E_NOMEM, "template: out of memory");
        goto fail;
    }
    t->arena.limit = PARSE_MAX_MEMORY + len * 8;
    t->arena.fail = &ps->fail;
    if (setjmp(ps->fail.jb)) {
        if (line) *line = ps->fail.line;
        if (ps->fail.code == FORGE_E_FORMAT)
            rc = forge_err_set(err, FORGE_E_FORMAT, "template line %d: %s: %s", ps->fail.line,
                               ps->fail.type, ps->fail.msg);
        else
            rc = forge_err_set(err, ps->fail.code, "template: %s", ps->fail.msg);
        goto fail;
    }
    tmpl_lex(&t->arena, src ? src : "", len, &ps->toks);
    t->root = tmpl_parse(&t->arena, &ps->toks);
    t->arena.fail = NULL; /* never used after parsing: rendering allocates in its own arena */
    free(ps);
    *out = t;
    return FORGE_OK;
fail:
    if (t) tmpl_arena_free(&t->arena);
    free(t);
    free(ps);
    return rc;
}

void forge_template_free(forge_template *t)
{
    if (!t) return;
    tmpl_arena_free(&t->arena);
    free(t);
}

/* ---- rendering --------------------------------------------------------------------------- */
typedef struct render_state {
    tmpl_fail fail;
    tmpl_arena arena;
    tmpl_render r;
    tmpl_buf out;
} render_state;

_Noreturn static void bad_input(render_state *st, const char *fmt, size_t idx, const char *what)
{
    tmpl_raise(&st->fail, FORGE_E_INVALID, 0, "InvalidInput", fmt, idx, what);
}

static tval *parse_messages(render_state *st, const char *json)
{
    char msg[200];
    tval *m = tv_from_json(&st->arena, json, strlen(json), msg, sizeof msg);
    if (!m)
        tmpl_raise(&st->fail, FORGE_E_INVALID, 0, "InvalidInput", "messages: not valid JSON: %s",
                   msg);
    if (m->type != TV_LIST)
        tmpl_raise(&st->fail, FORGE_E_INVALID, 0, "InvalidInput",
                   "messages: expected a JSON array of {\"role\", \"content\"} objects, got %s",
                   m->type == TV_DICT ? "an object" : "a scalar");
    for (size_t i = 0; i < m->u.l.n; i++) {
        tval *e = m->u.l.v[i];
        if (e->type != TV_DICT) bad_input(st, "messages[%zu]: expected an object%s", i, "");
        tval *role = tv_dict_get(e, "role", 4);
        tval *content = tv_dict_get(e, "content", 7);
        if (!role) bad_input(st, "messages[%zu]: missing \"%s\"", i, "role");
        if (role->type != TV_STR)
            bad_input(st, "messages[%zu]: \"%s\" must be a string", i, "role");
        if (!content) bad_input(st, "messages[%zu]: missing \"%s\"", i, "content");
        if (content->type != TV_STR && content->type != TV_NONE && content->type != TV_LIST)
            bad_input(st, "messages[%zu]: \"%s\" must be a string, null or an array", i, "content");
    }
    return m;
}

int forge_template_check_messages(const char *messages_json, struct forge_err *err)
{
    volatile int rc = FORGE_OK; /* volatile: assigned after setjmp returns twice */
    render_state *st = calloc(1, sizeof *st);
    if (!st) return forge_err_set(err, FORGE_E_NOMEM, "template: out of memory");
    if (!messages_json) {
        rc = forge_err_set(err, FORGE_E_INVALID, "messages: none given");
        goto done;
    }
    st->arena.limit = DEFAULT_MAX_MEMORY;
    st->arena.fail = &st->fail;
    if (setjmp(st->fail.jb)) {
        rc = forge_err_set(err, st->fail.code, "%s", st->fail.msg);
        goto done;
    }
    parse_messages(st, messages_json);
done:
    tmpl_arena_free(&st->arena);
    free(st);
    return rc;
}

int forge_template_render(const forge_template *t, const forge_template_vars *vars, char **out,
                          size_t *out_len, forge_template_error *detail, struct forge_err *err)
{
    volatile int rc = FORGE_OK; /* volatile: assigned after setjmp returns twice */
    render_state *volatile st = NULL;
    if (detail) memset(detail, 0, sizeof *detail);
    if (!t || !vars || !out) return forge_err_set(err, FORGE_E_INVALID, "template: NULL argument");
    *out = NULL;
    if (out_len) *out_len = 0;
    if (!vars->messages_json) return forge_err_set(err, FORGE_E_INVALID, "messages: none given");
    st = calloc(1, sizeof *st);
    if (!st) return forge_err_set(err, FORGE_E_NOMEM, "template: out of memory");
    st->arena.limit = vars->max_memory ? vars->max_memory : DEFAULT_MAX_MEMORY;
    st->arena.fail = &st->fail;
    st->out.limit = vars->max_output ? vars->max_output : DEFAULT_MAX_OUTPUT;
    st->out.fail = &st->fail; /* malloc'd: becomes *out */
    st->r.arena = &st->arena;
    st->r.fail = &st->fail;
    st->r.out = &st->out;
    st->r.max_output = st->out.limit;
    st->r.max_steps = vars->max_steps ? vars->max_steps : DEFAULT_MAX_STEPS;
    st->r.max_depth = vars->max_depth > 0 ? vars->max_depth : DEFAULT_MAX_DEPTH;
    st->r.now = vars->now;
    st->r.budget_ms = vars->max_time_ms ? vars->max_time_ms : DEFAULT_MAX_TIME_MS;
    if (st->r.budget_ms == UINT32_MAX) st->r.budget_ms = 0;
    st->r.name = vars->name;
    if (setjmp(st->fail.jb)) {
        tmpl_meter_end();
        if (st->fail.code == FORGE_E_INVALID)
            rc = forge_err_set(err, FORGE_E_INVALID, "%s", st->fail.msg);
        else if (st->fail.line)
            rc = forge_err_set(err, st->fail.code, "template line %d: %s: %s", st->fail.line,
                               st->fail.type, st->fail.msg);
        else
            rc = forge_err_set(err, st->fail.code, "template: %s: %s", st->fail.type, st->fail.msg);
        if (detail) {
            detail->line = st->fail.line;
            snprintf(detail->type, sizeof detail->type, "%s", st->fail.type);
            snprintf(detail->message, sizeof detail->message, "%s", st->fail.msg);
        }
        free(st->out.p);
        goto done;
    }
    {
        tmpl_render *r = &st->r;
        tmpl_meter_begin(r); /* the messages' parsing counts too: they are untrusted */
        tval *messages = parse_messages(st, vars->messages_json);
        r->globals = tmpl_scope_new(r, NULL);
        tmpl_scope_set(r, r->globals, "messages", messages);
        tmpl_scope_set(r, r->globals, "add_generation_prompt",
                       tv_bool(vars->add_generation_prompt));
        tmpl_scope_set(r, r->globals, "tools", &tmpl_none);
        tmpl_scope_set(r, r->globals, "documents", &tmpl_none);
        if (vars->bos_token)
            tmpl_scope_set(r, r->globals, "bos_token", tv_cstr(&st->arena, vars->bos_token));
        if (vars->eos_token)
            tmpl_scope_set(r, r->globals, "eos_token", tv_cstr(&st->arena, vars->eos_token));
        if (vars->extra_json) {
            char msg[200];
            tval *x = tv_from_json(&st->arena, vars->extra_json, strlen(vars->extra_json), msg,
                                   sizeof msg);
            if (!x)
                tmpl_raise(&st->fail, FORGE_E_INVALID, 0, "InvalidInput",
                           "variables: not valid JSON: %s", msg);
            if (x->type != TV_DICT)
                tmpl_raise(&st->fail, FORGE_E_INVALID, 0, "InvalidInput",
                           "variables: expected a JSON object");
            for (size_t i = 0; i < x->u.d.n; i++)
                tmpl_scope_set(r, r->globals, x->u.d.k[i]->u.s.p, x->u.d.v[i]);
        }
        tmpl_eval_root(r, t->root);
        if (r->loop_ctl) r->loop_ctl = 0; /* break outside a loop: jinja rejects at compile time */
        tmpl_meter_end();
    }
    if (!st->out.p) {
        st->out.p = malloc(1);
        if (!st->out.p) {
            rc = forge_err_set(err, FORGE_E_NOMEM, "template: out of memory");
            goto done;
        }
        st->out.p[0] = 0;
    }
    *out = st->out.p;
    if (out_len) *out_len = st->out.n;
done:
    tmpl_arena_free(&st->arena);
    free(st);
    return rc;
}

/* ---- built-in templates ------------------------------------------------------------------ */
static const char *const builtin_names[] = {"chatml", "llama2", "llama3", "gemma", "mistral", NULL};

static const char tmpl_chatml[] =
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

static const char tmpl_llama2[] =
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set loop_messages = messages[1:] %}{%- set system_message = messages[0]['content'] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- set system_message = false %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if loop.index0 == 0 and system_message != false %}"
    "{%- set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{%- else %}{%- set content = message['content'] %}{%- endif %}"
    "{%- if message['role'] == 'user' %}{{- bos_token ~ '[INST] ' + content.strip() + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + content.strip() + ' ' ~ eos_token }}"
    "{%- endif %}"
    "{%- endfor %}";

static const char tmpl_llama3[] =
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] "
    "| trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' "
    "}}{%- endif %}";

static const char tmpl_gemma[] =
    "{{- bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{%- set loop_messages = "
    "messages[1:] %}"
    "{%- else %}{%- set first_user_prefix = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + "
    "message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}";

static const char tmpl_mistral[] =
    "{{- bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] + '\\n\\n' %}{%- set loop_messages = "
    "messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '[INST] ' + (system_message if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] ~ eos_token }}"
    "{%- endif %}"
    "{%- endfor %}";

const char *const *forge_template_builtin_names(void)
{
    return builtin_names;
}

const char *forge_template_builtin_source(const char *name)
{
    if (!name) return NULL;
    if (!strcmp(name, "chatml")) return tmpl_chatml;
    if (!strcmp(name, "llama2")) return tmpl_llama2;
    if (!strcmp(name, "llama3")) return tmpl_llama3;
    if (!strcmp(name, "gemma")) return tmpl_gemma;
    if (!strcmp(name, "mistral")) return tmpl_mistral;
    return NULL;
}

int forge_template_builtin(const char *name, forge_template **out, struct forge_err *err)
{
    const char *src = forge_template_builtin_source(name);
    if (!src)
        return forge_err_set(err, FORGE_E_NOTFOUND,
                             "no built-in chat template '%s' (have: chatml, llama2, llama3, gemma, "
                             "mistral)",
                             name ? name : "(null)");
    return forge_template_parse(src, strlen(src), out, NULL, err);
}

const char *forge_template_builtin_guess(const char *arch, const char *bos, const char *eos)
{
    if (eos && strstr(eos, "im_end")) return "chatml";
    if ((eos && strstr(eos, "eot_id")) || (bos && strstr(bos, "begin_of_text"))) return "llama3";
    if (bos && !strcmp(bos, "<bos>")) return "gemma";
    if (arch && (!strncmp(arch, "qwen", 4))) return "chatml";
    if (arch && !strcmp(arch, "llama") && bos && !strcmp(bos, "<s>")) return "llama2";
    if (arch && !strcmp(arch, "gemma")) return "gemma";
    return "chatml";
}
