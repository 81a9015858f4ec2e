// Scheduler: admission, update (stop conditions), finish, stats and invariants. Planning a
// step lives in scheduler_step.cc.
#include "scheduler/scheduler.h"

#include <algorithm>
#include <tuple>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "scheduler/request.h"

namespace megaserve::scheduler {
namespace {

bool contains(const std::vector<int32_t>& ids, int32_t id) {
  return std::find(ids.begin(), ids.end(), id) != ids.end();
}

}  // namespace

const char* finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kAbort:
      return "abort";
    case FinishReason::kError:
      return "error";
  }
  return "unknown";
}

bool Scheduler::RankLess::operator()(const Request* a, const Request* b) const {
  return std::tie(a->priority, a->arrival) < std::tie(b->priority, b->arrival);
}

absl::StatusOr<std::unique_ptr<Scheduler>> Scheduler::create(const SchedulerConfig& config) {
  absl::StatusOr<KvBlockPool> pool = KvBlockPool::create(
      {config.kv_block_size, config.num_kv_blocks, config.enable_prefix_caching});
  if (!pool.ok()) return pool.status();
  const auto positive = [](const char* name, int32_t value) -> absl::Status {
    if (value >= 1) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat(name, " must be at least 1, got ", value));
  };
  if (config.max_prefill_tokens_with_decodes < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_prefill_tokens_with_decodes must be at least 0, got ",
                     config.max_prefill_tokens_with_decodes));
  }
  for (absl::Status s : {positive("max_num_seqs", config.max_num_seqs),
                         positive("max_num_batched_tokens", config.max_num_batched_tokens),
                         positive("max_waiting_requests", config.max_waiting_requests)}) {
    if (!s.ok()) return s;
  }
  if (config.max_model_len < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_model_len must be at least 2, got ", config.max_model_len));
  }
  return std::unique_ptr<Scheduler>(new Scheduler(config, *std::move(pool)));
}

Scheduler::Scheduler(const SchedulerConfig& config, KvBlockPool pool)
    : config_(config), pool_(std::move(pool)) {}

Scheduler::~Scheduler() = default;

absl::Status Scheduler::add_request(RequestSpec spec) {
  const auto invalid = [&](auto&&... parts) {
    ++counters_.num_rejected_invalid;
    return absl::InvalidArgumentError(absl::StrCat("request ", spec.request_id, ": ", parts...));
  };
  const int64_t prompt_len = static_cast<int64_t>(spec.prompt_token_ids.size());
  const SamplingParams& sp = spec.sampling;
  if (prompt_len == 0) return invalid("prompt is empty");
  for (int64_t i = 0; i < prompt_len; ++i) {
    if (spec.prompt_token_ids[i] < 0) {
      return invalid("prompt token ", i, " has negative id ", spec.prompt_token_ids[i]);
    }
  }
  if (sp.max_tokens < 1) return invalid("max_tokens must be at least 1, got ", sp.max_tokens);
  if (sp.min_tokens < 0 || sp.min_tokens > sp.max_tokens) {
    return invalid("min_tokens must be in [0, max_tokens=", sp.max_tokens, "], got ",
                   sp.min_tokens);
  }
  if (prompt_len >= config_.max_model_len) {
    return invalid("prompt of ", prompt_len, " tokens leaves no room to generate within ",
                   "max_model_len ", config_.max_model_len);
  }
  // In 64 bits: prompt_len + max_tokens may pass INT32_MAX (max_model_len may be near it).
  const int32_t max_length =
      static_cast<int32_t>(std::min<int64_t>(prompt_len + sp.max_tokens, config_.max_model_len));
  const int64_t blocks_needed = pool_.blocks_for(max_length - 1);
  // A request that cannot fit alone would fill the cache, be preempted and wait at the head
  // of the queue forever, holding back everyone behind it: reject it now.
  if (blocks_needed > pool_.num_blocks()) {
    return invalid("prompt of ", prompt_len, " tokens with max_tokens ", sp.max_tokens, " needs ",
                   blocks_needed, " KV blocks, more than the whole cache (", pool_.num_blocks(),
                   " blocks of ", pool_.block_size(), " tokens)");
  }
  if (requests_.contains(spec.request_id)) {
    ++counters_.num_rejected_invalid;
    return absl::AlreadyExistsError(absl::StrCat("request id ", spec.request_id, " is in use"));
  }
  if (static_cast<int32_t>(waiting_.size()) >= config_.max_waiting_requests) {
    ++counters_.num_rejected_queue_full;
    return absl::ResourceExhaustedError(
        absl::StrCat("waiting queue is full (", config_.max_waiting_requests, " requests)"));
  }

  auto r = std::make_unique<Request>();
  r->id = spec.request_id;
  r->arrival = next_arrival_++;
  r->priority = spec.priority;
  r->seed = spec.seed;
  r->prefix_cache_key = spec.prefix_cache_key;
  r->sampling = std::move(spec.sampling);
  r->num_prompt_tokens = static_cast<int32_t>(prompt_len);  // < max_model_len
  r->max_length = max_length;
  r->token_ids.reserve(max_length);
  r->token_ids = std::move(spec.prompt_token_ids);
  r->token_ids.reserve(max_length);  // a moved-in vector brings its own capacity
  waiting_.insert(r.get());
  requests_.emplace(r->id, std::move(r));
  return absl::OkStatus();
}

absl::StatusOr<std::vector<RequestUpdate>> Scheduler::update(const StepOutput& output) {
  if (in_flight_.empty() || output.step_id != in_flight_.front().step_id) {
    return absl::InvalidArgumentError(absl::StrCat(
        "output of step ", output.step_id, " but the oldest step awaiting update is ",
        in_flight_.empty() ? std::string("none") : absl::StrCat(in_flight_.front().step_id)));
  }
  InFlightStep& step = in_flight_.front();
  if (output.sampled.size() != step.sampling.size()) {
    return absl::InvalidArgumentError(absl::StrCat("step ", step.step_id, " sampled ",
                                                   step.sampling.size(), " requests, output has ",
                                                   output.sampled.size(), " tokens"));
  }
  for (size_t i = 0; i < step.sampling.size(); ++i) {
    const SampledToken& t = output.sampled[i];
    if (t.request_id != step.sampling[i]->id || t.token_id < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "step ", step.step_id, " output ", i, ": token ", t.token_id, " for request ",
          t.request_id, ", expected request ", step.sampling[i]->id, " and a token id >= 0"));
    }
  }

  std::vector<RequestUpdate> updates;
  updates.reserve(step.sampling.size());
  for (size_t i = 0; i < step.sampling.size(); ++i) {
    Request* r = step.sampling[i];
    --r->num_pending_tokens;
    if (r->state == RequestState::kFinished) continue;  // finished earlier: token discarded
    std::optional<FinishReason> reason = append_token(r, output.sampled[i].token_id);
    RequestUpdate& u = updates.emplace_back();
    u.request_id = r->id;
    u.new_tokens.push_back(output.sampled[i]);
    u.finished = reason;
    u.num_cached_prompt_tokens = std::max(0, r->num_cached_prompt_tokens);
    if (reason) finish_request(r, *reason);
  }
  for (Request* r : step.scheduled) {
    --r->num_in_flight_steps;
    retire_if_done(r);
  }
  in_flight_.pop_front();
  return updates;
}

std::optional<FinishReason> Scheduler::append_token(Request* r, int32_t token_id) {
  // Index in the output of this token; stop tokens count only from index min_tokens on
  // (before that the sampler was told to ban them: StepRequest::banned_token_ids).
  const int32_t index = r->num_known_tokens() - r->num_prompt_tokens;
  r->token_ids.push_back(token_id);
  const bool may_stop = index >= r->sampling.min_tokens;
  if (may_stop && !r->sampling.ignore_eos && contains(config_.eos_token_ids, token_id)) {
    return FinishReason::kStop;
  }
  if (may_stop && contains(r->sampling.stop_token_ids, token_id)) return FinishReason::kStop;
  if (r->num_known_tokens() >= r->max_length) return FinishReason::kLength;
  return std::nullopt;
}

absl::Status Scheduler::finish(uint64_t request_id, FinishReason reason) {
  auto it = requests_.find(request_id);
  if (it == requests_.end() || it->second->state == RequestState::kFinished) {
    return absl::NotFoundError(absl::StrCat("request ", request_id, " is not in progress"));
  }
  Request* r = it->second.get();
  finish_request(r, reason);
  retire_if_done(r);
  return absl::OkStatus();
}

void Scheduler::finish_request(Request* r, FinishReason reason) {
  if (r->state == RequestState::kWaiting) {
    waiting_.erase(r);
  } else if (r->state == RequestState::kRunning) {
    running_.erase(std::find(running_.begin(), running_.end(), r));
  }
  pool_.free(r->blocks);
  r->state = RequestState::kFinished;
  r->finish_reason = reason;
  switch (reason) {
    case FinishReason::kStop:
      ++counters_.num_finished_stop;
      break;
    case FinishReason::kLength:
      ++counters_.num_finished_length;
      break;
    case FinishReason::kAbort:
    case FinishReason::kError:
      ++counters_.num_finished_abort;
      break;
  }
}

void Scheduler::retire_if_done(Request* r) {
  // Kept while a planned step names it: that plan's spans point into it, and its sampled
  // tokens must be recognised as discarded.
  if (r->state == RequestState::kFinished && r->num_in_flight_steps == 0) {
    requests_.erase(r->id);
  }
}

SchedulerStats Scheduler::stats() const {
  SchedulerStats s = counters_;
  s.num_waiting = static_cast<int32_t>(waiting_.size());
  s.num_running = static_cast<int32_t>(running_.size());
  s.num_kv_blocks_total = pool_.num_blocks();
  s.num_kv_blocks_used = pool_.num_used_blocks();
  s.num_kv_blocks_cached_free = pool_.num_cached_free_blocks();
  return s;
}

absl::Status Scheduler::check_invariants() const {
  const auto fail = [](auto&&... parts) {
    return absl::FailedPreconditionError(absl::StrCat(parts...));
  };
  std::vector<const BlockTable*> tables;
  absl::flat_hash_map<const Request*, std::pair<int32_t, int32_t>> in_flight;  // steps, samples
  for (const InFlightStep& step : in_flight_) {
    for (const Request* r : step.scheduled) ++in_flight[r].first;
    for (const Request* r : step.sampling) ++in_flight[r].second;
  }
  int32_t num_unfinished = 0;
  for (const auto& [id, r] : requests_) {
    tables.push_back(&r->blocks);
    const auto counts = in_flight.contains(r.get()) ? in_flight[r.get()] : std::pair{0, 0};
    if (counts.first != r->num_in_flight_steps || counts.second != r->num_pending_tokens) {
      return fail("request ", id, " counts ", r->num_in_flight_steps, " steps and ",
                  r->num_pending_tokens, " tokens in flight; the steps say ", counts.first, " and ",
                  counts.second);
    }
    if (r->num_known_tokens() > r->max_length || r->num_tokens() > r->max_length) {
      return fail("request ", id, " has ", r->num_tokens(), " tokens, past its max length ",
                  r->max_length);
    }
    if (r->state == RequestState::kFinished) {
      if (!r->blocks.blocks.empty()) return fail("finished request ", id, " holds blocks");
      if (r->num_in_flight_steps == 0) return fail("finished request ", id, " not retired");
      continue;
    }
    ++num_unfinished;
    if (r->state == RequestState::kWaiting) {
      if (!waiting_.contains(r.get())) return fail("waiting request ", id, " not queued");
      if (r->num_computed_tokens != 0 || !r->blocks.blocks.empty()) {
        return fail("waiting request ", id, " has computed tokens or blocks");
      }
    } else {
      if (std::find(running_.begin(), running_.end(), r.get()) == running_.end()) {
        return fail("running request ", id, " not in the running list");
      }
      if (r->num_computed_tokens < 1 || r->num_computed_tokens >= r->num_tokens() ||
          r->blocks.num_blocks() != pool_.blocks_for(r->num_computed_tokens)) {
        return fail("running request ", id, " computed ", r->num_computed_tokens, " of ",
                    r->num_tokens(), " tokens with ", r->blocks.num_blocks(), " blocks");
      }
    }
  }
  if (num_unfinished != static_cast<int32_t>(waiting_.size() + running_.size())) {
    return fail(num_unfinished, " unfinished requests but ", waiting_.size(), " waiting and ",
                running_.size(), " running");
  }
  if (static_cast<int32_t>(running_.size()) > config_.max_num_seqs) {
    return fail(running_.size(), " running requests exceed max_num_seqs");
  }
  if (!std::is_sorted(running_.begin(), running_.end(), RankLess{})) {
    return fail("running list is out of rank order");
  }
  return pool_.check_consistency(tables);
}

}  // namespace megaserve::scheduler
