#include "server/http_listener.h"

#include <sys/socket.h>

#include <chrono>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "httplib.h"
#include "server/listen_address.h"

namespace megaserve::server {

absl::StatusOr<std::unique_ptr<HttpListener>> HttpListener::start(
    std::unique_ptr<httplib::Server> http, const std::string& address, const std::string& field) {
  auto host_port = parse_listen_address(address, field);
  if (!host_port.ok()) return host_port.status();
  std::unique_ptr<HttpListener> listener(new HttpListener());
  listener->http_ = std::move(http);
  httplib::Server& server = *listener->http_;
  // The socket httplib binds is the last one it hands to the options callback.
  auto listening_socket = std::make_shared<int>(-1);
  server.set_socket_options([listening_socket](int sock) {
    const int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
    *listening_socket = sock;
  });
  const std::string& host = host_port->host;
  const int port = host_port->port;
  if (port == 0) {
    listener->port_ = server.bind_to_any_port(host);
  } else {
    listener->port_ = server.bind_to_port(host, port) ? port : -1;
  }
  if (listener->port_ <= 0) {
    const std::string why = why_cannot_listen(*host_port);
    return absl::UnavailableError(
        absl::StrCat(field, " ", address, ": cannot listen: ", why.empty() ? "bind failed" : why));
  }
  // httplib listens with a backlog of 5: a burst of new connections beyond it has its SYNs
  // dropped, and each such client waits a second to retry (7 streams started at once took
  // 1 s instead of 40 ms). Listening again on the socket only raises the backlog.
  if (*listening_socket >= 0) ::listen(*listening_socket, SOMAXCONN);
  listener->thread_ = std::thread([&server] { server.listen_after_bind(); });
  // httplib's stop() does nothing before listening began; wait for it so that stop()
  // always ends the listener.
  for (int i = 0; i < 2000 && !server.is_running(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return listener;
}

void HttpListener::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  http_->stop();
  if (thread_.joinable()) thread_.join();
}

HttpListener::~HttpListener() { stop(); }

}  // namespace megaserve::server
