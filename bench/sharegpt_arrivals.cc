#include "bench/sharegpt_arrivals.h"

#include <cmath>
#include <random>

namespace megaserve::bench {

std::vector<double> arrival_times(int n, double rate, double burstiness, uint64_t seed) {
  std::vector<double> times(n > 0 ? n : 0, 0.0);
  if (n <= 0 || std::isinf(rate)) return times;
  std::mt19937_64 rng(seed);
  // Gamma(shape k, scale theta) has mean k * theta = 1 / rate.
  std::gamma_distribution<double> gap(burstiness, 1.0 / (rate * burstiness));
  for (int i = 1; i < n; ++i) times[i] = times[i - 1] + gap(rng);
  return times;
}

}  // namespace megaserve::bench
