// kEmbedding: residual (or TP partial) rows = embedding rows of the step's token ids.
#include <algorithm>

#include "engine/cpu/cpu_ops.h"

namespace megaserve::engine::cpu {

void op_embedding(const isa::Instruction& inst, int rank, const OpContext& ctx) {
  const auto a = isa::args_of<isa::EmbeddingArgs>(inst);
  RankState& st = (*ctx.ranks)[rank];
  const int H = ctx.config->hidden_size;
  const int T = ctx.meta->num_tokens;
  for (int t = a.row_begin; t < a.row_end; ++t) {
    float* out = a.partial_slot < 0
                     ? st.ws.residual.data() + static_cast<int64_t>(t) * H
                     : st.ws.partial.data() + (static_cast<int64_t>(a.partial_slot) * T + t) * H;
    const int id = (*ctx.token_ids)[t] - st.shard.vocab_begin;  // local vocabulary row
    if (id < 0 || id >= st.shard.vocab_cols()) {
      std::fill(out, out + H, 0.0f);  // another rank's slice holds this id
      continue;
    }
    for (int c = 0; c < H; ++c) out[c] = st.weights.embedding.at(id, c);  // (H)
  }
}

}  // namespace megaserve::engine::cpu
