#!/usr/bin/env bash
# Compile-only check of the CUDA sources in torchfg/csrc/ (no GPU needed).
#
# Every standalone .cu file is compiled to an object for one architecture with the machine's
# nvcc. With --with-binding, the torch bindings (*_binding.cpp) are also syntax-checked with the
# host compiler against the installed torch's headers (CUDA headers from the nvcc install; on a
# CPU-only torch wheel, which lacks c10/cuda/impl/cuda_cmake_macros.h, an empty stand-in is used).
#
#   torchfg/csrc/check_compile.sh          # .cu files, sm_90
#   ARCH=sm_80 torchfg/csrc/check_compile.sh
#   NVCC=/path/to/nvcc PYTHON=python3 torchfg/csrc/check_compile.sh --with-binding
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
with_binding=0
for arg in "$@"; do
    case "$arg" in
        --with-binding) with_binding=1 ;;
        *) echo "usage: $0 [--with-binding]" >&2; exit 2 ;;
    esac
done
nvcc="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$nvcc" && -x /usr/local/cuda/bin/nvcc ]]; then nvcc=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$nvcc" ]]; then
    echo "check_compile: nvcc not found (set NVCC or put it on PATH)" >&2
    exit 2
fi
arch="${ARCH:-sm_90}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

# The half-precision macros that torch.utils.cpp_extension passes to nvcc, so that the check sees
# the kernels as the JIT build does.
torch_flags=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
             -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr)
status=0
while IFS= read -r -d '' source; do
    rel="${source#"$here"/}"
    if "$nvcc" -std=c++17 -O2 -arch="$arch" "${torch_flags[@]}" -Werror all-warnings -c "$source" \
        -o "$out/$(basename "$source").o"; then
        echo "ok   $rel ($arch)"
    else
        echo "FAIL $rel ($arch)" >&2
        status=1
    fi
done < <(find "$here" -name '*.cu' -print0 | sort -z)

if [[ "$with_binding" == 1 ]]; then
    python="${PYTHON:-python}"
    torch_dir="$("$python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
    py_include="$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
    cuda_include=""
    for candidate in "${CUDA_HOME:-}/include" "$(dirname "$(readlink -f "$nvcc")")/../include" /usr/local/cuda/include; do
        if [[ -f "$candidate/cuda_runtime.h" ]]; then cuda_include="$candidate"; break; fi
    done
    if [[ -z "$cuda_include" ]]; then
        echo "check_compile: cuda_runtime.h not found (set CUDA_HOME)" >&2
        exit 2
    fi
    stub=()
    if [[ ! -f "$torch_dir/include/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
        mkdir -p "$out/stub/c10/cuda/impl"
        echo "#pragma once" > "$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
        stub=(-I"$out/stub")
    fi
    while IFS= read -r -d '' source; do
        rel="${source#"$here"/}"
        for define in "" "-DTORCHFG_AOT_MODULE"; do
            if "${CXX:-g++}" -std=c++17 -fsyntax-only -Wall -Wextra -Werror $define "${stub[@]}" -I"$py_include" \
                -isystem "$torch_dir/include" -isystem "$torch_dir/include/torch/csrc/api/include" \
                -I"$cuda_include" -I"$(dirname "$source")" "$source"; then
                echo "ok   $rel (syntax${define:+, $define})"
            else
                echo "FAIL $rel (syntax${define:+, $define})" >&2
                status=1
            fi
        done
    done < <(find "$here" -name '*_binding.cpp' -print0 | sort -z)
fi
exit "$status"
