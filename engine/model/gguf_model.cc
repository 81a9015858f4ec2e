#include "engine/model/gguf_model.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/isa/bf16.h"
#include "engine/model/weights_internal.h"
#include "spdlog/spdlog.h"

namespace megaserve::engine {
namespace {

constexpr char kLayerPrefix[] = "model.layers.";

// Hugging Face name (as weight_slots() lists them) -> llama.cpp's GGUF name.
const std::map<std::string, std::string>& global_names() {
  static const auto* names = new std::map<std::string, std::string>{
      {"model.embed_tokens.weight", "token_embd.weight"},
      {"model.norm.weight", "output_norm.weight"},
      {"lm_head.weight", "output.weight"},
  };
  return *names;
}
const std::map<std::string, std::string>& layer_names() {
  static const auto* names = new std::map<std::string, std::string>{
      {"input_layernorm.weight", "attn_norm.weight"},
      {"self_attn.q_proj.weight", "attn_q.weight"},
      {"self_attn.k_proj.weight", "attn_k.weight"},
      {"self_attn.v_proj.weight", "attn_v.weight"},
      {"self_attn.o_proj.weight", "attn_output.weight"},
      {"post_attention_layernorm.weight", "ffn_norm.weight"},
      {"mlp.gate_proj.weight", "ffn_gate.weight"},
      {"mlp.up_proj.weight", "ffn_up.weight"},
      {"mlp.down_proj.weight", "ffn_down.weight"},
  };
  return *names;
}

// "" for a name llama GGUF files have no counterpart of (biases, q/k norms).
std::string gguf_name(const std::string& hf_name) {
  if (auto it = global_names().find(hf_name); it != global_names().end()) return it->second;
  if (!absl::StartsWith(hf_name, kLayerPrefix)) return "";
  const size_t dot = hf_name.find('.', sizeof(kLayerPrefix) - 1);
  if (dot == std::string::npos) return "";
  const std::string layer =
      hf_name.substr(sizeof(kLayerPrefix) - 1, dot - (sizeof(kLayerPrefix) - 1));
  auto it = layer_names().find(hf_name.substr(dot + 1));
  if (it == layer_names().end()) return "";
  return absl::StrCat("blk.", layer, ".", it->second);
}

std::string shape_string(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// Reads an integer key into `out` when present (or fails when `required`), within [lo, hi].
absl::Status read_int(const GgufFile& file, const char* key, int64_t lo, int64_t hi, bool required,
                      int* out) {
  if (!required && file.find_metadata(key) == nullptr) return absl::OkStatus();
  absl::StatusOr<int64_t> value = file.get_int(key);
  if (!value.ok()) return value.status();
  if (*value < lo || *value > hi) {
    return absl::InvalidArgumentError(absl::StrCat(file.path().string(), ": metadata '", key,
                                                   "' = ", *value, " is outside [", lo, ", ", hi,
                                                   "]"));
  }
  *out = static_cast<int>(*value);
  return absl::OkStatus();
}

absl::Status read_positive_float(const GgufFile& file, const char* key, float* out) {
  if (file.find_metadata(key) == nullptr) return absl::OkStatus();
  absl::StatusOr<double> value = file.get_float(key);
  if (!value.ok()) return value.status();
  if (!(*value > 0)) {
    return absl::InvalidArgumentError(absl::StrCat(file.path().string(), ": metadata '", key,
                                                   "' = ", *value, " must be positive"));
  }
  *out = static_cast<float>(*value);
  return absl::OkStatus();
}

absl::Status unsupported(const GgufFile& file, const std::string& what) {
  return absl::InvalidArgumentError(
      absl::StrCat(file.path().string(), ": unsupported by megaserve: ", what));
}

// llama.cpp's converter writes Llama 3.1's RoPE scaling as this tensor: one divisor per
// rotary pair.
constexpr char kRopeFreqs[] = "rope_freqs.weight";

absl::Status read_rope_freqs(const GgufFile& file, const GgufTensor& tensor, int head_dim,
                             RopeScaling* scaling) {
  const std::string where = absl::StrCat(file.path().string(), ": tensor '", tensor.name, "'");
  if (tensor.dims.size() != 1 || tensor.numel() != head_dim / 2) {
    return absl::InvalidArgumentError(absl::StrCat(where, " has shape ",
                                                   shape_string(tensor.shape()), ", expected [",
                                                   head_dim / 2, "] (head_dim / 2)"));
  }
  if (!ggml_can_dequantize(tensor.type)) {
    return absl::InvalidArgumentError(absl::StrCat(where, " has type ", ggml_type_name(tensor.type),
                                                   ", which megaserve does not read"));
  }
  std::vector<float> factors(head_dim / 2);
  MEGASERVE_RETURN_IF_ERROR(
      dequantize_to_f32(tensor.type, tensor.data, tensor.numel(), factors.data()));
  for (size_t i = 0; i < factors.size(); ++i) {
    if (!std::isfinite(factors[i]) || !(factors[i] > 0)) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": factor ", i, " is ", factors[i],
                                                     "; each must be finite and positive"));
    }
  }
  scaling->type = RopeScalingType::kFactors;
  scaling->freq_factors = std::move(factors);
  return absl::OkStatus();
}

// Copies `source` into `target` row by row, dequantizing; `qk_rows` puts llama.cpp's q/k
// rows back in Hugging Face order. Shapes and the type were checked by the caller.
absl::Status convert(const GgufTensor& source, bool qk_rows, int64_t head_dim, Tensor* target) {
  const int64_t row_length = source.row_length();
  const int64_t rows = row_length == 0 ? 0 : source.numel() / row_length;
  const uint64_t row_bytes = source.row_bytes();
  std::vector<float> values(target->dtype == DType::kF16 ? row_length : 0);
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t from = qk_rows ? gguf_qk_source_row(row, head_dim) : row;
    const uint8_t* in = source.data + from * row_bytes;
    absl::Status status;  // fails only for a type or row length the caller let through
    switch (target->dtype) {
      case DType::kF32:
        status = dequantize_to_f32(source.type, in, row_length,
                                   target->mutable_data<float>() + row * row_length);
        break;
      case DType::kBF16:
        status = dequantize_to_bf16(source.type, in, row_length,
                                    target->mutable_data<uint16_t>() + row * row_length);
        break;
      case DType::kF16:
        status = dequantize_to_f32(source.type, in, row_length, values.data());
        for (int64_t i = 0; i < row_length; ++i) {
          target->mutable_data<uint16_t>()[row * row_length + i] = float_to_f16(values[i]);
        }
        break;
    }
    if (!status.ok()) return status;
  }
  return absl::OkStatus();
}

}  // namespace

int64_t gguf_qk_source_row(int64_t row, int64_t head_dim) {
  const int64_t half_dim = head_dim / 2;
  const int64_t head = row / head_dim;
  const int64_t within = row % head_dim;  // = half * half_dim + i in Hugging Face's order
  const int64_t half = within / half_dim;
  const int64_t i = within % half_dim;
  return head * head_dim + 2 * i + half;
}

absl::StatusOr<ModelConfig> gguf_model_config(const GgufFile& file) {
  const std::string source = file.path().string();
  absl::StatusOr<std::string> architecture = file.get_string("general.architecture");
  if (!architecture.ok()) return architecture.status();
  if (*architecture != "llama") {
    return unsupported(file, absl::StrCat("general.architecture '", *architecture,
                                          "' (only llama GGUF files load)"));
  }
  ModelConfig config;
  config.architecture = "LlamaForCausalLM";
  config.family = ModelFamily::kLlama;
  config.torch_dtype = "gguf";

  int experts = 0;
  MEGASERVE_RETURN_IF_ERROR(read_int(file, "llama.expert_count", 0, kMaxHeads, false, &experts));
  if (experts > 0) {
    return unsupported(file,
                       absl::StrCat("mixture-of-experts (llama.expert_count = ", experts, ")"));
  }
  if (file.find_metadata("llama.rope.scaling.type") != nullptr) {
    absl::StatusOr<std::string> scaling = file.get_string("llama.rope.scaling.type");
    if (!scaling.ok()) return scaling.status();
    if (*scaling != "none") {
      return unsupported(file, absl::StrCat("RoPE scaling type '", *scaling, "'"));
    }
  }

  MEGASERVE_RETURN_IF_ERROR(
      read_int(file, "llama.embedding_length", 1, kMaxHiddenSize, true, &config.hidden_size));
  MEGASERVE_RETURN_IF_ERROR(read_int(file, "llama.feed_forward_length", 1, kMaxIntermediateSize,
                                     true, &config.intermediate_size));
  MEGASERVE_RETURN_IF_ERROR(
      read_int(file, "llama.block_count", 1, kMaxLayers, true, &config.num_layers));
  MEGASERVE_RETURN_IF_ERROR(
      read_int(file, "llama.attention.head_count", 1, kMaxHeads, true, &config.num_heads));
  config.num_kv_heads = config.num_heads;
  MEGASERVE_RETURN_IF_ERROR(
      read_int(file, "llama.attention.head_count_kv", 1, kMaxHeads, false, &config.num_kv_heads));
  if (config.num_heads % config.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": llama.attention.head_count (", config.num_heads,
        ") is not a multiple of llama.attention.head_count_kv (", config.num_kv_heads, ")"));
  }
  if (file.find_metadata("llama.attention.key_length") != nullptr) {
    MEGASERVE_RETURN_IF_ERROR(
        read_int(file, "llama.attention.key_length", 1, kMaxHeadDim, true, &config.head_dim));
    int value_length = config.head_dim;
    MEGASERVE_RETURN_IF_ERROR(
        read_int(file, "llama.attention.value_length", 1, kMaxHeadDim, false, &value_length));
    if (value_length != config.head_dim) {
      return unsupported(file, absl::StrCat("llama.attention.value_length ", value_length,
                                            " != key_length ", config.head_dim));
    }
  } else if (config.hidden_size % config.num_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": llama.embedding_length (", config.hidden_size,
                     ") is not a multiple of llama.attention.head_count (", config.num_heads, ")"));
  } else {
    config.head_dim = config.hidden_size / config.num_heads;
    if (config.head_dim > kMaxHeadDim) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": head_dim ", config.head_dim, " exceeds ", kMaxHeadDim));
    }
  }
  if (config.head_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": head_dim ", config.head_dim, " is odd; RoPE rotates pairs"));
  }
  int rotary_dims = config.head_dim;
  MEGASERVE_RETURN_IF_ERROR(
      read_int(file, "llama.rope.dimension_count", 1, kMaxHeadDim, false, &rotary_dims));
  if (rotary_dims != config.head_dim) {
    return unsupported(file, absl::StrCat("partial rotary embedding (llama.rope.dimension_count ",
                                          rotary_dims, " of head_dim ", config.head_dim, ")"));
  }

  config.max_position_embeddings = 2048;  // llama.cpp's own default for a file without one
  MEGASERVE_RETURN_IF_ERROR(read_int(file, "llama.context_length", 1, kMaxPositions, false,
                                     &config.max_position_embeddings));
  config.rms_norm_eps = 1e-5f;
  MEGASERVE_RETURN_IF_ERROR(
      read_positive_float(file, "llama.attention.layer_norm_rms_epsilon", &config.rms_norm_eps));
  config.rope_theta = 10000.0f;
  MEGASERVE_RETURN_IF_ERROR(read_positive_float(file, "llama.rope.freq_base", &config.rope_theta));
  if (const GgufTensor* freqs = file.find_tensor(kRopeFreqs); freqs != nullptr) {
    MEGASERVE_RETURN_IF_ERROR(read_rope_freqs(file, *freqs, config.head_dim, &config.rope_scaling));
  }

  // The vocabulary: the tokenizer's token list decides; then the explicit key; then the
  // embedding's rows.
  if (const GgufValue* tokens = file.find_metadata("tokenizer.ggml.tokens"); tokens != nullptr) {
    const auto* array = std::get_if<GgufArray>(&tokens->value);
    if (array == nullptr || array->element_type != GgufValueType::kString) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": metadata 'tokenizer.ggml.tokens' is not an ARRAY of STRING"));
    }
    if (array->elements.empty() || array->elements.size() > static_cast<size_t>(kMaxVocabSize)) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": tokenizer.ggml.tokens has ",
                                                     array->elements.size(),
                                                     " tokens, outside [1, ", kMaxVocabSize, "]"));
    }
    config.vocab_size = static_cast<int>(array->elements.size());
  } else if (file.find_metadata("llama.vocab_size") != nullptr) {
    MEGASERVE_RETURN_IF_ERROR(
        read_int(file, "llama.vocab_size", 1, kMaxVocabSize, true, &config.vocab_size));
  } else if (const GgufTensor* embedding = file.find_tensor("token_embd.weight");
             embedding != nullptr && embedding->dims.size() == 2 && embedding->dims[1] > 0 &&
             embedding->dims[1] <= kMaxVocabSize) {
    config.vocab_size = static_cast<int>(embedding->dims[1]);
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(source,
                     ": no vocabulary size (no tokenizer.ggml.tokens, llama.vocab_size or "
                     "two-dimensional token_embd.weight)"));
  }
  config.tie_word_embeddings = file.find_tensor("output.weight") == nullptr;

  MEGASERVE_RETURN_IF_ERROR(read_int(file, "tokenizer.ggml.bos_token_id", 0, config.vocab_size - 1,
                                     false, &config.bos_token_id));
  // Generation stops at EOS and, where the file names one, at end-of-turn (llama.cpp stops
  // at both).
  for (const char* key : {"tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"}) {
    int id = -1;
    MEGASERVE_RETURN_IF_ERROR(read_int(file, key, 0, config.vocab_size - 1, false, &id));
    if (id >= 0 && std::find(config.eos_token_ids.begin(), config.eos_token_ids.end(), id) ==
                       config.eos_token_ids.end()) {
      config.eos_token_ids.push_back(id);
    }
  }
  return config;
}

absl::StatusOr<ModelWeights> load_gguf_weights(const GgufFile& file, const ModelConfig& config,
                                               DType dtype) {
  const std::string source = file.path().string();
  if (config.family != ModelFamily::kLlama || config.qkv_bias || config.qk_norm) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": load_gguf_weights needs a Llama config, got ", config.architecture));
  }
  if (config.head_dim <= 0 || config.head_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": load_gguf_weights: model config has head_dim ", config.head_dim));
  }
  ModelWeights weights;
  const std::vector<WeightSlot> slots = weight_slots(config, &weights);

  // Check everything before converting anything, as the safetensors loader does.
  struct Job {
    const GgufTensor* source;
    bool qk_rows;
  };
  std::vector<Job> jobs;
  std::set<std::string> used;
  for (const WeightSlot& slot : slots) {
    const std::string name = gguf_name(slot.name);
    const GgufTensor* tensor = name.empty() ? nullptr : file.find_tensor(name);
    if (tensor == nullptr) {
      return absl::NotFoundError(absl::StrCat(
          source, ": missing tensor '", name.empty() ? slot.name : name, "' (", slot.name, ")"));
    }
    if (tensor->shape() != slot.shape) {
      return absl::InvalidArgumentError(absl::StrCat(
          source, ": tensor '", name, "' has shape ", shape_string(tensor->shape()), " (GGUF dims ",
          shape_string(tensor->dims), "), but this model needs ", shape_string(slot.shape)));
    }
    if (!ggml_can_dequantize(tensor->type)) {
      return absl::InvalidArgumentError(absl::StrCat(
          source, ": tensor '", name, "' has type ", ggml_type_name(tensor->type),
          ", which megaserve does not dequantize (supported: ", ggml_dequantizable_type_names(),
          ")"));
    }
    const bool qk_rows =
        absl::EndsWith(name, ".attn_q.weight") || absl::EndsWith(name, ".attn_k.weight");
    jobs.push_back(Job{tensor, qk_rows});
    used.insert(name);
  }
  for (const GgufTensor& tensor : file.tensors()) {
    if (used.count(tensor.name) > 0) continue;
    if (tensor.name == kRopeFreqs) continue;  // read into the config
    if (config.tie_word_embeddings && tensor.name == "output.weight") {
      spdlog::warn("{}: ignoring output.weight, the config ties the embeddings", source);
      continue;
    }
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": unexpected tensor '", tensor.name, "' for a llama model"));
  }

  for (const WeightSlot& slot : slots) *slot.target = make_tensor(dtype, slot.shape);
  std::vector<absl::Status> statuses(slots.size());
  parallel_for(slots.size(), [&](size_t k) {
    statuses[k] = convert(*jobs[k].source, jobs[k].qk_rows, config.head_dim, slots[k].target);
  });
  for (size_t k = 0; k < slots.size(); ++k) {
    if (!statuses[k].ok()) {
      return absl::InternalError(
          absl::StrCat(source, ": tensor '", jobs[k].source->name, "': ", statuses[k].message()));
    }
  }
  if (config.tie_word_embeddings) weights.lm_head = weights.embedding;  // shares the bytes
  return weights;
}

absl::StatusOr<GgufModel> load_gguf_model(const std::filesystem::path& path, DType dtype) {
  absl::StatusOr<std::unique_ptr<GgufFile>> file = GgufFile::open(path);
  if (!file.ok()) return file.status();
  absl::StatusOr<ModelConfig> config = gguf_model_config(**file);
  if (!config.ok()) return config.status();
  absl::StatusOr<ModelWeights> weights = load_gguf_weights(**file, *config, dtype);
  if (!weights.ok()) return weights.status();
  return GgufModel{*std::move(config), *std::move(weights)};
}

}  // namespace megaserve::engine
