// The common start of the GPU benchmarks (gpu_step_bench, gpu_profile_bench): the model
// configuration, a supported GPU, and the device copy bandwidth their memory floors divide
// by (printed). Failures are printed to stderr, prefixed by the benchmark's name.
#pragma once

#include <cstdio>
#include <optional>
#include <string>

#include "engine/cuda/cuda_backend.h"
#include "engine/model/model_config.h"

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

}  // namespace megaserve::engine
