// The OpenAI-compatible HTTP API beside gRPC, on the same engine and ServingContext:
//   POST /v1/completions       a prompt (text or token ids) -> its completion
//   POST /v1/chat/completions  messages -> the model's chat template (the Chat RPC's code)
//                              -> the assistant's reply
//   GET  /v1/models, GET /v1/models/{model}
// With "stream": true the two generation routes send server-sent events ("data: {json}",
// then "data: [DONE]"). Errors are OpenAI's {"error": {...}} bodies (openai_json.h). A client
// that disconnects aborts its request in the engine. cpp-httplib gives each connection a
// worker thread, which blocks on its request (BlockingGeneration); gRPC's threads are not
// involved.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "server/http_listener.h"
#include "server/service.h"

namespace megaserve::server {

class HttpApiServer {
 public:
  // Connections served at once, each holding a worker thread while its request runs or it
  // idles between requests (keep-alive); further connections wait for a free worker.
  static constexpr int kWorkers = 256;

  // Serves on `address` ("host:port"; port 0 picks a free one). `context` must outlive it.
  static absl::StatusOr<std::unique_ptr<HttpApiServer>> start(const std::string& address,
                                                              ServingContext* context);
  int port() const { return listener_->port(); }
  // Stops accepting and waits for the connections in progress (a stream still running is
  // cut). Idempotent.
  void stop() { listener_->stop(); }

 private:
  HttpApiServer() = default;

  std::unique_ptr<HttpListener> listener_;
};

}  // namespace megaserve::server
