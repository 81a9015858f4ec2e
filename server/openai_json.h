// The JSON of the OpenAI-compatible HTTP API (http_api.h): request bodies parsed and checked
// into the gRPC service's own request messages, so that both APIs share validation, chat
// templates and generation; responses, stream chunks, the model list and error bodies
// formatted. No sockets and no engine: every function works on strings.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "proto/megaserve.pb.h"

namespace megaserve::server {

// One request of POST /v1/completions or POST /v1/chat/completions.
struct OpenAiRequest {
  std::string model;  // as given; empty when absent (then the served model)
  // /v1/completions: the prompt (text, or token ids) and the sampling parameters.
  v1::GenerateRequest generate;
  // /v1/chat/completions: the messages and the sampling parameters (generate stays empty;
  // chat_to_generate_request renders it).
  v1::ChatRequest chat;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage: a last chunk with usage
  bool echo = false;           // completions: the prompt's text comes before the completion
};

// Parse and check a request body. Errors are InvalidArgument naming the field (see
// openai_error_param). Fields megaserve cannot honour are refused rather than ignored: n,
// best_of other than 1, suffix, logit_bias, tools, a response_format other than text, and
// logprobs with echo (the engine computes no prompt logprobs). Logprobs become the gRPC
// request's params.logprobs (top-N): completions' `logprobs` (0..5), chat's `logprobs: true`
// with `top_logprobs` (0..20, only with logprobs true). Beyond OpenAI's fields the engine's
// own are accepted: top_k, min_p, repetition_penalty, min_tokens, ignore_eos, stop_token_ids.
absl::StatusOr<OpenAiRequest> parse_completion_request(std::string_view body);
absl::StatusOr<OpenAiRequest> parse_chat_request(std::string_view body);

// An error with OpenAI's `param` (the request field at fault) and `code` attached, read back
// by openai_error_body. Either may be empty (JSON null).
absl::Status openai_error(absl::StatusCode code, absl::string_view message, absl::string_view param,
                          absl::string_view error_code = "");
std::optional<std::string> openai_error_param(const absl::Status& status);
// An error of the validation shared with gRPC (request_validation.h), whose message starts
// with the gRPC field at fault, in OpenAI's terms: "text" and "token_ids" become "prompt",
// and a request field named first becomes the error's `param`.
absl::Status with_openai_param(const absl::Status& status);

// The HTTP status of an error: 400 for a request that is wrong (InvalidArgument,
// FailedPrecondition, OutOfRange), 404 NotFound, 429 ResourceExhausted (the waiting queue is
// full), 503 Unavailable (draining, or the engine failed), 500 otherwise.
int openai_http_status(const absl::Status& status);
// {"error": {"message", "type", "param", "code"}} for `status`.
std::string openai_error_body(const absl::Status& status);

// What every response and chunk of one request shares.
struct ResponseHeader {
  std::string id;       // "cmpl-..." or "chatcmpl-..."
  int64_t created = 0;  // Unix seconds
  std::string model;
};

struct UsageCounts {
  int prompt_tokens = 0;
  int completion_tokens = 0;
  int cached_prompt_tokens = 0;
};

// One generated token's logprobs as the OpenAI API reports them. A token is given as its
// bytes: one may hold part of a UTF-8 character, whose token string then shows U+FFFD while
// chat's "bytes" keeps the exact bytes.
struct TokenAlternative {
  std::string bytes;
  float logprob = 0.0f;
};
struct TokenLogprobs {
  std::string bytes;
  float logprob = 0.0f;
  std::vector<TokenAlternative> top;  // best first
};
// The logprobs of the tokens one response or chunk carries. Completions' text_offset: the
// first token's offset in the choice's text (the echoed prompt included), then each token's
// string length after the one before, counted in Unicode characters (what a client indexes
// the text by), as vLLM does.
struct LogprobsChunk {
  std::vector<TokenLogprobs> tokens;
  int64_t text_offset = 0;
};
// The characters a client reads in `bytes` (each byte that is not part of valid UTF-8 counts
// as one U+FFFD): how far a token, or echoed text, moves text_offset.
int64_t openai_text_length(std::string_view bytes);

// A fresh response id: `prefix` and 24 random hex digits.
std::string new_response_id(std::string_view prefix);

// Whole (non-streamed) responses. `finish_reason`: "stop" or "length". `logprobs`: null
// ("logprobs": null) unless the request asked for them.
std::string completion_response(const ResponseHeader& header, std::string_view text,
                                std::string_view finish_reason, const UsageCounts& usage,
                                const LogprobsChunk* logprobs = nullptr);
std::string chat_response(const ResponseHeader& header, std::string_view content,
                          std::string_view finish_reason, const UsageCounts& usage,
                          const LogprobsChunk* logprobs = nullptr);

// Server-sent events, each "data: {json}\n\n". With include_usage every chunk carries
// "usage": null and usage_chunk, after the chunk with the finish reason, the counts.
std::string completion_chunk(const ResponseHeader& header, std::string_view text,
                             std::optional<std::string_view> finish_reason, bool include_usage,
                             const LogprobsChunk* logprobs = nullptr);
// A chat chunk's delta: the role (first chunk) and/or content; neither on the last one.
std::string chat_chunk(const ResponseHeader& header, bool with_role,
                       std::optional<std::string_view> content,
                       std::optional<std::string_view> finish_reason, bool include_usage,
                       const LogprobsChunk* logprobs = nullptr);
std::string usage_chunk(const ResponseHeader& header, bool chat, const UsageCounts& usage);
// An error in the middle of a stream, after the 200 went out: {"error": {...}} as one event.
std::string error_event(const absl::Status& status);
inline constexpr std::string_view kDoneEvent = "data: [DONE]\n\n";

// GET /v1/models (a list of the one served model) and GET /v1/models/{model}.
std::string model_list(std::string_view model, int64_t created, int max_model_len);
std::string model_object(std::string_view model, int64_t created, int max_model_len);

}  // namespace megaserve::server
