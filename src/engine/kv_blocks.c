/* kv_blocks.c - the KV-cache block manager (kv_blocks.h): block metadata, free list, LRU of
 * cached blocks, the prefix-cache hash index, and the sequences' block tables. Owns no K/V
 * memory and calls no backend.
 *
 * Prefix-cache keys. A cached block is found by its chain hash, and a hit also compares its
 * tokens and its parent: the key of a block is (its tokens, the identity of the cached block
 * before it). An identity is (block id, incarnation): a block's `gen` is bumped every time it
 * is allocated and every time it becomes full, so a child registered under an old incarnation
 * of its parent can never match the parent's new content. By induction a hit on block i means
 * blocks 0..i hold exactly the tokens asked for, whatever the hash function does. A full block
 * whose key is already cached (two sequences computed the same prefix) stays out of the index;
 * its `canon` names the cached twin, so the blocks after it still chain to the indexed one. */
#include <stdlib.h>
#include <string.h>

#include "core/util.h"
#include "engine/kv_blocks.h"

#define KVB_MAX_SEQS 65535
#define KVB_SEQ_GEN_MAX 32767

enum { WHERE_NONE = 0, WHERE_FREE = 1, WHERE_LRU = 2 };

typedef struct kvb_block {
    int32_t ref;
    int32_t lru_prev, lru_next; /* links while on the LRU list (CACHED) */
    int32_t hnext;              /* next block in the hash bucket while indexed */
    uint8_t where;              /* WHERE_FREE / WHERE_LRU / WHERE_NONE (used) */
    bool hashed;                /* in the prefix-cache index (then immutable) */
    uint32_t gen;               /* incarnation (file comment) */
    uint64_t hash;              /* chain hash; valid while the block is full */
    int32_t parent_id;          /* identity of the parent at the last fill; -1: first block */
    uint32_t parent_gen;
    int32_t canon_id; /* identity this block stands for as a parent: itself, or its twin */
    uint32_t canon_gen;
} kvb_block;

typedef struct kvb_seq {
    int32_t *table;
    int32_t n_table, cap;
    int32_t len;
    int32_t n_computed; /* positions whose K/V the forward has written (kvb_seq_computed) */
    uint16_t gen;       /* 0: never used; the id is gen << 16 | slot */
    bool live;
} kvb_seq;

struct kvb_pool {
    kvb_params p;
    int32_t bs, n_blocks;
    kvb_block *blocks;
    int32_t *tokens; /* [n_blocks][bs] */
    int32_t *free_stack;
    int32_t n_free;
    int32_t lru_head, lru_tail, n_lru; /* head = least recently used */
    int32_t *buckets;                  /* hash index heads, -1 empty */
    uint64_t bucket_mask;
    kvb_seq *seqs;
    int32_t *free_slots;
    int32_t n_free_slots, n_live;
    int64_t n_evictions, n_hit_blocks;
};

/* ---- hashing ---- */

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static uint64_t default_hash(uint64_t parent, const int32_t *tokens, int32_t n)
{
    uint64_t h = mix64(parent ^ 0x9e3779b97f4a7c15ULL);
    for (int32_t i = 0; i < n; i++)
        h = mix64(h ^ ((uint64_t)(uint32_t)tokens[i] + 0x9e3779b97f4a7c15ULL * (uint64_t)(i + 1)));
    return h;
}

kvb_params kvb_default_params(void)
{
    kvb_params p = {0};
    p.n_blocks = 0;
    p.block_size = 16;
    p.max_seqs = 256;
    p.prefix_cache = true;
    p.hash = NULL;
    return p;
}

/* ---- pool ---- */

int kvb_pool_create(const kvb_params *p, kvb_pool **out, forge_err *err)
{
    int rc = FORGE_OK;
    kvb_pool *pool = NULL;
    if (out) *out = NULL;
    if (!p || !out) return forge_err_set(err, FORGE_E_INVALID, "kvb_pool_create: NULL argument");
    if (p->block_size != 16 && p->block_size != 32)
        return forge_err_set(err, FORGE_E_INVALID,
                             "KV block size %d is not supported (16 or 32 tokens)", p->block_size);
    if (p->n_blocks < 1 || (int64_t)p->n_blocks * p->block_size > INT32_MAX)
        return forge_err_set(err, FORGE_E_INVALID,
                             "KV block pool of %d blocks of %d tokens: need 1 block or more and "
                             "at most %d tokens in all",
                             p->n_blocks, p->block_size, INT32_MAX);
    if (p->max_seqs < 1 || p->max_seqs > KVB_MAX_SEQS)
        return forge_err_set(err, FORGE_E_INVALID, "KV block pool: %d sequences (1..%d)",
                             p->max_seqs, KVB_MAX_SEQS);

    pool = calloc(1, sizeof *pool);
    if (!pool) goto nomem;
    pool->p = *p;
    if (!pool->p.hash) pool->p.hash = default_hash;
    pool->bs = p->block_size;
    pool->n_blocks = p->n_blocks;
    uint64_t n_buckets = 16;
    while (n_buckets < 2 * (uint64_t)p->n_blocks)
        n_buckets *= 2;
    pool->bucket_mask = n_buckets - 1;
    pool->blocks = calloc((size_t)p->n_blocks, sizeof *pool->blocks);
    pool->tokens = calloc((size_t)p->n_blocks * (size_t)p->block_size, sizeof *pool->tokens);
    pool->free_stack = malloc((size_t)p->n_blocks * sizeof *pool->free_stack);
    pool->buckets = malloc((size_t)n_buckets * sizeof *pool->buckets);
    pool->seqs = calloc((size_t)p->max_seqs, sizeof *pool->seqs);
    pool->free_slots = malloc((size_t)p->max_seqs * sizeof *pool->free_slots);
    if (!pool->blocks || !pool->tokens || !pool->free_stack || !pool->buckets || !pool->seqs ||
        !pool->free_slots)
        goto nomem;
    for (uint64_t i = 0; i < n_buckets; i++)
        pool->buckets[i] = -1;
    /* a stack: block 0 is handed out first, slot 0 likewise */
    for (int32_t i = 0; i < p->n_blocks; i++) {
        kvb_block *b = &pool->blocks[i];
        b->lru_prev = b->lru_next = b->hnext = -1;
        b->parent_id = b->canon_id = -1;
        b->where = WHERE_FREE;
        pool->free_stack[i] = p->n_blocks - 1 - i;
    }
    pool->n_free = p->n_blocks;
    for (int32_t i = 0; i < p->max_seqs; i++)
        pool->free_slots[i] = p->max_seqs - 1 - i;
    pool->n_free_slots = p->max_seqs;
    pool->lru_head = pool->lru_tail = -1;
    *out = pool;
    return FORGE_OK;
nomem:
    rc = forge_err_set(err, FORGE_E_NOMEM, "out of memory for a KV block pool of %d blocks",
                       p->n_blocks);
    kvb_pool_free(pool);
    return rc;
}

void kvb_pool_free(kvb_pool *pool)
{
    if (!pool) return;
    if (pool->seqs)
        for (int32_t i = 0; i < pool->p.max_seqs; i++)
            free(pool->seqs[i].table);
    free(pool->blocks);
    free(pool->tokens);
    free(pool->free_stack);
    free(pool->buckets);
    free(pool->seqs);
    free(pool->free_slots);
    free(pool);
}

/* ---- block lists and the index ---- */

static void lru_remove(kvb_pool *pool, int32_t id)
{
    kvb_block *b = &pool->blocks[id];
    if (b->lru_prev >= 0)
        pool->blocks[b->lru_prev].lru_next = b->lru_next;
    else
        pool->lru_head = b->lru_next;
    if (b->lru_next >= 0)
        pool->blocks[b->lru_next].lru_prev = b->lru_prev;
    else
        pool->lru_tail = b->lru_prev;
    b->lru_prev = b->lru_next = -1;
    b->where = WHERE_NONE;
    pool->n_lru--;
}

static void lru_push_tail(kvb_pool *pool, int32_t id)
{
    kvb_block *b = &pool->blocks[id];
    b->lru_prev = pool->lru_tail;
    b->lru_next = -1;
    if (pool->lru_tail >= 0)
        pool->blocks[pool->lru_tail].lru_next = id;
    else
        pool->lru_head = id;
    pool->lru_tail = id;
    b->where = WHERE_LRU;
    pool->n_lru++;
}

static const int32_t *btok(const kvb_pool *pool, int32_t id)
{
    return pool->tokens + (size_t)id * (size_t)pool->bs;
}

/* The indexed block with this chain hash, parent identity and tokens, or -1. */
static int32_t index_find(const kvb_pool *pool, uint64_t hash, int32_t parent_id,
                          uint32_t parent_gen, const int32_t *tokens)
{
    for (int32_t id = pool->buckets[hash & pool->bucket_mask]; id >= 0;
         id = pool->blocks[id].hnext) {
        const kvb_block *b = &pool->blocks[id];
        if (b->hash == hash && b->parent_id == parent_id && b->parent_gen == parent_gen &&
            memcmp(btok(pool, id), tokens, (size_t)pool->bs * sizeof *tokens) == 0)
            return id;
    }
    return -1;
}

static void index_insert(kvb_pool *pool, int32_t id)
{
    kvb_block *b = &pool->blocks[id];
    int32_t *head = &pool->buckets[b->hash & pool->bucket_mask];
    b->hnext = *head;
    *head = id;
    b->hashed = true;
}

static void index_remove(kvb_pool *pool, int32_t id)
{
    kvb_block *b = &pool->blocks[id];
    int32_t *link = &pool->buckets[b->hash & pool->bucket_mask];
    while (*link >= 0 && *link != id)
        link = &pool->blocks[*link].hnext;
    if (*link == id) *link = b->hnext;
    b->hnext = -1;
    b->hashed = false;
}

/* A block for new content, reference count 1: the free list first, else evict the least
 * recently used cached block. The caller has checked that one is available. */
static int32_t block_alloc(kvb_pool *pool)
{
    int32_t id;
    if (pool->n_free > 0) {
        id = pool->free_stack[--pool->n_free];
    } else if (pool->lru_head >= 0) {
        id = pool->lru_head;
        lru_remove(pool, id);
        index_remove(pool, id);
        pool->n_evictions++;
    } else {
        return -1;
    }
    kvb_block *b = &pool->blocks[id];
    b->where = WHERE_NONE;
    b->ref = 1;
    b->gen++;
    b->parent_id = b->canon_id = -1;
    b->parent_gen = b->canon_gen = 0;
    return id;
}

/* Take a reference on a block found in the index (it leaves the LRU if it was there). */
static void block_acquire(kvb_pool *pool, int32_t id)
{
    if (pool->blocks[id].where == WHERE_LRU) lru_remove(pool, id);
    pool->blocks[id].ref++;
}

static void block_release(kvb_pool *pool, int32_t id)
{
    kvb_block *b = &pool->blocks[id];
    if (--b->ref > 0) return;
    if (b->hashed) {
        lru_push_tail(pool, id);
    } else {
        b->where = WHERE_FREE;
        pool->free_stack[pool->n_free++] = id;
    }
}

/* Block table[i] of s is now full and computed: compute its chain hash and identity, and index
 * it unless the cache is off or an equal block is indexed already. */
static void block_filled(kvb_pool *pool, const kvb_seq *s, int32_t i)
{
    int32_t id = s->table[i];
    kvb_block *b = &pool->blocks[id];
    if (b->hashed) return; /* indexed already (cannot happen: an indexed block is never refilled) */
    uint64_t parent_hash = 0;
    b->parent_id = -1;
    b->parent_gen = 0;
    if (i > 0) {
        const kvb_block *pb = &pool->blocks[s->table[i - 1]];
        parent_hash = pb->hash;
        b->parent_id = pb->canon_id;
        b->parent_gen = pb->canon_gen;
    }
    b->gen++;
    b->hash = pool->p.hash(parent_hash, btok(pool, id), pool->bs);
    b->canon_id = id;
    b->canon_gen = b->gen;
    if (!pool->p.prefix_cache) return;
    int32_t twin = index_find(pool, b->hash, b->parent_id, b->parent_gen, btok(pool, id));
    if (twin >= 0) {
        b->canon_id = twin;
        b->canon_gen = pool->blocks[twin].gen;
    } else {
        index_insert(pool, id);
    }
}

/* The longest chain of indexed blocks matching the full blocks of ids[0..n_ids): writes them to
 * out (may be NULL) and returns their count; *n_evictable (may be NULL) counts those with
 * reference count 0. */
static int32_t prefix_lookup(const kvb_pool *pool, const int32_t *ids, int32_t n_ids, int32_t *out,
                             int32_t *n_evictable)
{
    int32_t n_full = n_ids / pool->bs, n = 0, n_ev = 0;
    if (!pool->p.prefix_cache || !ids) n_full = 0;
    if (n_full > pool->n_blocks) n_full = pool->n_blocks;
    uint64_t parent_hash = 0;
    int32_t parent_id = -1;
    uint32_t parent_gen = 0;
    for (; n < n_full; n++) {
        const int32_t *tok = ids + (size_t)n * (size_t)pool->bs;
        uint64_t h = pool->p.hash(parent_hash, tok, pool->bs);
        int32_t id = index_find(pool, h, parent_id, parent_gen, tok);
        if (id < 0) break;
        if (out) out[n] = id;
        n_ev += pool->blocks[id].ref == 0;
        parent_hash = h;
        parent_id = id;
        parent_gen = pool->blocks[id].gen;
    }
    if (n_evictable) *n_evictable = n_ev;
    return n;
}

/* ---- sequences ---- */

static kvb_seq *seq_get(const kvb_pool *pool, int32_t id, const char *fn, forge_err *err)
{
    if (!pool) {
        forge_err_set(err, FORGE_E_INVALID, "%s: NULL pool", fn);
        return NULL;
    }
    int32_t slot = id & 0xffff, gen = id >> 16;
    if (id <= 0 || slot >= pool->p.max_seqs || !pool->seqs[slot].live ||
        pool->seqs[slot].gen != gen) {
        forge_err_set(err, FORGE_E_INVALID, "%s: unknown or freed sequence %d", fn, id);
        return NULL;
    }
    return &pool->seqs[slot];
}

static int32_t seq_id(const kvb_pool *pool, const kvb_seq *s)
{
    return (int32_t)((uint32_t)s->gen << 16 | (uint32_t)(s - pool->seqs));
}

static int32_t blocks_for(const kvb_pool *pool, int64_t n_tokens)
{
    int64_t n = (n_tokens + pool->bs - 1) / pool->bs;
    return n > INT32_MAX ? INT32_MAX : (int32_t)n;
}

static int table_reserve(kvb_seq *s, int32_t n, forge_err *err)
{
    if (n <= s->cap) return FORGE_OK;
    int32_t cap = s->cap ? s->cap : 8;
    while (cap < n)
        cap = cap > INT32_MAX / 2 ? n : cap * 2;
    int32_t *t = realloc(s->table, (size_t)cap * sizeof *t);
    if (!t)
        return forge_err_set(err, FORGE_E_NOMEM, "out of memory for a block table of %d blocks", n);
    s->table = t;
    s->cap = cap;
    return FORGE_OK;
}

/* A fresh live sequence in a free slot, or NULL (FORGE_E_RANGE). */
static kvb_seq *seq_new(kvb_pool *pool, const char *fn, forge_err *err)
{
    if (pool->n_free_slots == 0) {
        forge_err_set(err, FORGE_E_RANGE, "%s: all %d sequence slots are in use", fn,
                      pool->p.max_seqs);
        return NULL;
    }
    kvb_seq *s = &pool->seqs[pool->free_slots[--pool->n_free_slots]];
    s->gen = (uint16_t)(s->gen % KVB_SEQ_GEN_MAX + 1);
    s->live = true;
    s->len = 0;
    s->n_computed = 0;
    s->n_table = 0;
    pool->n_live++;
    return s;
}

static void seq_drop(kvb_pool *pool, kvb_seq *s)
{
    s->live = false;
    pool->free_slots[pool->n_free_slots++] = (int32_t)(s - pool->seqs);
    pool->n_live--;
}

/* Release blocks n_keep.. of s, last first. */
static int32_t seq_release_from(kvb_pool *pool, kvb_seq *s, int32_t n_keep)
{
    int32_t n = 0;
    while (s->n_table > n_keep) {
        block_release(pool, s->table[--s->n_table]);
        n++;
    }
    return n;
}

static int adopt(kvb_pool *pool, kvb_seq *s, const int32_t *ids, int32_t n_ids, int32_t *n_cached,
                 forge_err *err)
{
    int rc;
    int32_t n_full = pool->p.prefix_cache && ids ? n_ids / pool->bs : 0;
    if (n_full > pool->n_blocks) n_full = pool->n_blocks;
    if ((rc = table_reserve(s, n_full, err))) return rc;
    int32_t n = prefix_lookup(pool, ids, n_ids, s->table, NULL);
    for (int32_t i = 0; i < n; i++)
        block_acquire(pool, s->table[i]);
    s->n_table = n;
    s->len = s->n_computed = n * pool->bs;
    pool->n_hit_blocks += n;
    if (n_cached) *n_cached = s->len;
    return FORGE_OK;
}

int kvb_seq_create(kvb_pool *pool, const int32_t *ids, int32_t n_ids, int32_t *seq,
                   int32_t *n_cached, forge_err *err)
{
    int rc;
    if (seq) *seq = -1;
    if (n_cached) *n_cached = 0;
    if (!pool || !seq || (!ids && n_ids > 0))
        return forge_err_set(err, FORGE_E_INVALID, "kvb_seq_create: NULL %s",
                             !pool  ? "pool"
                             : !seq ? "seq"
                                    : "ids");
    if (n_ids < 0)
        return forge_err_set(err, FORGE_E_INVALID, "kvb_seq_create: %d prompt ids", n_ids);
    kvb_seq *s = seq_new(pool, "kvb_seq_create", err);
    if (!s) return FORGE_E_RANGE;
    if ((rc = adopt(pool, s, ids, n_ids, n_cached, err))) {
        seq_drop(pool, s);
        return rc;
    }
    *seq = seq_id(pool, s);
    return FORGE_OK;
}

int kvb_seq_adopt_prefix(kvb_pool *pool, int32_t seq, const int32_t *ids, int32_t n_ids,
                         int32_t *n_cached, forge_err *err)
{
    if (n_cached) *n_cached = 0;
    kvb_seq *s = seq_get(pool, seq, "kvb_seq_adopt_prefix", err);
    if (!s) return FORGE_E_INVALID;
    if ((!ids && n_ids > 0) || n_ids < 0)
        return forge_err_set(err, FORGE_E_INVALID, "kvb_seq_adopt_prefix: %d ids at %p", n_ids,
                             (const void *)ids);
    if (s->len != 0)
        return forge_err_set(err, FORGE_E_INVALID,
                             "kvb_seq_adopt_prefix: sequence %d holds %d tokens (must be empty)",
                             seq, s->len);
    return adopt(pool, s, ids, n_ids, n_cached, err);
}

/* Blocks an append of n tokens to s takes, and whether the first one is a copy-on-write. */
static int64_t append_need(const kvb_pool *pool, const kvb_seq *s, int64_t n, bool *cow)
{
    *cow = false;
    if (n <= 0) return 0;
    if (s->len % pool->bs != 0) {
        const kvb_block *last = &pool->blocks[s->table[s->n_table - 1]];
        *cow = last->ref > 1 || last->hashed;
    }
    int64_t need = (s->len + n + pool->bs - 1) / pool->bs - s->n_table;
    return need + (*cow ? 1 : 0);
}

int32_t kvb_num_available(const kvb_pool *pool)
{
    return pool ? pool->n_free + pool->n_lru : 0;
}

int kvb_seq_append(kvb_pool *pool, int32_t seq, const int32_t *ids, int32_t n, kvb_copy *cow,
                   forge_err *err)
{
    int rc;
    if (cow) *cow = (kvb_copy){-1, -1, 0};
    kvb_seq *s = seq_get(pool, seq, "kvb_seq_append", err);
    if (!s) return FORGE_E_INVALID;
    if (!cow || (!ids && n > 0) || n < 0)
        return forge_err_set(err, FORGE_E_INVALID, "kvb_seq_append: %s",
                             !cow    ? "NULL cow"
                             : n < 0 ? "negative token count"
                                     : "NULL ids");
    if (n == 0) return FORGE_OK;
    bool need_cow;
    int64_t need = append_need(pool, s, n, &need_cow);
    int64_t capacity = (int64_t)pool->n_blocks * pool->bs;
    if ((int64_t)s->len + n > capacity || need > kvb_num_available(pool))
        return forge_err_set(err, FORGE_E_RANGE,
                             "out of KV blocks: %d tokens at position %d of sequence %d need %lld "
                             "blocks, %d available (%d free + %d cached) of %d blocks of %d tokens",
                             n, s->len, seq, (long long)need, kvb_num_available(pool), pool->n_free,
                             pool->n_lru, pool->n_blocks, pool->bs);
    if ((rc = table_reserve(s, blocks_for(pool, (int64_t)s->len + n), err))) return rc;

    /* nothing below can fail */
    int32_t old = -1;
    if (need_cow) {
        int32_t idx = s->n_table - 1, rows = s->len % pool->bs;
        old = s->table[idx];
        int32_t fresh = block_alloc(pool);
        memcpy(pool->tokens + (size_t)fresh * pool->bs, btok(pool, old),
               (size_t)rows * sizeof *ids);
        s->table[idx] = fresh;
        *cow = (kvb_copy){old, fresh, rows};
    }
    for (int32_t i = 0; i < n; i++) {
        int32_t pos = s->len, off = pos % pool->bs;
        if (off == 0) s->table[s->n_table++] = block_alloc(pool);
        int32_t id = s->table[s->n_table - 1];
        pool->tokens[(size_t)id * pool->bs + off] = ids[i];
        s->len++;
    }
    /* the source of a copy goes last, so this call never hands it out again */
    if (old >= 0) block_release(pool, old);
    return FORGE_OK;
}

int kvb_seq_truncate(kvb_pool *pool, int32_t seq, int32_t len, forge_err *err)
{
    kvb_seq *s = seq_get(pool, seq, "kvb_seq_truncate", err);
    if (!s) return FORGE_E_INVALID;
    if (len < 0 || len > s->len)
        return forge_err_set(err, FORGE_E_INVALID,
                             "kvb_seq_truncate: length %d for sequence %d of %d tokens", len, seq,
                             s->len);
    seq_release_from(pool, s, blocks_for(pool, len));
    s->len = len;
    if (s->n_computed > len) s->n_computed = len;
    return FORGE_OK;
}

int kvb_seq_computed(kvb_pool *pool, int32_t seq, int32_t n_computed, forge_err *err)
{
    kvb_seq *s = seq_get(pool, seq, "kvb_seq_computed", err);
    if (!s) return FORGE_E_INVALID;
    if (n_computed < s->n_computed || n_computed > s->len)
        return forge_err_set(err, FORGE_E_INVALID,
                             "kvb_seq_computed: %d computed tokens for sequence %d of %d tokens "
                             "(%d computed already)",
                             n_computed, seq, s->len, s->n_computed);
    for (int32_t i = s->n_computed / pool->bs; i < n_computed / pool->bs; i++)
        block_filled(pool, s, i);
    s->n_computed = n_computed;
    return FORGE_OK;
}

int kvb_seq_fork(kvb_pool *pool, int32_t seq, int32_t *child, forge_err *err)
{
    int rc;
    if (child) *child = -1;
    kvb_seq *s = seq_get(pool, seq, "kvb_seq_fork", err);
    if (!s) return FORGE_E_INVALID;
    if (!child) return forge_err_set(err, FORGE_E_INVALID, "kvb_seq_fork: NULL child");
    kvb_seq *c = seq_new(pool, "kvb_seq_fork", err);
    if (!c) return FORGE_E_RANGE;
    if ((rc = table_reserve(c, s->n_table, err))) {
        seq_drop(pool, c);
        return rc;
    }
    for (int32_t i = 0; i < s->n_table; i++) {
        c->table[i] = s->table[i];
        pool->blocks[s->table[i]].ref++;
    }
    c->n_table = s->n_table;
    c->len = s->len;
    c->n_computed = s->n_computed;
    *child = seq_id(pool, c);
    return FORGE_OK;
}

int kvb_seq_preempt(kvb_pool *pool, int32_t seq, int32_t *n_released, forge_err *err)
{
    if (n_released) *n_released = 0;
    kvb_seq *s = seq_get(pool, seq, "kvb_seq_preempt", err);
    if (!s) return FORGE_E_INVALID;
    int32_t n = seq_release_from(pool, s, 0);
    s->len = s->n_computed = 0;
    if (n_released) *n_released = n;
    return FORGE_OK;
}

int kvb_seq_free(kvb_pool *pool, int32_t seq, forge_err *err)
{
    kvb_seq *s = seq_get(pool, seq, "kvb_seq_free", err);
    if (!s) return FORGE_E_INVALID;
    seq_release_from(pool, s, 0);
    s->len = 0;
    seq_drop(pool, s);
    return FORGE_OK;
}

int kvb_seq_table(const kvb_pool *pool, int32_t seq, const int32_t **table, int32_t *n_table,
                  int32_t *len, forge_err *err)
{
    const kvb_seq *s = seq_get(pool, seq, "kvb_seq_table", err);
    if (!s) return FORGE_E_INVALID;
    if (table) *table = s->table;
    if (n_table) *n_table = s->n_table;
    if (len) *len = s->len;
    return FORGE_OK;
}

int32_t kvb_seq_n_computed(const kvb_pool *pool, int32_t seq)
{
    const kvb_seq *s = seq_get(pool, seq, "kvb_seq_n_computed", NULL);
    return s ? s->n_computed : -1;
}

int kvb_seq_rows(const kvb_pool *pool, int32_t seq, int32_t pos0, int32_t n, int32_t *rows,
                 forge_err *err)
{
    const kvb_seq *s = seq_get(pool, seq, "kvb_seq_rows", err);
    if (!s) return FORGE_E_INVALID;
    if ((!rows && n > 0) || n < 0 || pos0 < 0 || (int64_t)pos0 + n > s->len)
        return forge_err_set(err, FORGE_E_INVALID,
                             "kvb_seq_rows: positions %d..%lld of sequence %d of %d tokens%s", pos0,
                             (long long)pos0 + n - 1, seq, s->len, rows ? "" : " (NULL rows)");
    for (int32_t i = 0; i < n; i++) {
        int32_t p = pos0 + i;
        rows[i] = s->table[p / pool->bs] * pool->bs + p % pool->bs;
    }
    return FORGE_OK;
}

/* ---- admission ---- */

int kvb_seq_blocks_needed(const kvb_pool *pool, int32_t seq, int32_t n, int32_t *need,
                          forge_err *err)
{
    if (need) *need = 0;
    const kvb_seq *s = seq_get(pool, seq, "kvb_seq_blocks_needed", err);
    if (!s) return FORGE_E_INVALID;
    if (!need || n < 0)
        return forge_err_set(err, FORGE_E_INVALID, "kvb_seq_blocks_needed: %s",
                             need ? "negative token count" : "NULL need");
    bool cow;
    int64_t k = append_need(pool, s, n, &cow);
    *need = k > INT32_MAX ? INT32_MAX : (int32_t)k;
    return FORGE_OK;
}

int kvb_seq_can_append(const kvb_pool *pool, int32_t seq, int32_t n, bool *ok, forge_err *err)
{
    int rc;
    int32_t need;
    if (ok) *ok = false;
    if (!ok) return forge_err_set(err, FORGE_E_INVALID, "kvb_seq_can_append: NULL ok");
    if ((rc = kvb_seq_blocks_needed(pool, seq, n, &need, err))) return rc;
    const kvb_seq *s = seq_get(pool, seq, "kvb_seq_can_append", err);
    *ok = (int64_t)s->len + n <= (int64_t)pool->n_blocks * pool->bs &&
          need <= kvb_num_available(pool);
    return FORGE_OK;
}

int kvb_can_admit(const kvb_pool *pool, const int32_t *ids, int32_t n_ids, int32_t n_total,
                  bool *ok, int32_t *n_cached, forge_err *err)
{
    if (ok) *ok = false;
    if (n_cached) *n_cached = 0;
    if (!pool || !ok || (!ids && n_ids > 0))
        return forge_err_set(err, FORGE_E_INVALID, "kvb_can_admit: NULL %s",
                             !pool ? "pool"
                             : !ok ? "ok"
                                   : "ids");
    if (n_ids < 0 || n_total < n_ids)
        return forge_err_set(err, FORGE_E_INVALID,
                             "kvb_can_admit: %d prompt ids for %d tokens in all", n_ids, n_total);
    int64_t capacity = (int64_t)pool->n_blocks * pool->bs;
    if (n_total > capacity)
        return forge_err_set(err, FORGE_E_RANGE,
                             "a sequence of %d tokens can never fit the KV pool of %d blocks of "
                             "%d tokens (%lld tokens)",
                             n_total, pool->n_blocks, pool->bs, (long long)capacity);
    int32_t n_ev = 0;
    int32_t hits = prefix_lookup(pool, ids, n_ids, NULL, &n_ev);
    int64_t need = blocks_for(pool, n_total) - hits;
    *ok = need <= (int64_t)kvb_num_available(pool) - n_ev;
    if (n_cached) *n_cached = hits * pool->bs;
    return FORGE_OK;
}

/* ---- inspection ---- */

void kvb_get_stats(const kvb_pool *pool, kvb_stats *out)
{
    if (!out) return;
    memset(out, 0, sizeof *out);
    if (!pool) return;
    out->n_blocks = pool->n_blocks;
    out->block_size = pool->bs;
    out->n_free = pool->n_free;
    out->n_cached = pool->n_lru;
    out->n_used = pool->n_blocks - pool->n_free - pool->n_lru;
    out->n_seqs = pool->n_live;
    out->n_evictions = pool->n_evictions;
    out->n_hit_blocks = pool->n_hit_blocks;
}

int kvb_block_state_of(const kvb_pool *pool, int32_t block)
{
    if (!pool || block < 0 || block >= pool->n_blocks) return -1;
    switch (pool->blocks[block].where) {
    case WHERE_FREE:
        return KVB_BLOCK_FREE;
    case WHERE_LRU:
        return KVB_BLOCK_CACHED;
    default:
        return KVB_BLOCK_USED;
    }
}

int32_t kvb_block_ref(const kvb_pool *pool, int32_t block)
{
    if (!pool || block < 0 || block >= pool->n_blocks) return -1;
    return pool->blocks[block].ref;
}

const int32_t *kvb_block_tokens(const kvb_pool *pool, int32_t block)
{
    if (!pool || block < 0 || block >= pool->n_blocks) return NULL;
    return btok(pool, block);
}

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            rc = forge_err_set(err, FORGE_E_INTERNAL, __VA_ARGS__);                                \
            goto done;                                                                             \
        }                                                                                          \
    } while (0)

int kvb_check(const kvb_pool *pool, forge_err *err)
{
    int rc = FORGE_OK;
    int32_t *refs = NULL;
    if (!pool) return forge_err_set(err, FORGE_E_INVALID, "kvb_check: NULL pool");
    refs = calloc((size_t)pool->n_blocks, sizeof *refs);
    if (!refs) return forge_err_set(err, FORGE_E_NOMEM, "kvb_check: out of memory");
    int32_t n_live = 0;
    for (int32_t i = 0; i < pool->p.max_seqs; i++) {
        const kvb_seq *s = &pool->seqs[i];
        if (!s->live) continue;
        n_live++;
        CHECK(s->n_table == blocks_for(pool, s->len), "sequence slot %d: %d blocks for %d tokens",
              i, s->n_table, s->len);
        CHECK(s->n_computed >= 0 && s->n_computed <= s->len,
              "sequence slot %d: %d computed of %d tokens", i, s->n_computed, s->len);
        for (int32_t j = 0; j < s->n_table; j++) {
            CHECK(s->table[j] >= 0 && s->table[j] < pool->n_blocks,
                  "sequence slot %d: block %d at %d", i, s->table[j], j);
            refs[s->table[j]]++;
        }
    }
    CHECK(n_live == pool->n_live && n_live + pool->n_free_slots == pool->p.max_seqs,
          "%d live sequences, counted %d, %d free slots", pool->n_live, n_live, pool->n_free_slots);
    int32_t n_free = 0, n_lru = 0, n_hashed = 0, n_indexed = 0;
    for (int32_t i = 0; i < pool->n_blocks; i++) {
        const kvb_block *b = &pool->blocks[i];
        CHECK(b->ref == refs[i], "block %d: reference count %d, %d tables hold it", i, b->ref,
              refs[i]);
        CHECK((b->ref == 0) == (b->where != WHERE_NONE), "block %d: count %d on list %d", i, b->ref,
              b->where);
        CHECK(b->where != WHERE_LRU || b->hashed, "block %d: on the LRU but not cached", i);
        CHECK(b->where != WHERE_FREE || !b->hashed, "block %d: free but cached", i);
        n_free += b->where == WHERE_FREE;
        n_lru += b->where == WHERE_LRU;
        n_hashed += b->hashed;
    }
    CHECK(n_free == pool->n_free && n_lru == pool->n_lru, "free %d (list %d), cached %d (list %d)",
          n_free, pool->n_free, n_lru, pool->n_lru);
    for (int32_t i = 0; i < pool->n_free; i++)
        CHECK(pool->blocks[pool->free_stack[i]].where == WHERE_FREE, "free list entry %d: block %d",
              i, pool->free_stack[i]);
    int32_t walked = 0;
    for (int32_t id = pool->lru_head, prev = -1; id >= 0;
         prev = id, id = pool->blocks[id].lru_next) {
        CHECK(walked++ < pool->n_lru && pool->blocks[id].lru_prev == prev &&
                  pool->blocks[id].where == WHERE_LRU,
              "LRU list broken at block %d", id);
        if (pool->blocks[id].lru_next < 0)
            CHECK(pool->lru_tail == id, "LRU tail %d, list ends at %d", pool->lru_tail, id);
    }
    CHECK(walked == pool->n_lru, "LRU list holds %d blocks, count %d", walked, pool->n_lru);
    for (uint64_t bkt = 0; bkt <= pool->bucket_mask; bkt++)
        for (int32_t id = pool->buckets[bkt]; id >= 0; id = pool->blocks[id].hnext) {
            CHECK(pool->blocks[id].hashed && (pool->blocks[id].hash & pool->bucket_mask) == bkt &&
                      n_indexed < pool->n_blocks,
                  "hash index: block %d in bucket %llu", id, (unsigned long long)bkt);
            n_indexed++;
        }
    CHECK(n_indexed == n_hashed, "hash index holds %d blocks, %d are cached", n_indexed, n_hashed);
done:
    free(refs);
    return rc;
}
