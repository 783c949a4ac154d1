/* arch_phi3.c - Phi-3: not written yet (issue 15). */
#include "core/util.h"
#include "model/loader.h"

int arch_phi3_load(loader *L, forge_err *err)
{
    return forge_err_set(err, FORGE_E_UNSUPPORTED, "%s: %s models are not supported yet", L->path,
                         L->arch);
}

int arch_phi3_forward(fwd_state *fs, const int32_t *ids, const be_batch *bt, forge_err *err)
{
    (void)fs;
    (void)ids;
    (void)bt;
    return forge_err_set(err, FORGE_E_UNSUPPORTED, "no forward pass yet");
}
