// Thousands of back-to-back steps with changing batches (requests arriving, prefilling in
// chunks, decoding, finishing, their KV blocks reused) on one interpreter whose barriers are
// never reset and start just below 2^32, so they wrap mid-run. Every sampled token and
// logprob must equal, bit for bit, a run of the same requests on a fresh deterministic
// backend (one SM, barriers from 0): the per-element arithmetic does not depend on placement.
#include <random>
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "engine/model/weights.h"
#include "engine/step_runner.h"
#include "gtest/gtest.h"
#include "tests/engine/cpu/cpu_test_driver.h"
#include "tests/support/safetensors_writer.h"

namespace megaserve::engine {
namespace {

using testing::DriverRequest;
using testing::GreedyDriver;

std::vector<DriverRequest> arrivals(int vocab, int count) {
  std::mt19937 rng(7);
  std::vector<DriverRequest> out;
  for (int i = 0; i < count; ++i) {
    DriverRequest r;
    r.id = 1000 + i;
    const int len = 1 + rng() % 20;
    for (int t = 0; t < len; ++t) r.prompt.push_back(rng() % vocab);
    r.max_new_tokens = 10 + rng() % 50;
    r.chunk = rng() % 9;  // 0: whole prompt
    r.start_step = 7 * i;
    out.push_back(r);
  }
  return out;
}

struct RunResult {
  std::vector<std::vector<int32_t>> generated;
  int steps = 0;
};

RunResult run_requests(const ModelConfig& config, const ModelWeights& weights, int tp, int sms,
                       ExecutionMode mode, uint32_t barrier_origin, int count) {
  CpuBackendOptions options;
  options.tensor_parallel = tp;
  options.num_sms = sms;
  options.num_kv_blocks = 96;
  options.kv_block_size = 8;
  options.execution.mode = mode;
  options.execution.seed = 99;
  auto backend = CpuBackend::create(config, weights, options);
  EXPECT_TRUE(backend.ok()) << backend.status();
  if (!backend.ok()) return {};
  StepRunner runner(config, **backend);
  runner.builder().set_barrier_origin(barrier_origin);
  (*backend)->interpreter().set_barriers(barrier_origin);
  GreedyDriver driver(runner, options.num_kv_blocks);
  for (auto& r : arrivals(config.vocab_size, count)) driver.add(r);
  const absl::Status s = driver.run();
  EXPECT_TRUE(s.ok()) << s;
  RunResult out;
  out.steps = driver.steps();
  for (const auto& r : driver.requests()) out.generated.push_back(r.generated);
  if (barrier_origin != 0) {
    // The counters passed 2^32 on the way (barrier 3: layer 0's QKV stage, which every step
    // signals; barrier 2, its norm stage, only steps with norm stages).
    EXPECT_LT((*backend)->interpreter().barrier(0, 3), barrier_origin);
  }
  return out;
}

class CpuLongRunTest : public ::testing::Test {
 protected:
  void SetUp() override {
    config_ = megaserve::testing::tiny_model_config(ModelFamily::kLlama);
    config_.max_position_embeddings = 256;
    const auto dir = megaserve::testing::make_test_dir("long_run");
    megaserve::testing::write_random_model(dir, config_, 3);
    auto w = load_weights(dir, config_, DType::kF32);
    ASSERT_TRUE(w.ok()) << w.status();
    weights_ = std::move(*w);
  }
  ModelConfig config_;
  ModelWeights weights_;
};

TEST_F(CpuLongRunTest, ThousandsOfStepsWithWrappingBarriersMatchAFreshRun) {
  const int kRequests = 290;  // one every 7 steps: ~2000 steps
  const RunResult want =
      run_requests(config_, weights_, 2, 1, ExecutionMode::kSequential, 0, kRequests);
  const RunResult got =
      run_requests(config_, weights_, 2, 3, ExecutionMode::kShuffled, 0xFFFFF000u, kRequests);
  EXPECT_GE(got.steps, 2000);
  ASSERT_EQ(got.generated.size(), want.generated.size());
  for (size_t i = 0; i < want.generated.size(); ++i) {
    EXPECT_EQ(got.generated[i], want.generated[i]) << "request " << i;
  }
}

TEST_F(CpuLongRunTest, ThreadedRunMatchesAFreshRun) {
  const int kRequests = 40;
  const RunResult want =
      run_requests(config_, weights_, 1, 1, ExecutionMode::kSequential, 0, kRequests);
  const RunResult got =
      run_requests(config_, weights_, 1, 4, ExecutionMode::kThreaded, 0xFFFFFF00u, kRequests);
  EXPECT_GE(got.steps, 280);
  EXPECT_EQ(got.generated, want.generated);
}

}  // namespace
}  // namespace megaserve::engine
