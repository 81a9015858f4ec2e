// A random model's shape for the GPU suites (cuda_backend_test, cuda_tp_test): a family, its
// sizes and the GPU tile choices that go with it, and the ModelConfig it makes.
#pragma once

#include <cstdint>
#include <string>

#include "engine/model/model_config.h"
#include "tests/support/safetensors_writer.h"

namespace megaserve::engine {

struct ModelCase {
  std::string name;
  ModelFamily family;
  int hidden, heads, kv_heads, head_dim, ffn, vocab, layers;
  int32_t block_size;
  int kv_split_tokens;  // GPU tiles; the CPU uses its own (smaller) splits
  bool llama3 = false;
  int attention_query_rows = 0;  // GPU tiles (0: gpu_tile_config's)
};

inline ModelConfig make_config(const ModelCase& c) {
  ModelConfig config = testing::tiny_model_config(c.family);
  config.hidden_size = c.hidden;
  config.num_heads = c.heads;
  config.num_kv_heads = c.kv_heads;
  config.head_dim = c.head_dim;
  config.intermediate_size = c.ffn;
  config.vocab_size = c.vocab;
  config.num_layers = c.layers;
  config.max_position_embeddings = 8192;
  if (c.llama3) {
    config.rope_theta = 500000.0f;
    config.rope_scaling.type = RopeScalingType::kLlama3;
    config.rope_scaling.factor = 8.0f;
    config.rope_scaling.original_max_position_embeddings = 1024;
  }
  return config;
}

}  // namespace megaserve::engine
