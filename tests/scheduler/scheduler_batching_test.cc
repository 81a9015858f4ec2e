// Step-by-step simulations of the batching policy: each test states, step by step, which
// requests run from which position with how many tokens and whether they sample.
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "scheduler/scheduler.h"
#include "tests/scheduler/scheduler_test_util.h"

namespace megaserve::scheduler {
namespace {

using testing::apply;
using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;
using testing::make_scheduler;
using testing::output_for;
using testing::plan;
using testing::position_token;
using testing::Row;
using testing::rows;
using testing::spec;
using testing::tokens;

SchedulerConfig base_config() {
  SchedulerConfig c;
  c.kv_block_size = 16;
  c.num_kv_blocks = 64;
  c.max_num_seqs = 8;
  c.max_num_batched_tokens = 64;
  c.max_waiting_requests = 16;
  c.max_model_len = 128;
  c.enable_prefix_caching = false;
  c.eos_token_ids = {2};
  return c;
}

TEST(SchedulerBatchingTest, ChunkedPrefillWithinTheTokenBudget) {
  SchedulerConfig c = base_config();
  c.max_num_batched_tokens = 8;
  auto s = make_scheduler(c);
  ASSERT_TRUE(s->add_request(spec(1, tokens(10, 100), 2)).ok());
  ASSERT_TRUE(s->add_request(spec(2, tokens(5, 200), 2)).ok());

  StepPlan p1 = plan(*s);
  EXPECT_EQ(p1.step_id, 1u);
  EXPECT_THAT(rows(p1), ElementsAre(Row{1, 0, 8, false}));
  EXPECT_EQ(p1.requests[0].token_ids, tokens(8, 100));
  EXPECT_EQ(p1.requests[0].block_table.size(), 1u);
  EXPECT_TRUE(apply(*s, output_for(p1, position_token)).empty());

  // The rest of 1's prompt (samples), then 2 fits in what is left of the budget.
  StepPlan p2 = plan(*s);
  EXPECT_THAT(rows(p2), ElementsAre(Row{1, 8, 2, true}, Row{2, 0, 5, true}));
  EXPECT_EQ(p2.requests[0].token_ids, tokens(2, 108));
  EXPECT_EQ(p2.requests[0].prompt_token_ids.size(), 10u);
  EXPECT_EQ(p2.requests[0].output_token_index, 0);
  std::vector<RequestUpdate> u2 = apply(*s, output_for(p2, position_token));
  ASSERT_EQ(u2.size(), 2u);
  EXPECT_EQ(u2[0].new_tokens[0].token_id, 1010);
  EXPECT_FALSE(u2[0].finished.has_value());

  StepPlan p3 = plan(*s);
  EXPECT_THAT(rows(p3), ElementsAre(Row{1, 10, 1, true}, Row{2, 5, 1, true}));
  EXPECT_THAT(p3.requests[0].token_ids, ElementsAre(1010));
  EXPECT_THAT(p3.requests[0].output_token_ids, ElementsAre(1010));
  EXPECT_EQ(p3.requests[0].output_token_index, 1);
  std::vector<RequestUpdate> u3 = apply(*s, output_for(p3, position_token));
  ASSERT_EQ(u3.size(), 2u);
  EXPECT_EQ(u3[0].finished, FinishReason::kLength);
  EXPECT_EQ(u3[1].finished, FinishReason::kLength);

  StepPlan p4 = plan(*s);
  EXPECT_TRUE(p4.requests.empty());
  EXPECT_EQ(p4.step_id, 0u);
  SchedulerStats st = s->stats();
  EXPECT_EQ(st.num_finished_length, 2);
  EXPECT_EQ(st.num_kv_blocks_used, 0);
  EXPECT_EQ(st.num_steps, 3);
  EXPECT_FALSE(s->has_unfinished_requests());
}

TEST(SchedulerBatchingTest, SequenceCapHoldsBackNewRequestsInArrivalOrder) {
  SchedulerConfig c = base_config();
  c.max_num_seqs = 2;
  auto s = make_scheduler(c);
  ASSERT_TRUE(s->add_request(spec(1, tokens(4, 10), 2)).ok());
  ASSERT_TRUE(s->add_request(spec(2, tokens(4, 20), 3)).ok());
  ASSERT_TRUE(s->add_request(spec(3, tokens(4, 30), 2)).ok());
  const std::vector<std::vector<Row>> expected = {
      {{1, 0, 4, true}, {2, 0, 4, true}},
      {{1, 4, 1, true}, {2, 4, 1, true}},  // 1 finishes (2 tokens)
      {{2, 5, 1, true}, {3, 0, 4, true}},  // 2 finishes (3 tokens)
      {{3, 4, 1, true}},                   // 3 finishes
  };
  for (size_t step = 0; step < expected.size(); ++step) {
    StepPlan p = plan(*s);
    EXPECT_THAT(rows(p), ElementsAreArray(expected[step])) << "step " << step + 1;
    EXPECT_LE(static_cast<int32_t>(p.requests.size()), c.max_num_seqs);
    apply(*s, output_for(p, position_token));
  }
  EXPECT_FALSE(s->has_unfinished_requests());
}

TEST(SchedulerBatchingTest, PriorityThenArrivalOrder) {
  SchedulerConfig c = base_config();
  c.max_num_seqs = 1;
  auto s = make_scheduler(c);
  ASSERT_TRUE(s->add_request(spec(1, tokens(2, 10), 1, /*priority=*/1)).ok());
  ASSERT_TRUE(s->add_request(spec(2, tokens(2, 10), 1, /*priority=*/0)).ok());
  ASSERT_TRUE(s->add_request(spec(3, tokens(2, 10), 1, /*priority=*/1)).ok());
  ASSERT_TRUE(s->add_request(spec(4, tokens(2, 10), 1, /*priority=*/0)).ok());
  ASSERT_TRUE(s->add_request(spec(5, tokens(2, 10), 1, /*priority=*/-3)).ok());
  std::vector<uint64_t> order;
  while (s->has_unfinished_requests()) {
    StepPlan p = plan(*s);
    ASSERT_EQ(p.requests.size(), 1u);
    order.push_back(p.requests[0].request_id);
    apply(*s, output_for(p, position_token));
  }
  EXPECT_THAT(order, ElementsAre(5, 2, 4, 1, 3));
}

TEST(SchedulerBatchingTest, DecodesGoBeforePrefillChunks) {
  SchedulerConfig c = base_config();
  c.max_num_batched_tokens = 6;
  auto s = make_scheduler(c);
  ASSERT_TRUE(s->add_request(spec(1, tokens(3, 10), 5)).ok());
  StepPlan p1 = plan(*s);
  EXPECT_THAT(rows(p1), ElementsAre(Row{1, 0, 3, true}));
  apply(*s, output_for(p1, position_token));
  // 2 arrives with a long prompt; it ranks after 1 and gets the budget 1's decode leaves.
  ASSERT_TRUE(s->add_request(spec(2, tokens(20, 50), 5)).ok());
  const std::vector<std::vector<Row>> expected = {
      {{1, 3, 1, true}, {2, 0, 5, false}},
      {{1, 4, 1, true}, {2, 5, 5, false}},
      {{1, 5, 1, true}, {2, 10, 5, false}},
      {{1, 6, 1, true}, {2, 15, 5, true}},  // 1 finishes (5 tokens)
      {{2, 20, 1, true}},
  };
  for (size_t step = 0; step < expected.size(); ++step) {
    StepPlan p = plan(*s);
    EXPECT_THAT(rows(p), ElementsAreArray(expected[step])) << "step " << step + 2;
    EXPECT_LE(p.num_tokens(), c.max_num_batched_tokens);
    apply(*s, output_for(p, position_token));
  }
}

// max_prefill_tokens_with_decodes: beside a decode, prompt chunks and admissions share 4
// tokens of the 64-token budget; a step without decodes takes the whole budget.
TEST(SchedulerBatchingTest, PromptTokensBesideDecodesAreCapped) {
  SchedulerConfig c = base_config();
  c.max_prefill_tokens_with_decodes = 4;
  auto s = make_scheduler(c);
  ASSERT_TRUE(s->add_request(spec(1, tokens(10, 10), 4)).ok());
  StepPlan p1 = plan(*s);
  EXPECT_THAT(rows(p1), ElementsAre(Row{1, 0, 10, true}));  // no decode: not capped
  apply(*s, output_for(p1, position_token));
  ASSERT_TRUE(s->add_request(spec(2, tokens(7, 50), 3)).ok());
  ASSERT_TRUE(s->add_request(spec(3, tokens(2, 80), 3)).ok());
  const std::vector<std::vector<Row>> expected = {
      {{1, 10, 1, true}, {2, 0, 4, false}},  // 3 waits: the cap is spent
      {{1, 11, 1, true}, {2, 4, 3, true}, {3, 0, 1, false}},
      {{1, 12, 1, true}, {2, 7, 1, true}, {3, 1, 1, true}},  // 1 finishes (4 tokens)
  };
  for (size_t step = 0; step < expected.size(); ++step) {
    StepPlan p = plan(*s);
    EXPECT_THAT(rows(p), ElementsAreArray(expected[step])) << "step " << step + 2;
    apply(*s, output_for(p, position_token));
  }
}

TEST(SchedulerBatchingTest, NegativePromptCapIsRefused) {
  SchedulerConfig c = base_config();
  c.max_prefill_tokens_with_decodes = -1;
  EXPECT_THAT(Scheduler::create(c).status().message(),
              HasSubstr("max_prefill_tokens_with_decodes must be at least 0"));
}

// Three blocks: request 1 holds two, so 2 cannot grow past its first block and preempts
// itself (it ranks last). It keeps its generated token and, once 1 is done, prefills prompt +
// that token again; its prompt block is still cached, so only the generated token is computed.
TEST(SchedulerBatchingTest, PreemptionReleasesBlocksAndResumesWithGeneratedTokens) {
  SchedulerConfig c = base_config();
  c.num_kv_blocks = 3;
  c.enable_prefix_caching = true;
  auto s = make_scheduler(c);
  ASSERT_TRUE(s->add_request(spec(1, tokens(16, 100), 16)).ok());  // positions 0..30
  ASSERT_TRUE(s->add_request(spec(2, tokens(16, 200), 16)).ok());

  StepPlan p1 = plan(*s);
  EXPECT_THAT(rows(p1), ElementsAre(Row{1, 0, 16, true}, Row{2, 0, 16, true}));
  std::vector<RequestUpdate> u1 = apply(*s, output_for(p1, position_token));
  ASSERT_EQ(u1.size(), 2u);
  const int32_t generated_2 = u1[1].new_tokens[0].token_id;

  StepPlan p2 = plan(*s);
  EXPECT_THAT(rows(p2), ElementsAre(Row{1, 16, 1, true}));
  EXPECT_EQ(s->stats().num_preemptions, 1);
  EXPECT_EQ(s->stats().num_waiting, 1);
  EXPECT_EQ(s->stats().num_kv_blocks_cached_free, 1);  // 2's prompt block, still reusable
  apply(*s, output_for(p2, position_token));
  // 1 decodes alone until it has 16 tokens: steps 3..16. 2 cannot get its two blocks.
  for (int step = 3; step <= 16; ++step) {
    StepPlan p = plan(*s);
    EXPECT_THAT(rows(p), ElementsAre(Row{1, 14 + step, 1, true})) << "step " << step;
    std::vector<RequestUpdate> u = apply(*s, output_for(p, position_token));
    ASSERT_EQ(u.size(), 1u);
    EXPECT_EQ(u[0].finished.has_value(), step == 16);
  }
  StepPlan p17 = plan(*s);
  EXPECT_THAT(rows(p17), ElementsAre(Row{2, 16, 1, true}));
  EXPECT_THAT(p17.requests[0].token_ids, ElementsAre(generated_2));
  EXPECT_THAT(p17.requests[0].output_token_ids, ElementsAre(generated_2));
  EXPECT_EQ(p17.requests[0].output_token_index, 1);
  EXPECT_EQ(p17.requests[0].block_table[0], p1.requests[1].block_table[0]);
  std::vector<RequestUpdate> u17 = apply(*s, output_for(p17, position_token));
  EXPECT_EQ(u17[0].num_cached_prompt_tokens, 0);  // as at its first admission
  SchedulerStats st = s->stats();
  EXPECT_EQ(st.prefix_cache_queries, 16 + 16 + 17);
  EXPECT_EQ(st.prefix_cache_hits, 16);
}

TEST(SchedulerBatchingTest, PreemptionWithoutPrefixCacheRecomputesEverything) {
  SchedulerConfig c = base_config();
  c.num_kv_blocks = 3;
  auto s = make_scheduler(c);
  ASSERT_TRUE(s->add_request(spec(1, tokens(16, 100), 16)).ok());
  ASSERT_TRUE(s->add_request(spec(2, tokens(16, 200), 16)).ok());
  std::vector<int32_t> output_2;
  for (int step = 1; step <= 16; ++step) {
    StepPlan p = plan(*s);
    for (const RequestUpdate& u : apply(*s, output_for(p, position_token))) {
      if (u.request_id == 2) output_2.push_back(u.new_tokens[0].token_id);
    }
  }
  ASSERT_EQ(output_2.size(), 1u);
  StepPlan p17 = plan(*s);
  EXPECT_THAT(rows(p17), ElementsAre(Row{2, 0, 17, true}));
  std::vector<int32_t> expected = tokens(16, 200);
  expected.push_back(output_2[0]);
  EXPECT_EQ(p17.requests[0].token_ids, expected);
  EXPECT_EQ(s->stats().prefix_cache_hits, 0);
}

// 1 (priority 1) decodes; 0 (priority 0) arrives with a long prompt. When 0's next chunk
// needs the last block, 1 ranks lowest and is preempted even though it was already picked
// for this step: its pick is withdrawn and its token refunded.
TEST(SchedulerBatchingTest, PreemptionWithdrawsALowerRankedPickOfTheSameStep) {
  SchedulerConfig c = base_config();
  c.num_kv_blocks = 4;
  c.max_num_batched_tokens = 16;
  auto s = make_scheduler(c);
  ASSERT_TRUE(s->add_request(spec(1, tokens(16, 100), 30, /*priority=*/1)).ok());
  StepPlan p1 = plan(*s);
  EXPECT_THAT(rows(p1), ElementsAre(Row{1, 0, 16, true}));
  apply(*s, output_for(p1, position_token));
  ASSERT_TRUE(s->add_request(spec(0, tokens(48, 300), 1, /*priority=*/0)).ok());
  const std::vector<std::vector<Row>> expected = {
      {{1, 16, 1, true}, {0, 0, 15, false}},
      {{1, 17, 1, true}, {0, 15, 15, false}},
      {{0, 30, 15, false}},  // 1 preempted: 0 needs a third block
      // 0 finishes. 1 resumes in what is left of the budget: its re-prefill covers the
      // prompt and the three tokens it generated, 19 in all.
      {{0, 45, 3, true}, {1, 0, 13, false}},
      {{1, 13, 6, true}},
      {{1, 19, 1, true}},
  };
  for (size_t step = 0; step < expected.size(); ++step) {
    StepPlan p = plan(*s);
    EXPECT_THAT(rows(p), ElementsAreArray(expected[step])) << "step " << step + 2;
    EXPECT_LE(p.num_tokens(), c.max_num_batched_tokens);
    apply(*s, output_for(p, position_token));
  }
  EXPECT_EQ(s->stats().num_preemptions, 1);
}

TEST(SchedulerBatchingTest, NewRequestsReuseCachedPrefixBlocks) {
  SchedulerConfig c = base_config();
  c.enable_prefix_caching = true;
  auto s = make_scheduler(c);
  const std::vector<int32_t> shared = tokens(32, 500);
  std::vector<int32_t> prompt_a = shared;
  for (int32_t t : tokens(8, 900)) prompt_a.push_back(t);
  ASSERT_TRUE(s->add_request(spec(1, prompt_a, 1)).ok());
  StepPlan p1 = plan(*s);
  EXPECT_THAT(rows(p1), ElementsAre(Row{1, 0, 40, true}));
  std::vector<RequestUpdate> u1 = apply(*s, output_for(p1, position_token));
  EXPECT_EQ(u1[0].finished, FinishReason::kLength);
  EXPECT_EQ(u1[0].num_cached_prompt_tokens, 0);
  EXPECT_EQ(s->stats().num_kv_blocks_cached_free, 2);

  // 2 shares two full blocks. 3 is exactly the shared 32 tokens: its last token must be
  // computed, so only its first block is reused. 4 has another prefix-cache key.
  std::vector<int32_t> prompt_b = shared;
  for (int32_t t : tokens(5, 700)) prompt_b.push_back(t);
  ASSERT_TRUE(s->add_request(spec(2, prompt_b, 2)).ok());
  ASSERT_TRUE(s->add_request(spec(3, shared, 2)).ok());
  RequestSpec d = spec(4, shared, 2);
  d.prefix_cache_key = 42;
  ASSERT_TRUE(s->add_request(d).ok());
  StepPlan p2 = plan(*s);
  EXPECT_THAT(rows(p2),
              ElementsAre(Row{2, 32, 5, true}, Row{3, 16, 16, true}, Row{4, 0, 32, true}));
  const int32_t shared0 = p1.requests[0].block_table[0];
  const int32_t shared1 = p1.requests[0].block_table[1];
  EXPECT_THAT(p2.requests[0].block_table, ElementsAre(shared0, shared1, ::testing::_));
  EXPECT_EQ(p2.requests[1].block_table[0], shared0);
  EXPECT_NE(p2.requests[1].block_table[1], shared1);  // recomputed: holds the last token
  EXPECT_NE(p2.requests[2].block_table[0], shared0);
  EXPECT_EQ(s->kv_block_pool().ref_count(shared0), 2);
  EXPECT_EQ(s->kv_block_pool().ref_count(shared1), 1);
  std::vector<RequestUpdate> u2 = apply(*s, output_for(p2, position_token));
  ASSERT_EQ(u2.size(), 3u);
  EXPECT_EQ(u2[0].num_cached_prompt_tokens, 32);
  EXPECT_EQ(u2[1].num_cached_prompt_tokens, 16);
  EXPECT_EQ(u2[2].num_cached_prompt_tokens, 0);
  SchedulerStats st = s->stats();
  EXPECT_EQ(st.prefix_cache_queries, 40 + 37 + 32 + 32);
  EXPECT_EQ(st.prefix_cache_hits, 32 + 16);
}

TEST(SchedulerBatchingTest, PlanFieldsAreComplete) {
  SchedulerConfig c = base_config();
  auto s = make_scheduler(c);
  RequestSpec r = spec(9, tokens(20, 40), 3);
  r.sampling.temperature = 0.5f;
  r.sampling.top_k = 7;
  r.seed = 1234;
  ASSERT_TRUE(s->add_request(r).ok());
  StepPlan p = plan(*s);
  ASSERT_EQ(p.requests.size(), 1u);
  const StepRequest& q = p.requests[0];
  EXPECT_EQ(p.kv_block_size, 16);
  EXPECT_EQ(q.block_table.size(), 2u);  // positions 0..19
  EXPECT_EQ(q.sampling.temperature, 0.5f);
  EXPECT_EQ(q.sampling.top_k, 7);
  EXPECT_EQ(q.seed, 1234u);
  EXPECT_EQ(std::vector<int32_t>(q.prompt_token_ids.begin(), q.prompt_token_ids.end()),
            tokens(20, 40));
  EXPECT_TRUE(q.output_token_ids.empty());
  EXPECT_TRUE(q.banned_token_ids.empty());
  EXPECT_EQ(q.context_length(), 20);
}

}  // namespace
}  // namespace megaserve::scheduler
