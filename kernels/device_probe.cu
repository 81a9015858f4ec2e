#include "kernels/device_probe.h"

#include <cuda_runtime.h>

namespace megaserve::kernels {

std::vector<DeviceInfo> probe_devices(std::string* why_none) {
  std::vector<DeviceInfo> devices;
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    if (why_none) *why_none = cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return devices;
  }
  if (count == 0 && why_none) *why_none = "the CUDA runtime sees no device";
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
    DeviceInfo info;
    info.ordinal = i;
    info.name = prop.name;
    info.compute_major = prop.major;
    info.compute_minor = prop.minor;
    info.sm_count = prop.multiProcessorCount;
    info.global_memory_bytes = prop.totalGlobalMem;
    info.max_shared_memory_per_block = prop.sharedMemPerBlockOptin;
    devices.push_back(info);
  }
  return devices;
}

}  // namespace megaserve::kernels
