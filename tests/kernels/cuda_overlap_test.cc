// The CUDA backend with a step in flight (CudaBackend::submit/collect, driven by a
// StepRunner): step N+1 is uploaded and posted while step N runs, and its
// kTokenFromPreviousStep inputs are read on the device from N's samples. Over thousands of
// stories260K steps with changing batches (arrivals, chunked prefills, departures; greedy, seeded
// temperature draws, top-k with a repetition penalty, banned ids for the first tokens), the
// overlapped backend must give exactly the tokens of the synchronous one (execute per step),
// persistent and one launch per step. A stuck step with another in flight must fail within the
// watchdog, never hang.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <deque>
#include <map>
#include <random>
#include <sstream>
#include <vector>

#include "engine/cuda/cuda_backend.h"
#include "engine/engine.h"
#include "engine/model/model_config.h"
#include "engine/model/weights.h"
#include "engine/step_runner.h"
#include "gtest/gtest.h"
#include "tests/kernels/gpu_test_util.h"
#include "tests/support/assets.h"

namespace megaserve::engine {
namespace {

constexpr const char* kModel = "models/stories260K-hf/config.json";
constexpr int32_t kBlock = 16;

struct Model {
  ModelConfig config;
  ModelWeights weights;
};

Model load_stories() {
  Model m;
  const auto dir = testing::assets_dir() / "models/stories260K-hf";
  auto c = load_model_config(dir);
  EXPECT_TRUE(c.ok()) << c.status();
  if (!c.ok()) return m;
  m.config = *c;
  auto w = load_weights(dir, m.config, DType::kBF16);
  EXPECT_TRUE(w.ok()) << w.status();
  if (w.ok()) m.weights = std::move(*w);
  return m;
}

// A request of the scripted workload: its prompt fed in chunks, then one decode per step
// (input kTokenFromPreviousStep) until max_tokens are sampled. Every running request runs
// in every step, so the plans never depend on sampled values and both backends get the
// same sequence of plans.
struct Scripted {
  uint64_t id = 0;
  const std::vector<int32_t>* prompt = nullptr;  // in Workload::prompts
  int chunk = 1;
  int max_tokens = 1;
  scheduler::SamplingParams sampling;
  int banned_until = 0;  // ids 0..3 banned for the first banned_until tokens
  std::vector<int32_t> blocks;
  int fed = 0, sampled = 0;
};

// The plans of a whole run, and the prompts their spans point into.
struct Workload {
  std::vector<scheduler::StepPlan> plans;
  std::deque<std::vector<int32_t>> prompts;  // a deque: elements never move
  int32_t num_blocks = 4096;
};

// Requests arrive at random (up to max_running at once), with varied sampling; `steps`
// plans in all.
Workload make_workload(int steps, int vocab, uint32_t seed) {
  Workload w;
  std::mt19937 rng(seed);
  std::vector<int32_t> free_blocks;
  for (int32_t b = w.num_blocks - 1; b >= 0; --b) free_blocks.push_back(b);
  const std::vector<int32_t> banned = {0, 1, 2, 3};
  std::vector<Scripted> running;
  std::vector<scheduler::StepPlan> plans;
  uint64_t next_id = 1;
  for (int step = 0; step < steps; ++step) {
    const int max_running = step % 400 < 200 ? 6 : 40;  // small and large batches in turn
    while (static_cast<int>(running.size()) < max_running && rng() % 3 == 0) {
      Scripted r;
      r.id = next_id++;
      std::vector<int32_t>& prompt = w.prompts.emplace_back(1 + rng() % 70);
      for (auto& t : prompt) t = static_cast<int32_t>(rng() % vocab);
      r.prompt = &prompt;
      r.chunk = 1 + rng() % 40;
      r.max_tokens = 1 + rng() % 60;
      r.sampling.seed = rng();
      // Penalized and banned rows arrive only in every other window of 300 steps, so that
      // long stretches (small and large batches) run without them.
      const bool penalties = step % 600 >= 300;
      switch (rng() % (penalties ? 6 : 4)) {
        case 0:
        case 1:
          r.sampling.temperature = 0.0f;
          break;
        case 2:
        case 3:
          r.sampling.temperature = 0.7f + 0.1f * (rng() % 6);
          break;
        case 4:
          r.sampling.temperature = 1.0f;
          r.sampling.top_k = 1 + rng() % 20;
          r.sampling.repetition_penalty = 1.2f;
          break;
        default:
          r.sampling.temperature = 0.9f;
          r.banned_until = 1 + rng() % 3;
          break;
      }
      running.push_back(std::move(r));
    }
    scheduler::StepPlan plan;
    plan.step_id = step + 1;
    plan.kv_block_size = kBlock;
    for (Scripted& r : running) {
      scheduler::StepRequest sr;
      sr.request_id = r.id;
      sr.first_position = r.fed;
      const int prompt_left = static_cast<int>(r.prompt->size()) - r.fed;
      if (prompt_left > 0) {
        const int n = std::min(prompt_left, r.chunk);
        sr.token_ids.assign(r.prompt->begin() + r.fed, r.prompt->begin() + r.fed + n);
      } else {
        sr.token_ids = {scheduler::kTokenFromPreviousStep};
      }
      r.fed += sr.num_tokens();
      while (static_cast<int>(r.blocks.size()) * kBlock < r.fed) {
        r.blocks.push_back(free_blocks.back());
        free_blocks.pop_back();
      }
      sr.block_table = r.blocks;
      sr.sample = r.fed >= static_cast<int>(r.prompt->size());
      sr.sampling = r.sampling;
      sr.seed = *r.sampling.seed;
      sr.prompt_token_ids = *r.prompt;
      if (sr.sample) {
        sr.output_token_index = r.sampled;
        if (r.sampled < r.banned_until) sr.banned_token_ids = banned;
        ++r.sampled;
      }
      plan.requests.push_back(std::move(sr));
    }
    // Finished requests leave after their last sampling step; their blocks return.
    std::vector<Scripted> still;
    for (Scripted& r : running) {
      if (r.sampled >= r.max_tokens) {
        for (int32_t b : r.blocks) free_blocks.push_back(b);
      } else {
        still.push_back(std::move(r));
      }
    }
    running = std::move(still);
    w.plans.push_back(std::move(plan));
  }
  return w;
}

std::unique_ptr<CudaBackend> make_backend(const Model& m, int32_t num_blocks, bool persistent) {
  CudaBackendOptions o;
  o.kv_block_size = kBlock;
  o.num_kv_blocks = num_blocks;
  o.persistent = persistent;
  o.step_watchdog_ms = 20000;
  auto b = CudaBackend::create(m.config, m.weights, o);
  EXPECT_TRUE(b.ok()) << b.status();
  return b.ok() ? *std::move(b) : nullptr;
}

using Tokens = std::vector<std::vector<scheduler::SampledToken>>;  // per step

Tokens run_synchronous(StepRunner& runner, const Workload& w) {
  Tokens out;
  for (const auto& plan : w.plans) {
    auto o = runner.execute(plan);
    EXPECT_TRUE(o.ok()) << "step " << plan.step_id << ": " << o.status();
    if (!o.ok()) break;
    out.push_back(std::move(o->sampled));
  }
  return out;
}

// One step in flight while the next is submitted, as the engine's overlapped loop does.
Tokens run_overlapped(CudaBackend& b, StepRunner& runner, const Workload& w) {
  Tokens out;
  for (size_t i = 0; i <= w.plans.size(); ++i) {
    if (i < w.plans.size()) {
      const absl::Status s = runner.submit(w.plans[i]);
      EXPECT_TRUE(s.ok()) << "step " << w.plans[i].step_id << ": " << s;
      if (!s.ok()) break;
    }
    if (i == 0) continue;
    auto o = runner.collect();
    EXPECT_TRUE(o.ok()) << "collect " << i << ": " << o.status();
    if (!o.ok()) break;
    EXPECT_EQ(o->step_id, w.plans[i - 1].step_id);
    out.push_back(std::move(o->sampled));
  }
  EXPECT_EQ(b.steps_in_flight(), 0);
  EXPECT_EQ(runner.steps_in_flight(), 0);
  return out;
}

void compare_overlapped(int steps, bool check_posts) {
  const Model m = load_stories();
  const Workload w = make_workload(steps, m.config.vocab_size, 17);
  // A step can be posted while the one before runs unless a row's penalty needs the token
  // that step samples (output_token_ids, empty here, lack it at the first output token).
  int64_t rows = 0, forwarded = 0, overlappable = 0;
  for (size_t i = 0; i < w.plans.size(); ++i) {
    bool waits = i == 0;
    for (const auto& r : w.plans[i].requests) {
      rows += r.sample;
      forwarded += r.token_ids[0] == scheduler::kTokenFromPreviousStep;
      waits |= r.sample && r.sampling.repetition_penalty != 1.0f && r.output_token_index == 1;
    }
    overlappable += !waits;
  }
  Tokens want;
  {
    auto sync = make_backend(m, w.num_blocks, true);
    ASSERT_NE(sync, nullptr);
    StepRunner sync_runner(m.config, *sync);
    want = run_synchronous(sync_runner, w);
    EXPECT_EQ(sync->overlapped_posts(), 0);
  }
  ASSERT_EQ(want.size(), w.plans.size());
  for (bool persistent : {true, false}) {
    auto b = make_backend(m, w.num_blocks, persistent);
    ASSERT_NE(b, nullptr);
    StepRunner runner(m.config, *b);
    const auto t0 = std::chrono::steady_clock::now();
    const Tokens got = run_overlapped(*b, runner, w);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ASSERT_EQ(got.size(), want.size()) << (persistent ? "persistent" : "per-step");
    int64_t mismatches = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      ASSERT_EQ(got[i].size(), want[i].size()) << "step " << i;
      for (size_t k = 0; k < want[i].size(); ++k) {
        EXPECT_EQ(got[i][k].request_id, want[i][k].request_id);
        if (got[i][k].token_id != want[i][k].token_id && ++mismatches <= 5) {
          ADD_FAILURE() << (persistent ? "persistent" : "per-step") << " step " << i << " row " << k
                        << ": " << got[i][k].token_id << " vs " << want[i][k].token_id;
        }
      }
    }
    EXPECT_EQ(mismatches, 0);
    // Every step that could be posted while the one before ran was, but those that needed
    // bigger buffers (a reallocation waits for the device).
    EXPECT_LE(b->overlapped_posts(), overlappable);
    if (check_posts) {
      EXPECT_GE(b->overlapped_posts(), overlappable * 9 / 10);
    }
    std::printf(
        "[ overlap %s ] %zu steps, %lld rows, %lld inputs from the step before, "
        "%lld of %lld possible posts overlapped, %.3f s\n",
        persistent ? "persistent" : "per-step", w.plans.size(), static_cast<long long>(rows),
        static_cast<long long>(forwarded), static_cast<long long>(b->overlapped_posts()),
        static_cast<long long>(overlappable), s);
  }
}

TEST(CudaOverlap, OverlappedStepsGiveTheSynchronousTokens) {
  MEGASERVE_REQUIRE_GPU();
  MEGASERVE_REQUIRE_ASSET(kModel);
  compare_overlapped(3000, true);
}

// The same over a few steps, for compute-sanitizer (scripts/gpu-suite).
TEST(CudaOverlap, ShortOverlappedRun) {
  MEGASERVE_REQUIRE_GPU();
  MEGASERVE_REQUIRE_ASSET(kModel);
  compare_overlapped(40, false);
}

// A step whose waits can never be satisfied, posted behind a running good step or with a
// good step posted behind it, fails collect() within the watchdog in both launch modes; the
// good step before it completes; later calls fail; destroying the backend does not hang.
TEST(CudaOverlap, WatchdogWithAStepInFlight) {
  MEGASERVE_REQUIRE_GPU();
  MEGASERVE_REQUIRE_ASSET(kModel);
  const Model m = load_stories();
  for (bool persistent : {true, false}) {
    for (bool stuck_first : {false, true}) {
      const char* what = persistent ? (stuck_first ? "persistent, stuck first" : "persistent")
                                    : (stuck_first ? "per-step, stuck first" : "per-step");
      CudaBackendOptions o;
      o.kv_block_size = kBlock;
      o.num_kv_blocks = 8;
      o.persistent = persistent;
      o.step_watchdog_ms = 300;
      auto b = CudaBackend::create(m.config, m.weights, o);
      ASSERT_TRUE(b.ok()) << b.status();
      StepRunner runner(m.config, **b);
      scheduler::StepPlan plan;
      plan.kv_block_size = kBlock;
      scheduler::StepRequest r;
      r.request_id = 1;
      r.token_ids = {1, 2, 3};
      r.block_table = {0};
      r.sample = true;
      r.sampling.temperature = 0.0f;
      plan.requests.push_back(r);
      // Two good steps first: both slots get their buffers, so that the steps below are
      // posted without waiting (a reallocation would wait for the stuck step at submit).
      for (int i = 0; i < 2; ++i) {
        plan.step_id = i + 1;
        auto out = runner.execute(plan);
        ASSERT_TRUE(out.ok()) << what << ": " << out.status();
        plan.requests[0].first_position += plan.requests[0].num_tokens();
        plan.requests[0].token_ids = {scheduler::kTokenFromPreviousStep};
      }
      const auto t0 = std::chrono::steady_clock::now();
      if (stuck_first) runner.builder().set_barrier_origin(1u << 20);
      plan.step_id = 3;
      ASSERT_TRUE(runner.submit(plan).ok()) << what;
      plan.step_id = 4;
      plan.requests[0].first_position += 1;
      if (!stuck_first) runner.builder().set_barrier_origin(1u << 20);
      ASSERT_TRUE(runner.submit(plan).ok()) << what;
      EXPECT_EQ((*b)->steps_in_flight(), 2);
      EXPECT_EQ((*b)->overlapped_posts(), 1) << what;  // the second was posted at once
      auto first = runner.collect();
      absl::Status failure = first.status();
      if (!stuck_first) {
        ASSERT_TRUE(first.ok()) << what << ": " << first.status();
        failure = runner.collect().status();
      }
      const double seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      EXPECT_EQ(failure.code(), absl::StatusCode::kDeadlineExceeded) << what << ": " << failure;
      EXPECT_LT(seconds, 5.0) << what;
      EXPECT_EQ(runner.collect().status().code(), absl::StatusCode::kFailedPrecondition) << what;
      EXPECT_EQ(runner.submit(plan).code(), absl::StatusCode::kFailedPrecondition) << what;
    }
  }
}

// The engine loop over the CUDA backend, overlapped (one step in flight) and not: 40
// concurrent stories260K requests with greedy, seeded, top-k + penalty and stop-token
// sampling, a tight token budget (chunked prefills beside decodes) give the same tokens and
// finish reasons.
std::vector<std::vector<int32_t>> run_engine(const Model& m, bool overlap,
                                             std::vector<FinishReason>* reasons) {
  auto backend = make_backend(m, 512, true);
  EngineOptions o;
  o.overlap_scheduling = overlap;
  o.max_num_batched_tokens = 64;
  auto engine = Engine::create(m.config, std::move(backend), o);
  EXPECT_TRUE(engine.ok()) << engine.status();
  // Stop ids: the three most frequent ids of the greedy oracle text.
  std::istringstream oracle(
      testing::read_file(testing::assets_dir() / "models/stories260K/oracle/bos_t0_n200_ids.txt"));
  std::map<int32_t, int> counts;
  for (int32_t id; oracle >> id;) ++counts[id];
  std::vector<std::pair<int, int32_t>> by_count;
  for (const auto& [id, n] : counts) by_count.push_back({n, id});
  std::sort(by_count.rbegin(), by_count.rend());
  std::vector<int32_t> stop_ids;
  for (size_t k = 0; k < 3 && k < by_count.size(); ++k) stop_ids.push_back(by_count[k].second);
  std::mt19937 rng(5);
  std::vector<std::shared_ptr<RequestOutput>> outputs;
  for (int i = 0; i < 40; ++i) {
    GenerateRequest r;
    r.prompt_token_ids.assign(1 + rng() % 40, 1);
    for (size_t k = 1; k < r.prompt_token_ids.size(); ++k) {
      r.prompt_token_ids[k] = static_cast<int32_t>(3 + rng() % (m.config.vocab_size - 3));
    }
    r.sampling.max_tokens = 5 + rng() % 60;
    r.sampling.seed = 77 + i;
    r.sampling.temperature = i % 4 == 0 ? 0.0f : 0.9f;
    if (i % 4 == 2) {
      r.sampling.top_k = 8;
      r.sampling.repetition_penalty = 1.3f;
    }
    if (i % 4 == 3) r.sampling.stop_token_ids = stop_ids;
    auto out = (*engine)->submit(std::move(r));
    EXPECT_TRUE(out.ok()) << out.status();
    if (out.ok()) outputs.push_back(*out);
  }
  std::vector<std::vector<int32_t>> tokens;
  for (auto& o : outputs) {
    std::vector<int32_t>& t = tokens.emplace_back();
    for (bool done = false; !done;) {
      for (RequestEvent& e : o->wait()) {
        for (const auto& tok : e.tokens) t.push_back(tok.token_id);
        if (e.finished) {
          reasons->push_back(*e.finished);
          done = true;
        }
      }
    }
  }
  return tokens;
}

TEST(CudaOverlap, EngineOverlappedEqualsSerial) {
  MEGASERVE_REQUIRE_GPU();
  MEGASERVE_REQUIRE_ASSET(kModel);
  const Model m = load_stories();
  std::vector<FinishReason> want_reasons, got_reasons;
  const auto want = run_engine(m, false, &want_reasons);
  const auto got = run_engine(m, true, &got_reasons);
  ASSERT_EQ(got.size(), want.size());
  int stopped = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(got[i], want[i]) << "request " << i;
    EXPECT_EQ(got_reasons[i], want_reasons[i]) << "request " << i;
    EXPECT_NE(want_reasons[i], FinishReason::kError) << "request " << i;
    stopped += want_reasons[i] == FinishReason::kStop;
  }
  std::printf("[ overlap engine ] %zu requests equal, %d stopped early\n", want.size(), stopped);
}

}  // namespace
}  // namespace megaserve::engine
