// Token sampling for one sampling position, shared by the CPU interpreter's sampling op and
// the reference for the GPU's. A seeded request draws the same tokens whatever else is in
// the batch: randomness comes from a counter-based generator keyed by (seed, index of the
// token being generated, vocabulary id), never from shared state (engine/isa/counter_rng.h).
//
// Input cleaning (before step 1): a NaN logit counts as -inf (never drawn, logprob -inf) and
// +inf counts as the largest finite float, so the arithmetic below never meets inf - inf.
//
// Order of application (each step sees the previous step's logits):
//   1. repetition penalty over prompt and output tokens: logit > 0 ? logit / p : logit * p
//      (once per distinct token id, however often it occurs)
//   2. frequency and presence penalties over output tokens:
//        logit -= frequency_penalty * count + presence_penalty * (count > 0)
//      (results beyond the float range saturate: +inf becomes the largest finite float)
//   3. banned ids (EOS and stop ids while fewer than min_tokens are generated) -> -inf
//      If every token is now -inf, nothing is left to choose from: the result is the greedy
//      choice over the cleaned raw logits (lowest id, 0, when those are all -inf too).
//   4. temperature == 0: greedy, the argmax (lowest id on ties); steps 5-8 are skipped, and
//      so are top-k, top-p, min-p and the seed
//   5. divide by temperature: s = (logit - max logit) * (1 / temperature), in double (s <= 0,
//      so a tiny temperature such as 1e-5 cannot overflow)
//   6. top-k: keep the k largest (ties at the boundary kept; k = 0 or k >= vocab: all)
//   7. top-p: keep the smallest set of largest-probability tokens whose mass reaches top_p
//      (ties with the last token of that set are kept too; top_p = 1: all)
//   8. min-p: drop tokens whose probability is below min_p * (largest probability)
//   9. draw: argmax over kept tokens of s + Gumbel(seed, token_index, id), lowest id on ties
//      (the Gumbel-max form: exact in distribution, softmax of s over the kept set, and it
//      reduces exactly across vocabulary tiles and ranks)
// Probabilities in 7 and 8 are softmax of s over the tokens the earlier filters kept; the
// largest-logit token is always kept, so the kept set is never empty. Each filter keeps all
// logits above a threshold, so 6-8 compose as thresholds. Top-p sums its mass from float
// weights (relative error ~3e-7 each): a cut within that distance of top_p may go either
// way, as it would with any other rounding.
// Reported logprobs are log-softmax of the raw model logits (before any step above, after
// input cleaning; the normalizer to ~1e-6 relative); if every raw logit is -inf or NaN,
// every reported logprob is -inf.
//
// Cost per call on a 128k vocabulary: a handful of linear passes (cleaning copy, max, a
// vectorized exp sum for the logprobs, the draw's hash per token, which a cheap bound keeps
// from needing logarithms for nearly all tokens); top-k uses a k-heap and, for k <= 1024,
// restricts the later steps to its short list; top-p a histogram of the mass, never a sort
// of the vocabulary.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
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

// Checks what sample_token assumes: a non-empty vocabulary, temperature >= 0, top_k >= 0,
// top_p in (0, 1], min_p in [0, 1], a finite repetition penalty > 0, finite frequency and
// presence penalties, logprobs >= 0, and context token ids inside [0, vocab_size). The error
// names the offending field. sample_token itself never fails: it reads out-of-range values
// by their nearest meaning (temperature <= 0 or NaN is greedy, top_p <= 0 keeps only the
// top tokens, min_p > 1 acts as 1) and ignores context ids outside the vocabulary.
absl::Status validate_sampling_inputs(int64_t vocab_size, const scheduler::SamplingParams& params,
                                      const SamplingContext& context);

// Samples one token from `logits` (vocab_size values, fp32, not modified; vocab_size >= 1,
// an empty span gives token 0 with logprob 0 rather than undefined behaviour).
// Fills token_id, logprob and top_logprobs (min(params.logprobs, vocab_size) entries of the
// raw logits' log-softmax, best first, lower id first on ties); request_id is left 0 for the
// caller. Cost: a few linear passes over the vocabulary; top-k and top-p use selection, not
// a full sort.
scheduler::SampledToken sample_token(std::span<const float> logits,
                                     const scheduler::SamplingParams& params,
                                     const SamplingContext& context);

// Steps 1-3 above, after input cleaning: the logits the filters and the draw start from
// (vocab_size values; banned ids are -inf).
std::vector<float> apply_penalties(std::span<const float> logits,
                                   const scheduler::SamplingParams& params,
                                   const SamplingContext& context);

// Counter-based randomness shared with the GPU: a uniform in (0, 1) and the standard
// Gumbel noise -log(-log(u)) for (seed, token_index, vocab id). Pure functions of the key;
// the same values as rng::uniform_for / rng::gumbel_for in engine/isa/counter_rng.h.
double uniform_for(uint64_t seed, int64_t token_index, int32_t vocab_id);
double gumbel_for(uint64_t seed, int64_t token_index, int32_t vocab_id);

}  // namespace megaserve::engine
