#include "engine/schedule_builder.h"

#include <algorithm>
#include <climits>
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

  // Declares that the global-order span [begin, end) (layer `first_layer - 1`, every rank)
  // repeats `copies` times as layers first_layer, first_layer + 1, ...: the same tiles on the
  // same SMs, each copy's barrier indices shifted by kLayerStages more, wait targets moved
  // from the old barrier's running total to the new one's. Valid because each waiter waits
  // for all of a barrier's signals in the step and a copied barrier receives exactly the
  // copied signals. The copies are written by finish() straight into their final slots; the
  // stages emitted afterwards (LM head, sampling) queue behind them. Recorded regions are
  // copied too, KV-cache ones moved to their layer (other buffers are shared by all layers).
  void repeat_layer(size_t begin, size_t end, int first_layer, int copies) {
    Repeat& rep = rep_;
    rep.active = copies > 0;
    if (!rep.active) return;
    rep.begin = begin;
    rep.end = end;
    rep.at = x_.order.size();
    rep.first_layer = first_layer;
    rep.copies = copies;
    rep.start.assign(tp_ * num_sms_, INT32_MAX);
    rep.count.assign(tp_ * num_sms_, 0);
    rep.insert_at.assign(tp_ * num_sms_, 0);
    added_.assign(tp_ * num_sms_, 0.0);
    for (size_t g = begin; g < end; ++g) {
      const Slot t = x_.order[g];
      const int k = t.rank * num_sms_ + t.sm;
      rep.start[k] = std::min(rep.start[k], t.pos);  // a layer is a contiguous run per SM
      ++rep.count[k];
      added_[k] += x_.ranks[t.rank].cost[t.sm][t.pos] * copies;
    }
    rep.global_begin.assign(tp_ * num_sms_ + 1, 0);
    for (int k = 0; k < tp_ * num_sms_; ++k) {
      rep.global_begin[k + 1] = rep.global_begin[k] + rep.count[k];
    }
    rep.global.resize(end - begin);
    for (size_t g = begin; g < end; ++g) {
      const Slot t = x_.order[g];
      const int k = t.rank * num_sms_ + t.sm;
      rep.global[rep.global_begin[k] + t.pos - rep.start[k]] = static_cast<int32_t>(g);
    }
    for (int r = 0; r < tp_; ++r) {
      for (int sm = 0; sm < num_sms_; ++sm) {
        rep.insert_at[r * num_sms_ + sm] = static_cast<int32_t>(x_.ranks[r].queue[sm].size());
      }
      // Every signal a copied barrier receives is the copy of one its template received.
      std::vector<uint32_t>& pending = x_.pending[r];
      const int first = 2 + kLayerStages * (first_layer - 1);
      for (int c = 1; c <= copies; ++c) {
        for (int b = first; b < first + kLayerStages; ++b) {
          pending[b + c * kLayerStages] = pending[b];
        }
      }
      auto& heap = x_.ranks[r].heap;
      loads_.clear();
      while (!heap.empty()) {
        loads_.push_back(heap.top());
        heap.pop();
      }
      for (const Load& l : loads_) heap.push({l.first + added_[r * num_sms_ + l.second], l.second});
    }
  }

  // Lays the queues out in `step` (each queue in global order, copies included) and advances
  // `totals`.
  void finish(Step& step, std::vector<std::vector<uint32_t>>& totals) {
    const Repeat& rep = rep_;
    step.ranks.resize(tp_);
    for (int r = 0; r < tp_; ++r) {
      BuildScratch::RankState& rs = x_.ranks[r];
      RankSchedule& out = step.ranks[r];
      out.queue_begin.assign(num_sms_ + 1, 0);
      for (int sm = 0; sm < num_sms_; ++sm) {
        const int64_t copied = rep.active ? int64_t{rep.copies} * rep.count[r * num_sms_ + sm] : 0;
        out.queue_begin[sm + 1] =
            out.queue_begin[sm] + static_cast<int32_t>(rs.queue[sm].size() + copied);
      }
      const size_t n = out.queue_begin[num_sms_];
      out.instructions.resize(n);  // a no-op in steady state: the Step is reused
      out.cost.resize(n);
      out.order.resize(n);
      if (record_) {
        out.accesses.resize(n);
      } else {
        out.accesses.clear();
      }
    }
    step.global_order.resize(x_.order.size() +
                             (rep.active ? (rep.end - rep.begin) * rep.copies : 0));
    // Global positions: entries before the copies keep theirs, the copies take
    // [rep.at, rep.at + copies * span), later entries move up by copies * span.
    const size_t span = rep.active ? rep.end - rep.begin : 0;
    for (size_t g = 0; g < x_.order.size(); ++g) {
      const Slot slot = x_.order[g];
      const int k = slot.rank * num_sms_ + slot.sm;
      BuildScratch::RankState& rs = x_.ranks[slot.rank];
      RankSchedule& out = step.ranks[slot.rank];
      int32_t at = out.queue_begin[slot.sm] + slot.pos;
      int32_t g_final = static_cast<int32_t>(g);
      if (rep.active && slot.pos >= rep.insert_at[k]) at += rep.copies * rep.count[k];
      if (rep.active && g >= rep.at) g_final += static_cast<int32_t>(rep.copies * span);
      out.instructions[at] = rs.queue[slot.sm][slot.pos];
      out.cost[at] = rs.cost[slot.sm][slot.pos];
      out.order[at] = g_final;
      if (record_) {
        std::vector<Access>& a = rs.accesses[slot.sm][slot.pos];
        const bool is_template =
            rep.active && slot.pos >= rep.start[k] && slot.pos < rep.start[k] + rep.count[k];
        out.accesses[at] = is_template ? a : std::move(a);  // copies still need the template's
      }
      step.global_order[g_final] = {slot.rank, at};
    }
    if (rep.active) write_copies(step, totals);
    for (int r = 0; r < tp_; ++r) {
      RankSchedule& out = step.ranks[r];
      out.barrier_begin = totals[r];
      for (size_t b = 0; b < totals[r].size(); ++b) totals[r][b] += x_.pending[r][b];
      out.barrier_end = totals[r];
    }
  }

 private:
  struct Repeat {
    bool active = false;
    size_t begin = 0, end = 0;  // the template layer's span of the global order
    size_t at = 0;              // where the copies enter the global order
    int first_layer = 0, copies = 0;
    std::vector<int32_t> start, count;  // [rank * num_sms + sm] the template's run per SM
    std::vector<int32_t> insert_at;     // [rank * num_sms + sm] queue length at the copies
    // Global positions of the template's instructions, per (rank, SM) run in queue order:
    // global[global_begin[k] + j] for the run's j-th instruction.
    std::vector<int32_t> global, global_begin;
  };

  // The copies of repeat_layer() at their final slots: per SM, each copy of the template's
  // run is contiguous, so this streams through memory.
  void write_copies(Step& step, const std::vector<std::vector<uint32_t>>& totals) {
    const Repeat& rep = rep_;
    const int32_t span = static_cast<int32_t>(rep.end - rep.begin);
    for (int r = 0; r < tp_; ++r) {
      const BuildScratch::RankState& rs = x_.ranks[r];
      RankSchedule& out = step.ranks[r];
      const std::vector<uint32_t>& total = totals[r];
      for (int sm = 0; sm < num_sms_; ++sm) {
        const int k = r * num_sms_ + sm;
        const int32_t n = rep.count[k];
        if (n == 0) continue;
        const Instruction* from = rs.queue[sm].data() + rep.start[k];
        const int32_t* template_g = rep.global.data() + rep.global_begin[k];
        for (int c = 0; c < rep.copies; ++c) {
          const int shift = kLayerStages * (c + 1);
          const int32_t base = out.queue_begin[sm] + rep.insert_at[k] + c * n;
          for (int32_t j = 0; j < n; ++j) {
            Instruction& inst = out.instructions[base + j];
            inst = from[j];
            inst.words[isa::kWordLayer] = rep.first_layer + c;
            for (int w = 0; w < inst.num_waits(); ++w) {
              const int32_t b = inst.wait_barrier(w);
              inst.words[isa::kWordWaits + 2 * w] = b + shift;
              inst.words[isa::kWordWaits + 2 * w + 1] = static_cast<int32_t>(
                  static_cast<uint32_t>(inst.wait_target(w)) - total[b] + total[b + shift]);
            }
            for (int sg = 0; sg < inst.num_signals(); ++sg) {
              inst.words[isa::kWordSignals + 2 * sg] += shift;
            }
            const int32_t g = static_cast<int32_t>(rep.at) + c * span +
                              (template_g[j] - static_cast<int32_t>(rep.begin));
            out.cost[base + j] = rs.cost[sm][rep.start[k] + j];
            out.order[base + j] = g;
            step.global_order[g] = {r, base + j};
            if (record_) {
              std::vector<Access> accesses = rs.accesses[sm][rep.start[k] + j];
              for (Access& a : accesses) {
                if (a.region.layer >= 0) a.region.layer = rep.first_layer + c;
              }
              out.accesses[base + j] = std::move(accesses);
            }
          }
        }
      }
    }
  }

  int tp_;
  int num_sms_;
  bool record_;
  const std::vector<std::vector<uint32_t>>& totals_;
  BuildScratch& x_;
  Repeat rep_;
  std::vector<double> added_;  // repeat_layer(): cost added per (rank, SM)
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
        // Layers are identical but for their index and barriers: layers 2.. are copies of
        // layer 1 (tiles, placement, recorded regions) instead of being tiled and placed
        // again. The verifier and the deadlock check see the copies exactly as they run.
        as.repeat_layer(template_begin, template_end, 2, L - 2);
        residual = bar(tp_ == 1 ? Stage::kDown : Stage::kDownReduce, L - 1);
        break;
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
  // The global order is a permutation, consistent with each instruction's `order` (two
  // entries naming one instruction would need two different `order` values).
  for (size_t g = 0; g < step.global_order.size(); ++g) {
    const InstructionRef ref = step.global_order[g];
    if (ref.rank < 0 || ref.rank >= tp || ref.index < 0 ||
        ref.index >= static_cast<int32_t>(step.ranks[ref.rank].order.size()) ||
        step.ranks[ref.rank].order[ref.index] != static_cast<int32_t>(g)) {
      return absl::InternalError(absl::StrCat("step ", step.step_id, ": global order entry ", g,
                                              " disagrees with the instructions' order"));
    }
  }
  // Each queue a subsequence of the global order; per (rank, barrier), the signals this step
  // and the latest position among them. Memory order: one streaming pass.
  struct Signals {
    uint32_t count = 0;
    int32_t last = -1;
  };
  const size_t num_barriers = tp > 0 ? step.ranks[0].barrier_begin.size() : 0;
  std::vector<Signals> sig(tp * num_barriers);
  struct Wait {
    int32_t rank, index, barrier;
    uint32_t target;
  };
  std::vector<Wait> waits;  // gathered in the same pass, checked once all signals are known
  waits.reserve(total * 2);
  for (int r = 0; r < tp; ++r) {
    const RankSchedule& rs = step.ranks[r];
    for (int q = 0; q < rs.num_queues(); ++q) {
      for (int32_t i = rs.queue_begin[q]; i < rs.queue_begin[q + 1]; ++i) {
        if (i > rs.queue_begin[q] && rs.order[i] < rs.order[i - 1]) {
          return absl::FailedPreconditionError(
              absl::StrCat("deadlock invariant: queue ", q, " of rank ", r, " runs ",
                           describe_instruction(step, {r, i - 1}), " before ",
                           describe_instruction(step, {r, i}), ", against the global order"));
        }
        const isa::Instruction& inst = rs.instructions[i];
        for (int w = 0; w < inst.num_waits(); ++w) {
          waits.push_back({r, i, inst.wait_barrier(w), static_cast<uint32_t>(inst.wait_target(w))});
        }
        for (int sg = 0; sg < inst.num_signals(); ++sg) {
          const int32_t b = inst.signal_barrier(sg);
          const int32_t target = inst.signal_rank(sg);
          if (b < 0 || b >= static_cast<int32_t>(num_barriers)) {
            return absl::InternalError(
                absl::StrCat(describe_instruction(step, {r, i}), " signals unknown barrier ", b));
          }
          for (int t = 0; t < tp; ++t) {
            if (target != isa::kSignalAllRanks && target != t) continue;
            Signals& x = sig[t * num_barriers + b];
            ++x.count;
            x.last = std::max(x.last, rs.order[i]);
          }
        }
      }
    }
  }
  // Every wait reached by signals strictly earlier in the global order. A wait for all of a
  // barrier's signals (the builder's only kind) compares with the latest signaller; a wait
  // for fewer looks for its k-th earliest.
  std::vector<std::vector<int32_t>> sorted(tp * num_barriers);
  for (const Wait& wt : waits) {
    const RankSchedule& rs = step.ranks[wt.rank];
    const int32_t b = wt.barrier;
    const int32_t position = rs.order[wt.index];
    bool reached = b >= 0 && b < static_cast<int32_t>(num_barriers);
    if (reached) {
      const uint32_t needed = wt.target - rs.barrier_begin[b];
      const Signals& x = sig[wt.rank * num_barriers + b];
      if (needed > x.count) {
        reached = false;
      } else if (needed == x.count) {
        reached = x.last < position;
      } else if (needed > 0) {
        std::vector<int32_t>& positions = sorted[wt.rank * num_barriers + b];
        if (positions.empty()) {  // in global order, so sorted
          for (const InstructionRef ref : step.global_order) {
            const isa::Instruction& s = step.ranks[ref.rank].instructions[ref.index];
            for (int sg = 0; sg < s.num_signals(); ++sg) {
              if (s.signal_barrier(sg) == b &&
                  (s.signal_rank(sg) == isa::kSignalAllRanks || s.signal_rank(sg) == wt.rank)) {
                positions.push_back(step.ranks[ref.rank].order[ref.index]);
              }
            }
          }
        }
        reached = positions[needed - 1] < position;
      }
    }
    if (!reached) {
      return absl::FailedPreconditionError(
          absl::StrCat("deadlock invariant: ", describe_instruction(step, {wt.rank, wt.index}),
                       " waits for barrier ", b, " >= ", wt.target,
                       ", which instructions earlier in the global order do not reach"));
    }
  }
  for (int r = 0; r < tp; ++r) {
    const RankSchedule& rs = step.ranks[r];
    for (size_t b = 0; b < num_barriers; ++b) {
      if (rs.barrier_begin[b] + sig[r * num_barriers + b].count != rs.barrier_end[b]) {
        return absl::InternalError(absl::StrCat("step ", step.step_id, " rank ", r, " barrier ", b,
                                                ": signals do not add up to barrier_end"));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace megaserve::engine
