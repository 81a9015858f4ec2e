// The safetensors loader: finds the files of a Hugging Face model directory, maps every
// expected Hugging Face tensor name onto a ModelWeights handle, checks shapes and converts.
#include "engine/model/weights.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <string_view>
#include <thread>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/isa/bf16.h"
#include "engine/model/safetensors.h"
#include "engine/model/weights_internal.h"
#include "nlohmann/json.hpp"
#include "spdlog/spdlog.h"

namespace megaserve::engine {
namespace {

using nlohmann::json;

constexpr char kSingleFile[] = "model.safetensors";
constexpr char kIndexFile[] = "model.safetensors.index.json";

// Every tensor found in a model directory, by name, and the file that holds it.
struct TensorSources {
  std::vector<std::unique_ptr<SafetensorsFile>> files;
  std::map<std::string, std::pair<const SafetensorsFile*, const SafetensorsTensor*>> tensors;
};

std::string shape_string(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::Status add_file_tensors(std::unique_ptr<SafetensorsFile> file, TensorSources* sources) {
  for (const SafetensorsTensor& tensor : file->tensors()) {
    auto [it, inserted] = sources->tensors.emplace(tensor.name, std::pair(file.get(), &tensor));
    if (!inserted) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", tensor.name, "' is in both ",
                                                     it->second.first->path().string(), " and ",
                                                     file->path().string()));
    }
  }
  sources->files.push_back(std::move(file));
  return absl::OkStatus();
}

// Sharded checkpoints: model.safetensors.index.json's weight_map {tensor: shard file} decides
// which shard holds each tensor; a shard must hold exactly the tensors the map gives it.
absl::Status open_sharded(const std::filesystem::path& model_dir, TensorSources* sources) {
  const std::filesystem::path index_path = model_dir / kIndexFile;
  const std::string index_name = index_path.string();
  std::string text;
  {
    std::ifstream in(index_path, std::ios::binary);
    std::ostringstream buffer;
    buffer << in.rdbuf();
    if (!in) return absl::DataLossError(absl::StrCat(index_name, ": read failed"));
    text = buffer.str();
  }
  json index;
  try {
    index = json::parse(text);
  } catch (const json::parse_error& error) {
    return absl::InvalidArgumentError(absl::StrCat(index_name, ": malformed JSON: ", error.what()));
  }
  if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(index_name, ": no 'weight_map' object"));
  }
  std::map<std::string, std::set<std::string>> shard_tensors;  // shard file -> tensor names
  for (const auto& [tensor, shard] : index["weight_map"].items()) {
    if (!shard.is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_name, ": weight_map entry '", tensor, "' is not a file name"));
    }
    const std::string& file = shard.get_ref<const std::string&>();
    // Shards live beside the index: a path could escape the model directory.
    if (file.empty() || file.find('/') != std::string::npos || file == "." || file == "..") {
      return absl::InvalidArgumentError(absl::StrCat(index_name, ": weight_map entry '", tensor,
                                                     "' names '", file, "', not a file name"));
    }
    shard_tensors[file].insert(tensor);
  }
  // Open (and so validate) every shard before comparing contents: a missing shard is the
  // clearer error.
  std::vector<std::pair<std::unique_ptr<SafetensorsFile>, const std::set<std::string>*>> shards;
  for (const auto& [shard, names] : shard_tensors) {
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
        SafetensorsFile::open(model_dir / shard);
    if (!file.ok()) {
      return absl::Status(file.status().code(),
                          absl::StrCat(file.status().message(), " (listed in ", index_name, ")"));
    }
    shards.emplace_back(*std::move(file), &names);
  }
  for (auto& [file, names] : shards) {
    for (const std::string& name : *names) {
      if (file->find(name) == nullptr) {
        return absl::NotFoundError(absl::StrCat(index_name, " puts tensor '", name, "' in ",
                                                file->path().filename().string(), ", but ",
                                                file->path().string(), " has no such tensor"));
      }
    }
    for (const SafetensorsTensor& tensor : file->tensors()) {
      if (names->count(tensor.name) == 0) {
        return absl::InvalidArgumentError(
            absl::StrCat(file->path().string(), ": tensor '", tensor.name,
                         "' is not in the weight_map of ", index_name));
      }
    }
    MEGASERVE_RETURN_IF_ERROR(add_file_tensors(std::move(file), sources));
  }
  return absl::OkStatus();
}

absl::StatusOr<TensorSources> open_sources(const std::filesystem::path& model_dir) {
  TensorSources sources;
  std::error_code ec;
  if (std::filesystem::exists(model_dir / kIndexFile, ec)) {
    MEGASERVE_RETURN_IF_ERROR(open_sharded(model_dir, &sources));
    return sources;
  }
  if (!std::filesystem::exists(model_dir / kSingleFile, ec)) {
    return absl::NotFoundError(
        absl::StrCat(model_dir.string(), ": neither ", kSingleFile, " nor ", kIndexFile, " found"));
  }
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::open(model_dir / kSingleFile);
  if (!file.ok()) return file.status();
  MEGASERVE_RETURN_IF_ERROR(add_file_tensors(*std::move(file), &sources));
  return sources;
}

bool is_loadable(SafetensorsDtype dtype) {
  return dtype == SafetensorsDtype::kF32 || dtype == SafetensorsDtype::kF16 ||
         dtype == SafetensorsDtype::kBF16;
}

// Copies `source` (F32, F16 or BF16; checked by the caller) into `target`, converting through
// float where the dtypes differ: F16 and BF16 widen exactly, narrowing rounds to nearest even.
void convert(const SafetensorsTensor& source, Tensor* target) {
  const uint8_t* in = source.data;  // unaligned in general: read with memcpy
  const bool same = (source.dtype == SafetensorsDtype::kF32 && target->dtype == DType::kF32) ||
                    (source.dtype == SafetensorsDtype::kF16 && target->dtype == DType::kF16) ||
                    (source.dtype == SafetensorsDtype::kBF16 && target->dtype == DType::kBF16);
  if (same) {
    std::memcpy(target->bytes->data(), in, source.num_bytes());
    return;
  }
  const int64_t n = source.numel();
  for (int64_t i = 0; i < n; ++i) {
    float value;
    if (source.dtype == SafetensorsDtype::kF32) {
      std::memcpy(&value, in + 4 * i, 4);
    } else {
      uint16_t bits;
      std::memcpy(&bits, in + 2 * i, 2);
      value = source.dtype == SafetensorsDtype::kF16 ? f16_to_float(bits) : bf16_to_float(bits);
    }
    store_element(*target, i, value);
  }
}

// The shapes a config implies must be positive; a hand-built config may not be.
absl::Status check_config_shapes(const ModelConfig& config) {
  for (auto [name, value] : {std::pair{"hidden_size", config.hidden_size},
                             {"intermediate_size", config.intermediate_size},
                             {"num_layers", config.num_layers},
                             {"num_heads", config.num_heads},
                             {"num_kv_heads", config.num_kv_heads},
                             {"head_dim", config.head_dim},
                             {"vocab_size", config.vocab_size}}) {
    if (value <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("load_weights: model config has ", name, " = ", value));
    }
  }
  return absl::OkStatus();
}

}  // namespace

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "F32";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
  }
  return "?";
}

int dtype_size(DType dtype) { return dtype == DType::kF32 ? 4 : 2; }

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int64_t extent : shape) n *= extent;
  return n;
}

Tensor make_tensor(DType dtype, const std::vector<int64_t>& shape) {
  Tensor tensor;
  tensor.dtype = dtype;
  tensor.shape = shape;
  tensor.bytes = std::make_shared<std::vector<uint8_t>>(tensor.numel() * dtype_size(dtype));
  return tensor;
}

std::vector<WeightSlot> weight_slots(const ModelConfig& config, ModelWeights* weights) {
  const int64_t hidden = config.hidden_size;
  const int64_t q_size = config.q_size();
  const int64_t kv_size = config.kv_size();
  const int64_t intermediate = config.intermediate_size;
  const int64_t vocab = config.vocab_size;
  std::vector<WeightSlot> slots;
  auto add = [&](std::string name, std::vector<int64_t> shape, WeightKind kind, Tensor* target) {
    slots.push_back(WeightSlot{std::move(name), std::move(shape), kind, target});
  };
  weights->layers.assign(config.num_layers, LayerWeights{});
  add("model.embed_tokens.weight", {vocab, hidden}, WeightKind::kMatrix, &weights->embedding);
  for (int i = 0; i < config.num_layers; ++i) {
    LayerWeights& layer = weights->layers[i];
    const std::string prefix = absl::StrCat("model.layers.", i, ".");
    const std::string attn = prefix + "self_attn.";
    add(prefix + "input_layernorm.weight", {hidden}, WeightKind::kNorm, &layer.attn_norm);
    add(attn + "q_proj.weight", {q_size, hidden}, WeightKind::kMatrix, &layer.wq);
    add(attn + "k_proj.weight", {kv_size, hidden}, WeightKind::kMatrix, &layer.wk);
    add(attn + "v_proj.weight", {kv_size, hidden}, WeightKind::kMatrix, &layer.wv);
    if (config.qkv_bias) {
      add(attn + "q_proj.bias", {q_size}, WeightKind::kBias, &layer.bq);
      add(attn + "k_proj.bias", {kv_size}, WeightKind::kBias, &layer.bk);
      add(attn + "v_proj.bias", {kv_size}, WeightKind::kBias, &layer.bv);
    }
    if (config.qk_norm) {
      add(attn + "q_norm.weight", {config.head_dim}, WeightKind::kNorm, &layer.q_norm);
      add(attn + "k_norm.weight", {config.head_dim}, WeightKind::kNorm, &layer.k_norm);
    }
    add(attn + "o_proj.weight", {hidden, q_size}, WeightKind::kMatrix, &layer.wo);
    add(prefix + "post_attention_layernorm.weight", {hidden}, WeightKind::kNorm, &layer.ffn_norm);
    add(prefix + "mlp.gate_proj.weight", {intermediate, hidden}, WeightKind::kMatrix,
        &layer.w_gate);
    add(prefix + "mlp.up_proj.weight", {intermediate, hidden}, WeightKind::kMatrix, &layer.w_up);
    add(prefix + "mlp.down_proj.weight", {hidden, intermediate}, WeightKind::kMatrix,
        &layer.w_down);
  }
  add("model.norm.weight", {hidden}, WeightKind::kNorm, &weights->final_norm);
  if (!config.tie_word_embeddings) {
    add("lm_head.weight", {vocab, hidden}, WeightKind::kMatrix, &weights->lm_head);
  }
  return slots;
}

void parallel_for(size_t n, const std::function<void(size_t)>& body) {
  std::atomic<size_t> next{0};
  auto worker = [&] {
    for (size_t i = next++; i < n; i = next++) body(i);
  };
  const size_t num_threads = std::min<size_t>(n, std::max(1u, std::thread::hardware_concurrency()));
  std::vector<std::thread> threads;
  for (size_t t = 1; t < num_threads; ++t) threads.emplace_back(worker);
  worker();
  for (std::thread& thread : threads) thread.join();
}

absl::StatusOr<ModelWeights> load_weights(const std::filesystem::path& model_dir,
                                          const ModelConfig& config, DType dtype) {
  MEGASERVE_RETURN_IF_ERROR(check_config_shapes(config));
  absl::StatusOr<TensorSources> sources = open_sources(model_dir);
  if (!sources.ok()) return sources.status();
  ModelWeights weights;
  const std::vector<WeightSlot> slots = weight_slots(config, &weights);

  // Check everything before converting anything: a bad checkpoint fails in milliseconds, not
  // after gigabytes of conversion.
  std::vector<const SafetensorsTensor*> sources_of_slots;
  std::set<std::string> used;
  for (const WeightSlot& slot : slots) {
    auto it = sources->tensors.find(slot.name);
    if (it == sources->tensors.end()) {
      return absl::NotFoundError(absl::StrCat(model_dir.string(), ": missing tensor '", slot.name,
                                              "' (", config.architecture, ")"));
    }
    const auto& [file, tensor] = it->second;
    if (tensor->shape != slot.shape) {
      return absl::InvalidArgumentError(absl::StrCat(
          file->path().string(), ": tensor '", slot.name, "' has shape ",
          shape_string(tensor->shape), ", but this model needs ", shape_string(slot.shape)));
    }
    if (!is_loadable(tensor->dtype)) {
      return absl::InvalidArgumentError(
          absl::StrCat(file->path().string(), ": tensor '", slot.name, "' has dtype ",
                       safetensors_dtype_name(tensor->dtype), "; only F32, F16 and BF16 load"));
    }
    sources_of_slots.push_back(tensor);
    used.insert(slot.name);
  }
  for (const auto& [name, source] : sources->tensors) {
    if (used.count(name) > 0) continue;
    // Some exporters save RoPE's inverse-frequency buffer; megaserve computes its own.
    if (absl::EndsWith(name, "rotary_emb.inv_freq")) continue;
    if (config.tie_word_embeddings && name == "lm_head.weight") {
      // Some tied checkpoints still carry a copy; the tie decides, as in transformers.
      spdlog::warn("{}: ignoring lm_head.weight, tie_word_embeddings is true",
                   source.first->path().string());
      continue;
    }
    return absl::InvalidArgumentError(absl::StrCat(source.first->path().string(),
                                                   ": unexpected tensor '", name, "' for ",
                                                   config.architecture));
  }

  for (const WeightSlot& slot : slots) *slot.target = make_tensor(dtype, slot.shape);
  parallel_for(slots.size(), [&](size_t k) { convert(*sources_of_slots[k], slots[k].target); });
  if (config.tie_word_embeddings) weights.lm_head = weights.embedding;  // shares the bytes
  return weights;
}

}  // namespace megaserve::engine
