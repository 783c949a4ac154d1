/* test_gpu_sample.c - gpu_sample (the sampler chain on the device) against the CPU sampler of
 * libforge (src/sample/sampler.c): the same parameters, the same penalty window (filled into a
 * be_sample by sampler_dev_prepare, as the engine does) and the same draw r, which the CPU gets
 * through sampler_pick. Logits are distinct (a random permutation of a monotone ramp), so the
 * order of the candidates is unambiguous; vocabularies 1 .. 151936; greedy, top-k 1/40/1024,
 * top-p, min-p, temperatures and penalties; NaN and all-equal logits; error paths.
 *
 * Boundaries: the device computes the same float probabilities as the CPU up to the rounding
 * of expf/logf (a few ulp) and sums in double in another order, so a cumulative probability may
 * differ from the CPU's by ~1e-7. A draw r within 1e-5 of a CPU cumulative boundary could
 * therefore legitimately pick the neighbouring candidate: such an r is redrawn. For the same
 * reason a case whose top-p or min-p cut lies within 1e-5 of a candidate is reported as skipped
 * (with distinct ramp logits this is rare).
 *   test_gpu_sample [--quick]     --quick: vocabularies up to 9000 only (compute-sanitizer)
 * One line per check, a final "N passed, M failed", exit status 0 only when every check passed.
 * Needs a GPU: run by scripts/gpu-run.sh. */
#include "gpu_test_util.h"
#include "sample/sampler_dev.h"

#define BOUNDARY 1e-5

static gpu_stream *S;
static uint64_t g_seed = 0xC0FFEE123456789ULL;
static int g_skipped;

typedef struct dev_bufs {
    float *d_logits, *d_r;
    int32_t *d_pen, *d_out;
    void *d_scratch;
} dev_bufs;

/* Upload the be_sample's window as (id, count) pairs and run gpu_sample with the draw r.
 * Returns the status; *id = the picked id; *guard_ok = the output's guard bytes are intact. */
static int dev_sample(dev_bufs *b, int64_t n, const be_sample *bs, float r, int32_t *id,
                      int *guard_ok, forge_err *e)
{
    int32_t pairs[2 * 512];
    if (bs->n_pen > 512) {
        fprintf(stderr, "FATAL: window of %d ids is larger than this test's buffer\n", bs->n_pen);
        exit(2);
    }
    for (int32_t i = 0; i < bs->n_pen; i++) {
        pairs[2 * i] = bs->pen_ids[i];
        pairs[2 * i + 1] = bs->pen_counts[i];
    }
    if (bs->n_pen > 0) GT_OK(gpu_memcpy_h2d(b->d_pen, pairs, (size_t)bs->n_pen * 8, S, err));
    GT_OK(gpu_memcpy_h2d(b->d_r, &r, sizeof r, S, err));
    gt_out_prepare(b->d_out, sizeof(int32_t), S);
    gpu_sample_args a = {0};
    a.d_logits = b->d_logits;
    a.n_vocab = n;
    a.temperature = bs->temperature;
    a.top_k = bs->top_k;
    a.top_p = bs->top_p;
    a.min_p = bs->min_p;
    a.repeat_penalty = bs->repeat_penalty;
    a.presence_penalty = bs->presence_penalty;
    a.frequency_penalty = bs->frequency_penalty;
    a.d_pen = bs->n_pen > 0 ? b->d_pen : NULL;
    a.n_pen = bs->n_pen;
    a.d_r = b->d_r;
    a.d_scratch = b->d_scratch;
    a.d_out = b->d_out;
    int rc = gpu_sample(&a, S, e);
    *guard_ok = gt_out_fetch(b->d_out, sizeof(int32_t), id, S);
    return rc;
}

/* Distinct logits: a random permutation of a ramp; peaked = a steep tail at the top. */
static void make_logits(float *x, int32_t *rank_to_id, int64_t n, int peaked)
{
    for (int64_t i = 0; i < n; i++)
        rank_to_id[i] = (int32_t)i;
    for (int64_t i = n - 1; i > 0; i--) { /* Fisher-Yates */
        int64_t j = (int64_t)(gt_rand_u64(&g_seed) % (uint64_t)(i + 1));
        int32_t t = rank_to_id[i];
        rank_to_id[i] = rank_to_id[j];
        rank_to_id[j] = t;
    }
    for (int64_t rank = 0; rank < n; rank++) { /* rank n-1 is the largest */
        double u = n > 1 ? (double)rank / (double)(n - 1) : 0.5;
        double v = peaked ? -5.0 + 25.0 * u + 10.0 * pow(u, 8) : -4.0 + 8.0 * u;
        x[rank_to_id[rank]] = (float)v;
    }
}

typedef struct pair {
    int32_t id;
    float p;
} pair;

static int cmp_pair(const void *a, const void *b)
{
    const pair *x = a, *y = b;
    if (x->p > y->p) return -1;
    if (x->p < y->p) return 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

/* The CPU distribution of s over x as (id, p) sorted like the chain's candidates; returns the
 * count. pr: n floats of scratch, out: n pairs. */
static int64_t cpu_dist(forge_sampler *s, const float *x, int64_t n, float *pr, pair *out)
{
    int64_t m = 0;
    forge_sampler_probs(s, x, pr);
    for (int64_t i = 0; i < n; i++)
        if (pr[i] > 0) out[m++] = (pair){(int32_t)i, pr[i]};
    qsort(out, (size_t)m, sizeof *out, cmp_pair);
    return m;
}

/* True when some cumulative sum of d (but the last) lies within BOUNDARY of v. */
static int near_cum(const pair *d, int64_t m, double v)
{
    double cum = 0;
    for (int64_t i = 0; i + 1 < m; i++) {
        cum += d[i].p;
        if (fabs(cum - v) < BOUNDARY) return 1;
    }
    return 0;
}

typedef struct config {
    const char *name;
    float temperature;
    int32_t top_k;
    float top_p, min_p;
    float repeat, presence, frequency;
} config;

static void run_case(dev_bufs *b, const float *x, const int32_t *rank_to_id, int64_t n,
                     const config *c, const char *dist, float *pr, pair *d, pair *d_cut)
{
    forge_sampler_params p = forge_sampler_default_params();
    forge_sampler *s = NULL, *s_cut = NULL;
    char what[160];
    p.temperature = c->temperature;
    p.top_k = c->top_k;
    p.top_p = c->top_p;
    p.min_p = c->min_p;
    p.repeat_penalty = c->repeat;
    p.presence_penalty = c->presence;
    p.frequency_penalty = c->frequency;
    p.penalty_last_n = 16;
    p.seed = 1;
    GT_OK(forge_sampler_create(&p, (int32_t)n, &s, err));
    /* the cut check: the same chain without top-p / min-p at temperature 1 gives the
     * probabilities the top-p and min-p stages see */
    forge_sampler_params pc = p;
    pc.temperature = 1.0f;
    pc.top_p = 1.0f;
    pc.min_p = 0.0f;
    GT_OK(forge_sampler_create(&pc, (int32_t)n, &s_cut, err));
    /* a window of 24 ids (16 kept) with repeats, mostly among the best candidates */
    for (int i = 0; i < 24; i++) {
        int64_t top = n < 8 ? n : 8;
        int32_t id = i % 3 == 2
                         ? (int32_t)(gt_rand_u64(&g_seed) % (uint64_t)n)
                         : rank_to_id[n - 1 - (int64_t)(gt_rand_u64(&g_seed) % (uint64_t)top)];
        forge_sampler_accept(s, id);
        forge_sampler_accept(s_cut, id);
    }
    be_sample bs;
    double r_unused;
    sampler_dev_prepare(s, &bs, &r_unused);
    bool greedy = c->temperature <= 0;
    snprintf(what, sizeof what, "n %-6lld %-6s %-34s", (long long)n, dist, c->name);

    /* the filler: parameters and a window of distinct ids whose counts add up to 16 */
    bool pen_on = c->repeat != 1.0f || c->presence != 0.0f || c->frequency != 0.0f;
    int32_t total = 0, distinct = 1;
    for (int32_t i = 0; i < bs.n_pen; i++) {
        total += bs.pen_counts[i];
        for (int32_t j = 0; j < i; j++)
            distinct &= bs.pen_ids[i] != bs.pen_ids[j];
    }
    gt_check(bs.top_k == c->top_k && bs.top_p == c->top_p && bs.min_p == c->min_p &&
                 bs.repeat_penalty == c->repeat &&
                 (greedy ? bs.temperature <= 0 : bs.temperature == c->temperature) &&
                 (pen_on ? total == 16 && distinct : bs.n_pen == 0),
             "be_sample of %s: n_pen %d, counts %d", what, bs.n_pen, total);

    int64_t m_cut = cpu_dist(s_cut, x, n, pr, d_cut);
    bool cut_near = false;
    if (!greedy && c->top_p < 1.0f) cut_near |= near_cum(d_cut, m_cut, c->top_p);
    if (!greedy && c->min_p > 0.0f)
        for (int64_t i = 1; i < m_cut; i++)
            cut_near |= fabs(d_cut[i].p / d_cut[0].p - c->min_p) < BOUNDARY * c->min_p;
    if (cut_near) {
        printf("sample    %s skipped: a top-p / min-p cut within %.0e\n", what, BOUNDARY);
        g_skipped++;
        goto done;
    }
    int64_t m = cpu_dist(s, x, n, pr, d);
    const int n_r = greedy ? 1 : 4;
    for (int k = 0; k < n_r; k++) {
        float r;
        int tries = 0;
        do { /* see the file comment: a draw at a boundary may go either way */
            r = (float)((gt_rand_u64(&g_seed) >> 40) * (1.0 / 16777216.0));
            if (k == 0 && tries == 0) r = 0.0f;
        } while (near_cum(d, m, r) && ++tries < 100);
        int32_t want = sampler_pick(s, x, (double)r), got = -1;
        int guard = 0;
        forge_err e = {0};
        int rc = dev_sample(b, n, &bs, r, &got, &guard, &e);
        int ok = rc == FORGE_OK && got == want && guard;
        printf("sample    %s r %.6f: cpu %7d gpu %7d%s%s  %s\n", what, (double)r, want, got,
               rc ? " ERROR: " : "", rc ? e.msg : "", ok ? "ok" : "FAIL");
        gt_check(ok, "%s r %.6f: cpu %d, gpu %d, guard %s", what, (double)r, want, got,
                 guard ? "ok" : "OVERWRITTEN");
    }
done:
    forge_sampler_free(s);
    forge_sampler_free(s_cut);
}

/* A case with hand-made logits: the device against the CPU for each r given. */
static void special_case(dev_bufs *b, const char *name, const float *x, int64_t n, const config *c,
                         const float *rs, int n_r, int32_t expect)
{
    forge_sampler_params p = forge_sampler_default_params();
    forge_sampler *s = NULL;
    p.temperature = c->temperature;
    p.top_k = c->top_k;
    p.top_p = c->top_p;
    p.min_p = c->min_p;
    p.repeat_penalty = 1.0f;
    GT_OK(forge_sampler_create(&p, (int32_t)n, &s, err));
    GT_OK(gpu_memcpy_h2d(b->d_logits, x, (size_t)n * 4, S, err));
    be_sample bs;
    double r_unused;
    sampler_dev_prepare(s, &bs, &r_unused);
    for (int k = 0; k < n_r; k++) {
        int32_t want = sampler_pick(s, x, (double)rs[k]), got = -1;
        int guard = 0;
        forge_err e = {0};
        int rc = dev_sample(b, n, &bs, rs[k], &got, &guard, &e);
        int ok = rc == FORGE_OK && got == want && guard && (expect < 0 || got == expect);
        printf("special   %-48s r %.3f: cpu %d gpu %d (expect %d)  %s\n", name, (double)rs[k], want,
               got, expect, ok ? "ok" : "FAIL");
        gt_check(ok, "%s: %s", name, rc ? e.msg : "wrong id");
    }
    forge_sampler_free(s);
}

static void test_special(dev_bufs *b)
{
    enum { N = 1000 };
    static float x[N];
    const config greedy = {"greedy", 0.0f, 0, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f};
    const config k40 = {"k40 T1", 1.0f, 40, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f};
    const config dflt = {"defaults", 0.8f, 40, 0.95f, 0.05f, 1.0f, 0.0f, 0.0f};
    const float rs[] = {0.0f, 0.51f, 0.999f};
    int32_t rank_to_id[N];

    /* NaN: at id 0, at the largest logit, and scattered: NaN never wins */
    make_logits(x, rank_to_id, N, 1);
    int32_t best = rank_to_id[N - 1];
    x[best] = NAN;
    x[0] = NAN;
    for (int i = 0; i < N; i += 97)
        x[i] = NAN;
    special_case(b, "NaN logits, greedy (not the NaN max)", x, N, &greedy, rs, 1,
                 rank_to_id[N - 2] % 97 && rank_to_id[N - 2] ? rank_to_id[N - 2] : -1);
    special_case(b, "NaN logits, k 40", x, N, &k40, rs, 3, -1);
    special_case(b, "NaN logits, defaults", x, N, &dflt, rs, 3, -1);

    /* all equal: ties go to the smaller id; k 40 leaves ids 0..39 at 1/40 each */
    for (int i = 0; i < N; i++)
        x[i] = 0.5f;
    special_case(b, "all equal, greedy -> 0", x, N, &greedy, rs, 1, 0);
    special_case(b, "all equal, k 40, r 0.51 -> 20", x, N, &k40, rs + 1, 1, 20);
    special_case(b, "all equal, k 40, r 0 -> 0", x, N, &k40, rs, 1, 0);

    /* all NaN: greedy gives 0 */
    for (int i = 0; i < N; i++)
        x[i] = NAN;
    special_case(b, "all NaN, greedy -> 0", x, N, &greedy, rs, 1, 0);

    /* one token */
    x[0] = -3.0f;
    special_case(b, "n_vocab 1, k 40", x, 1, &k40, rs, 3, 0);
}

/* One result line per check. */
static void check_line(int ok, const char *what, int rc)
{
    printf("errors    %-56s rc %-4d %s\n", what, rc, ok ? "ok" : "FAIL");
    gt_check(ok, "%s (rc %d)", what, rc);
}

static void expect_rc(int rc, int want, const char *what)
{
    check_line(rc == want, what, rc);
}

static void test_errors(dev_bufs *b)
{
    forge_err e = {0};
    gpu_sample_args a = {0};
    a.d_logits = b->d_logits;
    a.n_vocab = 1000;
    a.temperature = 0.8f;
    a.top_k = 40;
    a.top_p = 0.95f;
    a.min_p = 0.05f;
    a.repeat_penalty = 1.0f;
    a.d_r = b->d_r;
    a.d_scratch = b->d_scratch;
    a.d_out = b->d_out;
    expect_rc(gpu_sample(NULL, S, &e), FORGE_E_INVALID, "NULL args: FORGE_E_INVALID");
    gpu_sample_args t = a;
    t.d_logits = NULL;
    expect_rc(gpu_sample(&t, S, &e), FORGE_E_INVALID, "NULL logits: FORGE_E_INVALID");
    t = a;
    t.d_out = NULL;
    expect_rc(gpu_sample(&t, S, &e), FORGE_E_INVALID, "NULL out: FORGE_E_INVALID");
    t = a;
    t.d_r = NULL;
    expect_rc(gpu_sample(&t, S, &e), FORGE_E_INVALID, "NULL r: FORGE_E_INVALID");
    t = a;
    t.d_scratch = NULL;
    expect_rc(gpu_sample(&t, S, &e), FORGE_E_INVALID, "NULL scratch: FORGE_E_INVALID");
    t = a;
    t.n_pen = 3;
    expect_rc(gpu_sample(&t, S, &e), FORGE_E_INVALID, "n_pen 3 without pairs: FORGE_E_INVALID");
    t = a;
    t.n_vocab = 0;
    expect_rc(gpu_sample(&t, S, &e), FORGE_E_INVALID, "n_vocab 0: FORGE_E_INVALID");
    t = a;
    t.top_k = 0;
    expect_rc(gpu_sample(&t, S, &e), FORGE_E_UNSUPPORTED, "top-k 0 (off): FORGE_E_UNSUPPORTED");
    t = a;
    t.top_k = GPU_SAMPLE_MAX_K + 1;
    expect_rc(gpu_sample(&t, S, &e), FORGE_E_UNSUPPORTED,
              "top-k GPU_SAMPLE_MAX_K + 1: FORGE_E_UNSUPPORTED");
    t = a;
    t.top_k = 0;
    t.temperature = 0.0f; /* greedy ignores top-k */
    t.n_vocab = 3;
    GT_OK(gpu_memcpy_h2d(b->d_logits, (float[]){1, 3, 2}, 12, S, err));
    gt_out_prepare(b->d_out, sizeof(int32_t), S);
    int rc = gpu_sample(&t, S, &e);
    int32_t got = -1;
    int guard = gt_out_fetch(b->d_out, sizeof got, &got, S);
    check_line(rc == FORGE_OK && got == 1 && guard, "greedy with top-k 0 runs: id 1 of {1, 3, 2}",
               rc);
    check_line(gpu_sample_scratch_bytes(0) == 0 && gpu_sample_scratch_bytes(1) > 0,
               "scratch bytes: 0 for n_vocab 0, > 0 for 1", 0);
    check_line(SAMPLER_DEV_MAX_K == GPU_SAMPLE_MAX_K, "SAMPLER_DEV_MAX_K == GPU_SAMPLE_MAX_K", 0);
}

int main(int argc, char **argv)
{
    /* 4097 and 9000: two and three chunks of pass 1 (an odd list in the merge) */
    static const int64_t sizes[] = {1, 7, 1000, 4097, 9000, 32000, 128256, 151936};
    size_t n_sizes = GT_LEN(sizes);
    /* --race: 7 and 9000 logits, flat only: every kernel (one chunk, three chunks and their
     * merge, the chain) in few launches, for compute-sanitizer racecheck, which is slow */
    int race = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick")) n_sizes = 5; /* up to 9000 (compute-sanitizer) */
        if (!strcmp(argv[i], "--race")) race = 1, n_sizes = 5;
    }
    static const config configs[] = {
        {"greedy", 0.0f, 40, 0.95f, 0.05f, 1.0f, 0.0f, 0.0f},
        {"greedy + penalties", 0.0f, 0, 1.0f, 0.0f, 1.3f, 0.5f, 0.2f},
        {"k1 T0.8", 0.8f, 1, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f},
        {"k40 p0.95 m0.05 T0.8 (defaults)", 0.8f, 40, 0.95f, 0.05f, 1.0f, 0.0f, 0.0f},
        {"k40 p0.9 m0 T1.5", 1.5f, 40, 0.9f, 0.0f, 1.0f, 0.0f, 0.0f},
        {"k1024 p1 m0 T0.5", 0.5f, 1024, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f},
        {"k1024 p0.9 m0.05 T1.5", 1.5f, 1024, 0.9f, 0.05f, 1.0f, 0.0f, 0.0f},
        {"k40 p1 m0.05 T0.8 + penalties", 0.8f, 40, 1.0f, 0.05f, 1.3f, 0.5f, 0.2f},
        {"k1024 p0.95 m0 T0.8 + penalties", 0.8f, 1024, 0.95f, 0.0f, 1.1f, 0.0f, 0.1f},
        {"k777 p0.95 m0.05 T1.5 + repeat", 1.5f, 777, 0.95f, 0.05f, 1.5f, 0.0f, 0.0f},
    };
    const int64_t n_max = sizes[n_sizes - 1];
    gpu_device_info info;
    GT_OK(gpu_device_info_get(0, &info, err));
    printf("device: %s (%s)\n", info.name, gpu_backend_name());
    GT_OK(gpu_stream_create(&S, err));

    dev_bufs b = {0};
    GT_OK(gpu_malloc((void **)&b.d_logits, (size_t)n_max * 4, err));
    GT_OK(gpu_malloc((void **)&b.d_r, sizeof(float), err));
    GT_OK(gpu_malloc((void **)&b.d_pen, 2 * 512 * sizeof(int32_t), err));
    GT_OK(gpu_malloc(&b.d_scratch, gpu_sample_scratch_bytes(n_max), err));
    b.d_out = (int32_t *)gt_out_alloc(sizeof(int32_t));

    float *x = (float *)gt_xmalloc((size_t)n_max * 4);
    float *pr = (float *)gt_xmalloc((size_t)n_max * 4);
    int32_t *rank_to_id = (int32_t *)gt_xmalloc((size_t)n_max * 4);
    pair *d = (pair *)gt_xmalloc((size_t)n_max * sizeof *d);
    pair *d_cut = (pair *)gt_xmalloc((size_t)n_max * sizeof *d_cut);
    for (size_t si = 0; si < n_sizes; si++) {
        if (race && sizes[si] != 7 && sizes[si] != 9000) continue;
        for (int peaked = 0; peaked < (race ? 1 : 2); peaked++) {
            const int64_t n = sizes[si];
            make_logits(x, rank_to_id, n, peaked);
            GT_OK(gpu_memcpy_h2d(b.d_logits, x, (size_t)n * 4, S, err));
            for (size_t ci = 0; ci < GT_LEN(configs); ci++)
                run_case(&b, x, rank_to_id, n, &configs[ci], peaked ? "peaked" : "flat", pr, d,
                         d_cut);
        }
    }
    test_special(&b);
    test_errors(&b);

    free(x);
    free(pr);
    free(rank_to_id);
    free(d);
    free(d_cut);
    gpu_free(b.d_logits);
    gpu_free(b.d_r);
    gpu_free(b.d_pen);
    gpu_free(b.d_scratch);
    gpu_free(b.d_out);
    gpu_stream_destroy(S);
    printf("\ntest_gpu_sample: %d passed, %d failed (%d cases skipped at a cut)\n", gt_pass,
           gt_fail, g_skipped);
    return gt_fail ? 1 : 0;
}
