// kAttention on bf16 tensor cores (the default; op_attention.cuh has the contract and the
// CUDA-core version, kStepAttentionCudaCores). mma.sync m16n8k16 bf16 with fp32
// accumulation, online softmax in fp32 (base-2 exponents: scores are pre-scaled by log2 e).
//
// The M rows of the mma are (query row, q head of the kv head's group) pairs of one request,
// flattened as r = (qi - q0) * group + g, so that every key row staged from the cache serves
// all q heads of its kv head and all query rows of the tile: a decode row of GQA 4 is 4 of
// the 16 M rows, a 16-row prefill tile 64. A pass takes up to 128 M rows (R m-tiles of 16).
// Its warps are (m-tile, key slice) pairs: S = 8 / R slices (1, 2, 4, 8) so that a decode
// pass (R = 1) still keeps 8 warps busy on distinct keys; with S > 1 the slices' softmax
// states are merged through shared memory at the end of the pass.
//
// K/V are staged per stage of T keys (T = 64 when S = 1, else 128: KW = T / S keys per warp)
// from the paged cache into shared memory with cp.async through a ring of 3 stage buffers
// (2 where shared memory is short): stages s + 1 and s + 2 load while stage s computes, one
// __syncthreads per stage; keys past the pass's last key are zero-filled. Rows of K and V are
// HD bf16 (16-byte chunks XOR-swizzled by row % 8, so that ldmatrix's 8 row addresses hit
// distinct banks). S = Q K^T takes K fragments with ldmatrix; P V takes V with ldmatrix.trans
// and P straight from the S accumulators (rounded to bf16). Causal masking is per M row:
// key j counts for row (qi, g) iff key_begin <= j < key_end(qi) (op_attention.cuh).
//
// Takes head dims 64 and 128 (templated: Q fragments and the output accumulators live in
// registers); other head dims fall back to the CUDA-core version (AttentionOp).
#pragma once

#include "kernels/device_utils.cuh"
#include "kernels/kv_rows.h"
#include "kernels/mma_primitives.cuh"
#include "kernels/op_context.cuh"

namespace megaserve::kernels {

namespace attention_mma {

inline constexpr int kPassRows = 16 * kMegakernelWarps;  // M rows per pass (8 m-tiles)
inline constexpr int kMaxStageKeys = 128;                // T when S > 1
inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;

// Shared memory of a pass for head dim `hd`: the pass's Q (kPassRows x hd bf16), then 2 or 3
// stage buffers of K and V (T x hd bf16 each; 3 where the CTA's shared memory allows, for a
// deeper cp.async pipeline). After the key loop the stage buffers hold the slices' states
// (8 warps x (16 x hd + 32) floats).
__host__ __device__ constexpr int q_bytes(int hd) { return kPassRows * hd * 2; }
__host__ __device__ constexpr int buffer_bytes(int hd) { return 2 * kMaxStageKeys * hd * 2; }
__host__ __device__ constexpr int smem_bytes(int hd, int buffers) {
  return q_bytes(hd) + buffers * buffer_bytes(hd);
}
static_assert(kMegakernelWarps * (16 * 128 + 32) * 4 <= 2 * buffer_bytes(128), "merge area");
static_assert(kMegakernelWarps * (16 * 64 + 32) * 4 <= 2 * buffer_bytes(64), "merge area");
// A decode stream's slice outputs fill one stage buffer (op_attention_decode.cuh).
static_assert(kMegakernelWarps * 16 * 128 * 4 <= buffer_bytes(128), "slice outputs");
static_assert(kMegakernelWarps * 16 * 64 * 4 <= buffer_bytes(64), "slice outputs");

// Element offset of (key row, 16-byte chunk) in a staged (T, HD) bf16 tile.
template <int HD>
__device__ __forceinline__ int swizzled(int row, int chunk) {
  return row * HD + ((chunk ^ (row & 7)) << 3);
}

// A thread's share of a K/V stage [ATTN_COPY]: 16-byte chunk `chunk` of `rows` contiguous
// stage rows (a warp's copy instruction still covers whole 256- or 128-byte rows), keys
// [j0, j0 + rows); keys at or past key_end are zero-filled. The rows span at most two cache
// blocks where blocks hold >= rows keys (the server's hold 16 to 128): their indices are read
// a stage ahead (row_blocks, kernels/kv_rows.h), so issuing a stage waits for no load. (Read
// per row inside the copy loop, each index cost an L2 round trip before its copy.) Copies
// them into stage rows [first_row, first_row + rows) of the K and V tiles at k_dst and v_dst
// (shared addresses); kMaxRows bounds `rows` (unrolled).
template <int HD, int kMaxRows>
__device__ __forceinline__ void copy_rows(uint32_t k_dst, uint32_t v_dst, int first_row, int rows,
                                          int chunk, int j0, int key_end, const int32_t* blocks,
                                          RowBlocks rb, const engine::KvCacheLayout& kv,
                                          int kv_head, const uint16_t* kc, const uint16_t* vc) {
  KeyRowWalk walk(blocks, rb, kv, kv_head, j0);
  kc += chunk * 8;
  vc += chunk * 8;
#pragma unroll
  for (int k = 0; k < kMaxRows; ++k) {
    if (k >= rows) break;
    const bool valid = j0 + k < key_end;
    const int64_t off = valid ? walk.offset() : 0;
    const uint32_t dst = swizzled<HD>(first_row + k, chunk) * 2;
    cp_async16(k_dst + dst, kc + off, valid ? 16 : 0);
    cp_async16(v_dst + dst, vc + off, valid ? 16 : 0);
    walk.next();
  }
}

// Stores 8 query values (x0, x1) times qscale as bf16 at (row, chunk) of the staged Q.
template <int HD>
__device__ __forceinline__ void store_q_chunk(uint32_t q_addr, int row, int chunk, float4 x0,
                                              float4 x1, float qscale) {
  asm volatile(
      "st.shared.v4.b32 [%0], {%1, %2, %3, %4};" ::"r"(q_addr + swizzled<HD>(row, chunk) * 2),
      "r"(pack_bf16x2(x0.x * qscale, x0.y * qscale)),
      "r"(pack_bf16x2(x0.z * qscale, x0.w * qscale)),
      "r"(pack_bf16x2(x1.x * qscale, x1.y * qscale)), "r"(pack_bf16x2(x1.z * qscale, x1.w * qscale))
      : "memory");
}

// One warp's online-softmax step over 16 staged keys: its 16 M rows (Q rows [q_row0,
// q_row0 + 16) of the staged Q; this thread holds fragment rows g8 and g8 + 8) against rows
// [c0, c0 + 16) of the staged K and V tiles, whose first key is key0. S = Q K^T (keys at or
// past a row's row_end masked), the running max m and sums l updated, O rescaled and
// O += P V.
template <int HD>
__device__ __forceinline__ void attend16(uint32_t q_addr, int q_row0, uint32_t k_tile,
                                         uint32_t v_tile, int c0, int key0, const int (&row_end)[2],
                                         float (&o)[HD / 8][4], float (&m)[2], float (&l)[2]) {
  constexpr int kKSteps = HD / 16, kNTiles = HD / 8;
  const int lane = threadIdx.x & 31, t4 = lane & 3;
  // S (16 rows x 16 keys) = Q K^T: n-tiles keys c0..c0+7 and c0+8..c0+15.
  float sc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
  {
    // ldmatrix lane -> matrix lane / 8. K: (keys +0 / +8) x (chunk 2kk / 2kk + 1);
    // Q (A fragment a0..a3): (rows +0 / +8) x (chunk 2kk / 2kk + 1).
    const int mi = lane >> 3, krow = c0 + (mi >> 1) * 8 + (lane & 7);
    const int qrow = q_row0 + (mi & 1) * 8 + (lane & 7);
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      uint32_t qf[4], b[4];
      ldmatrix_x4(qf, q_addr + swizzled<HD>(qrow, 2 * kk + (mi >> 1)) * 2);
      ldmatrix_x4(b, k_tile + swizzled<HD>(krow, 2 * kk + (mi & 1)) * 2);
      mma_bf16(sc[0], qf, b[0], b[1]);
      mma_bf16(sc[1], qf, b[2], b[3]);
    }
  }
  // Mask, then the online softmax update of both rows (a row's 16 keys lie in the
  // 4 lanes of a quad: reduce over lane ^ 1, lane ^ 2).
  float alpha[2];
#pragma unroll
  for (int x = 0; x < 2; ++x) {
    float cmax = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int j = key0 + nt * 8 + 2 * t4 + e;
        float& v = sc[nt][2 * x + e];
        if (j >= row_end[x]) v = -INFINITY;
        cmax = fmaxf(cmax, v);
      }
    }
    cmax = fmaxf(cmax, __shfl_xor_sync(0xffffffffu, cmax, 1));
    cmax = fmaxf(cmax, __shfl_xor_sync(0xffffffffu, cmax, 2));
    const float m_new = fmaxf(m[x], cmax);
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // no keys yet: no NaN
    alpha[x] = exp2f(m[x] - m_use);
    float sum = 0.0f;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& v = sc[nt][2 * x + e];
        v = exp2f(v - m_use);
        sum += v;
      }
    }
    l[x] = l[x] * alpha[x] + sum;
    m[x] = m_new;
  }
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt) {
    o[nt][0] *= alpha[0];
    o[nt][1] *= alpha[0];
    o[nt][2] *= alpha[1];
    o[nt][3] *= alpha[1];
  }
  // P (16 x 16 keys) as an A fragment: the S accumulators of the two n-tiles.
  const uint32_t pf[4] = {pack_bf16x2(sc[0][0], sc[0][1]), pack_bf16x2(sc[0][2], sc[0][3]),
                          pack_bf16x2(sc[1][0], sc[1][1]), pack_bf16x2(sc[1][2], sc[1][3])};
  {
    // ldmatrix.trans lane -> matrix lane / 8: (keys +0 / +8) x (chunk 2dp / 2dp + 1).
    const int mi = lane >> 3, vrow = c0 + (mi & 1) * 8 + (lane & 7);
#pragma unroll
    for (int dp = 0; dp < HD / 16; ++dp) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, v_tile + swizzled<HD>(vrow, 2 * dp + (mi >> 1)) * 2);
      mma_bf16(o[2 * dp], pf, b[0], b[1]);
      mma_bf16(o[2 * dp + 1], pf, b[2], b[3]);
    }
  }
}

// Where M row (query row qi of request i (n rows in the step), q head g of the kv head's
// group) of an attention output goes: attn_out unsplit (*lse = nullptr), else split_out and
// its log-sum-exp slot.
template <int HD>
__device__ __forceinline__ float* output_row(const DeviceModel& md, const DeviceStepDesc& st,
                                             const engine::isa::AttentionArgs& a, int i, int n,
                                             int qi, int g, float** lse) {
  const int hq = md.q_heads, hkv = md.kv_heads, group = hq / hkv;
  if (a.split < 0) {
    *lse = nullptr;
    return st.attn_out +
           (static_cast<int64_t>(st.query_start[i] + qi) * hq + a.kv_head * group + g) * HD;
  }
  const int64_t srow = st.split_row_begin[i] +
                       ((static_cast<int64_t>(a.split) * hkv + a.kv_head) * n + qi) * group + g;
  *lse = st.split_lse + srow;
  return st.split_out + srow * HD;
}

// Leaves warp w's key-slice state of its 16 M rows in shared memory: m and l (l summed over
// the quad first) at ml[w * 32 + r] and ml[w * 32 + 16 + r], the unnormalized output rows at
// ow[(w * 16 + r) * HD + d]. Rows r >= valid (no such M row) are left out.
template <int HD>
__device__ __forceinline__ void store_slice(float* ml, float* ow, int w, int valid,
                                            const float (&o)[HD / 8][4], const float (&m)[2],
                                            const float (&l)[2]) {
  const int lane = threadIdx.x & 31, g8 = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int x = 0; x < 2; ++x) {
    const int r = g8 + 8 * x;
    if (r >= valid) continue;
    if (t4 == 0) {
      ml[w * 32 + r] = m[x];
      ml[w * 32 + 16 + r] = l[x];
    }
#pragma unroll
    for (int nt = 0; nt < HD / 8; ++nt) {
      *reinterpret_cast<float2*>(ow + (w * 16 + r) * HD + nt * 8 + 2 * t4) =
          make_float2(o[nt][2 * x], o[nt][2 * x + 1]);
    }
  }
}

// Merges the S key slices of each of R m-tiles (warp sl * R + t left slice sl of m-tile t with
// store_slice): M = max m_s, out = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s, in slice
// order. write(r, d, out, lse) for each of the first `rows` M rows (out 0 and lse -inf for a
// row without keys), elements e0, e0 + stride, ... of the rows x HD (the CTA's threads, or one
// warp's lanes). kTileRows: M rows per slice state (16, or 8 for the decode ops' n8 tiles).
template <int HD, int kTileRows = 16, class Write>
__device__ __forceinline__ void merge_slices(const float* ml, const float* ow, int R, int S,
                                             int rows, Write write, int e0 = threadIdx.x,
                                             int stride = kMegakernelThreads) {
#pragma unroll 1
  for (int e = e0; e < rows * HD; e += stride) {
    const int r = e / HD, d = e % HD;
    const int tile = r / kTileRows, rl = r % kTileRows;
    float M = -INFINITY;
    for (int sl = 0; sl < S; ++sl) M = fmaxf(M, ml[(sl * R + tile) * 2 * kTileRows + rl]);
    float L = 0.0f, A = 0.0f;
    if (M > -INFINITY) {
      for (int sl = 0; sl < S; ++sl) {
        const int w = sl * R + tile;
        const float c = exp2f(ml[w * 2 * kTileRows + rl] - M);  // no keys: m = -inf, c = 0
        L += c * ml[w * 2 * kTileRows + kTileRows + rl];
        A += c * ow[(w * kTileRows + rl) * HD + d];
      }
    }
    write(r, d, L > 0.0f ? A / L : 0.0f, L > 0.0f ? (M + log2f(L)) * kLn2 : -INFINITY);
  }
}

}  // namespace attention_mma

template <int HD>
struct AttentionMmaPass {
  static_assert(HD == 64 || HD == 128, "head dims with a tensor-core attention");
  static constexpr int kNTiles = HD / 8;  // n8 tiles of the output
  static constexpr int kChunks = HD / 8;  // 16-byte chunks per K/V/Q row
  static constexpr int kQBytes = attention_mma::q_bytes(HD);
  static constexpr int kBufferBytes = attention_mma::buffer_bytes(HD);

  // One pass: M rows [mb, mb + mrows) of request i (n rows in the step, tile rows from q0),
  // K/V staged through `buffers` (2 or 3) stage buffers. Starts and ends with a
  // __syncthreads (shared memory is reused by the next pass).
  __device__ static void run(const engine::isa::Instruction& inst, const OpContext& ctx,
                             const engine::isa::AttentionArgs& a, int i, int n, int q0, int mb,
                             int mrows, int buffers) {
    using namespace attention_mma;
    const DeviceModel& md = ctx.model;
    const DeviceStepDesc& st = ctx.step;
    const int hq = md.q_heads, hkv = md.kv_heads, group = hq / hkv;
    const int K = st.kv_split_tokens, bs = st.kv_block_size;
    const engine::KvCacheLayout kv{.kv_heads = hkv, .block_size = bs, .head_dim = HD};
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g8 = lane >> 2, t4 = lane & 3;  // mma fragment row group and column pair
    const int row0 = st.query_start[i];
    const int key_begin = a.split < 0 ? 0 : a.split * K;
    const auto key_end_of = [&](int qi) {  // keys of query row qi end here (exclusive)
      const int pos = st.positions[row0 + qi];
      return a.split < 0 ? pos + 1 : min(pos + 1, (a.split + 1) * K);
    };

    const int R = (mrows + 15) / 16;
    const int S = R == 1 ? 8 : R == 2 ? 4 : R <= 4 ? 2 : 1;
    const int T = S == 1 ? 64 : kMaxStageKeys;
    const int KW = T / S;  // keys of a stage per warp (a multiple of 16)
    const int mt = warp % R, slice = warp / R;
    const bool active = warp < R * S;

    // Last key of the pass (over all its rows) and of this warp's m-tile.
    const int qa_first = q0 + mb / group, qa_last = q0 + (mb + mrows - 1) / group;
    int pass_end = key_begin;
    for (int qi = qa_first + lane; qi <= qa_last; qi += 32)
      pass_end = max(pass_end, key_end_of(qi));
    pass_end = __reduce_max_sync(0xffffffffu, pass_end);
    const int mt_last = min(mb + mt * 16 + 15, mb + mrows - 1);
    int tile_end = key_begin;
    for (int qi = q0 + (mb + mt * 16) / group + lane; qi <= q0 + mt_last / group; qi += 32) {
      tile_end = max(tile_end, key_end_of(qi));
    }
    tile_end = __reduce_max_sync(0xffffffffu, tile_end);

    // This thread's two M rows (fragment rows g8 and g8 + 8 of its m-tile): their key ends.
    int row_end[2];
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      const int r = mt * 16 + g8 + 8 * x;  // pass-local M row
      row_end[x] = r < mrows ? key_end_of(q0 + (mb + r) / group) : key_begin;
    }

    float o[kNTiles][4];  // output accumulators (16, HD)
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY};  // running max (log2 units) of rows g8, g8 + 8
    float l[2] = {0.0f, 0.0f};            // this thread's part of the running sums

    // Shared memory: Q (kPassRows, HD) bf16, then `buffers` stage buffers [K, V][T, HD].
    const uint32_t q_addr = static_cast<uint32_t>(__cvta_generic_to_shared(ctx.smem));
    const uint32_t stage_addr = q_addr + kQBytes;
    const int64_t layer_offset = inst.layer() * md.cache_layer_elements;
    const uint16_t* kc = md.k_cache + layer_offset;
    const uint16_t* vc = md.v_cache + layer_offset;
    const int32_t* blocks = st.block_indices + st.block_indptr[i];
    const int stages = pass_end > key_begin ? (pass_end - key_begin + T - 1) / T : 0;

    // Stage s -> buffer b: thread tid copies chunk tid % kChunks of the T / kRowStep rows from
    // tid / kChunks * (T / kRowStep) [ATTN_COPY].
    constexpr int kRowStep = kMegakernelThreads / kChunks;
    constexpr int kMaxRows = kMaxStageKeys / kRowStep;
    const int rows_per_thread = T / kRowStep;
    const int chunk = threadIdx.x % kChunks, first_row = threadIdx.x / kChunks * rows_per_thread;
    const auto fetch = [&](int s) {
      return row_blocks(blocks, key_begin + s * T + first_row, rows_per_thread, pass_end, bs);
    };
    const auto issue = [&](int s, int b, RowBlocks rb) {
      const uint32_t k_dst = stage_addr + b * kBufferBytes;
      copy_rows<HD, kMaxRows>(k_dst, k_dst + T * HD * 2, first_row, rows_per_thread, chunk,
                              key_begin + s * T + first_row, pass_end, blocks, rb, kv, a.kv_head,
                              kc, vc);
    };

    __syncthreads();  // the previous pass (or op) is done with shared memory
    // Prologue: stages 0 .. buffers - 2 in flight, one commit group per stage (empty groups
    // past the last stage keep the count uniform).
    for (int p = 0; p < buffers - 1; ++p) {
      if (p < stages) issue(p, p, fetch(p));
      cp_async_commit();
    }
    RowBlocks next_blocks = fetch(buffers - 1);  // of the next stage to issue
    // Q of the pass as bf16, scaled by log2 e / sqrt(hd); rows past mrows are zeros. Read as
    // A fragments with ldmatrix (registers are short: the output accumulators take HD / 2).
    // kQBatch chunks' loads are issued before any is used.
    {
      constexpr int kQBatch = 4;
      constexpr int kQIters = kPassRows * kChunks / kMegakernelThreads;
      static_assert(kQIters % kQBatch == 0, "whole batches");
      const float qscale = kLog2e / sqrtf(static_cast<float>(HD));
#pragma unroll 1
      for (int k0 = 0; k0 < kQIters; k0 += kQBatch) {
        float4 x[kQBatch][2];
#pragma unroll
        for (int k = 0; k < kQBatch; ++k) {
          const int c = threadIdx.x + (k0 + k) * kMegakernelThreads;
          const int r = c / kChunks, chunk = c % kChunks;
          x[k][0] = x[k][1] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
          if (r < mrows) {
            const int rr = mb + r, qi = q0 + rr / group, g = rr % group;
            const float* q = st.q +
                             (static_cast<int64_t>(row0 + qi) * hq + a.kv_head * group + g) * HD +
                             chunk * 8;
            x[k][0] = *reinterpret_cast<const float4*>(q);
            x[k][1] = *reinterpret_cast<const float4*>(q + 4);
          }
        }
#pragma unroll
        for (int k = 0; k < kQBatch; ++k) {
          const int c = threadIdx.x + (k0 + k) * kMegakernelThreads;
          const int r = c / kChunks, chunk = c % kChunks;
          if (r >= R * 16) continue;
          store_q_chunk<HD>(q_addr, r, chunk, x[k][0], x[k][1], qscale);
        }
      }
    }
    for (int s = 0; s < stages; ++s) {
      // Groups committed so far: buffers - 1 + s; stage s is group s.
      if (buffers == 3) {
        cp_async_wait(1);
      } else {
        cp_async_wait(0);
      }
      // Stage s (and Q) are in shared memory for every warp, and every warp is done with
      // stage s - 1, whose buffer the next issue refills.
      __syncthreads();
      {
        const int next = s + buffers - 1;
        if (next < stages) issue(next, next % buffers, next_blocks);
        cp_async_commit();
        next_blocks = fetch(next + 1);  // in flight while stage s computes
      }
      const int stage_key0 = key_begin + s * T;
      const uint32_t k_tile = stage_addr + (s % buffers) * kBufferBytes;
      const uint32_t v_tile = k_tile + T * HD * 2;
      for (int c0 = slice * KW; active && c0 < slice * KW + KW; c0 += 16) {
        if (stage_key0 + c0 >= tile_end) break;  // no row of the m-tile sees these keys
        attend16<HD>(q_addr, mt * 16, k_tile, v_tile, c0, stage_key0 + c0, row_end, o, m, l);
      }
    }
    cp_async_wait(0);  // only empty groups can be pending here
    __syncthreads();   // every warp is done with the stage buffers
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      l[x] += __shfl_xor_sync(0xffffffffu, l[x], 1);
      l[x] += __shfl_xor_sync(0xffffffffu, l[x], 2);
    }

    const auto out_of = [&](int r, float** lse) {
      return output_row<HD>(md, st, a, i, n, q0 + (mb + r) / group, (mb + r) % group, lse);
    };

    if (S == 1) {
      if (active) {
#pragma unroll
        for (int x = 0; x < 2; ++x) {
          const int r = mt * 16 + g8 + 8 * x;
          if (r >= mrows) continue;
          float* lse;
          float* out = out_of(r, &lse);
          const float inv = l[x] > 0.0f ? 1.0f / l[x] : 0.0f;  // no keys: zeros
          uint16_t* b = lse == nullptr ? attn_act_at(md, st, out) : nullptr;
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt) {
            const float2 v = make_float2(o[nt][2 * x] * inv, o[nt][2 * x + 1] * inv);
            *reinterpret_cast<float2*>(out + nt * 8 + 2 * t4) = v;
            if (b != nullptr) {
              *reinterpret_cast<uint32_t*>(b + nt * 8 + 2 * t4) = pack_bf16x2(v.x, v.y);
            }
          }
          if (lse != nullptr && t4 == 0) {
            *lse = l[x] > 0.0f ? (m[x] + log2f(l[x])) * kLn2 : -INFINITY;
          }
        }
      }
      __syncthreads();
      return;
    }

    // S > 1: each warp leaves its slice state in shared memory (the stage buffers are free:
    // the key loop was followed by a __syncthreads), then the slices of each m-tile merge.
    float* ml = ctx.smem + kQBytes / 4;
    float* ow = ml + kMegakernelWarps * 32;
    if (active) store_slice<HD>(ml, ow, warp, mrows - mt * 16, o, m, l);
    __syncthreads();
    merge_slices<HD>(ml, ow, R, S, mrows, [&](int r, int d, float value, float lse_value) {
      float* lse;
      float* out = out_of(r, &lse);
      out[d] = value;
      if (lse != nullptr && d == 0) *lse = lse_value;
      if (lse == nullptr) {
        if (uint16_t* b = attn_act_at(md, st, out)) b[d] = float_to_bf16_bits(value);
      }
    });
    __syncthreads();
  }
};

struct AttentionMma {
  // Whether the tensor-core version takes this model and shared memory size.
  __device__ static bool takes(const DeviceModel& md, int smem_floats) {
    return (md.head_dim == 64 || md.head_dim == 128) &&
           static_cast<int64_t>(smem_floats) * 4 >= attention_mma::smem_bytes(md.head_dim, 2);
  }

  // One request's rows [a.query_begin, a.query_end) (a names one request) as passes of up to
  // kPassRows M rows.
  template <int HD>
  __device__ static void run_request(const engine::isa::Instruction& inst, const OpContext& ctx,
                                     const engine::isa::AttentionArgs& a) {
    const DeviceStepDesc& st = ctx.step;
    const int group = ctx.model.q_heads / ctx.model.kv_heads;
    const int buffers =
        static_cast<int64_t>(ctx.smem_floats) * 4 >= attention_mma::smem_bytes(HD, 3) ? 3 : 2;
    const int i = a.request_begin;
    const int n = st.query_start[i + 1] - st.query_start[i];
    const int rows = (a.query_end - a.query_begin) * group;
    for (int mb = 0; mb < rows; mb += attention_mma::kPassRows) {
      AttentionMmaPass<HD>::run(inst, ctx, a, i, n, a.query_begin, mb,
                                min(attention_mma::kPassRows, rows - mb), buffers);
    }
  }
};

}  // namespace megaserve::kernels
