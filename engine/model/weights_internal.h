// Shared by the safetensors loader (weights.cc) and the dummy generator (weights_dummy.cc):
// the list of tensors a model has, under their Hugging Face names, and element stores.
#pragma once

#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "engine/isa/bf16.h"
#include "engine/model/model_config.h"
#include "engine/model/weights.h"

#ifndef MEGASERVE_RETURN_IF_ERROR
#define MEGASERVE_RETURN_IF_ERROR(expr)                               \
  do {                                                                \
    if (absl::Status status_ = (expr); !status_.ok()) return status_; \
  } while (0)
#endif

namespace megaserve::engine {

enum class WeightKind { kMatrix, kBias, kNorm };

// One tensor of the model: its Hugging Face name, the shape the config implies and the
// ModelWeights handle it fills.
struct WeightSlot {
  std::string name;
  std::vector<int64_t> shape;
  WeightKind kind = WeightKind::kMatrix;
  Tensor* target = nullptr;
};

// Every tensor `config` needs, in file order (embedding, layers, final norm, lm_head unless
// tied). Resizes weights->layers; the slots point into `weights`.
std::vector<WeightSlot> weight_slots(const ModelConfig& config, ModelWeights* weights);

// Runs body(0..n-1) on up to hardware_concurrency threads, in no particular order.
void parallel_for(size_t n, const std::function<void(size_t)>& body);

// A zero-filled tensor of that dtype and shape.
Tensor make_tensor(DType dtype, const std::vector<int64_t>& shape);

// float -> IEEE half, round to nearest even; overflow gives infinity, NaN stays NaN.
inline uint16_t float_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t magnitude = u & 0x7fffffffu;
  if (magnitude >= 0x7f800000u) {  // inf or NaN
    return static_cast<uint16_t>(
        sign | 0x7c00u | (magnitude > 0x7f800000u ? 0x200u | (magnitude >> 13 & 0x3ffu) : 0));
  }
  if (magnitude >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520
  const int exponent = static_cast<int>(magnitude >> 23) - 127;
  uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u;  // 24 bits with the implicit one
  int shift;  // bits of `mantissa` below the half's last place
  uint32_t half;
  if (exponent >= -14) {
    shift = 13;
    half = static_cast<uint32_t>(exponent + 15) << 10 | ((mantissa & 0x7fffffu) >> 13);
  } else {
    shift = -exponent - 1;  // subnormal half: units of 2^-24
    if (shift > 25) return static_cast<uint16_t>(sign);
    half = mantissa >> shift;
  }
  const uint32_t rest = mantissa & ((1u << shift) - 1);
  const uint32_t halfway = 1u << (shift - 1);
  if (rest > halfway || (rest == halfway && (half & 1u))) ++half;  // a carry is still correct
  return static_cast<uint16_t>(sign | half);
}

inline void store_element(Tensor& tensor, int64_t i, float value) {
  switch (tensor.dtype) {
    case DType::kF32:
      tensor.mutable_data<float>()[i] = value;
      return;
    case DType::kBF16:
      tensor.mutable_data<uint16_t>()[i] = float_to_bf16(value);
      return;
    case DType::kF16:
      tensor.mutable_data<uint16_t>()[i] = float_to_f16(value);
      return;
  }
}

}  // namespace megaserve::engine
