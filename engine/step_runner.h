// StepRunner: the Build and Submit of the engine loop (DESIGN.md §2). It owns the one
// ScheduleBuilder, made for what its backend reports (Backend::schedule_target), turns each
// StepPlan into a Step and submits it, and is the one place that resolves the inputs the
// scheduler could not know yet:
//   - an input kTokenFromPreviousStep becomes the token the previously submitted step
//     sampled for that request when the runner already has that step's output, else a
//     reference to that step's sampling row (isa::previous_sample_ref, [PREVIOUS_SAMPLE]),
//     which the backend resolves (the GPU on the device, while that step still runs);
//   - penalties need the tokens sampled so far, and a plan made while the previous step ran
//     lacks that step's token (add_in_flight_outputs): when a row's penalties need it, the
//     runner collects the previous step first (its output is kept for collect(), which still
//     returns outputs in submission order) and adds the token.
// Not thread-safe: the engine thread calls it.
#pragma once

#include <array>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/isa/step.h"
#include "engine/model/model_config.h"
#include "engine/planner/schedule_builder.h"
#include "scheduler/step_plan.h"

namespace megaserve::engine {

class StepRunner {
 public:
  // `backend` must outlive the runner, and no other builder's steps may run on it.
  StepRunner(const ModelConfig& config, Backend& backend);
  // Collects (and drops) the steps still in flight: the backend may read them until then.
  ~StepRunner();
  StepRunner(const StepRunner&) = delete;
  StepRunner& operator=(const StepRunner&) = delete;

  // Builds `plan` and queues it behind the steps submitted before. The plan's spans
  // (prompt and output ids) must stay valid until its output is collected. Errors leave the
  // runner and the backend as they were (InvalidArgument: a bad plan, e.g. an input
  // kTokenFromPreviousStep for a request that the previous step did not sample;
  // FailedPrecondition: kMaxStepsInFlight steps in flight), except errors of the backend
  // that break it, a step the verifier rejects (it breaks the runner), and steps collected
  // early (they stay collected, their outputs kept for collect()).
  absl::Status submit(const scheduler::StepPlan& plan);
  // The output of the oldest step submitted and not yet collected, waiting for it.
  absl::StatusOr<scheduler::StepOutput> collect();
  // Steps submitted and not yet collected (those collected early included).
  int steps_in_flight() const { return static_cast<int>(in_flight_.size()); }
  // submit() then collect(), with no step in flight (FailedPrecondition otherwise).
  absl::StatusOr<scheduler::StepOutput> execute(const scheduler::StepPlan& plan);

  Backend& backend() { return backend_; }
  ScheduleBuilder& builder() { return builder_; }
  const ScheduleTarget& target() const { return target_; }
  // The step of the output collect() returned last; valid until the next submit().
  const Step& last_step() const;

 private:
  // A step from build to collection: the Step (its buffers reused from step to step), the
  // storage its patched output spans point into, and its output once collected early.
  struct Slot {
    Step step;
    std::vector<std::vector<int32_t>> outputs;  // add_in_flight_outputs' storage
    std::optional<scheduler::StepOutput> output;
  };

  Slot& free_slot();
  // Collects every step in flight from the backend (in order), keeping the outputs.
  absl::Status collect_early();
  // The backend's output for `slot` (the oldest not collected from it); when `slot` is the
  // last submitted step, its tokens become the known previous output.
  absl::Status take_output(Slot& slot, absl::StatusOr<scheduler::StepOutput>& out);

  Backend& backend_;
  ScheduleTarget target_;
  ScheduleBuilder builder_;
  // A build takes a slot neither in flight (at most kMaxStepsInFlight - 1 of them then) nor
  // the last collected one (last_step()).
  std::array<Slot, kMaxStepsInFlight + 1> slots_;
  std::deque<Slot*> in_flight_;  // oldest first
  Slot* last_collected_ = nullptr;
  // The last submitted step's sampling rows (request id -> row), and once the runner has
  // that step's output, the tokens it sampled (request id -> token).
  std::unordered_map<uint64_t, int32_t> previous_rows_;
  std::unordered_map<uint64_t, int32_t> previous_sampled_;
  bool previous_known_ = false;
  std::vector<std::vector<uint32_t>> saved_totals_;  // the builder's, before the last build
  absl::Status broken_;  // a step the verifier rejected was built but never ran
};

// Under overlapped scheduling a plan is made before the previous step's output is applied,
// so a sampling request's output_token_ids lack the token it sampled in that step
// (output_token_index says how many precede the one drawn now). Penalties need that token:
// for each such request of `step`, `storage` gets the known outputs plus the token from
// `previous` (request id -> token the previous step sampled) and the span points there.
// `storage` must outlive the step's sampling.
void add_in_flight_outputs(const std::unordered_map<uint64_t, int32_t>& previous, Step& step,
                           std::vector<std::vector<int32_t>>& storage);

// True when a request of `plan` has penalties and lacks the token the step before sampled.
bool needs_in_flight_outputs(const scheduler::StepPlan& plan);

}  // namespace megaserve::engine
