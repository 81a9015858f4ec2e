// The Tokenizer over sentencepiece. This is the one file that includes
// sentencepiece_processor.h (see tokenizer.h for why).
#include "engine/model/tokenizer.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

// Debian's sentencepiece_processor.h opens `namespace absl { using std::string_view; }`,
// which is ambiguous next to Abseil's own absl::string_view class (this Abseil build does not
// alias std::string_view). Renaming the namespace for the span of the include gives
// sentencepiece a private alias; its functions take std::string_view either way, so the
// mangled names, and therefore linking against libsentencepiece, are unaffected. Every
// standard header it includes is included above, so the macro touches sentencepiece's text
// alone.
#define absl megaserve_sentencepiece_absl
#include <sentencepiece_processor.h>
#undef absl

namespace megaserve::engine {

namespace {

class SentencePieceTokenizer final : public Tokenizer {
 public:
  std::vector<int32_t> encode(std::string_view text, bool add_bos) const override;
  absl::StatusOr<std::string> decode(const std::vector<int32_t>& ids) const override;
  int vocab_size() const override { return processor.GetPieceSize(); }
  int32_t bos_id() const override { return processor.bos_id(); }
  int32_t eos_id() const override { return processor.eos_id(); }
  int32_t unk_id() const override { return processor.unk_id(); }
  std::string piece(int32_t id) const override;
  int32_t piece_id(std::string_view piece) const override;
  int byte_value(int32_t id) const override;
  int64_t max_input_bytes_per_token() const override { return max_input_bytes_per_token_; }
  int64_t countable_bytes(std::string_view text) const override;

  sentencepiece::SentencePieceProcessor processor;
  // byte_of_id[id] = HH for a byte-fallback piece <0xHH>, -1 otherwise.
  std::vector<int16_t> byte_of_id;
  int64_t max_input_bytes_per_token_ = 0;  // see tokenizer.h; 0: unbounded
  bool folds_spaces = false;               // NormalizerSpec.remove_extra_whitespaces
};

// Parses "<0xHH>", the spelling sentencepiece gives byte-fallback pieces.
int parse_byte_piece(const std::string& piece) {
  if (piece.size() != 6 || piece.compare(0, 3, "<0x") != 0 || piece[5] != '>') return -1;
  int value = 0;
  for (int i = 3; i < 5; ++i) {
    const char c = piece[i];
    int digit;
    if (c >= '0' && c <= '9') {
      digit = c - '0';
    } else if (c >= 'A' && c <= 'F') {
      digit = c - 'A' + 10;
    } else if (c >= 'a' && c <= 'f') {
      digit = c - 'a' + 10;
    } else {
      return -1;
    }
    value = value * 16 + digit;
  }
  return value;
}

// The NormalizerSpec fields that decide whether normalization can shrink a text, with
// sentencepiece_model.proto's defaults (Debian ships no generated header for it, so the
// few fields are read from the serialized ModelProto by hand).
struct NormalizerFacts {
  std::string name;                      // NormalizerSpec.name = 1
  bool has_charsmap = false;             // precompiled_charsmap = 2, non-empty
  bool remove_extra_whitespaces = true;  // = 4 [default = true]
  bool has_rule_tsv = false;             // normalization_rule_tsv = 6, non-empty
};

bool read_varint(std::string_view* in, uint64_t* value) {
  *value = 0;
  for (int shift = 0; shift < 64; shift += 7) {
    if (in->empty()) return false;
    const auto byte = static_cast<uint8_t>(in->front());
    in->remove_prefix(1);
    *value |= uint64_t{byte & 0x7fu} << shift;
    if ((byte & 0x80) == 0) return true;
  }
  return false;
}

// Reads one field's key and value; `bytes` is set for length-delimited fields.
bool read_field(std::string_view* in, uint64_t* number, uint64_t* varint, std::string_view* bytes) {
  uint64_t key = 0;
  if (!read_varint(in, &key)) return false;
  *number = key >> 3;
  *bytes = {};
  switch (key & 7) {
    case 0:
      return read_varint(in, varint);
    case 1:
    case 5: {
      const size_t size = (key & 7) == 1 ? 8 : 4;
      if (in->size() < size) return false;
      in->remove_prefix(size);
      return true;
    }
    case 2: {
      uint64_t size = 0;
      if (!read_varint(in, &size) || size > in->size()) return false;
      *bytes = in->substr(0, size);
      in->remove_prefix(size);
      return true;
    }
    default:
      return false;  // groups are not used by sentencepiece_model.proto
  }
}

// Merges every ModelProto.normalizer_spec (field 3) into `facts`, as protobuf would.
bool read_normalizer_facts(std::string_view model_proto, NormalizerFacts* facts) {
  while (!model_proto.empty()) {
    uint64_t number = 0, varint = 0;
    std::string_view spec;
    if (!read_field(&model_proto, &number, &varint, &spec)) return false;
    if (number != 3) continue;
    while (!spec.empty()) {
      std::string_view bytes;
      if (!read_field(&spec, &number, &varint, &bytes)) return false;
      if (number == 1) facts->name = std::string(bytes);
      if (number == 2) facts->has_charsmap = !bytes.empty();
      if (number == 4) facts->remove_extra_whitespaces = varint != 0;
      if (number == 6) facts->has_rule_tsv = !bytes.empty();
    }
  }
  return true;
}

}  // namespace

Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::load(
    const std::filesystem::path& model_file) {
  std::error_code error;
  if (!std::filesystem::exists(model_file, error)) {
    return absl::NotFoundError(
        absl::StrCat("sentencepiece model ", model_file.string(), " does not exist"));
  }
  if (!std::filesystem::is_regular_file(model_file, error)) {
    return absl::InvalidArgumentError(
        absl::StrCat("sentencepiece model ", model_file.string(), " is not a regular file"));
  }
  auto impl = std::make_unique<SentencePieceTokenizer>();
  const sentencepiece::util::Status status =
      impl->processor.Load(std::string_view(model_file.native()));
  if (!status.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("cannot load sentencepiece model ",
                                                   model_file.string(), ": ", status.ToString()));
  }
  const int size = impl->processor.GetPieceSize();
  if (size <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("sentencepiece model ", model_file.string(), " has no pieces"));
  }
  impl->byte_of_id.assign(size, -1);
  int byte_pieces = 0;
  int64_t max_piece_bytes = 0;
  for (int id = 0; id < size; ++id) {
    const std::string piece = impl->processor.IdToPiece(id);
    if (impl->processor.IsByte(id)) {
      impl->byte_of_id[id] = static_cast<int16_t>(parse_byte_piece(piece));
      byte_pieces += impl->byte_of_id[id] >= 0;
    }
    // Control and unused pieces are never matched in text; counting them only loosens the
    // bound. <unk> is counted as its spelling, which is right only with byte fallback.
    max_piece_bytes = std::max<int64_t>(max_piece_bytes, static_cast<int64_t>(piece.size()));
  }
  NormalizerFacts normalizer;
  const bool parsed = read_normalizer_facts(impl->processor.serialized_model_proto(), &normalizer);
  // With the identity rule sentencepiece's normalizer copies each character (an invalid
  // byte becomes U+FFFD); remove_extra_whitespaces then drops leading, trailing and repeated
  // spaces, which countable_bytes() leaves out.
  const bool identity = parsed && normalizer.name == "identity" && !normalizer.has_charsmap &&
                        !normalizer.has_rule_tsv;
  impl->folds_spaces = !parsed || normalizer.remove_extra_whitespaces;
  if (identity && byte_pieces == 256) impl->max_input_bytes_per_token_ = max_piece_bytes;
  return std::unique_ptr<Tokenizer>(std::move(impl));
}

std::vector<int32_t> SentencePieceTokenizer::encode(std::string_view text, bool add_bos) const {
  std::vector<int> pieces;
  // Encode fails only on an unloaded processor, which load() rules out.
  processor.Encode(text, &pieces).IgnoreError();
  std::vector<int32_t> ids;
  ids.reserve(pieces.size() + 1);
  if (add_bos && bos_id() >= 0) ids.push_back(bos_id());
  ids.insert(ids.end(), pieces.begin(), pieces.end());
  return ids;
}

absl::StatusOr<std::string> SentencePieceTokenizer::decode(const std::vector<int32_t>& ids) const {
  const int size = vocab_size();
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= size) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", ids[i], " at position ", i,
                                                     " is outside the vocabulary [0, ", size, ")"));
    }
  }
  const std::vector<int> pieces(ids.begin(), ids.end());
  std::string text;
  const sentencepiece::util::Status status = processor.Decode(pieces, &text);
  if (!status.ok()) {
    return absl::InternalError(absl::StrCat("sentencepiece decode failed: ", status.ToString()));
  }
  return text;
}

std::string SentencePieceTokenizer::piece(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return "";
  return processor.IdToPiece(id);
}

int32_t SentencePieceTokenizer::piece_id(std::string_view piece) const {
  const int id = processor.PieceToId(piece);
  // PieceToId answers unk_id for an unknown piece; only the unk piece itself maps there.
  if (id == unk_id() && processor.IdToPiece(id) != piece) return -1;
  return id;
}

int64_t SentencePieceTokenizer::countable_bytes(std::string_view text) const {
  if (!folds_spaces) return static_cast<int64_t>(text.size());
  return static_cast<int64_t>(text.size() - std::count(text.begin(), text.end(), ' '));
}

int SentencePieceTokenizer::byte_value(int32_t id) const {
  if (id < 0 || id >= static_cast<int32_t>(byte_of_id.size())) return -1;
  return byte_of_id[id];
}

}  // namespace megaserve::engine
