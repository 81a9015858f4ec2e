// How a model is split over tensor-parallel ranks: q/kv heads and FFN columns by column
// (each rank owns a contiguous range), the vocabulary (embedding and LM head) by rows.
// Ranges are as even as possible; the first ranks take the remainder.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/model/model_config.h"

namespace megaserve::engine {

struct ModelShard {
  int rank = 0;
  int tp = 1;
  int q_heads = 0;    // local q heads: global heads [rank * q_heads, (rank + 1) * q_heads)
  int kv_heads = 0;   // local kv heads, likewise
  int ffn_begin = 0;  // global FFN columns [ffn_begin, ffn_end)
  int ffn_end = 0;
  int vocab_begin = 0;  // global vocabulary ids [vocab_begin, vocab_end)
  int vocab_end = 0;

  int ffn_cols() const { return ffn_end - ffn_begin; }
  int vocab_cols() const { return vocab_end - vocab_begin; }
  int q_heads_begin() const { return rank * q_heads; }
  int kv_heads_begin() const { return rank * kv_heads; }
  int fused_heads() const { return q_heads + 2 * kv_heads; }
};

inline int even_split_begin(int total, int parts, int index) {
  const int base = total / parts;
  const int extra = total % parts;
  return index * base + (index < extra ? index : extra);
}

// Heads must divide evenly (a kv head's q group never straddles ranks).
inline absl::Status check_tensor_parallel(const ModelConfig& config, int tp) {
  if (tp < 1) return absl::InvalidArgumentError(absl::StrCat("tensor_parallel ", tp, " < 1"));
  if (config.num_heads % tp != 0 || config.num_kv_heads % tp != 0) {
    return absl::InvalidArgumentError(absl::StrCat("tensor_parallel ", tp,
                                                   " does not divide num_heads ", config.num_heads,
                                                   " and num_kv_heads ", config.num_kv_heads));
  }
  if (config.intermediate_size < tp || config.vocab_size < tp) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor_parallel ", tp, " exceeds intermediate_size or vocab_size"));
  }
  return absl::OkStatus();
}

inline ModelShard shard_of(const ModelConfig& config, int tp, int rank) {
  ModelShard s;
  s.rank = rank;
  s.tp = tp;
  s.q_heads = config.num_heads / tp;
  s.kv_heads = config.num_kv_heads / tp;
  s.ffn_begin = even_split_begin(config.intermediate_size, tp, rank);
  s.ffn_end = even_split_begin(config.intermediate_size, tp, rank + 1);
  s.vocab_begin = even_split_begin(config.vocab_size, tp, rank);
  s.vocab_end = even_split_begin(config.vocab_size, tp, rank + 1);
  return s;
}

}  // namespace megaserve::engine
