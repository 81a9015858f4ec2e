// What the ShareGPT benchmark measures and how it summarizes it, with the peers'
// definitions: TTFT from sending a request to its first token; TPOT per request =
// (E2E latency - TTFT) / (output tokens - 1), for requests with more than one token; ITL =
// every gap between consecutive streamed messages; percentiles interpolate linearly between
// order statistics (numpy's default). Also the workload's compute floor (DESIGN.md §10).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "nlohmann/json.hpp"

namespace megaserve::bench {

struct RequestResult {
  bool success = false;
  std::string error;            // when !success
  int prompt_len = 0;           // client-side count (the request's prompt_len)
  int output_tokens = 0;        // token ids received on the stream
  int usage_prompt_tokens = 0;  // as the server reported in its last message
  int usage_completion_tokens = 0;
  double ttft = 0;          // seconds
  double latency = 0;       // seconds, send to last message
  std::vector<double> itl;  // seconds between consecutive messages after the first
  // Timeline, in seconds from the start of the run: when the request was sent, and when each
  // streamed token arrived (one entry per token id, so a message of k tokens gives k equal
  // entries; token_times.size() == output_tokens and token_times[0] = send_time + ttft).
  double send_time = 0;
  std::vector<double> token_times;
};

// The p-th percentile (p in [0, 100]) of `values`, linear between closest ranks; 0 for an
// empty input.
double percentile(std::vector<double> values, double p);

struct Distribution {
  double mean = 0;
  double median = 0;
  double p99 = 0;
  double std = 0;  // population standard deviation
};
Distribution distribution(const std::vector<double>& values);

struct BenchmarkSummary {
  int completed = 0;
  int failed = 0;
  double duration_s = 0;
  int64_t total_input_tokens = 0;   // of completed requests
  int64_t total_output_tokens = 0;  // streamed tokens of completed requests
  double request_throughput = 0;    // completed / duration
  double input_throughput = 0;      // tok/s
  double output_throughput = 0;     // tok/s
  double total_token_throughput = 0;
  Distribution ttft_ms, tpot_ms, itl_ms, e2e_ms;
};

BenchmarkSummary summarize(const std::vector<RequestResult>& results, double duration_s);

// The shape the FLOP count needs (megaserve.v1.ModelInfo carries it).
struct ModelShape {
  int64_t hidden = 0;
  int64_t intermediate = 0;
  int64_t layers = 0;
  int64_t heads = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
  int64_t vocab = 0;
};

// Parameters of the decoder layers (projections and norms, no embedding or LM head).
double decoder_layer_params(const ModelShape& shape);

// FLOPs to serve one request of prompt_len + output_len tokens: every token but the last
// generated one runs through the model (prompt_len + output_len - 1 positions); position p
// costs 2 x decoder_layer_params + 4 x layers x heads x head_dim x (p + 1) for attention;
// each of the output_len sampled positions adds 2 x vocab x hidden for the LM head.
double request_flops(const ModelShape& shape, int64_t prompt_len, int64_t output_len);

nlohmann::json to_json(const Distribution& d);
nlohmann::json to_json(const BenchmarkSummary& s);

// The per-request part of the result JSON: arrays with one entry per request, in the run's
// order (failed requests included, with their error): input_lens, output_lens, errors;
// ttfts and itls (seconds; itls a list per request); and the timeline, in seconds from the
// start of the run: arrival_times (sent), first_token_times (-1 without a token) and
// token_times (a list per request, one entry per token). scripts/bench-plot.py reads these.
nlohmann::json per_request_json(const std::vector<RequestResult>& results);

// The peers' result table, as printed on stdout.
std::string format_summary(const BenchmarkSummary& s);

}  // namespace megaserve::bench
