// One generation driven from a thread that may block on it: the HTTP API's worker waits here
// for the engine's output, where the gRPC side has a reactor (generate_reactor.cc). Admission
// is the gRPC path's (to_engine_request, the same checks and messages), and so is the output
// (OutputStream: incremental detokenizing after the prompt, stop strings, usage); a finished
// or abandoned generation is counted in the same metrics.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "proto/megaserve.pb.h"
#include "server/output_stream.h"
#include "server/service.h"

namespace megaserve::server {

class BlockingGeneration {
 public:
  // Refuses while the server drains or after the engine failed (Unavailable), then checks and
  // tokenizes `request` and submits it. `fill_context`: an unset max_tokens means as many
  // tokens as fit the context and the KV cache (chat), not the API default of 16.
  static absl::StatusOr<std::unique_ptr<BlockingGeneration>> start(
      ServingContext* context, const v1::GenerateRequest& request, bool fill_context);
  // A generation dropped before it finished (its client went away) is aborted in the engine,
  // which frees its KV blocks at the next step, and counted as CANCELLED.
  ~BlockingGeneration();
  BlockingGeneration(const BlockingGeneration&) = delete;
  BlockingGeneration& operator=(const BlockingGeneration&) = delete;

  // Waits up to `timeout` for output and returns what arrived, possibly nothing. The delta
  // whose `finished` is set is the last.
  StreamDelta next(std::chrono::milliseconds timeout);

  bool finished() const { return finished_; }
  const std::vector<int32_t>& prompt_token_ids() const { return prompt_token_ids_; }
  int completion_tokens() const { return stream_->completion_tokens(); }
  int cached_prompt_tokens() const { return stream_->cached_prompt_tokens(); }

 private:
  using Clock = std::chrono::steady_clock;
  // Set from the engine thread (RequestOutput's notify hook, which must not block); shared so
  // that a hook running late finds it alive.
  struct Wakeup {
    std::mutex mu;
    std::condition_variable cv;
    bool pending = false;
  };

  BlockingGeneration(ServingContext* context, Clock::time_point received);
  void record_metrics();

  ServingContext* const context_;
  const Clock::time_point received_;
  std::shared_ptr<Wakeup> wakeup_ = std::make_shared<Wakeup>();
  std::shared_ptr<engine::RequestOutput> output_;
  std::unique_ptr<OutputStream> stream_;
  std::vector<int32_t> prompt_token_ids_;
  bool finished_ = false;
  bool engine_done_ = false;  // the engine finished it, or was told to
  std::string final_status_ = "CANCELLED";
  std::optional<std::string> finish_reason_;
  std::optional<Clock::time_point> first_token_;
  std::optional<Clock::time_point> last_token_;
};

// Counts a request refused before it reached the engine in the metrics, as the gRPC path
// does, under its status code's name.
void record_rejected_request(ServingContext* context, const absl::Status& status);

}  // namespace megaserve::server
