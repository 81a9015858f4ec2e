// kAttention, first version (kStepAttentionWarpPerHead; op_attention.cuh has the contract):
// one warp per (query row, q head) walks all of that row's keys, online softmax over chunks
// of 32 keys: lane i scores key chunk + i, then the chunk's V rows are accumulated with each
// lane owning dims lane, lane + 32, ... (hd <= kMaxHeadDim). Kept to measure against: a
// decode row's keys are walked by one warp, a few dependent memory round trips per chunk.
#pragma once

#include "kernels/device_utils.cuh"
#include "kernels/op_context.cuh"

namespace megaserve::kernels {

struct AttentionWarpPerHead {
  static constexpr int kDimsPerLane = kMaxHeadDim / 32;
  static constexpr int kVRowsInFlight = 8;

  __device__ static void run(const engine::isa::Instruction& inst, const OpContext& ctx) {
    const auto a = engine::isa::args_of<engine::isa::AttentionArgs>(inst);
    const DeviceModel& md = ctx.model;
    const DeviceStepDesc& st = ctx.step;
    const int hd = md.head_dim, hq = md.q_heads, hkv = md.kv_heads, group = hq / hkv;
    const int K = st.kv_split_tokens, bs = st.kv_block_size;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float* qs = ctx.smem + warp * kMaxHeadDim;  // (hd) this warp's query
    const int64_t layer_offset = inst.layer() * md.cache_layer_elements;
    const uint16_t* kc = md.k_cache + layer_offset;
    const uint16_t* vc = md.v_cache + layer_offset;
    const float scale = 1.0f / sqrtf(static_cast<float>(hd));
    const bool batch = a.request_end - a.request_begin > 1;
    for (int i = a.request_begin; i < a.request_end; ++i) {
      const int row0 = st.query_start[i];
      const int n = st.query_start[i + 1] - row0;
      const int q0 = batch ? 0 : a.query_begin, q1 = batch ? n : a.query_end;
      const int32_t* blocks = st.block_indices + st.block_indptr[i];
      for (int item = warp; item < (q1 - q0) * group; item += kMegakernelWarps) {
        const int qi = q0 + item / group, g = item % group;
        const int t = row0 + qi;
        const int pos = st.positions[t];
        const int key_begin = a.split < 0 ? 0 : a.split * K;
        const int key_end = a.split < 0 ? pos + 1 : min(pos + 1, (a.split + 1) * K);
        const int h = a.kv_head * group + g;
        const float* q = st.q + (static_cast<int64_t>(t) * hq + h) * hd;
        for (int d = lane; d < hd; d += 32) qs[d] = q[d];
        __syncwarp();
        float m = -INFINITY, l = 0.0f;
        float acc[kDimsPerLane];
#pragma unroll
        for (int j = 0; j < kDimsPerLane; ++j) acc[j] = 0.0f;
        for (int j0 = key_begin; j0 < key_end; j0 += 32) {
          const int j = j0 + lane;
          float s = -INFINITY;
          int64_t row = 0;  // element offset of key j's (block, kv head, slot) row
          if (j < key_end) {
            row = ((static_cast<int64_t>(blocks[j / bs]) * hkv + a.kv_head) * bs + j % bs) * hd;
            float dot = 0.0f;
#pragma unroll 4
            for (int d = 0; d < hd; d += 8) {
              float kv[8];
              load_bf16x8(kc + row + d, kv);
#pragma unroll
              for (int e = 0; e < 8; ++e) dot += qs[d + e] * kv[e];
            }
            s = dot * scale;
          }
          const float m_new = fmaxf(m, warp_max(s));
          const float alpha = expf(m - m_new);  // m = -inf on the first chunk: 0
          const float p = j < key_end ? expf(s - m_new) : 0.0f;
          l = l * alpha + warp_sum(p);
#pragma unroll
          for (int e = 0; e < kDimsPerLane; ++e) acc[e] *= alpha;
          // The chunk's V rows, kVRowsInFlight at a time: their loads are all issued before
          // any is used (a decode step is bound by this loop's memory latency).
          const int chunk = min(32, key_end - j0);
          for (int jj0 = 0; jj0 < chunk; jj0 += kVRowsInFlight) {
            float pv[kVRowsInFlight];
            uint16_t v[kVRowsInFlight][kDimsPerLane];
#pragma unroll
            for (int u = 0; u < kVRowsInFlight; ++u) {
              const int jj = jj0 + u;
              const int src = jj < chunk ? jj : 0;
              const float pj = __shfl_sync(0xffffffffu, p, src);
              const int64_t vrow = __shfl_sync(0xffffffffu, row, src);
              pv[u] = jj < chunk ? pj : 0.0f;
#pragma unroll
              for (int e = 0; e < kDimsPerLane; ++e) {
                const int d = lane + 32 * e;
                v[u][e] = (d < hd && jj < chunk) ? vc[vrow + d] : uint16_t{0};
              }
            }
#pragma unroll
            for (int u = 0; u < kVRowsInFlight; ++u) {
#pragma unroll
              for (int e = 0; e < kDimsPerLane; ++e) acc[e] += pv[u] * bf16_bits_to_float(v[u][e]);
            }
          }
          m = m_new;
        }
        float* out;
        if (a.split < 0) {
          out = st.attn_out + (static_cast<int64_t>(t) * hq + h) * hd;
        } else {
          const int64_t srow =
              st.split_row_begin[i] +
              ((static_cast<int64_t>(a.split) * hkv + a.kv_head) * n + qi) * group + g;
          out = st.split_out + srow * hd;
          if (lane == 0) st.split_lse[srow] = key_begin < key_end ? m + logf(l) : -INFINITY;
        }
        const float inv = key_begin < key_end ? 1.0f / l : 0.0f;
#pragma unroll
        for (int e = 0; e < kDimsPerLane; ++e) {
          const int d = lane + 32 * e;
          if (d < hd) out[d] = acc[e] * inv;
        }
        __syncwarp();
      }
    }
  }
};

}  // namespace megaserve::kernels
