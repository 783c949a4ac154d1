/* forge_server.h - an OpenAI-compatible HTTP server (`forge serve`) in front of an engine
 * (forge_engine.h): POST /v1/completions, POST /v1/chat/completions (with server-sent-event
 * streaming), GET /v1/models, GET /health, GET /metrics (Prometheus text), POST /tokenize,
 * POST /detokenize, and a chat page at /.
 *
 * Threads: libmicrohttpd's pool of HTTP threads only parse, validate, render the chat template,
 * tokenize and submit; the engine's thread (forge_engine_start, started by the caller) runs the
 * model and its callbacks append each event to the request's queue and resume the suspended
 * connection. A client that goes away mid-stream has its requests cancelled.
 *
 * Ownership: the server borrows the engine (started, and outliving the server) and everything in
 * the params only for the duration of forge_server_create (strings are copied).
 * Errors follow forge.h: int status, message in the caller's forge_err.
 */
#ifndef FORGE_SERVER_H
#define FORGE_SERVER_H

#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdbool.h>

#include "forge_engine.h"

#ifdef __cplusplus
extern "C" {
#endif

struct forge_err;
typedef struct forge_server forge_server;

typedef struct forge_server_params {
    const char *host;          /* address to listen on (default "127.0.0.1") */
    int port;                  /* 0: a free port, see forge_server_port */
    const char *api_key;       /* NULL: no authentication; else "Authorization: Bearer KEY" is
                                * required on /v1/..., /tokenize, /detokenize */
    const char *alias;         /* the model's id in /v1/models and responses (required) */
    const char *chat_template; /* built-in name or template file; NULL: the model's own */
    const char *cors_origin;   /* NULL: no CORS headers; "*" or an origin */
    size_t max_body;           /* bytes of a request body (default 1 MiB) */
    unsigned timeout_s;        /* idle connection timeout, slow clients (default 60) */
    int n_threads;             /* HTTP threads (default 4) */
    int max_queue;             /* choices waiting or running at once; more: 503 (default 256) */
    double shutdown_timeout_s; /* on stop: time for in-flight requests to finish (default 10) */
    unsigned stream_interval_ms; /* a stream's bytes go out at most once per interval (its
                                  * first and last event at once), batching the sends of fast
                                  * models; 0: at every event (default 0) */
    bool log_prompts;          /* put the request body into the access log */
    FILE *log;                 /* access log (one line per request); NULL: stderr */
} forge_server_params;

forge_server_params forge_server_default_params(void);

/* Listen and serve (HTTP threads start at once). *out owned by the caller (forge_server_free).
 * Errors: FORGE_E_INVALID for bad params, FORGE_E_IO when the address cannot be bound. */
int forge_server_create(forge_engine *engine, const forge_server_params *params, forge_server **out,
                        struct forge_err *err);

/* The port actually bound (useful with port 0). */
int forge_server_port(const forge_server *s);

/* Block until *stop becomes non-zero (a signal handler's flag), then shut down gracefully:
 * refuse new connections and requests (503), let in-flight requests finish for up to
 * shutdown_timeout_s, then stop the engine (cancelling what is left, whose clients get their
 * final events), and stop the HTTP threads. Returns FORGE_OK. */
int forge_server_run(forge_server *s, const volatile sig_atomic_t *stop, struct forge_err *err);

/* Stops the HTTP threads (if forge_server_run did not) and frees. NULL is fine. */
void forge_server_free(forge_server *s);

/* The chat page served at / (a self-contained HTML file compiled in). */
extern const unsigned char forge_server_chat_html[];
extern const unsigned int forge_server_chat_html_len;

#ifdef __cplusplus
}
#endif

#endif /* FORGE_SERVER_H */
