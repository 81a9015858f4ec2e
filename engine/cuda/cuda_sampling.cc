#include "engine/cuda/cuda_sampling.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace megaserve::engine {

absl::Status check_device_sampling(const Step& step) {
  const StepMetadata& m = step.meta;
  for (int32_t s = 0; s < m.num_samples(); ++s) {
    const RequestSampling& r = m.requests[m.sample_request[s]];
    if (r.params.logprobs > kernels::kMaxTopLogprobs) {
      return absl::InvalidArgumentError(absl::StrCat(
          "step ", step.step_id, " request ", r.request_id, ": logprobs ", r.params.logprobs,
          " exceeds the ", kernels::kMaxTopLogprobs, " top logprobs the cuda backend reports"));
    }
  }
  return absl::OkStatus();
}

SamplingUpload pack_sampling(const StepMetadata& meta, int32_t vocab_size) {
  SamplingUpload up;
  const int S = meta.num_samples();
  up.rows.resize(S);
  const auto in_vocab = [vocab_size](int32_t id) { return id >= 0 && id < vocab_size; };
  std::vector<int32_t> sorted;
  for (int s = 0; s < S; ++s) {
    const RequestSampling& r = meta.requests[meta.sample_request[s]];
    const scheduler::SamplingParams& p = r.params;
    kernels::DeviceSampling& d = up.rows[s];
    d.temperature = p.temperature;
    d.top_p = p.top_p;
    d.min_p = p.min_p;
    d.top_k = p.top_k;
    d.repetition_penalty = p.repetition_penalty;
    d.frequency_penalty = p.frequency_penalty;
    d.presence_penalty = p.presence_penalty;
    d.logprobs = std::clamp(p.logprobs, 0, kernels::kMaxTopLogprobs);
    d.seed = r.seed;
    d.token_index = r.output_token_index;
    up.any_logprobs |= d.logprobs > 0;

    // Step 1: each distinct prompt or output id once.
    d.repeat_begin = static_cast<int32_t>(up.ids.size());
    if (p.repetition_penalty != 1.0f) {
      sorted.assign(r.prompt_token_ids.begin(), r.prompt_token_ids.end());
      sorted.insert(sorted.end(), r.output_token_ids.begin(), r.output_token_ids.end());
      std::erase_if(sorted, [&](int32_t id) { return !in_vocab(id); });
      std::sort(sorted.begin(), sorted.end());
      sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
      up.ids.insert(up.ids.end(), sorted.begin(), sorted.end());
    }
    // Step 2: (id, count) over the output.
    d.count_begin = static_cast<int32_t>(up.ids.size());
    if (p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f) {
      sorted.assign(r.output_token_ids.begin(), r.output_token_ids.end());
      std::erase_if(sorted, [&](int32_t id) { return !in_vocab(id); });
      std::sort(sorted.begin(), sorted.end());
      for (size_t run = 0; run < sorted.size();) {
        size_t end = run;
        while (end < sorted.size() && sorted[end] == sorted[run]) ++end;
        up.ids.push_back(sorted[run]);
        up.ids.push_back(static_cast<int32_t>(end - run));
        run = end;
      }
    }
    // Step 3.
    d.banned_begin = static_cast<int32_t>(up.ids.size());
    for (int32_t id : r.banned_token_ids) {
      if (in_vocab(id)) up.ids.push_back(id);
    }
    d.banned_end = static_cast<int32_t>(up.ids.size());
    d.scratch_row = d.banned_end > d.repeat_begin ? up.scratch_rows++ : -1;
  }
  return up;
}

scheduler::SampledToken unpack_sample(const kernels::DeviceSampling& row, int32_t vocab_size,
                                      int32_t token_id, float logprob,
                                      std::span<const int32_t> top_ids,
                                      std::span<const float> top_logprobs) {
  scheduler::SampledToken tok;
  tok.token_id = token_id;
  tok.logprob = logprob;
  const size_t n =
      std::min<size_t>({static_cast<size_t>(std::max(row.logprobs, 0)),
                        static_cast<size_t>(vocab_size), top_ids.size(), top_logprobs.size()});
  tok.top_logprobs.reserve(n);
  for (size_t j = 0; j < n; ++j) tok.top_logprobs.emplace_back(top_ids[j], top_logprobs[j]);
  return tok;
}

}  // namespace megaserve::engine
