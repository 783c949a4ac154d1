/* engine_internal.h - what the engine (engine.c) shows its tests beyond include/forge_engine.h.
 * Not public. */
#ifndef FORGE_ENGINE_INTERNAL_H
#define FORGE_ENGINE_INTERNAL_H

#include "forge.h"

/* Check the engine's invariants between steps, on the thread that steps it: the block pool's own
 * (kvb_check), the queue and running lists against their counters and the live list, each
 * running request's sequence computed exactly as far as the request says, and no block in use
 * when no request is live. FORGE_E_INTERNAL with the first violation. */
int engine_check(forge_engine *e, forge_err *err);

#endif /* FORGE_ENGINE_INTERNAL_H */
