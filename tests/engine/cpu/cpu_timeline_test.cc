// The CPU interpreter's step timeline (ExecutionOptions::timings): one record per instruction
// of rank 0, on the lane of the queue (virtual SM) that ran it, in queue order and without
// overlap within a lane, in every execution mode; and the Chrome trace made from it has one
// lane per virtual SM and one event per instruction.
#include <algorithm>
#include <map>
#include <set>
#include <vector>

#include "engine/cpu/cpu_interpreter.h"
#include "engine/model/weights.h"
#include "engine/planner/schedule_builder.h"
#include "engine/step_trace.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/support/safetensors_writer.h"

namespace megaserve::engine {
namespace {

constexpr int kSms = 6;
constexpr int32_t kBlockSize = 16;

scheduler::StepPlan prefill_plan() {
  scheduler::StepPlan plan;
  plan.step_id = 1;
  plan.kv_block_size = kBlockSize;
  for (int i = 0; i < 3; ++i) {
    scheduler::StepRequest r;
    r.request_id = i + 1;
    r.first_position = 0;
    r.token_ids.assign(5 + 7 * i, 3 + i);
    for (int b = 0; b * kBlockSize < static_cast<int>(r.token_ids.size()); ++b) {
      r.block_table.push_back(4 * i + b);
    }
    r.sample = true;
    r.sampling.temperature = 0.0f;
    plan.requests.push_back(r);
  }
  return plan;
}

class CpuTimelineTest : public ::testing::TestWithParam<ExecutionMode> {};

TEST_P(CpuTimelineTest, OneRecordPerInstructionOnItsQueuesLane) {
  const ModelConfig config = testing::tiny_model_config(ModelFamily::kLlama);
  const ModelWeights weights = dummy_weights(config, DType::kF32, 7);
  ScheduleBuilder builder(config, cpu_tile_config(kSms), 1);
  absl::StatusOr<Step> step = builder.build(prefill_plan(), 16);
  ASSERT_TRUE(step.ok()) << step.status();
  auto interpreter =
      CpuInterpreter::create(config, weights, 1, 16, kBlockSize, builder.num_barriers());
  ASSERT_TRUE(interpreter.ok()) << interpreter.status();

  std::vector<InstructionTiming> timings;
  ExecutionOptions options;
  options.mode = GetParam();
  options.timings = &timings;
  std::vector<scheduler::SampledToken> sampled;
  ASSERT_TRUE((*interpreter)->run(*step, options, &sampled).ok());

  const RankSchedule& rs = step->ranks[0];
  ASSERT_EQ(timings.size(), rs.instructions.size());
  std::set<uint32_t> lanes, busy_queues;
  for (int q = 0; q < rs.num_queues(); ++q) {
    if (rs.queue_begin[q] < rs.queue_begin[q + 1]) busy_queues.insert(q);
    uint64_t previous_end = 0;
    for (int32_t i = rs.queue_begin[q]; i < rs.queue_begin[q + 1]; ++i) {
      const InstructionTiming& t = timings[i];
      EXPECT_EQ(t.sm, static_cast<uint32_t>(q)) << "instruction " << i;
      EXPECT_GT(t.fetch_ns, 0u);
      EXPECT_LE(t.fetch_ns, t.start_ns);
      EXPECT_LE(t.start_ns, t.end_ns);
      // A queue runs its instructions in order, one at a time.
      EXPECT_LE(previous_end, t.fetch_ns) << "instruction " << i << " overlaps its lane";
      previous_end = t.end_ns;
      lanes.insert(t.sm);
    }
  }
  EXPECT_EQ(lanes, busy_queues);
  EXPECT_GT(lanes.size(), 1u);

  // The Chrome trace: one op event per instruction, one named lane per virtual SM.
  const nlohmann::json trace =
      nlohmann::json::parse(chrome_trace_json(step_timeline(*step, timings)));
  std::map<int, int> ops_per_lane;
  std::set<int> named;
  for (const auto& e : trace["traceEvents"]) {
    if (e["ph"] == "M") named.insert(e["tid"].get<int>());
    if (e["ph"] == "X" && e["cat"] == "op") ++ops_per_lane[e["tid"].get<int>()];
  }
  int ops = 0;
  for (const auto& [lane, n] : ops_per_lane) {
    ops += n;
    EXPECT_TRUE(named.contains(lane));
  }
  EXPECT_EQ(ops, static_cast<int>(rs.instructions.size()));
  EXPECT_EQ(ops_per_lane.size(), busy_queues.size());
}

INSTANTIATE_TEST_SUITE_P(Modes, CpuTimelineTest,
                         ::testing::Values(ExecutionMode::kSequential, ExecutionMode::kShuffled,
                                           ExecutionMode::kThreaded));

}  // namespace
}  // namespace megaserve::engine
