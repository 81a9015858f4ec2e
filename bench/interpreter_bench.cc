// CPU interpreter decode throughput on stories260K: a batch of 1 or 32 requests prefilled
// from BOS, then timed decode steps (build + run + sample, greedy). Prints tokens/s per
// execution mode; not a test.
//
//   megaserve-interpreter-bench [path/to/stories260K-hf]
#include <chrono>
#include <cstdio>
#include <ctime>
#include <string>

#include "engine/cpu/cpu_backend.h"
#include "engine/model/model_config.h"
#include "engine/model/weights.h"
#include "engine/step_runner.h"

namespace {

using namespace megaserve;

struct Rate {
  double wall = 0;  // tokens per wall-clock second
  double cpu = 0;   // tokens per second of this process's CPU time (all threads)
};

Rate decode_tokens_per_second(engine::StepRunner& runner, int batch, int steps) {
  scheduler::StepPlan plan;
  plan.kv_block_size = runner.target().kv_block_size;
  for (int i = 0; i < batch; ++i) {
    scheduler::StepRequest r;
    r.request_id = i;
    r.token_ids = {1};
    for (int b = 0; b < 16; ++b) r.block_table.push_back(i * 16 + b);  // 256 tokens each
    r.sample = true;
    r.sampling.temperature = 0.0f;
    plan.requests.push_back(r);
  }
  if (!runner.execute(plan).ok()) return {};  // prefill BOS
  const auto start = std::chrono::steady_clock::now();
  const std::clock_t cpu_start = std::clock();
  for (int s = 1; s <= steps; ++s) {
    plan.step_id = s;
    for (auto& r : plan.requests) {
      r.first_position = s;
      r.token_ids = {scheduler::kTokenFromPreviousStep};
    }
    auto out = runner.execute(plan);
    if (!out.ok()) {
      std::fprintf(stderr, "%s\n", out.status().ToString().c_str());
      return {};
    }
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double cpu_seconds = static_cast<double>(std::clock() - cpu_start) / CLOCKS_PER_SEC;
  return {batch * steps / seconds, batch * steps / cpu_seconds};
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : "../shared/assets/models/stories260K-hf";
  auto config = engine::load_model_config(dir);
  if (!config.ok()) {
    std::fprintf(stderr, "%s\n", config.status().ToString().c_str());
    return 1;
  }
  auto weights = engine::load_weights(dir, *config, engine::DType::kF32);
  if (!weights.ok()) {
    std::fprintf(stderr, "%s\n", weights.status().ToString().c_str());
    return 1;
  }
  struct Mode {
    const char* name;
    engine::ExecutionMode mode;
    int sms;
    int tp;
  };
  const Mode modes[] = {{"sequential, 1 SM, tp 1", engine::ExecutionMode::kSequential, 1, 1},
                        {"threaded, 2 SMs, tp 1", engine::ExecutionMode::kThreaded, 2, 1},
                        {"sequential, 1 SM, tp 2", engine::ExecutionMode::kSequential, 1, 2}};
  std::printf("stories260K decode, 200 steps after a BOS prefill, greedy\n");
  std::printf("%-26s %8s %14s %18s\n", "mode", "batch", "wall tokens/s", "tokens/cpu-second");
  for (const Mode& m : modes) {
    for (int batch : {1, 32}) {
      engine::CpuBackendOptions options;
      options.tensor_parallel = m.tp;
      options.num_sms = m.sms;
      options.num_kv_blocks = 32 * 16;
      options.kv_block_size = 16;
      options.execution.mode = m.mode;
      auto backend = engine::CpuBackend::create(*config, *weights, options);
      if (!backend.ok()) {
        std::fprintf(stderr, "%s\n", backend.status().ToString().c_str());
        return 1;
      }
      engine::StepRunner runner(*config, **backend);
      const Rate rate = decode_tokens_per_second(runner, batch, 200);
      std::printf("%-26s %8d %14.0f %18.0f\n", m.name, batch, rate.wall, rate.cpu);
    }
  }
  return 0;
}
