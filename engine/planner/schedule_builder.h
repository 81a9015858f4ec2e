// ScheduleBuilder: turns a StepPlan into a Step, per tensor-parallel rank and per SM, an
// instruction queue (DESIGN.md §4). It cuts each fused op into tiles (TileConfig), places
// them with a cost model (longest first onto the least-loaded SM, stage by stage), wires
// dependencies as barrier waits and signals, and keeps the barriers' running totals so that
// back-to-back steps never need a reset.
//
// Every Step it builds must be executed, completely and in build order, on the barriers it
// was built for: the targets of step N+1 assume step N's increments (or be given back with
// rewind_barrier_totals before the next build).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/isa/step.h"
#include "engine/model/model_config.h"
#include "engine/planner/schedule_shard.h"
#include "engine/planner/tile_config.h"
#include "scheduler/step_plan.h"

namespace megaserve::engine {

struct ScheduleOptions {
  // Record each instruction's read and write regions (for the verifier). Costs time and
  // memory; on in tests, behind a flag in the server.
  bool record_accesses = false;
};

struct BuildScratch;

class ScheduleBuilder {
 public:
  // `config` must pass check_tensor_parallel(config, tp); a `tiles` failing
  // check_tile_config makes every build() fail with that error.
  ScheduleBuilder(const ModelConfig& config, const TileConfig& tiles, int tp,
                  ScheduleOptions options = {});
  ~ScheduleBuilder();

  // Checks the plan (token ids, positions, block tables that cover the context, a
  // num_kv_blocks bound when > 0) and builds the step. On error nothing changes.
  absl::StatusOr<Step> build(const scheduler::StepPlan& plan, int32_t num_kv_blocks = 0);
  // The same into `step`, reusing its buffers' capacity (the steady-state path).
  absl::Status build_into(const scheduler::StepPlan& plan, int32_t num_kv_blocks, Step& step);

  int num_barriers() const { return num_barriers_; }
  int tp() const { return tp_; }
  const TileConfig& tiles() const { return tiles_; }
  const ModelShard& shard(int rank) const { return shards_[rank]; }
  // The barrier values the next step starts from, per rank.
  const std::vector<std::vector<uint32_t>>& barrier_totals() const { return totals_; }
  // Declares that every barrier currently reads `value` (a fresh executor whose counters
  // start elsewhere than 0, e.g. to test wrap-around).
  void set_barrier_origin(uint32_t value);
  // Rewinds the running totals to `totals`, read from barrier_totals() before the last
  // build, when that step will never run (its executor refused it).
  void rewind_barrier_totals(const std::vector<std::vector<uint32_t>>& totals) { totals_ = totals; }

 private:
  ModelConfig config_;
  TileConfig tiles_;
  int tp_;
  ScheduleOptions options_;
  std::vector<ModelShard> shards_;
  int num_barriers_;
  std::vector<std::vector<uint32_t>> totals_;  // [rank][barrier]
  std::unique_ptr<BuildScratch> scratch_;
  absl::Status valid_;  // check_tensor_parallel and check_tile_config
};

// The barriers a ScheduleBuilder for `config` uses per rank (what an executor allocates).
int schedule_num_barriers(const ModelConfig& config);

// The deadlock invariant (DESIGN.md §4): `global_order` lists every instruction once, each
// queue is a subsequence of it, and every wait's target is reached by the signals of
// instructions strictly earlier in it (counting from barrier_begin). Returns an error
// naming the offending instruction.
absl::Status check_deadlock_free(const Step& step);

}  // namespace megaserve::engine
