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
echo "== tests finished in $(( $(date +%s) - start )) s"
