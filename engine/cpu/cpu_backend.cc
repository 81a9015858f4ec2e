#include "engine/cpu/cpu_backend.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/planner/schedule_verifier.h"

namespace megaserve::engine {

absl::StatusOr<std::unique_ptr<CpuBackend>> CpuBackend::create(const ModelConfig& config,
                                                               ModelWeights weights,
                                                               const CpuBackendOptions& options) {
  if (absl::Status s = check_tensor_parallel(config, options.tensor_parallel); !s.ok()) return s;
  if (options.num_sms < 1) {
    return absl::InvalidArgumentError(absl::StrCat("num_sms ", options.num_sms, " < 1"));
  }
  std::unique_ptr<CpuBackend> b(new CpuBackend());
  b->config_ = config;
  b->weights_ = std::move(weights);
  b->options_ = options;
  TileConfig tiles = options.default_tiles ? cpu_tile_config(options.num_sms) : options.tiles;
  tiles.num_sms = options.num_sms;
  if (absl::Status s = check_tile_config(tiles); !s.ok()) return s;
  b->options_.tiles = tiles;
  b->builder_ = std::make_unique<ScheduleBuilder>(
      config, tiles, options.tensor_parallel, ScheduleOptions{.record_accesses = options.verify});
  absl::StatusOr<std::unique_ptr<CpuInterpreter>> in =
      CpuInterpreter::create(config, b->weights_, options.tensor_parallel, options.num_kv_blocks,
                             options.kv_block_size, b->builder_->num_barriers());
  if (!in.ok()) return in.status();
  b->interpreter_ = std::move(*in);
  return b;
}

std::string CpuBackend::describe() const {
  return absl::StrCat("cpu interpreter: tp ", options_.tensor_parallel, ", ", options_.num_sms,
                      " virtual SMs per rank, ", options_.num_kv_blocks, " KV blocks of ",
                      options_.kv_block_size, " tokens, weights ",
                      dtype_name(weights_.embedding.dtype));
}

absl::StatusOr<scheduler::StepOutput> CpuBackend::execute(const scheduler::StepPlan& plan) {
  if (broken_) {
    return absl::FailedPreconditionError("cpu backend: an earlier step failed mid-run");
  }
  if (plan.kv_block_size != options_.kv_block_size) {
    return absl::InvalidArgumentError(absl::StrCat("step ", plan.step_id, ": kv_block_size ",
                                                   plan.kv_block_size, ", backend has ",
                                                   options_.kv_block_size));
  }
  // Inputs sampled by the previous step (the GPU's sample op writes them in place); checked
  // before building, since a built step must run.
  for (const auto& r : plan.requests) {
    for (int32_t id : r.token_ids) {
      if (id == scheduler::kTokenFromPreviousStep && !previous_sampled_.contains(r.request_id)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "step ", plan.step_id, " request ", r.request_id,
            ": input kTokenFromPreviousStep, but the previous step sampled nothing for it"));
      }
    }
  }
  Step* step = &last_step_;  // reused: its buffers keep their capacity from step to step
  if (absl::Status s = builder_->build_into(plan, options_.num_kv_blocks, *step); !s.ok()) {
    return s;
  }
  for (int32_t t = 0; t < step->meta.num_tokens; ++t) {
    int32_t& id = step->meta.token_ids[t];
    if (id != scheduler::kTokenFromPreviousStep) continue;
    id = previous_sampled_.at(step->meta.requests[step->meta.token_request[t]].request_id);
  }
  add_in_flight_outputs(previous_sampled_, *step, in_flight_outputs_);
  if (options_.verify) {
    if (absl::Status s = verify_step(*step); !s.ok()) {
      broken_ = true;
      return s;
    }
  }
  std::vector<scheduler::SampledToken> sampled;
  if (absl::Status s = interpreter_->run(*step, options_.execution, &sampled); !s.ok()) {
    broken_ = true;
    return s;
  }
  previous_sampled_.clear();
  for (const auto& tok : sampled) previous_sampled_[tok.request_id] = tok.token_id;
  scheduler::StepOutput out;
  out.step_id = plan.step_id;
  out.sampled = std::move(sampled);
  return out;
}

}  // namespace megaserve::engine
