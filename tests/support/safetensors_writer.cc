#include "tests/support/safetensors_writer.h"

#include <unistd.h>

#include <algorithm>
#include <cfenv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>

#include "engine/isa/bf16.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace megaserve::testing {
namespace {

using nlohmann::json;

template <typename T>
std::string raw_bytes(const std::vector<T>& values) {
  std::string bytes(values.size() * sizeof(T), '\0');
  if (!values.empty()) std::memcpy(bytes.data(), values.data(), bytes.size());
  return bytes;
}

// The file's values as they will read back: what a test compares a loaded tensor against.
std::vector<float> rounded(const std::vector<float>& values, const std::string& dtype) {
  std::vector<float> out = values;
  for (float& value : out) {
    if (dtype == "BF16") value = engine::bf16_to_float(engine::float_to_bf16(value));
    if (dtype == "F16") value = engine::f16_to_float(float_to_f16_reference(value));
  }
  return out;
}

TensorRecord make_record(const std::string& dtype, std::string name, std::vector<int64_t> shape,
                         const std::vector<float>& values) {
  if (dtype == "BF16") return bf16_tensor(std::move(name), std::move(shape), values);
  if (dtype == "F16") return f16_tensor(std::move(name), std::move(shape), values);
  return f32_tensor(std::move(name), std::move(shape), values);
}

}  // namespace

TensorRecord f32_tensor(std::string name, std::vector<int64_t> shape,
                        const std::vector<float>& values) {
  return {std::move(name), "F32", std::move(shape), raw_bytes(values)};
}

TensorRecord bf16_tensor(std::string name, std::vector<int64_t> shape,
                         const std::vector<float>& values) {
  std::vector<uint16_t> bits;
  for (float value : values) bits.push_back(engine::float_to_bf16(value));
  return {std::move(name), "BF16", std::move(shape), raw_bytes(bits)};
}

uint16_t float_to_f16_reference(float value) {
  const uint16_t sign = std::signbit(value) ? 0x8000 : 0;
  const double magnitude = std::fabs(static_cast<double>(value));
  if (std::isnan(value)) return sign | 0x7e00;
  if (magnitude >= 65520.0) return sign | 0x7c00;  // halfway above 65504 rounds to infinity
  std::fesetround(FE_TONEAREST);                   // nearbyint: ties to even
  if (magnitude < std::ldexp(1.0, -14)) {
    // Subnormal: a multiple of 2^-24 (1024 of them is the smallest normal, bits 0x400).
    return sign | static_cast<uint16_t>(std::nearbyint(std::ldexp(magnitude, 24)));
  }
  int exponent = 0;
  const double fraction = std::frexp(magnitude, &exponent);  // magnitude = fraction * 2^exponent
  const int biased = exponent - 1 + 15;                      // significand in [1, 2)
  const double mantissa = std::nearbyint((fraction * 2 - 1) * 1024);  // may round to 1024
  return sign | static_cast<uint16_t>((biased << 10) + static_cast<int>(mantissa));
}

TensorRecord f16_tensor(std::string name, std::vector<int64_t> shape,
                        const std::vector<float>& values) {
  std::vector<uint16_t> bits;
  for (float value : values) bits.push_back(float_to_f16_reference(value));
  return {std::move(name), "F16", std::move(shape), raw_bytes(bits)};
}

std::string safetensors_header(const std::vector<TensorRecord>& tensors) {
  // ordered_json keeps the tensors in the order given, as a streaming writer would.
  nlohmann::ordered_json header;
  header["__metadata__"] = {{"format", "pt"}};
  uint64_t offset = 0;
  for (const TensorRecord& tensor : tensors) {
    header[tensor.name] = {{"dtype", tensor.dtype},
                           {"shape", tensor.shape},
                           {"data_offsets", {offset, offset + tensor.bytes.size()}}};
    offset += tensor.bytes.size();
  }
  return header.dump();
}

std::string safetensors_bytes(const std::string& header, const std::string& data) {
  std::string padded = header;
  while (padded.size() % 8 != 0) padded.push_back(' ');
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>(padded.size() >> (8 * i) & 0xff);
  return bytes + padded + data;
}

std::string safetensors_bytes(const std::vector<TensorRecord>& tensors) {
  std::string data;
  for (const TensorRecord& tensor : tensors) data += tensor.bytes;
  return safetensors_bytes(safetensors_header(tensors), data);
}

void write_file(const std::filesystem::path& path, const std::string& bytes) {
  std::error_code ec;
  std::filesystem::create_directories(path.parent_path(), ec);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) ADD_FAILURE() << "cannot write " << path;
}

void write_safetensors(const std::filesystem::path& path,
                       const std::vector<TensorRecord>& tensors) {
  write_file(path, safetensors_bytes(tensors));
}

std::filesystem::path make_test_dir(const std::string& name) {
  const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string leaf = info == nullptr ? std::string("no_test")
                                     : std::string(info->test_suite_name()) + "." + info->name();
  for (char& c : leaf) {
    if (c == '/') c = '_';  // parameterized test names
  }
  const std::filesystem::path dir = std::filesystem::path(::testing::TempDir()) /
                                    ("megaserve_" + std::to_string(::getpid())) / leaf / name;
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  std::filesystem::create_directories(dir, ec);
  if (ec) ADD_FAILURE() << "cannot create " << dir << ": " << ec.message();
  return dir;
}

std::string hf_config_json(const engine::ModelConfig& config) {
  using engine::ModelFamily;
  const char* architecture = "LlamaForCausalLM";
  const char* model_type = "llama";
  if (config.family == ModelFamily::kQwen2) {
    architecture = "Qwen2ForCausalLM";
    model_type = "qwen2";
  } else if (config.family == ModelFamily::kQwen3) {
    architecture = "Qwen3ForCausalLM";
    model_type = "qwen3";
  }
  json out;
  out["architectures"] = {config.architecture.empty() ? architecture : config.architecture};
  out["model_type"] = model_type;
  out["hidden_size"] = config.hidden_size;
  out["intermediate_size"] = config.intermediate_size;
  out["num_hidden_layers"] = config.num_layers;
  out["num_attention_heads"] = config.num_heads;
  out["num_key_value_heads"] = config.num_kv_heads;
  out["head_dim"] = config.head_dim;
  out["vocab_size"] = config.vocab_size;
  out["max_position_embeddings"] = config.max_position_embeddings;
  out["rms_norm_eps"] = config.rms_norm_eps;
  out["rope_theta"] = config.rope_theta;
  out["hidden_act"] = "silu";
  out["tie_word_embeddings"] = config.tie_word_embeddings;
  out["bos_token_id"] = config.bos_token_id;
  if (config.eos_token_ids.size() == 1) {
    out["eos_token_id"] = config.eos_token_ids[0];
  } else if (!config.eos_token_ids.empty()) {
    out["eos_token_id"] = config.eos_token_ids;
  }
  out["torch_dtype"] = "float32";
  if (config.family != ModelFamily::kQwen2) out["attention_bias"] = false;
  if (config.family != ModelFamily::kLlama) out["use_sliding_window"] = false;
  if (config.rope_scaling.type == engine::RopeScalingType::kLlama3) {
    out["rope_scaling"] = {
        {"rope_type", "llama3"},
        {"factor", config.rope_scaling.factor},
        {"low_freq_factor", config.rope_scaling.low_freq_factor},
        {"high_freq_factor", config.rope_scaling.high_freq_factor},
        {"original_max_position_embeddings", config.rope_scaling.original_max_position_embeddings}};
  }
  return out.dump(2);
}

TensorValues write_random_model(const std::filesystem::path& dir, const engine::ModelConfig& config,
                                uint64_t seed, const RandomModelOptions& options) {
  std::mt19937_64 rng(seed);
  auto uniform = [&](int64_t n, double low, double high) {
    std::uniform_real_distribution<double> dist(low, high);
    std::vector<float> values(n);
    for (float& value : values) value = static_cast<float>(dist(rng));
    return values;
  };
  std::vector<TensorRecord> records;
  TensorValues values;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, std::vector<float> data) {
    values[name] = rounded(data, options.dtype);
    records.push_back(make_record(options.dtype, name, std::move(shape), data));
  };
  auto matrix = [&](const std::string& name, int64_t out, int64_t in) {
    const double a = 1.0 / std::sqrt(static_cast<double>(in));
    add(name, {out, in}, uniform(out * in, -a, a));
  };
  auto norm = [&](const std::string& name, int64_t n) { add(name, {n}, uniform(n, 0.75, 1.25)); };
  auto bias = [&](const std::string& name, int64_t n) { add(name, {n}, uniform(n, -0.1, 0.1)); };

  const int64_t hidden = config.hidden_size;
  const int64_t q_size = static_cast<int64_t>(config.num_heads) * config.head_dim;
  const int64_t kv_size = static_cast<int64_t>(config.num_kv_heads) * config.head_dim;
  matrix("model.embed_tokens.weight", config.vocab_size, hidden);
  for (int i = 0; i < config.num_layers; ++i) {
    const std::string layer = "model.layers." + std::to_string(i) + ".";
    norm(layer + "input_layernorm.weight", hidden);
    matrix(layer + "self_attn.q_proj.weight", q_size, hidden);
    matrix(layer + "self_attn.k_proj.weight", kv_size, hidden);
    matrix(layer + "self_attn.v_proj.weight", kv_size, hidden);
    if (config.qkv_bias) {
      bias(layer + "self_attn.q_proj.bias", q_size);
      bias(layer + "self_attn.k_proj.bias", kv_size);
      bias(layer + "self_attn.v_proj.bias", kv_size);
    }
    if (config.qk_norm) {
      norm(layer + "self_attn.q_norm.weight", config.head_dim);
      norm(layer + "self_attn.k_norm.weight", config.head_dim);
    }
    matrix(layer + "self_attn.o_proj.weight", hidden, q_size);
    norm(layer + "post_attention_layernorm.weight", hidden);
    matrix(layer + "mlp.gate_proj.weight", config.intermediate_size, hidden);
    matrix(layer + "mlp.up_proj.weight", config.intermediate_size, hidden);
    matrix(layer + "mlp.down_proj.weight", hidden, config.intermediate_size);
  }
  norm("model.norm.weight", hidden);
  if (!config.tie_word_embeddings) matrix("lm_head.weight", config.vocab_size, hidden);

  write_file(dir / "config.json", hf_config_json(config));
  const int num_shards = std::max(1, options.num_shards);
  if (num_shards == 1) {
    write_safetensors(dir / "model.safetensors", records);
    return values;
  }
  // Contiguous runs of tensors per shard, named as Hugging Face names them.
  json index;
  index["weight_map"] = json::object();
  uint64_t total_size = 0;
  const size_t per_shard = (records.size() + num_shards - 1) / num_shards;
  for (int shard = 0; shard < num_shards; ++shard) {
    char file_name[64];
    std::snprintf(file_name, sizeof file_name, "model-%05d-of-%05d.safetensors", shard + 1,
                  num_shards);
    std::vector<TensorRecord> part;
    for (size_t k = shard * per_shard; k < std::min(records.size(), (shard + 1) * per_shard); ++k) {
      part.push_back(records[k]);
      index["weight_map"][records[k].name] = file_name;
      total_size += records[k].bytes.size();
    }
    write_safetensors(dir / file_name, part);
  }
  index["metadata"] = {{"total_size", total_size}};
  write_file(dir / "model.safetensors.index.json", index.dump(2));
  return values;
}

engine::ModelConfig tiny_model_config(engine::ModelFamily family) {
  engine::ModelConfig config;
  config.family = family;
  config.hidden_size = 32;
  config.intermediate_size = 48;
  config.num_layers = 2;
  config.num_heads = 4;
  config.num_kv_heads = 2;
  config.head_dim = 8;
  config.vocab_size = 64;
  config.max_position_embeddings = 128;
  config.eos_token_ids = {2};
  switch (family) {
    case engine::ModelFamily::kLlama:
      config.architecture = "LlamaForCausalLM";
      break;
    case engine::ModelFamily::kQwen2:
      config.architecture = "Qwen2ForCausalLM";
      config.qkv_bias = true;
      config.tie_word_embeddings = true;
      config.rms_norm_eps = 1e-6f;
      config.rope_theta = 1000000.0f;
      break;
    case engine::ModelFamily::kQwen3:
      config.architecture = "Qwen3ForCausalLM";
      config.qk_norm = true;
      config.head_dim = 16;
      config.rms_norm_eps = 1e-6f;
      config.rope_theta = 1000000.0f;
      break;
  }
  return config;
}

}  // namespace megaserve::testing
