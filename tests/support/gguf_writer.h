// Writes GGUF files for tests: metadata of every value type, tensors of any ggml type with
// hand-made bytes, and ggml's Q8_0/Q4_0/Q4_1 blocks from explicit scales and quants. Also
// a reference of its own for the values those blocks stand for (fp16 decoding with ldexp,
// bf16 rounding by comparing neighbours), independent of engine/model/ggml_types.cc.
// Nothing is validated, so a test can write deliberately broken files.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace megaserve::testing {

// GGUF metadata value type ids (gguf.h's GgufValueType).
enum GgufTypeId : uint32_t {
  kGgufUint8 = 0,
  kGgufInt8 = 1,
  kGgufUint16 = 2,
  kGgufInt16 = 3,
  kGgufUint32 = 4,
  kGgufInt32 = 5,
  kGgufFloat32 = 6,
  kGgufBool = 7,
  kGgufString = 8,
  kGgufArray = 9,
  kGgufUint64 = 10,
  kGgufInt64 = 11,
  kGgufFloat64 = 12,
};

// ggml tensor type ids used by the tests.
enum GgmlTypeId : uint32_t {
  kGgmlF32 = 0,
  kGgmlF16 = 1,
  kGgmlQ4_0 = 2,
  kGgmlQ4_1 = 3,
  kGgmlQ8_0 = 8,
  kGgmlQ4_K = 12,
  kGgmlBF16 = 30,
};

// One key/value: the value's type id and its encoded bytes (without the type id).
struct GgufKv {
  std::string key;
  uint32_t type = kGgufUint32;
  std::string value;
};

// Encodings of single values, for building arrays and raw key/values.
std::string gguf_string_bytes(const std::string& text);  // u64 length + bytes
template <typename T>
std::string le_bytes(T value) {  // little-endian host
  return std::string(reinterpret_cast<const char*>(&value), sizeof value);
}

GgufKv kv_u8(std::string key, uint8_t value);
GgufKv kv_i8(std::string key, int8_t value);
GgufKv kv_u16(std::string key, uint16_t value);
GgufKv kv_i16(std::string key, int16_t value);
GgufKv kv_u32(std::string key, uint32_t value);
GgufKv kv_i32(std::string key, int32_t value);
GgufKv kv_f32(std::string key, float value);
GgufKv kv_bool(std::string key, bool value);
GgufKv kv_string(std::string key, const std::string& value);
GgufKv kv_u64(std::string key, uint64_t value);
GgufKv kv_i64(std::string key, int64_t value);
GgufKv kv_f64(std::string key, double value);
// An array of `count` elements of `element_type`, already encoded back to back.
GgufKv kv_array(std::string key, uint32_t element_type, uint64_t count,
                const std::string& elements);
GgufKv kv_string_array(std::string key, const std::vector<std::string>& values);
GgufKv kv_i32_array(std::string key, const std::vector<int32_t>& values);

struct GgufTensorRecord {
  std::string name;
  uint32_t type = kGgmlF32;
  std::vector<int64_t> dims;  // ggml order: dims[0] is the row length
  std::string bytes;
  int64_t offset_override = -1;  // >= 0: written as the offset instead of the real one
};

struct GgufFileOptions {
  uint32_t magic = 0x46554747;  // "GGUF"
  uint32_t version = 3;
  uint64_t alignment = 32;  // padding used; write general.alignment yourself to change it
};

// A whole file: header, key/values, tensor infos, padding, then each tensor's bytes at the
// next multiple of the alignment.
std::string gguf_bytes(const std::vector<GgufKv>& kvs, const std::vector<GgufTensorRecord>& tensors,
                       const GgufFileOptions& options = {});

// Tensors from values: F32 exactly, F16/BF16 rounded to nearest even (the test's own rounding).
GgufTensorRecord gguf_f32(std::string name, std::vector<int64_t> dims, const std::vector<float>& v);
GgufTensorRecord gguf_f16(std::string name, std::vector<int64_t> dims, const std::vector<float>& v);
GgufTensorRecord gguf_bf16(std::string name, std::vector<int64_t> dims,
                           const std::vector<float>& v);

// One block of 32 elements of each quantized type; `q` holds each element's quant in
// element order (int8 for Q8_0, 0..15 for Q4_0 and Q4_1); scales are fp16 bit patterns.
std::string q8_0_block(uint16_t d, const int8_t* q);
std::string q4_0_block(uint16_t d, const uint8_t* q);
std::string q4_1_block(uint16_t d, uint16_t m, const uint8_t* q);

// The reference: an fp16 bit pattern's value, and a float's bf16 bit pattern (nearest,
// ties to even; NaN not handled).
float f16_value(uint16_t bits);
uint16_t bf16_round(float value);
float bf16_value(uint16_t bits);

// Random blocks of `type` (Q8_0, Q4_0 or Q4_1) for `n` elements (a multiple of 32) with
// finite scales of moderate size, and the fp32 values they stand for, computed as ggml
// defines them: q * d, (q - 8) * d, q * d + m.
struct QuantizedData {
  std::string bytes;
  std::vector<float> values;
};
QuantizedData random_quantized(uint32_t type, int64_t n, uint64_t seed);

}  // namespace megaserve::testing
