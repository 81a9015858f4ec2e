// bench/op_stream.h on the CPU interpreter with stories260K: the step cut down to one opcode
// keeps exactly that opcode's instructions, in their queues and order, without waits or
// signals, is deadlock-free by the builder's own check, and runs; a backend that ran op
// streams of every projection then gives a normal step the tokens and logprobs of a fresh one.
#include "bench/op_stream.h"

#include <filesystem>
#include <memory>
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "engine/model/model_config.h"
#include "engine/model/weights.h"
#include "engine/planner/schedule_builder.h"
#include "engine/planner/tile_config.h"
#include "engine/step_runner.h"
#include "gtest/gtest.h"
#include "tests/support/assets.h"

namespace megaserve::engine {
namespace {

constexpr isa::Opcode kOps[] = {isa::Opcode::kQkvRope, isa::Opcode::kAttention, isa::Opcode::kOProj,
                                isa::Opcode::kGateUpSilu, isa::Opcode::kDownProj};

class OpStreamTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto config = load_model_config(testing::assets_dir() / "models/stories260K-hf");
    ASSERT_TRUE(config.ok()) << config.status();
    config_ = *config;
  }

  std::unique_ptr<CpuBackend> backend() {
    auto weights =
        load_weights(testing::assets_dir() / "models/stories260K-hf", config_, DType::kF32);
    EXPECT_TRUE(weights.ok()) << weights.status();
    CpuBackendOptions o;
    o.num_sms = 4;
    o.num_kv_blocks = 64;
    auto b = CpuBackend::create(config_, *std::move(weights), o);
    EXPECT_TRUE(b.ok()) << b.status();
    return b.ok() ? *std::move(b) : nullptr;
  }

  // One request prefilling `tokens` ids into blocks [first_block, ...).
  static scheduler::StepPlan plan(uint64_t id, int tokens, int first_block, bool sample) {
    scheduler::StepPlan p;
    p.step_id = id;
    p.kv_block_size = 16;
    scheduler::StepRequest r;
    r.request_id = id + 1;
    for (int i = 0; i < tokens; ++i) r.token_ids.push_back(1 + (i * 37) % 500);
    for (int b = 0; b < (tokens + 15) / 16; ++b) r.block_table.push_back(first_block + b);
    r.sample = sample;
    r.sampling.temperature = 0.0f;
    r.sampling.logprobs = 3;
    p.requests.push_back(r);
    return p;
  }

  ModelConfig config_;
};

TEST_F(OpStreamTest, KeepsOneOpcodeInQueueOrderWithoutWaitsOrSignals) {
  std::unique_ptr<CpuBackend> b = backend();
  ASSERT_NE(b, nullptr);
  StepRunner runner(config_, *b);
  auto full = runner.builder().build(plan(1, 70, 0, false), b->num_kv_blocks());
  ASSERT_TRUE(full.ok()) << full.status();
  const RankSchedule& in = full->ranks[0];
  for (const isa::Opcode op : kOps) {
    SCOPED_TRACE(isa::opcode_name(op));
    const Step s = op_stream(*full, op);
    const RankSchedule& rs = s.ranks[0];
    ASSERT_EQ(rs.num_queues(), in.num_queues());
    int kept = 0;
    for (int q = 0; q < in.num_queues(); ++q) {
      // Queue q of the stream is queue q of the step with every other opcode left out.
      std::vector<const isa::Instruction*> want;
      for (int i = in.queue_begin[q]; i < in.queue_begin[q + 1]; ++i) {
        if (in.instructions[i].opcode() == op) want.push_back(&in.instructions[i]);
      }
      ASSERT_EQ(rs.queue_begin[q + 1] - rs.queue_begin[q], static_cast<int>(want.size()));
      for (size_t j = 0; j < want.size(); ++j) {
        const isa::Instruction& got = rs.instructions[rs.queue_begin[q] + j];
        EXPECT_EQ(got.opcode(), op);
        EXPECT_EQ(got.layer(), want[j]->layer());
        EXPECT_EQ(got.num_waits(), 0);
        EXPECT_EQ(got.num_signals(), 0);
        for (int w = 0; w < isa::kNumArgWords; ++w) EXPECT_EQ(got.args()[w], want[j]->args()[w]);
      }
      kept += static_cast<int>(want.size());
    }
    EXPECT_GT(kept, 0);
    EXPECT_EQ(s.global_order.size(), static_cast<size_t>(kept));
    EXPECT_EQ(rs.barrier_end, rs.barrier_begin);
    EXPECT_TRUE(check_deadlock_free(s).ok()) << check_deadlock_free(s);
  }
}

TEST_F(OpStreamTest, OpStreamsRunAndLeaveTheBackendAsAFreshOne) {
  std::unique_ptr<CpuBackend> fresh = backend(), used = backend();
  ASSERT_NE(fresh, nullptr);
  ASSERT_NE(used, nullptr);
  StepRunner fresh_runner(config_, *fresh), used_runner(config_, *used);
  // Op streams of every kind on blocks 0..4, the builder's barrier totals rewound after each.
  ScheduleBuilder& builder = used_runner.builder();
  for (const isa::Opcode op : kOps) {
    const auto totals = builder.barrier_totals();
    auto full = builder.build(plan(10, 70, 0, false), used->num_kv_blocks());
    ASSERT_TRUE(full.ok()) << full.status();
    builder.rewind_barrier_totals(totals);
    auto out = used->execute(op_stream(*full, op));
    ASSERT_TRUE(out.ok()) << isa::opcode_name(op) << ": " << out.status();
    EXPECT_TRUE(out->sampled.empty());
  }
  // Then the same normal step (blocks 8..) on both backends.
  auto want = fresh_runner.execute(plan(20, 40, 8, true));
  auto got = used_runner.execute(plan(20, 40, 8, true));
  ASSERT_TRUE(want.ok()) << want.status();
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->sampled.size(), 1u);
  ASSERT_EQ(want->sampled.size(), 1u);
  EXPECT_EQ(got->sampled[0].token_id, want->sampled[0].token_id);
  EXPECT_EQ(got->sampled[0].logprob, want->sampled[0].logprob);
}

// A split-K step [SPLIT_K] (the GPU tiles, 256 decodes at Llama-3.1-8B's width): the O and
// down streams write partial slots, so the stream keeps the step's count of them, by which
// the backends size the workspace (a stream without it made the GPU write past it).
TEST(OpStreamSplitK, KeepsThePartialSlotsItsTilesWrite) {
  absl::StatusOr<ModelConfig> config = load_model_config_file(
      std::filesystem::path(MEGASERVE_SOURCE_DIR) / "configs/models/llama-3.1-8b.json");
  ASSERT_TRUE(config.ok()) << config.status();
  ModelConfig c = *config;
  c.num_layers = 1;
  scheduler::StepPlan p;
  p.kv_block_size = 16;
  for (int i = 0; i < 256; ++i) {
    scheduler::StepRequest r;
    r.request_id = i + 1;
    r.first_position = 19;
    r.token_ids = {(i * 7 + 3) % 500};
    for (int b = 0; b < 2; ++b) r.block_table.push_back(2 * i + b);
    r.sample = false;
    p.requests.push_back(r);
  }
  ScheduleBuilder builder(c, gpu_tile_config(132), 1);
  auto full = builder.build(p, 1024);
  ASSERT_TRUE(full.ok()) << full.status();
  ASSERT_GT(full->k_splits, 1);
  for (const isa::Opcode op : {isa::Opcode::kOProj, isa::Opcode::kDownProj}) {
    const Step s = op_stream(*full, op);
    EXPECT_EQ(partial_slots_of(s), partial_slots_of(*full)) << isa::opcode_name(op);
    int split = 0;
    for (const isa::Instruction& inst : s.ranks[0].instructions) {
      const auto a = isa::args_of<isa::HiddenTileArgs>(inst);
      EXPECT_LT(a.partial_slot, partial_slots_of(s));
      split += a.partial_slot >= 0;
    }
    EXPECT_GT(split, 0) << isa::opcode_name(op);
  }
}

}  // namespace
}  // namespace megaserve::engine
