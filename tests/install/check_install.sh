#!/usr/bin/env bash
# Installs the build into a fresh prefix and checks that it is relocatable: every binary
# in bin/ has RPATH $ORIGIN/../lib, and ldd resolves each of its libraries either inside
# the prefix or to a library the target host provides (glibc, libstdc++, libgcc, the CUDA
# driver, NCCL). Usage: check_install.sh BUILD_DIR
set -euo pipefail
build=$1
prefix=$(mktemp -d)
trap 'rm -rf "$prefix"' EXIT
cmake --install "$build" --prefix "$prefix" > /dev/null

system='^(linux-vdso|ld-linux-x86-64|libc|libm|libdl|librt|libpthread|libresolv|libstdc\+\+|libgcc_s|libcuda|libnccl)\.so'
failures=0
checked=0
for bin in "$prefix"/bin/*; do
  checked=$((checked + 1))
  if ! readelf -d "$bin" | grep -E '\((RPATH|RUNPATH)\)' | grep -qF '$ORIGIN/../lib'; then
    echo "FAIL $(basename "$bin"): no RPATH \$ORIGIN/../lib"
    failures=$((failures + 1))
  fi
  while read -r line; do
    name=$(echo "$line" | awk '{print $1}')
    path=$(echo "$line" | awk '$2 == "=>" && $3 != "not" {print $3}')
    [ -n "$path" ] && path=$(realpath -m "$path")
    if echo "$line" | grep -q 'not found'; then
      echo "FAIL $(basename "$bin"): $name not found"
      failures=$((failures + 1))
    elif [[ -n "$path" && "$path" != "$prefix"/lib/* ]] && ! [[ "$name" =~ $system ]]; then
      echo "FAIL $(basename "$bin"): $name resolves outside the install: $path"
      failures=$((failures + 1))
    fi
  done < <(env -u LD_LIBRARY_PATH ldd "$bin")
done
if [ "$checked" -eq 0 ]; then
  echo "FAIL: the install has no binaries in bin/"
  exit 1
fi
echo "checked $checked binaries, $(ls "$prefix/lib" | wc -l) bundled libraries, $failures failures"
[ "$failures" -eq 0 ]
