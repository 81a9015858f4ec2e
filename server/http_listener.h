// A cpp-httplib server bound to a listen address and serving on its own thread; the metrics
// endpoint and the OpenAI-compatible API each have one. The socket does not set SO_REUSEPORT
// (httplib's default does): a second server on a port in use must fail to start, not share
// the port and split the traffic.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/statusor.h"

namespace httplib {
class Server;
}

namespace megaserve::server {

class HttpListener {
 public:
  // Binds `http` (its routes set) to `address`, "host:port" (port 0 picks a free one), and
  // serves. Errors name `field`, the configuration field the address came from.
  static absl::StatusOr<std::unique_ptr<HttpListener>> start(std::unique_ptr<httplib::Server> http,
                                                             const std::string& address,
                                                             const std::string& field);
  ~HttpListener();
  int port() const { return port_; }
  // Closes the listening socket and waits for the connections in progress. Idempotent.
  void stop();

 private:
  HttpListener() = default;

  std::unique_ptr<httplib::Server> http_;
  std::thread thread_;
  std::mutex mu_;
  bool stopping_ = false;
  int port_ = 0;
};

}  // namespace megaserve::server
