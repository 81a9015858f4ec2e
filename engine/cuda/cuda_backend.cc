#include "engine/cuda/cuda_backend.h"

#include <algorithm>
#include <chrono>
#include <optional>
#include <span>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/cuda/cuda_sampling.h"
#include "engine/cuda/cuda_state.h"
#include "engine/isa/isa.h"
#include "engine/isa/sampling.h"
#include "engine/planner/schedule_shard.h"
#include "kernels/device_probe.h"
#include "kernels/megakernel.h"

namespace megaserve::engine {

using kernels::DeviceStepDesc;

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

struct CudaBackend::InFlight {
  uint32_t seq = 0;            // its number in the step ring
  const Step* step = nullptr;  // the submitter's, alive until collected (Backend::submit)
  SamplingUpload sampling;
  DeviceStepDesc desc{};
  // Its workspace is read back (host_sampling, profile, barrier check): the next step is not
  // posted before it is finished.
  bool reads_workspace = false;
  std::chrono::steady_clock::time_point posted;
  std::optional<scheduler::StepOutput> output;  // once finished
};

CudaBackend::~CudaBackend() {
  if (state_ != nullptr) {
    cudaSetDevice(state_->device);
    // Steps still in flight complete (or the watchdog aborts them) before the kernel stops.
    for (auto& f : in_flight_) {
      if (broken_ || !finish(*f).ok()) break;
    }
    state_->stop_persistent();
  }
}

std::string CudaBackend::describe() const {
  const int tp = options_.tensor_parallel;
  return absl::StrCat("cuda megakernel on ", device_name_, " (device ", options_.device, ", ",
                      tiles_.num_sms, " CTAs",
                      tp > 1 ? absl::StrCat(" per rank x ", tp, " ranks on one GPU (debug)") : "",
                      ", ", options_.persistent ? "persistent" : "one launch per step",
                      !options_.tensor_cores ? ", CUDA cores"
                      : options_.wgmma       ? ", wgmma tensor cores"
                                             : ", mma.sync tensor cores",
                      "): ", num_kv_blocks_, " KV blocks of ", options_.kv_block_size,
                      " tokens, bf16 weights and cache");
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

ScheduleTarget CudaBackend::schedule_target() const {
  return ScheduleTarget{.tiles = tiles_,
                        .tensor_parallel = options_.tensor_parallel,
                        .num_kv_blocks = num_kv_blocks_,
                        .kv_block_size = options_.kv_block_size,
                        .verify = options_.verify_schedules};
}

absl::StatusOr<scheduler::StepOutput> CudaBackend::execute(const Step& step) {
  if (!in_flight_.empty()) {
    return absl::FailedPreconditionError(absl::StrCat("cuda backend: execute step ", step.step_id,
                                                      " with ", in_flight_.size(),
                                                      " steps in flight (collect them first)"));
  }
  if (absl::Status s = submit(step); !s.ok()) return s;
  return collect();
}

absl::Status CudaBackend::submit(const Step& step) {
  if (broken_) return absl::FailedPreconditionError("cuda backend: an earlier step failed");
  if (in_flight_.size() >= kMaxStepsInFlight) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cuda backend: step ", step.step_id, ": ", in_flight_.size(), " steps already in flight"));
  }
  const StepMetadata& m = step.meta;
  const int tp = options_.tensor_parallel;
  if (step.tp != tp || static_cast<int>(step.ranks.size()) != tp ||
      step.num_sms != tiles_.num_sms || m.kv_block_size != options_.kv_block_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda backend: step ", step.step_id, " is built for tp ", step.tp, ", ",
                     step.num_sms, " SMs, kv_block_size ", m.kv_block_size, "; the backend has tp ",
                     tp, ", ", tiles_.num_sms, " SMs, kv_block_size ", options_.kv_block_size));
  }
  // References to the previous step's sampling rows [PREVIOUS_SAMPLE]: resolved on the device
  // when that step may still be running and samples the row there, else on the host once
  // that step is finished.
  bool has_references = false;
  for (int32_t id : m.token_ids) {
    if (!isa::is_previous_sample_ref(id)) continue;
    if (isa::previous_sample_row(id) >= previous_num_samples_) {
      return absl::InvalidArgumentError(
          absl::StrCat("cuda backend: step ", step.step_id, ": input refers to sampling row ",
                       isa::previous_sample_row(id), " of the previous step, which sampled ",
                       previous_num_samples_, " rows"));
    }
    has_references = true;
  }
  const bool needs_host_token = has_references && !previous_device_sampled_;
  if (absl::Status s = check_device_sampling(step); !s.ok()) return s;
  auto f = std::make_unique<InFlight>();
  f->step = &step;
  const int S = m.num_samples();
  // Per rank: rank 0 has the largest FFN share (shard_of gives the remainder to the first).
  const ModelShard rank0 = shard_of(config_, tp, 0);
  const WorkspaceShape shape{config_.hidden_size, rank0.q_heads * config_.head_dim,
                             config_.head_dim,    rank0.ffn_cols(),
                             config_.vocab_size,  tp,
                             options_.profile};
  CudaState& st = *state_;
  // (Penalties that need the token the previous step samples: the StepRunner collected that
  // step before submitting this one, so it is not in flight here.)
  // Everything below changes device state: a failure breaks the backend.
  if (!in_flight_.empty()) {
    const InFlight& previous = *in_flight_.back();
    if (previous.reads_workspace || needs_host_token || options_.poison_workspace) {
      for (auto& g : in_flight_) {
        if (absl::Status s = finish(*g); !s.ok()) return s;
      }
    }
  }
  bool previous_running = !in_flight_.empty() && !in_flight_.back()->output.has_value();
  f->sampling = pack_sampling(m, config_.vocab_size);
  if (previous_running && !st.fits(step, shape, f->sampling)) {
    for (auto& g : in_flight_) {  // a reallocation stops the kernel: nothing may run
      if (absl::Status s = finish(*g); !s.ok()) return s;
    }
    previous_running = false;
  }
  std::span<const int32_t> token_ids = m.token_ids;
  if (has_references && !previous_running) {  // the previous step is finished: host values
    resolved_token_ids_.assign(m.token_ids.begin(), m.token_ids.end());
    for (int32_t& id : resolved_token_ids_) {
      if (isa::is_previous_sample_ref(id)) id = previous_sampled_ids_[isa::previous_sample_row(id)];
    }
    token_ids = resolved_token_ids_;
  }
  f->reads_workspace = options_.host_sampling || options_.profile || options_.check_barriers;
  const int32_t flags = (options_.tensor_cores ? kernels::kStepTensorCores : 0) |
                        (options_.wgmma ? kernels::kStepWgmma : 0) |
                        (options_.wgmma_shallow ? kernels::kStepWgmmaShallow : 0) |
                        (options_.wgmma_wide_boxes ? 0 : kernels::kStepWgmmaNarrowBoxes) |
                        (options_.l2_ahead > 0 ? kernels::kStepL2Ahead : 0) |
                        (options_.l2_ahead > 1 ? kernels::kStepL2AheadFar : 0) |
                        (options_.attention_rotation ? kernels::kStepAttentionRotation : 0) |
                        (options_.kv_fence_on_reader ? kernels::kStepKvFenceOnReader : 0) |
                        (options_.matvec_registers ? kernels::kStepMatvecRegisters : 0) |
                        (options_.attention_cuda_cores ? kernels::kStepAttentionCudaCores : 0);
  absl::StatusOr<DeviceStepDesc> desc =
      st.upload_step(step, token_ids, shape, f->sampling, flags, options_.poison_workspace);
  if (!desc.ok()) return fail(desc.status());
  f->desc = *desc;
  absl::StatusOr<uint32_t> seq = st.post(options_.persistent);
  if (!seq.ok()) return fail(seq.status());
  f->seq = *seq;
  f->posted = std::chrono::steady_clock::now();
  if (previous_running) ++overlapped_posts_;
  previous_num_samples_ = S;
  previous_device_sampled_ = !options_.host_sampling;
  in_flight_.push_back(std::move(f));
  return absl::OkStatus();
}

absl::StatusOr<scheduler::StepOutput> CudaBackend::collect() {
  if (broken_) return absl::FailedPreconditionError("cuda backend: an earlier step failed");
  if (in_flight_.empty()) return absl::FailedPreconditionError("cuda backend: no step in flight");
  InFlight& f = *in_flight_.front();
  if (absl::Status s = finish(f); !s.ok()) return s;
  scheduler::StepOutput out = *std::move(f.output);
  in_flight_.pop_front();
  return out;
}

absl::Status CudaBackend::finish(InFlight& f) {
  if (f.output.has_value()) return absl::OkStatus();
  CudaState& st = *state_;
  const Step& step = *f.step;
  const StepMetadata& m = step.meta;
  const RankSchedule& rs = step.ranks[0];
  const int S = m.num_samples();
  const int V = config_.vocab_size;
  const DeviceStepDesc& d = f.desc;
  // The watchdog counts from when the step could start: its post, or the end of the step
  // before it (finished first: steps finish in order).
  const auto watchdog = std::chrono::milliseconds(options_.step_watchdog_ms);
  const auto deadline = std::max(f.posted, last_finished_) + watchdog;
  if (absl::Status s = st.wait(f.seq, step.step_id, options_.persistent, deadline, watchdog);
      !s.ok()) {
    return fail(s);
  }
  last_finished_ = std::chrono::steady_clock::now();
  st.last_desc = d;
  last_timings_.clear();
  const auto failed = [&](cudaError_t e, const char* what) { return fail(cuda_error(e, what)); };
  // The step's own choice (its descriptor has a profile region when it was submitted with
  // profile on): profiling may have been turned off since.
  if (d.profile != nullptr) {
    constexpr int kWords = kernels::kProfileWords;
    std::vector<uint64_t> t(kWords * rs.instructions.size());
    if (cudaError_t e =
            cudaMemcpy(t.data(), d.profile, t.size() * sizeof(uint64_t), cudaMemcpyDeviceToHost);
        e != cudaSuccess) {
      return failed(e, "reading the profile");
    }
    last_timings_.resize(rs.instructions.size());
    for (size_t i = 0; i < rs.instructions.size(); ++i) {
      last_timings_[i] = {t[kWords * i], t[kWords * i + 1], t[kWords * i + 2],
                          static_cast<uint32_t>(t[kWords * i + 3])};
    }
    keep_timings(step.step_id, last_timings_);
  }

  // Read back the samples and, when a row asked for them, the top logprobs (the slot's
  // outputs: a later step running now does not touch them).
  constexpr int kTop = kernels::kMaxTopLogprobs;
  const bool any_logprobs = f.sampling.any_logprobs;
  std::vector<int32_t> ids(S), top_ids(any_logprobs ? S * kTop : 0);
  std::vector<float> logprobs(S), top_logprobs(top_ids.size());
  if (S > 0) {
    const auto read = [&](void* dst, const void* src, size_t bytes) {
      return cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, st.copy);
    };
    cudaError_t e = read(ids.data(), d.sampled_ids, S * sizeof(int32_t));
    if (e == cudaSuccess) e = read(logprobs.data(), d.sampled_logprobs, S * sizeof(float));
    if (e == cudaSuccess && any_logprobs) {
      e = read(top_ids.data(), d.top_ids, top_ids.size() * sizeof(int32_t));
      if (e == cudaSuccess) {
        e = read(top_logprobs.data(), d.top_logprobs, top_logprobs.size() * sizeof(float));
      }
    }
    if (e == cudaSuccess) e = cudaStreamSynchronize(st.copy);
    if (e != cudaSuccess) return failed(e, "reading samples");
  }
  if (options_.check_barriers) {  // every rank's, [tp, num_barriers]
    std::vector<uint32_t> values(static_cast<size_t>(st.num_barriers) * st.tp);
    if (cudaError_t e = cudaMemcpy(values.data(), st.barriers, values.size() * sizeof(uint32_t),
                                   cudaMemcpyDeviceToHost);
        e != cudaSuccess) {
      return failed(e, "reading barriers");
    }
    for (int r = 0; r < st.tp; ++r) {
      for (int b = 0; b < st.num_barriers; ++b) {
        const uint32_t value = values[static_cast<size_t>(r) * st.num_barriers + b];
        const uint32_t want = step.ranks[r].barrier_end[b];
        if (value != want) {
          return fail(absl::InternalError(absl::StrCat("cuda backend: step ", step.step_id,
                                                       ": barrier ", b, " of rank ", r, " ends at ",
                                                       value, ", expected ", want)));
        }
      }
    }
  }
  scheduler::StepOutput out;
  out.step_id = step.step_id;
  out.sampled.assign(S, scheduler::SampledToken{});
  std::vector<float> row;
  for (int s = 0; s < S; ++s) {
    const RequestSampling& r = m.requests[m.sample_request[s]];
    scheduler::SampledToken& tok = out.sampled[s];
    if (!options_.host_sampling) {
      const size_t top = any_logprobs ? static_cast<size_t>(s) * kTop : 0;
      const size_t n = any_logprobs ? kTop : 0;
      tok = unpack_sample(f.sampling.rows[s], V, ids[s], logprobs[s],
                          std::span(top_ids).subspan(top, n),
                          std::span(top_logprobs).subspan(top, n));
    } else {  // test option: the host samples the device's logits (no later step ran)
      row.resize(V);
      if (cudaError_t e = cudaMemcpy(row.data(), d.logits + static_cast<int64_t>(s) * V,
                                     V * sizeof(float), cudaMemcpyDeviceToHost);
          e != cudaSuccess) {
        return failed(e, "reading logits");
      }
      tok = sample_token(row, r.params, sampling_context(r));
    }
    tok.request_id = r.request_id;
  }
  previous_sampled_ids_.clear();
  for (const auto& tok : out.sampled) previous_sampled_ids_.push_back(tok.token_id);
  f.output = std::move(out);
  return absl::OkStatus();
}

}  // namespace megaserve::engine
