// The engine's step capture (EngineOptions::trace, engine/step_capture.h) over the CPU
// interpreter with the real stories260K model: the first N steps that run are written as N
// Chrome traces, each with one lane per virtual SM and exactly the instructions the step
// runner built for that step (a backend wrapper logs them as they are submitted), at ordered,
// non-negative times; tokens equal an untraced run's; and with the plot script each trace is
// drawn as a PNG beside it.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "engine/engine.h"
#include "engine/model/model_config.h"
#include "engine/model/weights.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/support/assets.h"
#include "tests/support/safetensors_writer.h"

namespace megaserve::engine {
namespace {

namespace fs = std::filesystem;

constexpr char kModel[] = "models/stories260K-hf/config.json";
constexpr int kSms = 2;

fs::path model_dir() { return testing::assets_dir() / "models/stories260K-hf"; }

// What the step runner built for each step submitted, in submission order.
struct StepLog {
  std::mutex mu;
  std::vector<uint64_t> order;
  std::map<uint64_t, std::vector<int32_t>> queue_begin;  // step id -> rank 0's queues
};

// The CPU backend, logging every step it is given; its timings are handed on as its own.
class LoggingBackend : public Backend {
 public:
  LoggingBackend(std::unique_ptr<CpuBackend> inner, std::shared_ptr<StepLog> log)
      : inner_(std::move(inner)), log_(std::move(log)) {}
  std::string describe() const override { return inner_->describe(); }
  int32_t num_kv_blocks() const override { return inner_->num_kv_blocks(); }
  int32_t kv_block_size() const override { return inner_->kv_block_size(); }
  ScheduleTarget schedule_target() const override { return inner_->schedule_target(); }
  bool record_timings(bool on) override { return inner_->record_timings(on); }
  absl::StatusOr<scheduler::StepOutput> execute(const Step& step) override {
    {
      std::lock_guard<std::mutex> lock(log_->mu);
      log_->order.push_back(step.step_id);
      log_->queue_begin[step.step_id] = step.ranks[0].queue_begin;
    }
    absl::StatusOr<scheduler::StepOutput> out = inner_->execute(step);
    if (out.ok()) {
      std::vector<InstructionTiming> timings = inner_->take_timings(step.step_id);
      if (!timings.empty()) keep_timings(step.step_id, std::move(timings));
    }
    return out;
  }

 private:
  std::unique_ptr<CpuBackend> inner_;
  std::shared_ptr<StepLog> log_;
};

std::unique_ptr<Engine> make_engine(const TraceOptions& trace, std::shared_ptr<StepLog> log) {
  auto config = load_model_config(model_dir());
  EXPECT_TRUE(config.ok()) << config.status();
  auto weights = load_weights(model_dir(), *config, DType::kF32);
  EXPECT_TRUE(weights.ok()) << weights.status();
  CpuBackendOptions backend_options;
  backend_options.num_sms = kSms;
  backend_options.num_kv_blocks = 256;
  backend_options.execution.mode = ExecutionMode::kThreaded;  // as the server runs it
  auto backend = CpuBackend::create(*config, *std::move(weights), backend_options);
  EXPECT_TRUE(backend.ok()) << backend.status();
  EngineOptions options;
  options.trace = trace;
  auto engine = Engine::create(
      *config, std::make_unique<LoggingBackend>(*std::move(backend), std::move(log)), options);
  EXPECT_TRUE(engine.ok()) << engine.status();
  return engine.ok() ? *std::move(engine) : nullptr;
}

// Greedy requests of different prompt lengths (BOS + story tokens), so that the first steps
// mix prefill and decode.
std::vector<std::vector<int32_t>> run_requests(Engine& engine) {
  const std::vector<std::vector<int32_t>> prompts = {
      {1}, {1, 403, 407, 261, 378}, {1, 403, 407, 261, 378, 304, 260, 355, 280, 5}};
  std::vector<std::shared_ptr<RequestOutput>> outputs;
  for (const auto& prompt : prompts) {
    GenerateRequest r;
    r.prompt_token_ids = prompt;
    r.sampling.temperature = 0.0f;
    r.sampling.max_tokens = 12;
    r.sampling.ignore_eos = true;
    auto output = engine.submit(r);
    EXPECT_TRUE(output.ok()) << output.status();
    if (output.ok()) outputs.push_back(*output);
  }
  std::vector<std::vector<int32_t>> tokens;
  for (auto& output : outputs) {
    std::vector<int32_t>& t = tokens.emplace_back();
    for (bool done = false; !done;) {
      for (RequestEvent& e : output->wait()) {
        for (const auto& tok : e.tokens) t.push_back(tok.token_id);
        done = done || e.finished.has_value();
      }
    }
  }
  return tokens;
}

std::vector<fs::path> files_ending(const fs::path& dir, const std::string& suffix) {
  std::vector<fs::path> out;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (name.size() > suffix.size() && name.ends_with(suffix)) out.push_back(entry.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

// Checks one trace against the queues the runner built for its step.
void expect_trace_of(const nlohmann::json& trace, const std::vector<int32_t>& queue_begin) {
  const int num_instructions = queue_begin.back();
  std::set<int> busy_queues, named_lanes, op_lanes;
  for (int q = 0; q + 1 < static_cast<int>(queue_begin.size()); ++q) {
    if (queue_begin[q] < queue_begin[q + 1]) busy_queues.insert(q);
  }
  std::vector<int> seen(num_instructions, 0);
  std::map<int, std::vector<std::pair<int, std::pair<double, double>>>> lanes;  // by index
  for (const auto& e : trace["traceEvents"]) {
    if (e["ph"] == "M") {
      named_lanes.insert(e["tid"].get<int>());
      continue;
    }
    ASSERT_EQ(e["ph"], "X");
    const double ts = e["ts"], dur = e["dur"];
    EXPECT_GE(ts, 0.0);
    EXPECT_GE(dur, 0.0);
    if (e["cat"] != "op") continue;
    const int index = e["args"]["index"], tid = e["tid"], queue = e["args"]["queue"];
    ASSERT_GE(index, 0);
    ASSERT_LT(index, num_instructions);
    ++seen[index];
    EXPECT_EQ(tid, queue) << "on the CPU a lane is its queue (virtual SM)";
    EXPECT_GE(index, queue_begin[queue]);
    EXPECT_LT(index, queue_begin[queue + 1]);
    op_lanes.insert(tid);
    lanes[tid].push_back({index, {ts, dur}});
  }
  EXPECT_EQ(std::count(seen.begin(), seen.end(), 1), num_instructions)
      << "every instruction of the step exactly once";
  EXPECT_EQ(trace["otherData"]["num_instructions"], num_instructions);
  EXPECT_EQ(op_lanes, busy_queues);
  EXPECT_EQ(named_lanes, busy_queues);
  // A lane runs its queue in order, one instruction at a time (µs with 3 decimals).
  for (auto& [tid, events] : lanes) {
    std::sort(events.begin(), events.end());
    for (size_t i = 1; i < events.size(); ++i) {
      const auto [ts, dur] = events[i - 1].second;
      EXPECT_GE(events[i].second.first, ts + dur - 2e-3)
          << "lane " << tid << ": instruction " << events[i].first << " overlaps the one before";
    }
  }
}

TEST(EngineTrace, CapturesTheFirstStepsWithEveryInstructionOnItsLane) {
  MEGASERVE_REQUIRE_ASSET(kModel);
  constexpr int kTraced = 3;
  const fs::path dir = testing::make_test_dir("traces") / "made_by_the_engine";
  auto log = std::make_shared<StepLog>();
  std::vector<std::vector<int32_t>> traced_tokens;
  {
    auto engine = make_engine({.steps = kTraced, .dir = dir.string()}, log);
    ASSERT_NE(engine, nullptr);
    traced_tokens = run_requests(*engine);
  }  // the capture writes what is queued before the engine is gone

  auto untraced_log = std::make_shared<StepLog>();
  auto untraced = make_engine({}, untraced_log);
  ASSERT_NE(untraced, nullptr);
  EXPECT_EQ(traced_tokens, run_requests(*untraced));
  EXPECT_EQ(traced_tokens.size(), 3u);
  EXPECT_EQ(traced_tokens[0].size(), 12u);

  ASSERT_GT(log->order.size(), static_cast<size_t>(kTraced)) << "more steps ran than were traced";
  const std::vector<fs::path> traces = files_ending(dir, ".trace.json");
  ASSERT_EQ(traces.size(), static_cast<size_t>(kTraced));
  EXPECT_TRUE(files_ending(dir, ".png").empty()) << "no plot script given";
  for (int i = 0; i < kTraced; ++i) {
    const uint64_t step_id = log->order[i];
    EXPECT_EQ(traces[i], fs::path(trace_file_path(dir.string(), step_id)));
    std::ifstream in(traces[i]);
    const nlohmann::json trace = nlohmann::json::parse(in);
    EXPECT_EQ(trace["otherData"]["step_id"], step_id);
    EXPECT_NE(trace["otherData"]["backend"].get<std::string>().find("cpu interpreter"),
              std::string::npos);
    SCOPED_TRACE(traces[i].string());
    expect_trace_of(trace, log->queue_begin.at(step_id));
    EXPECT_EQ(static_cast<int>(log->queue_begin.at(step_id).size()), kSms + 1);
  }
}

// Width and height from a PNG's IHDR chunk (big-endian, right after the signature).
std::pair<uint32_t, uint32_t> png_size(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  unsigned char head[24] = {};
  in.read(reinterpret_cast<char*>(head), sizeof head);
  const auto be32 = [&](int at) {
    return uint32_t{head[at]} << 24 | uint32_t{head[at + 1]} << 16 | uint32_t{head[at + 2]} << 8 |
           uint32_t{head[at + 3]};
  };
  if (!in || head[1] != 'P' || head[2] != 'N' || head[3] != 'G') return {0, 0};
  return {be32(16), be32(20)};
}

TEST(EngineTrace, DrawsEachCapturedStepAsAPng) {
  MEGASERVE_REQUIRE_ASSET(kModel);
  constexpr int kTraced = 2;
  const fs::path dir = testing::make_test_dir("traces");
  auto engine = make_engine({.steps = kTraced,
                             .dir = dir.string(),
                             .plot_script = MEGASERVE_TRACE_PLOT_SCRIPT,
                             .python = MEGASERVE_PYTHON},
                            std::make_shared<StepLog>());
  ASSERT_NE(engine, nullptr);
  run_requests(*engine);
  // The drawing runs beside the engine (python3 and matplotlib take seconds to start).
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (files_ending(dir, ".trace.png").size() < kTraced &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  const std::vector<fs::path> pngs = files_ending(dir, ".trace.png");
  ASSERT_EQ(pngs.size(), static_cast<size_t>(kTraced))
      << testing::read_file(dir / "trace-plot.log");
  const std::vector<fs::path> traces = files_ending(dir, ".trace.json");
  ASSERT_EQ(traces.size(), static_cast<size_t>(kTraced));
  for (int i = 0; i < kTraced; ++i) {
    EXPECT_EQ(pngs[i].stem(), traces[i].stem());
    // trace-plot.py's default: 1800 pixels wide, at least 400 high.
    const auto [width, height] = png_size(pngs[i]);
    EXPECT_EQ(width, 1800u) << pngs[i];
    EXPECT_EQ(height, 400u) << pngs[i];
  }
}

}  // namespace
}  // namespace megaserve::engine
