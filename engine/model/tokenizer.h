// Text <-> token ids, and incremental detokenization for streaming. Two kinds of tokenizer
// stand behind one interface: sentencepiece models (tokenizer.model; tokenizer.cc, the one
// file that includes sentencepiece's header: Debian's copy defines its own absl::string_view,
// which clashes with Abseil's) and byte-level BPE (tokenizer.json or a GGUF vocabulary;
// bpe_tokenizer.h). load_tokenizer() picks by file type.
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
  // A sentencepiece model. NotFound when the file does not exist, InvalidArgument when it
  // is a folder or not a sentencepiece model; the message names the file.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> load(const std::filesystem::path& model_file);
  virtual ~Tokenizer();

  // Any bytes are accepted. Sentencepiece: with byte fallback and no normalization (Llama),
  // valid UTF-8 round-trips through decode() exactly, except that "▁" (U+2581,
  // sentencepiece's space symbol) comes back as a space; each byte that does not start a
  // valid UTF-8 character comes back as U+FFFD. Byte-level BPE: see bpe_tokenizer.h.
  // add_bos: sentencepiece prepends BOS; byte-level BPE adds what the model's post-processor
  // adds (Hugging Face's add_special_tokens), which may be nothing (Qwen, SmolLM2).
  virtual std::vector<int32_t> encode(std::string_view text, bool add_bos) const = 0;
  // Ids outside [0, vocab_size) give InvalidArgument naming the first one. Control ids
  // (BOS, EOS) decode to nothing; sentencepiece drops the first piece's leading space.
  virtual absl::StatusOr<std::string> decode(const std::vector<int32_t>& ids) const = 0;

  virtual int vocab_size() const = 0;
  virtual int32_t bos_id() const = 0;  // -1 when the model has none
  virtual int32_t eos_id() const = 0;
  virtual int32_t unk_id() const = 0;
  // The raw piece, e.g. "▁the" or "<0x0A>" (sentencepiece), "Ġthe" (byte-level BPE);
  // "" if invalid.
  virtual std::string piece(int32_t id) const = 0;
  // The id of a piece given as piece() spells it, or -1 when the vocabulary lacks it.
  virtual int32_t piece_id(std::string_view piece) const = 0;
  // For a byte-fallback piece <0xHH>: the byte HH (0..255); -1 for every other id.
  virtual int byte_value(int32_t id) const = 0;
  // Byte-level tokenizers decode by concatenating each token's bytes (token_bytes) and
  // reading the result as UTF-8; IncrementalDetokenizer relies on that.
  virtual bool byte_level() const { return false; }
  // The bytes a token stands for in decode(): "" for control tokens and invalid ids. Only
  // meaningful when byte_level().
  virtual std::string_view token_bytes(int32_t /*id*/) const { return {}; }
  // The most bytes of input text that one token can stand for, or 0 when nothing bounds it:
  // encode(text, false) has at least ceil(countable_bytes(text) / max_input_bytes_per_token())
  // tokens, so a server can refuse a prompt that can never fit its context before tokenizing
  // it. Sentencepiece: the longest piece in bytes: pieces spell normalized text, and an
  // identity normalizer shrinks no character (a space becomes "▁", 3 bytes; an invalid byte
  // U+FFFD; a dummy prefix adds one), while byte-fallback pieces cover 1 byte each. 0 with a
  // normalization rule other than identity (NFKC may drop characters) or without byte
  // fallback (one unknown token may cover a run of characters). Computed once at load.
  virtual int64_t max_input_bytes_per_token() const = 0;
  // The bytes of `text` that survive normalization, at least: all of them, or, when the
  // normalizer folds whitespace (remove_extra_whitespaces, e.g. stories260K's), all but the
  // spaces (U+0020), which it may drop by the million. One pass over the bytes.
  virtual int64_t countable_bytes(std::string_view text) const = 0;

 protected:
  Tokenizer() = default;
};

// Loads the tokenizer a file holds, by its type: a GGUF file (magic "GGUF": the vocabulary
// in its metadata), a Hugging Face tokenizer.json (a JSON object), else a sentencepiece
// model. Errors name the file and the problem.
absl::StatusOr<std::unique_ptr<Tokenizer>> load_tokenizer(const std::filesystem::path& path);

// Turns a stream of ids into a stream of text deltas whose concatenation equals
// decode(all ids). A delta never ends inside a UTF-8 sequence: bytes of a character split
// over several byte-fallback pieces (sentencepiece) or byte-level tokens (BPE, where one
// token may hold the end of one character and the start of the next) are held back until it
// is complete. An id outside
// [0, vocab_size) (which decode() rejects) is rendered as U+FFFD and the stream goes on.
// Cost per push is a decode of a short window of recent ids, not of the whole sequence.
// Implemented in detokenizer.cc.
class IncrementalDetokenizer {
 public:
  explicit IncrementalDetokenizer(const Tokenizer& tokenizer);
  // Makes the deltas the text that the pushed ids add after `prompt_ids` (call before the
  // first push): sentencepiece then keeps the leading space of the first generated piece,
  // which decode() of the generated ids alone drops, so that prompt text + deltas = the
  // full text. Only the prompt's last ids are kept (up to kPromptContextIds, fewer when
  // they end inside a UTF-8 character). Byte-level tokenizers have no position-dependent
  // rule, so for them it does nothing.
  void set_prompt_context(const std::vector<int32_t>& prompt_ids);
  static constexpr size_t kPromptContextIds = 4;
  // Appends one id and returns the text that became final (often "", e.g. for BOS/EOS).
  std::string push(int32_t id);
  // Ends the stream: returns the text still held back (an incomplete UTF-8 tail, decoded as
  // decode() would: one U+FFFD per byte with sentencepiece, one for the whole tail with
  // byte-level BPE). Pushing after flush() starts a new stream.
  std::string flush();

 private:
  // decode(window_[begin, end)); every id in window_ is valid.
  std::string decode_window(size_t begin, size_t end) const;
  // True when window_ ends in byte-fallback pieces that form a proper prefix of a UTF-8
  // character, which the next pieces may still complete.
  bool ends_in_incomplete_char() const;

  // Byte-level tokenizers: the bytes of the pushed tokens not emitted yet, at most the
  // start of one UTF-8 character (up to 3 bytes) between pushes.
  std::string push_bytes(int32_t id);
  std::string pending_bytes_;

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
