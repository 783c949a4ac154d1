/* arch.c - the table of architectures: per GGUF general.architecture its RoPE layout, the
 * function that reads its own hyperparameters and tensors, its forward pass, and whether the GPU
 * backend runs it. The one place an architecture is added. */
#include <stdio.h>
#include <string.h>

#include "core/util.h"
#include "model/model.h"

static const arch_desc g_arches[] = {
    /* arch          name        rope           load              forward              gpu */
    {ARCH_LLAMA, "llama", BE_ROPE_NORM, arch_llama_load, arch_llama_forward, true},
    {ARCH_QWEN2, "qwen2", BE_ROPE_NEOX, arch_llama_load, arch_llama_forward, true},
    {ARCH_QWEN3, "qwen3", BE_ROPE_NEOX, arch_llama_load, arch_llama_forward, true},
    {ARCH_QWEN3MOE, "qwen3moe", BE_ROPE_NEOX, arch_llama_load, arch_llama_forward, true},
    {ARCH_GEMMA2, "gemma2", BE_ROPE_NEOX, arch_gemma_load, arch_gemma_forward, true},
    {ARCH_GEMMA3, "gemma3", BE_ROPE_NEOX, arch_gemma_load, arch_gemma_forward, true},
    {ARCH_PHI3, "phi3", BE_ROPE_NEOX, arch_phi3_load, arch_phi3_forward, true},
    {ARCH_CHATGLM, "chatglm", BE_ROPE_NORM, arch_glm_load, arch_glm_forward, true},
    {ARCH_GLM4, "glm4", BE_ROPE_NORM, arch_glm_load, arch_glm_forward, true},
};

const arch_desc *arch_find(model_arch arch)
{
    for (size_t i = 0; i < FORGE_ARRAY_LEN(g_arches); i++)
        if (g_arches[i].arch == arch) return &g_arches[i];
    return NULL;
}

const arch_desc *arch_find_name(const char *name, size_t len)
{
    for (size_t i = 0; name && i < FORGE_ARRAY_LEN(g_arches); i++)
        if (strlen(g_arches[i].name) == len && !memcmp(g_arches[i].name, name, len))
            return &g_arches[i];
    return NULL;
}

const char *arch_names_list(char *buf, size_t n)
{
    size_t off = 0;
    if (n) buf[0] = '\0';
    for (size_t i = 0; i < FORGE_ARRAY_LEN(g_arches) && off < n; i++)
        off += (size_t)snprintf(buf + off, n - off, "%s%s", i ? ", " : "", g_arches[i].name);
    return buf;
}
