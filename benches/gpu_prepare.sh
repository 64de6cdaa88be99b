#!/usr/bin/env bash
# Build the release trainer here and stage what the GPU machine needs under gpu/ (git-ignored):
# the binary, the PyTorch reference script, and Fashion-MNIST (for the pretraining comparison).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh libs >/dev/null
tools/setup.sh data >/dev/null
cargo build --release --bin ehm-train
rm -rf gpu && mkdir -p gpu/cache/data/dataset-fashion-mnist/usr/share/datasets
cp target/release/ehm-train gpu/
# the NCCL plugin (needs the 4.7 GB torchref install for its CUDA headers; skip with NCCL=0)
if [ "${NCCL:-1}" = 1 ]; then tools/build_nccl_plugin.sh gpu/libehm_nccl.so; fi
cp benches/py/mae_reference.py gpu/
cp -r .cache/data/dataset-fashion-mnist/usr/share/datasets/fashion-mnist gpu/cache/data/dataset-fashion-mnist/usr/share/datasets/
du -sh gpu
