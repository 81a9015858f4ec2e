// A step's timeline as a Chrome trace (chrome://tracing, https://ui.perfetto.dev): one lane
// per SM (the CUDA backend's per-instruction device timestamps) or virtual SM (the CPU
// interpreter's queues), one event per instruction. The one trace writer: the GPU
// benchmarks, the tests and the engine's step capture (engine/step_capture.h) all use it.
// scripts/trace-plot.py draws what it writes as a PNG.
#pragma once

#include <climits>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "engine/isa/isa.h"
#include "engine/isa/step.h"

namespace megaserve::engine {

// What the trace needs of one step, copied out of it so that it can be written after the
// step's buffers are reused: rank 0's instructions and queues, and when each instruction ran
// (InstructionTiming, engine/isa/step.h; recorded for rank 0 only).
struct StepTimeline {
  uint64_t step_id = 0;
  int32_t num_tokens = 0;
  int32_t num_requests = 0;
  std::vector<isa::Instruction> instructions;  // rank 0's
  std::vector<int32_t> queue_begin;            // [num_queues + 1] into instructions
  std::vector<InstructionTiming> timings;      // parallel to instructions
};

StepTimeline step_timeline(const Step& step, std::vector<InstructionTiming> timings);

struct ChromeTraceOptions {
  // Instructions of decoder layers past max_layer are left out (a large step's full trace is
  // hundreds of MB); ops outside the layers (layer -1) are always in.
  int max_layer = INT32_MAX;
  std::string backend;  // recorded in otherData when not empty (Backend::describe)
};

// {"traceEvents":[...]}: one complete ("ph":"X", "cat":"op") event per instruction on
// thread tid = its SM, timestamps in µs from the step's first fetch, named by opcode, with
// its layer, queue, index and wait time and the op's arguments in "args"; a "wait" event
// ("cat":"wait") before each instruction whose waits took time; thread-name metadata
// ("SM 12") for each SM that ran something; "otherData" with the step id, its tokens,
// requests and instructions.
std::string chrome_trace_json(const StepTimeline& timeline, const ChromeTraceOptions& options = {});
absl::Status write_chrome_trace(const std::string& path, const StepTimeline& timeline,
                                const ChromeTraceOptions& options = {});

}  // namespace megaserve::engine
