#include "bench/metrics_sampler.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "httplib.h"

namespace megaserve::bench {

std::optional<MetricsSample> parse_metrics_sample(absl::string_view body) {
  std::optional<double> running, waiting;
  for (absl::string_view line : absl::StrSplit(body, '\n', absl::SkipEmpty())) {
    std::pair<absl::string_view, absl::string_view> name_value =
        absl::StrSplit(line, absl::MaxSplits(' ', 1));
    double value = 0;
    if (!absl::SimpleAtod(name_value.second, &value)) continue;
    if (name_value.first == "megaserve_requests_running") running = value;
    if (name_value.first == "megaserve_requests_waiting") waiting = value;
  }
  if (!running || !waiting) return std::nullopt;
  MetricsSample sample;
  sample.time = std::chrono::steady_clock::now();
  sample.running = *running;
  sample.waiting = *waiting;
  return sample;
}

MetricsSampler::MetricsSampler(const std::string& address, std::chrono::milliseconds interval)
    : interval_(interval) {
  const size_t colon = address.rfind(':');
  int port = 80;
  std::string host = address;
  if (colon != std::string::npos && absl::SimpleAtoi(address.substr(colon + 1), &port)) {
    host = address.substr(0, colon);
  }
  thread_ = std::thread(&MetricsSampler::loop, this, host, port);
}

MetricsSampler::~MetricsSampler() { stop(); }

std::vector<MetricsSample> MetricsSampler::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  std::lock_guard<std::mutex> lock(mu_);
  return samples_;
}

void MetricsSampler::loop(std::string host, int port) {
  httplib::Client client(host, port);
  client.set_connection_timeout(std::chrono::seconds(1));
  client.set_read_timeout(std::chrono::seconds(2));
  auto next = std::chrono::steady_clock::now();
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    lock.unlock();
    auto response = client.Get("/metrics");
    std::optional<MetricsSample> sample;
    if (response && response->status == 200) sample = parse_metrics_sample(response->body);
    lock.lock();
    if (sample) {
      samples_.push_back(*sample);
    } else {
      ++failed_;
    }
    next += interval_;
    cv_.wait_until(lock, next, [this] { return stopping_; });
  }
}

nlohmann::json to_json(const std::vector<MetricsSample>& samples,
                       std::chrono::steady_clock::time_point start) {
  nlohmann::json out = nlohmann::json::array();
  for (const MetricsSample& s : samples) {
    out.push_back({{"time", std::chrono::duration<double>(s.time - start).count()},
                   {"running", s.running},
                   {"waiting", s.waiting}});
  }
  return out;
}

}  // namespace megaserve::bench
