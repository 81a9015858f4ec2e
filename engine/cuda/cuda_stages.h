// Where a profiled step's span goes, stage by stage: the instructions of one (layer, opcode)
// form a stage; ordered by when their last instruction ended, each stage adds the time from
// the previous stage's last end to its own to the span. That time is split into the wake-up
// (previous stage's last end -> this stage's first start: signal, poll, fetch; negative where
// the stage started while the previous one still ran), and the rest, and each stage's tail
// (its last end minus the median end: the stragglers every other SM waits for) is given
// too. Per opcode, averaged over its stages. Host-only, tested with hand-made timings.
#pragma once

#include <span>
#include <string>
#include <vector>

#include "engine/isa/isa.h"
#include "engine/isa/step.h"

namespace megaserve::engine {

struct StagePathRow {
  isa::Opcode op = isa::Opcode::kInvalid;
  int stages = 0;
  double adds_us = 0;     // summed over its stages: the span they add
  double wake_us = 0;     // summed: previous stage's last end -> first start here
  double tail_us = 0;     // summed: last end - median end
  double slowest_us = 0;  // summed: the longest instruction's busy time per stage
};

struct StagePath {
  double span_us = 0;             // first fetch -> last end
  double first_us = 0;            // first fetch -> the first stage's last end
  std::vector<StagePathRow> ops;  // opcodes that occur, in opcode order
};

// `timings` is parallel to step.ranks[0].instructions (one rank).
StagePath stage_path(const Step& step, std::span<const InstructionTiming> timings);

// One line per opcode: stages, and per stage the span added, wake-up, tail, slowest busy.
std::string format_stage_path(const StagePath& path);

}  // namespace megaserve::engine
