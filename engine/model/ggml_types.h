// ggml's tensor types as GGUF files store them: each type's numeric id, its block layout
// (elements per block, bytes per block), and dequantization of the types megaserve loads
// (F32, F16, BF16, Q8_0, Q4_0, Q4_1), value for value as ggml's reference C code is written
// and the `gguf` Python package (numpy) computes it: fp32 arithmetic, one rounded multiply
// and (Q4_1) one rounded add. (A ggml built with FMA contraction may fuse Q4_1's multiply
// and add and so differ in the last fp32 bit; the gguf package, the reference the tests
// compare with, never does.)
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"

namespace megaserve::engine {

// The ids of ggml's `enum ggml_type`. Ids 4, 5, 31-33 and 36-38 belonged to types ggml has
// removed; no file may use them.
enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kIQ2_XXS = 16,
  kIQ2_XS = 17,
  kIQ3_XXS = 18,
  kIQ1_S = 19,
  kIQ4_NL = 20,
  kIQ3_S = 21,
  kIQ2_S = 22,
  kIQ4_XS = 23,
  kI8 = 24,
  kI16 = 25,
  kI32 = 26,
  kI64 = 27,
  kF64 = 28,
  kIQ1_M = 29,
  kBF16 = 30,
  kTQ1_0 = 34,
  kTQ2_0 = 35,
  kMXFP4 = 39,
};

struct GgmlTypeInfo {
  GgmlType type;
  const char* name;  // as ggml spells it: "Q4_1", "BF16", ...
  int block_size;    // elements per block; a row's length is a multiple of it
  int type_size;     // bytes per block
};

// nullptr for an id that names no current ggml type.
const GgmlTypeInfo* ggml_type_info(uint32_t id);
const GgmlTypeInfo& ggml_type_info(GgmlType type);
inline const char* ggml_type_name(GgmlType type) { return ggml_type_info(type).name; }

// True for the types dequantize_* convert: F32, F16, BF16, Q8_0, Q4_0, Q4_1.
bool ggml_can_dequantize(GgmlType type);
// "F32, F16, BF16, Q8_0, Q4_0, Q4_1", for error messages.
std::string ggml_dequantizable_type_names();

// Dequantizes `n` elements stored as `type` at `src` (any alignment), computing each value
// in fp32 exactly as ggml does:
//   Q8_0: blocks of 32 = fp16 d, 32 int8 q;          value = q * d
//   Q4_0: blocks of 32 = fp16 d, 16 bytes of nibbles; value = (q - 8) * d
//   Q4_1: blocks of 32 = fp16 d, fp16 m, 16 bytes;    value = q * d + m
// where byte j of a Q4 block holds element j in its low nibble and element j + 16 in its
// high nibble. InvalidArgument when `type` is not dequantizable or `n` is not a multiple of
// its block size.
absl::Status dequantize_to_f32(GgmlType type, const uint8_t* src, int64_t n, float* out);
// The same values rounded to bf16 bit patterns (round to nearest even); BF16 copies its bits.
absl::Status dequantize_to_bf16(GgmlType type, const uint8_t* src, int64_t n, uint16_t* out);

}  // namespace megaserve::engine
