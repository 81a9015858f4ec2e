// Helpers for step-by-step scheduler tests: a plan summarised as rows (who runs, from which
// position, how many tokens, whether it samples), and outputs built from a token rule.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <ostream>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "scheduler/scheduler.h"

namespace megaserve::scheduler::testing {

struct Row {
  uint64_t id;
  int32_t first_position;
  int32_t num_tokens;
  bool sample;
  bool operator==(const Row& o) const {
    return std::tie(id, first_position, num_tokens, sample) ==
           std::tie(o.id, o.first_position, o.num_tokens, o.sample);
  }
};
inline void PrintTo(const Row& r, std::ostream* os) {
  *os << "{id " << r.id << ", pos " << r.first_position << ", n " << r.num_tokens
      << (r.sample ? ", sample}" : "}");
}

inline std::vector<Row> rows(const StepPlan& plan) {
  std::vector<Row> out;
  for (const StepRequest& r : plan.requests) {
    out.push_back({r.request_id, r.first_position, r.num_tokens(), r.sample});
  }
  return out;
}

inline const StepRequest* find_request(const StepPlan& plan, uint64_t id) {
  for (const StepRequest& r : plan.requests) {
    if (r.request_id == id) return &r;
  }
  return nullptr;
}

// One token per sampling request, from `token(request)`.
inline StepOutput output_for(const StepPlan& plan,
                             const std::function<int32_t(const StepRequest&)>& token) {
  StepOutput out;
  out.step_id = plan.step_id;
  for (const StepRequest& r : plan.requests) {
    if (r.sample) out.sampled.push_back({r.request_id, token(r), 0.0f, {}});
  }
  return out;
}

// A token that is never EOS in these tests: 1000 + the position it will occupy.
inline int32_t position_token(const StepRequest& r) { return 1000 + r.context_length(); }

inline std::vector<int32_t> tokens(int32_t n, int32_t start) {
  std::vector<int32_t> v(n);
  std::iota(v.begin(), v.end(), start);
  return v;
}

inline RequestSpec spec(uint64_t id, std::vector<int32_t> prompt, int32_t max_tokens,
                        int32_t priority = 0) {
  RequestSpec s;
  s.request_id = id;
  s.prompt_token_ids = std::move(prompt);
  s.sampling.max_tokens = max_tokens;
  s.priority = priority;
  s.seed = id * 7 + 1;
  return s;
}

inline std::unique_ptr<Scheduler> make_scheduler(const SchedulerConfig& config) {
  absl::StatusOr<std::unique_ptr<Scheduler>> s = Scheduler::create(config);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *std::move(s) : nullptr;
}

// update() that must succeed, with the invariants checked after it.
inline std::vector<RequestUpdate> apply(Scheduler& s, const StepOutput& out) {
  absl::StatusOr<std::vector<RequestUpdate>> u = s.update(out);
  EXPECT_TRUE(u.ok()) << u.status();
  absl::Status inv = s.check_invariants();
  EXPECT_TRUE(inv.ok()) << inv;
  return u.ok() ? *std::move(u) : std::vector<RequestUpdate>{};
}

// schedule() with the invariants checked after it.
inline StepPlan plan(Scheduler& s) {
  StepPlan p = s.schedule();
  absl::Status inv = s.check_invariants();
  EXPECT_TRUE(inv.ok()) << inv;
  return p;
}

}  // namespace megaserve::scheduler::testing
