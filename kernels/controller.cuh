// The megakernel's controller: how one CTA walks its queue of a step [ISA_BARRIERS].
// For each instruction, every thread reads it and a projection's prefetch call starts its
// first weight segments where the bulk-copy matvec will take it [MATVEC_BULK]; thread 0
// copies it to shared memory and waits until every wait's barrier has reached its target
// (acquire loads, polling with exponential backoff); the CTA runs the op (a projection's op once
// per wgmma pass plus once, the passes run here between the calls [WGMMA_WALK]); after
// __syncthreads (every thread's writes done) thread 0 fences and release-adds 1 to each signal
// barrier, on the rank the signal names (every rank for kSignalAllRanks) [TP_PLACEMENT]. A wait
// that the host aborts (watchdog) ends the CTA's step early and reports it in HostControl::aborted.
#pragma once

#include "engine/isa/isa.h"
#include "kernels/device_utils.cuh"
#include "kernels/op_attention.cuh"
#include "kernels/op_attention_merge.cuh"
#include "kernels/op_context.cuh"
#include "kernels/op_embedding.cuh"
#include "kernels/op_gate_up_silu.cuh"
#include "kernels/op_hidden_projection.cuh"
#include "kernels/op_lm_head.cuh"
#include "kernels/op_qkv_rope.cuh"
#include "kernels/op_rms_norm.cuh"
#include "kernels/op_sample.cuh"
#include "kernels/op_tp_reduce.cuh"
#include "kernels/tile_wgmma.cuh"

namespace megaserve::kernels {

// What a CTA keeps in static shared memory.
struct CtaState {
  DeviceModel model;
  DeviceStepDesc step;
  engine::isa::Instruction inst;
  uint64_t tma_full[kWgmmaBarriers];  // the wgmma core's stage barriers [WGMMA_PIPE]
  uint32_t tma_consumed[2];           // per depth: shallow, deep
  uint32_t tma_released[3];           // per shallow stage
  WgmmaPass pass;                     // the wgmma pass an op set up [WGMMA_WALK]
  NormCache norm_cache;               // the last chunk's row scales (op_context.cuh)
  BulkState bulk;                     // the bulk-copy matvec's barriers, prefetch [MATVEC_BULK]
  int32_t stop;  // 1: abort (or, persistent, shutdown) seen; every thread leaves
  // The rank this CTA acts for, its queue of that rank's step, the ranks in the launch and
  // every rank's barriers [TP_PLACEMENT].
  int32_t rank, queue, tp;
  uint32_t* barriers[kMaxTpRanks];
};

inline constexpr int kAbortCheckInterval = 256;  // polls between reads of HostControl::abort
inline constexpr unsigned kMaxSleepNs = 256;     // backoff cap: bounds the wake-up latency

// Spins (thread 0) until `*p` satisfies `done(value)`, sleeping with exponential backoff.
// Returns false when the host set abort.
template <typename Done>
__device__ bool poll_until(const uint32_t* p, HostControl* host, Done done) {
  unsigned sleep_ns = 32;
  for (unsigned iter = 1;; ++iter) {
    if (done(load_acquire_gpu(p))) return true;
    if (iter % kAbortCheckInterval == 0 && host->abort) {
      host->aborted = 1;
      return false;
    }
    __nanosleep(sleep_ns);
    if (sleep_ns < kMaxSleepNs) sleep_ns *= 2;
  }
}

// The ops that run project() (kernels/projection.cuh), so take a prefetch call.
__device__ __forceinline__ bool is_projection(engine::isa::Opcode op) {
  return op == QkvRopeOp::kOpcode || op == HiddenProjectionOp::kOpcodeO ||
         op == HiddenProjectionOp::kOpcodeDown || op == GateUpSiluOp::kOpcode ||
         op == LmHeadOp::kOpcode;
}

// Runs the op of `inst`, or the part of a projection up to its next wgmma pass: true when
// that pass is set up in *ctx.pass, for the caller to run it and call again [WGMMA_WALK]. A
// function of its own (a call from the entry function), so that the entry's register
// allocation is the controller's and the wgmma k-loop's alone.
__device__ __noinline__ bool dispatch(const engine::isa::Instruction& inst, const OpContext& ctx) {
  using engine::isa::Opcode;
  if (ctx.call == kPrefetchCall && !is_projection(inst.opcode())) return false;
  switch (inst.opcode()) {
    case EmbeddingOp::kOpcode:
      EmbeddingOp::run(inst, ctx);
      return false;
    case QkvRopeOp::kOpcode:
      return QkvRopeOp::run(inst, ctx);
    case AttentionOp::kOpcode:
      AttentionOp::run(inst, ctx);
      return false;
    case AttentionMergeOp::kOpcode:
      AttentionMergeOp::run(inst, ctx);
      return false;
    case HiddenProjectionOp::kOpcodeO:
    case HiddenProjectionOp::kOpcodeDown:
      return HiddenProjectionOp::run(inst, ctx);
    case GateUpSiluOp::kOpcode:
      return GateUpSiluOp::run(inst, ctx);
    case LmHeadOp::kOpcode:
      return LmHeadOp::run(inst, ctx);
    case SampleOp::kOpcode:
      SampleOp::run(inst, ctx);
      return false;
    case TpReduceOp::kOpcode:
      TpReduceOp::run(inst, ctx);
      return false;
    case RmsNormOp::kOpcode:
      RmsNormOp::run(inst, ctx);
      return false;
    default:     // an invalid opcode: a builder bug
      __trap();  // fails the step loudly (the host sees a device error), never skips silently
  }
  return false;
}

// Runs queue cs.queue of cs.step (rank cs.rank's). Returns false when aborted (cs.stop set).
// Inlined into the entry functions, with the wgmma k-loop (tile_wgmma.cuh [WGMMA_WALK]).
__device__ __forceinline__ bool run_queue(CtaState& cs, HostControl* host, float* smem,
                                          int32_t smem_floats) {
  using engine::isa::barrier_reached;
  const int q = cs.queue;
  if (q >= cs.step.num_queues) return true;
  uint32_t* const barriers = cs.barriers[cs.rank];  // waits are on this rank's barriers
  const WgmmaPipe pipe{cs.tma_full, cs.tma_consumed, cs.tma_released};
  const int32_t begin = cs.step.queue_begin[q], end = cs.step.queue_begin[q + 1];
  uint64_t* const profile = cs.step.profile;
  for (int32_t i = begin; i < end; ++i) {
    if (threadIdx.x == 0 && profile != nullptr) profile[kProfileWords * i] = global_time_ns();
    // A projection's first weight segments start before its waits [MATVEC_BULK]: every
    // thread reads the instruction (the previous one's last barrier freed the shared memory).
    {
      const engine::isa::Instruction inst = cs.step.instructions[i];
      if (is_projection(inst.opcode())) {
        dispatch(inst, OpContext{cs.model, cs.step, smem, smem_floats, kPrefetchCall, &cs.pass,
                                 &cs.norm_cache, &cs.bulk});
      }
    }
    if (threadIdx.x == 0) {
      cs.inst = cs.step.instructions[i];
      bool ok = true;
      for (int w = 0; ok && w < cs.inst.num_waits(); ++w) {
        const uint32_t target = static_cast<uint32_t>(cs.inst.wait_target(w));
        ok = poll_until(barriers + cs.inst.wait_barrier(w), host,
                        [&](uint32_t v) { return barrier_reached(v, target); });
      }
      if (!ok) cs.stop = 1;
      __threadfence();
      if (profile != nullptr) profile[kProfileWords * i + 1] = global_time_ns();
    }
    __syncthreads();
    if (cs.stop) {
      bulk_drain(cs.bulk);  // nothing lands in shared memory after the CTA leaves
      return false;
    }
    for (int32_t call = 0; dispatch(cs.inst, OpContext{cs.model, cs.step, smem, smem_floats, call,
                                                       &cs.pass, &cs.norm_cache, &cs.bulk});
         ++call) {
      run_wgmma_pass(cs.pass, pipe);
    }
    __syncthreads();  // every thread's writes of this instruction are done
    if (threadIdx.x == 0) {
      if (profile != nullptr) {
        profile[kProfileWords * i + 2] = global_time_ns();
        profile[kProfileWords * i + 3] = sm_id();
      }
      __threadfence();
      for (int s = 0; s < cs.inst.num_signals(); ++s) {
        const int32_t b = cs.inst.signal_barrier(s), to = cs.inst.signal_rank(s);
        if (to != engine::isa::kSignalAllRanks) {
          add_release_gpu(cs.barriers[to] + b, 1);
          continue;
        }
        for (int r = 0; r < cs.tp; ++r) add_release_gpu(cs.barriers[r] + b, 1);
      }
    }
  }
  return true;
}

}  // namespace megaserve::kernels
