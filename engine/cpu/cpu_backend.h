// CpuBackend: the Backend (engine/backend.h) that runs steps on the CPU interpreter. It
// holds the weights, the ScheduleBuilder and the interpreter (with its KV cache); execute()
// builds the step, optionally verifies it statically, runs it and returns the samples.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/cpu/cpu_interpreter.h"
#include "engine/model/model_config.h"
#include "engine/model/weights.h"
#include "engine/planner/schedule_builder.h"
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
  // Record regions and run the static verifier on every step (a failure fails the step).
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
  // kTokenFromPreviousStep inputs are the token this backend sampled for the same request in
  // the previous step (an error if it sampled none). A failed run leaves the barriers and
  // cache in an unknown state: every later call fails.
  absl::StatusOr<scheduler::StepOutput> execute(const scheduler::StepPlan& plan) override;

  // For tests and benchmarks.
  CpuInterpreter& interpreter() { return *interpreter_; }
  ScheduleBuilder& builder() { return *builder_; }
  // The step built by the last execute() (valid after a successful one).
  const Step& last_step() const { return last_step_; }
  void set_execution(const ExecutionOptions& execution) { options_.execution = execution; }

 private:
  CpuBackend() = default;

  ModelConfig config_;
  ModelWeights weights_;
  CpuBackendOptions options_;
  std::unique_ptr<ScheduleBuilder> builder_;
  std::unique_ptr<CpuInterpreter> interpreter_;
  std::unordered_map<uint64_t, int32_t> previous_sampled_;  // request id -> token
  std::vector<std::vector<int32_t>> in_flight_outputs_;     // add_in_flight_outputs
  Step last_step_;
  bool broken_ = false;
};

}  // namespace megaserve::engine
