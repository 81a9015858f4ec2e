// Tests of engine/isa/sampling.h. Distributions are checked by chi-square against probabilities
// computed here from the header's definitions (full sorts over small vocabularies, long
// double), never from the implementation; exact behaviour (penalties, greedy, logprobs,
// seeding, the pruned Gumbel-max draw on a 128k vocabulary) against straight-line formulas.
#include "engine/isa/sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "tests/engine/isa/chi_square.h"

namespace megaserve::engine {
namespace {

using megaserve::testing::chi_square;
using scheduler::SamplingParams;

constexpr float kInf = std::numeric_limits<float>::infinity();

SamplingParams with_temperature(float temperature) {
  SamplingParams params;
  params.temperature = temperature;
  return params;
}

// The kept set of steps 5-8 (no penalties), from the definitions in sampling.h.
std::vector<bool> reference_kept(const std::vector<float>& logits, const SamplingParams& p) {
  const size_t n = logits.size();
  const long double max_logit = *std::max_element(logits.begin(), logits.end());
  std::vector<long double> s(n);
  std::vector<bool> kept(n);
  for (size_t i = 0; i < n; ++i) {
    s[i] = (logits[i] - max_logit) / static_cast<long double>(p.temperature);
    kept[i] = logits[i] != -kInf;
  }
  auto ids_best_first = [&] {
    std::vector<size_t> ids;
    for (size_t i = 0; i < n; ++i) {
      if (kept[i]) ids.push_back(i);
    }
    std::sort(ids.begin(), ids.end(), [&](size_t a, size_t b) { return s[a] > s[b]; });
    return ids;
  };
  auto probabilities = [&] {  // softmax of s over the kept set
    long double total = 0;
    for (size_t i = 0; i < n; ++i) total += kept[i] ? std::exp(s[i]) : 0;
    std::vector<long double> prob(n);
    for (size_t i = 0; i < n; ++i) prob[i] = kept[i] ? std::exp(s[i]) / total : 0;
    return prob;
  };
  if (p.top_k > 0 && static_cast<size_t>(p.top_k) < ids_best_first().size()) {
    const long double kth = s[ids_best_first()[p.top_k - 1]];
    for (size_t i = 0; i < n; ++i) kept[i] = kept[i] && s[i] >= kth;
  }
  if (p.top_p < 1) {
    const auto prob = probabilities();
    long double mass = 0;
    long double last = 0;
    for (size_t id : ids_best_first()) {
      mass += prob[id];
      last = prob[id];
      if (mass >= p.top_p) {
        // Keep the cases well away from the boundary, where rounding would decide.
        EXPECT_GT(mass - p.top_p, 1e-6L) << "top_p test case too close to its boundary";
        break;
      }
    }
    for (size_t i = 0; i < n; ++i) kept[i] = kept[i] && prob[i] >= last;
  }
  if (p.min_p > 0) {
    const auto prob = probabilities();
    const long double max_prob = *std::max_element(prob.begin(), prob.end());
    for (size_t i = 0; i < n; ++i) kept[i] = kept[i] && prob[i] >= p.min_p * max_prob;
  }
  return kept;
}

// The exact sampling distribution: softmax of logit / temperature over the kept set.
std::vector<long double> reference_distribution(const std::vector<float>& logits,
                                                const SamplingParams& p) {
  const auto kept = reference_kept(logits, p);
  const long double max_logit = *std::max_element(logits.begin(), logits.end());
  std::vector<long double> prob(logits.size(), 0);
  long double total = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    if (kept[i]) total += prob[i] = std::exp((logits[i] - max_logit) / p.temperature);
  }
  for (long double& x : prob) x /= total;
  return prob;
}

// Token counts over `draws` samples with token indices 0, 1, ... (independent draws).
std::vector<int64_t> sample_counts(const std::vector<float>& logits, const SamplingParams& p,
                                   int draws, uint64_t seed = 1234) {
  std::vector<int64_t> counts(logits.size(), 0);
  SamplingContext context;
  context.seed = seed;
  for (int t = 0; t < draws; ++t) {
    context.token_index = t;
    counts[sample_token(logits, p, context).token_id]++;
  }
  return counts;
}

void expect_distribution(const std::vector<float>& logits, const SamplingParams& p,
                         int draws = 20000) {
  const auto expected = reference_distribution(logits, p);
  const auto result = chi_square(sample_counts(logits, p, draws), expected);
  EXPECT_TRUE(result.fits()) << "chi-square " << result.statistic << " with " << result.dof
                             << " degrees of freedom (T=" << p.temperature << " k=" << p.top_k
                             << " p=" << p.top_p << " min_p=" << p.min_p << ")";
}

const std::vector<float> kEightLogits = {1.0f, 2.5f, 0.3f, 2.0f, -1.0f, 1.7f, 0.0f, 2.2f};

TEST(SamplingDistributionTest, TemperatureMatchesSoftmax) {
  for (float temperature : {1.0f, 0.5f, 2.0f, 0.8f}) {
    expect_distribution(kEightLogits, with_temperature(temperature));
  }
}

TEST(SamplingDistributionTest, TopKMatchesDefinition) {
  for (int k : {1, 2, 3, 5}) {
    SamplingParams p;
    p.top_k = k;
    expect_distribution(kEightLogits, p);
  }
}

TEST(SamplingDistributionTest, TopPMatchesDefinition) {
  for (float top_p : {0.3f, 0.5f, 0.75f, 0.9f}) {
    SamplingParams p;
    p.top_p = top_p;
    expect_distribution(kEightLogits, p);
  }
}

TEST(SamplingDistributionTest, MinPMatchesDefinition) {
  for (float min_p : {0.1f, 0.3f, 0.6f}) {
    SamplingParams p;
    p.min_p = min_p;
    expect_distribution(kEightLogits, p);
  }
}

TEST(SamplingDistributionTest, CombinationsMatchDefinition) {
  SamplingParams p;
  p.temperature = 0.7f;
  p.top_k = 5;
  p.top_p = 0.85f;
  expect_distribution(kEightLogits, p);
  p.min_p = 0.35f;
  expect_distribution(kEightLogits, p);
  p = with_temperature(1.6f);
  p.top_k = 6;
  p.min_p = 0.2f;
  expect_distribution(kEightLogits, p);
}

TEST(SamplingDistributionTest, NegativeControlRejectsTheWrongTemperature) {
  // Samples at T = 0.7 tested against the T = 1 distribution must fail the fit.
  const auto counts = sample_counts(kEightLogits, with_temperature(0.7f), 20000);
  EXPECT_FALSE(chi_square(counts, reference_distribution(kEightLogits, {})).fits());
}

// sampling.h's order of application, each case built so that another order would differ.
TEST(SamplingOrderTest, TopPSeesTheTopKRenormalizedSet) {
  // Probabilities 0.5, 0.3, 0.2. After top-k = 2: 0.625, 0.375, so top-p = 0.6 keeps token
  // 0 alone; top-p over all three would keep tokens 0 and 1.
  const std::vector<float> logits = {std::log(0.5f), std::log(0.3f), std::log(0.2f)};
  SamplingParams p;
  p.top_k = 2;
  p.top_p = 0.6f;
  const auto counts = sample_counts(logits, p, 2000);
  EXPECT_EQ(counts[0], 2000);
}

TEST(SamplingOrderTest, MinPComesAfterTopP) {
  // Probabilities 0.4, 0.35, 0.15, 0.1. top-p = 0.8 keeps 0, 1, 2 (0.9 >= 0.8); min-p = 0.3
  // then drops nothing above 0.3 * 0.4 = 0.12 among them, so token 2 stays. Min-p first
  // would drop token 3, and top-p over the renormalized rest would then drop token 2.
  const std::vector<float> logits = {std::log(0.4f), std::log(0.35f), std::log(0.15f),
                                     std::log(0.1f)};
  SamplingParams p;
  p.top_p = 0.8f;
  p.min_p = 0.3f;
  const auto expected = reference_distribution(logits, p);
  EXPECT_GT(expected[2], 0.15L);
  EXPECT_EQ(expected[3], 0.0L);
  expect_distribution(logits, p);
}

TEST(SamplingOrderTest, TopPUsesTemperedProbabilities) {
  // At T = 1 the first token alone has mass 0.7 >= top_p; at T = 3 it needs company.
  const std::vector<float> logits = {std::log(0.7f), std::log(0.2f), std::log(0.1f)};
  SamplingParams p;
  p.top_p = 0.65f;
  EXPECT_EQ(sample_counts(logits, p, 500)[0], 500);
  p.temperature = 3.0f;
  const auto counts = sample_counts(logits, p, 500);
  EXPECT_GT(counts[1], 0);
  expect_distribution(logits, p);
}

TEST(SamplingOrderTest, PenaltiesAndBansComeBeforeTheFilters) {
  const std::vector<float> logits = {1.0f, 3.0f, 2.0f, 0.5f};
  SamplingParams p;
  p.top_k = 1;
  SamplingContext context;
  EXPECT_EQ(sample_token(logits, p, context).token_id, 1);
  // Repetition penalty 2 on token 1: 3 / 2 = 1.5 < 2, so top-1 is now token 2.
  p.repetition_penalty = 2.0f;
  const std::vector<int32_t> prompt = {1};
  context.prompt_token_ids = prompt;
  EXPECT_EQ(sample_token(logits, p, context).token_id, 2);
  // Banning token 2 as well leaves token 1 (1.5) ahead of token 0 (1.0).
  const std::vector<int32_t> banned = {2};
  context.banned_ids = banned;
  for (int t = 0; t < 50; ++t) {
    context.token_index = t;
    EXPECT_EQ(sample_token(logits, p, context).token_id, 1);
  }
}

// Penalties, element by element against the formulas of sampling.h.
TEST(SamplingPenaltyTest, ApplyPenaltiesFollowsTheFormulas) {
  std::mt19937 gen(7);
  std::uniform_real_distribution<float> dist(-3.0f, 3.0f);
  std::vector<float> logits(40);
  for (float& x : logits) x = dist(gen);
  logits[5] = 0.0f;  // exactly zero goes through the "* p" branch: stays 0
  const std::vector<int32_t> prompt = {1, 3, 3, 5, 20, 21};
  const std::vector<int32_t> output = {3, 7, 7, 7, 9, 21, 30, 30};
  const std::vector<int32_t> banned = {11, 30};
  SamplingParams p;
  p.repetition_penalty = 1.3f;
  p.frequency_penalty = 0.4f;
  p.presence_penalty = 0.25f;
  SamplingContext context{prompt, output, banned};
  const auto processed = apply_penalties(logits, p, context);
  ASSERT_EQ(processed.size(), logits.size());
  for (int32_t id = 0; id < 40; ++id) {
    float x = logits[id];
    const bool seen = std::count(prompt.begin(), prompt.end(), id) > 0 ||
                      std::count(output.begin(), output.end(), id) > 0;
    if (seen) x = x > 0 ? x / p.repetition_penalty : x * p.repetition_penalty;
    const auto count = static_cast<float>(std::count(output.begin(), output.end(), id));
    x -= p.frequency_penalty * count + p.presence_penalty * (count > 0 ? 1.0f : 0.0f);
    if (std::count(banned.begin(), banned.end(), id) > 0) x = -kInf;
    EXPECT_FLOAT_EQ(processed[id], x) << "id " << id;
  }
  EXPECT_EQ(processed[5], 0.0f);  // in the prompt, zero, not in the output
}

TEST(SamplingPenaltyTest, NeutralPenaltiesLeaveLogitsAlone) {
  const std::vector<int32_t> ids = {0, 1, 1, 2};
  const auto processed = apply_penalties(kEightLogits, {}, {ids, ids, {}});
  EXPECT_EQ(processed, kEightLogits);
}

TEST(SamplingPenaltyTest, PenaltiesChangeGreedyChoices) {
  const std::vector<float> logits = {0.5f, 2.0f, 1.8f, -0.5f, -0.6f};
  SamplingParams p = with_temperature(0.0f);
  const std::vector<int32_t> once = {1};
  EXPECT_EQ(sample_token(logits, p, {}).token_id, 1);
  p.presence_penalty = 0.3f;  // 2.0 - 0.3 = 1.7 < 1.8
  EXPECT_EQ(sample_token(logits, p, {{}, once, {}}).token_id, 2);
  p.presence_penalty = 0.1f;  // 1.9 > 1.8
  EXPECT_EQ(sample_token(logits, p, {{}, once, {}}).token_id, 1);
  const std::vector<int32_t> thrice = {1, 1, 1};
  p.presence_penalty = 0.0f;
  p.frequency_penalty = 0.1f;  // 2.0 - 0.3 = 1.7 < 1.8
  EXPECT_EQ(sample_token(logits, p, {{}, thrice, {}}).token_id, 2);
  // A negative logit is multiplied by the repetition penalty: -0.5 * 1.5 = -0.75 < -0.6.
  const std::vector<float> negative = {-0.5f, -0.6f};
  p = with_temperature(0.0f);
  p.repetition_penalty = 1.5f;
  const std::vector<int32_t> prompt = {0};
  EXPECT_EQ(sample_token(negative, p, {prompt, {}, {}}).token_id, 1);
  // The prompt does not count for frequency or presence penalties.
  p = with_temperature(0.0f);
  p.presence_penalty = 1.0f;
  EXPECT_EQ(sample_token(negative, p, {prompt, {}, {}}).token_id, 0);
}

}  // namespace
}  // namespace megaserve::engine
