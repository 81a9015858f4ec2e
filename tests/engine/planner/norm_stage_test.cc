// The norm stages [NORM_STAGE] (engine/isa/isa.h kRmsNorm): a step of at least
// TileConfig::norm_stage_tokens tokens gets, in every layer and on every rank, a kRmsNorm
// stage before QKV (attn_norm) and one before gate/up (ffn_norm), whose tiles cover every
// token row once, and QKV and gate/up tiles marked `normed`; a smaller step gets none. The
// static verifier proves the stages ordered (TP 1 and 2) and names a QKV tile that lost its
// wait for them. On the CPU interpreter (which normalizes inside the projections) a run with
// norm stages gives the tokens and logprobs of one without, bit for bit, every step verified.
#include <algorithm>
#include <string>
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "engine/model/weights.h"
#include "engine/planner/schedule_builder.h"
#include "engine/planner/schedule_verifier.h"
#include "engine/step_runner.h"
#include "gtest/gtest.h"

namespace megaserve::engine {
namespace {

ModelConfig small_llama() {
  ModelConfig c;
  c.hidden_size = 64;
  c.intermediate_size = 172;
  c.num_layers = 4;  // layers 2 and 3 are copies of layer 1 in a step
  c.num_heads = 8;
  c.num_kv_heads = 4;
  c.head_dim = 8;
  c.vocab_size = 512;
  c.max_position_embeddings = 1024;
  return c;
}

// One prefill of `prefill` tokens and `decodes` decode requests.
scheduler::StepPlan plan(int prefill, int decodes) {
  scheduler::StepPlan p;
  p.kv_block_size = 16;
  int block = 0;
  const auto add = [&](int first_position, int tokens) {
    scheduler::StepRequest r;
    r.request_id = p.requests.size() + 1;
    r.first_position = first_position;
    for (int i = 0; i < tokens; ++i) r.token_ids.push_back((i * 7 + 3) % 512);
    for (int b = 0; b < (first_position + tokens + 15) / 16; ++b) r.block_table.push_back(block++);
    r.sample = true;
    p.requests.push_back(r);
  };
  if (prefill > 0) add(0, prefill);
  for (int i = 0; i < decodes; ++i) add(5 + 3 * i, 1);
  return p;
}

// Per (layer, norm): how often each token row is covered by a kRmsNorm tile of `rank`.
std::vector<std::vector<int>> norm_cover(const Step& step, int rank, int layers, int tokens) {
  std::vector<std::vector<int>> cover(2 * layers, std::vector<int>(tokens, 0));
  for (const isa::Instruction& inst : step.ranks[rank].instructions) {
    if (inst.opcode() != isa::Opcode::kRmsNorm) continue;
    const auto a = isa::args_of<isa::RmsNormArgs>(inst);
    EXPECT_TRUE(a.norm == isa::kAttnNorm || a.norm == isa::kFfnNorm);
    for (int r = a.row_begin; r < a.row_end; ++r) ++cover[2 * inst.layer() + a.norm][r];
  }
  return cover;
}

int normed_flag(const isa::Instruction& inst) {
  if (inst.opcode() == isa::Opcode::kQkvRope) return isa::args_of<isa::QkvRopeArgs>(inst).normed;
  return isa::args_of<isa::GateUpArgs>(inst).normed;
}

class NormStageTest : public ::testing::TestWithParam<int> {};

TEST_P(NormStageTest, EveryLayerNormalizesEveryRowOnceBeforeItsProjections) {
  const int tp = GetParam();
  const ModelConfig c = small_llama();
  const TileConfig tiles = gpu_tile_config(132);
  ASSERT_GT(tiles.norm_stage_tokens, 0);
  ScheduleBuilder builder(c, tiles, tp, {.record_accesses = true});
  const scheduler::StepPlan p = plan(200, 100);  // 300 tokens: 3 rows per norm tile
  absl::StatusOr<Step> step = builder.build(p, 4096);
  ASSERT_TRUE(step.ok()) << step.status();
  const absl::Status v = verify_step(*step);
  EXPECT_TRUE(v.ok()) << v;
  const int T = step->meta.num_tokens;
  ASSERT_EQ(T, 300);
  for (int rank = 0; rank < tp; ++rank) {
    for (const std::vector<int>& rows : norm_cover(*step, rank, c.num_layers, T)) {
      EXPECT_TRUE(std::all_of(rows.begin(), rows.end(), [](int n) { return n == 1; }));
    }
    int projections = 0, tiles_of_layer0 = 0;
    for (const isa::Instruction& inst : step->ranks[rank].instructions) {
      if (inst.opcode() == isa::Opcode::kQkvRope || inst.opcode() == isa::Opcode::kGateUpSilu) {
        ++projections;
        EXPECT_EQ(normed_flag(inst), 1);
      }
      if (inst.opcode() == isa::Opcode::kRmsNorm && inst.layer() == 0) {
        const auto a = isa::args_of<isa::RmsNormArgs>(inst);
        EXPECT_LE(a.row_end - a.row_begin, 3);  // spread over the SMs
        ++tiles_of_layer0;
      }
    }
    EXPECT_GT(projections, 0);
    EXPECT_EQ(tiles_of_layer0, 2 * 100);  // two norms of 100 tiles of 3 rows
  }
}

INSTANTIATE_TEST_SUITE_P(Tp, NormStageTest, ::testing::Values(1, 2),
                         [](const auto& info) { return "tp" + std::to_string(info.param); });

TEST(NormStageTest, StepsBelowTheThresholdKeepTheNormInTheProjections) {
  const ModelConfig c = small_llama();
  TileConfig tiles = gpu_tile_config(132);
  tiles.norm_stage_tokens = 32;
  for (const int decodes : {31, 32}) {
    ScheduleBuilder builder(c, tiles, 1, {.record_accesses = true});
    absl::StatusOr<Step> step = builder.build(plan(0, decodes), 4096);
    ASSERT_TRUE(step.ok()) << step.status();
    EXPECT_TRUE(verify_step(*step).ok());
    int norms = 0;
    for (const isa::Instruction& inst : step->ranks[0].instructions) {
      norms += inst.opcode() == isa::Opcode::kRmsNorm;
      if (inst.opcode() == isa::Opcode::kQkvRope || inst.opcode() == isa::Opcode::kGateUpSilu) {
        EXPECT_EQ(normed_flag(inst), decodes >= 32 ? 1 : 0);
      }
    }
    EXPECT_EQ(norms > 0, decodes >= 32) << decodes << " tokens";
  }
}

TEST(NormStageTest, TheVerifierNamesAQkvTileThatLostItsWaitForTheNorm) {
  const ModelConfig c = small_llama();
  ScheduleBuilder builder(c, gpu_tile_config(132), 1, {.record_accesses = true});
  absl::StatusOr<Step> step = builder.build(plan(200, 100), 4096);
  ASSERT_TRUE(step.ok()) << step.status();
  ASSERT_TRUE(verify_step(*step).ok());
  // A QKV tile of layer 1 with a wait: its only wait is the norm stage's.
  RankSchedule& rs = step->ranks[0];
  int32_t qkv = -1;
  for (int32_t i = 0; i < static_cast<int32_t>(rs.instructions.size()) && qkv < 0; ++i) {
    const isa::Instruction& inst = rs.instructions[i];
    if (inst.opcode() == isa::Opcode::kQkvRope && inst.layer() == 1 && inst.num_waits() > 0) {
      qkv = i;
    }
  }
  ASSERT_GE(qkv, 0);
  ASSERT_EQ(rs.instructions[qkv].num_waits(), 1);
  rs.instructions[qkv].words[isa::kWordNumWaits] = 0;
  bool named = false;
  for (const Conflict& k : find_conflicts(*step, 1000)) {
    const isa::Instruction& other = step->ranks[k.first.rank].instructions[k.first.index];
    named |= k.second.index == qkv && other.opcode() == isa::Opcode::kRmsNorm &&
             other.layer() == 1 && k.first_writes && !k.second_writes;
  }
  EXPECT_TRUE(named) << "no conflict between the QKV tile and a kRmsNorm tile";
  EXPECT_FALSE(verify_step(*step).ok());
}

struct Outputs {
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;
  int norm_tiles = 0;
};

// Greedy on the CPU interpreter, GPU tiles on 132 virtual SMs, every step verified: a prefill
// of 24 tokens and a decode request, then 5 steps of both decoding.
Outputs run_greedy(int norm_stage_tokens) {
  const ModelConfig c = small_llama();
  CpuBackendOptions o;
  o.num_sms = 132;
  o.default_tiles = false;
  o.tiles = gpu_tile_config(132);
  o.tiles.norm_stage_tokens = norm_stage_tokens;
  o.num_kv_blocks = 16;
  o.verify = true;
  o.execution.round_activations_bf16 = true;
  auto backend = CpuBackend::create(c, dummy_weights(c, DType::kF32, 5), o);
  EXPECT_TRUE(backend.ok()) << backend.status();
  Outputs out;
  if (!backend.ok()) return out;
  StepRunner runner(c, **backend);
  std::vector<int32_t> last = {0, 0};
  for (int s = 0; s < 6; ++s) {
    scheduler::StepPlan p;
    p.step_id = s;
    p.kv_block_size = 16;
    for (int i = 0; i < 2; ++i) {
      scheduler::StepRequest r;
      r.request_id = i + 1;
      const int prompt = i == 0 ? 24 : 1;
      r.first_position = s == 0 ? 0 : prompt + s - 1;
      if (s == 0) {
        for (int t = 0; t < prompt; ++t) r.token_ids.push_back(1 + (t * 37 + i) % 500);
      } else {
        r.token_ids = {last[i]};
      }
      r.block_table = {2 * i, 2 * i + 1};
      r.sample = true;
      r.sampling.temperature = 0.0f;
      r.sampling.logprobs = 3;
      p.requests.push_back(r);
    }
    auto result = runner.execute(p);
    EXPECT_TRUE(result.ok()) << result.status();
    if (!result.ok()) return out;
    for (int i = 0; i < 2; ++i) {
      last[i] = result->sampled[i].token_id;
      out.tokens.push_back(last[i]);
      out.logprobs.push_back(result->sampled[i].logprob);
      for (const auto& [id, lp] : result->sampled[i].top_logprobs) out.logprobs.push_back(lp);
    }
    for (const isa::Instruction& inst : runner.last_step().ranks[0].instructions) {
      out.norm_tiles += inst.opcode() == isa::Opcode::kRmsNorm;
    }
  }
  return out;
}

TEST(NormStageTest, TheCpuInterpreterGivesTheSameTokensAndLogprobsWithNormStages) {
  const Outputs with = run_greedy(1), without = run_greedy(0);
  EXPECT_GT(with.norm_tiles, 0);
  EXPECT_EQ(without.norm_tiles, 0);
  ASSERT_EQ(with.tokens.size(), 12u);
  EXPECT_EQ(with.tokens, without.tokens);
  EXPECT_EQ(with.logprobs, without.logprobs);
}

}  // namespace
}  // namespace megaserve::engine
