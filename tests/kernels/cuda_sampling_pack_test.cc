// engine/cuda/cuda_sampling: what the host packs for the device's sample op, checked without a
// GPU. The packed id ranges are applied to logits exactly as kernels/op_sample.cuh applies
// them (clean, repetition penalty per listed id, frequency / presence per (id, count) pair,
// banned ids) and must give engine::apply_penalties' result bit for bit, for random
// contexts with repeated and out-of-vocabulary ids; plus the other fields, the scratch rows
// and the top-logprobs limit.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "engine/cuda/cuda_sampling.h"
#include "engine/isa/sampling.h"
#include "gtest/gtest.h"

namespace megaserve::engine {
namespace {

float clean(float x) {
  if (std::isnan(x)) return -std::numeric_limits<float>::infinity();
  return std::min(x, std::numeric_limits<float>::max());
}

// The device's penalize() (kernels/op_sample.cuh) on the host: float operations one at a
// time, as the device's explicitly rounded intrinsics do them.
std::vector<float> apply_packed(std::span<const float> logits, const kernels::DeviceSampling& d,
                                std::span<const int32_t> ids) {
  std::vector<float> out(logits.size());
  for (size_t i = 0; i < logits.size(); ++i) out[i] = clean(logits[i]);
  for (int j = d.repeat_begin; j < d.count_begin; ++j) {
    const float x = out[ids[j]];
    out[ids[j]] = clean(x > 0.0f ? x / d.repetition_penalty : x * d.repetition_penalty);
  }
  for (int j = d.count_begin; j < d.banned_begin; j += 2) {
    const float cut = d.frequency_penalty * static_cast<float>(ids[j + 1]) + d.presence_penalty;
    out[ids[j]] = clean(out[ids[j]] - cut);
  }
  for (int j = d.banned_begin; j < d.banned_end; ++j) {
    out[ids[j]] = -std::numeric_limits<float>::infinity();
  }
  return out;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

TEST(CudaSamplingPack, PackedRangesReproduceApplyPenalties) {
  constexpr int kVocab = 300;
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> logit(-8.0f, 8.0f);
  StepMetadata meta;
  constexpr int kRows = 60;
  std::vector<std::vector<int32_t>> prompts(kRows), outputs(kRows);
  std::vector<std::vector<float>> logits(kRows, std::vector<float>(kVocab));
  for (int s = 0; s < kRows; ++s) {
    for (float& x : logits[s]) x = logit(rng);
    logits[s][rng() % kVocab] = std::nanf("");
    logits[s][rng() % kVocab] = std::numeric_limits<float>::infinity();
    logits[s][rng() % kVocab] = std::numeric_limits<float>::max();
    // Ids from a small range (many repeats), a few outside the vocabulary.
    for (int k = 0, n = rng() % 80; k < n; ++k) prompts[s].push_back(rng() % 40);
    for (int k = 0, n = rng() % 50; k < n; ++k) outputs[s].push_back(rng() % 45);
    if (s % 7 == 0) prompts[s].push_back(kVocab + 3), outputs[s].push_back(-2);
    RequestSampling r;
    r.request_id = s;
    scheduler::SamplingParams& p = r.params;
    if (s % 2 == 0) p.repetition_penalty = s % 4 == 0 ? 1.7f : 0.4f;
    if (s % 3 == 0) p.frequency_penalty = s % 9 == 0 ? 3e38f : 0.35f;  // 3e38: saturates
    if (s % 5 == 0) p.presence_penalty = -0.6f;
    if (s % 4 == 1) r.banned_token_ids = {2, 2, static_cast<int32_t>(rng() % kVocab), kVocab};
    p.logprobs = s % 3 == 0 ? 30 : s % 5;  // 30: clamped to kMaxTopLogprobs
    p.temperature = 0.25f * (s % 5);
    p.top_k = s % 11;
    p.top_p = 1.0f - 0.01f * (s % 6);
    p.min_p = 0.01f * (s % 4);
    r.prompt_token_ids = prompts[s];
    r.output_token_ids = outputs[s];
    r.seed = 1000 + s;
    r.output_token_index = s * 3;
    meta.requests.push_back(std::move(r));
    meta.sample_rows.push_back(s);
    meta.sample_request.push_back(s);
  }
  const SamplingUpload up = pack_sampling(meta, kVocab);
  ASSERT_EQ(up.rows.size(), size_t{kRows});
  int scratch_rows = 0;
  bool any_logprobs = false;
  for (int s = 0; s < kRows; ++s) {
    const kernels::DeviceSampling& d = up.rows[s];
    const RequestSampling& r = meta.requests[s];
    SCOPED_TRACE(s);
    EXPECT_LE(d.repeat_begin, d.count_begin);
    EXPECT_EQ((d.banned_begin - d.count_begin) % 2, 0);
    EXPECT_LE(d.count_begin, d.banned_begin);
    EXPECT_LE(d.banned_begin, d.banned_end);
    EXPECT_LE(d.banned_end, static_cast<int32_t>(up.ids.size()));
    // The repetition ids are distinct (the device updates them in parallel).
    std::vector<int32_t> repeated(up.ids.begin() + d.repeat_begin, up.ids.begin() + d.count_begin);
    std::sort(repeated.begin(), repeated.end());
    EXPECT_EQ(std::adjacent_find(repeated.begin(), repeated.end()), repeated.end());
    for (int j = d.repeat_begin; j < d.banned_end; ++j) {
      const bool count_word = j >= d.count_begin && j < d.banned_begin && (j - d.count_begin) % 2;
      if (!count_word) {
        EXPECT_TRUE(up.ids[j] >= 0 && up.ids[j] < kVocab) << up.ids[j];
      }
    }
    SamplingContext sc;
    sc.prompt_token_ids = r.prompt_token_ids;
    sc.output_token_ids = r.output_token_ids;
    sc.banned_ids = r.banned_token_ids;
    EXPECT_TRUE(
        same_bits(apply_packed(logits[s], d, up.ids), apply_penalties(logits[s], r.params, sc)));
    EXPECT_EQ(d.scratch_row >= 0, d.banned_end > d.repeat_begin);
    if (d.scratch_row >= 0) {
      EXPECT_EQ(d.scratch_row, scratch_rows++);
    }
    EXPECT_EQ(d.temperature, r.params.temperature);
    EXPECT_EQ(d.top_k, r.params.top_k);
    EXPECT_EQ(d.top_p, r.params.top_p);
    EXPECT_EQ(d.min_p, r.params.min_p);
    EXPECT_EQ(d.logprobs, std::min(r.params.logprobs, kernels::kMaxTopLogprobs));
    EXPECT_EQ(d.seed, r.seed);
    EXPECT_EQ(d.token_index, r.output_token_index);
    any_logprobs |= d.logprobs > 0;
  }
  EXPECT_EQ(up.scratch_rows, scratch_rows);
  EXPECT_GT(scratch_rows, kRows / 2);
  EXPECT_EQ(up.any_logprobs, any_logprobs);
}

TEST(CudaSamplingPack, UnpackKeepsTheRequestedTopLogprobs) {
  kernels::DeviceSampling d{};
  d.logprobs = 3;
  const std::vector<int32_t> ids = {7, 4, 9, 1, 0};
  const std::vector<float> lps = {-0.1f, -0.5f, -0.5f, -2.0f, -3.0f};
  scheduler::SampledToken t = unpack_sample(d, 100, 7, -0.1f, ids, lps);
  EXPECT_EQ(t.token_id, 7);
  EXPECT_EQ(t.logprob, -0.1f);
  ASSERT_EQ(t.top_logprobs.size(), 3u);
  EXPECT_EQ(t.top_logprobs[2], std::make_pair(9, -0.5f));
  t = unpack_sample(d, 2, 1, -1.0f, ids, lps);  // a 2-token vocabulary has 2 alternatives
  EXPECT_EQ(t.top_logprobs.size(), 2u);
  d.logprobs = 0;
  EXPECT_TRUE(unpack_sample(d, 100, 1, -1.0f, {}, {}).top_logprobs.empty());
}

TEST(CudaSamplingPack, MoreTopLogprobsThanTheDeviceReportsAreRefused) {
  Step step;  // one request with one sampling row
  RequestSampling r;
  r.request_id = 5;
  r.params.logprobs = kernels::kMaxTopLogprobs;
  step.meta.requests.push_back(r);
  step.meta.num_requests = 1;
  step.meta.sample_rows = {0};
  step.meta.sample_request = {0};
  EXPECT_TRUE(check_device_sampling(step).ok());
  step.meta.requests[0].params.logprobs = kernels::kMaxTopLogprobs + 1;
  const absl::Status s = check_device_sampling(step);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("request 5"), std::string::npos) << s;
  step.meta.sample_rows.clear();  // only sampling rows are read
  step.meta.sample_request.clear();
  EXPECT_TRUE(check_device_sampling(step).ok());
}

}  // namespace
}  // namespace megaserve::engine
