// What the engine loop drives: something that executes steps' plans (build the instruction
// stream, run it, sample) and returns the sampled tokens. The CPU interpreter and the CUDA
// megakernel both implement it.
//
// Steps are submitted and collected in order: submit(N) queues step N behind the steps
// already submitted, collect() returns the oldest submitted step's output. At most
// kMaxStepsInFlight steps are submitted and not yet collected, so the host can plan and
// upload step N+1 while step N runs. A backend that runs synchronously does the whole step
// in submit() and hands its output out in collect() (the default below).
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "engine/isa/step.h"
#include "scheduler/step_plan.h"

namespace megaserve::engine {

inline constexpr int kMaxStepsInFlight = 2;

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
  // A failure (bad plan, device error) fails the whole step. Needs no step in flight.
  virtual absl::StatusOr<scheduler::StepOutput> execute(const scheduler::StepPlan& plan) = 0;

  // Queues `plan` to run after every step submitted before it. Inputs
  // kTokenFromPreviousStep are the tokens the previously submitted step samples. An error
  // means the step was not queued (a bad plan: the backend stays usable and the steps in
  // flight still complete; a device error: the backend is broken and collect() fails).
  // FailedPrecondition when kMaxStepsInFlight steps are already in flight.
  virtual absl::Status submit(const scheduler::StepPlan& plan) {
    if (ready_.size() >= kMaxStepsInFlight) {
      return absl::FailedPreconditionError(
          absl::StrCat("step ", plan.step_id, ": ", ready_.size(), " steps already in flight"));
    }
    absl::StatusOr<scheduler::StepOutput> out = execute(plan);
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

 private:
  std::deque<scheduler::StepOutput> ready_;  // synchronous default: outputs not collected yet
};

// Under overlapped scheduling a plan is made before the previous step's output is applied,
// so a sampling request's output_token_ids lack the token it sampled in that step
// (output_token_index says how many precede the one drawn now). Penalties need that token:
// for each such request of `step`, `storage` gets the known outputs plus the token from
// `previous` (request id -> token the previous step sampled) and the span points there.
// `storage` must outlive the step's sampling.
inline void add_in_flight_outputs(const std::unordered_map<uint64_t, int32_t>& previous, Step& step,
                                  std::vector<std::vector<int32_t>>& storage) {
  storage.clear();
  storage.reserve(step.meta.requests.size());  // never reallocated: spans into it stay valid
  for (RequestSampling& r : step.meta.requests) {
    if (static_cast<size_t>(r.output_token_index) != r.output_token_ids.size() + 1) continue;
    const auto it = previous.find(r.request_id);
    if (it == previous.end()) continue;
    std::vector<int32_t>& full =
        storage.emplace_back(r.output_token_ids.begin(), r.output_token_ids.end());
    full.push_back(it->second);
    r.output_token_ids = full;
  }
}

}  // namespace megaserve::engine
