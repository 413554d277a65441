#!/usr/bin/env bash
# Compile-only check of the CUDA kernels with nvcc on a machine without a GPU or a CUDA build of
# PyTorch (the CPU wheel lacks one generated header, stubbed here). Usage: bash cuda_ext/check_nvcc.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
stub="$(mktemp -d)"
trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
torch_include="$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')"
python_include="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
nvcc -c "$here/hashgrid_cuda.cu" -o "$stub/hashgrid_cuda.o" -std=c++17 -O3 -DWITH_CUDA -arch="${ARCH:-sm_90}" \
  -I"$stub" -I"$torch_include" -I"$torch_include/torch/csrc/api/include" -I"$python_include" -I"$here" \
  -DTORCH_EXTENSION_NAME=hashgrid_check
echo "nvcc compiled $here/hashgrid_cuda.cu"
