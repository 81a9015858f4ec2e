// The whole server over real loopback gRPC with the real engine on the CPU interpreter,
// serving stories260K-hf: its greedy output must be llama2.c's oracle text, concurrent
// streams must equal their solo runs, and cancellation, deadlines, a full queue and bad
// input must behave as the API promises.
#include <chrono>
#include <fstream>
#include <future>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"
#include "server/config.h"
#include "server/model_setup.h"
#include "server/server.h"
#include "tests/server/grpc_test_util.h"
#include "tests/support/assets.h"

namespace megaserve::server {
namespace {

using megaserve::testing::StreamResult;

constexpr char kModel[] = "models/stories260K-hf/config.json";

std::unique_ptr<Server> start_server(const std::function<void(config::ServerConfig*)>& edit) {
  config::ServerConfig config = default_server_config();
  config.mutable_model()->set_path((megaserve::testing::assets_dir() / "models/stories260K-hf"));
  config.mutable_endpoints()->set_grpc_address("127.0.0.1:0");
  config.mutable_endpoints()->set_metrics_address("127.0.0.1:0");
  config.mutable_engine()->set_backend("cpu");
  config.mutable_engine()->set_cpu_threads(1);
  config.mutable_engine()->set_num_kv_blocks(512);
  if (edit) edit(&config);
  EXPECT_TRUE(validate_server_config(config).ok());
  auto model = setup_model(config);
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return nullptr;
  ServerOptions options;
  options.grpc_address = config.endpoints().grpc_address();
  options.metrics_address = config.endpoints().metrics_address();
  auto server = Server::start(options, *std::move(model));
  EXPECT_TRUE(server.ok()) << server.status();
  return server.ok() ? *std::move(server) : nullptr;
}

v1::GenerateRequest greedy(const std::string& text, int max_tokens) {
  v1::GenerateRequest request;
  request.set_text(text);
  request.mutable_params()->set_temperature(0.0f);
  request.mutable_params()->set_max_tokens(max_tokens);
  return request;
}

class ServerE2eTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!std::filesystem::exists(megaserve::testing::assets_dir() / kModel)) return;
    server_ = start_server(nullptr).release();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  void SetUp() override {
    MEGASERVE_REQUIRE_ASSET(kModel);
    ASSERT_NE(server_, nullptr);
    stub_ = megaserve::testing::connect(server_->grpc_port());
  }
  // Waits (up to 10 s) until no request runs or waits and no KV block is in use.
  static void expect_kv_freed() {
    for (int i = 0; i < 10000; ++i) {
      const engine::EngineStats s = server_->engine().stats();
      if (s.waiting == 0 && s.running == 0 && s.kv_blocks_used == 0) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    const engine::EngineStats s = server_->engine().stats();
    ADD_FAILURE() << s.running << " running, " << s.waiting << " waiting, " << s.kv_blocks_used
                  << " KV blocks still in use";
  }

  static Server* server_;
  std::unique_ptr<v1::Megaserve::Stub> stub_;
};
Server* ServerE2eTest::server_ = nullptr;

TEST_F(ServerE2eTest, GreedyOnceUponATimeStreamsTheOracleText) {
  // The oracle holds the prompt and 60 generated tokens, decoded, plus a newline the
  // reference printed (assets README).
  std::string oracle = megaserve::testing::read_file(
      megaserve::testing::assets_dir() / "models/stories260K/oracle/onceupon_t0_n64.txt");
  ASSERT_EQ(oracle.back(), '\n');
  oracle.pop_back();
  const std::string prompt = "Once upon a time";
  ASSERT_EQ(oracle.rfind(prompt, 0), 0u);
  const StreamResult r = megaserve::testing::generate(*stub_, greedy(prompt, 60));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.text, oracle.substr(prompt.size()));
  EXPECT_EQ(r.token_ids.size(), 60u);
  EXPECT_EQ(r.last.finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(r.last.usage().prompt_tokens(), 5);  // BOS 403 407 261 378
  EXPECT_EQ(r.last.usage().completion_tokens(), 60);
  EXPECT_GT(r.messages.size(), 1u);
}

TEST_F(ServerE2eTest, GreedyFromBosGivesTheOracleIds) {
  std::vector<int32_t> oracle;
  std::istringstream ids(megaserve::testing::read_file(
      megaserve::testing::assets_dir() / "models/stories260K/oracle/bos_t0_n200_ids.txt"));
  for (int32_t id; ids >> id;) oracle.push_back(id);
  ASSERT_EQ(oracle.size(), 200u);
  v1::GenerateRequest request;
  request.mutable_token_ids()->add_ids(1);
  request.mutable_params()->set_temperature(0.0f);
  request.mutable_params()->set_max_tokens(200);
  request.mutable_params()->set_ignore_eos(true);
  const StreamResult r = megaserve::testing::generate(*stub_, request);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.token_ids, oracle);
}

TEST_F(ServerE2eTest, ModelInfoDescribesStories260K) {
  grpc::ClientContext context;
  v1::ModelInfo info;
  ASSERT_TRUE(stub_->GetModelInfo(&context, v1::GetModelInfoRequest(), &info).ok());
  // The assets README: dim 64, hidden 172, 5 layers, 8 heads, 4 KV heads, vocab 512,
  // max sequence 512; EOS 2, BOS 1.
  EXPECT_EQ(info.name(), "stories260K-hf");
  EXPECT_EQ(info.architecture(), "LlamaForCausalLM");
  EXPECT_EQ(info.hidden_size(), 64);
  EXPECT_EQ(info.intermediate_size(), 172);
  EXPECT_EQ(info.num_layers(), 5);
  EXPECT_EQ(info.num_heads(), 8);
  EXPECT_EQ(info.num_kv_heads(), 4);
  EXPECT_EQ(info.head_dim(), 8);
  EXPECT_EQ(info.vocab_size(), 512);
  EXPECT_EQ(info.max_model_len(), 512);
  EXPECT_EQ(info.bos_token_id(), 1);
  ASSERT_EQ(info.eos_token_ids_size(), 1);
  EXPECT_EQ(info.eos_token_ids(0), 2);
  EXPECT_EQ(info.tensor_parallel_size(), 1);
  EXPECT_EQ(info.kv_block_size(), 16);
  EXPECT_EQ(info.num_kv_blocks(), 512);
  EXPECT_EQ(info.backend().rfind("cpu", 0), 0u) << info.backend();
}

TEST_F(ServerE2eTest, GreedyLogprobsRankTheChosenTokenFirst) {
  v1::GenerateRequest request = greedy("Once upon a time", 12);
  request.mutable_params()->set_logprobs(3);
  const StreamResult r = megaserve::testing::generate(*stub_, request);
  ASSERT_TRUE(r.status.ok());
  int n = 0;
  for (const v1::GenerateResponse& m : r.messages) {
    ASSERT_EQ(m.logprobs_size(), m.token_ids_size());
    for (const v1::TokenLogprob& lp : m.logprobs()) {
      ++n;
      ASSERT_EQ(lp.top_size(), 3);
      // Greedy takes the argmax of the raw logits, so it is the best alternative.
      EXPECT_EQ(lp.top(0).token_id(), lp.token_id());
      EXPECT_FLOAT_EQ(lp.top(0).logprob(), lp.logprob());
      EXPECT_LE(lp.logprob(), 0.0f);
      EXPECT_GE(lp.top(0).logprob(), lp.top(1).logprob());
      EXPECT_GE(lp.top(1).logprob(), lp.top(2).logprob());
    }
  }
  EXPECT_EQ(n, 12);
}

TEST_F(ServerE2eTest, ThirtyTwoConcurrentStreamsEachEqualTheirSoloOutput) {
  constexpr int kStreams = 32;
  std::vector<v1::GenerateRequest> requests;
  const char* openings[] = {"Once upon a time", "Lily", "The cat",          "One day",
                            "Tom and Sue",      "Zoo",  "The big red ball", "Mom said"};
  for (int i = 0; i < kStreams; ++i) {
    v1::GenerateRequest request = greedy(openings[i % 8], 24 + i);
    if (i % 2 == 1) {  // seeded sampling: the same draws whatever else runs
      request.mutable_params()->set_temperature(0.9f);
      request.mutable_params()->set_top_k(40);
      request.mutable_params()->set_seed(1000 + i);
    }
    requests.push_back(request);
  }
  std::vector<StreamResult> solo;
  for (const v1::GenerateRequest& request : requests) {
    solo.push_back(megaserve::testing::generate(*stub_, request));
    ASSERT_TRUE(solo.back().status.ok());
  }
  std::vector<std::future<StreamResult>> futures;
  for (int i = 0; i < kStreams; ++i) {
    futures.push_back(std::async(std::launch::async, [&, i] {
      auto stub = megaserve::testing::connect(server_->grpc_port());
      return megaserve::testing::generate(*stub, requests[i]);
    }));
  }
  for (int i = 0; i < kStreams; ++i) {
    const StreamResult r = futures[i].get();
    ASSERT_TRUE(r.status.ok()) << i << ": " << r.status.error_message();
    EXPECT_EQ(r.token_ids, solo[i].token_ids) << "stream " << i;
    EXPECT_EQ(r.text, solo[i].text) << "stream " << i;
    EXPECT_EQ(r.last.finish_reason(), solo[i].last.finish_reason()) << "stream " << i;
  }
  expect_kv_freed();
}

TEST_F(ServerE2eTest, CancelledStreamFreesItsBlocks) {
  grpc::ClientContext context;
  v1::GenerateRequest request = greedy("Once upon a time", 400);
  request.mutable_params()->set_ignore_eos(true);
  auto reader = stub_->Generate(&context, request);
  v1::GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response));
  EXPECT_GT(server_->engine().stats().kv_blocks_used, 0);
  context.TryCancel();
  while (reader->Read(&response)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  expect_kv_freed();
}

TEST_F(ServerE2eTest, ExpiredDeadlineFreesItsBlocks) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(30));
  v1::GenerateRequest request = greedy("Once upon a time", 450);
  request.mutable_params()->set_ignore_eos(true);
  const StreamResult r = megaserve::testing::generate(*stub_, request, &context);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_LT(r.token_ids.size(), 450u);
  expect_kv_freed();
}

TEST_F(ServerE2eTest, BadInputIsRejectedPreciselyAndTheServerKeepsServing) {
  v1::GenerateRequest too_long;
  for (int i = 0; i < 600; ++i) too_long.mutable_token_ids()->add_ids(400);
  StreamResult r = megaserve::testing::generate(*stub_, too_long);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(r.status.error_message().find("600"), std::string::npos) << r.status.error_message();
  EXPECT_NE(r.status.error_message().find("512"), std::string::npos) << r.status.error_message();

  v1::GenerateRequest bad_id = greedy("x", 4);
  bad_id.mutable_token_ids()->add_ids(512);
  r = megaserve::testing::generate(*stub_, bad_id);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(r.status.error_message().find("token_ids[0] = 512"), std::string::npos);

  v1::GenerateRequest bad_temperature = greedy("x", 4);
  bad_temperature.mutable_params()->set_temperature(-1);
  r = megaserve::testing::generate(*stub_, bad_temperature);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(r.status.error_message().find("temperature"), std::string::npos);

  r = megaserve::testing::generate(*stub_, greedy("Once upon a time", 8));
  EXPECT_TRUE(r.status.ok());
  EXPECT_EQ(r.token_ids.size(), 8u);
}

TEST_F(ServerE2eTest, StopStringOnRealOutput) {
  const StreamResult full = megaserve::testing::generate(*stub_, greedy("Once upon a time", 60));
  ASSERT_TRUE(full.status.ok());
  v1::GenerateRequest request = greedy("Once upon a time", 60);
  request.mutable_params()->add_stop("Lily");
  const StreamResult r = megaserve::testing::generate(*stub_, request);
  ASSERT_TRUE(r.status.ok());
  EXPECT_EQ(r.text, full.text.substr(0, full.text.find("Lily")));
  EXPECT_EQ(r.last.finish_reason(), v1::FINISH_REASON_STOP);
  EXPECT_LT(r.last.usage().completion_tokens(), 60);
  expect_kv_freed();
}

TEST_F(ServerE2eTest, MetricsMatchTheRequests) {
  const auto before = megaserve::testing::scrape_metrics(server_->metrics_port());
  const auto get = [](const std::map<std::string, double>& m, const std::string& key) {
    auto it = m.find(key);
    return it == m.end() ? 0.0 : it->second;
  };
  int tokens = 0, prompt_tokens = 0;
  for (int n : {5, 9, 13}) {
    const StreamResult r = megaserve::testing::generate(*stub_, greedy("The cat", n));
    ASSERT_TRUE(r.status.ok());
    tokens += r.last.usage().completion_tokens();
    prompt_tokens += r.last.usage().prompt_tokens();
  }
  std::map<std::string, double> after;
  for (int i = 0; i < 2000; ++i) {
    after = megaserve::testing::scrape_metrics(server_->metrics_port());
    if (get(after, "megaserve_requests_total{status=\"OK\"}") ==
        get(before, "megaserve_requests_total{status=\"OK\"}") + 3) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  const auto delta = [&](const std::string& key) { return get(after, key) - get(before, key); };
  EXPECT_EQ(delta("megaserve_requests_total{status=\"OK\"}"), 3);
  EXPECT_EQ(delta("megaserve_generation_tokens_total"), tokens);
  EXPECT_EQ(delta("megaserve_prompt_tokens_total"), prompt_tokens);
  EXPECT_EQ(delta("megaserve_time_to_first_token_seconds_count"), 3);
  EXPECT_EQ(delta("megaserve_e2e_request_latency_seconds_count"), 3);
  EXPECT_GT(delta("megaserve_engine_steps_total"), 0);
  EXPECT_EQ(get(after, "megaserve_kv_blocks_total"), 512);
  EXPECT_GT(get(after, "megaserve_prefix_cache_queries_total"), 0);
}

// Issue 18: a max_model_len past the model's positions was accepted (and reported by
// GetModelInfo); up to 2^31 - 1 it let single requests ask for more KV than exists.
TEST(ServerE2eConfigTest, MaxModelLenBeyondTheModelIsRefused) {
  MEGASERVE_REQUIRE_ASSET(kModel);
  for (uint32_t len : {513u, 2147483647u}) {
    config::ServerConfig config = default_server_config();
    config.mutable_model()->set_path(megaserve::testing::assets_dir() / "models/stories260K-hf");
    config.mutable_engine()->set_backend("cpu");
    config.mutable_engine()->set_max_model_len(len);
    ASSERT_TRUE(validate_server_config(config).ok());
    const auto model = setup_model(config);
    ASSERT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument) << len;
    EXPECT_NE(model.status().message().find(absl::StrCat("engine.max_model_len ", len,
                                                         " exceeds the model's "
                                                         "max_position_embeddings 512")),
              std::string::npos)
        << model.status().message();
  }
}

// --trace_steps/--trace_dir: the server captures its first steps that run as Chrome traces,
// one lane per virtual SM, and draws each as a PNG (scripts/trace-plot.py from the source
// tree, python3 with matplotlib from scripts/install-deps); the tokens are the oracle's.
TEST(ServerE2eTraceTest, CapturesTheFirstStepsAsTracesAndPngs) {
  MEGASERVE_REQUIRE_ASSET(kModel);
  const auto dir = std::filesystem::path(::testing::TempDir()) / "server_e2e_trace";
  std::filesystem::remove_all(dir);
  auto server = start_server([&](config::ServerConfig* c) {
    c->mutable_engine()->set_cpu_threads(2);
    c->mutable_engine()->set_trace_steps(2);
    c->mutable_engine()->set_trace_dir(dir.string());
  });
  ASSERT_NE(server, nullptr);
  auto stub = megaserve::testing::connect(server->grpc_port());
  const std::string prompt = "Once upon a time";
  const StreamResult r = megaserve::testing::generate(*stub, greedy(prompt, 8));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  const std::string oracle = megaserve::testing::read_file(
      megaserve::testing::assets_dir() / "models/stories260K/oracle/onceupon_t0_n64.txt");
  EXPECT_EQ(oracle.substr(prompt.size(), r.text.size()), r.text);

  const auto count = [&](const std::string& suffix) {
    int n = 0;
    for (const auto& e : std::filesystem::directory_iterator(dir)) {
      n += absl::EndsWith(e.path().filename().string(), suffix) ? 1 : 0;
    }
    return n;
  };
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (count(".trace.png") < 2 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_EQ(count(".trace.json"), 2);
  EXPECT_EQ(count(".trace.png"), 2) << megaserve::testing::read_file(dir / "trace-plot.log");
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    if (!absl::EndsWith(e.path().filename().string(), ".trace.json")) continue;
    const std::string trace = megaserve::testing::read_file(e.path());
    EXPECT_NE(trace.find("\"backend\":\"cpu interpreter"), std::string::npos) << e.path();
    EXPECT_NE(trace.find("\"args\":{\"name\":\"SM 1\"}"), std::string::npos) << e.path();
  }
}

TEST(ServerE2eQueueTest, FullQueueGetsResourceExhausted) {
  MEGASERVE_REQUIRE_ASSET(kModel);
  auto server = start_server([](config::ServerConfig* c) {
    c->mutable_engine()->set_max_num_seqs(1);
    c->mutable_engine()->set_max_waiting_requests(2);
  });
  ASSERT_NE(server, nullptr);
  // One long request runs, two wait: the queue is full, the next is turned away.
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::future<StreamResult>> held;
  for (int i = 0; i < 3; ++i) {
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    grpc::ClientContext* context = contexts.back().get();
    held.push_back(std::async(std::launch::async, [&, context] {
      auto stub = megaserve::testing::connect(server->grpc_port());
      v1::GenerateRequest request = greedy("Once upon a time", 480);
      request.mutable_params()->set_ignore_eos(true);
      return megaserve::testing::generate(*stub, request, context);
    }));
    // Admission order: wait until this one is in before sending the next.
    for (int t = 0; t < 5000; ++t) {
      const engine::EngineStats s = server->engine().stats();
      if (s.running + s.waiting == i + 1) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
  auto stub = megaserve::testing::connect(server->grpc_port());
  const StreamResult rejected = megaserve::testing::generate(*stub, greedy("Tom", 4));
  EXPECT_EQ(rejected.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << rejected.status.error_message();
  for (auto& context : contexts) context->TryCancel();
  for (auto& f : held) f.get();
  for (int t = 0; t < 5000 && server->engine().stats().kv_blocks_used > 0; ++t) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ(server->engine().stats().kv_blocks_used, 0);
  // Accepting again.
  EXPECT_TRUE(megaserve::testing::generate(*stub, greedy("Tom", 4)).status.ok());
}

}  // namespace
}  // namespace megaserve::server
