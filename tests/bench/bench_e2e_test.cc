// megaserve-bench (the real binary) against an in-process megaserve on the 50-conversation
// ShareGPT sample. The server runs a small Llama shape with dummy weights and the Llama-2
// tokenizer, so the token counts can be checked against the sample's own Llama-2 length
// table (sharegpt_sample_50conv.llama2_lens.csv), and against the server's usage and metrics.
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/config.h"
#include "server/model_setup.h"
#include "server/server.h"
#include "tests/server/grpc_test_util.h"
#include "tests/server/subprocess.h"
#include "tests/support/assets.h"

namespace megaserve::bench {
namespace {

constexpr char kDataset[] = "datasets/sharegpt/sharegpt_sample_50conv.json";
constexpr char kLengths[] = "datasets/sharegpt/sharegpt_sample_50conv.llama2_lens.csv";
constexpr char kTokenizer[] = "tokenizers/llama2/tokenizer.model";

// A 2-layer Llama shape with the Llama-2 vocabulary: cheap on the CPU interpreter.
constexpr char kConfigJson[] = R"({
  "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
  "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
  "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "hidden_act": "silu",
  "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2})";

TEST(BenchE2eTest, ShareGptSampleCompletesAndTokenCountsMatchTheServer) {
  MEGASERVE_REQUIRE_ASSET(kDataset);
  MEGASERVE_REQUIRE_ASSET(kLengths);
  MEGASERVE_REQUIRE_ASSET(kTokenizer);
  const std::filesystem::path dir =
      std::filesystem::path(::testing::TempDir()) / absl::StrCat("bench_e2e_", getpid());
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "config.json") << kConfigJson;

  config::ServerConfig config = server::default_server_config();
  config.mutable_model()->set_config_file((dir / "config.json").string());
  config.mutable_model()->set_load_format("dummy");
  config.mutable_model()->set_tokenizer_file(
      (megaserve::testing::assets_dir() / kTokenizer).string());
  config.mutable_endpoints()->set_grpc_address("127.0.0.1:0");
  config.mutable_endpoints()->set_metrics_address("127.0.0.1:0");
  config.mutable_engine()->set_backend("cpu");
  config.mutable_engine()->set_cpu_threads(1);
  config.mutable_engine()->set_num_kv_blocks(2048);
  auto model = server::setup_model(config);
  ASSERT_TRUE(model.ok()) << model.status();
  server::ServerOptions options;
  options.grpc_address = "127.0.0.1:0";
  options.metrics_address = "127.0.0.1:0";
  auto server = server::Server::start(options, *std::move(model));
  ASSERT_TRUE(server.ok()) << server.status();

  // Every prompt of the sample is longer than the standard 1024-token filter; the test
  // widens it to keep the run short (6 of the shortest conversations).
  const std::string result_file = (dir / "result.json").string();
  megaserve::testing::Subprocess bench(
      {MEGASERVE_BENCH_BINARY, absl::StrCat("--server=127.0.0.1:", (*server)->grpc_port()),
       absl::StrCat("--dataset=", (megaserve::testing::assets_dir() / kDataset).string()),
       "--num-prompts=6", "--max-prompt-len=1200", "--max-total-len=4096", "--request-rate=inf",
       "--progress=false", "--peak-tflops=100", absl::StrCat("--result-json=", result_file),
       absl::StrCat("--metrics-address=127.0.0.1:", (*server)->metrics_port()),
       "--metrics-interval-ms=20"},
      (dir / "bench.log").string());
  ASSERT_EQ(bench.wait(std::chrono::seconds(120)), 0) << bench.log();
  const std::string log = bench.log();
  EXPECT_NE(log.find("Successful requests:"), std::string::npos) << log;
  EXPECT_NE(log.find("Compute floor (s):"), std::string::npos) << log;

  nlohmann::json result = nlohmann::json::parse(megaserve::testing::read_file(result_file));
  const nlohmann::json& summary = result["summary"];
  EXPECT_EQ(summary["failed"].get<int>(), 0);
  EXPECT_EQ(summary["completed"].get<int>(), 6);
  EXPECT_GT(result["compute_floor"]["floor_s"].get<double>(), 0);

  // Token counts: the bench's own (streamed ids, prompts through Tokenize) equal the
  // server's usage...
  const int64_t input = summary["total_input_tokens"].get<int64_t>();
  const int64_t output = summary["total_output_tokens"].get<int64_t>();
  EXPECT_EQ(result["usage_prompt_tokens"].get<int64_t>(), input);
  EXPECT_EQ(result["usage_completion_tokens"].get<int64_t>(), output);
  // ...each (prompt, output) length pair is a row of the sample's Llama-2 length table...
  std::set<std::pair<int, int>> table;
  for (absl::string_view line :
       absl::StrSplit(megaserve::testing::read_file(megaserve::testing::assets_dir() / kLengths),
                      '\n', absl::SkipEmpty())) {
    std::vector<std::string> cells = absl::StrSplit(line, ',');
    int prompt = 0, completion = 0;
    if (cells.size() == 3 && absl::SimpleAtoi(cells[1], &prompt) &&
        absl::SimpleAtoi(cells[2], &completion)) {
      table.insert({prompt, completion});
    }
  }
  const auto& input_lens = result["input_lens"];
  const auto& output_lens = result["output_lens"];
  ASSERT_EQ(input_lens.size(), 6u);
  int64_t sum_in = 0, sum_out = 0;
  for (size_t i = 0; i < input_lens.size(); ++i) {
    const std::pair<int, int> row{input_lens[i].get<int>(), output_lens[i].get<int>()};
    EXPECT_TRUE(table.count(row)) << row.first << "," << row.second << " not in " << kLengths;
    EXPECT_LE(row.first, 1200);
    sum_in += row.first;
    sum_out += row.second;
  }
  EXPECT_EQ(sum_in, input);
  EXPECT_EQ(sum_out, output);
  // ...and the server's counters: the timed run plus the warm-up (the first request again).
  const auto metrics = megaserve::testing::scrape_metrics((*server)->metrics_port());
  EXPECT_EQ(metrics.at("megaserve_requests_total{status=\"OK\"}"), 7);
  EXPECT_EQ(metrics.at("megaserve_prompt_tokens_total"), input + input_lens[0].get<int>());
  EXPECT_EQ(metrics.at("megaserve_generation_tokens_total"), output + output_lens[0].get<int>());
  // The per-request timeline (seconds from the run's start) that scripts/bench-plot.py draws:
  // sent, then one time per token, ordered, the first at sent + TTFT, all within the run.
  const double duration = summary["duration_s"].get<double>();
  const auto& arrivals = result["arrival_times"];
  const auto& first_tokens = result["first_token_times"];
  const auto& token_times = result["token_times"];
  ASSERT_EQ(arrivals.size(), 6u);
  ASSERT_EQ(first_tokens.size(), 6u);
  ASSERT_EQ(token_times.size(), 6u);
  ASSERT_EQ(result["itls"].size(), 6u);
  for (size_t i = 0; i < 6; ++i) {
    const double sent = arrivals[i].get<double>();
    EXPECT_GE(sent, 0);
    EXPECT_NEAR(first_tokens[i].get<double>(), sent + result["ttfts"][i].get<double>(), 1e-6);
    ASSERT_EQ(token_times[i].size(), output_lens[i].get<size_t>()) << "request " << i;
    EXPECT_DOUBLE_EQ(token_times[i].front().get<double>(), first_tokens[i].get<double>());
    for (size_t t = 1; t < token_times[i].size(); ++t) {
      EXPECT_LE(token_times[i][t - 1].get<double>(), token_times[i][t].get<double>());
    }
    EXPECT_LE(token_times[i].back().get<double>(), duration + 1e-6);
  }
  // The server's running/waiting gauges, scraped every 20 ms through the run: ordered
  // samples, and the six requests seen in the server at some point.
  const auto& samples = result["metrics_samples"];
  ASSERT_GE(samples.size(), 2u) << result.dump();
  double most_in_server = 0;
  for (size_t i = 0; i < samples.size(); ++i) {
    EXPECT_GE(samples[i]["running"].get<double>(), 0);
    EXPECT_GE(samples[i]["waiting"].get<double>(), 0);
    EXPECT_LE(samples[i]["running"].get<double>() + samples[i]["waiting"].get<double>(), 6);
    most_in_server = std::max(
        most_in_server, samples[i]["running"].get<double>() + samples[i]["waiting"].get<double>());
    if (i > 0) {
      EXPECT_GT(samples[i]["time"].get<double>(), samples[i - 1]["time"].get<double>());
    }
  }
  EXPECT_GE(most_in_server, 1);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace megaserve::bench
