#include "engine/cuda_state.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <thread>

namespace megaserve::engine {

using kernels::DeviceSampling;
using kernels::DeviceStepDesc;
using Clock = std::chrono::steady_clock;

namespace {

constexpr size_t kAlign = 256;
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

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
  }
  cudaFree(workspace);
  cudaFree(barriers);
  cudaFree(control);
  if (host != nullptr) cudaFreeHost(host);
  if (done != nullptr) cudaEventDestroy(done);
  if (exec != nullptr) cudaStreamDestroy(exec);
  if (copy != nullptr) cudaStreamDestroy(copy);
}

absl::Status CudaState::init(int barrier_count) {
  MEGASERVE_CUDA_RETURN(cudaStreamCreateWithFlags(&exec, cudaStreamNonBlocking), "stream");
  MEGASERVE_CUDA_RETURN(cudaStreamCreateWithFlags(&copy, cudaStreamNonBlocking), "stream");
  MEGASERVE_CUDA_RETURN(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), "event");
  num_barriers = barrier_count;
  MEGASERVE_CUDA_RETURN(cudaMalloc(&barriers, sizeof(uint32_t) * num_barriers), "barriers");
  MEGASERVE_CUDA_RETURN(cudaMemset(barriers, 0, sizeof(uint32_t) * num_barriers), "barriers");
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
  p.model = model;
  p.slots[0] = reinterpret_cast<const DeviceStepDesc*>(slots[0].device);
  p.slots[1] = reinterpret_cast<const DeviceStepDesc*>(slots[1].device);
  p.barriers = barriers;
  p.host = host_device_alias;
  p.control = control;
  p.slot = slot;
  p.first_seq = seq;
  return p;
}

absl::Status CudaState::start_persistent() {
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
  host->shutdown = 1;
  std::atomic_thread_fence(std::memory_order_seq_cst);
  host->doorbell = seq + 1;
  if (wait_exec_idle(std::chrono::milliseconds(2000))) return true;
  host->abort = 1;
  return wait_exec_idle(std::chrono::milliseconds(2000));
}

absl::Status CudaState::ensure_slot(int i, size_t bytes) {
  Slot& s = slots[i];
  if (s.capacity >= bytes) return absl::OkStatus();
  // The persistent kernel holds the slots' addresses: stop it (it restarts on the next run).
  if (!stop_persistent()) return absl::InternalError("cuda backend: the kernel did not stop");
  cudaFreeHost(s.staging);
  cudaFree(s.device);
  s = Slot{};
  const size_t cap = align_up(bytes + bytes / 2);
  MEGASERVE_CUDA_RETURN(cudaHostAlloc(&s.staging, cap, cudaHostAllocDefault), "step staging");
  MEGASERVE_CUDA_RETURN(cudaMalloc(&s.device, cap), "step slot");
  s.capacity = cap;
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

absl::StatusOr<DeviceStepDesc> CudaState::upload_step(const Step& step, const WorkspaceShape& ws,
                                                      const SamplingUpload& sampling, int32_t flags,
                                                      bool poison) {
  MEGASERVE_CUDA_RETURN(cudaSetDevice(device), "selecting the device");
  const StepMetadata& m = step.meta;
  const RankSchedule& rs = step.ranks[0];
  const size_t T = m.num_tokens, S = m.num_samples(), splits = m.num_split_rows;

  // Workspace regions (shapes: BufferId in engine/schedule_step.h), each 256-aligned.
  size_t ws_bytes = 0;
  const auto region = [&](size_t bytes) {
    const size_t at = ws_bytes;
    ws_bytes += align_up(std::max<size_t>(bytes, 1));
    return at;
  };
  const size_t o_res = region(sizeof(float) * T * ws.hidden);
  const size_t o_q = region(sizeof(float) * T * ws.q_size);
  const size_t o_attn = region(sizeof(float) * T * ws.q_size);
  const size_t o_split = region(sizeof(float) * splits * ws.head_dim);
  const size_t o_lse = region(sizeof(float) * splits);
  const size_t o_act = region(sizeof(float) * T * ws.ffn);
  const size_t o_logits = region(sizeof(float) * S * ws.vocab);
  const size_t o_ids = region(sizeof(int32_t) * S), o_lp = region(sizeof(float) * S);
  const size_t o_scratch = region(sizeof(float) * sampling.scratch_rows * ws.vocab);
  const size_t o_top_ids = region(sizeof(int32_t) * S * kernels::kMaxTopLogprobs);
  const size_t o_top_lps = region(sizeof(float) * S * kernels::kMaxTopLogprobs);
  const size_t o_prof =
      region(ws.profile ? kernels::kProfileWords * sizeof(uint64_t) * rs.instructions.size() : 0);
  if (absl::Status s = ensure_workspace(ws_bytes); !s.ok()) return s;

  // Slot layout: the descriptor, then the arrays in this order.
  struct Array {
    const void* data;
    size_t bytes;
  };
  const auto ints = [](const std::vector<int32_t>& v) {
    return Array{v.data(), v.size() * sizeof(int32_t)};
  };
  const Array arrays[] = {
      {rs.instructions.data(), rs.instructions.size() * sizeof(isa::Instruction)},
      ints(rs.queue_begin),
      ints(m.token_ids),
      ints(m.positions),
      ints(m.token_request),
      ints(m.query_start),
      ints(m.block_indptr),
      ints(m.block_indices),
      ints(m.split_row_begin),
      ints(m.sample_rows),
      {sampling.rows.data(), sampling.rows.size() * sizeof(DeviceSampling)},
      ints(sampling.ids)};
  constexpr int kNumArrays = sizeof(arrays) / sizeof(arrays[0]);
  size_t offsets[kNumArrays];
  size_t bytes = align_up(sizeof(DeviceStepDesc));
  for (int i = 0; i < kNumArrays; ++i) {
    offsets[i] = bytes;
    bytes += align_up(std::max<size_t>(arrays[i].bytes, 1));
  }
  const int slot = static_cast<int>((seq + 1) & 1);  // the kernel reads slot seq % 2
  if (absl::Status s = ensure_slot(slot, bytes); !s.ok()) return s;
  Slot& sl = slots[slot];
  for (int i = 0; i < kNumArrays; ++i) {
    if (arrays[i].bytes > 0) std::memcpy(sl.staging + offsets[i], arrays[i].data, arrays[i].bytes);
  }
  const auto dptr = [&](int i) { return sl.device + offsets[i]; };
  DeviceStepDesc d{};
  d.num_queues = rs.num_queues();
  d.num_tokens = m.num_tokens;
  d.num_requests = m.num_requests;
  d.kv_block_size = m.kv_block_size;
  d.kv_split_tokens = m.kv_split_tokens;
  d.num_samples = m.num_samples();
  d.num_split_rows = m.num_split_rows;
  d.flags = flags;
  d.instructions = reinterpret_cast<const isa::Instruction*>(dptr(0));
  const int32_t** int_fields[] = {&d.queue_begin,   &d.token_ids,       &d.positions,
                                  &d.token_request, &d.query_start,     &d.block_indptr,
                                  &d.block_indices, &d.split_row_begin, &d.sample_rows};
  for (int i = 0; i < 9; ++i) *int_fields[i] = reinterpret_cast<const int32_t*>(dptr(i + 1));
  d.sampling = reinterpret_cast<const DeviceSampling*>(dptr(10));
  d.sampling_ids = reinterpret_cast<const int32_t*>(dptr(11));
  const auto wsf = [&](size_t o) { return reinterpret_cast<float*>(workspace + o); };
  d.residual = wsf(o_res);
  d.q = wsf(o_q);
  d.attn_out = wsf(o_attn);
  d.split_out = wsf(o_split);
  d.split_lse = wsf(o_lse);
  d.act = wsf(o_act);
  d.logits = wsf(o_logits);
  d.sampled_ids = reinterpret_cast<int32_t*>(workspace + o_ids);
  d.sampled_logprobs = wsf(o_lp);
  d.sampling_scratch = wsf(o_scratch);
  d.top_ids = reinterpret_cast<int32_t*>(workspace + o_top_ids);
  d.top_logprobs = wsf(o_top_lps);
  d.profile = ws.profile ? reinterpret_cast<uint64_t*>(workspace + o_prof) : nullptr;
  std::memcpy(sl.staging, &d, sizeof d);
  // Only copies on the copy stream while a persistent kernel is resident [STEP_RING]: a
  // kernel there (cudaMemsetAsync is one) may never start, since the megakernel's CTAs can
  // hold nearly all of every SM's registers while they wait for this very upload.
  if (poison) {  // all-ones words are NaN floats
    if (poison_bytes.size() < ws_bytes) poison_bytes.assign(ws_bytes, 0xff);
    MEGASERVE_CUDA_RETURN(
        cudaMemcpyAsync(workspace, poison_bytes.data(), ws_bytes, cudaMemcpyHostToDevice, copy),
        "poisoning");
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
  return d;
}

absl::Status CudaState::run(uint64_t step_id, bool persistent, std::chrono::milliseconds watchdog) {
  const auto deadline = Clock::now() + watchdog;
  const uint32_t next = seq + 1;
  const auto timed_out = [&](const char* how) {
    return absl::DeadlineExceededError(absl::StrCat("cuda backend: step ", step_id,
                                                    " did not complete within ", watchdog.count(),
                                                    " ms (", how, ")"));
  };
  if (persistent) {
    if (!persistent_running) {
      if (absl::Status s = start_persistent(); !s.ok()) return s;
    }
    std::atomic_thread_fence(std::memory_order_seq_cst);  // slot written before the doorbell
    host->doorbell = next;
    while (host->completed != next) {
      if (Clock::now() > deadline || cudaStreamQuery(exec) != cudaErrorNotReady) break;
      std::this_thread::yield();
    }
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (host->completed != next) {
      const cudaError_t e = cudaStreamQuery(exec);
      if (e != cudaSuccess && e != cudaErrorNotReady) return cuda_error(e, "persistent megakernel");
      host->abort = 1;  // every wait loop gives up, so the kernel exits
      stop_persistent();
      return timed_out("persistent megakernel aborted");
    }
  } else {
    host->abort = 0;
    MEGASERVE_CUDA_RETURN(
        kernels::launch_megakernel_step(params(static_cast<int>(next & 1)), grid, smem_bytes, exec),
        "launching the megakernel");
    MEGASERVE_CUDA_RETURN(cudaEventRecord(done, exec), "event");
    cudaError_t e;
    while ((e = cudaEventQuery(done)) == cudaErrorNotReady) {
      if (Clock::now() > deadline) {
        host->abort = 1;
        wait_exec_idle(std::chrono::milliseconds(2000));
        return timed_out("megakernel aborted");
      }
      std::this_thread::yield();
    }
    if (e != cudaSuccess) return cuda_error(e, "megakernel");
  }
  seq = next;
  return absl::OkStatus();
}

}  // namespace megaserve::engine
