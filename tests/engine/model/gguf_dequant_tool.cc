// Test tool: megaserve's view of a GGUF file, for comparison with the `gguf` Python package
// (gguf_smollm2_test.py).
//
//   gguf_dequant_tool FILE OUT_DIR NAME...
//
// For each GGUF tensor NAME, writes OUT_DIR/NAME.bf16: the tensor dequantized to bf16 by
// dequantize_to_bf16, in the file's row order, raw little-endian uint16. For each
// hf:NAME (a Hugging Face name such as hf:model.layers.0.self_attn.q_proj.weight), loads
// the whole model with load_gguf_model(FILE, BF16) once and writes OUT_DIR/NAME.bf16 from
// ModelWeights (Q/K rows in Hugging Face order). Always writes OUT_DIR/config.json with the
// ModelConfig read from the metadata. Exit status 1 with the error on stderr on failure.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "engine/model/ggml_types.h"
#include "engine/model/gguf.h"
#include "engine/model/gguf_model.h"
#include "nlohmann/json.hpp"

namespace {

using namespace megaserve::engine;

int fail(const std::string& message) {
  std::fprintf(stderr, "gguf_dequant_tool: %s\n", message.c_str());
  return 1;
}

bool write_bytes(const std::filesystem::path& path, const void* data, size_t size) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(size));
  return static_cast<bool>(out);
}

const Tensor* hf_tensor(const ModelWeights& w, const std::string& name) {
  if (name == "model.embed_tokens.weight") return &w.embedding;
  if (name == "model.norm.weight") return &w.final_norm;
  if (name == "lm_head.weight") return &w.lm_head;
  const std::string prefix = "model.layers.";
  if (name.rfind(prefix, 0) != 0) return nullptr;
  const size_t dot = name.find('.', prefix.size());
  if (dot == std::string::npos) return nullptr;
  const size_t layer = std::stoul(name.substr(prefix.size(), dot - prefix.size()));
  if (layer >= w.layers.size()) return nullptr;
  const LayerWeights& l = w.layers[layer];
  const std::map<std::string, const Tensor*> handles = {
      {"input_layernorm.weight", &l.attn_norm}, {"self_attn.q_proj.weight", &l.wq},
      {"self_attn.k_proj.weight", &l.wk},       {"self_attn.v_proj.weight", &l.wv},
      {"self_attn.o_proj.weight", &l.wo},       {"post_attention_layernorm.weight", &l.ffn_norm},
      {"mlp.gate_proj.weight", &l.w_gate},      {"mlp.up_proj.weight", &l.w_up},
      {"mlp.down_proj.weight", &l.w_down},
  };
  auto it = handles.find(name.substr(dot + 1));
  return it == handles.end() ? nullptr : it->second;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) return fail("usage: gguf_dequant_tool FILE OUT_DIR NAME...");
  const std::filesystem::path path = argv[1];
  const std::filesystem::path out_dir = argv[2];
  std::filesystem::create_directories(out_dir);

  absl::StatusOr<std::unique_ptr<GgufFile>> file = GgufFile::open(path);
  if (!file.ok()) return fail(std::string(file.status().message()));
  absl::StatusOr<ModelConfig> config = gguf_model_config(**file);
  if (!config.ok()) return fail(std::string(config.status().message()));
  nlohmann::json summary = {
      {"hidden_size", config->hidden_size},
      {"intermediate_size", config->intermediate_size},
      {"num_layers", config->num_layers},
      {"num_heads", config->num_heads},
      {"num_kv_heads", config->num_kv_heads},
      {"head_dim", config->head_dim},
      {"vocab_size", config->vocab_size},
      {"max_position_embeddings", config->max_position_embeddings},
      {"rms_norm_eps", config->rms_norm_eps},
      {"rope_theta", config->rope_theta},
      {"tie_word_embeddings", config->tie_word_embeddings},
      {"bos_token_id", config->bos_token_id},
      {"eos_token_ids", config->eos_token_ids},
  };
  std::ofstream(out_dir / "config.json") << summary.dump(2) << "\n";

  std::optional<GgufModel> model;
  for (int i = 3; i < argc; ++i) {
    const std::string name = argv[i];
    const std::filesystem::path out = out_dir / (name + ".bf16");
    if (name.rfind("hf:", 0) == 0) {
      if (!model) {
        absl::StatusOr<GgufModel> loaded = load_gguf_model(path, DType::kBF16);
        if (!loaded.ok()) return fail(std::string(loaded.status().message()));
        model = *std::move(loaded);
      }
      const Tensor* tensor = hf_tensor(model->weights, name.substr(3));
      if (tensor == nullptr) return fail("no such Hugging Face tensor: " + name);
      if (!write_bytes(out, tensor->bytes->data(), tensor->bytes->size())) {
        return fail("cannot write " + out.string());
      }
      continue;
    }
    const GgufTensor* tensor = (*file)->find_tensor(name);
    if (tensor == nullptr) return fail("no tensor " + name + " in " + path.string());
    std::vector<uint16_t> values(tensor->numel());
    if (absl::Status status =
            dequantize_to_bf16(tensor->type, tensor->data, tensor->numel(), values.data());
        !status.ok()) {
      return fail(name + ": " + std::string(status.message()));
    }
    if (!write_bytes(out, values.data(), values.size() * 2)) {
      return fail("cannot write " + out.string());
    }
  }
  return 0;
}
