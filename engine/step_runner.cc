#include "engine/step_runner.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/isa/isa.h"
#include "engine/planner/schedule_verifier.h"

namespace megaserve::engine {

void add_in_flight_outputs(const std::unordered_map<uint64_t, int32_t>& previous, Step& step,
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

bool needs_in_flight_outputs(const scheduler::StepPlan& plan) {
  for (const scheduler::StepRequest& r : plan.requests) {
    const scheduler::SamplingParams& p = r.sampling;
    if (static_cast<size_t>(r.output_token_index) == r.output_token_ids.size() + 1 &&
        (p.repetition_penalty != 1.0f || p.frequency_penalty != 0.0f ||
         p.presence_penalty != 0.0f)) {
      return true;
    }
  }
  return false;
}

StepRunner::StepRunner(const ModelConfig& config, Backend& backend)
    : backend_(backend),
      target_(backend.schedule_target()),
      builder_(config, target_.tiles, target_.tensor_parallel,
               ScheduleOptions{.record_accesses = target_.verify}) {}

StepRunner::~StepRunner() {
  for (Slot* slot : in_flight_) {
    if (!slot->output.has_value() && !backend_.collect().ok()) break;  // broken: nothing runs
  }
}

const Step& StepRunner::last_step() const {
  static const Step kNone;
  return last_collected_ != nullptr ? last_collected_->step : kNone;
}

StepRunner::Slot& StepRunner::free_slot() {
  for (Slot& s : slots_) {
    if (&s != last_collected_ &&
        std::find(in_flight_.begin(), in_flight_.end(), &s) == in_flight_.end()) {
      return s;
    }
  }
  // kMaxStepsInFlight + 1 slots: at most kMaxStepsInFlight - 1 in flight when one is built.
  return slots_[0];  // not reached
}

absl::Status StepRunner::submit(const scheduler::StepPlan& plan) {
  if (!broken_.ok()) return broken_;
  if (in_flight_.size() >= kMaxStepsInFlight) {
    return absl::FailedPreconditionError(
        absl::StrCat("step ", plan.step_id, ": ", in_flight_.size(), " steps already in flight"));
  }
  if (plan.kv_block_size != target_.kv_block_size) {
    return absl::InvalidArgumentError(absl::StrCat("step ", plan.step_id, ": kv_block_size ",
                                                   plan.kv_block_size, ", backend has ",
                                                   target_.kv_block_size));
  }
  // Inputs the previous step samples; checked before building, since a built step must run.
  for (const scheduler::StepRequest& r : plan.requests) {
    for (int32_t id : r.token_ids) {
      if (id == scheduler::kTokenFromPreviousStep && !previous_rows_.contains(r.request_id)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "step ", plan.step_id, " request ", r.request_id,
            ": input kTokenFromPreviousStep, but the previous step sampled nothing for it"));
      }
    }
  }
  Slot& slot = free_slot();
  slot.output.reset();
  saved_totals_ = builder_.barrier_totals();
  Step& step = slot.step;  // reused: its buffers keep their capacity from step to step
  if (absl::Status s = builder_.build_into(plan, target_.num_kv_blocks, step); !s.ok()) return s;
  // Penalties count the token each request sampled in the step before, which a plan made
  // while that step ran lacks: that step is collected now (after the build, which thus still
  // overlaps it, as the CUDA backend's wait for it used to).
  if (!previous_known_ && needs_in_flight_outputs(plan)) {
    if (absl::Status s = collect_early(); !s.ok()) {
      builder_.rewind_barrier_totals(saved_totals_);
      return s;
    }
  }
  StepMetadata& m = step.meta;
  for (int32_t t = 0; t < m.num_tokens; ++t) {
    int32_t& id = m.token_ids[t];
    if (id != scheduler::kTokenFromPreviousStep) continue;
    const uint64_t request = m.requests[m.token_request[t]].request_id;
    id = previous_known_ ? previous_sampled_.at(request)
                         : isa::previous_sample_ref(previous_rows_.at(request));
  }
  slot.outputs.clear();
  if (previous_known_) add_in_flight_outputs(previous_sampled_, step, slot.outputs);
  if (target_.verify) {
    if (absl::Status s = verify_step(step); !s.ok()) {
      broken_ = absl::FailedPreconditionError(
          absl::StrCat("step runner: step ", step.step_id, " failed verification: ", s.message()));
      return s;
    }
  }
  if (absl::Status s = backend_.submit(step); !s.ok()) {
    builder_.rewind_barrier_totals(saved_totals_);  // the step never runs
    return s;
  }
  previous_rows_.clear();
  for (int32_t s = 0; s < m.num_samples(); ++s) {
    previous_rows_[m.requests[m.sample_request[s]].request_id] = s;
  }
  previous_sampled_.clear();
  previous_known_ = false;
  in_flight_.push_back(&slot);
  return absl::OkStatus();
}

absl::Status StepRunner::take_output(Slot& slot, absl::StatusOr<scheduler::StepOutput>& out) {
  out = backend_.collect();
  if (!out.ok()) return out.status();
  if (out->step_id != slot.step.step_id) {
    return absl::InternalError(absl::StrCat("step runner: collected step ", out->step_id,
                                            ", expected step ", slot.step.step_id));
  }
  if (&slot == in_flight_.back()) {  // the last submitted: its tokens feed the next step
    previous_sampled_.clear();
    for (const scheduler::SampledToken& tok : out->sampled) {
      previous_sampled_[tok.request_id] = tok.token_id;
    }
    previous_known_ = true;
  }
  return absl::OkStatus();
}

absl::Status StepRunner::collect_early() {
  for (Slot* slot : in_flight_) {
    if (slot->output.has_value()) continue;
    absl::StatusOr<scheduler::StepOutput> out;
    if (absl::Status s = take_output(*slot, out); !s.ok()) return s;
    slot->output = *std::move(out);
  }
  return absl::OkStatus();
}

absl::StatusOr<scheduler::StepOutput> StepRunner::collect() {
  if (in_flight_.empty()) return absl::FailedPreconditionError("collect: no step in flight");
  Slot& slot = *in_flight_.front();
  absl::StatusOr<scheduler::StepOutput> out;
  if (slot.output.has_value()) {
    out = *std::move(slot.output);
    slot.output.reset();
  } else if (absl::Status s = take_output(slot, out); !s.ok()) {
    out = s;
  }
  in_flight_.pop_front();
  if (out.ok()) last_collected_ = &slot;
  return out;
}

absl::StatusOr<scheduler::StepOutput> StepRunner::execute(const scheduler::StepPlan& plan) {
  if (!in_flight_.empty()) {
    return absl::FailedPreconditionError(absl::StrCat("execute step ", plan.step_id, " with ",
                                                      in_flight_.size(),
                                                      " steps in flight (collect them first)"));
  }
  if (absl::Status s = submit(plan); !s.ok()) return s;
  return collect();
}

}  // namespace megaserve::engine
