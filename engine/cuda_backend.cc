#include "engine/cuda_backend.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/bf16.h"
#include "engine/cuda_sampling.h"
#include "engine/cuda_state.h"
#include "engine/sampling.h"
#include "kernels/device_probe.h"
#include "kernels/megakernel.h"

namespace megaserve::engine {

using kernels::DeviceModel;
using kernels::DeviceStepDesc;

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

TileConfig cuda_tile_config(int sm_count, size_t smem_bytes) {
  TileConfig c = gpu_tile_config(sm_count);
  // Projections: a tile's columns are spread over the CTA's 8 warps (tensor cores: blocks of
  // 32 weight rows; CUDA cores: a warp per column) and its rows reuse each staged weight
  // chunk, up to 64 at a time. Column tiles are as wide as a prefill wants; a step with
  // fewer tiles than SMs gets narrower ones (TileConfig::balance_columns), so that a decode
  // step's weight stream covers every SM.
  c.token_rows = 64;
  c.qkv_heads = 1;
  c.hidden_cols = 128;
  c.ffn_cols = 64;
  c.vocab_cols = 1024;
  c.embedding_rows = 64;
  c.lm_head_samples = 64;
  c.sample_rows = 1;  // one CTA per sampling row
  c.attention_query_rows = 16;
  c.attention_batch_requests = 8;
  c.kv_split_tokens = 1024;
  c.flops_per_cycle = 512.0;
  c.bytes_per_cycle = 13.0;
  c.overhead_cycles = 1000.0;
  (void)smem_bytes;  // every tile above fits the smallest Hopper CTA (checked in create)
  return c;
}

absl::StatusOr<double> device_copy_bandwidth(int device, size_t bytes, int copies) {
  MEGASERVE_CUDA_RETURN(cudaSetDevice(device), "selecting the device");
  void* buffers[2] = {nullptr, nullptr};
  cudaEvent_t events[2] = {nullptr, nullptr};
  const auto release = [&] {
    for (void* p : buffers) cudaFree(p);
    for (cudaEvent_t e : events) {
      if (e != nullptr) cudaEventDestroy(e);
    }
  };
  const auto check = [&](cudaError_t e, const char* what) -> absl::Status {
    if (e == cudaSuccess) return absl::OkStatus();
    release();
    return cuda_error(e, what);
  };
  for (void*& p : buffers) {
    if (absl::Status s = check(cudaMalloc(&p, bytes), "copy bandwidth buffers"); !s.ok()) return s;
  }
  for (cudaEvent_t& e : events) {
    if (absl::Status s = check(cudaEventCreate(&e), "copy bandwidth events"); !s.ok()) return s;
  }
  float ms = 0;
  absl::Status s = check(cudaMemset(buffers[0], 1, bytes), "copy bandwidth");
  if (s.ok()) {
    s = check(cudaMemcpy(buffers[1], buffers[0], bytes, cudaMemcpyDeviceToDevice), "warm-up");
  }
  if (s.ok()) s = check(cudaEventRecord(events[0]), "copy bandwidth");
  for (int i = 0; s.ok() && i < copies; ++i) {
    s = check(cudaMemcpyAsync(buffers[1], buffers[0], bytes, cudaMemcpyDeviceToDevice),
              "copy bandwidth");
  }
  if (s.ok()) s = check(cudaEventRecord(events[1]), "copy bandwidth");
  if (s.ok()) s = check(cudaEventSynchronize(events[1]), "copy bandwidth");
  if (s.ok()) s = check(cudaEventElapsedTime(&ms, events[0], events[1]), "copy bandwidth");
  if (!s.ok()) return s;  // check() released everything
  release();
  if (!(ms > 0)) return absl::InternalError("cuda backend: copy bandwidth: no time elapsed");
  return 2.0 * static_cast<double>(bytes) * copies / (ms * 1e-3);
}

bool cuda_backend_supported(std::string* why) {
  std::string reason;
  const std::vector<kernels::DeviceInfo> devices = kernels::probe_devices(&reason);
  for (const kernels::DeviceInfo& d : devices) {
    if (d.supported()) return true;
  }
  if (why != nullptr) {
    *why = devices.empty() ? absl::StrCat("no CUDA device: ", reason)
                           : absl::StrCat("no supported GPU (need sm_90, Hopper); device 0 is ",
                                          devices[0].name, " sm_", devices[0].compute_major,
                                          devices[0].compute_minor);
  }
  return false;
}

CudaBackend::CudaBackend() = default;

CudaBackend::~CudaBackend() {
  if (state_ != nullptr) {
    cudaSetDevice(state_->device);
    state_->stop_persistent();
  }
}

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
  b->tiles_ =
      options.tiles.value_or(cuda_tile_config(dev.sm_count, dev.max_shared_memory_per_block));
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
  // Shared memory per op: a projection keeps kProjectionChunkRows row scales (QKV also their
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
  m.cache_layer_elements = block_elems_per_layer * blocks;
  for (uint16_t** cache : {&m.k_cache, &m.v_cache}) {
    void* p = nullptr;
    const size_t bytes = sizeof(uint16_t) * m.cache_layer_elements * config.num_layers;
    MEGASERVE_CUDA_RETURN(cudaMalloc(&p, bytes), "KV cache");
    st->allocations.push_back(p);
    MEGASERVE_CUDA_RETURN(cudaMemset(p, 0, bytes), "KV cache");
    *cache = static_cast<uint16_t*>(p);
  }

  b->builder_ = std::make_unique<ScheduleBuilder>(config, b->tiles_, 1);
  if (absl::Status s = st->init(b->builder_->num_barriers()); !s.ok()) return s;
  MEGASERVE_CUDA_RETURN(cudaDeviceSynchronize(), "initialization");
  b->state_ = std::move(st);
  return b;
}

std::string CudaBackend::describe() const {
  return absl::StrCat(
      "cuda megakernel on ", device_name_, " (device ", options_.device, ", ", tiles_.num_sms,
      " CTAs, ", options_.persistent ? "persistent" : "one launch per step",
      options_.tensor_cores ? ", tensor cores" : ", CUDA cores", "): ", num_kv_blocks_,
      " KV blocks of ", options_.kv_block_size, " tokens, bf16 weights and cache");
}

absl::Status CudaBackend::fail(absl::Status s) {
  broken_ = true;
  return s;
}

absl::StatusOr<std::vector<float>> CudaBackend::logits(int sample) const {
  const DeviceStepDesc& d = state_->last_desc;
  if (broken_ || sample < 0 || sample >= d.num_samples) {
    return absl::OutOfRangeError(absl::StrCat("cuda backend: no sampling row ", sample));
  }
  std::vector<float> out(config_.vocab_size);
  MEGASERVE_CUDA_RETURN(cudaMemcpy(out.data(), d.logits + static_cast<int64_t>(sample) * out.size(),
                                   out.size() * sizeof(float), cudaMemcpyDeviceToHost),
                        "reading logits");
  return out;
}

absl::StatusOr<scheduler::StepOutput> CudaBackend::execute(const scheduler::StepPlan& plan) {
  if (broken_) return absl::FailedPreconditionError("cuda backend: an earlier step failed");
  if (plan.kv_block_size != options_.kv_block_size) {
    return absl::InvalidArgumentError(absl::StrCat("step ", plan.step_id, ": kv_block_size ",
                                                   plan.kv_block_size, ", backend has ",
                                                   options_.kv_block_size));
  }
  for (const auto& r : plan.requests) {
    for (int32_t id : r.token_ids) {
      if (id == scheduler::kTokenFromPreviousStep && !previous_sampled_.contains(r.request_id)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "step ", plan.step_id, " request ", r.request_id,
            ": input kTokenFromPreviousStep, but the previous step sampled nothing for it"));
      }
    }
  }
  if (absl::Status s = check_device_sampling(plan); !s.ok()) return s;
  absl::StatusOr<Step> step = builder_->build(plan, num_kv_blocks_);
  if (!step.ok()) return step.status();
  for (int32_t t = 0; t < step->meta.num_tokens; ++t) {
    int32_t& id = step->meta.token_ids[t];
    if (id != scheduler::kTokenFromPreviousStep) continue;
    id = previous_sampled_.at(step->meta.requests[step->meta.token_request[t]].request_id);
  }
  std::vector<scheduler::SampledToken> sampled;
  if (absl::Status s = run_step(*step, &sampled); !s.ok()) return fail(s);
  previous_sampled_.clear();
  for (const auto& tok : sampled) previous_sampled_[tok.request_id] = tok.token_id;
  scheduler::StepOutput out;
  out.step_id = plan.step_id;
  out.sampled = std::move(sampled);
  last_step_ = std::move(*step);
  return out;
}

absl::Status CudaBackend::run_step(const Step& step,
                                   std::vector<scheduler::SampledToken>* sampled) {
  CudaState& st = *state_;
  const StepMetadata& m = step.meta;
  const RankSchedule& rs = step.ranks[0];
  const int S = m.num_samples();
  const int V = config_.vocab_size;
  const SamplingUpload sampling = pack_sampling(m, V);
  const WorkspaceShape shape{
      config_.hidden_size, config_.q_size(), config_.head_dim, config_.intermediate_size, V,
      options_.profile};
  const int32_t flags =
      (options_.tensor_cores ? kernels::kStepTensorCores : 0) |
      (options_.attention_warp_per_head ? kernels::kStepAttentionWarpPerHead : 0) |
      (options_.attention_cuda_cores ? kernels::kStepAttentionCudaCores : 0);
  absl::StatusOr<DeviceStepDesc> desc =
      st.upload_step(step, shape, sampling, flags, options_.poison_workspace);
  if (!desc.ok()) return desc.status();
  const DeviceStepDesc& d = *desc;
  if (absl::Status s = st.run(step.step_id, options_.persistent,
                              std::chrono::milliseconds(options_.step_watchdog_ms));
      !s.ok()) {
    return s;
  }
  st.last_desc = d;
  last_timings_.clear();
  if (options_.profile) {
    constexpr int kWords = kernels::kProfileWords;
    std::vector<uint64_t> t(kWords * rs.instructions.size());
    MEGASERVE_CUDA_RETURN(
        cudaMemcpy(t.data(), d.profile, t.size() * sizeof(uint64_t), cudaMemcpyDeviceToHost),
        "reading the profile");
    last_timings_.resize(rs.instructions.size());
    for (size_t i = 0; i < rs.instructions.size(); ++i) {
      last_timings_[i] = {t[kWords * i], t[kWords * i + 1], t[kWords * i + 2],
                          static_cast<uint32_t>(t[kWords * i + 3])};
    }
  }

  // Read back the samples (and the top logprobs when a row asked for them).
  constexpr int kTop = kernels::kMaxTopLogprobs;
  std::vector<int32_t> ids(S), top_ids(sampling.any_logprobs ? S * kTop : 0);
  std::vector<float> logprobs(S), top_logprobs(top_ids.size());
  if (S > 0) {
    const auto read = [&](void* dst, const void* src, size_t bytes) {
      return cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, st.copy);
    };
    MEGASERVE_CUDA_RETURN(read(ids.data(), d.sampled_ids, S * sizeof(int32_t)), "reading samples");
    MEGASERVE_CUDA_RETURN(read(logprobs.data(), d.sampled_logprobs, S * sizeof(float)),
                          "reading samples");
    if (sampling.any_logprobs) {
      MEGASERVE_CUDA_RETURN(read(top_ids.data(), d.top_ids, top_ids.size() * sizeof(int32_t)),
                            "reading top logprobs");
      MEGASERVE_CUDA_RETURN(
          read(top_logprobs.data(), d.top_logprobs, top_logprobs.size() * sizeof(float)),
          "reading top logprobs");
    }
    MEGASERVE_CUDA_RETURN(cudaStreamSynchronize(st.copy), "reading samples");
  }
  if (options_.check_barriers) {
    std::vector<uint32_t> values(st.num_barriers);
    MEGASERVE_CUDA_RETURN(cudaMemcpy(values.data(), st.barriers, values.size() * sizeof(uint32_t),
                                     cudaMemcpyDeviceToHost),
                          "reading barriers");
    for (int b = 0; b < st.num_barriers; ++b) {
      if (values[b] != rs.barrier_end[b]) {
        return absl::InternalError(absl::StrCat("cuda backend: step ", step.step_id, ": barrier ",
                                                b, " ends at ", values[b], ", expected ",
                                                rs.barrier_end[b]));
      }
    }
  }
  sampled->assign(S, scheduler::SampledToken{});
  std::vector<float> row;
  for (int s = 0; s < S; ++s) {
    const RequestSampling& r = m.requests[m.sample_request[s]];
    scheduler::SampledToken& tok = (*sampled)[s];
    if (!options_.host_sampling) {
      const size_t top = sampling.any_logprobs ? static_cast<size_t>(s) * kTop : 0;
      const size_t n = sampling.any_logprobs ? kTop : 0;
      tok = unpack_sample(sampling.rows[s], V, ids[s], logprobs[s],
                          std::span(top_ids).subspan(top, n),
                          std::span(top_logprobs).subspan(top, n));
    } else {  // test option: the host samples the device's logits
      row.resize(V);
      MEGASERVE_CUDA_RETURN(cudaMemcpy(row.data(), d.logits + static_cast<int64_t>(s) * V,
                                       V * sizeof(float), cudaMemcpyDeviceToHost),
                            "reading logits");
      SamplingContext sc;
      sc.prompt_token_ids = r.prompt_token_ids;
      sc.output_token_ids = r.output_token_ids;
      sc.banned_ids = r.banned_token_ids;
      sc.seed = r.seed;
      sc.token_index = r.output_token_index;
      tok = sample_token(row, r.params, sc);
    }
    tok.request_id = r.request_id;
  }
  return absl::OkStatus();
}

}  // namespace megaserve::engine
