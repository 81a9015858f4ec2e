// kLmHead: logits[s, c] = dot(lm_head[c], RMSNorm(residual[sample_rows[s]])) for this rank's
// vocabulary columns. kSample: gathers the full vocabulary row from every rank's logits (peer
// memory, in rank order) and samples it with engine/isa/sampling.h, exactly as one device would.
#include <vector>

#include "engine/cpu/cpu_ops.h"
#include "engine/isa/sampling.h"

namespace megaserve::engine::cpu {

void op_lm_head(const isa::Instruction& inst, int rank, const OpContext& ctx) {
  const auto a = isa::args_of<isa::LmHeadArgs>(inst);
  RankState& st = (*ctx.ranks)[rank];
  const int H = ctx.config->hidden_size;
  const int V = st.shard.vocab_cols();
  std::vector<float> normed(H);
  for (int s = a.sample_begin; s < a.sample_end; ++s) {
    const int row = ctx.meta->sample_rows[s];
    normed_input(ctx, st.ws.residual.data() + static_cast<int64_t>(row) * H, st.weights.final_norm,
                 H, normed.data());  // (H)
    for (int c = a.col_begin; c < a.col_end; ++c) {
      st.ws.logits[static_cast<int64_t>(s) * V + c] = st.weights.lm_head.dot(c, normed.data());
    }
  }
}

void op_sample(const isa::Instruction& inst, int /*rank*/, const OpContext& ctx) {
  const auto a = isa::args_of<isa::SampleArgs>(inst);
  const StepMetadata& m = *ctx.meta;
  std::vector<float> logits;
  for (int s = a.sample_begin; s < a.sample_end; ++s) {
    logits.clear();
    for (const RankState& peer : *ctx.ranks) {
      const int V = peer.shard.vocab_cols();
      const float* row = peer.ws.logits.data() + static_cast<int64_t>(s) * V;
      logits.insert(logits.end(), row, row + V);  // (vocab)
    }
    const RequestSampling& req = m.requests[m.sample_request[s]];
    scheduler::SampledToken tok = sample_token(logits, req.params, sampling_context(req));
    tok.request_id = req.request_id;
    (*ctx.sampled)[s] = std::move(tok);
  }
}

}  // namespace megaserve::engine::cpu
