#!/usr/bin/env bash
# scripts/check-layering must pass on the tree and fail on back arrows: kernels/ including the
# planner, and the contract (engine/isa/) including a room above it.
set -euo pipefail
root=$1
check="$root/scripts/check-layering"
"$check" "$root"
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir -p "$tree/kernels" "$tree/engine/isa" "$tree/engine/cpu"
echo '#include "engine/planner/schedule_builder.h"' > "$tree/kernels/op.cuh"
echo '#include "engine/model/weights.h"' > "$tree/engine/isa/step.h"
echo '#include "engine/isa/isa.h"' > "$tree/engine/cpu/ok.cc"
if out=$("$check" "$tree"); then
  echo "FAIL: check-layering passed a tree with back arrows"; exit 1
fi
echo "$out"
grep -q 'kernels/op.cuh: includes engine/planner/schedule_builder.h' <<< "$out"
grep -q 'engine/isa/step.h: includes engine/model/weights.h' <<< "$out"
if grep -q 'engine/cpu/ok.cc' <<< "$out"; then echo "FAIL: flagged a downward include"; exit 1; fi
echo PASS
