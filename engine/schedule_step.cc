#include "engine/schedule_step.h"

#include "absl/strings/str_cat.h"

namespace megaserve::engine {

const char* buffer_name(BufferId id) {
  switch (id) {
    case BufferId::kResidual:
      return "residual";
    case BufferId::kQ:
      return "q";
    case BufferId::kAttnOut:
      return "attn_out";
    case BufferId::kSplitOut:
      return "split_out";
    case BufferId::kSplitLse:
      return "split_lse";
    case BufferId::kPartial:
      return "tp_partial";
    case BufferId::kAct:
      return "ffn_act";
    case BufferId::kLogits:
      return "logits";
    case BufferId::kSampled:
      return "sampled";
    case BufferId::kKCache:
      return "k_cache";
    case BufferId::kVCache:
      return "v_cache";
    case BufferId::kNumBuffers:
      break;
  }
  return "unknown";
}

namespace {

std::string describe_args(const isa::Instruction& inst) {
  using isa::Opcode;
  switch (inst.opcode()) {
    case Opcode::kEmbedding: {
      auto a = isa::args_of<isa::EmbeddingArgs>(inst);
      return absl::StrCat("rows [", a.row_begin, ",", a.row_end, ") slot ", a.partial_slot);
    }
    case Opcode::kQkvRope: {
      auto a = isa::args_of<isa::QkvRopeArgs>(inst);
      return absl::StrCat("rows [", a.row_begin, ",", a.row_end, ") heads [", a.head_begin, ",",
                          a.head_end, ")");
    }
    case Opcode::kAttention: {
      auto a = isa::args_of<isa::AttentionArgs>(inst);
      return absl::StrCat("kv_head ", a.kv_head, " requests [", a.request_begin, ",", a.request_end,
                          ") query [", a.query_begin, ",", a.query_end, ") split ", a.split);
    }
    case Opcode::kAttentionMerge: {
      auto a = isa::args_of<isa::AttentionMergeArgs>(inst);
      return absl::StrCat("request ", a.request, " query [", a.query_begin, ",", a.query_end, ")");
    }
    case Opcode::kOProj:
    case Opcode::kDownProj:
    case Opcode::kTpReduce: {
      auto a = isa::args_of<isa::HiddenTileArgs>(inst);
      return absl::StrCat("rows [", a.row_begin, ",", a.row_end, ") cols [", a.col_begin, ",",
                          a.col_end, ") slot ", a.partial_slot);
    }
    case Opcode::kGateUpSilu: {
      auto a = isa::args_of<isa::GateUpArgs>(inst);
      return absl::StrCat("rows [", a.row_begin, ",", a.row_end, ") cols [", a.col_begin, ",",
                          a.col_end, ")");
    }
    case Opcode::kLmHead: {
      auto a = isa::args_of<isa::LmHeadArgs>(inst);
      return absl::StrCat("samples [", a.sample_begin, ",", a.sample_end, ") cols [", a.col_begin,
                          ",", a.col_end, ")");
    }
    case Opcode::kSample: {
      auto a = isa::args_of<isa::SampleArgs>(inst);
      return absl::StrCat("samples [", a.sample_begin, ",", a.sample_end, ")");
    }
    default:
      return "";
  }
}

}  // namespace

std::string describe_instruction(const Step& step, InstructionRef ref) {
  const RankSchedule& rs = step.ranks[ref.rank];
  const isa::Instruction& inst = rs.instructions[ref.index];
  int sm = 0;
  while (sm + 1 < static_cast<int>(rs.queue_begin.size()) && rs.queue_begin[sm + 1] <= ref.index) {
    ++sm;
  }
  return absl::StrCat(isa::opcode_name(inst.opcode()), " layer ", inst.layer(), " (",
                      describe_args(inst), ") rank ", ref.rank, " sm ", sm, " #", ref.index);
}

}  // namespace megaserve::engine
