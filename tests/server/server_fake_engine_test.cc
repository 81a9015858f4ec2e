// The server's gRPC mechanics over real loopback gRPC, with a fake engine whose output is
// known (tests/server/fake_engine.h) and stories260K's real tokenizer: streaming,
// validation, queue limits, cancellation and deadlines, drain, health, reflection, metrics.
#include <chrono>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "engine/model/tokenizer.h"
#include "gtest/gtest.h"
#include "server/server.h"
#include "tests/server/fake_engine.h"
#include "tests/server/grpc_test_util.h"
#include "tests/support/assets.h"

namespace megaserve::server {
namespace {

using megaserve::testing::FakeEngine;
using megaserve::testing::FakeEngineOptions;
using megaserve::testing::StreamResult;

constexpr char kTokenizer[] = "models/stories260K/tok512.model";

class ServerFakeEngineTest : public ::testing::Test {
 protected:
  void SetUp() override { MEGASERVE_REQUIRE_ASSET(kTokenizer); }

  void start(FakeEngineOptions options = {}, int max_model_len = 256) {
    auto tokenizer = engine::Tokenizer::load(megaserve::testing::assets_dir() / kTokenizer);
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    tokenizer_ = tokenizer->get();
    auto engine = std::make_unique<FakeEngine>(options);
    engine_ = engine.get();
    ServedModel model = megaserve::testing::fake_served_model(std::move(engine),
                                                              *std::move(tokenizer), max_model_len);
    ServerOptions server_options;
    server_options.grpc_address = "127.0.0.1:0";
    server_options.metrics_address = "127.0.0.1:0";
    auto server = Server::start(server_options, std::move(model));
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    ASSERT_GT(server_->grpc_port(), 0);
    stub_ = megaserve::testing::connect(server_->grpc_port());
  }

  v1::GenerateRequest text_request(const std::string& text, int max_tokens) {
    v1::GenerateRequest request;
    request.set_text(text);
    request.mutable_params()->set_max_tokens(max_tokens);
    request.mutable_params()->set_temperature(0.0f);
    return request;
  }

  // What the fake generates for a text prompt: the prompt without BOS, cyclically.
  std::vector<int32_t> expected_ids(const std::string& text, int n) {
    const std::vector<int32_t> script = tokenizer_->encode(text, false);
    std::vector<int32_t> ids;
    for (int i = 0; i < n; ++i) ids.push_back(script[i % script.size()]);
    return ids;
  }

  // The text `ids` add after `prompt` (with BOS), as the server streams it (DESIGN.md §9):
  // the first generated piece keeps its leading space, unlike decode(ids) alone.
  std::string completion_text(const std::string& prompt, const std::vector<int32_t>& ids) {
    std::vector<int32_t> all = tokenizer_->encode(prompt, true);
    const std::string prompt_text = *tokenizer_->decode(all);
    all.insert(all.end(), ids.begin(), ids.end());
    return tokenizer_->decode(all)->substr(prompt_text.size());
  }

  // Waits (up to 5 s) until the engine has no request and no KV block in use.
  void expect_engine_idle() {
    for (int i = 0; i < 5000; ++i) {
      const engine::EngineStats s = engine_->stats();
      if (s.waiting == 0 && s.running == 0 && s.kv_blocks_used == 0) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    const engine::EngineStats s = engine_->stats();
    ADD_FAILURE() << "engine not idle: " << s.waiting << " waiting, " << s.running << " running, "
                  << s.kv_blocks_used << " KV blocks used";
  }

  const engine::Tokenizer* tokenizer_ = nullptr;
  FakeEngine* engine_ = nullptr;
  std::unique_ptr<Server> server_;
  std::unique_ptr<v1::Megaserve::Stub> stub_;
};

TEST_F(ServerFakeEngineTest, StreamsTokensTextUsageAndTimings) {
  start();
  const std::string prompt = "Once upon a time";
  v1::GenerateRequest request = text_request(prompt, 10);
  request.set_request_id("req-1");
  const StreamResult r = megaserve::testing::generate(*stub_, request);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  const std::vector<int32_t> expected = expected_ids(prompt, 10);
  EXPECT_EQ(r.token_ids, expected);
  EXPECT_EQ(r.text, completion_text(prompt, expected));
  EXPECT_EQ(r.text[0], ' ');  // "▁Once" after "time"
  EXPECT_EQ(r.last.finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(r.last.usage().prompt_tokens(), 5);  // BOS + 4
  EXPECT_EQ(r.last.usage().completion_tokens(), 10);
  EXPECT_GT(r.messages.size(), 1u);  // streamed, not one lump
  for (const v1::GenerateResponse& m : r.messages) EXPECT_EQ(m.request_id(), "req-1");
  const v1::Timings& t = r.last.timings();
  EXPECT_GE(t.queue_seconds(), 0);
  EXPECT_GE(t.first_token_seconds(), t.queue_seconds());
  EXPECT_GE(t.total_seconds(), t.first_token_seconds());
  EXPECT_LT(t.total_seconds(), 10);
  expect_engine_idle();
}

TEST_F(ServerFakeEngineTest, TokenIdInputAndLogprobs) {
  start();
  v1::GenerateRequest request;
  for (int32_t id : {1, 403, 407}) request.mutable_token_ids()->add_ids(id);
  request.mutable_params()->set_max_tokens(4);
  request.mutable_params()->set_logprobs(3);
  const StreamResult r = megaserve::testing::generate(*stub_, request);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.token_ids, (std::vector<int32_t>{403, 407, 403, 407}));
  int n = 0;
  for (const v1::GenerateResponse& m : r.messages) {
    ASSERT_EQ(m.logprobs_size(), m.token_ids_size());
    for (int i = 0; i < m.logprobs_size(); ++i, ++n) {
      const v1::TokenLogprob& lp = m.logprobs(i);
      EXPECT_EQ(lp.token_id(), m.token_ids(i));
      EXPECT_FLOAT_EQ(lp.logprob(), -0.5f * (n % 4));  // what the fake reports
      ASSERT_EQ(lp.top_size(), 3);
      for (int k = 0; k < 3; ++k) {
        EXPECT_EQ(lp.top(k).token_id(), 100 + k);
        EXPECT_FLOAT_EQ(lp.top(k).logprob(), -1.0f * k);
      }
    }
  }
  EXPECT_EQ(n, 4);
}

TEST_F(ServerFakeEngineTest, StopStringEndsTheStreamAndStopsTheEngine) {
  start();
  const std::string prompt = "The cat sat on the mat.";
  v1::GenerateRequest request = text_request(prompt, 100);
  request.mutable_params()->add_stop("on the");
  const StreamResult r = megaserve::testing::generate(*stub_, request);
  ASSERT_TRUE(r.status.ok());
  const std::string full = completion_text(prompt, expected_ids(prompt, 20));
  EXPECT_EQ(r.text, full.substr(0, full.find("on the")));
  EXPECT_EQ(r.last.finish_reason(), v1::FINISH_REASON_STOP);
  EXPECT_LT(r.last.usage().completion_tokens(), 20);
  EXPECT_EQ(r.last.usage().completion_tokens(), static_cast<int>(r.token_ids.size()));
  expect_engine_idle();  // the engine was told to stop: nothing keeps generating
  bool told = false;
  for (const auto& [id, reason] : engine_->finish_calls()) {
    told |= reason == engine::FinishReason::kStop;
  }
  EXPECT_TRUE(told);
}

TEST_F(ServerFakeEngineTest, EosFinishesWithStop) {
  FakeEngineOptions options;
  options.script = {403, 407, 2, 261};
  start(options);
  const StreamResult r = megaserve::testing::generate(*stub_, text_request("Hi", 50));
  ASSERT_TRUE(r.status.ok());
  EXPECT_EQ(r.token_ids, (std::vector<int32_t>{403, 407, 2}));
  EXPECT_EQ(r.text, completion_text("Hi", {403, 407}));
  EXPECT_EQ(r.last.finish_reason(), v1::FINISH_REASON_STOP);
}

TEST_F(ServerFakeEngineTest, InvalidFieldsGetInvalidArgumentAndOthersAreUndisturbed) {
  start();
  // A long-running stream in parallel must not notice the bad requests.
  auto good = std::async(std::launch::async, [&] {
    auto stub = megaserve::testing::connect(server_->grpc_port());
    return megaserve::testing::generate(*stub, text_request("Once upon a time", 200));
  });
  const auto bad = [&](auto mutate, const std::string& field) {
    v1::GenerateRequest request = text_request("Hello", 4);
    mutate(&request);
    const StreamResult r = megaserve::testing::generate(*stub_, request);
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << field;
    EXPECT_NE(r.status.error_message().find(field), std::string::npos) << r.status.error_message();
    EXPECT_TRUE(r.messages.empty());
  };
  bad([](v1::GenerateRequest* r) { r->mutable_params()->set_temperature(-1); }, "temperature");
  bad([](v1::GenerateRequest* r) { r->mutable_params()->set_top_p(0); }, "top_p");
  bad([](v1::GenerateRequest* r) { r->mutable_params()->set_top_k(-3); }, "top_k");
  bad([](v1::GenerateRequest* r) { r->mutable_params()->set_min_p(2); }, "min_p");
  bad([](v1::GenerateRequest* r) { r->mutable_params()->set_repetition_penalty(-1); },
      "repetition_penalty");
  bad([](v1::GenerateRequest* r) { r->mutable_params()->set_frequency_penalty(9); },
      "frequency_penalty");
  bad([](v1::GenerateRequest* r) { r->mutable_params()->set_presence_penalty(-9); },
      "presence_penalty");
  bad([](v1::GenerateRequest* r) { r->mutable_params()->set_max_tokens(0); }, "max_tokens");
  bad([](v1::GenerateRequest* r) { r->mutable_params()->set_min_tokens(5); }, "min_tokens");
  bad([](v1::GenerateRequest* r) { r->mutable_params()->set_logprobs(21); }, "logprobs");
  bad([](v1::GenerateRequest* r) { r->mutable_params()->add_stop_token_ids(512); },
      "stop_token_ids");
  bad([](v1::GenerateRequest* r) { r->mutable_token_ids()->add_ids(4096); }, "token_ids");
  bad([](v1::GenerateRequest* r) { r->set_text(""); }, "text");
  bad([](v1::GenerateRequest* r) { r->clear_input(); }, "input");
  bad([](v1::GenerateRequest* r) { r->set_text(std::string(300, 'x') + " end"); }, "context");
  const StreamResult r = good.get();
  ASSERT_TRUE(r.status.ok());
  EXPECT_EQ(r.token_ids, expected_ids("Once upon a time", 200));
  EXPECT_EQ(r.last.finish_reason(), v1::FINISH_REASON_LENGTH);
  // The server still serves.
  EXPECT_TRUE(megaserve::testing::generate(*stub_, text_request("Hello", 3)).status.ok());
}

// Issue 18 item 4: a 3.5 MB text prompt was tokenized in full on a gRPC thread before the
// length check. Text longer than max_model_len tokens of the longest piece can never fit: it
// is refused by its byte length, at once, with INVALID_ARGUMENT naming the field and sizes.
TEST_F(ServerFakeEngineTest, HugeTextPromptIsRefusedByItsByteLengthInMilliseconds) {
  start();
  const int64_t per_token = tokenizer_->max_input_bytes_per_token();
  ASSERT_GT(per_token, 0);
  const std::string huge(3500 * 1000, 'x');
  const std::string limit = std::to_string(255 * per_token);
  for (int i = 0; i < 4; ++i) {
    const auto begin = std::chrono::steady_clock::now();
    const StreamResult r = megaserve::testing::generate(*stub_, text_request(huge, 4));
    const auto took = std::chrono::steady_clock::now() - begin;
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    const std::string& message = r.status.error_message();
    EXPECT_NE(message.find("text is 3500000 bytes"), std::string::npos) << message;
    EXPECT_NE(message.find("at most " + limit + " bytes"), std::string::npos) << message;
    EXPECT_NE(message.find("256 tokens"), std::string::npos) << message;
    // Sending 3.5 MB over loopback takes a few ms; tokenizing it took seconds.
    EXPECT_LT(took, std::chrono::milliseconds(300));
  }
  // Just under the bound is tokenized and refused by its token count instead.
  const StreamResult near =
      megaserve::testing::generate(*stub_, text_request(std::string(255 * per_token, 'x'), 4));
  EXPECT_EQ(near.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(near.status.error_message().find("tokens"), std::string::npos);
  EXPECT_TRUE(megaserve::testing::generate(*stub_, text_request("Hello", 3)).status.ok());
}

// And a long prompt that may fit (a large max_model_len) is tokenized off gRPC's threads, on
// a lane of its own: short requests meanwhile are served as if the server were idle.
TEST_F(ServerFakeEngineTest, LongPromptsBeingTokenizedDoNotHoldUpOtherRequests) {
  start({}, 1 << 24);
  std::string long_text;
  while (long_text.size() < 1500 * 1000) long_text += "Once upon a time there was a little dog. ";
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::future<StreamResult>> long_calls;
  for (int i = 0; i < 4; ++i) {
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    contexts.back()->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    grpc::ClientContext* context = contexts.back().get();
    long_calls.push_back(std::async(std::launch::async, [&, context] {
      auto stub = megaserve::testing::connect(server_->grpc_port());
      return megaserve::testing::generate(*stub, text_request(long_text, 1), context);
    }));
  }
  // Let the long prompts arrive and start tokenizing.
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  for (int i = 0; i < 5; ++i) {
    const auto begin = std::chrono::steady_clock::now();
    const StreamResult r = megaserve::testing::generate(*stub_, text_request("Hello there", 2));
    const auto took = std::chrono::steady_clock::now() - begin;
    EXPECT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_LT(took, std::chrono::milliseconds(250)) << "short request " << i;
    v1::TokenizeRequest tokenize;
    tokenize.set_text("Hello there");
    v1::TokenizeResponse tokens;
    grpc::ClientContext context;
    EXPECT_TRUE(stub_->Tokenize(&context, tokenize, &tokens).ok());
  }
  for (auto& call : long_calls) {
    const StreamResult r = call.get();
    EXPECT_TRUE(r.status.ok()) << r.status.error_message();
  }
}

TEST_F(ServerFakeEngineTest, FullQueueGetsResourceExhausted) {
  FakeEngineOptions options;
  options.max_waiting = 2;
  start(options);
  engine_->set_paused(true);
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::future<StreamResult>> held;
  for (int i = 0; i < 2; ++i) {
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    grpc::ClientContext* context = contexts.back().get();
    held.push_back(std::async(std::launch::async, [&, context] {
      auto stub = megaserve::testing::connect(server_->grpc_port());
      return megaserve::testing::generate(*stub, text_request("One two", 3), context);
    }));
  }
  while (engine_->stats().waiting < 2) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  const StreamResult rejected = megaserve::testing::generate(*stub_, text_request("Three", 3));
  EXPECT_EQ(rejected.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(rejected.status.error_message().find("queue"), std::string::npos);
  engine_->set_paused(false);
  for (auto& f : held) {
    const StreamResult r = f.get();
    EXPECT_TRUE(r.status.ok());
    EXPECT_EQ(r.token_ids.size(), 3u);
  }
}

TEST_F(ServerFakeEngineTest, ClientCancellationAbortsTheRequestAndFreesItsBlocks) {
  FakeEngineOptions options;
  options.step_interval = std::chrono::milliseconds(2);
  start(options);
  grpc::ClientContext context;
  auto reader = stub_->Generate(&context, text_request("Once upon a time", 200));
  v1::GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response));  // it is running
  EXPECT_GT(engine_->stats().kv_blocks_used, 0);
  context.TryCancel();
  while (reader->Read(&response)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  expect_engine_idle();
  const auto calls = engine_->finish_calls();
  ASSERT_EQ(calls.size(), 1u);
  EXPECT_EQ(calls[0].second, engine::FinishReason::kAbort);
  // Its metrics say so (OnDone, which records, may trail the client's view briefly).
  std::map<std::string, double> metrics;
  for (int i = 0; i < 1000; ++i) {
    metrics = megaserve::testing::scrape_metrics(server_->metrics_port());
    if (metrics.count("megaserve_requests_total{status=\"CANCELLED\"}")) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ(metrics["megaserve_requests_total{status=\"CANCELLED\"}"], 1);
  EXPECT_EQ(metrics.count("megaserve_requests_total{status=\"OK\"}"), 0u);
}

TEST_F(ServerFakeEngineTest, ExpiredDeadlineAbortsTheRequest) {
  FakeEngineOptions options;
  options.step_interval = std::chrono::milliseconds(5);
  start(options);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(100));
  const StreamResult r =
      megaserve::testing::generate(*stub_, text_request("Once upon a time", 250), &context);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_LT(r.token_ids.size(), 250u);
  expect_engine_idle();
  const auto calls = engine_->finish_calls();
  ASSERT_EQ(calls.size(), 1u);
  EXPECT_EQ(calls[0].second, engine::FinishReason::kAbort);
}

TEST_F(ServerFakeEngineTest, ConcurrentStreamsEachGetTheirOwnOutput) {
  start();
  constexpr int kStreams = 32;
  std::vector<std::future<StreamResult>> futures;
  std::vector<std::string> prompts;
  for (int i = 0; i < kStreams; ++i) prompts.push_back("Tom had " + std::to_string(i) + " cats");
  for (int i = 0; i < kStreams; ++i) {
    futures.push_back(std::async(std::launch::async, [&, i] {
      auto stub = megaserve::testing::connect(server_->grpc_port());
      return megaserve::testing::generate(*stub, text_request(prompts[i], 20 + i));
    }));
  }
  for (int i = 0; i < kStreams; ++i) {
    const StreamResult r = futures[i].get();
    ASSERT_TRUE(r.status.ok()) << i;
    const std::vector<int32_t> expected = expected_ids(prompts[i], 20 + i);
    EXPECT_EQ(r.token_ids, expected) << i;
    EXPECT_EQ(r.text, completion_text(prompts[i], expected)) << i;
  }
  expect_engine_idle();
}

TEST_F(ServerFakeEngineTest, DrainTurnsHealthOffRejectsNewRequestsAndLetsRunningOnesFinish) {
  FakeEngineOptions options;
  options.step_interval = std::chrono::milliseconds(2);
  start(options);
  EXPECT_EQ(megaserve::testing::health(server_->grpc_port()),
            grpc::health::v1::HealthCheckResponse::SERVING);
  grpc::ClientContext context;
  auto reader = stub_->Generate(&context, text_request("Once upon a time", 40));
  v1::GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response));
  std::thread drain([&] { server_->drain_and_stop(std::chrono::seconds(10)); });
  // Health turns NOT_SERVING and new requests get UNAVAILABLE while the stream finishes.
  auto stub = megaserve::testing::connect(server_->grpc_port());
  grpc::health::v1::HealthCheckResponse::ServingStatus status;
  for (int i = 0; i < 1000; ++i) {
    status = megaserve::testing::health(server_->grpc_port());
    if (status != grpc::health::v1::HealthCheckResponse::SERVING) break;
  }
  EXPECT_EQ(status, grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  const StreamResult rejected = megaserve::testing::generate(*stub, text_request("Hi", 3));
  EXPECT_EQ(rejected.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  int tokens = response.token_ids_size();
  while (reader->Read(&response)) tokens += response.token_ids_size();
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_EQ(tokens, 40);
  EXPECT_EQ(response.finish_reason(), v1::FINISH_REASON_LENGTH);
  drain.join();
}

TEST_F(ServerFakeEngineTest, DrainAbortsWhatOutlivesTheGracePeriod) {
  FakeEngineOptions options;
  options.step_interval = std::chrono::milliseconds(5);
  start(options);
  grpc::ClientContext context;
  auto reader = stub_->Generate(&context, text_request("Once upon a time", 250));
  v1::GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response));
  server_->drain_and_stop(std::chrono::milliseconds(50));
  v1::FinishReason reason = v1::FINISH_REASON_UNSPECIFIED;
  int tokens = response.token_ids_size();
  while (reader->Read(&response)) {
    tokens += response.token_ids_size();
    reason = response.finish_reason();
  }
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_EQ(reason, v1::FINISH_REASON_ABORT);
  EXPECT_LT(tokens, 250);
}

TEST_F(ServerFakeEngineTest, ModelInfoTokenizeDetokenize) {
  start();
  grpc::ClientContext c1;
  v1::ModelInfo info;
  ASSERT_TRUE(stub_->GetModelInfo(&c1, v1::GetModelInfoRequest(), &info).ok());
  EXPECT_EQ(info.name(), "fake");
  EXPECT_EQ(info.vocab_size(), 512);
  EXPECT_EQ(info.num_kv_blocks(), 4096);  // from the engine's stats

  grpc::ClientContext c2;
  v1::TokenizeRequest tokenize;
  tokenize.set_text("Once upon a time");
  v1::TokenizeResponse ids;
  ASSERT_TRUE(stub_->Tokenize(&c2, tokenize, &ids).ok());
  EXPECT_EQ(std::vector<int32_t>(ids.token_ids().begin(), ids.token_ids().end()),
            (std::vector<int32_t>{1, 403, 407, 261, 378}));  // the assets README's encoding

  grpc::ClientContext c3;
  v1::DetokenizeRequest detokenize;
  for (int32_t id : {403, 407, 261, 378}) detokenize.add_token_ids(id);
  v1::DetokenizeResponse text;
  ASSERT_TRUE(stub_->Detokenize(&c3, detokenize, &text).ok());
  EXPECT_EQ(text.text(), "Once upon a time");

  grpc::ClientContext c4;
  detokenize.add_token_ids(9999);
  EXPECT_EQ(stub_->Detokenize(&c4, detokenize, &text).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_F(ServerFakeEngineTest, HealthAndReflectionAnswer) {
  start();
  EXPECT_EQ(megaserve::testing::health(server_->grpc_port()),
            grpc::health::v1::HealthCheckResponse::SERVING);
  const std::vector<std::string> services =
      megaserve::testing::reflection_services(server_->grpc_port());
  EXPECT_NE(std::find(services.begin(), services.end(), "megaserve.v1.Megaserve"), services.end());
  EXPECT_NE(std::find(services.begin(), services.end(), "grpc.health.v1.Health"), services.end());
  EXPECT_TRUE(
      megaserve::testing::reflection_describes(server_->grpc_port(), "megaserve.v1.Megaserve"));
  EXPECT_FALSE(
      megaserve::testing::reflection_describes(server_->grpc_port(), "megaserve.v1.NoSuchService"));
}

TEST_F(ServerFakeEngineTest, MetricsCountWhatWasSent) {
  start();
  int ok = 0, tokens = 0, prompt_tokens = 0;
  for (int n : {3, 5, 8}) {
    const StreamResult r = megaserve::testing::generate(*stub_, text_request("A big dog", n));
    ASSERT_TRUE(r.status.ok());
    ++ok;
    tokens += n;
    prompt_tokens += r.last.usage().prompt_tokens();
  }
  v1::GenerateRequest invalid = text_request("x", 4);
  invalid.mutable_params()->set_top_p(5);
  EXPECT_FALSE(megaserve::testing::generate(*stub_, invalid).status.ok());
  // OnDone (which records) may run just after the client saw the end: poll briefly.
  std::map<std::string, double> m;
  for (int i = 0; i < 2000; ++i) {
    m = megaserve::testing::scrape_metrics(server_->metrics_port());
    if (m["megaserve_requests_total{status=\"OK\"}"] == ok &&
        m["megaserve_requests_total{status=\"INVALID_ARGUMENT\"}"] == 1) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ(m["megaserve_requests_total{status=\"OK\"}"], ok);
  EXPECT_EQ(m["megaserve_requests_total{status=\"INVALID_ARGUMENT\"}"], 1);
  EXPECT_EQ(m["megaserve_requests_finished_total{reason=\"length\"}"], ok);
  EXPECT_EQ(m["megaserve_generation_tokens_total"], tokens);
  EXPECT_EQ(m["megaserve_prompt_tokens_total"], prompt_tokens);
  EXPECT_EQ(m["megaserve_time_to_first_token_seconds_count"], ok);
  EXPECT_EQ(m["megaserve_time_to_first_token_seconds_bucket{le=\"+Inf\"}"], ok);
  EXPECT_EQ(m["megaserve_time_per_output_token_seconds_count"], ok);
  EXPECT_EQ(m["megaserve_e2e_request_latency_seconds_count"], ok);
  EXPECT_GT(m["megaserve_e2e_request_latency_seconds_sum"], 0);
  EXPECT_EQ(m["megaserve_kv_blocks_total"], 4096);
  EXPECT_EQ(m["megaserve_kv_blocks_used"], 0);
  EXPECT_EQ(m["megaserve_requests_running"], 0);
  EXPECT_EQ(m["megaserve_requests_waiting"], 0);
  EXPECT_GT(m["megaserve_engine_steps_total"], 0);
  EXPECT_GT(m["megaserve_step_seconds_count"], 0);
  EXPECT_TRUE(m.count("megaserve_prefix_cache_hit_rate"));
  EXPECT_TRUE(m.count("megaserve_preemptions_total"));
  // Buckets are cumulative.
  EXPECT_LE(m["megaserve_time_to_first_token_seconds_bucket{le=\"0.001\"}"],
            m["megaserve_time_to_first_token_seconds_bucket{le=\"1\"}"]);
}

}  // namespace
}  // namespace megaserve::server
