// A long randomized simulation: 10,000 requests with random prompts (many sharing prefixes),
// random output limits, stop tokens, priorities and aborts, through a KV cache small enough
// to force preemption, with and without overlapped scheduling.
//
// A fake device executes every plan against simulated KV memory: each slot holds a hash of
// the whole sequence up to its position. Reading a request's context checks every slot it
// names, so a block freed too early, shared wrongly by the prefix cache, or overwritten by
// another request shows up as a wrong hash. The device samples tokens from a hash of
// (request, position), EOS now and then. After every step the scheduler's invariants hold;
// at the end every request finished or was rejected with a reason, each reported exactly the
// tokens the device produced up to its stop condition, and the pool is whole again.
#include <algorithm>
#include <random>
#include <string>
#include <tuple>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "gtest/gtest.h"
#include "scheduler/scheduler.h"

namespace megaserve::scheduler {
namespace {

constexpr int32_t kVocab = 512;
constexpr int32_t kEos = 2;
constexpr int32_t kSafeToken = 1;  // never a stop token
const std::vector<int32_t> kStopIdPool = {7, 8, 9};

uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

bool contains(const std::vector<int32_t>& v, int32_t x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

struct Tracked {
  RequestSpec spec;
  std::vector<int32_t> seq;     // prompt + every token the device sampled for it
  std::vector<uint64_t> slots;  // slots[p]: KV content of position p (hash of seq[0..p])
  uint64_t last_sample_step = 0;
  std::vector<int32_t> reported;
  std::optional<FinishReason> finished;
  int32_t num_cached_prompt_tokens = -1;
  bool aborted = false;
  bool rejected = false;

  void append(int32_t token) {
    const uint64_t prev = slots.empty() ? mix(spec.prefix_cache_key + 12345) : slots.back();
    seq.push_back(token);
    slots.push_back(mix(prev ^ static_cast<uint32_t>(token)));
  }
};

class FakeDevice {
 public:
  FakeDevice(const SchedulerConfig& config, absl::flat_hash_map<uint64_t, Tracked>& tracked)
      : config_(config),
        tracked_(tracked),
        kv_(int64_t{config.num_kv_blocks} * config.kv_block_size, 0) {}

  // Executes a plan: checks inputs and every KV slot read, writes KV, samples.
  StepOutput run(const StepPlan& plan) {
    StepOutput out;
    out.step_id = plan.step_id;
    const int32_t bs = config_.kv_block_size;
    // No block may be written by one request and named by another in the same step.
    absl::flat_hash_map<int32_t, uint64_t> writer;
    for (const StepRequest& q : plan.requests) {
      for (int32_t b = q.first_position / bs; b < (q.context_length() + bs - 1) / bs; ++b) {
        writer[q.block_table[b]] = q.request_id;
      }
    }
    for (const StepRequest& q : plan.requests) {
      for (int32_t b : q.block_table) {
        auto it = writer.find(b);
        if (it != writer.end() && it->second != q.request_id) {
          ADD_FAILURE() << "step " << plan.step_id << ": block " << b << " written by request "
                        << it->second << " is also in request " << q.request_id << "'s table";
          return out;
        }
      }
    }
    for (const StepRequest& q : plan.requests) {
      Tracked& t = tracked_.at(q.request_id);
      const int32_t first = q.first_position;
      const int32_t ctx = q.context_length();
      if (static_cast<int32_t>(q.block_table.size()) != (ctx + bs - 1) / bs ||
          q.prompt_token_ids.size() != t.spec.prompt_token_ids.size() || q.seed != t.spec.seed ||
          q.sampling.max_tokens != t.spec.sampling.max_tokens) {
        ADD_FAILURE() << "request " << q.request_id << ": bad block table size or fields";
        return out;
      }
      for (int32_t p = 0; p < first; ++p) {  // attention reads the cached context
        if (kv_[slot(q, p)] != t.slots[p]) {
          ADD_FAILURE() << "step " << plan.step_id << " request " << q.request_id
                        << ": KV at position " << p << " is not its own";
          return out;
        }
      }
      for (int32_t k = 0; k < q.num_tokens(); ++k) {
        const int32_t p = first + k;
        const int32_t token = q.token_ids[k];
        const bool forwarded = token == kTokenFromPreviousStep;
        if (p >= static_cast<int32_t>(t.seq.size()) ||
            (forwarded ? (p + 1 != static_cast<int32_t>(t.seq.size()) ||
                          t.last_sample_step + 1 != plan.step_id)
                       : t.seq[p] != token)) {
          ADD_FAILURE() << "step " << plan.step_id << " request " << q.request_id
                        << ": wrong input " << token << " at position " << p;
          return out;
        }
        kv_[slot(q, p)] = t.slots[p];
      }
      if (!q.sample) continue;
      const int32_t index = ctx - static_cast<int32_t>(t.spec.prompt_token_ids.size());
      if (ctx != static_cast<int32_t>(t.seq.size()) || q.output_token_index != index) {
        ADD_FAILURE() << "request " << q.request_id << " samples at " << ctx << " but has "
                      << t.seq.size() << " tokens";
        return out;
      }
      std::vector<int32_t> want_banned;
      if (index < t.spec.sampling.min_tokens) {
        if (!t.spec.sampling.ignore_eos) want_banned.push_back(kEos);
        for (int32_t id : t.spec.sampling.stop_token_ids) want_banned.push_back(id);
      }
      if (q.banned_token_ids != want_banned) {
        ADD_FAILURE() << "request " << q.request_id << ": wrong banned ids at index " << index;
        return out;
      }
      const uint64_t h = mix(q.request_id * 1000003 + ctx);
      int32_t token = h % 30 == 0 ? kEos : 3 + static_cast<int32_t>((h >> 8) % (kVocab - 3));
      if (contains(q.banned_token_ids, token)) token = kSafeToken;
      t.append(token);
      t.last_sample_step = plan.step_id;
      out.sampled.push_back({q.request_id, token, -1.0f, {}});
    }
    return out;
  }

 private:
  int64_t slot(const StepRequest& q, int32_t p) const {
    const int32_t bs = config_.kv_block_size;
    return int64_t{q.block_table[p / bs]} * bs + p % bs;
  }

  const SchedulerConfig config_;
  absl::flat_hash_map<uint64_t, Tracked>& tracked_;
  std::vector<uint64_t> kv_;
};

// The outcome the stop rules give for the device's tokens: how many are reported, and why
// the request finished.
std::pair<size_t, FinishReason> expected_outcome(const Tracked& t, int32_t max_model_len) {
  const SamplingParams& sp = t.spec.sampling;
  const size_t prompt_len = t.spec.prompt_token_ids.size();
  for (size_t i = 0; prompt_len + i < t.seq.size(); ++i) {
    const int32_t token = t.seq[prompt_len + i];
    const bool may_stop = static_cast<int32_t>(i) >= sp.min_tokens;
    if (may_stop && ((!sp.ignore_eos && token == kEos) || contains(sp.stop_token_ids, token))) {
      return {i + 1, FinishReason::kStop};
    }
    if (static_cast<int32_t>(i + 1) == sp.max_tokens ||
        static_cast<int32_t>(prompt_len + i + 1) == max_model_len) {
      return {i + 1, FinishReason::kLength};
    }
  }
  return {t.seq.size() - prompt_len, FinishReason::kAbort};  // not finished by the rules
}

// (overlapped scheduling, tight token budget). A budget below max_num_seqs leaves some
// decodes out of a step, which under overlap means their in-flight token cannot be
// forwarded from the previous step.
class SchedulerRandomTest : public ::testing::TestWithParam<std::tuple<bool, bool>> {};

TEST_P(SchedulerRandomTest, TenThousandRequestsKeepEveryInvariant) {
  const auto [overlap, tight_budget] = GetParam();
  SchedulerConfig config;
  config.kv_block_size = 16;
  config.num_kv_blocks = tight_budget ? 48 : 72;  // for up to 24 running requests
  config.max_num_seqs = 24;
  config.max_num_batched_tokens = tight_budget ? 20 : 192;
  config.max_waiting_requests = 48;
  config.max_model_len = 2048;
  config.enable_prefix_caching = true;
  config.eos_token_ids = {kEos};
  absl::StatusOr<std::unique_ptr<Scheduler>> created = Scheduler::create(config);
  ASSERT_TRUE(created.ok()) << created.status();
  Scheduler& s = **created;

  std::mt19937_64 rng((overlap ? 7 : 11) + (tight_budget ? 100 : 0));
  const auto uniform = [&](int32_t lo, int32_t hi) {  // [lo, hi]
    return std::uniform_int_distribution<int32_t>(lo, hi)(rng);
  };
  std::vector<std::vector<int32_t>> shared_prefixes;
  for (int i = 0; i < 8; ++i) {
    std::vector<int32_t> p(16 * uniform(1, 5));
    for (int32_t& t : p) t = uniform(10, kVocab - 1);
    shared_prefixes.push_back(std::move(p));
  }

  absl::flat_hash_map<uint64_t, Tracked> tracked;
  FakeDevice device(config, tracked);
  std::vector<uint64_t> live;
  int64_t rejected_invalid = 0, rejected_full = 0, aborted = 0;
  constexpr uint64_t kNumRequests = 10000;
  uint64_t next_id = 1;
  std::optional<StepOutput> in_flight;
  int64_t steps = 0;
  int64_t reported_by_reason[3] = {0, 0, 0};

  const auto apply_updates = [&](const StepOutput& out) {
    absl::StatusOr<std::vector<RequestUpdate>> updates = s.update(out);
    ASSERT_TRUE(updates.ok()) << updates.status();
    for (const RequestUpdate& u : *updates) {
      Tracked& t = tracked.at(u.request_id);
      ASSERT_FALSE(t.finished.has_value()) << "update for finished request " << u.request_id;
      for (const SampledToken& tok : u.new_tokens) t.reported.push_back(tok.token_id);
      t.finished = u.finished;
      if (u.finished) ++reported_by_reason[static_cast<int>(*u.finished)];
      t.num_cached_prompt_tokens = u.num_cached_prompt_tokens;
    }
  };

  while (next_id <= kNumRequests || s.has_unfinished_requests() || in_flight) {
    ASSERT_LT(++steps, 200000) << "no progress";
    // Arrivals.
    // About the rate the budget serves (one request per step, or one per four with the
    // tight budget), with bursts that fill the waiting queue.
    const int32_t arrivals = tight_budget ? (uniform(0, 799) == 0 ? 40 : uniform(0, 3) == 0)
                                          : (uniform(0, 99) == 0 ? 40 : uniform(0, 2));
    for (int32_t k = arrivals; k > 0 && next_id <= kNumRequests; --k, ++next_id) {
      RequestSpec r;
      r.request_id = next_id;
      // Kinds 0-2 are rejected: an empty prompt, one too long for max_model_len, and one
      // whose max_tokens could never fit the cache. Half the others share a prefix.
      const int32_t kind = uniform(0, 99);
      if (kind == 1) r.prompt_token_ids.assign(config.max_model_len, 10);
      if (kind > 2) {
        if (kind < 50) r.prompt_token_ids = shared_prefixes[uniform(0, 7)];
        for (int32_t i = uniform(kind < 50 ? 0 : 1, 60); i > 0; --i) {
          r.prompt_token_ids.push_back(uniform(10, kVocab - 1));
        }
      }
      r.sampling.max_tokens = kind == 2 ? 2000 : uniform(1, 64);  // 2000: never fits the cache
      if (uniform(0, 9) == 0)
        r.sampling.min_tokens = uniform(0, std::min(3, r.sampling.max_tokens));
      r.sampling.ignore_eos = uniform(0, 9) == 0;
      if (uniform(0, 4) == 0) r.sampling.stop_token_ids = {kStopIdPool[uniform(0, 2)]};
      r.priority = uniform(0, 2) == 0 ? uniform(0, 2) : 0;
      r.prefix_cache_key = uniform(0, 9) == 0 ? 1 : 0;
      r.seed = mix(next_id);
      Tracked& t = tracked[next_id];
      t.spec = r;
      for (int32_t token : r.prompt_token_ids) t.append(token);
      absl::Status st = s.add_request(std::move(r));
      if (st.ok()) {
        live.push_back(next_id);
      } else if (st.code() == absl::StatusCode::kResourceExhausted) {
        ++rejected_full;
        t.finished = FinishReason::kAbort;
        t.rejected = true;
      } else {
        ASSERT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
        ASSERT_TRUE(kind <= 2) << "request of kind " << kind << " rejected: " << st;
        ++rejected_invalid;
        t.finished = FinishReason::kAbort;
        t.rejected = true;
      }
    }
    // Random aborts (cancelled clients, or a stop string the output side matched).
    for (bool abort = uniform(0, tight_budget ? 79 : 9) == 0; abort && !live.empty();) {
      const size_t i = uniform(0, static_cast<int32_t>(live.size()) - 1);
      Tracked& t = tracked.at(live[i]);
      if (!t.finished) {
        ASSERT_TRUE(s.finish(live[i], FinishReason::kAbort).ok());
        t.finished = FinishReason::kAbort;
        t.aborted = true;
        ++aborted;
        abort = false;
      }
      live[i] = live.back();
      live.pop_back();
    }

    const StepPlan plan = s.schedule();
    ASSERT_LE(plan.num_tokens(), config.max_num_batched_tokens);
    ASSERT_LE(static_cast<int32_t>(plan.requests.size()), config.max_num_seqs);
    absl::flat_hash_set<uint64_t> ids;
    for (const StepRequest& q : plan.requests) {
      ASSERT_TRUE(ids.insert(q.request_id).second) << "request twice in one step";
      ASSERT_GE(q.num_tokens(), 1);
      for (int32_t b : q.block_table) ASSERT_GE(s.kv_block_pool().ref_count(b), 1);
    }
    {
      absl::Status inv = s.check_invariants();
      ASSERT_TRUE(inv.ok()) << "after schedule " << plan.step_id << ": " << inv;
    }
    std::optional<StepOutput> out;
    if (!plan.requests.empty()) out = device.run(plan);
    ASSERT_FALSE(HasFailure());
    if (overlap) {
      if (in_flight) apply_updates(*in_flight);
      in_flight = std::move(out);
    } else if (out) {
      apply_updates(*out);
    }
    ASSERT_FALSE(HasFailure());
    absl::Status inv = s.check_invariants();
    ASSERT_TRUE(inv.ok()) << "after update: " << inv;
    if (plan.requests.empty() && !in_flight && s.has_unfinished_requests() &&
        next_id > kNumRequests) {
      FAIL() << "stalled: unfinished requests but nothing scheduled";
    }
  }

  // Every request finished or was rejected, and reported exactly what the rules allow.
  int64_t by_reason[3] = {0, 0, 0};
  for (uint64_t id = 1; id <= kNumRequests; ++id) {
    const Tracked& t = tracked.at(id);
    ASSERT_TRUE(t.finished.has_value()) << "request " << id << " never finished";
    const size_t prompt_len = t.spec.prompt_token_ids.size();
    ASSERT_LE(t.reported.size() + prompt_len, t.seq.size());
    ASSERT_TRUE(std::equal(t.reported.begin(), t.reported.end(), t.seq.begin() + prompt_len))
        << "request " << id << " reported tokens the device did not produce";
    const auto [want_len, want_reason] = expected_outcome(t, config.max_model_len);
    if (t.rejected) {
      ASSERT_TRUE(t.reported.empty());
    } else if (t.aborted) {
      ASSERT_LE(t.reported.size(), want_len) << "request " << id;
    } else {
      ASSERT_EQ(t.reported.size(), want_len) << "request " << id;
      ASSERT_EQ(*t.finished, want_reason) << "request " << id;
      ASSERT_EQ(t.num_cached_prompt_tokens % config.kv_block_size, 0);
      ASSERT_LT(t.num_cached_prompt_tokens, static_cast<int32_t>(prompt_len));
      ++by_reason[static_cast<int>(want_reason)];
    }
  }
  const SchedulerStats st = s.stats();
  EXPECT_EQ(reported_by_reason[0], by_reason[0]);
  EXPECT_EQ(reported_by_reason[1], by_reason[1]);
  EXPECT_EQ(st.num_finished_stop, by_reason[0]);
  EXPECT_EQ(st.num_finished_length, by_reason[1]);
  EXPECT_EQ(st.num_finished_abort, aborted);
  EXPECT_EQ(st.num_rejected_invalid, rejected_invalid);
  EXPECT_EQ(st.num_rejected_queue_full, rejected_full);
  EXPECT_EQ(by_reason[0] + by_reason[1] + aborted + rejected_invalid + rejected_full,
            static_cast<int64_t>(kNumRequests));
  EXPECT_EQ(st.num_waiting, 0);
  EXPECT_EQ(st.num_running, 0);
  EXPECT_EQ(st.num_kv_blocks_used, 0);
  EXPECT_EQ(s.kv_block_pool().num_free_blocks(), config.num_kv_blocks);
  // The run exercised what it is meant to.
  EXPECT_GT(st.num_preemptions, 50);
  EXPECT_GT(st.prefix_cache_hits, st.prefix_cache_queries / 10);
  EXPECT_GT(rejected_invalid, 50);
  EXPECT_GT(aborted, 100);
  EXPECT_GT(by_reason[0], 1000);
  EXPECT_GT(by_reason[1], 1000);
  std::printf(
      "overlap=%d tight=%d: %lld steps, %lld preemptions, prefix hits %lld/%lld tokens, "
      "stop %lld, length %lld, aborted %lld, rejected %lld invalid + %lld queue full\n",
      overlap, tight_budget, static_cast<long long>(st.num_steps),
      static_cast<long long>(st.num_preemptions), static_cast<long long>(st.prefix_cache_hits),
      static_cast<long long>(st.prefix_cache_queries), static_cast<long long>(by_reason[0]),
      static_cast<long long>(by_reason[1]), static_cast<long long>(aborted),
      static_cast<long long>(rejected_invalid), static_cast<long long>(rejected_full));
}

INSTANTIATE_TEST_SUITE_P(Modes, SchedulerRandomTest,
                         ::testing::Combine(::testing::Bool(), ::testing::Bool()),
                         [](const ::testing::TestParamInfo<std::tuple<bool, bool>>& info) {
                           return std::string(std::get<0>(info.param) ? "Overlapped"
                                                                      : "Sequential") +
                                  (std::get<1>(info.param) ? "TightBudget" : "");
                         });

}  // namespace
}  // namespace megaserve::scheduler
