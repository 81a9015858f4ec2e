// What the engine loop drives: something that executes one step's plan (build the
// instruction stream, run it, sample) and returns the sampled tokens. The CPU interpreter
// and the CUDA megakernel both implement it.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "scheduler/step_plan.h"

namespace megaserve::engine {

class Backend {
 public:
  virtual ~Backend() = default;
  // "cpu" or "cuda", with details for the log.
  virtual std::string describe() const = 0;
  // KV blocks the backend holds (each kv_block_size tokens, all layers).
  virtual int32_t num_kv_blocks() const = 0;
  virtual int32_t kv_block_size() const = 0;
  // Runs every request of `plan` through the model, appending their K/V to the blocks named
  // in each block table, and samples where `sample` is set. Outputs are in plan order.
  // A failure (bad plan, device error) fails the whole step.
  virtual absl::StatusOr<scheduler::StepOutput> execute(const scheduler::StepPlan& plan) = 0;
};

}  // namespace megaserve::engine
