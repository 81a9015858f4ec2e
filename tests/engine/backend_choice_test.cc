// check_backend_settings (engine/backend_choice.h): tensor-parallel mistakes are refused before
// any weight loads, with a message that names the setting and the problem: a degree that does
// not divide the heads (either backend); on CUDA, more ranks than visible GPUs, a multi-GPU
// placement (not implemented), and the one-GPU debug placement's own checks.
#include "engine/backend_choice.h"

#include <string>

#include "gtest/gtest.h"
#include "tests/support/safetensors_writer.h"
#if MEGASERVE_WITH_CUDA_BACKEND
#include "engine/cuda/cuda_backend.h"
#include "kernels/device_probe.h"
#endif

namespace megaserve::engine {
namespace {

bool has(const absl::Status& s, const std::string& text) {
  return s.message().find(text) != std::string::npos;
}

TEST(BackendChoiceTest, DegreeThatDoesNotDivideTheHeadsIsNamedForEitherBackend) {
  const ModelConfig model = testing::tiny_model_config(ModelFamily::kLlama);  // 4 heads, 2 kv
  BackendSettings settings;
  settings.tensor_parallel = 4;  // divides the 4 heads, not the 2 kv heads
  for (bool cuda : {false, true}) {
    const absl::Status s = check_backend_settings(settings, BackendChoice{cuda, ""}, model);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_TRUE(has(s,
                    "engine.tensor_parallel_size: tensor_parallel 4 does not divide "
                    "num_heads 4 and num_kv_heads 2"))
        << s;
  }
  settings.tensor_parallel = 2;  // the CPU interpreter simulates the ranks
  EXPECT_TRUE(check_backend_settings(settings, BackendChoice{false, ""}, model).ok());
}

TEST(BackendChoiceTest, CudaDegreeNeedsItsGpusOrTheOneGpuPlacement) {
  const ModelConfig model = testing::tiny_model_config(ModelFamily::kLlama);
  BackendSettings settings;
  settings.tensor_parallel = 2;
  const absl::Status s = check_backend_settings(settings, BackendChoice{true, ""}, model);
  ASSERT_FALSE(s.ok());
  EXPECT_TRUE(has(s, "engine.tensor_parallel_size: tensor_parallel 2")) << s;
#if MEGASERVE_WITH_CUDA_BACKEND
  std::string why;
  const int visible = static_cast<int>(kernels::probe_devices(&why).size());
  if (visible < 2) {
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
    EXPECT_TRUE(has(s, "needs 2 GPUs, " + std::to_string(visible) + " visible")) << s;
  } else {
    EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented) << s;
  }
  EXPECT_TRUE(has(s, "tp_ranks_on_one_gpu")) << s;  // the way to run it anyway
  // The one-GPU placement asks for a device with at least as many SMs as ranks.
  settings.tp_ranks_on_one_gpu = true;
  const absl::Status one = check_backend_settings(settings, BackendChoice{true, ""}, model);
  if (visible == 0) {
    EXPECT_EQ(one.code(), absl::StatusCode::kFailedPrecondition) << one;
    EXPECT_TRUE(has(one, "on one GPU: no CUDA device 0")) << one;
  } else {
    EXPECT_TRUE(one.ok()) << one;
  }
  settings.tensor_parallel = 16;  // 16 divides no head count here; more than a launch holds
  EXPECT_FALSE(check_backend_settings(settings, BackendChoice{true, ""}, model).ok());
#else
  EXPECT_TRUE(has(s, "built without the CUDA backend")) << s;
#endif
}

}  // namespace
}  // namespace megaserve::engine
