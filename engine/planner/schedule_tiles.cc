#include "engine/planner/schedule_tiles.h"

#include <algorithm>

namespace megaserve::engine {

namespace {

using isa::Opcode;

constexpr int64_t kF32 = 4;   // workspace element bytes (fp32 activations)
constexpr int64_t kBf16 = 2;  // normalized rows (BufferId::kNormed)
// Balanced column tiles are multiples of one tensor-core m-tile (kernels/tile_mma.cuh).
constexpr int kColumnGranule = 16;
// Split-K ranges [SPLIT_K]: whole wgmma k-blocks (kernels/tile_wgmma.cuh), and at least this
// many inputs.
constexpr int kSplitKGranule = 64;
constexpr int kMinSplitK = 512;
// Split-K tiles narrower than hidden_cols in multiples of 64 columns (a wgmma weight group).
constexpr int kSplitWidthGranule = 64;

// Puts out[first, end), made row tile by row tile (`row_tiles` runs of equally many column
// tiles), in groups of g row tiles taken column by column. Tiles of equal cost are dealt to
// the SMs in turn (schedule_assembler.h), so the num_sms tiles that run at once cover about
// g row tiles x num_sms / g column tiles, whose weights and activations come from memory once
// and from L2 for the rest; row by row, every round of tiles streamed all of the op's weights
// (a decode step of 256 requests read them 4 times). g minimizes the bytes of that round:
// g x `row_bytes` (a row tile's activations) + num_sms / g x `column_bytes` (a column
// tile's weights), among the g <= row_tiles that divide num_sms (the larger on a tie): then
// every SM gets tiles of one row block of the group only (tile i of the op goes to SM
// i % num_sms, and its row is i % g), so its next tile reuses the activations it staged and
// their row scales (kernels/act_cache.h [ACT_CACHE], NormCache). At 132 SMs the unrestricted
// optimum for QKV was 16, which changed an SM's row block at every tile. Where no divisor
// comes within a quarter of the unrestricted optimum's bytes (an SM count with few divisors:
// at a prime one, g = 1 streams all of an op's weights every round), the optimum itself.
int row_group(int row_tiles, int num_sms, double row_bytes, double column_bytes) {
  const auto bytes = [&](int g) {
    return g * row_bytes + static_cast<double>(num_sms) / g * column_bytes;
  };
  int best = 1;
  for (int g = 2; g <= std::min(row_tiles, num_sms); ++g) {
    if (num_sms % g == 0 && bytes(g) <= bytes(best)) best = g;
  }
  int free_best = 1;
  for (int g = 2; g <= row_tiles; ++g) {
    if (bytes(g) < bytes(free_best)) free_best = g;
  }
  return bytes(best) <= 1.25 * bytes(free_best) ? best : free_best;
}

void group_rows(std::vector<Tile>& out, size_t first, int row_tiles, int num_sms, double row_bytes,
                double column_bytes) {
  const size_t n = out.size() - first;
  if (row_tiles <= 1 || n % row_tiles != 0) return;
  const int cols = static_cast<int>(n / row_tiles);
  const int g = row_group(row_tiles, num_sms, row_bytes, column_bytes);
  std::vector<Tile> made(std::make_move_iterator(out.begin() + first),
                         std::make_move_iterator(out.end()));
  size_t at = first;
  for (int r0 = 0; r0 < row_tiles; r0 += g) {
    const int r1 = std::min(row_tiles, r0 + g);
    for (int c = 0; c < cols; ++c) {
      for (int r = r0; r < r1; ++r) out[at++] = std::move(made[static_cast<size_t>(r) * cols + c]);
    }
  }
}

}  // namespace

Tile& TileMaker::new_tile(std::vector<Tile>& out, Opcode op, int layer,
                          const InstructionWork& work) const {
  Tile& t = out.emplace_back();
  t.inst.words[isa::kWordOpcode] = static_cast<int32_t>(op);
  t.inst.words[isa::kWordLayer] = layer;
  t.cost = estimated_cycles(tiles_, work);
  return t;
}

void TileMaker::add(Tile& t, int rank, BufferId buffer, int layer, int64_t row_begin,
                    int64_t row_end, int64_t byte_begin, int64_t byte_end, bool write) const {
  if (!record_ || row_begin >= row_end || byte_begin >= byte_end) return;
  t.accesses.push_back({{rank, buffer, layer, row_begin, row_end, byte_begin, byte_end}, write});
}

void TileMaker::add_cache(Tile& t, int rank, int layer, int req, int key_begin, int key_end,
                          int kv_begin, int kv_end, int kv_heads, bool write) const {
  if (!record_) return;
  const int bs = meta_.kv_block_size;
  const int64_t row_bytes = config_.head_dim * kF32;
  const int32_t* blocks = meta_.block_indices.data() + meta_.block_indptr[req];
  for (int j = key_begin / bs; j * bs < key_end; ++j) {
    const int64_t lo = std::max(key_begin, j * bs) - j * bs;
    const int64_t hi = std::min(key_end, (j + 1) * bs) - j * bs;
    const int64_t plane = static_cast<int64_t>(blocks[j]) * kv_heads;
    for (BufferId b : {BufferId::kKCache, BufferId::kVCache}) {
      add(t, rank, b, layer, plane + kv_begin, plane + kv_end, lo * row_bytes, hi * row_bytes,
          write);
    }
  }
}

int TileMaker::column_width(int count, int width, int granule, int row_tiles,
                            bool may_widen) const {
  const int64_t sms = tiles_.num_sms;
  const auto tiles_at = [&](int w) {
    return static_cast<int64_t>(row_tiles) * ((count + w - 1) / w);
  };
  if (!tiles_.balance_columns || tiles_at(width) >= 2 * sms) return width;
  // Candidates up to the width that makes one round of tiles (it may exceed `width`: a small
  // step's tiles are short in rows, so wider ones stay cheap).
  const int64_t one_round = (static_cast<int64_t>(count) * row_tiles + sms - 1) / sms;
  const int widest = may_widen ? static_cast<int>(std::max<int64_t>(
                                     width, (one_round + granule - 1) / granule * granule))
                               : width;
  int best = width;
  int64_t best_cols = (tiles_at(width) + sms - 1) / sms * width;  // rounds x width
  for (int w = widest / granule * granule; w >= granule; w -= granule) {
    const int64_t cols = (tiles_at(w) + sms - 1) / sms * w;
    if (cols < best_cols || (cols == best_cols && w > best)) {
      best = w;
      best_cols = cols;
    }
  }
  return best;
}

void TileMaker::embedding(const ModelShard& sh, int slot, std::vector<Tile>& out) const {
  const int T = meta_.num_tokens;
  const int64_t row_bytes = config_.hidden_size * kF32;
  for (int r0 = 0; r0 < T; r0 += tiles_.embedding_rows) {
    const int r1 = std::min(T, r0 + tiles_.embedding_rows);
    Tile& t =
        new_tile(out, Opcode::kEmbedding, -1, op_cost::embedding(r1 - r0, config_.hidden_size));
    isa::EmbeddingArgs a{};
    a.row_begin = r0;
    a.row_end = r1;
    a.partial_slot = slot;
    isa::set_args(t.inst, a);
    if (slot < 0) {
      add(t, sh.rank, BufferId::kResidual, -1, r0, r1, 0, row_bytes, true);
    } else {
      add(t, sh.rank, BufferId::kPartial, -1, slot * T + r0, slot * T + r1, 0, row_bytes, true);
    }
  }
}

void TileMaker::rms_norm(const ModelShard& sh, int layer, int norm, std::vector<Tile>& out) const {
  const int T = meta_.num_tokens;
  const int H = config_.hidden_size;
  // norm_rows rows per tile, fewer where that leaves SMs idle: a norm is a stage of its own,
  // so its tiles' time is the layer's.
  const int rows = std::clamp((T + tiles_.num_sms - 1) / tiles_.num_sms, 1, tiles_.norm_rows);
  for (int r0 = 0; r0 < T; r0 += rows) {
    const int r1 = std::min(T, r0 + rows);
    Tile& t = new_tile(out, Opcode::kRmsNorm, layer, op_cost::rms_norm(r1 - r0, H));
    isa::RmsNormArgs a{};
    a.row_begin = r0;
    a.row_end = r1;
    a.norm = norm;
    isa::set_args(t.inst, a);
    add(t, sh.rank, BufferId::kResidual, -1, r0, r1, 0, H * kF32, false);
    add(t, sh.rank, BufferId::kNormed, -1, r0, r1, 0, H * kBf16, true);
  }
}

void TileMaker::qkv(const ModelShard& sh, int layer, std::vector<Tile>& out) const {
  const int T = meta_.num_tokens;
  const int hd = config_.head_dim;
  const int H = config_.hidden_size;
  const int fused = sh.fused_heads();
  // A model with q/k norm keeps its heads' rows in shared memory (qkv_rows at a time), one
  // without takes them straight from the projection as RoPE pairs (kernels/op_qkv_rope.cuh):
  // its tiles are token_rows tall, as the other projections' are.
  const int tile_rows = config_.qk_norm ? tiles_.qkv_rows : tiles_.token_rows;
  const int row_tiles = (T + tile_rows - 1) / tile_rows;
  // Never wider than qkv_heads: a QKV tile of a q/k-norm model keeps its heads' rows in shared
  // memory beside the projection core, and 4 heads of 128 (a 2,141-token step of 12 fused
  // heads widened to them) left the core less than its minimum: it raced.
  const int heads = column_width(fused, tiles_.qkv_heads, 1, row_tiles, /*may_widen=*/false);
  // Fewer one-head tiles than SMs (a small step, no q/k norm, which needs whole heads): ranges
  // of RoPE pairs over the fused heads (isa::qkv_pairs_of_head), the fewest pairs each that
  // still fit one round of tiles, in multiples of 16 pairs where the tiles take wgmma passes
  // (a 16-row weight group stays in one half of one head) and of 8 where they take the CUDA
  // cores (one token row; a warp per pair: the 8 warps get as many). Llama-3.1-8B at batch 1:
  // 128 tiles of 24 pairs, not 96 of 32 whole-head halves with 36 SMs idle.
  const int half = hd / 2;
  const int total_pairs = fused * half;
  int pairs = 0;  // pairs per tile; 0: whole heads
  if (heads == 1 && tiles_.balance_columns && !config_.qk_norm &&
      static_cast<int64_t>(row_tiles) * fused < tiles_.num_sms) {
    const int granule = T > tiles_.matvec_rows ? 16 : 8;
    const int per_row_tile = std::max(1, tiles_.num_sms / row_tiles);
    const int fit = (total_pairs + per_row_tile - 1) / per_row_tile;
    const int p = (fit + granule - 1) / granule * granule;
    if (p < half) pairs = p;
  }
  const size_t first = out.size();
  for (int r0 = 0; r0 < T; r0 += tile_rows) {
    const int r1 = std::min(T, r0 + tile_rows);
    const int ranges = pairs > 0 ? (total_pairs + pairs - 1) / pairs : (fused + heads - 1) / heads;
    for (int j = 0; j < ranges; ++j) {
      isa::QkvRopeArgs a{};
      a.row_begin = r0;
      a.row_end = r1;
      if (pairs > 0) {  // flat pairs [g0, g1): head g / half, pair g % half
        const int g0 = j * pairs, g1 = std::min(total_pairs, g0 + pairs);
        a.head_begin = g0 / half;
        a.pair_begin = g0 % half;
        a.head_end = (g1 - 1) / half + 1;
        a.pair_end = (g1 - 1) % half + 1;
      } else {
        a.head_begin = j * heads;
        a.head_end = std::min(fused, a.head_begin + heads);
      }
      a.normed = norm_stages();
      const double rows = r1 - r0, cols = 2.0 * isa::qkv_tile_pairs(a, half);
      Tile& t = new_tile(out, Opcode::kQkvRope, layer, op_cost::projection(rows, cols, H));
      isa::set_args(t.inst, a);
      if (!record_) continue;
      // The residual rows (the CPU normalizes them itself) and the normalized ones.
      add(t, sh.rank, BufferId::kResidual, -1, r0, r1, 0, H * kF32, false);
      if (a.normed) add(t, sh.rank, BufferId::kNormed, -1, r0, r1, 0, H * kBf16, false);
      // The bytes of fused head fh this tile writes: the whole head, or its two pair ranges.
      const auto add_head_bytes = [&](int fh, BufferId buf, int layer_or_none, int64_t row_begin,
                                      int64_t row_end, int64_t base) {
        int p0, p1;
        isa::qkv_pairs_of_head(a, fh, half, &p0, &p1);
        if (p0 == 0 && p1 == half) {
          add(t, sh.rank, buf, layer_or_none, row_begin, row_end, base, base + hd * kF32, true);
          return;
        }
        for (const int d0 : {p0, half + p0}) {
          add(t, sh.rank, buf, layer_or_none, row_begin, row_end, base + d0 * kF32,
              base + (d0 + p1 - p0) * kF32, true);
        }
      };
      const int q_end = std::min(a.head_end, sh.q_heads);
      for (int fh = a.head_begin; fh < q_end; ++fh) {
        add_head_bytes(fh, BufferId::kQ, -1, r0, r1, fh * hd * kF32);
      }
      // k heads [hq, hq+hkv), v heads [hq+hkv, hq+2hkv): cache planes per token.
      for (int kind = 0; kind < 2; ++kind) {
        const int base = sh.q_heads + kind * sh.kv_heads;
        const int k0 = std::max(a.head_begin, base) - base;
        const int k1 = std::min(a.head_end, base + sh.kv_heads) - base;
        const BufferId buf = kind == 0 ? BufferId::kKCache : BufferId::kVCache;
        for (int row = r0; row < r1; ++row) {
          const int req = meta_.token_request[row];
          const int pos = meta_.positions[row];
          const int bs = meta_.kv_block_size;
          const int64_t block = meta_.block_indices[meta_.block_indptr[req] + pos / bs];
          const int64_t slot = pos % bs;
          for (int k = k0; k < k1; ++k) {
            add_head_bytes(base + k, buf, layer, block * sh.kv_heads + k,
                           block * sh.kv_heads + k + 1, slot * hd * kF32);
          }
        }
      }
    }
  }
  group_rows(out, first, row_tiles, tiles_.num_sms, tile_rows * H * kF32,
             (pairs > 0 ? 2.0 * pairs : heads * hd) * H * 2.0);
}

void TileMaker::attention(const ModelShard& sh, int layer, std::vector<Tile>& out) const {
  const int hd = config_.head_dim;
  const int group = sh.q_heads / sh.kv_heads;
  const int K = tiles_.kv_split_tokens;
  const int64_t head_bytes = hd * kF32;
  // Adds one tile over requests [rb, re), rows [qb, qe) of each (all rows when the range
  // spans several requests), split s (-1 unsplit).
  const auto make = [&](int kv, int rb, int re, int qb, int qe, int s) {
    InstructionWork work;
    for (int i = rb; i < re; ++i) {
      const int n = meta_.query_start[i + 1] - meta_.query_start[i];
      const int q0 = re - rb > 1 ? 0 : qb, q1 = re - rb > 1 ? n : qe;
      const int last_pos = meta_.positions[meta_.query_start[i] + q1 - 1];
      const int key_begin = s < 0 ? 0 : s * K;
      const int key_end = s < 0 ? last_pos + 1 : std::min(last_pos + 1, (s + 1) * K);
      work += op_cost::attention_row(key_end - key_begin, group, hd) * (q1 - q0);
      work += op_cost::attention_kv(key_end - key_begin, hd);
    }
    Tile& t = new_tile(out, Opcode::kAttention, layer, work);
    t.cost += tiles_.attention_tile_cycles;
    isa::AttentionArgs a{};
    a.kv_head = kv;
    a.request_begin = rb;
    a.request_end = re;
    a.query_begin = qb;
    a.query_end = qe;
    a.split = s;
    isa::set_args(t.inst, a);
    if (!record_) return;
    for (int i = rb; i < re; ++i) {
      const int n = meta_.query_start[i + 1] - meta_.query_start[i];
      const int q0 = re - rb > 1 ? 0 : qb, q1 = re - rb > 1 ? n : qe;
      const int row0 = meta_.query_start[i];
      const int last_pos = meta_.positions[row0 + q1 - 1];
      const int key_begin = s < 0 ? 0 : s * K;
      const int key_end = s < 0 ? last_pos + 1 : std::min(last_pos + 1, (s + 1) * K);
      add(t, sh.rank, BufferId::kQ, -1, row0 + q0, row0 + q1, kv * group * head_bytes,
          (kv + 1) * group * head_bytes, false);
      add_cache(t, sh.rank, layer, i, key_begin, key_end, kv, kv + 1, sh.kv_heads, false);
      if (s < 0) {
        add(t, sh.rank, BufferId::kAttnOut, -1, row0 + q0, row0 + q1, kv * group * head_bytes,
            (kv + 1) * group * head_bytes, true);
      } else {
        const int64_t base =
            meta_.split_row_begin[i] + (static_cast<int64_t>(s) * sh.kv_heads + kv) * n * group;
        add(t, sh.rank, BufferId::kSplitOut, -1, base + q0 * group, base + q1 * group, 0,
            head_bytes, true);
        add(t, sh.rank, BufferId::kSplitLse, -1, base + q0 * group, base + q1 * group, 0, kF32,
            true);
      }
    }
  };
  // Short unsplit requests share a tile, up to attention_batch_requests, but only as many as
  // keep every SM busy: at a decode batch of 8 one tile per (request, kv head), not per kv
  // head (8 SMs streaming 8 requests' keys each while the rest wait).
  const auto batchable = [&](int i) {  // short and unsplit: may share a tile
    const int n = meta_.query_start[i + 1] - meta_.query_start[i];
    return meta_.num_splits[i] == 0 && n <= tiles_.attention_query_rows;
  };
  int64_t batch_items = 0;
  for (int i = 0; i < meta_.num_requests; ++i) batch_items += batchable(i) ? sh.kv_heads : 0;
  const int per_tile = static_cast<int>(std::clamp<int64_t>(
      (batch_items + tiles_.num_sms - 1) / tiles_.num_sms, 1, tiles_.attention_batch_requests));
  const size_t first_tile = out.size();
  for (int kv = 0; kv < sh.kv_heads; ++kv) {
    if (kv > 0 && !record_) {
      // Every kv head gets the same tiles (requests, rows, split, cost): without regions to
      // record, kv head 0's are repeated with their kv_head replaced.
      const size_t per_head = (out.size() - first_tile) / kv;
      out.reserve(first_tile + per_head * sh.kv_heads);  // no reallocation under the copies
      for (size_t j = 0; j < per_head; ++j) {
        Tile& t = out.emplace_back(out[first_tile + j]);
        isa::AttentionArgs a = isa::args_of<isa::AttentionArgs>(t.inst);
        a.kv_head = kv;
        isa::set_args(t.inst, a);
      }
      continue;
    }
    int group_begin = -1;  // open batch of short unsplit requests
    const auto flush = [&](int end) {
      if (group_begin < 0) return;
      // A batch of one request names its rows; a larger batch covers all rows of each.
      const int rows = end - group_begin == 1
                           ? meta_.query_start[group_begin + 1] - meta_.query_start[group_begin]
                           : 0;
      make(kv, group_begin, end, 0, rows, -1);
      group_begin = -1;
    };
    for (int i = 0; i < meta_.num_requests; ++i) {
      const int n = meta_.query_start[i + 1] - meta_.query_start[i];
      const int splits = meta_.num_splits[i];
      if (batchable(i)) {
        if (group_begin < 0) group_begin = i;
        if (i + 1 - group_begin >= per_tile) flush(i + 1);
        continue;
      }
      flush(i);
      for (int qb = 0; qb < n; qb += tiles_.attention_query_rows) {
        const int qe = std::min(n, qb + tiles_.attention_query_rows);
        if (splits == 0) {
          make(kv, i, i + 1, qb, qe, -1);
          continue;
        }
        const int last_pos = meta_.positions[meta_.query_start[i] + qe - 1];
        for (int s = 0; s * K <= last_pos; ++s) make(kv, i, i + 1, qb, qe, s);
      }
    }
    flush(meta_.num_requests);
  }
}

void TileMaker::attention_merge(const ModelShard& sh, int layer, std::vector<Tile>& out) const {
  const int hd = config_.head_dim;
  const int group = sh.q_heads / sh.kv_heads;
  const int K = tiles_.kv_split_tokens;
  for (int i = 0; i < meta_.num_requests; ++i) {
    if (meta_.num_splits[i] == 0) continue;
    const int row0 = meta_.query_start[i];
    const int n = meta_.query_start[i + 1] - row0;
    for (int qb = 0; qb < n; qb += tiles_.attention_query_rows) {
      const int qe = std::min(n, qb + tiles_.attention_query_rows);
      const int splits_used = meta_.positions[row0 + qe - 1] / K + 1;
      const double row_elems = static_cast<double>(sh.q_heads) * hd;
      Tile& t = new_tile(out, Opcode::kAttentionMerge, layer,
                         op_cost::merge_row(splits_used, row_elems) * (qe - qb));
      isa::AttentionMergeArgs a{};
      a.request = i;
      a.query_begin = qb;
      a.query_end = qe;
      isa::set_args(t.inst, a);
      if (!record_) continue;
      for (int s = 0; s < splits_used; ++s) {
        for (int kv = 0; kv < sh.kv_heads; ++kv) {
          const int64_t base =
              meta_.split_row_begin[i] + (static_cast<int64_t>(s) * sh.kv_heads + kv) * n * group;
          add(t, sh.rank, BufferId::kSplitOut, -1, base + qb * group, base + qe * group, 0,
              hd * kF32, false);
          add(t, sh.rank, BufferId::kSplitLse, -1, base + qb * group, base + qe * group, 0, kF32,
              false);
        }
      }
      add(t, sh.rank, BufferId::kAttnOut, -1, row0 + qb, row0 + qe, 0,
          static_cast<int64_t>(sh.q_heads) * hd * kF32, true);
    }
  }
}

void TileMaker::hidden_tiles(const ModelShard& sh, Opcode op, int layer, int slot, int splits,
                             int in_cols, BufferId input, std::vector<Tile>& out) const {
  const int T = meta_.num_tokens;
  const int H = config_.hidden_size;
  const int row_tiles = (T + tiles_.token_rows - 1) / tiles_.token_rows;
  // Split-K tiles: the splits, and columns narrowed no further than one tile per SM, fill the
  // SMs.
  const int width = splits > 1 ? split_width(row_tiles, splits)
                               : column_width(H, tiles_.hidden_cols, kColumnGranule, row_tiles);
  const int k_range = in_cols / splits;  // k_splits() made it divide
  const size_t first = out.size();
  for (int r0 = 0; r0 < T; r0 += tiles_.token_rows) {
    const int r1 = std::min(T, r0 + tiles_.token_rows);
    for (int c0 = 0; c0 < H; c0 += width) {
      const int c1 = std::min(H, c0 + width);
      for (int s = 0; s < splits; ++s) {
        const int k0 = splits > 1 ? s * k_range : 0, k1 = splits > 1 ? k0 + k_range : in_cols;
        const int tile_slot = splits > 1 ? s : slot;
        const double rows = r1 - r0, cols = c1 - c0;
        Tile& t = new_tile(out, op, layer,
                           op_cost::projection(rows, cols, k1 - k0, /*residual_add=*/splits == 1));
        isa::HiddenTileArgs a{};
        a.row_begin = r0;
        a.row_end = r1;
        a.col_begin = c0;
        a.col_end = c1;
        a.partial_slot = tile_slot;
        if (splits > 1) {
          a.k_begin = k0;
          a.k_end = k1;
        }
        isa::set_args(t.inst, a);
        add(t, sh.rank, input, -1, r0, r1, k0 * kF32, k1 * kF32, false);
        if (tile_slot < 0) {
          add(t, sh.rank, BufferId::kResidual, -1, r0, r1, c0 * kF32, c1 * kF32, false);
          add(t, sh.rank, BufferId::kResidual, -1, r0, r1, c0 * kF32, c1 * kF32, true);
        } else {
          add(t, sh.rank, BufferId::kPartial, -1, tile_slot * T + r0, tile_slot * T + r1, c0 * kF32,
              c1 * kF32, true);
        }
      }
    }
  }
  // A split tile is a column of its own for the grouping: its weights are width x k_range.
  group_rows(out, first, row_tiles, tiles_.num_sms,
             static_cast<double>(tiles_.token_rows) * k_range * kF32,
             static_cast<double>(width) * k_range * 2);
}

void TileMaker::o_proj(const ModelShard& sh, int layer, int slot, int splits,
                       std::vector<Tile>& out) const {
  hidden_tiles(sh, Opcode::kOProj, layer, slot, splits, o_proj_k(sh), BufferId::kAttnOut, out);
}

void TileMaker::down(const ModelShard& sh, int layer, int slot, int splits,
                     std::vector<Tile>& out) const {
  hidden_tiles(sh, Opcode::kDownProj, layer, slot, splits, sh.ffn_cols(), BufferId::kAct, out);
}

void TileMaker::gate_up(const ModelShard& sh, int layer, std::vector<Tile>& out) const {
  const int T = meta_.num_tokens;
  const int H = config_.hidden_size;
  const int F = sh.ffn_cols();
  const int row_tiles = (T + tiles_.token_rows - 1) / tiles_.token_rows;
  const int width = column_width(F, tiles_.ffn_cols, kColumnGranule, row_tiles);
  const size_t first = out.size();
  for (int r0 = 0; r0 < T; r0 += tiles_.token_rows) {
    const int r1 = std::min(T, r0 + tiles_.token_rows);
    for (int c0 = 0; c0 < F; c0 += width) {
      const int c1 = std::min(F, c0 + width);
      const double rows = r1 - r0, cols = c1 - c0;
      Tile& t = new_tile(out, Opcode::kGateUpSilu, layer, op_cost::gate_up(rows, cols, H));
      isa::GateUpArgs a{};
      a.row_begin = r0;
      a.row_end = r1;
      a.col_begin = c0;
      a.col_end = c1;
      a.normed = norm_stages();
      isa::set_args(t.inst, a);
      add(t, sh.rank, BufferId::kResidual, -1, r0, r1, 0, H * kF32, false);
      if (a.normed) add(t, sh.rank, BufferId::kNormed, -1, r0, r1, 0, H * kBf16, false);
      add(t, sh.rank, BufferId::kAct, -1, r0, r1, c0 * kF32, c1 * kF32, true);
    }
  }
  // Gate and up: two weight rows per column.
  group_rows(out, first, row_tiles, tiles_.num_sms,
             static_cast<double>(tiles_.token_rows) * H * kF32, 2.0 * width * H * 2);
}

void TileMaker::tp_reduce(const ModelShard& sh, int tp, int slot, bool assign, int layer,
                          int splits, std::vector<Tile>& out) const {
  const int T = meta_.num_tokens;
  const int H = config_.hidden_size;
  // A split-K reduction's tiles fill the SMs as a balanced projection's do: at 256 decode
  // rows, 32 tiles of 256 columns would each read 4 slots of 128 KB on a quarter of the SMs.
  const int row_tiles = (T + tiles_.token_rows - 1) / tiles_.token_rows;
  const int width = splits > 1 ? column_width(H, tiles_.hidden_cols, kColumnGranule, row_tiles)
                               : tiles_.hidden_cols;
  for (int r0 = 0; r0 < T; r0 += tiles_.token_rows) {
    const int r1 = std::min(T, r0 + tiles_.token_rows);
    for (int c0 = 0; c0 < H; c0 += width) {
      const int c1 = std::min(H, c0 + width);
      const double elems = static_cast<double>(r1 - r0) * (c1 - c0);
      Tile& t =
          new_tile(out, Opcode::kTpReduce, layer, op_cost::tp_reduce(elems, std::max(tp, splits)));
      isa::HiddenTileArgs a{};
      a.row_begin = r0;
      a.row_end = r1;
      a.col_begin = c0;
      a.col_end = c1;
      a.partial_slot = slot;
      a.assign = assign ? 1 : 0;
      if (splits > 1) a.splits = splits;
      isa::set_args(t.inst, a);
      if (splits > 1) {  // this rank's slots [0, splits) [SPLIT_K]
        for (int s = 0; s < splits; ++s) {
          add(t, sh.rank, BufferId::kPartial, -1, s * T + r0, s * T + r1, c0 * kF32, c1 * kF32,
              false);
        }
      } else {
        for (int peer = 0; peer < tp; ++peer) {
          add(t, peer, BufferId::kPartial, -1, slot * T + r0, slot * T + r1, c0 * kF32, c1 * kF32,
              false);
        }
      }
      if (!assign) add(t, sh.rank, BufferId::kResidual, -1, r0, r1, c0 * kF32, c1 * kF32, false);
      add(t, sh.rank, BufferId::kResidual, -1, r0, r1, c0 * kF32, c1 * kF32, true);
    }
  }
}

int TileMaker::split_width(int row_tiles, int splits) const {
  const int H = config_.hidden_size;
  const int64_t per_sm = (static_cast<int64_t>(H) * row_tiles * splits + tiles_.num_sms - 1) /
                         tiles_.num_sms;  // columns per tile at one tile per SM
  const int64_t width = (per_sm + kSplitWidthGranule - 1) / kSplitWidthGranule * kSplitWidthGranule;
  return static_cast<int>(std::min<int64_t>(tiles_.hidden_cols, width));
}

int TileMaker::k_splits(const ModelShard& sh, int in_cols) const {
  const int T = meta_.num_tokens;
  // Steps of matvec_rows rows (the CUDA cores) stream the weights on every SM unsplit; split
  // tiles would stream as many bytes per SM and add a reduction stage, whose wake-up the cost
  // model does not see.
  if (sh.tp != 1 || tiles_.max_k_splits < 2 || T <= tiles_.matvec_rows) return 1;
  const int64_t sms = tiles_.num_sms;
  const int H = config_.hidden_size;
  const int row_tiles = (T + tiles_.token_rows - 1) / tiles_.token_rows;
  const int64_t tiles =
      static_cast<int64_t>(row_tiles) * ((H + tiles_.hidden_cols - 1) / tiles_.hidden_cols);
  // Powers of two: the fewest splits that fill the SMs, each K range a whole number of wgmma
  // k-blocks (64) and long enough (512) that a tile's pipeline is mostly in its steady state.
  int splits = 1;
  while (2 * splits <= tiles_.max_k_splits && tiles * splits < sms &&
         in_cols % (kSplitKGranule * 2 * splits) == 0 && in_cols / (2 * splits) >= kMinSplitK) {
    splits *= 2;
  }
  if (splits == 1) return 1;
  // Only where the busiest SM gets less work than with balanced (narrower) columns over all of
  // K. The tiles take the tensor cores, which pay k_block_cycles per 64-wide k-block.
  const int rows = std::min(T, tiles_.token_rows);
  const double k_block = tiles_.k_block_cycles;
  const auto busiest = [&](int64_t n, const InstructionWork& work, int k) {
    return static_cast<double>((n + sms - 1) / sms) *
           (estimated_cycles(tiles_, work) + k_block * ((k + kSplitKGranule - 1) / kSplitKGranule));
  };
  const int narrow = column_width(H, tiles_.hidden_cols, kColumnGranule, row_tiles);
  const int64_t narrow_tiles = static_cast<int64_t>(row_tiles) * ((H + narrow - 1) / narrow);
  const double unsplit =
      busiest(narrow_tiles, op_cost::projection(rows, narrow, in_cols, true), in_cols);
  const int wide = split_width(row_tiles, splits);
  const int64_t split_tiles = static_cast<int64_t>(row_tiles) * ((H + wide - 1) / wide) * splits;
  const double split =
      busiest(split_tiles, op_cost::projection(rows, wide, in_cols / splits, false),
              in_cols / splits) +
      busiest(narrow_tiles, op_cost::tp_reduce(static_cast<double>(rows) * narrow, splits), 0);
  return split < unsplit ? splits : 1;
}

void TileMaker::lm_head(const ModelShard& sh, std::vector<Tile>& out) const {
  const int S = meta_.num_samples();
  const int H = config_.hidden_size;
  const int V = sh.vocab_cols();
  const int row_tiles = (S + tiles_.lm_head_samples - 1) / tiles_.lm_head_samples;
  const int width = column_width(V, tiles_.vocab_cols, kColumnGranule, row_tiles);
  for (int s0 = 0; s0 < S; s0 += tiles_.lm_head_samples) {
    const int s1 = std::min(S, s0 + tiles_.lm_head_samples);
    for (int c0 = 0; c0 < V; c0 += width) {
      const int c1 = std::min(V, c0 + width);
      const double rows = s1 - s0, cols = c1 - c0;
      Tile& t = new_tile(out, Opcode::kLmHead, -1, op_cost::projection(rows, cols, H));
      isa::LmHeadArgs a{};
      a.sample_begin = s0;
      a.sample_end = s1;
      a.col_begin = c0;
      a.col_end = c1;
      isa::set_args(t.inst, a);
      if (!record_) continue;
      for (int s = s0; s < s1; ++s) {
        const int row = meta_.sample_rows[s];
        add(t, sh.rank, BufferId::kResidual, -1, row, row + 1, 0, H * kF32, false);
      }
      add(t, sh.rank, BufferId::kLogits, -1, s0, s1, c0 * kF32, c1 * kF32, true);
    }
  }
}

void TileMaker::sample(int tp, std::vector<Tile>& out) const {
  const int S = meta_.num_samples();
  for (int s0 = 0; s0 < S; s0 += tiles_.sample_rows) {
    const int s1 = std::min(S, s0 + tiles_.sample_rows);
    Tile& t = new_tile(out, Opcode::kSample, -1, op_cost::sample(s1 - s0, config_.vocab_size));
    isa::SampleArgs a{};
    a.sample_begin = s0;
    a.sample_end = s1;
    isa::set_args(t.inst, a);
    if (!record_) continue;
    for (int peer = 0; peer < tp; ++peer) {
      const ModelShard psh = shard_of(config_, tp, peer);
      add(t, peer, BufferId::kLogits, -1, s0, s1, 0, psh.vocab_cols() * kF32, false);
    }
    add(t, 0, BufferId::kSampled, -1, s0, s1, 0, 1, true);
  }
}

}  // namespace megaserve::engine
