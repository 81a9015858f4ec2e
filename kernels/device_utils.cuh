// Small device helpers shared by the megakernel's ops: bf16 bit-pattern conversion, warp
// and CTA reductions, and the acquire/release primitives of the barrier protocol.
//
// Memory model note [COHERENCE]: workspace and KV cache data written by other CTAs in the
// same step are read with plain (L1-cached, never ld.global.nc) loads; the controller's
// acquire by thread 0 followed by __syncthreads orders them after the producer's release.
// Only weights, which nothing writes while a kernel runs, are read through ld.global.nc.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

#include "kernels/megakernel.h"

namespace megaserve::kernels {

__device__ __forceinline__ float bf16_bits_to_float(uint16_t bits) {
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}

__device__ __forceinline__ uint16_t float_to_bf16_bits(float f) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

// 8 bf16 weights at `p` (16-byte aligned), read-only path.
__device__ __forceinline__ void load_weights8(const uint16_t* p, float out[8]) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(w[i] << 16);
    out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

// 8 bf16 values written in this step (KV cache): a plain coherent load.
__device__ __forceinline__ void load_bf16x8(const uint16_t* p, float out[8]) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(w[i] << 16);
    out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

// 8 bf16 values packed in 16 bytes (element 2i in the low half of word i).
__device__ __forceinline__ void unpack_bf16x8(const uint4 v, float out[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(w[i] << 16);
    out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

__device__ __forceinline__ float weight_at(const uint16_t* p, int64_t i) {
  return bf16_bits_to_float(__ldg(p + i));
}

// Sum over the warp (float or double); every lane gets it.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// x.x^2 + x.y^2 + x.z^2 + x.w^2 in double (each product exact).
__device__ __forceinline__ double square_sum(float4 x) {
  const double a = x.x, b = x.y, c = x.z, d = x.w;
  return a * a + b * b + c * c + d * d;
}

// 1 / sqrt(mean(x^2) + eps) from a sum of squares taken in double: the products are exact and
// the order of the sums hardly matters, so every path here and the CPU (engine/cpu/cpu_ops.cc)
// get the same float, and the bf16 roundings of the normed row agree bit for bit.
__device__ __forceinline__ float inv_rms_of(double ss, int n, float eps) {
  return static_cast<float>(1.0 / sqrt(ss / n + static_cast<double>(eps)));
}

// 1 / sqrt(mean(x^2) + eps) of one row, by one warp (every lane gets it).
__device__ __forceinline__ float warp_inv_rms(const float* x, int n, float eps) {
  const int lane = threadIdx.x & 31;
  double ss = 0.0;
  for (int i = lane; i < n; i += 32) ss += static_cast<double>(x[i]) * x[i];
  return inv_rms_of(warp_sum(ss), n, eps);
}

// RMSNorm of one row by one warp: out[i] = x[i] * inv_rms(x) * weight[i] (weight bf16),
// the same operation order as engine/cpu/cpu_ops.cc's rms_norm.
__device__ __forceinline__ void warp_rms_norm(const float* x, const uint16_t* weight, int n,
                                              float eps, float* out) {
  const int lane = threadIdx.x & 31;
  const float inv = warp_inv_rms(x, n, eps);
  for (int i = lane; i < n; i += 32) out[i] = x[i] * inv * weight_at(weight, i);
}

__device__ __forceinline__ uint64_t global_time_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ uint32_t sm_id() {
  uint32_t id;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
  return id;
}

// ---- Barrier protocol [ISA_BARRIERS]

__device__ __forceinline__ uint32_t load_acquire_gpu(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void store_release_gpu(uint32_t* p, uint32_t v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint64_t load_acquire_gpu(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void store_release_gpu(uint64_t* p, uint64_t v) {
  asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// Compare-and-swap with acquire semantics (the value it returns orders what follows).
__device__ __forceinline__ uint64_t cas_acquire_gpu(uint64_t* p, uint64_t expected,
                                                    uint64_t desired) {
  uint64_t old;
  asm volatile("atom.acquire.gpu.global.cas.b64 %0, [%1], %2, %3;"
               : "=l"(old)
               : "l"(p), "l"(expected), "l"(desired)
               : "memory");
  return old;
}

__device__ __forceinline__ void add_release_gpu(uint32_t* p, uint32_t v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

}  // namespace megaserve::kernels
