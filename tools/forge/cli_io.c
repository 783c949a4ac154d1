/* cli_io.c - see cli_io.h. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli_io.h"

static bool g_stdout_reported = false;

/* The temporary file being written, removed if SIGINT/SIGTERM/SIGHUP ends the process (a
 * hidden multi-GB ".OUT.gguf.XXXXXX" must not outlive a Ctrl-C'd synth), or SIGPIPE (messages to
 * a closed pipe) or SIGXFSZ (a file-size limit). Installed only where the signal's action is the
 * default one, so the chat's and run's own Ctrl-C handling stays. */
static const char *volatile g_tmp_live = NULL;
static const int g_cleanup_signals[] = {SIGINT, SIGTERM, SIGHUP, SIGPIPE, SIGXFSZ};
#define N_CLEANUP_SIGNALS (sizeof g_cleanup_signals / sizeof g_cleanup_signals[0])
static struct sigaction g_old_actions[N_CLEANUP_SIGNALS];
static bool g_installed[N_CLEANUP_SIGNALS];

static void on_fatal_signal(int sig)
{
    const char *t = g_tmp_live;
    if (t) (void)unlink(t); /* async-signal-safe */
    signal(sig, SIG_DFL);
    raise(sig);
}

static void cleanup_on_signals(const char *tmp)
{
    for (size_t i = 0; i < N_CLEANUP_SIGNALS; i++) {
        if (tmp && !g_installed[i]) {
            struct sigaction sa, old;
            if (sigaction(g_cleanup_signals[i], NULL, &old) != 0 || old.sa_handler != SIG_DFL)
                continue;
            memset(&sa, 0, sizeof sa);
            sa.sa_handler = on_fatal_signal;
            sigemptyset(&sa.sa_mask);
            if (sigaction(g_cleanup_signals[i], &sa, &g_old_actions[i]) == 0) g_installed[i] = true;
        } else if (!tmp && g_installed[i]) {
            sigaction(g_cleanup_signals[i], &g_old_actions[i], NULL);
            g_installed[i] = false;
        }
    }
    g_tmp_live = tmp;
}

const char *cli_plural(long long n)
{
    return n == 1 ? "" : "s";
}

static bool stat_input(const char *in, struct stat *st)
{
    if (!strcmp(in, "-")) return fstat(STDIN_FILENO, st) == 0;
    return stat(in, st) == 0;
}

bool cli_out_check(const char *cmd, const char *what, const char *path, const char *const *inputs,
                   size_t n_inputs, bool no_clobber)
{
    struct stat st, in;
    if (stat(path, &st) != 0) return true; /* a new file: nothing to compare with */
    if (S_ISDIR(st.st_mode)) {
        fprintf(stderr, "forge %s: cannot write %s '%s': %s\n", cmd, what, path, strerror(EISDIR));
        return false;
    }
    if (!S_ISREG(st.st_mode)) return true; /* a device or FIFO is written, never replaced */
    for (size_t i = 0; i < n_inputs; i++) {
        if (!inputs[i] || !stat_input(inputs[i], &in)) continue;
        if (in.st_dev == st.st_dev && in.st_ino == st.st_ino) {
            fprintf(stderr, "forge %s: %s '%s' is the input file '%s'; refusing to overwrite it\n",
                    cmd, what, path, !strcmp(inputs[i], "-") ? "(stdin)" : inputs[i]);
            return false;
        }
    }
    if (no_clobber) {
        fprintf(stderr, "forge %s: %s '%s' exists; use --force to replace it\n", cmd, what, path);
        return false;
    }
    return true;
}

/* "DIR/.BASE.XXXXXX" beside final (malloc'd), or NULL. */
static char *tmp_template(const char *final)
{
    const char *slash = strrchr(final, '/');
    size_t dir_len = slash ? (size_t)(slash - final) + 1 : 0;
    const char *base = slash ? slash + 1 : final;
    size_t n = dir_len + 1 + strlen(base) + 8;
    char *t = malloc(n);
    if (t) snprintf(t, n, "%.*s.%s.XXXXXX", (int)dir_len, final, base);
    return t;
}

int cli_out_open(cli_out *o, const char *cmd, const char *what, const char *path,
                 const char *const *inputs, size_t n_inputs, bool no_clobber, bool stream)
{
    struct stat st;
    int fd = -1, e = 0;
    memset(o, 0, sizeof *o);
    o->cmd = cmd;
    o->path = path;
    if (!cli_out_check(cmd, what, path, inputs, n_inputs, no_clobber)) return 1;
    bool exists = stat(path, &st) == 0;
    /* devices, FIFOs and anything under /dev or /proc (/dev/stdout): write in place */
    if ((exists && !S_ISREG(st.st_mode)) || !strncmp(path, "/dev/", 5) ||
        !strncmp(path, "/proc/", 6)) {
        if (stream && !(o->f = fopen(path, "wb"))) {
            e = errno;
            goto fail;
        }
        return 0;
    }
    /* an existing file is replaced where it really is (through a symlink), with its mode */
    o->final_path = exists ? realpath(path, NULL) : strdup(path);
    if (!o->final_path || !(o->tmp_path = tmp_template(o->final_path))) {
        e = errno ? errno : ENOMEM;
        goto fail;
    }
    fd = mkstemp(o->tmp_path);
    if (fd < 0) {
        e = errno;
        free(o->tmp_path);
        o->tmp_path = NULL;
        goto fail;
    }
    mode_t mode;
    if (exists) {
        mode = st.st_mode & 07777;
    } else {
        mode_t mask = umask(0);
        umask(mask);
        mode = 0666 & ~mask;
    }
    (void)fchmod(fd, mode);
    cleanup_on_signals(o->tmp_path);
    if (stream) {
        if (!(o->f = fdopen(fd, "wb"))) {
            e = errno;
            goto fail;
        }
    } else {
        close(fd);
    }
    return 0;
fail:
    if (fd >= 0 && !o->f) close(fd);
    fprintf(stderr, "forge %s: cannot write '%s': %s\n", cmd, path, strerror(e));
    cli_out_abort(o);
    return 1;
}

const char *cli_out_path(const cli_out *o)
{
    return o->tmp_path ? o->tmp_path : o->path;
}

int cli_out_write(cli_out *o, const void *p, size_t n)
{
    if (o->write_errno) return 1;
    errno = 0;
    if (n && fwrite(p, 1, n, o->f) != n) {
        o->write_errno = errno ? errno : EIO;
        return 1;
    }
    return 0;
}

int cli_out_commit(cli_out *o)
{
    int e = o->write_errno;
    if (o->f) {
        errno = 0;
        if ((fflush(o->f) != 0 || ferror(o->f)) && !e) e = errno ? errno : EIO;
        if (!e && o->tmp_path && fsync(fileno(o->f)) != 0) e = errno;
        if (fclose(o->f) != 0 && !e) e = errno ? errno : EIO;
        o->f = NULL;
    } else if (o->tmp_path && !e) {
        int fd = open(o->tmp_path, O_WRONLY);
        if (fd < 0 || fsync(fd) != 0) e = errno;
        if (fd >= 0) close(fd);
    }
    if (!e && o->tmp_path && rename(o->tmp_path, o->final_path) != 0) e = errno;
    if (!e) cleanup_on_signals(NULL);
    if (e) {
        fprintf(stderr, "forge %s: cannot write '%s': %s\n", o->cmd, o->path, strerror(e));
        cli_out_abort(o);
        return 1;
    }
    free(o->tmp_path);
    free(o->final_path);
    o->tmp_path = o->final_path = NULL;
    return 0;
}

void cli_out_abort(cli_out *o)
{
    if (o->f) (void)fclose(o->f);
    o->f = NULL;
    if (o->tmp_path) (void)unlink(o->tmp_path); /* ours: never the target */
    if (o->tmp_path) cleanup_on_signals(NULL);
    free(o->tmp_path);
    free(o->final_path);
    o->tmp_path = o->final_path = NULL;
}

char *cli_read_file(const char *cmd, const char *what, const char *path, size_t *len)
{
    const bool from_stdin = !strcmp(path, "-");
    FILE *f = from_stdin ? stdin : fopen(path, "rb");
    char *buf = NULL;
    size_t n = 0, cap = 0;
    int e = 0;
    struct stat st;
    if (!f) {
        e = errno;
        goto fail;
    }
    if (fstat(fileno(f), &st) == 0 && S_ISDIR(st.st_mode)) {
        e = EISDIR;
        goto fail;
    }
    for (;;) {
        if (cap - n < 4096) {
            size_t ncap = cap ? cap * 2 : 65536;
            char *nb = realloc(buf, ncap + 1);
            if (!nb) {
                e = ENOMEM;
                goto fail;
            }
            buf = nb;
            cap = ncap;
        }
        errno = 0;
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0) {
            if (ferror(f)) {
                e = errno ? errno : EIO;
                goto fail;
            }
            break;
        }
    }
    if (!from_stdin) fclose(f);
    buf[n] = '\0';
    if (len) *len = n;
    return buf;
fail:
    if (f && !from_stdin) fclose(f);
    free(buf);
    fprintf(stderr, "forge %s: cannot read %s '%s': %s\n", cmd, what, from_stdin ? "(stdin)" : path,
            strerror(e));
    return NULL;
}

static void report_stdout(const char *cmd, int e)
{
    if (g_stdout_reported) return;
    g_stdout_reported = true;
    fprintf(stderr, "forge%s%s: cannot write output: %s\n", cmd ? " " : "", cmd ? cmd : "",
            e ? strerror(e) : "write error");
}

bool cli_stdout_ok(const char *cmd)
{
    int e0 = errno; /* called right after the writes: a failed one left its reason here */
    errno = 0;
    if (fflush(stdout) == 0 && !ferror(stdout)) return true;
    report_stdout(cmd, errno ? errno : e0);
    return false;
}

int cli_stdout_close(const char *cmd, int rc)
{
    /* a write that failed earlier (output longer than the stdio buffer, e.g. a long --help)
     * left its reason in errno, and stdio discards what follows without another write: keep
     * that reason unless the flush or close gives one */
    const int e0 = errno;
    bool bad = ferror(stdout) != 0;
    int e = 0;
    errno = 0;
    if (fflush(stdout) != 0) {
        bad = true;
        e = errno;
    }
    errno = 0;
    if (fclose(stdout) != 0) {
        bad = true;
        if (!e) e = errno;
    }
    if (!bad) return rc;
    report_stdout(cmd, e ? e : e0);
    return rc ? rc : 1;
}

void cli_print_json_str(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            printf("\\%c", *s);
        else if ((unsigned char)*s < 0x20)
            printf("\\u%04x", *s);
        else
            putchar(*s);
    }
    putchar('"');
}
