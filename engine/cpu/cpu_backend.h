// CpuBackend: the Backend (engine/backend.h) that runs steps on the CPU interpreter. It
// holds the weights and the interpreter (with its KV cache); execute() runs a built step
// and returns the samples. The steps come from the engine's StepRunner, built for
// schedule_target() (the tile config, and the static verifier when `verify`).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/cpu/cpu_interpreter.h"
#include "engine/model/model_config.h"
#include "engine/model/weights.h"
#include "engine/planner/tile_config.h"

namespace megaserve::engine {

struct CpuBackendOptions {
  int tensor_parallel = 1;
  int num_sms = 1;  // virtual SMs (queues) per rank
  // default_tiles: cpu_tile_config(num_sms); otherwise `tiles` (its num_sms is overwritten).
  TileConfig tiles;
  bool default_tiles = true;
  int32_t num_kv_blocks = 256;
  int32_t kv_block_size = 16;
  ExecutionOptions execution;
  // Record regions and run the static verifier on every step (the StepRunner does, before
  // submitting; a failure fails the step).
  bool verify = false;
};

// Not thread-safe: one engine thread calls execute() (the threaded mode's workers are
// internal to a step). Synchronous: submit() runs the whole step (Backend's default).
class CpuBackend : public Backend {
 public:
  static absl::StatusOr<std::unique_ptr<CpuBackend>> create(const ModelConfig& config,
                                                            ModelWeights weights,
                                                            const CpuBackendOptions& options);

  std::string describe() const override;
  int32_t num_kv_blocks() const override { return options_.num_kv_blocks; }
  int32_t kv_block_size() const override { return options_.kv_block_size; }
  ScheduleTarget schedule_target() const override;
  // References to the previous step's sampling rows are the tokens this backend's last run
  // sampled. A failed run leaves the barriers and cache in an unknown state: every later
  // call fails.
  absl::StatusOr<scheduler::StepOutput> execute(const Step& step) override;
  // The interpreter's per-instruction timeline (ExecutionOptions::timings): steady clock,
  // lane = the queue (virtual SM) that ran the instruction.
  bool record_timings(bool on) override {
    record_timings_ = on;
    return true;
  }

  // For tests and benchmarks.
  CpuInterpreter& interpreter() { return *interpreter_; }
  void set_execution(const ExecutionOptions& execution) { options_.execution = execution; }

 private:
  CpuBackend() = default;

  ModelConfig config_;
  ModelWeights weights_;
  CpuBackendOptions options_;
  std::unique_ptr<CpuInterpreter> interpreter_;
  std::vector<int32_t> last_sampled_;  // the last run's sampled ids, in row order
  bool record_timings_ = false;
  bool broken_ = false;
};

}  // namespace megaserve::engine
