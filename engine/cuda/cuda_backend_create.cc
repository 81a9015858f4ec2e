// CudaBackend::create: checks the tensor-parallel placement, converts each rank's weight shard
// to bf16 and uploads it, sizes the KV cache from the free memory, and sets up the step state
// (engine/cuda/cuda_backend.h). The step flow is in engine/cuda/cuda_backend.cc.
#include <algorithm>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_rank_weights.h"
#include "engine/cuda/cuda_state.h"
#include "engine/cuda/cuda_weight_maps.h"
#include "engine/planner/schedule_builder.h"
#include "kernels/device_probe.h"
#include "kernels/megakernel.h"

namespace megaserve::engine {

using kernels::DeviceModel;
namespace {

// Bytes of device memory kept free for workspaces and step uploads when num_kv_blocks is
// derived from free memory.
constexpr size_t kWorkspaceReserveBytes = size_t{1} << 30;

}  // namespace

absl::Status check_cuda_tensor_parallel(const ModelConfig& config, int tp, bool ranks_on_one_gpu,
                                        int device) {
  if (tp < 1 || tp > kernels::kMaxTpRanks) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor_parallel ", tp, " outside [1, ", kernels::kMaxTpRanks, "]"));
  }
  if (absl::Status s = check_tensor_parallel(config, tp); !s.ok()) return s;
  if (tp == 1) return absl::OkStatus();
  std::string why;
  const std::vector<kernels::DeviceInfo> devices = kernels::probe_devices(&why);
  const int visible = static_cast<int>(devices.size());
  if (!ranks_on_one_gpu) {
    if (visible < tp) {
      return absl::FailedPreconditionError(
          absl::StrCat("tensor_parallel ", tp, " needs ", tp, " GPUs, ", visible, " visible",
                       visible == 0 ? absl::StrCat(" (", why, ")") : "",
                       "; tp_ranks_on_one_gpu runs the ranks on one GPU, for debugging"));
    }
    return absl::UnimplementedError(absl::StrCat(
        "tensor_parallel ", tp, " across ", tp,
        " GPUs is not implemented yet; tp_ranks_on_one_gpu runs the ranks on one GPU, for "
        "debugging"));
  }
  if (device < 0 || device >= visible) {
    return absl::FailedPreconditionError(
        absl::StrCat("tensor_parallel ", tp, " on one GPU: no CUDA device ", device, " (",
                     visible == 0 ? why : absl::StrCat(visible, " visible"), ")"));
  }
  if (devices[device].sm_count < tp) {
    return absl::InvalidArgumentError(absl::StrCat("tensor_parallel ", tp,
                                                   " on one GPU: ", devices[device].name, " has ",
                                                   devices[device].sm_count, " SMs"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::create(
    const ModelConfig& config, ModelWeights weights, const CudaBackendOptions& options) {
  const int tp = options.tensor_parallel;
  if (absl::Status s =
          check_cuda_tensor_parallel(config, tp, options.tp_ranks_on_one_gpu, options.device);
      !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("cuda backend: ", s.message()));
  }
  const int hd = config.head_dim;
  if (hd % 8 != 0 || hd > kernels::kMaxHeadDim) {
    return absl::InvalidArgumentError(absl::StrCat("cuda backend: head_dim ", hd,
                                                   " must be a multiple of 8 and at most ",
                                                   kernels::kMaxHeadDim));
  }
  if (static_cast<int>(weights.layers.size()) != config.num_layers || weights.embedding.empty() ||
      weights.lm_head.empty() || weights.final_norm.empty()) {
    return absl::InvalidArgumentError("cuda backend: weights do not match the model config");
  }
  if (options.kv_block_size <= 0 || options.num_kv_blocks < 0) {
    return absl::InvalidArgumentError(absl::StrCat("cuda backend: KV cache of ",
                                                   options.num_kv_blocks, " blocks of ",
                                                   options.kv_block_size, " tokens"));
  }
  if (options.step_watchdog_ms <= 0) {
    return absl::InvalidArgumentError("cuda backend: step_watchdog_ms must be > 0");
  }
  std::string why;
  const std::vector<kernels::DeviceInfo> devices = kernels::probe_devices(&why);
  if (options.device < 0 || options.device >= static_cast<int>(devices.size())) {
    return absl::FailedPreconditionError(
        absl::StrCat("cuda backend: no CUDA device ", options.device, " (",
                     devices.empty() ? why : absl::StrCat(devices.size(), " visible"), ")"));
  }
  const kernels::DeviceInfo& dev = devices[options.device];
  if (!dev.supported()) {
    return absl::FailedPreconditionError(absl::StrCat("cuda backend: ", dev.name, " is sm_",
                                                      dev.compute_major, dev.compute_minor,
                                                      "; the megakernel is built for sm_90a"));
  }
  std::unique_ptr<CudaBackend> b(new CudaBackend());
  b->config_ = config;
  b->options_ = options;
  b->device_name_ = dev.name;
  // Each rank runs on its own CTAs of the one launch [TP_PLACEMENT]: options.num_sms CTAs
  // per rank, by default the SMs shared out evenly.
  const int ctas_per_rank = options.num_sms > 0 ? options.num_sms : dev.sm_count / tp;
  b->tiles_ = options.tiles.value_or(gpu_tile_config(ctas_per_rank));
  b->tiles_.num_sms = ctas_per_rank;
  if (ctas_per_rank * tp > dev.sm_count) {
    return absl::InvalidArgumentError(absl::StrCat("cuda backend: ", ctas_per_rank, " CTAs x ", tp,
                                                   " ranks exceed the ", dev.sm_count,
                                                   " SMs (every CTA must be resident)"));
  }
  MEGASERVE_CUDA_RETURN(cudaSetDevice(options.device), "selecting the device");
  size_t smem = 0;
  MEGASERVE_CUDA_RETURN(kernels::configure_megakernel(dev.max_shared_memory_per_block, &smem),
                        "configuring shared memory");
  // Shared memory per op: a projection keeps kProjectionScaleFloats for row scales (QKV also
  // heads' outputs) beside its core, which needs kProjectionMinSmemBytes (tensor cores) and
  // one input row of floats (CUDA cores); attention its queries and warp states.
  const size_t widest_row =
      std::max({static_cast<size_t>(config.hidden_size), static_cast<size_t>(config.q_size()),
                static_cast<size_t>(config.intermediate_size)});
  const size_t core_bytes =
      std::max(size_t{kernels::kProjectionMinSmemBytes}, widest_row * sizeof(float));
  const size_t qkv_bytes = (size_t{kernels::kProjectionChunkRows} * b->tiles_.qkv_heads * hd +
                            kernels::kProjectionScaleFloats) *
                           sizeof(float);
  const size_t needed =
      std::max({qkv_bytes + core_bytes,
                size_t{kernels::kMegakernelWarps} * kernels::kMaxHeadDim * sizeof(float),
                size_t{kernels::kAttentionSmemFloats} * sizeof(float)});
  if (needed > smem) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda backend: the ops need ", needed, " bytes of shared memory (qkv_heads ",
                     b->tiles_.qkv_heads, " x head_dim ", hd, ", widest input row ", widest_row,
                     " floats), the device gives ", smem));
  }

  auto st = std::make_unique<CudaState>();
  st->device = options.device;
  st->tp = tp;
  st->ctas_per_rank = ctas_per_rank;
  st->grid = ctas_per_rank * tp;
  st->smem_bytes = smem;
  st->models.resize(tp);
  for (int r = 0; r < tp; ++r) {
    if (absl::Status s =
            upload_rank_weights(config, weights, shard_of(config, tp, r), ctas_per_rank,
                                options.wgmma, options.bf16_act_rows, *st, st->models[r]);
        !s.ok()) {
      return s;
    }
  }
  weights = ModelWeights{};  // the host copy is no longer needed
  // No norm stages unless every rank keeps normalized rows to read [NORM_STAGE]: the ranks
  // share one schedule, and a rank without them (no wgmma, no TMA maps for its shard, or
  // bf16_act_rows 0) would run each stage as a no-op and still wait for it.
  if (std::any_of(st->models.begin(), st->models.end(),
                  [](const DeviceModel& m) { return m.norm_act == nullptr; })) {
    b->tiles_.norm_stage_tokens = 0;
  }

  // The KV cache.
  const int64_t block_elems_per_layer =
      static_cast<int64_t>(config.num_kv_heads) * options.kv_block_size * hd;
  const size_t block_bytes = 2 * sizeof(uint16_t) * block_elems_per_layer * config.num_layers;
  int64_t blocks = options.num_kv_blocks;
  if (blocks == 0) {
    size_t free_bytes = 0, total = 0;
    MEGASERVE_CUDA_RETURN(cudaMemGetInfo(&free_bytes, &total), "querying free memory");
    const double usable =
        (static_cast<double>(free_bytes) - kWorkspaceReserveBytes) * options.memory_fraction;
    blocks = usable > 0 ? static_cast<int64_t>(usable / block_bytes) : 0;
    blocks = std::min<int64_t>(blocks, std::numeric_limits<int32_t>::max() / 2);
    if (blocks < 1) {
      return absl::ResourceExhaustedError(absl::StrCat("cuda backend: no room for a KV block (",
                                                       block_bytes, " bytes) on ", dev.name));
    }
  }
  b->num_kv_blocks_ = static_cast<int32_t>(blocks);
  for (DeviceModel& m : st->models) {  // each rank's kv heads
    m.num_kv_blocks = b->num_kv_blocks_;
    m.kv_block_size = options.kv_block_size;
    const KvCacheLayout kv{.num_blocks = static_cast<int32_t>(blocks),
                           .kv_heads = m.kv_heads,
                           .block_size = options.kv_block_size,
                           .head_dim = hd};
    m.cache_layer_elements = kv.elements_per_layer();  // the layout the kernels index with
    for (uint16_t** cache : {&m.k_cache, &m.v_cache}) {
      void* p = nullptr;
      const size_t bytes = sizeof(uint16_t) * m.cache_layer_elements * config.num_layers;
      MEGASERVE_CUDA_RETURN(cudaMalloc(&p, bytes), "KV cache");
      st->allocations.push_back(p);
      MEGASERVE_CUDA_RETURN(cudaMemset(p, 0, bytes), "KV cache");
      *cache = static_cast<uint16_t*>(p);
    }
    m.kv_maps = nullptr;
    absl::StatusOr<std::vector<CUtensorMap>> kv_maps = encode_kv_cache_maps(m);
    if (!kv_maps.ok()) return kv_maps.status();
    if (!kv_maps->empty()) {
      absl::StatusOr<CUtensorMap*> on_device =
          st->upload(kv_maps->data(), kv_maps->size(), "KV cache maps");
      if (!on_device.ok()) return on_device.status();
      m.kv_maps = *on_device;
    }
  }

  if (absl::Status s = st->init(schedule_num_barriers(config)); !s.ok()) return s;
  MEGASERVE_CUDA_RETURN(cudaDeviceSynchronize(), "initialization");
  b->state_ = std::move(st);
  return b;
}

}  // namespace megaserve::engine
