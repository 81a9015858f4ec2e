// The CUDA-core projection core fed by bulk copies [MATVEC_BULK]: the same arithmetic as
// tile_matvec (a warp per output column, fp32 activations in shared memory, the same
// per-lane order of the K sums, so the same floats), but each warp's weight rows reach it
// through a private ring of shared-memory segments that its lane 0 refills with
// cp.async.bulk, one instruction per segment, completing on the slot's mbarrier. A decode
// step of few token rows is a weight stream bound by the bytes each SM keeps in flight:
// tile_matvec's register loads hold 32 KB per SM (8 warps x 32 lanes x 8 x 16 bytes),
// and an H100 moved 1.5-2.3 TB/s of its ~3 TB/s through them at Llama-3.1-8B batch 1. Here
// each warp has up to kBulkMaxSlots segments of kBulkSegmentBytes in flight, with no
// register per byte (up to 224 KB per SM where the shared memory allows).
#pragma once

#include <stdint.h>

#include "kernels/bulk_ring.h"
#include "kernels/device_utils.cuh"
#include "kernels/hopper/hopper_ptx.cuh"

namespace megaserve::kernels {

inline constexpr int kBulkSegmentBytes = 4096;  // 2048 weights: 8 x 16 bytes per lane
inline constexpr int kBulkMaxSlots = 7;
inline constexpr int kBulkMinSlots = 3;

// A CTA's bulk-matvec state (static shared memory, CtaState) [MATVEC_BULK]. Per warp and
// slot, a "full" barrier (one arrival with the segment's bytes; the bulk copy completes it)
// and an "empty" one (every lane arrives once it has read the segment; lane 0 waits on it
// before refilling the slot), initialized once per launch, as the wgmma pipeline's: between
// instructions every barrier is quiescent (each slot's uses have completed both), and
// `parity` keeps, per warp, bit i = the parity of slot i's next phase of both.
// A projection's first segments may be issued before its instruction's waits are satisfied
// (the weights depend on nothing), so that they stream while the CTA waits for the op's
// inputs: `armed` and the ring (`slots`, `ring`, `issued`) say so to project_now.
struct BulkState {
  uint64_t full[kMegakernelWarps][kBulkMaxSlots];
  uint64_t empty[kMegakernelWarps][kBulkMaxSlots];
  uint32_t parity[kMegakernelWarps];
  int32_t armed;  // 1: this instruction's first chunk has its first segments in flight
  int32_t slots;
  char* ring;
  int32_t issued[kMegakernelWarps];  // per warp: segments issued (slots 0 .. issued - 1)
};

// Thread 0, once per launch; a __syncthreads must follow before any use.
__device__ inline void bulk_init(BulkState& b) {
  for (int w = 0; w < kMegakernelWarps; ++w) {
    for (int i = 0; i < kBulkMaxSlots; ++i) {
      hopper::mbarrier_init(&b.full[w][i], 1);
      hopper::mbarrier_init(&b.empty[w][i], 32);
    }
    b.parity[w] = 0;
  }
  b.armed = 0;
  hopper::fence_barrier_init();
}

// Ring slots per warp that `bytes` of shared memory hold, or 0 where fewer than
// kBulkMinSlots fit (then tile_matvec takes the projection).
__device__ __forceinline__ int bulk_slots(int bytes) {
  const int slots = bytes / kMegakernelWarps / kBulkSegmentBytes;
  if (slots < kBulkMinSlots) return 0;
  return slots < kBulkMaxSlots ? slots : kBulkMaxSlots;
}

// Whether every weight row can be bulk-copied: K % 8 == 0 (rows of whole 16-byte chunks)
// and 16-byte-aligned rows (checked at the first and last column of each matrix, which
// bounds a strided matrix's rows).
template <int kMats, typename RowOf>
__device__ bool bulk_can_take(int ncols, int K, RowOf row_of) {
  if (K % 8 != 0 || ncols <= 0) return false;
  for (int m = 0; m < kMats; ++m) {
    if ((reinterpret_cast<uintptr_t>(row_of(m, 0)) & 15) != 0 ||
        (reinterpret_cast<uintptr_t>(row_of(m, ncols - 1)) & 15) != 0) {
      return false;
    }
  }
  return true;
}

// This warp's stream through its ring: its segments in `ring` (kMegakernelWarps x `slots`
// segments), their barriers, and its share of the columns. Segment q: column
// warp + 8 (q / (kMats segs)), matrix (q / segs) % kMats, bytes from (q % segs) *
// kBulkSegmentBytes of that weight row; slot q % slots, its use q / slots there.
struct BulkStream {
  char* segments;
  uint64_t* full;
  uint64_t* empty;
  uint32_t parity;  // bit i: slot i's phase parity at use 0
  int slots, segs, row_bytes, total;

  __device__ uint32_t phase(int q) const { return bulk_phase(parity, q, slots); }
};

template <int kMats>
__device__ __forceinline__ BulkStream bulk_stream(BulkState& st, int ncols, int K, char* ring,
                                                  int slots) {
  const int warp = threadIdx.x >> 5;
  BulkStream b;
  b.segments = ring + warp * slots * kBulkSegmentBytes;
  b.full = st.full[warp];
  b.empty = st.empty[warp];
  b.parity = st.parity[warp];
  b.slots = slots;
  b.row_bytes = K * 2;
  b.segs = (b.row_bytes + kBulkSegmentBytes - 1) / kBulkSegmentBytes;
  const int cols = warp < ncols ? (ncols - warp + kMegakernelWarps - 1) / kMegakernelWarps : 0;
  b.total = cols * kMats * b.segs;
  return b;
}

// Lane 0: issues segment q (its slot's earlier use, if any, read by every lane: the empty
// barrier).
template <int kMats, typename RowOf>
__device__ __forceinline__ void bulk_issue(const BulkStream& b, int q, RowOf row_of) {
  const int warp = threadIdx.x >> 5;
  const int s = q % b.segs, m = (q / b.segs) % kMats;
  const int c = warp + kMegakernelWarps * (q / (b.segs * kMats));
  const int off = s * kBulkSegmentBytes;
  const int bytes = min(kBulkSegmentBytes, b.row_bytes - off);
  const int slot = q % b.slots;
  if (q >= b.slots) hopper::mbarrier_wait_parity(&b.empty[slot], b.phase(q - b.slots));
  hopper::mbarrier_arrive_expect_tx(&b.full[slot], bytes);
  hopper::bulk_load(b.segments + slot * kBulkSegmentBytes,
                    reinterpret_cast<const char*>(row_of(m, c)) + off, bytes, &b.full[slot]);
}

// Lane 0 of every warp: issues the warp's first segments (as many as there are slots) and
// returns how many (other lanes: 0). No barrier of the CTA: the ring's bytes must be free (the
// caller's __syncthreads).
template <int kMats, typename RowOf>
__device__ int bulk_begin(BulkState& st, int ncols, int K, char* ring, int slots, RowOf row_of) {
  const BulkStream b = bulk_stream<kMats>(st, ncols, K, ring, slots);
  if ((threadIdx.x & 31) != 0) return 0;
  // The ring's bytes were last written through the generic proxy (the caller's barrier
  // joined those writers with this thread); the bulk copies write them through the async one.
  hopper::fence_proxy_async_shared();
  int q = 0;
  for (; q < b.total && q < slots; ++q) bulk_issue<kMats>(b, q, row_of);
  return q;
}

// Where the instruction a prefetch started will not run (the step was aborted while it
// waited): waits for its segments to land. Every thread; ends with __syncthreads.
__device__ inline void bulk_drain(BulkState& st) {
  const int warp = threadIdx.x >> 5;
  if (st.armed && (threadIdx.x & 31) == 0) {
    for (int i = 0; i < st.issued[warp]; ++i) {
      hopper::mbarrier_wait_parity(&st.full[warp][i], (st.parity[warp] >> i) & 1u);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) st.armed = 0;
}

// tile_matvec's contract (emit(c, r, v) once per column c < ncols and row r < nrows, from
// lane 0 of the column's warp), with `ring` (16-byte aligned) holding kMegakernelWarps x
// `slots` segments (bulk_slots). `begun`: bulk_begin already ran for these columns and this
// ring (the prefetch call); else it runs here. Callers __syncthreads before (xs written, the
// ring's bytes free) and after.
template <int kMats, typename RowOf, typename Emit>
__device__ void tile_matvec_bulk(BulkState& st, int ncols, int K, const float* xs, int nrows,
                                 char* ring, int slots, bool begun, RowOf row_of, Emit emit) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const BulkStream b = bulk_stream<kMats>(st, ncols, K, ring, slots);
  if (!begun) bulk_begin<kMats>(st, ncols, K, ring, slots, row_of);

  int q = 0;
  for (int c = warp; c < ncols; c += kMegakernelWarps) {
    float acc[kMats][kMaxMatvecRows];
#pragma unroll
    for (int m = 0; m < kMats; ++m) {
#pragma unroll
      for (int r = 0; r < kMaxMatvecRows; ++r) acc[m][r] = 0.0f;
    }
#pragma unroll
    for (int m = 0; m < kMats; ++m) {
      for (int s = 0; s < b.segs; ++s, ++q) {
        const int slot = q % slots;
        hopper::mbarrier_wait_parity(&b.full[slot], b.phase(q));
        const uint4* seg = reinterpret_cast<const uint4*>(b.segments + slot * kBulkSegmentBytes);
        const int chunks = min(kBulkSegmentBytes, b.row_bytes - s * kBulkSegmentBytes) / 16;
        const int k0 = s * (kBulkSegmentBytes / 2);
        // Lane l takes chunks l, l + 32, ...: weights k0 + 8 (l + 32 i), the k order of
        // tile_matvec's lane l.
#pragma unroll 4
        for (int i = lane; i < chunks; i += 32) {
          float wv[8];
          unpack_bf16x8(seg[i], wv);
          const int k = k0 + i * 8;
#pragma unroll
          for (int r = 0; r < kMaxMatvecRows; ++r) {
            if (r >= nrows) break;
            const float4* x = reinterpret_cast<const float4*>(xs + r * K + k);
            const float4 x0 = x[0], x1 = x[1];
            acc[m][r] += wv[0] * x0.x + wv[1] * x0.y + wv[2] * x0.z + wv[3] * x0.w + wv[4] * x1.x +
                         wv[5] * x1.y + wv[6] * x1.z + wv[7] * x1.w;
          }
        }
        hopper::mbarrier_arrive(&b.empty[slot]);  // this lane is done with the segment
        if (lane == 0 && q + slots < b.total) bulk_issue<kMats>(b, q + slots, row_of);
      }
    }
#pragma unroll
    for (int r = 0; r < kMaxMatvecRows; ++r) {
      if (r >= nrows) break;
      float v[kMats];
#pragma unroll
      for (int m = 0; m < kMats; ++m) v[m] = warp_sum(acc[m][r]);
      if (lane == 0) emit(c, r, v);
    }
  }
  // Every use of slot i completed both of its barriers' phases (the last empty one once all
  // lanes arrived, before the caller's __syncthreads): flip the parity of slots used an odd
  // number of times. Every lane read the parity in bulk_stream: the __syncwarp orders those
  // reads before lane 0's write (racecheck does not count the shuffles since as an order).
  __syncwarp();
  if (lane == 0) st.parity[warp] = bulk_parity_after(b.parity, b.total, slots);
}

}  // namespace megaserve::kernels
