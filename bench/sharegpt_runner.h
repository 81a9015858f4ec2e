// Sends the benchmark's requests to a megaserve server over gRPC (one callback reactor per
// stream, so a thousand concurrent streams need no thousand threads) and times each one.
#pragma once

#include <chrono>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "bench/sharegpt_dataset.h"
#include "bench/sharegpt_stats.h"
#include "proto/megaserve.grpc.pb.h"

namespace megaserve::bench {

struct RunOptions {
  double request_rate = std::numeric_limits<double>::infinity();  // requests per second
  double burstiness = 1.0;  // gamma shape of the gaps; 1 is Poisson
  int max_concurrency = 0;  // streams in flight at most; 0 is unlimited
  uint64_t seed = 0;        // of the arrival times
  bool progress = true;     // a progress bar on stderr
};

// The request the benchmark sends for `request`: greedy, ignore_eos, max_tokens =
// output_len, so that every request generates exactly output_len tokens.
v1::GenerateRequest make_generate_request(const BenchRequest& request);

// Runs one request alone and waits for it (the warm-up).
RequestResult run_one(v1::Megaserve::Stub* stub, const BenchRequest& request);

struct RunResult {
  std::vector<RequestResult> results;           // in the order of `requests`
  double duration_s = 0;                        // first send to last completion
  std::chrono::steady_clock::time_point start;  // the run's start, time 0 of its timeline
};

RunResult run_benchmark(v1::Megaserve::Stub* stub, const std::vector<BenchRequest>& requests,
                        const RunOptions& options);

}  // namespace megaserve::bench
