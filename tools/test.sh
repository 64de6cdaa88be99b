#!/usr/bin/env bash
# The test command (README command 2; .ci/run calls exactly this): set-up (idempotent), build
# both feature sets, run every test. Works on a fresh machine with cargo and the registries.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
tools/setup.sh all
tools/setup.sh pydeps
tools/setup.sh milvus  # the server tests/milvus.rs starts
echo "== cargo build -p ehm-core (the serving tools alone: no libtorch needed)"
cargo build -p ehm-core --bins
echo "== cargo test (the whole workspace: ehm-core and ehm)"
cargo test --release -- --test-threads=2
# The machines vary (some AVX-512 + VNNI, some AVX2 only) and ONNX Runtime, libtorch and our
# distance kernels each pick code by CPU: on an AVX-512 machine, run every test again with its
# AVX-512 hidden (tools/avx2_only.sh, as cargo's runner: no rebuild). The Milvus tests are left
# out there: the third-party server does not start under the mask.
set +e; tools/avx2_only.sh --check; can=$?; set -e
case $can in
  0)
    echo "== cargo test again on the AVX2 code paths (AVX-512 hidden)"
    cargo test --release --config "target.x86_64-unknown-linux-gnu.runner=['$PWD/tools/avx2_only.sh']" \
      -- --test-threads=2 --skip milvus ;;
  2) echo "== AVX2 code paths: already tested above (this CPU has no AVX-512)" ;;
  3) echo "== AVX2 code paths NOT tested: this machine cannot hide its AVX-512 (see above)" ;;
  *) echo "== tools/avx2_only.sh is broken (see above)"; exit 1 ;;
esac
echo "== tests finished in $(( $(date +%s) - start )) s"
