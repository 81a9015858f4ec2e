// L2 prefetch of the weights a projection instruction will read, issued by thread 0 while the
// CTA waits for the instruction's dependencies (controller.cuh). At Llama-3.1-8B batch-1
// decode the output projection's tiles waited 1.4 ms per CTA a step for attention on 8 SMs
// (bench/RESULTS.md): time in which their weights can already come from memory.
#pragma once

#include <stdint.h>

#include "engine/isa/isa.h"
#include "kernels/megakernel.h"

namespace megaserve::kernels {

// The most bytes one instruction prefetches, from the start of each weight range it reads:
// 132 CTAs x 256 KB stay well inside an H100's or H200's 50 MB L2, so prefetched lines are
// not evicted by other CTAs' prefetches before they are read.
inline constexpr int64_t kPrefetchBytes = 256 * 1024;

// cp.async.bulk.prefetch.L2 of [p, p + bytes) in 64 KB pieces (16-byte aligned starts and
// sizes), at most `cap` bytes.
__device__ inline void prefetch_l2(const void* p, int64_t bytes, int64_t cap) {
  if ((reinterpret_cast<uintptr_t>(p) & 15) != 0) return;
  const char* c = static_cast<const char*>(p);
  bytes = (bytes < cap ? bytes : cap) & ~int64_t{15};
  for (int64_t off = 0; off < bytes; off += 64 * 1024) {
    const int64_t left = bytes - off;
    const uint32_t n = static_cast<uint32_t>(left < 64 * 1024 ? left : 64 * 1024);
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(c + off), "r"(n) : "memory");
  }
}

// The weight rows of an output, down, gate/up or LM-head tile; other ops prefetch nothing.
__device__ inline void prefetch_weights(const engine::isa::Instruction& inst,
                                        const DeviceModel& md) {
  using engine::isa::Opcode;
  const int H = md.hidden;
  switch (inst.opcode()) {
    case Opcode::kOProj:
    case Opcode::kDownProj: {
      const auto a = engine::isa::args_of<engine::isa::HiddenTileArgs>(inst);
      const DeviceLayer& w = md.layers[inst.layer()];
      const bool o_proj = inst.opcode() == Opcode::kOProj;
      const int64_t K = o_proj ? md.q_heads * md.head_dim : md.ffn;
      prefetch_l2((o_proj ? w.wo : w.w_down) + a.col_begin * K, (a.col_end - a.col_begin) * K * 2,
                  kPrefetchBytes);
      return;
    }
    case Opcode::kGateUpSilu: {
      const auto a = engine::isa::args_of<engine::isa::GateUpArgs>(inst);
      const DeviceLayer& w = md.layers[inst.layer()];
      const int64_t bytes = int64_t{a.col_end - a.col_begin} * H * 2;
      prefetch_l2(w.w_gate + int64_t{a.col_begin} * H, bytes, kPrefetchBytes / 2);
      prefetch_l2(w.w_up + int64_t{a.col_begin} * H, bytes, kPrefetchBytes / 2);
      return;
    }
    case Opcode::kLmHead: {
      const auto a = engine::isa::args_of<engine::isa::LmHeadArgs>(inst);
      prefetch_l2(md.lm_head + int64_t{a.col_begin} * H, int64_t{a.col_end - a.col_begin} * H * 2,
                  kPrefetchBytes);
      return;
    }
    default:
      return;
  }
}

}  // namespace megaserve::kernels
