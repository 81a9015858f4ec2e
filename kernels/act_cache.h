// The wgmma core's activation cache [ACT_CACHE] (kernels/tile_wgmma.cuh): the bf16 A operand
// of a pass (a block of token rows, every k), kept in DeviceModel::act_cache at its token
// rows, so that the passes after the first over the same block take it with the TMA unit
// instead of converting the fp32 rows again. Which block a region holds is claimed and
// published through one flag word per kActFlagRows token rows. Plain integer logic, shared
// by the device code and a host test (tests/kernels/act_cache_test.cc).
//
// Why: a projection's tiles over one row block (a row of tiles) are dealt to several SMs,
// each several in turn (engine/planner group_rows); converting the block (fp32 rows x row
// scale x norm weight, rounded to bf16 twice) for every tile kept the warps busy with ~30
// instructions per 4 values while the tensor cores waited. Per CTA, the cache (a first
// version) streamed 1 MB per pass from DRAM (132 CTAs' copies do not fit in L2); shared, the
// SMs working on one row block read the same copy, from L2.
//
// Protocol, per (flag, key): the first CTA whose pass finds neither the key nor key | 1
// claims the flag with a compare-and-swap (key), converts the block and stores it, then
// publishes key | 1 (release); a CTA that finds key (being filled) converts for itself; one
// that finds key | 1 (acquire) reads the cache. Keys hold the step's epoch, so a step never
// mistakes another step's blocks for its own and no flag needs clearing between steps.
//
// What keeps a fill from overwriting rows another pass still reads: the ops that share the
// cache (QKV, output projection, gate/up of every layer) use a token row's region strictly one
// after another, because every op's tiles wait for all the tiles of the stage before it
// (engine/planner schedule_assembler.h), and QKV -> attention -> output -> gate/up -> down ->
// the next layer's QKV is such a chain, and the LM head (which keeps its sampling rows at
// their sampling index, not their token row) waits for all of the last layer's down tiles. A
// fill of 128 rows also overwrites the rows under the next flag without touching it; that is
// safe for the same reason. Tagging another op, or finer-grained waits, needs this argument
// made again.
#pragma once

#include <stdint.h>

#include "engine/isa/host_device.h"

namespace megaserve::kernels {

// Token rows per flag word: passes start at multiples of it (64 and 128 rows).
inline constexpr int kActFlagRows = 64;

// The cache as a CTA sees it; set once per CTA, the epoch at every step.
struct ActCache {
  uint16_t* rows;    // [capacity, width] bf16 in global memory, or null: no cache
  const void* map;   // its CUtensorMap
  uint64_t* flags;   // [capacity / kActFlagRows]
  int32_t capacity;  // token rows
  int32_t width;     // k per row (the model's hidden size)
  uint32_t epoch;    // this step's (DeviceStepDesc::epoch)
};

// How a pass gets its A operand.
enum ActMode : int32_t {
  kActConvert = 0,  // from the fp32 activations (cp.async ring, converted by every thread)
  kActFill = 1,     // the same, and stored into the activation cache on the way
  kActCached = 2,   // from the activation cache, by the TMA unit beside the weights
};

// The flag key of a block: the step's epoch, the activations' tag (ProjectionInput::cache_tag,
// < 2^20), the pass's rows per pass (64 or 128) and its token rows nr (1..128); bit 0 (ready)
// clear. The rows and nr are in the key because a block's stored rows are its nr rows.
MEGASERVE_HOST_DEVICE constexpr uint64_t act_block_key(uint32_t epoch, int32_t tag, int32_t nr,
                                                       int32_t pass_rows) {
  return (static_cast<uint64_t>(epoch) << 32) | (static_cast<uint64_t>(tag & 0xfffff) << 12) |
         (static_cast<uint64_t>(pass_rows == 128) << 9) | (static_cast<uint64_t>(nr - 1) << 1);
}

// Whether a pass of `pass_rows` over token rows [row0, row0 + pass_rows) of activations tagged
// `tag` (-1: never) with reduction width K may use the cache at all.
MEGASERVE_HOST_DEVICE inline bool act_cacheable(const ActCache& c, int32_t tag, int32_t K,
                                                int32_t row0, int32_t pass_rows) {
  return tag >= 0 && c.rows != nullptr && K == c.width && row0 >= 0 && row0 % kActFlagRows == 0 &&
         row0 + pass_rows <= c.capacity;
}

// The mode of a pass whose block has key `key`, from the flag's value `seen`: cached when
// published, converted while another CTA fills it, else an attempt to claim it:
// cas(expected, desired) swaps the flag and returns the value it held (the claim won when
// that is `seen`). By one thread.
template <typename Cas>
MEGASERVE_HOST_DEVICE int32_t claim_act_block(uint64_t seen, uint64_t key, Cas cas) {
  if (seen == (key | 1)) return kActCached;
  if (seen == key) return kActConvert;
  const uint64_t held = cas(seen, key);
  if (held == seen) return kActFill;
  return held == (key | 1) ? kActCached : kActConvert;
}

}  // namespace megaserve::kernels
