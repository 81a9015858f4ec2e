// Token sampling for one sampling position, shared by the CPU interpreter's sampling op and
// the reference for the GPU's. A seeded request draws the same tokens whatever else is in
// the batch: randomness comes from a counter-based generator keyed by (seed, index of the
// token being generated, vocabulary id), never from shared state.
//
// Order of application (each step sees the previous step's logits):
//   1. repetition penalty over prompt and output tokens: logit > 0 ? logit / p : logit * p
//   2. frequency and presence penalties over output tokens:
//        logit -= frequency_penalty * count + presence_penalty * (count > 0)
//   3. banned ids (EOS and stop ids while fewer than min_tokens are generated) -> -inf
//   4. temperature == 0: greedy, the argmax (lowest id on ties); steps 5-8 are skipped
//   5. divide by temperature
//   6. top-k: keep the k largest (ties at the boundary kept)
//   7. top-p: keep the smallest set of largest-probability tokens whose mass reaches top_p
//   8. min-p: drop tokens whose probability is below min_p * (largest probability)
//   9. draw: argmax over kept tokens of logit + Gumbel(seed, token_index, id)
//      (the Gumbel-max form: it reduces exactly across vocabulary tiles and ranks)
// Probabilities in 7 and 8 are softmax of the logits after 5 and the earlier filters.
// Reported logprobs are log-softmax of the raw model logits (before any step above).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "scheduler/sampling_params.h"
#include "scheduler/step_plan.h"

namespace megaserve::engine {

struct SamplingContext {
  std::span<const int32_t> prompt_token_ids;
  std::span<const int32_t> output_token_ids;  // generated so far
  std::span<const int32_t> banned_ids;        // already resolved by the caller (min_tokens)
  uint64_t seed = 0;
  int64_t token_index = 0;  // index in the output of the token being drawn (0 for the first)
};

// Samples one token from `logits` (vocab_size values, fp32, not modified).
scheduler::SampledToken sample_token(std::span<const float> logits,
                                     const scheduler::SamplingParams& params,
                                     const SamplingContext& context);

// Counter-based randomness shared with the GPU: a uniform in (0, 1) and the standard
// Gumbel noise -log(-log(u)) for (seed, token_index, vocab id). Pure functions of the key.
double uniform_for(uint64_t seed, int64_t token_index, int32_t vocab_id);
double gumbel_for(uint64_t seed, int64_t token_index, int32_t vocab_id);

}  // namespace megaserve::engine
