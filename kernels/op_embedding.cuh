// kEmbedding: residual rows [row_begin, row_end) = embedding rows of the step's token ids
// (engine/cpu/cpu_ops_embedding.cc). Under tensor parallelism the rank holds the vocabulary
// rows [vocab_begin, vocab_begin + vocab): it writes those ids' rows, and zeros for the
// others, into its partial slot, which a kTpReduce (assign) sums over the ranks.
// An id that is a reference (engine::isa::is_previous_sample_ref, [PREVIOUS_SAMPLE]) is the
// previous step's sample of its row, written by that step's sample op on other SMs: it is complete
// (the step ring or the launch boundary orders it) and read through L2 (__ldcg), since this
// SM's L1 may still hold the value from two steps ago.
#pragma once

#include "kernels/device_utils.cuh"
#include "kernels/op_context.cuh"

namespace megaserve::kernels {

struct EmbeddingOp {
  static constexpr engine::isa::Opcode kOpcode = engine::isa::Opcode::kEmbedding;

  __device__ static void run(const engine::isa::Instruction& inst, const OpContext& ctx) {
    const auto a = engine::isa::args_of<engine::isa::EmbeddingArgs>(inst);
    const int H = ctx.model.hidden;
    const int T = ctx.step.num_tokens;
    float* const out = a.partial_slot < 0
                           ? ctx.step.residual
                           : ctx.step.partial + static_cast<int64_t>(a.partial_slot) * T * H;
    const int64_t n = static_cast<int64_t>(a.row_end - a.row_begin) * H;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const int t = a.row_begin + static_cast<int>(i / H);
      const int c = static_cast<int>(i % H);
      int64_t id = ctx.step.token_ids[t];
      if (engine::isa::is_previous_sample_ref(static_cast<int32_t>(id))) {
        id = __ldcg(ctx.step.previous_sampled_ids +
                    engine::isa::previous_sample_row(static_cast<int32_t>(id)));
      }
      id -= ctx.model.vocab_begin;  // the rank's row (0 with one rank)
      const bool mine = id >= 0 && id < ctx.model.vocab;
      out[static_cast<int64_t>(t) * H + c] =
          mine ? weight_at(ctx.model.embedding, id * H + c) : 0.0f;  // (H) per row
    }
  }
};

}  // namespace megaserve::kernels
