// The shape of a Llama-family decoder, read from a Hugging Face config.json (plus
// generation_config.json for EOS ids). Everything the loader, the schedule builder and the
// backends need to know about a model lives here; nothing model-specific is compiled in.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace megaserve::engine {

enum class ModelFamily {
  kLlama,  // Llama 2/3/3.1/3.2: LlamaForCausalLM
  kQwen2,  // Qwen2/2.5: bias on q/k/v projections
  kQwen3,  // Qwen3 dense: RMSNorm on each q and k head before RoPE
};

// kLlama3: transformers' "llama3" rope_scaling (its four parameters below). kFactors: one
// divisor per rotary pair, as llama.cpp's converter stores Llama 3.1's scaling in a GGUF
// (the tensor rope_freqs.weight): inv_freq[i] = theta^(-2i/head_dim) / freq_factors[i].
enum class RopeScalingType { kNone, kLlama3, kFactors };

struct RopeScaling {
  RopeScalingType type = RopeScalingType::kNone;
  float factor = 1.0f;
  float low_freq_factor = 1.0f;
  float high_freq_factor = 4.0f;
  int original_max_position_embeddings = 8192;
  std::vector<float> freq_factors;  // kFactors: head_dim / 2 of them, each finite and > 0
};

// The largest value parse_model_config accepts for each size field (see model_config.cc).
inline constexpr int kMaxHiddenSize = 1 << 16;
inline constexpr int kMaxIntermediateSize = 1 << 18;
inline constexpr int kMaxLayers = 1024;
inline constexpr int kMaxHeads = 1024;
inline constexpr int kMaxHeadDim = 1024;
inline constexpr int kMaxVocabSize = 1 << 22;
inline constexpr int kMaxPositions = 1 << 26;

struct ModelConfig {
  std::string architecture;  // e.g. "LlamaForCausalLM"
  ModelFamily family = ModelFamily::kLlama;
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;  // hidden_size / num_heads unless config.json says otherwise
  int vocab_size = 0;
  int max_position_embeddings = 0;
  float rms_norm_eps = 1e-5f;
  float rope_theta = 10000.0f;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;               // Qwen2
  bool qk_norm = false;                // Qwen3
  int bos_token_id = 1;                // -1 when config.json says null
  std::vector<int32_t> eos_token_ids;  // from generation_config.json when present
  std::string torch_dtype;             // as written in config.json, informational

  int q_size() const { return num_heads * head_dim; }
  int kv_size() const { return num_kv_heads * head_dim; }
  // Weights, biases and norms; below 2^50 within the bounds above.
  int64_t num_parameters() const;
};

// Parses config.json text. `source` names the file in error messages; so does an error for
// a size out of range (each has a sane upper bound, kMax*), which names the field and value.
// A feature megaserve does not support (an unknown architecture, a RoPE scaling type, sliding
// window, MoE...) gives InvalidArgument naming it.
absl::StatusOr<ModelConfig> parse_model_config(const std::string& json_text,
                                               const std::string& source);

// Reads <dir>/config.json and, when present, <dir>/generation_config.json.
absl::StatusOr<ModelConfig> load_model_config(const std::filesystem::path& model_dir);

// Reads one config.json-format file (e.g. configs/models/llama-3.1-8b.json, the shape of a
// model whose weights are not at hand); no generation_config.json is looked for.
absl::StatusOr<ModelConfig> load_model_config_file(const std::filesystem::path& config_file);

// Applies a generation_config.json's eos_token_id (an int or a list of ints) to `config`;
// a file without one leaves `config` unchanged.
absl::Status apply_generation_config(const std::string& json_text, const std::string& source,
                                     ModelConfig* config);

// The RoPE inverse frequency of each rotary pair i in [0, head_dim/2), scaling applied:
// theta^(-2i/head_dim), computed in double and rounded once to float.
std::vector<float> rope_inv_freq(const ModelConfig& config);

// RoPE's cos and sin of positions [0, positions) for every rotary pair: cos at
// 2 (p * head_dim/2 + i), sin after it, of the float angle p * inv_freq[i] (float product,
// then std::cos / std::sin of the float), as the CPU interpreter rotates q and k.
std::vector<float> rope_cos_sin(const ModelConfig& config, int positions);

}  // namespace megaserve::engine
