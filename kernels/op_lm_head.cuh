// kLmHead (engine/cpu/cpu_ops_lm_head.cc): logits[s, c] = dot(lm_head[c], RMSNorm(final_norm) of
// residual[sample_rows[s]]) for sampling rows [sample_begin, sample_end) and vocabulary
// columns [col_begin, col_end) of the rank's vocabulary slice, into the full-vocabulary rows
// of DeviceStepDesc::logits (row stride vocab_size; the rank's pointer starts at its slice).
#pragma once

#include "kernels/device_utils.cuh"
#include "kernels/op_context.cuh"
#include "kernels/projection.cuh"

namespace megaserve::kernels {

struct LmHeadOp {
  static constexpr engine::isa::Opcode kOpcode = engine::isa::Opcode::kLmHead;

  // True: a wgmma pass is set up for the entry function to run, then call again
  // [WGMMA_WALK].
  __device__ static bool run(const engine::isa::Instruction& inst, const OpContext& ctx) {
    const auto a = engine::isa::args_of<engine::isa::LmHeadArgs>(inst);
    const DeviceModel& md = ctx.model;
    const DeviceStepDesc& st = ctx.step;
    const int H = md.hidden, V = md.vocab_size;       // V: the logits' row stride
    float* scale = ctx.smem;                          // (kProjectionScaleFloats)
    float* core = ctx.smem + kProjectionScaleFloats;  // the projection's own
    const int core_bytes = (ctx.smem_floats - kProjectionScaleFloats) * 4;
    PassWalk walk{ctx.call, 0, ctx.pass, ctx.bulk};
    // Chunks of kProjectionScaleRows: one 128-row wgmma pass per chunk and weight tile, so a
    // decode step of 256 rows streams the vocabulary twice, not four times. The normalized
    // sampling rows go through the activation cache [ACT_CACHE] at their sampling index s
    // (row s of the cache): the first pass over a chunk converts and publishes them, every
    // other pass on any SM takes them with the TMA unit (converting them in every pass, a
    // decode step of 256 samples spent ~1.4 ms here on an H100, ~4x its floor). Safe by the
    // cache's chain argument (kernels/act_cache.h): the LM head's tiles wait for all of the
    // last layer's down tiles, which waited for all of its gate/up tiles, the last passes
    // that read the cache before it.
    for (int s0 = a.sample_begin; s0 < a.sample_end; s0 += kProjectionScaleRows) {
      const int n = min(kProjectionScaleRows, a.sample_end - s0);
      const auto row = [&](int r) {
        return st.residual + static_cast<int64_t>(st.sample_rows[s0 + r]) * H;
      };
      const Walk step = project<1>(
          walk, st.flags,
          ProjectionInput{n, a.col_end - a.col_begin, H, scale, md.final_norm,
                          act_cache_tag(kOpcode, 0), s0},
          reinterpret_cast<char*>(core), core_bytes,
          [&] {
            cached_inv_rms(*ctx.norm_cache, static_cast<int32_t>(kOpcode), inst.layer(), s0, n, H,
                           md.rms_norm_eps, row, scale);
          },
          row, [&](int, int c) { return md.lm_head + static_cast<int64_t>(a.col_begin + c) * H; },
          [&](int, int c) {
            if (md.weight_maps == nullptr) return WeightGroup{nullptr, 0};
            return WeightGroup{md.weight_maps + md.num_layers * kLayerMatrices, a.col_begin + c};
          },
          [&](int c, int r, const float* v) {
            st.logits[static_cast<int64_t>(s0 + r) * V + a.col_begin + c] = v[0];
          });
      if (step == Walk::kYield) return true;
      if (step == Walk::kPrefetched) return false;
    }
    return false;
  }
};

}  // namespace megaserve::kernels
