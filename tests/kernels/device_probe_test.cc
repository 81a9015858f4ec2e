#include "kernels/device_probe.h"

#include <cstdlib>
#include <string>

#include "gtest/gtest.h"

namespace megaserve::kernels {
namespace {

// MEGASERVE_EXPECT_GPU=1 (set by scripts/gpu-suite on a GPU host) turns "no device" into a
// failure instead of a skip.
bool gpu_expected() {
  const char* v = std::getenv("MEGASERVE_EXPECT_GPU");
  return v != nullptr && std::string(v) == "1";
}

TEST(DeviceProbe, NoDeviceComesWithAReason) {
  std::string why;
  auto devices = probe_devices(&why);
  if (!devices.empty()) GTEST_SKIP() << "a GPU is present; this case covers machines without";
  ASSERT_FALSE(gpu_expected()) << "MEGASERVE_EXPECT_GPU=1 but no device: " << why;
  EXPECT_FALSE(why.empty());
}

TEST(DeviceProbe, HopperDevicesAreSupported) {
  std::string why;
  auto devices = probe_devices(&why);
  if (devices.empty()) {
    ASSERT_FALSE(gpu_expected()) << "no device: " << why;
    GTEST_SKIP() << "no GPU on this machine: " << why;
  }
  for (const auto& d : devices) {
    EXPECT_GT(d.sm_count, 0) << d.name;
    EXPECT_GT(d.global_memory_bytes, 0u) << d.name;
    if (d.compute_major == 9) {
      EXPECT_TRUE(d.supported()) << d.name;
      EXPECT_GE(d.max_shared_memory_per_block, 200u * 1024) << d.name;  // Hopper: 227 KiB
    }
  }
}

}  // namespace
}  // namespace megaserve::kernels
