#include "tests/support/gguf_writer.h"

#include <cmath>
#include <cstring>
#include <random>
#include <utility>

#include "tests/support/safetensors_writer.h"

namespace megaserve::testing {
namespace {

GgufKv scalar(std::string key, uint32_t type, std::string bytes) {
  return GgufKv{std::move(key), type, std::move(bytes)};
}

std::string pad_to(std::string bytes, uint64_t alignment) {
  while (bytes.size() % alignment != 0) bytes.push_back('\0');
  return bytes;
}

}  // namespace

std::string gguf_string_bytes(const std::string& text) {
  return le_bytes<uint64_t>(text.size()) + text;
}

GgufKv kv_u8(std::string key, uint8_t value) {
  return scalar(std::move(key), kGgufUint8, le_bytes(value));
}
GgufKv kv_i8(std::string key, int8_t value) {
  return scalar(std::move(key), kGgufInt8, le_bytes(value));
}
GgufKv kv_u16(std::string key, uint16_t value) {
  return scalar(std::move(key), kGgufUint16, le_bytes(value));
}
GgufKv kv_i16(std::string key, int16_t value) {
  return scalar(std::move(key), kGgufInt16, le_bytes(value));
}
GgufKv kv_u32(std::string key, uint32_t value) {
  return scalar(std::move(key), kGgufUint32, le_bytes(value));
}
GgufKv kv_i32(std::string key, int32_t value) {
  return scalar(std::move(key), kGgufInt32, le_bytes(value));
}
GgufKv kv_f32(std::string key, float value) {
  return scalar(std::move(key), kGgufFloat32, le_bytes(value));
}
GgufKv kv_bool(std::string key, bool value) {
  return scalar(std::move(key), kGgufBool, le_bytes<uint8_t>(value ? 1 : 0));
}
GgufKv kv_string(std::string key, const std::string& value) {
  return scalar(std::move(key), kGgufString, gguf_string_bytes(value));
}
GgufKv kv_u64(std::string key, uint64_t value) {
  return scalar(std::move(key), kGgufUint64, le_bytes(value));
}
GgufKv kv_i64(std::string key, int64_t value) {
  return scalar(std::move(key), kGgufInt64, le_bytes(value));
}
GgufKv kv_f64(std::string key, double value) {
  return scalar(std::move(key), kGgufFloat64, le_bytes(value));
}

GgufKv kv_array(std::string key, uint32_t element_type, uint64_t count,
                const std::string& elements) {
  return scalar(std::move(key), kGgufArray, le_bytes(element_type) + le_bytes(count) + elements);
}

GgufKv kv_string_array(std::string key, const std::vector<std::string>& values) {
  std::string elements;
  for (const std::string& value : values) elements += gguf_string_bytes(value);
  return kv_array(std::move(key), kGgufString, values.size(), elements);
}

GgufKv kv_i32_array(std::string key, const std::vector<int32_t>& values) {
  std::string elements;
  for (int32_t value : values) elements += le_bytes(value);
  return kv_array(std::move(key), kGgufInt32, values.size(), elements);
}

std::string gguf_bytes(const std::vector<GgufKv>& kvs, const std::vector<GgufTensorRecord>& tensors,
                       const GgufFileOptions& options) {
  std::string out = le_bytes(options.magic) + le_bytes(options.version) +
                    le_bytes<uint64_t>(tensors.size()) + le_bytes<uint64_t>(kvs.size());
  for (const GgufKv& kv : kvs) out += gguf_string_bytes(kv.key) + le_bytes(kv.type) + kv.value;
  std::string data;
  for (const GgufTensorRecord& tensor : tensors) {
    data = pad_to(std::move(data), options.alignment);
    const uint64_t offset =
        tensor.offset_override >= 0 ? static_cast<uint64_t>(tensor.offset_override) : data.size();
    out += gguf_string_bytes(tensor.name) + le_bytes<uint32_t>(tensor.dims.size());
    for (int64_t extent : tensor.dims) out += le_bytes<uint64_t>(extent);
    out += le_bytes(tensor.type) + le_bytes(offset);
    data += tensor.bytes;
  }
  return pad_to(std::move(out), options.alignment) + data;
}

GgufTensorRecord gguf_f32(std::string name, std::vector<int64_t> dims,
                          const std::vector<float>& v) {
  std::string bytes;
  for (float value : v) bytes += le_bytes(value);
  return {std::move(name), kGgmlF32, std::move(dims), std::move(bytes)};
}

GgufTensorRecord gguf_f16(std::string name, std::vector<int64_t> dims,
                          const std::vector<float>& v) {
  std::string bytes;
  for (float value : v) bytes += le_bytes(float_to_f16_reference(value));
  return {std::move(name), kGgmlF16, std::move(dims), std::move(bytes)};
}

GgufTensorRecord gguf_bf16(std::string name, std::vector<int64_t> dims,
                           const std::vector<float>& v) {
  std::string bytes;
  for (float value : v) bytes += le_bytes(bf16_round(value));
  return {std::move(name), kGgmlBF16, std::move(dims), std::move(bytes)};
}

std::string q8_0_block(uint16_t d, const int8_t* q) {
  return le_bytes(d) + std::string(reinterpret_cast<const char*>(q), 32);
}

std::string q4_0_block(uint16_t d, const uint8_t* q) {
  std::string out = le_bytes(d);
  for (int j = 0; j < 16; ++j) out.push_back(static_cast<char>(q[j] | q[j + 16] << 4));
  return out;
}

std::string q4_1_block(uint16_t d, uint16_t m, const uint8_t* q) {
  std::string out = le_bytes(d) + le_bytes(m);
  for (int j = 0; j < 16; ++j) out.push_back(static_cast<char>(q[j] | q[j + 16] << 4));
  return out;
}

float f16_value(uint16_t bits) {
  const int exponent = bits >> 10 & 0x1f;
  const int mantissa = bits & 0x3ff;
  double magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(mantissa, -24);
  } else if (exponent == 0x1f) {
    magnitude = mantissa == 0 ? INFINITY : NAN;
  } else {
    magnitude = std::ldexp(1024 + mantissa, exponent - 25);
  }
  return static_cast<float>(bits & 0x8000 ? -magnitude : magnitude);
}

float bf16_value(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t bf16_round(float value) {
  uint32_t u;
  std::memcpy(&u, &value, 4);
  const uint16_t below = static_cast<uint16_t>(u >> 16);  // truncation: towards zero
  if ((u & 0xffff) == 0) return below;
  const uint16_t above = below + 1;  // the next bf16 away from zero (may be infinity)
  const double lo = std::fabs(static_cast<double>(bf16_value(below)));
  const double hi = std::fabs(static_cast<double>(bf16_value(above)));
  const double x = std::fabs(static_cast<double>(value));
  if (x - lo < hi - x) return below;
  if (x - lo > hi - x) return above;
  return (below & 1) == 0 ? below : above;  // a tie: the even one
}

QuantizedData random_quantized(uint32_t type, int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> scale(-0.05f, 0.05f);
  std::uniform_int_distribution<int> int8(-128, 127);
  std::uniform_int_distribution<int> nibble(0, 15);
  QuantizedData out;
  for (int64_t b = 0; b < n / 32; ++b) {
    const uint16_t d = float_to_f16_reference(scale(rng));
    const uint16_t m = float_to_f16_reference(scale(rng) * 8);
    const float df = f16_value(d);
    const float mf = f16_value(m);
    if (type == kGgmlQ8_0) {
      int8_t q[32];
      for (int8_t& v : q) v = static_cast<int8_t>(int8(rng));
      out.bytes += q8_0_block(d, q);
      for (int8_t v : q) out.values.push_back(static_cast<float>(v) * df);
    } else {
      uint8_t q[32];
      for (uint8_t& v : q) v = static_cast<uint8_t>(nibble(rng));
      if (type == kGgmlQ4_0) {
        out.bytes += q4_0_block(d, q);
        for (uint8_t v : q) out.values.push_back(static_cast<float>(v - 8) * df);
      } else {
        out.bytes += q4_1_block(d, m, q);
        for (uint8_t v : q) {
          const float product = static_cast<float>(v) * df;  // rounded, then the add rounds
          out.values.push_back(product + mf);
        }
      }
    }
  }
  return out;
}

}  // namespace megaserve::testing
