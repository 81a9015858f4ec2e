#include <utility>

#include "engine/engine.h"

namespace megaserve::engine {

void RequestOutput::set_notify(std::function<void()> notify) {
  std::function<void()> pending_notify;
  {
    std::lock_guard<std::mutex> lock(mu_);
    notify_ = std::move(notify);
    if (!events_.empty()) pending_notify = notify_;
  }
  // Events that arrived before the consumer attached must not wait for the next push.
  if (pending_notify) pending_notify();
}

std::vector<RequestEvent> RequestOutput::take() {
  std::lock_guard<std::mutex> lock(mu_);
  return std::exchange(events_, {});
}

std::vector<RequestEvent> RequestOutput::wait() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [this] { return !events_.empty(); });
  return std::exchange(events_, {});
}

void RequestOutput::push(RequestEvent event) {
  std::function<void()> notify;
  {
    std::lock_guard<std::mutex> lock(mu_);
    events_.push_back(std::move(event));
    notify = notify_;
  }
  cv_.notify_all();
  // Called outside the lock: the consumer's notify may call take().
  if (notify) notify();
}

}  // namespace megaserve::engine
