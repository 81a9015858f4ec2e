// How much of the copy bandwidth one CTA per SM reaches with a given number of bytes in flight:
// the question behind every streaming loop of the megakernel (the CUDA-core matvec keeps 32 KB
// in flight per SM, decode attention 128 KB, a 128-row wgmma pass ~144 KB).
//
// Each of num_sms CTAs (256 threads) streams its own contiguous share of a buffer much larger
// than L2 into shared memory, once per run, in one of two ways:
//   bulk:  thread 0 keeps `stages` bulk copies (cp.async.bulk, `chunk` bytes each) in flight
//          through a ring of shared-memory buffers, each completing on its own mbarrier; the
//          CTA waits for the oldest, touches one word of it, refills it.
//   regs:  every thread keeps `loads` 16-byte loads in flight (issued together, then summed),
//          as tile_matvec.cuh's loop does: 4 KB per warp per burst at loads = 8.
// Prints GB/s over the whole chip for each configuration, and the bytes in flight per SM.
//   build-hopper/inflight_bench [buffer_mb]
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <vector>

#include "kernels/hopper/hopper_ptx.cuh"

namespace {

using megaserve::hopper::mbarrier_init;
using megaserve::hopper::mbarrier_wait_parity;

// `bytes` from src into shared memory at dst, completing on bar (armed here for them).
__device__ __forceinline__ void bulk_copy(char* dst, const void* src, uint32_t bytes,
                                          uint64_t* bar) {
  megaserve::hopper::mbarrier_arrive_expect_tx(bar, bytes);
  megaserve::hopper::bulk_load(dst, src, bytes, bar);
}

__global__ void __launch_bounds__(256, 1)
    bulk_stream(const char* src, int64_t per_cta, int stages, int chunk, unsigned* sink) {
  extern __shared__ __align__(128) char smem[];
  __shared__ uint64_t bars[16];
  const char* mine = src + blockIdx.x * per_cta;
  const int64_t n = per_cta / chunk;
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) mbarrier_init(&bars[s], 1);
    megaserve::hopper::fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages && s < n; ++s) {
      bulk_copy(smem + s * chunk, mine + s * chunk, chunk, &bars[s]);
    }
  }
  unsigned acc = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int s = static_cast<int>(i % stages);
    mbarrier_wait_parity(&bars[s], static_cast<uint32_t>((i / stages) & 1));
    acc += reinterpret_cast<const unsigned*>(smem + s * chunk)[threadIdx.x];
    __syncthreads();  // every thread is done with buffer s
    if (threadIdx.x == 0 && i + stages < n) {
      bulk_copy(smem + s * chunk, mine + (i + stages) * chunk, chunk, &bars[s]);
    }
  }
  if (acc == 0x12345678u) sink[0] = acc;
}

template <int kLoads>
__global__ void __launch_bounds__(256, 1)
    reg_stream(const uint4* src, int64_t per_cta_vec, unsigned* sink) {
  const uint4* mine = src + blockIdx.x * per_cta_vec;
  unsigned acc = 0;
  for (int64_t i = threadIdx.x; i + (kLoads - 1) * 256 < per_cta_vec; i += kLoads * 256) {
    uint4 v[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) v[u] = __ldg(mine + i + u * 256);
#pragma unroll
    for (int u = 0; u < kLoads; ++u) acc += v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  if (acc == 0x12345678u) sink[0] = acc;
}

template <typename Launch>
double time_gbps(Launch launch, double bytes) {
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  launch();  // warm-up
  cudaEventRecord(e0);
  constexpr int kRuns = 5;
  for (int r = 0; r < kRuns; ++r) launch();
  cudaEventRecord(e1);
  cudaEventSynchronize(e1);
  float ms = 0;
  cudaEventElapsedTime(&ms, e0, e1);
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return bytes * kRuns / (ms * 1e-3) / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t mb = argc > 1 ? std::atoll(argv[1]) : 2048;
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const int64_t per_cta = (mb << 20) / sms / 65536 * 65536;
  const int64_t total = per_cta * sms;
  char* buf = nullptr;
  unsigned* sink = nullptr;
  if (cudaMalloc(&buf, total) != cudaSuccess || cudaMalloc(&sink, 4) != cudaSuccess) {
    std::fprintf(stderr, "cudaMalloc failed\n");
    return 1;
  }
  cudaMemset(buf, 1, total);
  const double copy =
      time_gbps([&] { cudaMemcpy(buf, buf + total / 2, total / 2, cudaMemcpyDeviceToDevice); },
                2.0 * (total / 2));
  std::printf(
      "inflight_bench: %d SMs, %.0f MB streamed per run; cudaMemcpy d2d %.0f GB/s (read+write)\n",
      sms, total / 1e6, copy);
  std::printf("%-6s %8s %8s %14s %10s %8s\n", "kind", "stages", "chunk", "KB in flight/SM", "GB/s",
              "of copy");
  cudaFuncSetAttribute(bulk_stream, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024);
  const int chunks[] = {8192, 16384, 32768, 49152};
  for (const int chunk : chunks) {
    for (int stages = 1; stages <= 12; ++stages) {
      if (static_cast<int64_t>(stages) * chunk > 196 * 1024) break;
      const double g = time_gbps(
          [&] { bulk_stream<<<sms, 256, stages * chunk>>>(buf, per_cta, stages, chunk, sink); },
          static_cast<double>(total));
      std::printf("%-6s %8d %8d %14.0f %10.0f %8.2f\n", "bulk", stages, chunk,
                  stages * chunk / 1024.0, g, g / copy);
    }
  }
  const auto regs = [&](auto kernel, int loads) {
    const double g = time_gbps(
        [&] { kernel<<<sms, 256>>>(reinterpret_cast<const uint4*>(buf), per_cta / 16, sink); },
        static_cast<double>(total));
    std::printf("%-6s %8d %8d %14.0f %10.0f %8.2f\n", "regs", loads, 16, loads * 16 * 256 / 1024.0,
                g, g / copy);
  };
  regs(reg_stream<4>, 4);
  regs(reg_stream<8>, 8);
  regs(reg_stream<16>, 16);
  regs(reg_stream<32>, 32);
  const cudaError_t err = cudaDeviceSynchronize();
  if (err != cudaSuccess) {
    std::fprintf(stderr, "CUDA error: %s\n", cudaGetErrorString(err));
    return 1;
  }
  return 0;
}
