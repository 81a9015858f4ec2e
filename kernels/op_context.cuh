// What every op sees: the model (constant), the current step's descriptor and the CTA's
// dynamic shared memory, all already in shared memory (copied by the controller).
#pragma once

#include "engine/isa/isa.h"
#include "kernels/act_cache.h"
#include "kernels/megakernel.h"

namespace megaserve::kernels {

// The wgmma core's pipeline state in static shared memory (controller.cuh, CtaState;
// kernels/tile_wgmma.cuh [WGMMA_PIPE]).
struct WgmmaPipe {
  uint64_t* full;      // [kWgmmaBarriers]: 3 of the shallow depth, then 4 of the deep one
  uint32_t* consumed;  // [2] per depth: k-blocks consumed so far, stage and phase of the next
  uint32_t* released;  // [3] per shallow stage: warpgroup releases (128-row passes)
};

// One wgmma pass as an op describes it for the entry function's k-loop (kernels/tile_wgmma.cuh
// [WGMMA_WALK]; static shared memory, CtaState): the core's shared memory, whose tables the op
// has written, and what the loop needs besides them.
struct WgmmaPass {
  char* smem;
  const uint16_t* norm;  // bf16 RMSNorm weight per k, or null
  int32_t rows;          // token rows per pass: 64 or 128
  bool deep;             // 64-row passes: the deep pipeline
  int32_t nr, K, ngroups;
  int32_t k0;           // ProjectionInput::k0: added to the k of every TMA load [SPLIT_K]
  int32_t act_mode;     // ActMode [ACT_CACHE]
  int32_t act_row;      // the pass's first token row: its block's rows in the cache
  const void* act_map;  // kActCached: the CUtensorMap A comes through
  uint64_t* act_flag;   // kActFill: the flag to publish act_key | 1 on
  uint64_t act_key;
  ActCache cache;     // set once per CTA (the epoch per step)
  int32_t wide_maps;  // DeviceModel::wide_maps, per step (0 with kStepWgmmaNarrowBoxes)
  int32_t l2_ahead;   // k-blocks the weights start into L2 past the stages (0: none) [L2_AHEAD]
};

// The row scales (1 / rms) of the last chunk of rows a projection normalized on this CTA, and
// which (opcode, layer, first row, rows) they belong to; n = -1 at the start of every step.
// The planner deals a projection's tiles of one row block to the same SM in turn
// (engine/planner group_rows), so the next tile usually needs the same scales: it copies
// them instead of reading the rows again (each gate/up tile of 128 rows read 2 MB from L2).
struct NormCache {
  int32_t opcode, layer, begin, n;
  float scale[kProjectionScaleRows];
};

// Where the bf16 copy of the attention output at `out` (an element of st.attn_out) goes
// (DeviceModel::attn_act), or null where the model keeps none for that row.
__device__ inline uint16_t* attn_act_at(const DeviceModel& md, const DeviceStepDesc& st,
                                        const float* out) {
  if (md.attn_act == nullptr) return nullptr;
  const int64_t at = out - st.attn_out;
  return at / (static_cast<int64_t>(md.q_heads) * md.head_dim) < md.attn_act_rows ? md.attn_act + at
                                                                                  : nullptr;
}

struct BulkState;  // kernels/tile_matvec_bulk.cuh

struct OpContext {
  const DeviceModel& model;
  const DeviceStepDesc& step;
  float* smem;          // dynamic shared memory, free for the op between __syncthreads
  int32_t smem_floats;  // its size in floats
  // The op's calls for this instruction before this one: a projection sets up its wgmma pass
  // number `call` in `*pass` and returns true, or finishes and returns false [WGMMA_WALK].
  int32_t call;
  WgmmaPass* pass;
  NormCache* norm_cache;  // static shared memory (CtaState)
  BulkState* bulk;        // static shared memory (CtaState) [MATVEC_BULK]
};

}  // namespace megaserve::kernels
