/* hub_cli.h - the CLI's side of the model hub (src/hub via include/forge_hub.h): -hf and
 * --offline for the engine commands, the bundled default model, a download progress bar. */
#ifndef FORGE_CLI_HUB_CLI_H
#define FORGE_CLI_HUB_CLI_H

#include "forge_hub.h"

struct engine_opts;

/* -hf/--hf-repo REPO[:QUANT|/FILE.gguf] and --offline: 1 consumed, 0 not ours, -1 bad usage. */
int hub_opts_parse(struct engine_opts *o, const char *cmd, int argc, char **argv, int *i);

/* Set o->model_path from -hf (cache, else download) or, when the command allows it and no -m
 * was given, from $FORGE_MODEL or the bundled demo model. Returns 0, 1 (error) or 2 (usage),
 * the message printed. A path it makes lives until the process ends. */
int hub_resolve_model(struct engine_opts *o, const char *cmd);

/* Hub params with the CLI's progress bar (stderr on a terminal) and notes on stderr. */
forge_hub_params hub_cli_params(const char *cmd, bool offline, bool quiet);

/* End a progress-bar line left open by an interrupted download (before printing an error). */
void hub_cli_end_line(void);

#endif
