/* srv_request.h - the OpenAI request bodies of `forge serve` (POST /v1/completions and
 * /v1/chat/completions), parsed and validated into a plain struct, and the errors in OpenAI's
 * shape. No HTTP and no model here: the parser is a pure function of the body bytes, so the
 * libFuzzer target (fuzz/fuzz_server_request.c) and the cmocka tests drive it directly.
 *
 * Untrusted input: the body is checked for valid UTF-8 and a nesting depth before cJSON sees it;
 * every field is checked for type, finiteness and range, and an error names the field. Unknown
 * fields are ignored (as OpenAI's server does for forward compatibility). */
#ifndef FORGE_SRV_REQUEST_H
#define FORGE_SRV_REQUEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "forge_engine.h"

#define SRV_MAX_DEPTH 32     /* JSON nesting */
#define SRV_MAX_N 16         /* choices per prompt */
#define SRV_MAX_CHOICES 64   /* prompts x n */
#define SRV_MAX_STOP 16      /* stop strings */
#define SRV_MAX_STOP_LEN 256 /* bytes per stop string */
#define SRV_MAX_BIAS 1024    /* logit_bias entries */
#define SRV_MAX_TOP_LOGPROBS 20

typedef enum srv_kind { SRV_COMPLETION = 0, SRV_CHAT = 1 } srv_kind;

/* An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}. */
typedef struct srv_error {
    int status;     /* HTTP status */
    char type[40];  /* "invalid_request_error", "authentication_error", ... */
    char param[64]; /* the field, or "" (null in JSON) */
    char code[40];  /* machine code, or "" (null) */
    char message[512];
} srv_error;

/* Fill e and return -1, so a parser can `return srv_fail(e, 400, "max_tokens", ...)`. */
int srv_fail(srv_error *e, int status, const char *type, const char *param, const char *code,
             const char *fmt, ...) __attribute__((format(printf, 6, 7)));
/* The error as a JSON body (malloc'd, NUL-terminated; NULL when out of memory). */
char *srv_error_json(const srv_error *e);

/* One prompt of a completion request: text (NUL-terminated, may hold NULs before its len) or ids.
 */
typedef struct srv_prompt {
    char *text;
    size_t text_len;
    int32_t *ids;
    int32_t n_ids;
    bool is_ids;
} srv_prompt;

typedef struct srv_request {
    srv_kind kind;
    char *model; /* NULL when absent */
    /* completions: 1..SRV_MAX_CHOICES prompts */
    srv_prompt *prompts;
    int32_t n_prompts;
    /* chat: the messages normalised for the template: [{"role","content"}], content a string */
    char *messages_json;
    bool stream, include_usage;
    int32_t max_tokens; /* -1: not given */
    float temperature, top_p, min_p, repeat_penalty, presence_penalty, frequency_penalty;
    int32_t top_k;
    int32_t n;
    bool seed_set;
    uint64_t seed;
    char **stop;
    int32_t n_stop;
    forge_logit_bias *logit_bias;
    int32_t n_logit_bias;
    bool logprobs;        /* report logprobs (chat: logprobs true; completions: logprobs >= 0) */
    int32_t top_logprobs; /* 0..20 */
    bool echo;            /* completions: refused unless false (not supported) */
    bool ignore_eos;      /* llama.cpp's extension: generate past end-of-generation tokens */
    char *user;
} srv_request;

/* Parse body (len bytes, need not be NUL-terminated). On success *out is filled (owned by the
 * caller: srv_request_clear) and 0 returned; else -1 and e says why (status 400). */
int srv_request_parse(srv_kind kind, const char *body, size_t len, srv_request *out, srv_error *e);
void srv_request_clear(srv_request *r);

/* Bodies of POST /tokenize {"content"|"prompt": string, "add_special": bool} and
 * POST /detokenize {"tokens": [ids]}. Same conventions. */
int srv_tokenize_parse(const char *body, size_t len, char **text, size_t *text_len,
                       bool *add_special, srv_error *e);
int srv_detokenize_parse(const char *body, size_t len, int32_t **ids, int32_t *n_ids, srv_error *e);

/* Is s[0..len) valid UTF-8 (no overlongs, no surrogates)? *bad gets the offset of the first
 * invalid byte. */
bool srv_utf8_valid(const char *s, size_t len, size_t *bad);

#endif
