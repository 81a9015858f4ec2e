// Stop conditions, admission, finish/abort, update() validation and overlapped scheduling.
#include <limits>
#include <map>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "scheduler/scheduler.h"
#include "tests/scheduler/scheduler_test_util.h"

namespace megaserve::scheduler {
namespace {

using testing::apply;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using testing::make_scheduler;
using testing::output_for;
using testing::plan;
using testing::position_token;
using testing::Row;
using testing::rows;
using testing::spec;
using testing::tokens;

constexpr int32_t kEos = 2;

SchedulerConfig base_config() {
  SchedulerConfig c;
  c.kv_block_size = 16;
  c.num_kv_blocks = 32;
  c.max_num_seqs = 8;
  c.max_num_batched_tokens = 64;
  c.max_waiting_requests = 4;
  c.max_model_len = 64;
  c.enable_prefix_caching = true;
  c.eos_token_ids = {kEos, 3};
  return c;
}

struct Outcome {
  std::vector<int32_t> tokens;
  std::optional<FinishReason> finished;
  std::vector<std::vector<int32_t>> banned;  // banned ids at each sample
  std::vector<int32_t> output_index;         // output_token_index at each sample
};

// Runs one request to completion without overlap; the "model" emits script[i] for the i-th
// token it samples (ignoring bans, to test that the scheduler does not honour a stop token
// before min_tokens).
Outcome run_script(const SchedulerConfig& c, RequestSpec r, const std::vector<int32_t>& script) {
  auto s = make_scheduler(c);
  EXPECT_TRUE(s->add_request(std::move(r)).ok());
  Outcome o;
  for (int step = 0; step < 200 && s->has_unfinished_requests(); ++step) {
    StepPlan p = plan(*s);
    for (const StepRequest& q : p.requests) {
      if (!q.sample) continue;
      o.banned.push_back(q.banned_token_ids);
      o.output_index.push_back(q.output_token_index);
    }
    for (const RequestUpdate& u : apply(*s, output_for(p, [&](const StepRequest& q) {
           return script.at(q.output_token_index);
         }))) {
      for (const SampledToken& t : u.new_tokens) o.tokens.push_back(t.token_id);
      if (u.finished) o.finished = u.finished;
    }
  }
  EXPECT_EQ(s->stats().num_kv_blocks_used, 0);
  return o;
}

TEST(SchedulerStopTest, EosStopsAndIsReported) {
  Outcome o = run_script(base_config(), spec(1, tokens(4, 10), 10), {5, kEos, 7});
  EXPECT_THAT(o.tokens, ElementsAre(5, kEos));
  EXPECT_EQ(o.finished, FinishReason::kStop);
  // Every configured EOS id counts.
  o = run_script(base_config(), spec(1, tokens(4, 10), 10), {5, 3, 7});
  EXPECT_THAT(o.tokens, ElementsAre(5, 3));
}

TEST(SchedulerStopTest, IgnoreEosRunsToMaxTokens) {
  RequestSpec r = spec(1, tokens(4, 10), 3);
  r.sampling.ignore_eos = true;
  Outcome o = run_script(base_config(), r, {5, kEos, 7, 8});
  EXPECT_THAT(o.tokens, ElementsAre(5, kEos, 7));
  EXPECT_EQ(o.finished, FinishReason::kLength);
}

TEST(SchedulerStopTest, StopTokenIdStopsEvenWithIgnoreEos) {
  RequestSpec r = spec(1, tokens(4, 10), 10);
  r.sampling.stop_token_ids = {9};
  r.sampling.ignore_eos = true;
  Outcome o = run_script(base_config(), r, {5, 6, 9, 7});
  EXPECT_THAT(o.tokens, ElementsAre(5, 6, 9));
  EXPECT_EQ(o.finished, FinishReason::kStop);
}

TEST(SchedulerStopTest, MinTokensBansStopIdsUntilReached) {
  RequestSpec r = spec(1, tokens(4, 10), 10);
  r.sampling.min_tokens = 2;
  r.sampling.stop_token_ids = {9};
  // A model that ignored the ban: stop ids before index 2 do not stop the request.
  Outcome o = run_script(base_config(), r, {kEos, 9, 9, 7});
  EXPECT_THAT(o.tokens, ElementsAre(kEos, 9, 9));
  EXPECT_EQ(o.finished, FinishReason::kStop);
  ASSERT_EQ(o.banned.size(), 3u);
  EXPECT_THAT(o.banned[0], ElementsAre(kEos, 3, 9));
  EXPECT_THAT(o.banned[1], ElementsAre(kEos, 3, 9));
  EXPECT_TRUE(o.banned[2].empty());
  EXPECT_THAT(o.output_index, ElementsAre(0, 1, 2));

  r.sampling.ignore_eos = true;  // EOS is then an ordinary token: not banned
  o = run_script(base_config(), r, {kEos, 5, kEos, 9});
  EXPECT_THAT(o.banned[0], ElementsAre(9));
  EXPECT_THAT(o.tokens, ElementsAre(kEos, 5, kEos, 9));
}

TEST(SchedulerStopTest, MaxModelLenEndsWithLength) {
  SchedulerConfig c = base_config();
  c.max_model_len = 8;
  Outcome o = run_script(c, spec(1, tokens(6, 10), 100), {5, 6, 7});
  EXPECT_THAT(o.tokens, ElementsAre(5, 6));  // 6 + 2 = 8 tokens
  EXPECT_EQ(o.finished, FinishReason::kLength);
}

TEST(SchedulerAdmissionTest, RejectsWithReasons) {
  SchedulerConfig c = base_config();
  c.num_kv_blocks = 2;  // 32 positions
  c.max_model_len = 40;
  auto s = make_scheduler(c);
  const auto reject = [&](RequestSpec r) { return s->add_request(std::move(r)); };

  absl::Status st = reject(spec(1, {}, 4));
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("prompt is empty"));
  st = reject(spec(1, {5, -4}, 4));
  EXPECT_THAT(st.message(), HasSubstr("prompt token 1 has negative id -4"));
  st = reject(spec(1, tokens(40, 0), 4));
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("max_model_len 40"));
  st = reject(spec(1, tokens(4, 0), 0));
  EXPECT_THAT(st.message(), HasSubstr("max_tokens"));
  RequestSpec r = spec(1, tokens(4, 0), 4);
  r.sampling.min_tokens = 5;
  st = reject(r);
  EXPECT_THAT(st.message(), HasSubstr("min_tokens"));
  // Positions computed: all but the last token, 30 + 4 - 1 = 33 > 32: three blocks.
  st = reject(spec(1, tokens(30, 0), 4));
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("needs 3 KV blocks, more than the whole cache (2 blocks"));
  // 29 + 4 - 1 = 32 positions fit exactly. A huge max_tokens is capped by max_model_len,
  // but min(1 + 1000, 40) - 1 = 39 positions still need three blocks.
  EXPECT_TRUE(s->add_request(spec(1, tokens(29, 0), 4)).ok());
  EXPECT_FALSE(s->add_request(spec(2, tokens(1, 0), 1000)).ok());
  EXPECT_EQ(s->add_request(spec(1, tokens(3, 0), 4)).code(), absl::StatusCode::kAlreadyExists);
  for (uint64_t id = 2; id <= 4; ++id) EXPECT_TRUE(s->add_request(spec(id, {7}, 1)).ok());
  st = s->add_request(spec(5, {7}, 1));
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(st.message(), HasSubstr("waiting queue is full (4 requests)"));
  SchedulerStats stats = s->stats();
  EXPECT_EQ(stats.num_rejected_invalid, 8);
  EXPECT_EQ(stats.num_rejected_queue_full, 1);
  EXPECT_EQ(stats.num_waiting, 4);
}

// Issue 18: with max_model_len near INT32_MAX, prompt + max_tokens - 1 positions rounded up
// to blocks wrapped a 32-bit sum negative, so a request far larger than the cache was
// admitted, filled it, was preempted and then held the head of the queue forever.
TEST(SchedulerAdmissionTest, HugeRequestsAreRejectedIn64BitsAndDoNotBlockOthers) {
  SchedulerConfig c = base_config();
  c.max_model_len = std::numeric_limits<int32_t>::max();
  auto s = make_scheduler(c);
  const int32_t huge = std::numeric_limits<int32_t>::max() - 4;
  absl::Status st = s->add_request(spec(1, tokens(4, 10), huge));
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  // ceil((2^31 - 2) / 16) = 2^27 blocks, printed as computed.
  EXPECT_THAT(st.message(), HasSubstr("max_tokens 2147483643 needs 134217728 KV blocks, more "
                                      "than the whole cache (32 blocks of 16 tokens)"));
  EXPECT_EQ(s->add_request(spec(2, tokens(4, 10), std::numeric_limits<int32_t>::max())).code(),
            absl::StatusCode::kInvalidArgument);
  // What fits still runs, to the end.
  ASSERT_TRUE(s->add_request(spec(3, tokens(4, 10), 20)).ok());
  int generated = 0;
  for (int step = 0; step < 100 && s->has_unfinished_requests(); ++step) {
    for (const RequestUpdate& u : apply(*s, output_for(plan(*s), position_token))) {
      generated += static_cast<int>(u.new_tokens.size());
    }
  }
  EXPECT_EQ(generated, 20);
  EXPECT_FALSE(s->has_unfinished_requests());
  EXPECT_EQ(s->stats().num_kv_blocks_used, 0);
  EXPECT_EQ(s->stats().num_preemptions, 0);
}

TEST(SchedulerConfigTest, RejectsBadConfigs) {
  SchedulerConfig c = base_config();
  c.kv_block_size = 24;
  EXPECT_THAT(Scheduler::create(c).status().message(), HasSubstr("kv_block_size"));
  c = base_config();
  c.num_kv_blocks = 0;
  EXPECT_THAT(Scheduler::create(c).status().message(), HasSubstr("num_kv_blocks"));
  c = base_config();
  c.max_num_seqs = 0;
  EXPECT_THAT(Scheduler::create(c).status().message(), HasSubstr("max_num_seqs"));
  c = base_config();
  c.max_num_batched_tokens = 0;
  EXPECT_THAT(Scheduler::create(c).status().message(), HasSubstr("max_num_batched_tokens"));
  c = base_config();
  c.max_model_len = 1;
  EXPECT_THAT(Scheduler::create(c).status().message(), HasSubstr("max_model_len"));
}

TEST(SchedulerFinishTest, AbortFreesBlocksAtOnceAndDiscardsInFlightTokens) {
  auto s = make_scheduler(base_config());
  ASSERT_TRUE(s->add_request(spec(1, tokens(20, 10), 10)).ok());
  ASSERT_TRUE(s->add_request(spec(2, tokens(4, 10), 10)).ok());
  ASSERT_TRUE(s->add_request(spec(3, tokens(4, 10), 10, /*priority=*/5)).ok());
  StepPlan p1 = plan(*s);
  EXPECT_EQ(s->stats().num_kv_blocks_used, 4);
  ASSERT_TRUE(s->finish(1, FinishReason::kAbort).ok());
  EXPECT_EQ(s->stats().num_kv_blocks_used, 2);
  EXPECT_TRUE(s->check_invariants().ok());
  std::vector<RequestUpdate> u = apply(*s, output_for(p1, position_token));
  ASSERT_EQ(u.size(), 2u);  // 1's token is dropped
  EXPECT_EQ(u[0].request_id, 2u);
  EXPECT_EQ(s->finish(1, FinishReason::kAbort).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(s->finish(99, FinishReason::kAbort).code(), absl::StatusCode::kNotFound);
  // A stop string matched by the output side: finished as kStop, never scheduled again.
  ASSERT_TRUE(s->finish(2, FinishReason::kStop).ok());
  StepPlan p2 = plan(*s);
  EXPECT_THAT(rows(p2), ElementsAre(Row{3, 4, 1, true}));
  apply(*s, output_for(p2, position_token));
  SchedulerStats st = s->stats();
  EXPECT_EQ(st.num_finished_abort, 1);
  EXPECT_EQ(st.num_finished_stop, 1);
  EXPECT_EQ(st.num_running, 1);
  // The id of a retired request may be used again.
  EXPECT_TRUE(s->add_request(spec(1, tokens(4, 10), 1)).ok());
}

TEST(SchedulerUpdateTest, RejectsOutputsThatDoNotMatchThePlan) {
  auto s = make_scheduler(base_config());
  ASSERT_TRUE(s->add_request(spec(1, tokens(4, 10), 10)).ok());
  ASSERT_TRUE(s->add_request(spec(2, tokens(4, 10), 10)).ok());
  StepPlan p1 = plan(*s);
  StepOutput good = output_for(p1, position_token);

  StepOutput wrong_step = good;
  wrong_step.step_id = 7;
  EXPECT_THAT(s->update(wrong_step).status().message(),
              HasSubstr("output of step 7 but the oldest step awaiting update is 1"));
  StepOutput missing = good;
  missing.sampled.pop_back();
  EXPECT_THAT(s->update(missing).status().message(), HasSubstr("sampled 2 requests"));
  StepOutput swapped = good;
  std::swap(swapped.sampled[0], swapped.sampled[1]);
  EXPECT_EQ(s->update(swapped).status().code(), absl::StatusCode::kInvalidArgument);
  StepOutput negative = good;
  negative.sampled[0].token_id = -1;
  EXPECT_EQ(s->update(negative).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(s->check_invariants().ok());
  // Nothing was applied: the good output still goes through.
  EXPECT_EQ(apply(*s, good).size(), 2u);
  EXPECT_EQ(s->update(good).status().code(), absl::StatusCode::kInvalidArgument);  // twice
}

// Step N+1 is planned before step N's output is applied. Request 1 samples EOS in step 1;
// step 2 already runs it with the token from step 1 (kTokenFromPreviousStep). Its step-2
// token is discarded, and its blocks are freed when step 1's EOS is applied.
TEST(SchedulerOverlapTest, RequestFinishingInStepNHasItsStepNPlusOneTokenDiscarded) {
  auto s = make_scheduler(base_config());
  ASSERT_TRUE(s->add_request(spec(1, tokens(4, 10), 10)).ok());
  ASSERT_TRUE(s->add_request(spec(2, tokens(4, 20), 10)).ok());
  ASSERT_TRUE(s->add_request(spec(3, tokens(4, 30), 1)).ok());

  StepPlan p1 = plan(*s);
  EXPECT_THAT(rows(p1), ElementsAre(Row{1, 0, 4, true}, Row{2, 0, 4, true}, Row{3, 0, 4, true}));
  StepPlan p2 = plan(*s);  // before update(1); 3's in-flight token is its last
  EXPECT_EQ(p2.step_id, 2u);
  EXPECT_THAT(rows(p2), ElementsAre(Row{1, 4, 1, true}, Row{2, 4, 1, true}));
  EXPECT_THAT(p2.requests[0].token_ids, ElementsAre(kTokenFromPreviousStep));
  EXPECT_TRUE(p2.requests[0].output_token_ids.empty());  // step 1's token is not known yet
  EXPECT_EQ(p2.requests[0].output_token_index, 1);
  EXPECT_EQ(p2.requests[0].block_table, p1.requests[0].block_table);

  std::vector<RequestUpdate> u1 = apply(*s, output_for(p1, [](const StepRequest& q) {
    return q.request_id == 1 ? kEos : 50 + static_cast<int32_t>(q.request_id);
  }));
  ASSERT_EQ(u1.size(), 3u);
  EXPECT_EQ(u1[0].finished, FinishReason::kStop);
  EXPECT_FALSE(u1[1].finished.has_value());
  EXPECT_EQ(u1[2].finished, FinishReason::kLength);
  EXPECT_EQ(s->stats().num_kv_blocks_used, 1);  // 2's block only; 1's freed while in flight

  StepPlan p3 = plan(*s);  // before update(2)
  EXPECT_THAT(rows(p3), ElementsAre(Row{2, 5, 1, true}));
  EXPECT_THAT(p3.requests[0].token_ids, ElementsAre(kTokenFromPreviousStep));
  EXPECT_THAT(p3.requests[0].output_token_ids, ElementsAre(52));
  std::vector<RequestUpdate> u2 = apply(*s, output_for(p2, [](const StepRequest&) { return 60; }));
  ASSERT_EQ(u2.size(), 1u);  // request 1's step-2 token is gone
  EXPECT_EQ(u2[0].request_id, 2u);
  EXPECT_THAT(u2[0].new_tokens, ::testing::SizeIs(1));

  ASSERT_TRUE(s->finish(2, FinishReason::kAbort).ok());
  EXPECT_TRUE(plan(*s).requests.empty());
  EXPECT_TRUE(apply(*s, output_for(p3, position_token)).empty());
  EXPECT_EQ(s->stats().num_kv_blocks_used, 0);
  EXPECT_FALSE(s->has_unfinished_requests());
}

// Deeper pipelining: three steps planned before the first output comes back. Each later
// step forwards the token of the one before; when step 1's token is EOS, the tokens of steps
// 2 and 3 are discarded and nothing leaks.
TEST(SchedulerOverlapTest, ThreeStepsInFlight) {
  auto s = make_scheduler(base_config());
  ASSERT_TRUE(s->add_request(spec(1, tokens(15, 10), 10)).ok());
  ASSERT_TRUE(s->add_request(spec(2, tokens(3, 10), 10)).ok());
  StepPlan p1 = plan(*s);
  StepPlan p2 = plan(*s);
  StepPlan p3 = plan(*s);
  EXPECT_THAT(rows(p2), ElementsAre(Row{1, 15, 1, true}, Row{2, 3, 1, true}));
  EXPECT_THAT(rows(p3), ElementsAre(Row{1, 16, 1, true}, Row{2, 4, 1, true}));
  EXPECT_THAT(p3.requests[0].token_ids, ElementsAre(kTokenFromPreviousStep));
  EXPECT_EQ(p3.requests[0].output_token_index, 2);
  EXPECT_EQ(p3.requests[0].block_table.size(), 2u);  // position 16 opens a second block
  const auto eos_for_1 = [](const StepRequest& q) { return q.request_id == 1 ? kEos : 40; };
  std::vector<RequestUpdate> u1 = apply(*s, output_for(p1, eos_for_1));
  ASSERT_EQ(u1.size(), 2u);
  EXPECT_EQ(u1[0].finished, FinishReason::kStop);
  EXPECT_EQ(s->stats().num_kv_blocks_used, 1);
  std::vector<RequestUpdate> u2 = apply(*s, output_for(p2, eos_for_1));
  std::vector<RequestUpdate> u3 = apply(*s, output_for(p3, eos_for_1));
  ASSERT_EQ(u2.size(), 1u);
  ASSERT_EQ(u3.size(), 1u);
  EXPECT_EQ(u3[0].request_id, 2u);
  StepPlan p4 = plan(*s);
  EXPECT_THAT(rows(p4), ElementsAre(Row{2, 5, 1, true}));
  EXPECT_THAT(p4.requests[0].output_token_ids, ElementsAre(40, 40, 40));
  ASSERT_TRUE(s->finish(2, FinishReason::kAbort).ok());
  apply(*s, output_for(p4, eos_for_1));
  EXPECT_EQ(s->stats().num_kv_blocks_used, 0);
}

// A request preempted while its sampled token is in flight waits for that token before
// it is prefilled again; then its re-prefill includes it.
TEST(SchedulerOverlapTest, PreemptedWithATokenInFlightResumesOnceItIsKnown) {
  SchedulerConfig c = base_config();
  c.num_kv_blocks = 3;
  c.enable_prefix_caching = false;
  auto s = make_scheduler(c);
  ASSERT_TRUE(s->add_request(spec(1, tokens(16, 100), 16)).ok());
  ASSERT_TRUE(s->add_request(spec(2, tokens(16, 200), 16)).ok());
  StepPlan p1 = plan(*s);
  StepPlan p2 = plan(*s);  // 2 needs a second block: preempted, with step 1's token pending
  EXPECT_THAT(rows(p2), ElementsAre(Row{1, 16, 1, true}));
  EXPECT_EQ(s->stats().num_preemptions, 1);
  std::vector<RequestUpdate> u1 = apply(*s, output_for(p1, position_token));
  ASSERT_EQ(u1.size(), 2u);
  EXPECT_EQ(u1[1].request_id, 2u);
  // 1 keeps decoding; 2 waits for blocks until 1 is done.
  std::map<uint64_t, int> samples;
  StepPlan prev = p2;
  for (int step = 3; s->has_unfinished_requests() && step < 100; ++step) {
    StepPlan p = plan(*s);
    if (!prev.requests.empty()) apply(*s, output_for(prev, position_token));
    const StepRequest* two = testing::find_request(p, 2);
    if (two != nullptr && two->first_position == 0) {
      std::vector<int32_t> expected = tokens(16, 200);
      expected.push_back(u1[1].new_tokens[0].token_id);
      EXPECT_EQ(two->token_ids, expected);
    }
    for (const StepRequest& q : p.requests) samples[q.request_id] += q.sample ? 1 : 0;
    prev = p;
  }
  if (!prev.requests.empty()) apply(*s, output_for(prev, position_token));
  EXPECT_FALSE(s->has_unfinished_requests());
  EXPECT_EQ(samples[2], 15);  // 16 tokens in all, the first from step 1
}

}  // namespace
}  // namespace megaserve::scheduler
