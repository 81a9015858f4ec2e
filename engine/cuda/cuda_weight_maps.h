// TMA descriptors of the weights, for the megakernel's wgmma projections
// (kernels/tile_wgmma.cuh, DeviceModel::weight_maps).
#pragma once

#include <cuda.h>

#include <vector>

#include "absl/status/statusor.h"
#include "kernels/megakernel.h"

namespace megaserve::engine {

// The weights' maps (DeviceModel::weight_maps) and where their wide copies begin in them
// (DeviceModel::wide_maps; 0: none).
struct WeightMaps {
  std::vector<CUtensorMap> maps;
  int32_t wide = 0;
};

// One map per weight matrix of `layers` (host copies of the device records, in
// kernels::WeightMatrix order per layer), then the LM head's, for the model's shape in `m`,
// in boxes of kWgmmaGroupRows rows; then, where every matrix has at least kWgmmaWideRows
// rows, the same again in boxes of kWgmmaWideRows rows. Empty when a matrix's K is not a
// multiple of 8 (TMA needs 16-byte row strides): the projections then run on mma.sync. An
// error when the driver cannot encode a map.
absl::StatusOr<WeightMaps> encode_weight_maps(const kernels::DeviceModel& m,
                                              const std::vector<kernels::DeviceLayer>& layers);

// The map of the activation cache (kernels::DeviceModel::act_cache): [rows, K] bf16 at `base`,
// box 64 k x kernels::kActCacheBoxRows rows, 128-byte swizzle.
absl::StatusOr<CUtensorMap> encode_act_cache_map(const uint16_t* base, int64_t rows, int64_t K);

// The maps of the KV cache (kernels::DeviceModel::kv_maps, K then V): every layer's cache
// blocks of `m` (k_cache, v_cache, num_layers, num_kv_blocks, kv_heads, kv_block_size,
// head_dim) as [num_layers * num_kv_blocks * kv_heads * kv_block_size rows, head_dim] bf16,
// box 64 x 16 rows, 128-byte swizzle: one TMA load per 64 columns of 16 keys of a cache
// block's kv head (kernels/op_attention_decode_tma.cuh [KV_TMA]). Empty where decode
// attention cannot take them that way: head dims other than 64 and 128, block sizes that are
// not a multiple of 16, or rows past an int32 coordinate.
absl::StatusOr<std::vector<CUtensorMap>> encode_kv_cache_maps(const kernels::DeviceModel& m);

}  // namespace megaserve::engine
