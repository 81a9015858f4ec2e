// The schedule builder's shortcuts against straightforward paths.
// - Attention tiles of kv heads 1.. are copies of kv head 0's when no regions are recorded:
//   a build with regions recorded (every tile made afresh) must give the same Step, word for
//   word (instructions, queues, order, costs, barriers, metadata), on 132-SM GPU tiles with
//   batched, single-request and KV-split attention tiles.
// - check_deadlock_free's fast pass may only accept what the invariant allows: on built steps
//   and on many mutated copies (wait targets and barriers, signals, queue order), its verdict
//   must equal a straight-line check written here (walk the global order, count signals).
#include <cstring>
#include <random>
#include <utility>
#include <vector>

#include "engine/planner/schedule_builder.h"
#include "gtest/gtest.h"

namespace megaserve::engine {
namespace {

ModelConfig model() {
  ModelConfig c;
  c.hidden_size = 256;
  c.intermediate_size = 512;
  c.num_layers = 5;  // layers 2..4 are copies of layer 1
  c.num_heads = 8;
  c.num_kv_heads = 4;
  c.head_dim = 32;
  c.vocab_size = 1000;
  c.max_position_embeddings = 8192;
  return c;
}

// Decode requests (some past 2048 keys, so split) and a few prefill chunks.
scheduler::StepPlan plan(int requests, uint64_t step) {
  scheduler::StepPlan p;
  p.step_id = step;
  p.kv_block_size = 16;
  int next_block = 0;
  for (int i = 0; i < requests; ++i) {
    scheduler::StepRequest r;
    r.request_id = i;
    r.first_position = (i * 397 + static_cast<int>(step) * 3) % 5000;
    const int tokens = i % 7 == 3 ? 1 + (i * 13) % 90 : 1;
    for (int t = 0; t < tokens; ++t) r.token_ids.push_back((i + t) % 1000);
    const int blocks = (r.context_length() + 15) / 16;
    for (int b = 0; b < blocks; ++b) r.block_table.push_back(next_block++);
    r.sample = i % 4 != 1;
    r.banned_token_ids = {i % 1000};
    r.seed = 11 * i;
    r.output_token_index = i;
    p.requests.push_back(std::move(r));
  }
  return p;
}

void expect_same_step(const Step& a, const Step& b) {
  ASSERT_EQ(a.ranks.size(), b.ranks.size());
  EXPECT_EQ(a.step_id, b.step_id);
  EXPECT_EQ(a.num_sms, b.num_sms);
  for (size_t r = 0; r < a.ranks.size(); ++r) {
    const RankSchedule& x = a.ranks[r];
    const RankSchedule& y = b.ranks[r];
    ASSERT_EQ(x.instructions.size(), y.instructions.size()) << "rank " << r;
    for (size_t i = 0; i < x.instructions.size(); ++i) {
      ASSERT_EQ(0, std::memcmp(x.instructions[i].words, y.instructions[i].words,
                               sizeof(x.instructions[i].words)))
          << "rank " << r << " instruction " << i;
    }
    EXPECT_EQ(x.queue_begin, y.queue_begin);
    EXPECT_EQ(x.order, y.order);
    EXPECT_EQ(x.cost, y.cost);
    EXPECT_EQ(x.barrier_begin, y.barrier_begin);
    EXPECT_EQ(x.barrier_end, y.barrier_end);
  }
  ASSERT_EQ(a.global_order.size(), b.global_order.size());
  for (size_t g = 0; g < a.global_order.size(); ++g) {
    ASSERT_EQ(a.global_order[g].rank, b.global_order[g].rank) << g;
    ASSERT_EQ(a.global_order[g].index, b.global_order[g].index) << g;
  }
  const StepMetadata& m = a.meta;
  const StepMetadata& n = b.meta;
  EXPECT_EQ(m.num_tokens, n.num_tokens);
  EXPECT_EQ(m.num_split_rows, n.num_split_rows);
  EXPECT_EQ(m.token_ids, n.token_ids);
  EXPECT_EQ(m.positions, n.positions);
  EXPECT_EQ(m.query_start, n.query_start);
  EXPECT_EQ(m.block_indptr, n.block_indptr);
  EXPECT_EQ(m.block_indices, n.block_indices);
  EXPECT_EQ(m.num_splits, n.num_splits);
  EXPECT_EQ(m.split_row_begin, n.split_row_begin);
  EXPECT_EQ(m.sample_rows, n.sample_rows);
  ASSERT_EQ(m.requests.size(), n.requests.size());
  for (size_t i = 0; i < m.requests.size(); ++i) {
    EXPECT_EQ(m.requests[i].request_id, n.requests[i].request_id);
    EXPECT_EQ(m.requests[i].banned_token_ids, n.requests[i].banned_token_ids);
    EXPECT_EQ(m.requests[i].seed, n.requests[i].seed);
  }
}

TEST(ScheduleIdentity, CopiedAttentionTilesMatchTilesMadeAfresh) {
  for (int tp : {1, 2}) {
    ScheduleBuilder fast(model(), gpu_tile_config(132), tp);
    ScheduleBuilder fresh(model(), gpu_tile_config(132), tp, {.record_accesses = true});
    Step a, b;  // reused across steps, as in the server
    for (int requests : {1, 70, 150, 9}) {
      const scheduler::StepPlan p = plan(requests, requests);
      ASSERT_TRUE(fast.build_into(p, 0, a).ok());
      ASSERT_TRUE(fresh.build_into(p, 0, b).ok());
      SCOPED_TRACE(testing::Message() << "tp " << tp << " requests " << requests);
      expect_same_step(a, b);
    }
  }
}

// The invariant, straight from its definition: walking the global order, every wait's
// target (from barrier_begin) is covered by the signals of instructions before it.
bool invariant_holds(const Step& step) {
  const int tp = static_cast<int>(step.ranks.size());
  size_t total = 0;
  for (const auto& r : step.ranks) total += r.instructions.size();
  if (step.global_order.size() != total) return false;
  std::vector<std::vector<int32_t>> position(tp);
  for (int r = 0; r < tp; ++r) position[r].assign(step.ranks[r].instructions.size(), -1);
  for (size_t g = 0; g < step.global_order.size(); ++g) {
    const InstructionRef ref = step.global_order[g];
    if (ref.rank < 0 || ref.rank >= tp || ref.index < 0 ||
        ref.index >= static_cast<int32_t>(position[ref.rank].size()) ||
        position[ref.rank][ref.index] != -1 ||
        step.ranks[ref.rank].order[ref.index] != static_cast<int32_t>(g)) {
      return false;
    }
    position[ref.rank][ref.index] = static_cast<int32_t>(g);
  }
  for (int r = 0; r < tp; ++r) {  // queues in global order
    const RankSchedule& rs = step.ranks[r];
    for (int q = 0; q < rs.num_queues(); ++q) {
      for (int32_t i = rs.queue_begin[q] + 1; i < rs.queue_begin[q + 1]; ++i) {
        if (position[r][i] < position[r][i - 1]) return false;
      }
    }
  }
  const size_t nb = step.ranks[0].barrier_begin.size();
  std::vector<std::vector<uint32_t>> seen(tp, std::vector<uint32_t>(nb, 0));
  for (const InstructionRef ref : step.global_order) {
    const RankSchedule& rs = step.ranks[ref.rank];
    const isa::Instruction& inst = rs.instructions[ref.index];
    for (int w = 0; w < inst.num_waits(); ++w) {
      const int32_t b = inst.wait_barrier(w);
      if (b < 0 || b >= static_cast<int32_t>(nb)) return false;
      if (static_cast<uint32_t>(inst.wait_target(w)) - rs.barrier_begin[b] > seen[ref.rank][b]) {
        return false;
      }
    }
    for (int s = 0; s < inst.num_signals(); ++s) {
      const int32_t b = inst.signal_barrier(s);
      if (b < 0 || b >= static_cast<int32_t>(nb)) return false;
      for (int t = 0; t < tp; ++t) {
        if (inst.signal_rank(s) == isa::kSignalAllRanks || inst.signal_rank(s) == t) {
          ++seen[t][b];
        }
      }
    }
  }
  for (int r = 0; r < tp; ++r) {
    for (size_t b = 0; b < nb; ++b) {
      if (step.ranks[r].barrier_begin[b] + seen[r][b] != step.ranks[r].barrier_end[b]) {
        return false;
      }
    }
  }
  return true;
}

TEST(ScheduleIdentity, DeadlockCheckAgreesWithTheDefinitionOnMutatedSteps) {
  std::mt19937 rng(7);
  int accepted = 0, rejected = 0;
  for (int tp : {1, 2}) {
    TileConfig tiles = gpu_tile_config(6);  // few SMs: queues long enough to reorder
    ScheduleBuilder builder(model(), tiles, tp);
    const absl::StatusOr<Step> built = builder.build(plan(20, 1));
    ASSERT_TRUE(built.ok()) << built.status();
    ASSERT_TRUE(check_deadlock_free(*built).ok());
    ASSERT_TRUE(invariant_holds(*built));
    for (int trial = 0; trial < 400; ++trial) {
      Step step = *built;
      const int r = static_cast<int>(rng() % tp);
      RankSchedule& rs = step.ranks[r];
      const int32_t n = static_cast<int32_t>(rs.instructions.size());
      const int32_t i = static_cast<int32_t>(rng() % n);
      isa::Instruction& inst = rs.instructions[i];
      switch (trial % 6) {
        case 0:  // a wait target up or down
          if (inst.num_waits() > 0) {
            inst.words[isa::kWordWaits + 1] += (rng() % 2) ? 1 : -1;
          }
          break;
        case 1:  // a wait moved to another barrier
          if (inst.num_waits() > 0) inst.words[isa::kWordWaits] = rng() % (1 + 8 * 5 + 4);
          break;
        case 2:  // a signal moved to another barrier
          inst.words[isa::kWordSignals] = rng() % (1 + 8 * 5 + 4);
          break;
        case 3:  // two neighbours in a queue swapped (order follows the instructions)
          if (i + 1 < n) {
            std::swap(rs.instructions[i], rs.instructions[i + 1]);
          }
          break;
        case 4:  // a wait dropped
          if (inst.num_waits() > 0) --inst.words[isa::kWordNumWaits];
          break;
        case 5:  // a wait to a partial count (fewer than all of the barrier's signals)
          if (inst.num_waits() > 0) inst.words[isa::kWordWaits + 1] -= 1 + rng() % 3;
          break;
      }
      const bool expected = invariant_holds(step);
      EXPECT_EQ(check_deadlock_free(step).ok(), expected) << "trial " << trial;
      (expected ? accepted : rejected) += 1;
    }
  }
  EXPECT_GT(accepted, 50);  // both verdicts are exercised
  EXPECT_GT(rejected, 50);
}

}  // namespace
}  // namespace megaserve::engine
