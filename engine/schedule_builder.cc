#include "engine/schedule_builder.h"

#include <algorithm>
#include <queue>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/schedule_tiles.h"

namespace megaserve::engine {

namespace {

using isa::Instruction;

// Barrier indices, identical on every rank: two before the layers, kLayerStages per layer,
// two after. Each barrier serves one stage of one step, and consumers always wait for all of
// that stage's signals in the step (the verifier relies on it).
enum class Stage : int {
  kEmbed,
  kEmbedReduce,
  kQkv,
  kAttention,
  kMerge,
  kOProj,
  kOReduce,
  kGateUp,
  kDown,
  kDownReduce,
  kLmHead,
  kSample,
};
constexpr int kLayerStages = 8;  // kQkv .. kDownReduce

int barrier_of(Stage stage, int layer, int num_layers) {
  switch (stage) {
    case Stage::kEmbed:
      return 0;
    case Stage::kEmbedReduce:
      return 1;
    case Stage::kLmHead:
      return 2 + kLayerStages * num_layers;
    case Stage::kSample:
      return 3 + kLayerStages * num_layers;
    default:
      return 2 + kLayerStages * layer + (static_cast<int>(stage) - static_cast<int>(Stage::kQkv));
  }
}

using Load = std::pair<double, int>;

}  // namespace

// Per-build working memory, kept by the builder so that its capacity is reused.
struct BuildScratch {
  struct RankState {
    std::priority_queue<Load, std::vector<Load>, std::greater<Load>> heap;  // (load, SM)
    std::vector<std::vector<Instruction>> queue;                            // [sm], in global order
    std::vector<std::vector<double>> cost;                   // [sm], parallel to queue
    std::vector<std::vector<std::vector<Access>>> accesses;  // [sm], when recorded
  };
  struct Slot {
    int32_t rank, sm, pos;  // queue[sm][pos] of rank
  };
  std::vector<std::vector<uint32_t>> pending;  // [rank][barrier] signals so far this step
  std::vector<RankState> ranks;
  std::vector<Tile> stage;  // one stage's tiles of one rank, before placement
  std::vector<int32_t> order_in_stage;
  std::vector<Slot> order;  // the global order
};

namespace {

// Collects the stages of one step: places each stage's tiles on the least-loaded SMs,
// longest first, and appends them to their SM's queue and to the global order (stage by
// stage, rank by rank, which is topological because every wait names an earlier stage).
class Assembler {
 public:
  using Slot = BuildScratch::Slot;

  Assembler(int tp, int num_sms, bool record, const std::vector<std::vector<uint32_t>>& totals,
            BuildScratch& scratch)
      : tp_(tp), num_sms_(num_sms), record_(record), totals_(totals), x_(scratch) {
    x_.pending.resize(tp);
    for (auto& p : x_.pending) p.assign(totals[0].size(), 0);
    x_.ranks.resize(tp);
    for (auto& r : x_.ranks) {
      r.heap = {};
      for (int s = 0; s < num_sms; ++s) r.heap.push({0.0, s});
      r.queue.resize(num_sms);
      r.cost.resize(num_sms);
      r.accesses.resize(record ? num_sms : 0);
      for (int s = 0; s < num_sms; ++s) {
        r.queue[s].clear();
        r.cost[s].clear();
        if (record) r.accesses[s].clear();
      }
    }
    x_.order.clear();
  }

  // A cleared vector for the next stage's tiles of one rank.
  std::vector<Tile>& stage() {
    x_.stage.clear();
    return x_.stage;
  }

  // Places stage() (rank `rank`'s tiles of one stage) with waits on `deps` (barriers of this
  // rank; a barrier with no signals this step is skipped) and a signal on `signal` to
  // `signal_rank` (a rank, or isa::kSignalAllRanks).
  absl::Status emit(int rank, std::initializer_list<int> deps, int signal, int signal_rank) {
    std::vector<Tile>& tiles = x_.stage;
    BuildScratch::RankState& rs = x_.ranks[rank];
    int num_waits = 0;
    int32_t waits[isa::kMaxWaits][2];
    for (int b : deps) {
      if (x_.pending[rank][b] == 0) continue;
      if (num_waits == isa::kMaxWaits) return absl::InternalError("too many waits");
      waits[num_waits][0] = b;
      waits[num_waits][1] = static_cast<int32_t>(totals_[rank][b] + x_.pending[rank][b]);
      ++num_waits;
    }
    // Longest first (stable among equals, which is the common case and needs no sort).
    std::vector<int32_t>& order = x_.order_in_stage;
    order.resize(tiles.size());
    bool uniform = true;
    for (size_t i = 0; i < tiles.size(); ++i) {
      order[i] = static_cast<int32_t>(i);
      uniform = uniform && tiles[i].cost == tiles[0].cost;
    }
    if (!uniform) {
      std::stable_sort(order.begin(), order.end(),
                       [&](int32_t a, int32_t b) { return tiles[a].cost > tiles[b].cost; });
    }
    for (int32_t i : order) {
      Tile& t = tiles[i];
      Instruction& inst = t.inst;
      inst.words[isa::kWordNumWaits] = num_waits;
      for (int w = 0; w < num_waits; ++w) {
        inst.words[isa::kWordWaits + 2 * w] = waits[w][0];
        inst.words[isa::kWordWaits + 2 * w + 1] = waits[w][1];
      }
      inst.words[isa::kWordNumSignals] = 1;
      inst.words[isa::kWordSignals] = signal;
      inst.words[isa::kWordSignals + 1] = signal_rank;
      auto [load, sm] = rs.heap.top();
      rs.heap.pop();
      rs.heap.push({load + t.cost, sm});
      x_.order.push_back({rank, sm, static_cast<int32_t>(rs.queue[sm].size())});
      rs.queue[sm].push_back(inst);
      rs.cost[sm].push_back(t.cost);
      if (record_) rs.accesses[sm].push_back(std::move(t.accesses));
    }
    const uint32_t n = static_cast<uint32_t>(tiles.size());
    if (signal_rank == isa::kSignalAllRanks) {
      for (int r = 0; r < tp_; ++r) x_.pending[r][signal] += n;
    } else {
      x_.pending[signal_rank][signal] += n;
    }
    return absl::OkStatus();
  }

  size_t global_size() const { return x_.order.size(); }

  // Appends a copy of the global-order span [begin, end) (one whole layer, every rank) as
  // layer `layer`, every barrier index shifted by `shift`: on the same SMs, with wait targets
  // moved from the old barrier's running total to the new one's. Valid because each waiter
  // waits for all of a barrier's signals in the step, and the copied barriers receive
  // exactly the copied signals. Recorded regions are copied too, KV-cache ones moved to
  // `layer` (every other buffer is shared by all layers).
  void replicate(size_t begin, size_t end, int layer, int shift) {
    added_.assign(tp_ * num_sms_, 0.0);
    for (size_t g = begin; g < end; ++g) {
      const Slot from = x_.order[g];
      BuildScratch::RankState& rs = x_.ranks[from.rank];
      Instruction inst = rs.queue[from.sm][from.pos];
      const double cost = rs.cost[from.sm][from.pos];
      const std::vector<uint32_t>& total = totals_[from.rank];
      inst.words[isa::kWordLayer] = layer;
      for (int w = 0; w < inst.num_waits(); ++w) {
        const int32_t b = inst.wait_barrier(w);
        inst.words[isa::kWordWaits + 2 * w] = b + shift;
        inst.words[isa::kWordWaits + 2 * w + 1] = static_cast<int32_t>(
            static_cast<uint32_t>(inst.wait_target(w)) - total[b] + total[b + shift]);
      }
      for (int sg = 0; sg < inst.num_signals(); ++sg) {
        const int32_t b = inst.signal_barrier(sg);
        inst.words[isa::kWordSignals + 2 * sg] = b + shift;
        const int target_rank = inst.signal_rank(sg);
        if (target_rank == isa::kSignalAllRanks) {
          for (int q = 0; q < tp_; ++q) ++x_.pending[q][b + shift];
        } else {
          ++x_.pending[target_rank][b + shift];
        }
      }
      x_.order.push_back({from.rank, from.sm, static_cast<int32_t>(rs.queue[from.sm].size())});
      rs.queue[from.sm].push_back(inst);
      rs.cost[from.sm].push_back(cost);
      if (record_) {
        std::vector<Access> accesses = rs.accesses[from.sm][from.pos];
        for (Access& a : accesses) {
          if (a.region.layer >= 0) a.region.layer = layer;
        }
        rs.accesses[from.sm].push_back(std::move(accesses));
      }
      added_[from.rank * num_sms_ + from.sm] += cost;
    }
    for (int r = 0; r < tp_; ++r) {
      auto& heap = x_.ranks[r].heap;
      loads_.clear();
      while (!heap.empty()) {
        loads_.push_back(heap.top());
        heap.pop();
      }
      for (const Load& l : loads_) heap.push({l.first + added_[r * num_sms_ + l.second], l.second});
    }
  }

  // Concatenates the queues into `step` and advances `totals`.
  void finish(Step& step, std::vector<std::vector<uint32_t>>& totals) {
    step.ranks.resize(tp_);
    for (int r = 0; r < tp_; ++r) {
      BuildScratch::RankState& rs = x_.ranks[r];
      RankSchedule& out = step.ranks[r];
      out.queue_begin.assign(num_sms_ + 1, 0);
      out.instructions.clear();
      out.cost.clear();
      out.accesses.clear();
      for (int s = 0; s < num_sms_; ++s) {
        out.queue_begin[s + 1] = out.queue_begin[s] + static_cast<int32_t>(rs.queue[s].size());
        out.instructions.insert(out.instructions.end(), rs.queue[s].begin(), rs.queue[s].end());
        out.cost.insert(out.cost.end(), rs.cost[s].begin(), rs.cost[s].end());
        if (record_) {
          for (auto& a : rs.accesses[s]) out.accesses.push_back(std::move(a));
        }
      }
      out.order.resize(out.instructions.size());
      out.barrier_begin = totals[r];
      for (size_t b = 0; b < totals[r].size(); ++b) totals[r][b] += x_.pending[r][b];
      out.barrier_end = totals[r];
    }
    step.global_order.resize(x_.order.size());
    for (size_t g = 0; g < x_.order.size(); ++g) {
      const Slot slot = x_.order[g];
      const int32_t at = step.ranks[slot.rank].queue_begin[slot.sm] + slot.pos;
      step.ranks[slot.rank].order[at] = static_cast<int32_t>(g);
      step.global_order[g] = {slot.rank, at};
    }
  }

 private:
  int tp_;
  int num_sms_;
  bool record_;
  const std::vector<std::vector<uint32_t>>& totals_;
  BuildScratch& x_;
  std::vector<double> added_;  // replicate(): cost added per (rank, SM)
  std::vector<Load> loads_;
};

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
    for (int64_t j = 0; j < needed; ++j) {
      const int32_t b = r.block_table[j];
      if (b < 0 || (num_kv_blocks > 0 && b >= num_kv_blocks)) {
        return absl::InvalidArgumentError(absl::StrCat(where(), ": block_table[", j, "] = ", b,
                                                       " outside [0, ", num_kv_blocks, ")"));
      }
    }
  }
  return absl::OkStatus();
}

StepMetadata make_metadata(const scheduler::StepPlan& plan, const TileConfig& tiles,
                           const ModelShard& shard) {
  StepMetadata m;
  m.num_requests = static_cast<int32_t>(plan.requests.size());
  m.kv_block_size = plan.kv_block_size;
  m.kv_split_tokens = tiles.kv_split_tokens;
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
    const int32_t splits =
        ctx > tiles.kv_split_tokens ? (ctx + tiles.kv_split_tokens - 1) / tiles.kv_split_tokens : 0;
    m.num_splits.push_back(splits);
    m.split_row_begin.push_back(m.num_split_rows);
    m.num_split_rows += splits * shard.kv_heads * r.num_tokens() * group;
    if (r.sample) {
      m.sample_rows.push_back(m.query_start.back() - 1);
      m.sample_request.push_back(i);
    }
    m.requests.push_back({r.request_id, r.sampling, r.prompt_token_ids, r.output_token_ids,
                          r.banned_token_ids, r.seed, r.output_token_index});
  }
  m.num_tokens = static_cast<int32_t>(m.token_ids.size());
  return m;
}

}  // namespace

ScheduleBuilder::ScheduleBuilder(const ModelConfig& config, const TileConfig& tiles, int tp,
                                 ScheduleOptions options)
    : config_(config), tiles_(tiles), tp_(tp), options_(options) {
  for (int r = 0; r < tp; ++r) shards_.push_back(shard_of(config, tp, r));
  num_barriers_ = 4 + kLayerStages * config.num_layers;
  totals_.assign(tp, std::vector<uint32_t>(num_barriers_, 0));
  scratch_ = std::make_unique<BuildScratch>();
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
  if (absl::Status s = check_plan(plan, config_, num_kv_blocks); !s.ok()) return s;
  step.step_id = plan.step_id;
  step.tp = tp_;
  step.num_sms = tiles_.num_sms;
  step.accesses_recorded = options_.record_accesses;
  step.meta = make_metadata(plan, tiles_, shards_[0]);
  const StepMetadata& m = step.meta;
  const int L = config_.num_layers;
  const auto bar = [L](Stage s, int layer = 0) { return barrier_of(s, layer, L); };
  TileMaker maker(config_, tiles_, m, options_.record_accesses);
  Assembler as(tp_, tiles_.num_sms, options_.record_accesses, totals_, *scratch_);
  const int self_or_all = tp_ == 1 ? 0 : isa::kSignalAllRanks;
  int reduction = 0;         // index of the next TP reduction; its partial slot is reduction % 2
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
  // A partial-sum stage (tp > 1) followed by its reduction, or a residual stage (tp == 1).
  // Returns the barrier that marks the residual complete.
  const auto residual_stage = [&](auto make_with_slot, std::initializer_list<int> deps,
                                  Stage partial_stage, Stage reduce_stage, int layer,
                                  bool assign) -> absl::StatusOr<int> {
    if (tp_ == 1) {
      absl::Status s = emit_stage(
          [&](const ModelShard& sh, std::vector<Tile>& out) { make_with_slot(sh, -1, out); }, deps,
          bar(partial_stage, layer), kSelf);
      if (!s.ok()) return s;
      return bar(partial_stage, layer);
    }
    const int slot = reduction++ % kNumPartialSlots;
    absl::Status s = emit_stage(
        [&](const ModelShard& sh, std::vector<Tile>& out) { make_with_slot(sh, slot, out); }, deps,
        bar(partial_stage, layer), self_or_all);
    if (!s.ok()) return s;
    s = emit_stage(
        [&](const ModelShard& sh, std::vector<Tile>& out) {
          maker.tp_reduce(sh, tp_, slot, assign, layer, out);
        },
        {bar(partial_stage, layer)}, bar(reduce_stage, layer), kSelf);
    if (!s.ok()) return s;
    return bar(reduce_stage, layer);
  };

  if (m.num_tokens > 0) {
    absl::StatusOr<int> residual =
        residual_stage([&](const ModelShard& sh, int slot,
                           std::vector<Tile>& out) { maker.embedding(sh, slot, out); },
                       {}, Stage::kEmbed, Stage::kEmbedReduce, -1, /*assign=*/true);
    if (!residual.ok()) return residual.status();
    size_t template_begin = 0, template_end = 0;  // layer 1's span of the global order
    for (int l = 0; l < L; ++l) {
      if (l >= 2) {
        // Layers are identical but for their index and barriers: copy layer 1's instructions
        // (and placement, and recorded regions) instead of tiling and placing again. The
        // verifier and the deadlock check see the copies exactly as they will run.
        as.replicate(template_begin, template_end, l, kLayerStages * (l - 1));
        residual = bar(tp_ == 1 ? Stage::kDown : Stage::kDownReduce, l);
        continue;
      }
      if (l == 1) template_begin = as.global_size();
      absl::Status s =
          emit_stage([&](const ModelShard& sh, std::vector<Tile>& out) { maker.qkv(sh, l, out); },
                     {*residual}, bar(Stage::kQkv, l), kSelf);
      if (!s.ok()) return s;
      s = emit_stage(
          [&](const ModelShard& sh, std::vector<Tile>& out) { maker.attention(sh, l, out); },
          {bar(Stage::kQkv, l)}, bar(Stage::kAttention, l), kSelf);
      if (!s.ok()) return s;
      s = emit_stage(
          [&](const ModelShard& sh, std::vector<Tile>& out) { maker.attention_merge(sh, l, out); },
          {bar(Stage::kAttention, l)}, bar(Stage::kMerge, l), kSelf);
      if (!s.ok()) return s;
      residual = residual_stage([&](const ModelShard& sh, int slot,
                                    std::vector<Tile>& out) { maker.o_proj(sh, l, slot, out); },
                                {bar(Stage::kAttention, l), bar(Stage::kMerge, l)}, Stage::kOProj,
                                Stage::kOReduce, l, false);
      if (!residual.ok()) return residual.status();
      s = emit_stage(
          [&](const ModelShard& sh, std::vector<Tile>& out) { maker.gate_up(sh, l, out); },
          {*residual}, bar(Stage::kGateUp, l), kSelf);
      if (!s.ok()) return s;
      residual =
          residual_stage([&](const ModelShard& sh, int slot,
                             std::vector<Tile>& out) { maker.down(sh, l, slot, out); },
                         {bar(Stage::kGateUp, l)}, Stage::kDown, Stage::kDownReduce, l, false);
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

absl::Status check_deadlock_free(const Step& step) {
  const int tp = static_cast<int>(step.ranks.size());
  size_t total = 0;
  for (const auto& r : step.ranks) total += r.instructions.size();
  if (step.global_order.size() != total) {
    return absl::InternalError(absl::StrCat("step ", step.step_id, ": global order lists ",
                                            step.global_order.size(), " of ", total,
                                            " instructions"));
  }
  std::vector<std::vector<int32_t>> position(tp);
  for (int r = 0; r < tp; ++r) position[r].assign(step.ranks[r].instructions.size(), -1);
  for (size_t i = 0; i < step.global_order.size(); ++i) {
    const InstructionRef ref = step.global_order[i];
    if (ref.rank < 0 || ref.rank >= tp || ref.index < 0 ||
        ref.index >= static_cast<int32_t>(position[ref.rank].size()) ||
        position[ref.rank][ref.index] != -1) {
      return absl::InternalError(absl::StrCat("step ", step.step_id, ": global order entry ", i,
                                              " is out of range or repeated"));
    }
    position[ref.rank][ref.index] = static_cast<int32_t>(i);
  }
  // Each queue a subsequence of the global order.
  for (int r = 0; r < tp; ++r) {
    const RankSchedule& rs = step.ranks[r];
    for (int q = 0; q < rs.num_queues(); ++q) {
      for (int32_t i = rs.queue_begin[q] + 1; i < rs.queue_begin[q + 1]; ++i) {
        if (position[r][i] < position[r][i - 1]) {
          return absl::FailedPreconditionError(
              absl::StrCat("deadlock invariant: queue ", q, " of rank ", r, " runs ",
                           describe_instruction(step, {r, i - 1}), " before ",
                           describe_instruction(step, {r, i}), ", against the global order"));
        }
      }
    }
  }
  // Replay the global order, counting signals: every wait must already be satisfied.
  std::vector<std::vector<uint32_t>> value(tp);
  for (int r = 0; r < tp; ++r) value[r] = step.ranks[r].barrier_begin;
  for (const InstructionRef ref : step.global_order) {
    const Instruction& inst = step.ranks[ref.rank].instructions[ref.index];
    for (int w = 0; w < inst.num_waits(); ++w) {
      const int32_t b = inst.wait_barrier(w);
      if (b < 0 || b >= static_cast<int32_t>(value[ref.rank].size()) ||
          !isa::barrier_reached(value[ref.rank][b], static_cast<uint32_t>(inst.wait_target(w)))) {
        return absl::FailedPreconditionError(absl::StrCat(
            "deadlock invariant: ", describe_instruction(step, ref), " waits for barrier ", b,
            " >= ", static_cast<uint32_t>(inst.wait_target(w)),
            ", which instructions earlier in the global order do not reach"));
      }
    }
    for (int s = 0; s < inst.num_signals(); ++s) {
      const int32_t b = inst.signal_barrier(s);
      const int32_t target = inst.signal_rank(s);
      for (int r = 0; r < tp; ++r) {
        if (target == isa::kSignalAllRanks || target == r) ++value[r][b];
      }
    }
  }
  for (int r = 0; r < tp; ++r) {
    if (value[r] != step.ranks[r].barrier_end) {
      return absl::InternalError(absl::StrCat("step ", step.step_id, " rank ", r,
                                              ": signals do not add up to barrier_end"));
    }
  }
  return absl::OkStatus();
}

}  // namespace megaserve::engine
