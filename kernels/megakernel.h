// The megakernel's host/device interface: the plain records the host fills in (the model's
// device pointers, one step's descriptor, the control words of the persistent step ring)
// and the launch functions. Included by host C++ (engine/cuda/cuda_backend.cc) and by the device
// code; it holds pointers and integers only, so both sides agree on every layout.
//
// Step ring protocol [STEP_RING] (persistent mode):
//   host:   writes step `seq`'s descriptor and data into slot seq % 2 (copy stream, waited
//           for), then stores HostControl::doorbell = seq (after a release fence). It may do
//           so while step seq - 1 runs (the slot it writes was step seq - 2's, complete), so
//           at most two steps are posted and not complete.
//   CTA 0:  the only reader of host memory: polls doorbell until it moves past the last step,
//           copies shutdown into DeviceControl, then releases DeviceControl::go = seq.
//   CTAs:   acquire go == seq, run their queue of slot seq % 2, release-add 1 to `done`.
//   CTA 0:  acquires done == (steps run) * grid, fences system-wide and stores
//           HostControl::completed = seq, which the host polls (with its watchdog); then
//           step seq + 1 starts at once if its doorbell came already.
// A shutdown is posted only when every posted step is complete.
// HostControl::abort (set by the host's watchdog) makes every wait loop give up, so that a
// stuck step ends the kernel instead of hanging it.
#pragma once

#include <cuda.h>  // CUtensorMap (the type only)
#include <cuda_runtime_api.h>
#include <stdint.h>

#include "engine/isa/isa.h"
#include "engine/isa/kv_cache_layout.h"
#include "kernels/act_cache.h"

namespace megaserve::kernels {

inline constexpr int kMegakernelThreads = 256;  // 8 warps per CTA
inline constexpr int kMegakernelWarps = kMegakernelThreads / 32;
inline constexpr int kMaxHeadDim = 256;   // attention keeps hd / 32 dims per lane
inline constexpr int kMaxMatvecRows = 8;  // token rows per pass of a CUDA-core projection
// Projections (kernels/projection.cuh) take a tile's token rows in chunks: QKV (its heads wait
// in shared memory) of kProjectionChunkRows, gate/up and the LM head of kProjectionScaleRows
// (one wgmma pass of 128 rows); the bf16 tensor-core core
// (kernels/tile_mma.cuh) needs kProjectionMinSmemBytes of shared memory beside what the op
// keeps.
inline constexpr int kProjectionChunkRows = 64;
inline constexpr int kProjectionScaleRows = 128;
// Floats an op keeps for its row scales (kProjectionScaleRows) and their partial sums (8 rows
// x warps, double).
inline constexpr int kProjectionScaleFloats = kProjectionScaleRows + kMegakernelWarps * 8 * 2;
inline constexpr int kProjectionMinSmemBytes = 112 * 1024;
// kAttention (op_attention.cuh) scores up to kAttentionMaxGroup q heads per pass over a row's
// keys; its shared memory: their queries, then per warp, per head, (max, sum) and 32 row
// slots x 8 dims of partial output.
inline constexpr int kAttentionMaxGroup = 4;
inline constexpr int kAttentionWarpStateFloats = kAttentionMaxGroup * (2 + 32 * 8);
inline constexpr int kAttentionSmemFloats =
    kAttentionMaxGroup * kMaxHeadDim + kMegakernelWarps * kAttentionWarpStateFloats;

// The projection core on wgmma (kernels/tile_wgmma.cuh) streams weights with the TMA unit in
// boxes of 64 k x kWgmmaGroupRows rows, through stages of 256 weight rows, and the fp32
// activations with cp.async through slots of 64 or 128 rows x 64 k. Passes of 64 rows, two
// depths: shallow, 3 weight stages and 2 activation slots, in kWgmmaCoreBytes of shared memory
// beside what the op keeps (less: the op falls back to the mma.sync core); deep, 4 stages and
// 3 slots, where an op leaves kWgmmaDeepCoreBytes and the step does not ask for shallow
// (kStepWgmmaShallow). Passes of 128 rows (a tile of more than 64 rows), shallow only, where an
// op leaves kWgmmaWideCoreBytes.
inline constexpr int kWgmmaGroupRows = 16;
// Four groups of consecutive rows of one matrix (a quad of a pass's table) come in one box of
// kWgmmaWideRows rows where the model has maps of that box (DeviceModel::wide_maps).
inline constexpr int kWgmmaWideRows = 4 * kWgmmaGroupRows;
inline constexpr int kWgmmaStageBytes = 32 * 1024;  // 256 weight rows x 64 k
// Per token row: bf16 A (one swizzled 128-byte row) and the fp32 ring (64 k).
inline constexpr int kWgmmaARowBytes = 128;
inline constexpr int kWgmmaRingRowBytes = 256;
inline constexpr int kWgmmaTableBytes = 2048;
// The stages, 3 bf16 A buffers and `slots` fp32 ring slots of `rows` rows.
__host__ __device__ constexpr int wgmma_layout_bytes(int stages, int slots, int rows) {
  return stages * kWgmmaStageBytes + 3 * rows * kWgmmaARowBytes + slots * rows * kWgmmaRingRowBytes;
}
// The layout, 1 KB of alignment and the tables.
__host__ __device__ constexpr int wgmma_core_bytes(int stages, int slots, int rows) {
  return wgmma_layout_bytes(stages, slots, rows) + 1024 + kWgmmaTableBytes;
}
inline constexpr int kWgmmaCoreBytes = wgmma_core_bytes(3, 2, 64);
inline constexpr int kWgmmaDeepCoreBytes = wgmma_core_bytes(4, 3, 64);
inline constexpr int kWgmmaWideCoreBytes = wgmma_core_bytes(3, 2, 128);
// The stage barriers of both depths: [0, 3) shallow (and 128-row), [3, 7) deep (and the
// 4-stage passes that read cached activations [ACT_CACHE]).
inline constexpr int kWgmmaBarriers = 3 + 4;
// Token rows of the activation cache (DeviceModel::act_cache) per CTA of the grid.
inline constexpr int kActCacheRowsPerCta = 128;
// The activation cache map's box: 64 k x kActCacheBoxRows rows (one 8 KB A block).
inline constexpr int kActCacheBoxRows = 64;

// Tensor parallelism [TP_PLACEMENT] (docs/tensor-parallel.md): one launch runs every rank of
// the group, CTAs [r * ctas_per_rank, (r + 1) * ctas_per_rank) acting as rank r's SMs (its
// queue blockIdx.x % ctas_per_rank). Each rank has its own DeviceModel (its weight shard,
// KV cache and activation cache), barriers and step descriptor (its queues and workspace);
// a signal names the rank whose barrier it increments, and a kTpReduce reads every rank's
// partial slots. With every rank on one GPU (the debug placement) peers' buffers are plain
// device memory; across GPUs they become peer mappings of the same protocol.
inline constexpr int kMaxTpRanks = 8;

// A layer's weight matrices by their index in DeviceModel::weight_maps.
enum WeightMatrix : int32_t { kWq, kWk, kWv, kWo, kWGate, kWUp, kWDown, kLayerMatrices };

// bf16 tensors are uint16 bit patterns (round-to-nearest-even, engine/isa/bf16.h).
struct DeviceLayer {
  const uint16_t* attn_norm;  // [hidden]
  const uint16_t* ffn_norm;   // [hidden]
  const uint16_t* wq;         // [q_heads * hd, hidden]
  const uint16_t* wk;         // [kv_heads * hd, hidden]
  const uint16_t* wv;         // [kv_heads * hd, hidden]
  const uint16_t* bq;         // [q_heads * hd] or null
  const uint16_t* bk;         // [kv_heads * hd] or null
  const uint16_t* bv;         // [kv_heads * hd] or null
  const uint16_t* q_norm;     // [hd] or null
  const uint16_t* k_norm;     // [hd] or null
  const uint16_t* wo;         // [hidden, q_heads * hd]
  const uint16_t* w_gate;     // [ffn, hidden]
  const uint16_t* w_up;       // [ffn, hidden]
  const uint16_t* w_down;     // [hidden, ffn]
};

// Constant for the backend's lifetime: one rank's view of the model. Under tensor parallelism
// q_heads, kv_heads, ffn and vocab are the rank's shares (engine/planner/schedule_shard.h),
// the weights its shard: embedding and LM head rows are global ids [vocab_begin, vocab_begin
// + vocab).
struct DeviceModel {
  int32_t hidden, q_heads, kv_heads, head_dim, ffn, vocab, num_layers;
  float rms_norm_eps;
  int32_t vocab_begin;  // the rank's first vocabulary id (0 with one rank)
  int32_t vocab_size;   // the whole vocabulary: a logits row (sample op, LM head stride)
  int32_t num_kv_blocks, kv_block_size;
  const DeviceLayer* layers;   // [num_layers]
  const uint16_t* embedding;   // [vocab, hidden]
  const uint16_t* final_norm;  // [hidden]
  const uint16_t* lm_head;     // [vocab, hidden]
  const float* inv_freq;       // [head_dim / 2], llama3 scaling applied
  // RoPE's cos and sin of position p, pair i at rope[2 (p * head_dim / 2 + i)] and the float
  // after, for p < rope_positions: the host's std::cos / std::sin of the float angle
  // p * inv_freq[i], as the CPU interpreter computes them. Later positions take cosf / sinf.
  const float* rope;
  int32_t rope_positions;
  // Per layer [num_kv_blocks, kv_heads, block_size, head_dim] (engine/isa/kv_cache_layout.h),
  // layer l at l * cache_layer_elements.
  uint16_t* k_cache;
  uint16_t* v_cache;
  int64_t cache_layer_elements;
  // TMA descriptors of the caches of every layer (K, then V; engine/cuda/cuda_weight_maps.h),
  // through which decode attention loads its 16-key steps [KV_TMA]; null where it cannot.
  const CUtensorMap* kv_maps;
  // TMA descriptors of the weights ([rows, K] bf16, box 64 k x kWgmmaGroupRows rows, 128-byte
  // swizzle): layer l's matrix m at l * kLayerMatrices + m, the LM head after the layers. Null
  // when the matrices' K do not allow TMA (K % 8 != 0); the projections then use mma.sync.
  const CUtensorMap* weight_maps;
  // weight_maps + wide_maps: the same matrices in boxes of 64 k x kWgmmaWideRows rows (one TMA
  // copy where sixteen-row boxes took four), or 0 where there are none.
  int32_t wide_maps;
  // The wgmma core's activation cache [ACT_CACHE] (kernels/act_cache.h): act_cache_rows
  // token rows of `hidden` bf16 (the bf16 A operand of passes over normalized or plain
  // activation blocks, at their token rows), its TMA map (box 64 k x kActCacheBoxRows rows,
  // 128-byte swizzle) and a flag per kActFlagRows rows. Null without weight maps.
  uint16_t* act_cache;
  const CUtensorMap* act_cache_map;
  uint64_t* act_cache_flags;
  int32_t act_cache_rows;
  // The FFN activations (SiLU(gate) * up) rounded to bf16, as the down projection's wgmma
  // passes read them: [ffn_act_rows token rows, ffn], written by kGateUpSilu beside the fp32
  // act for rows below ffn_act_rows, with its TMA map (box 64 k x kActCacheBoxRows rows,
  // 128-byte swizzle). Null without weight maps.
  uint16_t* ffn_act;
  const CUtensorMap* ffn_act_map;
  int32_t ffn_act_rows;
  // The same for the attention output, the output projection's input ([attn_act_rows,
  // q_heads * head_dim], written by kAttention and kAttentionMerge beside attn_out).
  uint16_t* attn_act;
  const CUtensorMap* attn_act_map;
  int32_t attn_act_rows;
  // The same for the normalized residual rows ([norm_act_rows, hidden], written by kRmsNorm
  // [NORM_STAGE]), which QKV and gate/up tiles whose step ran the norm stage read.
  uint16_t* norm_act;
  const CUtensorMap* norm_act_map;
  int32_t norm_act_rows;
};

// One sampling row's parameters for the sample op (engine/isa/sampling.h, packed by
// engine/cuda/cuda_sampling.cc). Its context lives in DeviceStepDesc::sampling_ids, in three
// consecutive ranges: [repeat_begin, count_begin) the distinct prompt and output ids of the
// repetition penalty; [count_begin, banned_begin) (output id, count) pairs, two words each,
// for the frequency and presence penalties; [banned_begin, banned_end) the banned ids. Every
// id is inside the vocabulary.
struct DeviceSampling {
  float temperature;  // <= 0 (or NaN): greedy
  float top_p;        // 1: off
  float min_p;        // 0: off
  int32_t top_k;      // 0: off
  float repetition_penalty, frequency_penalty, presence_penalty;
  int32_t logprobs;  // top-N alternatives reported, at most kMaxTopLogprobs
  int32_t repeat_begin, count_begin, banned_begin, banned_end;
  // Row of DeviceStepDesc::sampling_scratch that holds the penalized logits, or -1 when the
  // row has no penalties and no banned ids (the op then reads the logits themselves).
  int32_t scratch_row;
  int32_t pad;
  uint64_t seed;
  int64_t token_index;
};

// The most top logprobs the device reports per row (the server's kMaxLogprobs).
inline constexpr int kMaxTopLogprobs = 20;

// DeviceStepDesc::flags: per-step choices, so that one resident kernel (and one upload of
// the weights) can run every variant.
inline constexpr int32_t kStepTensorCores = 1;  // projections on bf16 tensor cores where K allows
// (2 was a first attention variant, removed.)
// kAttention on CUDA cores (each row's keys spread over the warps, op_attention.cuh) instead
// of bf16 tensor cores (op_attention_mma.cuh, the default where the head dim allows).
inline constexpr int32_t kStepAttentionCudaCores = 4;
// With kStepTensorCores: projections on wgmma with TMA-fed weights (kernels/tile_wgmma.cuh)
// where the weights have TMA descriptors, instead of mma.sync.
inline constexpr int32_t kStepWgmma = 8;
// With kStepWgmma: the shallow pipeline even where an op has room for the deep one (to
// compare the two in one process).
inline constexpr int32_t kStepWgmmaShallow = 16;
// CUDA-core projections load their weights into registers (kernels/tile_matvec.cuh) even where
// bulk copies could stream them (kernels/tile_matvec_bulk.cuh), to compare the two.
inline constexpr int32_t kStepMatvecRegisters = 32;
// With kStepWgmma: every weight group in a box of its own, as before the wide boxes
// [WIDE_BOX] (to compare the two in one process).
inline constexpr int32_t kStepWgmmaNarrowBoxes = 64;
// Projections start their weights into L2 ahead of their loads [L2_AHEAD]: the register
// matvec kMatvecL2Ahead columns per warp ahead (the first ones before the instruction's
// waits), the wgmma passes kWgmmaL2Ahead k-blocks past the TMA's stages (the first ones
// before the waits); with kStepL2AheadFar as well, twice as far. Not yet measured, so off by
// default (CudaBackendOptions::l2_ahead).
inline constexpr int32_t kStepL2Ahead = 128;
inline constexpr int32_t kStepL2AheadFar = 256;
inline constexpr int kMatvecL2Ahead = 2;
inline constexpr int kWgmmaL2Ahead = 4;
// Decode attention by TMA [KV_TMA]: its slices rotated over the warps, each request merged by
// the warp that stores its last slice state [SLICE_ROTATION], instead of slice w on warp w and
// a CTA barrier and merge per request.
inline constexpr int32_t kStepAttentionRotation = 512;
// The K/V rows that QKV writes through the generic proxy ordered before decode attention's
// TMA reads by a proxy fence on the reading lanes, after their wait, instead of one by every
// QKV thread after its writes (~4.5 us per QKV instruction on an H100) [KV_TMA].
inline constexpr int32_t kStepKvFenceOnReader = 1024;
// How far ahead the step's flags say (0: not at all), for `base` (kMatvecL2Ahead or
// kWgmmaL2Ahead).
__host__ __device__ inline int l2_ahead_of(int32_t step_flags, int base) {
  if ((step_flags & kStepL2Ahead) == 0) return 0;
  return (step_flags & kStepL2AheadFar) != 0 ? 2 * base : base;
}

// Per instruction, when profiling: %globaltimer (ns) when its CTA fetched it, when its waits
// were satisfied and when its op was done, and the SM (%smid) that ran it.
inline constexpr int kProfileWords = 4;

// One step, as the CTAs read it from its slot. Pointers into the slot's upload area
// (metadata, read-only) and into the workspace (shapes: engine/isa/step.h, BufferId).
struct DeviceStepDesc {
  int32_t num_queues, num_tokens, num_requests, kv_block_size, kv_split_tokens, num_samples;
  int32_t num_split_rows;
  int32_t flags;   // kStep* bits
  uint32_t epoch;  // different for every step a backend runs (the activation cache's keys)
  const engine::isa::Instruction* instructions;
  const int32_t* queue_begin;  // [num_queues + 1]
  const int32_t* token_ids;    // [num_tokens]; references to previous_sampled_ids [PREVIOUS_SAMPLE]
  const int32_t* positions;
  const int32_t* token_request;
  const int32_t* query_start;   // [num_requests + 1]
  const int32_t* block_indptr;  // [num_requests + 1]
  const int32_t* block_indices;
  const int32_t* split_row_begin;  // [num_requests]
  const int32_t* sample_rows;      // [num_samples]
  const DeviceSampling* sampling;  // [num_samples]
  const int32_t* sampling_ids;     // the rows' id ranges (DeviceSampling)
  // The previous step's sampled_ids (its slot's outputs, never rewritten by this step's
  // upload); read only for token ids that are references (engine/isa/isa.h,
  // [PREVIOUS_SAMPLE]).
  const int32_t* previous_sampled_ids;
  float* residual;   // [num_tokens, hidden]
  float* q;          // [num_tokens, q_heads * hd]
  float* attn_out;   // [num_tokens, q_heads * hd]
  float* split_out;  // [num_split_rows, hd]
  float* split_lse;  // [num_split_rows]
  float* act;        // [num_tokens, ffn]
  // [num_samples, vocab_size] rank 0's, full rows; under tensor parallelism every rank's LM
  // head writes its columns there (this pointer is rank 0's rows at column vocab_begin, row
  // stride vocab_size), and rank 0's sample op reads whole rows [TP_PLACEMENT].
  float* logits;
  int32_t* sampled_ids;     // [num_samples]
  float* sampled_logprobs;  // [num_samples]
  float* sampling_scratch;  // [rows with scratch_row >= 0, vocab] penalized logits
  int32_t* top_ids;         // [num_samples, kMaxTopLogprobs], first `logprobs` of a row
  float* top_logprobs;      // [num_samples, kMaxTopLogprobs]
  // Profiling (null unless asked for, and on ranks other than 0): kProfileWords per
  // instruction.
  uint64_t* profile;  // [num_instructions, kProfileWords]
  // Tensor parallelism: this rank's partial slots, [partial_slots_of(step) * num_tokens,
  // hidden] (engine/isa/step.h BufferId::kPartial), and every rank's, [tp] in rank order (this
  // one's included), for kTpReduce to read [TP_PLACEMENT]. One rank: its split-K slots
  // [SPLIT_K], or null when the step has none.
  float* partial;
  const float* const* peer_partial;
  int32_t tp;  // ranks of the step
  int32_t unused;
};

// Mapped pinned host memory, written by the host and read by CTA 0 (and the reverse for
// `completed` / `aborted`). [STEP_RING]
struct HostControl {
  volatile uint32_t doorbell;   // seq of the latest step posted
  volatile uint32_t shutdown;   // 1: the step posted with the doorbell is "exit"
  volatile uint32_t abort;      // 1: give up every wait and exit (watchdog)
  volatile uint32_t completed;  // seq of the latest step finished by every CTA
  volatile uint32_t aborted;    // set by a CTA that gave up a wait
  uint32_t pad[3];
};

// Device memory, reset by the host before each persistent launch. [STEP_RING]
struct DeviceControl {
  uint32_t go;        // seq of the step the CTAs may run
  uint32_t shutdown;  // copied from HostControl by CTA 0 before releasing go
  uint32_t done;      // CTAs finished, summed over the launch's steps
  uint32_t pad;
};

struct MegakernelParams {
  int32_t tp;                 // ranks in the launch [TP_PLACEMENT]
  int32_t ctas_per_rank;      // the grid is tp * ctas_per_rank CTAs
  const DeviceModel* models;  // [tp], device memory
  // Device addresses of the two slots' descriptors, one per rank: rank r's at slots[s] + r.
  const DeviceStepDesc* slots[2];
  uint32_t* barriers[kMaxTpRanks];  // per rank [num_barriers], never reset between steps
  HostControl* host;                // device alias of the mapped HostControl
  DeviceControl* control;
  int32_t slot;        // per-step launch: the slot to run
  uint32_t first_seq;  // persistent: steps before this launch (doorbell value)
};

// Opts both kernels into the most dynamic shared memory a CTA can have next to their static
// shared memory, given the device's opt-in limit per block; returns it in `dynamic_bytes`.
cudaError_t configure_megakernel(size_t optin_bytes, size_t* dynamic_bytes);
// One step (params.slot), one CTA per queue of every rank; cooperative, so every CTA is
// co-resident (what the waits across ranks need too).
cudaError_t launch_megakernel_step(const MegakernelParams& params, int grid, size_t smem_bytes,
                                   cudaStream_t stream);
// The persistent kernel: runs steps from the ring until shutdown or abort.
cudaError_t launch_megakernel_persistent(const MegakernelParams& params, int grid,
                                         size_t smem_bytes, cudaStream_t stream);

}  // namespace megaserve::kernels
