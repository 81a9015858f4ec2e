// Tests of engine/isa/sampling.h with exact expectations: seeding and batch independence,
// logprobs, greedy, the edge cases the header documents, input validation, and the pruned
// Gumbel-max draw against a brute-force argmax over a Llama-3-sized vocabulary.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "engine/isa/sampling.h"
#include "gtest/gtest.h"
#include "tests/engine/isa/chi_square.h"

namespace megaserve::engine {
namespace {

using megaserve::testing::chi_square;
using scheduler::SampledToken;
using scheduler::SamplingParams;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

SamplingParams with_temperature(float temperature) {
  SamplingParams params;
  params.temperature = temperature;
  return params;
}

SampledToken sample_at(const std::vector<float>& logits, const SamplingParams& params,
                       uint64_t seed, int64_t token_index) {
  SamplingContext context;
  context.seed = seed;
  context.token_index = token_index;
  return sample_token(logits, params, context);
}

std::vector<float> random_logits(size_t n, uint32_t seed, float stddev) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> logits(n);
  for (float& x : logits) x = dist(gen);
  return logits;
}

// log-softmax from the definition, in long double.
std::vector<long double> log_softmax(const std::vector<float>& logits) {
  long double max_logit = -kInf;
  for (float x : logits) {
    if (!std::isnan(x)) max_logit = std::max<long double>(max_logit, x);
  }
  long double total = 0;
  for (float x : logits) total += std::isnan(x) ? 0 : std::exp(x - max_logit);
  std::vector<long double> out;
  for (float x : logits) out.push_back(std::isnan(x) ? -kInf : x - max_logit - std::log(total));
  return out;
}

// ---- Seeding ----

TEST(SamplingSeedTest, SeededRequestIgnoresTheRestOfTheBatch) {
  // Request A's tokens, drawn alone, then inside batches of other requests in different
  // orders, must not change: nothing but (seed, token index, logits, params) matters.
  const auto logits_a = random_logits(300, 1, 2.0f);
  const auto logits_b = random_logits(300, 2, 2.0f);
  SamplingParams params_a;
  params_a.top_p = 0.95f;
  const SamplingParams params_b = with_temperature(1.5f);
  constexpr int kSteps = 64;
  std::vector<int32_t> alone;
  for (int t = 0; t < kSteps; ++t) alone.push_back(sample_at(logits_a, params_a, 77, t).token_id);
  for (int order = 0; order < 3; ++order) {
    std::vector<int32_t> in_batch;
    for (int t = 0; t < kSteps; ++t) {
      if (order == 1) sample_at(logits_b, params_b, 5, t);
      if (order == 2) sample_at(logits_b, params_b, 77, 1000 + t);  // same seed, other index
      in_batch.push_back(sample_at(logits_a, params_a, 77, t).token_id);
      if (order != 1) sample_at(logits_b, params_b, 6, t);
    }
    EXPECT_EQ(in_batch, alone) << "batch order " << order;
  }
  // And the sequence is not constant: the draws do use the randomness.
  EXPECT_GT(std::set<int32_t>(alone.begin(), alone.end()).size(), 10u);
}

TEST(SamplingSeedTest, ConsecutiveTokenIndicesAreIndependent) {
  // Joint distribution of the tokens at t and t + 1 (same seed) must be the product of the
  // marginals: chi-square over the 4 x 4 pairs.
  const std::vector<float> logits = {std::log(0.4f), std::log(0.3f), std::log(0.2f),
                                     std::log(0.1f)};
  const std::vector<long double> p = {0.4L, 0.3L, 0.2L, 0.1L};
  std::vector<int64_t> counts(16, 0);
  std::vector<long double> expected(16);
  for (int a = 0; a < 4; ++a) {
    for (int b = 0; b < 4; ++b) expected[a * 4 + b] = p[a] * p[b];
  }
  for (int t = 0; t < 40000; t += 2) {
    const int a = sample_at(logits, {}, 9, t).token_id;
    const int b = sample_at(logits, {}, 9, t + 1).token_id;
    counts[a * 4 + b]++;
  }
  const auto result = chi_square(counts, expected);
  EXPECT_TRUE(result.fits()) << "chi-square " << result.statistic;
}

TEST(SamplingSeedTest, DistinctSeedsGiveDistinctSequences) {
  const std::vector<float> flat(1000, 0.0f);
  std::set<std::vector<int32_t>> sequences;
  for (uint64_t seed = 0; seed < 64; ++seed) {
    std::vector<int32_t> tokens;
    for (int t = 0; t < 16; ++t) tokens.push_back(sample_at(flat, {}, seed, t).token_id);
    sequences.insert(tokens);
  }
  EXPECT_EQ(sequences.size(), 64u);
  // Across seeds at one token index the draws are also distributed as they should be.
  const std::vector<float> logits = {0.0f, 1.0f, -0.5f};
  std::vector<int64_t> counts(3, 0);
  for (uint64_t seed = 0; seed < 20000; ++seed) counts[sample_at(logits, {}, seed, 0).token_id]++;
  const auto lp = log_softmax(logits);
  const auto result = chi_square(counts, {std::exp(lp[0]), std::exp(lp[1]), std::exp(lp[2])});
  EXPECT_TRUE(result.fits()) << "chi-square " << result.statistic;
}

// ---- Logprobs ----

TEST(SamplingLogprobTest, ChosenAndTopLogprobsAreRawLogSoftmax) {
  const auto logits = random_logits(1000, 3, 3.0f);
  const auto reference = log_softmax(logits);
  std::vector<int32_t> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  // Penalties and temperature change what is drawn, never the reported logprobs.
  SamplingParams params = with_temperature(0.6f);
  params.logprobs = 7;
  params.repetition_penalty = 1.4f;
  params.top_k = 30;
  const std::vector<int32_t> prompt = {order[0], order[1], 5, 6};
  for (int t = 0; t < 20; ++t) {
    SamplingContext context;
    context.prompt_token_ids = prompt;
    context.token_index = t;
    const auto token = sample_token(logits, params, context);
    EXPECT_NEAR(token.logprob, reference[token.token_id], 1e-5);
    ASSERT_EQ(token.top_logprobs.size(), 7u);
    for (size_t i = 0; i < 7; ++i) {
      EXPECT_EQ(token.top_logprobs[i].first, order[i]) << "rank " << i;
      EXPECT_NEAR(token.top_logprobs[i].second, reference[order[i]], 1e-5) << "rank " << i;
    }
  }
}

TEST(SamplingLogprobTest, TiesRankLowerIdFirstAndNIsCapped) {
  const std::vector<float> logits = {1.0f, 3.0f, 2.0f, 3.0f, 2.0f, 3.0f};
  SamplingParams params = with_temperature(0.0f);
  params.logprobs = 4;
  auto token = sample_token(logits, params, {});
  EXPECT_EQ(token.token_id, 1);
  const std::vector<int32_t> expected_ids = {1, 3, 5, 2};
  ASSERT_EQ(token.top_logprobs.size(), 4u);
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(token.top_logprobs[i].first, expected_ids[i]);
  EXPECT_EQ(token.top_logprobs[0].second, token.top_logprobs[2].second);
  params.logprobs = 50;  // more than the vocabulary: every token, once
  token = sample_token(logits, params, {});
  ASSERT_EQ(token.top_logprobs.size(), 6u);
  EXPECT_EQ(token.top_logprobs.back().first, 0);
  params.logprobs = 0;
  EXPECT_TRUE(sample_token(logits, params, {}).top_logprobs.empty());
}

// ---- Greedy ----

TEST(SamplingGreedyTest, LowestIdWinsTies) {
  EXPECT_EQ(
      sample_token(std::vector<float>{0.5f, 2.0f, 1.0f, 2.0f}, with_temperature(0.0f), {}).token_id,
      1);
  EXPECT_EQ(sample_token(std::vector<float>(7, -3.0f), with_temperature(0.0f), {}).token_id, 0);
}

TEST(SamplingGreedyTest, TemperatureZeroIgnoresFiltersAndSeed) {
  // Tied maxima at ids 3 and 6: greedy always says 3, whatever the seed, index or filters,
  // while a tiny positive temperature draws both (it samples among the tied tokens).
  const std::vector<float> logits = {0.0f, 1.0f, 2.0f, 5.0f, 1.0f, 4.5f, 5.0f};
  SamplingParams greedy = with_temperature(0.0f);
  greedy.top_k = 2;
  greedy.top_p = 0.1f;
  greedy.min_p = 0.9f;
  std::set<int32_t> tiny_temperature_tokens;
  for (int t = 0; t < 64; ++t) {
    EXPECT_EQ(sample_at(logits, greedy, t * 31 + 1, t).token_id, 3);
    tiny_temperature_tokens.insert(sample_at(logits, with_temperature(1e-5f), 1, t).token_id);
  }
  EXPECT_EQ(tiny_temperature_tokens, (std::set<int32_t>{3, 6}));
}

// ---- Edge cases documented in sampling.h ----

TEST(SamplingEdgeTest, AllEqualLogitsSampleUniformly) {
  const std::vector<float> logits(10, 1.25f);
  std::vector<int64_t> counts(10, 0);
  for (int t = 0; t < 20000; ++t) counts[sample_at(logits, {}, 4, t).token_id]++;
  const auto result = chi_square(counts, std::vector<long double>(10, 0.1L));
  EXPECT_TRUE(result.fits()) << "chi-square " << result.statistic;
}

TEST(SamplingEdgeTest, NegativeInfinityAndNaNAreNeverDrawn) {
  const std::vector<float> logits = {-kInf, 0.0f, kNaN, 0.5f, -kInf, kNaN, -0.2f};
  SamplingParams params;
  params.logprobs = 7;
  std::vector<int64_t> counts(7, 0);
  for (int t = 0; t < 3000; ++t) counts[sample_at(logits, params, 8, t).token_id]++;
  for (int id : {0, 2, 4, 5}) EXPECT_EQ(counts[id], 0) << "id " << id;
  for (int id : {1, 3, 6}) EXPECT_GT(counts[id], 0) << "id " << id;
  const auto token = sample_at(logits, params, 8, 0);
  const auto reference = log_softmax(logits);
  for (const auto& [id, logprob] : token.top_logprobs) {
    if (std::isinf(static_cast<float>(reference[id]))) {
      EXPECT_EQ(logprob, -kInf) << "id " << id;
    } else {
      EXPECT_NEAR(logprob, reference[id], 1e-6) << "id " << id;
    }
  }
  // NaN counts as -inf for greedy too.
  EXPECT_EQ(
      sample_token(std::vector<float>{kNaN, -1.0f, kNaN}, with_temperature(0.0f), {}).token_id, 1);
}

TEST(SamplingEdgeTest, PositiveInfinityIsTheLargestLogit) {
  // In the first four entries and in the remainder, which the code handles separately.
  for (int32_t where : {1, 5}) {
    std::vector<float> logits = {1.0f, 0.0f, 3.0f, -2.0f, 2.5f, 0.5f};
    logits[where] = kInf;
    SamplingParams params;
    params.top_p = 0.9f;
    for (int t = 0; t < 100; ++t) {
      const auto token = sample_at(logits, t % 2 ? params : SamplingParams{}, 2, t);
      EXPECT_EQ(token.token_id, where);
      EXPECT_EQ(token.logprob, 0.0f);
    }
    EXPECT_EQ(sample_token(logits, with_temperature(0.0f), {}).token_id, where);
  }
}

TEST(SamplingEdgeTest, LogprobsCleanNaNAndInfinityInLongVocabularies) {
  // Long enough (130) for the vectorized blocks of the normalizer and the remainder.
  auto logits = random_logits(130, 14, 2.0f);
  for (int32_t id : {3, 64, 129}) logits[id] = kNaN;
  for (int32_t id : {7, 100}) logits[id] = -kInf;
  const auto reference = log_softmax(logits);
  SamplingParams params;
  params.logprobs = 130;
  const auto token = sample_at(logits, params, 1, 0);
  EXPECT_NEAR(token.logprob, reference[token.token_id], 1e-5);
  ASSERT_EQ(token.top_logprobs.size(), 130u);
  for (const auto& [id, logprob] : token.top_logprobs) {
    if (std::isinf(static_cast<float>(reference[id]))) {
      EXPECT_EQ(logprob, -kInf) << "id " << id;
    } else {
      EXPECT_NEAR(logprob, reference[id], 1e-5) << "id " << id;
    }
  }
  logits[90] = kInf;  // takes all the probability
  const auto certain = sample_at(logits, params, 1, 0);
  EXPECT_EQ(certain.token_id, 90);
  EXPECT_EQ(certain.logprob, 0.0f);
  EXPECT_LT(certain.top_logprobs[1].second, -1e30f);
}

TEST(SamplingEdgeTest, NeutralFilterValuesChangeNothing) {
  // top_k beyond the vocabulary, top_p = 1 and min_p = 0 all mean "off": same tokens.
  const auto logits = random_logits(50, 5, 2.0f);
  SamplingParams large_k;
  large_k.top_k = 51;
  SamplingParams explicit_off;
  explicit_off.top_p = 1.0f;
  explicit_off.min_p = 0.0f;
  explicit_off.top_k = 0;
  for (int t = 0; t < 200; ++t) {
    const int32_t plain = sample_at(logits, {}, 3, t).token_id;
    EXPECT_EQ(sample_at(logits, large_k, 3, t).token_id, plain);
    EXPECT_EQ(sample_at(logits, explicit_off, 3, t).token_id, plain);
  }
}

TEST(SamplingEdgeTest, ExtremeFilterValuesKeepOnlyTheTop) {
  const std::vector<float> logits = {0.3f, 2.0f, 1.9f, 2.0f, -1.0f};
  SamplingParams tiny_p;
  tiny_p.top_p = 1e-6f;
  SamplingParams full_min_p;
  full_min_p.min_p = 1.0f;
  std::set<int32_t> tiny_p_tokens;
  std::set<int32_t> full_min_p_tokens;
  for (int t = 0; t < 200; ++t) {
    tiny_p_tokens.insert(sample_at(logits, tiny_p, 6, t).token_id);
    full_min_p_tokens.insert(sample_at(logits, full_min_p, 6, t).token_id);
  }
  // Only the two tied maxima survive (ties with the boundary are kept), and both appear.
  EXPECT_EQ(tiny_p_tokens, (std::set<int32_t>{1, 3}));
  EXPECT_EQ(full_min_p_tokens, (std::set<int32_t>{1, 3}));
}

TEST(SamplingEdgeTest, TopKKeepsTiesAtTheBoundary) {
  // The 3rd largest logit, 2.0, is shared by ids 2 and 4: top-3 keeps four tokens.
  const std::vector<float> logits = {1.0f, 3.0f, 2.0f, 3.0f, 2.0f};
  SamplingParams params = with_temperature(2.0f);
  params.top_k = 3;
  std::set<int32_t> drawn;
  for (int t = 0; t < 400; ++t) drawn.insert(sample_at(logits, params, 13, t).token_id);
  EXPECT_EQ(drawn, (std::set<int32_t>{1, 2, 3, 4}));
  params.top_k = 1;  // the two tied maxima
  drawn.clear();
  for (int t = 0; t < 400; ++t) drawn.insert(sample_at(logits, params, 13, t).token_id);
  EXPECT_EQ(drawn, (std::set<int32_t>{1, 3}));
}

TEST(SamplingEdgeTest, TinyTemperatureIsGreedyWithoutOverflow) {
  // Gaps of 0.01 at T = 1e-5 are 1000 nats apart: the argmax always wins; huge logits do
  // not overflow the scaled values.
  std::vector<float> logits = {0.50f, 0.51f, 0.49f, -2.0f, 0.505f};
  std::vector<float> huge = {3.0e38f, -3.0e38f, 2.9e38f, 0.0f};
  for (int t = 0; t < 100; ++t) {
    const auto token = sample_at(logits, with_temperature(1e-5f), 11, t);
    EXPECT_EQ(token.token_id, 1);
    EXPECT_TRUE(std::isfinite(token.logprob));
    EXPECT_EQ(sample_at(huge, with_temperature(1e-5f), 11, t).token_id, 0);
  }
}

TEST(SamplingEdgeTest, VocabularyOfOne) {
  SamplingParams params;
  params.top_k = 5;
  params.top_p = 0.5f;
  params.min_p = 0.5f;
  params.logprobs = 3;
  for (int t = 0; t < 10; ++t) {
    const auto token = sample_at({-4.0f}, params, 1, t);
    EXPECT_EQ(token.token_id, 0);
    EXPECT_EQ(token.logprob, 0.0f);
    ASSERT_EQ(token.top_logprobs.size(), 1u);
  }
}

TEST(SamplingEdgeTest, EveryTokenBannedButOne) {
  const auto logits = random_logits(64, 9, 3.0f);
  std::vector<int32_t> banned;
  for (int32_t id = 0; id < 64; ++id) {
    if (id != 17) banned.push_back(id);
  }
  SamplingParams params;
  params.top_k = 3;
  params.top_p = 0.5f;
  for (int t = 0; t < 100; ++t) {
    SamplingContext context;
    context.banned_ids = banned;
    context.token_index = t;
    EXPECT_EQ(sample_token(logits, params, context).token_id, 17);
  }
}

TEST(SamplingEdgeTest, EveryTokenBannedFallsBackToRawGreedy) {
  const std::vector<float> logits = {0.1f, 0.7f, 0.7f, 0.2f};
  const std::vector<int32_t> banned = {0, 1, 2, 3};
  SamplingContext context;
  context.banned_ids = banned;
  EXPECT_EQ(sample_token(logits, {}, context).token_id, 1);
  EXPECT_EQ(sample_token(std::vector<float>{-kInf, kNaN}, {}, {}).token_id, 0);
  EXPECT_EQ(sample_token(std::vector<float>{-kInf, kNaN}, {}, {}).logprob, -kInf);
}

TEST(SamplingValidationTest, RejectsOutOfRangeInputsNamingTheField) {
  const auto expect_invalid = [](const SamplingParams& params, const SamplingContext& context,
                                 const std::string& field, int64_t vocab_size = 10) {
    const auto status = validate_sampling_inputs(vocab_size, params, context);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_NE(status.message().find(field), std::string::npos) << status.message();
  };
  EXPECT_TRUE(validate_sampling_inputs(10, {}, {}).ok());
  SamplingParams p;
  p.temperature = -0.1f;
  expect_invalid(p, {}, "temperature");
  p = {};
  p.top_k = -1;
  expect_invalid(p, {}, "top_k");
  for (float top_p : {0.0f, 1.5f, kNaN}) {
    p = {};
    p.top_p = top_p;
    expect_invalid(p, {}, "top_p");
  }
  p = {};
  p.min_p = 1.1f;
  expect_invalid(p, {}, "min_p");
  p = {};
  p.repetition_penalty = 0.0f;
  expect_invalid(p, {}, "repetition_penalty");
  p = {};
  p.frequency_penalty = kInf;
  expect_invalid(p, {}, "frequency_penalty");
  p = {};
  p.presence_penalty = kNaN;
  expect_invalid(p, {}, "presence_penalty");
  p = {};
  p.logprobs = -2;
  expect_invalid(p, {}, "logprobs");
  const std::vector<int32_t> bad = {3, 10};
  expect_invalid({}, {bad, {}, {}}, "prompt_token_ids");
  expect_invalid({}, {{}, bad, {}}, "output_token_ids");
  expect_invalid({}, {{}, {}, bad}, "banned_ids");
  expect_invalid({}, {}, "vocabulary", 0);
}

// ---- The pruned draw on a large vocabulary equals the plain argmax of the definition ----

TEST(SamplingLargeVocabTest, DrawIsTheArgmaxOfScaledLogitPlusGumbel) {
  constexpr size_t kVocab = 128256;
  const auto logits = random_logits(kVocab, 12, 2.5f);
  std::vector<float> sorted = logits;
  std::sort(sorted.begin(), sorted.end(), std::greater<float>());
  const double max_logit = sorted[0];
  struct Case {
    float temperature;
    int top_k;
    float min_p;
  };
  for (const Case c : {Case{1.0f, 0, 0.0f}, Case{0.7f, 40, 0.0f}, Case{1.3f, 0, 0.05f},
                       Case{0.05f, 0, 0.0f}, Case{3.0f, 1000, 0.001f}}) {
    SamplingParams params = with_temperature(c.temperature);
    params.top_k = c.top_k;
    params.min_p = c.min_p;
    const double inverse_temperature = 1.0 / static_cast<double>(c.temperature);
    const double kth = c.top_k > 0 ? sorted[c.top_k - 1] : -kInf;
    for (int t = 0; t < 8; ++t) {
      int32_t best = -1;
      double best_key = -kInf;
      for (size_t id = 0; id < kVocab; ++id) {
        const double s = (logits[id] - max_logit) * inverse_temperature;
        if (logits[id] < kth || std::exp(s) < c.min_p) continue;
        const double key = s + gumbel_for(21, t, static_cast<int32_t>(id));
        if (key > best_key) {
          best_key = key;
          best = static_cast<int32_t>(id);
        }
      }
      EXPECT_EQ(sample_at(logits, params, 21, t).token_id, best)
          << "T=" << c.temperature << " k=" << c.top_k << " min_p=" << c.min_p << " t=" << t;
    }
  }
  // top-p: the kept set is the best-first prefix (of the top-k set, if any) that reaches
  // top_p of that set's mass. Top-k of 40 takes the short-list path, 5000 the full one.
  struct TopPCase {
    float temperature;
    int top_k;
    float top_p;
  };
  for (const TopPCase c :
       {TopPCase{0.8f, 0, 0.9f}, TopPCase{1.2f, 5000, 0.5f}, TopPCase{1.0f, 40, 0.7f}}) {
    SamplingParams params = with_temperature(c.temperature);
    params.top_k = c.top_k;
    params.top_p = c.top_p;
    const double inverse_temperature = 1.0 / static_cast<double>(c.temperature);
    const size_t kept = c.top_k > 0 ? c.top_k : kVocab;
    long double total = 0;
    for (size_t i = 0; i < kept; ++i)
      total += std::exp((sorted[i] - max_logit) * inverse_temperature);
    long double mass = 0;
    float cutoff = sorted[kept - 1];
    for (size_t i = 0; i < kept; ++i) {
      mass += std::exp((sorted[i] - max_logit) * inverse_temperature) / total;
      if (mass >= c.top_p) {
        EXPECT_GT(mass - c.top_p, 1e-6L) << "case too close to its boundary";
        cutoff = sorted[i];
        break;
      }
    }
    for (int t = 0; t < 8; ++t) {
      int32_t best = -1;
      double best_key = -kInf;
      for (size_t id = 0; id < kVocab; ++id) {
        if (logits[id] < cutoff) continue;
        const double s = (logits[id] - max_logit) * inverse_temperature;
        const double key = s + gumbel_for(21, t, static_cast<int32_t>(id));
        if (key > best_key) {
          best_key = key;
          best = static_cast<int32_t>(id);
        }
      }
      EXPECT_EQ(sample_at(logits, params, 21, t).token_id, best)
          << "T=" << c.temperature << " k=" << c.top_k << " p=" << c.top_p << " t=" << t;
    }
  }
}

}  // namespace
}  // namespace megaserve::engine
