// Step capture: the live per-SM timeline of a running engine (docs/tracing.md). The engine
// records the timelines of the first `steps` steps that run (Backend::record_timings) and
// hands each over here; the capture's own thread writes it as a Chrome trace,
// DIR/step-<id>.trace.json (engine/step_trace.h), then draws the traces written so far as
// DIR/step-<id>.trace.png with scripts/trace-plot.py (one python3 run for a batch; its
// output goes to DIR/trace-plot.log). The engine thread never waits for a file or a drawing.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/isa/step.h"
#include "engine/step_trace.h"

namespace megaserve::engine {

// At most this many steps per run: each is a trace file of up to hundreds of MB and a PNG.
inline constexpr int32_t kMaxTraceSteps = 64;

struct TraceOptions {
  int32_t steps = 0;  // the first steps that run (steps with work) to capture; 0: off
  std::string dir;    // where the files go; made when missing
  // scripts/trace-plot.py (find_trace_plot_script), run by `python`; empty: no PNGs.
  std::string plot_script;
  std::string python = "python3";
};

// InvalidArgument naming the option: steps outside [0, kMaxTraceSteps], or steps without dir.
absl::Status check_trace_options(const TraceOptions& options);

// Makes `dir` (with its parents) when missing and proves that files can be written there by
// writing and removing one; the error names the folder and what failed.
absl::Status prepare_trace_dir(const std::string& dir);

// scripts/trace-plot.py: <binary's folder>/../share/megaserve/trace-plot.py in an installed
// tree, else the source tree's; empty when neither exists.
std::string find_trace_plot_script();

// DIR/step-<id>.trace.json, the id zero-padded to 6 digits so that names sort by step.
std::string trace_file_path(const std::string& dir, uint64_t step_id);

class StepCapture {
 public:
  // Checks `options` (steps > 0) and prepares the folder. `backend` names the backend in
  // every trace (Backend::describe).
  static absl::StatusOr<std::unique_ptr<StepCapture>> create(const TraceOptions& options,
                                                             std::string backend);
  // Writes every trace still queued; a drawing under way is stopped, and traces not drawn
  // are logged with the command that draws them.
  ~StepCapture();
  StepCapture(const StepCapture&) = delete;
  StepCapture& operator=(const StepCapture&) = delete;

  int32_t steps() const { return options_.steps; }
  // Engine thread: copies what the trace needs of `step` and queues it; never blocks on I/O.
  void add(const Step& step, std::vector<InstructionTiming> timings);
  // Blocks until every step added so far is written and drawn (tests).
  void flush();

 private:
  StepCapture(const TraceOptions& options, std::string backend);
  void loop();
  // Runs the plot script over `traces`; false when it failed (then no more drawings).
  bool draw(const std::vector<std::string>& traces);

  const TraceOptions options_;
  const ChromeTraceOptions trace_options_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<StepTimeline> queue_;  // added, not yet taken by the thread
  bool busy_ = false;                // the thread is writing or drawing a batch
  bool stop_ = false;
  bool drawing_ = true;                 // false once the script failed or there is none
  std::vector<std::string> not_drawn_;  // traces written but never drawn
  std::thread thread_;
};

}  // namespace megaserve::engine
