// The interpreter's kSample op with non-greedy, seeded sampling: every sampled token is what
// engine/isa/sampling.h draws from the gathered full-vocabulary logits with the request's own
// context (seed, token index, banned ids), and the draws are identical whatever the number
// of virtual SMs or the execution mode (the logits are bit-identical; the seed is per
// request). Also: kTokenFromPreviousStep without a previous sample is rejected by name.
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "engine/isa/sampling.h"
#include "engine/model/weights.h"
#include "engine/step_runner.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/safetensors_writer.h"

namespace megaserve::engine {
namespace {

class CpuSamplingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    config_ = megaserve::testing::tiny_model_config(ModelFamily::kQwen2);
    const auto dir = megaserve::testing::make_test_dir("sampling");
    megaserve::testing::write_random_model(dir, config_, 11);
    auto w = load_weights(dir, config_, DType::kF32);
    ASSERT_TRUE(w.ok()) << w.status();
    weights_ = std::move(*w);
  }

  std::unique_ptr<CpuBackend> backend(int tp, int sms, ExecutionMode mode) {
    CpuBackendOptions options;
    options.tensor_parallel = tp;
    options.num_sms = sms;
    options.num_kv_blocks = 32;
    options.kv_block_size = 4;
    options.execution.mode = mode;
    options.execution.seed = 5;
    auto b = CpuBackend::create(config_, weights_, options);
    EXPECT_TRUE(b.ok()) << b.status();
    return b.ok() ? std::move(*b) : nullptr;
  }

  // Three requests with different sampling parameters decode 12 steps; returns every
  // sampled token and checks each against sample_token() on the interpreter's logits.
  std::vector<scheduler::SampledToken> generate(CpuBackend& b) {
    std::vector<scheduler::SampledToken> all;
    StepRunner runner(config_, b);
    std::vector<std::vector<int32_t>> prompts = {{3, 9, 27}, {5}, {7, 7, 7, 7, 7}};
    std::vector<std::vector<int32_t>> outputs(3);
    for (int step = 0; step < 12; ++step) {
      scheduler::StepPlan plan;
      plan.step_id = step;
      plan.kv_block_size = 4;
      for (int i = 0; i < 3; ++i) {
        scheduler::StepRequest r;
        r.request_id = 100 + i;
        if (step == 0) {
          r.token_ids = prompts[i];
        } else {
          r.token_ids = {scheduler::kTokenFromPreviousStep};
          r.first_position = static_cast<int32_t>(prompts[i].size() + outputs[i].size()) - 1;
        }
        for (int blk = 0; blk < 5; ++blk) r.block_table.push_back(i * 10 + blk);
        r.sample = true;
        r.sampling.temperature = 0.7f + 0.2f * i;
        r.sampling.top_k = i == 1 ? 5 : 0;
        r.sampling.top_p = i == 2 ? 0.8f : 1.0f;
        r.sampling.repetition_penalty = i == 0 ? 1.3f : 1.0f;
        r.sampling.logprobs = 2;
        r.prompt_token_ids = prompts[i];
        r.output_token_ids = outputs[i];
        r.output_token_index = static_cast<int32_t>(outputs[i].size());
        r.seed = 1234 + i;
        if (i == 1 && outputs[i].size() < 4) r.banned_token_ids = {0, 1, 2};  // min_tokens
        plan.requests.push_back(r);
      }
      auto out = runner.execute(plan);
      EXPECT_TRUE(out.ok()) << out.status();
      if (!out.ok()) return all;
      EXPECT_EQ(out->sampled.size(), 3u);
      for (int i = 0; i < 3; ++i) {
        const scheduler::SampledToken& tok = out->sampled[i];
        EXPECT_EQ(tok.request_id, 100u + i);
        const std::vector<float> logits = b.interpreter().logits(i);
        SamplingContext ctx;
        ctx.prompt_token_ids = prompts[i];
        ctx.output_token_ids = outputs[i];
        ctx.banned_ids = plan.requests[i].banned_token_ids;
        ctx.seed = plan.requests[i].seed;
        ctx.token_index = static_cast<int64_t>(outputs[i].size());
        const scheduler::SampledToken want = sample_token(logits, plan.requests[i].sampling, ctx);
        EXPECT_EQ(tok.token_id, want.token_id);
        EXPECT_EQ(tok.logprob, want.logprob);
        EXPECT_EQ(tok.top_logprobs, want.top_logprobs);
        if (i == 1 && outputs[i].size() < 4) {
          EXPECT_GT(tok.token_id, 2);  // banned ids never drawn
        }
        all.push_back(tok);
      }
      for (int i = 0; i < 3; ++i) outputs[i].push_back(out->sampled[i].token_id);
    }
    return all;
  }

  ModelConfig config_;
  ModelWeights weights_;
};

TEST_F(CpuSamplingTest, SeededDrawsMatchTheSamplerAndDoNotDependOnPlacement) {
  for (int tp : {1, 2}) {
    auto reference = backend(tp, 1, ExecutionMode::kSequential);
    ASSERT_NE(reference, nullptr);
    const auto want = generate(*reference);
    ASSERT_EQ(want.size(), 36u);
    for (auto [sms, mode] :
         {std::pair{3, ExecutionMode::kShuffled}, std::pair{4, ExecutionMode::kThreaded}}) {
      auto other = backend(tp, sms, mode);
      ASSERT_NE(other, nullptr);
      const auto got = generate(*other);
      ASSERT_EQ(got.size(), want.size());
      for (size_t i = 0; i < got.size(); ++i) {
        EXPECT_EQ(got[i].token_id, want[i].token_id) << "tp " << tp << " sample " << i;
        EXPECT_EQ(got[i].logprob, want[i].logprob);
      }
    }
  }
}

TEST_F(CpuSamplingTest, RejectsWeightsThatDisagreeWithTheConfig) {
  ModelWeights bad = weights_;
  bad.layers[1].w_down.shape = {bad.layers[1].w_down.shape[1], bad.layers[1].w_down.shape[0]};
  auto b = CpuBackend::create(config_, bad, {});
  EXPECT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(b.status().message()), ::testing::HasSubstr("layers.1.w_down"));
  ModelWeights short_model = weights_;
  short_model.layers.pop_back();
  EXPECT_FALSE(CpuBackend::create(config_, short_model, {}).ok());
}

TEST_F(CpuSamplingTest, TokenFromPreviousStepNeedsAPreviousSample) {
  auto b = backend(1, 1, ExecutionMode::kSequential);
  ASSERT_NE(b, nullptr);
  scheduler::StepPlan plan;
  plan.kv_block_size = 4;
  scheduler::StepRequest r;
  r.request_id = 77;
  r.token_ids = {scheduler::kTokenFromPreviousStep};
  r.block_table = {0};
  plan.requests.push_back(r);
  StepRunner runner(config_, *b);
  auto out = runner.execute(plan);
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(out.status().message()), ::testing::HasSubstr("request 77"));
  // Nothing ran, so the backend is still usable.
  plan.requests[0].token_ids = {4};
  EXPECT_TRUE(runner.execute(plan).ok());
}

}  // namespace
}  // namespace megaserve::engine
