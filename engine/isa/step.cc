#include "engine/isa/step.h"

#include "absl/strings/str_cat.h"
#include "engine/isa/op_args.h"

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
    case BufferId::kNormed:
      return "normed";
    case BufferId::kNumBuffers:
      break;
  }
  return "unknown";
}

std::string describe_instruction(const Step& step, InstructionRef ref) {
  const RankSchedule& rs = step.ranks[ref.rank];
  const isa::Instruction& inst = rs.instructions[ref.index];
  int sm = 0;
  while (sm + 1 < static_cast<int>(rs.queue_begin.size()) && rs.queue_begin[sm + 1] <= ref.index) {
    ++sm;
  }
  return absl::StrCat(isa::opcode_name(inst.opcode()), " layer ", inst.layer(), " (",
                      isa::args_text(inst), ") rank ", ref.rank, " sm ", sm, " #", ref.index);
}

}  // namespace megaserve::engine
