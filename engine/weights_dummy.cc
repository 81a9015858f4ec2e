// The `dummy` load format: weights from a seeded generator. Each tensor draws from its own
// splitmix64 stream, keyed by the seed and the tensor's index, so the result does not depend
// on how many threads fill it.
#include <cmath>

#include "engine/weights.h"
#include "engine/weights_internal.h"

namespace megaserve::engine {
namespace {

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ull;

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += kGolden);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

void fill(const WeightSlot& slot, int hidden_size, uint64_t seed, uint64_t index) {
  Tensor& tensor = *slot.target;
  const int64_t n = tensor.numel();
  if (slot.kind == WeightKind::kNorm) {  // RMSNorm gains start at 1, as in training
    for (int64_t i = 0; i < n; ++i) store_element(tensor, i, 1.0f);
    return;
  }
  // Matrices [out, in]: U(-a, a) with a = 1/sqrt(in) keeps each output's variance near the
  // input's / 3. Biases use the same scale as their projection.
  const int64_t fan_in = slot.kind == WeightKind::kMatrix ? slot.shape[1] : hidden_size;
  const float scale = static_cast<float>(2.0 / std::sqrt(static_cast<double>(fan_in)));
  uint64_t state = seed ^ (index + 1) * kGolden;
  splitmix64(state);  // decorrelate nearby seeds
  for (int64_t i = 0; i < n; ++i) {
    // The top 24 bits give a uniform float in [0, 1) exactly.
    const float unit = static_cast<float>(splitmix64(state) >> 40) * 0x1.0p-24f;
    store_element(tensor, i, (unit - 0.5f) * scale);
  }
}

}  // namespace

ModelWeights dummy_weights(const ModelConfig& config, DType dtype, uint64_t seed) {
  ModelWeights weights;
  const std::vector<WeightSlot> slots = weight_slots(config, &weights);
  for (const WeightSlot& slot : slots) *slot.target = make_tensor(dtype, slot.shape);

  // Billions of elements for an 8B shape: fill tensors on all cores.
  parallel_for(slots.size(), [&](size_t k) { fill(slots[k], config.hidden_size, seed, k); });
  if (config.tie_word_embeddings) weights.lm_head = weights.embedding;
  return weights;
}

}  // namespace megaserve::engine
