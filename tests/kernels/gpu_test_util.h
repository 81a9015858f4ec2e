// Shared by the gpu-labelled suites: skip visibly where no supported GPU is present, fail
// instead when MEGASERVE_EXPECT_GPU=1 (scripts/gpu-suite sets it on the GPU host).
#pragma once

#include <cstdlib>
#include <string>

#include "engine/cuda/cuda_backend.h"
#include "gtest/gtest.h"

namespace megaserve::testing {

inline bool gpu_expected() {
  const char* v = std::getenv("MEGASERVE_EXPECT_GPU");
  return v != nullptr && std::string(v) == "1";
}

}  // namespace megaserve::testing

#define MEGASERVE_REQUIRE_GPU()                                       \
  do {                                                                \
    std::string why_no_gpu_;                                          \
    if (!::megaserve::engine::cuda_backend_supported(&why_no_gpu_)) { \
      if (::megaserve::testing::gpu_expected()) {                     \
        FAIL() << "MEGASERVE_EXPECT_GPU=1 but " << why_no_gpu_;       \
      }                                                               \
      GTEST_SKIP() << "no supported GPU: " << why_no_gpu_;            \
    }                                                                 \
  } while (0)
