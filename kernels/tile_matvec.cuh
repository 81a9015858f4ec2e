// The projection core on CUDA cores (fp32 FMA, any K): a pass of up to kMaxMatvecRows token
// rows (fp32, in shared memory) times a range of weight rows (bf16, [out, in] as stored).
// One warp per output column; each weight element is loaded once per pass and used for
// every row of the pass. kernels/projection.cuh picks it or the tensor-core core.
#pragma once

#include <stdint.h>

#include "kernels/device_utils.cuh"
#include "kernels/hopper/hopper_ptx.cuh"

namespace megaserve::kernels {

inline constexpr int kLoadsInFlight = 8;  // per lane, in the vectorized weight loop

// [L2_AHEAD] Starts matrix m's weight row of column c into L2 where the vectorized loop will
// load it (K % 8 == 0, 16-byte aligned; else nothing): one bulk prefetch of its K * 2 bytes.
template <typename RowOf>
__device__ __forceinline__ void weight_row_to_l2(RowOf row_of, int m, int c, int K) {
  const uint16_t* w = row_of(m, c);
  if (K % 8 == 0 && (reinterpret_cast<uintptr_t>(w) & 15) == 0) {
    hopper::prefetch_l2_bulk(w, static_cast<uint32_t>(K) * 2);
  }
}

// The columns of warp w that tile_matvec's loop does not start into L2 itself when it runs
// `ahead` columns ahead: w, w + warps, ..., ahead of them. Called by every thread before the
// instruction's waits (the weights depend on nothing); lane m takes matrix m.
template <int kMats, typename RowOf>
__device__ void matvec_first_to_l2(int ncols, int K, int ahead, RowOf row_of) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane >= kMats) return;
  for (int i = 0; i < ahead; ++i) {
    const int c = warp + i * kMegakernelWarps;
    if (c < ncols) weight_row_to_l2(row_of, lane, c, K);
  }
}

// For each column c in [0, ncols) and each row r in [0, nrows):
//   v[m] = dot(row_of(m, c)[0, K), xs[r * K, r * K + K)) for m < kMats,
// then emit(c, r, v) once per (c, r), from whichever lane holds it. Callers __syncthreads
// before (xs written) and after (emitted values read by other threads). `ahead` > 0: each warp
// starts the weight rows of its column `ahead` columns on into L2 as it begins a column
// [L2_AHEAD] (the first `ahead` by matvec_first_to_l2, before the waits).
template <int kMats, typename RowOf, typename Emit>
__device__ void tile_matvec(int ncols, int K, const float* xs, int nrows, int ahead, RowOf row_of,
                            Emit emit) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int c = warp; c < ncols; c += kMegakernelWarps) {
    if (ahead > 0 && lane < kMats && c + ahead * kMegakernelWarps < ncols) {
      weight_row_to_l2(row_of, lane, c + ahead * kMegakernelWarps, K);
    }
    float acc[kMats][kMaxMatvecRows];
#pragma unroll
    for (int m = 0; m < kMats; ++m) {
#pragma unroll
      for (int r = 0; r < kMaxMatvecRows; ++r) acc[m][r] = 0.0f;
    }
#pragma unroll
    for (int m = 0; m < kMats; ++m) {
      const uint16_t* w = row_of(m, c);  // (K)
      const bool vec = (K % 8 == 0) && ((reinterpret_cast<uintptr_t>(w) & 15) == 0);
      if (vec) {
        // acc[m][r] += wv . xs[r, k .. k + 8) for every row of the pass.
        const auto accumulate = [&](const float* wv, int k) {
#pragma unroll
          for (int r = 0; r < kMaxMatvecRows; ++r) {
            if (r >= nrows) break;
            const float4* x = reinterpret_cast<const float4*>(xs + r * K + k);
            const float4 x0 = x[0], x1 = x[1];
            acc[m][r] += wv[0] * x0.x + wv[1] * x0.y + wv[2] * x0.z + wv[3] * x0.w + wv[4] * x1.x +
                         wv[5] * x1.y + wv[6] * x1.z + wv[7] * x1.w;
          }
        };
        // kLoadsInFlight 16-byte loads per lane are issued before any is used (kept packed,
        // 4 registers each, until then): a decode step is bound by memory latency times the
        // bytes each SM keeps in flight (8 warps x 32 lanes x kLoadsInFlight x 16 bytes).
        int k = lane * 8;
        for (; k + (kLoadsInFlight - 1) * 256 < K; k += kLoadsInFlight * 256) {
          uint4 raw[kLoadsInFlight];
#pragma unroll
          for (int u = 0; u < kLoadsInFlight; ++u) {
            raw[u] = __ldg(reinterpret_cast<const uint4*>(w + k + u * 256));
          }
#pragma unroll
          for (int u = 0; u < kLoadsInFlight; ++u) {
            float wv[8];
            unpack_bf16x8(raw[u], wv);
            accumulate(wv, k + u * 256);
          }
        }
        for (; k < K; k += 256) {
          float wv[8];
          load_weights8(w + k, wv);
          accumulate(wv, k);
        }
      } else {
        for (int k = lane; k < K; k += 32) {
          const float wk = weight_at(w, k);
#pragma unroll
          for (int r = 0; r < kMaxMatvecRows; ++r) {
            if (r >= nrows) break;
            acc[m][r] += wk * xs[r * K + k];
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kMaxMatvecRows; ++r) {
      if (r >= nrows) break;
      float v[kMats];
#pragma unroll
      for (int m = 0; m < kMats; ++m) v[m] = warp_sum(acc[m][r]);
      if (lane == 0) emit(c, r, v);
    }
  }
}

// Token rows per pass when each row takes K floats of `avail_floats`.
__device__ __forceinline__ int rows_per_pass(int K, int avail_floats) {
  const int fit = avail_floats / K;
  return fit < kMaxMatvecRows ? fit : kMaxMatvecRows;
}

}  // namespace megaserve::kernels
