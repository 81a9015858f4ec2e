// kAttention and kAttentionMerge. A query at position p attends to keys [0, p] of its
// request (causal; keys before the step's first position come from earlier steps' cache).
// Split s covers keys [s * K, (s + 1) * K) with K = kv_split_tokens; its output is
// normalized within the split and carries lse = max + log(sum exp), so the merge
//   out = sum_s exp(lse_s - M) * o_s / sum_s exp(lse_s - M),  M = max_s lse_s
// is exact, and a query whose keys all fall in split 0 gets o_0 bit for bit.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "engine/cpu/cpu_ops.h"

namespace megaserve::engine::cpu {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Attention of one query vector over keys [key_begin, key_end) of one request and kv head:
// writes the normalized output (hd) and returns the log-sum-exp (-inf when no keys).
float attend(const float* q, int key_begin, int key_end, const int32_t* blocks, int kv_head,
             int layer, const RankState& st, int block_size, int hd, std::vector<float>& scores,
             float* out) {
  std::fill(out, out + hd, 0.0f);
  if (key_begin >= key_end) return kNegInf;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const float* kc = st.k_cache[layer].data();
  const float* vc = st.v_cache[layer].data();
  scores.resize(key_end - key_begin);
  float mx = kNegInf;
  for (int j = key_begin; j < key_end; ++j) {
    const float* k = kc + st.kv_layout.offset(blocks[j / block_size], kv_head, j % block_size);
    float s = 0.0f;
    for (int d = 0; d < hd; ++d) s += q[d] * k[d];
    s *= scale;
    scores[j - key_begin] = s;
    mx = std::max(mx, s);
  }
  float sum = 0.0f;
  for (int j = key_begin; j < key_end; ++j) {
    const float e = std::exp(scores[j - key_begin] - mx);
    sum += e;
    const float* v = vc + st.kv_layout.offset(blocks[j / block_size], kv_head, j % block_size);
    for (int d = 0; d < hd; ++d) out[d] += e * v[d];
  }
  for (int d = 0; d < hd; ++d) out[d] /= sum;
  return mx + std::log(sum);
}

}  // namespace

void op_attention(const isa::Instruction& inst, int rank, const OpContext& ctx) {
  const auto a = isa::args_of<isa::AttentionArgs>(inst);
  RankState& st = (*ctx.ranks)[rank];
  const StepMetadata& m = *ctx.meta;
  const int hd = ctx.config->head_dim;
  const int hq = st.shard.q_heads, hkv = st.shard.kv_heads, group = hq / hkv;
  const int K = m.kv_split_tokens;
  std::vector<float> scores;
  for (int i = a.request_begin; i < a.request_end; ++i) {
    const int row0 = m.query_start[i];
    const int n = m.query_start[i + 1] - row0;
    const bool batch = a.request_end - a.request_begin > 1;
    const int q0 = batch ? 0 : a.query_begin, q1 = batch ? n : a.query_end;
    const int32_t* blocks = m.block_indices.data() + m.block_indptr[i];
    for (int qi = q0; qi < q1; ++qi) {
      const int t = row0 + qi;
      const int pos = m.positions[t];
      const int key_begin = a.split < 0 ? 0 : a.split * K;
      const int key_end = a.split < 0 ? pos + 1 : std::min(pos + 1, (a.split + 1) * K);
      for (int g = 0; g < group; ++g) {
        const int h = a.kv_head * group + g;
        const float* q = st.ws.q.data() + (static_cast<int64_t>(t) * hq + h) * hd;
        if (a.split < 0) {
          float* out = st.ws.attn_out.data() + (static_cast<int64_t>(t) * hq + h) * hd;
          attend(q, key_begin, key_end, blocks, a.kv_head, inst.layer(), st, m.kv_block_size, hd,
                 scores, out);
        } else {
          const int64_t row = m.split_row_begin[i] +
                              ((static_cast<int64_t>(a.split) * hkv + a.kv_head) * n + qi) * group +
                              g;
          st.ws.split_lse[row] =
              attend(q, key_begin, key_end, blocks, a.kv_head, inst.layer(), st, m.kv_block_size,
                     hd, scores, st.ws.split_out.data() + row * hd);
        }
      }
    }
  }
}

void op_attention_merge(const isa::Instruction& inst, int rank, const OpContext& ctx) {
  const auto a = isa::args_of<isa::AttentionMergeArgs>(inst);
  RankState& st = (*ctx.ranks)[rank];
  const StepMetadata& m = *ctx.meta;
  const int hd = ctx.config->head_dim;
  const int hq = st.shard.q_heads, hkv = st.shard.kv_heads, group = hq / hkv;
  const int K = m.kv_split_tokens;
  const int i = a.request;
  const int row0 = m.query_start[i];
  const int n = m.query_start[i + 1] - row0;
  for (int qi = a.query_begin; qi < a.query_end; ++qi) {
    const int t = row0 + qi;
    const int splits = m.positions[t] / K + 1;  // splits holding keys of this query
    for (int h = 0; h < hq; ++h) {
      const int kv = h / group, g = h % group;
      const auto row_of = [&](int s) {
        return m.split_row_begin[i] + ((static_cast<int64_t>(s) * hkv + kv) * n + qi) * group + g;
      };
      float mx = kNegInf;
      for (int s = 0; s < splits; ++s) mx = std::max(mx, st.ws.split_lse[row_of(s)]);
      float* out = st.ws.attn_out.data() + (static_cast<int64_t>(t) * hq + h) * hd;
      std::fill(out, out + hd, 0.0f);
      float denom = 0.0f;
      for (int s = 0; s < splits; ++s) {
        const float w = std::exp(st.ws.split_lse[row_of(s)] - mx);
        denom += w;
        const float* o = st.ws.split_out.data() + row_of(s) * hd;
        for (int d = 0; d < hd; ++d) out[d] += w * o[d];
      }
      for (int d = 0; d < hd; ++d) out[d] /= denom;
    }
  }
}

}  // namespace megaserve::engine::cpu
