// The common start of the GPU benchmarks (gpu_step_bench, gpu_profile_bench,
// gpu_projection_bench): the model configuration, a supported GPU, and the device copy
// bandwidth their memory floors divide by (printed); failures are printed to stderr, prefixed
// by the benchmark's name. And the synthetic steps the profile and projection benchmarks run.
#pragma once

#include <cstdio>
#include <optional>
#include <string>

#include "engine/cuda/cuda_backend.h"
#include "engine/model/model_config.h"
#include "scheduler/step_plan.h"

namespace megaserve::engine {

struct GpuBenchStart {
  ModelConfig config;
  double bandwidth = 0;  // bytes per second, read + write
};

inline std::optional<GpuBenchStart> start_gpu_bench(const char* name,
                                                    const std::string& config_path) {
  auto config = load_model_config_file(config_path);
  if (!config.ok()) {
    std::fprintf(stderr, "%s\n", config.status().ToString().c_str());
    return std::nullopt;
  }
  std::string why;
  if (!cuda_backend_supported(&why)) {
    std::fprintf(stderr, "%s: %s\n", name, why.c_str());
    return std::nullopt;
  }
  const absl::StatusOr<double> bandwidth = device_copy_bandwidth(0);
  if (!bandwidth.ok()) {
    std::fprintf(stderr, "%s\n", bandwidth.status().ToString().c_str());
    return std::nullopt;
  }
  std::printf("device copy bandwidth (1 GiB D2D, read + write): %.3f TB/s\n", *bandwidth * 1e-12);
  return GpuBenchStart{*std::move(config), *bandwidth};
}

inline constexpr int32_t kBenchBlockSize = 16;  // KV block size of make_plan's steps

// `batch` requests with `context` cached tokens each decoding one token (or, when
// `prefill_tokens` > 0, one request prefilling that many from position 0), sampled greedily
// when `sample`. The KV cache is not filled first: timing does not depend on the cached values
// (zeros).
inline scheduler::StepPlan make_plan(uint64_t step_id, int batch, int context, int prefill_tokens,
                                     bool sample = true) {
  scheduler::StepPlan plan;
  plan.step_id = step_id;
  plan.kv_block_size = kBenchBlockSize;
  const int tokens = prefill_tokens > 0 ? prefill_tokens : 1;
  const int first = prefill_tokens > 0 ? 0 : context;
  const int blocks = (first + tokens + kBenchBlockSize - 1) / kBenchBlockSize;
  for (int i = 0; i < batch; ++i) {
    scheduler::StepRequest r;
    r.request_id = step_id * 100000 + i + 1;
    r.first_position = first;
    r.token_ids.assign(tokens, 1000 + i);
    for (int k = 0; k < blocks; ++k) r.block_table.push_back(i * blocks + k);
    r.sample = sample;
    r.sampling.temperature = 0.0f;
    plan.requests.push_back(r);
  }
  return plan;
}

}  // namespace megaserve::engine
