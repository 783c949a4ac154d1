/* hub.c - forge_hub_*: resolve REPO[:QUANT|/FILE] against a Hugging Face-style hub, download
 * with libcurl into the cache, check, join split files, list and remove cached models.
 * See include/forge_hub.h for the cache layout and the guarantees. This module owns the cache
 * directory and nothing else; it never touches a file outside it. */
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <curl/curl.h>

#include "forge.h"
#include "forge_hub.h"
#include "core/util.h"
#include "hub/sha256.h"

#define HUB_DEFAULT_ENDPOINT "https://huggingface.co"
#define HUB_API_MAX_BYTES (32u << 20) /* a repo listing is a few KB; refuse absurd answers */
#define HUB_ERR_BODY_MAX 512

/* ---- small helpers ----------------------------------------------------------------------- */

static char *xstrdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

/* malloc'd printf; NULL on allocation failure. */
static char *xasprintf(const char *fmt, ...) FORGE_PRINTF(1, 2);
static char *xasprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) return NULL;
    char *s = malloc((size_t)n + 1);
    if (!s) return NULL;
    va_start(ap, fmt);
    vsnprintf(s, (size_t)n + 1, fmt, ap);
    va_end(ap);
    return s;
}

static bool env_true(const char *name)
{
    const char *v = getenv(name);
    return v && *v && strcmp(v, "0") != 0 && strcasecmp(v, "false") != 0;
}

static bool ends_with_ci(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcasecmp(s + n - m, suffix) == 0;
}

/* mkdir -p (mode 0755); the path's last component included. */
static int mkdirs(const char *path, forge_err *err)
{
    char *p = xstrdup(path);
    if (!p) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    int rc = FORGE_OK;
    for (char *s = p + 1;; s++) {
        if (*s != '/' && *s != '\0') continue;
        char c = *s;
        *s = '\0';
        if (mkdir(p, 0755) != 0 && errno != EEXIST) {
            rc = forge_err_set(err, FORGE_E_IO, "cannot create directory %s: %s", p,
                               strerror(errno));
            break;
        }
        *s = c;
        if (c == '\0') break;
    }
    free(p);
    return rc;
}

static void touch_atime(const char *path)
{
    struct timespec ts[2] = {{0, UTIME_NOW}, {0, UTIME_OMIT}};
    (void)utimensat(AT_FDCWD, path, ts, 0);
}

static bool file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* ---- names ------------------------------------------------------------------------------- */

static bool repo_char_ok(char c)
{
    return isalnum((unsigned char)c) || c == '-' || c == '_' || c == '.';
}

/* owner/name, each 1..96 of [A-Za-z0-9._-], neither "." nor "..". */
static bool repo_ok(const char *repo)
{
    const char *slash = strchr(repo, '/');
    if (!slash || strchr(slash + 1, '/')) return false;
    size_t a = (size_t)(slash - repo), b = strlen(slash + 1);
    if (a == 0 || b == 0 || a > 96 || b > 96) return false;
    for (const char *c = repo; *c; c++)
        if (c != slash && !repo_char_ok(*c)) return false;
    if (repo[0] == '.' || slash[1] == '.') return false;
    return true;
}

/* A file path inside a repo: relative, no empty, "." or ".." components, printable, no '\\'. */
static bool file_ok(const char *f)
{
    if (!*f || *f == '/' || strlen(f) > 1000) return false;
    const char *comp = f;
    for (const char *c = f;; c++) {
        if (*c == '/' || *c == '\0') {
            size_t n = (size_t)(c - comp);
            if (n == 0 || (n == 1 && comp[0] == '.') ||
                (n == 2 && comp[0] == '.' && comp[1] == '.'))
                return false;
            if (comp[0] == '.') return false; /* hidden names are the cache's own (.tmp) */
            if (*c == '\0') break;
            comp = c + 1;
        } else if ((unsigned char)*c < 0x20 || *c == '\\' || *c == 0x7f) {
            return false;
        }
    }
    return true;
}

typedef struct hub_spec {
    char repo[200];
    char quant[64]; /* "" if none */
    char *file;     /* malloc'd, NULL if none */
} hub_spec;

static int spec_parse(const char *spec, hub_spec *s, forge_err *err)
{
    memset(s, 0, sizeof *s);
    if (!spec || !*spec)
        return forge_err_set(err, FORGE_E_INVALID,
                             "empty model name (want REPO[:QUANT] or REPO/FILE.gguf)");
    const char *s1 = strchr(spec, '/');
    const char *s2 = s1 ? strchr(s1 + 1, '/') : NULL;
    const char *colon = strchr(spec, ':');
    size_t repo_len;
    if (s2 && (!colon || colon > s2)) {
        repo_len = (size_t)(s2 - spec);
        if (colon)
            return forge_err_set(err, FORGE_E_INVALID,
                                 "'%s': give either REPO:QUANT or REPO/FILE.gguf, not both", spec);
        s->file = xstrdup(s2 + 1);
        if (!s->file) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    } else {
        repo_len = colon ? (size_t)(colon - spec) : strlen(spec);
        if (colon) {
            size_t n = strlen(colon + 1);
            bool ok = n > 0 && n < sizeof s->quant;
            for (const char *c = colon + 1; ok && *c; c++)
                ok = repo_char_ok(*c);
            if (!ok)
                return forge_err_set(err, FORGE_E_INVALID, "'%s': bad quant '%s'", spec, colon + 1);
            memcpy(s->quant, colon + 1, n + 1);
        }
    }
    if (repo_len >= sizeof s->repo) repo_len = sizeof s->repo - 1;
    memcpy(s->repo, spec, repo_len);
    s->repo[repo_len] = '\0';
    if (!repo_ok(s->repo) || (s->file && !file_ok(s->file))) {
        free(s->file);
        s->file = NULL;
        return forge_err_set(
            err, FORGE_E_INVALID,
            "bad model name '%s' (want OWNER/NAME[:QUANT] or OWNER/NAME/FILE.gguf)", spec);
    }
    return FORGE_OK;
}

/* Length of a "-NNNNN-of-NNNNN.gguf" split suffix at the end of f (case-insensitive .gguf), 0 if
 * none; *part and *count receive the numbers. */
static size_t split_suffix(const char *f, int *part, int *count)
{
    size_t n = strlen(f);
    const size_t m = strlen("-00001-of-00002.gguf");
    if (n < m || !ends_with_ci(f, ".gguf")) return 0;
    const char *s = f + n - m;
    int a = 0, b = 0;
    if (s[0] != '-' || strncmp(s + 6, "-of-", 4) != 0) return 0;
    for (int i = 1; i <= 5; i++) {
        if (!isdigit((unsigned char)s[i]) || !isdigit((unsigned char)s[9 + i])) return 0;
        a = a * 10 + (s[i] - '0');
        b = b * 10 + (s[9 + i] - '0');
    }
    if (a < 1 || b < 1 || a > b) return 0;
    if (part) *part = a;
    if (count) *count = b;
    return m;
}

/* The name a (possibly split) file has in the cache: the split suffix dropped. malloc'd. */
static char *joined_name(const char *f)
{
    size_t m = split_suffix(f, NULL, NULL);
    if (!m) return xstrdup(f);
    return xasprintf("%.*s.gguf", (int)(strlen(f) - m), f);
}

void forge_hub_quant_of(const char *file, char *out, size_t cap)
{
    if (!cap) return;
    out[0] = '\0';
    const char *base = strrchr(file, '/');
    base = base ? base + 1 : file;
    size_t n = strlen(base);
    size_t m = split_suffix(base, NULL, NULL);
    if (m)
        n -= m;
    else if (ends_with_ci(base, ".gguf"))
        n -= 5;
    size_t start = n;
    while (start > 0 && base[start - 1] != '-' && base[start - 1] != '.')
        start--;
    size_t len = n - start < cap - 1 ? n - start : cap - 1;
    memcpy(out, base + start, len);
    out[len] = '\0';
}

/* Does file f carry `quant` as a word delimited by '-', '.', '/' or the ends (ignoring case)? */
static bool has_quant(const char *f, const char *quant)
{
    size_t q = strlen(quant);
    for (const char *p = f; *p; p++) {
        if (strncasecmp(p, quant, q) != 0) continue;
        bool left = p == f || p[-1] == '-' || p[-1] == '.' || p[-1] == '/';
        char r = p[q];
        if (left && (r == '-' || r == '.' || r == '/' || r == '\0')) return true;
    }
    return false;
}

/* ---- params ------------------------------------------------------------------------------ */

forge_hub_params forge_hub_default_params(void)
{
    forge_hub_params p;
    memset(&p, 0, sizeof p);
    p.retries = 2;
    p.connect_timeout_s = 30;
    return p;
}

int forge_hub_cache_dir(const forge_hub_params *p, char **dir, forge_err *err)
{
    const char *v;
    *dir = NULL;
    if (p && p->cache_dir && *p->cache_dir)
        *dir = xstrdup(p->cache_dir);
    else if ((v = getenv("FORGE_CACHE")) && *v)
        *dir = xstrdup(v);
    else if ((v = getenv("XDG_CACHE_HOME")) && *v)
        *dir = xasprintf("%s/forge", v);
    else if ((v = getenv("HOME")) && *v)
        *dir = xasprintf("%s/.cache/forge", v);
    else
        return forge_err_set(err, FORGE_E_INVALID,
                             "no cache directory: set FORGE_CACHE (HOME is not set)");
    if (!*dir) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    return FORGE_OK;
}

/* ---- HTTP (libcurl) ---------------------------------------------------------------------- */

static pthread_once_t g_curl_once = PTHREAD_ONCE_INIT;
static CURLcode g_curl_init_rc = CURLE_FAILED_INIT;
static void curl_init_once(void)
{
    g_curl_init_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

typedef struct hub_net {
    const char *endpoint; /* without a trailing '/' */
    const char *token;    /* NULL if none */
    long connect_timeout_s;
} hub_net;

/* Headers captured from every response of a request (redirect hops included). */
typedef struct hub_headers {
    char linked_etag[80]; /* x-linked-etag (the LFS sha256 on the hub) */
    char etag[80];        /* ETag of the last response that had one */
    uint64_t linked_size; /* x-linked-size, 0 if absent */
    uint64_t range_total; /* the /TOTAL of a Content-Range, 0 if absent */
} hub_headers;

static void header_value(const char *v, size_t n, char *out, size_t cap)
{
    while (n && (*v == ' ' || *v == '\t'))
        v++, n--;
    while (n && (v[n - 1] == '\r' || v[n - 1] == '\n' || v[n - 1] == ' '))
        n--;
    if (n >= 2 && v[0] == 'W' && v[1] == '/') v += 2, n -= 2;
    if (n >= 2 && v[0] == '"' && v[n - 1] == '"') v++, n -= 2;
    if (n >= cap) n = cap - 1;
    memcpy(out, v, n);
    out[n] = '\0';
}

static size_t on_header(char *buf, size_t size, size_t nitems, void *user)
{
    hub_headers *h = user;
    size_t n = size * nitems;
    const char *colon = memchr(buf, ':', n);
    if (!colon) return n;
    size_t klen = (size_t)(colon - buf), vlen = n - klen - 1;
    char val[80];
    if (klen == 13 && !strncasecmp(buf, "x-linked-etag", 13)) {
        header_value(colon + 1, vlen, h->linked_etag, sizeof h->linked_etag);
    } else if (klen == 4 && !strncasecmp(buf, "etag", 4)) {
        header_value(colon + 1, vlen, h->etag, sizeof h->etag);
    } else if (klen == 13 && !strncasecmp(buf, "x-linked-size", 13)) {
        header_value(colon + 1, vlen, val, sizeof val);
        h->linked_size = strtoull(val, NULL, 10);
    } else if (klen == 13 && !strncasecmp(buf, "content-range", 13)) {
        header_value(colon + 1, vlen, val, sizeof val);
        const char *slash = strchr(val, '/');
        if (slash && isdigit((unsigned char)slash[1]))
            h->range_total = strtoull(slash + 1, NULL, 10);
    }
    return n;
}

static bool is_sha256_hex(const char *s)
{
    if (strlen(s) != 64) return false;
    for (; *s; s++)
        if (!isxdigit((unsigned char)*s)) return false;
    return true;
}

/* The sha256 the hub announced for the file (lower case), or "" if it gave none. */
static void expected_sha(const hub_headers *h, char out[65])
{
    const char *s = is_sha256_hex(h->linked_etag) ? h->linked_etag
                    : is_sha256_hex(h->etag)      ? h->etag
                                                  : "";
    size_t i = 0;
    for (; s[i]; i++)
        out[i] = (char)tolower((unsigned char)s[i]);
    out[i] = '\0';
}

static CURL *curl_new(const hub_net *net, const char *url, struct curl_slist **hdrs, forge_err *err)
{
    pthread_once(&g_curl_once, curl_init_once);
    if (g_curl_init_rc != CURLE_OK) {
        forge_err_set(err, FORGE_E_IO, "libcurl failed to initialise: %s",
                      curl_easy_strerror(g_curl_init_rc));
        return NULL;
    }
    CURL *c = curl_easy_init();
    if (!c) {
        forge_err_set(err, FORGE_E_NOMEM, "libcurl: cannot create a handle");
        return NULL;
    }
    *hdrs = NULL;
    if (net->token) {
        char *h = xasprintf("Authorization: Bearer %s", net->token);
        if (h) *hdrs = curl_slist_append(NULL, h);
        free(h);
    }
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_USERAGENT, "forge/" FORGE_VERSION_STRING);
    curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(c, CURLOPT_MAXREDIRS, 10L);
#if LIBCURL_VERSION_NUM >= 0x075500
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(c, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
#endif
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, net->connect_timeout_s);
    /* a connection that stalls for a minute is dropped (and resumed by the retry) */
    curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME, 60L);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    if (*hdrs) curl_easy_setopt(c, CURLOPT_HTTPHEADER, *hdrs);
    return c;
}

/* An HTTP failure status as a message; 401/403 say what to do about the token. */
static int http_status_error(const hub_net *net, long status, const char *what, forge_err *err)
{
    if (status == 401 || status == 403)
        return forge_err_set(
            err, FORGE_E_IO, "%s: HTTP %ld (%s): the repo is private, gated or does not exist; %s",
            what, status, status == 401 ? "unauthorized" : "forbidden",
            net->token ? "the token in HF_TOKEN was refused, or it cannot read this repo"
                       : "set HF_TOKEN to an access token that can read it");
    if (status == 404)
        return forge_err_set(err, FORGE_E_NOTFOUND, "%s: not found (HTTP 404)", what);
    return forge_err_set(err, FORGE_E_IO, "%s: HTTP %ld", what, status);
}

typedef struct membuf {
    char *data;
    size_t len, cap, max;
} membuf;

static size_t on_mem(char *ptr, size_t size, size_t nmemb, void *user)
{
    membuf *b = user;
    size_t n = size * nmemb;
    if (b->len + n + 1 > b->max) return 0;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *d = realloc(b->data, cap);
        if (!d) return 0;
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, ptr, n);
    b->len += n;
    b->data[b->len] = '\0';
    return n;
}

/* GET url into memory (body NUL-terminated, caller frees); fails on a non-2xx status. */
static int http_get(const hub_net *net, const char *url, const char *what, membuf *body,
                    forge_err *err)
{
    struct curl_slist *hdrs = NULL;
    int rc = FORGE_OK;
    CURL *c = curl_new(net, url, &hdrs, err);
    if (!c) return err ? err->code : FORGE_E_IO;
    memset(body, 0, sizeof *body);
    body->max = HUB_API_MAX_BYTES;
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_mem);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, body);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, 300L);
    CURLcode cc = curl_easy_perform(c);
    long status = 0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    if (cc != CURLE_OK) {
        rc = forge_err_set(err, FORGE_E_IO, "%s: %s (%s)", what, curl_easy_strerror(cc), url);
    } else if (status < 200 || status > 299) {
        rc = http_status_error(net, status, what, err);
    }
    if (rc) {
        free(body->data);
        memset(body, 0, sizeof *body);
    }
    curl_slist_free_all(hdrs);
    curl_easy_cleanup(c);
    return rc;
}

/* HEAD the file's resolve URL (redirects followed) for the sha256 the hub announces. */
static int http_head_sha(const hub_net *net, const char *url, const char *what, char sha[65],
                         forge_err *err)
{
    struct curl_slist *hdrs = NULL;
    hub_headers h;
    int rc = FORGE_OK;
    memset(&h, 0, sizeof h);
    sha[0] = '\0';
    CURL *c = curl_new(net, url, &hdrs, err);
    if (!c) return err ? err->code : FORGE_E_IO;
    curl_easy_setopt(c, CURLOPT_NOBODY, 1L);
    curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(c, CURLOPT_HEADERDATA, &h);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, 120L);
    CURLcode cc = curl_easy_perform(c);
    long status = 0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    if (cc != CURLE_OK)
        rc = forge_err_set(err, FORGE_E_IO, "%s: %s (%s)", what, curl_easy_strerror(cc), url);
    else if (status < 200 || status > 299)
        rc = http_status_error(net, status, what, err);
    else
        expected_sha(&h, sha);
    curl_slist_free_all(hdrs);
    curl_easy_cleanup(c);
    return rc;
}

/* ---- one file's download into a .part file ------------------------------------------------ */

typedef struct dl_state {
    int fd;
    CURL *curl;
    uint64_t offset;  /* bytes in the .part before this request */
    uint64_t written; /* bytes written by this request */
    long status;      /* status of the response whose body is being received */
    bool restarted;   /* the server ignored the Range: the .part was truncated */
    int write_errno;  /* a failed write() (disk full, ...) */
    membuf errbody;   /* body of an error response (for the message) */
    hub_headers h;
    const forge_hub_params *p;
    const char *name;
} dl_state;

static size_t on_body(char *ptr, size_t size, size_t nmemb, void *user)
{
    dl_state *d = user;
    size_t n = size * nmemb;
    if (d->status == 0) {
        curl_easy_getinfo(d->curl, CURLINFO_RESPONSE_CODE, &d->status);
        if (d->status == 200 && d->offset > 0) {
            /* the server sent the whole file: start the .part over */
            if (ftruncate(d->fd, 0) != 0) {
                d->write_errno = errno;
                return 0;
            }
            d->offset = 0;
            d->restarted = true;
        }
    }
    if (d->status < 200 || d->status > 299) return on_mem(ptr, size, nmemb, &d->errbody) ? n : 0;
    for (size_t done = 0; done < n;) {
        ssize_t w = write(d->fd, ptr + done, n - done);
        if (w < 0) {
            if (errno == EINTR) continue;
            d->write_errno = errno;
            return 0;
        }
        done += (size_t)w;
    }
    d->written += n;
    return n;
}

static int on_progress(void *user, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal,
                       curl_off_t ulnow)
{
    dl_state *d = user;
    if (d->p->progress && d->status >= 200 && d->status <= 299) {
        uint64_t total = d->h.linked_size ? d->h.linked_size
                         : dltotal > 0    ? d->offset + (uint64_t)dltotal
                                          : 0;
        d->p->progress(d->name, d->offset + (uint64_t)dlnow, total, d->p->user);
    }
    return 0;
}

static void note(const forge_hub_params *p, const char *fmt, ...) FORGE_PRINTF(2, 3);
static void note(const forge_hub_params *p, const char *fmt, ...)
{
    if (!p->note) return;
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    p->note(msg, p->user);
}

/* Outcome of one request: done, worth resuming, failed (the .part kept for a later pull),
 * failed writing (the .part deleted: a full disk must not keep a half file around). */
enum { DL_DONE, DL_RETRY, DL_FAIL, DL_DISK };

/* One GET of url appended to part_path (resumed with a Range when it has bytes). */
static int download_once(const hub_net *net, const forge_hub_params *p, const char *url,
                         const char *name, const char *part_path, hub_headers *h_out, int *outcome,
                         forge_err *err)
{
    struct curl_slist *hdrs = NULL;
    dl_state d;
    int rc = FORGE_OK;
    memset(&d, 0, sizeof d);
    d.fd = -1;
    d.p = p;
    d.name = name;
    d.errbody.max = HUB_ERR_BODY_MAX;
    *outcome = DL_FAIL;
    d.fd = open(part_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (d.fd < 0) {
        rc = forge_err_set(err, FORGE_E_IO, "cannot create %s: %s", part_path, strerror(errno));
        goto done;
    }
    struct stat st;
    if (fstat(d.fd, &st) != 0) {
        rc = forge_err_set(err, FORGE_E_IO, "%s: %s", part_path, strerror(errno));
        goto done;
    }
    d.offset = (uint64_t)st.st_size;
    d.curl = curl_new(net, url, &hdrs, err);
    if (!d.curl) {
        rc = err ? err->code : FORGE_E_IO;
        goto done;
    }
    char range[48];
    if (d.offset > 0) {
        snprintf(range, sizeof range, "%llu-", (unsigned long long)d.offset);
        curl_easy_setopt(d.curl, CURLOPT_RANGE, range);
        note(p, "resuming %s at %.1f MiB", name, (double)d.offset / (1 << 20));
    }
    curl_easy_setopt(d.curl, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(d.curl, CURLOPT_WRITEDATA, &d);
    curl_easy_setopt(d.curl, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(d.curl, CURLOPT_HEADERDATA, &d.h);
    curl_easy_setopt(d.curl, CURLOPT_XFERINFOFUNCTION, on_progress);
    curl_easy_setopt(d.curl, CURLOPT_XFERINFODATA, &d);
    curl_easy_setopt(d.curl, CURLOPT_NOPROGRESS, 0L);
    CURLcode cc = curl_easy_perform(d.curl);
    long status = 0;
    curl_easy_getinfo(d.curl, CURLINFO_RESPONSE_CODE, &status);
    *h_out = d.h;
    if (d.write_errno) {
        rc = forge_err_set(err, FORGE_E_IO, "writing %s: %s", part_path, strerror(d.write_errno));
        *outcome = DL_DISK;
        goto done;
    }
    if (status == 416 && d.offset > 0) {
        /* the .part is as long as the file or longer: start over */
        if (ftruncate(d.fd, 0) != 0) {
            rc = forge_err_set(err, FORGE_E_IO, "%s: %s", part_path, strerror(errno));
            goto done;
        }
        *outcome = DL_RETRY;
        rc = forge_err_set(err, FORGE_E_IO, "%s: HTTP 416 on resume", name);
        goto done;
    }
    if (status != 0 && (status < 200 || status > 299)) {
        rc = http_status_error(net, status, name, err);
        goto done;
    }
    if (cc != CURLE_OK) {
        /* a dropped connection or a stall: the bytes so far stay for a resumed attempt */
        *outcome = DL_RETRY;
        rc = forge_err_set(err, FORGE_E_IO, "downloading %s: %s (%s)", name, curl_easy_strerror(cc),
                           url);
        goto done;
    }
    *outcome = DL_DONE;
done:
    if (d.fd >= 0) {
        if (fsync(d.fd) != 0 && rc == FORGE_OK) {
            rc = forge_err_set(err, FORGE_E_IO, "writing %s: %s", part_path, strerror(errno));
            *outcome = DL_DISK;
        }
        close(d.fd);
    }
    free(d.errbody.data);
    curl_slist_free_all(hdrs);
    if (d.curl) curl_easy_cleanup(d.curl);
    return rc;
}

int forge_hub_sha256_file(const char *path, char hex[65], forge_err *err)
{
    int rc = FORGE_OK;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    uint8_t *buf = malloc(1 << 20);
    sha256_ctx c;
    hex[0] = '\0';
    if (!buf) {
        rc = forge_err_set(err, FORGE_E_NOMEM, "out of memory");
        goto done;
    }
    if (fd < 0) {
        rc = forge_err_set(err, FORGE_E_IO, "cannot open %s: %s", path, strerror(errno));
        goto done;
    }
    sha256_init(&c);
    for (;;) {
        ssize_t n = read(fd, buf, 1 << 20);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            rc = forge_err_set(err, FORGE_E_IO, "reading %s: %s", path, strerror(errno));
            goto done;
        }
        if (n == 0) break;
        sha256_update(&c, buf, (size_t)n);
    }
    uint8_t dig[32];
    sha256_final(&c, dig);
    sha256_hex(dig, hex);
done:
    if (fd >= 0) close(fd);
    free(buf);
    return rc;
}

/* Is the file a GGUF the reader accepts? */
static int check_gguf(const char *path, const char *name, forge_err *err)
{
    unsigned char magic[4] = {0};
    FILE *f = fopen(path, "rb");
    if (!f) return forge_err_set(err, FORGE_E_IO, "cannot open %s: %s", path, strerror(errno));
    size_t n = fread(magic, 1, 4, f);
    fclose(f);
    if (n < 4 || memcmp(magic, "GGUF", 4) != 0) {
        char shown[16];
        for (size_t i = 0; i < 4; i++)
            shown[i] = i < n && isprint(magic[i]) ? (char)magic[i] : '.';
        shown[4] = '\0';
        return forge_err_set(err, FORGE_E_FORMAT,
                             "%s: the hub served a file that is not GGUF (starts with '%s', "
                             "not 'GGUF')",
                             name, shown);
    }
    gguf_ctx *g = NULL;
    forge_err e2 = {0};
    if (gguf_open(path, &g, &e2) != FORGE_OK)
        return forge_err_set(err, FORGE_E_FORMAT, "%s: not a valid GGUF file: %s", name, e2.msg);
    gguf_close(g);
    return FORGE_OK;
}

/* {endpoint}/{repo}/resolve/main/{file} with the file's bytes outside [A-Za-z0-9-._~/]
 * percent-encoded. malloc'd. */
static char *resolve_url(const char *endpoint, const char *repo, const char *file)
{
    size_t n = strlen(file);
    char *enc = malloc(3 * n + 1), *o = enc;
    if (!enc) return NULL;
    for (const unsigned char *c = (const unsigned char *)file; *c; c++) {
        if (isalnum(*c) || strchr("-._~/", *c)) {
            *o++ = (char)*c;
        } else {
            snprintf(o, 4, "%%%02X", *c);
            o += 3;
        }
    }
    *o = '\0';
    char *url = xasprintf("%s/%s/resolve/main/%s", endpoint, repo, enc);
    free(enc);
    return url;
}

/* Download `rfile` of the repo into done_path (checked), through part_path. */
static int fetch_file(const hub_net *net, const forge_hub_params *p, const char *repo,
                      const char *rfile, const char *part_path, const char *done_path,
                      char sha_out[65], forge_err *err)
{
    int rc = FORGE_OK;
    char *url = resolve_url(net->endpoint, repo, rfile);
    hub_headers h;
    char want[65] = "", got[65] = "";
    bool resumed_once = false, restarted_clean = false;
    if (!url) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    for (int attempt = 0;; attempt++) {
        int outcome;
        struct stat st;
        if (stat(part_path, &st) == 0 && st.st_size > 0) resumed_once = true;
        memset(&h, 0, sizeof h);
        rc = download_once(net, p, url, rfile, part_path, &h, &outcome, err);
        if (outcome == DL_DONE) break;
        if (stat(part_path, &st) == 0 && st.st_size == 0) unlink(part_path);
        if (outcome == DL_DISK) unlink(part_path);
        if (outcome == DL_FAIL || outcome == DL_DISK) goto done; /* HTTP errors keep the .part */
        if (attempt >= p->retries) goto done; /* the .part stays: the next pull resumes it */
        note(p, "%s; retrying", err ? err->msg : "download interrupted");
    }
    expected_sha(&h, want);
    uint64_t size_want = h.linked_size ? h.linked_size : h.range_total;
    struct stat st;
    if (stat(part_path, &st) != 0) {
        rc = forge_err_set(err, FORGE_E_IO, "%s: %s", part_path, strerror(errno));
        goto done;
    }
    if (size_want && (uint64_t)st.st_size != size_want) {
        rc = forge_err_set(err, FORGE_E_FORMAT,
                           "%s: downloaded %llu bytes, the hub says %llu; deleted, pull again",
                           rfile, (unsigned long long)st.st_size, (unsigned long long)size_want);
        unlink(part_path);
        goto done;
    }
    if ((rc = forge_hub_sha256_file(part_path, got, err))) goto done;
    if (want[0] && strcmp(want, got) != 0) {
        unlink(part_path);
        if (resumed_once && !restarted_clean) {
            /* the resumed bytes may belong to an older version of the file: once, from zero */
            restarted_clean = true;
            note(p, "%s: sha256 mismatch after a resumed download; downloading it again", rfile);
            rc = fetch_file(net, p, repo, rfile, part_path, done_path, sha_out, err);
            goto done;
        }
        rc = forge_err_set(err, FORGE_E_FORMAT,
                           "%s: sha256 mismatch: the hub says %s, the download is %s; the "
                           "download was deleted",
                           rfile, want, got);
        goto done;
    }
    if (!want[0])
        note(p, "%s: the hub gave no sha256 for it; only its GGUF format is checked", rfile);
    if ((rc = check_gguf(part_path, rfile, err))) {
        unlink(part_path);
        goto done;
    }
    if (rename(part_path, done_path) != 0) {
        rc = forge_err_set(err, FORGE_E_IO, "cannot rename %s to %s: %s", part_path, done_path,
                           strerror(errno));
        unlink(part_path);
        goto done;
    }
    memcpy(sha_out, got, 65);
done:
    free(url);
    return rc;
}

/* ---- joining split files --------------------------------------------------------------- */

typedef struct join_src {
    const gguf_tensor_info **t; /* every tensor of every part, in order */
} join_src;

static int join_fill(void *user, int64_t index, const gguf_tensor_info *info, int64_t row0,
                     int64_t n_rows, void *dst, forge_err *err)
{
    const join_src *js = user;
    const gguf_tensor_info *src = js->t[index];
    size_t row = ggml_row_size(src->type, src->ne[0]);
    memcpy(dst, (const uint8_t *)src->data + (size_t)row0 * row, (size_t)n_rows * row);
    return FORGE_OK;
}

/* Write the parts (in order) as one GGUF at out_path: the first part's KVs without split.*,
 * then every part's tensors. */
static int join_parts(char **parts, int n_parts, const char *out_path, forge_err *err)
{
    int rc = FORGE_OK;
    gguf_ctx **g = calloc((size_t)n_parts, sizeof *g);
    gguf_writer *w = NULL;
    join_src js = {NULL};
    int64_t n_t = 0;
    if (!g) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    for (int i = 0; i < n_parts; i++) {
        if ((rc = gguf_open(parts[i], &g[i], err))) goto done;
        n_t += gguf_tensor_count(g[i]);
    }
    js.t = calloc((size_t)(n_t ? n_t : 1), sizeof *js.t);
    if (!js.t) {
        rc = forge_err_set(err, FORGE_E_NOMEM, "out of memory");
        goto done;
    }
    if ((rc = gguf_writer_create(&w, err))) goto done;
    for (int64_t k = 0; k < gguf_kv_count(g[0]); k++) {
        if (!strncmp(gguf_kv_key(g[0], k), "split.", 6)) continue;
        if ((rc = gguf_writer_copy_kv(w, g[0], k, err))) goto done;
    }
    int64_t j = 0;
    for (int i = 0; i < n_parts; i++)
        for (int64_t k = 0; k < gguf_tensor_count(g[i]); k++) {
            const gguf_tensor_info *t = gguf_tensor(g[i], k);
            if ((rc = gguf_writer_add_tensor(w, t->name, t->type, t->n_dims, t->ne, err)))
                goto done;
            js.t[j++] = t;
        }
    rc = gguf_writer_write(w, out_path, join_fill, &js, 0, err);
done:
    gguf_writer_free(w);
    free(js.t);
    for (int i = 0; i < n_parts; i++)
        gguf_close(g[i]);
    free(g);
    return rc;
}

/* ---- the repo listing and the choice of file ------------------------------------------- */

typedef struct str_list {
    char **v;
    size_t n;
} str_list;

static void str_list_free(str_list *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->v[i]);
    free(l->v);
    l->v = NULL;
    l->n = 0;
}

static int str_list_add(str_list *l, const char *s, forge_err *err)
{
    char **v = realloc(l->v, (l->n + 1) * sizeof *v);
    if (!v) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    l->v = v;
    if (!(l->v[l->n] = xstrdup(s))) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    l->n++;
    return FORGE_OK;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The .gguf files of a repo from the hub's API. */
static int api_gguf_files(const hub_net *net, const char *repo, str_list *out, forge_err *err)
{
    membuf body;
    cJSON *j = NULL;
    char what[300];
    int rc;
    memset(out, 0, sizeof *out);
    char *url = xasprintf("%s/api/models/%s", net->endpoint, repo);
    if (!url) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    snprintf(what, sizeof what, "repo %s", repo);
    if ((rc = http_get(net, url, what, &body, err))) {
        if (rc == FORGE_E_NOTFOUND)
            forge_err_set(err, FORGE_E_NOTFOUND, "repo %s not found on %s (HTTP 404)", repo,
                          net->endpoint);
        goto done;
    }
    j = cJSON_Parse(body.data);
    free(body.data);
    const cJSON *sib = j ? cJSON_GetObjectItemCaseSensitive(j, "siblings") : NULL;
    if (!cJSON_IsArray(sib)) {
        rc = forge_err_set(err, FORGE_E_FORMAT,
                           "repo %s: the hub's answer from %s has no file list", repo, url);
        goto done;
    }
    const cJSON *it;
    cJSON_ArrayForEach(it, sib)
    {
        const cJSON *f = cJSON_GetObjectItemCaseSensitive(it, "rfilename");
        if (!cJSON_IsString(f) || !ends_with_ci(f->valuestring, ".gguf")) continue;
        if (!file_ok(f->valuestring)) continue;
        if ((rc = str_list_add(out, f->valuestring, err))) goto done;
    }
    if (out->n) qsort(out->v, out->n, sizeof *out->v, cmp_str);
done:
    if (rc) str_list_free(out);
    cJSON_Delete(j);
    free(url);
    return rc;
}

/* "F16, Q4_K_M, Q8_0, ..." (distinct, sorted) of the files into buf. */
static void quant_summary(const str_list *files, char *buf, size_t cap)
{
    str_list q = {0};
    size_t used = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < files->n; i++) {
        char w[64];
        bool seen = false;
        forge_hub_quant_of(files->v[i], w, sizeof w);
        for (size_t k = 0; k < q.n && !seen; k++)
            seen = !strcmp(q.v[k], w);
        if (!seen && w[0] && str_list_add(&q, w, NULL) != FORGE_OK) break;
    }
    if (q.n) qsort(q.v, q.n, sizeof *q.v, cmp_str);
    for (size_t i = 0; i < q.n; i++) {
        int n = snprintf(buf + used, cap - used, "%s%s", used ? ", " : "", q.v[i]);
        if (n < 0 || (size_t)n >= cap - used) break;
        used += (size_t)n;
    }
    str_list_free(&q);
}

/* Pick the files to download (all parts of a split) and their name in the cache. The files
 * are the repo's .gguf files, sorted. */
static int choose(const hub_spec *s, const str_list *files, str_list *pick, char **cache_name,
                  forge_err *err)
{
    int rc = FORGE_OK;
    char *group = NULL;
    char quants[1024];
    memset(pick, 0, sizeof *pick);
    *cache_name = NULL;
    quant_summary(files, quants, sizeof quants);
    if (files->n == 0)
        return forge_err_set(err, FORGE_E_NOTFOUND, "repo %s has no .gguf files", s->repo);
    if (s->file) {
        char *want = joined_name(s->file);
        if (!want) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
        for (size_t i = 0; i < files->n && !group; i++) {
            char *jn = joined_name(files->v[i]);
            if (jn && !strcmp(jn, want))
                group = jn;
            else
                free(jn);
        }
        free(want);
        if (!group) {
            rc = forge_err_set(err, FORGE_E_NOTFOUND, "repo %s has no file %s (it has: %s)",
                               s->repo, s->file, quants);
            goto done;
        }
    } else {
        /* the quant given, else Q4_K_M when there, else the only model of the repo */
        const char *q = s->quant[0] ? s->quant : "Q4_K_M";
        for (size_t i = 0; i < files->n; i++) {
            if (!has_quant(files->v[i], q)) continue;
            char *jn = joined_name(files->v[i]);
            if (!jn) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
            if (!group || strlen(jn) < strlen(group)) { /* the plainest name wins */
                free(group);
                group = jn;
            } else {
                free(jn);
            }
        }
        if (!group && !s->quant[0]) {
            char *first = joined_name(files->v[0]);
            bool one = first != NULL;
            for (size_t i = 1; i < files->n && one; i++) {
                char *jn = joined_name(files->v[i]);
                one = jn && !strcmp(jn, first);
                free(jn);
            }
            if (one)
                group = first;
            else
                free(first);
            if (!group) {
                rc = forge_err_set(err, FORGE_E_NOTFOUND,
                                   "repo %s has several models: name one as %s:QUANT (quants: %s)",
                                   s->repo, s->repo, quants);
                goto done;
            }
        }
        if (!group) {
            rc = forge_err_set(err, FORGE_E_NOTFOUND,
                               "repo %s has no GGUF file for quant '%s'; its quants: %s", s->repo,
                               s->quant, quants);
            goto done;
        }
    }
    /* every file whose joined name is the group's, in order (parts sort by number) */
    int count = 0;
    for (size_t i = 0; i < files->n; i++) {
        char *jn = joined_name(files->v[i]);
        if (!jn) {
            rc = forge_err_set(err, FORGE_E_NOMEM, "out of memory");
            goto done;
        }
        bool same = !strcmp(jn, group);
        free(jn);
        if (!same) continue;
        int part = 0, n = 0;
        if (split_suffix(files->v[i], &part, &n)) count = n;
        if ((rc = str_list_add(pick, files->v[i], err))) goto done;
    }
    if (count && (size_t)count != pick->n) {
        rc = forge_err_set(err, FORGE_E_NOTFOUND,
                           "repo %s: %s is split into %d parts but the repo lists %zu of them",
                           s->repo, group, count, pick->n);
        goto done;
    }
    *cache_name = group;
    group = NULL;
done:
    free(group);
    if (rc) str_list_free(pick);
    return rc;
}

/* ---- the cache ------------------------------------------------------------------------- */

/* "a/b/c.gguf" -> "a%2Fb%2Fc.gguf": one flat name for .tmp/. malloc'd. */
static char *flat_name(const char *f)
{
    size_t n = 0;
    for (const char *c = f; *c; c++)
        n += *c == '/' ? 3 : 1;
    char *s = malloc(n + 1), *o = s;
    if (!s) return NULL;
    for (const char *c = f; *c; c++) {
        if (*c == '/') {
            memcpy(o, "%2F", 3);
            o += 3;
        } else {
            *o++ = *c;
        }
    }
    *o = '\0';
    return s;
}

/* Files (relative paths) ending in .gguf under dir, skipping hidden entries. */
static int walk_gguf(const char *root, const char *rel, str_list *out, forge_err *err)
{
    char *dir = rel[0] ? xasprintf("%s/%s", root, rel) : xstrdup(root);
    int rc = FORGE_OK;
    if (!dir) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    DIR *d = opendir(dir);
    if (!d) goto done; /* absent: nothing cached */
    struct dirent *e;
    while (!rc && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        char *r = rel[0] ? xasprintf("%s/%s", rel, e->d_name) : xstrdup(e->d_name);
        char *full = r ? xasprintf("%s/%s", root, r) : NULL;
        struct stat st;
        if (!r || !full) {
            rc = forge_err_set(err, FORGE_E_NOMEM, "out of memory");
        } else if (stat(full, &st) == 0) {
            if (S_ISDIR(st.st_mode))
                rc = walk_gguf(root, r, out, err);
            else if (S_ISREG(st.st_mode) && ends_with_ci(e->d_name, ".gguf"))
                rc = str_list_add(out, r, err);
        }
        free(r);
        free(full);
    }
    closedir(d);
done:
    free(dir);
    return rc;
}

/* A cached file that `s` names without asking the hub; *found false if none (or ambiguous,
 * then *ambiguous lists them). */
static int cache_lookup(const hub_spec *s, const char *repo_dir, char **path, str_list *cached,
                        forge_err *err)
{
    int rc;
    *path = NULL;
    memset(cached, 0, sizeof *cached);
    if ((rc = walk_gguf(repo_dir, "", cached, err))) return rc;
    if (cached->n) qsort(cached->v, cached->n, sizeof *cached->v, cmp_str);
    const char *hit = NULL;
    if (s->file) {
        char *want = joined_name(s->file);
        if (!want) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
        for (size_t i = 0; i < cached->n && !hit; i++)
            if (!strcmp(cached->v[i], want)) hit = cached->v[i];
        free(want);
    } else if (s->quant[0]) {
        for (size_t i = 0; i < cached->n; i++)
            if (has_quant(cached->v[i], s->quant) && (!hit || strlen(cached->v[i]) < strlen(hit)))
                hit = cached->v[i];
    } else {
        for (size_t i = 0; i < cached->n; i++)
            if (has_quant(cached->v[i], "Q4_K_M")) hit = cached->v[i];
        if (!hit && cached->n == 1) hit = cached->v[0];
    }
    if (hit && !(*path = xasprintf("%s/%s", repo_dir, hit)))
        return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    return FORGE_OK;
}

static int read_sidecar(const char *path, char *buf, size_t cap)
{
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    size_t n = fread(buf, 1, cap - 1, f);
    fclose(f);
    buf[n] = '\0';
    return 0;
}

static int write_sidecar(const char *path, const char *text, forge_err *err)
{
    char *tmp = xasprintf("%s.tmp", path);
    if (!tmp) return forge_err_set(err, FORGE_E_NOMEM, "out of memory");
    int rc = FORGE_OK;
    FILE *f = fopen(tmp, "w");
    if (!f || fputs(text, f) < 0 || fclose(f) != 0) {
        if (f) fclose(f);
        rc = forge_err_set(err, FORGE_E_IO, "writing %s: %s", tmp, strerror(errno));
        unlink(tmp);
    } else if (rename(tmp, path) != 0) {
        rc = forge_err_set(err, FORGE_E_IO, "renaming %s: %s", tmp, strerror(errno));
        unlink(tmp);
    }
    free(tmp);
    return rc;
}

static bool cache_name_ok(const char *f)
{
    return file_ok(f);
}

int forge_hub_pull(const char *spec, const forge_hub_params *pp, char **path, forge_err *err)
{
    forge_hub_params p = pp ? *pp : forge_hub_default_params();
    hub_spec s;
    hub_net net = {0};
    str_list files = {0}, pick = {0}, cached = {0};
    char *cache = NULL, *repo_dir = NULL, *tmp_dir = NULL, *cache_name = NULL, *final = NULL;
    char *flat = NULL, *lock_path = NULL, *sidecar = NULL, *endpoint = NULL, *joined_tmp = NULL;
    char **done_paths = NULL;
    char *shas = NULL;
    int lock_fd = -1;
    int rc;
    if (!path) return forge_err_set(err, FORGE_E_INVALID, "forge_hub_pull: NULL path");
    *path = NULL;
    if ((rc = spec_parse(spec, &s, err))) return rc;
    if (p.retries < 0) p.retries = 0;
    bool offline = p.offline || env_true("FORGE_OFFLINE") || env_true("HF_HUB_OFFLINE");
    const char *ep = p.endpoint && *p.endpoint ? p.endpoint : getenv("HF_ENDPOINT");
    if (!ep || !*ep) ep = HUB_DEFAULT_ENDPOINT;
    if (!(endpoint = xstrdup(ep))) {
        rc = forge_err_set(err, FORGE_E_NOMEM, "out of memory");
        goto done;
    }
    for (size_t n = strlen(endpoint); n > 0 && endpoint[n - 1] == '/'; n--)
        endpoint[n - 1] = '\0';
    net.endpoint = endpoint;
    net.token = p.token && *p.token ? p.token : getenv("HF_TOKEN");
    if (net.token && !*net.token) net.token = NULL;
    net.connect_timeout_s = p.connect_timeout_s > 0 ? p.connect_timeout_s : 30;

    if ((rc = forge_hub_cache_dir(&p, &cache, err))) goto done;
    repo_dir = xasprintf("%s/hub/%s", cache, s.repo);
    tmp_dir = repo_dir ? xasprintf("%s/.tmp", repo_dir) : NULL;
    if (!tmp_dir) {
        rc = forge_err_set(err, FORGE_E_NOMEM, "out of memory");
        goto done;
    }

    if (offline || p.prefer_cache) {
        if ((rc = cache_lookup(&s, repo_dir, path, &cached, err))) goto done;
        if (*path) {
            touch_atime(*path);
            goto done;
        }
        if (offline) {
            char have[1024] = "nothing";
            if (cached.n) quant_summary(&cached, have, sizeof have);
            rc = forge_err_set(err, FORGE_E_NOTFOUND,
                               "%s is not in the cache %s and the hub is not asked (offline); "
                               "cached for %s: %s",
                               spec, cache, s.repo, have);
            goto done;
        }
    }

    if ((rc = api_gguf_files(&net, s.repo, &files, err))) goto done;
    if ((rc = choose(&s, &files, &pick, &cache_name, err))) goto done;
    if (!cache_name_ok(cache_name)) {
        rc = forge_err_set(err, FORGE_E_FORMAT, "repo %s: unusable file name %s", s.repo,
                           cache_name);
        goto done;
    }
    final = xasprintf("%s/%s", repo_dir, cache_name);
    flat = flat_name(cache_name);
    lock_path = flat ? xasprintf("%s/%s.lock", tmp_dir, flat) : NULL;
    sidecar = flat ? xasprintf("%s/%s.sha256", tmp_dir, flat) : NULL;
    done_paths = calloc(pick.n, sizeof *done_paths);
    shas = calloc(pick.n, 66);
    if (!final || !lock_path || !sidecar || !done_paths || !shas) {
        rc = forge_err_set(err, FORGE_E_NOMEM, "out of memory");
        goto done;
    }
    if ((rc = mkdirs(tmp_dir, err))) goto done;
    char *final_dir = xstrdup(final);
    if (!final_dir) {
        rc = forge_err_set(err, FORGE_E_NOMEM, "out of memory");
        goto done;
    }
    *strrchr(final_dir, '/') = '\0';
    rc = mkdirs(final_dir, err);
    free(final_dir);
    if (rc) goto done;

    lock_fd = open(lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (lock_fd < 0) {
        rc = forge_err_set(err, FORGE_E_IO, "cannot create %s: %s", lock_path, strerror(errno));
        goto done;
    }
    if (flock(lock_fd, LOCK_EX | LOCK_NB) != 0) {
        note(&p, "waiting for another download of %s/%s", s.repo, cache_name);
        while (flock(lock_fd, LOCK_EX) != 0) {
            if (errno != EINTR) {
                rc = forge_err_set(err, FORGE_E_IO, "locking %s: %s", lock_path, strerror(errno));
                goto done;
            }
        }
    }

    if (file_exists(final)) {
        if (p.prefer_cache) goto found; /* another process just pulled it */
        /* up to date when the hub's sha256 of every part is what was downloaded */
        char remote[4096] = "", local[4096] = "";
        bool known = true;
        for (size_t i = 0; i < pick.n; i++) {
            char *url = resolve_url(net.endpoint, s.repo, pick.v[i]);
            char sha[65];
            if (!url) {
                rc = forge_err_set(err, FORGE_E_NOMEM, "out of memory");
                goto done;
            }
            rc = http_head_sha(&net, url, pick.v[i], sha, err);
            free(url);
            if (rc) goto done;
            if (!sha[0]) known = false;
            size_t used = strlen(remote);
            snprintf(remote + used, sizeof remote - used, "%s\n", sha);
        }
        if (read_sidecar(sidecar, local, sizeof local) != 0 && pick.n == 1 && known) {
            /* a file put there by hand, or an older cache: hash it once */
            char sha[65];
            if ((rc = forge_hub_sha256_file(final, sha, err))) goto done;
            snprintf(local, sizeof local, "%s\n", sha);
        }
        if (!known || !strcmp(local, remote)) {
            note(&p, "%s/%s is up to date", s.repo, cache_name);
            goto found;
        }
        note(&p, "%s/%s changed on the hub; downloading the new version", s.repo, cache_name);
    }

    for (size_t i = 0; i < pick.n; i++) {
        char *pf = flat_name(pick.v[i]);
        char *part = pf ? xasprintf("%s/%s.part", tmp_dir, pf) : NULL;
        done_paths[i] = pick.n == 1 ? xstrdup(final)
                        : pf        ? xasprintf("%s/%s.done", tmp_dir, pf)
                                    : NULL;
        free(pf);
        if (!part || !done_paths[i]) {
            free(part);
            rc = forge_err_set(err, FORGE_E_NOMEM, "out of memory");
            goto done;
        }
        if (pick.n > 1 && file_exists(done_paths[i])) {
            /* a part checked by an earlier, interrupted pull */
            char sha[65];
            rc = forge_hub_sha256_file(done_paths[i], sha, err);
            if (!rc) memcpy(shas + 66 * i, sha, 65);
        } else if (pick.n == 1) {
            /* never write over the cached file: download next to it, rename when checked */
            char *staged = xasprintf("%s/%s.new", tmp_dir, flat);
            if (!staged) {
                free(part);
                rc = forge_err_set(err, FORGE_E_NOMEM, "out of memory");
                goto done;
            }
            rc = fetch_file(&net, &p, s.repo, pick.v[i], part, staged, shas + 66 * i, err);
            if (!rc && rename(staged, final) != 0) {
                rc = forge_err_set(err, FORGE_E_IO, "cannot rename %s to %s: %s", staged, final,
                                   strerror(errno));
            }
            if (rc) unlink(staged);
            free(staged);
        } else {
            rc = fetch_file(&net, &p, s.repo, pick.v[i], part, done_paths[i], shas + 66 * i, err);
        }
        free(part);
        if (rc) goto done;
    }
    if (pick.n > 1) {
        joined_tmp = xasprintf("%s/%s.joining", tmp_dir, flat);
        if (!joined_tmp) {
            rc = forge_err_set(err, FORGE_E_NOMEM, "out of memory");
            goto done;
        }
        note(&p, "joining %zu parts into %s", pick.n, cache_name);
        if ((rc = join_parts(done_paths, (int)pick.n, joined_tmp, err)) ||
            (rc = check_gguf(joined_tmp, cache_name, err))) {
            unlink(joined_tmp);
            goto done;
        }
        if (rename(joined_tmp, final) != 0) {
            rc = forge_err_set(err, FORGE_E_IO, "cannot rename %s to %s: %s", joined_tmp, final,
                               strerror(errno));
            unlink(joined_tmp);
            goto done;
        }
        for (size_t i = 0; i < pick.n; i++)
            unlink(done_paths[i]);
    }
    {
        char text[4096] = "";
        for (size_t i = 0; i < pick.n; i++) {
            size_t used = strlen(text);
            snprintf(text + used, sizeof text - used, "%s\n", shas + 66 * i);
        }
        if ((rc = write_sidecar(sidecar, text, err))) goto done;
    }
found:
    touch_atime(final);
    *path = final;
    final = NULL;
done:
    if (lock_fd >= 0) close(lock_fd); /* releases the flock */
    if (done_paths)
        for (size_t i = 0; i < pick.n; i++)
            free(done_paths[i]);
    free(done_paths);
    free(shas);
    free(s.file);
    str_list_free(&files);
    str_list_free(&pick);
    str_list_free(&cached);
    free(cache);
    free(repo_dir);
    free(tmp_dir);
    free(cache_name);
    free(final);
    free(flat);
    free(lock_path);
    free(sidecar);
    free(endpoint);
    free(joined_tmp);
    return rc;
}

/* ---- listing and removing ---------------------------------------------------------------- */

void forge_hub_entries_free(forge_hub_entry *e, size_t n)
{
    if (!e) return;
    for (size_t i = 0; i < n; i++) {
        free(e[i].repo);
        free(e[i].file);
        free(e[i].path);
    }
    free(e);
}

/* Every repo directory (owner/name) in the cache. */
static int list_repos(const char *hub_dir, str_list *out, forge_err *err)
{
    int rc = FORGE_OK;
    memset(out, 0, sizeof *out);
    DIR *d = opendir(hub_dir);
    if (!d) return FORGE_OK;
    struct dirent *o;
    while (!rc && (o = readdir(d)) != NULL) {
        if (o->d_name[0] == '.') continue;
        char *od = xasprintf("%s/%s", hub_dir, o->d_name);
        DIR *d2 = od ? opendir(od) : NULL;
        struct dirent *nm;
        while (!rc && d2 && (nm = readdir(d2)) != NULL) {
            if (nm->d_name[0] == '.') continue;
            char *r = xasprintf("%s/%s", o->d_name, nm->d_name);
            rc = r ? str_list_add(out, r, err) : forge_err_set(err, FORGE_E_NOMEM, "out of memory");
            free(r);
        }
        if (d2) closedir(d2);
        free(od);
    }
    closedir(d);
    if (out->n) qsort(out->v, out->n, sizeof *out->v, cmp_str);
    return rc;
}

int forge_hub_list(const forge_hub_params *p, forge_hub_entry **entries, size_t *n, forge_err *err)
{
    char *cache = NULL, *hub_dir = NULL;
    str_list repos = {0};
    forge_hub_entry *e = NULL;
    size_t ne = 0;
    int rc;
    *entries = NULL;
    *n = 0;
    if ((rc = forge_hub_cache_dir(p, &cache, err))) return rc;
    if (!(hub_dir = xasprintf("%s/hub", cache))) {
        rc = forge_err_set(err, FORGE_E_NOMEM, "out of memory");
        goto done;
    }
    if ((rc = list_repos(hub_dir, &repos, err))) goto done;
    for (size_t r = 0; r < repos.n && !rc; r++) {
        str_list files = {0};
        char *rd = xasprintf("%s/%s", hub_dir, repos.v[r]);
        rc = rd ? walk_gguf(rd, "", &files, err)
                : forge_err_set(err, FORGE_E_NOMEM, "out of memory");
        if (files.n) qsort(files.v, files.n, sizeof *files.v, cmp_str);
        for (size_t i = 0; i < files.n && !rc; i++) {
            forge_hub_entry *grown = realloc(e, (ne + 1) * sizeof *e);
            if (!grown) {
                rc = forge_err_set(err, FORGE_E_NOMEM, "out of memory");
                break;
            }
            e = grown;
            forge_hub_entry *x = &e[ne++];
            memset(x, 0, sizeof *x);
            x->repo = xstrdup(repos.v[r]);
            x->file = xstrdup(files.v[i]);
            x->path = xasprintf("%s/%s", rd, files.v[i]);
            struct stat st;
            if (!x->repo || !x->file || !x->path)
                rc = forge_err_set(err, FORGE_E_NOMEM, "out of memory");
            else if (stat(x->path, &st) == 0) {
                x->size = (uint64_t)st.st_size;
                x->last_used = st.st_atime;
            }
        }
        str_list_free(&files);
        free(rd);
    }
done:
    if (rc) {
        forge_hub_entries_free(e, ne);
    } else {
        *entries = e;
        *n = ne;
    }
    str_list_free(&repos);
    free(hub_dir);
    free(cache);
    return rc;
}

/* rm -r of a directory we own (the cache's repo directory). */
static void rm_tree(const char *path)
{
    DIR *d = opendir(path);
    if (d) {
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
            char *c = xasprintf("%s/%s", path, e->d_name);
            struct stat st;
            if (c && lstat(c, &st) == 0) {
                if (S_ISDIR(st.st_mode))
                    rm_tree(c);
                else
                    unlink(c);
            }
            free(c);
        }
        closedir(d);
    }
    rmdir(path);
}

int forge_hub_remove(const char *spec, const forge_hub_params *p, size_t *n_removed, forge_err *err)
{
    hub_spec s;
    char *cache = NULL, *repo_dir = NULL;
    str_list files = {0};
    size_t removed = 0;
    int rc;
    if (n_removed) *n_removed = 0;
    if ((rc = spec_parse(spec, &s, err))) return rc;
    if ((rc = forge_hub_cache_dir(p, &cache, err))) goto done;
    if (!(repo_dir = xasprintf("%s/hub/%s", cache, s.repo))) {
        rc = forge_err_set(err, FORGE_E_NOMEM, "out of memory");
        goto done;
    }
    if ((rc = walk_gguf(repo_dir, "", &files, err))) goto done;
    if (!s.file && !s.quant[0]) {
        removed = files.n;
        struct stat st;
        if (stat(repo_dir, &st) != 0) {
            rc = forge_err_set(err, FORGE_E_NOTFOUND, "%s is not in the cache %s", s.repo, cache);
            goto done;
        }
        rm_tree(repo_dir);
        char *owner = xasprintf("%s/hub/%.*s", cache, (int)(strchr(s.repo, '/') - s.repo), s.repo);
        if (owner) rmdir(owner); /* only when empty */
        free(owner);
        goto done;
    }
    char *want = s.file ? joined_name(s.file) : NULL;
    for (size_t i = 0; i < files.n; i++) {
        bool hit = s.file ? (want && !strcmp(files.v[i], want)) : has_quant(files.v[i], s.quant);
        if (!hit) continue;
        char *full = xasprintf("%s/%s", repo_dir, files.v[i]);
        char *fl = flat_name(files.v[i]);
        if (full && unlink(full) == 0) removed++;
        if (fl) {
            static const char *const ext[] = {".sha256", ".lock", ".new", ".joining"};
            for (size_t k = 0; k < FORGE_ARRAY_LEN(ext); k++) {
                char *x = xasprintf("%s/.tmp/%s%s", repo_dir, fl, ext[k]);
                if (x) unlink(x);
                free(x);
            }
        }
        free(full);
        free(fl);
    }
    free(want);
    if (!removed) {
        char have[1024] = "nothing";
        if (files.n) quant_summary(&files, have, sizeof have);
        rc = forge_err_set(err, FORGE_E_NOTFOUND, "%s is not in the cache %s (cached for %s: %s)",
                           spec, cache, s.repo, have);
    }
done:
    if (n_removed) *n_removed = removed;
    str_list_free(&files);
    free(s.file);
    free(cache);
    free(repo_dir);
    return rc;
}
