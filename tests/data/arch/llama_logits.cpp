// Reference dumper (outside the project): llama.cpp's logits for a list of token ids.
// usage: llama-logits -m MODEL.gguf -o OUT.f32 [-n N_GREEDY] [-c N_CTX] ID ID ...
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include "llama.h"

static void quiet(ggml_log_level, const char *, void *) {}

int main(int argc, char **argv) {
    const char *model_path = nullptr, *out_path = nullptr;
    int n_greedy = 16, n_ctx = 512;
    std::vector<llama_token> ids;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-m") && i + 1 < argc) model_path = argv[++i];
        else if (!strcmp(argv[i], "-o") && i + 1 < argc) out_path = argv[++i];
        else if (!strcmp(argv[i], "-n") && i + 1 < argc) n_greedy = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-c") && i + 1 < argc) n_ctx = atoi(argv[++i]);
        else ids.push_back(atoi(argv[i]));
    }
    if (!model_path || !out_path || ids.empty()) {
        fprintf(stderr, "usage: llama-logits -m MODEL -o OUT.f32 [-n N] [-c N_CTX] ID...\n");
        return 2;
    }
    if (!getenv("LLAMA_VERBOSE")) llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model *model = llama_model_load_from_file(model_path, mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", model_path); return 1; }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_ctx;
    cp.n_batch = n_ctx;
    cp.n_ubatch = n_ctx;
    cp.n_threads = 1;
    cp.n_threads_batch = 1;
    cp.type_k = GGML_TYPE_F32;
    cp.type_v = GGML_TYPE_F32;
    cp.flash_attn = false;
    llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "cannot create context\n"); return 1; }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    const int n = (int)ids.size();
    llama_batch b = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        b.token[i] = ids[i]; b.pos[i] = i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0; b.logits[i] = 1;
    }
    b.n_tokens = n;
    if (llama_decode(ctx, b)) { fprintf(stderr, "decode failed\n"); return 1; }
    FILE *f = fopen(out_path, "wb");
    if (!f) { perror(out_path); return 1; }
    for (int i = 0; i < n; i++) fwrite(llama_get_logits_ith(ctx, i), sizeof(float), n_vocab, f);
    fclose(f);
    std::vector<int> greedy;
    const float *last = llama_get_logits_ith(ctx, n - 1);
    int pos = n;
    for (int g = 0; g < n_greedy; g++) {
        int best = 0;
        for (int v = 1; v < n_vocab; v++) if (last[v] > last[best]) best = v;
        greedy.push_back(best);
        if (g + 1 == n_greedy) break;
        llama_batch one = llama_batch_init(1, 0, 1);
        one.token[0] = best; one.pos[0] = pos++; one.n_seq_id[0] = 1; one.seq_id[0][0] = 0; one.logits[0] = 1;
        one.n_tokens = 1;
        if (llama_decode(ctx, one)) { fprintf(stderr, "decode failed\n"); return 1; }
        llama_batch_free(one);
        last = llama_get_logits_ith(ctx, 0);
    }
    printf("{\"n_vocab\": %d, \"n_tokens\": %d, \"greedy\": [", n_vocab, n);
    for (size_t i = 0; i < greedy.size(); i++) printf("%s%d", i ? ", " : "", greedy[i]);
    printf("]}\n");
    llama_batch_free(b);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
