#include "engine/planner/schedule_verifier.h"

#include <algorithm>
#include <cstdint>
#include <map>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "engine/planner/schedule_builder.h"

namespace megaserve::engine {

namespace {

// A set of instructions (global positions) as a bitset.
class Bits {
 public:
  explicit Bits(size_t n = 0) : words_((n + 63) / 64, 0) {}
  void set(size_t i) { words_[i / 64] |= uint64_t{1} << (i % 64); }
  bool test(size_t i) const { return (words_[i / 64] >> (i % 64)) & 1; }
  void merge(const Bits& o) {
    for (size_t w = 0; w < words_.size(); ++w) words_[w] |= o.words_[w];
  }

 private:
  std::vector<uint64_t> words_;
};

// happens_before[p]: every instruction ordered before the one at global position p.
std::vector<Bits> happens_before(const Step& step) {
  const size_t n = step.global_order.size();
  const int tp = static_cast<int>(step.ranks.size());
  std::vector<std::vector<int32_t>> position(tp);
  for (int r = 0; r < tp; ++r) position[r].resize(step.ranks[r].instructions.size());
  for (size_t p = 0; p < n; ++p) {
    position[step.global_order[p].rank][step.global_order[p].index] = static_cast<int32_t>(p);
  }
  // Signallers of each (rank, barrier) in this step.
  std::map<std::pair<int, int>, std::vector<int32_t>> signallers;
  for (size_t p = 0; p < n; ++p) {
    const InstructionRef ref = step.global_order[p];
    const isa::Instruction& inst = step.ranks[ref.rank].instructions[ref.index];
    for (int s = 0; s < inst.num_signals(); ++s) {
      for (int r = 0; r < tp; ++r) {
        if (inst.signal_rank(s) == isa::kSignalAllRanks || inst.signal_rank(s) == r) {
          signallers[{r, inst.signal_barrier(s)}].push_back(static_cast<int32_t>(p));
        }
      }
    }
  }
  std::vector<Bits> before(n, Bits(n));
  std::map<std::pair<int, int>, Bits> barrier_closure;  // all signallers and their pasts
  for (size_t p = 0; p < n; ++p) {
    const InstructionRef ref = step.global_order[p];
    const RankSchedule& rs = step.ranks[ref.rank];
    const isa::Instruction& inst = rs.instructions[ref.index];
    // Queue predecessor: the previous instruction of the same queue.
    const bool queue_head =
        std::find(rs.queue_begin.begin(), rs.queue_begin.end(), ref.index) != rs.queue_begin.end();
    if (!queue_head) {
      const int32_t q = position[ref.rank][ref.index - 1];
      before[p].merge(before[q]);
      before[p].set(q);
    }
    for (int w = 0; w < inst.num_waits(); ++w) {
      const std::pair<int, int> key{ref.rank, inst.wait_barrier(w)};
      auto it = signallers.find(key);
      if (it == signallers.end()) continue;
      const uint32_t needed =
          static_cast<uint32_t>(inst.wait_target(w)) - rs.barrier_begin[inst.wait_barrier(w)];
      if (needed < it->second.size()) continue;  // some k of n: none in particular
      auto closure = barrier_closure.find(key);
      if (closure == barrier_closure.end()) {
        Bits all(n);
        for (int32_t a : it->second) {
          all.merge(before[a]);
          all.set(a);
        }
        closure = barrier_closure.emplace(key, std::move(all)).first;
      }
      before[p].merge(closure->second);
    }
  }
  return before;
}

struct Touch {
  Region region;
  bool write;
  int32_t position;
};

}  // namespace

std::vector<Conflict> find_conflicts(const Step& step, int max_conflicts) {
  std::vector<Conflict> conflicts;
  const std::vector<Bits> before = happens_before(step);
  std::map<std::tuple<int, int, int>, std::vector<Touch>> groups;
  for (size_t p = 0; p < step.global_order.size(); ++p) {
    const InstructionRef ref = step.global_order[p];
    const RankSchedule& rs = step.ranks[ref.rank];
    if (rs.accesses.empty()) continue;
    for (const Access& a : rs.accesses[ref.index]) {
      groups[{a.region.rank, static_cast<int>(a.region.buffer), a.region.layer}].push_back(
          {a.region, a.write, static_cast<int32_t>(p)});
    }
  }
  for (auto& [key, touches] : groups) {
    std::sort(touches.begin(), touches.end(), [](const Touch& a, const Touch& b) {
      return a.region.row_begin < b.region.row_begin;
    });
    for (size_t i = 0; i < touches.size(); ++i) {
      const Touch& x = touches[i];
      for (size_t j = i + 1; j < touches.size() && touches[j].region.row_begin < x.region.row_end;
           ++j) {
        const Touch& y = touches[j];
        if (x.position == y.position || (!x.write && !y.write)) continue;
        if (y.region.byte_begin >= x.region.byte_end || x.region.byte_begin >= y.region.byte_end) {
          continue;
        }
        const Touch& first = x.position < y.position ? x : y;
        const Touch& second = x.position < y.position ? y : x;
        if (before[second.position].test(first.position)) continue;
        Conflict c;
        c.first = step.global_order[first.position];
        c.second = step.global_order[second.position];
        c.region = x.region;
        c.region.row_begin = std::max(x.region.row_begin, y.region.row_begin);
        c.region.row_end = std::min(x.region.row_end, y.region.row_end);
        c.region.byte_begin = std::max(x.region.byte_begin, y.region.byte_begin);
        c.region.byte_end = std::min(x.region.byte_end, y.region.byte_end);
        c.first_writes = first.write;
        c.second_writes = second.write;
        conflicts.push_back(c);
      }
    }
  }
  std::sort(conflicts.begin(), conflicts.end(), [&](const Conflict& a, const Conflict& b) {
    return step.ranks[a.second.rank].order[a.second.index] <
           step.ranks[b.second.rank].order[b.second.index];
  });
  if (static_cast<int>(conflicts.size()) > max_conflicts) conflicts.resize(max_conflicts);
  return conflicts;
}

std::string describe_conflict(const Step& step, const Conflict& c) {
  const Region& r = c.region;
  return absl::StrCat(describe_instruction(step, c.second),
                      c.second_writes ? " writes " : " reads ", buffer_name(r.buffer),
                      r.layer >= 0 ? absl::StrCat("[layer ", r.layer, "]") : "", " of rank ",
                      r.rank, " rows [", r.row_begin, ",", r.row_end, ") bytes [", r.byte_begin,
                      ",", r.byte_end, ") that ", describe_instruction(step, c.first),
                      c.first_writes ? " writes" : " reads", ", with no wait ordering them");
}

absl::Status verify_step(const Step& step) {
  if (!step.accesses_recorded) {
    return absl::FailedPreconditionError(
        absl::StrCat("step ", step.step_id, ": built without recorded accesses"));
  }
  if (absl::Status s = check_deadlock_free(step); !s.ok()) return s;
  const std::vector<Conflict> conflicts = find_conflicts(step);
  if (conflicts.empty()) return absl::OkStatus();
  std::string msg = absl::StrCat("step ", step.step_id, ": unordered conflicting accesses:");
  for (const Conflict& c : conflicts) absl::StrAppend(&msg, "\n  ", describe_conflict(step, c));
  return absl::InternalError(msg);
}

}  // namespace megaserve::engine
