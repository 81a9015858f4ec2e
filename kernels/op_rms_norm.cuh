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

// Rows [0, n) of x (fp32, H a multiple of 4, 16-byte aligned) normalized into out (bf16):
// their row scales into `scale` (row_inv_rms, as the projections compute them), then
// kNormBatch float4 of x (and their norm weights) loaded per thread before any is converted
// and stored. A function of its own (a call) with plain arguments, so that the loaded values
// stay in registers: inlined into dispatch, whose registers are all taken, a loop like it
// waited for each load in turn (64 rows took ~200 us on an H100). Ends with __syncthreads.
inline constexpr int kNormBatch = 4;
__device__ __noinline__ void rms_norm_rows(const float* x, uint16_t* out, const uint16_t* norm,
                                           int n, int H, float eps, float* scale) {
  __builtin_assume(__isShared(scale));
  row_inv_rms(
      n, H, eps, [&](int r) { return x + static_cast<int64_t>(r) * H; }, scale);
  const int quads = H / 4, items = n * quads;
  for (int i0 = threadIdx.x; i0 < items; i0 += blockDim.x * kNormBatch) {
    float4 v[kNormBatch];
    uint2 nw[kNormBatch];
#pragma unroll
    for (int u = 0; u < kNormBatch; ++u) {
      const int i = min(i0 + u * static_cast<int>(blockDim.x), items - 1);  // in range
      const int r = i / quads, k = (i % quads) * 4;
      v[u] = *reinterpret_cast<const float4*>(x + static_cast<int64_t>(r) * H + k);
      nw[u] = norm != nullptr ? __ldg(reinterpret_cast<const uint2*>(norm + k))
                              : make_uint2(0x3f803f80u, 0x3f803f80u);  // bf16 1.0 x 4
    }
#pragma unroll
    for (int u = 0; u < kNormBatch; ++u) {
      const int i = i0 + u * static_cast<int>(blockDim.x);
      if (i >= items) break;
      const int r = i / quads, k = (i % quads) * 4;
      *reinterpret_cast<uint2*>(out + static_cast<int64_t>(r) * H + k) =
          normed_bf16x4(v[u], scale[r], unpack_bf16x2(nw[u].x), unpack_bf16x2(nw[u].y));
    }
  }
  __syncthreads();  // the scales are the next chunk's
}

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
    for (int r0 = a.row_begin; r0 < row_end; r0 += kProjectionScaleRows) {
      rms_norm_rows(st.residual + static_cast<int64_t>(r0) * H,
                    md.norm_act + static_cast<int64_t>(r0) * H, norm,
                    min(kProjectionScaleRows, row_end - r0), H, md.rms_norm_eps,
                    ctx.smem /* (kProjectionScaleFloats) */);
    }
    // Written through the generic proxy, read by the TMA unit (the projections', after their
    // wait for this stage).
    hopper::fence_proxy_async_global();
  }
};

}  // namespace megaserve::kernels
