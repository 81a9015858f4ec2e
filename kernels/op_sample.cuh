// kSample for a range of sampling rows, each following engine/sampling.h for the rows the host
// marked on_device (no penalties, banned ids, top-k/p, min-p or top logprobs):
//   cleaning: NaN -> -inf, +inf -> the largest finite float;
//   greedy (temperature <= 0 or NaN): argmax, lowest id on ties;
//   otherwise the Gumbel-max draw: argmax over finite logits of
//     (logit - max) * (1 / temperature) + Gumbel(seed, token_index, id)   (in double)
//   with the same counter-based noise as the host (engine/counter_rng.h);
//   if every cleaned logit is -inf: token 0, logprob -inf;
//   logprob = logit[token] - (max + log(sum exp(logit - max))).
// Writes sampled_ids[s] and sampled_logprobs[s]. Rows sampled by the host are left alone.
#pragma once

#include <float.h>

#include "engine/counter_rng.h"
#include "kernels/device_utils.cuh"
#include "kernels/op_context.cuh"

namespace megaserve::kernels {

struct SampleOp {
  static constexpr engine::isa::Opcode kOpcode = engine::isa::Opcode::kSample;

  __device__ static float clean(float x) { return isnan(x) ? -INFINITY : fminf(x, FLT_MAX); }

  // CTA-wide argmax of (key, id), larger key first, then lower id; every thread gets it.
  template <typename Key>
  __device__ static void block_argmax(Key& key, int& id, Key* keys, int* ids) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const Key k2 = __shfl_xor_sync(0xffffffffu, key, o);
      const int i2 = __shfl_xor_sync(0xffffffffu, id, o);
      if (k2 > key || (k2 == key && i2 < id)) key = k2, id = i2;
    }
    if (lane == 0) keys[warp] = key, ids[warp] = id;
    __syncthreads();
    key = keys[0];
    id = ids[0];
    for (int w = 1; w < kMegakernelWarps; ++w) {
      if (keys[w] > key || (keys[w] == key && ids[w] < id)) key = keys[w], id = ids[w];
    }
    __syncthreads();
  }

  __device__ static double block_sum(double v, double* scratch) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double total = 0.0;
    for (int w = 0; w < kMegakernelWarps; ++w) total += scratch[w];
    __syncthreads();
    return total;
  }

  __device__ static void run(const engine::isa::Instruction& inst, const OpContext& ctx) {
    const auto a = engine::isa::args_of<engine::isa::SampleArgs>(inst);
    for (int s = a.sample_begin; s < a.sample_end; ++s) sample_row(s, ctx);
  }

  // Every thread of the CTA calls it (block reductions inside).
  __device__ static void sample_row(int sample, const OpContext& ctx) {
    const DeviceStepDesc& st = ctx.step;
    const DeviceSampling sp = st.sampling[sample];
    if (!sp.on_device) return;
    const int V = ctx.model.vocab;
    const float* logits = st.logits + static_cast<int64_t>(sample) * V;       // (V)
    double* dscratch = reinterpret_cast<double*>(ctx.smem);                   // (warps)
    int* iscratch = reinterpret_cast<int*>(dscratch + kMegakernelWarps);      // (warps)
    float* fscratch = reinterpret_cast<float*>(iscratch + kMegakernelWarps);  // (warps)

    float best = -INFINITY;
    int best_id = V;  // ids increase along a thread's loop: the first strict max is lowest
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
      const float x = clean(logits[i]);
      if (x > best) best = x, best_id = i;
    }
    block_argmax(best, best_id, fscratch, iscratch);
    if (best == -INFINITY) {  // nothing finite: token 0 (sampling.h step 3 fallback)
      if (threadIdx.x == 0) {
        st.sampled_ids[sample] = 0;
        st.sampled_logprobs[sample] = -INFINITY;
      }
      return;
    }
    double sum = 0.0;
    for (int i = threadIdx.x; i < V; i += blockDim.x) sum += expf(clean(logits[i]) - best);
    sum = block_sum(sum, dscratch);

    int token = best_id;
    if (sp.temperature > 0.0f) {
      const double inv_t = 1.0 / static_cast<double>(sp.temperature);
      const uint64_t stream = engine::rng::stream_for(sp.seed, sp.token_index);
      double key = -INFINITY;
      int id = V;
      for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const float x = clean(logits[i]);
        if (x == -INFINITY) continue;
        const double k = (static_cast<double>(x) - best) * inv_t +
                         engine::rng::gumbel_from_uniform(
                             engine::rng::uniform_from_bits(engine::rng::bits_for(stream, i)));
        if (k > key) key = k, id = i;
      }
      block_argmax(key, id, dscratch, iscratch);
      token = id;
    }
    if (threadIdx.x == 0) {
      st.sampled_ids[sample] = token;
      st.sampled_logprobs[sample] = static_cast<float>(static_cast<double>(clean(logits[token])) -
                                                       (static_cast<double>(best) + log(sum)));
    }
  }
};

}  // namespace megaserve::kernels
