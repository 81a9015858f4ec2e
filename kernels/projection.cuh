// The projection entry point of kQkvRope, kOProj, kDownProj, kGateUpSilu and kLmHead: token
// rows x weight rows, on wgmma (kernels/tile_wgmma.cuh) where the step asks for it and the
// weights have TMA maps, in passes that the entry function runs between calls of the op
// [WGMMA_WALK]; else on mma.sync tensor cores (kernels/tile_mma.cuh) when the step asks for
// them (kStepTensorCores), the shape allows (K % 8 == 0, 16-byte-aligned rows) and the tile
// has more than one token row; else on CUDA cores (activations staged kMaxMatvecRows rows at a
// time; weights into registers, kernels/tile_matvec.cuh, or by bulk copies,
// kernels/tile_matvec_bulk.cuh, where the step asks and the shared memory holds the ring). One
// row is a pure weight stream, which the CUDA-core loop keeps more of in flight: at Llama-3.1-8B
// batch-1 decode on an H100 its QKV / O / gate-up / down / LM-head tiles took 51 / 16 / 96 / 61
// / 324 us against the tensor cores' 112 / 21 / 102 / 69 / 444 (bench/RESULTS.md, final check
// of 2026-11-22). Eight rows are not: each weight is multiplied by 8 fp32 rows read from shared
// memory, and an 8B decode step of 8 took 26.7 ms on the CUDA cores against 16.1 on wgmma
// (2026-12-07).
#pragma once

#include <stdint.h>

#include "kernels/device_utils.cuh"
#include "kernels/pass_walk.h"
#include "kernels/tile_matvec.cuh"
#include "kernels/tile_matvec_bulk.cuh"
#include "kernels/tile_mma.cuh"
#include "kernels/tile_wgmma.cuh"

namespace megaserve::kernels {

// Token rows up to this many take the decode-shaped warp blocks (32 weight rows x 16 token
// rows); more take 32 x 32.
inline constexpr int kMmaDecodeRows = 16;

// scale[r] = 1 / rms(row(r)[0, H)) for r < n (n <= kProjectionScaleRows), by the whole CTA;
// `scales` holds kProjectionScaleFloats floats of shared memory (the scales, then partial
// sums). Up to 8 rows (decode) spread each row over every thread (one memory round trip per
// row rather than H / 32 dependent ones per warp); more take a warp per row, each lane
// loading 8 float4 at a time (H / 1024 round trips per row at H % 4 == 0: a 64-row tile of
// H = 4096 read 1 MB in ~256 dependent round trips per warp before, in 32 now). Ends with
// __syncthreads.
template <typename Row>
__device__ void row_inv_rms(int n, int H, float eps, Row row, float* scales) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  double* partial = reinterpret_cast<double*>(scales + kProjectionScaleRows);  // (8, warps)
  if (n <= 8 && H % 4 == 0 && (reinterpret_cast<uintptr_t>(row(0)) & 15) == 0) {
    for (int r = 0; r < n; ++r) {
      const float4* x = reinterpret_cast<const float4*>(row(r));  // (H / 4)
      double ss = 0.0;
      for (int i = threadIdx.x; i < H / 4; i += blockDim.x) ss += square_sum(x[i]);
      ss = warp_sum(ss);
      if (lane == 0) partial[r * kMegakernelWarps + warp] = ss;
    }
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < n) {
      double ss = 0.0;
      for (int w = 0; w < kMegakernelWarps; ++w) ss += partial[threadIdx.x * kMegakernelWarps + w];
      scales[threadIdx.x] = inv_rms_of(ss, H, eps);
    }
  } else if (H % 4 == 0 && (reinterpret_cast<uintptr_t>(row(0)) & 15) == 0) {
    constexpr int kInFlight = 8;
    const int n4 = H / 4;
    for (int r = warp; r < n; r += kMegakernelWarps) {
      const float4* x = reinterpret_cast<const float4*>(row(r));  // (H / 4)
      double ss = 0.0;
      int i = lane;
      for (; i + (kInFlight - 1) * 32 < n4; i += kInFlight * 32) {
        float4 v[kInFlight];
#pragma unroll
        for (int u = 0; u < kInFlight; ++u) v[u] = x[i + u * 32];
#pragma unroll
        for (int u = 0; u < kInFlight; ++u) ss += square_sum(v[u]);
      }
      for (; i < n4; i += 32) ss += square_sum(x[i]);
      ss = warp_sum(ss);
      if (lane == 0) scales[r] = inv_rms_of(ss, H, eps);
    }
  } else {
    for (int r = warp; r < n; r += kMegakernelWarps) {
      const float inv = warp_inv_rms(row(r), H, eps);
      if (lane == 0) scales[r] = inv;
    }
  }
  __syncthreads();
}

// row_inv_rms of rows [begin, begin + n) for op `opcode` of `layer`, or the same scales from
// `cache` when this CTA's last normalized chunk was that one in this step (the residual rows
// an op normalizes do not change while its tiles run: their writers wait for all of them).
// The same floats either way. Ends with __syncthreads.
template <typename Row>
__device__ void cached_inv_rms(NormCache& cache, int32_t opcode, int32_t layer, int32_t begin,
                               int n, int H, float eps, Row row, float* scales) {
  const bool hit =
      cache.opcode == opcode && cache.layer == layer && cache.begin == begin && cache.n == n;
  if (hit) {
    for (int r = threadIdx.x; r < n; r += blockDim.x) scales[r] = cache.scale[r];
    __syncthreads();
    return;
  }
  row_inv_rms(n, H, eps, row, scales);  // ends with __syncthreads: every thread read the key
  for (int r = threadIdx.x; r < n; r += blockDim.x) cache.scale[r] = scales[r];
  if (threadIdx.x == 0) {
    cache.opcode = opcode;
    cache.layer = layer;
    cache.begin = begin;
    cache.n = n;
  }
  __syncthreads();
}

template <int kMats, typename SrcRow, typename RowOf>
__device__ bool mma_can_take(const ProjectionInput& in, SrcRow src_row, RowOf row_of) {
  const auto misaligned = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) != 0; };
  if (in.K % 8 != 0 || misaligned(src_row(0))) return false;
  for (int m = 0; m < kMats; ++m) {
    if (misaligned(row_of(m, 0)) || misaligned(row_of(m, in.ncols - 1))) return false;
  }
  return true;
}

// xs[r * K + k] = (x_r[k] (* row_scale[r0 + r]) (* norm[k])) for the pass's n rows, x_r =
// src_row(r0 + r): (x * inv_rms) * weight, as the CPU. Rows of K % 4 == 0 at 16-byte-aligned
// addresses come by cp.async, every chunk of the pass in flight at once, and each thread then
// scales the chunks it copied in place (its own copies need no barrier); a plain loop waited
// one memory round trip per element in turn (56 for a down tile's 14,336-wide row).
template <typename SrcRow>
__device__ __forceinline__ void stage_rows(const ProjectionInput& in, int r0, int n, SrcRow src_row,
                                           float* xs) {
  const int K = in.K, k4s = K / 4;
  const auto async_row = [&](int r) {
    return K % 4 == 0 && (reinterpret_cast<uintptr_t>(src_row(r0 + r)) & 15) == 0;
  };
  for (int r = 0; r < n; ++r) {
    const float* x = src_row(r0 + r);
    if (async_row(r)) {
      const uint32_t dst = smem_addr(xs + r * K);
      for (int k4 = threadIdx.x; k4 < k4s; k4 += kMegakernelThreads) {
        cp_async16(dst + k4 * 16, x + 4 * k4, 16);
      }
    } else {
      const float s = in.row_scale != nullptr ? in.row_scale[r0 + r] : 1.0f;
      for (int k = threadIdx.x; k < K; k += blockDim.x) {
        float v = x[k];
        if (in.row_scale != nullptr) v *= s;
        if (in.norm != nullptr) v *= weight_at(in.norm, k);
        xs[r * K + k] = v;
      }
    }
  }
  cp_async_commit();
  cp_async_wait(0);
  if (in.row_scale == nullptr && in.norm == nullptr) return;
  for (int r = 0; r < n; ++r) {
    if (!async_row(r)) continue;
    const float s = in.row_scale != nullptr ? in.row_scale[r0 + r] : 1.0f;
    float4* row = reinterpret_cast<float4*>(xs + r * K);
    for (int k4 = threadIdx.x; k4 < k4s; k4 += kMegakernelThreads) {
      float4 v = row[k4];
      if (in.row_scale != nullptr) v = make_float4(v.x * s, v.y * s, v.z * s, v.w * s);
      if (in.norm != nullptr) {
        v.x *= weight_at(in.norm, 4 * k4);
        v.y *= weight_at(in.norm, 4 * k4 + 1);
        v.z *= weight_at(in.norm, 4 * k4 + 2);
        v.w *= weight_at(in.norm, 4 * k4 + 3);
      }
      row[k4] = v;
    }
  }
}

// Whether project_now takes mma.sync (else the CUDA cores).
template <int kMats, typename SrcRow, typename RowOf>
__device__ bool mma_takes(int32_t step_flags, const ProjectionInput& in, SrcRow src_row,
                          RowOf row_of) {
  return (step_flags & kStepTensorCores) != 0 && in.nrows > 1 &&
         mma_can_take<kMats>(in, src_row, row_of);
}

// Columns per warp the register matvec starts its weights into L2 ahead [L2_AHEAD].
__device__ __forceinline__ int matvec_l2_ahead(int32_t step_flags) {
  return l2_ahead_of(step_flags, kMatvecL2Ahead);
}

// The CUDA cores' bulk-copy ring for a pass of n rows [MATVEC_BULK]: slots per warp (0: the
// register matvec takes the pass), at byte *ring_at of the core's shared memory, after the
// pass's fp32 rows.
template <int kMats, typename RowOf>
__device__ int bulk_pass_slots(int32_t step_flags, const ProjectionInput& in, int n, int smem_bytes,
                               RowOf row_of, int* ring_at) {
  *ring_at = (n * in.K * static_cast<int>(sizeof(float)) + 127) / 128 * 128;
  if ((step_flags & kStepMatvecRegisters) != 0 || !bulk_can_take<kMats>(in.ncols, in.K, row_of)) {
    return 0;
  }
  return bulk_slots(smem_bytes - *ring_at);
}

// The prefetch call of a projection (kPrefetchCall) [MATVEC_BULK]: where project_now will
// take the bulk-copy matvec for the first pass of this chunk, starts its weight segments and
// records them in `bulk` for project_now. Every thread; no __syncthreads.
template <int kMats, typename SrcRow, typename RowOf>
__device__ void prefetch_now(int32_t step_flags, const ProjectionInput& in, char* smem,
                             int smem_bytes, BulkState& bulk, SrcRow src_row, RowOf row_of) {
  if (in.nrows <= 0 || mma_takes<kMats>(step_flags, in, src_row, row_of)) return;
  const int rpp = rows_per_pass(in.K, smem_bytes / static_cast<int>(sizeof(float)));
  int ring_at = 0;
  const int slots =
      bulk_pass_slots<kMats>(step_flags, in, min(rpp, in.nrows), smem_bytes, row_of, &ring_at);
  if (slots == 0) {  // the register matvec [L2_AHEAD]
    matvec_first_to_l2<kMats>(in.ncols, in.K, matvec_l2_ahead(step_flags), row_of);
    return;
  }
  const int issued = bulk_begin<kMats>(bulk, in.ncols, in.K, smem + ring_at, slots, row_of);
  if ((threadIdx.x & 31) == 0) bulk.issued[threadIdx.x >> 5] = issued;
  if (threadIdx.x == 0) {
    bulk.armed = 1;
    bulk.slots = slots;
    bulk.ring = smem + ring_at;
  }
}

// The projection on the cores other than wgmma, whole in this call: mma.sync (tile_mma.cuh)
// when the step asks for tensor cores and the shape allows, else the CUDA cores (fp32
// activations staged as many rows at a time as fit; the first pass's weight segments already
// in flight where `bulk` is armed). Ends with __syncthreads.
template <int kMats, typename SrcRow, typename RowOf, typename Emit>
__device__ void project_now(int32_t step_flags, const ProjectionInput& in, char* smem,
                            int smem_bytes, BulkState* bulk, SrcRow src_row, RowOf row_of,
                            Emit emit) {
  if (in.nrows <= 0) return;
  if (mma_takes<kMats>(step_flags, in, src_row, row_of)) {
    if (in.nrows <= kMmaDecodeRows) {
      tile_mma<kMats, 2, 2>(in, smem, smem_bytes, src_row, row_of, emit);
    } else {
      tile_mma<kMats, 2, 4>(in, smem, smem_bytes, src_row, row_of, emit);
    }
    return;
  }
  const int K = in.K;
  float* xs = reinterpret_cast<float*>(smem);  // (rows, K)
  const int rpp = rows_per_pass(K, smem_bytes / static_cast<int>(sizeof(float)));
  // Read by every thread before the first barrier below, cleared by thread 0 after it.
  const bool begun = bulk != nullptr && bulk->armed != 0;
  for (int r0 = 0; r0 < in.nrows; r0 += rpp) {
    const int n = min(rpp, in.nrows - r0);
    stage_rows(in, r0, n, src_row, xs);
    __syncthreads();
    if (r0 == 0 && begun && threadIdx.x == 0) bulk->armed = 0;
    const auto emit_row = [&](int c, int r, const float* v) { emit(c, r0 + r, v); };
    int ring_at = 0;
    const int slots = bulk != nullptr
                          ? bulk_pass_slots<kMats>(step_flags, in, n, smem_bytes, row_of, &ring_at)
                          : 0;
    if (slots > 0) {
      tile_matvec_bulk<kMats>(*bulk, in.ncols, K, xs, n, smem + ring_at, slots, r0 == 0 && begun,
                              row_of, emit_row);
    } else {
      tile_matvec<kMats>(in.ncols, K, xs, n, matvec_l2_ahead(step_flags), row_of, emit_row);
    }
    __syncthreads();
  }
}

// How a projection op's chunk of rows went in this call [WGMMA_WALK].
enum class Walk {
  kSkip,        // finished in an earlier call: go on to the next chunk
  kYield,       // a wgmma pass is set up in *ctx.pass: return true, so the entry runs it
  kDone,        // finished in this call: run what follows the projection, then the next chunk
  kPrefetched,  // the prefetch call (kPrefetchCall) is over: return false at once
};

// The wgmma core's token rows per pass for this projection (64 or 128), or 0 where it takes
// another core: wgmma with TMA-fed weights when the step asks for it, the weights have maps
// and the shape allows (K % 8 == 0, 16-byte-aligned rows), for more than one token row (one
// row is a pure weight stream: at Llama-3.1-8B batch-1 decode on an H100 the wgmma core took
// 32 ms a step, the CUDA cores 17).
template <int kMaxPassRows, typename SrcRow, typename GroupOf>
__device__ int wgmma_rows(int32_t step_flags, const ProjectionInput& in, int smem_bytes,
                          SrcRow src_row, GroupOf group_of) {
  constexpr int32_t kWgmmaFlags = kStepTensorCores | kStepWgmma;
  if ((step_flags & kWgmmaFlags) != kWgmmaFlags || in.nrows <= 1 || smem_bytes < kWgmmaCoreBytes ||
      in.K % 8 != 0 || (reinterpret_cast<uintptr_t>(src_row(0)) & 15) != 0 ||
      group_of(0, 0).map == nullptr) {
    return 0;
  }
  return kMaxPassRows > 64 && in.nrows > 64 && smem_bytes >= kWgmmaWideCoreBytes ? 128 : 64;
}

// emit(c, r, v[kMats]) once per column c < in.ncols and token row r < in.nrows, v[m] the dot
// product of weight row row_of(m, c) with x[r] (ProjectionInput), after prologue() (which
// writes in.row_scale; not called where the wgmma passes take all rows from in.bf16_map). `smem`
// (16-byte aligned, `smem_bytes`, at least kProjectionMinSmemBytes and K floats) belongs to the
// projection until it is done (kDone); the caller synchronizes before; prologue() and every emit
// pass end with __syncthreads. group_of(m, c) (WeightGroup) names the TMA map and row of weight
// rows [c, c + kWgmmaGroupRows) of matrix m, or a null map where the op cannot (then the mma.sync
// core takes the tensor-core steps). kMaxPassRows 64: an op whose chunks are never longer
// (QKV, the LM head) leaves out the 128-row wgmma passes.
template <int kMats, int kMaxPassRows = 128, typename Prologue, typename SrcRow, typename RowOf,
          typename GroupOf, typename Emit>
__device__ Walk project(PassWalk& walk, int32_t step_flags, const ProjectionInput& in, char* smem,
                        int smem_bytes, Prologue prologue, SrcRow src_row, RowOf row_of,
                        GroupOf group_of, Emit emit) {
  const int rows =
      in.nrows > 0 ? wgmma_rows<kMaxPassRows>(step_flags, in, smem_bytes, src_row, group_of) : 0;
  const int n = rows == 128  ? WgmmaPassShape<kMats, 128>::count(in)
                : rows == 64 ? WgmmaPassShape<kMats, 64>::count(in)
                             : 0;
  if (walk.call == kPrefetchCall) {
    if (n == 0 && walk.bulk != nullptr) {
      prefetch_now<kMats>(step_flags, in, smem, smem_bytes, *walk.bulk, src_row, row_of);
    } else if (n > 0 && walk.pass->l2_ahead > 0) {  // [L2_AHEAD]
      if (rows == 128) {
        wgmma_first_to_l2<kMats, 128>(in, walk.pass->l2_ahead, group_of);
      } else {
        wgmma_first_to_l2<kMats, 64>(in, walk.pass->l2_ahead, group_of);
      }
    }
    return Walk::kPrefetched;
  }
  const ChunkStep step = walk_chunk(walk, n);
  if (step.skip) return Walk::kSkip;
  // Passes that take every row in bf16 from in.bf16_map read no row scale.
  const bool bf16_rows = n > 0 && in.bf16_map != nullptr && in.first_row >= 0 &&
                         in.first_row + in.nrows <= in.bf16_rows;
  if (step.prologue && !bf16_rows) prologue();
  if (n == 0) {
    project_now<kMats>(step_flags, in, smem, smem_bytes, walk.bulk, src_row, row_of, emit);
    return Walk::kDone;
  }
  const bool wide = kMaxPassRows > 64 && rows == 128;
  const bool deep = !wide && smem_bytes >= kWgmmaDeepCoreBytes &&
                    (step_flags & kStepWgmmaShallow) == 0;  // 64-row passes only
  if (step.emit >= 0) {
    if (wide) {
      wgmma_pass_emit<kMats, 128>(in, smem, deep, step.emit, emit);
    } else {
      wgmma_pass_emit<kMats, 64>(in, smem, deep, step.emit, emit);
    }
  }
  if (step.setup < 0) return Walk::kDone;
  if (wide) {
    wgmma_pass_setup<kMats, 128>(in, smem, deep, step.setup, src_row, group_of, *walk.pass);
  } else {
    wgmma_pass_setup<kMats, 64>(in, smem, deep, step.setup, src_row, group_of, *walk.pass);
  }
  return Walk::kYield;
}

}  // namespace megaserve::kernels
