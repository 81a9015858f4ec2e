// Pearson's chi-square goodness-of-fit test for the sampling and generator suites: observed
// counts against exact expected probabilities, and the critical value the statistic must
// stay below. The suites draw from fixed seeds, so the outcome is deterministic; the
// threshold is a one-in-a-million tail, so a correct sampler passes with any seed and a
// wrong distribution (see the negative controls) fails by a wide margin.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "gtest/gtest.h"

namespace megaserve::testing {

// Upper 1e-6 quantile of chi-square with `dof` degrees of freedom (Wilson-Hilferty: within
// a few percent for dof >= 2, and conservative enough for dof == 1 at this tail).
inline double chi_square_critical(int dof) {
  constexpr double kZ = 4.753424;  // standard normal upper 1e-6 quantile
  const double k = dof;
  const double a = 2.0 / (9.0 * k);
  return k * std::pow(1.0 - a + kZ * std::sqrt(a), 3.0);
}

struct ChiSquare {
  double statistic = 0.0;
  int dof = 0;
  // One non-empty cell (dof 0) fits trivially: every sample is where it must be.
  bool fits() const { return dof == 0 || statistic < chi_square_critical(dof); }
};

// Cells with expected probability 0 must be empty (a sample there is reported as a test
// failure); the others should expect at least ~5 samples for the approximation to hold.
inline ChiSquare chi_square(const std::vector<int64_t>& counts,
                            const std::vector<long double>& probabilities) {
  int64_t total = 0;
  for (int64_t c : counts) total += c;
  ChiSquare result;
  int cells = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    if (probabilities[i] == 0) {
      EXPECT_EQ(counts[i], 0) << "cell " << i << " has probability 0 but was drawn";
      continue;
    }
    const double expected = static_cast<double>(probabilities[i] * total);
    EXPECT_GE(expected, 5.0) << "cell " << i << ": too few expected samples for chi-square";
    const double diff = static_cast<double>(counts[i]) - expected;
    result.statistic += diff * diff / expected;
    ++cells;
  }
  result.dof = cells - 1;
  return result;
}

}  // namespace megaserve::testing
