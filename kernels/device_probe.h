// Which CUDA devices this process can use, asked of the CUDA runtime (linked statically,
// so the answer is "none, and why" on a machine with no driver rather than a load failure).
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace megaserve::kernels {

struct DeviceInfo {
  int ordinal = 0;
  std::string name;
  int compute_major = 0;
  int compute_minor = 0;
  int sm_count = 0;
  std::size_t global_memory_bytes = 0;
  std::size_t max_shared_memory_per_block = 0;  // opt-in maximum, for the megakernel's CTA

  // The megakernel is compiled for sm_90a only: Hopper (H100, H200).
  bool supported() const { return compute_major == 9 && compute_minor == 0; }
};

// Every visible device; when there are none, `why_none` (if given) says why, in the
// runtime's words (no driver, no device, ...).
std::vector<DeviceInfo> probe_devices(std::string* why_none);

}  // namespace megaserve::kernels
