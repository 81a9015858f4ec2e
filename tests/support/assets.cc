#include "tests/support/assets.h"

#include <cstdlib>
#include <fstream>
#include <sstream>

namespace megaserve::testing {

std::filesystem::path assets_dir() {
  if (const char* dir = std::getenv("MEGASERVE_ASSETS_DIR"); dir != nullptr && *dir != '\0') {
    return dir;
  }
  return std::filesystem::path(MEGASERVE_DEFAULT_ASSETS_DIR);
}

bool running_in_ci() {
  const char* ci = std::getenv("CI");
  return ci != nullptr && std::string(ci) == "true";
}

std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    ADD_FAILURE() << "cannot read " << path;
    return "";
  }
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace megaserve::testing
