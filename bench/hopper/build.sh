#!/usr/bin/env bash
# Builds bench/hopper/gemm_bench into build-hopper/ (git-ignored). Run from anywhere.
# The ptxas report (-Xptxas -v: registers, stack frame, spills per kernel) is printed and kept
# in build-hopper/ptxas.txt. cuTensorMapEncodeTiled comes from cudaGetDriverEntryPointByVersion,
# so nothing links libcuda; the CUDA runtime is linked statically (nvcc's default).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${ROOT}/build-hopper"
NVCC="${NVCC:-/usr/local/cuda/bin/nvcc}"
mkdir -p "${OUT}"
# Deadlock watchdog: a wait longer than ~20e9 cycles (~10 s) prints and traps instead of hanging.
"${NVCC}" -O3 -std=c++20 -gencode=arch=compute_90a,code=sm_90a -lineinfo \
  -DMEGASERVE_MBAR_TIMEOUT_CYCLES=20000000000LL \
  -I"${ROOT}" -Xptxas -v -Xcompiler -Wall,-Wextra \
  -o "${OUT}/gemm_bench" "${ROOT}/bench/hopper/gemm_bench.cu" 2>&1 | tee "${OUT}/ptxas.txt"
echo "built ${OUT}/gemm_bench"
