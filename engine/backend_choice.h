// The backend choice: which Backend (engine/backend.h) runs the model, built from plain
// settings, and the sentence the log gives for it. CUDA when asked for or, with "auto", when
// this build has the CUDA backend and a supported GPU is present; else the CPU interpreter.
// Also where the stopping tokens are settled, before the engine is built.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/model/model_config.h"
#include "engine/model/weights.h"

namespace megaserve::engine {

struct BackendSettings {
  std::string backend = "auto";  // "auto", "cpu" or "cuda"
  int tensor_parallel = 1;
  // CUDA: run the tensor_parallel ranks on one GPU's SMs (the debug placement,
  // engine/cuda/cuda_backend.h); without it a degree above 1 needs that many GPUs. The CPU
  // interpreter simulates the ranks either way.
  bool tp_ranks_on_one_gpu = false;
  int32_t kv_block_size = 16;
  int32_t num_kv_blocks = 0;  // 0: from memory (GPU) or cpu_kv_cache_mib (CPU)
  double gpu_memory_fraction = 0.9;
  int step_watchdog_ms = 10000;
  uint32_t cpu_kv_cache_mib = 256;
  uint32_t cpu_threads = 0;  // 0: every hardware thread
  bool verify_schedules = false;
};

struct BackendChoice {
  bool cuda = false;
  std::string why;  // for the log, e.g. "backend auto: a supported GPU is present"
};

absl::StatusOr<BackendChoice> choose_backend(const BackendSettings& settings);

// The dtype the chosen backend wants its weights in: the CPU interpreter computes in fp32,
// the GPU takes bf16 (converted while loading, so the host never holds an fp32 copy of a
// large model).
DType weights_dtype(const BackendChoice& choice);

// What make_backend would refuse for `settings` on `model` whatever the weights (a
// tensor-parallel degree that does not divide the model's heads, or that the backend cannot
// run: more ranks than visible GPUs, a GPU placement not implemented), found before any
// weight is loaded. Messages start with the setting they blame.
absl::Status check_backend_settings(const BackendSettings& settings, const BackendChoice& choice,
                                    const ModelConfig& model);

// Builds the chosen backend over `weights` and logs the choice with its description.
absl::StatusOr<std::unique_ptr<Backend>> make_backend(const BackendSettings& settings,
                                                      const BackendChoice& choice,
                                                      const ModelConfig& model,
                                                      ModelWeights weights);

// The CPU backend's KV blocks: settings.num_kv_blocks, or as many as cpu_kv_cache_mib holds.
int32_t cpu_num_kv_blocks(const ModelConfig& model, const BackendSettings& settings);

// KV blocks that fit in `mib` MiB of fp32 K and V for every layer (the CPU backend's cache).
int32_t cpu_kv_blocks_for(const ModelConfig& model, int32_t kv_block_size, uint32_t mib);

// The bytes of the CPU backend's KV cache under `settings` (num_kv_blocks, or what
// cpu_kv_cache_mib holds), in 64 bits; what make_backend allocates for it.
int64_t cpu_kv_cache_bytes(const ModelConfig& model, const BackendSettings& settings);

// The one list of stopping tokens: config.json's (or generation_config.json's) EOS ids, or,
// when the model names none, the tokenizer's EOS. Call before Engine::create, and give the
// same list to the output side, so that the scheduler stops on every EOS the text hides.
void resolve_eos_token_ids(ModelConfig& model, int32_t tokenizer_eos_id);

}  // namespace megaserve::engine
