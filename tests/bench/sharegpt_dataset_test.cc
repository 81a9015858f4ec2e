#include "bench/sharegpt_dataset.h"

#include <algorithm>
#include <map>
#include <numeric>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"
#include "tests/support/assets.h"

namespace megaserve::bench {
namespace {

// A text of `n` words; the test's token counter counts words (+1 for BOS).
std::string words(int n, const std::string& tag) {
  std::string out = tag;
  for (int i = 1; i < n; ++i) absl::StrAppend(&out, " w");
  return out;
}

absl::StatusOr<int> count_words(const std::string& text, bool add_bos) {
  int n = 0;
  for (absl::string_view w : absl::StrSplit(text, ' ', absl::SkipEmpty())) {
    (void)w;
    ++n;
  }
  return n + (add_bos ? 1 : 0);
}

TEST(ParseShareGpt, TakesTurnsZeroAndOneAndKeepsLoneFirstTurnsApart) {
  const std::string json = R"([
    {"id": "a", "conversations": [{"from": "human", "value": "hi"},
                                  {"from": "gpt", "value": "hello"},
                                  {"from": "human", "value": "more"}]},
    {"id": "b", "conversations": [{"from": "human", "value": "alone"}]},
    {"id": "c", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}
  ])";
  auto dataset = parse_sharegpt(json, "test.json");
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  EXPECT_EQ(dataset->num_records, 3);
  EXPECT_FALSE(dataset->truncated);
  const std::vector<ConversationPair>* pairs = &dataset->pairs;
  ASSERT_EQ(pairs->size(), 3u);
  EXPECT_EQ((*pairs)[0].prompt, "hi");
  EXPECT_EQ((*pairs)[0].completion, "hello");
  EXPECT_TRUE((*pairs)[0].has_completion);
  EXPECT_EQ((*pairs)[1].prompt, "alone");
  EXPECT_FALSE((*pairs)[1].has_completion);
  EXPECT_EQ((*pairs)[2].prompt, "x");
  EXPECT_EQ((*pairs)[2].completion, "y");
}

TEST(SampleRequests, LoneFirstTurnsNeedAFixedOutputLength) {
  std::vector<ConversationPair> pairs = {{words(5, "a"), "", /*has_completion=*/false},
                                         {words(6, "b"), words(5, "c")}};
  auto requests = sample_requests(pairs, SampleOptions(), count_words);
  ASSERT_TRUE(requests.ok());
  ASSERT_EQ(requests->size(), 1u);
  EXPECT_EQ(requests->front().prompt_len, 7);
  SampleOptions fixed;
  fixed.fixed_output_len = 9;
  requests = sample_requests(pairs, fixed, count_words);
  ASSERT_TRUE(requests.ok());
  EXPECT_EQ(requests->size(), 2u);
}

TEST(ParseShareGpt, NamesTheSourceAndEntryInErrors) {
  auto bad_json = parse_sharegpt("[{]", "broken.json");
  ASSERT_FALSE(bad_json.ok());
  EXPECT_NE(bad_json.status().message().find("broken.json"), std::string::npos);
  auto not_array = parse_sharegpt(R"({"conversations": []})", "object.json");
  ASSERT_FALSE(not_array.ok());
  EXPECT_NE(not_array.status().message().find("expected a JSON array"), std::string::npos);
  auto not_record = parse_sharegpt(R"([{"conversations": []}, 3])", "f.json");
  ASSERT_FALSE(not_record.ok());
  EXPECT_NE(not_record.status().message().find("entry 1"), std::string::npos);
  auto no_turns = parse_sharegpt(R"([{"conversations": []}, {"id": 1}])", "f.json");
  ASSERT_FALSE(no_turns.ok());
  EXPECT_NE(no_turns.status().message().find("entry 1"), std::string::npos);
  auto no_value =
      parse_sharegpt(R"([{"conversations": [{"from": "human"}, {"value": "b"}]}])", "f.json");
  ASSERT_FALSE(no_value.ok());
  EXPECT_NE(no_value.status().message().find("turn 0"), std::string::npos);
}

TEST(SeededShuffle, IsADeterministicPermutation) {
  std::vector<int> a(100);
  std::iota(a.begin(), a.end(), 0);
  std::vector<int> b = a, c = a;
  seeded_shuffle(a, 7);
  seeded_shuffle(b, 7);
  seeded_shuffle(c, 8);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  std::vector<int> sorted = a;
  std::sort(sorted.begin(), sorted.end());
  for (int i = 0; i < 100; ++i) EXPECT_EQ(sorted[i], i);
}

TEST(SeededShuffle, PlacesEachItemUniformly) {
  // Where item 0 of 5 lands over 20000 seeds: a chi-square test with 4 degrees of freedom;
  // 18.47 is the 0.1% critical value.
  constexpr int kItems = 5, kTrials = 20000;
  std::vector<int> counts(kItems, 0);
  for (int seed = 0; seed < kTrials; ++seed) {
    std::vector<int> v = {0, 1, 2, 3, 4};
    seeded_shuffle(v, seed);
    ++counts[std::find(v.begin(), v.end(), 0) - v.begin()];
  }
  const double expected = static_cast<double>(kTrials) / kItems;
  double chi2 = 0;
  for (int c : counts) chi2 += (c - expected) * (c - expected) / expected;
  EXPECT_LT(chi2, 18.47);
}

TEST(SampleRequests, AppliesThePeersLengthFiltersAtTheirBoundaries) {
  // Prompt lengths count BOS: words(n) gives n + 1 tokens.
  std::vector<ConversationPair> pairs = {
      {words(2, "p3"), words(10, "c")},         // prompt 3 < 4: dropped
      {words(3, "p4"), words(10, "c")},         // prompt 4: kept
      {words(10, "o3"), words(3, "c")},         // output 3 < 4: dropped
      {words(10, "o4"), words(4, "c")},         // output 4: kept
      {words(1023, "p1024"), words(4, "c")},    // prompt 1024: kept
      {words(1024, "p1025"), words(4, "c")},    // prompt 1025: dropped
      {words(999, "t2048"), words(1048, "c")},  // 1000 + 1048 = 2048: kept
      {words(999, "t2049"), words(1049, "c")},  // 2049: dropped
  };
  SampleOptions options;
  options.num_requests = 100;
  auto requests = sample_requests(pairs, options, count_words);
  ASSERT_TRUE(requests.ok()) << requests.status();
  std::map<std::string, std::pair<int, int>> kept;
  for (const BenchRequest& r : *requests) {
    kept[r.prompt.substr(0, r.prompt.find(' '))] = {r.prompt_len, r.output_len};
  }
  const std::map<std::string, std::pair<int, int>> expected = {
      {"p4", {4, 10}}, {"o4", {11, 4}}, {"p1024", {1024, 4}}, {"t2048", {1000, 1048}}};
  EXPECT_EQ(kept, expected);
}

TEST(SampleRequests, ShufflesWithTheSeedThenTakesTheFirstN) {
  std::vector<ConversationPair> pairs;
  for (int i = 0; i < 50; ++i) {
    // Every third pair is too short and must be skipped, not counted.
    pairs.push_back({words(i % 3 == 0 ? 1 : 5, absl::StrCat("q", i)), words(6, "c")});
  }
  SampleOptions options;
  options.num_requests = 10;
  options.seed = 42;
  auto requests = sample_requests(pairs, options, count_words);
  ASSERT_TRUE(requests.ok());
  // Straight-line reference: shuffle, filter, take 10.
  std::vector<ConversationPair> shuffled = pairs;
  seeded_shuffle(shuffled, 42);
  std::vector<std::string> expected;
  for (const ConversationPair& p : shuffled) {
    if (expected.size() == 10) break;
    if (*count_words(p.prompt, true) >= 4) expected.push_back(p.prompt);
  }
  ASSERT_EQ(requests->size(), 10u);
  for (size_t i = 0; i < 10; ++i) EXPECT_EQ((*requests)[i].prompt, expected[i]);
  // Another seed, another order.
  options.seed = 43;
  auto other = sample_requests(pairs, options, count_words);
  ASSERT_TRUE(other.ok());
  EXPECT_NE(other->front().prompt + (*other)[1].prompt,
            requests->front().prompt + (*requests)[1].prompt);
}

TEST(SampleRequests, FixedOutputLengthReplacesTurnOne) {
  std::vector<ConversationPair> pairs = {{words(5, "a"), words(1, "c")}};
  SampleOptions options;
  options.fixed_output_len = 7;
  auto requests = sample_requests(pairs, options, count_words);
  ASSERT_TRUE(requests.ok());
  ASSERT_EQ(requests->size(), 1u);
  EXPECT_EQ(requests->front().output_len, 7);
}

TEST(SampleRequests, PropagatesTokenizerErrors) {
  std::vector<ConversationPair> pairs = {{"a b c d", "e f g h"}};
  auto requests = sample_requests(pairs, SampleOptions(), [](const std::string&, bool) {
    return absl::StatusOr<int>(absl::UnavailableError("tokenizer down"));
  });
  EXPECT_EQ(requests.status().code(), absl::StatusCode::kUnavailable);
}

TEST(ReadShareGpt, ReadsTheFiftyConversationSample) {
  MEGASERVE_REQUIRE_ASSET("datasets/sharegpt/sharegpt_sample_50conv.json");
  auto dataset = read_sharegpt(megaserve::testing::assets_dir() /
                               "datasets/sharegpt/sharegpt_sample_50conv.json");
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  EXPECT_FALSE(dataset->truncated);
  EXPECT_EQ(dataset->num_records, 50);
  EXPECT_EQ(dataset->pairs.size(), 50u);
  for (const ConversationPair& p : dataset->pairs) {
    EXPECT_FALSE(p.prompt.empty());
    EXPECT_FALSE(p.completion.empty());
  }
}

}  // namespace
}  // namespace megaserve::bench
