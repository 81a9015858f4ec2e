#!/usr/bin/env bash
# Hopper projection-tile benchmark, end to end, on the GPU host. Run from the repo root:
#   bash bench/hopper/run.sh [--quick] [--iters N]   (both are passed to both programs)
# 1. builds build-hopper/gemm_bench when nvcc is present and the binary is missing or older than
#    its sources (else uses the binary carried in build-hopper/);
# 2. if cuobjdump is present, checks the kernel's SASS: HGMMA and UTMALDG present, no LDL/STL;
# 3. runs gemm_bench (self-checking; exit 1 on a numerical mismatch), then torch_matmul.py,
#    and prints both tables and the ratio. Exit status: gemm_bench's, else torch's.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${ROOT}/build-hopper"
BIN="${OUT}/gemm_bench"
NVCC="${NVCC:-/usr/local/cuda/bin/nvcc}"
mkdir -p "${OUT}"

stale=0
if [[ ! -x "${BIN}" ]]; then stale=1; else
  for f in "${ROOT}"/bench/hopper/gemm_bench.cu "${ROOT}"/kernels/hopper/*.cuh; do
    [[ "${f}" -nt "${BIN}" ]] && stale=1
  done
fi
if [[ ${stale} == 1 ]]; then
  if [[ -x "${NVCC}" ]]; then
    echo "== building ${BIN}"
    if ! NVCC="${NVCC}" bash "${ROOT}/bench/hopper/build.sh" > "${OUT}/build.log" 2>&1; then
      cat "${OUT}/build.log"; echo "build failed" >&2
      [[ -x "${BIN}" ]] || exit 2
      echo "== using the existing ${BIN}" >&2
    fi
    grep -A3 "projection_persistent_kernel.*for 'sm_90a'" "${OUT}/build.log" | tail -2
    grep -E "C75[0-9]{2}|warning" "${OUT}/build.log" || true
  elif [[ ! -x "${BIN}" ]]; then
    echo "no ${NVCC} and no prebuilt ${BIN}" >&2; exit 2
  else
    echo "== no nvcc here; using the prebuilt ${BIN}"
  fi
fi

CUOBJDUMP="$(command -v cuobjdump || echo /usr/local/cuda/bin/cuobjdump)"
if [[ -x "${CUOBJDUMP}" ]]; then
  "${CUOBJDUMP}" --dump-sass "${BIN}" 2>/dev/null |
    awk '/Function : .*projection_persistent_kernel/{f=1; next} /Function : /{f=0} f' \
    > "${OUT}/sass_kernel.txt"
  echo "== SASS of projection_persistent_kernel: HGMMA $(grep -c HGMMA "${OUT}/sass_kernel.txt")," \
       "UTMALDG $(grep -c UTMALDG "${OUT}/sass_kernel.txt")," \
       "LDL/STL $(grep -cE '\b(LDL|STL)\b' "${OUT}/sass_kernel.txt") (want >0, >0, 0)"
fi

TMP="$(mktemp -d)"
echo "== gemm_bench"
timeout 300 "${BIN}" --csv "${TMP}/ours.csv" "$@"
rc_ours=$?
if [[ ${rc_ours} == 124 ]]; then echo "gemm_bench timed out (pipeline hang?)" >&2; fi
echo
echo "== torch_matmul.py"
if [[ -s "${TMP}/ours.csv" ]]; then
  timeout 300 python3 "${ROOT}/bench/hopper/torch_matmul.py" --ours "${TMP}/ours.csv" "$@"
else
  timeout 300 python3 "${ROOT}/bench/hopper/torch_matmul.py" "$@"
fi
rc_torch=$?
cp "${TMP}/ours.csv" "${OUT}/ours_last.csv" 2>/dev/null || true
rm -rf "${TMP}"
echo "gemm_bench exit ${rc_ours}, torch_matmul exit ${rc_torch}"
[[ ${rc_ours} != 0 ]] && exit ${rc_ours}
exit ${rc_torch}
