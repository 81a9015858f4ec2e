// kOProj and kDownProj (engine/cpu_ops_projection.cc): residual[t, c] += dot(W[c, :], in[t, :])
// for a tile of token rows x hidden columns; W = wo with in = attn_out (K = q_heads * hd), or
// W = w_down with in = act (K = ffn). One rank only: partial slots (TP) are not supported.
#pragma once

#include "kernels/device_utils.cuh"
#include "kernels/op_context.cuh"
#include "kernels/tile_matvec.cuh"

namespace megaserve::kernels {

struct HiddenProjectionOp {
  static constexpr engine::isa::Opcode kOpcodeO = engine::isa::Opcode::kOProj;
  static constexpr engine::isa::Opcode kOpcodeDown = engine::isa::Opcode::kDownProj;

  __device__ static void run(const engine::isa::Instruction& inst, const OpContext& ctx) {
    const auto a = engine::isa::args_of<engine::isa::HiddenTileArgs>(inst);
    const DeviceModel& md = ctx.model;
    const DeviceStepDesc& st = ctx.step;
    const DeviceLayer& w = md.layers[inst.layer()];
    const bool o_proj = inst.opcode() == kOpcodeO;
    const int H = md.hidden;
    const int K = o_proj ? md.q_heads * md.head_dim : md.ffn;
    const uint16_t* W = o_proj ? w.wo : w.w_down;        // [H, K]
    const float* input = o_proj ? st.attn_out : st.act;  // [T, K]
    float* xs = ctx.smem;                                // (rows, K)
    const int rpp = rows_per_pass(K, ctx.smem_floats);
    for (int r0 = a.row_begin; r0 < a.row_end; r0 += rpp) {
      const int n = min(rpp, a.row_end - r0);
      for (int i = threadIdx.x; i < n * K; i += blockDim.x) {
        xs[i] = input[static_cast<int64_t>(r0) * K + i];
      }
      __syncthreads();
      project_rows<1>((st.flags & kStepTensorCores) != 0, a.col_end - a.col_begin, K, xs, n,
                      [&](int, int c) { return W + static_cast<int64_t>(a.col_begin + c) * K; },
                      [&](int c, int r, const float* v) {
                        st.residual[static_cast<int64_t>(r0 + r) * H + a.col_begin + c] += v[0];
                      });
      __syncthreads();
    }
  }
};

}  // namespace megaserve::kernels
