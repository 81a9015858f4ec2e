// The continuous-batching scheduler: it owns every request's state and the KV block pool,
// and each step decides how many tokens of which requests run. The engine loop drives it:
//
//   add_request(spec)      admission (or a reason why not)
//   plan = schedule()      step N: tokens, positions, block tables, who samples
//   update(output of N)    sampled tokens applied, stop conditions, blocks of finished freed
//   finish(id, reason)     abort, or a stop string the output side matched
//
// There are no prefill and decode phases. A request has num_tokens (prompt + generated, plus
// tokens still being sampled by in-flight steps) and num_computed_tokens (positions whose KV
// is computed or scheduled); every step moves the second toward the first, within a token
// budget (max_num_batched_tokens) and a sequence cap (max_num_seqs). Order within a step:
//   1. running requests with one token left (decodes), in rank order;
//   2. running requests with more left (a prompt in chunks, or re-prefill after preemption);
//   3. waiting requests in rank order, while budget, the cap and free blocks allow; none in a
//      step that preempted (the blocks are short), and the first that does not fit stops it.
// Where 1 picked any decode, 2 and 3 share at most max_prefill_tokens_with_decodes (when set).
// Rank: lower priority value first, then earlier arrival (FCFS when priorities are equal;
// the default priority 0 makes FCFS the default policy).
//
// KV exhaustion: when a scheduled request needs a block and none is free, the lowest-ranked
// running request is preempted (blocks freed, num_computed_tokens reset to 0, back to the
// waiting queue, where its rank puts it at the front of its priority class); it keeps its
// generated tokens and later prefills prompt + generated tokens again (its prefix may still
// be cached). If the request itself ranks lowest it is the one preempted. Admission rejects
// a request that could not fit alone, so the highest-ranked request always progresses.
//
// Overlapped scheduling: schedule() for step N+1 may run before update() for step N. A
// request that samples in N then runs in N+1 with input kTokenFromPreviousStep at its next
// position (the device writes it). If step N's token finishes it (EOS, stop id), its N+1
// token is discarded: update() never reports it. Finishing by length is known at schedule
// time, so such a request is not scheduled past its last token. A request whose token is
// still in flight runs only if it ran in the step just before (the device forwards tokens
// only from there), and a preempted one is not re-admitted until the token is known.
// Blocks are allocated when a step is scheduled and freed when a request finishes or is
// preempted; steps execute in order on the device, so a block freed while an earlier step
// is in flight is only reused by a later step.
//
// Not thread-safe: one engine thread calls everything.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <vector>

#include "absl/container/btree_set.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "scheduler/kv_block_pool.h"
#include "scheduler/sampling_params.h"
#include "scheduler/step_plan.h"

namespace megaserve::scheduler {

struct SchedulerConfig {
  int32_t kv_block_size = 16;  // power of two in [16, 128]
  int32_t num_kv_blocks = 0;   // from the engine's memory budget: see num_kv_blocks_for_budget
  int32_t max_num_seqs = 256;  // requests per step, and running requests at any time
  int32_t max_num_batched_tokens = 8192;  // input tokens per step
  // Input tokens of prompts (chunks of running prefills, admissions) per step at most when the
  // step has decodes; 0: only max_num_batched_tokens. A long prompt then joins a loaded batch
  // in chunks of this size, so the decodes' inter-token latency stays near a decode step's
  // (the tokens a preemption refunds in the same step may exceed it).
  int32_t max_prefill_tokens_with_decodes = 0;
  int32_t max_waiting_requests = 4096;    // waiting queue (preempted requests included)
  // Longest sequence, prompt + generated tokens. A request stops (kLength) on reaching it;
  // the last token is never fed back, so KV holds at most max_model_len - 1 positions.
  int32_t max_model_len = 2048;
  bool enable_prefix_caching = true;
  std::vector<int32_t> eos_token_ids;
};

struct RequestSpec {
  uint64_t request_id = 0;  // unique among requests the scheduler still knows
  std::vector<int32_t> prompt_token_ids;
  SamplingParams sampling;
  int32_t priority = 0;  // lower runs first; ties by arrival
  uint64_t seed = 0;     // resolved seed, copied to every StepRequest
  // Prefix-cache extra key: anything besides the token ids that changes KV content (a LoRA
  // adapter id, say). Requests share cached blocks only when their keys are equal.
  uint64_t prefix_cache_key = 0;
};

enum class FinishReason {
  kStop,    // EOS (unless ignore_eos), a stop token id, or a stop string (via finish)
  kLength,  // max_tokens generated, or max_model_len reached
  kAbort,   // finish(id, kAbort): cancelled, deadline passed, shutting down
  kError,   // finish(id, kError): the engine failed the step it was in (counted as aborted)
};
const char* finish_reason_name(FinishReason reason);

// What update() reports for one request: the tokens that became final this step (the stop
// token itself included) and, when it finished, why.
struct RequestUpdate {
  uint64_t request_id = 0;
  std::vector<SampledToken> new_tokens;
  std::optional<FinishReason> finished;
  int32_t num_cached_prompt_tokens = 0;  // prompt tokens found in the prefix cache at admission
};

// Counts (monotonic) and gauges (current values) for metrics.
struct SchedulerStats {
  int32_t num_waiting = 0;
  int32_t num_running = 0;
  int32_t num_kv_blocks_total = 0;
  int32_t num_kv_blocks_used = 0;         // referenced by some request
  int32_t num_kv_blocks_cached_free = 0;  // unreferenced but still holding reusable prefixes
  int64_t num_steps = 0;                  // non-empty plans
  // Prefix cache, counted only when it is enabled: the tokens of the sequence at each
  // admission (resumes after preemption too), and of those, the tokens found cached.
  int64_t prefix_cache_queries = 0;
  int64_t prefix_cache_hits = 0;
  int64_t num_preemptions = 0;
  int64_t num_finished_stop = 0;
  int64_t num_finished_length = 0;
  int64_t num_finished_abort = 0;
  int64_t num_rejected_invalid = 0;     // InvalidArgument / AlreadyExists at add_request
  int64_t num_rejected_queue_full = 0;  // ResourceExhausted at add_request
};

struct Request;  // scheduler/request.h

class Scheduler {
 public:
  // InvalidArgument naming the field when `config` is out of range.
  static absl::StatusOr<std::unique_ptr<Scheduler>> create(const SchedulerConfig& config);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Queues a request. InvalidArgument: empty prompt, a negative token id, max_tokens < 1,
  // min_tokens < 0 or > max_tokens, prompt_len >= max_model_len (no room to generate), or a
  // request that could not fit the KV cache even alone: it needs
  //   ceil((min(prompt_len + max_tokens, max_model_len) - 1) / kv_block_size)
  // blocks (every position but the last token's), more than num_kv_blocks.
  // AlreadyExists: the id is still known. ResourceExhausted: the waiting queue is full.
  absl::Status add_request(RequestSpec spec);

  // Plans the next step. An empty plan (no requests) has step_id 0 and needs no update().
  // Spans in the plan point into request state and stay valid until update() for this
  // step returns (a request finished meanwhile is kept alive that long).
  StepPlan schedule();

  // Applies a step's output. Steps are updated in the order they were planned, one update
  // per non-empty plan; `output.sampled` lists, in plan order, one token for each request
  // with sample = true. InvalidArgument (nothing applied) when it does not match the oldest
  // step not yet updated.
  absl::StatusOr<std::vector<RequestUpdate>> update(const StepOutput& output);

  // Finishes a waiting or running request now and frees its blocks; tokens still in flight
  // for it are discarded. Not reported by update(): the caller knows. NotFound when the id is
  // unknown or already finished.
  absl::Status finish(uint64_t request_id, FinishReason reason);

  SchedulerStats stats() const;
  const SchedulerConfig& config() const { return config_; }
  const KvBlockPool& kv_block_pool() const { return pool_; }
  bool has_unfinished_requests() const { return !waiting_.empty() || !running_.empty(); }

  // For tests and debugging: block tables and reference counts agree, queues are ordered and
  // consistent with request states, in-flight bookkeeping adds up. FailedPrecondition names
  // the first thing wrong.
  absl::Status check_invariants() const;

 private:
  struct RankLess {
    bool operator()(const Request* a, const Request* b) const;
  };
  // A step handed out by schedule() and not yet updated.
  struct InFlightStep {
    uint64_t step_id = 0;
    std::vector<Request*> scheduled;  // every request in the plan
    std::vector<Request*> sampling;   // those with sample = true, in plan order
  };
  // A request's tokens picked for the step being planned (live = false once preempted).
  struct Pick {
    Request* request;
    int32_t num_tokens;
    bool live;
  };

  Scheduler(const SchedulerConfig& config, KvBlockPool pool);

  // Picks a running request's next tokens, preempting from the back of running_ until its
  // blocks fit (possibly itself).
  void schedule_running(Request* r, uint64_t step_id, int32_t& budget);
  void schedule_waiting(int32_t& budget);
  // Preempts running_.back(), refunding its pick in this step if it had one.
  void preempt(Request* victim, int32_t& budget);
  void fill_step_request(const Pick& pick, uint64_t step_id, StepRequest& out,
                         InFlightStep& record);
  // Appends a sampled token and applies stop conditions; returns the finish reason if any.
  std::optional<FinishReason> append_token(Request* r, int32_t token_id);
  void finish_request(Request* r, FinishReason reason);
  void retire_if_done(Request* r);

  const SchedulerConfig config_;
  KvBlockPool pool_;
  absl::flat_hash_map<uint64_t, std::unique_ptr<Request>> requests_;  // every known request
  absl::btree_set<Request*, RankLess> waiting_;
  std::vector<Request*> running_;  // sorted by rank: preemption takes from the back
  std::deque<InFlightStep> in_flight_;
  std::vector<Pick> picks_;  // scratch for schedule()
  uint64_t next_arrival_ = 0;
  uint64_t last_step_id_ = 0;
  SchedulerStats counters_;  // the monotonic part of stats()
};

}  // namespace megaserve::scheduler
