#include "engine/model/gguf.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/model/mapped_file.h"

namespace megaserve::engine {
namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian uint32
constexpr uint64_t kDefaultAlignment = 32;
constexpr int kMaxDims = 4;        // GGML_MAX_DIMS
constexpr int kMaxArrayDepth = 4;  // arrays of arrays: llama.cpp writes none; bound the recursion

constexpr const char* kValueTypeNames[] = {"UINT8",  "INT8",    "UINT16", "INT16",  "UINT32",
                                           "INT32",  "FLOAT32", "BOOL",   "STRING", "ARRAY",
                                           "UINT64", "INT64",   "FLOAT64"};
constexpr uint32_t kNumValueTypes = sizeof(kValueTypeNames) / sizeof(kValueTypeNames[0]);

// Bytes of one value of a fixed-size type; the least bytes a string (its length) or an array
// (element type and count) takes, which bounds how many elements a count can honestly claim.
uint64_t min_value_bytes(GgufValueType type) {
  switch (type) {
    case GgufValueType::kUint8:
    case GgufValueType::kInt8:
    case GgufValueType::kBool:
      return 1;
    case GgufValueType::kUint16:
    case GgufValueType::kInt16:
      return 2;
    case GgufValueType::kUint32:
    case GgufValueType::kInt32:
    case GgufValueType::kFloat32:
      return 4;
    case GgufValueType::kString:
    case GgufValueType::kUint64:
    case GgufValueType::kInt64:
    case GgufValueType::kFloat64:
      return 8;
    case GgufValueType::kArray:
      return 12;
  }
  return 1;
}

// Reads little-endian fields from the mapping; every read is bounds-checked and a short
// read is reported as truncation, naming what was being read.
class Cursor {
 public:
  Cursor(const uint8_t* data, uint64_t size, std::string file)
      : data_(data), size_(size), file_(std::move(file)) {}

  uint64_t position() const { return pos_; }
  uint64_t remaining() const { return size_ - pos_; }
  const std::string& file() const { return file_; }

  absl::Status error(const std::string& what) const {
    return absl::InvalidArgumentError(absl::StrCat(file_, ": ", what));
  }

  absl::Status need(uint64_t bytes, const std::string& what) const {
    if (bytes <= remaining()) return absl::OkStatus();
    return error(absl::StrCat("truncated file: ", what, " needs ", bytes, " bytes at offset ", pos_,
                              ", but the file ends at ", size_));
  }

  template <typename T>
  absl::Status read(T* out, const std::string& what) {
    if (absl::Status status = need(sizeof(T), what); !status.ok()) return status;
    std::memcpy(out, data_ + pos_, sizeof(T));  // little-endian host (x86-64, aarch64)
    pos_ += sizeof(T);
    return absl::OkStatus();
  }

  absl::Status read_string(std::string* out, const std::string& what) {
    uint64_t length = 0;
    if (absl::Status status = read(&length, what); !status.ok()) return status;
    if (absl::Status status = need(length, what); !status.ok()) return status;
    out->assign(reinterpret_cast<const char*>(data_ + pos_), length);
    pos_ += length;
    return absl::OkStatus();
  }

  // A count of items each taking at least `min_bytes`: one larger than the rest of the file
  // can hold is truncation (or garbage), reported before anything is allocated for it.
  absl::Status read_count(uint64_t min_bytes, uint64_t* count, const std::string& what) {
    if (absl::Status status = read(count, what); !status.ok()) return status;
    if (*count > remaining() / min_bytes) {
      return error(absl::StrCat("truncated file: ", what, " is ", *count, ", but only ",
                                remaining(), " bytes follow offset ", pos_));
    }
    return absl::OkStatus();
  }

 private:
  const uint8_t* data_;
  uint64_t size_;
  uint64_t pos_ = 0;
  std::string file_;
};

absl::Status read_value_type(Cursor& in, GgufValueType* type, const std::string& what) {
  uint32_t raw = 0;
  if (absl::Status status = in.read(&raw, what); !status.ok()) return status;
  if (raw >= kNumValueTypes) {
    return in.error(absl::StrCat(what, ": unknown value type ", raw));
  }
  *type = static_cast<GgufValueType>(raw);
  return absl::OkStatus();
}

template <typename T>
absl::Status read_scalar(Cursor& in, GgufValue* out, const std::string& what) {
  T value{};
  if (absl::Status status = in.read(&value, what); !status.ok()) return status;
  out->value = value;
  return absl::OkStatus();
}

absl::Status read_value(Cursor& in, GgufValueType type, int depth, GgufValue* out,
                        const std::string& what) {
  switch (type) {
    case GgufValueType::kUint8:
      return read_scalar<uint8_t>(in, out, what);
    case GgufValueType::kInt8:
      return read_scalar<int8_t>(in, out, what);
    case GgufValueType::kUint16:
      return read_scalar<uint16_t>(in, out, what);
    case GgufValueType::kInt16:
      return read_scalar<int16_t>(in, out, what);
    case GgufValueType::kUint32:
      return read_scalar<uint32_t>(in, out, what);
    case GgufValueType::kInt32:
      return read_scalar<int32_t>(in, out, what);
    case GgufValueType::kFloat32:
      return read_scalar<float>(in, out, what);
    case GgufValueType::kUint64:
      return read_scalar<uint64_t>(in, out, what);
    case GgufValueType::kInt64:
      return read_scalar<int64_t>(in, out, what);
    case GgufValueType::kFloat64:
      return read_scalar<double>(in, out, what);
    case GgufValueType::kBool: {
      uint8_t byte = 0;
      if (absl::Status status = in.read(&byte, what); !status.ok()) return status;
      if (byte > 1)
        return in.error(absl::StrCat(what, ": BOOL value ", int{byte}, " is not 0 or 1"));
      out->value = byte == 1;
      return absl::OkStatus();
    }
    case GgufValueType::kString: {
      std::string text;
      if (absl::Status status = in.read_string(&text, what); !status.ok()) return status;
      out->value = std::move(text);
      return absl::OkStatus();
    }
    case GgufValueType::kArray: {
      if (depth >= kMaxArrayDepth) {
        return in.error(absl::StrCat(what, ": arrays nested deeper than ", kMaxArrayDepth));
      }
      GgufArray array;
      if (absl::Status status = read_value_type(in, &array.element_type, what); !status.ok()) {
        return status;
      }
      uint64_t count = 0;
      if (absl::Status status = in.read_count(min_value_bytes(array.element_type), &count,
                                              absl::StrCat(what, ": array length"));
          !status.ok()) {
        return status;
      }
      array.elements.resize(count);
      for (uint64_t i = 0; i < count; ++i) {
        if (absl::Status status =
                read_value(in, array.element_type, depth + 1, &array.elements[i], what);
            !status.ok()) {
          return status;
        }
      }
      out->value = std::move(array);
      return absl::OkStatus();
    }
  }
  return in.error(absl::StrCat(what, ": unknown value type"));
}

bool is_power_of_two(uint64_t x) { return x != 0 && (x & (x - 1)) == 0; }

}  // namespace

const char* gguf_value_type_name(GgufValueType type) {
  const auto index = static_cast<uint32_t>(type);
  return index < kNumValueTypes ? kValueTypeNames[index] : "?";
}

bool GgufValue::is_integer() const {
  switch (type()) {
    case GgufValueType::kUint8:
    case GgufValueType::kInt8:
    case GgufValueType::kUint16:
    case GgufValueType::kInt16:
    case GgufValueType::kUint32:
    case GgufValueType::kInt32:
    case GgufValueType::kUint64:
    case GgufValueType::kInt64:
      return true;
    default:
      return false;
  }
}

bool GgufValue::as_int64(int64_t* out) const {
  if (!is_integer()) return false;
  if (const auto* u = std::get_if<uint64_t>(&value)) {
    if (*u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
    *out = static_cast<int64_t>(*u);
    return true;
  }
  std::visit(
      [out](const auto& v) {
        using T = std::decay_t<decltype(v)>;
        if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
          *out = static_cast<int64_t>(v);
        }
      },
      value);
  return true;
}

bool GgufValue::as_double(double* out) const {
  if (const auto* f = std::get_if<float>(&value)) {
    *out = *f;
    return true;
  }
  if (const auto* d = std::get_if<double>(&value)) {
    *out = *d;
    return true;
  }
  return false;
}

int64_t GgufTensor::numel() const {
  int64_t n = 1;
  for (int64_t extent : dims) n *= extent;
  return n;
}

std::vector<int64_t> GgufTensor::shape() const { return {dims.rbegin(), dims.rend()}; }

uint64_t GgufTensor::row_bytes() const {
  const GgmlTypeInfo& info = ggml_type_info(type);
  return static_cast<uint64_t>(row_length()) / info.block_size * info.type_size;
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::open(const std::filesystem::path& path) {
  std::unique_ptr<GgufFile> file(new GgufFile());
  file->path_ = path;
  if (absl::Status status = map_file(path, &file->mapping_, &file->size_); !status.ok()) {
    return status;
  }
  if (absl::Status status = file->parse(); !status.ok()) return status;
  return file;
}

GgufFile::~GgufFile() {
  if (mapping_ != nullptr) ::munmap(mapping_, size_);
}

absl::Status GgufFile::parse() {
  const auto* bytes = static_cast<const uint8_t*>(mapping_);
  Cursor in(bytes, size_, path_.string());

  uint32_t magic = 0;
  if (absl::Status status = in.read(&magic, "the magic"); !status.ok()) return status;
  if (magic != kMagic) {
    std::string seen;
    for (int i = 0; i < 4; ++i) {
      const char c = static_cast<char>(magic >> (8 * i));
      seen += (c >= 0x20 && c < 0x7f) ? std::string(1, c)
                                      : absl::StrCat("\\x", absl::Hex(c & 0xff, absl::kZeroPad2));
    }
    return in.error(absl::StrCat("bad magic '", seen, "': not a GGUF file"));
  }
  if (absl::Status status = in.read(&version_, "the version"); !status.ok()) return status;
  if (version_ != 2 && version_ != 3) {
    std::string hint;
    if ((version_ & 0xffff) == 0) hint = " (a big-endian file? megaserve reads little-endian only)";
    if (version_ == 1) hint = " (GGUF v1 used 32-bit counts; convert it with a newer llama.cpp)";
    return in.error(
        absl::StrCat("unsupported GGUF version ", version_, hint, "; versions 2 and 3 are read"));
  }
  uint64_t tensor_count = 0;
  uint64_t kv_count = 0;
  // A tensor info takes at least 24 bytes (name length, n_dims, type, offset); a key/value
  // at least 13 (key length, value type, one byte of value).
  if (absl::Status status = in.read_count(24, &tensor_count, "the tensor count"); !status.ok()) {
    return status;
  }
  if (absl::Status status = in.read_count(13, &kv_count, "the metadata count"); !status.ok()) {
    return status;
  }

  for (uint64_t i = 0; i < kv_count; ++i) {
    std::string key;
    if (absl::Status status = in.read_string(&key, absl::StrCat("metadata key #", i));
        !status.ok()) {
      return status;
    }
    const std::string what = absl::StrCat("metadata '", key, "'");
    GgufValueType type;
    if (absl::Status status = read_value_type(in, &type, what); !status.ok()) return status;
    GgufValue value;
    if (absl::Status status = read_value(in, type, 0, &value, what); !status.ok()) return status;
    if (!metadata_.emplace(key, std::move(value)).second) {
      return in.error(absl::StrCat("metadata key '", key, "' appears more than once"));
    }
  }

  if (const GgufValue* alignment = find_metadata("general.alignment"); alignment != nullptr) {
    const auto* value = std::get_if<uint32_t>(&alignment->value);
    if (value == nullptr) {
      return in.error(absl::StrCat("general.alignment is ", gguf_value_type_name(alignment->type()),
                                   ", must be UINT32"));
    }
    if (!is_power_of_two(*value)) {
      return in.error(
          absl::StrCat("general.alignment ", *value, " is not a non-zero power of two"));
    }
    alignment_ = *value;
  } else {
    alignment_ = kDefaultAlignment;
  }

  tensors_.resize(tensor_count);
  for (uint64_t i = 0; i < tensor_count; ++i) {
    GgufTensor& tensor = tensors_[i];
    if (absl::Status status = in.read_string(&tensor.name, absl::StrCat("tensor info #", i));
        !status.ok()) {
      return status;
    }
    const std::string what = absl::StrCat("tensor '", tensor.name, "'");
    uint32_t n_dims = 0;
    if (absl::Status status = in.read(&n_dims, what); !status.ok()) return status;
    if (n_dims > kMaxDims) {
      return in.error(absl::StrCat(what, " has ", n_dims, " dimensions; at most ", kMaxDims));
    }
    uint64_t numel = 1;
    bool overflow = false;
    for (uint32_t d = 0; d < n_dims; ++d) {
      uint64_t extent = 0;
      if (absl::Status status = in.read(&extent, what); !status.ok()) return status;
      if (extent > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) overflow = true;
      overflow |= __builtin_mul_overflow(numel, extent, &numel);
      tensor.dims.push_back(static_cast<int64_t>(extent));
    }
    if (overflow || numel > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return in.error(absl::StrCat(what, " has more than 2^63 elements"));
    }
    uint32_t raw_type = 0;
    if (absl::Status status = in.read(&raw_type, what); !status.ok()) return status;
    const GgmlTypeInfo* info = ggml_type_info(raw_type);
    if (info == nullptr) {
      return in.error(absl::StrCat(what, " has unknown tensor type ", raw_type));
    }
    tensor.type = info->type;
    if (absl::Status status = in.read(&tensor.offset, what); !status.ok()) return status;
    if (tensor.row_length() % info->block_size != 0) {
      return in.error(absl::StrCat(what, " of type ", info->name, " has rows of ",
                                   tensor.row_length(), " elements, not a multiple of its ",
                                   info->block_size, "-element block"));
    }
    // numel / block_size blocks of type_size bytes; numel < 2^63, so this fits unless huge.
    if (__builtin_mul_overflow(numel / info->block_size, static_cast<uint64_t>(info->type_size),
                               &tensor.num_bytes)) {
      return in.error(absl::StrCat(what, " needs more than 2^64 bytes"));
    }
    if (tensor.offset % alignment_ != 0) {
      return in.error(absl::StrCat(what, " has data offset ", tensor.offset,
                                   ", not a multiple of the alignment ", alignment_));
    }
    if (!tensor_index_.emplace(tensor.name, i).second) {
      return in.error(absl::StrCat("tensor name '", tensor.name, "' appears more than once"));
    }
  }

  // The data section starts at the next multiple of the alignment.
  const uint64_t end_of_infos = in.position();
  data_offset_ = (end_of_infos + alignment_ - 1) / alignment_ * alignment_;
  for (GgufTensor& tensor : tensors_) {
    uint64_t end = 0;
    if (__builtin_add_overflow(data_offset_, tensor.offset, &end) ||
        __builtin_add_overflow(end, tensor.num_bytes, &end) || end > size_) {
      return in.error(absl::StrCat("tensor '", tensor.name, "' data [", tensor.offset, ", +",
                                   tensor.num_bytes, ") at data section offset ", data_offset_,
                                   " runs past the end of the file (", size_,
                                   " bytes; truncated file?)"));
    }
    tensor.data = bytes + data_offset_ + tensor.offset;
  }

  // No two tensors may share bytes: sort by position and compare neighbours.
  std::vector<const GgufTensor*> by_offset;
  for (const GgufTensor& tensor : tensors_) {
    if (tensor.num_bytes > 0) by_offset.push_back(&tensor);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const GgufTensor* a, const GgufTensor* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const GgufTensor& previous = *by_offset[i - 1];
    if (by_offset[i]->offset < previous.offset + previous.num_bytes) {
      return in.error(absl::StrCat("tensor '", by_offset[i]->name, "' (data offset ",
                                   by_offset[i]->offset, ") overlaps tensor '", previous.name,
                                   "' (data offset ", previous.offset, ", ", previous.num_bytes,
                                   " bytes)"));
    }
  }
  return absl::OkStatus();
}

const GgufValue* GgufFile::find_metadata(std::string_view key) const {
  auto it = metadata_.find(key);
  return it == metadata_.end() ? nullptr : &it->second;
}

const GgufTensor* GgufFile::find_tensor(std::string_view name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

absl::StatusOr<const GgufValue*> GgufFile::require(std::string_view key) const {
  const GgufValue* value = find_metadata(key);
  if (value == nullptr) {
    return absl::NotFoundError(
        absl::StrCat(path_.string(), ": no metadata key '", std::string(key), "'"));
  }
  return value;
}

absl::Status GgufFile::wrong_type(std::string_view key, const GgufValue& value,
                                  std::string_view expected) const {
  std::string type = gguf_value_type_name(value.type());
  if (const auto* array = std::get_if<GgufArray>(&value.value)) {
    absl::StrAppend(&type, " of ", gguf_value_type_name(array->element_type));
  }
  return absl::InvalidArgumentError(absl::StrCat(path_.string(), ": metadata '", std::string(key),
                                                 "' is ", type, ", expected ",
                                                 std::string(expected)));
}

absl::StatusOr<int64_t> GgufFile::get_int(std::string_view key) const {
  absl::StatusOr<const GgufValue*> value = require(key);
  if (!value.ok()) return value.status();
  int64_t out = 0;
  if (!(*value)->as_int64(&out)) return wrong_type(key, **value, "an integer below 2^63");
  return out;
}

absl::StatusOr<double> GgufFile::get_float(std::string_view key) const {
  absl::StatusOr<const GgufValue*> value = require(key);
  if (!value.ok()) return value.status();
  double out = 0;
  if (!(*value)->as_double(&out)) return wrong_type(key, **value, "FLOAT32 or FLOAT64");
  return out;
}

absl::StatusOr<bool> GgufFile::get_bool(std::string_view key) const {
  absl::StatusOr<const GgufValue*> value = require(key);
  if (!value.ok()) return value.status();
  const auto* out = std::get_if<bool>(&(*value)->value);
  if (out == nullptr) return wrong_type(key, **value, "BOOL");
  return *out;
}

absl::StatusOr<std::string> GgufFile::get_string(std::string_view key) const {
  absl::StatusOr<const GgufValue*> value = require(key);
  if (!value.ok()) return value.status();
  const auto* out = std::get_if<std::string>(&(*value)->value);
  if (out == nullptr) return wrong_type(key, **value, "STRING");
  return *out;
}

absl::StatusOr<std::vector<std::string>> GgufFile::get_string_array(std::string_view key) const {
  absl::StatusOr<const GgufValue*> value = require(key);
  if (!value.ok()) return value.status();
  const auto* array = std::get_if<GgufArray>(&(*value)->value);
  if (array == nullptr || array->element_type != GgufValueType::kString) {
    return wrong_type(key, **value, "ARRAY of STRING");
  }
  std::vector<std::string> out;
  out.reserve(array->elements.size());
  for (const GgufValue& element : array->elements)
    out.push_back(std::get<std::string>(element.value));
  return out;
}

absl::StatusOr<std::vector<int64_t>> GgufFile::get_int_array(std::string_view key) const {
  absl::StatusOr<const GgufValue*> value = require(key);
  if (!value.ok()) return value.status();
  const auto* array = std::get_if<GgufArray>(&(*value)->value);
  if (array == nullptr) return wrong_type(key, **value, "ARRAY of integers");
  std::vector<int64_t> out(array->elements.size());
  for (size_t i = 0; i < out.size(); ++i) {
    if (!array->elements[i].as_int64(&out[i])) {
      return wrong_type(key, **value, "ARRAY of integers below 2^63");
    }
  }
  return out;
}

}  // namespace megaserve::engine
