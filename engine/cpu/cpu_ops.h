// The CPU interpreter's ops: one function per opcode, each executing exactly one instruction
// (one tile) in fp32 (optionally rounding the projections' inputs to bf16) on one simulated
// rank. They read and write only the regions the ScheduleBuilder records for that
// instruction; ordering is the caller's business.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/isa/bf16.h"
#include "engine/isa/isa.h"
#include "engine/isa/kv_cache_layout.h"
#include "engine/isa/step.h"
#include "engine/model/model_config.h"
#include "engine/model/weights.h"
#include "engine/planner/schedule_shard.h"
#include "scheduler/step_plan.h"

namespace megaserve::engine::cpu {

// A (possibly strided) row-major view of a weight matrix slice: rows x cols, row r starting
// `stride` elements after row r - 1. Column slices of [out, in] matrices (O and down under
// tensor parallelism) are strided views of the full tensor; nothing is copied.
struct WeightView {
  const uint8_t* data = nullptr;  // element (0, 0)
  DType dtype = DType::kF32;
  int64_t rows = 0, cols = 0, stride = 0;

  bool empty() const { return data == nullptr; }
  float at(int64_t r, int64_t c) const {
    const int64_t i = r * stride + c;
    switch (dtype) {
      case DType::kF32:
        return reinterpret_cast<const float*>(data)[i];
      case DType::kBF16:
        return bf16_to_float(reinterpret_cast<const uint16_t*>(data)[i]);
      case DType::kF16:
        return f16_to_float(reinterpret_cast<const uint16_t*>(data)[i]);
    }
    return 0.0f;
  }
  // Dot product of row r with x[0..cols) in fp32, in a fixed order (cpu_ops.cc: dot4).
  float dot(int64_t r, const float* x) const;
  // Columns [begin, end) of every row: one K range of a split-K tile [SPLIT_K].
  WeightView columns(int64_t begin, int64_t end) const {
    WeightView v = *this;
    v.data += begin * dtype_size(dtype);
    v.cols = end - begin;
    return v;
  }
};

// Rows [row_begin, row_end) and columns [col_begin, col_end) of a 2-D tensor (a 1-D tensor is
// one row); an empty tensor gives an empty view.
WeightView view_of(const Tensor& t, int64_t row_begin, int64_t row_end, int64_t col_begin,
                   int64_t col_end);

struct LayerView {
  WeightView attn_norm, ffn_norm;  // [1, hidden]
  WeightView wq, wk, wv;           // this rank's head rows: [q_heads*hd | kv_heads*hd, hidden]
  WeightView bq, bk, bv;           // [1, ...] (Qwen2) or empty
  WeightView q_norm, k_norm;       // [1, head_dim] (Qwen3) or empty
  WeightView wo;                   // [hidden, q_heads*hd], strided
  WeightView w_gate, w_up;         // [ffn_cols, hidden]
  WeightView w_down;               // [hidden, ffn_cols], strided
};

struct RankWeights {
  WeightView embedding;   // [vocab_cols, hidden]
  WeightView final_norm;  // [1, hidden]
  WeightView lm_head;     // [vocab_cols, hidden]
  std::vector<LayerView> layers;
};
RankWeights rank_weights(const ModelWeights& w, const ModelConfig& config, const ModelShard& sh);

// One step's activations on one rank; buffer shapes in schedule_step.h (BufferId).
struct Workspace {
  std::vector<float> residual, q, attn_out, split_out, split_lse, partial, act, logits;
};

struct RankState {
  ModelShard shard;
  RankWeights weights;
  KvCacheLayout kv_layout;
  std::vector<std::vector<float>> k_cache, v_cache;  // [layer][kv_layout.elements_per_layer()]
  Workspace ws;
};

struct OpContext {
  const ModelConfig* config = nullptr;
  const std::vector<float>* inv_freq = nullptr;  // [head_dim / 2]
  const StepMetadata* meta = nullptr;
  const std::vector<int32_t>* token_ids = nullptr;  // [num_tokens] meta's, references resolved
  std::vector<RankState>* ranks = nullptr;          // every rank: peers are read for TP exchanges
  std::vector<scheduler::SampledToken>* sampled = nullptr;  // [num_samples], rank 0's
  // ExecutionOptions::round_activations_bf16: the projections' input rows go through
  // round_to_bf16 first.
  bool round_activations_bf16 = false;
};

// Runs one instruction on `rank`.
void execute(const isa::Instruction& inst, int rank, const OpContext& ctx);

// The ops (cpu_ops_*.cc).
void op_embedding(const isa::Instruction& inst, int rank, const OpContext& ctx);
void op_qkv_rope(const isa::Instruction& inst, int rank, const OpContext& ctx);
void op_attention(const isa::Instruction& inst, int rank, const OpContext& ctx);
void op_attention_merge(const isa::Instruction& inst, int rank, const OpContext& ctx);
void op_hidden_projection(const isa::Instruction& inst, int rank, const OpContext& ctx);
void op_gate_up_silu(const isa::Instruction& inst, int rank, const OpContext& ctx);
void op_tp_reduce(const isa::Instruction& inst, int rank, const OpContext& ctx);
void op_lm_head(const isa::Instruction& inst, int rank, const OpContext& ctx);
void op_sample(const isa::Instruction& inst, int rank, const OpContext& ctx);

// out[i] = x[i] * inv_rms(x) * weight[i], the sum of squares accumulated in fp32 in order.
void rms_norm(const float* x, const WeightView& weight, int n, float eps, float* out);
// A projection's normalized input row: rms_norm, or with ctx.round_activations_bf16 the peers'
// bf16 RMSNorm, bf16(bf16(x * inv_rms) * weight), as the GPU's wgmma core stages it.
void normed_input(const OpContext& ctx, const float* x, const WeightView& weight, int n,
                  float* out);

// x[i] = x[i] rounded to the nearest bf16 (ties to even), as the GPU stores activations.
void round_to_bf16(float* x, int64_t n);

}  // namespace megaserve::engine::cpu
