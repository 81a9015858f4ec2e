// kGateUpSilu (engine/cpu_ops_projection.cc): act[t, c] = SiLU(gate[c] . n) * (up[c] . n),
// n = RMSNorm(ffn_norm) of residual row t, for FFN columns [col_begin, col_end).
#pragma once

#include "kernels/device_utils.cuh"
#include "kernels/op_context.cuh"
#include "kernels/tile_matvec.cuh"

namespace megaserve::kernels {

struct GateUpSiluOp {
  static constexpr engine::isa::Opcode kOpcode = engine::isa::Opcode::kGateUpSilu;

  __device__ static void run(const engine::isa::Instruction& inst, const OpContext& ctx) {
    const auto a = engine::isa::args_of<engine::isa::GateUpArgs>(inst);
    const DeviceModel& md = ctx.model;
    const DeviceStepDesc& st = ctx.step;
    const DeviceLayer& w = md.layers[inst.layer()];
    const int H = md.hidden, F = md.ffn;
    const int warp = threadIdx.x >> 5;
    float* xs = ctx.smem;  // (rows, H)
    const int rpp = rows_per_pass(H, ctx.smem_floats);
    for (int r0 = a.row_begin; r0 < a.row_end; r0 += rpp) {
      const int n = min(rpp, a.row_end - r0);
      for (int r = warp; r < n; r += kMegakernelWarps) {
        warp_rms_norm(st.residual + static_cast<int64_t>(r0 + r) * H, w.ffn_norm, H,
                      md.rms_norm_eps, xs + r * H);
      }
      __syncthreads();
      project_rows<2>(
          (st.flags & kStepTensorCores) != 0, a.col_end - a.col_begin, H, xs, n,
          [&](int m, int c) {
            return (m == 0 ? w.w_gate : w.w_up) + static_cast<int64_t>(a.col_begin + c) * H;
          },
          [&](int c, int r, const float* v) {
            const float g = v[0], u = v[1];
            st.act[static_cast<int64_t>(r0 + r) * F + a.col_begin + c] = g / (1.0f + expf(-g)) * u;
          });
      __syncthreads();
    }
  }
};

}  // namespace megaserve::kernels
