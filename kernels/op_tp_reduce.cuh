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

// The float4 path of a tile (rows x cols of residual rows `out`, row stride H; cols a multiple
// of 4, 16-byte aligned): kReduceBatch float4 per thread with every load issued before any
// store, so that a tile is a few memory round trips, not one per element (an H100 took 33 us
// per split-K reduction of 128 x 64 elements, one L2 round trip after another). The tile
// starts at element tile_at of [T, H]; term k is partial + k * slot_stride (split-K) or
// peers[k] + slot_base, from there. A function of its own (a call) with plain arguments, so that
// the batch stays in registers: inlined into dispatch, whose registers are all taken, it went to
// local memory, each load waited for in turn again (17 us per 128 x 64 tile of 4 splits).
inline constexpr int kReduceBatch = 4;
__device__ __noinline__ void reduce_by_float4(float* residual, int64_t tile_at, int H, int rows,
                                              int cols, const float* partial,
                                              const float* const* peers, int64_t slot_stride,
                                              int64_t slot_base, int terms, bool split,
                                              bool assign) {
  float* const out = residual + tile_at;
  const int c4s = cols / 4;
  const int n4 = rows * c4s;
  const auto at_of = [&](int i) {  // float4 i of the tile, from `out`
    return static_cast<int64_t>(i / c4s) * H + (i % c4s) * 4;
  };
  const auto add = [](float4 x, float4 y) {
    return make_float4(__fadd_rn(x.x, y.x), __fadd_rn(x.y, y.y), __fadd_rn(x.z, y.z),
                       __fadd_rn(x.w, y.w));
  };
  for (int base = threadIdx.x; base < n4; base += kReduceBatch * blockDim.x) {
    float4 sum[kReduceBatch], res[kReduceBatch];
    int64_t at[kReduceBatch];
#pragma unroll
    for (int u = 0; u < kReduceBatch; ++u) {
      at[u] = at_of(min(base + u * static_cast<int>(blockDim.x), n4 - 1));  // in range
      sum[u] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (!assign) res[u] = *reinterpret_cast<const float4*>(out + at[u]);
    }
    for (int k = 0; k < terms; ++k) {  // in order from 0.0f, per element
      const float* src = (split ? partial + k * slot_stride : peers[k] + slot_base) + tile_at;
#pragma unroll
      for (int u = 0; u < kReduceBatch; ++u) {
        sum[u] = add(sum[u], __ldcg(reinterpret_cast<const float4*>(src + at[u])));
      }
    }
#pragma unroll
    for (int u = 0; u < kReduceBatch; ++u) {
      if (base + u * static_cast<int>(blockDim.x) >= n4) break;
      *reinterpret_cast<float4*>(out + at[u]) = assign ? sum[u] : add(res[u], sum[u]);
    }
  }
}

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
    const int rows = a.row_end - a.row_begin;
    const int terms = a.splits > 1 ? a.splits : tp;
    // Term k of element `at`: this rank's split-K slot k [SPLIT_K], or rank k's partial.
    const auto term = [&](int k) {
      return a.splits > 1 ? st.partial + k * slot_stride : st.peer_partial[k] + slot_base;
    };
    if (cols % 4 == 0 && a.col_begin % 4 == 0 && H % 4 == 0) {
      reduce_by_float4(st.residual, static_cast<int64_t>(a.row_begin) * H + a.col_begin, H, rows,
                       cols, st.partial, st.peer_partial, slot_stride, slot_base, terms,
                       a.splits > 1, a.assign != 0);
      return;
    }
    const int64_t n = static_cast<int64_t>(rows) * cols;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const int t = a.row_begin + static_cast<int>(i / cols);
      const int c = a.col_begin + static_cast<int>(i % cols);
      const int64_t at = static_cast<int64_t>(t) * H + c;  // (rows, cols) of [T, H]
      float sum = 0.0f;
      for (int k = 0; k < terms; ++k) sum = __fadd_rn(sum, __ldcg(term(k) + at));
      st.residual[at] = a.assign ? sum : __fadd_rn(st.residual[at], sum);
    }
  }
};

}  // namespace megaserve::kernels
