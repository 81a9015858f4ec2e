// kernels/op_sample.cuh itself, compiled as host C++ and run on the CPU as one CTA of 256
// threads with emulated warp intrinsics (tests/kernels/cuda_emulation.h), against
// engine::sample_token under the rules of tests/kernels/sampling_check.h: random logits with
// exact ties, NaN and +-inf; temperatures 0, tiny and ordinary; top-k 1 to beyond the
// vocabulary, top-p tiny to 0.99, min-p up to 1, penalties over contexts with repeated ids,
// banned ids including all of them, top logprobs up to 20; the rows packed by
// engine/cuda/cuda_sampling as the GPU gets them. It checks the op's logic (thresholds, ties,
// draws) where no GPU is; the GPU suites check it on the device (cuda_sampling_test).
// clang-format off
#include "tests/kernels/cuda_emulation.h"  // first: it defines what the op's CUDA code needs
#include "kernels/op_sample.cuh"
// clang-format on

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/cuda/cuda_sampling.h"
#include "engine/isa/sampling.h"
#include "gtest/gtest.h"
#include "tests/kernels/sampling_check.h"

namespace megaserve::engine {
namespace {

template <typename T>
T pick(std::mt19937& rng, std::vector<T> values) {
  return values[rng() % values.size()];
}

void check_rows(int vocab, int rows, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> logits(static_cast<size_t>(rows) * vocab);
  const auto at = [&](int s, int i) -> float& {
    return logits[static_cast<size_t>(s) * vocab + i];
  };
  for (int s = 0; s < rows; ++s) {
    const float spread = pick(rng, std::vector<float>{0.05f, 0.3f, 1.0f});  // flat to peaked
    for (int i = 0; i < vocab; ++i) {
      at(s, i) = i > 0 && rng() % 8 == 0 ? at(s, rng() % i) : normal(rng) * spread;  // ties
    }
    if (s % 5 == 1) at(s, 3) = std::nanf("");
    if (s % 7 == 2) at(s, 4) = at(s, 9) = std::numeric_limits<float>::infinity();
    if (s % 7 == 3) at(s, 5) = -std::numeric_limits<float>::infinity();
  }
  StepMetadata meta;
  std::vector<std::vector<int32_t>> prompts(rows), outputs(rows);
  for (int s = 0; s < rows; ++s) {
    RequestSampling r;
    scheduler::SamplingParams& p = r.params;
    p.temperature = pick(rng, std::vector<float>{0.0f, 1e-6f, 0.5f, 1.0f, 2.0f});
    if (rng() % 2) {
      p.top_k = pick(rng, std::vector<int>{1, 1, 2, 3, 5, 40, vocab - 1, vocab, vocab + 3});
    }
    if (rng() % 2) p.top_p = pick(rng, std::vector<float>{1e-6f, 0.3f, 0.8f, 0.99f});
    if (rng() % 3 == 0) p.min_p = pick(rng, std::vector<float>{0.01f, 0.2f, 1.0f});
    if (rng() % 3 == 0) p.repetition_penalty = pick(rng, std::vector<float>{0.7f, 1.4f});
    if (rng() % 3 == 0) p.frequency_penalty = 0.6f;
    if (rng() % 3 == 0) p.presence_penalty = -0.4f;
    if (rng() % 2) p.logprobs = pick(rng, std::vector<int>{1, 5, 20});
    for (int k = 0, n = rng() % 50; k < n; ++k) prompts[s].push_back(rng() % 30);
    for (int k = 0, n = rng() % 30; k < n; ++k) outputs[s].push_back(rng() % 30);
    if (rng() % 4 == 0) {
      for (int k = 0; k < 6; ++k) r.banned_token_ids.push_back(rng() % 30);
    }
    if (s == 7 || s == 8) {  // all banned: greedy over the raw logits
      for (int v = 0; v < vocab; ++v) r.banned_token_ids.push_back(v);
    }
    r.prompt_token_ids = prompts[s];
    r.output_token_ids = outputs[s];
    r.seed = (uint64_t{rng()} << 32) | rng();
    r.output_token_index = rng() % 1000;
    meta.requests.push_back(std::move(r));
    meta.sample_rows.push_back(s);
    meta.sample_request.push_back(s);
  }

  const SamplingUpload up = pack_sampling(meta, vocab);
  constexpr int kTop = kernels::kMaxTopLogprobs;
  std::vector<float> scratch(static_cast<size_t>(std::max(up.scratch_rows, 1)) * vocab);
  std::vector<int32_t> ids(rows), top_ids(static_cast<size_t>(rows) * kTop);
  std::vector<float> logprobs(rows), top_logprobs(top_ids.size());
  kernels::DeviceModel model{};
  model.vocab = vocab;
  model.vocab_size = vocab;  // the rows the sample op reads (one rank: its whole vocabulary)
  kernels::DeviceStepDesc step{};
  step.num_samples = rows;
  step.sampling = up.rows.data();
  step.sampling_ids = up.ids.data();
  step.logits = logits.data();
  step.sampling_scratch = scratch.data();
  step.sampled_ids = ids.data();
  step.sampled_logprobs = logprobs.data();
  step.top_ids = top_ids.data();
  step.top_logprobs = top_logprobs.data();
  std::vector<float> smem(sizeof(kernels::sample::SampleSmem) / sizeof(float) + 1);
  const kernels::OpContext ctx{model, step,    smem.data(), static_cast<int32_t>(smem.size()),
                               0,     nullptr, nullptr};
  testing::cuda_emulation::run_cta([&] {
    for (int s = 0; s < rows; ++s) kernels::SampleOp::sample_row(s, ctx);
  });

  testing::SampleCheckStats stats;
  for (int s = 0; s < rows; ++s) {
    const RequestSampling& r = meta.requests[s];
    const SamplingContext sc = sampling_context(r);
    const size_t top = static_cast<size_t>(s) * kTop;
    const scheduler::SampledToken got =
        unpack_sample(up.rows[s], vocab, ids[s], logprobs[s], std::span(top_ids).subspan(top, kTop),
                      std::span(top_logprobs).subspan(top, kTop));
    testing::expect_matches_host(got,
                                 std::span(logits).subspan(static_cast<size_t>(s) * vocab, vocab),
                                 r.params, sc, absl::StrCat("vocab ", vocab, " row ", s), &stats);
  }
  EXPECT_EQ(stats.compared, rows);
  EXPECT_LE(stats.ambiguous, rows / 20);
}

TEST(SampleOpOnCpu, SmallOddVocabulary) { check_rows(67, 72, 1); }
TEST(SampleOpOnCpu, Vocabulary517) { check_rows(517, 24, 2); }
// Several passes per warp over the row, and top-logprob ties spread over warp segments.
TEST(SampleOpOnCpu, Vocabulary2053) { check_rows(2053, 8, 3); }

}  // namespace
}  // namespace megaserve::engine
