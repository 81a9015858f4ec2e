// OutputStream against a real tokenizer (stories260K's tok512.model): the streamed text
// must equal what a straight-line reference computes from the full decode.
#include "server/output_stream.h"

#include <memory>
#include <string>
#include <vector>

#include "engine/model/tokenizer.h"
#include "gtest/gtest.h"
#include "tests/support/assets.h"

namespace megaserve::server {
namespace {

constexpr char kTokenizer[] = "models/stories260K/tok512.model";

class OutputStreamTest : public ::testing::Test {
 protected:
  void SetUp() override {
    MEGASERVE_REQUIRE_ASSET(kTokenizer);
    auto tokenizer = engine::Tokenizer::load(megaserve::testing::assets_dir() / kTokenizer);
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    tokenizer_ = *std::move(tokenizer);
  }

  // Feeds `ids` one event per token, then a finish event with `reason` (unless the stream
  // ended before); returns the concatenated delta and its end.
  StreamDelta run(const scheduler::SamplingParams& params, const std::vector<int32_t>& ids,
                  engine::FinishReason reason, OutputStream** out_stream = nullptr) {
    stream_ = std::make_unique<OutputStream>(*tokenizer_, params, std::vector<int32_t>{2},
                                             /*report_logprobs=*/false);
    StreamDelta all;
    for (size_t i = 0; i < ids.size(); ++i) {
      engine::RequestEvent event;
      event.tokens.push_back({0, ids[i], -1.0f, {}});
      if (i + 1 == ids.size()) event.finished = reason;
      StreamDelta delta;
      stream_->add(event, &delta);
      // Text never runs ahead of the tokens: every delta is a prefix-extension.
      all.token_ids.insert(all.token_ids.end(), delta.token_ids.begin(), delta.token_ids.end());
      all.text += delta.text;
      if (delta.finished) {
        EXPECT_FALSE(all.finished) << "finished twice";
        all.finished = delta.finished;
        all.stop_string_matched = delta.stop_string_matched;
      }
    }
    if (out_stream) *out_stream = stream_.get();
    return all;
  }

  std::string decode(const std::vector<int32_t>& ids) { return *tokenizer_->decode(ids); }

  std::unique_ptr<engine::Tokenizer> tokenizer_;
  std::unique_ptr<OutputStream> stream_;
};

TEST(StopPrefixHoldback, HoldsTheLongestSuffixThatCouldStartAStop) {
  EXPECT_EQ(stop_prefix_holdback("hello wor", {"world"}), 3u);
  EXPECT_EQ(stop_prefix_holdback("hello w", {"world", "xyz"}), 1u);
  EXPECT_EQ(stop_prefix_holdback("hello", {"world"}), 0u);
  EXPECT_EQ(stop_prefix_holdback("aab", {"abc", "bx"}), 2u);
  EXPECT_EQ(stop_prefix_holdback("", {"a"}), 0u);
  EXPECT_EQ(stop_prefix_holdback("abc", {}), 0u);
}

TEST_F(OutputStreamTest, WithoutStopsTheTextIsTheFullDecode) {
  const std::vector<int32_t> ids = tokenizer_->encode("Once upon a time, there was a dog.", false);
  scheduler::SamplingParams params;
  const StreamDelta all = run(params, ids, engine::FinishReason::kLength);
  EXPECT_EQ(all.token_ids, ids);
  EXPECT_EQ(all.text, decode(ids));
  ASSERT_TRUE(all.finished);
  EXPECT_EQ(*all.finished, engine::FinishReason::kLength);
  EXPECT_EQ(stream_->completion_tokens(), static_cast<int>(ids.size()));
}

TEST_F(OutputStreamTest, StopStringSpanningTokensCutsTheTextBeforeIt) {
  const std::string text = "Once upon a time, there was a little dog named Sam.";
  const std::vector<int32_t> ids = tokenizer_->encode(text, false);
  scheduler::SamplingParams params;
  params.stop_strings = {"little d"};
  const StreamDelta all = run(params, ids, engine::FinishReason::kLength);
  // Reference: the full decode, cut at the first occurrence.
  const std::string full = decode(ids);
  EXPECT_EQ(all.text, full.substr(0, full.find("little d")));
  ASSERT_TRUE(all.finished);
  EXPECT_EQ(*all.finished, engine::FinishReason::kStop);
  EXPECT_TRUE(all.stop_string_matched);
  // Tokens up to the one completing the stop string count; later ones are dropped.
  size_t needed = 0;
  while (decode(std::vector<int32_t>(ids.begin(), ids.begin() + needed)).find("little d") ==
         std::string::npos) {
    ++needed;
  }
  EXPECT_EQ(all.token_ids.size(), needed);
  EXPECT_EQ(stream_->completion_tokens(), static_cast<int>(needed));
}

TEST_F(OutputStreamTest, EarliestOfSeveralStopStringsWins) {
  const std::vector<int32_t> ids = tokenizer_->encode("The cat sat on the mat.", false);
  scheduler::SamplingParams params;
  params.stop_strings = {"mat", "sat", "zebra"};
  const StreamDelta all = run(params, ids, engine::FinishReason::kLength);
  const std::string full = decode(ids);
  EXPECT_EQ(all.text, full.substr(0, full.find("sat")));
}

TEST_F(OutputStreamTest, HeldBackTextIsReleasedWhenItCannotBecomeAStop) {
  // "a b" never completes "a bx": everything arrives, nothing is lost at the end.
  const std::vector<int32_t> ids = tokenizer_->encode("He had a ball and a box.", false);
  scheduler::SamplingParams params;
  params.stop_strings = {"a bx", "."};
  const StreamDelta all = run(params, ids, engine::FinishReason::kLength);
  const std::string full = decode(ids);
  EXPECT_EQ(all.text, full.substr(0, full.find(".")));
  EXPECT_TRUE(all.stop_string_matched);

  params.stop_strings = {"box!"};  // "box" is held back until the end, then released
  const StreamDelta tail = run(params, ids, engine::FinishReason::kLength);
  EXPECT_EQ(tail.text, full);
  EXPECT_FALSE(tail.stop_string_matched);
  EXPECT_EQ(*tail.finished, engine::FinishReason::kLength);
}

TEST_F(OutputStreamTest, EosEndsWithoutText) {
  std::vector<int32_t> ids = tokenizer_->encode("The end", false);
  ids.push_back(2);  // EOS
  scheduler::SamplingParams params;
  const StreamDelta all = run(params, ids, engine::FinishReason::kStop);
  EXPECT_EQ(all.text, decode(std::vector<int32_t>(ids.begin(), ids.end() - 1)));
  EXPECT_EQ(all.token_ids, ids);
  EXPECT_EQ(*all.finished, engine::FinishReason::kStop);
  EXPECT_FALSE(all.stop_string_matched);
}

TEST_F(OutputStreamTest, StopTokenIdContributesNoText) {
  const std::vector<int32_t> ids = tokenizer_->encode("big dog", false);
  scheduler::SamplingParams params;
  params.stop_token_ids = {ids.back()};
  const StreamDelta all = run(params, ids, engine::FinishReason::kStop);
  EXPECT_EQ(all.text, decode(std::vector<int32_t>(ids.begin(), ids.end() - 1)));
}

TEST_F(OutputStreamTest, EventsAfterTheEndAreIgnored) {
  scheduler::SamplingParams params;
  params.stop_strings = {"x"};
  OutputStream stream(*tokenizer_, params, {2}, false);
  const std::vector<int32_t> ids = tokenizer_->encode("axb", false);
  engine::RequestEvent event;
  for (int32_t id : ids) event.tokens.push_back({0, id, 0.0f, {}});
  StreamDelta first;
  stream.add(event, &first);
  ASSERT_TRUE(first.finished);
  EXPECT_EQ(first.text, "a");
  StreamDelta later;
  engine::RequestEvent end;
  end.tokens.push_back({0, ids.front(), 0.0f, {}});
  end.finished = engine::FinishReason::kLength;
  stream.add(end, &later);
  EXPECT_TRUE(later.token_ids.empty());
  EXPECT_FALSE(later.finished);
}

TEST_F(OutputStreamTest, LogprobsOnlyWhenAsked) {
  scheduler::SamplingParams params;
  const std::vector<int32_t> ids = tokenizer_->encode("hi", false);
  engine::RequestEvent event;
  event.tokens.push_back({0, ids[0], -0.25f, {{5, -0.1f}}});
  for (bool report : {false, true}) {
    OutputStream stream(*tokenizer_, params, {2}, report);
    StreamDelta delta;
    stream.add(event, &delta);
    ASSERT_EQ(delta.logprobs.size(), report ? 1u : 0u);
    if (report) {
      EXPECT_EQ(delta.logprobs[0].logprob, -0.25f);
      EXPECT_EQ(delta.logprobs[0].top_logprobs.size(), 1u);
    }
  }
}

}  // namespace
}  // namespace megaserve::server
