// Abseil flag names are identifiers (--max_tokens); the peers' tools spell them with dashes
// (--max-tokens). Rewrites dashes to underscores in the name part of every --flag argument
// so both spellings work. Arguments after a bare "--" are left alone.
#pragma once

#include <string>
#include <vector>

namespace megaserve::server {

class FlagSpelling {
 public:
  FlagSpelling(int argc, char** argv) {
    bool flags_done = false;
    for (int i = 0; i < argc; ++i) {
      std::string arg = argv[i];
      if (arg == "--") flags_done = true;
      if (i > 0 && !flags_done && arg.size() > 2 && arg.rfind("--", 0) == 0) {
        const size_t end = std::min(arg.find('='), arg.size());
        for (size_t j = 2; j < end; ++j) {
          if (arg[j] == '-') arg[j] = '_';
        }
      }
      storage_.push_back(std::move(arg));
    }
    for (std::string& s : storage_) argv_.push_back(s.data());
  }
  int argc() const { return static_cast<int>(argv_.size()); }
  char** argv() { return argv_.data(); }

 private:
  std::vector<std::string> storage_;
  std::vector<char*> argv_;
};

}  // namespace megaserve::server
