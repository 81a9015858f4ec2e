// The static verifier (DESIGN.md §4): from the regions each instruction of a Step reads and
// writes (ScheduleOptions::record_accesses), proves that every pair of instructions that
// touch overlapping bytes, at least one of them writing, is ordered by the wait graph:
// queue order on one SM, plus barrier edges (a wait that needs every signal its barrier gets
// in this step orders all the signallers before the waiter; a wait that needs fewer orders
// none of them in particular), across ranks too. Steps are separated by the executor (a
// step starts after the previous one completed), so only pairs within one step matter.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "engine/isa/step.h"

namespace megaserve::engine {

struct Conflict {
  InstructionRef first;  // earlier in the global order
  InstructionRef second;
  Region region;  // the overlap
  bool first_writes = false;
  bool second_writes = false;
};

// Every unordered conflicting pair (at most `max_conflicts`), in global order of `second`.
// Requires a Step that passes check_deadlock_free and has recorded accesses.
std::vector<Conflict> find_conflicts(const Step& step, int max_conflicts = 16);

// OK, or an error listing the conflicts: "kAttention layer 1 (...) rank 0 sm 2 #5 reads q
// rows [0,4) bytes [0,64) written by kQkvRope layer 1 (...) rank 0 sm 0 #3, unordered".
absl::Status verify_step(const Step& step);
std::string describe_conflict(const Step& step, const Conflict& c);

}  // namespace megaserve::engine
