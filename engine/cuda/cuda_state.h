// The CUDA backend's device side as the host sees it (engine/cuda/cuda_backend.h): streams, the
// step slots and workspace, the barriers, the mapped control words of the step ring, and
// the two ways of running a step (one launch, or a doorbell to the persistent kernel),
// both under a watchdog. Steps are posted and waited for separately, so step seq + 1 can be
// uploaded into the other slot and posted while step seq runs (at most two posted steps not
// yet waited for). Only engine/cuda/ includes it.
#pragma once

#include <cuda_runtime.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "engine/cuda/cuda_sampling.h"
#include "engine/isa/step.h"
#include "kernels/megakernel.h"

namespace megaserve::engine {

inline absl::Status cuda_error(cudaError_t e, const char* what) {
  return absl::InternalError(absl::StrCat("cuda backend: ", what, ": ", cudaGetErrorName(e), " (",
                                          cudaGetErrorString(e), ")"));
}

#define MEGASERVE_CUDA_RETURN(expr, what)                                        \
  do {                                                                           \
    if (cudaError_t e_ = (expr); e_ != cudaSuccess) return cuda_error(e_, what); \
  } while (0)

// Shapes the workspace is carved for: per rank (q_size and ffn the largest rank's share),
// residual, q, attention output, KV-split partials, activations and, with tp > 1, the partial
// slots; once, rank 0's full-vocabulary logits, sampling scratch and profile.
struct WorkspaceShape {
  int hidden, q_size, head_dim, ffn, vocab;
  int tp;
  bool profile;  // also room for kernels::kProfileWords words per rank-0 instruction
};

// A step's upload (and poisoning) takes milliseconds; past this it is stuck.
inline constexpr std::chrono::milliseconds kUploadTimeout{30000};

struct CudaState {
  int device = 0;
  // Tensor-parallel ranks in the launch, each acting through ctas_per_rank CTAs
  // (kernels/megakernel.h [TP_PLACEMENT]); grid = tp * ctas_per_rank.
  int tp = 1;
  int ctas_per_rank = 0;
  int grid = 0;
  size_t smem_bytes = 0;        // dynamic shared memory per CTA
  cudaStream_t exec = nullptr;  // the megakernel
  cudaStream_t copy = nullptr;  // uploads and read-backs (runs beside a persistent kernel)
  cudaEvent_t done[2] = {nullptr, nullptr};  // per slot: its launch ended (per-step mode)
  std::vector<void*> allocations;            // weights, cache, inv_freq, layer table
  std::vector<kernels::DeviceModel> models;  // per rank
  const kernels::DeviceModel* models_device = nullptr;  // their device copy (init)
  uint32_t* barriers = nullptr;  // [tp, num_barriers], never reset between steps
  int num_barriers = 0;
  kernels::HostControl* host = nullptr;  // mapped pinned memory [STEP_RING]
  kernels::HostControl* host_device_alias = nullptr;
  kernels::DeviceControl* control = nullptr;
  // Step slots [STEP_RING]: pinned staging and device copies; the ranks' descriptors first,
  // an array indexed by rank.
  // `outputs` is apart from the upload: the step's sampled ids, logprobs, top ids and top
  // logprobs, which the host reads back and the next step's embedding may read
  // (references, engine/isa/isa.h [PREVIOUS_SAMPLE]) while the step after that is uploaded
  // into this slot.
  struct Slot {
    uint8_t* staging = nullptr;
    uint8_t* device = nullptr;
    size_t capacity = 0;
    // [output_capacity] ids, [output_capacity] logprobs, [output_capacity, kMaxTopLogprobs]
    // top ids, [output_capacity, kMaxTopLogprobs] top logprobs (4-byte words).
    int32_t* outputs = nullptr;
    int32_t output_capacity = 0;
  } slots[2];
  uint8_t* workspace = nullptr;
  size_t workspace_capacity = 0;
  kernels::DeviceStepDesc last_desc{};  // where the last step's outputs live (rank 0's)
  std::vector<uint8_t> poison_bytes;    // all 0xff: copied over the workspace to poison it
  bool persistent_running = false;
  uint32_t seq = 0;    // the ring's sequence number of the latest step posted (0: none yet)
  uint32_t epoch = 0;  // the last step's DeviceStepDesc::epoch (1 for the first step)

  CudaState() = default;
  CudaState(const CudaState&) = delete;
  CudaState& operator=(const CudaState&) = delete;
  ~CudaState();

  // Streams, events, every rank's barriers, the models' device copy and the control words;
  // `device`, `tp`, `ctas_per_rank`, `grid` and `models` set by the caller.
  absl::Status init(int num_barriers);

  template <typename T>
  absl::StatusOr<T*> upload(const T* data, size_t count, const char* what) {
    void* p = nullptr;
    MEGASERVE_CUDA_RETURN(cudaMalloc(&p, (count > 0 ? count : 1) * sizeof(T)), what);
    allocations.push_back(p);
    MEGASERVE_CUDA_RETURN(cudaMemcpy(p, data, count * sizeof(T), cudaMemcpyHostToDevice), what);
    return static_cast<T*>(p);
  }

  // True when `step` fits the workspace and the next slot as allocated: uploading it then
  // reallocates nothing (a reallocation stops the persistent kernel, so it needs every
  // posted step finished).
  bool fits(const Step& step, const WorkspaceShape& shape, const SamplingUpload& sampling) const;

  // Carves the workspace for `step`, packs its queues and metadata into the next slot
  // ((seq + 1) % 2) with `token_ids` as its input ids (the step's, or those with references
  // resolved on the host), `sampling` (its rows and their ids), the step's kernels::kStep*
  // `flags` and the previous step's sampled ids, and uploads them (poisoning the workspace
  // with NaN first when asked), waiting at most kUploadTimeout. Reallocating or poisoning
  // needs no step running: the caller waits first unless fits() and !poison. Returns the
  // descriptor the kernel will read.
  absl::StatusOr<kernels::DeviceStepDesc> upload_step(const Step& step,
                                                      std::span<const int32_t> token_ids,
                                                      const WorkspaceShape& shape,
                                                      const SamplingUpload& sampling, int32_t flags,
                                                      bool poison);

  // Posts the uploaded step as sequence number seq + 1 (a doorbell to the persistent kernel,
  // which starts it once the steps posted before are done, or a launch queued behind them
  // on the exec stream) and returns that number.
  absl::StatusOr<uint32_t> post(bool persistent);

  // Waits until step `step_seq` has completed, every step posted before it too. Past
  // `deadline` the kernel is aborted and DeadlineExceeded returned.
  absl::Status wait(uint32_t step_seq, uint64_t step_id, bool persistent,
                    std::chrono::steady_clock::time_point deadline,
                    std::chrono::milliseconds watchdog);

  // Posts a shutdown through the ring and waits for the kernel to exit, aborting it if it
  // does not. True when it stopped. Posted steps not yet complete are aborted.
  bool stop_persistent();

 private:
  bool wait_exec_idle(std::chrono::milliseconds timeout);
  kernels::MegakernelParams params(int slot) const;
  absl::Status start_persistent();
  absl::Status ensure_slot(int i, size_t bytes, int32_t samples);
  absl::Status ensure_workspace(size_t bytes);
  // Byte sizes of the workspace and the slot upload for `step`.
  std::pair<size_t, size_t> step_bytes(const Step& step, const WorkspaceShape& shape,
                                       const SamplingUpload& sampling) const;
  uint32_t completed_seq = 0;  // latest step known complete
};

}  // namespace megaserve::engine
