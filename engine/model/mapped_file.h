// Read-only memory mapping of a whole model file, shared by the safetensors and GGUF readers.
#pragma once

#include <cstddef>
#include <filesystem>

#include "absl/status/status.h"

namespace megaserve::engine {

// Maps `path` read-only (MAP_PRIVATE): *mapping is the address (null for an empty file) and
// *size the file's size; the caller unmaps it with munmap(*mapping, *size). Errors name the file:
// NotFound, PermissionDenied (cannot open), InvalidArgument (not a regular file), Internal
// (mmap failed).
absl::Status map_file(const std::filesystem::path& path, void** mapping, size_t* size);

}  // namespace megaserve::engine
