#include "engine/isa/op_args.h"

#include "absl/strings/str_cat.h"

namespace megaserve::engine::isa {
namespace {

ArgField range(const char* name, int32_t begin, int32_t end) { return {name, begin, end, true}; }
ArgField value(const char* name, int32_t v) { return {name, v, v, false}; }

}  // namespace

std::vector<ArgField> arg_fields(const Instruction& inst) {
  switch (inst.opcode()) {
    case Opcode::kEmbedding: {
      const auto a = args_of<EmbeddingArgs>(inst);
      return {range("rows", a.row_begin, a.row_end), value("slot", a.partial_slot)};
    }
    case Opcode::kQkvRope: {
      const auto a = args_of<QkvRopeArgs>(inst);
      std::vector<ArgField> f = {range("rows", a.row_begin, a.row_end),
                                 range("heads", a.head_begin, a.head_end)};
      if (a.pair_end > 0) f.push_back(range("pairs", a.pair_begin, a.pair_end));
      if (a.normed != 0) f.push_back(value("normed", a.normed));
      return f;
    }
    case Opcode::kAttention: {
      const auto a = args_of<AttentionArgs>(inst);
      return {value("kv_head", a.kv_head), range("requests", a.request_begin, a.request_end),
              range("query", a.query_begin, a.query_end), value("split", a.split)};
    }
    case Opcode::kAttentionMerge: {
      const auto a = args_of<AttentionMergeArgs>(inst);
      return {value("request", a.request), range("query", a.query_begin, a.query_end)};
    }
    case Opcode::kOProj:
    case Opcode::kDownProj:
    case Opcode::kTpReduce: {
      const auto a = args_of<HiddenTileArgs>(inst);
      std::vector<ArgField> f = {range("rows", a.row_begin, a.row_end),
                                 range("cols", a.col_begin, a.col_end),
                                 value("slot", a.partial_slot)};
      if (a.k_end > 0) f.push_back(range("k", a.k_begin, a.k_end));
      if (a.splits > 1) f.push_back(value("splits", a.splits));
      return f;
    }
    case Opcode::kGateUpSilu: {
      const auto a = args_of<GateUpArgs>(inst);
      std::vector<ArgField> f = {range("rows", a.row_begin, a.row_end),
                                 range("cols", a.col_begin, a.col_end)};
      if (a.normed != 0) f.push_back(value("normed", a.normed));
      return f;
    }
    case Opcode::kLmHead: {
      const auto a = args_of<LmHeadArgs>(inst);
      return {range("samples", a.sample_begin, a.sample_end),
              range("cols", a.col_begin, a.col_end)};
    }
    case Opcode::kSample: {
      const auto a = args_of<SampleArgs>(inst);
      return {range("samples", a.sample_begin, a.sample_end)};
    }
    case Opcode::kRmsNorm: {
      const auto a = args_of<RmsNormArgs>(inst);
      return {range("rows", a.row_begin, a.row_end),
              value(a.norm == kFfnNorm ? "ffn_norm" : "attn_norm", a.norm)};
    }
    case Opcode::kInvalid:
    case Opcode::kNumOpcodes:
      break;
  }
  return {};
}

std::string args_text(const Instruction& inst) {
  std::string out;
  for (const ArgField& f : arg_fields(inst)) {
    absl::StrAppend(&out, out.empty() ? "" : " ", f.name, " ");
    if (f.range) {
      absl::StrAppend(&out, "[", f.begin, ",", f.end, ")");
    } else {
      absl::StrAppend(&out, f.begin);
    }
  }
  return out;
}

std::string args_json(const Instruction& inst) {
  std::string out;
  for (const ArgField& f : arg_fields(inst)) {
    absl::StrAppend(&out, out.empty() ? "" : ",", "\"", f.name, "\":");
    if (f.range) {
      absl::StrAppend(&out, "\"[", f.begin, ",", f.end, ")\"");
    } else {
      absl::StrAppend(&out, f.begin);
    }
  }
  return out;
}

}  // namespace megaserve::engine::isa
