// The engine: one thread that owns the loop Schedule -> Build -> Submit -> Collect -> Update
// over a scheduler, a StepRunner (engine/step_runner.h: the builder) and a backend (with
// overlap_scheduling, step N+1 is scheduled, built and submitted while step N runs).
// Requests come in through a thread-safe intake (submit); each request's output leaves
// through its own RequestOutput queue, keyed by request id. Aborts from any thread apply at
// the next step boundary. The engine knows nothing of gRPC.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/model/model_config.h"
#include "engine/step_capture.h"
#include "scheduler/sampling_params.h"
#include "scheduler/scheduler.h"
#include "scheduler/step_plan.h"

namespace megaserve::engine {

// One FinishReason for the scheduler, the engine and the server (scheduler/scheduler.h).
using scheduler::finish_reason_name;
using scheduler::FinishReason;

struct GenerateRequest {
  std::vector<int32_t> prompt_token_ids;
  scheduler::SamplingParams sampling;
  int32_t priority = 0;  // lower runs first; ties by arrival
};

// One batch of progress of a request: tokens that became final, and at the end, why it
// finished. Events of one request arrive in order.
struct RequestEvent {
  std::vector<scheduler::SampledToken> tokens;
  std::optional<FinishReason> finished;
  std::string error;                     // with FinishReason::kError
  int32_t num_cached_prompt_tokens = 0;  // prefix-cache hits, reported with the first event
};

// The per-request output queue. The engine thread pushes; the consumer takes. `notify` runs
// on the engine thread after each push and must not block (a gRPC reactor schedules its
// next write from it).
class RequestOutput {
 public:
  explicit RequestOutput(uint64_t request_id) : request_id_(request_id) {}
  uint64_t request_id() const { return request_id_; }
  void set_notify(std::function<void()> notify);
  std::vector<RequestEvent> take();
  // Blocks until an event is queued or the request finished; for tests and tools.
  std::vector<RequestEvent> wait();
  void push(RequestEvent event);  // engine side

 private:
  const uint64_t request_id_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<RequestEvent> events_;
  std::function<void()> notify_;
};

struct EngineOptions {
  int32_t max_num_seqs = 256;
  int32_t max_num_batched_tokens = 8192;
  int32_t max_prefill_tokens_with_decodes = 0;  // scheduler::SchedulerConfig's; 0: no cap
  int32_t max_waiting_requests = 4096;
  int32_t max_model_len = 0;  // 0: the model's max_position_embeddings
  bool enable_prefix_caching = true;
  // Keep one step in flight: plan and submit step N+1 before collecting and applying step
  // N (the step runner forwards N's sampled tokens into N+1). Same tokens as without.
  bool overlap_scheduling = false;
  // Capture the timelines of the first trace.steps steps that run into trace.dir
  // (engine/step_capture.h); off by default. Same tokens as without.
  TraceOptions trace;
};

struct EngineStats {
  int64_t waiting = 0;
  int64_t running = 0;
  int64_t kv_blocks_used = 0;
  int64_t kv_blocks_total = 0;
  int64_t prefix_cache_queries = 0;  // prompt tokens looked up
  int64_t prefix_cache_hits = 0;     // prompt tokens found cached
  int64_t preemptions = 0;
  int64_t steps = 0;
  double last_step_seconds = 0;
};

class Engine {
 public:
  static absl::StatusOr<std::unique_ptr<Engine>> create(const ModelConfig& model,
                                                        std::unique_ptr<Backend> backend,
                                                        const EngineOptions& options);
  virtual ~Engine() = default;

  // Admits a request or says why not: InvalidArgument (empty or too long a prompt, a
  // request that could never fit the KV cache), ResourceExhausted (waiting queue full),
  // Unavailable (shutting down).
  virtual absl::StatusOr<std::shared_ptr<RequestOutput>> submit(GenerateRequest request) = 0;
  // Finishes a request at the next step boundary with `reason` (kAbort on cancellation,
  // kStop when the output side matched a stop string); its blocks are freed then.
  virtual void finish(uint64_t request_id, FinishReason reason) = 0;
  virtual EngineStats stats() const = 0;
  // Stops admitting; returns once every request has finished or `abort_all` aborted them.
  virtual void drain(bool abort_all) = 0;
  // A failed step fails every in-flight request; then healthy() turns false.
  virtual bool healthy() const = 0;
  // `observer(seconds)` runs on the engine thread once per completed step, with that step's
  // time (EngineStats::last_step_seconds), under the engine's lock: it must be quick and must
  // not call into the engine. Replaces the previous observer; nullptr clears it. Once this
  // returns, the previous observer is never called again.
  virtual void set_step_observer(std::function<void(double seconds)> observer) = 0;
};

}  // namespace megaserve::engine
