/* commands.h - the subcommands of the forge CLI. Each lives in tools/forge/cmd_<name>.c and
 * returns the process exit status (0 ok, 1 error, 2 usage). Only main.c exits. */
#ifndef FORGE_CLI_COMMANDS_H
#define FORGE_CLI_COMMANDS_H

int cmd_inspect(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);
int cmd_detokenize(int argc, char **argv);
int cmd_run(int argc, char **argv);
int cmd_eval(int argc, char **argv);
int cmd_perplexity(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_synth(int argc, char **argv);
int cmd_quantize(int argc, char **argv);
int cmd_template(int argc, char **argv);
int cmd_chat(int argc, char **argv);
int cmd_serve(int argc, char **argv);
int cmd_pull(int argc, char **argv);   /* cmd_hub.c */
int cmd_models(int argc, char **argv); /* cmd_hub.c */

#endif
