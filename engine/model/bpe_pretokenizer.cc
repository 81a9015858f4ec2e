#include "engine/model/bpe_pretokenizer.h"

#include <array>
#include <cstdint>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

namespace megaserve::engine {

namespace {

// Oniguruma's \s under Unicode: the White_Space property (checked against tokenizers on
// every code point). PCRE2's \s with UCP is the Z categories and \t-\r, without U+0085.
constexpr std::string_view kWhiteSpaceSet =
    R"(\t-\r\x{20}\x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000})";

struct MatchDataDeleter {
  void operator()(pcre2_match_data* data) const { pcre2_match_data_free(data); }
};
struct JitStackDeleter {
  void operator()(pcre2_jit_stack* stack) const { pcre2_jit_stack_free(stack); }
};

}  // namespace

const std::string_view* split_pattern_for_gguf_pre(std::string_view pre) {
  // transformers' GGUF loader keeps GPT2Tokenizer's byte-level regex for names it does not
  // list (as "smollm" and "gpt-2"); the others are its table's entries for these patterns.
  static constexpr std::array<std::pair<std::string_view, const std::string_view*>, 10> kTable = {{
      {"gpt-2", &kGpt2SplitPattern},
      {"smollm", &kGpt2SplitPattern},
      {"llama3", &kLlama3SplitPattern},
      {"llama-v3", &kLlama3SplitPattern},
      {"llama-bpe", &kLlama3SplitPattern},
      {"smaug-bpe", &kLlama3SplitPattern},
      {"dbrx", &kLlama3SplitPattern},
      {"falcon3", &kLlama3SplitPattern},
      {"qwen2", &kQwen2SplitPattern},
      {"deepseek-r1-qwen", &kQwen2SplitPattern},
  }};
  for (const auto& [name, pattern] : kTable) {
    if (name == pre) return pattern;
  }
  return nullptr;
}

std::string rewrite_whitespace_classes(std::string_view pattern) {
  std::string out;
  bool in_class = false;
  for (size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      const char next = pattern[++i];
      const std::string set(kWhiteSpaceSet);
      if (next == 's') {
        out += in_class ? set : "[" + set + "]";
      } else if (next == 'S' && !in_class) {
        out += "[^" + set + "]";
      } else {
        // \S inside a class has no single-class spelling; left to PCRE2 (no pattern here
        // uses it).
        out.push_back('\\');
        out.push_back(next);
      }
      continue;
    }
    if (c == '[' && !in_class) {
      in_class = true;
      out.push_back(c);
      // A ']' right after '[' or '[^' is a literal.
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out.push_back(pattern[++i]);
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') out.push_back(pattern[++i]);
      continue;
    }
    if (c == ']' && in_class) in_class = false;
    out.push_back(c);
  }
  return out;
}

absl::StatusOr<std::unique_ptr<RegexSplitter>> RegexSplitter::create(std::string_view pattern) {
  const std::string rewritten = rewrite_whitespace_classes(pattern);
  int error = 0;
  PCRE2_SIZE offset = 0;
  pcre2_code* code =
      pcre2_compile(reinterpret_cast<PCRE2_SPTR>(rewritten.data()), rewritten.size(),
                    PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK, &error, &offset, nullptr);
  if (code == nullptr) {
    std::array<PCRE2_UCHAR, 256> message{};
    pcre2_get_error_message(error, message.data(), message.size());
    return absl::InvalidArgumentError(
        absl::StrCat("split regex ", std::string(pattern), " does not compile (",
                     reinterpret_cast<const char*>(message.data()), " at offset ", offset, ")"));
  }
  std::unique_ptr<RegexSplitter> splitter(new RegexSplitter());
  splitter->pattern_ = std::string(pattern);
  splitter->code_ = code;
  // Without JIT support (some architectures) pcre2_match interprets; same results.
  splitter->jit_ = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
  return splitter;
}

RegexSplitter::~RegexSplitter() { pcre2_code_free(static_cast<pcre2_code*>(code_)); }

void RegexSplitter::split(std::string_view text, std::vector<std::string_view>* pieces) const {
  auto* code = static_cast<pcre2_code*>(code_);
  // Per thread: match data for the whole match only (the patterns' groups are not read; a
  // match with more groups still reports its bounds), and a JIT stack large enough for long
  // whitespace runs (the default 32 KiB is not).
  thread_local std::unique_ptr<pcre2_match_data, MatchDataDeleter> data(
      pcre2_match_data_create(1, nullptr));
  thread_local std::unique_ptr<pcre2_jit_stack, JitStackDeleter> jit_stack;
  pcre2_match_context* context = nullptr;
  thread_local std::unique_ptr<pcre2_match_context, void (*)(pcre2_match_context*)> jit_context(
      nullptr, pcre2_match_context_free);
  if (jit_) {
    if (jit_stack == nullptr) jit_stack.reset(pcre2_jit_stack_create(32 * 1024, 8 << 20, nullptr));
    if (jit_context == nullptr) {
      jit_context.reset(pcre2_match_context_create(nullptr));
      pcre2_jit_stack_assign(jit_context.get(), nullptr, jit_stack.get());
    }
    context = jit_context.get();
  }
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t start = 0;  // where the next gap begins
  size_t at = 0;     // where the next search begins
  while (at < text.size()) {
    const int rc =
        pcre2_match(code, subject, text.size(), at, PCRE2_NO_UTF_CHECK, data.get(), context);
    if (rc < 0) break;  // no match (or a resource limit): the rest is one gap
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(data.get());
    const size_t begin = ovector[0];
    size_t end = ovector[1];
    if (end == begin) {
      // An empty match splits nothing; search on from the next character.
      at = begin + 1;
      while (at < text.size() && (static_cast<uint8_t>(text[at]) & 0xC0) == 0x80) ++at;
      continue;
    }
    if (begin > start) pieces->push_back(text.substr(start, begin - start));
    pieces->push_back(text.substr(begin, end - begin));
    start = at = end;
  }
  if (start < text.size()) pieces->push_back(text.substr(start));
}

}  // namespace megaserve::engine
