#!/usr/bin/env bash
# ehm-train under PyTorch's own torchrun (from `tools/setup.sh torchref`): 2 ranks × B, plain
# and elastic (c10d rendezvous), against 1 process × 2B on the same images and masks; then
# kill -9 of rank 1 mid-run and the same command again (it must resume and finish). Prints one
# JSON line per check. Usage: benches/torchrun_check.sh   (B=16 LIMIT=640, CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh torchref >&2
TR=.cache/torchref/bin/torchrun
T=${BIN:-./target/release/ehm-train}
[ -n "${BIN:-}" ] || cargo build --release --bin ehm-train >&2
B=${B:-16}; LIMIT=${LIMIT:-640}
export EHM_DEVICE=cpu
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
common=(pretrain --model vit_tiny_p4_fmnist --limit "$LIMIT" --warmup-epochs 0.5 --knn-every -1
        --log-every 1 --no-progress --json --workers 1)
compare() { python3 - "$work/$1" "$work/$2" "$3" <<'PY'
import json, sys
loss = lambda d: [json.loads(l)["loss"] for l in open(d + "/metrics.jsonl") if '"loss"' in l]
a, b = loss(sys.argv[1]), loss(sys.argv[2])
d = max(abs(x - y) / abs(x) for x, y in zip(a, b))
print(json.dumps({"check": sys.argv[3], "steps": len(b), "max_rel_loss_diff": d, "equal_1e-5": d <= 1e-5 and len(a) == len(b)}))
PY
}
"$T" "${common[@]}" --epochs 1 --out "$work/one" --batch-size $((2 * B)) > /dev/null
"$TR" --no-python --nproc-per-node 2 --master-port 29541 "$T" "${common[@]}" --epochs 1 \
  --out "$work/plain" --batch-size "$B" > /dev/null 2>"$work/plain.err"
compare one plain "torchrun_2_ranks_vs_1"
"$TR" --no-python --nnodes 1 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint localhost:29542 \
  "$T" "${common[@]}" --epochs 1 --out "$work/elastic" --batch-size "$B" > /dev/null 2>"$work/elastic.err"
compare one elastic "torchrun_elastic_2_ranks_vs_1"
# kill -9 of rank 1 after the first checkpoint, then the same command again
long=("${common[@]}" --epochs 12 --save-every 5 --batch-size "$B" --out "$work/killed")
"$TR" --no-python --nproc-per-node 2 --master-port 29543 "$T" "${long[@]}" > /dev/null 2>"$work/killed.err" &
job=$!
while [ ! -f "$work/killed/resume.safetensors" ]; do sleep 0.1; done
sleep 0.3
for p in $(pgrep -f "ehm-train pretrain" || true); do
  if tr '\0' '\n' < /proc/"$p"/environ 2>/dev/null | grep -qx "RANK=1"; then kill -9 "$p"; fi
done
set +e; wait "$job"; code=$?; set -e
s=$("$TR" --no-python --nproc-per-node 2 --master-port 29544 "$T" "${long[@]}" 2>/dev/null)
python3 -c 'import json,sys; s=json.loads(sys.argv[1]); print(json.dumps({"check": "torchrun_kill_9_then_rerun", "first_run_exit": int(sys.argv[2]), "resumed_from": s["resumed_from"], "steps": s["steps"]}))' "$s" "$code"
