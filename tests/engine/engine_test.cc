// The engine loop over the CPU interpreter with the real stories260K model: continuous
// batching, chunked prefill, preemption, prefix reuse and aborts must never change a greedy
// request's tokens, and must hand every KV block back.
#include "engine/engine.h"

#include <chrono>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <thread>
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "engine/model/model_config.h"
#include "engine/model/weights.h"
#include "gtest/gtest.h"
#include "tests/support/assets.h"

namespace megaserve::engine {
namespace {

constexpr char kModel[] = "models/stories260K-hf/config.json";

std::filesystem::path model_dir() { return testing::assets_dir() / "models/stories260K-hf"; }

std::vector<int32_t> oracle_ids(size_t n = 200) {
  std::istringstream in(
      testing::read_file(testing::assets_dir() / "models/stories260K/oracle/bos_t0_n200_ids.txt"));
  std::vector<int32_t> ids;
  for (int32_t id; in >> id;) ids.push_back(id);
  ids.resize(std::min(ids.size(), n));
  return ids;
}

struct EngineSetup {
  int32_t num_kv_blocks = 256;
  int32_t kv_block_size = 16;
  int num_sms = 2;
  EngineOptions options;
};

std::unique_ptr<Engine> make_engine(const EngineSetup& setup) {
  auto config = load_model_config(model_dir());
  EXPECT_TRUE(config.ok()) << config.status();
  auto weights = load_weights(model_dir(), *config, DType::kF32);
  EXPECT_TRUE(weights.ok()) << weights.status();
  CpuBackendOptions backend_options;
  backend_options.num_sms = setup.num_sms;
  backend_options.num_kv_blocks = setup.num_kv_blocks;
  backend_options.kv_block_size = setup.kv_block_size;
  auto backend = CpuBackend::create(*config, *std::move(weights), backend_options);
  EXPECT_TRUE(backend.ok()) << backend.status();
  auto engine = Engine::create(*config, *std::move(backend), setup.options);
  EXPECT_TRUE(engine.ok()) << engine.status();
  return *std::move(engine);
}

GenerateRequest greedy(std::vector<int32_t> prompt, int max_tokens) {
  GenerateRequest r;
  r.prompt_token_ids = std::move(prompt);
  r.sampling.temperature = 0.0f;
  r.sampling.max_tokens = max_tokens;
  r.sampling.ignore_eos = true;
  return r;
}

struct Result {
  std::vector<int32_t> tokens;
  FinishReason reason = FinishReason::kError;
  int32_t cached = 0;
};

Result collect(RequestOutput& output) {
  Result result;
  while (true) {
    for (RequestEvent& e : output.wait()) {
      for (const auto& t : e.tokens) result.tokens.push_back(t.token_id);
      result.cached = std::max(result.cached, e.num_cached_prompt_tokens);
      if (e.finished) {
        result.reason = *e.finished;
        return result;
      }
    }
  }
}

Result run_alone(Engine& engine, GenerateRequest request) {
  auto output = engine.submit(std::move(request));
  EXPECT_TRUE(output.ok()) << output.status();
  return collect(**output);
}

// Mixed prompts: BOS + a slice of the oracle text, of varied lengths and offsets.
std::vector<GenerateRequest> mixed_requests(int n) {
  std::vector<int32_t> ids = oracle_ids();
  std::vector<GenerateRequest> requests;
  for (int i = 0; i < n; ++i) {
    int offset = (i * 37) % 120;
    int length = 1 + (i * 13) % 60;
    std::vector<int32_t> prompt = {1};
    prompt.insert(prompt.end(), ids.begin() + offset, ids.begin() + offset + length);
    requests.push_back(greedy(std::move(prompt), 4 + (i * 7) % 30));
  }
  return requests;
}

std::vector<Result> run_concurrently(Engine& engine, const std::vector<GenerateRequest>& requests) {
  std::vector<std::shared_ptr<RequestOutput>> outputs;
  for (const auto& r : requests) {
    auto output = engine.submit(r);
    EXPECT_TRUE(output.ok()) << output.status();
    outputs.push_back(*output);
  }
  std::vector<Result> results;
  for (auto& o : outputs) results.push_back(collect(*o));
  return results;
}

TEST(Engine, GreedyFromBosReproducesTheOracle) {
  MEGASERVE_REQUIRE_ASSET(kModel);
  auto engine = make_engine({});
  Result r = run_alone(*engine, greedy({1}, 200));
  EXPECT_EQ(r.tokens, oracle_ids());
  EXPECT_EQ(r.tokens.size(), 200u);
  EXPECT_EQ(r.reason, FinishReason::kLength);
  EXPECT_EQ(engine->stats().kv_blocks_used, 0);
}

TEST(Engine, StepObserverSeesEveryStepWithItsTime) {
  MEGASERVE_REQUIRE_ASSET(kModel);
  auto engine = make_engine({});
  std::mutex mu;
  int64_t calls = 0;
  double sum = 0.0;
  bool all_positive = true;
  engine->set_step_observer([&](double seconds) {
    std::lock_guard<std::mutex> lock(mu);
    ++calls;
    sum += seconds;
    all_positive = all_positive && seconds > 0.0;
  });
  const auto start = std::chrono::steady_clock::now();
  Result r = run_alone(*engine, greedy({1}, 50));
  const double wall =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_EQ(r.tokens.size(), 50u);
  {
    // A step is observed before its output is applied, so every step of the request is in.
    std::lock_guard<std::mutex> lock(mu);
    EXPECT_EQ(calls, engine->stats().steps);
    EXPECT_GE(calls, 50);
    EXPECT_TRUE(all_positive);
    EXPECT_LE(sum, wall);  // the steps ran one after another inside the request's time
  }
  // Cleared: later steps are not observed.
  engine->set_step_observer(nullptr);
  const int64_t steps_before = engine->stats().steps;
  run_alone(*engine, greedy({1}, 5));
  EXPECT_GT(engine->stats().steps, steps_before);
  std::lock_guard<std::mutex> lock(mu);
  EXPECT_EQ(calls, steps_before);
}

class EngineBatching : public ::testing::TestWithParam<bool> {};  // overlapped scheduling

TEST_P(EngineBatching, ConcurrentRequestsEqualTheirSoloRuns) {
  MEGASERVE_REQUIRE_ASSET(kModel);
  auto requests = mixed_requests(32);
  EngineSetup solo_setup;
  auto solo_engine = make_engine(solo_setup);
  std::vector<Result> solo;
  for (const auto& r : requests) solo.push_back(run_alone(*solo_engine, r));

  EngineSetup setup;
  setup.options.overlap_scheduling = GetParam();
  setup.options.max_num_batched_tokens = 48;  // forces chunked prefill next to decodes
  setup.options.enable_prefix_caching = false;
  auto engine = make_engine(setup);
  std::vector<Result> together = run_concurrently(*engine, requests);
  for (size_t i = 0; i < requests.size(); ++i) {
    EXPECT_EQ(together[i].tokens, solo[i].tokens) << "request " << i;
    EXPECT_EQ(together[i].tokens.size(), static_cast<size_t>(requests[i].sampling.max_tokens));
    EXPECT_EQ(together[i].reason, FinishReason::kLength);
  }
  EXPECT_EQ(engine->stats().kv_blocks_used, 0);
}

TEST_P(EngineBatching, PreemptedRequestsResumeWithTheSameTokens) {
  MEGASERVE_REQUIRE_ASSET(kModel);
  auto requests = mixed_requests(12);
  for (auto& r : requests) r.sampling.max_tokens = 60;
  auto solo_engine = make_engine({});
  std::vector<Result> solo;
  for (const auto& r : requests) solo.push_back(run_alone(*solo_engine, r));

  EngineSetup setup;
  setup.num_kv_blocks = 14;  // ~3 sequences' worth: the others must be preempted
  setup.options.overlap_scheduling = GetParam();
  auto engine = make_engine(setup);
  std::vector<Result> together = run_concurrently(*engine, requests);
  for (size_t i = 0; i < requests.size(); ++i) {
    EXPECT_EQ(together[i].tokens, solo[i].tokens) << "request " << i;
  }
  EXPECT_GT(engine->stats().preemptions, 0);
  EXPECT_EQ(engine->stats().kv_blocks_used, 0);
}

INSTANTIATE_TEST_SUITE_P(Overlap, EngineBatching, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "overlapped" : "serial"; });

TEST(Engine, SharedPrefixReusesBlocksAndGivesTheSameTokens) {
  MEGASERVE_REQUIRE_ASSET(kModel);
  std::vector<int32_t> ids = oracle_ids();
  std::vector<int32_t> first = {1};
  first.insert(first.end(), ids.begin(), ids.begin() + 55);  // 56 tokens: 3 full blocks + 8
  std::vector<int32_t> second(first.begin(), first.begin() + 48);
  second.insert(second.end(), ids.begin() + 100, ids.begin() + 110);  // diverges after 48

  EngineSetup no_cache;
  no_cache.options.enable_prefix_caching = false;
  auto reference_engine = make_engine(no_cache);
  Result reference = run_alone(*reference_engine, greedy(second, 20));
  EXPECT_EQ(reference.cached, 0);

  auto engine = make_engine({});
  Result a = run_alone(*engine, greedy(first, 10));
  EXPECT_EQ(a.cached, 0);
  Result b = run_alone(*engine, greedy(second, 20));
  EXPECT_EQ(b.cached, 48);  // the three shared full blocks
  EXPECT_EQ(b.tokens, reference.tokens);
  EXPECT_GE(engine->stats().prefix_cache_hits, 48);
}

TEST(Engine, AbortFreesBlocksAndReportsAbort) {
  MEGASERVE_REQUIRE_ASSET(kModel);
  auto engine = make_engine({});
  auto output = engine->submit(greedy({1}, 400));
  ASSERT_TRUE(output.ok());
  auto first = (*output)->wait();  // the request is running
  ASSERT_FALSE(first.empty());
  engine->finish((*output)->request_id(), FinishReason::kAbort);
  Result r = collect(**output);
  EXPECT_EQ(r.reason, FinishReason::kAbort);
  EXPECT_LT(r.tokens.size(), 400u);
  EXPECT_EQ(engine->stats().kv_blocks_used, 0);
  EXPECT_EQ(engine->stats().running, 0);
  // The engine keeps serving.
  EXPECT_EQ(run_alone(*engine, greedy({1}, 5)).tokens, oracle_ids(5));
}

TEST(Engine, BadRequestsAreRejectedAndOthersContinue) {
  MEGASERVE_REQUIRE_ASSET(kModel);
  EngineSetup setup;
  setup.options.max_model_len = 64;
  auto engine = make_engine(setup);
  auto running = engine->submit(greedy({1}, 30));
  ASSERT_TRUE(running.ok());
  EXPECT_EQ(engine->submit(greedy({}, 5)).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine->submit(greedy(std::vector<int32_t>(80, 5), 5)).status().code(),
            absl::StatusCode::kInvalidArgument);
  Result r = collect(**running);
  EXPECT_EQ(r.tokens, oracle_ids(30));
}

TEST(Engine, DrainRefusesNewRequestsAndFinishesRunningOnes) {
  MEGASERVE_REQUIRE_ASSET(kModel);
  auto engine = make_engine({});
  auto running = engine->submit(greedy({1}, 20));
  ASSERT_TRUE(running.ok());
  std::thread drainer([&] { engine->drain(/*abort_all=*/false); });
  Result r = collect(**running);
  drainer.join();
  EXPECT_EQ(r.reason, FinishReason::kLength);
  EXPECT_EQ(r.tokens.size(), 20u);
  EXPECT_EQ(engine->submit(greedy({1}, 5)).status().code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace megaserve::engine
