/* cmd_chat.c - `forge chat`: multi-turn chat in the terminal. Each turn renders the whole
 * conversation with the chat template (the model's, a built-in or --chat-template), tokenizes it
 * and submits it as one request to a forge_engine, whose prefix cache holds the K/V of earlier
 * turns (only the new tail is computed), then streams the answer from the request's events.
 * Ctrl-C stops the answer (not the program). Lines starting with '/' are commands. Reads stdin
 * line by line, so messages can be piped in as well. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "cli_io.h"
#include "commands.h"
#include "engine_opts.h"

static volatile sig_atomic_t g_interrupted = 0;

static void on_sigint(int sig)
{
    (void)sig;
    g_interrupted = 1;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: forge chat -m MODEL [options]\n"
            "  --chat-template NAME|FILE  built-in (chatml, llama2, llama3, gemma, mistral) or a\n"
            "                       Jinja file (default: the model's template, else a built-in)\n"
            "  --system TEXT        system prompt\n"
            "  -n, --n-predict N    most tokens per answer (default 512; -1 = until the context)\n"
            "  --temp T, --top-k K, --top-p P, --min-p P, --repeat-penalty R, --seed S,\n"
            "  --repeat-last-n N, --presence-penalty P, --frequency-penalty F  sampling, as in\n"
            "                       forge run (see forge run --help for ranges and defaults)\n"
            "  --vars JSON          extra template variables, e.g. '{\"enable_thinking\": false}'\n"
            "  --template-timeout MS  wall-clock budget of each template render (default 1000)\n"
            "  --stats              after each answer, print token counts to stderr (the prompt\n"
            "                       tokens reused from the KV cache of earlier turns)\n"
            "  --show-prompt        print each rendered prompt to stderr\n"
            "%s%s"
            "In the chat: /reset  /system TEXT  /save FILE  /load FILE  /stats  /exit  /help\n"
            "Ctrl-C interrupts an answer; Ctrl-D or /exit quits. With --temp > 0, answer k\n"
            "(counted from 0 since the start or the last /reset) draws with seed S + k.\n",
            engine_opts_help, engine_pool_help);
}

typedef struct chat {
    forge_model *model;
    forge_engine *engine;
    const forge_tok *tok;
    forge_template *tmpl;
    forge_template_model tm;
    forge_sampler_params sp;
    uint64_t turn; /* answers since the start or /reset: the seed of this one is sp.seed + turn */
    cJSON *messages; /* the conversation, including the system message if any */
    char *system;    /* system prompt (malloc'd) or NULL */
    int32_t n_ctx;   /* K/V positions a turn may use (-c) */
    long n_predict;
    const char *vars_json;
    const char *inputs[3]; /* files read while the chat runs: /save never writes onto them */
    long template_timeout_ms; /* 0 = the library's default */
    const char *template_name;
    bool stats, show_prompt, interactive;
} chat;

static void set_system(chat *c, const char *text)
{
    free(c->system);
    c->system = text && *text ? strdup(text) : NULL;
    /* replace or insert the first message */
    cJSON *first = cJSON_GetArrayItem(c->messages, 0);
    const cJSON *role = first ? cJSON_GetObjectItemCaseSensitive(first, "role") : NULL;
    bool has_sys = cJSON_IsString(role) && !strcmp(role->valuestring, "system");
    if (has_sys) cJSON_DeleteItemFromArray(c->messages, 0);
    if (c->system) {
        cJSON *m = cJSON_CreateObject();
        cJSON_AddStringToObject(m, "role", "system");
        cJSON_AddStringToObject(m, "content", c->system);
        cJSON_InsertItemInArray(c->messages, 0, m);
    }
}

static void add_message(chat *c, const char *role, const char *content)
{
    cJSON *m = cJSON_CreateObject();
    cJSON_AddStringToObject(m, "role", role);
    cJSON_AddStringToObject(m, "content", content);
    cJSON_AddItemToArray(c->messages, m);
}

static void drop_last_message(chat *c)
{
    int n = cJSON_GetArraySize(c->messages);
    if (n > 0) cJSON_DeleteItemFromArray(c->messages, n - 1);
}

/* Render the conversation + generation prompt and tokenize it. */
static int render_prompt(chat *c, bool show, int32_t **ids, size_t *n_ids, forge_err *err)
{
    char *mj = cJSON_PrintUnformatted(c->messages);
    char *prompt = NULL;
    size_t len = 0;
    int rc = FORGE_E_NOMEM;
    if (!mj) {
        snprintf(err->msg, sizeof err->msg, "out of memory");
        return err->code = FORGE_E_NOMEM;
    }
    forge_template_vars v = {0};
    v.messages_json = mj;
    v.add_generation_prompt = true;
    v.bos_token = c->tm.bos_token;
    v.eos_token = c->tm.eos_token;
    v.extra_json = c->vars_json;
    v.max_time_ms = (uint32_t)c->template_timeout_ms;
    v.name = c->template_name;
    rc = forge_template_render(c->tmpl, &v, &prompt, &len, NULL, err);
    if (rc == FORGE_OK) {
        if (show && c->show_prompt) fprintf(stderr, "--- prompt ---\n%s\n--- end ---\n", prompt);
        /* the template writes BOS itself when it wants it; add it only if it did not and the
         * vocabulary asks for one */
        bool add_special = forge_tok_adds_bos(c->tok) &&
                           !(c->tm.bos_token && *c->tm.bos_token &&
                             !strncmp(prompt, c->tm.bos_token, strlen(c->tm.bos_token)));
        rc = forge_tok_encode(c->tok, prompt, len, add_special, true, ids, n_ids, err);
    }
    free(prompt);
    cJSON_free(mj);
    return rc;
}

/* What the event callback gathers for one answer. */
typedef struct answer {
    forge_engine *engine;
    forge_req_id id;
    int32_t *gen; /* the answer's ids (room for max_tokens) */
    int32_t n_gen;
    int32_t n_cached; /* prompt tokens the engine found in its prefix cache */
    bool discard;     /* -n 0: the prompt is read, its pick not shown */
    int32_t n_sampled; /* picks, shown or not */
    forge_finish finish;
    char error[FORGE_ERR_MSG_MAX];
    bool out_failed; /* stdout failed (reported): the request was cancelled */
} answer;

static void on_event(const forge_event *ev, void *user)
{
    answer *a = user;
    a->n_cached = ev->n_cached;
    if (ev->token >= 0 || ev->finish == FORGE_FINISH_STOP) a->n_sampled++;
    if (ev->finish != FORGE_FINISH_NONE) {
        a->finish = ev->finish;
        if (ev->error) snprintf(a->error, sizeof a->error, "%s", ev->error);
    }
    if (a->out_failed || a->discard) return;
    if (ev->token >= 0) a->gen[a->n_gen++] = ev->token;
    if (ev->text_len) fwrite(ev->text, 1, ev->text_len, stdout);
    if (!cli_stdout_ok("chat")) { /* reported; the answer cannot be shown */
        a->out_failed = true;
        if (ev->finish == FORGE_FINISH_NONE) (void)forge_engine_cancel(a->engine, a->id, NULL);
    }
}

/* One turn: the user message is already in c->messages. Returns 0, or 1 on a hard error.
 * A turn that cannot run (context full, interrupted prompt) removes the user message. */
static int run_turn(chat *c)
{
    forge_err err = {0};
    int32_t *ids = NULL;
    size_t n_ids = 0;
    answer a = {0};
    int status = 0;

    if (render_prompt(c, true, &ids, &n_ids, &err) != FORGE_OK) {
        fprintf(stderr, "forge chat: %s\n", err.msg);
        drop_last_message(c);
        goto done;
    }
    if ((int64_t)n_ids >= c->n_ctx) {
        fprintf(stderr,
                "forge chat: the conversation is %zu tokens, it does not fit the context of %d "
                "tokens: /reset, or start with a larger -c\n",
                n_ids, c->n_ctx);
        drop_last_message(c);
        goto done;
    }
    const int64_t room = c->n_ctx - (int64_t)n_ids + 1; /* the last pick needs no K/V */
    const int64_t want = c->n_predict < 0 || c->n_predict > room ? room : c->n_predict;
    a.engine = c->engine;
    a.discard = want == 0; /* the prompt still goes through the engine (and its cache) */
    a.gen = malloc((size_t)(want > 0 ? want : 1) * sizeof *a.gen);
    if (!a.gen) {
        status = 1;
        goto done;
    }
    forge_request_params rp = forge_request_default_params();
    rp.prompt = ids;
    rp.n_prompt = (int32_t)n_ids;
    rp.max_tokens = want > 0 ? (int32_t)want : 1;
    rp.sampling = c->sp;
    rp.sampling.seed = c->sp.seed + c->turn;
    rp.on_event = on_event;
    rp.user = &a;
    g_interrupted = 0;
    if (forge_engine_submit(c->engine, &rp, &a.id, &err) != FORGE_OK) {
        fprintf(stderr, "forge chat: %s\n", err.msg);
        drop_last_message(c);
        goto done;
    }
    (void)forge_engine_run(c->engine, &err); /* how each request ended comes in its events */
    g_interrupted = 0;
    if (a.out_failed) {
        status = 1;
        goto done;
    }
    if (a.n_sampled == 0 && a.finish == FORGE_FINISH_CANCELLED) {
        fprintf(stderr, "\nforge chat: interrupted while reading the prompt; message dropped\n");
        drop_last_message(c);
        goto done;
    }
    if (a.n_sampled == 0 && a.finish == FORGE_FINISH_ERROR) {
        fprintf(stderr, "forge chat: %s\n", a.error);
        drop_last_message(c);
        goto done;
    }
    if (a.finish == FORGE_FINISH_NONE) { /* the run failed before the request ended */
        fprintf(stderr, "forge chat: %s\n", err.msg);
        status = 1;
        goto done;
    }
    c->turn++;
    const bool full = !a.discard && a.finish == FORGE_FINISH_LENGTH && a.n_gen == room;
    const char *stop = a.discard                            ? "limit"
                       : a.finish == FORGE_FINISH_STOP      ? "end"
                       : a.finish == FORGE_FINISH_CANCELLED ? "interrupted"
                       : a.finish == FORGE_FINISH_ERROR     ? "error"
                       : full                               ? "context full"
                                                            : "limit";
    if (a.finish == FORGE_FINISH_ERROR) fprintf(stderr, "\nforge chat: %s\n", a.error);
    printf("\n");
    if (!cli_stdout_ok("chat")) {
        status = 1;
        goto done;
    }
    if (a.finish == FORGE_FINISH_CANCELLED) fprintf(stderr, "[interrupted]\n");
    if (full)
        fprintf(stderr, "[the context of %d token%s is full: /reset to start over]\n", c->n_ctx,
                cli_plural(c->n_ctx));

    /* the answer (even a partial one) joins the history */
    char *text = NULL;
    size_t tl = 0;
    if (forge_tok_decode(c->tok, a.gen, (size_t)a.n_gen, false, true, &text, &tl, &err) !=
        FORGE_OK) {
        fprintf(stderr, "forge chat: %s\n", err.msg);
        status = 1;
        goto done;
    }
    add_message(c, "assistant", text);
    free(text);
    if (c->stats)
        fprintf(stderr,
                "[turn: prompt %zu token%s, %d reused from the cache, %d decoded; answer %d "
                "token%s (%s)]\n",
                n_ids, cli_plural((long long)n_ids), a.n_cached, (int32_t)n_ids - a.n_cached,
                a.n_gen, cli_plural(a.n_gen), stop);
done:
    free(a.gen);
    free(ids);
    return status;
}

/* /stats: the engine's totals since the chat started. */
static void print_stats(chat *c)
{
    forge_engine_stats st;
    forge_engine_info info;
    forge_engine_get_stats(c->engine, &st);
    forge_engine_get_info(c->engine, &info);
    fprintf(stderr,
            "[prompt tokens %llu, %llu of them reused from the KV cache; generated %llu; KV blocks "
            "of %d tokens: %d in use, %d cached, %d in all]\n",
            (unsigned long long)st.prompt_tokens, (unsigned long long)st.cached_tokens,
            (unsigned long long)st.generated_tokens, info.block_size, st.blocks_used,
            st.blocks_cached, st.blocks_total);
}

/* Written beside the target and renamed into place (cli_io.h); never onto the model, the
 * template file or the stdin the chat is read from. */
static void cmd_save(chat *c, const char *path)
{
    cli_out out;
    char *s = cJSON_Print(c->messages);
    if (!s) {
        fprintf(stderr, "forge chat: out of memory\n");
        return;
    }
    if (cli_out_open(&out, "chat", "/save", path, c->inputs, 3, false, true) == 0) {
        cli_out_write(&out, s, strlen(s));
        cli_out_write(&out, "\n", 1);
        if (cli_out_commit(&out) == 0) {
            int n = cJSON_GetArraySize(c->messages);
            fprintf(stderr, "[saved %d message%s to %s]\n", n, cli_plural(n), path);
        }
    }
    cJSON_free(s);
}

static void cmd_load(chat *c, const char *path)
{
    forge_err err = {0};
    char *s = cli_read_file("chat", "conversation", path, NULL);
    if (!s) return;
    if (forge_template_check_messages(s, &err) != FORGE_OK) {
        fprintf(stderr, "forge chat: %s: %s\n", path, err.msg);
        free(s);
        return;
    }
    cJSON *m = cJSON_Parse(s);
    free(s);
    if (!m) {
        fprintf(stderr, "forge chat: %s: not valid JSON\n", path);
        return;
    }
    cJSON_Delete(c->messages);
    c->messages = m;
    cJSON *first = cJSON_GetArrayItem(m, 0);
    const cJSON *role = first ? cJSON_GetObjectItemCaseSensitive(first, "role") : NULL;
    const cJSON *content = first ? cJSON_GetObjectItemCaseSensitive(first, "content") : NULL;
    free(c->system);
    c->system = NULL;
    if (cJSON_IsString(role) && !strcmp(role->valuestring, "system") && cJSON_IsString(content))
        c->system = strdup(content->valuestring);
    int n = cJSON_GetArraySize(m);
    fprintf(stderr, "[loaded %d message%s from %s]\n", n, cli_plural(n), path);
    /* the next turn re-renders everything and reuses whatever prefix still matches the cache */
}

static const char *arg_of(const char *line, const char *cmd)
{
    size_t n = strlen(cmd);
    if (strncmp(line, cmd, n)) return NULL;
    if (line[n] == 0) return "";
    if (line[n] != ' ' && line[n] != '\t') return NULL;
    line += n;
    while (*line == ' ' || *line == '\t')
        line++;
    return line;
}

/* Returns 1 to quit, 0 to go on. */
static int handle_command(chat *c, const char *line)
{
    const char *a;
    if (arg_of(line, "/exit") || arg_of(line, "/quit")) return 1;
    if (arg_of(line, "/help")) {
        fprintf(stderr, "/reset  forget the conversation (keeps the system prompt)\n"
                        "/system TEXT  set the system prompt (empty: none)\n"
                        "/save FILE  write the conversation as JSON messages\n"
                        "/load FILE  read a conversation written by /save\n"
                        "/stats  tokens so far, and how many came from the KV cache\n"
                        "/exit  quit\n");
    } else if (arg_of(line, "/reset")) {
        cJSON_Delete(c->messages);
        c->messages = cJSON_CreateArray();
        set_system(c, c->system ? strdup(c->system) : NULL);
        c->turn = 0; /* the next answer draws as the first one did */
        fprintf(stderr, "[conversation reset]\n");
    } else if (arg_of(line, "/stats")) {
        print_stats(c);
    } else if ((a = arg_of(line, "/system"))) {
        char *copy = strdup(a);
        set_system(c, copy);
        free(copy);
        fprintf(stderr, c->system ? "[system prompt set]\n" : "[system prompt removed]\n");
    } else if ((a = arg_of(line, "/save"))) {
        if (!*a)
            fprintf(stderr, "usage: /save FILE\n");
        else
            cmd_save(c, a);
    } else if ((a = arg_of(line, "/load"))) {
        if (!*a)
            fprintf(stderr, "usage: /load FILE\n");
        else
            cmd_load(c, a);
    } else {
        fprintf(stderr, "unknown command '%s' (/help lists them)\n", line);
    }
    return 0;
}

int cmd_chat(int argc, char **argv)
{
    engine_opts o;
    forge_sampler_params sp = forge_sampler_default_params();
    const char *choice = NULL, *system = NULL;
    bool seed_set = false;
    chat c = {0};
    forge_err err = {0};
    int status = 1;
    char *line = NULL;
    size_t line_cap = 0;
    struct sigaction old_sa, sa;
    bool sa_set = false;

    c.n_predict = 512;
    engine_opts_init(&o);
    o.pool_opts = true;
    for (int i = 1; i < argc; i++) {
        int r = engine_opts_parse(&o, "chat", argc, argv, &i);
        if (r == 0) r = sampling_opts_parse(&sp, &seed_set, "chat", argc, argv, &i);
        if (r < 0) return 2;
        if (r > 0) continue;
        const char *a = argv[i];
        const char *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "-n") || !strcmp(a, "--n-predict")) {
            i++;
            if (!cli_parse_int("chat", a, val, -1, 1L << 30, &c.n_predict)) return 2;
        } else if (!strcmp(a, "--chat-template") && val) {
            choice = argv[++i];
        } else if (!strcmp(a, "--system") && val) {
            system = argv[++i];
        } else if (!strcmp(a, "--vars") && val) {
            c.vars_json = argv[++i];
            if (!cli_parse_json_object("chat", a, c.vars_json)) return 2;
        } else if (!strcmp(a, "--template-timeout") && val) {
            i++;
            if (!cli_parse_int("chat", a, val, 1, 86400000, &c.template_timeout_ms)) return 2;
        } else if (!strcmp(a, "--stats")) {
            c.stats = true;
        } else if (!strcmp(a, "--show-prompt")) {
            c.show_prompt = true;
        } else {
            fprintf(stderr, "forge chat: unknown option or missing value '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }
    if (!seed_set) sp.seed = (uint64_t)time(NULL);
    c.interactive = isatty(STDIN_FILENO);
    c.inputs[0] = o.model_path;
    c.inputs[1] = choice; /* a template file (a built-in's name is no file, or another one) */
    c.inputs[2] = "-";

    if ((status = engine_load_model(&o, "chat", &c.model))) goto done;
    status = 1;
    /* -c counts K/V positions; a request picks one token more (the engine's n_ctx). One answer
     * at a time; the pool defaults to one context, earlier turns stay in it as cached blocks. */
    c.n_ctx = engine_context_size(&o, "chat", c.model);
    forge_engine_params ep = engine_params_of(&o);
    ep.n_ctx = c.n_ctx + 1;
    ep.n_parallel = 1;
    if (!o.kv_size) ep.kv_size = c.n_ctx;
    if (ep.n_batch > c.n_ctx) ep.n_batch = c.n_ctx; /* no step of one request is longer */
    if ((status = engine_create_cli(&o, "chat", c.model, &ep, &c.engine))) goto done;
    status = 1;
    c.tok = forge_model_tok(c.model);
    if (forge_template_model_read(forge_model_gguf(c.model), &c.tm, &err) != FORGE_OK) goto fail;
    char warning[FORGE_ERR_MSG_MAX + 128];
    const char *desc = NULL;
    if (forge_template_select(&c.tm, choice, &c.tmpl, &desc, warning, sizeof warning, &err))
        goto fail;
    if (warning[0]) fprintf(stderr, "forge chat: warning: %s\n", warning);
    else if (!choice && strcmp(desc, "model"))
        fprintf(stderr,
                "forge chat: warning: the model has no chat template; using the built-in '%s'\n",
                desc);
    c.template_name = !strcmp(desc, "model")  ? "the model's chat template"
                      : !strcmp(desc, "file") ? choice
                                              : desc;
    c.sp = sp;
    c.messages = cJSON_CreateArray();
    if (!c.messages) goto done;
    set_system(&c, system);
    /* a template that rejects even a plain conversation is better reported now */
    {
        add_message(&c, "user", "hello");
        int32_t *ids = NULL;
        size_t n = 0;
        int prc = render_prompt(&c, false, &ids, &n, &err);
        if (prc == FORGE_E_RANGE) goto fail; /* over a step/time budget: every turn would be too */
        if (prc != FORGE_OK)
            fprintf(stderr,
                    "forge chat: warning: the chat template fails on a plain conversation: %s\n",
                    err.msg);
        free(ids);
        drop_last_message(&c);
    }
    fprintf(stderr, "forge chat: %s, template: %s, context %d token%s%s\n", o.model_path,
            !strcmp(desc, "model")  ? "the model's"
            : !strcmp(desc, "file") ? choice
                                    : desc,
            c.n_ctx, cli_plural(c.n_ctx),
            c.interactive ? "; /help for commands, Ctrl-C stops an answer, Ctrl-D quits" : "");

    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: Ctrl-C at the prompt returns from getline */
    if (sigaction(SIGINT, &sa, &old_sa) == 0) sa_set = true;
    forge_engine_set_abort_flag(c.engine, &g_interrupted);

    status = 0;
    for (;;) {
        if (c.interactive) {
            fputs("> ", stdout);
            if (!cli_stdout_ok("chat")) {
                status = 1;
                break;
            }
        }
        errno = 0;
        ssize_t n = getline(&line, &line_cap, stdin);
        if (n < 0) {
            if (errno == EINTR && g_interrupted) { /* Ctrl-C at the prompt: keep going */
                g_interrupted = 0;
                clearerr(stdin);
                fputs("\n(Ctrl-D or /exit quits)\n", stderr);
                continue;
            }
            if (c.interactive) fputs("\n", stdout);
            break;
        }
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
            line[--n] = 0;
        if (n == 0) continue;
        if (line[0] == '/') {
            if (handle_command(&c, line)) break;
            continue;
        }
        add_message(&c, "user", line);
        if (run_turn(&c)) {
            status = 1;
            break;
        }
    }
    goto done;
fail:
    fprintf(stderr, "forge chat: %s\n", err.msg);
done:
    if (sa_set) sigaction(SIGINT, &old_sa, NULL);
    free(line);
    free(c.system);
    cJSON_Delete(c.messages);
    forge_template_free(c.tmpl);
    forge_template_model_clear(&c.tm);
    forge_engine_free(c.engine);
    forge_model_free(c.model);
    return status;
}
