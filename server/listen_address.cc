#include "server/listen_address.h"

#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace megaserve::server {

absl::StatusOr<HostPort> parse_listen_address(const std::string& address,
                                              const std::string& field) {
  const size_t colon = address.rfind(':');
  const std::string digits = colon == std::string::npos ? "" : address.substr(colon + 1);
  int port = -1;
  const bool all_digits =
      !digits.empty() && digits.find_first_not_of("0123456789") == std::string::npos;
  if (colon == std::string::npos || colon == 0 || !all_digits || !absl::SimpleAtoi(digits, &port) ||
      port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, " must be host:port with a port in [0, 65535] (0: any free port), got \"", address,
        "\""));
  }
  HostPort out;
  out.host = address.substr(0, colon);
  if (out.host.size() > 2 && out.host.front() == '[' && out.host.back() == ']') {
    out.host = out.host.substr(1, out.host.size() - 2);
  }
  out.port = port;
  return out;
}

std::string why_cannot_listen(const HostPort& address) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* found = nullptr;
  const std::string port = std::to_string(address.port);
  const char* host = address.host.empty() ? nullptr : address.host.c_str();
  if (const int rc = getaddrinfo(host, port.c_str(), &hints, &found); rc != 0) {
    return gai_strerror(rc);
  }
  std::string why;
  for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
    const int fd = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
    if (fd < 0) {
      why = std::strerror(errno);
      continue;
    }
    const int yes = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
    const bool ok = bind(fd, a->ai_addr, a->ai_addrlen) == 0 && listen(fd, 1) == 0;
    if (!ok) why = std::strerror(errno);
    close(fd);
    if (ok) {
      why.clear();
      break;
    }
  }
  freeaddrinfo(found);
  return why;
}

}  // namespace megaserve::server
