// Step: what the ScheduleBuilder produces from one StepPlan and an executor runs. Per
// tensor-parallel rank, per-SM instruction queues; the step's metadata (shared by all ranks);
// barrier bookkeeping; and, when recorded, the buffer regions every instruction touches
// (for the static verifier).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "engine/isa/isa.h"
#include "engine/isa/sampling.h"
#include "scheduler/sampling_params.h"

namespace megaserve::engine {

// Buffers an instruction touches. Workspace buffers hold one step's activations (rows are
// token rows unless noted); the KV caches persist across steps.
enum class BufferId : int32_t {
  kResidual,  // [num_tokens, hidden] fp32
  kQ,         // [num_tokens, q_heads * head_dim]      after RoPE
  kAttnOut,   // [num_tokens, q_heads * head_dim]
  kSplitOut,  // [num_split_rows, head_dim]           normalized partial outputs
  kSplitLse,  // [num_split_rows]                     their log-sum-exp
  kPartial,   // [partial_slots_of(step) * num_tokens, hidden] TP or split-K partial sums
  kAct,       // [num_tokens, ffn_cols]               SiLU(gate) * up
  kLogits,    // [num_samples, vocab_cols]
  kSampled,   // [num_samples]                        rank 0 only
  kKCache,    // per layer, [num_blocks * kv_heads, block_size * head_dim]
  kVCache,
  kNormed,  // [num_tokens, hidden] bf16             RMSNorm output (kRmsNorm)
  kNumBuffers,
};
const char* buffer_name(BufferId id);

// Two partial slots alternate between consecutive TP reductions; the chain of waits between
// them (every rank's reduction k precedes its partial k+1, which precedes every rank's
// reduction k+1) orders slot reuse, and the verifier checks it.
inline constexpr int kNumPartialSlots = 2;

// A rectangle of a buffer viewed as rows x bytes: rows [row_begin, row_end), bytes
// [byte_begin, byte_end) of each row, on one rank (and one layer for the KV caches).
struct Region {
  int32_t rank = 0;
  BufferId buffer = BufferId::kResidual;
  int32_t layer = -1;
  int64_t row_begin = 0, row_end = 0;
  int64_t byte_begin = 0, byte_end = 0;
};

struct Access {
  Region region;
  bool write = false;
};

// Per-request sampling inputs. The spans point into the StepPlan, which must outlive the
// Step's execution.
struct RequestSampling {
  uint64_t request_id = 0;
  scheduler::SamplingParams params;
  std::span<const int32_t> prompt_token_ids;
  std::span<const int32_t> output_token_ids;
  std::vector<int32_t> banned_token_ids;  // resolved by the scheduler (min_tokens)
  uint64_t seed = 0;
  int32_t output_token_index = 0;  // index in the output of the token drawn this step
};

// What engine::sample_token needs of `r` besides the logits and the parameters.
inline SamplingContext sampling_context(const RequestSampling& r) {
  SamplingContext sc;
  sc.prompt_token_ids = r.prompt_token_ids;
  sc.output_token_ids = r.output_token_ids;
  sc.banned_ids = r.banned_token_ids;
  sc.seed = r.seed;
  sc.token_index = r.output_token_index;
  return sc;
}

// The step's metadata, identical on every rank (the GPU keeps one copy per device).
struct StepMetadata {
  int32_t num_tokens = 0;
  int32_t num_requests = 0;
  int32_t kv_block_size = 0;
  int32_t kv_split_tokens = 0;         // keys per KV split (TileConfig::kv_split_tokens)
  std::vector<int32_t> token_ids;      // [num_tokens]; kTokenFromPreviousStep until resolved
  std::vector<int32_t> positions;      // [num_tokens]
  std::vector<int32_t> token_request;  // [num_tokens] request index of each token row
  std::vector<int32_t> query_start;    // [num_requests + 1] first token row of each request
  std::vector<int32_t> context_lens;   // [num_requests] tokens in the cache after this step
  // Block table in CSR form: request i's blocks are block_indices[block_indptr[i] ..
  // block_indptr[i + 1]), the last holding last_block_len[i] tokens.
  std::vector<int32_t> block_indptr;    // [num_requests + 1]
  std::vector<int32_t> block_indices;   // [block_indptr.back()]
  std::vector<int32_t> last_block_len;  // [num_requests]
  // KV splits: request i has num_splits[i] splits (0: unsplit); its partial rows start at
  // split_row_begin[i] and are laid out [split, kv_head, query row, q head in group].
  std::vector<int32_t> num_splits;       // [num_requests]
  std::vector<int32_t> split_row_begin;  // [num_requests]
  int32_t num_split_rows = 0;
  // Sampling rows, in plan order.
  std::vector<int32_t> sample_rows;       // [num_samples] token row whose logits are sampled
  std::vector<int32_t> sample_request;    // [num_samples] its request index
  std::vector<RequestSampling> requests;  // [num_requests]

  int32_t num_samples() const { return static_cast<int32_t>(sample_rows.size()); }
};

struct RankSchedule {
  // Queue q is instructions[queue_begin[q] .. queue_begin[q + 1]).
  std::vector<isa::Instruction> instructions;
  std::vector<int32_t> queue_begin;  // [num_sms + 1]
  // Per instruction, parallel to `instructions`:
  std::vector<int32_t> order;                 // position in the step's global order
  std::vector<double> cost;                   // estimated cycles
  std::vector<std::vector<Access>> accesses;  // empty unless accesses were recorded
  // Barrier values before and after the step (every instruction done) on this rank.
  std::vector<uint32_t> barrier_begin;
  std::vector<uint32_t> barrier_end;

  int num_queues() const { return static_cast<int>(queue_begin.size()) - 1; }
};

struct InstructionRef {
  int32_t rank = 0;
  int32_t index = 0;  // into ranks[rank].instructions
};

// A step ends when every instruction of every rank has completed; only then may the next
// step start (the executors enforce it). So ordering is proven within a step only.
struct Step {
  uint64_t step_id = 0;
  int tp = 1;
  int num_sms = 1;
  StepMetadata meta;
  std::vector<RankSchedule> ranks;
  std::vector<InstructionRef> global_order;  // one topological order of all instructions
  bool accesses_recorded = false;
  // The most K ranges any O or down tile of this step was split into (one rank) [SPLIT_K]:
  // its kTpReduces sum partial slots [0, k_splits).
  int k_splits = 1;
};

// Partial slots per rank a step's workspace must hold: kNumPartialSlots under tensor
// parallelism, the split-K slots on one rank, none otherwise.
inline int partial_slots_of(const Step& step) {
  const int tp_slots = step.tp > 1 ? kNumPartialSlots : 0;
  const int split_slots = step.k_splits > 1 ? step.k_splits : 0;
  return tp_slots > split_slots ? tp_slots : split_slots;
}

// When one instruction of a step ran, parallel to RankSchedule::instructions: recorded by
// the megakernel's CTAs when profiling (%globaltimer, %smid; kernels/megakernel.h
// kProfileWords) and by the CPU interpreter when asked (steady clock, virtual SM = queue).
// engine/step_trace.h turns them into a Chrome trace, engine/cuda/cuda_trace.h into a per-op
// summary; Backend::record_timings (engine/backend.h) asks a backend for them.
struct InstructionTiming {
  uint64_t fetch_ns = 0;  // when its SM fetched it
  uint64_t start_ns = 0;  // ... when its waits were satisfied (the op starts)
  uint64_t end_ns = 0;    // ... when its op was done (before its signals)
  uint32_t sm = 0;        // the SM (GPU) or virtual SM (CPU queue) that ran it
};

// "kAttention layer 3 (kv_head 1, requests [0,2), query [0,1), split -1) rank 0 sm 2 #17"
std::string describe_instruction(const Step& step, InstructionRef ref);

}  // namespace megaserve::engine
