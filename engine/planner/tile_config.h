// Tile shapes and the placement cost model: the knobs the ScheduleBuilder reads to cut a step
// into instructions and spread them over SMs. Chosen per executor (the CPU interpreter picks
// small tiles; a GPU picks from its SM count), never per model.
#pragma once

#include <cstdint>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace megaserve::engine {

struct TileConfig {
  int num_sms = 1;  // queues per rank (CTAs on a GPU, worker threads on the CPU)

  // Matmul tiles: token rows x output columns.
  int token_rows = 16;       // token rows per projection tile
  int qkv_rows = 16;         // token rows per QKV tile of a model with q/k norm (else token_rows)
  int qkv_heads = 2;         // fused (q, k or v) heads per QKV tile; a tile holds whole heads
  int hidden_cols = 32;      // hidden columns per O-projection / down / TP-reduce tile
  int ffn_cols = 32;         // FFN columns per gate/up tile
  int vocab_cols = 128;      // vocabulary columns per LM-head tile
  int embedding_rows = 16;   // token rows per embedding tile
  int lm_head_samples = 64;  // sampling rows per LM-head tile
  int sample_rows = 8;       // sampling rows per kSample instruction
  // Projection tiles of at most this many token rows stream their weights on CUDA cores
  // (kernels/projection.cuh: one row); more take the tensor cores where the step asks.
  int matvec_rows = 1;

  // GPU: a projection stage (QKV, O, gate/up, down, LM head) whose tiles would not keep
  // every SM busy for two rounds gets the column width (multiples of 16 columns, whole heads
  // for QKV; narrower or, up to one round of tiles, wider) that puts the fewest columns on
  // the busiest SM. Column splits change no number, only how instructions share the weights.
  bool balance_columns = false;
  // Split-K of O and down on one rank [SPLIT_K] (engine/isa/isa.h HiddenTileArgs): a stage
  // of more than matvec_rows tokens whose tiles at hidden_cols are fewer than num_sms is cut
  // along K into the fewest splits (a power of two up to this, each K range a multiple of 64
  // and at least 512) that give num_sms tiles, or as many as allowed, the split tiles no
  // narrower than one per SM needs (multiples of 64 columns), when the cost model (with
  // k_block_cycles) puts the busiest SM lower so than with narrowed columns over all of K; a
  // kTpReduce sums the splits. 1: never.
  int max_k_splits = 1;

  // Attention: a request whose context exceeds kv_split_tokens is split into KV splits of
  // kv_split_tokens keys ([s * kv_split_tokens, (s + 1) * kv_split_tokens)), partials merged
  // by kAttentionMerge. Split boundaries depend only on positions, so a token's attention
  // is computed identically whatever else is in the step.
  int kv_split_tokens = 256;
  // Split only requests whose own attention items (query tiles x kv heads) are fewer than
  // num_sms: a long prefill chunk fills the SMs unsplit, and then needs no merge.
  bool kv_split_narrow_only = false;
  int attention_query_rows = 16;     // query rows per single-request attention tile
  int attention_batch_requests = 8;  // short requests grouped into one attention tile, at most

  // Steps of at least norm_stage_tokens tokens (0: never) get a kRmsNorm stage before QKV
  // and one before gate/up in every layer; its tiles hold at most norm_rows token rows, fewer
  // where that would leave SMs without one.
  int norm_stage_tokens = 0;
  int norm_rows = 64;

  // Cost model: estimated cycles = overhead + max(flops / flops_per_cycle,
  // bytes / bytes_per_cycle); only the ratios matter for placement.
  double flops_per_cycle = 1024.0;
  double bytes_per_cycle = 64.0;
  double overhead_cycles = 2000.0;
  // Fixed cycles per 64-wide k-block of a tensor-core projection tile (its pipeline's barriers
  // and fills, whatever the tile's width): only the split-K choice of O and down reads it
  // (TileMaker::k_splits), where narrow tiles over all of K pay it 4x as often as wide ones
  // over a quarter. 0: not counted.
  double k_block_cycles = 0.0;
  // Fixed cycles per attention tile (staging its queries, filling its copy pipeline, writing
  // its outputs), beside its flops and bytes: without them a short prompt's tiles looked 8x
  // cheaper than a decode tile of 8 requests where they are ~4.6x, and LPT stacked them on
  // the SMs with one decode tile. 0: not counted.
  double attention_tile_cycles = 0.0;
};

// Every count must be positive (a zero tile size would cut nothing); the error names the field.
inline absl::Status check_tile_config(const TileConfig& c) {
  const std::pair<const char*, int> fields[] = {
      {"num_sms", c.num_sms},
      {"token_rows", c.token_rows},
      {"qkv_rows", c.qkv_rows},
      {"qkv_heads", c.qkv_heads},
      {"hidden_cols", c.hidden_cols},
      {"ffn_cols", c.ffn_cols},
      {"vocab_cols", c.vocab_cols},
      {"embedding_rows", c.embedding_rows},
      {"lm_head_samples", c.lm_head_samples},
      {"sample_rows", c.sample_rows},
      {"matvec_rows", c.matvec_rows},
      {"kv_split_tokens", c.kv_split_tokens},
      {"attention_query_rows", c.attention_query_rows},
      {"attention_batch_requests", c.attention_batch_requests},
      {"norm_rows", c.norm_rows},
      {"max_k_splits", c.max_k_splits}};
  for (const auto& [name, value] : fields) {
    if (value < 1) {
      return absl::InvalidArgumentError(absl::StrCat("TileConfig.", name, " = ", value, " < 1"));
    }
  }
  if (c.norm_stage_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("TileConfig.norm_stage_tokens = ", c.norm_stage_tokens, " < 0"));
  }
  if (!(c.flops_per_cycle > 0) || !(c.bytes_per_cycle > 0) || !(c.overhead_cycles >= 0) ||
      !(c.k_block_cycles >= 0) || !(c.attention_tile_cycles >= 0)) {
    return absl::InvalidArgumentError("TileConfig cost model rates must be positive");
  }
  return absl::OkStatus();
}

// Small tiles so that even stories260K (hidden 64, 5 layers) makes many instructions and the
// interpreter exercises real cross-SM ordering.
inline TileConfig cpu_tile_config(int num_sms) {
  TileConfig c;
  c.num_sms = num_sms;
  c.token_rows = 4;
  c.qkv_rows = 4;
  c.qkv_heads = 2;
  c.hidden_cols = 16;
  c.ffn_cols = 32;
  c.vocab_cols = 128;
  c.embedding_rows = 4;
  c.lm_head_samples = 4;
  c.sample_rows = 2;
  c.kv_split_tokens = 32;
  c.attention_query_rows = 4;
  c.attention_batch_requests = 2;
  c.flops_per_cycle = 16.0;
  c.bytes_per_cycle = 16.0;
  c.overhead_cycles = 100.0;
  return c;
}

// The megakernel's tiles on a Hopper GPU with `num_sms` SMs, used by the CUDA backend and by
// every test that plans GPU steps (one config: tests never plan tiles the GPU does not run).
// Projections: a tile's columns are spread over the CTA's 8 warps (tensor cores: blocks of 32
// weight rows; CUDA cores: a warp per column) and its rows reuse each staged weight chunk, up
// to 128 at a time. Column tiles are as wide as a prefill wants; a step with fewer tiles than
// SMs gets narrower ones (balance_columns), so that a decode step's weight stream covers every
// SM. Every tile fits the smallest Hopper CTA's shared memory; CudaBackend::create checks the
// model's rows against the device's.
inline TileConfig gpu_tile_config(int num_sms = 132) {
  TileConfig c;
  c.num_sms = num_sms;
  // 128 token rows: one wgmma pass of 128 rows x 256 weight rows, twice the work per staged
  // weight byte of 64 rows (kernels/tile_wgmma.cuh). QKV tiles of a model with q/k norm keep
  // 64, their chunk (their heads wait in shared memory): at 128 an H100 took 7.1 ms instead of
  // 4.1 for a decode step's QKV of 256 requests, each tile's two chunks streaming the weights
  // twice. Without q/k norm QKV takes 128-row passes like the others.
  c.token_rows = 128;
  c.qkv_rows = 64;
  // Wide enough that a wgmma pass uses all of its 256 weight rows (kernels/tile_wgmma.cuh):
  // two heads of 128, 256 hidden columns, 128 FFN columns (gate and up: 256 rows). On an H100
  // these took a wgmma prefill of 8192 tokens from 1,775 to 1,168 ms and mma.sync's from
  // 3,476 to 3,214 ms (bench/RESULTS.md).
  c.qkv_heads = 2;
  c.hidden_cols = 256;
  c.ffn_cols = 128;
  c.vocab_cols = 1024;
  c.embedding_rows = 64;
  // 128 sampling rows: one 128-row wgmma pass per vocabulary tile (kernels/op_lm_head.cuh);
  // at 64 a decode step of 256 requests streamed the 1 GB LM head of Llama-3.1-8B 4 times
  // (1.84 ms per CTA on an H100, 5x its floor).
  c.lm_head_samples = 128;
  c.sample_rows = 1;  // one CTA per sampling row
  // 32 query rows: a GQA-4 tile's 128 M rows fill one tensor-core attention pass (8 m-tiles,
  // a warp each: no key-slice merge) and its K/V are staged once per 32 query rows, not 16.
  c.attention_query_rows = 32;
  c.attention_batch_requests = 8;
  c.kv_split_tokens = 1024;
  // An 8k-token prefill split at 1024 keys ran 8,192 merges of ~400 µs (24.6 ms per CTA of a
  // 526 ms step on an H100) for 2,048 items that fill the SMs 15 times over unsplit.
  c.kv_split_narrow_only = true;
  c.balance_columns = true;
  // Split-K up to 4: at 256 decode rows (2 row tiles) O and down have 2 x 16 tiles of 256
  // columns; balanced to 64 columns, each of their 128 tiles re-read its 128 activation rows
  // of all of K for 64 weight rows, 4x the weights' bytes from L2 (an H100 took 4.8 ms for
  // down and 1.8 for O per step, floors ~1.3 and ~0.4). 4 splits give 128 tiles of 256
  // columns over a quarter of K each: activations read once per 256 weight rows.
  c.max_k_splits = 4;
  // A norm stage from 2 tokens: every step whose tiles take the wgmma passes (one-row steps
  // take the CUDA cores, which read fp32 rows). Without it an 8B decode step of 8 on an H100
  // spent 111 us per QKV tile converting its fp32 rows in every tile, against 56 us per tile
  // of batch 32 reading bf16 rows from the stage (bench/RESULTS.md, 2026-12-07); the
  // threshold was 32, then 9. The backend turns it off where nothing reads the stage's rows
  // (no wgmma, no bf16 rows).
  c.norm_stage_tokens = 2;
  // bf16 tensor cores as used (~512 flops per SM-cycle), ~3-4 TB/s over 132 SMs at ~1.8 GHz
  // (~13 bytes per SM-cycle).
  c.flops_per_cycle = 512.0;
  c.bytes_per_cycle = 13.0;
  c.overhead_cycles = 1000.0;
  // An 8B decode step of 8 on an H100: down tiles of 32 columns over all 14,336 of K took 138
  // us for 917 KB (224 k-blocks); gate/up's streamed 15 GB/s per SM, which would be ~60 us:
  // ~0.35 us, ~600 cycles, more per k-block (bench/RESULTS.md, 2026-12-07).
  c.k_block_cycles = 600.0;
  // A 255-decode step beside a 256-token prompt on an H100: decode tiles (8 requests x 513
  // keys) took ~139 us, the prompt's 64 tiles (32 query rows x <= 256 keys) ~30 us on
  // average where their flops alone come to ~9 us at this rate: ~20 us more, ~40k cycles.
  c.attention_tile_cycles = 40000.0;
  return c;
}

}  // namespace megaserve::engine
