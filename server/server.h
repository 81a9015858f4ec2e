// The running server: the gRPC service (with the standard health service and reflection),
// the OpenAI-compatible HTTP API when asked for, and the Prometheus endpoint around one
// engine, plus the drain sequence SIGTERM runs.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/engine.h"
#include "engine/model/chat_template.h"
#include "engine/model/tokenizer.h"
#include "grpcpp/grpcpp.h"
#include "proto/megaserve.pb.h"
#include "server/http_api.h"
#include "server/metrics.h"
#include "server/service.h"
#include "server/tokenizer_pool.h"

namespace megaserve::server {

// The model being served: an engine, its tokenizer and what GetModelInfo reports.
struct ServedModel {
  std::unique_ptr<engine::Engine> engine;
  std::unique_ptr<engine::Tokenizer> tokenizer;
  v1::ModelInfo info;  // max_model_len and vocab_size also bound requests
  std::vector<int32_t> eos_token_ids;
  // The model's chat template (null when it has none: Chat is then refused) and the
  // special tokens' text that templates see as bos_token / eos_token.
  std::shared_ptr<const engine::ChatTemplate> chat_template;
  std::optional<std::string> bos_token;
  std::optional<std::string> eos_token;
};

struct ServerOptions {
  std::string grpc_address = "127.0.0.1:0";  // port 0 picks a free port
  std::string metrics_address;               // empty: no metrics endpoint
  std::string http_address;                  // empty: no OpenAI-compatible HTTP API
};

class Server {
 public:
  static absl::StatusOr<std::unique_ptr<Server>> start(const ServerOptions& options,
                                                       ServedModel model);
  ~Server();

  int grpc_port() const { return grpc_port_; }
  int metrics_port() const { return metrics_http_ ? metrics_http_->port() : 0; }
  int http_port() const { return http_api_ ? http_api_->port() : 0; }
  engine::Engine& engine() { return *model_.engine; }

  // The SIGTERM sequence: health turns NOT_SERVING and new Generate calls (and HTTP
  // requests) get UNAVAILABLE (503); running requests may finish within `grace`, after which
  // the engine aborts the rest; then the gRPC, HTTP and metrics servers stop. Idempotent.
  void drain_and_stop(std::chrono::milliseconds grace);
  // Cuts a drain's grace period short (a second SIGTERM): drain_and_stop aborts what still
  // runs at once. Safe from any thread, before or during drain_and_stop.
  void end_grace_period();

 private:
  Server() = default;

  ServedModel model_;
  ServingContext context_;
  // Outlives the gRPC server: its jobs finish calls that Shutdown waits for.
  std::unique_ptr<TokenizerPool> tokenizer_pool_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<MetricsHttpServer> metrics_http_;
  std::unique_ptr<MegaserveService> service_;
  std::unique_ptr<grpc::Server> grpc_server_;
  std::unique_ptr<HttpApiServer> http_api_;  // goes before context_, which it uses
  int grpc_port_ = 0;
  bool stopped_ = false;
  std::atomic<bool> grace_ended_{false};
};

}  // namespace megaserve::server
