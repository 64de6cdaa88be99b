#!/usr/bin/env bash
# Build the NCCL plugin of data-parallel pretraining (src/train/c10d_nccl.cpp →
# target/release/libehm_nccl.so): libtorch's ProcessGroupNCCL behind the shim's C face, for GPU
# machines. Needs the CUDA headers of the torch 2.11 install from `tools/setup.sh torchref`
# plus nvcc's crt/ and libcu++ (`tools/setup.sh nccl-sdk` fetches all of it). The plugin links
# libtorch_cuda.so; at run time it resolves against the PyTorch the machine loads (the same
# 2.11 + cu130 build). ehm-train finds it next to itself or at $EHM_NCCL_PLUGIN.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh nccl-sdk >&2
SP=$(echo .cache/torchref/lib/python3.*/site-packages)
OUT=${1:-target/release/libehm_nccl.so}
mkdir -p "$(dirname "$OUT")"
g++ -std=c++17 -O2 -fPIC -shared -w \
  -DUSE_C10D_NCCL -DUSE_CUDA -D_GLIBCXX_USE_CXX11_ABI=1 -DGLOG_USE_GLOG_EXPORT \
  -I .cache/libtorch/include -I .cache/libtorch/include/torch/csrc/api/include \
  -I .cache/nccl-sdk/include -I .cache/nccl-sdk/include/cccl \
  -I "$SP/nvidia/cu13/include" -I "$SP/nvidia/nccl/include" \
  src/train/c10d_nccl.cpp -o "$OUT.tmp" \
  -L "$SP/torch/lib" -ltorch_cuda -lc10_cuda -ltorch_cpu -lc10
mv "$OUT.tmp" "$OUT"
echo "built $OUT" >&2
