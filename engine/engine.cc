// The engine loop (engine/engine.h). One thread owns the scheduler between steps; the step
// runner's submit() (build and submit) and collect() run without the lock held, so submit()
// and finish() never wait for a step.
#include "engine/engine.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <random>
#include <thread>
#include <unordered_map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/engine_options.h"
#include "engine/step_runner.h"
#include "scheduler/scheduler.h"
#include "spdlog/spdlog.h"

namespace megaserve::engine {
namespace {

class EngineImpl final : public Engine {
 public:
  EngineImpl(const ModelConfig& model, std::unique_ptr<Backend> backend,
             std::unique_ptr<scheduler::Scheduler> scheduler, const EngineOptions& options,
             std::unique_ptr<StepCapture> capture)
      : backend_(std::move(backend)),
        runner_(std::make_unique<StepRunner>(model, *backend_)),
        scheduler_(std::move(scheduler)),
        options_(options),
        capture_(std::move(capture)),
        traces_to_start_(capture_ != nullptr ? capture_->steps() : 0),
        seeds_(std::random_device{}()) {
    thread_ = std::thread([this] { loop(); });
  }

  ~EngineImpl() override {
    drain(/*abort_all=*/true);
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    work_cv_.notify_all();
    thread_.join();
  }

  absl::StatusOr<std::shared_ptr<RequestOutput>> submit(GenerateRequest request) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (draining_) return absl::UnavailableError("the server is shutting down");
    if (!healthy_) return absl::UnavailableError("the engine failed: " + failure_);
    scheduler::RequestSpec spec;
    spec.request_id = next_request_id_++;
    spec.prompt_token_ids = std::move(request.prompt_token_ids);
    spec.sampling = std::move(request.sampling);
    spec.priority = request.priority;
    spec.seed = spec.sampling.seed.has_value() ? *spec.sampling.seed : seeds_();
    const uint64_t id = spec.request_id;
    if (absl::Status status = scheduler_->add_request(std::move(spec)); !status.ok()) {
      return status;
    }
    auto output = std::make_shared<RequestOutput>(id);
    outputs_.emplace(id, output);
    work_cv_.notify_all();
    return output;
  }

  void finish(uint64_t request_id, FinishReason reason) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      pending_finishes_.emplace_back(request_id, reason);
    }
    work_cv_.notify_all();
  }

  EngineStats stats() const override {
    std::lock_guard<std::mutex> lock(mu_);
    scheduler::SchedulerStats s = scheduler_->stats();
    EngineStats out;
    out.waiting = s.num_waiting;
    out.running = s.num_running;
    out.kv_blocks_used = s.num_kv_blocks_used;
    out.kv_blocks_total = s.num_kv_blocks_total;
    out.prefix_cache_queries = s.prefix_cache_queries;
    out.prefix_cache_hits = s.prefix_cache_hits;
    out.preemptions = s.num_preemptions;
    out.steps = steps_;
    out.last_step_seconds = last_step_seconds_;
    return out;
  }

  void drain(bool abort_all) override {
    std::unique_lock<std::mutex> lock(mu_);
    draining_ = true;
    if (abort_all) {
      for (const auto& [id, output] : outputs_) {
        pending_finishes_.emplace_back(id, FinishReason::kAbort);
      }
      work_cv_.notify_all();
    }
    idle_cv_.wait(lock, [this] { return outputs_.empty(); });
  }

  bool healthy() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return healthy_;
  }

  void set_step_observer(std::function<void(double seconds)> observer) override {
    std::lock_guard<std::mutex> lock(mu_);
    step_observer_ = std::move(observer);
  }

 private:
  void loop() {
    std::unique_lock<std::mutex> lock(mu_);
    // Steps submitted to the backend and not yet collected, oldest first (their submit
    // times). Between iterations at most one: under overlapped scheduling step N stays in
    // flight while step N+1 is planned and submitted; N is then collected and applied.
    std::deque<std::chrono::steady_clock::time_point> in_flight;
    std::chrono::steady_clock::time_point last_collect{};
    while (true) {
      apply_finishes();
      if (in_flight.empty()) {
        work_cv_.wait(lock, [this] {
          return stop_ || !pending_finishes_.empty() || scheduler_->has_unfinished_requests();
        });
        if (stop_ && !scheduler_->has_unfinished_requests()) break;
        apply_finishes();
      }
      // With a step in flight, step N+1 is planned before step N's output is applied; the
      // step runner feeds N's sampled tokens into N+1 (kTokenFromPreviousStep), and the
      // scheduler discards N+1's work for requests that N finishes.
      const scheduler::StepPlan plan = scheduler_->schedule();
      if (!plan.requests.empty()) {
        lock.unlock();
        const bool traced = start_recording();
        const auto start = std::chrono::steady_clock::now();
        const absl::Status submitted = runner_->submit(plan);
        if (submitted.ok() && traced) --traces_to_start_;
        lock.lock();
        if (!submitted.ok()) {
          in_flight.clear();  // the backend is left failed or refused the step: nothing to apply
          fail_everything(submitted);
          continue;
        }
        in_flight.push_back(start);
      }
      const size_t keep = options_.overlap_scheduling && !plan.requests.empty() ? 1 : 0;
      if (in_flight.size() <= keep) {
        // Nothing runnable although requests are unfinished (e.g. only finishes pending):
        // wait for news instead of spinning.
        if (in_flight.empty()) work_cv_.wait_for(lock, std::chrono::milliseconds(1));
        continue;
      }
      lock.unlock();
      absl::StatusOr<scheduler::StepOutput> output = runner_->collect();
      const auto now = std::chrono::steady_clock::now();
      if (output.ok()) capture(output->step_id);
      lock.lock();
      // The step's own time: from its submission, or from the previous step's collection
      // when it was queued behind that one.
      last_step_seconds_ =
          std::chrono::duration<double>(now - std::max(in_flight.front(), last_collect)).count();
      last_collect = now;
      in_flight.pop_front();
      ++steps_;
      if (step_observer_) step_observer_(last_step_seconds_);
      if (!output.ok()) {
        in_flight.clear();
        fail_everything(output.status());
        continue;
      }
      apply_output(*output);
    }
  }

  // Engine thread, before a step is submitted: whether that step records its timeline
  // (the first capture_->steps() steps that run do), the backend told so when it changes.
  bool start_recording() {
    const bool record = traces_to_start_ > 0;
    if (record != recording_) {
      recording_ = record;
      if (!backend_->record_timings(record) && record) {
        spdlog::warn("trace: backend {} cannot record step timelines; no traces",
                     backend_->describe());
        traces_to_start_ = 0;
        recording_ = false;
        return false;
      }
    }
    return record;
  }

  // Engine thread, right after a step is collected (runner_->last_step() is that step): hands
  // its timeline, when it recorded one, to the capture.
  void capture(uint64_t step_id) {
    if (capture_ == nullptr) return;
    std::vector<InstructionTiming> timings = backend_->take_timings(step_id);
    if (!timings.empty()) capture_->add(runner_->last_step(), std::move(timings));
  }

  // Caller holds mu_.
  void apply_finishes() {
    while (!pending_finishes_.empty()) {
      auto [id, reason] = pending_finishes_.front();
      pending_finishes_.pop_front();
      auto it = outputs_.find(id);
      if (it == outputs_.end()) continue;  // already finished on its own
      if (!scheduler_->finish(id, reason).ok()) continue;
      RequestEvent event;
      event.finished = reason;
      complete(it, std::move(event));
    }
  }

  // Caller holds mu_.
  void apply_output(const scheduler::StepOutput& output) {
    absl::StatusOr<std::vector<scheduler::RequestUpdate>> updates = scheduler_->update(output);
    if (!updates.ok()) {
      fail_everything(updates.status());
      return;
    }
    for (scheduler::RequestUpdate& update : *updates) {
      auto it = outputs_.find(update.request_id);
      if (it == outputs_.end()) continue;
      RequestEvent event;
      event.tokens = std::move(update.new_tokens);
      event.num_cached_prompt_tokens = update.num_cached_prompt_tokens;
      if (update.finished) event.finished = *update.finished;
      if (event.finished) {
        complete(it, std::move(event));
      } else {
        it->second->push(std::move(event));
      }
    }
  }

  // Caller holds mu_. A failed step leaves the backend's state unknown: every request fails
  // and the engine stops admitting (the server turns health NOT_SERVING and exits).
  void fail_everything(const absl::Status& status) {
    healthy_ = false;
    failure_ = status.ToString();
    spdlog::error("engine step failed: {}", failure_);
    while (!outputs_.empty()) {
      auto it = outputs_.begin();
      scheduler_->finish(it->first, scheduler::FinishReason::kAbort).IgnoreError();
      RequestEvent event;
      event.finished = FinishReason::kError;
      event.error = failure_;
      complete(it, std::move(event));
    }
  }

  // Caller holds mu_.
  void complete(std::unordered_map<uint64_t, std::shared_ptr<RequestOutput>>::iterator it,
                RequestEvent event) {
    std::shared_ptr<RequestOutput> output = std::move(it->second);
    outputs_.erase(it);
    output->push(std::move(event));
    if (outputs_.empty()) idle_cv_.notify_all();
  }

  const std::unique_ptr<Backend> backend_;
  const std::unique_ptr<StepRunner> runner_;  // builds and submits steps to backend_
  const std::unique_ptr<scheduler::Scheduler> scheduler_;
  const EngineOptions options_;
  // Step traces (EngineOptions::trace), null when off; the fields below belong to the engine
  // thread: steps still to record from their submission on, and whether the backend records.
  const std::unique_ptr<StepCapture> capture_;
  int32_t traces_to_start_ = 0;
  bool recording_ = false;

  mutable std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable idle_cv_;
  std::unordered_map<uint64_t, std::shared_ptr<RequestOutput>> outputs_;  // unfinished ones
  std::deque<std::pair<uint64_t, FinishReason>> pending_finishes_;
  std::mt19937_64 seeds_;
  uint64_t next_request_id_ = 1;
  bool draining_ = false;
  bool stop_ = false;
  bool healthy_ = true;
  std::string failure_;
  int64_t steps_ = 0;
  double last_step_seconds_ = 0;
  std::function<void(double seconds)> step_observer_;
  std::thread thread_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Engine>> Engine::create(const ModelConfig& model,
                                                       std::unique_ptr<Backend> backend,
                                                       const EngineOptions& options) {
  if (!backend) return absl::InvalidArgumentError("Engine::create: no backend");
  if (absl::Status s = check_engine_options(model, options); !s.ok()) return s;
  scheduler::SchedulerConfig config;
  config.kv_block_size = backend->kv_block_size();
  config.num_kv_blocks = backend->num_kv_blocks();
  config.max_num_seqs = options.max_num_seqs;
  config.max_num_batched_tokens = options.max_num_batched_tokens;
  config.max_prefill_tokens_with_decodes = options.max_prefill_tokens_with_decodes;
  config.max_waiting_requests = options.max_waiting_requests;
  config.max_model_len =
      options.max_model_len > 0 ? options.max_model_len : model.max_position_embeddings;
  config.enable_prefix_caching = options.enable_prefix_caching;
  config.eos_token_ids = model.eos_token_ids;
  absl::StatusOr<std::unique_ptr<scheduler::Scheduler>> scheduler =
      scheduler::Scheduler::create(config);
  if (!scheduler.ok()) return scheduler.status();
  std::unique_ptr<StepCapture> capture;
  if (options.trace.steps > 0) {
    absl::StatusOr<std::unique_ptr<StepCapture>> made =
        StepCapture::create(options.trace, backend->describe());
    if (!made.ok()) return made.status();
    capture = *std::move(made);
  }
  spdlog::info("engine: {}; max {} seqs, {} tokens per step{}", backend->describe(),
               config.max_num_seqs, config.max_num_batched_tokens,
               options.overlap_scheduling ? ", overlapped scheduling" : "");
  return std::unique_ptr<Engine>(new EngineImpl(model, std::move(backend), *std::move(scheduler),
                                                options, std::move(capture)));
}

}  // namespace megaserve::engine
