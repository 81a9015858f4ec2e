// Per-request sampling and stopping parameters. Defaults are the neutral values: a field
// the client did not set means "off", never zero-by-accident (temperature defaults to 1).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace megaserve::scheduler {

struct SamplingParams {
  float temperature = 1.0f;  // 0 means greedy
  int top_k = 0;             // 0 means off
  float top_p = 1.0f;        // 1 means off
  float min_p = 0.0f;        // 0 means off
  float repetition_penalty = 1.0f;  // over prompt and output tokens; 1 means off
  float frequency_penalty = 0.0f;   // over output tokens
  float presence_penalty = 0.0f;    // over output tokens
  std::optional<uint64_t> seed;     // unset: the engine draws one per request
  int max_tokens = 16;
  int min_tokens = 0;  // EOS and stop token ids are suppressed until this many are generated
  std::vector<int32_t> stop_token_ids;
  std::vector<std::string> stop_strings;  // matched on text by the output side
  bool ignore_eos = false;
  int logprobs = 0;  // top-N alternatives to report; the chosen token's logprob always is
};

}  // namespace megaserve::scheduler
