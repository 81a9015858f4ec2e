// ScheduleBuilder, deadlock invariant and static verifier on hand-written StepPlans: real
// schedules verify (TP 1/2/4, CPU and 132-SM GPU tiles, KV splits, mixed prefill and decode);
// a removed dependency is named by the verifier; a planted order violation is caught by the
// deadlock check; barrier totals carry over between steps; bad plans are rejected by name.
#include <algorithm>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/planner/schedule_builder.h"
#include "engine/planner/schedule_verifier.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace megaserve::engine {
namespace {

using ::testing::HasSubstr;

ModelConfig small_llama() {
  ModelConfig c;
  c.hidden_size = 64;
  c.intermediate_size = 172;
  c.num_layers = 4;  // layers 2 and 3 are replicated from layer 1 by the builder
  c.num_heads = 8;
  c.num_kv_heads = 4;
  c.head_dim = 8;
  c.vocab_size = 512;
  c.max_position_embeddings = 512;
  return c;
}

// Llama-3.1-8B's shape with `layers` layers (layers 2.. are copies of layer 1 in a step).
ModelConfig llama_8b_shape(int layers) {
  ModelConfig c;
  c.hidden_size = 4096;
  c.intermediate_size = 14336;
  c.num_layers = layers;
  c.num_heads = 32;
  c.num_kv_heads = 8;
  c.head_dim = 128;
  c.vocab_size = 128256;
  c.max_position_embeddings = 4096;
  return c;
}

scheduler::StepRequest request(uint64_t id, int first_position, int num_tokens, int first_block,
                               bool sample) {
  scheduler::StepRequest r;
  r.request_id = id;
  r.first_position = first_position;
  for (int i = 0; i < num_tokens; ++i) r.token_ids.push_back((i * 7 + 3) % 512);
  const int blocks = (first_position + num_tokens + 15) / 16;
  for (int b = 0; b < blocks; ++b) r.block_table.push_back(first_block + b);
  r.sample = sample;
  return r;
}

// Prefills (one crossing KV splits of 32 keys), chunks on a cached prefix, and decodes with
// short and long contexts.
scheduler::StepPlan mixed_plan(uint64_t step_id = 0) {
  scheduler::StepPlan p;
  p.step_id = step_id;
  p.kv_block_size = 16;
  p.requests.push_back(request(1, 0, 40, 0, true));    // prefill, 2 splits
  p.requests.push_back(request(2, 100, 1, 10, true));  // decode, 4 splits
  p.requests.push_back(request(3, 20, 5, 20, false));  // middle chunk of a prefill
  p.requests.push_back(request(4, 3, 1, 30, true));    // short decodes, batched
  p.requests.push_back(request(5, 7, 1, 31, true));
  p.requests.push_back(request(6, 9, 1, 32, true));
  return p;
}

struct BuildCase {
  int tp;
  bool gpu_tiles;
  int num_sms;
};

class ScheduleVerifyTest : public ::testing::TestWithParam<BuildCase> {};

TEST_P(ScheduleVerifyTest, RealSchedulesVerify) {
  const BuildCase c = GetParam();
  TileConfig tiles = c.gpu_tiles ? gpu_tile_config(c.num_sms) : cpu_tile_config(c.num_sms);
  if (c.gpu_tiles) tiles.kv_split_tokens = 32;  // keep the split path in play
  ScheduleBuilder builder(small_llama(), tiles, c.tp, {.record_accesses = true});
  for (uint64_t s = 0; s < 3; ++s) {
    absl::StatusOr<Step> step = builder.build(mixed_plan(s), 64);
    ASSERT_TRUE(step.ok()) << step.status();
    EXPECT_TRUE(check_deadlock_free(*step).ok());
    const absl::Status v = verify_step(*step);
    EXPECT_TRUE(v.ok()) << v;
    ASSERT_EQ(step->ranks.size(), static_cast<size_t>(c.tp));
    for (const RankSchedule& rs : step->ranks) {
      EXPECT_EQ(rs.num_queues(), c.num_sms);
      int merges = 0, splits = 0;
      for (const isa::Instruction& inst : rs.instructions) {
        merges += inst.opcode() == isa::Opcode::kAttentionMerge;
        splits += inst.opcode() == isa::Opcode::kAttention &&
                  isa::args_of<isa::AttentionArgs>(inst).split >= 0;
      }
      EXPECT_GT(merges, 0);
      EXPECT_GT(splits, 0);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Builds, ScheduleVerifyTest,
                         ::testing::Values(BuildCase{1, false, 1}, BuildCase{1, false, 8},
                                           BuildCase{2, false, 3}, BuildCase{4, false, 8},
                                           BuildCase{1, true, 132}, BuildCase{4, true, 132}),
                         [](const auto& info) {
                           return "tp" + std::to_string(info.param.tp) +
                                  (info.param.gpu_tiles ? "_gpu" : "_cpu") + "_sms" +
                                  std::to_string(info.param.num_sms);
                         });

// Finds the first instruction of `op` in `layer` on `rank` that has a wait.
InstructionRef find(const Step& step, int rank, isa::Opcode op, int layer) {
  const RankSchedule& rs = step.ranks[rank];
  for (int32_t i = 0; i < static_cast<int32_t>(rs.instructions.size()); ++i) {
    if (rs.instructions[i].opcode() == op && rs.instructions[i].layer() == layer &&
        rs.instructions[i].num_waits() > 0) {
      return {rank, i};
    }
  }
  return {-1, -1};
}

class ScheduleVerifierLayerTest : public ::testing::TestWithParam<int> {};

// Layer 1 is tiled and placed; layer 3 is a copy of layer 1 with shifted barriers.
TEST_P(ScheduleVerifierLayerTest, NamesTheTwoInstructionsOfARemovedDependency) {
  const int layer = GetParam();
  ScheduleBuilder builder(small_llama(), cpu_tile_config(8), 1, {.record_accesses = true});
  absl::StatusOr<Step> step = builder.build(mixed_plan(), 64);
  ASSERT_TRUE(step.ok()) << step.status();
  ASSERT_TRUE(verify_step(*step).ok());
  // An attention tile that is first of its stage on its SM: without its wait, nothing
  // orders it after the QKV tiles of other SMs.
  InstructionRef attention{-1, -1};
  const RankSchedule& rs = step->ranks[0];
  for (int q = 0; q < rs.num_queues() && attention.index < 0; ++q) {
    for (int32_t i = rs.queue_begin[q] + 1; i < rs.queue_begin[q + 1]; ++i) {
      if (rs.instructions[i].opcode() == isa::Opcode::kAttention &&
          rs.instructions[i].layer() == layer &&
          rs.instructions[i - 1].opcode() == isa::Opcode::kQkvRope) {
        attention = {0, i};
        break;
      }
    }
  }
  ASSERT_GE(attention.index, 0);
  isa::Instruction& inst = step->ranks[0].instructions[attention.index];
  ASSERT_EQ(inst.num_waits(), 1);
  inst.words[isa::kWordNumWaits] = 0;            // forget "all QKV tiles of this layer are done"
  ASSERT_TRUE(check_deadlock_free(*step).ok());  // still runnable, just racy

  const std::vector<Conflict> conflicts = find_conflicts(*step, 1000);
  const std::string attention_name = describe_instruction(*step, attention);
  bool named = false;
  for (const Conflict& c : conflicts) {
    const isa::Instruction& other = step->ranks[c.first.rank].instructions[c.first.index];
    if (c.second.index == attention.index && other.opcode() == isa::Opcode::kQkvRope &&
        other.layer() == layer && c.first_writes && !c.second_writes) {
      named = true;
    }
  }
  EXPECT_TRUE(named) << "no conflict between " << attention_name << " and a QKV tile";
  const absl::Status s = verify_step(*step);
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr(attention_name + " reads"));
  EXPECT_THAT(std::string(s.message()),
              HasSubstr(absl::StrCat("that kQkvRope layer ", layer, " (")));
}

INSTANTIATE_TEST_SUITE_P(Layers, ScheduleVerifierLayerTest, ::testing::Values(1, 3));

TEST(ScheduleVerifierTest, NamesACrossRankDependency) {
  ScheduleBuilder builder(small_llama(), cpu_tile_config(3), 2, {.record_accesses = true});
  absl::StatusOr<Step> step = builder.build(mixed_plan(), 64);
  ASSERT_TRUE(step.ok()) << step.status();
  ASSERT_TRUE(verify_step(*step).ok());
  const InstructionRef reduce = find(*step, 1, isa::Opcode::kTpReduce, 0);
  ASSERT_GE(reduce.index, 0);
  step->ranks[1].instructions[reduce.index].words[isa::kWordNumWaits] = 0;
  const absl::Status s = verify_step(*step);
  EXPECT_FALSE(s.ok());
  // It reads rank 0's partial slot, written by rank 0's O-projection tiles of layer 0.
  EXPECT_THAT(std::string(s.message()),
              HasSubstr(describe_instruction(*step, reduce) + " reads tp_partial of rank 0"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("that kOProj layer 0 ("));
}

// A wait for fewer than all of a barrier's signals is runnable (the deadlock check accepts
// it: enough signallers come earlier) but orders no particular signaller before the waiter,
// so the verifier must report the reads it no longer covers.
TEST(ScheduleVerifierTest, AWaitForSomeSignalsOrdersNoneInParticular) {
  ScheduleBuilder builder(small_llama(), cpu_tile_config(8), 1, {.record_accesses = true});
  absl::StatusOr<Step> step = builder.build(mixed_plan(), 64);
  ASSERT_TRUE(step.ok()) << step.status();
  ASSERT_TRUE(verify_step(*step).ok());
  // Every O-projection tile of layer 0 now needs one attention tile (and merge) fewer.
  RankSchedule& rs = step->ranks[0];
  const InstructionRef attention = find(*step, 0, isa::Opcode::kAttention, 0);
  ASSERT_GE(attention.index, 0);
  const int32_t attention_barrier = rs.instructions[attention.index].signal_barrier(0);
  std::vector<InstructionRef> lowered;
  for (int32_t i = 0; i < static_cast<int32_t>(rs.instructions.size()); ++i) {
    isa::Instruction& inst = rs.instructions[i];
    if (inst.opcode() != isa::Opcode::kOProj || inst.layer() != 0) continue;
    ASSERT_EQ(inst.wait_barrier(0), attention_barrier);
    // The second wait, on the merges (which wait for every attention tile), would still
    // order them all: lower it too.
    for (int w = 0; w < inst.num_waits(); ++w) inst.words[isa::kWordWaits + 2 * w + 1] -= 1;
    lowered.push_back({0, i});
  }
  ASSERT_FALSE(lowered.empty());
  EXPECT_TRUE(check_deadlock_free(*step).ok());
  const absl::Status s = verify_step(*step);
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr("kOProj layer 0 ("));
  // An O tile whose SM ran a merge before it is still ordered after every attention tile
  // (that merge waited for all of them); what is lost is the order after the merges.
  bool from_merge = false;
  for (const Conflict& c : find_conflicts(*step, 100000)) {
    const isa::Instruction& first = step->ranks[0].instructions[c.first.index];
    const isa::Instruction& second = step->ranks[0].instructions[c.second.index];
    from_merge = from_merge || (second.opcode() == isa::Opcode::kOProj &&
                                first.opcode() == isa::Opcode::kAttentionMerge && c.first_writes);
  }
  EXPECT_TRUE(from_merge);
}

TEST(ScheduleDeadlockTest, FiresOnAWaitNothingEarlierSatisfies) {
  ScheduleBuilder builder(small_llama(), cpu_tile_config(3), 1);
  absl::StatusOr<Step> step = builder.build(mixed_plan(), 64);
  ASSERT_TRUE(step.ok());
  const InstructionRef o = find(*step, 0, isa::Opcode::kOProj, 0);
  isa::Instruction& inst = step->ranks[0].instructions[o.index];
  inst.words[isa::kWordWaits + 1] += 1;  // one more signal than the stage gives
  const absl::Status s = check_deadlock_free(*step);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()), HasSubstr(describe_instruction(*step, o)));
}

TEST(ScheduleDeadlockTest, FiresOnAQueueOutOfGlobalOrder) {
  ScheduleBuilder builder(small_llama(), cpu_tile_config(2), 1);
  absl::StatusOr<Step> step = builder.build(mixed_plan(), 64);
  ASSERT_TRUE(step.ok());
  // Move queue 0's last instruction (an LM-head or sample tile) to the queue's front: the
  // queue is no longer a subsequence of the global order.
  RankSchedule& rs = step->ranks[0];
  const int32_t b = rs.queue_begin[0], e = rs.queue_begin[1];
  ASSERT_GT(e - b, 2);
  std::rotate(rs.instructions.begin() + b, rs.instructions.begin() + e - 1,
              rs.instructions.begin() + e);
  std::rotate(rs.order.begin() + b, rs.order.begin() + e - 1, rs.order.begin() + e);
  for (InstructionRef& ref : step->global_order) {
    if (ref.rank == 0 && ref.index >= b && ref.index < e)
      ref.index = ref.index == e - 1 ? b : ref.index + 1;
  }
  const absl::Status s = check_deadlock_free(*step);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()), HasSubstr("against the global order"));
}

TEST(ScheduleBuilderTest, BarrierTotalsCarryAcrossSteps) {
  ScheduleBuilder builder(small_llama(), cpu_tile_config(3), 2);
  builder.set_barrier_origin(0xFFFFFFF0u);  // totals wrap within the first step
  absl::StatusOr<Step> first = builder.build(mixed_plan(0), 64);
  absl::StatusOr<Step> second = builder.build(mixed_plan(1), 64);
  ASSERT_TRUE(first.ok() && second.ok());
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(first->ranks[r].barrier_begin,
              std::vector<uint32_t>(builder.num_barriers(), 0xFFFFFFF0u));
    EXPECT_EQ(second->ranks[r].barrier_begin, first->ranks[r].barrier_end);
    // Same plan, same increments: each barrier moves by the same amount in both steps.
    for (int b = 0; b < builder.num_barriers(); ++b) {
      EXPECT_EQ(first->ranks[r].barrier_end[b] - first->ranks[r].barrier_begin[b],
                second->ranks[r].barrier_end[b] - second->ranks[r].barrier_begin[b]);
    }
  }
  EXPECT_TRUE(check_deadlock_free(*second).ok());
}

TEST(ScheduleBuilderTest, PlacementBalancesEstimatedCycles) {
  scheduler::StepPlan plan;
  plan.kv_block_size = 16;
  for (int i = 0; i < 64; ++i) plan.requests.push_back(request(i, 50 + i, 1, i * 8, true));
  TileConfig tiles = cpu_tile_config(8);
  ScheduleBuilder builder(small_llama(), tiles, 1);
  absl::StatusOr<Step> step = builder.build(plan, 1024);
  ASSERT_TRUE(step.ok());
  const RankSchedule& rs = step->ranks[0];
  std::vector<double> load(8, 0.0);
  double total = 0, largest = 0;
  for (int q = 0; q < 8; ++q) {
    for (int32_t i = rs.queue_begin[q]; i < rs.queue_begin[q + 1]; ++i) load[q] += rs.cost[i];
    total += load[q];
  }
  for (int i = 0; i < static_cast<int>(rs.cost.size()); ++i)
    largest = std::max(largest, rs.cost[i]);
  // Greedy longest-first list scheduling: no queue exceeds the mean by more than one tile.
  for (double l : load) EXPECT_LE(l, total / 8 + largest);
}

// Every stage waits for all of the one it reads, so a step lasts the sum of its stages'
// makespans: each stage (opcode, layer) is balanced on its own, no SM more than one tile over
// the stage's mean. (Balancing the load carried over from earlier stages put 3x the mean of a
// 1024-token prefill's QKV on one SM.) Llama-3.1-8B shape, 132 SMs, a prefill with decodes;
// layer 2 is a copy of layer 1.
TEST(ScheduleBuilderTest, EveryStageIsBalancedOnItsOwn) {
  const ModelConfig c = llama_8b_shape(3);
  scheduler::StepPlan plan;
  plan.kv_block_size = 16;
  plan.requests.push_back(request(1, 0, 1024, 0, true));
  for (int i = 0; i < 64; ++i) plan.requests.push_back(request(i + 2, 300, 1, 64 + 20 * i, true));
  ScheduleBuilder builder(c, gpu_tile_config(132), 1);
  absl::StatusOr<Step> step = builder.build(plan, 64 + 20 * 64);
  ASSERT_TRUE(step.ok()) << step.status();
  const RankSchedule& rs = step->ranks[0];
  struct Stage {
    std::vector<double> load = std::vector<double>(132, 0.0);
    double largest = 0;
  };
  std::map<std::pair<int, int>, Stage> stages;  // (layer, opcode)
  for (int q = 0; q < rs.num_queues(); ++q) {
    for (int32_t i = rs.queue_begin[q]; i < rs.queue_begin[q + 1]; ++i) {
      Stage& st =
          stages[{rs.instructions[i].layer(), static_cast<int>(rs.instructions[i].opcode())}];
      st.load[q] += rs.cost[i];
      st.largest = std::max(st.largest, rs.cost[i]);
    }
  }
  EXPECT_GE(stages.size(), 3u * 6u);
  for (const auto& [key, st] : stages) {
    double total = 0, most = 0;
    for (double l : st.load) {
      total += l;
      most = std::max(most, l);
    }
    EXPECT_LE(most, total / 132 + st.largest + 1e-6)
        << "layer " << key.first << " " << isa::opcode_name(static_cast<isa::Opcode>(key.second));
  }
}

TEST(ScheduleBuilderTest, RejectsBadPlansByName) {
  ScheduleBuilder builder(small_llama(), cpu_tile_config(1), 1);
  scheduler::StepPlan plan = mixed_plan();
  plan.requests[2].block_table.pop_back();
  absl::StatusOr<Step> s = builder.build(plan, 64);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("request 3: block_table has 1 blocks"));

  plan = mixed_plan();
  plan.requests[1].token_ids[0] = 512;
  s = builder.build(plan, 64);
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("request 2: token id 512"));

  plan = mixed_plan();
  plan.requests[0].block_table[1] = 64;
  s = builder.build(plan, 64);
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("block_table[1] = 64 outside [0, 64)"));

  plan = mixed_plan();
  plan.requests[4].token_ids.clear();
  s = builder.build(plan, 64);
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("request 5: no input tokens"));
  // A rejected plan does not advance the barriers.
  EXPECT_EQ(builder.barrier_totals()[0], std::vector<uint32_t>(builder.num_barriers(), 0u));
}

TEST(ScheduleBuilderTest, RejectsAnEmptyTileOrTensorParallelMismatch) {
  TileConfig tiles = cpu_tile_config(2);
  tiles.ffn_cols = 0;
  ScheduleBuilder zero_tiles(small_llama(), tiles, 1);
  EXPECT_THAT(std::string(zero_tiles.build(mixed_plan(), 64).status().message()),
              HasSubstr("TileConfig.ffn_cols = 0"));
  ScheduleBuilder tp3(small_llama(), cpu_tile_config(2), 3);
  EXPECT_THAT(std::string(tp3.build(mixed_plan(), 64).status().message()),
              HasSubstr("tensor_parallel 3 does not divide num_heads 8"));
}

TEST(ScheduleBuilderTest, MetadataIsTheCsrBlockTable) {
  ScheduleBuilder builder(small_llama(), cpu_tile_config(1), 1);
  absl::StatusOr<Step> step = builder.build(mixed_plan(), 64);
  ASSERT_TRUE(step.ok());
  const StepMetadata& m = step->meta;
  EXPECT_EQ(m.num_tokens, 40 + 1 + 5 + 1 + 1 + 1);
  EXPECT_EQ(m.query_start, (std::vector<int32_t>{0, 40, 41, 46, 47, 48, 49}));
  EXPECT_EQ(m.context_lens, (std::vector<int32_t>{40, 101, 25, 4, 8, 10}));
  // Blocks: 40 -> 3 (last holds 8), 101 -> 7 (last 5), 25 -> 2 (last 9), then one each.
  EXPECT_EQ(m.block_indptr, (std::vector<int32_t>{0, 3, 10, 12, 13, 14, 15}));
  EXPECT_EQ(m.last_block_len, (std::vector<int32_t>{8, 5, 9, 4, 8, 10}));
  EXPECT_EQ(std::vector<int32_t>(m.block_indices.begin() + 3, m.block_indices.begin() + 10),
            (std::vector<int32_t>{10, 11, 12, 13, 14, 15, 16}));
  EXPECT_EQ(m.sample_rows, (std::vector<int32_t>{39, 40, 46, 47, 48}));
  EXPECT_EQ(m.positions[40], 100);
  EXPECT_EQ(m.positions[41], 20);
  EXPECT_EQ(m.num_splits, (std::vector<int32_t>{2, 4, 0, 0, 0, 0}));
}

}  // namespace
}  // namespace megaserve::engine

namespace megaserve::engine {
namespace {

// The column tiles of one opcode in layer 0 (LM head: its layer -1) of a step: how many, and
// the distinct widths. Their widths must add up to `n` columns (QKV: heads) per row tile.
struct ColumnTiles {
  int count = 0;
  std::set<int> widths;
};

ColumnTiles column_tiles(const Step& step, isa::Opcode op, int n, int row_tiles) {
  ColumnTiles out;
  int64_t covered = 0;
  for (const isa::Instruction& inst : step.ranks[0].instructions) {
    if (inst.opcode() != op || inst.layer() != (op == isa::Opcode::kLmHead ? -1 : 0)) continue;
    int begin = 0, end = 0;
    if (op == isa::Opcode::kQkvRope) {  // in output dims (head_dim 128)
      const auto a = isa::args_of<isa::QkvRopeArgs>(inst);
      end = 2 * isa::qkv_tile_pairs(a, 64);
    } else if (op == isa::Opcode::kGateUpSilu) {
      const auto a = isa::args_of<isa::GateUpArgs>(inst);
      begin = a.col_begin, end = a.col_end;
    } else if (op == isa::Opcode::kLmHead) {
      const auto a = isa::args_of<isa::LmHeadArgs>(inst);
      begin = a.col_begin, end = a.col_end;
    } else {
      const auto a = isa::args_of<isa::HiddenTileArgs>(inst);
      begin = a.col_begin, end = a.col_end;
    }
    ++out.count;
    out.widths.insert(end - begin);
    covered += end - begin;
  }
  EXPECT_EQ(covered, static_cast<int64_t>(n) * row_tiles) << "opcode " << static_cast<int>(op);
  return out;
}

// Llama-3.1-8B's shape at batch 1 on 132 SMs: with balance_columns, every projection stage
// has about one tile per SM: QKV 3,072 RoPE pairs / 24 = 128 tiles, O and down 4096 / 32 =
// 128, gate/up 14336 / 112 = 128, LM head 128256 / 976 = 132 (the last 400 wide); without it
// (the CPU tiles' default), the configured widths. 256 decode rows (4 row tiles) keep the
// configured 128-column O tiles (4 x 32 = 128 tiles, one round already).
TEST(ScheduleBuilderTest, BalancedColumnTilesSpreadSmallStepsOverEverySm) {
  const ModelConfig c = llama_8b_shape(2);
  const TileConfig tiles = gpu_tile_config(132);
  const auto build = [&](const TileConfig& t, int batch) {
    scheduler::StepPlan plan;
    plan.kv_block_size = 16;
    for (int i = 0; i < batch; ++i) plan.requests.push_back(request(i + 1, 20, 1, 2 * i, true));
    ScheduleBuilder builder(c, t, 1);
    absl::StatusOr<Step> step = builder.build(plan, 2 * batch + 2);
    EXPECT_TRUE(step.ok()) << step.status();
    return *std::move(step);
  };
  using isa::Opcode;
  const Step balanced = build(tiles, 1);
  // 48 one-head QKV tiles would leave 84 SMs idle: ranges of 24 RoPE pairs over the heads
  // (multiples of 8 on the CUDA cores), some across two heads.
  const ColumnTiles qkv = column_tiles(balanced, Opcode::kQkvRope, 48 * 128, 1);
  EXPECT_EQ(qkv.count, 128);
  EXPECT_THAT(qkv.widths, ::testing::ElementsAre(48));
  int across = 0;
  for (const isa::Instruction& inst : balanced.ranks[0].instructions) {
    if (inst.opcode() != Opcode::kQkvRope || inst.layer() != 0) continue;
    const auto a = isa::args_of<isa::QkvRopeArgs>(inst);
    across += a.head_end - a.head_begin > 1 ? 1 : 0;
  }
  EXPECT_GT(across, 0);
  // 16 rows take wgmma passes, whose 16-row weight groups stay inside one half of one head:
  // ranges of 32 pairs, 96 tiles.
  const ColumnTiles qkv16 = column_tiles(build(tiles, 16), Opcode::kQkvRope, 48 * 128, 1);
  EXPECT_EQ(qkv16.count, 96);
  EXPECT_THAT(qkv16.widths, ::testing::ElementsAre(64));
  for (Opcode op : {Opcode::kOProj, Opcode::kDownProj}) {
    const ColumnTiles t = column_tiles(balanced, op, 4096, 1);
    EXPECT_EQ(t.count, 128);
    EXPECT_THAT(t.widths, ::testing::ElementsAre(32));
  }
  const ColumnTiles gate_up = column_tiles(balanced, Opcode::kGateUpSilu, 14336, 1);
  EXPECT_EQ(gate_up.count, 128);
  EXPECT_THAT(gate_up.widths, ::testing::ElementsAre(112));
  const ColumnTiles lm = column_tiles(balanced, Opcode::kLmHead, 128256, 1);
  EXPECT_EQ(lm.count, 132);
  EXPECT_THAT(lm.widths, ::testing::ElementsAre(400, 976));

  TileConfig fixed = tiles;
  fixed.balance_columns = false;
  fixed.max_k_splits = 1;  // else O and down, 16 wide tiles on 132 SMs, split K instead
  const Step plain = build(fixed, 1);
  // The config's own widths.
  EXPECT_EQ(column_tiles(plain, Opcode::kOProj, 4096, 1).count, 4096 / tiles.hidden_cols);
  EXPECT_EQ(column_tiles(plain, Opcode::kGateUpSilu, 14336, 1).count, 14336 / tiles.ffn_cols);
  EXPECT_EQ(column_tiles(plain, Opcode::kLmHead, 128256, 1).count, 126);
  EXPECT_FALSE(cpu_tile_config(132).balance_columns);

  // 256 requests are two row tiles of 128: without split-K (which takes O and down there:
  // split_k_test.cc), 64 columns make one round of 128 tiles (32 would make two rounds of the
  // same columns per SM; ties go to the wider).
  ASSERT_EQ(tiles.token_rows, 128);
  TileConfig unsplit = tiles;
  unsplit.max_k_splits = 1;
  const Step batch256 = build(unsplit, 256);
  const ColumnTiles o256 = column_tiles(batch256, Opcode::kOProj, 4096, 2);
  EXPECT_EQ(o256.count, 2 * 64);
  EXPECT_THAT(o256.widths, ::testing::ElementsAre(64));
}

// Short decode requests share an attention tile only as far as every SM keeps one
// (schedule_tiles.cc): at batch 8 of an 8-kv-head model on 132 SMs, 64 tiles of one request;
// at 256, tiles of attention_batch_requests (8); on 8 SMs, batch 8 in 8 tiles of 8 requests.
TEST(ScheduleBuilderTest, AttentionTilesShareRequestsOnlyToFillTheSms) {
  const ModelConfig c = llama_8b_shape(1);
  const auto attention_tiles = [&](int num_sms, int batch) {
    scheduler::StepPlan plan;
    plan.kv_block_size = 16;
    for (int i = 0; i < batch; ++i) plan.requests.push_back(request(i + 1, 300, 1, 20 * i, true));
    ScheduleBuilder builder(c, gpu_tile_config(num_sms), 1);
    absl::StatusOr<Step> step = builder.build(plan, 20 * batch + 2);
    EXPECT_TRUE(step.ok()) << step.status();
    std::vector<int> requests_per_tile;
    for (const isa::Instruction& inst : step->ranks[0].instructions) {
      if (inst.opcode() != isa::Opcode::kAttention) continue;
      const auto a = isa::args_of<isa::AttentionArgs>(inst);
      EXPECT_LT(a.split, 0);
      requests_per_tile.push_back(a.request_end - a.request_begin);
    }
    return requests_per_tile;
  };
  EXPECT_THAT(attention_tiles(132, 8), ::testing::Each(1));
  EXPECT_EQ(attention_tiles(132, 8).size(), 64u);
  EXPECT_THAT(attention_tiles(132, 32), ::testing::Each(2));   // 256 items: 2 per tile
  EXPECT_THAT(attention_tiles(132, 256), ::testing::Each(8));  // capped at 8
  EXPECT_EQ(attention_tiles(132, 256).size(), 256u);
  EXPECT_THAT(attention_tiles(8, 8), ::testing::Each(8));
  EXPECT_EQ(attention_tiles(8, 8).size(), 8u);
}

// A prefill's projection tiles are dealt so that an SM's next tile of an op usually covers the
// same rows as its last (row groups that divide the SM count): the kernels then reuse the
// activations and row scales they staged (kernels/act_cache.h). At 132 SMs QKV's groups of 16
// row tiles gave every SM a different row block at every tile.
TEST(ScheduleBuilderTest, AnSmsNextProjectionTileKeepsItsRows) {
  const ModelConfig c = llama_8b_shape(1);
  scheduler::StepPlan plan;
  plan.kv_block_size = 16;
  plan.requests.push_back(request(1, 0, 2048, 0, true));
  ScheduleBuilder builder(c, gpu_tile_config(132), 1);
  absl::StatusOr<Step> step = builder.build(plan, 2048 / 16 + 1);
  ASSERT_TRUE(step.ok()) << step.status();
  const RankSchedule& rs = step->ranks[0];
  // At least this share (percent) of consecutive tile pairs keep their rows: before row groups
  // divided the SM count, QKV 0 of 636 pairs, gate/up 1,100 of 1,660; now 396 and 1,528.
  const std::pair<isa::Opcode, int> ops[] = {{isa::Opcode::kQkvRope, 55},
                                             {isa::Opcode::kGateUpSilu, 85}};
  for (const auto& [op, percent] : ops) {
    int pairs = 0, same = 0;
    for (int q = 0; q < rs.num_queues(); ++q) {
      const isa::Instruction* last = nullptr;
      for (int32_t i = rs.queue_begin[q]; i < rs.queue_begin[q + 1]; ++i) {
        const isa::Instruction& inst = rs.instructions[i];
        if (inst.opcode() != op) continue;
        if (last != nullptr && last->layer() == inst.layer()) {
          ++pairs;
          same += last->args()[0] == inst.args()[0];  // row_begin
        }
        last = &inst;
      }
    }
    ASSERT_GT(pairs, 132) << isa::opcode_name(op);
    EXPECT_GE(same, pairs * percent / 100)
        << isa::opcode_name(op) << ": " << same << " of " << pairs;
  }
}

}  // namespace
}  // namespace megaserve::engine
