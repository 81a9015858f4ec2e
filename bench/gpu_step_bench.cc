// GPU step benchmark: decode steps of the CUDA megakernel on a model shape with dummy bf16
// weights (default configs/models/llama-3.2-1b.json), for several batch sizes, persistent and
// one launch per step. Prints, per row, the mean step time, decode tokens/s, the step's
// memory floor (weights + KV bytes over the device copy bandwidth measured at the start,
// engine/cuda/cuda_backend.h device_copy_bandwidth) and the ratio to it; then, with device
// timestamps, where one decode step's time went per opcode. Then the overlap rows: decode steps of
// batch 1 and 256, each timed synchronously (submit then collect: the host builds and uploads while
// the GPU idles) and overlapped (step N+1 built, uploaded and posted while step N runs, as
// the engine's overlapped loop does), in alternating rounds, with the host's time inside
// submit() (build + upload) beside.
//
//   gpu_step_bench [config.json] [steps per row] [all | tc | overlap] [overlap batch, default 1
//   and 256] (tc: only the tensor-core rows and profiles, the server's, before the overlap rows)
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "bench/gpu_bench_start.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_stages.h"
#include "engine/cuda/cuda_trace.h"
#include "engine/model/model_config.h"
#include "engine/model/weights.h"
#include "engine/step_runner.h"

namespace megaserve::engine {
namespace {

constexpr int kContext = 128;  // tokens in each request's cache before the timed steps
constexpr int32_t kBlock = 16;

// One decode step's device time, per opcode (engine/cuda/cuda_trace.h).
void print_profile(int batch, bool tensor_cores, const ModelConfig& config, const CudaBackend& b,
                   const StepRunner& runner) {
  const TraceSummary s = summarize_trace(config, runner.last_step(), b.last_timings());
  std::printf("profile (%s), decode batch %d: %s%s", tensor_cores ? "tensor cores" : "CUDA cores",
              batch, format_trace_summary(s).c_str(),
              format_stage_path(stage_path(runner.last_step(), b.last_timings())).c_str());
}

struct Timed {
  double step_s = 0, submit_s = 0;
  int64_t overlapped = 0;
};

// `steps` decode steps of every request of `plan` (the first step's inputs as given, then
// kTokenFromPreviousStep), one in flight while the next is submitted when `overlap`.
absl::StatusOr<Timed> time_decode(CudaBackend& b, StepRunner& runner, scheduler::StepPlan& plan,
                                  uint64_t& step_id, int steps, bool overlap) {
  Timed t;
  const int64_t overlapped_before = b.overlapped_posts();
  std::chrono::duration<double> submitting{};
  const auto t0 = std::chrono::steady_clock::now();
  for (int s = 0; s < steps; ++s) {
    plan.step_id = step_id++;
    const auto s0 = std::chrono::steady_clock::now();
    if (absl::Status st = runner.submit(plan); !st.ok()) return st;
    submitting += std::chrono::steady_clock::now() - s0;
    for (auto& r : plan.requests) {
      ++r.first_position;
      r.token_ids = {scheduler::kTokenFromPreviousStep};
    }
    if (overlap && s == 0) continue;
    if (auto out = runner.collect(); !out.ok()) return out.status();
  }
  if (overlap) {
    if (auto out = runner.collect(); !out.ok()) return out.status();
  }
  t.step_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / steps;
  t.submit_s = submitting.count() / steps;
  t.overlapped = b.overlapped_posts() - overlapped_before;
  return t;
}

// Decode of batch 1 and 256 at context kContext (the cache is not prefilled: decode time does
// not depend on the cached values), synchronous and overlapped in alternating rounds.
int run_overlap(const ModelConfig& config, const ModelWeights& weights, double weight_bytes,
                double bandwidth, int steps, const std::vector<int>& batches) {
  constexpr int kRounds = 3;
  std::printf("%-14s %6s %10s %10s %10s %8s %11s\n", "overlap mode", "batch", "step_ms",
              "submit_ms", "floor_ms", "floor/x", "overlapped");
  for (int batch : batches) {
    const int per_req = (kContext + kRounds * 2 * steps + 2 * kBlock) / kBlock;
    CudaBackendOptions o;
    o.kv_block_size = kBlock;
    o.num_kv_blocks = batch * per_req + 8;
    o.step_watchdog_ms = 60000;
    auto b = CudaBackend::create(config, weights, o);
    if (!b.ok()) {
      std::fprintf(stderr, "%s\n", b.status().ToString().c_str());
      return 1;
    }
    scheduler::StepPlan plan;
    plan.kv_block_size = kBlock;
    for (int i = 0; i < batch; ++i) {
      scheduler::StepRequest r;
      r.request_id = i + 1;
      r.first_position = kContext;
      r.token_ids = {7 + i % 100};
      for (int k = 0; k < per_req; ++k) r.block_table.push_back(i * per_req + k);
      r.sample = true;
      r.sampling.temperature = 0.0f;
      plan.requests.push_back(r);
    }
    StepRunner runner(config, **b);
    uint64_t step_id = 1;
    if (auto w = time_decode(**b, runner, plan, step_id, 3, false); !w.ok()) {  // warm-up
      std::fprintf(stderr, "%s\n", w.status().ToString().c_str());
      return 1;
    }
    Timed sum[2];
    for (int round = 0; round < kRounds; ++round) {
      for (int overlap = 0; overlap < 2; ++overlap) {
        auto t = time_decode(**b, runner, plan, step_id, steps, overlap == 1);
        if (!t.ok()) {
          std::fprintf(stderr, "%s\n", t.status().ToString().c_str());
          return 1;
        }
        sum[overlap].step_s += t->step_s / kRounds;
        sum[overlap].submit_s += t->submit_s / kRounds;
        sum[overlap].overlapped += t->overlapped;
      }
    }
    const int context = plan.requests[0].first_position - kRounds * steps;  // mean context
    const double kv_bytes = 2.0 * 2 * batch * context * config.num_layers * config.kv_size();
    const double floor_s = (weight_bytes + kv_bytes) / bandwidth;
    for (int overlap = 0; overlap < 2; ++overlap) {
      std::printf("%-14s %6d %10.3f %10.3f %10.3f %8.3f %6lld/%-4d\n",
                  overlap ? "overlapped" : "synchronous", batch, sum[overlap].step_s * 1e3,
                  sum[overlap].submit_s * 1e3, floor_s * 1e3, floor_s / sum[overlap].step_s,
                  static_cast<long long>(sum[overlap].overlapped), kRounds * steps);
    }
  }
  return 0;
}

int run(const std::string& config_path, int steps, bool overlap_only, bool tensor_cores_only,
        const std::vector<int>& overlap_batches) {
  const std::optional<GpuBenchStart> start = start_gpu_bench("gpu_step_bench", config_path);
  if (!start) return 1;
  const ModelConfig& config = start->config;
  const double bandwidth = start->bandwidth;
  const ModelWeights weights = dummy_weights(config, DType::kBF16, 1);
  double weight_bytes = 0;
  const auto count = [&](const Tensor& t) { weight_bytes += t.empty() ? 0 : 2.0 * t.numel(); };
  count(weights.embedding);
  if (weights.lm_head.bytes != weights.embedding.bytes) count(weights.lm_head);
  for (const LayerWeights& l : weights.layers) {
    for (const Tensor* t : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) count(*t);
  }
  std::printf("model %s: %.2f GB of bf16 weights\n", config_path.c_str(), weight_bytes / 1e9);
  if (overlap_only) {
    return run_overlap(config, weights, weight_bytes, bandwidth, steps, overlap_batches);
  }
  std::printf("%-14s %6s %10s %12s %10s %8s\n", "mode", "batch", "step_ms", "tok/s", "floor_ms",
              "floor/x");
  // persistent, per-step, persistent on tensor cores; then each of CUDA cores and tensor
  // cores profiled.
  for (int mode = 0; mode < 5; ++mode) {
    const bool persistent = mode != 1, profile = mode >= 3;
    const bool tensor_cores = mode == 2 || mode == 4;
    if (tensor_cores_only && !tensor_cores) continue;
    CudaBackendOptions o;
    o.kv_block_size = kBlock;
    o.num_kv_blocks = 64 * (kContext + steps + kBlock) / kBlock + 8;
    o.persistent = persistent;
    o.profile = profile;
    o.tensor_cores = tensor_cores;
    o.step_watchdog_ms = 60000;  // the prefill steps are long on CUDA cores
    auto b = CudaBackend::create(config, weights, o);
    if (!b.ok()) {
      std::fprintf(stderr, "%s\n", b.status().ToString().c_str());
      return 1;
    }
    if (mode == 0) std::printf("backend: %s\n", (*b)->describe().c_str());
    StepRunner runner(config, **b);
    uint64_t step_id = 0;
    for (int batch : {1, 8, 32, 64}) {
      const int per_req = (kContext + steps + kBlock) / kBlock;
      std::vector<int32_t> tokens(kContext, 7);
      scheduler::StepPlan plan;
      plan.kv_block_size = kBlock;
      for (int i = 0; i < batch; ++i) {
        scheduler::StepRequest r;
        r.request_id = step_id * 1000 + i + 1;
        r.token_ids = tokens;
        for (int k = 0; k < per_req; ++k) r.block_table.push_back(i * per_req + k);
        r.sample = true;
        plan.requests.push_back(r);
      }
      plan.step_id = step_id++;
      if (auto out = runner.execute(plan); !out.ok()) {  // prefill
        std::fprintf(stderr, "%s\n", out.status().ToString().c_str());
        return 1;
      }
      for (auto& r : plan.requests) {
        r.first_position = kContext;
        r.token_ids = {scheduler::kTokenFromPreviousStep};
      }
      const int timed = profile ? 3 : steps;
      std::chrono::duration<double> elapsed{};
      for (int s = 0; s < timed; ++s) {
        plan.step_id = step_id++;
        const auto t0 = std::chrono::steady_clock::now();
        auto out = runner.execute(plan);
        elapsed += std::chrono::steady_clock::now() - t0;
        if (!out.ok()) {
          std::fprintf(stderr, "%s\n", out.status().ToString().c_str());
          return 1;
        }
        for (auto& r : plan.requests) ++r.first_position;
      }
      if (profile) {
        print_profile(batch, tensor_cores, config, **b, runner);
        continue;
      }
      const double step_s = elapsed.count() / timed;
      const double kv_bytes =
          2.0 * 2 * batch * (kContext + steps / 2.0) * config.num_layers * config.kv_size();
      const double floor_s = (weight_bytes + kv_bytes) / bandwidth;
      std::printf("%-14s %6d %10.3f %12.0f %10.3f %8.3f\n",
                  tensor_cores ? "persistent-tc" : (persistent ? "persistent" : "per-step"), batch,
                  step_s * 1e3, batch / step_s, floor_s * 1e3, floor_s / step_s);
    }
  }
  return run_overlap(config, weights, weight_bytes, bandwidth, steps, overlap_batches);
}

}  // namespace
}  // namespace megaserve::engine

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // a log cut off by a timeout keeps its lines
  const std::string config = argc > 1 ? argv[1] : "configs/models/llama-3.2-1b.json";
  const int steps = argc > 2 ? std::atoi(argv[2]) : 20;
  const bool overlap_only = argc > 3 && std::string(argv[3]) == "overlap";
  // "tc": only the tensor-core modes (the server's), then the overlap rows.
  const bool tensor_cores_only = argc > 3 && std::string(argv[3]) == "tc";
  const std::vector<int> batches =
      argc > 4 ? std::vector<int>{std::atoi(argv[4])} : std::vector<int>{1, 256};
  return megaserve::engine::run(config, steps, overlap_only, tensor_cores_only, batches);
}
