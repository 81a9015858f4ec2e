// The megakernel: one CTA per SM, each interpreting its queue of the step (controller.cuh),
// in two launch modes sharing that code: one launch per step, and a persistent kernel fed
// through the step ring [STEP_RING] (megakernel.h).
// A wgmma pipeline barrier that never completes (a TMA fault) traps after ~10 s instead of
// hanging the persistent kernel.
#define MEGASERVE_MBAR_TIMEOUT_CYCLES 20000000000LL
#include "kernels/controller.cuh"
#include "kernels/megakernel.h"

namespace megaserve::kernels {
namespace {

// Hopper's shared memory per block (opt-in), less the CtaState above the dynamic area, must
// hold the decode stream's three stage buffers at head dim 128: with two, every stage waits a
// memory latency on an empty copy pipeline (op_attention_decode.cuh).
inline constexpr size_t kHopperSmemOptin = 227 * 1024;
static_assert(sizeof(CtaState) + AttentionDecodeStream<128>::smem_bytes(3) <= kHopperSmemOptin,
              "the decode stream's three stage buffers no longer fit");
// The same for the prefill passes (AttentionMmaPass), which have less than 1 KB to spare.
static_assert(sizeof(CtaState) + attention_mma::smem_bytes(128, 3) <= kHopperSmemOptin,
              "the attention passes' three stage buffers no longer fit");

// CTA blockIdx.x acts as rank blockIdx.x / ctas_per_rank [TP_PLACEMENT].
__device__ void load_cta_state(CtaState& cs, const MegakernelParams& p) {
  if (threadIdx.x == 0) {
    cs.tp = p.tp;
    cs.rank = static_cast<int32_t>(blockIdx.x) / p.ctas_per_rank;
    cs.queue = static_cast<int32_t>(blockIdx.x) % p.ctas_per_rank;
#pragma unroll
    for (int r = 0; r < kMaxTpRanks; ++r) cs.barriers[r] = p.barriers[r];
    cs.model = p.models[cs.rank];
    cs.stop = 0;
    bulk_init(cs.bulk);
    ActCache& c = cs.pass.cache;
    c.rows = cs.model.act_cache;
    c.map = cs.model.act_cache_map;
    c.flags = cs.model.act_cache_flags;
    c.capacity = cs.model.act_cache_rows;
    c.width = cs.model.hidden;
    wgmma_pipe_init(WgmmaPipe{cs.tma_full, cs.tma_consumed, cs.tma_released});
  }
}

// `slot`: the slot's descriptors, one per rank.
__device__ void load_step(CtaState& cs, const DeviceStepDesc* slot) {
  if (threadIdx.x == 0) {
    const DeviceStepDesc* desc = slot + cs.rank;
    cs.step = *desc;
    cs.norm_cache.n = -1;               // the residual rows are this step's from here on
    cs.pass.cache.epoch = desc->epoch;  // keys of earlier steps' blocks no longer match
    cs.pass.wide_maps = (desc->flags & kStepWgmmaNarrowBoxes) != 0 ? 0 : cs.model.wide_maps;
    cs.pass.l2_ahead = l2_ahead_of(desc->flags, kWgmmaL2Ahead);
  }
  __syncthreads();
}

__global__ void __launch_bounds__(kMegakernelThreads, 1)
    megakernel_step(MegakernelParams params, int32_t smem_floats) {
  extern __shared__ float4 dynamic_smem[];
  __shared__ CtaState cs;
  load_cta_state(cs, params);
  load_step(cs, params.slots[params.slot]);
  run_queue(cs, params.host, reinterpret_cast<float*>(dynamic_smem), smem_floats);
}

__global__ void __launch_bounds__(kMegakernelThreads, 1)
    megakernel_persistent(MegakernelParams params, int32_t smem_floats) {
  extern __shared__ float4 dynamic_smem[];
  __shared__ CtaState cs;
  load_cta_state(cs, params);
  HostControl* host = params.host;
  DeviceControl* control = params.control;
  uint32_t seq = params.first_seq;
  uint32_t steps = 0;
  for (;;) {
    const uint32_t next = seq + 1;
    // Every thread has read the previous step's cs.stop before thread 0 may write it again
    // (compute-sanitizer racecheck reported that write-after-read hazard).
    __syncthreads();
    if (threadIdx.x == 0) {
      bool ok = true;
      if (blockIdx.x == 0) {
        // The only reader of host memory: waits for the doorbell, then broadcasts.
        unsigned sleep_ns = 32;
        for (unsigned iter = 1; host->doorbell == seq; ++iter) {
          if (iter % kAbortCheckInterval == 0 && host->abort) {
            ok = false;
            break;
          }
          __nanosleep(sleep_ns);
          if (sleep_ns < 1024) sleep_ns *= 2;
        }
        if (ok) {
          __threadfence_system();  // the slot's upload precedes the doorbell
          control->shutdown = host->shutdown;
          store_release_gpu(&control->go, next);
        }
      } else {
        ok = poll_until(&control->go, host, [&](uint32_t v) { return v == next; });
      }
      __threadfence();
      if (!ok || *reinterpret_cast<volatile uint32_t*>(&control->shutdown) != 0) cs.stop = 1;
    }
    __syncthreads();
    if (cs.stop) return;
    load_step(cs, params.slots[next & 1]);
    if (!run_queue(cs, host, reinterpret_cast<float*>(dynamic_smem), smem_floats)) {
      return;
    }
    __syncthreads();
    ++steps;
    if (threadIdx.x == 0) {
      __threadfence();
      add_release_gpu(&control->done, 1);
      if (blockIdx.x == 0) {
        const uint32_t target = steps * gridDim.x;
        if (!poll_until(&control->done, host, [&](uint32_t v) { return v == target; })) {
          cs.stop = 1;
        } else {
          __threadfence_system();
          host->completed = next;
          __threadfence_system();
        }
      }
    }
    __syncthreads();
    if (cs.stop) return;
    seq = next;
  }
}

cudaError_t launch(const void* kernel, const MegakernelParams& params, int grid, size_t smem_bytes,
                   cudaStream_t stream) {
  int32_t smem_floats = static_cast<int32_t>(smem_bytes / sizeof(float));
  MegakernelParams p = params;
  void* args[] = {&p, &smem_floats};
  return cudaLaunchCooperativeKernel(kernel, dim3(grid), dim3(kMegakernelThreads), args, smem_bytes,
                                     stream);
}

}  // namespace

cudaError_t configure_megakernel(size_t optin_bytes, size_t* dynamic_bytes) {
  const void* kernels[] = {reinterpret_cast<const void*>(&megakernel_step),
                           reinterpret_cast<const void*>(&megakernel_persistent)};
  size_t static_bytes = 0;
  for (const void* k : kernels) {
    cudaFuncAttributes attr{};
    if (cudaError_t e = cudaFuncGetAttributes(&attr, k); e != cudaSuccess) return e;
    static_bytes = attr.sharedSizeBytes > static_bytes ? attr.sharedSizeBytes : static_bytes;
  }
  // 16-byte granularity keeps float4 views of the dynamic area in bounds.
  *dynamic_bytes = (optin_bytes - static_bytes) / 16 * 16;
  for (const void* k : kernels) {
    cudaError_t e = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(*dynamic_bytes));
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

cudaError_t launch_megakernel_step(const MegakernelParams& params, int grid, size_t smem_bytes,
                                   cudaStream_t stream) {
  return launch(reinterpret_cast<const void*>(&megakernel_step), params, grid, smem_bytes, stream);
}

cudaError_t launch_megakernel_persistent(const MegakernelParams& params, int grid,
                                         size_t smem_bytes, cudaStream_t stream) {
  return launch(reinterpret_cast<const void*>(&megakernel_persistent), params, grid, smem_bytes,
                stream);
}

}  // namespace megaserve::kernels
