#include "engine/model/mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"

namespace megaserve::engine {

absl::Status map_file(const std::filesystem::path& path, void** mapping, size_t* size) {
  *mapping = nullptr;
  *size = 0;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    std::string message = absl::StrCat(path.string(), ": cannot open: ", std::strerror(err));
    return err == ENOENT ? absl::NotFoundError(message) : absl::PermissionDeniedError(message);
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path.string(), ": not a regular file"));
  }
  *size = static_cast<size_t>(st.st_size);
  if (*size > 0) {
    void* m = ::mmap(nullptr, *size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (m == MAP_FAILED) {
      int err = errno;
      ::close(fd);
      *size = 0;
      return absl::InternalError(
          absl::StrCat(path.string(), ": mmap failed: ", std::strerror(err)));
    }
    *mapping = m;
  }
  ::close(fd);  // the mapping keeps the file alive
  return absl::OkStatus();
}

}  // namespace megaserve::engine
