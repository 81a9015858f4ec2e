// The bulk-copy matvec ring's phase bookkeeping (kernels/bulk_ring.h) against simulated
// mbarriers: one warp's slots kept across a run of instructions with different slot counts and
// segment totals, as tile_matvec_bulk uses them. Each simulated barrier counts its completed
// phases (phase k has parity k & 1). The test checks that every wait's parity names the phase
// of the segment's own use, that this phase has completed when the wait is reached (the
// copy landed; every lane read the previous use), and that both barriers of every slot are
// at the parity word's phase between instructions.
#include "kernels/bulk_ring.h"

#include <gtest/gtest.h>

#include <random>
#include <vector>

namespace megaserve::kernels {
namespace {

constexpr int kMaxSlots = 7;

struct Barriers {
  int full[kMaxSlots] = {};   // completed phases per slot
  int empty[kMaxSlots] = {};  // completed phases per slot
};

// One instruction: `total` segments through `slots` slots, the consumer and the producer in
// the order tile_matvec_bulk runs them (segments 0 .. slots - 1 issued first; after consuming
// segment q, segment q + slots is issued). Returns the parity word after it.
uint32_t run_instruction(Barriers& b, uint32_t parity, int total, int slots) {
  // Phase k of a barrier (0-based) has parity k & 1 and is the one that completes when the
  // barrier's completed count goes from k to k + 1. A segment's use of its slot is phase
  // `completed-before-this-instruction + use` on both barriers.
  int base_full[kMaxSlots], base_empty[kMaxSlots];
  for (int i = 0; i < slots; ++i) {
    base_full[i] = b.full[i];
    base_empty[i] = b.empty[i];
    EXPECT_EQ(b.full[i], b.empty[i]) << "slot " << i << " not quiescent between instructions";
    EXPECT_EQ(static_cast<uint32_t>(b.full[i] & 1), (parity >> i) & 1u) << "slot " << i;
  }
  const auto issue = [&](int q) {
    const int slot = q % slots, use = q / slots;
    if (q >= slots) {
      // The producer waits on empty for the previous use's phase: it must have completed.
      const uint32_t want = bulk_phase(parity, q - slots, slots);
      const int phase = base_empty[slot] + use - 1;
      EXPECT_EQ(want, static_cast<uint32_t>(phase & 1)) << "q " << q;
      EXPECT_GT(b.empty[slot], phase) << "q " << q << ": refilled before every lane read it";
    }
    ++b.full[slot];  // the bulk copy lands (the phase completes)
  };
  for (int q = 0; q < total && q < slots; ++q) issue(q);
  for (int q = 0; q < total; ++q) {
    const int slot = q % slots, use = q / slots;
    const int phase = base_full[slot] + use;
    EXPECT_EQ(bulk_phase(parity, q, slots), static_cast<uint32_t>(phase & 1)) << "q " << q;
    EXPECT_EQ(b.full[slot], phase + 1) << "q " << q << ": the wait's phase has not landed";
    ++b.empty[slot];  // all 32 lanes arrive after reading
    if (q + slots < total) issue(q + slots);
  }
  return bulk_parity_after(parity, total, slots);
}

TEST(BulkRing, PhasesMatchAcrossInstructions) {
  std::mt19937 rng(7);
  for (int run = 0; run < 200; ++run) {
    Barriers b;
    uint32_t parity = 0;
    for (int inst = 0; inst < 30; ++inst) {
      const int slots = 3 + static_cast<int>(rng() % (kMaxSlots - 2));  // 3 .. 7
      const int total = static_cast<int>(rng() % 40);                   // 0 .. 39, some < slots
      parity = run_instruction(b, parity, total, slots);
      if (::testing::Test::HasFailure()) return;
    }
    // Slots no instruction used since keep their parity; every slot is quiescent.
    for (int i = 0; i < kMaxSlots; ++i) {
      EXPECT_EQ(b.full[i], b.empty[i]);
      EXPECT_EQ(static_cast<uint32_t>(b.full[i] & 1), (parity >> i) & 1u);
    }
  }
}

TEST(BulkRing, ParityAfterFlipsOddlyUsedSlots) {
  // 10 segments through 4 slots: slots 0 and 1 used 3 times, slots 2 and 3 twice.
  EXPECT_EQ(bulk_parity_after(0u, 10, 4), 0b0011u);
  EXPECT_EQ(bulk_parity_after(0b0011u, 10, 4), 0u);
  // Fewer segments than slots: only the used ones flip.
  EXPECT_EQ(bulk_parity_after(0u, 2, 7), 0b11u);
  EXPECT_EQ(bulk_parity_after(0b1000000u, 0, 7), 0b1000000u);
  // Phase of segment q: slot parity, flipped per earlier use.
  EXPECT_EQ(bulk_phase(0b0001u, 0, 4), 1u);
  EXPECT_EQ(bulk_phase(0b0001u, 4, 4), 0u);
  EXPECT_EQ(bulk_phase(0b0001u, 5, 4), 1u);
}

}  // namespace
}  // namespace megaserve::kernels
