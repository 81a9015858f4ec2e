#include "server/metrics.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "httplib.h"

namespace megaserve::server {
namespace {

// Prometheus wants "+Inf" and plain decimal numbers; %.17g round-trips doubles.
std::string number(double v) { return absl::StrFormat("%.17g", v); }

void render_counter(const std::string& name, const std::string& help, double value,
                    std::string* out) {
  absl::StrAppend(out, "# HELP ", name, " ", help, "\n# TYPE ", name, " counter\n", name, " ",
                  number(value), "\n");
}

void render_gauge(const std::string& name, const std::string& help, double value,
                  std::string* out) {
  absl::StrAppend(out, "# HELP ", name, " ", help, "\n# TYPE ", name, " gauge\n", name, " ",
                  number(value), "\n");
}

void render_labeled_counter(const std::string& name, const std::string& help,
                            const std::string& label, const std::map<std::string, uint64_t>& values,
                            std::string* out) {
  absl::StrAppend(out, "# HELP ", name, " ", help, "\n# TYPE ", name, " counter\n");
  for (const auto& [key, value] : values) {
    absl::StrAppend(out, name, "{", label, "=\"", key, "\"} ", value, "\n");
  }
}

}  // namespace

Histogram::Histogram(std::vector<double> upper_bounds)
    : upper_bounds_(std::move(upper_bounds)), counts_(upper_bounds_.size() + 1, 0) {}

void Histogram::observe(double value) {
  size_t bucket = 0;
  while (bucket < upper_bounds_.size() && value > upper_bounds_[bucket]) ++bucket;
  std::lock_guard<std::mutex> lock(mu_);
  ++counts_[bucket];
  sum_ += value;
  ++count_;
}

void Histogram::render(const std::string& name, const std::string& help, std::string* out) const {
  std::lock_guard<std::mutex> lock(mu_);
  absl::StrAppend(out, "# HELP ", name, " ", help, "\n# TYPE ", name, " histogram\n");
  uint64_t cumulative = 0;
  for (size_t i = 0; i < counts_.size(); ++i) {
    cumulative += counts_[i];
    const std::string le = i < upper_bounds_.size() ? number(upper_bounds_[i]) : "+Inf";
    absl::StrAppend(out, name, "_bucket{le=\"", le, "\"} ", cumulative, "\n");
  }
  absl::StrAppend(out, name, "_sum ", number(sum_), "\n", name, "_count ", count_, "\n");
}

Metrics::Metrics(std::function<engine::EngineStats()> engine_stats)
    : engine_stats_(std::move(engine_stats)),
      ttft_({0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
             10.0, 20.0, 40.0, 80.0}),
      tpot_({0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
             0.75, 1.0, 2.5}),
      e2e_({0.01, 0.05, 0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0}),
      step_({0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
             1.0}) {}

void set_latencies(RequestRecord& record, std::chrono::steady_clock::time_point received,
                   std::optional<std::chrono::steady_clock::time_point> first_token,
                   std::optional<std::chrono::steady_clock::time_point> last_token) {
  const auto seconds = [](auto from, auto to) {
    return std::chrono::duration<double>(to - from).count();
  };
  if (first_token) {
    record.time_to_first_token = seconds(received, *first_token);
    if (record.completion_tokens > 1) {
      record.time_per_output_token =
          seconds(*first_token, *last_token) / (record.completion_tokens - 1);
    }
  }
  if (record.status == "OK") {
    record.e2e_latency = seconds(received, last_token.value_or(std::chrono::steady_clock::now()));
  }
}

void Metrics::record(const RequestRecord& record) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++requests_by_status_[record.status];
    if (record.finish_reason) ++requests_by_finish_reason_[*record.finish_reason];
    prompt_tokens_ += record.prompt_tokens;
    generation_tokens_ += record.completion_tokens;
  }
  if (record.time_to_first_token) ttft_.observe(*record.time_to_first_token);
  if (record.time_per_output_token) tpot_.observe(*record.time_per_output_token);
  if (record.e2e_latency) e2e_.observe(*record.e2e_latency);
}

void Metrics::observe_step(double seconds) { step_.observe(seconds); }

std::string Metrics::render() const {
  std::string out;
  {
    std::lock_guard<std::mutex> lock(mu_);
    render_labeled_counter(
        "megaserve_requests_total",
        "Generate and Chat calls (gRPC and HTTP) by final status, as gRPC names it.", "status",
        requests_by_status_, &out);
    render_labeled_counter("megaserve_requests_finished_total",
                           "Generate streams that ran, by finish reason.", "reason",
                           requests_by_finish_reason_, &out);
    render_counter("megaserve_prompt_tokens_total", "Prompt tokens of admitted requests.",
                   prompt_tokens_, &out);
    render_counter("megaserve_generation_tokens_total", "Tokens generated and delivered.",
                   generation_tokens_, &out);
  }
  const engine::EngineStats stats = engine_stats_();
  render_gauge("megaserve_requests_waiting", "Requests waiting to be scheduled.", stats.waiting,
               &out);
  render_gauge("megaserve_requests_running", "Requests being computed.", stats.running, &out);
  render_gauge("megaserve_kv_blocks_used", "KV cache blocks in use.", stats.kv_blocks_used, &out);
  render_gauge("megaserve_kv_blocks_total", "KV cache blocks in all.", stats.kv_blocks_total, &out);
  render_counter("megaserve_prefix_cache_queries_total", "Prompt tokens looked up.",
                 stats.prefix_cache_queries, &out);
  render_counter("megaserve_prefix_cache_hits_total", "Prompt tokens found in the cache.",
                 stats.prefix_cache_hits, &out);
  render_gauge("megaserve_prefix_cache_hit_rate",
               "Prefix cache hits over queries since start (0 before any query).",
               stats.prefix_cache_queries > 0
                   ? static_cast<double>(stats.prefix_cache_hits) / stats.prefix_cache_queries
                   : 0.0,
               &out);
  render_counter("megaserve_preemptions_total", "Requests preempted for lack of KV blocks.",
                 stats.preemptions, &out);
  render_counter("megaserve_engine_steps_total", "Engine steps run.", stats.steps, &out);
  ttft_.render("megaserve_time_to_first_token_seconds",
               "From receiving a request to its first generated token.", &out);
  tpot_.render("megaserve_time_per_output_token_seconds",
               "Per request: (last token - first token) / (output tokens - 1).", &out);
  e2e_.render("megaserve_e2e_request_latency_seconds",
              "From receiving a request to its last token.", &out);
  step_.render("megaserve_step_seconds", "Engine step time, observed as each step completes.",
               &out);
  return out;
}

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::start(
    const std::string& address, Metrics* metrics) {
  auto http = std::make_unique<httplib::Server>();
  http->Get("/metrics", [metrics](const httplib::Request&, httplib::Response& res) {
    res.set_content(metrics->render(), "text/plain; version=0.0.4; charset=utf-8");
  });
  http->Get("/", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("megaserve: metrics at /metrics\n", "text/plain");
  });
  // httplib gives each connection a worker until it closes, and by default waits 5 s for a
  // request's next bytes or a kept-alive connection's next request: 8 idle connections took
  // every worker and starved the scrapes. Short waits, and more workers than idle clients
  // plausibly hold (each is a sleeping thread).
  http->new_task_queue = [] { return new httplib::ThreadPool(kMetricsHttpWorkers); };
  http->set_read_timeout(1, 0);
  http->set_write_timeout(1, 0);
  http->set_keep_alive_timeout(1);
  auto listener = HttpListener::start(std::move(http), address, "metrics_address");
  if (!listener.ok()) return listener.status();
  std::unique_ptr<MetricsHttpServer> server(new MetricsHttpServer());
  server->listener_ = *std::move(listener);
  return server;
}

}  // namespace megaserve::server
