// The phase bookkeeping of the bulk-copy matvec's ring [MATVEC_BULK]
// (kernels/tile_matvec_bulk.cuh): plain integer logic, shared by the device code and a host test.
// Per warp, slot i of the ring has a "full" and an "empty" mbarrier in static shared memory,
// initialized once per launch and kept across instructions. Every use of a slot completes one
// phase of each (the bulk copy completes full, the warp's 32 lanes arriving after reading
// complete empty), so between instructions both barriers of a slot are at the same phase,
// whose parity is bit i of the warp's `parity` word.
#pragma once

#include <stdint.h>

#include "engine/isa/host_device.h"

namespace megaserve::kernels {

// The parity of the phase that segment q of an instruction (slot q % slots, its use
// q / slots there) completes on both barriers of its slot, given the warp's parity word at the
// instruction's start. The consumer waits on full for it; the producer of segment q + slots
// waits on empty for it.
MEGASERVE_HOST_DEVICE inline uint32_t bulk_phase(uint32_t parity, int q, int slots) {
  return ((parity >> (q % slots)) ^ static_cast<uint32_t>(q / slots)) & 1u;
}

// The warp's parity word after an instruction that streamed `total` segments through `slots`
// slots: slot i was used ceil((total - i) / slots) times, each completing one phase.
MEGASERVE_HOST_DEVICE inline uint32_t bulk_parity_after(uint32_t parity, int total, int slots) {
  uint32_t flips = 0;
  for (int i = 0; i < slots && i < total; ++i) {
    if (((total - i + slots - 1) / slots) & 1) flips |= 1u << i;
  }
  return parity ^ flips;
}

}  // namespace megaserve::kernels
