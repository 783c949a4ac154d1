/* bench_gpu_paged.c - the batched paths of the GPU backend against the one-sequence ones:
 *   decode attention: gpu_paged_attention over B sequences of L positions (blocks of 16,
 *     shuffled) against B launches of gpu_attention over contiguous caches, F16 cache, llama-8B
 *     heads (32 query / 8 KV heads of 128); bytes counted: the K/V rows read;
 *   prompt attention: one chunk of 512 queries, tensor cores through a table
 *     (gpu_attention_prompt_paged) vs contiguous (gpu_attention_prompt) vs the paged kernel;
 *   decode matmul: n rows of a 4096 x 4096 and a 14336 x 4096 matrix (Q4_0, Q8_0, F16) by
 *     gpu_matvec_multi (its dp4a kernel and, Q4_0/Q8_0, its tensor-core kernel) against n
 *     gpu_matvec launches.
 * Median of 20 timed runs after 3 warm-ups (events). Speed is measured here, never asserted. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "forge.h"
#include "forge_gguf.h"
#include "gpu/gpu_ops.h"
#include "bench_gpu_util.h"

static gpu_stream *S;
static gpu_event *E0, *E1;

static int cmp_f(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

typedef void (*bench_fn)(void *ctx);

/* median milliseconds of fn */
static float timeit(bench_fn fn, void *ctx)
{
    float t[20];
    for (int i = 0; i < 3; i++)
        fn(ctx);
    for (int i = 0; i < 20; i++) {
        CHECK(gpu_event_record(E0, S, err));
        fn(ctx);
        CHECK(gpu_event_record(E1, S, err));
        CHECK(gpu_event_sync(E1, err));
        CHECK(gpu_event_elapsed_ms(E0, E1, &t[i], err));
    }
    qsort(t, 20, sizeof t[0], cmp_f);
    return t[10];
}

static void *dev_random(size_t bytes, uint64_t seed)
{
    unsigned short *h = malloc(bytes);
    for (size_t i = 0; i < bytes / 2; i++) {
        seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
        /* fp16 in [-1, 1): sign, exponent 0..14, mantissa */
        unsigned v = (unsigned)(seed >> 33);
        h[i] = (unsigned short)((v & 0x83ff) | (((v >> 10) % 15) << 10));
    }
    void *d = NULL;
    CHECK(gpu_malloc(&d, bytes, err));
    CHECK(gpu_memcpy_h2d(d, h, bytes, S, err));
    CHECK(gpu_stream_sync(S, err));
    free(h);
    return d;
}

/* ---- attention -------------------------------------------------------------------------- */
enum { NH = 32, NKV = 8, HD = 128, BS = 16 };

typedef struct att_ctx {
    gpu_paged_args pa;
    gpu_attn_args ca;
    int n_seq;
    int64_t seq_rows; /* contiguous layout: rows per sequence */
    const void *k, *v;
    int n_q, fa_paged;
    const int32_t *table;
} att_ctx;

static void run_paged(void *c)
{
    att_ctx *a = c;
    CHECK(gpu_paged_attention(&a->pa, S, err));
}

static void run_contig(void *c)
{
    att_ctx *a = c;
    for (int s = 0; s < a->n_seq; s++) {
        gpu_attn_args x = a->ca;
        x.d_k = (const char *)a->k + (size_t)s * a->seq_rows * NKV * HD * 2;
        x.d_v = (const char *)a->v + (size_t)s * a->seq_rows * NKV * HD * 2;
        x.d_q = a->ca.d_q + (size_t)s * NH * HD;
        x.d_out = a->ca.d_out + (size_t)s * NH * HD;
        x.d_pos = a->ca.d_pos + s;
        CHECK(gpu_attention(&x, S, err));
    }
}

static void run_prompt(void *c)
{
    att_ctx *a = c;
    if (a->fa_paged)
        CHECK(
            gpu_attention_prompt_paged(&a->ca, a->n_q, 0, NH * HD, NH * HD, a->table, BS, S, err));
    else
        CHECK(gpu_attention_prompt(&a->ca, a->n_q, 0, NH * HD, NH * HD, S, err));
}

static void bench_attention(int n_seq, int L)
{
    const int64_t rows = (int64_t)n_seq * L, blocks = rows / BS;
    const size_t kv_bytes = (size_t)rows * NKV * HD * 2;
    void *k = dev_random(kv_bytes, 1), *v = dev_random(kv_bytes, 2);
    float *q = dev_random((size_t)n_seq * NH * HD * 4, 3), *out = NULL;
    CHECK(gpu_malloc((void **)&out, (size_t)n_seq * NH * HD * 4, err));
    CHECK(gpu_memset(q, 0, (size_t)n_seq * NH * HD * 4, S, err)); /* q = 0: finite scores */
    int32_t *h = malloc((size_t)(3 * n_seq + blocks) * 4);
    int32_t *perm = malloc((size_t)blocks * 4);
    for (int64_t i = 0; i < blocks; i++)
        perm[i] = (int32_t)i;
    uint64_t sd = 7;
    for (int64_t i = blocks - 1; i > 0; i--) {
        sd = sd * 6364136223846793005ULL + 1;
        int64_t j = (int64_t)((sd >> 33) % (uint64_t)(i + 1));
        int32_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    for (int s = 0; s < n_seq; s++) {
        h[s] = L - 1;         /* pos */
        h[2 * n_seq + s] = s; /* row -> sequence */
    }
    memcpy(h + 3 * n_seq, perm, (size_t)blocks * 4);
    int32_t *d = NULL;
    CHECK(gpu_malloc((void **)&d, (size_t)(3 * n_seq + blocks) * 4, err));
    CHECK(gpu_memcpy_h2d(d, h, (size_t)(3 * n_seq + blocks) * 4, S, err));
    att_ctx a;
    memset(&a, 0, sizeof a);
    a.pa.d_q = q;
    a.pa.d_k = k;
    a.pa.d_v = v;
    a.pa.kv_type = GGML_TYPE_F16;
    a.pa.row_stride = NKV * HD;
    a.pa.n_head = NH;
    a.pa.n_kv_head = NKV;
    a.pa.head_dim = HD;
    a.pa.n_rows = n_seq;
    a.pa.d_pos = d;
    a.pa.d_row_seq = d + 2 * n_seq;
    a.pa.d_table = d + 3 * n_seq;
    a.pa.table_stride = L / BS;
    a.pa.block_size = BS;
    a.pa.max_kv = L;
    a.pa.scale = 0.088f;
    a.pa.scratch_bytes = gpu_paged_scratch_bytes(n_seq, NH, HD, L);
    CHECK(gpu_malloc(&a.pa.d_scratch, a.pa.scratch_bytes, err));
    a.pa.d_out = out;
    a.ca.d_q = q;
    a.ca.kv_type = GGML_TYPE_F16;
    a.ca.pos_stride = NKV * HD;
    a.ca.head_stride = HD;
    a.ca.n_head = NH;
    a.ca.n_kv_head = NKV;
    a.ca.head_dim = HD;
    a.ca.d_pos = d;
    a.ca.max_kv = L;
    a.ca.scale = 0.088f;
    CHECK(gpu_malloc(&a.ca.d_scratch, gpu_attn_scratch_bytes(NH, HD, L), err));
    a.ca.d_out = out;
    a.k = k;
    a.v = v;
    a.n_seq = n_seq;
    a.seq_rows = L;
    float tp = timeit(run_paged, &a), tc = timeit(run_contig, &a);
    printf("decode attention %3d seq x %5d pos (F16, 32/8 heads of 128): paged %8.1f us "
           "%6.0f GB/s | %d x contiguous %8.1f us %6.0f GB/s\n",
           n_seq, L, tp * 1e3, 2.0 * kv_bytes / (tp * 1e6), n_seq, tc * 1e3,
           2.0 * kv_bytes / (tc * 1e6));
    gpu_free(a.pa.d_scratch);
    gpu_free(a.ca.d_scratch);
    gpu_free(k);
    gpu_free(v);
    gpu_free(q);
    gpu_free(out);
    gpu_free(d);
    free(h);
    free(perm);
}

static void bench_prompt(int n_q)
{
    const int64_t blocks = n_q / BS;
    const size_t kv_bytes = (size_t)n_q * NKV * HD * 2;
    void *k = dev_random(kv_bytes, 4), *v = dev_random(kv_bytes, 5);
    float *q = NULL, *out = NULL;
    CHECK(gpu_malloc((void **)&q, (size_t)n_q * NH * HD * 4, err));
    CHECK(gpu_malloc((void **)&out, (size_t)n_q * NH * HD * 4, err));
    CHECK(gpu_memset(q, 0, (size_t)n_q * NH * HD * 4, S, err));
    int32_t *h = malloc((size_t)(3 * n_q + blocks) * 4);
    for (int i = 0; i < n_q; i++) {
        h[i] = i;
        h[2 * n_q + i] = 0;
    }
    for (int64_t i = 0; i < blocks; i++)
        h[3 * n_q + i] = (int32_t)(blocks - 1 - i); /* reversed blocks */
    int32_t *d = NULL;
    CHECK(gpu_malloc((void **)&d, (size_t)(3 * n_q + blocks) * 4, err));
    CHECK(gpu_memcpy_h2d(d, h, (size_t)(3 * n_q + blocks) * 4, S, err));
    att_ctx a;
    memset(&a, 0, sizeof a);
    a.ca.d_q = q;
    a.ca.d_k = k;
    a.ca.d_v = v;
    a.ca.kv_type = GGML_TYPE_F16;
    a.ca.pos_stride = NKV * HD;
    a.ca.head_stride = HD;
    a.ca.n_head = NH;
    a.ca.n_kv_head = NKV;
    a.ca.head_dim = HD;
    a.ca.scale = 0.088f;
    a.ca.d_out = out;
    a.n_q = n_q;
    a.table = d + 3 * n_q;
    a.pa.d_q = q;
    a.pa.d_k = k;
    a.pa.d_v = v;
    a.pa.kv_type = GGML_TYPE_F16;
    a.pa.row_stride = NKV * HD;
    a.pa.n_head = NH;
    a.pa.n_kv_head = NKV;
    a.pa.head_dim = HD;
    a.pa.n_rows = n_q;
    a.pa.d_pos = d;
    a.pa.d_row_seq = d + 2 * n_q;
    a.pa.d_table = d + 3 * n_q;
    a.pa.table_stride = blocks;
    a.pa.block_size = BS;
    a.pa.max_kv = n_q;
    a.pa.scale = 0.088f;
    a.pa.scratch_bytes = gpu_paged_scratch_bytes(n_q, NH, HD, n_q);
    CHECK(gpu_malloc(&a.pa.d_scratch, a.pa.scratch_bytes, err));
    a.pa.d_out = out;
    a.fa_paged = 0;
    float tc = timeit(run_prompt, &a);
    a.fa_paged = 1;
    float tf = timeit(run_prompt, &a);
    float tp = timeit(run_paged, &a);
    printf("prompt attention %d queries (F16): tensor cores contiguous %8.1f us | through a "
           "table %8.1f us | paged kernel %8.1f us\n",
           n_q, tc * 1e3, tf * 1e3, tp * 1e3);
    gpu_free(a.pa.d_scratch);
    gpu_free(k);
    gpu_free(v);
    gpu_free(q);
    gpu_free(out);
    gpu_free(d);
    free(h);
}

/* ---- matmul ------------------------------------------------------------------------------ */
typedef struct mm_ctx {
    int t, n;
    int64_t n_out, n_in;
    void *w, *xq1, *xqm;
    float *x, *y;
    int multi;
} mm_ctx;

static void run_mm(void *c)
{
    mm_ctx *m = c;
    const int q = m->t == GGML_TYPE_Q8_0 || m->t == GGML_TYPE_Q4_0;
    if (m->multi) {
        if (q) CHECK(gpu_act_quantize(m->x, m->n * m->n_in, m->xqm, S, err));
        CHECK(gpu_matvec_multi(m->t, m->w, m->n_out, m->n_in, m->n, m->x, m->xqm, m->y, S, err));
        return;
    }
    for (int r = 0; r < m->n; r++) {
        if (q) CHECK(gpu_act_quantize(m->x + r * m->n_in, m->n_in, m->xq1, S, err));
        CHECK(gpu_matvec(m->t, m->w, m->n_out, m->n_in, m->x + r * m->n_in, m->xq1,
                         m->y + r * m->n_out, S, err));
    }
}

static void bench_matmul(int t, int64_t n_out, int64_t n_in)
{
    mm_ctx m;
    memset(&m, 0, sizeof m);
    m.t = t;
    m.n_out = n_out;
    m.n_in = n_in;
    const size_t wb = gpu_weight_bytes(t, n_out, n_in);
    m.w = dev_random(wb, 9); /* any bytes: the speed does not depend on the values */
    m.x = dev_random((size_t)16 * n_in * 4, 10);
    CHECK(gpu_memset(m.x, 0, (size_t)16 * n_in * 4, S, err));
    CHECK(gpu_malloc((void **)&m.y, (size_t)16 * n_out * 4, err));
    CHECK(gpu_malloc(&m.xq1, gpu_act_q8_bytes(n_in), err));
    CHECK(gpu_malloc(&m.xqm, gpu_act_q8_bytes(16 * n_in), err));
    const char *tn = t == GGML_TYPE_Q4_0 ? "Q4_0" : t == GGML_TYPE_Q8_0 ? "Q8_0" : "F16";
    const int ns[] = {1, 2, 4, 8, 16};
    printf("matmul %-4s %5lld x %5lld:", tn, (long long)n_out, (long long)n_in);
    for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++) {
        m.n = ns[i];
        m.multi = 0;
        float t1 = timeit(run_mm, &m);
        float tm = t1, tt = t1;
        if (m.n > 1) {
            m.multi = 1;
            gpu_matvec_multi_tc_min(0);
            tm = timeit(run_mm, &m);
            gpu_matvec_multi_tc_min(2);
            tt = timeit(run_mm, &m);
        }
        printf("  %2d rows %6.1f/%6.1f/%6.1f us", m.n, t1 * 1e3, tm * 1e3, tt * 1e3);
    }
    printf("   (n matvec / multi dp4a / multi tensor cores where the type has them)\n");
    gpu_free(m.w);
    gpu_free(m.x);
    gpu_free(m.y);
    gpu_free(m.xq1);
    gpu_free(m.xqm);
}

int main(void)
{
    CHECK(gpu_set_device(0, err));
    CHECK(gpu_stream_create(&S, err));
    CHECK(gpu_event_create(&E0, 1, err));
    CHECK(gpu_event_create(&E1, 1, err));
    bench_attention(1, 4096);
    bench_attention(1, 32768);
    bench_attention(16, 1024);
    bench_attention(64, 2048);
    bench_prompt(512);
    bench_prompt(2048);
    const int types[] = {GGML_TYPE_Q4_0, GGML_TYPE_Q8_0, GGML_TYPE_F16};
    for (int i = 0; i < 3; i++) {
        bench_matmul(types[i], 4096, 4096);
        bench_matmul(types[i], 14336, 4096);
    }
    gpu_event_destroy(E0);
    gpu_event_destroy(E1);
    gpu_stream_destroy(S);
    return 0;
}
