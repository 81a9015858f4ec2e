// The projection core on bf16 tensor cores (mma.sync m16n8k16, fp32 accumulation): a tile of
// token rows x output columns, K streamed in chunks through a multi-stage pipeline of
// per-thread 16-byte cp.async copies. (A version staging each row's chunk with one
// copy-engine bulk copy completing on per-stage mbarriers was measured slower, see
// bench/RESULTS.md, and dropped.)
//
// Roles in the mma: A (m = 16) is a block of weight rows ([out, in] row-major as stored, so
// A is row-major), B (n = 8) is a block of token rows (the activations [rows, K] row-major
// are B "col"). A decode step (1..16 token rows) is a weight-streaming problem: m-tiles of
// weights spread over the 8 warps, and when there are fewer than 8 warp blocks each block's
// k16 steps are split over several warps (summed in a fixed order at the end). A prefill
// tile (up to 64 token rows per pass) reuses each staged weight chunk for all its rows.
//
// Per stage, in shared memory (BK = the chunk's k width, 64..512):
//   A   (a_alloc, BK + 8)  bf16  weight rows; the 16-byte pad puts the 8 rows an ldmatrix
//                                reads in distinct banks
//   X   (n_alloc, BK + 8)  fp32  activation rows as read (the workspace is fp32)
//   N   (BK)               bf16  RMSNorm weight chunk (when the input is normalized)
// and before the stages, once (or twice, converting ahead: see below):
//   B   (2 * n_alloc, BK + 8)  bf16  a chunk's activations as B operands: rows [0, n_alloc)
//                                    the hi halves, [n_alloc, 2 n_alloc) the lo
// Only a chunk's k < K is copied: a last k16 step that is half past K (K % 16 == 8) masks
// that half of the A fragments (B is written as zeros there). Rows past a pass's columns or
// token rows are not copied either (they feed only outputs that are not emitted; their B
// rows are zeros).
//
// When a chunk has landed the whole CTA converts its X once into B (chunk kc + 1's while
// chunk kc multiplies, where two B and 3 stages fit: one barrier per chunk): v = x * row_scale[n] *
// norm[k] (the CPU's operation order), split into bf16 hi + lo (lo = bf16(v - hi)), both
// multiplied: ~16 significant bits of the fp32 activations reach the tensor cores, so that
// results stay close to the fp32 reference (bf16 activations alone put Qwen3's q/k-normed
// logits past 1e-2 of it). The weights are bf16 already: exact. Warps then load B fragments
// with ldmatrix (one x4 gives an n-tile's hi and lo), so a token row is converted once per
// chunk, not once per warp block that uses it.
#pragma once

#include <stdint.h>

#include "kernels/device_utils.cuh"
#include "kernels/megakernel.h"
#include "kernels/mma_primitives.cuh"

namespace megaserve::kernels {

// What a projection multiplies, token row r (of nrows) and input k (of K):
//   x[r][k] = src_row(r)[k] * row_scale[r] * norm[k]
// with row_scale (shared memory, [nrows]) and norm (global bf16, [K]) each optional (null).
struct ProjectionInput {
  int nrows, ncols, K;
  const float* row_scale;
  const uint16_t* norm;
  // Which activations these are, for the wgmma core's activation cache [ACT_CACHE]
  // (act_cache_tag), or -1: never cached; and the token row of row 0 (where the cache keeps
  // them).
  int32_t cache_tag = -1;
  int32_t first_row = 0;
  // Or the activations already in bf16 in global memory, token row t at row t of this TMA
  // map (a CUtensorMap, box 64 k x kActCacheBoxRows rows), for token rows below bf16_rows:
  // the wgmma passes read them from there (kActCached) without converting anything.
  const void* bf16_map = nullptr;
  int32_t bf16_rows = 0;
  // The input k of this projection's k = 0 in the weight maps and bf16_map: a split-K tile's
  // first input [SPLIT_K]; the wgmma core adds it to the k coordinate of its TMA loads. The
  // cores that read through pointers (src_row, row_of: already offset) ignore it, and so does
  // the activation cache, which a pass with k0 != 0 never uses.
  int32_t k0 = 0;
};

// ProjectionInput::cache_tag of an op's activations in a layer: the op's A blocks differ from
// every other op's (its own norm or input buffer) and from its own in other layers.
__host__ __device__ constexpr int32_t act_cache_tag(engine::isa::Opcode op, int32_t layer) {
  return static_cast<int32_t>(op) * 65536 + layer;
}

inline constexpr int kMmaMaxStages = 8;
inline constexpr int kMmaMinStagesForWiderChunks = 3;  // chunks widen while this many fit
inline constexpr int kMmaMaxChunk = 512;               // k per chunk, at most
inline constexpr int kMmaMaxPassA = 256;               // weight rows per pass (all mats)
inline constexpr int kMmaMaxPassRows = 64;             // token rows per pass

// Tables at the start of the core's shared memory: per pass, each A row's and token row's
// source and the row scales.
inline constexpr int kMmaTableBytes = kMmaMaxPassA * 8 + kMmaMaxPassRows * 8 + kMmaMaxPassRows * 4;

__host__ __device__ constexpr int mma_stage_bytes(int a_rows, int token_rows, int bk) {
  return a_rows * (bk * 2 + 16) + token_rows * (bk * 4 + 32) + bk * 2;
}

// The converted B operands (hi and lo rows) of one chunk.
__host__ __device__ constexpr int mma_b_bytes(int token_rows, int bk) {
  return 2 * token_rows * (bk * 2 + 16);
}

// The core needs its tables, the B operands and two stages of the largest 64-wide chunk (8
// warp blocks of 32 weight rows with one of 32 token rows, or 4 with two); the memory after
// the tables also holds the end-of-pass reduction (8 warps x 32 x 32 floats).
static_assert(kMmaTableBytes % 16 == 0);
static_assert(kMmaTableBytes + mma_b_bytes(32, 64) + 2 * mma_stage_bytes(kMmaMaxPassA, 32, 64) <=
                  kProjectionMinSmemBytes,
              "kernels/megakernel.h promises the host less than the core needs");
static_assert(kMmaTableBytes + mma_b_bytes(64, 64) + 2 * mma_stage_bytes(128, 64, 64) <=
              kProjectionMinSmemBytes);
static_assert(kMmaTableBytes + kMegakernelWarps * 32 * 32 * 4 <= kProjectionMinSmemBytes);

// For every column c < in.ncols and token row r < in.nrows:
//   v[m] = sum_k row_of(m, c)[k] * (hi + lo)(x[r][k])  (m < kMats), then emit(c, r, v) once.
// A warp owns kMT m-tiles x kNT n-tiles (a block). `smem` (16-byte aligned, `smem_bytes`) is
// the core's own; the caller has synchronized before (row_scale written) and the core ends
// with __syncthreads (emitted shared-memory values readable). Needs K % 8 == 0 and
// 16-byte-aligned weight and activation rows.
template <int kMats, int kMT, int kNT, typename SrcRow, typename RowOf, typename Emit>
__device__ void tile_mma(const ProjectionInput& in, char* smem, int smem_bytes, SrcRow src_row,
                         RowOf row_of, Emit emit) {
  constexpr int kBlockA = kMT * 16, kBlockN = kNT * 8;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int K = in.K;
  const uint16_t** a_rows = reinterpret_cast<const uint16_t**>(smem);  // (kMmaMaxPassA)
  const float** x_rows = reinterpret_cast<const float**>(smem + kMmaMaxPassA * 8);
  float* x_scale = reinterpret_cast<float*>(smem + kMmaMaxPassA * 8 + kMmaMaxPassRows * 8);
  char* const work = smem + kMmaTableBytes;  // B, then the stages; the reduction at the end
  const int work_bytes = smem_bytes - kMmaTableBytes;

  // Pass shape: all columns at once when they fit in 8 warp blocks (each weight read once
  // per row pass), else column passes of 8 blocks; rows fill the blocks left.
  const int a_needed = kMats * ((in.ncols + 15) / 16 * 16);
  const int mblocks_all = (a_needed + kBlockA - 1) / kBlockA;
  const int mblocks_max = min(mblocks_all, kMegakernelWarps);
  const int nblocks_max =
      max(1, min(min((in.nrows + kBlockN - 1) / kBlockN, kMegakernelWarps / mblocks_max),
                 kMmaMaxPassRows / kBlockN));
  const int pass_cols =
      mblocks_max == mblocks_all ? in.ncols : mblocks_max * kBlockA / kMats / 16 * 16;
  const int pass_rows = nblocks_max * kBlockN;

  for (int r0 = 0; r0 < in.nrows; r0 += pass_rows) {
    const int nr = min(pass_rows, in.nrows - r0);
    for (int c0 = 0; c0 < in.ncols; c0 += pass_cols) {
      const int nc = min(pass_cols, in.ncols - c0);
      const int cstride = (nc + 15) / 16 * 16;  // A rows per matrix
      const int a_used = kMats * cstride;
      const int mb = (a_used + kBlockA - 1) / kBlockA, nb = (nr + kBlockN - 1) / kBlockN;
      // Token rows past nr in the last n-tile are not staged: they feed only outputs that are
      // not emitted.
      const int a_alloc = mb * kBlockA, n_alloc = (nr + 7) / 8 * 8;
      const int blocks = mb * nb;
      const int warps_k = kMegakernelWarps / blocks;  // >= 1: blocks <= 8 by construction
      // Chunk width: as wide as leaves room for one B and kMmaMinStagesForWiderChunks stages
      // (long contiguous rows per copy), no wider than K needs.
      const int bk_max = min(kMmaMaxChunk, (K + 63) / 64 * 64);
      int bk = 64;
      while (bk * 2 <= bk_max && (work_bytes - mma_b_bytes(n_alloc, bk * 2)) /
                                         mma_stage_bytes(a_alloc, n_alloc, bk * 2) >=
                                     kMmaMinStagesForWiderChunks) {
        bk *= 2;
      }
      const int b_bytes = mma_b_bytes(n_alloc, bk);
      const int stage_bytes = mma_stage_bytes(a_alloc, n_alloc, bk);
      // Converting ahead (chunk kc + 1's B while chunk kc multiplies: one barrier per chunk)
      // takes two B buffers and 3 stages (kc's A, kc + 1's X, one loading); else chunk kc is
      // converted into one B between two barriers, with >= 2 stages (static_asserts above,
      // host check of kProjectionMinSmemBytes). Passes of <= 16 token rows stream weights
      // (latency-bound): they keep the deeper prefetch of one B buffer, whose conversion of
      // <= 16 rows is short.
      const bool ahead = n_alloc > 16 && (work_bytes - 2 * b_bytes) / stage_bytes >= 3;
      const int b_buffers = ahead ? 2 : 1;
      char* const pipe = work + b_buffers * b_bytes;
      const int stages = min(kMmaMaxStages, (work_bytes - b_buffers * b_bytes) / stage_bytes);
      const int stride_a = bk * 2 + 16, stride_x = bk * 4 + 32;  // bytes per row
      const int stride_b = stride_a;
      const int nchunks = (K + bk - 1) / bk;

      for (int a = tid; a < a_alloc; a += blockDim.x) {
        const int m = a / cstride, c = a % cstride;
        a_rows[a] = (a < a_used && c < nc) ? row_of(m, c0 + c) : nullptr;
      }
      for (int n = tid; n < n_alloc; n += blockDim.x) {
        x_rows[n] = n < nr ? src_row(r0 + n) : nullptr;
        x_scale[n] = (n < nr && in.row_scale != nullptr) ? in.row_scale[r0 + n] : 1.0f;
      }
      __syncthreads();

      const auto stage_a = [&](int s) { return pipe + s * stage_bytes; };
      const auto stage_x = [&](int s) { return stage_a(s) + a_alloc * stride_a; };
      const auto stage_norm = [&](int s) { return stage_x(s) + n_alloc * stride_x; };
      // Issues chunk kc's copies into stage s: each row's k in [k0, k0 + kk).
      const auto load_chunk = [&](int kc, int s) {
        const int k0 = kc * bk, kk = min(bk, K - k0);
        const uint32_t sa = smem_addr(stage_a(s)), sx = smem_addr(stage_x(s));
        const uint32_t sn = smem_addr(stage_norm(s));
        const int gran_a = bk / 8, gran_x = bk / 4;  // 16-byte granules per row
        const int shift_a = __ffs(gran_a) - 1, shift_x = __ffs(gran_x) - 1;
        for (int i = tid; i < a_alloc * gran_a; i += blockDim.x) {
          const int a = i >> shift_a, j = i & (gran_a - 1);
          const uint16_t* p = a_rows[a];
          if (p == nullptr || 8 * j >= kk) continue;
          cp_async16(sa + a * stride_a + j * 16, p + k0 + 8 * j, 16);
        }
        for (int i = tid; i < n_alloc * gran_x; i += blockDim.x) {
          const int n = i >> shift_x, j = i & (gran_x - 1);
          const float* p = x_rows[n];
          if (p == nullptr || 4 * j >= kk) continue;
          cp_async16(sx + n * stride_x + j * 16, p + k0 + 4 * j, 16);
        }
        if (in.norm != nullptr) {
          for (int j = tid; j < gran_a && 8 * j < kk; j += blockDim.x) {
            cp_async16(sn + j * 16, in.norm + k0 + 8 * j, 16);
          }
        }
      };

      // This warp's block and k16 phase.
      const int blk = warp / warps_k, kw = warp % warps_k;
      const bool active = blk < blocks;
      const int bm = active ? blk % mb : 0, bn = active ? blk / mb : 0;
      float acc[kMT][kNT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.0f;
        }
      }

      // Chunk kc's X (fp32, stage s) -> B buffer `b` (bf16 hi and lo rows), 4 k at a time;
      // zeros past the chunk's K (up to its last k16 step) and in rows past nr.
      const auto convert = [&](int kc, int s, char* b) {
        const int kk = min(bk, K - kc * bk), quads = (kk + 15) / 16 * 4;
        const float* xs = reinterpret_cast<const float*>(stage_x(s));     // (n_alloc, bk + 8)
        const uint2* ns = reinterpret_cast<const uint2*>(stage_norm(s));  // (bk / 4)
        const int shift_q = __ffs(bk / 4) - 1;
        for (int i = tid; i < n_alloc * (bk / 4); i += blockDim.x) {
          const int n = i >> shift_q, j = i & (bk / 4 - 1);
          if (j >= quads) continue;
          uint2 hi = make_uint2(0u, 0u), lo = hi;
          if (n < nr && 4 * j < kk) {
            const float4 x = *reinterpret_cast<const float4*>(xs + n * (bk + 8) + 4 * j);
            const float sc = x_scale[n];
            float v0 = x.x * sc, v1 = x.y * sc, v2 = x.z * sc, v3 = x.w * sc;
            if (in.norm != nullptr) {
              const uint2 w = ns[j];
              const float2 w0 = unpack_bf16x2(w.x), w1 = unpack_bf16x2(w.y);
              v0 *= w0.x;
              v1 *= w0.y;
              v2 *= w1.x;
              v3 *= w1.y;
            }
            hi.x = pack_bf16x2(v0, v1);
            hi.y = pack_bf16x2(v2, v3);
            const float2 h0 = unpack_bf16x2(hi.x), h1 = unpack_bf16x2(hi.y);
            lo.x = pack_bf16x2(v0 - h0.x, v1 - h0.y);
            lo.y = pack_bf16x2(v2 - h1.x, v3 - h1.y);
          }
          *reinterpret_cast<uint2*>(b + n * stride_b + 8 * j) = hi;
          *reinterpret_cast<uint2*>(b + (n_alloc + n) * stride_b + 8 * j) = lo;
        }
      };

      for (int s = 0; s < stages - 1; ++s) {
        if (s < nchunks) load_chunk(s, s);
        cp_async_commit();
      }
      if (ahead) {
        cp_async_wait(stages - 2);  // chunk 0 has landed (this thread's copies)
        __syncthreads();
        convert(0, 0, work);
      }
      for (int kc = 0; kc < nchunks; ++kc) {
        const int s = kc % stages;
        // Chunk kc (kc + 1 when converting ahead) has landed, this thread's copies; after the
        // barrier everyone's, and everyone is done with chunk kc - 1: its stage and its B are
        // free (and B of chunk kc, converted ahead, is complete).
        cp_async_wait(ahead ? stages - 3 : stages - 2);
        __syncthreads();
        if (kc + stages - 1 < nchunks) load_chunk(kc + stages - 1, (kc + stages - 1) % stages);
        cp_async_commit();
        char* const b_cur = work + (ahead ? (kc & 1) * b_bytes : 0);
        if (ahead) {
          if (kc + 1 < nchunks) convert(kc + 1, (kc + 1) % stages, work + ((kc + 1) & 1) * b_bytes);
        } else {
          convert(kc, s, b_cur);
          __syncthreads();  // B of chunk kc written
        }
        if (!active) continue;
        const int kk = min(bk, K - kc * bk);
        const int ksteps = (kk + 15) / 16;
        const uint32_t sa = smem_addr(stage_a(s)), sb = smem_addr(b_cur);
        for (int ks = kw; ks < ksteps; ks += warps_k) {
          const int kb = ks * 16;          // chunk-relative k of this step
          const bool half = kb + 8 >= kk;  // k in [kb + 8, kb + 16) is past K: masked
          uint32_t afrag[kMT][4];
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            const int a0 = (bm * kMT + mt) * 16;
            if (a0 >= a_used) continue;
            const int a = a0 + (lane & 15), j = kb / 8 + (lane >> 4);
            ldmatrix_x4(afrag[mt], sa + a * stride_a + j * 16);
            if (half) afrag[mt][2] = afrag[mt][3] = 0u;
          }
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) {
            const int n0 = (bn * kNT + nt) * 8;
            if (n0 >= nr) continue;
            // Matrices 0, 1: hi rows n0.., k kb.. and kb + 8..; 2, 3: the same lo rows.
            uint32_t bfrag[4];
            const int row = n0 + (lane & 7) + ((lane >> 4) != 0 ? n_alloc : 0);
            ldmatrix_x4(bfrag, sb + row * stride_b + (kb + ((lane >> 3) & 1) * 8) * 2);
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt) {
              if ((bm * kMT + mt) * 16 >= a_used) continue;
              mma_bf16(acc[mt][nt], afrag[mt], bfrag[0], bfrag[1]);
              mma_bf16(acc[mt][nt], afrag[mt], bfrag[2], bfrag[3]);
            }
          }
        }
      }
      cp_async_wait(0);
      __syncthreads();  // B and the pipeline's memory become the reduction buffer

      // Per warp (kBlockA, kBlockN) partial sums; accumulator i holds A row g (+ 8 for
      // i >= 2) and token row 2t (+ 1 for odd i) of its tile.
      float* red = reinterpret_cast<float*>(work);  // (warps, kBlockA, kBlockN)
      if (active) {
        float* mine = red + warp * kBlockA * kBlockN;
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const int a = mt * 16 + g + (i >= 2 ? 8 : 0), n = nt * 8 + 2 * t + (i & 1);
              mine[a * kBlockN + n] = acc[mt][nt][i];
            }
          }
        }
      }
      __syncthreads();
      for (int i = tid; i < nr * nc; i += blockDim.x) {
        const int r = i / nc, c = i % nc;  // consecutive threads: consecutive columns
        const int bnr = r / kBlockN, n = r % kBlockN;
        float v[kMats];
#pragma unroll
        for (int m = 0; m < kMats; ++m) {
          const int a = m * cstride + c;
          const int b = bnr * mb + a / kBlockA;
          const float* part = red + (b * warps_k) * kBlockA * kBlockN + (a % kBlockA) * kBlockN + n;
          float sum = 0.0f;
          for (int q = 0; q < warps_k; ++q) sum += part[q * kBlockA * kBlockN];
          v[m] = sum;
        }
        emit(c0 + c, r0 + r, v);
      }
      __syncthreads();  // emitted values visible; tables and pipeline free for the next pass
    }
  }
}

}  // namespace megaserve::kernels
