// Tokenizer against the real stories260K and Llama-2 sentencepiece models and their oracles,
// random text round trips, and the demo tokenizer the build trains from docs/.
#include "engine/model/tokenizer.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "engine/model/demo_model.h"
#include "engine/model/model_config.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/support/assets.h"

namespace megaserve::engine {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr const char* kTok512 = "models/stories260K/tok512.model";
constexpr const char* kLlama2 = "tokenizers/llama2/tokenizer.model";
constexpr const char* kOracle = "models/stories260K/oracle/";

std::unique_ptr<Tokenizer> load_or_die(const std::filesystem::path& path) {
  auto tokenizer = Tokenizer::load(path);
  EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
  return tokenizer.ok() ? std::move(*tokenizer) : nullptr;
}

std::vector<int32_t> parse_ids(const std::string& text) {
  std::istringstream in(text);
  std::vector<int32_t> ids;
  for (int32_t id; in >> id;) ids.push_back(id);
  return ids;
}

// Appends code point `cp` as UTF-8.
void append_utf8(uint32_t cp, std::string& out) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// The length of the valid UTF-8 character (RFC 3629: no overlong forms, no surrogates,
// nothing above U+10FFFF) at the start of `s`, or 0 when there is none.
size_t utf8_char_length(std::string_view s) {
  if (s.empty()) return 0;
  const auto byte = [&](size_t i) { return static_cast<unsigned char>(s[i]); };
  const unsigned char b0 = byte(0);
  size_t length;
  uint32_t cp;
  if (b0 < 0x80) return 1;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    length = 2;
    cp = b0 & 0x1F;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    length = 3;
    cp = b0 & 0x0F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    length = 4;
    cp = b0 & 0x07;
  } else {
    return 0;
  }
  if (s.size() < length) return 0;
  for (size_t i = 1; i < length; ++i) {
    if ((byte(i) & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (byte(i) & 0x3F);
  }
  if ((length == 3 && cp < 0x800) || (length == 4 && cp < 0x10000)) return 0;  // overlong
  if ((cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF) return 0;
  return length;
}

bool is_valid_utf8(std::string_view s) {
  while (!s.empty()) {
    const size_t length = utf8_char_length(s);
    if (length == 0) return false;
    s.remove_prefix(length);
  }
  return true;
}

// `s` with every byte that does not start a valid character replaced by U+FFFD.
std::string replace_invalid_bytes(std::string_view s) {
  std::string out;
  while (!s.empty()) {
    const size_t length = utf8_char_length(s);
    if (length == 0) {
      out += "\xEF\xBF\xBD";
      s.remove_prefix(1);
    } else {
      out += s.substr(0, length);
      s.remove_prefix(length);
    }
  }
  return out;
}

// sentencepiece's own space symbol, U+2581 "▁": in input text it reads as a space.
constexpr uint32_t kSpaceSymbol = 0x2581;

// A random code point from a mix of scripts: ASCII (spaces, tabs, newlines included),
// Latin-1, Greek and Cyrillic, CJK, emoji, and anything else that is not a surrogate (nor
// kSpaceSymbol, which is tested on its own).
uint32_t random_code_point(std::mt19937& rng) {
  const auto in = [&](uint32_t lo, uint32_t hi) {
    return std::uniform_int_distribution<uint32_t>(lo, hi)(rng);
  };
  switch (in(0, 7)) {
    case 0:
    case 1:
      return in(0x20, 0x7E);
    case 2: {
      constexpr uint32_t kWhitespace[] = {' ', ' ', '\n', '\t', '\r'};
      return kWhitespace[in(0, 4)];
    }
    case 3:
      return in(0xA0, 0xFF);
    case 4:
      return in(0x370, 0x4FF);
    case 5:
      return in(0x4E00, 0x9FFF);
    case 6:
      return in(0x1F300, 0x1FAFF);
    default: {
      uint32_t cp;
      do {
        cp = in(1, 0x10FFFF);
      } while ((cp >= 0xD800 && cp <= 0xDFFF) || cp == kSpaceSymbol);
      return cp;
    }
  }
}

std::string random_valid_utf8(std::mt19937& rng, int max_chars) {
  std::string text;
  const int n = std::uniform_int_distribution<int>(0, max_chars)(rng);
  for (int i = 0; i < n; ++i) append_utf8(random_code_point(rng), text);
  return text;
}

// Random bytes, biased towards UTF-8 structure so that truncated and over-long sequences,
// stray continuation bytes and bytes 0xC0, 0xC1, 0xF5..0xFF all occur.
std::string random_bytes(std::mt19937& rng, int max_bytes) {
  std::string bytes;
  const int n = std::uniform_int_distribution<int>(1, max_bytes)(rng);
  std::uniform_int_distribution<int> kind(0, 3);
  for (int i = 0; i < n; ++i) {
    switch (kind(rng)) {
      case 0:
        bytes += static_cast<char>(std::uniform_int_distribution<int>(1, 0x7F)(rng));
        break;
      case 1:
        bytes += static_cast<char>(std::uniform_int_distribution<int>(0x80, 0xBF)(rng));
        break;
      case 2:
        bytes += static_cast<char>(std::uniform_int_distribution<int>(0xC0, 0xFF)(rng));
        break;
      default:
        append_utf8(random_code_point(rng), bytes);
        break;
    }
  }
  return bytes;
}

// --- stories260K (tok512) -----------------------------------------------------------------

TEST(TokenizerTest, Tok512Metadata) {
  MEGASERVE_REQUIRE_ASSET(kTok512);
  auto tok = load_or_die(testing::assets_dir() / kTok512);
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->vocab_size(), 512);
  EXPECT_EQ(tok->unk_id(), 0);
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_id(), 2);
  // Byte fallback: each of the 256 byte values has exactly one piece, <0xHH>.
  for (int b = 0; b < 256; ++b) {
    char spelled[8];
    std::snprintf(spelled, sizeof(spelled), "<0x%02X>", b);
    const int32_t id = tok->piece_id(spelled);
    ASSERT_GE(id, 0) << spelled;
    EXPECT_EQ(tok->byte_value(id), b) << spelled;
    EXPECT_EQ(tok->piece(id), spelled);
  }
  EXPECT_EQ(tok->piece_id("<unk>"), 0);
  EXPECT_EQ(tok->piece_id("no such piece"), -1);
  EXPECT_EQ(tok->piece(403), "\u2581Once");
  EXPECT_EQ(tok->piece_id("\u2581Once"), 403);
  EXPECT_EQ(tok->byte_value(403), -1);
  EXPECT_EQ(tok->byte_value(1), -1);
  EXPECT_EQ(tok->piece(-1), "");
  EXPECT_EQ(tok->piece(512), "");
  EXPECT_EQ(tok->byte_value(512), -1);
}

TEST(TokenizerTest, Tok512EncodesOnceUponATimeAsTheReadmeSays) {
  MEGASERVE_REQUIRE_ASSET(kTok512);
  auto tok = load_or_die(testing::assets_dir() / kTok512);
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(tok->encode("Once upon a time", /*add_bos=*/true),
              ElementsAre(1, 403, 407, 261, 378));
  EXPECT_THAT(tok->encode("Once upon a time", /*add_bos=*/false), ElementsAre(403, 407, 261, 378));
  EXPECT_THAT(tok->encode("", /*add_bos=*/true), ElementsAre(1));
  EXPECT_TRUE(tok->encode("", /*add_bos=*/false).empty());
}

// Each oracle text file ends with the newline the reference printed after generating.
TEST(TokenizerTest, Tok512RoundTripsOracleTexts) {
  MEGASERVE_REQUIRE_ASSET(kTok512);
  auto tok = load_or_die(testing::assets_dir() / kTok512);
  ASSERT_NE(tok, nullptr);
  for (const char* name : {"bos_t0_n256.txt", "onceupon_t0_n64.txt", "zoo_t0_n60.txt"}) {
    SCOPED_TRACE(name);
    std::string text = testing::read_file(testing::assets_dir() / kOracle / name);
    ASSERT_FALSE(text.empty());
    ASSERT_EQ(text.back(), '\n');
    text.pop_back();
    for (bool add_bos : {true, false}) {
      const std::vector<int32_t> ids = tok->encode(text, add_bos);
      EXPECT_EQ(!ids.empty() && ids.front() == 1, add_bos);
      auto decoded = tok->decode(ids);
      ASSERT_TRUE(decoded.ok()) << decoded.status();
      EXPECT_EQ(*decoded, text);
    }
  }
}

// The 200 ids generated after a lone BOS decode to the expected text, which (unlike the
// other oracle files) has no trailing newline and starts with "Once": the first piece is
// "▁Once" and sentencepiece drops the leading space of the first piece.
TEST(TokenizerTest, Tok512DecodesOracleIdsToExpectedText) {
  MEGASERVE_REQUIRE_ASSET(std::string(kOracle) + "bos_t0_n200_ids.txt");
  auto tok = load_or_die(testing::assets_dir() / kTok512);
  ASSERT_NE(tok, nullptr);
  const std::vector<int32_t> ids =
      parse_ids(testing::read_file(testing::assets_dir() / kOracle / "bos_t0_n200_ids.txt"));
  const std::string expected =
      testing::read_file(testing::assets_dir() / kOracle / "bos_t0_n200_expected.txt");
  ASSERT_EQ(ids.size(), 200u);
  ASSERT_EQ(ids.front(), 403);
  EXPECT_EQ(tok->piece(ids.front()), "\u2581Once");
  ASSERT_FALSE(expected.empty());
  EXPECT_EQ(expected.substr(0, 4), "Once");
  EXPECT_NE(expected.back(), '\n');

  auto decoded = tok->decode(ids);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(*decoded, expected);
  std::vector<int32_t> with_bos = {tok->bos_id()};
  with_bos.insert(with_bos.end(), ids.begin(), ids.end());
  EXPECT_EQ(tok->decode(with_bos).value(), expected);

  // Greedy decoding is a prefix of itself: the 256-step run starts with these 200 tokens.
  const std::string n256 = testing::read_file(testing::assets_dir() / kOracle / "bos_t0_n256.txt");
  EXPECT_EQ(n256.substr(0, expected.size()), expected);
}

TEST(TokenizerTest, DecodeRejectsIdsOutsideTheVocabulary) {
  MEGASERVE_REQUIRE_ASSET(kTok512);
  auto tok = load_or_die(testing::assets_dir() / kTok512);
  ASSERT_NE(tok, nullptr);
  auto high = tok->decode({1, 403, 512});
  ASSERT_FALSE(high.ok());
  EXPECT_EQ(high.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(high.status().message(), HasSubstr("512"));
  EXPECT_THAT(high.status().message(), HasSubstr("position 2"));
  auto negative = tok->decode({-7});
  ASSERT_FALSE(negative.ok());
  EXPECT_EQ(negative.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(negative.status().message(), HasSubstr("-7"));
  EXPECT_EQ(tok->decode({}).value(), "");
  EXPECT_EQ(tok->decode({511}).status().code(), absl::StatusCode::kOk);
}

TEST(TokenizerTest, LoadNamesTheFileThatIsWrong) {
  auto missing = Tokenizer::load("/nonexistent/dir/tokenizer.model");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("/nonexistent/dir/tokenizer.model"));

  const std::filesystem::path garbage =
      std::filesystem::temp_directory_path() /
      ("megaserve_bad_tokenizer_" + std::to_string(::getpid()) + ".model");
  {
    std::ofstream out(garbage, std::ios::binary);
    out << "this is not a serialized sentencepiece ModelProto \xff\xfe";
  }
  auto folder = Tokenizer::load(std::filesystem::temp_directory_path());
  ASSERT_FALSE(folder.ok());
  EXPECT_EQ(folder.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(folder.status().message(),
              HasSubstr(std::filesystem::temp_directory_path().string()));

  auto bad = Tokenizer::load(garbage);
  std::filesystem::remove(garbage);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr(garbage.string()));
}

// --- Llama-2 ------------------------------------------------------------------------------

TEST(TokenizerTest, Llama2EncodesTheReadmeExample) {
  MEGASERVE_REQUIRE_ASSET(kLlama2);
  auto tok = load_or_die(testing::assets_dir() / kLlama2);
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->vocab_size(), 32000);
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_id(), 2);
  const std::string text = "I believe the meaning of life is";
  EXPECT_THAT(tok->encode(text, true), ElementsAre(1, 306, 4658, 278, 6593, 310, 2834, 338));
  EXPECT_THAT(tok->encode(text, false), ElementsAre(306, 4658, 278, 6593, 310, 2834, 338));
  EXPECT_EQ(tok->decode({1, 306, 4658, 278, 6593, 310, 2834, 338}).value(), text);
  // The one valid character that does not survive: sentencepiece's space symbol itself.
  EXPECT_EQ(tok->decode(tok->encode("a\u2581b \u2581", true)).value(), "a b  ");
}

// Llama-2 does not normalize text and falls back to bytes, so every valid UTF-8 string,
// emoji, CJK, control characters and leading or repeated spaces included, comes back exactly.
TEST(TokenizerTest, Llama2RoundTripsRandomValidUtf8) {
  MEGASERVE_REQUIRE_ASSET(kLlama2);
  auto tok = load_or_die(testing::assets_dir() / kLlama2);
  ASSERT_NE(tok, nullptr);
  std::mt19937 rng(20251122);
  int byte_pieces_seen = 0;
  for (int trial = 0; trial < 300; ++trial) {
    const std::string text = random_valid_utf8(rng, 40);
    ASSERT_TRUE(is_valid_utf8(text));
    const std::vector<int32_t> ids = tok->encode(text, trial % 2 == 0);
    for (int32_t id : ids) byte_pieces_seen += tok->byte_value(id) >= 0;
    auto decoded = tok->decode(ids);
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    ASSERT_EQ(*decoded, text) << "trial " << trial;
  }
  EXPECT_GT(byte_pieces_seen, 100);  // the byte fallback path was really exercised
}

// Invalid UTF-8 input does not round-trip: sentencepiece replaces each byte that does not
// start a valid character with U+FFFD. Check exactly that, and that the output is valid.
TEST(TokenizerTest, Llama2ReplacesInvalidUtf8BytesWithReplacementCharacter) {
  MEGASERVE_REQUIRE_ASSET(kLlama2);
  auto tok = load_or_die(testing::assets_dir() / kLlama2);
  ASSERT_NE(tok, nullptr);
  std::mt19937 rng(7);
  int invalid_inputs = 0;
  for (int trial = 0; trial < 300; ++trial) {
    const std::string bytes = random_bytes(rng, 30);
    invalid_inputs += !is_valid_utf8(bytes);
    auto decoded = tok->decode(tok->encode(bytes, true));
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    ASSERT_TRUE(is_valid_utf8(*decoded)) << "trial " << trial;
    ASSERT_EQ(*decoded, replace_invalid_bytes(bytes)) << "trial " << trial;
  }
  EXPECT_GT(invalid_inputs, 200);
  EXPECT_EQ(tok->decode(tok->encode("a\xE2\x80 b\xC0\xAF", false)).value(),
            "a\uFFFD\uFFFD b\uFFFD\uFFFD");
}

// The server encodes on gRPC threads while the engine thread decodes: one Tokenizer, many
// threads, each checking its results against answers computed beforehand on one thread.
TEST(TokenizerTest, ConcurrentUseGivesTheSameResults) {
  MEGASERVE_REQUIRE_ASSET(kTok512);
  auto tok = load_or_die(testing::assets_dir() / kTok512);
  ASSERT_NE(tok, nullptr);
  std::vector<std::string> texts;
  for (const char* name : {"bos_t0_n256.txt", "onceupon_t0_n64.txt", "zoo_t0_n60.txt"}) {
    texts.push_back(testing::read_file(testing::assets_dir() / kOracle / name));
  }
  std::vector<std::vector<int32_t>> expected;
  for (const std::string& text : texts) expected.push_back(tok->encode(text, true));
  std::atomic<int> mismatches = 0;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 200; ++i) {
        const size_t k = (i + t) % texts.size();
        const std::vector<int32_t> ids = tok->encode(texts[k], true);
        auto text = tok->decode(ids);
        if (ids != expected[k] || !text.ok() || *text != texts[k]) ++mismatches;
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(mismatches.load(), 0);
}

// --- The demo tokenizer --------------------------------------------------------------------

std::vector<std::string> split(const std::string& text, char separator) {
  std::vector<std::string> parts;
  std::istringstream in(text);
  for (std::string part; std::getline(in, part, separator);) parts.push_back(part);
  return parts;
}

std::string read_demo_docs() {
  std::string all;
  for (const std::string& path : split(MEGASERVE_DEMO_DOCS, ',')) all += testing::read_file(path);
  return all;
}

// What decode(encode(text)) gives for valid UTF-8 text: the text, with each "▁" a space.
std::string with_space_symbols_as_spaces(std::string text) {
  const std::string symbol = "\u2581";
  for (size_t at = text.find(symbol); at != std::string::npos; at = text.find(symbol, at + 1)) {
    text.replace(at, symbol.size(), " ");
  }
  return text;
}

TEST(DemoTokenizerTest, VocabMatchesConfigAndDocsRoundTrip) {
  const std::filesystem::path dir = MEGASERVE_DEMO_BUILD_DIR;
  auto tok = load_or_die(dir / "tokenizer.model");
  ASSERT_NE(tok, nullptr);
  const nlohmann::json config =
      nlohmann::json::parse(testing::read_file(dir / "config.json"), nullptr, false);
  ASSERT_FALSE(config.is_discarded());
  EXPECT_EQ(config.at("architectures").at(0), "LlamaForCausalLM");
  EXPECT_EQ(tok->vocab_size(), config.at("vocab_size").get<int>());
  EXPECT_EQ(tok->bos_id(), config.at("bos_token_id").get<int>());
  EXPECT_EQ(tok->eos_id(), config.at("eos_token_id").get<int>());
  EXPECT_EQ(tok->unk_id(), 0);
  const int hidden = config.at("hidden_size").get<int>();
  const int heads = config.at("num_attention_heads").get<int>();
  const int kv_heads = config.at("num_key_value_heads").get<int>();
  EXPECT_EQ(hidden % heads, 0);
  EXPECT_EQ(heads % kv_heads, 0);
  EXPECT_EQ(
      testing::read_file(dir / "config.json"),
      testing::read_file(std::filesystem::path(MEGASERVE_SOURCE_DIR) / "configs/demo/config.json"));

  // A sentence from docs/instruction-stream.md (where it is wrapped over two lines).
  const std::string sentence =
      "A fixed size keeps the device's fetch loop trivial: the SM that owns a queue reads "
      "instruction `i` at byte offset `128 * i`, with no parsing and no pointer chasing.";
  const std::string docs = read_demo_docs();
  std::string unwrapped = docs;
  std::replace(unwrapped.begin(), unwrapped.end(), '\n', ' ');
  ASSERT_NE(unwrapped.find(sentence), std::string::npos);
  EXPECT_EQ(tok->decode(tok->encode(sentence, true)).value(), sentence);
  // The whole training text round-trips (its "▁" examples aside) and, having been learned
  // from, compresses well.
  ASSERT_GT(docs.size(), 20000u);
  ASSERT_NE(docs.find("\u2581"), std::string::npos);
  const std::vector<int32_t> ids = tok->encode(docs, false);
  EXPECT_TRUE(tok->decode(ids).value() == with_space_symbols_as_spaces(docs));
  EXPECT_LT(ids.size(), docs.size() / 2);  // bytes alone would be one id per byte
  // Text the docs never contain still round-trips through byte fallback.
  const std::string foreign = "naïve 日本語 \U0001F600 \t tabs  and   spaces\n";
  EXPECT_EQ(tok->decode(tok->encode(foreign, true)).value(), foreign);
}

// The demo's config.json is one that megaserve's own config parser accepts, and it agrees
// with the tokenizer on the vocabulary and the special ids.
TEST(DemoTokenizerTest, ConfigLoadsAsALlamaModel) {
  const std::filesystem::path dir = MEGASERVE_DEMO_BUILD_DIR;
  auto config = load_model_config(dir);
  ASSERT_TRUE(config.ok()) << config.status();
  auto tok = load_or_die(dir / "tokenizer.model");
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(config->architecture, "LlamaForCausalLM");
  EXPECT_EQ(config->family, ModelFamily::kLlama);
  EXPECT_EQ(config->vocab_size, tok->vocab_size());
  EXPECT_EQ(config->bos_token_id, tok->bos_id());
  EXPECT_THAT(config->eos_token_ids, ElementsAre(tok->eos_id()));
  EXPECT_EQ(config->hidden_size, 256);
  EXPECT_EQ(config->num_layers, 4);
  EXPECT_EQ(config->num_heads, 8);
  EXPECT_EQ(config->num_kv_heads, 4);
  EXPECT_EQ(config->head_dim, 32);
  EXPECT_EQ(config->intermediate_size, 688);
  EXPECT_EQ(config->max_position_embeddings, 2048);
}

TEST(DemoTokenizerTest, RoundTripsRandomValidUtf8) {
  auto tok = load_or_die(std::filesystem::path(MEGASERVE_DEMO_BUILD_DIR) / "tokenizer.model");
  ASSERT_NE(tok, nullptr);
  std::mt19937 rng(99);
  for (int trial = 0; trial < 200; ++trial) {
    const std::string text = random_valid_utf8(rng, 30);
    ASSERT_EQ(tok->decode(tok->encode(text, true)).value(), text) << "trial " << trial;
  }
}

// Training again, elsewhere, the way the build does (copies of the docs in training/, the
// same arguments) gives a byte-identical tokenizer.model: same pieces, same ids for any text.
TEST(DemoTokenizerTest, TrainingIsReproducible) {
  const std::filesystem::path dir = std::filesystem::temp_directory_path() /
                                    ("megaserve_demo_retrain_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir / "training");
  for (const std::string& doc : split(MEGASERVE_DEMO_DOCS, ',')) {
    std::filesystem::copy_file(doc, dir / "training" / std::filesystem::path(doc).filename());
  }
  const std::string command = "cd '" + (dir / "training").string() + "' && '" +
                              MEGASERVE_SPM_TRAIN + "' " + MEGASERVE_DEMO_SPM_ARGS +
                              " > /dev/null 2>&1";
  const int status = std::system(command.c_str());
  const std::filesystem::path built_file =
      std::filesystem::path(MEGASERVE_DEMO_BUILD_DIR) / "tokenizer.model";
  const std::string again_bytes = testing::read_file(dir / "tokenizer.model");
  auto again = status == 0 ? load_or_die(dir / "tokenizer.model") : nullptr;
  std::filesystem::remove_all(dir);
  ASSERT_EQ(status, 0) << command;
  auto built = load_or_die(built_file);
  ASSERT_NE(again, nullptr);
  ASSERT_NE(built, nullptr);
  EXPECT_TRUE(again_bytes == testing::read_file(built_file));
  ASSERT_EQ(again->vocab_size(), built->vocab_size());
  for (int32_t id = 0; id < built->vocab_size(); ++id) {
    ASSERT_EQ(again->piece(id), built->piece(id)) << "id " << id;
  }
  const std::string docs = read_demo_docs();
  EXPECT_EQ(again->encode(docs, true), built->encode(docs, true));
}

TEST(DemoModelDirTest, EnvironmentFirstThenBuildTree) {
  ASSERT_EQ(::setenv("MEGASERVE_DEMO_DIR", "/somewhere/else", 1), 0);
  EXPECT_EQ(demo_model_dir(), std::filesystem::path("/somewhere/else"));
  ASSERT_EQ(::setenv("MEGASERVE_DEMO_DIR", "", 1), 0);
  // This test binary lives in the build tree, with no share/megaserve/demo beside it.
  EXPECT_EQ(demo_model_dir(), std::filesystem::path(MEGASERVE_DEMO_BUILD_DIR));
  ASSERT_EQ(::unsetenv("MEGASERVE_DEMO_DIR"), 0);
  const std::filesystem::path dir = demo_model_dir();
  EXPECT_EQ(dir, std::filesystem::path(MEGASERVE_DEMO_BUILD_DIR));
  EXPECT_TRUE(std::filesystem::exists(dir / "config.json"));
  EXPECT_TRUE(std::filesystem::exists(dir / "tokenizer.model"));
}

// An installed tree: <prefix>/bin/<binary> finds <prefix>/share/megaserve/demo. This test
// copies its own binary into such a tree and runs the copy, which reports what it found.
constexpr const char* kProbeOutput = "MEGASERVE_TEST_DEMO_DIR_PROBE_OUTPUT";

TEST(DemoModelDirTest, InstalledTreeIsFoundRelativeToTheBinary) {
  if (const char* output = std::getenv(kProbeOutput); output != nullptr) {
    std::ofstream(output) << demo_model_dir().string();  // the copy, run by the test below
    return;
  }
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe");
  const std::filesystem::path prefix =
      self.parent_path() / ("demo_install_probe_" + std::to_string(::getpid()));
  const std::filesystem::path demo = prefix / "share" / "megaserve" / "demo";
  std::filesystem::create_directories(prefix / "bin");
  std::filesystem::create_directories(demo);
  std::filesystem::copy_file(self, prefix / "bin" / "probe");
  std::ofstream(demo / "config.json") << "{}";
  std::ofstream(demo / "tokenizer.model") << "x";
  const std::filesystem::path output = prefix / "found.txt";
  const std::string command = "env -u MEGASERVE_DEMO_DIR " + std::string(kProbeOutput) + "='" +
                              output.string() + "' '" + (prefix / "bin" / "probe").string() +
                              "' --gtest_filter=DemoModelDirTest.InstalledTreeIsFound* " +
                              "> /dev/null 2>&1";
  const int status = std::system(command.c_str());
  const std::string found = testing::read_file(output);
  std::filesystem::remove_all(prefix);
  ASSERT_EQ(status, 0) << command;
  EXPECT_EQ(found, demo.string());
}

// max_input_bytes_per_token() bounds the (countable) bytes one token covers, so that a
// server can refuse an over-long prompt by its byte length: it must hold for every text,
// including the ones that pack the most bytes into a token (runs of the longest piece, long
// space runs, which stories260K's normalizer folds, invalid bytes, which become U+FFFD).
void expect_bytes_per_token_bound(const Tokenizer& tok, const std::string& name) {
  const int64_t bound = tok.max_input_bytes_per_token();
  ASSERT_GT(bound, 0) << name;
  int64_t longest = 0;
  std::string longest_piece;
  for (int32_t id = 0; id < tok.vocab_size(); ++id) {
    if (static_cast<int64_t>(tok.piece(id).size()) > longest) {
      longest = static_cast<int64_t>(tok.piece(id).size());
      longest_piece = tok.piece(id);
    }
  }
  EXPECT_EQ(bound, longest) << name;
  std::mt19937 rng(7);
  std::vector<std::string> texts = {std::string(5000, ' '), std::string(5000, 'e'),
                                    std::string(3000, '\n'), "   a    b     c      "};
  std::string runs;
  for (int i = 0; i < 200; ++i) runs += longest_piece;
  texts.push_back(runs);
  for (int i = 0; i < 300; ++i) {
    texts.push_back(random_valid_utf8(rng, 200));
    texts.push_back(random_bytes(rng, 200));
  }
  for (const std::string& text : texts) {
    const int64_t tokens = static_cast<int64_t>(tok.encode(text, false).size());
    ASSERT_LE(tok.countable_bytes(text), tokens * bound)
        << name << ": " << text.size() << " bytes in " << tokens << " tokens";
  }
}

TEST(TokenizerTest, MaxInputBytesPerTokenBoundsEveryText) {
  MEGASERVE_REQUIRE_ASSET(kTok512);
  auto tok512 = load_or_die(testing::assets_dir() / kTok512);
  ASSERT_NE(tok512, nullptr);
  expect_bytes_per_token_bound(*tok512, "tok512");
  auto demo = load_or_die(std::filesystem::path(MEGASERVE_DEMO_BUILD_DIR) / "tokenizer.model");
  ASSERT_NE(demo, nullptr);
  expect_bytes_per_token_bound(*demo, "demo");
  if (std::filesystem::exists(testing::assets_dir() / kLlama2)) {
    auto llama2 = load_or_die(testing::assets_dir() / kLlama2);
    ASSERT_NE(llama2, nullptr);
    expect_bytes_per_token_bound(*llama2, "llama2");
  }
}

TEST(TokenizerTest, CountableBytesLeaveOutTheSpacesANormalizerFolds) {
  MEGASERVE_REQUIRE_ASSET(kTok512);
  auto tok512 = load_or_die(testing::assets_dir() / kTok512);
  ASSERT_NE(tok512, nullptr);
  // stories260K's tokenizer.model keeps sentencepiece's default remove_extra_whitespaces:
  // 10,000 spaces between two letters fold into one.
  const std::string spaced = "a" + std::string(10000, ' ') + "b";
  EXPECT_EQ(tok512->encode(spaced, false).size(), 2u);
  EXPECT_EQ(tok512->countable_bytes(spaced), 2);
  auto demo = load_or_die(std::filesystem::path(MEGASERVE_DEMO_BUILD_DIR) / "tokenizer.model");
  ASSERT_NE(demo, nullptr);
  EXPECT_EQ(demo->countable_bytes(spaced), 10002);  // trained with spaces kept
}

// NFKC may drop characters, and without byte fallback one unknown token may cover a run of
// characters: no bound then.
TEST(TokenizerTest, MaxInputBytesPerTokenIsZeroWhenNothingBoundsIt) {
  const std::filesystem::path dir = std::filesystem::temp_directory_path() /
                                    ("megaserve_unbounded_tok_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string docs = split(MEGASERVE_DEMO_DOCS, ',').front();
  const std::string train = "'" + std::string(MEGASERVE_SPM_TRAIN) +
                            "' --model_type=bpe --vocab_size=600 --minloglevel=2 --input='" + docs +
                            "' --model_prefix='" + dir.string();
  const std::string nfkc = train + "/nfkc' --byte_fallback=true > /dev/null 2>&1";
  const std::string no_fallback = train +
                                  "/plain' --normalization_rule_name=identity"
                                  " --remove_extra_whitespaces=false > /dev/null 2>&1";
  const int nfkc_status = std::system(nfkc.c_str());
  const int plain_status = std::system(no_fallback.c_str());
  auto nfkc_tok = nfkc_status == 0 ? load_or_die(dir / "nfkc.model") : nullptr;
  auto plain_tok = plain_status == 0 ? load_or_die(dir / "plain.model") : nullptr;
  std::filesystem::remove_all(dir);
  ASSERT_NE(nfkc_tok, nullptr) << nfkc;
  ASSERT_NE(plain_tok, nullptr) << no_fallback;
  EXPECT_EQ(nfkc_tok->max_input_bytes_per_token(), 0);
  EXPECT_EQ(plain_tok->max_input_bytes_per_token(), 0);
}

}  // namespace
}  // namespace megaserve::engine
