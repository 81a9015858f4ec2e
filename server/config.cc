#include "server/config.h"

#include <fstream>
#include <limits>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/step_capture.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"
#include "server/listen_address.h"

namespace megaserve::server {
namespace {

// Collects the text-format parser's complaints so that the error names the line.
class ParseErrors : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, int column, const std::string& message) override {
    errors.push_back(absl::StrCat("line ", line + 1, " column ", column + 1, ": ", message));
  }
  std::vector<std::string> errors;
};

// The step capture's range, and its folder made and proven writable now, before the model
// loads, rather than when the first trace is written.
absl::Status validate_trace(const config::EngineConfig& e) {
  if (e.trace_steps() > static_cast<uint32_t>(engine::kMaxTraceSteps)) {
    return absl::InvalidArgumentError(
        absl::StrCat("engine.trace_steps must be at most ", engine::kMaxTraceSteps, ", got ",
                     e.trace_steps(), " (each captured step writes a trace file and a PNG)"));
  }
  if (e.trace_steps() == 0) return absl::OkStatus();
  if (e.trace_dir().empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("engine.trace_steps ", e.trace_steps(),
                     " needs engine.trace_dir (--trace_dir=DIR), the folder to write traces to"));
  }
  if (absl::Status s = engine::prepare_trace_dir(e.trace_dir()); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("engine.", s.message()));
  }
  return absl::OkStatus();
}

}  // namespace

config::ServerConfig default_server_config() {
  config::ServerConfig c;
  c.mutable_model()->set_load_format("auto");
  c.mutable_model()->set_dummy_seed(0);
  c.mutable_endpoints()->set_grpc_address("0.0.0.0:50051");
  c.mutable_endpoints()->set_metrics_address("0.0.0.0:9090");
  config::EngineConfig* e = c.mutable_engine();
  e->set_backend("auto");
  e->set_tensor_parallel_size(1);
  e->set_kv_block_size(16);
  e->set_num_kv_blocks(0);
  e->set_gpu_memory_fraction(0.9f);
  e->set_cpu_kv_cache_mib(256);
  // Measured on an H100, 1000 ShareGPT V3 requests through the server (bench/RESULTS.md,
  // 2026-12-06): 256 sequences and 8,192 tokens per step ran as fast as 512 and 1024
  // sequences (~8.0-8.5k tok/s; the longest request's 1,901 steps set the duration) with
  // half their inter-token latency.
  e->set_max_num_seqs(256);
  e->set_max_num_batched_tokens(8192);
  e->set_max_waiting_requests(4096);
  // Measured on an H200, the same 1000 requests (bench/RESULTS.md, 2026-12-07): at 512 the
  // Poisson run at 22 requests/s kept P99 ITL at 2.26x the median (32.1 / 14.2 ms) against
  // 3.47x uncapped (H100), and the t = 0 run lost 0.5% (11,659 against 11,719 tok/s).
  e->set_max_prefill_tokens_with_decodes(512);
  e->set_max_model_len(0);
  e->set_cpu_threads(0);
  e->set_enable_prefix_caching(true);
  e->set_step_watchdog_ms(60000);
  e->set_trace_steps(0);
  c.mutable_logging()->set_level("info");
  c.set_drain_grace_seconds(30);
  return c;
}

absl::StatusOr<config::ServerConfig> load_server_config(const std::filesystem::path& file) {
  std::ifstream in(file);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("config file ", file.string(), ": cannot open"));
  }
  std::ostringstream text;
  text << in.rdbuf();
  config::ServerConfig config = default_server_config();
  google::protobuf::TextFormat::Parser parser;
  ParseErrors errors;
  parser.RecordErrorsTo(&errors);
  if (!parser.MergeFromString(text.str(), &config)) {
    return absl::InvalidArgumentError(
        absl::StrCat("config file ", file.string(), ": ", absl::StrJoin(errors.errors, "; ")));
  }
  return config;
}

absl::Status validate_server_config(const config::ServerConfig& c) {
  const std::string& format = c.model().load_format();
  if (format != "auto" && format != "dummy") {
    return absl::InvalidArgumentError(
        absl::StrCat("model.load_format must be \"auto\" or \"dummy\", got \"", format, "\""));
  }
  // Metrics may be off (empty address); gRPC is the server, so it may not.
  if (c.endpoints().grpc_address().empty()) {
    return absl::InvalidArgumentError(
        "endpoints.grpc_address is empty: the server needs a gRPC address (host:port)");
  }
  if (auto a = parse_listen_address(c.endpoints().grpc_address(), "endpoints.grpc_address");
      !a.ok()) {
    return a.status();
  }
  if (const std::string& metrics = c.endpoints().metrics_address(); !metrics.empty()) {
    if (auto a = parse_listen_address(metrics, "endpoints.metrics_address"); !a.ok()) {
      return a.status();
    }
  }
  if (const std::string& http = c.endpoints().http_address(); !http.empty()) {
    if (auto a = parse_listen_address(http, "endpoints.http_address"); !a.ok()) {
      return a.status();
    }
  }
  const config::EngineConfig& e = c.engine();
  if (e.backend() != "auto" && e.backend() != "cpu" && e.backend() != "cuda") {
    return absl::InvalidArgumentError(absl::StrCat(
        "engine.backend must be \"auto\", \"cpu\" or \"cuda\", got \"", e.backend(), "\""));
  }
  const uint32_t block = e.kv_block_size();
  if (block < 16 || block > 128 || (block & (block - 1)) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("engine.kv_block_size must be a power of two in [16, 128], got ", block));
  }
  if (e.tensor_parallel_size() < 1) {
    return absl::InvalidArgumentError("engine.tensor_parallel_size must be >= 1");
  }
  if (e.max_num_seqs() < 1) return absl::InvalidArgumentError("engine.max_num_seqs must be >= 1");
  if (e.max_num_batched_tokens() < 1) {
    return absl::InvalidArgumentError("engine.max_num_batched_tokens must be >= 1");
  }
  if (e.max_waiting_requests() < 1) {
    return absl::InvalidArgumentError("engine.max_waiting_requests must be >= 1");
  }
  // Token counts are 32-bit below; the model's own limit is checked when it is loaded.
  if (e.max_model_len() > static_cast<uint32_t>(std::numeric_limits<int32_t>::max())) {
    return absl::InvalidArgumentError(absl::StrCat("engine.max_model_len must be at most ",
                                                   std::numeric_limits<int32_t>::max(), ", got ",
                                                   e.max_model_len()));
  }
  if (!(e.gpu_memory_fraction() > 0.0f && e.gpu_memory_fraction() <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "engine.gpu_memory_fraction must be in (0, 1], got ", e.gpu_memory_fraction()));
  }
  if (absl::Status s = validate_trace(e); !s.ok()) return s;
  const std::string& level = c.logging().level();
  if (level != "trace" && level != "debug" && level != "info" && level != "warn" &&
      level != "error") {
    return absl::InvalidArgumentError(absl::StrCat(
        "logging.level must be trace, debug, info, warn or error, got \"", level, "\""));
  }
  return absl::OkStatus();
}

}  // namespace megaserve::server
