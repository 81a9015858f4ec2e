#include "engine/step_capture.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "spdlog/spdlog.h"

extern char** environ;

namespace megaserve::engine {
namespace {

namespace fs = std::filesystem;

constexpr char kPlotLog[] = "trace-plot.log";

// The last `max_bytes` of a file, for a warning.
std::string file_tail(const fs::path& path, size_t max_bytes) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  const std::string all = text.str();
  return all.size() > max_bytes ? all.substr(all.size() - max_bytes) : all;
}

std::string draw_command(const TraceOptions& options, const std::vector<std::string>& traces) {
  return absl::StrCat(options.python, " ",
                      options.plot_script.empty() ? "scripts/trace-plot.py" : options.plot_script,
                      " ", absl::StrJoin(traces, " "));
}

}  // namespace

absl::Status check_trace_options(const TraceOptions& options) {
  if (options.steps < 0 || options.steps > kMaxTraceSteps) {
    return absl::InvalidArgumentError(absl::StrCat("trace_steps must be in [0, ", kMaxTraceSteps,
                                                   "] (steps to capture), got ", options.steps));
  }
  if (options.steps > 0 && options.dir.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "trace_steps ", options.steps, " needs trace_dir, the folder the traces are written to"));
  }
  return absl::OkStatus();
}

absl::Status prepare_trace_dir(const std::string& dir) {
  std::error_code error;
  fs::create_directories(dir, error);
  if (error) {
    return absl::InvalidArgumentError(
        absl::StrCat("trace_dir \"", dir, "\": cannot create it: ", error.message()));
  }
  if (!fs::is_directory(dir, error)) {
    return absl::InvalidArgumentError(absl::StrCat("trace_dir \"", dir, "\" is not a folder"));
  }
  const fs::path probe = fs::path(dir) / absl::StrCat(".megaserve-write-test-", getpid());
  const int fd = open(probe.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("trace_dir \"", dir, "\" is not writable: ", std::strerror(errno)));
  }
  close(fd);
  fs::remove(probe, error);
  return absl::OkStatus();
}

std::string find_trace_plot_script() {
  std::error_code error;
  const fs::path exe = fs::read_symlink("/proc/self/exe", error);
  if (!error) {
    const fs::path installed =
        exe.parent_path().parent_path() / "share" / "megaserve" / "trace-plot.py";
    if (fs::is_regular_file(installed, error)) return installed.lexically_normal().string();
  }
  // MEGASERVE_TRACE_PLOT_SOURCE is defined by engine/CMakeLists.txt.
  const fs::path source(MEGASERVE_TRACE_PLOT_SOURCE);
  if (fs::is_regular_file(source, error)) return source.string();
  return {};
}

std::string trace_file_path(const std::string& dir, uint64_t step_id) {
  return (fs::path(dir) / absl::StrFormat("step-%06d.trace.json", step_id)).string();
}

absl::StatusOr<std::unique_ptr<StepCapture>> StepCapture::create(const TraceOptions& options,
                                                                 std::string backend) {
  if (absl::Status s = check_trace_options(options); !s.ok()) return s;
  if (options.steps == 0) return absl::InvalidArgumentError("step capture: trace_steps is 0");
  if (absl::Status s = prepare_trace_dir(options.dir); !s.ok()) return s;
  return std::unique_ptr<StepCapture>(new StepCapture(options, std::move(backend)));
}

StepCapture::StepCapture(const TraceOptions& options, std::string backend)
    : options_(options),
      trace_options_{.backend = std::move(backend)},
      drawing_(!options.plot_script.empty()) {
  spdlog::info("trace: capturing the next {} steps into {}{}", options_.steps, options_.dir,
               drawing_ ? " (Chrome traces and PNGs)"
                        : " (Chrome traces; scripts/trace-plot.py not found, no PNGs)");
  thread_ = std::thread([this] { loop(); });
}

StepCapture::~StepCapture() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
  if (!not_drawn_.empty() && !options_.plot_script.empty()) {
    spdlog::info("trace: {} traces not drawn; to draw them: {}", not_drawn_.size(),
                 draw_command(options_, not_drawn_));
  }
}

void StepCapture::add(const Step& step, std::vector<InstructionTiming> timings) {
  StepTimeline timeline = step_timeline(step, std::move(timings));
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(std::move(timeline));
  }
  cv_.notify_all();
}

void StepCapture::flush() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [this] { return queue_.empty() && !busy_; });
}

void StepCapture::loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) break;  // stopping, nothing left
    std::vector<StepTimeline> batch = std::move(queue_);
    queue_.clear();
    busy_ = true;
    lock.unlock();
    std::vector<std::string> written;
    for (const StepTimeline& t : batch) {
      const std::string path = trace_file_path(options_.dir, t.step_id);
      if (absl::Status s = write_chrome_trace(path, t, trace_options_); !s.ok()) {
        spdlog::warn("trace: step {}: {}", t.step_id, s.ToString());
        continue;
      }
      spdlog::info("trace: step {} ({} tokens, {} instructions) -> {}", t.step_id, t.num_tokens,
                   t.instructions.size(), path);
      written.push_back(path);
    }
    lock.lock();
    const bool draw_now = drawing_ && !stop_ && !written.empty();
    lock.unlock();
    bool drawn = false;
    if (draw_now) drawn = draw(written);
    lock.lock();
    if (!drawn) not_drawn_.insert(not_drawn_.end(), written.begin(), written.end());
    if (draw_now && !drawn) drawing_ = false;
    busy_ = false;
    cv_.notify_all();
  }
}

bool StepCapture::draw(const std::vector<std::string>& traces) {
  const fs::path log = fs::path(options_.dir) / kPlotLog;
  std::vector<std::string> args = {options_.python, options_.plot_script};
  args.insert(args.end(), traces.begin(), traces.end());
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);

  // The child gets /dev/null as stdin, the log as stdout and stderr, and none of the
  // server's blocked signals (server/main.cc blocks SIGTERM and SIGINT in every thread).
  posix_spawn_file_actions_t files;
  posix_spawn_file_actions_init(&files);
  posix_spawn_file_actions_addopen(&files, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&files, 1, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(&files, 1, 2);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none;
  sigemptyset(&none);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK);
  pid_t pid = 0;
  const int spawned = posix_spawnp(&pid, argv[0], &files, &attr, argv.data(), environ);
  posix_spawnattr_destroy(&attr);
  posix_spawn_file_actions_destroy(&files);
  if (spawned != 0) {
    spdlog::warn("trace: cannot run {}: {}; no PNGs (draw them with: {})", options_.python,
                 std::strerror(spawned), draw_command(options_, traces));
    return false;
  }
  // Polled, so that a stopping engine ends a long drawing instead of waiting for it (the
  // child is not reaped before it is signalled: its pid stays ours).
  int status = 0;
  bool stopped = false;
  while (true) {
    const pid_t done = waitpid(pid, &status, WNOHANG);
    if (done == pid) break;
    if (done < 0 && errno != EINTR) {
      spdlog::warn("trace: waiting for the drawing: {}; no more PNGs", std::strerror(errno));
      return false;
    }
    bool stop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop = stop_;
    }
    if (stop && !stopped) {
      kill(pid, SIGTERM);
      stopped = true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (stopped) return false;
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    spdlog::warn(
        "trace: drawing the traces failed (python3 with matplotlib is needed: "
        "scripts/install-deps installs it); no more PNGs. {} says:\n{}",
        log.string(), file_tail(log, 2000));
    return false;
  }
  return true;
}

}  // namespace megaserve::engine
