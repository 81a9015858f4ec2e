// Prefix reuse through the paged cache: a request whose first blocks are another request's
// cached prefix (the scheduler's prefix cache hands out the same block ids) computes, bit for
// bit, what it computes from scratch, even while the owner of those blocks decodes in the
// same step (verified statically: nobody writes a shared block).
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "engine/model/weights.h"
#include "engine/step_runner.h"
#include "gtest/gtest.h"
#include "tests/support/safetensors_writer.h"

namespace megaserve::engine {
namespace {

scheduler::StepRequest request(uint64_t id, std::vector<int32_t> tokens, int first_position,
                               std::vector<int32_t> blocks, bool sample) {
  scheduler::StepRequest r;
  r.request_id = id;
  r.token_ids = std::move(tokens);
  r.first_position = first_position;
  r.block_table = std::move(blocks);
  r.sample = sample;
  r.sampling.temperature = 0.0f;
  return r;
}

TEST(CpuPrefixCacheTest, SharedPrefixBlocksGiveTheSameLogitsAsRecomputing) {
  ModelConfig config = megaserve::testing::tiny_model_config(ModelFamily::kQwen3);
  const auto dir = megaserve::testing::make_test_dir("prefix");
  megaserve::testing::write_random_model(dir, config, 21);
  auto weights = load_weights(dir, config, DType::kF32);
  ASSERT_TRUE(weights.ok()) << weights.status();

  std::vector<int32_t> prefix, suffix;
  for (int i = 0; i < 16; ++i) prefix.push_back((i * 13 + 5) % config.vocab_size);  // 2 blocks
  for (int i = 0; i < 5; ++i) suffix.push_back((i * 29 + 1) % config.vocab_size);
  std::vector<int32_t> tail_a = {9, 8, 7};

  for (int tp : {1, 2}) {
    CpuBackendOptions options;
    options.tensor_parallel = tp;
    options.num_sms = 3;
    options.num_kv_blocks = 16;
    options.kv_block_size = 8;
    options.execution.mode = ExecutionMode::kShuffled;
    options.execution.poison_workspace = true;
    options.verify = true;
    auto shared = CpuBackend::create(config, *weights, options);
    auto fresh = CpuBackend::create(config, *weights, options);
    ASSERT_TRUE(shared.ok() && fresh.ok());
    StepRunner shared_runner(config, **shared);
    StepRunner fresh_runner(config, **fresh);

    // Step 0: A prefills prefix + tail into blocks 0, 1, 2.
    std::vector<int32_t> a_tokens = prefix;
    a_tokens.insert(a_tokens.end(), tail_a.begin(), tail_a.end());
    scheduler::StepPlan plan0;
    plan0.kv_block_size = 8;
    plan0.requests.push_back(request(1, a_tokens, 0, {0, 1, 2}, true));
    ASSERT_TRUE(shared_runner.execute(plan0).ok());
    // Step 1: A decodes (writing block 2) while B starts at position 16 on A's blocks 0, 1.
    scheduler::StepPlan plan1;
    plan1.step_id = 1;
    plan1.kv_block_size = 8;
    plan1.requests.push_back(request(1, {scheduler::kTokenFromPreviousStep}, 19, {0, 1, 2}, true));
    plan1.requests.push_back(request(2, suffix, 16, {0, 1, 5}, true));
    auto out = shared_runner.execute(plan1);
    ASSERT_TRUE(out.ok()) << out.status();
    const std::vector<float> with_prefix = (*shared)->interpreter().logits(1);

    // B from scratch on another backend, its own blocks.
    std::vector<int32_t> b_tokens = prefix;
    b_tokens.insert(b_tokens.end(), suffix.begin(), suffix.end());
    scheduler::StepPlan alone;
    alone.kv_block_size = 8;
    alone.requests.push_back(request(2, b_tokens, 0, {7, 3, 11}, true));
    auto out_alone = fresh_runner.execute(alone);
    ASSERT_TRUE(out_alone.ok()) << out_alone.status();
    EXPECT_EQ(with_prefix, (*fresh)->interpreter().logits(0)) << "tp " << tp;
    EXPECT_EQ(out->sampled[1].token_id, out_alone->sampled[0].token_id);
  }
}

}  // namespace
}  // namespace megaserve::engine
