#include "bench/op_stream.h"

#include <cstdint>
#include <vector>

namespace megaserve::engine {

Step op_stream(const Step& step, isa::Opcode op) {
  Step out;
  out.step_id = step.step_id;
  out.tp = step.tp;
  out.num_sms = step.num_sms;
  out.meta = step.meta;
  out.k_splits = step.k_splits;  // the workspace's partial slots [SPLIT_K]
  out.accesses_recorded = false;
  out.ranks.resize(step.ranks.size());
  // new_index[rank][i]: where instruction i of that rank went, -1 if dropped.
  std::vector<std::vector<int32_t>> new_index(step.ranks.size());
  for (size_t r = 0; r < step.ranks.size(); ++r) {
    const RankSchedule& in = step.ranks[r];
    RankSchedule& rs = out.ranks[r];
    new_index[r].assign(in.instructions.size(), -1);
    rs.queue_begin.push_back(0);
    for (int q = 0; q < in.num_queues(); ++q) {
      for (int32_t i = in.queue_begin[q]; i < in.queue_begin[q + 1]; ++i) {
        isa::Instruction inst = in.instructions[i];
        if (inst.opcode() != op) continue;
        inst.words[isa::kWordNumWaits] = 0;
        inst.words[isa::kWordNumSignals] = 0;
        new_index[r][i] = static_cast<int32_t>(rs.instructions.size());
        rs.instructions.push_back(inst);
        rs.cost.push_back(i < static_cast<int32_t>(in.cost.size()) ? in.cost[i] : 0.0);
      }
      rs.queue_begin.push_back(static_cast<int32_t>(rs.instructions.size()));
    }
    rs.order.assign(rs.instructions.size(), 0);
    rs.barrier_begin = in.barrier_begin;
    rs.barrier_end = in.barrier_begin;
  }
  for (const InstructionRef ref : step.global_order) {
    const int32_t i = new_index[ref.rank][ref.index];
    if (i < 0) continue;
    out.ranks[ref.rank].order[i] = static_cast<int32_t>(out.global_order.size());
    out.global_order.push_back({ref.rank, i});
  }
  return out;
}

}  // namespace megaserve::engine
