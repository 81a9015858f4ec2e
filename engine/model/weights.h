// Model weights in megaserve's own naming: one handle per tensor, independent of the file
// format. The loader maps Hugging Face names onto these handles, checks every shape and
// converts to the dtype the backend asks for.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model/model_config.h"

namespace megaserve::engine {

enum class DType { kF32, kF16, kBF16 };
const char* dtype_name(DType dtype);
int dtype_size(DType dtype);

// A dense row-major tensor owning its bytes (or sharing them with another tensor, as tied
// embeddings do).
struct Tensor {
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::shared_ptr<std::vector<uint8_t>> bytes;

  int64_t numel() const;
  bool empty() const { return !bytes; }
  template <typename T>
  const T* data() const {
    return reinterpret_cast<const T*>(bytes->data());
  }
  template <typename T>
  T* mutable_data() {
    return reinterpret_cast<T*>(bytes->data());
  }
};

// Shapes follow Hugging Face's nn.Linear convention: [out_features, in_features].
struct LayerWeights {
  Tensor attn_norm;   // [hidden]
  Tensor wq;          // [num_heads * head_dim, hidden]
  Tensor wk;          // [num_kv_heads * head_dim, hidden]
  Tensor wv;          // [num_kv_heads * head_dim, hidden]
  Tensor bq, bk, bv;  // [q_size], [kv_size], [kv_size]   (Qwen2 only; empty otherwise)
  Tensor q_norm;      // [head_dim]                       (Qwen3 only; empty otherwise)
  Tensor k_norm;      // [head_dim]                       (Qwen3 only; empty otherwise)
  Tensor wo;          // [hidden, num_heads * head_dim]
  Tensor ffn_norm;    // [hidden]
  Tensor w_gate;      // [intermediate, hidden]
  Tensor w_up;        // [intermediate, hidden]
  Tensor w_down;      // [hidden, intermediate]
};

struct ModelWeights {
  Tensor embedding;  // [vocab, hidden]
  std::vector<LayerWeights> layers;
  Tensor final_norm;  // [hidden]
  Tensor lm_head;     // [vocab, hidden]; shares embedding's bytes when tied
};

// Loads model.safetensors, or the shards listed in model.safetensors.index.json, from
// `model_dir`, converting every tensor to `dtype`. Errors name the file and the tensor.
absl::StatusOr<ModelWeights> load_weights(const std::filesystem::path& model_dir,
                                          const ModelConfig& config, DType dtype);

// Weights from a seeded generator with the right shapes and a scale that keeps activations
// sensible (norms 1, projections ~ U(-a, a) with a = 1/sqrt(in_features)): the `dummy`
// load format, for benchmarking model shapes whose weights are not at hand.
ModelWeights dummy_weights(const ModelConfig& config, DType dtype, uint64_t seed);

}  // namespace megaserve::engine
