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

class Tokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<Tokenizer>> load(const std::filesystem::path& model_file);
  ~Tokenizer();

  std::vector<int32_t> encode(std::string_view text, bool add_bos) const;
  // Ids outside [0, vocab_size) give InvalidArgument naming the first one.
  absl::StatusOr<std::string> decode(const std::vector<int32_t>& ids) const;

  int vocab_size() const;
  int32_t bos_id() const;
  int32_t eos_id() const;
  std::string piece(int32_t id) const;  // the raw piece, e.g. "▁the" or "<0x0A>"

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Turns a stream of ids into a stream of text deltas whose concatenation equals
// decode(all ids). A delta never ends inside a UTF-8 sequence: bytes of a character split
// over several byte-fallback pieces are held back until it is complete.
class IncrementalDetokenizer {
 public:
  explicit IncrementalDetokenizer(const Tokenizer& tokenizer);
  // Appends one id and returns the text that became final.
  std::string push(int32_t id);
  // Text still held back (an incomplete UTF-8 tail at the end of the stream).
  std::string flush();

 private:
  const Tokenizer& tokenizer_;
  std::vector<int32_t> ids_;
  size_t emitted_bytes_ = 0;
};

}  // namespace megaserve::engine
