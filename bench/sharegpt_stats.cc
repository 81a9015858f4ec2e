#include "bench/sharegpt_stats.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace megaserve::bench {

double percentile(std::vector<double> values, double p) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const double rank = p / 100.0 * static_cast<double>(values.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(rank));
  const size_t hi = std::min(lo + 1, values.size() - 1);
  const double frac = rank - static_cast<double>(lo);
  return values[lo] + (values[hi] - values[lo]) * frac;
}

Distribution distribution(const std::vector<double>& values) {
  Distribution d;
  if (values.empty()) return d;
  double sum = 0;
  for (double v : values) sum += v;
  d.mean = sum / static_cast<double>(values.size());
  double sq = 0;
  for (double v : values) sq += (v - d.mean) * (v - d.mean);
  d.std = std::sqrt(sq / static_cast<double>(values.size()));
  d.median = percentile(values, 50);
  d.p99 = percentile(values, 99);
  return d;
}

BenchmarkSummary summarize(const std::vector<RequestResult>& results, double duration_s) {
  BenchmarkSummary s;
  s.duration_s = duration_s;
  std::vector<double> ttft, tpot, itl, e2e;
  for (const RequestResult& r : results) {
    if (!r.success) {
      ++s.failed;
      continue;
    }
    ++s.completed;
    s.total_input_tokens += r.prompt_len;
    s.total_output_tokens += r.output_tokens;
    ttft.push_back(r.ttft * 1e3);
    e2e.push_back(r.latency * 1e3);
    if (r.output_tokens > 1) tpot.push_back((r.latency - r.ttft) / (r.output_tokens - 1) * 1e3);
    for (double gap : r.itl) itl.push_back(gap * 1e3);
  }
  if (duration_s > 0) {
    s.request_throughput = s.completed / duration_s;
    s.input_throughput = s.total_input_tokens / duration_s;
    s.output_throughput = s.total_output_tokens / duration_s;
    s.total_token_throughput = (s.total_input_tokens + s.total_output_tokens) / duration_s;
  }
  s.ttft_ms = distribution(ttft);
  s.tpot_ms = distribution(tpot);
  s.itl_ms = distribution(itl);
  s.e2e_ms = distribution(e2e);
  return s;
}

double decoder_layer_params(const ModelShape& m) {
  const double q = static_cast<double>(m.heads * m.head_dim);
  const double kv = static_cast<double>(m.kv_heads * m.head_dim);
  const double h = static_cast<double>(m.hidden);
  const double per_layer = h * q + 2 * h * kv + q * h                     // q, k, v, o
                           + 3 * h * static_cast<double>(m.intermediate)  // gate, up, down
                           + 2 * h;                                       // two norms
  return per_layer * static_cast<double>(m.layers);
}

double request_flops(const ModelShape& m, int64_t prompt_len, int64_t output_len) {
  const int64_t positions = prompt_len + std::max<int64_t>(output_len, 1) - 1;
  const double n = static_cast<double>(positions);
  // sum over p in [0, n) of (p + 1) = n (n + 1) / 2
  const double attention =
      4.0 * static_cast<double>(m.layers * m.heads * m.head_dim) * n * (n + 1) / 2;
  const double lm_head =
      2.0 * static_cast<double>(m.vocab * m.hidden) * static_cast<double>(output_len);
  return 2.0 * decoder_layer_params(m) * n + attention + lm_head;
}

nlohmann::json to_json(const Distribution& d) {
  return {{"mean", d.mean}, {"median", d.median}, {"p99", d.p99}, {"std", d.std}};
}

nlohmann::json to_json(const BenchmarkSummary& s) {
  return {{"completed", s.completed},
          {"failed", s.failed},
          {"duration_s", s.duration_s},
          {"total_input_tokens", s.total_input_tokens},
          {"total_output_tokens", s.total_output_tokens},
          {"request_throughput", s.request_throughput},
          {"input_throughput", s.input_throughput},
          {"output_throughput", s.output_throughput},
          {"total_token_throughput", s.total_token_throughput},
          {"ttft_ms", to_json(s.ttft_ms)},
          {"tpot_ms", to_json(s.tpot_ms)},
          {"itl_ms", to_json(s.itl_ms)},
          {"e2e_latency_ms", to_json(s.e2e_ms)}};
}

nlohmann::json per_request_json(const std::vector<RequestResult>& results) {
  nlohmann::json input_lens = nlohmann::json::array(), output_lens = nlohmann::json::array(),
                 errors = nlohmann::json::array(), ttfts = nlohmann::json::array(),
                 itls = nlohmann::json::array(), arrival_times = nlohmann::json::array(),
                 first_token_times = nlohmann::json::array(), token_times = nlohmann::json::array();
  for (const RequestResult& r : results) {
    input_lens.push_back(r.prompt_len);
    output_lens.push_back(r.output_tokens);
    errors.push_back(r.error);
    ttfts.push_back(r.ttft);
    itls.push_back(r.itl);
    arrival_times.push_back(r.send_time);
    first_token_times.push_back(r.token_times.empty() ? -1.0 : r.token_times.front());
    token_times.push_back(r.token_times);
  }
  return {{"input_lens", input_lens},
          {"output_lens", output_lens},
          {"errors", errors},
          {"ttfts", ttfts},
          {"itls", itls},
          {"arrival_times", arrival_times},
          {"first_token_times", first_token_times},
          {"token_times", token_times}};
}

namespace {

void line(std::string* out, const std::string& label, double value, int decimals = 2) {
  absl::StrAppend(out, absl::StrFormat("%-42s%12.*f\n", label, decimals, value));
}

void section(std::string* out, const std::string& title) {
  const int width = 54;
  const int pad = std::max(0, width - static_cast<int>(title.size()) - 2);
  absl::StrAppend(out, std::string(pad / 2, '-'), " ", title, " ", std::string(pad - pad / 2, '-'),
                  "\n");
}

void distribution_lines(std::string* out, const std::string& name, const Distribution& d) {
  line(out, absl::StrCat("Mean ", name, " (ms):"), d.mean);
  line(out, absl::StrCat("Median ", name, " (ms):"), d.median);
  line(out, absl::StrCat("P99 ", name, " (ms):"), d.p99);
}

}  // namespace

std::string format_summary(const BenchmarkSummary& s) {
  std::string out;
  section(&out, "Serving Benchmark Result");
  line(&out, "Successful requests:", s.completed, 0);
  line(&out, "Failed requests:", s.failed, 0);
  line(&out, "Benchmark duration (s):", s.duration_s);
  line(&out, "Total input tokens:", static_cast<double>(s.total_input_tokens), 0);
  line(&out, "Total generated tokens:", static_cast<double>(s.total_output_tokens), 0);
  line(&out, "Request throughput (req/s):", s.request_throughput);
  line(&out, "Input token throughput (tok/s):", s.input_throughput);
  line(&out, "Output token throughput (tok/s):", s.output_throughput);
  line(&out, "Total token throughput (tok/s):", s.total_token_throughput);
  section(&out, "Time to First Token");
  distribution_lines(&out, "TTFT", s.ttft_ms);
  section(&out, "Time per Output Token (excl. 1st token)");
  distribution_lines(&out, "TPOT", s.tpot_ms);
  section(&out, "Inter-token Latency");
  distribution_lines(&out, "ITL", s.itl_ms);
  section(&out, "End-to-end Latency");
  distribution_lines(&out, "E2E", s.e2e_ms);
  absl::StrAppend(&out, std::string(54, '='), "\n");
  return out;
}

}  // namespace megaserve::bench
