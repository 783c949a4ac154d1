/* test_paged_attn.c - paged attention on the CPU backend (be_ops.kv_store, kv_copy_block,
 * attention over a batch's block tables, kv_read; docs/ENGINE.md) against the contiguous layout
 * (one block of the whole cache), bit for bit:
 * shuffled block tables, blocks of 16 and 32, GQA ratios, head dims, one token and prompt chunks
 * starting at a nonzero position, F32 and F16 caches. Every row no sequence owns holds NaN, so a
 * read outside a sequence's blocks shows. Then sequences built with the block manager
 * (src/engine/kv_blocks.h): append, fork and copy-on-write copies applied with kv_copy_block read
 * back exactly their own K/V, and a prefix-cache hit attends over shared blocks exactly as the
 * same sequence computed alone. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/fp16.h"
#include "engine/kv_blocks.h"
#include "testutil.h"

/* ---- helpers ---- */

static backend *make_backend(int threads)
{
    backend *be = NULL;
    forge_err err = {0};
    if (backend_cpu_create(threads, false, &be, &err)) fail_msg("backend: %s", err.msg);
    assert_non_null(be->ops->kv_store);
    assert_non_null(be->ops->kv_copy_block);
    assert_non_null(be->ops->kv_read);
    return be;
}

/* a backend buffer of n floats copied from host (through get_rows of an F32 table) */
static be_buf *upload(backend *be, const float *x, int64_t n)
{
    be_buf *b = NULL;
    forge_err err = {0};
    if (be->ops->buf_create(be, n > 0 ? n : 1, &b, &err)) fail_msg("buf_create: %s", err.msg);
    if (n == 0) return b;
    be_weight table = {"t", GGML_TYPE_F32, n, 1, (uint64_t)n * 4, x, -1};
    const int32_t id = 0;
    if (be->ops->get_rows(be, b, &table, &id, 1, &err)) fail_msg("get_rows: %s", err.msg);
    return b;
}

static float *download(backend *be, const be_buf *b, int64_t n)
{
    float *x = malloc((size_t)(n > 0 ? n : 1) * sizeof *x);
    forge_err err = {0};
    assert_non_null(x);
    if (be->ops->buf_read(be, b, 0, n, x, &err)) fail_msg("buf_read: %s", err.msg);
    return x;
}

static be_kv *make_kv(backend *be, int n_layer, int n_ctx, int kv_dim, int type)
{
    be_kv *kv = NULL;
    forge_err err = {0};
    if (be->ops->kv_create(be, n_layer, n_ctx, kv_dim, type, &kv, &err))
        fail_msg("kv_create: %s", err.msg);
    return kv;
}

/* Every row of every layer = NaN (the sentinel of rows no sequence owns). A Q8_0 cache cannot
 * hold NaN (its quantizer maps NaN to 0): 1e30 there, whose fp16 scale is infinite, so a read
 * of it still makes the output non-finite. */
static void fill_nan(backend *be, be_kv *kv, int n_layer, int n_ctx, int kv_dim, int type)
{
    forge_err err = {0};
    float *nan_rows = malloc((size_t)n_ctx * kv_dim * sizeof(float));
    int32_t *rows = malloc((size_t)n_ctx * sizeof(int32_t));
    assert_true(nan_rows && rows);
    for (int64_t i = 0; i < (int64_t)n_ctx * kv_dim; i++)
        nan_rows[i] = type == FORGE_KV_Q8_0 ? 1e30f : NAN;
    for (int r = 0; r < n_ctx; r++)
        rows[r] = r;
    be_buf *b = upload(be, nan_rows, (int64_t)n_ctx * kv_dim);
    for (int l = 0; l < n_layer; l++)
        if (be->ops->kv_store(be, kv, l, b, b, rows, n_ctx, &err)) fail_msg("%s", err.msg);
    be->ops->buf_free(be, b);
    free(nan_rows);
    free(rows);
}

/* The K (which 0) or V (1) value of element i at position pos of a sequence whose token there
 * is tok, in layer l: a function of (token, position), as a model's K/V of a shared prefix. */
static float kv_value(int32_t tok, int pos, int l, int which, int i)
{
    uint64_t s = 0x9e3779b97f4a7c15ull ^ ((uint64_t)(uint32_t)tok << 32) ^ ((uint64_t)pos << 12) ^
                 ((uint64_t)l << 8) ^ ((uint64_t)which << 7);
    s += (uint64_t)i * 0xbf58476d1ce4e5b9ull;
    tu_rand_u64(&s);
    return tu_rand_uniform(&s);
}

/* [n][kv_dim] K or V of positions pos0..pos0+n-1 of tokens toks (toks[p] for position p) */
static float *kv_rows_of(const int32_t *toks, int pos0, int n, int kv_dim, int l, int which)
{
    float *x = malloc((size_t)(n > 0 ? n : 1) * kv_dim * sizeof(float));
    assert_non_null(x);
    for (int t = 0; t < n; t++)
        for (int i = 0; i < kv_dim; i++)
            x[(size_t)t * kv_dim + i] = kv_value(toks[pos0 + t], pos0 + t, l, which, i);
    return x;
}

/* Store K/V of positions pos0..pos0+n-1 (tokens toks) in layer l at cache rows rows[0..n). */
static void store(backend *be, be_kv *kv, int l, const int32_t *toks, int pos0, int n, int kv_dim,
                  const int32_t *rows)
{
    forge_err err = {0};
    float *k = kv_rows_of(toks, pos0, n, kv_dim, l, 0),
          *v = kv_rows_of(toks, pos0, n, kv_dim, l, 1);
    be_buf *kb = upload(be, k, (int64_t)n * kv_dim), *vb = upload(be, v, (int64_t)n * kv_dim);
    if (be->ops->kv_store(be, kv, l, kb, vb, rows, n, &err)) fail_msg("kv_store: %s", err.msg);
    be->ops->buf_free(be, kb);
    be->ops->buf_free(be, vb);
    free(k);
    free(v);
}

static float *random_q(uint64_t *rng, int n_tok, int n_head, int hd)
{
    size_t n = (size_t)n_tok * n_head * hd;
    float *q = malloc(n * sizeof *q);
    assert_non_null(q);
    for (size_t i = 0; i < n; i++)
        q[i] = tu_rand_uniform(rng) * 2.0f;
    return q;
}

/* The reference: the contiguous attention op over a fresh cache [n_layer][n_ctx] holding the
 * sequence toks[0..pos0+n_tok) in layer l (stored by the op itself: a prefill call for
 * 0..pos0, then the measured call). Returns the [n_tok][n_head*hd] output. */
static float *contiguous_attn(backend *be, int type, int n_layer, int l, const int32_t *toks,
                              int pos0, int n_tok, int n_head, int n_head_kv, int hd,
                              const float *q)
{
    forge_err err = {0};
    const int kv_dim = n_head_kv * hd, n_ctx = pos0 + n_tok + 3;
    be_kv *kv = make_kv(be, n_layer, n_ctx, kv_dim, type);
    const float scale = 1.0f / sqrtf((float)hd);
    if (pos0 > 0) { /* prefill 0..pos0 with some query (its output is not looked at) */
        float *k = kv_rows_of(toks, 0, pos0, kv_dim, l, 0),
              *v = kv_rows_of(toks, 0, pos0, kv_dim, l, 1);
        uint64_t rng = 99;
        float *qp = random_q(&rng, pos0, n_head, hd);
        be_buf *kb = upload(be, k, (int64_t)pos0 * kv_dim),
               *vb = upload(be, v, (int64_t)pos0 * kv_dim);
        be_buf *qb = upload(be, qp, (int64_t)pos0 * n_head * hd), *ob = NULL;
        if (be->ops->buf_create(be, (int64_t)pos0 * n_head * hd, &ob, &err))
            fail_msg("%s", err.msg);
        be_span_batch sb;
        int32_t *pos = malloc((size_t)pos0 * sizeof *pos);
        be_attn a = {l, n_head, n_head_kv, hd, scale,
                     be_span_batch_init(&sb, pos, pos0, 0, n_ctx, NULL, 0), 0.0f, 0};
        if (be->ops->attention(be, ob, qb, kb, vb, kv, &a, &err))
            fail_msg("attention: %s", err.msg);
        free(pos);
        be->ops->buf_free(be, kb);
        be->ops->buf_free(be, vb);
        be->ops->buf_free(be, qb);
        be->ops->buf_free(be, ob);
        free(k);
        free(v);
        free(qp);
    }
    float *k = kv_rows_of(toks, pos0, n_tok, kv_dim, l, 0),
          *v = kv_rows_of(toks, pos0, n_tok, kv_dim, l, 1);
    be_buf *kb = upload(be, k, (int64_t)n_tok * kv_dim),
           *vb = upload(be, v, (int64_t)n_tok * kv_dim);
    be_buf *qb = upload(be, q, (int64_t)n_tok * n_head * hd), *ob = NULL;
    if (be->ops->buf_create(be, (int64_t)n_tok * n_head * hd, &ob, &err)) fail_msg("%s", err.msg);
    be_span_batch sb;
    int32_t *pos = malloc((size_t)n_tok * sizeof *pos);
    be_attn a = {l, n_head, n_head_kv, hd, scale,
                 be_span_batch_init(&sb, pos, n_tok, pos0, n_ctx, NULL, 0), 0.0f, 0};
    if (be->ops->attention(be, ob, qb, kb, vb, kv, &a, &err)) fail_msg("attention: %s", err.msg);
    free(pos);
    float *out = download(be, ob, (int64_t)n_tok * n_head * hd);
    be->ops->buf_free(be, kb);
    be->ops->buf_free(be, vb);
    be->ops->buf_free(be, qb);
    be->ops->buf_free(be, ob);
    be->ops->kv_free(be, kv);
    free(k);
    free(v);
    return out;
}

/* One sequence's batch over a block table: rows at positions pos0..pos0+n_tok-1, slots through
 * the table. pos and slot hold n_tok entries. */
static be_batch seq_batch(const int32_t *table, int n_table, int bs, int pos0, int n_tok,
                          int32_t *pos, int32_t *slot, int32_t seq_start[2], int32_t n_tab[1])
{
    for (int i = 0; i < n_tok; i++) {
        pos[i] = pos0 + i;
        slot[i] = table[(pos0 + i) / bs] * bs + (pos0 + i) % bs;
    }
    seq_start[0] = 0;
    seq_start[1] = n_tok;
    n_tab[0] = n_table;
    return (be_batch){n_tok, 1, pos, slot, seq_start, table, n_tab, n_table, bs, NULL, 0};
}

/* Attention of q (positions pos0..pos0+n_tok-1) over table in layer l of kv, whose rows for
 * these positions hold their K/V already (stored again by the op: the same values, read back). */
static float *paged_attn(backend *be, be_kv *kv, int l, const int32_t *table, int n_table, int bs,
                         int pos0, int n_tok, int n_head, int n_head_kv, int hd, const float *q)
{
    forge_err err = {0};
    const int kv_dim = n_head_kv * hd;
    int32_t *pos = malloc(2 * (size_t)n_tok * sizeof *pos), seq_start[2], n_tab[1];
    float *k = malloc((size_t)n_tok * kv_dim * sizeof *k), *v = malloc((size_t)n_tok * kv_dim * 4);
    assert_true(pos && k && v);
    be_batch bt = seq_batch(table, n_table, bs, pos0, n_tok, pos, pos + n_tok, seq_start, n_tab);
    if (be->ops->kv_read(be, kv, l, bt.slot, n_tok, k, v, &err)) fail_msg("%s", err.msg);
    be_buf *kb = upload(be, k, (int64_t)n_tok * kv_dim), *vb = upload(be, v, (int64_t)n_tok * kv_dim);
    be_buf *qb = upload(be, q, (int64_t)n_tok * n_head * hd), *ob = NULL;
    if (be->ops->buf_create(be, (int64_t)n_tok * n_head * hd, &ob, &err)) fail_msg("%s", err.msg);
    be_attn a = {l, n_head, n_head_kv, hd, 1.0f / sqrtf((float)hd), &bt, 0.0f, 0};
    if (be->ops->attention(be, ob, qb, kb, vb, kv, &a, &err))
        fail_msg("paged attention: %s", err.msg);
    float *out = download(be, ob, (int64_t)n_tok * n_head * hd);
    be->ops->buf_free(be, kb);
    be->ops->buf_free(be, vb);
    be->ops->buf_free(be, qb);
    be->ops->buf_free(be, ob);
    free(pos);
    free(k);
    free(v);
    return out;
}

/* got == want bit for bit, every value finite */
static void assert_same(const float *got, const float *want, size_t n, const char *what)
{
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i])) fail_msg("%s: element %zu is %g", what, i, (double)got[i]);
        if (memcmp(&got[i], &want[i], sizeof(float)))
            fail_msg("%s: element %zu is %.9g, contiguous %.9g", what, i, (double)got[i],
                     (double)want[i]);
    }
}

static void shuffle(int32_t *x, int n, uint64_t *rng)
{
    for (int i = n - 1; i > 0; i--) {
        int j = (int)(tu_rand_u64(rng) % (uint64_t)(i + 1));
        int32_t t = x[i];
        x[i] = x[j];
        x[j] = t;
    }
}

/* ---- paged == contiguous over shuffled tables ---- */

static void test_paged_equals_contiguous(void **state)
{
    (void)state;
    static const int heads[][3] = {{4, 4, 16}, {8, 2, 32}, {6, 1, 20}, {4, 2, 64}, {2, 1, 7}};
    static const int chunks[][2] = {{0, 1}, {0, 37}, {45, 1}, {50, 23}, {64, 32}, {31, 2}, {95, 1}};
    const int n_layer = 2, n_blocks = 12;
    uint64_t rng = 4242;
    int32_t toks[128];
    for (int i = 0; i < 128; i++)
        toks[i] = (int32_t)(tu_rand_u64(&rng) % 32000);
    int n_cases = 0;
    backend *be = make_backend(2);
    for (int type = FORGE_KV_F32; type <= FORGE_KV_Q8_0; type++)
        for (int bsi = 0; bsi < 2; bsi++)
            for (size_t hi = 0; hi < sizeof heads / sizeof heads[0]; hi++) {
                const int bs = bsi ? 32 : 16, n_head = heads[hi][0], n_head_kv = heads[hi][1];
                const int hd = heads[hi][2], kv_dim = n_head_kv * hd, n_ctx = n_blocks * bs;
                /* Q8_0 holds heads of whole 32-value blocks only (test_q8_cache: the error) */
                if (type == FORGE_KV_Q8_0 && hd % 32) continue;
                be_kv *kv = make_kv(be, n_layer, n_ctx, kv_dim, type);
                for (size_t ci = 0; ci < sizeof chunks / sizeof chunks[0]; ci++) {
                    const int pos0 = chunks[ci][0], n_tok = chunks[ci][1], len = pos0 + n_tok;
                    const int n_table = (len + bs - 1) / bs, l = (int)(ci % 2);
                    if (n_table > n_blocks) continue;
                    /* a random table of distinct blocks; everything else NaN */
                    int32_t perm[32], rows[128];
                    for (int b = 0; b < n_blocks; b++)
                        perm[b] = b;
                    shuffle(perm, n_blocks, &rng);
                    fill_nan(be, kv, n_layer, n_ctx, kv_dim, type);
                    for (int p = 0; p < len; p++)
                        rows[p] = perm[p / bs] * bs + p % bs;
                    store(be, kv, l, toks, 0, len, kv_dim, rows);
                    float *q = random_q(&rng, n_tok, n_head, hd);
                    float *want = contiguous_attn(be, type, n_layer, l, toks, pos0, n_tok, n_head,
                                                  n_head_kv, hd, q);
                    float *got = paged_attn(be, kv, l, perm, n_table, bs, pos0, n_tok, n_head,
                                            n_head_kv, hd, q);
                    n_cases++;
                    assert_same(got, want, (size_t)n_tok * n_head * hd, "paged attention");
                    free(q);
                    free(want);
                    free(got);
                }
                be->ops->kv_free(be, kv);
            }
    print_message("%d cases bit-exact\n", n_cases);
    assert_int_equal(n_cases, 2 * 2 * 5 * 7 + 2 * 2 * 7); /* F32, F16: 5 layouts; Q8_0: 2 */
    be->ops->destroy(be);
}

/* The NaN sentinel is live: a table that points one position at a NaN row gives NaN (so the
 * finiteness checks above can fail), and a block past the sequence's end never matters. */
static void test_sentinel_is_live(void **state)
{
    (void)state;
    const int bs = 16, n_blocks = 4, n_head = 2, n_head_kv = 1, hd = 8, kv_dim = 8;
    backend *be = make_backend(1);
    be_kv *kv = make_kv(be, 1, n_blocks * bs, kv_dim, FORGE_KV_F32);
    int32_t toks[32] = {0}, rows[32];
    fill_nan(be, kv, 1, n_blocks * bs, kv_dim, FORGE_KV_F32);
    for (int p = 0; p < 20; p++)
        rows[p] = (p < bs ? 2 : 0) * bs + p % bs;
    store(be, kv, 0, toks, 0, 20, kv_dim, rows);
    uint64_t rng = 7;
    float *q = random_q(&rng, 1, n_head, hd);
    /* positions 0..19 through {2, 0}: finite, whatever block 3 holds */
    int32_t good[3] = {2, 0, 3};
    float *o = paged_attn(be, kv, 0, good, 3, bs, 19, 1, n_head, n_head_kv, hd, q);
    for (int i = 0; i < n_head * hd; i++)
        assert_true(isfinite(o[i]));
    free(o);
    /* the same through {2, 1}: block 1 is NaN */
    int32_t bad[2] = {2, 1};
    o = paged_attn(be, kv, 0, bad, 2, bs, 19, 1, n_head, n_head_kv, hd, q);
    assert_true(isnan(o[0]));
    free(o);
    free(q);
    be->ops->kv_free(be, kv);
    be->ops->destroy(be);
}

/* ---- sequences of the block manager ---- */

typedef struct seq_shadow {
    int32_t id;  /* kvb sequence id, 0 when free */
    int32_t len; /* tokens */
    int32_t toks[512];
} seq_shadow;

/* Read seq's K/V back through kvb_seq_rows and compare with kv_value of its own tokens
 * (rounded through fp16 for an F16 cache), bit for bit, every layer. */
static void check_readback(backend *be, be_kv *kv, const kvb_pool *pool, const seq_shadow *s,
                           int n_layer, int kv_dim, int type)
{
    forge_err err = {0};
    int32_t rows[512];
    if (s->len == 0) return;
    if (kvb_seq_rows(pool, s->id, 0, s->len, rows, &err)) fail_msg("seq_rows: %s", err.msg);
    float *k = malloc((size_t)s->len * kv_dim * sizeof(float));
    float *v = malloc((size_t)s->len * kv_dim * sizeof(float));
    assert_true(k && v);
    for (int l = 0; l < n_layer; l++) {
        if (be->ops->kv_read(be, kv, l, rows, s->len, k, v, &err)) fail_msg("kv_read: %s", err.msg);
        for (int p = 0; p < s->len; p++)
            for (int i = 0; i < kv_dim; i++)
                for (int which = 0; which < 2; which++) {
                    float want = kv_value(s->toks[p], p, l, which, i);
                    if (type == FORGE_KV_F16) want = forge_fp16_to_f32(forge_f32_to_fp16(want));
                    float got = (which ? v : k)[(size_t)p * kv_dim + i];
                    if (memcmp(&got, &want, sizeof got))
                        fail_msg("seq %d layer %d pos %d %s[%d] = %g, want %g", s->id, l, p,
                                 which ? "V" : "K", i, (double)got, (double)want);
                }
    }
    free(k);
    free(v);
}

/* Append n tokens to s: reserve, apply the copy-on-write copy, store K/V through the rows,
 * report computed. */
static void seq_append(backend *be, be_kv *kv, kvb_pool *pool, seq_shadow *s, const int32_t *ids,
                       int n, int n_layer, int kv_dim, int bs, int *n_copies)
{
    forge_err err = {0};
    kvb_copy cow;
    int32_t rows[512];
    if (kvb_seq_append(pool, s->id, ids, n, &cow, &err)) fail_msg("append: %s", err.msg);
    if (cow.n_rows > 0) {
        if (be->ops->kv_copy_block(be, kv, bs, cow.src, cow.dst, cow.n_rows, &err))
            fail_msg("kv_copy_block: %s", err.msg);
        (*n_copies)++;
    }
    memcpy(s->toks + s->len, ids, (size_t)n * sizeof *ids);
    if (kvb_seq_rows(pool, s->id, s->len, n, rows, &err)) fail_msg("seq_rows: %s", err.msg);
    for (int l = 0; l < n_layer; l++)
        store(be, kv, l, s->toks, s->len, n, kv_dim, rows);
    s->len += n;
    if (kvb_seq_computed(pool, s->id, s->len, &err)) fail_msg("computed: %s", err.msg);
}

static kvb_pool *make_pool(int n_blocks, int bs, bool cache)
{
    kvb_params p = kvb_default_params();
    p.n_blocks = n_blocks;
    p.block_size = bs;
    p.max_seqs = 16;
    p.prefix_cache = cache;
    kvb_pool *pool = NULL;
    forge_err err = {0};
    if (kvb_pool_create(&p, &pool, &err)) fail_msg("kvb_pool_create: %s", err.msg);
    return pool;
}

/* Random appends, forks and frees over a small pool; after every operation each live sequence
 * reads back exactly its own K/V, and its attention over its table equals the contiguous
 * attention over its tokens. */
static void test_kv_blocks_sequences(void **state)
{
    (void)state;
    const int n_layer = 2, n_head = 4, n_head_kv = 2, hd = 16, kv_dim = n_head_kv * hd;
    backend *be = make_backend(2);
    for (int type = FORGE_KV_F32; type <= FORGE_KV_F16; type++)
        for (int bsi = 0; bsi < 2; bsi++) {
            const int bs = bsi ? 32 : 16, n_blocks = bsi ? 24 : 48, n_ctx = n_blocks * bs;
            kvb_pool *pool = make_pool(n_blocks, bs, bsi == 0);
            be_kv *kv = make_kv(be, n_layer, n_ctx, kv_dim, type);
            fill_nan(be, kv, n_layer, n_ctx, kv_dim, type);
            static seq_shadow seqs[6];
            memset(seqs, 0, sizeof seqs);
            uint64_t rng = 1234 + (uint64_t)(type * 2 + bsi);
            int n_copies = 0, next_tok = 1;
            forge_err err = {0};
            for (int step = 0; step < 120; step++) {
                int si = (int)(tu_rand_u64(&rng) % 6), op = (int)(tu_rand_u64(&rng) % 10);
                seq_shadow *s = &seqs[si];
                if (!s->id) { /* start a sequence */
                    if (kvb_seq_create(pool, NULL, 0, &s->id, NULL, &err)) fail_msg("%s", err.msg);
                    s->len = 0;
                } else if (op < 6) { /* append 1..40 tokens */
                    int n = 1 + (int)(tu_rand_u64(&rng) % (op < 3 ? 3 : 40));
                    bool ok = false;
                    if (s->len + n > 400) n = 400 - s->len;
                    if (kvb_seq_can_append(pool, s->id, n, &ok, &err)) fail_msg("%s", err.msg);
                    if (!ok || n <= 0) continue;
                    int32_t ids[64];
                    for (int i = 0; i < n; i++)
                        ids[i] = next_tok++;
                    seq_append(be, kv, pool, s, ids, n, n_layer, kv_dim, bs, &n_copies);
                } else if (op < 9) { /* fork into a free slot */
                    int ci = -1;
                    for (int i = 0; i < 6 && ci < 0; i++)
                        if (!seqs[i].id) ci = i;
                    if (ci < 0) continue;
                    if (kvb_seq_fork(pool, s->id, &seqs[ci].id, &err)) fail_msg("%s", err.msg);
                    seqs[ci].len = s->len;
                    memcpy(seqs[ci].toks, s->toks, (size_t)s->len * sizeof s->toks[0]);
                } else { /* finish */
                    if (kvb_seq_free(pool, s->id, &err)) fail_msg("%s", err.msg);
                    s->id = 0;
                }
                for (int i = 0; i < 6; i++)
                    if (seqs[i].id) check_readback(be, kv, pool, &seqs[i], n_layer, kv_dim, type);
            }
            /* attention of every live sequence's last 1..3 positions over its table */
            for (int i = 0; i < 6; i++) {
                seq_shadow *s = &seqs[i];
                if (!s->id || s->len == 0) continue;
                const int32_t *table = NULL;
                int32_t n_table = 0, len = 0;
                if (kvb_seq_table(pool, s->id, &table, &n_table, &len, &err))
                    fail_msg("%s", err.msg);
                assert_int_equal(len, s->len);
                int n_tok = s->len < 3 ? s->len : 3, pos0 = s->len - n_tok;
                float *q = random_q(&rng, n_tok, n_head, hd);
                float *want = contiguous_attn(be, type, n_layer, 1, s->toks, pos0, n_tok, n_head,
                                              n_head_kv, hd, q);
                float *got = paged_attn(be, kv, 1, table, n_table, bs, pos0, n_tok, n_head,
                                        n_head_kv, hd, q);
                assert_same(got, want, (size_t)n_tok * n_head * hd, "sequence attention");
                free(q);
                free(want);
                free(got);
            }
            print_message("kv %s, blocks of %d: %d copy-on-write copies applied\n",
                          type ? "f16" : "f32", bs, n_copies);
            assert_true(n_copies > 0); /* the run exercised copy-on-write */
            if (kvb_check(pool, &err)) fail_msg("kvb_check: %s", err.msg);
            be->ops->kv_free(be, kv);
            kvb_pool_free(pool);
        }
    be->ops->destroy(be);
}

/* A second sequence whose prompt shares 3 full blocks with a finished one adopts them from the
 * prefix cache, computes only the rest, and attends exactly as the same sequence alone. */
static void test_prefix_hit(void **state)
{
    (void)state;
    const int n_layer = 2, n_head = 8, n_head_kv = 2, hd = 32, kv_dim = n_head_kv * hd;
    backend *be = make_backend(2);
    for (int type = FORGE_KV_F32; type <= FORGE_KV_F16; type++)
        for (int bsi = 0; bsi < 2; bsi++) {
            const int bs = bsi ? 32 : 16, n_blocks = 16, n_ctx = n_blocks * bs;
            kvb_pool *pool = make_pool(n_blocks, bs, true);
            be_kv *kv = make_kv(be, n_layer, n_ctx, kv_dim, type);
            fill_nan(be, kv, n_layer, n_ctx, kv_dim, type);
            forge_err err = {0};
            int n_copies = 0;
            static seq_shadow a, b;
            memset(&a, 0, sizeof a);
            memset(&b, 0, sizeof b);
            const int n_a = 3 * bs + 5, n_b = 3 * bs + 11;
            int32_t ids_a[200], ids_b[200];
            for (int i = 0; i < n_a; i++)
                ids_a[i] = 100 + i;
            for (int i = 0; i < n_b; i++)
                ids_b[i] = i < 3 * bs ? ids_a[i] : 5000 + i;
            /* a spacer sequence holds the first two blocks, so tables are not the identity */
            static seq_shadow x;
            memset(&x, 0, sizeof x);
            int32_t ids_x[40];
            for (int i = 0; i < bs + 1; i++)
                ids_x[i] = 9000 + i;
            if (kvb_seq_create(pool, NULL, 0, &x.id, NULL, &err)) fail_msg("%s", err.msg);
            seq_append(be, kv, pool, &x, ids_x, bs + 1, n_layer, kv_dim, bs, &n_copies);
            int32_t nc = -1;
            if (kvb_seq_create(pool, ids_a, n_a - 1, &a.id, &nc, &err)) fail_msg("%s", err.msg);
            assert_int_equal(nc, 0);
            seq_append(be, kv, pool, &a, ids_a, n_a, n_layer, kv_dim, bs, &n_copies);
            if (kvb_seq_free(pool, a.id, &err)) fail_msg("%s", err.msg); /* blocks stay cached */
            /* b adopts 3 blocks and computes the rest */
            if (kvb_seq_create(pool, ids_b, n_b - 1, &b.id, &nc, &err)) fail_msg("%s", err.msg);
            assert_int_equal(nc, 3 * bs);
            memcpy(b.toks, ids_b, (size_t)nc * sizeof ids_b[0]);
            b.len = nc;
            kvb_stats st;
            kvb_get_stats(pool, &st);
            assert_int_equal(st.n_hit_blocks, 3);
            seq_append(be, kv, pool, &b, ids_b + nc, n_b - nc, n_layer, kv_dim, bs, &n_copies);
            check_readback(be, kv, pool, &b, n_layer, kv_dim, type);
            const int32_t *table = NULL;
            int32_t n_table = 0, len = 0;
            if (kvb_seq_table(pool, b.id, &table, &n_table, &len, &err)) fail_msg("%s", err.msg);
            assert_int_equal(len, n_b);
            assert_int_not_equal(table[0], 0);
            uint64_t rng = 77;
            /* its prompt chunk past the hit, and its last token alone */
            for (int c = 0; c < 2; c++) {
                int pos0 = c ? n_b - 1 : nc, n_tok = n_b - pos0;
                float *q = random_q(&rng, n_tok, n_head, hd);
                for (int l = 0; l < n_layer; l++) {
                    float *want = contiguous_attn(be, type, n_layer, l, ids_b, pos0, n_tok, n_head,
                                                  n_head_kv, hd, q);
                    float *got = paged_attn(be, kv, l, table, n_table, bs, pos0, n_tok, n_head,
                                            n_head_kv, hd, q);
                    assert_same(got, want, (size_t)n_tok * n_head * hd, "prefix-hit attention");
                    free(want);
                    free(got);
                }
                free(q);
            }
            be->ops->kv_free(be, kv);
            kvb_pool_free(pool);
        }
    be->ops->destroy(be);
}

/* ---- misuse: errors, never a crash or a write outside the cache ---- */

static void test_errors(void **state)
{
    (void)state;
    const int bs = 16, n_blocks = 4, n_head = 2, n_head_kv = 1, hd = 8, kv_dim = 8;
    backend *be = make_backend(1);
    be_kv *kv = make_kv(be, 2, n_blocks * bs, kv_dim, FORGE_KV_F32);
    forge_err err = {0};
    float zeros[4 * 8] = {0};
    be_buf *k = upload(be, zeros, 4 * kv_dim), *q = upload(be, zeros, 2 * n_head * hd), *o = NULL;
    assert_int_equal(be->ops->buf_create(be, 2 * n_head * hd, &o, &err), 0);
    int32_t bad_rows[2] = {0, n_blocks * bs};
    assert_int_not_equal(be->ops->kv_store(be, kv, 0, k, k, bad_rows, 2, &err), 0);
    assert_non_null(strstr(err.msg, "row 64"));
    int32_t rows[2] = {0, 1};
    assert_int_not_equal(be->ops->kv_store(be, kv, 2, k, k, rows, 2, &err), 0); /* layer */
    assert_int_equal(be->ops->kv_store(be, kv, 1, k, k, rows, 2, &err), 0);
    assert_int_not_equal(be->ops->kv_copy_block(be, kv, bs, 0, n_blocks, 3, &err), 0);
    assert_int_not_equal(be->ops->kv_copy_block(be, kv, bs, -1, 0, 3, &err), 0);
    assert_int_not_equal(be->ops->kv_copy_block(be, kv, bs, 0, 1, bs + 1, &err), 0);
    assert_int_not_equal(be->ops->kv_copy_block(be, kv, 24, 0, 1, 3, &err), 0); /* 64 % 24 */
    assert_int_equal(be->ops->kv_copy_block(be, kv, bs, 0, 1, 3, &err), 0);
    /* batches whose tables or slots leave the cache: refused, nothing read or written */
    int32_t pos[40], slot[40], seq_start[2], n_tab[1];
    int32_t short_table[2] = {0, 0}, bad_table[2] = {0, n_blocks}, neg_table[2] = {-1, 0};
    be_batch bt = seq_batch(short_table, 2, bs, 20, 2, pos, slot, seq_start, n_tab);
    n_tab[0] = 1; /* positions 20, 21 need 2 blocks */
    be_attn a = {0, n_head, n_head_kv, hd, 0.5f, &bt, 0.0f, 0};
    assert_int_not_equal(be->ops->attention(be, o, q, k, k, kv, &a, &err), 0);
    assert_non_null(strstr(err.msg, "a table of 1 blocks"));
    bt = seq_batch(bad_table, 2, bs, 20, 2, pos, slot, seq_start, n_tab);
    assert_int_not_equal(be->ops->attention(be, o, q, k, k, kv, &a, &err), 0);
    assert_non_null(strstr(err.msg, "block 4"));
    bt = seq_batch(neg_table, 2, bs, 20, 2, pos, slot, seq_start, n_tab);
    assert_int_not_equal(be->ops->attention(be, o, q, k, k, kv, &a, &err), 0);
    int32_t table[4] = {1, 0, 2, 3};
    bt = seq_batch(table, 2, bs, 20, 2, pos, slot, seq_start, n_tab);
    be_attn wrong = {0, n_head, 2, hd, 0.5f, &bt, 0.0f, 0}; /* kv_dim 16 != 8 */
    assert_int_not_equal(be->ops->attention(be, o, q, k, k, kv, &wrong, &err), 0);
    be_attn no_batch = {0, n_head, n_head_kv, hd, 0.5f, NULL, 0.0f, 0};
    assert_int_not_equal(be->ops->attention(be, o, q, k, k, kv, &no_batch, &err), 0);
    bt = seq_batch(table, 4, bs, 0, 40, pos, slot, seq_start, n_tab); /* q holds 2 tokens */
    assert_int_not_equal(be->ops->attention(be, o, q, k, k, kv, &a, &err), 0);
    float kr[8], vr[8];
    assert_int_not_equal(be->ops->kv_read(be, kv, 0, bad_rows, 2, kr, vr, &err), 0);
    be->ops->buf_free(be, k);
    be->ops->buf_free(be, q);
    be->ops->buf_free(be, o);
    be->ops->kv_free(be, kv);
    be->ops->destroy(be);
}

/* A Q8_0 cache: each value read back within half a quantization step of the F32 one (scale
 * amax/127 per 32 values), copy-on-write moves the blocks exactly, attention close to the F32
 * cache's (the query is quantized too), and head dims that are not whole blocks are refused. */
static void test_q8_cache(void **state)
{
    (void)state;
    const int bs = 16, n_blocks = 6, n_head = 8, n_head_kv = 2, hd = 64, kv_dim = n_head_kv * hd;
    const int n_ctx = n_blocks * bs, len = 70, n_tok = 5, pos0 = len - n_tok;
    backend *be = make_backend(2);
    forge_err err = {0};
    be_kv *q8 = make_kv(be, 1, n_ctx, kv_dim, FORGE_KV_Q8_0),
          *f32 = make_kv(be, 1, n_ctx, kv_dim, FORGE_KV_F32);
    int32_t toks[70], table[6] = {3, 0, 5, 1, 4, 2}, rows[70];
    uint64_t rng = 77;
    for (int i = 0; i < len; i++) {
        toks[i] = (int32_t)(tu_rand_u64(&rng) % 32000);
        rows[i] = table[i / bs] * bs + i % bs;
    }
    store(be, q8, 0, toks, 0, len, kv_dim, rows);
    store(be, f32, 0, toks, 0, len, kv_dim, rows);
    float *k8 = malloc((size_t)len * kv_dim * 4), *v8 = malloc((size_t)len * kv_dim * 4);
    float *k32 = malloc((size_t)len * kv_dim * 4), *v32 = malloc((size_t)len * kv_dim * 4);
    assert_true(k8 && v8 && k32 && v32);
    assert_int_equal(be->ops->kv_read(be, q8, 0, rows, len, k8, v8, &err), 0);
    assert_int_equal(be->ops->kv_read(be, f32, 0, rows, len, k32, v32, &err), 0);
    for (int r = 0; r < len; r++)
        for (int b = 0; b < kv_dim / 32; b++) {
            float amax = 0.0f;
            for (int i = 0; i < 32; i++)
                amax = fmaxf(amax, fabsf(k32[(size_t)r * kv_dim + b * 32 + i]));
            for (int i = 0; i < 32; i++) {
                size_t x = (size_t)r * kv_dim + b * 32 + i;
                assert_true(fabsf(k8[x] - k32[x]) <= amax / 127.0f * 0.57f + 1e-6f /* half a step + the fp16 scale */);
            }
        }
    /* copy-on-write of a Q8_0 block: the rows arrive unchanged */
    assert_int_equal(be->ops->kv_copy_block(be, q8, bs, 0, 2, 7, &err), 0);
    float kc[2][128], vc[2][128];
    int32_t from = 0 * bs + 6, to = 2 * bs + 6;
    assert_int_equal(be->ops->kv_read(be, q8, 0, &from, 1, kc[0], vc[0], &err), 0);
    assert_int_equal(be->ops->kv_read(be, q8, 0, &to, 1, kc[1], vc[1], &err), 0);
    assert_memory_equal(kc[0], kc[1], sizeof kc[0]);
    assert_memory_equal(vc[0], vc[1], sizeof vc[0]);
    /* attention: close to the F32 cache's */
    float *q = random_q(&rng, n_tok, n_head, hd);
    store(be, q8, 0, toks, 0, len, kv_dim, rows); /* block 2 again */
    float *got = paged_attn(be, q8, 0, table, 5, bs, pos0, n_tok, n_head, n_head_kv, hd, q);
    float *want = paged_attn(be, f32, 0, table, 5, bs, pos0, n_tok, n_head, n_head_kv, hd, q);
    double num = 0, den = 0;
    for (int i = 0; i < n_tok * n_head * hd; i++) {
        assert_true(isfinite(got[i]));
        num += ((double)got[i] - want[i]) * ((double)got[i] - want[i]);
        den += (double)want[i] * want[i];
    }
    print_message("q8_0 cache attention NMSE vs f32: %.3g\n", num / den);
    assert_true(num / den < 1e-3);
    assert_true(num > 0); /* it is quantized */
    /* heads that are not whole Q8_0 blocks: refused, naming the size */
    be_kv *bad = NULL;
    assert_int_equal(be->ops->kv_create(be, 1, n_ctx, 40, FORGE_KV_Q8_0, &bad, &err),
                     FORGE_E_UNSUPPORTED);
    assert_non_null(strstr(err.msg, "40"));
    assert_null(bad);
    free(q);
    free(got);
    free(want);
    free(k8);
    free(v8);
    free(k32);
    free(v32);
    be->ops->kv_free(be, q8);
    be->ops->kv_free(be, f32);
    be->ops->destroy(be);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_paged_equals_contiguous),
        cmocka_unit_test(test_sentinel_is_live),
        cmocka_unit_test(test_kv_blocks_sequences),
        cmocka_unit_test(test_prefix_hit),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_q8_cache),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
