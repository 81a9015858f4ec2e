// A child process for tests that run the real binaries: started with its stdout and stderr
// going to a file, signalled, waited for, and killed if the test leaves it running.
#pragma once

#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <optional>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace megaserve::testing {

class Subprocess {
 public:
  Subprocess(const std::vector<std::string>& argv, const std::string& log_file)
      : log_file_(log_file) {
    pid_ = fork();
    if (pid_ == 0) {
      FILE* log = std::fopen(log_file.c_str(), "w");
      if (log != nullptr) {
        dup2(fileno(log), STDOUT_FILENO);
        dup2(fileno(log), STDERR_FILENO);
      }
      std::vector<char*> args;
      for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      execv(args[0], args.data());
      _exit(127);
    }
  }
  ~Subprocess() {
    if (pid_ > 0 && !exit_code_) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }

  pid_t pid() const { return pid_; }
  std::string log() const {
    std::ifstream in(log_file_);
    std::ostringstream text;
    text << in.rdbuf();
    return text.str();
  }
  void signal(int sig) { kill(pid_, sig); }

  // The first capture group of `pattern` in the log, waiting up to `timeout` for it.
  std::optional<std::string> wait_for_log(const std::regex& pattern,
                                          std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      const std::string text = log();
      std::smatch match;
      if (std::regex_search(text, match, pattern)) return match[1].str();
      if (exited()) return std::nullopt;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return std::nullopt;
  }

  // The exit code once the process ended within `timeout` (-signal when killed by one).
  std::optional<int> wait(std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!exited()) {
      if (std::chrono::steady_clock::now() >= deadline) return std::nullopt;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return exit_code_;
  }

 private:
  bool exited() {
    if (exit_code_) return true;
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
      return true;
    }
    return false;
  }

  std::string log_file_;
  pid_t pid_ = -1;
  std::optional<int> exit_code_;
};

}  // namespace megaserve::testing
