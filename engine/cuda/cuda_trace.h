// Where a megakernel step's device time went: the per-instruction timestamps the CTAs record
// when profiling (CudaBackendOptions::profile, kernels/megakernel.h kProfileWords), turned
// into a per-opcode summary of busy time and achieved FLOP/s and bytes/s (the per-SM Chrome
// trace of the same timestamps: engine/step_trace.h). Host-only: it needs no GPU, so it is
// tested on the CPU with hand-made steps.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "engine/isa/isa.h"
#include "engine/isa/step.h"
#include "engine/model/model_config.h"
#include "engine/planner/op_cost.h"

namespace megaserve::engine {

// InstructionTiming (one instruction's fetch, start and end, and its SM) is in
// engine/isa/step.h: the CPU interpreter records it too.

struct OpSummary {
  isa::Opcode op = isa::Opcode::kInvalid;
  int count = 0;
  double busy_us = 0;  // summed over instructions: waits satisfied -> op done
  double wait_us = 0;  // summed: fetched -> waits satisfied
  double flops = 0;
  double bytes = 0;
  // Achieved rates while busy, per SM summed over SMs: work / busy time.
  double tflops_per_s() const { return busy_us > 0 ? flops / busy_us * 1e-6 : 0; }
  double tbytes_per_s() const { return busy_us > 0 ? bytes / busy_us * 1e-6 : 0; }
};

struct TraceSummary {
  double span_us = 0;  // first fetch -> last op done, over every CTA
  int num_ctas = 0;
  double flops = 0, bytes = 0;  // the whole step
  std::vector<OpSummary> ops;   // opcodes that occur, in opcode order
};

// `timings` is parallel to step.ranks[0].instructions (one rank).
TraceSummary summarize_trace(const ModelConfig& config, const Step& step,
                             std::span<const InstructionTiming> timings);

// A table, one line per opcode: count, busy and wait time per CTA, achieved TFLOP/s and TB/s
// over the whole GPU (summed work / (summed busy time / CTAs)).
std::string format_trace_summary(const TraceSummary& summary);

}  // namespace megaserve::engine
