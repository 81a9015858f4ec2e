// A step that runs only one opcode's instructions: the microbenchmark of one instruction kind
// inside the persistent megakernel (bench/gpu_projection_bench.cc). From a step the builder
// made, it keeps every instruction of `op` (all layers) in its queue and order, without
// their waits and signals, so the instructions run back to back on every SM as a stream of
// independent tiles; the barriers end where they began (the builder's totals must be
// rewound to before the step, ScheduleBuilder::rewind_barrier_totals). What the kept
// instructions read is whatever the workspace holds: the values are meaningless, the
// work (shapes, bytes, flops) is the real step's.
#pragma once

#include "engine/isa/isa.h"
#include "engine/isa/step.h"

namespace megaserve::engine {

Step op_stream(const Step& step, isa::Opcode op);

}  // namespace megaserve::engine
