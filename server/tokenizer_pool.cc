#include "server/tokenizer_pool.h"

#include <algorithm>
#include <utility>

namespace megaserve::server {

TokenizerPool::TokenizerPool(TokenizerPoolOptions options) : options_(options) {
  start(&short_lane_, options_.short_threads);
  start(&long_lane_, options_.long_threads);
}

TokenizerPool::~TokenizerPool() {
  stop(&short_lane_);
  stop(&long_lane_);
}

void TokenizerPool::start(Lane* lane, int threads) {
  for (int i = 0; i < std::max(1, threads); ++i) lane->threads.emplace_back(run, lane);
}

void TokenizerPool::stop(Lane* lane) {
  {
    std::lock_guard<std::mutex> lock(lane->mu);
    lane->stop = true;
  }
  lane->cv.notify_all();
  for (std::thread& thread : lane->threads) thread.join();
}

bool TokenizerPool::post(size_t text_bytes, std::function<void()> job) {
  Lane& lane = text_bytes >= options_.long_text_bytes ? long_lane_ : short_lane_;
  {
    std::lock_guard<std::mutex> lock(lane.mu);
    if (lane.jobs.size() >= options_.max_queued) return false;
    lane.jobs.push_back(std::move(job));
  }
  lane.cv.notify_one();
  return true;
}

void TokenizerPool::run(Lane* lane) {
  while (true) {
    std::function<void()> job;
    {
      std::unique_lock<std::mutex> lock(lane->mu);
      lane->cv.wait(lock, [lane] { return lane->stop || !lane->jobs.empty(); });
      if (lane->jobs.empty()) return;  // stopping, and nothing left to run
      job = std::move(lane->jobs.front());
      lane->jobs.pop_front();
    }
    job();
  }
}

}  // namespace megaserve::server
