// PTX wrappers of the tensor-core projection core (kernels/tile_mma.cuh) and attention
// (kernels/op_attention_mma.cuh): per-thread cp.async global -> shared copies, ldmatrix, bf16
// packing and mma.sync m16n8k16. Shared-memory operands are 32-bit shared-window addresses.
#pragma once

#include <stdint.h>

namespace megaserve::kernels {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- Per-thread asynchronous copies

// 16 bytes global -> shared, L2 only (so it sees this step's K/V appends, device_utils.cuh
// [COHERENCE]); src_bytes < 16 zero-fills the rest.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}

// Waits until at most `n` (0..6; more waits for 6) of this thread's committed groups are
// pending (the count is an immediate in PTX).
__device__ __forceinline__ void cp_async_wait(int n) {
  switch (n) {
    case 0:
      asm volatile("cp.async.wait_group 0;" ::: "memory");
      break;
    case 1:
      asm volatile("cp.async.wait_group 1;" ::: "memory");
      break;
    case 2:
      asm volatile("cp.async.wait_group 2;" ::: "memory");
      break;
    case 3:
      asm volatile("cp.async.wait_group 3;" ::: "memory");
      break;
    case 4:
      asm volatile("cp.async.wait_group 4;" ::: "memory");
      break;
    case 5:
      asm volatile("cp.async.wait_group 5;" ::: "memory");
      break;
    default:
      asm volatile("cp.async.wait_group 6;" ::: "memory");
      break;
  }
}

// ---- Tensor cores

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");  // reads shared memory that plain stores wrote (the B operands)
}

// The same, each 8x8 matrix transposed (the V operand of attention).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// An 8x8 bf16 matrix held as mma fragments (lane l: row l / 4, columns 2 (l % 4) and +1),
// transposed in registers: lane l gets row l / 4 of the transpose.
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
  uint32_t r;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(x));
  return r;
}

// Two floats as bf16x2 (round to nearest even): `lo` in the low half (the smaller k).
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// The two bf16 of a pack, back to floats (low half first).
__device__ __forceinline__ float2 unpack_bf16x2(uint32_t v) {
  return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
}

// Four consecutive normalized values, bf16(bf16(x * scale) * weight), packed as two bf16x2
// (w0, w1: the weights of x.x, x.y and x.z, x.w): transformers' bf16 RMSNorm, the rounding
// of the wgmma passes' own conversion (tile_wgmma.cuh) and of kRmsNorm (op_rms_norm.cuh),
// which must give the same bits.
__device__ __forceinline__ uint2 normed_bf16x4(float4 x, float scale, float2 w0, float2 w1) {
  const float2 s0 = unpack_bf16x2(pack_bf16x2(x.x * scale, x.y * scale));  // bf16(x * scale)
  const float2 s1 = unpack_bf16x2(pack_bf16x2(x.z * scale, x.w * scale));
  return make_uint2(pack_bf16x2(s0.x * w0.x, s0.y * w0.y), pack_bf16x2(s1.x * w1.x, s1.y * w1.y));
}

// c += A (16x16 bf16, row) * B (16x8 bf16, col), fp32 accumulators.
__device__ __forceinline__ void mma_bf16(float c[4], const uint32_t a[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

}  // namespace megaserve::kernels
