// How much host memory the process may still take, and the check made before a large
// allocation (weights, dummy weights, the CPU KV cache), so that a model too large for the
// machine or for an address-space limit ends in "needs N bytes, M available", not in
// std::bad_alloc and SIGABRT.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"

namespace megaserve::engine {

struct HostMemory {
  int64_t available_bytes = 0;
  std::string limited_by;  // e.g. "MemAvailable in /proc/meminfo", "RLIMIT_AS (ulimit -v)"
};

// The smaller of MemAvailable (/proc/meminfo) and, when RLIMIT_AS is set, the limit less the
// address space already mapped (VmSize in /proc/self/status). INT64_MAX when neither is
// known.
HostMemory available_host_memory();

// ResourceExhausted "<what>: needs N bytes (x GiB), M available (limited by ...)" when
// `bytes` exceed what is available.
absl::Status check_host_memory(const std::string& what, int64_t bytes, const HostMemory& memory);
absl::Status check_host_memory(const std::string& what, int64_t bytes);

}  // namespace megaserve::engine
