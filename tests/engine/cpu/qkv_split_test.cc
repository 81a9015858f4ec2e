// QKV tiles split by RoPE pair ranges (engine/planner/schedule_tiles.cc: a small step with
// fewer one-head tiles than SMs) on the CPU interpreter: the same greedy tokens and, bit for
// bit, the same logprobs as whole-head tiles, over a prefill and decode steps with a Llama-
// shaped random model of head_dim 64, every step passing the static verifier (the split
// tiles' q and KV-cache writes recorded as two byte ranges per head); on 132 SMs the ranges
// stay inside heads, on 12 some span two; a model with a q/k norm (Qwen3) is never split.
#include <memory>
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "engine/model/model_config.h"
#include "engine/model/weights.h"
#include "engine/planner/tile_config.h"
#include "engine/step_runner.h"
#include "gtest/gtest.h"

namespace megaserve::engine {
namespace {

ModelConfig small_config(bool qk_norm) {
  ModelConfig c;
  c.hidden_size = 256;
  c.intermediate_size = 512;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 64;
  c.vocab_size = 512;
  c.max_position_embeddings = 512;
  if (qk_norm) {
    c.family = ModelFamily::kQwen3;
    c.qk_norm = true;
  }
  return c;
}

struct Outputs {
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;
  int split_tiles = 0;   // QKV tiles with a pair range, over all steps
  int across_heads = 0;  // those whose range spans more than one head
};

// Greedy: a 20-token prefill, then 6 decode steps; GPU tiles on `sms` virtual SMs.
Outputs run_steps(const ModelConfig& config, bool balance_columns, int sms = 132) {
  CpuBackendOptions o;
  o.num_sms = sms;
  o.default_tiles = false;
  o.tiles = gpu_tile_config(sms);
  o.tiles.balance_columns = balance_columns;
  o.num_kv_blocks = 16;
  o.verify = true;  // the static verifier proves every step's accesses ordered
  auto backend = CpuBackend::create(config, dummy_weights(config, DType::kF32, 7), o);
  EXPECT_TRUE(backend.ok()) << backend.status();
  Outputs out;
  if (!backend.ok()) return out;
  StepRunner runner(config, **backend);
  std::vector<int32_t> ids;
  for (int i = 0; i < 20; ++i) ids.push_back(1 + (i * 37) % 500);
  int position = 0;
  for (int step = 0; step < 7; ++step) {
    scheduler::StepPlan plan;
    plan.step_id = step;
    plan.kv_block_size = 16;
    scheduler::StepRequest r;
    r.request_id = 1;
    r.first_position = position;
    r.token_ids = step == 0 ? ids : std::vector<int32_t>{out.tokens.back()};
    r.block_table = {0, 1};
    r.sample = true;
    r.sampling.temperature = 0.0f;
    r.sampling.logprobs = 5;
    plan.requests.push_back(r);
    auto result = runner.execute(plan);
    EXPECT_TRUE(result.ok()) << result.status();
    if (!result.ok()) return out;
    position += r.num_tokens();
    out.tokens.push_back(result->sampled[0].token_id);
    out.logprobs.push_back(result->sampled[0].logprob);
    for (const auto& [id, lp] : result->sampled[0].top_logprobs) out.logprobs.push_back(lp);
    for (const isa::Instruction& inst : runner.last_step().ranks[0].instructions) {
      if (inst.opcode() != isa::Opcode::kQkvRope) continue;
      const auto a = isa::args_of<isa::QkvRopeArgs>(inst);
      if (a.pair_end == 0) continue;
      ++out.split_tiles;
      if (a.head_end - a.head_begin > 1) ++out.across_heads;
    }
  }
  return out;
}

TEST(QkvSplitTest, PairRangeTilesGiveTheTokensAndLogprobsOfWholeHeads) {
  const ModelConfig config = small_config(false);
  const Outputs split = run_steps(config, true), whole = run_steps(config, false);
  EXPECT_GT(split.split_tiles, 0);
  EXPECT_EQ(whole.split_tiles, 0);
  ASSERT_EQ(split.tokens.size(), 7u);
  EXPECT_EQ(split.tokens, whole.tokens);
  EXPECT_EQ(split.logprobs, whole.logprobs);  // bit for bit: the same dot products
  EXPECT_EQ(split.across_heads, 0);           // 8 pairs a tile, heads of 32
}

// On 12 SMs a decode step's 256 pairs go to tiles of 24: ranges across two heads of 32.
TEST(QkvSplitTest, RangesAcrossHeadsGiveTheTokensAndLogprobsOfWholeHeads) {
  const ModelConfig config = small_config(false);
  const Outputs split = run_steps(config, true, 12), whole = run_steps(config, false, 12);
  EXPECT_GT(split.across_heads, 0);
  ASSERT_EQ(split.tokens.size(), 7u);
  EXPECT_EQ(split.tokens, whole.tokens);
  EXPECT_EQ(split.logprobs, whole.logprobs);
}

TEST(QkvSplitTest, AHeadWithAQkNormIsNeverSplit) {
  const Outputs qwen3 = run_steps(small_config(true), true);
  EXPECT_EQ(qwen3.tokens.size(), 7u);
  EXPECT_EQ(qwen3.split_tiles, 0);
}

}  // namespace
}  // namespace megaserve::engine
