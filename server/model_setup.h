// Turns a ServerConfig into what the server serves: the model's config and tokenizer, a
// backend (chosen by engine/backend_choice.h) and the engine over it.
#pragma once

#include "absl/status/statusor.h"
#include "proto/config.pb.h"
#include "server/server.h"

namespace megaserve::server {

absl::StatusOr<ServedModel> setup_model(const config::ServerConfig& config);

}  // namespace megaserve::server
