// The CPU interpreter: executes a Step's instruction queues exactly as the megakernel will,
// in fp32 (or rounding activations to bf16 where the GPU does: round_activations_bf16), for
// `tp` simulated tensor-parallel ranks in one process. Each rank has its own weights view,
// paged KV cache, workspace and barriers; TP exchanges read peers' buffers as GPUs read peer
// memory. Barriers persist across steps and are never reset.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/cpu/cpu_ops.h"
#include "engine/cpu/cpu_worker_pool.h"
#include "engine/isa/step.h"
#include "engine/model/model_config.h"
#include "engine/model/weights.h"
#include "scheduler/step_plan.h"

namespace megaserve::engine {

enum class ExecutionMode {
  // One thread runs the step's global order: deterministic, and possible only because each
  // queue is a subsequence of it.
  kSequential,
  // One thread repeatedly picks, with a seeded generator, a random (rank, SM) whose next
  // instruction's waits are satisfied: a random interleaving the waits allow.
  kShuffled,
  // One thread per (rank, SM) queue, as CTAs on a GPU (persistent between steps): spins
  // (yielding) on acquire loads of the barriers, signals with release increments.
  kThreaded,
};

struct ExecutionOptions {
  ExecutionMode mode = ExecutionMode::kSequential;
  uint64_t seed = 0;  // kShuffled
  // Fill every workspace buffer with NaN before the step, so that reading anything the step
  // did not write shows up in the outputs.
  bool poison_workspace = false;
  // kThreaded: a wait that spins longer than this fails the step instead of hanging.
  double wait_timeout_seconds = 30.0;
  // Round activations to bf16 (round to nearest even) where the GPU megakernel stores them
  // as bf16, so that the interpreter is the GPU's tight numerical reference (DESIGN.md §5,
  // accuracy standard): the normalized row that kQkvRope, kGateUpSilu and kLmHead project,
  // and the input rows of kOProj (attn_out) and kDownProj (act), each element rounded before
  // the fp32 dot products; and the keys and values written to the KV cache. The residual, q,
  // attention arithmetic, RoPE and sampling stay fp32.
  bool round_activations_bf16 = false;
  // When set: one record per instruction of rank 0 (parallel to its instructions), steady
  // clock nanoseconds, sm = the queue (virtual SM) that ran it. For the step timeline.
  std::vector<InstructionTiming>* timings = nullptr;
};

class CpuInterpreter {
 public:
  // `weights` (dtype kF32, kBF16 or kF16) must outlive the interpreter; it is viewed, not
  // copied. `num_barriers` comes from the ScheduleBuilder.
  static absl::StatusOr<std::unique_ptr<CpuInterpreter>> create(const ModelConfig& config,
                                                                const ModelWeights& weights, int tp,
                                                                int32_t num_kv_blocks,
                                                                int32_t kv_block_size,
                                                                int num_barriers);

  // Runs every instruction of `step`; on success `sampled` holds one token per sampling row.
  // The barriers must read the step's barrier_begin values (steps run in build order).
  // Input ids that are references to the previous step's sampling rows
  // (isa::previous_sample_ref, [PREVIOUS_SAMPLE]) read `previous_samples` (that step's
  // sampled ids in row order), as the megakernel's embedding reads them on the device.
  absl::Status run(const Step& step, const ExecutionOptions& options,
                   std::vector<scheduler::SampledToken>* sampled,
                   std::span<const int32_t> previous_samples = {});

  // The full-vocabulary logits of sampling row `sample` of the last step (rank order).
  std::vector<float> logits(int sample) const;
  uint32_t barrier(int rank, int index) const;
  // Sets every barrier counter (a fresh device's counters need not start at 0).
  void set_barriers(uint32_t value);
  int tp() const { return static_cast<int>(ranks_.size()); }
  int32_t num_kv_blocks() const { return num_kv_blocks_; }
  int32_t kv_block_size() const { return kv_block_size_; }

 private:
  CpuInterpreter() = default;
  // Checks `step`, its input ids as resolved into token_ids_ included.
  absl::Status check_step(const Step& step) const;
  // Fills token_ids_: the step's input ids with references resolved.
  absl::Status resolve_token_ids(const Step& step, std::span<const int32_t> previous_samples);
  void prepare_workspaces(const Step& step, bool poison);
  class TimingRecorder;  // ExecutionOptions::timings (cpu_interpreter.cc)
  absl::Status run_sequential(const Step& step, const cpu::OpContext& ctx, TimingRecorder& timer);
  // Instructions [begin, end) of one rank's queue.
  struct QueueRange {
    int rank;
    int32_t begin, end;
  };
  std::vector<QueueRange> non_empty_queues(const Step& step) const;
  absl::Status run_shuffled(const Step& step, const cpu::OpContext& ctx, uint64_t seed,
                            TimingRecorder& timer);
  absl::Status run_threaded(const Step& step, const cpu::OpContext& ctx, double timeout,
                            TimingRecorder& timer);
  bool ready(const Step& step, int rank, const isa::Instruction& inst) const;
  void signal(const isa::Instruction& inst);

  ModelConfig config_;
  std::vector<float> inv_freq_;
  int32_t num_kv_blocks_ = 0;
  int32_t kv_block_size_ = 0;
  int num_barriers_ = 0;
  std::vector<cpu::RankState> ranks_;
  std::vector<std::unique_ptr<std::atomic<uint32_t>[]>> barriers_;  // [rank][barrier]
  std::unique_ptr<cpu::WorkerPool> pool_;                           // kThreaded, made on use
  std::vector<int32_t> token_ids_;  // [num_tokens] the running step's input ids, resolved
};

}  // namespace megaserve::engine
