#include "server/server.h"

#include <memory>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "server/listen_address.h"
#include "server/raw_messages.h"
#include "spdlog/spdlog.h"

namespace megaserve::server {
namespace {

using Clock = std::chrono::steady_clock;

// Polls `done` every millisecond until it holds or `deadline` passes.
template <typename Done>
bool wait_until(Done done, Clock::time_point deadline) {
  while (!done()) {
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Server>> Server::start(const ServerOptions& options,
                                                      ServedModel model) {
  auto grpc_address = parse_listen_address(options.grpc_address, "grpc_address");
  if (!grpc_address.ok()) return grpc_address.status();
  std::unique_ptr<Server> server(new Server());
  server->model_ = std::move(model);
  engine::Engine* engine = server->model_.engine.get();
  ServingContext& context = server->context_;
  context.engine = engine;
  context.tokenizer = server->model_.tokenizer.get();
  context.model_info = server->model_.info;
  context.limits.vocab_size = server->model_.info.vocab_size();
  context.limits.max_model_len = server->model_.info.max_model_len();
  if (context.tokenizer != nullptr) {
    context.limits.max_text_bytes = max_prompt_text_bytes(
        context.limits.max_model_len, context.tokenizer->max_input_bytes_per_token());
  }
  server->tokenizer_pool_ = std::make_unique<TokenizerPool>();
  context.tokenizer_pool = server->tokenizer_pool_.get();
  context.eos_token_ids = server->model_.eos_token_ids;
  context.chat_template = server->model_.chat_template;
  context.bos_token = server->model_.bos_token;
  context.eos_token = server->model_.eos_token;

  auto stats = [engine] { return engine->stats(); };
  server->metrics_ = std::make_unique<Metrics>(stats);
  context.metrics = server->metrics_.get();
  // Cleared in ~Server, before metrics_ goes.
  engine->set_step_observer([m = server->metrics_.get()](double s) { m->observe_step(s); });
  if (!options.metrics_address.empty()) {
    auto http = MetricsHttpServer::start(options.metrics_address, server->metrics_.get());
    if (!http.ok()) return http.status();
    server->metrics_http_ = *std::move(http);
  }

  route_protobuf_log_to_spdlog();  // before any request is parsed
  server->service_ = std::make_unique<MegaserveService>(&context);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  // gRPC sets SO_REUSEPORT by default: a second server on the port would start and take
  // half the connections. Without it, binding fails and we say why.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.AddListeningPort(options.grpc_address, grpc::InsecureServerCredentials(),
                           &server->grpc_port_);
  builder.RegisterService(server->service_.get());
  server->grpc_server_ = builder.BuildAndStart();
  if (server->grpc_server_ == nullptr || server->grpc_port_ == 0) {
    const std::string why = why_cannot_listen(*grpc_address);
    return absl::UnavailableError(
        absl::StrCat("grpc_address ", options.grpc_address,
                     ": cannot listen: ", why.empty() ? "bind failed" : why));
  }
  // Probes may name the service (Envoy, Kubernetes gRPC probes with `service`): "" and
  // megaserve.v1.Megaserve report the same status.
  grpc::HealthCheckServiceInterface* health = server->grpc_server_->GetHealthCheckService();
  health->SetServingStatus(true);
  health->SetServingStatus(v1::Megaserve::service_full_name(), true);
  if (!options.http_address.empty()) {
    auto http = HttpApiServer::start(options.http_address, &server->context_);
    if (!http.ok()) return http.status();
    server->http_api_ = *std::move(http);
  }
  return server;
}

void Server::drain_and_stop(std::chrono::milliseconds grace) {
  if (stopped_ || grpc_server_ == nullptr) return;
  stopped_ = true;
  context_.draining.store(true);
  grpc::HealthCheckServiceInterface* health = grpc_server_->GetHealthCheckService();
  health->SetServingStatus(false);
  health->SetServingStatus(v1::Megaserve::service_full_name(), false);
  engine::Engine& engine = *model_.engine;
  const auto idle = [&engine] {
    const engine::EngineStats stats = engine.stats();
    return stats.waiting == 0 && stats.running == 0;
  };
  const bool finished_in_time =
      wait_until([&] { return idle() || grace_ended_.load(); }, Clock::now() + grace) && idle();
  if (finished_in_time) {
    spdlog::info("drain: every request finished within the grace period");
  } else if (grace_ended_.load()) {
    const engine::EngineStats stats = engine.stats();
    spdlog::warn("drain: grace period ended early, aborting {} running and {} waiting requests",
                 stats.running, stats.waiting);
  } else {
    const engine::EngineStats stats = engine.stats();
    spdlog::warn("drain: grace period over, aborting {} running and {} waiting requests",
                 stats.running, stats.waiting);
  }
  engine.drain(/*abort_all=*/!finished_in_time);
  // Let the streams deliver their last messages (aborted ones say FINISH_REASON_ABORT).
  if (!wait_until([this] { return context_.active_streams.load() == 0; },
                  Clock::now() + std::chrono::seconds(2))) {
    spdlog::warn("drain: {} streams still open; cancelling them", context_.active_streams.load());
  }
  grpc_server_->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(500));
  grpc_server_->Wait();
  if (http_api_) http_api_->stop();
  if (metrics_http_) metrics_http_->stop();
}

void Server::end_grace_period() { grace_ended_.store(true); }

Server::~Server() {
  drain_and_stop(std::chrono::milliseconds(0));
  if (model_.engine != nullptr) model_.engine->set_step_observer(nullptr);
}

}  // namespace megaserve::server
