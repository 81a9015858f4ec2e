#include "engine/cuda/cuda_rank_weights.h"

#include <algorithm>
#include <cstdint>
#include <map>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/cuda/cuda_weight_maps.h"
#include "engine/isa/bf16.h"

namespace megaserve::engine {
namespace {

// Positions in the RoPE table at most (DeviceModel::rope).
constexpr int kRopeTablePositions = 131072;

// Rows [r0, r1) x columns [c0, c1) of `t` (a 1-D tensor is one row) as bf16, row-major.
std::vector<uint16_t> bf16_slice(const Tensor& t, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  const int64_t cols = t.shape.size() >= 2 ? t.shape[1] : t.shape[0];
  std::vector<uint16_t> out;
  out.reserve((r1 - r0) * (c1 - c0));
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i = r * cols + c;
      switch (t.dtype) {
        case DType::kF32:
          out.push_back(float_to_bf16(t.data<float>()[i]));
          break;
        case DType::kBF16:
          out.push_back(t.data<uint16_t>()[i]);
          break;
        case DType::kF16:
          out.push_back(float_to_bf16(f16_to_float(t.data<uint16_t>()[i])));
          break;
      }
    }
  }
  return out;
}

}  // namespace

absl::Status upload_rank_weights(const ModelConfig& config, const ModelWeights& weights,
                                 const ModelShard& sh, int ctas, bool wgmma, int bf16_act_rows,
                                 CudaState& st, kernels::DeviceModel& m) {
  const int64_t hd = config.head_dim;
  const int64_t q0 = sh.q_heads_begin() * hd, q1 = q0 + sh.q_heads * hd;
  const int64_t k0 = sh.kv_heads_begin() * hd, k1 = k0 + sh.kv_heads * hd;
  m.hidden = config.hidden_size;
  m.q_heads = sh.q_heads;
  m.kv_heads = sh.kv_heads;
  m.head_dim = config.head_dim;
  m.ffn = sh.ffn_cols();
  m.vocab = sh.vocab_cols();
  m.vocab_begin = sh.vocab_begin;
  m.vocab_size = config.vocab_size;
  m.num_layers = config.num_layers;
  m.rms_norm_eps = config.rms_norm_eps;

  // Tied embeddings (one tensor, the same rows) share one device copy.
  std::map<std::tuple<const void*, int64_t, int64_t, int64_t, int64_t>, const uint16_t*> uploaded;
  const auto up = [&](const uint16_t*& dst, const Tensor& t, int64_t r0, int64_t r1, int64_t c0,
                      int64_t c1, const char* name) -> absl::Status {
    dst = nullptr;
    if (t.empty()) return absl::OkStatus();
    const auto key = std::make_tuple(static_cast<const void*>(t.bytes.get()), r0, r1, c0, c1);
    if (auto it = uploaded.find(key); it != uploaded.end()) {
      dst = it->second;
      return absl::OkStatus();
    }
    const std::vector<uint16_t> bits = bf16_slice(t, r0, r1, c0, c1);
    absl::StatusOr<uint16_t*> p = st.upload(bits.data(), bits.size(), name);
    if (!p.ok()) return p.status();
    uploaded[key] = dst = *p;
    return absl::OkStatus();
  };
  // Whole rows [r0, r1) of a matrix; a vector's elements [r0, r1).
  const auto rows = [&](const uint16_t*& dst, const Tensor& t, int64_t r0, int64_t r1,
                        const char* name) {
    if (t.shape.size() < 2) return up(dst, t, 0, 1, r0, r1, name);
    return up(dst, t, r0, r1, 0, t.shape[1], name);
  };
  const auto all = [&](const uint16_t*& dst, const Tensor& t, const char* name) {
    return rows(dst, t, 0, t.empty() ? 0 : t.shape[0], name);
  };
  const auto cols = [&](const uint16_t*& dst, const Tensor& t, int64_t c0, int64_t c1,
                        const char* name) { return up(dst, t, 0, t.shape[0], c0, c1, name); };

  absl::Status s = rows(m.embedding, weights.embedding, sh.vocab_begin, sh.vocab_end, "embedding");
  if (s.ok()) s = all(m.final_norm, weights.final_norm, "final_norm");
  if (s.ok()) s = rows(m.lm_head, weights.lm_head, sh.vocab_begin, sh.vocab_end, "lm_head");
  std::vector<kernels::DeviceLayer> layers(config.num_layers);
  for (int l = 0; l < config.num_layers && s.ok(); ++l) {
    const LayerWeights& w = weights.layers[l];
    kernels::DeviceLayer& d = layers[l];
    if (s.ok()) s = all(d.attn_norm, w.attn_norm, "attn_norm");
    if (s.ok()) s = all(d.ffn_norm, w.ffn_norm, "ffn_norm");
    if (s.ok()) s = rows(d.wq, w.wq, q0, q1, "wq");
    if (s.ok()) s = rows(d.wk, w.wk, k0, k1, "wk");
    if (s.ok()) s = rows(d.wv, w.wv, k0, k1, "wv");
    if (s.ok()) s = rows(d.bq, w.bq, q0, q1, "bq");
    if (s.ok()) s = rows(d.bk, w.bk, k0, k1, "bk");
    if (s.ok()) s = rows(d.bv, w.bv, k0, k1, "bv");
    if (s.ok()) s = all(d.q_norm, w.q_norm, "q_norm");
    if (s.ok()) s = all(d.k_norm, w.k_norm, "k_norm");
    if (s.ok()) s = cols(d.wo, w.wo, q0, q1, "wo");
    if (s.ok()) s = rows(d.w_gate, w.w_gate, sh.ffn_begin, sh.ffn_end, "w_gate");
    if (s.ok()) s = rows(d.w_up, w.w_up, sh.ffn_begin, sh.ffn_end, "w_up");
    if (s.ok()) s = cols(d.w_down, w.w_down, sh.ffn_begin, sh.ffn_end, "w_down");
  }
  if (!s.ok()) return s;
  absl::StatusOr<kernels::DeviceLayer*> dl = st.upload(layers.data(), layers.size(), "layers");
  if (!dl.ok()) return dl.status();
  m.layers = *dl;
  absl::StatusOr<WeightMaps> maps = encode_weight_maps(m, layers);
  if (!maps.ok()) return maps.status();
  m.weight_maps = nullptr;
  m.wide_maps = 0;
  if (!maps->maps.empty()) {
    absl::StatusOr<CUtensorMap*> dm =
        st.upload(maps->maps.data(), maps->maps.size(), "weight maps");
    if (!dm.ok()) return dm.status();
    m.weight_maps = *dm;
    m.wide_maps = maps->wide;
  }
  if (m.weight_maps != nullptr && wgmma) {  // only wgmma passes read it
    // The activation cache [ACT_CACHE]: kActCacheRowsPerCta token rows of the hidden size
    // per CTA of the rank (steps of more tokens convert the rows past it every time), and
    // its flags, zeroed (no step's key).
    const int64_t cache_rows = int64_t{ctas} * kernels::kActCacheRowsPerCta;
    void* p = nullptr;
    MEGASERVE_CUDA_RETURN(cudaMalloc(&p, sizeof(uint16_t) * cache_rows * m.hidden),
                          "activation cache");
    st.allocations.push_back(p);
    m.act_cache = static_cast<uint16_t*>(p);
    m.act_cache_rows = static_cast<int32_t>(cache_rows);
    const size_t flag_bytes = sizeof(uint64_t) * (cache_rows / kernels::kActFlagRows);
    MEGASERVE_CUDA_RETURN(cudaMalloc(&p, flag_bytes), "activation cache flags");
    st.allocations.push_back(p);
    MEGASERVE_CUDA_RETURN(cudaMemset(p, 0, flag_bytes), "activation cache flags");
    m.act_cache_flags = static_cast<uint64_t*>(p);
    // The rank's bf16 FFN activations and attention outputs (its FFN columns, its q heads),
    // bf16_act_rows token rows (rounded up to a pass's): 8192 rows of Llama-3.1-8B's 14,336
    // and 4,096 are 235 and 67 MB at TP 1.
    if (bf16_act_rows > 0) {
      const int64_t act_rows = std::max<int64_t>(
          kernels::kActCacheBoxRows, (int64_t{bf16_act_rows} + kernels::kActCacheBoxRows - 1) /
                                         kernels::kActCacheBoxRows * kernels::kActCacheBoxRows);
      const auto bf16_rows = [&](int64_t width, const char* what, uint16_t** rows_at,
                                 const CUtensorMap** map) -> absl::Status {
        void* q = nullptr;
        MEGASERVE_CUDA_RETURN(cudaMalloc(&q, sizeof(uint16_t) * act_rows * width), what);
        st.allocations.push_back(q);
        *rows_at = static_cast<uint16_t*>(q);
        absl::StatusOr<CUtensorMap> encoded = encode_act_cache_map(*rows_at, act_rows, width);
        if (!encoded.ok()) return encoded.status();
        absl::StatusOr<CUtensorMap*> on_device = st.upload(&*encoded, 1, what);
        if (!on_device.ok()) return on_device.status();
        *map = *on_device;
        return absl::OkStatus();
      };
      s = bf16_rows(m.ffn, "bf16 FFN activations", &m.ffn_act, &m.ffn_act_map);
      if (s.ok()) {
        s = bf16_rows(int64_t{m.q_heads} * m.head_dim, "bf16 attention outputs", &m.attn_act,
                      &m.attn_act_map);
      }
      // And the norm stage's rows [NORM_STAGE], the full hidden size on every rank (64 MB
      // more on Llama-3.1-8B).
      if (s.ok()) s = bf16_rows(m.hidden, "normalized rows", &m.norm_act, &m.norm_act_map);
      if (!s.ok()) return s;
      m.ffn_act_rows = m.attn_act_rows = m.norm_act_rows = static_cast<int32_t>(act_rows);
    }
    absl::StatusOr<CUtensorMap> am = encode_act_cache_map(m.act_cache, cache_rows, m.hidden);
    if (!am.ok()) return am.status();
    absl::StatusOr<CUtensorMap*> dam = st.upload(&*am, 1, "activation cache map");
    if (!dam.ok()) return dam.status();
    m.act_cache_map = *dam;
  }
  const std::vector<float> inv_freq = rope_inv_freq(config);
  absl::StatusOr<float*> inv = st.upload(inv_freq.data(), inv_freq.size(), "inv_freq");
  if (!inv.ok()) return inv.status();
  m.inv_freq = *inv;
  // RoPE's cos and sin per (position, pair), computed as the CPU interpreter does
  // (engine/cpu/cpu_ops_qkv.cc), for the model's positions up to kRopeTablePositions (64 MB
  // at head dim 128); the QKV op computes later positions itself (kernels/op_qkv_rope.cuh).
  const int positions = std::clamp(config.max_position_embeddings, 0, kRopeTablePositions);
  const std::vector<float> rope = rope_cos_sin(config, positions);
  m.rope = nullptr;
  m.rope_positions = 0;
  if (positions > 0) {
    absl::StatusOr<float*> table = st.upload(rope.data(), rope.size(), "rope table");
    if (!table.ok()) return table.status();
    m.rope = *table;
    m.rope_positions = positions;
  }
  return absl::OkStatus();
}

}  // namespace megaserve::engine
