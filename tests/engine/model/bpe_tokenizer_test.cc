// Byte-level BPE (engine/model/bpe_tokenizer.h) on small hand-built vocabularies: merges by
// rank, added and special tokens, BOS, the split regexes, UTF-8-safe incremental decoding,
// and files that must be refused (tokenizer.json and GGUF), plus the utf8.h helpers. Exact
// agreement with Hugging Face tokenizers on real vocabularies is bpe_tokenizer_reference_test.py.
#include "engine/model/bpe_tokenizer.h"

#include <string>
#include <vector>

#include "engine/model/bpe_pretokenizer.h"
#include "engine/model/tokenizer.h"
#include "engine/model/utf8.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/gguf_writer.h"
#include "tests/support/safetensors_writer.h"

namespace megaserve::engine {
namespace {

using ::megaserve::testing::make_test_dir;
using ::megaserve::testing::write_file;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
namespace t = ::megaserve::testing;

const std::string kFffd = "\xEF\xBF\xBD";

std::string msg(const absl::Status& status) { return std::string(status.message()); }

TEST(Utf8Test, LossyReplacesEachMaximalSubpartOnce) {
  EXPECT_EQ(utf8_lossy("h\xC3\xA9llo"), "h\xC3\xA9llo");
  EXPECT_EQ(utf8_lossy("\xE2\x82\x28"), kFffd + "(");            // truncated 3-byte sequence
  EXPECT_EQ(utf8_lossy("\xF0\x9F\x98"), kFffd);                  // truncated 4-byte sequence
  EXPECT_EQ(utf8_lossy("\xF0\x80\x80"), kFffd + kFffd + kFffd);  // F0 80 cannot continue
  EXPECT_EQ(utf8_lossy("\xED\xA0\x80"), kFffd + kFffd + kFffd);  // a surrogate
  EXPECT_EQ(utf8_lossy("\xC0\xAF"), kFffd + kFffd);              // overlong
  EXPECT_EQ(utf8_lossy("\xF4\x90\x80\x80"), kFffd + kFffd + kFffd + kFffd);  // > U+10FFFF
  EXPECT_EQ(utf8_lossy("\xFF\x80"
                       "a"),
            kFffd + kFffd + "a");
  EXPECT_TRUE(utf8_valid("\xF0\x9F\x98\x80"));
  EXPECT_FALSE(utf8_valid("\xF0\x9F\x98"));
}

TEST(Utf8Test, IncompleteTailIsAProperPrefixOfAValidCharacter) {
  EXPECT_EQ(utf8_incomplete_tail(""), 0u);
  EXPECT_EQ(utf8_incomplete_tail("a\xE4\xBD"), 2u);
  EXPECT_EQ(utf8_incomplete_tail("\xE4\xBD\xA0"), 0u);
  EXPECT_EQ(utf8_incomplete_tail("\xF0\x9F\x98"), 3u);
  EXPECT_EQ(utf8_incomplete_tail("\xF0\x80"), 0u);  // can never complete
  EXPECT_EQ(utf8_incomplete_tail("\xBD"), 0u);
  EXPECT_EQ(utf8_incomplete_tail("\xC3"), 1u);
}

TEST(ByteLevelTest, Gpt2ByteMap) {
  EXPECT_EQ(byte_level_char('a'), U'a');
  EXPECT_EQ(byte_level_char(' '), U'\u0120');   // 'Ġ'
  EXPECT_EQ(byte_level_char('\n'), U'\u010A');  // 'Ċ'
  EXPECT_EQ(byte_level_char(0x00), U'\u0100');
  EXPECT_EQ(byte_level_char(0xAD), U'\u0143');  // the last of the 68 remapped bytes
  EXPECT_EQ(byte_level_spelling(" the"), "\xC4\xA0the");
  EXPECT_TRUE(in_byte_level_alphabet("\xC4\xA0the"));
  EXPECT_FALSE(in_byte_level_alphabet(" the"));
}

TEST(RegexSplitterTest, SplitsAsTokenizersIsolatedDoes) {
  auto splitter = RegexSplitter::create(kLlama3SplitPattern);
  ASSERT_TRUE(splitter.ok()) << splitter.status();
  std::vector<std::string_view> pieces;
  (*splitter)->split("I'M here  12345\n\n  ok", &pieces);
  EXPECT_THAT(pieces, ElementsAre("I", "'M", " here", " ", " ", "123", "45", "\n\n", " ", " ok"));
  // U+0085 is whitespace for Oniguruma (tokenizers' engine) though not for PCRE2's \s.
  pieces.clear();
  (*splitter)->split(
      "a\xC2\x85\xC2\x85"
      "b",
      &pieces);
  EXPECT_THAT(pieces, ElementsAre("a", "\xC2\x85",
                                  "\xC2\x85"
                                  "b"));
  EXPECT_EQ(rewrite_whitespace_classes(R"([^\s\p{L}]|\S)").find("\\s"), std::string::npos);
  EXPECT_FALSE(RegexSplitter::create("(unclosed").ok());
}

// A vocabulary over the bytes a, b, c, space, the two halves of "你" (E4 BD | A0), and merges.
BpeTokenizerSpec small_spec() {
  BpeTokenizerSpec spec;
  spec.source = "small";
  const std::string g = byte_level_spelling(" ");
  spec.vocab = {"a",
                "b",
                "c",
                g,
                "ab",
                "bc",
                "abc",
                g + "a",
                "aa",
                byte_level_spelling("\xE4"),
                byte_level_spelling("\xBD"),
                byte_level_spelling("\xA0"),
                byte_level_spelling("\xE4\xBD"),
                "<s>"};
  // ids:        0    1    2   3   4     5     6      7        8
  //             9 (E4), 10 (BD), 11 (A0), 12 (E4 BD), 13 <s>
  spec.merges = {{"b", "c"},  {"a", "b"},
                 {"a", "bc"}, {g, "a"},
                 {"a", "a"},  {byte_level_spelling("\xE4"), byte_level_spelling("\xBD")}};
  spec.added_tokens = {{13, "<s>", true}, {14, "</s>", true}, {15, "<tool>", false}};
  spec.split_pattern = std::string(kGpt2SplitPattern);
  spec.bos_id = 13;
  spec.eos_id = 14;
  return spec;
}

std::unique_ptr<BpeTokenizer> make(BpeTokenizerSpec spec) {
  auto tokenizer = BpeTokenizer::create(std::move(spec));
  EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
  return tokenizer.ok() ? std::move(*tokenizer) : nullptr;
}

TEST(BpeTokenizerTest, MergesByRankLeftmostFirst) {
  const auto tokenizer = make(small_spec());
  // "abc": b+c (rank 0) before a+b (rank 1), then a+bc (rank 2).
  EXPECT_THAT(tokenizer->encode("abc", false), ElementsAre(6));
  // "ab": only a+b applies.
  EXPECT_THAT(tokenizer->encode("ab", false), ElementsAre(4));
  // "aaa": a+a applies at 0 and 1; the leftmost wins, leaving a single a.
  EXPECT_THAT(tokenizer->encode("aaa", false), ElementsAre(8, 0));
  // The GPT-2 split keeps " aa" together; Ġ+a (rank 3) goes before a+a (rank 4).
  EXPECT_THAT(tokenizer->encode("c aa", false), ElementsAre(2, 7, 0));
  EXPECT_THAT(tokenizer->encode("c a", false), ElementsAre(2, 7));
  // A byte with no token (no unk) is dropped before merging, as tokenizers does.
  EXPECT_THAT(tokenizer->encode("axb", false), ElementsAre(4));
}

TEST(BpeTokenizerTest, AddedTokensAreMatchedFirstAndNeverSplit) {
  const auto tokenizer = make(small_spec());
  EXPECT_THAT(tokenizer->encode("ab<s>c</s><tool>", false), ElementsAre(4, 13, 2, 14, 15));
  EXPECT_THAT(tokenizer->encode("<s", false), ElementsAre());  // '<' and 's' have no tokens
  // Special tokens decode to nothing, plain added tokens to their text.
  EXPECT_EQ(tokenizer->decode({4, 13, 2, 14, 15}).value(), "abc<tool>");
  EXPECT_EQ(tokenizer->piece_id("<tool>"), 15);
  EXPECT_EQ(tokenizer->piece(7), byte_level_spelling(" ") + "a");
  EXPECT_EQ(tokenizer->vocab_size(), 16);
  EXPECT_FALSE(tokenizer->decode({16}).ok());
  // Most bytes lack a token here, and dropped bytes make the bound meaningless.
  EXPECT_EQ(tokenizer->max_input_bytes_per_token(), 0);
}

TEST(BpeTokenizerTest, LongestAddedTokenWinsAtTheSamePosition) {
  BpeTokenizerSpec spec = small_spec();
  spec.added_tokens.push_back({16, "<s>a", true});
  const auto tokenizer = make(std::move(spec));
  EXPECT_THAT(tokenizer->encode("<s>ab<s>", false), ElementsAre(16, 1, 13));
}

TEST(BpeTokenizerTest, BosOnlyWhereTheModelAddsIt) {
  BpeTokenizerSpec spec = small_spec();
  const auto without = make(spec);
  EXPECT_THAT(without->encode("ab", true), ElementsAre(4));
  spec.add_bos = true;
  const auto with = make(spec);
  EXPECT_THAT(with->encode("ab", true), ElementsAre(13, 4));
  EXPECT_THAT(with->encode("ab", false), ElementsAre(4));
  EXPECT_EQ(with->bos_id(), 13);
  EXPECT_EQ(with->eos_id(), 14);
}

TEST(BpeTokenizerTest, InvalidUtf8BecomesReplacementCharacters) {
  const auto tokenizer = make(small_spec());
  // "\xE4\xBD" alone is a truncated character: one U+FFFD (EF BF BD), of whose bytes only BD
  // has a token here; with a following A0 it is "你", encoded as E4BD + A0.
  EXPECT_THAT(tokenizer->encode("\xE4\xBD", false), ElementsAre(10));
  EXPECT_THAT(tokenizer->encode("\xE4\xBD\xA0", false), ElementsAre(12, 11));
  EXPECT_EQ(tokenizer->decode({12}).value(), kFffd);
  EXPECT_EQ(tokenizer->decode({12, 11}).value(), "\xE4\xBD\xA0");
}

TEST(BpeTokenizerTest, IncrementalDecodeNeverSplitsACharacter) {
  const auto tokenizer = make(small_spec());
  IncrementalDetokenizer detokenizer(*tokenizer);
  EXPECT_EQ(detokenizer.push(13), "");  // BOS
  EXPECT_EQ(detokenizer.push(0), "a");
  EXPECT_EQ(detokenizer.push(9), "");   // E4
  EXPECT_EQ(detokenizer.push(10), "");  // BD
  EXPECT_EQ(detokenizer.push(11), "\xE4\xBD\xA0");
  EXPECT_EQ(detokenizer.push(12), "");  // E4 BD, then a character that cannot continue it
  EXPECT_EQ(detokenizer.push(1), kFffd + "b");
  EXPECT_EQ(detokenizer.push(99), kFffd);  // an id outside the vocabulary
  EXPECT_EQ(detokenizer.push(9), "");
  EXPECT_EQ(detokenizer.flush(), kFffd);  // one U+FFFD for the unfinished tail, as decode()
  EXPECT_EQ(detokenizer.push(7), " a");   // a new stream keeps its leading space
}

TEST(BpeTokenizerTest, BadSpecsAreRefused) {
  BpeTokenizerSpec spec = small_spec();
  spec.merges.push_back({"c", "c"});  // "cc" is not a token
  auto bad = BpeTokenizer::create(spec);
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(msg(bad.status()), AllOf(HasSubstr("small"), HasSubstr("merge 6")));
  spec = small_spec();
  spec.split_pattern = "(";
  EXPECT_THAT(msg(BpeTokenizer::create(spec).status()), HasSubstr("does not compile"));
}

// tokenizer.json files.

std::filesystem::path write_json(const std::string& name, const std::string& text) {
  const auto path = make_test_dir("bpe_tokenizer") / name / "tokenizer.json";
  std::filesystem::create_directories(path.parent_path());
  write_file(path, text);
  return path;
}

// A tiny but complete Llama-3-shaped tokenizer.json; `model`, `pre` and `post` replaceable.
std::string tokenizer_json(const std::string& model_type = "BPE",
                           const std::string& pre = R"({"type": "Sequence", "pretokenizers": [
  {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}| ?\\p{L}+|\\s+"}, "behavior": "Isolated",
   "invert": false},
  {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]})",
                           const std::string& post = R"({"type": "TemplateProcessing",
  "single": [{"SpecialToken": {"id": "<|bos|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
  "pair": [], "special_tokens": {"<|bos|>": {"id": "<|bos|>", "ids": [5], "tokens": ["<|bos|>"]}}})") {
  return R"({"version": "1.0", "added_tokens": [
  {"id": 5, "content": "<|bos|>", "single_word": false, "lstrip": false, "rstrip": false,
   "normalized": false, "special": true}],
 "normalizer": null, "pre_tokenizer": )" +
         pre + R"(, "post_processor": )" + post +
         R"(, "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
   "use_regex": true},
 "model": {"type": ")" +
         model_type + R"(", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
   "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": true,
   "vocab": {"h": 0, "i": 1, "\u0120": 2, "hi": 3, "\u0120hi": 4},
   "merges": ["h i", ["\u0120", "hi"]]}})";
}

TEST(TokenizerJsonTest, LoadsAByteLevelBpe) {
  const auto path = write_json("ok", tokenizer_json());
  auto tokenizer = load_tokenizer(path);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  EXPECT_TRUE((*tokenizer)->byte_level());
  EXPECT_THAT((*tokenizer)->encode("hi hi<|bos|>", true), ElementsAre(5, 3, 4, 5));
  EXPECT_EQ((*tokenizer)->decode({5, 3, 4}).value(), "hi hi");
  EXPECT_EQ((*tokenizer)->bos_id(), 5);
}

TEST(TokenizerJsonTest, UnsupportedConstructsFailNamingTheFile) {
  struct Case {
    std::string name;
    std::string json;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {"wordpiece", tokenizer_json("WordPiece"), "model type \"WordPiece\""},
      {"metaspace", tokenizer_json("BPE", R"({"type": "Metaspace", "replacement": "_"})"),
       "pre_tokenizer"},
      {"prefix_space", tokenizer_json("BPE", R"({"type": "ByteLevel", "add_prefix_space": true})"),
       "add_prefix_space"},
      {"post",
       tokenizer_json("BPE", R"({"type": "ByteLevel", "add_prefix_space": false,
         "use_regex": true})",
                      R"({"type": "RobertaProcessing"})"),
       "post_processor RobertaProcessing"},
      {"not_json", "{ not json", "is not valid JSON"},
      {"no_model", R"({"version": "1.0"})", "no \"model\""},
  };
  for (const Case& c : cases) {
    const auto path = write_json(c.name, c.json);
    auto tokenizer = load_tokenizer(path);
    ASSERT_FALSE(tokenizer.ok()) << c.name;
    EXPECT_THAT(msg(tokenizer.status()), AllOf(HasSubstr(path.string()), HasSubstr(c.expected)))
        << c.name;
  }
  // A merge naming a token the vocabulary lacks.
  std::string json = tokenizer_json();
  json.replace(json.find("\"h i\""), 5, "\"h q\"");
  const auto path = write_json("merge", json);
  EXPECT_THAT(msg(load_tokenizer(path).status()),
              AllOf(HasSubstr(path.string()), HasSubstr("not in the vocabulary")));
  EXPECT_TRUE(absl::IsNotFound(load_tokenizer(path.parent_path() / "missing.json").status()));
}

// GGUF vocabularies.

std::vector<t::GgufKv> gguf_tokenizer_kvs(const std::string& model, const std::string& pre) {
  const std::string g = byte_level_spelling(" ");
  return {
      t::kv_string("general.architecture", "llama"),
      t::kv_string("tokenizer.ggml.model", model),
      t::kv_string("tokenizer.ggml.pre", pre),
      t::kv_string_array("tokenizer.ggml.tokens", {"<|endoftext|>", "h", "i", g, "hi", g + "hi"}),
      t::kv_i32_array("tokenizer.ggml.token_type", {3, 1, 1, 1, 1, 1}),
      t::kv_string_array("tokenizer.ggml.merges", {"h i", g + " hi"}),
      t::kv_u32("tokenizer.ggml.bos_token_id", 0),
      t::kv_u32("tokenizer.ggml.eos_token_id", 0),
      t::kv_bool("tokenizer.ggml.add_bos_token", true)};
}

std::filesystem::path write_gguf(const std::string& name, const std::vector<t::GgufKv>& kvs) {
  const auto path = make_test_dir("bpe_tokenizer_gguf") / name;
  write_file(path, t::gguf_bytes(kvs, {}));
  return path;
}

TEST(GgufTokenizerTest, LoadsTheVocabularyFromMetadata) {
  const auto path = write_gguf("ok.gguf", gguf_tokenizer_kvs("gpt2", "smollm"));
  auto tokenizer = load_tokenizer(path);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  EXPECT_THAT((*tokenizer)->encode("hi hi<|endoftext|>", true), ElementsAre(0, 4, 5, 0));
  EXPECT_THAT((*tokenizer)->encode("hi", false), ElementsAre(4));
  EXPECT_EQ((*tokenizer)->decode({0, 4, 5, 0}).value(), "hi hi");
  EXPECT_EQ((*tokenizer)->eos_id(), 0);
}

TEST(GgufTokenizerTest, UnsupportedModelsAndPreTokenizersFailNamingTheFile) {
  const auto llama = write_gguf("spm.gguf", gguf_tokenizer_kvs("llama", "default"));
  EXPECT_THAT(msg(load_tokenizer(llama).status()),
              AllOf(HasSubstr(llama.string()), HasSubstr("tokenizer.ggml.model \"llama\"")));
  const auto pre = write_gguf("pre.gguf", gguf_tokenizer_kvs("gpt2", "made-up"));
  EXPECT_THAT(msg(load_tokenizer(pre).status()),
              AllOf(HasSubstr(pre.string()), HasSubstr("tokenizer.ggml.pre \"made-up\"")));
  const auto none = write_gguf("none.gguf", {t::kv_string("general.architecture", "llama")});
  EXPECT_THAT(msg(load_tokenizer(none).status()),
              AllOf(HasSubstr(none.string()), HasSubstr("tokenizer.ggml.model")));
  // A truncated file is refused by the GGUF reader, naming it.
  const auto truncated = make_test_dir("bpe_tokenizer_gguf") / "truncated.gguf";
  write_file(truncated, t::gguf_bytes(gguf_tokenizer_kvs("gpt2", "smollm"), {}).substr(0, 100));
  EXPECT_THAT(msg(load_tokenizer(truncated).status()), HasSubstr(truncated.string()));
}

}  // namespace
}  // namespace megaserve::engine
