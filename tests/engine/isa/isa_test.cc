// The instruction format: argument views round-trip through the words, the named word
// layout, and the wrap-around barrier comparison.
#include "engine/isa/isa.h"

#include <cstdint>

#include "gtest/gtest.h"

namespace megaserve::engine::isa {
namespace {

TEST(IsaTest, ArgumentViewsRoundTrip) {
  Instruction inst{};
  AttentionArgs a{};
  a.kv_head = 3;
  a.request_begin = 7;
  a.request_end = 9;
  a.query_begin = -1;
  a.query_end = 1 << 30;
  a.split = 5;
  set_args(inst, a);
  EXPECT_EQ(inst.words[kWordArgs], 3);
  EXPECT_EQ(inst.words[kWordArgs + 5], 5);
  const AttentionArgs b = args_of<AttentionArgs>(inst);
  EXPECT_EQ(b.request_end, 9);
  EXPECT_EQ(b.query_begin, -1);
  EXPECT_EQ(b.query_end, 1 << 30);
  // Arguments never spill into the wait list.
  EXPECT_EQ(inst.words[kWordWaits], 0);
}

TEST(IsaTest, WaitAndSignalWords) {
  Instruction inst{};
  inst.words[kWordOpcode] = static_cast<int32_t>(Opcode::kTpReduce);
  inst.words[kWordNumWaits] = 2;
  inst.words[kWordWaits + 2] = 17;
  inst.words[kWordWaits + 3] = -5;  // a target past 2^31 reads back as uint32
  inst.words[kWordNumSignals] = 1;
  inst.words[kWordSignals] = 4;
  inst.words[kWordSignals + 1] = kSignalAllRanks;
  EXPECT_EQ(inst.opcode(), Opcode::kTpReduce);
  EXPECT_EQ(inst.wait_barrier(1), 17);
  EXPECT_EQ(static_cast<uint32_t>(inst.wait_target(1)), 0xFFFFFFFBu);
  EXPECT_EQ(inst.signal_barrier(0), 4);
  EXPECT_EQ(inst.signal_rank(0), kSignalAllRanks);
  EXPECT_STREQ(opcode_name(inst.opcode()), "kTpReduce");
}

TEST(IsaTest, BarrierReachedAcrossWrapAround) {
  EXPECT_TRUE(barrier_reached(5, 5));
  EXPECT_TRUE(barrier_reached(6, 5));
  EXPECT_FALSE(barrier_reached(4, 5));
  // The counter wrapped past 2^32 and the target did too.
  EXPECT_TRUE(barrier_reached(3, 0xFFFFFFFEu));
  EXPECT_FALSE(barrier_reached(0xFFFFFFFDu, 2));
  // The target wrapped, the counter not yet.
  EXPECT_FALSE(barrier_reached(0xFFFFFFF0u, 0x10));
  EXPECT_TRUE(barrier_reached(0x10, 0xFFFFFFF0u));
}

}  // namespace
}  // namespace megaserve::engine::isa
