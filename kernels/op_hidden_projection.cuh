// kOProj and kDownProj (engine/cpu/cpu_ops_projection.cc): residual[t, c] += dot(W[c, :], in[t, :])
// for a tile of token rows x hidden columns; W = wo with in = attn_out (K = q_heads * hd), or
// W = w_down with in = act (K = ffn). Under tensor parallelism (partial_slot >= 0) the rank's
// partial sum over its K slice is stored into that partial slot instead, for kTpReduce.
#pragma once

#include "kernels/device_utils.cuh"
#include "kernels/op_context.cuh"
#include "kernels/projection.cuh"

namespace megaserve::kernels {

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
    const int K = o_proj ? md.q_heads * md.head_dim : md.ffn;
    const uint16_t* W = o_proj ? w.wo : w.w_down;        // [H, K]
    const float* input = o_proj ? st.attn_out : st.act;  // [T, K]
    float* const partial = a.partial_slot < 0 ? nullptr
                                              : st.partial + static_cast<int64_t>(a.partial_slot) *
                                                                 st.num_tokens * H;  // [T, H]
    PassWalk walk{ctx.call, 0, ctx.pass};
    return project<1>(
               walk, st.flags,
               ProjectionInput{a.row_end - a.row_begin, a.col_end - a.col_begin, K, nullptr,
                               nullptr, act_cache_tag(inst.opcode(), inst.layer()), a.row_begin,
                               o_proj ? md.attn_act_map : md.ffn_act_map,
                               o_proj ? md.attn_act_rows : md.ffn_act_rows},
               reinterpret_cast<char*>(ctx.smem), ctx.smem_floats * 4, [] {},
               [&](int r) { return input + static_cast<int64_t>(a.row_begin + r) * K; },
               [&](int, int c) { return W + static_cast<int64_t>(a.col_begin + c) * K; },
               [&](int, int c) {
                 if (md.weight_maps == nullptr) return WeightGroup{nullptr, 0};
                 return WeightGroup{
                     md.weight_maps + inst.layer() * kLayerMatrices + (o_proj ? kWo : kWDown),
                     a.col_begin + c};
               },
               [&](int c, int r, const float* v) {
                 const int64_t at = static_cast<int64_t>(a.row_begin + r) * H + a.col_begin + c;
                 if (partial != nullptr) {
                   partial[at] = v[0];
                 } else {
                   st.residual[at] += v[0];
                 }
               }) == Walk::kYield;
  }
};

}  // namespace megaserve::kernels
