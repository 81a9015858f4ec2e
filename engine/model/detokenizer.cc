// IncrementalDetokenizer (declared in tokenizer.h): streaming text deltas from token ids.
//
// Two facts about sentencepiece's decode make per-token decoding wrong, and shape this code:
//  - It drops the leading space of the first piece that has text ("▁the" alone decodes to
//    "the"). So each new id is decoded behind a context of already-emitted ids whose text
//    is non-empty, and the delta is the decoded window minus the context's text.
//  - Consecutive byte-fallback pieces are joined and decoded as UTF-8, one U+FFFD per byte
//    that does not form a valid character. A run that ends in the first bytes of a
//    character decodes to U+FFFDs now and to the character later, so the window is not
//    decoded while it ends that way (at most three byte pieces are held).
// Any other piece's text depends only on the piece, so decode(a + b) = decode(a) + decode'(b)
// once decode(a) is non-empty, which is what makes the window exact.
//
// Byte-level tokenizers (byte_level()) are simpler: decode() is the lossy UTF-8 reading of
// the tokens' bytes joined, with no position-dependent rule, so push() keeps the bytes not
// emitted yet and emits all but an incomplete character at their end (utf8.h says why the
// lossy reading of what comes before it is final).
#include <algorithm>
#include <string>
#include <vector>

#include "engine/model/tokenizer.h"
#include "engine/model/utf8.h"

namespace megaserve::engine {

namespace {

// The number of continuation bytes a UTF-8 lead byte announces; -1 for a byte that cannot
// lead. Deliberately permissive (accepts overlong and surrogate leads): holding back a
// sequence that turns out invalid only delays its U+FFFDs.
int continuation_bytes(int lead) {
  if (lead >= 0xC0 && lead <= 0xDF) return 1;
  if (lead >= 0xE0 && lead <= 0xEF) return 2;
  if (lead >= 0xF0 && lead <= 0xF7) return 3;
  return -1;
}

bool is_continuation(int byte) { return byte >= 0x80 && byte <= 0xBF; }

}  // namespace

IncrementalDetokenizer::IncrementalDetokenizer(const Tokenizer& tokenizer) : tokenizer_(tokenizer) {
  // 0xFF never occurs in UTF-8, so its byte piece decodes to exactly U+FFFD, turns a
  // character in progress before it into U+FFFDs, and nothing after it can combine with it.
  replacement_id_ = tokenizer_.piece_id("<0xFF>");
  if (replacement_id_ < 0 || tokenizer_.byte_value(replacement_id_) != 0xFF) {
    replacement_id_ = tokenizer_.unk_id();
  }
}

std::string IncrementalDetokenizer::decode_window(size_t begin, size_t end) const {
  const std::vector<int32_t> ids(window_.begin() + begin, window_.begin() + end);
  // Every id in window_ was checked (or replaced) in push(), so decode cannot fail.
  return tokenizer_.decode(ids).value();
}

bool IncrementalDetokenizer::ends_in_incomplete_char() const {
  int continuations = 0;
  // Only the ids after the context can be involved: the context was emitted, so it did
  // not end inside a character, and a lead byte in it would have made it do so.
  for (size_t i = window_.size(); i > context_size_;) {
    --i;
    const int byte = tokenizer_.byte_value(window_[i]);
    if (byte < 0) return false;  // the byte run ends before any lead byte
    if (!is_continuation(byte)) return continuations < continuation_bytes(byte);
    if (++continuations > 3) return false;
  }
  return false;
}

std::string IncrementalDetokenizer::push_bytes(int32_t id) {
  if (id < 0 || id >= tokenizer_.vocab_size()) {
    pending_bytes_.append("\xEF\xBF\xBD");  // U+FFFD, as the class comment promises
  } else {
    pending_bytes_.append(tokenizer_.token_bytes(id));
  }
  const size_t final_bytes = pending_bytes_.size() - utf8_incomplete_tail(pending_bytes_);
  std::string delta = utf8_lossy(std::string_view(pending_bytes_).substr(0, final_bytes));
  pending_bytes_.erase(0, final_bytes);
  return delta;
}

std::string IncrementalDetokenizer::push(int32_t id) {
  if (tokenizer_.byte_level()) return push_bytes(id);
  if (id < 0 || id >= tokenizer_.vocab_size()) id = replacement_id_;
  window_.push_back(id);
  if (ends_in_incomplete_char()) return "";

  const std::string text = decode_window(0, window_.size());
  if (text.size() <= context_text_size_) return "";  // e.g. BOS, EOS, a leading "▁"
  std::string delta = text.substr(context_text_size_);

  // The new ids become the next context when they have text of their own; a lone "▁"
  // decodes to "" at the start of a window, so then the whole window stays as context.
  const std::string new_context =
      context_size_ == 0 ? text : decode_window(context_size_, window_.size());
  if (!new_context.empty()) {
    window_.erase(window_.begin(), window_.begin() + context_size_);
    context_text_size_ = new_context.size();
  } else {
    context_text_size_ = text.size();
  }
  context_size_ = window_.size();
  return delta;
}

void IncrementalDetokenizer::set_prompt_context(const std::vector<int32_t>& prompt_ids) {
  if (tokenizer_.byte_level()) return;
  window_.clear();
  context_size_ = 0;
  context_text_size_ = 0;
  const size_t n = std::min(prompt_ids.size(), kPromptContextIds);
  for (size_t i = prompt_ids.size() - n; i < prompt_ids.size(); ++i) {
    const int32_t id = prompt_ids[i];
    window_.push_back(id < 0 || id >= tokenizer_.vocab_size() ? replacement_id_ : id);
  }
  // A prompt ending in the first bytes of a character: those byte pieces cannot be context
  // (their text is not final); the character's completion then decodes as U+FFFDs.
  while (!window_.empty() && ends_in_incomplete_char()) window_.pop_back();
  const std::string text = decode_window(0, window_.size());
  if (text.empty()) {  // e.g. only BOS: nothing to anchor the leading-space rule on
    window_.clear();
    return;
  }
  context_size_ = window_.size();
  context_text_size_ = text.size();
}

std::string IncrementalDetokenizer::flush() {
  if (tokenizer_.byte_level()) {
    std::string rest = utf8_lossy(pending_bytes_);
    pending_bytes_.clear();
    return rest;
  }
  const std::string text = decode_window(0, window_.size());
  std::string rest = text.size() > context_text_size_ ? text.substr(context_text_size_) : "";
  window_.clear();
  context_size_ = 0;
  context_text_size_ = 0;
  return rest;
}

}  // namespace megaserve::engine
