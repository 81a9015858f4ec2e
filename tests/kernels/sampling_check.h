// Shared by the gpu suites that compare the device's sample op with engine::sample_token on
// the very logits the device produced (CudaBackend::logits).
//
// Tokens must be equal, except where engine/isa/sampling.h lets a cut go either way: top-p sums
// its mass with rounding (~3e-7 relative), and min-p compares exp(s) with min_p, so a token
// at either cut may be kept by one and dropped by the other. A differing device token is
// accepted only if the host draws it too once top_p or min_p moves by 1e-5 relative (and the
// case is counted as ambiguous). Logprobs (the chosen token's and the top ones) must agree
// within 1e-5 relative (absolute below 1); top logprob ids exactly, in order.
#pragma once

#include <algorithm>
#include <cmath>
#include <span>
#include <string>

#include "engine/isa/sampling.h"
#include "gtest/gtest.h"
#include "scheduler/step_plan.h"

namespace megaserve::testing {

struct SampleCheckStats {
  int compared = 0;
  int ambiguous = 0;  // device token differs, explained by a cut within 1e-5 of top_p / min_p
};

inline bool logprob_close(float got, float want) {
  if (std::isinf(want) || std::isinf(got)) return got == want;
  return std::abs(static_cast<double>(got) - want) <= 1e-5 * std::max(1.0, std::abs(double{want}));
}

// Checks the device's `got` against the host sampler on `logits`; `what` names the case.
inline void expect_matches_host(const scheduler::SampledToken& got, std::span<const float> logits,
                                const scheduler::SamplingParams& params,
                                const engine::SamplingContext& context, const std::string& what,
                                SampleCheckStats* stats) {
  ++stats->compared;
  scheduler::SampledToken want = engine::sample_token(logits, params, context);
  if (got.token_id != want.token_id) {
    bool explained = false;
    for (int dp = -1; dp <= 1 && !explained; ++dp) {
      for (int dm = -1; dm <= 1 && !explained; ++dm) {
        scheduler::SamplingParams moved = params;
        moved.top_p = std::min(1.0f, static_cast<float>(params.top_p * (1.0 + dp * 1e-5)));
        moved.min_p = std::min(1.0f, static_cast<float>(params.min_p * (1.0 + dm * 1e-5)));
        scheduler::SampledToken alt = engine::sample_token(logits, moved, context);
        if (alt.token_id == got.token_id) {
          explained = true;
          want = std::move(alt);
        }
      }
    }
    EXPECT_TRUE(explained) << what << ": device token " << got.token_id << ", host "
                           << want.token_id << " (not explained by a cut within 1e-5)";
    if (!explained) return;
    ++stats->ambiguous;
  }
  EXPECT_TRUE(logprob_close(got.logprob, want.logprob))
      << what << ": token " << got.token_id << " logprob " << got.logprob << ", host "
      << want.logprob;
  ASSERT_EQ(got.top_logprobs.size(), want.top_logprobs.size()) << what;
  for (size_t j = 0; j < want.top_logprobs.size(); ++j) {
    EXPECT_EQ(got.top_logprobs[j].first, want.top_logprobs[j].first) << what << " top " << j;
    EXPECT_TRUE(logprob_close(got.top_logprobs[j].second, want.top_logprobs[j].second))
        << what << " top " << j << ": " << got.top_logprobs[j].second << ", host "
        << want.top_logprobs[j].second;
  }
}

}  // namespace megaserve::testing
