// BpeTokenizer: byte-level BPE encoding and decoding (bpe_tokenizer.h). The loaders of
// tokenizer.json and GGUF metadata are in bpe_tokenizer_files.cc.
#include "engine/model/bpe_tokenizer.h"

#include <unicode/bytestream.h>
#include <unicode/normalizer2.h>
#include <unicode/stringpiece.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <queue>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/model/bpe_pretokenizer.h"
#include "engine/model/utf8.h"

namespace megaserve::engine {

char32_t byte_level_char(uint8_t byte) {
  // Printable Latin-1 ('!'..'~', '¡'..'¬', '®'..'ÿ') maps to itself; the other 68 bytes,
  // in increasing order, to U+0100..U+0143.
  const auto printable = [](int b) {
    return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
  };
  if (printable(byte)) return byte;
  int rank = 0;
  for (int b = 0; b < byte; ++b) rank += !printable(b);
  return 0x100 + rank;
}

std::string byte_level_spelling(std::string_view bytes) {
  std::string out;
  for (const char c : bytes) append_utf8(&out, byte_level_char(static_cast<uint8_t>(c)));
  return out;
}

namespace {

// The inverse map: code point (< 0x144) -> byte, -1 for code points outside the alphabet.
const std::array<int16_t, 0x144>& byte_of_char() {
  static const std::array<int16_t, 0x144> table = [] {
    std::array<int16_t, 0x144> t;
    t.fill(-1);
    for (int b = 0; b < 256; ++b) t[byte_level_char(static_cast<uint8_t>(b))] = int16_t(b);
    return t;
  }();
  return table;
}

// Reads one code point from well-formed UTF-8 at s[*i], advancing *i.
char32_t next_code_point(std::string_view s, size_t* i) {
  const auto b0 = static_cast<uint8_t>(s[*i]);
  int length = b0 < 0x80 ? 1 : b0 < 0xE0 ? 2 : b0 < 0xF0 ? 3 : 4;
  char32_t cp = length == 1   ? b0
                : length == 2 ? (b0 & 0x1F)
                : length == 3 ? (b0 & 0x0F)
                              : (b0 & 0x07);
  for (int k = 1; k < length && *i + k < s.size(); ++k) {
    cp = (cp << 6) | (static_cast<uint8_t>(s[*i + k]) & 0x3F);
  }
  *i += length;
  return cp;
}

// The bytes a token string stands for, as the ByteLevel decoder reads it: each character
// through the inverse byte map, or, when one character is outside the alphabet, the
// string's own UTF-8 (added tokens such as "<|im_start|>" are all inside it anyway).
// Returns false in that second case.
bool spelling_to_bytes(std::string_view spelling, std::string* bytes) {
  bytes->clear();
  if (!utf8_valid(spelling)) {
    *bytes = std::string(spelling);
    return false;
  }
  const auto& table = byte_of_char();
  for (size_t i = 0; i < spelling.size();) {
    const char32_t cp = next_code_point(spelling, &i);
    if (cp >= table.size() || table[cp] < 0) {
      *bytes = std::string(spelling);
      return false;
    }
    bytes->push_back(static_cast<char>(table[cp]));
  }
  return true;
}

}  // namespace

bool in_byte_level_alphabet(std::string_view text) {
  std::string bytes;
  return spelling_to_bytes(text, &bytes);
}

namespace {

uint64_t pair_key(int32_t left, int32_t right) {
  return (uint64_t{static_cast<uint32_t>(left)} << 32) | static_cast<uint32_t>(right);
}

}  // namespace

struct BpeTokenizer::Impl {
  std::unique_ptr<RegexSplitter> splitter;  // nullptr: the whole stretch is one piece
  const icu::Normalizer2* nfc = nullptr;    // nullptr: no normalization
  bool ignore_merges = false;
  std::array<int32_t, 256> byte_token;  // the id of each single-byte token, -1 if absent
  struct Merge {
    int32_t rank;
    int32_t merged;
  };
  std::unordered_map<uint64_t, Merge> merges;            // pair_key(left, right) -> merge
  std::unordered_map<std::string, int32_t> bytes_to_id;  // vocabulary tokens by their bytes
  std::unordered_map<std::string, int32_t> piece_to_id;  // every token by its spelling
  std::vector<std::string> spelling;                     // per id, as piece() answers
  std::vector<BpeAddedToken> added;
  // added-token indices by the first byte of their content, longest content first.
  std::array<std::vector<int>, 256> added_by_first_byte;
};

BpeTokenizer::BpeTokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
BpeTokenizer::~BpeTokenizer() = default;

absl::StatusOr<std::unique_ptr<BpeTokenizer>> BpeTokenizer::create(BpeTokenizerSpec spec) {
  const auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer ", spec.source, ": ", what));
  };
  auto impl = std::make_unique<Impl>();
  int32_t size = static_cast<int32_t>(spec.vocab.size());
  for (const auto& token : spec.added_tokens) {
    if (token.id < 0) return bad(absl::StrCat("added token ", token.content, " has id ", token.id));
    if (token.content.empty()) return bad(absl::StrCat("added token ", token.id, " is empty"));
    size = std::max(size, token.id + 1);
  }
  if (size == 0) return bad("the vocabulary is empty");
  std::vector<std::string> token_bytes(size);
  impl->spelling.assign(size, "");
  impl->byte_token.fill(-1);
  int64_t max_bytes = 0;
  for (int32_t id = 0; id < static_cast<int32_t>(spec.vocab.size()); ++id) {
    const std::string& spelling = spec.vocab[id];
    if (spelling.empty()) continue;
    spelling_to_bytes(spelling, &token_bytes[id]);
    impl->spelling[id] = spelling;
    impl->piece_to_id.emplace(spelling, id);
    impl->bytes_to_id.emplace(token_bytes[id], id);
    if (token_bytes[id].size() == 1) {
      const auto byte = static_cast<uint8_t>(token_bytes[id][0]);
      if (impl->byte_token[byte] < 0) impl->byte_token[byte] = id;
    }
    max_bytes = std::max<int64_t>(max_bytes, static_cast<int64_t>(token_bytes[id].size()));
  }
  impl->merges.reserve(spec.merges.size());
  for (size_t rank = 0; rank < spec.merges.size(); ++rank) {
    const auto& [left, right] = spec.merges[rank];
    const auto l = impl->piece_to_id.find(left);
    const auto r = impl->piece_to_id.find(right);
    const auto m = impl->piece_to_id.find(left + right);
    if (l == impl->piece_to_id.end() || r == impl->piece_to_id.end() ||
        m == impl->piece_to_id.end()) {
      return bad(absl::StrCat("merge ", rank, " (\"", left, "\" \"", right,
                              "\") uses a token that is not in the vocabulary"));
    }
    // Looked up before the added tokens join piece_to_id. The first rule for a pair wins, as in
    // tokenizers (a later duplicate is ignored).
    impl->merges.emplace(pair_key(l->second, r->second),
                         Impl::Merge{static_cast<int32_t>(rank), m->second});
  }
  for (const auto& token : spec.added_tokens) {
    // An added token shadows the vocabulary's entry of the same id (tokenizers' decode looks
    // at the added vocabulary first).
    if (token.special) {
      token_bytes[token.id].clear();
    } else {
      spelling_to_bytes(token.content, &token_bytes[token.id]);
    }
    impl->spelling[token.id] = token.content;
    impl->piece_to_id[token.content] = token.id;
    max_bytes = std::max<int64_t>(max_bytes, static_cast<int64_t>(token.content.size()));
  }
  impl->added = spec.added_tokens;
  for (int i = 0; i < static_cast<int>(impl->added.size()); ++i) {
    impl->added_by_first_byte[static_cast<uint8_t>(impl->added[i].content[0])].push_back(i);
  }
  for (auto& list : impl->added_by_first_byte) {
    std::stable_sort(list.begin(), list.end(), [&](int a, int b) {
      return impl->added[a].content.size() > impl->added[b].content.size();
    });
  }
  if (!spec.split_pattern.empty()) {
    auto splitter = RegexSplitter::create(spec.split_pattern);
    if (!splitter.ok()) return bad(std::string(splitter.status().message()));
    impl->splitter = std::move(*splitter);
  }
  if (spec.nfc) {
    UErrorCode status = U_ZERO_ERROR;
    impl->nfc = icu::Normalizer2::getNFCInstance(status);
    if (U_FAILURE(status)) return bad(absl::StrCat("ICU has no NFC: ", u_errorName(status)));
  }
  impl->ignore_merges = spec.ignore_merges;
  for (const int32_t id : {spec.bos_id, spec.eos_id}) {
    if (id < -1 || id >= size) return bad(absl::StrCat("BOS/EOS id ", id, " is out of range"));
  }
  if (spec.add_bos && spec.bos_id < 0) return bad("it adds BOS but has no BOS id");

  std::unique_ptr<BpeTokenizer> tokenizer(new BpeTokenizer(std::move(impl)));
  tokenizer->token_bytes_ = std::move(token_bytes);
  tokenizer->bos_id_ = spec.bos_id;
  tokenizer->eos_id_ = spec.eos_id;
  tokenizer->add_bos_ = spec.add_bos;
  // A byte without a token is dropped from the ids, so then nothing bounds the bytes per
  // token. Only bytes of well-formed UTF-8 reach BPE (C0, C1, F5..FF never do; SmolLM2's
  // vocabulary lacks them).
  bool every_byte = true;
  for (int b = 0; b < 256; ++b) {
    const bool in_utf8 = b != 0xC0 && b != 0xC1 && b < 0xF5;
    every_byte &= !in_utf8 || tokenizer->impl_->byte_token[b] >= 0;
  }
  tokenizer->max_input_bytes_per_token_ = spec.nfc || !every_byte ? 0 : max_bytes;
  return tokenizer;
}

void BpeTokenizer::encode_piece(std::string_view piece, std::vector<int32_t>* ids) const {
  if (impl_->ignore_merges) {
    const auto it = impl_->bytes_to_id.find(std::string(piece));
    if (it != impl_->bytes_to_id.end()) {
      ids->push_back(it->second);
      return;
    }
  }
  // Symbols as a linked list over the piece's bytes; a merge keeps the left symbol's slot.
  std::vector<int32_t> id;
  id.reserve(piece.size());
  for (const char c : piece) {
    const int32_t token = impl_->byte_token[static_cast<uint8_t>(c)];
    if (token >= 0) id.push_back(token);  // no token for a byte and no unk: dropped
  }
  const int n = static_cast<int>(id.size());
  if (n <= 1) {
    ids->insert(ids->end(), id.begin(), id.end());
    return;
  }
  std::vector<int> next(n), prev(n);
  for (int i = 0; i < n; ++i) {
    next[i] = i + 1 < n ? i + 1 : -1;
    prev[i] = i - 1;
  }
  // Candidate merges, best rank first and leftmost among equal ranks, as tokenizers orders
  // them; an entry is stale when its left slot no longer holds that pair.
  struct Candidate {
    int32_t rank;
    int left;
    int32_t merged;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : left > o.left;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> queue;
  const auto consider = [&](int left) {
    if (left < 0 || next[left] < 0) return;
    const auto it = impl_->merges.find(pair_key(id[left], id[next[left]]));
    if (it != impl_->merges.end()) queue.push({it->second.rank, left, it->second.merged});
  };
  for (int i = 0; i + 1 < n; ++i) consider(i);
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    const int right = next[top.left];
    if (id[top.left] < 0 || right < 0) continue;
    const auto it = impl_->merges.find(pair_key(id[top.left], id[right]));
    if (it == impl_->merges.end() || it->second.merged != top.merged) continue;
    id[top.left] = top.merged;
    id[right] = -1;
    next[top.left] = next[right];
    if (next[right] >= 0) prev[next[right]] = top.left;
    consider(prev[top.left]);
    consider(top.left);
  }
  for (int i = 0; i >= 0; i = next[i]) ids->push_back(id[i]);
}

void BpeTokenizer::encode_stretch(std::string_view text, std::vector<int32_t>* ids) const {
  if (text.empty()) return;
  std::string normalized;
  if (impl_->nfc != nullptr) {
    UErrorCode status = U_ZERO_ERROR;
    const icu::StringPiece input(text.data(), static_cast<int32_t>(text.size()));
    if (!impl_->nfc->isNormalizedUTF8(input, status) || U_FAILURE(status)) {
      status = U_ZERO_ERROR;
      icu::StringByteSink<std::string> sink(&normalized);
      impl_->nfc->normalizeUTF8(0, input, sink, nullptr, status);
      if (U_SUCCESS(status)) text = normalized;
    }
  }
  if (impl_->splitter == nullptr) {
    encode_piece(text, ids);
    return;
  }
  std::vector<std::string_view> pieces;
  impl_->splitter->split(text, &pieces);
  for (const std::string_view piece : pieces) encode_piece(piece, ids);
}

std::vector<int32_t> BpeTokenizer::encode(std::string_view input, bool add_bos) const {
  std::string repaired;
  if (!utf8_valid(input)) {
    repaired = utf8_lossy(input);
    input = repaired;
  }
  std::vector<int32_t> ids;
  ids.reserve(input.size() / 3 + 2);
  if (add_bos && add_bos_) ids.push_back(bos_id_);
  size_t stretch = 0;  // where the text since the last added token begins
  size_t i = 0;
  while (i < input.size()) {
    int found = -1;
    for (const int index : impl_->added_by_first_byte[static_cast<uint8_t>(input[i])]) {
      if (input.substr(i).starts_with(impl_->added[index].content)) {
        found = index;
        break;  // the list is longest first
      }
    }
    if (found < 0) {
      ++i;
      continue;
    }
    encode_stretch(input.substr(stretch, i - stretch), &ids);
    ids.push_back(impl_->added[found].id);
    i += impl_->added[found].content.size();
    stretch = i;
  }
  encode_stretch(input.substr(stretch), &ids);
  return ids;
}

absl::StatusOr<std::string> BpeTokenizer::decode(const std::vector<int32_t>& ids) const {
  const int size = vocab_size();
  std::string bytes;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= size) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", ids[i], " at position ", i,
                                                     " is outside the vocabulary [0, ", size, ")"));
    }
    bytes.append(token_bytes_[ids[i]]);
  }
  return utf8_lossy(bytes);
}

std::string BpeTokenizer::piece(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return "";
  return impl_->spelling[id];
}

int32_t BpeTokenizer::piece_id(std::string_view piece) const {
  const auto it = impl_->piece_to_id.find(std::string(piece));
  return it == impl_->piece_to_id.end() ? -1 : it->second;
}

std::string_view BpeTokenizer::token_bytes(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return {};
  return token_bytes_[id];
}

}  // namespace megaserve::engine
