// The engine loop with a step in flight (EngineOptions::overlap_scheduling): the backend's
// submit() and collect() are split, and step N+1 is planned and submitted before step N is
// collected and applied. A deferring backend (work happens in collect(), so a step really is
// outstanding while the next is planned) over the CPU interpreter on stories260K checks that
// outputs apply in order with the same tokens as a synchronous run, that aborts land while a
// step is in flight, and that a failure with a step in flight fails every request. The CPU
// backend itself (synchronous) must give the same tokens overlapped and not, sampling with
// seeds and penalties included.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <sstream>
#include <thread>
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "engine/engine.h"
#include "engine/model/model_config.h"
#include "engine/model/weights.h"
#include "engine/step_runner.h"
#include "gtest/gtest.h"
#include "tests/support/assets.h"

namespace megaserve::engine {
namespace {

constexpr char kModel[] = "models/stories260K-hf/config.json";

std::filesystem::path model_dir() { return testing::assets_dir() / "models/stories260K-hf"; }

std::vector<int32_t> oracle_ids(size_t n = 200) {
  std::istringstream in(
      testing::read_file(testing::assets_dir() / "models/stories260K/oracle/bos_t0_n200_ids.txt"));
  std::vector<int32_t> ids;
  for (int32_t id; in >> id;) ids.push_back(id);
  ids.resize(std::min(ids.size(), n));
  return ids;
}

std::unique_ptr<CpuBackend> make_cpu_backend(int32_t num_kv_blocks = 256) {
  auto config = load_model_config(model_dir());
  EXPECT_TRUE(config.ok()) << config.status();
  auto weights = load_weights(model_dir(), *config, DType::kF32);
  EXPECT_TRUE(weights.ok()) << weights.status();
  CpuBackendOptions o;
  o.num_sms = 2;
  o.num_kv_blocks = num_kv_blocks;
  auto backend = CpuBackend::create(*config, *std::move(weights), o);
  EXPECT_TRUE(backend.ok()) << backend.status();
  return *std::move(backend);
}

// What the deferring backend saw, shared with the test (the engine owns the backend).
struct DeferredLog {
  std::mutex mu;
  int max_in_flight = 0;
  int64_t submitted = 0;
  int64_t collected = 0;
  std::vector<uint64_t> collected_ids;
  // While set, collect() waits: the test can queue every request before any step completes.
  bool hold_collects = false;
  std::condition_variable released;

  void release() {
    {
      std::lock_guard<std::mutex> lock(mu);
      hold_collects = false;
    }
    released.notify_all();
  }
};

// submit() only queues the step (the step runner keeps it alive until it is collected);
// collect() runs the oldest on the CPU backend, after an optional delay, and can be told to
// fail at a given collect or submit while another step is in flight (a submit failure
// happens once).
class DeferringBackend final : public Backend {
 public:
  DeferringBackend(std::unique_ptr<CpuBackend> inner, std::shared_ptr<DeferredLog> log)
      : inner_(std::move(inner)), log_(std::move(log)) {}

  std::string describe() const override { return "deferring " + inner_->describe(); }
  int32_t num_kv_blocks() const override { return inner_->num_kv_blocks(); }
  int32_t kv_block_size() const override { return inner_->kv_block_size(); }
  ScheduleTarget schedule_target() const override { return inner_->schedule_target(); }
  absl::StatusOr<scheduler::StepOutput> execute(const Step& step) override {
    return inner_->execute(step);
  }
  absl::Status submit(const Step& step) override {
    std::lock_guard<std::mutex> lock(log_->mu);
    if (pending_.size() >= kMaxStepsInFlight) {
      return absl::FailedPreconditionError("deferring backend: too many steps in flight");
    }
    if (fail_submit_ > 0 && log_->submitted + 1 == fail_submit_) {
      fail_submit_ = 0;
      return absl::InternalError("deferring backend: injected submit failure");
    }
    pending_.push_back(&step);
    ++log_->submitted;
    log_->max_in_flight = std::max(log_->max_in_flight, static_cast<int>(pending_.size()));
    return absl::OkStatus();
  }
  absl::StatusOr<scheduler::StepOutput> collect() override {
    const Step* step = nullptr;
    {
      std::unique_lock<std::mutex> lock(log_->mu);
      log_->released.wait(lock, [&] { return !log_->hold_collects; });
      if (pending_.empty()) return absl::FailedPreconditionError("nothing in flight");
      if (fail_collect_ > 0 && log_->collected + 1 == fail_collect_) {
        EXPECT_EQ(pending_.size(), 2u) << "the failing step should have a successor in flight";
        return absl::InternalError("deferring backend: injected device failure");
      }
      step = pending_.front();
      pending_.pop_front();
      ++log_->collected;
      log_->collected_ids.push_back(step->step_id);
    }
    if (delay_.count() > 0) std::this_thread::sleep_for(delay_);
    return inner_->execute(*step);
  }
  int steps_in_flight() const override { return static_cast<int>(pending_.size()); }

  void set_delay(std::chrono::milliseconds d) { delay_ = d; }
  void fail_at_collect(int64_t n) { fail_collect_ = n; }
  void fail_at_submit(int64_t n) { fail_submit_ = n; }
  void hold_collects() {
    std::lock_guard<std::mutex> lock(log_->mu);
    log_->hold_collects = true;
  }

 private:
  std::unique_ptr<CpuBackend> inner_;
  std::shared_ptr<DeferredLog> log_;
  std::deque<const Step*> pending_;
  std::chrono::milliseconds delay_{0};
  int64_t fail_collect_ = 0;
  int64_t fail_submit_ = 0;
};

struct Deferred {
  Deferred() = default;
  Deferred(Deferred&&) = default;
  // A test that stops early must not leave the engine's loop waiting in a held collect().
  ~Deferred() {
    if (log) log->release();
  }

  std::unique_ptr<Engine> engine;
  std::shared_ptr<DeferredLog> log;
};

Deferred make_deferred(bool overlap, const std::function<void(DeferringBackend&)>& setup = {},
                       int32_t max_num_batched_tokens = 8192) {
  auto config = load_model_config(model_dir());
  EXPECT_TRUE(config.ok()) << config.status();
  Deferred d;
  d.log = std::make_shared<DeferredLog>();
  auto backend = std::make_unique<DeferringBackend>(make_cpu_backend(), d.log);
  if (setup) setup(*backend);
  EngineOptions o;
  o.overlap_scheduling = overlap;
  o.max_num_batched_tokens = max_num_batched_tokens;
  auto engine = Engine::create(*config, std::move(backend), o);
  EXPECT_TRUE(engine.ok()) << engine.status();
  d.engine = *std::move(engine);
  return d;
}

std::unique_ptr<Engine> make_cpu_engine(bool overlap) {
  auto config = load_model_config(model_dir());
  EXPECT_TRUE(config.ok()) << config.status();
  EngineOptions o;
  o.overlap_scheduling = overlap;
  o.max_num_batched_tokens = 48;  // chunked prefills beside decodes
  auto engine = Engine::create(*config, make_cpu_backend(), o);
  EXPECT_TRUE(engine.ok()) << engine.status();
  return *std::move(engine);
}

struct Result {
  std::vector<int32_t> tokens;
  FinishReason reason = FinishReason::kError;
  std::string error;
};

Result collect_result(RequestOutput& output) {
  Result result;
  while (true) {
    for (RequestEvent& e : output.wait()) {
      for (const auto& t : e.tokens) result.tokens.push_back(t.token_id);
      if (e.finished) {
        result.reason = *e.finished;
        result.error = e.error;
        return result;
      }
    }
  }
}

std::vector<Result> run_all(Engine& engine, const std::vector<GenerateRequest>& requests) {
  std::vector<std::shared_ptr<RequestOutput>> outputs;
  for (const auto& r : requests) {
    auto output = engine.submit(r);
    EXPECT_TRUE(output.ok()) << output.status();
    outputs.push_back(*output);
  }
  std::vector<Result> results;
  for (auto& o : outputs) results.push_back(collect_result(*o));
  return results;
}

GenerateRequest greedy(std::vector<int32_t> prompt, int max_tokens) {
  GenerateRequest r;
  r.prompt_token_ids = std::move(prompt);
  r.sampling.temperature = 0.0f;
  r.sampling.max_tokens = max_tokens;
  r.sampling.ignore_eos = true;
  return r;
}

// Prompts of BOS + slices of the oracle text; request i samples in one of several ways:
// greedy, seeded temperature, seeded with a repetition penalty (sampled on the host side of
// a GPU backend, and needing the token still in flight), top-k, and min_tokens with EOS
// and a frequent stop token allowed afterwards (finishes land while the next step is in flight).
std::vector<GenerateRequest> mixed_requests(int n) {
  const std::vector<int32_t> ids = oracle_ids();
  std::map<int32_t, int> counts;
  for (int32_t id : ids) ++counts[id];
  const int32_t common = std::max_element(counts.begin(), counts.end(), [](auto& a, auto& b) {
                           return a.second < b.second;
                         })->first;
  std::vector<GenerateRequest> requests;
  for (int i = 0; i < n; ++i) {
    std::vector<int32_t> prompt = {1};
    const int offset = (i * 37) % 120, length = 1 + (i * 13) % 50;
    prompt.insert(prompt.end(), ids.begin() + offset, ids.begin() + offset + length);
    GenerateRequest r = greedy(std::move(prompt), 6 + (i * 7) % 30);
    r.sampling.seed = 1000 + i;
    switch (i % 5) {
      case 1:
        r.sampling.temperature = 0.9f;
        break;
      case 2:
        r.sampling.temperature = 0.8f;
        r.sampling.repetition_penalty = 1.3f;
        r.sampling.frequency_penalty = 0.4f;
        break;
      case 3:
        r.sampling.temperature = 1.0f;
        r.sampling.top_k = 5;
        break;
      case 4:
        r.sampling.temperature = 1.2f;
        r.sampling.ignore_eos = false;
        r.sampling.min_tokens = 3;
        r.sampling.stop_token_ids = {common};  // the oracle text's most frequent token
        break;
      default:
        break;
    }
    requests.push_back(std::move(r));
  }
  return requests;
}

// The step runner collects the step in flight before it submits one whose penalties need
// that step's token, so while a request with penalties decodes no second step is in flight;
// a long greedy request outlives them, and its steps overlap.
TEST(EngineOverlap, DeferredStepsApplyInOrderWithTheSynchronousTokens) {
  MEGASERVE_REQUIRE_ASSET(kModel);
  std::vector<GenerateRequest> requests = mixed_requests(20);
  requests.push_back(greedy({1}, 80));
  Deferred serial = make_deferred(false, {}, 48);
  const std::vector<Result> want = run_all(*serial.engine, requests);
  Deferred overlapped = make_deferred(true, {}, 48);
  const std::vector<Result> got = run_all(*overlapped.engine, requests);
  for (size_t i = 0; i < requests.size(); ++i) {
    EXPECT_EQ(got[i].tokens, want[i].tokens) << "request " << i;
    EXPECT_EQ(got[i].reason, want[i].reason) << "request " << i;
    EXPECT_FALSE(want[i].tokens.empty());
  }
  EXPECT_EQ(serial.log->max_in_flight, 1);
  EXPECT_EQ(overlapped.log->max_in_flight, 2);  // the overlap really happened
  std::lock_guard<std::mutex> lock(overlapped.log->mu);
  EXPECT_EQ(overlapped.log->collected, overlapped.log->submitted);
  EXPECT_TRUE(
      std::is_sorted(overlapped.log->collected_ids.begin(), overlapped.log->collected_ids.end()));
  EXPECT_EQ(overlapped.engine->stats().kv_blocks_used, 0);
  EXPECT_EQ(overlapped.engine->stats().steps, overlapped.log->collected);
}

// The CPU backend runs synchronously under Backend's default submit/collect: overlapped
// scheduling must not change a token, penalties (which need the token sampled by the step
// before, missing from an overlapped plan) and seeded sampling included.
TEST(EngineOverlap, CpuBackendOverlappedEqualsSerial) {
  MEGASERVE_REQUIRE_ASSET(kModel);
  const std::vector<GenerateRequest> requests = mixed_requests(25);
  auto serial = make_cpu_engine(false);
  const std::vector<Result> want = run_all(*serial, requests);
  auto overlapped = make_cpu_engine(true);
  const std::vector<Result> got = run_all(*overlapped, requests);
  int stopped = 0;
  for (size_t i = 0; i < requests.size(); ++i) {
    EXPECT_EQ(got[i].tokens, want[i].tokens) << "request " << i;
    EXPECT_EQ(got[i].reason, want[i].reason) << "request " << i;
    stopped += want[i].reason == FinishReason::kStop;
  }
  EXPECT_GT(stopped, 0);  // some finished early, with a step for them in flight
  EXPECT_EQ(overlapped->stats().kv_blocks_used, 0);
}

TEST(EngineOverlap, AbortWhileAStepIsInFlight) {
  MEGASERVE_REQUIRE_ASSET(kModel);
  Deferred d = make_deferred(true, [](DeferringBackend& b) {
    b.set_delay(std::chrono::milliseconds(2));  // steps stay in flight long enough to abort
  });
  auto a = d.engine->submit(greedy({1}, 400));
  auto b = d.engine->submit(greedy({1}, 30));
  ASSERT_TRUE(a.ok() && b.ok());
  std::vector<RequestEvent> first = (*a)->wait();  // running, with the next step in flight
  ASSERT_FALSE(first.empty());
  ASSERT_FALSE(first.back().finished.has_value());
  d.engine->finish((*a)->request_id(), FinishReason::kAbort);
  Result ra = collect_result(**a);
  std::vector<int32_t> tokens;
  for (const RequestEvent& e : first) {
    for (const auto& t : e.tokens) tokens.push_back(t.token_id);
  }
  ra.tokens.insert(ra.tokens.begin(), tokens.begin(), tokens.end());
  const Result rb = collect_result(**b);
  EXPECT_EQ(ra.reason, FinishReason::kAbort);
  EXPECT_LT(ra.tokens.size(), 400u);
  // The tokens that did arrive are the greedy continuation: nothing from a discarded step.
  EXPECT_EQ(ra.tokens, oracle_ids(ra.tokens.size()));
  EXPECT_EQ(rb.reason, FinishReason::kLength);
  EXPECT_EQ(rb.tokens, oracle_ids(30));
  EXPECT_EQ(d.engine->stats().kv_blocks_used, 0);
  EXPECT_EQ(d.engine->stats().running, 0);
  EXPECT_EQ(d.log->max_in_flight, 2);
  EXPECT_EQ(collect_result(**d.engine->submit(greedy({1}, 5))).tokens, oracle_ids(5));
}

// A device failure seen by collect() while the next step is in flight, or by submit()
// while one is: every request fails with the error, and the engine stops admitting.
TEST(EngineOverlap, FailureWithAStepInFlightFailsEveryRequest) {
  MEGASERVE_REQUIRE_ASSET(kModel);
  for (bool at_collect : {true, false}) {
    Deferred d = make_deferred(true, [&](DeferringBackend& b) {
      b.hold_collects();  // every request is queued before the failure can come
      if (at_collect) {
        b.fail_at_collect(6);
      } else {
        b.fail_at_submit(6);
      }
    });
    std::vector<std::shared_ptr<RequestOutput>> outputs;
    for (int i = 0; i < 4; ++i) {
      auto o = d.engine->submit(greedy({1, 5 + i}, 100));
      ASSERT_TRUE(o.ok()) << o.status();
      outputs.push_back(*o);
    }
    d.log->release();
    for (auto& o : outputs) {
      const Result r = collect_result(*o);
      EXPECT_EQ(r.reason, FinishReason::kError) << (at_collect ? "collect" : "submit");
      EXPECT_NE(r.error.find("injected"), std::string::npos) << r.error;
      EXPECT_LT(r.tokens.size(), 100u);
    }
    EXPECT_FALSE(d.engine->healthy());
    EXPECT_EQ(d.engine->submit(greedy({1}, 5)).status().code(), absl::StatusCode::kUnavailable);
  }
}

// Backend's synchronous default: submit runs the step, collect hands outputs out in order,
// and neither goes past kMaxStepsInFlight or collects what was not submitted. The second
// step's input is a reference to the first step's sampling row (the runner does not know
// that output yet), which the CPU backend resolves from its last run.
TEST(EngineOverlap, SynchronousBackendDefaultSubmitAndCollect) {
  MEGASERVE_REQUIRE_ASSET(kModel);
  auto config = load_model_config(model_dir());
  ASSERT_TRUE(config.ok()) << config.status();
  auto backend = make_cpu_backend();
  EXPECT_EQ(backend->collect().status().code(), absl::StatusCode::kFailedPrecondition);
  StepRunner runner(*config, *backend);
  EXPECT_EQ(runner.collect().status().code(), absl::StatusCode::kFailedPrecondition);
  scheduler::StepPlan plan;
  plan.kv_block_size = 16;
  scheduler::StepRequest r;
  r.request_id = 1;
  r.token_ids = {1};
  r.block_table = {0};
  r.sample = true;
  r.sampling.temperature = 0.0f;
  plan.requests.push_back(r);
  plan.step_id = 1;
  ASSERT_TRUE(runner.submit(plan).ok());
  plan.step_id = 2;
  plan.requests[0].first_position = 1;
  plan.requests[0].token_ids = {scheduler::kTokenFromPreviousStep};
  ASSERT_TRUE(runner.submit(plan).ok());
  EXPECT_EQ(backend->steps_in_flight(), 2);
  EXPECT_EQ(runner.steps_in_flight(), 2);
  plan.step_id = 3;
  EXPECT_EQ(runner.submit(plan).code(), absl::StatusCode::kFailedPrecondition);
  Step extra;
  extra.step_id = 3;
  EXPECT_EQ(backend->submit(extra).code(), absl::StatusCode::kFailedPrecondition);
  const std::vector<int32_t> want = oracle_ids(2);
  for (uint64_t step = 1; step <= 2; ++step) {
    auto out = runner.collect();
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(out->step_id, step);
    ASSERT_EQ(out->sampled.size(), 1u);
    EXPECT_EQ(out->sampled[0].token_id, want[step - 1]);
    if (step == 2) {
      EXPECT_EQ(runner.last_step().meta.token_ids[0], isa::previous_sample_ref(0));
    }
  }
  EXPECT_EQ(backend->steps_in_flight(), 0);
  EXPECT_EQ(runner.steps_in_flight(), 0);
}

// A row whose penalties need the token still in flight: the runner collects the previous
// step first (outputs still come out in submission order), adds the token to the row's
// outputs and feeds the token itself instead of a reference; the draw equals a run where
// the plan already had it. Without penalties the step goes in as a reference.
TEST(EngineOverlap, StepRunnerCollectsTheStepInFlightForPenalties) {
  MEGASERVE_REQUIRE_ASSET(kModel);
  auto config = load_model_config(model_dir());
  ASSERT_TRUE(config.ok()) << config.status();
  const std::vector<int32_t> prompt = {1};
  const auto make_plan = [&](uint64_t step_id, std::span<const int32_t> outputs, bool forwarded) {
    scheduler::StepPlan plan;
    plan.step_id = step_id;
    plan.kv_block_size = 16;
    scheduler::StepRequest r;
    r.request_id = 9;
    r.first_position = static_cast<int32_t>(step_id) - 1;
    r.token_ids = {step_id == 1 ? 1
                   : forwarded  ? scheduler::kTokenFromPreviousStep
                                : outputs.back()};
    r.block_table = {0};
    r.sample = true;
    r.sampling.temperature = 0.8f;
    r.sampling.repetition_penalty = 1.5f;
    r.sampling.frequency_penalty = 0.5f;
    r.prompt_token_ids = prompt;
    r.output_token_ids = outputs;
    r.output_token_index = static_cast<int32_t>(step_id) - 1;
    r.seed = 17;
    plan.requests.push_back(r);
    return plan;
  };
  // Serial: every plan knows the outputs so far.
  std::vector<int32_t> serial;
  {
    auto backend = make_cpu_backend();
    StepRunner runner(*config, *backend);
    for (uint64_t step = 1; step <= 6; ++step) {
      auto out = runner.execute(make_plan(step, serial, false));
      ASSERT_TRUE(out.ok()) << out.status();
      serial.push_back(out->sampled[0].token_id);
    }
  }
  // Overlapped: step N+1 is submitted before step N is collected, its outputs lack N's token.
  auto backend = make_cpu_backend();
  StepRunner runner(*config, *backend);
  std::vector<int32_t> overlapped;
  std::deque<scheduler::StepPlan> plans;  // alive until collected (their spans)
  std::deque<std::vector<int32_t>> known;
  for (uint64_t step = 1; step <= 6; ++step) {
    known.push_back(overlapped);
    plans.push_back(make_plan(step, known.back(), step > 1));
    ASSERT_TRUE(runner.submit(plans.back()).ok()) << step;
    if (step > 1) {
      EXPECT_EQ(backend->steps_in_flight(), 1) << "step " << step - 1 << " collected early";
      EXPECT_EQ(runner.steps_in_flight(), 2);
      auto out = runner.collect();
      ASSERT_TRUE(out.ok()) << out.status();
      EXPECT_EQ(out->step_id, step - 1);
      overlapped.push_back(out->sampled[0].token_id);
    }
  }
  auto last = runner.collect();
  ASSERT_TRUE(last.ok()) << last.status();
  EXPECT_EQ(last->step_id, 6u);
  EXPECT_EQ(runner.last_step().meta.token_ids[0], overlapped.back());  // the token itself
  overlapped.push_back(last->sampled[0].token_id);
  EXPECT_EQ(overlapped, serial);
}

// A step the backend refuses after it was built never runs: the runner rewinds the
// builder's barrier totals, so the next step still runs (the interpreter checks them).
TEST(EngineOverlap, StepRunnerRewindsARefusedStep) {
  MEGASERVE_REQUIRE_ASSET(kModel);
  auto config = load_model_config(model_dir());
  ASSERT_TRUE(config.ok()) << config.status();
  auto log = std::make_shared<DeferredLog>();
  DeferringBackend backend(make_cpu_backend(), log);
  backend.fail_at_submit(1);
  StepRunner runner(*config, backend);
  scheduler::StepPlan plan;
  plan.step_id = 1;
  plan.kv_block_size = 16;
  scheduler::StepRequest r;
  r.request_id = 1;
  r.token_ids = {1};
  r.block_table = {0};
  r.sample = true;
  r.sampling.temperature = 0.0f;
  plan.requests.push_back(r);
  EXPECT_EQ(runner.submit(plan).code(), absl::StatusCode::kInternal);
  EXPECT_EQ(runner.steps_in_flight(), 0);
  auto out = runner.execute(plan);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->sampled[0].token_id, oracle_ids(1)[0]);
}

}  // namespace
}  // namespace megaserve::engine
