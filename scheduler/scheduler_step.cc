// Scheduler::schedule(): picking each step's tokens (see the order in scheduler.h), then
// committing the picks into a StepPlan. Picks stay tentative until the commit so that a
// request picked earlier in the step can still be preempted (and its tokens refunded) when a
// higher-ranked request needs its blocks.
#include <algorithm>

#include "scheduler/request.h"
#include "scheduler/scheduler.h"

namespace megaserve::scheduler {

StepPlan Scheduler::schedule() {
  StepPlan plan;
  plan.kv_block_size = config_.kv_block_size;
  const uint64_t step_id = last_step_id_ + 1;
  picks_.clear();
  int32_t budget = config_.max_num_batched_tokens;
  const int64_t preemptions_before = counters_.num_preemptions;

  // Pass 0: decodes (one token left). Pass 1: chunks of longer prefills. running_ shrinks
  // from the back while we iterate (preemption), which leaves earlier indices in place.
  for (int pass = 0; pass < 2; ++pass) {
    // Prompt tokens beside decodes: at most max_prefill_tokens_with_decodes.
    if (pass == 1 && config_.max_prefill_tokens_with_decodes > 0 &&
        std::any_of(picks_.begin(), picks_.end(), [](const Pick& p) { return p.live; })) {
      budget = std::min(budget, config_.max_prefill_tokens_with_decodes);
    }
    for (size_t i = 0; i < running_.size() && budget > 0; ++i) {
      Request* r = running_[i];
      if (r->pick_index >= 0) continue;
      const bool is_decode = r->num_tokens() - r->num_computed_tokens == 1;
      if (is_decode != (pass == 0)) continue;
      schedule_running(r, step_id, budget);
    }
  }
  // Admitting while running requests lose their blocks would only preempt again.
  if (counters_.num_preemptions == preemptions_before) schedule_waiting(budget);

  InFlightStep record;
  record.step_id = step_id;
  plan.requests.reserve(picks_.size());
  record.scheduled.reserve(picks_.size());
  record.sampling.reserve(picks_.size());
  for (const Pick& pick : picks_) {
    pick.request->pick_index = -1;
    if (!pick.live) continue;
    fill_step_request(pick, step_id, plan.requests.emplace_back(), record);
  }
  picks_.clear();
  if (plan.requests.empty()) return plan;  // step_id 0: nothing to run or update
  plan.step_id = step_id;
  last_step_id_ = step_id;
  ++counters_.num_steps;
  in_flight_.push_back(std::move(record));
  return plan;
}

void Scheduler::schedule_running(Request* r, uint64_t step_id, int32_t& budget) {
  // Its in-flight token is its last (max_tokens or max_model_len): update() finishes it.
  if (r->num_tokens() >= r->max_length) return;
  // Its next input is in flight; the device forwards it only from the step just before.
  if (r->num_pending_tokens > 0 && r->last_scheduled_step + 1 != step_id) return;
  const int32_t n = std::min(r->num_tokens() - r->num_computed_tokens, budget);
  while (!pool_.allocate(r->blocks, r->num_computed_tokens + n)) {
    Request* victim = running_.back();  // lowest rank
    preempt(victim, budget);
    if (victim == r) return;
  }
  r->pick_index = static_cast<int32_t>(picks_.size());
  picks_.push_back({r, n, true});
  budget -= n;
}

void Scheduler::preempt(Request* victim, int32_t& budget) {
  running_.pop_back();
  if (victim->pick_index >= 0) {
    Pick& pick = picks_[victim->pick_index];
    pick.live = false;
    budget += pick.num_tokens;
    victim->pick_index = -1;
  }
  pool_.free(victim->blocks);
  victim->num_computed_tokens = 0;
  victim->state = RequestState::kWaiting;
  waiting_.insert(victim);
  ++counters_.num_preemptions;
}

void Scheduler::schedule_waiting(int32_t& budget) {
  const int32_t block_size = pool_.block_size();
  for (auto it = waiting_.begin(); it != waiting_.end() && budget > 0 &&
                                   static_cast<int32_t>(running_.size()) < config_.max_num_seqs;) {
    Request* r = *it;
    // Preempted with a token still in flight: its sequence is not known yet.
    if (r->num_pending_tokens > 0) {
      ++it;
      continue;
    }
    const int32_t num_tokens = r->num_tokens();
    // The last token is always computed, so that there are logits to sample.
    const std::vector<int32_t> prefix = pool_.match_prefix(
        std::span<const int32_t>(r->token_ids).first(num_tokens - 1), r->prefix_cache_key);
    const int32_t num_cached = static_cast<int32_t>(prefix.size()) * block_size;
    const int32_t n = std::min(num_tokens - num_cached, budget);
    if (!pool_.allocate(r->blocks, num_cached + n, prefix)) break;  // strict rank order

    if (pool_.prefix_caching_enabled()) {
      counters_.prefix_cache_queries += num_tokens;
      counters_.prefix_cache_hits += num_cached;
    }
    if (r->num_cached_prompt_tokens < 0) {
      r->num_cached_prompt_tokens = std::min(num_cached, r->num_prompt_tokens);
    }
    r->num_computed_tokens = num_cached;
    r->state = RequestState::kRunning;
    it = waiting_.erase(it);
    running_.insert(std::upper_bound(running_.begin(), running_.end(), r, RankLess{}), r);
    r->pick_index = static_cast<int32_t>(picks_.size());
    picks_.push_back({r, n, true});
    budget -= n;
  }
}

void Scheduler::fill_step_request(const Pick& pick, uint64_t step_id, StepRequest& out,
                                  InFlightStep& record) {
  Request* r = pick.request;
  const int32_t first = r->num_computed_tokens;
  const int32_t known = r->num_known_tokens();
  out.request_id = r->id;
  out.first_position = first;
  out.token_ids.resize(pick.num_tokens);
  for (int32_t k = 0; k < pick.num_tokens; ++k) {
    const int32_t p = first + k;
    // Only the last position can be unknown: a request with a token in flight has exactly
    // that one token left to compute.
    out.token_ids[k] = p < known ? r->token_ids[p] : kTokenFromPreviousStep;
  }
  r->num_computed_tokens += pick.num_tokens;
  out.block_table = r->blocks.blocks;
  out.sample = r->num_computed_tokens == r->num_tokens();
  out.sampling = r->sampling;
  out.prompt_token_ids = r->prompt();
  out.output_token_ids = r->known_output();
  out.seed = r->seed;
  if (out.sample) {
    out.output_token_index = r->num_output_tokens();
    if (out.output_token_index < r->sampling.min_tokens) {
      if (!r->sampling.ignore_eos) out.banned_token_ids = config_.eos_token_ids;
      out.banned_token_ids.insert(out.banned_token_ids.end(), r->sampling.stop_token_ids.begin(),
                                  r->sampling.stop_token_ids.end());
    }
    ++r->num_pending_tokens;
    record.sampling.push_back(r);
  }
  r->last_scheduled_step = step_id;
  ++r->num_in_flight_steps;
  record.scheduled.push_back(r);
  // Full blocks whose tokens are all known become reusable by later requests.
  pool_.cache_full_blocks(r->blocks, r->token_ids, std::min(r->num_computed_tokens, known),
                          r->prefix_cache_key);
}

}  // namespace megaserve::scheduler
