// Tile shapes the builder picks with the GPU's TileConfig.
// KV splits with kv_split_narrow_only: a request is split only when its own (query tile, kv
// head) attention items are fewer than the SMs, so a long prefill chunk runs unsplit (no
// merge instructions) while a decode or a short chunk of a long context is split as before.
// The choice depends on the request alone. The CPU interpreter gives the same logprobs, to
// fp32 rounding, whichever way the requests were split, and the verifier proves every step.
// QKV tiles are never wider than qkv_heads, whatever the step (a q/k-norm model's heads wait
// in shared memory beside the projection core); they are token_rows tall without q/k norm
// (RoPE pairs straight from the projection) and qkv_rows tall with it. Attention tiles are
// costed by the keys they load, once per tile: a mixed step's decode tiles spread evenly.
#include <algorithm>
#include <cmath>
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "engine/model/weights.h"
#include "engine/planner/schedule_builder.h"
#include "engine/planner/schedule_verifier.h"
#include "engine/step_runner.h"
#include "gtest/gtest.h"

namespace megaserve::engine {
namespace {

ModelConfig small_llama() {
  ModelConfig c;
  c.hidden_size = 64;
  c.intermediate_size = 128;
  c.num_layers = 2;
  c.num_heads = 8;
  c.num_kv_heads = 4;
  c.head_dim = 8;
  c.vocab_size = 256;
  c.max_position_embeddings = 4096;
  return c;
}

TileConfig tiles(bool narrow_only) {
  TileConfig t = gpu_tile_config(132);
  t.kv_split_tokens = 256;
  t.kv_split_narrow_only = narrow_only;
  return t;
}

// Appends a greedy request prefilling or decoding `tokens` tokens from `first_position`, its KV
// blocks the next ones from `block` on.
void add_request(scheduler::StepPlan& p, int& block, int first_position, int tokens) {
  scheduler::StepRequest& r = p.requests.emplace_back();
  r.request_id = p.requests.size();
  r.first_position = first_position;
  for (int i = 0; i < tokens; ++i) r.token_ids.push_back((i * 7 + 3) % 256);
  for (int b = 0; b < (first_position + tokens + 15) / 16; ++b) r.block_table.push_back(block++);
  r.sample = true;
  r.sampling.temperature = 0.0f;
}

// Request 0 prefills 1024 tokens at positions [512, 1536) (32 query tiles x 4 kv heads = 128
// items, fewer than 132 SMs) or `chunk` tokens; request 1 decodes at position 1000;
// request 2 prefills a 17-token chunk at position 600 (1 tile x 4 kv heads).
scheduler::StepPlan plan(int chunk) {
  scheduler::StepPlan p;
  p.kv_block_size = 16;
  int block = 0;
  add_request(p, block, 512, chunk);
  add_request(p, block, 1000, 1);
  add_request(p, block, 600, 17);
  for (scheduler::StepRequest& r : p.requests) r.sampling.logprobs = 5;
  return p;
}

int merges(const Step& step) {
  int n = 0;
  for (const isa::Instruction& inst : step.ranks[0].instructions) {
    n += inst.opcode() == isa::Opcode::kAttentionMerge;
  }
  return n;
}

TEST(TileShapeTest, OnlyRequestsTooNarrowToFillTheSmsAreSplit) {
  const ModelConfig c = small_llama();
  for (const int chunk : {1024, 1088}) {  // 128 items (split), 136 items (unsplit)
    ScheduleBuilder builder(c, tiles(true), 1, {.record_accesses = true});
    absl::StatusOr<Step> step = builder.build(plan(chunk), 4096);
    ASSERT_TRUE(step.ok()) << step.status();
    EXPECT_TRUE(verify_step(*step).ok());
    const std::vector<int32_t>& splits = step->meta.num_splits;
    EXPECT_EQ(splits[0], chunk == 1024 ? (512 + chunk + 255) / 256 : 0) << chunk;
    EXPECT_EQ(splits[1], 4);  // 1001 keys
    EXPECT_EQ(splits[2], 3);  // 617 keys
    EXPECT_GT(merges(*step), 0);
  }
  // Without the rule every request past 256 keys is split.
  ScheduleBuilder builder(c, tiles(false), 1, {.record_accesses = true});
  absl::StatusOr<Step> step = builder.build(plan(1088), 4096);
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(step->meta.num_splits[0], 7);
}

TEST(TileShapeTest, AWideChunkAloneRunsNoMerge) {
  const ModelConfig c = small_llama();
  scheduler::StepPlan p = plan(2048);
  p.requests.resize(1);
  ScheduleBuilder builder(c, tiles(true), 1, {.record_accesses = true});
  absl::StatusOr<Step> step = builder.build(p, 4096);
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_TRUE(verify_step(*step).ok());
  EXPECT_EQ(merges(*step), 0);
}

// Logprobs of the plan's three requests on the CPU interpreter (verified steps).
std::vector<float> logprobs(bool narrow_only, int chunk) {
  const ModelConfig c = small_llama();
  CpuBackendOptions o;
  o.num_sms = 132;
  o.default_tiles = false;
  o.tiles = tiles(narrow_only);
  o.num_kv_blocks = 256;
  o.verify = true;
  auto backend = CpuBackend::create(c, dummy_weights(c, DType::kF32, 9), o);
  EXPECT_TRUE(backend.ok()) << backend.status();
  std::vector<float> out;
  if (!backend.ok()) return out;
  StepRunner runner(c, **backend);
  auto result = runner.execute(plan(chunk));
  EXPECT_TRUE(result.ok()) << result.status();
  if (!result.ok()) return out;
  for (const auto& s : result->sampled) {
    out.push_back(s.logprob);
    for (const auto& [id, lp] : s.top_logprobs) out.push_back(lp);
  }
  return out;
}

TEST(TileShapeTest, SplitOrNotTheCpuInterpreterAgrees) {
  const std::vector<float> split = logprobs(false, 1088), unsplit = logprobs(true, 1088);
  ASSERT_EQ(split.size(), unsplit.size());
  ASSERT_FALSE(split.empty());
  for (size_t i = 0; i < split.size(); ++i) {
    EXPECT_NEAR(split[i], unsplit[i], 1e-4 * (1 + std::abs(split[i]))) << i;
  }
}

// 2,141 tokens of 12 fused heads of 128: 34 row tiles of 64 rows, fewer than two per SM at
// qkv_heads 2, which balance_columns widened to 4 heads (512 columns) before.
TEST(TileShapeTest, QkvTilesAreNeverWiderThanQkvHeads) {
  ModelConfig c = small_llama();
  c.hidden_size = 256;
  c.num_heads = 8;
  c.num_kv_heads = 2;
  c.head_dim = 128;
  const TileConfig t = tiles(true);
  for (const int tokens : {1, 64, 600, 2141, 4000}) {
    scheduler::StepPlan p;
    p.kv_block_size = 16;
    scheduler::StepRequest r;
    r.request_id = 1;
    r.token_ids.assign(tokens, 7);
    for (int b = 0; b < (tokens + 15) / 16; ++b) r.block_table.push_back(b);
    p.requests.push_back(r);
    ScheduleBuilder builder(c, t, 1, {});
    absl::StatusOr<Step> step = builder.build(p, 4096);
    ASSERT_TRUE(step.ok()) << step.status();
    int qkv = 0;
    for (const isa::Instruction& inst : step->ranks[0].instructions) {
      if (inst.opcode() != isa::Opcode::kQkvRope) continue;
      const auto a = isa::args_of<isa::QkvRopeArgs>(inst);
      EXPECT_LE(a.head_end - a.head_begin, t.qkv_heads) << tokens << " tokens";
      ++qkv;
    }
    EXPECT_GT(qkv, 0);
  }
}

// The rows of a 600-token step's QKV tiles: 128 (token_rows) for Llama, 64 (qkv_rows) for a
// model with q/k norm, whose heads are staged 64 rows at a time.
TEST(TileShapeTest, QkvTilesAreTokenRowsTallUnlessTheModelHasQkNorm) {
  const TileConfig t = tiles(true);
  ASSERT_NE(t.token_rows, t.qkv_rows);
  for (const bool qk_norm : {false, true}) {
    ModelConfig c = small_llama();
    c.hidden_size = 256;
    c.num_kv_heads = 2;
    c.head_dim = 128;
    c.qk_norm = qk_norm;
    scheduler::StepPlan p;
    p.kv_block_size = 16;
    scheduler::StepRequest r;
    r.request_id = 1;
    r.token_ids.assign(600, 7);
    for (int b = 0; b < (600 + 15) / 16; ++b) r.block_table.push_back(b);
    p.requests.push_back(r);
    ScheduleBuilder builder(c, t, 1, {});
    absl::StatusOr<Step> step = builder.build(p, 4096);
    ASSERT_TRUE(step.ok()) << step.status();
    const int want = qk_norm ? t.qkv_rows : t.token_rows;
    int tallest = 0;
    for (const isa::Instruction& inst : step->ranks[0].instructions) {
      if (inst.opcode() != isa::Opcode::kQkvRope) continue;
      const auto a = isa::args_of<isa::QkvRopeArgs>(inst);
      EXPECT_EQ(a.row_begin % want, 0) << "qk_norm " << qk_norm;
      EXPECT_LE(a.row_end - a.row_begin, want) << "qk_norm " << qk_norm;
      tallest = std::max(tallest, a.row_end - a.row_begin);
    }
    EXPECT_EQ(tallest, want) << "qk_norm " << qk_norm;
  }
}

// The step a loaded server admits a request in: 255 decodes at position 512 (32 tiles of 8
// requests per kv head) beside a 256-token prompt (8 tiles of 32 query rows per kv head), on
// an 8B-like attention shape. A decode tile streams 8 requests' 513 keys and took ~4.6x as
// long as a prompt tile on an H100; costed per query row, the prompt tiles weighed twice as
// much, went first, and 68 SMs ended with 3 decode tiles. Costed by the keys each tile
// loads, no SM gets more than the 2 that 256 tiles on 132 SMs need; with each tile's fixed
// cycles (attention_tile_cycles), the 8 SMs left with one decode tile take 3-4 prompt tiles
// each, not all 64 (8 each: 139 + 8 x ~30 us, the stage's slowest SM on an H100).
TEST(TileShapeTest, DecodeTilesOfAMixedStepSpreadAsEvenlyAsTheirCount) {
  ModelConfig c = small_llama();
  c.hidden_size = 4096;
  c.intermediate_size = 512;
  c.num_layers = 1;
  c.num_heads = 32;
  c.num_kv_heads = 8;
  c.head_dim = 128;
  scheduler::StepPlan p;
  p.kv_block_size = 16;
  int block = 0;
  for (int i = 0; i < 255; ++i) add_request(p, block, 512, 1);
  add_request(p, block, 0, 256);
  ScheduleBuilder builder(c, gpu_tile_config(132), 1, {});
  absl::StatusOr<Step> step = builder.build(p, block);
  ASSERT_TRUE(step.ok()) << step.status();
  const RankSchedule& rank = step->ranks[0];
  int most = 0, most_prompt = 0, decode_tiles = 0, prompt_tiles = 0;
  for (int q = 0; q < rank.num_queues(); ++q) {
    int here = 0, prompt_here = 0;
    for (int i = rank.queue_begin[q]; i < rank.queue_begin[q + 1]; ++i) {
      const isa::Instruction& inst = rank.instructions[i];
      if (inst.opcode() != isa::Opcode::kAttention) continue;
      const auto a = isa::args_of<isa::AttentionArgs>(inst);
      const bool decode = a.request_end - a.request_begin > 1;
      here += decode;
      prompt_here += !decode;
      decode_tiles += decode;
      prompt_tiles += !decode;
    }
    most = std::max(most, here);
    most_prompt = std::max(most_prompt, prompt_here);
  }
  EXPECT_EQ(decode_tiles, 32 * 8);
  EXPECT_EQ(prompt_tiles, 8 * 8);
  EXPECT_EQ(most, 2);
  EXPECT_LE(most_prompt, 4);
}

}  // namespace
}  // namespace megaserve::engine
