// IncrementalDetokenizer: streamed deltas concatenate to exactly the full decode, never hold
// a broken UTF-8 sequence, and keep sentencepiece's leading spaces right.
#include <cstdint>
#include <filesystem>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "engine/model/tokenizer.h"
#include "gtest/gtest.h"
#include "tests/support/assets.h"

namespace megaserve::engine {
namespace {

constexpr const char* kTok512 = "models/stories260K/tok512.model";
constexpr const char* kLlama2 = "tokenizers/llama2/tokenizer.model";
constexpr const char* kOracle = "models/stories260K/oracle/";
constexpr const char* kReplacement = "\xEF\xBF\xBD";  // U+FFFD

std::unique_ptr<Tokenizer> load_or_die(const std::filesystem::path& path) {
  auto tokenizer = Tokenizer::load(path);
  EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
  return tokenizer.ok() ? std::move(*tokenizer) : nullptr;
}

// Strict UTF-8 check (RFC 3629: no overlong forms, no surrogates, nothing above U+10FFFF).
bool is_valid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto byte = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
    const unsigned char b0 = byte(i);
    size_t length;
    uint32_t cp;
    if (b0 < 0x80) {
      ++i;
      continue;
    } else if (b0 >= 0xC2 && b0 <= 0xDF) {
      length = 2;
      cp = b0 & 0x1F;
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
      length = 3;
      cp = b0 & 0x0F;
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
      length = 4;
      cp = b0 & 0x07;
    } else {
      return false;
    }
    if (i + length > s.size()) return false;
    for (size_t k = 1; k < length; ++k) {
      if ((byte(i + k) & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (byte(i + k) & 0x3F);
    }
    if ((length == 3 && cp < 0x800) || (length == 4 && cp < 0x10000)) return false;
    if ((cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF) return false;
    i += length;
  }
  return true;
}

// Streams `ids` one at a time. Returns the deltas, the last one being flush()'s.
std::vector<std::string> stream(const Tokenizer& tokenizer, const std::vector<int32_t>& ids) {
  IncrementalDetokenizer detokenizer(tokenizer);
  std::vector<std::string> deltas;
  for (int32_t id : ids) deltas.push_back(detokenizer.push(id));
  deltas.push_back(detokenizer.flush());
  return deltas;
}

std::string concat(const std::vector<std::string>& parts) {
  std::string all;
  for (const std::string& part : parts) all += part;
  return all;
}

// Every delta is valid UTF-8 and together they are exactly decode(ids).
void expect_streams_exactly(const Tokenizer& tokenizer, const std::vector<int32_t>& ids) {
  const std::vector<std::string> deltas = stream(tokenizer, ids);
  for (size_t i = 0; i < deltas.size(); ++i) {
    ASSERT_TRUE(is_valid_utf8(deltas[i])) << "delta " << i << " of " << ids.size();
  }
  auto full = tokenizer.decode(ids);
  ASSERT_TRUE(full.ok()) << full.status();
  ASSERT_EQ(concat(deltas), *full);
}

int32_t byte_id(const Tokenizer& tokenizer, int byte) {
  char spelled[8];
  std::snprintf(spelled, sizeof(spelled), "<0x%02X>", byte);
  return tokenizer.piece_id(spelled);
}

TEST(DetokenizerTest, LeadingSpacesAreKeptAfterTheFirstPiece) {
  MEGASERVE_REQUIRE_ASSET(kTok512);
  auto tok = load_or_die(testing::assets_dir() / kTok512);
  ASSERT_NE(tok, nullptr);
  // 1 = BOS, then ▁Once ▁upon ▁a ▁time: only the first piece loses its space.
  const std::vector<std::string> deltas = stream(*tok, {1, 403, 407, 261, 378});
  EXPECT_EQ(deltas, (std::vector<std::string>{"", "Once", " upon", " a", " time", ""}));
  // Control pieces in the middle produce no text and do not reset the leading-space rule.
  const std::vector<std::string> with_eos = stream(*tok, {403, 2, 407, 1, 261});
  EXPECT_EQ(with_eos, (std::vector<std::string>{"Once", "", " upon", "", " a", ""}));
}

// With the prompt as context, the deltas are what the completion adds after the prompt's
// text: decode(prompt) + deltas == decode(prompt + completion) at every split of a text,
// the first generated piece's leading space included (DESIGN.md §9).
TEST(DetokenizerTest, PromptContextKeepsTheCompletionsLeadingSpace) {
  for (const char* file : {kTok512, kLlama2}) {
    SCOPED_TRACE(file);
    if (!std::filesystem::exists(testing::assets_dir() / file)) continue;
    auto tok = load_or_die(testing::assets_dir() / file);
    ASSERT_NE(tok, nullptr);
    const std::vector<int32_t> prompt = tok->encode("Tom and Sue went to the", true);
    const std::vector<int32_t> park = tok->encode("park. They played", false);  // "▁park" ...
    IncrementalDetokenizer detokenizer(*tok);
    detokenizer.set_prompt_context(prompt);
    std::string text;
    for (int32_t id : park) text += detokenizer.push(id);
    text += detokenizer.flush();
    EXPECT_EQ(text.substr(0, 6), " park.") << text;
    // Every split point of one encoded text, multilingual for the byte-fallback pieces.
    const std::vector<int32_t> ids = tok->encode(
        "Once upon a time, a fox \xC3\xA9t\xC3\xA9 saw \xE6\x97\xA5\xE6\x9C\xAC.", true);
    const std::string full = *tok->decode(ids);
    for (size_t split = 1; split < ids.size(); ++split) {
      const std::vector<int32_t> head(ids.begin(), ids.begin() + split);
      const std::string head_text = *tok->decode(head);
      if (head_text.find(kReplacement) != std::string::npos) continue;  // split inside a char
      IncrementalDetokenizer d(*tok);
      d.set_prompt_context(head);
      std::string tail;
      for (size_t i = split; i < ids.size(); ++i) tail += d.push(ids[i]);
      tail += d.flush();
      EXPECT_EQ(head_text + tail, full) << "split " << split;
    }
  }
}

// Every oracle id sequence and every oracle text's encoding, token by token.
TEST(DetokenizerTest, OracleSequencesStreamToTheFullDecode) {
  MEGASERVE_REQUIRE_ASSET(kTok512);
  auto tok = load_or_die(testing::assets_dir() / kTok512);
  ASSERT_NE(tok, nullptr);
  std::istringstream in(
      testing::read_file(testing::assets_dir() / kOracle / "bos_t0_n200_ids.txt"));
  std::vector<int32_t> ids = {tok->bos_id()};
  for (int32_t id; in >> id;) ids.push_back(id);
  ASSERT_EQ(ids.size(), 201u);
  expect_streams_exactly(*tok, ids);
  const std::string expected =
      testing::read_file(testing::assets_dir() / kOracle / "bos_t0_n200_expected.txt");
  EXPECT_EQ(concat(stream(*tok, ids)), expected);

  for (const char* name : {"bos_t0_n256.txt", "onceupon_t0_n64.txt", "zoo_t0_n60.txt"}) {
    SCOPED_TRACE(name);
    std::string text = testing::read_file(testing::assets_dir() / kOracle / name);
    ASSERT_FALSE(text.empty());
    text.pop_back();  // the newline the reference printed
    expect_streams_exactly(*tok, tok->encode(text, true));
    EXPECT_EQ(concat(stream(*tok, tok->encode(text, true))), text);
  }
}

// U+2019 as three byte pieces: nothing is emitted until the character is complete.
TEST(DetokenizerTest, ByteFallbackCharacterIsHeldBackUntilComplete) {
  MEGASERVE_REQUIRE_ASSET(kTok512);
  auto tok = load_or_die(testing::assets_dir() / kTok512);
  ASSERT_NE(tok, nullptr);
  const int32_t e2 = byte_id(*tok, 0xE2), x80 = byte_id(*tok, 0x80), x99 = byte_id(*tok, 0x99);
  IncrementalDetokenizer detokenizer(*tok);
  EXPECT_EQ(detokenizer.push(403), "Once");
  EXPECT_EQ(detokenizer.push(e2), "");
  EXPECT_EQ(detokenizer.push(x80), "");
  EXPECT_EQ(detokenizer.push(x99), "\u2019");
  EXPECT_EQ(detokenizer.push(407), " upon");
  // A four-byte emoji at the very start of a stream.
  const std::vector<std::string> emoji = stream(
      *tok,
      {byte_id(*tok, 0xF0), byte_id(*tok, 0x9F), byte_id(*tok, 0x98), byte_id(*tok, 0x80), 407});
  EXPECT_EQ(emoji, (std::vector<std::string>{"", "", "", "\U0001F600", " upon", ""}));
}

// Bytes that can never form a character are not held: they are U+FFFD at once, as in decode.
TEST(DetokenizerTest, InvalidBytesAreEmittedAsReplacementCharacters) {
  MEGASERVE_REQUIRE_ASSET(kTok512);
  auto tok = load_or_die(testing::assets_dir() / kTok512);
  ASSERT_NE(tok, nullptr);
  IncrementalDetokenizer detokenizer(*tok);
  EXPECT_EQ(detokenizer.push(403), "Once");
  EXPECT_EQ(detokenizer.push(byte_id(*tok, 0x80)), kReplacement);         // stray continuation
  EXPECT_EQ(detokenizer.push(byte_id(*tok, 0xFF)), kReplacement);         // never valid
  EXPECT_EQ(detokenizer.push(byte_id(*tok, 0xE2)), "");                   // may still complete...
  EXPECT_EQ(detokenizer.push(407), std::string(kReplacement) + " upon");  // ...but did not
  // A stream that ends inside a character: flush() gives what decode() gives.
  EXPECT_EQ(detokenizer.push(byte_id(*tok, 0xE2)), "");
  EXPECT_EQ(detokenizer.push(byte_id(*tok, 0x80)), "");
  EXPECT_EQ(detokenizer.flush(), std::string(kReplacement) + kReplacement);
}

// After flush() a new stream starts, with its own first-piece rule.
TEST(DetokenizerTest, FlushStartsANewStream) {
  MEGASERVE_REQUIRE_ASSET(kTok512);
  auto tok = load_or_die(testing::assets_dir() / kTok512);
  ASSERT_NE(tok, nullptr);
  IncrementalDetokenizer detokenizer(*tok);
  EXPECT_EQ(detokenizer.push(403), "Once");
  EXPECT_EQ(detokenizer.flush(), "");
  EXPECT_EQ(detokenizer.push(407), "upon");
  EXPECT_EQ(detokenizer.push(261), " a");
}

// Ids outside the vocabulary become U+FFFD; the text around them is unaffected.
TEST(DetokenizerTest, InvalidIdsBecomeReplacementCharacters) {
  for (const char* model : {kTok512, kLlama2}) {
    SCOPED_TRACE(model);
    MEGASERVE_REQUIRE_ASSET(model);
    auto tok = load_or_die(testing::assets_dir() / model);
    ASSERT_NE(tok, nullptr);
    std::vector<int32_t> ids = tok->encode("Once upon", true);
    ids.push_back(tok->vocab_size());
    ids.push_back(-5);
    const std::vector<int32_t> rest = tok->encode("a time", false);
    ids.insert(ids.end(), rest.begin(), rest.end());
    const std::string text = concat(stream(*tok, ids));
    EXPECT_EQ(text, std::string("Once upon") + kReplacement + kReplacement + " a time");
    // An invalid id right after an incomplete character ends it, as any non-byte piece does.
    const std::vector<int32_t> cut = {tok->encode("Once", false)[0], byte_id(*tok, 0xE2),
                                      tok->vocab_size() + 100};
    EXPECT_EQ(concat(stream(*tok, cut)), std::string("Once") + kReplacement + kReplacement);
  }
}

// Random id sequences weighted towards the awkward pieces: byte pieces forming valid, cut or
// invalid UTF-8, control and unknown pieces, space-only pieces, and ordinary pieces.
std::vector<int32_t> random_ids(const Tokenizer& tok, std::mt19937& rng, int length) {
  const auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  std::vector<int32_t> space_pieces;
  for (const char* spelled : {"\u2581", "\u2581\u2581", "\u2581\u2581\u2581\u2581"}) {
    if (const int32_t id = tok.piece_id(spelled); id >= 0) space_pieces.push_back(id);
  }
  std::vector<int32_t> ids;
  while (static_cast<int>(ids.size()) < length) {
    switch (pick(0, 7)) {
      case 0: {  // a valid multi-byte character, sometimes cut short
        const int bytes = pick(2, 4);
        const int cut = pick(0, 3) == 0 ? pick(1, bytes - 1) : bytes;
        const int lead = bytes == 2   ? pick(0xC2, 0xDF)
                         : bytes == 3 ? pick(0xE1, 0xEC)
                                      : pick(0xF1, 0xF3);
        ids.push_back(byte_id(tok, lead));
        for (int i = 1; i < cut; ++i) ids.push_back(byte_id(tok, pick(0x80, 0xBF)));
        break;
      }
      case 1:  // any byte
        ids.push_back(byte_id(tok, pick(0, 255)));
        break;
      case 2:  // unk, bos, eos
        ids.push_back(pick(0, 2));
        break;
      case 3:  // space-only pieces
        if (!space_pieces.empty()) ids.push_back(space_pieces[pick(0, space_pieces.size() - 1)]);
        break;
      default:  // any piece
        ids.push_back(pick(0, tok.vocab_size() - 1));
        break;
    }
  }
  return ids;
}

TEST(DetokenizerTest, RandomSequencesStreamToTheFullDecode) {
  for (const char* model : {kTok512, kLlama2}) {
    SCOPED_TRACE(model);
    MEGASERVE_REQUIRE_ASSET(model);
    auto tok = load_or_die(testing::assets_dir() / model);
    ASSERT_NE(tok, nullptr);
    std::mt19937 rng(12345);
    for (int trial = 0; trial < 400; ++trial) {
      SCOPED_TRACE(trial);
      expect_streams_exactly(*tok, random_ids(*tok, rng, trial % 40 + 1));
      if (HasFatalFailure()) return;
    }
  }
}

TEST(DetokenizerTest, DemoTokenizerStreamsRandomSequences) {
  auto tok = load_or_die(std::filesystem::path(MEGASERVE_DEMO_BUILD_DIR) / "tokenizer.model");
  ASSERT_NE(tok, nullptr);
  std::mt19937 rng(777);
  for (int trial = 0; trial < 200; ++trial) {
    SCOPED_TRACE(trial);
    expect_streams_exactly(*tok, random_ids(*tok, rng, trial % 30 + 1));
    if (HasFatalFailure()) return;
  }
}

// Text with emoji, CJK and accents through Llama-2 (byte fallback for what it lacks).
TEST(DetokenizerTest, Llama2MultilingualTextStreamsExactly) {
  MEGASERVE_REQUIRE_ASSET(kLlama2);
  auto tok = load_or_die(testing::assets_dir() / kLlama2);
  ASSERT_NE(tok, nullptr);
  const std::string text =
      "  Héllo wörld — 你好，世界 🙂🚀 naïve café\n\tdone. ✓ "
      "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ";
  const std::vector<int32_t> ids = tok->encode(text, true);
  int byte_pieces = 0;
  for (int32_t id : ids) byte_pieces += tok->byte_value(id) >= 0;
  EXPECT_GT(byte_pieces, 4);
  expect_streams_exactly(*tok, ids);
  EXPECT_EQ(concat(stream(*tok, ids)), text);
}

}  // namespace
}  // namespace megaserve::engine
