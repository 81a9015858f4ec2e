// The interpreter's persistent worker pool: every job index runs exactly once per run(), all
// jobs of a run are live together (they can wait on each other), and the pool grows and
// shrinks its active set between runs.
#include "engine/cpu/cpu_worker_pool.h"

#include <atomic>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace megaserve::engine::cpu {
namespace {

TEST(CpuWorkerPoolTest, EachJobOnceAndAllConcurrent) {
  WorkerPool pool;
  for (int n : {3, 1, 8, 5, 8, 0, 2}) {
    std::vector<std::atomic<int>> runs(n);
    std::atomic<int> arrived{0};
    pool.run(n, [&](int i) {
      runs[i].fetch_add(1);
      // A barrier across all n jobs: deadlocks unless every job has its own live thread.
      arrived.fetch_add(1);
      while (arrived.load() < n) std::this_thread::yield();
    });
    for (int i = 0; i < n; ++i) EXPECT_EQ(runs[i].load(), 1) << "n " << n << " job " << i;
  }
}

TEST(CpuWorkerPoolTest, ManyShortRuns) {
  WorkerPool pool;
  std::atomic<int64_t> sum{0};
  for (int r = 0; r < 2000; ++r) pool.run(1 + r % 4, [&](int i) { sum.fetch_add(i + 1); });
  // Runs with n = 1, 2, 3, 4 add 1, 3, 6, 10; 500 of each.
  EXPECT_EQ(sum.load(), 500 * (1 + 3 + 6 + 10));
}

}  // namespace
}  // namespace megaserve::engine::cpu
