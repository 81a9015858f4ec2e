// The placement half of the ScheduleBuilder (internal to schedule_builder.cc and its tests
// of the layout): barrier indices per stage, and the Assembler that places each stage's tiles
// on SMs, wires waits and signals, repeats identical layers and lays the queues out in a Step.
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "engine/isa/step.h"
#include "engine/planner/schedule_tiles.h"

namespace megaserve::engine {
namespace schedule_internal {

using isa::Instruction;
// Barrier indices, identical on every rank: two before the layers, kLayerStages per layer,
// two after. Each barrier serves one stage of one step, and consumers always wait for all of
// that stage's signals in the step (the verifier relies on it).
enum class Stage : int {
  kEmbed,
  kEmbedReduce,
  kAttnNorm,
  kQkv,
  kAttention,
  kMerge,
  kOProj,
  kOReduce,
  kFfnNorm,
  kGateUp,
  kDown,
  kDownReduce,
  kLmHead,
  kSample,
};
constexpr int kLayerStages = 10;  // kAttnNorm .. kDownReduce

inline int barrier_of(Stage stage, int layer, int num_layers) {
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
      return 2 + kLayerStages * layer +
             (static_cast<int>(stage) - static_cast<int>(Stage::kAttnNorm));
  }
}

using Load = std::pair<double, int>;

// A binary min-heap of (load, SM) whose top is replaced in place (one sift-down instead of a
// pop and a push). Entries are distinct (one per SM), so the sequence of tops is that of any
// correct priority queue holding the same entries.
class LoadHeap {
 public:
  void clear() { v_.clear(); }
  bool empty() const { return v_.empty(); }
  const Load& top() const { return v_.front(); }
  void push(Load l) {
    v_.push_back(l);
    std::push_heap(v_.begin(), v_.end(), std::greater<Load>());
  }
  void pop() {
    std::pop_heap(v_.begin(), v_.end(), std::greater<Load>());
    v_.pop_back();
  }
  void replace_top(Load l) {
    const size_t n = v_.size();
    size_t i = 0;
    for (;;) {
      size_t c = 2 * i + 1;
      if (c >= n) break;
      c += static_cast<size_t>(c + 1 < n) & less(v_[c + (c + 1 < n)], v_[c]);  // the smaller
      if (!less(v_[c], l)) break;
      v_[i] = v_[c];
      i = c;
    }
    v_[i] = l;
  }

 private:
  // a < b as pairs, without branches (which child is smaller is unpredictable).
  static size_t less(const Load& a, const Load& b) {
    const bool tie = a.first == b.first;
    return static_cast<size_t>((a.first < b.first) | (tie & (a.second < b.second)));
  }

  std::vector<Load> v_;
};

// Per-build working memory, kept by the builder so that its capacity is reused.
struct Scratch {
  struct RankState {
    LoadHeap heap;                                           // (load, SM)
    std::vector<std::vector<Instruction>> queue;             // [sm], in global order
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

// Collects the stages of one step: places each stage's tiles on the SMs least loaded within
// that stage, longest first, and appends them to their SM's queue and to the global order
// (stage by stage, rank by rank, which is topological because every wait names an earlier
// stage). Loads start from zero at every stage: a stage waits for all of the one it reads, so
// a step takes the sum of its stages' makespans, and balancing the load carried over from
// earlier stages instead put up to 3x a stage's balanced time on one SM (a 1024-token
// prefill's QKV; by the cost model, decode steps' stages summed 31-49% over their bound).
class Assembler {
 public:
  using Slot = Scratch::Slot;

  Assembler(int tp, int num_sms, bool record, const std::vector<std::vector<uint32_t>>& totals,
            Scratch& scratch)
      : tp_(tp), num_sms_(num_sms), record_(record), totals_(totals), x_(scratch) {
    x_.pending.resize(tp);
    for (auto& p : x_.pending) p.assign(totals[0].size(), 0);
    x_.ranks.resize(tp);
    for (auto& r : x_.ranks) {
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
    Scratch::RankState& rs = x_.ranks[rank];
    rs.heap.clear();
    for (int sm = 0; sm < num_sms_; ++sm) rs.heap.push({0.0, sm});
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
      const auto [load, sm] = rs.heap.top();
      rs.heap.replace_top({load + t.cost, sm});
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
    for (size_t g = begin; g < end; ++g) {
      const Slot t = x_.order[g];
      const int k = t.rank * num_sms_ + t.sm;
      rep.start[k] = std::min(rep.start[k], t.pos);  // a layer is a contiguous run per SM
      ++rep.count[k];
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
    }
  }

  // Lays the queues out in `step` (each queue in global order, copies included) and advances
  // `totals`.
  void finish(Step& step, std::vector<std::vector<uint32_t>>& totals) {
    const Repeat& rep = rep_;
    step.ranks.resize(tp_);
    for (int r = 0; r < tp_; ++r) {
      Scratch::RankState& rs = x_.ranks[r];
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
      Scratch::RankState& rs = x_.ranks[slot.rank];
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
      const Scratch::RankState& rs = x_.ranks[r];
      RankSchedule& out = step.ranks[r];
      const std::vector<uint32_t>& total = totals[r];
      for (int sm = 0; sm < num_sms_; ++sm) {
        const int k = r * num_sms_ + sm;
        const int32_t n = rep.count[k];
        if (n == 0) continue;
        const Instruction* from = rs.queue[sm].data() + rep.start[k];
        const double* from_cost = rs.cost[sm].data() + rep.start[k];
        const int32_t* template_g = rep.global.data() + rep.global_begin[k];
        for (int c = 0; c < rep.copies; ++c) {
          const int shift = kLayerStages * (c + 1);
          const int32_t base = out.queue_begin[sm] + rep.insert_at[k] + c * n;
          // The run copied whole, then patched from the template (not read back from the copy).
          std::copy(from, from + n, out.instructions.data() + base);
          std::copy(from_cost, from_cost + n, out.cost.data() + base);
          for (int32_t j = 0; j < n; ++j) {
            const Instruction& src = from[j];
            Instruction& inst = out.instructions[base + j];
            inst.words[isa::kWordLayer] = rep.first_layer + c;
            for (int w = 0; w < src.num_waits(); ++w) {
              const int32_t b = src.wait_barrier(w);
              inst.words[isa::kWordWaits + 2 * w] = b + shift;
              inst.words[isa::kWordWaits + 2 * w + 1] = static_cast<int32_t>(
                  static_cast<uint32_t>(src.wait_target(w)) - total[b] + total[b + shift]);
            }
            for (int sg = 0; sg < src.num_signals(); ++sg) {
              const int word = isa::kWordSignals + 2 * sg;
              inst.words[word] = src.words[word] + shift;
            }
            const int32_t g = static_cast<int32_t>(rep.at) + c * span +
                              (template_g[j] - static_cast<int32_t>(rep.begin));
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
  Scratch& x_;
  Repeat rep_;
};

}  // namespace schedule_internal
}  // namespace megaserve::engine
