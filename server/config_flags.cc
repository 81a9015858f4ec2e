#include "server/config_flags.h"

#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#include "absl/flags/flag.h"
#include "absl/flags/marshalling.h"
#include "absl/strings/str_cat.h"
#include "server/config.h"

namespace megaserve::server {

// A flag that overrides one config field, and only when given: its default holds no value.
// An empty value given ("--metrics_address=") is a value, unlike with std::optional flags,
// where Abseil reads it as unset. `shown` is what --help prints as the default: the
// default config's value, not the flag's empty one.
template <typename T>
struct FlagOverride {
  std::optional<T> value;
  std::string shown;
};

template <typename T>
bool AbslParseFlag(absl::string_view text, FlagOverride<T>* flag, std::string* error) {
  // A yes/no flag may also say "auto": the config decides (what --help shows as the default
  // of --overlap_scheduling, whose config default depends on the backend; Abseil checks
  // that every shown default parses).
  if constexpr (std::is_same_v<T, bool>) {
    if (text == "auto") {
      flag->value.reset();
      return true;
    }
  }
  T value;
  if (!absl::ParseFlag(text, &value, error)) return false;
  flag->value = std::move(value);
  return true;
}

template <typename T>
std::string AbslUnparseFlag(const FlagOverride<T>& flag) {
  return flag.value ? absl::UnparseFlag(*flag.value) : flag.shown;
}

namespace {

const config::ServerConfig& defaults() {
  static const config::ServerConfig* config = new config::ServerConfig(default_server_config());
  return *config;
}
const config::ModelSource& model_defaults() { return defaults().model(); }
const config::EngineConfig& engine_defaults() { return defaults().engine(); }

FlagOverride<std::string> shown_text(const std::string& value) {
  return {std::nullopt, absl::StrCat("\"", value, "\"")};
}
template <typename T>
FlagOverride<T> shown_value(T value) {
  return {std::nullopt, absl::UnparseFlag(value)};
}

}  // namespace
}  // namespace megaserve::server

using StringOverride = megaserve::server::FlagOverride<std::string>;
using UintOverride = megaserve::server::FlagOverride<uint32_t>;
using FloatOverride = megaserve::server::FlagOverride<float>;
using BoolOverride = megaserve::server::FlagOverride<bool>;
using megaserve::server::engine_defaults;
using megaserve::server::model_defaults;
using megaserve::server::shown_text;
using megaserve::server::shown_value;

ABSL_FLAG(StringOverride, model, shown_text(model_defaults().path()),
          "Hugging Face model directory to serve (config.json, *.safetensors, "
          "tokenizer.model), or a llama GGUF file; empty: the built-in demo model");
ABSL_FLAG(StringOverride, load_format, shown_text(model_defaults().load_format()),
          "\"auto\" (read the safetensors) or \"dummy\" (seeded random weights)");
ABSL_FLAG(StringOverride, model_config_file, shown_text(model_defaults().config_file()),
          "with --load_format=dummy: a config.json to take the model shape from");
ABSL_FLAG(StringOverride, tokenizer, shown_text(model_defaults().tokenizer_file()),
          "a tokenizer.model or tokenizer.json to use instead of the model's own");
ABSL_FLAG(StringOverride, served_model_name, shown_text(model_defaults().served_name()),
          "the name GetModelInfo reports (empty: the directory name)");
ABSL_FLAG(StringOverride, grpc_address,
          shown_text(megaserve::server::defaults().endpoints().grpc_address()),
          "gRPC listen address, host:port (port 0: any free port)");
ABSL_FLAG(StringOverride, metrics_address,
          shown_text(megaserve::server::defaults().endpoints().metrics_address()),
          "Prometheus metrics listen address, host:port; empty turns metrics off");
ABSL_FLAG(StringOverride, http_address,
          shown_text(megaserve::server::defaults().endpoints().http_address()),
          "OpenAI-compatible HTTP API listen address (/v1/completions, /v1/chat/completions, "
          "/v1/models), host:port; empty (the default) turns it off");
ABSL_FLAG(StringOverride, backend, shown_text(engine_defaults().backend()), "auto, cpu or cuda");
ABSL_FLAG(UintOverride, tensor_parallel_size, shown_value(engine_defaults().tensor_parallel_size()),
          "GPUs per model");
ABSL_FLAG(BoolOverride, tp_ranks_on_one_gpu, shown_value(engine_defaults().tp_ranks_on_one_gpu()),
          "debugging: run the --tensor_parallel_size ranks on one GPU's SMs "
          "(docs/tensor-parallel.md)");
ABSL_FLAG(UintOverride, kv_block_size, shown_value(engine_defaults().kv_block_size()),
          "tokens per KV cache block, a power of two in [16, 128]");
ABSL_FLAG(UintOverride, num_kv_blocks, shown_value(engine_defaults().num_kv_blocks()),
          "KV cache blocks; 0 derives them from memory");
ABSL_FLAG(UintOverride, cpu_kv_cache_mib, shown_value(engine_defaults().cpu_kv_cache_mib()),
          "CPU backend: KV cache size in MiB when num_kv_blocks is 0");
ABSL_FLAG(FloatOverride, gpu_memory_fraction, shown_value(engine_defaults().gpu_memory_fraction()),
          "CUDA backend: share of GPU memory to use");
ABSL_FLAG(UintOverride, max_num_seqs, shown_value(engine_defaults().max_num_seqs()),
          "requests per step at most");
ABSL_FLAG(UintOverride, max_num_batched_tokens,
          shown_value(engine_defaults().max_num_batched_tokens()), "tokens per step at most");
ABSL_FLAG(UintOverride, max_prefill_tokens_with_decodes,
          shown_value(engine_defaults().max_prefill_tokens_with_decodes()),
          "prompt tokens per step at most while decodes run in it; 0: max_num_batched_tokens");
ABSL_FLAG(UintOverride, max_waiting_requests, shown_value(engine_defaults().max_waiting_requests()),
          "waiting queue length; beyond it requests get RESOURCE_EXHAUSTED");
ABSL_FLAG(UintOverride, max_model_len, shown_value(engine_defaults().max_model_len()),
          "longest prompt + output, at most the model's max_position_embeddings; 0: that");
ABSL_FLAG(UintOverride, cpu_threads, shown_value(engine_defaults().cpu_threads()),
          "CPU backend threads (virtual SMs); 0: all hardware threads");
ABSL_FLAG(BoolOverride, enable_prefix_caching,
          shown_value(engine_defaults().enable_prefix_caching()),
          "reuse KV blocks of identical prompt prefixes");
ABSL_FLAG(BoolOverride, overlap_scheduling, (BoolOverride{std::nullopt, "auto"}),
          "plan and upload step N+1 while step N runs (auto: on with the CUDA backend)");
ABSL_FLAG(UintOverride, trace_steps, shown_value(engine_defaults().trace_steps()),
          "capture the per-SM timelines of the first N steps that run (at most 64; 0: off) "
          "into --trace_dir as Chrome traces and PNGs (docs/tracing.md)");
ABSL_FLAG(StringOverride, trace_dir, shown_text(engine_defaults().trace_dir()),
          "with --trace_steps: the folder the traces are written to (made when missing)");
ABSL_FLAG(UintOverride, drain_grace_seconds,
          shown_value(megaserve::server::defaults().drain_grace_seconds()),
          "on SIGTERM, how long running requests may finish before they are aborted (a second "
          "SIGTERM aborts them at once)");
ABSL_FLAG(StringOverride, log_level, shown_text(megaserve::server::defaults().logging().level()),
          "trace, debug, info, warn or error");
ABSL_FLAG(StringOverride, log_pattern,
          shown_text(megaserve::server::defaults().logging().pattern()),
          "spdlog pattern (empty: spdlog's own)");

namespace megaserve::server {
namespace {

template <typename T, typename Setter>
void override_field(const absl::Flag<FlagOverride<T>>& flag, Setter set) {
  if (const std::optional<T> value = absl::GetFlag(flag).value) set(*value);
}

}  // namespace

void apply_flag_overrides(config::ServerConfig* c) {
  config::ModelSource* m = c->mutable_model();
  config::EngineConfig* e = c->mutable_engine();
  override_field(FLAGS_model, [m](const std::string& v) { m->set_path(v); });
  override_field(FLAGS_load_format, [m](const std::string& v) { m->set_load_format(v); });
  override_field(FLAGS_model_config_file, [m](const std::string& v) { m->set_config_file(v); });
  override_field(FLAGS_tokenizer, [m](const std::string& v) { m->set_tokenizer_file(v); });
  override_field(FLAGS_served_model_name, [m](const std::string& v) { m->set_served_name(v); });
  override_field(FLAGS_grpc_address,
                 [c](const std::string& v) { c->mutable_endpoints()->set_grpc_address(v); });
  override_field(FLAGS_metrics_address,
                 [c](const std::string& v) { c->mutable_endpoints()->set_metrics_address(v); });
  override_field(FLAGS_http_address,
                 [c](const std::string& v) { c->mutable_endpoints()->set_http_address(v); });
  override_field(FLAGS_backend, [e](const std::string& v) { e->set_backend(v); });
  override_field(FLAGS_tensor_parallel_size, [e](uint32_t v) { e->set_tensor_parallel_size(v); });
  override_field(FLAGS_tp_ranks_on_one_gpu, [e](bool v) { e->set_tp_ranks_on_one_gpu(v); });
  override_field(FLAGS_kv_block_size, [e](uint32_t v) { e->set_kv_block_size(v); });
  override_field(FLAGS_num_kv_blocks, [e](uint32_t v) { e->set_num_kv_blocks(v); });
  override_field(FLAGS_cpu_kv_cache_mib, [e](uint32_t v) { e->set_cpu_kv_cache_mib(v); });
  override_field(FLAGS_gpu_memory_fraction, [e](float v) { e->set_gpu_memory_fraction(v); });
  override_field(FLAGS_max_num_seqs, [e](uint32_t v) { e->set_max_num_seqs(v); });
  override_field(FLAGS_max_num_batched_tokens,
                 [e](uint32_t v) { e->set_max_num_batched_tokens(v); });
  override_field(FLAGS_max_prefill_tokens_with_decodes,
                 [e](uint32_t v) { e->set_max_prefill_tokens_with_decodes(v); });
  override_field(FLAGS_max_waiting_requests, [e](uint32_t v) { e->set_max_waiting_requests(v); });
  override_field(FLAGS_max_model_len, [e](uint32_t v) { e->set_max_model_len(v); });
  override_field(FLAGS_cpu_threads, [e](uint32_t v) { e->set_cpu_threads(v); });
  override_field(FLAGS_enable_prefix_caching, [e](bool v) { e->set_enable_prefix_caching(v); });
  override_field(FLAGS_overlap_scheduling, [e](bool v) { e->set_overlap_scheduling(v); });
  override_field(FLAGS_trace_steps, [e](uint32_t v) { e->set_trace_steps(v); });
  override_field(FLAGS_trace_dir, [e](const std::string& v) { e->set_trace_dir(v); });
  override_field(FLAGS_drain_grace_seconds, [c](uint32_t v) { c->set_drain_grace_seconds(v); });
  override_field(FLAGS_log_level,
                 [c](const std::string& v) { c->mutable_logging()->set_level(v); });
  override_field(FLAGS_log_pattern,
                 [c](const std::string& v) { c->mutable_logging()->set_pattern(v); });
}

}  // namespace megaserve::server
