// The host-memory check made before large allocations (issue 18 item 6).
#include "engine/model/host_memory.h"

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace megaserve::engine {
namespace {

using ::testing::HasSubstr;

TEST(HostMemoryTest, RefusalSaysWhatNeedsHowMuchAndWhatIsAvailable) {
  const HostMemory memory{1000, "a test"};
  EXPECT_TRUE(check_host_memory("weights", 1000, memory).ok());
  const absl::Status status = check_host_memory("weights", 1001, memory);
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(status.message()),
              HasSubstr("weights: needs 1001 bytes (0.00 GiB), 1000 available"));
  EXPECT_THAT(std::string(status.message()), HasSubstr("limited by a test"));
}

TEST(HostMemoryTest, MemAvailableIsKnown) {
  const HostMemory memory = available_host_memory();
  EXPECT_GT(memory.available_bytes, 0);
  EXPECT_LT(memory.available_bytes, int64_t{1} << 50);
}

// In a child, so that the limit does not outlive the test.
TEST(HostMemoryTest, AnAddressSpaceLimitBoundsWhatIsAvailable) {
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    const rlimit limit{rlim_t{3} << 30, rlim_t{3} << 30};
    if (setrlimit(RLIMIT_AS, &limit) != 0) _exit(2);
    const HostMemory memory = available_host_memory();
    const bool ok = memory.available_bytes < (int64_t{3} << 30) &&
                    memory.limited_by.find("RLIMIT_AS") != std::string::npos &&
                    !check_host_memory("8B weights", int64_t{16} << 30).ok();
    _exit(ok ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

}  // namespace
}  // namespace megaserve::engine
