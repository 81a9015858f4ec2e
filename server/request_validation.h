// Turns a megaserve.v1.GenerateRequest into the engine's GenerateRequest, checking every
// field on the way. A bad value gives InvalidArgument whose message names the field and
// the allowed range, so the client can fix its request without reading server logs.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/engine.h"
#include "engine/model/tokenizer.h"
#include "proto/megaserve.pb.h"
#include "scheduler/sampling_params.h"

namespace megaserve::server {

// Field ranges, shared by the validation and its documentation in proto/megaserve.proto.
inline constexpr float kMaxRepetitionPenalty = 10.0f;
inline constexpr float kMaxAbsFrequencyPenalty = 2.0f;
inline constexpr float kMaxAbsPresencePenalty = 2.0f;
inline constexpr int kMaxLogprobs = 20;
inline constexpr int kDefaultMaxTokens = 16;

struct RequestLimits {
  int vocab_size = 0;
  int max_model_len = 0;  // prompt + max_tokens must fit
  // A text prompt longer than this many bytes can never fit max_model_len and is refused
  // without being tokenized (see max_prompt_text_bytes); 0: no such bound.
  int64_t max_text_bytes = 0;
};

// The longest text, in bytes, whose prompt can fit `max_model_len`: a prompt may have at
// most max_model_len - 1 tokens (one position is left to generate) and a token stands for at
// most `max_input_bytes_per_token` bytes (Tokenizer::max_input_bytes_per_token()), so a
// longer text has too many tokens whatever they are. 0 (no bound) when the tokenizer gives
// none. In 64 bits: 2^31 positions times a long piece overflows 32.
int64_t max_prompt_text_bytes(int max_model_len, int64_t max_input_bytes_per_token);

// The byte-length check of a text prompt alone, before tokenizing (one pass over the bytes,
// Tokenizer::countable_bytes): InvalidArgument naming `text`, its size and the bound.
absl::Status check_text_size(const v1::GenerateRequest& request, const engine::Tokenizer& tokenizer,
                             const RequestLimits& limits);

// Checks `params` and fills the engine's SamplingParams. `prompt_tokens` is needed for the
// context-length check and for the default max_tokens (16, or what still fits).
absl::StatusOr<scheduler::SamplingParams> to_sampling_params(const v1::SamplingParameters& params,
                                                             int prompt_tokens,
                                                             const RequestLimits& limits);

// Checks the text's size (check_text_size), tokenizes or checks the prompt, then the
// sampling parameters.
absl::StatusOr<engine::GenerateRequest> to_engine_request(const v1::GenerateRequest& request,
                                                          const engine::Tokenizer& tokenizer,
                                                          const RequestLimits& limits);

}  // namespace megaserve::server
