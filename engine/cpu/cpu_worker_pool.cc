#include "engine/cpu/cpu_worker_pool.h"

namespace megaserve::engine::cpu {

WorkerPool::~WorkerPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  start_.notify_all();
  for (auto& t : threads_) t.join();
}

void WorkerPool::run(int n, const std::function<void(int)>& job) {
  if (n <= 0) return;
  std::unique_lock<std::mutex> lock(mu_);
  while (static_cast<int>(threads_.size()) < n) {
    const int index = static_cast<int>(threads_.size());
    threads_.emplace_back([this, index] { loop(index); });
  }
  job_ = &job;
  active_ = n;
  remaining_ = n;
  ++generation_;
  start_.notify_all();
  done_.wait(lock, [this] { return remaining_ == 0; });
  job_ = nullptr;
}

void WorkerPool::loop(int index) {
  uint64_t seen = 0;
  std::unique_lock<std::mutex> lock(mu_);
  // A worker created during run() must join the generation that created it.
  seen = generation_ - (index < active_ && remaining_ > 0 ? 1 : 0);
  for (;;) {
    start_.wait(lock, [&] { return stop_ || generation_ != seen; });
    if (stop_) return;
    seen = generation_;
    if (index >= active_) continue;
    const std::function<void(int)>* job = job_;
    lock.unlock();
    (*job)(index);
    lock.lock();
    if (--remaining_ == 0) done_.notify_one();
  }
}

}  // namespace megaserve::engine::cpu
