// CudaBackend: the GPU twin of CpuBackend (engine/cpu/cpu_backend.h). It holds the model's bf16
// weights, the bf16 paged KV cache, the step workspace and the barriers in device memory;
// submit() uploads a built step's queues and metadata (built by the engine's StepRunner for
// schedule_target(), a GPU TileConfig) into one of two step slots and posts it to the
// megakernel (kernels/megakernel.h: persistently through the step ring, or one launch per
// step) while the previous step may still run; collect() waits for the oldest step and reads
// back its sampled tokens.
//
// Overlap: an input that refers to the previous step's sampling row (isa::previous_sample_ref,
// [PREVIOUS_SAMPLE]) is resolved on the device (the embedding reads the previous step's
// sampled id) when that step is still running. submit() first waits for the previous step
// when its workspace must be read (host_sampling, profiling, barrier checks), when the
// workspace is poisoned, or when the step needs bigger buffers (a reallocation stops the
// persistent kernel), and then resolves references on the host. (When a row's penalties need
// the token the previous step samples, the StepRunner collects that step before submitting.)
//
// Tensor parallelism: only the debug placement so far, every rank on one GPU
// (tp_ranks_on_one_gpu; kernels/megakernel.h [TP_PLACEMENT], docs/tensor-parallel.md): one
// launch whose CTAs are split into tp groups, each rank with its own weight shard, KV cache,
// queues, barriers and workspace. A step that does not complete within the watchdog, or any
// CUDA error, fails the call that sees it and every later call (never a hang), steps in
// flight included.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/cuda/cuda_trace.h"
#include "engine/isa/isa.h"
#include "engine/model/model_config.h"
#include "engine/model/weights.h"
#include "engine/planner/tile_config.h"

namespace megaserve::engine {

struct CudaBackendOptions {
  int device = 0;  // CUDA device ordinal
  // Tensor-parallel ranks. Above 1 only with tp_ranks_on_one_gpu: the ranks share this one
  // GPU's SMs (the debug placement, which tests the whole peer protocol on one GPU); the
  // placement over several GPUs is not implemented, and is refused.
  int tensor_parallel = 1;
  bool tp_ranks_on_one_gpu = false;
  int32_t kv_block_size = 16;
  // 0: as many blocks as fit in memory_fraction of the free memory left after the weights
  // and a reserve for the workspace.
  int32_t num_kv_blocks = 0;
  double memory_fraction = 0.9;
  // Persistent kernel fed through the step ring (else one launch per step).
  bool persistent = true;
  // A step that takes longer fails execute() and breaks the backend.
  int step_watchdog_ms = 10000;
  // Tile shapes; default gpu_tile_config(CTAs per rank) (engine/planner/tile_config.h).
  // num_sms is always the number of CTAs per rank: num_sms when > 0, else the device's SM
  // count divided by tensor_parallel.
  std::optional<TileConfig> tiles;
  int num_sms = 0;
  // Tests: fill the workspace with NaN before every step (unwritten reads show up as NaN),
  // and compare the barriers with the step's barrier_end after it.
  bool poison_workspace = false;
  bool check_barriers = false;
  // Token rows of the bf16 FFN activations, attention outputs and normalized rows that the
  // down, output, QKV and gate/up projections' wgmma passes read (kernels::DeviceModel::
  // ffn_act, attn_act, norm_act; rows past it are converted from the fp32 ones; 0: none,
  // every row converted, and no norm stages). Every tensor-parallel rank keeps its own, of its
  // shard's widths (the normalized rows are the full hidden size on each). Tests lower it to
  // run both kinds of pass in one step.
  int bf16_act_rows = 8192;
  // Projections on bf16 tensor cores where the reduction width is a multiple of 8: with
  // `wgmma`, Hopper's wgmma with TMA-fed weights and bf16 activations (kernels/tile_wgmma.cuh,
  // every tile); without, mma.sync m16n8k16 with each fp32 activation as a bf16 hi + lo pair
  // (tiles of more than one token row). Accumulation is fp32. When false, CUDA cores (fp32
  // FMA).
  bool tensor_cores = true;
  // On by default since its cp.async version: 2.8x mma.sync's prefill and 2.5x its decode of
  // 256 requests on an H100, batch 1 unchanged (bench/RESULTS.md). Steps fall back to
  // mma.sync where the weights have no TMA descriptors.
  bool wgmma = true;
  // With wgmma: the shallow pipeline (3 weight stages, 2 activation slots) for every op, not
  // only where an op lacks the shared memory of the deep one (4 and 3; kernels/tile_wgmma.cuh).
  bool wgmma_shallow = false;
  // With wgmma: four weight groups of consecutive rows of one matrix in one TMA box of 64 rows
  // (kernels/tile_wgmma.cuh [WIDE_BOX]); false: a box per 16-row group, as before.
  bool wgmma_wide_boxes = true;
  // Projections start their weights into L2 ahead of their loads, the first ones before the
  // instruction's waits (kernels::kStepL2Ahead [L2_AHEAD]): 1, kernels' kMatvecL2Ahead columns
  // and kWgmmaL2Ahead k-blocks ahead; 2, twice as far; 0, not at all. 0 until a GPU run
  // measures it (gpu_profile_bench's MEGASERVE_PROFILE_VARIANTS).
  int l2_ahead = 0;
  // Decode attention by TMA with its slices rotated over the warps and each request merged by
  // its last warp (kernels::kStepAttentionRotation [SLICE_ROTATION]); and the KV proxy fence
  // on the attention's loading lanes instead of every QKV thread (kStepKvFenceOnReader). Off
  // until a GPU run measures them.
  bool attention_rotation = false;
  bool kv_fence_on_reader = false;
  // CUDA-core projections (up to kMaxMatvecRows token rows, or no tensor cores) load weights
  // into registers instead of streaming them by bulk copies into shared memory
  // (kernels/tile_matvec_bulk.cuh). Registers by default: at Llama-3.1-8B batch 1 on an H100
  // the bulk copies' tiles were busy 5-15% less, but each QKV, gate/up and down stage began
  // 10-13 us after the previous one ended against 2-5 us (the stage table's wake-up; the
  // prefetched segments, 224 KB per SM issued before the wait, seem to delay the wait's own
  // loads), and the step took 9.90 ms against 9.47 (bench/RESULTS.md, 2026-12-07).
  bool matvec_registers = true;
  // kAttention on CUDA cores (keys spread over the warps) instead of bf16 tensor cores
  // (kernels/op_attention_mma.cuh, the default for head dims 64 and 128; other head dims
  // always run on CUDA cores).
  bool attention_cuda_cores = false;
  // Tests: sample every row on the host (engine::sample_token) from the device's logits read
  // back, instead of the device's sample op; to compare the two on the same logits.
  bool host_sampling = false;
  // Record every instruction's buffer regions and run the static verifier on every step
  // before it is submitted (ScheduleTarget::verify): tests, and the server's verify_schedules.
  bool verify_schedules = false;
  // Benchmarks: record per-instruction timestamps and SMs on the device
  // (CudaBackend::last_timings, engine/cuda/cuda_trace.h).
  bool profile = false;
};

// Device-to-device copy bandwidth of `device` in bytes per second, read + write counted:
// `copies` cudaMemcpy of `bytes` between two buffers, timed with events after a warm-up. The
// memory floor of the benchmarks (bench/gpu_*.cc) is bytes to read over this.
absl::StatusOr<double> device_copy_bandwidth(int device, size_t bytes = size_t{1} << 30,
                                             int copies = 10);

// True when a supported (Hopper, sm_90) GPU is visible; else false with the reason in `why`.
bool cuda_backend_supported(std::string* why);

// What CudaBackend::create would refuse about the tensor-parallel degree, checked before any
// weight is loaded: a degree outside [1, kernels::kMaxTpRanks] or one that does not divide
// the heads (check_tensor_parallel); without ranks_on_one_gpu, more ranks than visible GPUs,
// and otherwise any degree above 1 (the multi-GPU placement is not implemented); with it, a
// missing device or fewer SMs than ranks.
absl::Status check_cuda_tensor_parallel(const ModelConfig& config, int tp, bool ranks_on_one_gpu,
                                        int device);

struct CudaState;  // device allocations, streams, mapped control words (cuda_backend.cc)

class CudaBackend : public Backend {
 public:
  // `weights` may be fp32, fp16 or bf16 on the host; they are converted to bf16 and uploaded.
  static absl::StatusOr<std::unique_ptr<CudaBackend>> create(const ModelConfig& config,
                                                             ModelWeights weights,
                                                             const CudaBackendOptions& options);
  ~CudaBackend() override;

  std::string describe() const override;
  int32_t num_kv_blocks() const override { return num_kv_blocks_; }
  int32_t kv_block_size() const override { return options_.kv_block_size; }
  ScheduleTarget schedule_target() const override;
  // execute() is submit() then collect(), with no step in flight.
  absl::StatusOr<scheduler::StepOutput> execute(const Step& step) override;
  absl::Status submit(const Step& step) override;
  absl::StatusOr<scheduler::StepOutput> collect() override;
  int steps_in_flight() const override { return static_cast<int>(in_flight_.size()); }
  // Submitted steps that were posted while the step before them was still running (for
  // tests and benchmarks: how often the overlap happened).
  int64_t overlapped_posts() const { return overlapped_posts_; }

  // For tests and benchmarks: the full-vocabulary logits of sampling row `sample` of the
  // last collected step (read back from the device; valid while no later step is in
  // flight).
  absl::StatusOr<std::vector<float>> logits(int sample) const;
  int num_sms() const { return tiles_.num_sms; }  // CTAs per rank
  // With profile on: per instruction of the last finished step's ranks[0] (the StepRunner's
  // last_step() once collected), its device timestamps.
  const std::vector<InstructionTiming>& last_timings() const { return last_timings_; }
  // Per-step choices, applied from the next submit() on (the resident kernel reads them
  // from each step's descriptor): benchmarks compare variants on one upload of the weights.
  void set_profile(bool on) { options_.profile = on; }
  // Backend::record_timings: the profile above; each profiled step's timestamps are also kept
  // for take_timings() once it is finished.
  bool record_timings(bool on) override {
    options_.profile = on;
    return true;
  }
  void set_tensor_cores(bool on) { options_.tensor_cores = on; }
  void set_wgmma(bool on) { options_.wgmma = on; }
  void set_wgmma_shallow(bool on) { options_.wgmma_shallow = on; }
  void set_wgmma_wide_boxes(bool on) { options_.wgmma_wide_boxes = on; }
  void set_l2_ahead(int level) { options_.l2_ahead = level; }
  void set_attention_rotation(bool on) { options_.attention_rotation = on; }
  void set_kv_fence_on_reader(bool on) { options_.kv_fence_on_reader = on; }
  void set_matvec_registers(bool on) { options_.matvec_registers = on; }
  void set_attention_cuda_cores(bool on) { options_.attention_cuda_cores = on; }
  void set_host_sampling(bool on) { options_.host_sampling = on; }
  // For benchmarks comparing KV split sizes (TileConfig::kv_split_tokens, >= 1): seen by the
  // StepRunners made after the call (each takes its schedule target once).
  void set_kv_split_tokens(int tokens) { tiles_.kv_split_tokens = tokens; }

 private:
  struct InFlight;  // a step posted to the device and not yet collected (cuda_backend.cc)

  CudaBackend();
  absl::Status fail(absl::Status s);  // marks the backend broken
  // Waits for `f` (its watchdog counted from when it could start) and reads back its
  // samples; idempotent. Steps finish in order.
  absl::Status finish(InFlight& f);

  ModelConfig config_;
  CudaBackendOptions options_;
  TileConfig tiles_;
  int32_t num_kv_blocks_ = 0;
  std::string device_name_;
  std::unique_ptr<CudaState> state_;
  std::deque<std::unique_ptr<InFlight>> in_flight_;  // oldest first, kMaxStepsInFlight at most
  // The last finished step's sampled ids in row order, for references resolved on the host.
  std::vector<int32_t> previous_sampled_ids_;
  // The last submitted step: its sampling rows, and whether the device sampled them (else
  // the host did, and the device has no ids to read for references).
  int32_t previous_num_samples_ = 0;
  bool previous_device_sampled_ = true;
  std::vector<int32_t> resolved_token_ids_;  // a step's input ids, references resolved
  std::chrono::steady_clock::time_point last_finished_;
  int64_t overlapped_posts_ = 0;
  std::vector<InstructionTiming> last_timings_;
  bool broken_ = false;
};

}  // namespace megaserve::engine
