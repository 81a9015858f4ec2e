// Scrapes a megaserve server's Prometheus endpoint at a fixed interval while the benchmark
// runs, keeping the running and waiting request gauges, so that a result can show the
// server's queue over time (scripts/bench-plot.py draws it).
#pragma once

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"

namespace megaserve::bench {

struct MetricsSample {
  std::chrono::steady_clock::time_point time;  // when the response arrived
  double running = 0;                          // megaserve_requests_running
  double waiting = 0;                          // megaserve_requests_waiting
};

// The two gauges from a /metrics body; nullopt when either is missing.
std::optional<MetricsSample> parse_metrics_sample(absl::string_view body);

// Samples http://<address>/metrics every `interval` on its own thread from construction
// until stop(); failed scrapes are counted, not recorded.
class MetricsSampler {
 public:
  MetricsSampler(const std::string& address, std::chrono::milliseconds interval);
  ~MetricsSampler();

  // Stops the thread (after at most one scrape in progress) and returns the samples.
  std::vector<MetricsSample> stop();
  int failed_scrapes() const { return failed_; }  // after stop()

 private:
  void loop(std::string host, int port);

  std::chrono::milliseconds interval_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  std::vector<MetricsSample> samples_;
  int failed_ = 0;
  std::thread thread_;
};

// [{"time": s, "running": n, "waiting": n}], times in seconds from `start`.
nlohmann::json to_json(const std::vector<MetricsSample>& samples,
                       std::chrono::steady_clock::time_point start);

}  // namespace megaserve::bench
