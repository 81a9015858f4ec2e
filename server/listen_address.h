// Listen addresses of the server's two endpoints ("host:port"), checked before anything
// binds, and the reason a bind failed, asked of the kernel (gRPC and httplib only say that
// it failed).
#pragma once

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace megaserve::server {

struct HostPort {
  std::string host;  // without the brackets of "[::1]:port"
  int port = 0;      // 0: the kernel picks a free port
};

// Splits "host:port"; InvalidArgument naming `field` unless the port is a number in
// [0, 65535] (gRPC would otherwise wrap 99999 to 34463, silently).
absl::StatusOr<HostPort> parse_listen_address(const std::string& address, const std::string& field);

// Why a listening TCP socket on `address` cannot be opened now (strerror text, e.g.
// "Address already in use"), or "" when it can. Binds with SO_REUSEADDR only, as our
// listeners do, and closes the socket again.
std::string why_cannot_listen(const HostPort& address);

}  // namespace megaserve::server
