#include "engine/model/host_memory.h"

#include <sys/resource.h>

#include <cstdint>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace megaserve::engine {
namespace {

// The value of a "Key:   123 kB" line of a /proc file, in bytes; -1 when absent.
int64_t read_proc_kb(const char* file, const std::string& key) {
  std::ifstream in(file);
  for (std::string line; std::getline(in, line);) {
    if (line.compare(0, key.size(), key) != 0 || line.size() <= key.size() ||
        line[key.size()] != ':') {
      continue;
    }
    std::istringstream value(line.substr(key.size() + 1));
    int64_t kb = -1;
    value >> kb;
    return kb < 0 ? -1 : kb * 1024;
  }
  return -1;
}

std::string gib(int64_t bytes) {
  return absl::StrFormat("%.2f GiB", static_cast<double>(bytes) / (1 << 30));
}

}  // namespace

HostMemory available_host_memory() {
  HostMemory memory{std::numeric_limits<int64_t>::max(), "nothing known"};
  if (const int64_t mem_available = read_proc_kb("/proc/meminfo", "MemAvailable");
      mem_available >= 0) {
    memory = {mem_available, "MemAvailable in /proc/meminfo"};
  }
  rlimit limit{};
  if (getrlimit(RLIMIT_AS, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY) {
    const int64_t mapped = std::max<int64_t>(read_proc_kb("/proc/self/status", "VmSize"), 0);
    const int64_t left = std::max<int64_t>(static_cast<int64_t>(limit.rlim_cur) - mapped, 0);
    if (left < memory.available_bytes) {
      memory = {left,
                absl::StrCat("RLIMIT_AS (ulimit -v) of ", static_cast<int64_t>(limit.rlim_cur),
                             " bytes, ", mapped, " already mapped")};
    }
  }
  return memory;
}

absl::Status check_host_memory(const std::string& what, int64_t bytes, const HostMemory& memory) {
  if (bytes <= memory.available_bytes) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrCat(
      what, ": needs ", bytes, " bytes (", gib(bytes), "), ", memory.available_bytes,
      " available (", gib(memory.available_bytes), "; limited by ", memory.limited_by, ")"));
}

absl::Status check_host_memory(const std::string& what, int64_t bytes) {
  return check_host_memory(what, bytes, available_host_memory());
}

}  // namespace megaserve::engine
