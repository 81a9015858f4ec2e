// The Tokenizer over sentencepiece. This is the one file that includes
// sentencepiece_processor.h (see tokenizer.h for why).
#include "engine/model/tokenizer.h"

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

struct Tokenizer::Impl {
  sentencepiece::SentencePieceProcessor processor;
  // byte_of_id[id] = HH for a byte-fallback piece <0xHH>, -1 otherwise.
  std::vector<int16_t> byte_of_id;
};

namespace {

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

}  // namespace

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
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
  auto impl = std::make_unique<Impl>();
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
  for (int id = 0; id < size; ++id) {
    if (impl->processor.IsByte(id)) {
      impl->byte_of_id[id] = static_cast<int16_t>(parse_byte_piece(impl->processor.IdToPiece(id)));
    }
  }
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(impl)));
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_bos) const {
  std::vector<int> pieces;
  // Encode fails only on an unloaded processor, which load() rules out.
  impl_->processor.Encode(text, &pieces).IgnoreError();
  std::vector<int32_t> ids;
  ids.reserve(pieces.size() + 1);
  if (add_bos && bos_id() >= 0) ids.push_back(bos_id());
  ids.insert(ids.end(), pieces.begin(), pieces.end());
  return ids;
}

absl::StatusOr<std::string> Tokenizer::decode(const std::vector<int32_t>& ids) const {
  const int size = vocab_size();
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= size) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", ids[i], " at position ", i,
                                                     " is outside the vocabulary [0, ", size, ")"));
    }
  }
  const std::vector<int> pieces(ids.begin(), ids.end());
  std::string text;
  const sentencepiece::util::Status status = impl_->processor.Decode(pieces, &text);
  if (!status.ok()) {
    return absl::InternalError(absl::StrCat("sentencepiece decode failed: ", status.ToString()));
  }
  return text;
}

int Tokenizer::vocab_size() const { return impl_->processor.GetPieceSize(); }
int32_t Tokenizer::bos_id() const { return impl_->processor.bos_id(); }
int32_t Tokenizer::eos_id() const { return impl_->processor.eos_id(); }
int32_t Tokenizer::unk_id() const { return impl_->processor.unk_id(); }

std::string Tokenizer::piece(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return "";
  return impl_->processor.IdToPiece(id);
}

int32_t Tokenizer::piece_id(std::string_view piece) const {
  const int id = impl_->processor.PieceToId(piece);
  // PieceToId answers unk_id for an unknown piece; only the unk piece itself maps there.
  if (id == unk_id() && impl_->processor.IdToPiece(id) != piece) return -1;
  return id;
}

int Tokenizer::byte_value(int32_t id) const {
  if (id < 0 || id >= static_cast<int32_t>(impl_->byte_of_id.size())) return -1;
  return impl_->byte_of_id[id];
}

}  // namespace megaserve::engine
