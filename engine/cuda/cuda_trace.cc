#include "engine/cuda/cuda_trace.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace megaserve::engine {

namespace {

using isa::Opcode;

constexpr int kMaxOps = static_cast<int>(Opcode::kNumOpcodes);

}  // namespace

TraceSummary summarize_trace(const ModelConfig& config, const Step& step,
                             std::span<const InstructionTiming> timings) {
  const RankSchedule& rs = step.ranks[0];
  TraceSummary s;
  s.num_ctas = rs.num_queues();
  OpSummary ops[kMaxOps];
  uint64_t first = ~uint64_t{0}, last = 0;
  const size_t n = std::min(timings.size(), rs.instructions.size());
  for (size_t i = 0; i < n; ++i) {
    const isa::Instruction& inst = rs.instructions[i];
    const int op = static_cast<int>(inst.opcode());
    if (op <= 0 || op >= kMaxOps) continue;
    const InstructionTiming& t = timings[i];
    const InstructionWork w = instruction_work(config, step.meta, inst);
    OpSummary& o = ops[op];
    o.op = inst.opcode();
    ++o.count;
    o.busy_us += (t.end_ns - t.start_ns) * 1e-3;
    o.wait_us += (t.start_ns - t.fetch_ns) * 1e-3;
    o.flops += w.flops;
    o.bytes += w.bytes;
    s.flops += w.flops;
    s.bytes += w.bytes;
    first = std::min(first, t.fetch_ns);
    last = std::max(last, t.end_ns);
  }
  s.span_us = last > first ? (last - first) * 1e-3 : 0;
  for (const OpSummary& o : ops) {
    if (o.count > 0) s.ops.push_back(o);
  }
  return s;
}

std::string format_trace_summary(const TraceSummary& s) {
  std::string out = absl::StrFormat(
      "span %.1f us over %d CTAs; %.3g GFLOP, %.3g GB in the step\n"
      "%-16s %7s %12s %12s %10s %10s %12s %10s\n",
      s.span_us, s.num_ctas, s.flops * 1e-9, s.bytes * 1e-9, "op", "count", "busy_us/CTA",
      "wait_us/CTA", "us/inst", "GFLOP", "TFLOP/s", "TB/s");
  const double ctas = std::max(1, s.num_ctas);
  for (const OpSummary& o : s.ops) {
    // Over the GPU: the work of every instruction over its summed busy time spread across
    // the CTAs, i.e. the rate the op would reach if it had the whole GPU for its busy time.
    const double wall_s = o.busy_us / ctas * 1e-6;
    absl::StrAppend(&out, absl::StrFormat("%-16s %7d %12.1f %12.1f %10.2f %10.3g %12.3f %10.3f\n",
                                          isa::opcode_name(o.op), o.count, o.busy_us / ctas,
                                          o.wait_us / ctas, o.busy_us / o.count, o.flops * 1e-9,
                                          wall_s > 0 ? o.flops / wall_s * 1e-12 : 0,
                                          wall_s > 0 ? o.bytes / wall_s * 1e-12 : 0));
  }
  return out;
}

}  // namespace megaserve::engine
