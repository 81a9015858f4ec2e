// The projection core on CUDA cores (fp32 FMA, any K): a pass of up to kMaxMatvecRows token
// rows (fp32, in shared memory) times a range of weight rows (bf16, [out, in] as stored).
// One warp per output column; each weight element is loaded once per pass and used for
// every row of the pass. kernels/projection.cuh picks it or the tensor-core core.
#pragma once

#include <stdint.h>

#include "kernels/device_utils.cuh"
#include "kernels/hopper/hopper_ptx.cuh"

namespace megaserve::kernels {

inline constexpr int kLoadsInFlight = 8;  // 16-byte loads per lane per buffer of the weight stream
// With l2_prefetch, batches of the weight stream whose bytes are asked into L2 ahead of their
// loads, per warp (4 KB each at kLoadsInFlight 8: 128 KB per SM, ~17 MB over 132 SMs).
inline constexpr int kL2AheadBatches = 4;
// Batches per warp asked into L2 before an instruction's waits (matvec_prefetch_l2; 256 KB per
// SM at most: all of an 8B O tile at batch 1).
inline constexpr int kL2EarlyBatches = 8;

// acc[r] += wv . xs[r * K + k, r * K + k + 8) for rows r < nrows (the products summed left to
// right, then added).
__device__ __forceinline__ void add_dot8(float (&acc)[kMaxMatvecRows], const float* wv,
                                         const float* xs, int K, int k, int nrows) {
#pragma unroll
  for (int r = 0; r < kMaxMatvecRows; ++r) {
    if (r >= nrows) break;
    const float4* x = reinterpret_cast<const float4*>(xs + r * K + k);
    const float4 x0 = x[0], x1 = x[1];
    acc[r] += wv[0] * x0.x + wv[1] * x0.y + wv[2] * x0.z + wv[3] * x0.w + wv[4] * x1.x +
              wv[5] * x1.y + wv[6] * x1.z + wv[7] * x1.w;
  }
}

// A warp's weight stream (matvec_stream): its columns c = warp, warp + 8, ... each as
// kMats weight rows of `batches` batches, a batch being kLoadsInFlight 16-byte loads per lane
// (K elements [k0, k0 + 256 kLoadsInFlight) of one row, contiguous).
struct MatvecBatches {
  int K, batches, per_col, total;

  __device__ MatvecBatches(int ncols, int k, int mats) : K(k) {
    const int warp = threadIdx.x >> 5;
    batches = (K + kLoadsInFlight * 256 - 1) / (kLoadsInFlight * 256);
    per_col = mats * batches;
    total = ncols > warp ? (ncols - warp + kMegakernelWarps - 1) / kMegakernelWarps * per_col : 0;
  }
  // Batch s: column c, matrix m, batch b of that row.
  __device__ void locate(int s, int* c, int* m, int* b) const {
    const int ci = s / per_col;
    *m = (s - ci * per_col) / batches;
    *b = s - ci * per_col - *m * batches;
    *c = (threadIdx.x >> 5) + ci * kMegakernelWarps;
  }
  // Asks batch s's bytes into L2 (a 16-byte-aligned row; K % 8 == 0).
  template <typename RowOf>
  __device__ void prefetch(int s, RowOf row_of) const {
    int c, m, b;
    locate(s, &c, &m, &b);
    const int k0 = b * kLoadsInFlight * 256, n = min(kLoadsInFlight * 256, K - k0);
    hopper::prefetch_l2_bulk(row_of(m, c) + k0, static_cast<uint32_t>(n) * 2);
  }
};

// Whether the weight rows of this warp's columns suit the vectorized stream: K % 8 == 0 and
// every row 16-byte aligned.
template <int kMats, typename RowOf>
__device__ bool matvec_rows_aligned(int ncols, int K, RowOf row_of) {
  bool aligned = K % 8 == 0;
  for (int c = threadIdx.x >> 5; aligned && c < ncols; c += kMegakernelWarps) {
#pragma unroll
    for (int m = 0; m < kMats; ++m) {
      aligned = aligned && (reinterpret_cast<uintptr_t>(row_of(m, c)) & 15) == 0;
    }
  }
  return aligned;
}

// The prefetch call of a register-matvec projection [MATVEC_BULK]: asks the first
// kL2EarlyBatches batches of each warp's weight stream into L2 (one per lane), before the
// instruction waits for its inputs. Nothing to wait for; no __syncthreads.
template <int kMats, typename RowOf>
__device__ void matvec_prefetch_l2(int ncols, int K, RowOf row_of) {
  if (!matvec_rows_aligned<kMats>(ncols, K, row_of)) return;
  const MatvecBatches q(ncols, K, kMats);
  const int lane = threadIdx.x & 31;
  if (lane < kL2EarlyBatches && lane < q.total) q.prefetch(lane, row_of);
}

// The weight stream of tile_matvec, a call of its own (its two buffers spill nowhere; inlined
// into dispatch, whose registers are all taken, they went to local memory and each load
// waited for its store). Weight row m of column c is rows[c * mats + m] (16-byte aligned,
// K % 8 == 0); the warp's columns are one sequence of batches (MatvecBatches), loaded into
// two register buffers in turn: the next batch is in flight while one is summed, and the next
// column's loads while a column is reduced, so an SM keeps 32-64 KB of weights in flight
// instead of draining them after every batch. Each product is added to its accumulator in
// the same order as a batch at a time would. With l2_prefetch, batch s + kL2AheadBatches is
// asked into L2 (one bulk prefetch) when batch s is loaded, so the loads meet L2 rather than
// DRAM latency. Column c's sums for row r go to out[(c * nrows + r) * mats + m].
// One function for one and two matrices (mats; kMaxStreamMats accumulators either way): in the
// megakernel a second copy for one matrix spilled its buffers (ptxas: 864 bytes), this one
// nothing.
inline constexpr int kMaxStreamMats = 2;
__device__ __noinline__ void matvec_stream(const uint16_t* const* rows, int mats, int ncols, int K,
                                           const float* xs, int nrows, bool l2_prefetch,
                                           float* out) {
  const int lane = threadIdx.x & 31;
  const auto row_of = [&](int m, int c) { return rows[c * mats + m]; };
  const MatvecBatches q(ncols, K, mats);
  const int total = q.total;
  if (l2_prefetch && lane >= 2 && lane < kL2AheadBatches && lane < total) q.prefetch(lane, row_of);
  const auto issue = [&](uint4 (&buf)[kLoadsInFlight], int s) {
    if (l2_prefetch && lane == 0 && s + kL2AheadBatches < total) {
      q.prefetch(s + kL2AheadBatches, row_of);
    }
    int c, m, b;
    q.locate(s, &c, &m, &b);
    const uint16_t* w = row_of(m, c);
#pragma unroll
    for (int u = 0; u < kLoadsInFlight; ++u) {
      const int k = lane * 8 + (b * kLoadsInFlight + u) * 256;
      buf[u] = k < K ? __ldg(reinterpret_cast<const uint4*>(w + k)) : make_uint4(0, 0, 0, 0);
    }
  };
  float acc[kMaxStreamMats][kMaxMatvecRows];
#pragma unroll
  for (int m = 0; m < kMaxStreamMats; ++m) {
#pragma unroll
    for (int r = 0; r < kMaxMatvecRows; ++r) acc[m][r] = 0.0f;
  }
  const auto consume = [&](const uint4 (&buf)[kLoadsInFlight], int s) {
    int c, m, b;
    q.locate(s, &c, &m, &b);
#pragma unroll
    for (int mm = 0; mm < kMaxStreamMats; ++mm) {
      if (mm != m) continue;  // warp-uniform: the accumulators stay in registers
#pragma unroll
      for (int u = 0; u < kLoadsInFlight; ++u) {
        const int k = lane * 8 + (b * kLoadsInFlight + u) * 256;
        if (k >= K) break;
        float wv[8];
        unpack_bf16x8(buf[u], wv);
        add_dot8(acc[mm], wv, xs, K, k, nrows);
      }
    }
    if (m != mats - 1 || b != q.batches - 1) return;
#pragma unroll
    for (int r = 0; r < kMaxMatvecRows; ++r) {
      if (r >= nrows) break;
#pragma unroll
      for (int mm = 0; mm < kMaxStreamMats; ++mm) {
        if (mm >= mats) break;
        const float v = warp_sum(acc[mm][r]);
        acc[mm][r] = 0.0f;
        if (lane == 0) out[(c * nrows + r) * mats + mm] = v;
      }
    }
  };
  uint4 buf0[kLoadsInFlight], buf1[kLoadsInFlight];
  if (total > 0) issue(buf0, 0);
  if (total > 1) issue(buf1, 1);
  for (int s = 0; s < total; s += 2) {
    consume(buf0, s);
    if (s + 2 < total) issue(buf0, s + 2);
    if (s + 1 < total) {
      consume(buf1, s + 1);
      if (s + 3 < total) issue(buf1, s + 3);
    }
  }
}

// Columns of tile_matvec whose rows the stream cannot take (unaligned, or K % 8 != 0): a warp
// per column, an element per lane at a time; rows and out as matvec_stream's.
__device__ __noinline__ void matvec_columns_scalar(const uint16_t* const* rows, int mats,
                                                   int ncols, int K, const float* xs, int nrows,
                                                   float* out) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int c = warp; c < ncols; c += kMegakernelWarps) {
    for (int m = 0; m < mats; ++m) {
      const uint16_t* w = rows[c * mats + m];
      float acc[kMaxMatvecRows];
#pragma unroll
      for (int r = 0; r < kMaxMatvecRows; ++r) acc[r] = 0.0f;
      for (int k = lane; k < K; k += 32) {
        const float wk = weight_at(w, k);
#pragma unroll
        for (int r = 0; r < kMaxMatvecRows; ++r) {
          if (r >= nrows) break;
          acc[r] += wk * xs[r * K + k];
        }
      }
#pragma unroll
      for (int r = 0; r < kMaxMatvecRows; ++r) {
        if (r >= nrows) break;
        const float v = warp_sum(acc[r]);
        if (lane == 0) out[(c * nrows + r) * mats + m] = v;
      }
    }
  }
}

// Shared memory tile_matvec wants past its token rows: a table of the weight rows of a group
// of columns and their sums (24 KB: every column of a batch-1 tile in one group; at least
// kMatvecMinScratchBytes, a few columns at a time).
inline constexpr int kMatvecScratchBytes = 24 * 1024;
inline constexpr int kMatvecMinScratchBytes = 1024;

// For each column c in [0, ncols) and each row r in [0, nrows):
//   v[m] = dot(row_of(m, c)[0, K), xs[r * K, r * K + K)) for m < kMats,
// then emit(c, r, v) once per (c, r), from any thread. Every thread calls it; callers
// __syncthreads before (xs written) and after (emitted values read by other threads).
// `scratch` (16-byte aligned shared memory, scratch_bytes >= kMatvecMinScratchBytes) holds a
// group of columns' weight rows and sums at a time: matvec_stream takes the group (l2_prefetch:
// its L2 prefetches ahead) where every row is 16-byte aligned and K % 8 == 0, else
// matvec_columns_scalar; then all threads emit the group's sums.
template <int kMats, typename RowOf, typename Emit>
__device__ void tile_matvec(int ncols, int K, const float* xs, int nrows, bool l2_prefetch,
                            char* scratch, int scratch_bytes, RowOf row_of, Emit emit) {
  static_assert(kMats <= kMaxStreamMats);
  const int group = min(ncols, scratch_bytes / (kMats * (8 + 4 * nrows)));
  if (ncols <= 0 || group <= 0) return;
  const uint16_t** rows = reinterpret_cast<const uint16_t**>(scratch);
  float* out = reinterpret_cast<float*>(scratch + group * kMats * 8);
  bool aligned = K % 8 == 0;
  for (int i = threadIdx.x; aligned && i < ncols * kMats; i += kMegakernelThreads) {
    aligned = (reinterpret_cast<uintptr_t>(row_of(i % kMats, i / kMats)) & 15) == 0;
  }
  const bool streamed = __syncthreads_and(aligned) != 0;
  for (int c0 = 0; c0 < ncols; c0 += group) {
    const int g = min(group, ncols - c0);
    for (int i = threadIdx.x; i < g * kMats; i += kMegakernelThreads) {
      rows[i] = row_of(i % kMats, c0 + i / kMats);
    }
    __syncthreads();
    if (streamed) {
      matvec_stream(rows, kMats, g, K, xs, nrows, l2_prefetch, out);
    } else {
      matvec_columns_scalar(rows, kMats, g, K, xs, nrows, out);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < g * nrows; i += kMegakernelThreads) {
      emit(c0 + i / nrows, i % nrows, out + i * kMats);
    }
    __syncthreads();  // the table and sums are rewritten by the next group
  }
}

// Token rows per pass when each row takes K floats of `avail_floats`.
__device__ __forceinline__ int rows_per_pass(int K, int avail_floats) {
  const int fit = avail_floats / K;
  return fit < kMaxMatvecRows ? fit : kMaxMatvecRows;
}

// Token rows per pass of the CUDA-core matvec in `smem_bytes`, leaving kMatvecScratchBytes
// past them for tile_matvec where that still fits a row, else kMatvecMinScratchBytes.
__device__ __forceinline__ int matvec_rows_per_pass(int K, int smem_bytes) {
  const int floats = static_cast<int>(sizeof(float));
  const int with_scratch = rows_per_pass(K, (smem_bytes - kMatvecScratchBytes) / floats);
  return with_scratch > 0 ? with_scratch
                          : rows_per_pass(K, (smem_bytes - kMatvecMinScratchBytes) / floats);
}

}  // namespace megaserve::kernels
