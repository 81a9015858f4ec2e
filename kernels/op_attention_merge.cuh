// kAttentionMerge (engine/cpu/cpu_ops_attention.cc): combines the KV splits of one request's
// query rows [query_begin, query_end):
//   out = sum_s exp(lse_s - M) o_s / sum_s exp(lse_s - M),  M = max_s lse_s,
// over the splits s <= position / kv_split_tokens. One warp per (query row, q head).
#pragma once

#include "kernels/device_utils.cuh"
#include "kernels/op_context.cuh"

namespace megaserve::kernels {

struct AttentionMergeOp {
  static constexpr engine::isa::Opcode kOpcode = engine::isa::Opcode::kAttentionMerge;

  __device__ static void run(const engine::isa::Instruction& inst, const OpContext& ctx) {
    const auto a = engine::isa::args_of<engine::isa::AttentionMergeArgs>(inst);
    const DeviceModel& md = ctx.model;
    const DeviceStepDesc& st = ctx.step;
    const int hd = md.head_dim, hq = md.q_heads, hkv = md.kv_heads, group = hq / hkv;
    const int K = st.kv_split_tokens;
    const int i = a.request;
    const int row0 = st.query_start[i];
    const int n = st.query_start[i + 1] - row0;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int item = warp; item < (a.query_end - a.query_begin) * hq; item += kMegakernelWarps) {
      const int qi = a.query_begin + item / hq, h = item % hq;
      const int t = row0 + qi;
      const int splits = st.positions[t] / K + 1;
      const int kv = h / group, g = h % group;
      const auto row_of = [&](int s) {
        return st.split_row_begin[i] + ((static_cast<int64_t>(s) * hkv + kv) * n + qi) * group + g;
      };
      float mx = -INFINITY;
      for (int s = 0; s < splits; ++s) mx = fmaxf(mx, st.split_lse[row_of(s)]);
      float* out = st.attn_out + (static_cast<int64_t>(t) * hq + h) * hd;
      for (int d = lane; d < hd; d += 32) {
        float acc = 0.0f, denom = 0.0f;
        for (int s = 0; s < splits; ++s) {
          const float w = expf(st.split_lse[row_of(s)] - mx);
          denom += w;
          acc += w * st.split_out[row_of(s) * hd + d];
        }
        out[d] = acc / denom;
      }
    }
  }
};

}  // namespace megaserve::kernels
