// engine/cuda/cuda_trace on the CPU: steps built by the real ScheduleBuilder (GPU tile shapes, KV
// splits, mixed prefill and decode) with hand-made timings. The work counted per instruction
// must add up to the straight-line formulas of DESIGN.md §10 (2 FLOPs per weight per token
// for the projections, 4 x heads x head_dim per (query, key) pair with causal masking, the
// LM head per sampled row); the summary must add up the timings; the Chrome trace of the same
// timings (engine/step_trace.h) must parse as JSON with one event per instruction on its SM's
// thread.
#include "engine/cuda/cuda_trace.h"

#include <cstdint>
#include <vector>

#include "engine/planner/schedule_builder.h"
#include "engine/planner/tile_config.h"
#include "engine/step_trace.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/support/safetensors_writer.h"

namespace megaserve::engine {
namespace {

using isa::Opcode;

struct Req {
  int first_position;
  int num_tokens;
  bool sample;
};

// A Llama-shaped config with GQA 4 and head_dim 32, small enough to build fast.
ModelConfig test_config() {
  ModelConfig c = testing::tiny_model_config(ModelFamily::kLlama);
  c.hidden_size = 256;
  c.num_heads = 8;
  c.num_kv_heads = 2;
  c.head_dim = 32;
  c.intermediate_size = 384;
  c.vocab_size = 1000;
  c.num_layers = 3;
  c.max_position_embeddings = 8192;
  return c;
}

Step build_step(const ModelConfig& config, const std::vector<Req>& reqs, int kv_split_tokens) {
  TileConfig tiles = gpu_tile_config(16);
  tiles.token_rows = 8;
  tiles.hidden_cols = 64;
  tiles.ffn_cols = 64;
  tiles.vocab_cols = 256;
  tiles.kv_split_tokens = kv_split_tokens;
  tiles.attention_query_rows = 4;
  tiles.attention_batch_requests = 2;
  ScheduleBuilder builder(config, tiles, 1);
  scheduler::StepPlan plan;
  plan.kv_block_size = 16;
  int32_t next_block = 0;
  for (size_t i = 0; i < reqs.size(); ++i) {
    scheduler::StepRequest r;
    r.request_id = i + 1;
    r.first_position = reqs[i].first_position;
    r.token_ids.assign(reqs[i].num_tokens, 5);
    const int context = reqs[i].first_position + reqs[i].num_tokens;
    for (int k = 0; k * 16 < context; ++k) r.block_table.push_back(next_block++);
    r.sample = reqs[i].sample;
    plan.requests.push_back(r);
  }
  absl::StatusOr<Step> step = builder.build(plan, next_block);
  EXPECT_TRUE(step.ok()) << step.status();
  return *std::move(step);
}

TEST(CudaTrace, WorkAddsUpToTheModelFormulas) {
  const ModelConfig c = test_config();
  // A long prefill chunk on a cached prefix (KV splits of 64), a fresh prefill, decodes.
  const std::vector<Req> reqs = {{100, 37, true}, {0, 20, false}, {300, 1, true}, {5, 1, true}};
  const Step step = build_step(c, reqs, 64);
  ASSERT_GT(step.meta.num_split_rows, 0) << "the test wants KV splits";

  double tokens = 0, pairs = 0, samples = 0, merged_rows = 0;
  for (const Req& r : reqs) {
    tokens += r.num_tokens;
    samples += r.sample ? 1 : 0;
    for (int p = r.first_position; p < r.first_position + r.num_tokens; ++p) {
      pairs += p + 1;  // causal: position p attends to keys 0..p
      if (p + 1 > 64) merged_rows += 1;
    }
  }
  const double H = c.hidden_size, F = c.intermediate_size, hd = c.head_dim;
  const double layer_weights = H * (c.q_size() + 2 * c.kv_size()) + c.q_size() * H + 3 * H * F;
  double flops[static_cast<int>(Opcode::kNumOpcodes)] = {};
  for (const isa::Instruction& inst : step.ranks[0].instructions) {
    flops[static_cast<int>(inst.opcode())] += instruction_work(c, step.meta, inst).flops;
    EXPECT_GE(instruction_work(c, step.meta, inst).bytes, 0);
  }
  const auto f = [&](Opcode op) { return flops[static_cast<int>(op)]; };
  const double projections =
      f(Opcode::kQkvRope) + f(Opcode::kOProj) + f(Opcode::kGateUpSilu) + f(Opcode::kDownProj);
  EXPECT_DOUBLE_EQ(projections, 2.0 * tokens * layer_weights * c.num_layers);
  EXPECT_DOUBLE_EQ(f(Opcode::kAttention), 4.0 * c.num_layers * c.num_heads * hd * pairs);
  EXPECT_DOUBLE_EQ(f(Opcode::kLmHead), 2.0 * samples * c.vocab_size * H);
  EXPECT_GT(merged_rows, 0);
  EXPECT_GT(f(Opcode::kAttentionMerge), 0);

  // Bytes of a decode step's projections: every weight read once per row tile (one tile).
  const Step decode = build_step(c, {{40, 1, true}, {70, 1, true}}, 1024);
  double weight_bytes = 0;
  for (const isa::Instruction& inst : decode.ranks[0].instructions) {
    const Opcode op = inst.opcode();
    if (op == Opcode::kQkvRope || op == Opcode::kOProj || op == Opcode::kGateUpSilu ||
        op == Opcode::kDownProj) {
      weight_bytes += instruction_work(c, decode.meta, inst).bytes;
    }
  }
  // bf16 weights plus fp32 activations of 2 rows per tile: at least the weights, and the
  // activations are small next to them.
  const double weights = 2.0 * layer_weights * c.num_layers;
  EXPECT_GE(weight_bytes, weights);
  EXPECT_LT(weight_bytes, 1.2 * weights);
}

// Timings for every instruction of `step`: queue q's instructions back to back on SM 2q + 1,
// instruction k of the queue fetched at 1000 (q + 1) + 100 k ns, waiting 10 k ns, running
// 50 ns.
std::vector<InstructionTiming> fake_timings(const Step& step) {
  const RankSchedule& rs = step.ranks[0];
  std::vector<InstructionTiming> t(rs.instructions.size());
  for (int q = 0; q < rs.num_queues(); ++q) {
    for (int32_t i = rs.queue_begin[q]; i < rs.queue_begin[q + 1]; ++i) {
      const uint64_t k = i - rs.queue_begin[q];
      const uint64_t fetch = 1000 * (q + 1) + 100 * k;
      t[i] = {fetch, fetch + 10 * k, fetch + 10 * k + 50, static_cast<uint32_t>(2 * q + 1)};
    }
  }
  return t;
}

TEST(CudaTrace, SummaryAddsUpTheTimings) {
  const ModelConfig c = test_config();
  const Step step = build_step(c, {{30, 1, true}, {0, 9, true}}, 1024);
  const RankSchedule& rs = step.ranks[0];
  const std::vector<InstructionTiming> t = fake_timings(step);
  const TraceSummary s = summarize_trace(c, step, t);
  EXPECT_EQ(s.num_ctas, rs.num_queues());
  int count = 0;
  double busy = 0, wait = 0, want_wait = 0;
  uint64_t first = ~uint64_t{0}, last = 0;
  for (size_t i = 0; i < t.size(); ++i) {
    want_wait += (t[i].start_ns - t[i].fetch_ns) * 1e-3;
    first = std::min(first, t[i].fetch_ns);
    last = std::max(last, t[i].end_ns);
  }
  double flops = 0;
  for (const OpSummary& o : s.ops) {
    count += o.count;
    busy += o.busy_us;
    wait += o.wait_us;
    flops += o.flops;
    if (o.op == Opcode::kAttention) {
      // 50 ns each: the achieved rate is its work over its busy time.
      EXPECT_NEAR(o.tflops_per_s(), o.flops / (o.count * 50e-9) * 1e-12, 1e-9);
    }
  }
  EXPECT_EQ(count, static_cast<int>(rs.instructions.size()));
  EXPECT_NEAR(busy, 0.05 * count, 1e-9);
  EXPECT_NEAR(wait, want_wait, 1e-9);
  EXPECT_DOUBLE_EQ(flops, s.flops);
  EXPECT_NEAR(s.span_us, (last - first) * 1e-3, 1e-9);
  const std::string table = format_trace_summary(s);
  EXPECT_NE(table.find("kAttention"), std::string::npos) << table;
  EXPECT_NE(table.find("kLmHead"), std::string::npos) << table;
}

TEST(CudaTrace, ChromeTraceIsOneEventPerInstructionOnItsSm) {
  const ModelConfig c = test_config();
  const Step step = build_step(c, {{30, 1, true}, {0, 9, true}}, 1024);
  const RankSchedule& rs = step.ranks[0];
  const std::vector<InstructionTiming> t = fake_timings(step);
  const nlohmann::json j = nlohmann::json::parse(chrome_trace_json(step_timeline(step, t)));
  ASSERT_TRUE(j.contains("traceEvents"));
  int ops = 0, waits = 0, names = 0;
  for (const auto& e : j["traceEvents"]) {
    const std::string ph = e["ph"];
    if (ph == "M") {
      ++names;
      continue;
    }
    ASSERT_EQ(ph, "X");
    const double ts = e["ts"], dur = e["dur"];
    EXPECT_GE(ts, 0);
    EXPECT_GE(dur, 0);
    if (e["cat"] == "wait") {
      ++waits;
      continue;
    }
    const int i = e["args"]["index"];
    ASSERT_GE(i, 0);
    ASSERT_LT(i, static_cast<int>(rs.instructions.size()));
    EXPECT_EQ(e["name"], isa::opcode_name(rs.instructions[i].opcode()));
    EXPECT_EQ(e["tid"], t[i].sm);
    EXPECT_EQ(e["args"]["layer"], rs.instructions[i].layer());
    const int q = e["args"]["queue"];
    EXPECT_GE(i, rs.queue_begin[q]);
    EXPECT_LT(i, rs.queue_begin[q + 1]);
    // Microseconds from the step's first fetch (1000 ns, queue 0's first instruction).
    EXPECT_NEAR(ts, (t[i].start_ns - 1000) * 1e-3, 1e-6);
    EXPECT_NEAR(dur, 0.05, 1e-6);
    ++ops;
  }
  EXPECT_EQ(ops, static_cast<int>(rs.instructions.size()));
  // Instruction k > 0 of each queue waited 10 k ns; the first of each did not.
  EXPECT_EQ(waits, static_cast<int>(rs.instructions.size()) - rs.num_queues());
  EXPECT_EQ(names, rs.num_queues());

  // Layers past max_layer are left out; ops outside the layers stay.
  int want = 0;
  for (const isa::Instruction& inst : rs.instructions) want += inst.layer() <= 0 ? 1 : 0;
  ASSERT_LT(want, static_cast<int>(rs.instructions.size()));
  const nlohmann::json cut =
      nlohmann::json::parse(chrome_trace_json(step_timeline(step, t), {.max_layer = 0}));
  int kept = 0;
  for (const auto& e : cut["traceEvents"]) {
    if (e["ph"] == "X" && e["cat"] == "op") {
      EXPECT_LE(e["args"]["layer"].get<int>(), 0);
      ++kept;
    }
  }
  EXPECT_EQ(kept, want);
}

}  // namespace
}  // namespace megaserve::engine
