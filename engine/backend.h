// What the engine loop drives: something that executes built steps (run the instruction
// stream, sample) and returns the sampled tokens. The CPU interpreter and the CUDA megakernel
// both implement it. The engine's StepRunner (engine/step_runner.h) owns the one
// ScheduleBuilder, built for what the backend reports in schedule_target(); it turns each
// StepPlan into a Step, resolves the inputs still in flight from the previous step and
// submits the Step here. Backends never see a StepPlan.
//
// Steps are submitted and collected in order: submit(N) queues step N behind the steps
// already submitted, collect() returns the oldest submitted step's output. At most
// kMaxStepsInFlight steps are submitted and not yet collected, so the host can plan and
// upload step N+1 while step N runs. A backend that runs synchronously does the whole step
// in submit() (its execute()) and hands its output out in collect() (the default below).
//
// Input token ids of a submitted Step are vocabulary ids or references to a sampling row of
// the step submitted just before it (isa::previous_sample_ref, engine/isa/isa.h
// [PREVIOUS_SAMPLE]); each backend resolves references its own way.
#pragma once

#include <cstdint>
#include <deque>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "engine/isa/step.h"
#include "engine/planner/tile_config.h"
#include "scheduler/step_plan.h"

namespace megaserve::engine {

inline constexpr int kMaxStepsInFlight = 2;

// What a backend needs of the steps built for it: the StepRunner's ScheduleBuilder is made
// from this, and every plan is checked against it before it is built.
struct ScheduleTarget {
  TileConfig tiles;  // tile shapes; tiles.num_sms queues per rank
  int tensor_parallel = 1;
  int32_t num_kv_blocks = 0;  // block ids of a plan must be below this
  int32_t kv_block_size = 16;
  // Record every instruction's buffer regions and run the static verifier on every step
  // before it is submitted (a failure fails the step and the runner).
  bool verify = false;
};

class Backend {
 public:
  virtual ~Backend() = default;
  // "cpu" or "cuda", with details for the log.
  virtual std::string describe() const = 0;
  // KV blocks the backend holds (each kv_block_size tokens, all layers).
  virtual int32_t num_kv_blocks() const = 0;
  virtual int32_t kv_block_size() const = 0;
  virtual ScheduleTarget schedule_target() const = 0;

  // Runs `step`, built for schedule_target() by the one builder whose steps this backend
  // runs (every step it built, in build order), and returns one sampled token per sampling
  // row, in row order. A failure (bad step, device error) fails the whole step. Needs no
  // step in flight.
  virtual absl::StatusOr<scheduler::StepOutput> execute(const Step& step) = 0;

  // Queues `step` to run after every step submitted before it. `step` must stay alive and
  // unchanged until its output is collected (a backend may keep a pointer to it; the
  // StepRunner keeps its steps so). An error means the step was not queued (a bad step: the
  // backend stays usable and the steps in flight still complete; a device error: the backend
  // is broken and collect() fails). FailedPrecondition when kMaxStepsInFlight steps are
  // already in flight.
  virtual absl::Status submit(const Step& step) {
    if (ready_.size() >= kMaxStepsInFlight) {
      return absl::FailedPreconditionError(
          absl::StrCat("step ", step.step_id, ": ", ready_.size(), " steps already in flight"));
    }
    absl::StatusOr<scheduler::StepOutput> out = execute(step);
    if (!out.ok()) return out.status();
    ready_.push_back(*std::move(out));
    return absl::OkStatus();
  }
  // The output of the oldest step submitted and not yet collected, waiting for it.
  // FailedPrecondition when none is in flight.
  virtual absl::StatusOr<scheduler::StepOutput> collect() {
    if (ready_.empty()) return absl::FailedPreconditionError("collect: no step in flight");
    scheduler::StepOutput out = std::move(ready_.front());
    ready_.pop_front();
    return out;
  }
  virtual int steps_in_flight() const { return static_cast<int>(ready_.size()); }

  // Step timelines (engine/step_trace.h). With `on`, every step submitted from now on records
  // when each instruction of rank 0 ran (parallel to step.ranks[0].instructions); with off,
  // steps submitted later record nothing. Recording never changes what a step computes.
  // False when the backend cannot record (then nothing changes).
  virtual bool record_timings(bool on) { return !on; }
  // The records of step `step_id` once it is collected, handed over once; empty when it
  // recorded none. Only the last kKeptTimings recorded steps are kept.
  std::vector<InstructionTiming> take_timings(uint64_t step_id) {
    for (auto it = timings_.begin(); it != timings_.end(); ++it) {
      if (it->first != step_id) continue;
      std::vector<InstructionTiming> out = std::move(it->second);
      timings_.erase(it);
      return out;
    }
    return {};
  }

 protected:
  static constexpr size_t kKeptTimings = kMaxStepsInFlight + 1;
  // A backend that records keeps a finished step's records here for take_timings().
  void keep_timings(uint64_t step_id, std::vector<InstructionTiming> timings) {
    if (timings_.size() >= kKeptTimings) timings_.pop_front();
    timings_.emplace_back(step_id, std::move(timings));
  }

 private:
  std::deque<scheduler::StepOutput> ready_;  // synchronous default: outputs not collected yet
  std::deque<std::pair<uint64_t, std::vector<InstructionTiming>>> timings_;  // oldest first
};

}  // namespace megaserve::engine
