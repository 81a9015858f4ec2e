// kQkvRope (engine/cpu/cpu_ops_qkv.cc): RMSNorm(attn_norm) of token rows, projection onto the
// fused heads [head_begin, head_end) (q heads, then k heads, then v heads; or onto a range of
// their RoPE pairs, dims i and i + hd/2, when pair_end > 0: isa::qkv_pairs_of_head), + bias
// (Qwen2), per-head RMSNorm (Qwen3), RoPE on q and k (rotate-half pairs (i, i + hd/2), angle
// position * inv_freq[i], cos and sin from the model's table); q heads to the q buffer (fp32),
// k and v heads into the paged bf16 cache at each token's position.
//
// Without q/k norm (Llama, Qwen2) a tile is a two-matrix projection, as gate/up is: matrix 0
// the first halves of its heads' rows, matrix 1 the second halves, so column c hands its emit
// both dims of a RoPE pair (i, i + hd/2) and the rotation, bias and stores happen as the
// outputs leave the accumulators. No staged heads: the projection keeps the whole core's
// shared memory and takes 128-row wgmma passes (a 64-row tile of two heads staged 64 KB of
// fp32 heads, and every 64 rows streamed the weights again). With q/k norm (Qwen3) a head's
// norm needs all of its dims: its heads are staged in shared memory, then normed and rotated.
#pragma once

#include "kernels/device_utils.cuh"
#include "kernels/op_context.cuh"
#include "kernels/projection.cuh"

namespace megaserve::kernels {

// Fused head fh -> kind (0 q, 1 k, 2 v) and the head's index within its kind.
__device__ __forceinline__ int qkv_kind_of(int fh, int hq, int hkv) {
  return fh < hq ? 0 : (fh < hq + hkv ? 1 : 2);
}
__device__ __forceinline__ int qkv_head_of(int fh, int kind, int hq, int hkv) {
  return kind == 0 ? fh : (kind == 1 ? fh - hq : fh - hq - hkv);
}
// cos and sin of RoPE pair i's angle at position pos: from `table` (DeviceModel::rope) below
// `positions`, else cosf / sinf of pos * inv_freq[i].
__device__ __forceinline__ float2 rope_cos_sin(const float2* table, int positions,
                                               const float* inv_freq, int half, int pos, int i) {
  if (pos < positions) return table[static_cast<int64_t>(pos) * half + i];
  const float angle = static_cast<float>(pos) * inv_freq[i];
  return make_float2(cosf(angle), sinf(angle));
}

// The emit of QKV's RoPE-pair columns (no q/k norm), by value: column c is flat pair g0 + c of
// the fused heads (head g / (hd/2), pair g % (hd/2)), row r token row0 + r; v[0] is the
// pair's first dim, v[1] that dim + hd/2. Adds the bias (Qwen2), rotates q and k (cos and sin
// from the table up to rope_positions, else cosf / sinf), stores q (fp32) and k / v (bf16,
// into the paged cache at the token's position). Element by element from the CUDA cores; a
// whole wgmma pass at a time through qkv_pairs_pass.
struct QkvPairsEmit {
  const int32_t* positions;
  const int32_t* token_request;
  const int32_t* block_indptr;
  const int32_t* block_indices;
  const float2* rope;
  int32_t rope_positions;
  const float* inv_freq;
  float* q;
  uint16_t* k_cache;  // this layer's
  uint16_t* v_cache;
  const uint16_t* bq;
  const uint16_t* bk;
  const uint16_t* bv;
  int32_t hq, hkv, hd, block_size;
  int32_t g0, row0;

  __device__ float2 cos_sin(int pos, int i) const {
    return rope_cos_sin(rope, rope_positions, inv_freq, hd / 2, pos, i);
  }
  // Token t's cache block (k and v).
  __device__ int32_t block_of(int t, int pos) const {
    return block_indices[block_indptr[token_request[t]] + pos / block_size];
  }
  // Column c of token t (position pos, cache block `block`, where k or v), cos and sin `cs`
  // of its pair (where q or k).
  __device__ void store(int c, int t, int pos, int32_t block, float x1, float x2, float2 cs) const {
    const int half = hd / 2;
    const int g = g0 + c, fh = g / half, d = g % half;
    const int kind = qkv_kind_of(fh, hq, hkv);
    const int h = qkv_head_of(fh, kind, hq, hkv);
    const uint16_t* bias = kind == 0 ? bq : (kind == 1 ? bk : bv);
    if (bias != nullptr) {
      x1 += weight_at(bias, h * hd + d);
      x2 += weight_at(bias, h * hd + d + half);
    }
    if (kind < 2) {
      const float y1 = x1 * cs.x - x2 * cs.y, y2 = x2 * cs.x + x1 * cs.y;
      x1 = y1;
      x2 = y2;
    }
    if (kind == 0) {
      float* out = q + (static_cast<int64_t>(t) * hq + h) * hd;
      out[d] = x1;
      out[d + half] = x2;
      return;
    }
    const engine::KvCacheLayout kv{.kv_heads = hkv, .block_size = block_size, .head_dim = hd};
    uint16_t* out = (kind == 1 ? k_cache : v_cache) + kv.offset(block, h, pos % block_size);
    out[d] = float_to_bf16_bits(x1);
    out[d + half] = float_to_bf16_bits(x2);
  }
  __device__ bool rotated(int c) const { return (g0 + c) / (hd / 2) < hq + hkv; }

  __device__ void operator()(int c, int r, const float* v) const {
    const int t = row0 + r, pos = positions[t];
    const bool kv = (g0 + c) / (hd / 2) >= hq;
    store(c, t, pos, kv ? block_of(t, pos) : 0, v[0], v[1],
          rotated(c) ? cos_sin(pos, (g0 + c) % (hd / 2)) : make_float2(1.0f, 0.0f));
  }
  __device__ void pass(float* dstage, int r0, int nr, int c0, int nc, int cstride) const;
};

// A wgmma pass's outputs through QkvPairsEmit::store: first each row's position and cache
// block into the row's scratch floats of dstage (one thread per row), then kQkvBatch columns
// per thread at a time with their cos and sin loaded before any is used. A function of its
// own (a call) with plain arguments: inlined into dispatch, whose registers are all taken,
// every element waited for its position, block and table loads in turn.
inline constexpr int kQkvBatch = 4;
__device__ __noinline__ void qkv_pairs_pass(QkvPairsEmit e, float* dstage, int r0, int nr, int c0,
                                            int nc, int cstride) {
  __builtin_assume(__isShared(dstage));
  for (int r = threadIdx.x; r < nr; r += blockDim.x) {
    const int t = e.row0 + r0 + r, pos = e.positions[t];
    int* scratch = reinterpret_cast<int*>(dstage + r * kWgmmaDStride + kWgmmaPassB);
    scratch[0] = pos;
    scratch[1] = e.block_of(t, pos);
  }
  __syncthreads();
  const int items = nr * nc;
  for (int i0 = threadIdx.x; i0 < items; i0 += blockDim.x * kQkvBatch) {
    float2 cs[kQkvBatch];
#pragma unroll
    for (int u = 0; u < kQkvBatch; ++u) {
      const int i = min(i0 + u * static_cast<int>(blockDim.x), items - 1);  // in range
      const int r = i / nc, c = c0 + i % nc;
      const int pos = reinterpret_cast<const int*>(dstage + r * kWgmmaDStride + kWgmmaPassB)[0];
      cs[u] = e.rotated(c) ? e.cos_sin(pos, (e.g0 + c) % (e.hd / 2)) : make_float2(1.0f, 0.0f);
    }
#pragma unroll
    for (int u = 0; u < kQkvBatch; ++u) {
      const int i = i0 + u * static_cast<int>(blockDim.x);
      if (i >= items) break;
      const int r = i / nc, c = i % nc;
      const float* row = dstage + r * kWgmmaDStride;
      const int* scratch = reinterpret_cast<const int*>(row + kWgmmaPassB);
      e.store(c0 + c, e.row0 + r0 + r, scratch[0], scratch[1], row[c], row[cstride + c], cs[u]);
    }
  }
}

__device__ inline void QkvPairsEmit::pass(float* dstage, int r0, int nr, int c0, int nc,
                                          int cstride) const {
  qkv_pairs_pass(*this, dstage, r0, nr, c0, nc, cstride);
}

struct QkvRopeOp {
  static constexpr engine::isa::Opcode kOpcode = engine::isa::Opcode::kQkvRope;

  // True: a wgmma pass is set up for the entry function to run, then call again
  // [WGMMA_WALK].
  __device__ static bool run(const engine::isa::Instruction& inst, const OpContext& ctx) {
    const DeviceLayer& w = ctx.model.layers[inst.layer()];
    const bool again =
        w.q_norm == nullptr && w.k_norm == nullptr ? run_pairs(inst, ctx) : run_heads(inst, ctx);
    // The K/V rows, written through the generic proxy, are read by decode attention's TMA
    // loads (DeviceModel::kv_maps [KV_TMA]) after its wait for this instruction; with
    // kStepKvFenceOnReader the loading lanes fence instead.
    if (!again && ctx.model.kv_maps != nullptr && (ctx.step.flags & kStepKvFenceOnReader) == 0) {
      hopper::fence_proxy_async_global();
    }
    return again;
  }

 private:
  __device__ static const uint16_t* matrix_of(const DeviceLayer& w, int kind) {
    return kind == 0 ? w.wq : (kind == 1 ? w.wk : w.wv);
  }
  __device__ static const uint16_t* bias_of(const DeviceLayer& w, int kind) {
    return kind == 0 ? w.bq : (kind == 1 ? w.bk : w.bv);
  }

  // Without q/k norm: columns are RoPE pairs, column c of the tile = flat pair g0 + c of the
  // fused heads (head g / (hd/2), pair g % (hd/2); isa::qkv_pairs_of_head); v[0] is the
  // pair's first dim, v[1] that dim + hd/2.
  __device__ static bool run_pairs(const engine::isa::Instruction& inst, const OpContext& ctx) {
    const auto a = engine::isa::args_of<engine::isa::QkvRopeArgs>(inst);
    const DeviceModel& md = ctx.model;
    const DeviceStepDesc& st = ctx.step;
    const DeviceLayer& w = md.layers[inst.layer()];
    const int H = md.hidden, hd = md.head_dim, half = hd / 2;
    const int hq = md.q_heads, hkv = md.kv_heads;
    const int g0 = a.head_begin * half + (a.pair_end > 0 ? a.pair_begin : 0);
    const int ncols = engine::isa::qkv_tile_pairs(a, half);
    float* scale = ctx.smem;                          // (kProjectionScaleFloats)
    float* core = ctx.smem + kProjectionScaleFloats;  // the projection's own
    const int core_bytes = (ctx.smem_floats - kProjectionScaleFloats) * 4;
    // A group of 16 pairs stays inside one half of one head when the tile's pairs start and
    // end on multiples of 16 and a head's do too.
    const bool maps_ok = md.weight_maps != nullptr && g0 % kWgmmaGroupRows == 0 &&
                         ncols % kWgmmaGroupRows == 0 && half % kWgmmaGroupRows == 0;
    const CUtensorMap* layer_maps =
        md.weight_maps == nullptr ? nullptr : md.weight_maps + inst.layer() * kLayerMatrices;
    // Weight row (within its matrix) of matrix m's column c.
    const auto weight_row = [=](int m, int c, int* kind) {
      const int fh = (g0 + c) / half;
      *kind = qkv_kind_of(fh, hq, hkv);
      return qkv_head_of(fh, *kind, hq, hkv) * hd + m * half + (g0 + c) % half;
    };
    const int64_t layer_offset = inst.layer() * md.cache_layer_elements;
    PassWalk walk{ctx.call, 0, ctx.pass, ctx.bulk};
    for (int r0 = a.row_begin; r0 < a.row_end; r0 += kProjectionScaleRows) {
      const int n = min(kProjectionScaleRows, a.row_end - r0);
      const auto row = [&](int r) { return st.residual + static_cast<int64_t>(r0 + r) * H; };
      const Walk step = project<2>(
          walk, st.flags,
          ProjectionInput{n, ncols, H, scale, w.attn_norm, act_cache_tag(kOpcode, inst.layer()), r0,
                          a.normed != 0 ? md.norm_act_map : nullptr, md.norm_act_rows},
          reinterpret_cast<char*>(core), core_bytes,
          [&] {
            cached_inv_rms(*ctx.norm_cache, static_cast<int32_t>(kOpcode), inst.layer(), r0, n, H,
                           md.rms_norm_eps, row, scale);
          },
          row,
          [&](int m, int c) {
            int kind;
            const int wr = weight_row(m, c, &kind);
            return matrix_of(w, kind) + static_cast<int64_t>(wr) * H;
          },
          [=](int m, int c) {
            if (!maps_ok) return WeightGroup{nullptr, 0};
            int kind;
            const int wr = weight_row(m, c, &kind);
            return WeightGroup{layer_maps + kind, wr};
          },
          QkvPairsEmit{st.positions, st.token_request, st.block_indptr, st.block_indices,
                       reinterpret_cast<const float2*>(md.rope), md.rope_positions, md.inv_freq,
                       st.q, md.k_cache + layer_offset, md.v_cache + layer_offset, w.bq, w.bk, w.bv,
                       hq, hkv, hd, st.kv_block_size, g0, r0});
      if (step == Walk::kYield) return true;
      if (step == Walk::kPrefetched) return false;
    }
    return false;
  }

  // With q/k norm: heads staged in shared memory (64 rows at a time), then normed, rotated
  // and stored by a warp per (row, head).
  __device__ static bool run_heads(const engine::isa::Instruction& inst, const OpContext& ctx) {
    const auto a = engine::isa::args_of<engine::isa::QkvRopeArgs>(inst);
    const DeviceModel& md = ctx.model;
    const DeviceStepDesc& st = ctx.step;
    const DeviceLayer& w = md.layers[inst.layer()];
    const int H = md.hidden, hd = md.head_dim, half = hd / 2;
    const int hq = md.q_heads, hkv = md.kv_heads;
    // Whole heads: the planner never gives a model with q/k norm pair ranges (the norm needs
    // every dim of the head).
    const int nheads = a.head_end - a.head_begin;
    const int ncols = nheads * hd;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float* heads = ctx.smem;                              // (kProjectionChunkRows, ncols)
    float* scale = heads + kProjectionChunkRows * ncols;  // (kProjectionScaleFloats)
    float* core = scale + kProjectionScaleFloats;         // the projection's own
    const int core_bytes =
        (ctx.smem_floats - kProjectionChunkRows * ncols - kProjectionScaleFloats) * 4;
    const bool maps_ok = md.weight_maps != nullptr && hd % kWgmmaGroupRows == 0;
    const CUtensorMap* layer_maps =
        md.weight_maps == nullptr ? nullptr : md.weight_maps + inst.layer() * kLayerMatrices;
    PassWalk walk{ctx.call, 0, ctx.pass, ctx.bulk};
    for (int r0 = a.row_begin; r0 < a.row_end; r0 += kProjectionChunkRows) {
      const int n = min(kProjectionChunkRows, a.row_end - r0);
      const auto row = [&](int r) { return st.residual + static_cast<int64_t>(r0 + r) * H; };
      const Walk step = project<1, kProjectionChunkRows>(
          walk, st.flags,
          ProjectionInput{n, ncols, H, scale, w.attn_norm, act_cache_tag(kOpcode, inst.layer()), r0,
                          a.normed != 0 ? md.norm_act_map : nullptr, md.norm_act_rows},
          reinterpret_cast<char*>(core), core_bytes,
          [&] {
            cached_inv_rms(*ctx.norm_cache, static_cast<int32_t>(kOpcode), inst.layer(), r0, n, H,
                           md.rms_norm_eps, row, scale);
          },
          row,
          [&](int, int c) {
            const int fh = a.head_begin + c / hd;
            const int kind = qkv_kind_of(fh, hq, hkv);
            return matrix_of(w, kind) +
                   (static_cast<int64_t>(qkv_head_of(fh, kind, hq, hkv)) * hd + c % hd) * H;
          },
          [=, head_begin = a.head_begin](int, int c) {
            // A group of 16 rows stays inside one head when hd is a multiple of 16.
            if (!maps_ok) return WeightGroup{nullptr, 0};
            const int fh = head_begin + c / hd;
            const int kind = qkv_kind_of(fh, hq, hkv);
            return WeightGroup{layer_maps + kind, qkv_head_of(fh, kind, hq, hkv) * hd + c % hd};
          },
          [&](int c, int r, const float* v) { heads[r * ncols + c] = v[0]; });
      if (step == Walk::kYield) return true;
      if (step == Walk::kPrefetched) return false;
      if (step == Walk::kSkip) continue;
      // One warp per (row, head): bias, q/k norm, RoPE, store.
      for (int item = warp; item < n * nheads; item += kMegakernelWarps) {
        const int r = item / nheads, j = item % nheads;
        const int t = r0 + r;
        const int fh = a.head_begin + j;
        const int kind = qkv_kind_of(fh, hq, hkv);
        const int h = qkv_head_of(fh, kind, hq, hkv);
        float* head = heads + r * ncols + j * hd;  // (hd)
        const uint16_t* bias = bias_of(w, kind);
        if (bias != nullptr) {
          for (int k = lane; k < hd; k += 32) head[k] += weight_at(bias, h * hd + k);
        }
        __syncwarp();
        const int pos = st.positions[t];
        if (kind < 2) {
          const uint16_t* qk_norm = kind == 0 ? w.q_norm : w.k_norm;
          if (qk_norm != nullptr) warp_rms_norm(head, qk_norm, hd, md.rms_norm_eps, head);
          __syncwarp();
          for (int i = lane; i < half; i += 32) {  // pair i: dims i and i + half
            const float2 cs = rope_cos_sin(reinterpret_cast<const float2*>(md.rope),
                                           md.rope_positions, md.inv_freq, half, pos, i);
            const float c = cs.x, s = cs.y;
            const float x1 = head[i], x2 = head[i + half];
            head[i] = x1 * c - x2 * s;
            head[i + half] = x2 * c + x1 * s;
          }
          __syncwarp();
        }
        if (kind == 0) {
          float* out = st.q + (static_cast<int64_t>(t) * hq + h) * hd;
          for (int k = lane; k < hd; k += 32) out[k] = head[k];
        } else {
          const int req = st.token_request[t];
          const engine::KvCacheLayout kv{
              .kv_heads = hkv, .block_size = st.kv_block_size, .head_dim = hd};
          const int32_t block = st.block_indices[st.block_indptr[req] + pos / kv.block_size];
          uint16_t* cache = (kind == 1 ? md.k_cache : md.v_cache) +
                            inst.layer() * md.cache_layer_elements +
                            kv.offset(block, h, pos % kv.block_size);
          for (int k = lane; k < hd; k += 32) cache[k] = float_to_bf16_bits(head[k]);
        }
      }
      __syncthreads();
    }
    return false;
  }
};

}  // namespace megaserve::kernels
