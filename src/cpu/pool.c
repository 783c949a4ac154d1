/* pool.c - the kernel thread pool: persistent pthreads created once, woken per job, spinning
 * briefly before they sleep on a condition variable (so back-to-back matmuls of a decode step
 * do not pay a futex wake each), and kern_physical_cores. Owns nothing but its threads and its
 * scratch buffer; knows nothing about the work it runs.
 *
 * Each share of a job (an ith) is claimed once, by its worker or by the caller: when the caller
 * has run its own share it takes every share whose worker has not started yet and runs it
 * itself. On a machine shared with other work a worker that has lost its core (or is still
 * waking from sleep) then no longer holds up the caller for a whole scheduler slice: a decode
 * step is ~180 jobs, and each such wait used to cost the full time until the worker ran again. */
#define _GNU_SOURCE /* sched_getaffinity, CPU_ISSET */
#include <dirent.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define KERN_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define KERN_CPU_RELAX() __asm__ __volatile__("yield" ::: "memory")
#else
#define KERN_CPU_RELAX() ((void)0)
#endif

#include "core/util.h"
#include "cpu/kern_impl.h"

/* How long a thread spins for the next job (or the caller for the workers) before sleeping.
 * FORGE_SPIN_US overrides it; 0 means sleep at once. */
#define KERN_DEFAULT_SPIN_NS 300000
#define KERN_SPIN_BEFORE_YIELD_NS 20000

struct kern_pool {
    int n_threads;
    pthread_t *threads; /* n_threads - 1 workers */
    int n_started;
    pthread_mutex_t mu;
    pthread_cond_t cv_work;
    pthread_cond_t cv_done;
    atomic_uint generation; /* bumped once per job */
    atomic_int pending;     /* shares of the current job not finished (ith 0 excluded) */
    atomic_uint *claimed;   /* per thread (index ith, 0 unused): the last job whose share was
                             * claimed, by the worker or by the caller */
    atomic_bool quit;
    void (*fn)(void *arg, int ith, int nth);
    void *arg;
    int64_t spin_ns;
    void *scratch;
    size_t scratch_cap;
};

typedef struct kern_worker {
    kern_pool *pool;
    int ith;
} kern_worker;

/* Spin until generation differs from seen or the spin budget runs out; true if it changed.
 * After the first few microseconds the spinning thread yields between checks, so that on an
 * oversubscribed machine it gives its core to whoever needs it. */
static bool spin_for_job(kern_pool *pool, unsigned seen)
{
    if (pool->spin_ns <= 0) return false;
    int64_t start = forge_now_ns(), t = start;
    for (;;) {
        for (int i = 0; i < 64; i++) {
            if (atomic_load_explicit(&pool->generation, memory_order_acquire) != seen ||
                atomic_load_explicit(&pool->quit, memory_order_relaxed))
                return true;
            KERN_CPU_RELAX();
        }
        t = forge_now_ns();
        if (t - start > pool->spin_ns) return false;
        if (t - start > KERN_SPIN_BEFORE_YIELD_NS) sched_yield();
    }
}

static void *worker_main(void *p)
{
    kern_worker *w = p;
    kern_pool *pool = w->pool;
    int ith = w->ith;
    unsigned seen = 0;
    free(w);
    for (;;) {
        if (!spin_for_job(pool, seen)) {
            pthread_mutex_lock(&pool->mu);
            while (atomic_load(&pool->generation) == seen && !atomic_load(&pool->quit))
                pthread_cond_wait(&pool->cv_work, &pool->mu);
            pthread_mutex_unlock(&pool->mu);
        }
        if (atomic_load(&pool->quit)) break;
        seen = atomic_load_explicit(&pool->generation, memory_order_acquire);
        /* claim this share unless the caller already took it (claimed == seen) or has moved on
         * to a later job (claimed ahead of seen: the wait loop above then sees the new job) */
        unsigned c = atomic_load_explicit(&pool->claimed[ith], memory_order_acquire);
        if ((int)(seen - c) <= 0 ||
            !atomic_compare_exchange_strong_explicit(&pool->claimed[ith], &c, seen,
                                                     memory_order_acq_rel, memory_order_acquire))
            continue;
        /* claimed: the caller waits for this share, so fn and arg stay those of job seen */
        pool->fn(pool->arg, ith, pool->n_threads);
        if (atomic_fetch_sub_explicit(&pool->pending, 1, memory_order_acq_rel) == 1) {
            /* the caller may be asleep: signal under the lock so the wake cannot be lost */
            pthread_mutex_lock(&pool->mu);
            pthread_cond_signal(&pool->cv_done);
            pthread_mutex_unlock(&pool->mu);
        }
    }
    return NULL;
}

int kern_pool_create(int n_threads, kern_pool **out, forge_err *err)
{
    kern_pool *pool = NULL;
    int rc = FORGE_OK;
    *out = NULL;
    if (n_threads < 1 || n_threads > 1024)
        return forge_err_set(err, FORGE_E_INVALID, "thread pool: %d threads (want 1..1024)",
                             n_threads);
    pool = calloc(1, sizeof *pool);
    if (!pool) return forge_err_set(err, FORGE_E_NOMEM, "thread pool: out of memory");
    pool->n_threads = n_threads;
    pool->spin_ns = KERN_DEFAULT_SPIN_NS;
    const char *env = getenv("FORGE_SPIN_US");
    if (env && *env) pool->spin_ns = (int64_t)atol(env) * 1000;
    pthread_mutex_init(&pool->mu, NULL);
    pthread_cond_init(&pool->cv_work, NULL);
    pthread_cond_init(&pool->cv_done, NULL);
    atomic_init(&pool->generation, 0);
    atomic_init(&pool->pending, 0);
    atomic_init(&pool->quit, false);
    if (n_threads > 1) {
        pool->threads = calloc((size_t)n_threads - 1, sizeof *pool->threads);
        pool->claimed = calloc((size_t)n_threads, sizeof *pool->claimed);
        if (!pool->threads || !pool->claimed) {
            rc = forge_err_set(err, FORGE_E_NOMEM, "thread pool: out of memory");
            goto fail;
        }
    }
    for (int i = 1; i < n_threads; i++) {
        kern_worker *w = malloc(sizeof *w);
        if (!w) {
            rc = forge_err_set(err, FORGE_E_NOMEM, "thread pool: out of memory");
            goto fail;
        }
        w->pool = pool;
        w->ith = i;
        int e = pthread_create(&pool->threads[i - 1], NULL, worker_main, w);
        if (e != 0) {
            free(w);
            rc = forge_err_set(err, FORGE_E_NOMEM, "thread pool: pthread_create of thread %d: %s",
                               i, strerror(e));
            goto fail;
        }
        pool->n_started++;
    }
    *out = pool;
    return FORGE_OK;
fail:
    kern_pool_free(pool);
    return rc;
}

void kern_pool_free(kern_pool *pool)
{
    if (!pool) return;
    pthread_mutex_lock(&pool->mu);
    atomic_store(&pool->quit, true);
    pthread_cond_broadcast(&pool->cv_work);
    pthread_mutex_unlock(&pool->mu);
    for (int i = 0; i < pool->n_started; i++)
        pthread_join(pool->threads[i], NULL);
    pthread_cond_destroy(&pool->cv_work);
    pthread_cond_destroy(&pool->cv_done);
    pthread_mutex_destroy(&pool->mu);
    free(pool->threads);
    free(pool->claimed);
    free(pool->scratch);
    free(pool);
}

int kern_pool_size(const kern_pool *pool)
{
    return pool ? pool->n_threads : 1;
}

void kern_pool_run(kern_pool *pool, void (*fn)(void *arg, int ith, int nth), void *arg)
{
    if (!pool || pool->n_threads == 1) {
        fn(arg, 0, 1);
        return;
    }
    pool->fn = fn;
    pool->arg = arg;
    atomic_store_explicit(&pool->pending, pool->n_threads - 1, memory_order_relaxed);
    pthread_mutex_lock(&pool->mu);
    atomic_fetch_add_explicit(&pool->generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool->cv_work);
    pthread_mutex_unlock(&pool->mu);

    fn(arg, 0, pool->n_threads);

    /* the shares no worker has started: run them here rather than wait for their workers */
    unsigned gen = atomic_load_explicit(&pool->generation, memory_order_relaxed);
    for (int i = 1; i < pool->n_threads; i++) {
        unsigned c = atomic_load_explicit(&pool->claimed[i], memory_order_acquire);
        if (c != gen && atomic_compare_exchange_strong_explicit(&pool->claimed[i], &c, gen,
                                                                memory_order_acq_rel,
                                                                memory_order_acquire)) {
            fn(arg, i, pool->n_threads);
            atomic_fetch_sub_explicit(&pool->pending, 1, memory_order_acq_rel);
        }
    }

    if (atomic_load_explicit(&pool->pending, memory_order_acquire) == 0) return;
    int64_t start = forge_now_ns();
    while (pool->spin_ns > 0) {
        for (int i = 0; i < 64; i++) {
            if (atomic_load_explicit(&pool->pending, memory_order_acquire) == 0) return;
            KERN_CPU_RELAX();
        }
        int64_t t = forge_now_ns();
        if (t - start > pool->spin_ns) break;
        if (t - start > KERN_SPIN_BEFORE_YIELD_NS) sched_yield();
    }
    pthread_mutex_lock(&pool->mu);
    while (atomic_load_explicit(&pool->pending, memory_order_acquire) != 0)
        pthread_cond_wait(&pool->cv_done, &pool->mu);
    pthread_mutex_unlock(&pool->mu);
}

void *kern_pool_scratch(kern_pool *pool, size_t bytes)
{
    if (bytes <= pool->scratch_cap) return pool->scratch;
    size_t cap = (bytes + 4095) & ~(size_t)4095;
    void *p = aligned_alloc(64, cap);
    if (!p) return NULL;
    free(pool->scratch);
    pool->scratch = p;
    pool->scratch_cap = cap;
    return p;
}

/* ---- physical cores -------------------------------------------------------------------- */

static int read_int_file(const char *path, int *out)
{
    FILE *f = fopen(path, "r");
    int ok;
    if (!f) return 0;
    ok = fscanf(f, "%d", out) == 1;
    fclose(f);
    return ok;
}

/* Unique (package, core) pairs of the CPUs this process may run on, from sysfs; 0 if unknown. */
static int cores_from_sysfs(void)
{
    enum { MAX_PAIRS = 4096 };
    long long pairs[MAX_PAIRS];
    int n_pairs = 0;
    cpu_set_t set;
    bool have_set = sched_getaffinity(0, sizeof set, &set) == 0;
    for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) {
        char path[128];
        int core, pkg;
        if (have_set && !CPU_ISSET(cpu, &set)) continue;
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%d/topology/core_id", cpu);
        if (!read_int_file(path, &core)) continue;
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%d/topology/physical_package_id",
                 cpu);
        if (!read_int_file(path, &pkg)) pkg = 0;
        long long key = ((long long)pkg << 32) | (unsigned)core;
        bool seen = false;
        for (int i = 0; i < n_pairs && !seen; i++)
            seen = pairs[i] == key;
        if (!seen && n_pairs < MAX_PAIRS) pairs[n_pairs++] = key;
    }
    return n_pairs;
}

int kern_physical_cores(void)
{
    int n = cores_from_sysfs();
    if (n > 0) return n;
    long m = sysconf(_SC_NPROCESSORS_ONLN);
    return m > 0 ? (int)m : 1;
}
