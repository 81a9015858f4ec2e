#include "engine/cpu/cpu_backend.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/planner/schedule_builder.h"

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
  absl::StatusOr<std::unique_ptr<CpuInterpreter>> in =
      CpuInterpreter::create(config, b->weights_, options.tensor_parallel, options.num_kv_blocks,
                             options.kv_block_size, schedule_num_barriers(config));
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

ScheduleTarget CpuBackend::schedule_target() const {
  return ScheduleTarget{.tiles = options_.tiles,
                        .tensor_parallel = options_.tensor_parallel,
                        .num_kv_blocks = options_.num_kv_blocks,
                        .kv_block_size = options_.kv_block_size,
                        .verify = options_.verify};
}

absl::StatusOr<scheduler::StepOutput> CpuBackend::execute(const Step& step) {
  if (broken_) {
    return absl::FailedPreconditionError("cpu backend: an earlier step failed mid-run");
  }
  std::vector<scheduler::SampledToken> sampled;
  ExecutionOptions execution = options_.execution;
  std::vector<InstructionTiming> timings;
  if (record_timings_) execution.timings = &timings;
  if (absl::Status s = interpreter_->run(step, execution, &sampled, last_sampled_); !s.ok()) {
    broken_ = true;
    return s;
  }
  if (record_timings_) keep_timings(step.step_id, std::move(timings));
  last_sampled_.clear();
  for (const auto& tok : sampled) last_sampled_.push_back(tok.token_id);
  scheduler::StepOutput out;
  out.step_id = step.step_id;
  out.sampled = std::move(sampled);
  return out;
}

}  // namespace megaserve::engine
