/* tmpl_lex.c - Jinja2 lexer with the settings transformers uses: trim_blocks, lstrip_blocks,
 * keep_trailing_newline=False, newlines normalised to "\n", whitespace control with '-' and '+',
 * {# comments #} and {% raw %}. Produces a flat token array; knows nothing of statements. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "template/tmpl.h"

typedef struct lexer {
    tmpl_arena *a;
    const char *s;
    size_t n, i;
    int line;
    tmpl_tokens *t;
} lexer;

static void push(lexer *L, int type, int line, const char *p, size_t n)
{
    tmpl_tokens *t = L->t;
    if (t->n == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 64;
        ttok *nv = tmpl_alloc(L->a, cap * sizeof *nv);
        if (t->n) memcpy(nv, t->v, t->n * sizeof *nv);
        t->v = nv;
        t->cap = cap;
    }
    ttok *k = &t->v[t->n++];
    memset(k, 0, sizeof *k);
    k->type = type;
    k->line = line;
    k->p = p;
    k->n = n;
}

static int count_nl(const char *s, size_t n)
{
    int c = 0;
    for (size_t i = 0; i < n; i++)
        c += s[i] == '\n';
    return c;
}

_Noreturn static void lex_error(lexer *L, int line, const char *msg)
{
    tmpl_raise(L->a->fail, FORGE_E_FORMAT, line, "TemplateSyntaxError", "%s", msg);
}

/* length of whitespace (Python str.isspace) ending at s[n], scanning backwards */
static size_t rstrip_len(const char *s, size_t n)
{
    size_t end = n;
    while (end > 0) {
        /* find start of the last code point */
        size_t st = end - 1;
        while (st > 0 && ((unsigned char)s[st] & 0xC0) == 0x80 && end - st < 4)
            st--;
        uint32_t cp;
        size_t used = tmpl_utf8_decode(s + st, end - st, &cp);
        if (used != end - st || !tmpl_py_isspace(cp)) break;
        end = st;
    }
    return end;
}

static size_t skip_space(const char *s, size_t n, size_t i)
{
    while (i < n) {
        uint32_t cp;
        size_t used = tmpl_utf8_decode(s + i, n - i, &cp);
        if (!tmpl_py_isspace(cp)) break;
        i += used;
    }
    return i;
}

/* Does a block-end ("%}" or "#}") begin at i, with optional sign before it? Returns the index
 * after the whole end match (with trimming), or 0 if none. */
static size_t match_end(lexer *L, size_t i, char closer)
{
    const char *s = L->s;
    size_t n = L->n;
    if (i + 3 <= n && s[i] == '-' && s[i + 1] == closer && s[i + 2] == '}')
        return skip_space(s, n, i + 3);
    if (i + 3 <= n && s[i] == '+' && s[i + 1] == closer && s[i + 2] == '}') return i + 3;
    if (i + 2 <= n && s[i] == closer && s[i + 1] == '}') {
        size_t j = i + 2;
        if (j < n && s[j] == '\n') j++; /* trim_blocks */
        return j;
    }
    return 0;
}

/* Python unicode-escape decoding of a string literal body. */
static void unescape(lexer *L, int line, const char *s, size_t n, const char **out, size_t *outn)
{
    char *o = tmpl_alloc(L->a, n + 1);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] != '\\' || i + 1 >= n) {
            o[k++] = s[i];
            continue;
        }
        char e = s[++i];
        uint32_t cp;
        int digits = 0;
        switch (e) {
        case '\n':
            break;
        case '\\':
            o[k++] = '\\';
            break;
        case '\'':
            o[k++] = '\'';
            break;
        case '"':
            o[k++] = '"';
            break;
        case 'a':
            o[k++] = '\a';
            break;
        case 'b':
            o[k++] = '\b';
            break;
        case 'f':
            o[k++] = '\f';
            break;
        case 'n':
            o[k++] = '\n';
            break;
        case 'r':
            o[k++] = '\r';
            break;
        case 't':
            o[k++] = '\t';
            break;
        case 'v':
            o[k++] = '\v';
            break;
        case 'x':
            digits = 2;
            break;
        case 'u':
            digits = 4;
            break;
        case 'U':
            digits = 8;
            break;
        default:
            if (e >= '0' && e <= '7') {
                cp = (uint32_t)(e - '0');
                for (int d = 0; d < 2 && i + 1 < n && s[i + 1] >= '0' && s[i + 1] <= '7'; d++)
                    cp = cp * 8 + (uint32_t)(s[++i] - '0');
                k += tmpl_utf8_encode(cp, o + k);
            } else {
                o[k++] = '\\';
                o[k++] = e;
            }
        }
        if (digits) {
            cp = 0;
            for (int d = 0; d < digits; d++) {
                char c = i + 1 < n ? s[i + 1] : 0;
                int v = (c >= '0' && c <= '9')   ? c - '0'
                        : (c >= 'a' && c <= 'f') ? c - 'a' + 10
                        : (c >= 'A' && c <= 'F') ? c - 'A' + 10
                                                 : -1;
                if (v < 0) lex_error(L, line, "truncated \\x/\\u escape in a string literal");
                cp = cp * 16 + (uint32_t)v;
                i++;
            }
            if (cp > 0x10FFFF) lex_error(L, line, "illegal Unicode character in a string");
            k += tmpl_utf8_encode(cp, o + k); /* escape text is >= encoded length */
        }
    }
    o[k] = 0;
    *out = o;
    *outn = k;
}

static bool is_name_start(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}

static bool is_digit(char c)
{
    return c >= '0' && c <= '9';
}

/* Lex the inside of {{ }} or {% %} up to its end delimiter. closer is '}' or '%'. */
static void lex_expr(lexer *L, char closer, int end_type)
{
    const char *s = L->s;
    size_t n = L->n;
    int balance = 0;
    int start_line = L->line;
    for (;;) {
        size_t j = skip_space(s, n, L->i);
        L->line += count_nl(s + L->i, j - L->i);
        L->i = j;
        if (L->i >= n)
            lex_error(L, start_line,
                      closer == '%' ? "unexpected end of template, expected '%}'"
                                    : "unexpected end of template, expected '}}'");
        if (balance == 0) {
            size_t end = 0;
            if (closer == '%') {
                end = match_end(L, L->i, '%');
            } else {
                if (L->i + 3 <= n && s[L->i] == '-' && s[L->i + 1] == '}' && s[L->i + 2] == '}')
                    end = skip_space(s, n, L->i + 3);
                else if (L->i + 2 <= n && s[L->i] == '}' && s[L->i + 1] == '}')
                    end = L->i + 2;
            }
            if (end) {
                push(L, end_type, L->line, s + L->i, 0);
                L->line += count_nl(s + L->i, end - L->i);
                L->i = end;
                return;
            }
        }
        char c = s[L->i];
        size_t st = L->i;
        if (is_name_start(c)) {
            while (L->i < n && (is_name_start(s[L->i]) || is_digit(s[L->i])))
                L->i++;
            push(L, TK_NAME, L->line, s + st, L->i - st);
        } else if (is_digit(c)) {
            bool is_float = false;
            while (L->i < n &&
                   (is_digit(s[L->i]) || (s[L->i] == '_' && L->i + 1 < n && is_digit(s[L->i + 1]))))
                L->i++;
            if (L->i + 1 < n && s[L->i] == '.' && is_digit(s[L->i + 1])) {
                is_float = true;
                L->i++;
                while (L->i < n && (is_digit(s[L->i]) || s[L->i] == '_'))
                    L->i++;
            }
            if (L->i < n && (s[L->i] == 'e' || s[L->i] == 'E')) {
                size_t k = L->i + 1;
                if (k < n && (s[k] == '+' || s[k] == '-')) k++;
                if (k < n && is_digit(s[k])) {
                    is_float = true;
                    while (k < n && is_digit(s[k]))
                        k++;
                    L->i = k;
                }
            }
            char tmp[128];
            size_t m = 0;
            for (size_t k = st; k < L->i && m < sizeof tmp - 1; k++)
                if (s[k] != '_') tmp[m++] = s[k];
            tmp[m] = 0;
            push(L, is_float ? TK_FLOAT : TK_INT, L->line, s + st, L->i - st);
            ttok *t = &L->t->v[L->t->n - 1];
            if (is_float) {
                t->f = strtod(tmp, NULL);
            } else {
                unsigned long long v = 0;
                bool over = false;
                for (size_t k = 0; k < m; k++) {
                    unsigned long long d = (unsigned long long)(tmp[k] - '0');
                    if (v > (9223372036854775807ULL - d) / 10) over = true;
                    if (!over) v = v * 10 + d;
                }
                if (over) lex_error(L, L->line, "integer literal too large");
                t->i = (int64_t)v;
            }
        } else if (c == '"' || c == '\'') {
            size_t k = L->i + 1;
            while (k < n && s[k] != c) {
                if (s[k] == '\\') k++;
                k++;
            }
            if (k >= n) lex_error(L, L->line, "unexpected end of string literal");
            int line = L->line;
            push(L, TK_STRING, line, NULL, 0);
            ttok *t = &L->t->v[L->t->n - 1];
            unescape(L, line, s + L->i + 1, k - L->i - 1, &t->p, &t->n);
            L->line += count_nl(s + L->i, k - L->i);
            L->i = k + 1;
        } else {
            static const char *const ops2[] = {"//", "**", "==", "!=", ">=", "<="};
            size_t len = 0;
            for (size_t k = 0; k < FORGE_ARRAY_LEN(ops2); k++)
                if (L->i + 1 < n && s[L->i] == ops2[k][0] && s[L->i + 1] == ops2[k][1]) len = 2;
            if (!len && strchr("+-/*%~[](){}<>=.,:|;", c) && c) len = 1;
            if (!len) {
                char msg[64];
                snprintf(msg, sizeof msg, "unexpected char '%c' at %zu",
                         (c >= 32 && c < 127) ? c : '?', L->i);
                lex_error(L, L->line, msg);
            }
            if (c == '(' || c == '[' || c == '{') balance++;
            if (c == ')' || c == ']' || c == '}') {
                if (balance == 0) {
                    char msg[64];
                    snprintf(msg, sizeof msg, "unexpected '%c'", c);
                    lex_error(L, L->line, msg);
                }
                balance--;
            }
            push(L, TK_OP, L->line, s + L->i, len);
            L->i += len;
        }
    }
}

/* Is "{%[-+]?\s*raw\s*[-+]?%}" at i? Returns the end index (after optional '-' stripping) */
static size_t match_raw_begin(lexer *L, size_t i, const char *word)
{
    const char *s = L->s;
    size_t n = L->n;
    size_t k = i + 2;
    if (k < n && (s[k] == '-' || s[k] == '+')) k++;
    k = skip_space(s, n, k);
    size_t wl = strlen(word);
    if (n - k < wl || memcmp(s + k, word, wl)) return 0;
    k += wl;
    if (k < n && (is_name_start(s[k]) || is_digit(s[k]))) return 0;
    k = skip_space(s, n, k);
    if (k + 3 <= n && s[k] == '-' && s[k + 1] == '%' && s[k + 2] == '}')
        return skip_space(s, n, k + 3);
    if (k + 2 <= n && s[k] == '%' && s[k + 1] == '}') return k + 2;
    return 0;
}

void tmpl_lex(tmpl_arena *a, const char *src, size_t len, tmpl_tokens *toks)
{
    /* normalise newlines, drop one trailing newline */
    char *s = tmpl_alloc(a, len + 1);
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        if (src[i] == '\r') {
            s[n++] = '\n';
            if (i + 1 < len && src[i + 1] == '\n') i++;
        } else {
            s[n++] = src[i];
        }
    }
    if (n > 0 && s[n - 1] == '\n') n--;
    s[n] = 0;

    lexer L = {.a = a, .s = s, .n = n, .i = 0, .line = 1, .t = toks};
    bool line_starting = true;
    while (L.i < n) {
        /* find the next tag start */
        size_t k = L.i;
        const char *tag = NULL;
        while (k + 1 < n) {
            const char *p = memchr(s + k, '{', n - k - 1);
            if (!p) break;
            k = (size_t)(p - s);
            if (s[k + 1] == '{' || s[k + 1] == '%' || s[k + 1] == '#') {
                tag = s + k;
                break;
            }
            k++;
        }
        size_t text_end = tag ? k : n;
        size_t text_start = L.i;
        int text_line = L.line;
        size_t tlen = text_end - text_start;
        if (tag) {
            char kind = tag[1];
            char sign = (k + 2 < n && (s[k + 2] == '-' || s[k + 2] == '+')) ? s[k + 2] : 0;
            if (sign == '-') {
                tlen = rstrip_len(s + text_start, tlen);
            } else if (sign != '+' && kind != '{') {
                /* lstrip_blocks */
                size_t lpos = 0;
                for (size_t q = tlen; q > 0; q--)
                    if (s[text_start + q - 1] == '\n') {
                        lpos = q;
                        break;
                    }
                if (lpos > 0 || line_starting) {
                    bool ws = lpos < tlen;
                    for (size_t q = lpos; q < tlen && ws;) {
                        uint32_t cp;
                        size_t used = tmpl_utf8_decode(s + text_start + q, tlen - q, &cp);
                        if (!tmpl_py_isspace(cp)) ws = false;
                        q += used;
                    }
                    if (ws) tlen = lpos;
                }
            }
        }
        if (tlen) push(&L, TK_TEXT, text_line, s + text_start, tlen);
        L.line += count_nl(s + text_start, text_end - text_start);
        if (!tag) {
            L.i = n;
            break;
        }
        size_t after = k + 2 + ((k + 2 < n && (s[k + 2] == '-' || s[k + 2] == '+')) ? 1 : 0);
        char kind = tag[1];
        if (kind == '#') {
            /* comment: find "#}" */
            size_t q = after, end = 0;
            for (; q + 1 < n; q++) {
                if (s[q] == '#' && s[q + 1] == '}') {
                    size_t from = (q > after && (s[q - 1] == '-' || s[q - 1] == '+')) ? q - 1 : q;
                    end = match_end(&L, from, '#');
                    break;
                }
            }
            if (!end) lex_error(&L, L.line, "missing end of comment tag");
            L.line += count_nl(s + k, end - k);
            L.i = end;
            line_starting = s[end - 1] == '\n';
            continue;
        }
        if (kind == '%') {
            size_t rend = match_raw_begin(&L, k, "raw");
            if (rend) {
                /* raw: up to {% endraw %} */
                size_t q = rend, end = 0, body_end = 0;
                for (; q + 1 < n; q++) {
                    if (s[q] == '{' && s[q + 1] == '%') {
                        size_t e = match_raw_begin(&L, q, "endraw");
                        if (e) {
                            body_end = q;
                            if (q + 2 < n && s[q + 2] == '-')
                                body_end = rend + rstrip_len(s + rend, q - rend);
                            end = e;
                            if (s[e - 1] == '}' && e < n && s[e] == '\n') end = e + 1;
                            break;
                        }
                    }
                }
                if (!end) lex_error(&L, L.line, "missing end of raw directive");
                if (body_end > rend) push(&L, TK_TEXT, L.line, s + rend, body_end - rend);
                L.line += count_nl(s + k, end - k);
                L.i = end;
                line_starting = s[end - 1] == '\n';
                continue;
            }
            push(&L, TK_BLOCK_BEGIN, L.line, s + k, 2);
            L.i = after;
            lex_expr(&L, '%', TK_BLOCK_END);
        } else {
            push(&L, TK_VAR_BEGIN, L.line, s + k, 2);
            L.i = after;
            lex_expr(&L, '}', TK_VAR_END);
        }
        line_starting = L.i > 0 && s[L.i - 1] == '\n';
    }
    push(&L, TK_EOF, L.line, s + n, 0);
}
