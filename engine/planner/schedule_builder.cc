#include "engine/planner/schedule_builder.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/planner/schedule_assembler.h"
#include "engine/planner/schedule_tiles.h"

namespace megaserve::engine {

// Per-build working memory, defined in schedule_assembler.h.
struct BuildScratch : schedule_internal::Scratch {};

namespace {

using schedule_internal::Assembler;
using schedule_internal::barrier_of;
using schedule_internal::kLayerStages;
using schedule_internal::Stage;

absl::Status check_plan(const scheduler::StepPlan& plan, const ModelConfig& config,
                        int32_t num_kv_blocks) {
  if (plan.kv_block_size <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("step ", plan.step_id, ": kv_block_size ", plan.kv_block_size, " <= 0"));
  }
  for (const auto& r : plan.requests) {
    const auto where = [&] {
      return absl::StrCat("step ", plan.step_id, " request ", r.request_id);
    };
    if (r.token_ids.empty()) return absl::InvalidArgumentError(where() + ": no input tokens");
    if (r.first_position < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(where(), ": first_position ", r.first_position, " < 0"));
    }
    for (int32_t id : r.token_ids) {
      if (id != scheduler::kTokenFromPreviousStep && (id < 0 || id >= config.vocab_size)) {
        return absl::InvalidArgumentError(absl::StrCat(
            where(), ": token id ", id, " outside vocabulary [0, ", config.vocab_size, ")"));
      }
    }
    const int64_t needed =
        (static_cast<int64_t>(r.context_length()) + plan.kv_block_size - 1) / plan.kv_block_size;
    if (static_cast<int64_t>(r.block_table.size()) < needed) {
      return absl::InvalidArgumentError(absl::StrCat(where(), ": block_table has ",
                                                     r.block_table.size(), " blocks, context ",
                                                     r.context_length(), " needs ", needed));
    }
    // One branch-free pass over the blocks (the common case: all valid), then the first
    // bad one for the message.
    const uint32_t limit = num_kv_blocks > 0 ? static_cast<uint32_t>(num_kv_blocks) : 0x80000000u;
    const int32_t* blocks = r.block_table.data();
    bool any_bad = false, bad1 = false, bad2 = false, bad3 = false;  // four independent chains
    int64_t j = 0;
    for (; j + 4 <= needed; j += 4) {  // negative ids wrap above the limit
      any_bad |= static_cast<uint32_t>(blocks[j]) >= limit;
      bad1 |= static_cast<uint32_t>(blocks[j + 1]) >= limit;
      bad2 |= static_cast<uint32_t>(blocks[j + 2]) >= limit;
      bad3 |= static_cast<uint32_t>(blocks[j + 3]) >= limit;
    }
    for (; j < needed; ++j) any_bad |= static_cast<uint32_t>(blocks[j]) >= limit;
    any_bad = any_bad || bad1 || bad2 || bad3;
    for (j = 0; any_bad && j < needed; ++j) {
      const int32_t b = r.block_table[j];
      if (b < 0 || (num_kv_blocks > 0 && b >= num_kv_blocks)) {
        return absl::InvalidArgumentError(absl::StrCat(where(), ": block_table[", j, "] = ", b,
                                                       " outside [0, ", num_kv_blocks, ")"));
      }
    }
  }
  return absl::OkStatus();
}

// Fills `m` from scratch, keeping its vectors' capacity (the Step is reused across steps).
void make_metadata(const scheduler::StepPlan& plan, const TileConfig& tiles,
                   const ModelShard& shard, StepMetadata& m) {
  m.num_requests = static_cast<int32_t>(plan.requests.size());
  m.kv_block_size = plan.kv_block_size;
  m.kv_split_tokens = tiles.kv_split_tokens;
  m.num_split_rows = 0;
  for (std::vector<int32_t>* v :
       {&m.token_ids, &m.positions, &m.token_request, &m.query_start, &m.context_lens,
        &m.block_indptr, &m.block_indices, &m.last_block_len, &m.num_splits, &m.split_row_begin,
        &m.sample_rows, &m.sample_request}) {
    v->clear();
  }
  m.requests.resize(m.num_requests);
  m.query_start.push_back(0);
  m.block_indptr.push_back(0);
  const int group = shard.q_heads / shard.kv_heads;
  for (int32_t i = 0; i < m.num_requests; ++i) {
    const auto& r = plan.requests[i];
    for (int32_t t = 0; t < r.num_tokens(); ++t) {
      m.token_ids.push_back(r.token_ids[t]);
      m.positions.push_back(r.first_position + t);
      m.token_request.push_back(i);
    }
    m.query_start.push_back(static_cast<int32_t>(m.token_ids.size()));
    const int32_t ctx = r.context_length();
    m.context_lens.push_back(ctx);
    const int32_t nblocks = (ctx + plan.kv_block_size - 1) / plan.kv_block_size;
    m.block_indices.insert(m.block_indices.end(), r.block_table.begin(),
                           r.block_table.begin() + nblocks);
    m.block_indptr.push_back(static_cast<int32_t>(m.block_indices.size()));
    m.last_block_len.push_back(ctx - (nblocks - 1) * plan.kv_block_size);
    // With kv_split_narrow_only, a request whose own (query tile, kv head) items fill the SMs
    // is not split: it needs no merge. The choice depends on the request alone.
    const int64_t items = static_cast<int64_t>((r.num_tokens() + tiles.attention_query_rows - 1) /
                                               tiles.attention_query_rows) *
                          shard.kv_heads;
    const bool split =
        ctx > tiles.kv_split_tokens && (!tiles.kv_split_narrow_only || items < tiles.num_sms);
    const int32_t splits = split ? (ctx + tiles.kv_split_tokens - 1) / tiles.kv_split_tokens : 0;
    m.num_splits.push_back(splits);
    m.split_row_begin.push_back(m.num_split_rows);
    m.num_split_rows += splits * shard.kv_heads * r.num_tokens() * group;
    if (r.sample) {
      m.sample_rows.push_back(m.query_start.back() - 1);
      m.sample_request.push_back(i);
    }
    RequestSampling& out = m.requests[i];  // assigned field by field: copies reuse capacity
    out.request_id = r.request_id;
    out.params = r.sampling;
    out.prompt_token_ids = r.prompt_token_ids;
    out.output_token_ids = r.output_token_ids;
    out.banned_token_ids = r.banned_token_ids;
    out.seed = r.seed;
    out.output_token_index = r.output_token_index;
  }
  m.num_tokens = static_cast<int32_t>(m.token_ids.size());
}

}  // namespace

int schedule_num_barriers(const ModelConfig& config) {
  return 4 + kLayerStages * config.num_layers;
}

ScheduleBuilder::ScheduleBuilder(const ModelConfig& config, const TileConfig& tiles, int tp,
                                 ScheduleOptions options)
    : config_(config), tiles_(tiles), tp_(tp), options_(options) {
  for (int r = 0; r < tp; ++r) shards_.push_back(shard_of(config, tp, r));
  num_barriers_ = schedule_num_barriers(config);
  totals_.assign(tp, std::vector<uint32_t>(num_barriers_, 0));
  scratch_ = std::make_unique<BuildScratch>();
  valid_ = check_tensor_parallel(config, tp);
  if (valid_.ok()) valid_ = check_tile_config(tiles);
}

void ScheduleBuilder::set_barrier_origin(uint32_t value) {
  for (auto& r : totals_) std::fill(r.begin(), r.end(), value);
}

ScheduleBuilder::~ScheduleBuilder() = default;

absl::StatusOr<Step> ScheduleBuilder::build(const scheduler::StepPlan& plan,
                                            int32_t num_kv_blocks) {
  Step step;
  if (absl::Status s = build_into(plan, num_kv_blocks, step); !s.ok()) return s;
  return step;
}

absl::Status ScheduleBuilder::build_into(const scheduler::StepPlan& plan, int32_t num_kv_blocks,
                                         Step& step) {
  if (!valid_.ok()) return valid_;
  if (absl::Status s = check_plan(plan, config_, num_kv_blocks); !s.ok()) return s;
  step.step_id = plan.step_id;
  step.tp = tp_;
  step.num_sms = tiles_.num_sms;
  step.accesses_recorded = options_.record_accesses;
  make_metadata(plan, tiles_, shards_[0], step.meta);
  const StepMetadata& m = step.meta;
  const int L = config_.num_layers;
  const auto bar = [L](Stage s, int layer = 0) { return barrier_of(s, layer, L); };
  TileMaker maker(config_, tiles_, m, options_.record_accesses);
  Assembler as(tp_, tiles_.num_sms, options_.record_accesses, totals_, *scratch_);
  const int self_or_all = tp_ == 1 ? 0 : isa::kSignalAllRanks;
  int reduction = 0;  // index of the next TP reduction; its partial slot is reduction % 2
  // Split-K ways of every layer's O and down (the same shapes in every layer) [SPLIT_K].
  step.k_splits = 1;
  const int o_splits = maker.k_splits(shards_[0], maker.o_proj_k(shards_[0]));
  const int down_splits = maker.k_splits(shards_[0], shards_[0].ffn_cols());
  constexpr int kSelf = -2;  // signal the emitting rank's own barrier
  const auto emit_stage = [&](auto make, std::initializer_list<int> deps, int signal,
                              int signal_rank) -> absl::Status {
    for (int r = 0; r < tp_; ++r) {
      make(shards_[r], as.stage());
      if (absl::Status s = as.emit(r, deps, signal, signal_rank == kSelf ? r : signal_rank);
          !s.ok()) {
        return s;
      }
    }
    return absl::OkStatus();
  };
  // A partial-sum stage (tp > 1, or split-K on one rank: `splits` > 1) followed by its
  // reduction, or a residual stage (tp == 1). Returns the barrier that marks the residual
  // complete. Split-K's slots [0, splits) are reused by every split stage: the next one
  // waits (through the stages between) for this one's reduction [SPLIT_K].
  const auto residual_stage = [&](auto make_with_slot, std::initializer_list<int> deps,
                                  Stage partial_stage, Stage reduce_stage, int layer, bool assign,
                                  int splits) -> absl::StatusOr<int> {
    if (tp_ == 1 && splits == 1) {
      absl::Status s = emit_stage(
          [&](const ModelShard& sh, std::vector<Tile>& out) { make_with_slot(sh, -1, 1, out); },
          deps, bar(partial_stage, layer), kSelf);
      if (!s.ok()) return s;
      return bar(partial_stage, layer);
    }
    const int slot = splits > 1 ? 0 : reduction++ % kNumPartialSlots;
    step.k_splits = std::max(step.k_splits, splits);
    absl::Status s =
        emit_stage([&](const ModelShard& sh,
                       std::vector<Tile>& out) { make_with_slot(sh, slot, splits, out); },
                   deps, bar(partial_stage, layer), self_or_all);
    if (!s.ok()) return s;
    s = emit_stage(
        [&](const ModelShard& sh, std::vector<Tile>& out) {
          maker.tp_reduce(sh, tp_, slot, assign, layer, splits, out);
        },
        {bar(partial_stage, layer)}, bar(reduce_stage, layer), kSelf);
    if (!s.ok()) return s;
    return bar(reduce_stage, layer);
  };

  if (m.num_tokens > 0) {
    absl::StatusOr<int> residual =
        residual_stage([&](const ModelShard& sh, int slot, int,
                           std::vector<Tile>& out) { maker.embedding(sh, slot, out); },
                       {}, Stage::kEmbed, Stage::kEmbedReduce, -1, /*assign=*/true, 1);
    if (!residual.ok()) return residual.status();
    size_t template_begin = 0, template_end = 0;  // layer 1's span of the global order
    for (int l = 0; l < L; ++l) {
      if (l >= 2) {
        // Layers are identical but for their index and barriers: layers 2.. are copies of
        // layer 1 (tiles, placement, recorded regions) instead of being tiled and placed
        // again. The verifier and the deadlock check see the copies exactly as they run.
        as.repeat_layer(template_begin, template_end, 2, L - 2);
        residual = bar(tp_ == 1 && down_splits == 1 ? Stage::kDown : Stage::kDownReduce, L - 1);
        break;
      }
      if (l == 1) template_begin = as.global_size();
      // The stage a projection that normalizes the residual waits for: the residual's
      // writers, or the norm stage that waited for them [NORM_STAGE].
      const auto normed_input = [&](int norm, Stage stage) -> absl::StatusOr<int> {
        if (!maker.norm_stages()) return *residual;
        absl::Status s = emit_stage(
            [&](const ModelShard& sh, std::vector<Tile>& out) { maker.rms_norm(sh, l, norm, out); },
            {*residual}, bar(stage, l), kSelf);
        if (!s.ok()) return s;
        return bar(stage, l);
      };
      absl::StatusOr<int> input = normed_input(isa::kAttnNorm, Stage::kAttnNorm);
      if (!input.ok()) return input.status();
      absl::Status s =
          emit_stage([&](const ModelShard& sh, std::vector<Tile>& out) { maker.qkv(sh, l, out); },
                     {*input}, bar(Stage::kQkv, l), kSelf);
      if (!s.ok()) return s;
      s = emit_stage(
          [&](const ModelShard& sh, std::vector<Tile>& out) { maker.attention(sh, l, out); },
          {bar(Stage::kQkv, l)}, bar(Stage::kAttention, l), kSelf);
      if (!s.ok()) return s;
      s = emit_stage(
          [&](const ModelShard& sh, std::vector<Tile>& out) { maker.attention_merge(sh, l, out); },
          {bar(Stage::kAttention, l)}, bar(Stage::kMerge, l), kSelf);
      if (!s.ok()) return s;
      residual =
          residual_stage([&](const ModelShard& sh, int slot, int splits,
                             std::vector<Tile>& out) { maker.o_proj(sh, l, slot, splits, out); },
                         {bar(Stage::kAttention, l), bar(Stage::kMerge, l)}, Stage::kOProj,
                         Stage::kOReduce, l, false, o_splits);
      if (!residual.ok()) return residual.status();
      input = normed_input(isa::kFfnNorm, Stage::kFfnNorm);
      if (!input.ok()) return input.status();
      s = emit_stage(
          [&](const ModelShard& sh, std::vector<Tile>& out) { maker.gate_up(sh, l, out); },
          {*input}, bar(Stage::kGateUp, l), kSelf);
      if (!s.ok()) return s;
      residual = residual_stage(
          [&](const ModelShard& sh, int slot, int splits, std::vector<Tile>& out) {
            maker.down(sh, l, slot, splits, out);
          },
          {bar(Stage::kGateUp, l)}, Stage::kDown, Stage::kDownReduce, l, false, down_splits);
      if (!residual.ok()) return residual.status();
      if (l == 1) template_end = as.global_size();
    }
    if (m.num_samples() > 0) {
      absl::Status s =
          emit_stage([&](const ModelShard& sh, std::vector<Tile>& out) { maker.lm_head(sh, out); },
                     {*residual}, bar(Stage::kLmHead), 0);
      if (!s.ok()) return s;
      s = emit_stage(
          [&](const ModelShard& sh, std::vector<Tile>& out) {
            if (sh.rank == 0) maker.sample(tp_, out);
          },
          {bar(Stage::kLmHead)}, bar(Stage::kSample), kSelf);
      if (!s.ok()) return s;
    }
  }
  as.finish(step, totals_);
  return check_deadlock_free(step);
}

}  // namespace megaserve::engine
