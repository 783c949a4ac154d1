/* test_kv_blocks.c - the KV-cache block manager (src/engine/kv_blocks.h): block tables, fork and
 * copy-on-write, prefix caching (exact hits, collisions with a weak hash), LRU eviction order,
 * admission, out-of-blocks errors that change nothing, API misuse, and a long random run of
 * operations against a shadow model: a simulated K/V store written through the reported rows and
 * copies, the tokens every block was computed under, and reference counts recounted from the
 * block tables. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/kv_blocks.h"
#include "testutil.h"

/* ---- helpers ---- */

static kvb_pool *make_pool(int32_t n_blocks, int32_t bs, int32_t max_seqs, bool cache,
                           kvb_hash_fn hash)
{
    kvb_params p = kvb_default_params();
    p.n_blocks = n_blocks;
    p.block_size = bs;
    p.max_seqs = max_seqs;
    p.prefix_cache = cache;
    p.hash = hash;
    kvb_pool *pool = NULL;
    forge_err err = {0};
    if (kvb_pool_create(&p, &pool, &err)) fail_msg("kvb_pool_create: %s", err.msg);
    return pool;
}

static void check_ok(const kvb_pool *pool)
{
    forge_err err = {0};
    if (kvb_check(pool, &err)) fail_msg("kvb_check: %s", err.msg);
}

static int32_t new_seq(kvb_pool *pool, const int32_t *ids, int32_t n_ids, int32_t *n_cached)
{
    int32_t seq = -1, nc = -1;
    forge_err err = {0};
    if (kvb_seq_create(pool, ids, n_ids, &seq, &nc, &err)) fail_msg("seq_create: %s", err.msg);
    assert_true(seq > 0);
    if (n_cached) *n_cached = nc;
    return seq;
}

/* Append n tokens and report them computed (a step that ran). */
static kvb_copy append(kvb_pool *pool, int32_t seq, const int32_t *ids, int32_t n)
{
    kvb_copy cow;
    forge_err err = {0};
    int32_t len = -1;
    if (kvb_seq_append(pool, seq, ids, n, &cow, &err)) fail_msg("append: %s", err.msg);
    if (kvb_seq_table(pool, seq, NULL, NULL, &len, &err)) fail_msg("seq_table: %s", err.msg);
    if (kvb_seq_computed(pool, seq, len, &err)) fail_msg("seq_computed: %s", err.msg);
    return cow;
}

static const int32_t *table_of(const kvb_pool *pool, int32_t seq, int32_t *n_table, int32_t *len)
{
    const int32_t *t = NULL;
    forge_err err = {0};
    if (kvb_seq_table(pool, seq, &t, n_table, len, &err)) fail_msg("seq_table: %s", err.msg);
    return t;
}

static void iota(int32_t *v, int32_t n, int32_t start)
{
    for (int32_t i = 0; i < n; i++)
        v[i] = start + i;
}

/* ---- block tables ---- */

static void test_append_and_rows(void **state)
{
    (void)state;
    kvb_pool *pool = make_pool(8, 16, 4, true, NULL);
    int32_t ids[40], rows[40];
    iota(ids, 40, 100);
    int32_t s = new_seq(pool, NULL, 0, NULL);
    kvb_copy cow = append(pool, s, ids, 17); /* crosses one boundary: 2 blocks */
    assert_int_equal(cow.src, -1);
    assert_int_equal(cow.n_rows, 0);
    int32_t n_table, len;
    const int32_t *t = table_of(pool, s, &n_table, &len);
    assert_int_equal(n_table, 2);
    assert_int_equal(len, 17);
    append(pool, s, ids + 17, 23);
    t = table_of(pool, s, &n_table, &len);
    assert_int_equal(n_table, 3);
    assert_int_equal(len, 40);
    /* blocks come from the free list in id order; rows follow the table */
    assert_int_equal(t[0], 0);
    assert_int_equal(t[1], 1);
    assert_int_equal(t[2], 2);
    forge_err err = {0};
    assert_int_equal(kvb_seq_rows(pool, s, 0, 40, rows, &err), FORGE_OK);
    for (int32_t p = 0; p < 40; p++) {
        assert_int_equal(rows[p], t[p / 16] * 16 + p % 16);
        assert_int_equal(kvb_block_tokens(pool, t[p / 16])[p % 16], ids[p]);
    }
    kvb_stats st;
    kvb_get_stats(pool, &st);
    assert_int_equal(st.n_used, 3);
    assert_int_equal(st.n_free, 5);
    assert_int_equal(st.n_seqs, 1);
    /* truncate into the second block: the third is released */
    assert_int_equal(kvb_seq_truncate(pool, s, 20, &err), FORGE_OK);
    t = table_of(pool, s, &n_table, &len);
    assert_int_equal(n_table, 2);
    assert_int_equal(len, 20);
    check_ok(pool);
    assert_int_equal(kvb_seq_free(pool, s, &err), FORGE_OK);
    kvb_get_stats(pool, &st);
    assert_int_equal(st.n_used, 0);
    assert_int_equal(st.n_seqs, 0);
    assert_int_equal(st.n_free + st.n_cached, 8);
    check_ok(pool);
    kvb_pool_free(pool);
}

/* ---- fork and copy-on-write ---- */

static void test_fork_cow(void **state)
{
    (void)state;
    kvb_pool *pool = make_pool(8, 16, 4, true, NULL);
    int32_t ids[64];
    iota(ids, 64, 1);
    int32_t a = new_seq(pool, NULL, 0, NULL);
    append(pool, a, ids, 20); /* one full block + 4 rows */
    int32_t b = -1, n_table, len;
    forge_err err = {0};
    assert_int_equal(kvb_seq_fork(pool, a, &b, &err), FORGE_OK);
    const int32_t *ta = table_of(pool, a, &n_table, &len);
    int32_t a0 = ta[0], a1 = ta[1];
    assert_int_equal(kvb_block_ref(pool, a0), 2);
    assert_int_equal(kvb_block_ref(pool, a1), 2);
    /* a writes into the shared partial block: it gets a fresh block, 4 rows to copy */
    int32_t x = 777;
    kvb_copy cow = append(pool, a, &x, 1);
    ta = table_of(pool, a, &n_table, &len);
    assert_int_equal(cow.src, a1);
    assert_int_equal(cow.dst, ta[1]);
    assert_int_equal(cow.n_rows, 4);
    assert_int_not_equal(ta[1], a1);
    assert_int_equal(ta[0], a0); /* the full block stays shared */
    assert_int_equal(kvb_block_ref(pool, a0), 2);
    assert_int_equal(kvb_block_ref(pool, a1), 1);
    assert_int_equal(kvb_block_ref(pool, ta[1]), 1);
    for (int i = 0; i < 4; i++)
        assert_int_equal(kvb_block_tokens(pool, ta[1])[i], ids[16 + i]);
    assert_int_equal(kvb_block_tokens(pool, ta[1])[4], 777);
    /* b is now the only holder of a1: it writes in place, no copy */
    int32_t y = 888;
    cow = append(pool, b, &y, 1);
    assert_int_equal(cow.src, -1);
    const int32_t *tb = table_of(pool, b, &n_table, &len);
    assert_int_equal(tb[1], a1);
    assert_int_equal(kvb_block_tokens(pool, a1)[4], 888);
    /* a fork at a block boundary shares only full blocks: no copy on the next write */
    int32_t c = -1;
    assert_int_equal(kvb_seq_truncate(pool, b, 16, &err), FORGE_OK);
    assert_int_equal(kvb_seq_fork(pool, b, &c, &err), FORGE_OK);
    cow = append(pool, c, &y, 1);
    assert_int_equal(cow.src, -1);
    assert_int_equal(kvb_block_ref(pool, a0), 3);
    check_ok(pool);
    kvb_pool_free(pool);
}

/* A cached block is immutable: a truncation makes it partial, the next write copies it and the
 * cache keeps the original. */
static void test_cow_of_cached_block(void **state)
{
    (void)state;
    kvb_pool *pool = make_pool(8, 16, 4, true, NULL);
    int32_t ids[32], n_cached, n_table, len;
    iota(ids, 32, 50);
    int32_t a = new_seq(pool, NULL, 0, NULL);
    append(pool, a, ids, 32);
    const int32_t *t = table_of(pool, a, &n_table, &len);
    int32_t b0 = t[0], b1 = t[1];
    forge_err err = {0};
    assert_int_equal(kvb_seq_truncate(pool, a, 20, &err), FORGE_OK);
    int32_t z = -5;
    kvb_copy cow = append(pool, a, &z, 1);
    t = table_of(pool, a, &n_table, &len);
    assert_int_equal(cow.src, b1);
    assert_int_equal(cow.n_rows, 4);
    assert_int_equal(cow.dst, t[1]);
    assert_int_equal(kvb_block_state_of(pool, b1), KVB_BLOCK_CACHED);
    assert_int_equal(kvb_block_tokens(pool, b1)[4], ids[20]); /* untouched */
    /* the original 32 tokens still hit both blocks */
    int32_t s2 = new_seq(pool, ids, 32, &n_cached);
    assert_int_equal(n_cached, 32);
    t = table_of(pool, s2, &n_table, &len);
    assert_int_equal(t[0], b0);
    assert_int_equal(t[1], b1);
    assert_int_equal(len, 32);
    check_ok(pool);
    kvb_pool_free(pool);
}

/* ---- prefix caching ---- */

/* Blocks enter the cache when computed, not when appended: a failed step leaves nothing. */
static void test_cache_after_computed(void **state)
{
    (void)state;
    kvb_pool *pool = make_pool(8, 16, 4, true, NULL);
    int32_t ids[48], n_cached, n_table, len;
    iota(ids, 48, 7);
    forge_err err = {0};
    kvb_copy cow;
    int32_t a = new_seq(pool, NULL, 0, NULL);
    assert_int_equal(kvb_seq_append(pool, a, ids, 40, &cow, &err), FORGE_OK);
    assert_int_equal(kvb_seq_n_computed(pool, a), 0);
    int32_t b = new_seq(pool, ids, 48, &n_cached);
    assert_int_equal(n_cached, 0); /* reserved, not computed */
    /* a chunk of 20 computed: block 0 enters the cache, block 1 not yet */
    assert_int_equal(kvb_seq_computed(pool, a, 20, &err), FORGE_OK);
    assert_int_equal(kvb_seq_free(pool, b, &err), FORGE_OK);
    b = new_seq(pool, ids, 48, &n_cached);
    assert_int_equal(n_cached, 16);
    /* the step for 20..39 fails: back to the computed length; block 1 never cached */
    assert_int_equal(kvb_seq_truncate(pool, a, kvb_seq_n_computed(pool, a), &err), FORGE_OK);
    table_of(pool, a, &n_table, &len);
    assert_int_equal(len, 20);
    assert_int_equal(kvb_seq_append(pool, a, ids + 20, 12, &cow, &err), FORGE_OK);
    assert_int_equal(cow.src, -1); /* block 1 is a's alone and not cached: written in place */
    assert_int_equal(kvb_seq_computed(pool, a, 32, &err), FORGE_OK);
    int32_t c = new_seq(pool, ids, 48, &n_cached);
    assert_int_equal(n_cached, 32);
    /* the computed length only grows, up to the length; truncation cuts it */
    assert_int_equal(kvb_seq_computed(pool, a, 31, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_seq_computed(pool, a, 33, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_seq_truncate(pool, a, 10, &err), FORGE_OK);
    assert_int_equal(kvb_seq_n_computed(pool, a), 10);
    int32_t d = -1;
    assert_int_equal(kvb_seq_fork(pool, c, &d, &err), FORGE_OK);
    assert_int_equal(kvb_seq_n_computed(pool, d), 32);
    assert_int_equal(kvb_seq_preempt(pool, d, NULL, &err), FORGE_OK);
    assert_int_equal(kvb_seq_n_computed(pool, d), 0);
    assert_int_equal(kvb_seq_free(pool, d, &err), FORGE_OK);
    assert_int_equal(kvb_seq_n_computed(pool, d), -1);
    assert_int_equal(kvb_seq_computed(pool, d, 0, &err), FORGE_E_INVALID);
    check_ok(pool);
    kvb_pool_free(pool);
}

static void test_prefix_hit(void **state)
{
    (void)state;
    kvb_pool *pool = make_pool(16, 16, 8, true, NULL);
    int32_t ids[64], other[64], n_cached, n_table, len;
    iota(ids, 64, 1000);
    int32_t a = new_seq(pool, ids, 50, &n_cached);
    assert_int_equal(n_cached, 0); /* empty cache */
    append(pool, a, ids, 50);      /* 3 full blocks + 2 rows */
    const int32_t *ta = table_of(pool, a, &n_table, &len);

    /* same 50 ids: the 3 full blocks, not the partial one */
    int32_t b = new_seq(pool, ids, 50, &n_cached);
    assert_int_equal(n_cached, 48);
    const int32_t *tb = table_of(pool, b, &n_table, &len);
    assert_int_equal(n_table, 3);
    assert_int_equal(len, 48);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(tb[i], ta[i]);
        assert_int_equal(kvb_block_ref(pool, ta[i]), 2);
    }
    /* only whole blocks within n_ids: 47 ids cover 2 */
    int32_t c = new_seq(pool, ids, 47, &n_cached);
    assert_int_equal(n_cached, 32);
    /* a divergence in block 2 stops the hit there; in block 0, no hit */
    memcpy(other, ids, sizeof other);
    other[40] = -1;
    int32_t d = new_seq(pool, other, 64, &n_cached);
    assert_int_equal(n_cached, 32);
    other[3] = -1;
    int32_t e = new_seq(pool, other, 64, &n_cached);
    assert_int_equal(n_cached, 0);
    /* same tokens in block 1 after another block 0: no hit (the chain differs) */
    memcpy(other, ids, sizeof other);
    other[0] = 7;
    int32_t f = new_seq(pool, other, 64, &n_cached);
    assert_int_equal(n_cached, 0);
    forge_err err = {0};
    int32_t all[] = {a, b, c, d, e, f};
    for (int i = 0; i < 6; i++)
        assert_int_equal(kvb_seq_free(pool, all[i], &err), FORGE_OK);
    /* freed full blocks stay cached; reuse takes them off the LRU */
    kvb_stats st;
    kvb_get_stats(pool, &st);
    assert_int_equal(st.n_cached, 3);
    assert_int_equal(kvb_block_state_of(pool, ta[0]), KVB_BLOCK_CACHED);
    int32_t g = new_seq(pool, ids, 64, &n_cached);
    assert_int_equal(n_cached, 48);
    kvb_get_stats(pool, &st);
    assert_int_equal(st.n_cached, 0);
    assert_int_equal(st.n_used, 3);
    (void)g;
    check_ok(pool);
    kvb_pool_free(pool);

    /* with the cache off nothing is reused */
    pool = make_pool(16, 16, 8, false, NULL);
    a = new_seq(pool, NULL, 0, NULL);
    append(pool, a, ids, 50);
    b = new_seq(pool, ids, 50, &n_cached);
    assert_int_equal(n_cached, 0);
    assert_int_equal(kvb_seq_free(pool, a, &err), FORGE_OK);
    kvb_get_stats(pool, &st);
    assert_int_equal(st.n_cached, 0);
    assert_int_equal(st.n_free, 16);
    check_ok(pool);
    kvb_pool_free(pool);
}

/* Two sequences that computed the same prefix: the second one's blocks are twins of the cached
 * ones, and what it appends after them is still found through the cached chain. */
static void test_prefix_twins(void **state)
{
    (void)state;
    kvb_pool *pool = make_pool(16, 16, 8, true, NULL);
    int32_t ids[48], n_cached, n_table, len;
    iota(ids, 48, 3);
    int32_t a = new_seq(pool, NULL, 0, NULL), b = new_seq(pool, NULL, 0, NULL);
    append(pool, a, ids, 16);
    append(pool, b, ids, 48); /* block 0 is a twin of a's, blocks 1-2 are new */
    int32_t c = new_seq(pool, ids, 48, &n_cached);
    assert_int_equal(n_cached, 48);
    const int32_t *ta = table_of(pool, a, &n_table, &len);
    const int32_t *tb = table_of(pool, b, &n_table, &len);
    const int32_t *tc = table_of(pool, c, &n_table, &len);
    assert_int_equal(tc[0], ta[0]);
    assert_int_equal(tc[1], tb[1]);
    assert_int_equal(tc[2], tb[2]);
    check_ok(pool);
    kvb_pool_free(pool);
}

/* A hash that collides for every block: hits must still be exact. */
static uint64_t hash_const(uint64_t parent, const int32_t *tokens, int32_t n)
{
    (void)parent;
    (void)tokens;
    (void)n;
    return 42;
}

/* Collides often, and ignores the parent: a chain with the same last block collides. */
static uint64_t hash_weak(uint64_t parent, const int32_t *tokens, int32_t n)
{
    (void)parent;
    return (uint64_t)(tokens[0] & 1) + (uint64_t)(tokens[n - 1] & 1);
}

static void test_hash_collisions(void **state)
{
    (void)state;
    kvb_hash_fn fns[] = {hash_const, hash_weak};
    for (int k = 0; k < 2; k++) {
        kvb_pool *pool = make_pool(32, 16, 8, true, fns[k]);
        int32_t p[32], q[32], n_cached, n_table, len;
        for (int i = 0; i < 32; i++)
            p[i] = i % 2;
        memcpy(q, p, sizeof q);
        q[5] = 1 - q[5]; /* q's block 0 differs, block 1 equal */
        int32_t a = new_seq(pool, NULL, 0, NULL);
        append(pool, a, p, 32);
        int32_t b = new_seq(pool, q, 32, &n_cached);
        assert_int_equal(n_cached,
                         0); /* block 0 collides but differs; block 1 has another parent */
        append(pool, b, q, 32);
        const int32_t *ta = table_of(pool, a, &n_table, &len);
        const int32_t *tb = table_of(pool, b, &n_table, &len);
        assert_int_not_equal(ta[0], tb[0]);
        assert_int_not_equal(ta[1], tb[1]);
        /* each prompt finds its own chain */
        int32_t c = new_seq(pool, q, 32, &n_cached);
        assert_int_equal(n_cached, 32);
        const int32_t *tc = table_of(pool, c, &n_table, &len);
        assert_int_equal(tc[0], tb[0]);
        assert_int_equal(tc[1], tb[1]);
        int32_t d = new_seq(pool, p, 32, &n_cached);
        assert_int_equal(n_cached, 32);
        const int32_t *td = table_of(pool, d, &n_table, &len);
        assert_int_equal(td[0], ta[0]);
        assert_int_equal(td[1], ta[1]);
        check_ok(pool);
        kvb_pool_free(pool);
    }
}

/* A cached block whose parent (through a twin) was evicted and reused for other content: a
 * prompt that reaches the parent's id again with the new content must not hit the old child,
 * even with a hash that ignores the parent (the parent's incarnation is part of the key). */
static void test_evicted_parent_reused(void **state)
{
    (void)state;
    kvb_pool *pool = make_pool(4, 16, 4, true, hash_const);
    int32_t p[16], c[16], pq[48], n_cached, n_table, len;
    iota(p, 16, 10);
    iota(c, 16, 60);
    int32_t a = new_seq(pool, NULL, 0, NULL), b = new_seq(pool, NULL, 0, NULL);
    append(pool, a, p, 16); /* block 0: P, cached */
    append(pool, b, p, 16); /* block 1: twin of P */
    append(pool, b, c, 16); /* block 2: C, cached under parent block 0 */
    const int32_t *tb = table_of(pool, b, &n_table, &len);
    assert_int_equal(tb[0], 1);
    assert_int_equal(tb[1], 2);
    forge_err err = {0};
    assert_int_equal(kvb_seq_free(pool, a, &err), FORGE_OK); /* block 0 -> LRU */
    /* D = P' Q: block 3 from the free list, then block 0 evicted and refilled with Q */
    int32_t d = new_seq(pool, NULL, 0, NULL);
    iota(pq, 32, 500);
    append(pool, d, pq, 32);
    const int32_t *td = table_of(pool, d, &n_table, &len);
    assert_int_equal(td[0], 3);
    assert_int_equal(td[1], 0);
    /* P' Q C: P' and Q hit, C must not (its parent was P, not Q) */
    memcpy(pq + 32, c, sizeof c);
    int32_t e = new_seq(pool, pq, 48, &n_cached);
    assert_int_equal(n_cached, 32);
    /* P C: P itself was evicted; its live twin (block 1) is not indexed, so no hit at all (a
     * known limit: twins are not promoted when their cached original goes) */
    memcpy(pq, p, sizeof p);
    memcpy(pq + 16, c, sizeof c);
    int32_t f = new_seq(pool, pq, 32, &n_cached);
    assert_int_equal(n_cached, 0);
    (void)e;
    (void)f;
    check_ok(pool);
    kvb_pool_free(pool);
}

/* ---- LRU eviction ---- */

static void test_lru_order(void **state)
{
    (void)state;
    kvb_pool *pool = make_pool(4, 16, 8, true, NULL);
    int32_t x[16], y[16], z[16], w[64], n_cached, n_table, len;
    iota(x, 16, 100);
    iota(y, 16, 200);
    iota(z, 16, 300);
    iota(w, 64, 400);
    int32_t sx = new_seq(pool, NULL, 0, NULL), sy = new_seq(pool, NULL, 0, NULL),
            sz = new_seq(pool, NULL, 0, NULL);
    append(pool, sx, x, 16);
    append(pool, sy, y, 16);
    append(pool, sz, z, 16);
    int32_t bx = table_of(pool, sx, &n_table, &len)[0];
    int32_t by = table_of(pool, sy, &n_table, &len)[0];
    int32_t bz = table_of(pool, sz, &n_table, &len)[0];
    forge_err err = {0};
    /* released in the order x, z, y: that is the eviction order */
    assert_int_equal(kvb_seq_free(pool, sx, &err), FORGE_OK);
    assert_int_equal(kvb_seq_free(pool, sz, &err), FORGE_OK);
    assert_int_equal(kvb_seq_free(pool, sy, &err), FORGE_OK);
    assert_int_equal(kvb_num_available(pool), 4);
    kvb_stats st;
    /* the free block goes first: nothing is evicted */
    int32_t sw = new_seq(pool, NULL, 0, NULL);
    append(pool, sw, w, 16);
    kvb_get_stats(pool, &st);
    assert_int_equal(st.n_evictions, 0);
    assert_int_equal(st.n_cached, 3);
    /* then the least recently released: x */
    append(pool, sw, w + 16, 16);
    assert_int_equal(table_of(pool, sw, &n_table, &len)[1], bx);
    kvb_get_stats(pool, &st);
    assert_int_equal(st.n_evictions, 1);
    int32_t probe = new_seq(pool, x, 16, &n_cached);
    assert_int_equal(n_cached, 0); /* x is gone */
    assert_int_equal(kvb_seq_free(pool, probe, &err), FORGE_OK);
    /* reusing z takes it off the LRU: the next eviction takes y, not z */
    int32_t sz2 = new_seq(pool, z, 16, &n_cached);
    assert_int_equal(n_cached, 16);
    assert_int_equal(kvb_block_state_of(pool, bz), KVB_BLOCK_USED);
    append(pool, sw, w + 32, 16);
    assert_int_equal(table_of(pool, sw, &n_table, &len)[2], by);
    /* released again, z is the most recent: ... */
    assert_int_equal(kvb_seq_free(pool, sz2, &err), FORGE_OK);
    assert_int_equal(kvb_block_state_of(pool, bz), KVB_BLOCK_CACHED);
    check_ok(pool);
    kvb_pool_free(pool);

    /* a freed sequence is evicted tail first (its head is what a later prompt can reuse) */
    pool = make_pool(3, 16, 4, true, NULL);
    int32_t s = new_seq(pool, NULL, 0, NULL);
    append(pool, s, w, 48);
    const int32_t *t = table_of(pool, s, &n_table, &len);
    int32_t b0 = t[0], b2 = t[2];
    assert_int_equal(kvb_seq_free(pool, s, &err), FORGE_OK);
    s = new_seq(pool, NULL, 0, NULL);
    append(pool, s, x, 16);
    assert_int_equal(table_of(pool, s, &n_table, &len)[0], b2);
    assert_int_equal(kvb_block_state_of(pool, b0), KVB_BLOCK_CACHED);
    int32_t r = new_seq(pool, w, 48, &n_cached);
    assert_int_equal(n_cached, 32);
    (void)r;
    check_ok(pool);
    kvb_pool_free(pool);
}

/* ---- admission, preemption, out of blocks ---- */

typedef struct snapshot {
    kvb_stats st;
    int32_t state[64], ref[64];
    int32_t n_table, len, table[64];
} snapshot;

static void snap(const kvb_pool *pool, int32_t seq, snapshot *s)
{
    memset(s, 0, sizeof *s);
    kvb_get_stats(pool, &s->st);
    for (int32_t i = 0; i < s->st.n_blocks && i < 64; i++) {
        s->state[i] = kvb_block_state_of(pool, i);
        s->ref[i] = kvb_block_ref(pool, i);
    }
    const int32_t *t = table_of(pool, seq, &s->n_table, &s->len);
    memcpy(s->table, t, (size_t)s->n_table * sizeof *t);
}

static void test_out_of_blocks(void **state)
{
    (void)state;
    kvb_pool *pool = make_pool(4, 16, 4, true, NULL);
    int32_t ids[128], need;
    iota(ids, 128, 9);
    forge_err err = {0};
    bool ok;
    int32_t a = new_seq(pool, NULL, 0, NULL);
    append(pool, a, ids, 40); /* 3 blocks */
    assert_int_equal(kvb_num_available(pool), 1);
    assert_int_equal(kvb_seq_blocks_needed(pool, a, 24, &need, &err), FORGE_OK);
    assert_int_equal(need, 1);
    assert_int_equal(kvb_seq_blocks_needed(pool, a, 25, &need, &err), FORGE_OK);
    assert_int_equal(need, 2);
    assert_int_equal(kvb_seq_can_append(pool, a, 24, &ok, &err), FORGE_OK);
    assert_true(ok);
    assert_int_equal(kvb_seq_can_append(pool, a, 25, &ok, &err), FORGE_OK);
    assert_false(ok);

    snapshot before, after;
    snap(pool, a, &before);
    kvb_copy cow;
    int rc = kvb_seq_append(pool, a, ids + 40, 25, &cow, &err);
    assert_int_equal(rc, FORGE_E_RANGE);
    assert_non_null(strstr(err.msg, "out of KV blocks"));
    assert_int_equal(cow.src, -1);
    snap(pool, a, &after);
    assert_memory_equal(&before, &after, sizeof before);

    /* a copy-on-write that cannot get its block: nothing changes either */
    int32_t b = -1;
    append(pool, a, ids + 40, 16); /* 56 tokens, 4 blocks, last partial */
    assert_int_equal(kvb_seq_fork(pool, a, &b, &err), FORGE_OK);
    assert_int_equal(kvb_seq_blocks_needed(pool, a, 1, &need, &err), FORGE_OK);
    assert_int_equal(need, 1);
    snap(pool, a, &before);
    rc = kvb_seq_append(pool, a, ids + 56, 1, &cow, &err);
    assert_int_equal(rc, FORGE_E_RANGE);
    snap(pool, a, &after);
    assert_memory_equal(&before, &after, sizeof before);
    check_ok(pool);

    /* preemption frees the blocks; the full ones stay cached and the sequence resumes */
    int32_t n_rel = 0, n_cached = 0;
    assert_int_equal(kvb_seq_preempt(pool, b, &n_rel, &err), FORGE_OK);
    assert_int_equal(n_rel, 4);
    assert_int_equal(kvb_seq_append(pool, a, ids + 56, 1, &cow, &err), FORGE_OK);
    assert_int_equal(cow.src, -1); /* a is the only holder now */
    assert_int_equal(kvb_seq_preempt(pool, a, &n_rel, &err), FORGE_OK);
    kvb_stats st;
    kvb_get_stats(pool, &st);
    assert_int_equal(st.n_used, 0);
    assert_int_equal(st.n_cached, 3); /* the 3 full blocks */
    assert_int_equal(kvb_seq_adopt_prefix(pool, a, ids, 57, &n_cached, &err), FORGE_OK);
    assert_int_equal(n_cached, 48);
    int32_t len;
    table_of(pool, a, NULL, &len);
    assert_int_equal(len, 48);
    /* adopt needs an empty sequence */
    assert_int_equal(kvb_seq_adopt_prefix(pool, a, ids, 57, &n_cached, &err), FORGE_E_INVALID);

    /* admission: a prompt that hits the cache needs fewer blocks */
    assert_int_equal(kvb_seq_free(pool, a, &err), FORGE_OK);
    assert_int_equal(kvb_seq_free(pool, b, &err), FORGE_OK);
    int32_t hit = 0;
    assert_int_equal(kvb_can_admit(pool, ids, 48, 64, &ok, &hit, &err), FORGE_OK);
    assert_true(ok);
    assert_int_equal(hit, 48);
    int32_t other[64];
    iota(other, 64, -500);
    /* 4 blocks, no hit: fits by evicting every cached block */
    assert_int_equal(kvb_can_admit(pool, other, 64, 64, &ok, &hit, &err), FORGE_OK);
    assert_true(ok);
    assert_int_equal(hit, 0);
    assert_int_equal(kvb_can_admit(pool, other, 64, 65, &ok, &hit, &err), FORGE_E_RANGE);
    assert_non_null(strstr(err.msg, "never fit"));
    /* a hit on evictable blocks does not count them twice */
    int32_t s = new_seq(pool, NULL, 0, NULL);
    append(pool, s, other, 16); /* 1 block used, 3 cached (the old prefix) */
    assert_int_equal(kvb_can_admit(pool, ids, 48, 48, &ok, &hit, &err), FORGE_OK);
    assert_true(ok); /* all 3 from the cache */
    assert_int_equal(kvb_can_admit(pool, ids, 48, 49, &ok, &hit, &err), FORGE_OK);
    assert_false(ok); /* one more block: nothing left once the 3 hits are taken */
    check_ok(pool);
    kvb_pool_free(pool);
}

/* ---- API misuse ---- */

static void test_misuse(void **state)
{
    (void)state;
    forge_err err = {0};
    kvb_params p = kvb_default_params();
    kvb_pool *pool = NULL;
    assert_int_equal(kvb_pool_create(&p, &pool, &err), FORGE_E_INVALID); /* n_blocks 0 */
    assert_null(pool);
    assert_true(strlen(err.msg) > 0);
    p.n_blocks = 8;
    p.block_size = 8;
    assert_int_equal(kvb_pool_create(&p, &pool, &err), FORGE_E_INVALID);
    assert_non_null(strstr(err.msg, "16 or 32"));
    p.block_size = 32;
    p.n_blocks = INT32_MAX / 16;
    assert_int_equal(kvb_pool_create(&p, &pool, &err), FORGE_E_INVALID);
    p.n_blocks = 8;
    p.max_seqs = 0;
    assert_int_equal(kvb_pool_create(&p, &pool, &err), FORGE_E_INVALID);
    p.max_seqs = 70000;
    assert_int_equal(kvb_pool_create(&p, &pool, &err), FORGE_E_INVALID);
    p.max_seqs = 2;
    assert_int_equal(kvb_pool_create(NULL, &pool, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_pool_create(&p, NULL, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_pool_create(&p, &pool, NULL), FORGE_OK);
    kvb_pool_free(NULL);

    int32_t ids[8] = {1, 2, 3, 4, 5, 6, 7, 8}, s = -1, c = -1, nc, rows[8], need;
    kvb_copy cow;
    bool ok;
    /* NULL arguments */
    assert_int_equal(kvb_seq_create(NULL, ids, 8, &s, &nc, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_seq_create(pool, ids, 8, NULL, &nc, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_seq_create(pool, NULL, 8, &s, &nc, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_seq_create(pool, ids, -1, &s, &nc, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_seq_create(pool, NULL, 0, &s, NULL, &err), FORGE_OK);
    assert_int_equal(kvb_seq_append(pool, s, ids, 8, NULL, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_seq_append(pool, s, NULL, 8, &cow, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_seq_append(pool, s, ids, -1, &cow, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_seq_append(pool, s, NULL, 0, &cow, &err), FORGE_OK);
    assert_int_equal(kvb_seq_append(NULL, s, ids, 8, &cow, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_seq_append(pool, s, ids, 8, &cow, &err), FORGE_OK);
    assert_int_equal(kvb_seq_fork(pool, s, NULL, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_seq_rows(pool, s, 0, 8, NULL, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_seq_blocks_needed(pool, s, 1, NULL, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_seq_blocks_needed(pool, s, -1, &need, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_seq_can_append(pool, s, 1, NULL, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_can_admit(NULL, ids, 8, 8, &ok, NULL, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_can_admit(pool, ids, 8, 8, NULL, NULL, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_can_admit(pool, NULL, 8, 8, &ok, NULL, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_can_admit(pool, ids, 8, 7, &ok, NULL, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_check(NULL, &err), FORGE_E_INVALID);
    /* bad sizes */
    assert_int_equal(kvb_seq_truncate(pool, s, 9, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_seq_truncate(pool, s, -1, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_seq_rows(pool, s, 4, 5, rows, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_seq_rows(pool, s, -1, 1, rows, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_seq_rows(pool, s, 4, -1, rows, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_seq_rows(pool, s, 0, 8, rows, &err), FORGE_OK);
    /* unknown sequences */
    int32_t bad[] = {0, -1, 12345, s + 1, s + (1 << 16), INT32_MIN, INT32_MAX};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(kvb_seq_append(pool, bad[i], ids, 1, &cow, &err), FORGE_E_INVALID);
        assert_non_null(strstr(err.msg, "unknown or freed sequence"));
        assert_int_equal(kvb_seq_free(pool, bad[i], &err), FORGE_E_INVALID);
        assert_int_equal(kvb_seq_table(pool, bad[i], NULL, NULL, NULL, &err), FORGE_E_INVALID);
    }
    /* sequence slots run out: FORGE_E_RANGE, nothing changed */
    assert_int_equal(kvb_seq_fork(pool, s, &c, &err), FORGE_OK);
    int32_t d = -1;
    assert_int_equal(kvb_seq_fork(pool, s, &d, &err), FORGE_E_RANGE);
    assert_int_equal(d, -1);
    assert_int_equal(kvb_seq_create(pool, NULL, 0, &d, NULL, &err), FORGE_E_RANGE);
    assert_non_null(strstr(err.msg, "sequence slots"));
    assert_int_equal(kvb_block_ref(pool, 0), 2);
    /* a freed sequence is unknown to every call, also after its slot is reused */
    assert_int_equal(kvb_seq_free(pool, c, &err), FORGE_OK);
    assert_int_equal(kvb_seq_free(pool, c, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_seq_append(pool, c, ids, 1, &cow, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_seq_fork(pool, c, &d, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_seq_truncate(pool, c, 0, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_seq_preempt(pool, c, NULL, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_seq_adopt_prefix(pool, c, ids, 8, &nc, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_seq_rows(pool, c, 0, 1, rows, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_seq_can_append(pool, c, 1, &ok, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_seq_create(pool, NULL, 0, &d, NULL, &err), FORGE_OK);
    assert_int_not_equal(d, c); /* same slot, new id */
    assert_int_equal(kvb_seq_free(pool, c, &err), FORGE_E_INVALID);
    assert_int_equal(kvb_block_ref(pool, 0), 1);
    /* inspection of bad ids */
    assert_int_equal(kvb_block_ref(pool, -1), -1);
    assert_int_equal(kvb_block_ref(pool, 8), -1);
    assert_int_equal(kvb_block_state_of(NULL, 0), -1);
    assert_null(kvb_block_tokens(pool, 99));
    assert_int_equal(kvb_num_available(NULL), 0);
    kvb_stats st;
    kvb_get_stats(NULL, &st);
    assert_int_equal(st.n_blocks, 0);
    kvb_get_stats(pool, NULL);
    check_ok(pool);
    kvb_pool_free(pool);
}

/* ---- random operations against a shadow model ---- */

#define R_MAX_SEQS 12
#define R_MAX_LEN 400

typedef struct shadow_seq {
    int32_t id; /* 0: slot unused */
    int32_t n;
    int32_t tok[R_MAX_LEN];
} shadow_seq;

typedef struct rnd_env {
    kvb_pool *pool;
    int32_t n_blocks, bs;
    bool cache;
    int32_t *kv;      /* simulated K/V store: [n_blocks][bs], the token each row holds */
    uint64_t *origin; /* per block: hash of all the tokens it was computed under (full) */
    shadow_seq seqs[R_MAX_SEQS];
    uint64_t rng;
    int64_t n_hits, n_cows, n_oob, n_evict_seen, n_failed;
} rnd_env;

static uint64_t strong_hash(const int32_t *t, int32_t n)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (int32_t i = 0; i < n; i++) {
        h ^= (uint32_t)t[i];
        h *= 0x100000001b3ULL;
        h ^= h >> 29;
    }
    return h ^ (uint64_t)n;
}

static int32_t rnd(rnd_env *e, int32_t n)
{
    return (int32_t)(tu_rand_u64(&e->rng) % (uint64_t)n);
}

/* Prompts drawn from a few shared stems, so prefixes repeat and collide. */
static int32_t make_tokens(rnd_env *e, int32_t *out, int32_t n)
{
    int32_t stem = rnd(e, 4), stem_len = rnd(e, 3) * e->bs + rnd(e, 2) * rnd(e, e->bs);
    for (int32_t i = 0; i < n; i++)
        out[i] = i < stem_len ? (stem * 7 + i) % 5 : rnd(e, 3);
    return n;
}

/* Every live sequence reads its own tokens through its block table in the simulated store;
 * every full block was computed under exactly the tokens before it; the reference counts equal
 * the table references; the states and counts agree. */
static void verify(rnd_env *e)
{
    check_ok(e->pool);
    int32_t refs[512] = {0};
    int32_t n_live = 0;
    for (int k = 0; k < R_MAX_SEQS; k++) {
        shadow_seq *s = &e->seqs[k];
        if (!s->id) continue;
        n_live++;
        int32_t n_table, len;
        const int32_t *t = table_of(e->pool, s->id, &n_table, &len);
        assert_int_equal(len, s->n);
        assert_int_equal(n_table, (s->n + e->bs - 1) / e->bs);
        for (int32_t p = 0; p < s->n; p++)
            if (e->kv[t[p / e->bs] * e->bs + p % e->bs] != s->tok[p])
                fail_msg("sequence %d position %d: the store holds %d, expected %d (block %d)",
                         s->id, p, e->kv[t[p / e->bs] * e->bs + p % e->bs], s->tok[p],
                         t[p / e->bs]);
        for (int32_t i = 0; i < n_table; i++) {
            refs[t[i]]++;
            if ((i + 1) * e->bs <= s->n)
                assert_true(e->origin[t[i]] == strong_hash(s->tok, (i + 1) * e->bs));
        }
    }
    kvb_stats st;
    kvb_get_stats(e->pool, &st);
    int32_t n_used = 0, n_free = 0, n_cached = 0;
    for (int32_t b = 0; b < e->n_blocks; b++) {
        assert_int_equal(kvb_block_ref(e->pool, b), refs[b]);
        int stt = kvb_block_state_of(e->pool, b);
        if (refs[b] > 0)
            assert_int_equal(stt, KVB_BLOCK_USED);
        else
            assert_true(stt == KVB_BLOCK_FREE || (stt == KVB_BLOCK_CACHED && e->cache));
        n_used += stt == KVB_BLOCK_USED;
        n_free += stt == KVB_BLOCK_FREE;
        n_cached += stt == KVB_BLOCK_CACHED;
    }
    assert_int_equal(st.n_used, n_used);
    assert_int_equal(st.n_free, n_free);
    assert_int_equal(st.n_cached, n_cached);
    assert_int_equal(st.n_seqs, n_live);
    assert_int_equal(kvb_num_available(e->pool), n_free + n_cached);
}

/* Append through the API and mirror it in the store as a backend would: the copy first, then
 * the rows. Checks the copy is reported exactly when the written block is shared or cached, and
 * that a refused append changed nothing. Returns the status. */
static int do_append(rnd_env *e, shadow_seq *s, const int32_t *ids, int32_t n)
{
    int32_t n_table0, len0, need;
    const int32_t *t0 = table_of(e->pool, s->id, &n_table0, &len0);
    int32_t last0 = n_table0 ? t0[n_table0 - 1] : -1;
    int32_t ref_last = last0 >= 0 ? kvb_block_ref(e->pool, last0) : 0;
    forge_err err = {0};
    bool ok;
    assert_int_equal(kvb_seq_blocks_needed(e->pool, s->id, n, &need, &err), FORGE_OK);
    assert_int_equal(kvb_seq_can_append(e->pool, s->id, n, &ok, &err), FORGE_OK);
    kvb_stats before;
    kvb_get_stats(e->pool, &before);
    kvb_copy cow;
    int rc = kvb_seq_append(e->pool, s->id, ids, n, &cow, &err);
    assert_int_equal(rc == FORGE_OK, ok);
    if (rc) {
        assert_int_equal(rc, FORGE_E_RANGE);
        assert_true(need > before.n_free + before.n_cached || len0 + n > e->n_blocks * e->bs);
        kvb_stats after;
        kvb_get_stats(e->pool, &after);
        assert_memory_equal(&before, &after, sizeof before);
        int32_t n_table1, len1;
        table_of(e->pool, s->id, &n_table1, &len1);
        assert_int_equal(len1, len0);
        assert_int_equal(n_table1, n_table0);
        assert_int_equal(cow.src, -1);
        e->n_oob++;
        return rc;
    }
    int32_t n_table, len;
    const int32_t *t = table_of(e->pool, s->id, &n_table, &len);
    if (cow.src >= 0) {
        e->n_cows++;
        assert_int_equal(cow.src, last0);
        assert_int_equal(cow.dst, t[n_table0 - 1]);
        assert_int_equal(cow.n_rows, len0 % e->bs);
        assert_int_not_equal(cow.src, cow.dst);
        /* a copy of a block only we held: it was cached, and stays so */
        if (ref_last == 1)
            assert_int_equal(kvb_block_state_of(e->pool, cow.src), KVB_BLOCK_CACHED);
        else
            assert_int_equal(kvb_block_ref(e->pool, cow.src), ref_last - 1);
        for (int32_t r = 0; r < cow.n_rows; r++)
            e->kv[cow.dst * e->bs + r] = e->kv[cow.src * e->bs + r];
    } else if (n > 0 && len0 % e->bs != 0) {
        assert_true(ref_last == 1); /* a shared partial block is never written in place */
        /* written in place: the block was ours alone */
        assert_int_equal(t[n_table0 - 1], last0);
        assert_int_equal(ref_last, 1);
    }
    assert_int_equal(need, (n_table - n_table0) + (cow.src >= 0));
    int32_t rows[R_MAX_LEN];
    assert_int_equal(kvb_seq_rows(e->pool, s->id, len0, n, rows, &err), FORGE_OK);
    int mode = rnd(e, 20);
    if (mode == 0) {
        /* the step fails before the forward writes anything: back to the computed length */
        int32_t nc = kvb_seq_n_computed(e->pool, s->id);
        assert_int_equal(kvb_seq_truncate(e->pool, s->id, nc, &err), FORGE_OK);
        s->n = nc;
        e->n_failed++;
        return rc;
    }
    for (int32_t i = 0; i < n; i++) {
        e->kv[rows[i]] = ids[i];
        s->tok[s->n++] = ids[i];
    }
    /* blocks filled now were computed under the sequence's tokens */
    for (int32_t i = len0 / e->bs; i < s->n / e->bs; i++)
        e->origin[t[i]] = strong_hash(s->tok, (i + 1) * e->bs);
    if (mode > 3) /* else the engine reports it computed later (a later append or step) */
        assert_int_equal(kvb_seq_computed(e->pool, s->id, s->n, &err), FORGE_OK);
    kvb_stats after;
    kvb_get_stats(e->pool, &after);
    e->n_evict_seen += after.n_evictions - before.n_evictions;
    return rc;
}

/* A prefix hit: exactly the full blocks computed under the prompt's tokens. */
static void check_hit(rnd_env *e, shadow_seq *s, const int32_t *ids, int32_t n_cached)
{
    assert_int_equal(n_cached % e->bs, 0);
    int32_t n_table, len;
    const int32_t *t = table_of(e->pool, s->id, &n_table, &len);
    assert_int_equal(len, n_cached);
    for (int32_t i = 0; i < n_cached / e->bs; i++)
        assert_true(e->origin[t[i]] == strong_hash(ids, (i + 1) * e->bs));
    memcpy(s->tok, ids, (size_t)n_cached * sizeof *ids);
    s->n = n_cached;
    if (!e->cache) assert_int_equal(n_cached, 0);
    e->n_hits += n_cached > 0;
}

static shadow_seq *pick_live(rnd_env *e)
{
    int32_t start = rnd(e, R_MAX_SEQS);
    for (int k = 0; k < R_MAX_SEQS; k++) {
        shadow_seq *s = &e->seqs[(start + k) % R_MAX_SEQS];
        if (s->id) return s;
    }
    return NULL;
}

static shadow_seq *pick_free(rnd_env *e)
{
    for (int k = 0; k < R_MAX_SEQS; k++)
        if (!e->seqs[k].id) return &e->seqs[k];
    return NULL;
}

static void random_run(int32_t n_blocks, int32_t bs, bool cache, kvb_hash_fn hash, uint64_t seed,
                       int steps)
{
    rnd_env *e = calloc(1, sizeof *e);
    assert_non_null(e);
    e->n_blocks = n_blocks;
    e->bs = bs;
    e->cache = cache;
    e->rng = seed;
    e->pool = make_pool(n_blocks, bs, R_MAX_SEQS, cache, hash);
    e->kv = calloc((size_t)n_blocks * bs, sizeof *e->kv);
    e->origin = calloc((size_t)n_blocks, sizeof *e->origin);
    assert_true(n_blocks <= 512);
    assert_non_null(e->kv);
    assert_non_null(e->origin);
    forge_err err = {0};
    int32_t ids[R_MAX_LEN];
    for (int step = 0; step < steps; step++) {
        int op = rnd(e, 100);
        shadow_seq *s = pick_live(e);
        if (op < 25 || !s) { /* create with a prompt, check admission, append it */
            shadow_seq *f = pick_free(e);
            if (!f) continue;
            int32_t n = 1 + rnd(e, 5 * bs);
            make_tokens(e, ids, n);
            int32_t n_ids = n - 1, n_cached = -1, hit = -1;
            bool ok;
            assert_int_equal(kvb_can_admit(e->pool, ids, n_ids, n, &ok, &hit, &err), FORGE_OK);
            assert_int_equal(kvb_seq_create(e->pool, ids, n_ids, &f->id, &n_cached, &err),
                             FORGE_OK);
            assert_int_equal(hit, n_cached);
            check_hit(e, f, ids, n_cached);
            int rc = do_append(e, f, ids + n_cached, n - n_cached);
            assert_int_equal(rc == FORGE_OK, ok); /* admission is exact */
        } else if (op < 55) {                     /* decode-like or chunk append */
            int32_t n = rnd(e, 4) ? 1 + rnd(e, 3) : 1 + rnd(e, 2 * bs);
            if (s->n + n > R_MAX_LEN) continue;
            for (int32_t i = 0; i < n; i++)
                ids[i] = rnd(e, 3);
            do_append(e, s, ids, n);
        } else if (op < 65) { /* fork */
            shadow_seq *f = pick_free(e);
            if (!f) continue;
            assert_int_equal(kvb_seq_fork(e->pool, s->id, &f->id, &err), FORGE_OK);
            f->n = s->n;
            memcpy(f->tok, s->tok, (size_t)s->n * sizeof *s->tok);
        } else if (op < 73) { /* truncate */
            int32_t len = rnd(e, s->n + 1);
            assert_int_equal(kvb_seq_truncate(e->pool, s->id, len, &err), FORGE_OK);
            s->n = len;
        } else if (op < 83) { /* preempt, then resume by recompute */
            int32_t n = s->n, n_rel = -1, n_cached = -1;
            memcpy(ids, s->tok, (size_t)n * sizeof *ids);
            assert_int_equal(kvb_seq_preempt(e->pool, s->id, &n_rel, &err), FORGE_OK);
            assert_int_equal(n_rel, (n + bs - 1) / bs);
            s->n = 0;
            verify(e);
            if (rnd(e, 2)) {
                assert_int_equal(kvb_seq_adopt_prefix(e->pool, s->id, ids, n, &n_cached, &err),
                                 FORGE_OK);
                check_hit(e, s, ids, n_cached);
                do_append(e, s, ids + n_cached, n - n_cached);
            }
        } else { /* free */
            assert_int_equal(kvb_seq_free(e->pool, s->id, &err), FORGE_OK);
            kvb_copy cow;
            assert_int_equal(kvb_seq_append(e->pool, s->id, ids, 1, &cow, &err), FORGE_E_INVALID);
            s->id = 0;
            s->n = 0;
        }
        verify(e);
    }
    /* no leak: with every sequence freed, every block is free or cached */
    for (int k = 0; k < R_MAX_SEQS; k++)
        if (e->seqs[k].id) {
            assert_int_equal(kvb_seq_free(e->pool, e->seqs[k].id, &err), FORGE_OK);
            e->seqs[k].id = 0;
        }
    verify(e);
    kvb_stats st;
    kvb_get_stats(e->pool, &st);
    assert_int_equal(st.n_used, 0);
    assert_int_equal(st.n_free + st.n_cached, n_blocks);
    if (!cache) assert_int_equal(st.n_free, n_blocks);
    print_message("  %d blocks of %d, cache %d: %lld hits, %lld copies, %lld refused, %lld "
                  "evictions, %lld failed steps\n",
                  n_blocks, bs, (int)cache, (long long)e->n_hits, (long long)e->n_cows,
                  (long long)e->n_oob, (long long)e->n_evict_seen, (long long)e->n_failed);
    /* the run exercised what it claims to */
    assert_true(e->n_oob > 0);
    assert_true(e->n_cows > 0);
    assert_true(e->n_failed > 0);
    if (cache) {
        assert_true(e->n_hits > 0);
        assert_true(e->n_evict_seen > 0);
    }
    kvb_pool_free(e->pool);
    free(e->kv);
    free(e->origin);
    free(e);
}

static void test_random_default_hash(void **state)
{
    (void)state;
    random_run(24, 16, true, NULL, 0x1234567ULL, 20000);
    random_run(14, 32, true, NULL, 0xabcdefULL, 20000);
}

static void test_random_weak_hash(void **state)
{
    (void)state;
    random_run(24, 16, true, hash_const, 0x77ULL, 10000);
    random_run(20, 16, true, hash_weak, 0x99ULL, 10000);
}

static void test_random_no_cache(void **state)
{
    (void)state;
    random_run(32, 16, false, NULL, 0x5eedULL, 10000);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_append_and_rows),
        cmocka_unit_test(test_fork_cow),
        cmocka_unit_test(test_cow_of_cached_block),
        cmocka_unit_test(test_prefix_hit),
        cmocka_unit_test(test_prefix_twins),
        cmocka_unit_test(test_hash_collisions),
        cmocka_unit_test(test_evicted_parent_reused),
        cmocka_unit_test(test_cache_after_computed),
        cmocka_unit_test(test_lru_order),
        cmocka_unit_test(test_out_of_blocks),
        cmocka_unit_test(test_misuse),
        cmocka_unit_test(test_random_default_hash),
        cmocka_unit_test(test_random_weak_hash),
        cmocka_unit_test(test_random_no_cache),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
