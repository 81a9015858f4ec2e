// How a projection op's calls walk its chunks of rows and their wgmma passes [WGMMA_WALK]
// (kernels/tile_wgmma.cuh): plain integer logic, shared by the device code and a host test.
#pragma once

#include <stdint.h>

#include "engine/isa/host_device.h"

namespace megaserve::kernels {

struct WgmmaPass;
struct BulkState;

// The call number of an op's prefetch call, made before its instruction's waits: a projection
// whose chunk will take the bulk-copy matvec starts its first weight segments and returns
// Walk::kPrefetched; nothing else runs [MATVEC_BULK].
inline constexpr int32_t kPrefetchCall = -1;

// Where one call of a projection op stands in its instruction's walk: `call` counts the op's
// calls for this instruction before this one (= the wgmma passes run so far), `before` the
// wgmma passes of the chunks the op has walked so far in this call. Every call walks the op's
// chunks from the start; chunk i's wgmma passes are [before, before + n), and call c sets up
// pass c after emitting pass c - 1. A chunk that takes no wgmma pass (n = 0) runs whole in the
// call where before == call.
struct PassWalk {
  int32_t call;
  int32_t before;
  WgmmaPass* pass;
  BulkState* bulk = nullptr;  // the CTA's [MATVEC_BULK] state, or null
};

// What one chunk does in this call.
struct ChunkStep {
  bool skip;      // finished in an earlier call: nothing (go on to the next chunk)
  bool prologue;  // start it: its row scales, then (n = 0) the whole projection
  int32_t emit;   // its pass to emit first (numbered within the chunk), or -1
  int32_t setup;  // its pass to set up, then yield to the entry function, or -1
  // Otherwise (setup = -1, not skipped) the chunk's projection is done in this call: run what
  // follows it, then the next chunk.
};

// The step of a chunk with n wgmma passes (0: another core), advancing walk.before.
MEGASERVE_HOST_DEVICE inline ChunkStep walk_chunk(PassWalk& walk, int32_t n) {
  const int32_t stage = walk.call - walk.before;
  walk.before += n;
  ChunkStep s{false, false, -1, -1};
  if (n == 0 ? stage != 0 : stage > n) {
    s.skip = true;
    return s;
  }
  s.prologue = stage == 0;
  if (stage > 0) s.emit = stage - 1;
  if (stage < n) s.setup = stage;
  return s;
}

}  // namespace megaserve::kernels
