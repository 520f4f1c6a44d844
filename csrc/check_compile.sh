#!/usr/bin/env bash
# Compile-only check of the CUDA sources in csrc/ (no GPU needed): every standalone .cu file is
# compiled to an object for one architecture with the machine's nvcc.
#
#   csrc/check_compile.sh            # sm_90
#   ARCH=sm_80 csrc/check_compile.sh
#   NVCC=/path/to/nvcc csrc/check_compile.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nvcc="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$nvcc" && -x /usr/local/cuda/bin/nvcc ]]; then nvcc=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$nvcc" ]]; then
    echo "check_compile: nvcc not found (set NVCC or put it on PATH)" >&2
    exit 2
fi
arch="${ARCH:-sm_90}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

status=0
while IFS= read -r -d '' source; do
    rel="${source#"$here"/}"
    if "$nvcc" -std=c++17 -O2 -arch="$arch" -Werror all-warnings -c "$source" -o "$out/$(basename "$source").o"; then
        echo "ok   $rel ($arch)"
    else
        echo "FAIL $rel ($arch)" >&2
        status=1
    fi
done < <(find "$here" -name '*.cu' -print0 | sort -z)
exit "$status"
