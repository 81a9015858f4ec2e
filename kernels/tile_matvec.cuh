// The projection core shared by kQkvRope, kOProj, kDownProj, kGateUpSilu and kLmHead: a tile
// of up to kMaxMatvecRows token rows (fp32, in shared memory) times a range of weight rows
// (bf16, [out, in] as stored), fp32 accumulation. One warp per output column; each weight
// element is loaded once per pass and used for every row of the pass.
//
// CUDA-core code, correctness first: the tensor-core version (mma.sync m16n8k16) is future
// work (kernels/README.md).
#pragma once

#include <stdint.h>

#include "kernels/device_utils.cuh"

namespace megaserve::kernels {

// For each column c in [0, ncols) and each row r in [0, nrows):
//   v[m] = dot(row_of(m, c)[0, K), xs[r * K, r * K + K)) for m < kMats,
// then emit(c, r, v) on lane 0 of the warp that computed it. Callers __syncthreads before
// (xs written) and after (emitted values read by other threads).
template <int kMats, typename RowOf, typename Emit>
__device__ void tile_matvec(int ncols, int K, const float* xs, int nrows, RowOf row_of,
                            Emit emit) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int c = warp; c < ncols; c += kMegakernelWarps) {
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
        for (int k = lane * 8; k < K; k += 256) {
          float wv[8];
          load_weights8(w + k, wv);
#pragma unroll
          for (int r = 0; r < kMaxMatvecRows; ++r) {
            if (r >= nrows) break;
            const float4* x = reinterpret_cast<const float4*>(xs + r * K + k);
            const float4 x0 = x[0], x1 = x[1];
            acc[m][r] += wv[0] * x0.x + wv[1] * x0.y + wv[2] * x0.z + wv[3] * x0.w +
                         wv[4] * x1.x + wv[5] * x1.y + wv[6] * x1.z + wv[7] * x1.w;
          }
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
