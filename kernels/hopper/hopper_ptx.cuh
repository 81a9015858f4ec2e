// Thin wrappers over the sm_90a PTX that the Hopper compute core uses: mbarriers, async-proxy
// fences, TMA bulk tensor loads, wgmma with shared-memory descriptors, and setmaxnreg.
// Each wrapper says what it orders and why it does or does not carry a "memory" clobber: a
// clobber stops the compiler from moving any memory access across the asm, which is what an
// acquire/release point needs and what a hot loop of tensor-core issues must not pay for.
#pragma once

#include <cuda.h>  // CUtensorMap (type only; nothing from libcuda is linked by this header)

#include <cstdint>

#include "kernels/mma_primitives.cuh"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "kernels/hopper needs -gencode=arch=compute_90a,code=sm_90a (wgmma, setmaxnreg)"
#endif

// Define MEGASERVE_MBAR_TIMEOUT_CYCLES (e.g. 20e9 ~ 10 s at 1.98 GHz) to turn a pipeline
// deadlock into a trap instead of a hang. Costs a clock read only after a failed poll.
#ifndef MEGASERVE_MBAR_TIMEOUT_CYCLES
#define MEGASERVE_MBAR_TIMEOUT_CYCLES 0
#endif

namespace megaserve::hopper {

using kernels::smem_addr;  // shared-window byte address (kernels/mma_primitives.cuh)

// ---------------------------------------------------------------------------------------------
// mbarrier (64-bit barrier object in shared memory, 8-byte aligned)
// ---------------------------------------------------------------------------------------------

// One thread initializes; the barrier then expects `arrive_count` arrivals per phase.
// Ordering: the init is a generic-proxy write. Before any other thread or the TMA unit (async
// proxy) uses the barrier, call fence_barrier_init() and then a CTA barrier (__syncthreads).
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t arrive_count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(arrive_count)
               : "memory");
}

// Makes preceding mbarrier.init visible to the async proxy (TMA complete_tx) and to the other
// threads once they pass the following __syncthreads. "memory": nothing may move above it.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// Arrive once (release semantics at CTA scope: this thread's earlier memory accesses are
// visible to a thread whose wait observes the completed phase). "memory" clobber: a release
// must not have earlier accesses sunk below it by the compiler.
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile(
      "{\n"
      ".reg .b64 state;\n"
      "mbarrier.arrive.release.cta.shared::cta.b64 state, [%0];\n"
      "}\n" ::"r"(smem_addr(bar))
      : "memory");
}

// Arrive once and raise this phase's expected transaction count by `tx_bytes`; the phase
// completes when all arrivals are in and the TMA loads that name this barrier have delivered
// exactly that many bytes (a box counts in full even where it is zero-filled out of bounds).
// Issue it before or after the loads of the phase: the tx count may go transiently negative.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t tx_bytes) {
  asm volatile(
      "{\n"
      ".reg .b64 state;\n"
      "mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 state, [%0], %1;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(tx_bytes)
      : "memory");
}

// One poll: true once the phase with parity `parity` has completed. On a fresh barrier, parity
// 1 (the phase "before" phase 0) reads as complete, which is how a producer starts with all
// stages free. Acquire semantics; "memory" clobber so that no later access (e.g. an epilogue
// reading smem written by the TMA) is hoisted above a successful poll.
__device__ __forceinline__ bool mbarrier_try_wait_parity(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n"
      "}\n"
      : "=r"(done)
      : "r"(smem_addr(bar)), "r"(parity)
      : "memory");
  return done != 0;
}

// Blocks until the phase with parity `parity` completes. try_wait itself suspends the thread
// for a hardware-chosen time, so this loop does not hammer shared memory.
// The watchdog only traps (the launch then fails with an illegal-instruction error): a printf
// here would be a function call, and ptxas serializes every wgmma of a kernel whose wgmma
// pipeline crosses a call (warning C7510), even a call in another warpgroup's branch.
__device__ __forceinline__ void mbarrier_wait_parity(uint64_t* bar, uint32_t parity) {
  if (mbarrier_try_wait_parity(bar, parity)) return;
#if MEGASERVE_MBAR_TIMEOUT_CYCLES > 0
  const long long start = clock64();
#endif
  while (!mbarrier_try_wait_parity(bar, parity)) {
#if MEGASERVE_MBAR_TIMEOUT_CYCLES > 0
    if (clock64() - start > (long long)(MEGASERVE_MBAR_TIMEOUT_CYCLES)) __trap();
#endif
  }
}

// Retires a barrier whose phases have all completed, before its 8 bytes of shared memory serve
// anything else (another op's data, or a barrier initialized afresh).
__device__ __forceinline__ void mbarrier_inval(uint64_t* bar) {
  asm volatile("mbarrier.inval.shared::cta.b64 [%0];" ::"r"(smem_addr(bar)) : "memory");
}

// Hint: bring the tensor map descriptor into the TMA unit's cache before the first load.
__device__ __forceinline__ void prefetch_tensormap(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(map));
}

// ---------------------------------------------------------------------------------------------
// TMA bulk tensor loads (global -> shared), completing on an mbarrier
// ---------------------------------------------------------------------------------------------
// `map` is a generic address of a CUtensorMap: a __grid_constant__ kernel parameter or a map in
// global memory written before the launch. Coordinates are in elements, innermost first.
// Out-of-bounds parts of the box are zero-filled and still count toward complete_tx.
// No "memory" clobber: the issuing thread does not touch the destination; consumers are ordered
// by the mbarrier wait. The destination must not be in use: the producer waits on the stage's
// "empty" barrier first, whose arrivals come after the consumers' last reads (wgmma retired).

__device__ __forceinline__ void tma_load_2d(void* smem_dst, const CUtensorMap* map, uint64_t* bar,
                                            int32_t c0, int32_t c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];" ::"r"(smem_addr(smem_dst)),
      "l"(map), "r"(smem_addr(bar)), "r"(c0), "r"(c1));
}

// Bulk copy of `bytes` contiguous bytes (a multiple of 16; both addresses 16-byte aligned)
// from global to shared memory, completing on `bar` like the tensor loads above. No tensor map:
// for rows that are already contiguous in memory (a weight row of a matvec).
__device__ __forceinline__ void bulk_load(void* smem_dst, const void* src, uint32_t bytes,
                                          uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(smem_addr(smem_dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar)));
}

// L2 prefetches [L2_AHEAD]: hints with no completion and no shared memory, for bytes an SM
// will load soon, so that its loads then hit L2 instead of waiting for DRAM. No "memory"
// clobber: they change nothing a thread can observe.
// `bytes` contiguous bytes (a multiple of 16, `src` 16-byte aligned).
__device__ __forceinline__ void prefetch_l2_bulk(const void* src, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src), "r"(bytes));
}
// The box of `map` at coordinates (c0, c1), as tma_load_2d would copy it.
__device__ __forceinline__ void prefetch_l2_tile_2d(const CUtensorMap* map, int32_t c0,
                                                    int32_t c1) {
  asm volatile("cp.async.bulk.prefetch.tensor.2d.L2.global.tile [%0, {%1, %2}];" ::"l"(map),
               "r"(c0), "r"(c1));
}

// ---------------------------------------------------------------------------------------------
// wgmma (warpgroup = 4 consecutive warps starting at a warp index divisible by 4)
// ---------------------------------------------------------------------------------------------

// Shared-memory matrix descriptor for a K-major bf16 operand stored as TMA writes it with
// CU_TENSOR_MAP_SWIZZLE_128B and a 64-element (128-byte) inner box: row r of the tile at byte
// r * 128, its eight 16-byte chunks XOR-permuted by (r % 8). Eight rows form a 1024-byte
// swizzle atom; atoms follow each other along M/N, so:
//   bits  0-13  start address >> 4
//   bits 16-29  leading-dimension byte offset >> 4: unused for swizzled K-major (set to 1)
//   bits 32-45  stride-dimension byte offset >> 4: 1024 B between 8-row atoms
//   bits 49-51  base offset: 0, valid because every atom starts 1024-byte aligned
//   bits 62-63  swizzle mode: 1 = 128-byte swizzle
// Stepping K by 16 elements inside the 128-byte row = adding 32 bytes to the start address
// (the hardware applies the XOR on absolute address bits, hence the 1024-byte alignment).
__device__ __forceinline__ uint64_t make_smem_desc_k_sw128(uint32_t smem_byte_addr) {
  uint64_t desc = 0;
  desc |= static_cast<uint64_t>((smem_byte_addr & 0x3FFFF) >> 4);
  desc |= static_cast<uint64_t>(16 >> 4) << 16;
  desc |= static_cast<uint64_t>(1024 >> 4) << 32;
  desc |= static_cast<uint64_t>(1) << 62;
  return desc;
}

// Must precede the first wgmma of a sequence whenever the accumulator registers (or smem the
// warpgroup wrote) were touched by other instructions since the last wgmma. "memory": keeps
// generic smem writes of this thread (if any) above it, as PTX requires.
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}

// Closes the wgmmas issued since the previous commit into one group. No clobber: it orders
// nothing by itself; wgmma_wait does.
__device__ __forceinline__ void wgmma_commit_group() {
  asm volatile("wgmma.commit_group.sync.aligned;");
}

// Waits until at most N committed groups of this warp are pending. After it, the retired groups'
// smem reads are done (the stage may be released) and their accumulators may be read, once
// wgmma_fence_operands() has pinned those reads below this point. No "memory" clobber: smem
// release is ordered by the volatile mbarrier arrive that follows it in program order.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  static_assert(N >= 0 && N <= 7, "wgmma.wait_group takes 0..7");
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N));
}

// Compiler-only fence on accumulator registers: the empty volatile asm "modifies" each value,
// so ordinary code cannot read them before, or write them after, this point (volatile asms keep
// their program order). Emits no instruction. No "memory" clobber: only registers are at stake.
template <int R>
__device__ __forceinline__ void wgmma_fence_operands(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i]));
}

// D(64x256, fp32, registers) (+)= A(64x16, bf16, smem) * B(16x256, bf16, smem), both K-major, on
// the warpgroup. `accumulate` = 0 overwrites D (first k-step of a tile), 1 adds to it.
// Ordering: asynchronous. D must not be read or written by ordinary code until wgmma_wait<N>()
// says this group retired, followed by wgmma_fence_operands(d) so that the compiler keeps its
// reads of D after the wait (D is an asm operand here, not of the wait). No "memory" clobber:
// the instruction reads shared memory only through the descriptors, and the ordering of those
// reads against the TMA writes is given by the full mbarrier wait, not by the compiler.
__device__ __forceinline__ void wgmma_m64n256k16_bf16(float (&d)[128], uint64_t desc_a,
                                                      uint64_t desc_b, uint32_t accumulate) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, "
      "%8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, "
      "%24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, "
      "%40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, "
      "%56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, "
      "%72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, "
      "%88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, "
      "%104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, "
      "%120, %121, %122, %123, %124, %125, %126, %127"
      "}, %128, %129, p, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]),
        "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]),
        "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]),
        "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]),
        "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]),
        "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]),
        "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]),
        "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]),
        "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// D(64x128, fp32, registers) (+)= A(64x16) * B(16x128): as wgmma_m64n256k16_bf16 with N = 128.
__device__ __forceinline__ void wgmma_m64n128k16_bf16(float (&d)[64], uint64_t desc_a,
                                                      uint64_t desc_b, uint32_t accumulate) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "
      "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "
      "%56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// Barrier `id` (1..15; 0 is __syncthreads) among `threads` threads (a multiple of 32), e.g. one
// warpgroup. "memory": shared-memory accesses stay on their side of it.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// Orders this thread's earlier generic-proxy shared-memory accesses before later async-proxy
// ones (wgmma operand reads, TMA writes) once a barrier has joined the threads. "memory": the
// compiler must not move shared-memory stores across it.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// The same for global memory: this thread's generic writes before the async proxy's (TMA)
// reads that follow a barrier.
__device__ __forceinline__ void fence_proxy_async_global() {
  asm volatile("fence.proxy.async.global;" ::: "memory");
}

// ---------------------------------------------------------------------------------------------
// Register reallocation between warpgroups (sm_90a). Takes effect only when the kernel was
// compiled with a register cap (__launch_bounds__(threads, 1)) and each warpgroup's role is one
// branch of a single if/else; ptxas warns (C7508) otherwise. All threads of the warpgroup must
// execute it. The CTA-wide total must stay within the 64K-register file:
// sum over warpgroups of (count * 128) <= 65536, e.g. 40 + 232 + 232.
// ---------------------------------------------------------------------------------------------
template <uint32_t kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg: 24..256, step 8");
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegs));
}
template <uint32_t kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg: 24..256, step 8");
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegs));
}

}  // namespace megaserve::hopper
