// The tiling half of the ScheduleBuilder: for one op of one layer on one rank, the tiles
// (instructions without waits and signals yet), their estimated cost in cycles, and, when
// asked, the buffer regions each reads and writes.
#pragma once

#include <vector>

#include "engine/isa/isa.h"
#include "engine/isa/step.h"
#include "engine/model/model_config.h"
#include "engine/planner/op_cost.h"
#include "engine/planner/schedule_shard.h"
#include "engine/planner/tile_config.h"

namespace megaserve::engine {

struct Tile {
  isa::Instruction inst{};
  double cost = 0.0;
  std::vector<Access> accesses;
};

class TileMaker {
 public:
  TileMaker(const ModelConfig& config, const TileConfig& tiles, const StepMetadata& meta,
            bool record_accesses)
      : config_(config), tiles_(tiles), meta_(meta), record_(record_accesses) {}

  // Whether this step has kRmsNorm stages (TileConfig::norm_stage_tokens) [NORM_STAGE].
  bool norm_stages() const {
    return tiles_.norm_stage_tokens > 0 && meta_.num_tokens >= tiles_.norm_stage_tokens;
  }

  // `slot` -1: write the residual (one rank); else the TP partial slot.
  void embedding(const ModelShard& sh, int slot, std::vector<Tile>& out) const;
  // `norm`: isa::NormWeight.
  void rms_norm(const ModelShard& sh, int layer, int norm, std::vector<Tile>& out) const;
  void qkv(const ModelShard& sh, int layer, std::vector<Tile>& out) const;
  void attention(const ModelShard& sh, int layer, std::vector<Tile>& out) const;
  void attention_merge(const ModelShard& sh, int layer, std::vector<Tile>& out) const;
  // O and down: `splits` > 1 cuts each tile into that many K ranges, split s writing partial
  // slot s (`slot` unused) [SPLIT_K]; 1: whole K into the residual or `slot`.
  void o_proj(const ModelShard& sh, int layer, int slot, int splits, std::vector<Tile>& out) const;
  void gate_up(const ModelShard& sh, int layer, std::vector<Tile>& out) const;
  void down(const ModelShard& sh, int layer, int slot, int splits, std::vector<Tile>& out) const;
  // `splits` 1: the sum of every rank's `slot`; > 1 (one rank): of this rank's slots
  // [0, splits).
  void tp_reduce(const ModelShard& sh, int tp, int slot, bool assign, int layer, int splits,
                 std::vector<Tile>& out) const;
  // How many K ranges this step's O (in_cols = o_proj_k) or down (ffn_cols) tiles take:
  // 1 (unsplit) unless one rank and TileConfig::max_k_splits allow [SPLIT_K].
  int k_splits(const ModelShard& sh, int in_cols) const;
  // Column width of O and down tiles split `splits` ways along K: hidden_cols, or narrower
  // (multiples of 64) where fewer columns per tile still give one tile per SM.
  int split_width(int row_tiles, int splits) const;
  int o_proj_k(const ModelShard& sh) const { return sh.q_heads * config_.head_dim; }
  void lm_head(const ModelShard& sh, std::vector<Tile>& out) const;
  void sample(int tp, std::vector<Tile>& out) const;

 private:
  Tile& new_tile(std::vector<Tile>& out, isa::Opcode op, int layer,
                 const InstructionWork& work) const;
  void add(Tile& t, int rank, BufferId buffer, int layer, int64_t row_begin, int64_t row_end,
           int64_t byte_begin, int64_t byte_end, bool write) const;
  // K and V cache regions of keys [key_begin, key_end) of request `req`, kv heads
  // [kv_begin, kv_end); one region per block.
  void add_cache(Tile& t, int rank, int layer, int req, int key_begin, int key_end, int kv_begin,
                 int kv_end, int kv_heads, bool write) const;
  // Column tile width for `count` columns (or heads) cut `width` wide over `row_tiles` row
  // tiles: `width`, or with TileConfig::balance_columns and a stage of fewer than two tiles
  // per SM, the multiple of `granule` (up to one round of tiles over the SMs, or up to `width`
  // unless may_widen) that minimizes the columns of the busiest SM (rounds of tiles x width;
  // ties to the wider).
  int column_width(int count, int width, int granule, int row_tiles, bool may_widen = true) const;
  void hidden_tiles(const ModelShard& sh, isa::Opcode op, int layer, int slot, int splits,
                    int in_cols, BufferId input, std::vector<Tile>& out) const;

  const ModelConfig& config_;
  const TileConfig& tiles_;
  const StepMetadata& meta_;
  bool record_;
};

}  // namespace megaserve::engine
