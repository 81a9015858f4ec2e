// Where prompts are tokenized: off gRPC's callback threads, which every other call waits
// on (a reaction must never block, STYLE.md 15). Two lanes, each with its own threads and a
// bounded queue: short texts, and long ones, so a short prompt never queues behind a long one.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace megaserve::server {

struct TokenizerPoolOptions {
  int short_threads = 2;
  int long_threads = 1;
  size_t long_text_bytes = 64 << 10;  // a text this long or longer takes the long lane
  size_t max_queued = 1024;           // per lane
};

class TokenizerPool {
 public:
  explicit TokenizerPool(TokenizerPoolOptions options = {});
  // Runs every job still queued, then joins the threads.
  ~TokenizerPool();
  TokenizerPool(const TokenizerPool&) = delete;
  TokenizerPool& operator=(const TokenizerPool&) = delete;

  // Queues `job` on the lane for a text of `text_bytes`; false (and `job` dropped unrun)
  // when that lane's queue is full.
  bool post(size_t text_bytes, std::function<void()> job);

 private:
  struct Lane {
    std::mutex mu;
    std::condition_variable cv;
    std::deque<std::function<void()>> jobs;
    bool stop = false;
    std::vector<std::thread> threads;
  };
  static void run(Lane* lane);
  void start(Lane* lane, int threads);
  static void stop(Lane* lane);

  const TokenizerPoolOptions options_;
  Lane short_lane_;
  Lane long_lane_;
};

}  // namespace megaserve::server
