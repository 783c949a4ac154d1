/* cmd_template.c - `forge template`: render a chat template for a list of messages and print the
 * prompt byte-exact (no trailing newline added), for tests and for debugging prompts. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "forge.h"
#include "cli_io.h"
#include "commands.h"
#include "engine_opts.h"

static void usage(FILE *out)
{
    fprintf(
        out,
        "usage: forge template (--template FILE | --model MODEL.gguf | --chat-template NAME|FILE)\n"
        "                      --messages FILE.json [options]\n"
        "  --template FILE          Jinja chat template file\n"
        "  --model MODEL.gguf       use the model's tokenizer.chat_template and BOS/EOS texts\n"
        "                           (a template that does not parse falls back to a built-in)\n"
        "  --chat-template NAME|FILE  a built-in (chatml, llama2, llama3, gemma, mistral) or a\n"
        "                           file; overrides the model's template\n"
        "  --messages FILE          JSON array of {\"role\", \"content\"} ('-' = stdin)\n"
        "  --add-generation-prompt  end with the assistant header\n"
        "  --bos TEXT, --eos TEXT   bos_token / eos_token (default: the model's; else undefined)\n"
        "  --vars JSON              extra variables, e.g. '{\"enable_thinking\": false}'\n"
        "  --now SECONDS            fixed time (UTC) for strftime_now: an integer count of\n"
        "                           seconds since 1970 (0 = the current local time)\n"
        "  --template-timeout MS    wall-clock budget of the render (default 1000)\n"
        "  --list                   print the built-in template names\n"
        "  --print-source NAME      print a built-in template's source\n");
}

int cmd_template(int argc, char **argv)
{
    const char *tmpl_path = NULL, *model_path = NULL, *choice = NULL, *msg_path = NULL;
    const char *bos = NULL, *eos = NULL, *vars_json = NULL;
    bool add_gen = false;
    int64_t now = 0;
    long timeout_ms = 0;
    int status = 1;
    char *src = NULL, *messages = NULL, *out = NULL;
    forge_template *t = NULL;
    gguf_ctx *g = NULL;
    forge_template_model tm = {0};
    forge_err err = {0};

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool has_val = i + 1 < argc;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--list")) {
            for (const char *const *n = forge_template_builtin_names(); *n; n++)
                printf("%s\n", *n);
            return 0;
        } else if (!strcmp(a, "--print-source") && has_val) {
            const char *s = forge_template_builtin_source(argv[++i]);
            if (!s) {
                fprintf(stderr,
                        "forge template: bad value for --print-source: '%s' (expected a name that "
                        "--list prints)\n",
                        argv[i]);
                return 2;
            }
            fputs(s, stdout);
            return 0;
        } else if (!strcmp(a, "--template") && has_val) {
            tmpl_path = argv[++i];
        } else if ((!strcmp(a, "--model") || !strcmp(a, "-m")) && has_val) {
            model_path = argv[++i];
        } else if (!strcmp(a, "--chat-template") && has_val) {
            choice = argv[++i];
        } else if (!strcmp(a, "--messages") && has_val) {
            msg_path = argv[++i];
        } else if (!strcmp(a, "--add-generation-prompt")) {
            add_gen = true;
        } else if (!strcmp(a, "--bos") && has_val) {
            bos = argv[++i];
        } else if (!strcmp(a, "--eos") && has_val) {
            eos = argv[++i];
        } else if (!strcmp(a, "--vars") && has_val) {
            vars_json = argv[++i];
            if (!cli_parse_json_object("template", a, vars_json)) return 2;
        } else if (!strcmp(a, "--template-timeout") && has_val) {
            if (!cli_parse_int("template", a, argv[++i], 1, 86400000, &timeout_ms)) return 2;
        } else if (!strcmp(a, "--now") && has_val) {
            long v; /* up to the end of year 9999 */
            if (!cli_parse_int("template", a, argv[++i], 0, 253402300799L, &v)) return 2;
            now = v;
        } else {
            fprintf(stderr, "forge template: unknown or incomplete option '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }
    if (!msg_path || (!tmpl_path && !model_path && !choice)) {
        fprintf(stderr, "forge template: %s is required\n",
                !msg_path ? "--messages FILE"
                          : "one of --template FILE, --model MODEL.gguf, --chat-template NAME");
        usage(stderr);
        return 2;
    }
    if (tmpl_path && !choice) choice = tmpl_path;

    if (model_path) {
        if (gguf_open(model_path, &g, &err) != FORGE_OK) goto fail;
        if (forge_template_model_read(g, &tm, &err) != FORGE_OK) goto fail;
    }
    char warning[FORGE_ERR_MSG_MAX + 128];
    const char *desc = NULL;
    if (forge_template_select(model_path ? &tm : NULL, choice, &t, &desc, warning, sizeof warning,
                              &err) != FORGE_OK)
        goto fail;
    if (warning[0])
        fprintf(stderr, "forge template: warning: %s\n", warning);
    else if (!choice && desc && strcmp(desc, "model"))
        fprintf(stderr,
                "forge template: warning: the model has no chat template; using the built-in "
                "'%s'\n",
                desc);

    messages = cli_read_file("template", "messages", msg_path, NULL);
    if (!messages) goto done;
    forge_template_vars v = {0};
    v.messages_json = messages;
    v.add_generation_prompt = add_gen;
    v.bos_token = bos ? bos : tm.bos_token;
    v.eos_token = eos ? eos : tm.eos_token;
    v.extra_json = vars_json;
    v.now = now;
    v.max_time_ms = (uint32_t)timeout_ms;
    v.name = tmpl_path ? tmpl_path : choice ? choice : "the model's chat template";
    size_t n = 0;
    if (forge_template_render(t, &v, &out, &n, NULL, &err) != FORGE_OK) goto fail;
    fwrite(out, 1, n, stdout);
    status = cli_stdout_ok("template") ? 0 : 1;
    goto done;
fail:
    fprintf(stderr, "forge template: %s\n", err.msg);
done:
    free(out);
    free(messages);
    free(src);
    forge_template_free(t);
    forge_template_model_clear(&tm);
    gguf_close(g);
    return status;
}
