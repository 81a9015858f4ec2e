// kTpReduce (engine/cpu/cpu_ops_projection.cc): for a tile of token rows x hidden columns,
// residual[t, c] (+)= sum over ranks r = 0, 1, ... of partial_r[slot][t, c], in that fixed
// order from 0.0f, so that every rank's residual gets the same bits as the CPU interpreter's
// simulation of the ranks. assign = 1 (the embedding) stores the sum instead of adding it.
// On one rank with splits > 1 it sums this rank's split-K slots s = 0 .. splits - 1 instead,
// likewise in order from 0.0f (engine/isa/isa.h [SPLIT_K]); they are read through L2 too (every
// split stage reuses the same slots, which this SM may have read a stage ago), after the
// split stage's barrier (this rank's) acquired their writers' stores.
//
// Peer protocol [TP_PLACEMENT] (docs/tensor-parallel.md): the controller has already waited
// on this rank's barrier of the partial stage, which every rank's partial tiles increment
// (their signals name kSignalAllRanks) after a fence and a release add, so the acquire
// makes each peer's slot visible here. Peers' slots are read through L2 (__ldcg): the slots
// alternate between reductions, so this SM's L1 may hold the same addresses from two
// reductions ago. The reduction's own signal (its rank's barrier) releases the residual.
#pragma once

#include "kernels/device_utils.cuh"
#include "kernels/op_context.cuh"

namespace megaserve::kernels {

struct TpReduceOp {
  static constexpr engine::isa::Opcode kOpcode = engine::isa::Opcode::kTpReduce;

  __device__ static void run(const engine::isa::Instruction& inst, const OpContext& ctx) {
    const auto a = engine::isa::args_of<engine::isa::HiddenTileArgs>(inst);
    const DeviceStepDesc& st = ctx.step;
    const int H = ctx.model.hidden;
    const int tp = st.tp;
    const int cols = a.col_end - a.col_begin;
    const int64_t slot_stride = static_cast<int64_t>(st.num_tokens) * H;
    const int64_t slot_base = a.partial_slot * slot_stride;
    const int64_t n = static_cast<int64_t>(a.row_end - a.row_begin) * cols;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const int t = a.row_begin + static_cast<int>(i / cols);
      const int c = a.col_begin + static_cast<int>(i % cols);
      const int64_t at = static_cast<int64_t>(t) * H + c;  // (rows, cols) of [T, H]
      float sum = 0.0f;
      if (a.splits > 1) {  // this rank's split-K slots, in order [SPLIT_K]
        for (int s = 0; s < a.splits; ++s) {
          sum = __fadd_rn(sum, __ldcg(st.partial + s * slot_stride + at));
        }
      } else {
        for (int r = 0; r < tp; ++r) {
          sum = __fadd_rn(sum, __ldcg(st.peer_partial[r] + slot_base + at));
        }
      }
      st.residual[at] = a.assign ? sum : __fadd_rn(st.residual[at], sum);
    }
  }
};

}  // namespace megaserve::kernels
