// The split step of byte-level BPE pre-tokenization: a Unicode regex whose matches, and the
// text between them, become the pieces BPE encodes one at a time (Hugging Face tokenizers'
// Split pre-tokenizer with behavior "Isolated"). Runs on PCRE2 with its JIT: the patterns
// need \p{L}/\p{N} and lookahead, which std::regex lacks, and PCRE2 is a Debian package.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace megaserve::engine {

// GPT-2's split (tokenizers' ByteLevel pre-tokenizer with use_regex; SmolLM2).
inline constexpr std::string_view kGpt2SplitPattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
// Llama-3's split: case-insensitive contractions, digits in runs of up to three.
inline constexpr std::string_view kLlama3SplitPattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3})"
    R"(| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
// Qwen2's split (Qwen2, Qwen2.5, Qwen3): Llama-3's with single digits.
inline constexpr std::string_view kQwen2SplitPattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N})"
    R"(| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// The split pattern that a GGUF file's tokenizer.ggml.pre names, as transformers' GGUF
// loader maps it; nullptr for a name this project does not support.
const std::string_view* split_pattern_for_gguf_pre(std::string_view pre);

class RegexSplitter {
 public:
  // Compiles `pattern` as the tokenizers library reads it (Oniguruma, Ruby syntax): \s and
  // \S are rewritten to Oniguruma's Unicode White_Space set, which PCRE2's \s lacks U+0085
  // of. InvalidArgument when PCRE2 refuses the pattern.
  static absl::StatusOr<std::unique_ptr<RegexSplitter>> create(std::string_view pattern);
  ~RegexSplitter();
  RegexSplitter(const RegexSplitter&) = delete;
  RegexSplitter& operator=(const RegexSplitter&) = delete;

  // Appends to `pieces` the matches of the pattern in `text` (well-formed UTF-8) and the
  // non-empty gaps between them, in order; their concatenation is `text`. Thread-safe.
  void split(std::string_view text, std::vector<std::string_view>* pieces) const;

  const std::string& pattern() const { return pattern_; }

 private:
  RegexSplitter() = default;
  std::string pattern_;   // as given
  void* code_ = nullptr;  // pcre2_code_8*
  bool jit_ = false;      // JIT-compiled
};

// \s and \S in `pattern` (inside and outside character classes) spelled as explicit sets of
// Oniguruma's Unicode White_Space. Exposed for tests.
std::string rewrite_whitespace_classes(std::string_view pattern);

}  // namespace megaserve::engine
