// engine/step_capture: the options' range, the folder checks (made when missing, refused with
// a clear error when it cannot be made or written), the file names, and the capture thread
// with hand-made steps: every step added is written, a plot program that fails or cannot
// start costs the PNGs only, and a drawing still running when the capture ends is stopped.
#include "engine/step_capture.h"

#include <sys/stat.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/support/safetensors_writer.h"

namespace megaserve::engine {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

TEST(StepCaptureTest, StepsAreBoundedAndNeedAFolder) {
  EXPECT_TRUE(check_trace_options({}).ok());
  EXPECT_TRUE(check_trace_options({.steps = kMaxTraceSteps, .dir = "d"}).ok());
  for (int32_t steps : {-1, kMaxTraceSteps + 1, 1000}) {
    const absl::Status s = check_trace_options({.steps = steps, .dir = "d"});
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << steps;
    EXPECT_THAT(std::string(s.message()), HasSubstr("trace_steps must be in [0, 64]"));
  }
  const absl::Status s = check_trace_options({.steps = 2});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("trace_steps 2 needs trace_dir"));
}

TEST(StepCaptureTest, TheFolderIsMadeOrRefusedWithTheReason) {
  const fs::path root = testing::make_test_dir("dirs");
  const fs::path nested = root / "a" / "b";
  ASSERT_TRUE(prepare_trace_dir(nested.string()).ok());
  EXPECT_TRUE(fs::is_directory(nested));
  EXPECT_TRUE(fs::is_empty(nested)) << "the write test leaves nothing behind";
  EXPECT_TRUE(prepare_trace_dir(nested.string()).ok()) << "an existing folder is fine";

  // Under a regular file nothing can be made, not even by root.
  const fs::path file = root / "file";
  std::ofstream(file) << "x";
  absl::Status s = prepare_trace_dir((file / "traces").string());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("cannot create it"));
  EXPECT_THAT(std::string(s.message()), HasSubstr((file / "traces").string()));
  s = prepare_trace_dir(file.string());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr(file.string()));

  // A folder without write permission (root writes anyway: then there is nothing to test).
  const fs::path locked = root / "locked";
  fs::create_directory(locked);
  fs::permissions(locked, fs::perms::owner_read | fs::perms::owner_exec);
  if (std::ofstream(locked / "probe")) {
    fs::remove(locked / "probe");
  } else {
    s = prepare_trace_dir(locked.string());
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(s.message()), HasSubstr("is not writable"));
  }
  fs::permissions(locked, fs::perms::owner_all);
}

TEST(StepCaptureTest, FileNamesSortByStep) {
  EXPECT_EQ(trace_file_path("/t", 7), "/t/step-000007.trace.json");
  EXPECT_EQ(trace_file_path("/t", 1234567), "/t/step-1234567.trace.json");
}

// A step of three instructions on two queues, with timings.
Step small_step(uint64_t step_id) {
  Step step;
  step.step_id = step_id;
  step.meta.num_tokens = 4;
  step.meta.num_requests = 1;
  RankSchedule& rs = step.ranks.emplace_back();
  const isa::Opcode ops[] = {isa::Opcode::kEmbedding, isa::Opcode::kLmHead, isa::Opcode::kSample};
  for (isa::Opcode op : ops) {
    isa::Instruction inst{};
    inst.words[isa::kWordOpcode] = static_cast<int32_t>(op);
    inst.words[isa::kWordLayer] = -1;
    rs.instructions.push_back(inst);
  }
  rs.queue_begin = {0, 2, 3};
  return step;
}

std::vector<InstructionTiming> small_timings() {
  return {{1000, 1000, 2000, 0}, {2000, 2500, 3000, 0}, {1000, 3000, 3500, 1}};
}

// A "python" that ignores its arguments and runs `body` (a shell script).
std::string fake_python(const fs::path& dir, const std::string& body) {
  const fs::path path = dir / "fake-python";
  std::ofstream(path) << "#!/bin/sh\n" << body << "\n";
  fs::permissions(path, fs::perms::owner_all);
  return path.string();
}

TEST(StepCaptureTest, WritesEveryStepAddedAndSurvivesAFailingPlot) {
  const fs::path dir = testing::make_test_dir("capture");
  auto capture =
      StepCapture::create({.steps = 2,
                           .dir = dir.string(),
                           .plot_script = "plot.py",
                           .python = fake_python(dir, "echo 'no matplotlib here' >&2; exit 1")},
                          "test backend \"x\"");
  ASSERT_TRUE(capture.ok()) << capture.status();
  (*capture)->add(small_step(5), small_timings());
  (*capture)->flush();
  (*capture)->add(small_step(6), small_timings());  // drawing is off by now: still written
  (*capture)->flush();
  capture->reset();
  for (uint64_t id : {5, 6}) {
    std::ifstream in(trace_file_path(dir.string(), id));
    ASSERT_TRUE(in) << id;
    const nlohmann::json j = nlohmann::json::parse(in);
    EXPECT_EQ(j["otherData"]["step_id"], id);
    EXPECT_EQ(j["otherData"]["num_instructions"], 3);
    EXPECT_EQ(j["otherData"]["backend"], "test backend \"x\"");
    int ops = 0;
    for (const auto& e : j["traceEvents"]) ops += e["ph"] == "X" && e["cat"] == "op";
    EXPECT_EQ(ops, 3);
  }
  std::ifstream log(dir / "trace-plot.log");
  std::string text((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
  EXPECT_THAT(text, HasSubstr("no matplotlib here"));
}

TEST(StepCaptureTest, APlotProgramThatCannotStartCostsOnlyThePngs) {
  const fs::path dir = testing::make_test_dir("capture");
  auto capture = StepCapture::create({.steps = 1,
                                      .dir = dir.string(),
                                      .plot_script = "plot.py",
                                      .python = (dir / "no-such-python").string()},
                                     "cpu");
  ASSERT_TRUE(capture.ok()) << capture.status();
  (*capture)->add(small_step(1), small_timings());
  (*capture)->flush();
  EXPECT_TRUE(fs::exists(trace_file_path(dir.string(), 1)));
}

TEST(StepCaptureTest, ADrawingStillRunningIsStoppedAtTheEnd) {
  const fs::path dir = testing::make_test_dir("capture");
  auto capture = StepCapture::create({.steps = 1,
                                      .dir = dir.string(),
                                      .plot_script = "plot.py",
                                      .python = fake_python(dir, "exec sleep 60")},
                                     "cpu");
  ASSERT_TRUE(capture.ok()) << capture.status();
  (*capture)->add(small_step(1), small_timings());
  // Until the trace is written the drawing cannot have started; give it a moment to start.
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!fs::exists(trace_file_path(dir.string(), 1)) &&
         std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  const auto start = std::chrono::steady_clock::now();
  capture->reset();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
  EXPECT_TRUE(fs::exists(trace_file_path(dir.string(), 1)));
}

}  // namespace
}  // namespace megaserve::engine
