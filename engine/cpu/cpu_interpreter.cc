#include "engine/cpu/cpu_interpreter.h"

#include <chrono>
#include <limits>
#include <mutex>
#include <random>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/planner/schedule_shard.h"

namespace megaserve::engine {

namespace {

// The ops index weights by the config's shapes: refuse tensors that disagree.
absl::Status check_weight_shapes(const ModelConfig& c, const ModelWeights& w) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
  const int64_t Q = c.q_size(), KV = c.kv_size(), hd = c.head_dim;
  const auto check = [](const Tensor& t, std::vector<int64_t> shape, const std::string& name,
                        bool optional = false) -> absl::Status {
    if (optional && t.empty()) return absl::OkStatus();
    if (t.empty() || t.shape != shape) {
      return absl::InvalidArgumentError(
          absl::StrCat("weight ", name, " is missing or not [", absl::StrJoin(shape, ", "), "]"));
    }
    return absl::OkStatus();
  };
  if (static_cast<int>(w.layers.size()) != c.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("weights have ", w.layers.size(), " layers, the config ", c.num_layers));
  }
  absl::Status s = check(w.embedding, {V, H}, "embedding");
  if (s.ok()) s = check(w.lm_head, {V, H}, "lm_head");
  if (s.ok()) s = check(w.final_norm, {H}, "final_norm");
  for (int l = 0; l < c.num_layers && s.ok(); ++l) {
    const LayerWeights& x = w.layers[l];
    const std::string p = absl::StrCat("layers.", l, ".");
    if (s.ok()) s = check(x.attn_norm, {H}, p + "attn_norm");
    if (s.ok()) s = check(x.ffn_norm, {H}, p + "ffn_norm");
    if (s.ok()) s = check(x.wq, {Q, H}, p + "wq");
    if (s.ok()) s = check(x.wk, {KV, H}, p + "wk");
    if (s.ok()) s = check(x.wv, {KV, H}, p + "wv");
    if (s.ok()) s = check(x.wo, {H, Q}, p + "wo");
    if (s.ok()) s = check(x.w_gate, {I, H}, p + "w_gate");
    if (s.ok()) s = check(x.w_up, {I, H}, p + "w_up");
    if (s.ok()) s = check(x.w_down, {H, I}, p + "w_down");
    if (s.ok()) s = check(x.bq, {Q}, p + "bq", true);
    if (s.ok()) s = check(x.bk, {KV}, p + "bk", true);
    if (s.ok()) s = check(x.bv, {KV}, p + "bv", true);
    if (s.ok()) s = check(x.q_norm, {hd}, p + "q_norm", true);
    if (s.ok()) s = check(x.k_norm, {hd}, p + "k_norm", true);
  }
  return s;
}

}  // namespace

absl::StatusOr<std::unique_ptr<CpuInterpreter>> CpuInterpreter::create(
    const ModelConfig& config, const ModelWeights& weights, int tp, int32_t num_kv_blocks,
    int32_t kv_block_size, int num_barriers) {
  if (absl::Status s = check_tensor_parallel(config, tp); !s.ok()) return s;
  if (num_kv_blocks <= 0 || kv_block_size <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV cache of ", num_kv_blocks, " blocks of ", kv_block_size, " tokens"));
  }
  if (absl::Status s = check_weight_shapes(config, weights); !s.ok()) return s;
  if (config.head_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("head_dim ", config.head_dim, " is odd; RoPE needs pairs"));
  }
  std::unique_ptr<CpuInterpreter> in(new CpuInterpreter());
  in->config_ = config;
  in->inv_freq_ = rope_inv_freq(config);
  in->num_kv_blocks_ = num_kv_blocks;
  in->kv_block_size_ = kv_block_size;
  in->num_barriers_ = num_barriers;
  in->ranks_.resize(tp);
  for (int r = 0; r < tp; ++r) {
    cpu::RankState& st = in->ranks_[r];
    st.shard = shard_of(config, tp, r);
    st.weights = cpu::rank_weights(weights, config, st.shard);
    st.kv_layout = {num_kv_blocks, st.shard.kv_heads, kv_block_size, config.head_dim};
    st.k_cache.assign(config.num_layers,
                      std::vector<float>(st.kv_layout.elements_per_layer(), 0.0f));
    st.v_cache = st.k_cache;
    in->barriers_.emplace_back(new std::atomic<uint32_t>[num_barriers]);
    for (int b = 0; b < num_barriers; ++b) in->barriers_[r][b].store(0);
  }
  return in;
}

uint32_t CpuInterpreter::barrier(int rank, int index) const {
  return barriers_[rank][index].load(std::memory_order_acquire);
}

void CpuInterpreter::set_barriers(uint32_t value) {
  for (auto& r : barriers_) {
    for (int b = 0; b < num_barriers_; ++b) r[b].store(value);
  }
}

std::vector<float> CpuInterpreter::logits(int sample) const {
  std::vector<float> out;
  for (const cpu::RankState& st : ranks_) {
    const int V = st.shard.vocab_cols();
    const float* row = st.ws.logits.data() + static_cast<int64_t>(sample) * V;
    out.insert(out.end(), row, row + V);
  }
  return out;
}

absl::Status CpuInterpreter::check_step(const Step& step) const {
  if (step.tp != tp() || static_cast<int>(step.ranks.size()) != tp()) {
    return absl::InvalidArgumentError(absl::StrCat("step ", step.step_id, " is built for tp ",
                                                   step.tp, ", interpreter has ", tp()));
  }
  const StepMetadata& m = step.meta;
  if (m.kv_block_size != kv_block_size_) {
    return absl::InvalidArgumentError(absl::StrCat("step ", step.step_id, ": kv_block_size ",
                                                   m.kv_block_size, " != ", kv_block_size_));
  }
  for (int32_t id : token_ids_) {
    if (id < 0 || id >= config_.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("step ", step.step_id, ": token id ", id,
                                                     " unresolved or outside the vocabulary"));
    }
  }
  for (int32_t b : m.block_indices) {
    if (b < 0 || b >= num_kv_blocks_) {
      return absl::InvalidArgumentError(absl::StrCat("step ", step.step_id, ": KV block ", b,
                                                     " outside [0, ", num_kv_blocks_, ")"));
    }
  }
  for (int r = 0; r < tp(); ++r) {
    const RankSchedule& rs = step.ranks[r];
    if (static_cast<int>(rs.barrier_begin.size()) != num_barriers_) {
      return absl::InvalidArgumentError("step built for another barrier count");
    }
    for (int b = 0; b < num_barriers_; ++b) {
      if (barrier(r, b) != rs.barrier_begin[b]) {
        return absl::FailedPreconditionError(
            absl::StrCat("step ", step.step_id, ": barrier ", b, " of rank ", r, " reads ",
                         barrier(r, b), " but the step was built for ", rs.barrier_begin[b],
                         " (steps must run completely, in build order)"));
      }
    }
    for (const isa::Instruction& inst : rs.instructions) {
      const int op = static_cast<int>(inst.opcode());
      if (op <= 0 || op >= static_cast<int>(isa::Opcode::kNumOpcodes) ||
          inst.num_waits() > isa::kMaxWaits || inst.num_signals() > isa::kMaxSignals) {
        return absl::InvalidArgumentError(
            absl::StrCat("step ", step.step_id, ": malformed instruction, opcode ", op));
      }
    }
  }
  return absl::OkStatus();
}

void CpuInterpreter::prepare_workspaces(const Step& step, bool poison) {
  const StepMetadata& m = step.meta;
  const int64_t T = m.num_tokens, H = config_.hidden_size, hd = config_.head_dim;
  const float fill = poison ? std::numeric_limits<float>::quiet_NaN() : 0.0f;
  for (cpu::RankState& st : ranks_) {
    cpu::Workspace& ws = st.ws;
    const auto size = [&](std::vector<float>& v, int64_t n) {
      if (poison) {
        v.assign(n, fill);
      } else if (static_cast<int64_t>(v.size()) < n) {
        v.resize(n);
      }
    };
    size(ws.residual, T * H);
    size(ws.q, T * st.shard.q_heads * hd);
    size(ws.attn_out, T * st.shard.q_heads * hd);
    size(ws.split_out, m.num_split_rows * hd);
    size(ws.split_lse, m.num_split_rows);
    size(ws.partial, partial_slots_of(step) * T * H);
    size(ws.act, T * st.shard.ffn_cols());
    size(ws.logits, static_cast<int64_t>(m.num_samples()) * st.shard.vocab_cols());
  }
}

bool CpuInterpreter::ready(const Step& /*step*/, int rank, const isa::Instruction& inst) const {
  for (int w = 0; w < inst.num_waits(); ++w) {
    if (!isa::barrier_reached(barriers_[rank][inst.wait_barrier(w)].load(std::memory_order_acquire),
                              static_cast<uint32_t>(inst.wait_target(w)))) {
      return false;
    }
  }
  return true;
}

// Records rank 0's instruction timings when ExecutionOptions::timings is set; sm = the queue
// (virtual SM) that holds the instruction. Each index is written by the one thread that runs
// it, so the threaded mode needs no lock.
class CpuInterpreter::TimingRecorder {
 public:
  TimingRecorder(const Step& step, std::vector<InstructionTiming>* out) : out_(out) {
    if (out_ == nullptr) return;
    const RankSchedule& rs = step.ranks[0];
    out_->assign(rs.instructions.size(), InstructionTiming{});
    for (int q = 0; q < rs.num_queues(); ++q) {
      for (int32_t i = rs.queue_begin[q]; i < rs.queue_begin[q + 1]; ++i) {
        (*out_)[i].sm = static_cast<uint32_t>(q);
      }
    }
  }
  bool on() const { return out_ != nullptr; }
  static uint64_t now() {
    return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                     std::chrono::steady_clock::now().time_since_epoch())
                                     .count());
  }
  void record(int rank, int32_t index, uint64_t fetch, uint64_t start, uint64_t end) {
    if (out_ == nullptr || rank != 0) return;
    InstructionTiming& t = (*out_)[index];
    t.fetch_ns = fetch;
    t.start_ns = start;
    t.end_ns = end;
  }

 private:
  std::vector<InstructionTiming>* out_;
};

void CpuInterpreter::signal(const isa::Instruction& inst) {
  for (int s = 0; s < inst.num_signals(); ++s) {
    const int target = inst.signal_rank(s);
    for (int r = 0; r < tp(); ++r) {
      if (target == isa::kSignalAllRanks || target == r) {
        barriers_[r][inst.signal_barrier(s)].fetch_add(1, std::memory_order_release);
      }
    }
  }
}

absl::Status CpuInterpreter::run_sequential(const Step& step, const cpu::OpContext& ctx,
                                            TimingRecorder& timer) {
  for (const InstructionRef ref : step.global_order) {
    const isa::Instruction& inst = step.ranks[ref.rank].instructions[ref.index];
    if (!ready(step, ref.rank, inst)) {
      return absl::InternalError(absl::StrCat("step ", step.step_id, ": ",
                                              describe_instruction(step, ref),
                                              " is not ready in global order"));
    }
    const uint64_t start = timer.on() ? TimingRecorder::now() : 0;
    cpu::execute(inst, ref.rank, ctx);
    if (timer.on()) timer.record(ref.rank, ref.index, start, start, TimingRecorder::now());
    signal(inst);
  }
  return absl::OkStatus();
}

std::vector<CpuInterpreter::QueueRange> CpuInterpreter::non_empty_queues(const Step& step) const {
  std::vector<QueueRange> queues;
  for (int r = 0; r < tp(); ++r) {
    const RankSchedule& rs = step.ranks[r];
    for (int q = 0; q < rs.num_queues(); ++q) {
      if (rs.queue_begin[q] < rs.queue_begin[q + 1]) {
        queues.push_back({r, rs.queue_begin[q], rs.queue_begin[q + 1]});
      }
    }
  }
  return queues;
}

absl::Status CpuInterpreter::run_shuffled(const Step& step, const cpu::OpContext& ctx,
                                          uint64_t seed, TimingRecorder& timer) {
  std::vector<QueueRange> queues = non_empty_queues(step);  // begin: the next instruction
  std::mt19937_64 rng(seed ^ (step.step_id * 0x9e3779b97f4a7c15ull));
  std::vector<int> ready_queues;
  while (!queues.empty()) {
    ready_queues.clear();
    for (int i = 0; i < static_cast<int>(queues.size()); ++i) {
      const QueueRange& q = queues[i];
      if (ready(step, q.rank, step.ranks[q.rank].instructions[q.begin])) ready_queues.push_back(i);
    }
    if (ready_queues.empty()) {
      const QueueRange& q = queues.front();
      return absl::InternalError(
          absl::StrCat("step ", step.step_id, ": deadlock, no queue is ready; ",
                       describe_instruction(step, {q.rank, q.begin}), " waits forever"));
    }
    const int pick = ready_queues[rng() % ready_queues.size()];
    QueueRange& q = queues[pick];
    const isa::Instruction& inst = step.ranks[q.rank].instructions[q.begin];
    const uint64_t start = timer.on() ? TimingRecorder::now() : 0;
    cpu::execute(inst, q.rank, ctx);
    if (timer.on()) timer.record(q.rank, q.begin, start, start, TimingRecorder::now());
    signal(inst);
    if (++q.begin == q.end) queues.erase(queues.begin() + pick);
  }
  return absl::OkStatus();
}

absl::Status CpuInterpreter::run_threaded(const Step& step, const cpu::OpContext& ctx,
                                          double timeout, TimingRecorder& timer) {
  const std::vector<QueueRange> queues = non_empty_queues(step);
  std::atomic<bool> failed{false};
  std::string error;
  std::mutex error_mu;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout);
  if (!pool_) pool_ = std::make_unique<cpu::WorkerPool>();
  pool_->run(static_cast<int>(queues.size()), [&](int w) {
    const QueueRange& q = queues[w];
    const RankSchedule& rs = step.ranks[q.rank];
    for (int32_t i = q.begin; i < q.end; ++i) {
      const isa::Instruction& inst = rs.instructions[i];
      const uint64_t fetch = timer.on() ? TimingRecorder::now() : 0;
      while (!ready(step, q.rank, inst)) {  // acquire loads pair with signal()'s release adds
        if (failed.load(std::memory_order_relaxed)) return;
        if (std::chrono::steady_clock::now() > deadline) {
          std::lock_guard<std::mutex> lock(error_mu);
          if (error.empty()) error = describe_instruction(step, {q.rank, i});
          failed.store(true);
          return;
        }
        std::this_thread::yield();
      }
      const uint64_t start = timer.on() ? TimingRecorder::now() : 0;
      cpu::execute(inst, q.rank, ctx);
      if (timer.on()) timer.record(q.rank, i, fetch, start, TimingRecorder::now());
      signal(inst);
    }
  });
  if (failed.load()) {
    return absl::DeadlineExceededError(
        absl::StrCat("step ", step.step_id, ": ", error, " still waiting after ", timeout, " s"));
  }
  return absl::OkStatus();
}

absl::Status CpuInterpreter::resolve_token_ids(const Step& step,
                                               std::span<const int32_t> previous_samples) {
  token_ids_.assign(step.meta.token_ids.begin(), step.meta.token_ids.end());
  for (int32_t& id : token_ids_) {
    if (!isa::is_previous_sample_ref(id)) continue;
    const int32_t row = isa::previous_sample_row(id);
    if (row >= static_cast<int32_t>(previous_samples.size())) {
      return absl::InvalidArgumentError(
          absl::StrCat("step ", step.step_id, ": input refers to sampling row ", row,
                       " of the previous step, which sampled ", previous_samples.size(), " rows"));
    }
    id = previous_samples[row];
  }
  return absl::OkStatus();
}

absl::Status CpuInterpreter::run(const Step& step, const ExecutionOptions& options,
                                 std::vector<scheduler::SampledToken>* sampled,
                                 std::span<const int32_t> previous_samples) {
  if (absl::Status s = resolve_token_ids(step, previous_samples); !s.ok()) return s;
  if (absl::Status s = check_step(step); !s.ok()) return s;
  prepare_workspaces(step, options.poison_workspace);
  sampled->assign(step.meta.num_samples(), scheduler::SampledToken{});
  cpu::OpContext ctx;
  ctx.config = &config_;
  ctx.inv_freq = &inv_freq_;
  ctx.meta = &step.meta;
  ctx.token_ids = &token_ids_;
  ctx.ranks = &ranks_;
  ctx.sampled = sampled;
  ctx.round_activations_bf16 = options.round_activations_bf16;
  TimingRecorder timer(step, options.timings);
  absl::Status s;
  switch (options.mode) {
    case ExecutionMode::kSequential:
      s = run_sequential(step, ctx, timer);
      break;
    case ExecutionMode::kShuffled:
      s = run_shuffled(step, ctx, options.seed, timer);
      break;
    case ExecutionMode::kThreaded:
      s = run_threaded(step, ctx, options.wait_timeout_seconds, timer);
      break;
  }
  if (!s.ok()) return s;
  for (int r = 0; r < tp(); ++r) {
    for (int b = 0; b < num_barriers_; ++b) {
      if (barrier(r, b) != step.ranks[r].barrier_end[b]) {
        return absl::InternalError(absl::StrCat("step ", step.step_id, ": barrier ", b, " of rank ",
                                                r, " ends at ", barrier(r, b), ", expected ",
                                                step.ranks[r].barrier_end[b]));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace megaserve::engine
