// One tensor-parallel rank's share of the model on the device (kernels::DeviceModel): each
// weight tensor's shard (engine/planner/schedule_shard.h: q/kv head rows, FFN rows and
// columns, vocabulary rows) converted to bf16 and uploaded as a contiguous matrix, the layer
// table, the wgmma TMA maps, the activation cache and the bf16 activations. With one rank the
// shard is the whole model. Used by CudaBackend::create (engine/cuda/cuda_backend_create.cc).
#pragma once

#include "absl/status/status.h"
#include "engine/cuda/cuda_state.h"
#include "engine/model/model_config.h"
#include "engine/model/weights.h"
#include "engine/planner/schedule_shard.h"
#include "kernels/megakernel.h"

namespace megaserve::engine {

// Fills `m` (shapes, weights, inv_freq, maps, activation cache, bf16 activations; not the KV
// cache) for `shard`, the allocations owned by `st`. `ctas`: the rank's CTAs (the activation
// cache's rows); `wgmma`: allocate the activation cache and the bf16 activations (only wgmma
// passes read them); `bf16_act_rows`: CudaBackendOptions::bf16_act_rows (0: no bf16
// activations, ffn_act, attn_act and norm_act null).
absl::Status upload_rank_weights(const ModelConfig& config, const ModelWeights& weights,
                                 const ModelShard& shard, int ctas, bool wgmma, int bf16_act_rows,
                                 CudaState& st, kernels::DeviceModel& m);

}  // namespace megaserve::engine
