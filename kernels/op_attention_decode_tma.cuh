// kAttention for decode-shaped instructions with the KV cache loaded by TMA [KV_TMA]: the keys
// of the instruction's requests as 16-key steps, each warp streaming its own steps through
// its own two step buffers with no CTA barrier between steps.
//
// The decode stream (op_attention_decode.cuh) moves 128-key stages through the CTA: every
// thread issues cp.async copies of its share of each stage, and a __syncthreads per stage
// holds every warp to the slowest. Under ncu it issued about 1,000 instructions per warp per
// stage for 16 keys of work (copy addressing, the per-stage barrier and branches), with two
// warps per scheduler to hide their latencies: 1.99 TB/s while busy on an H200.
//
// Here warp w takes steps w, w + 8, w + 16, ... of each request (keys [key_begin + 16 s,
// key_begin + 16 s + 16) for step s): the same keys in the same order as the stream's warp w
// (its 128-key stages are steps 8 t .. 8 t + 7), with the same attention_decode::attend16 on
// them and the same merge of the 8 slices in slice order, so a request's output is bitwise
// the stream's, whatever shares its instruction. A step's K and V are one 16-row box per 64
// columns of the cache block that holds them (DeviceModel::kv_maps; block sizes are
// multiples of 16), 8 KB at head dim 128, loaded by lanes 0-3 of the warp (one TMA load
// each) onto the step buffer's mbarrier; the next step loads while this one computes. Rows of
// a step past its request's keys are other tokens' (stale) rows of the block: K there is
// masked, and the warp zeroes V there (P is 0, and 0 times a stale NaN would not be).
//
// After its last step of a request, each warp leaves its slice state (m, l, unnormalized O^T)
// in one of two merge areas; one __syncthreads, then the CTA merges the request's slices
// while the next request's first steps load. The two areas alternate, so the merge of
// request k and the slice stores of request k + 1 need no barrier between them.
//
// With kStepAttentionRotation (not yet measured, so not the default) [SLICE_ROTATION]: the
// steps of all requests form one round robin over the warps: request k's slice i (its steps
// i, i + 8, ...) goes to warp (first_k + i) % 8, first_k the steps of the requests before it
// modulo 8, so every warp has the same number of steps, give or take one, over the whole
// instruction (with slice i on warp i, a request of 33 steps gives warp 0 a fifth step that
// the other seven wait for, request after request). Each warp stores its slice state in slice
// order and counts itself in; the warp that counts in last merges the request alone while the
// others go on with the next request's steps (no CTA barrier until the instruction ends), then
// frees the area; a warp stores request k's slice only once request k - 2's merge is done (an
// mbarrier per area). The same slices merged in the same order: the same bits.
#pragma once

#include "kernels/hopper/hopper_ptx.cuh"
#include "kernels/op_attention_decode.cuh"
#include "kernels/op_attention_mma.cuh"

namespace megaserve::kernels {

template <int HD>
struct AttentionDecodeTma {
  static constexpr int kMaxRequests = 8;
  static constexpr int kRows = attention_decode::kRows;  // M rows of a request (n8)
  static constexpr int kSlices = kMegakernelWarps;
  static constexpr int kStepKeys = 16;
  static constexpr int kBuffers = 2;                     // per warp
  static constexpr int kTileBytes = kStepKeys * HD * 2;  // K (or V) of a step
  static constexpr int kStepBytes = 2 * kTileBytes;
  static constexpr int kLoads = 2 * (HD / 64);  // TMA loads per step: K and V, per 64 columns
  static constexpr int kChunks = HD / 8;        // 16-byte chunks per row
  static constexpr int kQBytes = kMaxRequests * kRows * HD * 2;
  static constexpr int kRingBytes = kMegakernelWarps * kBuffers * kStepBytes;
  // A merge area: m and l of every slice's rows (slice w: m at [16 w + r], l at [16 w + 8 + r]),
  // then their unnormalized output rows (slice w, row r at (8 w + r) * HD).
  static constexpr int kMergeFloats = kSlices * 16 + kSlices * kRows * HD;
  struct Request {
    int32_t row0, n, q0, mrows, key_begin, key_end, steps, blocks_at;
    int32_t first;  // the warp of its slice 0: 0, or rotated [SLICE_ROTATION]
  };
  static constexpr int kMaxStagedBlocks = 1024;
  // Q, the rings (1024-byte aligned: up to 1 KB of padding), two merge areas, the request
  // table, the mbarriers (the step buffers', then the two areas'), the staged block indices and
  // their offsets, the areas' counts.
  static constexpr int kSmemBytes =
      kQBytes + 1024 + kRingBytes + 2 * kMergeFloats * 4 + kMaxRequests * sizeof(Request) +
      (kMegakernelWarps * kBuffers + 2) * 8 + (kMaxRequests + 1 + kMaxStagedBlocks + 2) * 4;
  static_assert(kStepBytes % 1024 == 0 && kTileBytes % 1024 == 0, "1024-byte aligned boxes");

  // Runs the instruction and returns true, or returns false (having done nothing, every thread
  // alike) where it does not take it: no cache maps, a KV split that does not start on a
  // 16-key step, too little shared memory, more than kMaxRequests requests, one with more than
  // kRows M rows, or more cache blocks than fit in shared memory.
  __device__ static bool run(const engine::isa::Instruction& inst, const OpContext& ctx,
                             const engine::isa::AttentionArgs& a) {
    using namespace attention_mma;
    const DeviceModel& md = ctx.model;
    const DeviceStepDesc& st = ctx.step;
    const int nreq = a.request_end - a.request_begin;
    const int K = st.kv_split_tokens, bs = st.kv_block_size;
    if (md.kv_maps == nullptr || (a.split >= 0 && K % kStepKeys != 0) || nreq > kMaxRequests ||
        static_cast<int64_t>(ctx.smem_floats) * 4 < kSmemBytes) {
      return false;
    }
    const int hq = md.q_heads, hkv = md.kv_heads, group = hq / hkv;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const bool rotate = (st.flags & kStepAttentionRotation) != 0;  // [SLICE_ROTATION]

    char* const base = reinterpret_cast<char*>(ctx.smem);
    const uint32_t q_addr = smem_addr(base);
    char* const ring = base + (((q_addr + kQBytes + 1023) & ~1023u) - q_addr);
    float* const merge_areas = reinterpret_cast<float*>(ring + kRingBytes);
    Request* const table = reinterpret_cast<Request*>(merge_areas + 2 * kMergeFloats);
    uint64_t* const bars = reinterpret_cast<uint64_t*>(table + kMaxRequests);
    uint64_t* const merged = bars + kMegakernelWarps * kBuffers;  // per merge area
    int32_t* const offs = reinterpret_cast<int32_t*>(merged + 2);
    int32_t* const staged = offs + kMaxRequests + 1;
    uint32_t* const counts = reinterpret_cast<uint32_t*>(staged + kMaxStagedBlocks);

    // What the previous op wrote here through the generic proxy comes before the TMA's writes;
    // the K/V rows that QKV instructions wrote through it (acquired by thread 0's wait, then
    // the controller's __syncthreads) before the TMA's reads by the loading lanes, which fence
    // once here rather than every QKV thread after its writes (~4.5 us per QKV instruction).
    hopper::fence_proxy_async_shared();
    if (lane < kLoads && (st.flags & kStepKvFenceOnReader) != 0) {
      hopper::fence_proxy_async_global();
    }
    __syncthreads();
    bool declined = false;
    if (threadIdx.x < nreq) {
      const int i = a.request_begin + threadIdx.x;
      Request r;
      attention_decode::request_of(st, a, nreq, i, group, K, r);
      r.steps = (r.key_end - r.key_begin + kStepKeys - 1) / kStepKeys;
      table[threadIdx.x] = r;
      declined = r.mrows > kRows;
    }
    if (__syncthreads_or(declined)) return false;
    if (threadIdx.x == 0) {  // where every request's cache block indices go [BLOCKS_STAGED]
      attention_decode::block_offsets(table, nreq, bs, offs);
      if (offs[nreq] <= kMaxStagedBlocks) {
        for (int b = 0; b < kMegakernelWarps * kBuffers + 2; ++b) {
          hopper::mbarrier_init(bars + b, 1);
        }
        hopper::fence_barrier_init();
        int first = 0;
        for (int k = 0; k < nreq; ++k) {
          table[k].first = rotate ? first : 0;
          first = (first + table[k].steps) % kSlices;
        }
        counts[0] = counts[1] = 0;
      }
    }
    __syncthreads();
    if (offs[nreq] > kMaxStagedBlocks) return false;
    // This warp's slice of request k, and its steps, request by request: (k, s) with s = slice,
    // slice + 8, ... < steps of k.
    const auto slice_of = [&](int k) { return (warp - table[k].first + kSlices) % kSlices; };
    struct Step {
      int k, s;
    };
    const auto first_at_or_after = [&](int k) {
      while (k < nreq && table[k].steps <= slice_of(k)) ++k;
      return Step{k, k < nreq ? slice_of(k) : 0};
    };
    const auto next = [&](Step c) {
      c.s += kSlices;
      return c.s < table[c.k].steps ? c : first_at_or_after(c.k + 1);
    };
    const int layer = inst.layer();
    // Block sizes are powers of two in the server: a shift instead of a division there.
    const int bs_shift = (bs & (bs - 1)) == 0 ? __ffs(bs) - 1 : -1;
    // Lanes 0 .. kLoads - 1 load step c into buffer b: lane 2 h + x loads columns [64 h, 64 h +
    // 64) of K (x = 0) or V (x = 1).
    const auto issue = [&](Step c, int b, bool global_table) {
      if (lane >= kLoads) return;
      const Request& r = table[c.k];
      const int j = r.key_begin + c.s * kStepKeys;
      const int at = bs_shift >= 0 ? j >> bs_shift : j / bs;  // block position in the request
      const int block = global_table
                            ? st.block_indices[r.blocks_at + at]
                            : staged[offs[c.k] + at -
                                     (bs_shift >= 0 ? r.key_begin >> bs_shift : r.key_begin / bs)];
      const int row = static_cast<int>(
          ((static_cast<int64_t>(layer) * md.num_kv_blocks + block) * hkv + a.kv_head) * bs + j -
          at * bs);
      uint64_t* const bar = bars + warp * kBuffers + b;
      if (lane == 0) hopper::mbarrier_arrive_expect_tx(bar, kStepBytes);
      char* const dst =
          ring + (warp * kBuffers + b) * kStepBytes + (lane & 1) * kTileBytes + (lane >> 1) * 2048;
      hopper::tma_load_2d(dst, md.kv_maps + (lane & 1), bar, (lane >> 1) * 64, row);
    };
    Step in = first_at_or_after(0);  // the next step to load
    if (in.k < nreq) {
      issue(in, 0, true);
      in = next(in);
    }
    // The indices staged (read from the loop on) while the first steps load.
    attention_decode::stage_block_indices(table, offs, nreq, bs, st.block_indices, staged);

    // Every request's Q as bf16.
    attention_decode::stage_q<HD, kMaxRequests>(q_addr, table, nreq, st.q, hq, group, a.kv_head);
    __syncthreads();  // Q and the block indices are staged

    int n = 0;  // this warp's steps computed, over all requests
    for (int k = 0; k < nreq; ++k) {
      const Request& r = table[k];
      float o[HD / 16][4];
#pragma unroll
      for (int dt = 0; dt < HD / 16; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
      float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
      int col_end[2];
      attention_decode::column_key_ends(st, a, group, K, r, col_end);
      const int slice = slice_of(k);
      uint32_t qf[HD / 16][2];
      if (slice < r.steps) attention_decode::load_q<HD>(q_addr, k * kRows, qf);
      for (int s = slice; s < r.steps; s += kSlices, ++n) {
        if (in.k < nreq) {  // the buffer of step n - 1, which every lane is done reading
          issue(in, (n + 1) % kBuffers, false);
          in = next(in);
        }
        const int b = n % kBuffers;
        hopper::mbarrier_wait_parity(bars + warp * kBuffers + b, (n / kBuffers) & 1);
        char* const k_tile = ring + (warp * kBuffers + b) * kStepBytes;
        const int key0 = r.key_begin + s * kStepKeys;
        if (key0 + kStepKeys > r.key_end) {  // V rows past the keys: zeros
          char* const v_tile = k_tile + kTileBytes;
          const int valid = r.key_end - key0;
          for (int e = lane; e < (kStepKeys - valid) * kChunks; e += 32) {
            const int row = valid + e / kChunks, c = e % kChunks;
            *reinterpret_cast<float4*>(v_tile + (c >> 3) * 2048 + row * 128 + (c & 7) * 16) =
                make_float4(0.0f, 0.0f, 0.0f, 0.0f);
          }
          hopper::fence_proxy_async_shared();  // before the buffer's next TMA writes
          __syncwarp();
        }
        const uint32_t k_addr = smem_addr(k_tile);
        attention_decode::attend16<HD, kStepKeys>(qf, k_addr, k_addr + kTileBytes, 0, key0, col_end,
                                                  o, m, l);
        __syncwarp();  // every lane is done reading the buffer before it is reloaded
      }
      // The slice state into merge area k % 2: with the rotation, once request k - 2's merge
      // has read it; without, every thread finished that merge before the last __syncthreads.
      const int area = k & 1;
      if (rotate && k >= 2) hopper::mbarrier_wait_parity(merged + area, ((k - 2) >> 1) & 1);
      float* const ml = merge_areas + area * kMergeFloats;
      float* const ow = ml + kSlices * 16;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        l[e] += __shfl_xor_sync(0xffffffffu, l[e], 4);
        l[e] += __shfl_xor_sync(0xffffffffu, l[e], 8);
        l[e] += __shfl_xor_sync(0xffffffffu, l[e], 16);
      }
      attention_decode::store_slice<HD, kRows>(ml, ow, slice, r.mrows, o, m, l);
      const auto write =
          attention_decode::output_writer<HD>(md, st, a, a.request_begin + k, r, group);
      if (!rotate) {  // the CTA merges the request
        __syncthreads();
        merge_slices<HD, kRows>(ml, ow, 1, kSlices, r.mrows, write);
        continue;
      }
      // Counted in after the warp's stores (the fences order them before the count, and the
      // last warp's reads after it); the last warp in merges.
      __syncwarp();
      uint32_t before = 0;
      if (lane == 0) {
        __threadfence_block();
        before = atomicAdd(counts + area, 1u);
        __threadfence_block();
      }
      __syncwarp();
      if (__shfl_sync(0xffffffffu, before, 0) != kSlices - 1) continue;
      merge_slices<HD, kRows>(ml, ow, 1, kSlices, r.mrows, write, lane, 32);
      __syncwarp();  // every lane's reads of the area are done
      if (lane == 0) {
        counts[area] = 0;
        hopper::mbarrier_arrive(merged + area);  // release: the reset and the reads before it
      }
    }
    __syncthreads();  // every merge is done; every step was waited for
    if (threadIdx.x == 0) {
      for (int b = 0; b < kMegakernelWarps * kBuffers + 2; ++b) hopper::mbarrier_inval(bars + b);
    }
    __syncthreads();  // shared memory is free for the next instruction
    return true;
  }
};

// kAttention on tensor cores: the whole instruction through the decode steps by TMA where they
// take it (AttentionDecodeTma), else through the decode stream; else each request alone,
// through either where its rows fit (so that such a request, a decode row, computes the same
// numbers whatever shares its instruction: the two compute the same numbers) and as passes
// (AttentionMma) where they do not. Head dims 64 and 128 (AttentionMma::takes).
struct AttentionDecode {
  __device__ static void run(const engine::isa::Instruction& inst, const OpContext& ctx) {
    const auto a = engine::isa::args_of<engine::isa::AttentionArgs>(inst);
    if (ctx.model.head_dim == 64) return run_hd<64>(inst, ctx, a);
    return run_hd<128>(inst, ctx, a);
  }

 private:
  template <int HD>
  __device__ static void run_hd(const engine::isa::Instruction& inst, const OpContext& ctx,
                                const engine::isa::AttentionArgs& a) {
    const DeviceStepDesc& st = ctx.step;
    const int nreq = a.request_end - a.request_begin;
    engine::isa::AttentionArgs part = a;  // k = -1: the whole instruction; k >= 0: request k
    for (int k = nreq > 1 ? -1 : 0; k < nreq; ++k) {
      if (k >= 0 && nreq > 1) {
        const int i = a.request_begin + k;
        part.request_begin = i;
        part.request_end = i + 1;
        part.query_begin = 0;
        part.query_end = st.query_start[i + 1] - st.query_start[i];
      }
      if (AttentionDecodeTma<HD>::run(inst, ctx, part) ||
          AttentionDecodeStream<HD>::run(inst, ctx, part)) {
        if (k < 0) return;
      } else if (k >= 0) {
        AttentionMma::run_request<HD>(inst, ctx, part);
      }
    }
  }
};

}  // namespace megaserve::kernels
