#include "engine/cuda/cuda_weight_maps.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace megaserve::engine {
namespace {

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                 const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                 const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                 CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

absl::StatusOr<EncodeTiled> encode_function() {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found{};
  const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                         cudaEnableDefault, &found);
  if (e != cudaSuccess || found != cudaDriverEntryPointSuccess || fn == nullptr) {
    return absl::InternalError("cuda backend: the driver has no cuTensorMapEncodeTiled");
  }
  return reinterpret_cast<EncodeTiled>(fn);
}

// [rows, K] bf16, K contiguous; box 64 k x box_rows rows, 128-byte swizzle (the layout
// wgmma's K-major descriptors read); rows past the end read as zeros.
absl::StatusOr<CUtensorMap> encode(EncodeTiled fn, const uint16_t* base, int64_t rows, int64_t K,
                                   const char* what, int box_rows = kernels::kWgmmaGroupRows) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(K), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(K) * 2};
  const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult r =
      fn(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<uint16_t*>(base), dims, strides, box,
         element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
         CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    return absl::InternalError(absl::StrCat("cuda backend: cuTensorMapEncodeTiled failed (",
                                            static_cast<int>(r), ") for ", what, " [", rows, ", ",
                                            K, "]"));
  }
  return map;
}

}  // namespace

absl::StatusOr<WeightMaps> encode_weight_maps(const kernels::DeviceModel& m,
                                              const std::vector<kernels::DeviceLayer>& layers) {
  const int64_t H = m.hidden, Q = int64_t{m.q_heads} * m.head_dim;
  const int64_t KV = int64_t{m.kv_heads} * m.head_dim, F = m.ffn;
  if (H % 8 != 0 || Q % 8 != 0 || F % 8 != 0) return WeightMaps{};
  absl::StatusOr<EncodeTiled> fn = encode_function();
  if (!fn.ok()) return fn.status();
  // Wide boxes only where every matrix has that many rows.
  const bool wide = std::min({H, Q, KV, F, int64_t{m.vocab}}) >= kernels::kWgmmaWideRows;
  const size_t n = layers.size() * kernels::kLayerMatrices + 1;
  WeightMaps out;
  out.maps.reserve(wide ? 2 * n : n);
  for (int box_rows : {kernels::kWgmmaGroupRows, kernels::kWgmmaWideRows}) {
    if (box_rows == kernels::kWgmmaWideRows && !wide) break;
    const auto add = [&](const uint16_t* base, int64_t rows, int64_t K,
                         const char* what) -> absl::Status {
      absl::StatusOr<CUtensorMap> map = encode(*fn, base, rows, K, what, box_rows);
      if (!map.ok()) return map.status();
      out.maps.push_back(*map);
      return absl::OkStatus();
    };
    for (const kernels::DeviceLayer& l : layers) {
      // kernels::WeightMatrix order.
      for (absl::Status s : {add(l.wq, Q, H, "wq"), add(l.wk, KV, H, "wk"), add(l.wv, KV, H, "wv"),
                             add(l.wo, H, Q, "wo"), add(l.w_gate, F, H, "w_gate"),
                             add(l.w_up, F, H, "w_up"), add(l.w_down, H, F, "w_down")}) {
        if (!s.ok()) return s;
      }
    }
    if (absl::Status s = add(m.lm_head, m.vocab, H, "lm_head"); !s.ok()) return s;
  }
  out.wide = wide ? static_cast<int32_t>(n) : 0;
  return out;
}

absl::StatusOr<CUtensorMap> encode_act_cache_map(const uint16_t* base, int64_t rows, int64_t K) {
  absl::StatusOr<EncodeTiled> fn = encode_function();
  if (!fn.ok()) return fn.status();
  return encode(*fn, base, rows, K, "activation cache", kernels::kActCacheBoxRows);
}

absl::StatusOr<std::vector<CUtensorMap>> encode_kv_cache_maps(const kernels::DeviceModel& m) {
  constexpr int kKvBoxRows = 16;  // a decode step's keys (kernels/op_attention_decode_tma.cuh)
  const int64_t bs = m.kv_block_size;
  const int64_t rows = int64_t{m.num_layers} * m.num_kv_blocks * m.kv_heads * bs;
  if ((m.head_dim != 64 && m.head_dim != 128) || bs % kKvBoxRows != 0 ||
      rows > std::numeric_limits<int32_t>::max()) {
    return std::vector<CUtensorMap>{};
  }
  absl::StatusOr<EncodeTiled> fn = encode_function();
  if (!fn.ok()) return fn.status();
  std::vector<CUtensorMap> maps;
  for (const uint16_t* cache : {m.k_cache, m.v_cache}) {
    absl::StatusOr<CUtensorMap> map = encode(*fn, cache, rows, m.head_dim, "KV cache", kKvBoxRows);
    if (!map.ok()) return map.status();
    maps.push_back(*map);
  }
  return maps;
}

}  // namespace megaserve::engine
