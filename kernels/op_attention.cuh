// kAttention (engine/cpu/cpu_ops_attention.cc): for one kv head, every q head of its group and
// each query row of the tile, softmax(q . k / sqrt(hd)) v over keys [key_begin, key_end) of
// the request's paged bf16 cache: [0, pos] unsplit, [s*K, min(pos + 1, (s+1)*K)) for split
// s. Unsplit writes the normalized output to attn_out; split writes it to split_out and its
// log-sum-exp (max + log(sum), -inf for no keys) to split_lse.
//
// By default the op runs on bf16 tensor cores for head dims 64 and 128: decode-shaped
// instructions as 16-key steps per warp loaded by TMA (op_attention_decode_tma.cuh) or one
// stream of key stages (op_attention_decode.cuh), others pass by pass
// (op_attention_mma.cuh); other head dims, and steps with kStepAttentionCudaCores, run the
// CUDA-core version below.
//
// CUDA cores: each query row's keys are spread over the CTA's warps, so that a decode row (one
// query, hundreds of keys) keeps all 8 warps' loads in flight: warp w takes the chunks of 32 keys
// starting at key_begin + 32 w, + 32 * kMegakernelWarps, ... For each chunk, lane i loads
// key chunk + i's K row once and scores it against up to kMaxGroup q heads of the group
// (one pass), then the chunk's V rows are read with 16-byte loads, each lane owning 8
// consecutive dims of one row slot (hd / 8 lanes per row, 32 / (hd / 8) rows per load).
// Every warp keeps an online softmax (max m, sum l, accumulator) per head; the warps' states
// are combined through shared memory at the end of the row:
//   M = max_w m_w,  out = sum_w exp(m_w - M) acc_w / sum_w exp(m_w - M) l_w.
#pragma once

#include "kernels/device_utils.cuh"
#include "kernels/hopper/hopper_ptx.cuh"
#include "kernels/op_attention_decode_tma.cuh"
#include "kernels/op_attention_mma.cuh"
#include "kernels/op_context.cuh"

namespace megaserve::kernels {

struct AttentionOp {
  static constexpr engine::isa::Opcode kOpcode = engine::isa::Opcode::kAttention;
  static constexpr int kMaxGroup = kAttentionMaxGroup;  // q heads scored per pass
  static constexpr int kKLoads = 8;     // 16-byte K loads per lane issued before use
  static constexpr int kVLoads = 8;     // 16-byte V loads per lane issued before use
  static constexpr int kRowSlots = 32;  // V row slots per warp at most (hd = 8)
  // Per warp, per head: m, l, then row slot r's partial dims at r * hd + d (< kRowSlots * 8,
  // since slots * hd <= 32 * 8).
  static constexpr int kHeadStateFloats = 2 + kRowSlots * 8;
  static constexpr int kWarpStateFloats = kAttentionWarpStateFloats;
  static_assert(kWarpStateFloats == kMaxGroup * kHeadStateFloats, "megakernel.h's layout");

  __device__ static void run(const engine::isa::Instruction& inst, const OpContext& ctx) {
    if ((ctx.step.flags & kStepAttentionCudaCores) == 0 &&
        AttentionMma::takes(ctx.model, ctx.smem_floats)) {
      AttentionDecode::run(inst, ctx);
      return bf16_written(ctx.model);
    }
    const auto a = engine::isa::args_of<engine::isa::AttentionArgs>(inst);
    const DeviceStepDesc& st = ctx.step;
    const int hq = ctx.model.q_heads, hkv = ctx.model.kv_heads, group = hq / hkv;
    const bool batch = a.request_end - a.request_begin > 1;
    for (int i = a.request_begin; i < a.request_end; ++i) {
      const int row0 = st.query_start[i];
      const int n = st.query_start[i + 1] - row0;
      const int q0 = batch ? 0 : a.query_begin, q1 = batch ? n : a.query_end;
      for (int qi = q0; qi < q1; ++qi) {
        for (int g0 = 0; g0 < group; g0 += kMaxGroup) {
          row(inst, ctx, a, i, n, qi, g0, min(kMaxGroup, group - g0));
        }
      }
    }
    bf16_written(ctx.model);
  }

  // The bf16 copy of the output (DeviceModel::attn_act), written through the generic proxy,
  // is read by the TMA unit (the output projection's, after its wait for this instruction).
  __device__ static void bf16_written(const DeviceModel& md) {
    if (md.attn_act != nullptr) hopper::fence_proxy_async_global();
  }

 private:
  // Query row qi of request i (n rows in the step), q heads [g0, g0 + G) of the group.
  // Starts and ends with every thread past a __syncthreads (shared memory is reused).
  __device__ static void row(const engine::isa::Instruction& inst, const OpContext& ctx,
                             const engine::isa::AttentionArgs& a, int i, int n, int qi, int g0,
                             int G) {
    const DeviceModel& md = ctx.model;
    const DeviceStepDesc& st = ctx.step;
    const int hd = md.head_dim, hq = md.q_heads, hkv = md.kv_heads, group = hq / hkv;
    const int K = st.kv_split_tokens, bs = st.kv_block_size;
    const engine::KvCacheLayout kv{.kv_heads = hkv, .block_size = bs, .head_dim = hd};
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int t = st.query_start[i] + qi;
    const int pos = st.positions[t];
    const int key_begin = a.split < 0 ? 0 : a.split * K;
    const int key_end = a.split < 0 ? pos + 1 : min(pos + 1, (a.split + 1) * K);
    const int h0 = a.kv_head * group + g0;  // first q head of the pass
    const int32_t* blocks = st.block_indices + st.block_indptr[i];
    const int64_t layer_offset = inst.layer() * md.cache_layer_elements;
    const uint16_t* kc = md.k_cache + layer_offset;
    const uint16_t* vc = md.v_cache + layer_offset;
    const float scale = 1.0f / sqrtf(static_cast<float>(hd));

    float* qs = ctx.smem;                                              // (G, hd)
    float* states = ctx.smem + kMaxGroup * kMaxHeadDim;                // (warps, kWarpStateFloats)
    float* mine = states + warp * kWarpStateFloats;                    // (G, 2 + kRowSlots * 8)
    const float* q = st.q + (static_cast<int64_t>(t) * hq + h0) * hd;  // (G, hd) contiguous
    for (int e = threadIdx.x; e < G * hd; e += blockDim.x) qs[e] = q[e];
    __syncthreads();

    // V layout: lpr lanes per row, each owning dims [db, db + 8) of row slot rs.
    const int lpr = hd / 8, slots = 32 / lpr;
    const int rs = lane / lpr, db = (lane % lpr) * 8;
    const bool v_lane = rs < slots;
    float m[kMaxGroup], l[kMaxGroup], acc[kMaxGroup][8];
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      m[g] = -INFINITY;
      l[g] = 0.0f;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[g][e] = 0.0f;
    }
    for (int j0 = key_begin + 32 * warp; j0 < key_end; j0 += 32 * kMegakernelWarps) {
      const int j = j0 + lane;
      const bool valid = j < key_end;
      // Element offset of key j's (block, kv head, slot) row.
      const int64_t kv_row = valid ? kv.offset(blocks[j / bs], a.kv_head, j % bs) : 0;
      float s[kMaxGroup];
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) s[g] = 0.0f;
      if (valid) {
        for (int d0 = 0; d0 < hd; d0 += 8 * kKLoads) {
          uint4 kr[kKLoads];
#pragma unroll
          for (int u = 0; u < kKLoads; ++u) {
            if (d0 + 8 * u < hd) kr[u] = *reinterpret_cast<const uint4*>(kc + kv_row + d0 + 8 * u);
          }
#pragma unroll
          for (int u = 0; u < kKLoads; ++u) {
            if (d0 + 8 * u >= hd) break;
            float kf[8];
            unpack_bf16x8(kr[u], kf);
#pragma unroll
            for (int g = 0; g < kMaxGroup; ++g) {
              if (g >= G) break;
              const float* qg = qs + g * hd + d0 + 8 * u;
#pragma unroll
              for (int e = 0; e < 8; ++e) s[g] += qg[e] * kf[e];
            }
          }
        }
      }
      float p[kMaxGroup];
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) {
        if (g >= G) break;
        const float sg = valid ? s[g] * scale : -INFINITY;
        // The chunk's first key is valid, so m_new is finite.
        const float m_new = fmaxf(m[g], warp_max(sg));
        const float alpha = expf(m[g] - m_new);  // m = -inf on the warp's first chunk: 0
        p[g] = valid ? expf(sg - m_new) : 0.0f;
        l[g] = l[g] * alpha + warp_sum(p[g]);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] *= alpha;
        m[g] = m_new;
      }
      // The chunk's V rows, `slots` rows per load, kVLoads loads in flight per lane.
      const int chunk = min(32, key_end - j0);
      for (int r0 = 0; r0 < chunk; r0 += slots * kVLoads) {
        uint4 vr[kVLoads];
        bool ok[kVLoads];
#pragma unroll
        for (int u = 0; u < kVLoads; ++u) {
          const int jj = r0 + u * slots + rs;
          ok[u] = v_lane && jj < chunk;
          const int64_t vrow = __shfl_sync(0xffffffffu, kv_row, jj & 31);
          if (ok[u]) vr[u] = *reinterpret_cast<const uint4*>(vc + vrow + db);
        }
#pragma unroll
        for (int u = 0; u < kVLoads; ++u) {
          const int jj = r0 + u * slots + rs;
          float vf[8];
          unpack_bf16x8(ok[u] ? vr[u] : make_uint4(0, 0, 0, 0), vf);
#pragma unroll
          for (int g = 0; g < kMaxGroup; ++g) {
            if (g >= G) break;
            const float pj = __shfl_sync(0xffffffffu, p[g], jj & 31);
            const float w = ok[u] ? pj : 0.0f;
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[g][e] += w * vf[e];
          }
        }
      }
    }
    // This warp's state: (m, l) and its row slots' partial accumulators.
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      if (g >= G) break;
      float* sg = mine + g * kHeadStateFloats;
      if (lane == 0) {
        sg[0] = m[g];
        sg[1] = l[g];
      }
      if (v_lane) {
#pragma unroll
        for (int e = 0; e < 8; ++e) sg[2 + rs * hd + db + e] = acc[g][e];
      }
    }
    __syncthreads();
    // Combine the warps (and each warp's row slots): one thread per (head, dim).
    for (int e = threadIdx.x; e < G * hd; e += blockDim.x) {
      const int g = e / hd, d = e % hd;
      const auto state = [&](int w) {
        return states + w * kWarpStateFloats + g * kHeadStateFloats;
      };
      float M = -INFINITY;
      for (int w = 0; w < kMegakernelWarps; ++w) M = fmaxf(M, state(w)[0]);
      float L = 0.0f, A = 0.0f;
      if (M > -INFINITY) {
        for (int w = 0; w < kMegakernelWarps; ++w) {
          const float* sw = state(w);
          if (!(sw[0] > -INFINITY)) continue;  // a warp that had no keys
          const float c = expf(sw[0] - M);
          L += c * sw[1];
          float sum = 0.0f;
          for (int r = 0; r < slots; ++r) sum += sw[2 + r * hd + d];
          A += c * sum;
        }
      }
      const int h = h0 + g;
      float* out;
      if (a.split < 0) {
        out = st.attn_out + (static_cast<int64_t>(t) * hq + h) * hd;
      } else {
        const int64_t srow = st.split_row_begin[i] +
                             ((static_cast<int64_t>(a.split) * hkv + a.kv_head) * n + qi) * group +
                             g0 + g;
        out = st.split_out + srow * hd;
        if (d == 0) st.split_lse[srow] = M > -INFINITY ? M + logf(L) : -INFINITY;
      }
      out[d] = M > -INFINITY ? A / L : 0.0f;
      if (a.split < 0) {
        if (uint16_t* b = attn_act_at(md, st, out)) b[d] = float_to_bf16_bits(out[d]);
      }
    }
    __syncthreads();
  }
};

}  // namespace megaserve::kernels
