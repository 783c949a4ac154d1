/* forge_hub.h - model files from a Hugging Face-style hub, kept in a local cache.
 *
 * A model is named REPO[:QUANT] or REPO/FILE.gguf, REPO being "owner/name"
 * (e.g. "bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"). forge_hub_pull() lists the repo's files
 * ({endpoint}/api/models/REPO, `siblings[].rfilename`), picks the GGUF whose name carries QUANT
 * (case-insensitive, as a '-', '.' or '/' delimited word), downloads it with libcurl from
 * {endpoint}/REPO/resolve/main/FILE (redirects followed) and returns the cached path.
 *
 * Cache: params.cache_dir, else $FORGE_CACHE, else $XDG_CACHE_HOME/forge, else ~/.cache/forge.
 * A file lives at CACHE/hub/OWNER/NAME/FILE; downloads in progress and their locks live in
 * CACHE/hub/OWNER/NAME/.tmp/. A download goes to a .part file (resumed with an HTTP Range request
 * when one is left from an interrupted download), is checked (size against x-linked-size, sha256
 * against the hub's x-linked-etag / ETag when it is a sha256, GGUF magic and a full gguf_open())
 * and only then renamed into place, under an flock()ed lock file so that concurrent pulls of one
 * file wait for each other. A file that fails a check is deleted; a file already in the cache is
 * replaced only by a checked one. Multi-part files (NAME-00001-of-0000N.gguf) are all downloaded,
 * checked, and joined into one GGUF (NAME.gguf, without the split.* keys); the parts are deleted.
 *
 * Network: params.endpoint, else $HF_ENDPOINT, else https://huggingface.co; params.token, else
 * $HF_TOKEN, sent as "Authorization: Bearer". Offline (params.offline, or $FORGE_OFFLINE /
 * $HF_HUB_OFFLINE set to a value other than "" or "0"): only the cache is used.
 *
 * Errors: FORGE_E_NOTFOUND (no such repo, file or quant; offline and not cached; the message lists
 * the quants the repo has), FORGE_E_IO (network, HTTP status, disk; for 401/403 the message says
 * to set HF_TOKEN), FORGE_E_FORMAT (not a GGUF, sha256 or size mismatch), FORGE_E_INVALID
 * (malformed name). A failed download leaves no model file; after a dropped connection its
 * .part stays in .tmp/ for the next pull to resume (never used as a model); after a disk error
 * or a failed check it is deleted.
 * Thread safety: independent calls may run concurrently (also from several processes).
 */
#ifndef FORGE_HUB_H
#define FORGE_HUB_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>
#include <time.h>

#ifdef __cplusplus
extern "C" {
#endif

struct forge_err;

/* Download progress of one file: bytes done (including a resumed part) and total (0 if unknown).
 * Called often; `name` is the file being downloaded (borrowed for the call). */
typedef void (*forge_hub_progress_fn)(const char *name, uint64_t done, uint64_t total, void *user);

/* A note for the user ("resuming ...", "waiting for another download ..."); borrowed. */
typedef void (*forge_hub_note_fn)(const char *msg, void *user);

typedef struct forge_hub_params {
    const char *endpoint;  /* NULL: $HF_ENDPOINT, else https://huggingface.co */
    const char *token;     /* NULL: $HF_TOKEN (none if unset or empty) */
    const char *cache_dir; /* NULL: $FORGE_CACHE, else $XDG_CACHE_HOME/forge, else ~/.cache/forge */
    bool offline;          /* use only the cache (also when $FORGE_OFFLINE / $HF_HUB_OFFLINE) */
    bool prefer_cache;     /* a matching cached file is used without asking the hub (what
                              `-hf` does); otherwise a cached file is checked against the hub's
                              sha256 and downloaded again when it changed (what `pull` does) */
    int retries;           /* resumed attempts after a dropped connection (default 2) */
    long connect_timeout_s;         /* default 30 */
    forge_hub_progress_fn progress; /* may be NULL */
    forge_hub_note_fn note;         /* may be NULL */
    void *user;
} forge_hub_params;

forge_hub_params forge_hub_default_params(void);

/* Resolve `spec` (REPO[:QUANT] or REPO/FILE.gguf) to a checked GGUF file in the cache,
 * downloading it unless it is there. On success *path is a malloc'd path the caller frees. */
int forge_hub_pull(const char *spec, const forge_hub_params *p, char **path, struct forge_err *err);

/* The cache directory the params select (malloc'd; caller frees). */
int forge_hub_cache_dir(const forge_hub_params *p, char **dir, struct forge_err *err);

/* One cached model file. */
typedef struct forge_hub_entry {
    char *repo;       /* "owner/name" */
    char *file;       /* path inside the repo, e.g. "Model-Q4_K_M.gguf" */
    char *path;       /* full path in the cache */
    uint64_t size;    /* bytes */
    time_t last_used; /* last pull or use through forge_hub_pull (the file's atime) */
} forge_hub_entry;

/* Every cached .gguf file, sorted by repo then file. *entries is owned by the caller and freed
 * with forge_hub_entries_free. An absent cache is an empty list. */
int forge_hub_list(const forge_hub_params *p, forge_hub_entry **entries, size_t *n,
                   struct forge_err *err);
void forge_hub_entries_free(forge_hub_entry *entries, size_t n);

/* Delete the cached files `spec` names (REPO: all of the repo's files; REPO:QUANT; REPO/FILE)
 * with their leftovers (.part, locks); *n_removed counts the model files removed (NULL ok).
 * FORGE_E_NOTFOUND when nothing matches. */
int forge_hub_remove(const char *spec, const forge_hub_params *p, size_t *n_removed,
                     struct forge_err *err);

/* The quant word of a GGUF file name: the last '-' or '.' separated word before ".gguf" (and
 * before a -NNNNN-of-NNNNN split suffix), e.g. "Q4_K_M" for "Llama-3.2-1B-Q4_K_M.gguf". Writes
 * at most cap bytes (NUL-terminated) to out. */
void forge_hub_quant_of(const char *file, char *out, size_t cap);

/* Lower-case hex SHA-256 (65 bytes with the NUL) of a whole file. */
int forge_hub_sha256_file(const char *path, char hex[65], struct forge_err *err);

#ifdef __cplusplus
}
#endif

#endif /* FORGE_HUB_H */
