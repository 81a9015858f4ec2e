// The instruction set: the contract between the host's ScheduleBuilder and whatever executes
// a step (the CPU interpreter now, the CUDA megakernel later). Included by host and device
// code alike, so it holds only plain int32 records and constexpr helpers: no std:: types.
//
// An instruction is 32 int32 words (128 bytes):
//   word 0            opcode
//   word 1            layer (-1 for ops outside the decoder layers)
//   word 2            number of waits in use (<= kMaxWaits)
//   word 3            number of signals in use (<= kMaxSignals)
//   words 4..15       the op's arguments, named per op by the *Args views below
//   words 16..23      waits: (barrier index, target) pairs on the executing rank's barriers
//   words 24..31      signals: (barrier index, rank) pairs; rank kSignalAllRanks = every rank
//
// Execution contract [ISA_BARRIERS]: before running an instruction the controller waits until
// every wait's barrier has reached its target (acquire); after the op's writes are complete
// and visible (release), it increments each signal's barrier by one. Barrier values are
// uint32 counters that are never reset: targets are running totals kept by the builder and
// compared with wrap-around arithmetic, barrier_reached() below.
#pragma once

#include <stdint.h>

#ifdef __CUDACC__
#define MEGASERVE_ISA_HD __host__ __device__
#else
#define MEGASERVE_ISA_HD
#endif

namespace megaserve::engine::isa {

inline constexpr int kInstructionWords = 32;
inline constexpr int kMaxWaits = 4;
inline constexpr int kMaxSignals = 4;
inline constexpr int kNumArgWords = 12;
inline constexpr int32_t kSignalAllRanks = -1;

enum class Opcode : int32_t {
  kInvalid = 0,
  // Token rows [row_begin, row_end): residual rows = embedding rows of their token ids. Under
  // tensor parallelism each rank holds a slice of the vocabulary and writes its rows (zeros
  // for ids outside its slice) into a partial slot that a kTpReduce (assign) sums.
  kEmbedding = 1,
  // RMSNorm(attn_norm) of token rows, projected onto a range of fused heads (q heads, then k
  // heads, then v heads of this rank), + bias (Qwen2), + per-head RMSNorm (Qwen3), + RoPE
  // on q and k; q heads go to the q buffer, k and v heads are appended to the paged cache.
  // The norm is the tile's own unless the step ran kRmsNorm before it (QkvRopeArgs::normed).
  kQkvRope = 2,
  // Causal attention of query rows over the paged KV cache for one kv head (all q heads of
  // its group). Unsplit: writes the attention output. Split: writes one KV split's
  // normalized partial output and log-sum-exp to the split buffer.
  kAttention = 3,
  // Combines the KV splits of one request's query rows into the attention output.
  kAttentionMerge = 4,
  // Output projection of token rows onto hidden columns; adds into the residual (one rank)
  // or writes a partial sum into a partial slot (tensor parallel, or one K range of a
  // split-K tile [SPLIT_K]).
  kOProj = 5,
  // RMSNorm(ffn_norm) of token rows, gate and up projections of a range of FFN columns,
  // SiLU(gate) * up into the activation buffer. The norm as kQkvRope's (GateUpArgs::normed).
  kGateUpSilu = 6,
  // Down projection of token rows onto hidden columns; residual add or partial slot.
  kDownProj = 7,
  // Tensor-parallel reduction of one tile (token rows x hidden columns): reads every rank's
  // partial slot (peer memory) and adds the sum, in rank order, to (or assigns it to) this
  // rank's residual. Every rank runs it, so every rank ends with the same bits. On one rank
  // it also sums the split-K partials of O and down (HiddenTileArgs::splits) [SPLIT_K].
  kTpReduce = 8,
  // Final RMSNorm of the sampling rows and the LM head for a range of vocabulary columns.
  kLmHead = 9,
  // Samples a range of sampling rows from the logits of every rank (gathered from peer
  // memory, in rank order). Gathering (S x vocab floats) rather than combining per-rank
  // Gumbel-max candidates keeps every sampling parameter exact: top-p, min-p and the
  // penalties need the whole distribution, and the result is the single-device one. (The
  // megakernel gathers by having every rank's LM head store its columns straight into rank
  // 0's rows: kernels/megakernel.h [TP_PLACEMENT].)
  kSample = 10,
  // RMSNorm (attn_norm or ffn_norm of a layer) of token rows into the normalized rows
  // (BufferId::kNormed, bf16, rounded as transformers' bf16 RMSNorm), which the projections
  // after it read instead of normalizing each tile's rows themselves [NORM_STAGE]. Why a
  // stage of its own: with the norm inside the projection tiles, every tile of a decode step
  // was the first over its rows and converted 128 fp32 rows of the hidden size for 256
  // weight rows, as many bytes as the weights, and its warps' instructions were the limit
  // (bench/RESULTS.md, 2026-12-06); normalized once per row by a stage spread over the SMs,
  // the projections' passes take their rows by TMA. The CPU interpreter's projections
  // normalize for themselves (the same values), so there it does nothing.
  kRmsNorm = 11,
  kNumOpcodes = 12,
};

MEGASERVE_ISA_HD constexpr const char* opcode_name(Opcode op) {
  switch (op) {
    case Opcode::kInvalid:
      return "kInvalid";
    case Opcode::kEmbedding:
      return "kEmbedding";
    case Opcode::kQkvRope:
      return "kQkvRope";
    case Opcode::kAttention:
      return "kAttention";
    case Opcode::kAttentionMerge:
      return "kAttentionMerge";
    case Opcode::kOProj:
      return "kOProj";
    case Opcode::kGateUpSilu:
      return "kGateUpSilu";
    case Opcode::kDownProj:
      return "kDownProj";
    case Opcode::kTpReduce:
      return "kTpReduce";
    case Opcode::kLmHead:
      return "kLmHead";
    case Opcode::kSample:
      return "kSample";
    case Opcode::kRmsNorm:
      return "kRmsNorm";
    case Opcode::kNumOpcodes:
      break;
  }
  return "unknown";
}

// Word indices of the fixed header and of the wait/signal lists.
inline constexpr int kWordOpcode = 0;
inline constexpr int kWordLayer = 1;
inline constexpr int kWordNumWaits = 2;
inline constexpr int kWordNumSignals = 3;
inline constexpr int kWordArgs = 4;
inline constexpr int kWordWaits = kWordArgs + kNumArgWords;      // 16
inline constexpr int kWordSignals = kWordWaits + 2 * kMaxWaits;  // 24
static_assert(kWordSignals + 2 * kMaxSignals == kInstructionWords,
              "header + args + waits + signals must fill the instruction exactly");

struct Instruction {
  int32_t words[kInstructionWords];

  MEGASERVE_ISA_HD constexpr Opcode opcode() const {
    return static_cast<Opcode>(words[kWordOpcode]);
  }
  MEGASERVE_ISA_HD constexpr int32_t layer() const { return words[kWordLayer]; }
  MEGASERVE_ISA_HD constexpr int32_t num_waits() const { return words[kWordNumWaits]; }
  MEGASERVE_ISA_HD constexpr int32_t num_signals() const { return words[kWordNumSignals]; }
  MEGASERVE_ISA_HD constexpr int32_t wait_barrier(int i) const { return words[kWordWaits + 2 * i]; }
  MEGASERVE_ISA_HD constexpr int32_t wait_target(int i) const {
    return words[kWordWaits + 2 * i + 1];
  }
  MEGASERVE_ISA_HD constexpr int32_t signal_barrier(int i) const {
    return words[kWordSignals + 2 * i];
  }
  MEGASERVE_ISA_HD constexpr int32_t signal_rank(int i) const {
    return words[kWordSignals + 2 * i + 1];
  }
  MEGASERVE_ISA_HD constexpr const int32_t* args() const { return words + kWordArgs; }
  MEGASERVE_ISA_HD constexpr int32_t* args() { return words + kWordArgs; }
};
static_assert(sizeof(Instruction) == 128, "an instruction is 32 int32 words");

// True when a barrier whose counter reads `value` has reached `target`. Counters wrap at
// 2^32; a wait is never more than 2^31 increments ahead of the counter, so the signed
// difference orders them.
MEGASERVE_ISA_HD constexpr bool barrier_reached(uint32_t value, uint32_t target) {
  return static_cast<int32_t>(value - target) >= 0;
}

// Input token references [PREVIOUS_SAMPLE]. A Step's token id at or below
// kPreviousSampleBase is not an id but the token that sampling row
// kPreviousSampleBase - id of the step submitted just before it draws: the engine's
// StepRunner (engine/step_runner.h) submits step N+1 before it knows N's samples. The
// executor resolves it: the megakernel's embedding reads that step's sampled ids on the
// device (kernels/op_embedding.cuh), the CPU interpreter and a CUDA backend that waited for
// step N take them from N's output. -1 (scheduler::kTokenFromPreviousStep, the scheduler's
// placeholder) never reaches an executor.
inline constexpr int32_t kPreviousSampleBase = -2;

MEGASERVE_ISA_HD constexpr int32_t previous_sample_ref(int32_t sample_row) {
  return kPreviousSampleBase - sample_row;
}
MEGASERVE_ISA_HD constexpr bool is_previous_sample_ref(int32_t id) {
  return id <= kPreviousSampleBase;
}
MEGASERVE_ISA_HD constexpr int32_t previous_sample_row(int32_t ref) {
  return kPreviousSampleBase - ref;
}
static_assert(previous_sample_row(previous_sample_ref(7)) == 7 &&
                  is_previous_sample_ref(previous_sample_ref(0)) && !is_previous_sample_ref(-1),
              "row 0 must not collide with the scheduler's placeholder -1");

// ---- Argument views: one struct per op, each exactly kNumArgWords int32 wide, copied out
// of / into the argument words. Rows are token rows of the step (0..num_tokens); requests
// are indices into the step's request metadata; columns are per-rank (local) indices.

struct EmbeddingArgs {
  int32_t row_begin, row_end;
  int32_t partial_slot;  // -1: write the residual directly (one rank)
  int32_t unused[9];
};

struct QkvRopeArgs {
  int32_t row_begin, row_end;
  int32_t head_begin, head_end;  // fused local heads: [0,hq) q, [hq,hq+hkv) k, then v
  // pair_end > 0: a range of RoPE pairs over the heads, from pair pair_begin of head
  // head_begin to pair pair_end - 1 of head head_end - 1 (qkv_pairs_of_head); pair i of a head
  // is its dims i and i + head_dim / 2. Never with a per-head q/k norm, which needs the whole
  // head. 0, 0: whole heads.
  int32_t pair_begin, pair_end;
  int32_t normed;  // 1: a kRmsNorm stage wrote these rows' normalized rows before this tile
  int32_t unused[5];
};

// The RoPE pairs [*p0, *p1) of fused head fh (in [head_begin, head_end)) that a QKV tile
// covers; `half` = head_dim / 2.
MEGASERVE_ISA_HD inline void qkv_pairs_of_head(const QkvRopeArgs& a, int fh, int half, int* p0,
                                               int* p1) {
  const bool range = a.pair_end > 0;
  *p0 = range && fh == a.head_begin ? a.pair_begin : 0;
  *p1 = range && fh == a.head_end - 1 ? a.pair_end : half;
}

// The RoPE pairs a QKV tile covers, over all its heads: its output columns are twice as many.
MEGASERVE_ISA_HD inline int qkv_tile_pairs(const QkvRopeArgs& a, int half) {
  const int whole = (a.head_end - a.head_begin) * half;
  return a.pair_end > 0 ? whole - a.pair_begin - (half - a.pair_end) : whole;
}

struct AttentionArgs {
  int32_t kv_head;                     // local kv head; covers its whole q head group
  int32_t request_begin, request_end;  // requests whose query rows this tile covers
  int32_t query_begin, query_end;      // rows within the request (single-request tiles)
  int32_t split;                       // -1: unsplit; else the KV split index
  int32_t unused[6];
};

struct AttentionMergeArgs {
  int32_t request;
  int32_t query_begin, query_end;  // rows within the request
  int32_t unused[9];
};

// kOProj, kDownProj and kTpReduce share a tile shape: token rows x hidden columns.
//
// Split-K [SPLIT_K] (one rank, engine/planner/tile_config.h max_k_splits): a decode step's
// O and down tiles are too few to fill the SMs at full width, and narrowing them made every
// tile re-read its whole activation rows for a few weight rows. Instead each (row, column)
// tile is cut along K into `splits` tiles, split s computing the dot products over inputs
// [k_begin, k_end) into partial slot s; a kTpReduce with `splits` then adds slots 0, 1, ...
// of this rank, in that order from 0.0f, to the residual (no atomics: the same bits on every
// run).
struct HiddenTileArgs {
  int32_t row_begin, row_end;
  int32_t col_begin, col_end;  // hidden columns
  int32_t partial_slot;        // -1: residual add on this rank; else the partial slot
  int32_t assign;              // kTpReduce only: 1 assigns the sum (embedding), 0 adds
  int32_t k_begin, k_end;      // kOProj / kDownProj: inputs [k_begin, k_end); k_end 0: all K
  // kTpReduce only: 0 or 1 sums slot partial_slot over the ranks; > 1 (one rank) sums this
  // rank's slots 0 .. splits - 1 [SPLIT_K].
  int32_t splits;
  int32_t unused[3];
};

struct GateUpArgs {
  int32_t row_begin, row_end;
  int32_t col_begin, col_end;  // local FFN columns
  int32_t normed;              // as QkvRopeArgs::normed
  int32_t unused[7];
};

struct LmHeadArgs {
  int32_t sample_begin, sample_end;  // sampling rows (indices into the step's sample list)
  int32_t col_begin, col_end;        // local vocabulary columns
  int32_t unused[8];
};

struct SampleArgs {
  int32_t sample_begin, sample_end;  // sampling rows (indices into the step's sample list)
  int32_t unused[10];
};

// Which of a layer's norms a kRmsNorm applies.
enum NormWeight : int32_t { kAttnNorm = 0, kFfnNorm = 1 };

struct RmsNormArgs {
  int32_t row_begin, row_end;
  int32_t norm;  // NormWeight
  int32_t unused[9];
};

#define MEGASERVE_ISA_CHECK_ARGS(T) \
  static_assert(sizeof(T) == kNumArgWords * sizeof(int32_t), #T " must fill the arg words")
MEGASERVE_ISA_CHECK_ARGS(EmbeddingArgs);
MEGASERVE_ISA_CHECK_ARGS(QkvRopeArgs);
MEGASERVE_ISA_CHECK_ARGS(AttentionArgs);
MEGASERVE_ISA_CHECK_ARGS(AttentionMergeArgs);
MEGASERVE_ISA_CHECK_ARGS(HiddenTileArgs);
MEGASERVE_ISA_CHECK_ARGS(GateUpArgs);
MEGASERVE_ISA_CHECK_ARGS(LmHeadArgs);
MEGASERVE_ISA_CHECK_ARGS(SampleArgs);
MEGASERVE_ISA_CHECK_ARGS(RmsNormArgs);
#undef MEGASERVE_ISA_CHECK_ARGS

// Copies an argument view out of an instruction (word-wise, so it is valid in device code
// without type punning).
template <typename Args>
MEGASERVE_ISA_HD inline Args args_of(const Instruction& inst) {
  Args a{};
  int32_t* out = reinterpret_cast<int32_t*>(&a);
  for (int i = 0; i < kNumArgWords; ++i) out[i] = inst.words[kWordArgs + i];
  return a;
}

template <typename Args>
MEGASERVE_ISA_HD inline void set_args(Instruction& inst, const Args& a) {
  const int32_t* in = reinterpret_cast<const int32_t*>(&a);
  for (int i = 0; i < kNumArgWords; ++i) inst.words[kWordArgs + i] = in[i];
}

}  // namespace megaserve::engine::isa
