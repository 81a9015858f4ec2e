// Compiled with -ffp-contract=off (engine/model/CMakeLists.txt): Q4_1's q * d + m must be a
// rounded multiply and a rounded add, as in ggml's reference code and numpy, not one fused
// multiply-add, which targets with FMA in their base ISA (aarch64) would otherwise get.
#include "engine/model/ggml_types.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "engine/isa/bf16.h"

namespace megaserve::engine {
namespace {

constexpr int kQK_K = 256;  // elements per super-block of the k-quants and most iq types

// ggml's type traits (ggml.c `type_traits`): blck_size and type_size of every live type.
constexpr GgmlTypeInfo kTypes[] = {
    {GgmlType::kF32, "F32", 1, 4},
    {GgmlType::kF16, "F16", 1, 2},
    {GgmlType::kQ4_0, "Q4_0", 32, 2 + 16},
    {GgmlType::kQ4_1, "Q4_1", 32, 2 + 2 + 16},
    {GgmlType::kQ5_0, "Q5_0", 32, 2 + 4 + 16},
    {GgmlType::kQ5_1, "Q5_1", 32, 2 + 2 + 4 + 16},
    {GgmlType::kQ8_0, "Q8_0", 32, 2 + 32},
    {GgmlType::kQ8_1, "Q8_1", 32, 4 + 4 + 32},
    {GgmlType::kQ2_K, "Q2_K", kQK_K, 2 + 2 + kQK_K / 16 + kQK_K / 4},
    {GgmlType::kQ3_K, "Q3_K", kQK_K, 2 + kQK_K / 4 + kQK_K / 8 + 12},
    {GgmlType::kQ4_K, "Q4_K", kQK_K, 2 + 2 + kQK_K / 2 + 12},
    {GgmlType::kQ5_K, "Q5_K", kQK_K, 2 + 2 + kQK_K / 2 + kQK_K / 8 + 12},
    {GgmlType::kQ6_K, "Q6_K", kQK_K, 2 + kQK_K / 2 + kQK_K / 4 + kQK_K / 16},
    {GgmlType::kQ8_K, "Q8_K", kQK_K, 4 + kQK_K + kQK_K / 8},
    {GgmlType::kIQ2_XXS, "IQ2_XXS", kQK_K, 2 + kQK_K / 4},
    {GgmlType::kIQ2_XS, "IQ2_XS", kQK_K, 2 + kQK_K / 4 + kQK_K / 32},
    {GgmlType::kIQ3_XXS, "IQ3_XXS", kQK_K, 2 + kQK_K / 4 + kQK_K / 8},
    {GgmlType::kIQ1_S, "IQ1_S", kQK_K, 2 + kQK_K / 8 + kQK_K / 16},
    {GgmlType::kIQ4_NL, "IQ4_NL", 32, 2 + 16},
    {GgmlType::kIQ3_S, "IQ3_S", kQK_K, 2 + kQK_K / 4 + kQK_K / 8 + kQK_K / 32 + 4},
    {GgmlType::kIQ2_S, "IQ2_S", kQK_K, 2 + kQK_K / 4 + kQK_K / 16},
    {GgmlType::kIQ4_XS, "IQ4_XS", kQK_K, 2 + 2 + kQK_K / 2 + kQK_K / 64},
    {GgmlType::kI8, "I8", 1, 1},
    {GgmlType::kI16, "I16", 1, 2},
    {GgmlType::kI32, "I32", 1, 4},
    {GgmlType::kI64, "I64", 1, 8},
    {GgmlType::kF64, "F64", 1, 8},
    {GgmlType::kIQ1_M, "IQ1_M", kQK_K, kQK_K / 8 + kQK_K / 16 + kQK_K / 32},
    {GgmlType::kBF16, "BF16", 1, 2},
    {GgmlType::kTQ1_0, "TQ1_0", kQK_K, 2 + 4 * 13},
    {GgmlType::kTQ2_0, "TQ2_0", kQK_K, 2 + 64},
    {GgmlType::kMXFP4, "MXFP4", 32, 1 + 16},
};

constexpr GgmlType kDequantizable[] = {GgmlType::kF32,  GgmlType::kF16,  GgmlType::kBF16,
                                       GgmlType::kQ8_0, GgmlType::kQ4_0, GgmlType::kQ4_1};

constexpr int kQ8_0Bytes = 34;
constexpr int kQ4_0Bytes = 18;
constexpr int kQ4_1Bytes = 20;

uint16_t load_u16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | p[1] << 8); }

// One block of 32 elements of each quantized type.
void dequantize_q8_0(const uint8_t* block, float* out) {
  const float d = f16_to_float(load_u16(block));
  for (int j = 0; j < 32; ++j) out[j] = static_cast<float>(static_cast<int8_t>(block[2 + j])) * d;
}

void dequantize_q4_0(const uint8_t* block, float* out) {
  const float d = f16_to_float(load_u16(block));
  const uint8_t* qs = block + 2;
  for (int j = 0; j < 16; ++j) {
    out[j] = static_cast<float>((qs[j] & 0x0f) - 8) * d;
    out[j + 16] = static_cast<float>((qs[j] >> 4) - 8) * d;
  }
}

void dequantize_q4_1(const uint8_t* block, float* out) {
  const float d = f16_to_float(load_u16(block));
  const float m = f16_to_float(load_u16(block + 2));
  const uint8_t* qs = block + 4;
  for (int j = 0; j < 16; ++j) {
    out[j] = static_cast<float>(qs[j] & 0x0f) * d + m;
    out[j + 16] = static_cast<float>(qs[j] >> 4) * d + m;
  }
}

absl::Status check_dequantizable(GgmlType type, int64_t n) {
  if (!ggml_can_dequantize(type)) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot dequantize ggml type ", ggml_type_name(type),
                     " (supported: ", ggml_dequantizable_type_names(), ")"));
  }
  const int block_size = ggml_type_info(type).block_size;
  if (n < 0 || n % block_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat("cannot dequantize ", n, " elements of ",
                                                   ggml_type_name(type), ": not a multiple of its ",
                                                   block_size, "-element block"));
  }
  return absl::OkStatus();
}

}  // namespace

const GgmlTypeInfo* ggml_type_info(uint32_t id) {
  for (const GgmlTypeInfo& info : kTypes) {
    if (static_cast<uint32_t>(info.type) == id) return &info;
  }
  return nullptr;
}

const GgmlTypeInfo& ggml_type_info(GgmlType type) {
  const GgmlTypeInfo* info = ggml_type_info(static_cast<uint32_t>(type));
  return info != nullptr ? *info : kTypes[0];  // every enumerator is in the table
}

bool ggml_can_dequantize(GgmlType type) {
  for (GgmlType t : kDequantizable) {
    if (t == type) return true;
  }
  return false;
}

std::string ggml_dequantizable_type_names() {
  std::string names;
  for (GgmlType t : kDequantizable)
    absl::StrAppend(&names, names.empty() ? "" : ", ", ggml_type_name(t));
  return names;
}

absl::Status dequantize_to_f32(GgmlType type, const uint8_t* src, int64_t n, float* out) {
  if (absl::Status status = check_dequantizable(type, n); !status.ok()) return status;
  switch (type) {
    case GgmlType::kF32:
      std::memcpy(out, src, static_cast<size_t>(n) * 4);
      break;
    case GgmlType::kF16:
      for (int64_t i = 0; i < n; ++i) out[i] = f16_to_float(load_u16(src + 2 * i));
      break;
    case GgmlType::kBF16:
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(load_u16(src + 2 * i));
      break;
    case GgmlType::kQ8_0:
      for (int64_t b = 0; b < n / 32; ++b) dequantize_q8_0(src + b * kQ8_0Bytes, out + 32 * b);
      break;
    case GgmlType::kQ4_0:
      for (int64_t b = 0; b < n / 32; ++b) dequantize_q4_0(src + b * kQ4_0Bytes, out + 32 * b);
      break;
    case GgmlType::kQ4_1:
      for (int64_t b = 0; b < n / 32; ++b) dequantize_q4_1(src + b * kQ4_1Bytes, out + 32 * b);
      break;
    default:
      break;  // refused by check_dequantizable
  }
  return absl::OkStatus();
}

absl::Status dequantize_to_bf16(GgmlType type, const uint8_t* src, int64_t n, uint16_t* out) {
  if (absl::Status status = check_dequantizable(type, n); !status.ok()) return status;
  if (type == GgmlType::kBF16) {
    std::memcpy(out, src, static_cast<size_t>(n) * 2);
    return absl::OkStatus();
  }
  // Through fp32 a chunk at a time: every source type widens to fp32 exactly or (the
  // quantized ones) is defined by its fp32 value, so the bf16 rounding is the only one.
  constexpr int64_t kChunk = 32;  // one block of each quantized type, 32 elements of the rest
  const GgmlTypeInfo& info = ggml_type_info(type);
  const int64_t chunk_bytes = kChunk / info.block_size * info.type_size;
  float values[kChunk];
  for (int64_t i = 0; i < n; i += kChunk) {
    const int64_t count = n - i < kChunk ? n - i : kChunk;  // a block multiple either way
    if (absl::Status status =
            dequantize_to_f32(type, src + i / kChunk * chunk_bytes, count, values);
        !status.ok()) {
      return status;
    }
    for (int64_t j = 0; j < count; ++j) out[i + j] = float_to_bf16(values[j]);
  }
  return absl::OkStatus();
}

}  // namespace megaserve::engine
