// What every op sees: the model (constant), the current step's descriptor and the CTA's
// dynamic shared memory, all already in shared memory (copied by the controller).
#pragma once

#include "engine/isa/isa.h"
#include "kernels/megakernel.h"

namespace megaserve::kernels {

// The wgmma core's pipeline state in static shared memory (controller.cuh, CtaState;
// kernels/tile_wgmma.cuh [WGMMA_PIPE]).
struct WgmmaPipe {
  uint64_t* full;      // [kWgmmaBarriers]: 3 of the shallow depth, then 4 of the deep one
  uint32_t* consumed;  // [2] per depth: k-blocks consumed so far, stage and phase of the next
  uint32_t* released;  // [3] per shallow stage: warpgroup releases (128-row passes)
};

struct OpContext {
  const DeviceModel& model;
  const DeviceStepDesc& step;
  float* smem;          // dynamic shared memory, free for the op between __syncthreads
  int32_t smem_floats;  // its size in floats
  WgmmaPipe pipe;       // the wgmma core's barriers (static shared memory)
};

}  // namespace megaserve::kernels
