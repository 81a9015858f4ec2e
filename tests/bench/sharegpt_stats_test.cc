#include "bench/sharegpt_stats.h"

#include <cmath>
#include <vector>

#include "bench/sharegpt_arrivals.h"
#include "gtest/gtest.h"

namespace megaserve::bench {
namespace {

TEST(Percentile, InterpolatesLinearlyBetweenClosestRanks) {
  EXPECT_DOUBLE_EQ(percentile({4, 1, 3, 2}, 50), 2.5);
  // rank = 0.99 * 3 = 2.97: 3 + 0.97 * (4 - 3)
  EXPECT_DOUBLE_EQ(percentile({4, 1, 3, 2}, 99), 3.97);
  EXPECT_DOUBLE_EQ(percentile({4, 1, 3, 2}, 0), 1);
  EXPECT_DOUBLE_EQ(percentile({4, 1, 3, 2}, 100), 4);
  EXPECT_DOUBLE_EQ(percentile({7}, 99), 7);
  EXPECT_DOUBLE_EQ(percentile({}, 50), 0);
}

TEST(Distribution, MeanMedianP99AndPopulationStd) {
  const Distribution d = distribution({2, 4, 4, 4, 5, 5, 7, 9});
  EXPECT_DOUBLE_EQ(d.mean, 5);
  EXPECT_DOUBLE_EQ(d.std, 2);
  EXPECT_DOUBLE_EQ(d.median, 4.5);
  EXPECT_DOUBLE_EQ(d.p99, 7 + 0.93 * 2);  // rank 6.93
}

TEST(Summarize, UsesThePeersDefinitions) {
  RequestResult a;  // 5 tokens: TPOT = (1.0 - 0.2) / 4 = 0.2 s
  a.success = true;
  a.prompt_len = 10;
  a.output_tokens = 5;
  a.ttft = 0.2;
  a.latency = 1.0;
  a.itl = {0.1, 0.3};
  RequestResult b;  // one token: no TPOT
  b.success = true;
  b.prompt_len = 30;
  b.output_tokens = 1;
  b.ttft = 0.4;
  b.latency = 0.4;
  RequestResult failed;  // counted as failed, excluded from everything else
  failed.success = false;
  failed.prompt_len = 1000;
  failed.output_tokens = 3;
  failed.ttft = 9;
  failed.latency = 9;
  const BenchmarkSummary s = summarize({a, b, failed}, 2.0);
  EXPECT_EQ(s.completed, 2);
  EXPECT_EQ(s.failed, 1);
  EXPECT_EQ(s.total_input_tokens, 40);
  EXPECT_EQ(s.total_output_tokens, 6);
  EXPECT_DOUBLE_EQ(s.request_throughput, 1.0);
  EXPECT_DOUBLE_EQ(s.input_throughput, 20.0);
  EXPECT_DOUBLE_EQ(s.output_throughput, 3.0);
  EXPECT_DOUBLE_EQ(s.total_token_throughput, 23.0);
  EXPECT_NEAR(s.ttft_ms.mean, 300, 1e-9);
  EXPECT_NEAR(s.tpot_ms.mean, 200, 1e-9);
  EXPECT_NEAR(s.tpot_ms.p99, 200, 1e-9);
  EXPECT_NEAR(s.itl_ms.mean, 200, 1e-9);
  EXPECT_NEAR(s.e2e_ms.median, 700, 1e-9);
  EXPECT_NE(format_summary(s).find("Failed requests:"), std::string::npos);
  EXPECT_EQ(to_json(s)["tpot_ms"]["mean"].get<double>(), s.tpot_ms.mean);
}

TEST(PerRequestJson, HoldsEveryRequestsTimelineInRunOrder) {
  RequestResult a;  // sent at 0.5 s; three tokens in two messages
  a.success = true;
  a.prompt_len = 10;
  a.output_tokens = 3;
  a.ttft = 0.25;
  a.itl = {0.5};
  a.send_time = 0.5;
  a.token_times = {0.75, 1.25, 1.25};
  RequestResult b;  // failed before its first token
  b.error = "status 14: unavailable";
  b.prompt_len = 7;
  b.send_time = 1.0;
  const nlohmann::json j = per_request_json({a, b});
  EXPECT_EQ(j["input_lens"], nlohmann::json({10, 7}));
  EXPECT_EQ(j["output_lens"], nlohmann::json({3, 0}));
  EXPECT_EQ(j["errors"], nlohmann::json({"", "status 14: unavailable"}));
  EXPECT_EQ(j["ttfts"], nlohmann::json({0.25, 0.0}));
  EXPECT_EQ(j["itls"], nlohmann::json::parse("[[0.5], []]"));
  EXPECT_EQ(j["arrival_times"], nlohmann::json({0.5, 1.0}));
  EXPECT_EQ(j["first_token_times"], nlohmann::json({0.75, -1.0}));
  EXPECT_EQ(j["token_times"], nlohmann::json::parse("[[0.75, 1.25, 1.25], []]"));
}

TEST(RequestFlops, MatchesAStraightLineCount) {
  const ModelShape m{/*hidden=*/64,  /*intermediate=*/172, /*layers=*/5, /*heads=*/8,
                     /*kv_heads=*/4, /*head_dim=*/8,       /*vocab=*/512};
  // Per layer: wq 64x64, wk 64x32, wv 64x32, wo 64x64, gate/up/down 3 x 64x172, norms 2x64.
  const double per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 172 + 2 * 64;
  EXPECT_DOUBLE_EQ(decoder_layer_params(m), 5 * per_layer);
  // Prompt 3, output 2: positions 0..3 run (the last generated token does not).
  double expected = 0;
  for (int p = 0; p < 4; ++p) {
    expected += 2 * 5 * per_layer + 4.0 * 5 * 8 * 8 * (p + 1);
  }
  expected += 2 * 2.0 * 512 * 64;  // two sampled positions
  EXPECT_DOUBLE_EQ(request_flops(m, 3, 2), expected);
}

// Mean and squared coefficient of variation of the gaps.
std::pair<double, double> gap_moments(const std::vector<double>& times) {
  double sum = 0, sq = 0;
  const double n = static_cast<double>(times.size() - 1);
  for (size_t i = 1; i < times.size(); ++i) sum += times[i] - times[i - 1];
  const double mean = sum / n;
  for (size_t i = 1; i < times.size(); ++i) {
    const double d = times[i] - times[i - 1] - mean;
    sq += d * d;
  }
  return {mean, sq / n / (mean * mean)};
}

TEST(ArrivalTimes, InfiniteRateSendsEverythingAtOnce) {
  for (double t : arrival_times(10, INFINITY, 1.0, 0)) EXPECT_EQ(t, 0.0);
}

TEST(ArrivalTimes, PoissonGapsAreExponential) {
  const std::vector<double> t = arrival_times(40001, 10.0, 1.0, 3);
  EXPECT_EQ(t[0], 0.0);
  for (size_t i = 1; i < t.size(); ++i) ASSERT_GT(t[i], t[i - 1]);
  const auto [mean, cv2] = gap_moments(t);
  // Standard errors at n = 40000: mean 0.1 / 200 = 0.0005; CV^2 about 0.02.
  EXPECT_NEAR(mean, 0.1, 0.0025);
  EXPECT_NEAR(cv2, 1.0, 0.08);
  // P(gap <= median) = 1/2 with median ln 2 / rate.
  int below = 0;
  for (size_t i = 1; i < t.size(); ++i) below += (t[i] - t[i - 1]) <= std::log(2.0) / 10.0;
  EXPECT_NEAR(below / 40000.0, 0.5, 0.01);
}

TEST(ArrivalTimes, BurstinessIsTheGammaShape) {
  // Gamma(k): CV^2 = 1 / k, whatever the rate.
  for (double k : {0.25, 4.0}) {
    const auto [mean, cv2] = gap_moments(arrival_times(40001, 2.0, k, 11));
    EXPECT_NEAR(mean, 0.5, 0.5 * 0.03) << "burstiness " << k;
    EXPECT_NEAR(cv2, 1.0 / k, 0.1 / k) << "burstiness " << k;
  }
  EXPECT_EQ(arrival_times(100, 2.0, 0.5, 1), arrival_times(100, 2.0, 0.5, 1));
  EXPECT_NE(arrival_times(100, 2.0, 0.5, 1), arrival_times(100, 2.0, 0.5, 2));
}

}  // namespace
}  // namespace megaserve::bench
