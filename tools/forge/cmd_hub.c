/* cmd_hub.c - `forge pull` (a model from the hub into the cache) and `forge models` (list and
 * remove cached models). The work is in src/hub (include/forge_hub.h); this file parses the
 * command line and prints. */
#include <stdio.h>
#include <stdlib.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "forge.h"
#include "forge_hub.h"
#include "commands.h"
#include "hub_cli.h"

static void pull_usage(FILE *f)
{
    fprintf(
        f, "usage: forge pull [--offline] [-q] REPO[:QUANT] | REPO/FILE.gguf\n"
           "  Download a GGUF model from the Hugging Face hub into the cache and print its path.\n"
           "  REPO is OWNER/NAME, e.g. bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M. QUANT picks\n"
           "  the file whose name carries it (case-insensitive; default Q4_K_M, or the repo's\n"
           "  only model); split files (-00001-of-0000N) are joined into one GGUF.\n"
           "  A cached file is checked against the hub's sha256 and downloaded again if it\n"
           "  changed. Interrupted downloads resume. `forge run -hf REPO[:QUANT]` uses the cache.\n"
           "  --offline            only the cache (also FORGE_OFFLINE=1 or HF_HUB_OFFLINE=1)\n"
           "  -q, --quiet          no progress bar or notes\n"
           "environment:\n"
           "  FORGE_CACHE          cache directory (default $XDG_CACHE_HOME/forge, else\n"
           "                       ~/.cache/forge); files at CACHE/hub/OWNER/NAME/FILE\n"
           "  HF_TOKEN             access token, sent as 'Authorization: Bearer' (gated repos)\n"
           "  HF_ENDPOINT          the hub (default https://huggingface.co)\n");
}

int cmd_pull(int argc, char **argv)
{
    const char *spec = NULL;
    bool offline = false, quiet = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            pull_usage(stdout);
            return 0;
        } else if (!strcmp(a, "--offline")) {
            offline = true;
        } else if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) {
            quiet = true;
        } else if (a[0] == '-' || spec) {
            fprintf(stderr, "forge pull: unexpected argument '%s'\n", a);
            pull_usage(stderr);
            return 2;
        } else {
            spec = a;
        }
    }
    if (!spec) {
        fprintf(stderr, "forge pull: name a model: REPO[:QUANT] or REPO/FILE.gguf\n");
        pull_usage(stderr);
        return 2;
    }
    forge_hub_params p = hub_cli_params("pull", offline, quiet);
    forge_err err = {0};
    char *path = NULL;
    if (forge_hub_pull(spec, &p, &path, &err) != FORGE_OK) {
        hub_cli_end_line();
        fprintf(stderr, "forge pull: %s\n", err.msg);
        return err.code == FORGE_E_INVALID ? 2 : 1;
    }
    printf("%s\n", path);
    free(path);
    return 0;
}

static void models_usage(FILE *f)
{
    fprintf(f,
            "usage: forge models [list]         list the cached models (repo, file, size, weight\n"
            "                                   types, last used) and the cache directory\n"
            "       forge models rm REPO[:QUANT] | REPO/FILE.gguf\n"
            "                                   delete cached models (REPO alone: all of them)\n"
            "The cache is $FORGE_CACHE, else $XDG_CACHE_HOME/forge, else ~/.cache/forge.\n");
}

/* "llama, 292K params, F32" from the GGUF header; "unreadable (...)" if it does not open.
 * Reading it must not count as a use: its access time ("last used") is put back. */
static void describe(const char *path, time_t last_used, char *out, size_t cap)
{
    struct timespec ts[2] = {{last_used, 0}, {0, UTIME_OMIT}};
    gguf_ctx *g = NULL;
    forge_err err = {0};
    if (gguf_open(path, &g, &err) != FORGE_OK) {
        snprintf(out, cap, "unreadable (%.100s)", err.msg);
        if (last_used) (void)utimensat(AT_FDCWD, path, ts, 0);
        return;
    }
    gguf_str arch = {"?", 1};
    (void)gguf_get_str(g, "general.architecture", &arch, NULL);
    uint64_t bytes[GGML_TYPE_COUNT] = {0};
    double params = 0;
    for (int64_t i = 0; i < gguf_tensor_count(g); i++) {
        const gguf_tensor_info *t = gguf_tensor(g, i);
        params += (double)t->n_elements;
        if ((int)t->type >= 0 && t->type < GGML_TYPE_COUNT) bytes[t->type] += t->n_bytes;
    }
    int main_t = 0;
    for (int t = 1; t < GGML_TYPE_COUNT; t++)
        if (bytes[t] > bytes[main_t]) main_t = t;
    const char *unit = "";
    double v = params;
    if (params >= 1e9)
        v = params / 1e9, unit = "B";
    else if (params >= 1e6)
        v = params / 1e6, unit = "M";
    else if (params >= 1e3)
        v = params / 1e3, unit = "K";
    snprintf(out, cap, "%.*s, %.*f%s params, %s", (int)(arch.len > 32 ? 32 : arch.len), arch.data,
             v < 10 ? 1 : 0, v, unit, ggml_type_name(main_t));
    gguf_close(g);
    if (last_used) (void)utimensat(AT_FDCWD, path, ts, 0);
}

static int models_list(void)
{
    forge_hub_params p = forge_hub_default_params();
    forge_hub_entry *e = NULL;
    size_t n = 0;
    char *dir = NULL;
    forge_err err = {0};
    if (forge_hub_cache_dir(&p, &dir, &err) || forge_hub_list(&p, &e, &n, &err)) {
        fprintf(stderr, "forge models: %s\n", err.msg);
        free(dir);
        return 1;
    }
    printf("cache: %s/hub (%zu model%s)\n", dir, n, n == 1 ? "" : "s");
    if (n) printf("%-40s  %-44s  %10s  %-32s  %s\n", "REPO", "FILE", "SIZE", "TYPE", "LAST USED");
    for (size_t i = 0; i < n; i++) {
        char type[160], when[32] = "?";
        describe(e[i].path, e[i].last_used, type, sizeof type);
        struct tm tm;
        if (e[i].last_used && localtime_r(&e[i].last_used, &tm))
            strftime(when, sizeof when, "%Y-%m-%d %H:%M", &tm);
        double mib = (double)e[i].size / (1 << 20);
        char size[32];
        if (mib >= 1024)
            snprintf(size, sizeof size, "%.2f GiB", mib / 1024);
        else
            snprintf(size, sizeof size, "%.1f MiB", mib);
        printf("%-40s  %-44s  %10s  %-32s  %s\n", e[i].repo, e[i].file, size, type, when);
    }
    forge_hub_entries_free(e, n);
    free(dir);
    return 0;
}

int cmd_models(int argc, char **argv)
{
    if (argc >= 2 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"))) {
        models_usage(stdout);
        return 0;
    }
    if (argc == 1 || (argc == 2 && !strcmp(argv[1], "list"))) return models_list();
    if (!strcmp(argv[1], "rm") && argc == 3) {
        forge_hub_params p = forge_hub_default_params();
        forge_err err = {0};
        size_t n = 0;
        if (forge_hub_remove(argv[2], &p, &n, &err) != FORGE_OK) {
            fprintf(stderr, "forge models rm: %s\n", err.msg);
            return err.code == FORGE_E_INVALID ? 2 : 1;
        }
        printf("removed %zu file%s of %s\n", n, n == 1 ? "" : "s", argv[2]);
        return 0;
    }
    fprintf(stderr, "forge models: bad arguments\n");
    models_usage(stderr);
    return 2;
}
