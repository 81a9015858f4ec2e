// The `dummy` load format: weights from a seeded generator. Tensors are cut into chunks of
// kChunk elements, and each chunk draws from its own splitmix64 stream keyed by (seed, tensor
// index, chunk index): the result does not depend on how many threads fill it, and one big
// tensor (a 128k-vocabulary embedding) spreads over every core.
#include <algorithm>
#include <cmath>

#include "engine/model/weights.h"
#include "engine/model/weights_internal.h"

namespace megaserve::engine {
namespace {

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ull;
constexpr int64_t kChunk = int64_t{1} << 20;

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += kGolden);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

struct Chunk {
  const WeightSlot* slot;
  uint64_t slot_index;
  int64_t begin, end;  // element range
};

// Writes values[begin, end) of one tensor in its dtype (one loop per dtype: no per-element
// dispatch in the hot loop).
template <DType kDType>
void fill_chunk(const Chunk& chunk, float scale, uint64_t state) {
  Tensor& tensor = *chunk.slot->target;
  for (int64_t i = chunk.begin; i < chunk.end; ++i) {
    float value = 1.0f;  // RMSNorm gains start at 1, as in training
    if (chunk.slot->kind != WeightKind::kNorm) {
      // The top 24 bits give a uniform float in [0, 1) exactly.
      const float unit = static_cast<float>(splitmix64(state) >> 40) * 0x1.0p-24f;
      value = (unit - 0.5f) * scale;
    }
    if constexpr (kDType == DType::kF32) {
      tensor.mutable_data<float>()[i] = value;
    } else if constexpr (kDType == DType::kBF16) {
      tensor.mutable_data<uint16_t>()[i] = float_to_bf16(value);
    } else {
      tensor.mutable_data<uint16_t>()[i] = float_to_f16(value);
    }
  }
}

void fill(const Chunk& chunk, int hidden_size, uint64_t seed) {
  // Matrices [out, in]: U(-a, a) with a = 1/sqrt(in) keeps each output's variance near the
  // input's / 3. Biases use the same scale as their projection.
  const WeightSlot& slot = *chunk.slot;
  const int64_t fan_in = slot.kind == WeightKind::kMatrix ? slot.shape[1] : hidden_size;
  const float scale = static_cast<float>(2.0 / std::sqrt(static_cast<double>(fan_in)));
  uint64_t state = seed ^ (chunk.slot_index + 1) * kGolden;
  splitmix64(state);  // decorrelate nearby seeds
  state ^= static_cast<uint64_t>(chunk.begin / kChunk) * 0xd1b54a32d192ed03ull;
  splitmix64(state);
  switch (slot.target->dtype) {
    case DType::kF32:
      return fill_chunk<DType::kF32>(chunk, scale, state);
    case DType::kBF16:
      return fill_chunk<DType::kBF16>(chunk, scale, state);
    case DType::kF16:
      return fill_chunk<DType::kF16>(chunk, scale, state);
  }
}

}  // namespace

ModelWeights dummy_weights(const ModelConfig& config, DType dtype, uint64_t seed) {
  ModelWeights weights;
  const std::vector<WeightSlot> slots = weight_slots(config, &weights);
  std::vector<Chunk> chunks;
  for (size_t k = 0; k < slots.size(); ++k) {
    *slots[k].target = make_tensor(dtype, slots[k].shape);
    const int64_t n = slots[k].target->numel();
    for (int64_t begin = 0; begin < n; begin += kChunk) {
      chunks.push_back({&slots[k], k, begin, std::min(n, begin + kChunk)});
    }
  }
  parallel_for(chunks.size(), [&](size_t c) { fill(chunks[c], config.hidden_size, seed); });
  if (config.tie_word_embeddings) weights.lm_head = weights.embedding;
  return weights;
}

}  // namespace megaserve::engine
