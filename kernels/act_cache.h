// The wgmma core's activation cache [ACT_CACHE] (kernels/tile_wgmma.cuh): which A operand a
// CTA's rows of DeviceModel::act_cache hold, and how a pass gets its A. Plain integer logic,
// shared by the device code and a host test (tests/kernels/act_cache_test.cc).
//
// Why: the planner deals a projection's tiles of one row block to the same SM in turn, so a
// CTA multiplies the same activation block by tile after tile of weights (at an 8192-token
// prefill on Llama-3.1-8B, ~54 gate/up tiles per CTA and layer). Converting that block (fp32
// rows x row scale x norm weight, rounded to bf16 twice) again for every tile kept the warps
// busy with ~30 instructions per 4 values while the tensor cores waited. The first pass over
// a block converts it as before and also stores the bf16 A to the cache; the passes after it
// have the TMA unit copy A from there beside the weights. The values are the same bits either
// way, so nothing changes numerically.
#pragma once

#include <stdint.h>

#include "engine/isa/host_device.h"

namespace megaserve::kernels {

// This CTA's rows of the activation cache and what they hold: the bf16 A operand, every k, of
// the last pass that filled them. Set once per CTA; the key reset at every step (the rows it
// names are rewritten between steps).
struct ActCache {
  uint16_t* rows;   // kActCacheRows x width bf16 in global memory, or null: no cache
  const void* map;  // the CUtensorMap of every CTA's rows
  int32_t map_row;  // this CTA's first row in the map
  int32_t width;    // k per row (the model's hidden size)
  // The key: the activations' tag (ProjectionInput::cache_tag; -1: nothing held), the pass's
  // first source row, its token rows and rows per pass.
  int32_t tag;
  const float* src;
  int32_t nr, pass_rows;
};

// How a pass gets its A operand.
enum ActMode : int32_t {
  kActConvert = 0,  // from the fp32 activations (cp.async ring, converted by every thread)
  kActFill = 1,     // the same, and stored into the activation cache on the way
  kActCached = 2,   // from the activation cache, by the TMA unit beside the weights
};

// The mode of a pass over activations tagged `tag` (-1: never cached) with reduction width K,
// whose first source row is `src`, of nr token rows in passes of pass_rows: from the cache when
// it holds this very block (same tag, source rows and pass shape: the rows an op reads do not
// change while its tiles run, and the key is reset at every step); else converted, and stored
// into the cache (which then holds this block) when the activations may be cached and are as
// wide as its rows. By one thread.
MEGASERVE_HOST_DEVICE inline int32_t choose_act_mode(ActCache& c, int32_t tag, int32_t K,
                                                     const float* src, int32_t nr,
                                                     int32_t pass_rows) {
  if (tag < 0 || c.rows == nullptr || K != c.width) return kActConvert;
  if (c.tag == tag && c.src == src && c.nr == nr && c.pass_rows == pass_rows) return kActCached;
  c.tag = tag;
  c.src = src;
  c.nr = nr;
  c.pass_rows = pass_rows;
  return kActFill;
}

}  // namespace megaserve::kernels
