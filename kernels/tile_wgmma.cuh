// The projection core on Hopper's wgmma (sm_90a), the default tensor-core path where the weights
// have TMA descriptors: a tile of up to kRows (64 or 128) token rows x up to 256 weight rows per
// pass, K in blocks of 64.
//
// Operands of wgmma m64nNk16 (fp32 accumulation in registers):
//   A (64 x 16)  token rows: the activations (fp32 in the workspace) times row_scale, rounded
//                to bf16, times norm, rounded again: transformers' bf16 RMSNorm (the accuracy
//                standard, DESIGN §5: bf16 activations, fp32 accumulation; the CPU's
//                bf16-rounding mode rounds at the same points, engine/cpu normed_input).
//                Every thread copies its share of a k-block (4 or 8 quads of 4 floats) with
//                cp.async into a ring of `slots` fp32 slots, issued `slots` k-blocks before it
//                is converted (one k-block before it is multiplied), as soon as the k-block
//                before it in its slot is converted, so the L2 round trip is hidden behind
//                that many k-blocks of work; then converts it into one of three A buffers
//                in the 128-byte-swizzled K-major layout that wgmma reads. Each thread reads
//                back only what it copied, so the ring needs no barrier of its own.
//   B (16 x N)   weight rows, K-major as stored: the TMA unit copies each group of
//                kWgmmaGroupRows rows x 64 k (2 KB, one box) into a stage; a pass's rows are up
//                to 16 groups (256 rows), each from one weight matrix (the op's map_of); four
//                groups of consecutive rows of one matrix in one box of 64 rows [WIDE_BOX].
// Passes of 64 token rows: warpgroup w multiplies weight rows [128 w, 128 w + 128) of the pass
// (m64n128k16, 64 accumulator registers per thread). Passes of 128 rows: warpgroup w multiplies
// token rows [64 w, 64 w + 64) by all 256 weight rows (m64n256k16, 128 registers), so each
// staged weight byte feeds twice the work (a 64 x 256 pass reads 51 FLOP per byte of weights
// and fp32 activations, 128 x 256 reads 64). Either way all 256 rows are multiplied, whether
// the pass uses them or not: rows past the pass's groups are stale and only feed outputs that
// are not emitted. A branch around the wgmmas would
// make ptxas serialize them (C7520), so a narrow pass pays for 256 rows of tensor work (tiles of
// 256 weight rows avoid it: 256 hidden columns, 128 FFN columns, two heads of 128).
//
// Where the code runs [WGMMA_WALK]: ptxas serializes every wgmma that is not in the kernel's
// entry function itself (C7510, "wgmma pipeline crossing function boundary at a function
// call": each HGMMA followed by a wait for it to retire, so a warpgroup never has two in
// flight and never converts the next A block while its wgmmas run). So the k-loop of a pass,
// run_wgmma_pass, is inlined into the entry functions (controller.cuh's run_queue), and it is
// generic: it reads only the tables and the WgmmaPass that the op wrote. The op-specific code
// stays in the ops, behind dispatch (a call): wgmma_pass_setup writes pass p's tables,
// wgmma_pass_emit hands pass p's outputs to the op's emit. A projection instruction's op is
// therefore called once per pass plus once (projection.cuh, project), and the entry runs a
// pass between the calls. Calls to other functions from the entry function do not serialize
// its wgmmas (a 30-line kernel shows both; bench/RESULTS.md, 2026-12-06).
//
// Cached activations [ACT_CACHE] (kernels/act_cache.h): the pass that claims an activation
// block converts it as above and also stores its bf16 A into DeviceModel::act_cache at its
// token rows; the passes over the same block after it publishes it (the other tiles of
// weights, on any SM) take A from there with the TMA unit, beside the weights
// (run_wgmma_pass_cached).
//
// Depth: `stages` weight stages and `slots` activation slots, 3 and 2 (shallow, in
// kWgmmaCoreBytes; 128-row passes, in kWgmmaWideCoreBytes, share its barriers and count: the
// same stages at the same places) or 4 and 3 (deep, 64-row passes only, in
// kWgmmaDeepCoreBytes); each depth has its own barriers and count, so passes of either depth
// can follow each other.
//
// Pipeline [WGMMA_PIPE]: `stages` stages of weights, each with a "full" mbarrier in the
// CTA's static shared memory (count 1: thread 0's arrive_expect_tx, then the TMA bytes). One
// CTA-wide barrier per k-block replaces "empty" barriers: every thread passes it only after its
// warpgroup retired the wgmmas of the previous k-block (wgmma.wait_group 1), so after it the
// issuing lanes may refill that k-block's stage, and the A buffer written next (read two k-blocks
// ago) is free. Every pass drains its stages, so the barriers' phases carry over from pass to pass
// and from instruction to instruction through one count of k-blocks consumed (tma_count), kept
// modulo 2 x stages: that is the stage and the phase, and a plain count would wrap at 2^32,
// which 3 does not divide (after the wrap a 3-stage pass would wait for the wrong phase and
// read a stage the TMA had not filled: hours to days into a persistent kernel's run).
#pragma once

#include <stdint.h>

#include "kernels/device_utils.cuh"
#include "kernels/hopper/hopper_ptx.cuh"
#include "kernels/megakernel.h"
#include "kernels/op_context.cuh"
#include "kernels/tile_mma.cuh"

namespace megaserve::kernels {

// Where a group of kWgmmaGroupRows weight rows comes from: rows [row, row + 16) of `map`.
// `span`, set by wgmma_pass_setup [WIDE_BOX]: 1, a copy of this group alone; 4, the first of a
// quad copied as one box of kWgmmaWideRows rows (from map + WgmmaPass::wide_maps); 0, a later
// group of such a quad (no copy of its own).
struct WeightGroup {
  const CUtensorMap* map;
  int32_t row;
  int32_t span = 1;
};

// Group g's copy into a stage at `stage` for k-block k, where `span` says it has one
// [WIDE_BOX]: the TMA unit writes a box of 64 or 16 rows of 128-byte swizzled rows, and four
// 16-row boxes at consecutive 2 KB offsets lie exactly as one 64-row box (the swizzle is a
// function of the shared-memory address, and every box starts 1024-byte aligned), so the
// k-loops read either the same way.
__device__ __forceinline__ void copy_weight_group(const WeightGroup& wg, int g, char* stage,
                                                  uint64_t* bar, int k, int32_t wide_maps) {
  if (wg.span == 0) return;
  const CUtensorMap* map = wg.span == 4 ? wg.map + wide_maps : wg.map;
  hopper::tma_load_2d(stage + g * kWgmmaGroupRows * 128, map, bar, k, wg.row);
}

// [L2_AHEAD] Starts group g's k-block at k into L2, as copy_weight_group would copy it.
__device__ __forceinline__ void weight_group_to_l2(const WeightGroup& wg, int k,
                                                   int32_t wide_maps) {
  if (wg.span == 0) return;
  hopper::prefetch_l2_tile_2d(wg.span == 4 ? wg.map + wide_maps : wg.map, k, wg.row);
}

inline constexpr int kWgmmaBlockK = 64;  // one 128-byte swizzled row
inline constexpr int kWgmmaPassB = 256;  // weight rows per pass
inline constexpr int kWgmmaGroups = kWgmmaPassB / kWgmmaGroupRows;
inline constexpr int kWgmmaDStride = kWgmmaPassB + 8;  // floats per staged output row
static_assert(kWgmmaStageBytes == kWgmmaPassB * 128 && kWgmmaRingRowBytes == kWgmmaBlockK * 4);
// The epilogue's staged outputs overlay the stages, A buffers and ring.
static_assert(64 * kWgmmaDStride * 4 <= wgmma_layout_bytes(3, 2, 64));
static_assert(128 * kWgmmaDStride * 4 <= wgmma_layout_bytes(3, 2, 128));
// The tables: kRows activation row pointers and scales, kWgmmaGroups weight groups, 2 x 2 flags.
static_assert(sizeof(WeightGroup) == 16);
static_assert(128 * (8 + 4) + kWgmmaGroups * 16 + 4 <= kWgmmaTableBytes);

// Called once per CTA by thread 0 before the first step; a __syncthreads must follow.
__device__ inline void wgmma_pipe_init(WgmmaPipe pipe) {
  for (int s = 0; s < kWgmmaBarriers; ++s) hopper::mbarrier_init(&pipe.full[s], 1);
  pipe.consumed[0] = pipe.consumed[1] = 0;
  for (int s = 0; s < 3; ++s) pipe.released[s] = 0;
  hopper::fence_barrier_init();
}

// The core's shared memory (1024-byte aligned inside `smem`): `stages` weight stages, three
// bf16 A buffers, `slots` fp32 activation slots, then the tables: kRows activation row pointers
// and scales, kWgmmaGroups weight groups, 2 x 2 flags. The epilogue's staged outputs (dstage,
// kRows x kWgmmaDStride floats) overlay the stages, A buffers and ring, not the tables.
template <int kRows>
struct WgmmaLayout {
  static constexpr int kABytes = kRows * kWgmmaARowBytes;  // one bf16 A buffer
  static constexpr int kRingBytes = kRows * kWgmmaRingRowBytes;
  int n_stages, slots;
  char* stages;  // [n_stages][32 KB]
  char* abuf;    // [3][kABytes]
  char* ring;    // [slots][kRingBytes]
  const float** x_rows;
  float* x_scale;
  WeightGroup* groups;
  // [2][2], 128-row passes: whether warpgroup w released k-block j's stage second, at
  // [j & 1][w]: two copies, so that thread 0 of a warpgroup writes k-block j + 1's while its
  // other warps may still read k-block j's (only the barrier of j + 1 orders those reads
  // before the write of j + 2).
  bool* second;
  float* dstage;  // [kRows][kWgmmaDStride], the epilogue

  __device__ WgmmaLayout(char* smem, bool deep) {
    // `smem` is shared memory: said so, and kept a pointer (no integer round trip), so that
    // its accesses compile to LDS / STS rather than generic loads and stores.
    __builtin_assume(__isShared(smem));
    n_stages = deep ? 4 : 3;
    slots = deep ? 3 : 2;
    stages = smem + ((1024 - (smem_addr(smem) & 1023)) & 1023);
    abuf = stages + n_stages * kWgmmaStageBytes;
    ring = abuf + 3 * kABytes;
    x_rows = reinterpret_cast<const float**>(ring + slots * kRingBytes);
    x_scale = reinterpret_cast<float*>(x_rows + kRows);
    groups = reinterpret_cast<WeightGroup*>(x_scale + kRows);
    second = reinterpret_cast<bool*>(groups + kWgmmaGroups);
    dstage = reinterpret_cast<float*>(stages);
  }
};

// Which token rows and weight rows pass p of a projection covers: passes of kRows token rows
// (outer) by up to 256 / kMats weight rows of each matrix (inner), in whole groups.
template <int kMats, int kRows>
struct WgmmaPassShape {
  static constexpr int kColStride = kWgmmaPassB / kMats / kWgmmaGroupRows * kWgmmaGroupRows;
  int r0, nr, c0, nc;
  int cstride;  // columns per matrix, rounded up to whole groups (dstage's matrix stride)
  int ngroups;  // weight groups of the pass, all matrices

  __device__ WgmmaPassShape(const ProjectionInput& in, int p) {
    const int col_passes = (in.ncols + kColStride - 1) / kColStride;
    r0 = p / col_passes * kRows;
    c0 = p % col_passes * kColStride;
    nr = min(kRows, in.nrows - r0);
    nc = min(kColStride, in.ncols - c0);
    cstride = (nc + kWgmmaGroupRows - 1) / kWgmmaGroupRows * kWgmmaGroupRows;
    ngroups = kMats * cstride / kWgmmaGroupRows;
  }
  __device__ static int count(const ProjectionInput& in) {
    return (in.nrows + kRows - 1) / kRows * ((in.ncols + kColStride - 1) / kColStride);
  }
  // Weight group g of the pass (g < ngroups: matrix g / groups per matrix, in whole groups).
  template <typename GroupOf>
  __device__ WeightGroup group(int g, GroupOf group_of) const {
    const int cgroups = cstride / kWgmmaGroupRows;  // per matrix
    return group_of(g / cgroups, c0 + (g % cgroups) * kWgmmaGroupRows);
  }
};

// [L2_AHEAD] Before the waits of an instruction whose first pass is pass 0 of `in`: starts
// that pass's first `blocks` k-blocks of weights into L2 (thread g takes group g, in 16-row
// boxes), so that its first TMA loads, issued after the waits, hit L2. Weights depend on no
// other instruction.
template <int kMats, int kRows, typename GroupOf>
__device__ void wgmma_first_to_l2(const ProjectionInput& in, int blocks, GroupOf group_of) {
  const WgmmaPassShape<kMats, kRows> sh(in, 0);
  const int g = threadIdx.x;
  if (g >= sh.ngroups) return;
  const WeightGroup wg = sh.group(g, group_of);
  for (int j = 0; j < blocks && j * kWgmmaBlockK < in.K; ++j) {
    hopper::prefetch_l2_tile_2d(wg.map, in.k0 + j * kWgmmaBlockK, wg.row);
  }
}

// Pass p of v[m] = sum_k W_m[c][k] * bf16(x[r][k]) (m < kMats) over columns c < in.ncols and
// token rows r < in.nrows, where group_of(m, c) (c a multiple of kWgmmaGroupRows) names the
// map and first row of W_m[c .. c + 16) and src_row(r) the fp32 activations (scaled by
// in.row_scale, normed by in.norm): writes the pass's tables into `smem` (at least
// kWgmmaCoreBytes, kWgmmaDeepCoreBytes when `deep` (64-row passes only), kWgmmaWideCoreBytes
// when kRows is 128) and describes it in `pass` for run_wgmma_pass. The caller has
// synchronized before; ends with __syncthreads.
template <int kMats, int kRows, typename SrcRow, typename GroupOf>
__device__ void wgmma_pass_setup(const ProjectionInput& in, char* smem, bool deep, int p,
                                 SrcRow src_row, GroupOf group_of, WgmmaPass& pass) {
  static_assert(kRows == 64 || kRows == 128);
  const WgmmaLayout<kRows> l(smem, deep);
  const WgmmaPassShape<kMats, kRows> sh(in, p);
  const int tid = threadIdx.x;
  for (int n = tid; n < kRows; n += blockDim.x) {
    l.x_rows[n] = n < sh.nr ? src_row(sh.r0 + n) : nullptr;
    l.x_scale[n] = (n < sh.nr && in.row_scale != nullptr) ? in.row_scale[sh.r0 + n] : 1.0f;
  }
  if (tid < sh.ngroups) {
    const auto at = [&](int g) { return sh.group(g, group_of); };
    WeightGroup wg = at(tid);
    // [WIDE_BOX] A quad of the table (groups 4q .. 4q + 3) whose rows follow each other in
    // one matrix comes in one box.
    const int q = tid & ~3;
    bool wide = pass.wide_maps != 0 && q + 3 < sh.ngroups;
    const WeightGroup first = tid == q ? wg : at(q);
    for (int i = 1; wide && i < 4; ++i) {
      const WeightGroup o = q + i == tid ? wg : at(q + i);
      wide = o.map == first.map && o.row == first.row + i * kWgmmaGroupRows;
    }
    wg.span = wide ? (tid == q ? 4 : 0) : 1;
    l.groups[tid] = wg;
  }
  if (tid == 0) {
    pass.smem = smem;
    pass.norm = in.norm;
    pass.rows = kRows;
    pass.deep = deep;
    pass.nr = sh.nr;
    pass.K = in.K;
    pass.k0 = in.k0;
    pass.ngroups = sh.ngroups;
    pass.act_mode = kActConvert;
    const int32_t row0 = in.first_row + sh.r0;
    if (in.bf16_map != nullptr && row0 >= 0 && row0 + sh.nr <= in.bf16_rows) {
      pass.act_mode = kActCached;  // rows past nr: another block's, or zeros past the map
      pass.act_row = row0;
      pass.act_map = in.bf16_map;
    } else if (in.k0 == 0 && act_cacheable(pass.cache, in.cache_tag, in.K, row0, kRows)) {
      uint64_t* flag = pass.cache.flags + row0 / kActFlagRows;
      const uint64_t key = act_block_key(pass.cache.epoch, in.cache_tag, sh.nr, kRows);
      pass.act_mode = claim_act_block(load_acquire_gpu(flag), key, [&](uint64_t e, uint64_t d) {
        return cas_acquire_gpu(flag, e, d);
      });
      pass.act_row = row0;
      pass.act_map = pass.cache.map;
      pass.act_flag = flag;
      pass.act_key = key;
    }
  }
  __syncthreads();  // every thread reads `pass` (and the tables) in run_wgmma_pass
}

// out[r * ld + c] (+)= dstage[r][c] for r < nr, c < nc (`add`: added to what is there, else
// stored): where it adds, each thread loads kAddBatch values (4 floats each where the rows
// allow float4) before it adds and stores any, so that a batch's loads are in flight
// together; an emit per element that reads what it adds to waits for each load in turn (a
// 128 x 256 tile's 128 loads per thread). A function of its own (a call), so that its loaded
// values stay in registers: inlined into dispatch, whose registers are all taken, they went
// to local memory one load at a time, each store waiting for its load.
inline constexpr int kAddBatch = 4;
__device__ __noinline__ void wgmma_pass_to_rows(float* out, int ld, const float* dstage, int nr,
                                                int nc, bool add) {
  __builtin_assume(__isShared(dstage));
  const bool vec = nc % 4 == 0 && ld % 4 == 0 && (reinterpret_cast<uintptr_t>(out) & 15) == 0;
  const int width = vec ? 4 : 1;  // floats per item
  const int per_row = nc / width, items = nr * per_row;
  const auto at_of = [&](int i) {  // item i's first float
    return out + static_cast<int64_t>(i / per_row) * ld + i % per_row * width;
  };
  const auto staged = [&](int i) {
    return dstage + i / per_row * kWgmmaDStride + i % per_row * width;
  };
  if (!add) {
    for (int i = threadIdx.x; i < items; i += blockDim.x) {
      if (vec) {
        *reinterpret_cast<float4*>(at_of(i)) = *reinterpret_cast<const float4*>(staged(i));
      } else {
        *at_of(i) = *staged(i);
      }
    }
    return;
  }
  for (int i0 = threadIdx.x; i0 < items; i0 += blockDim.x * kAddBatch) {
    float4 old[kAddBatch];
#pragma unroll
    for (int u = 0; u < kAddBatch; ++u) {
      const float* at = at_of(min(i0 + u * static_cast<int>(blockDim.x), items - 1));  // in range
      old[u] = vec ? *reinterpret_cast<const float4*>(at) : make_float4(*at, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int u = 0; u < kAddBatch; ++u) {
      const int i = i0 + u * static_cast<int>(blockDim.x);
      if (i >= items) break;
      float* at = at_of(i);
      const float* d = staged(i);
      if (vec) {
        const float4 x = *reinterpret_cast<const float4*>(d);
        *reinterpret_cast<float4*>(at) =
            make_float4(old[u].x + x.x, old[u].y + x.y, old[u].z + x.z, old[u].w + x.w);
      } else {
        *at = old[u].x + d[0];
      }
    }
  }
}

// An emit that also takes a whole pass: emit.pass(dstage, r0, nr, c0, nc, cstride) hands it
// the staged outputs of token rows r0 + [0, nr) and columns c0 + [0, nc), matrix m's column c
// of row r at dstage[r * kWgmmaDStride + m * cstride + c]; each row's floats from
// kWgmmaPassB on (kWgmmaDStride - kWgmmaPassB of them) are the emit's scratch.
template <typename Emit>
concept PassEmit = requires(Emit e, float* d) {
  e.pass(d, 0, 0, 0, 0, 0);
};
static_assert(kWgmmaDStride - kWgmmaPassB >= 4);

// Hands pass p's outputs, staged by run_wgmma_pass, to emit(c, r, v[kMats]) once per column
// and token row of the pass (or to emit.pass); ends with __syncthreads.
template <int kMats, int kRows, typename Emit>
__device__ void wgmma_pass_emit(const ProjectionInput& in, char* smem, bool deep, int p,
                                Emit emit) {
  const WgmmaLayout<kRows> l(smem, deep);
  const WgmmaPassShape<kMats, kRows> sh(in, p);
  if constexpr (PassEmit<Emit>) {
    emit.pass(l.dstage, sh.r0, sh.nr, sh.c0, sh.nc, sh.cstride);
  } else {
    for (int i = threadIdx.x; i < sh.nr * sh.nc; i += blockDim.x) {
      const int r = i / sh.nc, c = i % sh.nc;  // consecutive threads: consecutive columns
      float v[kMats];
#pragma unroll
      for (int m = 0; m < kMats; ++m) v[m] = l.dstage[r * kWgmmaDStride + m * sh.cstride + c];
      emit(sh.c0 + c, sh.r0 + r, v);
    }
  }
  __syncthreads();  // emitted values visible; the memory free for the next pass
}

// Accumulator of m64nNk16 into the epilogue's dstage ([r][c] fp32), warp w4 = warp within
// the warpgroup: for each 8-column block b, registers 4b..4b+3 hold (r, c), (r, c + 1),
// (r + 8, c), (r + 8, c + 1) with r = 16 w4 + lane / 4, c = 8b + 2 (lane % 4); warpgroup w's
// block starts at row 64 w (128-row passes) or column 128 w (64-row passes).
template <int kRows, int kAcc>
__device__ __forceinline__ void stage_accumulators(const float (&acc)[kAcc], float* dstage,
                                                   int tid) {
  constexpr bool kWide = kRows == 128;
  const int wg = tid >> 7, w4 = (tid >> 5) & 3, lane = tid & 31;
  const int r = 16 * w4 + (lane >> 2), c = 2 * (lane & 3);
  float* d = dstage + (kWide ? wg * 64 * kWgmmaDStride : wg * (kWgmmaPassB / 2));
#pragma unroll
  for (int b = 0; b < kAcc / 4; ++b) {
    *reinterpret_cast<float2*>(d + r * kWgmmaDStride + 8 * b + c) =
        make_float2(acc[4 * b], acc[4 * b + 1]);
    *reinterpret_cast<float2*>(d + (r + 8) * kWgmmaDStride + 8 * b + c) =
        make_float2(acc[4 * b + 2], acc[4 * b + 3]);
  }
}

// One k-block's wgmmas of a warpgroup, committed as one group: A and B at shared-memory
// addresses a and b (64 k of 128-byte-swizzled K-major rows each), m64n256k16 (128-row
// passes) or m64n128k16 into acc; the pass's first k-block overwrites acc. Inlined like the
// k-loops that call it [WGMMA_WALK].
template <bool kWide, int kAcc>
__device__ __forceinline__ void wgmma_k_block(float (&acc)[kAcc], uint32_t a, uint32_t b,
                                              bool first) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint32_t koff = kk * 32;  // 16 k = 32 bytes along the swizzled row
    const uint64_t da = hopper::make_smem_desc_k_sw128(a + koff);
    const uint64_t db = hopper::make_smem_desc_k_sw128(b + koff);
    const uint32_t accumulate = first && kk == 0 ? 0u : 1u;
    if constexpr (kWide) {
      hopper::wgmma_m64n256k16_bf16(acc, da, db, accumulate);
    } else {
      hopper::wgmma_m64n128k16_bf16(acc, da, db, accumulate);
    }
  }
  hopper::wgmma_commit_group();
}

// The k-loop of the pass that `pass` describes (wgmma_pass_setup), by the whole CTA: its
// accumulators staged as fp32 in the layout's dstage ([r][m * cstride + c]). Inlined into the
// entry function [WGMMA_WALK]; ends with __syncthreads.
template <int kRows>
__device__ __forceinline__ void run_wgmma_pass_rows(const WgmmaPass& pass, WgmmaPipe pipe) {
  constexpr bool kWide = kRows == 128;
  constexpr int kAcc = kWide ? 128 : 64;  // accumulator registers per thread
  constexpr int kABytes = WgmmaLayout<kRows>::kABytes;
  constexpr int kRingBytes = WgmmaLayout<kRows>::kRingBytes;
  constexpr int kQuads = kRows * (kWgmmaBlockK / 4) / kMegakernelThreads;  // per thread
  const bool deep = pass.deep;
  const WgmmaLayout<kRows> l(pass.smem, deep);
  // The thread index read afresh (an opaque asm value), so that what derives from it is
  // computed here rather than once at kernel start and kept, across the op's calls, in local
  // memory (ptxas reloaded 15 such words every k-block of the 128-row loop).
  int tid;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(tid));
  const int wg = tid >> 7;
  const int n_stages = l.n_stages, slots = l.slots;
  uint64_t* const full = pipe.full + (deep ? 3 : 0);
  uint32_t* const consumed = pipe.consumed + (deep ? 1 : 0);
  const int K = pass.K, nr = pass.nr, ngroups = pass.ngroups, k0 = pass.k0;
  const int32_t wide_maps = pass.wide_maps;
  const uint16_t* const norm = pass.norm;
  const int nk = (K + kWgmmaBlockK - 1) / kWgmmaBlockK;
  char* const stages = l.stages;
  char* const abuf = l.abuf;
  char* const ring = l.ring;
  const float** const x_rows = l.x_rows;
  const float* const x_scale = l.x_scale;
  const WeightGroup* const groups = l.groups;
  // kActFill: every converted A value of the pass's nr rows also goes to the activation
  // cache, at [act_row + row][k] (rows past nr are another block's, or no block's).
  uint16_t* const fill = pass.act_mode == kActFill
                             ? pass.cache.rows + static_cast<int64_t>(pass.act_row) * K
                             : nullptr;

  // Earlier generic accesses of this memory (the tables just written, the previous pass's
  // epilogue, other ops) are ordered before the TMA writes and wgmma reads that follow.
  hopper::fence_proxy_async_shared();
  __syncthreads();
  const uint32_t done = *consumed;
  const uint32_t tx_bytes = ngroups * kWgmmaGroupRows * 128;

  // K-block j's weight groups into stage (done + j) % n_stages, by `warps` warps (all 8, or
  // one warpgroup's 4) calling together: the first thread of those warps arms the barrier,
  // lane 0 of their warp w copies groups w, w + warps, ... (so no warp issues all 16 copies; a
  // copy that lands before the arming only drives the transaction count negative, and the
  // phase cannot complete before the arming arrival).
  const auto issue = [&](int j, int warps) {
    const uint32_t s = (done + j) % n_stages;
    uint64_t* bar = &full[s];
    if ((tid & (32 * warps - 1)) == 0) hopper::mbarrier_arrive_expect_tx(bar, tx_bytes);
    if ((tid & 31) != 0) return;
    char* dst = stages + s * kWgmmaStageBytes;
    const int ahead = j + pass.l2_ahead;  // [L2_AHEAD]: read here, not kept across the loop
    for (int g = (tid >> 5) & (warps - 1); g < ngroups; g += warps) {
      copy_weight_group(groups[g], g, dst, bar, k0 + j * kWgmmaBlockK, wide_maps);
      if (ahead > j && ahead < nk) {
        weight_group_to_l2(groups[g], k0 + ahead * kWgmmaBlockK, wide_maps);
      }
    }
  };
  // This thread's share of k-block j's A: kQuads quads (row, 4 k) of the kRows x 64 block, all
  // at the same k (so one norm quad), quad i at ring offset quad(i) * 16 bytes: rows of both
  // warpgroups (64-row passes), or of its own warpgroup's 64 (128-row passes).
  const int kq = (tid & 15) * 4;
  // quad(t, i) from a thread index t read afresh in each k-block (fresh_tid), so that the
  // kQuads row-table and ring addresses are recomputed there rather than kept live across
  // the k-loop (in the 128-row loop they were, and spilled).
  const auto fresh_tid = [] {
    int t;
    asm volatile("mov.u32 %0, %%tid.x;" : "=r"(t));
    return t;
  };
  const auto quad = [](int t, int i) {
    return kWide ? (t & 127) + i * 128 + (t >> 7) * 1024 : t + i * kMegakernelThreads;
  };
  const auto fetch_a = [&](int j) {
    if (j < nk) {
      char* slot = ring + (j % slots) * kRingBytes;
      const int t = fresh_tid();
#pragma unroll
      for (int i = 0; i < kQuads; ++i) {
        const int q = quad(t, i), row = q >> 4, k = j * kWgmmaBlockK + kq;
        const bool ok = row < nr && k < K;
        cp_async16(smem_addr(slot + q * 16), ok ? x_rows[row] + k : x_rows[0], ok ? 16 : 0);
      }
    }
    cp_async_commit();  // one group per k-block, empty past the end, so the waits count
  };
  const auto load_norm = [&](int j) {
    const int k = j * kWgmmaBlockK + kq;
    return (norm != nullptr && j < nk && k < K) ? __ldg(reinterpret_cast<const uint2*>(norm + k))
                                                : make_uint2(0x3f803f80u, 0x3f803f80u);  // 1.0
  };
  const auto store_a = [&](int j, uint2 nw) {
    const char* slot = ring + (j % slots) * kRingBytes;
    char* dst = abuf + (j % 3) * kABytes;
    const float2 w0 = unpack_bf16x2(nw.x), w1 = unpack_bf16x2(nw.y);
    const int t = fresh_tid();
#pragma unroll 2
    for (int i = 0; i < kQuads; ++i) {
      const int q = quad(t, i), row = q >> 4, c4 = q & 15;
      const float4 x = *reinterpret_cast<const float4*>(slot + q * 16);
      const uint2 v = normed_bf16x4(x, x_scale[row], w0, w1);
      *reinterpret_cast<uint2*>(dst + row * 128 + (((c4 >> 1) ^ (row & 7)) << 4) + (c4 & 1) * 8) =
          v;
      const int k = j * kWgmmaBlockK + c4 * 4;
      if (fill != nullptr && k < K && row < nr) {
        *reinterpret_cast<uint2*>(fill + row * K + k) = v;
      }
    }
  };

  for (int j = 0; j < n_stages - 1 && j < nk; ++j) issue(j, kMegakernelWarps);
  for (int j = 0; j < slots; ++j) fetch_a(j);
  uint2 norm_next = load_norm(1);
  cp_async_wait(slots - 1);  // k-block 0's quads landed
  store_a(0, load_norm(0));
  fetch_a(slots);  // into the slot k-block 0 left: this thread has read it back
  hopper::fence_proxy_async_shared();
  __syncthreads();

  float acc[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) acc[i] = 0.0f;
  hopper::wgmma_fence_operands(acc);
  // 64-row passes: both warpgroups read all of A and half of the stage each; 128-row passes:
  // half of A each (64 rows, 8 KB in) and all of the stage.
  const uint32_t a_base = smem_addr(abuf) + (kWide ? wg * (kABytes / 2) : 0);
  const uint32_t b_base = smem_addr(stages) + (kWide ? 0 : wg * (kWgmmaStageBytes / 2));
  for (int j = 0; j < nk; ++j) {
    // 128-row passes load k-block j + 1's norm one k-block ahead, not two: their 128
    // accumulators leave no registers to carry two across the wgmmas.
    const uint2 norm_now = kWide ? load_norm(j + 1) : norm_next;
    if (!kWide) norm_next = load_norm(j + 2);
    const uint32_t s = (done + j) % n_stages;
    hopper::mbarrier_wait_parity(&full[s], ((done + j) / n_stages) & 1);
    hopper::wgmma_fence();
    wgmma_k_block<kWide>(acc, a_base + (j % 3) * kABytes, b_base + s * kWgmmaStageBytes, j == 0);
    if (j + 1 < nk) {
      cp_async_wait(slots - 1);  // k-block j + 1's quads (fetched `slots` k-blocks ago)
      store_a(j + 1, norm_now);
      hopper::fence_proxy_async_shared();
    }
    // Into the slot k-block j + 1 just left: this thread's reads of it are done (the
    // converted values it stored depended on them), and only this thread reads what it copies.
    fetch_a(j + 1 + slots);
    hopper::wgmma_wait<1>();  // k-block j - 1's wgmmas retired: its stage and A are free
    if constexpr (kWide) {
      // Each warpgroup converts and multiplies its own rows, so only its own threads meet
      // here, and the two drift apart: one converts while the other's wgmmas run. A stage is
      // refilled by the warpgroup that releases it second (`released` counts both releases of
      // every use: odd before = second); the first pass's first refill, into the stage the
      // last pass left, by warpgroup 0.
      bool* const second = l.second + (j & 1) * 2 + wg;
      if ((tid & 127) == 0) {
        *second =
            j == 0 ? wg == 0 : (atomicAdd(&pipe.released[(done + j - 1) % n_stages], 1u) & 1u);
      }
      hopper::named_barrier_sync(1 + wg, 128);
      if (*second && j + n_stages - 1 < nk) issue(j + n_stages - 1, 4);
    } else {
      __syncthreads();
      if (j + n_stages - 1 < nk) issue(j + n_stages - 1, kMegakernelWarps);
    }
  }
  cp_async_wait(0);
  hopper::wgmma_wait<0>();
  hopper::wgmma_fence_operands(acc);
  // The cache's rows, written above, are read by the TMA unit from the next pass on.
  if (fill != nullptr) hopper::fence_proxy_async_global();
  __syncthreads();  // every wgmma of both warpgroups retired: the stages are free
  stage_accumulators<kRows>(acc, l.dstage, tid);
  if (tid == 0) {
    *consumed = (done + nk) % (2 * n_stages);  // stage and phase, without a wrap at 2^32
    // Every thread's cache rows written and fenced before the barrier above: publish them
    // (the device-wide fence first, as the controller's signals do, so that the release
    // covers the other threads' writes as well as this one's).
    if (fill != nullptr) {
      __threadfence();
      store_release_gpu(pass.act_flag, pass.act_key | 1);
    }
  }
  __syncthreads();  // the staged outputs visible to the op's emit
}

// A pass whose A operand is in bf16 in global memory (kActCached: the activation cache
// [ACT_CACHE], or activations an op wrote in bf16, ProjectionInput::bf16_map): the TMA unit
// copies each k-block's A (kRows rows x 64 k, in boxes of 64 rows) into its stage beside the
// weights, so no thread converts anything and the warps only wait, multiply and refill.
// Stages of weights + A: 4 (128-row and deep 64-row passes, on the deep barriers) or 3 (the
// shallow barriers), in the core's memory (static_asserts below). Every k-block ends with a
// CTA-wide barrier after its warpgroup retired the previous k-block's wgmmas, after which the
// refill of that k-block's stage is issued, as in the 64-row converting passes.
template <int kRows>
__device__ __forceinline__ void run_wgmma_pass_cached(const WgmmaPass& pass, WgmmaPipe pipe) {
  constexpr bool kWide = kRows == 128;
  constexpr int kAcc = kWide ? 128 : 64;
  constexpr int kABytes = WgmmaLayout<kRows>::kABytes;
  int tid;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(tid));
  const int wg = tid >> 7;
  const bool deep = pass.deep;
  const WgmmaLayout<kRows> l(pass.smem, deep);
  const bool four = kWide || deep;
  const int n_stages = four ? 4 : 3;
  uint64_t* const full = pipe.full + (four ? 3 : 0);
  uint32_t* const consumed = pipe.consumed + (four ? 1 : 0);
  const int K = pass.K, ngroups = pass.ngroups, k0 = pass.k0;
  const int32_t wide_maps = pass.wide_maps;
  const int nk = (K + kWgmmaBlockK - 1) / kWgmmaBlockK;
  char* const stages = l.stages;
  char* const abuf = stages + n_stages * kWgmmaStageBytes;  // [n_stages][kABytes]
  const WeightGroup* const groups = l.groups;
  const auto* const amap = static_cast<const CUtensorMap*>(pass.act_map);
  const int arow = pass.act_row;

  // The cache rows that thread 0 acquired (another CTA's generic writes) before the TMA
  // unit's reads of them.
  hopper::fence_proxy_async_global();
  hopper::fence_proxy_async_shared();
  __syncthreads();
  const uint32_t done = *consumed;
  const uint32_t tx_bytes = ngroups * kWgmmaGroupRows * 128 + kABytes;
  // K-block j's weight groups and A into stage (done + j) % n_stages, by all warps: thread 0
  // arms the barrier, lane 0 of warp w copies groups w, w + 8, ..., the last warp's also A.
  const auto issue = [&](int j) {
    const uint32_t s = (done + j) % n_stages;
    uint64_t* bar = &full[s];
    if (tid == 0) hopper::mbarrier_arrive_expect_tx(bar, tx_bytes);
    if ((tid & 31) != 0) return;
    char* dst = stages + s * kWgmmaStageBytes;
    const int warp = tid >> 5;
    const int ahead = j + pass.l2_ahead;  // [L2_AHEAD]: read here, not kept across the loop
    for (int g = warp; g < ngroups; g += kMegakernelWarps) {
      copy_weight_group(groups[g], g, dst, bar, k0 + j * kWgmmaBlockK, wide_maps);
      if (ahead > j && ahead < nk) {
        weight_group_to_l2(groups[g], k0 + ahead * kWgmmaBlockK, wide_maps);
      }
    }
    if (warp == kMegakernelWarps - 1) {
#pragma unroll
      for (int b = 0; b < kRows / kActCacheBoxRows; ++b) {
        hopper::tma_load_2d(abuf + s * kABytes + b * kActCacheBoxRows * kWgmmaARowBytes, amap, bar,
                            k0 + j * kWgmmaBlockK, arow + b * kActCacheBoxRows);
      }
    }
  };
  for (int j = 0; j < n_stages - 1 && j < nk; ++j) issue(j);

  float acc[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) acc[i] = 0.0f;
  hopper::wgmma_fence_operands(acc);
  const uint32_t a_base = smem_addr(abuf) + (kWide ? wg * (kABytes / 2) : 0);
  const uint32_t b_base = smem_addr(stages) + (kWide ? 0 : wg * (kWgmmaStageBytes / 2));
  for (int j = 0; j < nk; ++j) {
    const uint32_t s = (done + j) % n_stages;
    hopper::mbarrier_wait_parity(&full[s], ((done + j) / n_stages) & 1);
    hopper::wgmma_fence();
    wgmma_k_block<kWide>(acc, a_base + s * kABytes, b_base + s * kWgmmaStageBytes, j == 0);
    hopper::wgmma_wait<1>();  // k-block j - 1's wgmmas retired: its stage is free
    __syncthreads();
    if (j + n_stages - 1 < nk) issue(j + n_stages - 1);
  }
  hopper::wgmma_wait<0>();
  hopper::wgmma_fence_operands(acc);
  __syncthreads();  // every wgmma of both warpgroups retired: the stages are free
  stage_accumulators<kRows>(acc, l.dstage, tid);
  if (tid == 0) *consumed = (done + nk) % (2 * n_stages);  // as in run_wgmma_pass_rows
  __syncthreads();  // the staged outputs visible to the op's emit
}
// Weights + A stages of the cached passes fit where the converting passes' layout lies.
static_assert(4 * (kWgmmaStageBytes + 128 * kWgmmaARowBytes) <= wgmma_layout_bytes(3, 2, 128));
static_assert(4 * (kWgmmaStageBytes + 64 * kWgmmaARowBytes) <= wgmma_layout_bytes(4, 3, 64));
static_assert(3 * (kWgmmaStageBytes + 64 * kWgmmaARowBytes) <= wgmma_layout_bytes(3, 2, 64));

__device__ __forceinline__ void run_wgmma_pass(const WgmmaPass& pass, WgmmaPipe pipe) {
  if (pass.act_mode == kActCached) {
    if (pass.rows == 128) {
      run_wgmma_pass_cached<128>(pass, pipe);
    } else {
      run_wgmma_pass_cached<64>(pass, pipe);
    }
  } else if (pass.rows == 128) {
    run_wgmma_pass_rows<128>(pass, pipe);
  } else {
    run_wgmma_pass_rows<64>(pass, pipe);
  }
}

}  // namespace megaserve::kernels
