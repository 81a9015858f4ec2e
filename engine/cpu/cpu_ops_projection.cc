// The hidden-width projections and the TP reduction:
//   kOProj / kDownProj: out[t, c] = dot(W[c, :], in[t, :]) for a tile of token rows x hidden
//     columns (over inputs [k_begin, k_end) when split-K); added to the residual (one rank)
//     or stored in a partial slot (TP, split-K).
//   kGateUpSilu: act[t, c] = SiLU(gate[c] . n) * (up[c] . n), n = RMSNorm(residual[t]).
//   kTpReduce: residual[t, c] (+)= sum over ranks r = 0, 1, ... of partial_r[t, c]; the fixed
//     rank order makes every rank's residual bit-identical. On one rank with splits > 1, the
//     sum over this rank's split-K slots s = 0, 1, ... instead [SPLIT_K].
#include <algorithm>
#include <cmath>
#include <vector>

#include "engine/cpu/cpu_ops.h"

namespace megaserve::engine::cpu {

void op_hidden_projection(const isa::Instruction& inst, int rank, const OpContext& ctx) {
  const auto a = isa::args_of<isa::HiddenTileArgs>(inst);
  RankState& st = (*ctx.ranks)[rank];
  const int H = ctx.config->hidden_size;
  const int T = ctx.meta->num_tokens;
  const LayerView& w = st.weights.layers[inst.layer()];
  const bool o_proj = inst.opcode() == isa::Opcode::kOProj;
  const WeightView& full = o_proj ? w.wo : w.w_down;                      // [H, in] strided
  const std::vector<float>& input = o_proj ? st.ws.attn_out : st.ws.act;  // [T, in]
  const int64_t in_cols = full.cols;
  // A split-K tile's inputs [k_begin, k_end) [SPLIT_K]; k_end 0: all of them.
  const int64_t k0 = a.k_end > 0 ? a.k_begin : 0, k1 = a.k_end > 0 ? a.k_end : in_cols;
  const WeightView proj = full.columns(k0, k1);                          // [H, k1 - k0]
  std::vector<float> rounded(ctx.round_activations_bf16 ? k1 - k0 : 0);  // (k1 - k0)
  for (int t = a.row_begin; t < a.row_end; ++t) {
    const float* x = input.data() + t * in_cols + k0;
    if (ctx.round_activations_bf16) {
      std::copy(x, x + (k1 - k0), rounded.begin());
      round_to_bf16(rounded.data(), k1 - k0);
      x = rounded.data();
    }
    for (int c = a.col_begin; c < a.col_end; ++c) {
      const float y = proj.dot(c, x);
      if (a.partial_slot < 0) {
        st.ws.residual[static_cast<int64_t>(t) * H + c] += y;
      } else {
        st.ws.partial[(static_cast<int64_t>(a.partial_slot) * T + t) * H + c] = y;
      }
    }
  }
}

void op_gate_up_silu(const isa::Instruction& inst, int rank, const OpContext& ctx) {
  const auto a = isa::args_of<isa::GateUpArgs>(inst);
  RankState& st = (*ctx.ranks)[rank];
  const int H = ctx.config->hidden_size;
  const int F = st.shard.ffn_cols();
  const LayerView& w = st.weights.layers[inst.layer()];
  std::vector<float> normed(H);
  for (int t = a.row_begin; t < a.row_end; ++t) {
    normed_input(ctx, st.ws.residual.data() + static_cast<int64_t>(t) * H, w.ffn_norm, H,
                 normed.data());  // (H)
    for (int c = a.col_begin; c < a.col_end; ++c) {
      const float g = w.w_gate.dot(c, normed.data());
      const float u = w.w_up.dot(c, normed.data());
      st.ws.act[static_cast<int64_t>(t) * F + c] = g / (1.0f + std::exp(-g)) * u;
    }
  }
}

void op_tp_reduce(const isa::Instruction& inst, int rank, const OpContext& ctx) {
  const auto a = isa::args_of<isa::HiddenTileArgs>(inst);
  std::vector<RankState>& ranks = *ctx.ranks;
  const int H = ctx.config->hidden_size;
  const int T = ctx.meta->num_tokens;
  std::vector<float>& residual = ranks[rank].ws.residual;
  const std::vector<float>& own = ranks[rank].ws.partial;
  const int64_t slot_stride = static_cast<int64_t>(T) * H;
  for (int t = a.row_begin; t < a.row_end; ++t) {
    const int64_t prow = (static_cast<int64_t>(a.partial_slot) * T + t) * H;
    const int64_t row = static_cast<int64_t>(t) * H;
    for (int c = a.col_begin; c < a.col_end; ++c) {
      float sum = 0.0f;
      if (a.splits > 1) {  // this rank's split-K slots, in order [SPLIT_K]
        for (int s = 0; s < a.splits; ++s) sum += own[s * slot_stride + row + c];
      } else {
        for (const RankState& peer : ranks) sum += peer.ws.partial[prow + c];  // peer memory
      }
      float& out = residual[row + c];
      out = a.assign ? sum : out + sum;
    }
  }
}

}  // namespace megaserve::engine::cpu
