// ScheduleBuilder cost per step for a Llama-3.1-8B shape on a 132-SM GPU tile config, at 1,
// 64 and 1024 running decode requests (contexts ~512-1500 tokens), tensor parallel 1 and 8.
// Prints mean build time per step and the instruction count; not a test.
//
//   megaserve-schedule-bench [path/to/llama-3.1-8b.json]
#include <chrono>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <sstream>
#include <string>

#include "engine/model/model_config.h"
#include "engine/planner/schedule_builder.h"
#include "engine/planner/tile_config.h"

namespace {

using megaserve::engine::ModelConfig;

ModelConfig llama_8b(const std::string& path) {
  std::ifstream in(path);
  if (in) {
    std::stringstream text;
    text << in.rdbuf();
    auto c = megaserve::engine::parse_model_config(text.str(), path);
    if (c.ok()) return *c;
    std::fprintf(stderr, "%s: %s; using the built-in shape\n", path.c_str(),
                 c.status().ToString().c_str());
  }
  ModelConfig c;  // Llama-3.1-8B
  c.hidden_size = 4096;
  c.intermediate_size = 14336;
  c.num_layers = 32;
  c.num_heads = 32;
  c.num_kv_heads = 8;
  c.head_dim = 128;
  c.vocab_size = 128256;
  c.max_position_embeddings = 131072;
  return c;
}

megaserve::scheduler::StepPlan decode_plan(int requests, uint64_t step) {
  megaserve::scheduler::StepPlan plan;
  plan.step_id = step;
  plan.kv_block_size = 16;
  int next_block = 0;
  for (int i = 0; i < requests; ++i) {
    megaserve::scheduler::StepRequest r;
    r.request_id = i;
    r.first_position = 512 + (i * 37) % 1000;
    r.token_ids = {1};
    const int blocks = (r.context_length() + 15) / 16;
    for (int b = 0; b < blocks; ++b) r.block_table.push_back(next_block++);
    r.sample = true;
    plan.requests.push_back(std::move(r));
  }
  return plan;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string path = argc > 1 ? argv[1] : "configs/models/llama-3.1-8b.json";
  const ModelConfig config = llama_8b(path);
  std::printf(
      "model: hidden %d, %d layers, %d/%d heads, ffn %d, vocab %d; tiles: gpu_tile_config(132)\n",
      config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads,
      config.intermediate_size, config.vocab_size);
  // CPU time of this process (the shared box runs other jobs, which inflates wall time).
  std::printf("%4s %9s %14s %16s %16s %14s\n", "tp", "requests", "instructions", "cpu us/step",
              "wall us/step", "cpu ns/instr");
  for (int tp : {1, 8}) {
    for (int requests : {1, 64, 1024}) {
      megaserve::engine::ScheduleBuilder builder(config, megaserve::engine::gpu_tile_config(132),
                                                 tp);
      const auto plan = decode_plan(requests, 0);
      size_t instructions = 0;
      const int iterations = requests >= 1024 ? 20 : 200;
      megaserve::engine::Step step;
      // The first build allocates; later ones reuse the step's and the builder's buffers.
      if (absl::Status s = builder.build_into(plan, 0, step); !s.ok()) {
        std::fprintf(stderr, "%s\n", s.ToString().c_str());
        return 1;
      }
      const auto start = std::chrono::steady_clock::now();
      const std::clock_t cpu_start = std::clock();
      for (int it = 0; it < iterations; ++it) {
        if (!builder.build_into(plan, 0, step).ok()) return 1;
        instructions = 0;
        for (const auto& r : step.ranks) instructions += r.instructions.size();
      }
      const double wall_us =
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start)
              .count() /
          iterations;
      const double us =
          1e6 * static_cast<double>(std::clock() - cpu_start) / CLOCKS_PER_SEC / iterations;
      std::printf("%4d %9d %14zu %16.1f %16.1f %14.1f\n", tp, requests, instructions, us, wall_us,
                  1000.0 * us / static_cast<double>(instructions));
    }
  }
  return 0;
}
