// GPU attention benchmark (the attention issue's bars): the megakernel's attention op inside
// whole profiled steps of a Llama-3.1-8B shape cut to kLayers layers (dummy bf16 weights; the
// attention of a layer does not depend on how many layers follow), against the copy bandwidth
// measured in the same run:
//   - decode steps of 256 requests at contexts 512, 2048 and 8192: the KV bytes the attention
//     must read over its busy time per CTA (attention and KV-split merges), as TB/s and as a
//     fraction of the copy bandwidth;
//   - a prefill step of 8192 tokens from position 0: causal attention TFLOP/s while busy, and
//     the number of merge instructions (none should run in a prefill-only step).
// scripts/gpu-suite prints torch's scaled_dot_product_attention on the same shapes beside it
// (bench/hopper/torch_sdpa.py).
//
//   gpu_attention_bench [config.json]
// For a profiler (ncu, which replays one kernel launch at a time): MEGASERVE_ATTENTION_ONLY=
// "decode <context>" (256 requests) or "prefill" launches the megakernel once per step and runs
// that step's attention instructions alone (bench/op_stream.h) twice, unprofiled.
// MEGASERVE_ATTENTION_PENDING=1 turns on decode attention's options not yet on by default
// (CudaBackendOptions::attention_rotation and kv_fence_on_reader).
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>

#include "bench/gpu_bench_start.h"
#include "bench/op_stream.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_trace.h"
#include "engine/model/weights.h"
#include "engine/step_runner.h"

namespace megaserve::engine {
namespace {

constexpr int kLayers = 2;
constexpr int kBatch = 256;
constexpr int kContexts[] = {512, 2048, 8192};
constexpr int kPrefillTokens = 8192;

struct AttentionTime {
  double busy_us = 0;  // attention + merge busy time per CTA
  int merges = 0;      // merge instructions
};

AttentionTime attention_time(const TraceSummary& s) {
  AttentionTime t;
  for (const OpSummary& op : s.ops) {
    if (op.op == isa::Opcode::kAttention || op.op == isa::Opcode::kAttentionMerge) {
      t.busy_us += op.busy_us / s.num_ctas;
    }
    if (op.op == isa::Opcode::kAttentionMerge) t.merges += op.count;
  }
  return t;
}

// A profiled run of `plan` after one unprofiled warm-up of the same shape; nullopt on failure.
std::optional<TraceSummary> profile(CudaBackend& b, StepRunner& runner, const ModelConfig& config,
                                    uint64_t* step_id, int batch, int context, int prefill) {
  if (auto warm = runner.execute(make_plan((*step_id)++, batch, context, prefill)); !warm.ok()) {
    std::printf("warm-up: %s\n", warm.status().ToString().c_str());
    return std::nullopt;
  }
  b.set_profile(true);
  auto out = runner.execute(make_plan((*step_id)++, batch, context, prefill));
  b.set_profile(false);
  if (!out.ok()) {
    std::printf("step: %s\n", out.status().ToString().c_str());
    return std::nullopt;
  }
  return summarize_trace(config, runner.last_step(), b.last_timings());
}

// MEGASERVE_ATTENTION_ONLY: the step's attention instructions alone, twice (see the top).
int run_only(CudaBackend& b, StepRunner& runner, const std::string& only) {
  std::istringstream words(only);
  std::string kind;
  int context = 0;
  words >> kind >> context;
  const bool decode = kind == "decode";
  if (!(decode && context > 0) && kind != "prefill") {
    std::fprintf(stderr,
                 "MEGASERVE_ATTENTION_ONLY: \"decode <context>\" or \"prefill\", not \"%s\"\n",
                 only.c_str());
    return 1;
  }
  ScheduleBuilder& builder = runner.builder();
  const auto totals = builder.barrier_totals();
  absl::StatusOr<Step> full = builder.build(
      decode ? make_plan(1, kBatch, context, 0, false) : make_plan(1, 1, 0, kPrefillTokens, false),
      b.num_kv_blocks());
  builder.rewind_barrier_totals(totals);  // the op stream signals nothing
  if (!full.ok()) {
    std::fprintf(stderr, "%s\n", full.status().ToString().c_str());
    return 1;
  }
  const Step stream = op_stream(*full, isa::Opcode::kAttention);
  for (int run = 0; run < 2; ++run) {
    if (auto out = b.execute(stream); !out.ok()) {
      std::fprintf(stderr, "%s\n", out.status().ToString().c_str());
      return 1;
    }
  }
  std::printf("attention only (%s): 2 launches of %zu instructions\n", only.c_str(),
              stream.ranks[0].instructions.size());
  return 0;
}

int run(const std::string& config_path) {
  std::optional<GpuBenchStart> start = start_gpu_bench("gpu_attention_bench", config_path);
  if (!start) return 1;
  ModelConfig config = start->config;
  config.num_layers = kLayers;
  const double bandwidth = start->bandwidth;
  const int max_context = kContexts[std::size(kContexts) - 1];
  CudaBackendOptions o;
  o.kv_block_size = kBenchBlockSize;
  o.num_kv_blocks = kBatch * ((max_context + kBenchBlockSize) / kBenchBlockSize) + 16;
  const char* only = std::getenv("MEGASERVE_ATTENTION_ONLY");
  o.persistent = only == nullptr;
  o.step_watchdog_ms = 120000;
  // MEGASERVE_ATTENTION_PENDING=1: decode attention's options not yet on by default, the slice
  // rotation [SLICE_ROTATION] and the KV fence on the reader, to compare in one binary.
  const char* pending = std::getenv("MEGASERVE_ATTENTION_PENDING");
  o.attention_rotation = o.kv_fence_on_reader = pending != nullptr && std::atoi(pending) != 0;
  auto backend = CudaBackend::create(config, dummy_weights(config, DType::kBF16, 1), o);
  if (!backend.ok()) {
    std::fprintf(stderr, "%s\n", backend.status().ToString().c_str());
    return 1;
  }
  CudaBackend& b = **backend;
  StepRunner runner(config, b);
  if (only != nullptr) return run_only(b, runner, only);
  std::printf("attention of %s cut to %d layers: %d q heads, %d kv heads, head dim %d\n",
              config_path.c_str(), kLayers, config.num_heads, config.num_kv_heads, config.head_dim);
  std::printf("%-28s %10s %10s %10s %10s %8s\n", "decode 256 requests", "KV GB", "busy ms", "TB/s",
              "of copy", "merges");
  uint64_t step_id = 0;
  for (const int context : kContexts) {
    const std::optional<TraceSummary> s = profile(b, runner, config, &step_id, kBatch, context, 0);
    if (!s) return 1;
    const AttentionTime t = attention_time(*s);
    // K and V of every cached key and the new one, bf16, every layer.
    const double kv_bytes = 2.0 * 2 * kBatch * (context + 1) * config.num_layers * config.kv_size();
    const double rate = kv_bytes / (t.busy_us * 1e-6);
    std::printf("attention_decode ctx %-14d %10.3f %10.3f %10.3f %10.3f %8d\n", context,
                kv_bytes * 1e-9, t.busy_us * 1e-3, rate * 1e-12, rate / bandwidth, t.merges);
  }
  const std::optional<TraceSummary> s = profile(b, runner, config, &step_id, 1, 0, kPrefillTokens);
  if (!s) return 1;
  const AttentionTime t = attention_time(*s);
  // Causal: query row i scores i + 1 keys; QK^T and PV, 2 FLOP per multiply-add.
  const double n = kPrefillTokens;
  const double flops = 4.0 * config.num_heads * config.head_dim * n * (n + 1) / 2 * kLayers;
  std::printf(
      "attention_prefill %d tokens causal: %.3f TFLOP in %.3f ms busy: %.1f TFLOP/s, "
      "%d merge instructions\n",
      kPrefillTokens, flops * 1e-12, t.busy_us * 1e-3, flops / (t.busy_us * 1e-6) * 1e-12,
      t.merges);
  return 0;
}

}  // namespace
}  // namespace megaserve::engine

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  return megaserve::engine::run(argc > 1 ? argv[1] : "configs/models/llama-3.1-8b.json");
}
