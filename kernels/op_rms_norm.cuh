// kRmsNorm [NORM_STAGE] (engine/isa/isa.h): the normalized rows of token rows [row_begin,
// row_end) of the residual, bf16(bf16(x * inv_rms) * weight), into DeviceModel::norm_act for
// rows below norm_act_rows: the bits the wgmma passes' own conversion makes
// (kernels/tile_wgmma.cuh), from the same row scales (row_inv_rms).
#pragma once

#include "kernels/device_utils.cuh"
#include "kernels/hopper/hopper_ptx.cuh"
#include "kernels/mma_primitives.cuh"
#include "kernels/op_context.cuh"
#include "kernels/projection.cuh"

namespace megaserve::kernels {

struct RmsNormOp {
  static constexpr engine::isa::Opcode kOpcode = engine::isa::Opcode::kRmsNorm;

  __device__ static void run(const engine::isa::Instruction& inst, const OpContext& ctx) {
    const auto a = engine::isa::args_of<engine::isa::RmsNormArgs>(inst);
    const DeviceModel& md = ctx.model;
    const DeviceStepDesc& st = ctx.step;
    const int H = md.hidden;
    const int row_end = min(a.row_end, md.norm_act_rows);
    // Nothing reads the rows where the model keeps none (the projections normalize them).
    if (md.norm_act == nullptr || H % 4 != 0 || a.row_begin >= row_end) return;
    const DeviceLayer& w = md.layers[inst.layer()];
    const uint16_t* norm = a.norm == engine::isa::kFfnNorm ? w.ffn_norm : w.attn_norm;
    float* scale = ctx.smem;  // (kProjectionScaleFloats)
    const int quads = H / 4;
    for (int r0 = a.row_begin; r0 < row_end; r0 += kProjectionScaleRows) {
      const int n = min(kProjectionScaleRows, row_end - r0);
      const auto row = [&](int r) { return st.residual + static_cast<int64_t>(r0 + r) * H; };
      row_inv_rms(n, H, md.rms_norm_eps, row, scale);  // ends with __syncthreads
      for (int i = threadIdx.x; i < n * quads; i += blockDim.x) {
        const int r = i / quads, k = (i % quads) * 4;
        const float4 x = *reinterpret_cast<const float4*>(row(r) + k);
        float2 w0 = make_float2(1.0f, 1.0f), w1 = w0;
        if (norm != nullptr) {
          const uint2 nw = __ldg(reinterpret_cast<const uint2*>(norm + k));
          w0 = unpack_bf16x2(nw.x);
          w1 = unpack_bf16x2(nw.y);
        }
        *reinterpret_cast<uint2*>(md.norm_act + static_cast<int64_t>(r0 + r) * H + k) =
            normed_bf16x4(x, scale[r], w0, w1);
      }
      __syncthreads();  // the scales are the next chunk's
    }
    // Written through the generic proxy, read by the TMA unit (the projections', after their
    // wait for this stage).
    hopper::fence_proxy_async_global();
  }
};

}  // namespace megaserve::kernels
