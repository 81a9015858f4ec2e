// One 128 x 256 output tile of a projection C = A · Wᵀ on Hopper: a TMA producer thread feeds a
// 4-stage shared-memory ring, two consumer warpgroups run wgmma m64n256k16 into fp32 registers,
// then store bf16 C. The building block of the Hopper compute core (issue 11); a persistent CTA
// calls the producer and consumer halves for tile after tile with the pipeline state carried.
//
// Operands (row-major, bf16):
//   A  [M, K]  activations, K contiguous           -> TMA map, box (64 K, 128 rows)
//   W  [N, K]  weights as stored ("K-major B")     -> TMA map, box (64 K, 256 rows)
//   C  [M, N]  output, N contiguous, plain stores, bounds-checked for M and N tails
// K must be a multiple of 64 (kBlockK); rows of A beyond M and of W beyond N are zero-filled by
// the TMA unit (the maps' global dims are M and N), so tails only need guarded stores.
//
// CTA: 384 threads = 3 warpgroups.
//   warpgroup 0: producer. Thread 0 issues the TMA loads; the other 127 threads have nothing to
//                do and leave at 40 registers (setmaxnreg.dec).
//   warpgroups 1, 2: consumers, 232 registers each (setmaxnreg.inc). Consumer c owns rows
//                [64c, 64c + 64) of the tile: 64 x 256 fp32 = 128 accumulator registers/thread.
//
// Pipeline [TAG_PROJ_PIPE]. Per stage s: full[s] (count 1: the producer's arrive_expect_tx; the
// TMA completes the 48 KB of transactions) and empty[s] (count 8: lane 0 of each consumer warp
// after its wgmma.wait_group has retired the group that read stage s). Both roles walk the ring
// in the same order with their own PipelineState {stage, phase}; phases flip on wrap-around.
// The state lives across tiles, so the producer runs ahead into the next tile while consumers
// are still in the epilogue. No per-tile re-init and no CTA-wide sync between tiles: the only
// cross-role synchronization is the mbarriers, which keeps the invariant simple ("each side
// advances its state once per k-block it handles, both walk the same tile sequence").
#pragma once

#include <cuda_bf16.h>

#include <cstddef>  // offsetof
#include <cstdint>

#include "kernels/hopper/hopper_ptx.cuh"

namespace megaserve::hopper {

struct ProjectionTileConfig {
  static constexpr int kBlockM = 128;  // token rows per tile
  static constexpr int kBlockN = 256;  // output features per tile (= wgmma N)
  static constexpr int kBlockK = 64;   // 64 bf16 = 128 bytes: one 128B-swizzle row
  static constexpr int kWgmmaK = 16;   // K per wgmma instruction
  static constexpr int kStages = 4;
  static constexpr int kConsumerWarpgroups = 2;
  static constexpr int kThreads = 128 * (1 + kConsumerWarpgroups);  // 384
  static constexpr int kRowsPerConsumer = kBlockM / kConsumerWarpgroups;  // 64 = wgmma M
  static constexpr int kAccumRegs = kRowsPerConsumer * kBlockN / 128;    // 128 fp32 / thread

  static constexpr uint32_t kProducerRegs = 40;
  static constexpr uint32_t kConsumerRegs = 232;

  static constexpr uint32_t kABytes = kBlockM * kBlockK * 2;  // 16 KB
  static constexpr uint32_t kWBytes = kBlockN * kBlockK * 2;  // 32 KB
  static constexpr uint32_t kStageBytes = kABytes + kWBytes;  // 48 KB: the expect_tx count

  static_assert(kBlockK * 2 == 128, "128B swizzle: the TMA box's inner extent is 128 bytes");
  static_assert(kRowsPerConsumer == 64, "wgmma M is 64 per warpgroup");
  static_assert(kBlockN % 8 == 0 && kBlockN <= 256, "wgmma N: multiple of 8, at most 256");
  static_assert(kBlockM <= 256 && kBlockN <= 256, "a TMA box dimension is at most 256");
  static_assert(kABytes % 1024 == 0 && kWBytes % 1024 == 0,
                "each stage buffer must stay 1024-byte aligned for the 128B swizzle atoms");
  static_assert(kProducerRegs * 128 + kConsumerWarpgroups * kConsumerRegs * 128 <= 65536,
                "setmaxnreg totals exceed the register file");
};

// Shared-memory layout. Must sit at a 1024-byte aligned address (align the dynamic smem base).
struct alignas(1024) ProjectionSmem {
  using Cfg = ProjectionTileConfig;
  __nv_bfloat16 a[Cfg::kStages][Cfg::kBlockM * Cfg::kBlockK];  // (stage, BLK_M, BLK_K) swizzled
  __nv_bfloat16 w[Cfg::kStages][Cfg::kBlockN * Cfg::kBlockK];  // (stage, BLK_N, BLK_K) swizzled
  uint64_t full[Cfg::kStages];   // TMA landed: count 1 + 48 KB of transactions
  uint64_t empty[Cfg::kStages];  // consumers done reading: count 8 (consumer warps)
};
static_assert(offsetof(ProjectionSmem, w) % 1024 == 0);
// Bytes of dynamic shared memory to request: the layout plus slack to align the base by hand.
inline constexpr size_t kProjectionSmemBytes = sizeof(ProjectionSmem) + 1024;

// Position in the stage ring. Producer and consumers each keep one; both start at {0, 0}.
struct PipelineState {
  uint32_t stage = 0;
  uint32_t phase = 0;  // parity of the current lap around the ring
  __device__ __forceinline__ void advance() {
    if (++stage == ProjectionTileConfig::kStages) {
      stage = 0;
      phase ^= 1;
    }
  }
};

// 1024-byte aligned view of the dynamic shared memory.
__device__ __forceinline__ ProjectionSmem& projection_smem(void* dynamic_smem) {
  const uintptr_t p = (reinterpret_cast<uintptr_t>(dynamic_smem) + 1023) & ~uintptr_t(1023);
  return *reinterpret_cast<ProjectionSmem*>(p);
}

// Called by one thread before the role split; the caller then runs __syncthreads().
__device__ __forceinline__ void projection_init_barriers(ProjectionSmem& s) {
  using Cfg = ProjectionTileConfig;
#pragma unroll
  for (int i = 0; i < Cfg::kStages; ++i) {
    mbarrier_init(&s.full[i], 1);
    mbarrier_init(&s.empty[i], Cfg::kConsumerWarpgroups * 4);
  }
  fence_barrier_init();  // visible to the TMA unit and, after the caller's sync, to all threads
}

// Grouped rasterization of the tile index: runs of `group_m` M-blocks walk N together, so the
// A rows of a run stay in L2 while the weights stream past, and each weight panel is read from
// DRAM about ceil(M blocks / group_m) times. Returns (m0, n0) in elements.
__device__ __forceinline__ void projection_tile_coords(int tile, int m_blocks, int n_blocks,
                                                       int group_m, int& m0, int& n0) {
  const int tiles_per_group = group_m * n_blocks;
  const int group = tile / tiles_per_group;
  const int first_m = group * group_m;
  const int rows_in_group = min(group_m, m_blocks - first_m);  // last group may be short
  const int in_group = tile - group * tiles_per_group;
  m0 = (first_m + in_group % rows_in_group) * ProjectionTileConfig::kBlockM;
  n0 = (in_group / rows_in_group) * ProjectionTileConfig::kBlockN;
}

// Producer half: one thread. Issues the loads of one tile's K loop into the ring.
// tmap_a: A [M, K] box (64, 128); tmap_w: W [N, K] box (64, 256); both SWIZZLE_128B.
__device__ __forceinline__ void projection_tile_produce(ProjectionSmem& s,
                                                        const CUtensorMap* tmap_a,
                                                        const CUtensorMap* tmap_w, int m0, int n0,
                                                        int num_k_blocks, PipelineState& st) {
  using Cfg = ProjectionTileConfig;
  for (int kb = 0; kb < num_k_blocks; ++kb) {
    // Wait until the consumers retired the wgmmas that read this stage on the previous lap
    // (parity phase ^ 1: on the first lap that is the pre-init phase, complete at once).
    mbarrier_wait_parity(&s.empty[st.stage], st.phase ^ 1);
    mbarrier_arrive_expect_tx(&s.full[st.stage], Cfg::kStageBytes);
    const int k0 = kb * Cfg::kBlockK;
    tma_load_2d(s.a[st.stage], tmap_a, &s.full[st.stage], k0, m0);  // (BLK_M, BLK_K)
    tma_load_2d(s.w[st.stage], tmap_w, &s.full[st.stage], k0, n0);  // (BLK_N, BLK_K)
    st.advance();
  }
}

// Consumer half: one whole consumer warpgroup (`consumer` = 0 or 1, `tid` = thread index within
// it, 0..127). Computes rows [m0 + 64 * consumer, +64) x [n0, n0 + 256) and stores them as bf16.
// C: [M, N] row-major, ldc = N.
__device__ __forceinline__ void projection_tile_consume(ProjectionSmem& s, __nv_bfloat16* C,
                                                        int M, int N, int m0, int n0,
                                                        int num_k_blocks, int consumer, int tid,
                                                        PipelineState& st) {
  using Cfg = ProjectionTileConfig;
  float acc[Cfg::kAccumRegs];  // (64 rows, 256 cols) of this warpgroup, wgmma D fragment layout
#pragma unroll
  for (int i = 0; i < Cfg::kAccumRegs; ++i) acc[i] = 0.f;
  wgmma_fence_operands(acc);

  const uint32_t a_base = smem_addr(&s.a[0][0]) + consumer * Cfg::kRowsPerConsumer * 128;
  const uint32_t w_base = smem_addr(&s.w[0][0]);
  const bool lane0 = (tid & 31) == 0;
  uint32_t prev_stage = 0;

  for (int kb = 0; kb < num_k_blocks; ++kb) {
    mbarrier_wait_parity(&s.full[st.stage], st.phase);  // TMA bytes of this stage landed
    wgmma_fence();
    const uint32_t a_stage = a_base + st.stage * Cfg::kABytes;  // (64, BLK_K) of this consumer
    const uint32_t w_stage = w_base + st.stage * Cfg::kWBytes;  // (BLK_N, BLK_K)
#pragma unroll
    for (int kk = 0; kk < Cfg::kBlockK / Cfg::kWgmmaK; ++kk) {
      // 16 K-elements = 32 bytes further along each 128-byte swizzled row.
      const uint64_t da = make_smem_desc_k_sw128(a_stage + kk * 32);  // (64, 16)
      const uint64_t dw = make_smem_desc_k_sw128(w_stage + kk * 32);  // (256, 16)
      wgmma_m64n256k16_bf16(acc, da, dw, (kb | kk) != 0 ? 1u : 0u);
    }
    wgmma_commit_group();
    // Keep this k-block's group in flight; the previous one has now retired, so its stage's
    // smem reads are done and the stage can go back to the producer.
    if (kb > 0) {
      wgmma_wait<1>();
      if (lane0) mbarrier_arrive(&s.empty[prev_stage]);
    }
    prev_stage = st.stage;
    st.advance();
  }
  wgmma_wait<0>();
  if (num_k_blocks > 0 && lane0) mbarrier_arrive(&s.empty[prev_stage]);
  wgmma_fence_operands(acc);  // accumulator reads below stay after the wait

  // Epilogue. D fragment of m64nNk16 (fp32): warp w of the warpgroup holds rows 16w..16w+15;
  // for each 8-column block b, registers 4b..4b+3 of lane l are
  //   (r, c), (r, c + 1), (r + 8, c), (r + 8, c + 1) with r = 16w + l / 4, c = 8b + 2 (l % 4).
  const int warp = tid >> 5, lane = tid & 31;
  const int row0 = m0 + consumer * Cfg::kRowsPerConsumer + warp * 16 + (lane >> 2);
  const int col0 = n0 + 2 * (lane & 3);
  const bool pair_ok = (N & 1) == 0;  // bf16x2 stores need 4-byte aligned (even) columns
#pragma unroll
  for (int b = 0; b < Cfg::kBlockN / 8; ++b) {
    const int col = col0 + 8 * b;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + 8 * h;
      if (row >= M || col >= N) continue;
      __nv_bfloat16* dst = C + static_cast<size_t>(row) * N + col;
      const float v0 = acc[4 * b + 2 * h], v1 = acc[4 * b + 2 * h + 1];
      if (pair_ok && col + 1 < N) {
        *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(v0, v1);
      } else {
        dst[0] = __float2bfloat16_rn(v0);
        if (col + 1 < N) dst[1] = __float2bfloat16_rn(v1);
      }
    }
  }
}

}  // namespace megaserve::hopper
