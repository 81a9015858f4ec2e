#include "tests/server/fake_engine.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace megaserve::testing {

FakeEngine::FakeEngine(FakeEngineOptions options) : options_(std::move(options)) {
  thread_ = std::thread([this] { loop(); });
}

FakeEngine::~FakeEngine() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

absl::StatusOr<std::shared_ptr<engine::RequestOutput>> FakeEngine::submit(
    engine::GenerateRequest request) {
  std::lock_guard<std::mutex> lock(mu_);
  if (draining_) return absl::UnavailableError("fake engine: draining");
  if (request.prompt_token_ids.empty()) return absl::InvalidArgumentError("empty prompt");
  if (static_cast<int>(waiting_.size()) >= options_.max_waiting) {
    return absl::ResourceExhaustedError(
        absl::StrCat("waiting queue full (", options_.max_waiting, " requests)"));
  }
  const uint64_t id = next_id_++;
  ++submitted_;
  Request r;
  r.id = id;
  r.request = std::move(request);
  r.output = std::make_shared<engine::RequestOutput>(id);
  auto output = r.output;
  requests_.emplace(id, std::move(r));
  waiting_.push_back(id);
  cv_.notify_all();
  return output;
}

void FakeEngine::finish(uint64_t request_id, engine::FinishReason reason) {
  std::lock_guard<std::mutex> lock(mu_);
  finish_calls_.emplace_back(request_id, reason);
  pending_finishes_.emplace_back(request_id, reason);
}

engine::EngineStats FakeEngine::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  engine::EngineStats s;
  s.waiting = static_cast<int64_t>(waiting_.size());
  s.running = static_cast<int64_t>(running_.size());
  s.kv_blocks_total = options_.kv_blocks_total;
  for (uint64_t id : running_) {
    const Request& r = requests_.at(id);
    const int tokens = static_cast<int>(r.request.prompt_token_ids.size()) + r.generated;
    s.kv_blocks_used += (tokens + options_.kv_block_size - 1) / options_.kv_block_size;
  }
  s.steps = steps_;
  s.last_step_seconds = 1e-4;
  return s;
}

void FakeEngine::drain(bool abort_all) {
  std::unique_lock<std::mutex> lock(mu_);
  draining_ = true;
  if (abort_all) {
    while (!requests_.empty()) finish_locked(requests_.begin(), engine::FinishReason::kAbort);
    return;
  }
  cv_.wait(lock, [this] { return requests_.empty(); });
}

void FakeEngine::set_paused(bool paused) {
  std::lock_guard<std::mutex> lock(mu_);
  paused_ = paused;
  cv_.notify_all();
}

std::vector<std::pair<uint64_t, engine::FinishReason>> FakeEngine::finish_calls() const {
  std::lock_guard<std::mutex> lock(mu_);
  return finish_calls_;
}

bool FakeEngine::healthy() const {
  std::lock_guard<std::mutex> lock(mu_);
  return !failed_;
}

void FakeEngine::fail_all(const std::string& error) {
  std::lock_guard<std::mutex> lock(mu_);
  failed_ = true;
  while (!requests_.empty()) {
    engine::RequestEvent event;
    event.finished = engine::FinishReason::kError;
    event.error = error;
    requests_.begin()->second.output->push(std::move(event));
    const uint64_t id = requests_.begin()->first;
    waiting_.erase(std::remove(waiting_.begin(), waiting_.end(), id), waiting_.end());
    running_.erase(std::remove(running_.begin(), running_.end(), id), running_.end());
    requests_.erase(requests_.begin());
  }
  cv_.notify_all();
}

int64_t FakeEngine::submitted() const {
  std::lock_guard<std::mutex> lock(mu_);
  return submitted_;
}

void FakeEngine::finish_locked(std::map<uint64_t, Request>::iterator it,
                               engine::FinishReason reason) {
  engine::RequestEvent event;
  event.finished = reason;
  it->second.output->push(std::move(event));
  waiting_.erase(std::remove(waiting_.begin(), waiting_.end(), it->first), waiting_.end());
  running_.erase(std::remove(running_.begin(), running_.end(), it->first), running_.end());
  requests_.erase(it);
  cv_.notify_all();
}

void FakeEngine::loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    cv_.wait_for(lock, options_.step_interval);
    if (stopping_) break;
    if (!paused_) step();
  }
}

void FakeEngine::set_step_observer(std::function<void(double seconds)> observer) {
  std::lock_guard<std::mutex> lock(mu_);
  step_observer_ = std::move(observer);
}

void FakeEngine::step() {
  ++steps_;
  if (step_observer_) step_observer_(1e-4);  // the step time stats() reports
  // Finishes requested since the last step apply first (the engine's step boundary).
  for (const auto& [id, reason] : std::exchange(pending_finishes_, {})) {
    auto it = requests_.find(id);
    if (it != requests_.end()) finish_locked(it, reason);
  }
  while (!waiting_.empty() && static_cast<int>(running_.size()) < options_.max_running) {
    running_.push_back(waiting_.front());
    waiting_.pop_front();
  }
  for (uint64_t id : std::vector<uint64_t>(running_)) {
    auto it = requests_.find(id);
    Request& r = it->second;
    const std::vector<int32_t>& prompt = r.request.prompt_token_ids;
    const std::vector<int32_t> echo(prompt.size() > 1 ? prompt.begin() + 1 : prompt.begin(),
                                    prompt.end());
    const std::vector<int32_t>& script = options_.script.empty() ? echo : options_.script;
    const scheduler::SamplingParams& sp = r.request.sampling;
    scheduler::SampledToken token;
    token.request_id = id;
    token.token_id = script[r.generated % script.size()];
    token.logprob = -0.5f * static_cast<float>(r.generated % 4);
    for (int k = 0; k < sp.logprobs; ++k) {
      token.top_logprobs.emplace_back(options_.top_logprobs_base + k, -1.0f * k);
    }
    ++r.generated;
    engine::RequestEvent event;
    event.tokens.push_back(token);
    if (!r.first_event_sent) {
      event.num_cached_prompt_tokens = 0;
      r.first_event_sent = true;
    }
    const auto in = [&](const std::vector<int32_t>& ids) {
      return std::find(ids.begin(), ids.end(), token.token_id) != ids.end();
    };
    const bool stop = r.generated >= sp.min_tokens &&
                      ((!sp.ignore_eos && in(options_.eos_token_ids)) || in(sp.stop_token_ids));
    std::optional<engine::FinishReason> finished;
    if (stop) {
      finished = engine::FinishReason::kStop;
    } else if (r.generated >= sp.max_tokens) {
      finished = engine::FinishReason::kLength;
    }
    if (finished) {
      event.finished = finished;
      r.output->push(std::move(event));
      running_.erase(std::remove(running_.begin(), running_.end(), id), running_.end());
      requests_.erase(it);
      cv_.notify_all();
    } else {
      r.output->push(std::move(event));
    }
  }
}

server::ServedModel fake_served_model(std::unique_ptr<FakeEngine> engine,
                                      std::unique_ptr<engine::Tokenizer> tokenizer,
                                      int max_model_len) {
  server::ServedModel model;
  model.engine = std::move(engine);
  model.tokenizer = std::move(tokenizer);
  model.info.set_name("fake");
  model.info.set_vocab_size(512);
  model.info.set_max_model_len(max_model_len);
  model.eos_token_ids = {2};
  return model;
}

}  // namespace megaserve::testing
