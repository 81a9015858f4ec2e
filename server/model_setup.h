// Turns a ServerConfig into what the server serves: the model's config and tokenizer, a
// backend (CUDA when asked for or, with "auto", when a supported GPU is present; else the
// CPU interpreter), and the engine over it. Logs what it chose and why.
#pragma once

#include "absl/status/statusor.h"
#include "proto/config.pb.h"
#include "server/server.h"

namespace megaserve::server {

absl::StatusOr<ServedModel> setup_model(const config::ServerConfig& config);

// KV blocks that fit in `mib` MiB of fp32 K and V for every layer (the CPU backend's cache).
int32_t cpu_kv_blocks_for(const engine::ModelConfig& model, int32_t kv_block_size, uint32_t mib);

}  // namespace megaserve::server
