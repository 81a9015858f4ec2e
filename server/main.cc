// megaserve: the inference server. Configuration comes from --config (a ServerConfig in
// protobuf text format, e.g. configs/default.textproto) with flags overriding single fields;
// `megaserve --help` lists them. SIGTERM or SIGINT drains (see Server::drain_and_stop) and
// exits 0, a second one during the drain aborts what still runs at once; an engine that turns
// unhealthy (a failed step) exits 1 so a supervisor restarts it.
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <ctime>
#include <future>
#include <new>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "server/config.h"
#include "server/config_flags.h"
#include "server/flag_spelling.h"
#include "server/model_setup.h"
#include "server/server.h"
#include "spdlog/spdlog.h"

ABSL_FLAG(std::string, config, "",
          "ServerConfig text file (e.g. configs/default.textproto); flags override its fields");

namespace megaserve::server {
namespace {

const char* signal_name(int signal) { return signal == SIGTERM ? "SIGTERM" : "SIGINT"; }

int serve(int argc, char** argv) {
  // Every thread started from here on inherits the blocked signals; main alone takes them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  // --help lists this program's flags (Abseil's default matches the program's file name).
  absl::FlagsUsageConfig usage_config;
  usage_config.contains_help_flags = [](absl::string_view file) {
    return absl::StrContains(file, "server/");
  };
  usage_config.contains_helpshort_flags = usage_config.contains_help_flags;
  absl::SetFlagsUsageConfig(usage_config);
  absl::SetProgramUsageMessage(
      "LLM inference server (gRPC). Usage: megaserve [--config=FILE] "
      "[--model=HF_MODEL_DIR] [--grpc_address=HOST:PORT] ...");
  FlagSpelling spelling(argc, argv);
  absl::ParseCommandLine(spelling.argc(), spelling.argv());

  config::ServerConfig config = default_server_config();
  if (const std::string file = absl::GetFlag(FLAGS_config); !file.empty()) {
    auto loaded = load_server_config(file);
    if (!loaded.ok()) {
      spdlog::error("{}", loaded.status().ToString());
      return 2;
    }
    config = *std::move(loaded);
  }
  apply_flag_overrides(&config);
  if (absl::Status valid = validate_server_config(config); !valid.ok()) {
    spdlog::error("configuration: {}", std::string(valid.message()));
    return 2;
  }
  spdlog::set_level(spdlog::level::from_str(config.logging().level()));
  if (!config.logging().pattern().empty()) spdlog::set_pattern(config.logging().pattern());

  absl::StatusOr<ServedModel> model;
  try {
    model = setup_model(config);
  } catch (const std::bad_alloc&) {
    // setup_model checks the large allocations against the memory available; this is the
    // rest (a limit reached on the way), still an error with a message, not SIGABRT.
    model = absl::ResourceExhaustedError(
        "out of memory while loading the model (std::bad_alloc); see the sizes above");
  }
  if (!model.ok()) {
    spdlog::error("model: {}", model.status().ToString());
    return 1;
  }
  ServerOptions options;
  options.grpc_address = config.endpoints().grpc_address();
  options.metrics_address = config.endpoints().metrics_address();
  options.http_address = config.endpoints().http_address();
  auto server = Server::start(options, *std::move(model));
  if (!server.ok()) {
    spdlog::error("{}", server.status().ToString());
    return 1;
  }
  spdlog::info("serving gRPC on {} (port {}){}", options.grpc_address, (*server)->grpc_port(),
               options.metrics_address.empty()
                   ? ", metrics off"
                   : fmt::format(", Prometheus metrics on http://{}/metrics (port {})",
                                 options.metrics_address, (*server)->metrics_port()));
  if (!options.http_address.empty()) {
    spdlog::info("serving the OpenAI-compatible HTTP API on http://{}/v1 (port {})",
                 options.http_address, (*server)->http_port());
  }

  const auto grace = std::chrono::seconds(config.drain_grace_seconds());
  const timespec poll{0, 100'000'000};  // check the engine's health every 100 ms
  while (true) {
    const int signal = sigtimedwait(&signals, nullptr, &poll);
    if (signal == SIGTERM || signal == SIGINT) {
      spdlog::info("{}: draining (grace period {} s; send it again to abort now)",
                   signal_name(signal), config.drain_grace_seconds());
      Server* running = server->get();
      auto drained =
          std::async(std::launch::async, [running, grace] { running->drain_and_stop(grace); });
      // An operator who signals again does not want to wait out the grace period.
      bool cut_short = false;
      while (drained.wait_for(std::chrono::seconds(0)) != std::future_status::ready) {
        const int again = sigtimedwait(&signals, nullptr, &poll);
        if ((again == SIGTERM || again == SIGINT) && !cut_short) {
          spdlog::warn("{} again: aborting running requests now", signal_name(again));
          running->end_grace_period();
          cut_short = true;
        }
      }
      drained.get();
      spdlog::info("stopped");
      return 0;
    }
    if (!(*server)->engine().healthy()) {
      spdlog::critical("the engine failed (see above); stopping so that a supervisor restarts");
      (*server)->drain_and_stop(std::chrono::seconds(0));
      return 1;
    }
  }
}

}  // namespace
}  // namespace megaserve::server

int main(int argc, char** argv) { return megaserve::server::serve(argc, argv); }
