// kLmHead (engine/cpu_ops_lm_head.cc): logits[s, c] = dot(lm_head[c], RMSNorm(final_norm) of
// residual[sample_rows[s]]) for sampling rows [sample_begin, sample_end) and vocabulary
// columns [col_begin, col_end).
#pragma once

#include "kernels/device_utils.cuh"
#include "kernels/op_context.cuh"
#include "kernels/tile_matvec.cuh"

namespace megaserve::kernels {

struct LmHeadOp {
  static constexpr engine::isa::Opcode kOpcode = engine::isa::Opcode::kLmHead;

  __device__ static void run(const engine::isa::Instruction& inst, const OpContext& ctx) {
    const auto a = engine::isa::args_of<engine::isa::LmHeadArgs>(inst);
    const DeviceModel& md = ctx.model;
    const DeviceStepDesc& st = ctx.step;
    const int H = md.hidden, V = md.vocab;
    const int warp = threadIdx.x >> 5;
    float* xs = ctx.smem;  // (rows, H)
    const int rpp = rows_per_pass(H, ctx.smem_floats);
    for (int s0 = a.sample_begin; s0 < a.sample_end; s0 += rpp) {
      const int n = min(rpp, a.sample_end - s0);
      for (int r = warp; r < n; r += kMegakernelWarps) {
        warp_rms_norm(st.residual + static_cast<int64_t>(st.sample_rows[s0 + r]) * H, md.final_norm,
                      H, md.rms_norm_eps, xs + r * H);
      }
      __syncthreads();
      project_rows<1>(
          (st.flags & kStepTensorCores) != 0, a.col_end - a.col_begin, H, xs, n,
          [&](int, int c) { return md.lm_head + static_cast<int64_t>(a.col_begin + c) * H; },
          [&](int c, int r, const float* v) {
            st.logits[static_cast<int64_t>(s0 + r) * V + a.col_begin + c] = v[0];
          });
      __syncthreads();
    }
  }
};

}  // namespace megaserve::kernels
