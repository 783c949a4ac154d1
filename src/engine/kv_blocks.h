/* kv_blocks.h - the KV-cache block manager of the engine core (issue 12, docs/ENGINE.md): a pool
 * of fixed-size blocks of token positions, per-sequence block tables, fork with copy-on-write,
 * and automatic prefix caching with LRU eviction.
 *
 * What it owns: block ids and their metadata only (reference counts, the token ids each block
 * holds, prefix-cache hashes, the free and LRU lists) and the sequences' block tables. It owns no
 * K/V memory: the storage of K and V per block belongs to the backend. The intended layout is the
 * one be_ops.kv_create already makes with n_ctx = n_blocks * block_size: row r = block *
 * block_size + offset of [layer][row][kv_dim], so position p of a sequence lives at row
 * table[p / block_size] * block_size + p % block_size (kvb_seq_rows fills these for a batch).
 *
 * Terms: a block is *full* when all its block_size positions hold tokens, and *computed* when
 * the forward has written their K/V (kvb_seq_computed says so). A full, computed block can be
 * *cached*: registered in the prefix cache under a chain hash of its tokens and of every token
 * before it. Positions are appended (reserved) before the forward runs and reported computed
 * after it, so a failed step never leaves unwritten K/V in the cache: truncate the sequence back
 * to its computed length instead. A cached block is immutable: writing into it (after a truncation
 * made it partial) goes to a fresh block (copy-on-write), like writing into a block shared after a
 * fork. A block is in exactly one state: FREE (on the free list), CACHED (reference count 0, kept
 * for the prefix cache, evictable, on the LRU list) or USED (reference count > 0 = the number of
 * block tables holding it; it may be cached too).
 *
 * Copy-on-write: kvb_seq_append may report one copy (kvb_copy) the backend must perform, K and V
 * of rows 0..n_rows of block src into block dst in every layer, before that step's forward
 * writes any K/V (the source may be handed to another sequence within the same step).
 *
 * Errors: every function that can fail returns FORGE_OK or a negative FORGE_E_* code with a
 * message in err (may be NULL): FORGE_E_INVALID for NULL arguments, bad sizes, and an unknown or
 * freed sequence id; FORGE_E_RANGE when the pool is out of blocks or of sequence slots (the state
 * is then unchanged); FORGE_E_NOMEM when a host allocation fails (state unchanged). Never a crash.
 *
 * Threads: a pool is not thread-safe; one engine thread owns it (docs/ENGINE.md).
 * Sequence ids are positive int32 values; a freed id is detected as unknown until its slot has
 * been reused 32767 times.
 */
#ifndef FORGE_ENGINE_KV_BLOCKS_H
#define FORGE_ENGINE_KV_BLOCKS_H

#include <stdbool.h>
#include <stdint.h>

#include "forge.h"

typedef struct kvb_pool kvb_pool;

/* The chain hash of a full block: hash(parent, tokens[0..n)), parent = the hash of the block
 * before it (0 for a sequence's first block). Any function works (a hit also compares the
 * tokens and the parent block, so collisions never share blocks); tests inject a weak one. */
typedef uint64_t (*kvb_hash_fn)(uint64_t parent, const int32_t *tokens, int32_t n);

typedef struct kvb_params {
    int32_t n_blocks;   /* blocks in the pool, >= 1, n_blocks * block_size <= INT32_MAX */
    int32_t block_size; /* tokens per block: 16 or 32 */
    int32_t max_seqs;   /* sequence slots, 1..65535 (live sequences at once) */
    bool prefix_cache;  /* register full blocks and reuse them (default true) */
    kvb_hash_fn hash;   /* NULL: the built-in 64-bit hash */
} kvb_params;

/* n_blocks 0 (must be set), block_size 16, max_seqs 256, prefix_cache on, built-in hash. */
kvb_params kvb_default_params(void);

/* A copy the backend must perform for copy-on-write: rows 0..n_rows of block src to block dst
 * (all layers, K and V). src = dst = -1, n_rows = 0 when there is none. */
typedef struct kvb_copy {
    int32_t src, dst, n_rows;
} kvb_copy;

typedef enum kvb_block_state {
    KVB_BLOCK_FREE = 0,   /* on the free list */
    KVB_BLOCK_CACHED = 1, /* reference count 0, in the prefix cache, evictable (LRU) */
    KVB_BLOCK_USED = 2    /* held by at least one block table */
} kvb_block_state;

typedef struct kvb_stats {
    int32_t n_blocks, block_size;
    int32_t n_free;       /* on the free list */
    int32_t n_cached;     /* evictable: cached with reference count 0 */
    int32_t n_used;       /* reference count > 0 */
    int32_t n_seqs;       /* live sequences */
    int64_t n_evictions;  /* cached blocks taken back for new content */
    int64_t n_hit_blocks; /* blocks reused through prefix lookups */
} kvb_stats;

/* Create a pool (owned by the caller, kvb_pool_free). */
int kvb_pool_create(const kvb_params *p, kvb_pool **out, forge_err *err);
/* Frees the pool and every sequence in it. NULL allowed. */
void kvb_pool_free(kvb_pool *pool);

/* ---- sequences ---- */

/* A new sequence. With ids (n_ids > 0) it adopts the longest cached prefix of full blocks of
 * ids[0..n_ids) (taking references; adopted CACHED blocks leave the LRU) and starts at that
 * length, all computed, *n_cached (a multiple of block_size, may be NULL); the caller then appends
 * ids[*n_cached..]. A caller that needs the logits of the last prompt token passes
 * n_ids = n_prompt - 1, so at least that token is computed. ids may be NULL with n_ids 0. Needs
 * no free block: fails only for want of a sequence slot or memory. */
int kvb_seq_create(kvb_pool *pool, const int32_t *ids, int32_t n_ids, int32_t *seq,
                   int32_t *n_cached, forge_err *err);
/* Adopt the longest cached prefix of ids[0..n_ids) into seq, which must be empty (length 0: new
 * or preempted); *n_cached as kvb_seq_create. */
int kvb_seq_adopt_prefix(kvb_pool *pool, int32_t seq, const int32_t *ids, int32_t n_ids,
                         int32_t *n_cached, forge_err *err);
/* Append n tokens (ids[0..n), n >= 0) at positions len..len+n-1, allocating blocks as positions
 * cross block boundaries (free list first, then evicting the least recently used cached block).
 * The positions are reserved, not computed: kvb_seq_computed after the forward. *cow (required)
 * receives the copy the backend must make when the first position lands in a partial block that is
 * shared or cached (the sequence gets a fresh block); otherwise {-1, -1, 0}. Out of blocks:
 * FORGE_E_RANGE, nothing changed. */
int kvb_seq_append(kvb_pool *pool, int32_t seq, const int32_t *ids, int32_t n, kvb_copy *cow,
                   forge_err *err);
/* The forward has written K/V for positions 0..n_computed-1 of seq (computed so far <=
 * n_computed <= length): blocks that this makes full and computed enter the prefix cache (or
 * stand for an equal cached block). Call it after each step for every sequence in the batch. */
int kvb_seq_computed(kvb_pool *pool, int32_t seq, int32_t n_computed, forge_err *err);
/* Shorten seq to len (0 <= len <= its length), releasing the blocks past it, last first; the
 * computed length is cut to len too. After a failed step: truncate to kvb_seq_n_computed. */
int kvb_seq_truncate(kvb_pool *pool, int32_t seq, int32_t len, forge_err *err);
/* A new sequence *child sharing all of seq's blocks (reference counts + 1, no copy) and its
 * length and computed length. Fork between steps, when seq's positions are all computed. */
int kvb_seq_fork(kvb_pool *pool, int32_t seq, int32_t *child, forge_err *err);
/* Preemption: release all of seq's blocks (last first, so the LRU evicts a sequence's tail
 * before its head); cached full blocks stay in the prefix cache. seq stays valid with length 0,
 * to be resumed by kvb_seq_adopt_prefix + kvb_seq_append (recompute). *n_released may be NULL. */
int kvb_seq_preempt(kvb_pool *pool, int32_t seq, int32_t *n_released, forge_err *err);
/* Release all of seq's blocks and its id (the id is unknown afterwards). */
int kvb_seq_free(kvb_pool *pool, int32_t seq, forge_err *err);

/* Length and block table of seq. *table (may be NULL to skip) is borrowed: valid until the next
 * call that changes this sequence. *n_table = ceil(len / block_size). */
int kvb_seq_table(const kvb_pool *pool, int32_t seq, const int32_t **table, int32_t *n_table,
                  int32_t *len, forge_err *err);
/* The computed length of seq, -1 for an unknown sequence. */
int32_t kvb_seq_n_computed(const kvb_pool *pool, int32_t seq);
/* rows[i] = the K/V row of position pos0 + i of seq (block * block_size + offset), for the n
 * positions pos0..pos0+n-1 < len: the slot mapping a batched forward writes K/V through. */
int kvb_seq_rows(const kvb_pool *pool, int32_t seq, int32_t pos0, int32_t n, int32_t *rows,
                 forge_err *err);

/* ---- admission (for the scheduler) ---- */

/* Blocks that can be handed out now: free + cached-evictable. */
int32_t kvb_num_available(const kvb_pool *pool);
/* Blocks an append of n more tokens to seq would take (new blocks + a copy-on-write block). */
int kvb_seq_blocks_needed(const kvb_pool *pool, int32_t seq, int32_t n, int32_t *need,
                          forge_err *err);
/* *ok = an append of n more tokens to seq would succeed now. */
int kvb_seq_can_append(const kvb_pool *pool, int32_t seq, int32_t n, bool *ok, forge_err *err);
/* *ok = a new sequence whose first n_ids tokens are ids (its prompt, looked up in the prefix
 * cache as kvb_seq_create would) and which will grow to n_total >= n_ids tokens fits now:
 * blocks(n_total) - hit blocks <= available - hit blocks that are now evictable. *n_cached (may
 * be NULL): the tokens the hit would cover. Changes nothing. */
int kvb_can_admit(const kvb_pool *pool, const int32_t *ids, int32_t n_ids, int32_t n_total,
                  bool *ok, int32_t *n_cached, forge_err *err);

/* ---- inspection (tests, debugging) ---- */

void kvb_get_stats(const kvb_pool *pool, kvb_stats *out);
/* State and reference count of a block; -1 for a bad pool or id. */
int kvb_block_state_of(const kvb_pool *pool, int32_t block);
int32_t kvb_block_ref(const kvb_pool *pool, int32_t block);
/* The block_size token ids written into block (borrowed; valid until the block is reused). NULL
 * for a bad pool or id. Entries past a sequence's length are stale. */
const int32_t *kvb_block_tokens(const kvb_pool *pool, int32_t block);
/* Check every internal invariant (lists partition the blocks, reference counts equal the block
 * tables' references, the hash index holds exactly the cached blocks, LRU blocks have count 0).
 * FORGE_E_INTERNAL with the first violation. */
int kvb_check(const kvb_pool *pool, forge_err *err);

#endif /* FORGE_ENGINE_KV_BLOCKS_H */
