// A memory-mapped reader of one GGUF file (llama.cpp's single-file model format, versions 2
// and 3, little-endian): a header, metadata key/values, tensor infos, then the tensor data
// at an aligned offset. Everything is checked against the file before any tensor is handed
// out, so a tensor's bytes always lie inside the mapping; errors name the file.
//
// Layout (all integers little-endian; a string is a uint64 length and that many bytes):
//   "GGUF" u32 version u64 tensor_count u64 kv_count
//   kv_count x   (string key, u32 value type, value)     an array value: u32 type, u64 n, n values
//   tensor_count x (string name, u32 n_dims, n_dims x u64 ne, u32 ggml type, u64 offset)
//   padding to general.alignment (default 32), then the data section; each tensor's offset
//   is relative to the data section and a multiple of the alignment.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model/ggml_types.h"

namespace megaserve::engine {

// The metadata value types; GgufValue's variant holds them at these indices.
enum class GgufValueType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};
const char* gguf_value_type_name(GgufValueType type);  // "UINT32", "STRING", ...

struct GgufValue;
struct GgufArray {
  GgufValueType element_type = GgufValueType::kUint8;
  std::vector<GgufValue> elements;  // each of element_type
};

struct GgufValue {
  std::variant<uint8_t, int8_t, uint16_t, int16_t, uint32_t, int32_t, float, bool, std::string,
               GgufArray, uint64_t, int64_t, double>
      value;

  GgufValueType type() const { return static_cast<GgufValueType>(value.index()); }
  bool is_integer() const;  // any of the eight integer types (not BOOL)
  // Any integer type, as int64; false for other types and for a UINT64 above INT64_MAX.
  bool as_int64(int64_t* out) const;
  // FLOAT32 or FLOAT64, as double; false for other types.
  bool as_double(double* out) const;
};

struct GgufTensor {
  std::string name;
  GgmlType type = GgmlType::kF32;
  // ggml's ne: dims[0] varies fastest, so a row of dims[0] elements is contiguous. A
  // Hugging Face [out_features, in_features] matrix is stored as dims {in, out}.
  std::vector<int64_t> dims;
  uint64_t offset = 0;  // from the start of the data section, a multiple of the alignment
  uint64_t num_bytes = 0;
  const uint8_t* data = nullptr;  // points into the mapping; aligned to the file's alignment

  int64_t numel() const;
  // Row-major shape, slowest dimension first (dims reversed), as safetensors and torch
  // write it.
  std::vector<int64_t> shape() const;
  int64_t row_length() const { return dims.empty() ? 1 : dims[0]; }
  uint64_t row_bytes() const;  // bytes of one row of row_length() elements
};

class GgufFile {
 public:
  // Maps `path` read-only and parses it. Errors name the file and the problem: a truncated
  // file, a bad magic, an unsupported version, an unknown value or tensor type, a malformed
  // general.alignment, a duplicate key or tensor name, a row length that is not a multiple
  // of its type's block size, a misaligned tensor offset, overlapping tensors, or tensor
  // data past the end of the file.
  static absl::StatusOr<std::unique_ptr<GgufFile>> open(const std::filesystem::path& path);

  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  const std::filesystem::path& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }  // of the data section, in the file

  const std::map<std::string, GgufValue, std::less<>>& metadata() const { return metadata_; }
  const GgufValue* find_metadata(std::string_view key) const;
  // Typed reads of one metadata key. NotFound when the key is absent; InvalidArgument,
  // naming the key and both types, when its type does not fit.
  absl::StatusOr<int64_t> get_int(std::string_view key) const;   // any integer type
  absl::StatusOr<double> get_float(std::string_view key) const;  // FLOAT32 or FLOAT64
  absl::StatusOr<bool> get_bool(std::string_view key) const;
  absl::StatusOr<std::string> get_string(std::string_view key) const;
  absl::StatusOr<std::vector<std::string>> get_string_array(std::string_view key) const;
  absl::StatusOr<std::vector<int64_t>> get_int_array(std::string_view key) const;

  // All tensors, in file order.
  const std::vector<GgufTensor>& tensors() const { return tensors_; }
  // nullptr when the file has no tensor of that name.
  const GgufTensor* find_tensor(std::string_view name) const;

 private:
  GgufFile() = default;
  absl::Status parse();
  absl::StatusOr<const GgufValue*> require(std::string_view key) const;
  absl::Status wrong_type(std::string_view key, const GgufValue& value,
                          std::string_view expected) const;

  std::filesystem::path path_;
  void* mapping_ = nullptr;  // nullptr for an empty file
  size_t size_ = 0;          // bytes mapped = file size
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::map<std::string, GgufValue, std::less<>> metadata_;
  std::vector<GgufTensor> tensors_;
  std::map<std::string, size_t, std::less<>> tensor_index_;  // name -> index in tensors_
};

}  // namespace megaserve::engine
