/* hub_cli.c - see hub_cli.h. The bundled demo model is looked for, in order, at $FORGE_MODEL,
 * EXEDIR/../models/stories260K.gguf (the build tree: build/forge -> models/) and
 * EXEDIR/../share/forge/stories260K.gguf (an install: PREFIX/bin/forge -> PREFIX/share/forge/). */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "engine_opts.h"
#include "hub_cli.h"

#define DEMO_MODEL "stories260K.gguf"

static char *g_resolved; /* the path hub_resolve_model made; lives until exit */

int hub_opts_parse(engine_opts *o, const char *cmd, int argc, char **argv, int *i)
{
    const char *a = argv[*i];
    if (!strcmp(a, "--offline")) {
        o->offline = true;
        return 1;
    }
    if (strcmp(a, "-hf") != 0 && strcmp(a, "--hf-repo") != 0) return 0;
    if (*i + 1 >= argc) {
        fprintf(stderr, "forge %s: %s needs a value (REPO[:QUANT] or REPO/FILE.gguf)\n", cmd, a);
        return -1;
    }
    o->hf_spec = argv[++*i];
    return 1;
}

/* ---- progress and notes ------------------------------------------------------------------ */

typedef struct bar_state {
    const char *cmd;
    double last;
    int last_pct;
    bool quiet;
    bool open; /* a bar line without its newline is on stderr */
} bar_state;

static bar_state g_bar;

static void bar(const char *name, uint64_t done, uint64_t total, void *user)
{
    bar_state *b = user;
    double t = cli_now();
    int pct = total ? (int)(100.0 * (double)done / (double)total) : -1;
    bool end = total && done >= total;
    if (!end && t - b->last < 0.1 && pct == b->last_pct) return;
    b->last = t;
    b->last_pct = pct;
    const char *base = strrchr(name, '/');
    base = base ? base + 1 : name;
    const int width = 30;
    if (total) {
        int fill = (int)((double)done / (double)total * width);
        if (fill > width) fill = width;
        fprintf(stderr, "\rforge %s: %.40s [%.*s%*s] %3d%% %.1f / %.1f MiB", b->cmd, base, fill,
                "##############################", width - fill, "", pct, (double)done / (1 << 20),
                (double)total / (1 << 20));
    } else {
        fprintf(stderr, "\rforge %s: %.40s %.1f MiB", b->cmd, base, (double)done / (1 << 20));
    }
    if (end) fputc('\n', stderr);
    b->open = !end;
    fflush(stderr);
}

void hub_cli_end_line(void)
{
    if (g_bar.open) fputc('\n', stderr);
    g_bar.open = false;
}

static void on_note(const char *msg, void *user)
{
    bar_state *b = user;
    if (b->quiet) return;
    hub_cli_end_line();
    fprintf(stderr, "forge %s: %s\n", b->cmd, msg);
}

forge_hub_params hub_cli_params(const char *cmd, bool offline, bool quiet)
{
    forge_hub_params p = forge_hub_default_params();
    g_bar.cmd = cmd;
    g_bar.last = 0;
    g_bar.last_pct = -2;
    g_bar.quiet = quiet;
    g_bar.open = false;
    p.offline = offline;
    p.note = on_note;
    p.user = &g_bar;
    if (!quiet && isatty(STDERR_FILENO)) p.progress = bar;
    return p;
}

/* ---- the model a command uses ------------------------------------------------------------ */

/* DIR of the running executable (malloc'd), NULL if unknown. */
static char *exe_dir(void)
{
    char buf[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
    if (n <= 0) return NULL;
    buf[n] = '\0';
    char *slash = strrchr(buf, '/');
    if (!slash) return NULL;
    *slash = '\0';
    return strdup(buf);
}

static char *bundled_model(void)
{
    static const char *const rel[] = {"../models/" DEMO_MODEL, "../share/forge/" DEMO_MODEL};
    char *dir = exe_dir(), *found = NULL;
    for (size_t k = 0; dir && !found && k < sizeof rel / sizeof rel[0]; k++) {
        size_t n = strlen(dir) + strlen(rel[k]) + 2;
        char *p = malloc(n);
        if (!p) break;
        snprintf(p, n, "%s/%s", dir, rel[k]);
        if (access(p, R_OK) == 0) {
            found = realpath(p, NULL);
            if (!found) found = strdup(p);
        }
        free(p);
    }
    free(dir);
    return found;
}

int hub_resolve_model(engine_opts *o, const char *cmd)
{
    if (o->hf_spec && o->model_path) {
        fprintf(stderr, "forge %s: give either -m FILE or -hf REPO[:QUANT], not both\n", cmd);
        return 2;
    }
    if (o->hf_spec) {
        forge_hub_params p = hub_cli_params(cmd, o->offline, false);
        forge_err err = {0};
        p.prefer_cache = true;
        free(g_resolved);
        g_resolved = NULL;
        if (forge_hub_pull(o->hf_spec, &p, &g_resolved, &err) != FORGE_OK) {
            hub_cli_end_line();
            fprintf(stderr, "forge %s: -hf %s: %s\n", cmd, o->hf_spec, err.msg);
            return err.code == FORGE_E_INVALID ? 2 : 1;
        }
        o->model_path = g_resolved;
        return 0;
    }
    if (o->model_path) return 0;
    if (!o->default_model) {
        fprintf(stderr, "forge %s: -m MODEL (or -hf REPO[:QUANT]) is required\n", cmd);
        return 2;
    }
    const char *env = getenv("FORGE_MODEL");
    if (env && *env) {
        o->model_path = env;
        return 0;
    }
    free(g_resolved);
    g_resolved = bundled_model();
    if (!g_resolved) {
        fprintf(stderr,
                "forge %s: no -m MODEL given, FORGE_MODEL is not set and the bundled demo model "
                "(%s in models/ of the source tree or PREFIX/share/forge/) is not there\n",
                cmd, DEMO_MODEL);
        return 2;
    }
    fprintf(stderr, "forge %s: no -m given: using the bundled demo model %s\n", cmd, g_resolved);
    o->model_path = g_resolved;
    return 0;
}
