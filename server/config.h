// The server configuration: defaults, a protobuf text-format file (--config), and
// command-line flags overriding single fields (config_flags.h), checked once at startup.
#pragma once

#include <filesystem>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "proto/config.pb.h"

namespace megaserve::server {

// Every field the server needs, at its default. Fields a file or flag leaves alone keep
// these values: proto3 cannot tell "unset" from zero, so the defaults are filled in first
// and the file is merged on top.
config::ServerConfig default_server_config();

// default_server_config() with the text-format file merged on top; errors name the file
// and the line.
absl::StatusOr<config::ServerConfig> load_server_config(const std::filesystem::path& file);

// Checks values that would otherwise fail later and less clearly; errors name the field.
absl::Status validate_server_config(const config::ServerConfig& config);

}  // namespace megaserve::server
