/* srv_request.c - parse and validate the JSON bodies of the OpenAI endpoints (srv_request.h).
 * Owns nothing but the request struct it fills; never touches the model or the network. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "srv_request.h"

int srv_fail(srv_error *e, int status, const char *type, const char *param, const char *code,
             const char *fmt, ...)
{
    va_list ap;
    e->status = status;
    snprintf(e->type, sizeof e->type, "%s", type ? type : "invalid_request_error");
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    snprintf(e->code, sizeof e->code, "%s", code ? code : "");
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    return -1;
}

char *srv_error_json(const srv_error *e)
{
    cJSON *root = cJSON_CreateObject();
    cJSON *o = root ? cJSON_AddObjectToObject(root, "error") : NULL;
    char *s = NULL;
    if (o) {
        cJSON_AddStringToObject(o, "message", e->message);
        cJSON_AddStringToObject(o, "type", e->type);
        if (e->param[0])
            cJSON_AddStringToObject(o, "param", e->param);
        else
            cJSON_AddNullToObject(o, "param");
        if (e->code[0])
            cJSON_AddStringToObject(o, "code", e->code);
        else
            cJSON_AddNullToObject(o, "code");
        s = cJSON_PrintUnformatted(root);
    }
    cJSON_Delete(root);
    return s;
}

bool srv_utf8_valid(const char *s, size_t len, size_t *bad)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < len) {
        unsigned c = p[i];
        size_t n;
        uint32_t cp;
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xC2 && c <= 0xDF) {
            n = 1, cp = c & 0x1F;
        } else if (c >= 0xE0 && c <= 0xEF) {
            n = 2, cp = c & 0x0F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            n = 3, cp = c & 0x07;
        } else {
            goto invalid;
        }
        if (len - i <= n) goto invalid;
        for (size_t k = 1; k <= n; k++) {
            if ((p[i + k] & 0xC0) != 0x80) goto invalid;
            cp = (cp << 6) | (p[i + k] & 0x3F);
        }
        if ((n == 2 && cp < 0x800) || (n == 3 && (cp < 0x10000 || cp > 0x10FFFF)) ||
            (cp >= 0xD800 && cp <= 0xDFFF))
            goto invalid;
        i += n + 1;
    }
    return true;
invalid:
    if (bad) *bad = i;
    return false;
}

/* Depth of [ and { outside strings, so cJSON's recursion never goes deep. */
static bool depth_ok(const char *s, size_t len, int max_depth)
{
    int depth = 0;
    bool in_str = false;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (in_str) {
            if (c == '\\')
                i++;
            else if (c == '"')
                in_str = false;
        } else if (c == '"') {
            in_str = true;
        } else if (c == '[' || c == '{') {
            if (++depth > max_depth) return false;
        } else if (c == ']' || c == '}') {
            depth--;
        }
    }
    return true;
}

/* Parse a JSON object body: UTF-8, depth, syntax, trailing bytes, top-level object. */
static cJSON *parse_object(const char *body, size_t len, srv_error *e)
{
    size_t bad = 0;
    const char *end = NULL;
    if (len == 0) {
        srv_fail(e, 400, NULL, NULL, "invalid_json", "the request body is empty (expected JSON)");
        return NULL;
    }
    if (!srv_utf8_valid(body, len, &bad)) {
        srv_fail(e, 400, NULL, NULL, "invalid_json",
                 "the request body is not valid UTF-8 (byte %zu)", bad);
        return NULL;
    }
    if (!depth_ok(body, len, SRV_MAX_DEPTH)) {
        srv_fail(e, 400, NULL, NULL, "invalid_json", "the request body nests deeper than %d levels",
                 SRV_MAX_DEPTH);
        return NULL;
    }
    cJSON *root = cJSON_ParseWithLengthOpts(body, len, &end, false);
    if (!root) {
        size_t at = end && end >= body ? (size_t)(end - body) : 0;
        const char *ep = cJSON_GetErrorPtr();
        if (ep && ep >= body && ep <= body + len) at = (size_t)(ep - body);
        srv_fail(e, 400, NULL, NULL, "invalid_json",
                 "the request body is not valid JSON (error near byte %zu)", at);
        return NULL;
    }
    for (const char *p = end; p && p < body + len; p++) {
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
            cJSON_Delete(root);
            srv_fail(e, 400, NULL, NULL, "invalid_json",
                     "the request body has bytes after the JSON value (byte %zu)",
                     (size_t)(p - body));
            return NULL;
        }
    }
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        srv_fail(e, 400, NULL, NULL, "invalid_json", "the request body must be a JSON object");
        return NULL;
    }
    return root;
}

static const cJSON *field(const cJSON *o, const char *name)
{
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(o, name);
    return f && !cJSON_IsNull(f) ? f : NULL; /* null is "not given", as OpenAI's clients send */
}

/* A number field in [lo, hi]; absent: *out unchanged. */
static int get_float(const cJSON *o, const char *name, double lo, double hi, float *out,
                     srv_error *e)
{
    const cJSON *f = field(o, name);
    if (!f) return 0;
    if (!cJSON_IsNumber(f) || !isfinite(f->valuedouble))
        return srv_fail(e, 400, NULL, name, "invalid_type", "'%s' must be a number", name);
    if (f->valuedouble < lo || f->valuedouble > hi)
        return srv_fail(e, 400, NULL, name, "invalid_value",
                        "'%s' is %g, it must be between %g and %g", name, f->valuedouble, lo, hi);
    *out = (float)f->valuedouble;
    return 0;
}

static int get_int(const cJSON *o, const char *name, double lo, double hi, int64_t *out,
                   srv_error *e)
{
    const cJSON *f = field(o, name);
    if (!f) return 0;
    double v = cJSON_IsNumber(f) ? f->valuedouble : NAN;
    if (!isfinite(v) || v != floor(v))
        return srv_fail(e, 400, NULL, name, "invalid_type", "'%s' must be an integer", name);
    if (v < lo || v > hi)
        return srv_fail(e, 400, NULL, name, "invalid_value",
                        "'%s' is %.0f, it must be between %.0f and %.0f", name, v, lo, hi);
    *out = (int64_t)v;
    return 0;
}

static int get_bool(const cJSON *o, const char *name, bool *out, srv_error *e)
{
    const cJSON *f = field(o, name);
    if (!f) return 0;
    if (!cJSON_IsBool(f))
        return srv_fail(e, 400, NULL, name, "invalid_type", "'%s' must be true or false", name);
    *out = cJSON_IsTrue(f);
    return 0;
}

static int get_string(const cJSON *o, const char *name, char **out, srv_error *e)
{
    const cJSON *f = field(o, name);
    if (!f) return 0;
    if (!cJSON_IsString(f))
        return srv_fail(e, 400, NULL, name, "invalid_type", "'%s' must be a string", name);
    if (!(*out = strdup(f->valuestring)))
        return srv_fail(e, 503, "server_error", NULL, NULL, "out of memory");
    return 0;
}

/* A cJSON string's bytes: cJSON decodes \u0000 and stops the C string there; the JSON we accept
 * never reaches that far because a string with an embedded NUL is cut at it. */
static char *dup_str(const char *s, size_t *len)
{
    *len = strlen(s);
    char *d = malloc(*len + 1);
    if (d) memcpy(d, s, *len + 1);
    return d;
}

static int parse_ids(const cJSON *a, const char *param, int32_t **ids, int32_t *n, srv_error *e)
{
    int cnt = cJSON_GetArraySize(a);
    int32_t *v = malloc((size_t)(cnt > 0 ? cnt : 1) * sizeof *v);
    if (!v) return srv_fail(e, 503, "server_error", NULL, NULL, "out of memory");
    int i = 0;
    const cJSON *x;
    cJSON_ArrayForEach(x, a)
    {
        double d = cJSON_IsNumber(x) ? x->valuedouble : NAN;
        if (!isfinite(d) || d != floor(d) || d < 0 || d > INT32_MAX) {
            free(v);
            return srv_fail(e, 400, NULL, param, "invalid_value",
                            "'%s'[%d] must be a token id (an integer >= 0)", param, i);
        }
        v[i++] = (int32_t)d;
    }
    *ids = v;
    *n = i;
    return 0;
}

static int parse_prompt(const cJSON *root, srv_request *r, srv_error *e)
{
    const cJSON *p = field(root, "prompt");
    if (!p) return srv_fail(e, 400, NULL, "prompt", "missing_field", "'prompt' is required");
    int cnt = 1;
    bool list_of_ids = false;
    if (cJSON_IsArray(p)) {
        cnt = cJSON_GetArraySize(p);
        if (cnt == 0)
            return srv_fail(e, 400, NULL, "prompt", "invalid_value", "'prompt' must not be empty");
        list_of_ids = cJSON_IsNumber(cJSON_GetArrayItem(p, 0));
        if (list_of_ids) cnt = 1;
    } else if (!cJSON_IsString(p)) {
        return srv_fail(e, 400, NULL, "prompt", "invalid_type",
                        "'prompt' must be a string, a list of strings, a list of token ids or a "
                        "list of lists of token ids");
    }
    if (cnt > SRV_MAX_CHOICES)
        return srv_fail(e, 400, NULL, "prompt", "invalid_value",
                        "'prompt' has %d prompts, at most %d are allowed", cnt, SRV_MAX_CHOICES);
    r->prompts = calloc((size_t)cnt, sizeof *r->prompts);
    if (!r->prompts) return srv_fail(e, 503, "server_error", NULL, NULL, "out of memory");
    r->n_prompts = cnt;
    if (cJSON_IsString(p)) {
        if (!(r->prompts[0].text = dup_str(p->valuestring, &r->prompts[0].text_len)))
            return srv_fail(e, 503, "server_error", NULL, NULL, "out of memory");
        return 0;
    }
    if (list_of_ids) {
        r->prompts[0].is_ids = true;
        if (parse_ids(p, "prompt", &r->prompts[0].ids, &r->prompts[0].n_ids, e)) return -1;
        return 0;
    }
    int i = 0;
    const cJSON *x;
    cJSON_ArrayForEach(x, p)
    {
        srv_prompt *sp = &r->prompts[i];
        if (cJSON_IsString(x)) {
            if (!(sp->text = dup_str(x->valuestring, &sp->text_len)))
                return srv_fail(e, 503, "server_error", NULL, NULL, "out of memory");
        } else if (cJSON_IsArray(x) && cJSON_GetArraySize(x) > 0) {
            sp->is_ids = true;
            if (parse_ids(x, "prompt", &sp->ids, &sp->n_ids, e)) return -1;
        } else {
            return srv_fail(e, 400, NULL, "prompt", "invalid_type",
                            "'prompt'[%d] must be a string or a non-empty list of token ids", i);
        }
        i++;
    }
    return 0;
}

/* Message content: a string, null, or a list of {"type": "text", "text": ...} parts. */
static int content_text(const cJSON *c, int idx, cJSON *msg, srv_error *e)
{
    if (!c || cJSON_IsNull(c)) {
        cJSON_AddStringToObject(msg, "content", "");
        return 0;
    }
    if (cJSON_IsString(c)) {
        cJSON_AddStringToObject(msg, "content", c->valuestring);
        return 0;
    }
    if (!cJSON_IsArray(c))
        return srv_fail(e, 400, NULL, "messages", "invalid_type",
                        "'messages'[%d].content must be a string or a list of text parts", idx);
    size_t cap = 64, len = 0;
    char *buf = malloc(cap);
    if (!buf) return srv_fail(e, 503, "server_error", NULL, NULL, "out of memory");
    buf[0] = 0;
    const cJSON *part;
    int k = 0;
    cJSON_ArrayForEach(part, c)
    {
        const cJSON *type = cJSON_GetObjectItemCaseSensitive(part, "type");
        const cJSON *text = cJSON_GetObjectItemCaseSensitive(part, "text");
        if (!cJSON_IsString(type) || strcmp(type->valuestring, "text") || !cJSON_IsString(text)) {
            free(buf);
            return srv_fail(e, 400, NULL, "messages", "invalid_value",
                            "'messages'[%d].content[%d] must be {\"type\": \"text\", \"text\": "
                            "string} (only text is supported)",
                            idx, k);
        }
        size_t tl = strlen(text->valuestring);
        if (len + tl + 1 > cap) {
            while (len + tl + 1 > cap)
                cap *= 2;
            char *nb = realloc(buf, cap);
            if (!nb) {
                free(buf);
                return srv_fail(e, 503, "server_error", NULL, NULL, "out of memory");
            }
            buf = nb;
        }
        memcpy(buf + len, text->valuestring, tl + 1);
        len += tl;
        k++;
    }
    cJSON_AddStringToObject(msg, "content", buf);
    free(buf);
    return 0;
}

static int parse_messages(const cJSON *root, srv_request *r, srv_error *e)
{
    static const char *const roles[] = {"system", "developer", "user", "assistant", "tool"};
    const cJSON *m = field(root, "messages");
    if (!m) return srv_fail(e, 400, NULL, "messages", "missing_field", "'messages' is required");
    if (!cJSON_IsArray(m) || cJSON_GetArraySize(m) == 0)
        return srv_fail(e, 400, NULL, "messages", "invalid_type",
                        "'messages' must be a non-empty list of messages");
    cJSON *out = cJSON_CreateArray();
    if (!out) return srv_fail(e, 503, "server_error", NULL, NULL, "out of memory");
    int i = 0;
    const cJSON *msg;
    cJSON_ArrayForEach(msg, m)
    {
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(msg, "role");
        bool known = false;
        if (!cJSON_IsObject(msg) || !cJSON_IsString(role)) {
            cJSON_Delete(out);
            return srv_fail(e, 400, NULL, "messages", "invalid_type",
                            "'messages'[%d] must be an object with a string 'role'", i);
        }
        for (size_t k = 0; k < sizeof roles / sizeof roles[0]; k++)
            known |= !strcmp(role->valuestring, roles[k]);
        if (!known) {
            cJSON_Delete(out);
            return srv_fail(e, 400, NULL, "messages", "invalid_value",
                            "'messages'[%d].role must be system, developer, user, assistant or "
                            "tool",
                            i);
        }
        cJSON *n = cJSON_CreateObject();
        if (!n) {
            cJSON_Delete(out);
            return srv_fail(e, 503, "server_error", NULL, NULL, "out of memory");
        }
        cJSON_AddItemToArray(out, n);
        /* templates know "system"; OpenAI's newer "developer" role means the same */
        cJSON_AddStringToObject(
            n, "role", strcmp(role->valuestring, "developer") ? role->valuestring : "system");
        if (content_text(cJSON_GetObjectItemCaseSensitive(msg, "content"), i, n, e)) {
            cJSON_Delete(out);
            return -1;
        }
        i++;
    }
    r->messages_json = cJSON_PrintUnformatted(out);
    cJSON_Delete(out);
    if (!r->messages_json) return srv_fail(e, 503, "server_error", NULL, NULL, "out of memory");
    return 0;
}

static int parse_stop(const cJSON *root, srv_request *r, srv_error *e)
{
    const cJSON *s = field(root, "stop");
    if (!s) return 0;
    int cnt = cJSON_IsString(s) ? 1 : cJSON_IsArray(s) ? cJSON_GetArraySize(s) : -1;
    if (cnt < 0)
        return srv_fail(e, 400, NULL, "stop", "invalid_type",
                        "'stop' must be a string or a list of strings");
    if (cnt > SRV_MAX_STOP)
        return srv_fail(e, 400, NULL, "stop", "invalid_value",
                        "'stop' has %d strings, at most %d are allowed", cnt, SRV_MAX_STOP);
    if (cnt == 0) return 0;
    r->stop = calloc((size_t)cnt, sizeof *r->stop);
    if (!r->stop) return srv_fail(e, 503, "server_error", NULL, NULL, "out of memory");
    const cJSON *x = cJSON_IsString(s) ? s : s->child;
    for (int i = 0; i < cnt; i++, x = x->next) {
        if (!cJSON_IsString(x) || !x->valuestring[0] || strlen(x->valuestring) > SRV_MAX_STOP_LEN)
            return srv_fail(e, 400, NULL, "stop", "invalid_value",
                            "'stop'[%d] must be a non-empty string of at most %d bytes", i,
                            SRV_MAX_STOP_LEN);
        if (!(r->stop[i] = strdup(x->valuestring)))
            return srv_fail(e, 503, "server_error", NULL, NULL, "out of memory");
        r->n_stop = i + 1;
        if (cJSON_IsString(s)) break;
    }
    return 0;
}

static int parse_bias(const cJSON *root, srv_request *r, srv_error *e)
{
    const cJSON *b = field(root, "logit_bias");
    if (!b) return 0;
    if (!cJSON_IsObject(b))
        return srv_fail(e, 400, NULL, "logit_bias", "invalid_type",
                        "'logit_bias' must be an object mapping token ids to numbers");
    int cnt = cJSON_GetArraySize(b);
    if (cnt > SRV_MAX_BIAS)
        return srv_fail(e, 400, NULL, "logit_bias", "invalid_value",
                        "'logit_bias' has %d entries, at most %d are allowed", cnt, SRV_MAX_BIAS);
    if (cnt == 0) return 0;
    r->logit_bias = calloc((size_t)cnt, sizeof *r->logit_bias);
    if (!r->logit_bias) return srv_fail(e, 503, "server_error", NULL, NULL, "out of memory");
    const cJSON *x;
    cJSON_ArrayForEach(x, b)
    {
        char *end = NULL;
        const char *k = x->string ? x->string : "";
        long id = strtol(k, &end, 10);
        if (!*k || *end || id < 0 || id > INT32_MAX)
            return srv_fail(e, 400, NULL, "logit_bias", "invalid_value",
                            "'logit_bias' key '%.40s' is not a token id", k);
        if (!cJSON_IsNumber(x) || !isfinite(x->valuedouble) || x->valuedouble < -100 ||
            x->valuedouble > 100)
            return srv_fail(e, 400, NULL, "logit_bias", "invalid_value",
                            "'logit_bias'[%ld] must be a number between -100 and 100", id);
        forge_logit_bias *lb = &r->logit_bias[r->n_logit_bias++];
        lb->id = (int32_t)id;
        /* OpenAI: -100 bans the token */
        lb->bias = x->valuedouble <= -100 ? -INFINITY : (float)x->valuedouble;
    }
    return 0;
}

int srv_request_parse(srv_kind kind, const char *body, size_t len, srv_request *r, srv_error *e)
{
    int64_t v;
    memset(r, 0, sizeof *r);
    r->kind = kind;
    r->max_tokens = -1;
    r->temperature = 1.0f; /* OpenAI's defaults */
    r->top_p = 1.0f;
    r->repeat_penalty = 1.0f;
    r->n = 1;
    cJSON *root = parse_object(body, len, e);
    if (!root) return -1;
    int rc = -1;

    if (get_string(root, "model", &r->model, e)) goto done;
    if (kind == SRV_COMPLETION ? parse_prompt(root, r, e) : parse_messages(root, r, e)) goto done;
    if (get_bool(root, "stream", &r->stream, e)) goto done;
    const cJSON *so = field(root, "stream_options");
    if (so) {
        if (!cJSON_IsObject(so)) {
            srv_fail(e, 400, NULL, "stream_options", "invalid_type",
                     "'stream_options' must be an object");
            goto done;
        }
        if (!r->stream) {
            srv_fail(e, 400, NULL, "stream_options", "invalid_value",
                     "'stream_options' is only allowed when 'stream' is true");
            goto done;
        }
        const cJSON *iu = field(so, "include_usage");
        if (iu && !cJSON_IsBool(iu)) {
            srv_fail(e, 400, NULL, "stream_options.include_usage", "invalid_type",
                     "'stream_options.include_usage' must be true or false");
            goto done;
        }
        r->include_usage = cJSON_IsTrue(iu);
    }
    /* max_completion_tokens is the newer name; both may come, the newer one wins */
    v = -1;
    if (get_int(root, "max_tokens", 1, INT32_MAX, &v, e)) goto done;
    if (get_int(root, "max_completion_tokens", 1, INT32_MAX, &v, e)) goto done;
    r->max_tokens = (int32_t)v;
    if (get_float(root, "temperature", 0, 2, &r->temperature, e)) goto done;
    if (get_float(root, "top_p", 0, 1, &r->top_p, e)) goto done;
    if (get_float(root, "min_p", 0, 1, &r->min_p, e)) goto done;
    if (get_float(root, "presence_penalty", -2, 2, &r->presence_penalty, e)) goto done;
    if (get_float(root, "frequency_penalty", -2, 2, &r->frequency_penalty, e)) goto done;
    if (get_float(root, "repeat_penalty", 0.01, 100, &r->repeat_penalty, e)) goto done;
    v = 0;
    if (get_int(root, "top_k", -1, 1 << 30, &v, e)) goto done;
    r->top_k = (int32_t)v;
    v = 1;
    if (get_int(root, "n", 1, SRV_MAX_N, &v, e)) goto done;
    r->n = (int32_t)v;
    if (r->n * (kind == SRV_COMPLETION ? r->n_prompts : 1) > SRV_MAX_CHOICES) {
        srv_fail(e, 400, NULL, "n", "invalid_value",
                 "'n' x prompts is %d, at most %d choices are allowed", r->n * r->n_prompts,
                 SRV_MAX_CHOICES);
        goto done;
    }
    const cJSON *seed = field(root, "seed");
    if (seed) {
        double d = cJSON_IsNumber(seed) ? seed->valuedouble : NAN;
        if (!isfinite(d) || d != floor(d) || d < -9.2e18 || d > 1.8e19) {
            srv_fail(e, 400, NULL, "seed", "invalid_type", "'seed' must be an integer");
            goto done;
        }
        r->seed_set = true;
        r->seed = d < 0 ? (uint64_t)(int64_t)d : (uint64_t)d;
    }
    if (parse_stop(root, r, e) || parse_bias(root, r, e)) goto done;
    const cJSON *lp = field(root, "logprobs");
    if (kind == SRV_CHAT) {
        if (get_bool(root, "logprobs", &r->logprobs, e)) goto done;
        v = 0;
        if (get_int(root, "top_logprobs", 0, SRV_MAX_TOP_LOGPROBS, &v, e)) goto done;
        r->top_logprobs = (int32_t)v;
        if (r->top_logprobs > 0 && !r->logprobs) {
            srv_fail(e, 400, NULL, "top_logprobs", "invalid_value",
                     "'top_logprobs' needs 'logprobs' set to true");
            goto done;
        }
    } else if (lp) {
        /* completions: logprobs is the number of top alternatives (0..5 at OpenAI; 20 here) */
        v = 0;
        if (get_int(root, "logprobs", 0, SRV_MAX_TOP_LOGPROBS, &v, e)) goto done;
        r->logprobs = true;
        r->top_logprobs = (int32_t)v;
    }
    if (kind == SRV_COMPLETION) {
        if (get_bool(root, "echo", &r->echo, e)) goto done;
        if (r->echo) {
            srv_fail(e, 400, NULL, "echo", "unsupported_value", "'echo' is not supported");
            goto done;
        }
        const cJSON *bo = field(root, "best_of");
        if (bo && !(cJSON_IsNumber(bo) && bo->valuedouble == r->n)) {
            srv_fail(e, 400, NULL, "best_of", "unsupported_value",
                     "'best_of' other than 'n' is not supported");
            goto done;
        }
        const cJSON *sfx = field(root, "suffix");
        if (sfx && !(cJSON_IsString(sfx) && !sfx->valuestring[0])) {
            srv_fail(e, 400, NULL, "suffix", "unsupported_value", "'suffix' is not supported");
            goto done;
        }
    }
    if (get_bool(root, "ignore_eos", &r->ignore_eos, e)) goto done;
    if (get_string(root, "user", &r->user, e)) goto done;
    rc = 0;
done:
    cJSON_Delete(root);
    if (rc) srv_request_clear(r);
    return rc;
}

void srv_request_clear(srv_request *r)
{
    if (!r) return;
    for (int32_t i = 0; i < r->n_prompts; i++) {
        free(r->prompts[i].text);
        free(r->prompts[i].ids);
    }
    free(r->prompts);
    for (int32_t i = 0; i < r->n_stop; i++)
        free(r->stop[i]);
    free(r->stop);
    free(r->model);
    free(r->messages_json);
    free(r->logit_bias);
    free(r->user);
    memset(r, 0, sizeof *r);
}

int srv_tokenize_parse(const char *body, size_t len, char **text, size_t *text_len,
                       bool *add_special, srv_error *e)
{
    cJSON *root = parse_object(body, len, e);
    int rc = -1;
    *text = NULL;
    if (!root) return -1;
    const char *name = field(root, "content") ? "content" : "prompt";
    const cJSON *c = field(root, name);
    if (!c) {
        srv_fail(e, 400, NULL, "content", "missing_field", "'content' (a string) is required");
        goto done;
    }
    if (!cJSON_IsString(c)) {
        srv_fail(e, 400, NULL, name, "invalid_type", "'%s' must be a string", name);
        goto done;
    }
    *add_special = false;
    if (get_bool(root, "add_special", add_special, e)) goto done;
    if (!(*text = dup_str(c->valuestring, text_len))) {
        srv_fail(e, 503, "server_error", NULL, NULL, "out of memory");
        goto done;
    }
    rc = 0;
done:
    cJSON_Delete(root);
    return rc;
}

int srv_detokenize_parse(const char *body, size_t len, int32_t **ids, int32_t *n_ids, srv_error *e)
{
    cJSON *root = parse_object(body, len, e);
    int rc = -1;
    *ids = NULL;
    *n_ids = 0;
    if (!root) return -1;
    const cJSON *t = field(root, "tokens");
    if (!t || !cJSON_IsArray(t)) {
        srv_fail(e, 400, NULL, "tokens", t ? "invalid_type" : "missing_field",
                 "'tokens' (a list of token ids) is required");
        goto done;
    }
    rc = parse_ids(t, "tokens", ids, n_ids, e);
done:
    cJSON_Delete(root);
    return rc;
}
