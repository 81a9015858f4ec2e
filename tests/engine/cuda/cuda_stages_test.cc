// engine/cuda/cuda_stages on hand-made timings: a step of four stages (QKV, attention and O of
// layer 0, QKV of layer 1, which starts before O has ended), the span each adds, its wake-up
// after the previous stage, its tail and its slowest instruction; the first stage's time and
// the added spans sum to the span.
#include "engine/cuda/cuda_stages.h"

#include <vector>

#include "gtest/gtest.h"

namespace megaserve::engine {
namespace {

using isa::Opcode;

struct Timed {
  Opcode op;
  int layer;
  uint64_t start_us, end_us;
};

TEST(CudaStages, AddsUpTheSpanStageByStage) {
  const std::vector<Timed> timed = {
      {Opcode::kQkvRope, 0, 0, 100},     {Opcode::kQkvRope, 0, 0, 140},
      {Opcode::kAttention, 0, 150, 200}, {Opcode::kOProj, 0, 205, 250},
      {Opcode::kOProj, 0, 210, 300},     {Opcode::kOProj, 0, 260, 400},
      {Opcode::kQkvRope, 1, 390, 450},
  };
  Step step;
  step.ranks.resize(1);
  std::vector<InstructionTiming> timings;
  for (const Timed& t : timed) {
    isa::Instruction inst{};
    inst.words[isa::kWordOpcode] = static_cast<int32_t>(t.op);
    inst.words[isa::kWordLayer] = t.layer;
    step.ranks[0].instructions.push_back(inst);
    timings.push_back({.fetch_ns = 0, .start_ns = t.start_us * 1000, .end_ns = t.end_us * 1000});
  }
  const StagePath p = stage_path(step, timings);
  EXPECT_DOUBLE_EQ(p.span_us, 450);
  EXPECT_DOUBLE_EQ(p.first_us, 140);
  double added = 0;
  for (const StagePathRow& r : p.ops) added += r.adds_us;
  EXPECT_DOUBLE_EQ(p.first_us + added, p.span_us);
  ASSERT_EQ(p.ops.size(), 3u);  // the first stage (QKV of layer 0) adds to no row
  const auto row = [&](Opcode op) {
    for (const StagePathRow& r : p.ops) {
      if (r.op == op) return r;
    }
    ADD_FAILURE() << isa::opcode_name(op) << " missing";
    return StagePathRow{};
  };
  const StagePathRow qkv = row(Opcode::kQkvRope), att = row(Opcode::kAttention),
                     o = row(Opcode::kOProj);
  EXPECT_EQ(qkv.stages, 1);
  EXPECT_DOUBLE_EQ(qkv.adds_us, 50);
  EXPECT_DOUBLE_EQ(qkv.wake_us, -10);  // started before O's last end
  EXPECT_DOUBLE_EQ(att.adds_us, 60);
  EXPECT_DOUBLE_EQ(att.wake_us, 10);
  EXPECT_DOUBLE_EQ(att.tail_us, 0);
  EXPECT_DOUBLE_EQ(o.adds_us, 200);
  EXPECT_DOUBLE_EQ(o.wake_us, 5);
  EXPECT_DOUBLE_EQ(o.tail_us, 100);  // 400 - the median end 300
  EXPECT_DOUBLE_EQ(o.slowest_us, 140);
  EXPECT_NE(format_stage_path(p).find("kOProj"), std::string::npos);
}

}  // namespace
}  // namespace megaserve::engine
