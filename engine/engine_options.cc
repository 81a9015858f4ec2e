#include "engine/engine_options.h"

#include "absl/strings/str_cat.h"

namespace megaserve::engine {

absl::Status check_engine_options(const ModelConfig& model, const EngineOptions& options) {
  if (options.max_model_len < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_model_len must be >= 0 (0: the model's max_position_embeddings), got ",
                     options.max_model_len));
  }
  if (options.max_model_len > model.max_position_embeddings) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_model_len ", options.max_model_len,
                     " exceeds the model's max_position_embeddings ", model.max_position_embeddings,
                     "; use 0 for ", model.max_position_embeddings, " or a smaller value"));
  }
  const struct {
    const char* name;
    int32_t value;
  } counts[] = {{"max_num_seqs", options.max_num_seqs},
                {"max_num_batched_tokens", options.max_num_batched_tokens},
                {"max_waiting_requests", options.max_waiting_requests}};
  for (const auto& count : counts) {
    if (count.value < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat(count.name, " must be >= 1, got ", count.value));
    }
  }
  if (options.max_prefill_tokens_with_decodes < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_prefill_tokens_with_decodes must be >= 0, got ",
                     options.max_prefill_tokens_with_decodes));
  }
  return check_trace_options(options.trace);
}

}  // namespace megaserve::engine
