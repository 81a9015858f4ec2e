// The sample op's CTA-wide building blocks (kernels/op_sample.cuh): reductions, and the
// threshold selection that stands in for a sort of the vocabulary.
//
// Threshold selection. Each filter of engine/isa/sampling.h keeps an upper set of values, so it
// is one threshold: the largest value t such that the weight of the elements >= t reaches a
// target (top-k: weight 1 each, target k; top-p: probability mass, target top_p of the
// total; top logprobs: weight 1, target N). select_threshold finds it radix-style on an
// order-preserving 32-bit key of the float, 4 bits at a time from the top (8 passes over
// the row): per pass the weight of each of the 16 digit values among the elements that
// share the digits fixed so far, counted per warp with ballots (no atomics, so sums are
// exact and independent of scheduling), then a walk down the digits. Ties at the threshold
// are all kept, as the host's filters keep them.
#pragma once

#include <float.h>
#include <stdint.h>

#include "kernels/megakernel.h"

namespace megaserve::kernels::sample {

inline constexpr int kDigitBits = 4;
inline constexpr int kDigits = 1 << kDigitBits;

// Shared memory of one row's sampling (in the CTA's dynamic shared memory).
struct SampleSmem {
  uint64_t digit_weight[kMegakernelWarps][kDigits];
  uint32_t digit_nonempty[kMegakernelWarps];
  double dred[kMegakernelWarps];
  float fred[kMegakernelWarps];
  int32_t ired[kMegakernelWarps];
  uint64_t above;  // broadcast by thread 0 between passes
  uint32_t prefix;
  // Top logprobs: ids above the threshold (fewer than N), and per warp the first N ids equal
  // to it in that warp's contiguous segment of the vocabulary.
  int32_t num_greater;
  int32_t greater_ids[kMaxTopLogprobs];
  int32_t tie_count[kMegakernelWarps];
  int32_t tie_ids[kMegakernelWarps][kMaxTopLogprobs];
};

// NaN counts as -inf and +inf as the largest finite float (sampling.h, input cleaning).
__device__ __forceinline__ float clean(float x) { return isnan(x) ? -INFINITY : fminf(x, FLT_MAX); }

// f(i, row[i]) for the i < V this thread owns, in increasing i. Where the row is 16-byte aligned
// and V % 4 == 0, by float4 loads, kInFlight per thread at a time: a CTA reading a 128k row one
// float per thread at a time is latency-bound (an H100 took ~290 us for a greedy row, two
// passes). Thread t owns quads t, t + threads, ... (ids 4q .. 4q + 3), else ids t, t + threads.
template <typename F>
__device__ __forceinline__ void for_each_in_row(const float* row, int V, F f) {
  constexpr int kInFlight = 4;
  const int threads = blockDim.x;
  if ((reinterpret_cast<uintptr_t>(row) & 15) != 0 || V % 4 != 0) {
    for (int i = threadIdx.x; i < V; i += threads) f(i, row[i]);
    return;
  }
  const float4* quads = reinterpret_cast<const float4*>(row);
  const int n4 = V / 4;
  int q = threadIdx.x;
  for (; q + (kInFlight - 1) * threads < n4; q += kInFlight * threads) {
    float4 v[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) v[u] = quads[q + u * threads];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int i = 4 * (q + u * threads);
      f(i, v[u].x), f(i + 1, v[u].y), f(i + 2, v[u].z), f(i + 3, v[u].w);
    }
  }
  for (; q < n4; q += threads) {
    const float4 v = quads[q];
    f(4 * q, v.x), f(4 * q + 1, v.y), f(4 * q + 2, v.z), f(4 * q + 3, v.w);
  }
}

// Order-preserving key of a non-NaN float (-0 and +0 share one key).
__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t u = __float_as_uint(x == 0.0f ? 0.0f : x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_value(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// CTA-wide argmax of (key, id): larger key first, then lower id; every thread gets it.
template <typename Key>
__device__ void block_argmax(Key& key, int& id, Key* keys, int* ids) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const Key k2 = __shfl_xor_sync(0xffffffffu, key, o);
    const int i2 = __shfl_xor_sync(0xffffffffu, id, o);
    if (k2 > key || (k2 == key && i2 < id)) key = k2, id = i2;
  }
  if (lane == 0) keys[warp] = key, ids[warp] = id;
  __syncthreads();
  key = keys[0];
  id = ids[0];
  for (int w = 1; w < kMegakernelWarps; ++w) {
    if (keys[w] > key || (keys[w] == key && ids[w] < id)) key = keys[w], id = ids[w];
  }
  __syncthreads();
}

__device__ inline double block_sum(double v, double* scratch) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < kMegakernelWarps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

__device__ __forceinline__ uint64_t warp_sum_u64(uint64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The largest key t among the included elements of [0, n) whose weight of keys >= t reaches
// the target: weight(key > t) < target <= weight(key >= t). If none does (the target exceeds
// the total, or falls short of it only by rounding), the smallest included key, which keeps
// every included element. At least one element must be included.
//   key_of(i, &key): false when element i is not included, else its key.
//   weight_of(i): its weight (kCount: not called, every weight is 1); called only for the
//     elements that share the digits fixed so far, so costly weights are computed rarely.
//   target_of(total weight): the target, a double.
// Every thread of the CTA calls it and gets the key.
template <bool kCount, typename KeyOf, typename WeightOf, typename TargetOf>
__device__ uint32_t select_threshold(int n, KeyOf key_of, WeightOf weight_of, TargetOf target_of,
                                     SampleSmem& sm) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  uint32_t prefix = 0;
  uint64_t above = 0;   // weight of the included keys above the digits fixed so far
  double target = 0.0;  // read by thread 0 only, which walks the digits
  for (int shift = 32 - kDigitBits; shift >= 0; shift -= kDigitBits) {
    const uint32_t fixed_mask = shift + kDigitBits >= 32 ? 0u : ~0u << (shift + kDigitBits);
    uint64_t weight[kDigits];
#pragma unroll
    for (int d = 0; d < kDigits; ++d) weight[d] = 0;
    uint32_t nonempty = 0;
    // Warp-uniform trip count: every lane takes part in the ballots.
    for (int base = warp * 32; base < n; base += kMegakernelThreads) {
      const int i = base + lane;
      uint32_t key = 0;
      uint64_t w = 0;
      int digit = kDigits;  // not in the range
      if (i < n && key_of(i, &key) && (key & fixed_mask) == prefix) {
        digit = static_cast<int>((key >> shift) & (kDigits - 1));
        if constexpr (!kCount) w = weight_of(i);
      }
      // Past the first pass few elements share the fixed digits: most chunks stop here.
      if (__ballot_sync(0xffffffffu, digit < kDigits) == 0) continue;
#pragma unroll
      for (int d = 0; d < kDigits; ++d) {
        const uint32_t lanes = __ballot_sync(0xffffffffu, digit == d);
        if (lanes == 0) continue;
        nonempty |= 1u << d;
        if constexpr (kCount) {
          weight[d] += __popc(lanes);
        } else {
          weight[d] += warp_sum_u64(digit == d ? w : 0);
        }
      }
    }
    if (lane == 0) {
#pragma unroll
      for (int d = 0; d < kDigits; ++d) sm.digit_weight[warp][d] = weight[d];
      sm.digit_nonempty[warp] = nonempty;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      uint64_t total[kDigits];
      uint32_t any = 0;
      uint64_t level_total = 0;
      for (int d = 0; d < kDigits; ++d) {
        total[d] = 0;
        for (int w = 0; w < kMegakernelWarps; ++w) total[d] += sm.digit_weight[w][d];
        level_total += total[d];
      }
      for (int w = 0; w < kMegakernelWarps; ++w) any |= sm.digit_nonempty[w];
      if (shift == 32 - kDigitBits) target = target_of(level_total);
      int chosen = -1, lowest = 0;
      for (int d = kDigits - 1; d >= 0; --d) {
        if (!(any >> d & 1u)) continue;
        lowest = d;
        if (static_cast<double>(above + total[d]) >= target) {
          chosen = d;
          break;
        }
        above += total[d];
      }
      if (chosen < 0) {  // short of the target: descend into the lowest digit present
        chosen = lowest;
        above -= total[lowest];
      }
      sm.prefix = prefix | static_cast<uint32_t>(chosen) << shift;
      sm.above = above;
    }
    __syncthreads();
    prefix = sm.prefix;
    above = sm.above;
  }
  return prefix;
}

}  // namespace megaserve::kernels::sample
