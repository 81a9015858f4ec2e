// Split-K of O and down on one rank [SPLIT_K] (engine/isa/isa.h HiddenTileArgs): with the GPU
// tiles, a decode step of 256 requests at Llama-3.1-8B's shape cuts every O and down tile of
// 256 columns into K ranges that cover K exactly once, each into its own partial slot, and a
// kTpReduce with `splits` follows; a prefill of 8192 tokens, a batch of one and tensor
// parallelism are not split. The verifier proves the split steps ordered, and on the CPU
// interpreter a run with split-K gives the tokens and logprobs of one without.
#include <cmath>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "engine/model/weights.h"
#include "engine/planner/schedule_builder.h"
#include "engine/planner/schedule_verifier.h"
#include "engine/step_runner.h"
#include "gtest/gtest.h"

namespace megaserve::engine {
namespace {

using isa::Opcode;

ModelConfig llama_8b_shape() {
  ModelConfig c;
  c.hidden_size = 4096;
  c.intermediate_size = 14336;
  c.num_layers = 2;
  c.num_heads = 32;
  c.num_kv_heads = 8;
  c.head_dim = 128;
  c.vocab_size = 128256;
  c.max_position_embeddings = 16384;
  return c;
}

// `decodes` decode requests (context 20), or one prefill of `prefill` tokens.
scheduler::StepPlan plan(int decodes, int prefill = 0) {
  scheduler::StepPlan p;
  p.kv_block_size = 16;
  int block = 0;
  const auto add = [&](int first_position, int tokens) {
    scheduler::StepRequest r;
    r.request_id = p.requests.size() + 1;
    r.first_position = first_position;
    for (int i = 0; i < tokens; ++i) r.token_ids.push_back((i * 7 + 3) % 500);
    for (int b = 0; b < (first_position + tokens + 15) / 16; ++b) r.block_table.push_back(block++);
    r.sample = true;
    p.requests.push_back(r);
  };
  if (prefill > 0) add(0, prefill);
  for (int i = 0; i < decodes; ++i) add(19, 1);
  return p;
}

absl::StatusOr<Step> build(const ModelConfig& c, int tp, const scheduler::StepPlan& p,
                           bool record = false) {
  ScheduleBuilder builder(c, gpu_tile_config(132), tp, {.record_accesses = record});
  return builder.build(p, 4096);
}

// Per (rows, cols) tile of `op` in layer 0 of rank 0: the K ranges of its splits, by slot.
using TileKey = std::tuple<int, int, int, int>;
std::map<TileKey, std::map<int, std::pair<int, int>>> split_tiles(const Step& step, Opcode op) {
  std::map<TileKey, std::map<int, std::pair<int, int>>> out;
  for (const isa::Instruction& inst : step.ranks[0].instructions) {
    if (inst.opcode() != op || inst.layer() != 0) continue;
    const auto a = isa::args_of<isa::HiddenTileArgs>(inst);
    const TileKey key{a.row_begin, a.row_end, a.col_begin, a.col_end};
    EXPECT_FALSE(out[key].contains(a.partial_slot)) << "two tiles write one slot";
    out[key][a.partial_slot] = {a.k_begin, a.k_end};
  }
  return out;
}

// Reduce tiles of layer `layer` with `splits` (rank 0), and how often each residual element
// they cover is covered.
int reduce_tiles(const Step& step, int layer, int splits, int H, std::vector<int>& cover) {
  int n = 0;
  for (const isa::Instruction& inst : step.ranks[0].instructions) {
    if (inst.opcode() != Opcode::kTpReduce || inst.layer() != layer) continue;
    const auto a = isa::args_of<isa::HiddenTileArgs>(inst);
    if (a.splits != splits) continue;
    ++n;
    for (int r = a.row_begin; r < a.row_end; ++r) {
      for (int c = a.col_begin; c < a.col_end; ++c) ++cover[static_cast<size_t>(r) * H + c];
    }
  }
  return n;
}

TEST(SplitKTest, DecodeStepsSplitOAndDownAlongKAndReduceTheSlots) {
  const ModelConfig c = llama_8b_shape();
  const TileConfig tiles = gpu_tile_config(132);
  ASSERT_EQ(tiles.max_k_splits, 4);
  absl::StatusOr<Step> step = build(c, 1, plan(256), /*record=*/true);
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(step->k_splits, 4);
  const int T = 256, H = c.hidden_size;
  const std::pair<Opcode, int> ops[] = {{Opcode::kOProj, c.q_size()},
                                        {Opcode::kDownProj, c.intermediate_size}};
  for (const auto& [op, K] : ops) {
    const auto tiles_of = split_tiles(*step, op);
    // 2 row tiles x 16 column tiles of 256, each in 4 K ranges: 128 tiles on 132 SMs.
    EXPECT_EQ(tiles_of.size(), 2u * (H / tiles.hidden_cols)) << isa::opcode_name(op);
    for (const auto& [key, splits] : tiles_of) {
      EXPECT_EQ(std::get<3>(key) - std::get<2>(key), tiles.hidden_cols);
      ASSERT_EQ(splits.size(), 4u);
      int k = 0;  // slot s holds range s; together [0, K) once
      for (const auto& [slot, range] : splits) {
        EXPECT_EQ(range.first, k) << isa::opcode_name(op) << " slot " << slot;
        EXPECT_GT(range.second, range.first);
        EXPECT_EQ((range.second - range.first) % 64, 0);
        k = range.second;
      }
      EXPECT_EQ(k, K) << isa::opcode_name(op);
      EXPECT_EQ(splits.begin()->first, 0);
      EXPECT_EQ(splits.rbegin()->first, 3);
    }
  }
  // Layer 0's two reductions (O, down) cover every residual element once each.
  std::vector<int> cover(static_cast<size_t>(T) * H, 0);
  EXPECT_GT(reduce_tiles(*step, 0, 4, H, cover), 0);
  for (int n : cover) ASSERT_EQ(n, 2);
  // Copied layers keep them.
  std::vector<int> cover1(static_cast<size_t>(T) * H, 0);
  EXPECT_GT(reduce_tiles(*step, 1, 4, H, cover1), 0);
  const absl::Status v = verify_step(*step);
  EXPECT_TRUE(v.ok()) << v;
}

TEST(SplitKTest, TheVerifierNamesAReductionThatLostItsWaitForTheSplits) {
  absl::StatusOr<Step> step = build(llama_8b_shape(), 1, plan(256), /*record=*/true);
  ASSERT_TRUE(step.ok()) << step.status();
  RankSchedule& rs = step->ranks[0];
  int32_t reduce = -1;
  for (int32_t i = 0; i < static_cast<int32_t>(rs.instructions.size()) && reduce < 0; ++i) {
    const isa::Instruction& inst = rs.instructions[i];
    if (inst.opcode() == Opcode::kTpReduce && inst.layer() == 1) reduce = i;
  }
  ASSERT_GE(reduce, 0);
  ASSERT_EQ(rs.instructions[reduce].num_waits(), 1);
  rs.instructions[reduce].words[isa::kWordNumWaits] = 0;
  bool named = false;
  for (const Conflict& k : find_conflicts(*step, 1000)) {
    named |= k.second.index == reduce && k.region.buffer == BufferId::kPartial;
  }
  EXPECT_TRUE(named) << "no conflict on the partial slots";
}

// A decode step of 8 (tensor-core tiles, which pay TileConfig::k_block_cycles per k-block):
// O and down split 4 ways, into tiles of 128 columns (split_width: 32 column tiles x 4 K ranges
// = 128 tiles on 132 SMs) instead of 128 unsplit tiles of 32 columns over all of K, with 4x
// the k-blocks and 4x the activation reads each (before: split tiles kept 256 columns, 64
// tiles on 132 SMs, and the step stayed unsplit).
TEST(SplitKTest, SmallDecodeStepsSplitIntoWiderTilesThanTheyWouldNarrowTo) {
  const ModelConfig c = llama_8b_shape();
  const TileConfig tiles = gpu_tile_config(132);
  ASSERT_GT(tiles.k_block_cycles, 0);
  absl::StatusOr<Step> step = build(c, 1, plan(8), /*record=*/true);
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(step->k_splits, 4);
  const int H = c.hidden_size;
  const std::pair<Opcode, int> ops[] = {{Opcode::kOProj, c.q_size()},
                                        {Opcode::kDownProj, c.intermediate_size}};
  for (const auto& [op, K] : ops) {
    const auto tiles_of = split_tiles(*step, op);
    EXPECT_EQ(tiles_of.size(), static_cast<size_t>(H / 128)) << isa::opcode_name(op);
    for (const auto& [key, splits] : tiles_of) {
      EXPECT_EQ(std::get<3>(key) - std::get<2>(key), 128) << isa::opcode_name(op);
      ASSERT_EQ(splits.size(), 4u);
      EXPECT_EQ(splits.rbegin()->second.second, K);
    }
  }
  std::vector<int> cover(static_cast<size_t>(8) * H, 0);
  EXPECT_GT(reduce_tiles(*step, 0, 4, H, cover), 0);
  for (int n : cover) ASSERT_EQ(n, 2);
  const absl::Status v = verify_step(*step);
  EXPECT_TRUE(v.ok()) << v;
}

TEST(SplitKTest, PrefillsSingleRequestsAndTensorParallelismAreNotSplit) {
  const ModelConfig c = llama_8b_shape();
  const auto expect_unsplit = [&](const Step& step, const std::string& what) {
    EXPECT_EQ(step.k_splits, 1) << what;
    for (const RankSchedule& rs : step.ranks) {
      for (const isa::Instruction& inst : rs.instructions) {
        const Opcode op = inst.opcode();
        if (op != Opcode::kOProj && op != Opcode::kDownProj && op != Opcode::kTpReduce) continue;
        const auto a = isa::args_of<isa::HiddenTileArgs>(inst);
        EXPECT_EQ(a.k_end, 0) << what;
        EXPECT_EQ(a.splits, 0) << what;
      }
    }
  };
  // 8192 tokens: 64 row tiles x 16 columns already fill the SMs.
  absl::StatusOr<Step> prefill = build(c, 1, plan(0, 8192));
  ASSERT_TRUE(prefill.ok()) << prefill.status();
  expect_unsplit(*prefill, "prefill of 8192");
  // One token row (the CUDA cores: no k-block cost): narrow columns stream the same bytes on
  // every SM as split tiles would, without a reduction.
  absl::StatusOr<Step> single = build(c, 1, plan(1));
  ASSERT_TRUE(single.ok()) << single.status();
  expect_unsplit(*single, "batch 1");
  // Tensor parallelism already splits K over the ranks.
  absl::StatusOr<Step> tp2 = build(c, 2, plan(256));
  ASSERT_TRUE(tp2.ok()) << tp2.status();
  expect_unsplit(*tp2, "tp 2");
  // And max_k_splits = 1 turns it off.
  TileConfig off = gpu_tile_config(132);
  off.max_k_splits = 1;
  ScheduleBuilder builder(c, off, 1);
  absl::StatusOr<Step> unsplit = builder.build(plan(256), 4096);
  ASSERT_TRUE(unsplit.ok()) << unsplit.status();
  expect_unsplit(*unsplit, "max_k_splits 1");
}

// Hidden 64 but O and down over 1024 inputs: a step's tiles (one row tile, one column tile)
// split in 2, each K range 512.
ModelConfig small_wide_k() {
  ModelConfig c;
  c.hidden_size = 64;
  c.intermediate_size = 1024;
  c.num_layers = 3;  // layer 2 is a copy of layer 1 in a step
  c.num_heads = 8;
  c.num_kv_heads = 4;
  c.head_dim = 128;
  c.vocab_size = 512;
  c.max_position_embeddings = 1024;
  return c;
}

struct Outputs {
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;
  int split_tiles = 0;
};

// Greedy on the CPU interpreter, GPU tiles on 132 virtual SMs, every step verified: a prefill
// of 100 tokens and a decode request, then 4 steps of both decoding. Split-K changes only the
// order of the dot products' additions.
Outputs run_greedy(int max_k_splits) {
  const ModelConfig c = small_wide_k();
  CpuBackendOptions o;
  o.num_sms = 132;
  o.default_tiles = false;
  o.tiles = gpu_tile_config(132);
  o.tiles.max_k_splits = max_k_splits;
  o.num_kv_blocks = 16;
  o.verify = true;
  // fp32 activations: with the GPU's bf16 rounding, the split sums' last-bit differences
  // flip roundings of the next layers' inputs (4e-3 each), and the logprobs moved by ~1e-3.
  o.execution.round_activations_bf16 = false;
  auto backend = CpuBackend::create(c, dummy_weights(c, DType::kF32, 5), o);
  EXPECT_TRUE(backend.ok()) << backend.status();
  Outputs out;
  if (!backend.ok()) return out;
  StepRunner runner(c, **backend);
  std::vector<int32_t> last = {0, 0};
  for (int s = 0; s < 5; ++s) {
    scheduler::StepPlan p;
    p.step_id = s;
    p.kv_block_size = 16;
    for (int i = 0; i < 2; ++i) {
      scheduler::StepRequest r;
      r.request_id = i + 1;
      const int prompt = i == 0 ? 100 : 1;
      r.first_position = s == 0 ? 0 : prompt + s - 1;
      if (s == 0) {
        for (int t = 0; t < prompt; ++t) r.token_ids.push_back(1 + (t * 37 + i) % 500);
      } else {
        r.token_ids = {last[i]};
      }
      for (int b = 0; b < 7; ++b) r.block_table.push_back(7 * i + b);
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
      const Opcode op = inst.opcode();
      if (op == Opcode::kOProj || op == Opcode::kDownProj) {
        out.split_tiles += isa::args_of<isa::HiddenTileArgs>(inst).k_end > 0;
      }
    }
  }
  return out;
}

TEST(SplitKTest, TheCpuInterpreterGivesTheSameTokensAndLogprobsWithSplitK) {
  const Outputs split = run_greedy(4), whole = run_greedy(1);
  // Every step (the prefill, then four of two decode rows): O and down of 3 layers, 2 splits
  // each.
  EXPECT_EQ(split.split_tiles, 5 * 3 * 2 * 2);
  EXPECT_EQ(whole.split_tiles, 0);
  ASSERT_EQ(split.tokens.size(), 10u);
  EXPECT_EQ(split.tokens, whole.tokens);
  ASSERT_EQ(split.logprobs.size(), whole.logprobs.size());
  for (size_t i = 0; i < split.logprobs.size(); ++i) {
    EXPECT_NEAR(split.logprobs[i], whole.logprobs[i], 1e-4) << i;
  }
}

}  // namespace
}  // namespace megaserve::engine
