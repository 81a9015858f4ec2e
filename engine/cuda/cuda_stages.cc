#include "engine/cuda/cuda_stages.h"

#include <algorithm>
#include <map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace megaserve::engine {

namespace {

struct Stage {
  isa::Opcode op = isa::Opcode::kInvalid;
  uint64_t first_start = ~uint64_t{0}, last_end = 0, slowest = 0;
  std::vector<uint64_t> ends;
};

}  // namespace

StagePath stage_path(const Step& step, std::span<const InstructionTiming> timings) {
  const RankSchedule& rs = step.ranks[0];
  std::map<std::pair<int, int>, Stage> by_key;  // (layer, opcode)
  uint64_t first_fetch = ~uint64_t{0};
  const size_t n = std::min(timings.size(), rs.instructions.size());
  for (size_t i = 0; i < n; ++i) {
    const isa::Instruction& inst = rs.instructions[i];
    const InstructionTiming& t = timings[i];
    Stage& s = by_key[{inst.layer(), static_cast<int>(inst.opcode())}];
    s.op = inst.opcode();
    s.first_start = std::min(s.first_start, t.start_ns);
    s.last_end = std::max(s.last_end, t.end_ns);
    s.slowest = std::max(s.slowest, t.end_ns - t.start_ns);
    s.ends.push_back(t.end_ns);
    first_fetch = std::min(first_fetch, t.fetch_ns);
  }
  StagePath path;
  if (by_key.empty()) return path;
  std::vector<Stage> stages;
  for (auto& [key, s] : by_key) stages.push_back(std::move(s));
  std::sort(stages.begin(), stages.end(),
            [](const Stage& a, const Stage& b) { return a.last_end < b.last_end; });
  path.span_us = (stages.back().last_end - first_fetch) * 1e-3;
  path.first_us = (stages.front().last_end - first_fetch) * 1e-3;
  std::map<int, StagePathRow> rows;
  for (size_t k = 1; k < stages.size(); ++k) {
    Stage& s = stages[k];
    const double prev_end = static_cast<double>(stages[k - 1].last_end);
    std::nth_element(s.ends.begin(), s.ends.begin() + s.ends.size() / 2, s.ends.end());
    StagePathRow& r = rows[static_cast<int>(s.op)];
    r.op = s.op;
    ++r.stages;
    r.adds_us += (s.last_end - prev_end) * 1e-3;
    r.wake_us += (static_cast<double>(s.first_start) - prev_end) * 1e-3;
    r.tail_us += (s.last_end - s.ends[s.ends.size() / 2]) * 1e-3;
    r.slowest_us += s.slowest * 1e-3;
  }
  for (auto& [op, r] : rows) path.ops.push_back(r);
  return path;
}

std::string format_stage_path(const StagePath& p) {
  std::string out = absl::StrFormat(
      "stages: span %.1f us, %.1f to the first stage's end; per stage:\n"
      "%-16s %7s %10s %8s %10s %10s %10s\n",
      p.span_us, p.first_us, "op", "stages", "adds_us", "share", "wake_us", "tail_us",
      "slowest_us");
  for (const StagePathRow& r : p.ops) {
    const double k = r.stages;
    absl::StrAppend(&out, absl::StrFormat("%-16s %7d %10.2f %7.1f%% %10.2f %10.2f %10.2f\n",
                                          isa::opcode_name(r.op), r.stages, r.adds_us / k,
                                          p.span_us > 0 ? 100 * r.adds_us / p.span_us : 0,
                                          r.wake_us / k, r.tail_us / k, r.slowest_us / k));
  }
  return out;
}

}  // namespace megaserve::engine
