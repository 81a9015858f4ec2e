#include "engine/cpu/cpu_ops.h"

#include <cmath>

namespace megaserve::engine::cpu {

namespace {

// Four interleaved fp32 partial sums (column c goes to sum c % 4), combined as
// (s0 + s1) + (s2 + s3), then the tail in order. A fixed order per element: the result does
// not depend on tiling or placement, and the independent chains run ~4x faster than one.
template <typename Load>
float dot4(int64_t n, const float* x, Load w) {
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
  int64_t c = 0;
  for (; c + 4 <= n; c += 4) {
    s0 += w(c) * x[c];
    s1 += w(c + 1) * x[c + 1];
    s2 += w(c + 2) * x[c + 2];
    s3 += w(c + 3) * x[c + 3];
  }
  float acc = (s0 + s1) + (s2 + s3);
  for (; c < n; ++c) acc += w(c) * x[c];
  return acc;
}

}  // namespace

float WeightView::dot(int64_t r, const float* x) const {
  const int64_t base = r * stride;
  switch (dtype) {
    case DType::kF32: {
      const float* w = reinterpret_cast<const float*>(data) + base;
      return dot4(cols, x, [w](int64_t c) { return w[c]; });
    }
    case DType::kBF16: {
      const uint16_t* w = reinterpret_cast<const uint16_t*>(data) + base;
      return dot4(cols, x, [w](int64_t c) { return bf16_to_float(w[c]); });
    }
    case DType::kF16: {
      const uint16_t* w = reinterpret_cast<const uint16_t*>(data) + base;
      return dot4(cols, x, [w](int64_t c) { return f16_to_float(w[c]); });
    }
  }
  return 0.0f;
}

WeightView view_of(const Tensor& t, int64_t row_begin, int64_t row_end, int64_t col_begin,
                   int64_t col_end) {
  WeightView v;
  if (t.empty()) return v;
  const int64_t full_cols = t.shape.size() >= 2 ? t.shape[1] : t.shape[0];
  const int64_t elem = dtype_size(t.dtype);
  v.dtype = t.dtype;
  v.rows = row_end - row_begin;
  v.cols = col_end - col_begin;
  v.stride = full_cols;
  v.data = t.bytes->data() + (row_begin * full_cols + col_begin) * elem;
  return v;
}

namespace {

WeightView vector_view(const Tensor& t, int64_t begin, int64_t end) {
  return view_of(t, 0, 1, begin, end);
}

}  // namespace

RankWeights rank_weights(const ModelWeights& w, const ModelConfig& config, const ModelShard& sh) {
  const int64_t H = config.hidden_size, hd = config.head_dim;
  const int64_t q0 = sh.q_heads_begin() * hd, q1 = q0 + sh.q_heads * hd;
  const int64_t k0 = sh.kv_heads_begin() * hd, k1 = k0 + sh.kv_heads * hd;
  RankWeights r;
  r.embedding = view_of(w.embedding, sh.vocab_begin, sh.vocab_end, 0, H);
  r.lm_head = view_of(w.lm_head, sh.vocab_begin, sh.vocab_end, 0, H);
  r.final_norm = vector_view(w.final_norm, 0, H);
  for (const LayerWeights& l : w.layers) {
    LayerView v;
    v.attn_norm = vector_view(l.attn_norm, 0, H);
    v.ffn_norm = vector_view(l.ffn_norm, 0, H);
    v.wq = view_of(l.wq, q0, q1, 0, H);
    v.wk = view_of(l.wk, k0, k1, 0, H);
    v.wv = view_of(l.wv, k0, k1, 0, H);
    v.bq = vector_view(l.bq, q0, q1);
    v.bk = vector_view(l.bk, k0, k1);
    v.bv = vector_view(l.bv, k0, k1);
    v.q_norm = vector_view(l.q_norm, 0, hd);
    v.k_norm = vector_view(l.k_norm, 0, hd);
    v.wo = view_of(l.wo, 0, H, q0, q1);
    v.w_gate = view_of(l.w_gate, sh.ffn_begin, sh.ffn_end, 0, H);
    v.w_up = view_of(l.w_up, sh.ffn_begin, sh.ffn_end, 0, H);
    v.w_down = view_of(l.w_down, 0, H, sh.ffn_begin, sh.ffn_end);
    r.layers.push_back(v);
  }
  return r;
}

namespace {

// Summed in double, as the kernels do (kernels/device_utils.cuh, row_inv_rms): the products are
// exact and the sums' order hardly matters, so both sides get the same float, and the bf16
// roundings that follow (normed_input) agree bit for bit.
float inv_rms(const float* x, int n, float eps) {
  double ss = 0.0;
  for (int i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  return static_cast<float>(1.0 / std::sqrt(ss / n + static_cast<double>(eps)));
}

float bf16_round(float x) { return bf16_to_float(float_to_bf16(x)); }

}  // namespace

void rms_norm(const float* x, const WeightView& weight, int n, float eps, float* out) {
  const float inv = inv_rms(x, n, eps);
  for (int i = 0; i < n; ++i) out[i] = x[i] * inv * weight.at(0, i);
}

void normed_input(const OpContext& ctx, const float* x, const WeightView& weight, int n,
                  float* out) {
  if (!ctx.round_activations_bf16) {
    rms_norm(x, weight, n, ctx.config->rms_norm_eps, out);
    return;
  }
  // As transformers' bf16 RMSNorm: x * inv rounded to bf16, times the weight, rounded again.
  const float inv = inv_rms(x, n, ctx.config->rms_norm_eps);
  for (int i = 0; i < n; ++i) out[i] = bf16_round(bf16_round(x[i] * inv) * weight.at(0, i));
}

void round_to_bf16(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = bf16_round(x[i]);
}

void execute(const isa::Instruction& inst, int rank, const OpContext& ctx) {
  using isa::Opcode;
  switch (inst.opcode()) {
    case Opcode::kEmbedding:
      return op_embedding(inst, rank, ctx);
    case Opcode::kQkvRope:
      return op_qkv_rope(inst, rank, ctx);
    case Opcode::kAttention:
      return op_attention(inst, rank, ctx);
    case Opcode::kAttentionMerge:
      return op_attention_merge(inst, rank, ctx);
    case Opcode::kOProj:
    case Opcode::kDownProj:
      return op_hidden_projection(inst, rank, ctx);
    case Opcode::kGateUpSilu:
      return op_gate_up_silu(inst, rank, ctx);
    case Opcode::kTpReduce:
      return op_tp_reduce(inst, rank, ctx);
    case Opcode::kLmHead:
      return op_lm_head(inst, rank, ctx);
    case Opcode::kSample:
      return op_sample(inst, rank, ctx);
    case Opcode::kRmsNorm:
      return;  // the projections normalize their rows themselves, to the same values
    case Opcode::kInvalid:
    case Opcode::kNumOpcodes:
      break;
  }
}

}  // namespace megaserve::engine::cpu
