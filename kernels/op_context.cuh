// What every op sees: the model (constant), the current step's descriptor and the CTA's
// dynamic shared memory, all already in shared memory (copied by the controller).
#pragma once

#include "engine/isa/isa.h"
#include "kernels/megakernel.h"

namespace megaserve::kernels {

struct OpContext {
  const DeviceModel& model;
  const DeviceStepDesc& step;
  float* smem;          // dynamic shared memory, free for the op between __syncthreads
  int32_t smem_floats;  // its size in floats
};

}  // namespace megaserve::kernels
