// kQkvRope: RMSNorm of token rows, q/k/v projection of whole fused heads (or of a range of
// their RoPE pairs, isa::qkv_pairs_of_head; pair i: dims i and i + head_dim/2), bias (Qwen2),
// per-head RMSNorm (Qwen3, whole heads only), RoPE (rotate-half pairs) on q and k, then q to
// the q buffer and k/v into the paged cache at each token's position.
#include <cmath>
#include <vector>

#include "engine/cpu/cpu_ops.h"

namespace megaserve::engine::cpu {

void op_qkv_rope(const isa::Instruction& inst, int rank, const OpContext& ctx) {
  const auto a = isa::args_of<isa::QkvRopeArgs>(inst);
  RankState& st = (*ctx.ranks)[rank];
  const ModelConfig& cfg = *ctx.config;
  const StepMetadata& m = *ctx.meta;
  const LayerView& w = st.weights.layers[inst.layer()];
  const int H = cfg.hidden_size, hd = cfg.head_dim, half = hd / 2;
  const int hq = st.shard.q_heads, hkv = st.shard.kv_heads;
  std::vector<float> normed(H), head(hd);
  for (int t = a.row_begin; t < a.row_end; ++t) {
    normed_input(ctx, st.ws.residual.data() + static_cast<int64_t>(t) * H, w.attn_norm, H,
                 normed.data());  // (H)
    const int pos = m.positions[t];
    for (int fh = a.head_begin; fh < a.head_end; ++fh) {
      int p0, p1;
      isa::qkv_pairs_of_head(a, fh, half, &p0, &p1);
      const auto in_tile = [&](int d) {
        const int i = d < half ? d : d - half;
        return i >= p0 && i < p1;
      };
      const int kind = fh < hq ? 0 : (fh < hq + hkv ? 1 : 2);  // q, k, v
      const int h = kind == 0 ? fh : (kind == 1 ? fh - hq : fh - hq - hkv);
      const WeightView& proj = kind == 0 ? w.wq : (kind == 1 ? w.wk : w.wv);
      const WeightView& bias = kind == 0 ? w.bq : (kind == 1 ? w.bk : w.bv);
      for (int d = 0; d < hd; ++d) {
        if (!in_tile(d)) continue;
        head[d] = proj.dot(static_cast<int64_t>(h) * hd + d, normed.data());
        if (!bias.empty()) head[d] += bias.at(0, static_cast<int64_t>(h) * hd + d);
      }  // (hd)
      if (kind < 2) {
        const WeightView& qk_norm = kind == 0 ? w.q_norm : w.k_norm;
        if (!qk_norm.empty()) rms_norm(head.data(), qk_norm, hd, cfg.rms_norm_eps, head.data());
        for (int i = p0; i < p1; ++i) {
          const float angle = static_cast<float>(pos) * (*ctx.inv_freq)[i];
          const float c = std::cos(angle), s = std::sin(angle);
          const float x1 = head[i], x2 = head[i + half];
          head[i] = x1 * c - x2 * s;
          head[i + half] = x2 * c + x1 * s;
        }
      }
      float* out;
      if (kind == 0) {
        out = st.ws.q.data() + (static_cast<int64_t>(t) * hq + h) * hd;
      } else {
        const int req = m.token_request[t];
        const int block = m.block_indices[m.block_indptr[req] + pos / m.kv_block_size];
        auto& cache = kind == 1 ? st.k_cache[inst.layer()] : st.v_cache[inst.layer()];
        out = cache.data() + st.kv_layout.offset(block, h, pos % m.kv_block_size);
      }
      for (int d = 0; d < hd; ++d) {
        if (!in_tile(d)) continue;
        out[d] = head[d];
        // The GPU's KV cache is bf16 (DESIGN §5).
        if (kind != 0 && ctx.round_activations_bf16) round_to_bf16(out + d, 1);
      }
    }
  }
}

}  // namespace megaserve::engine::cpu
