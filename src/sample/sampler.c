/* sampler.c - token samplers as a chain of stages over a candidate list, in llama.cpp's order:
 * penalties (repeat / presence / frequency over the last N accepted tokens) -> top-k -> top-p ->
 * min-p -> temperature -> random draw (or greedy argmax when temperature <= 0). Owns the
 * forge_sampler_* functions of include/forge_model.h. The random stream is a xoshiro256** seeded
 * by splitmix64, so a seed reproduces the same draws on every platform; a non-greedy pick uses
 * exactly one draw (sampler_dev.h), so device sampling (be_ops.sample) sees the same stream.
 * NaN logits are read as -infinity: they never win and never get probability. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/util.h"
#include "sample/sampler_dev.h"

typedef struct cand {
    int32_t id;
    float logit;
    float p;
} cand;

typedef struct cand_list {
    cand *data;
    size_t n;
    bool sorted; /* by logit, descending */
} cand_list;

typedef void (*stage_fn)(forge_sampler *s, cand_list *c);

#define MAX_STAGES 8

struct forge_sampler {
    forge_sampler_params p;
    int32_t n_vocab;
    cand *cands;
    int32_t *history; /* ring of the last penalty_last_n accepted tokens */
    int32_t hist_n, hist_head;
    int32_t *counts;               /* scratch: occurrences per id (n_vocab) */
    int32_t *pen_ids, *pen_counts; /* sampler_dev_prepare's window: distinct ids, counts */
    uint64_t rng[4];
    stage_fn stages[MAX_STAGES];
    int n_stages;
    bool greedy;
};

/* ---- random numbers --------------------------------------------------------------------- */

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static uint64_t rng_next(uint64_t *s)
{
    uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

static void rng_seed(forge_sampler *s)
{
    uint64_t x = s->p.seed;
    for (int i = 0; i < 4; i++)
        s->rng[i] = splitmix64(&x);
}

/* uniform double in [0, 1) */
static double rng_uniform(forge_sampler *s)
{
    return (double)(rng_next(s->rng) >> 11) * (1.0 / 9007199254740992.0);
}

/* ---- helpers ---------------------------------------------------------------------------- */

static int cmp_cand_desc(const void *a, const void *b)
{
    const cand *x = a, *y = b;
    if (x->logit > y->logit) return -1;
    if (x->logit < y->logit) return 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

static void sort_desc(cand_list *c)
{
    if (!c->sorted) qsort(c->data, c->n, sizeof *c->data, cmp_cand_desc);
    c->sorted = true;
}

/* p = softmax(logit) over the list (sorted first). */
static void softmax(cand_list *c)
{
    sort_desc(c);
    float max = c->data[0].logit;
    double sum = 0;
    for (size_t i = 0; i < c->n; i++) {
        c->data[i].p = expf(c->data[i].logit - max);
        sum += c->data[i].p;
    }
    for (size_t i = 0; i < c->n; i++)
        c->data[i].p = (float)(c->data[i].p / sum);
}

/* ---- stages ----------------------------------------------------------------------------- */

static void stage_penalties(forge_sampler *s, cand_list *c)
{
    const forge_sampler_params *p = &s->p;
    if (s->hist_n == 0) return;
    for (int32_t i = 0; i < s->hist_n; i++)
        s->counts[s->history[i]]++;
    /* the list is still the full, unsorted vocabulary here: index = id */
    for (size_t i = 0; i < c->n; i++) {
        int32_t cnt = s->counts[c->data[i].id];
        if (cnt == 0) continue;
        float *l = &c->data[i].logit;
        if (*l <= 0)
            *l *= p->repeat_penalty;
        else
            *l /= p->repeat_penalty;
        *l -= (float)cnt * p->frequency_penalty + (cnt > 0 ? 1.0f : 0.0f) * p->presence_penalty;
    }
    for (int32_t i = 0; i < s->hist_n; i++)
        s->counts[s->history[i]] = 0;
    c->sorted = false;
}

static void stage_top_k(forge_sampler *s, cand_list *c)
{
    size_t k = (size_t)s->p.top_k;
    if (k >= c->n) return;
    sort_desc(c);
    c->n = k;
}

static void stage_top_p(forge_sampler *s, cand_list *c)
{
    softmax(c);
    double cum = 0;
    for (size_t i = 0; i < c->n; i++) {
        cum += c->data[i].p;
        if (cum >= s->p.top_p) {
            c->n = i + 1;
            return;
        }
    }
}

static void stage_min_p(forge_sampler *s, cand_list *c)
{
    sort_desc(c);
    const float min_logit = c->data[0].logit + logf(s->p.min_p);
    size_t keep = 1;
    while (keep < c->n && c->data[keep].logit >= min_logit)
        keep++;
    c->n = keep;
}

static void stage_temperature(forge_sampler *s, cand_list *c)
{
    for (size_t i = 0; i < c->n; i++)
        c->data[i].logit /= s->p.temperature;
}

/* ---- public ----------------------------------------------------------------------------- */

forge_sampler_params forge_sampler_default_params(void)
{
    forge_sampler_params p = {0};
    p.temperature = 0.8f;
    p.top_k = 40;
    p.top_p = 0.95f;
    p.min_p = 0.05f;
    p.repeat_penalty = 1.0f;
    p.presence_penalty = 0.0f;
    p.frequency_penalty = 0.0f;
    p.penalty_last_n = 64;
    p.seed = 0;
    return p;
}

int forge_sampler_create(const forge_sampler_params *params, int32_t n_vocab, forge_sampler **out,
                         forge_err *err)
{
    forge_sampler *s = NULL;
    if (!out || !params)
        return forge_err_set(err, FORGE_E_INVALID, "forge_sampler_create: NULL argument");
    *out = NULL;
    const forge_sampler_params *p = params;
    if (n_vocab < 1) return forge_err_set(err, FORGE_E_INVALID, "sampler: n_vocab %d", n_vocab);
    if (isnan(p->temperature) || isnan(p->top_p) || isnan(p->min_p) || isnan(p->repeat_penalty) ||
        isnan(p->presence_penalty) || isnan(p->frequency_penalty) || p->top_p < 0 || p->min_p > 1 ||
        !(p->repeat_penalty > 0) || p->penalty_last_n < 0)
        return forge_err_set(err, FORGE_E_INVALID,
                             "sampler: bad parameters (temperature %g, top-p %g, min-p %g, repeat "
                             "penalty %g, window %d)",
                             (double)p->temperature, (double)p->top_p, (double)p->min_p,
                             (double)p->repeat_penalty, p->penalty_last_n);
    s = calloc(1, sizeof *s);
    if (!s) goto nomem;
    s->p = *p;
    s->n_vocab = n_vocab;
    s->cands = malloc((size_t)n_vocab * sizeof *s->cands);
    s->counts = calloc((size_t)n_vocab, sizeof *s->counts);
    s->history =
        malloc((size_t)(p->penalty_last_n > 0 ? p->penalty_last_n : 1) * sizeof *s->history);
    s->pen_ids = malloc((size_t)(p->penalty_last_n > 0 ? p->penalty_last_n : 1) * sizeof(int32_t));
    s->pen_counts =
        malloc((size_t)(p->penalty_last_n > 0 ? p->penalty_last_n : 1) * sizeof(int32_t));
    if (!s->cands || !s->counts || !s->history || !s->pen_ids || !s->pen_counts) goto nomem;
    bool penalties =
        p->penalty_last_n > 0 &&
        (p->repeat_penalty != 1.0f || p->presence_penalty != 0.0f || p->frequency_penalty != 0.0f);
    if (penalties) s->stages[s->n_stages++] = stage_penalties;
    s->greedy = p->temperature <= 0;
    if (!s->greedy) {
        if (p->top_k > 0) s->stages[s->n_stages++] = stage_top_k;
        if (p->top_p < 1.0f) s->stages[s->n_stages++] = stage_top_p;
        if (p->min_p > 0.0f) s->stages[s->n_stages++] = stage_min_p;
        s->stages[s->n_stages++] = stage_temperature;
    }
    rng_seed(s);
    *out = s;
    return FORGE_OK;
nomem:
    forge_sampler_free(s);
    return forge_err_set(err, FORGE_E_NOMEM, "sampler: out of memory");
}

void forge_sampler_free(forge_sampler *s)
{
    if (!s) return;
    free(s->cands);
    free(s->counts);
    free(s->history);
    free(s->pen_ids);
    free(s->pen_counts);
    free(s);
}

void forge_sampler_accept(forge_sampler *s, int32_t id)
{
    if (!s || s->p.penalty_last_n <= 0 || id < 0 || id >= s->n_vocab) return;
    if (s->hist_n < s->p.penalty_last_n) {
        s->history[s->hist_n++] = id;
    } else {
        s->history[s->hist_head] = id;
        s->hist_head = (s->hist_head + 1) % s->p.penalty_last_n;
    }
}

void forge_sampler_reset(forge_sampler *s)
{
    if (!s) return;
    s->hist_n = 0;
    s->hist_head = 0;
    rng_seed(s);
}

/* Run the chain; on return c holds the surviving candidates, p = their probabilities. */
static void run_chain(forge_sampler *s, const float *logits, cand_list *c)
{
    c->data = s->cands;
    c->n = (size_t)s->n_vocab;
    c->sorted = false;
    for (int32_t i = 0; i < s->n_vocab; i++) /* NaN reads as -inf: it never wins */
        s->cands[i] = (cand){i, isnan(logits[i]) ? -INFINITY : logits[i], 0.0f};
    for (int i = 0; i < s->n_stages; i++)
        s->stages[i](s, c);
    if (s->greedy) {
        size_t best = 0; /* first maximum: the lowest id on a tie (the list is in id order) */
        for (size_t i = 1; i < c->n; i++)
            if (c->data[i].logit > c->data[best].logit) best = i;
        c->data[0] = c->data[best];
        c->data[0].p = 1.0f;
        c->n = 1;
        return;
    }
    softmax(c);
}

int32_t sampler_pick(forge_sampler *s, const float *logits, double r)
{
    cand_list c;
    run_chain(s, logits, &c);
    if (c.n == 1) return c.data[0].id;
    double cum = 0;
    for (size_t i = 0; i < c.n; i++) {
        cum += c.data[i].p;
        if (r < cum) return c.data[i].id;
    }
    return c.data[c.n - 1].id;
}

/* One draw per non-greedy pick, none when greedy (sampler_dev.h). */
int32_t forge_sampler_sample(forge_sampler *s, const float *logits)
{
    double r = s->greedy ? 0.0 : rng_uniform(s);
    return sampler_pick(s, logits, r);
}

bool sampler_dev_fits(const forge_sampler *s)
{
    return s->greedy || (s->p.top_k >= 1 && s->p.top_k <= SAMPLER_DEV_MAX_K);
}

int32_t sampler_n_vocab(const forge_sampler *s)
{
    return s->n_vocab;
}

void sampler_dev_prepare(forge_sampler *s, be_sample *out, double *r)
{
    const forge_sampler_params *p = &s->p;
    int32_t n_pen = 0;
    /* the penalty stage is on exactly when it is in the chain */
    bool penalties = s->n_stages > 0 && s->stages[0] == stage_penalties;
    if (penalties) {
        for (int32_t i = 0; i < s->hist_n; i++) {
            int32_t id = s->history[i];
            if (s->counts[id]++ == 0) s->pen_ids[n_pen++] = id;
        }
        for (int32_t i = 0; i < n_pen; i++) {
            s->pen_counts[i] = s->counts[s->pen_ids[i]];
            s->counts[s->pen_ids[i]] = 0;
        }
    }
    *out = (be_sample){0};
    out->temperature = s->greedy ? 0.0f : p->temperature;
    out->top_k = p->top_k;
    out->top_p = p->top_p;
    out->min_p = p->min_p;
    out->repeat_penalty = p->repeat_penalty;
    out->presence_penalty = p->presence_penalty;
    out->frequency_penalty = p->frequency_penalty;
    out->pen_ids = n_pen ? s->pen_ids : NULL;
    out->pen_counts = n_pen ? s->pen_counts : NULL;
    out->n_pen = n_pen;
    *r = s->greedy ? 0.0 : rng_uniform(s);
    float rf = (float)*r;
    out->r = rf < 1.0f ? rf : nextafterf(1.0f, 0.0f); /* the rounding may reach 1 */
}

void forge_sampler_probs(forge_sampler *s, const float *logits, float *probs)
{
    cand_list c;
    run_chain(s, logits, &c);
    memset(probs, 0, (size_t)s->n_vocab * sizeof *probs);
    for (size_t i = 0; i < c.n; i++)
        probs[c.data[i].id] = c.data[i].p;
}
