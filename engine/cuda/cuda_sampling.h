// Host side of the device's sampling (kernels/op_sample.cuh): per sampling row of a step,
// the parameters and the context the sample op needs (kernels::DeviceSampling), packed for
// the step's upload, and the sampled tokens rebuilt from what the op wrote back. The op
// follows engine/isa/sampling.h; this file only moves data.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "engine/isa/step.h"
#include "kernels/megakernel.h"
#include "scheduler/step_plan.h"

namespace megaserve::engine {

// One step's sampling data for the device.
struct SamplingUpload {
  std::vector<kernels::DeviceSampling> rows;  // [num_samples]
  // The rows' id ranges (kernels::DeviceSampling): distinct prompt and output ids (only
  // when repetition_penalty != 1), (output id, count) pairs (only when a frequency or
  // presence penalty is set), banned ids; ids outside the vocabulary are left out, as
  // sample_token ignores them.
  std::vector<int32_t> ids;
  int32_t scratch_rows = 0;  // rows with penalties or banned ids (DeviceSampling::scratch_row)
  bool any_logprobs = false;
};

// The device reports at most kernels::kMaxTopLogprobs top logprobs per row (the server's
// limit): a sampling request asking for more is refused, naming it.
absl::Status check_device_sampling(const Step& step);

SamplingUpload pack_sampling(const StepMetadata& meta, int32_t vocab_size);

// Sampling row `s`'s token from the device's outputs: its id and logprob, and the first
// min(logprobs, vocab) entries of its [kMaxTopLogprobs] top ids and logprobs.
scheduler::SampledToken unpack_sample(const kernels::DeviceSampling& row, int32_t vocab_size,
                                      int32_t token_id, float logprob,
                                      std::span<const int32_t> top_ids,
                                      std::span<const float> top_logprobs);

}  // namespace megaserve::engine
