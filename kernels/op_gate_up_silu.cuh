// kGateUpSilu (engine/cpu/cpu_ops_projection.cc): act[t, c] = SiLU(gate[c] . n) * (up[c] . n),
// n = RMSNorm(ffn_norm) of residual row t, for FFN columns [col_begin, col_end); also
// bf16(act[t, c]) into DeviceModel::ffn_act, the down projection's wgmma input.
#pragma once

#include "kernels/device_utils.cuh"
#include "kernels/hopper/hopper_ptx.cuh"
#include "kernels/op_context.cuh"
#include "kernels/projection.cuh"

namespace megaserve::kernels {

struct GateUpSiluOp {
  static constexpr engine::isa::Opcode kOpcode = engine::isa::Opcode::kGateUpSilu;

  // True: a wgmma pass is set up for the entry function to run, then call again
  // [WGMMA_WALK].
  __device__ static bool run(const engine::isa::Instruction& inst, const OpContext& ctx) {
    const auto a = engine::isa::args_of<engine::isa::GateUpArgs>(inst);
    const DeviceModel& md = ctx.model;
    const DeviceStepDesc& st = ctx.step;
    const DeviceLayer& w = md.layers[inst.layer()];
    const int H = md.hidden, F = md.ffn;
    float* scale = ctx.smem;                          // (kProjectionScaleFloats)
    float* core = ctx.smem + kProjectionScaleFloats;  // the projection's own
    const int core_bytes = (ctx.smem_floats - kProjectionScaleFloats) * 4;
    PassWalk walk{ctx.call, 0, ctx.pass, ctx.bulk};
    for (int r0 = a.row_begin; r0 < a.row_end; r0 += kProjectionScaleRows) {
      const int n = min(kProjectionScaleRows, a.row_end - r0);
      const auto row = [&](int r) { return st.residual + static_cast<int64_t>(r0 + r) * H; };
      const Walk step = project<2>(
          walk, st.flags,
          ProjectionInput{n, a.col_end - a.col_begin, H, scale, w.ffn_norm,
                          act_cache_tag(kOpcode, inst.layer()), r0,
                          a.normed != 0 ? md.norm_act_map : nullptr, md.norm_act_rows},
          reinterpret_cast<char*>(core), core_bytes,
          [&] {
            cached_inv_rms(*ctx.norm_cache, static_cast<int32_t>(kOpcode), inst.layer(), r0, n, H,
                           md.rms_norm_eps, row, scale);
          },
          row,
          [&](int m, int c) {
            return (m == 0 ? w.w_gate : w.w_up) + static_cast<int64_t>(a.col_begin + c) * H;
          },
          [&](int m, int c) {
            if (md.weight_maps == nullptr) return WeightGroup{nullptr, 0};
            return WeightGroup{
                md.weight_maps + inst.layer() * kLayerMatrices + (m == 0 ? kWGate : kWUp),
                a.col_begin + c};
          },
          [&](int c, int r, const float* v) {
            const float g = v[0], u = v[1];
            const float x = g / (1.0f + expf(-g)) * u;
            const int64_t at = static_cast<int64_t>(r0 + r) * F + a.col_begin + c;
            st.act[at] = x;
            // What the down projection's wgmma passes read: the value they would round.
            if (r0 + r < md.ffn_act_rows) md.ffn_act[at] = float_to_bf16_bits(x);
          });
      if (step == Walk::kYield) return true;
      if (step == Walk::kPrefetched) return false;
    }
    // The bf16 rows, written through the generic proxy, are read by the TMA unit (the down
    // projection's, after its wait for this instruction).
    if (md.ffn_act != nullptr) hopper::fence_proxy_async_global();
    return false;
  }
};

}  // namespace megaserve::kernels
