#include "server/config_flags.h"

#include <cstdint>
#include <optional>
#include <string>

#include "absl/flags/flag.h"

ABSL_FLAG(std::optional<std::string>, model, std::nullopt,
          "Hugging Face model directory to serve (config.json, *.safetensors, "
          "tokenizer.model); unset: the built-in demo model");
ABSL_FLAG(std::optional<std::string>, load_format, std::nullopt,
          "\"auto\" (read the safetensors) or \"dummy\" (seeded random weights)");
ABSL_FLAG(std::optional<std::string>, model_config_file, std::nullopt,
          "with --load_format=dummy: a config.json to take the model shape from");
ABSL_FLAG(std::optional<std::string>, tokenizer, std::nullopt,
          "a tokenizer.model to use instead of the model directory's");
ABSL_FLAG(std::optional<std::string>, served_model_name, std::nullopt,
          "the name GetModelInfo reports (default: the directory name)");
ABSL_FLAG(std::optional<std::string>, grpc_address, std::nullopt, "gRPC listen address, host:port");
ABSL_FLAG(std::optional<std::string>, metrics_address, std::nullopt,
          "Prometheus metrics listen address, host:port; empty turns metrics off");
ABSL_FLAG(std::optional<std::string>, backend, std::nullopt, "auto, cpu or cuda");
ABSL_FLAG(std::optional<uint32_t>, tensor_parallel_size, std::nullopt, "GPUs per model");
ABSL_FLAG(std::optional<uint32_t>, kv_block_size, std::nullopt,
          "tokens per KV cache block, a power of two in [16, 128]");
ABSL_FLAG(std::optional<uint32_t>, num_kv_blocks, std::nullopt,
          "KV cache blocks; 0 derives them from memory");
ABSL_FLAG(std::optional<uint32_t>, cpu_kv_cache_mib, std::nullopt,
          "CPU backend: KV cache size in MiB when num_kv_blocks is 0");
ABSL_FLAG(std::optional<float>, gpu_memory_fraction, std::nullopt,
          "CUDA backend: share of GPU memory to use");
ABSL_FLAG(std::optional<uint32_t>, max_num_seqs, std::nullopt, "requests per step at most");
ABSL_FLAG(std::optional<uint32_t>, max_num_batched_tokens, std::nullopt, "tokens per step at most");
ABSL_FLAG(std::optional<uint32_t>, max_waiting_requests, std::nullopt,
          "waiting queue length; beyond it requests get RESOURCE_EXHAUSTED");
ABSL_FLAG(std::optional<uint32_t>, max_model_len, std::nullopt,
          "longest prompt + output; 0: the model's max_position_embeddings");
ABSL_FLAG(std::optional<uint32_t>, cpu_threads, std::nullopt,
          "CPU backend threads (virtual SMs); 0: all hardware threads");
ABSL_FLAG(std::optional<bool>, enable_prefix_caching, std::nullopt,
          "reuse KV blocks of identical prompt prefixes");
ABSL_FLAG(std::optional<bool>, overlap_scheduling, std::nullopt,
          "plan and upload step N+1 while step N runs (default: on with the CUDA backend)");
ABSL_FLAG(std::optional<uint32_t>, drain_grace_seconds, std::nullopt,
          "on SIGTERM, how long running requests may finish before they are aborted");
ABSL_FLAG(std::optional<std::string>, log_level, std::nullopt, "trace, debug, info, warn or error");
ABSL_FLAG(std::optional<std::string>, log_pattern, std::nullopt, "spdlog pattern");

namespace megaserve::server {
namespace {

template <typename T, typename Setter>
void override_field(const absl::Flag<std::optional<T>>& flag, Setter set) {
  if (const std::optional<T> value = absl::GetFlag(flag)) set(*value);
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
  override_field(FLAGS_backend, [e](const std::string& v) { e->set_backend(v); });
  override_field(FLAGS_tensor_parallel_size, [e](uint32_t v) { e->set_tensor_parallel_size(v); });
  override_field(FLAGS_kv_block_size, [e](uint32_t v) { e->set_kv_block_size(v); });
  override_field(FLAGS_num_kv_blocks, [e](uint32_t v) { e->set_num_kv_blocks(v); });
  override_field(FLAGS_cpu_kv_cache_mib, [e](uint32_t v) { e->set_cpu_kv_cache_mib(v); });
  override_field(FLAGS_gpu_memory_fraction, [e](float v) { e->set_gpu_memory_fraction(v); });
  override_field(FLAGS_max_num_seqs, [e](uint32_t v) { e->set_max_num_seqs(v); });
  override_field(FLAGS_max_num_batched_tokens,
                 [e](uint32_t v) { e->set_max_num_batched_tokens(v); });
  override_field(FLAGS_max_waiting_requests, [e](uint32_t v) { e->set_max_waiting_requests(v); });
  override_field(FLAGS_max_model_len, [e](uint32_t v) { e->set_max_model_len(v); });
  override_field(FLAGS_cpu_threads, [e](uint32_t v) { e->set_cpu_threads(v); });
  override_field(FLAGS_enable_prefix_caching, [e](bool v) { e->set_enable_prefix_caching(v); });
  override_field(FLAGS_overlap_scheduling, [e](bool v) { e->set_overlap_scheduling(v); });
  override_field(FLAGS_drain_grace_seconds, [c](uint32_t v) { c->set_drain_grace_seconds(v); });
  override_field(FLAGS_log_level,
                 [c](const std::string& v) { c->mutable_logging()->set_level(v); });
  override_field(FLAGS_log_pattern,
                 [c](const std::string& v) { c->mutable_logging()->set_pattern(v); });
}

}  // namespace megaserve::server
