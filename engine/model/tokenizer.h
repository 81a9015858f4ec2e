// Text <-> token ids through a sentencepiece model (tokenizer.model), and incremental
// detokenization for streaming. sentencepiece's header is included by tokenizer.cc alone:
// Debian's copy defines its own absl::string_view, which clashes with Abseil's.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace megaserve::engine {

// Immutable once loaded: every method is const and may be called from several threads.
class Tokenizer {
 public:
  // NotFound when the file does not exist, InvalidArgument when it is a folder or not a
  // sentencepiece model; the message names the file.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> load(const std::filesystem::path& model_file);
  ~Tokenizer();

  // Any bytes are accepted. With byte fallback and no normalization (Llama), valid UTF-8
  // round-trips through decode() exactly, except that "▁" (U+2581, sentencepiece's space
  // symbol) comes back as a space; each byte that does not start a valid UTF-8 character
  // comes back as U+FFFD.
  std::vector<int32_t> encode(std::string_view text, bool add_bos) const;
  // Ids outside [0, vocab_size) give InvalidArgument naming the first one. Control ids
  // (BOS, EOS) decode to nothing; the first piece's leading space is dropped.
  absl::StatusOr<std::string> decode(const std::vector<int32_t>& ids) const;

  int vocab_size() const;
  int32_t bos_id() const;
  int32_t eos_id() const;
  int32_t unk_id() const;
  std::string piece(int32_t id) const;  // the raw piece, e.g. "▁the" or "<0x0A>"; "" if invalid
  // The id of a piece given as piece() spells it, or -1 when the vocabulary lacks it.
  int32_t piece_id(std::string_view piece) const;
  // For a byte-fallback piece <0xHH>: the byte HH (0..255); -1 for every other id.
  int byte_value(int32_t id) const;
  // The most bytes of input text that one token can stand for, or 0 when nothing bounds it:
  // encode(text, false) has at least ceil(countable_bytes(text) / max_input_bytes_per_token())
  // tokens, so a server can refuse a prompt that can never fit its context before tokenizing
  // it. It is the longest piece in bytes: pieces spell normalized text, and an identity
  // normalizer shrinks no character (a space becomes "▁", 3 bytes; an invalid byte U+FFFD;
  // a dummy prefix adds one), while byte-fallback pieces cover 1 byte each. 0 with a
  // normalization rule other than identity (NFKC may drop characters) or without byte
  // fallback (one unknown token may cover a run of characters). Computed once at load.
  int64_t max_input_bytes_per_token() const;
  // The bytes of `text` that survive normalization, at least: all of them, or, when the
  // normalizer folds whitespace (remove_extra_whitespaces, e.g. stories260K's), all but the
  // spaces (U+0020), which it may drop by the million. One pass over the bytes.
  int64_t countable_bytes(std::string_view text) const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Turns a stream of ids into a stream of text deltas whose concatenation equals
// decode(all ids). A delta never ends inside a UTF-8 sequence: bytes of a character split
// over several byte-fallback pieces are held back until it is complete. An id outside
// [0, vocab_size) (which decode() rejects) is rendered as U+FFFD and the stream goes on.
// Cost per push is a decode of a short window of recent ids, not of the whole sequence.
// Implemented in detokenizer.cc.
class IncrementalDetokenizer {
 public:
  explicit IncrementalDetokenizer(const Tokenizer& tokenizer);
  // Appends one id and returns the text that became final (often "", e.g. for BOS/EOS).
  std::string push(int32_t id);
  // Ends the stream: returns the text still held back (an incomplete UTF-8 tail, decoded as
  // sentencepiece does, i.e. one U+FFFD per byte). Pushing after flush() starts a new stream.
  std::string flush();

 private:
  // decode(window_[begin, end)); every id in window_ is valid.
  std::string decode_window(size_t begin, size_t end) const;
  // True when window_ ends in byte-fallback pieces that form a proper prefix of a UTF-8
  // character, which the next pieces may still complete.
  bool ends_in_incomplete_char() const;

  const Tokenizer& tokenizer_;
  int32_t replacement_id_;  // decodes to U+FFFD alone: <0xFF> with byte fallback, else unk
  // window_[0, context_size_) are ids whose text was already emitted, kept as context;
  // the rest are not emitted yet. Once anything was emitted, the context decodes to
  // context_text_size_ > 0 bytes, so sentencepiece's rule "drop the leading space of the
  // first piece" falls on the context and the new text is decode(window_) minus that prefix.
  // Before the first emission the window holds every id since the stream began.
  std::vector<int32_t> window_;
  size_t context_size_ = 0;
  size_t context_text_size_ = 0;
};

}  // namespace megaserve::engine
