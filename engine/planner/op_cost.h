// The one cost model of the instruction stream: each op's arithmetic and memory traffic from
// its shape, used by the tile maker (placement: estimated cycles per tile) and by the trace
// summary (engine/cuda/cuda_trace.h: achieved TFLOP/s and TB/s per op). 2 FLOPs per
// multiply-add; bf16 weights and KV cache (2 bytes); fp32 activations (4 bytes) read and
// written once per tile.
#pragma once

#include "engine/isa/isa.h"
#include "engine/isa/step.h"
#include "engine/model/model_config.h"
#include "engine/planner/tile_config.h"

namespace megaserve::engine {

struct InstructionWork {
  double flops = 0;
  double bytes = 0;
  InstructionWork& operator+=(const InstructionWork& o) {
    flops += o.flops;
    bytes += o.bytes;
    return *this;
  }  // The work of `n` such instructions or rows.
  InstructionWork operator*(double n) const { return {flops * n, bytes * n}; }
};

namespace op_cost {

inline constexpr double kActivationBytes = 4;  // fp32 workspace
inline constexpr double kWeightBytes = 2;      // bf16 weights and KV cache

// Embedding rows gathered (bf16 table) into the fp32 residual.
inline InstructionWork embedding(double rows, double hidden) {
  return {0, rows * hidden * (kWeightBytes + kActivationBytes)};
}
// RMSNorm of token rows: fp32 rows read, bf16 normalized rows written.
inline InstructionWork rms_norm(double rows, double hidden) {
  return {3 * rows * hidden, rows * hidden * (kActivationBytes + kWeightBytes)};
}
// Token rows x `cols` outputs of a projection over `in_cols` inputs, outputs written once
// (QKV, LM head); O and down also read the residual they add to (residual_add).
inline InstructionWork projection(double rows, double cols, double in_cols,
                                  bool residual_add = false) {
  return {2 * rows * cols * in_cols,
          cols * in_cols * kWeightBytes +
              rows * (in_cols + (residual_add ? 2 : 1) * cols) * kActivationBytes};
}
// Gate and up (two weight rows per output column), SiLU(gate) * up written once.
inline InstructionWork gate_up(double rows, double cols, double hidden) {
  return {4 * rows * cols * hidden,
          2 * cols * hidden * kWeightBytes + rows * (hidden + cols) * kActivationBytes};
}
// One query row scoring `keys` keys for a group of `group` q heads: q.k and p.v per key per
// head; q read and the output written. The K and V rows are attention_kv's.
inline InstructionWork attention_row(double keys, int group, int head_dim) {
  return {4.0 * group * head_dim * keys, 2.0 * group * head_dim * kActivationBytes};
}
// One request's `keys` K and V rows of one kv head, read once per attention tile whatever
// its query rows (a tile stages them once for all of its rows and their group's q heads).
// Counted per row, a 32-row prefill tile of 256 keys weighed twice a decode tile of 8
// requests x 512 keys, which took ~4.6x as long on an H100 (bench/RESULTS.md, 2026-12-07).
inline InstructionWork attention_kv(double keys, int head_dim) {
  return {0, 2 * keys * head_dim * kWeightBytes};
}
// Merging `splits` partials of `elems` values (all q heads of one row).
inline InstructionWork merge_row(double splits, double elems) {
  return {3 * elems * splits, (splits + 1) * elems * kActivationBytes};
}
// Summing `tp` ranks' partials of `elems` values into the residual.
inline InstructionWork tp_reduce(double elems, int tp) {
  return {elems * tp, elems * (tp + 2) * kActivationBytes};
}
// Sampling `rows` rows of `vocab` logits (filters, penalties, the draw).
inline InstructionWork sample(double rows, double vocab) {
  return {10 * vocab * rows, vocab * kActivationBytes * rows};
}

}  // namespace op_cost

// The work of one built instruction, from its arguments, the model shape and the step's
// metadata. Attention counts each query row's keys exactly (causal: a prefill row at
// position p scores min(p + 1, split end) - split begin keys); the tile maker, which costs a
// tile before its rows are final, takes the tile's last row for all. `tp`: ranks summed by a
// kTpReduce.
InstructionWork instruction_work(const ModelConfig& config, const StepMetadata& meta,
                                 const isa::Instruction& inst, int tp = 1);

// Estimated cycles of `work` on one SM (only the ratios matter for placement).
inline double estimated_cycles(const TileConfig& tiles, const InstructionWork& work) {
  const double flops_cycles = work.flops / tiles.flops_per_cycle;
  const double bytes_cycles = work.bytes / tiles.bytes_per_cycle;
  return tiles.overhead_cycles + (flops_cycles > bytes_cycles ? flops_cycles : bytes_cycles);
}

}  // namespace megaserve::engine
