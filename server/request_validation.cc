#include "server/request_validation.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "absl/strings/str_cat.h"

namespace megaserve::server {
namespace {

absl::Status check_token_ids(const google::protobuf::RepeatedField<int32_t>& ids, const char* field,
                             int vocab_size) {
  for (int i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, "[", i, "] = ", ids[i], " is outside the vocabulary [0, ", vocab_size, ")"));
    }
  }
  return absl::OkStatus();
}

// A float field in [lo, hi] (or (lo, hi] when `open_low`), and finite.
absl::Status check_range(const char* field, float value, float lo, float hi, bool open_low) {
  const bool low_ok = open_low ? value > lo : value >= lo;
  if (!std::isfinite(value) || !low_ok || value > hi) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " must be in ", open_low ? "(" : "[", lo, ", ", hi, "], got ", value));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<scheduler::SamplingParams> to_sampling_params(const v1::SamplingParameters& p,
                                                             int prompt_tokens,
                                                             const RequestLimits& limits) {
  scheduler::SamplingParams out;
  if (p.has_temperature()) {
    if (!std::isfinite(p.temperature()) || p.temperature() < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("temperature must be >= 0 (0 is greedy), got ", p.temperature()));
    }
    out.temperature = p.temperature();
  }
  if (p.has_top_p()) {
    if (auto s = check_range("top_p", p.top_p(), 0.0f, 1.0f, true); !s.ok()) return s;
    out.top_p = p.top_p();
  }
  if (p.has_top_k()) {
    if (p.top_k() < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("top_k must be >= 0 (0 is off), got ", p.top_k()));
    }
    out.top_k = p.top_k();
  }
  if (p.has_min_p()) {
    if (auto s = check_range("min_p", p.min_p(), 0.0f, 1.0f, false); !s.ok()) return s;
    out.min_p = p.min_p();
  }
  if (p.has_repetition_penalty()) {
    if (auto s = check_range("repetition_penalty", p.repetition_penalty(), 0.0f,
                             kMaxRepetitionPenalty, true);
        !s.ok()) {
      return s;
    }
    out.repetition_penalty = p.repetition_penalty();
  }
  if (p.has_frequency_penalty()) {
    if (auto s = check_range("frequency_penalty", p.frequency_penalty(), -kMaxAbsFrequencyPenalty,
                             kMaxAbsFrequencyPenalty, false);
        !s.ok()) {
      return s;
    }
    out.frequency_penalty = p.frequency_penalty();
  }
  if (p.has_presence_penalty()) {
    if (auto s = check_range("presence_penalty", p.presence_penalty(), -kMaxAbsPresencePenalty,
                             kMaxAbsPresencePenalty, false);
        !s.ok()) {
      return s;
    }
    out.presence_penalty = p.presence_penalty();
  }
  if (p.has_seed()) out.seed = p.seed();

  if (prompt_tokens >= limits.max_model_len) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt has ", prompt_tokens, " tokens; the model's context is ",
                     limits.max_model_len, " tokens, which leaves no room to generate"));
  }
  const int room = limits.max_model_len - prompt_tokens;
  if (p.has_max_tokens()) {
    if (p.max_tokens() < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("max_tokens must be >= 1, got ", p.max_tokens()));
    }
    if (p.max_tokens() > room) {
      return absl::InvalidArgumentError(
          absl::StrCat("prompt has ", prompt_tokens, " tokens and max_tokens is ", p.max_tokens(),
                       ": ", int64_t{prompt_tokens} + p.max_tokens(),  // past INT32_MAX
                       " tokens exceed the model's context of ", limits.max_model_len, " tokens"));
    }
    out.max_tokens = p.max_tokens();
  } else {
    out.max_tokens = std::min(kDefaultMaxTokens, room);
  }
  if (p.has_min_tokens()) {
    if (p.min_tokens() < 0 || p.min_tokens() > out.max_tokens) {
      return absl::InvalidArgumentError(absl::StrCat(
          "min_tokens must be in [0, max_tokens = ", out.max_tokens, "], got ", p.min_tokens()));
    }
    out.min_tokens = p.min_tokens();
  }
  for (int i = 0; i < p.stop_size(); ++i) {
    if (p.stop(i).empty()) {
      return absl::InvalidArgumentError(absl::StrCat("stop[", i, "] is an empty string"));
    }
    out.stop_strings.push_back(p.stop(i));
  }
  if (auto s = check_token_ids(p.stop_token_ids(), "stop_token_ids", limits.vocab_size); !s.ok()) {
    return s;
  }
  out.stop_token_ids.assign(p.stop_token_ids().begin(), p.stop_token_ids().end());
  if (p.has_ignore_eos()) out.ignore_eos = p.ignore_eos();
  if (p.has_logprobs()) {
    if (p.logprobs() < 0 || p.logprobs() > kMaxLogprobs) {
      return absl::InvalidArgumentError(
          absl::StrCat("logprobs must be in [0, ", kMaxLogprobs, "], got ", p.logprobs()));
    }
    out.logprobs = p.logprobs();
  }
  return out;
}

int64_t max_prompt_text_bytes(int max_model_len, int64_t max_input_bytes_per_token) {
  if (max_input_bytes_per_token <= 0 || max_model_len <= 0) return 0;
  return std::max<int64_t>(int64_t{max_model_len} - 1, 0) * max_input_bytes_per_token;
}

absl::Status check_text_size(const v1::GenerateRequest& request, const engine::Tokenizer& tokenizer,
                             const RequestLimits& limits) {
  if (request.input_case() != v1::GenerateRequest::kText || limits.max_text_bytes <= 0) {
    return absl::OkStatus();
  }
  const auto bytes = static_cast<int64_t>(request.text().size());
  if (bytes <= limits.max_text_bytes) return absl::OkStatus();
  const int64_t countable = tokenizer.countable_bytes(request.text());
  if (countable <= limits.max_text_bytes) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "text is ", bytes, " bytes",
      countable < bytes ? absl::StrCat(" (", countable,
                                       " not counting the spaces the tokenizer "
                                       "folds)")
                        : "",
      "; at most ", limits.max_text_bytes, " bytes can fit the model's context of ",
      limits.max_model_len, " tokens (no token of this tokenizer stands for more than ",
      limits.max_text_bytes / std::max(limits.max_model_len - 1, 1), " bytes)"));
}

absl::StatusOr<engine::GenerateRequest> to_engine_request(const v1::GenerateRequest& request,
                                                          const engine::Tokenizer& tokenizer,
                                                          const RequestLimits& limits) {
  if (absl::Status size = check_text_size(request, tokenizer, limits); !size.ok()) return size;
  engine::GenerateRequest out;
  switch (request.input_case()) {
    case v1::GenerateRequest::kText:
      if (request.text().empty()) {
        return absl::InvalidArgumentError("text is empty: the prompt needs at least one token");
      }
      out.prompt_token_ids =
          tokenizer.encode(request.text(), request.has_add_bos() ? request.add_bos() : true);
      if (out.prompt_token_ids.empty()) {
        return absl::InvalidArgumentError("text encodes to no tokens");
      }
      break;
    case v1::GenerateRequest::kTokenIds:
      if (request.token_ids().ids().empty()) {
        return absl::InvalidArgumentError(
            "token_ids is empty: the prompt needs at least one token");
      }
      if (auto s = check_token_ids(request.token_ids().ids(), "token_ids", limits.vocab_size);
          !s.ok()) {
        return s;
      }
      out.prompt_token_ids.assign(request.token_ids().ids().begin(),
                                  request.token_ids().ids().end());
      break;
    case v1::GenerateRequest::INPUT_NOT_SET:
      return absl::InvalidArgumentError("input is not set: give text or token_ids");
  }
  auto sampling =
      to_sampling_params(request.params(), static_cast<int>(out.prompt_token_ids.size()), limits);
  if (!sampling.ok()) return sampling.status();
  out.sampling = *std::move(sampling);
  out.priority = request.priority();
  return out;
}

}  // namespace megaserve::server
