// megaserve-scheduler-bench: what the scheduler costs the engine thread.
//   1. schedule() and update() per step with 1, 64, 1024 and 4096 running requests, all
//      decoding (one token each per step, a block boundary every 16 steps).
//   2. Steps per second of a randomized simulation (10,000 requests with shared prefixes,
//      EOS now and then, aborts, a cache small enough to preempt), with and without
//      overlapped scheduling. The "model" is a hash: this is the scheduler plus the driver.
// Prints numbers; it is not a test.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <memory>
#include <optional>
#include <random>
#include <vector>

#include "scheduler/scheduler.h"

namespace megaserve::scheduler {
namespace {

using Clock = std::chrono::steady_clock;

double micros_since(Clock::time_point start) {
  return std::chrono::duration<double, std::micro>(Clock::now() - start).count();
}

// CPU time of this thread: on a shared 2-core machine, wall time also counts the time other
// processes hold the core.
double thread_cpu_micros() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

double median(std::vector<double> v) {
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}

uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

StepOutput fake_output(const StepPlan& plan, int32_t eos_one_in) {
  StepOutput out;
  out.step_id = plan.step_id;
  out.sampled.reserve(plan.requests.size());
  for (const StepRequest& r : plan.requests) {
    if (!r.sample) continue;
    const uint64_t h = mix(r.request_id * 1000003 + r.context_length());
    const int32_t token = eos_one_in > 0 && h % eos_one_in == 0 ? 2 : 3 + h % 30000;
    out.sampled.push_back({r.request_id, token, 0.0f, {}});
  }
  return out;
}

void bench_decode_steps(int32_t num_running) {
  constexpr int32_t kPrompt = 128;
  constexpr int32_t kMeasuredSteps = 200;
  SchedulerConfig config;
  config.kv_block_size = 16;
  config.max_num_seqs = num_running;
  config.max_num_batched_tokens = std::max(num_running, 8192);
  config.max_waiting_requests = num_running;
  config.max_model_len = 4096;
  // Room for every request to grow past the measured steps; 71 blocks let one request be
  // admitted with max_tokens 1000 (admission checks its whole length).
  config.num_kv_blocks = num_running * ((kPrompt + kMeasuredSteps + 128) / 16) + 71;
  config.eos_token_ids = {2};
  auto s = *Scheduler::create(config);
  for (int32_t i = 0; i < num_running; ++i) {
    RequestSpec r;
    r.request_id = i + 1;
    r.prompt_token_ids.resize(kPrompt);
    for (int32_t p = 0; p < kPrompt; ++p) r.prompt_token_ids[p] = 3 + (i * 131 + p * 7) % 30000;
    r.sampling.max_tokens = 1000;  // none finishes while measured
    r.sampling.ignore_eos = true;
    if (!s->add_request(std::move(r)).ok()) std::abort();
  }
  // Prefill everything (chunked within the budget) until every request decodes.
  for (int guard = 0; guard < 10000; ++guard) {
    StepPlan plan = s->schedule();
    const bool all_decode = static_cast<int32_t>(plan.requests.size()) == num_running &&
                            plan.num_tokens() == num_running;
    if (!s->update(fake_output(plan, 0)).ok()) std::abort();
    if (all_decode) break;
  }
  std::vector<double> schedule_us, update_us, wall_us;
  int64_t tokens = 0;
  for (int step = 0; step < kMeasuredSteps; ++step) {
    const Clock::time_point wall = Clock::now();
    const double t0 = thread_cpu_micros();
    StepPlan plan = s->schedule();
    const double t1 = thread_cpu_micros();
    wall_us.push_back(micros_since(wall));
    schedule_us.push_back(t1 - t0);
    tokens += plan.num_tokens();
    StepOutput out = fake_output(plan, 0);
    const double t2 = thread_cpu_micros();
    if (!s->update(out).ok()) std::abort();
    update_us.push_back(thread_cpu_micros() - t2);
  }
  const double sched = median(schedule_us);
  std::printf(
      "%6d running | schedule %8.1f us/step (%5.3f us/request; wall %8.1f) | "
      "update %8.1f us/step | %.0f tokens/step\n",
      num_running, sched, sched / num_running, median(wall_us), median(update_us),
      static_cast<double>(tokens) / kMeasuredSteps);
}

void bench_random_simulation(bool overlap) {
  SchedulerConfig config;
  config.kv_block_size = 16;
  config.num_kv_blocks = 1024;  // 16k positions
  config.max_num_seqs = 128;
  config.max_num_batched_tokens = 2048;
  config.max_waiting_requests = 256;
  config.max_model_len = 4096;
  config.eos_token_ids = {2};
  auto s = *Scheduler::create(config);
  std::mt19937_64 rng(overlap ? 1 : 2);
  const auto uniform = [&](int32_t lo, int32_t hi) {
    return std::uniform_int_distribution<int32_t>(lo, hi)(rng);
  };
  std::vector<std::vector<int32_t>> shared(16);
  for (auto& p : shared) {
    p.resize(16 * uniform(2, 16));
    for (int32_t& t : p) t = uniform(3, 30000);
  }
  constexpr uint64_t kRequests = 10000;
  uint64_t next_id = 1;
  std::vector<uint64_t> live;
  std::optional<StepOutput> in_flight;
  int64_t steps = 0, tokens = 0;
  const Clock::time_point start = Clock::now();
  while (next_id <= kRequests || s->has_unfinished_requests() || in_flight) {
    for (int32_t k = uniform(0, 4); k > 0 && next_id <= kRequests; --k, ++next_id) {
      RequestSpec r;
      r.request_id = next_id;
      if (uniform(0, 1) == 0) r.prompt_token_ids = shared[uniform(0, 15)];
      for (int32_t i = uniform(1, 400); i > 0; --i) r.prompt_token_ids.push_back(uniform(3, 30000));
      r.sampling.max_tokens = uniform(1, 400);
      if (s->add_request(std::move(r)).ok()) live.push_back(next_id);
    }
    if (!live.empty() && uniform(0, 9) == 0) {
      const size_t i = uniform(0, static_cast<int32_t>(live.size()) - 1);
      s->finish(live[i], FinishReason::kAbort).IgnoreError();
      live[i] = live.back();
      live.pop_back();
    }
    StepPlan plan = s->schedule();
    tokens += plan.num_tokens();
    std::optional<StepOutput> out;
    if (!plan.requests.empty()) {
      out = fake_output(plan, 100);
      ++steps;
    }
    if (overlap) {
      if (in_flight && !s->update(*in_flight).ok()) std::abort();
      in_flight = std::move(out);
    } else if (out && !s->update(*out).ok()) {
      std::abort();
    }
  }
  const double seconds = micros_since(start) / 1e6;
  const SchedulerStats st = s->stats();
  std::printf(
      "random simulation, overlap=%d: %lld steps in %.2f s = %.0f steps/s "
      "(%.0f tokens/step, %lld preemptions, prefix hits %.1f%%)\n",
      overlap, static_cast<long long>(steps), seconds, steps / seconds,
      static_cast<double>(tokens) / steps, static_cast<long long>(st.num_preemptions),
      100.0 * st.prefix_cache_hits / std::max<int64_t>(1, st.prefix_cache_queries));
}

}  // namespace
}  // namespace megaserve::scheduler

// Usage: megaserve-scheduler-bench [N ...]  (running-request counts; default 1 64 1024 4096,
// followed by the randomized simulation).
int main(int argc, char** argv) {
  using namespace megaserve::scheduler;
  std::vector<int32_t> sizes = {1, 64, 1024, 4096};
  if (argc > 1) sizes.clear();
  for (int i = 1; i < argc; ++i) sizes.push_back(std::atoi(argv[i]));
  std::printf(
      "schedule()/update() per step: thread CPU time (and wall), median of 200 steps; "
      "every request decoding; block 16, prompt 128, prefix caching on\n");
  for (int32_t n : sizes) bench_decode_steps(n);
  if (argc > 1) return 0;
  bench_random_simulation(false);
  bench_random_simulation(true);
  return 0;
}
