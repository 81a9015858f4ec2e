// kAttention on tensor cores for decode-shaped instructions: up to 8 requests whose M rows
// ((query row, q head of the group) pairs, op_attention_mma.cuh) number at most 8 each, as
// one decode step's batched requests do (GQA up to 8, one query row). AttentionMmaPass would
// run them one pass per request, each starting with an empty copy pipeline and ending with
// it drained while the key slices merge; here the requests' key stages form one stream
// through the ring of stage buffers, so the next request's K/V are in flight while a
// request's slices merge.
//
// The mma operands are swapped against the pass (keys are the M side): S^T (16 keys x 8 M
// rows) = K Q^T and O^T (HD x 8 M rows) += V^T P^T, so a decode row of GQA 4 fills half of
// an n8 tile where the pass's layout fills a quarter of an m16 tile: half the mma
// instructions and half the output registers to rescale per 16 keys. P^T comes from the S^T
// accumulators by movmatrix.
//
// Every request's Q rows are staged at the start (request k in Q rows [8 k, 8 k + 8)): 16 KB at
// head dim 128, not the pass's 32 KB, so that three stage buffers fit beside the controller's
// static shared memory and two stages stay in flight while one computes. With two buffers a
// stage's load was issued only when the previous one had landed: each 128-key stage waited a
// whole memory latency on an empty pipeline (0.58-0.67 of copy bandwidth on an H100).
// Stages hold T = 128 keys; warp w takes keys [16 w, 16 w + 16) of each stage (8 key
// slices). After a request's last stage the warps leave their slice states in that stage's
// buffer (every warp is past it, and the buffer is refilled only after the next
// __syncthreads) and (m, l) past the stage buffers, then merge them in slice order, as the
// pass does (merge_slices).
#pragma once

#include "kernels/op_attention_mma.cuh"

namespace megaserve::kernels {

namespace attention_decode {

// M rows of a request in the stream: the n8 side of the swapped mma.
inline constexpr int kRows = 8;

// Q^T of a request as B fragments of every 16-wide k step (staged Q rows [q_row0,
// q_row0 + 8); b0 of step kk in qf[kk][0], b1 in qf[kk][1]).
template <int HD>
__device__ __forceinline__ void load_q(uint32_t q_addr, int q_row0, uint32_t (&qf)[HD / 16][2]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int p = 0; p < HD / 32; ++p) {  // matrices: chunks 4p .. 4p + 3 of rows 0..7
    uint32_t r[4];
    ldmatrix_x4(r,
                q_addr + attention_mma::swizzled<HD>(q_row0 + (lane & 7), 4 * p + (lane >> 3)) * 2);
    qf[2 * p][0] = r[0];
    qf[2 * p][1] = r[1];
    qf[2 * p + 1][0] = r[2];
    qf[2 * p + 1][1] = r[3];
  }
}

// Element offset of (key row, 16-byte chunk) in a staged K or V tile: the stream's rows of
// HD bf16 (attention_mma::swizzled), or with kHalfRows > 0 the layout TMA writes in boxes of
// 64 columns x kHalfRows rows with the 128-byte swizzle (columns [64 h, 64 h + 64) of every
// row in half h, 128-byte rows, chunks XOR-swizzled by row % 8; each half 1024-byte aligned)
// [KV_TMA].
template <int HD, int kHalfRows>
__device__ __forceinline__ int tile_offset(int row, int chunk) {
  if constexpr (kHalfRows == 0) {
    return attention_mma::swizzled<HD>(row, chunk);
  } else {
    return (chunk >> 3) * (kHalfRows * 64) + row * 64 + (((chunk & 7) ^ (row & 7)) << 3);
  }
}

// Shared by the decode stream and the TMA steps (op_attention_decode_tma.cuh). A Request has
// row0, q0, mrows, key_begin, key_end and blocks_at (where its block table starts in
// st.block_indices).

// Request i's row of an instruction of nreq requests (all its query rows where nreq > 1, else
// the instruction's): first row in the step, rows, first query row, M rows, keys [key_begin,
// key_end) of the split (K keys per split) and where its block table starts.
template <class Request>
__device__ __forceinline__ void request_of(const DeviceStepDesc& st,
                                           const engine::isa::AttentionArgs& a, int nreq, int i,
                                           int group, int K, Request& r) {
  r.row0 = st.query_start[i];
  r.n = st.query_start[i + 1] - r.row0;
  r.q0 = nreq > 1 ? 0 : a.query_begin;
  const int q1 = nreq > 1 ? r.n : a.query_end;
  r.mrows = (q1 - r.q0) * group;
  r.key_begin = a.split < 0 ? 0 : a.split * K;
  int last = 0;  // past the last key of any of its query rows
  for (int qi = r.q0; qi < q1; ++qi) last = max(last, st.positions[r.row0 + qi] + 1);
  r.key_end = a.split < 0 ? last : min(last, (a.split + 1) * K);
  r.key_end = max(r.key_end, r.key_begin);
  r.blocks_at = st.block_indptr[i];
}

// The key ends of this thread's columns (M rows 2 t4 and 2 t4 + 1, t4 = lane % 4) of request
// r in attend16's layout: past its query row's position (within the split); key_begin for
// rows of no query (every key masked).
template <class Request>
__device__ __forceinline__ void column_key_ends(const DeviceStepDesc& st,
                                                const engine::isa::AttentionArgs& a, int group,
                                                int K, const Request& r, int (&col_end)[2]) {
  const int t4 = threadIdx.x & 3;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int rl = 2 * t4 + e;
    if (rl < r.mrows) {
      const int end = st.positions[r.row0 + r.q0 + rl / group] + 1;
      col_end[e] = a.split < 0 ? end : min(end, (a.split + 1) * K);
    } else {
      col_end[e] = r.key_begin;
    }
  }
}

// Stages the Q rows of up to kRequests requests as bf16 times log2 e / sqrt(HD): request k's M
// row rl (query row q0 + rl / group, q head rl % group of kv head kv_head) at staged row
// 8 k + rl; rows of no request are zeros.
template <int HD, int kRequests, class Request>
__device__ __forceinline__ void stage_q(uint32_t q_addr, const Request* table, int nreq,
                                        const float* q_rows, int hq, int group, int kv_head) {
  const float qscale = attention_mma::kLog2e / sqrtf(static_cast<float>(HD));
  constexpr int kChunks = HD / 8;
  constexpr int kIters = kRequests * kRows * kChunks / kMegakernelThreads;
  static_assert(kRequests * kRows * kChunks % kMegakernelThreads == 0, "whole rounds");
#pragma unroll 2
  for (int it = 0; it < kIters; ++it) {
    const int c = threadIdx.x + it * kMegakernelThreads;
    const int row = c / kChunks, qc = c % kChunks;
    const int k = row / kRows, rl = row % kRows;
    float4 x0 = make_float4(0.0f, 0.0f, 0.0f, 0.0f), x1 = x0;
    if (k < nreq && rl < table[k].mrows) {
      const Request& r = table[k];
      const float* q =
          q_rows +
          (static_cast<int64_t>(r.row0 + r.q0 + rl / group) * hq + kv_head * group + rl % group) *
              HD +
          qc * 8;
      x0 = *reinterpret_cast<const float4*>(q);
      x1 = *reinterpret_cast<const float4*>(q + 4);
    }
    attention_mma::store_q_chunk<HD>(q_addr, row, qc, x0, x1, qscale);
  }
}

// [BLOCKS_STAGED] Where each request's cache block indices [key_begin / bs, (key_end - 1) /
// bs] go among all requests' (offs[k], prefix sums; offs[nreq] their total). One thread.
template <class Request>
__device__ __forceinline__ void block_offsets(const Request* table, int nreq, int bs,
                                              int32_t* offs) {
  int total = 0;
  for (int k = 0; k < nreq; ++k) {
    offs[k] = total;
    const Request& r = table[k];
    if (r.key_end > r.key_begin) total += (r.key_end - 1) / bs - r.key_begin / bs + 1;
  }
  offs[nreq] = total;
}

// Those indices into staged[0, offs[nreq]), by the whole CTA.
template <class Request>
__device__ __forceinline__ void stage_block_indices(const Request* table, const int32_t* offs,
                                                    int nreq, int bs, const int32_t* block_indices,
                                                    int32_t* staged) {
  for (int e = threadIdx.x; e < offs[nreq]; e += kMegakernelThreads) {
    int k = 0;
    while (offs[k + 1] <= e) ++k;
    const Request& r = table[k];
    staged[e] = block_indices[r.blocks_at + r.key_begin / bs + e - offs[k]];
  }
}

// One warp's online-softmax step over staged keys [c0, c0 + 16) (first key key0; the tiles
// laid out as tile_offset<HD, kHalfRows> says) for the
// request's 8 M rows, with swapped operands. This thread holds keys g8 and g8 + 8 of S^T
// for M rows (columns) 2 t4 and 2 t4 + 1, whose key ends are col_end; m holds their running
// maxima (the same in every lane of a column), l this thread's part of their sums, o[dt]
// O^T rows 16 dt + g8 (o[dt][0..1]) and 16 dt + g8 + 8 (o[dt][2..3]) of those columns.
template <int HD, int kHalfRows = 0>
__device__ __forceinline__ void attend16(const uint32_t (&qf)[HD / 16][2], uint32_t k_tile,
                                         uint32_t v_tile, int c0, int key0, const int (&col_end)[2],
                                         float (&o)[HD / 16][4], float (&m)[2], float (&l)[2]) {
  const int lane = threadIdx.x & 31, g8 = lane >> 2, mi = lane >> 3;
  float sc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  {
    // K as the A fragment: matrices (keys +0 / +8) x (chunk 2kk / 2kk + 1).
    const int krow = c0 + (mi & 1) * 8 + (lane & 7);
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, k_tile + tile_offset<HD, kHalfRows>(krow, 2 * kk + (mi >> 1)) * 2);
      mma_bf16(sc, a, qf[kk][0], qf[kk][1]);
    }
  }
  // Mask, then the online softmax update of both columns (a column's 16 keys lie in the
  // 8 lanes of equal t4: reduce over lane ^ 4, ^ 8, ^ 16).
  float alpha[2];
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    if (key0 + g8 >= col_end[e]) sc[e] = -INFINITY;
    if (key0 + g8 + 8 >= col_end[e]) sc[e + 2] = -INFINITY;
    float cmax = fmaxf(sc[e], sc[e + 2]);
    cmax = fmaxf(cmax, __shfl_xor_sync(0xffffffffu, cmax, 4));
    cmax = fmaxf(cmax, __shfl_xor_sync(0xffffffffu, cmax, 8));
    cmax = fmaxf(cmax, __shfl_xor_sync(0xffffffffu, cmax, 16));
    const float m_new = fmaxf(m[e], cmax);
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // no keys yet: no NaN
    alpha[e] = exp2f(m[e] - m_use);
    sc[e] = exp2f(sc[e] - m_use);
    sc[e + 2] = exp2f(sc[e + 2] - m_use);
    l[e] = l[e] * alpha[e] + (sc[e] + sc[e + 2]);
    m[e] = m_new;
  }
#pragma unroll
  for (int dt = 0; dt < HD / 16; ++dt) {
    o[dt][0] *= alpha[0];
    o[dt][1] *= alpha[1];
    o[dt][2] *= alpha[0];
    o[dt][3] *= alpha[1];
  }
  // P^T (16 keys x 8 columns) as the B fragment: each 8-key half of the S^T accumulators
  // (rounded to bf16) transposed.
  const uint32_t b0 = movmatrix_trans(pack_bf16x2(sc[0], sc[1]));
  const uint32_t b1 = movmatrix_trans(pack_bf16x2(sc[2], sc[3]));
  {
    // V^T as the A fragment (ldmatrix.trans): matrices (chunk 2dt / 2dt + 1) x (keys +0 / +8).
    const int vrow = c0 + (mi >> 1) * 8 + (lane & 7);
#pragma unroll
    for (int dt = 0; dt < HD / 16; ++dt) {
      uint32_t a[4];
      ldmatrix_x4_trans(a, v_tile + tile_offset<HD, kHalfRows>(vrow, 2 * dt + (mi & 1)) * 2);
      mma_bf16(o[dt], a, b0, b1);
    }
  }
}

// Leaves slice w's key-slice state in shared memory as store_slice does (merge_slices' layout
// for kTileRows M rows per slice: m and l at ml[w * 2 kTileRows + r] and ml[w * 2 kTileRows +
// kTileRows + r], output rows at ow[(w * kTileRows + r) * HD + d]), from the swapped layout;
// l must already be summed over the column's lanes. Columns r >= valid are left out.
template <int HD, int kTileRows = 16>
__device__ __forceinline__ void store_slice(float* ml, float* ow, int w, int valid,
                                            const float (&o)[HD / 16][4], const float (&m)[2],
                                            const float (&l)[2]) {
  const int lane = threadIdx.x & 31, g8 = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int r = 2 * t4 + e;
    if (r >= valid) continue;
    if (g8 == 0) {
      ml[w * 2 * kTileRows + r] = m[e];
      ml[w * 2 * kTileRows + kTileRows + r] = l[e];
    }
    float* row = ow + (w * kTileRows + r) * HD + g8;
#pragma unroll
    for (int dt = 0; dt < HD / 16; ++dt) {
      row[16 * dt] = o[dt][e];
      row[16 * dt + 8] = o[dt][e + 2];
    }
  }
}

// merge_slices' write for request i of a decode instruction (its step rows r.n, first query
// row r.q0): M row `row` of the merge to its output row, the log-sum-exp where the
// instruction is a KV split, and the bf16 copy of an unsplit row.
template <int HD, class Request>
__device__ __forceinline__ auto output_writer(const DeviceModel& md, const DeviceStepDesc& st,
                                              const engine::isa::AttentionArgs& a, int i,
                                              const Request& r, int group) {
  return
      [&md, &st, &a, i, n = r.n, q0 = r.q0, group](int row, int d, float value, float lse_value) {
        float* lse;
        float* out =
            attention_mma::output_row<HD>(md, st, a, i, n, q0 + row / group, row % group, &lse);
        out[d] = value;
        if (lse != nullptr && d == 0) *lse = lse_value;
        if (lse == nullptr) {
          if (uint16_t* b = attn_act_at(md, st, out)) b[d] = float_to_bf16_bits(value);
        }
      };
}

}  // namespace attention_decode

template <int HD>
struct AttentionDecodeStream {
  static constexpr int kMaxRequests = attention_mma::kPassRows / 16;
  static constexpr int kT = attention_mma::kMaxStageKeys;
  static constexpr int kChunks = HD / 8;  // 16-byte chunks per K/V/Q row
  static constexpr int kRowStep = kMegakernelThreads / kChunks;
  static constexpr int kRowsPerThread = kT / kRowStep;
  static constexpr int kBufferBytes = attention_mma::buffer_bytes(HD);
  static constexpr int kQBytes = kMaxRequests * attention_decode::kRows * HD * 2;
  static_assert(kT / kMegakernelWarps == 16, "one 16-key slice per warp and stage");
  static_assert(kMaxRequests * attention_decode::kRows * kChunks % kMegakernelThreads == 0,
                "Q staging in whole rounds of the CTA");

  // Per request: first row in the step, rows in the step, first query row, M rows, keys
  // [key_begin, key_end), stages, and where its block table starts in st.block_indices.
  struct Request {
    int32_t row0, n, q0, mrows, key_begin, key_end, stages, blocks_at;
  };
  // Past the stage buffers: the request table, then (m, l) of every warp's 16 rows.
  static constexpr int kTailBytes = kMaxRequests * sizeof(Request) + kMegakernelWarps * 32 * 4;
  // Then, where the shared memory allows, the cache block indices of every request's keys
  // [BLOCKS_STAGED]: issuing a stage reads the indices of the stage after it, and from global
  // memory that read was an L2 round trip on every stage's path (the stage's compute is shorter).
  static constexpr int kMaxStagedBlocks = 1024;

  __host__ __device__ static constexpr int smem_bytes(int buffers) {
    return kQBytes + buffers * kBufferBytes + kTailBytes;
  }

  // Runs the instruction and returns true, or returns false (having done nothing, every thread
  // alike) when it is not decode-shaped: more than kMaxRequests requests, or one with more
  // than attention_decode::kRows M rows.
  __device__ static bool run(const engine::isa::Instruction& inst, const OpContext& ctx,
                             const engine::isa::AttentionArgs& a) {
    using namespace attention_mma;
    const DeviceModel& md = ctx.model;
    const DeviceStepDesc& st = ctx.step;
    const int nreq = a.request_end - a.request_begin;
    const int buffers = static_cast<int64_t>(ctx.smem_floats) * 4 >= smem_bytes(3) ? 3 : 2;
    if (nreq > kMaxRequests || static_cast<int64_t>(ctx.smem_floats) * 4 < smem_bytes(2)) {
      return false;
    }
    const int hq = md.q_heads, hkv = md.kv_heads, group = hq / hkv;
    const int K = st.kv_split_tokens, bs = st.kv_block_size;
    const engine::KvCacheLayout kv{.kv_heads = hkv, .block_size = bs, .head_dim = HD};
    const int warp = threadIdx.x >> 5;

    const uint32_t q_addr = static_cast<uint32_t>(__cvta_generic_to_shared(ctx.smem));
    const uint32_t stage_addr = q_addr + kQBytes;
    char* tail = reinterpret_cast<char*>(ctx.smem) + kQBytes + buffers * kBufferBytes;
    Request* table = reinterpret_cast<Request*>(tail);
    float* ml = reinterpret_cast<float*>(tail + kMaxRequests * sizeof(Request));

    __syncthreads();  // the previous op (or instruction) is done with shared memory
    bool too_big = false;
    if (threadIdx.x < nreq) {
      const int i = a.request_begin + threadIdx.x;
      Request r;
      attention_decode::request_of(st, a, nreq, i, group, K, r);
      r.stages = max(1, (r.key_end - r.key_begin + kT - 1) / kT);
      table[threadIdx.x] = r;
      too_big = r.mrows > attention_decode::kRows;
    }
    if (__syncthreads_or(too_big)) return false;

    const int64_t layer_offset = inst.layer() * md.cache_layer_elements;
    const uint16_t* kc = md.k_cache + layer_offset;
    const uint16_t* vc = md.v_cache + layer_offset;

    // The copy side: thread tid copies chunk tid % kChunks of the kRowsPerThread rows from
    // tid / kChunks * kRowsPerThread, as AttentionMmaPass [ATTN_COPY].
    const int chunk = threadIdx.x % kChunks, first_row = threadIdx.x / kChunks * kRowsPerThread;
    struct Cursor {
      int k, s;  // request (table index) and its stage
    };
    // [BLOCKS_STAGED] Request k's block indices [key_begin / bs, (key_end - 1) / bs] at
    // staged[offs[k] ...), all requests' together where they fit (offs: kMaxRequests + 1
    // prefix sums before them).
    int32_t* const offs = reinterpret_cast<int32_t*>(ml + kMegakernelWarps * 32);
    int32_t* const staged = offs + kMaxRequests + 1;
    const bool room = static_cast<int64_t>(ctx.smem_floats) * 4 >=
                      smem_bytes(buffers) + (kMaxRequests + 1 + kMaxStagedBlocks) * 4;
    if (room) {
      if (threadIdx.x == 0) attention_decode::block_offsets(table, nreq, bs, offs);
      __syncthreads();
    }
    const bool blocks_in_smem = room && offs[nreq] <= kMaxStagedBlocks;
    if (blocks_in_smem) {
      attention_decode::stage_block_indices(table, offs, nreq, bs, st.block_indices, staged);
      __syncthreads();
    }
    // Request k's block table, indexed by block position within the request as in
    // st.block_indices (only its keys' blocks are read).
    const auto blocks_of = [&](int k) -> const int32_t* {
      if (blocks_in_smem) return staged + offs[k] - table[k].key_begin / bs;
      return st.block_indices + table[k].blocks_at;
    };
    const auto fetch = [&](Cursor c) {
      if (c.k >= nreq) return RowBlocks{-1, -1, 0, 0};
      const Request& r = table[c.k];
      return row_blocks(blocks_of(c.k), r.key_begin + c.s * kT + first_row, kRowsPerThread,
                        r.key_end, bs);
    };
    const auto issue = [&](Cursor c, int b, RowBlocks rb) {
      const Request& r = table[c.k];
      const uint32_t k_dst = stage_addr + b * kBufferBytes;
      copy_rows<HD, kRowsPerThread>(k_dst, k_dst + kT * HD * 2, first_row, kRowsPerThread, chunk,
                                    r.key_begin + c.s * kT + first_row, r.key_end, blocks_of(c.k),
                                    rb, kv, a.kv_head, kc, vc);
    };
    const auto advance = [&](Cursor& c) {
      if (++c.s == table[c.k].stages) {
        ++c.k;
        c.s = 0;
      }
    };

    int total = 0;  // stages of every request
    for (int k = 0; k < nreq; ++k) total += table[k].stages;
    Cursor in{0, 0};  // the next stage to issue
    for (int p = 0; p < buffers - 1; ++p) {
      if (p < total) {
        issue(in, p, fetch(in));
        advance(in);
      }
      cp_async_commit();
    }
    RowBlocks next_blocks = fetch(in);

    // Every request's Q as bf16.
    attention_decode::stage_q<HD, kMaxRequests>(q_addr, table, nreq, st.q, hq, group, a.kv_head);

    // This warp's slice state of the current request (reset after each merge), in the
    // swapped layout (attention_decode::attend16).
    float o[HD / 16][4];
    float m[2], l[2];
    const auto reset = [&] {
#pragma unroll
      for (int dt = 0; dt < HD / 16; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
      m[0] = m[1] = -INFINITY;
      l[0] = l[1] = 0.0f;
    };
    reset();
    int col_end[2];
    Cursor at{0, 0};  // the stage computed
    for (int g = 0; g < total; ++g) {
      if (buffers == 3) {
        cp_async_wait(1);
      } else {
        cp_async_wait(0);
      }
      // Stage g (and Q) are in shared memory for every warp; every warp is done with stage
      // g - 1 and any merge, whose buffer the next issue refills.
      __syncthreads();
      if (g + buffers - 1 < total) {
        issue(in, (g + buffers - 1) % buffers, next_blocks);
        advance(in);
      }
      cp_async_commit();
      next_blocks = fetch(in);  // in flight while stage g computes

      const Request& r = table[at.k];
      if (at.s == 0) {  // a new request: this thread's columns' key ends
        attention_decode::column_key_ends(st, a, group, K, r, col_end);
      }
      const uint32_t k_tile = stage_addr + (g % buffers) * kBufferBytes;
      const uint32_t v_tile = k_tile + kT * HD * 2;
      const int key0 = r.key_begin + at.s * kT + warp * 16;
      if (key0 < r.key_end) {
        // The request's Q^T, read again per stage (4 ldmatrix at HD 128: fewer instructions
        // than the 16 registers' spill reloads when held across stages).
        uint32_t qf[HD / 16][2];
        attention_decode::load_q<HD>(q_addr, at.k * attention_decode::kRows, qf);
        attention_decode::attend16<HD>(qf, k_tile, v_tile, warp * 16, key0, col_end, o, m, l);
      }
      if (at.s + 1 == r.stages) {  // the request's last stage: merge its slices
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          l[e] += __shfl_xor_sync(0xffffffffu, l[e], 4);
          l[e] += __shfl_xor_sync(0xffffffffu, l[e], 8);
          l[e] += __shfl_xor_sync(0xffffffffu, l[e], 16);
        }
        float* ow =
            reinterpret_cast<float*>(ctx.smem) + (kQBytes + (g % buffers) * kBufferBytes) / 4;
        __syncthreads();  // every warp is done reading this stage's buffer
        attention_decode::store_slice<HD>(ml, ow, warp, r.mrows, o, m, l);
        __syncthreads();
        merge_slices<HD>(
            ml, ow, 1, kMegakernelWarps, r.mrows,
            attention_decode::output_writer<HD>(md, st, a, a.request_begin + at.k, r, group));
        reset();
      }
      advance(at);
    }
    cp_async_wait(0);  // only empty groups can be pending here
    __syncthreads();   // shared memory is free for the next instruction
    return true;
  }
};

}  // namespace megaserve::kernels
