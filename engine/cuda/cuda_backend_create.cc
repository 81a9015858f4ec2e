// CudaBackend::create: converts the weights to bf16 and uploads them, sizes the KV cache from
// the free memory, and sets up the step state (engine/cuda/cuda_backend.h). The step flow is in
// engine/cuda/cuda_backend.cc.
#include <algorithm>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_state.h"
#include "engine/cuda/cuda_weight_maps.h"
#include "engine/isa/bf16.h"
#include "engine/planner/schedule_builder.h"
#include "kernels/device_probe.h"
#include "kernels/megakernel.h"

namespace megaserve::engine {

using kernels::DeviceModel;
namespace {

// Bytes of device memory kept free for workspaces and step uploads when num_kv_blocks is
// derived from free memory.
constexpr size_t kWorkspaceReserveBytes = size_t{1} << 30;

std::vector<uint16_t> to_bf16(const Tensor& t) {
  std::vector<uint16_t> out(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) {
    switch (t.dtype) {
      case DType::kF32:
        out[i] = float_to_bf16(t.data<float>()[i]);
        break;
      case DType::kBF16:
        out[i] = t.data<uint16_t>()[i];
        break;
      case DType::kF16:
        out[i] = float_to_bf16(f16_to_float(t.data<uint16_t>()[i]));
        break;
    }
  }
  return out;
}

}  // namespace

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::create(
    const ModelConfig& config, ModelWeights weights, const CudaBackendOptions& options) {
  if (options.tensor_parallel != 1) {
    return absl::UnimplementedError(absl::StrCat(
        "cuda backend: tensor_parallel ", options.tensor_parallel,
        " is not supported yet (the megakernel runs one rank; use tensor_parallel 1 or the CPU "
        "interpreter)"));
  }
  if (absl::Status s = check_tensor_parallel(config, 1); !s.ok()) return s;
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
  b->tiles_ = options.tiles.value_or(gpu_tile_config(dev.sm_count));
  b->tiles_.num_sms = options.num_sms > 0 ? options.num_sms : dev.sm_count;
  if (b->tiles_.num_sms > dev.sm_count) {
    return absl::InvalidArgumentError(absl::StrCat("cuda backend: ", b->tiles_.num_sms,
                                                   " CTAs exceed the ", dev.sm_count,
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
  st->grid = b->tiles_.num_sms;
  st->smem_bytes = smem;

  // Weights, bf16. Tied embeddings share one device copy.
  std::unordered_map<const void*, const uint16_t*> uploaded;
  auto up = [&](const Tensor& t, const char* name) -> absl::StatusOr<const uint16_t*> {
    if (t.empty()) return nullptr;
    if (auto it = uploaded.find(t.bytes.get()); it != uploaded.end()) return it->second;
    const std::vector<uint16_t> bits = to_bf16(t);
    absl::StatusOr<uint16_t*> p = st->upload(bits.data(), bits.size(), name);
    if (!p.ok()) return p.status();
    uploaded[t.bytes.get()] = *p;
    return *p;
  };
  DeviceModel& m = st->model;
  m.hidden = config.hidden_size;
  m.q_heads = config.num_heads;
  m.kv_heads = config.num_kv_heads;
  m.head_dim = hd;
  m.ffn = config.intermediate_size;
  m.vocab = config.vocab_size;
  m.num_layers = config.num_layers;
  m.rms_norm_eps = config.rms_norm_eps;
  std::vector<kernels::DeviceLayer> layers(config.num_layers);
#define MEGASERVE_UPLOAD(dst, tensor)                         \
  do {                                                        \
    absl::StatusOr<const uint16_t*> p_ = up(tensor, #tensor); \
    if (!p_.ok()) return p_.status();                         \
    dst = *p_;                                                \
  } while (0)
  MEGASERVE_UPLOAD(m.embedding, weights.embedding);
  MEGASERVE_UPLOAD(m.final_norm, weights.final_norm);
  MEGASERVE_UPLOAD(m.lm_head, weights.lm_head);
  for (int l = 0; l < config.num_layers; ++l) {
    const LayerWeights& w = weights.layers[l];
    kernels::DeviceLayer& d = layers[l];
    MEGASERVE_UPLOAD(d.attn_norm, w.attn_norm);
    MEGASERVE_UPLOAD(d.ffn_norm, w.ffn_norm);
    MEGASERVE_UPLOAD(d.wq, w.wq);
    MEGASERVE_UPLOAD(d.wk, w.wk);
    MEGASERVE_UPLOAD(d.wv, w.wv);
    MEGASERVE_UPLOAD(d.bq, w.bq);
    MEGASERVE_UPLOAD(d.bk, w.bk);
    MEGASERVE_UPLOAD(d.bv, w.bv);
    MEGASERVE_UPLOAD(d.q_norm, w.q_norm);
    MEGASERVE_UPLOAD(d.k_norm, w.k_norm);
    MEGASERVE_UPLOAD(d.wo, w.wo);
    MEGASERVE_UPLOAD(d.w_gate, w.w_gate);
    MEGASERVE_UPLOAD(d.w_up, w.w_up);
    MEGASERVE_UPLOAD(d.w_down, w.w_down);
  }
#undef MEGASERVE_UPLOAD
  weights = ModelWeights{};  // the host copy is no longer needed
  absl::StatusOr<kernels::DeviceLayer*> dl = st->upload(layers.data(), layers.size(), "layers");
  if (!dl.ok()) return dl.status();
  m.layers = *dl;
  absl::StatusOr<std::vector<CUtensorMap>> maps = encode_weight_maps(m, layers);
  if (!maps.ok()) return maps.status();
  m.weight_maps = nullptr;
  if (!maps->empty()) {
    absl::StatusOr<CUtensorMap*> dm = st->upload(maps->data(), maps->size(), "weight maps");
    if (!dm.ok()) return dm.status();
    m.weight_maps = *dm;
  }
  if (m.weight_maps != nullptr && options.wgmma) {  // only wgmma passes read them
    // The activation cache [ACT_CACHE]: kActCacheRowsPerCta token rows of the hidden size
    // per CTA (steps of more tokens convert the rows past it every time), and its flags,
    // zeroed (no step's key).
    const int64_t cache_rows = int64_t{st->grid} * kernels::kActCacheRowsPerCta;
    void* p = nullptr;
    MEGASERVE_CUDA_RETURN(cudaMalloc(&p, sizeof(uint16_t) * cache_rows * m.hidden),
                          "activation cache");
    st->allocations.push_back(p);
    m.act_cache = static_cast<uint16_t*>(p);
    m.act_cache_rows = static_cast<int32_t>(cache_rows);
    const size_t flag_bytes = sizeof(uint64_t) * (cache_rows / kernels::kActFlagRows);
    MEGASERVE_CUDA_RETURN(cudaMalloc(&p, flag_bytes), "activation cache flags");
    st->allocations.push_back(p);
    MEGASERVE_CUDA_RETURN(cudaMemset(p, 0, flag_bytes), "activation cache flags");
    m.act_cache_flags = static_cast<uint64_t*>(p);
    // The bf16 FFN activations and attention outputs, options.bf16_act_rows token rows
    // (rounded up to a pass's): 8192 rows of Llama-3.1-8B's 14,336 and 4,096 are 235 and 67 MB.
    if (options.bf16_act_rows > 0) {
      const int64_t act_rows =
          std::max<int64_t>(kernels::kActCacheBoxRows,
                            (int64_t{options.bf16_act_rows} + kernels::kActCacheBoxRows - 1) /
                                kernels::kActCacheBoxRows * kernels::kActCacheBoxRows);
      const auto bf16_rows = [&](int64_t width, const char* what, uint16_t** rows,
                                 const CUtensorMap** map) -> absl::Status {
        void* q = nullptr;
        MEGASERVE_CUDA_RETURN(cudaMalloc(&q, sizeof(uint16_t) * act_rows * width), what);
        st->allocations.push_back(q);
        *rows = static_cast<uint16_t*>(q);
        absl::StatusOr<CUtensorMap> encoded = encode_act_cache_map(*rows, act_rows, width);
        if (!encoded.ok()) return encoded.status();
        absl::StatusOr<CUtensorMap*> uploaded = st->upload(&*encoded, 1, what);
        if (!uploaded.ok()) return uploaded.status();
        *map = *uploaded;
        return absl::OkStatus();
      };
      if (absl::Status s = bf16_rows(m.ffn, "bf16 FFN activations", &m.ffn_act, &m.ffn_act_map);
          !s.ok()) {
        return s;
      }
      if (absl::Status s = bf16_rows(int64_t{m.q_heads} * m.head_dim, "bf16 attention outputs",
                                     &m.attn_act, &m.attn_act_map);
          !s.ok()) {
        return s;
      }
      // And the norm stage's rows [NORM_STAGE] (64 MB more on Llama-3.1-8B).
      if (absl::Status s = bf16_rows(m.hidden, "normalized rows", &m.norm_act, &m.norm_act_map);
          !s.ok()) {
        return s;
      }
      m.ffn_act_rows = m.attn_act_rows = m.norm_act_rows = static_cast<int32_t>(act_rows);
    }
    absl::StatusOr<CUtensorMap> am = encode_act_cache_map(m.act_cache, cache_rows, m.hidden);
    if (!am.ok()) return am.status();
    absl::StatusOr<CUtensorMap*> dam = st->upload(&*am, 1, "activation cache map");
    if (!dam.ok()) return dam.status();
    m.act_cache_map = *dam;
  }
  // No norm stages where nothing would read their rows.
  if (m.norm_act == nullptr) b->tiles_.norm_stage_tokens = 0;
  const std::vector<float> inv_freq = rope_inv_freq(config);
  absl::StatusOr<float*> inv = st->upload(inv_freq.data(), inv_freq.size(), "inv_freq");
  if (!inv.ok()) return inv.status();
  m.inv_freq = *inv;

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
  m.num_kv_blocks = b->num_kv_blocks_;
  m.kv_block_size = options.kv_block_size;
  const KvCacheLayout kv{.num_blocks = static_cast<int32_t>(blocks),
                         .kv_heads = config.num_kv_heads,
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

  if (absl::Status s = st->init(schedule_num_barriers(config)); !s.ok()) return s;
  MEGASERVE_CUDA_RETURN(cudaDeviceSynchronize(), "initialization");
  b->state_ = std::move(st);
  return b;
}

}  // namespace megaserve::engine
