/* tmpl_gguf.c - chat-template facts from a GGUF file (tokenizer.chat_template, BOS/EOS token
 * texts, architecture) and the choice between an explicit template, the model's own and a
 * built-in fallback. Uses only the public GGUF reader API. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "forge_gguf.h"
#include "forge_template.h"
#include "core/util.h"

static char *dup_gstr(gguf_str s)
{
    char *p = malloc(s.len + 1);
    if (!p) return NULL;
    if (s.len) memcpy(p, s.data, s.len);
    p[s.len] = 0;
    return p;
}

static int token_text(const gguf_ctx *g, const char *id_key, char **out, forge_err *err)
{
    uint32_t id;
    gguf_str s;
    *out = NULL;
    if (gguf_find_key(g, id_key) < 0) return FORGE_OK;
    if (gguf_get_u32(g, id_key, &id, NULL) != FORGE_OK) return FORGE_OK;
    if (gguf_get_arr_str(g, "tokenizer.ggml.tokens", id, &s, NULL) != FORGE_OK) return FORGE_OK;
    *out = dup_gstr(s);
    if (!*out) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    return FORGE_OK;
}

int forge_template_model_read(const struct gguf_ctx *g, forge_template_model *out, forge_err *err)
{
    int rc = FORGE_OK;
    gguf_str s;
    memset(out, 0, sizeof *out);
    if (!g) return forge_err_set(err, FORGE_E_INVALID, "template: no GGUF file given");
    if (gguf_find_key(g, "tokenizer.chat_template") >= 0 &&
        gguf_get_str(g, "tokenizer.chat_template", &s, NULL) == FORGE_OK) {
        out->chat_template = dup_gstr(s);
        if (!out->chat_template) goto nomem;
    }
    if (gguf_find_key(g, "general.architecture") >= 0 &&
        gguf_get_str(g, "general.architecture", &s, NULL) == FORGE_OK) {
        out->arch = dup_gstr(s);
        if (!out->arch) goto nomem;
    }
    rc = token_text(g, "tokenizer.ggml.bos_token_id", &out->bos_token, err);
    if (rc) goto fail;
    rc = token_text(g, "tokenizer.ggml.eos_token_id", &out->eos_token, err);
    if (rc) goto fail;
    return FORGE_OK;
nomem:
    rc = forge_err_set(err, FORGE_E_NOMEM, "out of memory");
fail:
    forge_template_model_clear(out);
    return rc;
}

void forge_template_model_clear(forge_template_model *m)
{
    if (!m) return;
    free(m->chat_template);
    free(m->bos_token);
    free(m->eos_token);
    free(m->arch);
    memset(m, 0, sizeof *m);
}

int forge_template_select(const forge_template_model *m, const char *choice, forge_template **out,
                          const char **source_desc, char *warning, size_t warning_cap,
                          forge_err *err)
{
    int rc;
    const char *desc = NULL;
    if (warning && warning_cap) warning[0] = 0;
    *out = NULL;
    if (choice && *choice) {
        if (forge_template_builtin_source(choice)) {
            desc = choice;
            rc = forge_template_builtin(choice, out, err);
        } else {
            char *data = NULL;
            size_t len = 0;
            struct stat stbuf;
            if (stat(choice, &stbuf) != 0)
                return forge_err_set(err, FORGE_E_NOTFOUND,
                                     "chat template '%s' is neither a built-in (chatml, llama2, "
                                     "llama3, gemma, mistral) nor a readable file",
                                     choice);
            rc = forge_read_file(choice, &data, &len, err);
            if (rc) return rc;
            int line = 0;
            rc = forge_template_parse(data, len, out, &line, err);
            free(data);
            if (rc && err) {
                char tmp[FORGE_ERR_MSG_MAX];
                snprintf(tmp, sizeof tmp, "%s", err->msg);
                forge_err_set(err, rc, "%s: %.400s", choice, tmp);
            }
            desc = "file";
        }
        if (source_desc) *source_desc = desc;
        return rc;
    }
    const char *guess = forge_template_builtin_guess(m ? m->arch : NULL, m ? m->bos_token : NULL,
                                                     m ? m->eos_token : NULL);
    if (m && m->chat_template) {
        forge_err perr = {0};
        rc = forge_template_parse(m->chat_template, strlen(m->chat_template), out, NULL, &perr);
        if (rc == FORGE_OK) {
            if (source_desc) *source_desc = "model";
            return FORGE_OK;
        }
        if (warning && warning_cap)
            snprintf(warning, warning_cap,
                     "the model's chat template cannot be used (%s); using the built-in '%s' "
                     "template instead",
                     perr.msg, guess);
    }
    if (source_desc) *source_desc = guess;
    return forge_template_builtin(guess, out, err);
}
