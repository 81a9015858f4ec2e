// Tests of engine/isa/counter_rng.h: the counter-based generator behind seeded sampling. Its
// values are pure functions of (seed, token index, vocab id), strictly inside (0, 1), and
// statistically sound: right moments, no structure between neighbouring keys.
#include "engine/isa/counter_rng.h"

#include <algorithm>
#include <cmath>
#include <numbers>
#include <vector>

#include "engine/isa/sampling.h"
#include "gtest/gtest.h"
#include "tests/engine/isa/chi_square.h"

namespace megaserve::engine {
namespace {

using megaserve::testing::chi_square;

TEST(CounterRngTest, UniformExtremesAreStrictlyInsideTheUnitInterval) {
  // The smallest and largest values any 64 bits can give, and their Gumbel noise.
  const double lowest = rng::uniform_from_bits(0);
  const double highest = rng::uniform_from_bits(~uint64_t{0});
  EXPECT_EQ(lowest, std::ldexp(1.0, -53));
  EXPECT_EQ(highest, 1.0 - std::ldexp(1.0, -53));
  EXPECT_GT(lowest, 0.0);
  EXPECT_LT(highest, 1.0);
  EXPECT_TRUE(std::isfinite(rng::gumbel_from_uniform(lowest)));
  EXPECT_TRUE(std::isfinite(rng::gumbel_from_uniform(highest)));
  EXPECT_NEAR(rng::gumbel_from_uniform(highest), 53 * std::numbers::ln2, 1e-9);
}

TEST(CounterRngTest, UniformMomentsOverManyKeys) {
  // Mean 1/2 and variance 1/12 over keys that vary in every coordinate; the tolerances are
  // six standard errors of the estimates.
  constexpr int kCount = 400000;
  double sum = 0.0;
  double sum_squares = 0.0;
  double lowest = 1.0;
  double highest = 0.0;
  int n = 0;
  for (uint64_t seed : {0ull, 1ull, 0xdeadbeefull, ~0ull}) {
    for (int64_t t = 0; t < 100; ++t) {
      for (int32_t id = 0; id < kCount / 400; ++id) {
        const double u = uniform_for(seed, t, id);
        ASSERT_GT(u, 0.0);
        ASSERT_LT(u, 1.0);
        sum += u;
        sum_squares += u * u;
        lowest = std::min(lowest, u);
        highest = std::max(highest, u);
        ++n;
      }
    }
  }
  const double mean = sum / n;
  const double variance = sum_squares / n - mean * mean;
  EXPECT_NEAR(mean, 0.5, 6 * std::sqrt(1.0 / 12 / n));
  EXPECT_NEAR(variance, 1.0 / 12, 6 * std::sqrt(1.0 / 180 / n));
  EXPECT_LT(lowest, 1e-4);
  EXPECT_GT(highest, 1 - 1e-4);
}

TEST(CounterRngTest, GumbelMomentsMatchTheStandardGumbel) {
  // Standard Gumbel: mean = Euler's gamma, variance = pi^2 / 6.
  constexpr int kCount = 200000;
  double sum = 0.0;
  double sum_squares = 0.0;
  for (int32_t id = 0; id < kCount; ++id) {
    const double g = gumbel_for(42, 7, id);
    sum += g;
    sum_squares += g * g;
  }
  const double mean = sum / kCount;
  const double variance = sum_squares / kCount - mean * mean;
  const double true_variance = std::numbers::pi * std::numbers::pi / 6;
  EXPECT_NEAR(mean, std::numbers::egamma, 6 * std::sqrt(true_variance / kCount));
  EXPECT_NEAR(variance, true_variance, 0.05);
}

TEST(CounterRngTest, PublicFunctionsAgreeWithTheDeviceHeader) {
  for (uint64_t seed : {0ull, 3ull, 0x123456789abcdefull}) {
    for (int64_t t : {int64_t{0}, int64_t{1}, int64_t{1} << 40}) {
      for (int32_t id : {0, 1, 511, 128255}) {
        const double u = uniform_for(seed, t, id);
        EXPECT_EQ(u, rng::uniform_for(seed, t, id));
        EXPECT_EQ(u, rng::uniform_from_bits(rng::bits_for(rng::stream_for(seed, t), id)));
        EXPECT_EQ(gumbel_for(seed, t, id), -std::log(-std::log(u)));
        EXPECT_EQ(gumbel_for(seed, t, id), rng::gumbel_for(seed, t, id));
      }
    }
  }
}

TEST(CounterRngTest, DistinctIdsOfOneStreamGetDistinctBits) {
  constexpr int kIds = 200000;
  std::vector<uint64_t> bits;
  const uint64_t stream = rng::stream_for(9, 3);
  for (int32_t id = 0; id < kIds; ++id) bits.push_back(rng::bits_for(stream, id));
  std::sort(bits.begin(), bits.end());
  EXPECT_EQ(std::unique(bits.begin(), bits.end()), bits.end());
}

// Chi-square of 16 x 16 buckets of (u(key), u(next key)): uniform and independent pairs
// fill them evenly; a correlation between neighbours would not.
template <typename PairAt>
void expect_neighbours_independent(PairAt pair_at, const char* what) {
  constexpr int kBuckets = 16;
  constexpr int kPairs = 64000;
  std::vector<int64_t> counts(kBuckets * kBuckets, 0);
  for (int i = 0; i < kPairs; ++i) {
    const auto [a, b] = pair_at(i);
    counts[static_cast<int>(a * kBuckets) * kBuckets + static_cast<int>(b * kBuckets)]++;
  }
  const std::vector<long double> uniform(counts.size(), 1.0L / counts.size());
  const auto result = chi_square(counts, uniform);
  EXPECT_TRUE(result.fits()) << what << ": chi-square " << result.statistic << " with "
                             << result.dof << " degrees of freedom";
}

TEST(CounterRngTest, NeighbouringKeysAreIndependent) {
  expect_neighbours_independent(
      [](int i) { return std::pair(uniform_for(5, 0, 2 * i), uniform_for(5, 0, 2 * i + 1)); },
      "adjacent vocab ids");
  expect_neighbours_independent(
      [](int i) { return std::pair(uniform_for(5, 2 * i, 17), uniform_for(5, 2 * i + 1, 17)); },
      "adjacent token indices");
  expect_neighbours_independent(
      [](int i) { return std::pair(uniform_for(2 * i, 3, 17), uniform_for(2 * i + 1, 3, 17)); },
      "adjacent seeds");
  // Token index and id swapped (a != b always): the key is not symmetric.
  expect_neighbours_independent(
      [](int i) {
        const int a = i % 256;
        const int b = 256 + i / 256;
        return std::pair(uniform_for(5, a, b), uniform_for(5, b, a));
      },
      "token index and id swapped");
}

TEST(CounterRngTest, NegativeControlDetectsCorrelatedPairs) {
  // The same check on a deliberately correlated pair must fail, or it proves nothing.
  constexpr int kBuckets = 16;
  std::vector<int64_t> counts(kBuckets * kBuckets, 0);
  for (int i = 0; i < 64000; ++i) {
    const double a = uniform_for(5, 0, i);
    const double b = 0.5 * a + 0.5 * uniform_for(6, 0, i);
    counts[static_cast<int>(a * kBuckets) * kBuckets + static_cast<int>(b * kBuckets)]++;
  }
  const std::vector<long double> uniform(counts.size(), 1.0L / counts.size());
  EXPECT_FALSE(chi_square(counts, uniform).fits());
}

}  // namespace
}  // namespace megaserve::engine
