#include "engine/model/model_config.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <fstream>
#include <numbers>
#include <sstream>
#include <system_error>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace megaserve::engine {
namespace {

using nlohmann::json;

#ifndef MEGASERVE_RETURN_IF_ERROR
#define MEGASERVE_RETURN_IF_ERROR(expr)                               \
  do {                                                                \
    if (absl::Status status_ = (expr); !status_.ok()) return status_; \
  } while (0)
#endif

absl::Status unsupported(const std::string& source, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(source, ": ", what, " is not supported"));
}

// Typed access to the fields of one JSON object. A field that is absent or null leaves the
// output untouched (the caller has set the default); a field of the wrong type or out of
// range is an error naming the file and the field.
class Fields {
 public:
  Fields(const json& object, std::string source) : object_(object), source_(std::move(source)) {}

  const std::string& source() const { return source_; }

  // Present (possibly null).
  const json* find_raw(const char* key) const {
    auto it = object_.find(key);
    return it == object_.end() ? nullptr : &*it;
  }

  // Present and not null.
  const json* get(const char* key) const {
    auto it = object_.find(key);
    if (it == object_.end() || it->is_null()) return nullptr;
    return &*it;
  }

  absl::Status read_int(const char* key, int min_value, int* out) const {
    return read_int(key, min_value, INT_MAX, out);
  }

  // An integer in [min_value, max_value].
  absl::Status read_int(const char* key, int min_value, int max_value, int* out) const {
    const json* value = get(key);
    if (value == nullptr) return absl::OkStatus();
    double number = 0;
    if (value->is_number_integer()) {
      number = static_cast<double>(value->get<int64_t>());
    } else if (value->is_number_unsigned()) {
      number = static_cast<double>(value->get<uint64_t>());
    } else if (value->is_number_float() &&
               std::floor(value->get<double>()) == value->get<double>()) {
      number = value->get<double>();
    } else {
      return error(key, "must be an integer", *value);
    }
    if (number < min_value || number > max_value) {
      return error(key,
                   max_value == INT_MAX
                       ? absl::StrCat("must be an integer >= ", min_value)
                       : absl::StrCat("must be an integer in [", min_value, ", ", max_value, "]"),
                   *value);
    }
    *out = static_cast<int>(number);
    return absl::OkStatus();
  }

  absl::Status require_int(const char* key, int min_value, int max_value, int* out) const {
    if (get(key) == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(source_, ": required field '", key, "' is missing"));
    }
    return read_int(key, min_value, max_value, out);
  }

  // A positive finite number.
  absl::Status read_positive(const char* key, float* out) const {
    const json* value = get(key);
    if (value == nullptr) return absl::OkStatus();
    if (!value->is_number() || !(value->get<double>() > 0) ||
        !std::isfinite(value->get<double>())) {
      return error(key, "must be a positive number", *value);
    }
    *out = static_cast<float>(value->get<double>());
    return absl::OkStatus();
  }

  absl::Status read_bool(const char* key, bool* out) const {
    const json* value = get(key);
    if (value == nullptr) return absl::OkStatus();
    if (!value->is_boolean()) return error(key, "must be true or false", *value);
    *out = value->get<bool>();
    return absl::OkStatus();
  }

  absl::Status read_string(const char* key, std::string* out) const {
    const json* value = get(key);
    if (value == nullptr) return absl::OkStatus();
    if (!value->is_string()) return error(key, "must be a string", *value);
    *out = value->get<std::string>();
    return absl::OkStatus();
  }

  // eos_token_id: an int or a list of ints.
  absl::Status read_token_ids(const char* key, std::vector<int32_t>* out) const {
    const json* value = get(key);
    if (value == nullptr) return absl::OkStatus();
    std::vector<int32_t> ids;
    auto add = [&](const json& id) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX) {
        return false;
      }
      ids.push_back(static_cast<int32_t>(id.get<int64_t>()));
      return true;
    };
    bool ok = value->is_array() ? std::all_of(value->begin(), value->end(), add) : add(*value);
    if (!ok) return error(key, "must be a token id or a list of token ids", *value);
    *out = std::move(ids);
    return absl::OkStatus();
  }

 private:
  absl::Status error(const char* key, const std::string& what, const json& value) const {
    return absl::InvalidArgumentError(
        absl::StrCat(source_, ": field '", key, "' ", what, ", got ", value.dump()));
  }

  const json& object_;
  std::string source_;
};

absl::StatusOr<json> parse_json_object(const std::string& text, const std::string& source) {
  json parsed;
  try {
    parsed = json::parse(text);
  } catch (const json::parse_error& error) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": malformed JSON: ", error.what()));
  }
  if (!parsed.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": expected a JSON object"));
  }
  return parsed;
}

absl::StatusOr<std::string> read_text_file(const std::filesystem::path& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) {
    return absl::NotFoundError(absl::StrCat(path.string(), ": no such file"));
  }
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  if (!in) return absl::DataLossError(absl::StrCat(path.string(), ": read failed"));
  return text.str();
}

// rope_scaling (or transformers 5's rope_parameters): null or "default" means none;
// "llama3" reads its four parameters; anything else is refused by name.
absl::Status parse_rope_scaling(const json& object, const std::string& source,
                                RopeScaling* scaling) {
  if (!object.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(source, " must be an object"));
  }
  Fields fields(object, source);
  std::string type = "default";
  MEGASERVE_RETURN_IF_ERROR(fields.read_string("type", &type));
  MEGASERVE_RETURN_IF_ERROR(fields.read_string("rope_type", &type));  // newer name wins
  if (type == "default") {
    *scaling = RopeScaling{};
    return absl::OkStatus();
  }
  if (type != "llama3") return unsupported(source, absl::StrCat("RoPE scaling type '", type, "'"));
  RopeScaling llama3;
  llama3.type = RopeScalingType::kLlama3;
  for (const char* key :
       {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}) {
    if (fields.get(key) == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": llama3 RoPE scaling needs '", key, "'"));
    }
  }
  MEGASERVE_RETURN_IF_ERROR(fields.read_positive("factor", &llama3.factor));
  MEGASERVE_RETURN_IF_ERROR(fields.read_positive("low_freq_factor", &llama3.low_freq_factor));
  MEGASERVE_RETURN_IF_ERROR(fields.read_positive("high_freq_factor", &llama3.high_freq_factor));
  MEGASERVE_RETURN_IF_ERROR(fields.read_int("original_max_position_embeddings", 1,
                                            &llama3.original_max_position_embeddings));
  if (!(llama3.high_freq_factor > llama3.low_freq_factor)) {
    // The smooth interpolation divides by (high - low).
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": llama3 high_freq_factor (", llama3.high_freq_factor,
                     ") must exceed low_freq_factor (", llama3.low_freq_factor, ")"));
  }
  *scaling = llama3;
  return absl::OkStatus();
}

// Refuses what megaserve cannot run, naming the feature.
absl::Status check_supported(const Fields& fields, const ModelConfig& config) {
  const std::string& source = fields.source();
  for (const char* key : {"num_experts", "num_local_experts", "n_routed_experts"}) {
    const json* experts = fields.get(key);
    if (experts != nullptr && (!experts->is_number() || experts->get<double>() > 0)) {
      return unsupported(source,
                         absl::StrCat("mixture-of-experts (", key, "=", experts->dump(), ")"));
    }
  }
  if (fields.get("quantization_config") != nullptr) {
    return unsupported(source, "a quantized checkpoint (quantization_config)");
  }
  std::string hidden_act = "silu";
  MEGASERVE_RETURN_IF_ERROR(fields.read_string("hidden_act", &hidden_act));
  if (hidden_act != "silu") {
    return unsupported(source, absl::StrCat("hidden_act '", hidden_act, "' (only silu)"));
  }
  bool flag = false;
  MEGASERVE_RETURN_IF_ERROR(fields.read_bool("mlp_bias", &flag));
  if (flag) return unsupported(source, "mlp_bias=true (bias on the MLP projections)");
  flag = false;
  MEGASERVE_RETURN_IF_ERROR(fields.read_bool("use_sliding_window", &flag));
  if (flag) return unsupported(source, "sliding-window attention (use_sliding_window=true)");
  if (const json* layer_types = fields.get("layer_types"); layer_types != nullptr) {
    // Newer configs list each layer's attention; only full attention is supported.
    if (!layer_types->is_array()) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": 'layer_types' is not a list"));
    }
    for (const json& type : *layer_types) {
      if (type != "full_attention") {
        return unsupported(
            source, absl::StrCat("layer_types entry ", type.dump(), " (only full_attention)"));
      }
    }
  }
  // Qwen2 always has q/k/v bias and no o_proj bias, whatever attention_bias says. On Llama
  // and Qwen3, attention_bias=true also puts a bias on o_proj, which megaserve has no
  // handle for.
  flag = false;
  MEGASERVE_RETURN_IF_ERROR(fields.read_bool("attention_bias", &flag));
  if (flag && config.family != ModelFamily::kQwen2) {
    return unsupported(source, absl::StrCat("attention_bias=true on ", config.architecture,
                                            " (bias on q/k/v/o projections)"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelConfig> parse_model_config(const std::string& json_text,
                                               const std::string& source) {
  absl::StatusOr<json> parsed = parse_json_object(json_text, source);
  if (!parsed.ok()) return parsed.status();
  Fields fields(*parsed, source);
  ModelConfig config;

  if (const json* architectures = fields.get("architectures"); architectures != nullptr) {
    if (!architectures->is_array() || architectures->size() != 1 ||
        !(*architectures)[0].is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(
          source, ": 'architectures' must list exactly one name, got ", architectures->dump()));
    }
    config.architecture = (*architectures)[0].get<std::string>();
  } else {
    std::string model_type;
    MEGASERVE_RETURN_IF_ERROR(fields.read_string("model_type", &model_type));
    if (model_type == "llama") config.architecture = "LlamaForCausalLM";
    if (model_type == "qwen2") config.architecture = "Qwen2ForCausalLM";
    if (model_type == "qwen3") config.architecture = "Qwen3ForCausalLM";
    if (config.architecture.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          source, ": no 'architectures' and no known 'model_type' (got '", model_type, "')"));
    }
  }
  if (config.architecture == "LlamaForCausalLM") {
    config.family = ModelFamily::kLlama;
  } else if (config.architecture == "Qwen2ForCausalLM") {
    config.family = ModelFamily::kQwen2;
    config.qkv_bias = true;
  } else if (config.architecture == "Qwen3ForCausalLM") {
    config.family = ModelFamily::kQwen3;
    config.qk_norm = true;
  } else {
    MEGASERVE_RETURN_IF_ERROR(check_supported(fields, config));  // a clearer MoE message
    return unsupported(source, absl::StrCat("architecture '", config.architecture,
                                            "' (supported: LlamaForCausalLM, Qwen2ForCausalLM, "
                                            "Qwen3ForCausalLM)"));
  }
  MEGASERVE_RETURN_IF_ERROR(check_supported(fields, config));

  // Bounds far above any model of these families (Llama-3.1-405B: hidden 16384, FFN 53248,
  // 126 layers, 128 heads, vocab 128256), low enough that every size derived from them fits
  // comfortably in 64 bits and a typo is an error here instead of a bad_alloc later.
  MEGASERVE_RETURN_IF_ERROR(
      fields.require_int("hidden_size", 1, kMaxHiddenSize, &config.hidden_size));
  MEGASERVE_RETURN_IF_ERROR(
      fields.require_int("intermediate_size", 1, kMaxIntermediateSize, &config.intermediate_size));
  MEGASERVE_RETURN_IF_ERROR(
      fields.require_int("num_hidden_layers", 1, kMaxLayers, &config.num_layers));
  MEGASERVE_RETURN_IF_ERROR(
      fields.require_int("num_attention_heads", 1, kMaxHeads, &config.num_heads));
  MEGASERVE_RETURN_IF_ERROR(fields.require_int("vocab_size", 1, kMaxVocabSize, &config.vocab_size));
  config.num_kv_heads = config.num_heads;  // Llama 1/2 checkpoints may omit it: plain MHA
  MEGASERVE_RETURN_IF_ERROR(
      fields.read_int("num_key_value_heads", 1, kMaxHeads, &config.num_kv_heads));
  if (config.num_heads % config.num_kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": num_attention_heads (", config.num_heads,
                     ") is not a multiple of num_key_value_heads (", config.num_kv_heads, ")"));
  }
  if (fields.get("head_dim") != nullptr) {
    MEGASERVE_RETURN_IF_ERROR(fields.read_int("head_dim", 1, kMaxHeadDim, &config.head_dim));
  } else if (config.hidden_size % config.num_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": hidden_size (", config.hidden_size,
                                                   ") is not a multiple of num_attention_heads (",
                                                   config.num_heads, ") and no head_dim is given"));
  } else {
    config.head_dim = config.hidden_size / config.num_heads;
    if (config.head_dim > kMaxHeadDim) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": head_dim (hidden_size / num_attention_heads) ", config.head_dim,
                       " exceeds ", kMaxHeadDim));
    }
  }
  if (config.head_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": head_dim ", config.head_dim, " is odd; RoPE rotates pairs"));
  }

  // Hugging Face's defaults for fields a config may leave out.
  config.max_position_embeddings = config.family == ModelFamily::kLlama ? 2048 : 32768;
  config.rms_norm_eps = 1e-6f;
  MEGASERVE_RETURN_IF_ERROR(fields.read_int("max_position_embeddings", 1, kMaxPositions,
                                            &config.max_position_embeddings));
  MEGASERVE_RETURN_IF_ERROR(fields.read_positive("rms_norm_eps", &config.rms_norm_eps));
  MEGASERVE_RETURN_IF_ERROR(fields.read_positive("rope_theta", &config.rope_theta));
  if (const json* parameters = fields.get("rope_parameters"); parameters != nullptr) {
    // transformers 5 moves rope_theta and the scaling into one object.
    const std::string where = absl::StrCat(source, ": rope_parameters");
    MEGASERVE_RETURN_IF_ERROR(parse_rope_scaling(*parameters, where, &config.rope_scaling));
    MEGASERVE_RETURN_IF_ERROR(
        Fields(*parameters, where).read_positive("rope_theta", &config.rope_theta));
  }
  if (const json* scaling = fields.get("rope_scaling"); scaling != nullptr) {
    MEGASERVE_RETURN_IF_ERROR(
        parse_rope_scaling(*scaling, absl::StrCat(source, ": rope_scaling"), &config.rope_scaling));
  }

  MEGASERVE_RETURN_IF_ERROR(fields.read_bool("tie_word_embeddings", &config.tie_word_embeddings));
  if (const json* bos = fields.find_raw("bos_token_id"); bos != nullptr && bos->is_null()) {
    config.bos_token_id = -1;
  }
  MEGASERVE_RETURN_IF_ERROR(fields.read_int("bos_token_id", 0, &config.bos_token_id));
  MEGASERVE_RETURN_IF_ERROR(fields.read_token_ids("eos_token_id", &config.eos_token_ids));
  MEGASERVE_RETURN_IF_ERROR(fields.read_string("dtype", &config.torch_dtype));  // transformers 5
  MEGASERVE_RETURN_IF_ERROR(fields.read_string("torch_dtype", &config.torch_dtype));
  return config;
}

absl::Status apply_generation_config(const std::string& json_text, const std::string& source,
                                     ModelConfig* config) {
  absl::StatusOr<json> parsed = parse_json_object(json_text, source);
  if (!parsed.ok()) return parsed.status();
  return Fields(*parsed, source).read_token_ids("eos_token_id", &config->eos_token_ids);
}

absl::StatusOr<ModelConfig> load_model_config_file(const std::filesystem::path& config_file) {
  absl::StatusOr<std::string> text = read_text_file(config_file);
  if (!text.ok()) return text.status();
  return parse_model_config(*text, config_file.string());
}

absl::StatusOr<ModelConfig> load_model_config(const std::filesystem::path& model_dir) {
  absl::StatusOr<ModelConfig> config = load_model_config_file(model_dir / "config.json");
  if (!config.ok()) return config.status();
  const std::filesystem::path generation_file = model_dir / "generation_config.json";
  std::error_code ec;
  if (std::filesystem::exists(generation_file, ec)) {
    absl::StatusOr<std::string> text = read_text_file(generation_file);
    if (!text.ok()) return text.status();
    MEGASERVE_RETURN_IF_ERROR(apply_generation_config(*text, generation_file.string(), &*config));
  }
  return config;
}

int64_t ModelConfig::num_parameters() const {
  const int64_t hidden = hidden_size, q = q_size(), kv = kv_size();
  int64_t per_layer = 2 * hidden                         // attention and FFN norms
                      + hidden * (q + 2 * kv)            // wq, wk, wv
                      + q * hidden                       // wo
                      + 3 * hidden * intermediate_size;  // gate, up, down
  if (qkv_bias) per_layer += q + 2 * kv;
  if (qk_norm) per_layer += 2 * int64_t{head_dim};
  const int64_t embedding = int64_t{vocab_size} * hidden;
  return embedding * (tie_word_embeddings ? 1 : 2) + num_layers * per_layer + hidden;
}

std::vector<float> rope_inv_freq(const ModelConfig& config) {
  const int pairs = config.head_dim / 2;
  std::vector<float> inv_freq(pairs);
  const RopeScaling& scaling = config.rope_scaling;
  const double original = scaling.original_max_position_embeddings;
  const double low_freq_wavelen = original / scaling.low_freq_factor;
  const double high_freq_wavelen = original / scaling.high_freq_factor;
  for (int i = 0; i < pairs; ++i) {
    double freq = 1.0 / std::pow(static_cast<double>(config.rope_theta),
                                 2.0 * i / static_cast<double>(config.head_dim));
    if (scaling.type == RopeScalingType::kLlama3) {
      // Long wavelengths (low frequencies) are slowed down by `factor`, short ones kept, and
      // the band between them interpolated linearly in original/wavelen.
      const double wavelen = 2 * std::numbers::pi / freq;
      if (wavelen > low_freq_wavelen) {
        freq /= scaling.factor;
      } else if (wavelen >= high_freq_wavelen) {
        const double smooth = (original / wavelen - scaling.low_freq_factor) /
                              (scaling.high_freq_factor - scaling.low_freq_factor);
        freq = (1 - smooth) * freq / scaling.factor + smooth * freq;
      }
    } else if (scaling.type == RopeScalingType::kFactors) {
      freq /= scaling.freq_factors[i];
    }
    inv_freq[i] = static_cast<float>(freq);
  }
  return inv_freq;
}

std::vector<float> rope_cos_sin(const ModelConfig& config, int positions) {
  const std::vector<float> inv_freq = rope_inv_freq(config);
  const size_t pairs = inv_freq.size();
  std::vector<float> table(static_cast<size_t>(std::max(positions, 0)) * pairs * 2);
  for (size_t p = 0; p < table.size() / (2 * pairs); ++p) {
    for (size_t i = 0; i < pairs; ++i) {
      const float angle = static_cast<float>(p) * inv_freq[i];
      table[(p * pairs + i) * 2] = std::cos(angle);
      table[(p * pairs + i) * 2 + 1] = std::sin(angle);
    }
  }
  return table;
}

}  // namespace megaserve::engine
