#include "engine/backend_choice.h"

#include <algorithm>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/planner/schedule_shard.h"
#include "spdlog/spdlog.h"
#if MEGASERVE_WITH_CUDA_BACKEND
#include "engine/cuda/cuda_backend.h"
#endif

namespace megaserve::engine {

absl::StatusOr<BackendChoice> choose_backend(const BackendSettings& settings) {
  const std::string& asked = settings.backend;
  if (asked == "cpu") return BackendChoice{false, "backend cpu: asked for by the configuration"};
#if MEGASERVE_WITH_CUDA_BACKEND
  std::string why_not;
  const bool supported = cuda_backend_supported(&why_not);
  if (asked == "cuda") {
    if (!supported) {
      return absl::FailedPreconditionError(
          absl::StrCat("engine.backend \"cuda\": no usable GPU: ", why_not));
    }
    return BackendChoice{true, "backend cuda: asked for by the configuration"};
  }
  if (supported) return BackendChoice{true, "backend auto: a supported GPU is present"};
  return BackendChoice{false, absl::StrCat("backend auto: no supported GPU (", why_not,
                                           "), using the CPU interpreter")};
#else
  if (asked == "cuda") {
    return absl::FailedPreconditionError(
        "engine.backend \"cuda\": this megaserve was built without the CUDA backend (no CUDA "
        "toolkit at build time)");
  }
  return BackendChoice{false,
                       "backend auto: built without the CUDA backend, using the CPU interpreter"};
#endif
}

DType weights_dtype(const BackendChoice& choice) {
  return choice.cuda ? DType::kBF16 : DType::kF32;
}

absl::Status check_backend_settings(const BackendSettings& settings, const BackendChoice& choice,
                                    const ModelConfig& model) {
  if (absl::Status s = check_tensor_parallel(model, settings.tensor_parallel); !s.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("engine.tensor_parallel_size: ", s.message(), " of this model"));
  }
  if (!choice.cuda || settings.tensor_parallel == 1) return absl::OkStatus();
#if MEGASERVE_WITH_CUDA_BACKEND
  // The GPUs the degree needs (or, with the ranks on one GPU, its SMs), probed without
  // touching the weights.
  if (absl::Status s = check_cuda_tensor_parallel(model, settings.tensor_parallel,
                                                  settings.tp_ranks_on_one_gpu, /*device=*/0);
      !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("engine.tensor_parallel_size: ", s.message()));
  }
  return absl::OkStatus();
#else
  return absl::FailedPreconditionError(
      absl::StrCat("engine.tensor_parallel_size ", settings.tensor_parallel,
                   ": this megaserve was built without the CUDA backend"));
#endif
}

absl::StatusOr<std::unique_ptr<Backend>> make_backend(const BackendSettings& settings,
                                                      const BackendChoice& choice,
                                                      const ModelConfig& model,
                                                      ModelWeights weights) {
  if (absl::Status s = check_backend_settings(settings, choice, model); !s.ok()) return s;
  std::unique_ptr<Backend> backend;
#if MEGASERVE_WITH_CUDA_BACKEND
  if (choice.cuda) {
    CudaBackendOptions options;
    options.kv_block_size = settings.kv_block_size;
    options.num_kv_blocks = settings.num_kv_blocks;
    options.memory_fraction = settings.gpu_memory_fraction;
    options.step_watchdog_ms = settings.step_watchdog_ms;
    options.tensor_parallel = settings.tensor_parallel;
    options.tp_ranks_on_one_gpu = settings.tp_ranks_on_one_gpu;
    options.verify_schedules = settings.verify_schedules;
    auto cuda = CudaBackend::create(model, std::move(weights), options);
    if (!cuda.ok()) return cuda.status();
    backend = *std::move(cuda);
  }
#endif
  if (!choice.cuda) {
    CpuBackendOptions options;
    options.tensor_parallel = settings.tensor_parallel;
    options.kv_block_size = settings.kv_block_size;
    options.num_kv_blocks = cpu_num_kv_blocks(model, settings);
    const unsigned threads = settings.cpu_threads > 0
                                 ? settings.cpu_threads
                                 : std::max(1u, std::thread::hardware_concurrency());
    options.num_sms = static_cast<int>(threads);
    options.execution.mode = threads > 1 ? ExecutionMode::kThreaded : ExecutionMode::kSequential;
    options.verify = settings.verify_schedules;
    auto cpu = CpuBackend::create(model, std::move(weights), options);
    if (!cpu.ok()) return cpu.status();
    backend = *std::move(cpu);
  }
  spdlog::info("{} ({})", choice.why, backend->describe());
  return backend;
}

namespace {

// fp32 K and V of one block for every layer.
int64_t cpu_kv_block_bytes(const ModelConfig& model, int32_t kv_block_size) {
  return int64_t{2} * model.num_layers * model.num_kv_heads * model.head_dim * kv_block_size *
         int64_t{sizeof(float)};
}

}  // namespace

int32_t cpu_num_kv_blocks(const ModelConfig& model, const BackendSettings& settings) {
  return settings.num_kv_blocks > 0
             ? settings.num_kv_blocks
             : cpu_kv_blocks_for(model, settings.kv_block_size, settings.cpu_kv_cache_mib);
}

int32_t cpu_kv_blocks_for(const ModelConfig& model, int32_t kv_block_size, uint32_t mib) {
  const int64_t bytes_per_block = cpu_kv_block_bytes(model, kv_block_size);
  if (bytes_per_block <= 0) return 0;
  return static_cast<int32_t>(std::max<int64_t>(1, (int64_t{mib} << 20) / bytes_per_block));
}

int64_t cpu_kv_cache_bytes(const ModelConfig& model, const BackendSettings& settings) {
  return int64_t{cpu_num_kv_blocks(model, settings)} *
         cpu_kv_block_bytes(model, settings.kv_block_size);
}

void resolve_eos_token_ids(ModelConfig& model, int32_t tokenizer_eos_id) {
  if (model.eos_token_ids.empty() && tokenizer_eos_id >= 0) {
    model.eos_token_ids = {tokenizer_eos_id};
  }
}

}  // namespace megaserve::engine
