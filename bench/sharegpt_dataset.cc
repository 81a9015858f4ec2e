#include "bench/sharegpt_dataset.h"

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace megaserve::bench {

absl::StatusOr<std::vector<ConversationPair>> parse_sharegpt(const std::string& json_text,
                                                             const std::string& source) {
  nlohmann::json doc = nlohmann::json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": not valid JSON"));
  }
  if (!doc.is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": expected a JSON array of conversations"));
  }
  std::vector<ConversationPair> pairs;
  for (size_t i = 0; i < doc.size(); ++i) {
    const nlohmann::json& entry = doc[i];
    if (!entry.is_object() || !entry.contains("conversations") ||
        !entry["conversations"].is_array()) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": entry ", i, " has no \"conversations\" array"));
    }
    const nlohmann::json& turns = entry["conversations"];
    if (turns.empty()) continue;
    const int num_turns = turns.size() < 2 ? 1 : 2;
    for (int t = 0; t < num_turns; ++t) {
      if (!turns[t].is_object() || !turns[t].contains("value") || !turns[t]["value"].is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat(source, ": entry ", i, " turn ", t, " has no string \"value\""));
      }
    }
    if (num_turns == 1) {
      pairs.push_back({turns[0]["value"].get<std::string>(), "", /*has_completion=*/false});
    } else {
      pairs.push_back({turns[0]["value"].get<std::string>(), turns[1]["value"].get<std::string>()});
    }
  }
  return pairs;
}

absl::StatusOr<std::vector<ConversationPair>> read_sharegpt(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(file.string(), ": cannot open"));
  std::ostringstream text;
  text << in.rdbuf();
  return parse_sharegpt(text.str(), file.string());
}

absl::StatusOr<std::vector<BenchRequest>> sample_requests(std::vector<ConversationPair> pairs,
                                                          const SampleOptions& options,
                                                          const TokenCounter& count_tokens) {
  seeded_shuffle(pairs, options.seed);
  std::vector<BenchRequest> requests;
  for (ConversationPair& pair : pairs) {
    if (static_cast<int>(requests.size()) >= options.num_requests) break;
    if (!pair.has_completion && !options.fixed_output_len) continue;
    auto prompt_len = count_tokens(pair.prompt, /*add_bos=*/true);
    if (!prompt_len.ok()) return prompt_len.status();
    int output_len = 0;
    if (options.fixed_output_len) {
      output_len = *options.fixed_output_len;
    } else {
      auto completion_len = count_tokens(pair.completion, /*add_bos=*/false);
      if (!completion_len.ok()) return completion_len.status();
      output_len = *completion_len;
    }
    if (*prompt_len < options.min_prompt_len) continue;
    if (!options.fixed_output_len && output_len < options.min_output_len) continue;
    if (*prompt_len > options.max_prompt_len) continue;
    if (*prompt_len + output_len > options.max_total_len) continue;
    requests.push_back({std::move(pair.prompt), *prompt_len, output_len});
  }
  return requests;
}

}  // namespace megaserve::bench
