#include "engine/step_trace.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <system_error>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/isa/op_args.h"

namespace megaserve::engine {
namespace {

// A JSON string literal's contents: quotes, backslashes and control characters escaped.
std::string json_escaped(const std::string& text) {
  std::string out;
  for (const char c : text) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      absl::StrAppendFormat(&out, "\\u%04x", c);
    } else {
      out += c;
    }
  }
  return out;
}

}  // namespace

StepTimeline step_timeline(const Step& step, std::vector<InstructionTiming> timings) {
  StepTimeline t;
  t.step_id = step.step_id;
  t.num_tokens = step.meta.num_tokens;
  t.num_requests = step.meta.num_requests;
  if (!step.ranks.empty()) {
    t.instructions = step.ranks[0].instructions;
    t.queue_begin = step.ranks[0].queue_begin;
  }
  t.timings = std::move(timings);
  return t;
}

std::string chrome_trace_json(const StepTimeline& timeline, const ChromeTraceOptions& options) {
  const std::vector<InstructionTiming>& timings = timeline.timings;
  const size_t n = std::min(timings.size(), timeline.instructions.size());
  uint64_t t0 = ~uint64_t{0};
  for (size_t i = 0; i < n; ++i) t0 = std::min(t0, timings[i].fetch_ns);
  std::vector<int> queue_of(n, 0);
  for (size_t q = 0; q + 1 < timeline.queue_begin.size(); ++q) {
    for (int32_t i = timeline.queue_begin[q];
         i < timeline.queue_begin[q + 1] && i < static_cast<int32_t>(n); ++i) {
      queue_of[i] = static_cast<int>(q);
    }
  }
  std::string out = "{\"traceEvents\":[\n";
  std::vector<bool> named;
  bool first = true;
  const auto event = [&](const std::string& e) {
    absl::StrAppend(&out, first ? "" : ",\n", e);
    first = false;
  };
  for (size_t i = 0; i < n; ++i) {
    const isa::Instruction& inst = timeline.instructions[i];
    if (inst.layer() > options.max_layer) continue;
    const InstructionTiming& t = timings[i];
    const double fetch = (t.fetch_ns - t0) * 1e-3, start = (t.start_ns - t0) * 1e-3;
    const double end = (t.end_ns - t0) * 1e-3;
    if (t.sm >= named.size()) named.resize(t.sm + 1, false);
    if (!named[t.sm]) {
      named[t.sm] = true;
      event(absl::StrFormat(
          "{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":0,\"tid\":%u,\"args\":{\"name\":\"SM "
          "%u\"}}",
          t.sm, t.sm));
    }
    if (start > fetch) {
      event(absl::StrFormat(
          "{\"name\":\"wait\",\"cat\":\"wait\",\"ph\":\"X\",\"ts\":%.3f,\"dur\":%.3f,\"pid\":0,"
          "\"tid\":%u}",
          fetch, start - fetch, t.sm));
    }
    const std::string args = isa::args_json(inst);
    event(absl::StrFormat(
        "{\"name\":\"%s\",\"cat\":\"op\",\"ph\":\"X\",\"ts\":%.3f,\"dur\":%.3f,\"pid\":0,"
        "\"tid\":%u,\"args\":{\"layer\":%d,\"queue\":%d,\"index\":%d,\"wait_us\":%.3f%s%s}}",
        isa::opcode_name(inst.opcode()), start, end - start, t.sm, inst.layer(), queue_of[i],
        static_cast<int>(i), start - fetch, args.empty() ? "" : ",", args));
  }
  absl::StrAppend(&out,
                  "\n],\"displayTimeUnit\":\"ns\",\"otherData\":{\"step_id\":", timeline.step_id,
                  ",\"num_tokens\":", timeline.num_tokens,
                  ",\"num_requests\":", timeline.num_requests, ",\"num_instructions\":", n);
  if (!options.backend.empty()) {
    absl::StrAppend(&out, ",\"backend\":\"", json_escaped(options.backend), "\"");
  }
  absl::StrAppend(&out, "}}\n");
  return out;
}

absl::Status write_chrome_trace(const std::string& path, const StepTimeline& timeline,
                                const ChromeTraceOptions& options) {
  // Written beside and renamed into place, so that a reader never sees half a trace.
  const std::string part = path + ".part";
  {
    std::ofstream f(part, std::ios::binary | std::ios::trunc);
    if (!f) return absl::NotFoundError(absl::StrCat("chrome trace: cannot open ", part));
    f << chrome_trace_json(timeline, options);
    f.close();
    if (!f) return absl::DataLossError(absl::StrCat("chrome trace: writing ", part, " failed"));
  }
  std::error_code error;
  std::filesystem::rename(part, path, error);
  if (error) {
    return absl::DataLossError(
        absl::StrCat("chrome trace: renaming ", part, " to ", path, ": ", error.message()));
  }
  return absl::OkStatus();
}

}  // namespace megaserve::engine
