// Command-line flags that override single ServerConfig fields. Each flag is optional: only
// the flags given on the command line change the configuration.
#pragma once

#include "absl/status/status.h"
#include "proto/config.pb.h"

namespace megaserve::server {

// Applies the flags that were given to `config`.
void apply_flag_overrides(config::ServerConfig* config);

}  // namespace megaserve::server
