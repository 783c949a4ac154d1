/* sampler_dev.h - internal (not public): the sampler chain of sampler.c handed to a backend's
 * device sampling op (be_ops.sample, struct be_sample in src/backend/backend.h), and the host
 * pick with a given draw, so that the device and the host consume the same random stream.
 *
 * The random stream: forge_sampler_sample draws exactly one uniform r (a double in [0, 1) from
 * the xoshiro256** stream) per call when the sampler is not greedy, also when only one candidate
 * survives the chain, and none when it is greedy (temperature <= 0). sampler_dev_prepare draws
 * the same r the same way, so a decode loop that samples some steps on the device and others on
 * the host sees the same sequence as one that always calls forge_sampler_sample. */
#ifndef FORGE_SAMPLER_DEV_H
#define FORGE_SAMPLER_DEV_H

#include <stdbool.h>
#include <stdint.h>

#include "backend/backend.h"
#include "forge_model.h"

/* The largest top-k the device chain takes: GPU_SAMPLE_MAX_K of src/gpu/gpu_ops.h, written as
 * a literal because libforge never includes GPU headers. Keep the two equal. */
#define SAMPLER_DEV_MAX_K 1024

/* True when the device can run s's chain: greedy, or top_k in 1..SAMPLER_DEV_MAX_K (the device
 * works on the top-k survivors only). */
bool sampler_dev_fits(const forge_sampler *s);

/* Vocabulary size the sampler was created for. */
int32_t sampler_n_vocab(const forge_sampler *s);

/* Fill *out for s and its penalty window: the parameters, the distinct ids of the window with
 * their counts (n_pen = 0 when the penalty stage is off; the arrays are owned by s and valid
 * until the next call on s), and the draw. Advances the random stream exactly as one
 * forge_sampler_sample call would. *r gets the exact draw (0 when greedy); out->r is the same
 * value as a float, kept below 1. */
void sampler_dev_prepare(forge_sampler *s, be_sample *out, double *r);

/* What forge_sampler_sample returns for these logits with the draw r, without touching the
 * random stream (r is ignored when greedy). */
int32_t sampler_pick(forge_sampler *s, const float *logits, double r);

#endif /* FORGE_SAMPLER_DEV_H */
