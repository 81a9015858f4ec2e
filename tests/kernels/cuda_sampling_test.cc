// The device's sample op (kernels/op_sample.cuh) against engine::sample_token on the very
// logits the device produced (CudaBackend::logits), for many parameter sets: each filter
// alone and combined, temperatures 0, tiny and ordinary, top_k 1 and >= vocab, top_p tiny
// and 1, min_p up to 1, repetition / frequency / presence penalties over contexts with
// repeated ids (biased to the row's best tokens, so that they matter), banned ids including
// all of them, top logprobs up to 20; vocabularies of 32000, 128256 and 517, and a 67-token
// one whose lm_head rows give NaN and +-inf logits. Logits come from a one-layer random
// model whose lm_head has heavy-tailed row gains (peaked rows) and exact duplicate rows
// (tied logits at every cut). Comparison rules: tests/kernels/sampling_check.h.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_trace.h"
#include "engine/isa/isa.h"
#include "engine/isa/sampling.h"
#include "engine/model/model_config.h"
#include "engine/model/weights.h"
#include "engine/step_runner.h"
#include "gtest/gtest.h"
#include "kernels/megakernel.h"
#include "tests/kernels/gpu_test_util.h"
#include "tests/kernels/sampling_check.h"
#include "tests/support/safetensors_writer.h"

namespace megaserve::engine {
namespace {

constexpr int kHidden = 64;
constexpr int kRowsPerStep = 64;

ModelConfig sampling_config(int vocab) {
  ModelConfig c = testing::tiny_model_config(ModelFamily::kLlama);
  c.hidden_size = kHidden;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 16;
  c.intermediate_size = 128;
  c.num_layers = 1;
  c.vocab_size = vocab;
  c.tie_word_embeddings = false;
  return c;
}

// lm_head rows g_v * U(-1, 1)^hidden with log-normal gains g_v; about one row in ten a copy
// of an earlier one. `special`: rows 3, 4 NaN; rows 5, 7 = (+inf, 0, ...) and rows 6, 8 =
// (-inf, 0, ...), so each logit row has two +inf and two -inf entries (h_0 != 0).
Tensor designed_lm_head(int vocab, bool special, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> log_gain(0.0f, 0.7f);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> w(static_cast<size_t>(vocab) * kHidden);
  for (int v = 0; v < vocab; ++v) {
    if (v > 0 && rng() % 10 == 0) {
      const int from = static_cast<int>(rng() % v);
      std::copy_n(&w[static_cast<size_t>(from) * kHidden], kHidden,
                  &w[static_cast<size_t>(v) * kHidden]);
      continue;
    }
    const float g = 0.5f * std::exp(log_gain(rng));
    for (int j = 0; j < kHidden; ++j) w[static_cast<size_t>(v) * kHidden + j] = g * u(rng);
  }
  if (special) {
    const float inf = std::numeric_limits<float>::infinity();
    for (int v : {3, 4}) std::fill_n(&w[static_cast<size_t>(v) * kHidden], kHidden, std::nanf(""));
    for (int v : {5, 6, 7, 8}) {
      std::fill_n(&w[static_cast<size_t>(v) * kHidden], kHidden, 0.0f);
      w[static_cast<size_t>(v) * kHidden] = v % 2 == 1 ? inf : -inf;
    }
  }
  Tensor t;
  t.dtype = DType::kF32;
  t.shape = {vocab, kHidden};
  t.bytes = std::make_shared<std::vector<uint8_t>>(w.size() * sizeof(float));
  std::memcpy(t.bytes->data(), w.data(), t.bytes->size());
  return t;
}

struct Case {
  std::string name;
  scheduler::SamplingParams params;
  std::vector<int32_t> prompt, output, banned;
  uint64_t seed = 0;
  int32_t token_index = 0;
};

// The `n` best ids of a logit row (NaN last).
std::vector<int32_t> best_ids(const std::vector<float>& logits, int n) {
  std::vector<int32_t> ids(logits.size());
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>(i);
  n = std::min<int>(n, ids.size());
  const auto key = [&](int32_t i) { return std::isnan(logits[i]) ? -INFINITY : logits[i]; };
  std::partial_sort(ids.begin(), ids.begin() + n, ids.end(),
                    [&](int32_t a, int32_t b) { return key(a) > key(b); });
  ids.resize(n);
  return ids;
}

template <typename T>
T pick(std::mt19937& rng, std::initializer_list<T> values) {
  return *(values.begin() + rng() % values.size());
}

// A context of `n` ids with repeats: half from the row's best 30, half anywhere.
std::vector<int32_t> context_ids(std::mt19937& rng, const std::vector<int32_t>& best, int vocab,
                                 int n) {
  std::vector<int32_t> ids(n);
  for (int32_t& id : ids) {
    id = rng() % 2 ? best[rng() % best.size()] : static_cast<int32_t>(rng() % vocab);
  }
  return ids;
}

// Case `k` for a row whose best ids are `best`: first each filter alone, then random mixes.
Case make_case(int k, std::mt19937& rng, const std::vector<int32_t>& best, int vocab) {
  Case c;
  scheduler::SamplingParams& p = c.params;
  c.seed = (uint64_t{rng()} << 32) | rng();
  c.token_index = static_cast<int32_t>(rng() % 1000);
  p.temperature = 1.0f;
  const auto with_context = [&] {
    c.prompt = context_ids(rng, best, vocab, 1 + rng() % 120);
    c.output = context_ids(rng, best, vocab, rng() % 60);
  };
  std::vector<int32_t> all(vocab);
  for (int v = 0; v < vocab; ++v) all[v] = v;
  switch (k) {
    // clang-format off
    case 0: c.name = "greedy"; p.temperature = 0.0f; break;
    case 1: c.name = "T 1e-6"; p.temperature = 1e-6f; break;
    case 2: c.name = "T 1e-3"; p.temperature = 1e-3f; break;
    case 3: c.name = "T 0.7"; p.temperature = 0.7f; break;
    case 4: c.name = "T 2.5"; p.temperature = 2.5f; break;
    case 5: c.name = "top_k 1"; p.top_k = 1; break;
    case 6: c.name = "top_k 2"; p.top_k = 2; break;
    case 7: c.name = "top_k 50"; p.top_k = 50; break;
    case 8: c.name = "top_k 1025"; p.top_k = 1025; break;
    case 9: c.name = "top_k vocab"; p.top_k = vocab; break;
    case 10: c.name = "top_k vocab+5"; p.top_k = vocab + 5; break;
    case 11: c.name = "top_p 1e-6"; p.top_p = 1e-6f; break;
    case 12: c.name = "top_p 0.3"; p.top_p = 0.3f; break;
    case 13: c.name = "top_p 0.9"; p.top_p = 0.9f; break;
    case 14: c.name = "top_p 1"; p.top_p = 1.0f; break;
    case 15: c.name = "min_p 0.05"; p.min_p = 0.05f; break;
    case 16: c.name = "min_p 0.5"; p.min_p = 0.5f; break;
    case 17: c.name = "min_p 1"; p.min_p = 1.0f; break;
    case 18: c.name = "repetition 1.5"; p.repetition_penalty = 1.5f; with_context(); break;
    case 19: c.name = "repetition 0.6"; p.repetition_penalty = 0.6f; with_context(); break;
    case 20: c.name = "frequency 0.7"; p.frequency_penalty = 0.7f; with_context(); break;
    case 21: c.name = "presence -0.8"; p.presence_penalty = -0.8f; with_context(); break;
    case 22: c.name = "banned best"; c.banned = {best[0], best[0], best[1], best[4]}; break;
    case 23: c.name = "all banned"; c.banned = all; break;
    case 24: c.name = "all banned greedy"; p.temperature = 0.0f; c.banned = all; break;
    case 25: c.name = "logprobs 1"; p.logprobs = 1; break;
    case 26: c.name = "logprobs 20"; p.logprobs = 20; break;
    case 27: c.name = "greedy logprobs 5 repetition"; p.temperature = 0.0f; p.logprobs = 5;
      p.repetition_penalty = 3.0f; with_context(); break;
    // clang-format on
    default: {
      c.name = absl::StrCat("mix ", k);
      p.temperature = pick(rng, {0.0f, 1e-6f, 1e-3f, 0.3f, 0.8f, 1.0f, 1.7f, 3.0f});
      if (rng() % 2) p.top_k = pick(rng, {1, 2, 3, 10, 50, 1000, 1024, 1025, vocab - 1, vocab});
      if (rng() % 2) p.top_p = pick(rng, {1e-6f, 0.02f, 0.3f, 0.75f, 0.95f, 0.999f, 1.0f});
      if (rng() % 5 < 2) p.min_p = pick(rng, {1e-4f, 0.02f, 0.2f, 0.7f, 1.0f});
      if (rng() % 5 < 2) p.repetition_penalty = pick(rng, {0.5f, 0.9f, 1.2f, 2.0f});
      if (rng() % 10 < 3) p.frequency_penalty = pick(rng, {-1.0f, 0.3f, 1.5f});
      if (rng() % 10 < 3) p.presence_penalty = pick(rng, {-0.5f, 0.4f, 2.0f});
      if (rng() % 5 < 2) p.logprobs = pick(rng, {1, 3, 20});
      if (p.repetition_penalty != 1.0f || p.frequency_penalty != 0.0f ||
          p.presence_penalty != 0.0f) {
        with_context();
      }
      const int banned = rng() % 100;
      if (banned < 3) {
        c.banned = all;
      } else if (banned < 28) {
        c.banned = context_ids(rng, best, vocab, 1 + rng() % 40);
      }
    }
  }
  return c;
}

// The sample op's device time in the last step (profile on): the mean and the largest
// kSample instruction (one row each), in microseconds.
std::pair<double, double> sample_op_us(const CudaBackend& b, const StepRunner& runner) {
  const std::vector<isa::Instruction>& insts = runner.last_step().ranks[0].instructions;
  double sum = 0, worst = 0;
  int n = 0;
  for (size_t i = 0; i < insts.size() && i < b.last_timings().size(); ++i) {
    if (insts[i].opcode() != isa::Opcode::kSample) continue;
    const InstructionTiming& t = b.last_timings()[i];
    const double us = static_cast<double>(t.end_ns - t.start_ns) * 1e-3;
    sum += us;
    worst = std::max(worst, us);
    ++n;
  }
  return {n > 0 ? sum / n : 0.0, worst};
}

struct VocabCase {
  const char* name;
  int vocab;
  bool special;
  int cases;
};

void PrintTo(const VocabCase& c, std::ostream* os) { *os << c.name; }

class CudaSampling : public ::testing::TestWithParam<VocabCase> {};

TEST_P(CudaSampling, DeviceMatchesHostSampler) {
  MEGASERVE_REQUIRE_GPU();
  const VocabCase& vc = GetParam();
  const ModelConfig config = sampling_config(vc.vocab);
  ModelWeights weights = dummy_weights(config, DType::kF32, 17);
  weights.lm_head = designed_lm_head(vc.vocab, vc.special, 23 + vc.vocab);
  CudaBackendOptions o;
  o.kv_block_size = 16;
  o.num_kv_blocks = kRowsPerStep + 4;
  o.check_barriers = true;
  // fp32 FMA projections: the +inf lm_head rows give +-inf logits (the tensor cores' bf16
  // hi + lo activation pairs could turn inf * hi + inf * lo into NaN).
  o.tensor_cores = false;
  auto b = CudaBackend::create(config, std::move(weights), o);
  ASSERT_TRUE(b.ok()) << b.status();
  CudaBackend& backend = **b;
  StepRunner runner(config, backend);

  std::mt19937 rng(1000 + vc.vocab);
  testing::SampleCheckStats stats;
  uint64_t step_id = 0;
  // Device time of the sample op per row (profiled): greedy rows, and the cases' rows.
  double greedy_us = 0, greedy_worst = 0, cases_us = 0, cases_worst = 0;
  int timed_steps = 0;
  backend.set_profile(true);
  for (int first = 0; first < vc.cases; first += kRowsPerStep) {
    const int rows = std::min(kRowsPerStep, vc.cases - first);
    // Two input tokens per row; a greedy step first gives each row's logits, from which the
    // cases pick their contexts and banned ids (the second step recomputes the same logits).
    scheduler::StepPlan plan;
    plan.kv_block_size = 16;
    for (int i = 0; i < rows; ++i) {
      scheduler::StepRequest r;
      r.request_id = first + i + 1;
      r.token_ids = {static_cast<int32_t>(rng() % vc.vocab),
                     static_cast<int32_t>(rng() % vc.vocab)};
      r.block_table = {i};
      r.sample = true;
      r.sampling.temperature = 0.0f;
      plan.requests.push_back(std::move(r));
    }
    plan.step_id = step_id++;
    auto probe = runner.execute(plan);
    ASSERT_TRUE(probe.ok()) << probe.status();
    const auto [greedy_mean, greedy_max] = sample_op_us(backend, runner);
    std::vector<Case> cases;
    for (int i = 0; i < rows; ++i) {
      auto logits = backend.logits(i);
      ASSERT_TRUE(logits.ok()) << logits.status();
      cases.push_back(make_case(first + i, rng, best_ids(*logits, 30), vc.vocab));
      scheduler::StepRequest& r = plan.requests[i];
      const Case& c = cases.back();
      r.sampling = c.params;
      r.prompt_token_ids = c.prompt;
      r.output_token_ids = c.output;
      r.banned_token_ids = c.banned;
      r.seed = c.seed;
      r.output_token_index = c.token_index;
    }
    plan.step_id = step_id++;
    auto out = runner.execute(plan);
    ASSERT_TRUE(out.ok()) << out.status();
    const auto [cases_mean, cases_max] = sample_op_us(backend, runner);
    greedy_us += greedy_mean;
    greedy_worst = std::max(greedy_worst, greedy_max);
    cases_us += cases_mean;
    cases_worst = std::max(cases_worst, cases_max);
    ++timed_steps;
    ASSERT_EQ(out->sampled.size(), static_cast<size_t>(rows));
    for (int i = 0; i < rows; ++i) {
      auto logits = backend.logits(i);
      ASSERT_TRUE(logits.ok()) << logits.status();
      const Case& c = cases[i];
      SamplingContext sc;
      sc.prompt_token_ids = c.prompt;
      sc.output_token_ids = c.output;
      sc.banned_ids = c.banned;
      sc.seed = c.seed;
      sc.token_index = c.token_index;
      testing::expect_matches_host(out->sampled[i], *logits, c.params, sc,
                                   absl::StrCat(vc.name, " case ", first + i, " (", c.name, ")"),
                                   &stats);
      EXPECT_EQ(out->sampled[i].request_id, plan.requests[i].request_id);
    }
  }
  std::printf(
      "[ sampling %s ] %d rows match the host sampler (%d at a cut within 1e-5); "
      "sample op per row on the device: greedy %.1f us mean, %.1f max; the cases' "
      "parameters %.1f us mean, %.1f max\n",
      vc.name, stats.compared, stats.ambiguous, greedy_us / timed_steps, greedy_worst,
      cases_us / timed_steps, cases_worst);
  EXPECT_EQ(stats.compared, vc.cases);
  EXPECT_LE(stats.ambiguous, stats.compared / 50);
}

INSTANTIATE_TEST_SUITE_P(Vocabularies, CudaSampling,
                         ::testing::Values(VocabCase{"vocab32000", 32000, false, 256},
                                           VocabCase{"vocab128256", 128256, false, 256},
                                           VocabCase{"vocab517", 517, false, 256},
                                           VocabCase{"vocab67_nan_inf", 67, true, 128}),
                         [](const auto& info) { return std::string(info.param.name); });

// More top logprobs than the device reports is refused before the step runs, and the
// backend stays usable.
TEST(CudaSamplingLimits, TooManyTopLogprobsIsRefused) {
  MEGASERVE_REQUIRE_GPU();
  const ModelConfig config = sampling_config(517);
  CudaBackendOptions o;
  o.num_kv_blocks = 4;
  auto b = CudaBackend::create(config, dummy_weights(config, DType::kF32, 5), o);
  ASSERT_TRUE(b.ok()) << b.status();
  StepRunner runner(config, **b);
  scheduler::StepPlan plan;
  scheduler::StepRequest r;
  r.request_id = 9;
  r.token_ids = {4};
  r.block_table = {0};
  r.sample = true;
  r.sampling.logprobs = kernels::kMaxTopLogprobs + 1;
  plan.requests.push_back(r);
  auto refused = runner.execute(plan);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << refused.status();
  plan.requests[0].sampling.logprobs = kernels::kMaxTopLogprobs;
  auto out = runner.execute(plan);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->sampled[0].top_logprobs.size(), size_t{kernels::kMaxTopLogprobs});
}

}  // namespace
}  // namespace megaserve::engine
