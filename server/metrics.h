// Prometheus metrics of the server, rendered in the text exposition format (version 0.0.4)
// and served over HTTP on their own port. Request-level numbers are recorded by the
// Generate reactors when a call ends; engine-level gauges are read from Engine::stats() at
// scrape time; the step-time histogram is fed by the engine's step observer.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/engine.h"
#include "server/http_listener.h"

namespace megaserve::server {

// A cumulative histogram with fixed upper bounds (seconds).
class Histogram {
 public:
  explicit Histogram(std::vector<double> upper_bounds);
  void observe(double value);
  // Appends the _bucket, _sum and _count lines of metric `name`.
  void render(const std::string& name, const std::string& help, std::string* out) const;

 private:
  const std::vector<double> upper_bounds_;
  mutable std::mutex mu_;
  std::vector<uint64_t> counts_;  // per bucket, not cumulative; last is +Inf
  double sum_ = 0;
  uint64_t count_ = 0;
};

// One finished Generate call, as the metrics see it.
struct RequestRecord {
  std::string status;                        // gRPC status code name, e.g. "OK", "CANCELLED"
  std::optional<std::string> finish_reason;  // "stop", "length", "abort" for streams that ran
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  std::optional<double> time_to_first_token;    // seconds
  std::optional<double> time_per_output_token;  // (last - first token) / (tokens - 1)
  std::optional<double> e2e_latency;
};

// Sets `record`'s latencies (its status and completion_tokens set first) from when the request
// arrived and when its first and last tokens were ready; end-to-end latency only for "OK".
void set_latencies(RequestRecord& record, std::chrono::steady_clock::time_point received,
                   std::optional<std::chrono::steady_clock::time_point> first_token,
                   std::optional<std::chrono::steady_clock::time_point> last_token);

class Metrics {
 public:
  explicit Metrics(std::function<engine::EngineStats()> engine_stats);

  void record(const RequestRecord& record);
  // One engine step took `seconds` (the engine's step observer, Engine::set_step_observer).
  void observe_step(double seconds);
  std::string render() const;

 private:
  std::function<engine::EngineStats()> engine_stats_;
  mutable std::mutex mu_;
  std::map<std::string, uint64_t> requests_by_status_;
  std::map<std::string, uint64_t> requests_by_finish_reason_;
  uint64_t prompt_tokens_ = 0;
  uint64_t generation_tokens_ = 0;
  Histogram ttft_;
  Histogram tpot_;
  Histogram e2e_;
  Histogram step_;
};

// Serves GET /metrics (and / for a pointer to it) on `address` ("host:port"; port 0 picks a
// free one).
class MetricsHttpServer {
 public:
  // Connections served at once; an idle or half-sent one holds a worker for at most ~1 s of
  // silence.
  static constexpr int kMetricsHttpWorkers = 64;

  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> start(const std::string& address,
                                                                  Metrics* metrics);
  int port() const { return listener_->port(); }
  void stop() { listener_->stop(); }

 private:
  MetricsHttpServer() = default;

  std::unique_ptr<HttpListener> listener_;
};

}  // namespace megaserve::server
