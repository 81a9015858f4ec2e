// Persistent worker threads for the CPU interpreter's threaded mode: one per (rank, SM) queue
// of a step, kept between steps (as a persistent megakernel keeps its CTAs) so a step costs a
// wake-up, not a thread creation per queue.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace megaserve::engine::cpu {

class WorkerPool {
 public:
  WorkerPool() = default;
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;
  ~WorkerPool();

  // Runs job(0) .. job(n - 1) concurrently, each on its own worker thread (all n run at once,
  // so jobs may wait on each other), and returns when all have returned.
  void run(int n, const std::function<void(int)>& job);

 private:
  void loop(int index);

  std::mutex mu_;
  std::condition_variable start_, done_;
  std::vector<std::thread> threads_;
  const std::function<void(int)>* job_ = nullptr;
  uint64_t generation_ = 0;  // bumped per run(); a worker runs once per generation
  int active_ = 0;           // workers [0, active_) take part in the current generation
  int remaining_ = 0;
  bool stop_ = false;
};

}  // namespace megaserve::engine::cpu
