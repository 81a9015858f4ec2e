// The CPU interpreter's bf16-rounding mode (ExecutionOptions::round_activations_bf16), the
// GPU's tight reference. Op level: kOProj, kDownProj, kGateUpSilu, kQkvRope (v heads) and
// kLmHead tiles against references written here (inputs rounded with engine/isa/bf16.h,
// double dot products), with awkward sizes, strided TP column slices and poisoned cells
// outside the tile; the fp32 mode must miss those references, so a mode that does not round
// fails. Step level: one step of small random models, TP 1 and 2, whose logits move with the
// mode but stay within 3e-2 of the fp32 logits relative to the row max (DESIGN.md §5).
#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "engine/cpu/cpu_ops.h"
#include "engine/isa/bf16.h"
#include "engine/isa/isa.h"
#include "engine/model/weights.h"
#include "engine/planner/schedule_shard.h"
#include "engine/step_runner.h"
#include "gtest/gtest.h"
#include "tests/support/safetensors_writer.h"

namespace megaserve::engine {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

float round_bf16(float x) { return bf16_to_float(float_to_bf16(x)); }

// Element i of a weight tensor as a float.
float weight_at(const Tensor& t, int64_t i) {
  switch (t.dtype) {
    case DType::kF32:
      return t.data<float>()[i];
    case DType::kBF16:
      return bf16_to_float(t.data<uint16_t>()[i]);
    case DType::kF16:
      return f16_to_float(t.data<uint16_t>()[i]);
  }
  return kNaN;
}

// ||got - want|| / ||want||.
double relative_error(const std::vector<double>& got, const std::vector<double>& want) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    diff += (got[i] - want[i]) * (got[i] - want[i]);
    norm += want[i] * want[i];
  }
  return std::sqrt(diff / norm);
}

// ---- Op level.

// bf16(bf16(x[k] * inv_rms) * norm[k]) for k < n: transformers' bf16 RMSNorm (x times the
// fp32 inverse RMS rounded to bf16, then times the weight, rounded again).
std::vector<float> rounded_norm(const float* x, int n, const Tensor& norm, float eps) {
  float ss = 0.0f;
  for (int k = 0; k < n; ++k) ss += x[k] * x[k];
  const float inv_rms = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  std::vector<float> out(n);
  for (int k = 0; k < n; ++k) out[k] = round_bf16(round_bf16(x[k] * inv_rms) * weight_at(norm, k));
  return out;
}

// sum_k W[row, k] * x[k] in double, W [rows, n] row-major.
double dot(const Tensor& w, int64_t row, const std::vector<float>& x) {
  double y = 0;
  const int64_t n = static_cast<int64_t>(x.size());
  for (int64_t k = 0; k < n; ++k) y += static_cast<double>(weight_at(w, row * n + k)) * x[k];
  return y;
}

// Hidden 34 and intermediate 50 leave tails after dot4's groups of four; TP 2 makes O and
// down strided column slices (rank 1's) and gives 25 FFN columns per rank.
ModelConfig op_test_config() {
  ModelConfig c = megaserve::testing::tiny_model_config(ModelFamily::kLlama);
  c.hidden_size = 34;
  c.intermediate_size = 50;
  return c;
}

struct OpCase {
  const char* name;
  int tp, rank;
  int partial_slot;  // kOProj / kDownProj's output: -1 adds into the residual
};

void PrintTo(const OpCase& c, std::ostream* os) { *os << c.name; }

// One rank's state, filled with random activations, and the context the ops see.
class Bf16OpTest : public ::testing::TestWithParam<OpCase> {
 protected:
  static constexpr int kTokens = 5;
  static constexpr int kLayer = 1;

  void SetUp() override {
    const OpCase& oc = GetParam();
    config_ = op_test_config();
    const auto dir = megaserve::testing::make_test_dir("model");
    megaserve::testing::write_random_model(dir, config_, 7, {.dtype = "BF16"});
    auto weights = load_weights(dir, config_, DType::kBF16);
    ASSERT_TRUE(weights.ok()) << weights.status();
    weights_ = *std::move(weights);

    ranks_.resize(oc.tp);
    cpu::RankState& st = ranks_[oc.rank];
    st.shard = shard_of(config_, oc.tp, oc.rank);
    st.weights = cpu::rank_weights(weights_, config_, st.shard);
    const int H = config_.hidden_size, hd = config_.head_dim;
    std::mt19937 gen(123);
    std::uniform_real_distribution<float> u(-1.5f, 1.5f);
    const auto random = [&](int64_t n) {
      std::vector<float> v(n);
      for (float& x : v) x = u(gen);
      return v;
    };
    st.ws.residual = random(kTokens * H);
    st.ws.attn_out = random(kTokens * st.shard.q_heads * hd);
    st.ws.act = random(kTokens * st.shard.ffn_cols());
    st.ws.partial.assign(kNumPartialSlots * kTokens * H, kNaN);

    meta_.num_tokens = kTokens;
    ctx_.config = &config_;
    ctx_.meta = &meta_;
    ctx_.ranks = &ranks_;
  }

  cpu::RankState& state() { return ranks_[GetParam().rank]; }

  // Runs `inst` on a copy of the rank's state with the mode on or off; returns that copy.
  cpu::RankState run(const isa::Instruction& inst, bool round) {
    std::vector<cpu::RankState> ranks = ranks_;
    cpu::OpContext ctx = ctx_;
    ctx.ranks = &ranks;
    ctx.round_activations_bf16 = round;
    cpu::execute(inst, GetParam().rank, ctx);
    return ranks[GetParam().rank];
  }

  ModelConfig config_;
  ModelWeights weights_;
  std::vector<cpu::RankState> ranks_;
  StepMetadata meta_;
  cpu::OpContext ctx_;
};

isa::Instruction instruction(isa::Opcode op, int layer) {
  isa::Instruction inst{};
  inst.words[isa::kWordOpcode] = static_cast<int32_t>(op);
  inst.words[isa::kWordLayer] = layer;
  return inst;
}

// kOProj and kDownProj: out[t, c] = sum_k W[c, in0 + k] * bf16(in[t, k]) for the tile rows
// [1, 4) and hidden columns [3, 31); in0 is the rank's first input column of the full W.
TEST_P(Bf16OpTest, HiddenProjectionRoundsItsInputRow) {
  const OpCase& oc = GetParam();
  const int H = config_.hidden_size, T = kTokens;
  const int row_begin = 1, row_end = 4, col_begin = 3, col_end = 31;
  for (const isa::Opcode op : {isa::Opcode::kOProj, isa::Opcode::kDownProj}) {
    SCOPED_TRACE(isa::opcode_name(op));
    const bool o_proj = op == isa::Opcode::kOProj;
    const cpu::RankState& st = state();
    const Tensor& w = o_proj ? weights_.layers[kLayer].wo : weights_.layers[kLayer].w_down;
    const int64_t full_in = w.shape[1];
    const int in0 = o_proj ? st.shard.q_heads_begin() * config_.head_dim : st.shard.ffn_begin;
    const int in = o_proj ? st.shard.q_heads * config_.head_dim : st.shard.ffn_cols();
    const std::vector<float>& input = o_proj ? st.ws.attn_out : st.ws.act;  // [T, in]

    isa::Instruction inst = instruction(op, kLayer);
    isa::set_args(
        inst, isa::HiddenTileArgs{row_begin, row_end, col_begin, col_end, oc.partial_slot, 0, {}});
    const cpu::RankState rounded = run(inst, true), plain = run(inst, false);

    // The tile's outputs (residual increments or partial sums), and the reference.
    const auto outputs = [&](const cpu::RankState& s) {
      std::vector<double> out;
      for (int t = row_begin; t < row_end; ++t) {
        for (int c = col_begin; c < col_end; ++c) {
          if (oc.partial_slot < 0) {
            out.push_back(static_cast<double>(s.ws.residual[t * H + c]) -
                          st.ws.residual[t * H + c]);
          } else {
            out.push_back(s.ws.partial[(oc.partial_slot * T + t) * H + c]);
          }
        }
      }
      return out;
    };
    std::vector<double> want;
    for (int t = row_begin; t < row_end; ++t) {
      for (int c = col_begin; c < col_end; ++c) {
        double y = 0;
        for (int k = 0; k < in; ++k) {
          y += static_cast<double>(weight_at(w, c * full_in + in0 + k)) *
               round_bf16(input[t * in + k]);
        }
        want.push_back(y);
      }
    }
    EXPECT_LT(relative_error(outputs(rounded), want), 1e-6);
    // Without rounding the inputs, the same tile misses the reference by ~2^-9 (bf16's
    // relative step), far beyond fp32's error.
    EXPECT_GT(relative_error(outputs(plain), want), 1e-4);

    // Nothing outside the tile is written: the other rows and columns of the residual, and
    // the other partial slots (NaN) or every partial slot (residual add).
    for (int t = 0; t < T; ++t) {
      for (int c = 0; c < H; ++c) {
        const bool in_tile = t >= row_begin && t < row_end && c >= col_begin && c < col_end;
        if (!in_tile || oc.partial_slot >= 0) {
          ASSERT_EQ(rounded.ws.residual[t * H + c], st.ws.residual[t * H + c]) << t << "," << c;
        }
        for (int slot = 0; slot < kNumPartialSlots; ++slot) {
          if (slot == oc.partial_slot && in_tile) continue;
          ASSERT_TRUE(std::isnan(rounded.ws.partial[(slot * T + t) * H + c]))
              << "slot " << slot << " " << t << "," << c;
        }
      }
    }
  }
}

// kGateUpSilu: n = rounded_norm(x, ffn_norm); act[t, c] = SiLU(gate[c] . n) * (up[c] . n) for
// rows [0, 3) and the rank's local FFN columns [2, ffn_cols - 1).
TEST_P(Bf16OpTest, GateUpSiluRoundsTheNormalizedRow) {
  const int H = config_.hidden_size;
  const cpu::RankState& st = state();
  const int F = st.shard.ffn_cols();
  const int row_begin = 0, row_end = 3, col_begin = 2, col_end = F - 1;
  const LayerWeights& lw = weights_.layers[kLayer];
  state().ws.act.assign(kTokens * F, kNaN);

  isa::Instruction inst = instruction(isa::Opcode::kGateUpSilu, kLayer);
  isa::set_args(inst, isa::GateUpArgs{row_begin, row_end, col_begin, col_end, {}});
  const cpu::RankState rounded = run(inst, true), plain = run(inst, false);

  std::vector<double> want, got_rounded, got_plain;
  for (int t = row_begin; t < row_end; ++t) {
    const std::vector<float> n =
        rounded_norm(st.ws.residual.data() + t * H, H, lw.ffn_norm, config_.rms_norm_eps);
    for (int c = col_begin; c < col_end; ++c) {
      const double g = dot(lw.w_gate, st.shard.ffn_begin + c, n);
      const double u = dot(lw.w_up, st.shard.ffn_begin + c, n);
      want.push_back(g / (1 + std::exp(-g)) * u);
      got_rounded.push_back(rounded.ws.act[t * F + c]);
      got_plain.push_back(plain.ws.act[t * F + c]);
    }
  }
  EXPECT_LT(relative_error(got_rounded, want), 1e-6);
  EXPECT_GT(relative_error(got_plain, want), 1e-4);
  for (int t = 0; t < kTokens; ++t) {
    for (int c = 0; c < F; ++c) {
      if (t >= row_begin && t < row_end && c >= col_begin && c < col_end) continue;
      ASSERT_TRUE(std::isnan(rounded.ws.act[t * F + c])) << t << "," << c;
    }
  }
}

// kQkvRope on the rank's v heads only (no bias, norm or RoPE in a Llama v head): element d
// of token t's cache slot for local head h is wv[(kv_heads_begin + h) * hd + d] . n, n the
// rounded normalized row, stored rounded to bf16 (the GPU's cache is bf16), for token rows
// [1, 5). The k cache and the q buffer stay untouched.
TEST_P(Bf16OpTest, QkvRopeRoundsTheNormalizedRow) {
  const int H = config_.hidden_size, hd = config_.head_dim, T = kTokens;
  cpu::RankState& st = state();
  const int hq = st.shard.q_heads, hkv = st.shard.kv_heads;
  const LayerWeights& lw = weights_.layers[kLayer];
  // One request of T tokens at positions 0.. in KV block 1 of 2 (8 slots each).
  meta_.kv_block_size = 8;
  meta_.positions.clear();
  for (int t = 0; t < T; ++t) meta_.positions.push_back(t);
  meta_.token_request.assign(T, 0);
  meta_.block_indptr = {0, 1};
  meta_.block_indices = {1};
  st.kv_layout = {2, hkv, 8, hd};
  st.k_cache.assign(config_.num_layers,
                    std::vector<float>(st.kv_layout.elements_per_layer(), kNaN));
  st.v_cache = st.k_cache;
  st.ws.q.assign(T * hq * hd, kNaN);
  const int row_begin = 1, row_end = 5;

  isa::Instruction inst = instruction(isa::Opcode::kQkvRope, kLayer);
  isa::set_args(inst, isa::QkvRopeArgs{row_begin, row_end, hq + hkv, hq + 2 * hkv, {}});
  const cpu::RankState rounded = run(inst, true), plain = run(inst, false);

  std::vector<double> want, got_rounded, got_plain;
  for (int t = row_begin; t < row_end; ++t) {
    const std::vector<float> n =
        rounded_norm(st.ws.residual.data() + t * H, H, lw.attn_norm, config_.rms_norm_eps);
    for (int h = 0; h < hkv; ++h) {
      const int64_t slot = st.kv_layout.offset(1, h, t);
      for (int d = 0; d < hd; ++d) {
        const double v = dot(lw.wv, (st.shard.kv_heads_begin() + h) * hd + d, n);
        want.push_back(round_bf16(static_cast<float>(v)));
        got_rounded.push_back(rounded.v_cache[kLayer][slot + d]);
        got_plain.push_back(plain.v_cache[kLayer][slot + d]);
        // The cache itself holds bf16 values in this mode, the nearest to the value (within
        // half a bf16 step of 2^-8 relative, plus the fp32 dot's own error).
        const float stored = rounded.v_cache[kLayer][slot + d];
        EXPECT_EQ(stored, round_bf16(stored)) << t << "," << h << "," << d;
        EXPECT_LE(std::abs(stored - v), std::abs(v) * (std::ldexp(1.0, -8) + 1e-6) + 1e-30);
      }
    }
  }
  // The reference rounded as the cache rounds: equal but for a rare tie decided differently
  // by the fp32 and the double dot; the fp32 mode (unrounded inputs and cache) far from it.
  EXPECT_LT(relative_error(got_rounded, want), 1e-4);
  EXPECT_GT(relative_error(got_plain, want), 1e-4);
  const auto written = [&](int64_t i) {
    for (int t = row_begin; t < row_end; ++t) {
      for (int h = 0; h < hkv; ++h) {
        const int64_t slot = st.kv_layout.offset(1, h, t);
        if (i >= slot && i < slot + hd) return true;
      }
    }
    return false;
  };
  for (int64_t i = 0; i < st.kv_layout.elements_per_layer(); ++i) {
    ASSERT_TRUE(std::isnan(rounded.k_cache[kLayer][i])) << i;
    if (!written(i)) {
      ASSERT_TRUE(std::isnan(rounded.v_cache[kLayer][i])) << i;
    }
  }
  for (float q : rounded.ws.q) ASSERT_TRUE(std::isnan(q));
}

// kLmHead: logits[s, c] = lm_head[vocab_begin + c] . n, n the rounded final-normalized row of
// sampling row s, for samples [1, 3) and local vocabulary columns [1, vocab_cols - 2).
TEST_P(Bf16OpTest, LmHeadRoundsTheNormalizedRow) {
  const int H = config_.hidden_size;
  cpu::RankState& st = state();
  const int V = st.shard.vocab_cols();
  meta_.sample_rows = {3, 0, 4};
  st.ws.logits.assign(3 * V, kNaN);
  const int sample_begin = 1, sample_end = 3, col_begin = 1, col_end = V - 2;

  isa::Instruction inst = instruction(isa::Opcode::kLmHead, -1);
  isa::set_args(inst, isa::LmHeadArgs{sample_begin, sample_end, col_begin, col_end, {}});
  const cpu::RankState rounded = run(inst, true), plain = run(inst, false);

  std::vector<double> want, got_rounded, got_plain;
  for (int s = sample_begin; s < sample_end; ++s) {
    const std::vector<float> n = rounded_norm(st.ws.residual.data() + meta_.sample_rows[s] * H, H,
                                              weights_.final_norm, config_.rms_norm_eps);
    for (int c = col_begin; c < col_end; ++c) {
      want.push_back(dot(weights_.lm_head, st.shard.vocab_begin + c, n));
      got_rounded.push_back(rounded.ws.logits[s * V + c]);
      got_plain.push_back(plain.ws.logits[s * V + c]);
    }
  }
  EXPECT_LT(relative_error(got_rounded, want), 1e-6);
  EXPECT_GT(relative_error(got_plain, want), 1e-4);
  for (int s = 0; s < 3; ++s) {
    for (int c = 0; c < V; ++c) {
      if (s >= sample_begin && s < sample_end && c >= col_begin && c < col_end) continue;
      ASSERT_TRUE(std::isnan(rounded.ws.logits[s * V + c])) << s << "," << c;
    }
  }
}

const OpCase kOpCases[] = {
    {"tp1", 1, 0, -1},
    {"tp2_rank0", 2, 0, 0},
    {"tp2_rank1", 2, 1, 1},
};

INSTANTIATE_TEST_SUITE_P(Shards, Bf16OpTest, ::testing::ValuesIn(kOpCases),
                         [](const auto& info) { return std::string(info.param.name); });

// ---- Step level.

struct StepCase {
  const char* name;
  ModelFamily family;
  const char* dtype;  // on disk; loaded as kF32 or kBF16 accordingly
};

void PrintTo(const StepCase& c, std::ostream* os) { *os << c.name; }

class Bf16StepTest : public ::testing::TestWithParam<std::tuple<StepCase, int>> {};

TEST_P(Bf16StepTest, LogitsMoveButStayNearFp32) {
  const auto& [sc, tp] = GetParam();
  const ModelConfig config = megaserve::testing::tiny_model_config(sc.family);
  const auto dir = megaserve::testing::make_test_dir("model");
  megaserve::testing::write_random_model(dir, config, 11 + tp, {.dtype = sc.dtype});
  auto weights =
      load_weights(dir, config, std::string(sc.dtype) == "BF16" ? DType::kBF16 : DType::kF32);
  ASSERT_TRUE(weights.ok()) << weights.status();

  // One step: three prompts (19, 6 and 1 tokens; the first spans three 8-token blocks), each
  // sampled at its last token.
  scheduler::StepPlan plan;
  plan.step_id = 0;
  plan.kv_block_size = 8;
  const int lengths[] = {19, 6, 1};
  int32_t next_block = 0;
  for (int i = 0; i < 3; ++i) {
    scheduler::StepRequest r;
    r.request_id = 10 + i;
    for (int t = 0; t < lengths[i]; ++t) {
      r.token_ids.push_back((t * 29 + 7 * i + 3) % config.vocab_size);
    }
    r.first_position = 0;
    for (int b = 0; b * 8 < lengths[i]; ++b) r.block_table.push_back(next_block++);
    r.sample = true;
    r.sampling.temperature = 0.0f;
    plan.requests.push_back(r);
  }

  // Logits [sample][vocab] of the step with the mode off or on.
  const auto run = [&](bool round) -> std::vector<std::vector<float>> {
    CpuBackendOptions options;
    options.tensor_parallel = tp;
    options.num_sms = 3;
    options.num_kv_blocks = 8;
    options.kv_block_size = 8;
    options.execution.mode = ExecutionMode::kShuffled;
    options.execution.poison_workspace = true;
    options.execution.round_activations_bf16 = round;
    options.verify = true;
    auto backend = CpuBackend::create(config, *weights, options);
    EXPECT_TRUE(backend.ok()) << backend.status();
    if (!backend.ok()) return {};
    StepRunner runner(config, **backend);
    auto out = runner.execute(plan);
    EXPECT_TRUE(out.ok()) << out.status();
    if (!out.ok()) return {};
    std::vector<std::vector<float>> logits;
    for (size_t s = 0; s < out->sampled.size(); ++s) {
      logits.push_back((*backend)->interpreter().logits(static_cast<int>(s)));
    }
    return logits;
  };
  const std::vector<std::vector<float>> fp32 = run(false), bf16 = run(true);
  ASSERT_EQ(fp32.size(), 3u);
  ASSERT_EQ(bf16.size(), 3u);
  for (int s = 0; s < 3; ++s) {
    ASSERT_EQ(bf16[s].size(), static_cast<size_t>(config.vocab_size));
    double row_max = 0, max_diff = 0;
    for (int v = 0; v < config.vocab_size; ++v) {
      ASSERT_TRUE(std::isfinite(bf16[s][v])) << "sample " << s << " id " << v;
      row_max = std::max(row_max, std::abs(static_cast<double>(fp32[s][v])));
      max_diff = std::max(max_diff, std::abs(static_cast<double>(bf16[s][v]) - fp32[s][v]));
    }
    // bf16 inputs move these logits by 2e-3 to 9e-3 of the row max: well above fp32 noise,
    // well below the accuracy standard's 3e-2.
    EXPECT_GT(max_diff, 1e-4 * row_max) << "sample " << s;
    EXPECT_LE(max_diff, 3e-2 * row_max) << "sample " << s;
  }
}

const StepCase kStepCases[] = {
    {"llama_f32", ModelFamily::kLlama, "F32"}, {"llama_bf16", ModelFamily::kLlama, "BF16"},
    {"qwen2_f32", ModelFamily::kQwen2, "F32"}, {"qwen2_bf16", ModelFamily::kQwen2, "BF16"},
    {"qwen3_f32", ModelFamily::kQwen3, "F32"}, {"qwen3_bf16", ModelFamily::kQwen3, "BF16"},
};

INSTANTIATE_TEST_SUITE_P(Models, Bf16StepTest,
                         ::testing::Combine(::testing::ValuesIn(kStepCases),
                                            ::testing::Values(1, 2)),
                         [](const auto& info) {
                           return std::string(std::get<0>(info.param).name) + "_tp" +
                                  std::to_string(std::get<1>(info.param));
                         });

}  // namespace
}  // namespace megaserve::engine
