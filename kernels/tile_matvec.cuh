// The projection core shared by kQkvRope, kOProj, kDownProj, kGateUpSilu and kLmHead: a tile
// of up to kMaxMatvecRows token rows (fp32, in shared memory) times a range of weight rows
// (bf16, [out, in] as stored), fp32 accumulation. One warp per output column; each weight
// element is loaded once per pass and used for every row of the pass.
//
// Two implementations of the same contract: CUDA cores (any K), and tensor cores
// (mma.sync m16n8k8 in TF32: bf16 weights are exact in TF32, activations are rounded to TF32,
// fp32 accumulation), used when the step asks for it (kStepTensorCores) and K is a
// multiple of 32.
#pragma once

#include <stdint.h>

#include "kernels/device_utils.cuh"

namespace megaserve::kernels {

inline constexpr int kLoadsInFlight = 8;  // per lane, in the vectorized weight loop

// For each column c in [0, ncols) and each row r in [0, nrows):
//   v[m] = dot(row_of(m, c)[0, K), xs[r * K, r * K + K)) for m < kMats,
// then emit(c, r, v) once per (c, r), from whichever lane holds it. Callers __syncthreads
// before (xs written) and after (emitted values read by other threads).
template <int kMats, typename RowOf, typename Emit>
__device__ void tile_matvec(int ncols, int K, const float* xs, int nrows, RowOf row_of, Emit emit) {
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

__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

// c += A (16x8, row) * B (8x8, col), TF32 inputs, fp32 accumulators.
__device__ __forceinline__ void mma_tf32(float c[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// tile_matvec on tensor cores: a warp computes 16 output columns (M) x 8 token rows (N) at
// a time, K in chunks of 32. Lane (g = lane / 4, t = lane % 4) loads 8 consecutive weights of
// columns g and g + 8 and 8 activations of token row g at k = chunk + 8t; within a chunk,
// mma k-step j takes the pair (chunk + 8t + 2j, + 1) as logical k (t, t + 4), the same
// permutation for A and B, so the sum over k is unchanged. Needs K % 32 == 0 and 16-byte
// aligned weight rows.
template <int kMats, typename RowOf, typename Emit>
__device__ void tile_matvec_tensor_cores(int ncols, int K, const float* xs, int nrows, RowOf row_of,
                                         Emit emit) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const float* xrow = xs + min(g, nrows - 1) * K;  // token row g (K); rows past nrows repeat
                                                   // the last (their outputs are not emitted)
  for (int c0 = warp * 16; c0 < ncols; c0 += kMegakernelWarps * 16) {
    const uint16_t* wa[kMats];  // column c0 + g (clamped: extra columns are not emitted)
    const uint16_t* wb[kMats];  // column c0 + g + 8
#pragma unroll
    for (int m = 0; m < kMats; ++m) {
      wa[m] = row_of(m, min(c0 + g, ncols - 1));
      wb[m] = row_of(m, min(c0 + g + 8, ncols - 1));
    }
    float acc[kMats][4];
#pragma unroll
    for (int m = 0; m < kMats; ++m) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = 0.0f;
#pragma unroll 2
    for (int k0 = 0; k0 < K; k0 += 32) {
      const int k = k0 + 8 * t;
      const float4 x0 = *reinterpret_cast<const float4*>(xrow + k);
      const float4 x1 = *reinterpret_cast<const float4*>(xrow + k + 4);
      const uint32_t b[8] = {to_tf32(x0.x), to_tf32(x0.y), to_tf32(x0.z), to_tf32(x0.w),
                             to_tf32(x1.x), to_tf32(x1.y), to_tf32(x1.z), to_tf32(x1.w)};
#pragma unroll
      for (int m = 0; m < kMats; ++m) {
        const uint4 va = __ldg(reinterpret_cast<const uint4*>(wa[m] + k));
        const uint4 vb = __ldg(reinterpret_cast<const uint4*>(wb[m] + k));
        const uint32_t pa[4] = {va.x, va.y, va.z, va.w};
        const uint32_t pb[4] = {vb.x, vb.y, vb.z, vb.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {  // bf16 pair j: element 2j low half, 2j + 1 high half
          mma_tf32(acc[m], pa[j] << 16, pb[j] << 16, pa[j] & 0xffff0000u, pb[j] & 0xffff0000u,
                   b[2 * j], b[2 * j + 1]);
        }
      }
    }
    // Accumulator i: column c0 + g (+ 8 for i >= 2), token row 2t (+ 1 for odd i).
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int c = c0 + g + (i >= 2 ? 8 : 0), r = 2 * t + (i & 1);
      if (c >= ncols || r >= nrows) continue;
      float v[kMats];
#pragma unroll
      for (int m = 0; m < kMats; ++m) v[m] = acc[m][i];
      emit(c, r, v);
    }
  }
}

// The projection entry point: tensor cores when asked for and K allows, else CUDA cores.
template <int kMats, typename RowOf, typename Emit>
__device__ void project_rows(bool tensor_cores, int ncols, int K, const float* xs, int nrows,
                             RowOf row_of, Emit emit) {
  if (tensor_cores && K % 32 == 0 && (reinterpret_cast<uintptr_t>(row_of(0, 0)) & 15) == 0) {
    tile_matvec_tensor_cores<kMats>(ncols, K, xs, nrows, row_of, emit);
  } else {
    tile_matvec<kMats>(ncols, K, xs, nrows, row_of, emit);
  }
}

// Token rows per pass when each row takes K floats of `avail_floats`.
__device__ __forceinline__ int rows_per_pass(int K, int avail_floats) {
  const int fit = avail_floats / K;
  return fit < kMaxMatvecRows ? fit : kMaxMatvecRows;
}

}  // namespace megaserve::kernels
