// Byte-level BPE (GPT-2's scheme, used by Llama-3, Qwen2/2.5/3 and SmolLM2) behind the
// Tokenizer interface, exact against Hugging Face `tokenizers`. Encoding:
//   1. invalid UTF-8 in the input becomes U+FFFD (utf8_lossy, as Python's "replace");
//   2. added tokens (special or not) are cut out first, leftmost-longest, and never split;
//   3. each stretch between them is normalized (NFC where the model asks, via ICU), split by
//      the model's regex (bpe_pretokenizer.h), and each piece's bytes are merged by rank;
//   4. add_bos prepends BOS where the post-processor (tokenizer.json) or
//      tokenizer.ggml.add_bos_token (GGUF) says the model wants it.
// Decoding joins the tokens' bytes (GPT-2's byte<->unicode map undone), skips special
// tokens, and reads the bytes as UTF-8 with U+FFFD for ill-formed sequences.
// Loaders for tokenizer.json and GGUF metadata build the plain BpeTokenizerSpec below.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model/tokenizer.h"

namespace megaserve::engine {

class GgufFile;

struct BpeAddedToken {
  int32_t id = 0;
  std::string content;   // matched in the raw text, as UTF-8
  bool special = false;  // skipped by decode()
};

// Everything a byte-level BPE tokenizer is made of; loaders fill it, tests build it by hand.
struct BpeTokenizerSpec {
  std::string source;  // the file, for error messages
  // Token strings indexed by id, in GPT-2's byte-level spelling ("Ġthe" for " the"); ids
  // that only an added token has may be left "".
  std::vector<std::string> vocab;
  // Merge rules, best first, each pair spelled as vocab spells tokens.
  std::vector<std::pair<std::string, std::string>> merges;
  std::vector<BpeAddedToken> added_tokens;
  std::string split_pattern;   // PCRE2/Oniguruma regex; "" for no split
  bool nfc = false;            // normalize each stretch to NFC first (Qwen)
  bool ignore_merges = false;  // a piece that is itself a token is not merged (tokenizers)
  bool add_bos = false;        // encode(text, true) prepends bos_id
  int32_t bos_id = -1;
  int32_t eos_id = -1;
};

// The GPT-2 byte->unicode map: bytes that are printable Latin-1 keep their code point, the
// rest go to U+0100 onwards in order. byte_level_char(0x20) = U+0120 'Ġ'.
char32_t byte_level_char(uint8_t byte);
// `bytes` spelled in that alphabet, one character per byte.
std::string byte_level_spelling(std::string_view bytes);
// True when `text` is well-formed UTF-8 whose every character is in that alphabet.
bool in_byte_level_alphabet(std::string_view text);

class BpeTokenizer final : public Tokenizer {
 public:
  // InvalidArgument, naming spec.source, for a merge whose tokens are not in the vocabulary,
  // a split pattern that does not compile, a BOS/EOS id out of range, an empty vocabulary.
  static absl::StatusOr<std::unique_ptr<BpeTokenizer>> create(BpeTokenizerSpec spec);
  ~BpeTokenizer() override;

  std::vector<int32_t> encode(std::string_view text, bool add_bos) const override;
  absl::StatusOr<std::string> decode(const std::vector<int32_t>& ids) const override;
  int vocab_size() const override { return static_cast<int>(token_bytes_.size()); }
  int32_t bos_id() const override { return bos_id_; }
  int32_t eos_id() const override { return eos_id_; }
  int32_t unk_id() const override { return -1; }
  std::string piece(int32_t id) const override;
  int32_t piece_id(std::string_view piece) const override;
  int byte_value(int32_t) const override { return -1; }
  bool byte_level() const override { return true; }
  std::string_view token_bytes(int32_t id) const override;
  // The longest token in bytes: every piece BPE sees is text the input spelled (an invalid
  // byte run becomes U+FFFD, 3 bytes, from at most 3 input bytes), so one token covers at
  // most that many input bytes. 0 with NFC, which may shrink text, and when a byte has no
  // token (it is dropped, as tokenizers drops it).
  int64_t max_input_bytes_per_token() const override { return max_input_bytes_per_token_; }
  int64_t countable_bytes(std::string_view text) const override {
    return static_cast<int64_t>(text.size());
  }

  bool adds_bos() const { return add_bos_; }

 private:
  struct Impl;
  explicit BpeTokenizer(std::unique_ptr<Impl> impl);
  // BPE of one pre-token (raw bytes), appended to `ids`.
  void encode_piece(std::string_view piece, std::vector<int32_t>* ids) const;
  // Normalization, split and BPE of a stretch of text with no added token in it.
  void encode_stretch(std::string_view text, std::vector<int32_t>* ids) const;

  std::unique_ptr<Impl> impl_;
  std::vector<std::string> token_bytes_;  // per id; "" for control tokens and unused ids
  int32_t bos_id_ = -1;
  int32_t eos_id_ = -1;
  bool add_bos_ = false;
  int64_t max_input_bytes_per_token_ = 0;
};

// A tokenizer.json (Hugging Face tokenizers) with a byte-level BPE model. Supported: model
// BPE (no byte fallback, no dropout, no subword prefix/suffix); normalizer none or NFC;
// pre_tokenizer ByteLevel (use_regex, no prefix space) or a Sequence of Split (Regex,
// Isolated) and ByteLevel (use_regex false); decoder ByteLevel; post_processor none,
// ByteLevel, TemplateProcessing with at most a leading special token (BOS), or a Sequence of
// those; added tokens without lstrip/rstrip/single_word. Anything else fails with a message
// naming the file and what is not supported.
absl::StatusOr<BpeTokenizerSpec> read_tokenizer_json(const std::filesystem::path& path);

// The tokenizer in a GGUF file's metadata: tokenizer.ggml.model "gpt2", tokens, merges,
// token_type (3 control: special added token; 4 user-defined: added token), bos/eos ids,
// add_bos_token (default false), and tokenizer.ggml.pre naming the split regex
// (split_pattern_for_gguf_pre). Other models or pre names fail naming the file.
absl::StatusOr<BpeTokenizerSpec> read_gguf_tokenizer(const GgufFile& file);

}  // namespace megaserve::engine
