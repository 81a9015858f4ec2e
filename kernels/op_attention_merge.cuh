// kAttentionMerge (engine/cpu/cpu_ops_attention.cc): combines the KV splits of one request's
// query rows [query_begin, query_end):
//   out = sum_s exp(lse_s - M) o_s / sum_s exp(lse_s - M),  M = max_s lse_s,
// over the splits s <= position / kv_split_tokens. One warp per (query row, q head); head dims
// of 128 or 64 by float4 or float2 per lane (merge_dims).
#pragma once

#include <type_traits>

#include "kernels/device_utils.cuh"
#include "kernels/hopper/hopper_ptx.cuh"
#include "kernels/mma_primitives.cuh"
#include "kernels/op_context.cuh"

namespace megaserve::kernels {

struct AttentionMergeOp {
  static constexpr engine::isa::Opcode kOpcode = engine::isa::Opcode::kAttentionMerge;

  __device__ static bool aligned16(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
  }
  __device__ static bool aligned8(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 7) == 0;
  }

  // Head dims [kW lane, kW lane + kW) of one (query row, q head), hd = 32 kW: each split's
  // weight computed once, by one lane, and shuffled; kW floats of its partial output in one
  // load; four splits' loads in flight. The scalar loop (per dim and split a 4-byte load, a
  // load of the split's lse and an expf) took ~720 us per merge instruction of an 8k prefill on
  // an H100. The same operations in the same order per dim, so the same floats.
  template <int kW, typename RowOf>
  __device__ static void merge_dims(const DeviceModel& md, const DeviceStepDesc& st, RowOf row_of,
                                    int splits, float mx, float* out, int lane) {
    using Vec = typename std::conditional<kW == 4, float4, float2>::type;
    constexpr int hd = 32 * kW;
    float acc[kW] = {};
    float denom = 0.0f;
    for (int s0 = 0; s0 < splits; s0 += 32) {
      const int own = s0 + lane;
      const float w_own = own < splits ? expf(st.split_lse[row_of(own)] - mx) : 0.0f;
      const int m = min(32, splits - s0);
#pragma unroll 4
      for (int j = 0; j < m; ++j) {
        const float w = __shfl_sync(0xffffffffu, w_own, j);
        const Vec x = *reinterpret_cast<const Vec*>(st.split_out + row_of(s0 + j) * hd + kW * lane);
        const float* xs = reinterpret_cast<const float*>(&x);
        denom += w;
#pragma unroll
        for (int c = 0; c < kW; ++c) acc[c] += w * xs[c];
      }
    }
    Vec o;
    float* os = reinterpret_cast<float*>(&o);
#pragma unroll
    for (int c = 0; c < kW; ++c) os[c] = acc[c] / denom;
    *reinterpret_cast<Vec*>(out + kW * lane) = o;
    if (uint16_t* b = attn_act_at(md, st, out)) {
#pragma unroll
      for (int c = 0; c < kW; c += 2) {
        *reinterpret_cast<uint32_t*>(b + kW * lane + c) = pack_bf16x2(os[c], os[c + 1]);
      }
    }
  }

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
      // The splits' weights: lane l computes those of splits l, l + 32, ...; the sums below
      // run over s in order, as the CPU's, whatever the vector width.
      float mx = -INFINITY;
      for (int s = lane; s < splits; s += 32) mx = fmaxf(mx, st.split_lse[row_of(s)]);
      mx = warp_max(mx);
      float* out = st.attn_out + (static_cast<int64_t>(t) * hq + h) * hd;
      const bool vec4 = hd == 128 && aligned16(out) && aligned16(st.split_out);
      const bool vec2 = hd == 64 && aligned8(out) && aligned8(st.split_out);
      if (vec4) {
        merge_dims<4>(md, st, row_of, splits, mx, out, lane);
      } else if (vec2) {
        merge_dims<2>(md, st, row_of, splits, mx, out, lane);
      } else {
        for (int d = lane; d < hd; d += 32) {
          float acc = 0.0f, denom = 0.0f;
          for (int s = 0; s < splits; ++s) {
            const float w = expf(st.split_lse[row_of(s)] - mx);
            denom += w;
            acc += w * st.split_out[row_of(s) * hd + d];
          }
          out[d] = acc / denom;
          if (uint16_t* b = attn_act_at(md, st, out)) b[d] = float_to_bf16_bits(out[d]);
        }
      }
    }
    // The bf16 copy, written through the generic proxy, is read by the TMA unit (the output
    // projection's, after its wait for this instruction).
    if (md.attn_act != nullptr) hopper::fence_proxy_async_global();
  }
};

}  // namespace megaserve::kernels
