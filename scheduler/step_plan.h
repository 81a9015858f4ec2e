// StepPlan: what one engine step computes, decided by the scheduler and turned into
// instruction queues by the engine's ScheduleBuilder. A plain record that tests build by
// hand; it knows nothing of instructions or devices.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "scheduler/sampling_params.h"

namespace megaserve::scheduler {

// Input id placeholder under overlapped scheduling: the token is the one sampled for this
// request in the previous step, not known when the plan is made. The engine's StepRunner
// resolves it (engine/step_runner.h): the token itself, or a reference to that step's
// sampling row that the GPU reads straight from device memory.
inline constexpr int32_t kTokenFromPreviousStep = -1;

struct StepRequest {
  uint64_t request_id = 0;
  // This step's input tokens, at positions first_position, first_position + 1, ...
  std::vector<int32_t> token_ids;
  int32_t first_position = 0;  // = num_computed_tokens before this step
  // KV blocks holding positions [0, first_position + token_ids.size()), in order.
  std::vector<int32_t> block_table;
  bool sample = false;  // true when the last input token's logits are sampled this step
  SamplingParams sampling;
  // For penalties and the seeded generator: the prompt and the tokens generated so far.
  std::span<const int32_t> prompt_token_ids;
  std::span<const int32_t> output_token_ids;
  uint64_t seed = 0;  // resolved seed (SamplingParams::seed or one the engine drew)
  // When sample: ids the sampler must not draw this step (EOS unless ignore_eos, and the
  // stop token ids) because fewer than sampling.min_tokens tokens precede this one.
  std::vector<int32_t> banned_token_ids;
  // When sample: index in the output of the token drawn this step (0 for the first). Under
  // overlapped scheduling output_token_ids lacks tokens still in flight, so this can exceed
  // output_token_ids.size(); use it for the seeded generator's token index.
  int32_t output_token_index = 0;

  int32_t num_tokens() const { return static_cast<int32_t>(token_ids.size()); }
  int32_t context_length() const { return first_position + num_tokens(); }
};

struct StepPlan {
  uint64_t step_id = 0;
  int32_t kv_block_size = 16;
  std::vector<StepRequest> requests;

  int32_t num_tokens() const {
    int32_t n = 0;
    for (const auto& r : requests) n += r.num_tokens();
    return n;
  }
};

// What a backend returns for one step: for each request that sampled, in StepPlan order.
struct SampledToken {
  uint64_t request_id = 0;
  int32_t token_id = 0;
  float logprob = 0.0f;
  std::vector<std::pair<int32_t, float>> top_logprobs;  // best first, size = logprobs
};

struct StepOutput {
  uint64_t step_id = 0;
  std::vector<SampledToken> sampled;
};

}  // namespace megaserve::scheduler
