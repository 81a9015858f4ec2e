#include "engine/planner/op_cost.h"

#include <algorithm>

namespace megaserve::engine {
namespace {

using isa::Opcode;

// Keys query row `t` scores in split `split` (-1: unsplit).
double attention_keys(const StepMetadata& meta, int t, int split) {
  const int pos = meta.positions[t];
  const int key_begin = split < 0 ? 0 : split * meta.kv_split_tokens;
  const int key_end = split < 0 ? pos + 1 : std::min(pos + 1, (split + 1) * meta.kv_split_tokens);
  return std::max(0, key_end - key_begin);
}

}  // namespace

InstructionWork instruction_work(const ModelConfig& config, const StepMetadata& meta,
                                 const isa::Instruction& inst, int tp) {
  const double H = config.hidden_size, F = config.intermediate_size;
  const int hd = config.head_dim;
  const int group = config.num_heads / config.num_kv_heads;
  InstructionWork w;
  switch (inst.opcode()) {
    case Opcode::kEmbedding: {
      const auto a = isa::args_of<isa::EmbeddingArgs>(inst);
      return op_cost::embedding(a.row_end - a.row_begin, H);
    }
    case Opcode::kQkvRope: {
      const auto a = isa::args_of<isa::QkvRopeArgs>(inst);
      const double cols = 2.0 * isa::qkv_tile_pairs(a, hd / 2);
      return op_cost::projection(a.row_end - a.row_begin, cols, H);
    }
    case Opcode::kAttention: {
      const auto a = isa::args_of<isa::AttentionArgs>(inst);
      const bool batch = a.request_end - a.request_begin > 1;
      for (int i = a.request_begin; i < a.request_end; ++i) {
        const int row0 = meta.query_start[i];
        const int n = meta.query_start[i + 1] - row0;
        const int q0 = batch ? 0 : a.query_begin, q1 = batch ? n : a.query_end;
        double most_keys = 0;
        for (int qi = q0; qi < q1; ++qi) {
          const double keys = attention_keys(meta, row0 + qi, a.split);
          w += op_cost::attention_row(keys, group, hd);
          most_keys = std::max(most_keys, keys);
        }
        w += op_cost::attention_kv(most_keys, hd);
      }
      return w;
    }
    case Opcode::kAttentionMerge: {
      const auto a = isa::args_of<isa::AttentionMergeArgs>(inst);
      const int row0 = meta.query_start[a.request];
      const double elems = static_cast<double>(config.num_heads) * hd;
      for (int qi = a.query_begin; qi < a.query_end; ++qi) {
        w += op_cost::merge_row(meta.positions[row0 + qi] / meta.kv_split_tokens + 1, elems);
      }
      return w;
    }
    case Opcode::kOProj:
    case Opcode::kDownProj: {
      const auto a = isa::args_of<isa::HiddenTileArgs>(inst);
      const bool split = a.k_end > 0;  // one K range of a split-K tile [SPLIT_K]
      const double in_cols = split                             ? a.k_end - a.k_begin
                             : inst.opcode() == Opcode::kOProj ? config.q_size()
                                                               : F;
      return op_cost::projection(a.row_end - a.row_begin, a.col_end - a.col_begin, in_cols,
                                 /*residual_add=*/!split);
    }
    case Opcode::kGateUpSilu: {
      const auto a = isa::args_of<isa::GateUpArgs>(inst);
      return op_cost::gate_up(a.row_end - a.row_begin, a.col_end - a.col_begin, H);
    }
    case Opcode::kTpReduce: {
      const auto a = isa::args_of<isa::HiddenTileArgs>(inst);
      return op_cost::tp_reduce(
          static_cast<double>(a.row_end - a.row_begin) * (a.col_end - a.col_begin),
          a.splits > 1 ? a.splits : tp);
    }
    case Opcode::kLmHead: {
      const auto a = isa::args_of<isa::LmHeadArgs>(inst);
      return op_cost::projection(a.sample_end - a.sample_begin, a.col_end - a.col_begin, H);
    }
    case Opcode::kSample: {
      const auto a = isa::args_of<isa::SampleArgs>(inst);
      return op_cost::sample(a.sample_end - a.sample_begin, config.vocab_size);
    }
    case Opcode::kRmsNorm: {
      const auto a = isa::args_of<isa::RmsNormArgs>(inst);
      return op_cost::rms_norm(a.row_end - a.row_begin, H);
    }
    case Opcode::kInvalid:
    case Opcode::kNumOpcodes:
      break;
  }
  return w;
}

}  // namespace megaserve::engine
