// A memory-mapped reader of one .safetensors file: an 8-byte little-endian header length N,
// N bytes of JSON ({name: {dtype, shape, data_offsets}, "__metadata__": {...}}), then the
// data section. Everything in the header is checked against the file before any tensor is
// handed out, so a tensor's bytes always lie inside the mapping.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace megaserve::engine {

// Every dtype the safetensors format defines. The reader accepts all of them (a file may
// hold buffers the model does not use); the weight loader converts only F32, F16 and BF16.
enum class SafetensorsDtype {
  kBool,
  kU8,
  kI8,
  kI16,
  kU16,
  kF16,
  kBF16,
  kI32,
  kU32,
  kF32,
  kF64,
  kI64,
  kU64,
  kF8E4M3,
  kF8E5M2,
};
const char* safetensors_dtype_name(SafetensorsDtype dtype);  // as in the file: "BF16", ...
int safetensors_dtype_size(SafetensorsDtype dtype);          // bytes per element

struct SafetensorsTensor {
  std::string name;
  SafetensorsDtype dtype = SafetensorsDtype::kF32;
  std::vector<int64_t> shape;  // empty for a scalar
  uint64_t begin = 0;          // byte offsets into the data section, begin <= end
  uint64_t end = 0;
  const uint8_t* data = nullptr;  // points into the mapping; not aligned in general

  uint64_t num_bytes() const { return end - begin; }
  int64_t numel() const;
};

class SafetensorsFile {
 public:
  // Maps `path` read-only and validates its header: the header length lies inside the file,
  // the header is a JSON object of well-formed entries with known dtypes, every tensor's
  // byte size equals numel * dtype size, tensors do not overlap, and every tensor's bytes
  // lie inside the file. Errors name the file (and the tensor where there is one).
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> open(const std::filesystem::path& path);

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::filesystem::path& path() const { return path_; }
  // All tensors, sorted by name.
  const std::vector<SafetensorsTensor>& tensors() const { return tensors_; }
  // nullptr when the file has no tensor of that name.
  const SafetensorsTensor* find(std::string_view name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile() = default;
  absl::Status parse();

  std::filesystem::path path_;
  void* mapping_ = nullptr;  // nullptr for an empty file
  size_t size_ = 0;          // bytes mapped = file size
  std::vector<SafetensorsTensor> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace megaserve::engine
