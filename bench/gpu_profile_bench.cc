// GPU profile benchmark of the CUDA megakernel on a large model shape (default
// configs/models/llama-3.1-8b.json, dummy bf16 weights), everything against floors measured
// in the same run:
//   - device copy bandwidth: cudaMemcpy device-to-device of 1 GiB, read + write counted;
//   - batch-1 decode (context 512): ms per token, host-inclusive (execute() call to return)
//     and on the device (profiled span), against the memory floor (weights + KV bytes over
//     the measured bandwidth), for each kernel variant;
//   - a decode step of 256 requests at context 512 and a prefill step of 8192 tokens, each
//     with the projections on wgmma and on mma.sync, profiled (and, wgmma only, the mixed
//     steps of a server under load: 255 decodes at context 512 beside one prompt of 256 or
//     2048 tokens, the step that admits a request; ShareGPT spends most of its time in
//     them): per-opcode busy time and achieved TFLOP/s and TB/s (engine/cuda/cuda_trace.h),
//     a per-SM Chrome trace of the first layers, and the prefill's compute floor (its FLOPs
//     over the bf16 matmul rate passed in, measured by scripts/gpu-suite with torch).
//
//   gpu_profile_bench [config.json] [out dir] [bf16 TFLOP/s, 0 = unknown]
// MEGASERVE_PROFILE_TILES="qkv_heads,hidden_cols,ffn_cols" replaces those three of
// gpu_tile_config, to compare tile shapes before changing the default.
// MEGASERVE_PROFILE_KV_SPLITS="1024,256,..." then profiles batch-1 decode at contexts 512 and
// 2048, decode 256 x 512 and the mixed step with each KV split size (TileConfig::
// kv_split_tokens), default kernel variant, device spans only.
// MEGASERVE_PROFILE_BOXES=N then profiles decode 256, the two mixed steps and the 8k prefill
// with the wgmma weights in 64-row TMA boxes and in 16-row ones, N rounds, interleaved.
// MEGASERVE_PROFILE_VARIANTS=N then profiles decode at batch 1, 8, 64 and 256, the mixed 256
// step and the 8k prefill under each kernel option not yet on by default (weights into L2
// ahead of their loads, decode attention's slice rotation, the KV fence on the reader), N
// rounds, interleaved.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench/gpu_bench_start.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_stages.h"
#include "engine/cuda/cuda_trace.h"
#include "engine/model/model_config.h"
#include "engine/model/weights.h"
#include "engine/step_runner.h"
#include "engine/step_trace.h"

namespace megaserve::engine {
namespace {

constexpr int32_t kBlock = kBenchBlockSize;
constexpr int kContext = 512;   // cached tokens of each decode request
constexpr int kBigBatch = 256;  // requests of the large decode step
constexpr int kPrefillTokens = 8192;
constexpr int kTimedSteps = 20;  // batch-1 decode steps per variant
constexpr int kTraceLayers = 2;  // layers 0..kTraceLayers-1 go into the Chrome traces

struct Variant {
  const char* name;
  bool tensor_cores;
  bool attention_cuda_cores = false;  // else bf16 tensor-core attention (the default)
  bool wgmma = true;                  // with tensor_cores: wgmma (the default), else mma.sync
  bool matvec_registers = true;       // matvec projections load weights into registers, not by bulk
};

// The tile shape from MEGASERVE_PROFILE_TILES, if set; nullopt (with a message) if malformed.
std::optional<TileConfig> tiles_from_env(bool* malformed) {
  *malformed = false;
  const char* text = std::getenv("MEGASERVE_PROFILE_TILES");
  if (text == nullptr || *text == '\0') return std::nullopt;
  const std::vector<std::string> parts = absl::StrSplit(text, ',');
  int values[3];
  if (parts.size() != 3 || !absl::SimpleAtoi(parts[0], &values[0]) ||
      !absl::SimpleAtoi(parts[1], &values[1]) || !absl::SimpleAtoi(parts[2], &values[2])) {
    std::fprintf(stderr, "MEGASERVE_PROFILE_TILES=%s: want qkv_heads,hidden_cols,ffn_cols\n", text);
    *malformed = true;
    return std::nullopt;
  }
  TileConfig c = gpu_tile_config();
  c.qkv_heads = values[0];
  c.hidden_cols = values[1];
  c.ffn_cols = values[2];
  return c;
}

// make_plan's `decodes` requests at `context`, then one request prefilling `prompt` tokens
// from position 0 in KV blocks after theirs.
scheduler::StepPlan make_mixed_plan(uint64_t step_id, int decodes, int context, int prompt) {
  scheduler::StepPlan plan = make_plan(step_id, decodes, context, 0);
  const int first_block = decodes * ((context + 1 + kBlock - 1) / kBlock);
  scheduler::StepRequest r;
  r.request_id = step_id * 100000 + decodes + 1;
  r.first_position = 0;
  r.token_ids.assign(prompt, 7);
  for (int k = 0; k < (prompt + kBlock - 1) / kBlock; ++k) r.block_table.push_back(first_block + k);
  r.sample = true;
  r.sampling.temperature = 0.0f;
  plan.requests.push_back(r);
  return plan;
}

void set_variant(CudaBackend& b, const Variant& v) {
  b.set_tensor_cores(v.tensor_cores);
  b.set_attention_cuda_cores(v.attention_cuda_cores);
  b.set_wgmma(v.wgmma);
  b.set_matvec_registers(v.matvec_registers);
}

// Runs one profiled step; prints its summary and writes its trace. Returns the span in µs.
double profiled_step(CudaBackend& b, StepRunner& runner, const ModelConfig& config,
                     const scheduler::StepPlan& plan, const std::string& label,
                     const std::string& trace_path) {
  b.set_profile(true);
  const auto t0 = std::chrono::steady_clock::now();
  auto out = runner.execute(plan);
  const double host_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  b.set_profile(false);
  if (!out.ok()) {
    std::printf("%s: %s\n", label.c_str(), out.status().ToString().c_str());
    return 0;
  }
  const TraceSummary s = summarize_trace(config, runner.last_step(), b.last_timings());
  std::printf("== %s: %zu instructions, execute() %.2f ms\n%s%s", label.c_str(),
              runner.last_step().ranks[0].instructions.size(), host_ms,
              format_trace_summary(s).c_str(),
              format_stage_path(stage_path(runner.last_step(), b.last_timings())).c_str());
  if (!trace_path.empty()) {
    absl::Status w =
        write_chrome_trace(trace_path, step_timeline(runner.last_step(), b.last_timings()),
                           {.max_layer = kTraceLayers - 1, .backend = b.describe()});
    std::printf("trace (layers < %d): %s %s\n", kTraceLayers, trace_path.c_str(),
                w.ok() ? "written" : w.ToString().c_str());
  }
  return s.span_us;
}

// The device span of `plan` (after one unprofiled warm-up of the same shape), in ms; 0 if
// the step failed.
double span_ms(CudaBackend& b, StepRunner& runner, const ModelConfig& config,
               const std::function<scheduler::StepPlan()>& make) {
  if (!runner.execute(make()).ok()) return 0;
  b.set_profile(true);
  const bool ok = runner.execute(make()).ok();
  b.set_profile(false);
  if (!ok) return 0;
  return summarize_trace(config, runner.last_step(), b.last_timings()).span_us * 1e-3;
}

// MEGASERVE_PROFILE_KV_SPLITS: a table of device spans by KV split size. False if the list is
// malformed or a step fails.
bool compare_kv_splits(CudaBackend& b, const ModelConfig& config, const std::string& list,
                       uint64_t& step_id) {
  std::vector<int> sizes;
  for (const absl::string_view part : absl::StrSplit(list, ',')) {
    int v = 0;
    if (!absl::SimpleAtoi(part, &v) || v < 1) {
      std::fprintf(stderr, "MEGASERVE_PROFILE_KV_SPLITS=%s: want sizes >= 1, comma-separated\n",
                   list.c_str());
      return false;
    }
    sizes.push_back(v);
  }
  std::printf("\nKV split size (device span, ms; wgmma, register matvec)\n");
  std::printf("%-10s %12s %12s %12s %12s\n", "keys", "b1 ctx512", "b1 ctx2048", "b256 ctx512",
              "mixed 256");
  for (const int size : sizes) {
    b.set_kv_split_tokens(size);
    StepRunner runner(config, b);
    const double b1 = span_ms(b, runner, config, [&] { return make_plan(step_id++, 1, 512, 0); });
    const double b1_long =
        span_ms(b, runner, config, [&] { return make_plan(step_id++, 1, 2048, 0); });
    const double big =
        span_ms(b, runner, config, [&] { return make_plan(step_id++, kBigBatch, kContext, 0); });
    const double mixed = span_ms(b, runner, config, [&] {
      return make_mixed_plan(step_id++, kBigBatch - 1, kContext, 256);
    });
    if (b1 == 0 || b1_long == 0 || big == 0 || mixed == 0) return false;
    std::printf("%-10d %12.3f %12.3f %12.3f %12.3f\n", size, b1, b1_long, big, mixed);
  }
  b.set_kv_split_tokens(gpu_tile_config().kv_split_tokens);
  return true;
}

// MEGASERVE_PROFILE_BOXES=N: device spans (ms) with the wgmma weights in 64-row TMA boxes
// (the default) and in 16-row ones, N rounds of wide then narrow, so that a drift over the run
// shows in both columns. False if a step fails.
bool compare_boxes(CudaBackend& b, const ModelConfig& config, int rounds, uint64_t& step_id) {
  std::printf("\nwgmma TMA boxes of 64 / 16 weight rows (device span, ms)\n");
  std::printf("%-6s %-6s %12s %12s %12s %12s\n", "round", "boxes", "b256 ctx512", "mixed 256",
              "mixed 2048", "prefill 8k");
  for (int r = 0; r < rounds; ++r) {
    for (const bool wide : {true, false}) {
      b.set_wgmma_wide_boxes(wide);
      StepRunner runner(config, b);
      const double big =
          span_ms(b, runner, config, [&] { return make_plan(step_id++, kBigBatch, kContext, 0); });
      const double mixed = span_ms(b, runner, config, [&] {
        return make_mixed_plan(step_id++, kBigBatch - 1, kContext, 256);
      });
      const double mixed_long = span_ms(b, runner, config, [&] {
        return make_mixed_plan(step_id++, kBigBatch - 1, kContext, 2048);
      });
      const double prefill =
          span_ms(b, runner, config, [&] { return make_plan(step_id++, 1, 0, kPrefillTokens); });
      if (big == 0 || mixed == 0 || mixed_long == 0 || prefill == 0) return false;
      std::printf("%-6d %-6d %12.3f %12.3f %12.3f %12.3f\n", r, wide ? 64 : 16, big, mixed,
                  mixed_long, prefill);
    }
  }
  b.set_wgmma_wide_boxes(true);
  return true;
}

// The kernel options not yet on by default, as gpu_profile_bench's variants table sets them.
struct Pending {
  const char* name;
  int l2_ahead;             // CudaBackendOptions::l2_ahead [L2_AHEAD]
  bool attention_rotation;  // [SLICE_ROTATION]
  bool kv_fence_on_reader;  // [KV_TMA]
};
constexpr Pending kPending[] = {
    {"default", 0, false, false},        {"l2-ahead-1", 1, false, false},
    {"l2-ahead-2", 2, false, false},     {"rotation", 0, true, false},
    {"fence-on-reader", 0, false, true}, {"all (l2 1)", 1, true, true},
};

void set_pending(CudaBackend& b, const Pending& p) {
  b.set_l2_ahead(p.l2_ahead);
  b.set_attention_rotation(p.attention_rotation);
  b.set_kv_fence_on_reader(p.kv_fence_on_reader);
}

// MEGASERVE_PROFILE_VARIANTS=N: device spans (ms) of decode at batch 1, 8, 64 and 256, the
// mixed 256 step and the 8k prefill under each of kPending, N rounds of them all, so that a
// drift over the run shows in every row. False if a step fails.
bool compare_pending(CudaBackend& b, const ModelConfig& config, int rounds, uint64_t& step_id) {
  std::printf("\nkernel options not yet on by default (device span, ms)\n");
  std::printf("%-6s %-16s %10s %10s %10s %10s %10s %10s\n", "round", "options", "b1", "b8", "b64",
              "b256", "mixed 256", "prefill 8k");
  for (int r = 0; r < rounds; ++r) {
    for (const Pending& p : kPending) {
      set_pending(b, p);
      StepRunner runner(config, b);
      double ms[6];
      int i = 0;
      for (const int batch : {1, 8, 64, kBigBatch}) {
        ms[i++] =
            span_ms(b, runner, config, [&] { return make_plan(step_id++, batch, kContext, 0); });
      }
      ms[i++] = span_ms(b, runner, config,
                        [&] { return make_mixed_plan(step_id++, kBigBatch - 1, kContext, 256); });
      ms[i++] =
          span_ms(b, runner, config, [&] { return make_plan(step_id++, 1, 0, kPrefillTokens); });
      for (const double m : ms) {
        if (m == 0) return false;
      }
      std::printf("%-6d %-16s %10.3f %10.3f %10.3f %10.3f %10.3f %10.3f\n", r, p.name, ms[0], ms[1],
                  ms[2], ms[3], ms[4], ms[5]);
    }
  }
  set_pending(b, kPending[0]);
  return true;
}

int run(const std::string& config_path, const std::string& out_dir, double bf16_tflops) {
  const std::optional<GpuBenchStart> start = start_gpu_bench("gpu_profile_bench", config_path);
  if (!start) return 1;
  const ModelConfig& config = start->config;
  const double bandwidth = start->bandwidth;

  const auto t_weights = std::chrono::steady_clock::now();
  ModelWeights weights = dummy_weights(config, DType::kBF16, 1);
  // Bytes a decode step must read: every decoder matrix and norm, the final norm and LM head;
  // of the embedding only the rows of its tokens (negligible).
  double weight_bytes = 0;
  const auto count = [&](const Tensor& t) { weight_bytes += t.empty() ? 0 : 2.0 * t.numel(); };
  count(weights.lm_head);
  count(weights.final_norm);
  for (const LayerWeights& l : weights.layers) {
    for (const Tensor* t :
         {&l.attn_norm, &l.ffn_norm, &l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) {
      count(*t);
    }
  }
  CudaBackendOptions o;
  o.kv_block_size = kBlock;
  o.num_kv_blocks =
      kBigBatch * ((kContext + 1 + kBlock - 1) / kBlock) + kPrefillTokens / kBlock + 16;
  o.persistent = true;
  o.step_watchdog_ms = 120000;  // the 8192-token prefill step
  bool malformed = false;
  o.tiles = tiles_from_env(&malformed);
  if (malformed) return 1;
  if (o.tiles) {
    std::printf("tiles from MEGASERVE_PROFILE_TILES: qkv_heads %d, hidden_cols %d, ffn_cols %d\n",
                o.tiles->qkv_heads, o.tiles->hidden_cols, o.tiles->ffn_cols);
  }
  auto backend = CudaBackend::create(config, std::move(weights), o);
  if (!backend.ok()) {
    std::fprintf(stderr, "%s\n", backend.status().ToString().c_str());
    return 1;
  }
  CudaBackend& b = **backend;
  StepRunner runner(config, b);
  std::printf("model %s: %.3f GB read per decode step (weights); set up in %.1f s\nbackend: %s\n",
              config_path.c_str(), weight_bytes * 1e-9,
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t_weights).count(),
              b.describe().c_str());

  // Batch 1 takes the CUDA-core matvec in every variant (one token row), its weights loaded
  // into registers (the default) or by bulk copies (kernels/tile_matvec_bulk.cuh).
  const Variant variants[] = {{"cuda-cores, register matvec", false, false, true, true},
                              {"wgmma, bulk-copy matvec", true, false, true, false},
                              {"wgmma, register matvec (default)", true, false, true, true}};
  uint64_t step_id = 0;
  // Batch-1 decode: one request, context kContext.
  const double kv_bytes_1 = 2.0 * 2 * (kContext + 1) * config.num_layers * config.kv_size();
  const double floor_1 = (weight_bytes + kv_bytes_1) / bandwidth;
  std::printf("\nbatch-1 decode, context %d: memory floor %.3f ms (%.3f GB at %.3f TB/s)\n",
              kContext, floor_1 * 1e3, (weight_bytes + kv_bytes_1) * 1e-9, bandwidth * 1e-12);
  std::printf("%-42s %12s %12s %12s %12s\n", "variant", "host_ms/tok", "floor/host", "device_ms",
              "floor/dev");
  for (const Variant& v : variants) {
    set_variant(b, v);
    double elapsed = 0;
    bool ok = true;
    for (int s = 0; s < kTimedSteps + 2 && ok; ++s) {
      const scheduler::StepPlan plan = make_plan(step_id++, 1, kContext, 0);
      const auto t0 = std::chrono::steady_clock::now();
      auto out = runner.execute(plan);
      if (s >= 2)
        elapsed += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      ok = out.ok();
      if (!ok) std::printf("%s: %s\n", v.name, out.status().ToString().c_str());
    }
    if (!ok) return 1;
    b.set_profile(true);
    auto out = runner.execute(make_plan(step_id++, 1, kContext, 0));
    b.set_profile(false);
    if (!out.ok()) return 1;
    const TraceSummary s = summarize_trace(config, runner.last_step(), b.last_timings());
    const double host_s = elapsed / kTimedSteps, dev_s = s.span_us * 1e-6;
    std::printf("%-42s %12.3f %12.3f %12.3f %12.3f\n", v.name, host_s * 1e3, floor_1 / host_s,
                dev_s * 1e3, floor_1 / dev_s);
    std::printf("%s%s", format_trace_summary(s).c_str(),
                format_stage_path(stage_path(runner.last_step(), b.last_timings())).c_str());
  }

  // Decode at batch kBigBatch, tensor-core attention: projections on mma.sync and on wgmma.
  const double kv_bytes_big = kBigBatch * kv_bytes_1;
  const double floor_big = (weight_bytes + kv_bytes_big) / bandwidth;
  std::printf("\ndecode %d requests x context %d: memory floor %.3f ms (%.2f GB)\n", kBigBatch,
              kContext, floor_big * 1e3, (weight_bytes + kv_bytes_big) * 1e-9);
  for (int k = 0; k < 2; ++k) {
    const Variant v = variants[1 + k];
    set_variant(b, v);
    (void)runner.execute(make_plan(step_id++, kBigBatch, kContext, 0));  // warm-up
    const std::string trace = out_dir.empty() ? ""
                                              : out_dir + (k == 0 ? "/decode256_mma.trace.json"
                                                                  : "/decode256.trace.json");
    const double span =
        profiled_step(b, runner, config, make_plan(step_id++, kBigBatch, kContext, 0),
                      std::string("decode batch 256, ") + v.name, trace);
    if (span > 0) {
      std::printf("device span %.3f ms, floor/span %.3f, %.0f tok/s on the device\n", span * 1e-3,
                  floor_big / (span * 1e-6), kBigBatch / (span * 1e-6));
    }
  }

  // Mixed steps: 255 decodes beside one new prompt, as a loaded server admits a request into a
  // full batch; each prompt token's cost is the step's span beyond decode 256's.
  set_variant(b, variants[2]);
  for (const int prompt : {256, 2048}) {
    const scheduler::StepPlan mixed = make_mixed_plan(step_id++, kBigBatch - 1, kContext, prompt);
    (void)runner.execute(mixed);  // warm-up
    const double span = profiled_step(b, runner, config,
                                      make_mixed_plan(step_id++, kBigBatch - 1, kContext, prompt),
                                      "mixed: 255 decodes x context 512 + one prompt of " +
                                          std::to_string(prompt) + " tokens, wgmma",
                                      "");
    if (span > 0) std::printf("device span %.3f ms\n", span * 1e-3);
  }

  // One 8192-token prefill step (a single request), tensor-core attention: projections on
  // wgmma (the default, traced), then on mma.sync.
  const Variant prefill_variants[] = {variants[2], variants[1]};
  for (const Variant& v : prefill_variants) {
    set_variant(b, v);
    const scheduler::StepPlan prefill = make_plan(step_id++, 1, 0, kPrefillTokens);
    b.set_profile(true);
    auto out = runner.execute(prefill);
    b.set_profile(false);
    if (!out.ok()) {
      std::printf("prefill: %s\n", out.status().ToString().c_str());
      return 1;
    }
    const TraceSummary s = summarize_trace(config, runner.last_step(), b.last_timings());
    std::printf("\n== prefill %d tokens, %s: %zu instructions\n%s", kPrefillTokens, v.name,
                runner.last_step().ranks[0].instructions.size(), format_trace_summary(s).c_str());
    if (!out_dir.empty() && &v == &prefill_variants[0]) {
      const std::string path = out_dir + "/prefill8k.trace.json";
      absl::Status w = write_chrome_trace(path, step_timeline(runner.last_step(), b.last_timings()),
                                          {.max_layer = 0, .backend = b.describe()});
      std::printf("trace (layer 0): %s %s\n", path.c_str(),
                  w.ok() ? "written" : w.ToString().c_str());
    }
    if (bf16_tflops > 0) {
      const double floor_s = s.flops / (bf16_tflops * 1e12);
      std::printf(
          "prefill compute floor: %.3f TFLOP at %.1f TFLOP/s (bf16 matmul) = %.3f ms; step %.3f "
          "ms; floor/step %.4f; achieved %.1f TFLOP/s\n",
          s.flops * 1e-12, bf16_tflops, floor_s * 1e3, s.span_us * 1e-3,
          floor_s / (s.span_us * 1e-6), s.flops / (s.span_us * 1e-6) * 1e-12);
    } else {
      std::printf("prefill: %.3f TFLOP in %.3f ms (no bf16 rate given: no compute floor)\n",
                  s.flops * 1e-12, s.span_us * 1e-3);
    }
  }
  // Last, after every figure above: on an H100, a prefill profiled after these steps ran 14%
  // slower, in ops no change under test touched (gate/up, down, the LM head).
  if (const char* splits = std::getenv("MEGASERVE_PROFILE_KV_SPLITS")) {
    if (!compare_kv_splits(b, config, splits, step_id)) return 1;
  }
  if (const char* rounds = std::getenv("MEGASERVE_PROFILE_BOXES")) {
    if (!compare_boxes(b, config, std::max(1, std::atoi(rounds)), step_id)) return 1;
  }
  if (const char* rounds = std::getenv("MEGASERVE_PROFILE_VARIANTS")) {
    if (!compare_pending(b, config, std::max(1, std::atoi(rounds)), step_id)) return 1;
  }
  return 0;
}

}  // namespace
}  // namespace megaserve::engine

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // a log cut off by a timeout keeps its lines
  const std::string config = argc > 1 ? argv[1] : "configs/models/llama-3.1-8b.json";
  const std::string out_dir = argc > 2 ? argv[2] : "";
  const double tflops = argc > 3 ? std::atof(argv[3]) : 0;
  return megaserve::engine::run(config, out_dir, tflops);
}
