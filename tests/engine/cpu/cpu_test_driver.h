// A tiny test-only engine loop over a StepRunner (engine/step_runner.h) and its Backend:
// greedy requests with a prompt, prefilled in chunks of a fixed size, joining at chosen
// steps, with a free-list block allocator. Decode inputs are kTokenFromPreviousStep, so the
// last-sampled tokens feed back.
// Deliberately independent of scheduler/ (only StepPlan).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/step_runner.h"
#include "scheduler/step_plan.h"

namespace megaserve::testing {

struct DriverRequest {
  uint64_t id = 0;
  std::vector<int32_t> prompt;
  int max_new_tokens = 0;
  int chunk = 0;         // prefill tokens per step; 0 = the whole prompt at once
  int start_step = 0;    // first step the request takes part in
  int32_t stop_id = -1;  // generation ends after this id (llama2.c stops at BOS)

  // State.
  std::vector<int32_t> generated;
  int computed = 0;  // tokens whose K/V are in the cache
  std::vector<int32_t> blocks;
  bool done = false;
};

class GreedyDriver {
 public:
  GreedyDriver(engine::StepRunner& runner, int32_t num_blocks)
      : runner_(runner), block_size_(runner.target().kv_block_size) {
    for (int32_t b = num_blocks - 1; b >= 0; --b) free_.push_back(b);
  }

  void add(DriverRequest r) { requests_.push_back(std::move(r)); }
  const std::vector<DriverRequest>& requests() const { return requests_; }
  int steps() const { return step_; }

  // Runs steps until every request is done.
  absl::Status run() {
    while (std::any_of(requests_.begin(), requests_.end(), [](auto& r) { return !r.done; })) {
      if (absl::Status s = step(); !s.ok()) return s;
    }
    return absl::OkStatus();
  }

  absl::Status step() {
    scheduler::StepPlan plan;
    plan.step_id = static_cast<uint64_t>(step_);
    plan.kv_block_size = block_size_;
    std::vector<DriverRequest*> in_plan;
    for (DriverRequest& r : requests_) {
      if (r.done || r.start_step > step_) continue;
      scheduler::StepRequest sr;
      sr.request_id = r.id;
      sr.first_position = r.computed;
      const int total = static_cast<int>(r.prompt.size() + r.generated.size());
      if (r.computed < static_cast<int>(r.prompt.size())) {
        const int remaining = static_cast<int>(r.prompt.size()) - r.computed;
        const int n = r.chunk > 0 ? std::min(r.chunk, remaining) : remaining;
        sr.token_ids.assign(r.prompt.begin() + r.computed, r.prompt.begin() + r.computed + n);
      } else {
        sr.token_ids = {scheduler::kTokenFromPreviousStep};  // the last generated token
      }
      sr.sample = sr.context_length() == total;
      sr.sampling.temperature = 0.0f;
      sr.prompt_token_ids = r.prompt;
      sr.output_token_ids = r.generated;
      sr.output_token_index = static_cast<int32_t>(r.generated.size());
      while (static_cast<int>(r.blocks.size()) * block_size_ < sr.context_length()) {
        if (free_.empty()) return absl::ResourceExhaustedError("test driver: out of KV blocks");
        r.blocks.push_back(free_.back());
        free_.pop_back();
      }
      sr.block_table = r.blocks;
      plan.requests.push_back(std::move(sr));
      in_plan.push_back(&r);
    }
    ++step_;
    if (plan.requests.empty()) return absl::OkStatus();
    absl::StatusOr<scheduler::StepOutput> out = runner_.execute(plan);
    if (!out.ok()) return out.status();
    size_t next_sample = 0;
    for (size_t i = 0; i < in_plan.size(); ++i) {
      DriverRequest& r = *in_plan[i];
      r.computed += plan.requests[i].num_tokens();
      if (!plan.requests[i].sample) continue;
      if (next_sample >= out->sampled.size() || out->sampled[next_sample].request_id != r.id) {
        return absl::InternalError(absl::StrCat("test driver: no sample for request ", r.id));
      }
      const int32_t token = out->sampled[next_sample++].token_id;
      r.generated.push_back(token);
      if (static_cast<int>(r.generated.size()) >= r.max_new_tokens || token == r.stop_id) {
        r.done = true;
        free_.insert(free_.end(), r.blocks.begin(), r.blocks.end());
        r.blocks.clear();
      }
    }
    return absl::OkStatus();
  }

 private:
  engine::StepRunner& runner_;
  int32_t block_size_;
  std::vector<int32_t> free_;
  std::vector<DriverRequest> requests_;
  int step_ = 0;
};

}  // namespace megaserve::testing
