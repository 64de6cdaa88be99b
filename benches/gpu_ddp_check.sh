#!/usr/bin/env bash
# Data-parallel pretraining on the device it runs on: 2 ranks × B (`--nproc 2`, both on the one
# GPU or CPU; Gloo, and on a GPU also NCCL when its plugin is built) against 1 process × 2B, same
# images and masks; prints one JSON line (both runs' img/s, the largest relative loss difference
# over the steps, equal within 1e-5?) and appends it to $OUT/results.jsonl.
# Usage: BIN=gpu/ehm-train bash benches/gpu_ddp_check.sh   (B=64 STEPS=20 LIMIT=… DTYPE=fp32)
set -euo pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
T=${BIN:-./target/release/ehm-train}
B=${B:-64}; STEPS=${STEPS:-20}; DTYPE=${DTYPE:-fp32}
LIMIT=${LIMIT:-$((2 * B * STEPS))}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
common=(pretrain --model vit_tiny_p4_fmnist --limit "$LIMIT" --epochs 1 --warmup-epochs 0.2
        --knn-every -1 --log-every 1 --save-every 100000 --no-progress --json --dtype "$DTYPE")
one=$("$T" "${common[@]}" --out "$work/one" --batch-size $((2 * B)))
check() { # BACKEND: 2 ranks × B with that engine against the one-process run
  local two
  two=$("$T" "${common[@]}" --out "$work/two_$1" --batch-size "$B" --nproc 2 --dist-backend "$1") || {
    echo "{\"check\": \"ddp_2_ranks_vs_1\", \"backend\": \"$1\", \"failed\": true}" | tee -a "$OUT/results.jsonl"; return; }
  python3 - "$work" "$one" "$two" "$1" "$OUT/results.jsonl" <<'PY'
import json, sys
work, one, two, backend, out = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4], sys.argv[5]
loss = lambda run: [json.loads(l)["loss"] for l in open(f"{work}/{run}/metrics.jsonl") if '"loss"' in l]
a, b = loss("one"), loss(f"two_{backend}")
diff = max(abs(x - y) / abs(x) for x, y in zip(a, b))
r = {"check": "ddp_2_ranks_vs_1", "backend": backend, "device": one["device"], "steps": one["steps"],
     "one_images_per_s": one["images_per_s"], "two_images_per_s": two["images_per_s"],
     "max_rel_loss_diff": diff, "equal_1e-5": diff <= 1e-5 and len(a) == len(b)}
print(json.dumps(r)); open(out, "a").write(json.dumps(r) + "\n")
PY
}
check gloo
# NCCL where each rank has a GPU of its own (NCCL refuses two ranks on one GPU) and its plugin
# sits next to the binary (tools/build_nccl_plugin.sh)
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [ "${gpus:-0}" -ge 2 ] && [ -f "$(dirname "$T")/libehm_nccl.so" ]; then
  check nccl
elif [ "${gpus:-0}" = 1 ]; then
  echo "NCCL not checked: one GPU here, and NCCL needs one per rank" >&2
fi
