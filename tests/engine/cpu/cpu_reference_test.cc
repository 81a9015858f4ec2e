// The CPU interpreter against a plain straight-line forward pass written here (no paging, no
// tiles, double accumulation): random small Llama (GQA 1, 2, 4; llama3 RoPE scaling; head_dim
// 6, 8, 12), Qwen2 (q/k/v bias) and Qwen3 (q/k norm, head_dim 16) models, written to disk as
// safetensors and loaded by the real loader. Logits of every sampled position agree to 1e-5
// (relative, over the vocabulary), for TP 1 and 2, prompts in chunks, KV splits included.
#include <cmath>
#include <numbers>
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "engine/isa/bf16.h"
#include "engine/model/weights.h"
#include "engine/step_runner.h"
#include "gtest/gtest.h"
#include "tests/support/safetensors_writer.h"

namespace megaserve::engine {
namespace {

using Vec = std::vector<double>;

Vec floats(const Tensor& t) {
  Vec out(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) {
    switch (t.dtype) {
      case DType::kF32:
        out[i] = t.data<float>()[i];
        break;
      case DType::kBF16:
        out[i] = bf16_to_float(t.data<uint16_t>()[i]);
        break;
      case DType::kF16:
        out[i] = f16_to_float(t.data<uint16_t>()[i]);
        break;
    }
  }
  return out;
}

// y = W x, W [rows, cols] row-major.
Vec matvec(const Vec& w, const Vec& x, int rows) {
  const size_t cols = x.size();
  Vec y(rows, 0.0);
  for (int r = 0; r < rows; ++r) {
    for (size_t c = 0; c < cols; ++c) y[r] += w[r * cols + c] * x[c];
  }
  return y;
}

Vec rms_norm(const Vec& x, const Vec& w, double eps, size_t offset = 0, size_t n = 0) {
  if (n == 0) n = x.size();
  double ss = 0;
  for (size_t i = 0; i < n; ++i) ss += x[offset + i] * x[offset + i];
  const double inv = 1.0 / std::sqrt(ss / n + eps);
  Vec out(n);
  for (size_t i = 0; i < n; ++i) out[i] = x[offset + i] * inv * w[i];
  return out;
}

// RoPE inverse frequencies, written from the llama3 scaling definition.
std::vector<double> inv_freq(const ModelConfig& c) {
  std::vector<double> f(c.head_dim / 2);
  for (int i = 0; i < c.head_dim / 2; ++i) {
    f[i] = 1.0 / std::pow(static_cast<double>(c.rope_theta), 2.0 * i / c.head_dim);
    if (c.rope_scaling.type != RopeScalingType::kLlama3) continue;
    const RopeScaling& s = c.rope_scaling;
    const double wavelen = 2 * std::numbers::pi / f[i];
    const double low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
    const double high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
    if (wavelen > low_wavelen) {
      f[i] /= s.factor;
    } else if (wavelen >= high_wavelen) {
      const double smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) /
                            (s.high_freq_factor - s.low_freq_factor);
      f[i] = (1 - smooth) * f[i] / s.factor + smooth * f[i];
    }
  }
  return f;
}

// Logits [n][vocab] of every position of `tokens` (positions 0..n-1), causal attention.
std::vector<Vec> reference_forward(const ModelConfig& c, const ModelWeights& w,
                                   const std::vector<int32_t>& tokens) {
  const int n = static_cast<int>(tokens.size());
  const int H = c.hidden_size, hd = c.head_dim, nh = c.num_heads, nkv = c.num_kv_heads;
  const double eps = c.rms_norm_eps;
  const std::vector<double> freq = inv_freq(c);
  const Vec emb = floats(w.embedding);
  std::vector<Vec> x(n, Vec(H));
  for (int t = 0; t < n; ++t) {
    for (int i = 0; i < H; ++i) x[t][i] = emb[static_cast<size_t>(tokens[t]) * H + i];
  }
  const auto rope = [&](Vec& v, size_t off, int pos) {
    for (int i = 0; i < hd / 2; ++i) {
      const float angle = static_cast<float>(pos) * static_cast<float>(freq[i]);
      const double co = std::cos(angle), si = std::sin(angle);
      const double a = v[off + i], b = v[off + i + hd / 2];
      v[off + i] = a * co - b * si;
      v[off + i + hd / 2] = b * co + a * si;
    }
  };
  for (const LayerWeights& lw : w.layers) {
    const Vec wq = floats(lw.wq), wk = floats(lw.wk), wv = floats(lw.wv), wo = floats(lw.wo);
    const Vec bq = lw.bq.empty() ? Vec() : floats(lw.bq),
              bk = lw.bk.empty() ? Vec() : floats(lw.bk),
              bv = lw.bv.empty() ? Vec() : floats(lw.bv);
    const Vec qn = lw.q_norm.empty() ? Vec() : floats(lw.q_norm);
    const Vec kn = lw.k_norm.empty() ? Vec() : floats(lw.k_norm);
    std::vector<Vec> q(n), k(n), v(n);
    for (int t = 0; t < n; ++t) {
      const Vec h = rms_norm(x[t], floats(lw.attn_norm), eps);
      q[t] = matvec(wq, h, nh * hd);
      k[t] = matvec(wk, h, nkv * hd);
      v[t] = matvec(wv, h, nkv * hd);
      for (size_t i = 0; i < bq.size(); ++i) q[t][i] += bq[i];
      for (size_t i = 0; i < bk.size(); ++i) k[t][i] += bk[i];
      for (size_t i = 0; i < bv.size(); ++i) v[t][i] += bv[i];
      for (int hh = 0; hh < nh; ++hh) {
        if (!qn.empty()) {
          const Vec r = rms_norm(q[t], qn, eps, hh * hd, hd);
          std::copy(r.begin(), r.end(), q[t].begin() + hh * hd);
        }
        rope(q[t], hh * hd, t);
      }
      for (int hh = 0; hh < nkv; ++hh) {
        if (!kn.empty()) {
          const Vec r = rms_norm(k[t], kn, eps, hh * hd, hd);
          std::copy(r.begin(), r.end(), k[t].begin() + hh * hd);
        }
        rope(k[t], hh * hd, t);
      }
    }
    for (int t = 0; t < n; ++t) {
      Vec attn(nh * hd, 0.0);
      for (int hh = 0; hh < nh; ++hh) {
        const int kvh = hh / (nh / nkv);
        Vec score(t + 1);
        double mx = -1e300;
        for (int j = 0; j <= t; ++j) {
          double s = 0;
          for (int d = 0; d < hd; ++d) s += q[t][hh * hd + d] * k[j][kvh * hd + d];
          score[j] = s / std::sqrt(static_cast<double>(hd));
          mx = std::max(mx, score[j]);
        }
        double sum = 0;
        for (int j = 0; j <= t; ++j) sum += score[j] = std::exp(score[j] - mx);
        for (int j = 0; j <= t; ++j) {
          for (int d = 0; d < hd; ++d) attn[hh * hd + d] += score[j] / sum * v[j][kvh * hd + d];
        }
      }
      const Vec o = matvec(wo, attn, H);
      for (int i = 0; i < H; ++i) x[t][i] += o[i];
    }
    const Vec wg = floats(lw.w_gate), wu = floats(lw.w_up), wd = floats(lw.w_down);
    for (int t = 0; t < n; ++t) {
      const Vec h = rms_norm(x[t], floats(lw.ffn_norm), eps);
      const Vec g = matvec(wg, h, c.intermediate_size), u = matvec(wu, h, c.intermediate_size);
      Vec act(c.intermediate_size);
      for (int i = 0; i < c.intermediate_size; ++i) act[i] = g[i] / (1 + std::exp(-g[i])) * u[i];
      const Vec d = matvec(wd, act, H);
      for (int i = 0; i < H; ++i) x[t][i] += d[i];
    }
  }
  const Vec lm = floats(w.lm_head), fnorm = floats(w.final_norm);
  std::vector<Vec> logits(n);
  for (int t = 0; t < n; ++t) logits[t] = matvec(lm, rms_norm(x[t], fnorm, eps), c.vocab_size);
  return logits;
}

double relative_error(const std::vector<float>& got, const Vec& want) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    diff += (got[i] - want[i]) * (got[i] - want[i]);
    norm += want[i] * want[i];
  }
  return std::sqrt(diff / norm);
}

struct ModelCase {
  const char* name;
  ModelFamily family;
  int num_heads, num_kv_heads, head_dim;
  bool llama3_rope;
  const char* dtype;  // on disk; loaded as kF32 or kBF16 accordingly
};

void PrintTo(const ModelCase& c, std::ostream* os) { *os << c.name; }

class CpuReferenceTest : public ::testing::TestWithParam<std::tuple<ModelCase, int>> {};

TEST_P(CpuReferenceTest, LogitsMatchStraightLineForward) {
  const auto& [mc, tp] = GetParam();
  ModelConfig config = megaserve::testing::tiny_model_config(mc.family);
  config.num_heads = mc.num_heads;
  config.num_kv_heads = mc.num_kv_heads;
  config.head_dim = mc.head_dim;
  config.max_position_embeddings = 256;
  if (mc.llama3_rope) {
    config.rope_theta = 10000.0f;
    config.rope_scaling = {RopeScalingType::kLlama3, 8.0f, 1.0f, 4.0f, 64};
  }
  const auto dir = megaserve::testing::make_test_dir(mc.name);
  megaserve::testing::write_random_model(dir, config, 42 + tp, {.dtype = mc.dtype});
  auto loaded_config = load_model_config(dir);
  ASSERT_TRUE(loaded_config.ok()) << loaded_config.status();
  const DType dtype = std::string(mc.dtype) == "BF16" ? DType::kBF16 : DType::kF32;
  auto weights = load_weights(dir, *loaded_config, dtype);
  ASSERT_TRUE(weights.ok()) << weights.status();

  // 45 tokens: a 41-token prompt in chunks of 7 (positions cross the 32-key KV split), then
  // 4 decode steps; logits are sampled at the end of every chunk and every decode step.
  std::vector<int32_t> tokens;
  for (int i = 0; i < 45; ++i) tokens.push_back((i * 37 + 11) % config.vocab_size);
  const std::vector<Vec> want = reference_forward(*loaded_config, *weights, tokens);

  CpuBackendOptions options;
  options.tensor_parallel = tp;
  options.num_sms = 3;
  options.num_kv_blocks = 16;
  options.kv_block_size = 8;
  options.execution.mode = ExecutionMode::kShuffled;
  options.execution.poison_workspace = true;
  options.verify = true;
  auto backend = CpuBackend::create(*loaded_config, *weights, options);
  ASSERT_TRUE(backend.ok()) << backend.status();
  StepRunner runner(*loaded_config, **backend);
  int pos = 0;
  for (uint64_t step = 0; pos < static_cast<int>(tokens.size()); ++step) {
    const int n = pos < 41 ? std::min(7, 41 - pos) : 1;
    scheduler::StepPlan plan;
    plan.step_id = step;
    plan.kv_block_size = 8;
    scheduler::StepRequest r;
    r.request_id = 5;
    r.token_ids.assign(tokens.begin() + pos, tokens.begin() + pos + n);
    r.first_position = pos;
    for (int b = 0; b < 6; ++b) r.block_table.push_back(15 - 2 * b);  // scattered blocks
    r.sample = true;
    r.sampling.temperature = 0.0f;
    plan.requests.push_back(r);
    auto out = runner.execute(plan);
    ASSERT_TRUE(out.ok()) << out.status();
    pos += n;
    const std::vector<float> got = (*backend)->interpreter().logits(0);
    ASSERT_EQ(got.size(), static_cast<size_t>(config.vocab_size));
    EXPECT_LT(relative_error(got, want[pos - 1]), 1e-5) << "position " << pos - 1;
  }
}

const ModelCase kCases[] = {
    {"llama_gqa1_hd8", ModelFamily::kLlama, 4, 4, 8, false, "F32"},
    {"llama_gqa2_hd12_llama3", ModelFamily::kLlama, 4, 2, 12, true, "F32"},
    {"llama_gqa4_hd6", ModelFamily::kLlama, 8, 2, 6, false, "F32"},
    {"llama_gqa2_bf16", ModelFamily::kLlama, 4, 2, 8, true, "BF16"},
    {"qwen2_bias", ModelFamily::kQwen2, 4, 2, 8, false, "F32"},
    {"qwen3_qk_norm", ModelFamily::kQwen3, 4, 2, 16, false, "F32"},
};

INSTANTIATE_TEST_SUITE_P(Models, CpuReferenceTest,
                         ::testing::Combine(::testing::ValuesIn(kCases), ::testing::Values(1, 2)),
                         [](const auto& info) {
                           return std::string(std::get<0>(info.param).name) + "_tp" +
                                  std::to_string(std::get<1>(info.param));
                         });

}  // namespace
}  // namespace megaserve::engine
