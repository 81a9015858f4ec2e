// One request's state inside the scheduler (internal to scheduler/; the interface is
// scheduler.h). Positions: token_ids[p] is the token at position p; positions
// [0, num_computed_tokens) have KV computed or scheduled; positions [token_ids.size(),
// num_tokens()) are tokens sampled by steps still in flight, unknown to the host.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "scheduler/kv_block_pool.h"
#include "scheduler/sampling_params.h"
#include "scheduler/scheduler.h"

namespace megaserve::scheduler {

enum class RequestState { kWaiting, kRunning, kFinished };

struct Request {
  uint64_t id = 0;
  uint64_t arrival = 0;  // admission order, the FCFS tie-break
  int32_t priority = 0;
  uint64_t seed = 0;
  uint64_t prefix_cache_key = 0;
  SamplingParams sampling;

  // Prompt then the generated tokens the host knows. Capacity is reserved to max_length up
  // front and never exceeded, so spans handed out in a StepPlan stay valid while it grows.
  std::vector<int32_t> token_ids;
  int32_t num_prompt_tokens = 0;
  int32_t max_length = 0;  // min(prompt + max_tokens, max_model_len): stops here (kLength)

  int32_t num_computed_tokens = 0;
  int32_t num_pending_tokens = 0;   // sampled by in-flight steps, not yet applied
  int32_t num_in_flight_steps = 0;  // planned steps naming it, not yet updated
  uint64_t last_scheduled_step = 0;
  int32_t num_cached_prompt_tokens = -1;  // set at first admission
  int32_t pick_index = -1;                // its Pick in the step being planned, or -1

  RequestState state = RequestState::kWaiting;
  std::optional<FinishReason> finish_reason;
  BlockTable blocks;

  int32_t num_known_tokens() const { return static_cast<int32_t>(token_ids.size()); }
  int32_t num_tokens() const { return num_known_tokens() + num_pending_tokens; }
  // Generated so far, including tokens in flight.
  int32_t num_output_tokens() const { return num_tokens() - num_prompt_tokens; }
  std::span<const int32_t> prompt() const { return {token_ids.data(), size_t(num_prompt_tokens)}; }
  std::span<const int32_t> known_output() const {
    return std::span<const int32_t>(token_ids).subspan(num_prompt_tokens);
  }
};

}  // namespace megaserve::scheduler
