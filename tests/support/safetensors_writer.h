// Writes safetensors files and whole Hugging Face model directories for tests: small
// Llama/Qwen2/Qwen3 models with random weights, and hand-made (also deliberately broken)
// files for the loader's error paths. Independent of the loader: it shares only the
// ModelConfig struct and engine/isa/bf16.h's float_to_bf16.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "engine/model/model_config.h"

namespace megaserve::testing {

// One tensor as it goes into a file: the dtype as safetensors spells it ("F32", "BF16",
// "I64", ...), the shape and the raw little-endian bytes. Nothing is checked, so a test can
// write a tensor whose bytes do not match its shape.
struct TensorRecord {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};

TensorRecord f32_tensor(std::string name, std::vector<int64_t> shape,
                        const std::vector<float>& values);
// Rounds each value to nearest even (engine::float_to_bf16).
TensorRecord bf16_tensor(std::string name, std::vector<int64_t> shape,
                         const std::vector<float>& values);
// Rounds each value to nearest even, overflow to infinity (an implementation of its own, via
// std::nearbyint, so it can check the engine's).
TensorRecord f16_tensor(std::string name, std::vector<int64_t> shape,
                        const std::vector<float>& values);
uint16_t float_to_f16_reference(float value);

// The JSON header for `tensors` laid out back to back in the given order, with optional
// __metadata__ {"format": "pt"}.
std::string safetensors_header(const std::vector<TensorRecord>& tensors);
// A whole file: 8-byte little-endian header length, the header (padded with spaces to a
// multiple of 8 bytes, as the reference writer does), then the data.
std::string safetensors_bytes(const std::vector<TensorRecord>& tensors);
// The same framing around any header text and data, for malformed files.
std::string safetensors_bytes(const std::string& header, const std::string& data);

// Write bytes to a file, creating its folder; ADD_FAILURE when that fails.
void write_file(const std::filesystem::path& path, const std::string& bytes);
void write_safetensors(const std::filesystem::path& path, const std::vector<TensorRecord>& tensors);

// A fresh, empty directory for this test (under GoogleTest's temp dir), named after the
// running test and `name`.
std::filesystem::path make_test_dir(const std::string& name);

// Hugging Face config.json text for `config`: architectures and model_type from its family
// (or config.architecture when set), every shape field, rope_scaling when llama3, eos ids.
std::string hf_config_json(const engine::ModelConfig& config);

struct RandomModelOptions {
  std::string dtype = "F32";  // "F32", "F16" or "BF16" on disk
  int num_shards = 1;         // > 1: model-0000i-of-0000N.safetensors + index.json
};

// Hugging Face tensor name -> the values in the file (already rounded to the file's dtype).
using TensorValues = std::map<std::string, std::vector<float>>;

// Writes config.json and model.safetensors (or shards with model.safetensors.index.json) for
// `config` with weights from a generator seeded by `seed`: projections U(-a, a) with
// a = 1/sqrt(in_features), biases U(-0.1, 0.1), norm gains 1 + U(-0.25, 0.25). Names follow
// Hugging Face (model.layers.N.self_attn.q_proj.weight, ...); q/k/v biases when
// config.qkv_bias, q_norm/k_norm when config.qk_norm, no lm_head.weight when tied.
TensorValues write_random_model(const std::filesystem::path& dir, const engine::ModelConfig& config,
                                uint64_t seed, const RandomModelOptions& options = {});

// A small random-model shape of each family, for tests: hidden 32, 2 layers, 4 heads,
// 2 kv heads, intermediate 48, vocab 64, head_dim 8; Qwen2 ties its embeddings and Qwen3
// has head_dim 16 (so q_size 64 != hidden, as in Qwen3-0.6B).
engine::ModelConfig tiny_model_config(engine::ModelFamily family);

}  // namespace megaserve::testing
