// Where the shared test assets are (../shared/assets beside the project, or
// $MEGASERVE_ASSETS_DIR), and how a test that needs them behaves when they are missing:
// under CI=true it fails, elsewhere it is skipped with a message saying why.
#pragma once

#include <filesystem>
#include <string>

#include "gtest/gtest.h"

namespace megaserve::testing {

std::filesystem::path assets_dir();
// True when CI=true is set in the environment.
bool running_in_ci();
// Reads a whole file; fails the test (ADD_FAILURE) and returns "" when it cannot.
std::string read_file(const std::filesystem::path& path);

}  // namespace megaserve::testing

// Use at the top of a test body: fails under CI, skips elsewhere, when `relative` (a path
// under the assets folder) does not exist.
#define MEGASERVE_REQUIRE_ASSET(relative)                                               \
  do {                                                                                  \
    const auto asset_path_ = ::megaserve::testing::assets_dir() / (relative);            \
    if (!std::filesystem::exists(asset_path_)) {                                        \
      if (::megaserve::testing::running_in_ci()) {                                      \
        FAIL() << "missing test asset " << asset_path_ << " (CI=true: assets required)"; \
      }                                                                                 \
      GTEST_SKIP() << "test asset " << asset_path_ << " not present";                   \
    }                                                                                   \
  } while (0)
