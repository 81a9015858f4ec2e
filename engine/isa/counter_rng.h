// Counter-based random numbers for sampling, shared by the host sampler and the GPU's
// sampling op: every value is a pure function of (seed, token index, vocabulary id), so a
// seeded request draws the same tokens whatever else is in the batch, and any vocabulary
// tile or tensor-parallel rank can compute the noise of its own ids without coordination.
//
// Construction. A (seed, token index) pair selects a 64-bit stream word
//   stream = mix64(seed ^ mix64(token_index * kGolden + kTokenIndexSalt)),
// and the bits of vocabulary id v are the SplitMix64 output at position v + 1 of that stream:
//   bits = mix64(stream + (v + 1) * kGolden).
// mix64 is a bijection with full avalanche (SplitMix64's finalizer, Stafford's "Mix13"
// constants), so for one stream the ids map to distinct words, and neighbouring ids or token
// indices give unrelated words. The top 52 bits make a uniform u = (k + 0.5) / 2^52, which
// lies strictly inside (0, 1) and is exact in double: u is in [2^-53, 1 - 2^-53], so the
// Gumbel noise -log(-log u) is always finite, in about [-3.60, 36.74].
//
// Only plain integer and double arithmetic: usable from host C++ and CUDA device code.
#pragma once

#include <cmath>
#include <cstdint>

#include "engine/isa/host_device.h"

namespace megaserve::engine::rng {

inline constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ull;  // odd: (v + 1) * kGolden is a bijection
inline constexpr uint64_t kTokenIndexSalt = 0x5851f42d4c957f2dull;
inline constexpr double kTwoToMinus52 = 0x1p-52;

// A bijection of 64-bit words in which every input bit flips each output bit with
// probability about 1/2.
MEGASERVE_HOST_DEVICE inline constexpr uint64_t mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// The stream word of one token draw of one request; hoist it out of loops over the vocabulary.
MEGASERVE_HOST_DEVICE inline constexpr uint64_t stream_for(uint64_t seed, int64_t token_index) {
  return mix64(seed ^ mix64(static_cast<uint64_t>(token_index) * kGolden + kTokenIndexSalt));
}

// 64 random bits for vocabulary id `vocab_id` (>= 0) of a stream.
MEGASERVE_HOST_DEVICE inline constexpr uint64_t bits_for(uint64_t stream, int32_t vocab_id) {
  return mix64(stream + (static_cast<uint64_t>(vocab_id) + 1) * kGolden);
}

// (k + 0.5) / 2^52 for the top 52 bits k: strictly inside (0, 1), exactly representable.
// (k fits in int64_t, whose conversion to double is a single instruction on x86-64.)
MEGASERVE_HOST_DEVICE inline constexpr double uniform_from_bits(uint64_t bits) {
  return (static_cast<double>(static_cast<int64_t>(bits >> 12)) + 0.5) * kTwoToMinus52;
}

// Standard Gumbel noise from a uniform in (0, 1): -log(-log u).
MEGASERVE_HOST_DEVICE inline double gumbel_from_uniform(double u) { return -::log(-::log(u)); }

MEGASERVE_HOST_DEVICE inline double uniform_for(uint64_t seed, int64_t token_index,
                                                int32_t vocab_id) {
  return uniform_from_bits(bits_for(stream_for(seed, token_index), vocab_id));
}

MEGASERVE_HOST_DEVICE inline double gumbel_for(uint64_t seed, int64_t token_index,
                                               int32_t vocab_id) {
  return gumbel_from_uniform(uniform_for(seed, token_index, vocab_id));
}

}  // namespace megaserve::engine::rng
