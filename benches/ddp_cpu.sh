#!/usr/bin/env bash
# Data-parallel pretraining on one CPU machine: the same job (vit_tiny_p4_fmnist, EHM, global
# batch BATCH, STEPS optimizer steps on Fashion-MNIST) as 1 process × 2 threads, 2 ranks × 1
# thread (`--nproc 2`, Gloo over loopback), and 1 process × 1 thread for scale; alternated
# REPS times in one call. Prints images/s (ehm-train's own summary: training loop only) and
# the ratio to 1 × 2 threads. Usage: benches/ddp_cpu.sh [OUT.jsonl]  (BATCH=128 STEPS=24 REPS=2)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/ddp_cpu.jsonl}
BATCH=${BATCH:-128}; STEPS=${STEPS:-24}; REPS=${REPS:-2}
T=${BIN:-./target/release}/ehm-train
if [ -z "${BIN:-}" ]; then tools/setup.sh all >&2; cargo build --release --bin ehm-train >&2; fi
mkdir -p "$(dirname "$OUT")"; : > "$OUT"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
# one epoch of LIMIT images is STEPS steps of BATCH
common=(pretrain --model vit_tiny_p4_fmnist --limit $((BATCH * STEPS)) --epochs 1 --warmup-epochs 0
        --knn-every -1 --save-every 100000 --log-every 100000 --no-progress --json --fresh)
run() { # NAME THREADS NPROC
  local per=$((BATCH / $3))
  local s; s=$(OMP_NUM_THREADS=$2 EHM_DEVICE=cpu $T "${common[@]}" --out "$work/$1" --batch-size $per --nproc $3)
  python3 -c 'import json,sys; s=json.loads(sys.argv[1]); print(json.dumps({"config": sys.argv[2], "threads": int(sys.argv[3]), "ranks": int(sys.argv[4]), "images_per_s": s["images_per_s"], "final_loss": s["final_loss"], "steps": s["steps"]}))' \
    "$s" "$1" "$2" "$3" >> "$OUT"
}
for r in $(seq "$REPS"); do
  run 1x2threads 2 1
  run 2ranksx1thread 1 2
  run 1x1thread 1 1
done
python3 - "$OUT" "$BATCH" "$STEPS" <<'PY'
import json, sys, statistics as st
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for r in rows:
    by.setdefault(r["config"], []).append(r)
base = st.mean(r["images_per_s"] for r in by["1x2threads"])
print(f"vit_tiny_p4_fmnist EHM, global batch {sys.argv[2]}, {sys.argv[3]} steps, {len(by['1x2threads'])} runs each")
print(f"{'configuration':<16} {'img/s (each run)':<22} {'mean':>7} {'vs 1 × 2 threads':>16} {'final loss':>10}")
for name, rs in by.items():
    v = [r["images_per_s"] for r in rs]
    print(f"{name:<16} {', '.join('%.1f' % x for x in v):<22} {st.mean(v):>7.1f} {st.mean(v) / base:>16.2f} {rs[-1]['final_loss']:>10.4f}")
PY
