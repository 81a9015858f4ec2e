// The projection microbenchmark of the Hopper compute-core issue: one instruction kind inside
// the persistent megakernel, against torch.matmul on the same shape in the same run. For each
// Llama-3.1-8B projection (QKV 4096 -> 6144, O 4096 -> 4096, gate/up 4096 -> 2 x 14336, down
// 14336 -> 4096) and M token rows (1, 64, 256, 1024, 4096, 8192): the step the builder makes
// for one request prefilling M tokens, cut down to that op's instructions of every layer
// (bench/op_stream.h: no waits, so they run as a stream of independent tiles), run profiled
// on the default backend (wgmma where it applies); the device span gives TFLOP/s of the
// matmul work, 2 M N K per layer. The fused work of each op (norm, RoPE and KV append, SiLU,
// residual add) is inside the span, as in a real step. "busy" is the same work over the summed
// busy time of the instructions spread evenly over the CTAs: the rate of a perfectly balanced
// stream (placement and tails left out); "16-row" the span's rate with the weights in TMA
// boxes of 16 rows instead of 64 (kernels/tile_wgmma.cuh [WIDE_BOX]).
//
//   gpu_projection_bench [config.json] [torch rates file]
// The rates file (scripts/gpu-suite writes it with torch) holds lines "<op> <M> <TFLOP/s>";
// where a line matches, the table prints torch's rate and ours / torch.
// For a profiler (ncu, which replays one kernel launch at a time): MEGASERVE_PROJECTION_ONLY=
// "<op> <M>" runs that row alone, and MEGASERVE_PROJECTION_LAUNCH=step launches the megakernel
// once per step instead of persistently.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "bench/gpu_bench_start.h"
#include "bench/op_stream.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_trace.h"
#include "engine/model/weights.h"
#include "engine/step_runner.h"

namespace megaserve::engine {
namespace {

constexpr int kMaxTokens = 8192;
constexpr int kRuns = 3;  // profiled runs per case; the median span is reported

struct Projection {
  const char* name;
  isa::Opcode op;
  int64_t n, k;  // output columns (both matrices for gate/up) and reduction width
};

std::map<std::pair<std::string, int>, double> read_rates(const std::string& path) {
  std::map<std::pair<std::string, int>, double> rates;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream words(line);
    std::string op;
    int m = 0;
    double tflops = 0;
    if (words >> op >> m >> tflops) rates[{op, m}] = tflops;
  }
  return rates;
}

int run(const std::string& config_path, const std::string& rates_path) {
  const std::optional<GpuBenchStart> start = start_gpu_bench("gpu_projection_bench", config_path);
  if (!start) return 1;
  const ModelConfig& config = start->config;
  const auto rates = rates_path.empty() ? decltype(read_rates("")){} : read_rates(rates_path);
  CudaBackendOptions o;
  o.kv_block_size = kBenchBlockSize;
  o.num_kv_blocks = kMaxTokens / kBenchBlockSize + 16;
  const char* launch = std::getenv("MEGASERVE_PROJECTION_LAUNCH");
  o.persistent = launch == nullptr || std::string(launch) != "step";
  o.step_watchdog_ms = 120000;
  const char* only_env = std::getenv("MEGASERVE_PROJECTION_ONLY");
  const std::string only = only_env != nullptr ? only_env : "";
  auto backend = CudaBackend::create(config, dummy_weights(config, DType::kBF16, 1), o);
  if (!backend.ok()) {
    std::fprintf(stderr, "%s\n", backend.status().ToString().c_str());
    return 1;
  }
  CudaBackend& b = **backend;
  StepRunner runner(config, b);
  ScheduleBuilder& builder = runner.builder();
  std::printf("backend: %s\n", b.describe().c_str());

  const int64_t H = config.hidden_size, F = config.intermediate_size;
  const int64_t qkv =
      static_cast<int64_t>(config.num_heads + 2 * config.num_kv_heads) * config.head_dim;
  const Projection projections[] = {
      {"qkv", isa::Opcode::kQkvRope, qkv, H},
      {"o", isa::Opcode::kOProj, H, config.num_heads * config.head_dim},
      {"gate_up", isa::Opcode::kGateUpSilu, 2 * F, H},
      {"down", isa::Opcode::kDownProj, H, F}};
  const int rows[] = {1, 64, 256, 1024, 4096, 8192};
  const int L = config.num_layers;
  std::printf("%-8s %6s %6s %6s %8s %10s %10s %10s %10s %10s %8s\n", "op", "M", "N", "K", "insts",
              "span_ms", "TFLOP/s", "busy", "16-row", "torch", "ours/t");
  uint64_t step_id = 0;
  for (const Projection& p : projections) {
    for (const int m : rows) {
      if (!only.empty() && only != std::string(p.name) + " " + std::to_string(m)) continue;
      const auto totals = builder.barrier_totals();
      // One request prefilling m tokens, not sampled: only the layers' instructions.
      absl::StatusOr<Step> full =
          builder.build(make_plan(step_id++, 1, 0, m, /*sample=*/false), b.num_kv_blocks());
      builder.rewind_barrier_totals(totals);  // the op stream signals nothing
      if (!full.ok()) {
        std::printf("%s M=%d: %s\n", p.name, m, full.status().ToString().c_str());
        return 1;
      }
      const Step stream = op_stream(*full, p.op);
      // (span, summed busy / CTAs) in seconds of the median of kRuns profiled runs after a
      // warm-up, with the weights in 64-row TMA boxes (the default) or in 16-row ones.
      const auto measure = [&](bool narrow) -> std::optional<std::pair<double, double>> {
        b.set_wgmma_wide_boxes(!narrow);
        std::vector<std::pair<double, double>> runs;
        for (int run = 0; run < kRuns + 1; ++run) {
          b.set_profile(run > 0);
          auto out = b.execute(stream);
          b.set_profile(false);
          if (!out.ok()) {
            std::printf("%s M=%d: %s\n", p.name, m, out.status().ToString().c_str());
            return std::nullopt;
          }
          if (run == 0) continue;
          const TraceSummary s = summarize_trace(config, stream, b.last_timings());
          double busy_us = 0;
          for (const OpSummary& o : s.ops) busy_us += o.busy_us;
          runs.push_back({s.span_us * 1e-6, busy_us * 1e-6 / std::max(1, s.num_ctas)});
        }
        b.set_wgmma_wide_boxes(true);
        std::sort(runs.begin(), runs.end());
        return runs[runs.size() / 2];
      };
      const auto wide = measure(false), narrow = measure(true);
      if (!wide || !narrow) return 1;
      const double work = 2.0 * m * p.n * p.k * L;
      const double tflops = work / wide->first * 1e-12;
      const double busy_tflops = wide->second > 0 ? work / wide->second * 1e-12 : 0;
      const double narrow_tflops = work / narrow->first * 1e-12;
      const auto torch = rates.find({p.name, m});
      char peer[64] = "-", ratio[64] = "-";
      if (torch != rates.end() && torch->second > 0) {
        std::snprintf(peer, sizeof(peer), "%.1f", torch->second);
        std::snprintf(ratio, sizeof(ratio), "%.3f", tflops / torch->second);
      }
      std::printf("%-8s %6d %6lld %6lld %8zu %10.3f %10.1f %10.1f %10.1f %10s %8s\n", p.name, m,
                  static_cast<long long>(p.n), static_cast<long long>(p.k),
                  stream.ranks[0].instructions.size(), wide->first * 1e3, tflops, busy_tflops,
                  narrow_tflops, peer, ratio);
    }
  }
  std::printf(
      "TFLOP/s: 2 M N K x %d layers over the median device span of %d runs; busy: over that "
      "run's summed busy time / CTAs (a perfectly balanced stream); 16-row: TFLOP/s with the "
      "weights in 16-row TMA boxes; ours/t: TFLOP/s / torch\n",
      L, kRuns);
  return 0;
}

}  // namespace
}  // namespace megaserve::engine

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  const std::string config = argc > 1 ? argv[1] : "configs/models/llama-3.1-8b.json";
  const std::string rates = argc > 2 ? argv[2] : "";
  return megaserve::engine::run(config, rates);
}
