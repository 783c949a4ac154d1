/* test_perplexity.c - `forge perplexity` equals exp(mean NLL) computed here, independently, from
 * `forge eval` logits of the same chunks (BOS first, second half of each chunk scored), and its
 * +/- is llama.cpp's formula. Runs the CLI ($FORGE) on stories260K.gguf with a 32-token context. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "forge.h"
#include "testutil.h"

#define N_CTX 32

static const char *TEXT =
    "Tom had a red kite. Every morning he ran to the hill behind his house and let the kite fly "
    "high "
    "in the wind. One day the string broke and the kite flew away over the trees. Tom was sad and "
    "sat on a big rock. His sister Mia came and sat next to him. She said, \"Do not be sad. We can "
    "make a new kite together.\" They found paper, sticks and a long string. Mia painted a sun on "
    "the paper and Tom tied the sticks. The new kite was yellow and bright. When they ran up the "
    "hill, the wind took it up to the clouds. Tom laughed and hugged his sister. They played until "
    "the sun went down, and then they walked home happy.\n";

static char *run_capture(const char *cmd)
{
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    size_t cap = 1 << 16, n = 0;
    char *out = malloc(cap);
    size_t r;
    while ((r = fread(out + n, 1, cap - n - 1, p)) > 0)
        n += r;
    out[n] = '\0';
    int st = pclose(p);
    if (st != 0) fail_msg("'%s' failed (%d): %s", cmd, st, out);
    return out;
}

static void test_perplexity_matches_eval(void **state)
{
    (void)state;
    const char *forge = getenv("FORGE");
    if (!forge || !*forge) {
        print_message("SKIP: $FORGE (the forge binary) is not set\n");
        skip();
    }
    char *model = tu_require_shared("testdata/models/stories260K.gguf");
    char *dir = tu_mkdtemp();
    char text_path[512], logits_path[512], cmd[8192];
    snprintf(text_path, sizeof text_path, "%s/text.txt", dir);
    snprintf(logits_path, sizeof logits_path, "%s/logits.f32", dir);
    FILE *f = fopen(text_path, "wb");
    fputs(TEXT, f);
    fclose(f);

    /* the CLI */
    snprintf(cmd, sizeof cmd, "'%s' perplexity -m '%s' -f '%s' -c %d -t 1 2>/dev/null", forge,
             model, text_path, N_CTX);
    char *out = run_capture(cmd);
    const char *fin = strstr(out, "Final estimate: PPL = ");
    assert_non_null(fin);
    double ppl_cli = 0, pm_cli = 0;
    assert_int_equal(sscanf(fin, "Final estimate: PPL = %lf +/- %lf", &ppl_cli, &pm_cli), 2);

    /* independently: tokenize (the final newline dropped, as llama.cpp's -f does), chunk, eval */
    forge_err err = {0};
    forge_model *m = NULL;
    assert_int_equal(forge_model_load(model, &m, &err), 0);
    const forge_tok *tok = forge_model_tok(m);
    int32_t *ids = NULL;
    size_t n_ids = 0;
    assert_int_equal(forge_tok_encode(tok, TEXT, strlen(TEXT) - 1, true, false, &ids, &n_ids, &err),
                     0);
    assert_true(n_ids >= 2 * N_CTX);
    const size_t n_chunks = n_ids / N_CTX;
    const int V = forge_model_info_get(m)->n_vocab;
    double nll = 0, nll2 = 0;
    long count = 0;
    for (size_t c = 0; c < n_chunks; c++) {
        const int32_t *chunk = ids + c * N_CTX;
        int off =
            snprintf(cmd, sizeof cmd, "'%s' eval -m '%s' -c %d -t 1 --logits '%s' --tokens '%d",
                     forge, model, N_CTX, logits_path, forge_tok_bos(tok));
        for (int i = 1; i < N_CTX; i++)
            off += snprintf(cmd + off, sizeof cmd - (size_t)off, " %d", chunk[i]);
        snprintf(cmd + off, sizeof cmd - (size_t)off, "' 2>/dev/null");
        free(run_capture(cmd));
        size_t len = 0;
        float *lg = (float *)tu_read_file(logits_path, &len);
        assert_non_null(lg);
        assert_int_equal(len, (size_t)N_CTX * V * sizeof(float));
        for (int i = N_CTX / 2; i < N_CTX - 1; i++) {
            const float *row = lg + (size_t)i * V;
            double mx = row[0], s = 0;
            for (int k = 1; k < V; k++)
                mx = row[k] > mx ? row[k] : mx;
            for (int k = 0; k < V; k++)
                s += exp(row[k] - mx);
            double v = -(row[chunk[i + 1]] - mx - log(s));
            nll += v;
            nll2 += v * v;
            count++;
        }
        free(lg);
    }
    double mean = nll / count, ppl = exp(mean);
    double pm = sqrt((nll2 / count - mean * mean) / (count - 1)) * ppl;
    print_message("%zu chunks, %ld scored tokens: PPL %.4f +/- %.5f (CLI %.4f +/- %.5f)\n",
                  n_chunks, count, ppl, pm, ppl_cli, pm_cli);
    assert_float_equal(ppl_cli, ppl, 1e-4 * ppl + 1e-4);
    assert_float_equal(pm_cli, pm, 1e-3 * pm + 1e-5);
    /* one running estimate per chunk */
    char tag[32];
    snprintf(tag, sizeof tag, "[%zu]", n_chunks);
    assert_non_null(strstr(out, tag));
    snprintf(tag, sizeof tag, "[%zu]", n_chunks + 1);
    assert_null(strstr(out, tag));

    /* too short a text for the context: a clear error */
    snprintf(cmd, sizeof cmd, "'%s' perplexity -m '%s' -f '%s' -c 256 -t 1 2>&1; echo rc=$?", forge,
             model, text_path);
    char *o2 = run_capture(cmd);
    assert_non_null(strstr(o2, "you need at least 512 tokens"));
    assert_non_null(strstr(o2, "rc=1"));
    free(o2);

    free(out);
    free(ids);
    forge_model_free(m);
    tu_rmtree(dir);
    free(dir);
    free(model);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_perplexity_matches_eval),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
