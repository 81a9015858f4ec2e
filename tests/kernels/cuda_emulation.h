// Just enough of CUDA's device side, as host C++, to run one CTA of a megakernel op on CPU
// threads (tests only): 256 std::threads stand for the CTA's threads, std::barrier for
// __syncthreads and for each warp's lockstep in the warp intrinsics. Include it first in a
// test's translation unit, then the op's .cuh, which must use no other device feature (the
// test target adds -Wno-unknown-pragmas: `#pragma unroll` means nothing to the host).
// Explicitly rounded intrinsics are plain operations (the host contracts nothing into an
// FMA: the build sets no -march, and x86-64 without it has no FMA), each result forced
// through a volatile.
#pragma once

#define __device__  // before any CUDA header, which then leaves it empty

#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "kernels/megakernel.h"

namespace megaserve::testing::cuda_emulation {

inline constexpr int kThreads = kernels::kMegakernelThreads;
inline constexpr int kWarps = kernels::kMegakernelWarps;

struct Cta {
  std::barrier<> block{kThreads};
  std::unique_ptr<std::barrier<>> warp[kWarps];
  uint64_t lanes[kWarps][32] = {};  // each lane's word in a warp exchange
  Cta() {
    for (auto& w : warp) w = std::make_unique<std::barrier<>>(32);
  }
};

inline Cta* g_cta = nullptr;
struct ThreadIndex {
  unsigned x = 0;
};
inline thread_local ThreadIndex tls_thread_index;
inline const ThreadIndex blockDim{static_cast<unsigned>(kThreads)};

// Runs body() on every thread of one emulated CTA and waits for them.
inline void run_cta(const std::function<void()>& body) {
  Cta cta;
  g_cta = &cta;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&body, t] {
      tls_thread_index.x = static_cast<unsigned>(t);
      body();
    });
  }
  for (std::thread& t : threads) t.join();
  g_cta = nullptr;
}

// One word per lane, exchanged in lockstep over the lane's warp: every lane's word.
inline std::array<uint64_t, 32> exchange(uint64_t word) {
  const int warp = static_cast<int>(tls_thread_index.x) / 32;
  const int lane = static_cast<int>(tls_thread_index.x) % 32;
  g_cta->lanes[warp][lane] = word;
  g_cta->warp[warp]->arrive_and_wait();
  std::array<uint64_t, 32> words;
  std::copy_n(g_cta->lanes[warp], 32, words.begin());
  g_cta->warp[warp]->arrive_and_wait();
  return words;
}

}  // namespace megaserve::testing::cuda_emulation

#define threadIdx ::megaserve::testing::cuda_emulation::tls_thread_index
using ::megaserve::testing::cuda_emulation::blockDim;

inline void __syncthreads() {
  ::megaserve::testing::cuda_emulation::g_cta->block.arrive_and_wait();
}

inline unsigned __ballot_sync(unsigned, bool predicate) {
  const std::array<uint64_t, 32> words = ::megaserve::testing::cuda_emulation::exchange(predicate);
  unsigned mask = 0;
  for (int lane = 0; lane < 32; ++lane) mask |= (words[lane] != 0 ? 1u : 0u) << lane;
  return mask;
}

template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  uint64_t word = 0;
  std::memcpy(&word, &value, sizeof(T));
  const int lane = static_cast<int>(threadIdx.x) % 32;
  word = ::megaserve::testing::cuda_emulation::exchange(word)[lane ^ lane_mask];
  T out;
  std::memcpy(&out, &word, sizeof(T));
  return out;
}

inline int __popc(unsigned x) { return std::popcount(x); }
inline int __clzll(long long x) {
  return x == 0 ? 64 : std::countl_zero(static_cast<unsigned long long>(x));
}
inline uint32_t __float_as_uint(float f) { return std::bit_cast<uint32_t>(f); }
inline float __uint_as_float(uint32_t u) { return std::bit_cast<float>(u); }
inline float __fdiv_rn(float a, float b) {
  volatile float r = a / b;
  return r;
}
inline float __fmul_rn(float a, float b) {
  volatile float r = a * b;
  return r;
}
inline float __fadd_rn(float a, float b) {
  volatile float r = a + b;
  return r;
}
inline float __fsub_rn(float a, float b) {
  volatile float r = a - b;
  return r;
}
inline double __dmul_rn(double a, double b) {
  volatile double r = a * b;
  return r;
}
inline double __dadd_rn(double a, double b) {
  volatile double r = a + b;
  return r;
}
inline unsigned long long __double2ull_rn(double x) {
  return static_cast<unsigned long long>(std::nearbyint(x));
}
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
using std::fmax;
using std::fmaxf;
using std::fmin;
using std::fminf;
using std::isnan;
using std::min;
