// kOProj and kDownProj (engine/cpu/cpu_ops_projection.cc): residual[t, c] += dot(W[c, :], in[t, :])
// for a tile of token rows x hidden columns; W = wo with in = attn_out (K = q_heads * hd), or
// W = w_down with in = act (K = ffn). Under tensor parallelism (partial_slot >= 0) the rank's
// partial sum over its K slice is stored into that partial slot instead, for kTpReduce; so is
// a split-K tile's sum over inputs [k_begin, k_end) (engine/isa/isa.h [SPLIT_K]).
#pragma once

#include "kernels/device_utils.cuh"
#include "kernels/op_context.cuh"
#include "kernels/projection.cuh"

namespace megaserve::kernels {

// O and down's outputs into their [T, H] rows: added into the residual (`add`), or stored
// into a partial slot. A wgmma pass at a time through wgmma_pass_to_rows, whose loads of the
// residual are batched; element by element from the other cores.
struct HiddenEmit {
  float* out;
  int32_t H, row_begin, col_begin;
  bool add;

  __device__ void operator()(int c, int r, const float* v) const {
    float& o = out[static_cast<int64_t>(row_begin + r) * H + col_begin + c];
    o = add ? o + v[0] : v[0];
  }
  __device__ void pass(float* dstage, int r0, int nr, int c0, int nc, int) const {
    wgmma_pass_to_rows(out + static_cast<int64_t>(row_begin + r0) * H + col_begin + c0, H, dstage,
                       nr, nc, add);
  }
};

struct HiddenProjectionOp {
  static constexpr engine::isa::Opcode kOpcodeO = engine::isa::Opcode::kOProj;
  static constexpr engine::isa::Opcode kOpcodeDown = engine::isa::Opcode::kDownProj;

  // True: a wgmma pass is set up for the entry function to run, then call again
  // [WGMMA_WALK].
  __device__ static bool run(const engine::isa::Instruction& inst, const OpContext& ctx) {
    const auto a = engine::isa::args_of<engine::isa::HiddenTileArgs>(inst);
    const DeviceModel& md = ctx.model;
    const DeviceStepDesc& st = ctx.step;
    const DeviceLayer& w = md.layers[inst.layer()];
    const bool o_proj = inst.opcode() == kOpcodeO;
    const int H = md.hidden;
    const int full_k = o_proj ? md.q_heads * md.head_dim : md.ffn;  // row stride of W, input
    // A split-K tile's inputs [k0, k0 + K) [SPLIT_K]: rows offset by k0 (a multiple of 64,
    // so 16-byte aligned as the cores need), TMA loads by ProjectionInput::k0.
    const int k0 = a.k_end > 0 ? a.k_begin : 0;
    const int K = a.k_end > 0 ? a.k_end - a.k_begin : full_k;
    const uint16_t* W = (o_proj ? w.wo : w.w_down) + k0;        // [H, full_k] from k0
    const float* input = (o_proj ? st.attn_out : st.act) + k0;  // [T, full_k] from k0
    float* const partial = a.partial_slot < 0 ? nullptr
                                              : st.partial + static_cast<int64_t>(a.partial_slot) *
                                                                 st.num_tokens * H;  // [T, H]
    PassWalk walk{ctx.call, 0, ctx.pass, ctx.bulk};
    return project<1>(
               walk, st.flags,
               ProjectionInput{
                   a.row_end - a.row_begin, a.col_end - a.col_begin, K, nullptr, nullptr,
                   k0 == 0 && K == full_k ? act_cache_tag(inst.opcode(), inst.layer()) : -1,
                   a.row_begin, o_proj ? md.attn_act_map : md.ffn_act_map,
                   o_proj ? md.attn_act_rows : md.ffn_act_rows, k0},
               reinterpret_cast<char*>(ctx.smem), ctx.smem_floats * 4, [] {},
               [&](int r) { return input + static_cast<int64_t>(a.row_begin + r) * full_k; },
               [&](int, int c) { return W + static_cast<int64_t>(a.col_begin + c) * full_k; },
               [&](int, int c) {
                 if (md.weight_maps == nullptr) return WeightGroup{nullptr, 0};
                 return WeightGroup{
                     md.weight_maps + inst.layer() * kLayerMatrices + (o_proj ? kWo : kWDown),
                     a.col_begin + c};
               },
               HiddenEmit{partial != nullptr ? partial : st.residual, H, a.row_begin, a.col_begin,
                          partial == nullptr}) == Walk::kYield;
  }
};

}  // namespace megaserve::kernels
