// Standalone benchmark and self-check of the Hopper projection tile (kernels/hopper/
// projection_tile.cuh) inside a persistent kernel: grid = SM count, 384 threads, each CTA walks
// the 128 x 256 output tiles of C = A · Wᵀ round-robin. For every case it checks C against an
// fp32 CUDA-core reference on sampled rows (all rows when M <= 1024), poisons C beforehand and
// guards its end with a sentinel, then times the kernel. Exit status: 0 all good, 1 mismatch,
// 2 setup error (no sm_90 GPU, driver entry point missing, ...).
//
// Usage: gemm_bench [--csv FILE] [--iters N] [--quick] [--small] [--no-check]
//   --quick: M in {128, 1024, 8192} only; --small: the awkward cases, o M=1000 and qkv M=128
//   only (for compute-sanitizer runs).
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/hopper/projection_tile.cuh"

namespace {

using megaserve::hopper::PipelineState;
using megaserve::hopper::ProjectionSmem;
using Cfg = megaserve::hopper::ProjectionTileConfig;
namespace hp = megaserve::hopper;

#define CHECK_CUDA(expr)                                                                     \
  do {                                                                                       \
    cudaError_t err_ = (expr);                                                               \
    if (err_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorName(err_), __FILE__, \
                   __LINE__, cudaGetErrorString(err_));                                      \
      std::exit(2);                                                                          \
    }                                                                                        \
  } while (0)

// ---------------------------------------------------------------------------------------------
// The persistent kernel under test
// ---------------------------------------------------------------------------------------------
// tmap_a: A [M, K] bf16, box (64, 128); tmap_w: W [N, K] bf16, box (64, 256); C: [M, N] bf16.
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    projection_persistent_kernel(const __grid_constant__ CUtensorMap tmap_a,
                                 const __grid_constant__ CUtensorMap tmap_w, __nv_bfloat16* C,
                                 int M, int N, int K, int group_m) {
  extern __shared__ uint8_t dynamic_smem[];
  ProjectionSmem& s = hp::projection_smem(dynamic_smem);
  if (threadIdx.x == 0) hp::projection_init_barriers(s);
  __syncthreads();  // barriers initialized (and fenced) before any role touches them

  const int m_blocks = (M + Cfg::kBlockM - 1) / Cfg::kBlockM;
  const int n_blocks = (N + Cfg::kBlockN - 1) / Cfg::kBlockN;
  const int num_tiles = m_blocks * n_blocks;
  const int num_k_blocks = K / Cfg::kBlockK;
  const int warpgroup = threadIdx.x / 128;

  // One if/else over the roles, so that ptxas honours setmaxnreg (HOPPER.md).
  if (warpgroup == 0) {
    hp::setmaxnreg_dec<Cfg::kProducerRegs>();
    if (threadIdx.x == 0) {
      hp::prefetch_tensormap(&tmap_a);
      hp::prefetch_tensormap(&tmap_w);
      PipelineState st;
      for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
        int m0, n0;
        hp::projection_tile_coords(tile, m_blocks, n_blocks, group_m, m0, n0);
        hp::projection_tile_produce(s, &tmap_a, &tmap_w, m0, n0, num_k_blocks, st);
      }
    }
  } else {
    hp::setmaxnreg_inc<Cfg::kConsumerRegs>();
    PipelineState st;
    for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
      int m0, n0;
      hp::projection_tile_coords(tile, m_blocks, n_blocks, group_m, m0, n0);
      hp::projection_tile_consume(s, C, M, N, m0, n0, num_k_blocks, warpgroup - 1,
                                  threadIdx.x % 128, st);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Helpers: random fill, reference, gather
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t hash_u32(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return static_cast<uint32_t>(x);
}

// Uniform in [-1, 1), rounded to bf16.
__global__ void fill_random_bf16(__nv_bfloat16* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    const float u = (hash_u32(i * 0x9E3779B97F4A7C15ULL + seed) >> 8) * (1.0f / 8388608.0f);
    p[i] = __float2bfloat16_rn(u - 1.0f);
  }
}

// ref[i, n] = sum_k A[rows[i], k] * W[n, k] in fp32; one warp per output. grid (ceil(N/8), S).
__global__ void reference_rows(const __nv_bfloat16* A, const __nv_bfloat16* W, const int* rows,
                               float* ref, int N, int K) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n = blockIdx.x * 8 + warp;
  if (n >= N) return;
  const __nv_bfloat162* a =
      reinterpret_cast<const __nv_bfloat162*>(A + static_cast<size_t>(rows[blockIdx.y]) * K);
  const __nv_bfloat162* w = reinterpret_cast<const __nv_bfloat162*>(W + static_cast<size_t>(n) * K);
  float sum = 0.f;
  for (int k2 = lane; k2 < K / 2; k2 += 32) {
    const float2 av = __bfloat1622float2(a[k2]);
    const float2 wv = __bfloat1622float2(w[k2]);
    sum = fmaf(av.x, wv.x, sum);
    sum = fmaf(av.y, wv.y, sum);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) ref[static_cast<size_t>(blockIdx.y) * N + n] = sum;
}

// out[i, n] = C[rows[i], n] as fp32. grid (ceil(N/256), S), 256 threads.
__global__ void gather_rows(const __nv_bfloat16* C, const int* rows, float* out, int N) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n < N)
    out[static_cast<size_t>(blockIdx.y) * N + n] =
        __bfloat162float(C[static_cast<size_t>(rows[blockIdx.y]) * N + n]);
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                   const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                   const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                   CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiledFn get_encode_fn() {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult q{};
  CHECK_CUDA(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                              cudaEnableDefault, &q));
  if (q != cudaDriverEntryPointSuccess || fn == nullptr) {
    std::fprintf(stderr, "cuTensorMapEncodeTiled not available from the driver\n");
    std::exit(2);
  }
  return reinterpret_cast<EncodeTiledFn>(fn);
}

// 2D map over a row-major bf16 matrix [rows, K] (K contiguous), box (64, box_rows), 128B swizzle,
// out-of-bounds elements read as zero.
CUtensorMap make_kmajor_map(EncodeTiledFn encode, const __nv_bfloat16* base, int rows, int K,
                            int box_rows) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(K), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(K) * 2};  // bytes, dims 1..rank-1
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(Cfg::kBlockK),
                             static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2,
                            const_cast<__nv_bfloat16*>(base), dims, strides, box, elem_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    std::fprintf(stderr, "cuTensorMapEncodeTiled failed (%d) rows=%d K=%d box_rows=%d\n",
                 static_cast<int>(r), rows, K, box_rows);
    std::exit(2);
  }
  return map;
}

struct Case {
  const char* shape;
  int M, N, K;
  int grid_override;  // 0: min(SMs, tiles); else a small grid so each CTA runs many tiles
};

constexpr size_t kSentinelElems = 4096;  // bf16 guard after C's last element
constexpr uint16_t kSentinel = 0x7BAD;

struct Buffers {
  __nv_bfloat16 *A = nullptr, *W = nullptr, *C = nullptr;
  int* rows = nullptr;
  float *ref = nullptr, *got = nullptr;
};

// Launches the persistent kernel once on case `c` (asynchronous). group_m: M-blocks per raster
// group, sized so that a group's A rows (group_m x 128 x K bf16) take about 16 MB of L2.
void launch(const Case& c, const CUtensorMap& ta, const CUtensorMap& tw, __nv_bfloat16* C,
            int grid, cudaStream_t stream) {
  const int group_m = std::max(1, std::min(16, static_cast<int>((16u << 20) /
                                                                (Cfg::kBlockM * c.K * 2u))));
  projection_persistent_kernel<<<grid, Cfg::kThreads, hp::kProjectionSmemBytes, stream>>>(
      ta, tw, C, c.M, c.N, c.K, group_m);
}

// Compares sampled rows of C with the reference. Returns max |C - ref| / max|ref row|, or
// +inf when any value is NaN/Inf or the sentinel was overwritten.
double check_case(const Case& c, const Buffers& b, cudaStream_t stream, int* checked_rows) {
  const int S = std::min(c.M, 1024);
  std::vector<int> rows(S);
  if (S == c.M) {
    for (int i = 0; i < S; ++i) rows[i] = i;
  } else {  // spread over all M blocks, varying the position inside the tile; keep the last row
    const int step = c.M / S;
    for (int i = 0; i < S; ++i) rows[i] = i * step + (i * 7) % step;
    rows[S - 1] = c.M - 1;
  }
  *checked_rows = S;
  CHECK_CUDA(cudaMemcpyAsync(b.rows, rows.data(), S * sizeof(int), cudaMemcpyHostToDevice,
                             stream));
  reference_rows<<<dim3((c.N + 7) / 8, S), 256, 0, stream>>>(b.A, b.W, b.rows, b.ref, c.N, c.K);
  gather_rows<<<dim3((c.N + 255) / 256, S), 256, 0, stream>>>(b.C, b.rows, b.got, c.N);
  CHECK_CUDA(cudaGetLastError());
  std::vector<float> ref(static_cast<size_t>(S) * c.N), got(ref.size());
  std::vector<uint16_t> guard(kSentinelElems);
  CHECK_CUDA(cudaMemcpyAsync(ref.data(), b.ref, ref.size() * 4, cudaMemcpyDeviceToHost, stream));
  CHECK_CUDA(cudaMemcpyAsync(got.data(), b.got, got.size() * 4, cudaMemcpyDeviceToHost, stream));
  CHECK_CUDA(cudaMemcpyAsync(guard.data(), b.C + static_cast<size_t>(c.M) * c.N,
                             kSentinelElems * 2, cudaMemcpyDeviceToHost, stream));
  CHECK_CUDA(cudaStreamSynchronize(stream));
  for (uint16_t g : guard) {
    if (g != kSentinel) {
      std::fprintf(stderr, "  sentinel after C overwritten (0x%04x)\n", g);
      return INFINITY;
    }
  }
  double worst = 0.0;
  for (int i = 0; i < S; ++i) {
    const float* r = &ref[static_cast<size_t>(i) * c.N];
    const float* g = &got[static_cast<size_t>(i) * c.N];
    double row_max = 0.0;
    for (int n = 0; n < c.N; ++n) row_max = std::max(row_max, std::fabs(double(r[n])));
    row_max = std::max(row_max, 1e-6);
    for (int n = 0; n < c.N; ++n) {
      if (!std::isfinite(g[n])) {
        std::fprintf(stderr, "  non-finite C[%d, %d] (unwritten or bad)\n", rows[i], n);
        return INFINITY;
      }
      const double e = std::fabs(double(g[n]) - double(r[n])) / row_max;
      if (e > worst) worst = e;
    }
  }
  return worst;
}

}  // namespace

int main(int argc, char** argv) {
  const char* csv_path = nullptr;
  int iters = 20;
  bool quick = false, small = false, do_check = true;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--csv") && i + 1 < argc) csv_path = argv[++i];
    else if (!std::strcmp(argv[i], "--iters") && i + 1 < argc) iters = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--quick")) quick = true;
    else if (!std::strcmp(argv[i], "--small")) small = true;
    else if (!std::strcmp(argv[i], "--no-check")) do_check = false;
    else {
      std::fprintf(stderr,
                   "usage: %s [--csv FILE] [--iters N] [--quick] [--small] [--no-check]\n",
                   argv[0]);
      return 2;
    }
  }
  iters = std::max(iters, 1);

  int dev = 0;
  CHECK_CUDA(cudaSetDevice(dev));
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, dev));
  std::printf("device: %s, sm_%d%d, %d SMs, smem opt-in %zu B, L2 %d MB\n", prop.name,
              prop.major, prop.minor, prop.multiProcessorCount, prop.sharedMemPerBlockOptin,
              prop.l2CacheSize >> 20);
  if (prop.major != 9 || prop.minor != 0) {
    std::fprintf(stderr, "this binary holds sm_90a code only; found sm_%d%d\n", prop.major,
                 prop.minor);
    return 2;
  }
  if (prop.sharedMemPerBlockOptin < hp::kProjectionSmemBytes) {
    std::fprintf(stderr, "need %zu B of shared memory per block\n", hp::kProjectionSmemBytes);
    return 2;
  }
  CHECK_CUDA(cudaFuncSetAttribute(projection_persistent_kernel,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(hp::kProjectionSmemBytes)));
  const EncodeTiledFn encode = get_encode_fn();

  // Llama-3.1-8B projections (N x K), plus awkward cases: M and N tails, odd N, K not a
  // multiple of 64 * stages, and small grids so that each CTA carries its pipeline state
  // through many tiles.
  struct Shape { const char* name; int N, K; };
  const Shape shapes[] = {{"qkv", 6144, 4096}, {"o", 4096, 4096}, {"gate_up", 28672, 4096},
                          {"down", 4096, 14336}};
  const int ms_full[] = {128, 256, 1024, 4096, 8192};
  const int ms_quick[] = {128, 1024, 8192};
  std::vector<Case> cases;
  cases.push_back({"tail", 333, 1001, 640, 5});
  cases.push_back({"tail", 1000, 3000, 192, 7});
  for (const Shape& s : shapes) {
    if (small) {
      if (!std::strcmp(s.name, "qkv")) cases.push_back({s.name, 128, s.N, s.K, 0});
      if (!std::strcmp(s.name, "o")) cases.push_back({s.name, 1000, s.N, s.K, 0});
      continue;
    }
    if (quick) for (int m : ms_quick) cases.push_back({s.name, m, s.N, s.K, 0});
    else for (int m : ms_full) cases.push_back({s.name, m, s.N, s.K, 0});
    if (!std::strcmp(s.name, "o")) cases.push_back({s.name, 1000, s.N, s.K, 0});
  }

  size_t max_a = 0, max_w = 0, max_c = 0, max_sn = 0;
  for (const Case& c : cases) {
    max_a = std::max(max_a, size_t(c.M) * c.K);
    max_w = std::max(max_w, size_t(c.N) * c.K);
    max_c = std::max(max_c, size_t(c.M) * c.N);
    max_sn = std::max(max_sn, size_t(std::min(c.M, 1024)) * c.N);
  }
  Buffers b;
  CHECK_CUDA(cudaMalloc(&b.A, max_a * 2));
  CHECK_CUDA(cudaMalloc(&b.W, max_w * 2));
  CHECK_CUDA(cudaMalloc(&b.C, (max_c + kSentinelElems) * 2));
  CHECK_CUDA(cudaMalloc(&b.rows, 1024 * sizeof(int)));
  CHECK_CUDA(cudaMalloc(&b.ref, max_sn * 4));
  CHECK_CUDA(cudaMalloc(&b.got, max_sn * 4));
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  fill_random_bf16<<<4 * prop.multiProcessorCount, 256, 0, stream>>>(b.A, max_a, 1);
  fill_random_bf16<<<4 * prop.multiProcessorCount, 256, 0, stream>>>(b.W, max_w, 2);
  CHECK_CUDA(cudaGetLastError());
  cudaEvent_t e0, e1;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));

  FILE* csv = csv_path ? std::fopen(csv_path, "w") : nullptr;
  if (csv_path && !csv) {
    std::fprintf(stderr, "cannot write %s\n", csv_path);
    return 2;
  }
  if (csv) std::fprintf(csv, "shape,M,N,K,ms,tflops,max_err\n");

  constexpr double kTolerance = 1e-2;  // relative to the row max (DESIGN.md accuracy standard)
  bool all_ok = true;
  std::printf("\nmegaserve hopper projection tile (persistent, 128x256x64, %d stages)\n",
              Cfg::kStages);
  std::printf("%-8s %6s %6s %6s %5s %5s %10s %9s %10s %s\n", "shape", "M", "N", "K", "grid",
              "tiles", "ms", "TFLOP/s", "max_err", "check");
  for (const Case& c : cases) {
    if (c.K % Cfg::kBlockK != 0 || c.K <= 0 || c.M <= 0 || c.N <= 0) {
      std::fprintf(stderr, "bad case %s M=%d N=%d K=%d: K must be a positive multiple of %d\n",
                   c.shape, c.M, c.N, c.K, Cfg::kBlockK);
      return 2;
    }
    const int tiles = ((c.M + Cfg::kBlockM - 1) / Cfg::kBlockM) *
                      ((c.N + Cfg::kBlockN - 1) / Cfg::kBlockN);
    const int grid = c.grid_override ? c.grid_override
                                     : std::min(prop.multiProcessorCount, tiles);
    const CUtensorMap ta = make_kmajor_map(encode, b.A, c.M, c.K, Cfg::kBlockM);
    const CUtensorMap tw = make_kmajor_map(encode, b.W, c.N, c.K, Cfg::kBlockN);
    const size_t c_elems = size_t(c.M) * c.N;

    double err = 0.0;
    int checked = 0;
    const char* verdict = "skipped";
    if (do_check) {
      // Poison C with NaN (0xFFFF) and lay the sentinel right after its end.
      CHECK_CUDA(cudaMemsetAsync(b.C, 0xFF, c_elems * 2, stream));
      std::vector<uint16_t> guard(kSentinelElems, kSentinel);
      CHECK_CUDA(cudaMemcpyAsync(b.C + c_elems, guard.data(), kSentinelElems * 2,
                                 cudaMemcpyHostToDevice, stream));
      launch(c, ta, tw, b.C, grid, stream);
      CHECK_CUDA(cudaGetLastError());
      const cudaError_t run_err = cudaStreamSynchronize(stream);
      if (run_err != cudaSuccess) {  // the deadlock watchdog's trap surfaces here
        std::fprintf(stderr, "%s M=%d: kernel failed: %s (an illegal-instruction error after "
                     "~10 s is the mbarrier watchdog: a pipeline deadlock)\n", c.shape, c.M,
                     cudaGetErrorString(run_err));
        return 1;
      }
      err = check_case(c, b, stream, &checked);
      const bool ok = err <= kTolerance;
      all_ok = all_ok && ok;
      verdict = ok ? "ok" : "MISMATCH";
    }

    for (int i = 0; i < 3; ++i) launch(c, ta, tw, b.C, grid, stream);  // warm-up
    CHECK_CUDA(cudaGetLastError());
    // `iters` launches back to back between two events: the mean kernel time, with launch
    // latency hidden behind the previous kernel (as the megakernel would never pay it).
    CHECK_CUDA(cudaEventRecord(e0, stream));
    for (int i = 0; i < iters; ++i) launch(c, ta, tw, b.C, grid, stream);
    CHECK_CUDA(cudaEventRecord(e1, stream));
    CHECK_CUDA(cudaEventSynchronize(e1));
    CHECK_CUDA(cudaGetLastError());
    float total_ms = 0.f;
    CHECK_CUDA(cudaEventElapsedTime(&total_ms, e0, e1));
    const double ms = total_ms / iters;
    const double tflops = 2.0 * c.M * double(c.N) * c.K / (ms * 1e-3) / 1e12;
    std::printf("%-8s %6d %6d %6d %5d %5d %10.4f %9.1f %10.2e %s", c.shape, c.M, c.N, c.K, grid,
                tiles, ms, tflops, err, verdict);
    if (do_check) std::printf(" (%d rows)", checked);
    std::printf("\n");
    std::fflush(stdout);
    if (csv) std::fprintf(csv, "%s,%d,%d,%d,%.5f,%.2f,%.3e\n", c.shape, c.M, c.N, c.K, ms,
                          tflops, err);
  }
  if (csv) std::fclose(csv);
  std::printf("%s\n", do_check ? (all_ok ? "CHECK: all cases within 1e-2 of the row max"
                                         : "CHECK: MISMATCH (see above)")
                               : "CHECK: skipped");
  return all_ok ? 0 : 1;
}
