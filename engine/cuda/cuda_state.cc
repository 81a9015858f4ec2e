#include "engine/cuda/cuda_state.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <thread>
#include <tuple>
#include <utility>

namespace megaserve::engine {

using kernels::DeviceSampling;
using kernels::DeviceStepDesc;
using Clock = std::chrono::steady_clock;

namespace {

constexpr size_t kAlign = 256;
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Workspace regions of a step (shapes: BufferId in engine/isa/step.h), each 256-aligned: one
// block per rank (rank r's at r * rank_bytes), then rank 0's logits, scratch and profile.
struct WorkspaceLayout {
  size_t residual, q, attn, split, lse, act, partial;  // within a rank's block
  size_t rank_bytes = 0;
  size_t logits, scratch, profile;  // after the tp blocks
  size_t bytes = 0;
};

WorkspaceLayout workspace_layout(const Step& step, const WorkspaceShape& ws,
                                 const SamplingUpload& sampling) {
  const StepMetadata& m = step.meta;
  const size_t T = m.num_tokens, S = m.num_samples(), splits = m.num_split_rows;
  WorkspaceLayout l{};
  size_t* end = &l.rank_bytes;
  const auto region = [&](size_t bytes) {
    const size_t at = *end;
    *end += align_up(std::max<size_t>(bytes, 1));
    return at;
  };
  l.residual = region(sizeof(float) * T * ws.hidden);
  l.q = region(sizeof(float) * T * ws.q_size);
  l.attn = region(sizeof(float) * T * ws.q_size);
  l.split = region(sizeof(float) * splits * ws.head_dim);
  l.lse = region(sizeof(float) * splits);
  l.act = region(sizeof(float) * T * ws.ffn);
  // TP partial slots, or on one rank split-K's [SPLIT_K].
  l.partial = region(sizeof(float) * partial_slots_of(step) * T * ws.hidden);
  l.bytes = l.rank_bytes * ws.tp;
  end = &l.bytes;
  l.logits = region(sizeof(float) * S * ws.vocab);
  l.scratch = region(sizeof(float) * sampling.scratch_rows * ws.vocab);
  l.profile = region(ws.profile ? kernels::kProfileWords * sizeof(uint64_t) *
                                      step.ranks[0].instructions.size()
                                : 0);
  return l;
}

// The slot's upload: the ranks' descriptors and partial-slot table, then per rank its
// instructions and queue
// offsets, then the step's metadata (shared by the ranks) in kSharedArrays' order, each
// 256-aligned.
struct Array {
  const void* data;
  size_t bytes;
};
constexpr int kSharedArrays = 10;  // token ids .. sampling ids

std::vector<Array> slot_arrays(const Step& step, std::span<const int32_t> token_ids,
                               const SamplingUpload& sampling) {
  const StepMetadata& m = step.meta;
  const auto ints = [](const std::vector<int32_t>& v) {
    return Array{v.data(), v.size() * sizeof(int32_t)};
  };
  std::vector<Array> arrays;
  for (const RankSchedule& rs : step.ranks) {
    arrays.push_back({rs.instructions.data(), rs.instructions.size() * sizeof(isa::Instruction)});
    arrays.push_back(ints(rs.queue_begin));
  }
  for (Array a : {Array{token_ids.data(), token_ids.size() * sizeof(int32_t)}, ints(m.positions),
                  ints(m.token_request), ints(m.query_start), ints(m.block_indptr),
                  ints(m.block_indices), ints(m.split_row_begin), ints(m.sample_rows),
                  Array{sampling.rows.data(), sampling.rows.size() * sizeof(DeviceSampling)},
                  ints(sampling.ids)}) {
    arrays.push_back(a);
  }
  return arrays;
}

// The ranks' descriptors are an array (the kernel indexes the slot's first by rank), then
// comes the ranks' partial-slot table (DeviceStepDesc::peer_partial).
size_t peer_table_offset(int tp) { return align_up(sizeof(DeviceStepDesc) * tp); }

// Offsets of the arrays in the slot; returns the upload's bytes.
size_t slot_offsets(const std::vector<Array>& arrays, int tp, std::vector<size_t>& offsets) {
  size_t bytes = peer_table_offset(tp) + align_up(sizeof(float*) * tp);
  offsets.resize(arrays.size());
  for (size_t i = 0; i < arrays.size(); ++i) {
    offsets[i] = bytes;
    bytes += align_up(std::max<size_t>(arrays[i].bytes, 1));
  }
  return bytes;
}

bool seq_reached(uint32_t value, uint32_t target) {
  return static_cast<int32_t>(value - target) >= 0;  // wraps like the barriers
}

}  // namespace

CudaState::~CudaState() {
  cudaSetDevice(device);
  if (exec != nullptr && cudaStreamQuery(exec) == cudaErrorNotReady) {
    return;  // a kernel that would not stop: leak rather than hang in cudaFree
  }
  for (void* p : allocations) cudaFree(p);
  for (Slot& s : slots) {
    cudaFreeHost(s.staging);
    cudaFree(s.device);
    cudaFree(s.outputs);
  }
  cudaFree(workspace);
  cudaFree(barriers);
  cudaFree(control);
  if (host != nullptr) cudaFreeHost(host);
  for (cudaEvent_t e : done) {
    if (e != nullptr) cudaEventDestroy(e);
  }
  if (exec != nullptr) cudaStreamDestroy(exec);
  if (copy != nullptr) cudaStreamDestroy(copy);
}

absl::Status CudaState::init(int barrier_count) {
  MEGASERVE_CUDA_RETURN(cudaStreamCreateWithFlags(&exec, cudaStreamNonBlocking), "stream");
  MEGASERVE_CUDA_RETURN(cudaStreamCreateWithFlags(&copy, cudaStreamNonBlocking), "stream");
  for (cudaEvent_t& e : done) {
    MEGASERVE_CUDA_RETURN(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "event");
  }
  num_barriers = barrier_count;
  const size_t barrier_bytes = sizeof(uint32_t) * num_barriers * tp;
  MEGASERVE_CUDA_RETURN(cudaMalloc(&barriers, barrier_bytes), "barriers");
  MEGASERVE_CUDA_RETURN(cudaMemset(barriers, 0, barrier_bytes), "barriers");
  absl::StatusOr<kernels::DeviceModel*> m = upload(models.data(), models.size(), "rank models");
  if (!m.ok()) return m.status();
  models_device = *m;
  MEGASERVE_CUDA_RETURN(cudaMalloc(&control, sizeof(kernels::DeviceControl)), "control");
  MEGASERVE_CUDA_RETURN(cudaHostAlloc(&host, sizeof(kernels::HostControl), cudaHostAllocMapped),
                        "mapped control words");
  std::memset(const_cast<kernels::HostControl*>(host), 0, sizeof(kernels::HostControl));
  MEGASERVE_CUDA_RETURN(cudaHostGetDevicePointer(&host_device_alias, host, 0),
                        "mapped control words");
  return absl::OkStatus();
}

bool CudaState::wait_exec_idle(std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  while (cudaStreamQuery(exec) == cudaErrorNotReady) {
    if (Clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  return true;
}

kernels::MegakernelParams CudaState::params(int slot) const {
  kernels::MegakernelParams p{};
  p.tp = tp;
  p.ctas_per_rank = ctas_per_rank;
  p.models = models_device;
  p.slots[0] = reinterpret_cast<const DeviceStepDesc*>(slots[0].device);
  p.slots[1] = reinterpret_cast<const DeviceStepDesc*>(slots[1].device);
  for (int r = 0; r < tp; ++r) p.barriers[r] = barriers + static_cast<size_t>(r) * num_barriers;
  p.host = host_device_alias;
  p.control = control;
  p.slot = slot;
  p.first_seq = seq;
  return p;
}

absl::Status CudaState::start_persistent() {
  // Only with no step posted and unfinished: the kernel starts at the doorbell's value.
  host->doorbell = seq;
  host->completed = seq;
  host->shutdown = 0;
  host->abort = 0;
  host->aborted = 0;
  kernels::DeviceControl c{};
  c.go = seq;
  MEGASERVE_CUDA_RETURN(cudaMemcpy(control, &c, sizeof c, cudaMemcpyHostToDevice),
                        "resetting the step ring");
  MEGASERVE_CUDA_RETURN(kernels::launch_megakernel_persistent(params(0), grid, smem_bytes, exec),
                        "launching the persistent megakernel");
  persistent_running = true;
  return absl::OkStatus();
}

bool CudaState::stop_persistent() {
  if (!persistent_running) return true;
  persistent_running = false;
  if (seq_reached(host->completed, seq)) {
    // Every posted step is done: the shutdown goes through the ring as the next step.
    host->shutdown = 1;
    std::atomic_thread_fence(std::memory_order_seq_cst);
    host->doorbell = seq + 1;
    if (wait_exec_idle(std::chrono::milliseconds(2000))) return true;
  }
  host->abort = 1;
  return wait_exec_idle(std::chrono::milliseconds(2000));
}

absl::Status CudaState::ensure_slot(int i, size_t bytes, int32_t samples) {
  Slot& s = slots[i];
  if (s.capacity >= bytes && s.output_capacity >= samples) return absl::OkStatus();
  // The persistent kernel holds the slots' addresses, and cudaFree waits for the device:
  // stop it (it restarts on the next post).
  if (!stop_persistent()) return absl::InternalError("cuda backend: the kernel did not stop");
  if (s.capacity < bytes) {
    cudaFreeHost(s.staging);
    cudaFree(s.device);
    s.staging = s.device = nullptr;
    s.capacity = 0;
    const size_t cap = align_up(bytes + bytes / 2);
    MEGASERVE_CUDA_RETURN(cudaHostAlloc(&s.staging, cap, cudaHostAllocDefault), "step staging");
    MEGASERVE_CUDA_RETURN(cudaMalloc(&s.device, cap), "step slot");
    s.capacity = cap;
  }
  if (s.output_capacity < samples) {
    cudaFree(s.outputs);
    s.outputs = nullptr;
    s.output_capacity = 0;
    const int32_t cap = std::max(64, samples + samples / 2);
    MEGASERVE_CUDA_RETURN(
        cudaMalloc(&s.outputs, sizeof(int32_t) * cap * (2 + 2 * kernels::kMaxTopLogprobs)),
        "step outputs");
    s.output_capacity = cap;
  }
  return absl::OkStatus();
}

absl::Status CudaState::ensure_workspace(size_t bytes) {
  if (workspace_capacity >= bytes) return absl::OkStatus();
  if (!stop_persistent()) return absl::InternalError("cuda backend: the kernel did not stop");
  cudaFree(workspace);
  workspace = nullptr;
  workspace_capacity = 0;
  const size_t cap = align_up(bytes + bytes / 2);
  MEGASERVE_CUDA_RETURN(cudaMalloc(&workspace, cap), "workspace");
  workspace_capacity = cap;
  return absl::OkStatus();
}

std::pair<size_t, size_t> CudaState::step_bytes(const Step& step, const WorkspaceShape& ws,
                                                const SamplingUpload& sampling) const {
  std::vector<size_t> offsets;
  return {workspace_layout(step, ws, sampling).bytes,
          slot_offsets(slot_arrays(step, step.meta.token_ids, sampling), tp, offsets)};
}

bool CudaState::fits(const Step& step, const WorkspaceShape& ws,
                     const SamplingUpload& sampling) const {
  const auto [ws_bytes, bytes] = step_bytes(step, ws, sampling);
  const Slot& sl = slots[(seq + 1) & 1];
  return workspace_capacity >= ws_bytes && sl.capacity >= bytes &&
         sl.output_capacity >= step.meta.num_samples();
}

absl::StatusOr<DeviceStepDesc> CudaState::upload_step(const Step& step,
                                                      std::span<const int32_t> token_ids,
                                                      const WorkspaceShape& ws,
                                                      const SamplingUpload& sampling, int32_t flags,
                                                      bool poison) {
  MEGASERVE_CUDA_RETURN(cudaSetDevice(device), "selecting the device");
  const StepMetadata& m = step.meta;
  const WorkspaceLayout wl = workspace_layout(step, ws, sampling);
  if (absl::Status s = ensure_workspace(wl.bytes); !s.ok()) return s;

  const std::vector<Array> arrays = slot_arrays(step, token_ids, sampling);
  std::vector<size_t> offsets;
  const size_t bytes = slot_offsets(arrays, tp, offsets);
  const int slot = static_cast<int>((seq + 1) & 1);  // the kernel reads slot seq % 2
  if (absl::Status s = ensure_slot(slot, bytes, m.num_samples()); !s.ok()) return s;
  Slot& sl = slots[slot];
  for (size_t i = 0; i < arrays.size(); ++i) {
    if (arrays[i].bytes > 0) std::memcpy(sl.staging + offsets[i], arrays[i].data, arrays[i].bytes);
  }
  const auto dptr = [&](int i) { return sl.device + offsets[i]; };
  const int shared = 2 * tp;  // the first shared array
  const auto wsf = [&](size_t o) { return reinterpret_cast<float*>(workspace + o); };
  const int64_t cap = sl.output_capacity;
  for (int r = 0; r < tp; ++r) {  // every rank's partial slots, in rank order
    const float* p = wsf(wl.rank_bytes * r + wl.partial);
    std::memcpy(sl.staging + peer_table_offset(tp) + sizeof p * r, &p, sizeof p);
  }
  ++epoch;
  DeviceStepDesc rank0{};
  for (int r = 0; r < tp; ++r) {
    const RankSchedule& rs = step.ranks[r];
    const size_t block = wl.rank_bytes * r;  // rank r's workspace
    DeviceStepDesc d{};
    d.num_queues = rs.num_queues();
    d.num_tokens = m.num_tokens;
    d.num_requests = m.num_requests;
    d.kv_block_size = m.kv_block_size;
    d.kv_split_tokens = m.kv_split_tokens;
    d.num_samples = m.num_samples();
    d.num_split_rows = m.num_split_rows;
    d.flags = flags;
    d.epoch = epoch;
    d.instructions = reinterpret_cast<const isa::Instruction*>(dptr(2 * r));
    d.queue_begin = reinterpret_cast<const int32_t*>(dptr(2 * r + 1));
    const int32_t** int_fields[] = {&d.token_ids,       &d.positions,    &d.token_request,
                                    &d.query_start,     &d.block_indptr, &d.block_indices,
                                    &d.split_row_begin, &d.sample_rows};
    for (int i = 0; i < 8; ++i) {
      *int_fields[i] = reinterpret_cast<const int32_t*>(dptr(shared + i));
    }
    d.sampling = reinterpret_cast<const DeviceSampling*>(dptr(shared + 8));
    d.sampling_ids = reinterpret_cast<const int32_t*>(dptr(shared + 9));
    // The previous step (posted just before) wrote its samples into the other slot's outputs.
    d.previous_sampled_ids = slots[slot ^ 1].outputs;
    d.residual = wsf(block + wl.residual);
    d.q = wsf(block + wl.q);
    d.attn_out = wsf(block + wl.attn);
    d.split_out = wsf(block + wl.split);
    d.split_lse = wsf(block + wl.lse);
    d.act = wsf(block + wl.act);
    // Rank 0's full rows; rank r writes its vocabulary columns [TP_PLACEMENT].
    d.logits = wsf(wl.logits) + models[r].vocab_begin;
    d.sampling_scratch = wsf(wl.scratch);
    d.sampled_ids = sl.outputs;
    d.sampled_logprobs = reinterpret_cast<float*>(sl.outputs + cap);
    d.top_ids = sl.outputs + 2 * cap;
    d.top_logprobs = reinterpret_cast<float*>(sl.outputs + (2 + kernels::kMaxTopLogprobs) * cap);
    d.profile =
        ws.profile && r == 0 ? reinterpret_cast<uint64_t*>(workspace + wl.profile) : nullptr;
    d.tp = tp;
    if (partial_slots_of(step) > 0) {  // TP, or split-K on one rank [SPLIT_K]
      d.partial = wsf(block + wl.partial);
      d.peer_partial = reinterpret_cast<const float* const*>(sl.device + peer_table_offset(tp));
    }
    std::memcpy(sl.staging + sizeof d * r, &d, sizeof d);
    if (r == 0) rank0 = d;
  }
  // Only copies on the copy stream while a persistent kernel is resident [STEP_RING]: a
  // kernel there (cudaMemsetAsync is one) may never start, since the megakernel's CTAs can
  // hold nearly all of every SM's registers while they wait for this very upload.
  if (poison) {              // all-ones words are NaN floats (and bf16 values)
    size_t most = wl.bytes;  // the largest copy: the buffer is not resized between copies
    for (const kernels::DeviceModel& model : models) {
      most = std::max(most, sizeof(uint16_t) * static_cast<size_t>(model.act_cache_rows) *
                                static_cast<size_t>(model.hidden));
    }
    if (poison_bytes.size() < most) poison_bytes.assign(most, 0xff);
    MEGASERVE_CUDA_RETURN(
        cudaMemcpyAsync(workspace, poison_bytes.data(), wl.bytes, cudaMemcpyHostToDevice, copy),
        "poisoning");
    // Every rank's activation cache and its flags too (all-ones flags are no step's key): a
    // pass that read rows no pass of this step stored shows up.
    for (const kernels::DeviceModel& model : models) {
      if (model.act_cache == nullptr) continue;
      const size_t rows = static_cast<size_t>(model.act_cache_rows);
      const size_t cache_bytes = sizeof(uint16_t) * rows * static_cast<size_t>(model.hidden);
      const size_t flag_bytes = sizeof(uint64_t) * (rows / kernels::kActFlagRows);
      MEGASERVE_CUDA_RETURN(cudaMemcpyAsync(model.act_cache, poison_bytes.data(), cache_bytes,
                                            cudaMemcpyHostToDevice, copy),
                            "poisoning");
      MEGASERVE_CUDA_RETURN(cudaMemcpyAsync(model.act_cache_flags, poison_bytes.data(), flag_bytes,
                                            cudaMemcpyHostToDevice, copy),
                            "poisoning");
      // The rank's bf16 activations (its shard's widths): read where no op of this step
      // wrote, NaN. Copied in pieces of the poison buffer's size.
      const std::tuple<uint16_t*, int64_t, int64_t> bf16_rows[] = {
          {model.ffn_act, model.ffn_act_rows, model.ffn},
          {model.attn_act, model.attn_act_rows, int64_t{model.q_heads} * model.head_dim},
          {model.norm_act, model.norm_act_rows, int64_t{model.hidden}}};
      for (const auto& [rows_at, act_rows, width] : bf16_rows) {
        if (rows_at == nullptr) continue;
        const size_t n =
            sizeof(uint16_t) * static_cast<size_t>(act_rows) * static_cast<size_t>(width);
        for (size_t at = 0; at < n; at += poison_bytes.size()) {
          MEGASERVE_CUDA_RETURN(
              cudaMemcpyAsync(reinterpret_cast<uint8_t*>(rows_at) + at, poison_bytes.data(),
                              std::min(poison_bytes.size(), n - at), cudaMemcpyHostToDevice, copy),
              "poisoning");
        }
      }
    }
  }
  MEGASERVE_CUDA_RETURN(cudaMemcpyAsync(sl.device, sl.staging, bytes, cudaMemcpyHostToDevice, copy),
                        "upload");
  // Bounded, so that an upload that cannot complete fails the step instead of hanging it.
  const auto deadline = Clock::now() + kUploadTimeout;
  cudaError_t e;
  while ((e = cudaStreamQuery(copy)) == cudaErrorNotReady) {
    if (Clock::now() > deadline) {
      return absl::DeadlineExceededError(absl::StrCat("cuda backend: uploading step ", step.step_id,
                                                      " did not complete within ",
                                                      kUploadTimeout.count(), " ms"));
    }
    std::this_thread::yield();
  }
  MEGASERVE_CUDA_RETURN(e, "upload");
  return rank0;
}

absl::StatusOr<uint32_t> CudaState::post(bool persistent) {
  const uint32_t next = seq + 1;
  if (persistent) {
    if (!persistent_running) {
      if (absl::Status s = start_persistent(); !s.ok()) return s;
    }
    std::atomic_thread_fence(std::memory_order_seq_cst);  // slot written before the doorbell
    host->doorbell = next;
  } else {
    // Reset only while no launch of ours can be running an aborted wait: after a watchdog
    // abort the backend is broken and posts nothing more.
    if (seq_reached(completed_seq, seq)) host->abort = 0;
    MEGASERVE_CUDA_RETURN(
        kernels::launch_megakernel_step(params(static_cast<int>(next & 1)), grid, smem_bytes, exec),
        "launching the megakernel");
    MEGASERVE_CUDA_RETURN(cudaEventRecord(done[next & 1], exec), "event");
  }
  seq = next;
  return next;
}

absl::Status CudaState::wait(uint32_t step_seq, uint64_t step_id, bool persistent,
                             Clock::time_point deadline, std::chrono::milliseconds watchdog) {
  const auto timed_out = [&](const char* how) {
    return absl::DeadlineExceededError(absl::StrCat("cuda backend: step ", step_id,
                                                    " did not complete within ", watchdog.count(),
                                                    " ms (", how, ")"));
  };
  if (seq_reached(completed_seq, step_seq)) return absl::OkStatus();
  if (persistent) {
    while (!seq_reached(host->completed, step_seq)) {
      if (Clock::now() > deadline || cudaStreamQuery(exec) != cudaErrorNotReady) break;
      std::this_thread::yield();
    }
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (!seq_reached(host->completed, step_seq)) {
      const cudaError_t e = cudaStreamQuery(exec);
      if (e != cudaSuccess && e != cudaErrorNotReady) return cuda_error(e, "persistent megakernel");
      host->abort = 1;  // every wait loop gives up, so the kernel exits
      stop_persistent();
      return timed_out("persistent megakernel aborted");
    }
  } else {
    cudaError_t e;
    while ((e = cudaEventQuery(done[step_seq & 1])) == cudaErrorNotReady) {
      if (Clock::now() > deadline) {
        host->abort = 1;
        wait_exec_idle(std::chrono::milliseconds(2000));
        return timed_out("megakernel aborted");
      }
      std::this_thread::yield();
    }
    if (e != cudaSuccess) return cuda_error(e, "megakernel");
  }
  completed_seq = step_seq;
  return absl::OkStatus();
}

}  // namespace megaserve::engine
