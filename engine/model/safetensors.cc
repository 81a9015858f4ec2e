#include "engine/model/safetensors.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstring>
#include <set>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/model/mapped_file.h"
#include "nlohmann/json.hpp"

namespace megaserve::engine {
namespace {

using nlohmann::json;

// The reference implementation refuses headers above 100 MB; so do we, before parsing.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
constexpr int kMaxRank = 8;

struct DtypeInfo {
  SafetensorsDtype dtype;
  const char* name;
  int size;
};

constexpr DtypeInfo kDtypes[] = {
    {SafetensorsDtype::kBool, "BOOL", 1},      {SafetensorsDtype::kU8, "U8", 1},
    {SafetensorsDtype::kI8, "I8", 1},          {SafetensorsDtype::kI16, "I16", 2},
    {SafetensorsDtype::kU16, "U16", 2},        {SafetensorsDtype::kF16, "F16", 2},
    {SafetensorsDtype::kBF16, "BF16", 2},      {SafetensorsDtype::kI32, "I32", 4},
    {SafetensorsDtype::kU32, "U32", 4},        {SafetensorsDtype::kF32, "F32", 4},
    {SafetensorsDtype::kF64, "F64", 8},        {SafetensorsDtype::kI64, "I64", 8},
    {SafetensorsDtype::kU64, "U64", 8},        {SafetensorsDtype::kF8E4M3, "F8_E4M3", 1},
    {SafetensorsDtype::kF8E5M2, "F8_E5M2", 1},
};

const DtypeInfo* find_dtype(std::string_view name) {
  for (const DtypeInfo& info : kDtypes) {
    if (name == info.name) return &info;
  }
  return nullptr;
}

const DtypeInfo& dtype_info(SafetensorsDtype dtype) {
  for (const DtypeInfo& info : kDtypes) {
    if (info.dtype == dtype) return info;
  }
  return kDtypes[0];  // unreachable: every enumerator is in the table
}

// Reads a JSON number that must be a non-negative integer (JSON parsers may store it as
// signed or unsigned).
bool as_uint64(const json& value, uint64_t* out) {
  if (value.is_number_unsigned()) {
    *out = value.get<uint64_t>();
    return true;
  }
  if (value.is_number_integer() && value.get<int64_t>() >= 0) {
    *out = static_cast<uint64_t>(value.get<int64_t>());
    return true;
  }
  return false;
}

// Fills `tensor` from one header entry; `data_size` is the length of the data section.
absl::Status parse_entry(const std::string& where, const json& entry, uint64_t data_size,
                         SafetensorsTensor* tensor) {
  if (!entry.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": header entry is not an object"));
  }
  auto dtype_it = entry.find("dtype");
  auto shape_it = entry.find("shape");
  auto offsets_it = entry.find("data_offsets");
  if (dtype_it == entry.end() || !dtype_it->is_string()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": missing or non-string 'dtype'"));
  }
  const DtypeInfo* info = find_dtype(dtype_it->get_ref<const std::string&>());
  if (info == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": unknown dtype '", dtype_it->get_ref<const std::string&>(), "'"));
  }
  tensor->dtype = info->dtype;

  if (shape_it == entry.end() || !shape_it->is_array() || shape_it->size() > kMaxRank) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": 'shape' must be an array of at most ", kMaxRank, " dimensions"));
  }
  uint64_t numel = 1;
  bool overflow = false;
  for (const json& dim : *shape_it) {
    uint64_t extent = 0;
    if (!as_uint64(dim, &extent) || extent > static_cast<uint64_t>(INT64_MAX)) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": 'shape' has a dimension that is not a non-negative integer"));
    }
    tensor->shape.push_back(static_cast<int64_t>(extent));
    overflow |= __builtin_mul_overflow(numel, extent, &numel);
  }
  uint64_t expected_bytes = 0;
  overflow |= __builtin_mul_overflow(numel, static_cast<uint64_t>(info->size), &expected_bytes);

  if (offsets_it == entry.end() || !offsets_it->is_array() || offsets_it->size() != 2 ||
      !as_uint64((*offsets_it)[0], &tensor->begin) || !as_uint64((*offsets_it)[1], &tensor->end)) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": 'data_offsets' must be two non-negative integers [begin, end]"));
  }
  if (tensor->begin > tensor->end) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": data_offsets [", tensor->begin, ", ",
                                                   tensor->end, "] end before they begin"));
  }
  if (tensor->end > data_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": data_offsets [", tensor->begin, ", ", tensor->end,
        "] run past the end of the data section (", data_size, " bytes; file truncated?)"));
  }
  if (overflow || expected_bytes != tensor->num_bytes()) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": shape [", absl::StrJoin(tensor->shape, ", "), "] of ", info->name, " needs ",
        overflow ? std::string("more than 2^64") : absl::StrCat(expected_bytes), " bytes but ",
        "data_offsets hold ", tensor->num_bytes()));
  }
  return absl::OkStatus();
}

}  // namespace

const char* safetensors_dtype_name(SafetensorsDtype dtype) { return dtype_info(dtype).name; }
int safetensors_dtype_size(SafetensorsDtype dtype) { return dtype_info(dtype).size; }

int64_t SafetensorsTensor::numel() const {
  int64_t n = 1;
  for (int64_t extent : shape) n *= extent;
  return n;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::open(
    const std::filesystem::path& path) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  if (absl::Status status = map_file(path, &file->mapping_, &file->size_); !status.ok()) {
    return status;
  }
  if (absl::Status status = file->parse(); !status.ok()) return status;
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (mapping_ != nullptr) ::munmap(mapping_, size_);
}

absl::Status SafetensorsFile::parse() {
  const std::string file_name = path_.string();
  const auto* bytes = static_cast<const uint8_t*>(mapping_);
  if (size_ < 8) {
    return absl::InvalidArgumentError(absl::StrCat(
        file_name, ": ", size_, " bytes is too short for a safetensors file (truncated?)"));
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = header_len << 8 | bytes[i];  // little-endian
  if (header_len > size_ - 8) {
    return absl::InvalidArgumentError(absl::StrCat(file_name, ": header length ", header_len,
                                                   " runs past the end of the file (", size_,
                                                   " bytes; truncated?)"));
  }
  if (header_len > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(file_name, ": header length ", header_len, " exceeds ", kMaxHeaderBytes));
  }
  const auto* header_begin = reinterpret_cast<const char*>(bytes + 8);
  // A repeated tensor name would silently keep only one entry; the callback sees every key
  // of the top-level object (depth 1) and remembers the first duplicate.
  std::set<std::string> seen_keys;
  std::string duplicate_key;
  auto find_duplicates = [&](int depth, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::key && depth == 1 && parsed.is_string()) {
      const std::string& key = parsed.get_ref<const std::string&>();
      if (!seen_keys.insert(key).second && duplicate_key.empty()) duplicate_key = key;
    }
    return true;
  };
  json header;
  try {
    header = json::parse(header_begin, header_begin + header_len, find_duplicates);
  } catch (const json::parse_error& error) {
    return absl::InvalidArgumentError(
        absl::StrCat(file_name, ": header is not valid JSON: ", error.what()));
  }
  if (!duplicate_key.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(file_name, ": header names '", duplicate_key, "' more than once"));
  }
  if (!header.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(file_name, ": header is not a JSON object"));
  }

  const uint64_t data_offset = 8 + header_len;
  const uint64_t data_size = size_ - data_offset;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) {
        return absl::InvalidArgumentError(
            absl::StrCat(file_name, ": __metadata__ is not an object"));
      }
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string()) {
          return absl::InvalidArgumentError(
              absl::StrCat(file_name, ": __metadata__ value '", key, "' is not a string"));
        }
        metadata_[key] = value.get<std::string>();
      }
      continue;
    }
    SafetensorsTensor tensor;
    tensor.name = name;
    if (absl::Status status = parse_entry(absl::StrCat(file_name, ": tensor '", name, "'"), entry,
                                          data_size, &tensor);
        !status.ok()) {
      return status;
    }
    tensor.data = bytes + data_offset + tensor.begin;
    tensors_.push_back(std::move(tensor));
  }

  // No two tensors may share bytes: sort by position and compare neighbours. (Empty tensors
  // occupy no bytes and may sit anywhere.)
  std::vector<const SafetensorsTensor*> by_offset;
  for (const SafetensorsTensor& tensor : tensors_) {
    if (tensor.num_bytes() > 0) by_offset.push_back(&tensor);
  }
  std::sort(
      by_offset.begin(), by_offset.end(),
      [](const SafetensorsTensor* a, const SafetensorsTensor* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    if (by_offset[i]->begin < by_offset[i - 1]->end) {
      return absl::InvalidArgumentError(absl::StrCat(
          file_name, ": tensor '", by_offset[i]->name, "' (bytes ", by_offset[i]->begin, "..",
          by_offset[i]->end, ") overlaps tensor '", by_offset[i - 1]->name, "' (bytes ",
          by_offset[i - 1]->begin, "..", by_offset[i - 1]->end, ")"));
    }
  }
  // json objects iterate in key order already; keep that invariant explicit for find().
  std::sort(tensors_.begin(), tensors_.end(),
            [](const SafetensorsTensor& a, const SafetensorsTensor& b) { return a.name < b.name; });
  return absl::OkStatus();
}

const SafetensorsTensor* SafetensorsFile::find(std::string_view name) const {
  auto it = std::lower_bound(
      tensors_.begin(), tensors_.end(), name,
      [](const SafetensorsTensor& tensor, std::string_view key) { return tensor.name < key; });
  if (it == tensors_.end() || it->name != name) return nullptr;
  return &*it;
}

}  // namespace megaserve::engine
