// The check of EngineOptions against the model, made where the engine is created
// (Engine::create), so that every caller, not only the server's flags, gets it.
#pragma once

#include "absl/status/status.h"
#include "engine/engine.h"
#include "engine/model/model_config.h"

namespace megaserve::engine {

// InvalidArgument naming the option and both values when `options` cannot serve `model`:
// a max_model_len beyond the model's max_position_embeddings (positions it was never
// trained for; vLLM refuses it too) or negative, or a max_num_seqs, max_num_batched_tokens
// or max_waiting_requests below 1, or trace options out of range (check_trace_options).
absl::Status check_engine_options(const ModelConfig& model, const EngineOptions& options);

}  // namespace megaserve::engine
