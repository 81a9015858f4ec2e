// The deadlock-invariant check (declared in schedule_builder.h). A fast pass accepts the steps
// the builder makes; whatever it does not accept goes to the reference pass (one streaming
// pass over the queues, then every wait against the signals strictly earlier in the global
// order), whose verdict and message are returned.
#include <algorithm>
#include <climits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/planner/schedule_builder.h"

namespace megaserve::engine {

namespace {

// The reference check: also the source of every error message.
absl::Status check_deadlock_free_reference(const Step& step) {
  const int tp = static_cast<int>(step.ranks.size());
  size_t total = 0;
  for (const auto& r : step.ranks) total += r.instructions.size();
  if (step.global_order.size() != total) {
    return absl::InternalError(absl::StrCat("step ", step.step_id, ": global order lists ",
                                            step.global_order.size(), " of ", total,
                                            " instructions"));
  }
  // The global order is a permutation, consistent with each instruction's `order` (two
  // entries naming one instruction would need two different `order` values).
  for (size_t g = 0; g < step.global_order.size(); ++g) {
    const InstructionRef ref = step.global_order[g];
    if (ref.rank < 0 || ref.rank >= tp || ref.index < 0 ||
        ref.index >= static_cast<int32_t>(step.ranks[ref.rank].order.size()) ||
        step.ranks[ref.rank].order[ref.index] != static_cast<int32_t>(g)) {
      return absl::InternalError(absl::StrCat("step ", step.step_id, ": global order entry ", g,
                                              " disagrees with the instructions' order"));
    }
  }
  // Each queue a subsequence of the global order; per (rank, barrier), the signals this step
  // and the latest position among them. Memory order: one streaming pass.
  struct Signals {
    uint32_t count = 0;
    int32_t last = -1;
  };
  const size_t num_barriers = tp > 0 ? step.ranks[0].barrier_begin.size() : 0;
  std::vector<Signals> sig(tp * num_barriers);
  struct Wait {
    int32_t rank, index, barrier;
    uint32_t target;
  };
  std::vector<Wait> waits;  // gathered in the same pass, checked once all signals are known
  waits.reserve(total * 2);
  for (int r = 0; r < tp; ++r) {
    const RankSchedule& rs = step.ranks[r];
    for (int q = 0; q < rs.num_queues(); ++q) {
      for (int32_t i = rs.queue_begin[q]; i < rs.queue_begin[q + 1]; ++i) {
        if (i > rs.queue_begin[q] && rs.order[i] < rs.order[i - 1]) {
          return absl::FailedPreconditionError(
              absl::StrCat("deadlock invariant: queue ", q, " of rank ", r, " runs ",
                           describe_instruction(step, {r, i - 1}), " before ",
                           describe_instruction(step, {r, i}), ", against the global order"));
        }
        const isa::Instruction& inst = rs.instructions[i];
        for (int w = 0; w < inst.num_waits(); ++w) {
          waits.push_back({r, i, inst.wait_barrier(w), static_cast<uint32_t>(inst.wait_target(w))});
        }
        for (int sg = 0; sg < inst.num_signals(); ++sg) {
          const int32_t b = inst.signal_barrier(sg);
          const int32_t target = inst.signal_rank(sg);
          if (b < 0 || b >= static_cast<int32_t>(num_barriers)) {
            return absl::InternalError(
                absl::StrCat(describe_instruction(step, {r, i}), " signals unknown barrier ", b));
          }
          for (int t = 0; t < tp; ++t) {
            if (target != isa::kSignalAllRanks && target != t) continue;
            Signals& x = sig[t * num_barriers + b];
            ++x.count;
            x.last = std::max(x.last, rs.order[i]);
          }
        }
      }
    }
  }
  // Every wait reached by signals strictly earlier in the global order. A wait for all of a
  // barrier's signals (the builder's only kind) compares with the latest signaller; a wait
  // for fewer looks for its k-th earliest.
  std::vector<std::vector<int32_t>> sorted(tp * num_barriers);
  for (const Wait& wt : waits) {
    const RankSchedule& rs = step.ranks[wt.rank];
    const int32_t b = wt.barrier;
    const int32_t position = rs.order[wt.index];
    bool reached = b >= 0 && b < static_cast<int32_t>(num_barriers);
    if (reached) {
      const uint32_t needed = wt.target - rs.barrier_begin[b];
      const Signals& x = sig[wt.rank * num_barriers + b];
      if (needed > x.count) {
        reached = false;
      } else if (needed == x.count) {
        reached = x.last < position;
      } else if (needed > 0) {
        std::vector<int32_t>& positions = sorted[wt.rank * num_barriers + b];
        if (positions.empty()) {  // in global order, so sorted
          for (const InstructionRef ref : step.global_order) {
            const isa::Instruction& s = step.ranks[ref.rank].instructions[ref.index];
            for (int sg = 0; sg < s.num_signals(); ++sg) {
              if (s.signal_barrier(sg) == b &&
                  (s.signal_rank(sg) == isa::kSignalAllRanks || s.signal_rank(sg) == wt.rank)) {
                positions.push_back(step.ranks[ref.rank].order[ref.index]);
              }
            }
          }
        }
        reached = positions[needed - 1] < position;
      }
    }
    if (!reached) {
      return absl::FailedPreconditionError(
          absl::StrCat("deadlock invariant: ", describe_instruction(step, {wt.rank, wt.index}),
                       " waits for barrier ", b, " >= ", wt.target,
                       ", which instructions earlier in the global order do not reach"));
    }
  }
  for (int r = 0; r < tp; ++r) {
    const RankSchedule& rs = step.ranks[r];
    for (size_t b = 0; b < num_barriers; ++b) {
      if (rs.barrier_begin[b] + sig[r * num_barriers + b].count != rs.barrier_end[b]) {
        return absl::InternalError(absl::StrCat("step ", step.step_id, " rank ", r, " barrier ", b,
                                                ": signals do not add up to barrier_end"));
      }
    }
  }
  return absl::OkStatus();
}

// Per (rank, barrier), what the fast pass gathers.
struct BarrierSummary {
  uint32_t signals = 0;            // this step
  int32_t last_signal = -1;        // latest global position among them
  uint32_t max_needed = 0;         // over the waits needing at least one signal
  int32_t first_wait = INT32_MAX;  // earliest global position among those waits
};

// True only if check_deadlock_free_reference() accepts `step`; false for anything else (a
// malformed layout, a violation, or a wait for fewer than all of a barrier's signals that
// precedes one of them), which the reference then judges. One streaming pass in memory order
// like the reference's, without its per-wait list: a wait needing n > 0 signals at global
// position p is reached when n <= the barrier's signals this step and every one of them is
// earlier than p, which holds for every wait of the builder (each waits for all of a
// barrier's signals in the step), so only summaries per barrier are kept.
bool holds_deadlock_invariant(const Step& step, std::vector<BarrierSummary>& sum) {
  const int tp = static_cast<int>(step.ranks.size());
  const size_t num_barriers = tp > 0 ? step.ranks[0].barrier_begin.size() : 0;
  size_t total = 0;
  // A well-formed layout (what the builder makes): queues tile the instructions, parallel
  // arrays agree in size.
  for (const auto& r : step.ranks) {
    const int32_t n = static_cast<int32_t>(r.instructions.size());
    if (r.order.size() != r.instructions.size() || r.queue_begin.empty() ||
        r.queue_begin.front() != 0 || r.queue_begin.back() != n ||
        r.barrier_begin.size() != num_barriers || r.barrier_end.size() != num_barriers) {
      return false;
    }
    for (size_t q = 1; q < r.queue_begin.size(); ++q) {
      if (r.queue_begin[q] < r.queue_begin[q - 1]) return false;
    }
    total += r.instructions.size();
  }
  if (step.global_order.size() != total) return false;
  for (size_t g = 0; g < step.global_order.size(); ++g) {
    const InstructionRef ref = step.global_order[g];
    if (ref.rank < 0 || ref.rank >= tp || ref.index < 0 ||
        ref.index >= static_cast<int32_t>(step.ranks[ref.rank].order.size()) ||
        step.ranks[ref.rank].order[ref.index] != static_cast<int32_t>(g)) {
      return false;
    }
  }
  sum.assign(tp * num_barriers, BarrierSummary{});
  const int32_t nb = static_cast<int32_t>(num_barriers);
  // Backwards through memory: the summaries do not depend on the order, and the builder has
  // just written the queues front to back, so their end is what the cache still holds.
  for (int r = tp - 1; r >= 0; --r) {
    const RankSchedule& rs = step.ranks[r];
    BarrierSummary* own = sum.data() + r * num_barriers;
    for (int q = rs.num_queues() - 1; q >= 0; --q) {
      for (int32_t i = rs.queue_begin[q + 1] - 1; i >= rs.queue_begin[q]; --i) {
        const int32_t position = rs.order[i];
        if (i > rs.queue_begin[q] && position < rs.order[i - 1]) return false;
        // Both cache lines of the instruction two dozen ahead (the walk is backwards).
        const char* ahead =
            reinterpret_cast<const char*>(rs.instructions.data() + std::max(i - 24, 0));
        __builtin_prefetch(ahead);
        __builtin_prefetch(ahead + 64);
        const isa::Instruction& inst = rs.instructions[i];
        for (int w = 0; w < inst.num_waits(); ++w) {
          const int32_t b = inst.wait_barrier(w);
          if (b < 0 || b >= nb) return false;
          const uint32_t needed = static_cast<uint32_t>(inst.wait_target(w)) - rs.barrier_begin[b];
          if (needed == 0) continue;  // reached by nothing at all
          own[b].max_needed = std::max(own[b].max_needed, needed);
          own[b].first_wait = std::min(own[b].first_wait, position);
        }
        for (int sg = 0; sg < inst.num_signals(); ++sg) {
          const int32_t b = inst.signal_barrier(sg);
          if (b < 0 || b >= nb) return false;
          const int32_t target = inst.signal_rank(sg);
          for (int t = 0; t < tp; ++t) {
            if (target != isa::kSignalAllRanks && target != t) continue;
            BarrierSummary& x = sum[t * num_barriers + b];
            ++x.signals;
            x.last_signal = std::max(x.last_signal, position);
          }
        }
      }
    }
  }
  for (int r = 0; r < tp; ++r) {
    const RankSchedule& rs = step.ranks[r];
    for (size_t b = 0; b < num_barriers; ++b) {
      const BarrierSummary& x = sum[r * num_barriers + b];
      if (x.max_needed > x.signals || x.last_signal >= x.first_wait) return false;
      if (rs.barrier_begin[b] + x.signals != rs.barrier_end[b]) return false;
    }
  }
  return true;
}

}  // namespace

absl::Status check_deadlock_free(const Step& step) {
  thread_local std::vector<BarrierSummary> summaries;  // capacity kept between steps
  if (holds_deadlock_invariant(step, summaries)) return absl::OkStatus();
  return check_deadlock_free_reference(step);  // its verdict and its message
}

}  // namespace megaserve::engine
