/* forge_template.h - chat templates: a Jinja2 engine for the subset that model chat templates use
 * (tokenizer.chat_template in GGUF files), rendering messages the way Hugging Face transformers'
 * apply_chat_template does (trim_blocks, lstrip_blocks, immutable sandbox, its tojson,
 * raise_exception, strftime_now), plus built-in fallback templates.
 *
 * Untrusted input: a template and the messages are both treated as hostile. Parsing and rendering
 * are bounded (nesting depth, evaluation steps charged by the work done, output size, memory,
 * wall-clock time) and fail with an error, never a crash or a hang. Errors carry the template line.
 * Thread-safety: a parsed template is immutable; several threads may render the same one at once.
 */
#ifndef FORGE_TEMPLATE_H
#define FORGE_TEMPLATE_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

#ifdef __cplusplus
extern "C" {
#endif

struct forge_err;

typedef struct forge_template forge_template;

/* Parse template source (len bytes, need not be NUL-terminated). On success *out is a new handle
 * the caller frees with forge_template_free. A syntax error fails with FORGE_E_FORMAT and a message
 * "template line N: ..."; *line (may be NULL) gets N (0 when not about a line). */
int forge_template_parse(const char *src, size_t len, forge_template **out, int *line,
                         struct forge_err *err);

/* A built-in template by name: "chatml", "llama2", "llama3", "gemma", "mistral" (see
 * forge_template_builtin_names). FORGE_E_NOTFOUND for an unknown name. Caller frees *out. */
int forge_template_builtin(const char *name, forge_template **out, struct forge_err *err);

/* Source text of a built-in template (static string), or NULL for an unknown name. */
const char *forge_template_builtin_source(const char *name);

/* NULL-terminated list of built-in names (static). */
const char *const *forge_template_builtin_names(void);

/* Guess a built-in template for a model whose file has no usable template, from the GGUF
 * general.architecture / tokenizer model and special-token texts (any may be NULL). Never NULL. */
const char *forge_template_builtin_guess(const char *arch, const char *bos, const char *eos);

void forge_template_free(forge_template *t);

/* The variables of one rendering. Zero-initialise and fill in what you need. */
typedef struct forge_template_vars {
    /* JSON array of message objects; each needs "role" (string) and "content" (string, null or
     * array); other keys (tool_calls, ...) are passed through. Required. */
    const char *messages_json;
    bool add_generation_prompt;
    const char *bos_token; /* NULL: the variable is left undefined (as transformers does) */
    const char *eos_token; /* NULL: undefined */
    /* JSON object of further variables (e.g. {"tools": null, "documents": null,
     * "enable_thinking": false}), or NULL. Keys here override the ones above. */
    const char *extra_json;
    /* Time used by strftime_now(), seconds since the epoch, read as UTC; 0 = now (local time). */
    int64_t now;
    /* Limits (0 = default): output bytes (default 16 MiB), evaluation steps (default 5,000,000),
     * macro/recursion depth (default 64), memory for values (default 256 MiB). A step is one
     * node evaluated, loop iteration or filter call, plus one per 32 bytes that an operation
     * scans, compares, copies or allocates, so a step costs about the same time whatever the
     * template does. Memory does not grow with loop iterations, except for what an iteration
     * stores in a namespace or writes out. */
    size_t max_output;
    uint64_t max_steps;
    int max_depth;
    size_t max_memory;
    /* Wall-clock budget of one render in milliseconds: 0 = default (1000 ms), UINT32_MAX = none.
     * Exceeding it fails with FORGE_E_RANGE, type "LimitError" and the message
     * "template render exceeded its time budget of N ms (NAME)". */
    uint32_t max_time_ms;
    /* How that message names the template (a file name, "the model's chat template"), or NULL.
     * Borrowed for the call. */
    const char *name;
} forge_template_vars;

/* Details of a render failure, for callers that compare with Jinja's behaviour. */
typedef struct forge_template_error {
    int line;          /* template line, 0 if unknown */
    char type[32];     /* Python-like exception class: "TemplateError" (raise_exception),
                          "UndefinedError", "TypeError", "TemplateSyntaxError", "LimitError", ... */
    char message[512]; /* the bare message, e.g. "System role not supported" */
} forge_template_error;

/* Render. On success *out is a malloc'd NUL-terminated string (caller frees) of *out_len bytes
 * (out_len may be NULL). Errors: FORGE_E_INVALID for bad messages/extra JSON (message names the
 * problem, e.g. "messages[1]: missing \"content\""), FORGE_E_FORMAT for a template error
 * ("template line N: TypeError: ..."), FORGE_E_RANGE when a limit is hit, FORGE_E_NOMEM.
 * detail (may be NULL) receives line/type/bare message of template errors. */
int forge_template_render(const forge_template *t, const forge_template_vars *vars, char **out,
                          size_t *out_len, forge_template_error *detail, struct forge_err *err);

/* ---- templates of model files ----------------------------------------------------------- */
struct gguf_ctx;

/* What a GGUF file says about chat formatting. Strings are malloc'd copies (NULL when absent),
 * freed by forge_template_model_clear. */
typedef struct forge_template_model {
    char *chat_template; /* tokenizer.chat_template */
    char *bos_token;     /* text of tokenizer.ggml.bos_token_id in tokenizer.ggml.tokens */
    char *eos_token;     /* text of tokenizer.ggml.eos_token_id */
    char *arch;          /* general.architecture */
} forge_template_model;

int forge_template_model_read(const struct gguf_ctx *gguf, forge_template_model *out,
                              struct forge_err *err);
void forge_template_model_clear(forge_template_model *m);

/* The template to use for a model: `choice` (a built-in name or a template file; NULL = none)
 * wins; else the model's own template; else a built-in guessed from the model. A model template
 * that does not parse is not an error: the guess is used and *warning (caller buffer, may be
 * NULL) explains why. *source_desc (may be NULL) gets a static/borrowed short description
 * ("model", "file", or the built-in name). Caller frees *out. */
int forge_template_select(const forge_template_model *m, const char *choice, forge_template **out,
                          const char **source_desc, char *warning, size_t warning_cap,
                          struct forge_err *err);

/* Check a messages JSON text the way forge_template_render does, without rendering. */
int forge_template_check_messages(const char *messages_json, struct forge_err *err);

#ifdef __cplusplus
}
#endif

#endif /* FORGE_TEMPLATE_H */
