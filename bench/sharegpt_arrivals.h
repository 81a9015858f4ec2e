// When the benchmark sends each request. Gaps between requests are drawn from a gamma
// distribution with shape = burstiness and mean 1 / rate: burstiness 1 is a Poisson
// process (exponential gaps), smaller is burstier, larger more regular. An infinite rate
// sends everything at once.
#pragma once

#include <cstdint>
#include <vector>

namespace megaserve::bench {

// Send times in seconds from the start for `n` requests; the first is at 0.
std::vector<double> arrival_times(int n, double rate, double burstiness, uint64_t seed);

}  // namespace megaserve::bench
