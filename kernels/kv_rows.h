// Cache offsets of the consecutive key rows an attention copy stages (kernels/
// op_attention_mma.cuh [ATTN_COPY]): plain integer logic, shared by the device code and a host
// test. A thread copies one 16-byte chunk of up to 8 contiguous key rows per stage; their
// cache blocks are read a stage ahead (row_blocks), and the walk steps from row to row
// without dividing by the run-time block size.
#pragma once

#include <stdint.h>

#include "engine/isa/host_device.h"
#include "engine/isa/kv_cache_layout.h"

namespace megaserve::kernels {

// Rows [j0, min(j0 + rows, key_end)) of a request: the cache blocks of the first and last
// (-1: no valid row) and their places in the request's block table.
struct RowBlocks {
  int32_t first, last;
  int32_t first_at, last_at;
};

MEGASERVE_HOST_DEVICE inline RowBlocks row_blocks(const int32_t* blocks, int j0, int rows,
                                                  int key_end, int bs) {
  if (j0 >= key_end) return RowBlocks{-1, -1, 0, 0};
  const int end = j0 + rows < key_end ? j0 + rows : key_end;
  const int first_at = j0 / bs, last_at = (end - 1) / bs;
  return RowBlocks{blocks[first_at], blocks[last_at], first_at, last_at};
}

// Element offset of key row j0, j0 + 1, ... of one kv head in the K (or V) cache of a layer,
// as kv.offset(blocks[j / bs], kv_head, j % bs). Rows between the first and last block of
// `rb` read the block table (blocks shorter than the rows); rows past the last valid one
// keep a harmless offset in the last block.
struct KeyRowWalk {
  const int32_t* blocks;
  RowBlocks rb;
  engine::KvCacheLayout kv;
  int kv_head, at, slot;
  int64_t off;

  MEGASERVE_HOST_DEVICE KeyRowWalk(const int32_t* blocks_, RowBlocks rb_,
                                   const engine::KvCacheLayout& kv_, int kv_head_, int j0)
      : blocks(blocks_),
        rb(rb_),
        kv(kv_),
        kv_head(kv_head_),
        at(rb_.first_at),
        slot(j0 - rb_.first_at * kv_.block_size),
        off(kv_.offset(rb_.first < 0 ? 0 : rb_.first, kv_head_, slot)) {}

  MEGASERVE_HOST_DEVICE int64_t offset() const { return off; }

  MEGASERVE_HOST_DEVICE void next() {
    off += kv.head_dim;
    if (++slot == kv.block_size) {  // the next row starts the next cache block
      slot = 0;
      ++at;
      const int32_t block = at < rb.last_at ? blocks[at] : rb.last;
      off = kv.offset(block < 0 ? 0 : block, kv_head, 0);
    }
  }
};

}  // namespace megaserve::kernels
