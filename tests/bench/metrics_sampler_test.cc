#include "bench/metrics_sampler.h"

#include <chrono>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "httplib.h"

namespace megaserve::bench {
namespace {

constexpr char kBody[] = R"(# HELP megaserve_requests_waiting Requests waiting to be scheduled.
# TYPE megaserve_requests_waiting gauge
megaserve_requests_waiting 3
# HELP megaserve_requests_running Requests being computed.
# TYPE megaserve_requests_running gauge
megaserve_requests_running 12
megaserve_requests_running_total{x="y"} 99
megaserve_requests_total{status="OK"} 7
)";

TEST(ParseMetricsSample, ReadsTheRunningAndWaitingGauges) {
  auto sample = parse_metrics_sample(kBody);
  ASSERT_TRUE(sample.has_value());
  EXPECT_EQ(sample->running, 12);
  EXPECT_EQ(sample->waiting, 3);
}

TEST(ParseMetricsSample, NothingWhenAGaugeIsMissing) {
  EXPECT_FALSE(parse_metrics_sample("megaserve_requests_running 1\n").has_value());
  EXPECT_FALSE(parse_metrics_sample("").has_value());
}

TEST(MetricsSampler, ScrapesAServerUntilStopped) {
  httplib::Server server;
  server.Get("/metrics", [](const httplib::Request&, httplib::Response& res) {
    res.set_content(kBody, "text/plain; version=0.0.4");
  });
  const int port = server.bind_to_any_port("127.0.0.1");
  ASSERT_GT(port, 0);
  std::thread serve([&] { server.listen_after_bind(); });
  for (int i = 0; i < 2000 && !server.is_running(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ASSERT_TRUE(server.is_running());

  const auto start = std::chrono::steady_clock::now();
  MetricsSampler sampler(absl::StrCat("127.0.0.1:", port), std::chrono::milliseconds(10));
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  const std::vector<MetricsSample> samples = sampler.stop();
  const double elapsed_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  server.stop();
  serve.join();

  EXPECT_GE(samples.size(), 3u);
  EXPECT_LE(samples.size(), elapsed_ms / 10 + 2);  // one per 10 ms at most, plus the first
  EXPECT_EQ(sampler.failed_scrapes(), 0);
  const nlohmann::json j = to_json(samples, start);
  ASSERT_EQ(j.size(), samples.size());
  for (size_t i = 0; i < j.size(); ++i) {
    EXPECT_EQ(j[i]["running"], 12);
    EXPECT_EQ(j[i]["waiting"], 3);
    EXPECT_GE(j[i]["time"].get<double>(), 0);
    if (i > 0) {
      EXPECT_GT(j[i]["time"].get<double>(), j[i - 1]["time"].get<double>());
    }
  }
}

TEST(MetricsSampler, CountsFailedScrapesWithoutRecordingThem) {
  int port = 0;
  {
    httplib::Server closed;  // a port that was free a moment ago, now with nobody listening
    port = closed.bind_to_any_port("127.0.0.1");
  }
  MetricsSampler sampler(absl::StrCat("127.0.0.1:", port), std::chrono::milliseconds(10));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_TRUE(sampler.stop().empty());
  EXPECT_GT(sampler.failed_scrapes(), 0);
}

}  // namespace
}  // namespace megaserve::bench
