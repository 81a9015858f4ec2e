// kSample for a range of sampling rows, one row at a time over the whole CTA, following
// engine/isa/sampling.h step by step (that file is the specification; sampling.cc the host twin):
//   cleaning (NaN -> -inf, +inf -> the largest float) and steps 1-3 (repetition penalty over
//   the distinct prompt and output ids, frequency / presence penalties over the output
//   counts, banned ids -> -inf) into the row's scratch copy, when the row has any of them;
//   the all-banned fallback (greedy over the cleaned raw logits), greedy (4);
//   5-8 as thresholds on the processed logits (op_sample_select.cuh: top-k by count, top-p
//   by probability mass in 2^-46 fixed point, ties at either cut kept; min-p per token);
//   9 the Gumbel-max draw with the host's counter-based noise (engine/isa/counter_rng.h) and its
//   pruning bound;
//   the chosen token's logprob and the top-N (best first, lower id on ties) from the log-
//   softmax of the cleaned raw logits.
// The penalties' float arithmetic and the draw's s and key use explicitly rounded
// intrinsics, so that no multiply and add is contracted into an FMA the host does not do. Writes
// sampled_ids[s], sampled_logprobs[s], and top_ids / top_logprobs[s, 0 .. logprobs).
#pragma once

#include <float.h>

#include "engine/isa/counter_rng.h"
#include "kernels/op_context.cuh"
#include "kernels/op_sample_select.cuh"

namespace megaserve::kernels {

struct SampleOp {
  static constexpr engine::isa::Opcode kOpcode = engine::isa::Opcode::kSample;

  __device__ static void run(const engine::isa::Instruction& inst, const OpContext& ctx) {
    const auto a = engine::isa::args_of<engine::isa::SampleArgs>(inst);
    for (int s = a.sample_begin; s < a.sample_end; ++s) sample_row(s, ctx);
  }

  // Argmax of the cleaned row, lowest id on ties (0 when every value is -inf).
  __device__ static void argmax_row(const float* row, int V, sample::SampleSmem& sm, float& best,
                                    int& id) {
    best = -INFINITY;
    id = V;  // ids increase along a thread's loop: the first strict max is the lowest
    sample::for_each_in_row(row, V, [&](int i, float v) {
      const float x = sample::clean(v);
      if (x > best) best = x, id = i;
    });
    sample::block_argmax(best, id, sm.fred, sm.ired);
    if (best == -INFINITY) id = 0;
  }

  // Cleaning and steps 1-3 into `out` (V floats of global scratch); the CTA's threads see
  // each other's writes after the barriers.
  __device__ static void penalize(const float* raw, float* out, int V, const DeviceSampling& sp,
                                  const int32_t* ids) {
    for (int i = threadIdx.x; i < V; i += blockDim.x) out[i] = sample::clean(raw[i]);
    __syncthreads();
    const float p = sp.repetition_penalty;
    for (int j = sp.repeat_begin + threadIdx.x; j < sp.count_begin; j += blockDim.x) {
      const int id = ids[j];  // distinct: no two threads touch one id
      const float x = out[id];
      out[id] = sample::clean(x > 0.0f ? __fdiv_rn(x, p) : __fmul_rn(x, p));
    }
    __syncthreads();
    for (int j = sp.count_begin + 2 * threadIdx.x; j < sp.banned_begin; j += 2 * blockDim.x) {
      const int id = ids[j];
      const float count = static_cast<float>(ids[j + 1]);
      const float cut = __fadd_rn(__fmul_rn(sp.frequency_penalty, count), sp.presence_penalty);
      out[id] = sample::clean(__fsub_rn(out[id], cut));
    }
    __syncthreads();
    for (int j = sp.banned_begin + threadIdx.x; j < sp.banned_end; j += blockDim.x) {
      out[ids[j]] = -INFINITY;
    }
    __syncthreads();
  }

  // Steps 5-9 over the processed row, whose largest value `best` (at `top`) is finite.
  __device__ static int draw(const float* row, int V, float best, int top, const DeviceSampling& sp,
                             sample::SampleSmem& sm) {
    const double inv_t = 1.0 / static_cast<double>(sp.temperature);
    const double max_logit = best;
    float floor = -INFINITY;  // steps 6 and 7 keep the values >= floor
    const auto finite_key = [&](int i, uint32_t* key) {
      const float x = sample::clean(row[i]);
      *key = sample::order_key(x);
      return x != -INFINITY;
    };
    if (sp.top_k > 0) {
      const double k = sp.top_k;
      floor = sample::key_value(sample::select_threshold<true>(
          V, finite_key, [](int) { return uint64_t{1}; }, [k](uint64_t) { return k; }, sm));
    }
    if (sp.top_p < 1.0f) {
      const double top_p = fmax(0.0, static_cast<double>(sp.top_p));
      const float kept_floor = floor;
      const auto kept_key = [&](int i, uint32_t* key) {
        const float x = sample::clean(row[i]);
        *key = sample::order_key(x);
        return x != -INFINITY && x >= kept_floor;
      };
      // Probability mass (unnormalized, <= 1 per token) in 2^-46 fixed point: exact sums.
      const auto mass = [&](int i) {
        const double s = __dmul_rn(static_cast<double>(sample::clean(row[i])) - max_logit, inv_t);
        return __double2ull_rn(exp(s) * 0x1p46);
      };
      const float cut = sample::key_value(sample::select_threshold<false>(
          V, kept_key, mass, [top_p](uint64_t total) { return top_p * static_cast<double>(total); },
          sm));
      floor = fmaxf(floor, cut);
    }
    const double min_ratio = fmin(fmax(static_cast<double>(sp.min_p), 0.0), 1.0);

    // The draw with the host's pruning (engine/isa/sampling.cc, draw): a token whose key cannot
    // come within ln 2 of the best so far skips its two logarithms. Each thread starts from
    // the largest logit, which every filter keeps.
    constexpr double kLn2 = 0.693147180559945309417232121458176568;
    const uint64_t stream = engine::rng::stream_for(sp.seed, sp.token_index);
    double best_key = engine::rng::gumbel_from_uniform(
        engine::rng::uniform_from_bits(engine::rng::bits_for(stream, top)));
    int best_id = top;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
      const float x = sample::clean(row[i]);
      if (x == -INFINITY) continue;
      const double s = __dmul_rn(static_cast<double>(x) - max_logit, inv_t);
      const uint64_t bits = engine::rng::bits_for(stream, i);
      const int leading_zeros = __clzll(static_cast<long long>((~bits) >> 12));
      if (s - (11 - leading_zeros) * kLn2 + kLn2 < best_key) continue;
      if (x < floor || exp(s) < min_ratio) continue;  // steps 6-8
      const double key =
          __dadd_rn(s, engine::rng::gumbel_from_uniform(engine::rng::uniform_from_bits(bits)));
      if (key > best_key || (key == best_key && i < best_id)) best_key = key, best_id = i;
    }
    sample::block_argmax(best_key, best_id, sm.dred, sm.ired);
    return best_id;
  }

  // The n best ids of the cleaned raw row (best first, lower id on ties) and their logprobs
  // (x - log_normalizer) into top_ids / top_logprobs.
  __device__ static void top_logprobs(const float* raw, int V, int n, double log_normalizer,
                                      int32_t* top_ids, float* top_lps, sample::SampleSmem& sm) {
    const double target = n;
    const uint32_t cut = sample::select_threshold<true>(
        V,
        [&](int i, uint32_t* key) {
          *key = sample::order_key(sample::clean(raw[i]));
          return true;
        },
        [](int) { return uint64_t{1}; }, [target](uint64_t) { return target; }, sm);
    if (threadIdx.x == 0) sm.num_greater = 0;
    __syncthreads();
    // Fewer than n keys exceed the cut, and with the ties at it there are at least n: keep
    // every greater id, then the lowest tied ids, collected per warp over contiguous
    // segments in id order (ballots rank the ties within a warp).
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int segment = ((V + kMegakernelWarps - 1) / kMegakernelWarps + 31) / 32 * 32;
    const int begin = warp * segment, end = min(V, begin + segment);
    int ties = 0;
    for (int base = begin; base < end; base += 32) {
      const int i = base + lane;
      const uint32_t key = i < end ? sample::order_key(sample::clean(raw[i])) : 0u;
      if (i < end && key > cut) {
        const int slot = atomicAdd(&sm.num_greater, 1);
        if (slot < kMaxTopLogprobs) sm.greater_ids[slot] = i;
      }
      const bool tie = i < end && key == cut;
      const uint32_t tied = __ballot_sync(0xffffffffu, tie);
      const int rank = ties + __popc(tied & ((1u << lane) - 1u));
      if (tie && rank < n) sm.tie_ids[warp][rank] = i;
      ties += __popc(tied);
    }
    if (lane == 0) sm.tie_count[warp] = min(ties, n);
    __syncthreads();
    if (threadIdx.x != 0) return;
    int ids[kMaxTopLogprobs];
    int count = 0;
    for (int j = 0; j < sm.num_greater && count < n; ++j) ids[count++] = sm.greater_ids[j];
    for (int w = 0; w < kMegakernelWarps; ++w) {
      for (int j = 0; j < sm.tie_count[w] && count < n; ++j) ids[count++] = sm.tie_ids[w][j];
    }
    for (int j = 1; j < count; ++j) {  // insertion sort of at most kMaxTopLogprobs ids
      const int id = ids[j];
      const float x = sample::clean(raw[id]);
      int k = j;
      for (; k > 0; --k) {
        const float y = sample::clean(raw[ids[k - 1]]);
        if (y > x || (y == x && ids[k - 1] < id)) break;
        ids[k] = ids[k - 1];
      }
      ids[k] = id;
    }
    for (int j = 0; j < count; ++j) {
      top_ids[j] = ids[j];
      top_lps[j] =
          static_cast<float>(static_cast<double>(sample::clean(raw[ids[j]])) - log_normalizer);
    }
  }

  // Every thread of the CTA calls it (block reductions inside).
  __device__ static void sample_row(int s, const OpContext& ctx) {
    const DeviceStepDesc& st = ctx.step;
    const DeviceSampling sp = st.sampling[s];
    const int V = ctx.model.vocab_size;  // whole rows: every rank's LM head wrote its columns
    auto& sm = *reinterpret_cast<sample::SampleSmem*>(ctx.smem);
    const float* raw = st.logits + static_cast<int64_t>(s) * V;  // (V)
    const float* row = raw;
    if (sp.scratch_row >= 0) {
      float* scratch = st.sampling_scratch + static_cast<int64_t>(sp.scratch_row) * V;
      penalize(raw, scratch, V, sp, st.sampling_ids);
      row = scratch;
    }
    float best, raw_best;
    int top, raw_top;
    argmax_row(row, V, sm, best, top);
    if (row != raw) {
      argmax_row(raw, V, sm, raw_best, raw_top);
    } else {
      raw_best = best, raw_top = top;
    }
    int token;
    if (best == -INFINITY) {
      token = raw_top;  // every token banned: greedy over the cleaned raw logits
    } else if (!(sp.temperature > 0.0f)) {
      token = top;
    } else {
      token = draw(row, V, best, top, sp, sm);
    }
    // log-softmax of the cleaned raw logits: +inf normalizer (every logprob -inf) when
    // none is finite.
    double log_normalizer = INFINITY;
    if (raw_best != -INFINITY) {
      double sum = 0.0;
      sample::for_each_in_row(raw, V,
                              [&](int, float v) { sum += expf(sample::clean(v) - raw_best); });
      log_normalizer = static_cast<double>(raw_best) + log(sample::block_sum(sum, sm.dred));
    }
    if (threadIdx.x == 0) {
      st.sampled_ids[s] = token;
      st.sampled_logprobs[s] =
          static_cast<float>(static_cast<double>(sample::clean(raw[token])) - log_normalizer);
    }
    const int n = min(min(sp.logprobs, kMaxTopLogprobs), V);
    if (n > 0) {
      top_logprobs(raw, V, n, log_normalizer, st.top_ids + s * kMaxTopLogprobs,
                   st.top_logprobs + s * kMaxTopLogprobs, sm);
    }
    __syncthreads();  // the next row reuses the shared memory
  }
};

}  // namespace megaserve::kernels
