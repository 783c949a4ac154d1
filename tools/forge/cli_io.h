/* cli_io.h - the CLI's file and stdout handling, in one place so that every command follows the
 * same rules:
 *  - an output file is never one of the command's inputs (same device and inode: the model, a
 *    text or messages file, a template file, stdin);
 *  - an output file is written to a temporary file beside it and renamed into place only when
 *    everything was written, so a failed write leaves the old file (or nothing) behind;
 *  - a target that exists and is no regular file (/dev/null, /dev/full, /dev/stdout, a FIFO) is
 *    written directly and never renamed over or removed;
 *  - nothing the command did not create is ever deleted, and the temporary file is removed on
 *    failure and when SIGINT/SIGTERM/SIGHUP/SIGPIPE/SIGXFSZ (left at their default action) end
 *    the process;
 *  - stdout is checked: a failed write is reported once as "forge CMD: cannot write output: ...".
 * Used only by the CLI. Every function prints its own "forge CMD: ..." message on failure. */
#ifndef FORGE_CLI_IO_H
#define FORGE_CLI_IO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

typedef struct cli_out {
    const char *cmd;  /* borrowed: for messages */
    const char *path; /* borrowed: the target as the user gave it */
    char *final_path; /* owned: where the temporary file is renamed to */
    char *tmp_path;   /* owned: the temporary file; NULL when writing directly */
    FILE *f;          /* open stream (cli_out_open with a stream), else NULL */
    int write_errno;  /* first failed write's errno, 0 if none */
} cli_out;

/* Fails (message printed, returns false) when path exists and is the same file as one of
 * inputs[0..n_inputs) (NULL entries are skipped; "-" means stdin), when it is a directory, or,
 * with no_clobber, when it exists at all (the message suggests --force). what names the option
 * in messages ("--dump", "-o", "/save"). */
bool cli_out_check(const char *cmd, const char *what, const char *path, const char *const *inputs,
                   size_t n_inputs, bool no_clobber);

/* Run cli_out_check, then prepare to write path: a new temporary file beside it, or the target
 * itself when it is no regular file. With stream, o->f is opened for writing; without, the
 * caller writes the file named by cli_out_path() itself (e.g. through a library writer) and must
 * not delete it. Returns 0, or 1 (message printed; nothing left to clean up). */
int cli_out_open(cli_out *o, const char *cmd, const char *what, const char *path,
                 const char *const *inputs, size_t n_inputs, bool no_clobber, bool stream);

/* The file to write: the temporary file, or the target when written directly. */
const char *cli_out_path(const cli_out *o);

/* Write n bytes to o->f; returns 0, or 1 on a write error (reported by cli_out_commit). */
int cli_out_write(cli_out *o, const void *p, size_t n);

/* Flush and close the stream, then rename the temporary file onto the target. On any error
 * prints "forge CMD: cannot write 'PATH': REASON", removes the temporary file and returns 1.
 * Frees o's resources in every case. */
int cli_out_commit(cli_out *o);

/* Give up: close the stream, remove the temporary file (never the target). Accepts a zeroed o. */
void cli_out_abort(cli_out *o);

/* Read a whole file ("-": stdin) into a malloc'd buffer with a terminating NUL (*len without
 * it; len may be NULL). what names it in messages ("text file", "messages"). Returns NULL after
 * printing "forge CMD: cannot read WHAT 'PATH': REASON" (a directory is reported as one). */
char *cli_read_file(const char *cmd, const char *what, const char *path, size_t *len);

/* Flush stdout; true while it has no error. On the first error prints
 * "forge CMD: cannot write output: REASON" (once per process) and returns false. Call it right
 * after writing (the reason of a failed write is read from errno), where output is streamed to
 * stop early, and after a command's output instead of a bare fflush (which would consume the
 * error's reason). */
bool cli_stdout_ok(const char *cmd);

/* At exit (main.c): flush and close stdout; returns rc, or 1 when a write to stdout failed
 * (reported once). */
int cli_stdout_close(const char *cmd, int rc);

/* s on stdout as a JSON string: quotes, backslash and control characters escaped. */
void cli_print_json_str(const char *s);

/* "s" unless n == 1, for "1 token" / "2 tokens". */
const char *cli_plural(long long n);

#endif
