// The ShareGPT workload as the peers' serving benchmark builds it: turn 0 of each
// conversation is the prompt, the token length of turn 1 is the output length; pairs that
// are too short or too long are dropped; the rest are shuffled with a seed and the first N
// taken.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace megaserve::bench {

struct ConversationPair {
  std::string prompt;      // turn 0
  std::string completion;  // turn 1
  bool has_completion = true;  // false for a lone first turn (usable with a fixed output length)
};

// Parses a ShareGPT JSON file ([{"conversations": [{"from", "value"}, ...]}, ...]); entries
// with no turn are skipped, a lone turn 0 gives a pair without completion (sample_requests
// uses it only with a fixed output length). `source` names the file in errors.
absl::StatusOr<std::vector<ConversationPair>> parse_sharegpt(const std::string& json_text,
                                                             const std::string& source);
absl::StatusOr<std::vector<ConversationPair>> read_sharegpt(const std::filesystem::path& file);

struct SampleOptions {
  int num_requests = 1000;
  uint64_t seed = 0;
  int min_prompt_len = 4;
  int min_output_len = 4;  // not applied with fixed_output_len
  int max_prompt_len = 1024;
  int max_total_len = 2048;             // prompt + output
  std::optional<int> fixed_output_len;  // instead of turn 1's length
};

struct BenchRequest {
  std::string prompt;
  int prompt_len = 0;  // tokens, with BOS, as the server will see them
  int output_len = 0;  // tokens to generate (max_tokens, with ignore_eos)
};

// Token count of `text`, with BOS when `add_bos`.
using TokenCounter = std::function<absl::StatusOr<int>(const std::string& text, bool add_bos)>;

// Shuffles `pairs` with `seed`, then walks them in order keeping those that pass the
// filters until num_requests are kept (fewer when the data runs out). The prompt is counted
// with BOS, the completion without (the tokens the server will generate).
absl::StatusOr<std::vector<BenchRequest>> sample_requests(std::vector<ConversationPair> pairs,
                                                          const SampleOptions& options,
                                                          const TokenCounter& count_tokens);

// Fisher-Yates with a 64-bit Mersenne Twister and a plain modulo-free draw, so that a seed
// gives the same order with every standard library.
template <typename T>
void seeded_shuffle(std::vector<T>& items, uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (size_t i = items.size(); i > 1; --i) {
    // Uniform in [0, i) by rejection: limit is the largest multiple of i below 2^64.
    const uint64_t limit = UINT64_MAX - UINT64_MAX % i;
    uint64_t r;
    do {
      r = rng();
    } while (r >= limit);
    std::swap(items[i - 1], items[r % i]);
  }
}

}  // namespace megaserve::bench
