// Layout of the paged KV cache of one rank and one layer, shared by the builder (which
// records the cache regions each instruction touches) and the executors, the CPU
// interpreter's ops and the megakernel's (host and device code):
//   K and V each [num_blocks, kv_heads, block_size, head_dim], kv_heads = this rank's heads.
// Token at position p of a request lives in block block_table[p / block_size], slot
// p % block_size.
#pragma once

#include <cstdint>

#include "engine/isa/isa.h"  // MEGASERVE_ISA_HD

namespace megaserve::engine {

struct KvCacheLayout {
  int32_t num_blocks = 0;
  int32_t kv_heads = 0;  // per rank
  int32_t block_size = 0;
  int32_t head_dim = 0;

  // Row of the (block, kv head) plane when the cache is viewed as
  // [num_blocks * kv_heads rows, block_size * head_dim elements].
  MEGASERVE_ISA_HD int64_t plane(int32_t block, int32_t kv_head) const {
    return static_cast<int64_t>(block) * kv_heads + kv_head;
  }
  MEGASERVE_ISA_HD int64_t plane_elements() const {
    return static_cast<int64_t>(block_size) * head_dim;
  }
  // Element offset of (block, kv head, slot, 0).
  MEGASERVE_ISA_HD int64_t offset(int32_t block, int32_t kv_head, int32_t slot) const {
    return plane(block, kv_head) * plane_elements() + static_cast<int64_t>(slot) * head_dim;
  }
  MEGASERVE_ISA_HD int64_t elements_per_layer() const {
    return num_blocks * static_cast<int64_t>(kv_heads) * plane_elements();
  }
};

}  // namespace megaserve::engine
