#include "engine/model/demo_model.h"

#include <cstdlib>
#include <system_error>

namespace megaserve::engine {

namespace {

bool has_demo_files(const std::filesystem::path& dir) {
  std::error_code error;
  return std::filesystem::is_regular_file(dir / "config.json", error) &&
         std::filesystem::is_regular_file(dir / "tokenizer.model", error);
}

}  // namespace

std::filesystem::path demo_model_dir() {
  if (const char* dir = std::getenv("MEGASERVE_DEMO_DIR"); dir != nullptr && *dir != '\0') {
    return dir;
  }
  std::error_code error;
  const std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", error);
  if (!error) {
    const std::filesystem::path installed =
        exe.parent_path().parent_path() / "share" / "megaserve" / "demo";
    if (has_demo_files(installed)) return installed.lexically_normal();
  }
  // MEGASERVE_DEMO_BUILD_DIR is defined by engine/CMakeLists.txt.
  const std::filesystem::path build_tree(MEGASERVE_DEMO_BUILD_DIR);
  if (has_demo_files(build_tree)) return build_tree;
  return {};
}

}  // namespace megaserve::engine
